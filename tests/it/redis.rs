//! `SharedTier` against a real `redis-server` (started by each test on a free loopback port)
//! and the simulated exchange: K independent sources act as one client, the limit holds while
//! Redis dies and comes back, leases expire when their holder dies, and a 429 pauses every
//! process.
//!
//! Redis runs in real time, so these tests do too (on a multi-threaded runtime, with the sim on
//! it); their bounds are generous. Without `redis-server` on PATH they are skipped with a
//! message, except under `CI=true`, where they fail: `.ci/run` installs it.

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use tickshare::{
    BatchEvaluator, Bot, CoordinatedSource, Error, Granularity, MarketDataSource, MovingAverageCrossover,
    ProductId, SharedTier, SharedTierBuilder, Strategy, TierMode,
    sim::{Endpoint, Fault, SimExchange, SimStats},
};
use tokio::time::Instant;

use crate::support::fixed_clock;

const KEY_ID: &str = "organizations/sim/apiKeys/sim";

/// A `redis-server` child on a fixed loopback port, without persistence; killed on drop.
struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Start one, or `None` when `redis-server` is not installed (a failure under `CI=true`).
    async fn start() -> Option<Self> {
        if Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_err() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "redis-server is not installed; .ci/run installs it (apt-get install redis-server)"
            );
            eprintln!("skipping: redis-server is not installed (apt-get install redis-server)");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut server = RedisServer { port, child: None };
        server.restart().await;
        Some(server)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// (Re)start the server on the same port and wait until it answers.
    async fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let client = ::redis::Client::open(self.url()).unwrap();
        for _ in 0..200 {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && ::redis::cmd("PING").query_async::<String>(&mut c).await.is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server did not come up on port {}", self.port);
    }

    /// Kill the server (SIGKILL: no goodbye to clients) and wait for it to be gone.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn conn(&self) -> ::redis::aio::MultiplexedConnection {
        ::redis::Client::open(self.url()).unwrap().get_multiplexed_async_connection().await.unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn pid(s: &str) -> ProductId {
    s.parse().unwrap()
}

/// A tier over a fresh client of `sim` (no limiter of its own), on the sim's clock.
fn tier(sim: &SimExchange, url: &str, namespace: &str) -> SharedTierBuilder {
    let client = sim.client_builder().unlimited().build().unwrap();
    SharedTier::coinbase(url, KEY_ID, client)
        .namespace(namespace)
        .clock(sim.clock())
        .lease_poll(Duration::from_millis(5))
}

fn bots(products: &[ProductId]) -> Vec<Bot> {
    let strategy: Arc<dyn Strategy> = Arc::new(MovingAverageCrossover::default());
    products
        .iter()
        .enumerate()
        .map(|(i, p)| Bot::new(format!("bot-{i:02}"), p.clone(), Arc::clone(&strategy)).lookback(24))
        .collect()
}

/// `workers` independent stacks (client, tier, L1 coordinated source, evaluator) run the same
/// 25 bots for two ticks, all at once; returns the sim's counters.
async fn run_workers(sim: &SimExchange, url: &str, namespace: &str, workers: usize) -> SimStats {
    let products = sim.products();
    let bots = bots(&products);
    let mut stacks = Vec::new();
    for _ in 0..workers {
        let t = tier(sim, url, namespace)
            .ticker_ttl(Duration::from_millis(500))
            .accounts_ttl(Duration::from_millis(500))
            .build()
            .await
            .unwrap();
        assert_eq!(t.mode(), TierMode::Shared);
        let l1 = CoordinatedSource::builder(t.clone())
            .clock(sim.clock())
            .ticker_ttl(Duration::from_millis(500))
            .accounts_ttl(Duration::from_millis(500))
            // Wide enough that a busy debug build still gathers a tick's 25 tickers in one batch.
            .batch_window(Duration::from_millis(50))
            .build()
            .unwrap();
        let eval = BatchEvaluator::new(Arc::new(l1)).clock(sim.clock());
        stacks.push((t, eval));
    }
    sim.reset_stats();
    for tick in 0..2 {
        if tick > 0 {
            // Every worker has finished the tick before: a second later, the tickers and
            // accounts have expired in every L1 and in Redis, the hourly candles have not.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let ticks = stacks.iter().map(|(_, eval)| eval.evaluate_all(&bots));
        for report in futures_util::future::join_all(ticks).await {
            assert_eq!(report.errors().count(), 0, "{:?}", report.errors().next());
        }
    }
    let stats = sim.stats();
    let from_tiers: u64 = stacks.iter().map(|(t, _)| t.stats().upstream_calls).sum();
    assert_eq!(from_tiers, stats.total_calls, "every request the sim saw went through a tier");
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_independent_sources_cost_what_one_does() {
    let Some(redis) = RedisServer::start().await else { return };
    let sim = SimExchange::builder()
        .products(25)
        .clock(fixed_clock())
        .latency(Duration::from_millis(5))
        .start()
        .await
        .unwrap();

    let one = run_workers(&sim, &redis.url(), "one", 1).await;
    // Tick 1: one best_bid_ask, 25 candle series, accounts. Tick 2 (tickers and accounts
    // expired everywhere, candles not): best_bid_ask and accounts again.
    assert_eq!(one.total_calls, 27 + 2, "{:?}", one.calls_by_endpoint);

    let four = run_workers(&sim, &redis.url(), "four", 4).await;
    assert_eq!(four.total_calls, one.total_calls, "{:?}", four.calls_by_endpoint);
    assert_eq!(four.calls_by_endpoint, one.calls_by_endpoint);
    for s in [&one, &four] {
        assert_eq!(s.rate_limited_429, 0);
        assert!(s.max_requests_in_any_1s.private <= 30, "{:?}", s.max_requests_in_any_1s);
    }
}

/// `workers` tiers, each with `lanes` concurrent loops asking for candle windows nobody asked
/// for before (distinct per tier, so nothing is shared): demand far above the limit.
fn hammer(
    tiers: &[SharedTier],
    lanes: usize,
    until: Instant,
) -> impl std::future::Future<Output = Vec<u64>> + '_ {
    let btc = pid("BTC-USD");
    let runs = tiers.iter().enumerate().map(move |(w, t)| {
        let btc = btc.clone();
        async move {
            let lanes = (0..lanes).map(|lane| {
                let (t, btc) = (t.clone(), btc.clone());
                async move {
                    let mut ok = 0u64;
                    let mut k = 0i64;
                    while Instant::now() < until {
                        // Minute windows far in the past, unique per (tier, lane, k).
                        let back = ((w * 1000 + lane * 100) as i64 + k) * 5 + 60 * 24 * 60;
                        k += 1;
                        let now = fixed_clock().now_utc();
                        let range = tickshare::CandleRange::new(
                            now - time::Duration::minutes(back + 5),
                            now - time::Duration::minutes(back),
                        )
                        .unwrap();
                        match t.candles(&btc, Granularity::OneMinute, range).await {
                            Ok(_) => ok += 1,
                            Err(Error::RateLimited { local: true, .. }) => {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            Err(e) => panic!("tier {w}: {e}"),
                        }
                    }
                    ok
                }
            });
            futures_util::future::join_all(lanes).await.into_iter().sum::<u64>()
        }
    });
    futures_util::future::join_all(runs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_holds_the_limit_and_recovers() {
    let Some(mut redis) = RedisServer::start().await else { return };
    let sim =
        SimExchange::builder().clock(fixed_clock()).latency(Duration::from_millis(5)).start().await.unwrap();
    let mut tiers = Vec::new();
    for _ in 0..4 {
        let t = tier(&sim, &redis.url(), "outage")
            .expected_workers(4)
            .redis_timeout(Duration::from_millis(200))
            .reconnect_interval(Duration::from_millis(200))
            .build()
            .await
            .unwrap();
        tiers.push(t);
    }
    sim.reset_stats();

    // Shared: the four together stay within the one budget.
    let shared = hammer(&tiers, 6, Instant::now() + Duration::from_millis(1500)).await;
    let mut total_calls = check_phase(&sim, "shared");
    assert!(shared.iter().sum::<u64>() >= 25, "{shared:?}");
    assert!(tiers.iter().all(|t| t.mode() == TierMode::Shared));

    // Redis dies mid-run: every tier falls back to its share; nothing panics, no 429.
    let load = tokio::spawn({
        let tiers = tiers.clone();
        async move { hammer(&tiers, 6, Instant::now() + Duration::from_millis(2500)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill();
    let degraded = load.await.unwrap();
    total_calls += check_phase(&sim, "redis killed");
    assert!(tiers.iter().all(|t| t.mode() == TierMode::Degraded), "{:?}", tiers[0].stats());
    assert!(degraded.iter().all(|n| *n > 0), "every tier kept working: {degraded:?}");
    for t in &tiers {
        let st = t.stats();
        assert_eq!(st.outages, 1, "{st:?}");
        assert!(st.degraded_calls > 0 && st.fallback_limiter.private.acquired > 0, "{st:?}");
    }

    // Redis comes back (empty): the tiers reconnect by themselves, hand over, share again.
    redis.restart().await;
    let after = hammer(&tiers, 6, Instant::now() + Duration::from_millis(2500)).await;
    total_calls += check_phase(&sim, "redis restarted");
    assert!(after.iter().all(|n| *n > 0), "{after:?}");
    for t in &tiers {
        let st = t.stats();
        assert_eq!((st.mode, st.recoveries), (TierMode::Shared, 1), "{st:?}");
    }
    let from_tiers: u64 = tiers.iter().map(|t| t.stats().upstream_calls).sum();
    assert_eq!(from_tiers, total_calls);
}

/// Check one phase of the outage test (no 429, never more than the limit in a second), print
/// it, start the next; returns the phase's calls.
fn check_phase(sim: &SimExchange, name: &str) -> u64 {
    let s = sim.stats();
    eprintln!(
        "{name}: {} calls, {} answered 429, at most {} private requests in any second",
        s.total_calls, s.rate_limited_429, s.max_requests_in_any_1s.private
    );
    assert_eq!(s.rate_limited_429, 0, "{name}: {:?}", s.responses_by_status);
    assert!(s.max_requests_in_any_1s.private <= 30, "{name}: {:?}", s.max_requests_in_any_1s);
    sim.reset_stats();
    s.total_calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holders_lease_expires_and_is_taken_over() {
    let Some(redis) = RedisServer::start().await else { return };
    let sim = SimExchange::builder().clock(fixed_clock()).start().await.unwrap();
    let t = tier(&sim, &redis.url(), "lease").lease_ttl(Duration::from_millis(800)).build().await.unwrap();
    let btc = pid("BTC-USD");
    // A process leased BTC-USD and died: its lease lives on for its TTL, and nobody extends it.
    let lease = format!("{}t:BTC-USD:lease", t.key_prefix());
    let mut conn = redis.conn().await;
    let _: () = ::redis::cmd("SET")
        .arg(&lease)
        .arg("dead-process")
        .arg("PX")
        .arg(800)
        .query_async(&mut conn)
        .await
        .unwrap();

    let start = Instant::now();
    let ticker = t.ticker(&btc).await.unwrap();
    let waited = start.elapsed();
    assert_eq!(ticker.product, btc);
    assert!(waited >= Duration::from_millis(500), "took over before the lease expired: {waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    let s = t.stats();
    assert_eq!((s.lease_waits, s.lease_takeovers, s.upstream_calls), (1, 1, 1), "{s:?}");
    assert_eq!(sim.stats().total_calls, 1);
    // The value is shared now: a second tier gets it from Redis.
    let other = tier(&sim, &redis.url(), "lease").build().await.unwrap();
    assert_eq!(other.ticker(&btc).await.unwrap(), ticker);
    assert_eq!((other.stats().l2_hits, other.stats().upstream_calls), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_live_holder_keeps_its_lease() {
    let Some(redis) = RedisServer::start().await else { return };
    // Each request takes 2 s, well past the lease TTL: only the heartbeat keeps the lease.
    let sim =
        SimExchange::builder().clock(fixed_clock()).latency(Duration::from_secs(2)).start().await.unwrap();
    let a = tier(&sim, &redis.url(), "slow").lease_ttl(Duration::from_millis(900)).build().await.unwrap();
    let b = tier(&sim, &redis.url(), "slow").lease_ttl(Duration::from_millis(900)).build().await.unwrap();
    let products: Vec<ProductId> = sim.products().into_iter().take(5).collect();
    let (ra, rb) = tokio::join!(a.tickers(&products), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        b.tickers(&products).await
    });
    let (mut ra, mut rb) = (ra.unwrap(), rb.unwrap());
    ra.sort_by(|x, y| x.product.cmp(&y.product));
    rb.sort_by(|x, y| x.product.cmp(&y.product));
    assert_eq!(ra, rb);
    assert_eq!(ra.len(), 5);
    assert_eq!(sim.stats().total_calls, 1, "one best_bid_ask for both processes");
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!((sa.leases_acquired, sa.upstream_calls), (5, 1), "{sa:?}");
    assert_eq!(
        (sb.lease_waits, sb.lease_waits_served, sb.lease_takeovers, sb.upstream_calls),
        (5, 5, 0, 0),
        "{sb:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_in_one_process_pauses_all() {
    let Some(redis) = RedisServer::start().await else { return };
    let sim = SimExchange::builder().clock(fixed_clock()).retry_after(true).start().await.unwrap();
    let a = tier(&sim, &redis.url(), "pause").build().await.unwrap();
    let b = tier(&sim, &redis.url(), "pause").build().await.unwrap();
    sim.add_fault(Fault::status(429).on(Endpoint::Accounts).times(1));
    let err = a.accounts().await.unwrap_err();
    assert!(matches!(err, Error::RateLimited { local: false, .. }), "{err}");
    assert_eq!(a.stats().shared_limiter.pauses_set, 1);
    // B has seen no 429, yet waits out the pause A set before sending anything.
    let start = Instant::now();
    let tickers = b.tickers(&[pid("BTC-USD")]).await.unwrap();
    let waited = start.elapsed();
    assert_eq!(tickers.len(), 1);
    assert!(waited >= Duration::from_millis(500), "{waited:?}");
    let sb = b.stats();
    assert_eq!((sb.shared_limiter.waits, sb.rate_limited_429), (1, 0), "{sb:?}");
    assert_eq!(sim.stats().rate_limited_429, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_products_and_errors_are_shared_briefly() {
    let Some(redis) = RedisServer::start().await else { return };
    let sim = SimExchange::builder().clock(fixed_clock()).start().await.unwrap();
    let a = tier(&sim, &redis.url(), "neg").build().await.unwrap();
    let b = tier(&sim, &redis.url(), "neg").build().await.unwrap();
    let nope = pid("NOPE-USD");
    assert!(matches!(a.ticker(&nope).await, Err(Error::NotFound(_))));
    assert!(matches!(b.ticker(&nope).await, Err(Error::NotFound(_))));
    assert_eq!(b.tickers(&[nope.clone(), pid("BTC-USD")]).await.unwrap().len(), 1);
    assert_eq!(sim.stats().total_calls, 2, "the unknown product was asked for once");

    // A 503 is handed to the process that waited for the same key (or came just after), not
    // retried by it.
    sim.add_fault(Fault::status(503).on(Endpoint::Accounts).times(1));
    let (ra, rb) = tokio::join!(a.accounts(), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        b.accounts().await
    });
    assert!(matches!(ra, Err(Error::Upstream { status: 503, .. })), "{ra:?}");
    assert!(matches!(rb, Err(Error::Upstream { status: 503, .. })), "{rb:?}");
    assert_eq!(sim.stats().calls(Endpoint::Accounts), 1);
    // After error_ttl the next call goes upstream again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!b.accounts().await.unwrap().is_empty());
    assert_eq!(sim.stats().calls(Endpoint::Accounts), 2);
}

/// An upstream whose accounts are a USD balance read when a call starts (what the exchange
/// had then); the first call then takes `first_delay`.
struct SlowAccounts {
    usd: std::sync::atomic::AtomicI64,
    calls: std::sync::atomic::AtomicUsize,
    first_delay: Duration,
}

#[async_trait::async_trait]
impl MarketDataSource for SlowAccounts {
    async fn ticker(&self, p: &ProductId) -> tickshare::Result<tickshare::Ticker> {
        Err(Error::NotFound(p.to_string()))
    }
    async fn tickers(&self, _: &[ProductId]) -> tickshare::Result<Vec<tickshare::Ticker>> {
        Ok(Vec::new())
    }
    async fn candles(
        &self,
        _: &ProductId,
        _: Granularity,
        _: tickshare::CandleRange,
    ) -> tickshare::Result<Vec<tickshare::Candle>> {
        Ok(Vec::new())
    }
    async fn accounts(&self) -> tickshare::Result<Vec<tickshare::Account>> {
        use std::sync::atomic::Ordering::SeqCst;
        let usd = self.usd.load(SeqCst);
        if self.calls.fetch_add(1, SeqCst) == 0 {
            tokio::time::sleep(self.first_delay).await;
        }
        Ok(vec![tickshare::Account {
            uuid: "u".into(),
            name: "USD Wallet".into(),
            currency: "USD".into(),
            available: usd.into(),
            hold: 0.into(),
            active: true,
            account_type: "ACCOUNT_TYPE_FIAT".into(),
        }])
    }
}

/// An order lands while one process's accounts fetch is in flight: after another process
/// invalidates the tier, that fetch (begun before the order) answers its own caller but is
/// not stored, so every later read, in any process, sees the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accounts_fetch_in_flight_during_an_invalidation_is_not_stored() {
    use std::sync::atomic::Ordering::SeqCst;
    let Some(redis) = RedisServer::start().await else { return };
    let upstream =
        Arc::new(SlowAccounts { usd: 1000.into(), calls: 0.into(), first_delay: Duration::from_millis(400) });
    let url = redis.url();
    let tier = || {
        SharedTier::builder_arc(&url, KEY_ID, upstream.clone() as Arc<dyn MarketDataSource>)
            .namespace("inflight")
            .lease_poll(Duration::from_millis(5))
            .build()
    };
    let (a, b) = (tier().await.unwrap(), tier().await.unwrap());
    let early = tokio::spawn({
        let a = a.clone();
        async move { a.accounts().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(upstream.calls.load(SeqCst), 1, "a's fetch is in flight");
    // The order fills on the exchange; the process that placed it invalidates the tier.
    upstream.usd.store(900, SeqCst);
    b.invalidate_accounts().await.unwrap();
    let usd = |a: &[tickshare::Account]| a[0].available;
    assert_eq!(usd(&b.accounts().await.unwrap()), 900.into(), "b fetched after the order");
    assert_eq!(usd(&early.await.unwrap().unwrap()), 1000.into(), "a's own, older read");
    // What Redis holds now is b's answer, not a's late one: a third process reads 900.
    let c = tier().await.unwrap();
    assert_eq!(usd(&c.accounts().await.unwrap()), 900.into());
    assert_eq!(upstream.calls.load(SeqCst), 2);
}

/// Invalidations reach every tier that follows them, also after Redis was restarted (the
/// follower resubscribes and counts that as an invalidation: what was published meanwhile is
/// lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_invalidations_reach_other_processes_and_survive_a_redis_restart() {
    let Some(mut redis) = RedisServer::start().await else { return };
    let sim = SimExchange::builder().clock(fixed_clock()).start().await.unwrap();
    let build = || {
        tier(&sim, &redis.url(), "follow")
            .redis_timeout(Duration::from_millis(200))
            .reconnect_interval(Duration::from_millis(100))
            .build()
    };
    let (a, b) = (build().await.unwrap(), build().await.unwrap());
    let mut heard = a.accounts_invalidations();
    // Until b's invalidation is heard: a's subscription is set up in the background (what is
    // published before it is in place is not heard; its own bump may come before or after
    // this receiver was made).
    let hear = |heard: &mut tokio::sync::watch::Receiver<u64>| {
        let mut heard = heard.clone();
        let b = b.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                // b's connection manager may need a moment after a restart too.
                if b.invalidate_accounts().await.is_ok()
                    && tokio::time::timeout(Duration::from_millis(300), heard.changed()).await.is_ok()
                {
                    return *heard.borrow_and_update();
                }
                assert!(std::time::Instant::now() < deadline, "a never heard b's invalidation");
            }
        }
    };
    let first = hear(&mut heard).await;
    assert!(first > 0);
    let _ = heard.borrow_and_update();
    // Now subscribed: one invalidation, one change.
    b.invalidate_accounts().await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), heard.changed()).await.expect("a heard b").unwrap();
    assert!(*heard.borrow_and_update() > first);

    redis.kill();
    assert!(b.invalidate_accounts().await.is_err(), "nothing to publish to");
    redis.restart().await;
    // The resubscription counts as one (what was published meanwhile is lost); then b's
    // invalidations arrive as before.
    tokio::time::timeout(Duration::from_secs(5), heard.changed()).await.expect("resubscribed").unwrap();
    let after_restart = *heard.borrow_and_update();
    assert!(hear(&mut heard).await > after_restart);
}

mod proxies {
    //! Issue 17 point 5: several proxies on one key share the Redis tier.

    use std::time::Duration;

    use tickshare::{
        CandleRange, CoinbaseClient, CoordinatedConfig, Credentials, Granularity, MarketDataSource,
        SharedTierConfig,
        proxy::Proxy,
        sim::{SimExchange, SimStats},
    };

    use super::RedisServer;
    use crate::support::fixed_clock;

    const CLIENTS: usize = 20;
    const PRODUCTS: usize = 10;
    const TICKS: usize = 3;

    async fn sim(creds: &Credentials) -> SimExchange {
        SimExchange::builder()
            .products(PRODUCTS)
            .clock(fixed_clock())
            .latency(Duration::from_millis(5))
            .jwt_public_key_pem(&creds.public_key_pem())
            .start()
            .await
            .unwrap()
    }

    /// Short freshness, so that every tick (a second apart) reads tickers and accounts anew;
    /// a batch window wide enough for a busy debug build to gather a tick's tickers.
    fn coordinated() -> CoordinatedConfig {
        CoordinatedConfig {
            ticker_ttl: Duration::from_millis(500),
            accounts_ttl: Duration::from_millis(500),
            batch_window: Duration::from_millis(50),
            ..CoordinatedConfig::default()
        }
    }

    async fn proxy(creds: &Credentials, sim: &SimExchange, tier: Option<(&str, &str)>) -> Proxy {
        let mut b = Proxy::builder(creds.clone())
            .upstream(sim.base_url())
            .listen("127.0.0.1:0".parse().unwrap())
            .clock(sim.clock())
            .coordinated(coordinated());
        if let Some((url, namespace)) = tier {
            let cfg = SharedTierConfig {
                namespace: namespace.to_string(),
                ticker_ttl: Duration::from_millis(500),
                accounts_ttl: Duration::from_millis(500),
                lease_poll: Duration::from_millis(5),
                ..SharedTierConfig::default()
            };
            b = b.shared_tier(url, cfg);
        }
        b.start().await.unwrap()
    }

    /// `CLIENTS` legacy clients (own limiter each), split evenly over `proxies`, all at once for
    /// `TICKS` ticks a second apart: ticker, candles of the last hour, accounts. Every answer
    /// is checked against the exchange. Returns the exchange's counters and the clients' 429s.
    async fn drive(proxies: &[&Proxy], sim: &SimExchange, creds: &Credentials) -> (SimStats, u64) {
        let clients: Vec<CoinbaseClient> = (0..CLIENTS)
            .map(|i| {
                CoinbaseClient::builder()
                    // The first half on the first proxy, and so on: each proxy's clients cover
                    // every product.
                    .base_url(proxies[i * proxies.len() / CLIENTS].base_url())
                    .credentials(creds.clone())
                    .clock(sim.clock())
                    .build()
                    .unwrap()
            })
            .collect();
        let products = sim.products();
        sim.reset_stats();
        for tick in 0..TICKS {
            if tick > 0 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let reads = clients.iter().enumerate().map(|(i, c)| {
                let p = &products[i % PRODUCTS];
                async move {
                    let now = sim.clock().now_utc();
                    let t = c.ticker(p).await.unwrap();
                    // Real time: the trade's time on the wire is rounded, so the price is the
                    // exchange's at about that time (within 0.1 %).
                    let want = sim.price_at(p, t.time).unwrap();
                    assert!(
                        (t.price - want).abs() * tickshare::Decimal::from(1000) <= want,
                        "{p}: {} vs {want}",
                        t.price
                    );
                    let range = CandleRange::new(now - time::Duration::hours(1), now).unwrap();
                    let g = Granularity::OneMinute;
                    for k in c.candles(p, g, range).await.unwrap() {
                        if g.is_closed(k.start, now) {
                            assert_eq!(Some(k), sim.candle_at(p, g, k.start), "{p} {}", k.start);
                        }
                    }
                    assert!(!c.accounts().await.unwrap().is_empty());
                }
            });
            futures_util::future::join_all(reads).await;
        }
        (sim.stats(), clients.iter().map(|c| c.stats().rate_limited_429).sum())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_proxies_on_one_key_share_the_redis_tier() {
        let Some(redis) = RedisServer::start().await else { return };
        let creds = Credentials::generate("organizations/t/apiKeys/two-proxies");
        // The reference: one proxy for all the clients, on a simulator of its own.
        let reference_sim = sim(&creds).await;
        let one = proxy(&creds, &reference_sim, None).await;
        let (one_proxy, _) = drive(&[&one], &reference_sim, &creds).await;

        // Two proxies on one key and one Redis, in front of one simulator, half the clients each.
        let shared_sim = sim(&creds).await;
        let url = redis.url();
        let a = proxy(&creds, &shared_sim, Some((&url, "two-proxies"))).await;
        let b = proxy(&creds, &shared_sim, Some((&url, "two-proxies"))).await;
        let (two_proxies, client_429) = drive(&[&a, &b], &shared_sim, &creds).await;
        // The same two proxies without the tier: each makes the reference's calls for its half
        // of the clients, which cover every product.
        let unshared_sim = sim(&creds).await;
        let (c, d) = (proxy(&creds, &unshared_sim, None).await, proxy(&creds, &unshared_sim, None).await);
        let (unshared, _) = drive(&[&c, &d], &unshared_sim, &creds).await;

        let by = |s: &SimStats| -> Vec<(String, u64)> {
            s.calls_by_endpoint.iter().filter(|(_, n)| **n > 0).map(|(e, n)| (e.to_string(), *n)).collect()
        };
        eprintln!(
            "one proxy: {} {:?}\ntwo sharing the tier: {} {:?}\ntwo without: {} {:?}",
            one_proxy.total_calls,
            by(&one_proxy),
            two_proxies.total_calls,
            by(&two_proxies),
            unshared.total_calls,
            by(&unshared)
        );
        assert_eq!(two_proxies.rate_limited_429, 0);
        assert_eq!(client_429, 0);
        assert_eq!(two_proxies.auth_failures, 0);
        // About one proxy's worth: a tick's tickers may split into two batches across the batch
        // window in either proxy, so one batch per tick of slack. A batch is two calls (the
        // proxy's `TickerBatch::LastTradeAndBook`: `products` and `best_bid_ask`); one call per
        // tick, the slack before that default, failed a CI run at +4 over three ticks.
        let batches = |s: &SimStats| s.calls(tickshare::sim::Endpoint::BestBidAsk);
        assert!(
            batches(&two_proxies) <= batches(&one_proxy) + TICKS as u64,
            "{} ticker batches > {} + {TICKS}",
            batches(&two_proxies),
            batches(&one_proxy)
        );
        assert!(
            two_proxies.total_calls <= one_proxy.total_calls + 2 * TICKS as u64,
            "{} > {} + 2 x {TICKS}",
            two_proxies.total_calls,
            one_proxy.total_calls
        );
        assert!(
            two_proxies.total_calls * 3 <= unshared.total_calls * 2,
            "sharing saved less than a third: {} vs {} without the tier",
            two_proxies.total_calls,
            unshared.total_calls
        );
        // Both proxies served clients.
        for p in [&a, &b] {
            assert_eq!(p.stats().requests_by_route["ticker"], (CLIENTS / 2 * TICKS) as u64);
        }
    }

    /// An order through a proxy on the shared tier: the tier's accounts are forgotten too, so
    /// the next balance read through that proxy is fetched after the order (without it, the
    /// local miss found the pre-order balances in Redis for the tier's `accounts_ttl`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_order_through_a_proxy_on_the_tier_invalidates_the_shared_accounts() {
        let Some(redis) = RedisServer::start().await else { return };
        let creds = Credentials::generate("organizations/t/apiKeys/order-tier");
        let sim = sim(&creds).await;
        let url = redis.url();
        let tiered = |creds: &Credentials| {
            Proxy::builder(creds.clone())
                .upstream(sim.base_url())
                .listen("127.0.0.1:0".parse().unwrap())
                .clock(sim.clock())
                .shared_tier(
                    &url,
                    SharedTierConfig { namespace: "order-tier".into(), ..SharedTierConfig::default() },
                )
                .start()
        };
        let (a, b) = (tiered(&creds).await.unwrap(), tiered(&creds).await.unwrap());
        let client = |p: &Proxy| {
            CoinbaseClient::builder().base_url(p.base_url()).credentials(creds.clone()).build().unwrap()
        };
        let (ca, cb) = (client(&a), client(&b));
        let usd = |a: &[tickshare::Account]| a.iter().find(|a| a.currency == "USD").unwrap().available;
        let before = usd(&ca.accounts().await.unwrap());
        assert_eq!(usd(&cb.accounts().await.unwrap()), before, "b reads a's answer from the tier");
        assert_eq!(sim.stats().calls_by_endpoint["accounts"], 1);

        let path = "/api/v3/brokerage/orders";
        let order = serde_json::json!({"client_order_id": "t1", "product_id": "BTC-USD", "side": "BUY",
            "order_configuration": {"market_market_ioc": {"quote_size": "100"}}});
        let r = reqwest::Client::new()
            .post(format!("{}{path}", a.base_url()))
            .bearer_auth(creds.rest_jwt("POST", &a.addr().to_string(), path))
            .json(&order)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(a.stats().accounts_invalidations, 1);

        let after = usd(&ca.accounts().await.unwrap());
        assert!(after < before, "fresh after the order: {before} -> {after}");
        assert_eq!(sim.stats().calls_by_endpoint["accounts"], 2);

        // The other proxy heard of the order over pub/sub and forgot its in-process accounts
        // (10 s fresh otherwise): within a moment it serves the new balance, from the tier.
        let waited = std::time::Instant::now();
        while usd(&cb.accounts().await.unwrap()) != after {
            assert!(waited.elapsed() < Duration::from_secs(2), "b still serves the pre-order balance");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(sim.stats().calls_by_endpoint["accounts"], 2, "b read a's fresh answer from Redis");
        assert_eq!(sim.stats().rate_limited_429, 0);
    }
}
