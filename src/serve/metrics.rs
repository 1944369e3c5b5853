//! The Prometheus registry behind `GET /metrics` and the HTTP layer's own metrics; the
//! engine and the training jobs register theirs in the same registry. All names start with
//! `clipcap_`.
use prometheus::{
    exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

pub struct HttpMetrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub inflight: IntGauge,
}

impl HttpMetrics {
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
        let inflight =
            IntGauge::new("clipcap_inflight_requests", "Requests being handled").unwrap();
        registry.register(Box::new(requests.clone())).unwrap();
        registry
            .register(Box::new(request_duration.clone()))
            .unwrap();
        registry.register(Box::new(inflight.clone())).unwrap();
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::new(
                std::process::id() as i32,
                "clipcap",
            );
            registry.register(Box::new(pc)).unwrap();
        }
        HttpMetrics {
            registry,
            requests,
            request_duration,
            inflight,
        }
    }

    /// The Prometheus text exposition of every registered metric.
    pub fn render(&self) -> String {
        let mut buf = vec![];
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("metrics encode");
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for HttpMetrics {
    fn default() -> Self {
        Self::new()
    }
}
