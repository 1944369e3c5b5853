//! CIDEr-D exactly as pycocoevalcap's `Cider` (n = 4, sigma = 6): tf-idf n-gram vectors with
//! document frequencies from the references of the evaluated images, `idf = log(N) -
//! log(max(1, df))`, clipped cosine similarity per n, the Gaussian length penalty (whose
//! "length" is, as in pycocoevalcap, the number of bigrams), mean over n, mean over
//! references, times 10.

use super::ptb::py_split_ws;
use super::{np_mean, FxMap};

const N: usize = 4;
const SIGMA: f64 = 6.0;

pub(crate) type Gram = (u8, [u32; N]);

/// N-gram counts in first-occurrence order (Python dict order).
#[derive(Default)]
struct Counts {
    order: Vec<(Gram, usize)>,
}

pub(crate) struct Interner<'a> {
    pub(crate) ids: FxMap<&'a str, u32>,
}

impl<'a> Interner<'a> {
    pub(crate) fn id(&mut self, w: &'a str) -> u32 {
        let n = self.ids.len() as u32;
        *self.ids.entry(w).or_insert(n)
    }
}

fn precook<'a>(s: &'a str, int: &mut Interner<'a>) -> Counts {
    let words: Vec<u32> = py_split_ws(s).into_iter().map(|w| int.id(w)).collect();
    let mut index: FxMap<Gram, usize> = FxMap::default();
    let mut c = Counts::default();
    for k in 1..=N {
        if words.len() < k {
            continue;
        }
        for i in 0..=words.len() - k {
            let mut g = [0u32; N];
            g[..k].copy_from_slice(&words[i..i + k]);
            let key = (k as u8, g);
            match index.get(&key) {
                Some(&j) => c.order[j].1 += 1,
                None => {
                    index.insert(key, c.order.len());
                    c.order.push((key, 1));
                }
            }
        }
    }
    c
}

struct Vector {
    /// per n: gram -> weight, in insertion order for the hypothesis loop
    vec: [Vec<(Gram, f64)>; N],
    map: [FxMap<Gram, f64>; N],
    norm: [f64; N],
    length: usize,
}

fn counts2vec(c: &Counts, df: &FxMap<Gram, f64>, ref_len: f64) -> Vector {
    let mut v = Vector {
        vec: Default::default(),
        map: Default::default(),
        norm: [0.0; N],
        length: 0,
    };
    for &(g, tf) in &c.order {
        let d = df.get(&g).copied().unwrap_or(0.0).max(1.0).ln();
        let n = g.0 as usize - 1;
        let w = tf as f64 * (ref_len - d);
        v.vec[n].push((g, w));
        v.map[n].insert(g, w);
        v.norm[n] += w.powf(2.0);
        if n == 1 {
            v.length += tf;
        }
    }
    for x in v.norm.iter_mut() {
        *x = x.sqrt();
    }
    v
}

fn sim(hyp: &Vector, r: &Vector) -> [f64; N] {
    let delta = hyp.length as f64 - r.length as f64;
    let mut val = [0.0; N];
    for (n, v) in val.iter_mut().enumerate() {
        for (g, w) in &hyp.vec[n] {
            let rw = r.map[n].get(g).copied().unwrap_or(0.0);
            *v += w.min(rw) * rw;
        }
        if hyp.norm[n] != 0.0 && r.norm[n] != 0.0 {
            *v /= hyp.norm[n] * r.norm[n];
        }
        *v *= std::f64::consts::E.powf(-delta.powf(2.0) / (2.0 * SIGMA.powf(2.0)));
    }
    val
}

/// CIDEr-D of tokenized `(candidate, references)` pairs: `(corpus mean, per item)`.
pub fn cider(items: &[(&str, Vec<&str>)]) -> (f64, Vec<f64>) {
    let mut int = Interner {
        ids: FxMap::default(),
    };
    let cooked: Vec<(Counts, Vec<Counts>)> = items
        .iter()
        .map(|(h, refs)| {
            let hc = precook(h, &mut int);
            (hc, refs.iter().map(|r| precook(r, &mut int)).collect())
        })
        .collect();
    let mut df: FxMap<Gram, f64> = FxMap::default();
    for (_, refs) in &cooked {
        let mut seen: FxMap<Gram, ()> = FxMap::default();
        for r in refs {
            for (g, _) in &r.order {
                if seen.insert(*g, ()).is_none() {
                    *df.entry(*g).or_insert(0.0) += 1.0;
                }
            }
        }
    }
    let ref_len = (cooked.len() as f64).ln();
    let scores: Vec<f64> = cooked
        .iter()
        .map(|(h, refs)| {
            let hv = counts2vec(h, &df, ref_len);
            let mut score = [0.0; N];
            for r in refs {
                let rv = counts2vec(r, &df, ref_len);
                let s = sim(&hv, &rv);
                for n in 0..N {
                    score[n] += s[n];
                }
            }
            let mut avg = np_mean(&score);
            avg /= refs.len() as f64;
            avg * 10.0
        })
        .collect();
    (np_mean(&scores), scores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_properties() {
        let items = vec![
            ("a dog runs", vec!["a dog runs", "the dog is running"]),
            ("a cat sits", vec!["a cat sits on a mat", "cat sitting"]),
            ("", vec!["a bird flies", "bird"]),
        ];
        let (mean, per) = cider(&items);
        assert_eq!(per.len(), 3);
        assert_eq!(per[2], 0.0);
        assert!(per[0] > per[1] && per[1] > 0.0);
        assert!((mean - (per[0] + per[1] + per[2]) / 3.0).abs() < 1e-12);
        // an n-gram present in every image's references has zero idf
        let (m, _) = cider(&[("x", vec!["x"]), ("x", vec!["x"])]);
        assert_eq!(m, 0.0);
    }
}
