//! The connection tasks: a supervisor spreads the followed products over connections (at
//! most [`StreamConfig::max_products_per_connection`](super::StreamConfig) books each); each
//! connection connects (paced with the others), subscribes (chunked, within the one message
//! budget all of them share), reads, feeds the cache, watches its own sequence and silence,
//! and reconnects with backoff, marking stale and repairing only its own products.
//!
//! Subscriptions are reconciled against the acknowledged state: the exchange's
//! `subscriptions` message lists everything the connection is subscribed to, so a refused or
//! lost (un)subscribe is simply sent again after `subscribe_timeout`, and products followed or
//! dropped at runtime need no special path.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use tokio::{
    net::TcpStream,
    sync::watch,
    task::JoinHandle,
    time::{Instant, MissedTickBehavior},
};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

use super::{
    ConnState, ProductState, Shared,
    wire::{self, Body, Frame, SubscribeMessage, channel},
};
use crate::{
    coordinated::feed::Merge,
    model::{ProductId, Ticker},
    util::{inc, lock},
};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Resolve once the watched flag is `true` or its sender is gone.
async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// One connection as the supervisor sees it.
struct Slot {
    /// The books it serves.
    books: watch::Sender<BTreeSet<ProductId>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Run until `stop`: keep the followed products spread over connections, one task each.
pub(super) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut desired_rx = shared.desired.subscribe();
    let mut slots: BTreeMap<u32, Slot> = BTreeMap::new();
    let mut next_id: u32 = 0;
    loop {
        desired_rx.mark_unchanged();
        shared.prune().await;
        rebalance(&shared, &mut slots, &mut next_id);
        tokio::select! {
            changed = desired_rx.changed() => if changed.is_err() { break },
            () = until_true(&mut stop) => break,
        }
    }
    for slot in slots.values() {
        slot.stop.send_replace(true);
    }
    for slot in slots.into_values() {
        let _ = slot.task.await;
    }
}

/// Assign every followed book to a connection: books keep their connection, new ones fill
/// the first connection with room (or a new one), connections left empty are stopped (one
/// always stays, for heartbeats).
fn rebalance(shared: &Arc<Shared>, slots: &mut BTreeMap<u32, Slot>, next_id: &mut u32) {
    let cap = shared.cfg.max_products_per_connection.max(1);
    let books: BTreeSet<ProductId> = shared.desired.borrow().iter().map(ProductId::book_id).collect();
    let mut plan: BTreeMap<u32, BTreeSet<ProductId>> = slots
        .iter()
        .map(|(id, s)| (*id, s.books.borrow().iter().filter(|b| books.contains(*b)).cloned().collect()))
        .collect();
    let placed: BTreeSet<ProductId> = plan.values().flatten().cloned().collect();
    for b in books.difference(&placed) {
        let id = match plan.iter().find(|(_, set)| set.len() < cap) {
            Some((id, _)) => *id,
            None => {
                let id = *next_id;
                *next_id = next_id.wrapping_add(1);
                plan.insert(id, BTreeSet::new());
                id
            }
        };
        plan.entry(id).or_default().insert(b.clone());
    }
    if plan.is_empty() {
        plan.insert(*next_id, BTreeSet::new());
        *next_id = next_id.wrapping_add(1);
    }
    if plan.values().any(|set| !set.is_empty()) {
        plan.retain(|_, set| !set.is_empty());
    } else {
        let first = plan.keys().next().copied();
        plan.retain(|id, _| Some(*id) == first);
    }
    // Stop the connections with nothing left to serve.
    let gone: Vec<u32> = slots.keys().filter(|id| !plan.contains_key(*id)).copied().collect();
    for id in gone {
        if let Some(slot) = slots.remove(&id) {
            slot.stop.send_replace(true);
        }
        lock(&shared.state).conns.remove(&id);
        shared.refresh_connected();
    }
    for (id, set) in plan {
        match slots.get(&id) {
            Some(slot) => {
                slot.books.send_if_modified(|cur| {
                    if *cur == set {
                        false
                    } else {
                        *cur = set.clone();
                        true
                    }
                });
                lock(&shared.state).conns.entry(id).or_default().books = set;
            }
            None => {
                lock(&shared.state)
                    .conns
                    .insert(id, ConnState { books: set.clone(), ..ConnState::default() });
                shared.refresh_connected();
                let (books, books_rx) = watch::channel(set);
                let (stop, stop_rx) = watch::channel(false);
                let task = tokio::spawn(connection(Arc::clone(shared), id, books_rx, stop_rx));
                slots.insert(id, Slot { books, stop, task });
            }
        }
    }
}

/// One connection's loop until `stop`: connect, serve a session, mark its products stale,
/// back off, reconnect.
async fn connection(
    shared: Arc<Shared>,
    id: u32,
    mut books: watch::Receiver<BTreeSet<ProductId>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut failures: u32 = 0;
    let mut first = true;
    loop {
        if *stop.borrow() {
            break;
        }
        let connected = tokio::select! {
            r = async { shared.open_slot().await; connect(&shared).await } => r,
            () = until_true(&mut stop) => break,
        };
        match connected {
            Ok(ws) => {
                inc(&shared.counters.connections);
                if !first {
                    inc(&shared.counters.reconnects);
                }
                first = false;
                shared.set_connected(id, true);
                let own = books.borrow_and_update().clone();
                let end = Session::new(&shared, id, own).run(ws, &mut stop, &mut books).await;
                shared.set_connected(id, false);
                shared.mark_stale(id).await;
                if end.delivered {
                    failures = 0;
                }
                if end.stopped {
                    break;
                }
                tracing::debug!(
                    connection = id,
                    reason = end.reason,
                    "market stream disconnected; reconnecting"
                );
            }
            Err(e) => {
                inc(&shared.counters.connect_failures);
                tracing::debug!(connection = id, error = %e, "market stream could not connect");
            }
        }
        failures = failures.saturating_add(1);
        let delay = backoff(shared.cfg.reconnect_min, shared.cfg.reconnect_max, failures, fastrand::f64());
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = until_true(&mut stop) => break,
        }
    }
    // A connection the supervisor retired is already gone from the stats; one stopped with the
    // stream stays there, closed.
    shared.set_connected(id, false);
}

/// The delay before reconnect attempt `n` (1-based): `min * 2^(n-1)` capped at `max`, then
/// scaled by a jitter factor in `[0.5, 1.0]` (`u` in `[0, 1)`), never below `min`.
pub(super) fn backoff(min: Duration, max: Duration, n: u32, u: f64) -> Duration {
    let exp = min.saturating_mul(1u32 << n.saturating_sub(1).min(20)).min(max);
    let u = if u.is_finite() { u.clamp(0.0, 1.0) } else { 0.0 };
    exp.mul_f64(0.5 + 0.5 * u).max(min)
}

async fn connect(shared: &Shared) -> Result<Ws, String> {
    let fut = tokio_tungstenite::connect_async_with_config(shared.cfg.url.as_str(), None, true);
    match tokio::time::timeout(shared.cfg.connect_timeout, fut).await {
        Ok(Ok((ws, _response))) => Ok(ws),
        Ok(Err(e)) => Err(crate::error::truncate(&e.to_string(), 200)),
        Err(_) => Err("timed out".into()),
    }
}

/// How a session ended.
struct End {
    /// The stream was stopped.
    stopped: bool,
    /// Data arrived during the session (resets the backoff).
    delivered: bool,
    reason: &'static str,
}

/// One connection's bookkeeping.
pub(super) struct Session {
    shared: Arc<Shared>,
    /// The connection's id.
    id: u32,
    last_seq: Option<u64>,
    last_msg: Instant,
    /// Acknowledged subscriptions: channel to products.
    acked: BTreeMap<String, BTreeSet<ProductId>>,
    heartbeats_acked: bool,
    heartbeats_sent: Option<Instant>,
    /// (Un)subscriptions sent and not yet acknowledged: `(channel, product)` to
    /// `(subscribe?, sent at)`.
    inflight: HashMap<(&'static str, ProductId), (bool, Instant)>,
    outbox: VecDeque<SubscribeMessage>,
    /// No message sent yet on this connection (counted in the shared budget's
    /// `waiting_first` while true).
    first_pending: bool,
    delivered: bool,
    /// The books assigned to this connection.
    own: BTreeSet<ProductId>,
    /// This connection's followed products by the id the exchange's market-data channels use
    /// for their book (a `-USDC` product's `-USD` twin, [`ProductId::book_id`]): what is
    /// subscribed, and where pushed data goes. Rebuilt whenever the followed products or the
    /// connection's books change.
    books: BTreeMap<ProductId, Vec<ProductId>>,
}

const WINDOW: Duration = Duration::from_secs(1);

/// How often every cached series of a product is checked for derivation, besides at each
/// five-minute close.
const RESCAN: Duration = Duration::from_secs(5);

/// How long a connection that has already subscribed waits for one that has not (polling).
const YIELD_TO_FIRST: Duration = Duration::from_millis(20);

impl Drop for Session {
    fn drop(&mut self) {
        self.first_sent();
    }
}

impl Session {
    fn new(shared: &Arc<Shared>, id: u32, own: BTreeSet<ProductId>) -> Self {
        lock(&shared.pace).waiting_first += 1;
        Session {
            shared: Arc::clone(shared),
            id,
            last_seq: None,
            last_msg: Instant::now(),
            acked: BTreeMap::new(),
            heartbeats_acked: false,
            heartbeats_sent: None,
            inflight: HashMap::new(),
            outbox: VecDeque::new(),
            first_pending: true,
            delivered: false,
            own,
            books: BTreeMap::new(),
        }
    }

    fn end(&self, stopped: bool, reason: &'static str) -> End {
        End { stopped, delivered: self.delivered, reason }
    }

    async fn run(
        mut self,
        mut ws: Ws,
        stop: &mut watch::Receiver<bool>,
        own_rx: &mut watch::Receiver<BTreeSet<ProductId>>,
    ) -> End {
        let mut desired_rx = self.shared.desired.subscribe();
        desired_rx.mark_unchanged();
        own_rx.mark_unchanged();
        self.follow();
        self.reconcile(Instant::now());
        let mut housekeeping = tokio::time::interval_at(Instant::now() + WINDOW, WINDOW);
        housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let send_at = self.next_send_at(Instant::now());
            tokio::select! {
                () = until_true(stop) => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                    return self.end(true, "stopped");
                }
                msg = ws.next() => match msg {
                    None => return self.end(false, "closed by the exchange"),
                    Some(Err(e)) => {
                        tracing::debug!(connection = self.id, error = %e, "market stream read failed");
                        return self.end(false, "read error");
                    }
                    Some(Ok(Message::Text(text))) => self.on_text(text.as_str()).await,
                    Some(Ok(Message::Close(_))) => return self.end(false, "closed by the exchange"),
                    Some(Ok(Message::Ping(_))) => {
                        self.last_msg = Instant::now();
                        // Send the pong tungstenite queued.
                        if ws.flush().await.is_err() {
                            return self.end(false, "write error");
                        }
                    }
                    Some(Ok(_)) => self.last_msg = Instant::now(),
                },
                () = tokio::time::sleep_until(send_at.unwrap_or_else(Instant::now)), if send_at.is_some() => {
                    // Take a slot of the shared budget; another connection may have taken the
                    // one this wake-up was for.
                    if !self.shared.take_send_slot(Instant::now(), self.first_pending) {
                        continue;
                    }
                    if let Some(mut m) = self.outbox.pop_front() {
                        self.first_sent();
                        let sign = self.shared.cfg.jwt_on_market_data || channel::needs_jwt(&m.channel);
                        m.jwt = self.shared.credentials.as_ref().filter(|_| sign).map(crate::Credentials::ws_jwt);
                        let subscribe = m.kind == "subscribe";
                        let text = match serde_json::to_string(&m) {
                            Ok(t) => t,
                            Err(_) => continue,
                        };
                        if ws.send(Message::text(text)).await.is_err() {
                            return self.end(false, "write error");
                        }
                        inc(if subscribe {
                            &self.shared.counters.subscribe_messages
                        } else {
                            &self.shared.counters.unsubscribe_messages
                        });
                    }
                }
                changed = desired_rx.changed() => {
                    if changed.is_ok() {
                        self.follow();
                        self.reconcile(Instant::now());
                    }
                }
                changed = own_rx.changed() => {
                    if changed.is_ok() {
                        self.own = own_rx.borrow_and_update().clone();
                        self.follow();
                        self.reconcile(Instant::now());
                    }
                }
                _ = housekeeping.tick() => {
                    let now = Instant::now();
                    if now.saturating_duration_since(self.last_msg) > self.shared.cfg.silence_timeout {
                        inc(&self.shared.counters.silences);
                        if let Some(c) = lock(&self.shared.state).conns.get_mut(&self.id) {
                            c.silences += 1;
                        }
                        return self.end(false, "silent");
                    }
                    self.reconcile(now);
                    self.touch_tickers(now).await;
                }
            }
        }
    }

    /// When the next queued message may be sent (the shared budget of `messages_per_second`
    /// in any second, connections that have not sent yet first).
    /// This connection no longer waits for its first message (sent it, or is gone).
    fn first_sent(&mut self) {
        if std::mem::take(&mut self.first_pending) {
            let mut p = lock(&self.shared.pace);
            p.waiting_first = p.waiting_first.saturating_sub(1);
        }
    }

    fn next_send_at(&mut self, now: Instant) -> Option<Instant> {
        if self.outbox.is_empty() {
            return None;
        }
        Some(self.shared.next_send_slot(now, self.first_pending))
    }

    fn queue(&mut self, subscribe: bool, channel: &'static str, products: Vec<ProductId>, now: Instant) {
        for p in &products {
            self.inflight.insert((channel, p.clone()), (subscribe, now));
        }
        self.outbox.push_back(SubscribeMessage {
            kind: if subscribe { "subscribe" } else { "unsubscribe" }.into(),
            product_ids: products.iter().map(ToString::to_string).collect(),
            channel: channel.into(),
            jwt: None,
        });
    }

    /// Group this connection's followed products by book (see `books`).
    fn follow(&mut self) {
        let mut books: BTreeMap<ProductId, Vec<ProductId>> = BTreeMap::new();
        for p in self.shared.desired.borrow().iter() {
            let book = p.book_id();
            if self.own.contains(&book) {
                books.entry(book).or_default().push(p.clone());
            }
        }
        self.books = books;
    }

    /// The followed products a pushed entry for `product` belongs to: those of its book.
    fn targets(&self, product: &ProductId) -> Vec<ProductId> {
        self.books.get(&product.book_id()).cloned().unwrap_or_default()
    }

    /// Queue whatever (un)subscriptions bring the connection to its followed products (by
    /// book: the ids the exchange acknowledges), at most `max_products_per_message` each.
    fn reconcile(&mut self, now: Instant) {
        let timeout = self.shared.cfg.subscribe_timeout;
        let chunk = self.shared.cfg.max_products_per_message.max(1);
        if !self.heartbeats_acked
            && self.heartbeats_sent.is_none_or(|t| now.saturating_duration_since(t) >= timeout)
        {
            self.heartbeats_sent = Some(now);
            self.queue(true, channel::HEARTBEATS, Vec::new(), now);
        }
        let desired: BTreeSet<ProductId> = self.books.keys().cloned().collect();
        for ch in [channel::CANDLES, self.shared.cfg.ticker_channel.as_str()] {
            let acked = self.acked.get(ch).cloned().unwrap_or_default();
            let pending = |p: &ProductId| {
                self.inflight
                    .get(&(ch, p.clone()))
                    .is_some_and(|(_, at)| now.saturating_duration_since(*at) < timeout)
            };
            let subs: Vec<ProductId> =
                desired.iter().filter(|p| !acked.contains(*p) && !pending(p)).cloned().collect();
            let unsubs: Vec<ProductId> =
                acked.iter().filter(|p| !desired.contains(*p) && !pending(p)).cloned().collect();
            for part in subs.chunks(chunk) {
                self.queue(true, ch, part.to_vec(), now);
            }
            for part in unsubs.chunks(chunk) {
                self.queue(false, ch, part.to_vec(), now);
            }
        }
    }

    /// Keep this connection's pushed tickers fresh while it is healthy.
    async fn touch_tickers(&mut self, now: Instant) {
        let hold = self.shared.cfg.ticker_hold;
        let due: Vec<(ProductId, Instant)> = {
            let st = lock(&self.shared.state);
            st.products
                .iter()
                .filter(|(p, s)| s.ticker_live && self.own.contains(&p.book_id()))
                .filter_map(|(p, s)| s.ticker_at.map(|at| (p.clone(), at)))
                .filter(|(_, at)| now.saturating_duration_since(*at) >= hold / 2)
                .collect()
        };
        for (p, at) in due {
            self.shared.source.feed_touch_ticker(&p, at, hold).await;
        }
    }

    /// Decode and apply one frame, timing the work ([`StreamStats::busy_us`](super::StreamStats)).
    async fn on_text(&mut self, text: &str) {
        // Real time on purpose (the one exception to the crate's tokio-clock rule besides
        // JWTs): this measures the feed's work, not the market's time, and tokio's paused
        // clock would read zero.
        let t0 = std::time::Instant::now();
        self.apply_text(text).await;
        let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.shared.counters.busy_ns.fetch_add(ns, std::sync::atomic::Ordering::Relaxed);
    }

    async fn apply_text(&mut self, text: &str) {
        let shared = Arc::clone(&self.shared);
        let c = &shared.counters;
        inc(&c.messages);
        self.last_msg = Instant::now();
        let decoded = wire::decode(text);
        let (channel, seq, at, body) = match decoded {
            Ok(Frame::Data { channel, seq, at, body }) => (channel, seq, at, body),
            Ok(Frame::Error(message)) => {
                inc(&c.exchange_errors);
                shared.count_message(self.id, "error", None);
                tracing::warn!(connection = self.id, %message, "market stream error frame");
                return;
            }
            Err(e) => {
                inc(&c.decode_errors);
                shared.count_message(self.id, "undecodable", None);
                tracing::debug!(connection = self.id, error = %e, "undecodable market stream frame");
                return;
            }
        };
        let gap = shared.count_message(self.id, &channel, seq.map(|s| (self.last_seq, s)));
        if let Some(seq) = seq {
            if gap {
                inc(&c.sequence_gaps);
                tracing::debug!(connection = self.id, last = ?self.last_seq, seq, "market stream sequence gap; marking its data stale");
                shared.mark_stale(self.id).await;
            }
            self.last_seq = Some(seq);
        }
        let clock = shared.source.feed_clock();
        match body {
            Body::Tickers { tickers, skipped } => {
                c.decode_errors.fetch_add(skipped, std::sync::atomic::Ordering::Relaxed);
                for mut t in tickers {
                    if at.is_none() {
                        t.time = clock.now_utc();
                    }
                    for p in self.targets(&t.product) {
                        let t = Ticker { product: p.clone(), ..t.clone() };
                        let stored = shared.source.feed_ticker(t, shared.cfg.ticker_hold).await;
                        inc(&c.tickers_applied);
                        self.delivered = true;
                        let mut st = lock(&shared.state);
                        let s = st.products.entry(p).or_default();
                        s.ticker_at = Some(stored);
                        s.ticker_live = true;
                    }
                }
            }
            Body::Candles { candles, skipped } => {
                c.decode_errors.fetch_add(skipped, std::sync::atomic::Ordering::Relaxed);
                let at = at.unwrap_or_else(|| clock.now_utc());
                let grace = shared.cfg.candle_grace;
                let pushed: Vec<(ProductId, &Vec<crate::model::Candle>)> = candles
                    .iter()
                    .flat_map(|(q, list)| self.targets(q).into_iter().map(move |p| (p, list)))
                    .collect();
                for (p, list) in pushed {
                    let now = Instant::now();
                    let (mark, known, scanned_at) = {
                        let st = lock(&shared.state);
                        let s = st.products.get(&p);
                        (
                            s.and_then(|s| s.mark),
                            s.map(|s| s.derived.iter().copied().collect::<Vec<_>>()),
                            s.and_then(|s| s.scanned_at),
                        )
                    };
                    match shared.source.feed_candles(&p, list, at, mark, grace).await {
                        Merge::Merged(m) => {
                            inc(&c.candle_merges);
                            self.delivered = true;
                            // Look for newly derivable series when a bucket closes (every derived
                            // bucket closes with a five-minute one), when continuity was just
                            // regained, and every `RESCAN` (a REST refresh may have just moved a
                            // series into a bucket the stream covers from its start); in
                            // between, update only the series already derived.
                            let rolled = mark.is_none_or(|old| old.bucket() != m.bucket());
                            let rescan = rolled
                                || scanned_at.is_none_or(|t| now.saturating_duration_since(t) >= RESCAN);
                            let only = if rescan { None } else { known.as_deref() };
                            let skip = only.is_some_and(<[_]>::is_empty);
                            let derived = if shared.cfg.aggregate && !skip {
                                shared.source.feed_derive(&p, grace, only).await
                            } else {
                                Vec::new()
                            };
                            c.derived_updates
                                .fetch_add(derived.len() as u64, std::sync::atomic::Ordering::Relaxed);
                            let mut st = lock(&shared.state);
                            let s = st.products.entry(p).or_default();
                            s.mark = Some(m);
                            s.candle_at = Some(now);
                            if rescan {
                                s.scanned_at = Some(now);
                            }
                            s.candles_live = true;
                            s.derived.extend(derived);
                        }
                        Merge::Ignored => {}
                        Merge::NeedsRepair => spawn_repair(&shared, p),
                    }
                }
            }
            Body::Heartbeat { .. } => {
                inc(&c.heartbeats);
                self.heartbeats_acked = true;
            }
            Body::Subscriptions(map) => self.on_ack(&map),
            Body::Other(_) => {}
        }
    }

    /// The exchange's list of this connection's subscriptions.
    fn on_ack(&mut self, map: &BTreeMap<String, Vec<String>>) {
        if map.contains_key(channel::HEARTBEATS) {
            self.heartbeats_acked = true;
        }
        self.acked = map
            .iter()
            .filter(|(ch, _)| ch.as_str() != channel::HEARTBEATS)
            .map(|(ch, ids)| (ch.clone(), ids.iter().filter_map(|s| ProductId::new(s).ok()).collect()))
            .collect();
        let acked = &self.acked;
        self.inflight.retain(|(ch, p), (subscribe, _)| {
            let has = acked.get(*ch).is_some_and(|s| s.contains(p));
            has != *subscribe
        });
        if let Some(c) = lock(&self.shared.state).conns.get_mut(&self.id) {
            c.acknowledged = acked.iter().map(|(ch, set)| (ch.clone(), set.len() as u64)).collect();
        }
    }
}

/// Repair `product`'s five-minute series in the background (one REST call), then re-derive.
fn spawn_repair(shared: &Arc<Shared>, product: ProductId) {
    let now = Instant::now();
    {
        let mut st = lock(&shared.state);
        let s = st.products.entry(product.clone()).or_default();
        if s.repairing
            || s.repair_at.is_some_and(|t| now.saturating_duration_since(t) < shared.cfg.repair_interval)
        {
            return;
        }
        s.repairing = true;
        s.repair_at = Some(now);
    }
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let c = &shared.counters;
        let derived = match shared.source.feed_repair(&product).await {
            Ok(repaired) => {
                if repaired {
                    inc(&c.repairs);
                }
                if shared.cfg.aggregate {
                    shared.source.feed_derive(&product, shared.cfg.candle_grace, None).await
                } else {
                    Vec::new()
                }
            }
            Err(e) => {
                inc(&c.repair_failures);
                tracing::debug!(%product, error = %e, "candle repair failed");
                Vec::new()
            }
        };
        c.derived_updates.fetch_add(derived.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let mut st = lock(&shared.state);
        if let Some(s) = st.products.get_mut(&product) {
            s.repairing = false;
            s.derived.extend(derived);
        }
    });
}

impl Shared {
    /// Record connection `id` open or closed, and whether every connection is open.
    fn set_connected(&self, id: u32, connected: bool) {
        {
            let mut st = lock(&self.state);
            if let Some(c) = st.conns.get_mut(&id) {
                if connected && !c.connected {
                    c.connections += 1;
                    c.last_seq = None;
                }
                c.connected = connected;
            }
        }
        self.refresh_connected();
    }

    /// Start or stop the "every connection open" clock.
    fn refresh_connected(&self) {
        let now = Instant::now();
        let mut st = lock(&self.state);
        let all = !st.conns.is_empty() && st.conns.values().all(|c| c.connected);
        match (all, st.connected_since) {
            (true, None) => st.connected_since = Some(now),
            (false, Some(since)) => {
                st.connected_total = st.connected_total.saturating_add(now.saturating_duration_since(since));
                st.connected_since = None;
            }
            _ => {}
        }
    }

    /// Count one message of connection `id` on `channel`; with `seq` = `(last, this)`,
    /// whether it skipped sequence numbers (counted on the connection).
    fn count_message(&self, id: u32, channel: &str, seq: Option<(Option<u64>, u64)>) -> bool {
        let mut st = lock(&self.state);
        match st.by_channel.get_mut(channel) {
            Some(n) => *n += 1,
            None => {
                st.by_channel.insert(channel.to_string(), 1);
            }
        }
        let gap = seq.is_some_and(|(last, this)| last.is_some_and(|l| this != l.wrapping_add(1)));
        if let Some(c) = st.conns.get_mut(&id) {
            c.messages += 1;
            c.last_msg = Some(Instant::now());
            if let Some((_, this)) = seq {
                c.last_seq = Some(this);
            }
            c.sequence_gaps += u64::from(gap);
        }
        gap
    }

    /// When a message may go out next under the shared budget (`first`: the connection has
    /// sent nothing yet, and goes before those that have).
    fn next_send_slot(&self, now: Instant, first: bool) -> Instant {
        let mut p = lock(&self.pace);
        let at = p.sent.next_at(now, self.cfg.messages_per_second as usize);
        if !first && p.waiting_first > 0 {
            return now + YIELD_TO_FIRST;
        }
        at
    }

    /// Take a slot of the shared budget now, if there is one.
    fn take_send_slot(&self, now: Instant, first: bool) -> bool {
        if self.next_send_slot(now, first) > now {
            return false;
        }
        lock(&self.pace).sent.record(now);
        true
    }

    /// Wait for a slot of the connection budget (`connections_per_second`).
    async fn open_slot(&self) {
        loop {
            let now = Instant::now();
            let wait = {
                let mut w = lock(&self.opens);
                let at = w.next_at(now, self.cfg.connections_per_second as usize);
                if at <= now {
                    w.record(now);
                    None
                } else {
                    Some(at)
                }
            };
            match wait {
                None => return,
                Some(t) => tokio::time::sleep_until(t).await,
            }
        }
    }

    /// Forget products no longer followed, marking what was pushed for them stale.
    async fn prune(&self) {
        let desired = self.desired.borrow().clone();
        let dropped: Vec<(ProductId, ProductState)> = {
            let mut st = lock(&self.state);
            let gone: Vec<ProductId> =
                st.products.keys().filter(|p| !desired.contains(*p)).cloned().collect();
            gone.into_iter().filter_map(|p| st.products.remove(&p).map(|s| (p, s))).collect()
        };
        for (p, s) in dropped {
            let derived: Vec<_> = s.derived.into_iter().collect();
            self.source.feed_mark_stale(&p, &derived).await;
        }
    }

    /// Connection `id` lost continuity (gap, silence, disconnect): its products' pushed data
    /// goes stale until it delivers them again. Other connections' products are untouched.
    async fn mark_stale(&self, id: u32) {
        let list: Vec<(ProductId, Vec<crate::model::Granularity>)> = {
            let mut st = lock(&self.state);
            let own = st.conns.get(&id).map(|c| c.books.clone()).unwrap_or_default();
            st.products
                .iter_mut()
                .filter(|(p, _)| own.contains(&p.book_id()))
                .map(|(p, s)| {
                    s.ticker_live = false;
                    s.candles_live = false;
                    s.mark = None;
                    (p.clone(), s.derived.iter().copied().collect())
                })
                .collect()
        };
        if list.is_empty() {
            return;
        }
        inc(&self.counters.stale_marks);
        for (p, derived) in list {
            self.source.feed_mark_stale(&p, &derived).await;
        }
    }
}

/// Not public API (for the criterion benches): applies frames to a source's cache exactly as
/// one connection of a [`MarketStream`](super::MarketStream) does, with no socket.
#[doc(hidden)]
pub struct FeedBench {
    session: Session,
}

impl std::fmt::Debug for FeedBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedBench").field("books", &self.session.books.len()).finish_non_exhaustive()
    }
}

impl FeedBench {
    /// A connection serving every product of `builder`.
    ///
    /// # Errors
    /// As [`StreamBuilder::start`](super::StreamBuilder::start).
    pub fn new(builder: super::StreamBuilder) -> crate::error::Result<Self> {
        let shared = builder.into_shared()?;
        let books: BTreeSet<ProductId> = shared.desired.borrow().iter().map(ProductId::book_id).collect();
        lock(&shared.state)
            .conns
            .insert(0, ConnState { books: books.clone(), connected: true, ..ConnState::default() });
        let mut session = Session::new(&shared, 0, books);
        session.follow();
        Ok(FeedBench { session })
    }

    /// Decode one frame and apply it to the cache.
    pub async fn apply(&mut self, text: &str) {
        self.session.on_text(text).await;
    }

    /// The stream's counters.
    pub fn stats(&self) -> super::StreamStats {
        self.session.shared.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let (min, max) = (Duration::from_millis(500), Duration::from_secs(30));
        assert_eq!(backoff(min, max, 1, 0.999_999), Duration::from_millis(500));
        assert_eq!(backoff(min, max, 1, 0.0), min, "never below the minimum");
        assert_eq!(backoff(min, max, 3, 0.0), Duration::from_secs(1));
        assert!(backoff(min, max, 3, 0.999) <= Duration::from_secs(2));
        assert_eq!(backoff(min, max, 40, 0.0), Duration::from_secs(15));
        assert!(backoff(min, max, u32::MAX, 1.0) <= max);
        assert!(backoff(min, max, 4, f64::NAN) >= min);
    }
}
