//! The one error type of the crate.

use std::time::Duration;

use crate::limiter::EndpointClass;

/// A specialized `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong between a bot and the exchange.
///
/// The error is `Clone` so that one upstream failure can be handed to every caller that was
/// waiting on the same request (single-flight). Messages never contain credentials, JWTs or
/// query strings.
///
/// Variants are grouped by cause. Use the predicates ([`is_retryable`](Error::is_retryable),
/// [`is_rate_limited`](Error::is_rate_limited), [`retry_after`](Error::retry_after)) rather than
/// matching when you only need to decide what to do next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The caller passed a value that can never be valid (a malformed product id, an empty
    /// range, ...). Retrying the same call will fail the same way.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// The exchange does not know the requested product or resource.
    #[error("not found: {0}")]
    NotFound(String),

    /// Too many requests: either the exchange answered HTTP 429 (`local == false`), or the
    /// local rate limiter refused to send a request that would have exceeded the limit
    /// (`local == true`, nothing was sent).
    #[error("rate limited{}{}", if *local { " locally, nothing was sent" } else { " by the exchange" }, fmt_retry_after(retry_after))]
    RateLimited {
        /// How long to wait before trying again, when known.
        retry_after: Option<Duration>,
        /// `true` when the local limiter refused the request before sending it.
        local: bool,
    },

    /// The exchange rejected the credentials (HTTP 401 or 403).
    #[error("unauthorized: {0}")]
    Unauthorized(String),

    /// The exchange answered with an unexpected HTTP status.
    #[error("upstream answered HTTP {status}: {message}")]
    Upstream {
        /// The HTTP status code.
        status: u16,
        /// A short message taken from the response body (truncated).
        message: String,
    },

    /// The exchange's answer was not one the request can accept: the body could not be decoded
    /// into the expected shape, or it decoded but does not fit the question (a ticker of
    /// another product, an impossible price or candle, broken pagination, a body larger than
    /// `max_body_bytes`). Never retried: the same request is likely to get the same answer.
    /// `coinbase::wire`'s module documentation lists every rule.
    #[error("could not decode upstream response: {0}")]
    Decode(String),

    /// The request could not be sent or its response not received (connection refused or
    /// reset, DNS, TLS, ...).
    #[error("transport error: {0}")]
    Transport(String),

    /// The request did not complete within the configured timeout.
    #[error("request timed out")]
    Timeout,

    /// The configuration is invalid; the message says which setting and how to fix it.
    #[error("configuration error: {0}")]
    Config(String),

    /// The endpoint class is failing and its circuit breaker is open; no request was sent.
    #[error("circuit open for {class} endpoints after repeated failures; retry in {retry_in:?}")]
    CircuitOpen {
        /// The endpoint class whose circuit is open.
        class: EndpointClass,
        /// Time until the breaker lets a probe through.
        retry_in: Duration,
    },

    /// Too many requests are already waiting; this one was shed instead of queued.
    #[error("overloaded: {0}")]
    Overloaded(String),

    /// A background task this call depended on has stopped (the source was shut down).
    #[error("closed: {0}")]
    Closed(String),
}

/// What a call's result says about the exchange's health (the circuit breaker's input).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    /// The exchange answered as it should (including "not found" and other 4xx).
    Healthy,
    /// The exchange failed: transport, timeout, 5xx/408, undecodable body.
    Failed,
    /// Nothing learned: nothing was sent, or the exchange asked us to slow down.
    Neutral,
}

impl Health {
    /// The health a call's result shows.
    pub(crate) fn of<T>(r: &Result<T>) -> Health {
        match r {
            Ok(_) => Health::Healthy,
            Err(e) => e.health(),
        }
    }
}

fn fmt_retry_after(retry_after: &Option<Duration>) -> String {
    match retry_after {
        Some(d) => format!("; retry after {} ms", d.as_millis()),
        None => String::new(),
    }
}

impl Error {
    /// Whether the same request may succeed if tried again later.
    ///
    /// Rate limits, timeouts, transport failures, open circuits, shed requests and 5xx/408
    /// answers are retryable; invalid input, unknown products, bad credentials and malformed
    /// bodies are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::RateLimited { .. }
            | Error::Transport(_)
            | Error::Timeout
            | Error::CircuitOpen { .. }
            | Error::Overloaded(_) => true,
            Error::Upstream { status, .. } => *status >= 500 || *status == 408,
            Error::InvalidInput(_)
            | Error::NotFound(_)
            | Error::Unauthorized(_)
            | Error::Decode(_)
            | Error::Config(_)
            | Error::Closed(_) => false,
        }
    }

    /// Whether a request may have left for the exchange before this error: `false` only for
    /// errors made locally before anything was sent (the local rate limiter's refusal, a shed
    /// request, an open circuit, a closed source, invalid input or configuration). A call that
    /// ends in an error that reached the exchange counts as an upstream call and against the
    /// exchange's limit; one that did not, counts as neither.
    pub fn reached_exchange(&self) -> bool {
        !matches!(
            self,
            Error::RateLimited { local: true, .. }
                | Error::Overloaded(_)
                | Error::CircuitOpen { .. }
                | Error::Closed(_)
                | Error::InvalidInput(_)
                | Error::Config(_)
        )
    }

    /// Whether the same request is worth sending again: [retryable](Error::is_retryable) and
    /// [sent](Error::reached_exchange). A local refusal is not retried by the layer that got it:
    /// waiting is the limiter's job, and an open circuit or a shed request says "not now".
    pub fn is_worth_retrying(&self) -> bool {
        self.is_retryable() && self.reached_exchange()
    }

    /// Whether cached data may stand in for the answer (stale serving): yes for every failure
    /// of the exchange or the way to it, no when the question itself is wrong (an unknown
    /// product, invalid input), since older data would answer a question that has none.
    pub fn allows_stale(&self) -> bool {
        !matches!(self, Error::NotFound(_) | Error::InvalidInput(_))
    }

    /// What this error says about the exchange's health, for the circuit breaker.
    pub(crate) fn health(&self) -> Health {
        match self {
            Error::Transport(_) | Error::Timeout | Error::Decode(_) => Health::Failed,
            Error::Upstream { status, .. } if *status >= 500 || *status == 408 => Health::Failed,
            Error::Upstream { .. } | Error::NotFound(_) | Error::InvalidInput(_) | Error::Unauthorized(_) => {
                Health::Healthy
            }
            Error::RateLimited { .. }
            | Error::Config(_)
            | Error::CircuitOpen { .. }
            | Error::Overloaded(_)
            | Error::Closed(_) => Health::Neutral,
        }
    }

    /// Whether this is a rate-limit error (from the exchange or the local limiter).
    pub fn is_rate_limited(&self) -> bool {
        matches!(self, Error::RateLimited { .. })
    }

    /// The wait the exchange (or the limiter) asked for, when known.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::RateLimited { retry_after, .. } => *retry_after,
            Error::CircuitOpen { retry_in, .. } => Some(*retry_in),
            _ => None,
        }
    }

    /// Every [`kind`](Error::kind) name, in `kind_index` order: the keys of
    /// per-kind counters.
    pub const KINDS: [&'static str; 12] = [
        "invalid_input",
        "not_found",
        "rate_limited",
        "unauthorized",
        "upstream",
        "decode",
        "transport",
        "timeout",
        "config",
        "circuit_open",
        "overloaded",
        "closed",
    ];

    /// A short, stable name of the variant, for stats and logs (`"rate_limited"`, ...).
    pub fn kind(&self) -> &'static str {
        Self::KINDS[self.kind_index()]
    }

    /// The position of [`kind`](Error::kind) in [`KINDS`](Error::KINDS).
    pub(crate) const fn kind_index(&self) -> usize {
        match self {
            Error::InvalidInput(_) => 0,
            Error::NotFound(_) => 1,
            Error::RateLimited { .. } => 2,
            Error::Unauthorized(_) => 3,
            Error::Upstream { .. } => 4,
            Error::Decode(_) => 5,
            Error::Transport(_) => 6,
            Error::Timeout => 7,
            Error::Config(_) => 8,
            Error::CircuitOpen { .. } => 9,
            Error::Overloaded(_) => 10,
            Error::Closed(_) => 11,
        }
    }

    /// A [`Decode`](Error::Decode) error; the message is [`scrub`]bed, then cut to 200 bytes
    /// (it may quote what the exchange sent).
    pub(crate) fn decode(what: impl std::fmt::Display) -> Self {
        Error::Decode(truncate(&scrub(&what.to_string()), 200))
    }
}

/// What replaces a scrubbed word.
const REDACTED: &str = "<redacted>";

/// Remove anything credential-like from text that came from (or was echoed by) a server, so
/// that it may appear in an error message: every "word" (a run of ASCII letters, digits and
/// `+/=_-.~`) that
///
/// - follows `Bearer` or `Basic` (an `Authorization` value),
/// - contains `eyJ` (the base64 of `{"`, the start of every JWT header and claims segment),
/// - is a JWT-like triple: three or more dot-separated segments, two of them 10+ characters,
/// - or is 40 or more characters long (a signature, a key in hex or base64, a PEM line),
///
/// becomes `<redacted>`. UUIDs (36 characters), product ids, host names and words of prose
/// stay as they are.
pub(crate) fn scrub(text: &str) -> std::borrow::Cow<'_, str> {
    fn in_word(c: char) -> bool {
        c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=' | '_' | '-' | '.' | '~')
    }
    fn secret_like(word: &str, after_scheme: bool) -> bool {
        let long_segments = word.split('.').filter(|s| s.len() >= 10).count();
        let jwt_like = word.split('.').count() >= 3 && long_segments >= 2;
        after_scheme || word.len() >= 40 || word.contains("eyJ") || jwt_like
    }
    let mut out = String::new();
    let mut copied = 0;
    let mut after_scheme = false;
    let mut rest = text.char_indices().peekable();
    while let Some((start, c)) = rest.next() {
        if !in_word(c) {
            continue;
        }
        let mut end = start + c.len_utf8();
        while let Some(&(i, c)) = rest.peek() {
            if !in_word(c) {
                break;
            }
            end = i + c.len_utf8();
            rest.next();
        }
        let word = &text[start..end];
        if secret_like(word, after_scheme) {
            out.push_str(&text[copied..start]);
            out.push_str(REDACTED);
            copied = end;
        }
        after_scheme = word.eq_ignore_ascii_case("bearer") || word.eq_ignore_ascii_case("basic");
    }
    if copied == 0 {
        return std::borrow::Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    std::borrow::Cow::Owned(out)
}

/// Cut a message to at most `max` bytes on a char boundary, marking the cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_table() {
        let rows: Vec<(Error, bool, bool)> = vec![
            (Error::InvalidInput("x".into()), false, false),
            (Error::NotFound("x".into()), false, false),
            (Error::RateLimited { retry_after: None, local: false }, true, true),
            (Error::RateLimited { retry_after: Some(Duration::from_secs(1)), local: true }, true, true),
            (Error::Unauthorized("x".into()), false, false),
            (Error::Upstream { status: 500, message: "x".into() }, true, false),
            (Error::Upstream { status: 503, message: "x".into() }, true, false),
            (Error::Upstream { status: 408, message: "x".into() }, true, false),
            (Error::Upstream { status: 400, message: "x".into() }, false, false),
            (Error::Decode("x".into()), false, false),
            (Error::Transport("x".into()), true, false),
            (Error::Timeout, true, false),
            (Error::Config("x".into()), false, false),
            (Error::Closed("x".into()), false, false),
        ];
        for (err, retryable, limited) in rows {
            assert_eq!(err.is_retryable(), retryable, "{err:?}");
            assert_eq!(err.is_rate_limited(), limited, "{err:?}");
        }
    }

    #[test]
    fn health_verdicts_for_the_breaker() {
        let rows: Vec<(Error, Health)> = vec![
            (Error::Transport("reset".into()), Health::Failed),
            (Error::Timeout, Health::Failed),
            (Error::Decode("x".into()), Health::Failed),
            (Error::Upstream { status: 500, message: "x".into() }, Health::Failed),
            (Error::Upstream { status: 503, message: "x".into() }, Health::Failed),
            (Error::Upstream { status: 408, message: "x".into() }, Health::Failed),
            (Error::Upstream { status: 400, message: "x".into() }, Health::Healthy),
            (Error::NotFound("x".into()), Health::Healthy),
            (Error::InvalidInput("x".into()), Health::Healthy),
            (Error::Unauthorized("x".into()), Health::Healthy),
            (Error::RateLimited { retry_after: None, local: false }, Health::Neutral),
            (Error::RateLimited { retry_after: None, local: true }, Health::Neutral),
            (Error::Overloaded("x".into()), Health::Neutral),
            (Error::CircuitOpen { class: EndpointClass::Public, retry_in: Duration::ZERO }, Health::Neutral),
            (Error::Closed("x".into()), Health::Neutral),
        ];
        for (e, v) in rows {
            assert_eq!(Health::of::<()>(&Err(e.clone())), v, "{e:?}");
        }
        assert_eq!(Health::of(&Ok(1)), Health::Healthy);
    }

    #[test]
    fn retry_after_is_exposed_and_displayed() {
        let e = Error::RateLimited { retry_after: Some(Duration::from_millis(1500)), local: false };
        assert_eq!(e.retry_after(), Some(Duration::from_millis(1500)));
        assert_eq!(e.to_string(), "rate limited by the exchange; retry after 1500 ms");
        assert_eq!(Error::Timeout.retry_after(), None);
    }

    #[test]
    fn scrub_removes_tokens_and_keeps_prose() {
        let jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJrIn0.c2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJl";
        let rows: &[(&str, &str)] = &[
            ("order with this orderID was not found", "order with this orderID was not found"),
            ("ProductID is invalid: BTC-USDX", "ProductID is invalid: BTC-USDX"),
            ("account 8bfc20d7-f7c6-4422-bf07-8243ca4169fe", "account 8bfc20d7-f7c6-4422-bf07-8243ca4169fe"),
            ("see api.coinbase.com or v1.2.3", "see api.coinbase.com or v1.2.3"),
            ("Authorization: Bearer abc.def", "Authorization: Bearer <redacted>"),
            ("basic dXNlcjpwYXNz!", "basic <redacted>!"),
            ("bad token eyJhbGciOi", "bad token <redacted>"),
            ("aaaaaaaaaaaa.bbbbbbbbbbbb.c", "<redacted>"),
            ("sig=\"0123456789abcdef0123456789abcdef01234567\".", "sig=\"<redacted>\"."),
            ("", ""),
            ("é", "é"),
        ];
        for (input, want) in rows {
            assert_eq!(scrub(input), *want, "{input}");
        }
        assert_eq!(scrub(&format!("token {jwt} rejected")), "token <redacted> rejected");
        let e = Error::decode(format!("invalid type: string \"{jwt}\", expected a sequence"));
        assert!(!format!("{e} {e:?}").contains("eyJ"), "{e:?}");
        assert!(matches!(scrub("plain words"), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("abc", 10), "abc");
        assert_eq!(truncate("ééé", 3), "é...");
    }
}
