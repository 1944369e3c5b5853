//! SPICE 1.0 through pycocoevalcap's jar, as its `Spice` class runs it
//! (`java -jar -Xmx8G spice-1.0.jar IN -cache DIR -out OUT -subset -silent`, mean of the
//! per-image `All.f`). The jar needs Stanford CoreNLP 3.6.0 (`lib/stanford-corenlp-3.6.0.jar`
//! and `-models.jar`), which pycocoevalcap downloads on first use; without them SPICE is
//! reported unavailable. Not exercised by this project's tests (the jars are not shipped).

use super::meteor::find_pycocoevalcap_file;
use super::np_mean;
use anyhow::{anyhow, bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;

/// The SPICE jar (`CLIPCAP_SPICE_JAR` or the venv's pycocoevalcap), checked for its
/// CoreNLP 3.6.0 dependencies.
pub fn find_jar() -> Result<PathBuf> {
    let jar = match std::env::var("CLIPCAP_SPICE_JAR") {
        Ok(p) => PathBuf::from(p),
        Err(_) => find_pycocoevalcap_file("spice/spice-1.0.jar")
            .ok_or_else(|| anyhow!("spice-1.0.jar not found (pycocoevalcap not installed?)"))?,
    };
    let lib = jar.parent().map(|d| d.join("lib")).unwrap_or_default();
    for f in [
        "stanford-corenlp-3.6.0.jar",
        "stanford-corenlp-3.6.0-models.jar",
    ] {
        if !lib.join(f).is_file() {
            bail!(
                "SPICE needs {} (pycocoevalcap downloads Stanford CoreNLP 3.6.0 on first use; \
                 not present here)",
                lib.join(f).display()
            );
        }
    }
    Ok(jar)
}

fn float_convert(v: Option<&serde_json::Value>) -> f64 {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
        Some(serde_json::Value::String(s)) => s.trim().parse().unwrap_or(f64::NAN),
        _ => f64::NAN,
    }
}

/// Corpus SPICE and per-item scores for `(image id, hypothesis, references)`, which must be
/// sorted by image id.
pub fn spice(items: &[(&str, &str, Vec<&str>)]) -> Result<(f64, Vec<f64>)> {
    let jar = find_jar()?;
    let tmp = std::env::temp_dir().join(format!(
        "clipcap-spice-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&tmp)?;
    let cache = std::env::temp_dir().join("clipcap-spice-cache");
    std::fs::create_dir_all(&cache)?;
    let input: Vec<serde_json::Value> = items
        .iter()
        .map(|(id, h, r)| serde_json::json!({"image_id": id, "test": h, "refs": r}))
        .collect();
    let in_file = tmp.join("in.json");
    let out_file = tmp.join("out.json");
    std::fs::write(&in_file, serde_json::to_vec_pretty(&input)?)?;
    let status = Command::new("java")
        .args(["-jar", "-Xmx8G"])
        .arg(&jar)
        .arg(&in_file)
        .arg("-cache")
        .arg(&cache)
        .arg("-out")
        .arg(&out_file)
        .args(["-subset", "-silent"])
        .current_dir(jar.parent().unwrap_or(std::path::Path::new(".")))
        .status()
        .context("cannot start java for SPICE")?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        bail!("SPICE exited with {status}");
    }
    let results: serde_json::Value = serde_json::from_slice(&std::fs::read(&out_file)?)?;
    let _ = std::fs::remove_dir_all(&tmp);
    let arr = results
        .as_array()
        .ok_or_else(|| anyhow!("SPICE output is not a list"))?;
    let mut by_id = std::collections::HashMap::new();
    let mut all = Vec::with_capacity(arr.len());
    for item in arr {
        let f = float_convert(item.pointer("/scores/All/f"));
        all.push(f);
        let id = match &item["image_id"] {
            serde_json::Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        by_id.insert(id, f);
    }
    let per = items
        .iter()
        .map(|(id, _, _)| by_id.get(*id).copied().unwrap_or(f64::NAN))
        .collect();
    Ok((np_mean(&all), per))
}
