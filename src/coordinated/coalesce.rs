//! Single-flight: at most one upstream fetch per key in flight; every caller that asks for the
//! key meanwhile waits for that fetch and gets a clone of its result (or of its error).
//!
//! The fetch runs in its own task, so a caller that is dropped (cancelled) neither cancels the
//! fetch for the others nor leaves the key stuck: the key is removed by a guard when the task
//! ends, even by a panic.

use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    sync::{Arc, Mutex},
};

use tokio::sync::watch;

use crate::{
    error::{Error, Result},
    util::lock,
};

type Slot<V> = watch::Receiver<Option<Result<V>>>;

pub(crate) struct SingleFlight<K, V> {
    inflight: Mutex<HashMap<K, Slot<V>>>,
}

/// How a caller took part in a flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// It started the fetch.
    Leader,
    /// It joined a fetch already in flight.
    Joined,
}

impl<K, V> SingleFlight<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(SingleFlight { inflight: Mutex::new(HashMap::new()) })
    }

    /// Number of keys in flight.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.inflight).len()
    }

    /// Wait for the fetch of `key` in flight, if any, to finish (its result is the cache's).
    pub(crate) async fn wait_if_running(&self, key: &K) {
        let rx = lock(&self.inflight).get(key).cloned();
        if let Some(mut rx) = rx {
            let _ = rx.wait_for(Option::is_some).await;
        }
    }

    /// Run `make()` for `key` unless a fetch for it is already in flight, then wait for the
    /// result. `make` is called at most once, and only by the leader.
    pub(crate) async fn run<F, Fut>(self: &Arc<Self>, key: K, make: F) -> (Result<V>, Role)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V>> + Send + 'static,
    {
        let (mut rx, role) = {
            let mut map = lock(&self.inflight);
            match map.get(&key) {
                Some(rx) => (rx.clone(), Role::Joined),
                None => {
                    let (tx, rx) = watch::channel(None);
                    map.insert(key.clone(), rx.clone());
                    let fut = make();
                    let guard = RemoveOnDrop { flight: Arc::clone(self), key: Some(key) };
                    tokio::spawn(async move {
                        let result = fut.await;
                        // Remove the key before publishing: a caller arriving after this point
                        // sees the cache the fetch has already written, or starts a new fetch.
                        drop(guard);
                        let _ = tx.send(Some(result));
                    });
                    (rx, Role::Leader)
                }
            }
        };
        let result = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or_else(|| Err(closed())),
            Err(_) => Err(closed()),
        };
        (result, role)
    }
}

fn closed() -> Error {
    Error::Closed("the upstream fetch task stopped before answering".into())
}

struct RemoveOnDrop<K: Eq + Hash, V> {
    flight: Arc<SingleFlight<K, V>>,
    key: Option<K>,
}

impl<K: Eq + Hash, V> Drop for RemoveOnDrop<K, V> {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            lock(&self.flight.inflight).remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_fetch() {
        let flight: Arc<SingleFlight<u32, u64>> = SingleFlight::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for _ in 0..1000 {
            let (f, c) = (flight.clone(), calls.clone());
            handles.push(tokio::spawn(async move {
                f.run(7, move || async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(42)
                })
                .await
            }));
        }
        let mut leaders = 0;
        for h in handles {
            let (r, role) = h.await.unwrap();
            assert_eq!(r.unwrap(), 42);
            leaders += usize::from(role == Role::Leader);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(leaders, 1);
        assert_eq!(flight.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn errors_are_shared_and_not_kept() {
        let flight: Arc<SingleFlight<u32, u64>> = SingleFlight::new();
        let a = flight.run(1, || async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Err(Error::Timeout)
        });
        let b = flight.run(1, || async { Ok(1) });
        let ((ra, _), (rb, role_b)) = tokio::join!(a, b);
        assert_eq!(ra, Err(Error::Timeout));
        assert_eq!(rb, Err(Error::Timeout));
        assert_eq!(role_b, Role::Joined);
        // The error is not cached: the next call fetches again.
        let (r, role) = flight.run(1, || async { Ok(5) }).await;
        assert_eq!((r, role), (Ok(5), Role::Leader));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_neither_cancels_nor_poisons() {
        let flight: Arc<SingleFlight<u32, u64>> = SingleFlight::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let leader = tokio::spawn({
            let f = flight.clone();
            async move {
                f.run(9, move || async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok(3)
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let follower = tokio::spawn({
            let f = flight.clone();
            async move { f.run(9, || async { Ok(0) }).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        leader.abort(); // the caller that started the fetch goes away
        let (r, role) = follower.await.unwrap();
        assert_eq!((r, role), (Ok(3), Role::Joined));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(flight.len(), 0);
    }

    #[tokio::test]
    async fn a_panicking_fetch_frees_the_key() {
        let flight: Arc<SingleFlight<u32, u64>> = SingleFlight::new();
        let (r, _) = flight
            .run(1, || async {
                if true {
                    panic!("boom");
                }
                Ok(0)
            })
            .await;
        assert!(matches!(r, Err(Error::Closed(_))));
        assert_eq!(flight.len(), 0);
        assert_eq!(flight.run(1, || async { Ok(2) }).await.0, Ok(2));
    }
}
