//! ROUGE-L exactly as pycocoevalcap's `Rouge`: tokens by `split(" ")`, LCS against every
//! reference, precision and recall each maximized over the references, then
//! `F = (1 + b^2) P R / (R + b^2 P)` with `b = 1.2`.

const BETA: f64 = 1.2;

fn lcs(a: &[&str], b: &[&str]) -> usize {
    let (long, short) = if a.len() < b.len() { (b, a) } else { (a, b) };
    let mut prev = vec![0usize; short.len() + 1];
    let mut cur = vec![0usize; short.len() + 1];
    for x in long {
        for (j, y) in short.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                prev[j + 1].max(cur[j])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[short.len()]
}

/// ROUGE-L of one tokenized candidate against its tokenized references.
pub fn rouge_l(candidate: &str, refs: &[&str]) -> f64 {
    let c: Vec<&str> = candidate.split(' ').collect();
    let mut prec_max = f64::NEG_INFINITY;
    let mut rec_max = f64::NEG_INFINITY;
    for r in refs {
        let t: Vec<&str> = r.split(' ').collect();
        let l = lcs(&t, &c) as f64;
        prec_max = prec_max.max(l / c.len() as f64);
        rec_max = rec_max.max(l / t.len() as f64);
    }
    if prec_max != 0.0 && rec_max != 0.0 {
        let b2 = BETA.powf(2.0);
        ((1.0 + b2) * prec_max * rec_max) / (rec_max + b2 * prec_max)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lcs_and_score() {
        assert_eq!(lcs(&["a", "b", "c", "d"], &["b", "d", "a"]), 2);
        assert!((rouge_l("a b c", &["a b c"]) - 1.0).abs() < 1e-12);
        assert_eq!(rouge_l("x", &["a b"]), 0.0);
        // P and R are maximized separately: P from ref 1 (1/1), R from ref 2 (1/1)
        let f = rouge_l("a", &["a b c d", "a"]);
        assert!((f - 1.0).abs() < 1e-12);
        // empty candidate is the token "" (Python split(" ")) and matches an empty ref
        assert_eq!(rouge_l("", &["a b"]), 0.0);
        assert!((rouge_l("", &[""]) - 1.0).abs() < 1e-12);
    }
}
