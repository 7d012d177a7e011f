//! What the simulated exchange counts, and the [`SimStats`] snapshot it hands out.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

use super::Endpoint;
use crate::model::{Granularity, ProductId};

/// How many candle requests [`SimStats::recent_candle_requests`] keeps (the oldest are dropped).
pub const CANDLE_LOG_CAPACITY: usize = 1024;

/// A count per endpoint class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PerClass {
    /// Public endpoints (`/market/...` and `/time`).
    pub public: u64,
    /// Private endpoints (JWT required).
    pub private: u64,
}

/// One served candle request, as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CandleRequest {
    /// Counter name of the endpoint: `"market/candles"` (public) or `"candles"` (private).
    pub endpoint: &'static str,
    /// The product.
    pub product: ProductId,
    /// The granularity.
    pub granularity: Granularity,
    /// The `start` parameter, UNIX seconds.
    pub start: i64,
    /// The `end` parameter, UNIX seconds.
    pub end: i64,
    /// The `limit` parameter, if sent.
    pub limit: Option<u32>,
}

/// A snapshot of the exchange's counters, from [`SimHandle::stats`](super::SimHandle::stats)
/// or `GET /__sim/stats` (as JSON).
///
/// Every request to a Coinbase path counts once in `total_calls` and in
/// `calls_by_endpoint`, whatever its outcome (200, 4xx, 429, injected fault). Requests
/// refused while the exchange is down and the `/__sim` control paths are not counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SimStats {
    /// Requests per endpoint name (see [`Endpoint::name`]; paths that match no endpoint count
    /// as `"unknown"`). Every name is present, with 0 when never called.
    pub calls_by_endpoint: BTreeMap<String, u64>,
    /// All requests to Coinbase paths.
    pub total_calls: u64,
    /// 429 answers sent, by the rate limiter or by an injected fault.
    pub rate_limited_429: u64,
    /// 401 answers sent to private requests without a valid JWT.
    pub auth_failures: u64,
    /// Requests whose answer an injected fault replaced or damaged (latency alone not counted).
    pub faults_injected: u64,
    /// Connections closed unanswered because the exchange was down.
    pub connections_dropped_while_down: u64,
    /// Responses by HTTP status (injected faults included; resets not).
    pub responses_by_status: BTreeMap<u16, u64>,
    /// The most requests of each class received (accepted or not) in any sliding one-second
    /// window `(t - 1 s, t]`.
    pub max_requests_in_any_1s: PerClass,
    /// The most recent candle requests that reached the candle handler with valid parameters,
    /// oldest first (at most [`CANDLE_LOG_CAPACITY`]).
    pub recent_candle_requests: Vec<CandleRequest>,
}

impl SimStats {
    /// Calls to `endpoint`.
    pub fn calls(&self, endpoint: Endpoint) -> u64 {
        self.calls_by_endpoint.get(endpoint.name()).copied().unwrap_or(0)
    }

    /// Responses with HTTP `status`.
    pub fn responses(&self, status: u16) -> u64 {
        self.responses_by_status.get(&status).copied().unwrap_or(0)
    }
}

/// The mutable counters behind [`SimStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    calls: [u64; Endpoint::ALL.len()],
    unknown: u64,
    rate_limited_429: u64,
    auth_failures: u64,
    faults_injected: u64,
    dropped_while_down: u64,
    by_status: BTreeMap<u16, u64>,
    candles: VecDeque<CandleRequest>,
}

impl Counters {
    pub(crate) fn call(&mut self, endpoint: Option<Endpoint>) {
        match endpoint {
            Some(e) => self.calls[e.index()] += 1,
            None => self.unknown += 1,
        }
    }

    pub(crate) fn status(&mut self, status: u16) {
        *self.by_status.entry(status).or_default() += 1;
        if status == 429 {
            self.rate_limited_429 += 1;
        }
    }

    pub(crate) fn auth_failure(&mut self) {
        self.auth_failures += 1;
    }

    pub(crate) fn fault(&mut self) {
        self.faults_injected += 1;
    }

    pub(crate) fn dropped_while_down(&mut self) {
        self.dropped_while_down += 1;
    }

    pub(crate) fn candle_request(&mut self, request: CandleRequest) {
        if self.candles.len() >= CANDLE_LOG_CAPACITY {
            self.candles.pop_front();
        }
        self.candles.push_back(request);
    }

    pub(crate) fn snapshot(&self, max_in_1s: PerClass) -> SimStats {
        let mut calls_by_endpoint: BTreeMap<String, u64> =
            Endpoint::ALL.iter().map(|e| (e.name().to_string(), self.calls[e.index()])).collect();
        calls_by_endpoint.insert("unknown".into(), self.unknown);
        SimStats {
            total_calls: calls_by_endpoint.values().sum(),
            calls_by_endpoint,
            rate_limited_429: self.rate_limited_429,
            auth_failures: self.auth_failures,
            faults_injected: self.faults_injected,
            connections_dropped_while_down: self.dropped_while_down,
            responses_by_status: self.by_status.clone(),
            max_requests_in_any_1s: max_in_1s,
            recent_candle_requests: self.candles.iter().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_lists_every_endpoint_and_serializes() {
        let mut c = Counters::default();
        c.call(Some(Endpoint::MarketTicker));
        c.call(Some(Endpoint::MarketTicker));
        c.call(Some(Endpoint::Accounts));
        c.call(None);
        c.status(429);
        c.status(200);
        let s = c.snapshot(PerClass { public: 2, private: 1 });
        assert_eq!(s.total_calls, 4);
        assert_eq!(s.calls(Endpoint::MarketTicker), 2);
        assert_eq!(s.calls(Endpoint::Ticker), 0);
        assert_eq!(s.calls_by_endpoint.len(), Endpoint::ALL.len() + 1);
        assert_eq!((s.rate_limited_429, s.responses(200)), (1, 1));
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["calls_by_endpoint"]["market/ticker"], 2);
        assert_eq!(json["max_requests_in_any_1s"]["public"], 2);
        assert_eq!(json["responses_by_status"]["429"], 1);
    }

    #[test]
    fn candle_log_is_bounded() {
        let mut c = Counters::default();
        for i in 0..(CANDLE_LOG_CAPACITY as i64 + 5) {
            c.candle_request(CandleRequest {
                endpoint: "candles",
                product: "BTC-USD".parse().unwrap(),
                granularity: Granularity::OneMinute,
                start: i,
                end: i,
                limit: None,
            });
        }
        let s = c.snapshot(PerClass::default());
        assert_eq!(s.recent_candle_requests.len(), CANDLE_LOG_CAPACITY);
        assert_eq!(s.recent_candle_requests[0].start, 5);
    }
}
