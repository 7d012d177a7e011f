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
