//! Prometheus metrics, all prefixed `clipcap_`.
use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub queue_duration: Histogram,
    pub encode_duration: Histogram,
    pub decode_duration: Histogram,
    pub encode_batch_size: Histogram,
    pub decode_batch_rows: Histogram,
    pub decode_batch_images: Histogram,
    pub queue_depth: IntGauge,
    pub generated_tokens: IntCounter,
    pub inflight: IntGauge,
    pub images: IntCounterVec,
    pub model_info: IntGaugeVec,
    pub train_jobs: IntGaugeVec,
    pub train_step: IntGaugeVec,
    pub train_loss: prometheus::GaugeVec,
    pub train_samples_per_second: prometheus::GaugeVec,
}

fn secs(name: &str, help: &str) -> Histogram {
    Histogram::with_opts(
        HistogramOpts::new(name, help).buckets(exponential_buckets(0.0005, 2.0, 18).unwrap()),
    )
    .unwrap()
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "clipcap_requests_total",
                "HTTP requests by route and status",
            ),
            &["route", "status"],
        )
        .unwrap();
        let request_duration = HistogramVec::new(
            HistogramOpts::new("clipcap_request_duration_seconds", "HTTP request duration")
                .buckets(exponential_buckets(0.0005, 2.0, 18).unwrap()),
            &["route"],
        )
        .unwrap();
        let sizes = |name: &str, help: &str| {
            Histogram::with_opts(
                HistogramOpts::new(name, help).buckets(exponential_buckets(1.0, 2.0, 11).unwrap()),
            )
            .unwrap()
        };
        let m = Metrics {
            requests,
            request_duration,
            queue_duration: secs(
                "clipcap_queue_duration_seconds",
                "Time images wait before encoding",
            ),
            encode_duration: secs(
                "clipcap_encode_duration_seconds",
                "CLIP encoder forward per batch",
            ),
            decode_duration: secs("clipcap_decode_duration_seconds", "Decoding time per image"),
            encode_batch_size: sizes("clipcap_encode_batch_size", "Images per encoder forward"),
            decode_batch_rows: sizes(
                "clipcap_decode_batch_rows",
                "GPT-2 rows (images x beams) per decode step",
            ),
            decode_batch_images: sizes("clipcap_decode_batch_images", "Images per decode step"),
            queue_depth: IntGauge::new("clipcap_queue_depth", "Requests waiting for the worker")
                .unwrap(),
            generated_tokens: IntCounter::new(
                "clipcap_generated_tokens_total",
                "Tokens generated (all rows)",
            )
            .unwrap(),
            inflight: IntGauge::new("clipcap_inflight_requests", "Requests being handled").unwrap(),
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
            train_jobs: IntGaugeVec::new(
                Opts::new("clipcap_train_jobs", "Training jobs by state"),
                &["state"],
            )
            .unwrap(),
            train_step: IntGaugeVec::new(
                Opts::new(
                    "clipcap_train_step",
                    "Current optimizer step of a training job",
                ),
                &["job"],
            )
            .unwrap(),
            train_loss: prometheus::GaugeVec::new(
                Opts::new("clipcap_train_loss", "Latest training loss of a job"),
                &["job"],
            )
            .unwrap(),
            train_samples_per_second: prometheus::GaugeVec::new(
                Opts::new(
                    "clipcap_train_samples_per_second",
                    "Training throughput of a job",
                ),
                &["job"],
            )
            .unwrap(),
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(m.requests.clone())).unwrap();
        r.register(Box::new(m.request_duration.clone())).unwrap();
        for h in [
            &m.queue_duration,
            &m.encode_duration,
            &m.decode_duration,
            &m.encode_batch_size,
            &m.decode_batch_rows,
            &m.decode_batch_images,
        ] {
            r.register(Box::new(h.clone())).unwrap();
        }
        r.register(Box::new(m.queue_depth.clone())).unwrap();
        r.register(Box::new(m.generated_tokens.clone())).unwrap();
        r.register(Box::new(m.inflight.clone())).unwrap();
        r.register(Box::new(m.images.clone())).unwrap();
        r.register(Box::new(m.model_info.clone())).unwrap();
        r.register(Box::new(m.train_jobs.clone())).unwrap();
        r.register(Box::new(m.train_step.clone())).unwrap();
        r.register(Box::new(m.train_loss.clone())).unwrap();
        r.register(Box::new(m.train_samples_per_second.clone()))
            .unwrap();
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::new(
                std::process::id() as i32,
                "clipcap",
            );
            r.register(Box::new(pc)).unwrap();
        }
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = vec![];
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("metrics encode");
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
