//! The simulated exchange's market-data WebSocket endpoint, at
//! [`SimHandle::ws_url`](super::SimHandle::ws_url) (`ws://127.0.0.1:PORT`, a second loopback
//! port).
//!
//! It publishes the same deterministic market as the REST side (prices and candles are pure
//! functions of seed, product and time), in Coinbase's message shapes (COINBASE.md §5; the
//! structs of [`crate::stream::wire`]): the `{"channel","client_id","timestamp",
//! "sequence_num","events"}` envelope, one `sequence_num` counter per connection across
//! channels, a `subscriptions` acknowledgement listing every subscription of the connection
//! after each (un)subscribe, `heartbeats` with a per-connection `heartbeat_counter`, `candles`
//! (five-minute, snapshot then updates) and `ticker` / `ticker_batch`. It runs on the caller's
//! runtime on tokio's clock, like the REST side.
//!
//! # Cadence and content
//!
//! Per connection, on tokio's clock ([`WsConfig`]): heartbeats every second, candles every
//! second, `ticker` every second, `ticker_batch` every 5 s, each message covering every
//! product the connection subscribed to. A candle update carries the candle in progress; the
//! first update after a candle closes also carries the closed candle's final state (as of its
//! last millisecond), so a client that saw the whole stream holds exactly the candles the REST
//! side serves. (Whether real Coinbase sends a closed candle's final state is not documented.)
//! A ticker's price is the REST ticker's last price; `best_bid`/`best_ask` are one increment
//! either side; `low_24_h`/`high_24_h` are those of the current UTC day's candle; the 52-week
//! fields are `""` (the simulation does not model a year).
//!
//! The shapes are production's by default ([`WsDialect::Production`]): no `client_id`, an
//! integer `heartbeat_counter`, no best bid/ask on `ticker_batch`, and `-USDC` subscriptions
//! answered with their `-USD` twin's frames and acknowledgements (`USDT-USDC` and `EURC-USDC`
//! excepted). [`WsDialect::Documented`] speaks as the docs' samples do instead.
//!
//! # Limits and rules
//!
//! - A connection that sends no `subscribe` within 5 s is closed.
//! - At most 8 client messages per second across all connections (all clients share
//!   127.0.0.1, and Coinbase counts per IP): a message over the limit is answered with an
//!   error frame `{"type":"error","message":"…rate limit…"}` and not applied.
//! - At most 8 new connections per second: the handshake of one over the limit gets HTTP 429.
//! - Unknown channels or products get an error frame; the rest of the message is applied.
//! - Optionally ([`WsConfig::max_products_per_message`], [`WsConfig::max_products_per_connection`],
//!   both off by default since Coinbase documents neither): a message naming too many products,
//!   or a subscription that would put too many on one connection's channel, is refused with an
//!   error frame.
//! - While the exchange is [down](super::SimHandle::set_down), connections are reset and new
//!   ones refused.
//!
//! # Faults
//!
//! [`SimHandle::ws_fault`](super::SimHandle::ws_fault) with a [`WsFault`]: drop every open
//! connection, skip sequence numbers, go silent for a while, or refuse the next subscribe
//! messages. [`SimHandle::ws_fault_on`](super::SimHandle::ws_fault_on) with a [`WsConnFault`]
//! drops, or skips the sequence of, only the connections carrying one product.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use rust_decimal::Decimal;
use serde::Serialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{broadcast, watch},
    time::{Instant, MissedTickBehavior},
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Message,
        handshake::server::{ErrorResponse, Request, Response},
        http::StatusCode,
    },
};

use super::{
    Shared, SimBuilder, SimHandle,
    market::{Market, ProductSpec, unix_ms},
    server::{accept_until_stopped, until_true},
};
use crate::util::lock;
use crate::{
    error::{Error, Result},
    model::{Granularity, ProductId},
    stream::wire::{Envelope, Event, SubscribeMessage, WsCandle, WsTicker, channel},
};

const WINDOW: Duration = Duration::from_secs(1);

/// Which message shapes the WebSocket endpoint speaks; [`WsConfig::dialect`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WsDialect {
    /// What production sends (COINBASE.md §5, the AsyncAPI spec and captures), the default:
    /// frames without `client_id`, an integer `heartbeat_counter`, `ticker_batch` without best
    /// bid/ask, and a `-USDC` subscription answered as its `-USD` twin (acknowledged and pushed
    /// as `BTC-USD` for `BTC-USDC`; [`USDC_OWN_MARKETS`](crate::USDC_OWN_MARKETS) as
    /// themselves).
    #[default]
    Production,
    /// What the docs' samples show: `"client_id": ""`, a string `heartbeat_counter`, best
    /// bid/ask on `ticker_batch`, and `-USDC` products subscribed and pushed as themselves.
    Documented,
}

/// The WebSocket endpoint's settings; [`SimBuilder::ws`]. Defaults follow Coinbase.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WsConfig {
    /// The message shapes. Default [`WsDialect::Production`].
    pub dialect: WsDialect,
    /// Heartbeat period. Default 1 s.
    pub heartbeat_interval: Duration,
    /// Candle update period. Default 1 s.
    pub candle_interval: Duration,
    /// `ticker` period. Default 1 s.
    pub ticker_interval: Duration,
    /// `ticker_batch` period. Default 5 s.
    pub ticker_batch_interval: Duration,
    /// A connection with no `subscribe` by then is closed. Default 5 s.
    pub subscribe_deadline: Duration,
    /// Client messages accepted per second, all connections together. Default 8.
    pub message_limit: u32,
    /// New connections accepted per second. Default 8.
    pub connection_limit: u32,
    /// Send a closed candle's final state with the first update after its close. Default on.
    pub finalize_candles: bool,
    /// Most products one (un)subscribe message may name; a longer one is refused with an error
    /// frame. Coinbase documents no such limit. Default `None` (no limit).
    pub max_products_per_message: Option<usize>,
    /// Most products one connection may subscribe to per channel; a subscribe that would go
    /// over is refused with an error frame. Coinbase documents no such limit. Default `None`
    /// (no limit).
    pub max_products_per_connection: Option<usize>,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            dialect: WsDialect::Production,
            heartbeat_interval: Duration::from_secs(1),
            candle_interval: Duration::from_secs(1),
            ticker_interval: Duration::from_secs(1),
            ticker_batch_interval: Duration::from_secs(5),
            subscribe_deadline: Duration::from_secs(5),
            message_limit: 8,
            connection_limit: 8,
            finalize_candles: true,
            max_products_per_message: None,
            max_products_per_connection: None,
        }
    }
}

impl WsConfig {
    /// Set the message shapes (production by default).
    #[must_use]
    pub fn dialect(mut self, dialect: WsDialect) -> Self {
        self.dialect = dialect;
        self
    }

    /// Set the candle update period (fewer messages in long simulations).
    #[must_use]
    pub fn candle_interval(mut self, d: Duration) -> Self {
        self.candle_interval = d;
        self
    }

    /// Set the `ticker_batch` period.
    #[must_use]
    pub fn ticker_batch_interval(mut self, d: Duration) -> Self {
        self.ticker_batch_interval = d;
        self
    }

    /// Set the client message limit per second.
    #[must_use]
    pub fn message_limit(mut self, n: u32) -> Self {
        self.message_limit = n;
        self
    }

    /// Refuse (un)subscribe messages naming more than `n` products.
    #[must_use]
    pub fn max_products_per_message(mut self, n: usize) -> Self {
        self.max_products_per_message = Some(n);
        self
    }

    /// Refuse subscriptions that would put more than `n` products on one connection's channel.
    #[must_use]
    pub fn max_products_per_connection(mut self, n: usize) -> Self {
        self.max_products_per_connection = Some(n);
        self
    }

    /// Send (or not) closed candles' final states.
    #[must_use]
    pub fn finalize_candles(mut self, on: bool) -> Self {
        self.finalize_candles = on;
        self
    }

    fn validate(&self) -> Result<()> {
        let periods =
            [self.heartbeat_interval, self.candle_interval, self.ticker_interval, self.ticker_batch_interval];
        let day = Duration::from_secs(86_400);
        if periods.iter().chain([&self.subscribe_deadline]).any(|d| d.is_zero() || *d > day) {
            return Err(Error::Config(
                "sim websocket intervals and subscribe_deadline must be greater than zero and at most 24 hours".into(),
            ));
        }
        if self.message_limit == 0 || self.connection_limit == 0 {
            return Err(Error::Config(
                "sim websocket message_limit and connection_limit must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

impl SimBuilder {
    /// The WebSocket endpoint's settings (default [`WsConfig::default`]).
    pub fn ws(mut self, cfg: WsConfig) -> Self {
        self.ws = cfg;
        self
    }
}

/// A fault for the WebSocket endpoint; [`SimHandle::ws_fault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WsFault {
    /// Reset every open connection now (no close frame).
    DropConnections,
    /// The next message of every open connection skips this many sequence numbers.
    SkipSequence(u64),
    /// Every open connection sends nothing, not even heartbeats or acknowledgements, for this
    /// long (tokio's clock); client messages are still applied.
    Silence(Duration),
    /// Refuse the next `n` subscribe messages with an error frame.
    RefuseSubscriptions(u32),
}

/// A fault for the open connections that carry one product; [`SimHandle::ws_fault_on`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WsConnFault {
    /// Reset the connection now (no close frame).
    Drop,
    /// Its next message skips this many sequence numbers.
    SkipSequence(u64),
}

/// A snapshot of the WebSocket endpoint's counters; [`SimHandle::ws_stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct WsStats {
    /// Connections accepted (handshake completed).
    pub connections_accepted: u64,
    /// Connections refused: over the connection limit (HTTP 429) or while down.
    pub connections_refused: u64,
    /// Connections open now.
    pub open_connections: u64,
    /// Connections closed for sending no subscribe in time.
    pub closed_without_subscribe: u64,
    /// Client messages received.
    pub client_messages: u64,
    /// Subscribe messages applied.
    pub subscribe_messages: u64,
    /// Unsubscribe messages applied.
    pub unsubscribe_messages: u64,
    /// Applied messages that carried a `jwt`.
    pub authenticated_messages: u64,
    /// Client messages refused: over the message limit, by a fault, or malformed.
    pub refused_messages: u64,
    /// The most client messages received in any one-second window.
    pub max_client_messages_in_any_1s: u64,
    /// Messages sent, by channel (`"error"` for error frames).
    pub messages_sent_by_channel: BTreeMap<String, u64>,
    /// Faults applied.
    pub faults: u64,
}

impl WsStats {
    /// Messages sent on `channel`.
    pub fn sent(&self, channel: &str) -> u64 {
        self.messages_sent_by_channel.get(channel).copied().unwrap_or(0)
    }
}

#[derive(Debug, Clone)]
enum ConnFault {
    Drop,
    Skip(u64),
    Silence(Duration),
    /// A fault for the connections subscribed to this product (on any channel).
    On(ProductId, WsConnFault),
}

/// The endpoint's state inside the exchange's shared state.
pub(super) struct WsShared {
    addr: SocketAddr,
    cfg: WsConfig,
    stats: Mutex<WsStats>,
    /// Accepted client messages and connection times in the last second.
    messages: Mutex<VecDeque<Instant>>,
    received: Mutex<VecDeque<Instant>>,
    connections: Mutex<VecDeque<Instant>>,
    refuse: Mutex<u32>,
    faults: broadcast::Sender<ConnFault>,
}

/// Bind the endpoint's listener.
pub(super) async fn bind(cfg: WsConfig) -> Result<(TcpListener, WsShared)> {
    cfg.validate()?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(|e| Error::Config(format!("could not bind the sim websocket port: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Config(format!("could not read the sim websocket address: {e}")))?;
    let (faults, _) = broadcast::channel(64);
    let shared = WsShared {
        addr,
        cfg,
        stats: Mutex::new(WsStats::default()),
        messages: Mutex::new(VecDeque::new()),
        received: Mutex::new(VecDeque::new()),
        connections: Mutex::new(VecDeque::new()),
        refuse: Mutex::new(0),
        faults,
    };
    Ok((listener, shared))
}

/// Admit one event into a sliding one-second window of at most `limit`.
fn admit(window: &Mutex<VecDeque<Instant>>, limit: u32, now: Instant) -> bool {
    let mut w = lock(window);
    while w.front().is_some_and(|t| now.saturating_duration_since(*t) >= WINDOW) {
        w.pop_front();
    }
    if w.len() < limit as usize {
        w.push_back(now);
        true
    } else {
        false
    }
}

impl WsShared {
    pub(super) fn reset_stats(&self) {
        let open = lock(&self.stats).open_connections;
        *lock(&self.stats) = WsStats { open_connections: open, ..WsStats::default() };
    }

    fn sent(&self, channel: &str) {
        *lock(&self.stats).messages_sent_by_channel.entry(channel.to_string()).or_default() += 1;
    }

    /// Count a received client message; whether it is within the message limit.
    fn receive(&self, now: Instant) -> bool {
        let within = admit(&self.messages, self.cfg.message_limit, now);
        let in_window = {
            let mut r = lock(&self.received);
            while r.front().is_some_and(|t| now.saturating_duration_since(*t) >= WINDOW) {
                r.pop_front();
            }
            r.push_back(now);
            r.len() as u64
        };
        let mut s = lock(&self.stats);
        s.client_messages += 1;
        s.max_client_messages_in_any_1s = s.max_client_messages_in_any_1s.max(in_window);
        within
    }
}

impl SimHandle {
    /// `ws://127.0.0.1:PORT`: the market-data WebSocket endpoint (see [`WsConfig`]).
    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.shared.ws.addr)
    }

    /// Apply a [`WsFault`] now.
    pub fn ws_fault(&self, fault: WsFault) {
        let ws = &self.shared.ws;
        lock(&ws.stats).faults += 1;
        let conn = match fault {
            WsFault::DropConnections => ConnFault::Drop,
            WsFault::SkipSequence(n) => ConnFault::Skip(n),
            WsFault::Silence(d) => ConnFault::Silence(d),
            WsFault::RefuseSubscriptions(n) => {
                *lock(&ws.refuse) += n;
                return;
            }
        };
        let _ = ws.faults.send(conn);
    }

    /// Apply a [`WsConnFault`] now to every open connection subscribed to `product` (on any
    /// channel), and to no other: what one connection of a client's several sees.
    pub fn ws_fault_on(&self, product: &ProductId, fault: WsConnFault) {
        let ws = &self.shared.ws;
        lock(&ws.stats).faults += 1;
        let _ = ws.faults.send(ConnFault::On(product.book_id(), fault));
    }

    /// A snapshot of the WebSocket endpoint's counters ([`reset_stats`](Self::reset_stats)
    /// zeroes them too, except open connections).
    pub fn ws_stats(&self) -> WsStats {
        lock(&self.shared.ws.stats).clone()
    }
}

/// The accept loop, until `stop`.
pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    let refused = |s: &Shared| lock(&s.ws.stats).connections_refused += 1;
    accept_until_stopped(&listener, &shared, stop, refused, connection).await.shutdown().await;
}

/// Counts an open connection while alive.
struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        let mut s = lock(&self.0.ws.stats);
        s.open_connections = s.open_connections.saturating_sub(1);
    }
}

async fn connection(stream: TcpStream, shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    let admitted = admit(&shared.ws.connections, shared.ws.cfg.connection_limit, Instant::now());
    // The signature is tungstenite's handshake `Callback`; its error type is not ours to shrink.
    #[allow(clippy::result_large_err)]
    let callback = move |_req: &Request, resp: Response| -> std::result::Result<Response, ErrorResponse> {
        if admitted {
            Ok(resp)
        } else {
            let mut e = ErrorResponse::new(Some("too many connections".into()));
            *e.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            Err(e)
        }
    };
    let handshake = tokio_tungstenite::accept_hdr_async(stream, callback);
    let ws = match tokio::time::timeout(Duration::from_secs(5), handshake).await {
        Ok(Ok(ws)) if admitted => ws,
        _ => {
            lock(&shared.ws.stats).connections_refused += u64::from(!admitted);
            return;
        }
    };
    {
        let mut s = lock(&shared.ws.stats);
        s.connections_accepted += 1;
        s.open_connections += 1;
    }
    let _open = OpenGuard(Arc::clone(&shared));
    let faults = shared.ws.faults.subscribe();
    Conn::new(Arc::clone(&shared)).run(ws, stop, faults).await;
}

/// One connection's state.
struct Conn {
    shared: Arc<Shared>,
    seq: u64,
    skip: u64,
    silent_until: Option<Instant>,
    heartbeats: bool,
    heartbeat_counter: u64,
    subs: BTreeMap<&'static str, BTreeSet<ProductId>>,
    subscribed: bool,
    /// The candle bucket each product was last sent in (to send finals after a close).
    candle_bucket: HashMap<ProductId, i64>,
    /// The current UTC day's candle per product, refreshed each minute: `(minute, low, high)`.
    day: HashMap<ProductId, (i64, Decimal, Decimal)>,
    started: Instant,
}

enum Outcome {
    Continue,
    Close,
}

impl Conn {
    fn new(shared: Arc<Shared>) -> Self {
        Conn {
            shared,
            seq: 0,
            skip: 0,
            silent_until: None,
            heartbeats: false,
            heartbeat_counter: 0,
            subs: BTreeMap::new(),
            subscribed: false,
            candle_bucket: HashMap::new(),
            day: HashMap::new(),
            started: Instant::now(),
        }
    }

    async fn run(
        mut self,
        mut ws: WebSocketStream<TcpStream>,
        mut stop: watch::Receiver<bool>,
        mut faults: broadcast::Receiver<ConnFault>,
    ) {
        let cfg = self.shared.ws.cfg.clone();
        let every = |d: Duration| {
            let mut i = tokio::time::interval_at(Instant::now() + d, d);
            i.set_missed_tick_behavior(MissedTickBehavior::Skip);
            i
        };
        let (mut hb, mut candles, mut ticker, mut batch) = (
            every(cfg.heartbeat_interval),
            every(cfg.candle_interval),
            every(cfg.ticker_interval),
            every(cfg.ticker_batch_interval),
        );
        let deadline = self.started + cfg.subscribe_deadline;
        let mut down = self.shared.down.subscribe();
        loop {
            let frames: Vec<Envelope> = tokio::select! {
                () = until_true(&mut stop) => {
                    let _ = tokio::time::timeout(WINDOW, ws.close(None)).await;
                    return;
                }
                () = until_true(&mut down) => {
                    let _ = ws.get_ref().set_zero_linger();
                    return;
                }
                f = faults.recv() => match f {
                    Ok(ConnFault::On(p, fault)) => {
                        if !self.subs.values().any(|set| set.contains(&p)) {
                            continue;
                        }
                        match fault {
                            WsConnFault::Drop => {
                                let _ = ws.get_ref().set_zero_linger();
                                return;
                            }
                            WsConnFault::SkipSequence(n) => {
                                self.skip = self.skip.saturating_add(n);
                                continue;
                            }
                        }
                    }
                    Ok(ConnFault::Drop) => {
                        let _ = ws.get_ref().set_zero_linger();
                        return;
                    }
                    Ok(ConnFault::Skip(n)) => {
                        self.skip = self.skip.saturating_add(n);
                        continue;
                    }
                    Ok(ConnFault::Silence(d)) => {
                        // A silence too long to represent lasts as long as the connection.
                        self.silent_until = Some(Instant::now().checked_add(d).unwrap_or_else(far_future));
                        continue;
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(text))) => self.on_client(text.as_str()),
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                    Some(Ok(_)) => continue,
                },
                _ = hb.tick() => {
                    if !self.heartbeats {
                        continue;
                    }
                    self.heartbeat_counter += 1;
                    let now_utc = self.shared.clock.now_utc();
                    let elapsed = Instant::now().saturating_duration_since(self.started).as_secs_f64();
                    vec![self.envelope(channel::HEARTBEATS, vec![Event {
                        current_time: Some(format!("{} m=+{elapsed:.9}", go_time(now_utc))),
                        heartbeat_counter: Some(match cfg.dialect {
                            WsDialect::Production => serde_json::Value::from(self.heartbeat_counter),
                            WsDialect::Documented => serde_json::Value::String(self.heartbeat_counter.to_string()),
                        }),
                        ..Event::default()
                    }])]
                }
                _ = candles.tick() => self.candles_update(),
                _ = ticker.tick() => self.tickers(channel::TICKER, "update", None).into_iter().collect(),
                _ = batch.tick() => self.tickers(channel::TICKER_BATCH, "update", None).into_iter().collect(),
                () = tokio::time::sleep_until(deadline), if !self.subscribed => {
                    lock(&self.shared.ws.stats).closed_without_subscribe += 1;
                    let _ = tokio::time::timeout(WINDOW, ws.close(None)).await;
                    return;
                }
            };
            if let Outcome::Close = self.send(&mut ws, frames).await {
                return;
            }
        }
    }

    async fn send(&mut self, ws: &mut WebSocketStream<TcpStream>, frames: Vec<Envelope>) -> Outcome {
        if self.silent_until.is_some_and(|t| Instant::now() < t) {
            return Outcome::Continue;
        }
        for mut env in frames {
            let name =
                if env.kind.as_deref() == Some("error") { "error".to_string() } else { env.channel.clone() };
            if env.kind.is_none() {
                let seq = self.seq.saturating_add(self.skip);
                self.skip = 0;
                self.seq = seq.saturating_add(1);
                env.sequence_num = Some(seq);
            }
            let Ok(text) = serde_json::to_string(&env) else { continue };
            if ws.send(Message::text(text)).await.is_err() {
                return Outcome::Close;
            }
            self.shared.ws.sent(&name);
        }
        Outcome::Continue
    }

    fn envelope(&self, channel: &str, events: Vec<Event>) -> Envelope {
        Envelope {
            channel: channel.to_string(),
            client_id: match self.shared.ws.cfg.dialect {
                WsDialect::Production => None,
                WsDialect::Documented => Some(String::new()),
            },
            timestamp: self.shared.clock.now_utc().format(&Rfc3339).unwrap_or_default(),
            sequence_num: None,
            events,
            kind: None,
            message: None,
        }
    }

    fn error(message: &str) -> Envelope {
        Envelope { kind: Some("error".into()), message: Some(message.to_string()), ..Envelope::default() }
    }

    /// Apply one client message; the frames to answer with.
    fn on_client(&mut self, text: &str) -> Vec<Envelope> {
        let ws = &self.shared.ws;
        if !ws.receive(Instant::now()) {
            lock(&ws.stats).refused_messages += 1;
            return vec![Self::error(&format!(
                "rate limit exceeded: at most {} messages per second",
                ws.cfg.message_limit
            ))];
        }
        let Ok(m) = serde_json::from_str::<SubscribeMessage>(text) else {
            lock(&ws.stats).refused_messages += 1;
            return vec![Self::error("malformed message")];
        };
        let subscribe = match m.kind.as_str() {
            "subscribe" => true,
            "unsubscribe" => false,
            _ => {
                lock(&ws.stats).refused_messages += 1;
                return vec![Self::error("type must be subscribe or unsubscribe")];
            }
        };
        if subscribe {
            let mut refuse = lock(&ws.refuse);
            if *refuse > 0 {
                *refuse -= 1;
                lock(&ws.stats).refused_messages += 1;
                return vec![Self::error("failure to subscribe")];
            }
        }
        let Some(ch) = [channel::HEARTBEATS, channel::CANDLES, channel::TICKER, channel::TICKER_BATCH]
            .into_iter()
            .find(|c| *c == m.channel)
        else {
            lock(&ws.stats).refused_messages += 1;
            return vec![Self::error(&format!(
                "unknown channel {:?}",
                crate::error::truncate(&m.channel, 40)
            ))];
        };
        let mut out = Vec::new();
        let mut products = Vec::new();
        for id in &m.product_ids {
            match ProductId::new(id) {
                Ok(p) if self.shared.market.get(p.as_str()).is_some() => {
                    products.push(match ws.cfg.dialect {
                        // Production answers a `-USDC` subscription as its `-USD` twin.
                        WsDialect::Production => p.book_id(),
                        WsDialect::Documented => p,
                    })
                }
                _ => out.push(Self::error(&format!("unknown product {:?}", crate::error::truncate(id, 40)))),
            }
        }
        if let Some(max) = ws.cfg.max_products_per_message
            && m.product_ids.len() > max
        {
            lock(&ws.stats).refused_messages += 1;
            out.push(Self::error(&format!("too many products in one message: at most {max}")));
            return out;
        }
        if let Some(max) = ws.cfg.max_products_per_connection
            && subscribe
            && ch != channel::HEARTBEATS
        {
            let set = self.subs.get(ch);
            let new = products.iter().filter(|p| set.is_none_or(|s| !s.contains(*p))).count();
            if set.map_or(0, BTreeSet::len) + new > max {
                lock(&ws.stats).refused_messages += 1;
                out.push(Self::error(&format!(
                    "too many products on one connection: at most {max} per channel"
                )));
                return out;
            }
        }
        {
            let mut s = lock(&ws.stats);
            if subscribe {
                s.subscribe_messages += 1;
            } else {
                s.unsubscribe_messages += 1;
            }
            s.authenticated_messages += u64::from(m.jwt.is_some());
        }
        self.subscribed |= subscribe;
        let mut added = Vec::new();
        if ch == channel::HEARTBEATS {
            self.heartbeats = subscribe;
        } else if subscribe {
            let set = self.subs.entry(ch).or_default();
            added = products.into_iter().filter(|p| set.insert(p.clone())).collect();
        } else if let Some(set) = self.subs.get_mut(ch) {
            if m.product_ids.is_empty() {
                set.clear();
            } else {
                for p in &products {
                    set.remove(p);
                }
            }
            if ch == channel::CANDLES {
                self.candle_bucket.retain(|p, _| set.contains(p));
            }
        }
        self.subs.retain(|_, set| !set.is_empty());
        let mut ack: BTreeMap<String, Vec<String>> = self
            .subs
            .iter()
            .map(|(c, set)| ((*c).to_string(), set.iter().map(ToString::to_string).collect()))
            .collect();
        if self.heartbeats {
            ack.insert(channel::HEARTBEATS.to_string(), Vec::new());
        }
        out.push(
            self.envelope(
                channel::SUBSCRIPTIONS,
                vec![Event { subscriptions: Some(ack), ..Event::default() }],
            ),
        );
        if !added.is_empty() {
            match ch {
                channel::CANDLES => out.push(self.candles_frame("snapshot", &added)),
                channel::TICKER | channel::TICKER_BATCH => {
                    out.extend(self.tickers(ch, "snapshot", Some(&added)))
                }
                _ => {}
            }
        }
        out
    }

    fn candles_update(&mut self) -> Vec<Envelope> {
        let products: Vec<ProductId> =
            self.subs.get(channel::CANDLES).map(|s| s.iter().cloned().collect()).unwrap_or_default();
        if products.is_empty() {
            return Vec::new();
        }
        vec![self.candles_frame("update", &products)]
    }

    fn candles_frame(&mut self, kind: &str, products: &[ProductId]) -> Envelope {
        let g = Granularity::FiveMinute;
        let now_utc = self.shared.clock.now_utc();
        let now_ms = unix_ms(now_utc);
        let bucket = g.bucket_start(now_utc).unix_timestamp();
        let market = &self.shared.market;
        let mut list = Vec::new();
        for p in products {
            let Some(spec) = spec_of(market, p) else { continue };
            if self.shared.ws.cfg.finalize_candles
                && let Some(last) = self.candle_bucket.get(p).copied()
                && last < bucket
                && let Some(c) = market.candle(spec, g, last, now_ms)
            {
                list.push(WsCandle::from_candle(p, &c));
            }
            if let Some(c) = market.candle(spec, g, bucket, now_ms) {
                list.push(WsCandle::from_candle(p, &c));
            }
            self.candle_bucket.insert(p.clone(), bucket);
        }
        self.envelope(
            channel::CANDLES,
            vec![Event { kind: kind.into(), candles: Some(list), ..Event::default() }],
        )
    }

    /// A ticker message on `ch` for `only` (or every product subscribed on `ch`).
    fn tickers(&mut self, ch: &str, kind: &str, only: Option<&[ProductId]>) -> Option<Envelope> {
        let products: Vec<ProductId> = match only {
            Some(list) => list.to_vec(),
            None => self.subs.get(ch).map(|s| s.iter().cloned().collect()).unwrap_or_default(),
        };
        if products.is_empty() {
            return None;
        }
        let now_utc = self.shared.clock.now_utc();
        let ms = unix_ms(now_utc);
        let minute = ms.div_euclid(60_000);
        let mut list = Vec::new();
        // Production's `ticker_batch` carries no best bid/ask (COINBASE.md §5).
        let quotes = ch == channel::TICKER || self.shared.ws.cfg.dialect == WsDialect::Documented;
        for p in &products {
            let market = &self.shared.market;
            let Some(spec) = spec_of(market, p) else { continue };
            let price = market.price(spec, ms);
            let (bid, ask) = market.bid_ask(spec, ms);
            let prev = market.price(spec, ms - 86_400_000);
            let change = if prev.is_zero() {
                Decimal::ZERO
            } else {
                ((price - prev) / prev * Decimal::ONE_HUNDRED).round_dp(8)
            };
            let (low, high) = match self.day.get(p) {
                Some((m, low, high)) if *m == minute => (*low, *high),
                _ => {
                    let day = Granularity::OneDay.bucket_start(now_utc).unix_timestamp();
                    let (low, high) = market
                        .sampled_candle(spec, Granularity::OneDay, day, ms)
                        .map_or((price, price), |c| (c.low, c.high));
                    self.day.insert(p.clone(), (minute, low, high));
                    (low, high)
                }
            };
            list.push(WsTicker {
                kind: "ticker".into(),
                product_id: p.to_string(),
                price: price.to_string(),
                volume_24_h: market.volume_24h(spec, ms).0.to_string(),
                low_24_h: low.to_string(),
                high_24_h: high.to_string(),
                low_52_w: String::new(),
                high_52_w: String::new(),
                price_percent_chg_24_h: change.to_string(),
                best_bid: if quotes { bid.to_string() } else { String::new() },
                best_bid_quantity: if quotes {
                    market.size(spec, 0xB1, ms, 0).to_string()
                } else {
                    String::new()
                },
                best_ask: if quotes { ask.to_string() } else { String::new() },
                best_ask_quantity: if quotes {
                    market.size(spec, 0xA5, ms, 0).to_string()
                } else {
                    String::new()
                },
            });
        }
        Some(self.envelope(ch, vec![Event { kind: kind.into(), tickers: Some(list), ..Event::default() }]))
    }
}

/// The listed product whose data a subscription to `id` carries: `id` itself or, for the
/// `-USD` twin of a listed `-USDC` product whose twin is not listed, that product (one book).
fn spec_of<'m>(market: &'m Market, id: &ProductId) -> Option<&'m ProductSpec> {
    market
        .get(id.as_str())
        .or_else(|| market.get(&format!("{id}C")).filter(|s| s.id.usd_alias().as_ref() == Some(id)))
}

/// Go's `time.Time` format, as Coinbase's heartbeats show it: `2023-06-23 20:31:56.121961769 +0000 UTC`.
fn go_time(t: OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:09} +0000 UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond()
    )
}

/// An instant no connection outlives (for durations too long to add to now).
fn far_future() -> Instant {
    let now = Instant::now();
    now.checked_add(Duration::from_secs(86_400 * 365 * 30)).unwrap_or(now)
}
