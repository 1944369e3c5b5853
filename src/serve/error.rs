//! Every error the API returns, mapped to an HTTP status and a JSON body in one place.
use crate::engine::EngineError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request cannot be parsed (bad JSON, multipart, base64, no image).
    #[error("{0}")]
    Malformed(String),
    /// 400 with the field at fault: an unknown or unsupported parameter, or a request whose
    /// structure is wrong (the OpenAI-compatible door, where OpenAI answers 400).
    #[error("{field}: {message}")]
    InvalidRequest { field: String, message: String },
    /// 401: missing or wrong credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// 404: no such route or resource.
    #[error("{0}")]
    NotFound(String),
    /// 404: the OpenAI-compatible routes' unknown model (`/caption` answers 422 for it).
    #[error("{0}")]
    ModelNotFound(String),
    /// 405.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 409: the resource is in a state that forbids this (e.g. resuming a finished job).
    #[error("{0}")]
    Conflict(String),
    /// 413: body, image count or pixel count over a limit.
    #[error("{0}")]
    TooLarge(String),
    /// 415: a content type we do not take.
    #[error("{0}")]
    UnsupportedMedia(String),
    /// 422: a well-formed request with a bad option (field named) or an undecodable image.
    #[error("{field}: {message}")]
    InvalidOption { field: String, message: String },
    #[error("{0}")]
    InvalidImage(String),
    /// 429: too many requests in flight.
    #[error("{0}")]
    TooManyRequests(String),
    /// 503: queue full, shutting down, or no model loaded.
    #[error("{0}")]
    Unavailable(String),
    /// 504: the request's deadline passed.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// 403: admin routes are disabled (no token configured).
    #[error("{0}")]
    Forbidden(String),
    /// 408: the body did not arrive in time.
    #[error("{0}")]
    BodyTimeout(String),
    /// 414: the request target is too long.
    #[error("{0}")]
    UriTooLong(String),
    /// 431: the headers are too large.
    #[error("{0}")]
    HeadersTooLarge(String),
    /// 507: the server cannot write what the request needs (disk full).
    #[error("{0}")]
    InsufficientStorage(String),
    /// 500: a bug or an inference failure; logged with details.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Malformed(_) | ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) | ApiError::ModelNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMedia(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::InvalidOption { .. } | ApiError::InvalidImage(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ApiError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Machine-readable error type.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::Malformed(_) => "malformed_request",
            ApiError::InvalidRequest { .. } => "invalid_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::ModelNotFound(_) => "model_not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::TooLarge(_) => "too_large",
            ApiError::UnsupportedMedia(_) => "unsupported_media_type",
            ApiError::InvalidOption { .. } => "invalid_option",
            ApiError::InvalidImage(_) => "invalid_image",
            ApiError::TooManyRequests(_) => "too_many_requests",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::DeadlineExceeded(_) => "deadline_exceeded",
            ApiError::BodyTimeout(_) => "body_timeout",
            ApiError::UriTooLong(_) => "uri_too_long",
            ApiError::HeadersTooLarge(_) => "headers_too_large",
            ApiError::InsufficientStorage(_) => "insufficient_storage",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The request field at fault, if one is.
    pub fn field(&self) -> Option<&str> {
        match self {
            ApiError::InvalidOption { field, .. } | ApiError::InvalidRequest { field, .. } => {
                Some(field)
            }
            ApiError::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }

    /// What the client is told. A 500's detail (paths, panic text) is for the log, which
    /// carries the request id; the client gets an opaque message and the x-request-id to quote.
    pub fn info(&self) -> ErrorInfo {
        let message = if let ApiError::Internal(_) = self {
            "internal error; the server log has the details under this request's x-request-id"
                .to_string()
        } else {
            self.to_string()
        };
        ErrorInfo {
            message,
            kind: self.kind(),
            field: self.field().map(str::to_string),
        }
    }

    /// This error as OpenAI's error object.
    pub fn openai_body(&self) -> serde_json::Value {
        self.info().openai_body(self.status())
    }

    pub fn option(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidOption {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The one place engine errors become HTTP errors.
impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        use crate::preprocess::ImageError;
        let text = e.to_string();
        match e {
            EngineError::QueueFull
            | EngineError::Stopped
            | EngineError::Aborted
            | EngineError::NoModel
            | EngineError::ModelChanged(_)
            | EngineError::Cancelled
            | EngineError::OutOfMemory(_) => ApiError::Unavailable(text),
            EngineError::UnknownModel { .. } => ApiError::option("model", text),
            EngineError::Deadline(_) => ApiError::DeadlineExceeded(text),
            EngineError::NoImages => ApiError::Malformed(text),
            EngineError::Inference(_) => ApiError::Internal(text),
            EngineError::Image { ref error, .. } => match error {
                ImageError::TooLarge { .. } => ApiError::TooLarge(text),
                ImageError::UnsupportedFormat => ApiError::UnsupportedMedia(text),
                _ => ApiError::InvalidImage(text),
            },
            EngineError::Embedding { .. } => ApiError::option("embedding", text),
            EngineError::KvBudget { .. } => ApiError::TooLarge(text),
            EngineError::InvalidOption(o) => ApiError::option(o.field, o.message),
            EngineError::Load { .. } => ApiError::option("path", text),
            EngineError::NotLoaded(_) => ApiError::NotFound(text),
        }
    }
}

impl From<crate::train::jobs::JobError> for ApiError {
    fn from(e: crate::train::jobs::JobError) -> Self {
        use crate::train::jobs::JobError;
        let text = e.to_string();
        match e {
            JobError::NotFound(_) => ApiError::NotFound(text),
            JobError::Conflict(_) => ApiError::Conflict(text),
            JobError::Storage(_) => ApiError::InsufficientStorage(text),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let ApiError::Internal(detail) = &self {
            tracing::error!(error = %detail, "request failed");
        }
        let info = self.info();
        let mut body = json!({"error": info.message, "type": self.kind()});
        if let Some(field) = self.field() {
            body["field"] = json!(field);
        }
        let mut resp = (status, axum::Json(body)).into_response();
        resp.extensions_mut().insert(info);
        if matches!(
            self,
            ApiError::TooManyRequests(_) | ApiError::Unavailable(_)
        ) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(self, ApiError::Unauthorized(_)) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// An error response's parts, kept on the response so that a door with another error shape
/// (OpenAI's, on `/v1/*`) can render the same error its way.
#[derive(Clone, Debug)]
pub struct ErrorInfo {
    pub message: String,
    pub kind: &'static str,
    pub field: Option<String>,
}

impl ErrorInfo {
    /// OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`, its `type`
    /// from the status as OpenAI names it, `code` clipcap's own error type.
    pub fn openai_body(&self, status: StatusCode) -> serde_json::Value {
        let kind = match status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        };
        json!({"error": {
            "message": self.message,
            "type": kind,
            "param": self.field,
            "code": self.kind,
        }})
    }
}
