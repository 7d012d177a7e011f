//! Candle series: incremental refreshes in which closed candles are never fetched twice.

use std::{sync::Arc, time::Duration};

use time::OffsetDateTime;
use tokio::time::Instant;

use super::{AfterClose, CandleFidelity, InProgress, InProgressCandle, Provisional, cache::Patch};
use super::{
    Inner,
    cache::{Entry, Series, SeriesEntry},
    stats::Op,
};
use crate::{
    clock::later,
    error::{Error, Result},
    model::{Candle, CandleRange, Granularity, PriceKind, ProductId, Ticker},
    util::{add, inc},
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

    /// Whether series are refreshed in the background at their close and served as last known
    /// meanwhile: [`AfterClose::ServeLastKnown`] with [`InProgressCandle::Live`].
    pub(super) fn closes_in_background(&self) -> bool {
        self.cfg.after_close == AfterClose::ServeLastKnown && self.cfg.in_progress == InProgressCandle::Live
    }

    /// Whether a read of `range` may be answered at once from `e`, expired because the bucket
    /// it was fetched in has just closed: the series ends exactly at that close (one close
    /// behind, no more), the range ends no later than the bucket that opened then, and the
    /// series expired no more than `max_stale` ago.
    pub(super) fn serves_last_known(
        &self,
        e: &SeriesEntry,
        range: CandleRange,
        g: Granularity,
        now: Instant,
        now_utc: OffsetDateTime,
    ) -> bool {
        self.closes_in_background()
            && e.value.to == g.bucket_start(now_utc)
            && e.value.to == g.next_close(e.value.fetched_utc)
            && e.value.from <= range.start
            && range.end <= e.value.to + g.duration()
            && now <= later(e.fresh_until, self.cfg.max_stale)
    }

    pub(super) async fn fetch_series(
        this: Arc<Inner>,
        key: (ProductId, Granularity),
        range: CandleRange,
        refetch_in_progress: bool,
    ) -> Result<SeriesEntry> {
        let (product, g) = &key;
        let now = Instant::now();
        let now_utc = this.clock.utc_at(now);
        let current_end = g.next_close(now_utc);
        let want_end = range.end.min(current_end).max(range.start + g.duration());
        let existing_entry = this.series.get(&key).await;
        // `InProgressCandle::Exact`: a series whose candle in progress is too old is refreshed
        // from that bucket (closed candles are still never fetched again), unless a flight
        // since the caller's read already did.
        let refetch = refetch_in_progress
            && existing_entry.as_ref().is_some_and(|e| this.in_progress_too_old(e, *g, now, now_utc));
        if refetch {
            inc(&this.counters.in_progress_refetches);
        }
        let still_fresh = !refetch && existing_entry.as_ref().is_some_and(|e| now < e.fresh_until);
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
        let entry = Entry::new(
            Arc::new(Series { candles, from, to, fetched_utc, patch: None }),
            fetched_at,
            fresh_until.max(now),
        );
        this.series.insert(key, entry.clone()).await;
        Ok(entry)
    }

    /// With [`InProgressCandle::Exact`]: whether `e` holds the bucket in progress at
    /// `now_utc` and was fetched longer than `in_progress_max_age` ago.
    pub(super) fn in_progress_too_old(
        &self,
        e: &SeriesEntry,
        g: Granularity,
        now: Instant,
        now_utc: OffsetDateTime,
    ) -> bool {
        self.cfg.in_progress == InProgressCandle::Exact
            && e.value.to > g.bucket_start(now_utc)
            && e.age(now) > self.cfg.in_progress_max_age
    }

    /// [`InProgressCandle::Live`]: move the candle in progress of every cached series of the
    /// ticker's product by its last-trade price, if the price is newer than what the series
    /// knows and falls in that candle's bucket. Atomic per series (a concurrent fetch's insert
    /// is not overwritten with older data).
    pub(super) async fn patch_live(&self, t: &Ticker) {
        if self.cfg.in_progress != InProgressCandle::Live || t.price_kind != PriceKind::LastTrade {
            return;
        }
        for g in Granularity::ALL {
            let key = (t.product.clone(), g);
            if !self.series.contains_key(&key) {
                continue;
            }
            let t = t.clone();
            let patched = self
                .series
                .entry(key)
                .and_compute_with(|e| async move {
                    use moka::ops::compute::Op;
                    let Some(e) = e else { return Op::Nop };
                    let e = e.into_value();
                    match patched(&e.value, g, &t) {
                        Some(s) => Op::Put(Entry::new(Arc::new(s), e.fetched_at, e.fresh_until)),
                        None => Op::Nop,
                    }
                })
                .await;
            if matches!(patched, moka::ops::compute::CompResult::ReplacedWith(_)) {
                inc(&self.counters.live_patches);
            }
        }
    }

    /// The candles of `s` in `range` as this source's contract for the candle in progress
    /// says, with what the last one is. `latest` is the newest ticker the source holds (applied
    /// at read time too, in case it arrived while the series was being fetched).
    pub(super) fn serve_series(
        &self,
        s: &Series,
        g: Granularity,
        range: CandleRange,
        now_utc: OffsetDateTime,
        latest: Option<&Ticker>,
    ) -> (Vec<Candle>, Option<InProgress>, Option<Provisional>) {
        let open_bucket = g.bucket_start(now_utc);
        let late = match self.cfg.in_progress {
            InProgressCandle::Live => latest.and_then(|t| patched(s, g, t)),
            InProgressCandle::Exact | InProgressCandle::ClosedOnly => None,
        };
        let s = late.as_ref().unwrap_or(s);
        let (v, ip) = match self.cfg.in_progress {
            InProgressCandle::ClosedOnly => {
                let mut v = s.slice(range);
                v.retain(|c| c.start < open_bucket);
                (v, None)
            }
            InProgressCandle::Exact => {
                let v = s.slice(range);
                let ip = v.last().filter(|c| c.start >= open_bucket).map(|c| InProgress {
                    start: c.start,
                    fidelity: CandleFidelity::Exact,
                    as_of: s.fetched_utc,
                    patches: 0,
                });
                (v, ip)
            }
            InProgressCandle::Live => {
                let v = s.slice(range);
                let ip = v.last().filter(|c| c.start >= open_bucket).map(|c| match s.patch {
                    Some(p) => InProgress {
                        start: c.start,
                        fidelity: CandleFidelity::Patched,
                        as_of: p.as_of,
                        patches: p.count,
                    },
                    None => InProgress {
                        start: c.start,
                        fidelity: CandleFidelity::Exact,
                        as_of: s.fetched_utc,
                        patches: 0,
                    },
                });
                (v, ip)
            }
        };
        // A closed last candle whose bucket ended after the fetch was in progress then: it is
        // the last known state of that bucket, not the exchange's final candle.
        let provisional = v
            .last()
            .filter(|c| {
                let end = c.start + g.duration();
                c.start < open_bucket && end > s.fetched_utc && end <= now_utc
            })
            .map(|c| match s.patch {
                Some(p) => Provisional {
                    start: c.start,
                    fidelity: CandleFidelity::Patched,
                    as_of: p.as_of,
                    patches: p.count,
                },
                None => Provisional {
                    start: c.start,
                    fidelity: CandleFidelity::Exact,
                    as_of: s.fetched_utc,
                    patches: 0,
                },
            });
        (v, ip, provisional)
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

/// `s` with its last candle moved by `t`'s price, or `None` when `t` is not a last trade in
/// that candle's bucket newer than what `s` already knows.
fn patched(s: &Series, g: Granularity, t: &Ticker) -> Option<Series> {
    if t.price_kind != PriceKind::LastTrade {
        return None;
    }
    let last = s.candles.last()?;
    let as_of = s.patch.map_or(s.fetched_utc, |p| p.as_of);
    if t.time < last.start || t.time >= last.start + g.duration() || t.time <= as_of {
        return None;
    }
    let mut out = s.clone();
    let c = out.candles.last_mut()?;
    c.close = t.price;
    c.high = c.high.max(t.price);
    c.low = c.low.min(t.price);
    out.patch = Some(Patch { as_of: t.time, count: s.patch.map_or(0, |p| p.count) + 1 });
    Some(out)
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
