//! The inference worker: one thread per device that owns the models and batches work.
//!
//! HTTP handlers never touch tch. They preprocess images on blocking threads and send a
//! [`CaptionJob`] through a bounded queue. The worker loop:
//! 1. takes waiting jobs (up to `max_batch_images` images, waiting at most
//!    `max_batch_delay_ms` after the first when idle) — and, with continuous batching, also
//!    while a decode is running, so newcomers join at the next step boundary;
//! 2. runs **one** encoder forward per model for the new images;
//! 3. adds them to that model's [`Decoder`] (cohorts by options) and runs one decode step for
//!    every running image;
//! 4. answers each job the moment all its images are final, and drops rows of jobs whose
//!    client went away or whose deadline passed.
use crate::generate::{Caption, Decoder, GenOptions};
use crate::model::bundle::{Bundle, ImageSpec};
use crate::serve::error::ApiError;
use crate::serve::metrics::Metrics;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Loads a bundle directory on the inference thread (device and dtype already chosen).
pub type BundleLoader = Arc<dyn Fn(&std::path::Path) -> anyhow::Result<Bundle> + Send + Sync>;

/// Scheduling knobs (from `[inference]`).
#[derive(Clone, Debug)]
pub struct BatchConfig {
    pub max_batch_images: usize,
    pub max_batch_delay: Duration,
    pub continuous: bool,
    pub max_running_images: usize,
}

/// A caption request as the worker sees it: preprocessed pixels and decoding options.
pub struct CaptionJob {
    pub model: String,
    pub pixels: Vec<Vec<f32>>,
    pub opts: GenOptions,
    pub deadline: Option<Instant>,
    pub enqueued: Instant,
    /// Set by the handler when the client goes away or the deadline passes.
    pub cancel: Arc<AtomicBool>,
    pub reply: oneshot::Sender<Result<JobOutput, ApiError>>,
}

#[derive(Debug, Serialize)]
pub struct ImageOutput {
    pub captions: Vec<Caption>,
    pub queue_ms: f64,
    pub encode_ms: f64,
    pub decode_ms: f64,
    /// Rows (all images × beams) in the decode batch when this image joined.
    pub batch_rows: i64,
}

#[derive(Debug)]
pub struct JobOutput {
    pub model: String,
    pub images: Vec<ImageOutput>,
}

/// What else the worker can be asked to do.
pub enum Command {
    Caption(CaptionJob),
    /// Serve `bundle` as `name` from now on (replacing any model of that name; requests already
    /// running finish on the old one).
    Install {
        name: String,
        bundle: Box<Bundle>,
        make_default: bool,
        reply: oneshot::Sender<Result<ModelInfo, String>>,
    },
    Unload {
        name: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// What handlers may know about a served model.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub dir: PathBuf,
    pub device: String,
    pub dtype: String,
    pub image: ImageSpec,
    pub prefix_length: i64,
    pub mapping: String,
    pub gpt2_layers: i64,
    pub gpt2_width: i64,
    pub generation: GenOptions,
    /// Increments each time a model is installed under this name.
    pub version: u64,
    pub loaded_at_unix: u64,
}

/// State shared between the worker and the handlers.
pub struct Shared {
    pub models: RwLock<HashMap<String, ModelInfo>>,
    pub default_model: RwLock<String>,
    /// Milliseconds since `started` at the worker's last loop turn.
    pub heartbeat_ms: AtomicU64,
    pub started: Instant,
    pub metrics: Metrics,
    pub worker_alive: AtomicBool,
}

impl Shared {
    pub fn new() -> Self {
        Shared {
            models: RwLock::new(HashMap::new()),
            default_model: RwLock::new(String::new()),
            heartbeat_ms: AtomicU64::new(0),
            started: Instant::now(),
            metrics: Metrics::new(),
            worker_alive: AtomicBool::new(false),
        }
    }

    fn beat(&self) {
        self.heartbeat_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether the worker turned its loop within `within`.
    pub fn worker_answering(&self, within: Duration) -> bool {
        let last = self.heartbeat_ms.load(Ordering::Relaxed);
        let now = self.started.elapsed().as_millis() as u64;
        self.worker_alive.load(Ordering::Relaxed)
            && now.saturating_sub(last) <= within.as_millis() as u64
    }

    /// The model a request names, or the default.
    pub fn resolve(&self, name: Option<&str>) -> Result<ModelInfo, ApiError> {
        let models = self.models.read().unwrap();
        let name = match name {
            Some(n) => n.to_string(),
            None => self.default_model.read().unwrap().clone(),
        };
        models.get(&name).cloned().ok_or_else(|| {
            if models.is_empty() {
                ApiError::Unavailable("no model is loaded yet".into())
            } else {
                let mut names: Vec<_> = models.keys().cloned().collect();
                names.sort();
                ApiError::option(
                    "model",
                    format!("unknown model {name:?}; served: {}", names.join(", ")),
                )
            }
        })
    }
}

impl Default for Shared {
    fn default() -> Self {
        Self::new()
    }
}

/// The sending side, held by handlers.
#[derive(Clone)]
pub struct WorkerHandle {
    tx: Sender<Command>,
}

impl WorkerHandle {
    /// Queues a command; a full queue is 503, a stopped worker too.
    pub fn submit(&self, cmd: Command) -> Result<(), ApiError> {
        match self.tx.try_send(cmd) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(ApiError::Unavailable(
                "the inference queue is full; retry shortly".into(),
            )),
            Err(TrySendError::Disconnected(_)) => Err(ApiError::Unavailable(
                "the inference worker has stopped".into(),
            )),
        }
    }

    pub fn queued(&self) -> usize {
        self.tx.len()
    }
}

/// Starts the worker thread. Models in `initial` are loaded there, in order; the first is the
/// default unless `default_model` names another. Returns when the thread is started (models
/// may still be loading: /ready tells).
pub fn spawn(
    shared: Arc<Shared>,
    cfg: BatchConfig,
    queue_capacity: usize,
    initial: Vec<(String, PathBuf)>,
    default_model: String,
    load: BundleLoader,
) -> (WorkerHandle, std::thread::JoinHandle<()>) {
    let (tx, rx) = crossbeam_channel::bounded(queue_capacity.max(1));
    let handle = std::thread::Builder::new()
        .name("clipcap-inference".into())
        .spawn(move || {
            shared.worker_alive.store(true, Ordering::Relaxed);
            shared.beat();
            let mut w = Worker::new(shared.clone(), cfg, rx);
            for (i, (name, dir)) in initial.iter().enumerate() {
                match load(dir) {
                    Ok(b) => {
                        let make_default = if default_model.is_empty() { i == 0 } else { *name == default_model };
                        let info = w.install(name.clone(), b, make_default);
                        tracing::info!(model = %info.name, dir = %dir.display(), device = %info.device, dtype = %info.dtype, "model loaded");
                    }
                    Err(e) => tracing::error!(model = %name, dir = %dir.display(), error = format!("{e:#}"), "cannot load model"),
                }
                shared.beat();
            }
            w.run();
            shared.worker_alive.store(false, Ordering::Relaxed);
        })
        .expect("spawning the inference thread");
    (WorkerHandle { tx }, handle)
}

struct ActiveJob {
    reply: Option<oneshot::Sender<Result<JobOutput, ApiError>>>,
    model: String,
    outputs: Vec<Option<ImageOutput>>,
    remaining: usize,
    cancel: Arc<AtomicBool>,
    deadline: Option<Instant>,
    /// Image ids in the decoder, to cancel them.
    image_ids: Vec<u64>,
    decoder: usize,
}

struct ImageSlot {
    job: u64,
    index: usize,
    queue_ms: f64,
    encode_ms: f64,
    started: Instant,
    batch_rows: i64,
}

struct Worker {
    shared: Arc<Shared>,
    cfg: BatchConfig,
    rx: Receiver<Command>,
    models: HashMap<String, Arc<Bundle>>,
    versions: HashMap<String, u64>,
    /// One decoder per bundle instance; a swapped-out bundle keeps its decoder until empty.
    decoders: Vec<Decoder>,
    pending: VecDeque<CaptionJob>,
    jobs: HashMap<u64, ActiveJob>,
    images: HashMap<u64, ImageSlot>,
    next_id: u64,
    disconnected: bool,
}

impl Worker {
    fn new(shared: Arc<Shared>, cfg: BatchConfig, rx: Receiver<Command>) -> Self {
        Worker {
            shared,
            cfg,
            rx,
            models: HashMap::new(),
            versions: HashMap::new(),
            decoders: vec![],
            pending: VecDeque::new(),
            jobs: HashMap::new(),
            images: HashMap::new(),
            next_id: 0,
            disconnected: false,
        }
    }

    fn running_images(&self) -> usize {
        self.decoders.iter().map(|d| d.images()).sum()
    }

    fn install(&mut self, name: String, bundle: Bundle, make_default: bool) -> ModelInfo {
        let version = {
            let v = self.versions.entry(name.clone()).or_insert(0);
            *v += 1;
            *v
        };
        let m = &bundle.manifest;
        let info = ModelInfo {
            name: name.clone(),
            dir: bundle.dir.clone(),
            device: crate::device::device_name(bundle.device),
            dtype: crate::device::dtype_name(bundle.kind).into(),
            image: m.image.clone(),
            prefix_length: m.mapper.prefix_length,
            mapping: format!("{:?}", m.mapper.mapping).to_lowercase(),
            gpt2_layers: m.gpt2.n_layer,
            gpt2_width: m.gpt2.n_embd,
            generation: m.generation.clone(),
            version,
            loaded_at_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let metrics = &self.shared.metrics;
        if let Some(old) = self.shared.models.read().unwrap().get(&name) {
            let _ = metrics.model_info.remove_label_values(&[
                &old.name,
                &old.device,
                &old.dtype,
                &old.version.to_string(),
            ]);
        }
        metrics
            .model_info
            .with_label_values(&[&info.name, &info.device, &info.dtype, &version.to_string()])
            .set(1);
        self.models.insert(name.clone(), Arc::new(bundle));
        self.shared
            .models
            .write()
            .unwrap()
            .insert(name.clone(), info.clone());
        let mut default = self.shared.default_model.write().unwrap();
        if make_default || default.is_empty() {
            *default = name;
        }
        info
    }

    fn run(&mut self) {
        loop {
            self.shared.beat();
            if self.disconnected && self.jobs.is_empty() && self.pending.is_empty() {
                return;
            }
            let busy = self.decoders.iter().any(|d| !d.is_empty());
            self.intake(busy);
            self.shared
                .metrics
                .queue_depth
                .set((self.rx.len() + self.pending.len()) as i64);
            self.reap_cancelled();
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| -> anyhow::Result<()> {
                self.start_pending()?;
                self.step_all()
            }));
            let failure = match result {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("{e:#}")),
                Err(p) => Some(
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panic".into()),
                ),
            };
            if let Some(msg) = failure {
                tracing::error!(error = %msg, "inference failed; failing running requests");
                self.fail_all(&msg);
            }
            self.decoders.retain(|d| {
                !d.is_empty() || self.models.values().any(|m| Arc::ptr_eq(m, d.model()))
            });
        }
    }

    /// Moves commands from the queue into `pending` (or executes admin commands).
    fn intake(&mut self, busy: bool) {
        if busy && !self.cfg.continuous {
            return;
        }
        let has_work = busy || !self.pending.is_empty();
        let first = if has_work {
            match self.rx.try_recv() {
                Ok(c) => Some(c),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => {
                    self.disconnected = true;
                    None
                }
            }
        } else {
            match self.rx.recv_timeout(Duration::from_millis(500)) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    self.disconnected = true;
                    None
                }
            }
        };
        let Some(first) = first else { return };
        self.accept(first);
        // Gather more for the same encoder batch, waiting only when nothing is running.
        let until = Instant::now()
            + if busy {
                Duration::ZERO
            } else {
                self.cfg.max_batch_delay
            };
        while self.pending_images() < self.cfg.max_batch_images {
            let next = if busy || self.cfg.max_batch_delay.is_zero() {
                self.rx.try_recv().ok()
            } else {
                let now = Instant::now();
                if now >= until {
                    self.rx.try_recv().ok()
                } else {
                    self.rx.recv_timeout(until - now).ok()
                }
            };
            match next {
                Some(c) => self.accept(c),
                None => break,
            }
        }
    }

    fn pending_images(&self) -> usize {
        self.pending.iter().map(|j| j.pixels.len()).sum()
    }

    fn accept(&mut self, cmd: Command) {
        match cmd {
            Command::Caption(job) => self.pending.push_back(job),
            Command::Install {
                name,
                bundle,
                make_default,
                reply,
            } => {
                let info = self.install(name, *bundle, make_default);
                tracing::info!(model = %info.name, version = info.version, "model installed");
                let _ = reply.send(Ok(info));
            }
            Command::Unload { name, reply } => {
                let r = if self.models.remove(&name).is_some() {
                    if let Some(old) = self.shared.models.write().unwrap().remove(&name) {
                        let _ = self.shared.metrics.model_info.remove_label_values(&[
                            &old.name,
                            &old.device,
                            &old.dtype,
                            &old.version.to_string(),
                        ]);
                    }
                    let mut d = self.shared.default_model.write().unwrap();
                    if *d == name {
                        *d = self.models.keys().min().cloned().unwrap_or_default();
                    }
                    Ok(())
                } else {
                    Err(format!("no model named {name:?}"))
                };
                let _ = reply.send(r);
            }
        }
    }

    /// Encodes pending jobs (one encoder forward per model, in chunks of max_batch_images) and
    /// adds them to their decoders, as long as running images stay under the limit.
    fn start_pending(&mut self) -> anyhow::Result<()> {
        let mut room = self
            .cfg
            .max_running_images
            .saturating_sub(self.running_images());
        let mut batch: Vec<CaptionJob> = vec![];
        while let Some(job) = self.pending.front() {
            let n = job.pixels.len();
            let fits = n <= room || (batch.is_empty() && self.running_images() == 0);
            if !fits || (!batch.is_empty() && self.count(&batch) + n > self.cfg.max_batch_images) {
                break;
            }
            room = room.saturating_sub(n);
            batch.push(self.pending.pop_front().unwrap());
        }
        // Jobs cancelled while queued are dropped here.
        let metrics = &self.shared.metrics;
        let now = Instant::now();
        batch.retain(|j| {
            let outcome = if j.deadline.is_some_and(|d| now >= d) {
                "deadline"
            } else if j.cancel.load(Ordering::Relaxed) || j.reply.is_closed() {
                "cancelled"
            } else {
                return true;
            };
            metrics
                .images
                .with_label_values(&[&j.model, outcome])
                .inc_by(j.pixels.len() as u64);
            false
        });
        let mut by_model: Vec<(Arc<Bundle>, Vec<CaptionJob>)> = vec![];
        for job in batch {
            let Some(model) = self.models.get(&job.model).cloned() else {
                let _ = job.reply.send(Err(ApiError::Unavailable(format!(
                    "model {:?} was unloaded; retry",
                    job.model
                ))));
                continue;
            };
            let want = (3 * model.manifest.image.size * model.manifest.image.size) as usize;
            if job.pixels.iter().any(|p| p.len() != want) {
                let _ = job.reply.send(Err(ApiError::Unavailable(
                    "the model changed while the request was queued; retry".into(),
                )));
                continue;
            }
            match by_model.iter_mut().find(|(m, _)| Arc::ptr_eq(m, &model)) {
                Some((_, v)) => v.push(job),
                None => by_model.push((model, vec![job])),
            }
        }
        for (model, jobs) in by_model {
            self.start_jobs(model, jobs)?;
        }
        Ok(())
    }

    fn count(&self, jobs: &[CaptionJob]) -> usize {
        jobs.iter().map(|j| j.pixels.len()).sum()
    }

    fn start_jobs(&mut self, model: Arc<Bundle>, jobs: Vec<CaptionJob>) -> anyhow::Result<()> {
        let metrics = &self.shared.metrics;
        let picked = Instant::now();
        let pixels: Vec<&[f32]> = jobs
            .iter()
            .flat_map(|j| j.pixels.iter().map(|p| p.as_slice()))
            .collect();
        let t0 = Instant::now();
        let emb = crate::pipeline::encode(&model, &pixels, self.cfg.max_batch_images)?;
        let encode_ms = t0.elapsed().as_secs_f64() * 1e3;
        metrics.encode_batch_size.observe(pixels.len() as f64);
        metrics.encode_duration.observe(encode_ms / 1e3);
        let di = match self
            .decoders
            .iter()
            .position(|d| Arc::ptr_eq(d.model(), &model))
        {
            Some(i) => i,
            None => {
                self.decoders.push(Decoder::new(model.clone()));
                self.decoders.len() - 1
            }
        };
        // Cohorts: images with equal options decode together.
        let mut row = 0i64;
        let mut groups: Vec<(GenOptions, Vec<i64>, Vec<u64>)> = vec![];
        for job in jobs {
            let job_id = self.next_id;
            self.next_id += 1;
            let queue_ms = picked.duration_since(job.enqueued).as_secs_f64() * 1e3;
            let n = job.pixels.len();
            let mut ids = vec![];
            for index in 0..n {
                let id = self.next_id;
                self.next_id += 1;
                metrics.queue_duration.observe(queue_ms / 1e3);
                self.images.insert(
                    id,
                    ImageSlot {
                        job: job_id,
                        index,
                        queue_ms,
                        encode_ms,
                        started: Instant::now(),
                        batch_rows: 0,
                    },
                );
                ids.push(id);
                match groups.iter_mut().find(|g| g.0 == job.opts) {
                    Some(g) => {
                        g.1.push(row);
                        g.2.push(id);
                    }
                    None => groups.push((job.opts.clone(), vec![row], vec![id])),
                }
                row += 1;
            }
            self.jobs.insert(
                job_id,
                ActiveJob {
                    reply: Some(job.reply),
                    model: job.model,
                    outputs: (0..n).map(|_| None).collect(),
                    remaining: n,
                    cancel: job.cancel,
                    deadline: job.deadline,
                    image_ids: ids,
                    decoder: di,
                },
            );
        }
        for (opts, rows, ids) in groups {
            let idx = tch::Tensor::from_slice(&rows).to_device(emb.device());
            let sub = emb.index_select(0, &idx);
            let done = self.decoders[di].add(&sub, &opts, ids.clone())?;
            let rows_now = self.decoders[di].rows();
            for id in &ids {
                if let Some(s) = self.images.get_mut(id) {
                    s.batch_rows = rows_now;
                }
            }
            self.deliver(done);
        }
        Ok(())
    }

    fn step_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.decoders.len() {
            if self.decoders[i].is_empty() {
                continue;
            }
            let rows = self.decoders[i].rows();
            let m = &self.shared.metrics;
            m.decode_batch_rows.observe(rows as f64);
            m.decode_batch_images
                .observe(self.decoders[i].images() as f64);
            m.generated_tokens.inc_by(rows as u64);
            let done = self.decoders[i].step()?;
            self.deliver(done);
        }
        Ok(())
    }

    fn deliver(&mut self, done: Vec<crate::generate::Finished>) {
        for f in done {
            let Some(slot) = self.images.remove(&f.id) else {
                continue;
            };
            let Some(job) = self.jobs.get_mut(&slot.job) else {
                continue;
            };
            let decode_ms = slot.started.elapsed().as_secs_f64() * 1e3;
            self.shared.metrics.decode_duration.observe(decode_ms / 1e3);
            job.outputs[slot.index] = Some(ImageOutput {
                captions: f.captions,
                queue_ms: slot.queue_ms,
                encode_ms: slot.encode_ms,
                decode_ms,
                batch_rows: slot.batch_rows,
            });
            job.remaining -= 1;
            if job.remaining == 0 {
                let job = self.jobs.remove(&slot.job).unwrap();
                self.shared
                    .metrics
                    .images
                    .with_label_values(&[&job.model, "ok"])
                    .inc_by(job.outputs.len() as u64);
                let out = JobOutput {
                    model: job.model,
                    images: job.outputs.into_iter().map(|o| o.unwrap()).collect(),
                };
                if let Some(r) = job.reply {
                    let _ = r.send(Ok(out));
                }
            }
        }
    }

    /// Frees the rows of jobs whose client left (handler dropped) or whose deadline passed.
    fn reap_cancelled(&mut self) {
        let now = Instant::now();
        let gone: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, j)| {
                j.cancel.load(Ordering::Relaxed)
                    || j.deadline.is_some_and(|d| now >= d)
                    || j.reply.as_ref().is_some_and(|r| r.is_closed())
            })
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            let mut job = self.jobs.remove(&id).unwrap();
            for img in &job.image_ids {
                self.images.remove(img);
                if let Some(d) = self.decoders.get_mut(job.decoder) {
                    d.cancel(*img);
                }
            }
            let outcome = if job.deadline.is_some_and(|d| now >= d) {
                "deadline"
            } else {
                "cancelled"
            };
            self.shared
                .metrics
                .images
                .with_label_values(&[&job.model, outcome])
                .inc_by(job.image_ids.len() as u64);
            if let Some(r) = job.reply.take() {
                let _ = r.send(Err(ApiError::DeadlineExceeded(
                    "the request's deadline passed before its captions were ready".into(),
                )));
            }
        }
        // Queued jobs past their deadline, or whose client left, never start.
        let mut kept = VecDeque::new();
        for job in std::mem::take(&mut self.pending) {
            let outcome = if job.deadline.is_some_and(|d| now >= d) {
                "deadline"
            } else if job.cancel.load(Ordering::Relaxed) || job.reply.is_closed() {
                "cancelled"
            } else {
                kept.push_back(job);
                continue;
            };
            self.shared
                .metrics
                .images
                .with_label_values(&[&job.model, outcome])
                .inc_by(job.pixels.len() as u64);
            let _ = job.reply.send(Err(ApiError::DeadlineExceeded(
                "the request's deadline passed while it was queued".into(),
            )));
        }
        self.pending = kept;
    }

    fn fail_all(&mut self, msg: &str) {
        for (_, mut job) in self.jobs.drain() {
            if let Some(r) = job.reply.take() {
                let _ = r.send(Err(ApiError::Internal(format!("inference failed: {msg}"))));
            }
        }
        self.images.clear();
        let models: Vec<_> = self.decoders.iter().map(|d| d.model().clone()).collect();
        self.decoders = models.into_iter().map(Decoder::new).collect();
    }
}
