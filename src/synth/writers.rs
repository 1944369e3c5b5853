//! Dataset files: image names and the train/val/test split, the rendered images, and the
//! three JSON files (COCO captions, Karpathy split, scene dump).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::Serialize;

use super::captions::{tokenize, CAPTIONS_PER_IMAGE};
use super::render::encode;
use super::scene::Scene;
use crate::fsutil;

/// File name of image `index` (every 5th image is a JPEG).
pub fn image_file_name(index: usize) -> String {
    let ext = if index % 5 == 4 { "jpg" } else { "png" };
    format!("synth_{index:06}.{ext}")
}

/// Deterministic ~80/10/10 split.
pub(super) fn assign_splits(n: usize, rng: &mut StdRng) -> Vec<&'static str> {
    let held = if n >= 3 {
        ((n as f64 * 0.1).round() as usize).max(1)
    } else {
        0
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    let mut splits = vec!["train"; n];
    for (k, &i) in order.iter().enumerate() {
        if k < held {
            splits[i] = "test";
        } else if k < 2 * held {
            splits[i] = "val";
        }
    }
    splits
}

/// Renders and writes all images, in parallel; the output does not depend on
/// the number of threads.
pub(super) fn write_images(dir: &Path, scenes: &[Scene], names: &[String]) -> Result<()> {
    let jobs: Vec<(&Scene, &String)> = scenes.iter().zip(names).collect();
    let failed = AtomicBool::new(false);
    let results = crate::parallel::map_chunks(&jobs, |&(scene, name)| {
        // Once one image failed the run fails anyway: skip the rest.
        if failed.load(Ordering::Relaxed) {
            return Ok(());
        }
        // No fsync per image: it would cost more than rendering one, and a crash only loses
        // files a rerun regenerates (the JSON files, written last, are synced).
        let r = encode(scene, name)
            .and_then(|bytes| fsutil::write_atomic_nosync(&dir.join(name), &bytes))
            .with_context(|| format!("image {name}"));
        if r.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        r
    });
    // The first failure in image order.
    results.into_iter().collect()
}

#[derive(Serialize)]
struct CocoInfo {
    description: &'static str,
    version: &'static str,
    contributor: &'static str,
    seed: u64,
    images_dir: &'static str,
}

#[derive(Serialize)]
struct CocoImage<'a> {
    id: usize,
    file_name: &'a str,
    width: u32,
    height: u32,
}

#[derive(Serialize)]
struct CocoAnnotation<'a> {
    id: usize,
    image_id: usize,
    caption: &'a str,
}

#[derive(Serialize)]
struct CocoCaptions<'a> {
    info: CocoInfo,
    licenses: Vec<()>,
    #[serde(rename = "type")]
    kind: &'static str,
    images: Vec<CocoImage<'a>>,
    annotations: Vec<CocoAnnotation<'a>>,
}

#[derive(Serialize)]
struct KarpathySentence<'a> {
    tokens: Vec<String>,
    raw: &'a str,
    imgid: usize,
    sentid: usize,
}

#[derive(Serialize)]
struct KarpathyImage<'a> {
    filepath: &'static str,
    filename: &'a str,
    imgid: usize,
    cocoid: usize,
    split: &'static str,
    sentids: Vec<usize>,
    sentences: Vec<KarpathySentence<'a>>,
}

#[derive(Serialize)]
struct KarpathyDataset<'a> {
    dataset: &'static str,
    images: Vec<KarpathyImage<'a>>,
}

#[derive(Serialize)]
struct SceneLine<'a> {
    image_id: usize,
    file_name: &'a str,
    split: &'static str,
    #[serde(flatten)]
    scene: &'a Scene,
}

/// Writes the COCO caption file (`file_name` relative to `images/`).
pub(super) fn write_coco(
    path: &Path,
    seed: u64,
    scenes: &[Scene],
    names: &[String],
    captions: &[Vec<String>],
) -> Result<()> {
    let coco = CocoCaptions {
        info: CocoInfo {
            description: "clipcap synthetic shapes captioning dataset",
            version: "1.0",
            contributor: "clipcap synth",
            seed,
            images_dir: "images",
        },
        licenses: Vec::new(),
        kind: "captions",
        images: scenes
            .iter()
            .enumerate()
            .map(|(i, s)| CocoImage {
                id: i,
                file_name: &names[i],
                width: s.width,
                height: s.height,
            })
            .collect(),
        annotations: captions
            .iter()
            .enumerate()
            .flat_map(|(i, caps)| {
                caps.iter().enumerate().map(move |(k, c)| CocoAnnotation {
                    id: i * CAPTIONS_PER_IMAGE + k,
                    image_id: i,
                    caption: c,
                })
            })
            .collect(),
    };
    fsutil::write_atomic(path, &serde_json::to_vec(&coco)?)
}

/// Writes the Karpathy split file (`filepath` = `"images"`).
pub(super) fn write_karpathy(
    path: &Path,
    names: &[String],
    splits: &[&'static str],
    captions: &[Vec<String>],
) -> Result<()> {
    let karpathy = KarpathyDataset {
        dataset: "synth",
        images: captions
            .iter()
            .enumerate()
            .map(|(i, caps)| {
                let sentids: Vec<usize> = (0..caps.len())
                    .map(|k| i * CAPTIONS_PER_IMAGE + k)
                    .collect();
                KarpathyImage {
                    filepath: "images",
                    filename: &names[i],
                    imgid: i,
                    cocoid: i,
                    split: splits[i],
                    sentences: caps
                        .iter()
                        .zip(&sentids)
                        .map(|(c, &sentid)| KarpathySentence {
                            tokens: tokenize(c),
                            raw: c,
                            imgid: i,
                            sentid,
                        })
                        .collect(),
                    sentids,
                }
            })
            .collect(),
    };
    fsutil::write_atomic(path, &serde_json::to_vec(&karpathy)?)
}

/// Writes `scenes.jsonl`: one line per image with its name, split and scene parameters.
pub(super) fn write_scene_lines(
    path: &Path,
    scenes: &[Scene],
    names: &[String],
    splits: &[&'static str],
) -> Result<()> {
    let mut lines = Vec::new();
    for (i, scene) in scenes.iter().enumerate() {
        serde_json::to_writer(
            &mut lines,
            &SceneLine {
                image_id: i,
                file_name: &names[i],
                split: splits[i],
                scene,
            },
        )?;
        lines.push(b'\n');
    }
    fsutil::write_atomic(path, &lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn splits_sum_up() {
        for n in [0usize, 1, 2, 3, 10, 99, 1000] {
            let mut rng = StdRng::seed_from_u64(n as u64);
            let s = assign_splits(n, &mut rng);
            assert_eq!(s.len(), n);
            let test = s.iter().filter(|&&x| x == "test").count();
            let val = s.iter().filter(|&&x| x == "val").count();
            let train = s.iter().filter(|&&x| x == "train").count();
            assert_eq!(test + val + train, n);
            if n >= 3 {
                assert!(test >= 1 && val >= 1 && train >= 1);
            }
            if n == 1000 {
                assert_eq!((train, val, test), (800, 100, 100));
            }
        }
    }
}
