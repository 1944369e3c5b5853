//! Logit processors shared by every strategy, applied before a token is chosen.
use crate::options::GenOptions;
use tch::{Kind, Tensor};

/// Applies temperature and the repetition / n-gram penalties to raw logits `[R, V]`.
pub(super) fn adjust_logits(opts: &GenOptions, logits: &Tensor, history: &Tensor) -> Tensor {
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
