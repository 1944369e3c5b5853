//! Connections: the accept loop and what a client may hold before its request is complete.
//!
//! `axum::serve` has no header-read or idle timeout and no connection cap, so a few slow or
//! idle clients could hold every slot and file descriptor. Here each connection is served by
//! hyper's HTTP/1 builder with a header-read timer (which also closes idle keep-alive
//! connections: the timer runs from the previous response until the next request's headers
//! are in), connections beyond `max_connections` get a JSON 503 and are closed, and
//! [`guard_request`] caps the headers and URI (JSON 431/414) and reads the body within a
//! deadline (JSON 408) before any handler or in-flight slot sees the request.
use crate::config::ServerConfig;
use crate::serve::error::ApiError;
use crate::serve::metrics::HttpMetrics;
use crate::serve::AppState;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Refusals answered at once; connections beyond are closed without an answer.
const MAX_REFUSING: usize = 32;

/// The longest request target (path and query) accepted; 414 beyond.
pub const MAX_URI_BYTES: usize = 8192;

/// What the accept loop enforces, from `[server]`.
#[derive(Clone, Debug)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub header_timeout: Option<Duration>,
    /// hyper's own cap on a request head (16 × `max_header_bytes`, at least 256 KiB): heads
    /// between `max_header_bytes` and this get the JSON 431 from [`guard_request`], larger
    /// ones hyper's bare 431.
    pub head_buffer: usize,
}

impl ConnLimits {
    pub fn from_config(s: &ServerConfig) -> Self {
        let mut max_connections = s.max_connections.max(1);
        // Leave descriptors for model files, logs and job records, so that /health still
        // answers when every connection slot is taken.
        if let Some(fds) = fd_soft_limit() {
            let room = fds.saturating_sub(64).max(1);
            if max_connections > room {
                tracing::warn!(
                    max_connections,
                    open_files_limit = fds,
                    "max_connections is above the open-files limit; using {room}"
                );
                max_connections = room;
            }
        }
        ConnLimits {
            max_connections,
            header_timeout: (s.header_timeout_ms > 0)
                .then(|| Duration::from_millis(s.header_timeout_ms)),
            head_buffer: (16 * s.max_header_bytes).max(256 * 1024),
        }
    }
}

/// The soft limit on open files (`ulimit -n`), from /proc on Linux.
fn fd_soft_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Accepts connections until `stop` resolves, then lets the open ones finish their requests
/// (idle keep-alive connections close at once) and returns when all have ended.
pub async fn serve_connections(
    listener: TcpListener,
    app: axum::Router,
    limits: ConnLimits,
    metrics: Arc<HttpMetrics>,
    stop: impl std::future::Future<Output = ()> + Send,
) {
    let graceful = GracefulShutdown::new();
    let open = Arc::new(AtomicUsize::new(0));
    // Refusals being written: each holds a descriptor for a moment, so in a flood only a
    // few are answered and the rest closed at once (the descriptors are what runs out).
    let refusing = Arc::new(AtomicUsize::new(0));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.head_buffer.max(8192))
        .max_header_size(limits.head_buffer);
    tokio::pin!(stop);
    loop {
        let (stream, _peer) = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: back off a
                    // moment instead of spinning, then keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        if open.load(Ordering::Acquire) >= limits.max_connections {
            metrics.refused_connections.inc();
            if refusing.load(Ordering::Acquire) < MAX_REFUSING {
                refusing.fetch_add(1, Ordering::AcqRel);
                let (refusing, limit) = (refusing.clone(), limits.max_connections);
                tokio::spawn(async move {
                    refuse(stream, limit).await;
                    refusing.fetch_sub(1, Ordering::AcqRel);
                });
            }
            continue;
        }
        open.fetch_add(1, Ordering::AcqRel);
        metrics.open_connections.inc();
        let slot = ConnSlot(open.clone(), metrics.clone());
        let conn =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

struct ConnSlot(Arc<AtomicUsize>, Arc<HttpMetrics>);
impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        self.1.open_connections.dec();
    }
}

/// Answers a connection over the limit with a JSON 503 and closes it. The request head is
/// read first (for at most 250 ms) so the client is writing nothing when the answer comes.
async fn refuse(mut stream: TcpStream, limit: usize) {
    let body = serde_json::json!({
        "error": format!("{limit} connections open; retry shortly"),
        "type": "unavailable",
    })
    .to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_millis(250), async {
        let mut buf = [0u8; 4096];
        let mut seen = Vec::new();
        while seen.len() < 16 * 1024 && !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_millis(250), async {
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Caps the request target and headers, then reads the whole body within
/// `body_timeout_ms` and `max_body_bytes`, so that handlers and in-flight slots only ever see
/// requests that have fully arrived.
pub async fn guard_request(State(st): State<AppState>, req: Request<Body>, next: Next) -> Response {
    let s = &st.cfg.server;
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().len())
        .unwrap_or(0);
    if target > MAX_URI_BYTES {
        return closing(ApiError::UriTooLong(format!(
            "request target of {target} bytes; at most {MAX_URI_BYTES}"
        )));
    }
    let head: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if head > s.max_header_bytes {
        return closing(ApiError::HeadersTooLarge(format!(
            "headers of {head} bytes; at most {}",
            s.max_header_bytes
        )));
    }
    let (parts, body) = req.into_parts();
    if axum::body::HttpBody::size_hint(&body).exact() == Some(0) {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let limit = s.max_body_bytes;
    let announced = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(len) = announced.filter(|&len| len > limit) {
        return closing(ApiError::TooLarge(format!(
            "body of {len} bytes; at most {limit}"
        )));
    }
    // Counted while the body arrives, also if the client leaves meanwhile.
    struct Reading(prometheus::IntGauge);
    impl Drop for Reading {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    st.http.reading_bodies.inc();
    let reading = Reading(st.http.reading_bodies.clone());
    let read = axum::body::to_bytes(body, limit);
    let bytes = if s.body_timeout_ms > 0 {
        tokio::time::timeout(Duration::from_millis(s.body_timeout_ms), read)
            .await
            .ok()
    } else {
        Some(read.await)
    };
    drop(reading);
    let bytes = match bytes {
        None => {
            return closing(ApiError::BodyTimeout(format!(
                "the request body did not arrive within {} ms",
                s.body_timeout_ms
            )))
        }
        Some(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            return closing(if too_large {
                ApiError::TooLarge(format!("body larger than {limit} bytes"))
            } else {
                ApiError::Malformed(format!("cannot read the body: {e}"))
            });
        }
        Some(Ok(b)) => b,
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// An error answer after which the connection closes (the client may still be sending).
fn closing(e: ApiError) -> Response {
    let mut resp = e.into_response();
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}
