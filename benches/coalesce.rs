//! Single-flight: N concurrent identical cold requests (each from its own task) against an
//! upstream with a fixed delay make one upstream call. The overhead per waiter is
//! `(time(N) - time(1)) / (N - 1)`, printed once before the timed runs.
//!
//! Ticker batching is off here so that only coalescing is measured (with it, the one call
//! also waits for the 5 ms batch window; see `batch.rs`).
#![allow(missing_docs)]

use std::{
    cell::OnceCell,
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, Throughput};
use tickshare::{CoordinatedSource, MarketDataSource};
use tokio::task::JoinSet;

use crate::support::{Upstream, multi_thread, products};

const DELAY: Duration = Duration::from_millis(2);

/// One cold burst of `n` identical requests on a fresh source: (time until all answered,
/// upstream calls made).
async fn burst(n: usize) -> (Duration, u64) {
    let upstream = Upstream::new(DELAY);
    let source = CoordinatedSource::builder_arc(upstream.clone())
        .batch_tickers(false)
        .build()
        .unwrap_or_else(|e| panic!("build: {e}"));
    let product = products(1).remove(0);
    let t0 = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..n {
        let (s, p) = (source.clone(), product.clone());
        set.spawn(async move { s.ticker(&p).await });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap_or_else(|e| panic!("task: {e}")).unwrap_or_else(|e| panic!("ticker: {e}"));
    }
    let elapsed = t0.elapsed();
    (elapsed, upstream.calls())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The claim, checked before timing: 1,000 waiters, one upstream call. Prints the overhead
/// per waiter from medians of 15 runs each.
async fn check() {
    let mut one = Vec::new();
    let mut many = Vec::new();
    for _ in 0..15 {
        let (t, calls) = burst(1).await;
        assert_eq!(calls, 1);
        one.push(t);
        let (t, calls) = burst(1_000).await;
        assert_eq!(calls, 1, "1,000 identical cold requests made {calls} upstream calls");
        many.push(t);
    }
    let (one, many) = (median(one), median(many));
    let per_waiter = many.saturating_sub(one) / 999;
    eprintln!(
        "coalesce: 1 waiter {one:?}, 1,000 waiters {many:?} (upstream delay {DELAY:?}, 1 upstream call): \
         overhead {per_waiter:?} per extra waiter"
    );
}

pub(crate) fn bench(c: &mut Criterion) {
    let rt = multi_thread();
    // Set up lazily: criterion calls a closure only when its id matches the filter.
    let checked = OnceCell::new();
    let mut g = c.benchmark_group("coalesce");
    for n in [1usize, 100, 1_000, 10_000] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("identical_cold_requests", n), &n, |b, &n| {
            checked.get_or_init(|| rt.block_on(check()));
            b.to_async(&rt).iter_custom(|iters| async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (t, c) = burst(n).await;
                    assert_eq!(c, 1, "{n} identical cold requests made {c} upstream calls");
                    total += t;
                }
                total
            });
        });
    }
    g.finish();
}
