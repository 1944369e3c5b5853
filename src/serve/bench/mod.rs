//! `clipcap bench-http`: a bounded load generator against running servers (loopback in our
//! tests and scripts).
//!
//! - **Closed loop** (the default): for each concurrency level, that many clients send a fixed
//!   number of requests back to back; images/s and latency percentiles. Through `/caption`,
//!   the OpenAI-compatible `/v1/chat/completions`, or both level by level (`--api
//!   caption,openai`); optionally after N sequential CLI runs as the baseline.
//! - **Open loop** (`--rate` or `--load`): requests arrive on a seeded Poisson schedule whatever
//!   the server's pace (so queueing shows, unlike in a closed loop), drawn from a mix of kinds
//!   (`--spec`, see [`spec`]); latency counts from the scheduled arrival. `--load` gives the
//!   rates as fractions of the capacity measured first (closed loop at
//!   `--capacity-concurrency`). Several `--target NAME=URL` are loaded level by level in
//!   alternating order, so compared servers meet the same host state; the servers' own batch
//!   histograms are read from `/metrics` around every level ([`scrape`]).
//!
//! Output: a markdown table on stdout, JSON (`--out`), an SVG plot of latency against offered
//! load (`--plot`, [`report`]).
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod open_loop;
pub mod report;
pub mod schedule;
pub mod scrape;
pub mod spec;

use open_loop::{Door, Outcome};
use spec::Mix;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Server base URL (one target named "server"; see --target for several).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// A server to load, as NAME=URL; repeatable (they are loaded in turn, level by level).
    #[arg(long = "target")]
    pub targets: Vec<String>,
    /// Image files to send (cycled in closed loop, drawn at random with a spec).
    #[arg(long = "image", required = true)]
    pub images: Vec<PathBuf>,
    /// A request mix (TOML: kinds with weights, doors, options, images per request).
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Closed-loop concurrency levels, comma-separated.
    #[arg(long, default_value = "1,2,4,8,16,32,64", value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Requests per level (open loop: measured ones, after the warm-up).
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// Open loop: arrival rates in requests/s, comma-separated.
    #[arg(long, value_delimiter = ',', conflicts_with = "load")]
    pub rate: Vec<f64>,
    /// Open loop: arrival rates as fractions of the measured capacity (e.g. 0.2,0.5,0.8,1.2).
    #[arg(long, value_delimiter = ',')]
    pub load: Vec<f64>,
    /// Closed-loop concurrency that measures the capacity behind --load.
    #[arg(long = "capacity-concurrency", default_value_t = 64)]
    pub capacity_concurrency: usize,
    /// Open loop: stop sending a level's arrivals after this many seconds.
    #[arg(long = "duration-s", default_value_t = 120.0)]
    pub duration_s: f64,
    /// Seed of the open-loop schedule and of the mix's draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Extra query string for /caption (e.g. "strategy=greedy"); for the OpenAI API the same
    /// options go in the JSON body. Ignored with --spec.
    #[arg(long, default_value = "")]
    pub query: String,
    /// Which door to load without a spec: caption, openai, or both (each level runs once per
    /// API, in turn).
    #[arg(long, default_value = "caption", value_delimiter = ',')]
    pub api: Vec<Api>,
    /// Model name for the OpenAI API's `model` field (default: the server's default).
    #[arg(long)]
    pub model: Option<String>,
    /// Also time this many sequential `clipcap caption` runs (one image each) as the baseline.
    #[arg(long = "cli-baseline", default_value_t = 0)]
    pub cli_baseline: usize,
    /// Bundle for the CLI baseline.
    #[arg(long = "cli-model", default_value = "models/demo")]
    pub cli_model: PathBuf,
    /// Write the results as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Open loop: write an SVG plot of latency against offered load here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Give up on one request after this many seconds.
    #[arg(long = "timeout-s", default_value_t = 120)]
    pub timeout_s: u64,
    /// Send `Authorization: Bearer KEY` (a server with an API key).
    #[arg(long = "api-key")]
    pub api_key: Option<String>,
    /// An extra request header `NAME: VALUE`; repeatable.
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// Requests sent (unmeasured) before each level, so start-up costs are not counted; in
    /// open loop the first arrivals of the schedule.
    #[arg(long, default_value_t = 4)]
    pub warmup: usize,
}

/// The door a benchmark loads.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// `POST /caption` with the raw image (multipart for several).
    Caption,
    /// `POST /v1/chat/completions` with the image as a data: URI.
    Openai,
}

impl Api {
    fn path(self) -> &'static str {
        match self {
            Api::Caption => "/caption",
            Api::Openai => "/v1/chat/completions",
        }
    }
}

/// Latency percentiles of one set of requests, in milliseconds.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Dist {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Dist {
    pub fn of(mut v: Vec<f64>) -> Dist {
        v.sort_by(|a, b| a.total_cmp(b));
        Dist {
            n: v.len(),
            p50: percentile(&v, 50.0),
            p90: percentile(&v, 90.0),
            p99: percentile(&v, 99.0),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// One closed-loop level.
#[derive(Debug, serde::Serialize)]
pub struct LevelResult {
    pub target: String,
    /// The door (without a spec) or the mix's name.
    pub api: String,
    pub concurrency: usize,
    pub requests: usize,
    pub errors: usize,
    pub seconds: f64,
    pub images_per_s: f64,
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The first failure's status and body, if any failed.
    pub first_error: Option<String>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// What one benchmark loads: the targets, and the mixes (one per door without a spec).
struct Plan {
    targets: Vec<(String, String)>,
    mixes: Vec<(String, Mix)>,
}

fn targets(a: &BenchArgs) -> Result<Vec<(String, String)>> {
    if a.targets.is_empty() {
        return Ok(vec![("server".into(), a.url.clone())]);
    }
    a.targets
        .iter()
        .map(|t| match t.split_once('=') {
            Some((n, u)) if !n.is_empty() && !u.is_empty() => Ok((n.to_string(), u.to_string())),
            _ => bail!("--target {t:?}: expected NAME=URL"),
        })
        .collect()
}

pub fn run(a: BenchArgs) -> Result<()> {
    let plan = Plan {
        targets: targets(&a)?,
        mixes: match &a.spec {
            Some(p) => {
                let name = p
                    .file_stem()
                    .map_or("mix".into(), |s| s.to_string_lossy().into_owned());
                vec![(name, Mix::load(p)?)]
            }
            None => {
                let mut apis = a.api.clone();
                apis.dedup();
                apis.iter()
                    .map(|&api| Ok((api.path().to_string(), Mix::single(api, &a.query)?)))
                    .collect::<Result<_>>()?
            }
        },
    };
    let mut baseline = None;
    if a.cli_baseline > 0 {
        baseline = Some(cli_baseline(&a)?);
    }
    println!(
        "host: {} ({} cores); targets {}",
        crate::device::cpu_model(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        plan.targets
            .iter()
            .map(|(n, u)| format!("{n}={u}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if a.rate.is_empty() && a.load.is_empty() {
        let results = rt.block_on(closed_levels(&a, &plan))?;
        report::print_closed(&results, baseline, plan.targets.len() > 1);
        if let Some(path) = &a.out {
            let v = serde_json::json!({"cli_baseline_images_per_s": baseline, "levels": results});
            crate::fsutil::write_atomic(path, serde_json::to_string_pretty(&v)?.as_bytes())?;
        }
        return Ok(());
    }
    let sweep = rt.block_on(open_levels(&a, &plan))?;
    report::print_open(&sweep);
    if let Some(path) = &a.out {
        crate::fsutil::write_atomic(path, serde_json::to_string_pretty(&sweep)?.as_bytes())?;
    }
    if let Some(path) = &a.plot {
        crate::fsutil::write_atomic(path, report::svg(&sweep).as_bytes())?;
        println!("plot: {}", path.display());
    }
    Ok(())
}

fn cli_baseline(a: &BenchArgs) -> Result<f64> {
    let exe = std::env::current_exe()?;
    let t0 = Instant::now();
    for i in 0..a.cli_baseline {
        let img = &a.images[i % a.images.len()];
        let out = std::process::Command::new(&exe)
            .args(["caption", "--model"])
            .arg(&a.cli_model)
            .arg(img)
            .output()?;
        if !out.status.success() {
            bail!(
                "CLI baseline failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let ips = a.cli_baseline as f64 / secs;
    println!(
        "baseline: {} sequential `clipcap caption` runs (one image each): {secs:.2} s, {ips:.2} images/s",
        a.cli_baseline
    );
    Ok(ips)
}

/// The headers every request carries (`--api-key`, `--header`).
fn default_headers(a: &BenchArgs) -> Result<reqwest::header::HeaderMap> {
    use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION};
    let mut h = HeaderMap::new();
    if let Some(k) = &a.api_key {
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {k}"))?,
        );
    }
    for line in &a.headers {
        let Some((name, value)) = line.split_once(':') else {
            bail!("--header {line:?}: expected NAME: VALUE");
        };
        h.insert(
            HeaderName::from_bytes(name.trim().as_bytes())
                .with_context(|| format!("--header {line:?}"))?,
            HeaderValue::from_str(value.trim()).with_context(|| format!("--header {line:?}"))?,
        );
    }
    Ok(h)
}

fn client(a: &BenchArgs) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(a.timeout_s))
        .pool_max_idle_per_host(1024)
        .default_headers(default_headers(a)?)
        .build()?)
}

/// Every (target, mix) pair as a door, each checked with one request: a wrong key or URL fails
/// here, with the server's answer.
async fn doors(a: &BenchArgs, plan: &Plan) -> Result<Vec<Vec<Door>>> {
    let client = client(a)?;
    let mut all = vec![];
    for (name, url) in &plan.targets {
        let mut per_mix = vec![];
        for (mix_name, mix) in &plan.mixes {
            let door = Door::new(client.clone(), name, url, mix_name, mix, &a.images, a)?;
            for kind in 0..mix.kinds.len() {
                let first = schedule::Planned {
                    at: Duration::ZERO,
                    kind,
                    images: vec![0],
                };
                let o = door.send(&first, Instant::now()).await;
                if let Some(e) = o.error {
                    bail!(
                        "the first request to {name} ({}, kind {:?}) failed: {e}",
                        mix_name,
                        mix.kinds[kind].name
                    );
                }
            }
            per_mix.push(door);
        }
        all.push(per_mix);
    }
    Ok(all)
}

async fn closed_levels(a: &BenchArgs, plan: &Plan) -> Result<Vec<LevelResult>> {
    let doors = doors(a, plan).await?;
    let mut out = vec![];
    for &c in &a.concurrency {
        // Each target and door in turn at the same level, so that they meet the same host state.
        for per_target in &doors {
            for door in per_target {
                let warm = door.plan(None, a.warmup, a.seed.wrapping_add(1));
                for p in &warm {
                    door.send(p, Instant::now()).await;
                }
                out.push(closed_level(door, c, door.plan(None, a.requests, a.seed)).await?);
            }
        }
    }
    Ok(out)
}

/// `c` clients send `requests` back to back, each taking the next one as it is free.
async fn closed_level(
    door: &Door,
    c: usize,
    requests: Vec<schedule::Planned>,
) -> Result<LevelResult> {
    let total = requests.len();
    let requests = Arc::new(requests);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut tasks = vec![];
    for _ in 0..c.max(1) {
        let (door, requests, next) = (door.clone(), requests.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut done: Vec<Outcome> = vec![];
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= requests.len() {
                    break;
                }
                done.push(door.send(&requests[i], Instant::now()).await);
            }
            done
        }));
    }
    let mut outcomes = vec![];
    for t in tasks {
        outcomes.extend(t.await?);
    }
    let secs = t0.elapsed().as_secs_f64();
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.error.is_none()).collect();
    let images: usize = ok.iter().map(|o| o.images).sum();
    let lat = Dist::of(ok.iter().map(|o| o.latency_ms).collect());
    Ok(LevelResult {
        target: door.target.clone(),
        api: door.mix_name.clone(),
        concurrency: c,
        requests: total,
        errors: outcomes.len() - ok.len(),
        seconds: secs,
        images_per_s: images as f64 / secs,
        requests_per_s: ok.len() as f64 / secs,
        p50_ms: lat.p50,
        p90_ms: lat.p90,
        p99_ms: lat.p99,
        max_ms: lat.max,
        first_error: outcomes.iter().find_map(|o| o.error.clone()),
    })
}

/// An open-loop sweep: the capacity probe (with `--load`) and every level.
#[derive(Debug, serde::Serialize)]
pub struct Sweep {
    pub host: String,
    pub cores: usize,
    pub mix: String,
    pub seed: u64,
    /// Closed-loop requests/s per target at `capacity_concurrency` (with `--load`).
    pub capacity: Vec<LevelResult>,
    /// The rate `load` fractions are of: the best target's capacity.
    pub capacity_rps: Option<f64>,
    pub levels: Vec<open_loop::OpenLevel>,
}

async fn open_levels(a: &BenchArgs, plan: &Plan) -> Result<Sweep> {
    if plan.mixes.len() != 1 {
        bail!("open loop loads one mix: give --spec, or one --api");
    }
    let doors: Vec<Door> = doors(a, plan)
        .await?
        .into_iter()
        .map(|mut v| v.remove(0))
        .collect();
    let mut capacity = vec![];
    let mut capacity_rps = None;
    let rates: Vec<(Option<f64>, f64)> = if a.load.is_empty() {
        a.rate.iter().map(|&r| (None, r)).collect()
    } else {
        for door in &doors {
            let warm = door.plan(
                None,
                a.warmup.max(a.capacity_concurrency),
                a.seed.wrapping_add(1),
            );
            closed_level(door, a.capacity_concurrency, warm).await?;
            let r = closed_level(
                door,
                a.capacity_concurrency,
                door.plan(None, a.requests.max(2 * a.capacity_concurrency), a.seed),
            )
            .await?;
            println!(
                "capacity of {}: {:.2} requests/s ({:.2} images/s) closed loop at concurrency {}",
                door.target, r.requests_per_s, r.images_per_s, a.capacity_concurrency
            );
            capacity.push(r);
        }
        let best = capacity
            .iter()
            .map(|r| r.requests_per_s)
            .fold(0.0, f64::max);
        if best <= 0.0 {
            bail!("no request succeeded while measuring the capacity");
        }
        capacity_rps = Some(best);
        a.load.iter().map(|&f| (Some(f), f * best)).collect()
    };
    let mut levels = vec![];
    for (i, &(fraction, rate)) in rates.iter().enumerate() {
        if !(rate.is_finite() && rate > 0.0) {
            bail!("arrival rates must be > 0 requests/s (got {rate})");
        }
        // Alternate which target goes first, so neither always follows the other's tail.
        let order: Vec<&Door> = if i % 2 == 0 {
            doors.iter().collect()
        } else {
            doors.iter().rev().collect()
        };
        for door in order {
            let schedule = door.plan(Some(rate), a.warmup + a.requests, a.seed);
            let level = open_loop::run_level(
                door,
                schedule,
                a.warmup,
                Duration::from_secs_f64(a.duration_s),
                fraction,
                rate,
            )
            .await?;
            eprintln!(
                "{} at {:.2} req/s: p99 {:.0} ms, {:.2} req/s achieved",
                door.target, rate, level.latency_ms.p99, level.achieved_rps
            );
            levels.push(level);
        }
    }
    Ok(Sweep {
        host: crate::device::cpu_model(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        mix: plan.mixes[0].0.clone(),
        seed: a.seed,
        capacity,
        capacity_rps,
        levels,
    })
}
