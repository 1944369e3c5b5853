//! Subcommand definitions and their entry points.
use crate::generate::{GenOptions, Strategy};
use crate::model::bundle::Bundle;
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
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
    /// Print what this build can use (CUDA, devices, libtorch).
    Info,
}

/// Decoding options shared by `caption` and `eval`.
#[derive(Args, Debug, Clone)]
pub struct DecodeArgs {
    /// Beam search with this many beams (the default strategy, 5 beams).
    #[arg(long, conflicts_with_all = ["greedy", "sample"])]
    pub beam: Option<i64>,
    /// Greedy decoding (ClipCap's generate2).
    #[arg(long)]
    pub greedy: bool,
    /// Sampling (see --temperature, --top-k, --top-p, --seed).
    #[arg(long)]
    pub sample: bool,
    /// Captions per image (best beams, or samples).
    #[arg(long = "n-best", default_value_t = 1)]
    pub n_best: i64,
    #[arg(long = "max-tokens")]
    pub max_tokens: Option<i64>,
    #[arg(long)]
    pub temperature: Option<f64>,
    #[arg(long = "top-k")]
    pub top_k: Option<i64>,
    #[arg(long = "top-p")]
    pub top_p: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long = "repetition-penalty")]
    pub repetition_penalty: Option<f64>,
    #[arg(long = "no-repeat-ngram")]
    pub no_repeat_ngram: Option<i64>,
}

impl DecodeArgs {
    /// The bundle's defaults with these flags applied.
    pub fn options(&self, defaults: &GenOptions) -> Result<GenOptions> {
        let mut o = defaults.clone();
        if self.greedy {
            o.strategy = Strategy::Greedy;
        } else if self.sample {
            o.strategy = Strategy::Sample;
        } else if let Some(b) = self.beam {
            o.strategy = Strategy::Beam;
            o.beam_size = b;
        }
        o.n_best = self.n_best;
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { o.$f = v; } )* };
        }
        set!(
            max_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            no_repeat_ngram
        );
        if self.seed.is_some() {
            o.seed = self.seed;
        }
        o.validate()
            .map_err(|e| anyhow::anyhow!("--{}", e.to_string().replace('_', "-")))?;
        Ok(o)
    }
}

#[derive(Args, Debug)]
pub struct CaptionArgs {
    /// Model bundle directory.
    #[arg(long, default_value = "models/demo")]
    pub model: PathBuf,
    #[command(flatten)]
    pub decode: DecodeArgs,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, f16, bf16 or auto (half types need CUDA).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Images per encoder/decoder batch.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Refuse images with more pixels than this (checked before decoding).
    #[arg(long = "max-pixels", default_value_t = 40_000_000)]
    pub max_pixels: u64,
    /// Print JSON lines with scores and timings.
    #[arg(long)]
    pub json: bool,
    /// Image files.
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
    pub decode: DecodeArgs,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
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
        Command::Info => {
            println!("clipcap {}", env!("CARGO_PKG_VERSION"));
            println!(
                "libtorch: {}",
                option_env!("CLIPCAP_LIBTORCH_LIB").unwrap_or("?")
            );
            println!("cuda available: {}", tch::Cuda::is_available());
            println!("cuda devices: {}", tch::Cuda::device_count());
            println!("cudnn available: {}", tch::Cuda::cudnn_is_available());
            Ok(())
        }
    }
}

fn caption(a: CaptionArgs) -> Result<()> {
    let device = crate::device::parse_device(&a.device)?;
    let kind = crate::device::parse_dtype(&a.dtype, device)?;
    let mut files = vec![];
    for p in &a.images {
        let bytes = std::fs::read(p).with_context(|| format!("reading image {}", p.display()))?;
        files.push(bytes);
    }
    let t0 = Instant::now();
    let bundle = Arc::new(
        Bundle::load(&a.model, device, kind)
            .with_context(|| format!("loading bundle {}", a.model.display()))?,
    );
    let opts = a.decode.options(&bundle.manifest.generation)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let cfg = crate::pipeline::preprocess_config(&bundle.manifest.image, a.max_pixels);
    let t1 = Instant::now();
    let pixels = crate::pipeline::preprocess_many(&files, &cfg);
    let mut ok = vec![];
    for (p, r) in a.images.iter().zip(&pixels) {
        if let Err(e) = r {
            bail!("{}: {e}", p.display());
        }
        ok.push(r.as_ref().unwrap().as_slice());
    }
    let pre_ms = t1.elapsed().as_secs_f64() * 1e3;
    for (start, chunk) in ok.chunks(a.batch.max(1)).enumerate() {
        let t2 = Instant::now();
        let emb = crate::pipeline::encode(&bundle, chunk, a.batch)?;
        let enc_ms = t2.elapsed().as_secs_f64() * 1e3;
        let t3 = Instant::now();
        let caps = crate::generate::caption_embeddings(bundle.clone(), &emb, &opts)?;
        let dec_ms = t3.elapsed().as_secs_f64() * 1e3;
        for (i, c) in caps.iter().enumerate() {
            let path = &a.images[start * a.batch.max(1) + i];
            if a.json {
                let line = serde_json::json!({
                    "image": path,
                    "captions": c.iter().map(|c| serde_json::json!({"text": c.text, "score": c.score})).collect::<Vec<_>>(),
                    "timings_ms": {"load": load_ms, "preprocess_all": pre_ms, "encode_batch": enc_ms, "decode_batch": dec_ms, "batch_size": chunk.len()},
                });
                println!("{line}");
            } else {
                for cap in c {
                    println!("{}\t{}", path.display(), cap.text);
                }
            }
        }
    }
    Ok(())
}

fn bench_decode(a: BenchDecodeArgs) -> Result<()> {
    if a.threads > 0 {
        tch::set_num_threads(a.threads);
    }
    let device = crate::device::parse_device(&a.device)?;
    let kind = crate::device::parse_dtype(&a.dtype, device)?;
    let bundle = Arc::new(Bundle::load(&a.model, device, kind)?);
    let opts = a.decode.options(&bundle.manifest.generation)?;
    let clip = match &a.embeddings {
        Some(p) => crate::model::weights::read_safetensors(p)?
            .remove("clip")
            .context("no tensor \"clip\"")?,
        None => {
            tch::manual_seed(0);
            tch::Tensor::randn(
                [a.images, bundle.encoder.dim],
                (tch::Kind::Float, tch::Device::Cpu),
            )
        }
    };
    let n = clip.size()[0].min(a.images);
    let clip = clip.narrow(0, 0, n).to_device(device);
    // Warm-up (allocator, kernels).
    crate::generate::caption_embeddings(bundle.clone(), &clip.narrow(0, 0, 1), &opts)?;
    for &b in &a.batch {
        let mut best = f64::INFINITY;
        let mut tokens = 0usize;
        for _ in 0..a.repeat.max(1) {
            let t0 = Instant::now();
            tokens = 0;
            let mut i = 0;
            while i < n {
                let m = (b as i64).min(n - i);
                let caps = crate::generate::caption_embeddings(
                    bundle.clone(),
                    &clip.narrow(0, i, m),
                    &opts,
                )?;
                tokens += caps.iter().map(|c| c[0].tokens.len()).sum::<usize>();
                i += m;
            }
            if device.is_cuda() {
                tch::Cuda::synchronize(0);
            }
            best = best.min(t0.elapsed().as_secs_f64());
        }
        println!(
            "{}",
            serde_json::json!({"batch": b, "images": n, "seconds": best, "images_per_s": n as f64 / best,
                "tokens": tokens, "strategy": opts.strategy, "beam_size": opts.beam_size,
                "device": crate::device::device_name(device), "dtype": crate::device::dtype_name(kind)})
        );
    }
    Ok(())
}
