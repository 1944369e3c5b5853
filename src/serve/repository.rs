//! A model repository a fleet shares (Triton's poll mode): every subfolder of the repository
//! that holds a complete bundle is served under the folder's name. A scan (every
//! `poll_interval_ms`, or `POST /admin/repository/scan`) loads what is new or changed (by a
//! fingerprint of the manifest's bytes and the sizes and times of the files it names), swaps
//! it in while requests on the old version finish there, and unloads what is gone. A bundle
//! that fails to load is reported (log, metric, `/v1/models`) and its previous version keeps
//! serving; it is tried again once its files change.
//!
//! Half-written bundles are never loaded: folders whose name starts with '.' (the trainer's
//! and [`Repository::publish`]'s temporaries) are skipped, and a bundle missing a file its
//! manifest names waits ("incomplete"). A folder must be missing on two scans in a row before
//! its model is unloaded, so that a folder swapped by two renames is never dropped.
use crate::engine::Engine;
use crate::train::jobs::ModelInstaller;
use anyhow::{Context, Result};
use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The file naming the default model (one line: a folder's name).
pub const DEFAULT_FILE: &str = "default";
/// Scans a folder must be missing on before its model is unloaded.
const MISSING_SCANS: u32 = 2;

/// A repository model as `/v1/models` and `GET /admin/repository` report it.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ModelStatus {
    pub name: String,
    /// `ready` (its newest files are served), `failed` (its newest files did not load; an
    /// older version may still serve, see `serving`) or `incomplete` (a file its manifest
    /// names is missing; an older version may still serve).
    pub state: String,
    /// Whether a version of it is being served.
    pub serving: bool,
    /// The served version (the engine's count of installs under this name).
    pub version: Option<u64>,
    /// Fingerprint of the served files.
    pub fingerprint: Option<String>,
    /// Why the newest files are not served.
    pub error: Option<String>,
}

/// What one scan changed.
#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
pub struct ScanReport {
    pub loaded: Vec<String>,
    pub unloaded: Vec<String>,
    pub failed: Vec<String>,
    pub incomplete: Vec<String>,
    pub unchanged: Vec<String>,
    pub default_model: String,
}

#[derive(Clone, Debug, Default)]
struct Tracked {
    /// Fingerprint of the served version (`None`: never loaded).
    served: Option<String>,
    version: Option<u64>,
    /// Files that failed to load (their fingerprint) and why.
    failed: Option<(String, String)>,
    /// Why the folder is not complete, when it is not.
    incomplete: Option<String>,
    /// Scans in a row that did not find the folder.
    missing: u32,
}

struct Metrics {
    scans: IntCounter,
    load_failures: IntCounterVec,
    models: IntGaugeVec,
}

pub struct Repository {
    dir: PathBuf,
    engine: Engine,
    /// `models.default_model`, used when the repository has no `default` file.
    configured_default: String,
    /// One scan or publish at a time (loads run under it).
    scanning: Mutex<()>,
    /// What callers read; held only to read or replace it, never during a load.
    state: Mutex<BTreeMap<String, Tracked>>,
    metrics: Metrics,
}

/// Why a folder is not (yet) a complete bundle.
struct Incomplete(String);

/// The fingerprint of the bundle in `dir`: the manifest's bytes and the name, size and
/// modification time of each file it names (a changed file changes it without being read).
fn fingerprint(dir: &Path) -> std::result::Result<String, Incomplete> {
    use sha2::Digest;
    let manifest = dir.join(crate::model::bundle::MANIFEST);
    let bytes = std::fs::read(&manifest)
        .map_err(|e| Incomplete(format!("{}: {e}", crate::model::bundle::MANIFEST)))?;
    // The files it names (a manifest that does not parse is hashed as it is: loading it
    // reports why, and it is tried again when it changes).
    let files = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| {
            serde_json::from_value::<crate::model::bundle::BundleFiles>(v.get("files")?.clone())
                .ok()
        })
        .unwrap_or_default();
    let mut h = sha2::Sha256::new();
    h.update(&bytes);
    for f in files.all() {
        let meta = std::fs::metadata(dir.join(f)).map_err(|e| Incomplete(format!("{f}: {e}")))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        h.update(format!("\0{f}\0{}\0{mtime}", meta.len()).as_bytes());
    }
    Ok(hex::encode(&h.finalize()[..8]))
}

/// A folder name a model may be served under.
fn servable_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl Repository {
    pub fn new(
        dir: PathBuf,
        engine: Engine,
        configured_default: String,
        registry: &prometheus::Registry,
    ) -> Result<Arc<Repository>> {
        if !dir.is_dir() {
            anyhow::bail!("the model repository {} is not a folder", dir.display());
        }
        let scans = IntCounter::new(
            "clipcap_repository_scans_total",
            "Scans of the model repository",
        )?;
        let load_failures = IntCounterVec::new(
            Opts::new(
                "clipcap_repository_load_failures_total",
                "Repository bundles that failed to load, by model",
            ),
            &["model"],
        )?;
        let models = IntGaugeVec::new(
            Opts::new(
                "clipcap_repository_models",
                "Repository models by state (ready, failed, incomplete)",
            ),
            &["state"],
        )?;
        registry.register(Box::new(scans.clone()))?;
        registry.register(Box::new(load_failures.clone()))?;
        registry.register(Box::new(models.clone()))?;
        Ok(Arc::new(Repository {
            dir,
            engine,
            configured_default,
            scanning: Mutex::new(()),
            state: Mutex::new(BTreeMap::new()),
            metrics: Metrics {
                scans,
                load_failures,
                models,
            },
        }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The bundle folders in the repository now, by name.
    fn folders(&self) -> Result<Vec<(String, PathBuf)>> {
        let mut out = vec![];
        for entry in std::fs::read_dir(&self.dir)
            .with_context(|| format!("reading the model repository {}", self.dir.display()))?
        {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name().to_string_lossy().into_owned();
            // Symlinked folders count (`current -> v3`); metadata follows the link.
            if name.starts_with('.') || !entry.path().is_dir() {
                continue;
            }
            if !servable_name(&name) {
                tracing::warn!(folder = %name, "repository folder name is not a model name (letters, digits, '-', '_', '.'); skipped");
                continue;
            }
            out.push((name, entry.path()));
        }
        out.sort();
        Ok(out)
    }

    /// Brings what is served in line with the repository (blocking: loads run here).
    pub fn scan(&self) -> Result<ScanReport> {
        let _one = self.scanning.lock().unwrap();
        // Worked on as a copy, so that readers never wait for a load.
        let mut state = self.state.lock().unwrap().clone();
        self.metrics.scans.inc();
        let mut report = ScanReport::default();
        let found = self.folders()?;
        for (name, path) in &found {
            let t = state.entry(name.clone()).or_default();
            t.missing = 0;
            let fp = match fingerprint(path) {
                Ok(fp) => {
                    t.incomplete = None;
                    fp
                }
                Err(Incomplete(why)) => {
                    if t.incomplete.as_deref() != Some(why.as_str()) {
                        tracing::info!(model = %name, missing = %why, "repository bundle is incomplete; waiting for its files");
                    }
                    t.incomplete = Some(why);
                    report.incomplete.push(name.clone());
                    continue;
                }
            };
            if t.served.as_deref() == Some(fp.as_str()) {
                report.unchanged.push(name.clone());
                continue;
            }
            if t.failed.as_ref().is_some_and(|(f, _)| *f == fp) {
                report.failed.push(name.clone());
                continue;
            }
            match self.engine.install_blocking(name, path, false) {
                Ok(info) => {
                    tracing::info!(model = %name, version = info.version, fingerprint = %fp, "repository model loaded");
                    t.served = Some(fp);
                    t.version = Some(info.version);
                    t.failed = None;
                    report.loaded.push(name.clone());
                }
                Err(e) => {
                    let why = e.to_string();
                    tracing::error!(model = %name, error = %why, serving_previous = t.served.is_some(),
                        "repository bundle failed to load");
                    self.metrics.load_failures.with_label_values(&[name]).inc();
                    t.failed = Some((fp, why));
                    report.failed.push(name.clone());
                }
            }
        }
        let gone: Vec<String> = state
            .keys()
            .filter(|n| !found.iter().any(|(f, _)| f == *n))
            .cloned()
            .collect();
        for name in gone {
            let t = state.get_mut(&name).unwrap();
            t.missing += 1;
            if t.served.is_some() && t.missing < MISSING_SCANS {
                continue;
            }
            if t.served.is_some() {
                match self.engine.unload_blocking(&name) {
                    Ok(()) => tracing::info!(model = %name, "repository model removed; unloaded"),
                    Err(e) => {
                        tracing::warn!(model = %name, error = %e, "unloading a removed repository model")
                    }
                }
                report.unloaded.push(name.clone());
            }
            state.remove(&name);
        }
        report.default_model = self.apply_default();
        self.count(&state);
        *self.state.lock().unwrap() = state;
        Ok(report)
    }

    /// Serves the default the repository's `default` file (else the configuration) names,
    /// when that model is served; returns the default in effect.
    fn apply_default(&self) -> String {
        let wanted = match std::fs::read_to_string(self.dir.join(DEFAULT_FILE)) {
            Ok(text) => text.trim().to_string(),
            Err(_) => self.configured_default.clone(),
        };
        if !wanted.is_empty()
            && self.engine.default_model() != wanted
            && !self.engine.set_default(&wanted)
        {
            tracing::warn!(model = %wanted, "the default model is not served; keeping the current default");
        }
        self.engine.default_model()
    }

    fn count(&self, state: &BTreeMap<String, Tracked>) {
        let mut by: BTreeMap<&str, i64> = [("ready", 0), ("failed", 0), ("incomplete", 0)].into();
        for t in state.values() {
            *by.entry(Self::state_name(t)).or_default() += 1;
        }
        for (k, v) in by {
            self.metrics.models.with_label_values(&[k]).set(v);
        }
    }

    fn state_name(t: &Tracked) -> &'static str {
        if t.failed.is_some() {
            "failed"
        } else if t.incomplete.is_some() {
            "incomplete"
        } else {
            "ready"
        }
    }

    /// Every repository model's state, by name.
    pub fn status(&self) -> Vec<ModelStatus> {
        self.state
            .lock()
            .unwrap()
            .iter()
            .map(|(name, t)| ModelStatus {
                name: name.clone(),
                state: Self::state_name(t).into(),
                serving: t.served.is_some(),
                version: t.version,
                fingerprint: t.served.clone(),
                error: t
                    .failed
                    .as_ref()
                    .map(|(_, e)| e.clone())
                    .or_else(|| t.incomplete.clone()),
            })
            .collect()
    }

    /// Puts the bundle in `dir` into the repository as `name` (files hard-linked where the
    /// filesystem allows, else copied; into a temporary folder renamed into place) and
    /// serves it here at once; the other replicas load it at their next scan.
    pub fn publish(&self, name: &str, dir: &Path) -> Result<u64> {
        if !servable_name(name) {
            anyhow::bail!("{name:?} is not a model name");
        }
        let _one = self.scanning.lock().unwrap();
        let target = self.dir.join(name);
        let same = match (std::fs::canonicalize(dir), std::fs::canonicalize(&target)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if !same {
            crate::fsutil::replace_with_dir(&target, |tmp| {
                std::fs::create_dir_all(tmp)?;
                for entry in std::fs::read_dir(dir)? {
                    let entry = entry?;
                    if !entry.file_type()?.is_file() {
                        continue;
                    }
                    let to = tmp.join(entry.file_name());
                    if std::fs::hard_link(entry.path(), &to).is_err() {
                        std::fs::copy(entry.path(), &to).with_context(|| {
                            format!("copying {} into the repository", entry.path().display())
                        })?;
                        std::fs::File::open(&to)?.sync_all()?;
                    }
                }
                Ok(())
            })?;
        }
        let fp = fingerprint(&target).map_err(|Incomplete(why)| anyhow::anyhow!("{why}"))?;
        let info = self
            .engine
            .install_blocking(name, &target, false)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut state = self.state.lock().unwrap();
        let t = state.entry(name.to_string()).or_default();
        *t = Tracked {
            served: Some(fp),
            version: Some(info.version),
            ..Tracked::default()
        };
        self.count(&state);
        Ok(info.version)
    }

    /// Scans now and then every `interval`, until the runtime ends.
    pub fn spawn_poller(self: &Arc<Self>, interval: std::time::Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(interval.max(std::time::Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let repo = me.clone();
                match tokio::task::spawn_blocking(move || repo.scan()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::error!(error = %format!("{e:#}"), "scanning the model repository")
                    }
                    Err(e) => tracing::error!(error = %e, "the repository scan failed"),
                }
            }
        });
    }
}

/// Training jobs' activation on a repository: the trained bundle is published into it, so
/// every replica serves it within one poll interval.
pub struct RepositoryInstaller(pub Arc<Repository>);

impl ModelInstaller for RepositoryInstaller {
    fn install(&self, name: &str, dir: &Path) -> std::result::Result<u64, String> {
        self.0.publish(name, dir).map_err(|e| format!("{e:#}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_changes_with_the_manifest_or_a_file_and_waits_for_missing_files() {
        let d = tempfile::tempdir().unwrap();
        let b = d.path();
        assert!(fingerprint(b).is_err(), "no manifest yet");
        std::fs::write(
            b.join("clipcap.json"),
            br#"{"files": {"encoder": "e.pt", "weights": "w.st", "tokenizer": "t.json"}}"#,
        )
        .unwrap();
        std::fs::write(b.join("e.pt"), b"e").unwrap();
        std::fs::write(b.join("t.json"), b"t").unwrap();
        let Err(Incomplete(why)) = fingerprint(b) else {
            panic!("weights are missing")
        };
        assert!(why.starts_with("w.st"), "{why}");
        std::fs::write(b.join("w.st"), b"w").unwrap();
        let first = fingerprint(b).ok().unwrap();
        assert_eq!(fingerprint(b).ok().unwrap(), first, "stable");
        std::fs::write(b.join("w.st"), b"ww").unwrap();
        let second = fingerprint(b).ok().unwrap();
        assert_ne!(second, first, "a changed weights file");
        std::fs::write(
            b.join("clipcap.json"),
            br#"{"files": {"encoder": "e.pt", "weights": "w.st", "tokenizer": "t.json"}, "x": 1}"#,
        )
        .unwrap();
        assert_ne!(fingerprint(b).ok().unwrap(), second, "a changed manifest");
        assert!(servable_name("demo-2.b_x"));
        for bad in ["", ".tmp", "a b", "ä", "a/b"] {
            assert!(!servable_name(bad), "{bad}");
        }
    }
}
