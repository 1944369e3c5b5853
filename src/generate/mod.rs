//! Caption decoding: beam search, greedy and sampling over a shared, growing batch.
//!
//! A [`Decoder`] holds every image being captioned by one model. Images that arrive together
//! with the same options form a *cohort* (`k` rows each: beams, or samples). Each
//! [`Decoder::step`] runs **one** GPT-2 step for all rows of all cohorts with the KV cache,
//! then each cohort picks its next tokens with a few batched tensor ops on the device. The
//! only host transfer per step is one read of a few integers: a flag per image (is it
//! finished?) and, for beam search, the source row of each beam (so the KV cache copies only
//! the rows whose history changed). New cohorts can
//! join between steps ([`Decoder::add`]), which is what continuous batching needs; after its
//! first token a joiner folds into a running cohort with the same options (its token columns
//! left-padded), so images that arrive at different steps still share one set of kernels per
//! step. Cohorts whose logit processors read the token history (repetition penalty, n-gram
//! blocking) stay apart, since they would see the padding. A join writes only its own rows of
//! the KV cache and a leave moves only the rows behind it (the cache keeps room for more rows).
//!
//! Beam search reproduces ClipCap's `generate_beam` (log of softmax, stopped beams extended
//! with token 0 at no cost, scores averaged by length when ranking) and greedy its
//! `generate2` (arg-max until a stop token), token for token.
//!
//! The decoder and its cohorts live in `decoder`, the per-step token choice in `beam`
//! (beam search) and `pick` (greedy, sampling), and the shared logit processors in `logits`.
use crate::model::bundle::Bundle;
use crate::options::GenOptions;
use anyhow::Result;
use serde::Serialize;
use std::sync::Arc;
use tch::Tensor;

mod beam;
mod decoder;
mod logits;
mod pick;

pub use decoder::{Decoder, NewImage, Streamed};

/// One caption and its score (mean log-probability per generated token).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Caption {
    /// The prompt (if any) and what the decoder wrote after it.
    pub text: String,
    pub score: f64,
    /// The generated tokens (the prompt's are not among them).
    pub tokens: Vec<i64>,
    pub finish: FinishReason,
}

/// Why a caption ended: a stop token, or `max_tokens`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
}

/// An image whose captions are final.
#[derive(Debug)]
pub struct Finished {
    pub id: u64,
    pub captions: Vec<Caption>,
    /// Decoding steps the image took part in.
    pub steps: i64,
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
    dec.add(clip, opts, (0..n as u64).collect())?;
    while !dec.is_empty() {
        for f in dec.step()? {
            out[f.id as usize] = Some(f.captions);
        }
    }
    Ok(out.into_iter().map(|c| c.unwrap_or_default()).collect())
}
