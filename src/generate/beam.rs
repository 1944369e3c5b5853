//! Beam search steps, ClipCap's `generate_beam` operation for operation.
use super::decoder::Cohort;
use super::logits::adjust_logits;
use crate::model::row_topk::row_topk;
use tch::{Kind, Tensor};

/// ClipCap's first beam step: the k best first tokens of each image.
pub(super) fn first_beam_step(c: &mut Cohort, logits: &Tensor, stop: &Tensor) {
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

/// A later beam step, as `generate_beam`; returns the source row of each new row.
///
/// The original ranks `(log softmax(l) + score) / length` over every beam's whole vocabulary.
/// That is non-decreasing in each beam's logit `l`, so a beam's k best are among its 2k
/// largest logits: only those candidates get the original's arithmetic, operation for
/// operation, on `[n, k, 2k]` values gathered from the one full softmax (whose sum is the
/// original's), instead of five passes over `[n, k, V]` (16 MB each at 16 images).
pub(super) fn beam_step(c: &mut Cohort, logits: &Tensor, stop: &Tensor) -> Tensor {
    let (n, k) = (c.n(), c.k);
    let history = c.tokens.view([n * k, -1]);
    let l = adjust_logits(&c.opts, logits, &history);
    let vocab = l.size()[1];
    let cands = (2 * k).min(vocab);
    // Each row's candidates, [n·k, cands]. Stopped beams may only continue with token 0, at
    // no cost: their first candidate is token 0, and every other one is ruled out below.
    let cand = row_topk(&l, cands);
    let stopped_rows = c.stopped.view([n * k, 1]);
    let _ = cand.narrow(1, 0, 1).masked_fill_(&stopped_rows, 0);
    let mut avg = l
        .softmax(-1, Kind::Float)
        .gather(1, &cand, false)
        .view([n, k, cands]);
    let _ = avg.log_();
    let stopped = c.stopped.unsqueeze(-1);
    let _ = avg.masked_fill_(&stopped, f64::NEG_INFINITY);
    let _ = avg.narrow(2, 0, 1).masked_fill_(&stopped, 0.0);
    let _ = avg.g_add_(&c.scores.unsqueeze(-1)); // sums of log-probabilities
    let lengths = &c.lengths + c.stopped.logical_not().to_kind(Kind::Float);
    let _ = avg.g_div_(&lengths.unsqueeze(-1));
    let (best, pick) = avg.view([n, k * cands]).topk(k, -1, true, true);
    let src = pick.divide_scalar_mode(cands, "floor");
    let tok = cand.view([n, k * cands]).gather(1, &pick, false);
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
