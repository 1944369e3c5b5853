//! Inference metrics (queue, encoder and decoder batches, outcomes), registered into the
//! caller's Prometheus registry so one `/metrics` shows every layer.
use prometheus::{
    exponential_buckets, CounterVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

pub struct EngineMetrics {
    pub queue_duration: Histogram,
    pub encode_duration: Histogram,
    pub decode_duration: Histogram,
    pub encode_batch_size: Histogram,
    pub decode_batch_rows: Histogram,
    pub decode_batch_images: Histogram,
    /// Option groups per decode step (each costs its own kernels).
    pub decode_cohorts: Histogram,
    pub queue_depth: IntGauge,
    pub generated_tokens: IntCounter,
    pub images: IntCounterVec,
    pub model_info: IntGaugeVec,
    /// For autoscalers: requests waiting to start, requests being decoded.
    pub requests_waiting: IntGauge,
    pub requests_running: IntGauge,
    /// Per request: from queuing to the start of its encoding.
    pub request_queue_duration: Histogram,
    /// Streams: from the request's arrival to its first content.
    pub time_to_first_token: Histogram,
    /// Requests started, by priority.
    pub admitted: IntCounterVec,
    /// Where the inference thread's time goes, by phase: `encode` (CLIP forwards), `join`
    /// (prefix, prefill and first token of joining requests, cache appends), `step` (decode
    /// steps with their sweeps). On CUDA a phase also holds the wait for earlier queued work.
    pub worker_seconds: CounterVec,
}

/// A histogram of seconds, 0.5 ms to ~65 s.
pub fn seconds_histogram(name: &str, help: &str) -> Histogram {
    Histogram::with_opts(
        HistogramOpts::new(name, help).buckets(exponential_buckets(0.0005, 2.0, 18).unwrap()),
    )
    .unwrap()
}

fn sizes(name: &str, help: &str) -> Histogram {
    Histogram::with_opts(
        HistogramOpts::new(name, help).buckets(exponential_buckets(1.0, 2.0, 11).unwrap()),
    )
    .unwrap()
}

impl EngineMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> Self {
        let m = EngineMetrics {
            queue_duration: seconds_histogram(
                "clipcap_queue_duration_seconds",
                "Time images wait before encoding",
            ),
            encode_duration: seconds_histogram(
                "clipcap_encode_duration_seconds",
                "CLIP encoder forward per batch",
            ),
            decode_duration: seconds_histogram(
                "clipcap_decode_duration_seconds",
                "Decoding time per image",
            ),
            encode_batch_size: sizes("clipcap_encode_batch_size", "Images per encoder forward"),
            decode_batch_rows: sizes(
                "clipcap_decode_batch_rows",
                "GPT-2 rows (images x beams) per decode step",
            ),
            decode_batch_images: sizes("clipcap_decode_batch_images", "Images per decode step"),
            decode_cohorts: sizes(
                "clipcap_decode_cohorts",
                "Cohorts (groups of equal options, seeds aside) per decode step",
            ),
            queue_depth: IntGauge::new("clipcap_queue_depth", "Requests waiting for the worker")
                .unwrap(),
            generated_tokens: IntCounter::new(
                "clipcap_generated_tokens_total",
                "Tokens generated (all rows)",
            )
            .unwrap(),
            images: IntCounterVec::new(
                Opts::new(
                    "clipcap_images_total",
                    "Images captioned, by model and outcome",
                ),
                &["model", "outcome"],
            )
            .unwrap(),
            model_info: IntGaugeVec::new(
                Opts::new("clipcap_model_info", "Loaded models (value 1)"),
                &["name", "device", "dtype", "version"],
            )
            .unwrap(),
            requests_waiting: IntGauge::new(
                "clipcap_requests_waiting",
                "Requests queued and not started (scale on this)",
            )
            .unwrap(),
            requests_running: IntGauge::new(
                "clipcap_requests_running",
                "Requests being encoded or decoded",
            )
            .unwrap(),
            request_queue_duration: seconds_histogram(
                "clipcap_request_queue_duration_seconds",
                "Time a request waits before it starts",
            ),
            time_to_first_token: seconds_histogram(
                "clipcap_time_to_first_token_seconds",
                "Streams: time from arrival to the first content",
            ),
            admitted: IntCounterVec::new(
                Opts::new(
                    "clipcap_admitted_requests_total",
                    "Requests started by the scheduler, by priority",
                ),
                &["priority"],
            )
            .unwrap(),
            worker_seconds: CounterVec::new(
                Opts::new(
                    "clipcap_worker_seconds_total",
                    "Seconds the inference thread spent, by phase (encode, join, step)",
                ),
                &["phase"],
            )
            .unwrap(),
        };
        for h in [
            &m.queue_duration,
            &m.encode_duration,
            &m.decode_duration,
            &m.encode_batch_size,
            &m.decode_batch_rows,
            &m.decode_batch_images,
            &m.decode_cohorts,
            &m.request_queue_duration,
            &m.time_to_first_token,
        ] {
            registry.register(Box::new(h.clone())).unwrap();
        }
        registry.register(Box::new(m.queue_depth.clone())).unwrap();
        registry
            .register(Box::new(m.generated_tokens.clone()))
            .unwrap();
        registry.register(Box::new(m.images.clone())).unwrap();
        registry.register(Box::new(m.model_info.clone())).unwrap();
        registry
            .register(Box::new(m.worker_seconds.clone()))
            .unwrap();
        for g in [&m.requests_waiting, &m.requests_running] {
            registry.register(Box::new(g.clone())).unwrap();
        }
        registry.register(Box::new(m.admitted.clone())).unwrap();
        m
    }

    /// Counts `n` images of `model` that ended with `outcome` (ok, deadline, cancelled, error).
    pub fn count_images(&self, model: &str, outcome: &str, n: usize) {
        self.images
            .with_label_values(&[model, outcome])
            .inc_by(n as u64);
    }
}
