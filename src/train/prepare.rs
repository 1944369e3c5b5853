//! `clipcap prepare`: CLIP features of an image+caption dataset, computed once.
//!
//! Inputs: COCO caption annotations + image folders (optionally restricted and split by a
//! Karpathy `dataset_coco.json`), ClipCap's `train_caption.json`, or a JSON-lines file. Each
//! image is encoded once however many captions it has. Work is chunked: each finished chunk is
//! written atomically under `chunks/`, so an interrupted run resumes losing at most one chunk.
use crate::model::bundle::Bundle;
use crate::train::data::{
    CaptionRecord, DatasetMeta, Skipped, CAPTIONS, EMBEDDINGS, META, REFERENCES,
};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

#[derive(Args, Debug, Clone)]
pub struct PrepareArgs {
    /// Bundle whose image encoder makes the features.
    #[arg(long)]
    pub model: PathBuf,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// COCO caption annotation files (captions_*.json); repeatable.
    #[arg(long = "coco-captions")]
    pub coco_captions: Vec<PathBuf>,
    /// Folders where image files are looked up (also their sub-folders named in the inputs).
    #[arg(long = "images")]
    pub images: Vec<PathBuf>,
    /// Karpathy split file (dataset_coco.json): restricts and splits the COCO images.
    #[arg(long)]
    pub karpathy: Option<PathBuf>,
    /// ClipCap's train_caption.json ([{"image_id", "caption"}], COCO file names).
    #[arg(long = "clipcap-json")]
    pub clipcap_json: Option<PathBuf>,
    /// JSON lines {"image": path relative to the file, "caption", "split"?}.
    #[arg(long)]
    pub jsonl: Option<PathBuf>,
    /// Split for captions whose source names none.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: crate::device::DeviceChoice,
    /// f32, f16, bf16 or auto (f16 on CUDA, f32 on the CPU).
    #[arg(long, default_value = "f32")]
    pub dtype: crate::device::DtypeChoice,
    /// Images per encoder forward.
    #[arg(long = "batch-size", default_value_t = 64)]
    pub batch_size: usize,
    /// Images per resumable chunk.
    #[arg(long = "chunk-size", default_value_t = 512)]
    pub chunk_size: usize,
    #[arg(long = "max-pixels", default_value_t = 40_000_000)]
    pub max_pixels: u64,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Start over when --out holds chunks made with another encoder or preprocessing
    /// (refused otherwise).
    #[arg(long)]
    pub overwrite: bool,
}

/// One image to encode and its captions.
#[derive(Clone, Debug)]
struct Item {
    id: String,
    path: PathBuf,
    captions: Vec<(String, String)>, // (caption, split)
}

#[derive(Serialize, Deserialize)]
struct ChunkInfo {
    /// Image ids of the chunk in order (a resumed run checks it is the same work).
    ids: Vec<String>,
    /// Which of them were encoded (row in the chunk tensor) or skipped.
    rows: Vec<Option<i64>>,
    skipped: Vec<Skipped>,
    /// What made the chunk (encoder hash and preprocessing, see [`work_key`]); a chunk is
    /// reused only by a run with the same key.
    #[serde(default)]
    work: String,
}

/// The encoder's hash and the preprocessing, hashed: chunks from another key are other data.
fn work_key(encoder_sha256: &str, preprocessing: &serde_json::Value, max_pixels: u64) -> String {
    use sha2::{Digest, Sha256};
    let text = format!("{encoder_sha256}\n{preprocessing}\n{max_pixels}");
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Refuses (or with `overwrite` clears) chunks in `chunks_dir` that another encoder or
/// preprocessing made, before any is resumed.
fn check_chunks(chunks_dir: &Path, key: &str, overwrite: bool) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(chunks_dir) else {
        return Ok(());
    };
    let foreign = entries.flatten().any(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        name.starts_with("chunk_")
            && name.ends_with(".json")
            && std::fs::read_to_string(e.path())
                .ok()
                .and_then(|t| serde_json::from_str::<ChunkInfo>(&t).ok())
                .is_none_or(|info| info.work != key)
    });
    if !foreign {
        return Ok(());
    }
    if !overwrite {
        bail!(
            "{} holds chunks made with another image encoder or preprocessing; \
             pass --overwrite to start over (or choose another --out)",
            chunks_dir.parent().unwrap_or(chunks_dir).display()
        );
    }
    std::fs::remove_dir_all(chunks_dir)
        .with_context(|| format!("clearing {}", chunks_dir.display()))?;
    std::fs::create_dir_all(chunks_dir)?;
    Ok(())
}

pub fn run(a: PrepareArgs) -> Result<()> {
    let device = a.device.resolve()?;
    let kind = a.dtype.resolve(device)?;
    let items = collect(&a)?;
    if items.is_empty() {
        bail!("no images with captions found in the inputs");
    }
    let bundle = Arc::new(Bundle::load(&a.model, device, kind)?);
    prepare(&a, &bundle, items)
}

fn resolve_image(dirs: &[PathBuf], rel: &str, extra: &[&str]) -> PathBuf {
    for d in dirs {
        for sub in std::iter::once("").chain(extra.iter().copied()) {
            let p = d.join(sub).join(rel);
            if p.exists() {
                return p;
            }
        }
    }
    dirs.first()
        .map(|d| d.join(rel))
        .unwrap_or_else(|| PathBuf::from(rel))
}

fn id_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn read_json(p: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

/// Gathers the images and their captions from every input, in a stable order.
fn collect(a: &PrepareArgs) -> Result<Vec<Item>> {
    let mut items: BTreeMap<String, Item> = BTreeMap::new();
    // Karpathy: cocoid → (split, filepath/filename, sentences).
    let mut karpathy: HashMap<String, (String, String, Vec<String>)> = HashMap::new();
    if let Some(k) = &a.karpathy {
        let v = read_json(k)?;
        for img in v["images"]
            .as_array()
            .context("Karpathy file: no images array")?
        {
            let id = id_string(
                img.get("cocoid")
                    .or_else(|| img.get("imgid"))
                    .unwrap_or(&Value::Null),
            );
            let mut split = img["split"].as_str().unwrap_or("train").to_string();
            if split == "restval" {
                split = "train".into();
            }
            let rel = match img["filepath"].as_str() {
                Some(fp) => format!("{fp}/{}", img["filename"].as_str().unwrap_or("")),
                None => img["filename"].as_str().unwrap_or("").to_string(),
            };
            let sents = img["sentences"]
                .as_array()
                .map(|s| {
                    s.iter()
                        .filter_map(|x| x["raw"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            karpathy.insert(id, (split, rel, sents));
        }
    }
    for file in &a.coco_captions {
        let v = read_json(file)?;
        let mut names = HashMap::new();
        for img in v["images"]
            .as_array()
            .context("COCO file: no images array")?
        {
            names.insert(
                id_string(&img["id"]),
                img["file_name"].as_str().unwrap_or("").to_string(),
            );
        }
        for ann in v["annotations"]
            .as_array()
            .context("COCO file: no annotations array")?
        {
            let id = id_string(&ann["image_id"]);
            let caption = ann["caption"].as_str().unwrap_or("").trim().to_string();
            let (split, rel) = if a.karpathy.is_some() {
                match karpathy.get(&id) {
                    Some((s, rel, _)) => (s.clone(), rel.clone()),
                    None => continue,
                }
            } else {
                (a.split.clone(), names.get(&id).cloned().unwrap_or_default())
            };
            let file_name = names.get(&id).cloned().unwrap_or(rel.clone());
            let item = items.entry(id.clone()).or_insert_with(|| Item {
                id: id.clone(),
                path: resolve_image(&a.images, &file_name, &["train2014", "val2014", "images"]),
                captions: vec![],
            });
            if item.path.exists() || rel.is_empty() {
            } else {
                item.path = resolve_image(&a.images, &rel, &[]);
            }
            item.captions.push((caption, split));
        }
    }
    if a.coco_captions.is_empty() && a.karpathy.is_some() {
        // The Karpathy file alone carries the captions.
        for (id, (split, rel, sents)) in &karpathy {
            let item = items.entry(id.clone()).or_insert_with(|| Item {
                id: id.clone(),
                path: resolve_image(&a.images, rel, &[]),
                captions: vec![],
            });
            for s in sents {
                item.captions.push((s.trim().to_string(), split.clone()));
            }
        }
    }
    if let Some(f) = &a.clipcap_json {
        let v = read_json(f)?;
        for e in v
            .as_array()
            .context("train_caption.json must be an array")?
        {
            let id = id_string(&e["image_id"]);
            let n: u64 = id.parse().unwrap_or(0);
            let item = items.entry(id.clone()).or_insert_with(|| {
                let candidates = [
                    format!("COCO_train2014_{n:012}.jpg"),
                    format!("COCO_val2014_{n:012}.jpg"),
                    format!("{n:012}.jpg"),
                ];
                let path = candidates
                    .iter()
                    .map(|c| resolve_image(&a.images, c, &["train2014", "val2014"]))
                    .find(|p| p.exists())
                    .unwrap_or_else(|| resolve_image(&a.images, &candidates[0], &[]));
                Item {
                    id: id.clone(),
                    path,
                    captions: vec![],
                }
            });
            item.captions.push((
                e["caption"].as_str().unwrap_or("").trim().to_string(),
                a.split.clone(),
            ));
        }
    }
    if let Some(f) = &a.jsonl {
        let base = f.parent().unwrap_or(Path::new("."));
        let file = std::fs::File::open(f).with_context(|| format!("reading {}", f.display()))?;
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(&line)
                .with_context(|| format!("{} line {}", f.display(), i + 1))?;
            let rel = v["image"]
                .as_str()
                .with_context(|| format!("{} line {}: no \"image\"", f.display(), i + 1))?;
            let caption = v["caption"]
                .as_str()
                .with_context(|| format!("{} line {}: no \"caption\"", f.display(), i + 1))?;
            let split = v["split"].as_str().unwrap_or(&a.split).to_string();
            let item = items.entry(rel.to_string()).or_insert_with(|| Item {
                id: rel.to_string(),
                path: base.join(rel),
                captions: vec![],
            });
            item.captions.push((caption.trim().to_string(), split));
        }
    }
    Ok(items
        .into_values()
        .filter(|i| !i.captions.is_empty())
        .collect())
}

/// The captions as a COCO caption annotation file: what `clipcap score --refs` reads, and
/// what `clipcap eval --out` results are scored against (ids that are integers stay integers).
fn coco_references(records: &[CaptionRecord]) -> Value {
    let id = |s: &str| {
        s.parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::from(s))
    };
    let mut images: BTreeMap<&str, &str> = BTreeMap::new();
    let annotations: Vec<Value> = records
        .iter()
        .enumerate()
        .map(|(n, r)| {
            images.entry(&r.image_id).or_insert(&r.split);
            serde_json::json!({"image_id": id(&r.image_id), "id": n, "caption": r.caption, "split": r.split})
        })
        .collect();
    let images: Vec<Value> = images
        .into_iter()
        .map(|(i, split)| serde_json::json!({"id": id(i), "file_name": i, "split": split}))
        .collect();
    serde_json::json!({
        "info": {"description": "written by clipcap prepare"},
        "images": images,
        "annotations": annotations,
    })
}

fn prepare(a: &PrepareArgs, bundle: &Arc<Bundle>, items: Vec<Item>) -> Result<()> {
    let chunks_dir = a.out.join("chunks");
    let encoder_sha256 =
        crate::fsutil::sha256_file(&bundle.dir.join(&bundle.manifest.files.encoder))?;
    let preprocessing = serde_json::json!({
        "size": bundle.manifest.image.size, "mean": bundle.manifest.image.mean, "std": bundle.manifest.image.std,
        "resize": "shorter side, bicubic (PIL), center crop", "exif_orientation": true,
    });
    let key = work_key(&encoder_sha256, &preprocessing, a.max_pixels);
    check_chunks(&chunks_dir, &key, a.overwrite)?;
    std::fs::create_dir_all(&chunks_dir)?;
    let cfg = crate::engine::pipeline::preprocess_config(&bundle.manifest.image, a.max_pixels);
    let n_chunks = items.len().div_ceil(a.chunk_size.max(1));
    let bar = if a.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(items.len() as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} images, {per_sec}, ETA {eta}",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    bar.set_message("encoding");
    let mut resumed = 0;
    for (ci, chunk) in items.chunks(a.chunk_size.max(1)).enumerate() {
        let info_path = chunks_dir.join(format!("chunk_{ci:06}.json"));
        let ids: Vec<String> = chunk.iter().map(|i| i.id.clone()).collect();
        if let Ok(text) = std::fs::read_to_string(&info_path) {
            if let Ok(info) = serde_json::from_str::<ChunkInfo>(&text) {
                if info.ids == ids
                    && info.work == key
                    && chunks_dir
                        .join(format!("chunk_{ci:06}.safetensors"))
                        .exists()
                {
                    resumed += 1;
                    bar.inc(chunk.len() as u64);
                    continue;
                }
            }
        }
        let bytes: Vec<Vec<u8>> = chunk
            .iter()
            .map(|i| std::fs::read(&i.path).unwrap_or_default())
            .collect();
        let pixels = crate::engine::pipeline::preprocess_many(&bytes, &cfg);
        let mut ok: Vec<&[f32]> = vec![];
        let mut rows = vec![];
        let mut skipped = vec![];
        for (item, p) in chunk.iter().zip(&pixels) {
            match p {
                Ok(px) => {
                    rows.push(Some(ok.len() as i64));
                    ok.push(px.as_slice());
                }
                Err(e) => {
                    let reason = if item.path.exists() {
                        e.to_string()
                    } else {
                        "file not found".to_string()
                    };
                    rows.push(None);
                    skipped.push(Skipped {
                        path: item.path.display().to_string(),
                        reason,
                    });
                }
            }
        }
        let emb =
            crate::engine::pipeline::encode(bundle, &ok, a.batch_size)?.to_device(Device::Cpu);
        let tpath = chunks_dir.join(format!("chunk_{ci:06}.safetensors"));
        crate::fsutil::replace_with(&tpath, |tmp| {
            Ok(Tensor::write_safetensors(&[("embeddings", &emb)], tmp)?)
        })?;
        let info = ChunkInfo {
            ids,
            rows,
            skipped,
            work: key.clone(),
        };
        crate::fsutil::write_atomic(&info_path, &serde_json::to_vec(&info)?)?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_with_message("encoded");
    // Merge the chunks into the final files.
    let mut parts = vec![];
    let mut records = vec![];
    let mut skipped_all = vec![];
    let mut row_base = 0i64;
    let mut splits: BTreeMap<String, usize> = BTreeMap::new();
    for (ci, chunk) in items.chunks(a.chunk_size.max(1)).enumerate() {
        let info: ChunkInfo = serde_json::from_str(&std::fs::read_to_string(
            chunks_dir.join(format!("chunk_{ci:06}.json")),
        )?)?;
        let t = crate::model::weights::read_safetensors(
            &chunks_dir.join(format!("chunk_{ci:06}.safetensors")),
        )?;
        let e = t["embeddings"].shallow_clone();
        let n = e.size()[0];
        parts.push(e);
        for (item, row) in chunk.iter().zip(&info.rows) {
            if let Some(r) = row {
                for (caption, split) in &item.captions {
                    *splits.entry(split.clone()).or_default() += 1;
                    records.push(CaptionRecord {
                        caption: caption.clone(),
                        image_id: item.id.clone(),
                        row: row_base + r,
                        split: split.clone(),
                    });
                }
            }
        }
        skipped_all.extend(info.skipped);
        row_base += n;
    }
    let embeddings = if parts.is_empty() {
        Tensor::zeros([0, bundle.encoder.dim], (Kind::Float, Device::Cpu))
    } else {
        Tensor::cat(&parts, 0)
    };
    let epath = a.out.join(EMBEDDINGS);
    crate::fsutil::replace_with(&epath, |tmp| {
        Ok(Tensor::write_safetensors(
            &[("embeddings", &embeddings)],
            tmp,
        )?)
    })?;
    let mut lines = String::new();
    for r in &records {
        lines.push_str(&serde_json::to_string(r)?);
        lines.push('\n');
    }
    crate::fsutil::write_atomic(&a.out.join(CAPTIONS), lines.as_bytes())?;
    crate::fsutil::write_atomic(
        &a.out.join(REFERENCES),
        &serde_json::to_vec(&coco_references(&records))?,
    )?;
    let mut sources = vec![];
    sources.extend(a.coco_captions.iter().map(|p| p.display().to_string()));
    sources.extend(a.karpathy.iter().map(|p| p.display().to_string()));
    sources.extend(a.clipcap_json.iter().map(|p| p.display().to_string()));
    sources.extend(a.jsonl.iter().map(|p| p.display().to_string()));
    let meta = DatasetMeta {
        bundle: std::fs::canonicalize(&a.model)
            .unwrap_or(a.model.clone())
            .display()
            .to_string(),
        encoder_sha256,
        embedding_dim: bundle.encoder.dim,
        images: row_base as usize,
        captions: records.len(),
        splits,
        skipped: skipped_all.clone(),
        preprocessing,
        sources,
    };
    crate::fsutil::write_atomic(
        &a.out.join(META),
        serde_json::to_string_pretty(&meta)?.as_bytes(),
    )?;
    println!(
        "prepared {} images, {} captions into {} ({} chunks, {} resumed, {} skipped)",
        row_base,
        records.len(),
        a.out.display(),
        n_chunks,
        resumed,
        skipped_all.len()
    );
    for s in skipped_all.iter().take(10) {
        println!("  skipped {}: {}", s.path, s.reason);
    }
    Ok(())
}
