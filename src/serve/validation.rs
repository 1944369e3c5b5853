//! Turning an HTTP request into images + decoding options, or a precise 4xx.
//!
//! Three body forms: `multipart/form-data` (field `image`, repeatable; other fields are
//! options), a raw image (`Content-Type: image/*` or `application/octet-stream`), and JSON
//! `{"image": "<base64>"}` / `{"images": [...]}` with options as fields. Options may also come
//! as query parameters; body fields win.
use crate::options::{DecodeOptions, GenOptions};
use crate::serve::error::ApiError;
use base64::Engine;
use bytes::Bytes;
use serde_json::{Map, Value};

/// Longest client-given name echoed back in an error.
const ECHO_MAX: usize = 64;

/// A client-given name, cut to [`ECHO_MAX`] characters for error messages.
pub fn echo(name: &str) -> String {
    if name.chars().count() <= ECHO_MAX {
        name.to_string()
    } else {
        format!("{}…", name.chars().take(ECHO_MAX).collect::<String>())
    }
}

/// Options as the client wrote them (query, form fields, JSON fields), before the model's
/// defaults are applied. Text from queries and forms and JSON values are both accepted.
#[derive(Debug, Default, Clone)]
pub struct RawOptions {
    pub model: Option<String>,
    fields: Map<String, Value>,
    /// `priority` and `timeout`: how the request is scheduled, not how it is decoded.
    scheduling: Map<String, Value>,
}

/// The scheduling fields a request may add to its decoding options.
pub const SCHEDULING_FIELDS: [&str; 2] = ["priority", "timeout"];
/// Priorities allowed (lower starts first); bounded so that metrics stay few.
pub const MAX_PRIORITY: i64 = 100;
/// Longest per-request `timeout`, in seconds.
pub const MAX_TIMEOUT_S: f64 = 3600.0;

/// How one request is scheduled, validated.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Scheduling {
    pub priority: i32,
    pub timeout: Option<std::time::Duration>,
}

impl Scheduling {
    /// The engine's parameters for a request that arrived at `t0`: the earlier of its own
    /// timeout and the server's deadline.
    pub fn params(
        &self,
        t0: std::time::Instant,
        server_deadline: Option<std::time::Instant>,
    ) -> crate::engine::RequestParams {
        let own = self.timeout.map(|t| t0 + t);
        let deadline = match (own, server_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        crate::engine::RequestParams {
            deadline,
            priority: self.priority,
        }
    }
}

impl RawOptions {
    /// Records one option; unknown names are refused at once (and never echoed unbounded).
    pub fn set(&mut self, name: &str, value: Value) -> Result<(), ApiError> {
        if name == "model" {
            self.model = Some(match value {
                Value::String(s) => s,
                other => other.to_string(),
            });
            return Ok(());
        }
        if SCHEDULING_FIELDS.contains(&name) {
            self.scheduling.insert(name.to_string(), value);
            return Ok(());
        }
        let names = DecodeOptions::field_names();
        if !names.contains(&name) {
            return Err(ApiError::option(
                echo(name),
                format!(
                    "unknown option; allowed: model, {}, {}",
                    names.join(", "),
                    SCHEDULING_FIELDS.join(", ")
                ),
            ));
        }
        self.fields.insert(name.to_string(), value);
        Ok(())
    }

    /// Records one option given as text (query string or form field).
    pub fn set_text(&mut self, name: &str, value: String) -> Result<(), ApiError> {
        self.set(name, Value::String(value))
    }

    /// The options as the one typed definition (field named on a bad value).
    pub fn parse(&self) -> Result<DecodeOptions, ApiError> {
        serde_path_to_error::deserialize(Value::Object(self.fields.clone())).map_err(|e| {
            let field = e.path().to_string();
            ApiError::option(field, e.into_inner().to_string())
        })
    }

    /// Whether the client set decoding option `name`.
    pub fn has(&self, name: &str) -> bool {
        self.fields.get(name).is_some_and(|v| !v.is_null())
    }

    /// `priority` (an integer, -100 to 100, lower first) and `timeout` (seconds, > 0).
    pub fn scheduling(&self) -> Result<Scheduling, ApiError> {
        let number = |name: &str| -> Result<Option<f64>, ApiError> {
            match self.scheduling.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Number(n)) => Ok(n.as_f64()),
                Some(Value::String(s)) => s
                    .trim()
                    .parse::<f64>()
                    .map(Some)
                    .map_err(|_| ApiError::option(name, "must be a number")),
                Some(_) => Err(ApiError::option(name, "must be a number")),
            }
        };
        let mut out = Scheduling::default();
        if let Some(p) = number("priority")? {
            if p.fract() != 0.0 || p.abs() > MAX_PRIORITY as f64 {
                return Err(ApiError::option(
                    "priority",
                    format!("must be an integer between -{MAX_PRIORITY} and {MAX_PRIORITY} (lower starts first)"),
                ));
            }
            out.priority = p as i32;
        }
        if let Some(t) = number("timeout")? {
            if !(t > 0.0 && t <= MAX_TIMEOUT_S) {
                return Err(ApiError::option(
                    "timeout",
                    format!("must be seconds, > 0 and at most {MAX_TIMEOUT_S}"),
                ));
            }
            out.timeout = Some(std::time::Duration::from_secs_f64(t));
        }
        Ok(out)
    }

    /// The model's defaults with these options applied and validated.
    pub fn resolve(&self, defaults: &GenOptions) -> Result<GenOptions, ApiError> {
        self.parse()?
            .resolve(defaults)
            .map_err(|e| ApiError::option(e.field, e.message))
    }
}

/// Parses query options (`a=1&b=2`).
pub fn parse_query(query: Option<&str>, opts: &mut RawOptions) -> Result<(), ApiError> {
    let Some(q) = query else { return Ok(()) };
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q)
        .map_err(|e| ApiError::Malformed(format!("bad query string: {e}")))?;
    for (k, v) in pairs {
        opts.set_text(&k, v)?;
    }
    Ok(())
}

/// Parses the body according to its content type.
pub async fn parse_body(
    content_type: Option<&str>,
    body: Bytes,
    max_images: usize,
    opts: &mut RawOptions,
) -> Result<Vec<Bytes>, ApiError> {
    let Some(ct) = content_type else {
        return Err(ApiError::UnsupportedMedia(
            "missing Content-Type; send multipart/form-data, image/*, or application/json".into(),
        ));
    };
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let images = if mime == "multipart/form-data" {
        parse_multipart(ct, body, max_images, opts).await?
    } else if mime.starts_with("image/") || mime == "application/octet-stream" {
        vec![body]
    } else if mime == "application/json" || mime.ends_with("+json") {
        parse_json(&body, max_images, opts)?
    } else {
        return Err(ApiError::UnsupportedMedia(format!(
            "unsupported Content-Type {mime:?}; send multipart/form-data, image/*, or application/json"
        )));
    };
    if images.is_empty() {
        return Err(ApiError::Malformed("no image in the request".into()));
    }
    if images.len() > max_images {
        return Err(ApiError::TooLarge(format!(
            "{} images in one request; at most {max_images}",
            images.len()
        )));
    }
    if let Some(i) = images.iter().position(|b| b.is_empty()) {
        return Err(ApiError::Malformed(format!("image {i} is empty")));
    }
    Ok(images)
}

async fn parse_multipart(
    content_type: &str,
    body: Bytes,
    max_images: usize,
    opts: &mut RawOptions,
) -> Result<Vec<Bytes>, ApiError> {
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| ApiError::Malformed(format!("bad multipart Content-Type: {e}")))?;
    let stream = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
    let mut mp = multer::Multipart::new(stream, boundary);
    let mut images = vec![];
    loop {
        let field = match mp.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(ApiError::Malformed(format!("bad multipart body: {e}"))),
        };
        let name = field.name().unwrap_or("").to_string();
        let data = field.bytes().await.map_err(|e| {
            ApiError::Malformed(format!("bad multipart field {:?}: {e}", echo(&name)))
        })?;
        if matches!(name.as_str(), "image" | "images" | "image[]" | "file") {
            if images.len() >= max_images {
                return Err(ApiError::TooLarge(format!(
                    "more than {max_images} images in one request"
                )));
            }
            images.push(data);
        } else {
            let text = String::from_utf8(data.to_vec())
                .map_err(|_| ApiError::option(echo(&name), "must be UTF-8 text"))?;
            opts.set_text(&name, text)?;
        }
    }
    Ok(images)
}

fn parse_json(
    body: &[u8],
    max_images: usize,
    opts: &mut RawOptions,
) -> Result<Vec<Bytes>, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::Malformed(format!("invalid JSON: {e}")))?;
    let Value::Object(map) = v else {
        return Err(ApiError::Malformed(
            "the JSON body must be an object".into(),
        ));
    };
    let mut images = vec![];
    for (k, v) in map {
        match k.as_str() {
            "image" => images.push(decode_b64(&v, "image")?),
            "images" => {
                let Value::Array(list) = v else {
                    return Err(ApiError::Malformed(
                        "images must be an array of base64 strings".into(),
                    ));
                };
                if list.len() > max_images {
                    return Err(ApiError::TooLarge(format!(
                        "{} images in one request; at most {max_images}",
                        list.len()
                    )));
                }
                for (i, item) in list.iter().enumerate() {
                    images.push(decode_b64(item, &format!("images[{i}]"))?);
                }
            }
            _ => match v {
                Value::Null => continue,
                Value::Array(_) | Value::Object(_) => {
                    return Err(ApiError::option(echo(&k), "must be a string or a number"))
                }
                v => opts.set(&k, v)?,
            },
        }
    }
    Ok(images)
}

fn decode_b64(v: &Value, what: &str) -> Result<Bytes, ApiError> {
    let Value::String(s) = v else {
        return Err(ApiError::Malformed(format!(
            "{what} must be a base64 string"
        )));
    };
    // Accept data URLs as browsers produce them.
    let s = match s.strip_prefix("data:") {
        Some(rest) => rest.split_once(',').map(|(_, d)| d).unwrap_or(""),
        None => s.as_str(),
    };
    let clean: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(clean.as_bytes())
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(clean.as_bytes()))
        .map(Bytes::from)
        .map_err(|e| ApiError::Malformed(format!("{what} is not valid base64: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_name_the_field_and_range() {
        let mut o = RawOptions::default();
        o.set_text("beam_size", "0".into()).unwrap();
        let e = o.resolve(&GenOptions::default()).unwrap_err();
        assert!(
            matches!(&e, ApiError::InvalidOption { field, message } if field == "beam_size" && message.contains("between 1 and 16")),
            "{e:?}"
        );
        let mut o = RawOptions::default();
        o.set_text("temperature", "hot".into()).unwrap();
        let e = o.resolve(&GenOptions::default()).unwrap_err().to_string();
        assert!(e.starts_with("temperature:"), "{e}");
        let mut o = RawOptions::default();
        assert!(o
            .set_text("beams", "3".into())
            .unwrap_err()
            .to_string()
            .contains("unknown option"));
        // A huge unknown name comes back cut, never whole.
        let long = "x".repeat(1 << 20);
        let e = o.set_text(&long, "1".into()).unwrap_err().to_string();
        assert!(e.len() < 2000, "{} bytes", e.len());
    }

    #[test]
    fn n_follows_the_strategy() {
        use crate::options::Strategy;
        let mut o = RawOptions::default();
        o.set_text("strategy", "greedy".into()).unwrap();
        let r = o
            .resolve(&GenOptions {
                n: 3,
                ..Default::default()
            })
            .unwrap();
        assert_eq!((r.strategy, r.n), (Strategy::Greedy, 1));
        o.set_text("n", "2".into()).unwrap();
        assert_eq!(
            o.resolve(&GenOptions::default()).unwrap_err().to_string(),
            "n: must be 1 for greedy decoding"
        );
    }

    #[test]
    fn base64_and_data_urls() {
        let mut o = RawOptions::default();
        let imgs = parse_json(
            br#"{"image": "data:image/png;base64,aGVsbG8=", "beam_size": 3}"#,
            4,
            &mut o,
        )
        .unwrap();
        assert_eq!(&imgs[0][..], b"hello");
        assert_eq!(o.resolve(&GenOptions::default()).unwrap().beam_size, 3);
        assert!(matches!(
            parse_json(br#"{"image": "%%%"}"#, 4, &mut o),
            Err(ApiError::Malformed(_))
        ));
        assert!(matches!(
            parse_json(b"[1]", 4, &mut o),
            Err(ApiError::Malformed(_))
        ));
    }
}
