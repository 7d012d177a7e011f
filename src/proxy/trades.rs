//! The recent-trades cache behind the ticker route: a product's trades as the exchange
//! answered them (trade ids, sizes, sides), one fetch per product and freshness window,
//! whatever the number of clients asking.
//!
//! An entry holds the answer to the largest `limit` asked for recently, so a client asking for
//! one trade (ccxt's `fetch_ticker`) and another asking for a hundred (`fetch_trades`) share a
//! fetch; a smaller `limit` is served by truncating the cached list, which is what the exchange
//! would have answered at the time (most recent first). Unknown products are remembered like
//! answers, so a client asking for one again and again does not reach the exchange each time.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use super::forward::Forwarder;
use crate::{
    coinbase::CoinbaseClient,
    coordinated::coalesce::SingleFlight,
    error::{Error, Result},
    model::{ProductId, RecentTrades},
};

/// The most trades the cache holds in all (the weigher counts one per trade, plus one per
/// entry): 200,000 trades of about 150 bytes each, some 30 MiB at worst.
const MAX_CACHED_TRADES: u64 = 200_000;

/// One product's cached answer.
#[derive(Debug)]
struct Entry {
    fetched: Instant,
    /// The `limit` it answered.
    limit: u32,
    /// `None`: the exchange said the product does not exist.
    answer: Option<Arc<RecentTrades>>,
}

/// See the [module docs](self).
pub(super) struct TradesCache {
    ttl: Duration,
    max_stale: Duration,
    entries: moka::future::Cache<ProductId, Arc<Entry>>,
    flight: Arc<SingleFlight<(ProductId, u32), Arc<Entry>>>,
}

impl std::fmt::Debug for TradesCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TradesCache")
            .field("ttl", &self.ttl)
            .field("entries", &self.entries.entry_count())
            .finish()
    }
}

/// A served answer: the cached trades, of which the caller shows the first `limit`.
pub(super) struct Served {
    pub(super) trades: Arc<RecentTrades>,
    /// How many calls reached the exchange for it (0 for a hit or a joined flight).
    pub(super) fetched: bool,
}

impl TradesCache {
    /// Answers stay fresh for `ttl`; past it, a failed refresh still serves an answer up to
    /// `max_stale` old (the coordinated source's stale contract).
    pub(super) fn new(ttl: Duration, max_stale: Duration) -> Self {
        let entries = moka::future::Cache::builder()
            .max_capacity(MAX_CACHED_TRADES)
            .weigher(|_: &ProductId, e: &Arc<Entry>| {
                u32::try_from(e.answer.as_ref().map_or(0, |a| a.trades.len()))
                    .unwrap_or(u32::MAX)
                    .saturating_add(1)
            })
            .time_to_live(ttl.saturating_add(max_stale).max(Duration::from_millis(1)))
            .build();
        TradesCache { ttl, max_stale, entries, flight: SingleFlight::new() }
    }

    /// The recent trades of `product`, at least `limit` of them when the exchange has that many.
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown product (remembered for `ttl`); the client's errors
    /// when no answer at most `max_stale` old is cached.
    pub(super) async fn get(
        &self,
        client: &CoinbaseClient,
        forwarder: &Arc<Forwarder>,
        product: &ProductId,
        limit: u32,
    ) -> Result<Served> {
        let now = Instant::now();
        let cached = self.entries.get(product).await;
        if let Some(e) = &cached
            && now.saturating_duration_since(e.fetched) < self.ttl
            && (e.limit >= limit || e.answer.is_none())
        {
            return Self::serve(product, e, false);
        }
        // Fetch at least what was asked recently, so that the clients asking for more do not
        // make every refresh a miss for them.
        let want = cached.as_ref().map_or(limit, |e| e.limit.max(limit));
        let (client, entries, p) = (client.clone(), self.entries.clone(), product.clone());
        let forwarder = Arc::clone(forwarder);
        let (result, role) = self
            .flight
            .run((product.clone(), want), move || async move {
                let class = client.market_data_class();
                let answer = match forwarder.gated(class, client.recent_trades(&p, want)).await {
                    Ok(t) => Some(Arc::new(t)),
                    Err(Error::NotFound(_)) => None,
                    Err(e) => return Err(e),
                };
                let entry = Arc::new(Entry { fetched: Instant::now(), limit: want, answer });
                // Written before the flight ends: a caller arriving after it finds this entry.
                entries.insert(p, Arc::clone(&entry)).await;
                Ok(entry)
            })
            .await;
        let leader = role == crate::coordinated::coalesce::Role::Leader;
        match result {
            Ok(e) => Self::serve(product, &e, leader),
            // The stale contract: an answer up to `max_stale` old beats none.
            Err(err) if err.allows_stale() => match cached {
                Some(e)
                    if e.answer.is_some()
                        && now.saturating_duration_since(e.fetched) < self.ttl + self.max_stale =>
                {
                    Self::serve(product, &e, leader)
                }
                _ => Err(err),
            },
            Err(err) => Err(err),
        }
    }

    fn serve(product: &ProductId, e: &Entry, fetched: bool) -> Result<Served> {
        match &e.answer {
            Some(trades) => Ok(Served { trades: Arc::clone(trades), fetched }),
            None => Err(Error::NotFound(product.to_string())),
        }
    }
}
