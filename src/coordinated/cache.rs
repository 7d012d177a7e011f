//! Cached values with freshness judged on tokio's clock.
//!
//! moka's own clock ignores `tokio::time::pause`, so every cached value carries the tokio
//! instant it was fetched at and the instant it stops being fresh; moka's TTL is only a memory
//! bound set well beyond those.

use std::{sync::Arc, time::Duration};

use time::OffsetDateTime;
use tokio::time::Instant;

use crate::model::{Candle, CandleRange};

/// A cached value and its freshness.
#[derive(Debug, Clone)]
pub(crate) struct Entry<T> {
    pub(crate) value: T,
    pub(crate) fetched_at: Instant,
    pub(crate) fresh_until: Instant,
}

impl<T> Entry<T> {
    pub(crate) fn new(value: T, fetched_at: Instant, fresh_until: Instant) -> Self {
        Entry { value, fetched_at, fresh_until }
    }

    pub(crate) fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.fetched_at)
    }

    /// Fresh under the default policy, and no older than `max_age` when the caller asks.
    pub(crate) fn is_fresh(&self, now: Instant, max_age: Option<Duration>) -> bool {
        now < self.fresh_until && max_age.is_none_or(|m| self.age(now) <= m)
    }
}

/// A cached candle series of one product and granularity.
#[derive(Debug, Clone)]
pub(crate) struct Series {
    /// Candles, oldest first, unique starts; the last may be the one in progress at `fetched_utc`.
    pub(crate) candles: Vec<Candle>,
    /// Coverage: every bucket in `[from, to)` was asked of the upstream.
    pub(crate) from: OffsetDateTime,
    pub(crate) to: OffsetDateTime,
    /// Wall time of the last fetch: buckets starting before its bucket had closed.
    pub(crate) fetched_utc: OffsetDateTime,
    /// Last-trade prices applied to the candle in progress since the fetch
    /// ([`InProgressCandle::Live`](crate::InProgressCandle::Live)).
    pub(crate) patch: Option<Patch>,
}

/// What moved the last candle of a series since its fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Patch {
    /// Exchange time of the newest price applied.
    pub(crate) as_of: OffsetDateTime,
    /// Prices applied.
    pub(crate) count: u32,
}

impl Series {
    pub(crate) fn covers(&self, range: CandleRange) -> bool {
        self.from <= range.start && range.end <= self.to
    }

    pub(crate) fn slice(&self, range: CandleRange) -> Vec<Candle> {
        let lo = self.candles.partition_point(|c| c.start < range.start);
        let hi = self.candles.partition_point(|c| c.start < range.end);
        self.candles[lo..hi.max(lo)].to_vec()
    }
}

pub(crate) type SeriesEntry = Entry<Arc<Series>>;

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::Decimal;
    use time::macros::datetime;

    fn candle(start: OffsetDateTime) -> Candle {
        Candle {
            start,
            open: Decimal::ONE,
            high: Decimal::ONE,
            low: Decimal::ONE,
            close: Decimal::ONE,
            volume: Decimal::ONE,
        }
    }

    #[test]
    fn slices_and_coverage() {
        let s = Series {
            candles: vec![
                candle(datetime!(2024-01-01 00:00 UTC)),
                candle(datetime!(2024-01-01 01:00 UTC)),
                candle(datetime!(2024-01-01 02:00 UTC)),
            ],
            from: datetime!(2024-01-01 00:00 UTC),
            to: datetime!(2024-01-01 03:00 UTC),
            fetched_utc: datetime!(2024-01-01 02:30 UTC),
            patch: None,
        };
        let r = CandleRange::new(datetime!(2024-01-01 01:00 UTC), datetime!(2024-01-01 03:00 UTC)).unwrap();
        assert!(s.covers(r));
        assert_eq!(s.slice(r).len(), 2);
        let wider =
            CandleRange::new(datetime!(2023-12-31 23:00 UTC), datetime!(2024-01-01 03:00 UTC)).unwrap();
        assert!(!s.covers(wider));
        assert_eq!(s.slice(wider).len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn freshness_follows_tokio_time() {
        let now = Instant::now();
        let e = Entry::new(1, now, now + Duration::from_secs(5));
        assert!(e.is_fresh(now, None));
        assert!(!e.is_fresh(now, Some(Duration::ZERO)) || e.age(now).is_zero());
        tokio::time::advance(Duration::from_secs(2)).await;
        let later = Instant::now();
        assert!(e.is_fresh(later, None));
        assert!(!e.is_fresh(later, Some(Duration::from_secs(1))));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(!e.is_fresh(Instant::now(), None));
    }
}
