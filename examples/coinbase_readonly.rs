//! The real client against the real Coinbase Advanced Trade API, read-only. Never run by CI.
//!
//! ```text
//! export COINBASE_API_KEY='organizations/{org_id}/apiKeys/{key_id}'
//! export COINBASE_API_SECRET="$(cat cdp_api_key.pem)"   # EC P-256 key, "-----BEGIN EC PRIVATE KEY-----"
//! cargo run --example coinbase_readonly -- BTC-USD ETH-USD
//! ```
//!
//! Without credentials it reads public market data only. It makes a handful of requests, all
//! through the default rate limiter, and prints what it got; it never places orders.

use std::error::Error;

use tickshare::{
    CandleRange, CoinbaseClient, CoordinatedSource, Credentials, Granularity, MarketDataSource, ProductId,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let products: Vec<ProductId> = {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let args = if args.is_empty() { vec!["BTC-USD".to_string()] } else { args };
        args.iter().map(|s| s.parse()).collect::<Result<_, _>>()?
    };
    let mut builder = CoinbaseClient::builder();
    match Credentials::from_env() {
        Ok(creds) => {
            println!("using CDP key {}", creds.key_name());
            builder = builder.credentials(creds);
        }
        Err(e) => println!("no credentials ({e}); public endpoints only"),
    }
    let client = builder.build()?;
    println!("server time: {}", client.server_time().await?);

    let source = CoordinatedSource::coinbase(client.clone()).build()?;
    for t in source.tickers(&products).await? {
        println!("{}: price {} bid {:?} ask {:?} at {}", t.product, t.price, t.best_bid, t.best_ask, t.time);
    }
    let now = time::OffsetDateTime::now_utc();
    for p in &products {
        let candles = source
            .candles(p, Granularity::OneHour, CandleRange::lookback(Granularity::OneHour, 24, now)?)
            .await?;
        if let (Some(first), Some(last)) = (candles.first(), candles.last()) {
            println!(
                "{p}: {} hourly candles, {} .. {}, last close {}",
                candles.len(),
                first.start,
                last.start,
                last.close
            );
        }
    }
    if client.has_credentials() {
        for a in source.accounts().await?.iter().filter(|a| !a.available.is_zero() || !a.hold.is_zero()) {
            println!("{}: available {} hold {}", a.currency, a.available, a.hold);
        }
    }
    println!("requests sent: {:?}", client.stats().requests_by_endpoint);
    Ok(())
}
