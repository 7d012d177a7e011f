//! Whether Redis can be used right now, and how to move between the shared and the
//! in-process regimes without ever exceeding the exchange's limit.
//!
//! Three modes:
//!
//! - **Shared**: every upstream call draws from the distributed limiter in Redis.
//! - **Degraded**: Redis failed. Each process draws from its own conservative share of the
//!   limit. The first call waits one rate-limit window (1 s) after the failure was noticed, so
//!   the requests the shared limiter admitted just before the failure and the new local ones
//!   never fall into the same window. Every `reconnect_interval` one call probes Redis.
//! - **Handover**: Redis answered again. For `2 × reconnect_interval + 1 s` a call must pass
//!   both its local share *and* the shared limiter. Other processes notice the recovery within
//!   one `reconnect_interval` of their next call; until they do they send at most their share,
//!   and since a process in handover sends at most its share too, the sum stays under the limit.
//!   By the time any process leaves handover, every process that is sending has probed Redis
//!   and draws from the shared limiter.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::util::lock;

/// One rate-limit window: how long a process stays quiet after losing Redis.
pub(crate) const WINDOW: Duration = Duration::from_secs(1);

/// The regime a [`SharedTier`](super::SharedTier) runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TierMode {
    /// Redis is reachable: one shared cache, leases and rate limit for every process.
    Shared,
    /// Redis answered again after an outage: calls pass both the local share and the shared
    /// limiter until every process has had time to notice.
    Handover,
    /// Redis is unreachable: in-process operation on a conservative share of the limit.
    Degraded,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Shared,
    Handover { until: Instant },
    Degraded { since: Instant, next_probe: Instant },
}

/// How a call should proceed, decided once at its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Path {
    /// Use Redis; `local_too` during the handover.
    Shared { local_too: bool },
    /// Skip Redis; send nothing before `quiet_until`.
    Degraded { quiet_until: Instant },
}

/// The mode machine and its counters.
#[derive(Debug)]
pub(crate) struct Health {
    state: Mutex<State>,
    probing: AtomicBool,
    reconnect_interval: Duration,
    pub(crate) redis_errors: AtomicU64,
    pub(crate) outages: AtomicU64,
    pub(crate) recoveries: AtomicU64,
}

impl Health {
    /// Start shared (`up`) or degraded.
    pub(crate) fn new(up: bool, reconnect_interval: Duration) -> Self {
        let now = Instant::now();
        let state = if up {
            State::Shared
        } else {
            State::Degraded { since: now, next_probe: now + reconnect_interval }
        };
        Health {
            state: Mutex::new(state),
            probing: AtomicBool::new(false),
            reconnect_interval,
            redis_errors: AtomicU64::new(0),
            outages: AtomicU64::new(u64::from(!up)),
            recoveries: AtomicU64::new(0),
        }
    }

    fn handover(&self) -> Duration {
        self.reconnect_interval.saturating_mul(2) + WINDOW
    }

    /// The mode now.
    pub(crate) fn mode(&self) -> TierMode {
        let now = Instant::now();
        match *lock(&self.state) {
            State::Shared => TierMode::Shared,
            State::Handover { until } if now >= until => TierMode::Shared,
            State::Handover { .. } => TierMode::Handover,
            State::Degraded { .. } => TierMode::Degraded,
        }
    }

    /// How long the current outage has lasted, if any.
    pub(crate) fn degraded_for(&self) -> Option<Duration> {
        match *lock(&self.state) {
            State::Degraded { since, .. } => Some(Instant::now().saturating_duration_since(since)),
            _ => None,
        }
    }

    /// The path of a call starting now.
    pub(crate) fn path(&self) -> Path {
        let now = Instant::now();
        let mut s = lock(&self.state);
        match *s {
            State::Shared => Path::Shared { local_too: false },
            State::Handover { until } if now >= until => {
                *s = State::Shared;
                tracing::info!("redis handover complete; the shared rate limit alone applies");
                Path::Shared { local_too: false }
            }
            State::Handover { .. } => Path::Shared { local_too: true },
            State::Degraded { since, .. } => Path::Degraded { quiet_until: since + WINDOW },
        }
    }

    /// Whether this caller should probe Redis now (at most one caller at a time, once per
    /// `reconnect_interval`). A `true` must be followed by [`probed`](Self::probed).
    pub(crate) fn begin_probe(&self) -> bool {
        let due =
            matches!(*lock(&self.state), State::Degraded { next_probe, .. } if Instant::now() >= next_probe);
        due && self.probing.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// The probe's result: back to shared operation through the handover, or the next probe in
    /// one `reconnect_interval`.
    pub(crate) fn probed(&self, ok: bool) {
        let now = Instant::now();
        {
            let mut s = lock(&self.state);
            if let State::Degraded { since, .. } = *s {
                if ok {
                    *s = State::Handover { until: now + self.handover() };
                    self.recoveries.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        outage_ms = now.saturating_duration_since(since).as_millis() as u64,
                        handover_ms = self.handover().as_millis() as u64,
                        "redis reachable again; handing over to the shared rate limit"
                    );
                } else {
                    *s = State::Degraded { since, next_probe: now + self.reconnect_interval };
                }
            }
        }
        self.probing.store(false, Ordering::Release);
    }

    /// A Redis operation failed: count it, and enter the degraded mode if not there yet.
    pub(crate) fn mark_down(&self, why: &str) {
        self.redis_errors.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut s = lock(&self.state);
        if !matches!(*s, State::Degraded { .. }) {
            *s = State::Degraded { since: now, next_probe: now + self.reconnect_interval };
            self.outages.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                error = why,
                "redis unavailable; continuing in-process on a conservative share of the rate limit"
            );
        } else {
            tracing::debug!(error = why, "redis still unavailable");
        }
    }
}
