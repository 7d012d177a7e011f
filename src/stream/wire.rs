//! Coinbase Advanced Trade WebSocket messages exactly as they travel on the wire
//! (`wss://advanced-trade-ws.coinbase.com`, COINBASE.md §5).
//!
//! Numbers are JSON strings and may be `""` (an empty `ticker_batch` frame has every field
//! empty); these structs keep them as strings and the stream decodes a frame into typed data,
//! answering [`Error::Decode`] (never a panic) for anything malformed. The simulated exchange's
//! WebSocket endpoint serializes the same structs, so the client and the simulator cannot drift
//! apart.

use std::{collections::BTreeMap, fmt};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{
    coinbase::wire::{parse_decimal, parse_time},
    error::{Error, Result},
    model::{Candle, ProductId, Ticker},
};

/// The market-data WebSocket URL of Coinbase Advanced Trade.
pub const COINBASE_WS_URL: &str = "wss://advanced-trade-ws.coinbase.com";

/// Channel names as they appear in subscribe messages and in `channel`.
pub mod channel {
    /// Heartbeats every second; keeps the other subscriptions open.
    pub const HEARTBEATS: &str = "heartbeats";
    /// Five-minute candles, updated every second.
    pub const CANDLES: &str = "candles";
    /// A ticker on every match.
    pub const TICKER: &str = "ticker";
    /// Tickers batched every 5 seconds.
    pub const TICKER_BATCH: &str = "ticker_batch";
    /// The subscription acknowledgement (server to client only).
    pub const SUBSCRIPTIONS: &str = "subscriptions";
    /// The user's orders (needs a JWT; on `wss://advanced-trade-ws-user.coinbase.com`).
    pub const USER: &str = "user";
    /// The user's futures balances (needs a JWT).
    pub const FUTURES_BALANCE_SUMMARY: &str = "futures_balance_summary";

    /// Whether a subscription to `channel` must carry a JWT: only the `user`-type channels
    /// ([`USER`], [`FUTURES_BALANCE_SUMMARY`]); market data needs none (COINBASE.md §4.2, §5).
    pub fn needs_jwt(channel: &str) -> bool {
        matches!(channel, USER | FUTURES_BALANCE_SUMMARY)
    }
}

/// A client message: subscribe to or unsubscribe from one channel (Coinbase accepts one
/// channel per message). `Debug` redacts the JWT.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribeMessage {
    /// `"subscribe"` or `"unsubscribe"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The products; empty for `heartbeats` (and, when unsubscribing, for the whole channel).
    #[serde(default)]
    pub product_ids: Vec<String>,
    /// The channel.
    #[serde(default)]
    pub channel: String,
    /// A fresh JWT, required only by the `user` and `futures_balance_summary` channels
    /// ([`channel::needs_jwt`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<String>,
}

impl fmt::Debug for SubscribeMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscribeMessage")
            .field("kind", &self.kind)
            .field("product_ids", &self.product_ids)
            .field("channel", &self.channel)
            .field("jwt", &self.jwt.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Every data message: `{"channel","client_id","timestamp","sequence_num","events"}`.
///
/// Error frames (`{"type":"error","message":"…"}`) decode into the same struct with `kind` and
/// `message` set and no channel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The channel (`"l2_data"` for level2).
    #[serde(default)]
    pub channel: String,
    /// `""` in the docs' samples; production frames carry no `client_id` at all (the AsyncAPI
    /// spec, COINBASE.md §5), so `None` is left out when serializing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// RFC 3339 with nanoseconds.
    #[serde(default)]
    pub timestamp: String,
    /// One counter per connection, shared across channels (third-party captures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence_num: Option<u64>,
    /// The events.
    #[serde(default)]
    pub events: Vec<Event>,
    /// `"error"` on error frames.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The error text on error frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One event of an [`Envelope`]; which fields are present depends on the channel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// `"snapshot"` or `"update"` (absent on heartbeats and acknowledgements).
    #[serde(rename = "type", default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// `ticker` / `ticker_batch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tickers: Option<Vec<WsTicker>>,
    /// `candles`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candles: Option<Vec<WsCandle>>,
    /// `heartbeats`: the server's time, in Go's `time.Time` format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_time: Option<String>,
    /// `heartbeats`: a counter, an integer in production (the AsyncAPI spec) and a string in
    /// the docs' samples; both are accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_counter: Option<serde_json::Value>,
    /// `subscriptions`: every subscription of the connection, channel to products.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscriptions: Option<BTreeMap<String, Vec<String>>>,
}

/// One ticker of a `ticker` or `ticker_batch` event; every field is a string, possibly `""`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WsTicker {
    /// `"ticker"`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// The product.
    #[serde(default)]
    pub product_id: String,
    /// Last trade price.
    #[serde(default)]
    pub price: String,
    /// 24 h base volume.
    #[serde(default)]
    pub volume_24_h: String,
    /// 24 h low.
    #[serde(default)]
    pub low_24_h: String,
    /// 24 h high.
    #[serde(default)]
    pub high_24_h: String,
    /// 52-week low.
    #[serde(default)]
    pub low_52_w: String,
    /// 52-week high.
    #[serde(default)]
    pub high_52_w: String,
    /// 24 h change, percent.
    #[serde(default)]
    pub price_percent_chg_24_h: String,
    /// Best bid (`ticker_batch` carries none: left out when empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub best_bid: String,
    /// Size at the best bid (left out when empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub best_bid_quantity: String,
    /// Best ask (`ticker_batch` carries none: left out when empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub best_ask: String,
    /// Size at the best ask (left out when empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub best_ask_quantity: String,
}

/// One five-minute candle of a `candles` event; every field is a string.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WsCandle {
    /// Bucket start, UNIX seconds.
    pub start: String,
    /// High.
    pub high: String,
    /// Low.
    pub low: String,
    /// Open.
    pub open: String,
    /// Close (the latest price while the candle is in progress).
    pub close: String,
    /// Volume.
    pub volume: String,
    /// The product.
    pub product_id: String,
}

impl WsCandle {
    /// The wire form of `candle` of `product`.
    pub fn from_candle(product: &ProductId, candle: &Candle) -> Self {
        WsCandle {
            start: candle.start.unix_timestamp().to_string(),
            high: candle.high.to_string(),
            low: candle.low.to_string(),
            open: candle.open.to_string(),
            close: candle.close.to_string(),
            volume: candle.volume.to_string(),
            product_id: product.to_string(),
        }
    }
}

/// A frame decoded into what the stream acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    /// `{"type":"error"}`.
    Error(String),
    /// A data message.
    Data {
        /// The channel, as sent.
        channel: String,
        /// `sequence_num`, when present.
        seq: Option<u64>,
        /// `timestamp`, when present and valid.
        at: Option<OffsetDateTime>,
        /// What it carries.
        body: Body,
    },
}

/// The payload of a data frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Body {
    /// Tickers (from `ticker` or `ticker_batch`). Malformed or empty entries are dropped and
    /// counted in `skipped`.
    Tickers { tickers: Vec<Ticker>, skipped: u64 },
    /// Candles by product, oldest first (entries that fail to decode are counted in `skipped`).
    Candles { candles: BTreeMap<ProductId, Vec<Candle>>, skipped: u64 },
    /// A heartbeat.
    Heartbeat { counter: Option<u64> },
    /// The connection's subscriptions after a (un)subscribe: channel to products.
    Subscriptions(BTreeMap<String, Vec<String>>),
    /// A channel this client does not use.
    Other(String),
}

/// Decode one text frame.
///
/// # Errors
/// [`Error::Decode`] when the frame is not JSON of the envelope (or error) shape.
pub(crate) fn decode(text: &str) -> Result<Frame> {
    let env: Envelope =
        serde_json::from_str(text).map_err(|e| Error::decode(format_args!("websocket frame: {e}")))?;
    if env.kind.as_deref() == Some("error") {
        return Ok(Frame::Error(crate::error::truncate(env.message.as_deref().unwrap_or(""), 200)));
    }
    if env.channel.is_empty() {
        return Err(Error::decode("websocket frame has no channel"));
    }
    let at = parse_time(&env.timestamp, "timestamp").ok();
    let body = match env.channel.as_str() {
        channel::TICKER | channel::TICKER_BATCH => {
            let mut tickers = Vec::new();
            let mut skipped = 0;
            for t in env.events.iter().filter_map(|e| e.tickers.as_ref()).flatten() {
                match ticker_from_wire(t, at) {
                    Ok(t) => tickers.push(t),
                    Err(_) => skipped += 1,
                }
            }
            Body::Tickers { tickers, skipped }
        }
        channel::CANDLES => {
            let mut candles: BTreeMap<ProductId, Vec<Candle>> = BTreeMap::new();
            let mut skipped = 0;
            for c in env.events.iter().filter_map(|e| e.candles.as_ref()).flatten() {
                match candle_from_wire(c) {
                    Ok((p, c)) => candles.entry(p).or_default().push(c),
                    Err(_) => skipped += 1,
                }
            }
            for list in candles.values_mut() {
                list.sort_by_key(|c| c.start);
                // Keep the last of duplicates: within one frame a later entry is newer.
                list.reverse();
                list.dedup_by_key(|c| c.start);
                list.reverse();
            }
            Body::Candles { candles, skipped }
        }
        channel::HEARTBEATS => {
            let counter =
                env.events.iter().find_map(|e| e.heartbeat_counter.as_ref()).and_then(|v| match v {
                    serde_json::Value::String(s) => s.trim().parse().ok(),
                    serde_json::Value::Number(n) => n.as_u64(),
                    _ => None,
                });
            Body::Heartbeat { counter }
        }
        channel::SUBSCRIPTIONS => {
            let mut subs = BTreeMap::new();
            for e in &env.events {
                if let Some(s) = &e.subscriptions {
                    subs.extend(s.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
            Body::Subscriptions(subs)
        }
        other => Body::Other(crate::error::truncate(other, 40)),
    };
    Ok(Frame::Data { channel: crate::error::truncate(&env.channel, 40), seq: env.sequence_num, at, body })
}

fn opt_decimal(s: &str, field: &str) -> Result<Option<Decimal>> {
    if s.trim().is_empty() { Ok(None) } else { parse_decimal(s, field).map(Some) }
}

/// A ticker from the wire; its time is the envelope's (`at`), or the Unix epoch without one.
///
/// # Errors
/// [`Error::Decode`] for a bad product id, an empty or malformed price, or malformed bid/ask.
pub(crate) fn ticker_from_wire(t: &WsTicker, at: Option<OffsetDateTime>) -> Result<Ticker> {
    let product =
        ProductId::new(&t.product_id).map_err(|e| Error::decode(format_args!("ticker product_id: {e}")))?;
    let price = parse_decimal(&t.price, "ticker price")?;
    Ok(Ticker {
        product,
        price,
        best_bid: opt_decimal(&t.best_bid, "ticker best_bid")?,
        best_ask: opt_decimal(&t.best_ask, "ticker best_ask")?,
        time: at.unwrap_or(OffsetDateTime::UNIX_EPOCH),
        price_kind: crate::model::PriceKind::LastTrade,
    })
}

/// A candle from the wire.
///
/// # Errors
/// [`Error::Decode`] for a bad product id, start or price.
pub(crate) fn candle_from_wire(c: &WsCandle) -> Result<(ProductId, Candle)> {
    let product =
        ProductId::new(&c.product_id).map_err(|e| Error::decode(format_args!("candle product_id: {e}")))?;
    let secs: i64 = c.start.trim().parse().map_err(|_| {
        Error::decode(format_args!(
            "candle start is not UNIX seconds: {:?}",
            crate::error::truncate(&c.start, 40)
        ))
    })?;
    let start = OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|_| Error::decode("candle start is out of range"))?;
    let candle = Candle {
        start,
        open: parse_decimal(&c.open, "candle open")?,
        high: parse_decimal(&c.high, "candle high")?,
        low: parse_decimal(&c.low, "candle low")?,
        close: parse_decimal(&c.close, "candle close")?,
        volume: parse_decimal(&c.volume, "candle volume")?,
    };
    Ok((product, candle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_samples_decode() {
        let hb = r#"{"channel": "heartbeats", "client_id": "", "timestamp": "2023-06-23T20:31:26.122969572Z", "sequence_num": 0, "events": [{"current_time": "2023-06-23 20:31:56.121961769 +0000 UTC m=+91717.525857105", "heartbeat_counter": "3049"}]}"#;
        assert!(matches!(
            decode(hb).unwrap(),
            Frame::Data { seq: Some(0), body: Body::Heartbeat { counter: Some(3049) }, .. }
        ));
        let candles = r#"{"channel": "candles", "client_id": "", "timestamp": "2023-06-09T20:19:35.39625135Z", "sequence_num": 0, "events": [{"type": "snapshot", "candles": [{"start": "1688998200", "high": "1867.72", "low": "1865.63", "open": "1867.38", "close": "1866.81", "volume": "0.20269406", "product_id": "ETH-USD"}]}]}"#;
        let Frame::Data { body: Body::Candles { candles, skipped: 0 }, at: Some(_), .. } =
            decode(candles).unwrap()
        else {
            panic!("candles")
        };
        let eth: ProductId = "ETH-USD".parse().unwrap();
        assert_eq!(candles[&eth][0].close, "1866.81".parse().unwrap());
        assert_eq!(candles[&eth][0].start.unix_timestamp(), 1_688_998_200);
        let ticker = r#"{"channel": "ticker", "client_id": "", "timestamp": "2023-02-09T20:30:37.167359596Z", "sequence_num": 0, "events": [{"type": "snapshot", "tickers": [{"type": "ticker", "product_id": "BTC-USD", "price": "21932.98", "volume_24_h": "16038.28770938", "low_24_h": "21835.29", "high_24_h": "23011.18", "low_52_w": "15460", "high_52_w": "48240", "price_percent_chg_24_h": "-4.15775596190603", "best_bid": "21931.98", "best_bid_quantity": "8000.21", "best_ask": "21933.98", "best_ask_quantity": "8038.07770938"}]}]}"#;
        let Frame::Data { body: Body::Tickers { tickers, skipped: 0 }, .. } = decode(ticker).unwrap() else {
            panic!("ticker")
        };
        assert_eq!(tickers[0].price, "21932.98".parse().unwrap());
        assert_eq!(tickers[0].best_bid, Some("21931.98".parse().unwrap()));
        assert_eq!(tickers[0].time.unix_timestamp(), 1_675_974_637);
        let ack = r#"{"channel": "subscriptions", "client_id": "", "timestamp": "2026-09-05T22:10:29.562097895Z", "sequence_num": 2, "events": [{"subscriptions": {"ticker": ["BTC-PERP-INTX", "ETH-PERP-INTX"]}}]}"#;
        let Frame::Data { seq: Some(2), body: Body::Subscriptions(s), .. } = decode(ack).unwrap() else {
            panic!("ack")
        };
        assert_eq!(s["ticker"].len(), 2);
    }

    #[test]
    fn empty_ticker_batch_and_errors_do_not_fail() {
        let empty = r#"{"channel":"ticker_batch","client_id":"","timestamp":"","sequence_num":1,"events":[{"type":"update","tickers":[{"type":"ticker","product_id":"","price":"","volume_24_h":"","low_24_h":"","high_24_h":"","low_52_w":"","high_52_w":"","price_percent_chg_24_h":"","best_bid":"","best_bid_quantity":"","best_ask":"","best_ask_quantity":""}]}]}"#;
        assert!(matches!(
            decode(empty).unwrap(),
            Frame::Data { seq: Some(1), at: None, body: Body::Tickers { ref tickers, skipped: 1 }, .. } if tickers.is_empty()
        ));
        assert_eq!(
            decode(r#"{"type":"error","message":"failure to subscribe"}"#).unwrap(),
            Frame::Error("failure to subscribe".into())
        );
        for bad in ["", "null", "[]", "{", r#"{"events":[]}"#, r#"{"channel":"candles","events":7}"#] {
            assert!(decode(bad).is_err(), "{bad}");
        }
        let odd = r#"{"channel":"candles","events":[{"candles":[{"start":"x","high":"1","low":"1","open":"1","close":"1","volume":"1","product_id":"BTC-USD"}]}]}"#;
        assert!(matches!(decode(odd).unwrap(), Frame::Data { body: Body::Candles { skipped: 1, .. }, .. }));
    }

    /// Production frames (the AsyncAPI spec, COINBASE.md §5): no `client_id`, an integer
    /// `heartbeat_counter`, `ticker_batch` without best bid/ask.
    #[test]
    fn production_frames_decode() {
        let hb = r#"{"channel":"heartbeats","timestamp":"2026-09-05T22:10:29.562097895Z","sequence_num":7,"events":[{"current_time":"2026-09-05 22:10:29.56 +0000 UTC m=+1.0","heartbeat_counter":3049}]}"#;
        assert!(matches!(
            decode(hb).unwrap(),
            Frame::Data { seq: Some(7), body: Body::Heartbeat { counter: Some(3049) }, .. }
        ));
        let batch = r#"{"channel":"ticker_batch","timestamp":"2026-09-05T22:10:30Z","sequence_num":8,"events":[{"type":"update","tickers":[{"type":"ticker","product_id":"BTC-USD","price":"21932.98","volume_24_h":"16038.28770938","low_24_h":"21835.29","high_24_h":"23011.18","low_52_w":"15460","high_52_w":"48240","price_percent_chg_24_h":"-4.15"}]}]}"#;
        let Frame::Data { body: Body::Tickers { tickers, skipped: 0 }, .. } = decode(batch).unwrap() else {
            panic!("ticker_batch")
        };
        assert_eq!(
            (tickers[0].price, tickers[0].best_bid, tickers[0].best_ask),
            ("21932.98".parse().unwrap(), None, None)
        );
        // And the simulator writes them so: no client_id, no empty bid/ask keys.
        let env = Envelope {
            channel: channel::TICKER_BATCH.into(),
            events: vec![Event {
                tickers: Some(vec![WsTicker {
                    product_id: "BTC-USD".into(),
                    price: "1".into(),
                    ..WsTicker::default()
                }]),
                ..Event::default()
            }],
            ..Envelope::default()
        };
        let json = serde_json::to_string(&env).unwrap();
        assert!(
            !json.contains("client_id") && !json.contains("best_bid") && !json.contains("best_ask"),
            "{json}"
        );
        assert!(channel::needs_jwt(channel::USER) && channel::needs_jwt(channel::FUTURES_BALANCE_SUMMARY));
        for ch in [channel::HEARTBEATS, channel::CANDLES, channel::TICKER, channel::TICKER_BATCH] {
            assert!(!channel::needs_jwt(ch), "{ch}");
        }
    }

    #[test]
    fn subscribe_messages_hide_the_jwt() {
        let m = SubscribeMessage {
            kind: "subscribe".into(),
            product_ids: vec!["BTC-USD".into()],
            channel: channel::CANDLES.into(),
            jwt: Some("secret.token.here".into()),
        };
        assert!(!format!("{m:?}").contains("secret"));
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains(r#""type":"subscribe""#) && json.contains(r#""channel":"candles""#));
        let back: SubscribeMessage = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
    }
}
