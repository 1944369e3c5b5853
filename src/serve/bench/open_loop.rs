//! Sending a schedule's requests: a [`Door`] turns a planned request into an HTTP request of its
//! kind, and [`run_level`] sends an open-loop schedule at its times, however the server keeps
//! up, with the server's histograms read before and after.
use super::schedule::{plan, Planned};
use super::scrape::{self, Histogram};
use super::spec::{query_text, Mix};
use super::{Api, BenchArgs, Dist};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one request came to.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// From when it was due to its last byte.
    pub latency_ms: f64,
    /// Streams: from when it was due to the first text.
    pub ttft_ms: Option<f64>,
    /// The server's own queue time (`Server-Timing: queue`), where it says.
    pub queue_ms: Option<f64>,
    pub images: usize,
    pub kind: usize,
    /// The status, or "transport" when none came.
    pub error_class: Option<String>,
    pub error: Option<String>,
    pub done: Instant,
}

struct Image {
    bytes: Vec<u8>,
    mime: &'static str,
}

/// One kind's requests, ready to send.
struct KindDoor {
    api: Api,
    stream: bool,
    url: String,
    images: Vec<Arc<Image>>,
    /// OpenAI: the JSON body for each image of the pool (built once: base64 costs the client's
    /// CPU, which the server shares here).
    bodies: Vec<bytes::Bytes>,
}

/// One target loaded with one mix.
#[derive(Clone)]
pub struct Door {
    client: reqwest::Client,
    pub target: String,
    pub mix_name: String,
    base: String,
    mix: Arc<Mix>,
    kinds: Arc<Vec<KindDoor>>,
}

fn mime(path: &std::path::Path) -> &'static str {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .as_deref()
    {
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        Some("bmp") => "image/bmp",
        Some("tif" | "tiff") => "image/tiff",
        _ => "image/png",
    }
}

impl Door {
    pub fn new(
        client: reqwest::Client,
        target: &str,
        url: &str,
        mix_name: &str,
        mix: &Mix,
        default_images: &[PathBuf],
        a: &BenchArgs,
    ) -> Result<Door> {
        use base64::Engine as _;
        let base = url.trim_end_matches('/').to_string();
        let mut cache: BTreeMap<PathBuf, Arc<Image>> = BTreeMap::new();
        let mut kinds = vec![];
        for k in &mix.kinds {
            let files = if k.image_files.is_empty() {
                default_images
            } else {
                &k.image_files
            };
            let mut images = vec![];
            for f in files {
                let img = match cache.get(f) {
                    Some(i) => i.clone(),
                    None => {
                        let bytes =
                            std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
                        let i = Arc::new(Image {
                            bytes,
                            mime: mime(f),
                        });
                        cache.insert(f.clone(), i.clone());
                        i
                    }
                };
                images.push(img);
            }
            let url = match k.api {
                Api::Caption if k.options.is_empty() => format!("{base}/caption"),
                Api::Caption => {
                    let pairs: Vec<(String, String)> = k
                        .options
                        .iter()
                        .map(|(n, v)| (n.clone(), query_text(v)))
                        .collect();
                    format!("{base}/caption?{}", serde_urlencoded::to_string(pairs)?)
                }
                Api::Openai => format!("{base}/v1/chat/completions"),
            };
            let bodies = match k.api {
                Api::Caption => vec![],
                Api::Openai => images
                    .iter()
                    .map(|img| {
                        let uri = format!(
                            "data:{};base64,{}",
                            img.mime,
                            base64::engine::general_purpose::STANDARD.encode(&img.bytes)
                        );
                        let mut body = serde_json::json!({"messages": [{"role": "user", "content": [
                            {"type": "image_url", "image_url": {"url": uri}}]}]});
                        if let Some(m) = &a.model {
                            body["model"] = serde_json::json!(m);
                        }
                        for (n, v) in &k.options {
                            body[n] = v.clone();
                        }
                        if k.stream {
                            body["stream"] = serde_json::json!(true);
                        }
                        bytes::Bytes::from(body.to_string())
                    })
                    .collect(),
            };
            kinds.push(KindDoor {
                api: k.api,
                stream: k.stream,
                url,
                images,
                bodies,
            });
        }
        Ok(Door {
            client,
            target: target.to_string(),
            mix_name: mix_name.to_string(),
            base,
            mix: Arc::new(mix.clone()),
            kinds: Arc::new(kinds),
        })
    }

    /// `count` requests of this door's mix (see [`plan`]).
    pub fn plan(&self, rate: Option<f64>, count: usize, seed: u64) -> Vec<Planned> {
        let pools: Vec<usize> = self.kinds.iter().map(|k| k.images.len()).collect();
        plan(&self.mix, &pools, rate, count, seed)
    }

    /// Sends one request; `due` is when it should have left (latency counts from there).
    pub async fn send(&self, p: &Planned, due: Instant) -> Outcome {
        let k = &self.kinds[p.kind];
        let mut ttft = None;
        let result: Result<Option<f64>, (String, String)> = async {
            let req = match k.api {
                Api::Openai => self
                    .client
                    .post(&k.url)
                    .header("content-type", "application/json")
                    .body(k.bodies[p.images[0] % k.bodies.len()].clone()),
                Api::Caption if p.images.len() == 1 => {
                    let img = &k.images[p.images[0] % k.images.len()];
                    self.client
                        .post(&k.url)
                        .header("content-type", img.mime)
                        .body(img.bytes.clone())
                }
                Api::Caption => {
                    let mut form = reqwest::multipart::Form::new();
                    for (j, &i) in p.images.iter().enumerate() {
                        let img = &k.images[i % k.images.len()];
                        let part = reqwest::multipart::Part::bytes(img.bytes.clone())
                            .file_name(format!("image{j}"))
                            .mime_str(img.mime)
                            .map_err(|e| ("transport".to_string(), e.to_string()))?;
                        form = form.part("image", part);
                    }
                    self.client.post(&k.url).multipart(form)
                }
            };
            let mut r = req
                .send()
                .await
                .map_err(|e| ("transport".to_string(), format!("{e:#}")))?;
            let status = r.status();
            if !status.is_success() {
                let body = r.text().await.unwrap_or_default();
                return Err((
                    status.as_u16().to_string(),
                    format!(
                        "status {status}: {}",
                        body.chars().take(500).collect::<String>()
                    ),
                ));
            }
            let queue = r
                .headers()
                .get("server-timing")
                .and_then(|v| v.to_str().ok())
                .and_then(server_timing_queue);
            let mut seen = String::new();
            while let Some(chunk) = r
                .chunk()
                .await
                .map_err(|e| ("transport".to_string(), format!("{e:#}")))?
            {
                if k.stream && ttft.is_none() {
                    seen.push_str(&String::from_utf8_lossy(&chunk));
                    if has_text(&seen) {
                        ttft = Some(due.elapsed().as_secs_f64() * 1e3);
                    }
                }
            }
            Ok(queue)
        }
        .await;
        let done = Instant::now();
        let latency_ms = done.duration_since(due).as_secs_f64() * 1e3;
        let (queue_ms, error_class, error) = match result {
            Ok(q) => (q, None, None),
            Err((class, e)) => (None, Some(class), Some(e)),
        };
        Outcome {
            latency_ms,
            ttft_ms: ttft,
            queue_ms,
            images: p.images.len(),
            kind: p.kind,
            error_class,
            error,
            done,
        }
    }

    async fn scrape(&self) -> Option<Scraped> {
        let r = self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.text().await.ok().map(|t| Scraped {
            histograms: scrape::parse(&t),
            worker: scrape::by_label(&t, "clipcap_worker_seconds_total", "phase"),
        })
    }
}

/// `queue;dur=12.5` in a `Server-Timing` header, in milliseconds.
fn server_timing_queue(header: &str) -> Option<f64> {
    header.split(',').find_map(|m| {
        let mut parts = m.trim().split(';');
        (parts.next()? == "queue").then_some(())?;
        parts.find_map(|p| p.trim().strip_prefix("dur=")?.parse().ok())
    })
}

/// Whether server-sent `chat.completion.chunk` events so far carry any caption text.
fn has_text(events: &str) -> bool {
    events.split("\n\n").any(|e| {
        e.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d.trim()).ok())
            .any(|v| {
                v["choices"].as_array().is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c["delta"]["content"]
                            .as_str()
                            .is_some_and(|s| !s.is_empty())
                    })
                })
            })
    })
}

/// What one read of `/metrics` gave.
struct Scraped {
    histograms: BTreeMap<String, Histogram>,
    /// The inference thread's seconds by phase.
    worker: BTreeMap<String, f64>,
}

/// The server's batches during a level, from its histograms.
#[derive(Debug, Default, serde::Serialize)]
pub struct ServerView {
    /// Decode steps run.
    pub steps: f64,
    pub decode_rows_mean: Option<f64>,
    pub decode_rows_p50: Option<f64>,
    pub decode_rows_p90: Option<f64>,
    pub decode_images_mean: Option<f64>,
    pub cohorts_mean: Option<f64>,
    pub encode_batch_mean: Option<f64>,
    /// Encoder forwards run.
    pub encodes: f64,
    /// Seconds the inference thread spent per phase (encode, join, step) during the level.
    pub worker_seconds: BTreeMap<String, f64>,
}

impl ServerView {
    fn between(before: &Scraped, after: &Scraped) -> Self {
        let d = |name: &str| {
            after
                .histograms
                .get(name)
                .map(|h| h.since(before.histograms.get(name)))
                .unwrap_or_default()
        };
        let worker_seconds = after
            .worker
            .iter()
            .map(|(phase, s)| (phase.clone(), s - before.worker.get(phase).unwrap_or(&0.0)))
            .collect();
        let rows = d("clipcap_decode_batch_rows");
        let enc = d("clipcap_encode_batch_size");
        ServerView {
            steps: rows.count,
            decode_rows_mean: rows.mean(),
            decode_rows_p50: rows.quantile(0.5),
            decode_rows_p90: rows.quantile(0.9),
            decode_images_mean: d("clipcap_decode_batch_images").mean(),
            cohorts_mean: d("clipcap_decode_cohorts").mean(),
            encode_batch_mean: enc.mean(),
            encodes: enc.count,
            worker_seconds,
        }
    }
}

/// Latency of one kind of request.
#[derive(Debug, serde::Serialize)]
pub struct KindLatency {
    pub kind: String,
    pub latency_ms: Dist,
}

/// One open-loop level on one target.
#[derive(Debug, serde::Serialize)]
pub struct OpenLevel {
    pub target: String,
    /// The fraction of the measured capacity (with `--load`).
    pub load: Option<f64>,
    pub offered_rps: f64,
    /// The measured arrivals' own rate (a finite Poisson draw differs from `offered_rps`).
    pub realized_rps: f64,
    /// Requests measured (after the warm-up), and how many of the schedule were never sent
    /// because the level's duration ran out.
    pub measured: usize,
    pub not_sent: usize,
    pub ok: usize,
    /// Failures by status ("transport" without one).
    pub errors: BTreeMap<String, usize>,
    pub first_error: Option<String>,
    /// From the first measured arrival to the last measured answer.
    pub seconds: f64,
    pub achieved_rps: f64,
    pub images_per_s: f64,
    pub latency_ms: Dist,
    pub queue_ms: Dist,
    pub ttft_ms: Dist,
    pub by_kind: Vec<KindLatency>,
    pub server: Option<ServerView>,
}

/// Sends `schedule` at its times (the first `warmup` unmeasured) and gathers the level.
pub async fn run_level(
    door: &Door,
    schedule: Vec<Planned>,
    warmup: usize,
    duration: Duration,
    load: Option<f64>,
    rate: f64,
) -> Result<OpenLevel> {
    let total = schedule.len();
    let warmup = warmup.min(total);
    let start = Instant::now() + Duration::from_millis(20);
    let measured_from = start + schedule.get(warmup).map_or(Duration::ZERO, |p| p.at);
    let before = {
        let door = door.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(measured_from.into()).await;
            door.scrape().await
        })
    };
    let arrivals: Vec<Duration> = schedule.iter().skip(warmup).map(|p| p.at).collect();
    let mut handles = Vec::with_capacity(total);
    let mut not_sent = 0;
    for (i, p) in schedule.into_iter().enumerate() {
        if p.at > duration {
            not_sent = total - i;
            break;
        }
        let due = start + p.at;
        tokio::time::sleep_until(due.into()).await;
        let door = door.clone();
        handles.push((
            i >= warmup,
            tokio::spawn(async move { door.send(&p, due).await }),
        ));
    }
    let mut measured = vec![];
    for (m, h) in handles {
        let o = h.await?;
        if m {
            measured.push(o);
        }
    }
    let after = door.scrape().await;
    let before = before.await?;
    let ok: Vec<&Outcome> = measured.iter().filter(|o| o.error.is_none()).collect();
    let end = measured
        .iter()
        .map(|o| o.done)
        .max()
        .unwrap_or(measured_from);
    let seconds = end.saturating_duration_since(measured_from).as_secs_f64();
    let mut errors = BTreeMap::new();
    for o in &measured {
        if let Some(c) = &o.error_class {
            *errors.entry(c.clone()).or_insert(0) += 1;
        }
    }
    let by_kind = door
        .mix
        .kinds
        .iter()
        .enumerate()
        .map(|(k, spec)| KindLatency {
            kind: spec.name.clone(),
            latency_ms: Dist::of(
                ok.iter()
                    .filter(|o| o.kind == k)
                    .map(|o| o.latency_ms)
                    .collect(),
            ),
        })
        .collect();
    // The rate this finite draw of the schedule really offered (a Poisson count varies).
    let sent_arrivals = &arrivals[..measured.len().min(arrivals.len())];
    let realized_rps = match (sent_arrivals.first(), sent_arrivals.last()) {
        (Some(a), Some(b)) if b > a => (sent_arrivals.len() - 1) as f64 / (*b - *a).as_secs_f64(),
        _ => rate,
    };
    Ok(OpenLevel {
        target: door.target.clone(),
        load,
        offered_rps: rate,
        realized_rps,
        measured: measured.len(),
        not_sent,
        ok: ok.len(),
        errors,
        first_error: measured.iter().find_map(|o| o.error.clone()),
        seconds,
        achieved_rps: ok.len() as f64 / seconds.max(1e-9),
        images_per_s: ok.iter().map(|o| o.images).sum::<usize>() as f64 / seconds.max(1e-9),
        latency_ms: Dist::of(ok.iter().map(|o| o.latency_ms).collect()),
        queue_ms: Dist::of(ok.iter().filter_map(|o| o.queue_ms).collect()),
        ttft_ms: Dist::of(ok.iter().filter_map(|o| o.ttft_ms).collect()),
        by_kind,
        server: match (before, after) {
            (Some(b), Some(a)) => Some(ServerView::between(&b, &a)),
            _ => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_time_is_read_from_server_timing() {
        let h = "preprocess;dur=1.20, queue;dur=35.50, encode;dur=4.00, total;dur=80.1";
        assert_eq!(server_timing_queue(h), Some(35.5));
        assert_eq!(server_timing_queue("total;dur=3"), None);
        assert_eq!(server_timing_queue("queue;desc=\"x\";dur=2"), Some(2.0));
    }

    #[test]
    fn first_text_is_found_in_server_sent_events() {
        let role = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
        assert!(!has_text(role));
        let text = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a red\"}}]}\n\n";
        assert!(has_text(&format!("{role}{text}")));
        // An event cut in the middle is not read until it is whole.
        assert!(!has_text(&format!("{role}{}", &text[..30])));
        assert!(!has_text("data: [DONE]\n\n"));
    }
}
