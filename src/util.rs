//! Crate plumbing shared by every module: poison-free locking, relaxed counters, and the serde
//! form of durations in plain-data configuration.

use std::sync::{
    Mutex, MutexGuard,
    atomic::{AtomicU64, Ordering},
};

/// Lock a std mutex, recovering from poisoning. Every mutex of the crate guards plain data
/// (timestamps, counters, queues) that a panicking holder cannot leave half-written in a way
/// that matters more than losing the whole process, so the data are used as they are.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Count one event (relaxed: counters are read as statistics, never to synchronise).
pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Count `n` events (relaxed, as [`inc`]).
pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Builder setters that write one field of the builder's plain-data config (`self.cfg`): the
/// one way every builder over a serde config (coordinated source, shared tier) exposes its
/// knobs, each documented by a link to the field.
macro_rules! setters {
    ($($(#[$m:meta])* $name:ident: $ty:ty),* $(,)?) => {
        $( $(#[$m])* pub fn $name(mut self, v: $ty) -> Self { self.cfg.$name = v; self } )*
    };
}
pub(crate) use setters;

/// Serialize a [`std::time::Duration`] as whole milliseconds.
pub(crate) mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// The size of the future `f` returns, without calling it (tests that bound a hot path's
/// future, which its caller stores and moves once per call).
#[cfg(test)]
pub(crate) fn returned_size<A, B, F: std::future::Future>(_: impl Fn(A, B) -> F) -> usize {
    std::mem::size_of::<F>()
}
