//! Load benchmark of the proxy answering cached requests over loopback: many keep-alive
//! connections each sending `GET .../market/products/BTC-USD/ticker?limit=1` back to back.
//!
//! ```text
//! cargo run --release --example proxy_load --features proxy -- [--connections 1000] [--secs 10] [--rate 20000]
//! ```
//!
//! The load generator runs in the same process as the proxy (and the simulated exchange behind
//! it), so on a small machine they share the cores: the numbers are a floor. The client is a
//! minimal HTTP/1.1 writer/reader over `TcpStream`, so that the benchmark measures the proxy
//! rather than a client library.

use std::{error::Error, time::Duration};

use tickshare::{Credentials, proxy::Proxy, sim::SimExchange};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

const TOKEN: &str = "load-test-token-0123456789";

/// Send requests back to back until `until`; latencies in microseconds.
async fn connection(
    addr: std::net::SocketAddr,
    until: Instant,
    pace: Option<Duration>,
) -> std::io::Result<Vec<u32>> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let req = format!(
        "GET /api/v3/brokerage/market/products/BTC-USD/ticker?limit=1 HTTP/1.1\r\nHost: {addr}\r\nX-Tickshare-Token: {TOKEN}\r\n\r\n"
    );
    let mut buf = vec![0u8; 8192];
    let mut lat = Vec::new();
    // Paced (open loop): start at a random offset so connections do not fire together.
    let mut tick = pace.map(|p| {
        let start = Instant::now() + p.mul_f64(fastrand_offset());
        let mut i = tokio::time::interval_at(start, p);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    while Instant::now() < until {
        if let Some(t) = &mut tick {
            t.tick().await;
        }
        let t0 = Instant::now();
        s.write_all(req.as_bytes()).await?;
        // Read one response: head, then Content-Length bytes of body.
        let mut have = 0;
        loop {
            let n = s.read(&mut buf[have..]).await?;
            if n == 0 {
                return Ok(lat);
            }
            have += n;
            let Some(head_end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") else { continue };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") {
                return Err(std::io::Error::other(head));
            }
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if have >= head_end + 4 + len {
                break;
            }
        }
        lat.push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
    }
    Ok(lat)
}

/// A pseudo-random fraction in [0, 1) without another dependency.
fn fastrand_offset() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    (h.finish() % 10_000) as f64 / 10_000.0
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let (mut conns, mut secs, mut rate) = (1000usize, 10u64, None::<f64>);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--connections" => conns = it.next().ok_or("--connections needs a value")?.parse()?,
            "--secs" => secs = it.next().ok_or("--secs needs a value")?.parse()?,
            // Total requests per second, spread evenly over the connections (open loop);
            // without it every connection sends back to back (closed loop, peak throughput).
            "--rate" => rate = Some(it.next().ok_or("--rate needs a value")?.parse()?),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let sim = SimExchange::builder().start().await?;
    let proxy = Proxy::builder(Credentials::generate("organizations/load/apiKeys/proxy"))
        .upstream(sim.base_url())
        .listen("127.0.0.1:0".parse()?)
        .local_token(TOKEN)
        .start()
        .await?;
    let addr = proxy.addr();
    // Warm the cache, then measure.
    connection(addr, Instant::now() + Duration::from_millis(5), None).await?;
    let until = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let pace = rate.map(|r| Duration::from_secs_f64(conns as f64 / r));
    let tasks: Vec<_> = (0..conns).map(|_| tokio::spawn(connection(addr, until, pace))).collect();
    let mut lat: Vec<u32> = Vec::new();
    let mut failed = 0;
    for t in tasks {
        match t.await? {
            Ok(l) => lat.extend(l),
            Err(e) => {
                failed += 1;
                if failed == 1 {
                    eprintln!("a connection failed: {e}");
                }
            }
        }
    }
    let took = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| lat.get(((lat.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(0) as f64 / 1000.0;
    let s = proxy.stats();
    println!("connections        {conns} ({failed} failed)");
    println!("requests           {} in {took:.1} s", lat.len());
    println!("throughput         {:.0} req/s", lat.len() as f64 / took);
    println!(
        "latency ms         p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
    println!(
        "upstream calls     {} (cache hit rate {:.5}); exchange saw {} requests, {} x 429",
        s.coordinated.upstream_calls,
        s.coordinated.hit_rate,
        sim.stats().total_calls,
        sim.stats().rate_limited_429
    );
    proxy.shutdown().await;
    Ok(())
}
