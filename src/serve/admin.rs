//! Admin routes for training jobs (bearer token required; see `routes::require_admin`).
//!
//! `POST /train` names a prepared dataset under the data root (never a path outside it), a
//! served model as base, an output bundle name and hyper-parameters.
use crate::serve::error::ApiError;
use crate::serve::openapi::ErrorBody;
use crate::serve::AppState;
use crate::train::jobs::loss_svg;
use crate::train::spec::{TrainParams, TrainSpec};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

pub fn train_routes() -> Router<AppState> {
    Router::new()
        .route("/train", post(start).get(list))
        .route("/train/{id}", get(show).delete(cancel))
        .route("/train/{id}/resume", post(resume))
}

/// Routes that take the admin token or a short-lived signed link (an `<img>` cannot send
/// an Authorization header).
pub fn signed_routes() -> Router<AppState> {
    Router::new().route("/train/{id}/loss.svg", get(svg))
}

/// How long a signed link from `GET /train` or `GET /train/{id}` stays valid.
const SIGNED_LINK_SECS: u64 = 600;

/// HMAC-SHA256 of what a link grants, keyed with the admin token.
fn signature(token: &str, id: &str, expires: u64) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(token.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(format!("loss.svg\n{id}\n{expires}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// `/train/{id}/loss.svg`, signed for the next ten minutes.
fn signed_svg_url(st: &AppState, id: &str) -> String {
    let expires = crate::train::jobs::now() + SIGNED_LINK_SECS;
    let sig = signature(&st.cfg.auth.admin_token, id, expires);
    format!("/train/{id}/loss.svg?expires={expires}&sig={sig}")
}

#[derive(Deserialize, Default)]
struct SignedQuery {
    expires: Option<u64>,
    sig: Option<String>,
}

/// What a `POST /train` trains on and where its bundle goes: names, never paths.
#[derive(Deserialize, Debug, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainTarget {
    /// A prepared dataset: a folder under the server's data root (`clipcap prepare`'s output).
    dataset: String,
    /// The trained bundle's name: written under the bundles folder, served under this name
    /// with `activate`.
    output: String,
    /// The served model whose encoder, tokenizer and GPT-2 the run starts from (default: the
    /// default model).
    base: Option<String>,
    /// Serve the trained bundle as `output` when the job succeeds.
    #[serde(default)]
    activate: bool,
    /// Start from the base model's mapper and GPT-2 weights (fine-tune) instead of a fresh mapper.
    #[serde(default)]
    init_from_base: bool,
    /// Replace an existing bundle named `output` (refused with 409 otherwise).
    #[serde(default)]
    overwrite: bool,
}

/// The body of `POST /train`: the target and the hyper-parameters (the original's defaults),
/// side by side in one object.
#[derive(Deserialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct TrainRequest {
    #[serde(flatten)]
    #[schema(inline)]
    target: TrainTarget,
    #[serde(flatten)]
    #[schema(inline)]
    params: TrainParams,
}

/// A part of a JSON body as type `T`, a bad field named by its path.
fn parse_part<T: serde::de::DeserializeOwned>(
    fields: serde_json::Map<String, serde_json::Value>,
) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(serde_json::Value::Object(fields)).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.inner().to_string();
        let field = if path == "." { field_of(&msg) } else { path };
        ApiError::option(field, msg)
    })
}

/// The job manager (present whenever admin routes are enabled).
fn jobs(st: &AppState) -> Result<&std::sync::Arc<crate::train::jobs::JobManager>, ApiError> {
    st.jobs.as_ref().ok_or_else(|| {
        ApiError::Forbidden(if st.cfg.server.role == crate::config::Role::Serve {
            "training is disabled on this replica (role = \"serve\"); send it to the trainer".into()
        } else {
            "training is disabled on this server".into()
        })
    })
}

/// A name of letters, digits, '-', '_' and '.', not starting with '.'.
fn check_name(field: &str, v: &str) -> Result<(), ApiError> {
    if v.is_empty()
        || v.len() > 128
        || v.starts_with('.')
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ApiError::option(
            field,
            "must be a plain name (letters, digits, '-', '_', '.'; not starting with '.')",
        ));
    }
    Ok(())
}

/// Resolves a dataset under the data root, refusing `..`, absolute paths and symlinks that
/// lead outside it.
fn dataset_dir(st: &AppState, name: &str) -> Result<std::path::PathBuf, ApiError> {
    let rel = std::path::Path::new(name);
    if name.is_empty()
        || rel.is_absolute()
        || rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(ApiError::option(
            "dataset",
            "must be a relative path inside the data root, without '..'",
        ));
    }
    let root = std::path::PathBuf::from(&st.cfg.training.data_root);
    let root = std::fs::canonicalize(&root).map_err(|_| {
        ApiError::option(
            "dataset",
            format!("the data root {} does not exist", root.display()),
        )
    })?;
    let dir = std::fs::canonicalize(root.join(rel)).map_err(|_| {
        ApiError::option(
            "dataset",
            format!(
                "no dataset {:?} under the data root",
                crate::serve::validation::echo(name)
            ),
        )
    })?;
    if !dir.starts_with(&root) {
        return Err(ApiError::option(
            "dataset",
            "resolves outside the data root",
        ));
    }
    if !dir.join(crate::train::data::META).exists() {
        return Err(ApiError::option(
            "dataset",
            format!(
                "{:?} is not a prepared dataset (no meta.json; run clipcap prepare)",
                crate::serve::validation::echo(name)
            ),
        ));
    }
    Ok(dir)
}

/// Starts a training job on a prepared dataset under the data root.
#[utoipa::path(post, path = "/train", tag = "admin", request_body = TrainRequest,
    responses((status = 202, description = "Queued: `{id, state, status_url}`; Location names the job"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, description = "The output bundle exists (without `overwrite`) or a job is writing it", body = ErrorBody),
        (status = 422, description = "A bad field (named)", body = ErrorBody),
        (status = 507, description = "The job record cannot be written (disk full)", body = ErrorBody)),
    security(("admin_token" = [])))]
pub(crate) async fn start(
    State(st): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    // A replica that does not train says so before it reads the job.
    let manager = jobs(&st)?;
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::Malformed(format!("invalid JSON: {e}")))?;
    let Some(fields) = value.as_object() else {
        return Err(ApiError::Malformed("the body must be a JSON object".into()));
    };
    let allowed = crate::serve::openapi::field_names::<TrainRequest>();
    if let Some(k) = fields.keys().find(|k| !allowed.contains(k)) {
        return Err(ApiError::option(
            crate::serve::validation::echo(k),
            format!("unknown field; allowed: {}", allowed.join(", ")),
        ));
    }
    let target_names = crate::serve::openapi::field_names::<TrainTarget>();
    let (target, params): (serde_json::Map<_, _>, serde_json::Map<_, _>) = fields
        .clone()
        .into_iter()
        .partition(|(k, _)| target_names.contains(k));
    let req: TrainTarget = parse_part(target)?;
    let params: TrainParams = parse_part(params)?;
    let data = dataset_dir(&st, &req.dataset)?;
    check_name("output", &req.output)?;
    let base_model =
        st.engine
            .resolve(req.base.as_deref())
            .map_err(|e| match ApiError::from(e) {
                ApiError::InvalidOption { message, .. } => ApiError::option("base", message),
                other => other,
            })?;
    let mut spec = TrainSpec {
        data,
        out: std::path::PathBuf::from(&st.cfg.training.bundles_dir).join(&req.output),
        params,
        ..Default::default()
    };
    if req.init_from_base {
        spec.init = Some(base_model.dir.clone());
    } else {
        spec.base = Some(base_model.dir.clone());
    }
    spec.name = Some(req.output.clone());
    spec.validate().map_err(|(f, m)| ApiError::option(f, m))?;
    // A finished bundle is replaced only when asked; one being written never twice at once.
    let job = manager.submit(
        req.dataset,
        req.output,
        base_model.name,
        req.activate,
        spec,
        req.overwrite,
    )?;
    let url = format!("/train/{}", job.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, url.clone())],
        Json(json!({"id": job.id, "state": job.state, "status_url": url})),
    )
        .into_response())
}

fn field_of(msg: &str) -> String {
    // "unknown field `foo`, expected ..." / "invalid type: ..., expected ... for field `x`"
    msg.split('`').nth(1).unwrap_or("body").to_string()
}

/// Every training job.
#[utoipa::path(get, path = "/train", tag = "admin", responses((status = 200, description = "`{jobs: [...]}`")),
    security(("admin_token" = [])))]
pub(crate) async fn list(State(st): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let jobs: Vec<_> = jobs(&st)?
        .list()
        .into_iter()
        .map(|j| {
            json!({"id": j.id, "state": j.state, "dataset": j.dataset, "output": j.output,
                   "epoch": j.epoch, "epochs": j.epochs, "step": j.step, "total_steps": j.total_steps,
                   "loss": j.loss, "status_url": format!("/train/{}", j.id),
                   "loss_svg_url": signed_svg_url(&st, &j.id)})
        })
        .collect();
    Ok(Json(json!({"jobs": jobs})))
}

/// One job: state, progress, loss history.
#[utoipa::path(get, path = "/train/{id}", tag = "admin", params(("id" = String, Path)),
    responses((status = 200, description = "The job record"), (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub(crate) async fn show(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let j = jobs(&st)?
        .get(&id)
        .ok_or_else(|| ApiError::NotFound(format!("no training job {id:?}")))?;
    let mut v = serde_json::to_value(&j).map_err(|e| ApiError::Internal(e.to_string()))?;
    v["loss_svg_url"] = json!(signed_svg_url(&st, &j.id));
    Ok(Json(v))
}

/// Cancels a queued or running job (a running one stops at its next step, checkpoint kept).
#[utoipa::path(delete, path = "/train/{id}", tag = "admin", params(("id" = String, Path)),
    responses((status = 200, description = "Cancel requested"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("admin_token" = [])))]
pub(crate) async fn cancel(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let j = jobs(&st)?.cancel(&id)?;
    Ok((
        StatusCode::OK,
        Json(json!({"id": j.id, "state": j.state, "cancel_requested": true})),
    )
        .into_response())
}

/// Re-queues an interrupted, cancelled or failed job; it continues from its checkpoint.
#[utoipa::path(post, path = "/train/{id}/resume", tag = "admin", params(("id" = String, Path)),
    responses((status = 202, description = "Queued"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 507, body = ErrorBody)),
    security(("admin_token" = [])))]
pub(crate) async fn resume(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let j = jobs(&st)?.resume(&id)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"id": j.id, "state": j.state})),
    )
        .into_response())
}

/// The loss curve as SVG: with the admin token, or through the signed link (`loss_svg_url`,
/// valid ten minutes) that `GET /train` and `GET /train/{id}` give.
#[utoipa::path(get, path = "/train/{id}/loss.svg", tag = "admin",
    params(("id" = String, Path), ("expires" = Option<u64>, Query, description = "Signed link: expiry (Unix seconds)"),
        ("sig" = Option<String>, Query, description = "Signed link: signature")),
    responses((status = 200, description = "SVG", content_type = "image/svg+xml"),
        (status = 401, description = "Neither the token nor a valid, unexpired signature", body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("admin_token" = []), ()))]
pub(crate) async fn svg(
    State(st): State<AppState>,
    Path(id): Path<String>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    use crate::serve::routes::{bearer, secret_eq};
    let token = &st.cfg.auth.admin_token;
    if token.is_empty() {
        return Err(crate::serve::routes::admin_disabled());
    }
    let by_token = bearer(&headers).is_some_and(|t| secret_eq(t, token));
    let q: SignedQuery = serde_urlencoded::from_str(uri.query().unwrap_or("")).unwrap_or_default();
    let by_link = match (q.expires, q.sig.as_deref()) {
        (Some(expires), Some(sig)) => {
            expires >= crate::train::jobs::now() && secret_eq(sig, &signature(token, &id, expires))
        }
        _ => false,
    };
    if !by_token && !by_link {
        return Err(ApiError::Unauthorized(
            "needs Authorization: Bearer <admin token>, or a signed link from GET /train (valid ten minutes)".into(),
        ));
    }
    let j = jobs(&st)?
        .get(&id)
        .ok_or_else(|| ApiError::NotFound(format!("no training job {id:?}")))?;
    Ok(([(header::CONTENT_TYPE, "image/svg+xml")], loss_svg(&j)).into_response())
}
