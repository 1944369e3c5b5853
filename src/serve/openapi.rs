//! `GET /openapi.json`, generated from the types the handlers parse and answer (utoipa), so
//! the document cannot drift from the code. The few types here exist only to describe request
//! bodies whose parsing is hand-rolled (multipart, raw image, JSON with base64 images).
use crate::options::{DecodeOptions, GenOptions, Strategy};
use crate::serve::routes::{
    CaptionResponse, ImageResult, ImageTimings, LoadModel, RequestTimings, ScoredCaption,
};
use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// Every error body: a message for people, a machine-readable type, and the field at fault.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
    /// malformed_request, unauthorized, forbidden, not_found, conflict, too_large,
    /// unsupported_media_type, invalid_option, invalid_image, too_many_requests, unavailable,
    /// deadline_exceeded or internal.
    #[serde(rename = "type")]
    pub kind: String,
    /// The option or field at fault (invalid_option only).
    pub field: Option<String>,
}

/// How a request is scheduled (`/caption` and `/v1/chat/completions` alike); the names are
/// `validation::SCHEDULING_FIELDS`.
#[derive(Serialize, ToSchema, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct SchedulingOptions {
    /// Lower starts first when requests wait (-100 to 100, default 0), as in vLLM and Triton.
    priority: Option<i64>,
    /// Seconds this request may take (also bounded by the server's request_timeout_ms); one
    /// that passes while queued leaves with 504, never computed.
    timeout: Option<f64>,
}

/// `POST /caption` as multipart/form-data: `image` (repeatable) and any option as a field.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct CaptionForm {
    /// An image file (JPEG, PNG, WebP, GIF, BMP or TIFF); repeat the field for several.
    #[schema(value_type = Vec<String>, format = Binary)]
    image: Vec<Vec<u8>>,
    /// Model name (default: the server's default model).
    model: Option<String>,
    #[schema(inline)]
    #[serde(flatten)]
    options: DecodeOptions,
    #[schema(inline)]
    #[serde(flatten)]
    scheduling: SchedulingOptions,
}

/// `POST /caption` as JSON: one base64 image or several (data: URLs accepted) and options.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct CaptionJson {
    /// One base64 image.
    #[schema(format = Byte)]
    image: Option<String>,
    /// Several base64 images.
    #[schema(value_type = Option<Vec<String>>, format = Byte)]
    images: Option<Vec<String>>,
    /// Model name (default: the server's default model).
    model: Option<String>,
    #[schema(inline)]
    #[serde(flatten)]
    options: DecodeOptions,
    #[schema(inline)]
    #[serde(flatten)]
    scheduling: SchedulingOptions,
}

/// A raw image body (`Content-Type: image/*` or `application/octet-stream`).
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub struct RawImage(Vec<u8>);

struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        c.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "clipcap",
        description = "ClipCap image captioning (CLIP prefix + GPT-2): beam search, greedy and sampling with continuous batching; training jobs for admins."
    ),
    paths(
        crate::serve::routes::caption,
        crate::serve::routes::health,
        crate::serve::routes::ready,
        crate::serve::routes::info,
        crate::serve::routes::metrics,
        crate::serve::routes::openapi_json,
        crate::serve::routes::load_model,
        crate::serve::routes::unload_model,
        crate::serve::routes::repository_status,
        crate::serve::routes::repository_scan,
        crate::serve::admin::start,
        crate::serve::admin::list,
        crate::serve::admin::show,
        crate::serve::admin::cancel,
        crate::serve::admin::resume,
        crate::serve::admin::svg,
        crate::serve::openai::chat_completions,
        crate::serve::openai::list_models,
        crate::serve::openai::get_model,
    ),
    components(schemas(
        DecodeOptions, GenOptions, Strategy, CaptionResponse, ImageResult, ImageTimings,
        RequestTimings, ScoredCaption, ErrorBody, LoadModel, CaptionForm, CaptionJson, RawImage,
        crate::serve::admin::TrainRequest, crate::serve::admin::TrainTarget, crate::train::spec::AmpMode,
        crate::model::mapper::MappingType,
        crate::serve::openai::ChatRequest, crate::serve::openai::ChatCompletion,
        crate::serve::openai::ChatChoice, crate::serve::openai::Usage,
        crate::serve::openai::ModelCard, crate::serve::openai::ModelList,
        crate::serve::repository::ModelStatus, crate::serve::repository::ScanReport,
    )),
    modifiers(&Security),
    tags(
        (name = "caption", description = "Captioning"),
        (name = "operations", description = "Health, readiness, metrics"),
        (name = "admin", description = "Model loading and training jobs (admin token)"),
        (name = "openai", description = "OpenAI-compatible chat completions and models (the API key as a Bearer token)"),
    )
)]
struct ApiDoc;

/// The OpenAPI document as JSON.
pub fn json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes")
}

/// The field names a request type takes, read from its schema (flattened, inlined parts
/// included): what handlers accept and what the document shows are the same list.
pub fn field_names<T: utoipa::PartialSchema>() -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        if let Some(p) = v["properties"].as_object() {
            out.extend(p.keys().cloned());
        }
        for part in v["allOf"].as_array().into_iter().flatten() {
            walk(part, out);
        }
    }
    let mut out = vec![];
    walk(
        &serde_json::to_value(T::schema()).unwrap_or_default(),
        &mut out,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_scheduling_fields_are_the_ones_requests_take() {
        let mut documented = field_names::<SchedulingOptions>();
        documented.sort();
        let mut taken: Vec<String> = crate::serve::validation::SCHEDULING_FIELDS
            .iter()
            .map(|s| s.to_string())
            .collect();
        taken.sort();
        assert_eq!(documented, taken);
    }
}
