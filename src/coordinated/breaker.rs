//! A circuit breaker per endpoint class, on tokio's clock.
//!
//! After `failure_threshold` consecutive upstream failures of one class (transport errors,
//! timeouts, 5xx/408 answers, undecodable bodies) the circuit **opens**: calls of that class
//! fail at once with [`Error::CircuitOpen`] and send nothing, so readers get stale cache (within
//! `max_stale`) or that typed error instead of waiting on a dead exchange. After `open_for` the
//! circuit is **half open**: exactly one call goes through as a probe while the others keep
//! failing fast. A probe that succeeds **closes** the circuit; one that fails opens it again
//! for twice as long (up to `max_open_for`).
//!
//! Answers that show the exchange is up (`NotFound`, `InvalidInput`, `Unauthorized`, other 4xx)
//! count as successes. Outcomes that say nothing about the exchange's health count as neither:
//! local rate-limit refusals and shed requests (nothing was sent), and the exchange's own 429s
//! (the rate limiter backs off from those; opening the circuit as well would only make every
//! reader fail). A probe that ends that way gives the next call the probe.
//!
//! Results of calls admitted before the last state change are ignored, so a burst of requests
//! that were already in flight when the circuit opened cannot re-open or close it.

use std::{fmt, sync::Mutex, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::{
    error::{Error, Health, Result},
    limiter::EndpointClass,
    util::lock,
};

/// Settings of the circuit breaker of a [`CoordinatedSource`](crate::CoordinatedSource), one
/// per endpoint class. Plain data (durations in milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BreakerConfig {
    /// Whether the breaker is on. Default on.
    pub enabled: bool,
    /// Consecutive failed upstream calls of one class that open its circuit (each retry is a
    /// call). Default 5.
    pub failure_threshold: u32,
    /// How long an opened circuit refuses calls before letting one probe through. Default 5 s.
    #[serde(with = "crate::util::duration_ms")]
    pub open_for: Duration,
    /// Each failed probe doubles the open time, up to this. Default 5 s, the same as
    /// `open_for`: an outage then costs the exchange one probe per class every 5 s, and the
    /// first read after the exchange is back finds it within 5 s (a longer cap saves a few
    /// probes an hour and keeps bots blind for up to that long after a recovery).
    #[serde(with = "crate::util::duration_ms")]
    pub max_open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            enabled: true,
            failure_threshold: 5,
            open_for: Duration::from_secs(5),
            max_open_for: Duration::from_secs(5),
        }
    }
}

impl BreakerConfig {
    /// A configuration with the breaker off.
    pub fn disabled() -> Self {
        BreakerConfig { enabled: false, ..Default::default() }
    }

    /// Check the settings.
    ///
    /// # Errors
    /// [`Error::Config`] when the threshold is 0, `open_for` is 0, or `max_open_for` is below
    /// `open_for`.
    pub fn validate(&self) -> Result<()> {
        if self.failure_threshold == 0 {
            return Err(Error::Config(
                "breaker.failure_threshold must be at least 1; set breaker.enabled = false to turn the breaker off"
                    .into(),
            ));
        }
        if self.open_for.is_zero() || self.max_open_for < self.open_for {
            return Err(Error::Config("breaker.open_for must be > 0 and <= breaker.max_open_for".into()));
        }
        Ok(())
    }
}

/// The state of one class's circuit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls go through; failures are counted.
    #[default]
    Closed,
    /// Calls fail at once with [`Error::CircuitOpen`].
    Open,
    /// One probe call is let through (or will be, by the next call); others fail at once.
    HalfOpen,
}

impl BreakerState {
    /// `"closed"`, `"open"` or `"half_open"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The circuit of one endpoint class, as served in stats.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassBreakerStats {
    /// The state now.
    pub state: BreakerState,
    /// Failures counted towards opening (since the last success or state change).
    pub consecutive_failures: u32,
    /// Times the circuit opened (including re-openings after a failed probe).
    pub opened: u64,
    /// Calls refused because the circuit was open or a probe was in flight.
    pub rejected: u64,
    /// Probe calls let through while half open.
    pub probes: u64,
    /// Time until the next probe is allowed, milliseconds (0 unless open).
    pub retry_in_ms: u64,
}

/// The circuits of both endpoint classes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerStats {
    /// Public endpoints.
    pub public: ClassBreakerStats,
    /// Private endpoints.
    pub private: ClassBreakerStats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Debug)]
struct Circuit {
    state: State,
    failures: u32,
    /// Bumped on every state change; results of calls admitted under an older generation are
    /// ignored.
    generation: u64,
    /// The open time in force (doubles on each failed probe).
    open_for: Duration,
    opened: u64,
    rejected: u64,
    probes: u64,
}

/// One circuit per endpoint class.
#[derive(Debug)]
pub(crate) struct Breakers {
    cfg: BreakerConfig,
    /// std mutexes: held for a few instructions, never across an await.
    circuits: [Mutex<Circuit>; 2],
    /// Woken when a probe of the class reports, for the calls waiting on its outcome.
    probed: [tokio::sync::Notify; 2],
}

/// Leave to make one upstream call, from [`Breakers::admit`]. Report its result with
/// [`record`](Permit::record); a permit dropped unreported counts as a neutral outcome (so a
/// cancelled probe frees the probe slot).
#[derive(Debug)]
#[must_use]
pub(crate) struct Permit<'a> {
    breakers: &'a Breakers,
    class: EndpointClass,
    generation: u64,
    probe: bool,
    done: bool,
}

impl Permit<'_> {
    /// Report the call's result.
    pub(crate) fn record<T>(mut self, r: &Result<T>) {
        self.done = true;
        self.breakers.report(self.class, self.generation, self.probe, Health::of(r));
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.breakers.report(self.class, self.generation, self.probe, Health::Neutral);
        }
    }
}

impl Breakers {
    pub(crate) fn new(cfg: BreakerConfig) -> Self {
        let circuit = || {
            Mutex::new(Circuit {
                state: State::Closed,
                failures: 0,
                generation: 0,
                open_for: cfg.open_for,
                opened: 0,
                rejected: 0,
                probes: 0,
            })
        };
        Breakers { circuits: [circuit(), circuit()], probed: Default::default(), cfg }
    }

    /// Let a call of `class` through, or refuse it while the circuit is open.
    ///
    /// # Errors
    /// [`Error::CircuitOpen`] while the circuit is open or a probe is in flight.
    pub(crate) fn admit(&self, class: EndpointClass) -> Result<Permit<'_>> {
        let permit = |generation, probe| Permit { breakers: self, class, generation, probe, done: false };
        if !self.cfg.enabled {
            return Ok(permit(0, false));
        }
        let now = Instant::now();
        let mut c = lock(&self.circuits[class.index()]);
        match c.state {
            State::Closed => Ok(permit(c.generation, false)),
            State::Open { until } if now < until => {
                c.rejected += 1;
                Err(Error::CircuitOpen { class, retry_in: until - now })
            }
            State::Open { .. } | State::HalfOpen { probing: false } => {
                if matches!(c.state, State::Open { .. }) {
                    c.generation += 1;
                    tracing::info!(class = class.as_str(), "circuit half open: sending one probe");
                }
                c.state = State::HalfOpen { probing: true };
                c.probes += 1;
                Ok(permit(c.generation, true))
            }
            State::HalfOpen { probing: true } => {
                c.rejected += 1;
                Err(Error::CircuitOpen { class, retry_in: c.open_for })
            }
        }
    }

    /// As [`admit`](Breakers::admit), but a call that arrives while a probe is in flight waits
    /// for the probe's outcome (up to `open_for`) instead of being refused: when the exchange
    /// is back, every call of the tick that sent the probe gets fresh data, not only the probe.
    ///
    /// # Errors
    /// [`Error::CircuitOpen`] while the circuit is open, or when the probe does not report in
    /// time.
    pub(crate) async fn admit_waiting(&self, class: EndpointClass) -> Result<Permit<'_>> {
        let deadline = Instant::now() + self.cfg.open_for;
        loop {
            // Registered before the state is read: a probe reporting in between still wakes it.
            let probed = self.probed[class.index()].notified();
            let probing =
                matches!(lock(&self.circuits[class.index()]).state, State::HalfOpen { probing: true });
            if !probing || tokio::time::timeout_at(deadline, probed).await.is_err() {
                return self.admit(class);
            }
        }
    }

    fn report(&self, class: EndpointClass, generation: u64, probe: bool, verdict: Health) {
        if !self.cfg.enabled {
            return;
        }
        let mut c = lock(&self.circuits[class.index()]);
        if c.generation != generation {
            return;
        }
        match (verdict, probe) {
            (Health::Healthy, true) => {
                c.state = State::Closed;
                c.failures = 0;
                c.generation += 1;
                c.open_for = self.cfg.open_for;
                tracing::info!(class = class.as_str(), "probe succeeded: circuit closed");
            }
            (Health::Healthy, false) => c.failures = 0,
            (Health::Failed, true) => {
                c.open_for = c.open_for.saturating_mul(2).min(self.cfg.max_open_for);
                self.open(&mut c, class);
            }
            (Health::Failed, false) => {
                c.failures += 1;
                if c.failures >= self.cfg.failure_threshold {
                    self.open(&mut c, class);
                }
            }
            (Health::Neutral, true) => c.state = State::HalfOpen { probing: false },
            (Health::Neutral, false) => {}
        }
        drop(c);
        if probe {
            self.probed[class.index()].notify_waiters();
        }
    }

    fn open(&self, c: &mut Circuit, class: EndpointClass) {
        c.state = State::Open { until: Instant::now() + c.open_for };
        c.failures = 0;
        c.generation += 1;
        c.opened += 1;
        tracing::warn!(
            class = class.as_str(),
            open_ms = u64::try_from(c.open_for.as_millis()).unwrap_or(u64::MAX),
            "upstream failing: circuit open"
        );
    }

    pub(crate) fn stats(&self) -> BreakerStats {
        let now = Instant::now();
        let one = |class: EndpointClass| {
            let c = lock(&self.circuits[class.index()]);
            let (state, retry_in) = match c.state {
                State::Closed => (BreakerState::Closed, Duration::ZERO),
                State::Open { until } if now < until => (BreakerState::Open, until - now),
                State::Open { .. } | State::HalfOpen { .. } => (BreakerState::HalfOpen, Duration::ZERO),
            };
            ClassBreakerStats {
                state,
                consecutive_failures: c.failures,
                opened: c.opened,
                rejected: c.rejected,
                probes: c.probes,
                retry_in_ms: u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX),
            }
        };
        BreakerStats { public: one(EndpointClass::Public), private: one(EndpointClass::Private) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: EndpointClass = EndpointClass::Public;

    fn fail(b: &Breakers) {
        b.admit(P).unwrap().record::<()>(&Err(Error::Timeout));
    }

    fn ok(b: &Breakers) {
        b.admit(P).unwrap().record(&Ok(()));
    }

    fn cfg(threshold: u32) -> BreakerConfig {
        BreakerConfig { failure_threshold: threshold, ..Default::default() }
    }

    #[test]
    fn config_is_validated() {
        assert!(BreakerConfig::default().validate().is_ok());
        assert!(cfg(0).validate().is_err());
        let bad = BreakerConfig { open_for: Duration::ZERO, ..Default::default() };
        assert!(bad.validate().is_err());
        let bad = BreakerConfig { max_open_for: Duration::from_secs(1), ..Default::default() };
        assert_eq!(BreakerConfig::default().max_open_for, BreakerConfig::default().open_for);
        assert!(bad.validate().is_err());
        let json = serde_json::to_string(&BreakerConfig::default()).unwrap();
        assert_eq!(json, r#"{"enabled":true,"failure_threshold":5,"open_for":5000,"max_open_for":5000}"#);
        let partial: BreakerConfig = serde_json::from_str(r#"{"failure_threshold":2}"#).unwrap();
        assert_eq!(partial, cfg(2));
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_probes_once_and_closes() {
        let b = Breakers::new(cfg(3));
        fail(&b);
        fail(&b);
        ok(&b); // a success resets the run
        fail(&b);
        fail(&b);
        assert_eq!(b.stats().public.consecutive_failures, 2);
        fail(&b);
        let s = b.stats().public;
        assert_eq!((s.state, s.opened, s.retry_in_ms), (BreakerState::Open, 1, 5000));
        // Open: fast typed errors with the time left; the other class is unaffected.
        tokio::time::advance(Duration::from_secs(2)).await;
        let e = b.admit(P).unwrap_err();
        assert_eq!(e, Error::CircuitOpen { class: EndpointClass::Public, retry_in: Duration::from_secs(3) });
        assert!(b.admit(EndpointClass::Private).is_ok());
        // Half open after 5 s: one probe, everyone else still refused.
        tokio::time::advance(Duration::from_secs(3)).await;
        let probe = b.admit(P).unwrap();
        assert_eq!(b.stats().public.state, BreakerState::HalfOpen);
        assert!(matches!(b.admit(P), Err(Error::CircuitOpen { .. })));
        probe.record(&Ok(()));
        let s = b.stats().public;
        assert_eq!((s.state, s.probes, s.rejected), (BreakerState::Closed, 1, 2));
        ok(&b);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_longer() {
        // Doubling is opt-in since the default cap equals `open_for` (fast recovery, #16).
        let b = Breakers::new(BreakerConfig { max_open_for: Duration::from_secs(60), ..cfg(1) });
        fail(&b);
        tokio::time::advance(Duration::from_secs(5)).await;
        fail(&b); // the probe
        assert_eq!(b.stats().public.retry_in_ms, 10_000);
        tokio::time::advance(Duration::from_secs(10)).await;
        fail(&b);
        assert_eq!(b.stats().public.retry_in_ms, 20_000);
        tokio::time::advance(Duration::from_secs(20)).await;
        fail(&b);
        tokio::time::advance(Duration::from_secs(40)).await;
        fail(&b);
        assert_eq!(b.stats().public.retry_in_ms, 60_000, "capped at max_open_for");
        tokio::time::advance(Duration::from_secs(60)).await;
        ok(&b);
        // Closed again, and the open time is back to the configured one.
        fail(&b);
        assert_eq!(b.stats().public.retry_in_ms, 5_000);
        assert_eq!(b.stats().public.opened, 6);
    }

    #[tokio::test(start_paused = true)]
    async fn neutral_outcomes_and_dropped_probes_free_the_probe_slot() {
        let b = Breakers::new(cfg(1));
        fail(&b);
        tokio::time::advance(Duration::from_secs(5)).await;
        // A probe refused by the local rate limiter: nothing learned, the next call probes.
        b.admit(P).unwrap().record::<()>(&Err(Error::RateLimited { retry_after: None, local: true }));
        assert_eq!(b.stats().public.state, BreakerState::HalfOpen);
        // A probe whose caller went away.
        drop(b.admit(P).unwrap());
        // 429s neither open nor close the circuit.
        b.admit(P).unwrap().record::<()>(&Err(Error::RateLimited { retry_after: None, local: false }));
        ok(&b);
        assert_eq!(b.stats().public.state, BreakerState::Closed);
        assert_eq!(b.stats().public.probes, 4);
        for _ in 0..10 {
            b.admit(P).unwrap().record::<()>(&Err(Error::RateLimited { retry_after: None, local: false }));
            b.admit(P).unwrap().record::<()>(&Err(Error::NotFound("x".into())));
        }
        assert_eq!(b.stats().public.state, BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn results_of_calls_admitted_before_a_state_change_are_ignored() {
        let b = Breakers::new(cfg(2));
        let in_flight: Vec<_> = (0..5).map(|_| b.admit(P).unwrap()).collect();
        let mut it = in_flight.into_iter();
        it.next().unwrap().record::<()>(&Err(Error::Timeout));
        it.next().unwrap().record::<()>(&Err(Error::Timeout)); // opens
        assert_eq!(b.stats().public.opened, 1);
        // Three more failures from before the opening: not counted again; nor is a success.
        it.next().unwrap().record::<()>(&Err(Error::Timeout));
        it.next().unwrap().record::<()>(&Err(Error::Timeout));
        it.next().unwrap().record(&Ok(()));
        let s = b.stats().public;
        assert_eq!((s.state, s.opened, s.consecutive_failures), (BreakerState::Open, 1, 0));
    }

    #[test]
    fn coordinated_config_carries_and_validates_the_breaker() {
        use crate::coordinated::CoordinatedConfig;
        let parsed: CoordinatedConfig =
            serde_json::from_str(r#"{"breaker":{"failure_threshold":2}}"#).unwrap();
        assert_eq!(parsed.breaker, cfg(2));
        assert!(parsed.validate().is_ok());
        let bad: CoordinatedConfig = serde_json::from_str(r#"{"breaker":{"failure_threshold":0}}"#).unwrap();
        assert!(matches!(bad.validate(), Err(Error::Config(m)) if m.contains("breaker.failure_threshold")));
        // Turned off, its other settings are not checked.
        let off: CoordinatedConfig =
            serde_json::from_str(r#"{"breaker":{"enabled":false,"failure_threshold":0}}"#).unwrap();
        assert!(off.validate().is_ok());
        assert_eq!(CoordinatedConfig::default().breaker, BreakerConfig::default());
    }

    #[test]
    fn disabled_never_opens() {
        let b = Breakers::new(BreakerConfig::disabled());
        for _ in 0..100 {
            fail(&b);
        }
        assert_eq!(b.stats().public, ClassBreakerStats::default());
    }
}
