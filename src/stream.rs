//! [`MarketStream`]: Coinbase's market-data WebSocket feed keeping a [`CoordinatedSource`]'s
//! cache hot (feature `stream`), so steady-state REST calls fall to accounts and gap repair.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use tickshare::{CoordinatedSource, MarketDataSource, MarketStream, sim::SimExchange};
//!
//! let sim = SimExchange::builder().products(3).start().await?;
//! let source = CoordinatedSource::coinbase(sim.client()?).clock(sim.clock()).build()?;
//! let stream = MarketStream::builder(source.clone()).url(sim.ws_url()).products(sim.products()).start()?;
//! tokio::time::sleep(Duration::from_secs(6)).await; // the first ticker_batch arrives
//! let btc = "BTC-USD".parse()?;
//! let ticker = source.ticker(&btc).await?; // served from the pushed ticker
//! assert_eq!(Some(ticker.price), sim.price_at(&btc, ticker.time));
//! assert_eq!(source.stats().upstream_calls, 0);
//! assert!(stream.stats().connected);
//! stream.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # What it does
//!
//! Connections to `wss://advanced-trade-ws.coinbase.com` (or the simulated exchange's
//! `ws://127.0.0.1:PORT`). Each subscribes to `heartbeats`, `candles` and `ticker_batch` (or
//! `ticker`) for its share of the products you name
//! ([`set_products`](MarketStream::set_products); products added later are subscribed,
//! products dropped are unsubscribed), one channel per message, the first within 5 s of
//! connecting (COINBASE.md §3, §5). None of these channels needs a JWT, so none is sent (only
//! `user`-type channels need one, [`wire::channel::needs_jwt`]);
//! [`StreamConfig::jwt_on_market_data`] attaches a fresh one to every message anyway, as
//! Coinbase's SDK does once keys are configured.
//!
//! # Hundreds of products
//!
//! Coinbase limits unauthenticated WebSocket messages to 8 per second and new connections to
//! 8 per second, both per IP; it documents no limit on products per message or per
//! connection. This stream assumes both exist and makes them settings:
//!
//! - a subscribe message names at most [`StreamConfig::max_products_per_message`] products
//!   (default 100): a channel's products go out in chunks;
//! - a connection carries at most [`StreamConfig::max_products_per_connection`] products
//!   (default 200): more products open more connections (500 products: three). Products keep
//!   their connection while followed; new ones fill the first connection with room;
//! - every connection of the stream shares one budget of
//!   [`StreamConfig::messages_per_second`] (a connection that has not subscribed yet goes
//!   first, so it meets the 5 s deadline behind any backlog), and connections open at most
//!   [`StreamConfig::connections_per_second`] per second. Two streams in one process each have
//!   their own budget: give each a share.
//!
//! Each connection keeps its own `sequence_num`, silence timer, backoff and reconnect: a gap
//! or a disconnect on one marks stale, and repairs, only the products it carries
//! ([`StreamStats::connection_stats`] shows each one).
//!
//! **`-USDC` products** follow Coinbase's production rule (COINBASE.md §5): its market-data
//! channels serve `X-USDC` from the `X-USD` book and answer a `BTC-USDC` subscription with
//! `BTC-USD` frames and acknowledgements. So a followed `-USDC` product is subscribed as its
//! `-USD` twin ([`ProductId::usd_alias`]; [`USDC_OWN_MARKETS`](crate::USDC_OWN_MARKETS) such as
//! `USDT-USDC` as themselves), and every pushed ticker and candle is written to each followed
//! product of that book: `BTC-USDC`, and `BTC-USD` too if it is followed.
//!
//! - **Tickers** are written to the cache as fresh, and kept fresh while the stream is
//!   healthy ([`StreamConfig::ticker_hold`]).
//! - **Candles** (five-minute only) are merged into the cached `FIVE_MINUTE` series, the newest
//!   one marked in progress. Series at 15 and 30 minutes, 1, 2, 4 and 6 hours and 1 day that a
//!   reader has cached are **derived** by exact aggregation of the five-minute candles (open of
//!   the first, close of the last, highest high, lowest low, summed volume)
//!   ([`StreamConfig::aggregate`]). That includes the **candle in progress**: once the stream
//!   has covered the current bucket from its start, the derived series' last candle is the
//!   aggregate of the bucket's closed five-minute candles and the pushed one in progress, as of
//!   the last push (its [`InProgress::as_of`](crate::InProgress)), which is what REST answers
//!   at that instant. A bucket the stream joined late is never derived: the series keeps its
//!   REST answer, marked as of the fetch, until its close refreshes it from REST once. So
//!   after a warm-up (one REST fetch of each series' history, and for derived series the
//!   first bucket the stream saw start) reads are served with zero REST calls. `ONE_MINUTE`
//!   always uses REST.
//! - **Liveness**: a `sequence_num` gap (one counter per connection, across channels), a
//!   silence longer than [`StreamConfig::silence_timeout`] or a disconnect marks the data of
//!   that connection's products stale: reads fall back to REST, through the same single-flight,
//!   batching and rate limiter, until the stream delivers again. Silence and disconnects
//!   reconnect with exponential backoff and jitter, and resubscribe.
//! - **Repair**: a five-minute series that missed a candle close while the stream was away
//!   gets exactly one incremental REST refresh (from its last candle in progress to now); the
//!   series derived from it are then re-derived with no further call.
//!
//! # Honest limits
//!
//! - A closed candle is as final as the last state the stream delivered for it. Coinbase does
//!   not document whether its candles channel sends a candle's state after its close; if it
//!   does not, the last update can miss trades of the bucket's final second. The simulated
//!   exchange sends the closed candle's final state with the first update of the next bucket.
//! - A product that does not trade sends nothing: its ticker is kept fresh while heartbeats
//!   flow, but a five-minute bucket with no candle update within
//!   [`StreamConfig::candle_grace`] after its close expires and is refreshed by REST.

mod conn;
pub mod wire;

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{sync::watch, task::JoinHandle, time::Instant};

use crate::{
    coinbase::Credentials,
    coordinated::CoordinatedSource,
    error::{Error, Result},
    model::{Granularity, ProductId},
    util::lock,
};

pub use wire::COINBASE_WS_URL;

#[doc(hidden)]
pub use conn::FeedBench;

/// Which ticker channel to subscribe to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TickerChannel {
    /// `ticker_batch`: every product's ticker every 5 s. Enough for bots that tick every few
    /// minutes, and far fewer messages. The docs say it carries no best bid/ask (ccxt says it
    /// does); when absent they are `None`.
    #[default]
    TickerBatch,
    /// `ticker`: a ticker on every trade, with best bid and ask.
    Ticker,
}

impl TickerChannel {
    /// The channel's name on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            TickerChannel::TickerBatch => wire::channel::TICKER_BATCH,
            TickerChannel::Ticker => wire::channel::TICKER,
        }
    }
}

/// The knobs of a [`MarketStream`], with defaults right for Coinbase. Plain data (durations in
/// milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamConfig {
    /// The WebSocket URL. Default [`COINBASE_WS_URL`].
    pub url: String,
    /// The ticker channel. Default `ticker_batch`.
    pub ticker_channel: TickerChannel,
    /// No message at all (heartbeats come every second) for this long marks every product
    /// stale and reconnects. Default 5 s.
    #[serde(with = "crate::util::duration_ms")]
    pub silence_timeout: Duration,
    /// How long a pushed ticker stays fresh; renewed while the stream is healthy, so a product
    /// that does not trade keeps its last price. Default 30 s.
    #[serde(with = "crate::util::duration_ms")]
    pub ticker_hold: Duration,
    /// How long after a candle close a stream-fed series stays fresh waiting for the push
    /// that closes it. Default 5 s.
    #[serde(with = "crate::util::duration_ms")]
    pub candle_grace: Duration,
    /// First reconnect delay; doubles per failed attempt, with jitter. Default 500 ms.
    #[serde(with = "crate::util::duration_ms")]
    pub reconnect_min: Duration,
    /// Longest reconnect delay. Default 30 s.
    #[serde(with = "crate::util::duration_ms")]
    pub reconnect_max: Duration,
    /// Most client messages per second, every connection of the stream together (Coinbase: 8
    /// unauthenticated per IP). Default 8.
    pub messages_per_second: u32,
    /// Most new connections per second (Coinbase: 8 per IP). Default 8.
    pub connections_per_second: u32,
    /// Most products in one (un)subscribe message. Coinbase documents no limit; the default,
    /// 100, is an assumption that keeps a message a few kilobytes. Default 100.
    pub max_products_per_message: usize,
    /// Most products (books) one connection subscribes to; more are spread over more
    /// connections, each with its own sequence, liveness and repair. Coinbase documents no
    /// limit; the default, 200, is an assumption that keeps each connection's one-second
    /// candle frame near 40 KB (and its `ticker_batch` frame near 60 KB). Default 200.
    pub max_products_per_connection: usize,
    /// A (un)subscription not acknowledged within this time is sent again. Default 5 s.
    #[serde(with = "crate::util::duration_ms")]
    pub subscribe_timeout: Duration,
    /// Derive longer granularities from five-minute candles. Default on.
    pub aggregate: bool,
    /// Least time between two repair attempts of one product. Default 5 s.
    #[serde(with = "crate::util::duration_ms")]
    pub repair_interval: Duration,
    /// How long connecting (TCP, TLS, WebSocket handshake) may take. Default 10 s.
    #[serde(with = "crate::util::duration_ms")]
    pub connect_timeout: Duration,
    /// Attach a fresh JWT (from [`StreamBuilder::credentials`]) to market-data subscriptions
    /// too, as Coinbase's SDK does. Default off: they need none, and a JWT is only sent to the
    /// channels that need one ([`wire::channel::needs_jwt`]).
    pub jwt_on_market_data: bool,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            url: COINBASE_WS_URL.to_string(),
            ticker_channel: TickerChannel::TickerBatch,
            silence_timeout: Duration::from_secs(5),
            ticker_hold: Duration::from_secs(30),
            candle_grace: Duration::from_secs(5),
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            messages_per_second: 8,
            connections_per_second: 8,
            max_products_per_message: 100,
            max_products_per_connection: 200,
            subscribe_timeout: Duration::from_secs(5),
            aggregate: true,
            repair_interval: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            jwt_on_market_data: false,
        }
    }
}

impl StreamConfig {
    /// Check the settings.
    ///
    /// # Errors
    /// [`Error::Config`] naming the bad setting and what it must be.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(m.to_string()));
        if !(self.url.starts_with("ws://") || self.url.starts_with("wss://")) {
            return bad("stream url must start with ws:// or wss://");
        }
        if self.messages_per_second == 0 || self.connections_per_second == 0 {
            return bad("stream messages_per_second and connections_per_second must be at least 1");
        }
        if self.max_products_per_message == 0 || self.max_products_per_connection == 0 {
            return bad("stream max_products_per_message and max_products_per_connection must be at least 1");
        }
        if self.silence_timeout < Duration::from_secs(2) {
            return bad("stream silence_timeout must be at least 2 s (heartbeats come every second)");
        }
        if self.ticker_hold.is_zero() || self.subscribe_timeout.is_zero() || self.connect_timeout.is_zero() {
            return bad(
                "stream ticker_hold, subscribe_timeout and connect_timeout must be greater than zero",
            );
        }
        let day = Duration::from_secs(86_400);
        let all = [
            self.silence_timeout,
            self.ticker_hold,
            self.candle_grace,
            self.reconnect_min,
            self.reconnect_max,
            self.subscribe_timeout,
            self.repair_interval,
            self.connect_timeout,
        ];
        if all.iter().any(|d| *d > day) {
            return bad("stream durations must be at most 24 hours");
        }
        if self.reconnect_min < Duration::from_millis(125) || self.reconnect_max < self.reconnect_min {
            return bad(
                "stream reconnect_min must be at least 125 ms (Coinbase allows 8 connections per second) and reconnect_max at least reconnect_min",
            );
        }
        Ok(())
    }
}

/// Builder of a [`MarketStream`]; from [`MarketStream::builder`].
#[must_use]
pub struct StreamBuilder {
    source: CoordinatedSource,
    cfg: StreamConfig,
    credentials: Option<Credentials>,
    products: BTreeSet<ProductId>,
}

impl fmt::Debug for StreamBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamBuilder")
            .field("config", &self.cfg)
            .field("credentials", &self.credentials.is_some())
            .field("products", &self.products)
            .finish_non_exhaustive()
    }
}

impl StreamBuilder {
    /// The WebSocket URL (default [`COINBASE_WS_URL`]); the simulated exchange's is
    /// [`SimHandle::ws_url`](crate::sim::SimHandle::ws_url).
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.cfg.url = url.into();
        self
    }

    /// Replace the whole configuration (its `url` included).
    pub fn config(mut self, cfg: StreamConfig) -> Self {
        self.cfg = cfg;
        self
    }

    /// See [`StreamConfig::ticker_channel`].
    pub fn ticker_channel(mut self, channel: TickerChannel) -> Self {
        self.cfg.ticker_channel = channel;
        self
    }

    /// See [`StreamConfig::silence_timeout`].
    pub fn silence_timeout(mut self, d: Duration) -> Self {
        self.cfg.silence_timeout = d;
        self
    }

    /// See [`StreamConfig::candle_grace`]. It must exceed the interval at which the server
    /// pushes candle updates (Coinbase: about every second), or each close is refetched by REST
    /// before its push arrives.
    pub fn candle_grace(mut self, d: Duration) -> Self {
        self.cfg.candle_grace = d;
        self
    }

    /// See [`StreamConfig::aggregate`].
    pub fn aggregate(mut self, on: bool) -> Self {
        self.cfg.aggregate = on;
        self
    }

    /// See [`StreamConfig::max_products_per_message`].
    pub fn max_products_per_message(mut self, n: usize) -> Self {
        self.cfg.max_products_per_message = n;
        self
    }

    /// See [`StreamConfig::max_products_per_connection`].
    pub fn max_products_per_connection(mut self, n: usize) -> Self {
        self.cfg.max_products_per_connection = n;
        self
    }

    /// The CDP key that signs the JWTs of channels that need one (`user`-type channels only;
    /// the market-data channels this stream subscribes to need none, so nothing is signed
    /// unless [`jwt_on_market_data`](Self::jwt_on_market_data) is on).
    pub fn credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = Some(credentials);
        self
    }

    /// See [`StreamConfig::jwt_on_market_data`]: sign market-data subscriptions too (needs
    /// [`credentials`](Self::credentials)).
    pub fn jwt_on_market_data(mut self, on: bool) -> Self {
        self.cfg.jwt_on_market_data = on;
        self
    }

    /// The products to subscribe to at start (more with [`MarketStream::set_products`]).
    pub fn products(mut self, products: impl IntoIterator<Item = ProductId>) -> Self {
        self.products = products.into_iter().collect();
        self
    }

    /// Start the stream on the current tokio runtime. It connects in the background; until
    /// it delivers, reads go to REST as usual.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration, `jwt_on_market_data` without
    /// credentials, or outside a tokio runtime.
    pub fn start(self) -> Result<MarketStream> {
        let shared = self.into_shared()?;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(conn::run(Arc::clone(&shared), stop_rx));
        Ok(MarketStream { shared, stop, task: Some(task) })
    }

    /// Validate and build the state the connection tasks share.
    fn into_shared(self) -> Result<Arc<Shared>> {
        self.cfg.validate()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Config("MarketStream must be started inside a tokio runtime".into()));
        }
        if self.cfg.jwt_on_market_data && self.credentials.is_none() {
            return Err(Error::Config("stream jwt_on_market_data needs credentials to sign with".into()));
        }
        let baseline = rest_market_calls(&self.source);
        let (desired, _) = watch::channel(self.products);
        let now = Instant::now();
        let shared = Arc::new(Shared {
            source: self.source,
            cfg: self.cfg,
            credentials: self.credentials,
            desired,
            counters: Counters::default(),
            state: Mutex::new(State {
                started: now,
                connected_since: None,
                connected_total: Duration::ZERO,
                products: BTreeMap::new(),
                by_channel: BTreeMap::new(),
                conns: BTreeMap::new(),
            }),
            pace: Mutex::new(Pace::default()),
            opens: Mutex::new(Window::default()),
            baseline,
        });
        Ok(shared)
    }
}

/// Coinbase's market-data WebSocket feed writing into a [`CoordinatedSource`]; see the
/// [module docs](self). Dropping it stops the feed (in the background);
/// [`shutdown`](MarketStream::shutdown) stops it and waits.
pub struct MarketStream {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for MarketStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MarketStream")
            .field("url", &self.shared.cfg.url)
            .field("products", &self.shared.desired.borrow().len())
            .finish_non_exhaustive()
    }
}

impl MarketStream {
    /// A builder feeding `source`.
    pub fn builder(source: CoordinatedSource) -> StreamBuilder {
        StreamBuilder { source, cfg: StreamConfig::default(), credentials: None, products: BTreeSet::new() }
    }

    /// Follow exactly these products: new ones are subscribed, dropped ones unsubscribed (and
    /// their pushed data marked stale). Cheap when nothing changed, so it can be called every
    /// tick with the products the bots use.
    pub fn set_products(&self, products: impl IntoIterator<Item = ProductId>) {
        let next: BTreeSet<ProductId> = products.into_iter().collect();
        self.shared.desired.send_if_modified(|cur| {
            if *cur == next {
                false
            } else {
                *cur = next;
                true
            }
        });
    }

    /// The products followed.
    pub fn products(&self) -> Vec<ProductId> {
        self.shared.desired.borrow().iter().cloned().collect()
    }

    /// Whether every connection of the stream is open and every followed product is live
    /// (pushed data arrived since the last subscription, gap or reconnect of its connection).
    pub fn is_live(&self) -> bool {
        let st = lock(&self.shared.state);
        let desired = self.shared.desired.borrow();
        st.connected_since.is_some()
            && desired.iter().all(|p| st.products.get(p).is_some_and(ProductState::is_live))
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> StreamStats {
        self.shared.stats()
    }

    /// Stop the feed and wait for it. The cache keeps what was pushed; it expires as usual.
    ///
    /// # Cancel safety
    /// Dropping the future leaves the shutdown running in the background.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MarketStream {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// A snapshot of a [`MarketStream`]'s counters. Counts are exact and monotonic since start;
/// they add up every connection's ([`connection_stats`](Self::connection_stats) has each one).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamStats {
    /// Whether every connection of the stream is open now.
    pub connected: bool,
    /// Time with every connection open since start, milliseconds (tokio's clock).
    pub connected_ms: u64,
    /// Time with some connection not open since start, milliseconds.
    pub disconnected_ms: u64,
    /// Connections the stream runs now (the followed products spread over them,
    /// [`StreamConfig::max_products_per_connection`] each).
    pub connection_count: u64,
    /// Connections opened.
    pub connections: u64,
    /// Connection attempts that failed (refused, timed out, handshake rejected).
    pub connect_failures: u64,
    /// Connections opened after the first one.
    pub reconnects: u64,
    /// Messages received (every frame that reached the decoder).
    pub messages: u64,
    /// Messages received by channel (`"error"` for error frames).
    pub messages_by_channel: BTreeMap<String, u64>,
    /// Heartbeats received.
    pub heartbeats: u64,
    /// Tickers written to the cache.
    pub tickers_applied: u64,
    /// Five-minute candle merges written to the cache.
    pub candle_merges: u64,
    /// Derived-granularity series written to the cache.
    pub derived_updates: u64,
    /// `sequence_num` gaps seen.
    pub sequence_gaps: u64,
    /// Silences longer than the timeout (each ended its connection).
    pub silences: u64,
    /// Times the followed products' data was marked stale (gap, silence, disconnect).
    pub stale_marks: u64,
    /// Five-minute series repaired with one REST call each.
    pub repairs: u64,
    /// Repairs that failed (retried after `repair_interval`).
    pub repair_failures: u64,
    /// Error frames from the exchange (for example a refused subscription).
    pub exchange_errors: u64,
    /// Frames or entries that could not be decoded.
    pub decode_errors: u64,
    /// Subscribe messages sent.
    pub subscribe_messages: u64,
    /// Unsubscribe messages sent.
    pub unsubscribe_messages: u64,
    /// REST market-data calls (ticker, best_bid_ask, candles) the source made since the stream
    /// started, repairs excluded: reads the stream could not serve (warm-up, stale data,
    /// unfollowed products, granularities it cannot derive).
    pub rest_fallbacks: u64,
    /// Products followed now.
    pub followed_products: u64,
    /// Followed products that are live.
    pub live_products: u64,
    /// Real (not tokio) time spent decoding frames and applying them to the cache,
    /// microseconds: the feed's own CPU cost (on a single-threaded runtime, time other tasks
    /// ran while an apply awaited the cache is included; the cache's operations rarely yield).
    pub busy_us: u64,
    /// Per followed product.
    pub products: BTreeMap<String, ProductLiveness>,
    /// Per connection, by its id (ids are not reused).
    pub connection_stats: BTreeMap<u32, ConnectionStats>,
}

/// The state of one connection of a [`MarketStream`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionStats {
    /// Whether it is open now.
    pub connected: bool,
    /// Books (subscribed product ids) assigned to it.
    pub products: u64,
    /// Its followed products that are live.
    pub live_products: u64,
    /// Times it was opened.
    pub connections: u64,
    /// Times it was opened after the first.
    pub reconnects: u64,
    /// Messages it received.
    pub messages: u64,
    /// `sequence_num` gaps it saw (each marked only its own products stale).
    pub sequence_gaps: u64,
    /// Silences longer than the timeout (each ended it).
    pub silences: u64,
    /// Its last `sequence_num`.
    pub last_sequence: Option<u64>,
    /// Time since its last message, milliseconds.
    pub last_message_age_ms: Option<u64>,
    /// Channel to the number of products the exchange acknowledged on it.
    pub acknowledged: BTreeMap<String, u64>,
}

/// The liveness of one followed product.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductLiveness {
    /// Pushed data arrived since the last subscription, gap or reconnect.
    pub live: bool,
    /// Time since its last pushed ticker, milliseconds.
    pub ticker_age_ms: Option<u64>,
    /// Time since its last pushed candle, milliseconds.
    pub candle_age_ms: Option<u64>,
}

/// State shared by the handle and the connection task.
struct Shared {
    source: CoordinatedSource,
    cfg: StreamConfig,
    credentials: Option<Credentials>,
    desired: watch::Sender<BTreeSet<ProductId>>,
    counters: Counters,
    /// A std mutex: never held across an await.
    state: Mutex<State>,
    /// Client messages sent in the last second, every connection together: one budget of
    /// [`StreamConfig::messages_per_second`].
    pace: Mutex<Pace>,
    /// Connection attempts in the last second ([`StreamConfig::connections_per_second`]).
    opens: Mutex<Window>,
    /// REST market-data calls of the source before the stream started.
    baseline: u64,
}

/// The times of the events of the last second, for an "at most N in any second" budget.
#[derive(Debug, Default)]
struct Window(VecDeque<Instant>);

impl Window {
    /// When the next event may happen at `now`, with at most `limit` in any second.
    fn next_at(&mut self, now: Instant, limit: usize) -> Instant {
        let second = Duration::from_secs(1);
        while self.0.front().is_some_and(|t| now.saturating_duration_since(*t) >= second) {
            self.0.pop_front();
        }
        if self.0.len() < limit { now } else { self.0.front().map_or(now, |t| *t + second) }
    }

    /// Count an event at `now`.
    fn record(&mut self, now: Instant) {
        self.0.push_back(now);
    }
}

/// The shared message budget.
#[derive(Debug, Default)]
struct Pace {
    /// Send times within the last second.
    sent: Window,
    /// Connections that are open and have not sent their first message yet: they go first, so
    /// a connection opened behind a backlog still subscribes within Coinbase's 5 s.
    waiting_first: usize,
}

struct State {
    started: Instant,
    /// Since when every connection has been open (`None`: some connection is not).
    connected_since: Option<Instant>,
    connected_total: Duration,
    products: BTreeMap<ProductId, ProductState>,
    by_channel: BTreeMap<String, u64>,
    /// Per connection id.
    conns: BTreeMap<u32, ConnState>,
}

/// What the stream knows of one connection.
#[derive(Debug, Default)]
struct ConnState {
    /// Its books.
    books: BTreeSet<ProductId>,
    connected: bool,
    connections: u64,
    messages: u64,
    sequence_gaps: u64,
    silences: u64,
    last_seq: Option<u64>,
    last_msg: Option<Instant>,
    acknowledged: BTreeMap<String, u64>,
}

/// What the stream knows of one followed product.
#[derive(Debug, Default)]
struct ProductState {
    /// When its last pushed ticker was stored (the entry [`CoordinatedSource::feed_touch_ticker`]
    /// may extend).
    ticker_at: Option<Instant>,
    /// When its last candle merge happened.
    candle_at: Option<Instant>,
    /// Ticker pushed since the last stale mark.
    ticker_live: bool,
    /// Candles merged since the last stale mark.
    candles_live: bool,
    /// What the feed last wrote to its five-minute series while the stream stayed continuous.
    mark: Option<crate::coordinated::feed::FeedMark>,
    /// Derived granularities the feed maintains.
    derived: BTreeSet<Granularity>,
    /// A repair is in flight.
    repairing: bool,
    /// When the last repair started.
    repair_at: Option<Instant>,
    /// When every cached series of the product was last checked for derivation.
    scanned_at: Option<Instant>,
}

impl ProductState {
    fn is_live(&self) -> bool {
        self.ticker_live && self.candles_live
    }
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    connect_failures: AtomicU64,
    reconnects: AtomicU64,
    messages: AtomicU64,
    heartbeats: AtomicU64,
    tickers_applied: AtomicU64,
    candle_merges: AtomicU64,
    derived_updates: AtomicU64,
    sequence_gaps: AtomicU64,
    silences: AtomicU64,
    stale_marks: AtomicU64,
    repairs: AtomicU64,
    repair_failures: AtomicU64,
    exchange_errors: AtomicU64,
    decode_errors: AtomicU64,
    subscribe_messages: AtomicU64,
    unsubscribe_messages: AtomicU64,
    busy_ns: AtomicU64,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// REST market-data calls a source has made.
fn rest_market_calls(source: &CoordinatedSource) -> u64 {
    let s = source.stats();
    ["ticker", "tickers", "candles"]
        .iter()
        .map(|k| s.upstream_calls_by_endpoint.get(*k).copied().unwrap_or(0))
        .sum()
}

impl Shared {
    fn stats(&self) -> StreamStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let c = &self.counters;
        let now = Instant::now();
        let desired = self.desired.borrow().clone();
        let st = lock(&self.state);
        let connected_ms = ms(st
            .connected_total
            .saturating_add(st.connected_since.map_or(Duration::ZERO, |s| now.saturating_duration_since(s))));
        let total_ms = ms(now.saturating_duration_since(st.started));
        let products: BTreeMap<String, ProductLiveness> = desired
            .iter()
            .map(|p| {
                let s = st.products.get(p);
                (
                    p.to_string(),
                    ProductLiveness {
                        live: s.is_some_and(ProductState::is_live),
                        ticker_age_ms: s
                            .and_then(|s| s.ticker_at)
                            .map(|t| ms(now.saturating_duration_since(t))),
                        candle_age_ms: s
                            .and_then(|s| s.candle_at)
                            .map(|t| ms(now.saturating_duration_since(t))),
                    },
                )
            })
            .collect();
        let repairs = get(&c.repairs);
        let connection_stats = st
            .conns
            .iter()
            .map(|(id, k)| {
                let live =
                    st.products.iter().filter(|(p, s)| k.books.contains(&p.book_id()) && s.is_live()).count();
                let stats = ConnectionStats {
                    connected: k.connected,
                    products: k.books.len() as u64,
                    live_products: live as u64,
                    connections: k.connections,
                    reconnects: k.connections.saturating_sub(1),
                    messages: k.messages,
                    sequence_gaps: k.sequence_gaps,
                    silences: k.silences,
                    last_sequence: k.last_seq,
                    last_message_age_ms: k.last_msg.map(|t| ms(now.saturating_duration_since(t))),
                    acknowledged: k.acknowledged.clone(),
                };
                (*id, stats)
            })
            .collect();
        StreamStats {
            connected: st.connected_since.is_some(),
            connected_ms,
            disconnected_ms: total_ms.saturating_sub(connected_ms),
            connection_count: st.conns.len() as u64,
            connections: get(&c.connections),
            connect_failures: get(&c.connect_failures),
            reconnects: get(&c.reconnects),
            messages: get(&c.messages),
            messages_by_channel: st.by_channel.clone(),
            heartbeats: get(&c.heartbeats),
            tickers_applied: get(&c.tickers_applied),
            candle_merges: get(&c.candle_merges),
            derived_updates: get(&c.derived_updates),
            sequence_gaps: get(&c.sequence_gaps),
            silences: get(&c.silences),
            stale_marks: get(&c.stale_marks),
            repairs,
            repair_failures: get(&c.repair_failures),
            exchange_errors: get(&c.exchange_errors),
            decode_errors: get(&c.decode_errors),
            subscribe_messages: get(&c.subscribe_messages),
            unsubscribe_messages: get(&c.unsubscribe_messages),
            rest_fallbacks: rest_market_calls(&self.source)
                .saturating_sub(self.baseline)
                .saturating_sub(repairs),
            followed_products: desired.len() as u64,
            live_products: products.values().filter(|p| p.live).count() as u64,
            busy_us: get(&c.busy_ns) / 1_000,
            products,
            connection_stats,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_validate_and_round_trip() {
        let cfg = StreamConfig::default();
        cfg.validate().unwrap();
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(json.contains(r#""ticker_channel":"ticker_batch""#), "{json}");
        assert_eq!(serde_json::from_str::<StreamConfig>(&json).unwrap(), cfg);
        let partial: StreamConfig = serde_json::from_str(r#"{"silence_timeout": 9000}"#).unwrap();
        assert_eq!(partial.silence_timeout, Duration::from_secs(9));
        for bad in [
            StreamConfig { url: "http://x".into(), ..StreamConfig::default() },
            StreamConfig { messages_per_second: 0, ..StreamConfig::default() },
            StreamConfig { connections_per_second: 0, ..StreamConfig::default() },
            StreamConfig { max_products_per_message: 0, ..StreamConfig::default() },
            StreamConfig { max_products_per_connection: 0, ..StreamConfig::default() },
            StreamConfig { silence_timeout: Duration::from_secs(1), ..StreamConfig::default() },
            StreamConfig { reconnect_min: Duration::from_millis(10), ..StreamConfig::default() },
            StreamConfig { reconnect_max: Duration::from_millis(200), ..StreamConfig::default() },
            StreamConfig { ticker_hold: Duration::MAX, ..StreamConfig::default() },
        ] {
            assert!(matches!(bad.validate(), Err(Error::Config(_))), "{bad:?}");
        }
    }
}
