//! tickshare: one coordinated market-data layer between many trading bots and Coinbase.

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod blocking;
mod clock;
pub mod coinbase;
mod config;
mod coordinated;
mod direct;
mod error;
mod evaluator;
mod flags;
mod limiter;
mod model;
mod selector;
#[cfg(feature = "sim")]
#[cfg_attr(docsrs, doc(cfg(feature = "sim")))]
pub mod sim;
mod source;
mod stats;
mod strategy;

pub use clock::Clock;
pub use coinbase::{ClientStats, CoinbaseClient, CoinbaseClientBuilder, Credentials, MarketDataPath};
pub use coordinated::{CoordinatedBuilder, CoordinatedConfig, CoordinatedSource, Fresh, Origin, ReadOptions};
pub use direct::{DirectSource, DirectStats};
pub use error::{Error, Result};
pub use evaluator::{BatchEvaluator, Bot, BotResult, MarketSnapshot, TickReport, TickSummary};
pub use flags::{MigrationFlags, Route, rollout_bucket};
pub use limiter::{
    ClassLimit, ClassLimiterStats, EndpointClass, LimiterStats, RateLimiter, RateLimiterConfig,
};
pub use model::{
    Account, Balance, Balances, Candle, CandleRange, Granularity, MAX_PRODUCT_ID_LEN, ProductId, Ticker,
};
pub use rust_decimal::Decimal;
pub use selector::{
    FlagsWatcher, MethodShadowStats, MigrationProgress, PathLatency, SelectorStats, ShadowSource,
    ShadowStats, SourceSelector,
};
#[cfg(feature = "sim")]
#[cfg_attr(docsrs, doc(cfg(feature = "sim")))]
pub use sim::{SimBuilder, SimExchange, SimHandle, SimStats};
pub use source::MarketDataSource;
#[cfg(any(test, feature = "mock"))]
pub use source::MockMarketDataSource;
pub use stats::{CoordinatedStats, LatencyStats, UpstreamMeter};
pub use strategy::{Decision, MarketView, MovingAverageCrossover, RsiThreshold, Signal, Strategy, rsi};
