//! The request mix of `clipcap bench-http --spec FILE` (TOML): kinds of requests, each drawn by
//! weight, with their door, options, stream flag and images per request. Without a spec the
//! benchmark sends one kind: a single image with `--query`'s options.
//!
//! ```toml
//! [[kind]]
//! name = "beam5"
//! weight = 3
//! images = [1, 4]            # images per request, drawn uniformly (or one number)
//! options = { beam_size = 5, max_tokens = 30 }
//!
//! [[kind]]
//! name = "stream"
//! api = "openai"             # POST /v1/chat/completions (one image per request)
//! stream = true              # time to first token is measured
//! options = { temperature = 0.8, max_tokens = 20 }
//! ```
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

use super::Api;

/// A validated mix.
#[derive(Clone, Debug, PartialEq)]
pub struct Mix {
    pub kinds: Vec<Kind>,
}

/// One kind of request.
#[derive(Clone, Debug, PartialEq)]
pub struct Kind {
    pub name: String,
    pub weight: f64,
    pub api: Api,
    pub stream: bool,
    /// Images per request, drawn uniformly in `min..=max`.
    pub images: (usize, usize),
    /// Decoding options: the query string of `/caption`, fields of the OpenAI body.
    pub options: Map<String, Value>,
    /// This kind's own images (else the benchmark's `--image` files).
    pub image_files: Vec<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMix {
    #[serde(rename = "kind")]
    kinds: Vec<RawKind>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKind {
    name: String,
    #[serde(default = "one")]
    weight: f64,
    #[serde(default)]
    api: Option<Api>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    images: Option<Images>,
    #[serde(default)]
    options: Map<String, Value>,
    #[serde(default)]
    image_files: Vec<PathBuf>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Images {
    One(usize),
    Range([usize; 2]),
}

fn one() -> f64 {
    1.0
}

impl Mix {
    /// The mix without a spec: one image per request, `query`'s options, on `api`.
    pub fn single(api: Api, query: &str) -> Result<Mix> {
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(query).with_context(|| format!("--query {query:?}"))?;
        let options = pairs
            .into_iter()
            // Numbers and booleans as JSON, anything else as text.
            .map(|(k, v)| {
                let value = serde_json::from_str(&v).unwrap_or(Value::String(v));
                (k, value)
            })
            .collect();
        Ok(Mix {
            kinds: vec![Kind {
                name: "default".into(),
                weight: 1.0,
                api,
                stream: false,
                images: (1, 1),
                options,
                image_files: vec![],
            }],
        })
    }

    /// Reads a spec file; relative `image_files` are relative to the file.
    pub fn load(path: &Path) -> Result<Mix> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Mix::parse(&text, dir).with_context(|| format!("spec {}", path.display()))
    }

    pub fn parse(text: &str, dir: &Path) -> Result<Mix> {
        let raw: RawMix = toml::from_str(text)?;
        if raw.kinds.is_empty() {
            bail!("no [[kind]] given");
        }
        let mut kinds = vec![];
        for k in raw.kinds {
            let what = format!("kind {:?}", k.name);
            if !(k.weight.is_finite() && k.weight > 0.0) {
                bail!("{what}: weight must be > 0");
            }
            let images = match k.images {
                None => (1, 1),
                Some(Images::One(n)) => (n, n),
                Some(Images::Range([a, b])) => (a, b),
            };
            if images.0 == 0 || images.0 > images.1 {
                bail!("{what}: images must be a count >= 1 or [min, max] with min <= max");
            }
            let api = k.api.unwrap_or(Api::Caption);
            if api == Api::Openai && images.1 > 1 {
                bail!("{what}: the OpenAI door takes one image per request");
            }
            if k.stream && api != Api::Openai {
                bail!("{what}: stream = true needs api = \"openai\"");
            }
            if let Some(bad) = k
                .options
                .keys()
                .find(|o| *o == "stream" || *o == "messages")
            {
                bail!("{what}: {bad:?} is set by the benchmark, not in options");
            }
            kinds.push(Kind {
                name: k.name,
                weight: k.weight,
                api,
                stream: k.stream,
                images,
                options: k.options,
                image_files: k.image_files.into_iter().map(|p| dir.join(p)).collect(),
            });
        }
        Ok(Mix { kinds })
    }

    /// Every door the mix uses, in first-use order.
    pub fn apis(&self) -> Vec<Api> {
        let mut apis = vec![];
        for k in &self.kinds {
            if !apis.contains(&k.api) {
                apis.push(k.api);
            }
        }
        apis
    }
}

/// An option value as text, for a query string.
pub fn query_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_reads_kinds_with_defaults_ranges_and_options() {
        let mix = Mix::parse(
            r#"
            [[kind]]
            name = "beam"
            weight = 3
            images = [1, 4]
            options = { beam_size = 5, max_tokens = 30 }
            [[kind]]
            name = "stream"
            api = "openai"
            stream = true
            image_files = ["a.png"]
            options = { temperature = 0.8 }
            [[kind]]
            name = "plain"
            images = 2
            "#,
            Path::new("/specs"),
        )
        .unwrap();
        assert_eq!(mix.kinds.len(), 3);
        let beam = &mix.kinds[0];
        assert_eq!(
            (beam.weight, beam.api, beam.images),
            (3.0, Api::Caption, (1, 4))
        );
        assert_eq!(beam.options["beam_size"], Value::from(5));
        let stream = &mix.kinds[1];
        assert!(stream.stream && stream.api == Api::Openai);
        assert_eq!(stream.image_files, vec![PathBuf::from("/specs/a.png")]);
        assert_eq!(mix.kinds[2].images, (2, 2));
        assert_eq!(mix.kinds[2].weight, 1.0);
        assert_eq!(mix.apis(), vec![Api::Caption, Api::Openai]);
    }

    #[test]
    fn bad_specs_are_refused_with_the_kind_named() {
        let err = |s: &str| format!("{:#}", Mix::parse(s, Path::new(".")).unwrap_err());
        assert!(err("[[kind]]\nname = \"x\"\nweight = 0").contains("kind \"x\": weight"));
        assert!(err("[[kind]]\nname = \"x\"\nimages = [3, 2]").contains("min <= max"));
        assert!(err("[[kind]]\nname = \"x\"\napi = \"openai\"\nimages = 2").contains("one image"));
        assert!(err("[[kind]]\nname = \"x\"\nstream = true").contains("openai"));
        assert!(err("[[kind]]\nname = \"x\"\noptions = { stream = true }").contains("benchmark"));
        assert!(err("[[kind]]\nname = \"x\"\nbeams = 3").contains("unknown field"));
        assert!(err("").contains("kind"));
    }

    #[test]
    fn without_a_spec_the_query_becomes_one_kind() {
        let mix = Mix::single(Api::Caption, "strategy=greedy&max_tokens=9").unwrap();
        let k = &mix.kinds[0];
        assert_eq!(k.images, (1, 1));
        assert_eq!(k.options["strategy"], Value::from("greedy"));
        assert_eq!(k.options["max_tokens"], Value::from(9));
        assert_eq!(query_text(&k.options["max_tokens"]), "9");
    }
}
