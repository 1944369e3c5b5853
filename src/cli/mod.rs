//! Subcommand definitions and their entry points.
mod bench_encode;

use crate::engine::Engine;
use crate::options::{DecodeOptions, OptionError};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(
    name = "clipcap",
    version,
    about = "ClipCap image captioning: caption, serve, train, evaluate"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Caption image files with a model bundle.
    Caption(CaptionArgs),
    /// Run the HTTP captioning server.
    Serve(Box<crate::serve::ServeArgs>),
    /// Caption a dataset (a folder, JSON lines or OpenAI batch requests) into OpenAI's batch
    /// output format: sharded, resumable, through the server's engine.
    Batch(Box<crate::batch::BatchArgs>),
    /// Extract CLIP features of an image+caption dataset.
    Prepare(crate::train::prepare::PrepareArgs),
    /// Train a mapper (and optionally GPT-2) on prepared features.
    Train(crate::train::TrainArgs),
    /// Caption a prepared split and score it (BLEU, METEOR, ROUGE-L, CIDEr).
    Eval(crate::eval::cli::EvalArgs),
    /// Score COCO-format results against COCO-format references.
    Score(crate::eval::cli::ScoreArgs),
    /// Write the synthetic captioning dataset.
    Synth(SynthArgs),
    /// Load generator against a running server (images/s, p50/p99 latency).
    BenchHttp(crate::serve::bench::BenchArgs),
    /// Time decoding from CLIP embeddings (alone vs batched), for benchmark scripts.
    BenchDecode(BenchDecodeArgs),
    /// Time the image encoder in f32 beside its int8 variant, and compare their embeddings.
    BenchEncode(bench_encode::BenchEncodeArgs),
    /// Print what this build can use (CUDA, devices, libtorch).
    Info,
}

#[derive(Args, Debug)]
pub struct CaptionArgs {
    /// Model bundle directory.
    #[arg(long, default_value = "models/demo")]
    pub model: PathBuf,
    #[command(flatten)]
    pub decode: DecodeOptions,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: crate::device::DeviceChoice,
    /// f32, f16, bf16, int8 (CPU only: int8 GPT-2 weights) or auto (f16 on CUDA, f32 on the CPU).
    #[arg(long, default_value = "f32")]
    pub dtype: crate::device::DtypeChoice,
    /// Images per encoder/decoder batch.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Refuse images with more pixels than this (checked before decoding).
    #[arg(long = "max-pixels", default_value_t = 40_000_000)]
    pub max_pixels: u64,
    /// Print JSON lines with scores and timings.
    #[arg(long)]
    pub json: bool,
    /// Image files, folders (searched recursively for image files), or `-` for a list of
    /// paths on stdin. Every readable image is captioned; unreadable ones are reported.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct BenchDecodeArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// safetensors file with tensor "clip" [N, D]; random (seeded) embeddings otherwise.
    #[arg(long)]
    pub embeddings: Option<PathBuf>,
    /// Images to caption per measurement.
    #[arg(long, default_value_t = 16)]
    pub images: i64,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, default_value = "1,16", value_delimiter = ',')]
    pub batch: Vec<usize>,
    #[command(flatten)]
    pub decode: DecodeOptions,
    #[arg(long, default_value = "cpu")]
    pub device: crate::device::DeviceChoice,
    #[arg(long, default_value = "f32")]
    pub dtype: crate::device::DtypeChoice,
    /// libtorch intra-op threads (0 = default).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    /// Repetitions (the best is reported).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1000)]
    pub images: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Caption(a) => caption(a),
        Command::Serve(a) => crate::serve::run(*a),
        Command::Batch(a) => crate::batch::command(*a),
        Command::Prepare(a) => crate::train::prepare::run(a),
        Command::Train(a) => crate::train::run(a),
        Command::Eval(a) => crate::eval::cli::eval(a),
        Command::Score(a) => crate::eval::cli::score(a),
        Command::Synth(a) => {
            let s = crate::synth::generate(
                &a.out,
                &crate::synth::SynthConfig {
                    images: a.images,
                    seed: a.seed,
                },
            )?;
            println!(
                "wrote {} images, {} captions to {} (splits {:?})",
                s.images,
                s.captions,
                a.out.display(),
                s.splits
            );
            Ok(())
        }
        Command::BenchHttp(a) => crate::serve::bench::run(a),
        Command::BenchDecode(a) => bench_decode(a),
        Command::BenchEncode(a) => bench_encode::run(a),
        Command::Info => {
            println!("clipcap {}", env!("CARGO_PKG_VERSION"));
            for (k, v) in crate::device::describe() {
                println!("{k}: {v}");
            }
            println!("cpu decoding: {}", crate::model::packed::status());
            println!(
                "kernel threads: {} (clipcap's C++ kernels)",
                crate::model::int8::kernel_threads()
            );
            Ok(())
        }
    }
}

/// The image paths the arguments name: files as given, folders searched recursively for
/// image files (sorted), and `-` for paths read from stdin, one per line.
pub(crate) fn image_paths(args: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = vec![];
    for a in args {
        if a.as_os_str() == "-" {
            for line in std::io::stdin().lines() {
                let line = line.context("reading paths from stdin")?;
                let line = line.trim();
                if !line.is_empty() {
                    out.push(PathBuf::from(line));
                }
            }
        } else if a.is_dir() {
            out.extend(crate::batch::input::image_files(a)?);
        } else {
            out.push(a.clone());
        }
    }
    Ok(out)
}

/// Captions every readable image; an unreadable one is reported (a JSON line with `--json`,
/// else on stderr) and the others go on. Fails at the end if any image failed.
fn caption(a: CaptionArgs) -> Result<()> {
    let paths = image_paths(&a.images)?;
    if paths.is_empty() {
        bail!("no images found in {:?}", a.images);
    }
    let t0 = Instant::now();
    let (engine, model) = Engine::local(&a.model, a.device, a.dtype, a.batch, a.max_pixels)?;
    let opts = a
        .decode
        .resolve(&model.generation)
        .map_err(OptionError::for_flags)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut failed = 0usize;
    let report_error = |path: &PathBuf, message: String| {
        if a.json {
            println!("{}", serde_json::json!({"image": path, "error": message}));
        } else {
            eprintln!("error: {}: {message}", path.display());
        }
    };
    for chunk in paths.chunks(a.batch.max(1)) {
        // Per position in the chunk: the bytes to caption, or why not. Printed in order.
        let mut errors: Vec<Option<String>> = vec![None; chunk.len()];
        let (mut positions, mut bytes): (Vec<usize>, Vec<Vec<u8>>) = (vec![], vec![]);
        for (i, p) in chunk.iter().enumerate() {
            match std::fs::read(p) {
                Ok(b) => {
                    positions.push(i);
                    bytes.push(b);
                }
                Err(e) => errors[i] = Some(format!("cannot read: {e}")),
            }
        }
        // An undecodable image fails the whole call: set it aside and caption the others.
        let out = loop {
            if bytes.is_empty() {
                break None;
            }
            match engine.caption_blocking(&model, &bytes, opts.clone()) {
                Ok(out) => break Some(out),
                Err(crate::engine::EngineError::Image { index, error }) => {
                    errors[positions.remove(index)] = Some(error.to_string());
                    bytes.remove(index);
                }
                Err(other) => return Err(anyhow::anyhow!("{other}")),
            }
        };
        let mut captioned = positions
            .iter()
            .copied()
            .zip(out.iter().flat_map(|o| o.images.iter()))
            .peekable();
        for (i, path) in chunk.iter().enumerate() {
            if let Some(message) = &errors[i] {
                failed += 1;
                report_error(path, message.clone());
                continue;
            }
            let Some((_, img)) = captioned.next_if(|(j, _)| *j == i) else {
                continue;
            };
            if a.json {
                let o = out.as_ref().expect("captioned images have an output");
                let line = serde_json::json!({
                    "image": path,
                    "captions": img.captions.iter().map(|c| serde_json::json!({"text": c.text, "score": c.score})).collect::<Vec<_>>(),
                    "timings_ms": {"load": load_ms, "preprocess_batch": o.preprocess_ms, "encode_batch": img.encode_ms, "decode": img.decode_ms, "batch_size": bytes.len()},
                });
                println!("{line}");
            } else {
                for cap in &img.captions {
                    println!("{}\t{}", path.display(), cap.text);
                }
            }
        }
    }
    engine.shutdown();
    if failed > 0 {
        bail!("{failed} of {} images could not be captioned", paths.len());
    }
    Ok(())
}

fn bench_decode(a: BenchDecodeArgs) -> Result<()> {
    if a.threads > 0 {
        crate::device::set_threads(a.threads as usize);
    }
    let most = a.batch.iter().copied().max().unwrap_or(1);
    let (engine, model) = Engine::local(&a.model, a.device, a.dtype, most, u64::MAX)?;
    let opts = a
        .decode
        .resolve(&model.generation)
        .map_err(OptionError::for_flags)?;
    let clip: Vec<Vec<f32>> = match &a.embeddings {
        Some(p) => crate::model::weights::read_rows(p, "clip")?,
        None => {
            crate::model::weights::random_rows(a.images as usize, model.embedding_dim as usize, 0)
        }
    };
    let n = clip.len().min(a.images as usize);
    let caption = |rows: &[Vec<f32>]| {
        engine
            .caption_embeddings_blocking(&model, rows.to_vec(), opts.clone())
            .map_err(|e| anyhow::anyhow!("{e}"))
    };
    // Warm-up (allocator, kernels).
    caption(&clip[..1])?;
    let steps_taken = || engine.metrics().decode_batch_rows.get_sample_count();
    for &b in &a.batch {
        let mut best = f64::INFINITY;
        let mut tokens = 0usize;
        let mut steps = 0u64;
        for _ in 0..a.repeat.max(1) {
            let t0 = Instant::now();
            let steps0 = steps_taken();
            tokens = 0;
            for chunk in clip[..n].chunks(b.max(1)) {
                let out = caption(chunk)?;
                tokens += out
                    .images
                    .iter()
                    .map(|i| i.captions[0].tokens.len())
                    .sum::<usize>();
            }
            let secs = t0.elapsed().as_secs_f64();
            if secs < best {
                best = secs;
                steps = steps_taken() - steps0;
            }
        }
        // Every step reads every weight once: the bandwidth the weights stream at.
        let per_step_s = best / steps.max(1) as f64;
        println!(
            "{}",
            serde_json::json!({"batch": b, "images": n, "seconds": best, "images_per_s": n as f64 / best,
                "tokens": tokens, "strategy": opts.strategy, "beam_size": opts.beam_size,
                "device": model.device, "dtype": model.dtype, "int8_engine": model.int8_engine,
                "encoder_dtype": model.encoder_dtype, "decode_attention": model.decode_attention,
                "steps": steps, "ms_per_step": per_step_s * 1e3,
                "weight_bytes_per_step": model.weight_bytes_per_step,
                "weight_gb_per_s": model.weight_bytes_per_step as f64 / per_step_s / 1e9,
                "cpu": crate::device::cpu_model(), "threads": crate::device::threads(),
                "kernel_threads": crate::model::int8::kernel_threads()})
        );
    }
    engine.shutdown();
    Ok(())
}
