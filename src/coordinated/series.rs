//! Candle series: incremental refreshes in which closed candles are never fetched twice.

use std::{sync::Arc, time::Duration};

use time::OffsetDateTime;
use tokio::time::Instant;

use super::{
    Inner,
    cache::{Entry, Series, SeriesEntry},
    stats::Op,
};
use crate::{
    clock::later,
    error::{Error, Result},
    model::{Candle, CandleRange, Granularity, ProductId},
    util::add,
};

impl Inner {
    pub(super) fn series_covers(
        &self,
        e: &SeriesEntry,
        range: CandleRange,
        g: Granularity,
        now: Instant,
    ) -> bool {
        if e.value.covers(range) {
            return true;
        }
        // Within the grace after a close, the series still counts as covering the bucket that
        // just opened: it is served as is and refreshed when the grace ends.
        e.value.from <= range.start && range.end <= e.value.to + g.duration() && now < e.fresh_until
    }

    pub(super) async fn fetch_series(
        this: Arc<Inner>,
        key: (ProductId, Granularity),
        range: CandleRange,
    ) -> Result<SeriesEntry> {
        let (product, g) = &key;
        let now = Instant::now();
        let now_utc = this.clock.utc_at(now);
        let current_end = g.next_close(now_utc);
        let want_end = range.end.min(current_end).max(range.start + g.duration());
        let existing_entry = this.series.get(&key).await;
        let still_fresh = existing_entry.as_ref().is_some_and(|e| now < e.fresh_until);
        let existing_fetched_at = existing_entry.as_ref().map(|e| e.fetched_at);
        let existing_fresh_until = existing_entry.as_ref().map(|e| e.fresh_until);
        let existing = existing_entry.map(|e| e.value);
        let class = this.cfg.market_data_class;
        let fetch = |r: CandleRange| {
            let this = &this;
            async move {
                let out = this.call(Op::Candles, class, || this.upstream.candles(product, *g, r)).await;
                if let Ok(c) = &out {
                    add(&this.counters.candles_fetched, c.len() as u64);
                }
                out
            }
        };
        let result = async {
            let (mut candles, from) = match &existing {
                Some(s) => {
                    let mut candles = Vec::new();
                    let mut from = s.from;
                    if range.start < s.from {
                        // Backfill older history the series does not have yet.
                        candles.extend(fetch(CandleRange::new(range.start, s.from)?).await?);
                        from = range.start;
                    }
                    // Refresh from the bucket that was in progress at the last fetch: every
                    // bucket before it had closed and is never fetched again.
                    let end = want_end.max(s.to);
                    let refresh_from = if still_fresh && end <= s.to {
                        s.to
                    } else {
                        g.bucket_start(s.fetched_utc).min(s.to)
                    };
                    candles.extend(s.candles.iter().filter(|c| c.start < refresh_from).copied());
                    if refresh_from < end {
                        candles.extend(fetch(CandleRange::new(refresh_from, end)?).await?);
                    }
                    (candles, from)
                }
                None => (fetch(CandleRange::new(range.start, want_end)?).await?, range.start),
            };
            candles.sort_by_key(|c| c.start);
            candles.dedup_by_key(|c| c.start);
            Ok::<_, Error>((candles, from))
        }
        .await;
        let (mut candles, mut from) = match result {
            Ok(v) => v,
            Err(e) => {
                if matches!(e, Error::NotFound(_)) {
                    this.remember_unknown(product).await;
                }
                return Err(e);
            }
        };
        trim(&mut candles, &mut from, this.cfg.max_candles_per_series);
        let to = existing.as_ref().map_or(want_end, |s| s.to.max(want_end));
        let (fetched_at, fetched_utc, fresh_until) = match (&existing, still_fresh) {
            // Only older history was added: the newest data keeps its age and freshness.
            (Some(s), true) if to <= s.to => {
                (existing_fetched_at.unwrap_or(now), s.fetched_utc, existing_fresh_until.unwrap_or(now))
            }
            _ => {
                let jitter = this.cfg.candle_jitter.mul_f64(fastrand::f64());
                (now, now_utc, this.series_fresh_until(*g, now_utc, this.cfg.candle_grace + jitter, now))
            }
        };
        let entry =
            Entry::new(Arc::new(Series { candles, from, to, fetched_utc }), fetched_at, fresh_until.max(now));
        this.series.insert(key, entry.clone()).await;
        Ok(entry)
    }

    /// When a series fetched at `fetched_utc` stops being fresh: at the close of the bucket in
    /// progress then, plus `after` (the grace that lets the exchange finish the candle), and
    /// never before `now`.
    pub(super) fn series_fresh_until(
        &self,
        g: Granularity,
        fetched_utc: OffsetDateTime,
        after: Duration,
        now: Instant,
    ) -> Instant {
        later(self.clock.instant_at(g.next_close(fetched_utc)), after).max(now)
    }
}

/// Drop the oldest candles beyond `max`, moving `from` up with them.
pub(super) fn trim(candles: &mut Vec<Candle>, from: &mut OffsetDateTime, max: usize) {
    if candles.len() > max {
        candles.drain(..candles.len() - max);
        if let Some(first) = candles.first() {
            *from = (*from).max(first.start);
        }
    }
}
