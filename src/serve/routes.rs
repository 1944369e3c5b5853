//! HTTP routes: /caption, health and readiness, info, metrics, OpenAPI, the browser page, and
//! the admin model routes.
use crate::serve::batcher::{CaptionJob, Command, ImageOutput, JobOutput, ModelInfo};
use crate::serve::error::ApiError;
use crate::serve::validation::{self, RawOptions};
use crate::serve::AppState;
use axum::body::Body;
use axum::extract::{MatchedPath, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PAGE: &str = include_str!("page.html");
const OPENAPI: &str = include_str!("openapi.json");

pub fn router(state: AppState) -> Router {
    let admin = Router::new()
        .route("/admin/models", post(load_model))
        .route("/admin/models/{name}", delete(unload_model))
        .merge(crate::serve::admin::train_routes())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_admin,
        ));
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/caption", post(caption))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/info", get(info))
        .route("/metrics", get(metrics))
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .merge(admin)
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Counts requests by route and status, times them, and enforces the in-flight limit (429).
async fn track(State(st): State<AppState>, req: Request<Body>, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let m = &st.shared.metrics;
    let t0 = Instant::now();
    let limited = route == "/caption";
    let resp = if limited && m.inflight.get() as usize >= st.cfg.server.max_inflight_requests {
        ApiError::TooManyRequests(format!(
            "{} requests in flight; retry shortly",
            st.cfg.server.max_inflight_requests
        ))
        .into_response()
    } else {
        if limited {
            m.inflight.inc();
        }
        let _guard = limited.then(|| InflightGuard(st.clone()));
        next.run(req).await
    };
    m.requests
        .with_label_values(&[&route, resp.status().as_str()])
        .inc();
    m.request_duration
        .with_label_values(&[&route])
        .observe(t0.elapsed().as_secs_f64());
    resp
}

struct InflightGuard(AppState);
impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.shared.metrics.inflight.dec();
    }
}

/// Compares secrets without an early exit (by hashing both to equal-length digests).
fn secret_eq(given: &str, expected: &str) -> bool {
    use sha2::{Digest, Sha256};
    let a = Sha256::digest(given.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

async fn require_admin(State(st): State<AppState>, req: Request<Body>, next: Next) -> Response {
    let token = &st.cfg.auth.admin_token;
    if token.is_empty() {
        return ApiError::Forbidden(
            "admin routes are disabled: set CLIPCAP_ADMIN_TOKEN (or auth.admin_token)".into(),
        )
        .into_response();
    }
    match bearer(req.headers()) {
        Some(t) if secret_eq(t, token) => next.run(req).await,
        _ => ApiError::Unauthorized("admin routes need Authorization: Bearer <admin token>".into())
            .into_response(),
    }
}

fn check_api_key(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let key = &st.cfg.auth.api_key;
    if key.is_empty() {
        return Ok(());
    }
    let given = bearer(headers).or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
    match given {
        Some(g) if secret_eq(g, key) => Ok(()),
        _ => Err(ApiError::Unauthorized(
            "this server needs an API key: Authorization: Bearer <key> or x-api-key".into(),
        )),
    }
}

/// Marks the job cancelled when the handler is dropped (client gone) before it finished.
struct CancelOnDrop(Arc<AtomicBool>, bool);
impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.1 {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

async fn caption(State(st): State<AppState>, req: Request<Body>) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    let deadline = (st.cfg.server.request_timeout_ms > 0)
        .then(|| t0 + Duration::from_millis(st.cfg.server.request_timeout_ms));
    if st.draining.load(Ordering::Relaxed) {
        return Err(ApiError::Unavailable("the server is shutting down".into()));
    }
    let (parts, body) = req.into_parts();
    check_api_key(&st, &parts.headers)?;
    let mut raw = RawOptions::default();
    validation::parse_query(parts.uri.query(), &mut raw)?;
    let limit = st.cfg.server.max_body_bytes;
    if let Some(len) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > limit {
            return Err(ApiError::TooLarge(format!(
                "body of {len} bytes; at most {limit}"
            )));
        }
    }
    let body = axum::body::to_bytes(body, limit).await.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit")
        {
            ApiError::TooLarge(format!("body larger than {limit} bytes"))
        } else {
            ApiError::Malformed(format!("cannot read the body: {e}"))
        }
    })?;
    let ct = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let images =
        validation::parse_body(ct, body, st.cfg.server.max_images_per_request, &mut raw).await?;
    let model = st.shared.resolve(raw.model.as_deref())?;
    let opts = raw.resolve(&model.generation)?;

    // Decode + resize off the async runtime, a bounded number at a time.
    let pre_cfg = crate::pipeline::preprocess_config(&model.image, st.cfg.inference.max_pixels);
    let mut tasks = Vec::with_capacity(images.len());
    for bytes in images {
        let permit = st.preprocess_slots.clone().acquire_owned().await;
        let cfg = pre_cfg.clone();
        tasks.push(tokio::task::spawn_blocking(move || {
            let _p = permit;
            crate::preprocess::preprocess_bytes(&bytes, &cfg)
        }));
    }
    let mut pixels = Vec::with_capacity(tasks.len());
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await {
            Ok(Ok(p)) => pixels.push(p),
            Ok(Err(e)) => return Err(image_error(i, e)),
            Err(_) => {
                return Err(ApiError::InvalidImage(format!(
                    "image {i}: decoding failed"
                )))
            }
        }
    }
    let n_images = pixels.len();
    let pre_ms = t0.elapsed().as_secs_f64() * 1e3;

    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, rx) = tokio::sync::oneshot::channel();
    st.worker.submit(Command::Caption(CaptionJob {
        model: model.name.clone(),
        pixels,
        opts: opts.clone(),
        deadline,
        enqueued: Instant::now(),
        cancel: cancel.clone(),
        reply: tx,
    }))?;
    let mut guard = CancelOnDrop(cancel, false);
    let wait = async {
        rx.await
            .unwrap_or_else(|_| Err(ApiError::Unavailable("the inference worker stopped".into())))
    };
    let out = match deadline {
        Some(d) => match tokio::time::timeout_at(d.into(), wait).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::DeadlineExceeded(format!(
                "no captions within the {} ms deadline",
                st.cfg.server.request_timeout_ms
            ))),
        },
        None => wait.await,
    };
    // On success the job is done; otherwise the guard tells the worker to drop its rows.
    guard.1 = out.is_ok();
    let out = out?;
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok(caption_response(out, n_images, pre_ms, total_ms, &opts))
}

fn image_error(i: usize, e: crate::preprocess::ImageError) -> ApiError {
    use crate::preprocess::ImageError as E;
    match e {
        E::TooLarge { .. } => ApiError::TooLarge(format!("image {i}: {e}")),
        E::UnsupportedFormat => ApiError::UnsupportedMedia(format!("image {i}: {e}")),
        other => ApiError::InvalidImage(format!("image {i}: {other}")),
    }
}

fn caption_response(
    out: JobOutput,
    n: usize,
    pre_ms: f64,
    total_ms: f64,
    opts: &crate::generate::GenOptions,
) -> Response {
    let max = |f: fn(&ImageOutput) -> f64| out.images.iter().map(f).fold(0.0, f64::max);
    let (queue, encode, decode) = (
        max(|i| i.queue_ms),
        max(|i| i.encode_ms),
        max(|i| i.decode_ms),
    );
    let results: Vec<_> = out
        .images
        .iter()
        .enumerate()
        .map(|(i, img)| {
            json!({
                "index": i,
                "caption": img.captions.first().map(|c| c.text.clone()).unwrap_or_default(),
                "captions": img.captions.iter().map(|c| json!({"text": c.text, "score": c.score})).collect::<Vec<_>>(),
                "timings_ms": {"queue": img.queue_ms, "encode": img.encode_ms, "decode": img.decode_ms},
                "batch_rows": img.batch_rows,
            })
        })
        .collect();
    let body = json!({
        "model": out.model,
        "images": n,
        "options": opts,
        "results": results,
        "timings_ms": {"preprocess": pre_ms, "queue": queue, "encode": encode, "decode": decode, "total": total_ms},
    });
    let timing = format!(
        "preprocess;dur={pre_ms:.2}, queue;dur={queue:.2}, encode;dur={encode:.2}, decode;dur={decode:.2}, total;dur={total_ms:.2}"
    );
    let mut resp = Json(body).into_response();
    if let Ok(v) = HeaderValue::from_str(&timing) {
        resp.headers_mut().insert("server-timing", v);
    }
    resp
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn ready(State(st): State<AppState>) -> Response {
    let models = st.shared.models.read().unwrap().len();
    let answering = st.shared.worker_answering(Duration::from_secs(5));
    let draining = st.draining.load(Ordering::Relaxed);
    let ok = models > 0 && answering && !draining;
    let body =
        json!({"ready": ok, "models": models, "worker_answering": answering, "draining": draining});
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn info(State(st): State<AppState>) -> Json<serde_json::Value> {
    let mut models: Vec<ModelInfo> = st.shared.models.read().unwrap().values().cloned().collect();
    models.sort_by(|a, b| a.name.cmp(&b.name));
    let c = &st.cfg;
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "default_model": *st.shared.default_model.read().unwrap(),
        "models": models,
        "cuda_available": tch::Cuda::is_available(),
        "limits": {
            "max_body_bytes": c.server.max_body_bytes,
            "max_images_per_request": c.server.max_images_per_request,
            "max_pixels": c.inference.max_pixels,
            "request_timeout_ms": c.server.request_timeout_ms,
            "max_beam_size": crate::generate::MAX_BEAM,
            "max_tokens": crate::generate::MAX_TOKENS,
        },
        "batching": {
            "max_batch_images": c.inference.max_batch_images,
            "max_batch_delay_ms": c.inference.max_batch_delay_ms,
            "continuous_batching": c.inference.continuous_batching,
            "max_running_images": c.inference.max_running_images,
        },
        "admin_enabled": !c.auth.admin_token.is_empty(),
        "api_key_required": !c.auth.api_key.is_empty(),
    }))
}

async fn metrics(State(st): State<AppState>) -> Response {
    st.shared.metrics.queue_depth.set(st.worker.queued() as i64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.shared.metrics.render(),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadModel {
    name: String,
    path: String,
    #[serde(default)]
    default: bool,
}

/// Loads (or swaps in) a bundle without a restart: `{"name", "path", "default"?}`.
async fn load_model(
    State(st): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: LoadModel = serde_json::from_slice(&body).map_err(|e| {
        ApiError::Malformed(format!(
            "expected {{\"name\", \"path\", \"default\"?}}: {e}"
        ))
    })?;
    if req.name.is_empty()
        || !req
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ApiError::option(
            "name",
            "must be non-empty letters, digits, '-', '_' or '.'",
        ));
    }
    let info = st
        .install_bundle(&req.name, std::path::Path::new(&req.path), req.default)
        .await?;
    Ok((StatusCode::OK, Json(json!({"loaded": info}))).into_response())
}

async fn unload_model(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    st.worker.submit(Command::Unload { name, reply: tx })?;
    match rx.await {
        Ok(Ok(())) => Ok(StatusCode::NO_CONTENT.into_response()),
        Ok(Err(e)) => Err(ApiError::NotFound(e)),
        Err(_) => Err(ApiError::Unavailable("the inference worker stopped".into())),
    }
}
