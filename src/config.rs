//! Configuration: one home for every setting.
//!
//! `config/default.toml` (compiled in) documents every key and its default. A `--config` file
//! overrides it, `CLIPCAP_<KEY>` environment variables override that, and command-line flags
//! override everything. Keys are unique across sections so the environment names stay short.
use crate::device::{DeviceChoice, DtypeChoice};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use toml::{Table, Value};

pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub models: ModelsConfig,
    pub inference: InferenceConfig,
    pub training: TrainingConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub bind: String,
    pub max_body_bytes: usize,
    pub max_images_per_request: usize,
    pub max_inflight_requests: usize,
    pub max_connections: usize,
    pub header_timeout_ms: u64,
    pub body_timeout_ms: u64,
    pub max_header_bytes: usize,
    pub request_timeout_ms: u64,
    pub shutdown_grace_ms: u64,
    pub image_url_hosts: Vec<String>,
    pub image_url_allow_private: bool,
    pub image_url_timeout_ms: u64,
    pub role: Role,
    pub log_format: LogFormat,
    pub log_level: String,
}

/// What a replica does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Captions only: training routes answer 403.
    #[serde(rename = "serve")]
    Serve,
    /// Captions, and runs training jobs when an admin token is set.
    #[serde(rename = "serve+train")]
    ServeAndTrain,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub admin_token: String,
    pub api_key: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    pub models: Vec<String>,
    pub default_model: String,
    pub served_record: String,
    pub repository: String,
    pub poll_interval_ms: u64,
    pub load_timeout_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceConfig {
    pub device: DeviceChoice,
    pub dtype: DtypeChoice,
    pub max_batch_images: usize,
    pub max_batch_delay_ms: u64,
    pub continuous_batching: bool,
    pub max_running_images: usize,
    pub max_running_rows: usize,
    pub queue_capacity: usize,
    pub kv_cache_bytes: u64,
    pub max_pixels: u64,
    pub preprocess_threads: usize,
    pub torch_threads: usize,
}

impl InferenceConfig {
    /// `max_running_images`, with 0 (auto) resolved: 16 for int8 on the CPU, whose per-row
    /// work outside the GEMMs makes big decode steps slow (an int8 server at concurrency 64
    /// served 7.0-9.0 images/s capped at 16 against 6.1-7.4 at 64; README, int8), else 64.
    pub fn running_images(&self) -> usize {
        match (self.max_running_images, self.dtype) {
            (0, DtypeChoice::Int8) => 16,
            (0, _) => 64,
            (n, _) => n,
        }
    }

    /// `max_running_rows`, with 0 (auto) resolved: on the CPU 160 rows (32 beam-5 images; 80
    /// for int8, as its 16 images), past which a step costs more per row (at concurrency 64
    /// closed loop, beam 5, models/demo: 30.3-33.0 images/s at 160 rows against 23.4-25.4
    /// uncapped; README, continuous batching); no limit on CUDA, where wider steps cost little
    /// more.
    pub fn running_rows(&self, device: tch::Device) -> usize {
        match (self.max_running_rows, self.dtype, device) {
            (0, _, tch::Device::Cuda(_)) => 0,
            (0, DtypeChoice::Int8, _) => 80,
            (0, _, _) => 160,
            (n, _, _) => n,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    pub data_root: String,
    pub jobs_dir: String,
    pub bundles_dir: String,
    pub train_nice: i32,
}

/// Keys whose values are never printed.
const SECRETS: &[&str] = &["admin_token", "api_key"];

impl Config {
    /// Builds the configuration from the defaults, an optional file, the environment and
    /// `flags` (key → value, already typed).
    pub fn load(
        file: Option<&Path>,
        env: &[(String, String)],
        flags: &[(&str, Value)],
    ) -> Result<Self> {
        let mut table: Table = DEFAULT_TOML.parse().context("parsing built-in defaults")?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config {}", path.display()))?;
            let user: Table = text
                .parse()
                .with_context(|| format!("parsing config {}", path.display()))?;
            merge(&mut table, &user).with_context(|| format!("in config {}", path.display()))?;
        }
        for (name, raw) in env {
            let Some(key) = name.strip_prefix("CLIPCAP_") else {
                continue;
            };
            let key = key.to_ascii_lowercase();
            if let Some(slot) = find_key(&mut table, &key) {
                *slot = parse_like(slot, raw).with_context(|| format!("environment {name}"))?;
            }
        }
        for (key, value) in flags {
            let slot =
                find_key(&mut table, key).with_context(|| format!("unknown setting {key}"))?;
            *slot = value.clone();
        }
        let cfg: Config = Value::Table(table)
            .try_into()
            .context("invalid configuration")?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if self.inference.max_batch_images == 0 {
            bail!("max_batch_images must be at least 1");
        }
        if self.server.max_images_per_request == 0 {
            bail!("max_images_per_request must be at least 1");
        }
        if !(0..=19).contains(&self.training.train_nice) {
            bail!("train_nice must be in 0..=19 (a nice value)");
        }
        Ok(())
    }

    /// The configuration as TOML with secrets masked, for the start-up log.
    pub fn to_masked_toml(&self) -> String {
        let mut v = Value::try_from(self).expect("config serializes");
        if let Value::Table(t) = &mut v {
            for (_, section) in t.iter_mut() {
                if let Value::Table(s) = section {
                    for key in SECRETS {
                        if let Some(Value::String(x)) = s.get_mut(*key) {
                            if !x.is_empty() {
                                *x = "***".into();
                            }
                        }
                    }
                }
            }
        }
        toml::to_string(&v).unwrap_or_default()
    }

    /// The configuration with secrets masked, one line per section (`key=value …`), for a
    /// start-up log that reads as lines (and as fields with `log_format=json`).
    pub fn masked_sections(&self) -> Vec<(String, String)> {
        let masked: Value = self
            .to_masked_toml()
            .parse::<Table>()
            .map(Value::Table)
            .unwrap_or(Value::Table(Table::new()));
        let Value::Table(t) = masked else {
            return vec![];
        };
        t.iter()
            .filter_map(|(name, section)| match section {
                Value::Table(s) => Some((
                    name.clone(),
                    s.iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                )),
                _ => None,
            })
            .collect()
    }
}

/// Overlays `user` on `base`; every user key must exist in the defaults.
fn merge(base: &mut Table, user: &Table) -> Result<()> {
    for (section, value) in user {
        let Some(Value::Table(dst)) = base.get_mut(section) else {
            bail!("unknown section [{section}]");
        };
        let Value::Table(src) = value else {
            bail!("[{section}] must be a table");
        };
        for (k, v) in src {
            let Some(slot) = dst.get_mut(k) else {
                bail!("unknown setting {section}.{k}");
            };
            if std::mem::discriminant(slot) != std::mem::discriminant(v) {
                bail!("{section}.{k} must be a {}", slot.type_str());
            }
            *slot = v.clone();
        }
    }
    Ok(())
}

fn find_key<'a>(table: &'a mut Table, key: &str) -> Option<&'a mut Value> {
    table
        .iter_mut()
        .map(|(_, v)| v)
        .filter_map(|s| match s {
            Value::Table(t) => Some(t),
            _ => None,
        })
        .find_map(|t| t.get_mut(key))
}

/// Parses an environment string as the same type as the default value.
fn parse_like(default: &Value, raw: &str) -> Result<Value> {
    Ok(match default {
        Value::String(_) => Value::String(raw.to_string()),
        Value::Integer(_) => Value::Integer(raw.trim().parse().context("expected an integer")?),
        Value::Float(_) => Value::Float(raw.trim().parse().context("expected a number")?),
        Value::Boolean(_) => Value::Boolean(match raw.trim() {
            "1" | "true" | "yes" | "on" => true,
            "0" | "false" | "no" | "off" => false,
            _ => bail!("expected true or false"),
        }),
        Value::Array(_) => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_string()))
                .collect(),
        ),
        other => bail!("cannot set a {} from the environment", other.type_str()),
    })
}

/// `CLIPCAP_*` variables that are not settings but read elsewhere (scripts, tests, packing).
const OTHER_ENV: &[&str] = &[
    "CLIPCAP_VENV",
    "CLIPCAP_PYTHON",
    "CLIPCAP_PACKED_GEMM",
    "CLIPCAP_INT8_ENGINE",
    "CLIPCAP_DECODE_ATTENTION",
    "CLIPCAP_TEST_THREADS",
    "CLIPCAP_LIBTORCH_LIB",
    "CLIPCAP_NUM_SHARDS",
];

/// A warning for each `CLIPCAP_*` variable that names no setting (a typo does nothing
/// otherwise), with the closest setting's variable.
pub fn unknown_env(env: &[(String, String)]) -> Vec<String> {
    let table: Table = DEFAULT_TOML.parse().expect("built-in defaults parse");
    let keys: Vec<String> = table
        .values()
        .filter_map(|s| s.as_table())
        .flat_map(|t| t.keys().cloned())
        .collect();
    env.iter()
        .filter_map(|(name, _)| {
            let key = name.strip_prefix("CLIPCAP_")?.to_ascii_lowercase();
            if keys.contains(&key) || OTHER_ENV.contains(&name.as_str()) {
                return None;
            }
            let closest = keys.iter().min_by_key(|k| edit_distance(k, &key))?;
            Some(format!(
                "environment variable {name} is not a setting (ignored); did you mean CLIPCAP_{}?",
                closest.to_ascii_uppercase()
            ))
        })
        .collect()
}

/// Levenshtein distance (small strings).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// A model entry `NAME=DIR` or `DIR` (named after its folder).
pub fn parse_model_entry(entry: &str) -> (String, std::path::PathBuf) {
    match entry.split_once('=') {
        Some((name, dir)) => (name.trim().to_string(), dir.trim().into()),
        None => {
            let dir = std::path::PathBuf::from(entry.trim());
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "default".into());
            (name, dir)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_across_sections() {
        let table: Table = DEFAULT_TOML.parse().unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for section in table.values() {
            for k in section.as_table().unwrap().keys() {
                assert!(seen.insert(k.clone()), "duplicate key {k}");
            }
        }
    }

    #[test]
    fn precedence_is_flags_env_file_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[server]\nbind = \"0.0.0.0:1\"\nmax_body_bytes = 5\n[inference]\nmax_batch_images = 3\n",
        )
        .unwrap();
        let env = vec![
            ("CLIPCAP_MAX_BODY_BYTES".to_string(), "7".to_string()),
            ("CLIPCAP_MODELS".to_string(), "a=x, b=y".to_string()),
            (
                "CLIPCAP_CONTINUOUS_BATCHING".to_string(),
                "false".to_string(),
            ),
            ("OTHER".to_string(), "1".to_string()),
        ];
        let flags = [("max_batch_images", Value::Integer(9))];
        let c = Config::load(Some(&file), &env, &flags).unwrap();
        assert_eq!(c.server.bind, "0.0.0.0:1");
        assert_eq!(c.server.max_body_bytes, 7);
        assert_eq!(c.inference.max_batch_images, 9);
        assert!(!c.inference.continuous_batching);
        assert_eq!(c.models.models, vec!["a=x", "b=y"]);
        assert_eq!(c.server.max_images_per_request, 16);
    }

    #[test]
    fn running_images_default_to_16_for_int8_and_64_otherwise_unless_set() {
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let running = |pairs: &[(&str, &str)]| {
            Config::load(None, &env(pairs), &[])
                .unwrap()
                .inference
                .running_images()
        };
        assert_eq!(running(&[]), 64);
        assert_eq!(running(&[("CLIPCAP_DTYPE", "f32")]), 64);
        assert_eq!(running(&[("CLIPCAP_DTYPE", "int8")]), 16);
        assert_eq!(
            running(&[
                ("CLIPCAP_DTYPE", "int8"),
                ("CLIPCAP_MAX_RUNNING_IMAGES", "48")
            ]),
            48
        );
    }

    #[test]
    fn errors_name_the_setting() {
        let env = vec![("CLIPCAP_MAX_BODY_BYTES".to_string(), "lots".to_string())];
        let e = format!("{:#}", Config::load(None, &env, &[]).unwrap_err());
        assert!(e.contains("CLIPCAP_MAX_BODY_BYTES"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[server]\nbindd = \"x\"\n").unwrap();
        let e = format!("{:#}", Config::load(Some(&file), &[], &[]).unwrap_err());
        assert!(e.contains("server.bindd"), "{e}");
    }

    #[test]
    fn unknown_environment_variables_are_named_with_the_closest_setting() {
        let env = |pairs: &[&str]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|k| (k.to_string(), "x".to_string()))
                .collect()
        };
        let w = unknown_env(&env(&[
            "CLIPCAP_DEVIC",
            "CLIPCAP_DEVICE",
            "CLIPCAP_VENV",
            "PATH",
        ]));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("CLIPCAP_DEVIC ") && w[0].contains("CLIPCAP_DEVICE?"),
            "{w:?}"
        );
        let w = unknown_env(&env(&["CLIPCAP_MAX_BATCH_IMAGE"]));
        assert!(w[0].ends_with("CLIPCAP_MAX_BATCH_IMAGES?"), "{w:?}");
    }

    #[test]
    fn secrets_are_masked() {
        let env = vec![("CLIPCAP_ADMIN_TOKEN".to_string(), "hunter2".to_string())];
        let c = Config::load(None, &env, &[]).unwrap();
        assert_eq!(c.auth.admin_token, "hunter2");
        let shown = c.to_masked_toml();
        assert!(
            !shown.contains("hunter2") && shown.contains("***"),
            "{shown}"
        );
    }
}
