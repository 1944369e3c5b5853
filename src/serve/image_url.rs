//! Images named by URL in `/v1/chat/completions`: `data:` URIs always; `http://` URLs only
//! from hosts the operator listed (`image_url_hosts`), never from a private address unless the
//! operator allows it, without redirects, within a size and time limit.
use crate::config::ServerConfig;
use crate::serve::error::ApiError;
use base64::Engine;
use bytes::Bytes;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// The image an `image_url.url` names.
pub async fn load(url: &str, cfg: &ServerConfig) -> Result<Bytes, ApiError> {
    if let Some(rest) = url.strip_prefix("data:") {
        return data_uri(rest);
    }
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("https://") {
        return Err(ApiError::Malformed(
            "https image URLs are not fetched (this server has no TLS client); send the image as a data:image/...;base64, URI".into(),
        ));
    }
    if !lower.starts_with("http://") {
        return Err(ApiError::Malformed(
            "image_url.url must be a data:image/...;base64, URI (or an http:// URL of a host the server allows)".into(),
        ));
    }
    fetch(url, cfg).await
}

fn data_uri(rest: &str) -> Result<Bytes, ApiError> {
    let Some((meta, data)) = rest.split_once(',') else {
        return Err(ApiError::Malformed(
            "a data: URI needs a ',' before its data".into(),
        ));
    };
    let meta = meta.to_ascii_lowercase();
    if !meta.ends_with(";base64") {
        return Err(ApiError::Malformed(
            "image data: URIs must be base64 (data:image/png;base64,...)".into(),
        ));
    }
    let mime = meta.trim_end_matches(";base64");
    if !(mime.is_empty() || mime.starts_with("image/") || mime == "application/octet-stream") {
        return Err(ApiError::UnsupportedMedia(format!(
            "a data: URI of type {:?} is no image",
            crate::serve::validation::echo(mime)
        )));
    }
    let clean: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(clean.as_bytes())
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(clean.as_bytes()))
        .map_err(|e| ApiError::Malformed(format!("the image's base64 is not valid: {e}")))?;
    if bytes.is_empty() {
        return Err(ApiError::Malformed("the image is empty".into()));
    }
    Ok(Bytes::from(bytes))
}

async fn fetch(url: &str, cfg: &ServerConfig) -> Result<Bytes, ApiError> {
    let bad = |m: String| Err(ApiError::Malformed(m));
    let parsed = match reqwest::Url::parse(url) {
        Ok(u) => u,
        Err(e) => return bad(format!("image_url.url is not a URL: {e}")),
    };
    let Some(host) = parsed.host_str().map(|h| h.to_ascii_lowercase()) else {
        return bad("image_url.url has no host".into());
    };
    if !cfg
        .image_url_hosts
        .iter()
        .any(|h| h.eq_ignore_ascii_case(&host))
    {
        return bad(format!(
            "this server does not fetch images from {:?}; send the image as a data:image/...;base64, URI",
            crate::serve::validation::echo(&host)
        ));
    }
    let port = parsed.port_or_known_default().unwrap_or(80);
    let limit = Duration::from_millis(cfg.image_url_timeout_ms.max(1));
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let addrs: Vec<SocketAddr> =
        match tokio::time::timeout(limit, tokio::net::lookup_host((bare.as_str(), port))).await {
            Ok(Ok(a)) => a.collect(),
            Ok(Err(e)) => return bad(format!("cannot resolve {host:?}: {e}")),
            Err(_) => return bad(format!("resolving {host:?} took too long")),
        };
    let Some(first) = addrs.first().copied() else {
        return bad(format!("{host:?} resolves to no address"));
    };
    if !cfg.image_url_allow_private {
        if let Some(a) = addrs.iter().find(|a| !is_public(a.ip())) {
            return bad(format!(
                "{host:?} resolves to a non-public address ({}); the server does not fetch from its own network",
                a.ip()
            ));
        }
    }
    // Connect to the address just checked, so a second lookup cannot point elsewhere.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .resolve(&bare, first)
        .timeout(limit)
        .build()
        .map_err(|e| ApiError::Internal(format!("building the image fetcher: {e}")))?;
    let mut resp = match client.get(parsed).send().await {
        Ok(r) => r,
        Err(e) => return bad(format!("fetching the image failed: {e}")),
    };
    if resp.status().is_redirection() {
        return bad("the image URL redirects; redirects are not followed".into());
    }
    if !resp.status().is_success() {
        return bad(format!(
            "fetching the image failed: HTTP {}",
            resp.status().as_u16()
        ));
    }
    let max = cfg.max_body_bytes;
    if resp.content_length().is_some_and(|n| n as usize > max) {
        return Err(ApiError::TooLarge(format!(
            "the image at the URL is over {max} bytes"
        )));
    }
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if body.len() + c.len() > max {
                    return Err(ApiError::TooLarge(format!(
                        "the image at the URL is over {max} bytes"
                    )));
                }
                body.extend_from_slice(&c);
            }
            Ok(None) => break,
            Err(e) => return bad(format!("reading the image failed: {e}")),
        }
    }
    if body.is_empty() {
        return bad("the image at the URL is empty".into());
    }
    Ok(Bytes::from(body))
}

/// Whether an address is on the public internet: not loopback, private, link-local, shared
/// (CGNAT), documentation, benchmarking, multicast, broadcast or unspecified.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || (s[0] == 0x64 && s[1] == 0xff9b))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_special_addresses_are_not_public() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "198.18.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "2001:db8::1",
            "64:ff9b::7f00:1",
        ] {
            assert!(!is_public(a.parse().unwrap()), "{a}");
        }
        for a in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn data_uris_decode_and_name_what_is_wrong() {
        assert_eq!(
            &data_uri("image/png;base64,aGVsbG8=").unwrap()[..],
            b"hello"
        );
        assert!(matches!(
            data_uri("image/png,hello"),
            Err(ApiError::Malformed(m)) if m.contains("base64")
        ));
        assert!(matches!(
            data_uri("text/plain;base64,aGVsbG8="),
            Err(ApiError::UnsupportedMedia(_))
        ));
        assert!(matches!(
            data_uri("image/png;base64,%%%"),
            Err(ApiError::Malformed(_))
        ));
        assert!(matches!(
            data_uri("image/png;base64,"),
            Err(ApiError::Malformed(_))
        ));
    }
}
