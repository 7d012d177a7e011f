//! Pass-through: any path the cache does not answer goes upstream with the proxy's own JWT,
//! through the shared rate limiter at the highest priority, never cached, retried only when
//! idempotent.

use std::time::Duration;

use hyper::{
    HeaderMap, Method,
    body::Bytes,
    header::{HeaderName, HeaderValue},
};
use tracing::Instrument as _;

use super::routes::Reply;
use crate::{
    coinbase::{API_PREFIX, Credentials},
    error::{Error, Result},
    limiter::{EndpointClass, Priority, RateLimiter},
};

/// Largest upstream answer relayed (larger is 502, not read further).
const MAX_UPSTREAM_BODY: usize = 4 * 1024 * 1024;
/// Retries of an idempotent pass-through request.
const MAX_RETRIES: u32 = 2;

/// Request headers relayed upstream; everything else (above all `Authorization`, cookies, the
/// local token and hop-by-hop headers) is dropped.
const RELAYED_REQUEST: [&str; 4] = ["content-type", "accept", "cache-control", "cb-version"];
/// Response headers relayed to the client.
const RELAYED_RESPONSE: [&str; 5] =
    ["content-type", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "retry-after"];

pub(super) struct Forwarder {
    http: reqwest::Client,
    base: String,
    jwt_host: String,
    creds: Credentials,
    gate: Gate,
}

/// How the shared tier admitted a request (to record its outcome on the same path).
#[cfg(feature = "redis")]
type Admitted = crate::redis::TierPath;
#[cfg(not(feature = "redis"))]
type Admitted = std::convert::Infallible;

/// What admits a pass-through request: the proxy's own client's limiter, or the budget every
/// process on the key shares.
pub(super) enum Gate {
    /// Nothing (a client built without a limiter).
    None,
    /// The proxy's client's rate limiter.
    Local(RateLimiter),
    /// The shared tier's distributed limit.
    #[cfg(feature = "redis")]
    Shared(crate::redis::SharedTier),
}

/// An upstream answer, relayed as it came.
#[derive(Debug)]
pub(super) struct Forwarded {
    pub(super) status: u16,
    pub(super) headers: Vec<(HeaderName, HeaderValue)>,
    pub(super) body: Bytes,
}

impl Forwarder {
    pub(super) fn new(upstream: &str, creds: Credentials, gate: Gate) -> Result<Self> {
        let base = reqwest::Url::parse(upstream.trim_end_matches('/'))
            .map_err(|e| Error::Config(format!("upstream is not a URL: {e}")))?;
        let host = base.host_str().ok_or_else(|| Error::Config("upstream has no host".into()))?;
        let jwt_host = match base.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tickshare-proxy/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Config(format!("could not build the HTTP client: {e}")))?;
        Ok(Forwarder { http, base: base.as_str().trim_end_matches('/').to_string(), jwt_host, creds, gate })
    }

    /// The limiter class of a path: public market data and time, else private.
    fn class(path: &str) -> EndpointClass {
        match path.strip_prefix(API_PREFIX) {
            Some(rest) if rest.starts_with("/market/") || rest == "/time" => EndpointClass::Public,
            _ => EndpointClass::Private,
        }
    }

    /// Run `call`, a request of the proxy's own client (the trades, product list and time
    /// fetches), under the shared tier's admission when the proxy has one: that client is then
    /// built without a limiter, and every request on the key must still draw from the one
    /// budget. Otherwise the client's own limiter admits it and this adds nothing.
    pub(super) async fn gated<T>(
        &self,
        class: EndpointClass,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        #[cfg(feature = "redis")]
        if let Gate::Shared(tier) = &self.gate {
            let path = tier.admit(class).await?;
            let out = call.await;
            let recorded: Result<()> = out.as_ref().map(|_| ()).map_err(Clone::clone);
            tier.record(path, class, &recorded).await;
            return out;
        }
        #[cfg(not(feature = "redis"))]
        let _ = class;
        call.await
    }

    /// Forward one request. `retries` counts the retries made.
    pub(super) async fn send(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        body: Bytes,
        on_retry: impl Fn(),
    ) -> std::result::Result<Forwarded, Reply> {
        let class = Self::class(path);
        let url = match query {
            Some(q) => format!("{}{path}?{q}", self.base),
            None => format!("{}{path}", self.base),
        };
        let idempotent = matches!(*method, Method::GET | Method::HEAD);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let span = tracing::debug_span!(
                "upstream",
                endpoint = "passthrough",
                class = class.as_str(),
                method = method.as_str(),
                attempt,
                status = tracing::field::Empty,
                latency_ms = tracing::field::Empty,
            );
            let outcome =
                self.attempt(method, class, &url, path, headers, body.clone()).instrument(span).await;
            let retry_worthy = match &outcome {
                Ok(f) => f.status == 429 || f.status >= 500,
                Err(e) => e.is_retryable(),
            };
            if !(idempotent && retry_worthy && attempt <= MAX_RETRIES) {
                return outcome.map_err(|e| Reply::from_error(&e));
            }
            on_retry();
            tokio::time::sleep(Duration::from_millis(250) * 2u32.pow(attempt - 1)).await;
        }
    }

    async fn attempt(
        &self,
        method: &Method,
        class: EndpointClass,
        url: &str,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Forwarded> {
        let admitted: Option<Admitted> = match &self.gate {
            Gate::None => None,
            Gate::Local(l) => {
                l.acquire_with(class, Priority::High).await?;
                None
            }
            #[cfg(feature = "redis")]
            Gate::Shared(tier) => Some(tier.admit(class).await?),
        };
        let started = tokio::time::Instant::now();
        let mut req = self.http.request(method.clone(), url).bearer_auth(self.creds.rest_jwt(
            method.as_str(),
            &self.jwt_host,
            path,
        ));
        for name in RELAYED_REQUEST {
            if let Some(v) = headers.get(name) {
                req = req.header(name, v.clone());
            }
        }
        if !body.is_empty() {
            req = req.body(body);
        }
        let outcome = async {
            let mut resp = req.send().await.map_err(|e| {
                if e.is_timeout() { Error::Timeout } else { Error::Transport("upstream unreachable".into()) }
            })?;
            let status = resp.status().as_u16();
            let mut out_headers = Vec::new();
            for name in RELAYED_RESPONSE {
                if let Some(v) = resp.headers().get(name) {
                    out_headers.push((HeaderName::from_static(name), v.clone()));
                }
            }
            let mut buf = Vec::new();
            while let Some(chunk) =
                resp.chunk().await.map_err(|_| Error::Transport("upstream body cut short".into()))?
            {
                if buf.len() + chunk.len() > MAX_UPSTREAM_BODY {
                    return Err(Error::Decode("upstream answer is larger than 4 MiB".into()));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(Forwarded { status, headers: out_headers, body: Bytes::from(buf) })
        }
        .await;
        let span = tracing::Span::current();
        span.record("latency_ms", started.elapsed().as_millis() as u64);
        match &outcome {
            Ok(f) => {
                span.record("status", f.status);
            }
            Err(e) => {
                span.record("status", e.kind());
            }
        }
        tracing::debug!("pass-through answered");
        let recorded: Result<()> = match &outcome {
            Ok(f) if f.status == 429 => Err(Error::RateLimited { retry_after: retry_after(f), local: false }),
            Ok(_) => Ok(()),
            Err(_) => Err(Error::Timeout),
        };
        match (&self.gate, admitted) {
            (Gate::Local(l), _) if recorded.is_ok() || matches!(recorded, Err(Error::RateLimited { .. })) => {
                l.record(class, &recorded);
            }
            #[cfg(feature = "redis")]
            (Gate::Shared(tier), Some(path)) => tier.record(path, class, &recorded).await,
            _ => {}
        }
        outcome
    }
}

fn retry_after(f: &Forwarded) -> Option<Duration> {
    let v = f.headers.iter().find(|(n, _)| n == "retry-after")?.1.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(|s| Duration::from_secs(s.min(60)))
}
