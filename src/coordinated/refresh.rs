//! Series refreshed in the background when their candle closes
//! ([`AfterClose::ServeLastKnown`](super::AfterClose::ServeLastKnown)): a queue in a fair order,
//! a bounded number of refreshes in flight, and when each close's series became exact again.
//!
//! A read of a series queues it for the close of the bucket it was fetched in (once; the fast
//! path of a hit is two map lookups under a mutex never held across an await). One worker task
//! per source pops the queue in due order (the series' `fresh_until`: the close, the grace and
//! the series' own jitter; ties by a hash of the series and the close, so the order never
//! depends on which bot read first and changes from close to close) and starts each refresh as
//! its own task through the source's single-flight and rate limiter. The worker holds the
//! source weakly: dropping the last handle of the source wakes it and it ends.

use std::{
    collections::{BTreeMap, HashMap, HashSet, hash_map::DefaultHasher},
    hash::{Hash, Hasher},
    sync::{Arc, Mutex, Weak},
};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::{sync::Notify, task::JoinHandle, time::Instant};

use super::{CoordinatedSource, Inner, cache::SeriesEntry};
use crate::{
    model::{CandleRange, Granularity, ProductId},
    util::lock,
};

type Key = (ProductId, Granularity);

/// Closes remembered for [`CloseRefreshStats::recent_closes`].
const RECENT_CLOSES: usize = 8;

/// The background refreshes of candle series after their candle closed
/// ([`AfterClose::ServeLastKnown`](crate::AfterClose::ServeLastKnown)).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CloseRefreshStats {
    /// Series refreshed in the background after a close (each one upstream call, counted in
    /// `upstream_calls` too, or a join of a read's own fetch).
    pub refreshed: u64,
    /// Background refreshes that failed: the series stays provisional and its next read queues
    /// it again.
    pub failed: u64,
    /// Series whose close has come and whose refresh has not landed: due in the queue, or
    /// in flight (the backlog).
    pub pending: u64,
    /// Series read since their last fetch, queued for a close still to come.
    pub scheduled: u64,
    /// The most recent closes (up to 8), oldest first.
    pub recent_closes: Vec<CloseSettlement>,
}

/// How the series read before one close became exact again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloseSettlement {
    /// When their candles closed (the end of the bucket they were fetched in).
    #[serde(with = "time::serde::rfc3339")]
    pub close: OffsetDateTime,
    /// Series read before the close, queued for their refresh.
    pub series: u64,
    /// Of them, exact again (refreshed since the close).
    pub exact: u64,
    /// Time from the close until the last of them became exact, on tokio's clock; `None` while
    /// some still wait.
    pub last_exact_after_ms: Option<f64>,
}

/// One series waiting for its refresh: the close its cached candles predate.
#[derive(Debug, Clone)]
pub(super) struct Item {
    key: Key,
    close: OffsetDateTime,
}

/// The queue's order: due time, then the per-close hash, then arrival (only to keep keys
/// unique).
type Order = (Instant, u64, u64);

enum Slot {
    Queued(Order),
    InFlight,
}

struct Progress {
    /// The close on tokio's clock.
    at: Instant,
    series: u64,
    waiting: HashSet<Key>,
    last_exact: Option<Instant>,
}

#[derive(Default)]
struct State {
    due: BTreeMap<Order, Item>,
    slots: HashMap<Key, Slot>,
    seq: u64,
    in_flight: usize,
    closes: BTreeMap<OffsetDateTime, Progress>,
    refreshed: u64,
    failed: u64,
}

impl State {
    /// `key` is exact again for `close` at `at` (or has left the cache: `gone`).
    fn settle(&mut self, key: &Key, close: OffsetDateTime, at: Instant, gone: bool) {
        if let Some(p) = self.closes.get_mut(&close)
            && p.waiting.remove(key)
        {
            if gone {
                p.series -= 1;
            } else {
                p.last_exact = Some(p.last_exact.map_or(at, |t| t.max(at)));
            }
        }
    }
}

/// What the worker does next.
pub(super) enum Next {
    Start(Item),
    Until(Instant),
    Wait,
}

/// How a refresh ended.
pub(super) enum Outcome {
    /// The worker's refresh (or the read's fetch it joined) landed.
    Refreshed,
    /// Someone else refreshed the series before its turn.
    AlreadyExact,
    /// The series was made fresh for longer since it was queued (a stream's push extends it):
    /// its turn comes again then.
    NotYet(Instant),
    /// The refresh failed; the series stays provisional.
    Failed,
    /// The series left the cache.
    Gone,
}

/// The queue of one source.
#[derive(Default)]
pub(super) struct CloseQueue {
    state: Mutex<State>,
    notify: Arc<Notify>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for CloseQueue {
    fn drop(&mut self) {
        // The source is going away: wake the worker so it sees that and ends.
        self.notify.notify_one();
    }
}

fn tiebreak(key: &Key, close: OffsetDateTime) -> u64 {
    // SipHash with fixed keys: the same order for the same series and close in every process.
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    close.unix_timestamp().hash(&mut h);
    h.finish()
}

impl CloseQueue {
    /// Queue `key`, cached as `e`, for the close of the bucket it was fetched in (due at
    /// `e.fresh_until`; `close_at` is the close on tokio's clock). Returns whether the item is
    /// new (the caller then makes sure the worker runs).
    pub(super) fn schedule(&self, key: &Key, e: &SeriesEntry, close_at: Instant) -> bool {
        let close = e.value.to;
        let mut st = lock(&self.state);
        match st.slots.get(key) {
            Some(Slot::InFlight) => return false,
            Some(Slot::Queued(order)) => {
                let order = *order;
                match st.due.get(&order).map(|i| i.close) {
                    Some(c) if c == close => return false,
                    // The series moved past the close it was queued for: someone refreshed it.
                    Some(old) => {
                        st.due.remove(&order);
                        st.settle(key, old, Instant::now(), false);
                    }
                    None => {}
                }
            }
            None => {}
        }
        st.seq += 1;
        let order = (e.fresh_until, tiebreak(key, close), st.seq);
        st.due.insert(order, Item { key: key.clone(), close });
        st.slots.insert(key.clone(), Slot::Queued(order));
        let p = st.closes.entry(close).or_insert_with(|| Progress {
            at: close_at,
            series: 0,
            waiting: HashSet::new(),
            last_exact: None,
        });
        if p.waiting.insert(key.clone()) {
            p.series += 1;
        }
        while st.closes.len() > RECENT_CLOSES {
            st.closes.pop_first();
        }
        let first = st.due.first_key_value().is_some_and(|(o, _)| *o == order);
        drop(st);
        if first {
            self.notify.notify_one();
        }
        true
    }

    /// Start the worker if it is not running (it ends with the source, or with the runtime it
    /// was spawned on).
    pub(super) fn ensure_worker(&self, inner: &Arc<Inner>) {
        let mut w = lock(&self.worker);
        if w.as_ref().is_none_or(JoinHandle::is_finished) {
            *w = Some(tokio::spawn(run(Arc::downgrade(inner))));
        }
    }

    fn next(&self, now: Instant, max_in_flight: usize) -> Next {
        let mut st = lock(&self.state);
        if st.in_flight >= max_in_flight {
            return Next::Wait;
        }
        let Some((&order, _)) = st.due.first_key_value() else { return Next::Wait };
        if order.0 > now {
            return Next::Until(order.0);
        }
        let Some(item) = st.due.remove(&order) else { return Next::Wait };
        st.slots.insert(item.key.clone(), Slot::InFlight);
        st.in_flight += 1;
        Next::Start(item)
    }

    fn finish(&self, item: &Item, outcome: Outcome, now: Instant) {
        let mut st = lock(&self.state);
        st.in_flight = st.in_flight.saturating_sub(1);
        if matches!(st.slots.get(&item.key), Some(Slot::InFlight)) {
            st.slots.remove(&item.key);
        }
        match outcome {
            Outcome::Refreshed => {
                st.refreshed += 1;
                st.settle(&item.key, item.close, now, false);
            }
            Outcome::AlreadyExact => st.settle(&item.key, item.close, now, false),
            Outcome::NotYet(due) => {
                st.seq += 1;
                let order = (due, tiebreak(&item.key, item.close), st.seq);
                st.due.insert(order, item.clone());
                st.slots.insert(item.key.clone(), Slot::Queued(order));
            }
            Outcome::Failed => st.failed += 1,
            Outcome::Gone => st.settle(&item.key, item.close, now, true),
        }
        drop(st);
        self.notify.notify_one();
    }

    pub(super) fn stats(&self) -> CloseRefreshStats {
        let st = lock(&self.state);
        let now = Instant::now();
        let due = st.due.range(..(now, u64::MAX, u64::MAX)).count();
        CloseRefreshStats {
            refreshed: st.refreshed,
            failed: st.failed,
            pending: (due + st.in_flight) as u64,
            scheduled: (st.due.len() - due) as u64,
            recent_closes: st
                .closes
                .iter()
                .map(|(close, p)| CloseSettlement {
                    close: *close,
                    series: p.series,
                    exact: p.series - p.waiting.len() as u64,
                    last_exact_after_ms: match (p.waiting.is_empty(), p.last_exact) {
                        (true, Some(t)) => Some(t.saturating_duration_since(p.at).as_secs_f64() * 1000.0),
                        _ => None,
                    },
                })
                .collect(),
        }
    }
}

/// The worker: start each due refresh, at most `close_refresh_concurrency` at once.
async fn run(weak: Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let notify = Arc::clone(&inner.closes.notify);
        let notified = notify.notified();
        tokio::pin!(notified);
        // Registered before looking at the queue: a change after the look wakes us.
        notified.as_mut().enable();
        match inner.closes.next(Instant::now(), inner.cfg.close_refresh_concurrency) {
            Next::Start(item) => {
                tokio::spawn(refresh(Arc::clone(&inner), item));
            }
            Next::Until(t) => {
                drop(inner);
                tokio::select! {
                    () = tokio::time::sleep_until(t) => {}
                    () = &mut notified => {}
                }
            }
            Next::Wait => {
                drop(inner);
                notified.await;
            }
        }
    }
}

/// Refresh one series from the bucket that has closed, unless someone did already.
async fn refresh(inner: Arc<Inner>, item: Item) {
    let outcome = match inner.series.get(&item.key).await {
        None => Outcome::Gone,
        Some(e) if e.value.to > item.close => Outcome::AlreadyExact,
        Some(e) if Instant::now() < e.fresh_until => Outcome::NotYet(e.fresh_until),
        Some(e) => {
            let g = item.key.1;
            let now_utc = inner.clock.utc_at(Instant::now());
            let end = g.next_close(now_utc).max(item.close + g.duration());
            match CandleRange::new(e.value.from, end) {
                Err(_) => Outcome::Gone,
                Ok(range) => {
                    let source = CoordinatedSource { inner: Arc::clone(&inner) };
                    match source.series_flight(item.key.clone(), range, false).await.0 {
                        Ok(e) if e.value.to > item.close => Outcome::Refreshed,
                        Ok(_) | Err(_) => Outcome::Failed,
                    }
                }
            }
        }
    };
    inner.closes.finish(&item, outcome, Instant::now());
}
