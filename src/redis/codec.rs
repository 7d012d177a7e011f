//! What the shared tier stores in Redis, and under which keys.
//!
//! Every value is `ts1:` followed by JSON: a version prefix first, so that a future format can
//! be told apart (an unreadable value counts as a miss and is overwritten, never an error),
//! then an [`Envelope`] with the wall time the value was fetched at and its [`Outcome`].
//! JSON keeps prices exact (decimals are strings) and can be read with `redis-cli GET`.

use std::time::Duration;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    error::{Error, Result, truncate},
    limiter::EndpointClass,
    model::{CandleRange, Granularity, ProductId},
};

/// The version prefix of every stored value.
pub(crate) const VERSION_PREFIX: &[u8] = b"ts1:";

/// A stored value: when it was fetched and what the upstream said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Envelope<T> {
    /// Fetched at, UNIX milliseconds (the writer's wall clock).
    pub(crate) at: i64,
    /// The upstream's answer.
    pub(crate) outcome: Outcome<T>,
}

/// What the upstream answered for one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Outcome<T> {
    /// The value.
    Value(T),
    /// The product is unknown (a negative entry).
    NotFound,
    /// A transient failure shared with every process waiting for this key, for a short time.
    Failed(WireError),
}

/// An [`Error`] that can be shared through Redis: only the transient, request-independent
/// kinds (see [`WireError::shareable`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WireError {
    kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

impl WireError {
    /// The shareable form of `e`, or `None` when `e` depends on the request (not found, bad
    /// input, 4xx) or on this process (a local rate-limit refusal): those are not shared.
    pub(crate) fn shareable(e: &Error) -> Option<Self> {
        let w = |kind: &str, message: String, status, retry_after: Option<Duration>| WireError {
            kind: kind.to_string(),
            message: truncate(&message, 200),
            status,
            retry_after_ms: retry_after.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        };
        match e {
            Error::RateLimited { retry_after, local: false } => {
                Some(w("rate_limited", String::new(), None, *retry_after))
            }
            Error::Transport(m) => Some(w("transport", m.clone(), None, None)),
            Error::Timeout => Some(w("timeout", String::new(), None, None)),
            Error::Upstream { status, message } if *status >= 500 || *status == 408 => {
                Some(w("upstream", message.clone(), Some(*status), None))
            }
            _ => None,
        }
    }

    /// Back to an [`Error`]; `None` for a kind this version does not know.
    pub(crate) fn to_error(&self) -> Option<Error> {
        Some(match self.kind.as_str() {
            "rate_limited" => Error::RateLimited {
                retry_after: self.retry_after_ms.map(Duration::from_millis),
                local: false,
            },
            "transport" => Error::Transport(self.message.clone()),
            "timeout" => Error::Timeout,
            "upstream" => {
                Error::Upstream { status: self.status.unwrap_or(500), message: self.message.clone() }
            }
            _ => return None,
        })
    }
}

/// Encode an envelope: the version prefix, then JSON.
pub(crate) fn encode<T: Serialize>(env: &Envelope<T>) -> Result<Vec<u8>> {
    let mut out = VERSION_PREFIX.to_vec();
    serde_json::to_writer(&mut out, env)
        .map_err(|e| Error::Decode(format!("could not encode a value: {e}")))?;
    Ok(out)
}

/// Decode a stored value; `None` for another version or damaged bytes.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Option<Envelope<T>> {
    let json = bytes.strip_prefix(VERSION_PREFIX)?;
    let env: Envelope<T> = serde_json::from_slice(json).ok()?;
    if let Outcome::Failed(w) = &env.outcome
        && w.to_error().is_none()
    {
        return None;
    }
    Some(env)
}

/// FNV-1a, 64 bits: a stable, dependency-free hash for the API key id in key names.
pub(crate) fn fnv1a64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The key names of one tier: `{namespace}:{hash of the API key id}:...` for the cache, and
/// the rate limiter's under the budget prefix: the same, or `{namespace}:{hash of the account
/// identity}:` when one is configured, so that every key of one user shares one budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Keys {
    prefix: String,
    budget: String,
}

impl Keys {
    pub(crate) fn new(namespace: &str, api_key_id: &str, account_identity: Option<&str>) -> Self {
        let prefix = format!("{namespace}:{:016x}:", fnv1a64(api_key_id));
        let budget = match account_identity {
            // Hashed apart from key ids, so an identity never lands on some key's budget.
            Some(identity) => format!("{namespace}:{:016x}:", fnv1a64(&format!("account:{identity}"))),
            None => prefix.clone(),
        };
        Keys { prefix, budget }
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(crate) fn budget_prefix(&self) -> &str {
        &self.budget
    }

    /// A ticker: `{prefix}t:{product}`.
    pub(crate) fn ticker(&self, product: &ProductId) -> String {
        format!("{}t:{product}", self.prefix)
    }

    /// One candle request: `{prefix}c:{product}:{granularity}:{start}:{end}` (UNIX seconds).
    pub(crate) fn candles(&self, product: &ProductId, g: Granularity, r: CandleRange) -> String {
        format!(
            "{}c:{product}:{}:{}:{}",
            self.prefix,
            g.as_str(),
            r.start.unix_timestamp(),
            r.end.unix_timestamp()
        )
    }

    /// The accounts: `{prefix}a`.
    pub(crate) fn accounts(&self) -> String {
        format!("{}a", self.prefix)
    }

    /// The channel on which invalidations of the accounts are published: `{prefix}a:invalidated`.
    pub(crate) fn accounts_invalidated(&self) -> String {
        format!("{}a:invalidated", self.prefix)
    }

    /// The lease of a value key: `{key}:lease`.
    pub(crate) fn lease(key: &str) -> String {
        format!("{key}:lease")
    }

    /// The rate-limiter keys of one class, under the budget prefix: `[tat, pause, ramp,
    /// strikes]`.
    pub(crate) fn limiter(&self, class: EndpointClass) -> [String; 4] {
        let base = format!("{}rl:{}:", self.budget, class.as_str());
        [format!("{base}tat"), format!("{base}pause"), format!("{base}ramp"), format!("{base}strikes")]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Candle, Ticker};
    use rust_decimal::Decimal;
    use time::macros::datetime;

    fn ticker() -> Ticker {
        Ticker {
            product: "BTC-USD".parse().unwrap(),
            price: Decimal::new(6_543_210_987, 4),
            best_bid: Some(Decimal::new(6_543_200_000, 4)),
            best_ask: None,
            time: datetime!(2024-04-24 09:56:38.123456789 UTC),
            price_kind: crate::model::PriceKind::LastTrade,
        }
    }

    #[test]
    fn values_round_trip_exactly() {
        let env = Envelope { at: 1_713_952_598_123, outcome: Outcome::Value(ticker()) };
        let bytes = encode(&env).unwrap();
        assert!(bytes.starts_with(b"ts1:{"));
        assert_eq!(decode::<Ticker>(&bytes), Some(env));
        let candles = vec![Candle {
            start: datetime!(2024-04-24 09:00 UTC),
            open: Decimal::new(1, 8),
            high: Decimal::new(2, 0),
            low: Decimal::ZERO,
            close: Decimal::ONE,
            volume: Decimal::new(123_456_789, 3),
        }];
        let env = Envelope { at: 0, outcome: Outcome::Value(candles) };
        assert_eq!(decode::<Vec<Candle>>(&encode(&env).unwrap()), Some(env));
        let env: Envelope<Ticker> = Envelope { at: 5, outcome: Outcome::NotFound };
        assert_eq!(decode::<Ticker>(&encode(&env).unwrap()), Some(env));
    }

    #[test]
    fn foreign_or_damaged_values_are_misses() {
        let bytes = encode(&Envelope { at: 1, outcome: Outcome::Value(ticker()) }).unwrap();
        assert_eq!(decode::<Ticker>(&bytes[..bytes.len() - 1]), None);
        assert_eq!(decode::<Ticker>(b"ts2:{}"), None);
        assert_eq!(decode::<Ticker>(b""), None);
        assert_eq!(decode::<Ticker>(&bytes[4..]), None, "no prefix");
        // A value of another type under the key.
        assert_eq!(decode::<Vec<Candle>>(&bytes), None);
        // An error kind from a newer version.
        let odd = br#"ts1:{"at":1,"outcome":{"failed":{"kind":"quantum"}}}"#;
        assert_eq!(decode::<Ticker>(odd), None);
    }

    #[test]
    fn only_transient_request_independent_errors_are_shared() {
        let shared = [
            Error::RateLimited { retry_after: Some(Duration::from_millis(1500)), local: false },
            Error::RateLimited { retry_after: None, local: false },
            Error::Transport("connection reset".into()),
            Error::Timeout,
            Error::Upstream { status: 503, message: "busy".into() },
            Error::Upstream { status: 408, message: String::new() },
        ];
        for e in shared {
            let w = WireError::shareable(&e).unwrap_or_else(|| panic!("{e:?}"));
            let env: Envelope<Ticker> = Envelope { at: 0, outcome: Outcome::Failed(w) };
            let back = decode::<Ticker>(&encode(&env).unwrap()).unwrap();
            let Outcome::Failed(w) = back.outcome else { panic!() };
            assert_eq!(w.to_error(), Some(e));
        }
        let private = [
            Error::RateLimited { retry_after: None, local: true },
            Error::NotFound("X-USD".into()),
            Error::InvalidInput("x".into()),
            Error::Upstream { status: 400, message: "bad".into() },
            Error::Unauthorized("x".into()),
            Error::Decode("x".into()),
            Error::Overloaded("x".into()),
            Error::Closed("x".into()),
        ];
        for e in private {
            assert_eq!(WireError::shareable(&e), None, "{e:?}");
        }
    }

    #[test]
    fn key_names() {
        let k = Keys::new("ts", "organizations/o/apiKeys/k", None);
        let other = Keys::new("ts", "organizations/o/apiKeys/k2", None);
        assert_ne!(k.prefix(), other.prefix());
        assert!(!k.prefix().contains("apiKeys"), "the key id is hashed");
        assert_eq!(k.prefix().len(), "ts:".len() + 16 + 1);
        let btc: ProductId = "BTC-USD".parse().unwrap();
        assert_eq!(k.ticker(&btc), format!("{}t:BTC-USD", k.prefix()));
        let r = CandleRange::new(datetime!(2024-01-01 00:00 UTC), datetime!(2024-01-01 02:00 UTC)).unwrap();
        assert_eq!(
            k.candles(&btc, Granularity::OneHour, r),
            format!("{}c:BTC-USD:ONE_HOUR:1704067200:1704074400", k.prefix())
        );
        assert_eq!(Keys::lease("x"), "x:lease");
        assert_eq!(k.limiter(EndpointClass::Private)[0], format!("{}rl:private:tat", k.prefix()));
        // Two keys of one account: their own caches (accounts are per portfolio), one budget.
        let (a, b) = (
            Keys::new("ts", "organizations/o/apiKeys/k", Some("alice")),
            Keys::new("ts", "organizations/o/apiKeys/k2", Some("alice")),
        );
        assert_eq!(a.prefix(), k.prefix());
        assert_ne!(a.accounts(), b.accounts());
        assert_eq!(a.limiter(EndpointClass::Private), b.limiter(EndpointClass::Private));
        assert_ne!(a.limiter(EndpointClass::Private), k.limiter(EndpointClass::Private));
        assert_ne!(
            a.budget_prefix(),
            Keys::new("ts", "alice", None).budget_prefix(),
            "kept apart from key ids"
        );
        assert_eq!(a.budget_prefix().len(), k.prefix().len());
        // FNV-1a test vectors.
        assert_eq!(fnv1a64(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
