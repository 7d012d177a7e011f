//! The HTTP side of the proxy: the accept loop with its connection cap, one hyper connection
//! per client with its own token bucket, and the answer to one request (operator paths, limits,
//! auth, cached routes, pass-through).

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Body as _, Bytes, Incoming},
    header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER},
    http::request::Parts,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, oneshot, watch},
    task::JoinSet,
    time::Instant,
};

use super::{
    Shared,
    routes::{self, Query, Reply, Route},
};
use crate::{
    coordinated::BreakerState,
    metrics::{self, Sample},
    util::{inc, lock},
};

/// The bounds on what clients may send.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) max_body_bytes: usize,
    pub(super) max_header_bytes: usize,
    pub(super) rate: u32,
    pub(super) burst: u32,
    pub(super) max_connections: usize,
    pub(super) header_read_timeout: Option<Duration>,
}

/// One connection's token bucket.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, limits: &Limits) -> bool {
        let now = Instant::now();
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * f64::from(limits.rate);
        self.tokens = (self.tokens + refill).min(f64::from(limits.burst));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What one connection's requests share: a request holds a count on this, not on [`Shared`]
/// itself, whose reference count every connection on every worker would otherwise write
/// twice per request (one cache line, passed between the cores).
struct Connection {
    shared: Arc<Shared>,
    bucket: Mutex<Bucket>,
}

async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// The accept loop, until `stop`; then up to 5 s for connections to finish.
///
/// Each connection hears of the stop through a oneshot of its own, not through `stop`: a
/// connection polls its stop signal on every wake-up, and a watch receiver's poll takes a
/// lock shared with other connections (tokio's `Notify`), where a oneshot's is one atomic
/// load. Dropping a connection's sender is its signal.
pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(shared.limits.max_connections));
    let mut conns = JoinSet::new();
    let mut signals: HashMap<tokio::task::Id, oneshot::Sender<()>> = HashMap::new();
    loop {
        tokio::select! {
            () = until_true(&mut stop) => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::task::yield_now().await;
                    continue;
                };
                let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                    inc(&shared.counters.refused_connections);
                    drop(stream);
                    continue;
                };
                inc(&shared.counters.connections);
                let shared = Arc::clone(&shared);
                let (signal, stopped) = oneshot::channel();
                let task = conns.spawn(async move {
                    serve_connection(stream, shared, stopped).await;
                    drop(permit);
                });
                signals.insert(task.id(), signal);
            }
            Some(done) = conns.join_next_with_id(), if !conns.is_empty() => {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(e) => e.id(),
                };
                signals.remove(&id);
            }
        }
    }
    drop(listener);
    signals.clear();
    let drain = async { while conns.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    conns.shutdown().await;
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    shared: Arc<Shared>,
    stopped: oneshot::Receiver<()>,
) {
    let _ = stream.set_nodelay(true);
    let limits = shared.limits;
    let bucket = Mutex::new(Bucket { tokens: f64::from(limits.burst), last: Instant::now() });
    let conn = Arc::new(Connection { shared, bucket });
    let service = service_fn(move |req| respond(Arc::clone(&conn), req));
    let mut builder = http1::Builder::new();
    builder.max_buf_size(limits.max_header_bytes);
    // One flattened write per response instead of writev of head and body: about 4 % less CPU
    // per cached request under proxy_load (six paired runs, normalised by the load generator's
    // CPU); bodies are small or already one chunk, so the copy costs less than the iovec path.
    builder.writev(false);
    if let Some(t) = limits.header_read_timeout {
        builder.timer(TokioTimer::new()).header_read_timeout(t);
    }
    let mut conn = std::pin::pin!(builder.serve_connection(TokioIo::new(stream), service));
    tokio::select! {
        biased;
        _ = conn.as_mut() => {}
        // Sent or dropped: either way the server is stopping.
        _ = stopped => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

fn reply(r: Reply) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(r.body)));
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(r.content_type));
    resp
}

/// Answer one request.
///
/// hyper keeps this future in the connection's own state, one per connection, and moves it
/// there for every request: its size is paid per request, out of memory that a thousand
/// connections make cold. So everything but the cached one-trade ticker (the hot path) is
/// boxed where it is awaited, the pass-through here and the other routes in
/// [`routes::answer`]: 2,000 bytes instead of 5,456 in a release build, half the simulated
/// last-level write misses per request under callgrind's cache model, and about 1 µs less CPU
/// per request pinned (see `tests::the_per_request_future_stays_small`).
async fn respond(conn: Arc<Connection>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (shared, bucket) = (&*conn.shared, &conn.bucket);
    let c = &shared.counters;
    // The head borrowed for everything below; the body is read only for pass-through.
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    if path == "/healthz" {
        inc(&c.by_route[Route::Operator.index()]);
        return Ok(reply(healthz(shared)));
    }
    if !lock(bucket).take(&shared.limits) {
        inc(&c.limited);
        let mut resp =
            reply(Reply::error(429, "RATE_LIMIT_EXCEEDED", "proxy: too many requests on this connection"));
        // When this connection's next token arrives, for clients that honour it: the builder
        // refuses a rate under 1/s, so always within a second.
        resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
        return Ok(resp);
    }
    let method = &parts.method;
    if !shared.auth.check(&parts.headers, method.as_str(), path) {
        inc(&c.unauthorized);
        return Ok(reply(Reply::error(
            401,
            "UNAUTHENTICATED",
            "proxy: present a JWT signed by the proxy's CDP key or a local token",
        )));
    }
    let declared = parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > shared.limits.max_body_bytes) {
        inc(&c.too_large);
        return Ok(reply(Reply::error(413, "INVALID_ARGUMENT", "proxy: request body too large")));
    }
    let operator = method == Method::GET && (path == "/metrics" || path == "/stats");
    let route = if method == Method::GET { Route::of(path) } else { Route::Passthrough };
    // The official SDK sends `{}` with every GET. A body the answer does not use is read
    // (bounded, above) and dropped: left unread, hyper closes the keep-alive connection after
    // the answer and the client's next request on it fails. Boxed: most requests have none.
    let body = if (operator || route != Route::Passthrough) && !body.is_end_stream() {
        Box::pin(discard(body, shared.limits.max_body_bytes)).await;
        None
    } else {
        Some(body)
    };
    if operator {
        inc(&c.by_route[Route::Operator.index()]);
        return Ok(reply(if path == "/metrics" {
            metrics_reply(shared)
        } else {
            Reply::json(200, &shared.stats())
        }));
    }
    let query = parts.uri.query();
    if route != Route::Passthrough
        && let Some(r) = routes::answer(route, &Query::parse(query), shared).await
    {
        inc(&c.by_route[route.index()]);
        return Ok(reply(r));
    }
    inc(&c.by_route[Route::Passthrough.index()]);
    // Boxed: a reqwest request in flight is most of a pass-through's future (see above).
    Ok(Box::pin(pass_through(shared, &parts, body)).await)
}

/// Read and drop a request body, at most `max` bytes of it.
async fn discard(body: Incoming, max: usize) {
    let _ = Limited::new(body, max).collect().await;
}

/// Forward one request upstream with the proxy's credentials and answer what came back
/// (`body` is `None` when it was already read and dropped: a GET's, sent on without it).
async fn pass_through(shared: &Shared, parts: &Parts, body: Option<Incoming>) -> Response<Full<Bytes>> {
    let c = &shared.counters;
    let (method, path, query) = (&parts.method, parts.uri.path(), parts.uri.query());
    let body = match body {
        None => Bytes::new(),
        Some(body) => match Limited::new(body, shared.limits.max_body_bytes).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                inc(&c.too_large);
                return reply(Reply::error(413, "INVALID_ARGUMENT", "proxy: request body too large"));
            }
        },
    };
    let on_retry = || inc(&shared.counters.passthrough_retries);
    let forwarded = shared.forwarder.send(method, path, query, &parts.headers, body, on_retry).await;
    // An order (or a conversion, a transfer...) changes balances: no accounts read that starts
    // after its answer may be served from before it. The shared tier first, so that the local
    // refetch cannot find the old balances there.
    if !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        #[cfg(feature = "redis")]
        if let Some(tier) = &shared.tier
            && tier.invalidate_accounts().await.is_err()
        {
            tracing::warn!("could not invalidate the shared accounts; they expire by their TTL");
        }
        shared.source.invalidate_accounts();
        inc(&c.accounts_invalidations);
    }
    match forwarded {
        Ok(f) => {
            let mut resp = Response::new(Full::new(f.body));
            *resp.status_mut() = StatusCode::from_u16(f.status).unwrap_or(StatusCode::BAD_GATEWAY);
            for (name, value) in f.headers {
                resp.headers_mut().insert(name, value);
            }
            resp
        }
        Err(r) => reply(r),
    }
}

fn healthz(shared: &Shared) -> Reply {
    let b = shared.source.stats().breaker;
    let open = |s: BreakerState| s != BreakerState::Closed;
    let status = if open(b.public.state) || open(b.private.state) { "degraded" } else { "ok" };
    Reply::json(
        200,
        &serde_json::json!({"status": status, "breaker": {"public": b.public.state, "private": b.private.state}}),
    )
}

/// The proxy's own samples, after the source's.
fn proxy_samples(shared: &Shared) -> Vec<Sample> {
    let s = shared.stats();
    let mut out = metrics::samples(&s.coordinated, shared.source.config());
    for (route, n) in &s.requests_by_route {
        out.push(Sample {
            name: "tickshare_proxy_requests_total",
            labels: vec![("route", route.clone())],
            value: *n as f64,
            counter: true,
            help: "Client requests by route.",
        });
    }
    let plain: [(&'static str, &'static str, u64); 11] = [
        ("tickshare_proxy_unauthorized_total", "Requests refused with 401.", s.unauthorized),
        ("tickshare_proxy_limited_total", "Requests refused by the per-connection limit.", s.limited),
        ("tickshare_proxy_too_large_total", "Requests refused for their size.", s.too_large),
        ("tickshare_proxy_connections_total", "Connections accepted.", s.connections),
        ("tickshare_proxy_refused_connections_total", "Connections over the cap.", s.refused_connections),
        ("tickshare_proxy_passthrough_retries_total", "Pass-through retries.", s.passthrough_retries),
        (
            "tickshare_proxy_accounts_invalidations_total",
            "Orders that invalidated the cached accounts.",
            s.accounts_invalidations,
        ),
        ("tickshare_proxy_products_upstream_total", "Product-list fetches.", s.products_upstream),
        ("tickshare_proxy_trades_upstream_total", "Recent-trades fetches.", s.trades_upstream),
        ("tickshare_proxy_books_upstream_total", "Order-book fetches.", s.books_upstream),
        ("tickshare_proxy_time_upstream_total", "Server-time fetches.", s.time_upstream),
    ];
    for (name, help, v) in plain {
        out.push(Sample { name, labels: Vec::new(), value: v as f64, counter: true, help });
    }
    out
}

fn metrics_reply(shared: &Shared) -> Reply {
    let samples = proxy_samples(shared);
    #[cfg(feature = "metrics")]
    metrics::publish(&samples);
    Reply {
        status: 200,
        content_type: "text/plain; version=0.0.4",
        body: metrics::render(&samples).into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::returned_size;

    #[test]
    fn the_per_request_future_stays_small() {
        // Awaited inline, the pass-through and the other routes made them 5,456 and 4,824
        // bytes; boxed, 2,000 and 1,384 (debug and release alike). The bounds leave room for
        // dependencies to grow, not for a large future awaited inline again.
        let size = returned_size(respond);
        assert!(size <= 3_072, "respond's future is {size} bytes");
        let answer =
            returned_size(|r: Route<'static>, (q, s): (&'static Query<'static>, &'static Shared)| {
                routes::answer(r, q, s)
            });
        assert!(answer <= 2_048, "answer's future is {answer} bytes");
    }
}
