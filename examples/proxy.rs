//! A drop-in caching proxy for Coinbase Advanced Trade: bots in any language change their base
//! URL to this one and share one coordinated, rate-limited path to the exchange.
//!
//! ```text
//! export COINBASE_API_KEY=organizations/.../apiKeys/...   # the CDP key the proxy signs with
//! export COINBASE_API_SECRET="-----BEGIN EC PRIVATE KEY-----\n..."
//! export TICKSHARE_PROXY_TOKEN=$(openssl rand -hex 24)     # optional local token for clients
//! cargo run --example proxy --features proxy -- --listen 127.0.0.1:8787 [--upstream URL]
//! curl -H "X-Tickshare-Token: $TICKSHARE_PROXY_TOKEN" \
//!      127.0.0.1:8787/api/v3/brokerage/market/products/BTC-USD/ticker?limit=1
//! curl 127.0.0.1:8787/healthz
//! curl -H "X-Tickshare-Token: $TICKSHARE_PROXY_TOKEN" 127.0.0.1:8787/metrics
//! ```
//!
//! `--upstream` defaults to the real API; give it the simulated exchange's URL (e.g. from
//! `cargo run --example sim_exchange`) or any look-alike. `--sim` starts a simulated exchange
//! in-process instead (it accepts any well-formed JWT), and `--allow-remote` permits a
//! non-loopback `--listen` (a local token is then required). `--serve-secs N` stops after N
//! seconds, for scripted runs. `--per-connection-rate N[:BURST]` sets each connection's request
//! budget (default 10,000/s, burst 20,000; a load test that drives one or two connections
//! faster than that measures the proxy's own 429s).

use std::{error::Error, net::SocketAddr, time::Duration};

use tickshare::{Credentials, proxy::Proxy};

const USAGE: &str = "usage: proxy [--listen ADDR] [--upstream URL | --sim] [--allow-remote] [--serve-secs N]
             [--per-connection-rate N[:BURST]]
  credentials: COINBASE_API_KEY, COINBASE_API_SECRET (ES256 PEM or Ed25519 base64);
  optional local client token: TICKSHARE_PROXY_TOKEN";

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut listen: SocketAddr = "127.0.0.1:8787".parse()?;
    let mut upstream: Option<String> = None;
    let mut allow_remote = false;
    let mut serve_secs: Option<u64> = None;
    let mut sim = false;
    let mut per_connection: Option<(u32, u32)> = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            "--listen" => listen = it.next().ok_or("--listen needs an address")?.parse()?,
            "--upstream" => upstream = Some(it.next().ok_or("--upstream needs a URL")?),
            "--allow-remote" => allow_remote = true,
            "--sim" => sim = true,
            "--serve-secs" => serve_secs = Some(it.next().ok_or("--serve-secs needs a value")?.parse()?),
            "--per-connection-rate" => {
                let v = it.next().ok_or("--per-connection-rate needs N or N:BURST")?;
                let (rate, burst) = match v.split_once(':') {
                    Some((r, b)) => (r.parse()?, b.parse()?),
                    None => {
                        let r: u32 = v.parse()?;
                        (r, r.saturating_mul(2))
                    }
                };
                per_connection = Some((rate, burst));
            }
            other => return Err(format!("unknown argument {other}\n{USAGE}").into()),
        }
    }

    // With `--sim`, an in-process simulated exchange; it accepts any well-formed JWT, so a
    // generated key stands in when no credentials are set.
    #[cfg(feature = "sim")]
    let _sim = if sim {
        let s = tickshare::sim::SimExchange::builder().start().await?;
        upstream = Some(s.base_url().to_string());
        println!("simulated exchange at {}", s.base_url());
        Some(s)
    } else {
        None
    };
    #[cfg(not(feature = "sim"))]
    if sim {
        return Err("--sim needs the sim feature".into());
    }
    let credentials = match Credentials::from_env() {
        Ok(c) => c,
        Err(e) if sim => {
            println!("({e}; using a generated key against the simulator)");
            Credentials::generate("organizations/local/apiKeys/proxy")
        }
        Err(e) => return Err(e.into()),
    };

    let mut builder = Proxy::builder(credentials).listen(listen).allow_remote(allow_remote);
    if let Some(u) = upstream {
        builder = builder.upstream(u);
    }
    if let Some((rate, burst)) = per_connection {
        builder = builder.per_connection_rate(rate, burst);
    }
    if let Ok(token) = std::env::var("TICKSHARE_PROXY_TOKEN") {
        builder = builder.local_token(token);
    }
    let proxy = builder.start().await?;
    println!("tickshare proxy on {} (API base {}/api/v3/brokerage)", proxy.base_url(), proxy.base_url());

    match serve_secs {
        Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    let stats = proxy.stats();
    println!(
        "served {:?}; upstream calls {}, cache hit rate {:.3}, 429s {}",
        stats.requests_by_route,
        stats.coordinated.upstream_calls,
        stats.coordinated.hit_rate,
        stats.coordinated.rate_limit_errors
    );
    proxy.shutdown().await;
    Ok(())
}
