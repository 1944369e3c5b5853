//! A prepared dataset (`clipcap prepare` output) as training batches.
//!
//! ```text
//! embeddings.safetensors   tensor "embeddings" [N, D] (f32), one row per image
//! captions.jsonl           {"caption", "image_id", "row", "split"} per caption
//! meta.json                encoder hash, preprocessing, counts, skipped files, source bundle
//! references.json          the captions in COCO's annotation format (`clipcap score --refs`)
//! ```
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::BufRead;
use std::path::Path;
use tch::{Device, Kind, Tensor};
use tokenizers::Tokenizer;

pub const EMBEDDINGS: &str = "embeddings.safetensors";
pub const CAPTIONS: &str = "captions.jsonl";
pub const META: &str = "meta.json";
/// The captions as a COCO annotation file, for `clipcap score --refs`.
pub const REFERENCES: &str = "references.json";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaptionRecord {
    pub caption: String,
    pub image_id: String,
    pub row: i64,
    pub split: String,
}

/// What `prepare` records about how the features were made.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DatasetMeta {
    /// Bundle whose encoder made the features (its encoder and tokenizer go into trained bundles).
    pub bundle: String,
    pub encoder_sha256: String,
    pub embedding_dim: i64,
    pub images: usize,
    pub captions: usize,
    #[serde(default)]
    pub splits: std::collections::BTreeMap<String, usize>,
    #[serde(default)]
    pub skipped: Vec<Skipped>,
    #[serde(default)]
    pub preprocessing: serde_json::Value,
    #[serde(default)]
    pub sources: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// Captions of one split, tokenized, with their image rows.
pub struct Split {
    /// Token ids per caption (already cut to `max_len`, `<|endoftext|>` appended if asked).
    pub tokens: Vec<Vec<i64>>,
    pub rows: Vec<i64>,
}

pub struct Dataset {
    pub embeddings: Tensor,
    pub meta: DatasetMeta,
    pub records: Vec<CaptionRecord>,
}

impl Dataset {
    /// The f32 embeddings of `rows`, one vector each (what the engine takes).
    pub fn embedding_rows(&self, rows: &[i64]) -> Vec<Vec<f32>> {
        crate::model::weights::tensor_rows(
            &self.embeddings.index_select(0, &Tensor::from_slice(rows)),
        )
    }

    pub fn open(dir: &Path) -> Result<Self> {
        let meta: DatasetMeta = serde_json::from_str(
            &std::fs::read_to_string(dir.join(META))
                .with_context(|| format!("reading {}", dir.join(META).display()))?,
        )
        .with_context(|| format!("parsing {}", dir.join(META).display()))?;
        let file = dir.join(EMBEDDINGS);
        let tensors = crate::model::weights::read_safetensors(&file)?;
        let embeddings = tensors
            .get("embeddings")
            .with_context(|| format!("{}: no tensor \"embeddings\"", file.display()))?
            .to_kind(Kind::Float);
        // What meta.json claims must be what the file holds: every later check (train, eval)
        // trusts the claim, and a tensor op on the wrong width only panics.
        let shape = embeddings.size();
        if shape.len() != 2 {
            bail!(
                "{}: embeddings are {shape:?}, not [images, width]",
                file.display()
            );
        }
        if meta.embedding_dim != shape[1] {
            bail!(
                "{}: the embeddings are {}-wide but meta.json says {} (an interrupted or mixed prepare? run clipcap prepare --overwrite)",
                dir.display(),
                shape[1],
                meta.embedding_dim
            );
        }
        let n = shape[0];
        let f = std::fs::File::open(dir.join(CAPTIONS))
            .with_context(|| format!("reading {}", dir.join(CAPTIONS).display()))?;
        let mut records = vec![];
        for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let r: CaptionRecord = serde_json::from_str(&line)
                .with_context(|| format!("{} line {}", CAPTIONS, i + 1))?;
            if r.row < 0 || r.row >= n {
                bail!(
                    "{} line {}: row {} outside the {n} embeddings",
                    CAPTIONS,
                    i + 1,
                    r.row
                );
            }
            records.push(r);
        }
        Ok(Dataset {
            embeddings,
            meta,
            records,
        })
    }

    /// Refuses a bundle whose encoder did not make these features: another width (its
    /// mapper could not take them) or another encoder file (same width, nonsense captions).
    /// Checked before any tensor op; `dir` and `bundle` only name things in the message.
    pub fn check_encoder(
        &self,
        dir: &Path,
        bundle: &Path,
        width: i64,
        encoder: &Path,
    ) -> Result<()> {
        let have = self.embeddings.size()[1];
        if have != width {
            bail!(
                "{} holds {have}-value embeddings but {}'s encoder gives {width} (prepared with another encoder?)",
                dir.display(),
                bundle.display()
            );
        }
        if !self.meta.encoder_sha256.is_empty()
            && crate::fsutil::sha256_file(encoder)? != self.meta.encoder_sha256
        {
            bail!(
                "{} was prepared with another image encoder than {}'s (sha256 differs)",
                dir.display(),
                bundle.display()
            );
        }
        Ok(())
    }

    pub fn has_split(&self, split: &str) -> bool {
        self.records.iter().any(|r| r.split == split)
    }

    /// Tokenizes the captions of `splits` (ClipCap's dataset: plain GPT-2 encoding).
    pub fn tokenize(&self, tok: &Tokenizer, splits: &[&str], eos: Option<i64>) -> Result<Split> {
        let mut tokens = vec![];
        let mut rows = vec![];
        for r in self
            .records
            .iter()
            .filter(|r| splits.contains(&r.split.as_str()))
        {
            let enc = tok
                .encode(r.caption.as_str(), false)
                .map_err(|e| anyhow::anyhow!("tokenizing {:?}: {e}", r.caption))?;
            let mut ids: Vec<i64> = enc.get_ids().iter().map(|&i| i as i64).collect();
            if let Some(e) = eos {
                ids.push(e);
            }
            tokens.push(ids);
            rows.push(r.row);
        }
        Ok(Split { tokens, rows })
    }
}

/// ClipCap's caption length limit: `min(mean + 10·std, max)` of the token counts.
pub fn max_seq_len(tokens: &[Vec<i64>]) -> usize {
    if tokens.is_empty() {
        return 1;
    }
    let lens: Vec<f64> = tokens.iter().map(|t| t.len() as f64).collect();
    let n = lens.len() as f64;
    let mean = lens.iter().sum::<f64>() / n;
    // torch.std is the unbiased estimate.
    let var = if lens.len() > 1 {
        lens.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    let max = lens.iter().cloned().fold(0.0, f64::max);
    ((mean + 10.0 * var.sqrt()) as usize)
        .min(max as usize)
        .max(1)
}

/// A padded batch: tokens `[B, T]` (pads are 0), mask `[B, T]` of real tokens, and the CLIP
/// embeddings `[B, D]`.
pub struct Batch {
    pub tokens: Tensor,
    pub mask: Tensor,
    pub clip: Tensor,
}

impl Split {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Builds the batch of captions `idx`, cutting each to `max_len` tokens.
    pub fn batch(
        &self,
        idx: &[usize],
        max_len: usize,
        embeddings: &Tensor,
        device: Device,
    ) -> Batch {
        let t = idx
            .iter()
            .map(|&i| self.tokens[i].len().min(max_len))
            .max()
            .unwrap_or(1)
            .max(1);
        let mut toks = vec![0i64; idx.len() * t];
        let mut mask = vec![0f32; idx.len() * t];
        for (b, &i) in idx.iter().enumerate() {
            for (j, &id) in self.tokens[i].iter().take(max_len).enumerate() {
                toks[b * t + j] = id;
                mask[b * t + j] = 1.0;
            }
        }
        let rows: Vec<i64> = idx.iter().map(|&i| self.rows[i]).collect();
        let b = idx.len() as i64;
        Batch {
            tokens: Tensor::from_slice(&toks)
                .view([b, t as i64])
                .to_device(device),
            mask: Tensor::from_slice(&mask)
                .view([b, t as i64])
                .to_device(device),
            clip: embeddings
                .index_select(0, &Tensor::from_slice(&rows))
                .to_device(device),
        }
    }
}
