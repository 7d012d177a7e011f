//! Warm reads through `CoordinatedSource`: what a bot pays when the data is already cached.
//! Goal (issue #6): a warm `ticker()` median under 500 ns.
#![allow(missing_docs)]

use std::{hint::black_box, sync::atomic::Ordering, time::Duration};

use criterion::{Criterion, Throughput};
use tickshare::{CandleRange, CoordinatedSource, Granularity, MarketDataSource, ReadOptions};

use crate::support::{Upstream, current_thread, products};

pub(crate) fn bench(c: &mut Criterion) {
    let rt = current_thread();
    let upstream = Upstream::new(Duration::ZERO);
    let hour = Duration::from_secs(3600);
    // TTLs longer than the bench, so every timed read is a hit.
    let source = CoordinatedSource::builder_arc(upstream.clone())
        .ticker_ttl(hour)
        .accounts_ttl(hour)
        .max_stale(hour)
        .build()
        .unwrap_or_else(|e| panic!("build: {e}"));
    // 1,000 products cached, so the lookups are not into a one-entry map.
    let ids = products(1_000);
    let btc = ids[0].clone();
    let range = CandleRange::lookback(Granularity::OneHour, 24, time::OffsetDateTime::now_utc())
        .unwrap_or_else(|e| panic!("range: {e}"));
    rt.block_on(async {
        source.tickers(&ids).await.unwrap_or_else(|e| panic!("warm tickers: {e}"));
        source
            .candles(&btc, Granularity::OneHour, range)
            .await
            .unwrap_or_else(|e| panic!("warm candles: {e}"));
        source.accounts().await.unwrap_or_else(|e| panic!("warm accounts: {e}"));
    });

    // The claim: warm reads make no upstream call. (Only ticker calls are compared: the candle
    // series is refreshed once if the bench crosses the hour.)
    let ticker_calls = || upstream.ticker.load(Ordering::Relaxed) + upstream.tickers.load(Ordering::Relaxed);
    let before = ticker_calls();
    rt.block_on(async {
        for _ in 0..1_000 {
            black_box(source.ticker(&btc).await.unwrap_or_else(|e| panic!("ticker: {e}")));
        }
    });
    assert_eq!(ticker_calls(), before, "a warm ticker read reached the upstream");

    let mut g = c.benchmark_group("cache");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ticker_hit", |b| b.to_async(&rt).iter(|| source.ticker(&btc)));
    g.bench_function("ticker_with_hit", |b| {
        b.to_async(&rt).iter(|| source.ticker_with(&btc, ReadOptions::default()))
    });
    g.bench_function("candles_24_hit", |b| {
        b.to_async(&rt).iter(|| source.candles(&btc, Granularity::OneHour, range))
    });
    g.bench_function("accounts_hit", |b| {
        b.to_async(&rt).iter(|| source.accounts_with(ReadOptions::default()))
    });
    g.finish();

    let mut g = c.benchmark_group("cache_concurrent");
    // 1,000 bots reading 1,000 cached tickers at once on one thread.
    g.throughput(Throughput::Elements(ids.len() as u64));
    g.bench_function("tickers_1000_hit", |b| b.to_async(&rt).iter(|| source.tickers(&ids)));
    g.finish();
    assert_eq!(ticker_calls(), before, "a warm ticker read reached the upstream");
}
