//! The running batch: cohorts of images, one GPT-2 step for all their rows, and the sweep that
//! finishes, drops and reorders rows (see the module docs of `generate`).
use super::beam::{beam_step, first_beam_step};
use super::pick::pick_step;
use super::{Caption, FinishReason, Finished};
use crate::model::bundle::Bundle;
use crate::model::kv_cache::KvCache;
use crate::options::{GenOptions, Strategy};
use anyhow::{bail, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

// Crate-visible to `generate` only: `beam` and `pick` update a cohort in place.
/// Images that joined together with the same options; `n` images × `k` rows.
pub(super) struct Cohort {
    pub(super) opts: GenOptions,
    pub(super) ids: Vec<u64>,
    pub(super) k: i64,
    /// Token columns so far: the steps of the cohort's oldest image.
    pub(super) steps: i64,
    /// Per image, the column its tokens start at: images that joined later and were merged
    /// in have fewer steps, and their columns before this are padding.
    pub(super) started: Vec<i64>,
    /// Last token of each row `[n·k]`, fed at the next step.
    pub(super) last: Tensor,
    /// Generated tokens `[n, k, steps]`.
    pub(super) tokens: Tensor,
    /// Beam: running log-prob sums as the original keeps them; others: sums of log-probs.
    pub(super) scores: Tensor,
    /// Tokens counted per row `[n, k]` (f32, as the original).
    pub(super) lengths: Tensor,
    pub(super) stopped: Tensor,
    /// Sampling: every uniform a row has still to use, `[n·k, ≥ steps left]`, drawn at join
    /// from each image's own generator (so a seed gives the same result in any batch) and
    /// uploaded once; each step uses column 0 and drops it, with no host transfer.
    pub(super) uniforms: Option<Tensor>,
    pub(super) cancelled: Vec<bool>,
    /// Images whose tokens are reported as they are chosen ([`Decoder::take_streamed`]).
    pub(super) streamed: Vec<bool>,
    /// The prompt's tokens (the caption's given beginning), shared by the cohort.
    pub(super) prompt: Vec<i64>,
}

impl Cohort {
    pub(super) fn n(&self) -> i64 {
        self.ids.len() as i64
    }
    pub(super) fn rows(&self) -> i64 {
        self.n() * self.k
    }

    /// Whether `other` can run as part of this cohort: the same options (seeds are drawn at
    /// join, so they may differ), and no logit processor that reads the token history, whose
    /// padding a later joiner would see.
    fn merges_with(&self, other: &Cohort) -> bool {
        let history_free = |o: &GenOptions| o.repetition_penalty == 1.0 && o.no_repeat_ngram == 0;
        // Checked every step for every pair of cohorts: the cheap tests first, the options'
        // copy (for a comparison that ignores the seed) only when they pass.
        self.steps > 0
            && other.steps > 0
            && history_free(&self.opts)
            && GenOptions {
                seed: self.opts.seed,
                ..other.opts.clone()
            } == self.opts
    }

    /// This cohort's images followed by `other`'s (rows in that order), their token columns
    /// aligned at the newest: the one with fewer steps gets padding columns before its own.
    fn merge(mut self, mut other: Cohort) -> Cohort {
        let steps = self.steps.max(other.steps);
        for c in [&mut self, &mut other] {
            let pad = steps - c.steps;
            if pad > 0 {
                let (n, k) = (c.n(), c.k);
                let zeros = Tensor::zeros([n, k, pad], (Kind::Int64, c.tokens.device()));
                c.tokens = Tensor::cat(&[&zeros, &c.tokens], 2);
                c.started.iter_mut().for_each(|s| *s += pad);
                c.steps = steps;
            }
        }
        let cat = |a: &Tensor, b: &Tensor| Tensor::cat(&[a, b], 0);
        self.uniforms = match (&self.uniforms, &other.uniforms) {
            (Some(a), Some(b)) => {
                // Columns past an image's last step are never read: pad the narrower.
                let w = a.size()[1].max(b.size()[1]);
                let widen = |u: &Tensor| u.constant_pad_nd([0, w - u.size()[1]]);
                Some(cat(&widen(a), &widen(b)))
            }
            _ => None,
        };
        self.last = cat(&self.last, &other.last);
        self.tokens = cat(&self.tokens, &other.tokens);
        self.scores = cat(&self.scores, &other.scores);
        self.lengths = cat(&self.lengths, &other.lengths);
        self.stopped = cat(&self.stopped, &other.stopped);
        self.ids.extend(other.ids);
        self.started.extend(other.started);
        self.cancelled.extend(other.cancelled);
        self.streamed.extend(other.streamed);
        self
    }

    /// Steps image `i` has taken.
    fn image_steps(&self, i: usize) -> i64 {
        self.steps - self.started[i]
    }
}

/// Decodes many images at once on one model. See the module docs.
pub struct Decoder {
    model: Arc<Bundle>,
    cache: Option<KvCache>,
    cohorts: Vec<Cohort>,
    /// Cohorts whose prefill ran but whose first token waits for the next step: their logits
    /// come from the same lm_head call as the running rows' (the vocabulary-wide weight is
    /// read once per step, not once more per join).
    joining: Vec<Joining>,
    stop: Tensor,
    /// Tokens chosen for streamed images since the last [`Decoder::take_streamed`].
    streamed: Vec<Streamed>,
}

/// A cohort between its prefill and its first token.
struct Joining {
    cohort: Cohort,
    /// The last prefix position's hidden state, `[n, E]`.
    hidden: Tensor,
    /// Its rows' keys and values, already `k` rows per image.
    cache: KvCache,
    /// Each row's image, `[n·k]` (greedy and sampling pick from per-row logits).
    expand: Tensor,
}

/// An image joining the batch: its id, its sampling seed (images with different seeds share
/// a cohort), and whether its tokens are reported as they are chosen.
#[derive(Clone, Copy, Debug)]
pub struct NewImage {
    pub id: u64,
    pub seed: Option<u64>,
    pub streamed: bool,
}

/// The tokens one streamed image's rows got at one step (greedy and sampling; a stopped row
/// gets filler the reader ignores once it has seen a stop token).
#[derive(Clone, Debug, PartialEq)]
pub struct Streamed {
    pub id: u64,
    pub tokens: Vec<i64>,
}

impl Decoder {
    pub fn new(model: Arc<Bundle>) -> Self {
        let stop = Tensor::from_slice(&model.stop_ids).to_device(model.device);
        Decoder {
            model,
            cache: None,
            cohorts: vec![],
            joining: vec![],
            stop,
            streamed: vec![],
        }
    }

    /// The tokens streamed images got since the last call, step by step, in order.
    pub fn take_streamed(&mut self) -> Vec<Streamed> {
        std::mem::take(&mut self.streamed)
    }

    pub fn model(&self) -> &Arc<Bundle> {
        &self.model
    }

    /// Every cohort, running or about to take its first token.
    fn all_cohorts(&self) -> impl Iterator<Item = &Cohort> {
        self.cohorts
            .iter()
            .chain(self.joining.iter().map(|j| &j.cohort))
    }

    /// Images still being decoded.
    pub fn images(&self) -> usize {
        self.all_cohorts().map(|c| c.ids.len()).sum()
    }

    /// Cohorts (groups of images with equal options) in the running batch: each costs its own
    /// kernels per step.
    pub fn cohorts(&self) -> usize {
        self.all_cohorts().count()
    }

    /// Rows (images × beams) in the running batch.
    pub fn rows(&self) -> i64 {
        self.all_cohorts().map(|c| c.rows()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.cohorts.is_empty() && self.joining.is_empty()
    }

    /// Drops an image at the next step boundary without producing captions.
    pub fn cancel(&mut self, id: u64) {
        let joining = self.joining.iter_mut().map(|j| &mut j.cohort);
        for c in self.cohorts.iter_mut().chain(joining) {
            if let Some(i) = c.ids.iter().position(|&x| x == id) {
                c.cancelled[i] = true;
            }
        }
    }

    /// Adds images given their CLIP embeddings `[n, D]`: maps them to prefixes and runs the
    /// prefix (and the prompt, if any) through GPT-2; the next [`Decoder::step`] takes their
    /// first token, with the running rows' next one (images finish only at a step).
    pub fn add(&mut self, clip: &Tensor, opts: &GenOptions, ids: Vec<u64>) -> Result<()> {
        let images = ids
            .into_iter()
            .map(|id| NewImage {
                id,
                seed: opts.seed,
                streamed: false,
            })
            .collect();
        self.join(clip, opts, images)
    }

    /// [`Decoder::add`] for images with their own seeds (`opts.seed` is not read) and stream
    /// flags (beam search reports nothing before its beams finish): one cohort for all.
    pub fn join(&mut self, clip: &Tensor, opts: &GenOptions, images: Vec<NewImage>) -> Result<()> {
        opts.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        let ids: Vec<u64> = images.iter().map(|i| i.id).collect();
        let streamed: Vec<bool> = images.iter().map(|i| i.streamed).collect();
        let prompt = self.model.encode(&opts.prompt)?;
        let n = ids.len() as i64;
        if clip.size()[0] != n {
            bail!("{} embeddings for {n} ids", clip.size()[0]);
        }
        if n == 0 {
            return Ok(());
        }
        let _g = tch::no_grad_guard();
        let net = &self.model.net;
        let mut prefix = net.prefix(clip);
        if !prompt.is_empty() {
            // The prompt follows the image prefix, as if GPT-2 had written it.
            let ids = Tensor::from_slice(&prompt).to_device(prefix.device());
            let words = net.gpt.embed(&ids).to_kind(prefix.kind()).unsqueeze(0);
            let words = words.expand([n, -1, -1], false);
            prefix = Tensor::cat(&[&prefix, &words], 1);
        }
        let plen = prefix.size()[1];
        let mut cache = net.gpt.new_cache(n, plen + opts.max_tokens + 1);
        let h = net.gpt.forward(&prefix, None, &mut cache);
        let hidden = h.select(1, plen - 1);
        let device = hidden.device();
        let k = opts.rows_per_image();
        let expand =
            Tensor::arange(n, (Kind::Int64, device)).repeat_interleave_self_int(k, 0, None);
        cache.select_rows(&expand);
        let uniforms = (opts.strategy == Strategy::Sample).then(|| {
            // Each image's generator yields its rows' uniforms step by step (row-major per
            // step), as a generator drawn at every step would.
            let steps = opts.max_tokens as usize;
            let rows = k as usize;
            let mut u = vec![0f32; images.len() * rows * steps];
            for (i, img) in images.iter().enumerate() {
                let mut rng = match img.seed {
                    Some(s) => StdRng::seed_from_u64(s),
                    None => StdRng::from_os_rng(),
                };
                for s in 0..steps {
                    for r in 0..rows {
                        u[(i * rows + r) * steps + s] = rng.random::<f32>();
                    }
                }
            }
            Tensor::from_slice(&u)
                .view([n * k, opts.max_tokens])
                .to_device(device)
        });
        let cohort = Cohort {
            opts: opts.clone(),
            ids,
            k,
            steps: 0,
            started: vec![0; n as usize],
            last: Tensor::zeros([n * k], (Kind::Int64, device)),
            tokens: Tensor::zeros([n, k, 0], (Kind::Int64, device)),
            scores: Tensor::zeros([n, k], (Kind::Float, device)),
            lengths: Tensor::zeros([n, k], (Kind::Float, device)),
            stopped: Tensor::zeros([n, k], (Kind::Bool, device)),
            uniforms,
            cancelled: vec![false; n as usize],
            streamed,
            prompt,
        };
        self.joining.push(Joining {
            cohort,
            hidden,
            cache,
            expand,
        });
        Ok(())
    }

    /// One GPT-2 step for every running row and the first token of every joining image;
    /// returns the images that finished.
    pub fn step(&mut self) -> Result<Vec<Finished>> {
        if self.is_empty() {
            return Ok(vec![]);
        }
        let _g = tch::no_grad_guard();
        let gpt = &self.model.net.gpt;
        let joining = std::mem::take(&mut self.joining);
        let mut hidden = vec![];
        if !self.cohorts.is_empty() {
            let last = Tensor::cat(&self.cohorts.iter().map(|c| &c.last).collect::<Vec<_>>(), 0);
            let x = gpt.embed(&last.unsqueeze(1));
            let cache = self.cache.as_mut().expect("rows without a cache");
            hidden.push(gpt.forward(&x, None, cache).squeeze_dim(1));
        }
        hidden.extend(joining.iter().map(|j| j.hidden.shallow_clone()));
        // One lm_head call for all: a join costs its prefill, not another pass over the
        // vocabulary-wide weight. (A lone group is multiplied as it is, without a copy.)
        let h = match hidden.len() {
            1 => hidden.pop().unwrap(),
            _ => Tensor::cat(&hidden, 0),
        };
        let all_logits = gpt.logits(&h).to_kind(Kind::Float);
        let running_rows: i64 = self.cohorts.iter().map(|c| c.rows()).sum();
        let mut order = self.step_running(&all_logits.narrow(0, 0, running_rows));
        // The joiners' first tokens; their rows go below the running ones, in place.
        let mut off = running_rows;
        for Joining {
            mut cohort,
            cache,
            expand,
            ..
        } in joining
        {
            let n = cohort.n();
            let logits = all_logits.narrow(0, off, n);
            off += n;
            match cohort.opts.strategy {
                Strategy::Beam => first_beam_step(&mut cohort, &logits, &self.stop),
                _ => {
                    let logits = logits.index_select(0, &expand);
                    pick_step(&mut cohort, &logits, &self.stop);
                }
            }
            if let Some(o) = order.as_mut() {
                let rows = cohort.rows();
                let at = self.cache.as_ref().map_or(0, |c| c.rows());
                o.push(Tensor::arange_start(
                    at,
                    at + rows,
                    (Kind::Int64, o[0].device()),
                ));
            }
            match &mut self.cache {
                None => self.cache = Some(cache),
                Some(c) => c.append_rows(cache),
            }
            self.cohorts.push(cohort);
        }
        // Every cohort chose a token: one sweep, one host read.
        self.sweep(order.map(|o| Tensor::cat(&o, 0)))
    }

    /// The running cohorts' next tokens from their `logits`; with beam search among them,
    /// each row's source row (per cohort, to be concatenated).
    fn step_running(&mut self, logits: &Tensor) -> Option<Vec<Tensor>> {
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
        reorder.then_some(order)
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
                let at_most: Vec<bool> = (0..c.ids.len())
                    .map(|i| c.image_steps(i) >= c.opts.max_tokens)
                    .collect();
                if at_most.iter().all(|&m| m) {
                    done.ones_like()
                } else if at_most.iter().any(|&m| m) {
                    done.logical_or(&Tensor::from_slice(&at_most).to_device(done.device()))
                } else {
                    done
                }
            })
            .collect();
        // The one host read per step: a flag per image, and the beam reorder (so the cache
        // copies only the rows whose history changed).
        let flags = Tensor::cat(&flags, 0).to_kind(Kind::Int64);
        let n_flags = flags.size()[0] as usize;
        // Streamed cohorts' new tokens ride along in the same read.
        let streaming: Vec<usize> = (0..self.cohorts.len())
            .filter(|&i| {
                let c = &self.cohorts[i];
                c.opts.strategy != Strategy::Beam && c.streamed.iter().any(|&s| s)
            })
            .collect();
        let mut parts = vec![flags];
        parts.extend(
            streaming
                .iter()
                .map(|&i| self.cohorts[i].last.shallow_clone()),
        );
        let n_streamed: usize = streaming
            .iter()
            .map(|&i| self.cohorts[i].rows() as usize)
            .sum();
        if let Some(r) = &reorder {
            parts.push(r.shallow_clone());
        }
        // One part (the common case) is read as it is, without a concatenation.
        let all = match parts.len() {
            1 => parts.pop().unwrap(),
            _ => Tensor::cat(&parts, 0),
        };
        let host: Vec<i64> = Vec::try_from(all.to_device(Device::Cpu))?;
        let (flags, rest) = host.split_at(n_flags);
        let (mut lasts, reorder) = rest.split_at(n_streamed);
        for &i in &streaming {
            let c = &self.cohorts[i];
            let (mine, others) = lasts.split_at(c.rows() as usize);
            lasts = others;
            for (j, &id) in c.ids.iter().enumerate() {
                if c.streamed[j] && !c.cancelled[j] {
                    let k = c.k as usize;
                    self.streamed.push(Streamed {
                        id,
                        tokens: mine[j * k..(j + 1) * k].to_vec(),
                    });
                }
            }
        }
        let flags: Vec<bool> = flags.iter().map(|&f| f != 0).collect();
        let reorder = (!reorder.is_empty()).then_some(reorder);
        let mut finished = vec![];
        // Each surviving cohort's rows, as positions in this step's row order.
        let mut slots: Vec<Vec<i64>> = vec![];
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
                slots.push((row_off..row_off + c.rows()).collect());
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
            slots.push(
                kept.iter()
                    .flat_map(|&i| row_off + i * c.k..row_off + (i + 1) * c.k)
                    .collect(),
            );
            row_off += c.rows();
            retain_images(c, &kept);
        }
        let (cohorts, slots): (Vec<_>, Vec<_>) = std::mem::take(&mut self.cohorts)
            .into_iter()
            .zip(slots)
            .filter(|(c, _)| !c.ids.is_empty())
            .unzip();
        if cohorts.is_empty() {
            self.cache = None;
            return Ok(finished);
        }
        let (cohorts, slots, merged_any) = merge_cohorts(cohorts, slots);
        self.cohorts = cohorts;
        let index: Option<Vec<i64>> = match (reorder, removed_any || merged_any) {
            (None, false) => None,
            (Some(r), false) => Some(r.to_vec()),
            (Some(r), true) => Some(slots.iter().map(|&j| r[j as usize]).collect()),
            (None, true) => Some(slots),
        };
        if let (Some(idx), Some(cache)) = (index, self.cache.as_mut()) {
            cache.select_rows_from(&idx);
        }
        Ok(finished)
    }
}

/// Folds every cohort into the first earlier one it merges with, so that images with the same
/// options share one set of kernels per step however far apart they joined; returns the
/// cohorts, their rows' positions in the old order (concatenated), and whether any merged.
fn merge_cohorts(cohorts: Vec<Cohort>, slots: Vec<Vec<i64>>) -> (Vec<Cohort>, Vec<i64>, bool) {
    let mut out: Vec<(Cohort, Vec<i64>)> = Vec::with_capacity(cohorts.len());
    let mut merged_any = false;
    for (c, rows) in cohorts.into_iter().zip(slots) {
        match out.iter().position(|(o, _)| o.merges_with(&c)) {
            Some(i) => {
                let (into, mut at) = out.remove(i);
                at.extend(rows);
                out.insert(i, (into.merge(c), at));
                merged_any = true;
            }
            None => out.push((c, rows)),
        }
    }
    let (cohorts, slots): (Vec<_>, Vec<_>) = out.into_iter().unzip();
    (cohorts, slots.concat(), merged_any)
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
    c.started = kept.iter().map(|&i| c.started[i as usize]).collect();
    c.ids = kept.iter().map(|&i| c.ids[i as usize]).collect();
    c.streamed = kept.iter().map(|&i| c.streamed[i as usize]).collect();
    if let Some(u) = &c.uniforms {
        c.uniforms = Some(u.index_select(0, &rows));
    }
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
        let start = c.started[img as usize];
        let mut caps: Vec<Caption> = (0..c.k)
            .map(|r| {
                let len = lens[r as usize] as i64;
                let ids: Vec<i64> =
                    Vec::try_from(toks.get(r).narrow(0, start, len)).unwrap_or_default();
                let finish = match ids.last() {
                    Some(t) if model.stop_ids.contains(t) => FinishReason::Stop,
                    _ => FinishReason::Length,
                };
                Caption {
                    text: model.caption_text(&c.prompt, &ids),
                    score: scores[r as usize] as f64,
                    tokens: ids,
                    finish,
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
        caps.truncate(c.opts.n as usize);
        out.push(Finished {
            id: c.ids[img as usize],
            captions: caps,
            steps: c.image_steps(img as usize),
        });
    }
    Ok(out)
}
