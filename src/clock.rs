//! The time seam: every timestamp tickshare needs comes from here, on tokio's clock.
//!
//! Durations and deadlines use [`tokio::time::Instant`], so they obey
//! [`tokio::time::pause`] and `advance` in tests. Wall-clock times (candle boundaries, the
//! simulated market) are derived from it: `origin_utc + (now - origin)`. Under a paused clock
//! the wall clock therefore moves only when tokio's does, which is what makes hour-long
//! simulated runs take milliseconds. Only JWT `nbf`/`exp` use the real system time.

use std::{ops::Add, time::Duration};

use governor::{clock::Reference, nanos::Nanos};
use time::OffsetDateTime;
use tokio::time::Instant;

/// A wall clock driven by tokio's (pausable) clock.
///
/// Cheap to copy. Two components that must agree on "now" (a source and the simulated
/// exchange in a test) should share one `Clock`.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
    origin_utc: OffsetDateTime,
}

impl Clock {
    /// A clock that reads the system time once and then follows tokio's clock.
    pub fn system() -> Self {
        Clock { origin: Instant::now(), origin_utc: OffsetDateTime::now_utc() }
    }

    /// A clock whose current time is `utc` (useful for deterministic tests and simulations).
    pub fn starting_at(utc: OffsetDateTime) -> Self {
        Clock { origin: Instant::now(), origin_utc: utc }
    }

    /// tokio's current instant.
    pub fn now(&self) -> Instant {
        Instant::now()
    }

    /// The current wall time (UTC).
    pub fn now_utc(&self) -> OffsetDateTime {
        self.utc_at(Instant::now())
    }

    /// The wall time at `instant`.
    pub fn utc_at(&self, instant: Instant) -> OffsetDateTime {
        if instant >= self.origin {
            self.origin_utc + instant.duration_since(self.origin)
        } else {
            self.origin_utc - self.origin.duration_since(instant)
        }
    }

    /// The tokio instant at which the wall clock reads `utc` (saturating at the origin for
    /// times before it).
    pub fn instant_at(&self, utc: OffsetDateTime) -> Instant {
        let delta = utc - self.origin_utc;
        if delta.is_negative() {
            let back = Duration::try_from(-delta).unwrap_or(Duration::ZERO);
            self.origin.checked_sub(back).unwrap_or(self.origin)
        } else {
            self.origin + Duration::try_from(delta).unwrap_or(Duration::ZERO)
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

/// `at + d`, saturating at a year past `at` for durations too long to add.
pub(crate) fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d).or_else(|| at.checked_add(Duration::from_secs(86_400 * 365))).unwrap_or(at)
}

/// governor's clock over tokio's (pausable) clock.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TokioClock;

/// A tokio instant as a governor [`Reference`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct TokioInstant(pub(crate) Instant);

impl Add<Nanos> for TokioInstant {
    type Output = TokioInstant;
    fn add(self, other: Nanos) -> TokioInstant {
        TokioInstant(self.0 + Duration::from(other))
    }
}

impl Reference for TokioInstant {
    fn duration_since(&self, earlier: Self) -> Nanos {
        self.0.saturating_duration_since(earlier.0).into()
    }
    fn saturating_sub(&self, duration: Nanos) -> Self {
        self.0.checked_sub(duration.into()).map(TokioInstant).unwrap_or(*self)
    }
}

impl governor::clock::Clock for TokioClock {
    type Instant = TokioInstant;
    fn now(&self) -> TokioInstant {
        TokioInstant(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[tokio::test(start_paused = true)]
    async fn follows_paused_tokio_time() {
        let clock = Clock::starting_at(datetime!(2024-01-01 00:00 UTC));
        assert_eq!(clock.now_utc(), datetime!(2024-01-01 00:00 UTC));
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(clock.now_utc(), datetime!(2024-01-01 01:00 UTC));
        let at = clock.instant_at(datetime!(2024-01-01 02:00 UTC));
        assert_eq!(at - clock.now(), Duration::from_secs(3600));
        assert_eq!(clock.utc_at(at), datetime!(2024-01-01 02:00 UTC));
    }
}
