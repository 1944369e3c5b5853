//! The served-models record: models loaded through the admin API or activated by a training
//! job, kept in one JSON file so a restart serves them again (after the configured ones,
//! which a recorded model of the same name replaces: it is the later state).
use crate::engine::Engine;
use crate::train::jobs::ModelInstaller;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServedEntry {
    pub name: String,
    pub dir: PathBuf,
    #[serde(default)]
    pub default: bool,
}

#[derive(Default, Serialize, Deserialize)]
struct RecordFile {
    models: Vec<ServedEntry>,
}

/// The record file (`models.served_record`); a no-op when that is empty.
pub struct ServedRecord {
    path: Option<PathBuf>,
    lock: Mutex<()>,
}

impl ServedRecord {
    pub fn new(path: &str) -> Self {
        ServedRecord {
            path: (!path.is_empty()).then(|| PathBuf::from(path)),
            lock: Mutex::new(()),
        }
    }

    /// The recorded models, in the order they were first recorded. A missing file is an
    /// empty record; an unreadable one is an error (it is never silently replaced).
    pub fn entries(&self) -> Result<Vec<ServedEntry>> {
        let Some(path) = &self.path else {
            return Ok(vec![]);
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(serde_json::from_str::<RecordFile>(&text)
                .with_context(|| format!("parsing the served-models record {}", path.display()))?
                .models),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
            Err(e) => Err(e)
                .with_context(|| format!("reading the served-models record {}", path.display())),
        }
    }

    /// Records that `name` is served from `dir` (replacing an earlier entry of that name).
    pub fn record(&self, name: &str, dir: &Path, default: bool) -> Result<()> {
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        self.change(|models| {
            if default {
                for m in models.iter_mut() {
                    m.default = false;
                }
            }
            // A swap without "default" keeps the name's default status (as the engine does).
            let was_default = models.iter().any(|m| m.name == name && m.default);
            let entry = ServedEntry {
                name: name.to_string(),
                dir,
                default: default || was_default,
            };
            match models.iter_mut().find(|m| m.name == name) {
                Some(m) => *m = entry,
                None => models.push(entry),
            }
        })
    }

    /// Records that `name` is no longer served.
    pub fn forget(&self, name: &str) -> Result<()> {
        self.change(|models| models.retain(|m| m.name != name))
    }

    fn change(&self, f: impl FnOnce(&mut Vec<ServedEntry>)) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let _guard = self.lock.lock().unwrap();
        let mut models = self.entries()?;
        f(&mut models);
        let text = serde_json::to_string_pretty(&RecordFile { models })?;
        crate::fsutil::write_atomic(path, text.as_bytes())
    }
}

/// Models by name and bundle folder, in serving order.
pub type ModelList = Vec<(String, PathBuf)>;

/// The models a server starts with: the configured ones, then the recorded ones (a recorded
/// name replaces a configured one). Recorded bundles that are gone are skipped with a warning.
/// Returns the list and the recorded default, if any.
pub fn startup_models(
    configured: ModelList,
    record: &ServedRecord,
) -> Result<(ModelList, Option<String>)> {
    let mut models = configured;
    let mut default = None;
    for e in record.entries()? {
        if !e.dir.join(crate::model::bundle::MANIFEST).is_file() {
            tracing::warn!(model = %e.name, dir = %e.dir.display(),
                "a recorded model's bundle is gone; not serving it");
            continue;
        }
        if e.default {
            default = Some(e.name.clone());
        }
        match models.iter_mut().find(|(n, _)| *n == e.name) {
            Some(m) => m.1 = e.dir,
            None => models.push((e.name, e.dir)),
        }
    }
    Ok((models, default))
}

/// Serves trained bundles through the engine and records them.
pub struct RecordingInstaller {
    pub engine: Engine,
    pub record: std::sync::Arc<ServedRecord>,
}

impl ModelInstaller for RecordingInstaller {
    fn install(&self, name: &str, dir: &Path) -> std::result::Result<u64, String> {
        let info = self
            .engine
            .install_blocking(name, dir, false)
            .map_err(|e| e.to_string())?;
        if let Err(e) = self.record.record(name, dir, false) {
            tracing::warn!(model = name, error = %format!("{e:#}"),
                "serving the trained bundle, but it will not come back after a restart");
        }
        Ok(info.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(dir: &Path, name: &str) -> PathBuf {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(crate::model::bundle::MANIFEST), b"{}").unwrap();
        d
    }

    #[test]
    fn recorded_models_come_back_after_the_configured_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("served.json");
        let record = ServedRecord::new(path.to_str().unwrap());
        let (a, b, c) = (
            bundle(tmp.path(), "a"),
            bundle(tmp.path(), "b"),
            bundle(tmp.path(), "c"),
        );
        record.record("demo", &b, false).unwrap();
        record.record("trained", &c, true).unwrap();
        // A later swap of the default, not asking for default, keeps it the default.
        record.record("trained", &c, false).unwrap();
        record
            .record("gone", &tmp.path().join("missing"), false)
            .unwrap();
        // A second process reads what the first recorded.
        let again = ServedRecord::new(path.to_str().unwrap());
        let (models, default) = startup_models(vec![("demo".into(), a.clone())], &again).unwrap();
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap();
        assert_eq!(
            models,
            vec![("demo".into(), canon(&b)), ("trained".into(), canon(&c))]
        );
        assert_eq!(default.as_deref(), Some("trained"));
        again.forget("trained").unwrap();
        let (models, default) = startup_models(vec![], &again).unwrap();
        assert_eq!(models, vec![("demo".into(), canon(&b))]);
        assert_eq!(default, None);
        // An unreadable record is an error, never overwritten.
        std::fs::write(&path, b"not json").unwrap();
        assert!(again.record("x", &a, false).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"not json");
        // No record configured: nothing is kept.
        let off = ServedRecord::new("");
        off.record("x", &a, false).unwrap();
        assert!(off.entries().unwrap().is_empty());
    }
}
