//! One budget per user: a process-wide registry of limiters by account identity.
//!
//! Coinbase limits private requests **per user** (30/s), and requires one API key per
//! portfolio, so a user with two portfolios runs two keys on one budget. Every client of that
//! user must then draw from one [`RateLimiter`]: [`RateLimiter::shared_for`] hands out the same
//! limiter for the same identity anywhere in the process. The registry holds weak references,
//! so a limiter lives exactly as long as something (a client, a clone) holds it, and a later
//! call after the last holder is gone starts a fresh budget.

use std::{
    collections::HashMap,
    sync::{Arc, LazyLock, Mutex, Weak},
};

use super::{Inner, RateLimiter, RateLimiterConfig};
use crate::{
    error::{Error, Result},
    util::lock,
};

/// The live limiters by identity. A std mutex: held for a map lookup, never across an await.
static REGISTRY: LazyLock<Mutex<HashMap<String, Weak<Inner>>>> = LazyLock::new(Mutex::default);

impl RateLimiter {
    /// The process-wide limiter of the Coinbase user `identity`, shared by every caller that
    /// names the same identity: give it to every client whose key belongs to that user (one
    /// key per portfolio), so that together they stay within the user's one budget.
    ///
    /// The first call for an identity creates the limiter with Coinbase's limits
    /// ([`RateLimiter::coinbase`]); while any handle to it lives, later calls return it
    /// (whatever it was created with, see [`shared_for_with`](Self::shared_for_with)). The
    /// identity is any stable name of the user (an email, a CDP organization or project id),
    /// compared as given. The registry is process-wide: tests that each pause their own
    /// runtime's clock should not share an identity (a limiter keeps time on tokio's clock).
    ///
    /// ```
    /// use tickshare::{EndpointClass, RateLimiter};
    /// let a = RateLimiter::shared_for("alice@example.com");
    /// let b = RateLimiter::shared_for("alice@example.com");
    /// assert!(a.same_as(&b));
    /// assert!(!a.same_as(&RateLimiter::shared_for("bob@example.com")));
    /// assert_eq!(a.account_identity(), Some("alice@example.com"));
    /// ```
    pub fn shared_for(identity: &str) -> RateLimiter {
        let mut map = lock(&REGISTRY);
        if let Some(l) = live(&mut map, identity) {
            return l;
        }
        register(&mut map, identity, RateLimiterConfig::default())
    }

    /// As [`shared_for`](Self::shared_for), creating the limiter with `cfg` if the identity
    /// has none yet.
    ///
    /// # Errors
    /// [`Error::Config`] if `cfg` is invalid, or if a live limiter of `identity` runs with
    /// other settings (one user has one budget: two settings for it would be two budgets).
    pub fn shared_for_with(identity: &str, cfg: RateLimiterConfig) -> Result<RateLimiter> {
        cfg.validate()?;
        let mut map = lock(&REGISTRY);
        match live(&mut map, identity) {
            Some(l) if *l.config() == cfg => Ok(l),
            Some(_) => Err(Error::Config(format!(
                "a rate limiter for account {:?} already runs with other settings; share that one",
                crate::error::truncate(identity, 40)
            ))),
            None => Ok(register(&mut map, identity, cfg)),
        }
    }

    /// The identity this limiter was registered under with
    /// [`shared_for`](Self::shared_for), if any.
    pub fn account_identity(&self) -> Option<&str> {
        self.inner.identity.as_deref()
    }
}

/// The live limiter of `identity`, forgetting every dead entry on the way.
fn live(map: &mut HashMap<String, Weak<Inner>>, identity: &str) -> Option<RateLimiter> {
    map.retain(|_, w| w.strong_count() > 0);
    map.get(identity).and_then(Weak::upgrade).map(|inner| RateLimiter { inner })
}

fn register(map: &mut HashMap<String, Weak<Inner>>, identity: &str, cfg: RateLimiterConfig) -> RateLimiter {
    let limiter = RateLimiter::build(cfg, Some(identity.to_string()));
    map.insert(identity.to_string(), Arc::downgrade(&limiter.inner));
    limiter
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::limiter::EndpointClass;

    #[test]
    fn one_limiter_per_identity_while_it_lives() {
        let a = RateLimiter::shared_for("registry-test-a");
        let again = RateLimiter::shared_for("registry-test-a");
        assert!(a.same_as(&again));
        assert!(!a.same_as(&RateLimiter::shared_for("registry-test-b")));
        assert!(!a.same_as(&RateLimiter::coinbase()), "unregistered limiters stay apart");
        assert_eq!(RateLimiter::coinbase().account_identity(), None);
        // Same settings: the same limiter; other settings: refused.
        assert!(
            RateLimiter::shared_for_with("registry-test-a", RateLimiterConfig::default())
                .unwrap()
                .same_as(&a)
        );
        let other = RateLimiterConfig { max_wait: Duration::from_secs(1), ..Default::default() };
        assert!(matches!(
            RateLimiter::shared_for_with("registry-test-a", other.clone()),
            Err(Error::Config(_))
        ));
        // Weak: once every handle is gone, the budget goes too, and the map forgets it.
        let inner = Arc::downgrade(&a.inner);
        drop((a, again));
        assert_eq!(inner.strong_count(), 0);
        let fresh = RateLimiter::shared_for_with("registry-test-a", other).unwrap();
        assert_eq!(fresh.config().max_wait, Duration::from_secs(1));
        assert!(!lock(&REGISTRY).values().any(|w| w.strong_count() == 0 && w.ptr_eq(&inner)));
    }

    #[tokio::test(start_paused = true)]
    async fn clones_and_registry_handles_draw_on_one_budget() {
        let a = RateLimiter::shared_for("registry-test-budget");
        let b = RateLimiter::shared_for("registry-test-budget");
        for _ in 0..3 {
            a.acquire(EndpointClass::Private).await.unwrap();
            b.acquire(EndpointClass::Private).await.unwrap();
        }
        assert_eq!(a.stats().private.acquired, 6);
    }
}
