//! Shared helpers of the integration tests: an HTTP client fit for paused time, a throwaway
//! JWT, and a fixed clock.

// Not every test module uses every helper; helpers panic on purpose (a failed request fails
// the test).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use reqwest::{StatusCode, header::HeaderMap};
use tickshare::Clock;
use time::macros::datetime;

/// A plain reqwest client without timers (no timeout, no idle-pool timer), so that a paused
/// tokio clock only moves when a test or the simulator sleeps.
pub(crate) fn http() -> reqwest::Client {
    reqwest::Client::builder().pool_idle_timeout(None).build().expect("reqwest client")
}

/// A well-formed but unsigned-by-anyone JWT: what a sim without a public key accepts.
pub(crate) fn any_jwt() -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256","kid":"k","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(br#"{"sub":"k","iss":"cdp"}"#);
    let sig = URL_SAFE_NO_PAD.encode([7u8; 64]);
    format!("{header}.{claims}.{sig}")
}

/// A clock starting at 2024-04-24T09:56:38Z, following tokio's clock.
pub(crate) fn fixed_clock() -> Clock {
    Clock::starting_at(datetime!(2024-04-24 09:56:38 UTC))
}

/// One response, read whole.
#[derive(Debug)]
pub(crate) struct Got {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Vec<u8>,
}

impl Got {
    /// The body as JSON.
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    /// A header as a string.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// GET `url`, with `Authorization: Bearer <jwt>` when given.
pub(crate) async fn get(client: &reqwest::Client, url: &str, jwt: Option<&str>) -> Got {
    let mut req = client.get(url);
    if let Some(jwt) = jwt {
        req = req.bearer_auth(jwt);
    }
    let resp = req.send().await.expect("request");
    Got {
        status: resp.status(),
        headers: resp.headers().clone(),
        body: resp.bytes().await.expect("body").to_vec(),
    }
}

/// Candle calls, public and private.
pub(crate) fn candle_calls(s: &tickshare::sim::SimStats) -> u64 {
    use tickshare::sim::Endpoint;
    s.calls(Endpoint::MarketCandles) + s.calls(Endpoint::Candles)
}

/// Wait (on tokio's clock, in 10 ms steps) until `f` holds; fail after `limit`.
pub(crate) async fn until(what: &str, limit: std::time::Duration, mut f: impl FnMut() -> bool) {
    let t0 = tokio::time::Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Sleep on tokio's clock until `clock` reads `t`.
pub(crate) async fn sleep_until_utc(clock: Clock, t: time::OffsetDateTime) {
    tokio::time::sleep_until(clock.instant_at(t)).await;
}

/// The candles of `candles` closed at `now`.
pub(crate) fn closed(
    candles: &[tickshare::Candle],
    now: time::OffsetDateTime,
    g: tickshare::Granularity,
) -> Vec<tickshare::Candle> {
    candles.iter().filter(|c| g.is_closed(c.start, now)).copied().collect()
}

/// Send `requests` (whole HTTP/1.1 requests) one after another on **one** TCP connection to
/// `addr`, each after the previous answer, and return each answer's status, or `None` for a
/// request the server did not answer on that connection (it closed it). What a client that
/// does not retry on a fresh connection (Python's `requests`, the official SDK) sees.
pub(crate) async fn on_one_connection(addr: std::net::SocketAddr, requests: &[String]) -> Vec<Option<u16>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for req in requests {
        // The head, then (a moment later, as Python's http.client sends them) the body: the
        // server has the head alone when it answers.
        let split = req.find("\r\n\r\n").map_or(req.len(), |i| i + 4);
        let (head, body) = req.split_at(split);
        if stream.write_all(head.as_bytes()).await.is_err() {
            out.push(None);
            continue;
        }
        if !body.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            if stream.write_all(body.as_bytes()).await.is_err() {
                out.push(None);
                continue;
            }
        }
        // Read one response: the head, then content-length bytes.
        let status = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok());
                    buf.drain(..end + 4 + len);
                    break status;
                }
            }
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        out.push(status);
    }
    out
}

/// A GET as the official Python SDK sends it: JSON content type and a `{}` body.
pub(crate) fn sdk_style_get(host: &str, path_and_query: &str, jwt: &str) -> String {
    format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: coinbase-advanced-py/1.8.4\r\n\
         Accept: */*\r\nConnection: keep-alive\r\nContent-Type: application/json\r\n\
         Authorization: Bearer {jwt}\r\nContent-Length: 2\r\n\r\n{{}}"
    )
}
