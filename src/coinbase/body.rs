//! Reading a response within bounds: at most `max_body_bytes` of a success body, a few KiB of
//! an error body, and never the rest.
//!
//! A success body is read chunk by chunk ([`reqwest::Response::chunk`]) and abandoned as soon
//! as it would exceed the limit; a `Content-Length` above the limit fails before any of the
//! body is read. Dropping the response closes the connection, so an endless body costs at most
//! the limit plus what the socket buffers hold. An error body only feeds a short message, so
//! its first [`ERROR_BODY_BYTES`] are enough; reading it never fails the classification (a 429
//! whose body breaks off is still a 429).

use std::time::Duration;

use crate::{
    coinbase::classify,
    error::{Error, Result},
};

/// The most of an error (non-2xx) body that is read.
pub(crate) const ERROR_BODY_BYTES: usize = 16 * 1024;

/// The default of [`CoinbaseClientBuilder::max_body_bytes`](super::CoinbaseClientBuilder::max_body_bytes):
/// 4 MiB, about three times the full product list.
pub(crate) const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// The default of [`CoinbaseClientBuilder::max_retry_after`](super::CoinbaseClientBuilder::max_retry_after).
pub(crate) const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// What the client accepts from one response.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// The most bytes of a success body.
    pub(crate) max_body_bytes: usize,
    /// The longest wait a rate-limit header may ask for (and the longest backoff).
    pub(crate) max_retry_after: Duration,
}

/// The body of a 2xx response, or the classified error of any other.
///
/// # Errors
/// [`Error::Decode`] for a success body over `limits.max_body_bytes`; [`Error::Transport`] when
/// the connection fails mid-body (a body cut short); [`Error::Timeout`]; for a non-2xx
/// status, what [`classify::classify_status`] makes of it.
pub(crate) async fn read(mut resp: reqwest::Response, limits: Limits, now_unix: u64) -> Result<Vec<u8>> {
    let status = resp.status().as_u16();
    if !(200..300).contains(&status) {
        let body = read_prefix(&mut resp, ERROR_BODY_BYTES.min(limits.max_body_bytes)).await;
        return Err(classify::classify_status(
            status,
            resp.headers(),
            &body,
            now_unix,
            limits.max_retry_after,
        ));
    }
    let max = limits.max_body_bytes;
    let announced = resp.content_length();
    if announced.is_some_and(|n| n > max as u64) {
        return Err(too_large(max));
    }
    // Capacity from the (untrusted, but now bounded) announced length, at most 256 KiB ahead.
    let mut body = Vec::with_capacity(announced.map_or(0, |n| n as usize).min(256 * 1024));
    while let Some(chunk) = resp.chunk().await.map_err(classify::classify_body_read)? {
        if chunk.len() > max - body.len() {
            return Err(too_large(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Up to `cap` bytes of the body; a read error ends the body early.
async fn read_prefix(resp: &mut reqwest::Response, cap: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < cap {
        let Ok(Some(chunk)) = resp.chunk().await else { break };
        body.extend_from_slice(&chunk[..chunk.len().min(cap - body.len())]);
    }
    body
}

fn too_large(max: usize) -> Error {
    Error::Decode(format!("response body exceeds {max} bytes (max_body_bytes); the rest was not read"))
}
