//! `clipcap batch`: captions a dataset offline through the same [`Engine`] the server runs
//! (continuous batching, preprocessing on all cores), one shard of it per process, writing
//! OpenAI's batch output format. A rerun resumes: ids already in the output are skipped.
//!
//! - `input`: folders, JSON lines (plain or OpenAI batch requests), stdin; shards;
//! - `output`: the output lines, appended whole, and what a rerun finds done.
//!
//! OpenAI-format lines go through the OpenAI door's own parsing and rendering
//! (`serve::openai`), so a line's body is exactly what `POST /v1/chat/completions` answers.
pub mod input;
pub mod output;

use crate::config::Config;
use crate::engine::{Engine, EngineConfig, EngineError, ModelInfo, RequestParams};
use crate::options::{DecodeOptions, GenOptions, OptionError};
use crate::serve::error::ApiError;
use crate::serve::openai;
use anyhow::{anyhow, Result};
use bytes::Bytes;
use clap::Args;
use input::{Item, Request, Source};
use output::Writer;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BatchArgs {
    /// Model bundle directory.
    #[arg(long)]
    pub model: PathBuf,
    /// The name a request's `model` may give (default: the bundle folder's name); a line
    /// naming another model gets a 404 error line.
    #[arg(long = "served-model-name")]
    pub served_model_name: Option<String>,
    /// A folder of images (searched recursively; custom_id = the path relative to it), a
    /// JSON-lines file of {"custom_id"?, "image": PATH} or of OpenAI batch requests
    /// ({"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}), or - for
    /// JSON lines on stdin. Relative image paths are taken from the input file's folder.
    #[arg(long)]
    pub input: PathBuf,
    /// Output JSON lines (OpenAI's batch output format), appended to and resumed from;
    /// `{shard}` is replaced by the shard index; - for stdout (no resuming).
    #[arg(long)]
    pub output: String,
    /// This process's shard (default: JOB_COMPLETION_INDEX, or SLURM_ARRAY_TASK_ID).
    #[arg(long = "shard-index")]
    pub shard_index: Option<usize>,
    /// How many shards split the input (default: CLIPCAP_NUM_SHARDS, or
    /// SLURM_ARRAY_TASK_COUNT; 1).
    #[arg(long = "num-shards")]
    pub num_shards: Option<usize>,
    #[command(flatten)]
    pub decode: DecodeOptions,
    /// A TOML file overriding config/default.toml (its [inference] section applies).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long)]
    pub device: Option<String>,
    /// f32, f16, bf16, int8 (CPU: int8 GPT-2 weights, f32 activations) or auto.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Requests in flight at once (0 = twice the engine's max_running_images).
    #[arg(long = "max-in-flight", default_value_t = 0)]
    pub max_in_flight: usize,
    /// No progress display on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Tests: after writing this many lines, sync and stop there (to be killed).
    #[arg(long = "hold-after", hide = true)]
    pub hold_after: Option<usize>,
}

/// Why a batch stopped, as its exit code tells a scheduler: 2 = fatal (a bad model, input or
/// argument; a rerun fails again), 75 (EX_TEMPFAIL) = retryable (I/O, device, memory; a rerun
/// resumes where this one stopped).
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("{0:#}")]
    Fatal(anyhow::Error),
    #[error("{0:#} (retryable: rerun to resume)")]
    Retryable(anyhow::Error),
}

impl BatchError {
    pub fn exit_code(&self) -> i32 {
        match self {
            BatchError::Fatal(_) => 2,
            BatchError::Retryable(_) => 75,
        }
    }
}

/// What one run did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    pub shard: usize,
    pub num_shards: usize,
    /// Lines of this shard already in the output (skipped).
    pub already_done: usize,
    pub captioned: usize,
    pub error_lines: usize,
    /// Lines left undone by a retryable failure.
    pub not_done: usize,
    pub load_seconds: f64,
    /// From the first request to the last line, model load excluded.
    pub seconds: f64,
    pub images_per_s: f64,
}

pub fn run(a: BatchArgs) -> std::result::Result<Summary, BatchError> {
    let fatal = BatchError::Fatal;
    let env = |k: &str| std::env::var(k).ok();
    let (shard, num_shards) = input::shard(a.shard_index, a.num_shards, &env).map_err(fatal)?;
    let source = Source::open(&a.input).map_err(fatal)?;
    let out_path =
        (a.output != "-").then(|| PathBuf::from(a.output.replace("{shard}", &shard.to_string())));
    if let Some(p) = &out_path {
        let parent = p.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(d) = parent.filter(|d| !d.is_dir()) {
            return Err(fatal(anyhow!(
                "the output's folder {} does not exist",
                d.display()
            )));
        }
    }
    // Settings from the one home (defaults, --config, CLIPCAP_* environment, flags).
    let mut flags = vec![];
    if let Some(d) = &a.device {
        flags.push(("device", toml::Value::String(d.clone())));
    }
    if let Some(d) = &a.dtype {
        flags.push(("dtype", toml::Value::String(d.clone())));
    }
    let vars: Vec<(String, String)> = std::env::vars().collect();
    let cfg = Config::load(a.config.as_deref(), &vars, &flags).map_err(fatal)?;
    if cfg.inference.torch_threads > 0 {
        crate::device::set_threads(cfg.inference.torch_threads);
    }
    let engine_cfg = EngineConfig::from_config(&cfg.inference).map_err(fatal)?;
    let window = match a.max_in_flight {
        0 => (2 * engine_cfg
            .scheduler
            .max_running_images
            .max(engine_cfg.scheduler.max_batch_images))
        .clamp(1, engine_cfg.scheduler.queue_capacity.max(1)),
        n => n.min(engine_cfg.scheduler.queue_capacity.max(1)),
    };

    let done = match &out_path {
        Some(p) => output::resume(p).map_err(BatchError::Retryable)?,
        None => output::Done::default(),
    };
    if done.dropped > 0 {
        eprintln!(
            "clipcap batch: dropped {} cut or broken line(s) from the output; they are redone",
            done.dropped
        );
    }
    // The first pass counts this shard's work (stdin is read once: no total).
    let mut summary = Summary {
        shard,
        num_shards,
        ..Summary::default()
    };
    let todo = if source.rereadable() {
        let mut n = 0usize;
        for item in source.items().map_err(fatal)? {
            let item = item.map_err(BatchError::Retryable)?;
            if item.shard(num_shards) == shard {
                if done.keys.contains(&item.key()) {
                    summary.already_done += 1;
                } else {
                    n += 1;
                }
            }
        }
        Some(n)
    } else {
        None
    };
    if todo == Some(0) {
        eprintln!(
            "clipcap batch: nothing to do ({} line(s) of shard {shard}/{num_shards} already done)",
            summary.already_done
        );
        return Ok(summary);
    }

    let t0 = Instant::now();
    let name = a.served_model_name.clone().unwrap_or_else(|| {
        a.model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let engine = Engine::start(
        engine_cfg,
        &prometheus::Registry::new(),
        vec![],
        String::new(),
    );
    let model = engine
        .install_blocking(&name, &a.model, true)
        .map_err(|e| fatal(anyhow!("{e}")))?;
    let base = a
        .decode
        .resolve(&model.generation)
        .map_err(|e: OptionError| fatal(e.for_flags()))?;
    summary.load_seconds = t0.elapsed().as_secs_f64();
    let writer = match &out_path {
        Some(p) => Writer::append(p).map_err(BatchError::Retryable)?,
        None => Writer::stdout(),
    };
    let ctx = Arc::new(Ctx {
        engine: engine.clone(),
        model,
        base,
        server: cfg.server.clone(),
        base_dir: source.base_dir(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| BatchError::Retryable(e.into()))?;
    let progress = Progress::new(todo, a.quiet);
    let result = rt.block_on(drive(
        ctx,
        source,
        Plan {
            shard,
            num_shards,
            done: done.keys,
            window,
            hold_after: a.hold_after,
        },
        writer,
        &mut summary,
        &progress,
    ));
    progress.finish();
    drop(rt);
    engine.shutdown();
    summary.seconds = t0.elapsed().as_secs_f64() - summary.load_seconds;
    summary.images_per_s = summary.captioned as f64 / summary.seconds.max(1e-9);
    result?;
    Ok(summary)
}

/// What every line's task needs.
struct Ctx {
    engine: Engine,
    model: ModelInfo,
    /// The command's options over the bundle's defaults (a line's own go over these).
    base: GenOptions,
    server: crate::config::ServerConfig,
    base_dir: PathBuf,
}

struct Plan {
    shard: usize,
    num_shards: usize,
    done: HashSet<String>,
    window: usize,
    hold_after: Option<usize>,
}

/// What became of one line.
enum Outcome {
    /// Its output line (a 200 or a 4xx answer, or an invalid line).
    Line { line: Value, ok: bool },
    /// Not done, for a reason a rerun may not have (I/O, the device, memory).
    Retry(String),
}

/// Feeds this shard's lines to the engine, `window` at a time, and writes each answer as it
/// comes. Stops feeding at the first retryable failure and lets what runs finish.
async fn drive(
    ctx: Arc<Ctx>,
    source: Source,
    plan: Plan,
    mut writer: Writer,
    summary: &mut Summary,
    progress: &Progress,
) -> std::result::Result<(), BatchError> {
    // Lines are read on their own thread (stdin may block), a window's worth ahead.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Item>>(plan.window);
    let iter = source.items().map_err(BatchError::Fatal)?;
    std::thread::spawn(move || {
        for item in iter {
            if tx.blocking_send(item).is_err() {
                break;
            }
        }
    });
    let mut running = tokio::task::JoinSet::new();
    let mut seen = HashSet::new();
    let mut failure: Option<anyhow::Error> = None;
    let mut input_open = true;
    let hold = |writer: &mut Writer| -> std::result::Result<(), BatchError> {
        writer.sync().map_err(BatchError::Retryable)?;
        eprintln!(
            "clipcap batch: holding after {} lines (--hold-after)",
            writer.written
        );
        Ok(())
    };
    loop {
        let feeding = input_open && failure.is_none() && running.len() < plan.window;
        tokio::select! {
            item = rx.recv(), if feeding => match item {
                None => input_open = false,
                Some(Err(e)) => failure = Some(e),
                Some(Ok(item)) => {
                    if item.shard(plan.num_shards) != plan.shard || plan.done.contains(&item.key()) {
                        continue;
                    }
                    if !seen.insert(item.key()) {
                        let line = output::invalid_line(
                            item.custom_id.as_deref(),
                            item.line,
                            &format!("duplicate custom_id {:?} (line {})", item.key(), item.line),
                        );
                        writer.write(&line).map_err(BatchError::Retryable)?;
                        summary.error_lines += 1;
                        progress.step(false);
                        continue;
                    }
                    let ctx = ctx.clone();
                    running.spawn(async move { caption_item(&ctx, item).await });
                }
            },
            joined = running.join_next(), if !running.is_empty() => {
                let outcome = match joined {
                    Some(Ok(o)) => o,
                    Some(Err(e)) => Outcome::Retry(format!("a line's task failed: {e}")),
                    None => continue,
                };
                match outcome {
                    Outcome::Line { line, ok } => {
                        writer.write(&line).map_err(BatchError::Retryable)?;
                        if ok {
                            summary.captioned += 1;
                        } else {
                            summary.error_lines += 1;
                        }
                        progress.step(ok);
                        if plan.hold_after == Some(writer.written) {
                            hold(&mut writer)?;
                            std::future::pending::<()>().await;
                        }
                    }
                    Outcome::Retry(why) => {
                        summary.not_done += 1;
                        failure.get_or_insert_with(|| anyhow!(why));
                    }
                }
            },
            else => break,
        }
    }
    writer.sync().map_err(BatchError::Retryable)?;
    match failure {
        Some(e) => Err(BatchError::Retryable(e.context(format!(
            "{} line(s) of this shard are not done",
            summary.not_done.max(1)
        )))),
        None => Ok(()),
    }
}

/// Captions one line.
async fn caption_item(ctx: &Ctx, item: Item) -> Outcome {
    let key = item.key();
    let request = match item.request {
        Ok(r) => r,
        Err(why) => {
            return Outcome::Line {
                line: output::invalid_line(item.custom_id.as_deref(), item.line, &why),
                ok: false,
            }
        }
    };
    let answered = match request {
        Request::Image(path) => caption_file(ctx, &path).await,
        Request::Chat(body) => caption_chat(ctx, body).await,
    };
    match answered {
        Ok(completion) => Outcome::Line {
            line: output::response_line(&key, 200, completion),
            ok: true,
        },
        Err(Failure::Answer(e)) => Outcome::Line {
            line: output::response_line(&key, e.status().as_u16(), e.openai_body()),
            ok: false,
        },
        Err(Failure::Retry(why)) => Outcome::Retry(why),
    }
}

/// Why a line has no completion: an answer for the line (4xx), or a failure to retry.
enum Failure {
    Answer(ApiError),
    Retry(String),
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        if e.status().is_server_error() {
            Failure::Retry(e.to_string())
        } else {
            Failure::Answer(e)
        }
    }
}

impl From<EngineError> for Failure {
    fn from(e: EngineError) -> Self {
        ApiError::from(e).into()
    }
}

async fn caption_file(ctx: &Ctx, path: &Path) -> std::result::Result<Value, Failure> {
    let image = read_image(path).await?;
    let meta = openai::Meta::new(&ctx.model, &ctx.base)?;
    let out = ctx
        .engine
        .caption(
            &ctx.model,
            vec![image],
            ctx.base.clone(),
            RequestParams::default(),
        )
        .await?;
    Ok(json!(openai::completion(out, &meta)))
}

async fn caption_chat(ctx: &Ctx, body: Value) -> std::result::Result<Value, Failure> {
    let chat = openai::parse_chat_value(body)?;
    if chat.stream {
        return Err(Failure::Answer(ApiError::InvalidRequest {
            field: "stream".into(),
            message: "a batch request is answered whole; leave stream out".into(),
        }));
    }
    let p = openai::prepare(&ctx.engine, &chat, Some(&ctx.base))?;
    let url = chat.image_url.as_str();
    let image = if url.starts_with("data:") {
        crate::serve::image_url::load(url, &ctx.server).await?
    } else if let Some(path) = url.strip_prefix("file://") {
        read_image(Path::new(path)).await?
    } else if url.contains("://") {
        return Err(Failure::Answer(ApiError::InvalidRequest {
            field: "messages".into(),
            message: "a batch reads images from data: URIs and local paths, not from URLs".into(),
        }));
    } else {
        read_image(&ctx.base_dir.join(url)).await?
    };
    let params = p.scheduling.params(Instant::now(), None);
    let out = ctx
        .engine
        .caption(&p.model, vec![image], p.opts, params)
        .await?;
    Ok(json!(openai::completion(out, &p.meta)))
}

/// A local image file. A file that is not there (or not readable, or a folder) is this line's
/// error; any other I/O failure may pass (a network filesystem) and is retried.
async fn read_image(path: &Path) -> std::result::Result<Bytes, Failure> {
    use std::io::ErrorKind::*;
    match tokio::fs::read(path).await {
        Ok(b) => Ok(Bytes::from(b)),
        Err(e)
            if matches!(
                e.kind(),
                NotFound | PermissionDenied | IsADirectory | InvalidInput
            ) =>
        {
            Err(Failure::Answer(ApiError::Malformed(format!(
                "cannot read image {}: {e}",
                path.display()
            ))))
        }
        Err(e) => Err(Failure::Retry(format!(
            "reading image {}: {e}",
            path.display()
        ))),
    }
}

/// Progress on stderr: a bar with rate and ETA on a terminal, a line every 30 s otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: Option<usize>,
    quiet: bool,
    state: std::sync::Mutex<(usize, usize, Instant, Instant)>,
}

impl Progress {
    fn new(total: Option<usize>, quiet: bool) -> Progress {
        use std::io::IsTerminal;
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = match total {
                Some(t) => indicatif::ProgressBar::new(t as u64),
                None => indicatif::ProgressBar::no_length(),
            };
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} lines  {per_sec}  ETA {eta}  {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        });
        let now = Instant::now();
        Progress {
            bar,
            total,
            quiet,
            state: std::sync::Mutex::new((0, 0, now, now)),
        }
    }

    fn step(&self, ok: bool) {
        let mut s = self.state.lock().unwrap();
        s.0 += 1;
        if !ok {
            s.1 += 1;
        }
        if let Some(b) = &self.bar {
            b.inc(1);
            if !ok {
                b.set_message(format!("{} error line(s)", s.1));
            }
        } else if !self.quiet && s.3.elapsed().as_secs() >= 30 {
            s.3 = Instant::now();
            let rate = s.0 as f64 / s.2.elapsed().as_secs_f64().max(1e-9);
            let eta = self
                .total
                .map(|t| {
                    format!(
                        ", ETA {:.0} s",
                        t.saturating_sub(s.0) as f64 / rate.max(1e-9)
                    )
                })
                .unwrap_or_default();
            eprintln!(
                "clipcap batch: {} line(s) done{}, {:.2}/s{eta}, {} error line(s)",
                s.0,
                self.total.map(|t| format!(" of {t}")).unwrap_or_default(),
                rate,
                s.1
            );
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

/// `Summary` as the one JSON line the command prints at the end.
pub fn summary_json(s: &Summary, model: &Path) -> Value {
    let mut v = json!(s);
    v["model"] = json!(model);
    v["cpu"] = json!(crate::device::cpu_model());
    v["threads"] = json!(crate::device::threads());
    v
}

/// Runs the command and reports: the summary on stdout (stderr when stdout is the output).
pub fn command(a: BatchArgs) -> Result<()> {
    let to_stdout = a.output != "-";
    let model = a.model.clone();
    let summary = run(a)?;
    let line = summary_json(&summary, &model).to_string();
    if to_stdout {
        println!("{line}");
    } else {
        eprintln!("{line}");
    }
    if summary.error_lines > 0 {
        eprintln!(
            "clipcap batch: {} line(s) could not be captioned (error lines in the output)",
            summary.error_lines
        );
    }
    Ok(())
}
