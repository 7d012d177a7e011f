//! [`RetryPolicy`]: when and after how long a failed upstream call is sent again, one value
//! for every layer that retries.
//!
//! The policy holds its classifier, as reqwest-retry's `RetryTransientMiddleware` does: an
//! error is retried when it [is worth it](crate::Error::is_worth_retrying) (retryable, and
//! a request actually left), after the wait the exchange asked for (`Retry-After`, a reset
//! time) or else an exponential backoff with jitter, capped at
//! [`max_wait`](RetryPolicy::max_wait). A wait the exchange asks for that is longer than the
//! cap is not made: a huge `Retry-After` becomes the error at once instead of a sleep.
//!
//! # One owner per call
//!
//! A [`CoordinatedSource`](crate::CoordinatedSource) over a
//! [`CoinbaseClient`](crate::CoinbaseClient) has two layers that could retry. Attempts must
//! not multiply ((1 + 2) × (1 + n) requests for one read): the outermost layer whose policy
//! retries owns the call, and every layer below it makes one attempt per attempt of the owner.
//! The ownership is a tokio task-local, so it follows the call through the layers of one task
//! and ends with it. It carries the owner's attempt number (1-based), so a layer below that
//! makes single attempts still knows which attempt of the call it is making (the
//! `upstream_request` span's `attempt` field).

use std::{future::Future, time::Duration};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

tokio::task_local! {
    /// Set while a layer that retries runs one attempt, to that attempt's number (1-based): the
    /// layers below make single attempts and report this number.
    static RETRY_OWNED: u32;
}

/// When and how long to wait before sending a failed call again.
///
/// ```
/// use std::time::Duration;
/// use tickshare::RetryPolicy;
/// let policy = RetryPolicy::new(3).backoff(Duration::from_millis(100)).max_wait(Duration::from_secs(2));
/// assert_eq!(policy.max_retries, 3);
/// assert!(RetryPolicy::none().max_retries == 0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0: never retry).
    pub max_retries: u32,
    /// The first retry's delay when the error gives none; doubles with each retry, plus up to
    /// 25 % random jitter so that many callers do not retry in step.
    #[serde(with = "crate::util::duration_ms")]
    pub backoff: Duration,
    /// The longest wait before a retry: the backoff stops growing here, and a retry the
    /// exchange asks to delay longer (a large `Retry-After`) is not made: the caller gets the
    /// error at once.
    #[serde(with = "crate::util::duration_ms")]
    pub max_wait: Duration,
}

impl Default for RetryPolicy {
    /// No retries; 250 ms first backoff and a 5 s cap once retries are turned on.
    fn default() -> Self {
        RetryPolicy { max_retries: 0, backoff: Duration::from_millis(250), max_wait: Duration::from_secs(5) }
    }
}

impl RetryPolicy {
    /// A policy of `max_retries` retries with the default backoff (250 ms) and cap (5 s).
    pub const fn new(max_retries: u32) -> Self {
        RetryPolicy { max_retries, backoff: Duration::from_millis(250), max_wait: Duration::from_secs(5) }
    }

    /// Never retry.
    pub const fn none() -> Self {
        Self::new(0)
    }

    /// The first retry's delay (see [`backoff`](RetryPolicy::backoff)).
    #[must_use]
    pub const fn backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    /// The longest wait before a retry (see [`max_wait`](RetryPolicy::max_wait)).
    #[must_use]
    pub const fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// The wait before retry number `retry` (1-based) after `error`, or `None` when no retry is
    /// made: the retries are used up, the error is not [worth retrying](Error::is_worth_retrying),
    /// or the exchange asked for a wait beyond [`max_wait`](RetryPolicy::max_wait).
    pub fn delay(&self, retry: u32, error: &Error) -> Option<Duration> {
        if retry == 0 || retry > self.max_retries || !error.is_worth_retrying() {
            return None;
        }
        if let Some(asked) = error.retry_after() {
            return (asked <= self.max_wait).then_some(asked);
        }
        let base = self.backoff.saturating_mul(1u32 << (retry - 1).min(20));
        let jitter = Duration::try_from_secs_f64(base.as_secs_f64() * fastrand::f64() * 0.25);
        Some(base.saturating_add(jitter.unwrap_or(Duration::ZERO)).min(self.max_wait))
    }

    /// Run `attempt` under this policy: again after each error for which
    /// [`delay`](RetryPolicy::delay) gives a wait, sleeping on tokio's clock in between.
    /// `attempt(n)` is given the attempt's number, 1 for the first.
    /// `on_retry(retry, &error, wait)` is told of each retry before its wait.
    ///
    /// Inside an attempt of a layer above that retries, `attempt` runs once, with the number
    /// of that layer's attempt: that layer owns the call (see the [module docs](self)).
    ///
    /// # Errors
    /// The last attempt's error.
    pub(crate) async fn run<T, F, Fut>(
        &self,
        mut attempt: F,
        mut on_retry: impl FnMut(u32, &Error, Duration),
    ) -> Result<T>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        if let Ok(owner) = RETRY_OWNED.try_with(|n| *n) {
            return attempt(owner).await;
        }
        if self.max_retries == 0 {
            return attempt(1).await;
        }
        let mut retry = 0;
        loop {
            let number = retry + 1;
            let e = match RETRY_OWNED.scope(number, attempt(number)).await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            retry += 1;
            let Some(wait) = self.delay(retry, &e) else { return Err(e) };
            on_retry(retry, &e, wait);
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    const FAIL: fn() -> Error = || Error::Upstream { status: 503, message: "down".into() };

    #[test]
    fn delay_doubles_with_jitter_and_respects_the_cap() {
        let p = RetryPolicy::new(30).backoff(Duration::from_millis(100)).max_wait(Duration::from_secs(1));
        for (retry, base) in [(1, 100), (2, 200), (3, 400), (4, 800)] {
            let d = p.delay(retry, &FAIL()).unwrap();
            let base = Duration::from_millis(base);
            assert!(d >= base && d <= base + base / 4, "retry {retry}: {d:?}");
        }
        // 1.6 s > max_wait: the backoff stops at the cap; no overflow however many retries.
        assert_eq!(p.delay(5, &FAIL()), Some(Duration::from_secs(1)));
        assert_eq!(p.delay(30, &FAIL()), Some(Duration::from_secs(1)));
        assert_eq!(p.delay(31, &FAIL()), None, "retries used up");
        assert_eq!(
            RetryPolicy::new(u32::MAX).max_wait(Duration::MAX).delay(u32::MAX, &FAIL()).map(|_| ()),
            Some(())
        );
    }

    #[test]
    fn delay_honours_retry_after_but_bounded() {
        let p = RetryPolicy::new(2).max_wait(Duration::from_secs(5));
        let limited = |s| Error::RateLimited { retry_after: Some(Duration::from_secs(s)), local: false };
        assert_eq!(p.delay(1, &limited(3)), Some(Duration::from_secs(3)));
        assert_eq!(p.delay(1, &limited(3600)), None, "an hour's Retry-After is not slept");
        assert_eq!(p.delay(3, &limited(1)), None, "retries used up");
        assert_eq!(p.delay(0, &limited(1)), None);
    }

    #[test]
    fn local_refusals_and_fatal_errors_are_not_retried() {
        let p = RetryPolicy::new(5);
        for e in [
            Error::RateLimited { retry_after: Some(Duration::from_millis(1)), local: true },
            Error::Overloaded("x".into()),
            Error::NotFound("x".into()),
            Error::Decode("x".into()),
            Error::Upstream { status: 400, message: "x".into() },
        ] {
            assert_eq!(p.delay(1, &e), None, "{e:?}");
        }
        assert!(p.delay(1, &Error::Timeout).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn run_retries_then_gives_up() {
        let calls = AtomicU32::new(0);
        let mut told = Vec::new();
        let r: Result<()> = RetryPolicy::new(2)
            .run(
                |_| async {
                    calls.fetch_add(1, Ordering::Relaxed);
                    Err(FAIL())
                },
                |n, _, _| told.push(n),
            )
            .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::Relaxed), 3);
        assert_eq!(told, vec![1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn nested_policies_do_not_multiply_attempts() {
        let calls = AtomicU32::new(0);
        let inner = RetryPolicy::new(3);
        let outer = RetryPolicy::new(2);
        let r: Result<()> = outer
            .run(
                |_| {
                    inner.run(
                        |_| async {
                            calls.fetch_add(1, Ordering::Relaxed);
                            Err(FAIL())
                        },
                        |_, _, _| {},
                    )
                },
                |_, _, _| {},
            )
            .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::Relaxed), 3, "the outer policy owns the call: 1 + 2 attempts");
        // Alone, the inner policy retries as configured.
        calls.store(0, Ordering::Relaxed);
        let _ = inner
            .run(
                |_| async {
                    calls.fetch_add(1, Ordering::Relaxed);
                    Err::<(), _>(FAIL())
                },
                |_, _, _| {},
            )
            .await;
        assert_eq!(calls.load(Ordering::Relaxed), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_are_numbered_from_one_and_inner_layers_report_the_owners_number() {
        let seen = std::sync::Mutex::new(Vec::new());
        let inner = RetryPolicy::new(3);
        let r: Result<()> = RetryPolicy::new(2)
            .run(
                |outer| {
                    let seen = &seen;
                    // The inner policy would retry 3 times alone; under the owner it makes one
                    // attempt, numbered as the owner's.
                    inner.run(
                        move |inner| async move {
                            seen.lock().unwrap().push((outer, inner));
                            Err(FAIL())
                        },
                        |_, _, _| {},
                    )
                },
                |_, _, _| {},
            )
            .await;
        assert!(r.is_err());
        assert_eq!(*seen.lock().unwrap(), vec![(1, 1), (2, 2), (3, 3)]);
        let mut alone = Vec::new();
        let _: Result<()> = RetryPolicy::none()
            .run(
                |n| {
                    alone.push(n);
                    async { Err(FAIL()) }
                },
                |_, _, _| {},
            )
            .await;
        assert_eq!(alone, vec![1], "no retries: one attempt, number 1");
    }
}
