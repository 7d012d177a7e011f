//! Criterion benchmarks of tickshare (see README, "Performance"), in governor's layout: one
//! entry point gathering one module per concern.
//!
//! ```text
//! cargo bench                                   # everything, a few minutes
//! cargo bench -- cache                          # one group
//! cargo bench -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! Each module checks its claim (upstream call counts, no errors) once before timing, so a
//! regression in caching, coalescing or batching fails the bench instead of making it faster.
#![allow(missing_docs)]

mod auth;
mod batch;
mod cache;
mod coalesce;
mod evaluator;
mod legacy_vs_coordinated;
mod limiter;
mod stream;
mod support;

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};

fn config() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = cache::bench, coalesce::bench, batch::bench, evaluator::bench, limiter::bench,
        legacy_vs_coordinated::bench, auth::bench, stream::bench
}
criterion_main!(benches);
