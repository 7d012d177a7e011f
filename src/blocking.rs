//! A blocking facade for hosts without async (the seed system ran its bots in Celery-style
//! worker threads).
//!
//! [`BlockingSource`] owns a small tokio runtime and drives any [`MarketDataSource`] on it.
//! Build the source inside [`BlockingSource::new`]'s closure so that everything it spawns
//! (batch timers, single-flight fetches) lives on that runtime.
//!
//! **Caveat:** a blocking call parks the calling thread. Calling one from inside an async
//! runtime would stall that runtime's worker, so it is refused with [`Error::Config`] instead;
//! async code should use the async API directly.

use std::{fmt, future::Future, sync::Arc};

use rust_decimal::Decimal;

use crate::{
    error::{Error, Result},
    evaluator::{BatchEvaluator, Bot, TickReport},
    model::{Account, Candle, CandleRange, Granularity, ProductId, Ticker},
    source::MarketDataSource,
};

/// A [`MarketDataSource`] with blocking methods, on a runtime of its own.
///
/// ```
/// use tickshare::{blocking::BlockingSource, CoordinatedSource, MarketDataSource, sim::SimExchange};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // The simulated exchange runs on the facade's runtime too.
/// let (source, sim) = BlockingSource::new_with(|| async {
///     let sim = SimExchange::builder().start().await?;
///     let source: std::sync::Arc<dyn MarketDataSource> =
///         std::sync::Arc::new(CoordinatedSource::coinbase(sim.client()?).build()?);
///     Ok::<_, tickshare::Error>((source, sim))
/// })?;
/// let btc = source.ticker(&"BTC-USD".parse()?)?;
/// assert!(btc.price > tickshare::Decimal::ZERO);
/// # drop(sim); Ok(()) }
/// ```
pub struct BlockingSource {
    runtime: Arc<tokio::runtime::Runtime>,
    source: Arc<dyn MarketDataSource>,
}

impl fmt::Debug for BlockingSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockingSource").finish_non_exhaustive()
    }
}

fn not_in_runtime() -> Result<()> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(Error::Config(
            "a blocking tickshare call was made from inside an async runtime; use the async API there".into(),
        ));
    }
    Ok(())
}

impl BlockingSource {
    /// Start a runtime (two worker threads) and build the source on it with `make`.
    ///
    /// # Errors
    /// [`Error::Config`] when called inside an async runtime or when the runtime cannot start;
    /// whatever `make` returns.
    pub fn new<F, Fut>(make: F) -> Result<Self>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Arc<dyn MarketDataSource>>>,
    {
        Self::new_with(|| async { make().await.map(|s| (s, ())) }).map(|(s, ())| s)
    }

    /// As [`new`](Self::new), for a `make` that also returns something to keep (a simulated
    /// exchange, a selector, ...).
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn new_with<F, Fut, T>(make: F) -> Result<(Self, T)>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(Arc<dyn MarketDataSource>, T)>>,
    {
        not_in_runtime()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tickshare-blocking")
            .enable_all()
            .build()
            .map_err(|e| Error::Config(format!("could not start a runtime: {e}")))?;
        let (source, extra) = runtime.block_on(make())?;
        Ok((BlockingSource { runtime: Arc::new(runtime), source }, extra))
    }

    fn run<T>(&self, fut: impl Future<Output = Result<T>>) -> Result<T> {
        not_in_runtime()?;
        self.runtime.block_on(fut)
    }

    /// See [`MarketDataSource::ticker`].
    ///
    /// # Errors
    /// As the async method, or [`Error::Config`] inside a runtime.
    pub fn ticker(&self, product: &ProductId) -> Result<Ticker> {
        self.run(self.source.ticker(product))
    }

    /// See [`MarketDataSource::tickers`].
    ///
    /// # Errors
    /// As the async method, or [`Error::Config`] inside a runtime.
    pub fn tickers(&self, products: &[ProductId]) -> Result<Vec<Ticker>> {
        self.run(self.source.tickers(products))
    }

    /// See [`MarketDataSource::candles`].
    ///
    /// # Errors
    /// As the async method, or [`Error::Config`] inside a runtime.
    pub fn candles(
        &self,
        product: &ProductId,
        granularity: Granularity,
        range: CandleRange,
    ) -> Result<Vec<Candle>> {
        self.run(self.source.candles(product, granularity, range))
    }

    /// See [`MarketDataSource::accounts`].
    ///
    /// # Errors
    /// As the async method, or [`Error::Config`] inside a runtime.
    pub fn accounts(&self) -> Result<Vec<Account>> {
        self.run(self.source.accounts())
    }

    /// See [`MarketDataSource::validate_trade_balance`].
    ///
    /// # Errors
    /// As the async method, or [`Error::Config`] inside a runtime.
    pub fn validate_trade_balance(&self, currency: &str, amount: Decimal) -> Result<bool> {
        self.run(self.source.validate_trade_balance(currency, amount))
    }

    /// Evaluate `bots` once on a snapshot from this source.
    ///
    /// # Errors
    /// [`Error::Config`] inside a runtime.
    pub fn evaluate_all(&self, bots: &[Bot]) -> Result<TickReport> {
        let eval = BatchEvaluator::new(Arc::clone(&self.source));
        self.run(async { Ok(eval.evaluate_all(bots).await) })
    }

    /// The async source behind the facade.
    pub fn source(&self) -> &Arc<dyn MarketDataSource> {
        &self.source
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MockMarketDataSource;

    #[test]
    fn drives_an_async_source_from_plain_threads() {
        let facade = BlockingSource::new(|| async {
            let mut mock = MockMarketDataSource::new();
            mock.expect_accounts().returning(|| Ok(vec![]));
            Ok(Arc::new(mock) as Arc<dyn MarketDataSource>)
        })
        .unwrap();
        let facade = Arc::new(facade);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let f = Arc::clone(&facade);
                std::thread::spawn(move || f.accounts().map(|a| a.len()))
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap().unwrap(), 0);
        }
    }

    #[tokio::test]
    async fn refuses_inside_a_runtime_instead_of_panicking() {
        let r = BlockingSource::new(|| async { Err::<Arc<dyn MarketDataSource>, _>(Error::Timeout) });
        assert!(matches!(r, Err(Error::Config(_))));
    }
}
