//! COCO caption metrics computed as `pycocoevalcap` 1.2 computes them.
//!
//! [`score`] reproduces `COCOEvalCap.evaluate` for the images of the candidate set: both the
//! references and the candidates go through pycocoevalcap's PTB tokenization ([`ptb`], a
//! re-implementation of the Stanford CoreNLP 3.4.1 tokenizer call it makes, including the
//! punctuation filter), then BLEU-1..4 ([`bleu`]), ROUGE-L ([`rouge`]) and CIDEr-D ([`cider`])
//! are computed natively with pycocoevalcap's arithmetic, METEOR by running the official
//! METEOR 1.5 jar as pycocoevalcap does ([`meteor`]), and SPICE only when its jars are
//! complete ([`spice`]). Images are visited in key order (the order matters only for float
//! summation and for the tokenizer's rare cross-line lookahead).

pub mod bleu;
pub mod cider;
pub mod cli;
pub(crate) mod jflex;
pub mod meteor;
pub mod ptb;
mod ptb_tables;
pub mod rouge;
pub mod spice;

pub use ptb::ptb_tokenize;

use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Image id -> reference captions.
pub type Refs = BTreeMap<String, Vec<String>>;
/// Image id -> candidate caption.
pub type Cands = BTreeMap<String, String>;

/// Metric values in pycocoevalcap's scale (0..1; CIDEr 0..10).
#[derive(Clone, Debug, PartialEq)]
pub struct Scores {
    /// Number of evaluated images (the candidates).
    pub n_images: usize,
    /// BLEU-1..4 (corpus level).
    pub bleu: [f64; 4],
    /// METEOR 1.5, when it could be run.
    pub meteor: Option<f64>,
    /// Why METEOR is missing (not requested, java or jar not found, jar failure).
    pub meteor_note: Option<String>,
    /// ROUGE-L (mean over images).
    pub rouge_l: f64,
    /// CIDEr-D (mean over images).
    pub cider: f64,
    /// SPICE, when requested and its jars are complete.
    pub spice: Option<f64>,
    /// Why SPICE is missing.
    pub spice_note: Option<String>,
    /// Per-image BLEU-1..4 (pycocoevalcap's per-image values).
    pub per_image_bleu: BTreeMap<String, [f64; 4]>,
    /// Per-image ROUGE-L.
    pub per_image_rouge_l: BTreeMap<String, f64>,
    /// Per-image CIDEr-D.
    pub per_image_cider: BTreeMap<String, f64>,
    /// Per-image METEOR (empty when METEOR did not run).
    pub per_image_meteor: BTreeMap<String, f64>,
    /// Per-image SPICE `All.f` (empty when SPICE did not run).
    pub per_image_spice: BTreeMap<String, f64>,
}

/// Which jar-backed metrics to run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Run METEOR 1.5 (needs `java` and the jar; a few seconds to load its tables).
    pub meteor: bool,
    /// Run SPICE (needs `java`, 8 GB heap and Stanford CoreNLP 3.6.0 jars).
    pub spice: bool,
}

/// A fast non-cryptographic hasher (FxHash) for the n-gram tables.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

pub(crate) type FxMap<K, V> =
    std::collections::HashMap<K, V, std::hash::BuildHasherDefault<FxHasher>>;

/// numpy's `np.mean` of a float64 vector (pairwise summation, then division).
pub(crate) fn np_mean(a: &[f64]) -> f64 {
    fn pairwise(a: &[f64]) -> f64 {
        let n = a.len();
        if n < 8 {
            let mut res = 0.0;
            for &x in a {
                res += x;
            }
            res
        } else if n <= 128 {
            let mut r = [0.0f64; 8];
            r.copy_from_slice(&a[..8]);
            let mut i = 8;
            while i < n - n % 8 {
                for j in 0..8 {
                    r[j] += a[i + j];
                }
                i += 8;
            }
            let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
            while i < n {
                res += a[i];
                i += 1;
            }
            res
        } else {
            let mut n2 = n / 2;
            n2 -= n2 % 8;
            pairwise(&a[..n2]) + pairwise(&a[n2..])
        }
    }
    pairwise(a) / a.len() as f64
}

/// The references and candidates after pycocoevalcap's PTB tokenization (tokens joined by
/// single spaces), for the images of `cands`. Errors where pycocoevalcap would fail: a
/// candidate without references, or a tokenizer output misaligned so that an image loses
/// its candidate or all of its references.
pub fn tokenize_for_eval(refs: &Refs, cands: &Cands) -> Result<(Refs, Cands)> {
    if cands.is_empty() {
        bail!("no candidates to evaluate");
    }
    let mut flat = Vec::new();
    let mut owner = Vec::new();
    for id in cands.keys() {
        let r = refs
            .get(id)
            .filter(|r| !r.is_empty())
            .ok_or_else(|| anyhow!("candidate image {id:?} has no reference captions"))?;
        for c in r {
            flat.push(c.as_str());
            owner.push(id.as_str());
        }
    }
    let mut gts = Refs::new();
    for (id, tok) in owner.iter().zip(ptb::tokenize_captions(&flat)) {
        if let Some(t) = tok {
            gts.entry(id.to_string()).or_default().push(t);
        }
    }
    let cand_texts: Vec<&str> = cands.values().map(String::as_str).collect();
    let mut res = Cands::new();
    for (id, tok) in cands.keys().zip(ptb::tokenize_captions(&cand_texts)) {
        let t = tok.ok_or_else(|| {
            anyhow!("PTB tokenizer output lost the line of candidate {id:?} (line separators inside captions shift pycocoevalcap's alignment)")
        })?;
        res.insert(id.clone(), t);
    }
    for id in cands.keys() {
        if !gts.contains_key(id) {
            bail!("PTB tokenizer output lost the references of image {id:?} (line separators inside captions shift pycocoevalcap's alignment)");
        }
    }
    Ok((gts, res))
}

/// BLEU-1..4, ROUGE-L, CIDEr-D and (if `with_meteor`) METEOR of `cands` against `refs`, as
/// pycocoevalcap computes them. Only images present in `cands` are evaluated; a candidate
/// without references is an error.
pub fn score(refs: &Refs, cands: &Cands, with_meteor: bool) -> Result<Scores> {
    score_with(
        refs,
        cands,
        Options {
            meteor: with_meteor,
            spice: false,
        },
    )
}

/// [`score`] with explicit [`Options`] (SPICE too).
pub fn score_with(refs: &Refs, cands: &Cands, opts: Options) -> Result<Scores> {
    let (gts, res) = tokenize_for_eval(refs, cands)?;
    let ids: Vec<&String> = res.keys().collect();
    let items: Vec<(&str, Vec<&str>)> = ids
        .iter()
        .map(|id| {
            (
                res[*id].as_str(),
                gts[*id].iter().map(String::as_str).collect(),
            )
        })
        .collect();
    let (bleu, bleu_per) = bleu::bleu(&items);
    let rouge_per: Vec<f64> = items.iter().map(|(h, r)| rouge::rouge_l(h, r)).collect();
    let (cider, cider_per) = cider::cider(&items);
    let zip = |v: &[f64]| -> BTreeMap<String, f64> {
        ids.iter()
            .map(|id| id.to_string())
            .zip(v.iter().copied())
            .collect()
    };
    let (meteor, meteor_note, per_image_meteor) = if opts.meteor {
        match meteor::meteor(&items) {
            Ok((m, per)) => (Some(m), None, zip(&per)),
            Err(e) => (
                None,
                Some(format!("METEOR unavailable: {e:#}")),
                BTreeMap::new(),
            ),
        }
    } else {
        (
            None,
            Some("METEOR not requested".to_string()),
            BTreeMap::new(),
        )
    };
    let (spice, spice_note, per_image_spice) = if opts.spice {
        let sp_items: Vec<(&str, &str, Vec<&str>)> = ids
            .iter()
            .zip(&items)
            .map(|(id, (h, r))| (id.as_str(), *h, r.clone()))
            .collect();
        match spice::spice(&sp_items) {
            Ok((s, per)) => (Some(s), None, zip(&per)),
            Err(e) => (
                None,
                Some(format!("SPICE unavailable: {e:#}")),
                BTreeMap::new(),
            ),
        }
    } else {
        let note = match spice::find_jar() {
            Ok(_) => "SPICE not requested".to_string(),
            Err(e) => format!("SPICE unavailable: {e:#}"),
        };
        (None, Some(note), BTreeMap::new())
    };
    Ok(Scores {
        n_images: ids.len(),
        bleu,
        meteor,
        meteor_note,
        rouge_l: np_mean(&rouge_per),
        cider,
        spice,
        spice_note,
        per_image_bleu: ids.iter().map(|id| id.to_string()).zip(bleu_per).collect(),
        per_image_rouge_l: zip(&rouge_per),
        per_image_cider: zip(&cider_per),
        per_image_meteor,
        per_image_spice,
    })
}

fn json_f64(x: f64) -> serde_json::Value {
    serde_json::Number::from_f64(x)
        .map(serde_json::Value::Number)
        .unwrap_or(serde_json::Value::Null)
}

impl Scores {
    /// pycocoevalcap's names: `Bleu_1`..`Bleu_4`, `METEOR`, `ROUGE_L`, `CIDEr`, `SPICE`
    /// (null when not computed), the notes, and `per_image` (image id -> metric -> value).
    pub fn to_json(&self) -> serde_json::Value {
        let mut per = serde_json::Map::new();
        for (id, b) in &self.per_image_bleu {
            let mut m = serde_json::Map::new();
            for (k, v) in b.iter().enumerate() {
                m.insert(format!("Bleu_{}", k + 1), json_f64(*v));
            }
            if let Some(v) = self.per_image_meteor.get(id) {
                m.insert("METEOR".into(), json_f64(*v));
            }
            if let Some(v) = self.per_image_rouge_l.get(id) {
                m.insert("ROUGE_L".into(), json_f64(*v));
            }
            if let Some(v) = self.per_image_cider.get(id) {
                m.insert("CIDEr".into(), json_f64(*v));
            }
            if let Some(v) = self.per_image_spice.get(id) {
                m.insert("SPICE".into(), json_f64(*v));
            }
            per.insert(id.clone(), serde_json::Value::Object(m));
        }
        serde_json::json!({
            "n_images": self.n_images,
            "Bleu_1": json_f64(self.bleu[0]),
            "Bleu_2": json_f64(self.bleu[1]),
            "Bleu_3": json_f64(self.bleu[2]),
            "Bleu_4": json_f64(self.bleu[3]),
            "METEOR": self.meteor.map(json_f64),
            "ROUGE_L": json_f64(self.rouge_l),
            "CIDEr": json_f64(self.cider),
            "SPICE": self.spice.map(json_f64),
            "meteor_note": self.meteor_note,
            "spice_note": self.spice_note,
            "per_image": per,
        })
    }

    /// A markdown table in the style of the ClipCap README (scores x100, two decimals):
    /// BLEU-1..4, METEOR, ROUGE-L, CIDEr, and SPICE when computed.
    pub fn table(&self) -> String {
        let pct = |x: f64| format!("{:.2}", 100.0 * x);
        let mut head = vec![
            "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr",
        ];
        let mut row: Vec<String> = self.bleu.iter().map(|&b| pct(b)).collect();
        row.push(self.meteor.map(pct).unwrap_or_else(|| "n/a".into()));
        row.push(pct(self.rouge_l));
        row.push(pct(self.cider));
        if let Some(s) = self.spice {
            head.push("SPICE");
            row.push(pct(s));
        }
        let mut out = format!("| {} |\n", head.join(" | "));
        out.push_str(&format!("|{}\n", "---:|".repeat(head.len())));
        out.push_str(&format!("| {} |\n", row.join(" | ")));
        out
    }
}

fn image_id_key(v: &serde_json::Value) -> Result<String> {
    match v {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        other => bail!("image_id must be a number or a string, got {other}"),
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

fn caption_of(a: &serde_json::Value, i: usize) -> Result<(String, String)> {
    let id = image_id_key(
        a.get("image_id")
            .ok_or_else(|| anyhow!("entry {i} has no image_id"))?,
    )
    .with_context(|| format!("entry {i}"))?;
    let cap = a
        .get("caption")
        .and_then(|c| c.as_str())
        .ok_or_else(|| anyhow!("entry {i} (image {id}) has no string caption"))?;
    Ok((id, cap.to_string()))
}

/// References from a COCO caption annotation file
/// (`{"images": [...], "annotations": [{"image_id", "caption"}, ...]}`), in file order.
/// Integer and string image ids both become string keys.
pub fn load_coco_refs(path: impl AsRef<Path>) -> Result<Refs> {
    let path = path.as_ref();
    let v = read_json(path)?;
    let anns = v
        .get("annotations")
        .and_then(|a| a.as_array())
        .ok_or_else(|| anyhow!("{}: no \"annotations\" list", path.display()))?;
    let mut refs = Refs::new();
    for (i, a) in anns.iter().enumerate() {
        let (id, cap) = caption_of(a, i).with_context(|| path.display().to_string())?;
        refs.entry(id).or_default().push(cap);
    }
    Ok(refs)
}

/// Candidates from a COCO results file (`[{"image_id", "caption"}, ...]`). An image listed
/// twice is an error (pycocoevalcap requires exactly one candidate per image).
pub fn load_coco_results(path: impl AsRef<Path>) -> Result<Cands> {
    let path = path.as_ref();
    let v = read_json(path)?;
    let arr = v
        .as_array()
        .ok_or_else(|| anyhow!("{}: results must be a JSON list", path.display()))?;
    let mut cands = Cands::new();
    for (i, a) in arr.iter().enumerate() {
        let (id, cap) = caption_of(a, i).with_context(|| path.display().to_string())?;
        if cands.insert(id.clone(), cap).is_some() {
            bail!("{}: image {id} has more than one caption", path.display());
        }
    }
    Ok(cands)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(v: &[(&str, &[&str])]) -> Refs {
        v.iter()
            .map(|(k, r)| (k.to_string(), r.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn np_mean_matches_naive_closely() {
        let v: Vec<f64> = (0..1000).map(|i| (i as f64 * 0.37).sin()).collect();
        let naive: f64 = v.iter().sum::<f64>() / v.len() as f64;
        assert!((np_mean(&v) - naive).abs() < 1e-14);
        assert_eq!(np_mean(&[1.0, 2.0]), 1.5);
    }

    #[test]
    fn perfect_and_errors() {
        let r = refs(&[
            ("1", &["A dog runs on the grass.", "A dog is running."]),
            ("2", &["Two cats sleep on a sofa.", "Cats sleeping."]),
            ("3", &["A red bus on the street.", "A bus."]),
        ]);
        let c: Cands = [
            ("1", "a dog runs on the grass"),
            ("2", "two cats sleep on a sofa"),
            ("3", "A red bus on the street!"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let s = score(&r, &c, false).unwrap();
        assert!(s.bleu.iter().all(|&b| b > 0.99), "{:?}", s.bleu);
        assert!(s.rouge_l > 0.99);
        assert!(s.cider > 1.0);
        assert_eq!(s.meteor, None);
        assert!(s.meteor_note.is_some());
        assert_eq!(s.per_image_cider.len(), 3);
        let j = s.to_json();
        assert!(j["per_image"]["2"]["CIDEr"].is_number());
        assert!(s.table().contains("| BLEU-1 |"));

        // only candidate images are evaluated; a candidate without refs is an error
        let mut c2 = c.clone();
        c2.remove("3");
        assert_eq!(score(&r, &c2, false).unwrap().n_images, 2);
        c2.insert("9".into(), "x".into());
        assert!(score(&r, &c2, false).is_err());
        assert!(score(&r, &Cands::new(), false).is_err());
    }

    #[test]
    fn loaders() {
        let dir = std::env::temp_dir().join(format!("clipcap-eval-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.json");
        std::fs::write(
            &a,
            r#"{"images":[{"id":1},{"id":"x"}],"annotations":[{"image_id":1,"id":5,"caption":"a b"},{"image_id":"x","caption":"c"},{"image_id":1,"caption":"d"}]}"#,
        )
        .unwrap();
        let r = load_coco_refs(&a).unwrap();
        assert_eq!(r["1"], ["a b", "d"]);
        assert_eq!(r["x"], ["c"]);
        let b = dir.join("b.json");
        std::fs::write(
            &b,
            r#"[{"image_id":1,"caption":"a"},{"image_id":"x","caption":"b"}]"#,
        )
        .unwrap();
        let c = load_coco_results(&b).unwrap();
        assert_eq!(c["1"], "a");
        std::fs::write(
            &b,
            r#"[{"image_id":1,"caption":"a"},{"image_id":1,"caption":"b"}]"#,
        )
        .unwrap();
        assert!(load_coco_results(&b).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
