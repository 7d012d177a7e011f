//! Turning HTTP outcomes into [`Error`]s: which are transient, which are fatal.
//!
//! 5xx, 408 and 429 are transient, other 4xx fatal; timeouts and connection failures are
//! transient, malformed bodies fatal (the split of reqwest-retry). A 429 may carry an HTML
//! body, so nothing here assumes JSON.

use std::time::Duration;

use reqwest::header::HeaderMap;

use crate::{coinbase::wire::ErrorBody, error::Error, error::truncate};

/// Classify a non-success response.
pub(crate) fn classify_status(status: u16, headers: &HeaderMap, body: &[u8], now_unix: u64) -> Error {
    let message = body_message(body, headers);
    match status {
        429 => Error::RateLimited { retry_after: retry_after(headers, now_unix), local: false },
        401 | 403 => Error::Unauthorized(message),
        404 => Error::NotFound(message),
        400 if looks_like_unknown_product(body) => Error::NotFound(message),
        _ => Error::Upstream { status, message },
    }
}

fn looks_like_unknown_product(body: &[u8]) -> bool {
    serde_json::from_slice::<ErrorBody>(body).is_ok_and(|e| {
        let all =
            format!("{} {} {}", e.error, e.message, e.error_details.unwrap_or_default()).to_ascii_lowercase();
        e.error.eq_ignore_ascii_case("NOT_FOUND")
            || all.contains("productid is invalid")
            || all.contains("product not found")
    })
}

/// A short message from an error body: the JSON `message`, `error_details` or `error`, or a
/// note that the body was not JSON. Never the raw body of an HTML page.
pub(crate) fn body_message(body: &[u8], headers: &HeaderMap) -> String {
    if let Ok(e) = serde_json::from_slice::<ErrorBody>(body) {
        for s in [e.message.as_str(), e.error_details.as_deref().unwrap_or(""), e.error.as_str()] {
            if !s.trim().is_empty() {
                return truncate(s.trim(), 160);
            }
        }
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        // v2 shape: {"errors":[{"id":..,"message":..}]}
        if let Some(m) = v.pointer("/errors/0/message").and_then(|m| m.as_str()) {
            return truncate(m, 160);
        }
    }
    let ct = headers.get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("unknown");
    if body.is_empty() {
        "empty body".into()
    } else {
        format!("non-JSON body ({}, {} bytes)", truncate(ct, 40), body.len())
    }
}

/// The wait a 429 asks for: `Retry-After` (seconds), else `x-ratelimit-reset` read as UNIX
/// seconds when it looks like an epoch and as seconds to wait otherwise (its format is not
/// documented). Capped at one hour so a bogus header cannot stall a client for days.
pub(crate) fn retry_after(headers: &HeaderMap, now_unix: u64) -> Option<Duration> {
    const CAP: u64 = 3600;
    let num = |name: &str| -> Option<f64> {
        let v = headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok()?;
        (v.is_finite() && v >= 0.0).then_some(v)
    };
    if let Some(secs) = num("retry-after") {
        return Some(Duration::from_secs_f64(secs.min(CAP as f64)));
    }
    let reset = num("x-ratelimit-reset")?;
    if reset > 1_000_000_000.0 {
        let wait = (reset - now_unix as f64).max(0.0);
        Some(Duration::from_secs_f64(wait.min(CAP as f64)))
    } else {
        Some(Duration::from_secs_f64(reset.min(CAP as f64)))
    }
}

/// Classify a reqwest error. URLs (which may carry query strings) are removed first.
pub(crate) fn classify_transport(e: reqwest::Error) -> Error {
    if e.is_timeout() {
        return Error::Timeout;
    }
    if e.is_decode() {
        return Error::decode(chain(&e.without_url()));
    }
    if e.is_builder() {
        return Error::Config(truncate(&chain(&e.without_url()), 200));
    }
    Error::Transport(truncate(&chain(&e.without_url()), 200))
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let m = inner.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn status_table() {
        let json = br#"{"error":"X","message":"boom"}"#;
        let none = HeaderMap::new();
        let rows: &[(u16, &[u8], &str, bool)] = &[
            (429, json, "rate_limited", true),
            (429, b"<html> <head> <title>Coinbase</title></head></html>", "rate_limited", true),
            (401, json, "unauthorized", false),
            (403, br#"{"error":"PERMISSION_DENIED","error_details":"Missing required scopes","message":""}"#, "unauthorized", false),
            (404, json, "not_found", false),
            (400, br#"{"error":"INVALID_ARGUMENT","error_details":"ProductID is invalid","message":"ProductID is invalid"}"#, "not_found", false),
            (400, json, "upstream", false),
            (408, json, "upstream", true),
            (500, json, "upstream", true),
            (502, b"", "upstream", true),
            (503, b"<html>down</html>", "upstream", true),
        ];
        for (status, body, kind, retryable) in rows {
            let e = classify_status(*status, &none, body, 0);
            assert_eq!(e.kind(), *kind, "{status}");
            assert_eq!(e.is_retryable(), *retryable, "{status}");
        }
        assert_eq!(classify_status(500, &none, json, 0).to_string(), "upstream answered HTTP 500: boom");
        let html =
            classify_status(503, &headers(&[("content-type", "text/html")]), b"<html>secret page</html>", 0);
        assert!(!html.to_string().contains("secret page"));
        assert!(html.to_string().contains("non-JSON body (text/html"));
        assert!(
            classify_status(
                403,
                &none,
                br#"{"error":"PERMISSION_DENIED","error_details":"Missing required scopes"}"#,
                0
            )
            .to_string()
            .contains("Missing required scopes")
        );
    }

    #[test]
    fn retry_after_headers() {
        assert_eq!(retry_after(&headers(&[("retry-after", "3")]), 0), Some(Duration::from_secs(3)));
        assert_eq!(
            retry_after(&headers(&[("x-ratelimit-reset", "1700000005")]), 1_700_000_000),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            retry_after(&headers(&[("x-ratelimit-reset", "2")]), 1_700_000_000),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            retry_after(&headers(&[("x-ratelimit-reset", "1600000000")]), 1_700_000_000),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "99999999")]), 0), Some(Duration::from_secs(3600)));
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")]), 0), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "-1")]), 0), None);
        assert_eq!(retry_after(&HeaderMap::new(), 0), None);
        let e = classify_status(429, &headers(&[("retry-after", "2")]), b"", 0);
        assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
    }
}
