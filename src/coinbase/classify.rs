//! Turning HTTP outcomes into [`Error`]s: which are transient, which are fatal.
//!
//! 5xx, 408 and 429 are transient, other 4xx fatal; timeouts and connection failures are
//! transient, malformed bodies fatal (the split of reqwest-retry). A 429 may carry an HTML
//! body, so nothing here assumes JSON. A 3xx is refused, never followed: the client is built
//! with `redirect::Policy::none()`, and an answer from another URL would not be an answer to
//! the request. Error messages quote only the JSON fields `message`, `error_details` or
//! `error`, [`scrub`]bed of anything that looks like a token; never the raw body.

use std::time::Duration;

use reqwest::header::HeaderMap;
use time::{
    OffsetDateTime, PrimitiveDateTime, format_description::well_known::Rfc2822, macros::format_description,
};

use crate::{
    coinbase::wire::ErrorBody,
    error::{Error, scrub, truncate},
};

/// Classify a non-success response. `max_wait` bounds any wait read from its headers.
pub(crate) fn classify_status(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    now_unix: u64,
    max_wait: Duration,
) -> Error {
    if (300..400).contains(&status) {
        return Error::Upstream {
            status,
            message: "redirect refused: tickshare does not follow redirects; check base_url".into(),
        };
    }
    let message = body_message(body, headers);
    match status {
        429 => Error::RateLimited { retry_after: retry_after(headers, now_unix, max_wait), local: false },
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
/// note that the body was not JSON. Never the raw body of an HTML page, and never anything
/// token-like: a server may echo the request's `Authorization` header ([`scrub`]).
pub(crate) fn body_message(body: &[u8], headers: &HeaderMap) -> String {
    let quote = |s: &str| truncate(&scrub(s.trim()), 160);
    if let Ok(e) = serde_json::from_slice::<ErrorBody>(body) {
        for s in [e.message.as_str(), e.error_details.as_deref().unwrap_or(""), e.error.as_str()] {
            if !s.trim().is_empty() {
                return quote(s);
            }
        }
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        // v2 shape: {"errors":[{"id":..,"message":..}]}
        if let Some(m) = v.pointer("/errors/0/message").and_then(|m| m.as_str()) {
            return quote(m);
        }
    }
    let ct = headers.get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("unknown");
    if body.is_empty() {
        "empty body".into()
    } else {
        format!("non-JSON body ({}, {} bytes)", quote(ct), body.len())
    }
}

/// Above this, `x-ratelimit-reset` is UNIX milliseconds rather than seconds: 10^11 seconds
/// is the year 5138, 10^11 milliseconds March 1973.
const EPOCH_MILLIS_FROM: f64 = 1e11;
/// Above this (and below [`EPOCH_MILLIS_FROM`]), `x-ratelimit-reset` is UNIX seconds (2001 on);
/// below it, seconds to wait.
const EPOCH_SECONDS_FROM: f64 = 1e9;

/// The wait a 429 asks for, at most `max_wait`:
///
/// - `Retry-After` as delay-seconds or as an HTTP-date (IMF-fixdate, `Sun, 06 Nov 1994
///   08:49:37 GMT`, or any RFC 2822 date);
/// - else `x-ratelimit-reset` (its format is not documented), told apart by magnitude: UNIX
///   milliseconds above 10^11, UNIX seconds above 10^9, otherwise seconds to wait.
///
/// A time in the past is a wait of zero; an unreadable header is no wait at all (`None`).
pub(crate) fn retry_after(headers: &HeaderMap, now_unix: u64, max_wait: Duration) -> Option<Duration> {
    let text = |name: &str| headers.get(name)?.to_str().ok().map(str::trim);
    let num = |v: &str| v.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0);
    let now = now_unix as f64;
    let asked = text("retry-after").and_then(|v| num(v).or_else(|| Some(http_date(v)? as f64 - now)));
    let secs = if let Some(secs) = asked {
        secs
    } else {
        let reset = num(text("x-ratelimit-reset")?)?;
        if reset >= EPOCH_MILLIS_FROM {
            reset / 1000.0 - now
        } else if reset >= EPOCH_SECONDS_FROM {
            reset - now
        } else {
            reset
        }
    };
    // Clamped in f64 first: `from_secs_f64` panics beyond `Duration::MAX`.
    Some(Duration::from_secs_f64(secs.clamp(0.0, max_wait.as_secs_f64())))
}

/// An HTTP-date (RFC 9110 §5.6.7) as UNIX seconds: the IMF-fixdate every sender must use, or
/// any RFC 2822 date.
fn http_date(s: &str) -> Option<i64> {
    let imf = format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let t = PrimitiveDateTime::parse(s, imf)
        .map(PrimitiveDateTime::assume_utc)
        .or_else(|_| OffsetDateTime::parse(s, &Rfc2822))
        .ok()?;
    Some(t.unix_timestamp())
}

/// Classify an error met while reading a response body. The client decodes no content
/// encoding, so anything but a timeout is the connection failing mid-body (a body cut short,
/// a reset): a transport error, retryable, not a malformed body.
pub(crate) fn classify_body_read(e: reqwest::Error) -> Error {
    if e.is_timeout() {
        return Error::Timeout;
    }
    Error::Transport(truncate(&format!("response body cut short: {}", chain(&e.without_url())), 200))
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

    /// The cap the client had before `max_retry_after` (these rows predate it).
    const HOUR: Duration = Duration::from_secs(3600);

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
            let e = classify_status(*status, &none, body, 0, HOUR);
            assert_eq!(e.kind(), *kind, "{status}");
            assert_eq!(e.is_retryable(), *retryable, "{status}");
        }
        assert_eq!(
            classify_status(500, &none, json, 0, HOUR).to_string(),
            "upstream answered HTTP 500: boom"
        );
        let html = classify_status(
            503,
            &headers(&[("content-type", "text/html")]),
            b"<html>secret page</html>",
            0,
            HOUR,
        );
        assert!(!html.to_string().contains("secret page"));
        assert!(html.to_string().contains("non-JSON body (text/html"));
        assert!(
            classify_status(
                403,
                &none,
                br#"{"error":"PERMISSION_DENIED","error_details":"Missing required scopes"}"#,
                0,
                HOUR
            )
            .to_string()
            .contains("Missing required scopes")
        );
    }

    #[test]
    fn retry_after_headers() {
        assert_eq!(retry_after(&headers(&[("retry-after", "3")]), 0, HOUR), Some(Duration::from_secs(3)));
        assert_eq!(
            retry_after(&headers(&[("x-ratelimit-reset", "1700000005")]), 1_700_000_000, HOUR),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            retry_after(&headers(&[("x-ratelimit-reset", "2")]), 1_700_000_000, HOUR),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            retry_after(&headers(&[("x-ratelimit-reset", "1600000000")]), 1_700_000_000, HOUR),
            Some(Duration::ZERO)
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "99999999")]), 0, HOUR),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")]), 0, HOUR), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "-1")]), 0, HOUR), None);
        assert_eq!(retry_after(&HeaderMap::new(), 0, HOUR), None);
        let e = classify_status(429, &headers(&[("retry-after", "2")]), b"", 0, HOUR);
        assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
    }

    /// Issue 16: HTTP-dates, epoch milliseconds, the configurable cap, no overflow.
    #[test]
    fn retry_after_dates_millis_and_the_cap() {
        let now = 1_700_000_000; // Tue, 14 Nov 2023 22:13:20 GMT
        let min = Duration::from_secs(60);
        let wait = |pairs: &[(&str, &str)]| retry_after(&headers(pairs), now, min);
        assert_eq!(wait(&[("retry-after", "Tue, 14 Nov 2023 22:13:27 GMT")]), Some(Duration::from_secs(7)));
        assert_eq!(wait(&[("retry-after", "Tue, 14 Nov 2023 22:13:27 +0000")]), Some(Duration::from_secs(7)));
        assert_eq!(wait(&[("retry-after", "Tue, 14 Nov 2023 22:00:00 GMT")]), Some(Duration::ZERO), "past");
        assert_eq!(wait(&[("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")]), Some(min), "clamped");
        assert_eq!(wait(&[("x-ratelimit-reset", "1700000007500")]), Some(Duration::from_millis(7500)));
        assert_eq!(wait(&[("x-ratelimit-reset", "1700000007")]), Some(Duration::from_secs(7)));
        assert_eq!(wait(&[("x-ratelimit-reset", "7")]), Some(Duration::from_secs(7)));
        assert_eq!(wait(&[("x-ratelimit-reset", "99999999999999999999")]), Some(min));
        assert_eq!(wait(&[("retry-after", "1e308")]), Some(min));
        assert_eq!(wait(&[("retry-after", "3600")]), Some(min));
        // An unreadable Retry-After falls back to x-ratelimit-reset.
        assert_eq!(
            wait(&[("retry-after", "soon"), ("x-ratelimit-reset", "3")]),
            Some(Duration::from_secs(3))
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "5")]), now, Duration::ZERO), Some(Duration::ZERO));
    }

    #[test]
    fn redirects_are_refused_and_error_bodies_are_scrubbed() {
        let none = HeaderMap::new();
        for status in [301, 302, 303, 307, 308] {
            let e =
                classify_status(status, &headers(&[("location", "http://evil.example/?k=1")]), b"", 0, HOUR);
            assert!(matches!(e, Error::Upstream { status: s, .. } if s == status), "{e:?}");
            assert!(!e.is_retryable());
            assert!(e.to_string().contains("redirect refused") && !e.to_string().contains("evil"), "{e}");
        }
        let token = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJrIn0.c2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJl";
        let bodies = [
            format!(r#"{{"error":"UNAUTHENTICATED","message":"bad token Bearer {token}"}}"#),
            format!(r#"{{"error":"X","error_details":"{token}"}}"#),
            format!(r#"{{"error":"{token}"}}"#),
            format!(r#"{{"errors":[{{"id":"x","message":"{token}"}}]}}"#),
        ];
        for body in bodies {
            let e = classify_status(401, &none, body.as_bytes(), 0, HOUR);
            assert!(!format!("{e} {e:?}").contains("eyJ"), "{e:?}");
        }
        let e = classify_status(500, &headers(&[("content-type", token)]), b"x", 0, HOUR);
        assert!(!format!("{e} {e:?}").contains("eyJ"), "{e:?}");
    }
}
