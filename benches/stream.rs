//! The push feed's cost per product (issue #18): decoding one pushed frame and applying it to
//! the coordinated cache, exactly as one `MarketStream` connection does (through the hidden
//! `FeedBench` hook, no socket). A `candles` update merges each product's candle in progress
//! into its five-minute series (a day of history, 288 candles) and re-derives its one-hour
//! series' candle in progress; a `ticker_batch` stores each product's ticker. Frames of 1 and
//! 500 products; `Throughput::Elements` is products, so criterion's rate is per product.
#![allow(missing_docs)]

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use tickshare::{
    CandleRange, Clock, CoordinatedSource, Granularity, MarketDataSource, MarketStream, ProductId,
    stream::FeedBench,
};
use time::{OffsetDateTime, format_description::well_known::Rfc3339, macros::datetime};

use crate::support::{Upstream, products};

const NOW: OffsetDateTime = datetime!(2024-04-24 10:46:38 UTC);

fn candle_json(p: &ProductId, start: OffsetDateTime, k: i64) -> String {
    let px = 1_000 + k % 17;
    format!(
        r#"{{"start":"{}","high":"{}.5","low":"{}.25","open":"{px}.25","close":"{px}.5","volume":"1.5","product_id":"{p}"}}"#,
        start.unix_timestamp(),
        px + 1,
        px - 1,
    )
}

fn candles_frame(ids: &[ProductId], start: OffsetDateTime, at: OffsetDateTime, k: i64) -> String {
    let list: Vec<String> = ids.iter().map(|p| candle_json(p, start, k)).collect();
    format!(
        r#"{{"channel":"candles","timestamp":"{}","events":[{{"type":"update","candles":[{}]}}]}}"#,
        at.format(&Rfc3339).unwrap_or_else(|e| panic!("format: {e}")),
        list.join(",")
    )
}

fn ticker_frame(ids: &[ProductId], at: OffsetDateTime) -> String {
    let list: Vec<String> = ids
        .iter()
        .map(|p| {
            format!(
                r#"{{"type":"ticker","product_id":"{p}","price":"1003.5","volume_24_h":"12345.678","low_24_h":"990.25","high_24_h":"1010.5","low_52_w":"","high_52_w":"","price_percent_chg_24_h":"-1.25"}}"#
            )
        })
        .collect();
    format!(
        r#"{{"channel":"ticker_batch","timestamp":"{}","events":[{{"type":"update","tickers":[{}]}}]}}"#,
        at.format(&Rfc3339).unwrap_or_else(|e| panic!("format: {e}")),
        list.join(",")
    )
}

pub(crate) fn bench(c: &mut Criterion) {
    // Paused: the cache's freshness is judged on tokio's clock, which then stays at NOW.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let mut group = c.benchmark_group("stream");
    for n in [1usize, 500] {
        let upstream = Upstream::new(Duration::ZERO);
        let clock = Clock::starting_at(NOW);
        let ids = products(n);
        let (mut feed, source) = rt.block_on(async {
            let source = CoordinatedSource::builder_arc(upstream.clone())
                .clock(clock)
                .build()
                .unwrap_or_else(|e| panic!("build: {e}"));
            // Bots read the one-hour series (REST once), then a day of five-minute candles is
            // pushed, the last one at NOW.
            let h = Granularity::OneHour;
            for p in &ids {
                let range = CandleRange::lookback(h, 24, NOW).unwrap_or_else(|e| panic!("range: {e}"));
                source.candles(p, h, range).await.unwrap_or_else(|e| panic!("warm: {e}"));
            }
            let mut feed = FeedBench::new(MarketStream::builder(source.clone()).products(ids.clone()))
                .unwrap_or_else(|e| panic!("feed: {e}"));
            let five = Granularity::FiveMinute;
            let current = five.bucket_start(NOW);
            for k in (0..288i64).rev() {
                let start = current - time::Duration::minutes(5 * k);
                let at = if k == 0 { NOW } else { start + time::Duration::seconds(299) };
                feed.apply(&candles_frame(&ids, start, at, k)).await;
            }
            (feed, source)
        });
        let current = Granularity::FiveMinute.bucket_start(NOW);
        let candles = candles_frame(&ids, current, NOW, 3);
        let tickers = ticker_frame(&ids, NOW + time::Duration::milliseconds(500));
        // The claim, once before timing: a candles frame merges every product's candle and
        // re-derives every one-hour series, a ticker frame stores every ticker, and neither
        // makes an upstream call.
        let calls = upstream.calls();
        let before = feed.stats();
        rt.block_on(feed.apply(&candles));
        rt.block_on(feed.apply(&tickers));
        let after = feed.stats();
        assert_eq!(after.candle_merges - before.candle_merges, n as u64);
        assert_eq!(after.derived_updates - before.derived_updates, n as u64);
        assert_eq!(after.tickers_applied - before.tickers_applied, n as u64);
        assert_eq!((after.decode_errors, upstream.calls()), (0, calls));
        let five = rt.block_on(async {
            let range =
                CandleRange::lookback(Granularity::FiveMinute, 288, NOW).unwrap_or_else(|e| panic!("{e}"));
            source.candles(&ids[0], Granularity::FiveMinute, range).await.unwrap_or_else(|e| panic!("{e}"))
        });
        assert_eq!(
            (five.len(), upstream.calls()),
            (288, calls),
            "a day of pushed candles, served from the cache"
        );

        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("candles_frame", n), &candles, |b, text| {
            b.iter(|| rt.block_on(feed.apply(text)));
        });
        group.bench_with_input(BenchmarkId::new("ticker_batch_frame", n), &tickers, |b, text| {
            b.iter(|| rt.block_on(feed.apply(text)));
        });
        drop(source);
    }
    group.finish();
}
