//! The HTTP side of the simulated exchange: the accept loop, one hyper connection per client,
//! answering a request (limits, faults, latency, routes), and the bodies and streams that let
//! faults cut a response short or reset a connection.

use std::{
    fmt, io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper::{
    Method, Request, Response, StatusCode,
    body::{Body, Bytes, Frame, Incoming, SizeHint},
    header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
    time::Instant,
};

use super::{
    HTML_429_BODY, RATE_LIMIT_MESSAGE, Settings, Shared, SimHandle,
    faults::ResponseFault,
    jwt,
    limits::Admission,
    routes::{self, Query, Reply},
};
use crate::{limiter::EndpointClass, util::lock};

/// The accept loop: one task per connection, until `stop`.
pub(super) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let refused = |s: &Shared| lock(&s.counters).dropped_while_down();
    let mut conns = accept_until_stopped(&listener, &shared, stop, refused, serve_connection).await;
    drop(listener);
    let drain = async { while conns.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(grace, drain).await;
    conns.shutdown().await;
    tracing::debug!("simulated exchange stopped");
}

/// Accept connections until `stop`, each served by its own `serve` task (given the stop flag);
/// one arriving while the exchange is down is reset at once and counted by `refused`. Returns
/// the connections still open.
pub(super) async fn accept_until_stopped<Fut>(
    listener: &TcpListener,
    shared: &Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    refused: impl Fn(&Shared),
    serve: impl Fn(TcpStream, Arc<Shared>, watch::Receiver<bool>) -> Fut,
) -> JoinSet<()>
where
    Fut: Future<Output = ()> + Send + 'static,
{
    let conn_stop = stop.clone();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = until_true(&mut stop) => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::task::yield_now().await;
                    continue;
                };
                if *shared.down.borrow() {
                    let _ = stream.set_zero_linger();
                    refused(shared);
                    continue;
                }
                conns.spawn(serve(stream, Arc::clone(shared), conn_stop.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns
}

/// Resolve once the watched flag is `true` or its sender is gone.
pub(super) async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Serve one connection until it closes, the exchange stops (gracefully) or goes down (reset).
async fn serve_connection(stream: TcpStream, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    let reset = Arc::new(AtomicBool::new(false));
    let io = TokioIo::new(ResettableStream { inner: stream, reset: Arc::clone(&reset) });
    let svc_shared = Arc::clone(&shared);
    let svc_reset = Arc::clone(&reset);
    let service = service_fn(move |req| respond(Arc::clone(&svc_shared), req, Arc::clone(&svc_reset)));
    let mut conn = std::pin::pin!(http1::Builder::new().serve_connection(io, service));
    let mut down = shared.down.subscribe();
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            () = until_true(&mut stop), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            () = until_true(&mut down) => {
                reset.store(true, Ordering::Relaxed);
                lock(&shared.counters).dropped_while_down();
                return;
            }
        }
    }
}

/// Aborts the connection without a response (the service's error).
#[derive(Debug)]
struct ResetConnection;

impl fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection reset by fault injection")
    }
}

impl std::error::Error for ResetConnection {}

/// Answer one HTTP request.
async fn respond(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    reset: Arc<AtomicBool>,
) -> std::result::Result<Response<SimBody>, ResetConnection> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let method = &parts.method;
    if let Some(rest) = path.strip_prefix("/__sim") {
        return Ok(control(&shared, method, rest));
    }
    let query = Query::parse(parts.uri.query());
    // The official SDK sends `{}` with every GET; Coinbase ignores it. Read (bounded) and drop
    // it, or hyper would close the keep-alive connection after the answer.
    let mut body = Some(body);
    if *method == Method::GET && body.as_ref().is_some_and(|b| !b.is_end_stream()) {
        let _ = read_body(body.take()).await;
    }
    // The few v2 (and other) paths ccxt calls to start: src/sim/v2.rs.
    if !*shared.down.borrow() {
        if path == "/v2/accounts" {
            shared.settle_orders(shared.clock.now_utc());
        }
        let accounts = Arc::clone(&lock(&shared.accounts));
        let ctx = shared.ctx(&accounts, shared.clock.now_utc());
        let auth = parts.headers.get(hyper::header::AUTHORIZATION).map(HeaderValue::as_bytes);
        if let Some(reply) =
            super::v2::answer(method, path, auth, shared.jwt_key.as_ref(), jwt_window(&shared), &ctx)
        {
            let mut c = lock(&shared.counters);
            c.call(None);
            c.status(reply.status);
            return Ok(http_response(reply, &[]));
        }
    }
    let routed = match *method {
        Method::GET => routes::route(path),
        Method::POST => routes::route_post(path).map(|e| (e, None)),
        _ => None,
    };
    let Some((endpoint, product)) = routed else {
        let mut c = lock(&shared.counters);
        c.call(None);
        c.status(404);
        return Ok(http_response(Reply::not_found("Not Found"), &[]));
    };
    lock(&shared.counters).call(Some(endpoint));

    let now = Instant::now();
    let admission = lock(&shared.limiter).admit(endpoint.class(), now);
    let settings = *lock(&shared.settings);
    let mut latency = settings.latency;
    let mut plan = None;
    {
        let mut faults = lock(&shared.faults);
        latency = latency.saturating_add(faults.jitter(settings.jitter));
        if matches!(admission, Admission::Accepted { .. }) {
            let p = faults.plan(endpoint, now);
            latency = latency.saturating_add(p.latency);
            plan = p.response;
        }
    }
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }

    let (limit, remaining, reset_at) = match admission {
        Admission::Rejected { limit, reset_at } => {
            let reply = too_many(&shared, settings, Some(limit), 0, reset_at);
            lock(&shared.counters).status(429);
            return Ok(reply);
        }
        Admission::Accepted { limit, remaining, reset_at } => (limit, remaining, reset_at),
    };

    match plan {
        Some(ResponseFault::Status(status)) => {
            let mut c = lock(&shared.counters);
            c.fault();
            c.status(status);
            drop(c);
            if status == 429 {
                let (limit, remaining, reset_at) =
                    lock(&shared.limiter).peek(endpoint.class(), Instant::now());
                return Ok(too_many(&shared, settings, limit, remaining, reset_at));
            }
            let reply = Reply::error(
                status,
                routes::error_id(status),
                StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Error"),
            );
            return Ok(http_response(reply, &[]));
        }
        Some(ResponseFault::ConnectionReset) => {
            lock(&shared.counters).fault();
            reset.store(true, Ordering::Relaxed);
            return Err(ResetConnection);
        }
        Some(ResponseFault::Stall(d)) => {
            lock(&shared.counters).fault();
            tokio::time::sleep(d).await;
        }
        Some(ResponseFault::MalformedBody | ResponseFault::TruncatedBody) | None => {}
    }

    if endpoint.class() == EndpointClass::Private {
        let auth = parts.headers.get(hyper::header::AUTHORIZATION);
        let checked = jwt::check(
            auth.map(HeaderValue::as_bytes),
            shared.jwt_key.as_ref(),
            method.as_str(),
            path,
            jwt::Window {
                now: jwt::system_now().saturating_add(shared.clock_skew.whole_seconds()),
                leeway: shared.jwt_leeway_secs,
            },
        );
        if let Err(e) = checked {
            let mut c = lock(&shared.counters);
            c.auth_failure();
            c.status(401);
            return Ok(http_response(Reply::error(401, "UNAUTHENTICATED", e.message()), &[]));
        }
    }

    let now_utc = shared.clock.now_utc();
    let handled = if endpoint.is_order() {
        let reply = match read_body(body.take()).await {
            Some(bytes) => shared.answer_order(endpoint, product.as_deref(), &query, &bytes, now_utc),
            None => Reply::bad_request("request body too large or unreadable"),
        };
        routes::Handled::from(reply)
    } else {
        if endpoint == super::Endpoint::Accounts {
            shared.settle_orders(now_utc);
        }
        let accounts = Arc::clone(&lock(&shared.accounts));
        routes::handle(endpoint, product.as_deref(), &query, &shared.ctx(&accounts, now_utc))
    };
    let mut reply = handled.reply;
    {
        let mut c = lock(&shared.counters);
        if let Some(candle) = handled.candle {
            c.candle_request(candle);
        }
        c.status(reply.status);
        if matches!(plan, Some(ResponseFault::MalformedBody | ResponseFault::TruncatedBody)) {
            c.fault();
        }
    }
    let mut headers = Vec::new();
    if let Some(limit) = limit {
        headers = rate_limit_headers(&shared, limit, remaining, reset_at);
    }
    let truncate = match plan {
        Some(ResponseFault::MalformedBody) => {
            reply.body.truncate(reply.body.len() / 2);
            false
        }
        Some(ResponseFault::TruncatedBody) => true,
        _ => false,
    };
    let mut response = http_response(reply, &headers);
    if truncate {
        let body = response.body_mut();
        body.fail_after = true;
        if let Some(data) = &mut body.data {
            let half = data.len() / 2;
            data.truncate(half);
        }
    }
    Ok(response)
}

/// A request body of at most [`MAX_BODY_BYTES`](super::orders::MAX_BODY_BYTES) (empty when
/// there is none, or it was read already), or `None` when it is larger or broken.
async fn read_body(body: Option<Incoming>) -> Option<Bytes> {
    use http_body_util::BodyExt;
    let Some(body) = body else { return Some(Bytes::new()) };
    let limited = http_body_util::Limited::new(body, super::orders::MAX_BODY_BYTES);
    limited.collect().await.ok().map(http_body_util::Collected::to_bytes)
}

/// The `/__sim` control paths.
fn control(shared: &Arc<Shared>, method: &Method, rest: &str) -> Response<SimBody> {
    let handle = SimHandle { shared: Arc::clone(shared) };
    match (method, rest) {
        (&Method::GET, "/stats") => http_response(Reply::json(200, &handle.stats()), &[]),
        (&Method::POST, "/reset") => {
            handle.reset_stats();
            http_response(Reply::json(200, &handle.stats()), &[])
        }
        _ => http_response(Reply::not_found("unknown control path"), &[]),
    }
}

fn rate_limit_headers(
    shared: &Shared,
    limit: u32,
    remaining: u32,
    reset_at: Instant,
) -> Vec<(HeaderName, HeaderValue)> {
    let reset = shared.clock.utc_at(reset_at);
    let reset_secs = reset.unix_timestamp() + i64::from(reset.nanosecond() > 0);
    vec![
        (HeaderName::from_static("x-ratelimit-limit"), HeaderValue::from(limit)),
        (HeaderName::from_static("x-ratelimit-remaining"), HeaderValue::from(remaining)),
        (HeaderName::from_static("x-ratelimit-reset"), HeaderValue::from(reset_secs)),
    ]
}

/// A 429 as the rate limiter sends it.
fn too_many(
    shared: &Shared,
    settings: Settings,
    limit: Option<u32>,
    remaining: u32,
    reset_at: Instant,
) -> Response<SimBody> {
    let reply = if settings.html_429 {
        Reply { status: 429, content_type: "text/html", body: HTML_429_BODY.as_bytes().to_vec() }
    } else {
        Reply::error(429, "RATE_LIMIT_EXCEEDED", RATE_LIMIT_MESSAGE)
    };
    let mut headers = match limit {
        Some(limit) => rate_limit_headers(shared, limit, remaining, reset_at),
        None => Vec::new(),
    };
    if settings.retry_after {
        let wait = reset_at.saturating_duration_since(Instant::now());
        let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
        headers.push((RETRY_AFTER, HeaderValue::from(secs)));
    }
    http_response(reply, &headers)
}

fn http_response(reply: Reply, headers: &[(HeaderName, HeaderValue)]) -> Response<SimBody> {
    let mut response = Response::new(SimBody::full(reply.body));
    *response.status_mut() = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    for (name, value) in headers {
        h.insert(name.clone(), value.clone());
    }
    response
}

/// A response body: whole, or (for [`Fault::truncated_body`]) a prefix that ends in an error so
/// hyper aborts the connection after announcing the full length.
#[derive(Debug)]
struct SimBody {
    data: Option<Bytes>,
    len: u64,
    fail_after: bool,
    /// Whether the body already answered `Pending` once after its prefix, which lets hyper
    /// flush the head and the prefix before the error aborts the connection.
    paused: bool,
}

impl SimBody {
    fn full(body: Vec<u8>) -> Self {
        SimBody {
            len: body.len() as u64,
            data: (!body.is_empty()).then(|| Bytes::from(body)),
            fail_after: false,
            paused: false,
        }
    }
}

/// The error a truncated body ends with.
#[derive(Debug)]
struct Truncated;

impl fmt::Display for Truncated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("body truncated by fault injection")
    }
}

impl std::error::Error for Truncated {}

impl Body for SimBody {
    type Data = Bytes;
    type Error = Truncated;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Truncated>>> {
        let this = self.get_mut();
        if let Some(data) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if this.fail_after && !this.paused {
            this.paused = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if this.fail_after {
            this.fail_after = false;
            return Poll::Ready(Some(Err(Truncated)));
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && !self.fail_after
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len)
    }
}

/// A TCP stream that, once `reset` is set, skips the orderly shutdown and closes with RST.
struct ResettableStream {
    inner: TcpStream,
    reset: Arc<AtomicBool>,
}

impl Drop for ResettableStream {
    fn drop(&mut self) {
        if self.reset.load(Ordering::Relaxed) {
            let _ = self.inner.set_zero_linger();
        }
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.reset.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// The exchange's clock for JWT checks: the system time plus [`SimBuilder::clock_skew`](super::SimBuilder::clock_skew).
fn jwt_window(shared: &Shared) -> jwt::Window {
    jwt::Window {
        now: jwt::system_now().saturating_add(shared.clock_skew.whole_seconds()),
        leeway: shared.jwt_leeway_secs,
    }
}
