//! Strategies: synchronous decisions over a read-only market view.
//!
//! Evaluation is CPU work, so [`Strategy::evaluate`] is a plain function: the
//! [`BatchEvaluator`](crate::BatchEvaluator) fetches the data once per tick and then calls it
//! for every bot. The two strategies here are examples of the trait, not the point of the
//! crate.

use std::fmt;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::{
    coordinated::CandleMarks,
    model::{Balances, Candle, Ticker},
};

/// What a bot wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// Open or add to a position.
    Buy,
    /// Close or reduce a position.
    Sell,
    /// Do nothing.
    Hold,
}

/// A signal and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The signal.
    pub signal: Signal,
    /// A short human-readable reason.
    pub reason: String,
}

impl Decision {
    /// A decision with a reason.
    pub fn new(signal: Signal, reason: impl Into<String>) -> Self {
        Decision { signal, reason: reason.into() }
    }

    /// Hold, with a reason.
    pub fn hold(reason: impl Into<String>) -> Self {
        Decision::new(Signal::Hold, reason)
    }
}

/// What a strategy sees: the product's ticker, its candles (oldest first, at most the bot's
/// lookback; the last one may be in progress), the balances, and whether the bot's order size
/// is affordable in the quote currency.
#[derive(Debug, Clone, Copy)]
pub struct MarketView<'a> {
    /// The latest ticker.
    pub ticker: &'a Ticker,
    /// Candles, oldest first.
    pub candles: &'a [Candle],
    /// Balances by currency.
    pub balances: &'a Balances,
    /// Whether the bot's order size is available in the quote currency.
    pub can_afford: bool,
    /// How exact the last candles are: a patched candle in progress or a provisional closed
    /// one is marked here (default: nothing known, as from a source that tracks neither).
    pub marks: CandleMarks,
}

/// A trading strategy.
pub trait Strategy: Send + Sync + fmt::Debug {
    /// A short name for reports.
    fn name(&self) -> &str;

    /// Decide on one view. Must not block or do I/O.
    fn evaluate(&self, view: &MarketView<'_>) -> Decision;
}

/// Simple moving averages of the closes: buy when the fast average is above the slow one (and
/// the order is affordable), sell when below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovingAverageCrossover {
    /// Candles in the fast average.
    pub fast: usize,
    /// Candles in the slow average.
    pub slow: usize,
}

impl Default for MovingAverageCrossover {
    fn default() -> Self {
        MovingAverageCrossover { fast: 5, slow: 20 }
    }
}

fn sma(candles: &[Candle], n: usize) -> Option<Decimal> {
    if n == 0 || candles.len() < n {
        return None;
    }
    let sum: Decimal = candles[candles.len() - n..].iter().map(|c| c.close).sum();
    Some(sum / Decimal::from(n))
}

impl Strategy for MovingAverageCrossover {
    fn name(&self) -> &str {
        "ma_crossover"
    }

    fn evaluate(&self, view: &MarketView<'_>) -> Decision {
        let (Some(fast), Some(slow)) = (sma(view.candles, self.fast), sma(view.candles, self.slow)) else {
            return Decision::hold(format!(
                "need {} candles, have {}",
                self.slow.max(self.fast),
                view.candles.len()
            ));
        };
        if fast > slow {
            if view.can_afford {
                Decision::new(
                    Signal::Buy,
                    format!(
                        "SMA{} {} above SMA{} {}",
                        self.fast,
                        fast.round_dp(8),
                        self.slow,
                        slow.round_dp(8)
                    ),
                )
            } else {
                Decision::hold("bullish crossover but the order size is not affordable")
            }
        } else if fast < slow {
            Decision::new(
                Signal::Sell,
                format!("SMA{} {} below SMA{} {}", self.fast, fast.round_dp(8), self.slow, slow.round_dp(8)),
            )
        } else {
            Decision::hold("averages equal")
        }
    }
}

/// Relative strength index (simple average of gains and losses over `period` closes): buy below
/// `oversold`, sell above `overbought`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RsiThreshold {
    /// Closes compared (the RSI needs `period + 1` candles).
    pub period: usize,
    /// Buy below this RSI (0..100).
    pub oversold: Decimal,
    /// Sell above this RSI (0..100).
    pub overbought: Decimal,
}

impl Default for RsiThreshold {
    fn default() -> Self {
        RsiThreshold { period: 14, oversold: Decimal::from(30), overbought: Decimal::from(70) }
    }
}

/// RSI over the last `period` close-to-close changes, 0..=100.
pub fn rsi(candles: &[Candle], period: usize) -> Option<Decimal> {
    if period == 0 || candles.len() < period + 1 {
        return None;
    }
    let tail = &candles[candles.len() - period - 1..];
    let (mut gain, mut loss) = (Decimal::ZERO, Decimal::ZERO);
    for w in tail.windows(2) {
        let d = w[1].close - w[0].close;
        if d.is_sign_positive() { gain += d } else { loss -= d }
    }
    if loss.is_zero() {
        return Some(if gain.is_zero() { Decimal::from(50) } else { Decimal::ONE_HUNDRED });
    }
    let rs = gain / loss;
    Some(Decimal::ONE_HUNDRED - Decimal::ONE_HUNDRED / (Decimal::ONE + rs))
}

impl Strategy for RsiThreshold {
    fn name(&self) -> &str {
        "rsi_threshold"
    }

    fn evaluate(&self, view: &MarketView<'_>) -> Decision {
        let Some(r) = rsi(view.candles, self.period) else {
            return Decision::hold(format!("need {} candles, have {}", self.period + 1, view.candles.len()));
        };
        let r = r.round_dp(2);
        if r < self.oversold {
            if view.can_afford {
                Decision::new(Signal::Buy, format!("RSI{} {r} below {}", self.period, self.oversold))
            } else {
                Decision::hold(format!(
                    "RSI{} {r} oversold but the order size is not affordable",
                    self.period
                ))
            }
        } else if r > self.overbought {
            Decision::new(Signal::Sell, format!("RSI{} {r} above {}", self.period, self.overbought))
        } else {
            Decision::hold(format!("RSI{} {r} within {}..{}", self.period, self.oversold, self.overbought))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ProductId;
    use time::OffsetDateTime;

    fn candles(closes: &[i64]) -> Vec<Candle> {
        closes
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let d = Decimal::from(*c);
                Candle {
                    start: OffsetDateTime::UNIX_EPOCH + time::Duration::minutes(i as i64),
                    open: d,
                    high: d,
                    low: d,
                    close: d,
                    volume: Decimal::ONE,
                }
            })
            .collect()
    }

    fn view<'a>(t: &'a Ticker, c: &'a [Candle], b: &'a Balances, afford: bool) -> MarketView<'a> {
        MarketView { ticker: t, candles: c, balances: b, can_afford: afford, marks: CandleMarks::default() }
    }

    fn ticker() -> Ticker {
        let p: ProductId = "BTC-USD".parse().unwrap();
        Ticker {
            product: p,
            price: Decimal::ONE,
            best_bid: None,
            best_ask: None,
            time: OffsetDateTime::UNIX_EPOCH,
            price_kind: crate::model::PriceKind::LastTrade,
        }
    }

    #[test]
    fn crossover() {
        let s = MovingAverageCrossover { fast: 2, slow: 4 };
        let (t, b) = (ticker(), Balances::default());
        let up = candles(&[1, 2, 3, 4, 5]);
        assert_eq!(s.evaluate(&view(&t, &up, &b, true)).signal, Signal::Buy);
        assert_eq!(s.evaluate(&view(&t, &up, &b, false)).signal, Signal::Hold);
        let down = candles(&[5, 4, 3, 2, 1]);
        assert_eq!(s.evaluate(&view(&t, &down, &b, true)).signal, Signal::Sell);
        let short = candles(&[1, 2]);
        assert_eq!(s.evaluate(&view(&t, &short, &b, true)).signal, Signal::Hold);
    }

    #[test]
    fn rsi_values_and_thresholds() {
        assert_eq!(rsi(&candles(&[1, 2, 3, 4]), 3), Some(Decimal::ONE_HUNDRED));
        assert_eq!(rsi(&candles(&[4, 3, 2, 1]), 3), Some(Decimal::ZERO));
        assert_eq!(rsi(&candles(&[1, 1, 1, 1]), 3), Some(Decimal::from(50)));
        // gains 2, losses 1 -> RS 2 -> RSI 66.67
        assert_eq!(rsi(&candles(&[10, 12, 11, 11]), 3).unwrap().round_dp(2), Decimal::new(6667, 2));
        assert_eq!(rsi(&candles(&[1]), 3), None);
        let s = RsiThreshold { period: 3, ..Default::default() };
        let (t, b) = (ticker(), Balances::default());
        assert_eq!(s.evaluate(&view(&t, &candles(&[4, 3, 2, 1]), &b, true)).signal, Signal::Buy);
        assert_eq!(s.evaluate(&view(&t, &candles(&[1, 2, 3, 4]), &b, true)).signal, Signal::Sell);
        assert_eq!(s.evaluate(&view(&t, &candles(&[10, 12, 11, 11]), &b, true)).signal, Signal::Hold);
    }
}
