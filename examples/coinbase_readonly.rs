//! The real client against the real Coinbase Advanced Trade API, read-only. Never run by CI.
//!
//! ```text
//! # the key file the CDP portal downloads (Ed25519 or ECDSA key; `name` or `id`, `privateKey`)
//! cargo run --example coinbase_readonly -- --key-file ~/Downloads/cdp_api_key.json BTC-USD ETH-USD
//! COINBASE_API_KEY_FILE=~/Downloads/cdp_api_key.json cargo run --example coinbase_readonly
//!
//! # or the SDK's variables: an Ed25519 key id and its base64 secret ...
//! export COINBASE_API_KEY='d2efa49a-...'
//! export COINBASE_API_SECRET='...=='                      # 88 base64 characters
//! # ... or an ECDSA key name and its PEM ("-----BEGIN EC PRIVATE KEY-----", literal \n is fine)
//! export COINBASE_API_KEY='organizations/{org_id}/apiKeys/{key_id}'
//! export COINBASE_API_SECRET="$(cat cdp_api_key.pem)"
//! cargo run --example coinbase_readonly -- BTC-USD ETH-USD
//! ```
//!
//! The key type is detected from the key (Ed25519 signs EdDSA JWTs, P-256 signs ES256). Without
//! credentials it reads public market data only. It makes a handful of requests, all through the
//! default rate limiter, and prints what it got; it never places orders.

use std::{error::Error, path::PathBuf};

use tickshare::{
    CandleRange, CoinbaseClient, CoordinatedSource, Credentials, Granularity, MarketDataSource, ProductId,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    // `--key-file PATH` (or COINBASE_API_KEY_FILE) names the portal's JSON key file; every
    // other argument is a product id.
    let mut key_file = std::env::var_os("COINBASE_API_KEY_FILE").map(PathBuf::from);
    let mut ids = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--key-file" {
            key_file = Some(args.next().ok_or("--key-file needs a path")?.into());
        } else {
            ids.push(arg);
        }
    }
    if ids.is_empty() {
        ids.push("BTC-USD".to_string());
    }
    let products: Vec<ProductId> = ids.iter().map(|s| s.parse()).collect::<Result<_, _>>()?;

    let mut builder = CoinbaseClient::builder();
    // A key file that was asked for must work; the environment is optional.
    let creds = match &key_file {
        Some(path) => Some(Credentials::from_json_file(path)?),
        None => match Credentials::from_env() {
            Ok(creds) => Some(creds),
            Err(e) => {
                println!("no credentials ({e}); public endpoints only");
                None
            }
        },
    };
    if let Some(creds) = creds {
        println!("using CDP key {} ({} JWTs)", creds.key_name(), creds.algorithm());
        builder = builder.credentials(creds);
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
