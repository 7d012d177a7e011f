//! A Coinbase-shaped HTTP answer before it becomes a response: what the simulated exchange and
//! the proxy (features `sim`, `proxy`) both send, in the exchange's JSON shapes.

use serde::Serialize;

use super::wire::ErrorBody;

/// A response before it becomes HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) content_type: &'static str,
    pub(crate) body: Vec<u8>,
}

impl Reply {
    /// `value` as JSON, or a 500 when it cannot be encoded.
    pub(crate) fn json(status: u16, value: &impl Serialize) -> Reply {
        match serde_json::to_vec(value) {
            Ok(body) => Reply { status, content_type: "application/json", body },
            Err(_) => Reply::error(500, "INTERNAL", "could not encode the response"),
        }
    }

    /// A Coinbase-shaped error body (the observed v3 shape `{"error","error_details","message"}`).
    pub(crate) fn error(status: u16, error: &str, details: &str) -> Reply {
        let body = ErrorBody {
            error: error.to_string(),
            code: None,
            message: details.to_string(),
            error_details: Some(details.to_string()),
        };
        match serde_json::to_vec(&body) {
            Ok(body) => Reply { status, content_type: "application/json", body },
            Err(_) => Reply { status, content_type: "text/plain", body: details.as_bytes().to_vec() },
        }
    }

    /// A 400 `INVALID_ARGUMENT`.
    pub(crate) fn bad_request(details: &str) -> Reply {
        Reply::error(400, "INVALID_ARGUMENT", details)
    }

    /// A 404 `NOT_FOUND`.
    pub(crate) fn not_found(details: &str) -> Reply {
        Reply::error(404, "NOT_FOUND", details)
    }
}

/// Decode `%XX` escapes and `+`; invalid escapes stay as they are, invalid UTF-8 is replaced.
#[cfg(feature = "sim")]
pub(crate) fn percent_decode(s: &str) -> String {
    percent_decoded(s).into_owned()
}

/// [`percent_decode`], borrowing `s` when it has nothing to decode (most query values).
pub(crate) fn percent_decoded(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains(['%', '+']) {
        return std::borrow::Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = |j: usize| bytes.get(j).and_then(|c| (*c as char).to_digit(16));
        match b {
            b'%' => match (hex(i + 1), hex(i + 2)) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            _ => out.push(b),
        }
        i += 1;
    }
    std::borrow::Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}
