//! Shared pieces of the benches: an in-process upstream with a fixed delay and exact call
//! counters, a trivial strategy, runtimes, and bot fleets.
#![allow(missing_docs)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use tickshare::{
    Account, Bot, Candle, CandleRange, Decimal, Decision, Granularity, MarketDataSource, MarketView,
    ProductId, Result, Signal, Strategy, Ticker,
};
use time::OffsetDateTime;

/// An upstream in this process: answers after `delay` (tokio time), counts every call.
#[derive(Debug, Default)]
pub(crate) struct Upstream {
    delay: Duration,
    pub(crate) ticker: AtomicU64,
    pub(crate) tickers: AtomicU64,
    pub(crate) candles: AtomicU64,
    pub(crate) accounts: AtomicU64,
}

impl Upstream {
    pub(crate) fn new(delay: Duration) -> Arc<Self> {
        Arc::new(Upstream { delay, ..Default::default() })
    }

    /// Every call so far.
    pub(crate) fn calls(&self) -> u64 {
        [&self.ticker, &self.tickers, &self.candles, &self.accounts]
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .sum()
    }

    async fn wait(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }
}

fn price(product: &ProductId) -> Decimal {
    Decimal::from(100 + product.as_str().len() as i64)
}

fn ticker(product: &ProductId) -> Ticker {
    let p = price(product);
    Ticker {
        product: product.clone(),
        price: p,
        best_bid: Some(p - Decimal::ONE),
        best_ask: Some(p + Decimal::ONE),
        time: OffsetDateTime::UNIX_EPOCH,
        price_kind: tickshare::PriceKind::LastTrade,
    }
}

#[async_trait]
impl MarketDataSource for Upstream {
    async fn ticker(&self, product: &ProductId) -> Result<Ticker> {
        self.ticker.fetch_add(1, Ordering::Relaxed);
        self.wait().await;
        Ok(ticker(product))
    }

    async fn tickers(&self, products: &[ProductId]) -> Result<Vec<Ticker>> {
        self.tickers.fetch_add(1, Ordering::Relaxed);
        self.wait().await;
        Ok(products.iter().map(ticker).collect())
    }

    async fn candles(&self, product: &ProductId, g: Granularity, range: CandleRange) -> Result<Vec<Candle>> {
        self.candles.fetch_add(1, Ordering::Relaxed);
        self.wait().await;
        let p = price(product);
        let mut out = Vec::new();
        let mut start = g.bucket_start(range.start);
        let mut i = 0i64;
        while start < range.end {
            let close = p + Decimal::from(i % 7);
            out.push(Candle {
                start,
                open: p,
                high: close.max(p),
                low: close.min(p),
                close,
                volume: Decimal::ONE,
            });
            start += g.duration();
            i += 1;
        }
        Ok(out)
    }

    async fn accounts(&self) -> Result<Vec<Account>> {
        self.accounts.fetch_add(1, Ordering::Relaxed);
        self.wait().await;
        Ok(vec![Account {
            uuid: "00000000-0000-0000-0000-000000000001".into(),
            name: "USD Wallet".into(),
            currency: "USD".into(),
            available: Decimal::from(1_000_000),
            hold: Decimal::ZERO,
            active: true,
            account_type: "ACCOUNT_TYPE_FIAT".into(),
        }])
    }
}

/// A strategy that does next to nothing, so the benches measure the plumbing: buy when the
/// last candle closed up and the order is affordable, else hold. No allocation.
#[derive(Debug)]
pub(crate) struct Trivial;

impl Strategy for Trivial {
    fn name(&self) -> &str {
        "trivial"
    }

    fn evaluate(&self, view: &MarketView<'_>) -> Decision {
        let up = view.candles.last().is_some_and(|c| c.close > c.open);
        Decision {
            signal: if up && view.can_afford { Signal::Buy } else { Signal::Hold },
            reason: String::new(),
        }
    }
}

/// `n` products `P0-USD`, `P1-USD`, ...
pub(crate) fn products(n: usize) -> Vec<ProductId> {
    (0..n)
        .map(|i| ProductId::new(&format!("P{i}-USD")).unwrap_or_else(|e| panic!("product id: {e}")))
        .collect()
}

/// `bots` bots spread round-robin over `products`, one-hour candles, lookback 24.
pub(crate) fn fleet(bots: usize, products: &[ProductId]) -> Vec<Bot> {
    let strategy: Arc<dyn Strategy> = Arc::new(Trivial);
    (0..bots)
        .map(|i| {
            Bot::new(format!("bot-{i:05}"), products[i % products.len()].clone(), Arc::clone(&strategy))
                .granularity(Granularity::OneHour)
                .lookback(24)
        })
        .collect()
}

/// A current-thread runtime: the caller's task and the tasks it spawns share one thread.
pub(crate) fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"))
}

/// A multi-thread runtime with one worker per core (2 on the project's machines).
pub(crate) fn multi_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"))
}
