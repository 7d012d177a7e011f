//! Cross-process single-flight: look keys up in Redis, lease the missing ones, fetch what this
//! process leased, wait for what others leased, and take a lease over when its holder dies.
//!
//! One [`LOOKUP`](super::scripts) round trip answers every key of a call at once, atomically:
//! identical batches from many processes therefore land whole on one process, not split
//! between several. A holder keeps its leases alive while it fetches (a heartbeat every third
//! of `lease_ttl`), so a slow fetch (waiting for the rate limit) is not taken over; a holder
//! that dies stops extending them, and they expire after `lease_ttl`. Waiters poll on the
//! tokio clock every `lease_poll`: polling needs no subscription state to rebuild after a
//! reconnect, and a poll costs one round trip for every key still awaited.

use std::{future::Future, pin::Pin, sync::atomic::Ordering, time::Duration};

use ::redis::aio::ConnectionManager;
use serde::{Serialize, de::DeserializeOwned};
use tokio::{task::JoinHandle, time::Instant};

use super::{
    Inner, RedisDown,
    codec::{self, Envelope, Keys, Outcome, WireError},
    health::Path,
    scripts::{self, Slot},
};
use crate::error::{Error, Result};

/// A boxed, sendable future (what the fetch callbacks return).
pub(crate) type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The answer for one key: a value, `None` for an unknown product, or an error.
pub(crate) type Answer<T> = Result<Option<T>>;

/// What a fetch produced for one key, and how long to share it.
#[derive(Debug)]
pub(crate) struct Fetched<T> {
    pub(crate) answer: Answer<T>,
    /// How long other processes may use it; `None`: do not share (the lease is released).
    pub(crate) ttl: Option<Duration>,
}

impl<T> Fetched<T> {
    pub(crate) fn value(v: T, ttl: Duration) -> Self {
        Fetched { answer: Ok(Some(v)), ttl: Some(ttl) }
    }

    pub(crate) fn not_found(ttl: Duration) -> Self {
        Fetched { answer: Ok(None), ttl: Some(ttl) }
    }

    /// An error, shared for `error_ttl` only when it says something about the upstream rather
    /// than about this request or this process.
    pub(crate) fn error(e: Error, error_ttl: Duration) -> Self {
        let ttl = WireError::shareable(&e).map(|_| error_ttl);
        Fetched { answer: Err(e), ttl }
    }
}

/// The fetch callback: fetch the keys at these indices on this path, one [`Fetched`] per
/// index, in order. `Err(RedisDown)` when Redis failed on the way (the rate-limit check).
pub(crate) type FetchFn<'a, T> = dyn Fn(Path, Vec<usize>) -> BoxFut<'a, std::result::Result<Vec<Fetched<T>>, RedisDown>>
    + Send
    + Sync
    + 'a;

fn owner_token() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

fn to_answer<T>(o: Outcome<T>) -> Answer<T> {
    match o {
        Outcome::Value(v) => Ok(Some(v)),
        Outcome::NotFound => Ok(None),
        // `decode` only lets known error kinds through.
        Outcome::Failed(w) => Err(w.to_error().unwrap_or(Error::Timeout)),
    }
}

fn to_outcome<T>(a: &Answer<T>) -> Option<Outcome<&T>> {
    Some(match a {
        Ok(Some(v)) => Outcome::Value(v),
        Ok(None) => Outcome::NotFound,
        Err(e) => Outcome::Failed(WireError::shareable(e)?),
    })
}

/// Keeps leases alive while their holder fetches; releases them (best effort) if dropped
/// before [`done`](LeaseGuard::done), e.g. when the caller's future is cancelled.
struct LeaseGuard {
    heartbeat: JoinHandle<()>,
    release: Option<(ConnectionManager, Vec<String>, String, Duration)>,
}

impl LeaseGuard {
    fn start(
        conn: ConnectionManager,
        leases: Vec<String>,
        owner: String,
        ttl: Duration,
        timeout: Duration,
    ) -> Self {
        let (mut c, l, o) = (conn.clone(), leases.clone(), owner.clone());
        let every = (ttl / 3).max(Duration::from_millis(1));
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                // A failure here is noticed by the holder's next Redis call.
                let _ = tokio::time::timeout(timeout, scripts::extend(&mut c, &l, &o, ttl)).await;
            }
        });
        LeaseGuard { heartbeat, release: Some((conn, leases, owner, timeout)) }
    }

    /// The fetch finished and its results are about to be stored: stop extending, keep the
    /// leases for the store to drop.
    fn done(mut self) {
        self.release = None;
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.heartbeat.abort();
        if let Some((mut conn, leases, owner, timeout)) = self.release.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = tokio::time::timeout(timeout, scripts::release(&mut conn, &leases, &owner)).await;
            });
        }
    }
}

impl Inner {
    /// Resolve `keys` through Redis on the shared `path`, filling `answers`. On `Err`, the
    /// answers still `None` must be fetched without Redis.
    pub(crate) async fn flight<T>(
        &self,
        keys: &[String],
        path: Path,
        fetch: &FetchFn<'_, T>,
        answers: &mut [Option<Answer<T>>],
    ) -> std::result::Result<(), RedisDown>
    where
        T: Serialize + DeserializeOwned + Send,
    {
        let c = &self.counters;
        let cfg = &self.cfg;
        let leases: Vec<String> = keys.iter().map(|k| Keys::lease(k)).collect();
        let owner = owner_token();
        let deadline = Instant::now() + cfg.lease_wait_max;
        let mut pending: Vec<usize> = (0..keys.len()).collect();
        let mut waited = vec![false; keys.len()];
        loop {
            let pk: Vec<String> = pending.iter().map(|&i| keys[i].clone()).collect();
            let pl: Vec<String> = pending.iter().map(|&i| leases[i].clone()).collect();
            let mut conn = self.conn();
            let slots = self.op(scripts::lookup(&mut conn, &pk, &pl, &owner, cfg.lease_ttl)).await?;
            let mut mine = Vec::new();
            let mut theirs = Vec::new();
            for (&i, slot) in pending.iter().zip(slots) {
                match slot {
                    Slot::Value(bytes) => match codec::decode::<T>(&bytes) {
                        Some(env) => {
                            let counter = if waited[i] { &c.lease_waits_served } else { &c.l2_hits };
                            counter.fetch_add(1, Ordering::Relaxed);
                            answers[i] = Some(to_answer(env.outcome));
                        }
                        None => {
                            // Another version's value (or damage): fetch and overwrite it.
                            c.decode_failures.fetch_add(1, Ordering::Relaxed);
                            c.l2_misses.fetch_add(1, Ordering::Relaxed);
                            mine.push(i);
                        }
                    },
                    Slot::Mine => {
                        let counter = if waited[i] { &c.lease_takeovers } else { &c.l2_misses };
                        counter.fetch_add(1, Ordering::Relaxed);
                        c.leases_acquired.fetch_add(1, Ordering::Relaxed);
                        mine.push(i);
                    }
                    Slot::Theirs => {
                        if !waited[i] {
                            waited[i] = true;
                            c.lease_waits.fetch_add(1, Ordering::Relaxed);
                        }
                        theirs.push(i);
                    }
                }
            }
            if !mine.is_empty() {
                let my_leases: Vec<String> = mine.iter().map(|&i| leases[i].clone()).collect();
                let guard = LeaseGuard::start(
                    conn.clone(),
                    my_leases,
                    owner.clone(),
                    cfg.lease_ttl,
                    cfg.redis_timeout,
                );
                // On Err the guard drops here and releases the leases: waiters take over at once.
                let fetched = fetch(path, mine.clone()).await?;
                guard.done();
                let at = self.clock.now_utc().unix_timestamp_nanos() / 1_000_000;
                let at = i64::try_from(at).unwrap_or(0);
                let mut items = Vec::new();
                let mut unshared = Vec::new();
                for (&i, f) in mine.iter().zip(fetched) {
                    let payload = match (f.ttl, to_outcome(&f.answer)) {
                        (Some(ttl), Some(outcome)) => {
                            codec::encode(&Envelope { at, outcome }).ok().map(|b| (b, ttl))
                        }
                        _ => None,
                    };
                    match payload {
                        Some((bytes, ttl)) => items.push((keys[i].clone(), leases[i].clone(), bytes, ttl)),
                        None => unshared.push(leases[i].clone()),
                    }
                    answers[i] = Some(f.answer);
                }
                self.op(scripts::store(&mut conn, &items, &owner)).await?;
                self.op(scripts::release(&mut conn, &unshared, &owner)).await?;
            }
            if theirs.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                for i in theirs {
                    c.lease_wait_timeouts.fetch_add(1, Ordering::Relaxed);
                    answers[i] = Some(Err(Error::Timeout));
                }
                return Ok(());
            }
            pending = theirs;
            tokio::time::sleep(cfg.lease_poll).await;
        }
    }
}
