//! The caches behind the routes whose answer is a list cut at a client's `limit`: recent trades
//! (`ticker?limit=N`) and order books (`product_book?limit=N`). Each holds a product's answer
//! as the exchange gave it, one fetch per product and freshness window, whatever the number
//! of clients asking.
//!
//! An entry holds the answer to the largest `limit` asked for recently, so a client asking for
//! one trade (ccxt's `fetch_ticker`) and another asking for a hundred (`fetch_trades`) share a
//! fetch; a smaller `limit` is served by cutting the cached list, which is what the exchange
//! would have answered at the time (best or most recent first). [`UNLIMITED`] stands for a
//! request without `limit` (the exchange's default, which only such a fetch can serve).
//! Unknown products are remembered like answers, so a client asking for one again and again
//! does not reach the exchange each time.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::time::Instant;

use crate::{
    coordinated::coalesce::{Role, SingleFlight},
    error::{Error, Result},
    model::{OrderBook, ProductId, RecentTrades},
};

/// The most list items a cache holds in all (the weigher counts one per item, plus one per
/// entry): 200,000 trades of about 150 bytes each, some 30 MiB at worst.
const MAX_CACHED_ITEMS: u64 = 200_000;

/// A `limit` meaning "no limit": the exchange's default answer.
pub(super) const UNLIMITED: u32 = u32::MAX;

/// An answer a [`PrefixCache`] holds: how many items it weighs.
pub(super) trait Weighed: Send + Sync + 'static {
    /// Items held (trades, or book levels of both sides).
    fn items(&self) -> usize;
}

impl Weighed for RecentTrades {
    fn items(&self) -> usize {
        self.trades.len()
    }
}

impl Weighed for OrderBook {
    fn items(&self) -> usize {
        self.bids.len() + self.asks.len()
    }
}

/// One product's cached answer.
#[derive(Debug)]
struct Entry<V> {
    fetched: Instant,
    /// The `limit` it answered ([`UNLIMITED`]: none).
    limit: u32,
    /// `None`: the exchange said the product does not exist.
    answer: Option<Arc<V>>,
}

/// See the [module docs](self).
pub(super) struct PrefixCache<V> {
    ttl: Duration,
    max_stale: Duration,
    entries: moka::future::Cache<ProductId, Arc<Entry<V>>>,
    flight: Arc<Flights<V>>,
}

/// The fetches in flight, by product and the `limit` they ask.
type Flights<V> = SingleFlight<(ProductId, u32), Arc<Entry<V>>>;

impl<V> std::fmt::Debug for PrefixCache<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixCache")
            .field("ttl", &self.ttl)
            .field("entries", &self.entries.entry_count())
            .finish()
    }
}

/// An answer: the cached list, of which the caller shows the first `limit`, or why there is
/// none; and whether this caller's call reached the exchange (false for a hit or a joined
/// flight), whatever the exchange said.
pub(super) type Served<V> = (Result<Arc<V>>, bool);

impl<V: Weighed> PrefixCache<V> {
    /// Answers stay fresh for `ttl`; past it, a failed refresh still serves an answer up to
    /// `max_stale` old (the coordinated source's stale contract).
    pub(super) fn new(ttl: Duration, max_stale: Duration) -> Self {
        let entries = moka::future::Cache::builder()
            .max_capacity(MAX_CACHED_ITEMS)
            .weigher(|_: &ProductId, e: &Arc<Entry<V>>| {
                u32::try_from(e.answer.as_ref().map_or(0, |a| a.items()))
                    .unwrap_or(u32::MAX)
                    .saturating_add(1)
            })
            .time_to_live(ttl.saturating_add(max_stale).max(Duration::from_millis(1)))
            .build();
        PrefixCache { ttl, max_stale, entries, flight: SingleFlight::new() }
    }

    /// The answer for `product` to at least `limit` items ([`UNLIMITED`]: the exchange's
    /// default). `fetch(product, limit)` asks the exchange, through the caller's limiter.
    ///
    /// The error is [`Error::NotFound`] for an unknown product (remembered for `ttl`), or
    /// `fetch`'s when no answer at most `max_stale` old is cached.
    pub(super) async fn get<F, Fut>(&self, product: &ProductId, limit: u32, fetch: F) -> Served<V>
    where
        F: FnOnce(ProductId, u32) -> Fut,
        Fut: Future<Output = Result<V>> + Send + 'static,
    {
        let now = Instant::now();
        let cached = self.entries.get(product).await;
        if let Some(e) = &cached
            && now.saturating_duration_since(e.fetched) < self.ttl
            && (e.limit >= limit || e.answer.is_none())
        {
            return (Self::serve(product, e), false);
        }
        // Fetch at least what was asked recently, so that the clients asking for more do not
        // make every refresh a miss for them.
        let want = cached.as_ref().map_or(limit, |e| e.limit.max(limit));
        let (entries, p) = (self.entries.clone(), product.clone());
        let (result, role) = self
            .flight
            .run((product.clone(), want), move || {
                let fetched = fetch(p.clone(), want);
                async move {
                    let answer = match fetched.await {
                        Ok(v) => Some(Arc::new(v)),
                        Err(Error::NotFound(_)) => None,
                        Err(e) => return Err(e),
                    };
                    let entry = Arc::new(Entry { fetched: Instant::now(), limit: want, answer });
                    // Written before the flight ends: a caller arriving after it finds this entry.
                    entries.insert(p, Arc::clone(&entry)).await;
                    Ok(entry)
                }
            })
            .await;
        let answer = match result {
            Ok(e) => Self::serve(product, &e),
            // The stale contract: an answer up to `max_stale` old beats none, if it holds
            // what was asked.
            Err(err) if err.allows_stale() => match cached {
                Some(e)
                    if e.answer.is_some()
                        && e.limit >= limit
                        && now.saturating_duration_since(e.fetched) < self.ttl + self.max_stale =>
                {
                    Self::serve(product, &e)
                }
                _ => Err(err),
            },
            Err(err) => Err(err),
        };
        (answer, role == Role::Leader)
    }

    fn serve(product: &ProductId, e: &Entry<V>) -> Result<Arc<V>> {
        match &e.answer {
            Some(answer) => Ok(Arc::clone(answer)),
            None => Err(Error::NotFound(product.to_string())),
        }
    }
}
