//! Warm ticks of the `BatchEvaluator` with a trivial strategy: every ticker, candle series and
//! the balances are cached, so a tick is the snapshot assembly plus one evaluation per bot.
//! Goal (issue #6): 10,000 bots over 500 products in under 20 ms.
#![allow(missing_docs)]

use std::{cell::OnceCell, sync::Arc, time::Duration};

use criterion::{BenchmarkId, Criterion, Throughput};
use tickshare::{BatchEvaluator, Bot, CoordinatedSource, MarketDataSource, MarketSnapshot};
use tokio::runtime::Runtime;

use crate::support::{Upstream, current_thread, fleet, products};

const SIZES: [(usize, usize); 3] = [(25, 25), (1_000, 100), (10_000, 500)];

struct Setup {
    bots: Vec<Bot>,
    evaluator: BatchEvaluator,
    snapshot: MarketSnapshot,
}

/// A warm evaluator over `bots` bots and `n_products` products, checked: a warm tick makes no
/// upstream call and every bot gets a decision.
fn setup(rt: &Runtime, bots: usize, n_products: usize) -> Setup {
    let hour = Duration::from_secs(3600);
    let upstream = Upstream::new(Duration::ZERO);
    let source = CoordinatedSource::builder_arc(upstream.clone())
        .ticker_ttl(hour)
        .accounts_ttl(hour)
        .max_stale(hour)
        .build()
        .unwrap_or_else(|e| panic!("build: {e}"));
    let ids = products(n_products);
    let fleet = fleet(bots, &ids);
    let evaluator =
        BatchEvaluator::new(Arc::new(source.clone()) as Arc<dyn MarketDataSource>).meter(Arc::new(source));
    let report = rt.block_on(evaluator.evaluate_all(&fleet));
    assert_eq!(report.errors().count(), 0, "cold tick errors: {:?}", report.errors().next());
    let report = rt.block_on(evaluator.evaluate_all(&fleet));
    assert_eq!((report.upstream_calls, report.errors().count()), (0, 0), "warm tick");
    assert_eq!(report.results.len(), bots);
    let refs: Vec<&Bot> = fleet.iter().collect();
    let snapshot = rt.block_on(async {
        let src: &dyn MarketDataSource = &*upstream;
        MarketSnapshot::fetch(src, &refs, time::OffsetDateTime::now_utc()).await
    });
    Setup { bots: fleet, evaluator, snapshot }
}

pub(crate) fn bench(c: &mut Criterion) {
    let rt = current_thread();
    let mut g = c.benchmark_group("evaluator");
    g.sample_size(30);
    for (bots, n_products) in SIZES {
        // Lazily: criterion calls a closure only when its id matches the filter.
        let state: OnceCell<Setup> = OnceCell::new();
        let id = format!("{bots}_bots_{n_products}_products");
        g.throughput(Throughput::Elements(bots as u64));
        g.bench_function(BenchmarkId::new("warm_tick", &id), |b| {
            let s = state.get_or_init(|| setup(&rt, bots, n_products));
            b.to_async(&rt).iter(|| s.evaluator.evaluate_all(&s.bots));
        });
        // The CPU part alone: every bot evaluated on a snapshot already taken.
        g.bench_function(BenchmarkId::new("evaluate_on_snapshot", &id), |b| {
            let s = state.get_or_init(|| setup(&rt, bots, n_products));
            b.iter(|| s.bots.iter().map(|bot| s.snapshot.evaluate(bot)).filter(Result::is_ok).count());
        });
    }
    g.finish();
}
