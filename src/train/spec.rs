//! What defines a training run. [`TrainParams`] is the one definition of the hyper-parameters:
//! `clipcap train`'s flags (clap), `POST /train`'s body fields (serde), job records and the
//! OpenAPI schema (utoipa) all derive from it, with the original's defaults. [`TrainSpec`]
//! adds where the data comes from and where the bundle goes.
use crate::model::mapper::MappingType;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Mixed precision: none, bf16 (autocast) or fp16 (autocast + dynamic loss scaling). Meant for
/// CUDA; honoured on the CPU too (bf16 there is only fast with AVX512-BF16/AMX).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum AmpMode {
    None,
    Bf16,
    Fp16,
}

impl AmpMode {
    /// The reduced precision autocast uses, if any.
    pub fn dtype(self) -> Option<crate::train::amp::AmpDtype> {
        match self {
            AmpMode::None => None,
            AmpMode::Bf16 => Some(crate::train::amp::AmpDtype::Bf16),
            AmpMode::Fp16 => Some(crate::train::amp::AmpDtype::F16),
        }
    }
}

fn defaults() -> TrainParams {
    TrainParams::default()
}

/// The hyper-parameters of a run; defaults are the original's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args, utoipa::ToSchema)]
#[serde(default)]
pub struct TrainParams {
    /// The prefix mapper: mlp or transformer.
    #[arg(long, default_value = "mlp", value_parser = clap::value_parser!(MappingType))]
    pub mapping: MappingType,
    /// Freeze GPT-2 and train the mapper only.
    #[arg(long = "only-prefix")]
    pub only_prefix: bool,
    /// GPT-2 prefix embeddings the mapper makes (1-256).
    #[arg(long = "prefix-length", default_value_t = defaults().prefix_length)]
    pub prefix_length: i64,
    /// Transformer mapper: tokens the CLIP embedding is projected to (1-256).
    #[arg(long = "clip-length", default_value_t = defaults().clip_length)]
    pub clip_length: i64,
    /// Transformer mapper: layers (1-48).
    #[arg(long = "num-layers", default_value_t = defaults().num_layers)]
    pub num_layers: i64,
    /// Normalize CLIP embeddings to unit length first.
    #[arg(long = "normalize-prefix")]
    pub normalize_prefix: bool,
    /// Passes over the training split (1-10000).
    #[arg(long, default_value_t = defaults().epochs)]
    pub epochs: usize,
    /// Captions per optimizer step (1-4096).
    #[arg(long = "batch-size", default_value_t = defaults().batch_size)]
    pub batch_size: usize,
    /// Peak learning rate of AdamW (0 < lr < 1).
    #[arg(long, default_value_t = defaults().lr)]
    pub lr: f64,
    /// Steps of linear warmup before the linear decay.
    #[arg(long, default_value_t = defaults().warmup)]
    pub warmup: i64,
    /// Seed of the initialisation, the shuffles and the dropout masks.
    #[arg(long, default_value_t = defaults().seed)]
    pub seed: u64,
    /// Split whose loss is reported after every epoch (none when absent).
    #[arg(long = "val-split", default_value_t = defaults().val_split)]
    pub val_split: String,
    /// Clip the global gradient norm to this (0 = off).
    #[arg(long = "grad-clip", default_value_t = defaults().grad_clip)]
    pub grad_clip: f64,
    /// Also checkpoint every this many steps (0 = at epoch ends only).
    #[arg(long = "save-every", default_value_t = defaults().save_every)]
    pub save_every: usize,
    /// Append `<|endoftext|>` so the model learns to stop (`--no-eos`: train exactly like the
    /// original, which stops on ".").
    #[arg(long = "no-eos", action = clap::ArgAction::SetFalse)]
    pub eos: bool,
    /// GPT-2's dropout while training (the original's 0.1; not applied with only_prefix,
    /// where GPT-2 stays in eval mode).
    #[arg(long, default_value_t = defaults().dropout)]
    pub dropout: f64,
    #[arg(long, value_enum, default_value = "none")]
    pub amp: AmpMode,
}

impl Default for TrainParams {
    fn default() -> Self {
        TrainParams {
            mapping: MappingType::Mlp,
            only_prefix: false,
            prefix_length: 10,
            clip_length: 10,
            num_layers: 8,
            normalize_prefix: false,
            epochs: 10,
            batch_size: 40,
            lr: 2e-5,
            warmup: 5000,
            seed: 0,
            val_split: "val".into(),
            grad_clip: 0.0,
            save_every: 0,
            eos: true,
            dropout: 0.1,
            amp: AmpMode::None,
        }
    }
}

impl TrainParams {
    /// Checks every field against its range; errors name the field.
    pub fn validate(&self) -> std::result::Result<(), (String, String)> {
        let e = |f: &str, m: &str| Err((f.to_string(), m.to_string()));
        if self.epochs == 0 || self.epochs > 10_000 {
            return e("epochs", "must be between 1 and 10000");
        }
        if self.batch_size == 0 || self.batch_size > 4096 {
            return e("batch_size", "must be between 1 and 4096");
        }
        if !(self.lr > 0.0 && self.lr < 1.0) {
            return e("lr", "must be > 0 and < 1");
        }
        if self.warmup < 0 {
            return e("warmup", "must be >= 0");
        }
        if !(1..=256).contains(&self.prefix_length) {
            return e("prefix_length", "must be between 1 and 256");
        }
        if !(1..=256).contains(&self.clip_length) {
            return e("clip_length", "must be between 1 and 256");
        }
        if !(1..=48).contains(&self.num_layers) {
            return e("num_layers", "must be between 1 and 48");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return e("dropout", "must be >= 0 and < 1");
        }
        if self.grad_clip.is_nan() || self.grad_clip < 0.0 {
            return e("grad_clip", "must be >= 0");
        }
        Ok(())
    }
}

/// Everything that defines a training run (CLI flags or a POST /train body), as job records
/// store it: the hyper-parameters flat beside the paths.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(default)]
pub struct TrainSpec {
    pub data: PathBuf,
    pub out: PathBuf,
    /// Bundle providing the encoder, tokenizer and GPT-2 (default: the one `prepare` used).
    pub base: Option<PathBuf>,
    /// Start from this bundle's mapper and GPT-2 weights (and its mapper shape).
    pub init: Option<PathBuf>,
    /// Bundle name written into the manifest (default: the output folder's name).
    pub name: Option<String>,
    #[serde(flatten)]
    pub params: TrainParams,
}

impl TrainSpec {
    /// Checks the hyper-parameters; errors name the field.
    pub fn validate(&self) -> std::result::Result<(), (String, String)> {
        self.params.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        params: TrainParams,
    }

    #[test]
    fn flags_and_json_fill_the_same_defaults() {
        let from_flags = Cli::try_parse_from(["train"]).unwrap().params;
        let from_json: TrainParams = serde_json::from_str("{}").unwrap();
        assert_eq!(from_flags, TrainParams::default());
        assert_eq!(from_json, TrainParams::default());
        let flags = Cli::try_parse_from([
            "train",
            "--no-eos",
            "--amp",
            "bf16",
            "--mapping",
            "transformer",
            "--epochs",
            "3",
        ])
        .unwrap()
        .params;
        let json: TrainParams = serde_json::from_str(
            r#"{"eos": false, "amp": "bf16", "mapping": "transformer", "epochs": 3}"#,
        )
        .unwrap();
        assert_eq!(flags, json);
        assert!(!flags.eos && flags.amp == AmpMode::Bf16 && flags.epochs == 3);
    }

    #[test]
    fn a_job_record_keeps_its_flat_shape() {
        let spec = TrainSpec {
            data: "d".into(),
            params: TrainParams {
                lr: 0.5,
                ..Default::default()
            },
            ..Default::default()
        };
        let v = serde_json::to_value(&spec).unwrap();
        assert_eq!(v["lr"], 0.5);
        assert_eq!(v["amp"], "none");
        let back: TrainSpec = serde_json::from_value(v).unwrap();
        assert_eq!(back, spec);
        assert_eq!(
            TrainParams {
                epochs: 0,
                ..Default::default()
            }
            .validate()
            .unwrap_err()
            .0,
            "epochs"
        );
    }
}
