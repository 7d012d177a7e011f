//! mockall tests of the evaluator's fetch plan and error isolation.

use std::collections::HashSet;

use time::macros::datetime;

use super::*;

/// A mocked upstream's answer: fetched just now, nothing known about its candle in progress.
fn fresh(value: Vec<Candle>) -> crate::Fresh<Vec<Candle>> {
    crate::Fresh {
        value,
        origin: crate::Origin::Upstream,
        age: std::time::Duration::ZERO,
        in_progress: None,
        provisional: None,
    }
}
use crate::{Account, MockMarketDataSource, MovingAverageCrossover, RsiThreshold};

fn pid(s: &str) -> ProductId {
    s.parse().unwrap()
}

fn ticker(p: &ProductId) -> Ticker {
    Ticker {
        product: p.clone(),
        price: Decimal::from(100),
        best_bid: None,
        best_ask: None,
        time: OffsetDateTime::UNIX_EPOCH,
        price_kind: crate::model::PriceKind::LastTrade,
    }
}

fn series(range: CandleRange, g: Granularity) -> Vec<Candle> {
    let mut out = Vec::new();
    let mut t = range.start;
    let mut i = 0;
    while t < range.end {
        let d = Decimal::from(100 + i);
        out.push(Candle { start: t, open: d, high: d, low: d, close: d, volume: Decimal::ONE });
        t += g.duration();
        i += 1;
    }
    out
}

fn usd() -> Vec<Account> {
    vec![Account {
        uuid: "1".into(),
        name: "USD".into(),
        currency: "USD".into(),
        available: Decimal::from(1000),
        hold: Decimal::ZERO,
        active: true,
        account_type: "ACCOUNT_TYPE_FIAT".into(),
    }]
}

fn bots(n: usize, products: &[ProductId]) -> Vec<Bot> {
    (0..n)
        .map(|i| {
            let strategy: Arc<dyn Strategy> = if i % 2 == 0 {
                Arc::new(MovingAverageCrossover::default())
            } else {
                Arc::new(RsiThreshold::default())
            };
            Bot::new(format!("bot-{i}"), products[i % products.len()].clone(), strategy)
        })
        .collect()
}

#[tokio::test]
async fn one_snapshot_per_tick() {
    let products: Vec<ProductId> = (0..7).map(|i| pid(&format!("P{i}-USD"))).collect();
    let mut mock = MockMarketDataSource::new();
    mock.expect_tickers().times(1).returning(|ps| {
        let distinct: HashSet<_> = ps.iter().collect();
        assert_eq!(distinct.len(), ps.len(), "products are requested once each");
        Ok(ps.iter().map(ticker).collect())
    });
    mock.expect_candles_fresh().times(7).returning(|_, g, r| Ok(fresh(series(r, g))));
    mock.expect_accounts().times(1).returning(|| Ok(usd()));
    mock.expect_ticker().never();
    mock.expect_validate_trade_balance().never();
    let clock = Clock::starting_at(datetime!(2024-01-01 10:30 UTC));
    let eval = BatchEvaluator::new(Arc::new(mock)).clock(clock);
    let report = eval.evaluate_all(&bots(25, &products)).await;
    assert_eq!(report.results.len(), 25);
    assert_eq!(report.errors().count(), 0);
    assert_eq!(report.routes["coordinated"], 25);
    // Increasing closes: the crossover bots buy.
    assert_eq!(report.results[0].outcome.as_ref().unwrap().signal, Signal::Buy);
}

#[tokio::test]
async fn one_bad_product_never_fails_the_others() {
    let good = pid("BTC-USD");
    let bad = pid("NOPE-USD");
    let mut mock = MockMarketDataSource::new();
    let g2 = good.clone();
    mock.expect_tickers().times(1).returning(move |_| Ok(vec![ticker(&g2)]));
    let b2 = bad.clone();
    mock.expect_candles_fresh().times(2).returning(move |p, g, r| {
        if *p == b2 { Err(Error::NotFound(p.to_string())) } else { Ok(fresh(series(r, g))) }
    });
    mock.expect_accounts().times(1).returning(|| Ok(usd()));
    let eval = BatchEvaluator::new(Arc::new(mock));
    let report = eval.evaluate_all(&bots(4, &[good, bad])).await;
    let errs: Vec<_> = report.errors().map(|r| r.bot_id.clone()).collect();
    assert_eq!(errs, vec!["bot-1", "bot-3"]);
    assert!(matches!(report.results[1].outcome, Err(Error::NotFound(_))));
    assert_eq!(report.outcomes["error"], 2);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["results"][1]["decision"], serde_json::Value::Null);
    assert!(json["results"][1]["error"].as_str().unwrap().contains("not found"));
}

#[tokio::test]
async fn accounts_failure_fails_bots_with_a_typed_error() {
    let p = pid("BTC-USD");
    let mut mock = MockMarketDataSource::new();
    mock.expect_tickers().returning(|ps| Ok(ps.iter().map(ticker).collect()));
    mock.expect_candles_fresh().returning(|_, g, r| Ok(fresh(series(r, g))));
    mock.expect_accounts().returning(|| Err(Error::Unauthorized("bad key".into())));
    let report = BatchEvaluator::new(Arc::new(mock)).evaluate_all(&bots(3, &[p])).await;
    assert!(report.results.iter().all(|r| matches!(r.outcome, Err(Error::Unauthorized(_)))));
}

#[test]
fn snapshot_slices_each_bots_lookback() {
    let p = pid("BTC-USD");
    let range = CandleRange::lookback(Granularity::OneHour, 30, datetime!(2024-01-01 10:30 UTC)).unwrap();
    let snap = MarketSnapshot {
        taken_at: datetime!(2024-01-01 10:30 UTC),
        tickers: [(p.clone(), Ok(ticker(&p)))].into_iter().collect(),
        candles: [((p.clone(), Granularity::OneHour), Ok(Arc::new(series(range, Granularity::OneHour))))]
            .into_iter()
            .collect(),
        candle_marks: HashMap::new(),
        balances: Ok(Balances::from_accounts(&usd())),
    };
    let short = Bot::new("a", p.clone(), Arc::new(MovingAverageCrossover { fast: 2, slow: 3 })).lookback(3);
    assert_eq!(snap.evaluate(&short).unwrap().signal, Signal::Buy);
    let poor = Bot::new("b", p, Arc::new(MovingAverageCrossover { fast: 2, slow: 3 }))
        .order_size(Decimal::from(5000));
    assert_eq!(snap.evaluate(&poor).unwrap().signal, Signal::Hold);
}

fn same(a: &Result<Decision>, b: &Result<Decision>) -> bool {
    match (a, b) {
        (Ok(x), Ok(y)) => x == y,
        (Err(x), Err(y)) => x.to_string() == y.to_string(),
        _ => false,
    }
}

fn market_mock() -> MockMarketDataSource {
    let mut mock = MockMarketDataSource::new();
    mock.expect_tickers().returning(|ps| Ok(ps.iter().filter(|p| p.base() != "NOPE").map(ticker).collect()));
    mock.expect_candles_fresh().returning(|p, g, r| {
        if p.base() == "NOPE" { Err(Error::NotFound(p.to_string())) } else { Ok(fresh(series(r, g))) }
    });
    mock.expect_accounts().returning(|| Ok(usd()));
    mock
}

/// A tick resolves each series once for all its bots; every bot's decision must still be the
/// one `MarketSnapshot::evaluate` gives it: lookbacks, granularities and order sizes differ
/// within a product, one product is unknown, one quote currency has no balance.
#[tokio::test]
async fn tick_decisions_match_snapshot_evaluate() {
    let products = [pid("BTC-USD"), pid("NOPE-USD"), pid("ETH-EUR")];
    let lookbacks = [3, 24, 30, 2];
    let sizes = [Decimal::from(10), Decimal::from(5000), Decimal::from(-1)];
    let bots: Vec<Bot> = (0..36)
        .map(|i| {
            let strategy: Arc<dyn Strategy> = if i % 2 == 0 {
                Arc::new(MovingAverageCrossover { fast: 2, slow: 3 })
            } else {
                Arc::new(RsiThreshold { period: 2, ..Default::default() })
            };
            let g = if i % 5 == 0 { Granularity::FifteenMinute } else { Granularity::OneHour };
            Bot::new(format!("bot-{i}"), products[i % 3].clone(), strategy)
                .granularity(g)
                .lookback(lookbacks[i % 4])
                .order_size(sizes[i % 3])
        })
        .collect();
    let clock = Clock::starting_at(datetime!(2024-01-01 10:30 UTC));
    let report = BatchEvaluator::new(Arc::new(market_mock())).clock(clock).evaluate_all(&bots).await;
    let refs: Vec<&Bot> = bots.iter().collect();
    let snap = MarketSnapshot::fetch(&market_mock(), &refs, report.started_at).await;
    assert_eq!(report.results.len(), bots.len());
    for (bot, r) in bots.iter().zip(&report.results) {
        assert_eq!(r.bot_id, bot.id);
        assert!(
            same(&r.outcome, &snap.evaluate(bot)),
            "{}: {:?} vs {:?}",
            bot.id,
            r.outcome,
            snap.evaluate(bot)
        );
    }
    let errors = report.errors().count() as u64;
    assert_eq!(errors, 12, "the NOPE-USD bots");
    assert_eq!(report.outcomes["error"], errors);
    assert_eq!(report.outcomes.values().sum::<u64>(), 36);
    assert!(report.outcomes.values().all(|n| *n > 0), "only signals that occurred are listed");
}

/// With a selector, legacy bots keep their own outcome and every result stays in the bots'
/// order.
#[tokio::test]
async fn mixed_routes_keep_the_bots_order() {
    let mut legacy = MockMarketDataSource::new();
    legacy.expect_ticker().returning(|p| Err(Error::NotFound(format!("legacy {p}"))));
    legacy.expect_candles_fresh().returning(|_, g, r| Ok(fresh(series(r, g))));
    legacy.expect_accounts().returning(|| Ok(usd()));
    legacy.expect_validate_trade_balance().returning(|_, _| Ok(true));
    let migrated: std::collections::BTreeSet<String> = ["bot-1", "bot-2", "bot-5"].map(String::from).into();
    let flags = crate::MigrationFlags { enabled: true, bot_ids: migrated.clone(), ..Default::default() };
    let selector = SourceSelector::new(Arc::new(legacy), Arc::new(market_mock()), flags);
    let bots = bots(7, &[pid("BTC-USD")]);
    let report = BatchEvaluator::with_selector(selector).evaluate_all(&bots).await;
    for (bot, r) in bots.iter().zip(&report.results) {
        assert_eq!(r.bot_id, bot.id);
        if migrated.contains(&bot.id) {
            assert_eq!(r.route, Route::Coordinated);
            assert!(r.outcome.is_ok(), "{:?}", r.outcome);
        } else {
            assert_eq!(r.route, Route::Legacy);
            assert!(
                matches!(&r.outcome, Err(Error::NotFound(m)) if m.starts_with("legacy")),
                "{:?}",
                r.outcome
            );
        }
    }
    assert_eq!((report.routes["coordinated"], report.routes["legacy"]), (3, 4));
}

#[test]
fn fx_hashes_of_product_ids_are_distinct() {
    use std::hash::{BuildHasher, BuildHasherDefault};
    let build = BuildHasherDefault::<FxHasher>::default();
    let hashes: HashSet<u64> =
        (0..10_000).map(|i| build.hash_one((&pid(&format!("P{i}-USD")), Granularity::OneHour))).collect();
    assert_eq!(hashes.len(), 10_000);
    assert_ne!(
        build.hash_one((&pid("BTC-USD"), Granularity::OneHour)),
        build.hash_one((&pid("BTC-USD"), Granularity::OneDay))
    );
}
