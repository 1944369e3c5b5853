//! `clipcap bench-http`: a bounded load generator against a running server (loopback only in
//! our tests). For each concurrency level it sends a fixed number of single-image requests and
//! reports images/s and p50/p99 latency, through `/caption`, the OpenAI-compatible
//! `/v1/chat/completions`, or both interleaved level by level (`--api caption,openai`);
//! optionally it first times N sequential CLI runs (`clipcap caption`, one process per image)
//! as the baseline, and prints ratios.
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Server base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Image files to send (cycled).
    #[arg(long = "image", required = true)]
    pub images: Vec<PathBuf>,
    /// Concurrency levels, comma-separated.
    #[arg(long, default_value = "1,2,4,8,16,32,64", value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Requests per level.
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// Extra query string for /caption (e.g. "strategy=greedy"); for the OpenAI API the same
    /// options go in the JSON body.
    #[arg(long, default_value = "")]
    pub query: String,
    /// Which door to load: caption, openai, or both (each level runs once per API, in turn).
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
    /// Give up on one request after this many seconds.
    #[arg(long = "timeout-s", default_value_t = 120)]
    pub timeout_s: u64,
    /// Send `Authorization: Bearer KEY` (a server with an API key).
    #[arg(long = "api-key")]
    pub api_key: Option<String>,
    /// An extra request header `NAME: VALUE`; repeatable.
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// Requests sent (unmeasured) before each level, so start-up costs are not counted.
    #[arg(long, default_value_t = 4)]
    pub warmup: usize,
}

/// The door a benchmark loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// `POST /caption` with the raw image.
    Caption,
    /// `POST /v1/chat/completions` with the image as a data: URI.
    Openai,
}

#[derive(Debug, serde::Serialize)]
pub struct LevelResult {
    pub api: Api,
    pub concurrency: usize,
    pub requests: usize,
    pub errors: usize,
    pub seconds: f64,
    pub images_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
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

pub fn run(a: BenchArgs) -> Result<()> {
    let images: Vec<Vec<u8>> = a
        .images
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .collect::<Result<_>>()?;
    let mut baseline = None;
    if a.cli_baseline > 0 {
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
        baseline = Some(ips);
    }
    println!(
        "host: {} ({} cores); server {}",
        crate::device::cpu_model(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        a.url
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let results = rt.block_on(run_levels(&a, Arc::new(images)))?;
    println!(
        "| API | concurrency | requests | errors | images/s | p50 ms | p99 ms |{}",
        if baseline.is_some() { " vs CLI |" } else { "" }
    );
    println!(
        "|---|---|---|---|---|---|---|{}",
        if baseline.is_some() { "---|" } else { "" }
    );
    for r in results.iter() {
        if let Some(e) = &r.first_error {
            eprintln!(
                "concurrency {}: {} errors; the first: {e}",
                r.concurrency, r.errors
            );
        }
    }
    for r in &results {
        let ratio = baseline
            .map(|b| format!(" {:.1}x |", r.images_per_s / b))
            .unwrap_or_default();
        let api = match r.api {
            Api::Caption => "/caption",
            Api::Openai => "/v1/chat/completions",
        };
        println!(
            "| {api} | {} | {} | {} | {:.2} | {:.1} | {:.1} |{ratio}",
            r.concurrency, r.requests, r.errors, r.images_per_s, r.p50_ms, r.p99_ms
        );
    }
    if let Some(path) = &a.out {
        let v = serde_json::json!({"cli_baseline_images_per_s": baseline, "levels": results});
        crate::fsutil::write_atomic(path, serde_json::to_string_pretty(&v)?.as_bytes())?;
    }
    Ok(())
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

/// What the requests of a level send: request `i` posts `bodies[i % len]` to `url`.
#[derive(Clone)]
struct Target {
    url: String,
    content_type: &'static str,
    bodies: Arc<Vec<Vec<u8>>>,
}

impl Target {
    fn new(a: &BenchArgs, api: Api, images: &Arc<Vec<Vec<u8>>>) -> Result<Self> {
        let base = a.url.trim_end_matches('/');
        Ok(match api {
            // The raw image bodies; the options in the query string.
            Api::Caption => Target {
                url: if a.query.is_empty() {
                    format!("{base}/caption")
                } else {
                    format!("{base}/caption?{}", a.query)
                },
                content_type: "image/png",
                bodies: images.clone(),
            },
            Api::Openai => {
                use base64::Engine as _;
                let pairs: Vec<(String, String)> = serde_urlencoded::from_str(&a.query)
                    .with_context(|| format!("--query {:?}", a.query))?;
                let bodies = images
                    .iter()
                    .map(|img| {
                        let uri = format!(
                            "data:image/png;base64,{}",
                            base64::engine::general_purpose::STANDARD.encode(img)
                        );
                        let mut body = serde_json::json!({"messages": [{"role": "user", "content": [
                            {"type": "image_url", "image_url": {"url": uri}}]}]});
                        if let Some(m) = &a.model {
                            body["model"] = serde_json::json!(m);
                        }
                        for (k, v) in &pairs {
                            // Numbers and booleans as JSON, anything else as text.
                            body[k] = serde_json::from_str(v)
                                .unwrap_or_else(|_| serde_json::Value::String(v.clone()));
                        }
                        body.to_string().into_bytes()
                    })
                    .collect();
                Target {
                    url: format!("{base}/v1/chat/completions"),
                    content_type: "application/json",
                    bodies: Arc::new(bodies),
                }
            }
        })
    }

    async fn send(&self, client: &reqwest::Client, i: usize) -> Result<()> {
        let r = client
            .post(&self.url)
            .header("content-type", self.content_type)
            .body(self.bodies[i % self.bodies.len()].clone())
            .send()
            .await?;
        if !r.status().is_success() {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            bail!(
                "status {status}: {}",
                body.chars().take(500).collect::<String>()
            );
        }
        r.bytes().await?;
        Ok(())
    }
}

async fn run_levels(a: &BenchArgs, images: Arc<Vec<Vec<u8>>>) -> Result<Vec<LevelResult>> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(a.timeout_s))
        .pool_max_idle_per_host(256)
        .default_headers(default_headers(a)?)
        .build()?;
    let mut apis = a.api.clone();
    apis.dedup();
    let targets: Vec<(Api, Target)> = apis
        .iter()
        .map(|&api| Target::new(a, api, &images).map(|t| (api, t)))
        .collect::<Result<_>>()?;
    // A first request must succeed: a wrong key or URL fails here, with the server's answer.
    for (_, t) in &targets {
        t.send(&client, 0)
            .await
            .context("the first request failed")?;
    }
    let mut out = vec![];
    for &c in &a.concurrency {
        // Each API in turn at the same level, so that they meet the same host state.
        for (api, target) in &targets {
            for i in 0..a.warmup {
                target.send(&client, i).await?;
            }
            out.push(run_level(&client, target, *api, c, a.requests).await?);
        }
    }
    Ok(out)
}

async fn run_level(
    client: &reqwest::Client,
    target: &Target,
    api: Api,
    c: usize,
    total: usize,
) -> Result<LevelResult> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut tasks = vec![];
    for _ in 0..c.max(1) {
        let (client, target, next) = (client.clone(), target.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = vec![];
            let mut errors = 0;
            let mut first_error = None;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let t = Instant::now();
                match target.send(&client, i).await {
                    Ok(()) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
            (lat, errors, first_error)
        }));
    }
    let mut lat = vec![];
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let (l, e, f) = t.await?;
        lat.extend(l);
        errors += e;
        first_error = first_error.or(f);
    }
    let secs = t0.elapsed().as_secs_f64();
    lat.sort_by(|x, y| x.partial_cmp(y).unwrap());
    Ok(LevelResult {
        api,
        concurrency: c,
        requests: total,
        errors,
        seconds: secs,
        images_per_s: lat.len() as f64 / secs,
        p50_ms: percentile(&lat, 50.0),
        p99_ms: percentile(&lat, 99.0),
        first_error,
    })
}
