//! Unit tests of the coordinated logic against in-process upstreams (mockall and a small
//! scripted fake), on tokio's paused clock. Tests over real HTTP against the simulated
//! exchange live in `tests/it/coordinated.rs`.

use std::sync::atomic::{AtomicUsize, Ordering};

use time::{OffsetDateTime, macros::datetime};

use super::*;
use crate::{EndpointClass, MockMarketDataSource, util::returned_size};

fn pid(s: &str) -> ProductId {
    s.parse().unwrap()
}

fn ticker(p: &ProductId, price: i64) -> Ticker {
    Ticker {
        product: p.clone(),
        price: Decimal::new(price, 0),
        best_bid: Some(Decimal::new(price - 1, 0)),
        best_ask: Some(Decimal::new(price + 1, 0)),
        time: OffsetDateTime::UNIX_EPOCH,
        price_kind: crate::model::PriceKind::LastTrade,
    }
}

fn candle(start: OffsetDateTime, close: i64) -> Candle {
    let d = Decimal::new(close, 0);
    Candle { start, open: d, high: d, low: d, close: d, volume: Decimal::ONE }
}

/// A scripted upstream: counts calls, answers after a delay, can be told to fail.
#[derive(Default)]
struct Fake {
    delay: Duration,
    ticker_calls: AtomicUsize,
    tickers_calls: AtomicUsize,
    candle_calls: Mutex<Vec<(ProductId, CandleRange)>>,
    account_calls: AtomicUsize,
    /// Added to the USD balance; read when an accounts call starts (what the exchange had then).
    usd_extra: AtomicUsize,
    fail: Mutex<Option<Error>>,
    unknown: Vec<ProductId>,
    batch_sizes: Mutex<Vec<usize>>,
}

impl Fake {
    fn failing(&self, e: Option<Error>) {
        *lock(&self.fail) = e;
    }
    fn check(&self) -> Result<()> {
        lock(&self.fail).clone().map_or(Ok(()), Err)
    }
}

#[async_trait]
impl MarketDataSource for Fake {
    async fn ticker(&self, product: &ProductId) -> Result<Ticker> {
        self.ticker_calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.check()?;
        if self.unknown.contains(product) {
            return Err(Error::NotFound(product.to_string()));
        }
        Ok(ticker(product, 100))
    }
    async fn tickers(&self, products: &[ProductId]) -> Result<Vec<Ticker>> {
        self.tickers_calls.fetch_add(1, Ordering::SeqCst);
        lock(&self.batch_sizes).push(products.len());
        tokio::time::sleep(self.delay).await;
        self.check()?;
        Ok(products.iter().filter(|p| !self.unknown.contains(p)).map(|p| ticker(p, 100)).collect())
    }
    async fn candles(&self, product: &ProductId, g: Granularity, range: CandleRange) -> Result<Vec<Candle>> {
        lock(&self.candle_calls).push((product.clone(), range));
        tokio::time::sleep(self.delay).await;
        self.check()?;
        let mut out = Vec::new();
        let mut t = range.start;
        while t < range.end {
            out.push(candle(t, t.unix_timestamp() / 60));
            t += g.duration();
        }
        Ok(out)
    }
    async fn accounts(&self) -> Result<Vec<Account>> {
        self.account_calls.fetch_add(1, Ordering::SeqCst);
        let extra = self.usd_extra.load(Ordering::SeqCst) as i64;
        tokio::time::sleep(self.delay).await;
        self.check()?;
        Ok(vec![Account {
            uuid: "u".into(),
            name: "USD".into(),
            currency: "USD".into(),
            available: Decimal::new(1000 + extra, 0),
            hold: Decimal::ZERO,
            active: true,
            account_type: "ACCOUNT_TYPE_FIAT".into(),
        }])
    }
}

fn source(fake: Arc<Fake>) -> CoordinatedSource {
    CoordinatedSource::builder_arc(fake).build().unwrap()
}

#[tokio::test(start_paused = true)]
async fn sequential_reads_make_one_call() {
    let fake = Arc::new(Fake::default());
    let src = source(fake.clone());
    let btc = pid("BTC-USD");
    let first = src.ticker(&btc).await.unwrap();
    for _ in 0..99 {
        assert_eq!(src.ticker(&btc).await.unwrap(), first);
    }
    assert_eq!(fake.tickers_calls.load(Ordering::SeqCst), 1);
    let s = src.stats();
    assert_eq!(s.upstream_calls, 1);
    assert_eq!((s.cache_hits, s.cache_misses), (99, 1));
    assert!(s.hit_rate >= 0.99);
}

#[tokio::test(start_paused = true)]
async fn concurrent_reads_coalesce_and_batch() {
    let fake = Arc::new(Fake { delay: Duration::from_millis(30), ..Default::default() });
    let src = CoordinatedSource::builder_arc(fake.clone()).batch_size(40).build().unwrap();
    let btc = pid("BTC-USD");
    let mut handles = Vec::new();
    for _ in 0..1000 {
        let (s, p) = (src.clone(), btc.clone());
        handles.push(tokio::spawn(async move { s.ticker(&p).await }));
    }
    for h in handles {
        h.await.unwrap().unwrap();
    }
    assert_eq!(fake.tickers_calls.load(Ordering::SeqCst), 1);
    assert_eq!(src.stats().coalesced_waiters, 999);

    let products: Vec<ProductId> = (0..100).map(|i| pid(&format!("P{i}-USD"))).collect();
    let mut handles = Vec::new();
    for i in 0..1000 {
        let (s, p) = (src.clone(), products[i % 100].clone());
        handles.push(tokio::spawn(async move { s.ticker(&p).await }));
    }
    for h in handles {
        h.await.unwrap().unwrap();
    }
    // 1 + ceil(100 / 40)
    assert_eq!(fake.tickers_calls.load(Ordering::SeqCst), 1 + 3);
    assert_eq!(*lock(&fake.batch_sizes), vec![1, 40, 40, 20]);
    let s = src.stats();
    assert_eq!(s.batch_calls, 4);
    assert_eq!(s.batched_products, 101);
}

#[tokio::test(start_paused = true)]
async fn explicit_batch_call_is_one_upstream_call() {
    let fake = Arc::new(Fake::default());
    let src = source(fake.clone());
    let products: Vec<ProductId> = (0..25).map(|i| pid(&format!("P{i}-USD"))).collect();
    let t = src.tickers(&products).await.unwrap();
    assert_eq!(t.len(), 25);
    assert_eq!(fake.tickers_calls.load(Ordering::SeqCst), 1);
    // Warm: no call at all.
    src.tickers(&products).await.unwrap();
    assert_eq!(fake.tickers_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn ticker_ttl_and_max_age() {
    let fake = Arc::new(Fake::default());
    let src =
        CoordinatedSource::builder_arc(fake.clone()).ticker_ttl(Duration::from_secs(5)).build().unwrap();
    let p = pid("BTC-USD");
    src.ticker(&p).await.unwrap();
    tokio::time::advance(Duration::from_millis(4999)).await;
    let f = src.ticker_with(&p, ReadOptions::default()).await.unwrap();
    assert_eq!((f.origin, f.age), (Origin::Cache, Duration::from_millis(4999)));
    // A caller demanding fresher data gets it.
    let f = src.ticker_with(&p, ReadOptions::max_age(Duration::from_secs(1))).await.unwrap();
    assert_eq!(f.origin, Origin::Upstream);
    assert_eq!(fake.tickers_calls.load(Ordering::SeqCst), 2);
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(src.ticker_with(&p, ReadOptions::default()).await.unwrap().origin, Origin::Upstream);
    assert_eq!(fake.tickers_calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn unknown_products_are_remembered_and_isolated() {
    let bad = pid("BAD-USD");
    let fake = Arc::new(Fake { unknown: vec![bad.clone()], ..Default::default() });
    let src =
        CoordinatedSource::builder_arc(fake.clone()).negative_ttl(Duration::from_secs(60)).build().unwrap();
    let good = pid("BTC-USD");
    let got = src.tickers(&[good.clone(), bad.clone()]).await.unwrap();
    assert_eq!(got.len(), 1);
    for _ in 0..10 {
        assert!(matches!(src.ticker(&bad).await, Err(Error::NotFound(_))));
    }
    assert_eq!(fake.tickers_calls.load(Ordering::SeqCst), 1);
    assert_eq!(src.stats().negative_cache_hits, 10);
    tokio::time::advance(Duration::from_secs(61)).await;
    assert!(src.ticker(&bad).await.is_err());
    assert_eq!(fake.tickers_calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn stale_data_is_served_within_max_stale_then_refused() {
    let fake = Arc::new(Fake::default());
    let src = CoordinatedSource::builder_arc(fake.clone())
        .ticker_ttl(Duration::from_secs(5))
        .max_stale(Duration::from_secs(30))
        .max_retries(0)
        .build()
        .unwrap();
    let p = pid("BTC-USD");
    src.ticker(&p).await.unwrap();
    fake.failing(Some(Error::Upstream { status: 503, message: "down".into() }));
    tokio::time::advance(Duration::from_secs(20)).await;
    let f = src.ticker_with(&p, ReadOptions::default()).await.unwrap();
    assert!(f.is_stale());
    assert!(f.age >= Duration::from_secs(20) && f.age < Duration::from_secs(21), "{:?}", f.age);
    tokio::time::advance(Duration::from_secs(11)).await;
    assert!(matches!(src.ticker(&p).await, Err(Error::Upstream { status: 503, .. })));
    let s = src.stats();
    assert_eq!(s.stale_serves, 1);
    assert_eq!(s.errors_by_kind["upstream"], 2);
    // Recovery: the upstream is back.
    fake.failing(None);
    assert_eq!(src.ticker_with(&p, ReadOptions::default()).await.unwrap().origin, Origin::Upstream);
}

#[tokio::test(start_paused = true)]
async fn stale_while_revalidate_serves_at_once_and_refreshes_in_background() {
    let fake = Arc::new(Fake { delay: Duration::from_millis(100), ..Default::default() });
    let src = CoordinatedSource::builder_arc(fake.clone()).stale_while_revalidate(true).build().unwrap();
    let p = pid("BTC-USD");
    src.ticker(&p).await.unwrap();
    tokio::time::advance(Duration::from_secs(6)).await;
    let t0 = Instant::now();
    let f = src.ticker_with(&p, ReadOptions::default()).await.unwrap();
    assert_eq!((f.origin, t0.elapsed()), (Origin::Stale, Duration::ZERO));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.tickers_calls.load(Ordering::SeqCst), 2);
    assert_eq!(src.ticker_with(&p, ReadOptions::default()).await.unwrap().origin, Origin::Cache);
    assert_eq!(src.stats().revalidations, 1);
}

#[tokio::test(start_paused = true)]
async fn retries_honour_retry_after() {
    let mut mock = MockMarketDataSource::new();
    let mut seq = mockall::Sequence::new();
    for _ in 0..2 {
        mock.expect_accounts().times(1).in_sequence(&mut seq).returning(|| {
            Err(Error::RateLimited { retry_after: Some(Duration::from_secs(2)), local: false })
        });
    }
    mock.expect_accounts().times(1).in_sequence(&mut seq).returning(|| Ok(vec![]));
    let src = CoordinatedSource::builder(mock).max_retries(2).build().unwrap();
    let t0 = Instant::now();
    src.accounts().await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(4));
    let s = src.stats();
    assert_eq!((s.retries, s.rate_limit_errors, s.upstream_calls), (2, 2, 3));
}

#[tokio::test(start_paused = true)]
async fn a_429_through_the_gate_pauses_the_class() {
    let mut mock = MockMarketDataSource::new();
    let mut seq = mockall::Sequence::new();
    mock.expect_accounts()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|| Err(Error::RateLimited { retry_after: Some(Duration::from_secs(3)), local: false }));
    mock.expect_accounts().times(1).in_sequence(&mut seq).returning(|| Ok(vec![]));
    let limiter = RateLimiter::coinbase();
    let src = CoordinatedSource::builder(mock).rate_limiter(limiter.clone()).max_retries(0).build().unwrap();
    assert!(src.accounts().await.unwrap_err().is_rate_limited());
    assert!(limiter.paused_for(EndpointClass::Private).is_some());
    let t0 = Instant::now();
    src.accounts().await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(3));
    assert_eq!(src.stats().limiter.unwrap().private.rate_limit_pauses, 1);
}

#[tokio::test(start_paused = true)]
async fn errors_are_not_cached_and_reach_every_waiter() {
    let fake = Arc::new(Fake { delay: Duration::from_millis(10), ..Default::default() });
    fake.failing(Some(Error::Timeout));
    let src = CoordinatedSource::builder_arc(fake.clone()).max_retries(0).build().unwrap();
    let p = pid("ETH-USD");
    let results = futures_util::future::join_all((0..10).map(|_| src.ticker(&p))).await;
    assert!(results.iter().all(|r| *r == Err(Error::Timeout)));
    assert_eq!(fake.tickers_calls.load(Ordering::SeqCst), 1);
    fake.failing(None);
    assert!(src.ticker(&p).await.is_ok());
    assert_eq!(fake.tickers_calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn balance_checks_use_cached_accounts() {
    let fake = Arc::new(Fake::default());
    let src = source(fake.clone());
    for _ in 0..25 {
        assert!(src.validate_trade_balance("USD", Decimal::new(500, 0)).await.unwrap());
        assert!(!src.validate_trade_balance("USD", Decimal::new(5000, 0)).await.unwrap());
    }
    assert_eq!(fake.account_calls.load(Ordering::SeqCst), 1);
    src.invalidate_accounts();
    src.accounts().await.unwrap();
    assert_eq!(fake.account_calls.load(Ordering::SeqCst), 2);
    tokio::time::advance(Duration::from_secs(11)).await;
    src.accounts().await.unwrap();
    assert_eq!(fake.account_calls.load(Ordering::SeqCst), 3);
}

/// An order lands while an accounts fetch is in flight: that fetch began before the order, so
/// readers who come after the invalidation get a fetch of their own, and the older answer is
/// never cached.
#[tokio::test(start_paused = true)]
async fn accounts_fetched_before_an_invalidation_are_neither_joined_nor_cached() {
    let fake = Arc::new(Fake { delay: Duration::from_millis(100), ..Default::default() });
    let src = source(fake.clone());
    let usd = |a: &[Account]| a[0].available;
    let early = tokio::spawn({
        let s = src.clone();
        async move { s.accounts().await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(fake.account_calls.load(Ordering::SeqCst), 1, "the early fetch is in flight");
    // The order fills on the exchange and the host invalidates.
    fake.usd_extra.store(1, Ordering::SeqCst);
    src.invalidate_accounts();
    let late = src.accounts().await.unwrap();
    assert_eq!(usd(&late), Decimal::new(1001, 0), "a reader after the order sees the order");
    assert_eq!(usd(&early.await.unwrap().unwrap()), Decimal::new(1000, 0), "its own, older read");
    assert_eq!(fake.account_calls.load(Ordering::SeqCst), 2);
    // The cache holds the answer fetched after the order, whichever finished last.
    let cached = src.accounts().await.unwrap();
    assert_eq!(usd(&cached), Decimal::new(1001, 0));
    assert_eq!(fake.account_calls.load(Ordering::SeqCst), 2, "served from the cache");
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_reader_does_not_cancel_the_fetch() {
    let fake = Arc::new(Fake { delay: Duration::from_millis(100), ..Default::default() });
    let src = source(fake.clone());
    let p = pid("SOL-USD");
    let first = tokio::spawn({
        let (s, p) = (src.clone(), p.clone());
        async move { s.ticker(&p).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = tokio::spawn({
        let (s, p) = (src.clone(), p.clone());
        async move { s.ticker(&p).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    first.abort();
    assert!(second.await.unwrap().is_ok());
    assert_eq!(fake.tickers_calls.load(Ordering::SeqCst), 1);
    // The key is not poisoned: the value is cached and later reads are hits.
    src.ticker(&p).await.unwrap();
    assert_eq!(fake.tickers_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn candles_are_fetched_incrementally_and_expire_at_the_close() {
    let start = datetime!(2024-01-01 10:30 UTC);
    let clock = Clock::starting_at(start);
    let fake = Arc::new(Fake::default());
    // The read-driven refresh at the close (`AfterClose::Wait`); the background one is
    // `a_close_is_served_as_last_known_and_refreshed_in_the_background`.
    let src = CoordinatedSource::builder_arc(fake.clone())
        .clock(clock)
        .candle_grace(Duration::from_millis(500))
        .candle_jitter(Duration::ZERO)
        .after_close(AfterClose::Wait)
        .build()
        .unwrap();
    let p = pid("BTC-USD");
    let g = Granularity::OneHour;
    let range = || CandleRange::lookback(g, 24, clock.now_utc()).unwrap();
    let c = src.candles(&p, g, range()).await.unwrap();
    assert_eq!(c.len(), 24);
    assert_eq!(c.last().unwrap().start, datetime!(2024-01-01 10:00 UTC));
    // Fresh until 11:00 + grace: ticks every 5 minutes make no call.
    for _ in 0..5 {
        tokio::time::advance(Duration::from_secs(300)).await;
        src.candles(&p, g, range()).await.unwrap();
    }
    assert_eq!(lock(&fake.candle_calls).len(), 1);
    // 11:00:00.4 is within the grace: still cached.
    tokio::time::advance(Duration::from_millis(1_800_400 - 1_500_000)).await;
    assert_eq!(clock.now_utc(), datetime!(2024-01-01 11:00:00.4 UTC));
    src.candles(&p, g, range()).await.unwrap();
    assert_eq!(lock(&fake.candle_calls).len(), 1);
    // After the grace: one incremental call, from the candle that was in progress (10:00).
    tokio::time::advance(Duration::from_millis(200)).await;
    let c = src.candles(&p, g, range()).await.unwrap();
    assert_eq!(c.len(), 24);
    assert_eq!(c.last().unwrap().start, datetime!(2024-01-01 11:00 UTC));
    let calls = lock(&fake.candle_calls).clone();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].1.start, datetime!(2024-01-01 10:00 UTC));
    assert_eq!(calls[1].1.end, datetime!(2024-01-01 12:00 UTC));
    // A longer lookback backfills only the missing older part.
    src.candles(&p, g, CandleRange::lookback(g, 30, clock.now_utc()).unwrap()).await.unwrap();
    let calls = lock(&fake.candle_calls).clone();
    assert_eq!(calls.len(), 3);
    assert_eq!(
        (calls[2].1.start, calls[2].1.end),
        (datetime!(2023-12-31 06:00 UTC), datetime!(2023-12-31 11:00 UTC))
    );
    assert_eq!(src.stats().upstream_calls_by_endpoint["candles"], 3);
}

#[tokio::test(start_paused = true)]
async fn concurrent_candle_reads_coalesce() {
    let clock = Clock::starting_at(datetime!(2024-01-01 10:30 UTC));
    let fake = Arc::new(Fake { delay: Duration::from_millis(30), ..Default::default() });
    let src = CoordinatedSource::builder_arc(fake.clone()).clock(clock).build().unwrap();
    let p = pid("BTC-USD");
    let r = CandleRange::lookback(Granularity::FiveMinute, 50, clock.now_utc()).unwrap();
    let all =
        futures_util::future::join_all((0..200).map(|_| src.candles(&p, Granularity::FiveMinute, r))).await;
    assert!(all.iter().all(|c| c.as_ref().unwrap().len() == 50));
    assert_eq!(lock(&fake.candle_calls).len(), 1);
}

#[test]
fn config_validation_and_serde() {
    assert!(CoordinatedConfig::default().validate().is_ok());
    let bad = CoordinatedConfig { batch_size: 0, ..Default::default() };
    assert!(matches!(bad.validate(), Err(Error::Config(_))));
    let json = serde_json::to_string(&CoordinatedConfig::default()).unwrap();
    assert!(json.contains("\"ticker_ttl\":5000"), "{json}");
    let back: CoordinatedConfig = serde_json::from_str(r#"{"ticker_ttl": 2000}"#).unwrap();
    assert_eq!(back.ticker_ttl, Duration::from_secs(2));
    assert_eq!(back.batch_size, 100);
}

/// A cache hit does not consult the negative cache (issue #6: that lookup was a third of a
/// warm read), so remembering a product as unknown must drop its cached data: a product the
/// exchange stops knowing is not served from cache.
#[tokio::test(start_paused = true)]
async fn a_product_found_unknown_is_no_longer_served_from_cache() {
    let p = pid("GONE-USD");
    let mut mock = MockMarketDataSource::new();
    mock.expect_tickers().times(1).returning(|ps| Ok(ps.iter().map(|p| ticker(p, 5)).collect()));
    mock.expect_candles().times(1).returning(|p, _, _| Err(Error::NotFound(p.to_string())));
    let src = CoordinatedSource::builder_arc(Arc::new(mock)).build().unwrap();
    assert_eq!(src.ticker(&p).await.unwrap().price, Decimal::new(5, 0));
    assert_eq!(src.ticker(&p).await.unwrap().price, Decimal::new(5, 0), "a fresh hit");
    let range = CandleRange::lookback(Granularity::OneHour, 3, datetime!(2024-01-01 10:30 UTC)).unwrap();
    assert!(matches!(src.candles(&p, Granularity::OneHour, range).await, Err(Error::NotFound(_))));
    // The ticker is still within its TTL, but the product is now unknown.
    assert!(matches!(src.ticker(&p).await, Err(Error::NotFound(_))));
    assert!(matches!(src.candles(&p, Granularity::OneHour, range).await, Err(Error::NotFound(_))));
    assert_eq!(src.stats().negative_cache_hits, 2);
}

/// The evaluator's meter reads the counters directly; it must agree with the stats.
#[tokio::test(start_paused = true)]
async fn the_meter_reads_what_the_stats_report() {
    use crate::UpstreamMeter;
    let fake = Arc::new(Fake::default());
    let src = source(fake.clone());
    let btc = pid("BTC-USD");
    for _ in 0..3 {
        src.ticker(&btc).await.unwrap();
        src.accounts().await.unwrap();
    }
    let s = src.stats();
    assert_eq!((s.upstream_calls, s.cache_hits, s.cache_misses), (2, 4, 2));
    assert_eq!(UpstreamMeter::upstream_calls(&src), s.upstream_calls);
    assert_eq!(src.cache_reads(), (s.cache_hits, s.cache_misses));
}

#[tokio::test(start_paused = true)]
async fn max_age_forces_a_fetch_and_a_failure_falls_back_to_flagged_stale_data() {
    let fake = Arc::new(Fake::default());
    let src = CoordinatedSource::builder_arc(fake.clone()).max_retries(0).build().unwrap();
    let p = pid("BTC-USD");
    src.ticker(&p).await.unwrap();
    fake.failing(Some(Error::Timeout));
    tokio::time::advance(Duration::from_secs(2)).await;
    // Fresh by the TTL, but older than this caller accepts: a fetch is made; it fails, so the
    // cached value comes back flagged stale with its true age, for the caller to judge.
    let f = src.ticker_with(&p, ReadOptions::max_age(Duration::from_secs(1))).await.unwrap();
    assert!(f.is_stale());
    assert!(f.age >= Duration::from_secs(2));
    assert_eq!(fake.tickers_calls.load(Ordering::SeqCst), 2);
}

/// Refresh-ahead: reads in the last second before expiry are hits that refresh the entry once
/// in the background, so a reader right after the old expiry still hits; outside that window
/// nothing is refreshed early, and a zero setting keeps the plain expiry.
#[tokio::test(start_paused = true)]
async fn refresh_before_expiry_refreshes_once_and_readers_never_miss() {
    let fake = Arc::new(Fake { delay: Duration::from_millis(30), ..Default::default() });
    let src = CoordinatedSource::builder_arc(fake.clone())
        .refresh_before_expiry(Duration::from_secs(1))
        .build()
        .unwrap();
    let p = pid("BTC-USD");
    src.ticker(&p).await.unwrap();
    src.accounts().await.unwrap();
    let base = (fake.tickers_calls.load(Ordering::SeqCst), fake.account_calls.load(Ordering::SeqCst));
    assert_eq!(base, (1, 1));
    // 3.5 s: fresh, not expiring soon: no refresh.
    tokio::time::advance(Duration::from_millis(3_500)).await;
    assert_eq!(src.ticker_with(&p, ReadOptions::default()).await.unwrap().origin, Origin::Cache);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fake.tickers_calls.load(Ordering::SeqCst), 1);
    // 4.5 s (0.5 s before the 5 s expiry): 100 readers are served from the cache and one
    // background call refreshes the ticker.
    tokio::time::advance(Duration::from_millis(900)).await;
    for _ in 0..100 {
        let f = src.ticker_with(&p, ReadOptions::default()).await.unwrap();
        assert_eq!(f.origin, Origin::Cache);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fake.tickers_calls.load(Ordering::SeqCst), 2);
    // Past the first entry's expiry the refreshed one serves.
    tokio::time::advance(Duration::from_secs(1)).await;
    let f = src.ticker_with(&p, ReadOptions::default()).await.unwrap();
    assert_eq!(f.origin, Origin::Cache);
    assert_eq!(fake.tickers_calls.load(Ordering::SeqCst), 2);

    // Accounts likewise (10 s TTL): read at 9.5 s, refreshed once, served after 10 s.
    tokio::time::advance(Duration::from_millis(3_900)).await;
    for _ in 0..10 {
        src.accounts().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fake.account_calls.load(Ordering::SeqCst), 2);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(src.accounts_with(ReadOptions::default()).await.unwrap().origin, Origin::Cache);
    assert_eq!(fake.account_calls.load(Ordering::SeqCst), 2);
    assert_eq!(src.stats().cache_misses, 2, "only the two cold reads missed");

    // The setting is checked against the TTLs.
    let too_long =
        CoordinatedSource::builder_arc(fake.clone()).refresh_before_expiry(Duration::from_secs(5)).build();
    assert!(matches!(too_long, Err(Error::Config(_))));
}

/// `AfterClose::ServeLastKnown` (#18): after an hourly close every read is answered at once
/// from the cache with its just-closed candle marked provisional, while the series are
/// refreshed in the background one by one in an order that does not depend on which product was
/// read first; a reader with a `max_age` waits for its own refresh instead.
#[tokio::test(start_paused = true)]
async fn a_close_is_served_as_last_known_and_refreshed_in_the_background() {
    let clock = Clock::starting_at(datetime!(2024-01-01 10:30 UTC));
    let g = Granularity::OneHour;
    let products: Vec<ProductId> =
        ["A-USD", "B-USD", "C-USD", "D-USD", "E-USD", "F-USD"].into_iter().map(pid).collect();
    let build = |fake: &Arc<Fake>| {
        CoordinatedSource::builder_arc(fake.clone())
            .clock(clock)
            .candle_grace(Duration::from_millis(500))
            .candle_jitter(Duration::ZERO)
            .close_refresh_concurrency(1)
            .build()
            .unwrap()
    };
    let fake = |_| Arc::new(Fake { delay: Duration::from_millis(100), ..Fake::default() });
    let (fa, fb) = (fake(0), fake(1));
    let (a, b) = (build(&fa), build(&fb));
    let range = || CandleRange::lookback(g, 24, clock.now_utc()).unwrap();
    // Two sources, the same products read in opposite orders.
    for p in &products {
        a.candles(p, g, range()).await.unwrap();
    }
    for p in products.iter().rev() {
        b.candles(p, g, range()).await.unwrap();
    }
    assert_eq!(lock(&fa.candle_calls).len(), 6);

    // 11:00:00.55: the grace is over, the first refresh is in flight, every read answers at once.
    tokio::time::sleep_until(clock.instant_at(datetime!(2024-01-01 11:00:00.55 UTC))).await;
    let before = Instant::now();
    for p in &products {
        let r = a.candles_with(p, g, range(), ReadOptions::default()).await.unwrap();
        assert_eq!(r.origin, Origin::Cache, "{p}");
        let last = r.value.last().unwrap();
        assert_eq!(last.start, datetime!(2024-01-01 10:00 UTC), "{p}: the bucket that just closed");
        let mark = r.provisional.expect("the just-closed candle is marked");
        assert_eq!((mark.start, mark.fidelity, mark.patches), (last.start, CandleFidelity::Exact, 0));
        assert!(mark.as_of < datetime!(2024-01-01 11:00 UTC));
        assert_eq!(r.in_progress, None);
    }
    assert_eq!(Instant::now(), before, "no read waited");
    assert_eq!(a.stats().provisional_serves, 6);
    assert_eq!(lock(&fa.candle_calls).len(), 7, "reads made no call; one refresh in flight");

    // The refreshes land one after the other (concurrency 1, 100 ms each), in the same order
    // for both sources, each from the candle that was in progress (10:00).
    tokio::time::sleep_until(clock.instant_at(datetime!(2024-01-01 11:00:02 UTC))).await;
    let order = |f: &Fake| -> Vec<(ProductId, OffsetDateTime)> {
        lock(&f.candle_calls)[6..].iter().map(|(p, r)| (p.clone(), r.start)).collect()
    };
    let (oa, ob) = (order(&fa), order(&fb));
    assert_eq!(oa.len(), 6);
    assert_eq!(oa, ob, "the refresh order does not follow the read order");
    assert!(oa.iter().all(|(_, start)| *start == datetime!(2024-01-01 10:00 UTC)));
    let st = a.stats().close_refresh;
    assert_eq!((st.refreshed, st.failed, st.pending, st.scheduled), (6, 0, 0, 0));
    let close = st.recent_closes.last().unwrap().clone();
    assert_eq!((close.close, close.series, close.exact), (datetime!(2024-01-01 11:00 UTC), 6, 6));
    // The grace, then six refreshes of 100 ms back to back.
    let after = close.last_exact_after_ms.unwrap();
    assert!((1_100.0..1_200.0).contains(&after), "{after}");
    for p in &products {
        let r = a.candles_with(p, g, range(), ReadOptions::default()).await.unwrap();
        assert_eq!(r.provisional, None, "{p}");
        assert_eq!(r.value.last().unwrap().start, datetime!(2024-01-01 11:00 UTC));
        assert!(r.in_progress.is_some());
    }

    // 12:00:00.55: the last series in the queue, read with a `max_age`, waits for its own
    // refresh (and the background one then finds it done: still one call per series).
    let calls = lock(&fa.candle_calls).len();
    tokio::time::sleep_until(clock.instant_at(datetime!(2024-01-01 12:00:00.55 UTC))).await;
    let (last, _) = oa.last().unwrap().clone();
    let r = a.candles_with(&last, g, range(), ReadOptions::max_age(Duration::from_secs(3600))).await.unwrap();
    assert_eq!(r.origin, Origin::Upstream);
    assert_eq!((r.provisional, r.value.last().unwrap().start), (None, datetime!(2024-01-01 12:00 UTC)));
    tokio::time::sleep_until(clock.instant_at(datetime!(2024-01-01 12:00:02 UTC))).await;
    assert_eq!(lock(&fa.candle_calls).len(), calls + 6);
    let st = a.stats().close_refresh;
    // Five by the worker, one by the reader, which queued its series for 13:00 at once.
    assert_eq!((st.refreshed, st.pending, st.scheduled), (11, 0, 1));
    let noon = st.recent_closes.iter().find(|c| c.close == datetime!(2024-01-01 12:00 UTC)).unwrap();
    assert_eq!((noon.series, noon.exact), (6, 6));
}

/// With `AfterClose::Wait` (and with `InProgressCandle::Exact`) nothing is refreshed in the
/// background: the first read after the close fetches, and waits.
#[tokio::test(start_paused = true)]
async fn after_close_wait_keeps_the_read_driven_refresh() {
    let clock = Clock::starting_at(datetime!(2024-01-01 10:30 UTC));
    let g = Granularity::OneHour;
    for (after, mode) in
        [(AfterClose::Wait, InProgressCandle::Live), (AfterClose::ServeLastKnown, InProgressCandle::Exact)]
    {
        let fake = Arc::new(Fake { delay: Duration::from_millis(100), ..Fake::default() });
        let src = CoordinatedSource::builder_arc(fake.clone())
            .clock(clock)
            .candle_jitter(Duration::ZERO)
            .after_close(after)
            .in_progress(mode)
            .in_progress_max_age(Duration::from_secs(3600))
            .build()
            .unwrap();
        let p = pid("BTC-USD");
        let range = || CandleRange::lookback(g, 24, clock.now_utc()).unwrap();
        src.candles(&p, g, range()).await.unwrap();
        let close = clock.instant_at(g.next_close(clock.now_utc()));
        tokio::time::sleep_until(close + Duration::from_secs(5)).await;
        assert_eq!(lock(&fake.candle_calls).len(), 1, "{after:?} {mode:?}: no background refresh");
        let t0 = Instant::now();
        let r = src.candles_with(&p, g, range(), ReadOptions::default()).await.unwrap();
        assert_eq!(Instant::now() - t0, Duration::from_millis(100), "the read waited for the fetch");
        assert_eq!((r.origin, r.provisional), (Origin::Upstream, None));
        assert_eq!(src.stats().close_refresh, CloseRefreshStats::default());
    }
}

/// A ticker hit's future is what a caller (the proxy: once per request, into memory that a
/// thousand connections keep cold) carries: 1,352 bytes when the hit read moka's future cache
/// (its `get` alone 848) and the miss path was inline; 240 with the sync cache and the miss
/// path boxed.
#[test]
fn a_cache_hit_future_stays_small() {
    let size = returned_size(|s: &'static CoordinatedSource, p: &'static ProductId| {
        s.ticker_with(p, ReadOptions::default())
    });
    assert!(size <= 512, "ticker_with's future is {size} bytes");
}
