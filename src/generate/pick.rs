//! Greedy and sampled steps: one token per row, rows stay in place.
use super::decoder::Cohort;
use super::logits::adjust_logits;
use crate::model::row_sample::row_sample;
use crate::model::row_topk::row_topk;
use crate::options::Strategy;
use tch::{Kind, Tensor};

/// Greedy or sampled next token for every row (rows stay in place).
pub(super) fn pick_step(c: &mut Cohort, logits: &Tensor, stop: &Tensor) {
    let (n, k) = (c.n(), c.k);
    let history = c.tokens.view([n * k, -1]);
    let l = adjust_logits(&c.opts, logits, &history);
    // Each row's log-probability of its token, without writing a [R, V] log-softmax: greedy
    // takes the logit minus the row's log-sum-exp, sampling the log of the drawn probability.
    let (tok, logp) = match c.opts.strategy {
        // The first largest logit (libtorch's argmax is a scalar loop, ~1 ms a step at 40 rows).
        Strategy::Greedy => (row_topk(&l, 1).squeeze_dim(1), None),
        _ => {
            let probs = l.softmax(-1, Kind::Float);
            (sample(c, &probs), Some(probs))
        }
    };
    let running = c.stopped.logical_not().view([-1]);
    let tok = tok.where_self(&running, &tok.zeros_like());
    let at = tok.unsqueeze(1);
    let gained = match logp {
        None => l.gather(1, &at, false).squeeze_dim(1) - l.logsumexp([-1], false),
        Some(probs) => probs.gather(1, &at, false).squeeze_dim(1).log(),
    };
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
    if let Some(u) = &c.uniforms {
        // This step's column is used.
        c.uniforms = Some(u.narrow(1, 1, u.size()[1] - 1));
    }
}

/// Draws one token per row from the top-k / top-p filtered distribution, with the uniforms
/// drawn at join from each image's own seeded generator (already on the device).
fn sample(c: &Cohort, probs: &Tensor) -> Tensor {
    let u = c
        .uniforms
        .as_ref()
        .expect("a sampling cohort has its uniforms")
        .select(1, 0);
    row_sample(probs, &u, c.opts.top_k, c.opts.top_p)
}
