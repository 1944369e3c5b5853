//! HTTP routes: /caption, health and readiness, info, metrics, OpenAPI, the browser page, and
//! the admin model routes.
use crate::engine::{CaptionOutput, ImageOutput};
use crate::options::DecodeOptions;
use crate::serve::error::ApiError;
use crate::serve::openapi::{CaptionForm, CaptionJson, ErrorBody, RawImage};
use crate::serve::validation::{self, RawOptions};
use crate::serve::AppState;
use axum::body::Body;
use axum::extract::{MatchedPath, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use utoipa::ToSchema;

const PAGE: &str = include_str!("page.html");

pub fn router(state: AppState) -> Router {
    let admin = Router::new()
        .route("/admin/models", post(load_model))
        .route("/admin/models/{name}", delete(unload_model))
        .route("/admin/repository", get(repository_status))
        .route("/admin/repository/scan", post(repository_scan))
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
        .route("/openapi.json", get(openapi_json))
        .merge(crate::serve::openai::routes(state.clone()))
        .merge(admin)
        .merge(crate::serve::admin::signed_routes())
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::middleware::from_fn_with_state(state.clone(), track))
        // The request guard (serve::conn) enforces max_body_bytes with a JSON 413 on every
        // route; axum's own 2 MB default would answer in plain text.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

/// Counts requests by route and status, times them, and enforces the in-flight limit (429).
async fn track(State(st): State<AppState>, req: Request<Body>, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let m = &st.http;
    let t0 = Instant::now();
    let limited = route == "/caption" || route == "/v1/chat/completions";
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
        self.0.http.inflight.dec();
    }
}

/// Compares secrets without an early exit (by hashing both to equal-length digests).
pub(crate) fn secret_eq(given: &str, expected: &str) -> bool {
    use sha2::{Digest, Sha256};
    let a = Sha256::digest(given.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The credentials of `Authorization: Bearer <token>` (the scheme is case-insensitive,
/// RFC 7235).
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// What a server without an admin token answers on admin routes.
pub(crate) fn admin_disabled() -> ApiError {
    ApiError::Forbidden(
        "admin routes are disabled: set CLIPCAP_ADMIN_TOKEN (or auth.admin_token)".into(),
    )
}

async fn require_admin(State(st): State<AppState>, req: Request<Body>, next: Next) -> Response {
    let token = &st.cfg.auth.admin_token;
    if token.is_empty() {
        return admin_disabled().into_response();
    }
    match bearer(req.headers()) {
        Some(t) if secret_eq(t, token) => next.run(req).await,
        _ => ApiError::Unauthorized("admin routes need Authorization: Bearer <admin token>".into())
            .into_response(),
    }
}

pub(crate) fn check_api_key(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
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

/// Captions one or more images.
#[utoipa::path(
    post,
    path = "/caption",
    tag = "caption",
    params(
        ("model" = Option<String>, Query, description = "Model name (default: the server's default model)"),
        DecodeOptions,
        crate::serve::openapi::SchedulingOptions,
    ),
    request_body(
        description = "The image(s): multipart/form-data (field `image`, repeatable; other fields are options), a raw image body, or JSON with base64 images. Options may also come as query parameters; body fields win.",
        content(
            (CaptionForm = "multipart/form-data"),
            (RawImage = "image/*"),
            (CaptionJson = "application/json"),
        )
    ),
    responses(
        (status = 200, description = "Captions for every image, in order", body = CaptionResponse),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "API key missing or wrong", body = ErrorBody),
        (status = 413, description = "Body, images per request or pixels over a limit", body = ErrorBody),
        (status = 415, description = "Unsupported content type or image format", body = ErrorBody),
        (status = 422, description = "Bad option (field named) or undecodable image", body = ErrorBody),
        (status = 429, description = "Too many requests in flight (Retry-After)", body = ErrorBody),
        (status = 503, description = "Queue full, no model, or shutting down (Retry-After)", body = ErrorBody),
        (status = 504, description = "The deadline passed", body = ErrorBody),
    ),
    security((), ("api_key" = []))
)]
pub(crate) async fn caption(
    State(st): State<AppState>,
    req: Request<Body>,
) -> Result<Response, ApiError> {
    let (t0, deadline) = begin(&st)?;
    let (parts, body) = req.into_parts();
    check_api_key(&st, &parts.headers)?;
    let mut raw = RawOptions::default();
    validation::parse_query(parts.uri.query(), &mut raw)?;
    // Already whole and within max_body_bytes: the request guard (serve::conn) read it.
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .map_err(|e| ApiError::Malformed(format!("cannot read the body: {e}")))?;
    let ct = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let images =
        validation::parse_body(ct, body, st.cfg.server.max_images_per_request, &mut raw).await?;
    let model = st.engine.resolve(raw.model.as_deref())?;
    let opts = raw.resolve(&model.generation)?;
    let sched = raw.scheduling()?;
    let n_images = images.len();
    let out = st
        .engine
        .caption(&model, images, opts.clone(), sched.params(t0, deadline))
        .await?;
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok(caption_response(out, n_images, total_ms, &opts))
}

/// A caption request's start, on either door: its arrival, the server's deadline for it
/// (`request_timeout_ms`), or 503 while the server drains.
pub(crate) fn begin(st: &AppState) -> Result<(Instant, Option<Instant>), ApiError> {
    let t0 = Instant::now();
    if st.draining.load(Ordering::Relaxed) {
        return Err(ApiError::Unavailable("the server is shutting down".into()));
    }
    let deadline = (st.cfg.server.request_timeout_ms > 0)
        .then(|| t0 + Duration::from_millis(st.cfg.server.request_timeout_ms));
    Ok((t0, deadline))
}

/// One caption and its score (mean log-probability per generated token).
#[derive(Serialize, ToSchema)]
pub struct ScoredCaption {
    pub text: String,
    pub score: f64,
}

/// Where one image's time went, in milliseconds.
#[derive(Serialize, ToSchema)]
pub struct ImageTimings {
    pub queue: f64,
    pub encode: f64,
    pub decode: f64,
}

#[derive(Serialize, ToSchema)]
pub struct ImageResult {
    pub index: usize,
    /// The best caption.
    pub caption: String,
    /// The `n` best captions, best first.
    pub captions: Vec<ScoredCaption>,
    pub timings_ms: ImageTimings,
    /// Rows (images × beams) in the decode batch when this image joined it.
    pub batch_rows: i64,
}

/// Where the request's time went, in milliseconds (also in the `Server-Timing` header).
#[derive(Serialize, ToSchema)]
pub struct RequestTimings {
    pub preprocess: f64,
    pub queue: f64,
    pub encode: f64,
    pub decode: f64,
    pub total: f64,
}

/// The answer of `POST /caption`.
#[derive(Serialize, ToSchema)]
pub struct CaptionResponse {
    /// The model that captioned, and its version (it increments on every swap).
    pub model: String,
    pub model_version: u64,
    pub images: usize,
    /// The options as applied (the model's defaults with the request's changes).
    pub options: crate::options::GenOptions,
    pub results: Vec<ImageResult>,
    pub timings_ms: RequestTimings,
}

fn caption_response(
    out: CaptionOutput,
    n: usize,
    total_ms: f64,
    opts: &crate::options::GenOptions,
) -> Response {
    let pre_ms = out.preprocess_ms;
    let max = |f: fn(&ImageOutput) -> f64| out.images.iter().map(f).fold(0.0, f64::max);
    let (queue, encode, decode) = (
        max(|i| i.queue_ms),
        max(|i| i.encode_ms),
        max(|i| i.decode_ms),
    );
    let results = out
        .images
        .iter()
        .enumerate()
        .map(|(index, img)| ImageResult {
            index,
            caption: img
                .captions
                .first()
                .map(|c| c.text.clone())
                .unwrap_or_default(),
            captions: img
                .captions
                .iter()
                .map(|c| ScoredCaption {
                    text: c.text.clone(),
                    score: c.score,
                })
                .collect(),
            timings_ms: ImageTimings {
                queue: img.queue_ms,
                encode: img.encode_ms,
                decode: img.decode_ms,
            },
            batch_rows: img.batch_rows,
        })
        .collect();
    let body = CaptionResponse {
        model: out.model.clone(),
        model_version: out.model_version,
        images: n,
        options: opts.clone(),
        results,
        timings_ms: RequestTimings {
            preprocess: pre_ms,
            queue,
            encode,
            decode,
            total: total_ms,
        },
    };
    let timing = format!(
        "preprocess;dur={pre_ms:.2}, queue;dur={queue:.2}, encode;dur={encode:.2}, decode;dur={decode:.2}, total;dur={total_ms:.2}"
    );
    let mut resp = Json(body).into_response();
    if let Ok(v) = HeaderValue::from_str(&timing) {
        resp.headers_mut().insert("server-timing", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("{}/{}", out.model, out.model_version)) {
        resp.headers_mut().insert("x-clipcap-model", v);
    }
    resp
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "`{\"status\": \"ok\"}`")))]
pub(crate) async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: a model is loaded, the worker answers, and the server is not draining.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses((status = 200, description = "Ready"), (status = 503, description = "Not ready (body says why)")))]
pub(crate) async fn ready(State(st): State<AppState>) -> Response {
    let r = st.engine.readiness();
    let draining = st.draining.load(Ordering::Relaxed);
    let ok = r.ready() && !draining;
    let body = json!({"ready": ok, "models": r.models, "loading": r.loading, "worker_alive": r.worker_alive,
        "worker_answering": r.worker_answering, "draining": draining, "device_error": r.device_error});
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Served models, limits and batching settings.
#[utoipa::path(get, path = "/info", tag = "operations", responses((status = 200, description = "Server information")))]
pub(crate) async fn info(
    State(st): State<AppState>,
    headers: HeaderMap,
) -> Json<serde_json::Value> {
    let c = &st.cfg;
    let mut models = serde_json::to_value(st.engine.models()).unwrap_or_default();
    // Where bundles live on disk is for those the server trusts: on a server with an API key
    // or an admin token, anonymous callers see names and shapes only.
    let protected = !c.auth.api_key.is_empty() || !c.auth.admin_token.is_empty();
    let trusted = (!c.auth.api_key.is_empty() && check_api_key(&st, &headers).is_ok())
        || (!c.auth.admin_token.is_empty()
            && bearer(&headers).is_some_and(|t| secret_eq(t, &c.auth.admin_token)));
    if protected && !trusted {
        for m in models.as_array_mut().into_iter().flatten() {
            if let Some(o) = m.as_object_mut() {
                o.remove("dir");
                // Provenance may name server paths (a trained bundle's dataset and base).
                if let Some(p) = o.get_mut("provenance").and_then(|p| p.as_object_mut()) {
                    p.retain(|k, _| matches!(k.as_str(), "source" | "trained_by" | "notice"));
                }
            }
        }
    }
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "default_model": st.engine.default_model(),
        "models": models,
        "cuda_available": crate::device::cuda_available(),
        "limits": {
            "max_body_bytes": c.server.max_body_bytes,
            "max_images_per_request": c.server.max_images_per_request,
            "max_pixels": c.inference.max_pixels,
            "request_timeout_ms": c.server.request_timeout_ms,
            "max_beam_size": crate::options::MAX_BEAM,
            "max_tokens": crate::options::MAX_TOKENS,
        },
        "batching": {
            "max_batch_images": c.inference.max_batch_images,
            "max_batch_delay_ms": c.inference.max_batch_delay_ms,
            "continuous_batching": c.inference.continuous_batching,
            "max_running_images": c.inference.running_images(),
            "max_running_rows": st.engine.max_running_rows(),
            "kv_cache_bytes": st.engine.kv_budget_bytes(),
        },
        "admin_enabled": !c.auth.admin_token.is_empty(),
        "api_key_required": !c.auth.api_key.is_empty(),
    }))
}

/// Prometheus metrics (`clipcap_*`).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain")))]
pub(crate) async fn metrics(State(st): State<AppState>) -> Response {
    st.engine
        .metrics()
        .queue_depth
        .set(st.engine.queued() as i64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.http.render(),
    )
        .into_response()
}

/// Loads (or swaps in) a bundle.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadModel {
    /// The name it is served under (letters, digits, '-', '_', '.').
    name: String,
    /// The bundle folder on the server.
    path: String,
    /// Make it the default model.
    #[serde(default)]
    default: bool,
}

/// Loads (or swaps in) a bundle without a restart: `{"name", "path", "default"?}`.
#[utoipa::path(post, path = "/admin/models", tag = "admin", request_body = LoadModel,
    responses((status = 200, description = "Loaded; the new version is served from now on"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 422, description = "The bundle cannot be loaded (reason given)", body = ErrorBody)),
    security(("admin_token" = [])))]
pub(crate) async fn load_model(
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
    let dir = std::path::PathBuf::from(&req.path);
    let ms = st.cfg.models.load_timeout_ms;
    let limit = (ms > 0).then(|| Duration::from_millis(ms));
    let info = st
        .engine
        .install(&req.name, &dir, req.default, limit)
        .await?;
    // Served again after a restart; a failed record write leaves it served for now.
    let recorded = match st.served.record(&req.name, &dir, req.default) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(model = %req.name, error = %format!("{e:#}"),
                "serving the model, but it will not come back after a restart");
            false
        }
    };
    Ok((
        StatusCode::OK,
        Json(json!({"loaded": info, "recorded": recorded})),
    )
        .into_response())
}

#[utoipa::path(delete, path = "/admin/models/{name}", tag = "admin",
    params(("name" = String, Path, description = "A served model")),
    responses((status = 204, description = "Unloaded (running requests finish)"), (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub(crate) async fn unload_model(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    st.engine.unload(&name).await?;
    if let Err(e) = st.served.forget(&name) {
        tracing::warn!(model = %name, error = %format!("{e:#}"),
            "unloaded, but the served-models record still names it");
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn repository(
    st: &AppState,
) -> Result<std::sync::Arc<crate::serve::repository::Repository>, ApiError> {
    st.repository.clone().ok_or_else(|| {
        ApiError::NotFound("this server serves no model repository (--model-repository)".into())
    })
}

/// The model repository's models and their states.
#[utoipa::path(get, path = "/admin/repository", tag = "admin",
    responses((status = 200, description = "The repository and each model's state", body = [crate::serve::repository::ModelStatus]),
        (status = 404, description = "No repository", body = ErrorBody)),
    security(("admin_token" = [])))]
pub(crate) async fn repository_status(State(st): State<AppState>) -> Result<Response, ApiError> {
    let repo = repository(&st)?;
    Ok(Json(json!({"repository": repo.dir(), "default_model": st.engine.default_model(), "models": repo.status()})).into_response())
}

/// Scans the model repository now (as the poller does every poll interval): for a pipeline
/// that has just published a bundle.
#[utoipa::path(post, path = "/admin/repository/scan", tag = "admin",
    responses((status = 200, description = "What the scan loaded, unloaded, found failed or incomplete", body = crate::serve::repository::ScanReport),
        (status = 404, description = "No repository", body = ErrorBody)),
    security(("admin_token" = [])))]
pub(crate) async fn repository_scan(State(st): State<AppState>) -> Result<Response, ApiError> {
    let repo = repository(&st)?;
    let report = tokio::task::spawn_blocking(move || repo.scan())
        .await
        .map_err(|e| ApiError::Internal(format!("repository scan: {e}")))?
        .map_err(|e| ApiError::Internal(format!("{e:#}")))?;
    Ok(Json(report).into_response())
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200, description = "OpenAPI 3.1")))]
pub(crate) async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::serve::openapi::json(),
    )
        .into_response()
}
