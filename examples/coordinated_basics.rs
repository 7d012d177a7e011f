//! The smallest wiring of a `CoordinatedSource`: start the simulated exchange, put the
//! coordinated layer in front of its client, and watch 1,000 concurrent reads turn into a
//! handful of upstream calls.
//!
//! ```text
//! cargo run --example coordinated_basics
//! ```

use std::error::Error;

use tickshare::{CoordinatedSource, MarketDataSource, ProductId, ReadOptions, sim::SimExchange};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    // A local exchange with Coinbase's rate limits; against the real one, build the client
    // with `CoinbaseClient::builder().credentials(Credentials::from_env()?)` instead.
    let sim = SimExchange::builder().start().await?;
    let source = CoordinatedSource::coinbase(sim.client()?).build()?;

    // 1,000 concurrent reads of one product: one upstream call, everyone gets its answer.
    let btc: ProductId = "BTC-USD".parse()?;
    let reads = (0..1000).map(|_| source.ticker(&btc));
    let results = futures_util::future::join_all(reads).await;
    println!("1000 concurrent BTC-USD reads: {} ok", results.iter().filter(|r| r.is_ok()).count());

    // Tickers of ten products: one batched best_bid_ask call.
    let ten: Vec<ProductId> = sim.products().into_iter().take(10).collect();
    let tickers = source.tickers(&ten).await?;
    println!("10 products in one batch: {} tickers", tickers.len());

    // Provenance: a second read comes from cache, with its age.
    let again = source.ticker_with(&btc, ReadOptions::default()).await?;
    println!("BTC-USD {} (from {:?}, {} ms old)", again.value.price, again.origin, again.age.as_millis());

    let stats = source.stats();
    println!(
        "upstream calls: {} {:?}; hit rate {:.1} %; coalesced waiters {}",
        stats.upstream_calls,
        stats.upstream_calls_by_endpoint,
        stats.hit_rate * 100.0,
        stats.coalesced_waiters
    );
    println!(
        "exchange saw {} requests, {} answered 429",
        sim.stats().total_calls,
        sim.stats().rate_limited_429
    );
    Ok(())
}
