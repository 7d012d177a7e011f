//! One coordinated market-data layer between many trading bots and Coinbase Advanced Trade.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use tickshare::{CoordinatedSource, MarketDataSource, sim::SimExchange};
//! let sim = SimExchange::builder().start().await?;          // or the real API: CoinbaseClient::builder()
//! let source = CoordinatedSource::coinbase(sim.client()?).build()?;
//! let products = sim.products();
//! let tickers = source.tickers(&products).await?;             // one batched upstream call
//! assert_eq!(tickers.len(), products.len());
//! assert_eq!(source.stats().upstream_calls, 1);
//! # Ok(()) }
//! ```
//!
//! # Overview
//!
//! Bots read market data through the [`MarketDataSource`] trait. [`DirectSource`] is the legacy
//! path (every call goes to the exchange); [`CoordinatedSource`] serves any number of bots with
//! the fewest upstream calls: a cache whose freshness follows tokio's clock, single-flight for
//! identical requests, batching of ticker requests into one `best_bid_ask` call, incremental
//! candle refreshes, stale data served (and flagged) when the exchange fails, and stats. Both sit
//! on [`CoinbaseClient`], whose [`RateLimiter`] never lets a request out that would exceed the
//! exchange's limit. [`BatchEvaluator`] fetches one [`MarketSnapshot`] per tick and evaluates
//! every [`Bot`]'s [`Strategy`] on it; [`SourceSelector`] routes each bot to the legacy or the
//! coordinated path under [`MigrationFlags`] (global switch, allowlist, percentage rollout,
//! shadow mode, hot reload, kill switch).
//!
//! # Architecture
//!
//! ```text
//! bot ─► BatchEvaluator ─► SourceSelector ─┬─ legacy ──► DirectSource ─────────────────────┐
//!                                          └─ coordinated ► CoordinatedSource               ├─► CoinbaseClient ─► exchange
//!                                              cache ► single-flight ► batcher ► upstream ──┘   (JWT, RateLimiter)
//! ```
//!
//! # Layout
//!
//! Each concern has the file named after it (the README's Architecture section has the table):
//!
//! - `source.rs`: the [`MarketDataSource`] trait; `direct.rs`: [`DirectSource`].
//! - `coordinated.rs`: [`CoordinatedSource`]'s read paths; beside it `coordinated/config.rs`
//!   (config and builder), `cache.rs`, `coalesce.rs` (single-flight), `batch.rs`, `series.rs`
//!   (incremental candles), `upstream.rs` (the one way out: breaker, gate, outcome, retries),
//!   `breaker.rs`, `stats.rs`, `feed.rs` (what the stream pushes).
//! - `retry.rs`: [`RetryPolicy`], used by every layer that retries.
//! - `limiter.rs` with `limiter/{config,queue}.rs`: [`RateLimiter`]; `clock.rs`: [`Clock`] and
//!   governor's clock adapter.
//! - `coinbase.rs` with `coinbase/{builder,auth,body,classify,validate,reply,wire}.rs`:
//!   [`CoinbaseClient`].
//! - `error.rs`: [`Error`] and every classification of it.
//! - `evaluator.rs`, `strategy.rs`, `schedule.rs`, `flags.rs`, `selector.rs`: the bots' side.
//! - `stream.rs`, `redis.rs`, `sim.rs` (features `stream`, `redis`, `sim`), each with a folder.
//! - `util.rs`: crate plumbing (`lock`, counters, duration serde, builder setters).
//!
//! # Crate features
//!
//! | feature | default | adds |
//! |---|---|---|
//! | `sim` | off | [`sim`]: the simulated Coinbase exchange on loopback, for tests, examples, benches |
//! | `mock` | off | `MockMarketDataSource` (mockall) for host applications' unit tests |
//! | `stream` | off (on with `sim`) | [`MarketStream`]: Coinbase's market-data WebSocket feed keeping a [`CoordinatedSource`] hot |
//! | `redis` | off | [`SharedTier`]: a shared tier on Redis so that many worker processes on one API key act as one client |
//! | `proxy` | off | `proxy::Proxy`: a local Coinbase-compatible caching proxy, so bots in any language share one [`CoordinatedSource`] by changing their base URL |
//! | `metrics` | off | `metrics::publish`: the stats through the `metrics` facade ([`metrics::prometheus_text`] needs no feature) |
//!
//! # Testing with time
//!
//! Everything that waits or expires uses [`tokio::time`]: cache freshness (stored as tokio
//! instants, because moka's own clock ignores `tokio::time::pause`), the rate limiter (a governor
//! clock adapter over tokio's clock, because governor's `until_ready` sleeps in real time),
//! retries, batch windows and the simulated exchange. Run the simulated exchange on the test's
//! own runtime (it spawns there) and use `#[tokio::test(start_paused = true)]`: hours of ticks
//! then take milliseconds and every count is exact. Wall-clock times (candle boundaries) come
//! from a [`Clock`] that follows tokio's clock; only JWT `nbf`/`exp` read the system time.
//!
//! # Minimum supported Rust version
//!
//! Tested on the current stable Rust (1.95). No older toolchain is checked in CI, so no
//! `rust-version` is declared yet.

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod blocking;
mod clock;
pub mod coinbase;
mod coordinated;
mod direct;
mod error;
mod evaluator;
mod flags;
mod limiter;
pub mod metrics;
mod model;
#[cfg(feature = "proxy")]
#[cfg_attr(docsrs, doc(cfg(feature = "proxy")))]
pub mod proxy;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
mod retry;
mod schedule;
mod selector;
#[cfg(feature = "sim")]
#[cfg_attr(docsrs, doc(cfg(feature = "sim")))]
pub mod sim;
mod source;
mod util;

mod strategy;
#[cfg(feature = "stream")]
#[cfg_attr(docsrs, doc(cfg(feature = "stream")))]
pub mod stream;

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::{
    CallProfile, SharedLimiterStats, SharedTier, SharedTierBuilder, SharedTierConfig, SharedTierStats,
    TierMode,
};
pub use clock::Clock;
pub use coinbase::{
    ClientStats, CoinbaseClient, CoinbaseClientBuilder, Credentials, MarketDataPath, TickerBatch,
};
pub use coordinated::{
    AfterClose, BreakerConfig, BreakerState, BreakerStats, CandleFidelity, CandleMarks, ClassBreakerStats,
    CloseRefreshStats, CloseSettlement, CoordinatedBuilder, CoordinatedConfig, CoordinatedSource,
    CoordinatedStats, Fresh, InProgress, InProgressCandle, LatencyStats, Origin, Provisional, ReadOptions,
};
pub use direct::{DirectSource, DirectStats};
pub use error::{Error, Result};
pub use evaluator::{
    BatchEvaluator, Bot, BotResult, MarketSnapshot, PrefetchReport, READS_PER_BOT, TickReport, TickSummary,
    read_hit_rate,
};
pub use flags::{MigrationFlags, Route, rollout_bucket};
pub use limiter::{
    ClassLimit, ClassLimiterStats, EndpointClass, LimiterStats, Priority, RateLimiter, RateLimiterConfig,
};
pub use model::{
    Account, Balance, Balances, BookLevel, Candle, CandleRange, Granularity, MAX_PRODUCT_ID_LEN, MarketTrade,
    OrderBook, PriceKind, ProductId, RecentTrades, Ticker, TradeSide, USDC_OWN_MARKETS,
};
pub use retry::RetryPolicy;
pub use rust_decimal::Decimal;
pub use schedule::{ScheduledTick, TickLoop, TickSchedule};
pub use selector::{
    BotAgreement, FlagsWatcher, GateVerdict, MethodShadowStats, MigrationGate, MigrationProgress,
    MigrationReport, PathLatency, SelectorStats, ShadowSource, ShadowStats, ShadowTolerance, SourceSelector,
};
#[cfg(feature = "sim")]
#[cfg_attr(docsrs, doc(cfg(feature = "sim")))]
pub use sim::{SimBuilder, SimExchange, SimHandle, SimStats};
#[cfg(any(test, feature = "mock"))]
pub use source::MockMarketDataSource;
pub use source::{MarketDataSource, PrefetchRequest, UpstreamMeter};

pub use strategy::{Decision, MarketView, MovingAverageCrossover, RsiThreshold, Signal, Strategy, rsi};
#[cfg(feature = "stream")]
#[cfg_attr(docsrs, doc(cfg(feature = "stream")))]
pub use stream::{MarketStream, ProductLiveness, StreamBuilder, StreamConfig, StreamStats, TickerChannel};

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
