//! Caption decoding: beam search, greedy and sampling over a shared, growing batch.
//!
//! A [`Decoder`] holds every image being captioned by one model. Images that arrive together
//! with the same options form a *cohort* (`k` rows each: beams, or samples). Each
//! [`Decoder::step`] runs **one** GPT-2 step for all rows of all cohorts with the KV cache,
//! then each cohort picks its next tokens with a few batched tensor ops on the device. The
//! only host transfer per step is one read of a few integers: a flag per image (is it
//! finished?) and, for beam search, the source row of each beam (so the KV cache copies only
//! the rows whose history changed). New cohorts can
//! join between steps ([`Decoder::add`]), which is what continuous batching needs.
//!
//! Beam search reproduces ClipCap's `generate_beam` (log of softmax, stopped beams extended
//! with token 0 at no cost, scores averaged by length when ranking) and greedy its
//! `generate2` (arg-max until a stop token), token for token.
use crate::model::bundle::Bundle;
use crate::model::gpt2::KvCache;
use anyhow::{bail, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    Beam,
    Greedy,
    Sample,
}

impl std::str::FromStr for Strategy {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "beam" => Ok(Strategy::Beam),
            "greedy" => Ok(Strategy::Greedy),
            "sample" => Ok(Strategy::Sample),
            _ => bail!("strategy must be beam, greedy or sample"),
        }
    }
}

/// How to decode one image. Also the bundle's generation defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenOptions {
    pub strategy: Strategy,
    /// Beams kept per image (beam search).
    pub beam_size: i64,
    /// Most tokens generated per caption (ClipCap's `entry_length`, 67).
    pub max_tokens: i64,
    /// Captions returned per image: best beams, or independent samples.
    pub n_best: i64,
    /// Logits are divided by this (ClipCap divides when > 0).
    pub temperature: f64,
    /// Sampling: keep the k most likely tokens (0 = all).
    pub top_k: i64,
    /// Sampling: keep the smallest set whose probability reaches p (1 = all).
    pub top_p: f64,
    /// Sampling seed; the same seed gives the same captions, alone or in a batch.
    pub seed: Option<u64>,
    /// CTRL-style penalty (> 1 discourages tokens already generated; 1 = off).
    pub repetition_penalty: f64,
    /// Forbid repeating any n-gram of this size (0 = off).
    pub no_repeat_ngram: i64,
}

pub type GenerationDefaults = GenOptions;

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            strategy: Strategy::Beam,
            beam_size: 5,
            max_tokens: 67,
            n_best: 1,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            repetition_penalty: 1.0,
            no_repeat_ngram: 0,
        }
    }
}

/// Limits on options a client may ask for.
pub const MAX_BEAM: i64 = 16;
pub const MAX_TOKENS: i64 = 256;
pub const MAX_SAMPLES: i64 = 16;

/// A rejected option: which field, and what is allowed.
#[derive(Debug, Clone, PartialEq)]
pub struct OptionError {
    pub field: &'static str,
    pub message: String,
}

impl std::fmt::Display for OptionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl GenOptions {
    /// Checks every field against its allowed range.
    pub fn validate(&self) -> std::result::Result<(), OptionError> {
        let err = |field, message: String| Err(OptionError { field, message });
        if !(1..=MAX_BEAM).contains(&self.beam_size) {
            return err("beam_size", format!("must be between 1 and {MAX_BEAM}"));
        }
        if !(1..=MAX_TOKENS).contains(&self.max_tokens) {
            return err("max_tokens", format!("must be between 1 and {MAX_TOKENS}"));
        }
        let max_n = match self.strategy {
            Strategy::Beam => self.beam_size,
            Strategy::Greedy => 1,
            Strategy::Sample => MAX_SAMPLES,
        };
        if !(1..=max_n).contains(&self.n_best) {
            let why = match self.strategy {
                Strategy::Beam => format!("must be between 1 and beam_size ({max_n})"),
                Strategy::Greedy => "must be 1 for greedy decoding".into(),
                Strategy::Sample => format!("must be between 1 and {max_n}"),
            };
            return err("n", why);
        }
        if !(self.temperature > 0.0 && self.temperature <= 100.0) {
            return err("temperature", "must be > 0 and <= 100".into());
        }
        if !(0..=100_000).contains(&self.top_k) {
            return err("top_k", "must be between 0 (off) and 100000".into());
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return err("top_p", "must be > 0 and <= 1".into());
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 10.0) {
            return err("repetition_penalty", "must be > 0 and <= 10".into());
        }
        if !(0..=8).contains(&self.no_repeat_ngram) {
            return err("no_repeat_ngram", "must be between 0 (off) and 8".into());
        }
        Ok(())
    }

    /// Rows decoded per image.
    fn rows_per_image(&self) -> i64 {
        match self.strategy {
            Strategy::Beam => self.beam_size,
            Strategy::Greedy => 1,
            Strategy::Sample => self.n_best,
        }
    }
}

/// One caption and its score (mean log-probability per generated token).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Caption {
    pub text: String,
    pub score: f64,
    pub tokens: Vec<i64>,
}

/// An image whose captions are final.
#[derive(Debug)]
pub struct Finished {
    pub id: u64,
    pub captions: Vec<Caption>,
    /// Decoding steps the image took part in.
    pub steps: i64,
}

/// Images that joined together with the same options; `n` images × `k` rows.
struct Cohort {
    opts: GenOptions,
    ids: Vec<u64>,
    k: i64,
    steps: i64,
    /// Last token of each row `[n·k]`, fed at the next step.
    last: Tensor,
    /// Generated tokens `[n, k, steps]`.
    tokens: Tensor,
    /// Beam: running log-prob sums as the original keeps them; others: sums of log-probs.
    scores: Tensor,
    /// Tokens counted per row `[n, k]` (f32, as the original).
    lengths: Tensor,
    stopped: Tensor,
    /// Sampling: one generator per image, so a seed gives the same result in any batch.
    rngs: Vec<StdRng>,
    cancelled: Vec<bool>,
}

impl Cohort {
    fn n(&self) -> i64 {
        self.ids.len() as i64
    }
    fn rows(&self) -> i64 {
        self.n() * self.k
    }
}

/// Decodes many images at once on one model. See the module docs.
pub struct Decoder {
    model: Arc<Bundle>,
    cache: Option<KvCache>,
    cohorts: Vec<Cohort>,
    stop: Tensor,
}

impl Decoder {
    pub fn new(model: Arc<Bundle>) -> Self {
        let stop = Tensor::from_slice(&model.stop_ids).to_device(model.device);
        Decoder {
            model,
            cache: None,
            cohorts: vec![],
            stop,
        }
    }

    pub fn model(&self) -> &Arc<Bundle> {
        &self.model
    }

    /// Images still being decoded.
    pub fn images(&self) -> usize {
        self.cohorts.iter().map(|c| c.ids.len()).sum()
    }

    /// Rows (images × beams) in the running batch.
    pub fn rows(&self) -> i64 {
        self.cohorts.iter().map(|c| c.rows()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.cohorts.is_empty()
    }

    /// Drops an image at the next step boundary without producing captions.
    pub fn cancel(&mut self, id: u64) {
        for c in &mut self.cohorts {
            if let Some(i) = c.ids.iter().position(|&x| x == id) {
                c.cancelled[i] = true;
            }
        }
    }

    /// Adds images given their CLIP embeddings `[n, D]`: maps them to prefixes, runs the prefix
    /// through GPT-2 and takes the first token. Returns images already finished.
    pub fn add(
        &mut self,
        clip: &Tensor,
        opts: &GenOptions,
        ids: Vec<u64>,
    ) -> Result<Vec<Finished>> {
        opts.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        let n = ids.len() as i64;
        if clip.size()[0] != n {
            bail!("{} embeddings for {n} ids", clip.size()[0]);
        }
        if n == 0 {
            return Ok(vec![]);
        }
        let _g = tch::no_grad_guard();
        let net = &self.model.net;
        let prefix = net.prefix(clip);
        let plen = prefix.size()[1];
        let mut cache = net.gpt.new_cache(n, plen + opts.max_tokens + 1);
        let h = net.gpt.forward(&prefix, None, &mut cache);
        let logits = net.gpt.logits(&h.select(1, plen - 1)).to_kind(Kind::Float);
        let device = logits.device();
        let k = opts.rows_per_image();
        let expand =
            Tensor::arange(n, (Kind::Int64, device)).repeat_interleave_self_int(k, 0, None);
        cache.select_rows(&expand);
        let rngs = (0..n)
            .map(|_| match opts.seed {
                Some(s) => StdRng::seed_from_u64(s),
                None => StdRng::from_os_rng(),
            })
            .collect();
        let mut cohort = Cohort {
            opts: opts.clone(),
            ids,
            k,
            steps: 0,
            last: Tensor::zeros([n * k], (Kind::Int64, device)),
            tokens: Tensor::zeros([n, k, 0], (Kind::Int64, device)),
            scores: Tensor::zeros([n, k], (Kind::Float, device)),
            lengths: Tensor::zeros([n, k], (Kind::Float, device)),
            stopped: Tensor::zeros([n, k], (Kind::Bool, device)),
            rngs,
            cancelled: vec![false; n as usize],
        };
        match opts.strategy {
            Strategy::Beam => first_beam_step(&mut cohort, &logits, &self.stop),
            _ => {
                let logits = logits.index_select(0, &expand);
                pick_step(&mut cohort, &logits, &self.stop);
            }
        }
        match &mut self.cache {
            None => self.cache = Some(cache),
            Some(c) => c.append_rows(cache),
        }
        self.cohorts.push(cohort);
        self.sweep(None)
    }

    /// One GPT-2 step for every row; returns the images that finished.
    pub fn step(&mut self) -> Result<Vec<Finished>> {
        if self.cohorts.is_empty() {
            return Ok(vec![]);
        }
        let _g = tch::no_grad_guard();
        let gpt = &self.model.net.gpt;
        let last = Tensor::cat(&self.cohorts.iter().map(|c| &c.last).collect::<Vec<_>>(), 0);
        let x = gpt.embed(&last.unsqueeze(1));
        let cache = self.cache.as_mut().expect("rows without a cache");
        let h = gpt.forward(&x, None, cache);
        let logits = gpt.logits(&h.squeeze_dim(1)).to_kind(Kind::Float);
        // A row gather is only needed when some cohort runs beam search; greedy and sampling
        // rows stay in place, so no index tensors are built for them otherwise.
        let reorder = self
            .cohorts
            .iter()
            .any(|c| c.opts.strategy == Strategy::Beam);
        let mut order = Vec::with_capacity(self.cohorts.len());
        let mut off = 0;
        for c in &mut self.cohorts {
            let rows = c.rows();
            let l = logits.narrow(0, off, rows);
            match c.opts.strategy {
                Strategy::Beam => order.push(beam_step(c, &l, &self.stop) + off),
                _ => {
                    pick_step(c, &l, &self.stop);
                    if reorder {
                        order.push(Tensor::arange_start(
                            off,
                            off + rows,
                            (Kind::Int64, l.device()),
                        ));
                    }
                }
            }
            off += rows;
        }
        let order = reorder.then(|| Tensor::cat(&order, 0));
        self.sweep(order)
    }

    /// Finishes images whose rows all stopped (or hit max_tokens), drops cancelled ones, and
    /// applies `reorder` (a beam gather over all rows) together with the removals in one
    /// cache gather.
    fn sweep(&mut self, reorder: Option<Tensor>) -> Result<Vec<Finished>> {
        let flags: Vec<Tensor> = self
            .cohorts
            .iter()
            .map(|c| {
                let done = c.stopped.all_dim(1, false);
                if c.steps >= c.opts.max_tokens {
                    done.ones_like()
                } else {
                    done
                }
            })
            .collect();
        // The one host read per step: a flag per image, and the beam reorder (so the cache
        // copies only the rows whose history changed).
        let flags = Tensor::cat(&flags, 0).to_kind(Kind::Int64);
        let n_flags = flags.size()[0] as usize;
        let host: Vec<i64> = match &reorder {
            Some(r) => Vec::try_from(Tensor::cat(&[&flags, r], 0).to_device(Device::Cpu))?,
            None => Vec::try_from(flags.to_device(Device::Cpu))?,
        };
        let (flags, reorder) = host.split_at(n_flags);
        let flags: Vec<bool> = flags.iter().map(|&f| f != 0).collect();
        let reorder = (!reorder.is_empty()).then_some(reorder);
        let mut finished = vec![];
        let mut keep_rows: Vec<i64> = vec![];
        let mut removed_any = false;
        let mut base = 0usize;
        let mut row_off = 0i64;
        let model = self.model.clone();
        for c in &mut self.cohorts {
            let n = c.ids.len();
            let done = &flags[base..base + n];
            base += n;
            let drop: Vec<bool> = (0..n).map(|i| done[i] || c.cancelled[i]).collect();
            if !drop.iter().any(|&d| d) {
                keep_rows.extend(row_off..row_off + c.rows());
                row_off += c.rows();
                continue;
            }
            removed_any = true;
            let gone: Vec<i64> = (0..n as i64)
                .filter(|&i| done[i as usize] && !c.cancelled[i as usize])
                .collect();
            if !gone.is_empty() {
                finished.extend(finish(&model, c, &gone)?);
            }
            let kept: Vec<i64> = (0..n as i64).filter(|&i| !drop[i as usize]).collect();
            for &i in &kept {
                keep_rows.extend(row_off + i * c.k..row_off + (i + 1) * c.k);
            }
            row_off += c.rows();
            retain_images(c, &kept);
        }
        self.cohorts.retain(|c| !c.ids.is_empty());
        if self.cohorts.is_empty() {
            self.cache = None;
            return Ok(finished);
        }
        let index: Option<Vec<i64>> = match (reorder, removed_any) {
            (None, false) => None,
            (Some(r), false) => Some(r.to_vec()),
            (Some(r), true) => Some(keep_rows.iter().map(|&j| r[j as usize]).collect()),
            (None, true) => Some(keep_rows),
        };
        if let (Some(idx), Some(cache)) = (index, self.cache.as_mut()) {
            cache.select_rows_from(&idx);
        }
        Ok(finished)
    }
}

/// Keeps images `kept` (indices into the cohort) in all per-image state.
fn retain_images(c: &mut Cohort, kept: &[i64]) {
    let device = c.scores.device();
    let idx = Tensor::from_slice(kept).to_device(device);
    let rows = (idx.unsqueeze(1) * c.k + Tensor::arange(c.k, (Kind::Int64, device)).unsqueeze(0))
        .view([-1]);
    c.last = c.last.index_select(0, &rows);
    c.tokens = c.tokens.index_select(0, &idx);
    c.scores = c.scores.index_select(0, &idx);
    c.lengths = c.lengths.index_select(0, &idx);
    c.stopped = c.stopped.index_select(0, &idx);
    c.cancelled = kept.iter().map(|&i| c.cancelled[i as usize]).collect();
    c.ids = kept.iter().map(|&i| c.ids[i as usize]).collect();
    c.rngs = kept.iter().map(|&i| c.rngs[i as usize].clone()).collect();
}

/// Reads the captions of images `gone` back to the host and ranks them.
fn finish(model: &Bundle, c: &Cohort, gone: &[i64]) -> Result<Vec<Finished>> {
    let idx = Tensor::from_slice(gone).to_device(c.scores.device());
    let tokens = c.tokens.index_select(0, &idx).to_device(Device::Cpu);
    let lengths = c.lengths.index_select(0, &idx).to_device(Device::Cpu);
    let final_scores = (c.scores.index_select(0, &idx)
        / c.lengths.index_select(0, &idx).clamp_min(1.0))
    .to_device(Device::Cpu);
    let mut out = vec![];
    for (j, &img) in gone.iter().enumerate() {
        let j = j as i64;
        let scores: Vec<f32> = Vec::try_from(final_scores.get(j))?;
        let lens: Vec<f32> = Vec::try_from(lengths.get(j))?;
        let toks = tokens.get(j);
        let mut caps: Vec<Caption> = (0..c.k)
            .map(|r| {
                let len = lens[r as usize] as i64;
                let ids: Vec<i64> =
                    Vec::try_from(toks.get(r).narrow(0, 0, len)).unwrap_or_default();
                Caption {
                    text: model.decode(&ids).trim().to_string(),
                    score: scores[r as usize] as f64,
                    tokens: ids,
                }
            })
            .collect();
        if c.opts.strategy == Strategy::Beam {
            // Descending by averaged score; stable, so equal scores keep beam order.
            caps.sort_by(|a, b| {
                b.score
                    .partial_cmp(&a.score)
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
        }
        caps.truncate(c.opts.n_best as usize);
        out.push(Finished {
            id: c.ids[img as usize],
            captions: caps,
            steps: c.steps,
        });
    }
    Ok(out)
}

/// Applies temperature and the repetition / n-gram penalties to raw logits `[R, V]`.
fn adjust_logits(opts: &GenOptions, logits: &Tensor, history: &Tensor) -> Tensor {
    let mut l = if opts.temperature != 1.0 {
        logits / opts.temperature
    } else {
        logits.shallow_clone()
    };
    let steps = history.size()[1];
    if opts.repetition_penalty != 1.0 && steps > 0 {
        let p = opts.repetition_penalty;
        let seen = l.gather(1, history, false);
        let penalized = (&seen * p).where_self(&seen.lt(0.0), &(&seen / p));
        l = l.scatter(1, history, &penalized);
    }
    let n = opts.no_repeat_ngram;
    if n > 0 && steps >= n {
        // Windows of the history whose first n-1 tokens equal the last n-1 generated tokens
        // ban the token that followed them.
        let rows = history.size()[0];
        let ban_tok = history.narrow(1, n - 1, steps - n + 1); // [R, W]
        let matched = if n == 1 {
            ban_tok.ones_like().to_kind(Kind::Bool)
        } else {
            let heads = history.narrow(1, 0, steps - 1).unfold(1, n - 1, 1); // [R, W, n-1]
            let heads = heads.narrow(1, 0, steps - n + 1);
            let tail = history.narrow(1, steps - n + 1, n - 1).unsqueeze(1);
            heads.eq_tensor(&tail).all_dim(2, false)
        };
        // Count the matching windows that would produce each token; ban those tokens.
        let hits = Tensor::zeros([rows, l.size()[1]], (Kind::Float, l.device())).scatter_add(
            1,
            &ban_tok,
            &matched.to_kind(Kind::Float),
        );
        l = l.masked_fill(&hits.gt(0.0), f64::NEG_INFINITY);
    }
    l
}

/// ClipCap's first beam step: the k best first tokens of each image.
fn first_beam_step(c: &mut Cohort, logits: &Tensor, stop: &Tensor) {
    let n = c.n();
    let l = adjust_logits(
        &c.opts,
        logits,
        &Tensor::zeros([n, 0], (Kind::Int64, logits.device())),
    );
    let logp = l.softmax(-1, Kind::Float).log();
    let (scores, tok) = logp.topk(c.k, -1, true, true);
    c.scores = scores;
    c.tokens = tok.unsqueeze(-1);
    c.lengths = c.scores.ones_like();
    c.stopped = Tensor::isin(&tok, stop, false, false);
    c.last = tok.view([-1]);
    c.steps = 1;
}

/// A later beam step, exactly as `generate_beam`; returns the source row of each new row.
fn beam_step(c: &mut Cohort, logits: &Tensor, stop: &Tensor) -> Tensor {
    let (n, k) = (c.n(), c.k);
    let history = c.tokens.view([n * k, -1]);
    let l = adjust_logits(&c.opts, logits, &history);
    // The [n, k, V] passes below dominate a batched step (16 MB each at 16 images), so they
    // run in place on one buffer; the arithmetic is the original's, operation for operation.
    let mut avg = l.softmax(-1, Kind::Float).view([n, k, -1]);
    let _ = avg.log_();
    // Stopped beams may only continue with token 0, at no cost.
    let stopped = c.stopped.unsqueeze(-1);
    let _ = avg.masked_fill_(&stopped, f64::NEG_INFINITY);
    let _ = avg.narrow(2, 0, 1).masked_fill_(&stopped, 0.0);
    let _ = avg.g_add_(&c.scores.unsqueeze(-1)); // sums of log-probabilities
    let lengths = &c.lengths + c.stopped.logical_not().to_kind(Kind::Float);
    let _ = avg.g_div_(&lengths.unsqueeze(-1));
    // The k best of k x V candidates: the k best of each beam first, then the k best of those
    // k x k. The same candidates as one top-k over k x V, which libtorch runs on one thread
    // (0.86 vs 0.56 ms per step here).
    let (beam_best, beam_tok) = avg.topk(k, -1, true, true); // [n, k, k]
    let (best, pick) = beam_best.view([n, k * k]).topk(k, -1, true, true);
    let src = pick.divide_scalar_mode(k, "floor");
    let tok = beam_tok.view([n, k * k]).gather(1, &pick, false);
    c.lengths = lengths.gather(1, &src, false);
    c.scores = &best * &c.lengths;
    let hist = c
        .tokens
        .gather(1, &src.unsqueeze(-1).expand([n, k, c.steps], false), false);
    c.tokens = Tensor::cat(&[hist, tok.unsqueeze(-1)], 2);
    c.stopped = c
        .stopped
        .gather(1, &src, false)
        .logical_or(&Tensor::isin(&tok, stop, false, false));
    c.last = tok.view([-1]);
    c.steps += 1;
    (Tensor::arange(n, (Kind::Int64, src.device())).unsqueeze(1) * k + src).view([-1])
}

/// Greedy or sampled next token for every row (rows stay in place).
fn pick_step(c: &mut Cohort, logits: &Tensor, stop: &Tensor) {
    let (n, k) = (c.n(), c.k);
    let history = c.tokens.view([n * k, -1]);
    let l = adjust_logits(&c.opts, logits, &history);
    let logp = l.log_softmax(-1, Kind::Float);
    let tok = match c.opts.strategy {
        Strategy::Greedy => l.argmax(-1, false),
        _ => sample(c, &l),
    };
    let running = c.stopped.logical_not().view([-1]);
    let tok = tok.where_self(&running, &tok.zeros_like());
    let gained = logp.gather(1, &tok.unsqueeze(1), false).squeeze_dim(1);
    let run_f = running.to_kind(Kind::Float);
    c.scores = &c.scores + (gained.nan_to_num(0.0, None, None) * &run_f).view([n, k]);
    c.lengths = &c.lengths + run_f.view([n, k]);
    let tok2 = tok.view([n, k]);
    c.stopped = c
        .stopped
        .logical_or(&Tensor::isin(&tok2, stop, false, false));
    c.tokens = Tensor::cat(&[&c.tokens, &tok2.unsqueeze(-1)], 2);
    c.last = tok;
    c.steps += 1;
}

/// Draws one token per row from the top-k / top-p filtered distribution, with uniforms from
/// each image's own seeded generator (sent to the device; no read back).
fn sample(c: &mut Cohort, logits: &Tensor) -> Tensor {
    let device = logits.device();
    let vocab = logits.size()[1];
    let mut l = logits.shallow_clone();
    if c.opts.top_k > 0 && c.opts.top_k < vocab {
        let (kth, _) = l.topk(c.opts.top_k, -1, true, true);
        let thresh = kth.narrow(1, c.opts.top_k - 1, 1);
        l = l.where_self(
            &l.ge_tensor(&thresh),
            &Tensor::full([1], f64::NEG_INFINITY, (Kind::Float, device)),
        );
    }
    if c.opts.top_p < 1.0 {
        let (sorted, idx) = l.sort(-1, true);
        let cum = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
        // Remove tokens once the mass before them already reaches p (always keep the first).
        let before = &cum - sorted.softmax(-1, Kind::Float);
        let remove = before.ge(c.opts.top_p);
        let masked = sorted.masked_fill(&remove, f64::NEG_INFINITY);
        l = l.scatter(1, &idx, &masked);
    }
    let probs = l.softmax(-1, Kind::Float);
    let u: Vec<f32> = c
        .rngs
        .iter_mut()
        .flat_map(|r| (0..c.k).map(|_| r.random::<f32>()).collect::<Vec<_>>())
        .collect();
    let u = Tensor::from_slice(&u).to_device(device).unsqueeze(1);
    let cdf = probs.cumsum(-1, Kind::Float);
    let total = cdf.narrow(1, vocab - 1, 1);
    cdf.lt_tensor(&(u * total))
        .sum_dim_intlist(-1, false, Kind::Int64)
        .clamp_max(vocab - 1)
}

/// Captions a batch of CLIP embeddings `[n, D]` with one set of options; in input order.
pub fn caption_embeddings(
    model: Arc<Bundle>,
    clip: &Tensor,
    opts: &GenOptions,
) -> Result<Vec<Vec<Caption>>> {
    let n = clip.size()[0] as usize;
    let mut dec = Decoder::new(model);
    let mut out: Vec<Option<Vec<Caption>>> = vec![None; n];
    let mut done = dec.add(clip, opts, (0..n as u64).collect())?;
    loop {
        for f in done.drain(..) {
            out[f.id as usize] = Some(f.captions);
        }
        if dec.is_empty() {
            break;
        }
        done = dec.step()?;
    }
    Ok(out.into_iter().map(|c| c.unwrap_or_default()).collect())
}
