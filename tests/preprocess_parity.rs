//! Parity of `clipcap::preprocess` with the PIL reference pipeline (`scripts/ref_preprocess.py`):
//! decode + EXIF transpose + RGB + torchvision Resize(224, bicubic) + CenterCrop(224), in [0, 1].
//!
//! Tolerances per image (|diff| in [0, 1] units):
//! - generated files that no lossy decoder touches (PNG, BMP, TIFF, GIF, lossless WebP), and
//!   every JPEG, must be bit-exact: JPEGs are decoded by libjpeg-turbo's decoder as in PIL
//!   (4:4:4, 4:2:2, 4:2:0, progressive, restart markers, grey, CMYK), and the resampler
//!   reproduces Pillow's fixed-point arithmetic;
//! - everything else (lossy WebP): mean < 0.5/255 and max < 3/255.
//!   (Before the switch from zune-jpeg, chroma-subsampled JPEGs were off by up to 4/255.)
mod common;

use std::path::{Path, PathBuf};

use clipcap::preprocess::*;

const MEAN_TOL: f64 = 0.5 / 255.0;
const MAX_TOL: f64 = 3.0 / 255.0;

struct Row {
    name: String,
    note: String,
    mean: f64,
    max: f64,
    /// Fraction of values equal to the reference.
    exact: f64,
    /// Required: max == 0.
    lossless: bool,
    error: Option<String>,
}

impl Row {
    fn ok(&self) -> bool {
        self.error.is_none()
            && if self.lossless {
                self.max == 0.0
            } else {
                self.mean < MEAN_TOL && self.max < MAX_TOL
            }
    }
}

fn scratch_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("clipcap-preprocess-{tag}-"))
        .tempdir_in(std::env::temp_dir())
        .expect("cannot create a temporary directory")
}

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Runs the reference script into `dir` (with extra arguments) and compares every image.
fn compare(dir: &Path, extra: &[&str]) -> Vec<Row> {
    let script = common::repo().join("scripts/ref_preprocess.py");
    let mut args = vec![script.to_str().unwrap(), dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    common::run_python(&args);

    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let size = manifest["size"].as_u64().unwrap() as u32;
    let cfg = PreprocessConfig {
        size,
        ..PreprocessConfig::default()
    };
    let mut rows = Vec::new();
    for item in manifest["images"].as_array().unwrap() {
        let name = item["name"].as_str().unwrap().to_string();
        let note = item["note"].as_str().unwrap_or("").to_string();
        let bytes = std::fs::read(PathBuf::from(item["path"].as_str().unwrap())).unwrap();
        let reference = read_f32(&dir.join(item["ref"].as_str().unwrap()));
        let mut row = Row {
            name,
            note,
            mean: f64::NAN,
            max: f64::NAN,
            exact: 0.0,
            lossless: item["lossless"].as_bool().unwrap_or(false) || item["format"] == "JPEG",
            error: None,
        };
        match preprocess_unnormalized(&bytes, &cfg) {
            Err(e) => row.error = Some(e.to_string()),
            Ok(ours) if ours.len() != reference.len() => {
                row.error = Some(format!("length {} != {}", ours.len(), reference.len()))
            }
            Ok(ours) => {
                let diffs: Vec<f64> = ours
                    .iter()
                    .zip(&reference)
                    .map(|(a, b)| f64::from((a - b).abs()))
                    .collect();
                row.mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
                row.max = diffs.iter().cloned().fold(0.0, f64::max);
                row.exact =
                    diffs.iter().filter(|&&d| d < 0.25 / 255.0).count() as f64 / diffs.len() as f64;
                // The normalized output is the same tensor, shifted and scaled.
                let norm = preprocess_bytes(&bytes, &cfg).unwrap();
                let plane = (size * size) as usize;
                for (i, (&n, &u)) in norm.iter().zip(&ours).enumerate() {
                    let c = i / plane;
                    let want = (u - CLIP_MEAN[c]) / CLIP_STD[c];
                    assert!((n - want).abs() < 1e-5, "{}: normalization", row.name);
                }
            }
        }
        rows.push(row);
    }
    print_table(&rows);
    rows
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<30} {:>9} {:>8} {:>8} {:>6}  note",
        "image", "mean*255", "max*255", "exact%", "bound"
    );
    for r in rows {
        match &r.error {
            Some(e) => println!("{:<30} ERROR: {e}", r.name),
            None => println!(
                "{:<30} {:>9.4} {:>8.1} {:>8.2} {:>6}  {}{}",
                r.name,
                r.mean * 255.0,
                r.max * 255.0,
                r.exact * 100.0,
                if r.lossless {
                    "exact".to_string()
                } else {
                    format!("<{:.0}", MAX_TOL * 255.0)
                },
                r.note,
                if r.ok() { "" } else { "  <-- FAIL" }
            ),
        }
    }
}

fn assert_all_ok(rows: &[Row]) {
    let bad: Vec<&str> = rows
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.name.as_str())
        .collect();
    assert!(bad.is_empty(), "images outside tolerance: {bad:?}");
}

#[test]
fn preprocess_matches_pil_reference() {
    let dir = scratch_dir("parity");
    let rows = compare(dir.path(), &[]);
    assert!(
        rows.len() >= 30,
        "reference script produced {} images",
        rows.len()
    );
    assert!(rows.iter().filter(|r| r.lossless).count() >= 15);
    assert_all_ok(&rows);
}

/// The 12 real photos of the seed set (JPEGs): `cargo test --test preprocess_parity -- --ignored`.
/// Directory: `CLIPCAP_SEED_IMAGES`, else `shared/seed/images` in or next to the repository.
#[test]
#[ignore]
fn seed_photos_match_pil_reference() {
    let images = std::env::var("CLIPCAP_SEED_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let inside = common::repo().join("shared/seed/images");
            if inside.is_dir() {
                inside
            } else {
                common::repo().join("../shared/seed/images")
            }
        });
    assert!(images.is_dir(), "no seed images at {}", images.display());
    let dir = scratch_dir("seed");
    let rows = compare(dir.path(), &["--images", images.to_str().unwrap()]);
    assert!(!rows.is_empty());
    assert_all_ok(&rows);
}
