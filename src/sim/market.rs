//! The simulated market: prices, trades and candles as a pure function of
//! `(seed, product, time)`.
//!
//! Nothing here keeps state between calls, so two requests at the same instant get the same
//! numbers, and a closed candle never changes. The price of a product at a millisecond `t` is its
//! base price moved by the sum of four piecewise-linear deviations (per day, hour, minute and
//! ten seconds). Each deviation interpolates between hashed anchor values at the period
//! boundaries, so one price costs eight hashes. All arithmetic is on integers counted in the
//! product's quote increment ("ticks"); a price becomes a [`Decimal`] only at the end, so it
//! always lies exactly on the increment.

use std::collections::HashMap;

use rust_decimal::Decimal;
use time::OffsetDateTime;

use crate::model::{Candle, Granularity, ProductId};

/// Samples per candle used for high and low (on top of the close), so that `ONE_DAY` costs the
/// same as `ONE_MINUTE`.
pub(crate) const SAMPLES_PER_CANDLE: i64 = 60;

/// Deviation levels: period in milliseconds, amplitude in parts per million, hash tag.
const LEVELS: [(i64, i64, u64); 4] =
    [(86_400_000, 80_000, 0xD1), (3_600_000, 15_000, 0x41), (60_000, 2_000, 0x61), (10_000, 300, 0x10)];

const PPM: i128 = 1_000_000;

/// The shortest deviation period: the price is linear between its boundaries.
const FINEST_PERIOD_MS: i64 = 10_000;

/// Scale of sizes and volumes (base increment 0.00000001).
const SIZE_SCALE: u32 = 8;

/// Well-known pairs: id, base price in ticks, ticks per unit as a power of ten, base name.
const WELL_KNOWN: [(&str, i64, u32, &str); 30] = [
    ("BTC-USD", 6_500_000, 2, "Bitcoin"),
    ("ETH-USD", 320_000, 2, "Ethereum"),
    ("SOL-USD", 15_000, 2, "Solana"),
    ("XRP-USD", 5_500, 4, "XRP"),
    ("DOGE-USD", 15_000, 5, "Dogecoin"),
    ("ADA-USD", 4_500, 4, "Cardano"),
    ("AVAX-USD", 3_500, 2, "Avalanche"),
    ("LINK-USD", 15_000, 3, "Chainlink"),
    ("DOT-USD", 7_000, 3, "Polkadot"),
    ("LTC-USD", 8_000, 2, "Litecoin"),
    ("BCH-USD", 45_000, 2, "Bitcoin Cash"),
    ("UNI-USD", 8_000, 3, "Uniswap"),
    ("ATOM-USD", 9_000, 3, "Cosmos"),
    ("XLM-USD", 110_000, 6, "Stellar"),
    ("ETC-USD", 2_700, 2, "Ethereum Classic"),
    ("FIL-USD", 6_000, 3, "Filecoin"),
    ("AAVE-USD", 9_500, 2, "Aave"),
    ("ALGO-USD", 2_000, 4, "Algorand"),
    ("NEAR-USD", 6_000, 3, "NEAR Protocol"),
    ("APT-USD", 900, 2, "Aptos"),
    ("ARB-USD", 10_000, 4, "Arbitrum"),
    ("OP-USD", 2_500, 3, "Optimism"),
    ("SHIB-USD", 2_500, 8, "Shiba Inu"),
    ("USDT-USD", 10_000, 4, "Tether"),
    ("BTC-USDC", 6_500_000, 2, "Bitcoin"),
    ("ETH-USDC", 320_000, 2, "Ethereum"),
    ("SOL-USDC", 15_000, 2, "Solana"),
    ("ETH-BTC", 5_000, 5, "Ethereum"),
    ("BTC-EUR", 6_000_000, 2, "Bitcoin"),
    ("ETH-EUR", 295_000, 2, "Ethereum"),
];

/// How many well-known pairs exist ([`SimProducts::Count`](super::SimProducts::Count) uses
/// them first).
pub(crate) const WELL_KNOWN_COUNT: usize = WELL_KNOWN.len();

/// The ids of `n` products: the well-known pairs first, then `X0001-USD`, `X0002-USD`, ...
pub(crate) fn generated_ids(n: usize) -> Vec<String> {
    let mut ids: Vec<String> = WELL_KNOWN.iter().take(n).map(|(id, ..)| (*id).to_string()).collect();
    for i in 1..=n.saturating_sub(WELL_KNOWN_COUNT) {
        ids.push(format!("X{i:04}-USD"));
    }
    ids
}

/// The static description of one simulated product.
#[derive(Debug, Clone)]
pub(crate) struct ProductSpec {
    /// The product id.
    pub(crate) id: ProductId,
    /// Hash key of the price series; `X-USDC` shares the series of `X-USD`, as on Coinbase.
    series: u64,
    /// Base price in ticks.
    base_ticks: i64,
    /// The quote increment is `10^-scale`.
    pub(crate) scale: u32,
    /// Human-readable name of the base currency.
    pub(crate) base_name: String,
    /// Human-readable name of the quote currency.
    pub(crate) quote_name: String,
    /// Base volume per minute, in units of `10^-SIZE_SCALE`.
    volume_per_minute: i128,
}

impl ProductSpec {
    /// The quote increment as a decimal (`0.01`).
    pub(crate) fn quote_increment(&self) -> Decimal {
        Decimal::new(1, self.scale)
    }
}

/// The deterministic market of a [`SimExchange`](super::SimExchange).
#[derive(Debug, Clone)]
pub(crate) struct Market {
    seed: u64,
    products: Vec<ProductSpec>,
    index: HashMap<String, usize>,
}

impl Market {
    /// A market of the distinct `ids`, in order, whose prices derive from `seed`.
    pub(crate) fn new(seed: u64, ids: &[ProductId]) -> Self {
        let mut products = Vec::with_capacity(ids.len());
        let mut index = HashMap::with_capacity(ids.len());
        for id in ids {
            if index.contains_key(id.as_str()) {
                continue;
            }
            index.insert(id.as_str().to_string(), products.len());
            products.push(spec_for(seed, id));
        }
        Market { seed, products, index }
    }

    /// Every product, in configuration order.
    pub(crate) fn products(&self) -> &[ProductSpec] {
        &self.products
    }

    /// The product with id `id`, if listed.
    pub(crate) fn get(&self, id: &str) -> Option<&ProductSpec> {
        self.index.get(id).and_then(|&i| self.products.get(i))
    }

    fn hash(&self, p: &ProductSpec, tag: u64, k: i64) -> u64 {
        mix(mix(mix(self.seed, p.series), tag), k as u64)
    }

    /// The price deviation in parts per million at millisecond `ms`.
    fn deviation_ppm(&self, p: &ProductSpec, ms: i64) -> i128 {
        LEVELS
            .iter()
            .map(|&(period, amplitude, tag)| {
                let k = ms.div_euclid(period);
                let offset = i128::from(ms.rem_euclid(period));
                let a = i128::from(uniform(self.hash(p, tag, k), amplitude));
                let b = i128::from(uniform(self.hash(p, tag, k.saturating_add(1)), amplitude));
                a + ((b - a) * offset).div_euclid(i128::from(period))
            })
            .sum()
    }

    /// The price at UNIX millisecond `ms`, in ticks (always at least 100 ticks, so the bid one
    /// tick below stays positive).
    pub(crate) fn price_ticks(&self, p: &ProductSpec, ms: i64) -> i128 {
        let dev = self.deviation_ppm(p, ms);
        (i128::from(p.base_ticks) * (PPM + dev)).div_euclid(PPM).max(100)
    }

    /// The price at UNIX millisecond `ms`, on the quote increment.
    pub(crate) fn price(&self, p: &ProductSpec, ms: i64) -> Decimal {
        ticks_to_decimal(self.price_ticks(p, ms), p.scale)
    }

    /// The price at `t`.
    pub(crate) fn price_at(&self, p: &ProductSpec, t: OffsetDateTime) -> Decimal {
        self.price(p, unix_ms(t))
    }

    /// `(best_bid, best_ask)` at millisecond `ms`: the last trade (the price) lies inside the
    /// book but, as on a real exchange, rarely at its mid: each side sits 1 to 4 increments
    /// away, drawn per product and second, so `mid != last` in most seconds.
    pub(crate) fn bid_ask(&self, p: &ProductSpec, ms: i64) -> (Decimal, Decimal) {
        let ticks = self.price_ticks(p, ms);
        let (below, above) = self.spread_ticks(p, ms);
        (ticks_to_decimal((ticks - below).max(1), p.scale), ticks_to_decimal(ticks + above, p.scale))
    }

    /// Increments from the last trade to the best bid and to the best ask, each in `1..=4`.
    fn spread_ticks(&self, p: &ProductSpec, ms: i64) -> (i128, i128) {
        let h = self.hash(p, 0x5B, ms.div_euclid(1000));
        (i128::from(h % 4 + 1), i128::from((h >> 8) % 4 + 1))
    }

    /// A size (base units) for trade or book level `k` at `ms`: a small share of a minute's
    /// volume, never zero.
    pub(crate) fn size(&self, p: &ProductSpec, tag: u64, ms: i64, k: u64) -> Decimal {
        let h = mix(self.hash(p, tag, ms), k);
        let share = i128::from(h % 200 + 1); // 0.05% .. 10% of a minute's volume
        let units = (p.volume_per_minute * share / 2_000).max(1);
        units_to_decimal(units, SIZE_SCALE)
    }

    /// Whether trade `k` at `ms` was a buy.
    pub(crate) fn is_buy(&self, p: &ProductSpec, ms: i64, k: u64) -> bool {
        mix(self.hash(p, 0x7D, ms), k) & 1 == 0
    }

    /// Jitter in `0..1000` ms for trade `k` at `ms`, so older trades do not sit on a grid.
    pub(crate) fn trade_gap_ms(&self, p: &ProductSpec, ms: i64, k: u64) -> i64 {
        (mix(self.hash(p, 0x7E, ms), k) % 1000) as i64
    }

    /// The base volume of the candle of `granularity` starting at UNIX second `start`, as of
    /// millisecond `now_ms` (the candle in progress gets the elapsed share).
    fn candle_volume(&self, p: &ProductSpec, g: Granularity, start: i64, now_ms: i64) -> Decimal {
        let factor = i128::from(self.hash(p, 0xB0 ^ g.seconds() as u64, start) % 101 + 50);
        let full = p.volume_per_minute * i128::from(g.seconds() / 60) * factor / 100;
        let len_ms = i128::from(g.seconds()) * 1000;
        let elapsed = (i128::from(now_ms) - i128::from(start) * 1000).clamp(0, len_ms);
        units_to_decimal(full * elapsed / len_ms, SIZE_SCALE)
    }

    /// The base volume traded in the 24 hours before `ms`, and the same one day earlier.
    pub(crate) fn volume_24h(&self, p: &ProductSpec, ms: i64) -> (Decimal, Decimal) {
        let day = ms.div_euclid(86_400_000);
        let vol = |d: i64| {
            let factor = i128::from(self.hash(p, 0x24, d) % 101 + 50);
            units_to_decimal(p.volume_per_minute * 1440 * factor / 100, SIZE_SCALE)
        };
        (vol(day), vol(day - 1))
    }

    /// The candle of `g` starting at UNIX second `start`, as seen at millisecond `now_ms`;
    /// `None` when it has not started yet or `start` is not a valid time.
    ///
    /// One and five minutes: open = price at the start; close = price at the last millisecond
    /// of the bucket once it has closed, else the current price; high and low over the price
    /// path's ten-second boundaries no later than the close, plus the close; a hashed volume.
    /// Every longer granularity is the exact aggregate of its five-minute candles (open of the
    /// first, close of the last, highest high, lowest low, summed volume), as an exchange's
    /// candles built from one trade history are: a client that derives an hour from the
    /// five-minute candles it was pushed gets what REST answers for that hour.
    pub(crate) fn candle(&self, p: &ProductSpec, g: Granularity, start: i64, now_ms: i64) -> Option<Candle> {
        let five = Granularity::FiveMinute;
        if g.seconds() <= five.seconds() || g.seconds() % five.seconds() != 0 {
            return self.sampled_candle(p, g, start, now_ms);
        }
        let start_ms = start.checked_mul(1000)?;
        if start_ms > now_ms {
            return None;
        }
        let mut out: Option<Candle> = None;
        let mut b = start;
        while b < start + g.seconds() && b.checked_mul(1000)? <= now_ms {
            let c = self.sampled_candle(p, five, b, now_ms)?;
            out = Some(match out {
                None => c,
                Some(a) => Candle {
                    start: a.start,
                    open: a.open,
                    high: a.high.max(c.high),
                    low: a.low.min(c.low),
                    close: c.close,
                    volume: a.volume + c.volume,
                },
            });
            b += five.seconds();
        }
        out
    }

    /// The candle of `g` computed from the price path directly (see [`candle`](Self::candle));
    /// at one hour and longer high and low come from [`SAMPLES_PER_CANDLE`] evenly spaced
    /// samples. What the one- and five-minute candles are, and cheap enough for the ticker's
    /// 24-hour high and low.
    pub(crate) fn sampled_candle(
        &self,
        p: &ProductSpec,
        g: Granularity,
        start: i64,
        now_ms: i64,
    ) -> Option<Candle> {
        let start_ms = start.checked_mul(1000)?;
        if start_ms > now_ms {
            return None;
        }
        let len_ms = g.seconds() * 1000;
        let close_ms = (start_ms + len_ms - 1).min(now_ms);
        // The price path is piecewise linear between ten-second boundaries, so up to an hour
        // every boundary is sampled and high/low are the path's own extremes (to a tick of
        // rounding): a live candle patched from prices in between stays inside them. Longer
        // buckets take SAMPLES_PER_CANDLE samples.
        let (step, samples) = if len_ms <= 3_600_000 {
            (FINEST_PERIOD_MS, len_ms / FINEST_PERIOD_MS)
        } else {
            (len_ms / SAMPLES_PER_CANDLE, SAMPLES_PER_CANDLE)
        };
        let open = self.price_ticks(p, start_ms);
        let close = self.price_ticks(p, close_ms);
        let (mut high, mut low) = (open.max(close), open.min(close));
        for k in 1..samples {
            let t = start_ms + k * step;
            if t > close_ms {
                break;
            }
            let px = self.price_ticks(p, t);
            high = high.max(px);
            low = low.min(px);
        }
        Some(Candle {
            start: OffsetDateTime::from_unix_timestamp(start).ok()?,
            open: ticks_to_decimal(open, p.scale),
            high: ticks_to_decimal(high, p.scale),
            low: ticks_to_decimal(low, p.scale),
            close: ticks_to_decimal(close, p.scale),
            volume: self.candle_volume(p, g, start, now_ms),
        })
    }
}

fn spec_for(seed: u64, id: &ProductId) -> ProductSpec {
    let series = fnv1a(id.book_id().as_str().as_bytes());
    let known = WELL_KNOWN.iter().find(|(k, ..)| *k == id.as_str());
    let (base_ticks, scale, base_name) = match known {
        Some(&(_, ticks, scale, name)) => (ticks, scale, name.to_string()),
        None => {
            let h = mix(seed ^ 0x5EED, series);
            if id.quote() == "BTC" || id.quote() == "ETH" {
                // 0.00100000 .. 0.10000000
                ((h % 9_900_000) as i64 + 100_000, 8, id.base().to_string())
            } else {
                // 0.5000 .. 500.0000
                ((h % 4_995_000) as i64 + 5_000, 4, id.base().to_string())
            }
        }
    };
    let quote_name = match id.quote() {
        "USD" => "US Dollar",
        "USDC" => "USDC",
        "USDT" => "Tether",
        "EUR" => "Euro",
        "GBP" => "British Pound",
        "BTC" => "Bitcoin",
        "ETH" => "Ethereum",
        other => other,
    }
    .to_string();
    // A minute trades 2,000 to 60,000 quote units: volume = target / base price.
    let target = i128::from(mix(seed ^ 0x701, series) % 58_001 + 2_000);
    let volume_per_minute =
        (target * 10i128.pow(scale) * 10i128.pow(SIZE_SCALE) / i128::from(base_ticks.max(1))).max(1);
    ProductSpec { id: id.clone(), series, base_ticks, scale, base_name, quote_name, volume_per_minute }
}

/// `t` as UNIX milliseconds (floored).
pub(crate) fn unix_ms(t: OffsetDateTime) -> i64 {
    let ms = t.unix_timestamp_nanos().div_euclid(1_000_000);
    i64::try_from(ms).unwrap_or(if ms < 0 { i64::MIN } else { i64::MAX })
}

fn ticks_to_decimal(ticks: i128, scale: u32) -> Decimal {
    units_to_decimal(ticks, scale)
}

fn units_to_decimal(units: i128, scale: u32) -> Decimal {
    Decimal::try_from_i128_with_scale(units, scale).unwrap_or(Decimal::MAX)
}

/// A value in `[-amplitude, amplitude]` from a hash.
fn uniform(h: u64, amplitude: i64) -> i64 {
    let span = (2 * amplitude + 1) as u64;
    (h % span) as i64 - amplitude
}

/// splitmix64 finalizer.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Combine two values into one well-mixed hash.
pub(crate) fn mix(a: u64, b: u64) -> u64 {
    splitmix(a ^ splitmix(b))
}

/// FNV-1a, stable across Rust versions (unlike `DefaultHasher`).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn market(seed: u64) -> Market {
        let ids: Vec<ProductId> = generated_ids(40).iter().map(|s| s.parse().unwrap()).collect();
        Market::new(seed, &ids)
    }

    #[test]
    fn ids_are_valid_and_distinct() {
        let ids = generated_ids(10_050);
        assert_eq!(ids.len(), 10_050);
        assert_eq!(ids[0], "BTC-USD");
        assert_eq!(ids[30], "X0001-USD");
        assert_eq!(ids[10_049], "X10020-USD");
        let set: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(set.len(), ids.len());
        for id in &ids {
            ProductId::new(id).unwrap();
        }
        assert_eq!(generated_ids(3), ["BTC-USD", "ETH-USD", "SOL-USD"]);
        assert!(generated_ids(0).is_empty());
    }

    #[test]
    fn prices_are_deterministic_positive_and_on_the_increment() {
        let (a, b, c) = (market(7), market(7), market(8));
        let t0 = unix_ms(datetime!(2024-04-24 09:56:38.123 UTC));
        let (mut differs, mut mid_differs) = (false, false);
        for p in a.products() {
            let q = b.get(p.id.as_str()).unwrap();
            for k in 0..50 {
                let ms = t0 + k * 7_777;
                let px = a.price(p, ms);
                assert_eq!(px, b.price(q, ms));
                assert!(px > Decimal::ZERO);
                assert_eq!(px.scale(), p.scale, "{} {px}", p.id);
                assert_eq!(px % p.quote_increment(), Decimal::ZERO);
                let (bid, ask) = a.bid_ask(p, ms);
                assert!(bid < px && px < ask, "the last trade lies inside the book");
                assert!(ask - bid <= p.quote_increment() * Decimal::from(8));
                mid_differs |= (bid + ask) / Decimal::TWO != px;
                assert!(bid > Decimal::ZERO);
            }
            differs |= a.price(p, t0) != c.price(c.get(p.id.as_str()).unwrap(), t0);
        }
        assert!(differs, "another seed gives other prices");
        assert!(mid_differs, "the mid is not the last trade");
    }

    #[test]
    fn price_stays_within_ten_percent_of_base() {
        let m = market(1);
        let btc = m.get("BTC-USD").unwrap();
        for k in 0..2_000 {
            let px = m.price_ticks(btc, k * 3_600_123);
            assert!((5_850_000..=7_150_000).contains(&px), "{px}");
        }
    }

    #[test]
    fn usdc_pairs_follow_their_usd_sibling() {
        let m = market(3);
        let (usd, usdc) = (m.get("BTC-USD").unwrap(), m.get("BTC-USDC").unwrap());
        for k in 0..20 {
            assert_eq!(m.price(usd, k * 61_000), m.price(usdc, k * 61_000));
        }
    }

    #[test]
    fn interpolation_is_continuous() {
        // Adjacent milliseconds never jump by more than a few ppm of the price.
        let m = market(11);
        let eth = m.get("ETH-USD").unwrap();
        let start = unix_ms(datetime!(2024-01-01 00:00 UTC)) - 5;
        for ms in start..start + 10 {
            let d = m.price_ticks(eth, ms + 1) - m.price_ticks(eth, ms);
            assert!(d.abs() <= 2, "{d}");
        }
    }

    #[test]
    fn closed_candles_do_not_change_and_bound_open_close() {
        let m = market(5);
        let p = m.get("SOL-USD").unwrap();
        let start = datetime!(2024-04-24 09:00 UTC).unix_timestamp();
        for g in Granularity::ALL {
            let closed_at = (start + g.seconds()) * 1000;
            let c1 = m.candle(p, g, start, closed_at).unwrap();
            let c2 = m.candle(p, g, start, closed_at + 86_400_000).unwrap();
            assert_eq!(c1, c2, "{g}");
            assert!(c1.high >= c1.open.max(c1.close) && c1.low <= c1.open.min(c1.close));
            assert!(c1.volume > Decimal::ZERO);
            assert_eq!(c1.open, m.price(p, start * 1000));
            assert_eq!(c1.close, m.price(p, closed_at - 1));
        }
    }

    #[test]
    fn candle_in_progress_closes_at_the_current_price() {
        let m = market(5);
        let p = m.get("BTC-USD").unwrap();
        let start = datetime!(2024-04-24 09:00 UTC).unix_timestamp();
        let now = start * 1000 + 1_234_567;
        let c = m.candle(p, Granularity::OneHour, start, now).unwrap();
        assert_eq!(c.close, m.price(p, now));
        let full = m.candle(p, Granularity::OneHour, start, start * 1000 + 3_600_000).unwrap();
        assert!(c.volume < full.volume);
        assert!(m.candle(p, Granularity::OneHour, start + 3600, now).is_none(), "future");
        assert!(m.candle(p, Granularity::OneHour, i64::MAX, now).is_none());
    }

    /// Issue 18: a longer candle is the exact aggregate of its five-minute candles, closed or
    /// in progress, so candles derived from a push feed equal REST's.
    #[test]
    fn longer_candles_aggregate_the_five_minute_ones_exactly() {
        let m = market(5);
        let p = m.get("ETH-USD").unwrap();
        let five = Granularity::FiveMinute;
        let start = datetime!(2024-04-24 00:00 UTC).unix_timestamp();
        for (g, now) in [
            (Granularity::FifteenMinute, start * 1000 + 900_000),
            (Granularity::OneHour, start * 1000 + 3_600_000),
            (Granularity::OneHour, start * 1000 + 1_234_567),
            (Granularity::SixHour, start * 1000 + 3 * 3_600_000 + 17),
            (Granularity::OneDay, start * 1000 + 86_400_000),
        ] {
            let c = m.candle(p, g, start, now).unwrap();
            let parts: Vec<Candle> =
                (0..g.seconds() / 300).map_while(|k| m.candle(p, five, start + 300 * k, now)).collect();
            assert_eq!(c.open, parts[0].open, "{g:?}");
            assert_eq!(c.close, parts.last().unwrap().close, "{g:?}");
            assert_eq!(c.high, parts.iter().map(|c| c.high).max().unwrap(), "{g:?}");
            assert_eq!(c.low, parts.iter().map(|c| c.low).min().unwrap(), "{g:?}");
            assert_eq!(c.volume, parts.iter().map(|c| c.volume).sum::<Decimal>(), "{g:?}");
        }
    }

    #[test]
    fn sizes_are_positive_and_deterministic() {
        let m = market(9);
        for p in m.products() {
            let s = m.size(p, 1, 1_000, 3);
            assert!(s > Decimal::ZERO);
            assert_eq!(s, m.size(p, 1, 1_000, 3));
            let (v, prev) = m.volume_24h(p, 1_700_000_000_000);
            assert!(v > Decimal::ZERO && prev > Decimal::ZERO);
        }
    }

    #[test]
    fn unknown_ids_get_a_generated_spec() {
        let ids: Vec<ProductId> =
            ["FOO-BAR", "FOO-BTC", "FOO-BAR"].iter().map(|s| s.parse().unwrap()).collect();
        let m = Market::new(1, &ids);
        assert_eq!(m.products().len(), 2, "duplicates are dropped");
        let foo = m.get("FOO-BAR").unwrap();
        assert_eq!(foo.scale, 4);
        assert!(m.price(foo, 0) >= Decimal::new(4, 1));
        assert_eq!(m.get("FOO-BTC").unwrap().scale, 8);
        assert_eq!(m.products()[1].id.as_str(), "FOO-BTC");
        assert!(m.get("NOPE-USD").is_none());
    }
}
