//! Gathering ticker requests from many bots into one `best_bid_ask` call.
//!
//! The first request opens a batch and starts its window; requests that arrive before the
//! window ends (or until the batch is full) join it; then one upstream call serves them all
//! and each caller gets its own product's answer through a oneshot channel. This file holds
//! the bookkeeping; [`CoordinatedSource`](crate::CoordinatedSource) spawns the timer and the
//! call.

use std::sync::{
    Mutex,
    atomic::{AtomicU64, Ordering},
};

use tokio::sync::oneshot;

use super::cache::Entry;
use crate::{error::Result, model::ProductId, model::Ticker, util::lock};

pub(crate) type Reply = oneshot::Sender<Result<Entry<Ticker>>>;
pub(crate) type Items = Vec<(ProductId, Reply)>;

/// What the caller of [`Batcher::submit`] must do next.
pub(crate) enum Next {
    /// Nothing: the request joined an open batch.
    Wait,
    /// A new batch was opened: start its window timer.
    StartTimer(u64),
    /// The batch is full: send it now.
    Flush(Items),
}

pub(crate) struct Batcher {
    open: Mutex<Option<(u64, Items)>>,
    next_id: AtomicU64,
    max: usize,
}

impl Batcher {
    pub(crate) fn new(max: usize) -> Self {
        Batcher { open: Mutex::new(None), next_id: AtomicU64::new(0), max: max.max(1) }
    }

    pub(crate) fn submit(&self, product: ProductId) -> (oneshot::Receiver<Result<Entry<Ticker>>>, Next) {
        let (tx, rx) = oneshot::channel();
        let mut open = lock(&self.open);
        let mut next = Next::Wait;
        let batch = open.get_or_insert_with(|| {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            next = Next::StartTimer(id);
            (id, Vec::new())
        });
        batch.1.push((product, tx));
        if batch.1.len() >= self.max
            && let Some((_, items)) = open.take()
        {
            next = Next::Flush(items);
        }
        (rx, next)
    }

    /// Close batch `id` when its window ends, unless it was already sent because it filled up.
    pub(crate) fn take(&self, id: u64) -> Option<Items> {
        let mut open = lock(&self.open);
        match open.as_ref() {
            Some((open_id, _)) if *open_id == id => open.take().map(|(_, items)| items),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ProductId {
        s.parse().unwrap()
    }

    #[test]
    fn opens_fills_and_flushes() {
        let b = Batcher::new(3);
        let (_r1, n1) = b.submit(id("A-USD"));
        let Next::StartTimer(first) = n1 else { panic!("expected a new batch") };
        let (_r2, n2) = b.submit(id("B-USD"));
        assert!(matches!(n2, Next::Wait));
        let (_r3, n3) = b.submit(id("C-USD"));
        let Next::Flush(items) = n3 else { panic!("expected a full batch") };
        assert_eq!(items.len(), 3);
        // The timer of the flushed batch finds nothing.
        assert!(b.take(first).is_none());
        let (_r4, n4) = b.submit(id("D-USD"));
        let Next::StartTimer(second) = n4 else { panic!("expected a new batch") };
        assert_ne!(first, second);
        assert_eq!(b.take(second).map(|i| i.len()), Some(1));
        assert!(b.take(second).is_none());
    }
}
