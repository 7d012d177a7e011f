//! The distributed rate limit: one GCRA budget per API key and endpoint class for every
//! process, on Redis's clock, with this process's local share while Redis is unreachable;
//! and the one upstream call that passes it and records its outcome.

use std::{future::Future, time::Duration};

use tokio::time::Instant;

use super::{Inner, RedisDown, health::Path, scripts};
use crate::{
    error::{Error, Result},
    limiter::{ClassLimit, EndpointClass},
    util::{add, inc},
};

impl Inner {
    /// Wait for permission to send one request of `class` on `path`.
    pub(super) async fn gate(
        &self,
        path: Path,
        class: EndpointClass,
    ) -> std::result::Result<Result<()>, RedisDown> {
        match path {
            Path::Degraded { quiet_until } => {
                tokio::time::sleep_until(quiet_until).await;
                if self.fallback_closed[class.index()] {
                    inc(&self.counters.degraded_refused);
                    return Ok(Err(Error::RateLimited {
                        retry_after: Some(self.cfg.reconnect_interval),
                        local: true,
                    }));
                }
                Ok(self.fallback.acquire(class).await)
            }
            Path::Shared { local_too } => {
                if local_too
                    && !self.fallback_closed[class.index()]
                    && let Err(e) = self.fallback.acquire(class).await
                {
                    return Ok(Err(e));
                }
                self.acquire_shared(class).await
            }
        }
    }

    /// Take one slot of the distributed limiter, waiting in this process's FIFO and then for
    /// Redis's answer, for at most `max_wait`.
    pub(super) async fn acquire_shared(
        &self,
        class: EndpointClass,
    ) -> std::result::Result<Result<()>, RedisDown> {
        let c = &self.counters;
        let start = Instant::now();
        let deadline = start + self.limits.max_wait;
        let refuse = |wait: Duration| {
            inc(&c.shared_rejected_local);
            Ok(Err(Error::RateLimited { retry_after: Some(wait), local: true }))
        };
        let Ok(_turn) = tokio::time::timeout_at(deadline, self.queues[class.index()].lock()).await else {
            return refuse(self.class_limit(class).interval());
        };
        let keys = self.keys.limiter(class);
        let gcra = self.gcra(class);
        let mut waited = false;
        loop {
            let mut conn = self.conn();
            match self.op(scripts::acquire(&mut conn, &keys, gcra, 1, false)).await? {
                None => break,
                Some(wait) => {
                    if Instant::now() + wait > deadline {
                        return refuse(wait);
                    }
                    waited = true;
                    tokio::time::sleep(wait).await;
                }
            }
        }
        inc(&c.shared_acquired);
        if waited {
            inc(&c.shared_waits);
            add(&c.shared_wait_nanos, u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
        Ok(Ok(()))
    }

    pub(super) fn class_limit(&self, class: EndpointClass) -> ClassLimit {
        self.limits.class(class)
    }

    pub(super) fn gcra(&self, class: EndpointClass) -> scripts::Gcra {
        let l = self.class_limit(class);
        scripts::Gcra { interval: l.interval(), burst: l.burst.get() }
    }

    /// Charge `n` requests that were already sent (extra pages) to the budget of `class`.
    pub(super) async fn charge(&self, path: Path, class: EndpointClass, n: u32) {
        if n == 0 {
            return;
        }
        match path {
            Path::Shared { .. } => {
                let mut conn = self.conn();
                let keys = self.keys.limiter(class);
                let _ = self.op(scripts::acquire(&mut conn, &keys, self.gcra(class), n, true)).await;
            }
            Path::Degraded { .. } => {
                for _ in 0..n {
                    let _ = self.fallback.acquire(class).await;
                }
            }
        }
    }

    /// One upstream request on `path`: gate, send, count, and report a 429 to every process.
    pub(super) async fn call<T, Fut>(
        &self,
        path: Path,
        class: EndpointClass,
        send: impl FnOnce() -> Fut,
    ) -> std::result::Result<Result<T>, RedisDown>
    where
        Fut: Future<Output = Result<T>>,
    {
        if let Err(e) = self.gate(path, class).await? {
            return Ok(Err(e));
        }
        inc(&self.counters.upstream_calls);
        let r = send().await;
        self.record(path, class, &r).await;
        Ok(r)
    }

    /// Record the outcome of one upstream request sent on `path`: into the local limiter, the
    /// counters and, for a 429 on the shared path, the pause every process keeps.
    pub(super) async fn record<T>(&self, path: Path, class: EndpointClass, r: &Result<T>) {
        let c = &self.counters;
        // The local limiter pauses too, so that a fall-back right after keeps the pause.
        self.fallback.record(class, r);
        match r {
            Ok(_) => {}
            Err(Error::RateLimited { retry_after, local: false }) => {
                inc(&c.upstream_errors);
                inc(&c.rate_limited_429);
                if let Path::Shared { .. } = path {
                    let mut conn = self.conn();
                    let keys = self.keys.limiter(class);
                    let backoff = scripts::Backoff {
                        base: self.limits.backoff_base,
                        max: self.limits.backoff_max,
                        ramp: self.limits.ramp_up,
                    };
                    if let Ok(pause) =
                        self.op(scripts::penalize(&mut conn, &keys, *retry_after, backoff)).await
                    {
                        inc(&c.shared_pauses);
                        tracing::warn!(
                            class = class.as_str(),
                            pause_ms = pause.as_millis() as u64,
                            "exchange answered 429; pausing the class in every process"
                        );
                    }
                }
            }
            Err(e) => {
                inc(&c.upstream_errors);
                tracing::debug!(class = class.as_str(), error = %e, "upstream call failed");
            }
        }
    }
}
