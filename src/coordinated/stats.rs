//! The coordinated source's exact counters (our own atomics, not the cache's eventually
//! consistent ones) and the serializable snapshot a host can serve as JSON.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{BreakerStats, CloseRefreshStats};
use crate::{
    coinbase::Endpoint,
    error::Error,
    limiter::{LimiterStats, Priority},
    util::{inc, lock},
};

/// The upstream operations of a source, for per-operation counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Ticker = 0,
    Tickers = 1,
    Candles = 2,
    Accounts = 3,
}

impl Op {
    pub(crate) const ALL: [Op; 4] = [Op::Ticker, Op::Tickers, Op::Candles, Op::Accounts];
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Op::Ticker => "ticker",
            Op::Tickers => "tickers",
            Op::Candles => "candles",
            Op::Accounts => "accounts",
        }
    }

    /// The REST endpoint that serves the operation.
    pub(crate) const fn endpoint(self) -> Endpoint {
        match self {
            Op::Ticker => Endpoint::Ticker,
            Op::Tickers => Endpoint::BestBidAsk,
            Op::Candles => Endpoint::Candles,
            Op::Accounts => Endpoint::Accounts,
        }
    }

    /// The rate-limiter priority of the operation: its endpoint's ([`Endpoint::priority`]).
    pub(crate) const fn priority(self) -> Priority {
        self.endpoint().priority()
    }
}

const LATENCY_SAMPLES: usize = 2048;

/// The live counters of a coordinated source.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) upstream: [AtomicU64; 4],
    pub(crate) cache_hits: AtomicU64,
    pub(crate) cache_misses: AtomicU64,
    pub(crate) coalesced: AtomicU64,
    pub(crate) batch_calls: AtomicU64,
    pub(crate) batched_products: AtomicU64,
    pub(crate) negative_hits: AtomicU64,
    pub(crate) stale_serves: AtomicU64,
    pub(crate) revalidations: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) rate_limit_errors: AtomicU64,
    pub(crate) candles_fetched: AtomicU64,
    pub(crate) deadline_misses: AtomicU64,
    pub(crate) live_patches: AtomicU64,
    pub(crate) in_progress_refetches: AtomicU64,
    pub(crate) provisional_serves: AtomicU64,
    pub(crate) errors: [AtomicU64; Error::KINDS.len()],
    latencies_us: Mutex<VecDeque<u64>>,
}

impl Counters {
    /// Upstream calls of every operation: `snapshot().upstream_calls` without the snapshot.
    pub(crate) fn upstream_total(&self) -> u64 {
        self.upstream.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }

    /// Candle reads answered with a provisional last candle so far.
    pub(crate) fn provisional_reads(&self) -> u64 {
        self.provisional_serves.load(Ordering::Relaxed)
    }

    /// `(hits, misses)` of cache reads so far.
    pub(crate) fn cache_reads(&self) -> (u64, u64) {
        (self.cache_hits.load(Ordering::Relaxed), self.cache_misses.load(Ordering::Relaxed))
    }

    pub(crate) fn upstream_call(&self, op: Op, latency: Duration) {
        inc(&self.upstream[op as usize]);
        let mut l = lock(&self.latencies_us);
        if l.len() == LATENCY_SAMPLES {
            l.pop_front();
        }
        l.push_back(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }

    pub(crate) fn error(&self, e: &Error) {
        inc(&self.errors[e.kind_index()]);
        if matches!(e, Error::RateLimited { local: false, .. }) {
            inc(&self.rate_limit_errors);
        }
    }

    pub(crate) fn snapshot(&self, limiter: Option<LimiterStats>) -> CoordinatedStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let upstream_calls_by_endpoint: BTreeMap<String, u64> =
            Op::ALL.iter().map(|op| (op.as_str().to_string(), get(&self.upstream[*op as usize]))).collect();
        let hits = get(&self.cache_hits);
        let misses = get(&self.cache_misses);
        let batch_calls = get(&self.batch_calls);
        let batched = get(&self.batched_products);
        let errors_by_kind = Error::KINDS
            .iter()
            .zip(self.errors.iter())
            .filter(|(_, n)| get(n) > 0)
            .map(|(k, n)| (k.to_string(), get(n)))
            .collect();
        let mut lat: Vec<u64> = lock(&self.latencies_us).iter().copied().collect();
        lat.sort_unstable();
        let pct = |p: f64| -> f64 {
            if lat.is_empty() {
                return 0.0;
            }
            let idx = ((lat.len() as f64 - 1.0) * p).round() as usize;
            lat[idx.min(lat.len() - 1)] as f64 / 1000.0
        };
        CoordinatedStats {
            upstream_calls: upstream_calls_by_endpoint.values().sum(),
            upstream_calls_by_endpoint,
            cache_hits: hits,
            cache_misses: misses,
            hit_rate: if hits + misses == 0 { 0.0 } else { hits as f64 / (hits + misses) as f64 },
            coalesced_waiters: get(&self.coalesced),
            batch_calls,
            batched_products: batched,
            avg_products_per_batch: if batch_calls == 0 { 0.0 } else { batched as f64 / batch_calls as f64 },
            negative_cache_hits: get(&self.negative_hits),
            stale_serves: get(&self.stale_serves),
            revalidations: get(&self.revalidations),
            retries: get(&self.retries),
            rate_limit_errors: get(&self.rate_limit_errors),
            candles_fetched: get(&self.candles_fetched),
            deadline_misses: get(&self.deadline_misses),
            live_patches: get(&self.live_patches),
            in_progress_refetches: get(&self.in_progress_refetches),
            provisional_serves: get(&self.provisional_serves),
            close_refresh: CloseRefreshStats::default(),
            errors_by_kind,
            upstream_latency_ms: LatencyStats {
                samples: lat.len() as u64,
                p50: pct(0.50),
                p90: pct(0.90),
                p99: pct(0.99),
                max: lat.last().map(|m| *m as f64 / 1000.0).unwrap_or(0.0),
            },
            limiter,
            breaker: BreakerStats::default(),
            cache_entries: 0,
        }
    }
}

/// Upstream latency percentiles over the most recent calls (up to 2,048), milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyStats {
    /// Number of samples.
    pub samples: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest.
    pub max: f64,
}

/// A snapshot of a [`CoordinatedSource`](crate::CoordinatedSource)'s counters. Counts are
/// exact and monotonic since the source was built.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CoordinatedStats {
    /// Upstream calls (each one HTTP request to the exchange when the upstream is a
    /// [`CoinbaseClient`](crate::CoinbaseClient)), all endpoints.
    pub upstream_calls: u64,
    /// Upstream calls by operation: `ticker`, `tickers` (one batched call: `products` or
    /// `best_bid_ask`, see [`TickerBatch`](crate::TickerBatch)), `candles`, `accounts`.
    pub upstream_calls_by_endpoint: BTreeMap<String, u64>,
    /// Reads answered from fresh cache.
    pub cache_hits: u64,
    /// Reads that needed the upstream (or joined a fetch in flight).
    pub cache_misses: u64,
    /// `cache_hits / (cache_hits + cache_misses)`, 0 when there were no reads.
    pub hit_rate: f64,
    /// Reads that joined a fetch already in flight instead of starting one.
    pub coalesced_waiters: u64,
    /// Batched ticker calls.
    pub batch_calls: u64,
    /// Products requested through batched ticker calls.
    pub batched_products: u64,
    /// `batched_products / batch_calls`.
    pub avg_products_per_batch: f64,
    /// Reads refused from the negative cache (an unknown product seen recently).
    pub negative_cache_hits: u64,
    /// Reads answered with stale data because the upstream failed.
    pub stale_serves: u64,
    /// Background refreshes started by stale-while-revalidate.
    pub revalidations: u64,
    /// Upstream calls retried.
    pub retries: u64,
    /// 429 answers from the exchange.
    pub rate_limit_errors: u64,
    /// Candles received from the upstream.
    pub candles_fetched: u64,
    /// Reads that gave up waiting for the upstream at their deadline
    /// ([`ReadOptions::deadline`](crate::ReadOptions::deadline)) and answered stale or
    /// [`Error::Timeout`](crate::Error::Timeout) while the fetch went on.
    pub deadline_misses: u64,
    /// Candles in progress moved by a newer last-trade price, at no upstream call
    /// ([`InProgressCandle::Live`](crate::InProgressCandle::Live)).
    pub live_patches: u64,
    /// Series refreshed because their candle in progress was older than
    /// `in_progress_max_age` ([`InProgressCandle::Exact`](crate::InProgressCandle::Exact)):
    /// each one upstream call, also counted in `upstream_calls`.
    pub in_progress_refetches: u64,
    /// Candle reads answered with their last candle provisional
    /// ([`Fresh::provisional`](crate::Fresh::provisional)): its bucket had closed and the
    /// series' refresh had not landed ([`AfterClose`](crate::AfterClose)).
    #[serde(default)]
    pub provisional_serves: u64,
    /// The background refreshes of series after their candle closed, and how long after each
    /// recent close the last series became exact.
    #[serde(default)]
    pub close_refresh: CloseRefreshStats,
    /// Upstream errors by [`Error::kind`](crate::Error::kind).
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Upstream latency.
    pub upstream_latency_ms: LatencyStats,
    /// The rate limiter's counters, when the source knows its limiter.
    pub limiter: Option<LimiterStats>,
    /// The circuit breaker of each endpoint class: state, openings, refusals, probes.
    pub breaker: BreakerStats,
    /// Entries held by the ticker, candle-series and unknown-product caches, each bounded by
    /// `cache_capacity`. moka's count: approximate, it may lag behind the latest inserts.
    pub cache_entries: u64,
}
