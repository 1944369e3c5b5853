//! The engine: the one thing every door calls. HTTP handlers (`serve`), the CLI's `caption`,
//! `eval` and `bench-decode`, and training jobs that install what they trained all go through an
//! [`Engine`] handle; none of them touches tch.
//!
//! - `scheduler`: the batching policy (admission, batch formation, reaping), pure and
//!   unit-tested without a model;
//! - `worker`: the thread that owns the bundles and runs encoder and decoder;
//! - `registry`: the served models as callers see them; `metrics`: inference metrics;
//! - `pipeline`: image bytes → pixels → CLIP embeddings; `error`: [`EngineError`].
pub mod error;
pub mod metrics;
pub mod pipeline;
pub mod registry;
pub mod scheduler;
mod worker;

pub use error::EngineError;
pub use registry::ModelInfo;
pub use scheduler::SchedulerConfig;
#[doc(hidden)]
pub use worker::Fault;
pub use worker::{BundleLoader, Health};

use crate::generate::Caption;
use crate::model::bundle::Bundle;
use crate::options::GenOptions;
use crate::preprocess::PreprocessConfig;
use bytes::Bytes;
use crossbeam_channel::Sender;
use metrics::EngineMetrics;
use registry::Registry;
use scheduler::{Admission, Scheduler};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tch::{Device, Kind};
use worker::{Command, Job, JobInput, Shared};

/// How an engine runs (from `[inference]` and the device flags).
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub device: Device,
    pub kind: Kind,
    pub scheduler: SchedulerConfig,
    /// Refuse images with more pixels than this, checked before decoding.
    pub max_pixels: u64,
    /// Images decoded and resized at once (0 = all cores).
    pub preprocess_threads: usize,
}

impl EngineConfig {
    /// The engine `[inference]` asks for (device and dtype resolved).
    pub fn from_config(i: &crate::config::InferenceConfig) -> anyhow::Result<Self> {
        let device = i.device.resolve()?;
        Ok(EngineConfig {
            device,
            kind: i.dtype.resolve(device)?,
            scheduler: SchedulerConfig {
                max_batch_images: i.max_batch_images,
                max_batch_delay: Duration::from_millis(i.max_batch_delay_ms),
                continuous: i.continuous_batching,
                max_running_images: i.running_images(),
                max_running_rows: i.running_rows(device),
                queue_capacity: i.queue_capacity,
                kv_budget_bytes: kv_budget(i.kv_cache_bytes, crate::cuda::memory(device)),
            },
            max_pixels: i.max_pixels,
            preprocess_threads: i.preprocess_threads,
        })
    }

    pub fn new(device: Device, kind: Kind) -> Self {
        EngineConfig {
            device,
            kind,
            scheduler: SchedulerConfig::default(),
            max_pixels: 40_000_000,
            preprocess_threads: 0,
        }
    }
}

/// One image's captions and where its time went.
#[derive(Clone, Debug, Serialize)]
pub struct ImageOutput {
    pub captions: Vec<Caption>,
    pub queue_ms: f64,
    pub encode_ms: f64,
    pub decode_ms: f64,
    /// Rows (all images × beams) in the decode batch when this image joined.
    pub batch_rows: i64,
}

/// A finished request: the model (and version) that captioned it, and every image in order.
#[derive(Clone, Debug)]
pub struct CaptionOutput {
    pub model: String,
    pub model_version: u64,
    pub images: Vec<ImageOutput>,
    pub preprocess_ms: f64,
}

/// Text a streamed request's caption gained: image `image`'s caption number `choice` (a
/// sample; greedy has one) goes on with `text`.
#[derive(Clone, Debug, PartialEq)]
pub struct Delta {
    pub image: usize,
    pub choice: usize,
    pub text: String,
}

/// How one request is scheduled: by when it must be done, and how urgent it is.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestParams {
    /// Past this, the request leaves (queued: uncomputed) with [`EngineError::Deadline`].
    pub deadline: Option<Instant>,
    /// Lower starts first (as vLLM and Triton order it); 0 is the default.
    pub priority: i32,
}

/// What a streamed request yields, in order: deltas, then the whole result.
#[derive(Debug)]
pub enum StreamEvent {
    Delta(Delta),
    Done(Result<CaptionOutput, EngineError>),
}

/// A request in progress whose text arrives as it is decoded (greedy and sampling; beam
/// search yields only its result). Dropping it cancels the request: its rows are freed at
/// the next step.
pub struct CaptionStream {
    deltas: tokio::sync::mpsc::UnboundedReceiver<Delta>,
    result: tokio::sync::oneshot::Receiver<Result<CaptionOutput, EngineError>>,
    /// The result, once in, while deltas sent before it are still being handed out.
    finished: Option<Result<CaptionOutput, EngineError>>,
    over: bool,
    aborted: tokio::sync::watch::Receiver<bool>,
    deadline: Option<Instant>,
    preprocess_ms: f64,
    cancel: CancelOnDrop,
}

impl CaptionStream {
    /// The next event; `None` after the result.
    pub async fn next(&mut self) -> Option<StreamEvent> {
        loop {
            if let Some(done) = self.finished.take() {
                // The worker sends a request's last text before its result, on another
                // channel: hand out what is still in this one first.
                if done.is_ok() {
                    if let Ok(d) = self.deltas.try_recv() {
                        self.finished = Some(done);
                        return Some(StreamEvent::Delta(d));
                    }
                    self.cancel.done = true;
                }
                self.over = true;
                return Some(StreamEvent::Done(done));
            }
            if self.over {
                return None;
            }
            let deadline = self.deadline;
            let until_deadline = async move {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            let done = tokio::select! {
                biased;
                Some(d) = self.deltas.recv() => return Some(StreamEvent::Delta(d)),
                r = &mut self.result => r.unwrap_or(Err(EngineError::Stopped)).map(|mut out| {
                    out.preprocess_ms = self.preprocess_ms;
                    out
                }),
                _ = self.aborted.wait_for(|a| *a) => Err(EngineError::Aborted),
                _ = until_deadline => Err(EngineError::Deadline(
                    "no captions before the request's deadline".into(),
                )),
            };
            self.finished = Some(done);
        }
    }
}

/// Whether the engine can take work.
#[derive(Clone, Debug, Serialize)]
pub struct Readiness {
    pub models: usize,
    /// Start-up models are still loading: ready only once every one has (or failed).
    pub loading: bool,
    pub worker_alive: bool,
    pub worker_answering: bool,
    /// A device error that does not go away (e.g. an illegal memory access poisons the CUDA
    /// context): unready until restarted.
    pub device_error: Option<String>,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.models > 0 && !self.loading && self.worker_answering && self.device_error.is_none()
    }
}

/// A cheap, cloneable handle to one inference worker and its models.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    tx: Sender<Command>,
    kv_budget_bytes: u64,
    max_running_rows: usize,
    registry: Arc<Registry>,
    metrics: Arc<EngineMetrics>,
    health: Arc<Health>,
    admission: Arc<Admission>,
    load: BundleLoader,
    max_pixels: u64,
    preprocess_threads: usize,
    preprocess_slots: Arc<tokio::sync::Semaphore>,
    /// Set by [`Engine::abort`]: waiting callers give up at once.
    aborted: tokio::sync::watch::Sender<bool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A test's hold on the worker (see [`Engine::hold`]); dropping it lets the worker go on.
#[doc(hidden)]
pub struct Hold(Arc<Health>);
impl Drop for Hold {
    fn drop(&mut self) {
        self.0.set_hold(false);
    }
}

/// A place in the queue taken before the work starts; given back if the request never
/// reaches the worker (the worker gives back the ones that do).
struct Slot(Option<Arc<Admission>>);
impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(a) = self.0.take() {
            a.release(1);
        }
    }
}

/// Marks the request cancelled when its caller drops the future before it finished.
struct CancelOnDrop {
    flag: Arc<AtomicBool>,
    done: bool,
}
impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.done {
            self.flag.store(true, Ordering::Relaxed);
        }
    }
}

impl Engine {
    /// Starts the worker; `initial` models load on its thread (see [`Engine::readiness`]).
    /// Metrics register in `metrics_registry`.
    pub fn start(
        cfg: EngineConfig,
        metrics_registry: &prometheus::Registry,
        initial: Vec<(String, PathBuf)>,
        default_model: String,
    ) -> Engine {
        let (device, kind) = (cfg.device, cfg.kind);
        let load: BundleLoader = Arc::new(move |dir: &Path| {
            // Hot-swap loads copy weights while the worker decodes: on their own stream they
            // do not queue behind its kernels (nor its host reads behind them). Leaving the
            // stream waits for the copies, so the worker gets weights that are there.
            let _stream = crate::cuda::SideStream::enter_or_warn(device, "bundle load");
            Bundle::load(dir, device, kind)
        });
        Self::start_with_loader(cfg, metrics_registry, initial, default_model, load)
    }

    /// [`Engine::start`] with another way to load bundles (tests).
    pub fn start_with_loader(
        cfg: EngineConfig,
        metrics_registry: &prometheus::Registry,
        initial: Vec<(String, PathBuf)>,
        default_model: String,
        load: BundleLoader,
    ) -> Engine {
        let (tx, rx) = crossbeam_channel::unbounded();
        let registry = Arc::new(Registry::default());
        let metrics = Arc::new(EngineMetrics::register(metrics_registry));
        let health = Arc::new(Health::new());
        let admission = Arc::new(Admission::new(cfg.scheduler.queue_capacity));
        let shared = Shared {
            registry: registry.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            admission: admission.clone(),
        };
        let threads = match cfg.preprocess_threads {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            n => n,
        };
        let thread = worker::spawn(
            shared,
            Scheduler::new(cfg.scheduler.clone()),
            rx,
            initial,
            default_model,
            load.clone(),
        );
        Engine {
            inner: Arc::new(Inner {
                tx,
                kv_budget_bytes: cfg.scheduler.kv_budget_bytes,
                max_running_rows: cfg.scheduler.max_running_rows,
                registry,
                metrics,
                health,
                admission,
                load,
                max_pixels: cfg.max_pixels,
                preprocess_threads: threads,
                preprocess_slots: Arc::new(tokio::sync::Semaphore::new(threads)),
                aborted: tokio::sync::watch::channel(false).0,
                thread: Mutex::new(Some(thread)),
            }),
        }
    }

    /// An engine for one command's own use (`caption`, `eval`, `bench-decode`): serves the
    /// bundle in `dir` (as `local`), in batches of up to `batch` images, taking no more than
    /// what the caller gives it.
    pub fn local(
        dir: &Path,
        device: crate::device::DeviceChoice,
        dtype: crate::device::DtypeChoice,
        batch: usize,
        max_pixels: u64,
    ) -> anyhow::Result<(Engine, ModelInfo)> {
        let device = device.resolve()?;
        let kind = dtype.resolve(device)?;
        let mut cfg = EngineConfig::new(device, kind);
        cfg.max_pixels = max_pixels;
        cfg.scheduler.max_batch_images = batch.max(1);
        cfg.scheduler.max_running_images = batch.max(1);
        cfg.scheduler.max_batch_delay = Duration::ZERO;
        let engine = Engine::start(cfg, &prometheus::Registry::new(), vec![], String::new());
        let info = engine
            .install_blocking("local", dir, true)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok((engine, info))
    }

    /// The model a request names, or the default.
    pub fn resolve(&self, model: Option<&str>) -> Result<ModelInfo, EngineError> {
        self.inner.registry.resolve(model)
    }

    /// Every served model, by name.
    pub fn models(&self) -> Vec<ModelInfo> {
        self.inner.registry.list()
    }

    pub fn default_model(&self) -> String {
        self.inner.registry.default_model()
    }

    pub fn readiness(&self) -> Readiness {
        Readiness {
            models: self.inner.registry.len(),
            loading: self.inner.health.loading(),
            worker_alive: self.inner.health.alive(),
            worker_answering: self.inner.health.answering(Duration::from_secs(5)),
            device_error: self.inner.health.device_failed.lock().unwrap().clone(),
        }
    }

    /// Requests waiting for the worker (not started yet).
    pub fn queued(&self) -> usize {
        self.inner.admission.queued()
    }

    pub fn metrics(&self) -> &EngineMetrics {
        &self.inner.metrics
    }

    /// How images are preprocessed for `model`.
    pub fn preprocess_config(&self, model: &ModelInfo) -> PreprocessConfig {
        pipeline::preprocess_config(&model.image, self.inner.max_pixels)
    }

    /// Captions encoded images (JPEG, PNG, …) with `model` and `opts` (already resolved
    /// against the model's defaults), scheduled by `params`. Dropping the future cancels the
    /// request and frees its rows at the next step.
    pub async fn caption(
        &self,
        model: &ModelInfo,
        images: Vec<Bytes>,
        opts: GenOptions,
        params: RequestParams,
    ) -> Result<CaptionOutput, EngineError> {
        let kv = self.check_request(model, &opts, images.len())?;
        let deadline = params.deadline;
        let work = async {
            // A place in the queue first: an overloaded server refuses before decoding images.
            let slot = self.reserve_slot()?;
            let t0 = Instant::now();
            let pixels = self.preprocess(model, images).await?;
            let preprocess_ms = t0.elapsed().as_secs_f64() * 1e3;
            let mut out = self
                .submit_and_wait(
                    model,
                    JobInput::Pixels(pixels),
                    opts,
                    params,
                    kv,
                    Some(slot),
                )
                .await?;
            out.preprocess_ms = preprocess_ms;
            Ok(out)
        };
        by_deadline(deadline, work).await
    }

    /// [`Engine::caption`] whose text arrives as it is decoded (greedy and sampling; beam
    /// search yields its result only). Every refusal that can come before decoding (queue full,
    /// a bad image, a bad prompt) comes here, before the stream.
    pub async fn caption_stream(
        &self,
        model: &ModelInfo,
        images: Vec<Bytes>,
        opts: GenOptions,
        params: RequestParams,
    ) -> Result<CaptionStream, EngineError> {
        let kv = self.check_request(model, &opts, images.len())?;
        let slot = self.reserve_slot()?;
        let t0 = Instant::now();
        let pixels = by_deadline(params.deadline, self.preprocess(model, images)).await?;
        let preprocess_ms = t0.elapsed().as_secs_f64() * 1e3;
        let (tx, deltas) = tokio::sync::mpsc::unbounded_channel();
        let (mut job, result, cancel) =
            Self::job(model, JobInput::Pixels(pixels), opts, params, kv);
        job.stream = Some(tx);
        let aborted = self.inner.aborted.subscribe();
        self.submit(job, Some(slot))?;
        Ok(CaptionStream {
            deltas,
            result,
            finished: None,
            over: false,
            aborted,
            deadline: params.deadline,
            preprocess_ms,
            cancel: CancelOnDrop {
                flag: cancel,
                done: false,
            },
        })
    }

    /// [`Engine::caption`] for callers without an async runtime (the CLI).
    pub fn caption_blocking(
        &self,
        model: &ModelInfo,
        images: &[Vec<u8>],
        opts: GenOptions,
    ) -> Result<CaptionOutput, EngineError> {
        let kv = self.check_request(model, &opts, images.len())?;
        let t0 = Instant::now();
        let cfg = self.preprocess_config(model);
        let mut pixels = Vec::with_capacity(images.len());
        let results = crate::parallel::map_chunks_on(self.inner.preprocess_threads, images, |b| {
            crate::preprocess::preprocess_bytes(b, &cfg)
        });
        for (index, r) in results.into_iter().enumerate() {
            pixels.push(r.map_err(|error| EngineError::Image { index, error })?);
        }
        let preprocess_ms = t0.elapsed().as_secs_f64() * 1e3;
        let mut out = self.submit_blocking(model, JobInput::Pixels(pixels), opts, kv)?;
        out.preprocess_ms = preprocess_ms;
        Ok(out)
    }

    /// Captions CLIP embeddings (one row of the model's embedding width per image), e.g. from a
    /// prepared dataset; blocking.
    pub fn caption_embeddings_blocking(
        &self,
        model: &ModelInfo,
        rows: Vec<Vec<f32>>,
        opts: GenOptions,
    ) -> Result<CaptionOutput, EngineError> {
        let kv = self.check_request(model, &opts, rows.len())?;
        let want = model.embedding_dim as usize;
        if let Some(index) = rows.iter().position(|r| r.len() != want) {
            return Err(EngineError::Embedding {
                index,
                got: rows[index].len(),
                want,
            });
        }
        self.submit_blocking(model, JobInput::Embeddings(rows), opts, kv)
    }

    /// Decodes and resizes on blocking threads, a bounded number at a time, in order.
    async fn preprocess(
        &self,
        model: &ModelInfo,
        images: Vec<Bytes>,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let cfg = self.preprocess_config(model);
        let mut tasks = Vec::with_capacity(images.len());
        for bytes in images {
            let permit = self.inner.preprocess_slots.clone().acquire_owned().await;
            let cfg = cfg.clone();
            tasks.push(tokio::task::spawn_blocking(move || {
                let _p = permit;
                crate::preprocess::preprocess_bytes(&bytes, &cfg)
            }));
        }
        let mut pixels = Vec::with_capacity(tasks.len());
        for (index, t) in tasks.into_iter().enumerate() {
            match t.await {
                Ok(Ok(p)) => pixels.push(p),
                Ok(Err(error)) => return Err(EngineError::Image { index, error }),
                Err(e) => {
                    return Err(EngineError::Inference(format!(
                        "preprocessing image {index} failed: {e}"
                    )))
                }
            }
        }
        Ok(pixels)
    }

    fn job(
        model: &ModelInfo,
        input: JobInput,
        opts: GenOptions,
        params: RequestParams,
        kv_bytes: u64,
    ) -> (
        Job,
        tokio::sync::oneshot::Receiver<Result<CaptionOutput, EngineError>>,
        Arc<AtomicBool>,
    ) {
        let cancel = Arc::new(AtomicBool::new(false));
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job = Job {
            model: model.name.clone(),
            version: model.version,
            input,
            opts,
            deadline: params.deadline,
            enqueued: Instant::now(),
            cancel: cancel.clone(),
            reply,
            priority: params.priority,
            stream: None,
            kv_bytes,
        };
        (job, rx, cancel)
    }

    /// What is refused before a request's images are decoded: no image, a prompt too long,
    /// more KV cache than the budget. Returns the KV cache bytes the request needs.
    fn check_request(
        &self,
        model: &ModelInfo,
        opts: &GenOptions,
        images: usize,
    ) -> Result<u64, EngineError> {
        if images == 0 {
            return Err(EngineError::NoImages);
        }
        let prompt = prompt_tokens(model, opts)? as i64;
        let need = kv_bytes(model, opts, prompt).saturating_mul(images as u64);
        let budget = self.inner.kv_budget_bytes;
        if budget > 0 && need > budget {
            return Err(EngineError::KvBudget { need, budget });
        }
        Ok(need)
    }

    /// Takes a place in the queue, or refuses at once (queue full, worker gone, aborted).
    fn reserve_slot(&self) -> Result<Slot, EngineError> {
        if *self.inner.aborted.borrow() {
            return Err(EngineError::Aborted);
        }
        if !self.inner.health.alive() {
            return Err(EngineError::Stopped);
        }
        if !self.inner.admission.try_admit() {
            return Err(EngineError::QueueFull);
        }
        Ok(Slot(Some(self.inner.admission.clone())))
    }

    /// Queues a job in `slot` (or a new one); the worker gives the slot back.
    fn submit(&self, job: Job, slot: Option<Slot>) -> Result<(), EngineError> {
        let mut slot = match slot {
            Some(s) => s,
            None => self.reserve_slot()?,
        };
        self.inner.health.in_channel.fetch_add(1, Ordering::AcqRel);
        if self.inner.tx.send(Command::Caption(Box::new(job))).is_err() {
            self.inner.health.in_channel.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Stopped);
        }
        slot.0 = None;
        Ok(())
    }

    async fn submit_and_wait(
        &self,
        model: &ModelInfo,
        input: JobInput,
        opts: GenOptions,
        params: RequestParams,
        kv_bytes: u64,
        slot: Option<Slot>,
    ) -> Result<CaptionOutput, EngineError> {
        let (job, rx, cancel) = Self::job(model, input, opts, params, kv_bytes);
        let mut aborted = self.inner.aborted.subscribe();
        self.submit(job, slot)?;
        let mut guard = CancelOnDrop {
            flag: cancel,
            done: false,
        };
        // An abort answers at once, whatever the worker is doing; the guard then marks the
        // request cancelled, and the worker drops its rows at its next step.
        let out = tokio::select! {
            r = rx => r.unwrap_or(Err(EngineError::Stopped)),
            _ = aborted.wait_for(|a| *a) => Err(EngineError::Aborted),
        };
        guard.done = out.is_ok();
        out
    }

    fn submit_blocking(
        &self,
        model: &ModelInfo,
        input: JobInput,
        opts: GenOptions,
        kv_bytes: u64,
    ) -> Result<CaptionOutput, EngineError> {
        let (job, rx, _cancel) = Self::job(model, input, opts, RequestParams::default(), kv_bytes);
        self.submit(job, None)?;
        rx.blocking_recv().unwrap_or(Err(EngineError::Stopped))
    }

    /// The KV cache budget in force (0: no limit), `kv_cache_bytes` resolved.
    pub fn kv_budget_bytes(&self) -> u64 {
        self.inner.kv_budget_bytes
    }

    /// The cap on running GPT-2 rows in force (0: no limit), `max_running_rows` resolved.
    pub fn max_running_rows(&self) -> usize {
        self.inner.max_running_rows
    }

    /// Loads the bundle in `dir` and serves it as `name` (a new version if the name exists;
    /// requests running on the old one finish there). Blocking: call from a plain thread.
    pub fn install_blocking(
        &self,
        name: &str,
        dir: &Path,
        make_default: bool,
    ) -> Result<ModelInfo, EngineError> {
        let bundle = self.load_bundle(dir)?;
        self.serve_bundle(name, bundle, make_default)
    }

    /// [`Engine::install_blocking`] from async code (loads on a blocking thread). With a
    /// `limit`, a load that takes longer is refused, and the bundle it was loading is never
    /// served (it is dropped when it arrives).
    pub async fn install(
        &self,
        name: &str,
        dir: &Path,
        make_default: bool,
        limit: Option<Duration>,
    ) -> Result<ModelInfo, EngineError> {
        const LOADING: u8 = 0;
        const COMMITTED: u8 = 1;
        const ABANDONED: u8 = 2;
        /// Gives up on the load unless it was committed: on a timeout, and also when the
        /// caller's future is dropped (a client that hung up), so a late bundle is never served.
        struct GiveUp(Arc<std::sync::atomic::AtomicU8>);
        impl Drop for GiveUp {
            fn drop(&mut self) {
                let _ = self.0.compare_exchange(
                    LOADING,
                    ABANDONED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
        }
        let state = Arc::new(std::sync::atomic::AtomicU8::new(LOADING));
        let give_up = GiveUp(state.clone());
        let (me, name, path) = (self.clone(), name.to_string(), dir.to_path_buf());
        let flag = state.clone();
        let mut task = tokio::task::spawn_blocking(move || {
            let bundle = me.load_bundle(&path)?;
            // Served only if the caller has not given up (and then it waits for this).
            flag.compare_exchange(LOADING, COMMITTED, Ordering::AcqRel, Ordering::Acquire)
                .map_err(|_| EngineError::Load {
                    dir: path.clone(),
                    reason: "the caller gave up waiting".into(),
                })?;
            me.serve_bundle(&name, bundle, make_default)
        });
        let joined = |r: Result<Result<ModelInfo, EngineError>, tokio::task::JoinError>| {
            r.map_err(|e| EngineError::Inference(format!("loading thread: {e}")))?
        };
        let Some(limit) = limit else {
            return joined(task.await);
        };
        match tokio::time::timeout(limit, &mut task).await {
            Ok(r) => joined(r),
            Err(_) => {
                drop(give_up);
                if state.load(Ordering::Acquire) == ABANDONED {
                    Err(EngineError::Load {
                        dir: dir.to_path_buf(),
                        reason: format!(
                            "the bundle did not load within {} ms (load_timeout_ms)",
                            limit.as_millis()
                        ),
                    })
                } else {
                    // Loaded just in time: it is being served; report that.
                    joined(task.await)
                }
            }
        }
    }

    /// Reads and checks a bundle. libtorch reports some failures by panicking (tch's
    /// non-`f_` calls): a bad bundle is still only a load error, with the message's first line.
    fn load_bundle(&self, dir: &Path) -> Result<Bundle, EngineError> {
        let loaded =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.inner.load)(dir)))
                .unwrap_or_else(|p| {
                    let text = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "loading panicked".into());
                    Err(anyhow::anyhow!(
                        "{}",
                        text.lines().next().unwrap_or("loading panicked")
                    ))
                });
        loaded.map_err(|e| EngineError::Load {
            dir: dir.to_path_buf(),
            reason: format!("{e:#}"),
        })
    }

    /// Hands a loaded bundle to the worker to serve as `name`.
    fn serve_bundle(
        &self,
        name: &str,
        bundle: Bundle,
        make_default: bool,
    ) -> Result<ModelInfo, EngineError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.inner
            .tx
            .send(Command::Install {
                name: name.to_string(),
                bundle: Box::new(bundle),
                make_default,
                reply,
            })
            .map_err(|_| EngineError::Stopped)?;
        rx.blocking_recv().map_err(|_| EngineError::Stopped)
    }

    /// Stops serving `name` (requests already running on it finish).
    pub async fn unload(&self, name: &str) -> Result<(), EngineError> {
        let reply = self.send_unload(name)?;
        unloaded(name, reply.await.ok())
    }

    /// [`Engine::unload`] for callers without an async runtime.
    pub fn unload_blocking(&self, name: &str) -> Result<(), EngineError> {
        let reply = self.send_unload(name)?;
        unloaded(name, reply.blocking_recv().ok())
    }

    fn send_unload(&self, name: &str) -> Result<tokio::sync::oneshot::Receiver<bool>, EngineError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.inner
            .tx
            .send(Command::Unload {
                name: name.to_string(),
                reply,
            })
            .map_err(|_| EngineError::Stopped)?;
        Ok(rx)
    }

    /// Makes the served model `name` the one requests without a model get; false if no model
    /// of that name is served.
    pub fn set_default(&self, name: &str) -> bool {
        self.inner.registry.set_default(name)
    }

    /// Gives up on every waiting request (they get [`EngineError::Aborted`]) and refuses new
    /// ones; for a shutdown whose grace period is over.
    pub fn abort(&self) {
        self.inner.aborted.send_replace(true);
    }

    /// Lets the worker finish what it has, then ends it (blocking; idempotent).
    pub fn shutdown(&self) {
        let _ = self.inner.tx.send(Command::Shutdown);
        if let Some(t) = self.inner.thread.lock().unwrap().take() {
            let _ = t.join();
        }
    }

    /// Parks the worker at its next loop turn until the returned guard drops (tests: requests
    /// then wait in the queue, deterministically). Returns once the worker is parked.
    #[doc(hidden)]
    pub fn hold(&self) -> Hold {
        self.inner.health.set_hold(true);
        let _ = self.inner.tx.send(Command::Wake);
        assert!(
            self.inner.health.wait_parked(Duration::from_secs(60)),
            "the inference worker did not reach its gate"
        );
        Hold(self.inner.health.clone())
    }

    /// Caption requests handed to the worker and not yet taken by it (tests: "it reached the
    /// queue", past preprocessing).
    #[doc(hidden)]
    pub fn captions_in_channel(&self) -> usize {
        self.inner.health.in_channel.load(Ordering::Acquire)
    }

    /// Commands waiting in the worker's channel, of every kind (tests).
    #[doc(hidden)]
    pub fn commands_waiting(&self) -> usize {
        self.inner.tx.len()
    }

    /// Makes the worker fail on purpose (tests of the failure paths).
    #[doc(hidden)]
    pub fn inject_fault(&self, fault: Fault) {
        self.inner
            .health
            .fault
            .store(fault as u8, Ordering::Release);
    }
}

/// The worker's answer to an unload: whether it served `name` (`None`: it stopped).
fn unloaded(name: &str, answer: Option<bool>) -> Result<(), EngineError> {
    match answer {
        Some(true) => Ok(()),
        Some(false) => Err(EngineError::NotLoaded(name.to_string())),
        None => Err(EngineError::Stopped),
    }
}

/// The prompt's length in `model`'s tokens; a prompt longer than
/// [`crate::options::MAX_PROMPT_TOKENS`] is refused.
pub fn prompt_tokens(model: &ModelInfo, opts: &GenOptions) -> Result<usize, EngineError> {
    use crate::options::{OptionError, MAX_PROMPT_TOKENS};
    if opts.prompt.is_empty() {
        return Ok(0);
    }
    let tokens =
        crate::model::bundle::encode_prompt(&model.tokenizer, &opts.prompt).map_err(|e| {
            EngineError::InvalidOption(OptionError {
                field: "prompt",
                message: format!("{e:#}"),
            })
        })?;
    if tokens.len() > MAX_PROMPT_TOKENS {
        return Err(EngineError::InvalidOption(OptionError {
            field: "prompt",
            message: format!("{} tokens; at most {MAX_PROMPT_TOKENS}", tokens.len()),
        }));
    }
    Ok(tokens.len())
}

/// The KV budget in bytes (0: no limit): the configured one, or with `kv_cache_bytes = 0`,
/// on CUDA [`AUTO_KV_SHARE`] of the device memory free at start (`memory`), leaving the rest
/// to the weights, the allocator's spare blocks and training jobs; on the CPU no limit.
pub fn kv_budget(configured: u64, memory: anyhow::Result<Option<(u64, u64)>>) -> u64 {
    if configured > 0 {
        return configured;
    }
    match memory {
        Ok(Some((free, total))) => {
            let budget = (free as f64 * AUTO_KV_SHARE) as u64;
            tracing::info!(
                free,
                total,
                budget,
                "KV cache budget from the device's free memory"
            );
            budget
        }
        Ok(None) => 0,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "no KV cache budget: set kv_cache_bytes");
            0
        }
    }
}

/// The share of a CUDA device's free memory that `kv_cache_bytes = 0` gives the KV caches.
pub const AUTO_KV_SHARE: f64 = 0.7;

/// The KV cache one image of `model` needs with `opts`: keys and values for every row
/// (beams or samples) at every position (prefix, prompt, generated), every layer; twice that
/// for beam search, whose reorder gathers into a spare buffer of the same size.
pub fn kv_bytes(model: &ModelInfo, opts: &GenOptions, prompt_tokens: i64) -> u64 {
    let elem = match model.dtype.as_str() {
        "f32" => 4,
        "f64" => 8,
        _ => 2,
    };
    let positions = model.prefix_length + prompt_tokens + opts.max_tokens + 1;
    let copies = if opts.strategy == crate::options::Strategy::Beam {
        2
    } else {
        1
    };
    (opts.rows_per_image() * positions * 2 * model.gpt2_layers * model.gpt2_width * elem * copies)
        as u64
}

/// `work`'s result, or [`EngineError::Deadline`] once `deadline` passes.
async fn by_deadline<T>(
    deadline: Option<Instant>,
    work: impl std::future::Future<Output = Result<T, EngineError>>,
) -> Result<T, EngineError> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d.into(), work)
            .await
            .unwrap_or_else(|_| {
                Err(EngineError::Deadline(
                    "no captions before the request's deadline".into(),
                ))
            }),
        None => work.await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configured budget wins; `0` takes a share of a CUDA device's free memory, means no
    /// limit off CUDA, and no limit (with a warning) when the device cannot be read.
    #[test]
    fn the_kv_budget_defaults_from_the_devices_free_memory() {
        const GIB: u64 = 1 << 30;
        assert_eq!(kv_budget(8 * GIB, Ok(Some((70 * GIB, 80 * GIB)))), 8 * GIB);
        assert_eq!(kv_budget(0, Ok(Some((10 * GIB, 80 * GIB)))), 7 * GIB);
        assert_eq!(kv_budget(0, Ok(None)), 0);
        assert_eq!(
            kv_budget(0, Err(anyhow::anyhow!("no CUDA GPUs are available"))),
            0
        );
        // What the CPU engine gets from the real device query.
        assert_eq!(kv_budget(0, crate::cuda::memory(Device::Cpu)), 0);
    }
}
