//! Greedy and sampled steps: one token per row, rows stay in place.
use super::decoder::Cohort;
use super::logits::adjust_logits;
use crate::options::Strategy;
use tch::{Kind, Tensor};

/// Greedy or sampled next token for every row (rows stay in place).
pub(super) fn pick_step(c: &mut Cohort, logits: &Tensor, stop: &Tensor) {
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

/// Draws one token per row from the top-k / top-p filtered distribution, with the uniforms
/// drawn at join from each image's own seeded generator (already on the device).
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
    let u = c
        .uniforms
        .as_ref()
        .expect("a sampling cohort has its uniforms")
        .narrow(1, c.steps, 1);
    let cdf = probs.cumsum(-1, Kind::Float);
    let total = cdf.narrow(1, vocab - 1, 1);
    cdf.lt_tensor(&(u * total))
        .sum_dim_intlist(-1, false, Kind::Int64)
        .clamp_max(vocab - 1)
}
