//! Training: `prepare` extracts CLIP features once; `train` fits the mapper (and optionally
//! GPT-2) on them; `jobs` runs trainings for the server.
pub mod amp;
pub mod data;
pub mod jobs;
pub mod optim;
pub mod prepare;
pub mod trainer;

use crate::model::mapper::MappingType;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use trainer::{Outcome, TrainSpec};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Prepared dataset (output of `clipcap prepare`).
    #[arg(long)]
    pub data: PathBuf,
    /// Bundle folder to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Start from this bundle's mapper and GPT-2.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Bundle providing encoder, tokenizer and GPT-2 (default: the one `prepare` used).
    #[arg(long)]
    pub base: Option<PathBuf>,
    #[arg(long, default_value = "mlp")]
    pub mapping: MappingType,
    /// Freeze GPT-2 and train the mapper only.
    #[arg(long = "only-prefix")]
    pub only_prefix: bool,
    #[arg(long = "prefix-length", default_value_t = 10)]
    pub prefix_length: i64,
    #[arg(long = "clip-length", default_value_t = 10)]
    pub clip_length: i64,
    #[arg(long = "num-layers", default_value_t = 8)]
    pub num_layers: i64,
    #[arg(long = "normalize-prefix")]
    pub normalize_prefix: bool,
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    #[arg(long = "batch-size", default_value_t = 40)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 2e-5)]
    pub lr: f64,
    #[arg(long, default_value_t = 5000)]
    pub warmup: i64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long = "val-split", default_value = "val")]
    pub val_split: String,
    /// Clip the global gradient norm (0 = off).
    #[arg(long = "grad-clip", default_value_t = 0.0)]
    pub grad_clip: f64,
    /// Also checkpoint every N steps.
    #[arg(long = "save-every", default_value_t = 0)]
    pub save_every: usize,
    /// Do not append <|endoftext|> (train exactly like the original; stop on '.').
    #[arg(long = "no-eos")]
    pub no_eos: bool,
    /// GPT-2's dropout while training (the original's 0.1; ignored with --only-prefix).
    #[arg(long, default_value_t = 0.1)]
    pub dropout: f64,
    /// Mixed precision: none, bf16 (autocast) or fp16 (autocast + dynamic loss scaling). For
    /// CUDA; also honoured on the CPU (bf16 there is only fast with AVX512-BF16/AMX).
    #[arg(long, default_value = "none")]
    pub amp: String,
    /// Continue from the checkpoint in --checkpoint-dir.
    #[arg(long)]
    pub resume: bool,
    /// Where checkpoints go (default: OUT.ckpt).
    #[arg(long = "checkpoint-dir")]
    pub checkpoint_dir: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Bundle name in the manifest.
    #[arg(long)]
    pub name: Option<String>,
}

impl TrainArgs {
    pub fn spec(&self) -> TrainSpec {
        TrainSpec {
            data: self.data.clone(),
            out: self.out.clone(),
            base: self.base.clone(),
            init: self.init.clone(),
            mapping: self.mapping,
            only_prefix: self.only_prefix,
            prefix_length: self.prefix_length,
            clip_length: self.clip_length,
            num_layers: self.num_layers,
            normalize_prefix: self.normalize_prefix,
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            warmup: self.warmup,
            seed: self.seed,
            val_split: self.val_split.clone(),
            grad_clip: self.grad_clip,
            save_every: self.save_every,
            eos: !self.no_eos,
            dropout: self.dropout,
            amp: self.amp.clone(),
            name: self.name.clone(),
        }
    }
}

pub fn run(a: TrainArgs) -> Result<()> {
    let device = crate::device::parse_device(&a.device)?;
    let spec = a.spec();
    let ckpt = a.checkpoint_dir.clone().unwrap_or_else(|| {
        let mut p = a.out.clone().into_os_string();
        p.push(".ckpt");
        PathBuf::from(p)
    });
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "epoch {msg} [{bar:30}] {pos}/{len} steps, {per_sec}, ETA {eta}",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    let cancel = AtomicBool::new(false);
    let mut last_epoch = usize::MAX;
    let outcome = trainer::train(&spec, device, &ckpt, a.resume, &cancel, &mut |p| {
        bar.set_length(p.total_steps as u64);
        bar.set_position(p.step as u64);
        bar.set_message(format!(
            "{}/{} loss {:.4}{}",
            p.epoch + 1,
            p.epochs,
            p.loss,
            p.val_history
                .last()
                .map(|v| format!(" val {:.4}", v.loss))
                .unwrap_or_default()
        ));
        if p.epoch != last_epoch && last_epoch != usize::MAX {
            // A hidden bar (not a terminal: logs, CI) drops println; the epoch lines still count.
            let say = |line: String| {
                if bar.is_hidden() {
                    println!("{line}");
                } else {
                    bar.println(line);
                }
            };
            say(format!(
                "epoch {} done: loss {:.4}{}",
                last_epoch + 1,
                p.history.last().map(|h| h.loss).unwrap_or(f64::NAN),
                p.val_history
                    .last()
                    .map(|v| format!(", val loss {:.4}", v.loss))
                    .unwrap_or_default()
            ));
        }
        last_epoch = p.epoch;
    })?;
    bar.finish();
    match outcome {
        Outcome::Finished { bundle, progress } => {
            println!(
                "wrote bundle {} (final loss {:.4}{})",
                bundle.display(),
                progress.history.last().map(|h| h.loss).unwrap_or(f64::NAN),
                progress
                    .val_history
                    .last()
                    .map(|v| format!(", val loss {:.4}", v.loss))
                    .unwrap_or_default()
            );
        }
        Outcome::Cancelled { .. } => println!("cancelled; checkpoint in {}", ckpt.display()),
    }
    Ok(())
}
