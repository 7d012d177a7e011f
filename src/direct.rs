//! [`DirectSource`]: the legacy path, where every call goes straight to the exchange.

use std::{
    collections::BTreeMap,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use async_trait::async_trait;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::{
    coordinated::Fresh,
    error::Result,
    model::{Account, Balances, Candle, CandleRange, Granularity, ProductId, Ticker},
    source::MarketDataSource,
};

const METHODS: [&str; 5] = ["ticker", "tickers", "candles", "accounts", "validate_trade_balance"];

/// The legacy path of the seed system: no cache, no coalescing, no batching. Each trait call
/// is one upstream call (a balance check fetches the accounts again, as the legacy code did).
///
/// It counts its calls so a host can compare it with the coordinated path. To keep legacy
/// bots from drawing 429s for everyone during a migration, build its
/// [`CoinbaseClient`](crate::CoinbaseClient) with the coordinated source's
/// [`RateLimiter`](crate::RateLimiter).
///
/// ```
/// # async fn f(client: tickshare::CoinbaseClient) -> tickshare::Result<()> {
/// use tickshare::{DirectSource, MarketDataSource};
/// let legacy = DirectSource::new(client);
/// legacy.ticker(&"BTC-USD".parse()?).await?;
/// assert_eq!(legacy.stats().upstream_calls, 1);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct DirectSource {
    upstream: Arc<dyn MarketDataSource>,
    calls: Arc<[AtomicU64; 5]>,
    errors: Arc<AtomicU64>,
}

impl fmt::Debug for DirectSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectSource").field("stats", &self.stats()).finish_non_exhaustive()
    }
}

/// Call counters of a [`DirectSource`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectStats {
    /// Upstream calls by trait method.
    pub calls_by_method: BTreeMap<String, u64>,
    /// All upstream calls.
    pub upstream_calls: u64,
    /// Calls that failed.
    pub errors: u64,
}

impl DirectSource {
    /// Wrap an upstream source (normally a [`CoinbaseClient`](crate::CoinbaseClient)).
    pub fn new(upstream: impl MarketDataSource + 'static) -> Self {
        Self::from_arc(Arc::new(upstream))
    }

    /// Wrap a shared upstream source.
    pub fn from_arc(upstream: Arc<dyn MarketDataSource>) -> Self {
        DirectSource { upstream, calls: Arc::new(Default::default()), errors: Arc::new(AtomicU64::new(0)) }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> DirectStats {
        let mut by = BTreeMap::new();
        let mut total = 0;
        for (i, m) in METHODS.iter().enumerate() {
            let n = self.calls[i].load(Ordering::Relaxed);
            total += n;
            by.insert((*m).to_string(), n);
        }
        DirectStats {
            calls_by_method: by,
            upstream_calls: total,
            errors: self.errors.load(Ordering::Relaxed),
        }
    }

    fn count<T>(&self, method: usize, r: Result<T>) -> Result<T> {
        self.calls[method].fetch_add(1, Ordering::Relaxed);
        if r.is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

#[async_trait]
impl MarketDataSource for DirectSource {
    async fn ticker(&self, product: &ProductId) -> Result<Ticker> {
        let r = self.upstream.ticker(product).await;
        self.count(0, r)
    }

    async fn tickers(&self, products: &[ProductId]) -> Result<Vec<Ticker>> {
        let r = self.upstream.tickers(products).await;
        self.count(1, r)
    }

    async fn candles(
        &self,
        product: &ProductId,
        granularity: Granularity,
        range: CandleRange,
    ) -> Result<Vec<Candle>> {
        let r = self.upstream.candles(product, granularity, range).await;
        self.count(2, r)
    }

    /// The upstream's [`candles_fresh`](MarketDataSource::candles_fresh), one call, counted
    /// as `candles`.
    async fn candles_fresh(
        &self,
        product: &ProductId,
        granularity: Granularity,
        range: CandleRange,
    ) -> Result<Fresh<Vec<Candle>>> {
        let r = self.upstream.candles_fresh(product, granularity, range).await;
        self.count(2, r)
    }

    async fn accounts(&self) -> Result<Vec<Account>> {
        let r = self.upstream.accounts().await;
        self.count(3, r)
    }

    async fn validate_trade_balance(&self, currency: &str, amount: Decimal) -> Result<bool> {
        let r = self.upstream.accounts().await;
        let r = self.count(4, r)?;
        Ok(Balances::from_accounts(&r).can_afford(currency, amount))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Error, MockMarketDataSource};

    #[tokio::test]
    async fn every_call_goes_upstream_and_is_counted() {
        let mut up = MockMarketDataSource::new();
        up.expect_accounts().times(3).returning(|| Ok(vec![]));
        up.expect_ticker().times(2).returning(|p| Err(Error::NotFound(p.to_string())));
        let d = DirectSource::new(up);
        d.accounts().await.unwrap();
        assert!(!d.validate_trade_balance("USD", Decimal::ONE).await.unwrap());
        assert!(!d.validate_trade_balance("USD", Decimal::ONE).await.unwrap());
        let p: ProductId = "BTC-USD".parse().unwrap();
        assert!(d.ticker(&p).await.is_err());
        assert!(d.ticker(&p).await.is_err());
        let s = d.stats();
        assert_eq!(s.upstream_calls, 5);
        assert_eq!(s.calls_by_method["validate_trade_balance"], 2);
        assert_eq!(s.errors, 2);
    }
}
