//! The `upstream_request` span of every HTTP request (#17): its fields (endpoint, class,
//! attempt, status, outcome, latency) over real requests to the simulated exchange, and no
//! secret of a keyed client in any of them.
//!
//! A test binary of its own, with one recording subscriber installed as the *global* default
//! once, before any callsite is hit. A thread-local subscriber (`set_default`) is not enough
//! in the `it` binary: tracing caches each callsite's interest the first time it is hit, and
//! with tests running in parallel that may happen on a thread with no subscriber, so a span
//! goes unrecorded now and then. Here every callsite registers while the recorder is the global
//! dispatcher (and the interest cache is rebuilt after installing it), and the one test runs on
//! a current-thread runtime with the simulator on it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use p256::pkcs8::LineEnding;
use tickshare::{
    Credentials, MarketDataSource, ProductId,
    coinbase::Endpoint,
    sim::{Fault, SimExchange},
};
use tracing::{
    Event, Metadata, Subscriber,
    field::{Field, Visit},
    span,
};

/// One recorded span: its name and every field recorded on it, as text.
#[derive(Debug, Clone)]
struct Recorded {
    name: &'static str,
    fields: BTreeMap<&'static str, String>,
}

/// The global recorder: every span with its fields, and every event as text.
#[derive(Default)]
struct Recorder {
    next_id: AtomicU64,
    spans: Mutex<BTreeMap<u64, Recorded>>,
    events: Mutex<String>,
}

struct Fields<'a>(&'a mut BTreeMap<&'static str, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name(), value.to_string());
    }
}

struct Text<'a>(&'a mut String);

impl Visit for Text<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
}

impl Subscriber for &'static Recorder {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
    fn new_span(&self, attrs: &span::Attributes<'_>) -> span::Id {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        self.spans.lock().unwrap().insert(id, Recorded { name: attrs.metadata().name(), fields });
        span::Id::from_u64(id)
    }
    fn record(&self, id: &span::Id, values: &span::Record<'_>) {
        if let Some(r) = self.spans.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Fields(&mut r.fields));
        }
    }
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut out = self.events.lock().unwrap();
        let _ = write!(out, "\n{} {}", event.metadata().level(), event.metadata().target());
        event.record(&mut Text(&mut out));
    }
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

/// The recorder, installed as the global default on first use.
fn recorder() -> &'static Recorder {
    static RECORDER: OnceLock<&'static Recorder> = OnceLock::new();
    RECORDER.get_or_init(|| {
        let r: &'static Recorder = Box::leak(Box::default());
        tracing::subscriber::set_global_default(r).expect("no other global subscriber in this binary");
        tracing::callsite::rebuild_interest_cache();
        r
    })
}

impl Recorder {
    /// Take the `upstream_request` spans recorded so far (in creation order), forgetting all.
    fn take_requests(&self) -> Vec<BTreeMap<&'static str, String>> {
        std::mem::take(&mut *self.spans.lock().unwrap())
            .into_values()
            .filter(|r| r.name == "upstream_request")
            .map(|r| r.fields)
            .collect()
    }
}

/// The fields of the span for one request, as the client records them.
fn fields(
    endpoint: &str,
    class: &str,
    attempt: u32,
    status: u16,
    outcome: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("attempt", attempt.to_string()),
        ("class", class.to_string()),
        ("endpoint", endpoint.to_string()),
        ("outcome", outcome.to_string()),
        ("status", status.to_string()),
    ]
}

/// Every field of `span` but `latency_ms`, which must be present and a number.
fn without_latency(span: &BTreeMap<&'static str, String>) -> Vec<(&'static str, String)> {
    let latency = span.get("latency_ms").unwrap_or_else(|| panic!("no latency_ms in {span:?}"));
    assert!(latency.parse::<u64>().is_ok(), "latency_ms {latency:?}");
    span.iter().filter(|(k, _)| **k != "latency_ms").map(|(k, v)| (*k, v.clone())).collect()
}

#[tokio::test(start_paused = true)]
async fn upstream_request_spans_number_attempts_and_hold_no_secret() {
    let recorder = recorder();
    // A P-256 key the exchange verifies every token with; its PEM must never be recorded.
    let key = p256::SecretKey::random(&mut rand_core::OsRng);
    let pem = key.to_sec1_pem(LineEnding::LF).unwrap().to_string();
    let creds = Credentials::from_pem("organizations/o/apiKeys/spans", &pem).unwrap();
    let sim = SimExchange::builder().jwt_public_key_pem(&creds.public_key_pem()).start().await.unwrap();
    let btc: ProductId = "BTC-USD".parse().unwrap();

    // Public: a keyless client, one 503 then a 200; the retry loop makes attempts 1 and 2.
    let keyless = sim.client_builder().max_retries(2).build().unwrap();
    sim.add_fault(Fault::status(503).on(tickshare::sim::Endpoint::MarketTicker).times(1));
    keyless.ticker(&btc).await.unwrap();
    let spans = recorder.take_requests();
    assert_eq!(
        spans.iter().map(without_latency).collect::<Vec<_>>(),
        vec![
            fields(Endpoint::Ticker.as_str(), "public", 1, 503, "upstream"),
            fields(Endpoint::Ticker.as_str(), "public", 2, 200, "ok"),
        ],
        "{spans:#?}"
    );

    // Private: a keyed client, one 500 then a 200 on accounts.
    let keyed = sim.client_builder().credentials(creds).max_retries(2).build().unwrap();
    sim.add_fault(Fault::status(500).on(tickshare::sim::Endpoint::Accounts).times(1));
    assert!(!keyed.accounts().await.unwrap().is_empty());
    // A request that is not retried: one attempt, numbered 1.
    keyed.ticker(&btc).await.unwrap();
    let spans = recorder.take_requests();
    assert_eq!(
        spans.iter().map(without_latency).collect::<Vec<_>>(),
        vec![
            fields(Endpoint::Accounts.as_str(), "private", 1, 500, "upstream"),
            fields(Endpoint::Accounts.as_str(), "private", 2, 200, "ok"),
            fields(Endpoint::Ticker.as_str(), "private", 1, 200, "ok"),
        ],
        "{spans:#?}"
    );
    // The keyed requests were signed (the exchange checked each token), and no field of any
    // span or event holds the key or a token: every JWT starts with `eyJ` (`{"` in base64url),
    // and any 16 characters of the PEM's body would betray the key.
    assert_eq!(sim.stats().auth_failures, 0);
    let mut recorded: String = spans.iter().flat_map(|s| s.values()).map(|v| format!("{v}\n")).collect();
    recorded.push_str(&recorder.events.lock().unwrap());
    assert!(recorded.contains("retrying"), "the retries were logged too: {recorded}");
    for needle in ["eyJ", "Bearer", "BEGIN", "PRIVATE KEY"] {
        assert!(!recorded.contains(needle), "{needle:?} recorded: {recorded}");
    }
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    for w in body.as_bytes().windows(16) {
        let w = std::str::from_utf8(w).unwrap();
        assert!(!recorded.contains(w), "a piece of the key was recorded: {w}");
    }
}
