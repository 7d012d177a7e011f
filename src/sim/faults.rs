//! Faults injected on demand: latency, error statuses, broken bodies, stalls and resets.
//!
//! A [`Fault`] is built from one constructor (what goes wrong), optionally narrowed to a
//! [`FaultTarget`] and limited in count ([`times`](Fault::times)) or time
//! ([`after`](Fault::after), [`for_duration`](Fault::for_duration), both on tokio's clock), and
//! installed with [`SimHandle::add_fault`](super::SimHandle::add_fault).
//!
//! For each request, every matching latency fault adds its delay, then the **first** matching
//! fault of any other kind (in the order they were added) decides the answer and uses up one of
//! its `times`. Installing `Fault::status(429).times(2)` and then `Fault::status(500).times(1)`
//! therefore scripts "429, 429, 500, then normal".

use std::time::Duration;

use tokio::time::Instant;

use super::{Endpoint, EndpointClass};

/// Which requests a [`Fault`] applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FaultTarget {
    /// Every request to a Coinbase path (never the `/__sim` control paths).
    All,
    /// Every endpoint of one class.
    Class(EndpointClass),
    /// One endpoint.
    Endpoint(Endpoint),
}

impl FaultTarget {
    fn matches(self, endpoint: Endpoint) -> bool {
        match self {
            FaultTarget::All => true,
            FaultTarget::Class(c) => endpoint.class() == c,
            FaultTarget::Endpoint(e) => e == endpoint,
        }
    }
}

impl From<Endpoint> for FaultTarget {
    fn from(e: Endpoint) -> Self {
        FaultTarget::Endpoint(e)
    }
}

impl From<EndpointClass> for FaultTarget {
    fn from(c: EndpointClass) -> Self {
        FaultTarget::Class(c)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Action {
    Latency { fixed: Duration, jitter: Duration },
    Status(u16),
    ErrorRate { probability: f64, status: u16 },
    MalformedBody,
    TruncatedBody,
    Stall(Duration),
    ConnectionReset,
}

/// One fault to inject into a [`SimExchange`](super::SimExchange).
///
/// Build it from one constructor (what goes wrong), optionally narrow it with
/// [`on`](Fault::on) and limit it with [`times`](Fault::times), [`after`](Fault::after) and
/// [`for_duration`](Fault::for_duration) (tokio's clock), then install it with
/// [`SimHandle::add_fault`](super::SimHandle::add_fault). Faults apply only to requests the rate
/// limiter accepted.
///
/// For each request, every matching latency fault adds its delay, then the **first** matching
/// fault of any other kind (in the order they were added) decides the answer and uses up one
/// of its `times`. Installing `Fault::status(429).times(2)` and then
/// `Fault::status(500).times(1)` therefore scripts "429, 429, 500, then normal".
///
/// ```
/// use std::time::Duration;
/// use tickshare::sim::{Endpoint, EndpointClass, Fault};
///
/// // "429 twice, then normal" on the public ticker.
/// let script = Fault::status(429).on(Endpoint::MarketTicker).times(2);
/// // "500 for 3 s" on every private endpoint.
/// let outage = Fault::status(500).on(EndpointClass::Private).for_duration(Duration::from_secs(3));
/// // 10 % of all requests fail with 503, reproducibly for a given seed.
/// let flaky = Fault::error_rate(0.1, 503);
/// # let _ = (script, outage, flaky);
/// ```
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub struct Fault {
    action: Action,
    target: FaultTarget,
    times: Option<u32>,
    delay: Duration,
    duration: Option<Duration>,
}

/// Identifies an installed fault, for [`SimHandle::remove_fault`](super::SimHandle::remove_fault).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FaultId(u64);

impl Fault {
    fn new(action: Action) -> Self {
        Fault { action, target: FaultTarget::All, times: None, delay: Duration::ZERO, duration: None }
    }

    /// Delay the response by `fixed` (slept on tokio's clock). Adds to other latency.
    pub fn latency(fixed: Duration) -> Self {
        Fault::new(Action::Latency { fixed, jitter: Duration::ZERO })
    }

    /// Delay the response by `fixed` plus a uniform random part in `[0, jitter]`, drawn from the
    /// exchange's seeded generator (reproducible for a given seed and request order).
    pub fn latency_with_jitter(fixed: Duration, jitter: Duration) -> Self {
        Fault::new(Action::Latency { fixed, jitter })
    }

    /// Answer with HTTP `status` and a Coinbase-shaped error body instead of the real response.
    ///
    /// `429` gets the same body (JSON or HTML, per the exchange's setting) and headers as a
    /// real rate-limit rejection. Statuses outside `200..=599` become 500.
    pub fn status(status: u16) -> Self {
        Fault::new(Action::Status(valid_status(status)))
    }

    /// Answer a random share `probability` (0.0 to 1.0) of matching requests with `status`,
    /// drawing from the exchange's seeded generator; requests that escape are not affected and
    /// do not use up [`times`](Fault::times).
    pub fn error_rate(probability: f64, status: u16) -> Self {
        let probability = if probability.is_nan() { 0.0 } else { probability.clamp(0.0, 1.0) };
        Fault::new(Action::ErrorRate { probability, status: valid_status(status) })
    }

    /// Answer 200 with the correct headers and a body that is not valid JSON (the first half of
    /// the real body).
    pub fn malformed_body() -> Self {
        Fault::new(Action::MalformedBody)
    }

    /// Answer 200 with a `Content-Length` of the full body, send half of it, then reset the
    /// connection: the client fails while reading the body.
    pub fn truncated_body() -> Self {
        Fault::new(Action::TruncatedBody)
    }

    /// Wait `duration` (on tokio's clock) before answering normally: a client with a shorter
    /// timeout times out.
    pub fn stall(duration: Duration) -> Self {
        Fault::new(Action::Stall(duration))
    }

    /// Reset the connection (TCP RST) without sending any response.
    pub fn connection_reset() -> Self {
        Fault::new(Action::ConnectionReset)
    }

    /// Apply only to requests matching `target` (an [`Endpoint`], an [`EndpointClass`] or a
    /// [`FaultTarget`]). The default is [`FaultTarget::All`].
    pub fn on(mut self, target: impl Into<FaultTarget>) -> Self {
        self.target = target.into();
        self
    }

    /// Apply to the next `n` matching requests only, then disappear.
    pub fn times(mut self, n: u32) -> Self {
        self.times = Some(n);
        self
    }

    /// Start `delay` after being installed (tokio's clock).
    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Stop `duration` after it starts (tokio's clock), then disappear.
    pub fn for_duration(mut self, duration: Duration) -> Self {
        self.duration = Some(duration);
        self
    }
}

fn valid_status(status: u16) -> u16 {
    if (200..=599).contains(&status) { status } else { 500 }
}

/// What a request's answer should be, as decided by the active faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResponseFault {
    Status(u16),
    MalformedBody,
    TruncatedBody,
    Stall(Duration),
    ConnectionReset,
}

/// The faults decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Plan {
    /// Extra latency from latency faults.
    pub(crate) latency: Duration,
    /// The fault that replaces or damages the answer, if any.
    pub(crate) response: Option<ResponseFault>,
}

#[derive(Debug)]
struct Installed {
    id: FaultId,
    fault: Fault,
    starts: Instant,
    ends: Option<Instant>,
    remaining: Option<u32>,
}

impl Installed {
    fn spent(&self, now: Instant) -> bool {
        self.remaining == Some(0) || self.ends.is_some_and(|e| now >= e)
    }

    fn use_once(&mut self) {
        if let Some(r) = &mut self.remaining {
            *r = r.saturating_sub(1);
        }
    }
}

/// The installed faults and the seeded generator they draw from.
#[derive(Debug)]
pub(crate) struct FaultBook {
    next_id: u64,
    faults: Vec<Installed>,
    rng: fastrand::Rng,
}

impl FaultBook {
    pub(crate) fn new(seed: u64) -> Self {
        FaultBook { next_id: 1, faults: Vec::new(), rng: fastrand::Rng::with_seed(seed ^ 0xFA17) }
    }

    pub(crate) fn add(&mut self, fault: Fault, now: Instant) -> FaultId {
        let id = FaultId(self.next_id);
        self.next_id += 1;
        let starts = now + fault.delay;
        self.faults.push(Installed {
            id,
            starts,
            ends: fault.duration.map(|d| starts + d),
            remaining: fault.times,
            fault,
        });
        id
    }

    pub(crate) fn remove(&mut self, id: FaultId) -> bool {
        let before = self.faults.len();
        self.faults.retain(|f| f.id != id);
        self.faults.len() != before
    }

    pub(crate) fn clear(&mut self) {
        self.faults.clear();
    }

    /// How many faults are installed and not yet spent at `now`.
    pub(crate) fn active(&mut self, now: Instant) -> usize {
        self.faults.retain(|f| !f.spent(now));
        self.faults.len()
    }

    /// A uniform duration in `[0, max]` from the seeded generator.
    pub(crate) fn jitter(&mut self, max: Duration) -> Duration {
        if max.is_zero() {
            return Duration::ZERO;
        }
        let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.u64(0..=nanos))
    }

    /// Decide the faults for one request to `endpoint` at `now`, using up matching faults.
    pub(crate) fn plan(&mut self, endpoint: Endpoint, now: Instant) -> Plan {
        self.faults.retain(|f| !f.spent(now));
        let mut plan = Plan::default();
        for i in 0..self.faults.len() {
            let Some(f) = self.faults.get(i) else { break };
            if now < f.starts || !f.fault.target.matches(endpoint) {
                continue;
            }
            let action = f.fault.action;
            let response = match action {
                Action::Latency { fixed, jitter } => {
                    let extra = fixed.saturating_add(self.jitter(jitter));
                    plan.latency = plan.latency.saturating_add(extra);
                    if let Some(f) = self.faults.get_mut(i) {
                        f.use_once();
                    }
                    continue;
                }
                _ if plan.response.is_some() => continue,
                Action::Status(s) => ResponseFault::Status(s),
                Action::ErrorRate { probability, status } => {
                    if self.rng.f64() < probability {
                        ResponseFault::Status(status)
                    } else {
                        continue;
                    }
                }
                Action::MalformedBody => ResponseFault::MalformedBody,
                Action::TruncatedBody => ResponseFault::TruncatedBody,
                Action::Stall(d) => ResponseFault::Stall(d),
                Action::ConnectionReset => ResponseFault::ConnectionReset,
            };
            plan.response = Some(response);
            if let Some(f) = self.faults.get_mut(i) {
                f.use_once();
            }
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn scripts_run_in_order_and_expire() {
        let mut book = FaultBook::new(1);
        let now = Instant::now();
        book.add(Fault::status(429).times(2), now);
        book.add(Fault::status(500).on(Endpoint::Ticker).times(1), now);
        let answers: Vec<_> = (0..4).map(|_| book.plan(Endpoint::Ticker, now).response).collect();
        assert_eq!(
            answers,
            [
                Some(ResponseFault::Status(429)),
                Some(ResponseFault::Status(429)),
                Some(ResponseFault::Status(500)),
                None
            ]
        );
        assert_eq!(book.active(now), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn time_windows_and_targets() {
        let mut book = FaultBook::new(1);
        let t0 = Instant::now();
        let id = book.add(
            Fault::status(503)
                .on(EndpointClass::Private)
                .after(Duration::from_secs(1))
                .for_duration(Duration::from_secs(3)),
            t0,
        );
        let at = |s: u64| t0 + Duration::from_millis(s);
        assert_eq!(book.plan(Endpoint::Accounts, at(999)).response, None);
        assert_eq!(book.plan(Endpoint::Accounts, at(1000)).response, Some(ResponseFault::Status(503)));
        assert_eq!(book.plan(Endpoint::MarketTicker, at(2000)).response, None);
        assert_eq!(book.plan(Endpoint::Accounts, at(3999)).response, Some(ResponseFault::Status(503)));
        assert_eq!(book.plan(Endpoint::Accounts, at(4000)).response, None);
        assert!(!book.remove(id), "expired faults are gone");
    }

    #[tokio::test(start_paused = true)]
    async fn latency_stacks_and_error_rate_is_seeded() {
        let now = Instant::now();
        let mut a = FaultBook::new(7);
        a.add(Fault::latency(Duration::from_millis(100)), now);
        a.add(Fault::latency_with_jitter(Duration::from_millis(10), Duration::from_millis(5)), now);
        let p = a.plan(Endpoint::Time, now);
        assert!(p.latency >= Duration::from_millis(110) && p.latency <= Duration::from_millis(115));
        assert_eq!(p.response, None);

        let rolls = |seed| {
            let mut b = FaultBook::new(seed);
            b.add(Fault::error_rate(0.5, 500), now);
            (0..200).map(|_| b.plan(Endpoint::Time, now).response.is_some()).collect::<Vec<_>>()
        };
        let first = rolls(3);
        assert_eq!(first, rolls(3));
        let hits = first.iter().filter(|h| **h).count();
        assert!((60..140).contains(&hits), "{hits}");
        assert_eq!(Fault::status(42), Fault::status(500));
        assert_eq!(Fault::error_rate(f64::NAN, 500), Fault::error_rate(0.0, 500));
    }
}
