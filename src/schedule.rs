//! [`TickSchedule`]: when ticks happen, and refresh-ahead so that bots do not wait for the
//! exchange at the tick.

use std::{fmt, time::Duration};

use serde::Serialize;
use time::OffsetDateTime;
use tokio::time::{Instant, sleep_until};

use crate::{
    error::{Error, Result},
    evaluator::{BatchEvaluator, Bot, PrefetchReport, TickReport},
};

/// The longest tick period a schedule accepts (a year), which keeps its time arithmetic far
/// from overflow.
const MAX_PERIOD: Duration = Duration::from_secs(366 * 86_400);

/// When ticks happen: every `period`, on the wall clock's multiples of it by default (five
/// minutes: :00, :05, :10, …, so that a tick falls right after each hourly candle closes), with
/// an optional refresh-ahead lead.
///
/// With [`refresh_ahead`](TickSchedule::refresh_ahead), the snapshot is fetched `lead` before
/// each tick ([`BatchEvaluator::prefetch`]) and the tick itself reads the cache: the same
/// upstream calls, made while nobody waits for them, so the bots' decisions are ready
/// microseconds after the tick instead of one exchange round trip later. The prefetch keeps
/// tickers and balances fresh for twice the lead, so the tick (even one that starts up to a lead
/// late) finds them cached; the data is up to `lead` + one round trip old at the tick. Choose a
/// lead above the time a prefetch takes: one round trip at most ticks, more at the tick after a
/// candle close, when every series gets its incremental call (25 series at Coinbase's 30/s
/// private limit take about a second). A prefetch that runs past the tick delays it, and
/// [`ScheduledTick::latency`] shows by how much. Keep the lead well below the source's
/// `ticker_ttl` and `accounts_ttl` (5 s and 10 s by default): data already older than its TTL
/// at the tick is fetched again there.
///
/// ```
/// use std::time::Duration;
/// use tickshare::TickSchedule;
///
/// let schedule = TickSchedule::every(Duration::from_secs(300)).refresh_ahead(Duration::from_millis(250));
/// assert!(schedule.validate().is_ok());
/// assert!(TickSchedule::every(Duration::from_secs(1)).refresh_ahead(Duration::from_secs(1)).validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TickSchedule {
    period: Duration,
    lead: Duration,
    aligned: bool,
    offset: Duration,
}

impl TickSchedule {
    /// A tick every `period`, aligned to the wall clock, without refresh-ahead.
    pub fn every(period: Duration) -> Self {
        TickSchedule { period, lead: Duration::ZERO, aligned: true, offset: Duration::ZERO }
    }

    /// Prefetch each tick's snapshot `lead` before it (zero turns it off).
    #[must_use]
    pub fn refresh_ahead(mut self, lead: Duration) -> Self {
        self.lead = lead;
        self
    }

    /// Whether ticks fall on the wall clock's multiples of the period (default) or every
    /// period from the first call, which ticks at once.
    #[must_use]
    pub fn aligned(mut self, aligned: bool) -> Self {
        self.aligned = aligned;
        self
    }

    /// Shift the aligned grid by `offset` (ticks at :00:03, :05:03, … with three seconds), so
    /// that a tick right after a candle close comes once the exchange has finished the candle
    /// and the source's `candle_grace` has passed: with a refresh-ahead lead shorter than the
    /// offset minus the grace (and jitter), the prefetch brings the final candle and the bots
    /// read it at the tick. Must be shorter than the period; ignored when not aligned.
    #[must_use]
    pub fn offset(mut self, offset: Duration) -> Self {
        self.offset = offset;
        self
    }

    /// The period.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// The refresh-ahead lead (zero when off).
    pub fn lead(&self) -> Duration {
        self.lead
    }

    /// Check the schedule.
    ///
    /// # Errors
    /// [`Error::Config`] when the period is zero or over a year, or the offset or the lead is not shorter than the period.
    pub fn validate(&self) -> Result<()> {
        if self.period.is_zero() || self.period > MAX_PERIOD {
            return Err(Error::Config(format!(
                "the tick period must be greater than zero and at most {} days",
                MAX_PERIOD.as_secs() / 86_400
            )));
        }
        if self.offset >= self.period {
            return Err(Error::Config(format!(
                "the tick offset ({:?}) must be shorter than the tick period ({:?})",
                self.offset, self.period
            )));
        }
        if self.lead >= self.period {
            return Err(Error::Config(format!(
                "the refresh-ahead lead ({:?}) must be shorter than the tick period ({:?})",
                self.lead, self.period
            )));
        }
        Ok(())
    }

    /// The first wall time at or after `now` on this schedule's grid (aligned schedules), or
    /// `now` itself.
    fn first_due(&self, now: OffsetDateTime) -> OffsetDateTime {
        if !self.aligned {
            return now;
        }
        let period = self.period.as_nanos();
        let since_epoch = now.unix_timestamp_nanos() - self.offset.as_nanos() as i128;
        let into = since_epoch.rem_euclid(period as i128) as u128;
        if into == 0 {
            return now;
        }
        // `period - into` is below the period, which is a `Duration`.
        later(now, Duration::from_nanos(u64::try_from(period - into).unwrap_or(u64::MAX)))
    }
}

/// `t + d`, saturating at the end of the representable range (a clock started near year 9999
/// must not panic).
fn later(t: OffsetDateTime, d: Duration) -> OffsetDateTime {
    let d = time::Duration::try_from(d).unwrap_or(time::Duration::MAX);
    t.saturating_add(d)
}

impl BatchEvaluator {
    /// Drive this evaluator on `schedule`: each [`TickLoop::tick`] waits for the next tick
    /// (prefetching ahead of it when the schedule says so) and evaluates the bots.
    ///
    /// # Errors
    /// [`Error::Config`] from [`TickSchedule::validate`].
    ///
    /// ```no_run
    /// # async fn f(evaluator: tickshare::BatchEvaluator, bots: Vec<tickshare::Bot>) -> tickshare::Result<()> {
    /// use std::time::Duration;
    /// use tickshare::TickSchedule;
    ///
    /// let schedule = TickSchedule::every(Duration::from_secs(300)).refresh_ahead(Duration::from_millis(250));
    /// let mut ticks = evaluator.schedule(schedule)?;
    /// loop {
    ///     let tick = ticks.tick(&bots).await;
    ///     println!("{}: decisions {:?} after the tick", tick.due, tick.latency);
    /// }
    /// # }
    /// ```
    pub fn schedule(&self, schedule: TickSchedule) -> Result<TickLoop<'_>> {
        schedule.validate()?;
        Ok(TickLoop { evaluator: self, schedule, next: None })
    }
}

/// Ticks of a [`BatchEvaluator`] on a [`TickSchedule`] (from [`BatchEvaluator::schedule`]).
pub struct TickLoop<'e> {
    evaluator: &'e BatchEvaluator,
    schedule: TickSchedule,
    /// The next tick, once the first call has fixed the grid.
    next: Option<(Instant, OffsetDateTime)>,
}

impl fmt::Debug for TickLoop<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TickLoop").field("schedule", &self.schedule).field("next", &self.next).finish()
    }
}

impl TickLoop<'_> {
    /// The schedule.
    pub fn schedule(&self) -> TickSchedule {
        self.schedule
    }

    /// Wait for the next tick and evaluate `bots` at it. With refresh-ahead, their snapshot is
    /// fetched `lead` before the tick (at once when the call comes later than that but before
    /// the tick; not at all for a tick already due).
    ///
    /// A tick whose time has passed by a whole period or more (the previous tick or the caller
    /// overran) is skipped, never run late in a burst; [`ScheduledTick::missed`] counts them.
    ///
    /// # Cancel safety
    /// Cancel safe: dropped while waiting, the next call waits for the same tick.
    pub async fn tick(&mut self, bots: &[Bot]) -> ScheduledTick {
        let clock = self.evaluator.clock_ref();
        let period = self.schedule.period;
        let now = Instant::now();
        let (mut due, mut due_utc) = match self.next {
            Some(next) => next,
            None => {
                let utc = self.schedule.first_due(clock.now_utc());
                (clock.instant_at(utc), utc)
            }
        };
        // Whole periods already past: skipped, not run in a burst.
        let missed = now.saturating_duration_since(due).as_nanos() / period.as_nanos();
        if missed > 0 {
            // At most the time elapsed since `due`, so it fits.
            let skip = Duration::from_nanos(u64::try_from(missed * period.as_nanos()).unwrap_or(u64::MAX));
            due += skip;
            due_utc = later(due_utc, skip);
        }
        self.next = Some((due, due_utc));

        let lead = self.schedule.lead;
        // A call made within the lead prefetches at once; one made at or after the due time
        // (a late tick) evaluates at once.
        let prefetch_at = due.checked_sub(lead).map_or(now, |at| at.max(now));
        let prefetch = if !lead.is_zero() && prefetch_at < due {
            sleep_until(prefetch_at).await;
            // Fresh through the tick, and through a tick that starts up to a lead late.
            let horizon = lead.saturating_mul(2);
            let (report, ()) = tokio::join!(self.evaluator.prefetch(bots, horizon), sleep_until(due));
            Some(report)
        } else {
            sleep_until(due).await;
            None
        };
        let report = self.evaluator.evaluate_all(bots).await;
        self.next = Some((due + period, later(due_utc, period)));
        let latency = Instant::now().saturating_duration_since(due);
        ScheduledTick {
            due: due_utc,
            latency,
            missed: u64::try_from(missed).unwrap_or(u64::MAX),
            prefetch,
            report,
        }
    }
}

/// One tick of a [`TickLoop`].
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct ScheduledTick {
    /// The wall time the tick was due.
    #[serde(with = "time::serde::rfc3339")]
    pub due: OffsetDateTime,
    /// From the due time to every bot's decision: what the bots waited. Includes a prefetch
    /// that ran past the due time.
    #[serde(with = "crate::util::duration_ms")]
    pub latency: Duration,
    /// Ticks skipped before this one because their time had passed.
    pub missed: u64,
    /// The refresh-ahead fetch before the tick, when one ran.
    pub prefetch: Option<PrefetchReport>,
    /// The tick.
    pub report: TickReport,
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn aligned_grid() {
        let s = TickSchedule::every(Duration::from_secs(300));
        assert_eq!(s.first_due(datetime!(2024-04-24 09:56:38 UTC)), datetime!(2024-04-24 10:00:00 UTC));
        assert_eq!(s.first_due(datetime!(2024-04-24 10:00:00 UTC)), datetime!(2024-04-24 10:00:00 UTC));
        assert_eq!(
            s.first_due(datetime!(2024-04-24 10:00:00.000000001 UTC)),
            datetime!(2024-04-24 10:05:00 UTC)
        );
        // Before the epoch, too.
        assert_eq!(s.first_due(datetime!(1969-12-31 23:58:00 UTC)), datetime!(1970-01-01 00:00:00 UTC));
        let t = datetime!(2024-04-24 09:56:38.5 UTC);
        assert_eq!(s.aligned(false).first_due(t), t);
        let shifted = s.offset(Duration::from_secs(3));
        assert_eq!(shifted.first_due(datetime!(2024-04-24 09:56:38 UTC)), datetime!(2024-04-24 10:00:03 UTC));
        assert_eq!(shifted.first_due(datetime!(2024-04-24 10:00:02 UTC)), datetime!(2024-04-24 10:00:03 UTC));
        assert_eq!(shifted.first_due(datetime!(2024-04-24 10:00:04 UTC)), datetime!(2024-04-24 10:05:03 UTC));
    }

    #[test]
    fn the_end_of_time_saturates() {
        let end = time::PrimitiveDateTime::MAX.assume_utc();
        let s = TickSchedule::every(Duration::from_secs(300));
        assert_eq!(later(end, Duration::from_secs(300)), end);
        assert!(s.first_due(end - Duration::from_secs(1)) <= end);
    }

    #[test]
    fn validation() {
        let five = Duration::from_secs(300);
        assert!(TickSchedule::every(Duration::ZERO).validate().is_err());
        assert!(TickSchedule::every(five).refresh_ahead(five).validate().is_err());
        assert!(TickSchedule::every(five).refresh_ahead(Duration::from_secs(299)).validate().is_ok());
        assert!(TickSchedule::every(Duration::from_nanos(1)).validate().is_ok());
        assert!(TickSchedule::every(Duration::MAX).validate().is_err());
        assert!(TickSchedule::every(five).offset(five).validate().is_err());
        assert!(TickSchedule::every(five).offset(Duration::from_secs(3)).validate().is_ok());
    }
}
