//! Property tests (#7), each on a fresh paused tokio runtime per case: the rate limiter never
//! admits more than the quota in any one-second window, the coordinated cache never serves a
//! value older than `max_stale` (and always says its true age), and flag routing is
//! deterministic and respects the rollout percentage. 64 cases each, to keep CI fast; run
//! more with `PROPTEST_CASES=10000 cargo test --test it props`.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use proptest::prelude::*;
use tickshare::{
    Account, BreakerConfig, Candle, CandleRange, ClassLimit, CoordinatedSource, Decimal, EndpointClass,
    Error, Granularity, MarketDataSource, MigrationFlags, Origin, Priority, ProductId, RateLimiter,
    RateLimiterConfig, ReadOptions, Route, Ticker, rollout_bucket,
};
use tokio::time::Instant;

/// 64 cases, or `PROPTEST_CASES` when set.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    ProptestConfig { cases, ..ProptestConfig::default() }
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap()
}

/// The most admissions in any window `(t - 1 s, t]`, the exchange's own definition.
fn max_in_any_second(times: &mut [Duration]) -> usize {
    times.sort();
    let mut window: VecDeque<Duration> = VecDeque::new();
    let mut best = 0;
    for &t in times.iter() {
        while window.front().is_some_and(|&f| t - f >= Duration::from_secs(1)) {
            window.pop_front();
        }
        window.push_back(t);
        best = best.max(window.len());
    }
    best
}

fn priority(n: u8) -> Priority {
    Priority::ALL[usize::from(n % 3)]
}

proptest! {
    #![proptest_config(config())]

    /// Random arrivals (bursts, lulls, mixed priorities, cancellations, 429 penalties) never
    /// get more than `limit - 1` requests admitted in any one-second window, and every request
    /// is admitted or refused with a typed local error.
    #[test]
    fn limiter_never_exceeds_the_quota_in_any_window(
        limit in 2u32..60,
        percent in 50u32..=100,
        max_wait_ms in 50u64..5_000,
        arrivals in prop::collection::vec((0u64..400, any::<u8>(), 0u8..20), 1..150),
    ) {
        let limit_cfg = ClassLimit::with_margin(limit, percent).unwrap();
        let cfg = RateLimiterConfig {
            public: limit_cfg,
            max_wait: Duration::from_millis(max_wait_ms),
            max_waiters: 64,
            ..Default::default()
        };
        let limiter = RateLimiter::new(cfg).unwrap();
        let admitted: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let (ok, refused) = paused_runtime().block_on(async {
            let start = Instant::now();
            let mut tasks = Vec::new();
            for (gap_ms, prio, action) in arrivals {
                tokio::time::sleep(Duration::from_millis(gap_ms)).await;
                if action == 0 {
                    // Now and then the exchange answers 429 anyway: the class pauses.
                    limiter.penalize(EndpointClass::Public, Some(Duration::from_millis(300)));
                }
                let (l, admitted) = (limiter.clone(), Arc::clone(&admitted));
                let task = tokio::spawn(async move {
                    let r = l.acquire_with(EndpointClass::Public, priority(prio)).await;
                    if r.is_ok() {
                        admitted.lock().unwrap().push(start.elapsed());
                    }
                    r
                });
                if action == 1 {
                    // A caller that gives up while waiting.
                    tokio::task::yield_now().await;
                    task.abort();
                }
                tasks.push(task);
            }
            let (mut ok, mut refused) = (0usize, 0usize);
            for t in tasks {
                match t.await {
                    Ok(Ok(())) => ok += 1,
                    Ok(Err(Error::RateLimited { local: true, .. } | Error::Overloaded(_))) => refused += 1,
                    Ok(Err(e)) => panic!("untyped refusal: {e:?}"),
                    Err(cancelled) => assert!(cancelled.is_cancelled()),
                }
            }
            (ok, refused)
        });
        let mut times = admitted.lock().unwrap().clone();
        prop_assert_eq!(times.len(), ok);
        let peak = max_in_any_second(&mut times);
        prop_assert!(peak < limit as usize, "{peak} admitted in one second, limit {limit}");
        let s = limiter.stats().public;
        prop_assert_eq!(s.acquired as usize, ok);
        prop_assert_eq!((s.rejected_local + s.shed) as usize, refused);
        prop_assert_eq!(s.waiting_now, 0);
    }
}

/// An upstream whose ticker price is the tokio time (ms since `start`) it was fetched at, and
/// which fails while `failing` is set.
struct Clocked {
    start: Instant,
    failing: Arc<Mutex<bool>>,
}

impl Clocked {
    fn now_ticker(&self, p: &ProductId) -> Result<Ticker, Error> {
        if *self.failing.lock().unwrap() {
            return Err(Error::Transport("scripted failure".into()));
        }
        let ms = self.start.elapsed().as_millis();
        Ok(Ticker {
            product: p.clone(),
            price: Decimal::from(u64::try_from(ms).unwrap()),
            best_bid: None,
            best_ask: None,
            time: time::OffsetDateTime::UNIX_EPOCH,
            price_kind: tickshare::PriceKind::LastTrade,
        })
    }
}

#[async_trait]
impl MarketDataSource for Clocked {
    async fn ticker(&self, product: &ProductId) -> tickshare::Result<Ticker> {
        self.now_ticker(product)
    }
    async fn tickers(&self, products: &[ProductId]) -> tickshare::Result<Vec<Ticker>> {
        products.iter().map(|p| self.now_ticker(p)).collect()
    }
    async fn candles(&self, _: &ProductId, _: Granularity, _: CandleRange) -> tickshare::Result<Vec<Candle>> {
        Err(Error::InvalidInput("not used".into()))
    }
    async fn accounts(&self) -> tickshare::Result<Vec<Account>> {
        Ok(Vec::new())
    }
}

proptest! {
    #![proptest_config(config())]

    /// Under random reads, clock jumps and outages the cache never serves a ticker older than
    /// `max_stale`, reports its true age, serves fresh cache only within the TTL, honours
    /// `max_age` on fresh reads, and serves stale data exactly when the model says it must.
    #[test]
    fn cache_never_serves_older_than_max_stale(
        ttl_ms in 100u64..10_000,
        extra_stale_ms in 0u64..30_000,
        swr in any::<bool>(),
        steps in prop::collection::vec((0u64..8_000, any::<bool>(), prop::option::of(0u64..10_000)), 1..60),
    ) {
        let ttl = Duration::from_millis(ttl_ms);
        let max_stale = ttl + Duration::from_millis(extra_stale_ms);
        paused_runtime().block_on(async move {
            let start = Instant::now();
            let failing = Arc::new(Mutex::new(false));
            let upstream = Clocked { start, failing: Arc::clone(&failing) };
            let source = CoordinatedSource::builder(upstream)
                .ticker_ttl(ttl)
                .max_stale(max_stale)
                .stale_while_revalidate(swr)
                .max_retries(0)
                .batch_window(Duration::ZERO)
                .breaker(BreakerConfig::disabled())
                .build()
                .unwrap();
            let btc: ProductId = "BTC-USD".parse().unwrap();
            // The model: when the last successful fetch happened.
            let mut last_fetch: Option<Duration> = None;
            for (advance_ms, fail, max_age_ms) in steps {
                tokio::time::advance(Duration::from_millis(advance_ms)).await;
                *failing.lock().unwrap() = fail;
                let opts = max_age_ms.map_or_else(ReadOptions::default, |m| ReadOptions::max_age(Duration::from_millis(m)));
                let r = source.ticker_with(&btc, opts).await;
                let now = start.elapsed();
                // Let background revalidations (stale-while-revalidate) run and be modelled.
                tokio::task::yield_now().await;
                match &r {
                    Ok(f) => {
                        let fetched_ms = f.value.price.to_string().parse::<u64>().unwrap();
                        let true_age = now - Duration::from_millis(fetched_ms);
                        prop_assert_eq!(f.age, true_age, "the reported age is the true age");
                        prop_assert!(f.age <= max_stale, "served {:?} old, max_stale {:?}", f.age, max_stale);
                        match f.origin {
                            Origin::Upstream => {
                                prop_assert!(!fail);
                                prop_assert_eq!(f.age, Duration::ZERO);
                            }
                            Origin::Cache => {
                                prop_assert!(f.age < ttl, "fresh cache {:?} old, ttl {:?}", f.age, ttl);
                                if let Some(m) = max_age_ms {
                                    prop_assert!(f.age <= Duration::from_millis(m));
                                }
                            }
                            Origin::Stale => {
                                // Past the TTL, or past the age this read demanded.
                                let refused = max_age_ms.is_some_and(|m| f.age > Duration::from_millis(m));
                                prop_assert!(f.age >= ttl || refused);
                                prop_assert!(fail || (swr && max_age_ms.is_none()));
                            }
                        }
                    }
                    Err(e) => {
                        prop_assert!(fail, "failed while the upstream was up: {e:?}");
                        // Only when nothing within max_stale was cached.
                        let young = last_fetch.is_some_and(|t| now - t <= max_stale);
                        prop_assert!(!young, "an error although data {:?} old was cached", last_fetch.map(|t| now - t));
                    }
                }
                // Only what was served is known to be cached (a background refresh may have
                // cached something newer, which only makes the model stricter than the truth).
                if let Ok(f) = &r {
                    let fetched = Duration::from_millis(f.value.price.to_string().parse::<u64>().unwrap());
                    last_fetch = last_fetch.max(Some(fetched));
                }
            }
            Ok(())
        })?;
    }

    /// Routing is a pure function of the flags and the id: the same answer twice, after a
    /// serde round trip and for a clone; the kill switch sends everyone to legacy; a listed bot
    /// is always coordinated; and raising the percentage never un-migrates anybody.
    #[test]
    fn flag_routing_is_deterministic_and_monotonic(
        ids in prop::collection::vec("[a-zA-Z0-9_.-]{0,24}", 1..50),
        percent in 0u8..=100,
        more in 0u8..=100,
        listed in prop::collection::btree_set("[a-z]{1,6}", 0..5),
        shadow in prop::collection::btree_set("[a-z]{1,6}", 0..5),
    ) {
        let flags = MigrationFlags { enabled: true, bot_ids: listed.clone(), rollout_percent: percent, shadow_bot_ids: shadow };
        let again: MigrationFlags = serde_json::from_str(&serde_json::to_string(&flags).unwrap()).unwrap();
        let raised = MigrationFlags { rollout_percent: percent.saturating_add(more).min(100), ..flags.clone() };
        for id in ids.iter().chain(listed.iter()) {
            let r = flags.route(id);
            prop_assert_eq!(r, flags.route(id));
            prop_assert_eq!(r, again.route(id));
            prop_assert_eq!(r, flags.clone().route(id));
            prop_assert_eq!(flags.disabled().route(id), Route::Legacy);
            if listed.contains(id) {
                prop_assert_eq!(r, Route::Coordinated);
            }
            prop_assert_eq!(r == Route::Coordinated, listed.contains(id) || rollout_bucket(id) < percent);
            if r == Route::Coordinated {
                prop_assert_eq!(raised.route(id), Route::Coordinated);
            }
        }
    }

    /// Over 5,000 ids of one naming scheme (a random prefix and a counter, as fleets name
    /// bots), the share routed by percentage is within 3 points of the percentage.
    #[test]
    fn rollout_percentage_is_respected_within_tolerance(
        prefix in "[a-z]{1,10}[-_]?",
        percent in 0u8..=100,
    ) {
        let flags = MigrationFlags { enabled: true, rollout_percent: percent, ..Default::default() };
        let n = 5_000;
        let migrated = (0..n).filter(|i| flags.route(&format!("{prefix}{i}")) == Route::Coordinated).count();
        let share = migrated as f64 * 100.0 / n as f64;
        prop_assert!((share - f64::from(percent)).abs() <= 3.0, "{share:.2} % migrated for {percent} % ({prefix:?})");
        if percent == 0 {
            prop_assert_eq!(migrated, 0);
        }
        if percent == 100 {
            prop_assert_eq!(migrated, n);
        }
    }
}
