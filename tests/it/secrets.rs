//! Secret hygiene (#7): the private key and the JWTs minted from it never show up in `Debug`,
//! `Display`, serde or tracing output of credentials, clients, sources, stats or errors, and
//! the key material is zeroized on drop.
//!
//! Every secret is searched for in several spellings: the PEM body, any 16-character window of
//! it, the secret scalar in hex (both cases), base64, base64url and as a byte list; JWTs by
//! their exact text, their signature segment, and the `eyJ` prefix every JWT header has.

use std::{
    fmt::Write as _,
    marker::PhantomData,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, http::HeaderMap, routing::get};
use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use p256::pkcs8::LineEnding;
use tickshare::{
    CoinbaseClient, CoordinatedSource, Credentials, DirectSource, Error, MarketDataSource, ProductId,
    sim::{Fault, SimExchange},
};
use tracing::{
    Event, Metadata, Subscriber,
    field::{Field, Visit},
    span,
};

/// A P-256 key with every spelling of its secret that must never leak.
struct Secret {
    pem: String,
    needles: Vec<String>,
}

impl Secret {
    fn new() -> Secret {
        let key = p256::SecretKey::random(&mut rand_core::OsRng);
        let pem = key.to_sec1_pem(LineEnding::LF).unwrap().to_string();
        let scalar = key.to_bytes();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let mut needles: Vec<String> =
            body.as_bytes().windows(16).map(|w| String::from_utf8_lossy(w).into()).collect();
        let hex: String = scalar.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        });
        needles.push(hex[..16].to_string());
        needles.push(hex[..16].to_uppercase());
        needles.push(hex[32..].to_string());
        needles.push(STANDARD.encode(scalar)[..16].to_string());
        needles.push(URL_SAFE_NO_PAD.encode(scalar)[..16].to_string());
        needles.push(format!("{:?}", &scalar[..6]).trim_end_matches(']').to_string());
        Secret { pem, needles }
    }

    fn credentials(&self) -> Credentials {
        Credentials::from_pem("organizations/o/apiKeys/k", &self.pem).unwrap()
    }

    /// Panics, naming `what`, if `text` contains the key in any spelling or anything JWT-like.
    fn assert_absent(&self, what: &str, text: &str) {
        for n in &self.needles {
            assert!(!text.contains(n.as_str()), "{what} leaks key material {n:?}: {text}");
        }
        assert!(!text.contains("eyJ"), "{what} contains something JWT-like: {text}");
    }
}

#[test]
fn the_detector_finds_every_spelling_of_the_secret() {
    let secret = Secret::new();
    let key = p256::SecretKey::from_sec1_pem(&secret.pem).unwrap();
    let scalar = key.to_bytes();
    let hex: String = scalar.iter().map(|b| format!("{b:02x}")).collect();
    let jwt = secret.credentials().ws_jwt();
    let leaks = [
        secret.pem.clone(),
        secret.pem.replace('\n', "\\n"),
        hex.clone(),
        hex.to_uppercase(),
        STANDARD.encode(scalar),
        URL_SAFE_NO_PAD.encode(scalar),
        format!("{:?}", &scalar[..]),
        format!("prefix {jwt} suffix"),
    ];
    for leak in leaks {
        let caught = std::panic::catch_unwind(|| secret.assert_absent("probe", &leak)).is_err();
        assert!(caught, "not detected: {leak}");
    }
}

/// `true` when `T: Serialize`, `false` otherwise, decided at compile time without
/// specialization: an inherent method (only when the bound holds) wins over a trait method.
struct SerProbe<T>(PhantomData<T>);
trait NotSerialize {
    fn is_serialize(&self) -> bool {
        false
    }
}
impl<T> NotSerialize for SerProbe<T> {}
impl<T: serde::Serialize> SerProbe<T> {
    fn is_serialize(&self) -> bool {
        true
    }
}

/// The same probe for `Deserialize`.
struct DeProbe<T>(PhantomData<T>);
trait NotDeserialize {
    fn is_deserialize(&self) -> bool {
        false
    }
}
impl<T> NotDeserialize for DeProbe<T> {}
impl<T: serde::de::DeserializeOwned> DeProbe<T> {
    fn is_deserialize(&self) -> bool {
        true
    }
}

fn zeroize_on_drop<T: zeroize::ZeroizeOnDrop>() {}

#[test]
fn key_material_is_zeroized_on_drop() {
    // What the type system can show: the one field of `Credentials` that holds key material is
    // an ed25519-dalek or a p256 `SigningKey`, whose `Drop` zeroizes the secret
    // (`ZeroizeOnDrop`), and `Credentials` itself carries the marker. The `SecretKey` parsed
    // from an EC PEM on the way is `ZeroizeOnDrop` too, and the secret's text is held in
    // `Zeroizing`. Reading freed memory to watch the bytes go is not possible without
    // `unsafe`, which this crate forbids.
    zeroize_on_drop::<Credentials>();
    zeroize_on_drop::<ed25519_dalek::SigningKey>();
    zeroize_on_drop::<p256::ecdsa::SigningKey>();
    zeroize_on_drop::<p256::SecretKey>();
    zeroize_on_drop::<zeroize::Zeroizing<String>>();
}

#[test]
fn credentials_are_neither_serialize_nor_deserialize() {
    assert!(!SerProbe::<Credentials>(PhantomData).is_serialize());
    assert!(!DeProbe::<Credentials>(PhantomData).is_deserialize());
    assert!(!SerProbe::<CoinbaseClient>(PhantomData).is_serialize());
    // The probe itself works.
    assert!(SerProbe::<tickshare::CoordinatedConfig>(PhantomData).is_serialize());
    assert!(DeProbe::<tickshare::CoordinatedConfig>(PhantomData).is_deserialize());
}

#[test]
fn debug_of_credentials_clients_and_builders_is_redacted() {
    let secret = Secret::new();
    let creds = secret.credentials();
    let jwt = creds.rest_jwt("GET", "api.coinbase.com", "/api/v3/brokerage/accounts");
    let builder = CoinbaseClient::builder().credentials(creds.clone());
    let client = builder.clone().build().unwrap();
    let source = CoordinatedSource::coinbase(client.clone()).build().unwrap();
    let direct = DirectSource::new(client.clone());
    for (what, text) in [
        ("Credentials {:?}", format!("{creds:?}")),
        ("Credentials {:#?}", format!("{creds:#?}")),
        ("CoinbaseClientBuilder", format!("{builder:?}")),
        ("CoinbaseClient", format!("{client:?}")),
        ("CoinbaseClient {:#?}", format!("{client:#?}")),
        ("CoordinatedSource", format!("{source:?}")),
        ("DirectSource", format!("{direct:?}")),
        ("ClientStats JSON", serde_json::to_string(&client.stats()).unwrap()),
        ("CoordinatedStats JSON", serde_json::to_string(&source.stats()).unwrap()),
    ] {
        secret.assert_absent(what, &text);
        assert!(!text.contains(&jwt), "{what}");
    }
    assert!(format!("{creds:?}").contains("<redacted>"));
    // The key name is not secret and stays visible, so operators can tell keys apart.
    assert!(format!("{client:?}").contains("apiKeys/k"));
    // The minted token is a real JWT (the needle "eyJ" would find one).
    assert!(jwt.starts_with("eyJ"));
}

#[test]
fn errors_from_bad_keys_never_echo_them() {
    let secret = Secret::new();
    // A PEM damaged in one character: the parse fails, the message must not quote it.
    let mut damaged = secret.pem.clone();
    let at = damaged.find('\n').unwrap() + 10;
    damaged.replace_range(at..at + 1, "!");
    let cases = [
        damaged.clone(),
        damaged.replace('\n', "\\n"),
        secret.pem.replace("EC PRIVATE KEY", "RSA PRIVATE KEY"),
        secret.pem.lines().filter(|l| !l.starts_with("-----")).collect::<String>(),
    ];
    for pem in &cases {
        let e = Credentials::from_pem("organizations/o/apiKeys/k", pem).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e:?}");
        secret.assert_absent("Error Display", &e.to_string());
        secret.assert_absent("Error Debug", &format!("{e:?}"));
    }
}

/// A recording `tracing` subscriber: every event's and span's fields, as text.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<String>>);

struct Text<'a>(&'a mut String);

impl Visit for Text<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        let _ = write!(self.0, " {}={value}", field.name());
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
    fn new_span(&self, attrs: &span::Attributes<'_>) -> span::Id {
        let mut out = self.0.lock().unwrap();
        let _ = write!(out, "\n[span {}]", attrs.metadata().name());
        attrs.record(&mut Text(&mut out));
        span::Id::from_u64(1)
    }
    fn record(&self, _: &span::Id, values: &span::Record<'_>) {
        values.record(&mut Text(&mut self.0.lock().unwrap()));
    }
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut out = self.0.lock().unwrap();
        let _ = write!(out, "\n{} {}", event.metadata().level(), event.metadata().target());
        event.record(&mut Text(&mut out));
    }
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

#[tokio::test(start_paused = true)]
async fn tracing_output_of_failing_authenticated_traffic_has_no_secrets() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let secret = Secret::new();
    let creds = secret.credentials();
    // The exchange verifies every token against the public half of the key.
    let sim = SimExchange::builder().jwt_public_key_pem(&creds.public_key_pem()).start().await.unwrap();
    let client = sim
        .client_builder()
        .credentials(creds)
        .timeout(Duration::from_secs(2))
        .max_retries(1)
        .build()
        .unwrap();
    let source = CoordinatedSource::coinbase(client.clone()).build().unwrap();
    let btc: ProductId = "BTC-USD".parse().unwrap();
    assert!(source.ticker(&btc).await.is_ok(), "signed requests are accepted");
    let mut errors = Vec::new();
    for fault in [
        Fault::status(500),
        Fault::status(401),
        Fault::status(429),
        Fault::malformed_body(),
        Fault::truncated_body(),
        Fault::connection_reset(),
        Fault::stall(Duration::from_secs(30)),
    ] {
        sim.add_fault(fault.times(20));
        for _ in 0..4 {
            if let Err(e) = client.accounts().await {
                errors.push(e);
            }
            if let Err(e) = source.accounts().await {
                errors.push(e);
            }
            tokio::time::sleep(Duration::from_secs(6)).await;
        }
        sim.clear_faults();
    }
    sim.set_down(true);
    for _ in 0..10 {
        if let Err(e) = source.ticker(&btc).await {
            errors.push(e);
        }
        tokio::time::sleep(Duration::from_secs(6)).await;
    }
    sim.set_down(false);
    let logs = capture.0.lock().unwrap().clone();
    // The run produced errors and logs, so the checks below are not vacuous.
    assert!(errors.len() >= 20, "{errors:?}");
    assert!(logs.contains("request failed") && logs.contains("circuit open"), "{logs}");
    secret.assert_absent("tracing output", &logs);
    for e in &errors {
        secret.assert_absent("error Display", &e.to_string());
        secret.assert_absent("error Debug", &format!("{e:?}"));
    }
    secret.assert_absent("stats JSON", &serde_json::to_string(&source.stats()).unwrap());
    secret.assert_absent("sim stats JSON", &serde_json::to_string(&sim.stats()).unwrap());
}

/// A hostile or broken server that echoes the `Authorization` header back in its error
/// bodies: the error a caller sees may quote a little of the body, but never a whole token or
/// its signature, so nothing usable leaks into logs.
#[tokio::test]
async fn a_server_echoing_the_token_does_not_get_it_into_errors() {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = {
        let seen = Arc::clone(&seen);
        move |headers: &HeaderMap| {
            let token = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .trim_start_matches("Bearer ")
                .to_string();
            seen.lock().unwrap().push(token.clone());
            token
        }
    };
    let r1 = record.clone();
    let r2 = record.clone();
    let r3 = record;
    let app = Router::new()
        .route(
            "/api/v3/brokerage/accounts",
            get(move |h: HeaderMap| {
                let t = r1(&h);
                async move {
                    (
                        axum::http::StatusCode::UNAUTHORIZED,
                        format!(r#"{{"error":"UNAUTHENTICATED","message":"bad token {t}"}}"#),
                    )
                }
            }),
        )
        .route(
            "/api/v3/brokerage/best_bid_ask",
            get(move |h: HeaderMap| {
                let t = r2(&h);
                async move {
                    (
                        axum::http::StatusCode::BAD_GATEWAY,
                        format!("<html><body>upstream said {t}</body></html>"),
                    )
                }
            }),
        )
        .route(
            "/api/v3/brokerage/products/{id}/ticker",
            get(move |h: HeaderMap| {
                let t = r3(&h);
                async move { (axum::http::StatusCode::OK, format!(r#"{{"trades": "{t}"}}"#)) }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let secret = Secret::new();
    let client = CoinbaseClient::builder()
        .base_url(format!("http://{addr}"))
        .credentials(secret.credentials())
        .build()
        .unwrap();
    let btc: ProductId = "BTC-USD".parse().unwrap();
    let errors = [
        client.accounts().await.unwrap_err(),
        client.best_bid_ask(std::slice::from_ref(&btc)).await.unwrap_err(),
        client.ticker(&btc).await.unwrap_err(),
    ];
    server.abort();
    let tokens = seen.lock().unwrap().clone();
    assert_eq!(tokens.len(), 3);
    for (e, token) in errors.iter().zip(&tokens) {
        let signature = token.rsplit('.').next().unwrap();
        assert!(signature.len() >= 80, "{token}");
        for text in [e.to_string(), format!("{e:?}")] {
            assert!(!text.contains(token.as_str()), "a whole token leaked: {text}");
            assert!(!text.contains(signature), "a token's signature leaked: {text}");
            for n in &secret.needles {
                assert!(!text.contains(n.as_str()), "key material leaked: {text}");
            }
        }
    }
    assert!(matches!(errors[0], Error::Unauthorized(_)), "{:?}", errors[0]);
    assert!(matches!(errors[1], Error::Upstream { status: 502, .. }), "{:?}", errors[1]);
    assert!(matches!(errors[2], Error::Decode(_)), "{:?}", errors[2]);
}
