//! The inference worker: one thread per device that owns the bundles and does all tensor work.
//!
//! Its loop, each turn:
//! 1. takes new commands (captions join the [`Scheduler`]'s queue; installs and unloads run at
//!    once, between steps), waiting for more only when idle and only `max_batch_delay`;
//! 2. reaps queued and running requests whose deadline passed or whose caller left;
//! 3. starts what the scheduler picks: **one** encoder forward per model for the new images,
//!    then adds them to that model's [`Decoder`] (cohorts by options);
//! 4. runs one decode step for every running image and answers each request the moment all
//!    its images are final.
//!
//! A failure (error or panic) inside 3-4 fails the requests that were running and the worker
//! goes on with fresh decoders; a panic elsewhere ends the thread, and the engine reports it.
use crate::engine::error::EngineError;
use crate::engine::metrics::EngineMetrics;
use crate::engine::registry::{ModelInfo, Registry};
use crate::engine::scheduler::{reap_reason, Admission, Reaped, Schedulable, Scheduler};
use crate::engine::{CaptionOutput, Delta, ImageOutput};
use crate::generate::{Decoder, Finished, NewImage, Streamed};
use crate::model::bundle::Bundle;
use crate::options::{GenOptions, Strategy};
use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Loads a bundle directory (device and dtype already chosen).
pub type BundleLoader = Arc<dyn Fn(&std::path::Path) -> anyhow::Result<Bundle> + Send + Sync>;

/// What a request brings: preprocessed pixels `[3·S·S]` per image, or CLIP embeddings `[D]`
/// per image (prepared datasets).
pub enum JobInput {
    Pixels(Vec<Vec<f32>>),
    Embeddings(Vec<Vec<f32>>),
}

impl JobInput {
    pub(crate) fn len(&self) -> usize {
        match self {
            JobInput::Pixels(v) | JobInput::Embeddings(v) => v.len(),
        }
    }
}

/// A caption request as the worker sees it.
pub struct Job {
    pub model: String,
    /// The version the request was validated against; it runs on that one.
    pub version: u64,
    pub input: JobInput,
    pub opts: GenOptions,
    pub deadline: Option<Instant>,
    pub enqueued: Instant,
    /// Set by the engine when its caller goes away.
    pub cancel: Arc<AtomicBool>,
    pub reply: oneshot::Sender<Result<CaptionOutput, EngineError>>,
    /// Lower starts first.
    pub priority: i32,
    /// Where a streamed request's text goes as it is decoded (greedy and sampling).
    pub stream: Option<tokio::sync::mpsc::UnboundedSender<Delta>>,
    /// The KV cache it needs while decoding (admission counts these against the budget).
    pub kv_bytes: u64,
}

impl Schedulable for Job {
    fn images(&self) -> usize {
        self.input.len()
    }
    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
    fn abandoned(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.reply.is_closed()
    }
    fn priority(&self) -> i32 {
        self.priority
    }
    fn kv_bytes(&self) -> u64 {
        self.kv_bytes
    }
    fn rows(&self) -> usize {
        self.input.len() * self.opts.rows_per_image() as usize
    }
}

/// What the worker can be asked to do.
pub enum Command {
    Caption(Box<Job>),
    /// Serve `bundle` as `name` from now on (requests already running finish on the old one).
    Install {
        name: String,
        bundle: Box<Bundle>,
        make_default: bool,
        reply: oneshot::Sender<ModelInfo>,
    },
    Unload {
        name: String,
        reply: oneshot::Sender<bool>,
    },
    /// Finish what is queued and running, then end the thread.
    Shutdown,
    /// Nothing; wakes an idle worker (so it sees a hold at once).
    Wake,
}

/// Faults a test can inject to see the failure paths (never set in production).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    None = 0,
    /// Panic inside the next decode step (the running requests fail; the worker recovers).
    PanicInStep = 1,
    /// Panic outside the recovery boundary (the worker thread dies).
    KillWorker = 2,
    /// The next request joining a decode runs out of device memory (only it fails).
    OomInJoin = 3,
    /// The next decode step hits a device error that does not go away (the engine goes
    /// unready).
    DeviceErrorInStep = 4,
}

/// Liveness, shared with every engine handle.
pub struct Health {
    started: Instant,
    /// Milliseconds since `started` at the worker's last loop turn.
    heartbeat_ms: AtomicU64,
    alive: AtomicBool,
    /// The start-up models are still loading (the server is not ready until all have).
    loading: AtomicBool,
    pub(crate) fault: AtomicU8,
    /// Caption requests sent to the worker and not yet taken by it (tests wait on this).
    pub(crate) in_channel: std::sync::atomic::AtomicUsize,
    /// A device error that does not go away (not an out-of-memory) was seen: every later
    /// request would fail too, so the engine reports itself unready.
    pub(crate) device_failed: std::sync::Mutex<Option<String>>,
    /// A test's hold on the worker.
    gate: std::sync::Mutex<Gate>,
    gate_changed: std::sync::Condvar,
}

/// `epoch` counts releases: a release lets the worker out for at least one loop turn even if
/// the worker is held again at once, and a new hold waits until it parks in the new epoch.
#[derive(Default)]
struct Gate {
    held: bool,
    epoch: u64,
    parked_in: Option<u64>,
}

impl Health {
    /// Whether the start-up models are still loading.
    pub fn loading(&self) -> bool {
        self.loading.load(Ordering::Acquire)
    }

    pub fn new() -> Self {
        Health {
            started: Instant::now(),
            heartbeat_ms: AtomicU64::new(0),
            alive: AtomicBool::new(false),
            loading: AtomicBool::new(true),
            fault: AtomicU8::new(Fault::None as u8),
            in_channel: std::sync::atomic::AtomicUsize::new(0),
            device_failed: std::sync::Mutex::new(None),
            gate: std::sync::Mutex::new(Gate::default()),
            gate_changed: std::sync::Condvar::new(),
        }
    }

    /// Parks the worker here while a test holds it.
    fn pass_gate(&self) {
        let mut g = self.gate.lock().unwrap();
        if g.held {
            let epoch = g.epoch;
            g.parked_in = Some(epoch);
            self.gate_changed.notify_all();
            while g.held && g.epoch == epoch {
                g = self.gate_changed.wait(g).unwrap();
            }
            g.parked_in = None;
        }
    }

    pub(crate) fn set_hold(&self, held: bool) {
        let mut g = self.gate.lock().unwrap();
        if !held && g.held {
            g.epoch += 1;
        }
        g.held = held;
        self.gate_changed.notify_all();
    }

    /// Waits until the worker is parked at the gate in the current epoch (or dead); false on
    /// timeout.
    pub(crate) fn wait_parked(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        let mut g = self.gate.lock().unwrap();
        while g.parked_in != Some(g.epoch) && self.alive() {
            let now = Instant::now();
            if now >= until {
                return false;
            }
            g = self.gate_changed.wait_timeout(g, until - now).unwrap().0;
        }
        g.parked_in == Some(g.epoch)
    }

    fn beat(&self) {
        self.heartbeat_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    /// Whether the worker is alive and turned its loop within `within`.
    pub fn answering(&self, within: Duration) -> bool {
        let last = self.heartbeat_ms.load(Ordering::Relaxed);
        let now = self.started.elapsed().as_millis() as u64;
        self.alive() && now.saturating_sub(last) <= within.as_millis() as u64
    }

    fn take_fault(&self, which: Fault) -> bool {
        // A plain load first: this runs every decode step, and is almost always "no fault".
        if self.fault.load(Ordering::Relaxed) != which as u8 {
            return false;
        }
        self.fault
            .compare_exchange(which as u8, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

/// Marks the worker dead however its thread ends (a panic included).
struct AliveGuard(Arc<Health>);
impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::Relaxed);
    }
}

/// Everything the worker shares with the engine handles.
pub struct Shared {
    pub registry: Arc<Registry>,
    pub metrics: Arc<EngineMetrics>,
    pub health: Arc<Health>,
    pub admission: Arc<Admission>,
}

/// Starts the worker thread. Models in `initial` are loaded there, in order; the first is the
/// default unless `default_model` names another. Returns at once (models may still be
/// loading: `Engine::ready` tells).
pub fn spawn(
    shared: Shared,
    scheduler: Scheduler<Job>,
    rx: Receiver<Command>,
    initial: Vec<(String, PathBuf)>,
    default_model: String,
    load: BundleLoader,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("clipcap-inference".into())
        .spawn(move || {
            let health = shared.health.clone();
            health.alive.store(true, Ordering::Relaxed);
            health.beat();
            let mut w = Worker::new(shared, scheduler, rx);
            // Declared after `w`, so it drops first: the worker reads as dead before the
            // replies of its unanswered requests are dropped.
            let _alive = AliveGuard(health.clone());
            for (i, (name, dir)) in initial.iter().enumerate() {
                // A bundle that makes libtorch panic is a load error like any other.
                let loaded = std::panic::catch_unwind(AssertUnwindSafe(|| load(dir)))
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("loading panicked")));
                match loaded {
                    Ok(b) => {
                        let make_default = if default_model.is_empty() { i == 0 } else { *name == default_model };
                        let info = w.install(name.clone(), b, make_default);
                        tracing::info!(model = %info.name, dir = %dir.display(), device = %info.device, dtype = %info.dtype, "model loaded");
                    }
                    Err(e) => tracing::error!(model = %name, dir = %dir.display(), error = format!("{e:#}"), "cannot load model"),
                }
                health.beat();
            }
            health.loading.store(false, Ordering::Release);
            w.run();
        })
        .expect("spawning the inference thread")
}

/// A request whose images are in a decoder.
struct Running {
    reply: Option<oneshot::Sender<Result<CaptionOutput, EngineError>>>,
    model: String,
    version: u64,
    outputs: Vec<Option<ImageOutput>>,
    remaining: usize,
    cancel: Arc<AtomicBool>,
    deadline: Option<Instant>,
    /// Image ids in the decoder, to cancel them.
    image_ids: Vec<u64>,
    /// The bundle whose decoder holds its rows (positions in `decoders` shift).
    bundle: Arc<Bundle>,
    kv_bytes: u64,
}

impl Schedulable for Running {
    fn images(&self) -> usize {
        self.remaining
    }
    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
    fn abandoned(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.reply.as_ref().is_none_or(|r| r.is_closed())
    }
}

struct ImageSlot {
    job: u64,
    index: usize,
    queue_ms: f64,
    encode_ms: f64,
    started: Instant,
    batch_rows: i64,
    stream: Option<ImageStream>,
}

/// Images that start together with equal options but for the seed: one cohort of the
/// decoder (each image draws from its own seed, so N seeded requests cost one set of kernels
/// per step, not N).
#[derive(Default)]
struct CohortGroup {
    /// The options, `seed` cleared.
    opts: GenOptions,
    /// Their rows in the encoder's output.
    rows: Vec<i64>,
    images: Vec<NewImage>,
}

/// A streamed image: each row's tokens so far and the text already sent.
struct ImageStream {
    to: tokio::sync::mpsc::UnboundedSender<Delta>,
    prompt: Vec<i64>,
    rows: Vec<RowText>,
}

#[derive(Default)]
struct RowText {
    tokens: Vec<i64>,
    sent: String,
    stopped: bool,
}

impl ImageStream {
    /// Adds one step's tokens and sends what became final text. A row's text is sent only
    /// as far as it cannot change: without trailing spaces or a character still incomplete
    /// (the caption is trimmed, and bytes may split a character across tokens).
    fn push(&mut self, bundle: &Bundle, image: usize, tokens: &[i64]) {
        for (choice, (row, &t)) in self.rows.iter_mut().zip(tokens).enumerate() {
            if row.stopped {
                continue;
            }
            row.tokens.push(t);
            row.stopped = bundle.stop_ids.contains(&t);
            let text = bundle.caption_text(&self.prompt, &row.tokens);
            let settled = text.trim_end_matches('\u{FFFD}').trim_end();
            if settled.len() > row.sent.len() && settled.starts_with(row.sent.as_str()) {
                let delta = settled[row.sent.len()..].to_string();
                row.sent = settled.to_string();
                let _ = self.to.send(Delta {
                    image,
                    choice,
                    text: delta,
                });
            }
        }
    }
}

struct Served {
    bundle: Arc<Bundle>,
    info: ModelInfo,
}

struct Worker {
    shared: Shared,
    scheduler: Scheduler<Job>,
    rx: Receiver<Command>,
    models: HashMap<String, Served>,
    /// Swapped-out or unloaded bundles that queued requests still name, by (name, version).
    retired: Vec<(String, u64, Arc<Bundle>)>,
    versions: HashMap<String, u64>,
    /// One decoder per bundle instance; a swapped-out bundle keeps its decoder until empty.
    decoders: Vec<Decoder>,
    running: HashMap<u64, Running>,
    images: HashMap<u64, ImageSlot>,
    next_id: u64,
    stopping: bool,
    /// Whether the last pass had work (memory goes back to the system when that ends).
    busy: bool,
}

impl Worker {
    fn new(shared: Shared, scheduler: Scheduler<Job>, rx: Receiver<Command>) -> Self {
        Worker {
            shared,
            scheduler,
            rx,
            models: HashMap::new(),
            retired: vec![],
            versions: HashMap::new(),
            decoders: vec![],
            running: HashMap::new(),
            images: HashMap::new(),
            next_id: 0,
            stopping: false,
            busy: false,
        }
    }

    fn metrics(&self) -> &EngineMetrics {
        &self.shared.metrics
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
        let info = ModelInfo::describe(&name, &bundle, version);
        if let Some(old) = self.shared.registry.insert(info.clone(), make_default) {
            self.forget_metric(&old);
        }
        self.metrics()
            .model_info
            .with_label_values(&[&info.name, &info.device, &info.dtype, &version.to_string()])
            .set(1);
        let old = self.models.insert(
            name.clone(),
            Served {
                bundle: Arc::new(bundle),
                info: info.clone(),
            },
        );
        if let Some(old) = old {
            self.retired.push((name, old.info.version, old.bundle));
        }
        info
    }

    fn unload(&mut self, name: &str) -> bool {
        let Some(old) = self.models.remove(name) else {
            return false;
        };
        self.retired
            .push((name.to_string(), old.info.version, old.bundle));
        if let Some(old) = self.shared.registry.remove(name) {
            self.forget_metric(&old);
        }
        true
    }

    fn forget_metric(&self, old: &ModelInfo) {
        let _ = self.metrics().model_info.remove_label_values(&[
            &old.name,
            &old.device,
            &old.dtype,
            &old.version.to_string(),
        ]);
    }

    fn run(&mut self) {
        loop {
            self.shared.health.pass_gate();
            self.shared.health.beat();
            if self.stopping && self.running.is_empty() && self.scheduler.pending_jobs() == 0 {
                return;
            }
            if self.shared.health.take_fault(Fault::KillWorker) {
                panic!("injected fault: the inference worker dies");
            }
            let decoding = self.decoders.iter().any(|d| !d.is_empty());
            self.intake(decoding);
            self.reap();
            let waiting = self.shared.admission.queued() as i64;
            self.metrics().queue_depth.set(waiting);
            self.metrics().requests_waiting.set(waiting);
            self.metrics()
                .requests_running
                .set(self.running.len() as i64);
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| -> anyhow::Result<()> {
                self.start_next()?;
                let t = Instant::now();
                let stepped = self.step_all();
                self.spent("step", t);
                stepped
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
                if is_sticky_device_error(&msg) {
                    *self.shared.health.device_failed.lock().unwrap() =
                        Some(msg.lines().next().unwrap_or("").to_string());
                }
                self.fail_running(&msg);
            }
            let models = &self.models;
            self.decoders.retain(|d| {
                !d.is_empty() || models.values().any(|m| Arc::ptr_eq(&m.bundle, d.model()))
            });
            // A retired bundle stays while a queued request names it (running ones hold it
            // through their decoder).
            if !self.retired.is_empty() {
                let pending: Vec<(&String, u64)> = self
                    .scheduler
                    .iter()
                    .map(|j| (&j.model, j.version))
                    .collect();
                self.retired
                    .retain(|(n, v, _)| pending.iter().any(|(pn, pv)| *pn == n && pv == v));
            }
            let busy =
                !self.decoders.iter().all(|d| d.is_empty()) || self.scheduler.pending_jobs() > 0;
            if self.busy && !busy {
                crate::device::release_free_memory();
            }
            self.busy = busy;
        }
    }

    /// Moves commands from the channel into the scheduler (or executes admin commands).
    fn intake(&mut self, decoding: bool) {
        if !self.scheduler.takes_new_work(decoding) || self.stopping {
            return;
        }
        let has_work = decoding || self.scheduler.pending_jobs() > 0;
        let first = if has_work {
            match self.rx.try_recv() {
                Ok(c) => Some(c),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => {
                    self.stopping = true;
                    None
                }
            }
        } else {
            match self.rx.recv_timeout(Duration::from_millis(500)) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    self.stopping = true;
                    None
                }
            }
        };
        let Some(first) = first else { return };
        self.accept(first);
        // Gather more for the same encoder batch, waiting only when nothing is running.
        let until = Instant::now() + self.scheduler.gather_window(decoding);
        while self.scheduler.wants_more() && !self.stopping {
            let now = Instant::now();
            let next = if now >= until {
                self.rx.try_recv().ok()
            } else {
                self.rx.recv_timeout(until - now).ok()
            };
            match next {
                Some(c) => self.accept(c),
                None => break,
            }
        }
    }

    fn accept(&mut self, cmd: Command) {
        match cmd {
            Command::Caption(job) => {
                self.shared.health.in_channel.fetch_sub(1, Ordering::AcqRel);
                self.scheduler.push(*job)
            }
            Command::Install {
                name,
                bundle,
                make_default,
                reply,
            } => {
                let info = self.install(name, *bundle, make_default);
                tracing::info!(model = %info.name, version = info.version, "model installed");
                let _ = reply.send(info);
            }
            Command::Unload { name, reply } => {
                let _ = reply.send(self.unload(&name));
            }
            Command::Shutdown => self.stopping = true,
            Command::Wake => {}
        }
    }

    /// Answers queued and running requests whose deadline passed or whose caller left, and
    /// frees their rows.
    fn reap(&mut self) {
        let now = Instant::now();
        for (job, why) in self.scheduler.reap(now) {
            self.shared.admission.release(1);
            self.metrics()
                .count_images(&job.model, why.label(), job.input.len());
            let _ = job.reply.send(Err(reaped_error(why, true)));
        }
        let gone: Vec<(u64, Reaped)> = self
            .running
            .iter()
            .filter_map(|(id, j)| reap_reason(j, now).map(|r| (*id, r)))
            .collect();
        for (id, why) in gone {
            let mut job = self.running.remove(&id).unwrap();
            let decoder = self
                .decoders
                .iter_mut()
                .find(|d| Arc::ptr_eq(d.model(), &job.bundle));
            if let Some(d) = decoder {
                for img in &job.image_ids {
                    d.cancel(*img);
                }
            }
            for img in &job.image_ids {
                self.images.remove(img);
            }
            self.metrics()
                .count_images(&job.model, why.label(), job.image_ids.len());
            if let Some(r) = job.reply.take() {
                let _ = r.send(Err(reaped_error(why, false)));
            }
        }
    }

    /// Encodes what the scheduler picks (one encoder forward per model) and adds it to the
    /// decoders.
    fn start_next(&mut self) -> anyhow::Result<()> {
        let running_kv = self.running.values().map(|r| r.kv_bytes).sum();
        let running_rows = self.decoders.iter().map(|d| d.rows() as usize).sum();
        let batch = self
            .scheduler
            .next_batch(self.running_images(), running_rows, running_kv);
        self.shared.admission.release(batch.len());
        let mut by_model: Vec<(Arc<Bundle>, u64, Vec<Job>)> = vec![];
        for job in batch {
            let Some((bundle, version)) = self.bundle_of(&job.model, job.version) else {
                let _ = job.reply.send(Err(EngineError::ModelChanged(format!(
                    "model {:?} version {} is no longer served; retry",
                    job.model, job.version
                ))));
                continue;
            };
            if let Err(why) = fits(&bundle, &job.input) {
                let _ = job.reply.send(Err(EngineError::ModelChanged(format!(
                    "the request does not fit model {:?} ({why}); retry",
                    job.model
                ))));
                continue;
            }
            match by_model
                .iter_mut()
                .find(|(m, _, _)| Arc::ptr_eq(m, &bundle))
            {
                Some((_, _, v)) => v.push(job),
                None => by_model.push((bundle, version, vec![job])),
            }
        }
        // Every model's group gets its turn; the first failure is reported after.
        let mut first_error = None;
        for (model, version, jobs) in by_model {
            if let Err(e) = self.start_jobs(model, version, jobs) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The bundle a request was validated against (served or retired), else the one now
    /// served under its name (a request that raced a swap); with the version it is.
    fn bundle_of(&self, name: &str, version: u64) -> Option<(Arc<Bundle>, u64)> {
        let served = self.models.get(name);
        if let Some(s) = served.filter(|s| s.info.version == version) {
            return Some((s.bundle.clone(), version));
        }
        self.retired
            .iter()
            .find(|(n, v, _)| n == name && *v == version)
            .map(|(_, v, b)| (b.clone(), *v))
            .or_else(|| served.map(|s| (s.bundle.clone(), s.info.version)))
    }

    fn start_jobs(
        &mut self,
        model: Arc<Bundle>,
        version: u64,
        jobs: Vec<Job>,
    ) -> anyhow::Result<()> {
        let picked = Instant::now();
        let pixels: Vec<&[f32]> = jobs
            .iter()
            .filter_map(|j| match &j.input {
                JobInput::Pixels(p) => Some(p.iter().map(|p| p.as_slice())),
                JobInput::Embeddings(_) => None,
            })
            .flatten()
            .collect();
        let t0 = Instant::now();
        let max_batch = self.scheduler.config().max_batch_images;
        let encoded = match crate::engine::pipeline::encode(&model, &pixels, max_batch) {
            Ok(e) => e,
            // Nothing of these requests is in a decoder yet: fail them alone, and the worker
            // goes on with the rest.
            Err(e) => {
                let msg = format!("encoding failed: {e:#}");
                tracing::error!(error = %msg, "inference failed for the requests being encoded");
                drop(pixels);
                for job in jobs {
                    self.shared
                        .metrics
                        .count_images(&job.model, "error", job.input.len());
                    let _ = job.reply.send(Err(EngineError::Inference(msg.clone())));
                }
                return Ok(());
            }
        };
        self.spent("encode", t0);
        let joining = Instant::now();
        let encode_ms = if pixels.is_empty() {
            0.0
        } else {
            let ms = joining.duration_since(t0).as_secs_f64() * 1e3;
            self.metrics()
                .encode_batch_size
                .observe(pixels.len() as f64);
            self.metrics().encode_duration.observe(ms / 1e3);
            ms
        };
        // Every job's embeddings, in job order: encoder rows or the caller's own.
        let mut parts = vec![];
        let mut next_pixel_row = 0i64;
        for job in &jobs {
            match &job.input {
                JobInput::Pixels(p) => {
                    parts.push(encoded.narrow(0, next_pixel_row, p.len() as i64));
                    next_pixel_row += p.len() as i64;
                }
                JobInput::Embeddings(e) => {
                    parts.push(crate::engine::pipeline::embeddings_tensor(e, model.device))
                }
            }
        }
        let emb = tch::Tensor::cat(&parts, 0);
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
        let mut groups: Vec<CohortGroup> = vec![];
        for job in jobs {
            let job_id = self.next_id;
            self.next_id += 1;
            let queue_ms = picked.duration_since(job.enqueued).as_secs_f64() * 1e3;
            let n = job.input.len();
            let m = &self.shared.metrics;
            m.request_queue_duration.observe(queue_ms / 1e3);
            m.admitted
                .with_label_values(&[&job.priority.to_string()])
                .inc();
            // Beam search has no text to show before its beams finish.
            let streams = job.stream.is_some() && job.opts.strategy != Strategy::Beam;
            let prompt = if streams {
                model.encode(&job.opts.prompt)?
            } else {
                vec![]
            };
            let mut ids = vec![];
            for index in 0..n {
                let id = self.next_id;
                self.next_id += 1;
                self.shared.metrics.queue_duration.observe(queue_ms / 1e3);
                self.images.insert(
                    id,
                    ImageSlot {
                        job: job_id,
                        index,
                        queue_ms,
                        encode_ms,
                        started: Instant::now(),
                        batch_rows: 0,
                        stream: job
                            .stream
                            .as_ref()
                            .filter(|_| streams)
                            .map(|to| ImageStream {
                                to: to.clone(),
                                prompt: prompt.clone(),
                                rows: (0..job.opts.rows_per_image())
                                    .map(|_| RowText::default())
                                    .collect(),
                            }),
                    },
                );
                ids.push(id);
                let key = GenOptions {
                    seed: None,
                    ..job.opts.clone()
                };
                let g = match groups.iter().position(|g| g.opts == key) {
                    Some(i) => &mut groups[i],
                    None => {
                        groups.push(CohortGroup {
                            opts: key,
                            ..Default::default()
                        });
                        groups.last_mut().unwrap()
                    }
                };
                g.rows.push(row);
                g.images.push(NewImage {
                    id,
                    seed: job.opts.seed,
                    streamed: streams,
                });
                row += 1;
            }
            self.running.insert(
                job_id,
                Running {
                    reply: Some(job.reply),
                    model: job.model,
                    version,
                    outputs: (0..n).map(|_| None).collect(),
                    remaining: n,
                    cancel: job.cancel,
                    deadline: job.deadline,
                    image_ids: ids,
                    bundle: model.clone(),
                    kv_bytes: job.kv_bytes,
                },
            );
        }
        for CohortGroup { opts, rows, images } in groups {
            let idx = tch::Tensor::from_slice(&rows).to_device(emb.device());
            let sub = emb.index_select(0, &idx);
            let ids: Vec<u64> = images.iter().map(|i| i.id).collect();
            // A join that runs out of memory fails its own requests only: the decoder's state
            // changes after the prefill has its memory, and the running rows go on.
            let health = self.shared.health.clone();
            let decoder = &mut self.decoders[di];
            let joined = std::panic::catch_unwind(AssertUnwindSafe(|| {
                if health.take_fault(Fault::OomInJoin) {
                    panic!("CUDA out of memory. Tried to allocate 2.00 GiB (injected fault)");
                }
                decoder.join(&sub, &opts, images)
            }));
            let joined = match joined {
                Ok(r) => r.map_err(|e| format!("{e:#}")),
                Err(p) => Err(panic_text(p)),
            };
            match joined {
                Ok(()) => {}
                Err(msg) if is_out_of_memory(&msg) => {
                    for id in &ids {
                        self.decoders[di].cancel(*id);
                    }
                    self.fail_images(&ids, &msg);
                    continue;
                }
                Err(msg) => return Err(anyhow::anyhow!(msg)),
            }
            let rows_now = self.decoders[di].rows();
            for id in &ids {
                if let Some(s) = self.images.get_mut(id) {
                    s.batch_rows = rows_now;
                }
            }
        }
        self.spent("join", joining);
        Ok(())
    }

    /// Adds the time since `from` to the worker's `phase`.
    fn spent(&self, phase: &str, from: Instant) {
        self.metrics()
            .worker_seconds
            .with_label_values(&[phase])
            .inc_by(from.elapsed().as_secs_f64());
    }

    fn step_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.decoders.len() {
            if self.decoders[i].is_empty() {
                continue;
            }
            if self.shared.health.take_fault(Fault::PanicInStep) {
                panic!("injected fault: a decode step panics");
            }
            let rows = self.decoders[i].rows();
            let m = &self.shared.metrics;
            m.decode_batch_rows.observe(rows as f64);
            m.decode_batch_images
                .observe(self.decoders[i].images() as f64);
            m.decode_cohorts.observe(self.decoders[i].cohorts() as f64);
            m.generated_tokens.inc_by(rows as u64);
            if self.shared.health.take_fault(Fault::DeviceErrorInStep) {
                panic!("CUDA error: an illegal memory access was encountered (injected fault)");
            }
            let done = self.decoders[i].step()?;
            let tokens = self.decoders[i].take_streamed();
            let model = self.decoders[i].model().clone();
            self.stream_out(&model, tokens);
            self.deliver(done);
        }
        Ok(())
    }

    /// Sends streamed images' new text to their callers.
    fn stream_out(&mut self, model: &Bundle, tokens: Vec<Streamed>) {
        for s in tokens {
            if let Some(slot) = self.images.get_mut(&s.id) {
                let index = slot.index;
                if let Some(stream) = slot.stream.as_mut() {
                    stream.push(model, index, &s.tokens);
                }
            }
        }
    }

    fn deliver(&mut self, done: Vec<Finished>) {
        for f in done {
            let Some(slot) = self.images.remove(&f.id) else {
                continue;
            };
            let Some(job) = self.running.get_mut(&slot.job) else {
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
                let job = self.running.remove(&slot.job).unwrap();
                self.shared
                    .metrics
                    .count_images(&job.model, "ok", job.outputs.len());
                let out = CaptionOutput {
                    model: job.model,
                    model_version: job.version,
                    images: job.outputs.into_iter().map(|o| o.unwrap()).collect(),
                    preprocess_ms: 0.0,
                };
                if let Some(r) = job.reply {
                    let _ = r.send(Ok(out));
                }
            }
        }
    }

    /// Fails the requests that own `images` (a join that ran out of memory), with a 503 to
    /// retry: the rest of the batch goes on.
    fn fail_images(&mut self, images: &[u64], msg: &str) {
        tracing::warn!(error = %msg, "a joining request ran out of device memory; it alone fails");
        let jobs: Vec<u64> = images
            .iter()
            .filter_map(|id| self.images.remove(id).map(|s| s.job))
            .collect();
        for job in jobs {
            if let Some(mut r) = self.running.remove(&job) {
                for id in &r.image_ids {
                    self.images.remove(id);
                }
                self.shared
                    .metrics
                    .count_images(&r.model, "error", r.image_ids.len());
                if let Some(reply) = r.reply.take() {
                    let _ = reply.send(Err(EngineError::OutOfMemory(
                        msg.lines().next().unwrap_or("").to_string(),
                    )));
                }
            }
        }
    }

    /// Fails every running request (their decoder state may be broken) and starts over with
    /// empty decoders; queued requests are untouched.
    fn fail_running(&mut self, msg: &str) {
        for (_, mut job) in self.running.drain() {
            self.shared
                .metrics
                .count_images(&job.model, "error", job.image_ids.len());
            if let Some(r) = job.reply.take() {
                let _ = r.send(Err(EngineError::Inference(msg.to_string())));
            }
        }
        self.images.clear();
        let models: Vec<_> = self.decoders.iter().map(|d| d.model().clone()).collect();
        self.decoders = models.into_iter().map(Decoder::new).collect();
    }
}

/// A panic's message.
fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// libtorch's out-of-memory errors (CUDA's caching allocator, and the CPU's).
fn is_out_of_memory(msg: &str) -> bool {
    msg.contains("out of memory") || msg.contains("DefaultCPUAllocator: can't allocate")
}

/// A CUDA error that poisons the context: every later kernel fails too (unlike running out of
/// memory, which the next, smaller request survives).
fn is_sticky_device_error(msg: &str) -> bool {
    (msg.contains("CUDA error") || msg.contains("cudaError")) && !is_out_of_memory(msg)
}

fn reaped_error(why: Reaped, queued: bool) -> EngineError {
    match (why, queued) {
        (Reaped::Deadline, true) => {
            EngineError::Deadline("the request's deadline passed while it was queued".into())
        }
        (Reaped::Deadline, false) => EngineError::Deadline(
            "the request's deadline passed before its captions were ready".into(),
        ),
        (Reaped::Cancelled, _) => EngineError::Cancelled,
    }
}

/// Whether a request's input has the shapes this bundle takes.
fn fits(bundle: &Bundle, input: &JobInput) -> Result<(), String> {
    match input {
        JobInput::Pixels(p) => {
            let side = bundle.manifest.image.size;
            let want = (3 * side * side) as usize;
            match p.iter().find(|p| p.len() != want) {
                Some(_) => Err(format!("images must be {side}x{side} now")),
                None => Ok(()),
            }
        }
        JobInput::Embeddings(e) => {
            let want = bundle.encoder.dim as usize;
            match e.iter().find(|e| e.len() != want) {
                Some(_) => Err(format!("embeddings must have {want} values now")),
                None => Ok(()),
            }
        }
    }
}
