//! The [`MarketDataSource`] trait: what a bot needs from the exchange.

use std::{collections::HashSet, sync::Arc, time::Duration};

use async_trait::async_trait;
use rust_decimal::Decimal;

use crate::{
    coordinated::{CandleFidelity, Fresh, InProgress, Origin},
    error::{Error, Result},
    model::{Account, Balances, Candle, CandleRange, Granularity, ProductId, Ticker},
};

/// Market data and balances, from wherever they come.
///
/// Two implementations ship with the crate: [`DirectSource`](crate::DirectSource), the legacy
/// path where every call goes to the exchange, and
/// [`CoordinatedSource`](crate::CoordinatedSource), which caches, coalesces, batches and
/// rate-limits. [`CoinbaseClient`](crate::CoinbaseClient) implements it too (one HTTP request
/// per call, more when a call must be chunked or paginated).
///
/// The trait is object-safe (`Arc<dyn MarketDataSource>`), which is how the
/// [`SourceSelector`](crate::SourceSelector) hands sources to bots. With the `mock` feature,
/// `MockMarketDataSource` (mockall) implements it for unit tests.
///
/// # Cancel safety
/// Dropping a returned future abandons that caller's wait. Implementations in this crate
/// never let one dropped caller cancel work other callers share.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait MarketDataSource: Send + Sync {
    /// The latest ticker of one product.
    ///
    /// # Errors
    /// [`Error::NotFound`](crate::Error::NotFound) for an unknown product; any transport,
    /// rate-limit or decode error of the source.
    async fn ticker(&self, product: &ProductId) -> Result<Ticker>;

    /// Tickers of many products at once. The result has one entry per distinct known
    /// product, in no particular order; unknown products are left out.
    ///
    /// # Errors
    /// As [`ticker`](MarketDataSource::ticker), for the batch as a whole.
    async fn tickers(&self, products: &[ProductId]) -> Result<Vec<Ticker>>;

    /// Candles of `product` whose start falls in `range`, oldest first, without duplicates.
    ///
    /// # Errors
    /// As [`ticker`](MarketDataSource::ticker).
    async fn candles(
        &self,
        product: &ProductId,
        granularity: Granularity,
        range: CandleRange,
    ) -> Result<Vec<Candle>>;

    /// [`candles`](MarketDataSource::candles) with their provenance: where the series came
    /// from, how old it is, and whether its last candle is the one in progress, as the exchange
    /// answered it or patched from later prices ([`Fresh::in_progress`]). This is how a host
    /// that holds a source as `Arc<dyn MarketDataSource>` (a selector's route) tells an exact
    /// candle from a patched one.
    ///
    /// The default calls `candles` and calls the answer the upstream's own, just fetched,
    /// with `in_progress: None`: right for a source that keeps nothing and knows no clock. The
    /// crate's sources say more: [`CoinbaseClient`](crate::CoinbaseClient) (and so
    /// [`DirectSource`](crate::DirectSource)) marks a candle in progress as exact as of its
    /// clock's now, [`CoordinatedSource`](crate::CoordinatedSource) answers what its cache
    /// holds ([`candles_with`](crate::CoordinatedSource::candles_with)).
    ///
    /// # Errors
    /// As [`candles`](MarketDataSource::candles).
    async fn candles_fresh(
        &self,
        product: &ProductId,
        granularity: Granularity,
        range: CandleRange,
    ) -> Result<Fresh<Vec<Candle>>> {
        let value = self.candles(product, granularity, range).await?;
        Ok(Fresh {
            value,
            origin: Origin::Upstream,
            age: Duration::ZERO,
            in_progress: None,
            provisional: None,
        })
    }

    /// Every account (wallet) of the API key's user.
    ///
    /// # Errors
    /// [`Error::Unauthorized`](crate::Error::Unauthorized) without valid credentials; any
    /// transport, rate-limit or decode error.
    async fn accounts(&self) -> Result<Vec<Account>>;

    /// Whether `amount` of `currency` is available to trade. The default reads
    /// [`accounts`](MarketDataSource::accounts).
    ///
    /// # Errors
    /// As [`accounts`](MarketDataSource::accounts).
    async fn validate_trade_balance(&self, currency: &str, amount: Decimal) -> Result<bool> {
        let accounts = self.accounts().await?;
        Ok(Balances::from_accounts(&accounts).can_afford(currency, amount))
    }

    /// Refresh-ahead: fetch now what `request` names, so that reading it during the next
    /// `request.horizon` is served from this source's cache. What is already cached and stays
    /// fresh that long is not fetched again. A scheduler calls this shortly before a tick
    /// ([`BatchEvaluator::prefetch`](crate::BatchEvaluator::prefetch)).
    ///
    /// Returns `None` when the source keeps no cache, so there is nothing to warm: the
    /// default, right for [`DirectSource`](crate::DirectSource) and the client, which would
    /// only make the calls twice. Otherwise the errors of the reads that failed (empty when
    /// every read succeeded); the reads will be tried again when made.
    async fn prefetch(&self, request: &PrefetchRequest) -> Option<Vec<Error>> {
        let _ = request;
        None
    }
}

/// The mark of a series just fetched from the exchange at `now`: its last candle, when still
/// in progress then, is the exchange's own (exact) state as of `now`.
pub(crate) fn fetched_in_progress(
    candles: &[Candle],
    granularity: Granularity,
    now: time::OffsetDateTime,
) -> Option<InProgress> {
    let last = candles.last()?;
    (!granularity.is_closed(last.start, now)).then_some(InProgress {
        start: last.start,
        fidelity: CandleFidelity::Exact,
        as_of: now,
        patches: 0,
    })
}

/// What a refresh-ahead fetch should keep warm ([`MarketDataSource::prefetch`]).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct PrefetchRequest {
    /// Products whose tickers will be read.
    pub tickers: Vec<ProductId>,
    /// Candle series that will be read: product, granularity, range.
    pub candles: Vec<(ProductId, Granularity, CandleRange)>,
    /// Whether the accounts will be read.
    pub accounts: bool,
    /// How long from now the reads must be served from the cache.
    pub horizon: Duration,
}

impl PrefetchRequest {
    /// A request for nothing yet, to be kept warm for `horizon`.
    pub fn new(horizon: Duration) -> Self {
        PrefetchRequest { horizon, ..Default::default() }
    }

    /// Add tickers.
    #[must_use]
    pub fn tickers(mut self, products: impl IntoIterator<Item = ProductId>) -> Self {
        self.tickers.extend(products);
        self
    }

    /// Add a candle series.
    #[must_use]
    pub fn candles(mut self, product: ProductId, granularity: Granularity, range: CandleRange) -> Self {
        self.candles.push((product, granularity, range));
        self
    }

    /// Ask for the accounts.
    #[must_use]
    pub fn accounts(mut self) -> Self {
        self.accounts = true;
        self
    }
}

macro_rules! forward_source {
    ($ty:ty) => {
        #[async_trait]
        impl<T: MarketDataSource + ?Sized> MarketDataSource for $ty {
            async fn ticker(&self, product: &ProductId) -> Result<Ticker> {
                (**self).ticker(product).await
            }
            async fn tickers(&self, products: &[ProductId]) -> Result<Vec<Ticker>> {
                (**self).tickers(products).await
            }
            async fn candles(
                &self,
                product: &ProductId,
                granularity: Granularity,
                range: CandleRange,
            ) -> Result<Vec<Candle>> {
                (**self).candles(product, granularity, range).await
            }
            async fn candles_fresh(
                &self,
                product: &ProductId,
                granularity: Granularity,
                range: CandleRange,
            ) -> Result<Fresh<Vec<Candle>>> {
                (**self).candles_fresh(product, granularity, range).await
            }
            async fn accounts(&self) -> Result<Vec<Account>> {
                (**self).accounts().await
            }
            async fn validate_trade_balance(&self, currency: &str, amount: Decimal) -> Result<bool> {
                (**self).validate_trade_balance(currency, amount).await
            }
            async fn prefetch(&self, request: &PrefetchRequest) -> Option<Vec<Error>> {
                (**self).prefetch(request).await
            }
        }
    };
}

forward_source!(Arc<T>);
forward_source!(Box<T>);

/// Something that counts its upstream calls (and maybe cache reads), so a
/// [`BatchEvaluator`](crate::BatchEvaluator) can report per-tick numbers.
pub trait UpstreamMeter: Send + Sync {
    /// Upstream calls made so far.
    fn upstream_calls(&self) -> u64;

    /// `(hits, misses)` of cache reads so far; `(0, 0)` for sources without a cache.
    fn cache_reads(&self) -> (u64, u64) {
        (0, 0)
    }

    /// Candle reads answered so far with a provisional last candle (its bucket closed, its
    /// refresh under way: [`Fresh::provisional`](crate::Fresh::provisional)); 0 for sources
    /// that never serve one.
    fn provisional_reads(&self) -> u64 {
        0
    }
}

/// Read straight from the counters: a full [`CoordinatedStats`](crate::CoordinatedStats) snapshot sorts the latency
/// samples and builds maps, and the evaluator reads its meters twice per tick.
impl UpstreamMeter for crate::CoordinatedSource {
    fn upstream_calls(&self) -> u64 {
        self.counters().upstream_total()
    }
    fn cache_reads(&self) -> (u64, u64) {
        self.counters().cache_reads()
    }
    fn provisional_reads(&self) -> u64 {
        self.counters().provisional_reads()
    }
}

impl UpstreamMeter for crate::DirectSource {
    fn upstream_calls(&self) -> u64 {
        self.stats().upstream_calls
    }
}

impl UpstreamMeter for crate::CoinbaseClient {
    fn upstream_calls(&self) -> u64 {
        self.stats().total_requests
    }
}

/// The distinct products of `products`, in first-seen order.
pub(crate) fn distinct(products: &[ProductId]) -> Vec<ProductId> {
    let mut seen = HashSet::with_capacity(products.len());
    products.iter().filter(|p| seen.insert((*p).clone())).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Account;

    fn usd(available: i64) -> Account {
        Account {
            uuid: "u".into(),
            name: "USD Wallet".into(),
            currency: "USD".into(),
            available: Decimal::new(available, 0),
            hold: Decimal::ZERO,
            active: true,
            account_type: "ACCOUNT_TYPE_FIAT".into(),
        }
    }

    /// A source implementing only the required methods, to exercise the default method.
    struct Fixed;
    #[async_trait]
    impl MarketDataSource for Fixed {
        async fn ticker(&self, _: &ProductId) -> Result<Ticker> {
            Err(crate::Error::NotFound("x".into()))
        }
        async fn tickers(&self, _: &[ProductId]) -> Result<Vec<Ticker>> {
            Ok(vec![])
        }
        async fn candles(&self, _: &ProductId, _: Granularity, _: CandleRange) -> Result<Vec<Candle>> {
            Ok(vec![])
        }
        async fn accounts(&self) -> Result<Vec<Account>> {
            Ok(vec![usd(100)])
        }
    }

    #[tokio::test]
    async fn default_balance_check_and_forwarding_impls() {
        let arc: Arc<dyn MarketDataSource> = Arc::new(Fixed);
        assert!(arc.validate_trade_balance("USD", Decimal::new(100, 0)).await.unwrap());
        assert!(!arc.validate_trade_balance("USD", Decimal::new(101, 0)).await.unwrap());
        let boxed: Box<dyn MarketDataSource> = Box::new(Fixed);
        assert!(boxed.validate_trade_balance("usd", Decimal::ONE).await.unwrap());
        let nested: Arc<Box<dyn MarketDataSource>> = Arc::new(boxed);
        assert_eq!(nested.accounts().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn mock_is_usable_as_dyn() {
        let mut mock = MockMarketDataSource::new();
        mock.expect_accounts().times(1).returning(|| Ok(vec![usd(5)]));
        mock.expect_validate_trade_balance().never();
        let src: Arc<dyn MarketDataSource> = Arc::new(mock);
        assert_eq!(src.accounts().await.unwrap()[0].available, Decimal::new(5, 0));
    }

    #[test]
    fn distinct_keeps_first_seen_order() {
        let a: ProductId = "A-USD".parse().unwrap();
        let b: ProductId = "B-USD".parse().unwrap();
        assert_eq!(distinct(&[b.clone(), a.clone(), b.clone()]), vec![b, a]);
    }
}
