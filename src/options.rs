//! Decoding options and their limits: what a client or a bundle may ask of the decoder.
//!
//! [`GenOptions`] is a complete, validated set (also a bundle's generation defaults);
//! [`DecodeOptions`] is what one request or command line changes, the one definition that
//! the HTTP parser, the CLI flags and the OpenAPI schema all derive from. A leaf module (no
//! tch, no crate imports) so that `model::bundle` can hold defaults without depending on
//! `generate`, which depends on `model`.
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// beam (ClipCap's generate_beam), greedy (its generate2) or sample.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    Beam,
    Greedy,
    Sample,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Beam => "beam",
            Strategy::Greedy => "greedy",
            Strategy::Sample => "sample",
        }
    }
}

impl std::str::FromStr for Strategy {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "beam" => Ok(Strategy::Beam),
            "greedy" => Ok(Strategy::Greedy),
            "sample" => Ok(Strategy::Sample),
            _ => bail!("strategy must be beam, greedy or sample"),
        }
    }
}

/// How to decode one image. Also the bundle's generation defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct GenOptions {
    pub strategy: Strategy,
    /// Beams kept per image (beam search).
    pub beam_size: i64,
    /// Most tokens generated per caption (ClipCap's `entry_length`, 67).
    pub max_tokens: i64,
    /// Captions returned per image: best beams, or independent samples (`n_best` in older
    /// manifests).
    #[serde(alias = "n_best")]
    pub n: i64,
    /// Logits are divided by this (ClipCap divides when > 0).
    pub temperature: f64,
    /// Sampling: keep the k most likely tokens (0 = all).
    pub top_k: i64,
    /// Sampling: keep the smallest set whose probability reaches p (1 = all).
    pub top_p: f64,
    /// Sampling seed; the same seed gives the same captions, alone or in a batch.
    pub seed: Option<u64>,
    /// CTRL-style penalty (> 1 discourages tokens already generated; 1 = off).
    pub repetition_penalty: f64,
    /// Forbid repeating any n-gram of this size (0 = off).
    pub no_repeat_ngram: i64,
    /// The caption's beginning: the decoder continues this text ("A photo of" → "A photo of
    /// a dog."); empty = none.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub prompt: String,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            strategy: Strategy::Beam,
            beam_size: 5,
            max_tokens: 67,
            n: 1,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            repetition_penalty: 1.0,
            no_repeat_ngram: 0,
            prompt: String::new(),
        }
    }
}

/// Limits on options a client may ask for.
pub const MAX_BEAM: i64 = 16;
pub const MAX_TOKENS: i64 = 256;
pub const MAX_SAMPLES: i64 = 16;
/// A prompt's length, in characters (checked here) and in tokens (checked by the engine,
/// which has the tokenizer).
pub const MAX_PROMPT_CHARS: usize = 1000;
pub const MAX_PROMPT_TOKENS: usize = 128;

/// A rejected option: which field, and what is allowed.
#[derive(Debug, Clone, PartialEq)]
pub struct OptionError {
    pub field: &'static str,
    pub message: String,
}

impl OptionError {
    /// The error as the command line names the option (`--beam-size: must be …`).
    pub fn for_flags(self) -> anyhow::Error {
        anyhow::anyhow!("--{}: {}", self.field.replace('_', "-"), self.message)
    }
}

impl std::fmt::Display for OptionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl GenOptions {
    /// Checks every field against its allowed range.
    pub fn validate(&self) -> std::result::Result<(), OptionError> {
        let err = |field, message: String| Err(OptionError { field, message });
        if !(1..=MAX_BEAM).contains(&self.beam_size) {
            return err("beam_size", format!("must be between 1 and {MAX_BEAM}"));
        }
        if !(1..=MAX_TOKENS).contains(&self.max_tokens) {
            return err("max_tokens", format!("must be between 1 and {MAX_TOKENS}"));
        }
        let max_n = match self.strategy {
            Strategy::Beam => self.beam_size,
            Strategy::Greedy => 1,
            Strategy::Sample => MAX_SAMPLES,
        };
        if !(1..=max_n).contains(&self.n) {
            let why = match self.strategy {
                Strategy::Beam => format!("must be between 1 and beam_size ({max_n})"),
                Strategy::Greedy => "must be 1 for greedy decoding".into(),
                Strategy::Sample => format!("must be between 1 and {max_n}"),
            };
            return err("n", why);
        }
        if !(self.temperature > 0.0 && self.temperature <= 100.0) {
            return err("temperature", "must be > 0 and <= 100".into());
        }
        if !(0..=100_000).contains(&self.top_k) {
            return err("top_k", "must be between 0 (off) and 100000".into());
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return err("top_p", "must be > 0 and <= 1".into());
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 10.0) {
            return err("repetition_penalty", "must be > 0 and <= 10".into());
        }
        if !(0..=8).contains(&self.no_repeat_ngram) {
            return err("no_repeat_ngram", "must be between 0 (off) and 8".into());
        }
        if self.prompt.chars().count() > MAX_PROMPT_CHARS {
            return err(
                "prompt",
                format!("must be at most {MAX_PROMPT_CHARS} characters"),
            );
        }
        Ok(())
    }

    /// Rows decoded per image.
    pub(crate) fn rows_per_image(&self) -> i64 {
        match self.strategy {
            Strategy::Beam => self.beam_size,
            Strategy::Greedy => 1,
            Strategy::Sample => self.n,
        }
    }
}

/// Decoding options a request (or the command line) may set; whatever it leaves out comes
/// from the model's defaults ([`GenOptions`]). The one definition every door uses: HTTP query,
/// form and JSON fields, the CLI flags (`--beam-size`, `-n`, …) and the OpenAPI schema all
/// derive from it, and errors name the field as the user wrote it.
#[derive(
    Clone,
    Debug,
    Default,
    PartialEq,
    Serialize,
    Deserialize,
    clap::Args,
    utoipa::ToSchema,
    utoipa::IntoParams,
)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DecodeOptions {
    /// beam (the default: ClipCap's generate_beam), greedy (its generate2) or sample.
    #[arg(long)]
    #[serde(default, deserialize_with = "lenient::option")]
    pub strategy: Option<Strategy>,
    /// Beams kept per image (beam search), 1 to 16.
    #[arg(long = "beam-size")]
    #[serde(default, deserialize_with = "lenient::option")]
    pub beam_size: Option<i64>,
    /// Most tokens generated per caption, 1 to 256 (ClipCap's entry_length: 67).
    #[arg(long = "max-tokens")]
    #[serde(default, deserialize_with = "lenient::option")]
    pub max_tokens: Option<i64>,
    /// Captions per image: the best beams (up to beam_size), independent samples (up to 16),
    /// or 1 for greedy.
    #[arg(short = 'n', long = "n")]
    #[serde(default, deserialize_with = "lenient::option")]
    pub n: Option<i64>,
    /// Logits are divided by this (> 0, at most 100).
    #[arg(long)]
    #[serde(default, deserialize_with = "lenient::option")]
    pub temperature: Option<f64>,
    /// Sampling: keep the smallest set of tokens whose probability reaches p (0 < p <= 1).
    #[arg(long = "top-p")]
    #[serde(default, deserialize_with = "lenient::option")]
    pub top_p: Option<f64>,
    /// Sampling: keep the k most likely tokens (0 = all).
    #[arg(long = "top-k")]
    #[serde(default, deserialize_with = "lenient::option")]
    pub top_k: Option<i64>,
    /// Sampling seed: the same seed gives the same captions, alone or in a batch.
    #[arg(long)]
    #[serde(default, deserialize_with = "lenient::option")]
    pub seed: Option<u64>,
    /// CTRL-style penalty on tokens already generated (> 1 discourages them; 1 = off).
    #[arg(long = "repetition-penalty")]
    #[serde(default, deserialize_with = "lenient::option")]
    pub repetition_penalty: Option<f64>,
    /// Forbid repeating any n-gram of this size (0 = off, at most 8).
    #[arg(long = "no-repeat-ngram")]
    #[serde(default, deserialize_with = "lenient::option")]
    pub no_repeat_ngram: Option<i64>,
    /// The caption's beginning, which the decoder continues ("A photo of" → "A photo of a dog
    /// on a beach."); at most 1000 characters and 128 tokens.
    #[arg(long)]
    #[serde(default)]
    pub prompt: Option<String>,
    /// Shorthand for `--strategy greedy` (command line only).
    #[arg(long, conflicts_with_all = ["strategy", "sample"])]
    #[serde(skip)]
    pub greedy: bool,
    /// Shorthand for `--strategy sample` (command line only).
    #[arg(long, conflicts_with = "strategy")]
    #[serde(skip)]
    pub sample: bool,
}

impl DecodeOptions {
    /// The names a request may use, from the type itself (its schema).
    pub fn field_names() -> Vec<&'static str> {
        use std::sync::OnceLock;
        static NAMES: OnceLock<Vec<&'static str>> = OnceLock::new();
        NAMES
            .get_or_init(|| {
                let schema = <DecodeOptions as utoipa::PartialSchema>::schema();
                match schema {
                    utoipa::openapi::RefOr::T(utoipa::openapi::schema::Schema::Object(o)) => o
                        .properties
                        .keys()
                        .map(|k| &*Box::leak(k.clone().into_boxed_str()))
                        .collect(),
                    _ => vec![],
                }
            })
            .clone()
    }

    /// The model's defaults with these options applied, checked against every limit.
    pub fn resolve(&self, defaults: &GenOptions) -> Result<GenOptions, OptionError> {
        let mut o = defaults.clone();
        let chosen = if self.greedy {
            Some(Strategy::Greedy)
        } else if self.sample {
            Some(Strategy::Sample)
        } else {
            self.strategy
        };
        let mut temperature = self.temperature;
        // temperature 0 is greedy decoding, as OpenAI's and vLLM's users expect.
        if temperature == Some(0.0) {
            match chosen {
                None | Some(Strategy::Greedy) => {
                    o.strategy = Strategy::Greedy;
                    temperature = None;
                }
                Some(s) => {
                    return Err(OptionError {
                        field: "temperature",
                        message: format!(
                            "0 means greedy decoding, which strategy {} is not",
                            s.name()
                        ),
                    })
                }
            }
        }
        if let Some(s) = chosen {
            o.strategy = s;
        }
        self.refuse_what_does_not_apply(o.strategy, temperature)?;
        macro_rules! take {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { o.$f = v; } )* };
        }
        if let Some(t) = temperature {
            o.temperature = t;
        }
        take!(
            beam_size,
            max_tokens,
            top_p,
            top_k,
            repetition_penalty,
            no_repeat_ngram
        );
        if self.seed.is_some() {
            o.seed = self.seed;
        }
        if let Some(p) = &self.prompt {
            o.prompt = p.clone();
        }
        match self.n {
            Some(n) => o.n = n,
            // Unasked, the default count shrinks to what the strategy can give.
            None => {
                o.n = o.n.min(match o.strategy {
                    Strategy::Greedy => 1,
                    Strategy::Beam => o.beam_size,
                    Strategy::Sample => o.n,
                })
            }
        }
        o.validate()?;
        Ok(o)
    }
}

impl DecodeOptions {
    /// Options set for another strategy would silently change nothing (or something else):
    /// they are refused, naming the strategy they need.
    fn refuse_what_does_not_apply(
        &self,
        strategy: Strategy,
        temperature: Option<f64>,
    ) -> Result<(), OptionError> {
        let refuse = |field: &'static str, needs: &str| {
            Err(OptionError {
                field,
                message: format!(
                    "applies to {needs} only; this request decodes with {}",
                    strategy.name()
                ),
            })
        };
        if strategy != Strategy::Sample {
            if self.top_p.is_some() {
                return refuse("top_p", "sampling (strategy=sample)");
            }
            if self.top_k.is_some() {
                return refuse("top_k", "sampling (strategy=sample)");
            }
            if self.seed.is_some() {
                return refuse("seed", "sampling (strategy=sample)");
            }
        }
        if strategy != Strategy::Beam && self.beam_size.is_some() {
            return refuse("beam_size", "beam search (strategy=beam)");
        }
        if strategy == Strategy::Greedy && temperature.is_some() {
            return refuse(
                "temperature",
                "beam search and sampling (greedy ignores it)",
            );
        }
        Ok(())
    }
}

/// Option values that arrive as JSON values or as text (query strings and form fields):
/// a string is parsed like a command-line flag, anything else as JSON.
mod lenient {
    use serde::de::{DeserializeOwned, Error};
    use serde::{Deserialize, Deserializer};
    use std::str::FromStr;

    /// How a type is named in an error ("must be an integer, got …").
    pub trait Expected {
        const WHAT: &'static str;
    }
    impl Expected for i64 {
        const WHAT: &'static str = "an integer";
    }
    impl Expected for u64 {
        const WHAT: &'static str = "a non-negative integer";
    }
    impl Expected for f64 {
        const WHAT: &'static str = "a number";
    }
    impl Expected for super::Strategy {
        const WHAT: &'static str = "one of beam, greedy, sample";
    }

    pub fn option<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr + DeserializeOwned + Expected,
    {
        let v = serde_json::Value::deserialize(d)?;
        let shown = |v: &serde_json::Value| {
            let s = v.to_string();
            if s.chars().count() > 40 {
                format!("{}…", s.chars().take(40).collect::<String>())
            } else {
                s
            }
        };
        match &v {
            serde_json::Value::Null => Ok(None),
            serde_json::Value::String(s) => {
                s.trim().parse::<T>().map(Some).map_err(|_| {
                    D::Error::custom(format!("must be {}, got {}", T::WHAT, shown(&v)))
                })
            }
            _ => serde_json::from_value::<T>(v.clone())
                .map(Some)
                .map_err(|_| D::Error::custom(format!("must be {}, got {}", T::WHAT, shown(&v)))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(f: impl FnOnce(&mut DecodeOptions)) -> Result<GenOptions, OptionError> {
        let mut o = DecodeOptions::default();
        f(&mut o);
        o.resolve(&GenOptions::default())
    }

    #[test]
    fn temperature_zero_is_greedy() {
        let g = opts(|o| o.temperature = Some(0.0)).unwrap();
        assert_eq!((g.strategy, g.temperature), (Strategy::Greedy, 1.0));
        let e = opts(|o| {
            o.temperature = Some(0.0);
            o.strategy = Some(Strategy::Sample);
        })
        .unwrap_err();
        assert_eq!(e.field, "temperature");
    }

    #[test]
    fn options_of_another_strategy_are_refused_by_name() {
        let field = |f: fn(&mut DecodeOptions)| opts(f).unwrap_err().field;
        assert_eq!(field(|o| o.top_p = Some(0.9)), "top_p");
        assert_eq!(field(|o| o.seed = Some(1)), "seed");
        assert_eq!(
            field(|o| {
                o.greedy = true;
                o.temperature = Some(0.7);
            }),
            "temperature"
        );
        assert_eq!(
            field(|o| {
                o.sample = true;
                o.beam_size = Some(3);
            }),
            "beam_size"
        );
        let s = opts(|o| {
            o.sample = true;
            o.top_p = Some(0.9);
            o.seed = Some(4);
            o.temperature = Some(0.7);
            o.n = Some(3);
        })
        .unwrap();
        assert_eq!(
            (s.top_p, s.seed, s.temperature, s.n),
            (0.9, Some(4), 0.7, 3)
        );
        // Beam search takes a temperature (ClipCap's generate_beam divides by it).
        assert_eq!(
            opts(|o| o.temperature = Some(0.5)).unwrap().temperature,
            0.5
        );
    }
}
