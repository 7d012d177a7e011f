//! The connection task: connect, subscribe (paced), read, feed the cache, watch the sequence
//! and the silence, and reconnect with backoff.
//!
//! One task owns the connection. Subscriptions are reconciled against the acknowledged state:
//! the exchange's `subscriptions` message lists everything the connection is subscribed to, so
//! a refused or lost (un)subscribe is simply sent again after `subscribe_timeout`, and
//! products followed or dropped at runtime need no special path.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use tokio::{
    net::TcpStream,
    sync::watch,
    time::{Instant, MissedTickBehavior},
};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

use super::{
    ProductState, Shared,
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

/// Run until `stop`: connect, serve a session, mark everything stale, back off, reconnect.
pub(super) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut failures: u32 = 0;
    let mut first = true;
    loop {
        if *stop.borrow() {
            break;
        }
        let connected = tokio::select! {
            r = connect(&shared) => r,
            () = until_true(&mut stop) => break,
        };
        match connected {
            Ok(ws) => {
                inc(&shared.counters.connections);
                if !first {
                    inc(&shared.counters.reconnects);
                }
                first = false;
                shared.set_connected(true);
                let end = Session::new(&shared).run(ws, &mut stop).await;
                shared.set_connected(false);
                shared.mark_all_stale().await;
                if end.delivered {
                    failures = 0;
                }
                if end.stopped {
                    break;
                }
                tracing::debug!(reason = end.reason, "market stream disconnected; reconnecting");
            }
            Err(e) => {
                inc(&shared.counters.connect_failures);
                tracing::debug!(error = %e, "market stream could not connect");
            }
        }
        failures = failures.saturating_add(1);
        let delay = backoff(shared.cfg.reconnect_min, shared.cfg.reconnect_max, failures, fastrand::f64());
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = until_true(&mut stop) => break,
        }
    }
    shared.set_connected(false);
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
struct Session<'a> {
    shared: &'a Arc<Shared>,
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
    /// Send times within the last second, for pacing.
    sent: VecDeque<Instant>,
    delivered: bool,
    /// The followed products by the id the exchange's market-data channels use for their book
    /// (a `-USDC` product's `-USD` twin, [`ProductId::book_id`]): what is subscribed, and where
    /// pushed data goes. Rebuilt whenever the followed products change.
    books: BTreeMap<ProductId, Vec<ProductId>>,
}

const WINDOW: Duration = Duration::from_secs(1);

impl<'a> Session<'a> {
    fn new(shared: &'a Arc<Shared>) -> Self {
        Session {
            shared,
            last_seq: None,
            last_msg: Instant::now(),
            acked: BTreeMap::new(),
            heartbeats_acked: false,
            heartbeats_sent: None,
            inflight: HashMap::new(),
            outbox: VecDeque::new(),
            sent: VecDeque::new(),
            delivered: false,
            books: BTreeMap::new(),
        }
    }

    fn end(&self, stopped: bool, reason: &'static str) -> End {
        End { stopped, delivered: self.delivered, reason }
    }

    async fn run(mut self, mut ws: Ws, stop: &mut watch::Receiver<bool>) -> End {
        let mut desired_rx = self.shared.desired.subscribe();
        desired_rx.mark_unchanged();
        self.follow();
        self.prune().await;
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
                        tracing::debug!(error = %e, "market stream read failed");
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
                    if let Some(mut m) = self.outbox.pop_front() {
                        let sign = self.shared.cfg.jwt_on_market_data || channel::needs_jwt(&m.channel);
                        m.jwt = self.shared.credentials.as_ref().filter(|_| sign).map(crate::Credentials::ws_jwt);
                        let subscribe = m.kind == "subscribe";
                        let text = match serde_json::to_string(&m) {
                            Ok(t) => t,
                            Err(_) => continue,
                        };
                        self.sent.push_back(Instant::now());
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
                        self.prune().await;
                        self.reconcile(Instant::now());
                    }
                }
                _ = housekeeping.tick() => {
                    let now = Instant::now();
                    if now.saturating_duration_since(self.last_msg) > self.shared.cfg.silence_timeout {
                        inc(&self.shared.counters.silences);
                        return self.end(false, "silent");
                    }
                    self.reconcile(now);
                    self.touch_tickers(now).await;
                }
            }
        }
    }

    /// When the next queued message may be sent (at most `messages_per_second` in any second).
    fn next_send_at(&mut self, now: Instant) -> Option<Instant> {
        if self.outbox.is_empty() {
            return None;
        }
        while self.sent.front().is_some_and(|t| now.saturating_duration_since(*t) >= WINDOW) {
            self.sent.pop_front();
        }
        if self.sent.len() < self.shared.cfg.messages_per_second as usize {
            Some(now)
        } else {
            self.sent.front().map(|t| *t + WINDOW)
        }
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

    /// Group the followed products by book (see `books`).
    fn follow(&mut self) {
        let mut books: BTreeMap<ProductId, Vec<ProductId>> = BTreeMap::new();
        for p in self.shared.desired.borrow().iter() {
            books.entry(p.book_id()).or_default().push(p.clone());
        }
        self.books = books;
    }

    /// The followed products a pushed entry for `product` belongs to: those of its book.
    fn targets(&self, product: &ProductId) -> Vec<ProductId> {
        self.books.get(&product.book_id()).cloned().unwrap_or_default()
    }

    /// Queue whatever (un)subscriptions bring the connection to the followed products (by
    /// book: the ids the exchange acknowledges).
    fn reconcile(&mut self, now: Instant) {
        let timeout = self.shared.cfg.subscribe_timeout;
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
            if !subs.is_empty() {
                self.queue(true, ch, subs, now);
            }
            if !unsubs.is_empty() {
                self.queue(false, ch, unsubs, now);
            }
        }
    }

    /// Forget products no longer followed, marking what was pushed for them stale.
    async fn prune(&mut self) {
        let desired = self.shared.desired.borrow().clone();
        let dropped: Vec<(ProductId, ProductState)> = {
            let mut st = lock(&self.shared.state);
            let gone: Vec<ProductId> =
                st.products.keys().filter(|p| !desired.contains(*p)).cloned().collect();
            gone.into_iter().filter_map(|p| st.products.remove(&p).map(|s| (p, s))).collect()
        };
        for (p, s) in dropped {
            let derived: Vec<_> = s.derived.into_iter().collect();
            self.shared.source.feed_mark_stale(&p, &derived).await;
        }
    }

    /// Keep pushed tickers fresh while the connection is healthy.
    async fn touch_tickers(&mut self, now: Instant) {
        let hold = self.shared.cfg.ticker_hold;
        let due: Vec<(ProductId, Instant)> = {
            let st = lock(&self.shared.state);
            st.products
                .iter()
                .filter(|(_, s)| s.ticker_live)
                .filter_map(|(p, s)| s.ticker_at.map(|at| (p.clone(), at)))
                .filter(|(_, at)| now.saturating_duration_since(*at) >= hold / 2)
                .collect()
        };
        for (p, at) in due {
            self.shared.source.feed_touch_ticker(&p, at, hold).await;
        }
    }

    async fn on_text(&mut self, text: &str) {
        let shared = Arc::clone(self.shared);
        let c = &shared.counters;
        inc(&c.messages);
        self.last_msg = Instant::now();
        let (channel, seq, at, body) = match wire::decode(text) {
            Ok(Frame::Data { channel, seq, at, body }) => (channel, seq, at, body),
            Ok(Frame::Error(message)) => {
                inc(&c.exchange_errors);
                shared.count_channel("error");
                tracing::warn!(%message, "market stream error frame");
                return;
            }
            Err(e) => {
                inc(&c.decode_errors);
                tracing::debug!(error = %e, "undecodable market stream frame");
                return;
            }
        };
        shared.count_channel(&channel);
        if let Some(seq) = seq {
            if let Some(last) = self.last_seq
                && seq != last.wrapping_add(1)
            {
                inc(&c.sequence_gaps);
                tracing::debug!(last, seq, "market stream sequence gap; marking data stale");
                shared.mark_all_stale().await;
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
                    let (mark, known) = {
                        let st = lock(&shared.state);
                        let s = st.products.get(&p);
                        (s.and_then(|s| s.mark), s.map(|s| s.derived.iter().copied().collect::<Vec<_>>()))
                    };
                    match shared.source.feed_candles(&p, list, at, mark, grace).await {
                        Merge::Merged(m) => {
                            inc(&c.candle_merges);
                            self.delivered = true;
                            // Look for newly cached series to derive when a bucket closes (every
                            // derived bucket closes with a five-minute one) or continuity was
                            // just regained; in between, update only the series already derived.
                            let rolled = mark.is_none_or(|old| old.bucket() != m.bucket());
                            let only = if rolled { None } else { known.as_deref() };
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
                            s.candle_at = Some(Instant::now());
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
    fn set_connected(&self, connected: bool) {
        let now = Instant::now();
        let mut st = lock(&self.state);
        match (connected, st.connected_since) {
            (true, None) => st.connected_since = Some(now),
            (false, Some(since)) => {
                st.connected_total = st.connected_total.saturating_add(now.saturating_duration_since(since));
                st.connected_since = None;
            }
            _ => {}
        }
    }

    fn count_channel(&self, channel: &str) {
        *lock(&self.state).by_channel.entry(channel.to_string()).or_default() += 1;
    }

    /// Continuity is lost (gap, silence, disconnect): every product's pushed data goes stale
    /// until the stream delivers it again.
    async fn mark_all_stale(&self) {
        let list: Vec<(ProductId, Vec<crate::model::Granularity>)> = {
            let mut st = lock(&self.state);
            st.products
                .iter_mut()
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
