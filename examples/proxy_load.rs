//! Load benchmark of the proxy answering cached requests over loopback: many keep-alive
//! connections each sending `GET .../market/products/BTC-USD/ticker?limit=1` back to back.
//!
//! ```text
//! cargo run --release --example proxy_load --features proxy -- [--connections 1000] [--secs 10] [--rate 20000]
//!     [--proxy-threads 1] [--load-threads 1] [--shared-runtime] [--target ADDR] [--baseline] [--pin]
//!     [--per-connection-rate N] [--serve-only [--listen ADDR]] [--show-slow]
//! ```
//!
//! `--show-slow` prints when the requests over 2 ms were sent, by 100 ms window: a tail in
//! bursts that the bare server (`--baseline`) shows too is the machine's; a burst at every
//! ticker TTL (5 s) is the proxy's own refetch (readers wait for it; `refresh_before_expiry`
//! in the proxy's `CoordinatedConfig` refreshes ahead instead). The simulated exchange runs on
//! a runtime of its own (thread `exchange`), as the real one runs elsewhere.
//!
//! `--serve-only` starts the proxy (or, with `--baseline`, the bare hyper server) on `--listen`
//! (default `127.0.0.1:8787`) for `--secs` seconds and generates no load, so that a load
//! generator of your own drives it (wrk, wrk2, …; the local token is below, or `--token`); at
//! the end it prints the requests served and the server's CPU time per request:
//!
//! ```text
//! cargo run --release --example proxy_load --features proxy -- --serve-only --secs 60 [--baseline] &
//! wrk2 -t2 -c1000 -d20s -R20000 --latency -H 'X-Tickshare-Token: load-test-token-0123456789' \
//!     'http://127.0.0.1:8787/api/v3/brokerage/market/products/BTC-USD/ticker?limit=1'
//! ```
//!
//! `--per-connection-rate N` sets the in-process proxy's budget per connection (burst 2 N); with
//! one or two connections back to back, the default budget is what such a run measures.
//!
//! `--pin` (Linux, util-linux `taskset`) pins the proxy runtime's threads to CPU 0 and the load
//! generator's to CPU 1: the same split as two `taskset` processes, in one process.
//!
//! `--baseline` drives, instead of the proxy, a minimal hyper server on the proxy's runtime that
//! answers every request with the bytes the proxy answered once (same size, same headers): the
//! floor this machine puts under the same load, to compare with a proxy run right before or after
//! (ratios in one sitting, since the machines here are noisy).
//!
//! `--target ADDR` drives a proxy that runs in another process (e.g. `examples/proxy.rs --sim`
//! with `TICKSHARE_PROXY_TOKEN` set to the token below, or to `--token`), so that proxy and load
//! generator can be pinned to a core each with `taskset`:
//!
//! ```text
//! TICKSHARE_PROXY_TOKEN=load-test-token-0123456789 TOKIO_WORKER_THREADS=1 \
//!     taskset -c 0 target/release/examples/proxy --sim --listen 127.0.0.1:8787 --serve-secs 30 &
//! taskset -c 1 target/release/examples/proxy_load --target 127.0.0.1:8787 --rate 20000
//! ```
//!
//! The load generator runs in the same process as the proxy (and the simulated exchange behind
//! it), so on a small machine they share the cores: the numbers are a floor. By default the
//! proxy and the load generator each get a runtime of their own (one worker each), and the CPU
//! used by each runtime's threads is printed (from `/proc/self/task`), so a run shows whether
//! the load generator or the proxy was the bottleneck; `--shared-runtime` runs both on one
//! runtime of two workers, as the first measurements did. The client is a
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
/// When the measured run started, and when (ms after it) each request slower than
/// [`SLOW_US`] was sent, for `--show-slow`.
static SLOW_START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
static SLOW: std::sync::Mutex<Vec<u64>> = std::sync::Mutex::new(Vec::new());
const SLOW_US: u32 = 2_000;

/// Send requests back to back until `until`; latencies in microseconds.
async fn connection(
    addr: std::net::SocketAddr,
    token: std::sync::Arc<str>,
    until: Instant,
    pace: Option<Duration>,
) -> std::io::Result<Vec<u32>> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let req = format!(
        "GET /api/v3/brokerage/market/products/BTC-USD/ticker?limit=1 HTTP/1.1\r\nHost: {addr}\r\nX-Tickshare-Token: {token}\r\n\r\n"
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
        let l = u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX);
        if l > SLOW_US
            && let Some(start) = SLOW_START.get()
            && let Ok(mut slow) = SLOW.lock()
        {
            slow.push(u64::try_from(t0.saturating_duration_since(*start).as_millis()).unwrap_or(u64::MAX));
        }
        lat.push(l);
    }
    Ok(lat)
}

/// The body of one ticker answer from the proxy.
async fn fetch_once(addr: std::net::SocketAddr, token: &str) -> Result<Vec<u8>, Box<dyn Error>> {
    let mut s = TcpStream::connect(addr).await?;
    let req = format!(
        "GET /api/v3/brokerage/market/products/BTC-USD/ticker?limit=1 HTTP/1.1\r\nHost: {addr}\r\nX-Tickshare-Token: {token}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut all = Vec::new();
    s.read_to_end(&mut all).await?;
    let head_end = all.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no response head")?;
    Ok(all.split_off(head_end + 4))
}

/// A minimal hyper HTTP/1.1 server answering every request with `body`: the floor under the
/// load. `served` counts its answers.
async fn baseline_server(
    body: Vec<u8>,
    listen: std::net::SocketAddr,
    served: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Result<std::net::SocketAddr, Box<dyn Error>> {
    use hyper::{Response, body::Bytes, header, server::conn::http1, service::service_fn};
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let body = Bytes::from(body);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let body = body.clone();
            let served = served.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req| {
                    served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let mut resp = Response::new(http_body_util::Full::new(body.clone()));
                    resp.headers_mut()
                        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// A pseudo-random fraction in [0, 1) without another dependency.
fn fastrand_offset() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    (h.finish() % 10_000) as f64 / 10_000.0
}

/// CPU seconds (user + system) used so far by this process's threads, by thread name.
fn cpu_by_thread_name() -> std::collections::BTreeMap<String, f64> {
    // Clock ticks per second as Linux reports them in /proc (USER_HZ, 100 on every common build).
    const TICKS: f64 = 100.0;
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return out };
    for t in tasks.flatten() {
        let (Ok(comm), Ok(stat)) =
            (std::fs::read_to_string(t.path().join("comm")), std::fs::read_to_string(t.path().join("stat")))
        else {
            continue;
        };
        // Fields after the `(comm)`: state is field 3, utime 14 and stime 15.
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        *out.entry(comm.trim().to_string()).or_insert(0.0) += (ticks(11) + ticks(12)) / TICKS;
    }
    out
}

struct Args {
    conns: usize,
    secs: u64,
    rate: Option<f64>,
    /// One runtime for the proxy and the load generator (the first measurements' setup).
    shared: bool,
    proxy_threads: usize,
    load_threads: usize,
    /// A proxy in another process to drive, instead of one started here.
    target: Option<std::net::SocketAddr>,
    token: String,
    /// Drive a minimal hyper server with the proxy's answer instead of the proxy.
    baseline: bool,
    /// Pin the proxy runtime to CPU 0 and the load generator to CPU 1.
    pin: bool,
    /// The in-process proxy's per-connection budget (requests/s; burst twice that).
    per_connection: Option<u32>,
    /// Serve for `secs` without generating load (for an outside load generator).
    serve_only: bool,
    /// Where the server under test listens (`--serve-only`'s default 127.0.0.1:8787).
    listen: Option<std::net::SocketAddr>,
    /// Print when the requests over 2 ms were sent, by 100 ms window.
    show_slow: bool,
}

const USAGE: &str = "usage: proxy_load [--connections 1000] [--secs 10] [--rate N] [--proxy-threads 1]
                  [--load-threads 1] [--shared-runtime] [--target ADDR] [--token T] [--baseline]
                  [--pin] [--per-connection-rate N] [--serve-only [--listen ADDR]] [--show-slow]";

fn parse_args() -> Result<Args, Box<dyn Error>> {
    let mut a = Args {
        conns: 1000,
        secs: 10,
        rate: None,
        shared: false,
        proxy_threads: 1,
        load_threads: 1,
        target: None,
        token: TOKEN.to_string(),
        baseline: false,
        pin: false,
        per_connection: None,
        serve_only: false,
        listen: None,
        show_slow: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--connections" => a.conns = value()?.parse()?,
            "--secs" => a.secs = value()?.parse()?,
            // Total requests per second, spread evenly over the connections (open loop);
            // without it every connection sends back to back (closed loop, peak throughput).
            "--rate" => a.rate = Some(value()?.parse()?),
            "--shared-runtime" => a.shared = true,
            "--proxy-threads" => a.proxy_threads = value()?.parse::<usize>()?.max(1),
            "--load-threads" => a.load_threads = value()?.parse::<usize>()?.max(1),
            "--target" => a.target = Some(value()?.parse()?),
            "--token" => a.token = value()?,
            "--baseline" => a.baseline = true,
            "--pin" => a.pin = true,
            "--per-connection-rate" => a.per_connection = Some(value()?.parse()?),
            "--serve-only" => a.serve_only = true,
            "--listen" => a.listen = Some(value()?.parse()?),
            "--show-slow" => a.show_slow = true,
            other => return Err(format!("unknown argument {other}\n{USAGE}").into()),
        }
    }
    Ok(a)
}

fn runtime(name: &str, threads: usize, cpu: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(threads).thread_name(name).enable_all();
    if let Some(cpu) = cpu {
        b.on_thread_start(move || pin_current_thread(cpu));
    }
    b.build()
}

/// Pin the calling thread to one CPU with util-linux `taskset` (Linux; the crate forbids
/// `unsafe`, so no `sched_setaffinity` here).
fn pin_current_thread(cpu: usize) {
    // `/proc/thread-self` links to `<pid>/task/<tid>`.
    let tid = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().map(|t| t.to_string_lossy().into_owned()));
    let pinned = tid.is_some_and(|tid| {
        std::process::Command::new("taskset")
            .args(["-p", "-c", &cpu.to_string(), &tid])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !pinned {
        eprintln!("could not pin a thread to CPU {cpu} (needs Linux and taskset)");
    }
}

/// `--serve-only`: serve `addr` for `--secs` without load of our own, then print what was
/// served and the server's CPU time per request.
fn serve_only(
    a: &Args,
    addr: std::net::SocketAddr,
    rt: &tokio::runtime::Runtime,
    proxy: Option<&Proxy>,
    baseline_served: &std::sync::atomic::AtomicU64,
) -> Result<(), Box<dyn Error>> {
    let served = || match (a.baseline, proxy) {
        (false, Some(p)) => p.stats().requests_by_route.values().sum::<u64>(),
        _ => baseline_served.load(std::sync::atomic::Ordering::Relaxed),
    };
    let what = if a.baseline { "bare hyper server (BASELINE)" } else { "proxy" };
    println!("{what} on http://{addr} for {} s; local token {}", a.secs, a.token);
    let (cpu_before, served_before) = (cpu_by_thread_name(), served());
    rt.block_on(async { tokio::time::sleep(Duration::from_secs(a.secs)).await });
    let n = served() - served_before;
    let cpu: f64 = cpu_by_thread_name()
        .iter()
        .map(|(name, after)| after - cpu_before.get(name).copied().unwrap_or(0.0))
        .sum();
    println!("served             {n} requests");
    println!("server cpu         {cpu:.2} s ({:.1} µs per request)", cpu / n.max(1) as f64 * 1e6);
    Ok(())
}

fn main() -> Result<(), Box<dyn Error>> {
    let a = parse_args()?;
    // The proxy (and the simulated exchange behind it) on one runtime, the load generator on
    // another, each with its own worker threads, so that the CPU each uses can be told apart;
    // `--shared-runtime` puts both on one runtime of two workers.
    let (proxy_cpu, load_cpu) = if a.pin { (Some(0), Some(1)) } else { (None, None) };
    let (proxy_rt, load_rt) = if a.shared {
        (runtime("shared-rt", 2, None)?, None)
    } else {
        (
            runtime("proxy-rt", a.proxy_threads, proxy_cpu)?,
            Some(runtime("load-gen", a.load_threads, load_cpu)?),
        )
    };
    let exchange_rt = runtime("exchange", 1, None)?;
    // Under `--serve-only` the server under test listens where an outside load generator can
    // find it; the proxy itself only when it is that server (not under `--baseline`).
    let listen =
        a.listen.unwrap_or(if a.serve_only { "127.0.0.1:8787".parse()? } else { "127.0.0.1:0".parse()? });
    let proxy_listen = if a.baseline { "127.0.0.1:0".parse()? } else { listen };
    // The proxy under test: one started here in front of a simulated exchange, or `--target`.
    let local = match a.target {
        Some(_) => None,
        None => Some({
            // The exchange is another machine: its work (building the answers to the proxy's
            // refreshes) runs on a runtime of its own, not on the proxy's workers, nor in the
            // proxy's CPU figures.
            let sim = exchange_rt.block_on(SimExchange::builder().start())?;
            proxy_rt.block_on(async {
                let mut builder = Proxy::builder(Credentials::generate("organizations/load/apiKeys/proxy"))
                    .upstream(sim.base_url())
                    .listen(proxy_listen)
                    .local_token(a.token.clone());
                if let Some(r) = a.per_connection {
                    builder = builder.per_connection_rate(r, r.saturating_mul(2));
                }
                let proxy = builder.start().await?;
                Ok::<_, Box<dyn Error>>((sim, proxy))
            })?
        }),
    };
    let addr = match (&local, a.target) {
        (Some((_, proxy)), _) => proxy.addr(),
        (None, Some(t)) => t,
        (None, None) => return Err("no proxy to drive".into()),
    };
    let token: std::sync::Arc<str> = a.token.as_str().into();
    let baseline_served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let addr = if a.baseline {
        let body = proxy_rt.block_on(fetch_once(addr, &token))?;
        proxy_rt.block_on(baseline_server(body, listen, baseline_served.clone()))?
    } else {
        addr
    };
    if a.serve_only {
        return serve_only(&a, addr, &proxy_rt, local.as_ref().map(|(_, p)| p), &baseline_served);
    }
    let load = load_rt.as_ref().unwrap_or(&proxy_rt);
    let (conns, secs, show_slow) = (a.conns, a.secs, a.show_slow);
    let pace = a.rate.map(|r| Duration::from_secs_f64(conns as f64 / r));
    let cpu_before = cpu_by_thread_name();
    let (lat, failed, took) = load.block_on(async move {
        // Warm the cache, then measure.
        connection(addr, token.clone(), Instant::now() + Duration::from_millis(5), None).await?;
        let until = Instant::now() + Duration::from_secs(secs);
        let started = Instant::now();
        if show_slow {
            let _ = SLOW_START.set(started);
        }
        let tasks: Vec<_> =
            (0..conns).map(|_| tokio::spawn(connection(addr, token.clone(), until, pace))).collect();
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
        Ok::<_, Box<dyn Error>>((lat, failed, started.elapsed().as_secs_f64()))
    })?;
    let cpu_after = cpu_by_thread_name();
    if a.show_slow
        && let Ok(slow) = SLOW.lock()
    {
        // Requests over 2 ms by when they were sent: a tail that comes in bursts common to the
        // proxy and the bare server is the machine's; one at every ticker TTL is the proxy's.
        let mut bins = std::collections::BTreeMap::new();
        for ms in slow.iter() {
            *bins.entry(ms / 100).or_insert(0u32) += 1;
        }
        let shown: Vec<String> = bins
            .iter()
            .filter(|(_, n)| **n >= 10)
            .map(|(b, n)| format!("{:.1}s:{n}", *b as f64 / 10.0))
            .collect();
        println!("over 2 ms          {} requests; by 100 ms window (>= 10): {}", slow.len(), shown.join(" "));
    }
    let mut lat = lat;
    lat.sort_unstable();
    let pct = |p: f64| lat.get(((lat.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(0) as f64 / 1000.0;
    let pinned = if a.pin { ", pinned to CPU 0 and 1" } else { "" };
    let setup = if a.baseline {
        format!(
            "BASELINE: minimal hyper server with the proxy's answer, runtime {} worker(s), load generator {} worker(s){pinned}",
            a.proxy_threads, a.load_threads
        )
    } else if let Some(t) = a.target {
        format!("proxy at {t} in another process, load generator runtime {} worker(s)", a.load_threads)
    } else if a.shared {
        "one runtime, 2 workers, for proxy and load generator".to_string()
    } else {
        format!(
            "proxy runtime {} worker(s), load generator runtime {} worker(s){pinned}",
            a.proxy_threads, a.load_threads
        )
    };
    println!("setup              {setup}");
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
    let used: Vec<String> = cpu_after
        .iter()
        .map(|(name, after)| (name, after - cpu_before.get(name).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .map(|(name, d)| {
            // CPU time per request: the figure to compare with a `--baseline` run.
            let per = d / lat.len().max(1) as f64 * 1e6;
            format!("{name} {:.0} % of a core ({per:.1} µs per request)", d / took * 100.0)
        })
        .collect();
    println!("cpu by thread      {}", used.join(", "));
    if let (Some((sim, proxy)), false) = (local, a.baseline) {
        let s = proxy.stats();
        println!(
            "upstream calls     {} (cache hit rate {:.5}); exchange saw {} requests, {} x 429",
            s.coordinated.upstream_calls,
            s.coordinated.hit_rate,
            sim.stats().total_calls,
            sim.stats().rate_limited_429
        );
        proxy_rt.block_on(proxy.shutdown());
    }
    Ok(())
}
