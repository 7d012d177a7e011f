//! Rate limits as Coinbase enforces them, per endpoint class, over a sliding one-second window.
//!
//! A request is accepted when fewer than `limit` requests of its class were **accepted** in the
//! window `(now - 1 s, now]`; otherwise it gets a 429. Independently of admission, the limiter
//! records how many requests were **received** (accepted or not) in any one-second window, so a
//! test can assert that a client never sent more than the limit.

use std::{collections::VecDeque, time::Duration};

use tokio::time::Instant;

use super::EndpointClass;

const WINDOW: Duration = Duration::from_secs(1);

/// The outcome of [`Limiter::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// The request may proceed.
    Accepted {
        /// The class's limit (`None` when not enforced).
        limit: Option<u32>,
        /// Requests still allowed in the current window.
        remaining: u32,
        /// When the oldest accepted request of the window leaves it.
        reset_at: Instant,
    },
    /// The request must be answered with 429.
    Rejected {
        /// The class's limit.
        limit: u32,
        /// When a slot frees.
        reset_at: Instant,
    },
}

#[derive(Debug, Default)]
struct ClassWindow {
    limit: Option<u32>,
    accepted: VecDeque<Instant>,
    received: VecDeque<Instant>,
    max_received: u64,
}

fn prune(q: &mut VecDeque<Instant>, now: Instant) {
    while q.front().is_some_and(|&t| now.duration_since(t) >= WINDOW) {
        q.pop_front();
    }
}

/// Sliding-window admission for both endpoint classes.
#[derive(Debug)]
pub(crate) struct Limiter {
    classes: [ClassWindow; 2],
}

impl Limiter {
    /// A limiter with `public` and `private` requests per second (`None`: not enforced).
    pub(crate) fn new(public: Option<u32>, private: Option<u32>) -> Self {
        Limiter {
            classes: [
                ClassWindow { limit: public, ..ClassWindow::default() },
                ClassWindow { limit: private, ..ClassWindow::default() },
            ],
        }
    }

    fn class(&mut self, class: EndpointClass) -> &mut ClassWindow {
        match class {
            EndpointClass::Public => &mut self.classes[0],
            EndpointClass::Private => &mut self.classes[1],
        }
    }

    /// Record a request of `class` received at `now` and decide whether to accept it.
    pub(crate) fn admit(&mut self, class: EndpointClass, now: Instant) -> Admission {
        let w = self.class(class);
        prune(&mut w.received, now);
        w.received.push_back(now);
        w.max_received = w.max_received.max(w.received.len() as u64);

        prune(&mut w.accepted, now);
        let in_window = u32::try_from(w.accepted.len()).unwrap_or(u32::MAX);
        match w.limit {
            Some(limit) if in_window >= limit => {
                Admission::Rejected { limit, reset_at: w.accepted.front().map_or(now, |&t| t + WINDOW) }
            }
            limit => {
                w.accepted.push_back(now);
                Admission::Accepted {
                    limit,
                    remaining: limit.map_or(u32::MAX, |l| l.saturating_sub(in_window + 1)),
                    reset_at: w.accepted.front().map_or(now, |&t| t + WINDOW),
                }
            }
        }
    }

    /// The state of `class` at `now` without recording a request: `(limit, remaining,
    /// reset_at)`.
    pub(crate) fn peek(&mut self, class: EndpointClass, now: Instant) -> (Option<u32>, u32, Instant) {
        let w = self.class(class);
        prune(&mut w.accepted, now);
        let used = u32::try_from(w.accepted.len()).unwrap_or(u32::MAX);
        (
            w.limit,
            w.limit.map_or(u32::MAX, |l| l.saturating_sub(used)),
            w.accepted.front().map_or(now + WINDOW, |&t| t + WINDOW),
        )
    }

    /// The most requests of `class` received in any one-second window since the last reset.
    pub(crate) fn max_received(&self, class: EndpointClass) -> u64 {
        match class {
            EndpointClass::Public => self.classes[0].max_received,
            EndpointClass::Private => self.classes[1].max_received,
        }
    }

    /// Forget the received-request history (not the admission window: limits keep applying).
    pub(crate) fn reset_stats(&mut self) {
        for w in &mut self.classes {
            w.received.clear();
            w.max_received = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn sliding_window_admission() {
        let mut l = Limiter::new(Some(3), Some(30));
        let t0 = Instant::now();
        let ok = |a: Admission| matches!(a, Admission::Accepted { .. });
        assert_eq!(
            l.admit(EndpointClass::Public, t0),
            Admission::Accepted { limit: Some(3), remaining: 2, reset_at: t0 + WINDOW }
        );
        let t1 = t0 + Duration::from_millis(400);
        assert!(ok(l.admit(EndpointClass::Public, t1)));
        assert!(ok(l.admit(EndpointClass::Public, t1)));
        assert_eq!(
            l.admit(EndpointClass::Public, t1),
            Admission::Rejected { limit: 3, reset_at: t0 + WINDOW }
        );
        // The private class is independent.
        assert!(ok(l.admit(EndpointClass::Private, t1)));
        // Just before t0's request leaves the window: still full.
        let t2 = t0 + WINDOW - Duration::from_nanos(1);
        assert!(!ok(l.admit(EndpointClass::Public, t2)));
        // Exactly one second later, t0 is out of (now - 1 s, now]: one slot.
        let t3 = t0 + WINDOW;
        assert!(ok(l.admit(EndpointClass::Public, t3)));
        assert!(!ok(l.admit(EndpointClass::Public, t3)));
        // Received: t0, t1 x3, t2 all within one second of t2 -> 5; at t3, t0 drops out but
        // two more arrive -> 6.
        assert_eq!(l.max_received(EndpointClass::Public), 6);
        assert_eq!(l.max_received(EndpointClass::Private), 1);
        l.reset_stats();
        assert_eq!(l.max_received(EndpointClass::Public), 0);
        assert!(!ok(l.admit(EndpointClass::Public, t3)), "admission survives a reset");
        assert_eq!(l.max_received(EndpointClass::Public), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn unenforced_class_accepts_everything_but_still_counts() {
        let mut l = Limiter::new(None, None);
        let t0 = Instant::now();
        for _ in 0..100 {
            assert!(matches!(l.admit(EndpointClass::Private, t0), Admission::Accepted { limit: None, .. }));
        }
        assert_eq!(l.max_received(EndpointClass::Private), 100);
        let (limit, remaining, _) = l.peek(EndpointClass::Private, t0);
        assert_eq!((limit, remaining), (None, u32::MAX));
    }
}
