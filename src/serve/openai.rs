//! The OpenAI-compatible door: `POST /v1/chat/completions` (streamed or not) and
//! `GET /v1/models[/{id}]`, so OpenAI's SDKs, LangChain, Ray's HTTP processor and load tools
//! work unchanged. It calls the same [`crate::engine::Engine`] as `/caption`, with the same
//! options (one definition, `serve::validation`), and answers errors in OpenAI's shape
//! ([`openai_errors`] renders every error under `/v1/`, the request guard's included).
//!
//! What maps to what:
//! - the last `user` message carries one `image_url` part (a `data:` URI, or an `http://` URL
//!   of a host in `image_url_hosts`); its `text` parts are the caption's beginning, which the
//!   decoder continues; system and earlier messages are not read;
//! - `n`, `max_tokens` / `max_completion_tokens`, `temperature` (0 = greedy), `top_p`, `seed`
//!   are clipcap's options of those names; `top_p`, `top_k` or `seed` without a `strategy`
//!   mean sampling; clipcap's own fields (`strategy`, `beam_size`, `top_k`,
//!   `repetition_penalty`, `no_repeat_ngram`, `priority`, `timeout`) come as body fields
//!   (the SDK's `extra_body`);
//! - `stop`, penalties, `logprobs`, `logit_bias`, tools and response formats are refused
//!   unless left at their defaults; `user`, `metadata`, `store` and the like are ignored.
use crate::engine::{CaptionOutput, Engine, EngineError, ModelInfo, StreamEvent};
use crate::generate::FinishReason;
use crate::options::GenOptions;
use crate::serve::error::{ApiError, ErrorInfo};
use crate::serve::routes::check_api_key;
use crate::serve::validation::{echo, RawOptions, Scheduling};
use crate::serve::AppState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, Request};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Serialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::time::Instant;
use utoipa::ToSchema;

pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route_layer(axum::middleware::from_fn_with_state(state, require_api_key))
}

async fn require_api_key(State(st): State<AppState>, req: Request<Body>, next: Next) -> Response {
    match check_api_key(&st, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Renders every error under `/v1/` as OpenAI's error object (status and headers kept).
pub async fn openai_errors(req: Request<Body>, next: Next) -> Response {
    let path = req.uri().path();
    let v1 = path == "/v1" || path.starts_with("/v1/");
    let resp = next.run(req).await;
    if !v1 {
        return resp;
    }
    let Some(info) = resp.extensions().get::<ErrorInfo>().cloned() else {
        return resp;
    };
    let (mut parts, _) = resp.into_parts();
    let body = info.openai_body(parts.status).to_string();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

/// OpenAI's chat-completions request, as far as clipcap reads it (for the OpenAPI document;
/// the body is parsed field by field, so that every refusal names its field).
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct ChatRequest {
    /// A served model (`GET /v1/models`); the default model when left out.
    model: Option<String>,
    /// The last `user` message's content: one `{"type": "image_url", "image_url": {"url":
    /// "data:image/png;base64,..."}}` part and optional `{"type": "text", "text": "A photo
    /// of"}` parts, the caption's beginning.
    #[schema(value_type = Vec<Object>)]
    messages: Vec<Value>,
    /// `max_tokens` under its newer name.
    max_completion_tokens: Option<i64>,
    /// Server-sent events of `chat.completion.chunk`; greedy and sampling stream tokens,
    /// beam search sends its text when its beams finish.
    stream: Option<bool>,
    /// `{"include_usage": true}`: a last chunk with the token counts.
    #[schema(value_type = Option<Object>)]
    stream_options: Option<Value>,
    /// clipcap's decoding options, OpenAI's `n`, `max_tokens`, `temperature` (0 = greedy),
    /// `top_p` and `seed` among them; `prompt` is the text part's alternative.
    #[schema(inline)]
    #[serde(flatten)]
    options: crate::options::DecodeOptions,
    #[schema(inline)]
    #[serde(flatten)]
    scheduling: crate::serve::openapi::SchedulingOptions,
}

/// One choice of a chat completion.
#[derive(Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    #[schema(value_type = Object)]
    pub message: Value,
    /// Always null.
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<Value>,
    /// `stop` (a stop token) or `length` (max_tokens).
    pub finish_reason: String,
}

/// Token counts: the prompt is the image prefix and the prompt text, the completion every
/// choice's generated tokens.
#[derive(Serialize, ToSchema, Clone, Copy)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// OpenAI's `chat.completion`.
#[derive(Serialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

/// One served model in OpenAI's shape (and whether it is the default).
#[derive(Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    /// clipcap's own: served when a request names no model.
    pub default: bool,
    /// clipcap's own: increments on every swap.
    pub version: u64,
    /// clipcap's own, for models from a model repository: the state of its newest files
    /// (`failed` with the error while an older version keeps serving).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository: Option<crate::serve::repository::ModelStatus>,
}

/// `GET /v1/models`.
#[derive(Serialize, ToSchema)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
    /// clipcap's own: repository models that are not served (their bundle failed to load or
    /// is incomplete, and no earlier version loaded).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unavailable: Vec<crate::serve::repository::ModelStatus>,
}

/// What a chat request asks for, parsed and checked.
pub(crate) struct Chat {
    pub(crate) model: Option<String>,
    /// The image's URL (a `data:` URI or an allowed `http://` URL; `clipcap batch` also takes
    /// local paths).
    pub(crate) image_url: String,
    pub(crate) raw: RawOptions,
    pub(crate) stream: bool,
    include_usage: bool,
}

/// OpenAI parameters clipcap does not implement: refused unless at their defaults.
const REFUSED: &[&str] = &[
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "audio",
    "modalities",
    "prediction",
    "web_search_options",
    "reasoning_effort",
    "verbosity",
    "top_logprobs",
];
/// OpenAI parameters that change nothing here (bookkeeping for OpenAI's own platform).
const IGNORED: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
    "parallel_tool_calls",
    "moderation",
];
/// clipcap's fields a body may add (the SDK's `extra_body`).
const OWN: &[&str] = &[
    "strategy",
    "beam_size",
    "top_k",
    "repetition_penalty",
    "no_repeat_ngram",
    "priority",
    "timeout",
    "prompt",
];

fn is_default(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// A 400 naming the parameter (OpenAI answers 400 for unknown and malformed parameters; bad
/// option values get `/caption`'s 422).
fn bad(field: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest {
        field: field.into(),
        message: message.into(),
    }
}

fn parse_chat(body: &[u8]) -> Result<Chat, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::Malformed(format!("invalid JSON: {e}")))?;
    parse_chat_value(v)
}

/// [`parse_chat`] of a body already parsed (a batch file's line).
pub(crate) fn parse_chat_value(v: Value) -> Result<Chat, ApiError> {
    let Value::Object(map) = v else {
        return Err(ApiError::Malformed("the body must be a JSON object".into()));
    };
    let mut raw = RawOptions::default();
    let mut model = None;
    let mut messages = None;
    let mut stream = false;
    let mut include_usage = false;
    let mut max_tokens: Option<Value> = None;
    let mut prompt_field: Option<Value> = None;
    for (k, v) in map {
        match k.as_str() {
            "model" => match v {
                Value::String(s) => model = Some(s),
                Value::Null => {}
                _ => return Err(bad("model", "must be a string")),
            },
            "messages" => messages = Some(v),
            "stream" => match v {
                Value::Bool(b) => stream = b,
                Value::Null => {}
                _ => return Err(bad("stream", "must be true or false")),
            },
            "stream_options" => match &v {
                Value::Null => {}
                Value::Object(o) => {
                    include_usage = o.get("include_usage").and_then(Value::as_bool) == Some(true)
                }
                _ => return Err(bad("stream_options", "must be an object")),
            },
            "max_tokens" | "max_completion_tokens" => {
                if v.is_null() {
                    continue;
                }
                if let Some(other) = &max_tokens {
                    if *other != v {
                        return Err(bad(
                            "max_completion_tokens",
                            "max_tokens and max_completion_tokens disagree; send one",
                        ));
                    }
                }
                max_tokens = Some(v);
            }
            "n" | "temperature" | "top_p" | "seed" => raw.set(&k, v)?,
            "prompt" => prompt_field = Some(v),
            name if OWN.contains(&name) => raw.set(name, v)?,
            "stop" => {
                if !is_default(&v) {
                    return Err(bad(
                        "stop",
                        "stop sequences are not supported: captions end at the model's stop tokens (limit length with max_tokens)",
                    ));
                }
            }
            "frequency_penalty" | "presence_penalty" => {
                if !is_default(&v) {
                    return Err(bad(
                        k,
                        "is not supported; use repetition_penalty or no_repeat_ngram",
                    ));
                }
            }
            "logprobs" | "logit_bias" => {
                if !is_default(&v) {
                    return Err(bad(k, "is not supported"));
                }
            }
            name if REFUSED.contains(&name) => {
                if !is_default(&v) {
                    return Err(bad(name, "is not supported by a captioner"));
                }
            }
            name if IGNORED.contains(&name) => {}
            other => return Err(bad(echo(other), "unknown parameter")),
        }
    }
    if let Some(v) = max_tokens {
        raw.set("max_tokens", v)?;
    }
    let Some(messages) = messages else {
        return Err(bad("messages", "is required"));
    };
    let (url, text) = last_user_image(&messages)?;
    match (prompt_field, text) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "prompt",
                "give the caption's beginning once: as a text part or as prompt, not both",
            ))
        }
        (Some(p), None) => raw.set("prompt", p)?,
        (None, Some(t)) => raw.set("prompt", Value::String(t))?,
        (None, None) => {}
    }
    if let Some(m) = &model {
        raw.model = Some(m.clone());
    }
    // OpenAI's sampling knobs imply sampling when the request names no strategy (a bundle's
    // default is beam search, which would refuse them).
    if !raw.has("strategy") && (raw.has("top_p") || raw.has("top_k") || raw.has("seed")) {
        raw.set("strategy", Value::String("sample".into()))?;
    }
    Ok(Chat {
        model,
        image_url: url,
        raw,
        stream,
        include_usage,
    })
}

/// The last user message's image URL and its text (the caption's beginning, if any).
fn last_user_image(messages: &Value) -> Result<(String, Option<String>), ApiError> {
    let Value::Array(list) = messages else {
        return Err(bad("messages", "must be an array of messages"));
    };
    let Some(last) = list
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
    else {
        return Err(bad("messages", "needs a message with role \"user\""));
    };
    let parts = match last.get("content") {
        Some(Value::Array(parts)) => parts,
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err(bad(
                "messages",
                "the last user message needs an image: content [{\"type\": \"image_url\", \"image_url\": {\"url\": \"data:image/png;base64,...\"}}]",
            ))
        }
        Some(_) => return Err(bad("messages", "content must be a string or an array of parts")),
    };
    let mut urls = vec![];
    let mut texts = vec![];
    for (i, part) in parts.iter().enumerate() {
        match part.get("type").and_then(Value::as_str) {
            Some("image_url") => {
                let url = match part.get("image_url") {
                    Some(Value::Object(o)) => o.get("url").and_then(Value::as_str),
                    Some(Value::String(s)) => Some(s.as_str()),
                    _ => None,
                };
                match url {
                    Some(u) => urls.push(u.to_string()),
                    None => {
                        return Err(bad(
                            "messages",
                            format!("content part {i}: image_url needs a url"),
                        ))
                    }
                }
            }
            Some("text") => match part.get("text").and_then(Value::as_str) {
                Some(t) => texts.push(t.to_string()),
                None => {
                    return Err(bad(
                        "messages",
                        format!("content part {i}: a text part needs text"),
                    ))
                }
            },
            other => {
                return Err(bad(
                    "messages",
                    format!(
                        "content part {i}: type {:?} is not supported (image_url and text are)",
                        echo(other.unwrap_or(""))
                    ),
                ))
            }
        }
    }
    let url = match urls.len() {
        0 => {
            return Err(bad(
                "messages",
                "the last user message has no image_url part",
            ))
        }
        1 => urls.pop().unwrap(),
        n => {
            return Err(bad(
                "messages",
                format!("{n} images in one message; send one image per request (or use n for several captions)"),
            ))
        }
    };
    let text = texts.join(" ");
    let text = text.trim();
    Ok((url, (!text.is_empty()).then(|| text.to_string())))
}

/// Captions the image in the last user message, as OpenAI's chat completion.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    request_body(content = ChatRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "A chat.completion, or with stream=true server-sent chat.completion.chunk events ending with data: [DONE]", body = ChatCompletion),
        (status = 400, description = "Malformed request or image URL refused (OpenAI's error object)"),
        (status = 401, description = "API key missing or wrong"),
        (status = 404, description = "Unknown model"),
        (status = 413, description = "Body or image over a limit"),
        (status = 415, description = "Not JSON, or not an image"),
        (status = 422, description = "Bad or unsupported parameter (param named)"),
        (status = 429, description = "Too many requests in flight (Retry-After)"),
        (status = 503, description = "Queue full or shutting down (Retry-After)"),
        (status = 504, description = "The deadline or the request's timeout passed"),
    ),
    security((), ("bearer" = []))
)]
pub(crate) async fn chat_completions(
    State(st): State<AppState>,
    req: Request<Body>,
) -> Result<Response, ApiError> {
    let (t0, server_deadline) = crate::serve::routes::begin(&st)?;
    let (parts, body) = req.into_parts();
    let mime = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime != "application/json" && !mime.ends_with("+json") {
        return Err(ApiError::UnsupportedMedia(
            "send the chat request as application/json".into(),
        ));
    }
    // Already whole and within max_body_bytes: the request guard (serve::conn) read it.
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .map_err(|e| ApiError::Malformed(format!("cannot read the body: {e}")))?;
    let chat = parse_chat(&body)?;
    let Prepared {
        model,
        opts,
        scheduling,
        meta,
    } = prepare(&st.engine, &chat, None)?;
    let params = scheduling.params(t0, server_deadline);
    let image: Bytes = crate::serve::image_url::load(&chat.image_url, &st.cfg.server).await?;
    if chat.stream {
        let stream = st
            .engine
            .caption_stream(&model, vec![image], opts.clone(), params)
            .await?;
        let name = model.name.clone();
        return Ok(sse(
            st,
            name,
            stream,
            meta,
            opts.n as usize,
            chat.include_usage,
            t0,
        ));
    }
    let out = st.engine.caption(&model, vec![image], opts, params).await?;
    let model_header = format!("{}/{}", out.model, out.model_version);
    let mut resp = Json(completion(out, &meta)).into_response();
    if let Ok(v) = HeaderValue::from_str(&model_header) {
        resp.headers_mut().insert("x-clipcap-model", v);
    }
    Ok(resp)
}

/// A chat request resolved against its model: what `/v1/chat/completions` and
/// `clipcap batch` caption with.
pub(crate) struct Prepared {
    pub(crate) model: ModelInfo,
    pub(crate) opts: GenOptions,
    pub(crate) scheduling: Scheduling,
    pub(crate) meta: Meta,
}

/// Resolves `chat`'s model and options (over `base`, else the model's defaults) and counts
/// its prompt tokens; every refusal comes before any work.
pub(crate) fn prepare(
    engine: &Engine,
    chat: &Chat,
    base: Option<&GenOptions>,
) -> Result<Prepared, ApiError> {
    let model = engine.resolve(chat.model.as_deref()).map_err(|e| match e {
        EngineError::UnknownModel { .. } => ApiError::ModelNotFound(e.to_string()),
        other => other.into(),
    })?;
    let opts = chat.raw.resolve(base.unwrap_or(&model.generation))?;
    let scheduling = chat.raw.scheduling()?;
    let meta = Meta::new(&model, &opts)?;
    Ok(Prepared {
        model,
        opts,
        scheduling,
        meta,
    })
}

/// What every answer to one request shares.
pub(crate) struct Meta {
    id: String,
    created: u64,
    prompt_tokens: usize,
}

impl Meta {
    /// A new completion's id and time, and its prompt's length in tokens (the image prefix's
    /// positions and the caption's beginning).
    pub(crate) fn new(model: &ModelInfo, opts: &GenOptions) -> Result<Meta, ApiError> {
        Ok(Meta {
            id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
            created: crate::train::jobs::now(),
            prompt_tokens: model.prefix_length as usize
                + crate::engine::prompt_tokens(model, opts)?,
        })
    }
}

fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn fingerprint(out: &CaptionOutput) -> String {
    format!(
        "clipcap-{}:{}/{}",
        env!("CARGO_PKG_VERSION"),
        out.model,
        out.model_version
    )
}

fn usage(out: &CaptionOutput, meta: &Meta) -> Usage {
    let completion_tokens = out
        .images
        .iter()
        .flat_map(|i| &i.captions)
        .map(|c| c.tokens.len())
        .sum();
    Usage {
        prompt_tokens: meta.prompt_tokens,
        completion_tokens,
        total_tokens: meta.prompt_tokens + completion_tokens,
    }
}

pub(crate) fn completion(out: CaptionOutput, meta: &Meta) -> ChatCompletion {
    let usage = usage(&out, meta);
    let choices = out
        .images
        .first()
        .map(|img| {
            img.captions
                .iter()
                .enumerate()
                .map(|(index, c)| ChatChoice {
                    index,
                    message: json!({"role": "assistant", "content": c.text, "refusal": null}),
                    logprobs: None,
                    finish_reason: finish_name(c.finish).into(),
                })
                .collect()
        })
        .unwrap_or_default();
    ChatCompletion {
        id: meta.id.clone(),
        object: "chat.completion".into(),
        created: meta.created,
        model: out.model.clone(),
        system_fingerprint: fingerprint(&out),
        choices,
        usage,
    }
}

/// The stream of `chat.completion.chunk` events: each choice's role, its text as it is
/// decoded, its finish reason, the usage if asked, then `[DONE]`. A task drives the
/// engine's stream and stops (cancelling the request) as soon as the client is gone.
fn sse(
    st: AppState,
    model_name: String,
    mut stream: crate::engine::CaptionStream,
    meta: Meta,
    n: usize,
    include_usage: bool,
    t0: Instant,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let chunk = |model: &str, choices: Value, usage: Option<Usage>| {
            let mut c = json!({
                "id": meta.id,
                "object": "chat.completion.chunk",
                "created": meta.created,
                "model": model,
                "choices": choices,
            });
            if let Some(u) = usage {
                c["usage"] = json!(u);
            }
            Event::default().data(c.to_string())
        };
        let delta = |i: usize, d: Value, finish: Option<&str>| json!([{"index": i, "delta": d, "logprobs": null, "finish_reason": finish}]);
        let mut model = model_name;
        let mut sent = vec![String::new(); n];
        let mut first = true;
        let ttft = &st.engine.metrics().time_to_first_token;
        let first_content = |first: &mut bool| {
            if std::mem::take(first) {
                ttft.observe(t0.elapsed().as_secs_f64());
            }
        };
        for i in 0..n {
            let e = chunk(
                &model,
                delta(i, json!({"role": "assistant", "content": ""}), None),
                None,
            );
            if tx.send(e).await.is_err() {
                return;
            }
        }
        loop {
            let event = tokio::select! {
                e = stream.next() => e,
                _ = tx.closed() => return,
            };
            let (events, end) = match event {
                None => return,
                Some(StreamEvent::Delta(d)) => {
                    if d.choice >= n || d.text.is_empty() {
                        continue;
                    }
                    first_content(&mut first);
                    sent[d.choice].push_str(&d.text);
                    let e = chunk(
                        &model,
                        delta(d.choice, json!({"content": d.text}), None),
                        None,
                    );
                    (vec![e], false)
                }
                Some(StreamEvent::Done(Ok(out))) => {
                    model = out.model.clone();
                    let mut events = vec![];
                    let captions = out
                        .images
                        .first()
                        .map(|i| i.captions.as_slice())
                        .unwrap_or(&[]);
                    for (i, c) in captions.iter().enumerate().take(n) {
                        let rest = match c.text.strip_prefix(sent[i].as_str()) {
                            Some(r) => r.to_string(),
                            None => {
                                tracing::error!(streamed = %sent[i], caption = %c.text, "streamed text is not the caption's beginning");
                                String::new()
                            }
                        };
                        if !rest.is_empty() {
                            first_content(&mut first);
                            events.push(chunk(
                                &model,
                                delta(i, json!({"content": rest}), None),
                                None,
                            ));
                        }
                        events.push(chunk(
                            &model,
                            delta(i, json!({}), Some(finish_name(c.finish))),
                            None,
                        ));
                    }
                    if include_usage {
                        events.push(chunk(&model, json!([]), Some(usage(&out, &meta))));
                    }
                    events.push(Event::default().data("[DONE]"));
                    (events, true)
                }
                Some(StreamEvent::Done(Err(e))) => {
                    let err = ApiError::from(e);
                    let info = ErrorInfo {
                        message: err.to_string(),
                        kind: err.kind(),
                        field: err.field().map(str::to_string),
                    };
                    let events = vec![
                        Event::default().data(info.openai_body(err.status()).to_string()),
                        Event::default().data("[DONE]"),
                    ];
                    (events, true)
                }
            };
            for e in events {
                if tx.send(e).await.is_err() {
                    return;
                }
            }
            if end {
                return;
            }
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<Event, Infallible>(e), rx))
    });
    let mut resp = Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// `m` as OpenAI's model object; `repo` is the repository's states (one read per answer).
fn card(
    m: &crate::engine::ModelInfo,
    default: &str,
    repo: &[crate::serve::repository::ModelStatus],
) -> ModelCard {
    ModelCard {
        id: m.name.clone(),
        object: "model".into(),
        created: m.loaded_at_unix,
        owned_by: "clipcap".into(),
        default: m.name == default,
        version: m.version,
        repository: repo.iter().find(|s| s.name == m.name).cloned(),
    }
}

/// The repository's model states (none without a repository).
fn repository_states(st: &AppState) -> Vec<crate::serve::repository::ModelStatus> {
    st.repository
        .as_ref()
        .map(|r| r.status())
        .unwrap_or_default()
}

/// The served models, in OpenAI's list shape.
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    responses((status = 200, description = "Every served model", body = ModelList),
              (status = 401, description = "API key missing or wrong")),
    security((), ("bearer" = [])))]
pub(crate) async fn list_models(State(st): State<AppState>) -> Json<ModelList> {
    let default = st.engine.default_model();
    let mut models = st.engine.models();
    models.sort_by(|a, b| a.name.cmp(&b.name));
    let repo = repository_states(&st);
    let unavailable = repo
        .iter()
        .filter(|s| !models.iter().any(|m| m.name == s.name))
        .cloned()
        .collect();
    Json(ModelList {
        object: "list".into(),
        data: models.iter().map(|m| card(m, &default, &repo)).collect(),
        unavailable,
    })
}

/// One served model.
#[utoipa::path(get, path = "/v1/models/{id}", tag = "openai",
    params(("id" = String, Path, description = "Model name")),
    responses((status = 200, description = "The model", body = ModelCard),
              (status = 404, description = "Not served")),
    security((), ("bearer" = [])))]
pub(crate) async fn get_model(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    let repo = repository_states(&st);
    let default = st.engine.default_model();
    st.engine
        .models()
        .iter()
        .find(|m| m.name == id)
        .map(|m| Json(card(m, &default, &repo)))
        .ok_or_else(|| {
            let why = repo
                .iter()
                .find(|s| s.name == id)
                .and_then(|s| s.error.clone())
                .map(|e| format!(" (its repository bundle is not served: {e})"))
                .unwrap_or_default();
            ApiError::ModelNotFound(format!("no model named {:?}{why}", echo(&id)))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_msg(extra: Value) -> Value {
        let mut content =
            vec![json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}})];
        if !extra.is_null() {
            content.push(extra);
        }
        json!([{"role": "system", "content": "You describe images."},
               {"role": "user", "content": content}])
    }

    fn parse(body: Value) -> Result<Chat, ApiError> {
        parse_chat(body.to_string().as_bytes())
    }

    #[test]
    fn the_last_user_message_gives_the_image_and_the_prompt() {
        let c = parse(json!({"model": "m", "messages": image_msg(json!({"type": "text", "text": " A photo of "}))})).unwrap();
        assert_eq!(c.image_url, "data:image/png;base64,aGk=");
        let o = c.raw.resolve(&Default::default()).unwrap();
        assert_eq!(o.prompt, "A photo of");
        assert_eq!(c.raw.model.as_deref(), Some("m"));
    }

    #[test]
    fn openai_fields_map_to_options_and_sampling_knobs_imply_sampling() {
        let c = parse(
            json!({"messages": image_msg(Value::Null), "n": 2, "max_completion_tokens": 9,
            "seed": 3, "top_p": 0.9, "user": "u", "stop": null, "frequency_penalty": 0}),
        )
        .unwrap();
        let o = c.raw.resolve(&Default::default()).unwrap();
        assert_eq!(
            (o.strategy, o.n, o.max_tokens, o.seed, o.top_p),
            (crate::options::Strategy::Sample, 2, 9, Some(3), 0.9)
        );
        let c = parse(json!({"messages": image_msg(Value::Null), "temperature": 0})).unwrap();
        assert_eq!(
            c.raw.resolve(&Default::default()).unwrap().strategy,
            crate::options::Strategy::Greedy
        );
    }

    #[test]
    fn refusals_name_the_parameter() {
        let field = |body: Value| match parse(body) {
            Err(e) => e.field().map(str::to_string),
            Ok(_) => None,
        };
        let m = image_msg(Value::Null);
        assert_eq!(
            field(json!({"messages": m, "stop": ["."]})).as_deref(),
            Some("stop")
        );
        assert_eq!(
            field(json!({"messages": m, "tools": [{}]})).as_deref(),
            Some("tools")
        );
        assert_eq!(
            field(json!({"messages": m, "bogus": 1})).as_deref(),
            Some("bogus")
        );
        assert_eq!(
            field(json!({"messages": m, "max_tokens": 5, "max_completion_tokens": 6})).as_deref(),
            Some("max_completion_tokens")
        );
        assert_eq!(field(json!({"model": "x"})).as_deref(), Some("messages"));
        assert_eq!(
            field(json!({"messages": [{"role": "user", "content": "hi"}]})).as_deref(),
            Some("messages")
        );
        let two = json!([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:,"}},
            {"type": "image_url", "image_url": {"url": "data:,"}}]}]);
        assert_eq!(field(json!({"messages": two})).as_deref(), Some("messages"));
        assert_eq!(
            field(
                json!({"messages": image_msg(json!({"type": "text", "text": "A"})), "prompt": "B"})
            )
            .as_deref(),
            Some("prompt")
        );
    }
}
