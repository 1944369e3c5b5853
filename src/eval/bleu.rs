//! BLEU-1..4 exactly as pycocoevalcap's `Bleu(4)` (`BleuScorer.compute_score(option=
//! "closest")`): corpus-level clipped n-gram precisions with the closest reference length,
//! the `tiny = 1e-15` / `small = 1e-9` terms, and per-image scores computed the same way.

use super::cider::{Gram, Interner};
use super::ptb::py_split_ws;
use super::FxMap;

const N: usize = 4;
const TINY: f64 = 1e-15;
const SMALL: f64 = 1e-9;

/// Counts of all 1..=4-grams of a sentence given as word ids.
fn precook(words: &[u32]) -> FxMap<Gram, usize> {
    let mut counts = FxMap::default();
    for k in 1..=N {
        if words.len() >= k {
            for i in 0..=words.len() - k {
                let mut g = [0u32; N];
                g[..k].copy_from_slice(&words[i..i + k]);
                *counts.entry((k as u8, g)).or_insert(0) += 1;
            }
        }
    }
    counts
}

struct Cooked {
    testlen: usize,
    reflen: usize,
    guess: [usize; N],
    correct: [usize; N],
}

fn cook<'a>(hyp: &'a str, refs: &[&'a str], int: &mut Interner<'a>) -> Cooked {
    let mut ids =
        |s: &'a str| -> Vec<u32> { py_split_ws(s).into_iter().map(|w| int.id(w)).collect() };
    let mut reflens = Vec::with_capacity(refs.len());
    let mut maxcounts: FxMap<Gram, usize> = FxMap::default();
    for r in refs {
        let words = ids(r);
        reflens.push(words.len());
        for (g, c) in precook(&words) {
            let e = maxcounts.entry(g).or_insert(0);
            *e = (*e).max(c);
        }
    }
    let words = ids(hyp);
    let testlen = words.len();
    // min over (|l - testlen|, l): closest length, ties to the shorter
    let reflen = reflens
        .iter()
        .map(|&l| (l.abs_diff(testlen), l))
        .min()
        .map(|(_, l)| l)
        .unwrap_or(0);
    let mut guess = [0; N];
    for (k, g) in guess.iter_mut().enumerate() {
        *g = (testlen + 1).saturating_sub(k + 1);
    }
    let mut correct = [0; N];
    for (g, c) in precook(&words) {
        let m = maxcounts.get(&g).copied().unwrap_or(0);
        correct[g.0 as usize - 1] += m.min(c);
    }
    Cooked {
        testlen,
        reflen,
        guess,
        correct,
    }
}

fn finish(correct: &[usize; N], guess: &[usize; N], testlen: usize, reflen: usize) -> [f64; N] {
    let mut out = [0.0; N];
    let mut bleu = 1.0f64;
    for k in 0..N {
        bleu *= (correct[k] as f64 + TINY) / (guess[k] as f64 + SMALL);
        out[k] = bleu.powf(1.0 / (k as f64 + 1.0));
    }
    let ratio = (testlen as f64 + TINY) / (reflen as f64 + SMALL);
    if ratio < 1.0 {
        for v in out.iter_mut() {
            *v *= (1.0 - 1.0 / ratio).exp();
        }
    }
    out
}

/// BLEU-1..4 of tokenized `(hypothesis, references)` pairs: `(corpus, per_item)`.
pub fn bleu(items: &[(&str, Vec<&str>)]) -> ([f64; N], Vec<[f64; N]>) {
    let mut per = Vec::with_capacity(items.len());
    let (mut testlen, mut reflen) = (0usize, 0usize);
    let (mut guess, mut correct) = ([0usize; N], [0usize; N]);
    let mut int = Interner {
        ids: FxMap::default(),
    };
    for (hyp, refs) in items {
        let c = cook(hyp, refs, &mut int);
        testlen += c.testlen;
        reflen += c.reflen;
        for k in 0..N {
            guess[k] += c.guess[k];
            correct[k] += c.correct[k];
        }
        per.push(finish(&c.correct, &c.guess, c.testlen, c.reflen));
    }
    (finish(&correct, &guess, testlen, reflen), per)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_and_empty() {
        let (c, p) = bleu(&[("a b c d e", vec!["a b c d e", "x y"])]);
        for v in c.iter().chain(p[0].iter()) {
            assert!((v - 1.0).abs() < 1e-6, "{v}");
        }
        let (c, p) = bleu(&[("", vec!["a b"])]);
        assert_eq!(p[0], [0.0; 4]);
        assert_eq!(c, [0.0; 4]);
    }

    #[test]
    fn known_value() {
        // hand-computed: hyp "the cat sat" vs ref "the cat sat on the mat":
        // precisions 1, 1, 1 (4-gram: 0 of 0) and brevity penalty exp(1 - 6/3)
        let (c, _) = bleu(&[("the cat sat", vec!["the cat sat on the mat"])]);
        let bp = (1.0f64 - 6.0 / 3.0).exp();
        assert!((c[0] - bp).abs() < 1e-6);
        assert!((c[2] - bp).abs() < 1e-6);
        // 4-gram precision (1e-15)/(1e-9) = 1e-6 -> bleu_4 = (1e-6)^(1/4) * bp
        assert!((c[3] - 1e-6f64.powf(0.25) * bp).abs() < 1e-9);
    }
}
