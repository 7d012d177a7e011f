//! Cross-bot batching: 1,000 concurrent cold ticker requests (each from its own task) over 100
//! products make ⌈100 / B⌉ batched upstream calls for batch size B. The upstream answers
//! after a fixed delay; B divides 100 here, so every batch is sent as soon as it is full and
//! none waits for the batch window (100 ms here, so that no batch is split on a busy machine).
#![allow(missing_docs)]

use std::{
    cell::OnceCell,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, Throughput};
use tickshare::{CoordinatedSource, MarketDataSource};
use tokio::task::JoinSet;

use crate::support::{Upstream, multi_thread, products};

const DELAY: Duration = Duration::from_millis(2);
const REQUESTS: usize = 1_000;
const PRODUCTS: usize = 100;

/// One cold burst on a fresh source: (time until all answered, batched calls, other calls).
async fn burst(batch_size: usize) -> (Duration, u64, u64) {
    let upstream = Upstream::new(DELAY);
    let source = CoordinatedSource::builder_arc(upstream.clone())
        .batch_size(batch_size)
        // Every batch here is sent when full; the long window only keeps a loaded machine
        // (a late task) from splitting one into two, which would fail the call-count check.
        .batch_window(Duration::from_millis(100))
        .build()
        .unwrap_or_else(|e| panic!("build: {e}"));
    let ids = products(PRODUCTS);
    let t0 = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..REQUESTS {
        let (s, p) = (source.clone(), ids[i % PRODUCTS].clone());
        set.spawn(async move { s.ticker(&p).await });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap_or_else(|e| panic!("task: {e}")).unwrap_or_else(|e| panic!("ticker: {e}"));
    }
    let elapsed = t0.elapsed();
    let batched = upstream.tickers.load(Ordering::Relaxed);
    (elapsed, batched, upstream.calls() - batched)
}

pub(crate) fn bench(c: &mut Criterion) {
    let rt = multi_thread();
    let sizes = [10usize, 25, 50, 100];
    // The claim, checked once before timing each size (lazily: criterion calls a closure only
    // when its id matches the filter).
    let checked: [OnceCell<()>; 4] = Default::default();

    let mut g = c.benchmark_group("batch");
    g.throughput(Throughput::Elements(REQUESTS as u64));
    for (i, b) in sizes.into_iter().enumerate() {
        g.bench_with_input(BenchmarkId::new("cold_1000_requests_100_products", b), &b, |bench, &b| {
            checked[i].get_or_init(|| {
                let (t, batched, other) = rt.block_on(burst(b));
                let want = PRODUCTS.div_ceil(b) as u64;
                assert_eq!((batched, other), (want, 0), "batch size {b}: {batched} batched + {other} other calls");
                eprintln!("batch: B={b}: {REQUESTS} requests over {PRODUCTS} products -> {batched} upstream calls in {t:?}");
            });
            bench.to_async(&rt).iter_custom(|iters| async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (t, batched, other) = burst(b).await;
                    assert_eq!((batched, other), (PRODUCTS.div_ceil(b) as u64, 0), "batch size {b}");
                    total += t;
                }
                total
            });
        });
    }
    g.finish();
}
