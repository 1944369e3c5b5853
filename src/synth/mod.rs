//! Deterministic synthetic image-captioning dataset ("synth").
//!
//! Every image shows 1 to 3 flat, antialiased shapes (circle, square,
//! triangle, star, cross) in one of six colours on a white, gray or black,
//! lightly textured and noisy background.  Each image comes with five short
//! captions that are true for the scene and mostly determined by it, so the
//! whole pipeline (feature extraction, ClipCap training, BLEU/CIDEr
//! evaluation) can be exercised without downloads.
//!
//! Image sizes vary independently between 160 and 480 px per side (landscape,
//! portrait and square), but every object lies strictly inside the central
//! `min(w, h)` square, i.e. the region a CLIP-style "resize shorter side,
//! center crop" keeps, so the captions stay true after preprocessing.  Words
//! like "left", "top", "above" refer to that square (and equally to the full
//! image, whose center it shares).
//!
//! Output layout of [`generate`] in `out`:
//! - `images/synth_NNNNNN.png` (every 5th image, index % 5 == 4, is a `.jpg`)
//! - `annotations/captions_synth.json`: COCO caption format; `file_name` is
//!   relative to `images/`
//! - `dataset_coco.json`: Karpathy-split format (`filepath` = `"images"`),
//!   ~80/10/10 train/val/test
//! - `scenes.jsonl`: one JSON object per image with the scene parameters
//!
//! Generation is a pure function of [`SynthConfig`]: the same seed gives
//! byte-identical files (for the pinned `rand`/`image` versions).
//!
//! One concern per file: `scene` (the scene model and its random draw),
//! `render` (pixels, PNG/JPEG encoding), `captions` (caption templates,
//! tokens) and `writers` (the output files); this file holds the
//! configuration and the order of the steps. Everything public is
//! re-exported here, so callers only ever name `crate::synth::…`.

mod captions;
mod render;
mod scene;
mod writers;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

pub use captions::{scene_captions, tokenize, CAPTIONS_PER_IMAGE};
pub use render::render;
pub use scene::{
    random_scene, Background, Color, Layout, Position, Scene, SceneObject, Shape, Size, MAX_SIDE,
    MIN_SIDE,
};
pub use writers::image_file_name;

/// Generation parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SynthConfig {
    /// Number of images to generate.
    pub images: usize,
    /// Seed of the pseudo-random generator.
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            images: 1000,
            seed: 0,
        }
    }
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SynthSummary {
    /// Number of images written.
    pub images: usize,
    /// Number of captions written (5 per image).
    pub captions: usize,
    /// Images per split: always has the keys `train`, `val` and `test`.
    pub splits: BTreeMap<String, usize>,
}

/// Generates the dataset into `out` (created if missing). Existing files with
/// the same names are replaced.
pub fn generate(out: &Path, cfg: &SynthConfig) -> Result<SynthSummary> {
    let images_dir = out.join("images");
    let ann_dir = out.join("annotations");
    for d in [&images_dir, &ann_dir] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }

    // One generator for all scenes, then the split: the order of these draws fixes the output.
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let scenes: Vec<Scene> = (0..cfg.images).map(|_| random_scene(&mut rng)).collect();
    let splits = writers::assign_splits(cfg.images, &mut rng);
    let names: Vec<String> = (0..cfg.images).map(image_file_name).collect();
    let captions: Vec<Vec<String>> = scenes.iter().map(scene_captions).collect();

    writers::write_images(&images_dir, &scenes, &names)?;
    writers::write_coco(
        &ann_dir.join("captions_synth.json"),
        cfg.seed,
        &scenes,
        &names,
        &captions,
    )?;
    writers::write_karpathy(&out.join("dataset_coco.json"), &names, &splits, &captions)?;
    writers::write_scene_lines(&out.join("scenes.jsonl"), &scenes, &names, &splits)?;

    let mut split_counts: BTreeMap<String, usize> = ["train", "val", "test"]
        .iter()
        .map(|s| (s.to_string(), 0))
        .collect();
    for s in &splits {
        *split_counts.entry(s.to_string()).or_default() += 1;
    }
    Ok(SynthSummary {
        images: cfg.images,
        captions: captions.iter().map(Vec::len).sum(),
        splits: split_counts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh, empty temporary directory (removed by the caller).
    fn temp_dir(tag: &str) -> PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let k = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("clipcap-synth-{tag}-{}-{k}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn read_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p.strip_prefix(dir).unwrap().to_string_lossy().to_string();
                    out.insert(rel, fs::read(&p).unwrap());
                }
            }
        }
        out
    }

    #[test]
    fn deterministic_output() {
        let cfg = SynthConfig {
            images: 12,
            seed: 7,
        };
        let (a, b) = (temp_dir("a"), temp_dir("b"));
        let sa = generate(&a, &cfg).unwrap();
        let sb = generate(&b, &cfg).unwrap();
        assert_eq!(sa, sb);
        let (ta, tb) = (read_tree(&a), read_tree(&b));
        // 12 images + 3 JSON files, no temporary leftovers.
        assert_eq!(ta.len(), 15, "{:?}", ta.keys().collect::<Vec<_>>());
        assert!(ta.keys().all(|k| !k.contains(".tmp")));
        assert_eq!(ta, tb);

        let c = temp_dir("c");
        generate(
            &c,
            &SynthConfig {
                images: 12,
                seed: 8,
            },
        )
        .unwrap();
        assert_ne!(ta, read_tree(&c));
        for d in [a, b, c] {
            fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn files_are_consistent() {
        let cfg = SynthConfig {
            images: 20,
            seed: 3,
        };
        let dir = temp_dir("files");
        let summary = generate(&dir, &cfg).unwrap();
        assert_eq!(summary.images, 20);
        assert_eq!(summary.captions, 100);
        assert_eq!(summary.splits.values().sum::<usize>(), 20);
        assert_eq!(summary.splits["test"], 2);
        assert_eq!(summary.splits["val"], 2);
        assert_eq!(summary.splits["train"], 16);

        let coco: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("annotations/captions_synth.json")).unwrap())
                .unwrap();
        let images = coco["images"].as_array().unwrap();
        assert_eq!(images.len(), 20);
        assert_eq!(coco["annotations"].as_array().unwrap().len(), 100);
        for im in images {
            let path = dir.join("images").join(im["file_name"].as_str().unwrap());
            let decoded = image::open(&path).unwrap();
            assert_eq!(decoded.width() as u64, im["width"].as_u64().unwrap());
            assert_eq!(decoded.height() as u64, im["height"].as_u64().unwrap());
        }
        assert!(images
            .iter()
            .any(|im| im["file_name"].as_str().unwrap().ends_with(".jpg")));

        let karpathy: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("dataset_coco.json")).unwrap()).unwrap();
        assert_eq!(karpathy["dataset"], "synth");
        let kimgs = karpathy["images"].as_array().unwrap();
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let mut sentids = BTreeSet::new();
        for im in kimgs {
            *counts
                .entry(im["split"].as_str().unwrap().to_string())
                .or_default() += 1;
            let sents = im["sentences"].as_array().unwrap();
            assert_eq!(sents.len(), CAPTIONS_PER_IMAGE);
            assert_eq!(im["sentids"].as_array().unwrap().len(), CAPTIONS_PER_IMAGE);
            for s in sents {
                assert_eq!(s["imgid"], im["imgid"]);
                assert!(sentids.insert(s["sentid"].as_u64().unwrap()));
                let toks: Vec<&str> = s["tokens"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_str().unwrap())
                    .collect();
                assert!(toks.iter().all(|t| t
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())));
                assert_eq!(tokenize(s["raw"].as_str().unwrap()), toks);
            }
            assert!(dir
                .join(im["filepath"].as_str().unwrap())
                .join(im["filename"].as_str().unwrap())
                .is_file());
        }
        assert_eq!(counts, summary.splits);

        let lines = fs::read_to_string(dir.join("scenes.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 20);
        for line in lines.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(!v["objects"].as_array().unwrap().is_empty());
        }
        fs::remove_dir_all(dir).unwrap();
    }
}
