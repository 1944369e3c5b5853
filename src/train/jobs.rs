//! Training jobs run by the server (`POST /train`), one at a time on a background thread.
//!
//! Each job lives in `jobs_dir/<id>/`: `job.json` (spec, state, progress, loss history; written
//! atomically), `train.log`, and `ckpt/` (the trainer's checkpoint). A restart reloads every
//! job; one that was running becomes `interrupted` and can be resumed from its checkpoint.
//!
//! The manager knows two narrow handles, no server: a [`TrainRunner`] that trains (the real
//! [`LocalTrainer`], or a fake in tests) and a [`ModelInstaller`] that serves a finished
//! bundle (the [`Engine`]).
use crate::engine::Engine;
use crate::train::spec::TrainSpec;
use crate::train::trainer::{self, LossPoint, Outcome, Progress};
use anyhow::{Context, Result};
use prometheus::{GaugeVec, IntGaugeVec, Opts, Registry};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Interrupted,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::Interrupted,
    ];
    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Interrupted => "interrupted",
        }
    }
}

/// A training job as stored in `job.json` and returned by `GET /train/{id}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub state: JobState,
    pub created_unix: u64,
    pub updated_unix: u64,
    /// The request as validated (dataset and output names, not paths).
    pub dataset: String,
    pub output: String,
    pub base: String,
    pub activate: bool,
    pub spec: TrainSpec,
    pub epoch: usize,
    pub epochs: usize,
    pub step: i64,
    pub total_steps: i64,
    pub loss: Option<f64>,
    pub samples_per_s: f64,
    pub eta_s: Option<f64>,
    pub loss_history: Vec<LossPoint>,
    pub val_loss_history: Vec<LossPoint>,
    pub error: Option<String>,
    /// The run's set-up warnings (a warmup longer than the run, no validation split, …).
    #[serde(default)]
    pub warnings: Vec<String>,
    pub bundle: Option<String>,
    pub activated: bool,
    /// How many times it was (re)started.
    pub runs: u32,
    /// The step each resumed run started from (marked on the loss curve).
    #[serde(default)]
    pub resumed_at: Vec<i64>,
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why a job request was refused.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("no training job {0:?}")]
    NotFound(String),
    /// The job's state forbids it (resuming a running job, cancelling a finished one).
    #[error("{0}")]
    Conflict(String),
    /// The job record could not be written (disk full, read-only): nothing changed.
    #[error("cannot store the job record: {0}")]
    Storage(String),
}

impl JobError {
    /// A storage error, with the operating system's reason but no server path.
    fn storage(e: &anyhow::Error) -> Self {
        let reason = e
            .chain()
            .find_map(|c| c.downcast_ref::<std::io::Error>())
            .map(|io| io.to_string())
            .unwrap_or_else(|| "the write failed".into());
        JobError::Storage(reason)
    }
}

/// Runs one training (or resumes it from the checkpoint in `ckpt`).
pub trait TrainRunner: Send + Sync {
    fn train(
        &self,
        spec: &TrainSpec,
        ckpt: &Path,
        resume: bool,
        cancel: &AtomicBool,
        report: &mut dyn FnMut(&Progress),
    ) -> Result<Outcome>;
}

/// Trains in this process on `device`, beside the captioning worker: on CUDA on its own
/// stream, on the CPU at a lower priority (`nice`, 0 = the same as captioning).
pub struct LocalTrainer {
    pub device: tch::Device,
    pub nice: i32,
}

impl TrainRunner for LocalTrainer {
    fn train(
        &self,
        spec: &TrainSpec,
        ckpt: &Path,
        resume: bool,
        cancel: &AtomicBool,
        report: &mut dyn FnMut(&Progress),
    ) -> Result<Outcome> {
        if self.nice > crate::device::thread_nice() {
            if let Err(e) = crate::device::set_thread_nice(self.nice) {
                tracing::warn!(error = %format!("{e:#}"), "training keeps the captioning priority");
            }
        }
        let _stream = crate::cuda::SideStream::enter_or_warn(self.device, "training");
        trainer::train(spec, self.device, ckpt, resume, cancel, report)
    }
}

/// Serves a trained bundle under a name; answers the version it got.
pub trait ModelInstaller: Send + Sync {
    fn install(&self, name: &str, dir: &Path) -> std::result::Result<u64, String>;
}

impl ModelInstaller for Engine {
    fn install(&self, name: &str, dir: &Path) -> std::result::Result<u64, String> {
        self.install_blocking(name, dir, false)
            .map(|info| info.version)
            .map_err(|e| e.to_string())
    }
}

/// Training metrics, registered in the server's registry.
struct TrainMetrics {
    jobs: IntGaugeVec,
    step: IntGaugeVec,
    loss: GaugeVec,
    samples_per_second: GaugeVec,
}

impl TrainMetrics {
    fn register(registry: &Registry) -> Result<Self> {
        let m = TrainMetrics {
            jobs: IntGaugeVec::new(
                Opts::new("clipcap_train_jobs", "Training jobs by state"),
                &["state"],
            )?,
            step: IntGaugeVec::new(
                Opts::new(
                    "clipcap_train_step",
                    "Current optimizer step of a training job",
                ),
                &["job"],
            )?,
            loss: GaugeVec::new(
                Opts::new("clipcap_train_loss", "Latest training loss of a job"),
                &["job"],
            )?,
            samples_per_second: GaugeVec::new(
                Opts::new(
                    "clipcap_train_samples_per_second",
                    "Training throughput of a job",
                ),
                &["job"],
            )?,
        };
        registry.register(Box::new(m.jobs.clone()))?;
        registry.register(Box::new(m.step.clone()))?;
        registry.register(Box::new(m.loss.clone()))?;
        registry.register(Box::new(m.samples_per_second.clone()))?;
        Ok(m)
    }
}

struct Inner {
    jobs: BTreeMap<String, JobRecord>,
    queue: VecDeque<String>,
    cancel: HashMap<String, Arc<AtomicBool>>,
    /// Jobs whose latest state is not on disk yet (a write failed); retried on every change.
    unsaved: std::collections::BTreeSet<String>,
    stopping: bool,
}

impl Inner {
    /// Writes job `id`'s record, then retries any that failed before; a failure is logged
    /// and remembered, so memory and disk agree again once the disk has room.
    fn save(&mut self, dir: &Path, id: &str) {
        self.unsaved.insert(id.to_string());
        let pending: Vec<String> = self.unsaved.iter().cloned().collect();
        for id in pending {
            let Some(job) = self.jobs.get(&id) else {
                self.unsaved.remove(&id);
                continue;
            };
            match write_record(dir, job) {
                Ok(()) => {
                    self.unsaved.remove(&id);
                }
                Err(e) => tracing::error!(job = %id, error = %e, "cannot write job record"),
            }
        }
    }
}

/// What the manager and its thread share (the thread holds no handle to the manager).
struct Core {
    dir: PathBuf,
    runner: Arc<dyn TrainRunner>,
    installer: Option<Arc<dyn ModelInstaller>>,
    metrics: TrainMetrics,
    inner: Mutex<Inner>,
    /// Signalled on every change of a job or the queue.
    changed: Condvar,
}

/// The job queue and its training thread; dropping it stops the thread (see [`shutdown`]).
///
/// [`shutdown`]: JobManager::shutdown
pub struct JobManager {
    core: Arc<Core>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl JobManager {
    /// Loads every job under `dir` (running ones become interrupted, queued ones re-queue)
    /// and starts the training thread.
    pub fn open(
        dir: PathBuf,
        runner: Arc<dyn TrainRunner>,
        installer: Option<Arc<dyn ModelInstaller>>,
        registry: &Registry,
    ) -> Result<Arc<Self>> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Checkpoint and record temporaries of a process that died mid-write (kill -9, a
        // full disk) would otherwise stay forever.
        let swept = crate::fsutil::sweep_temps(&dir, 3);
        if swept > 0 {
            tracing::info!(removed = swept, dir = %dir.display(), "removed stale temporary files");
        }
        let mut jobs = BTreeMap::new();
        let mut queue = VecDeque::new();
        let mut unsaved = std::collections::BTreeSet::new();
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path().join("job.json");
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            match serde_json::from_str::<JobRecord>(&text) {
                Ok(mut job) => {
                    match job.state {
                        JobState::Running => {
                            job.state = JobState::Interrupted;
                            job.updated_unix = now();
                            // A full disk must not stop the server: retried on the next change.
                            if let Err(e) = write_record(&dir, &job) {
                                tracing::error!(job = %job.id, error = %e, "cannot write job record");
                                unsaved.insert(job.id.clone());
                            }
                        }
                        JobState::Queued => queue.push_back(job.id.clone()),
                        _ => {}
                    }
                    jobs.insert(job.id.clone(), job);
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "unreadable job record")
                }
            }
        }
        // Queued jobs resume in the order they were created (ids start with the time).
        queue.make_contiguous().sort();
        let core = Arc::new(Core {
            dir,
            runner,
            installer,
            metrics: TrainMetrics::register(registry)?,
            inner: Mutex::new(Inner {
                jobs,
                queue,
                cancel: HashMap::new(),
                unsaved,
                stopping: false,
            }),
            changed: Condvar::new(),
        });
        core.update_metrics();
        let c = core.clone();
        let thread = std::thread::Builder::new()
            .name("clipcap-train".into())
            .spawn(move || c.run())
            .context("spawning the training thread")?;
        Ok(Arc::new(JobManager {
            core,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// Stops taking jobs; a running job is cancelled at its next step (checkpoint kept) and
    /// recorded as interrupted, so a restart can resume it. Blocks until the thread ends.
    pub fn shutdown(&self) {
        {
            let mut inner = self.core.inner.lock().unwrap();
            inner.stopping = true;
            for flag in inner.cancel.values() {
                flag.store(true, Ordering::Relaxed);
            }
        }
        self.core.changed.notify_all();
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
        let mut inner = self.core.inner.lock().unwrap();
        if let Some(id) = inner.unsaved.iter().next().cloned() {
            inner.save(&self.core.dir, &id);
        }
    }

    pub fn list(&self) -> Vec<JobRecord> {
        self.core
            .inner
            .lock()
            .unwrap()
            .jobs
            .values()
            .cloned()
            .collect()
    }

    pub fn get(&self, id: &str) -> Option<JobRecord> {
        self.core.inner.lock().unwrap().jobs.get(id).cloned()
    }

    /// Waits until job `id` satisfies `done` (woken on every change, not polled); `None` if
    /// the job is unknown or `timeout` passes first.
    pub fn wait_for(
        &self,
        id: &str,
        timeout: Duration,
        done: impl Fn(&JobRecord) -> bool,
    ) -> Option<JobRecord> {
        let until = Instant::now() + timeout;
        let mut inner = self.core.inner.lock().unwrap();
        loop {
            let job = inner.jobs.get(id)?;
            if done(job) {
                return Some(job.clone());
            }
            let now = Instant::now();
            if now >= until {
                return None;
            }
            inner = self
                .core
                .changed
                .wait_timeout(inner, until - now)
                .unwrap()
                .0;
        }
    }

    /// Queues a new job. Refused when a queued or running job writes the same output, or
    /// (without `overwrite`) when its bundle exists: checked and recorded under one lock, so
    /// two requests cannot both pass.
    pub fn submit(
        &self,
        dataset: String,
        output: String,
        base: String,
        activate: bool,
        spec: TrainSpec,
        overwrite: bool,
    ) -> std::result::Result<JobRecord, JobError> {
        let id = format!(
            "{}-{}",
            now(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let job = JobRecord {
            id: id.clone(),
            state: JobState::Queued,
            created_unix: now(),
            updated_unix: now(),
            dataset,
            output,
            base,
            activate,
            epochs: spec.params.epochs,
            spec,
            epoch: 0,
            step: 0,
            total_steps: 0,
            loss: None,
            samples_per_s: 0.0,
            eta_s: None,
            loss_history: vec![],
            val_loss_history: vec![],
            error: None,
            warnings: vec![],
            bundle: None,
            activated: false,
            runs: 0,
            resumed_at: vec![],
        };
        let dir = &self.core.dir;
        let mut inner = self.core.inner.lock().unwrap();
        if let Some(other) = inner.jobs.values().find(|j| {
            j.output == job.output && matches!(j.state, JobState::Queued | JobState::Running)
        }) {
            return Err(JobError::Conflict(format!(
                "job {} is already writing bundle {:?}",
                other.id, job.output
            )));
        }
        if job.spec.out.exists() && !overwrite {
            return Err(JobError::Conflict(format!(
                "bundle {:?} exists; send \"overwrite\": true to replace it",
                job.output
            )));
        }
        if let Err(e) = write_record(dir, &job) {
            let _ = std::fs::remove_dir_all(dir.join(&id));
            return Err(JobError::storage(&e));
        }
        inner.jobs.insert(id.clone(), job.clone());
        inner.queue.push_back(id);
        drop(inner);
        self.core.changed.notify_all();
        self.core.update_metrics();
        Ok(job)
    }

    /// Cancels a queued or running job (a running one stops at its next step).
    pub fn cancel(&self, id: &str) -> std::result::Result<JobRecord, JobError> {
        let core = &self.core;
        let mut inner = core.inner.lock().unwrap();
        let flag = inner.cancel.get(id).cloned();
        let Some(job) = inner.jobs.get_mut(id) else {
            return Err(JobError::NotFound(id.to_string()));
        };
        match job.state {
            JobState::Queued => {
                let mut next = job.clone();
                next.state = JobState::Cancelled;
                next.updated_unix = now();
                write_record(&core.dir, &next).map_err(|e| JobError::storage(&e))?;
                *job = next.clone();
                let job = next;
                inner.queue.retain(|q| q != id);
                drop(inner);
                core.changed.notify_all();
                core.update_metrics();
                Ok(job)
            }
            JobState::Running => {
                if let Some(f) = flag {
                    f.store(true, Ordering::Relaxed);
                }
                Ok(job.clone())
            }
            s => Err(JobError::Conflict(format!(
                "job {id} is already {}",
                s.name()
            ))),
        }
    }

    /// Re-queues an interrupted, cancelled or failed job; it continues from its checkpoint.
    pub fn resume(&self, id: &str) -> std::result::Result<JobRecord, JobError> {
        let core = &self.core;
        let mut inner = core.inner.lock().unwrap();
        if let Some(other) = inner.jobs.get(id).and_then(|j| {
            inner.jobs.values().find(|o| {
                o.id != j.id
                    && o.output == j.output
                    && matches!(o.state, JobState::Queued | JobState::Running)
            })
        }) {
            return Err(JobError::Conflict(format!(
                "job {} is writing the same output bundle",
                other.id
            )));
        }
        let Some(job) = inner.jobs.get_mut(id) else {
            return Err(JobError::NotFound(id.to_string()));
        };
        match job.state {
            JobState::Interrupted | JobState::Cancelled | JobState::Failed => {
                // On disk first: if the record cannot be written, nothing changes.
                let mut next = job.clone();
                next.state = JobState::Queued;
                next.error = None;
                next.updated_unix = now();
                write_record(&core.dir, &next).map_err(|e| JobError::storage(&e))?;
                *job = next.clone();
                let job = next;
                inner.queue.push_back(id.to_string());
                drop(inner);
                core.changed.notify_all();
                core.update_metrics();
                Ok(job)
            }
            s => Err(JobError::Conflict(format!(
                "job {id} is {}; only interrupted, cancelled or failed jobs resume",
                s.name()
            ))),
        }
    }
}

impl Drop for JobManager {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Core {
    fn update_metrics(&self) {
        let inner = self.inner.lock().unwrap();
        for s in JobState::ALL {
            let n = inner.jobs.values().filter(|j| j.state == s).count();
            self.metrics
                .jobs
                .with_label_values(&[s.name()])
                .set(n as i64);
        }
    }

    fn run(&self) {
        loop {
            let (id, flag, job) = {
                let mut inner = self.inner.lock().unwrap();
                loop {
                    if inner.stopping {
                        return;
                    }
                    let Some(id) = inner.queue.pop_front() else {
                        inner = self.changed.wait(inner).unwrap();
                        continue;
                    };
                    // Taken and marked running in one step: a cancel in between cannot be lost.
                    let Some(job) = inner.jobs.get_mut(&id) else {
                        continue;
                    };
                    if job.state != JobState::Queued {
                        continue;
                    }
                    job.state = JobState::Running;
                    job.runs += 1;
                    if job.runs > 1 {
                        job.resumed_at.push(job.step);
                    }
                    job.updated_unix = now();
                    let job = job.clone();
                    inner.save(&self.dir, &id);
                    let flag = Arc::new(AtomicBool::new(false));
                    inner.cancel.insert(id.clone(), flag.clone());
                    break (id, flag, job);
                }
            };
            self.changed.notify_all();
            self.run_job(&id, flag, job);
        }
    }

    fn set<F: FnOnce(&mut JobRecord)>(&self, id: &str, f: F) -> Option<JobRecord> {
        let mut inner = self.inner.lock().unwrap();
        let job = inner.jobs.get_mut(id)?;
        f(job);
        job.updated_unix = now();
        let job = job.clone();
        // Written under the lock: whoever sees the new state in memory finds it on disk too
        // (or it is retried), and two writers never interleave.
        inner.save(&self.dir, id);
        drop(inner);
        self.changed.notify_all();
        Some(job)
    }

    fn log(&self, id: &str, line: &str) {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(id).join("train.log"))
        {
            let _ = writeln!(f, "{} {line}", now());
        }
    }

    fn run_job(&self, id: &str, flag: Arc<AtomicBool>, job: JobRecord) {
        self.update_metrics();
        let resume = job.runs > 1;
        self.log(id, &format!("start (run {}, resume {resume})", job.runs));
        tracing::info!(job = id, dataset = %job.dataset, output = %job.output, "training job started");
        let ckpt = self.dir.join(id).join("ckpt");
        let m = &self.metrics;
        let mut last_write = Instant::now();
        let mut report = |p: &Progress| {
            m.step.with_label_values(&[id]).set(p.step);
            m.loss.with_label_values(&[id]).set(p.loss);
            m.samples_per_second
                .with_label_values(&[id])
                .set(p.samples_per_s);
            let flush = last_write.elapsed().as_millis() > 500 || p.step == p.total_steps;
            let apply = |j: &mut JobRecord| {
                j.epoch = p.epoch;
                j.step = p.step;
                j.total_steps = p.total_steps;
                j.loss = Some(p.loss);
                j.samples_per_s = p.samples_per_s;
                j.eta_s = Some(p.eta_s);
                j.loss_history = p.history.clone();
                j.val_loss_history = p.val_history.clone();
                j.warnings = p.warnings.clone();
            };
            if flush {
                self.set(id, apply);
                last_write = Instant::now();
            } else if let Some(j) = self.inner.lock().unwrap().jobs.get_mut(id) {
                apply(j);
            }
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.runner
                .train(&job.spec, &ckpt, resume, &flag, &mut report)
        }))
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the trainer panicked")));
        let stopping = self.inner.lock().unwrap().stopping;
        match result {
            Ok(Outcome::Finished { bundle, progress }) => {
                self.log(id, &format!("finished: {}", bundle.display()));
                // A cancel that came after the last step still keeps the bundle from serving.
                let cancelled = flag.load(Ordering::Relaxed);
                let activated = job.activate && !cancelled && self.activate(&job.output, &bundle);
                self.set(id, |j| {
                    j.state = JobState::Succeeded;
                    j.bundle = Some(bundle.display().to_string());
                    j.activated = activated;
                    j.loss_history = progress.history.clone();
                    j.val_loss_history = progress.val_history.clone();
                    j.step = progress.step;
                    j.eta_s = Some(0.0);
                });
            }
            Ok(Outcome::Cancelled { .. }) => {
                let state = if stopping {
                    JobState::Interrupted
                } else {
                    JobState::Cancelled
                };
                self.log(id, state.name());
                self.set(id, |j| j.state = state);
            }
            Err(e) => {
                let msg = format!("{e:#}");
                self.log(id, &format!("failed: {msg}"));
                tracing::error!(job = id, error = %msg, "training job failed");
                self.set(id, |j| {
                    j.state = JobState::Failed;
                    j.error = Some(msg.clone());
                });
            }
        }
        self.inner.lock().unwrap().cancel.remove(id);
        self.update_metrics();
    }

    /// Serves the trained bundle under `name`.
    fn activate(&self, name: &str, dir: &Path) -> bool {
        let Some(installer) = &self.installer else {
            return false;
        };
        match installer.install(name, dir) {
            Ok(version) => {
                tracing::info!(model = %name, version, "trained bundle activated");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot activate the trained bundle");
                false
            }
        }
    }
}

fn write_record(dir: &Path, job: &JobRecord) -> Result<()> {
    let d = dir.join(&job.id);
    std::fs::create_dir_all(&d)?;
    crate::fsutil::write_atomic(
        &d.join("job.json"),
        serde_json::to_string_pretty(job)?.as_bytes(),
    )
}

/// About `n` round tick values covering `lo..=hi` (steps of 1, 2 or 5 × 10^k).
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * mag);
    // With a little slack: 2.9 / 0.1 is 28.999999999999996.
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    // Rounded, so 0.2 · 12 reads 2.4, not 2.4000000000000004.
    (first..=last)
        .map(|i| (i as f64 * step * 1e9).round() / 1e9)
        .collect()
}

/// A tick label without needless digits.
fn tick_label(v: f64) -> String {
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.to_string()
    }
}

/// The loss curve as a standalone SVG: step on x (with epoch boundaries), loss on y, ticks
/// and labels on both axes, training and validation in a legend, and a mark where the job was
/// resumed (after a cancel or a restart).
pub fn loss_svg(job: &JobRecord) -> String {
    use std::fmt::Write as _;
    let (w, h) = (680.0, 360.0);
    let (left, right, top, bottom) = (64.0, 20.0, 44.0, 64.0);
    let all: Vec<&LossPoint> = job
        .loss_history
        .iter()
        .chain(job.val_loss_history.iter())
        .collect();
    let max_step = all
        .iter()
        .map(|p| p.step)
        .chain([job.total_steps, 1])
        .max()
        .unwrap_or(1) as f64;
    let (mut lo, mut hi) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.loss), b.max(p.loss))
        });
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let (lo, hi) = (lo - pad, hi + pad);
    let (x0, x1, y0, y1) = (left, w - right, h - bottom, top);
    let x = |s: f64| x0 + s / max_step * (x1 - x0);
    let y = |l: f64| y0 - (l - lo) / (hi - lo) * (y0 - y1);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<title>loss of training job {id}</title>
<rect width="100%" height="100%" fill="white"/>
<text x="{x0}" y="18" font-size="13">job {id}: {state}, step {step} of {total}</text>"##,
        id = job.id,
        state = job.state.name(),
        step = job.step,
        total = job.total_steps,
    );
    // Grid, ticks and labels.
    for t in ticks(lo, hi, 5) {
        let _ = writeln!(
            svg,
            r##"<line class="ytick" x1="{x0}" y1="{yy:.1}" x2="{x1}" y2="{yy:.1}" stroke="#eee"/><text x="{lx}" y="{ty:.1}" text-anchor="end">{label}</text>"##,
            yy = y(t),
            lx = x0 - 6.0,
            ty = y(t) + 4.0,
            label = tick_label(t)
        );
    }
    for t in ticks(0.0, max_step, 6) {
        let _ = writeln!(
            svg,
            r##"<line class="xtick" x1="{xx:.1}" y1="{y0}" x2="{xx:.1}" y2="{yt}" stroke="#999"/><text x="{xx:.1}" y="{ty}" text-anchor="middle">{label}</text>"##,
            xx = x(t),
            yt = y0 + 5.0,
            ty = y0 + 18.0,
            label = tick_label(t)
        );
    }
    // Epoch boundaries, labelled below the step axis (at most 20 of them).
    if job.epochs > 0 && job.total_steps > 0 {
        let per = job.total_steps as f64 / job.epochs as f64;
        let every = job.epochs.div_ceil(20);
        for e in (every..=job.epochs).step_by(every) {
            let xx = x(e as f64 * per);
            let _ = writeln!(
                svg,
                r##"<line class="epoch" x1="{xx:.1}" y1="{y1}" x2="{xx:.1}" y2="{y0}" stroke="#ccc" stroke-dasharray="2,3"/><text x="{xx:.1}" y="{ty}" text-anchor="middle" fill="#777" font-size="10">e{e}</text>"##,
                ty = y0 + 31.0
            );
        }
    }
    let _ = writeln!(
        svg,
        r##"<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#555"/><line x1="{x0}" y1="{y1}" x2="{x0}" y2="{y0}" stroke="#555"/>
<text x="{cx}" y="{h2}" text-anchor="middle">step (epoch boundaries dashed)</text>
<text transform="translate(16 {cy}) rotate(-90)" text-anchor="middle">loss (cross-entropy per token)</text>"##,
        cx = (x0 + x1) / 2.0,
        h2 = h - 8.0,
        cy = (y0 + y1) / 2.0
    );
    for s in &job.resumed_at {
        let xx = x(*s as f64);
        let _ = writeln!(
            svg,
            r##"<line class="resumed" x1="{xx:.1}" y1="{y1}" x2="{xx:.1}" y2="{y0}" stroke="#2a6" stroke-width="1.5"/><text x="{tx:.1}" y="{ty}" fill="#2a6" font-size="10">resumed</text>"##,
            tx = xx + 3.0,
            ty = y1 + 10.0
        );
    }
    let line = |pts: &[LossPoint]| {
        pts.iter()
            .map(|p| format!("{:.1},{:.1}", x(p.step as f64), y(p.loss)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let _ = write!(
        svg,
        r##"<polyline class="train" fill="none" stroke="#1f77b4" stroke-width="2" points="{train}"/>
<polyline class="val" fill="none" stroke="#d62728" stroke-width="2" stroke-dasharray="5,3" points="{val}"/>
<g class="legend" font-size="11"><line x1="{lx}" y1="30" x2="{lx2}" y2="30" stroke="#1f77b4" stroke-width="2"/><text x="{tx}" y="34">train</text>
<line x1="{vx}" y1="30" x2="{vx2}" y2="30" stroke="#d62728" stroke-width="2" stroke-dasharray="5,3"/><text x="{vtx}" y="34">validation</text></g>
</svg>"##,
        train = line(&job.loss_history),
        val = line(&job.val_loss_history),
        lx = x1 - 170.0,
        lx2 = x1 - 150.0,
        tx = x1 - 145.0,
        vx = x1 - 100.0,
        vx2 = x1 - 80.0,
        vtx = x1 - 75.0,
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// What the fake trainer does once started, as the test says.
    enum Then {
        Finish,
        Fail(&'static str),
        /// Run until cancelled, then report it like the real trainer (checkpoint kept).
        UntilCancelled,
    }

    /// A trainer the test steers: it says when it starts (and whether it resumes), then waits
    /// for the test's word.
    struct Gated {
        started: Mutex<mpsc::Sender<bool>>,
        then: Mutex<mpsc::Receiver<Then>>,
    }

    impl TrainRunner for Gated {
        fn train(
            &self,
            spec: &TrainSpec,
            _ckpt: &Path,
            resume: bool,
            cancel: &AtomicBool,
            report: &mut dyn FnMut(&Progress),
        ) -> Result<Outcome> {
            self.started.lock().unwrap().send(resume).unwrap();
            let progress = Progress {
                step: 7,
                total_steps: 7,
                epochs: spec.params.epochs,
                ..Default::default()
            };
            report(&progress);
            match self.then.lock().unwrap().recv().unwrap() {
                Then::Finish => Ok(Outcome::Finished {
                    bundle: spec.out.clone(),
                    progress,
                }),
                Then::Fail(why) => Err(anyhow::anyhow!(why)),
                Then::UntilCancelled => {
                    while !cancel.load(Ordering::Relaxed) {
                        std::thread::park_timeout(Duration::from_millis(1));
                    }
                    Ok(Outcome::Cancelled { progress })
                }
            }
        }
    }

    #[derive(Default)]
    struct Installs(Mutex<Vec<(String, PathBuf)>>);
    impl ModelInstaller for Installs {
        fn install(&self, name: &str, dir: &Path) -> std::result::Result<u64, String> {
            let mut v = self.0.lock().unwrap();
            v.push((name.to_string(), dir.to_path_buf()));
            Ok(v.len() as u64)
        }
    }

    struct Rig {
        jobs: Arc<JobManager>,
        started: mpsc::Receiver<bool>,
        then: mpsc::Sender<Then>,
        installs: Arc<Installs>,
    }

    fn rig(dir: &Path) -> Rig {
        let (started_tx, started) = mpsc::channel();
        let (then, then_rx) = mpsc::channel();
        let installs = Arc::new(Installs::default());
        let runner = Arc::new(Gated {
            started: Mutex::new(started_tx),
            then: Mutex::new(then_rx),
        });
        let jobs = JobManager::open(
            dir.to_path_buf(),
            runner,
            Some(installs.clone()),
            &Registry::new(),
        )
        .unwrap();
        Rig {
            jobs,
            started,
            then,
            installs,
        }
    }

    const WAIT: Duration = Duration::from_secs(20);

    impl Rig {
        /// Queues a job writing bundle `/b/<output>`.
        fn submit(&self, output: &str, activate: bool) -> JobRecord {
            let spec = spec(&format!("/b/{output}"));
            self.jobs
                .submit(
                    "d".into(),
                    output.into(),
                    "demo".into(),
                    activate,
                    spec,
                    false,
                )
                .unwrap()
        }

        /// Waits (woken by the manager) until job `id` is in `state`.
        fn wait(&self, id: &str, state: JobState) -> JobRecord {
            self.jobs.wait_for(id, WAIT, state_is(state)).unwrap()
        }
    }

    fn spec(out: &str) -> TrainSpec {
        TrainSpec {
            out: PathBuf::from(out),
            params: crate::train::spec::TrainParams {
                epochs: 3,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn the_loss_curve_has_ticks_labels_a_legend_and_resume_marks() {
        assert_eq!(ticks(0.0, 100.0, 5), [0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        assert_eq!(ticks(2.31, 2.87, 5), [2.4, 2.6, 2.8]);
        assert_eq!(ticks(2.3, 2.9, 6), [2.3, 2.4, 2.5, 2.6, 2.7, 2.8, 2.9]);
        assert_eq!(tick_label(2.5000), "2.5");
        let point = |step, epoch, loss| LossPoint { step, epoch, loss };
        let mut job: JobRecord = serde_json::from_value(serde_json::json!({
            "id": "j1", "state": "running", "created_unix": 0, "updated_unix": 0,
            "dataset": "d", "output": "o", "base": "b", "activate": false,
            "spec": spec("/b/o"), "epoch": 1, "epochs": 4, "step": 30, "total_steps": 40,
            "loss": 2.0, "samples_per_s": 1.0, "eta_s": null, "loss_history": [],
            "val_loss_history": [], "error": null, "bundle": null, "activated": false,
            "runs": 2
        }))
        .unwrap();
        job.loss_history = (0..30)
            .map(|s| point(s, (s / 10) as usize, 5.0 - s as f64 * 0.1))
            .collect();
        job.val_loss_history = vec![point(10, 0, 4.5), point(20, 1, 3.6)];
        job.resumed_at = vec![12];
        let svg = loss_svg(&job);
        let count = |needle: &str| svg.matches(needle).count();
        assert_eq!(count(r#"class="epoch""#), 4, "a boundary per epoch");
        assert_eq!(count(r#"class="resumed""#), 1);
        assert!(
            count(r#"class="xtick""#) >= 4 && count(r#"class="ytick""#) >= 4,
            "{svg}"
        );
        for label in [
            "step (epoch",
            "loss (cross-entropy",
            ">train<",
            ">validation<",
            ">e4<",
            ">40<",
        ] {
            assert!(svg.contains(label), "{label} in {svg}");
        }
        // Every point lies inside the plot area.
        let train = svg.split(r#"class="train""#).nth(1).unwrap();
        let pts = train
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        for p in pts.split(' ') {
            let (px, py) = p.split_once(',').unwrap();
            let (px, py): (f64, f64) = (px.parse().unwrap(), py.parse().unwrap());
            assert!(
                (64.0..=660.0).contains(&px) && (44.0..=296.0).contains(&py),
                "{p}"
            );
        }
    }

    fn state_is(s: JobState) -> impl Fn(&JobRecord) -> bool {
        move |j| j.state == s
    }

    fn on_disk(dir: &Path, id: &str) -> JobRecord {
        serde_json::from_str(&std::fs::read_to_string(dir.join(id).join("job.json")).unwrap())
            .unwrap()
    }

    #[test]
    fn a_job_runs_succeeds_and_activates_its_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir.path());
        let job = r.submit("mine", true);
        assert_eq!(job.state, JobState::Queued);
        assert!(
            !r.started.recv_timeout(WAIT).unwrap(),
            "a first run does not resume"
        );
        let running = r.wait(&job.id, JobState::Running);
        assert_eq!(running.runs, 1);
        r.then.send(Then::Finish).unwrap();
        let done = r.wait(&job.id, JobState::Succeeded);
        assert!(done.activated);
        assert_eq!((done.step, done.bundle.as_deref()), (7, Some("/b/mine")));
        assert_eq!(
            *r.installs.0.lock().unwrap(),
            vec![("mine".to_string(), PathBuf::from("/b/mine"))]
        );
        assert_eq!(on_disk(dir.path(), &job.id).state, JobState::Succeeded);
        // A finished job can be neither cancelled nor resumed.
        assert!(r
            .jobs
            .cancel(&job.id)
            .unwrap_err()
            .to_string()
            .contains("already succeeded"));
        assert!(r.jobs.resume(&job.id).is_err());
        assert!(matches!(r.jobs.cancel("nope"), Err(JobError::NotFound(_))));
    }

    #[test]
    fn cancel_then_resume_continues_from_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir.path());
        let a = r.submit("a", false);
        let b = r.submit("b", false);
        assert!(!r.started.recv_timeout(WAIT).unwrap());
        r.wait(&a.id, JobState::Running);
        // b waits behind a: cancelling it never runs it.
        assert_eq!(r.jobs.cancel(&b.id).unwrap().state, JobState::Cancelled);
        r.then.send(Then::UntilCancelled).unwrap();
        assert!(r
            .jobs
            .resume(&a.id)
            .unwrap_err()
            .to_string()
            .contains("is running"));
        r.jobs.cancel(&a.id).unwrap();
        let cancelled = r.wait(&a.id, JobState::Cancelled);
        assert!(!cancelled.activated);
        assert_eq!(r.jobs.resume(&a.id).unwrap().state, JobState::Queued);
        assert!(
            r.started.recv_timeout(WAIT).unwrap(),
            "the second run resumes"
        );
        r.then.send(Then::Finish).unwrap();
        let done = r.wait(&a.id, JobState::Succeeded);
        assert_eq!(done.runs, 2);
        assert!(!done.activated, "activate was not asked for");
        assert!(r.installs.0.lock().unwrap().is_empty());
        assert_eq!(r.jobs.get(&b.id).unwrap().runs, 0);
    }

    #[test]
    fn a_cancel_after_the_last_step_keeps_the_bundle_from_serving() {
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir.path());
        let a = r.submit("a", true);
        r.started.recv_timeout(WAIT).unwrap();
        r.wait(&a.id, JobState::Running);
        // The trainer is past its last cancel check: it finishes, but nothing is activated.
        r.jobs.cancel(&a.id).unwrap();
        r.then.send(Then::Finish).unwrap();
        let done = r.wait(&a.id, JobState::Succeeded);
        assert!(!done.activated);
        assert!(r.installs.0.lock().unwrap().is_empty());
    }

    #[test]
    fn a_failure_is_recorded_and_can_be_retried() {
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir.path());
        let a = r.submit("a", true);
        r.started.recv_timeout(WAIT).unwrap();
        r.then.send(Then::Fail("disk on fire")).unwrap();
        let failed = r.wait(&a.id, JobState::Failed);
        assert_eq!(failed.error.as_deref(), Some("disk on fire"));
        assert_eq!(
            on_disk(dir.path(), &a.id).error.as_deref(),
            Some("disk on fire")
        );
        let again = r.jobs.resume(&a.id).unwrap();
        assert_eq!((again.state, again.error), (JobState::Queued, None));
        assert!(r.started.recv_timeout(WAIT).unwrap());
        r.then.send(Then::Finish).unwrap();
        r.wait(&a.id, JobState::Succeeded);
    }

    #[test]
    fn shutdown_interrupts_and_a_restart_recovers_every_job() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = {
            let r = rig(dir.path());
            let a = r.submit("a", false);
            let b = r.submit("b", false);
            r.started.recv_timeout(WAIT).unwrap();
            r.wait(&a.id, JobState::Running);
            r.then.send(Then::UntilCancelled).unwrap();
            r.jobs.shutdown();
            assert_eq!(r.jobs.get(&a.id).unwrap().state, JobState::Interrupted);
            assert_eq!(r.jobs.get(&b.id).unwrap().state, JobState::Queued);
            (a.id, b.id)
        };
        // As after kill -9: a record that still says running.
        let mut rec = on_disk(dir.path(), &a);
        rec.state = JobState::Running;
        write_record(dir.path(), &rec).unwrap();
        let r = rig(dir.path());
        assert_eq!(r.jobs.get(&a).unwrap().state, JobState::Interrupted);
        assert_eq!(on_disk(dir.path(), &a).state, JobState::Interrupted);
        // The queued one runs by itself after the restart.
        assert!(!r.started.recv_timeout(WAIT).unwrap());
        r.wait(&b, JobState::Running);
        r.then.send(Then::Finish).unwrap();
        r.wait(&b, JobState::Succeeded);
        r.jobs.resume(&a).unwrap();
        assert!(
            r.started.recv_timeout(WAIT).unwrap(),
            "an interrupted job resumes"
        );
        r.then.send(Then::Finish).unwrap();
        let done = r.wait(&a, JobState::Succeeded);
        assert_eq!(done.runs, 2);
    }
}
