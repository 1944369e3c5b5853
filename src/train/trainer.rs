//! The training loop: ClipCap's objective (caption tokens after a mapped CLIP prefix),
//! AdamW with linear warmup and decay, atomic checkpoints that resume exactly, and a bundle
//! written at the end.
use crate::model::bundle::{self, BundleFiles, CaptionNet, ImageSpec, Manifest};
use crate::model::gpt2::Gpt2Config;
use crate::model::mapper::{MapperConfig, MappingType};
use crate::train::amp::{with_autocast, AmpDtype};
use crate::train::data::{max_seq_len, Batch, Dataset, Split};
use crate::train::optim::{lr_factor, AdamW, AdamWConfig};
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

/// Everything that defines a training run (CLI flags or a POST /train body).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSpec {
    pub data: PathBuf,
    pub out: PathBuf,
    /// Bundle providing the encoder, tokenizer and GPT-2 (default: the one `prepare` used).
    pub base: Option<PathBuf>,
    /// Start from this bundle's mapper and GPT-2 weights (and its mapper shape).
    pub init: Option<PathBuf>,
    pub mapping: MappingType,
    pub only_prefix: bool,
    pub prefix_length: i64,
    pub clip_length: i64,
    pub num_layers: i64,
    pub normalize_prefix: bool,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup: i64,
    pub seed: u64,
    pub val_split: String,
    /// Clip the global gradient norm to this (0 = off).
    pub grad_clip: f64,
    /// Also checkpoint every this many steps (0 = at epoch ends only).
    pub save_every: usize,
    /// Append `<|endoftext|>` to captions so the model learns to stop (the original does not).
    pub eos: bool,
    /// GPT-2's dropout while training (the original: 0.1 from GPT-2's config; not applied with
    /// `only_prefix`, where GPT-2 stays in eval mode).
    pub dropout: f64,
    /// Mixed precision: "none", "bf16" (autocast) or "fp16" (autocast + loss scaling). Meant for
    /// CUDA; honoured on the CPU too (bf16 there is only fast with AVX512-BF16/AMX).
    pub amp: String,
    /// Bundle name written into the manifest (default: the output folder's name).
    pub name: Option<String>,
}

impl Default for TrainSpec {
    fn default() -> Self {
        TrainSpec {
            data: PathBuf::new(),
            out: PathBuf::new(),
            base: None,
            init: None,
            mapping: MappingType::Mlp,
            only_prefix: false,
            prefix_length: 10,
            clip_length: 10,
            num_layers: 8,
            normalize_prefix: false,
            epochs: 10,
            batch_size: 40,
            lr: 2e-5,
            warmup: 5000,
            seed: 0,
            val_split: "val".into(),
            grad_clip: 0.0,
            save_every: 0,
            eos: true,
            dropout: 0.1,
            amp: "none".into(),
            name: None,
        }
    }
}

impl TrainSpec {
    /// Checks the hyper-parameters; errors name the field.
    pub fn validate(&self) -> std::result::Result<(), (String, String)> {
        let e = |f: &str, m: &str| Err((f.to_string(), m.to_string()));
        if self.epochs == 0 || self.epochs > 10_000 {
            return e("epochs", "must be between 1 and 10000");
        }
        if self.batch_size == 0 || self.batch_size > 4096 {
            return e("batch_size", "must be between 1 and 4096");
        }
        if !(self.lr > 0.0 && self.lr < 1.0) {
            return e("lr", "must be > 0 and < 1");
        }
        if self.warmup < 0 {
            return e("warmup", "must be >= 0");
        }
        if !(1..=256).contains(&self.prefix_length) {
            return e("prefix_length", "must be between 1 and 256");
        }
        if !(1..=256).contains(&self.clip_length) {
            return e("clip_length", "must be between 1 and 256");
        }
        if !(1..=48).contains(&self.num_layers) {
            return e("num_layers", "must be between 1 and 48");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return e("dropout", "must be >= 0 and < 1");
        }
        if self.grad_clip.is_nan() || self.grad_clip < 0.0 {
            return e("grad_clip", "must be >= 0");
        }
        if !matches!(self.amp.as_str(), "none" | "bf16" | "fp16") {
            return e("amp", "must be none, bf16 or fp16");
        }
        Ok(())
    }
}

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
}

/// Saved with every checkpoint: where to continue.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct CheckpointState {
    spec: TrainSpec,
    /// Epoch in progress (0-based) and batches of it already done.
    epoch: usize,
    batch_in_epoch: usize,
    global_step: i64,
    history: Vec<LossPoint>,
    val_history: Vec<LossPoint>,
}

pub enum Outcome {
    Finished { bundle: PathBuf, progress: Progress },
    Cancelled { progress: Progress },
}

pub const CHECKPOINT: &str = "checkpoint.safetensors";

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
    spec.validate()
        .map_err(|(f, m)| anyhow::anyhow!("{f}: {m}"))?;
    let data = Dataset::open(&spec.data)?;
    let base = match (&spec.base, &spec.init) {
        (Some(b), _) => b.clone(),
        (None, Some(i)) => i.clone(),
        (None, None) => PathBuf::from(&data.meta.bundle),
    };
    let base_manifest =
        Manifest::read(&base).with_context(|| format!("base bundle {}", base.display()))?;
    let tok_path = base.join(&base_manifest.files.tokenizer);
    let tokenizer = Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("loading tokenizer {}: {e}", tok_path.display()))?;
    let eos_id = tokenizer.token_to_id("<|endoftext|>").map(|i| i as i64);
    if spec.eos && eos_id.is_none() {
        bail!("the tokenizer has no <|endoftext|> token to append");
    }
    let (gpt2_cfg, mapper_cfg): (Gpt2Config, MapperConfig) = match &spec.init {
        Some(init) => {
            let m = Manifest::read(init)?;
            (m.gpt2, m.mapper)
        }
        None => (
            base_manifest.gpt2.clone(),
            MapperConfig {
                mapping: spec.mapping,
                prefix_dim: data.embeddings.size()[1],
                prefix_length: spec.prefix_length,
                clip_length: spec.clip_length,
                num_layers: spec.num_layers,
                normalize_prefix: spec.normalize_prefix,
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

    tch::manual_seed(spec.seed as i64);
    let mut net = CaptionNet::new(&gpt2_cfg, &mapper_cfg, device)?;
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
        .filter(|(n, _)| !(spec.only_prefix && n.starts_with("gpt.")))
        .collect();
    trainable.sort_by(|a, b| a.0.cmp(&b.0));
    if spec.only_prefix {
        for (n, t) in net.vs.variables() {
            if n.starts_with("gpt.") {
                let _ = t.shallow_clone().set_requires_grad(false);
            }
        }
    }

    let mut train_splits = vec!["train", "restval"];
    if !data.has_split("train") && !data.has_split("restval") {
        // A dataset without splits trains on everything but the validation split.
        train_splits = vec![];
    }
    let split_names: Vec<String> = if train_splits.is_empty() {
        let mut s: Vec<String> = data.records.iter().map(|r| r.split.clone()).collect();
        s.sort();
        s.dedup();
        s.retain(|x| *x != spec.val_split);
        s
    } else {
        train_splits.iter().map(|s| s.to_string()).collect()
    };
    let split_refs: Vec<&str> = split_names.iter().map(|s| s.as_str()).collect();
    let eos = if spec.eos { eos_id } else { None };
    let train_set = data.tokenize(&tokenizer, &split_refs, eos)?;
    if train_set.is_empty() {
        bail!(
            "no training captions in {} (splits {:?})",
            spec.data.display(),
            split_names
        );
    }
    let val_set = if data.has_split(&spec.val_split) {
        Some(data.tokenize(&tokenizer, &[spec.val_split.as_str()], eos)?)
    } else {
        None
    };
    let max_len = max_seq_len(&train_set.tokens);
    let batches_per_epoch = train_set.len().div_ceil(spec.batch_size);
    let total_steps = (batches_per_epoch * spec.epochs) as i64;

    let mut opt = AdamW::new(
        AdamWConfig {
            lr: spec.lr,
            ..Default::default()
        },
        std::mem::take(&mut trainable),
    );
    let mut state = CheckpointState {
        spec: spec.clone(),
        epoch: 0,
        batch_in_epoch: 0,
        global_step: 0,
        history: vec![],
        val_history: vec![],
    };
    std::fs::create_dir_all(ckpt_dir)?;
    let ckpt = ckpt_dir.join(CHECKPOINT);
    if resume && ckpt.exists() {
        state = load_checkpoint(&ckpt, &mut net, &mut opt)?;
        if state.spec != *spec {
            bail!(
                "the checkpoint in {} was made with a different spec",
                ckpt_dir.display()
            );
        }
        tracing::info!(
            epoch = state.epoch,
            step = state.global_step,
            "resumed from checkpoint"
        );
    }

    // GPT-2 trains in train mode (dropout), as the original's model.train(); with
    // --only-prefix it stays in eval mode (the original's ClipCaptionPrefix.train()).
    let dropout = if spec.only_prefix { 0.0 } else { spec.dropout };
    let amp = AmpDtype::parse(&spec.amp);
    let fp16 = amp == Some(AmpDtype::F16);
    let mut loss_scale = 65536.0f64;
    let started = Instant::now();
    let start_step = state.global_step;
    let mut progress = Progress {
        epochs: spec.epochs,
        total_steps,
        history: state.history.clone(),
        val_history: state.val_history.clone(),
        ..Default::default()
    };
    let mut window = (0.0f64, 0usize);
    while state.epoch < spec.epochs {
        let epoch = state.epoch;
        // The order of an epoch depends only on the seed and the epoch: resumable exactly.
        let mut order: Vec<usize> = (0..train_set.len()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            spec.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64),
        );
        order.shuffle(&mut rng);
        let batches: Vec<&[usize]> = order.chunks(spec.batch_size).collect();
        while state.batch_in_epoch < batches.len() {
            if cancel.load(Ordering::Relaxed) {
                save_checkpoint(&ckpt, &net, &opt, &state)?;
                progress.history = state.history.clone();
                return Ok(Outcome::Cancelled { progress });
            }
            let idx = batches[state.batch_in_epoch];
            let batch = train_set.batch(idx, max_len, &data.embeddings, device);
            let lr = spec.lr * lr_factor(state.global_step, spec.warmup, total_steps);
            opt.zero_grad();
            // Dropout masks come from torch's generator, seeded per step so that a resumed run
            // draws the same masks as an uninterrupted one.
            if dropout > 0.0 {
                tch::manual_seed(
                    (spec.seed.wrapping_mul(1_000_003) as i64).wrapping_add(state.global_step),
                );
            }
            // Autocast covers the forward pass only; backward follows the recorded dtypes.
            let loss = with_autocast(device, amp, || {
                caption_loss_with_dropout(&net, &batch, dropout)
            });
            let loss_v = if fp16 {
                (&loss * loss_scale).backward();
                opt.scale_grads(1.0 / loss_scale);
                f64::try_from(&loss)?
            } else {
                loss.backward();
                f64::try_from(&loss)?
            };
            let grads_ok = if fp16 {
                let n = opt.grad_norm();
                if !n.is_finite() {
                    loss_scale /= 2.0;
                    false
                } else {
                    if state.global_step % 2000 == 1999 {
                        loss_scale *= 2.0;
                    }
                    true
                }
            } else {
                true
            };
            if grads_ok {
                if spec.grad_clip > 0.0 {
                    opt.clip_grad_norm(spec.grad_clip);
                }
                opt.step(lr);
            }
            state.global_step += 1;
            state.batch_in_epoch += 1;
            window.0 += loss_v;
            window.1 += 1;
            let log_every = (batches_per_epoch / 20).clamp(1, 50);
            if window.1 >= log_every || state.batch_in_epoch == batches.len() {
                state.history.push(LossPoint {
                    step: state.global_step,
                    epoch,
                    loss: window.0 / window.1 as f64,
                });
                window = (0.0, 0);
            }
            let done = (state.global_step - start_step) as f64;
            let secs = started.elapsed().as_secs_f64().max(1e-9);
            progress.epoch = epoch;
            progress.step = state.global_step;
            progress.loss = loss_v;
            progress.lr = lr;
            progress.samples_per_s = done * spec.batch_size as f64 / secs;
            progress.eta_s = (total_steps - state.global_step) as f64 * secs / done.max(1.0);
            progress.history = state.history.clone();
            report(&progress);
            if spec.save_every > 0 && state.global_step % spec.save_every as i64 == 0 {
                save_checkpoint(&ckpt, &net, &opt, &state)?;
            }
        }
        if let Some(val) = &val_set {
            let v = evaluate_loss(
                &net,
                val,
                max_len,
                &data.embeddings,
                device,
                spec.batch_size,
            )?;
            state.val_history.push(LossPoint {
                step: state.global_step,
                epoch,
                loss: v,
            });
            progress.val_history = state.val_history.clone();
            tracing::info!(epoch, val_loss = v, "validation");
        }
        state.epoch += 1;
        state.batch_in_epoch = 0;
        save_checkpoint(&ckpt, &net, &opt, &state)?;
        report(&progress);
    }
    let name = spec
        .name
        .clone()
        .or_else(|| {
            spec.out
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "trained".into());
    let mut provenance = BTreeMap::new();
    provenance.insert(
        "trained_by".into(),
        serde_json::json!(format!("clipcap {}", env!("CARGO_PKG_VERSION"))),
    );
    provenance.insert("dataset".into(), serde_json::json!(spec.data));
    provenance.insert("base".into(), serde_json::json!(base));
    provenance.insert("spec".into(), serde_json::to_value(spec)?);
    provenance.insert(
        "final_loss".into(),
        serde_json::json!(state.history.last().map(|p| p.loss)),
    );
    provenance.insert(
        "val_loss".into(),
        serde_json::json!(state.val_history.last().map(|p| p.loss)),
    );
    let manifest = Manifest {
        format: bundle::FORMAT.into(),
        version: bundle::FORMAT_VERSION,
        name,
        mapper: mapper_cfg,
        gpt2: gpt2_cfg,
        image: ImageSpec {
            ..base_manifest.image.clone()
        },
        files: BundleFiles::default(),
        stop_tokens: if spec.eos {
            vec!["<|endoftext|>".into()]
        } else {
            base_manifest.stop_tokens.clone()
        },
        generation: base_manifest.generation.clone(),
        provenance,
    };
    write_bundle(&spec.out, &manifest, &net, &base, &base_manifest)?;
    progress.history = state.history.clone();
    Ok(Outcome::Finished {
        bundle: spec.out.clone(),
        progress,
    })
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

fn save_checkpoint(
    path: &Path,
    net: &CaptionNet,
    opt: &AdamW,
    state: &CheckpointState,
) -> Result<()> {
    let mut named: Vec<(String, Tensor)> = net
        .vs
        .variables()
        .into_iter()
        .map(|(n, t)| (format!("net.{n}"), t.to_device(Device::Cpu)))
        .collect();
    named.extend(
        opt.state_tensors()
            .into_iter()
            .map(|(n, t)| (n, t.to_device(Device::Cpu))),
    );
    let json = serde_json::to_vec(state)?;
    named.push(("state_json".into(), Tensor::from_slice(&json)));
    let tmp = crate::fsutil::temp_path(path);
    Tensor::write_safetensors(&named, &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    crate::fsutil::rename_durable(&tmp, path)
}

fn load_checkpoint(path: &Path, net: &mut CaptionNet, opt: &mut AdamW) -> Result<CheckpointState> {
    let tensors = crate::model::weights::read_safetensors(path)?;
    let json: Vec<u8> = Vec::try_from(
        tensors
            .get("state_json")
            .with_context(|| format!("{}: no state", path.display()))?,
    )?;
    let state: CheckpointState = serde_json::from_slice(&json)?;
    let named: BTreeMap<String, Tensor> = tensors
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("net.")
                .map(|n| (n.to_string(), v.shallow_clone()))
        })
        .collect();
    crate::model::weights::copy_into(&net.vs, "", &named, path)?;
    opt.load_state(&tensors, state.global_step)?;
    Ok(state)
}

/// Writes the bundle into a temporary folder beside `out`, then renames it into place.
fn write_bundle(
    out: &Path,
    manifest: &Manifest,
    net: &CaptionNet,
    base: &Path,
    base_manifest: &Manifest,
) -> Result<()> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let tmp = crate::fsutil::temp_path(out);
    std::fs::create_dir_all(&tmp)?;
    let files = &manifest.files;
    std::fs::copy(
        base.join(&base_manifest.files.encoder),
        tmp.join(&files.encoder),
    )
    .context("copying the encoder")?;
    std::fs::copy(
        base.join(&base_manifest.files.tokenizer),
        tmp.join(&files.tokenizer),
    )
    .context("copying the tokenizer")?;
    net.save_weights(&tmp.join(&files.weights))?;
    manifest.write(&tmp)?;
    if out.exists() {
        let old = crate::fsutil::temp_path(out);
        std::fs::rename(out, &old)?;
        std::fs::rename(&tmp, out)?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, out)?;
    }
    Ok(())
}
