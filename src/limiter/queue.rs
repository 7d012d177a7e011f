//! The wait queue of one endpoint class: requests wait by priority, then arrival, and only the
//! holder of the turn polls the GCRA, so requests leave in queue order. Every type here is
//! drop-safe: an abandoned wait leaves the queue consistent.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicUsize, Ordering},
};

use super::{Class, Priority};
use crate::util::lock;

/// What a queued request is told when it leaves the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Grant {
    /// It now holds the turn.
    Turn,
    /// A higher-priority request took its place in a full queue.
    Evicted,
}

/// `(rank, arrival)`: the smallest key is served first.
pub(super) type Key = (u8, u64);

/// The waiting requests of one class.
#[derive(Default)]
pub(super) struct Queue {
    /// Some request holds the turn (it alone polls the GCRA).
    pub(super) busy: bool,
    /// The turn is held by a [`Priority::Low`] request (higher ones may overtake it).
    pub(super) holder_low: bool,
    pub(super) next_seq: u64,
    pub(super) waiters: BTreeMap<Key, tokio::sync::oneshot::Sender<Grant>>,
    pub(super) by_rank: [usize; 3],
}

impl Queue {
    pub(super) fn push(&mut self, priority: Priority) -> (Key, tokio::sync::oneshot::Receiver<Grant>) {
        let key = (priority.rank(), self.next_seq);
        self.next_seq += 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiters.insert(key, tx);
        self.by_rank[usize::from(key.0)] += 1;
        (key, rx)
    }

    /// A place in the queue for a request of `priority` that takes the turn at once (kept in
    /// case it steps aside later, [`reinsert`](Queue::reinsert)).
    pub(super) fn place(&mut self, priority: Priority) -> Key {
        let key = (priority.rank(), self.next_seq);
        self.next_seq += 1;
        key
    }

    /// Queue again, at its old place, a request that held the turn and steps aside.
    pub(super) fn reinsert(&mut self, key: Key) -> tokio::sync::oneshot::Receiver<Grant> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiters.insert(key, tx);
        self.by_rank[usize::from(key.0)] += 1;
        rx
    }

    pub(super) fn remove(&mut self, key: &Key) -> Option<tokio::sync::oneshot::Sender<Grant>> {
        let tx = self.waiters.remove(key)?;
        self.by_rank[usize::from(key.0)] -= 1;
        Some(tx)
    }

    /// Waiters that will be served before a new request of `priority`.
    pub(super) fn ahead_of(&self, priority: Priority) -> usize {
        self.by_rank[..=usize::from(priority.rank())].iter().sum()
    }

    /// Hand the turn to the first waiter, or mark it free. Called with the turn held.
    pub(super) fn pass_turn(&mut self) {
        while let Some((key, tx)) = self.waiters.pop_first() {
            self.by_rank[usize::from(key.0)] -= 1;
            if tx.send(Grant::Turn).is_ok() {
                self.holder_low = key.0 == Priority::Low.rank();
                return;
            }
        }
        self.busy = false;
        self.holder_low = false;
    }

    /// Evict the newest waiter of the lowest priority, if that is below `priority`.
    pub(super) fn evict_below(&mut self, priority: Priority) -> bool {
        let Some(&key) = self.waiters.keys().next_back() else { return false };
        if key.0 <= priority.rank() {
            return false;
        }
        if let Some(tx) = self.remove(&key) {
            let _ = tx.send(Grant::Evicted);
        }
        true
    }
}

/// A request's place in its class's queue: waiting (`key` and `rx`) or holding the turn.
/// Dropping it, at any point, leaves the queue consistent: a waiter removes itself, and a turn
/// (including one granted just as the wait was abandoned) is handed on.
pub(super) struct Slot<'a> {
    pub(super) class: &'a Class,
    pub(super) key: Option<Key>,
    pub(super) rx: Option<tokio::sync::oneshot::Receiver<Grant>>,
    pub(super) turn: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut q = lock(&self.class.queue);
        if let Some(key) = self.key.take()
            && q.remove(&key).is_none()
        {
            // Already taken out of the queue under this lock: granted the turn or evicted.
            // Grants are sent under the lock, so the answer is in the channel.
            if let Some(mut rx) = self.rx.take()
                && rx.try_recv() == Ok(Grant::Turn)
            {
                self.turn = true;
            }
        }
        if self.turn {
            q.pass_turn();
        }
    }
}

pub(super) struct WaitingGuard<'a>(&'a AtomicUsize);

impl<'a> WaitingGuard<'a> {
    pub(super) fn enter(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        WaitingGuard(n)
    }
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
