//! What a push feed (the market-data stream, feature `stream`) writes into a
//! [`CoordinatedSource`]'s cache, so that reads are served with no REST call while the feed is
//! healthy.
//!
//! - **Tickers** are inserted as fetched now and fresh for a hold time that the feed extends
//!   while it stays healthy (a product with no trade sends nothing, yet its last price holds).
//! - **Five-minute candles** (the only granularity Coinbase pushes) are merged into the cached
//!   `FIVE_MINUTE` series. A pushed candle is the full state of its bucket, so the newest one
//!   is the candle in progress and replaces the cached one; the series' `fetched_utc` moves to
//!   the push, which is what marks every earlier candle closed (the same rule the REST path's
//!   incremental refresh follows). A merge that would close a candle whose final state the
//!   feed cannot vouch for (after a disconnect or a gap, or over a REST write it did not see)
//!   is refused: the series needs a repair, one incremental REST refresh.
//! - **Longer granularities** that are whole multiples of five minutes are derived by
//!   aggregating five-minute candles (open of the first, close of the last, highest high,
//!   lowest low, summed volume), only for buckets whose every five-minute bucket the cached
//!   five-minute series covers; only series some reader already cached are touched. The bucket
//!   in progress is derived the same way from the closed five-minute candles it holds and the
//!   pushed one in progress, so it is exact as of the push; a series whose first non-final
//!   bucket began before the five-minute series does keeps its REST answer until a REST
//!   refresh moves it past that bucket.
//! - **Stale marks** expire a product's ticker and the series the feed maintains, so the next
//!   read goes to REST through the usual single-flight, batching and rate limiter.

use std::{sync::Arc, time::Duration};

use time::OffsetDateTime;
use tokio::time::Instant;

use super::{
    CoordinatedSource,
    cache::{Entry, Series},
    series::trim,
};
use crate::{
    clock::{Clock, later},
    error::Result,
    model::{Candle, CandleRange, Granularity, ProductId, Ticker},
};

/// The granularity of Coinbase's `candles` channel.
pub(crate) const PUSHED: Granularity = Granularity::FiveMinute;

/// Granularities derivable from five-minute candles: every whole multiple of five minutes.
pub(crate) const DERIVED: &[Granularity] = Granularity::ALL.split_at(2).1;

/// What the feed last wrote to a five-minute series. If the cached series still carries it,
/// nothing else (a REST refresh) wrote in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FeedMark {
    fetched_utc: OffsetDateTime,
    to: OffsetDateTime,
}

impl FeedMark {
    /// The five-minute bucket in progress when the feed wrote.
    pub(crate) fn bucket(&self) -> OffsetDateTime {
        PUSHED.bucket_start(self.fetched_utc)
    }
}

/// The outcome of merging pushed candles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Merge {
    /// Merged; what was written.
    Merged(FeedMark),
    /// Nothing merged: the push is older than the cached data, or empty.
    Ignored,
    /// Nothing merged: it would close a candle whose final state the feed did not deliver.
    NeedsRepair,
}

impl CoordinatedSource {
    /// The clock the source judges candle boundaries by.
    pub(crate) fn feed_clock(&self) -> Clock {
        self.inner.clock
    }

    /// Insert a pushed ticker, fresh for `hold` (at least the ticker TTL). Returns the instant
    /// it was stored at, for [`feed_touch_ticker`](Self::feed_touch_ticker).
    pub(crate) async fn feed_ticker(&self, ticker: Ticker, hold: Duration) -> Instant {
        let now = Instant::now();
        let until = later(now, hold.max(self.inner.cfg.ticker_ttl));
        self.inner.patch_live(&ticker).await;
        self.inner.tickers.insert(ticker.product.clone(), Entry::new(ticker, now, until));
        now
    }

    /// Keep a pushed ticker fresh for another `hold` while the feed is healthy: no update means
    /// no trade, so the last price still holds. Only the entry stored at `pushed_at` is
    /// extended (a REST answer stored since keeps its own TTL); its age keeps counting from
    /// the push. Returns whether it was extended.
    pub(crate) async fn feed_touch_ticker(
        &self,
        product: &ProductId,
        pushed_at: Instant,
        hold: Duration,
    ) -> bool {
        let now = Instant::now();
        match self.inner.tickers.get(product) {
            Some(e) if e.fetched_at == pushed_at => {
                let until = later(now, hold.max(self.inner.cfg.ticker_ttl)).max(e.fresh_until);
                self.inner.tickers.insert(product.clone(), Entry::new(e.value, e.fetched_at, until));
                true
            }
            _ => false,
        }
    }

    /// Merge pushed five-minute candles of `product` (oldest first, full bucket states) as of
    /// the exchange time `at`. `mark` is what the feed wrote last while its stream stayed
    /// continuous (`None` after a disconnect or a gap). `grace` is how long after the next
    /// close the series stays fresh without a push.
    pub(crate) async fn feed_candles(
        &self,
        product: &ProductId,
        pushed: &[Candle],
        at: OffsetDateTime,
        mark: Option<FeedMark>,
        grace: Duration,
    ) -> Merge {
        let g = PUSHED;
        let inner = &self.inner;
        let mut pushed: Vec<Candle> =
            pushed.iter().filter(|c| g.bucket_start(c.start) == c.start).copied().collect();
        pushed.sort_by_key(|c| c.start);
        pushed.dedup_by_key(|c| c.start);
        let (Some(first), Some(newest)) = (pushed.first().copied(), pushed.last().copied()) else {
            return Merge::Ignored;
        };
        // The push's time: never before its newest candle (a clock that lags must not make a
        // newer candle look like a future one).
        let t = at.max(newest.start);
        let tb = g.bucket_start(t);
        let step = time::Duration::seconds(g.seconds());
        let key = (product.clone(), g);
        let (mut candles, mut from, fetched_utc, to) = match inner.series.get(&key).await {
            None => (pushed, first.start, t, tb + step),
            Some(e) => {
                let s = &e.value;
                // Every candle before `eb` is final in the cache.
                let eb = g.bucket_start(s.fetched_utc);
                if tb < eb {
                    return Merge::Ignored;
                }
                let ours = mark == Some(FeedMark { fetched_utc: s.fetched_utc, to: s.to });
                if tb > eb && !ours {
                    // This push closes `eb`: exact only if it carries `eb`'s final state (a state
                    // reported after the close) and no bucket in between went unseen.
                    let carries_final = pushed.iter().any(|c| c.start == eb);
                    if !(carries_final && tb == eb + step) {
                        return Merge::NeedsRepair;
                    }
                }
                let fresh: Vec<Candle> = pushed.into_iter().filter(|c| c.start >= eb).collect();
                let mut candles: Vec<Candle> =
                    s.candles.iter().filter(|c| !fresh.iter().any(|p| p.start == c.start)).copied().collect();
                candles.extend(fresh);
                candles.sort_by_key(|c| c.start);
                (candles, s.from, s.fetched_utc.max(t), s.to.max(tb + step))
            }
        };
        trim(&mut candles, &mut from, inner.cfg.max_candles_per_series);
        let now = Instant::now();
        let fresh_until = inner.series_fresh_until(g, fetched_utc, grace, now);
        let series = Series { candles, from, to, fetched_utc, patch: None };
        inner.series.insert(key, Entry::new(Arc::new(series), now, fresh_until)).await;
        Merge::Merged(FeedMark { fetched_utc, to })
    }

    /// Re-derive the cached series of `product` at the granularities `only` (default: every one
    /// in [`DERIVED`]) from its five-minute series, for the buckets it covers in full; returns
    /// the granularities written. Series nobody cached are not created, and a stale five-minute
    /// series derives nothing.
    pub(crate) async fn feed_derive(
        &self,
        product: &ProductId,
        grace: Duration,
        only: Option<&[Granularity]>,
    ) -> Vec<Granularity> {
        let inner = &self.inner;
        let Some(five) = inner.series.get(&(product.clone(), PUSHED)).await else {
            return Vec::new();
        };
        let now = Instant::now();
        if now >= five.fresh_until {
            return Vec::new();
        }
        let f = &five.value;
        let mut written = Vec::new();
        for g in only.unwrap_or(DERIVED).iter().copied().filter(|g| DERIVED.contains(g)) {
            let key = (product.clone(), g);
            let Some(e) = inner.series.get(&key).await else { continue };
            let s = &e.value;
            let step = time::Duration::seconds(g.seconds());
            // The first bucket of `s` not known final, and the bucket in progress at the
            // five-minute series' time.
            let eb = g.bucket_start(s.fetched_utc);
            let cb = g.bucket_start(f.fetched_utc);
            if cb < eb || f.from > eb {
                continue;
            }
            let mut candles: Vec<Candle> = s.candles.iter().filter(|c| c.start < eb).copied().collect();
            let mut b = eb;
            while b <= cb {
                candles.extend(aggregate(&f.candles, b, b + step));
                b += step;
            }
            let mut from = s.from;
            trim(&mut candles, &mut from, inner.cfg.max_candles_per_series);
            let fetched_utc = s.fetched_utc.max(f.fetched_utc);
            let to = s.to.max(cb + step);
            let fresh_until = inner.series_fresh_until(g, fetched_utc, grace, now);
            let series = Series { candles, from, to, fetched_utc, patch: None };
            inner.series.insert(key, Entry::new(Arc::new(series), now, fresh_until)).await;
            written.push(g);
        }
        written
    }

    /// Expire `product`'s ticker and its five-minute series, plus its series at `derived`, so
    /// the next read refreshes them from REST. Their values stay for stale serving.
    pub(crate) async fn feed_mark_stale(&self, product: &ProductId, derived: &[Granularity]) {
        let inner = &self.inner;
        let now = Instant::now();
        if let Some(e) = inner.tickers.get(product)
            && e.fresh_until > now
        {
            inner.tickers.insert(product.clone(), Entry::new(e.value, e.fetched_at, now));
        }
        for g in std::iter::once(PUSHED).chain(derived.iter().copied()) {
            let key = (product.clone(), g);
            if let Some(e) = inner.series.get(&key).await
                && e.fresh_until > now
            {
                inner.series.insert(key, Entry::new(e.value, e.fetched_at, now)).await;
            }
        }
    }

    /// Repair `product`'s five-minute series with one incremental REST refresh (from the
    /// candle that was in progress at its last good update to now), through the usual
    /// single-flight and rate limiter. Returns `false` when there is no series to repair.
    ///
    /// # Errors
    /// The upstream's error; the series then stays stale.
    pub(crate) async fn feed_repair(&self, product: &ProductId) -> Result<bool> {
        let key = (product.clone(), PUSHED);
        let Some(e) = self.inner.series.get(&key).await else { return Ok(false) };
        // A stale entry is refreshed from its last in-progress bucket; a fresh one would not
        // be refetched at all.
        self.feed_mark_stale(product, &[]).await;
        let now_utc = self.inner.clock.now_utc();
        let range = CandleRange::new(e.value.from, PUSHED.next_close(now_utc))?;
        let (r, _) = self.series_flight(key, range, false).await;
        r.map(|_| true)
    }
}

/// The candle of bucket `[start, end)` aggregated from the five-minute candles in it (sorted by
/// start); `None` when none traded.
pub(crate) fn aggregate(five: &[Candle], start: OffsetDateTime, end: OffsetDateTime) -> Option<Candle> {
    let lo = five.partition_point(|c| c.start < start);
    let hi = five.partition_point(|c| c.start < end).max(lo);
    let slice = five.get(lo..hi)?;
    let (first, last) = (slice.first()?, slice.last()?);
    Some(Candle {
        start,
        open: first.open,
        close: last.close,
        high: slice.iter().map(|c| c.high).max().unwrap_or(first.high),
        low: slice.iter().map(|c| c.low).min().unwrap_or(first.low),
        volume: slice.iter().map(|c| c.volume).sum(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MarketDataSource, coordinated::Origin, model::Granularity, source::MockMarketDataSource};
    use rust_decimal::Decimal;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use time::macros::datetime;

    fn pid(s: &str) -> ProductId {
        s.parse().unwrap()
    }

    fn c5(start: OffsetDateTime, px: i64) -> Candle {
        Candle {
            start,
            open: Decimal::new(px, 0),
            high: Decimal::new(px + 2, 0),
            low: Decimal::new(px - 1, 0),
            close: Decimal::new(px + 1, 0),
            volume: Decimal::ONE,
        }
    }

    const GRACE: Duration = Duration::from_secs(3);

    /// A source whose upstream serves candles from `f` and counts candle calls.
    fn source(
        clock: Clock,
        calls: Arc<AtomicUsize>,
        f: impl Fn(Granularity, CandleRange) -> Vec<Candle> + Send + Sync + 'static,
    ) -> CoordinatedSource {
        let mut mock = MockMarketDataSource::new();
        mock.expect_candles().returning(move |_, g, r| {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(f(g, r))
        });
        mock.expect_ticker().never();
        mock.expect_tickers().never();
        // The read-driven refresh at a close (`AfterClose::Wait`): these tests count REST calls
        // at reads.
        CoordinatedSource::builder(mock)
            .clock(clock)
            .candle_jitter(Duration::ZERO)
            .after_close(crate::AfterClose::Wait)
            .build()
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn pushed_tickers_serve_reads_and_stale_marks_expire_them() {
        let mut mock = MockMarketDataSource::new();
        let btc = pid("BTC-USD");
        let t = Ticker {
            product: btc.clone(),
            price: Decimal::TEN,
            best_bid: None,
            best_ask: None,
            time: datetime!(2024-01-01 0:00 UTC),
            price_kind: crate::model::PriceKind::LastTrade,
        };
        let rest = Ticker { price: Decimal::ONE, ..t.clone() };
        mock.expect_tickers().times(1).returning(move |_| Ok(vec![rest.clone()]));
        let source = CoordinatedSource::builder(mock).build().unwrap();
        let at = source.feed_ticker(t.clone(), Duration::from_secs(30)).await;
        tokio::time::advance(Duration::from_secs(20)).await;
        let read = source.ticker_with(&btc, Default::default()).await.unwrap();
        assert_eq!((read.value.price, read.origin), (Decimal::TEN, Origin::Cache));
        assert_eq!(read.age, Duration::from_secs(20));
        assert!(source.feed_touch_ticker(&btc, at, Duration::from_secs(30)).await);
        tokio::time::advance(Duration::from_secs(25)).await;
        assert_eq!(source.ticker_with(&btc, Default::default()).await.unwrap().origin, Origin::Cache);
        source.feed_mark_stale(&btc, &[]).await;
        let read = source.ticker_with(&btc, Default::default()).await.unwrap();
        assert_eq!((read.value.price, read.origin), (Decimal::ONE, Origin::Upstream));
        // A REST answer is not extended by a touch meant for the pushed value.
        assert!(!source.feed_touch_ticker(&btc, at, Duration::from_secs(30)).await);
        assert_eq!(source.stats().upstream_calls, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn merges_follow_the_bucket_in_progress_and_refuse_unvouched_closes() {
        let clock = Clock::starting_at(datetime!(2024-01-01 10:02:00 UTC));
        let calls = Arc::new(AtomicUsize::new(0));
        let s = source(clock, calls.clone(), |_, _| vec![]);
        let btc = pid("BTC-USD");
        let b0 = datetime!(2024-01-01 10:00 UTC);
        let b1 = datetime!(2024-01-01 10:05 UTC);
        let b2 = datetime!(2024-01-01 10:10 UTC);
        let Merge::Merged(m0) = s.feed_candles(&btc, &[c5(b0, 100)], clock.now_utc(), None, GRACE).await
        else {
            panic!("snapshot creates the series")
        };
        // An update of the same bucket replaces the candle in progress.
        let Merge::Merged(m1) = s.feed_candles(&btc, &[c5(b0, 101)], clock.now_utc(), Some(m0), GRACE).await
        else {
            panic!("update")
        };
        let range = CandleRange::new(b0, b1).unwrap();
        let read = s.candles_with(&btc, PUSHED, range, Default::default()).await.unwrap();
        assert_eq!((read.value, read.origin), (vec![c5(b0, 101)], Origin::Cache));
        // The close, continuously observed: the next bucket's candle and b0's final state.
        tokio::time::advance(Duration::from_secs(181)).await; // 10:05:01
        let Merge::Merged(m2) =
            s.feed_candles(&btc, &[c5(b0, 102), c5(b1, 200)], clock.now_utc(), Some(m1), GRACE).await
        else {
            panic!("rollover")
        };
        let range = CandleRange::new(b0, b2).unwrap();
        let read = s.candles_with(&btc, PUSHED, range, Default::default()).await.unwrap();
        assert_eq!(read.value, vec![c5(b0, 102), c5(b1, 200)]);
        // Older pushes are ignored.
        assert_eq!(s.feed_candles(&btc, &[c5(b0, 1)], b0, Some(m2), GRACE).await, Merge::Ignored);
        // After a disconnect (no mark), closing b1 without its final state is refused...
        tokio::time::advance(Duration::from_secs(300)).await; // 10:10:01
        assert_eq!(
            s.feed_candles(&btc, &[c5(b2, 300)], clock.now_utc(), None, GRACE).await,
            Merge::NeedsRepair
        );
        // ...but with it, accepted.
        assert!(matches!(
            s.feed_candles(&btc, &[c5(b1, 201), c5(b2, 300)], clock.now_utc(), None, GRACE).await,
            Merge::Merged(_)
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 0, "no REST call so far");
    }

    #[tokio::test(start_paused = true)]
    async fn repair_is_one_incremental_rest_call() {
        let clock = Clock::starting_at(datetime!(2024-01-01 10:02:00 UTC));
        let calls = Arc::new(AtomicUsize::new(0));
        let s = source(clock, calls.clone(), |g, r| {
            let mut out = Vec::new();
            let mut t = r.start;
            while t < r.end {
                out.push(c5(t, 7));
                t += time::Duration::seconds(g.seconds());
            }
            out
        });
        let btc = pid("BTC-USD");
        let b0 = datetime!(2024-01-01 10:00 UTC);
        s.feed_candles(&btc, &[c5(b0, 100)], clock.now_utc(), None, GRACE).await;
        tokio::time::advance(Duration::from_secs(600)).await; // 10:12
        assert!(s.feed_repair(&btc).await.unwrap());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let r = CandleRange::new(b0, datetime!(2024-01-01 10:15 UTC)).unwrap();
        let read = s.candles_with(&btc, PUSHED, r, Default::default()).await.unwrap();
        assert_eq!(read.origin, Origin::Cache);
        assert_eq!(read.value.len(), 3);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(!s.feed_repair(&pid("ETH-USD")).await.unwrap(), "nothing cached, nothing to repair");
    }

    #[tokio::test(start_paused = true)]
    async fn hours_are_derived_from_complete_five_minute_buckets_only() {
        let clock = Clock::starting_at(datetime!(2024-01-01 09:58:00 UTC));
        let calls = Arc::new(AtomicUsize::new(0));
        // REST serves hourly candles at price 1 (warm-up).
        let s = source(clock, calls.clone(), |g, r| {
            let mut out = Vec::new();
            let mut t = r.start;
            while t < r.end {
                out.push(c5(t, 1));
                t += time::Duration::seconds(g.seconds());
            }
            out
        });
        let btc = pid("BTC-USD");
        let h = Granularity::OneHour;
        let lookback = || CandleRange::lookback(h, 3, clock.now_utc()).unwrap();
        s.candles(&btc, h, lookback()).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // The stream starts at 09:58: the 09:00 hour can never be derived (its start is
        // missing), so the first read after 10:00 still goes to REST: that ends the warm-up.
        let mut mark = None;
        let mut t = datetime!(2024-01-01 09:55 UTC);
        let mut px = 100;
        let end = datetime!(2024-01-01 11:05 UTC);
        let mut derived = Vec::new();
        while t < end {
            let next = t + time::Duration::minutes(5);
            let now = clock.now_utc();
            let Merge::Merged(m) = s.feed_candles(&btc, &[c5(t, px)], now.max(t), mark, GRACE).await else {
                panic!("merge at {t}")
            };
            mark = Some(m);
            derived.push((t, s.feed_derive(&btc, GRACE, None).await));
            if t == datetime!(2024-01-01 10:00 UTC) {
                s.candles(&btc, h, lookback()).await.unwrap();
                assert_eq!(calls.load(Ordering::SeqCst), 2);
            }
            px += 10;
            let wait = clock.instant_at(next) + Duration::from_secs(1) - Instant::now();
            tokio::time::advance(wait).await;
            t = next;
        }
        assert!(derived[..2].iter().all(|(_, d)| d.is_empty()), "{derived:?}");
        assert!(derived[2..].iter().all(|(_, d)| d == &[h]), "{derived:?}");
        // Now 11:05:01; the 10:00 hour is closed and was derived from twelve buckets.
        let read = s.candles_with(&btc, h, lookback(), Default::default()).await.unwrap();
        assert_eq!(read.origin, Origin::Cache);
        assert_eq!(calls.load(Ordering::SeqCst), 2, "no REST call after the warm-up");
        let ten = read.value.iter().find(|c| c.start == datetime!(2024-01-01 10:00 UTC)).unwrap();
        // 10:00 .. 10:55 were pushed at prices 110 .. 220.
        assert_eq!(ten.open, Decimal::new(110, 0));
        assert_eq!(ten.close, Decimal::new(221, 0));
        assert_eq!(ten.high, Decimal::new(222, 0));
        assert_eq!(ten.low, Decimal::new(109, 0));
        assert_eq!(ten.volume, Decimal::new(12, 0));
        let eleven = read.value.last().unwrap();
        assert_eq!((eleven.start, eleven.open), (datetime!(2024-01-01 11:00 UTC), Decimal::new(230, 0)));
        // The 09:00 hour is REST's (price 1), untouched.
        assert_eq!(read.value[0].start, datetime!(2024-01-01 09:00 UTC));
        assert_eq!(read.value[0].open, Decimal::ONE);
        // A stale five-minute series derives nothing.
        s.feed_mark_stale(&btc, &[h]).await;
        assert!(s.feed_derive(&btc, GRACE, None).await.is_empty());
    }

    #[test]
    fn aggregation_is_exact_and_skips_empty_buckets() {
        let t = datetime!(2024-01-01 10:00 UTC);
        let five =
            [c5(t, 10), c5(t + time::Duration::minutes(10), 30), c5(t + time::Duration::minutes(60), 99)];
        let a = aggregate(&five, t, t + time::Duration::hours(1)).unwrap();
        assert_eq!(
            (a.open, a.close, a.high, a.low, a.volume),
            (Decimal::new(10, 0), Decimal::new(31, 0), Decimal::new(32, 0), Decimal::new(9, 0), Decimal::TWO)
        );
        assert!(aggregate(&five, t - time::Duration::hours(1), t).is_none());
    }
}
