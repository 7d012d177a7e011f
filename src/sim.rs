//! A simulated Coinbase Advanced Trade exchange on loopback (feature `sim`).
//!
//! [`SimExchange`] serves the market-data and balance endpoints of the real REST API under
//! [`API_BASE_PATH`] on `127.0.0.1`, with the same paths and JSON shapes (it serializes the very
//! structs of [`crate::coinbase::wire`] that the client decodes), and enforces Coinbase's rate
//! limits. It runs **on the caller's tokio runtime** (`tokio::spawn`), and all its timing uses
//! `tokio::time`, so a `#[tokio::test(start_paused = true)]` test that starts it stays
//! deterministic: an hour of simulated trading takes milliseconds.
//!
//! ```
//! use tickshare::sim::{Endpoint, SimExchange};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let sim = SimExchange::builder().products(5).seed(7).start().await?;
//! let url = format!("{}/market/products/BTC-USD/ticker?limit=1", sim.api_url());
//! let body = reqwest::get(&url).await?.bytes().await?;
//! let ticker = tickshare::coinbase::wire::decode_ticker(&"BTC-USD".parse()?, &body)?;
//! assert!(ticker.best_bid < Some(ticker.price) && Some(ticker.price) < ticker.best_ask);
//! assert_eq!(sim.stats().calls(Endpoint::MarketTicker), 1);
//! sim.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Endpoints
//!
//! | Counter name | Path (under [`API_BASE_PATH`]) | Class |
//! |---|---|---|
//! | `market/ticker` | `GET /market/products/{id}/ticker?limit=N` | public |
//! | `ticker` | `GET /products/{id}/ticker?limit=N` | private |
//! | `market/candles` | `GET /market/products/{id}/candles?start=&end=&granularity=[&limit=]` | public |
//! | `candles` | `GET /products/{id}/candles?...` | private |
//! | `best_bid_ask` | `GET /best_bid_ask[?product_ids=A&product_ids=B]` | private |
//! | `market/products` | `GET /market/products[?product_ids=..&limit=&offset=&product_type=]` | public |
//! | `products` | `GET /products[?...]` (adds `pagination`) | private |
//! | `market/product` | `GET /market/products/{id}` | public |
//! | `product` | `GET /products/{id}` | private |
//! | `accounts` | `GET /accounts[?limit=&cursor=]` | private |
//! | `time` | `GET /time` | public |
//! | `market/product_book` | `GET /market/product_book?product_id=[&limit=&aggregation_price_increment=]` | public |
//! | `product_book` | `GET /product_book?...` | private |
//! | `orders` | `POST /orders` (create) | private |
//! | `orders/batch_cancel` | `POST /orders/batch_cancel` | private |
//! | `orders/edit` | `POST /orders/edit` (`order_id`, `price`, `size`) | private |
//! | `orders/preview` | `POST /orders/preview` (a create without `client_order_id`) | private |
//! | `orders/historical/batch` | `GET /orders/historical/batch[?order_status=&product_ids=&order_ids=&order_side=&start_date=&end_date=&limit=&cursor=]` | private |
//! | `orders/historical` | `GET /orders/historical/{order_id}` | private |
//! | `orders/historical/fills` | `GET /orders/historical/fills[?order_ids=&trade_ids=&product_ids=&start_sequence_timestamp=&end_sequence_timestamp=&limit=&cursor=]` | private |
//!
//! Any other path (or method) answers 404 and counts as `unknown`, outside any rate limit.
//! Errors use the observed v3 shape `{"error","error_details","message"}`: an unknown or
//! malformed product id is 404 `NOT_FOUND` "ProductID is invalid"; missing or malformed query
//! parameters are 400 `INVALID_ARGUMENT`. Booleans in queries are case-insensitive.
//!
//! **Candles**: `start` and `end` are inclusive UNIX-second bounds; the answer holds the
//! candles whose aligned start `s` satisfies `start <= s <= end` and `s <= now`, newest first.
//! `(end - start) / granularity + 1` above [`OBSERVED_MAX_CANDLES`] (300, what the real exchange
//! enforces) is a 400 with [`CANDLE_RANGE_ERROR`]; [`SimBuilder::candle_limit`] switches to the
//! documented 350 ([`CandleLimit::Documented`]). `limit` (1 to 350) keeps the newest `limit`
//! candles. The candle in
//! progress closes at the current price; closed candles never change.
//!
//! **Ticker**: the last trade is at the current price (on the quote increment) and time; the
//! best bid and ask are one increment below and above, so their mid is the last price exactly.
//! Prices and candles are a pure function of (seed, product, time); see [`SimHandle::price_at`].
//!
//! # Orders
//!
//! The simulated user can trade, so balance reads after an order (and anything that forwards
//! orders, such as [`crate::proxy`]) can be tested against real effects. Supported
//! configurations: `market_market_ioc` (exactly one of `quote_size`, `base_size`),
//! `limit_limit_gtc`, `limit_limit_gtd` (`end_time`, RFC 3339), `limit_limit_fok` and
//! `sor_limit_ioc`; others fail with `UNSUPPORTED_ORDER_CONFIGURATION`.
//!
//! - A market order, and a limit order that is marketable on arrival (a buy at or above the
//!   best ask, a sell at or below the best bid), fills **completely** at that best price, taking
//!   liquidity ([`TAKER_FEE_RATE`]); the book's depth is not consumed. A `quote_size` buy spends
//!   at most `quote_size`, fees included; base sizes are floored to `base_increment` (1e-8).
//! - A limit order that is not marketable rests (`OPEN`) with its funds on hold (a buy holds
//!   `base_size × limit_price × (1 + taker fee)` of the quote currency, a sell its base size);
//!   it fills at its limit price, making liquidity ([`MAKER_FEE_RATE`]), at the first simulated
//!   second the best ask falls to it (a buy) or the best bid rises to it (a sell). Resting orders
//!   are matched against the price path whenever balances or orders are next read. IOC and FOK
//!   that cannot fill at once are `CANCELLED`; GTD orders become `EXPIRED` at `end_time`.
//!   `post_only` orders that would take liquidity fail (`INVALID_LIMIT_PRICE_POST_ONLY`).
//! - Funds are checked at entry (`INSUFFICIENT_FUND`); the quote currency is the product id's
//!   (a `BTC-USDC` order moves USDC: unverified, Coinbase may settle aliased pairs in USD).
//!   A fill into a currency without an account opens one (appended, so earlier accounts keep
//!   their ids).
//! - An edit (`POST /orders/edit`) changes an open GTC limit order's price and/or size: its
//!   hold is taken again at the new terms (refused if the funds do not cover it), an edit that
//!   makes it marketable fills it at once, and `edit_history` records it. It answers
//!   `{"success": true, "errors": []}`, or `success: false` with an `errors` list naming the
//!   `edit_failure_reason` (a list, as the SDK reads it; ccxt's sample shows one object:
//!   unverified).
//! - A preview (`POST /orders/preview`) answers what a create would do now (`order_total`,
//!   `commission_total`, `quote_size`, `base_size`, the book's top) and changes nothing; a
//!   create's failure reason comes back in `errs` as `PREVIEW_` + the reason (unverified).
//! - A `client_order_id` seen before returns the order it created, as Coinbase does, so a
//!   retried create never trades twice.
//! - A failed create is `200` with `success: false` and an `error_response` whose `error` and
//!   `new_order_failure_reason` name the reason (ccxt's sample shape); malformed bodies (not a
//!   create request, no `client_order_id`, over 64 KiB) are 400 `INVALID_ARGUMENT`; an unknown
//!   order id is 404 "order with this orderID was not found" (the observed v3 shape).
//! - Lists are newest first, paged by `limit` ([`DEFAULT_LIST_LIMIT`], at most
//!   [`MAX_LIST_LIMIT`]) and an opaque `cursor`; `product_id` and `order_id` (singular, as ccxt
//!   sends them) filter like `product_ids` and `order_ids`. At most [`MAX_ORDERS`] orders are
//!   kept; a `batch_cancel` names at most [`MAX_CANCEL_IDS`].
//!
//! # Rate limits
//!
//! Per class (public 10/s, private 30/s by default): a request is accepted if fewer than
//! `limit` requests of its class were accepted in the sliding window `(now - 1 s, now]`;
//! otherwise it gets 429 with `{"error":"RATE_LIMIT_EXCEEDED",...}` (or an HTML page, see
//! [`SimBuilder::html_429`]) and the headers `x-ratelimit-limit`, `x-ratelimit-remaining` and
//! `x-ratelimit-reset` (UNIX seconds on the exchange's clock when a slot frees), plus
//! `Retry-After` if [enabled](SimBuilder::retry_after). Accepted responses carry the
//! `x-ratelimit-*` headers too. [`SimStats::max_requests_in_any_1s`] records the most requests
//! of each class *received* in any one-second window.
//!
//! # Authentication
//!
//! Private endpoints need `Authorization: Bearer <jwt>` (401 `UNAUTHENTICATED` otherwise).
//! Without [`SimBuilder::jwt_public_key_pem`], any well-formed JWT passes; with it, the ES256 or
//! EdDSA signature, `exp`/`nbf` (system time, 5 s leeway) and the `uri` claim
//! (`"GET {any host}{path}"`, optionally with `http://`) are verified.
//!
//! # Order of checks
//!
//! For each request: count it, apply the rate limit (a rejected request gets the configured
//! latency and its 429, nothing else), sleep the latency (configured plus latency faults),
//! apply a response [`Fault`] if one matches, check the JWT (private endpoints), then answer.
//!
//! # Down
//!
//! [`SimHandle::set_down`]`(true)` takes the exchange down: new connections are accepted and
//! immediately reset (the port stays bound, so bringing it back always works), and every open
//! connection is reset, failing its request in flight. The `/__sim` control paths are down too.
//!
//! # Control paths
//!
//! `GET /__sim/stats` returns [`SimStats`] as JSON; `POST /__sim/reset` zeroes the counters (as
//! [`SimHandle::reset_stats`]) and returns the zeroed stats. They are not counted, limited or
//! subject to faults.

mod builder;
mod faults;
mod jwt;
mod limits;
mod market;
mod orders;
mod routes;
mod server;
mod stats;
mod v2;
mod ws;

use std::{
    fmt,
    net::SocketAddr,
    ops::Deref,
    sync::{Arc, Mutex},
    time::Duration,
};

use rust_decimal::Decimal;
use time::OffsetDateTime;
use tokio::{sync::watch, task::JoinHandle, time::Instant};

pub use crate::limiter::EndpointClass;
pub use builder::{SimAccount, SimBuilder, SimProducts};
pub use faults::{Fault, FaultId, FaultTarget};
pub use orders::{
    DEFAULT_LIST_LIMIT, MAKER_FEE_RATE, MAX_CANCEL_IDS, MAX_LIST_LIMIT, MAX_ORDERS, TAKER_FEE_RATE,
};
pub use stats::{CANDLE_LOG_CAPACITY, CandleRequest, PerClass, SimStats};
pub use ws::{WsConfig, WsConnFault, WsDialect, WsFault, WsStats};

use crate::{
    clock::Clock,
    coinbase::{CoinbaseClient, CoinbaseClientBuilder, Credentials, auth::VerifyingKey},
    error::Result,
    model::{Candle, Granularity, ProductId},
    util::lock,
};
use faults::FaultBook;
use limits::Limiter;
use market::{Market, unix_ms};
use stats::Counters;

/// The path prefix of every Coinbase endpoint: `/api/v3/brokerage`.
pub const API_BASE_PATH: &str = crate::coinbase::API_PREFIX;

/// The most candles one request may span by Coinbase's documentation:
/// `(end - start) / granularity + 1 <= 350` (the rule of [`CandleLimit::Documented`]; also the
/// largest `limit`). An alias of [`coinbase::MAX_CANDLES_PER_REQUEST`](crate::coinbase::MAX_CANDLES_PER_REQUEST).
pub const MAX_CANDLES: i64 = crate::coinbase::MAX_CANDLES_PER_REQUEST as i64;

/// The most candles one request may span as the exchange enforces it:
/// `(end - start) / granularity < 300`, i.e. at most 300 buckets with inclusive bounds (the
/// rule of [`CandleLimit::Observed`], the default). An alias of
/// [`coinbase::OBSERVED_MAX_CANDLES_PER_REQUEST`](crate::coinbase::OBSERVED_MAX_CANDLES_PER_REQUEST).
pub const OBSERVED_MAX_CANDLES: i64 = crate::coinbase::OBSERVED_MAX_CANDLES_PER_REQUEST as i64;

/// The `error_details` of the 400 for a candle window wider than [`OBSERVED_MAX_CANDLES`]: the
/// text the real exchange answered (COINBASE.md §1.1, quoted in KmiQ/coinbase-advanced-python
/// PR #26).
pub const CANDLE_RANGE_ERROR: &str =
    "start and end argument is invalid - number of candles requested should be less than 300";

/// The `error_details` of the 400 for a candle window wider than [`MAX_CANDLES`] under
/// [`CandleLimit::Documented`]. **UNVERIFIED**: the observed text with the documented number.
pub const DOCUMENTED_CANDLE_RANGE_ERROR: &str =
    "start and end argument is invalid - number of candles requested should be less than 350";

/// Which candle-window rule the exchange enforces; [`SimBuilder::candle_limit`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CandleLimit {
    /// What the real exchange does (default): at most [`OBSERVED_MAX_CANDLES`] (300) buckets,
    /// else 400 with [`CANDLE_RANGE_ERROR`].
    #[default]
    Observed,
    /// What Coinbase documents: at most [`MAX_CANDLES`] (350) buckets, else 400 with
    /// [`DOCUMENTED_CANDLE_RANGE_ERROR`] (this simulator's rule before it followed the
    /// observed one).
    Documented,
}

impl CandleLimit {
    /// The most buckets one request may span.
    pub const fn max_buckets(self) -> i64 {
        match self {
            CandleLimit::Observed => OBSERVED_MAX_CANDLES,
            CandleLimit::Documented => MAX_CANDLES,
        }
    }

    /// The `error_details` of a window that spans more.
    pub const fn error_details(self) -> &'static str {
        match self {
            CandleLimit::Observed => CANDLE_RANGE_ERROR,
            CandleLimit::Documented => DOCUMENTED_CANDLE_RANGE_ERROR,
        }
    }
}

/// Accounts per page when `limit` is absent or 0.
pub const DEFAULT_ACCOUNTS_LIMIT: u32 = 49;

/// The largest accepted accounts `limit`; larger values are clamped.
pub const MAX_ACCOUNTS_LIMIT: u32 = 250;

/// The most trades one ticker answer holds; a larger `limit` is clamped.
pub const MAX_TRADES: u32 = crate::coinbase::MAX_TRADES_PER_REQUEST;

/// The levels a side of the simulated order book (`product_book`) holds before aggregation,
/// and what a request without `limit` (or with `limit=0`, which a proto3 API cannot tell from
/// none) gets. Unverified: Coinbase documents no default, and a real book is deeper.
pub const BOOK_DEPTH: u32 = 500;

/// The body of an HTML 429 (see [`SimBuilder::html_429`]), like the page Coinbase's edge sends.
pub const HTML_429_BODY: &str = "<html> <head> <title>Coinbase</title> </head> <body> <h1>429 Too Many Requests</h1> <p>You have been rate limited.</p> </body> </html>";

const RATE_LIMIT_MESSAGE: &str = "Too many requests";

/// The endpoints the simulated exchange serves; [`name`](Endpoint::name) is the counter name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Endpoint {
    /// `GET /market/products/{id}/ticker` (`"market/ticker"`).
    MarketTicker,
    /// `GET /products/{id}/ticker` (`"ticker"`).
    Ticker,
    /// `GET /market/products/{id}/candles` (`"market/candles"`).
    MarketCandles,
    /// `GET /products/{id}/candles` (`"candles"`).
    Candles,
    /// `GET /best_bid_ask` (`"best_bid_ask"`).
    BestBidAsk,
    /// `GET /market/products` (`"market/products"`).
    MarketProducts,
    /// `GET /products` (`"products"`).
    Products,
    /// `GET /market/products/{id}` (`"market/product"`).
    MarketProduct,
    /// `GET /products/{id}` (`"product"`).
    Product,
    /// `GET /accounts` (`"accounts"`).
    Accounts,
    /// `GET /time` (`"time"`).
    Time,
    /// `GET /market/product_book` (`"market/product_book"`).
    MarketProductBook,
    /// `GET /product_book` (`"product_book"`).
    ProductBook,
    /// `POST /orders` (`"orders"`): create an order.
    CreateOrder,
    /// `POST /orders/batch_cancel` (`"orders/batch_cancel"`).
    CancelOrders,
    /// `POST /orders/edit` (`"orders/edit"`): a new price or size for an open GTC limit order.
    EditOrder,
    /// `POST /orders/preview` (`"orders/preview"`): what a create would do, without doing it.
    PreviewOrder,
    /// `GET /orders/historical/batch` (`"orders/historical/batch"`): list orders.
    ListOrders,
    /// `GET /orders/historical/{order_id}` (`"orders/historical"`): one order.
    GetOrder,
    /// `GET /orders/historical/fills` (`"orders/historical/fills"`): list fills.
    ListFills,
}

impl Endpoint {
    /// Every endpoint.
    pub const ALL: [Endpoint; 20] = [
        Endpoint::MarketTicker,
        Endpoint::Ticker,
        Endpoint::MarketCandles,
        Endpoint::Candles,
        Endpoint::BestBidAsk,
        Endpoint::MarketProducts,
        Endpoint::Products,
        Endpoint::MarketProduct,
        Endpoint::Product,
        Endpoint::Accounts,
        Endpoint::Time,
        Endpoint::MarketProductBook,
        Endpoint::ProductBook,
        Endpoint::CreateOrder,
        Endpoint::CancelOrders,
        Endpoint::EditOrder,
        Endpoint::PreviewOrder,
        Endpoint::ListOrders,
        Endpoint::GetOrder,
        Endpoint::ListFills,
    ];

    /// The counter name: the path shape with `market/` for the public twin (`"market/ticker"`
    /// vs `"ticker"`).
    pub const fn name(self) -> &'static str {
        match self {
            Endpoint::MarketTicker => "market/ticker",
            Endpoint::Ticker => "ticker",
            Endpoint::MarketCandles => "market/candles",
            Endpoint::Candles => "candles",
            Endpoint::BestBidAsk => "best_bid_ask",
            Endpoint::MarketProducts => "market/products",
            Endpoint::Products => "products",
            Endpoint::MarketProduct => "market/product",
            Endpoint::Product => "product",
            Endpoint::Accounts => "accounts",
            Endpoint::Time => "time",
            Endpoint::MarketProductBook => "market/product_book",
            Endpoint::ProductBook => "product_book",
            Endpoint::CreateOrder => "orders",
            Endpoint::CancelOrders => "orders/batch_cancel",
            Endpoint::EditOrder => "orders/edit",
            Endpoint::PreviewOrder => "orders/preview",
            Endpoint::ListOrders => "orders/historical/batch",
            Endpoint::GetOrder => "orders/historical",
            Endpoint::ListFills => "orders/historical/fills",
        }
    }

    /// Whether the endpoint is public or private.
    pub const fn class(self) -> EndpointClass {
        match self {
            Endpoint::MarketTicker
            | Endpoint::MarketCandles
            | Endpoint::MarketProducts
            | Endpoint::MarketProduct
            | Endpoint::MarketProductBook
            | Endpoint::Time => EndpointClass::Public,
            Endpoint::Ticker
            | Endpoint::Candles
            | Endpoint::BestBidAsk
            | Endpoint::Products
            | Endpoint::Product
            | Endpoint::ProductBook
            | Endpoint::Accounts
            | Endpoint::CreateOrder
            | Endpoint::CancelOrders
            | Endpoint::EditOrder
            | Endpoint::PreviewOrder
            | Endpoint::ListOrders
            | Endpoint::GetOrder
            | Endpoint::ListFills => EndpointClass::Private,
        }
    }

    /// Whether the endpoint reads or changes the simulated user's orders.
    pub const fn is_order(self) -> bool {
        matches!(
            self,
            Endpoint::CreateOrder
                | Endpoint::CancelOrders
                | Endpoint::EditOrder
                | Endpoint::PreviewOrder
                | Endpoint::ListOrders
                | Endpoint::GetOrder
                | Endpoint::ListFills
        )
    }

    const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A simulated Coinbase exchange serving on `127.0.0.1`; see the [module docs](self).
///
/// It dereferences to its [`SimHandle`], so every control method (`stats`, `add_fault`,
/// `set_down`, ...) is available directly; [`handle`](SimExchange::handle) gives a cloneable
/// handle for other tasks. Dropping the `SimExchange` stops the server (in the background);
/// [`shutdown`](SimExchange::shutdown) stops it and waits.
#[derive(Debug)]
pub struct SimExchange {
    handle: SimHandle,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl SimExchange {
    /// A builder with the defaults: 30 products, seed `0x5EED`, limits 10/30 per second, no
    /// latency, any well-formed JWT accepted, any free port.
    pub fn builder() -> SimBuilder {
        SimBuilder::default()
    }

    /// Start an exchange with the defaults.
    ///
    /// # Errors
    /// As [`SimBuilder::start`].
    pub async fn start() -> Result<SimExchange> {
        SimBuilder::default().start().await
    }

    /// A cloneable handle to inspect and steer the running exchange.
    pub fn handle(&self) -> SimHandle {
        self.handle.clone()
    }

    /// Stop accepting connections, let requests in flight finish (up to the
    /// [grace period](SimBuilder::shutdown_grace)), close everything and wait.
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

impl Deref for SimExchange {
    type Target = SimHandle;
    fn deref(&self) -> &SimHandle {
        &self.handle
    }
}

impl Drop for SimExchange {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// A cloneable handle to a running [`SimExchange`]: its address, counters, faults and market.
///
/// A handle does not keep the server alive: once the `SimExchange` is dropped, requests fail.
#[derive(Clone)]
pub struct SimHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimHandle")
            .field("base_url", &self.shared.base_url)
            .field("products", &self.shared.market.products().len())
            .finish_non_exhaustive()
    }
}

impl SimHandle {
    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> &str {
        &self.shared.base_url
    }

    /// `http://127.0.0.1:PORT/api/v3/brokerage`: the base URL the Coinbase client takes.
    pub fn api_url(&self) -> String {
        format!("{}{API_BASE_PATH}", self.shared.base_url)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// A [`CoinbaseClient`] builder pointed at this exchange. Without a configured JWT public
    /// key it carries freshly generated [`Credentials`] (any well-formed token is accepted), so
    /// private endpoints work; with one, set the matching credentials yourself.
    pub fn client_builder(&self) -> CoinbaseClientBuilder {
        let builder = CoinbaseClient::builder().base_url(self.base_url()).clock(self.clock());
        if self.shared.jwt_key.is_some() {
            builder
        } else {
            builder.credentials(Credentials::generate("organizations/sim/apiKeys/sim"))
        }
    }

    /// A [`CoinbaseClient`] for this exchange, from [`client_builder`](SimHandle::client_builder).
    ///
    /// # Errors
    /// As [`CoinbaseClientBuilder::build`].
    pub fn client(&self) -> Result<CoinbaseClient> {
        self.client_builder().build()
    }

    /// The exchange's clock.
    pub fn clock(&self) -> Clock {
        self.shared.clock
    }

    /// The listed products, in order.
    pub fn products(&self) -> Vec<ProductId> {
        self.shared.market.products().iter().map(|p| p.id.clone()).collect()
    }

    /// The price of `product` at `t` (what a ticker at `t` reports as the last trade), or
    /// `None` for an unlisted product.
    pub fn price_at(&self, product: &ProductId, t: OffsetDateTime) -> Option<Decimal> {
        let m = &self.shared.market;
        Some(m.price_at(m.get(product.as_str())?, t))
    }

    /// The current price of `product`.
    pub fn price(&self, product: &ProductId) -> Option<Decimal> {
        self.price_at(product, self.shared.clock.now_utc())
    }

    /// The candle of `product` at `granularity` containing `t`, as the exchange reports it now
    /// (`None` for an unlisted product or a candle not started yet).
    pub fn candle_at(
        &self,
        product: &ProductId,
        granularity: Granularity,
        t: OffsetDateTime,
    ) -> Option<Candle> {
        self.candle_seen_at(product, granularity, t, self.shared.clock.now_utc())
    }

    /// The candle of `product` at `granularity` containing `t`, as the exchange reported it at
    /// `t` (for a candle in progress then: what a REST read at `t` answered). `None` for an
    /// unlisted product or a candle not started by `t`.
    pub fn candle_as_of(
        &self,
        product: &ProductId,
        granularity: Granularity,
        t: OffsetDateTime,
    ) -> Option<Candle> {
        self.candle_seen_at(product, granularity, t, t)
    }

    /// The candle containing `t` as the exchange reported it at `seen`.
    fn candle_seen_at(
        &self,
        product: &ProductId,
        granularity: Granularity,
        t: OffsetDateTime,
        seen: OffsetDateTime,
    ) -> Option<Candle> {
        let m = &self.shared.market;
        let start = granularity.bucket_start(t).unix_timestamp();
        m.candle(m.get(product.as_str())?, granularity, start, unix_ms(seen))
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SimStats {
        let s = &self.shared;
        let max = {
            let l = lock(&s.limiter);
            PerClass {
                public: l.max_received(EndpointClass::Public),
                private: l.max_received(EndpointClass::Private),
            }
        };
        lock(&s.counters).snapshot(max)
    }

    /// Zero every counter and the candle log. Rate-limit admission is not reset.
    pub fn reset_stats(&self) {
        *lock(&self.shared.counters) = Counters::default();
        lock(&self.shared.limiter).reset_stats();
        self.shared.ws.reset_stats();
    }

    /// Install a fault (effective immediately, or after [`Fault::after`]).
    pub fn add_fault(&self, fault: Fault) -> FaultId {
        lock(&self.shared.faults).add(fault, Instant::now())
    }

    /// Remove an installed fault; `false` if it was already gone (spent, expired or removed).
    pub fn remove_fault(&self, id: FaultId) -> bool {
        lock(&self.shared.faults).remove(id)
    }

    /// Remove every fault.
    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }

    /// How many installed faults are still active or pending.
    pub fn active_faults(&self) -> usize {
        lock(&self.shared.faults).active(Instant::now())
    }

    /// Take the whole exchange down (`true`) or bring it back (`false`); see the
    /// [module docs](self#down).
    pub fn set_down(&self, down: bool) {
        self.shared.down.send_replace(down);
    }

    /// Whether the exchange is down.
    pub fn is_down(&self) -> bool {
        *self.shared.down.borrow()
    }

    /// Switch 429 bodies between JSON (`false`) and HTML (`true`).
    pub fn set_html_429(&self, html: bool) {
        lock(&self.shared.settings).html_429 = html;
    }

    /// Switch the `Retry-After` header on 429s on or off.
    pub fn set_retry_after(&self, send: bool) {
        lock(&self.shared.settings).retry_after = send;
    }

    /// Change the latency added to every response.
    pub fn set_latency(&self, latency: Duration, jitter: Duration) {
        let mut s = lock(&self.shared.settings);
        s.latency = latency;
        s.jitter = jitter;
    }

    /// Replace the simulated user's accounts.
    pub fn set_accounts(&self, accounts: impl IntoIterator<Item = SimAccount>) {
        *lock(&self.shared.accounts) = Arc::new(accounts.into_iter().collect());
    }
}

impl Shared {
    /// What a handler reads: the market, `accounts` (a snapshot) and the time `now`.
    fn ctx<'a>(&'a self, accounts: &'a [SimAccount], now: OffsetDateTime) -> routes::Ctx<'a> {
        routes::Ctx {
            market: &self.market,
            accounts,
            seed: self.seed,
            candle_limit: self.candle_limit,
            now,
            skew: self.clock_skew,
        }
    }

    /// Fill or expire resting orders up to `now`: called before balances or orders are read.
    fn settle_orders(&self, now: OffsetDateTime) {
        let mut book = lock(&self.orders);
        if !book.has_open() {
            return;
        }
        let mut accounts = lock(&self.accounts);
        let accounts = Arc::make_mut(&mut accounts);
        book.settle(&mut orders::OrderCtx { market: &self.market, accounts, seed: self.seed, now });
    }

    /// Answer a request to an order endpoint (settling first).
    fn answer_order(
        &self,
        endpoint: Endpoint,
        id: Option<&str>,
        query: &routes::Query,
        body: &[u8],
        now: OffsetDateTime,
    ) -> routes::Reply {
        let mut book = lock(&self.orders);
        let mut accounts = lock(&self.accounts);
        let accounts = Arc::make_mut(&mut accounts);
        book.answer(
            endpoint,
            id,
            query,
            body,
            &mut orders::OrderCtx { market: &self.market, accounts, seed: self.seed, now },
        )
    }
}

#[derive(Debug, Clone, Copy)]
struct Settings {
    latency: Duration,
    jitter: Duration,
    html_429: bool,
    retry_after: bool,
}

struct Shared {
    base_url: String,
    addr: SocketAddr,
    clock: Clock,
    market: Market,
    seed: u64,
    candle_limit: CandleLimit,
    jwt_key: Option<VerifyingKey>,
    /// How far the exchange's clock is ahead of the host's ([`SimBuilder::clock_skew`]).
    clock_skew: time::Duration,
    jwt_leeway_secs: i64,
    accounts: Mutex<Arc<Vec<SimAccount>>>,
    /// The simulated user's orders; locked before `accounts` when both are needed.
    orders: Mutex<orders::OrderBook>,
    limiter: Mutex<Limiter>,
    counters: Mutex<Counters>,
    faults: Mutex<FaultBook>,
    settings: Mutex<Settings>,
    down: watch::Sender<bool>,
    ws: ws::WsShared,
}
