//! `clipcap score` (COCO results against COCO references) and `clipcap eval` (caption a
//! prepared split with a bundle, then score it).
use crate::options::DecodeOptions;
use crate::train::data::Dataset;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// COCO annotation file with the reference captions.
    #[arg(long)]
    pub refs: PathBuf,
    /// COCO results file: [{"image_id", "caption"}].
    #[arg(long)]
    pub cands: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Skip METEOR even when Java and its jar are available.
    #[arg(long = "no-meteor")]
    pub no_meteor: bool,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model bundle.
    #[arg(long)]
    pub model: PathBuf,
    /// Prepared dataset (clipcap prepare) made with this bundle's encoder.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Write the captions as COCO results here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub decode: DecodeOptions,
    #[arg(long, default_value = "cpu")]
    pub device: crate::device::DeviceChoice,
    #[arg(long, default_value = "f32")]
    pub dtype: crate::device::DtypeChoice,
    /// Images decoded together.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long)]
    pub json: bool,
    #[arg(long = "no-meteor")]
    pub no_meteor: bool,
    /// Caption at most this many images (0 = all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
}

pub fn score(a: ScoreArgs) -> Result<()> {
    let refs = super::load_coco_refs(&a.refs)?;
    let cands = super::load_coco_results(&a.cands)?;
    let s = super::score(&refs, &cands, !a.no_meteor)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s.to_json())?);
    } else {
        println!("{}", s.table());
        if let Some(note) = &s.meteor_note {
            println!("METEOR: {note}");
        }
    }
    Ok(())
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let data = Dataset::open(&a.data)?;
    let (engine, model) =
        crate::engine::Engine::local(&a.model, a.device, a.dtype, a.batch, u64::MAX)?;
    let opts = a
        .decode
        .resolve(&model.generation)
        .map_err(crate::options::OptionError::for_flags)?;
    // Features from another encoder would silently give nonsense captions.
    let manifest = crate::model::bundle::Manifest::read(&a.model)?;
    data.check_encoder(
        &a.data,
        &a.model,
        model.embedding_dim,
        &a.model.join(&manifest.files.encoder),
    )?;
    let mut refs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut rows: BTreeMap<String, i64> = BTreeMap::new();
    for r in data.records.iter().filter(|r| r.split == a.split) {
        refs.entry(r.image_id.clone())
            .or_default()
            .push(r.caption.clone());
        rows.insert(r.image_id.clone(), r.row);
    }
    if rows.is_empty() {
        bail!("no captions of split {:?} in {}", a.split, a.data.display());
    }
    let mut ids: Vec<String> = rows.keys().cloned().collect();
    if a.limit > 0 {
        ids.truncate(a.limit);
    }
    let bar = indicatif::ProgressBar::new(ids.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "captioning [{bar:30}] {pos}/{len} images, {per_sec}, ETA {eta}",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    let mut cands = BTreeMap::new();
    let t0 = std::time::Instant::now();
    for chunk in ids.chunks(a.batch.max(1)) {
        let idx: Vec<i64> = chunk.iter().map(|id| rows[id]).collect();
        let out = engine
            .caption_embeddings_blocking(&model, data.embedding_rows(&idx), opts.clone())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for (id, img) in chunk.iter().zip(out.images) {
            cands.insert(
                id.clone(),
                img.captions
                    .first()
                    .map(|c| c.text.clone())
                    .unwrap_or_default(),
            );
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish();
    let secs = t0.elapsed().as_secs_f64();
    engine.shutdown();
    if let Some(out) = &a.out {
        let results: Vec<_> = cands
            .iter()
            .map(|(id, c)| serde_json::json!({"image_id": id.parse::<i64>().map(serde_json::Value::from).unwrap_or(serde_json::json!(id)), "caption": c}))
            .collect();
        crate::fsutil::write_atomic(out, serde_json::to_string_pretty(&results)?.as_bytes())
            .with_context(|| format!("writing {}", out.display()))?;
    }
    let refs: super::Refs = refs
        .into_iter()
        .filter(|(k, _)| cands.contains_key(k))
        .collect();
    let s = super::score(&refs, &cands, !a.no_meteor)?;
    if a.json {
        let mut v = s.to_json();
        v["images"] = serde_json::json!(cands.len());
        v["strategy"] = serde_json::json!(opts.strategy);
        v["seconds"] = serde_json::json!(secs);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{} images of split {:?}, {:?} decoding, {:.1} images/s",
            cands.len(),
            a.split,
            opts.strategy,
            cands.len() as f64 / secs
        );
        println!("{}", s.table());
        if let Some(note) = &s.meteor_note {
            println!("METEOR: {note}");
        }
    }
    Ok(())
}
