//! The Prometheus registry behind `GET /metrics` and the HTTP layer's own metrics; the
//! engine and the training jobs register theirs in the same registry. All names start with
//! `clipcap_`.
use prometheus::{
    exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

pub struct HttpMetrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub inflight: IntGauge,
    /// Requests whose body is still arriving (they hold a connection, no in-flight slot).
    pub reading_bodies: IntGauge,
    pub open_connections: IntGauge,
    /// Connections answered 503 because `max_connections` were open.
    pub refused_connections: IntCounter,
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
        let reading_bodies = IntGauge::new(
            "clipcap_reading_bodies",
            "Requests whose body is still arriving",
        )
        .unwrap();
        let open_connections =
            IntGauge::new("clipcap_open_connections", "Open client connections").unwrap();
        let refused_connections = IntCounter::new(
            "clipcap_refused_connections_total",
            "Connections refused (503) because max_connections were open",
        )
        .unwrap();
        registry.register(Box::new(inflight.clone())).unwrap();
        registry.register(Box::new(reading_bodies.clone())).unwrap();
        registry
            .register(Box::new(open_connections.clone()))
            .unwrap();
        registry
            .register(Box::new(refused_connections.clone()))
            .unwrap();
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
            reading_bodies,
            open_connections,
            refused_connections,
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
