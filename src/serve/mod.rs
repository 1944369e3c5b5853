//! The HTTP captioning server: `clipcap serve`.
//!
//! `routes` maps HTTP to typed requests (`validation`) and calls the [`Engine`]; `error` maps
//! every error to a status and a JSON body; `admin` loads models and runs training jobs;
//! `metrics` holds the Prometheus registry. Nothing here touches tch.
pub mod admin;
pub mod bench;
pub mod conn;
pub mod error;
pub mod image_url;
pub mod metrics;
pub mod openai;
pub mod openapi;
pub mod repository;
pub mod routes;
pub mod served;
pub mod validation;

use crate::config::{parse_model_entry, Config, Role};
use crate::engine::{Engine, EngineConfig};
use crate::train::jobs::{JobManager, LocalTrainer};
use anyhow::{Context, Result};
use clap::Args;
use error::ApiError;
use metrics::HttpMetrics;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// A TOML file overriding config/default.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on (ADDR:PORT).
    #[arg(long)]
    pub bind: Option<String>,
    /// A bundle to serve: DIR or NAME=DIR; repeatable. Default: the config's models.
    #[arg(long = "model")]
    pub models: Vec<String>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long)]
    pub device: Option<String>,
    /// f32, f16, bf16, int8 (CPU: int8 GPT-2 weights, f32 activations) or auto.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Prepared datasets for POST /train live under this folder.
    #[arg(long = "data-root")]
    pub data_root: Option<String>,
    /// Turn continuous batching off (static micro-batches only).
    #[arg(long = "no-continuous-batching")]
    pub no_continuous_batching: bool,
    /// Log as JSON lines.
    #[arg(long = "log-json")]
    pub log_json: bool,
    /// Serve every bundle in the subfolders of DIR (a model repository a fleet shares),
    /// rescanned every --poll-interval.
    #[arg(long = "model-repository")]
    pub model_repository: Option<String>,
    /// How often the model repository is scanned: 10s, 500ms, 2m, or seconds.
    #[arg(long = "poll-interval", value_parser = parse_duration_ms)]
    pub poll_interval_ms: Option<u64>,
    /// serve+train (the default) or serve (captions only; no training jobs).
    #[arg(long)]
    pub role: Option<String>,
}

/// `10s`, `500ms`, `2m`, `1h` or a number of seconds, in milliseconds.
pub fn parse_duration_ms(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let (number, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1e3)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60e3)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600e3)
    } else {
        (t, 1e3)
    };
    match number.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok((v * scale).round().max(1.0) as u64),
        _ => Err(format!("{text:?} is not a duration (e.g. 10s, 500ms, 2m)")),
    }
}

impl ServeArgs {
    fn flags(&self) -> Vec<(&'static str, toml::Value)> {
        use toml::Value;
        let mut f = vec![];
        if let Some(b) = &self.bind {
            f.push(("bind", Value::String(b.clone())));
        }
        if !self.models.is_empty() {
            f.push((
                "models",
                Value::Array(self.models.iter().cloned().map(Value::String).collect()),
            ));
        }
        if let Some(d) = &self.device {
            f.push(("device", Value::String(d.clone())));
        }
        if let Some(d) = &self.dtype {
            f.push(("dtype", Value::String(d.clone())));
        }
        if let Some(d) = &self.data_root {
            f.push(("data_root", Value::String(d.clone())));
        }
        if self.no_continuous_batching {
            f.push(("continuous_batching", Value::Boolean(false)));
        }
        if self.log_json {
            f.push(("log_format", Value::String("json".into())));
        }
        if let Some(d) = &self.model_repository {
            f.push(("repository", Value::String(d.clone())));
        }
        if let Some(ms) = self.poll_interval_ms {
            f.push(("poll_interval_ms", Value::Integer(ms as i64)));
        }
        if let Some(r) = &self.role {
            f.push(("role", Value::String(r.clone())));
        }
        f
    }
}

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub cfg: Arc<Config>,
    pub engine: Engine,
    pub http: Arc<HttpMetrics>,
    pub draining: Arc<AtomicBool>,
    /// Training jobs; `None` when admin routes are disabled (no admin token).
    pub jobs: Option<Arc<JobManager>>,
    /// Models loaded or activated at run time, served again after a restart.
    pub served: Arc<served::ServedRecord>,
    /// The model repository this replica serves, when it has one.
    pub repository: Option<Arc<repository::Repository>>,
}

impl AppState {
    /// The state for `engine`, with a training job manager when admin routes are enabled.
    pub fn new(cfg: Arc<Config>, engine: Engine, http: Arc<HttpMetrics>) -> Result<Self> {
        let with_repository = !cfg.models.repository.is_empty();
        // A repository is the record of what is served; without one, a file is.
        let served = Arc::new(served::ServedRecord::new(if with_repository {
            ""
        } else {
            &cfg.models.served_record
        }));
        let repository = if with_repository {
            Some(repository::Repository::new(
                PathBuf::from(&cfg.models.repository),
                engine.clone(),
                cfg.models.default_model.clone(),
                &http.registry,
            )?)
        } else {
            None
        };
        let trains = !cfg.auth.admin_token.is_empty() && cfg.server.role == Role::ServeAndTrain;
        let jobs = if trains {
            let device = cfg.inference.device.resolve()?;
            // Trained-bundle folders half-written by a process that died (the one trainer
            // also sweeps the repository it publishes into).
            crate::fsutil::sweep_temps(std::path::Path::new(&cfg.training.bundles_dir), 0);
            let installer: Arc<dyn crate::train::jobs::ModelInstaller> = match &repository {
                Some(r) => {
                    crate::fsutil::sweep_temps(r.dir(), 0);
                    Arc::new(repository::RepositoryInstaller(r.clone()))
                }
                None => Arc::new(served::RecordingInstaller {
                    engine: engine.clone(),
                    record: served.clone(),
                }),
            };
            Some(JobManager::open(
                PathBuf::from(&cfg.training.jobs_dir),
                Arc::new(LocalTrainer {
                    device,
                    nice: cfg.training.train_nice,
                }),
                Some(installer),
                &http.registry,
            )?)
        } else {
            None
        };
        Ok(AppState {
            cfg,
            engine,
            http,
            draining: Arc::new(AtomicBool::new(false)),
            jobs,
            served,
            repository,
        })
    }
}

/// The engine a configuration asks for (its models start loading at once, on the worker).
pub fn engine_for(cfg: &Config, registry: &prometheus::Registry) -> Result<Engine> {
    let engine_cfg = EngineConfig::from_config(&cfg.inference)?;
    if !cfg.models.repository.is_empty() {
        // The repository's scans load the models (AppState::new, serve).
        return Ok(Engine::start(engine_cfg, registry, vec![], String::new()));
    }
    let configured: Vec<(String, PathBuf)> = cfg
        .models
        .models
        .iter()
        .map(|m| parse_model_entry(m))
        .collect();
    for (name, dir) in &configured {
        if !dir.join(crate::model::bundle::MANIFEST).exists() {
            anyhow::bail!(
                "model {name}: no bundle at {} (run scripts/build-demo.sh for the default bundle)",
                dir.display()
            );
        }
    }
    let record = served::ServedRecord::new(&cfg.models.served_record);
    let (models, recorded_default) = match served::startup_models(configured.clone(), &record) {
        Ok(m) => m,
        Err(e) => {
            // The configured models are served; the unreadable record is kept as it is.
            tracing::warn!(error = %format!("{e:#}"), "cannot read the served-models record; serving the configured models only");
            (configured, None)
        }
    };
    if models.len() > cfg.models.models.len() || recorded_default.is_some() {
        tracing::info!(record = %cfg.models.served_record, "serving the recorded models too");
    }
    let default_model = recorded_default.unwrap_or_else(|| cfg.models.default_model.clone());
    Ok(Engine::start(engine_cfg, registry, models, default_model))
}

fn init_tracing(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.server.log_level));
    // Logs go to stderr (stdout carries the machine-readable "listening" line), coloured only
    // when a person watches a terminal.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // A log that cannot be written (its disk is full) must not take the server down:
        // tracing reports such failures with eprintln!, which panics when stderr fails.
        .log_internal_errors(false);
    let _ = if cfg.server.log_format == crate::config::LogFormat::Json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// Builds the state, starts the worker and serves until SIGTERM/ctrl-c.
pub fn run(args: ServeArgs) -> Result<()> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let cfg = Config::load(args.config.as_deref(), &env, &args.flags())?;
    init_tracing(&cfg);
    for warning in crate::config::unknown_env(&env) {
        tracing::warn!("{warning}");
    }
    for (section, settings) in cfg.masked_sections() {
        tracing::info!(section = %section, settings = %settings, "configuration");
    }
    if cfg.inference.torch_threads > 0 {
        crate::device::set_threads(cfg.inference.torch_threads);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let served = rt.block_on(async move {
        // Bind first: a taken port fails fast, before any model starts loading.
        let listener = tokio::net::TcpListener::bind(&cfg.server.bind)
            .await
            .with_context(|| format!("binding {}", cfg.server.bind))?;
        let http = Arc::new(HttpMetrics::new());
        let engine = engine_for(&cfg, &http.registry)?;
        let state = AppState::new(Arc::new(cfg), engine, http)?;
        serve(listener, state, shutdown_signal()).await
    });
    // A bundle load that was given up on may still be reading on a blocking thread: the
    // process exits anyway.
    rt.shutdown_timeout(Duration::from_secs(2));
    served
}

/// Serves `state` on `listener` until `stop` resolves, then drains: no new connections,
/// in-flight requests get `shutdown_grace_ms`, training jobs stop at their next step
/// (checkpoint kept), and the worker finishes what it runs.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let app = app(state.clone());
    if let Some(repo) = &state.repository {
        let every = Duration::from_millis(state.cfg.models.poll_interval_ms);
        tracing::info!(repository = %repo.dir().display(), poll_ms = every.as_millis() as u64, "serving a model repository");
        repo.spawn_poller(every);
    }
    tracing::info!(addr = %listener.local_addr()?, "listening");
    // Machine-readable line for scripts and tests that bind port 0.
    println!("clipcap listening on http://{}", listener.local_addr()?);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let draining = state.draining.clone();
    let signal = async move {
        stop.await;
        draining.store(true, Ordering::Relaxed);
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        let _ = stop_tx.send(true);
    };
    let grace = Duration::from_millis(state.cfg.server.shutdown_grace_ms);
    let limits = conn::ConnLimits::from_config(&state.cfg.server);
    let mut server = tokio::spawn(conn::serve_connections(
        listener,
        app,
        limits,
        state.http.clone(),
        signal,
    ));
    let finished = tokio::select! {
        r = &mut server => Some(r),
        _ = async {
            let _ = stop_rx.changed().await;
            tokio::time::sleep(grace).await;
        } => None,
    };
    // Whatever ended the serving, jobs and the worker are stopped below.
    let report = |r: Result<(), tokio::task::JoinError>| {
        if let Err(e) = r {
            tracing::error!(error = %e, "the HTTP server task ended abnormally");
        }
    };
    match finished {
        Some(r) => report(r),
        None => {
            // The grace period is over: what is still waiting gets 503 now, then the
            // remaining connections get a moment to carry those answers out.
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "grace period over; answering what is left with 503"
            );
            state.engine.abort();
            match tokio::time::timeout(Duration::from_secs(2), &mut server).await {
                Ok(r) => report(r),
                Err(_) => server.abort(),
            }
        }
    }
    if let Some(jobs) = &state.jobs {
        let jobs = jobs.clone();
        let _ = tokio::task::spawn_blocking(move || jobs.shutdown()).await;
    }
    let engine = state.engine.clone();
    let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
    tracing::info!("stopped");
    Ok(())
}

/// The router with its layers (request ids, tracing, panics as opaque 500s, and the request
/// guard: header and URI caps, the body read within its deadline).
pub fn app(state: AppState) -> axum::Router {
    let guarded = routes::router(state.clone())
        .layer(axum::middleware::from_fn_with_state(
            state,
            conn::guard_request,
        ))
        // Errors under /v1/ in OpenAI's shape, the request guard's included.
        .layer(axum::middleware::from_fn(openai::openai_errors));
    with_layers(guarded)
}

fn with_layers(router: axum::Router) -> axum::Router {
    use axum::http::{HeaderName, Request};
    use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
    use tower_http::trace::TraceLayer;
    let x_request_id = HeaderName::from_static("x-request-id");
    let trace = TraceLayer::new_for_http()
        .make_span_with(|req: &Request<axum::body::Body>| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info_span!("request", id = %id, method = %req.method(), path = %req.uri().path())
        })
        // Statuses are in the access log; routine 503s and 504s are no errors (a 500 is
        // logged where it happens, with its detail).
        .on_failure(())
        // The access log: one line per request, inside its span (id, method, path).
        .on_response(
            |resp: &axum::response::Response, latency: Duration, _span: &tracing::Span| {
                let model = resp
                    .headers()
                    .get("x-clipcap-model")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info!(
                    status = resp.status().as_u16(),
                    latency_ms = latency.as_secs_f64() * 1e3,
                    model,
                    "served"
                );
            },
        );
    router
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            axum::response::IntoResponse::into_response(ApiError::Internal("internal error".into()))
        }))
        .layer(PropagateRequestIdLayer::new(x_request_id.clone()))
        .layer(trace)
        .layer(SetRequestIdLayer::new(x_request_id, MakeRequestUuid))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
