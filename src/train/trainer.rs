//! The training loop: ClipCap's objective (caption tokens after a mapped CLIP prefix) and AdamW
//! with linear warmup and decay. Checkpoints (which resume exactly) are in `checkpoint`, the
//! bundle written at the end in `export`, the hyper-parameters in `spec`.
use crate::model::bundle::{CaptionNet, Manifest};
use crate::model::gpt2::Gpt2Config;
use crate::model::mapper::MapperConfig;
use crate::train::amp::{with_autocast, AmpDtype};
use crate::train::checkpoint::{self, CheckpointState};
use crate::train::data::{max_seq_len, Batch, Dataset, Split};
use crate::train::export;
use crate::train::optim::{lr_factor, AdamW, AdamWConfig};
use crate::train::spec::TrainSpec;
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tch::{Device, Kind, Tensor};
use tokenizers::Tokenizer;

/// One point of the loss curve.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LossPoint {
    pub step: i64,
    pub epoch: usize,
    pub loss: f64,
}

/// Progress reported after every step.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub struct Progress {
    pub epoch: usize,
    pub epochs: usize,
    pub step: i64,
    pub total_steps: i64,
    pub loss: f64,
    pub lr: f64,
    pub samples_per_s: f64,
    pub eta_s: f64,
    pub history: Vec<LossPoint>,
    pub val_history: Vec<LossPoint>,
    /// What in the set-up is likely a mistake (a warmup longer than the run, no validation
    /// captions, a resumed run given more epochs); reported with every progress.
    pub warnings: Vec<String>,
}

pub enum Outcome {
    Finished { bundle: PathBuf, progress: Progress },
    Cancelled { progress: Progress },
}

/// Runs (or resumes, when `ckpt_dir` holds a checkpoint and `resume` is set) a training run.
/// `cancel` is checked between steps; a cancelled run saves a checkpoint first.
pub fn train(
    spec: &TrainSpec,
    device: Device,
    ckpt_dir: &Path,
    resume: bool,
    cancel: &AtomicBool,
    report: &mut dyn FnMut(&Progress),
) -> Result<Outcome> {
    let SetUp {
        origin,
        corpus,
        mut net,
        trainable,
    } = set_up(spec, device)?;
    let mut opt = AdamW::new(
        AdamWConfig {
            lr: spec.params.lr,
            ..Default::default()
        },
        trainable,
    );
    let start = checkpoint::start(spec, ckpt_dir, resume, &mut net, &mut opt)?;
    if start.resumed {
        tracing::info!(
            epoch = start.state.epoch,
            step = start.state.global_step,
            "resumed from checkpoint"
        );
    }
    let mut warnings = start.notes.clone();
    warnings.extend(set_up_warnings(spec, &corpus));
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let mut run = Run::new(spec, device, &corpus, net, opt, start);
    run.progress.warnings = warnings;
    while run.state.epoch < spec.params.epochs {
        if let EpochEnd::Cancelled = run.train_epoch(cancel, report)? {
            run.progress.history = run.state.history.clone();
            return Ok(Outcome::Cancelled {
                progress: run.progress,
            });
        }
        run.validation()?;
        run.end_epoch(report)?;
    }
    let manifest = export::manifest(
        spec,
        &origin.base,
        &origin.base_manifest,
        origin.mapper_cfg,
        origin.gpt2_cfg,
        &run.state.history,
        &run.state.val_history,
    )?;
    export::write_bundle(
        &spec.out,
        &manifest,
        &run.net,
        &origin.base,
        &origin.base_manifest,
    )?;
    run.progress.history = run.state.history.clone();
    Ok(Outcome::Finished {
        bundle: spec.out.clone(),
        progress: run.progress,
    })
}

/// The base bundle a run builds on and the network's shapes: what the exported bundle says.
struct Origin {
    base: PathBuf,
    base_manifest: Manifest,
    gpt2_cfg: Gpt2Config,
    mapper_cfg: MapperConfig,
}

/// The tokenized captions a run trains and validates on, with their CLIP embeddings.
struct Corpus {
    data: Dataset,
    train_set: Split,
    val_set: Option<Split>,
    /// The longest training caption: every batch (validation's too) pads to it.
    max_len: usize,
}

/// Everything a run needs before its optimizer: `set_up`'s result.
struct SetUp {
    origin: Origin,
    corpus: Corpus,
    net: CaptionNet,
    /// The parameters to optimize, sorted by name (GPT-2's left out with `only_prefix`).
    trainable: Vec<(String, Tensor)>,
}

/// Checks the spec, then loads the dataset, the base bundle's tokenizer and the network.
fn set_up(spec: &TrainSpec, device: Device) -> Result<SetUp> {
    spec.validate()
        .map_err(|(f, m)| anyhow::anyhow!("{f}: {m}"))?;
    let data = Dataset::open(&spec.data)?;
    let (base, base_manifest, tokenizer, eos_id) = open_base(spec, &data)?;
    let (gpt2_cfg, mapper_cfg) = model_configs(spec, &data, &base_manifest)?;
    let (net, trainable) = build_net(spec, device, &gpt2_cfg, &mapper_cfg, &base, &base_manifest)?;
    let corpus = tokenize_corpus(spec, data, &tokenizer, eos_id)?;
    Ok(SetUp {
        origin: Origin {
            base,
            base_manifest,
            gpt2_cfg,
            mapper_cfg,
        },
        corpus,
        net,
        trainable,
    })
}

/// What in `spec` and the data is likely a mistake, in words that say how to fix it.
fn set_up_warnings(spec: &TrainSpec, corpus: &Corpus) -> Vec<String> {
    let p = &spec.params;
    let per_epoch = corpus.train_set.len().div_ceil(p.batch_size) as i64;
    let total = per_epoch * p.epochs as i64;
    let mut out = vec![];
    if p.warmup >= total {
        out.push(format!(
            "warmup is {} steps but the whole run is {total} ({per_epoch} per epoch × {} epochs): \
             the learning rate never reaches lr={} (it rises linearly over the warmup, then \
             decays linearly to 0 at the last step); pass a --warmup below {total}",
            p.warmup, p.epochs, p.lr
        ));
    }
    if !p.val_split.is_empty() && corpus.val_set.is_none() {
        let mut splits: Vec<&str> = corpus
            .data
            .records
            .iter()
            .map(|r| r.split.as_str())
            .collect();
        splits.sort();
        splits.dedup();
        out.push(format!(
            "no validation: the dataset has no captions in split {:?} (it has {splits:?}); \
             pass --val-split with one of those, or prepare a validation split",
            p.val_split
        ));
    }
    out
}

/// The base bundle (`base`, else `init`, else the one `prepare` used), its manifest, its
/// tokenizer and the tokenizer's `<|endoftext|>` id (required with `eos`).
fn open_base(
    spec: &TrainSpec,
    data: &Dataset,
) -> Result<(PathBuf, Manifest, Tokenizer, Option<i64>)> {
    let base = match (&spec.base, &spec.init) {
        (Some(b), _) => b.clone(),
        (None, Some(i)) => i.clone(),
        (None, None) => PathBuf::from(&data.meta.bundle),
    };
    let base_manifest =
        Manifest::read(&base).with_context(|| format!("base bundle {}", base.display()))?;
    // The trained bundle takes the base's encoder: features from another one would train a
    // bundle that cannot load (another width) or captions nonsense (same width).
    data.check_encoder(
        &spec.data,
        &base,
        base_manifest.mapper.prefix_dim,
        &base.join(&base_manifest.files.encoder),
    )?;
    let tok_path = base.join(&base_manifest.files.tokenizer);
    let tokenizer = Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("loading tokenizer {}: {e}", tok_path.display()))?;
    let eos_id = tokenizer.token_to_id("<|endoftext|>").map(|i| i as i64);
    if spec.params.eos && eos_id.is_none() {
        bail!("the tokenizer has no <|endoftext|> token to append");
    }
    Ok((base, base_manifest, tokenizer, eos_id))
}

/// GPT-2's and the mapper's shapes: `init`'s, else the base's GPT-2 and the spec's mapper.
fn model_configs(
    spec: &TrainSpec,
    data: &Dataset,
    base_manifest: &Manifest,
) -> Result<(Gpt2Config, MapperConfig)> {
    let (gpt2_cfg, mapper_cfg): (Gpt2Config, MapperConfig) = match &spec.init {
        Some(init) => {
            let m = Manifest::read(init)?;
            (m.gpt2, m.mapper)
        }
        None => (
            base_manifest.gpt2.clone(),
            MapperConfig {
                mapping: spec.params.mapping,
                prefix_dim: data.embeddings.size()[1],
                prefix_length: spec.params.prefix_length,
                clip_length: spec.params.clip_length,
                num_layers: spec.params.num_layers,
                normalize_prefix: spec.params.normalize_prefix,
            },
        ),
    };
    if mapper_cfg.prefix_dim != data.embeddings.size()[1] {
        bail!(
            "the dataset's embeddings are {}-d but the mapper expects {}",
            data.embeddings.size()[1],
            mapper_cfg.prefix_dim
        );
    }
    Ok((gpt2_cfg, mapper_cfg))
}

/// The network, seeded with `seed` and loaded from `init` (or GPT-2 from the base and a fresh
/// mapper), with the parameters to train, sorted by name; `only_prefix` freezes GPT-2.
fn build_net(
    spec: &TrainSpec,
    device: Device,
    gpt2_cfg: &Gpt2Config,
    mapper_cfg: &MapperConfig,
    base: &Path,
    base_manifest: &Manifest,
) -> Result<(CaptionNet, Vec<(String, Tensor)>)> {
    tch::manual_seed(spec.params.seed as i64);
    let mut net = CaptionNet::new(gpt2_cfg, mapper_cfg, device)?;
    match &spec.init {
        Some(init) => {
            let m = Manifest::read(init)?;
            net.load_weights(&init.join(&m.files.weights))?;
        }
        None => {
            // GPT-2 from the base bundle, a fresh mapper.
            let file = base.join(&base_manifest.files.weights);
            let mut named = BTreeMap::new();
            for (name, t) in crate::model::weights::read_safetensors(&file)? {
                if let Some(v) = crate::model::weights::gpt2_var_name(&name, "gpt.", "gpt.") {
                    named.insert(v, t);
                }
            }
            crate::model::weights::untie_check(&mut named, "gpt.", &file)?;
            crate::model::weights::copy_into(&net.vs, "gpt.", &named, &file)?;
        }
    }
    let mut trainable: Vec<(String, Tensor)> = net
        .vs
        .variables()
        .into_iter()
        .filter(|(n, _)| !(spec.params.only_prefix && n.starts_with("gpt.")))
        .collect();
    trainable.sort_by(|a, b| a.0.cmp(&b.0));
    if spec.params.only_prefix {
        for (n, t) in net.vs.variables() {
            if n.starts_with("gpt.") {
                let _ = t.shallow_clone().set_requires_grad(false);
            }
        }
    }
    Ok((net, trainable))
}

/// Tokenizes the training splits ("train" and "restval", or without them every split but the
/// validation one) and the validation split, when the dataset has it.
fn tokenize_corpus(
    spec: &TrainSpec,
    data: Dataset,
    tokenizer: &Tokenizer,
    eos_id: Option<i64>,
) -> Result<Corpus> {
    let mut train_splits = vec!["train", "restval"];
    if !data.has_split("train") && !data.has_split("restval") {
        // A dataset without splits trains on everything but the validation split.
        train_splits = vec![];
    }
    let split_names: Vec<String> = if train_splits.is_empty() {
        let mut s: Vec<String> = data.records.iter().map(|r| r.split.clone()).collect();
        s.sort();
        s.dedup();
        s.retain(|x| *x != spec.params.val_split);
        s
    } else {
        train_splits.iter().map(|s| s.to_string()).collect()
    };
    let split_refs: Vec<&str> = split_names.iter().map(|s| s.as_str()).collect();
    let eos = if spec.params.eos { eos_id } else { None };
    let train_set = data.tokenize(tokenizer, &split_refs, eos)?;
    if train_set.is_empty() {
        bail!(
            "no training captions in {} (splits {:?})",
            spec.data.display(),
            split_names
        );
    }
    let val_set = if data.has_split(&spec.params.val_split) {
        Some(data.tokenize(tokenizer, &[spec.params.val_split.as_str()], eos)?)
    } else {
        None
    };
    let max_len = max_seq_len(&train_set.tokens);
    Ok(Corpus {
        data,
        train_set,
        val_set,
        max_len,
    })
}

/// The order of an epoch's samples: it depends only on the seed and the epoch, so a resumed
/// run sees the same batches as an uninterrupted one.
fn epoch_order(seed: u64, epoch: usize, len: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64));
    order.shuffle(&mut rng);
    order
}

/// How `Run::train_epoch` ended.
enum EpochEnd {
    Finished,
    /// `cancel` was set; the checkpoint is saved.
    Cancelled,
}

/// A run in progress: the network, its optimizer, where the run stands and what it reports.
struct Run<'a> {
    spec: &'a TrainSpec,
    device: Device,
    corpus: &'a Corpus,
    net: CaptionNet,
    opt: AdamW,
    /// The checkpoint file.
    ckpt: PathBuf,
    state: CheckpointState,
    progress: Progress,
    batches_per_epoch: usize,
    total_steps: i64,
    /// GPT-2's dropout: 0 with `only_prefix`.
    dropout: f64,
    amp: Option<AmpDtype>,
    fp16: bool,
    started: Instant,
    /// The global step this process started at (for the speed and ETA).
    start_step: i64,
    /// Loss sum and step count since the last point of the loss curve.
    window: (f64, usize),
}

impl<'a> Run<'a> {
    fn new(
        spec: &'a TrainSpec,
        device: Device,
        corpus: &'a Corpus,
        net: CaptionNet,
        opt: AdamW,
        start: checkpoint::Start,
    ) -> Run<'a> {
        let batches_per_epoch = corpus.train_set.len().div_ceil(spec.params.batch_size);
        let total_steps = (batches_per_epoch * spec.params.epochs) as i64;
        let state = start.state;
        // GPT-2 trains in train mode (dropout), as the original's model.train(); with
        // --only-prefix it stays in eval mode (the original's ClipCaptionPrefix.train()).
        let dropout = if spec.params.only_prefix {
            0.0
        } else {
            spec.params.dropout
        };
        let amp = spec.params.amp.dtype();
        let fp16 = amp == Some(AmpDtype::F16);
        // A resumed run reports where it stands before its first step (a run with no steps
        // left never reports otherwise).
        let progress = Progress {
            epochs: spec.params.epochs,
            epoch: state.epoch.min(spec.params.epochs.saturating_sub(1)),
            step: state.global_step,
            loss: state.history.last().map(|h| h.loss).unwrap_or(0.0),
            total_steps,
            history: state.history.clone(),
            val_history: state.val_history.clone(),
            ..Default::default()
        };
        Run {
            spec,
            device,
            corpus,
            net,
            opt,
            ckpt: start.path,
            start_step: state.global_step,
            state,
            progress,
            batches_per_epoch,
            total_steps,
            dropout,
            amp,
            fp16,
            started: Instant::now(),
            window: (0.0f64, 0usize),
        }
    }

    /// Trains the rest of the current epoch (all of it unless resumed mid-epoch), reporting
    /// after every step. `cancel` is checked before each step; a cancelled run checkpoints.
    fn train_epoch(
        &mut self,
        cancel: &AtomicBool,
        report: &mut dyn FnMut(&Progress),
    ) -> Result<EpochEnd> {
        let epoch = self.state.epoch;
        let order = epoch_order(self.spec.params.seed, epoch, self.corpus.train_set.len());
        let batches: Vec<&[usize]> = order.chunks(self.spec.params.batch_size).collect();
        while self.state.batch_in_epoch < batches.len() {
            if cancel.load(Ordering::Relaxed) {
                self.save_checkpoint()?;
                return Ok(EpochEnd::Cancelled);
            }
            let idx = batches[self.state.batch_in_epoch];
            let batch = self.corpus.train_set.batch(
                idx,
                self.corpus.max_len,
                &self.corpus.data.embeddings,
                self.device,
            );
            let lr = self.spec.params.lr
                * lr_factor(
                    self.state.global_step,
                    self.spec.params.warmup,
                    self.total_steps,
                );
            let loss_v = self.step(&batch, lr)?;
            self.record_step(epoch, loss_v, lr, batches.len());
            report(&self.progress);
            if self.checkpoint_due() {
                self.save_checkpoint()?;
            }
        }
        Ok(EpochEnd::Finished)
    }

    /// One optimizer step on `batch` at learning rate `lr`; returns the batch's loss.
    fn step(&mut self, batch: &Batch, lr: f64) -> Result<f64> {
        self.opt.zero_grad();
        // Dropout masks come from torch's generator, seeded per step so that a resumed run
        // draws the same masks as an uninterrupted one.
        if self.dropout > 0.0 {
            tch::manual_seed(
                (self.spec.params.seed.wrapping_mul(1_000_003) as i64)
                    .wrapping_add(self.state.global_step),
            );
        }
        // Autocast covers the forward pass only; backward follows the recorded dtypes.
        let loss = with_autocast(self.device, self.amp, || {
            caption_loss_with_dropout(&self.net, batch, self.dropout)
        });
        let loss_v = if self.fp16 {
            let scale = self.state.scaler.scale;
            (&loss * scale).backward();
            self.opt.scale_grads(1.0 / scale);
            f64::try_from(&loss)?
        } else {
            loss.backward();
            f64::try_from(&loss)?
        };
        if self.grads_ok() {
            if self.spec.params.grad_clip > 0.0 {
                self.opt.clip_grad_norm(self.spec.params.grad_clip);
            }
            self.opt.step(lr);
        }
        Ok(loss_v)
    }

    /// Whether the gradients may be applied: with fp16, not when they overflowed (see
    /// `amp::LossScaler`); always without.
    fn grads_ok(&mut self) -> bool {
        !self.fp16 || self.state.scaler.update(self.opt.grad_norm())
    }

    /// Counts the step just taken: the loss curve gets a point every few steps and at the
    /// epoch's last batch, and the progress its loss, learning rate, speed and ETA.
    fn record_step(&mut self, epoch: usize, loss_v: f64, lr: f64, batches_in_epoch: usize) {
        self.state.global_step += 1;
        self.state.batch_in_epoch += 1;
        self.window.0 += loss_v;
        self.window.1 += 1;
        let log_every = (self.batches_per_epoch / 20).clamp(1, 50);
        if self.window.1 >= log_every || self.state.batch_in_epoch == batches_in_epoch {
            self.state.history.push(LossPoint {
                step: self.state.global_step,
                epoch,
                loss: self.window.0 / self.window.1 as f64,
            });
            self.window = (0.0, 0);
        }
        let done = (self.state.global_step - self.start_step) as f64;
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let progress = &mut self.progress;
        progress.epoch = epoch;
        progress.step = self.state.global_step;
        progress.loss = loss_v;
        progress.lr = lr;
        progress.samples_per_s = done * self.spec.params.batch_size as f64 / secs;
        progress.eta_s = (self.total_steps - self.state.global_step) as f64 * secs / done.max(1.0);
        progress.history = self.state.history.clone();
    }

    /// A checkpoint between epoch ends: every `save_every` steps (never when 0).
    fn checkpoint_due(&self) -> bool {
        self.spec.params.save_every > 0
            && self.state.global_step % self.spec.params.save_every as i64 == 0
    }

    /// At an epoch's end, the validation loss (when the dataset has the validation split).
    fn validation(&mut self) -> Result<()> {
        if let Some(val) = &self.corpus.val_set {
            let epoch = self.state.epoch;
            let v = evaluate_loss(
                &self.net,
                val,
                self.corpus.max_len,
                &self.corpus.data.embeddings,
                self.device,
                self.spec.params.batch_size,
            )?;
            self.state.val_history.push(LossPoint {
                step: self.state.global_step,
                epoch,
                loss: v,
            });
            self.progress.val_history = self.state.val_history.clone();
            tracing::info!(epoch, val_loss = v, "validation");
        }
        Ok(())
    }

    /// Moves on to the next epoch, checkpoints and reports.
    fn end_epoch(&mut self, report: &mut dyn FnMut(&Progress)) -> Result<()> {
        self.state.epoch += 1;
        self.state.batch_in_epoch = 0;
        self.save_checkpoint()?;
        report(&self.progress);
        Ok(())
    }

    fn save_checkpoint(&self) -> Result<()> {
        checkpoint::save(&self.ckpt, &self.net, &self.opt, &self.state)
    }
}

/// Mean token cross-entropy over caption positions (prefix and padding excluded).
pub fn caption_loss(net: &CaptionNet, batch: &Batch) -> Tensor {
    caption_loss_with_dropout(net, batch, 0.0)
}

/// `caption_loss` with GPT-2's dropout `p` active (training mode).
pub fn caption_loss_with_dropout(net: &CaptionNet, batch: &Batch, p: f64) -> Tensor {
    let prefix = net.prefix(&batch.clip);
    let l = prefix.size()[1];
    let t = batch.tokens.size()[1];
    let emb = net.gpt.embed(&batch.tokens);
    let x = Tensor::cat(&[&prefix, &emb.to_kind(prefix.kind())], 1);
    let h = net.gpt.forward_full_with_dropout(&x, None, p);
    // Position L-1+i predicts token i.
    let logits = net.gpt.logits(&h.narrow(1, l - 1, t)).to_kind(Kind::Float);
    let v = logits.size()[2];
    let nll = logits
        .view([-1, v])
        .log_softmax(-1, Kind::Float)
        .gather(1, &batch.tokens.view([-1, 1]), false)
        .view([-1])
        .neg();
    let mask = batch.mask.view([-1]);
    (nll * &mask).sum(Kind::Float) / mask.sum(Kind::Float).clamp_min(1.0)
}

fn evaluate_loss(
    net: &CaptionNet,
    split: &Split,
    max_len: usize,
    embeddings: &Tensor,
    device: Device,
    batch_size: usize,
) -> Result<f64> {
    let _g = tch::no_grad_guard();
    let (mut sum, mut tokens) = (0.0, 0.0);
    let idx: Vec<usize> = (0..split.len()).collect();
    for chunk in idx.chunks(batch_size) {
        let b = split.batch(chunk, max_len, embeddings, device);
        let n = f64::try_from(b.mask.sum(Kind::Float))?;
        sum += f64::try_from(caption_loss(net, &b))? * n;
        tokens += n;
    }
    Ok(sum / tokens.max(1.0))
}
