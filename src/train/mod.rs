//! Training: `prepare` extracts CLIP features once; `train` fits the mapper (and optionally
//! GPT-2) on them; `jobs` runs trainings for the server.
pub mod amp;
pub mod checkpoint;
pub mod data;
mod export;
pub mod jobs;
pub mod optim;
pub mod prepare;
pub mod spec;
pub mod trainer;

use anyhow::Result;
use clap::Args;
use spec::{TrainParams, TrainSpec};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use trainer::Outcome;

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
    #[command(flatten)]
    pub params: TrainParams,
    /// Continue from the checkpoint in --checkpoint-dir.
    #[arg(long)]
    pub resume: bool,
    /// Where checkpoints go (default: OUT.ckpt).
    #[arg(long = "checkpoint-dir")]
    pub checkpoint_dir: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: crate::device::DeviceChoice,
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
            name: self.name.clone(),
            params: self.params.clone(),
        }
    }
}

pub fn run(a: TrainArgs) -> Result<()> {
    let device = a.device.resolve()?;
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
    let mut warned = false;
    let outcome = trainer::train(&spec, device, &ckpt, a.resume, &cancel, &mut |p| {
        if !warned {
            warned = true;
            for w in &p.warnings {
                bar.suspend(|| eprintln!("warning: {w}"));
            }
        }
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
