//! A stable-Rust fuzzer for every wire decoder and for `ProductId` parsing (#7), proving on
//! stable what the cargo-fuzz targets in `fuzz/` prove under libFuzzer: no input panics, and
//! what decodes satisfies the same invariants as there.
//!
//! Inputs are the seed corpus in `fuzz/seeds/<target>/` (the sample bodies of COINBASE.md)
//! mutated at the byte level (bit flips, inserts, deletes, duplications, truncation, splices
//! of two seeds, dictionary tokens) and at the JSON level (a random value replaced by a
//! dictionary value, another type, a deep nest or a huge string), several mutations stacked.
//! Each input runs under `catch_unwind`; a panicking input is written to
//! `target/fuzz-crashes/` and fails the test, to be kept in [`REGRESSIONS`].
//!
//! CI runs 3,000 executions per target. The long run (1,000,000 per target by default):
//!
//! ```text
//! FUZZ_EXECS=1000000 cargo test --release --test it fuzz::long -- --ignored --nocapture
//! ```

use std::{
    fs,
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    time::Instant,
};

use serde_json::Value;
use tickshare::{Balances, MAX_PRODUCT_ID_LEN, ProductId, coinbase::wire};

/// Inputs replayed on every run: `(target, input)`. A panicking input found by either fuzzer
/// goes here. The first three panicked (#7): a bid and an ask whose sum overflows `Decimal`
/// (`(b + a) / 2` in the ticker and `best_bid_ask` decoders and `Ticker::mid`), and balances
/// whose sum overflows (`Balances::from_accounts`, `Balance::total`). The others are
/// hand-picked edge inputs (numbers at the edges of `Decimal` and `i64`, times out of range,
/// non-ASCII ids) so they stay covered.
const REGRESSIONS: &[(&str, &[u8])] = &[
    ("decode_best_bid_ask", br#"{"pricebooks":[{"product_id":"A-B","bids":[{"price":"79228162514264337593543950335"}],"asks":[{"price":"79228162514264337593543950335"}]}]}"#),
    ("decode_accounts", br#"{"accounts":[{"currency":"BTC","active":true,"available_balance":{"value":"79228162514264337593543950335"},"hold":{"value":"79228162514264337593543950335"}},{"currency":"BTC","active":true,"available_balance":{"value":"79228162514264337593543950335"}}]}"#),
    ("decode_candles", br#"{"candles":[{"start":"-99999999999999","low":"1","high":"1","open":"1","close":"1","volume":"1"}]}"#),
    ("decode_candles", br#"{"candles":[{"start":"9223372036854775807","low":"1e28","high":"1","open":"1","close":"1","volume":"1"}]}"#),
    ("decode_ticker", br#"{"trades":[],"best_bid":"79228162514264337593543950335","best_ask":"79228162514264337593543950335"}"#),
    ("decode_ticker", br#"{"trades":[{"price":"1e-999","time":"2024-04-24T09:56:38Z"}]}"#),
    ("decode_best_bid_ask", br#"{"pricebooks":[{"product_id":"A-B","bids":[{"price":"-79228162514264337593543950335"}],"asks":[{"price":"79228162514264337593543950335"}]}]}"#),
    ("decode_server_time", br#"{"epochMillis":"-9223372036854775808"}"#),
    ("decode_server_time", br#"{"epochSeconds":"253402300800","epochMillis":"x"}"#),
    ("decode_accounts", br#"{"accounts":[{"available_balance":{"value":"0.00000000000000000000000000001"}}],"has_next":true,"cursor":""}"#),
    ("product_id", "ÉÉÉ-USD".as_bytes()),
    ("product_id", b"A-B-C-D-E-F-G-H-I-J-K-L-M-N-O-P-"),
];

/// The decoders under test, by the name of their cargo-fuzz target.
const TARGETS: [&str; 10] = [
    "decode_ticker",
    "decode_recent_trades",
    "decode_order_book",
    "decode_candles",
    "decode_best_bid_ask",
    "decode_accounts",
    "decode_products",
    "decode_product",
    "decode_server_time",
    "product_id",
];

/// Run `target` on `input` and check what the cargo-fuzz target checks. Returns whether the
/// input decoded.
fn exercise(target: &str, input: &[u8]) -> bool {
    match target {
        "decode_ticker" => {
            let product = ProductId::new("BTC-USD").unwrap();
            wire::decode_ticker(&product, input)
                .inspect(|t| {
                    assert_eq!(t.product, product);
                    let _ = t.mid();
                })
                .is_ok()
        }
        "decode_recent_trades" => {
            let product = ProductId::new("BTC-USD").unwrap();
            wire::decode_recent_trades(&product, 3, input)
                .inspect(|r| {
                    assert_eq!(r.product, product);
                    assert!(r.trades.len() <= 3);
                    assert!(r.trades.windows(2).all(|w| w[0].time >= w[1].time));
                    for (i, t) in r.trades.iter().enumerate() {
                        assert!(t.price > tickshare::Decimal::ZERO, "{t:?}");
                        assert!(r.trades[..i].iter().all(|u| u.trade_id != t.trade_id));
                    }
                })
                .is_ok()
        }
        "decode_order_book" => {
            let product = ProductId::new("BTC-USDT").unwrap();
            wire::decode_order_book(&product, Some(5), input)
                .inspect(|b| {
                    assert_eq!(b.product, product);
                    assert!(b.bids.len() <= 5 && b.asks.len() <= 5);
                    assert!(b.bids.windows(2).all(|w| w[0].price > w[1].price), "{b:?}");
                    assert!(b.asks.windows(2).all(|w| w[0].price < w[1].price), "{b:?}");
                    if let (Some(bid), Some(ask)) = (b.bids.first(), b.asks.first()) {
                        assert!(bid.price <= ask.price, "{b:?}");
                    }
                    let _ = b.clone().truncated(1);
                })
                .is_ok()
        }
        "decode_candles" => wire::decode_candles(input)
            .inspect(|c| assert!(c.windows(2).all(|w| w[0].start < w[1].start)))
            .is_ok(),
        "decode_best_bid_ask" => wire::decode_best_bid_ask(input)
            .inspect(|ts| {
                for t in ts {
                    let _ = t.mid();
                    if let (Some(b), Some(a)) = (t.best_bid, t.best_ask) {
                        assert!(t.price >= b.min(a) && t.price <= b.max(a), "{t:?}");
                    }
                }
            })
            .is_ok(),
        "decode_accounts" => wire::decode_accounts(input)
            .inspect(|(accounts, next)| {
                assert!(next.as_ref().is_none_or(|c| !c.is_empty()));
                // What a balance check does with them next.
                let balances = Balances::from_accounts(accounts);
                for (_, b) in balances.iter() {
                    let _ = b.total();
                }
            })
            .is_ok(),
        "decode_products" => {
            // The same bodies as keyless tickers (issue 15): only asked products, each once,
            // priced above zero, with no bid/ask.
            let asked: Vec<ProductId> =
                ["ETH-USD", "BTC-USD"].iter().map(|s| ProductId::new(s).unwrap()).collect();
            let _ = wire::decode_product_tickers_for(&asked, input, time::OffsetDateTime::UNIX_EPOCH)
                .inspect(|ts| {
                    assert!(ts.len() <= asked.len());
                    for (i, t) in ts.iter().enumerate() {
                        assert!(asked.contains(&t.product) && ts[..i].iter().all(|u| u.product != t.product));
                        assert!(
                            t.price > tickshare::Decimal::ZERO
                                && t.best_bid.is_none()
                                && t.best_ask.is_none()
                        );
                    }
                });
            wire::decode_products(input)
                .inspect(|ps| assert!(ps.iter().all(|p| ProductId::new(&p.product_id).is_ok())))
                .is_ok()
        }
        "decode_product" => {
            wire::decode_product(input).inspect(|p| assert!(ProductId::new(&p.product_id).is_ok())).is_ok()
        }
        "decode_server_time" => wire::decode_server_time(input).is_ok(),
        "product_id" => {
            let _ = serde_json::from_slice::<ProductId>(input);
            let Ok(s) = std::str::from_utf8(input) else { return false };
            let direct = ProductId::new(s);
            if let Ok(id) = &direct {
                assert!(id.as_str().len() <= MAX_PRODUCT_ID_LEN);
                assert!(
                    id.as_str().bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-')
                );
                assert!(!id.base().is_empty() && !id.quote().is_empty());
                assert_eq!(id.to_string(), s);
            }
            let json = serde_json::to_string(s).unwrap();
            assert_eq!(serde_json::from_str::<ProductId>(&json).is_ok(), direct.is_ok());
            direct.is_ok()
        }
        other => panic!("unknown target {other}"),
    }
}

/// Strings that tend to break number, time and id parsing.
const DICTIONARY: &[&str] = &[
    "",
    " ",
    "0",
    "-0",
    "00",
    "1e999",
    "1e-999",
    "-1e28",
    "1.0E+28",
    "79228162514264337593543950335",
    "79228162514264337593543950336",
    "-79228162514264337593543950336",
    "0.0000000000000000000000000001",
    "0.00000000000000000000000000001",
    "NaN",
    "inf",
    "-inf",
    "1_000",
    "0x10",
    " 12 ",
    "１２",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551616",
    "253402300800",
    "-377705116800",
    "2024-04-24T09:56:38.063595Z",
    "2024-04-24T09:56:38+14:00",
    "2024-13-45T25:61:61Z",
    "9999-12-31T23:59:59.999999999Z",
    "0000-01-01T00:00:00Z",
    "BTC-USD",
    "BTC-USDT",
    "BTC-USDC",
    "btc-usd",
    "BTC--USD",
    "-",
    "é",
    "\u{0}",
    "\u{feff}",
    "\\",
    "\"",
    "null",
    "true",
    "[]",
    "{}",
    "[[[[[[[[[[",
    "}}}}",
    ",",
    ":",
    "\\u0000",
    "\\ud800",
];

/// A tiny xorshift generator: reproducible from `FUZZ_SEED`, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

fn mutate_bytes(rng: &mut Rng, input: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    let len = input.len();
    match rng.below(9) {
        0 if len > 0 => {
            let i = rng.below(len);
            input[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            input[i] = rng.next() as u8;
        }
        2 => {
            let i = rng.below(len + 1);
            input.insert(i, rng.next() as u8);
        }
        3 if len > 0 => {
            let i = rng.below(len);
            let n = rng.below((len - i).min(16) + 1);
            input.drain(i..i + n);
        }
        4 if len > 0 => {
            let i = rng.below(len);
            let n = rng.below((len - i).min(64) + 1);
            let chunk = input[i..i + n].to_vec();
            let at = rng.below(input.len() + 1);
            input.splice(at..at, chunk);
        }
        5 => input.truncate(rng.below(len + 1)),
        6 => {
            let other = &seeds[rng.below(seeds.len())];
            let cut = rng.below(len + 1);
            let from = rng.below(other.len() + 1);
            input.truncate(cut);
            input.extend_from_slice(&other[from..]);
        }
        _ => {
            let token = DICTIONARY[rng.below(DICTIONARY.len())].as_bytes();
            let at = rng.below(len + 1);
            input.splice(at..at, token.iter().copied());
        }
    }
}

fn random_value(rng: &mut Rng) -> Value {
    match rng.below(8) {
        0 => Value::Null,
        1 => Value::Bool(rng.chance(2)),
        2 => Value::from(rng.next() as i64),
        3 => Value::from(f64::from_bits(rng.next() & 0x7FEF_FFFF_FFFF_FFFF)),
        4 => Value::Array((0..rng.below(4)).map(|_| Value::String(String::new())).collect()),
        5 => {
            // Deep nesting: serde_json's recursion limit must turn it into an error.
            let mut v = Value::Null;
            for _ in 0..rng.below(200) {
                v = Value::Array(vec![v]);
            }
            v
        }
        6 => Value::String("9".repeat(rng.below(5_000))),
        _ => Value::String(DICTIONARY[rng.below(DICTIONARY.len())].to_string()),
    }
}

/// Replace one random node of `v` (walking down at random) with a random value.
fn mutate_value(rng: &mut Rng, v: &mut Value) {
    let children = match v {
        Value::Array(a) if !a.is_empty() => a.len(),
        Value::Object(o) if !o.is_empty() => o.len(),
        _ => 0,
    };
    if children == 0 || rng.chance(4) {
        *v = random_value(rng);
        return;
    }
    let i = rng.below(children);
    match v {
        Value::Array(a) => {
            if rng.chance(8) {
                let copy = a[i].clone();
                a.push(copy);
            } else {
                mutate_value(rng, &mut a[i]);
            }
        }
        Value::Object(o) => {
            let key = o.keys().nth(i).cloned().unwrap_or_default();
            if rng.chance(10) {
                o.remove(&key);
            } else if let Some(child) = o.get_mut(&key) {
                mutate_value(rng, child);
            }
        }
        _ => {}
    }
}

fn next_input(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let seed = &seeds[rng.below(seeds.len())];
    if rng.chance(2)
        && let Ok(mut v) = serde_json::from_slice::<Value>(seed)
    {
        for _ in 0..=rng.below(3) {
            mutate_value(rng, &mut v);
        }
        let mut out = serde_json::to_vec(&v).unwrap_or_default();
        if rng.chance(4) {
            mutate_bytes(rng, &mut out, seeds);
        }
        return out;
    }
    let mut out = seed.clone();
    for _ in 0..=rng.below(4) {
        mutate_bytes(rng, &mut out, seeds);
    }
    out
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = fuzz_dir().join("seeds").join(target);
    let mut out: Vec<Vec<u8>> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| fs::read(e.unwrap().path()).unwrap())
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds for {target}");
    out
}

#[derive(Debug, Default)]
struct Report {
    executions: u64,
    decoded: u64,
    crashes: Vec<PathBuf>,
}

/// Run `execs` generated inputs through `target`.
fn fuzz(target: &str, execs: u64, seed: u64) -> Report {
    let seeds = seeds(target);
    let salt = target.bytes().fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(b));
    let mut rng = Rng((seed ^ salt) | 1);
    let mut report = Report::default();
    // Every seed as is, first: the corpus itself must decode without panicking.
    let mut inputs: Vec<Vec<u8>> = seeds.clone();
    while report.executions < execs {
        let input = inputs.pop().unwrap_or_else(|| next_input(&mut rng, &seeds));
        report.executions += 1;
        match catch_unwind(AssertUnwindSafe(|| exercise(target, &input))) {
            Ok(true) => report.decoded += 1,
            Ok(false) => {}
            Err(_) => {
                let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("fuzz-crashes");
                let _ = fs::create_dir_all(&dir);
                let path = dir.join(format!("{target}-{}", report.crashes.len()));
                let _ = fs::write(&path, &input);
                report.crashes.push(path);
            }
        }
    }
    report
}

fn run_all(execs: u64) {
    let seed = std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5EED_F022);
    let mut crashes = Vec::new();
    for target in TARGETS {
        let t0 = Instant::now();
        let r = fuzz(target, execs, seed);
        eprintln!(
            "{target:>20}: {} executions, {} decoded, {} crashes, {:.1} s",
            r.executions,
            r.decoded,
            r.crashes.len(),
            t0.elapsed().as_secs_f64()
        );
        // The mutator keeps some inputs decodable, so the invariants are exercised too.
        assert!(r.decoded > 0, "{target}: nothing decoded, the fuzzer only tests the error paths");
        crashes.extend(r.crashes);
    }
    assert!(crashes.is_empty(), "panicking inputs saved: {crashes:?}");
}

#[test]
fn regressions_and_seeds_decode_without_panicking() {
    for (target, input) in REGRESSIONS {
        assert!(TARGETS.contains(target));
        exercise(target, input);
    }
    for target in TARGETS {
        for seed in seeds(target) {
            exercise(target, &seed);
        }
    }
}

#[test]
fn short() {
    run_all(3_000);
}

#[test]
#[ignore = "long: FUZZ_EXECS=1000000 cargo test --release --test it fuzz::long -- --ignored --nocapture"]
fn long() {
    let execs = std::env::var("FUZZ_EXECS").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    run_all(execs);
}
