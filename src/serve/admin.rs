//! Admin routes for training jobs (bearer token required; see `routes::require_admin`).
//!
//! `POST /train` names a prepared dataset under the data root (never a path outside it), a
//! served model as base, an output bundle name and hyper-parameters.
use crate::model::mapper::MappingType;
use crate::serve::error::ApiError;
use crate::serve::AppState;
use crate::train::jobs::loss_svg;
use crate::train::trainer::TrainSpec;
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
        .route("/train/{id}/loss.svg", get(svg))
}

/// The body of `POST /train`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct TrainRequest {
    dataset: String,
    output: String,
    base: Option<String>,
    #[serde(default)]
    activate: bool,
    /// Start from the base model's mapper and GPT-2 weights (fine-tune) instead of a fresh mapper.
    #[serde(default)]
    init_from_base: bool,
    epochs: Option<usize>,
    batch_size: Option<usize>,
    lr: Option<f64>,
    warmup: Option<i64>,
    only_prefix: Option<bool>,
    mapping: Option<String>,
    prefix_length: Option<i64>,
    clip_length: Option<i64>,
    num_layers: Option<i64>,
    normalize_prefix: Option<bool>,
    seed: Option<u64>,
    val_split: Option<String>,
    grad_clip: Option<f64>,
    save_every: Option<usize>,
    eos: Option<bool>,
    dropout: Option<f64>,
    amp: Option<String>,
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
    let root = st.jobs.data_root();
    let root = std::fs::canonicalize(&root).map_err(|_| {
        ApiError::option(
            "dataset",
            format!("the data root {} does not exist", root.display()),
        )
    })?;
    let dir = std::fs::canonicalize(root.join(rel)).map_err(|_| {
        ApiError::option(
            "dataset",
            format!("no dataset {name:?} under the data root"),
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
            format!("{name:?} is not a prepared dataset (no meta.json; run clipcap prepare)"),
        ));
    }
    Ok(dir)
}

async fn start(State(st): State<AppState>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::Malformed(format!("invalid JSON: {e}")))?;
    // The path of the offending field, for type errors as well as unknown fields.
    let req: TrainRequest = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.inner().to_string();
        let field = if path == "." { field_of(&msg) } else { path };
        ApiError::option(field, msg)
    })?;
    let data = dataset_dir(&st, &req.dataset)?;
    check_name("output", &req.output)?;
    let base_model = st
        .shared
        .resolve(req.base.as_deref())
        .map_err(|e| match e {
            ApiError::InvalidOption { message, .. } => ApiError::option("base", message),
            other => other,
        })?;
    let mut spec = TrainSpec {
        data,
        out: st.jobs.bundles_dir().join(&req.output),
        ..Default::default()
    };
    if req.init_from_base {
        spec.init = Some(base_model.dir.clone());
    } else {
        spec.base = Some(base_model.dir.clone());
    }
    macro_rules! take {
        ($($f:ident),*) => { $( if let Some(v) = req.$f.clone() { spec.$f = v; } )* };
    }
    take!(
        epochs,
        batch_size,
        lr,
        warmup,
        only_prefix,
        prefix_length,
        clip_length,
        num_layers,
        normalize_prefix,
        seed,
        val_split,
        grad_clip,
        save_every,
        eos,
        dropout,
        amp
    );
    if let Some(m) = &req.mapping {
        spec.mapping = m
            .parse::<MappingType>()
            .map_err(|_| ApiError::option("mapping", "must be mlp or transformer"))?;
    }
    spec.name = Some(req.output.clone());
    spec.validate().map_err(|(f, m)| ApiError::option(f, m))?;
    let job = st
        .jobs
        .submit(req.dataset, req.output, base_model.name, req.activate, spec)
        .map_err(|e| ApiError::Internal(format!("{e:#}")))?;
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

async fn list(State(st): State<AppState>) -> Json<serde_json::Value> {
    let jobs: Vec<_> = st
        .jobs
        .list()
        .into_iter()
        .map(|j| {
            json!({"id": j.id, "state": j.state, "dataset": j.dataset, "output": j.output,
                   "epoch": j.epoch, "epochs": j.epochs, "step": j.step, "total_steps": j.total_steps,
                   "loss": j.loss, "status_url": format!("/train/{}", j.id)})
        })
        .collect();
    Json(json!({"jobs": jobs}))
}

async fn show(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let j = st
        .jobs
        .get(&id)
        .ok_or_else(|| ApiError::NotFound(format!("no training job {id:?}")))?;
    let mut v = serde_json::to_value(&j).map_err(|e| ApiError::Internal(e.to_string()))?;
    v["loss_svg_url"] = json!(format!("/train/{}/loss.svg", j.id));
    Ok(Json(v))
}

async fn cancel(State(st): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    match st.jobs.cancel(&id) {
        Ok(Some(j)) => Ok((
            StatusCode::OK,
            Json(json!({"id": j.id, "state": j.state, "cancel_requested": true})),
        )
            .into_response()),
        Ok(None) => Err(ApiError::NotFound(format!("no training job {id:?}"))),
        Err(e) => Err(ApiError::Conflict(e)),
    }
}

async fn resume(State(st): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    match st.jobs.resume(&id) {
        Ok(Some(j)) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({"id": j.id, "state": j.state})),
        )
            .into_response()),
        Ok(None) => Err(ApiError::NotFound(format!("no training job {id:?}"))),
        Err(e) => Err(ApiError::Conflict(e)),
    }
}

async fn svg(State(st): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let j = st
        .jobs
        .get(&id)
        .ok_or_else(|| ApiError::NotFound(format!("no training job {id:?}")))?;
    Ok(([(header::CONTENT_TYPE, "image/svg+xml")], loss_svg(&j)).into_response())
}
