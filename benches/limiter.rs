//! The cost of `RateLimiter::acquire` when the budget is not the bottleneck: one caller
//! (uncontended), and 100 tasks on all cores acquiring at once (contended). The quota is set
//! so high that nobody waits, so what is timed is the limiter's own bookkeeping.
#![allow(missing_docs)]

use std::{
    num::NonZeroU32,
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, Throughput};
use tickshare::{ClassLimit, EndpointClass, RateLimiter, RateLimiterConfig};
use tokio::task::JoinSet;

use crate::support::{current_thread, multi_thread};

const TASKS: usize = 100;
const PER_TASK: usize = 100;

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

/// A quota that never binds: 10^9 requests/s with a burst of 2 × 10^9, so the GCRA's
/// tolerance is two seconds. (With a small burst the tolerance is nanoseconds, and threads
/// whose clock reads differ by more than that are sent to the queue though no budget is short.)
fn unbounded() -> RateLimiter {
    let class = ClassLimit {
        limit_per_second: nz(3_000_000_000),
        rate_per_second: nz(1_000_000_000),
        burst: nz(2_000_000_000),
    };
    RateLimiter::new(RateLimiterConfig { public: class, private: class, ..Default::default() })
        .unwrap_or_else(|e| panic!("limiter: {e}"))
}

pub(crate) fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("limiter");

    let rt = current_thread();
    let limiter = unbounded();
    g.throughput(Throughput::Elements(1));
    g.bench_function("acquire_uncontended", |b| {
        b.to_async(&rt).iter(|| limiter.acquire(EndpointClass::Private))
    });
    // The claim: nobody waited, so the numbers are bookkeeping only.
    assert_eq!(limiter.stats().private.waits, 0);

    let rt = multi_thread();
    let limiter = unbounded();
    g.throughput(Throughput::Elements((TASKS * PER_TASK) as u64));
    g.bench_with_input(
        BenchmarkId::new("acquire_contended", format!("{TASKS}_tasks")),
        &limiter,
        |b, limiter| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t0 = Instant::now();
                    let mut set = JoinSet::new();
                    for _ in 0..TASKS {
                        let l = limiter.clone();
                        set.spawn(async move {
                            for _ in 0..PER_TASK {
                                l.acquire(EndpointClass::Private)
                                    .await
                                    .unwrap_or_else(|e| panic!("acquire: {e}"));
                            }
                        });
                    }
                    while let Some(r) = set.join_next().await {
                        r.unwrap_or_else(|e| panic!("task: {e}"));
                    }
                    total += t0.elapsed();
                }
                total
            });
        },
    );
    g.finish();
    let s = limiter.stats().private;
    eprintln!("limiter: contended run: {} acquired, {} waited", s.acquired, s.waits);
    assert_eq!(s.waits, 0, "the contended run measured queueing, not bookkeeping");
}
