//! Unit tests of the parts that need no Redis: the fallback share, the mode machine on the
//! paused clock, validation. The tier against a real Redis is tested in
//! `tests/it/redis.rs`.

use std::time::Duration;

use time::macros::datetime;

use super::{
    config::fallback_share,
    health::{Health, Path, TierMode, WINDOW},
    *,
};

#[test]
fn fallback_shares_add_up_to_no_more_than_the_budget() {
    let limits = RateLimiterConfig::default();
    // Coinbase at the default margins: private 24 + 5 = 29 per window, public 8 + 1 = 9.
    for workers in 1..=40u32 {
        let (cfg, closed) = fallback_share(&limits, workers);
        for (i, (full, share)) in
            [(limits.public, cfg.public), (limits.private, cfg.private)].into_iter().enumerate()
        {
            let budget = full.rate_per_second.get() + full.burst.get();
            if closed[i] {
                assert!(budget / workers < 2, "{workers} workers: class {i} closed with a share available");
                continue;
            }
            let per = share.rate_per_second.get() + share.burst.get();
            assert!(per * workers <= budget, "{workers} workers: {per} each exceeds {budget}");
            assert_eq!(share.burst.get(), 1);
            assert!(per >= 2);
        }
        assert!(RateLimiter::new(cfg).is_ok(), "{workers} workers: invalid fallback config");
    }
    let (cfg, closed) = fallback_share(&limits, 4);
    assert_eq!((cfg.private.rate_per_second.get(), cfg.private.burst.get()), (6, 1));
    assert_eq!((cfg.public.rate_per_second.get(), cfg.public.burst.get()), (1, 1));
    assert_eq!(closed, [false, false]);
    let (_, closed) = fallback_share(&limits, 5);
    assert_eq!(closed, [true, false], "five workers cannot share 9 public requests per window");
    let (_, closed) = fallback_share(&limits, 15);
    assert_eq!(closed, [true, true]);
    let (one, _) = fallback_share(&limits, 1);
    assert_eq!(one.private.rate_per_second.get() + one.private.burst.get(), 29);
}

#[test]
fn config_validation_names_the_setting() {
    assert!(SharedTierConfig::default().validate().is_ok());
    let cases = [
        SharedTierConfig { expected_workers: 0, ..Default::default() },
        SharedTierConfig { namespace: String::new(), ..Default::default() },
        SharedTierConfig { namespace: "a b".into(), ..Default::default() },
        SharedTierConfig { lease_poll: Duration::ZERO, ..Default::default() },
        SharedTierConfig { lease_ttl: Duration::from_millis(400), ..Default::default() },
    ];
    for cfg in cases {
        assert!(matches!(cfg.validate(), Err(Error::Config(_))), "{cfg:?}");
    }
    let bad = CallProfile { tickers_per_request: 0, ..CallProfile::default() };
    assert!(bad.validate().is_err());
}

#[test]
fn profile_follows_the_client() {
    let public = CoinbaseClient::builder().build().unwrap();
    let p = CallProfile::coinbase(&public);
    assert_eq!((p.tickers_class, p.tickers_per_request), (EndpointClass::Public, 100));
    assert_eq!(p.market_data_class, EndpointClass::Public);
    let private = CoinbaseClient::builder()
        .credentials(crate::coinbase::Credentials::generate("k"))
        .ticker_batch(crate::coinbase::TickerBatch::Book)
        .best_bid_ask_chunk(40)
        .candle_max_buckets(300)
        .build()
        .unwrap();
    let p = CallProfile::coinbase(&private);
    assert_eq!((p.tickers_class, p.tickers_per_request), (EndpointClass::Private, 40));
    assert_eq!((p.market_data_class, p.candles_per_request), (EndpointClass::Private, 300));
}

#[tokio::test(start_paused = true)]
async fn outage_quiet_window_probe_and_handover() {
    let interval = Duration::from_millis(200);
    let h = Health::new(true, interval);
    assert_eq!(h.mode(), TierMode::Shared);
    assert_eq!(h.path(), Path::Shared { local_too: false });
    assert!(!h.begin_probe(), "nothing to probe while shared");

    let t0 = tokio::time::Instant::now();
    h.mark_down("connection refused");
    h.mark_down("connection refused");
    assert_eq!(h.mode(), TierMode::Degraded);
    assert_eq!(h.outages.load(Ordering::Relaxed), 1, "one outage, two errors");
    assert_eq!(h.redis_errors.load(Ordering::Relaxed), 2);
    assert_eq!(h.path(), Path::Degraded { quiet_until: t0 + WINDOW });
    assert!(!h.begin_probe(), "no probe before reconnect_interval");

    tokio::time::advance(interval).await;
    assert!(h.begin_probe());
    assert!(!h.begin_probe(), "one probe at a time");
    h.probed(false);
    assert_eq!(h.mode(), TierMode::Degraded);
    assert!(!h.begin_probe(), "the next probe waits another interval");
    assert_eq!(h.path(), Path::Degraded { quiet_until: t0 + WINDOW }, "the quiet window keeps its start");

    tokio::time::advance(interval).await;
    assert!(h.begin_probe());
    h.probed(true);
    assert_eq!(h.recoveries.load(Ordering::Relaxed), 1);
    assert_eq!(h.mode(), TierMode::Handover);
    assert_eq!(h.path(), Path::Shared { local_too: true });
    assert!(h.degraded_for().is_none());

    // Handover lasts 2 x interval + one window.
    tokio::time::advance(interval * 2 + WINDOW - Duration::from_millis(1)).await;
    assert_eq!(h.path(), Path::Shared { local_too: true });
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(h.path(), Path::Shared { local_too: false });
    assert_eq!(h.mode(), TierMode::Shared);

    // Losing Redis during a handover starts a new outage with a new quiet window.
    let h = Health::new(false, interval);
    assert_eq!(h.mode(), TierMode::Degraded);
    assert_eq!(h.outages.load(Ordering::Relaxed), 1, "unreachable at start counts");
    tokio::time::advance(interval).await;
    assert!(h.begin_probe());
    h.probed(true);
    let t1 = tokio::time::Instant::now();
    h.mark_down("timed out");
    assert_eq!(h.path(), Path::Degraded { quiet_until: t1 + WINDOW });
    assert_eq!(h.outages.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn builder_rejects_bad_settings_before_connecting() {
    let up = || crate::source::MockMarketDataSource::new();
    let r = SharedTier::builder("not a url", "k", up()).build().await;
    assert!(matches!(r, Err(Error::Config(m)) if m.contains("redis_url") && !m.contains("not a url")));
    let r = SharedTier::builder("redis://127.0.0.1:1", "", up()).build().await;
    assert!(matches!(r, Err(Error::Config(_))));
    let r = SharedTier::builder("redis://127.0.0.1:1", "k", up()).expected_workers(0).build().await;
    assert!(matches!(r, Err(Error::Config(_))));
    let r = SharedTier::builder("redis://127.0.0.1:1", "k", up())
        .profile(CallProfile { candles_per_request: 0, ..CallProfile::default() })
        .build()
        .await;
    assert!(matches!(r, Err(Error::Config(_))));
}

#[tokio::test(start_paused = true)]
async fn unreachable_redis_at_start_is_degraded_not_an_error() {
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let mut up = crate::source::MockMarketDataSource::new();
    let btc: ProductId = "BTC-USD".parse().unwrap();
    let t = Ticker {
        product: btc.clone(),
        price: rust_decimal::Decimal::ONE,
        best_bid: None,
        best_ask: None,
        time: datetime!(2024-01-01 00:00 UTC),
        price_kind: crate::model::PriceKind::LastTrade,
    };
    up.expect_tickers().times(2).returning(move |_| Ok(vec![t.clone()]));
    let tier = SharedTier::builder("redis://:secret@127.0.0.1:1/", "k", up)
        .redis_timeout(Duration::from_millis(200))
        .reconnect_interval(Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    assert_eq!(tier.mode(), TierMode::Degraded);
    let debug = format!("{tier:?}");
    assert!(!debug.contains("secret"), "{debug}");
    let start = tokio::time::Instant::now();
    assert_eq!(tier.tickers(std::slice::from_ref(&btc)).await.unwrap().len(), 1);
    assert!(start.elapsed() >= WINDOW, "the first degraded call waits one window");
    assert_eq!(tier.tickers(&[btc]).await.unwrap().len(), 1);
    let s = tier.stats();
    assert_eq!((s.mode, s.outages, s.degraded_calls, s.upstream_calls), (TierMode::Degraded, 1, 2, 2));
    assert_eq!(s.fallback_limiter.private.acquired, 2);
    assert_eq!(s.shared_limiter.acquired, 0);
    assert!(tier.invalidate_accounts().await.is_err());
}

#[tokio::test(start_paused = true)]
async fn every_key_of_one_account_shares_one_budget_key() {
    let client = |key: &str| {
        CoinbaseClient::builder()
            .credentials(crate::coinbase::Credentials::generate(key))
            .account_identity("alice")
            .unlimited()
            .build()
            .unwrap()
    };
    let tier = |key: &'static str| async move {
        SharedTier::coinbase("redis://127.0.0.1:1/", key, client(key))
            .redis_timeout(Duration::from_millis(200))
            .build()
            .await
            .unwrap()
    };
    let (main, savings) =
        (tier("organizations/o/apiKeys/main").await, tier("organizations/o/apiKeys/savings").await);
    assert_eq!(main.config().account_identity.as_deref(), Some("alice"), "taken from the client");
    assert_eq!(main.budget_prefix(), savings.budget_prefix());
    assert_ne!(main.key_prefix(), savings.key_prefix(), "caches stay per key: accounts are per portfolio");
    // Without an identity the budget is the key's, as before.
    let alone = SharedTier::builder("redis://127.0.0.1:1/", "k", crate::source::MockMarketDataSource::new())
        .redis_timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    assert_eq!(alone.budget_prefix(), alone.key_prefix());
    let r = SharedTier::builder("redis://127.0.0.1:1/", "k", crate::source::MockMarketDataSource::new())
        .account_identity(" ")
        .build()
        .await;
    assert!(matches!(r, Err(Error::Config(_))));
}
