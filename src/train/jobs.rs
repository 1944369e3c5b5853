//! Training jobs run by the server (`POST /train`), one at a time on a background thread.
//!
//! Each job lives in `jobs_dir/<id>/`: `job.json` (spec, state, progress, loss history; written
//! atomically), `train.log`, and `ckpt/` (the trainer's checkpoint). A restart reloads every
//! job; one that was running becomes `interrupted` and can be resumed from its checkpoint.
use crate::config::Config;
use crate::serve::batcher::Shared;
use crate::train::trainer::{self, LossPoint, Outcome, Progress, TrainSpec};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

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
    pub bundle: Option<String>,
    pub activated: bool,
    /// How many times it was (re)started.
    pub runs: u32,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

struct Inner {
    jobs: BTreeMap<String, JobRecord>,
    queue: VecDeque<String>,
    cancel: HashMap<String, Arc<AtomicBool>>,
    stopping: bool,
}

pub struct JobManager {
    cfg: Arc<Config>,
    shared: Arc<Shared>,
    device: tch::Device,
    dir: PathBuf,
    inner: Mutex<Inner>,
    wake: Condvar,
    /// Needed to activate trained bundles; cleared on shutdown (it holds the worker's queue).
    state: Mutex<Option<crate::serve::AppState>>,
    runtime: OnceLock<tokio::runtime::Handle>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl JobManager {
    /// Loads every job under `jobs_dir`; running ones become interrupted, queued ones re-queue.
    pub fn open(cfg: Arc<Config>, shared: Arc<Shared>, device: tch::Device) -> Result<Arc<Self>> {
        let dir = PathBuf::from(&cfg.training.jobs_dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut jobs = BTreeMap::new();
        let mut queue = VecDeque::new();
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
                            write_record(&dir, &job)?;
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
        let m = Arc::new(JobManager {
            cfg,
            shared,
            device,
            dir,
            inner: Mutex::new(Inner {
                jobs,
                queue,
                cancel: HashMap::new(),
                stopping: false,
            }),
            wake: Condvar::new(),
            state: Mutex::new(None),
            runtime: OnceLock::new(),
            thread: Mutex::new(None),
        });
        m.update_metrics();
        Ok(m)
    }

    /// Starts the training thread (needs the app state to activate trained bundles).
    pub fn attach(self: &Arc<Self>, state: crate::serve::AppState) {
        *self.state.lock().unwrap() = Some(state);
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            let _ = self.runtime.set(h);
        }
        let me = self.clone();
        let t = std::thread::Builder::new()
            .name("clipcap-train".into())
            .spawn(move || me.run())
            .expect("spawning the training thread");
        *self.thread.lock().unwrap() = Some(t);
    }

    /// Stops taking jobs; a running job is cancelled at its next step (checkpoint kept) and
    /// recorded as interrupted, so a restart can resume it.
    pub fn shutdown(&self) {
        {
            let mut inner = self.inner.lock().unwrap();
            inner.stopping = true;
            for flag in inner.cancel.values() {
                flag.store(true, Ordering::Relaxed);
            }
        }
        self.wake.notify_all();
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
        self.state.lock().unwrap().take();
    }

    pub fn data_root(&self) -> PathBuf {
        PathBuf::from(&self.cfg.training.data_root)
    }

    pub fn bundles_dir(&self) -> PathBuf {
        PathBuf::from(&self.cfg.training.bundles_dir)
    }

    pub fn list(&self) -> Vec<JobRecord> {
        self.inner.lock().unwrap().jobs.values().cloned().collect()
    }

    pub fn get(&self, id: &str) -> Option<JobRecord> {
        self.inner.lock().unwrap().jobs.get(id).cloned()
    }

    /// Queues a new job.
    pub fn submit(
        &self,
        dataset: String,
        output: String,
        base: String,
        activate: bool,
        spec: TrainSpec,
    ) -> Result<JobRecord> {
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
            epochs: spec.epochs,
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
            bundle: None,
            activated: false,
            runs: 0,
        };
        std::fs::create_dir_all(self.dir.join(&id))?;
        write_record(&self.dir, &job)?;
        let mut inner = self.inner.lock().unwrap();
        inner.jobs.insert(id.clone(), job.clone());
        inner.queue.push_back(id);
        drop(inner);
        self.wake.notify_all();
        self.update_metrics();
        Ok(job)
    }

    /// Cancels a queued or running job. Errors: `Ok(None)` when unknown, `Err` when finished.
    pub fn cancel(&self, id: &str) -> std::result::Result<Option<JobRecord>, String> {
        let mut inner = self.inner.lock().unwrap();
        let flag = inner.cancel.get(id).cloned();
        let Some(job) = inner.jobs.get_mut(id) else {
            return Ok(None);
        };
        match job.state {
            JobState::Queued => {
                job.state = JobState::Cancelled;
                job.updated_unix = now();
                let job = job.clone();
                inner.queue.retain(|q| q != id);
                write_record(&self.dir, &job).map_err(|e| e.to_string())?;
                drop(inner);
                self.update_metrics();
                Ok(Some(job))
            }
            JobState::Running => {
                if let Some(f) = flag {
                    f.store(true, Ordering::Relaxed);
                }
                Ok(Some(job.clone()))
            }
            s => Err(format!("job {id} is already {}", s.name())),
        }
    }

    /// Re-queues an interrupted, cancelled or failed job; it continues from its checkpoint.
    pub fn resume(&self, id: &str) -> std::result::Result<Option<JobRecord>, String> {
        let mut inner = self.inner.lock().unwrap();
        let Some(job) = inner.jobs.get_mut(id) else {
            return Ok(None);
        };
        match job.state {
            JobState::Interrupted | JobState::Cancelled | JobState::Failed => {
                job.state = JobState::Queued;
                job.error = None;
                job.updated_unix = now();
                let job = job.clone();
                write_record(&self.dir, &job).map_err(|e| e.to_string())?;
                inner.queue.push_back(id.to_string());
                drop(inner);
                self.wake.notify_all();
                self.update_metrics();
                Ok(Some(job))
            }
            s => Err(format!(
                "job {id} is {}; only interrupted, cancelled or failed jobs resume",
                s.name()
            )),
        }
    }

    fn update_metrics(&self) {
        let inner = self.inner.lock().unwrap();
        for s in JobState::ALL {
            let n = inner.jobs.values().filter(|j| j.state == s).count();
            self.shared
                .metrics
                .train_jobs
                .with_label_values(&[s.name()])
                .set(n as i64);
        }
    }

    fn run(self: Arc<Self>) {
        loop {
            let id = {
                let mut inner = self.inner.lock().unwrap();
                loop {
                    if inner.stopping {
                        return;
                    }
                    if let Some(id) = inner.queue.pop_front() {
                        break id;
                    }
                    inner = self.wake.wait(inner).unwrap();
                }
            };
            self.run_job(&id);
        }
    }

    fn set<F: FnOnce(&mut JobRecord)>(&self, id: &str, f: F) -> Option<JobRecord> {
        let mut inner = self.inner.lock().unwrap();
        let job = inner.jobs.get_mut(id)?;
        f(job);
        job.updated_unix = now();
        let job = job.clone();
        drop(inner);
        if let Err(e) = write_record(&self.dir, &job) {
            tracing::error!(job = id, error = %e, "cannot write job record");
        }
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

    fn run_job(&self, id: &str) {
        let flag = Arc::new(AtomicBool::new(false));
        self.inner
            .lock()
            .unwrap()
            .cancel
            .insert(id.to_string(), flag.clone());
        let Some(job) = self.set(id, |j| {
            j.state = JobState::Running;
            j.runs += 1;
        }) else {
            return;
        };
        self.update_metrics();
        let resume = job.runs > 1;
        self.log(id, &format!("start (run {}, resume {resume})", job.runs));
        tracing::info!(job = id, dataset = %job.dataset, output = %job.output, "training job started");
        let ckpt = self.dir.join(id).join("ckpt");
        let m = &self.shared.metrics;
        let mut last_write = Instant::now();
        let mut report = |p: &Progress| {
            m.train_step.with_label_values(&[id]).set(p.step);
            m.train_loss.with_label_values(&[id]).set(p.loss);
            m.train_samples_per_second
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
            };
            if flush {
                self.set(id, apply);
                last_write = Instant::now();
            } else if let Some(j) = self.inner.lock().unwrap().jobs.get_mut(id) {
                apply(j);
            }
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            trainer::train(&job.spec, self.device, &ckpt, resume, &flag, &mut report)
        }))
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the trainer panicked")));
        self.inner.lock().unwrap().cancel.remove(id);
        let stopping = self.inner.lock().unwrap().stopping;
        match result {
            Ok(Outcome::Finished { bundle, progress }) => {
                self.log(id, &format!("finished: {}", bundle.display()));
                let mut activated = false;
                if job.activate {
                    activated = self.activate(&job.output, &bundle);
                }
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
        self.update_metrics();
    }

    /// Installs the trained bundle in the inference worker under `name`.
    fn activate(&self, name: &str, dir: &Path) -> bool {
        let state = self.state.lock().unwrap().clone();
        let (Some(state), Some(rt)) = (state, self.runtime.get()) else {
            return false;
        };
        match rt.block_on(state.install_bundle(name, dir, false)) {
            Ok(info) => {
                tracing::info!(model = %info.name, version = info.version, "trained bundle activated");
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

/// The loss curve (training, and validation when present) as a small standalone SVG.
pub fn loss_svg(job: &JobRecord) -> String {
    let (w, h, pad) = (640.0, 320.0, 40.0);
    let all: Vec<&LossPoint> = job
        .loss_history
        .iter()
        .chain(job.val_loss_history.iter())
        .collect();
    let max_step = all.iter().map(|p| p.step).max().unwrap_or(1).max(1) as f64;
    let max_loss = all.iter().map(|p| p.loss).fold(0.0f64, f64::max).max(1e-9);
    let min_loss = all
        .iter()
        .map(|p| p.loss)
        .fold(f64::INFINITY, f64::min)
        .min(max_loss);
    let span = (max_loss - min_loss).max(1e-9);
    let x = |s: i64| pad + (s as f64 / max_step) * (w - 2.0 * pad);
    let y = |l: f64| h - pad - ((l - min_loss) / span) * (h - 2.0 * pad);
    let line = |pts: &[LossPoint]| {
        pts.iter()
            .map(|p| format!("{:.1},{:.1}", x(p.step), y(p.loss)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{pad}" y="20">job {id}: loss by step ({state})</text>
<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="#999"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{b}" stroke="#999"/>
<text x="4" y="{ty}">{max_loss:.3}</text><text x="4" y="{b}">{min_loss:.3}</text><text x="{r}" y="{tb}" text-anchor="end">step {ms}</text>
<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{train}"/>
<polyline fill="none" stroke="#d62728" stroke-width="2" stroke-dasharray="5,3" points="{val}"/>
<text x="{r}" y="20" text-anchor="end" fill="#1f77b4">train</text><text x="{r}" y="34" text-anchor="end" fill="#d62728">validation</text>
</svg>"##,
        id = job.id,
        state = job.state.name(),
        b = h - pad,
        r = w - pad,
        ty = pad + 4.0,
        tb = h - pad + 16.0,
        ms = max_step as i64,
        train = line(&job.loss_history),
        val = line(&job.val_loss_history),
    )
}
