//! The HTTP captioning server: `clipcap serve`.
//!
//! `routes` maps HTTP to typed requests (`validation`) and typed errors (`error`); the
//! `batcher` worker thread owns the models and does all tensor work; `admin` loads models and
//! runs training jobs; `metrics` exports Prometheus counters.
pub mod admin;
pub mod batcher;
pub mod bench;
pub mod error;
pub mod metrics;
pub mod routes;
pub mod validation;

use crate::config::{parse_model_entry, Config};
use crate::model::bundle::Bundle;
use anyhow::{Context, Result};
use batcher::{BatchConfig, Command, ModelInfo, Shared, WorkerHandle};
use clap::Args;
use error::ApiError;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tch::{Device, Kind};

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
    /// f32, f16, bf16 or auto.
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
        f
    }
}

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub cfg: Arc<Config>,
    pub shared: Arc<Shared>,
    pub worker: WorkerHandle,
    pub draining: Arc<AtomicBool>,
    pub preprocess_slots: Arc<tokio::sync::Semaphore>,
    pub device: Device,
    pub kind: Kind,
    pub jobs: Arc<crate::train::jobs::JobManager>,
}

impl AppState {
    /// Loads a bundle on a blocking thread and installs it in the worker under `name`.
    pub async fn install_bundle(
        &self,
        name: &str,
        dir: &Path,
        make_default: bool,
    ) -> Result<ModelInfo, ApiError> {
        let (device, kind, dir2) = (self.device, self.kind, dir.to_path_buf());
        let bundle = tokio::task::spawn_blocking(move || Bundle::load(&dir2, device, kind))
            .await
            .map_err(|e| ApiError::Internal(format!("loading thread: {e}")))?
            .map_err(|e| {
                ApiError::option(
                    "path",
                    format!("cannot load bundle {}: {e:#}", dir.display()),
                )
            })?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.worker.submit(Command::Install {
            name: name.to_string(),
            bundle: Box::new(bundle),
            make_default,
            reply: tx,
        })?;
        match rx.await {
            Ok(Ok(info)) => Ok(info),
            Ok(Err(e)) => Err(ApiError::Internal(e)),
            Err(_) => Err(ApiError::Unavailable("the inference worker stopped".into())),
        }
    }
}

fn init_tracing(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.server.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = if cfg.server.log_format == "json" {
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
    tracing::info!("configuration:\n{}", cfg.to_masked_toml());
    if cfg.inference.torch_threads > 0 {
        tch::set_num_threads(cfg.inference.torch_threads as i32);
    }
    let device = crate::device::parse_device(&cfg.inference.device)?;
    let kind = crate::device::parse_dtype(&cfg.inference.dtype, device)?;
    let models: Vec<(String, PathBuf)> = cfg
        .models
        .models
        .iter()
        .map(|m| parse_model_entry(m))
        .collect();
    for (name, dir) in &models {
        if !dir.join(crate::model::bundle::MANIFEST).exists() {
            anyhow::bail!(
                "model {name}: no bundle at {} (run scripts/build-demo.sh for the default bundle)",
                dir.display()
            );
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(cfg, models, device, kind))
}

async fn serve(
    cfg: Config,
    models: Vec<(String, PathBuf)>,
    device: Device,
    kind: Kind,
) -> Result<()> {
    // Bind first: a taken port fails fast, before any model starts loading on another thread.
    let listener = tokio::net::TcpListener::bind(&cfg.server.bind)
        .await
        .with_context(|| format!("binding {}", cfg.server.bind))?;
    let shared = Arc::new(Shared::new());
    let batch = BatchConfig {
        max_batch_images: cfg.inference.max_batch_images,
        max_batch_delay: Duration::from_millis(cfg.inference.max_batch_delay_ms),
        continuous: cfg.inference.continuous_batching,
        max_running_images: cfg.inference.max_running_images,
    };
    let load: batcher::BundleLoader = Arc::new(move |dir: &Path| Bundle::load(dir, device, kind));
    let (worker, worker_thread) = batcher::spawn(
        shared.clone(),
        batch,
        cfg.inference.queue_capacity,
        models,
        cfg.models.default_model.clone(),
        load,
    );
    let threads = match cfg.inference.preprocess_threads {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2),
        n => n,
    };
    let cfg = Arc::new(cfg);
    let draining = Arc::new(AtomicBool::new(false));
    let jobs = crate::train::jobs::JobManager::open(cfg.clone(), shared.clone(), device)?;
    let state = AppState {
        cfg: cfg.clone(),
        shared: shared.clone(),
        worker,
        draining: draining.clone(),
        preprocess_slots: Arc::new(tokio::sync::Semaphore::new(threads)),
        device,
        kind,
        jobs: jobs.clone(),
    };
    jobs.attach(state.clone());
    let app = with_layers(routes::router(state.clone()));
    tracing::info!(addr = %listener.local_addr()?, "listening");
    // Machine-readable line for scripts and tests that bind port 0.
    println!("clipcap listening on http://{}", listener.local_addr()?);

    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let signal = async move {
        shutdown_signal().await;
        draining.store(true, Ordering::Relaxed);
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        let _ = stop_tx.send(true);
    };
    let grace = Duration::from_millis(cfg.server.shutdown_grace_ms);
    let server = axum::serve(listener, app).with_graceful_shutdown(signal);
    tokio::select! {
        r = server => r?,
        _ = async {
            let _ = stop_rx.changed().await;
            tokio::time::sleep(grace).await;
        } => tracing::warn!("grace period over; closing remaining connections"),
    }
    jobs.shutdown();
    drop(state);
    // The worker exits once every sender is gone and its running jobs are answered.
    let _ = tokio::task::spawn_blocking(move || worker_thread.join()).await;
    tracing::info!("stopped");
    Ok(())
}

fn with_layers(router: axum::Router) -> axum::Router {
    use axum::http::{HeaderName, Request};
    use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
    use tower_http::trace::TraceLayer;
    let x_request_id = HeaderName::from_static("x-request-id");
    let trace = TraceLayer::new_for_http().make_span_with(|req: &Request<axum::body::Body>| {
        let id = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        tracing::info_span!("request", id = %id, method = %req.method(), path = %req.uri().path())
    });
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
