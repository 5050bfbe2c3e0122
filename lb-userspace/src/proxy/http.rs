//! `mode = "http"`: an HTTP/1.1 reverse proxy that admits every request on its own through the
//! service's [`Gate`] (policy, shared counts, FIFO queue), so one keep-alive client connection is
//! balanced request by request.
//!
//! A request's body is read whole (up to `max_request_body`) before it waits for a backend: a slow
//! upload never holds one, and a request can be sent again. Its claim is held until the response
//! body has been passed to the client, or the client went away; then the backend connection is
//! closed, which makes llama-server stop generating and free its slot. Responses pass frame by
//! frame (server-sent events arrive as they are produced).
//!
//! Backend connections are kept alive in a [`Pool`] after answers of declared length.
//! llama-server closes the connection after a streamed (chunked) answer although it announced
//! keep-alive, so those connections are closed rather than pooled. A request that a reused
//! connection failed before any response came is sent again on a new one when it was never
//! written (hyper hands it back) or its method is idempotent; a POST the backend may have read
//! is not run twice: it gets 502.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tracing::{Instrument, debug, debug_span};

use super::drain::drain_started;
use super::gate::{Gate, Lease, Refusal};
use crate::affinity;
use crate::limits::{self, Closed, Ended, Registered};

/// What the client gets: an error of the proxy's own, or the backend's body passed on.
type ProxyBody = Either<Full<Bytes>, Passed>;

/// Serve one client connection (keep-alive) until the client closes it or its limits do
/// ([`crate::limits`]: `client_header_timeout`, `client_idle_timeout`, eviction at
/// `max_client_connections`).
pub async fn serve_connection(
    gate: Arc<Gate>,
    pool: Arc<Pool>,
    client: TcpStream,
    peer: Ipv4Addr,
    registered: Registered,
    mut draining: watch::Receiver<bool>,
) {
    let timeouts = gate.config().client_timeouts();
    let service = hyper::service::service_fn({
        let gate = Arc::clone(&gate);
        move |request| {
            let (gate, pool) = (Arc::clone(&gate), Arc::clone(&pool));
            async move { Ok::<_, Infallible>(handle(&gate, &pool, peer, request).await) }
        }
    });
    // Draining: the request in flight (and its streamed answer) finishes; then it closes.
    let stop = drain_started(&mut draining);
    match limits::serve_http1(client, registered, timeouts, service, stop).await {
        Ended::Done | Ended::Closed(Closed::Idle | Closed::Evicted) => {}
        Ended::Closed(Closed::Header) => gate.count(Refusal::ClientTimeout),
        Ended::Failed(error) => debug!(%error, "client connection ended"),
    }
}

/// A client's request body: hyper's [`Incoming`], or any other in tests.
trait ClientBody: Body<Data = Bytes, Error: std::error::Error + Send + Sync + 'static> {}

impl<B: Body<Data = Bytes, Error: std::error::Error + Send + Sync + 'static>> ClientBody for B {}

/// The request as it goes to every backend it is tried on.
struct Outgoing {
    parts: hyper::http::request::Parts,
    body: Bytes,
}

impl Outgoing {
    fn request(&self) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(self.body.clone()));
        *request.method_mut() = self.parts.method.clone();
        *request.uri_mut() = self.parts.uri.clone();
        *request.headers_mut() = self.parts.headers.clone();
        request
    }
}

async fn handle<B: ClientBody>(
    gate: &Arc<Gate>,
    pool: &Arc<Pool>,
    peer: Ipv4Addr,
    request: Request<B>,
) -> Response<ProxyBody> {
    match forward(gate, pool, peer, request).await {
        Ok(response) => response,
        Err(error) => {
            gate.count(error.refusal);
            debug!(refusal = ?error.refusal, message = %error.message, "request refused");
            error.response()
        }
    }
}

/// A refused request: its status, reason and a message naming the limit.
struct Refused {
    refusal: Refusal,
    message: String,
    /// With a full queue: when to try again.
    retry_after: Option<Duration>,
}

impl Refused {
    fn status(&self) -> StatusCode {
        match self.refusal {
            Refusal::QueueFull => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::QueueTimeout => StatusCode::GATEWAY_TIMEOUT,
            // Cloudflare's "a timeout occurred", which llama.cpp clients show as it is.
            Refusal::ResponseTimeout => {
                StatusCode::from_u16(524).unwrap_or(StatusCode::GATEWAY_TIMEOUT)
            }
            Refusal::Connect | Refusal::BadGateway => StatusCode::BAD_GATEWAY,
            Refusal::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::BadRequest => StatusCode::BAD_REQUEST,
            // The last two close the connection instead of answering.
            Refusal::BodyTimeout | Refusal::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
            Refusal::ConnectionLimit => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// OpenAI's error shape, which llama.cpp's clients display.
    fn response(&self) -> Response<ProxyBody> {
        let status = self.status();
        let body = serde_json::json!({
            "error": {"code": status.as_u16(), "type": self.refusal.name(), "message": self.message}
        });
        let mut response = Response::new(Either::Left(Full::new(Bytes::from(body.to_string()))));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(after) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(after.as_secs()));
        }
        response
    }
}

async fn forward<B: ClientBody>(
    gate: &Arc<Gate>,
    pool: &Arc<Pool>,
    peer: Ipv4Addr,
    request: Request<B>,
) -> Result<Response<ProxyBody>, Refused> {
    let config = gate.config();
    let service = gate.service();
    let refused = |refusal, message: String| Refused {
        refusal,
        message,
        retry_after: (refusal == Refusal::QueueFull).then(|| gate.retry_after()),
    };
    let (mut parts, body) = request.into_parts();
    let max = config.max_request_body;
    let timeout = config.client_body_timeout;
    let Ok(collected) = tokio::time::timeout(timeout, Limited::new(body, max).collect()).await
    else {
        return Err(refused(
            Refusal::BodyTimeout,
            format!(
                "the request body did not arrive within client_body_timeout {timeout:?} of \
                 service `{service}`"
            ),
        ));
    };
    let body = match collected {
        Ok(body) => body.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            return Err(refused(
                Refusal::BodyTooLarge,
                format!(
                    "the request body of service `{service}` is over max_request_body {max} bytes"
                ),
            ));
        }
        Err(error) => {
            // The client went away mid-body: most likely nobody reads this answer.
            return Err(refused(
                Refusal::BadRequest,
                format!("reading the request body: {error}"),
            ));
        }
    };
    let key = gate.affinity().map(|spec| {
        let header = |name: &str| parts.headers.get(name).map(HeaderValue::as_bytes);
        affinity::key(spec, header, &body, peer)
    });
    strip_hop_by_hop(&mut parts.headers);
    // The body is here already: a backend asked to wait for it would only add a round trip.
    parts.headers.remove(header::EXPECT);
    forwarded_for(&mut parts.headers, peer);
    // The backend gets origin form; Host stays as the client sent it.
    if let Some(path) = parts.uri.path_and_query() {
        parts.uri = path.clone().into();
    }
    let outgoing = Outgoing { parts, body };
    let mut avoid = None;
    let mut unreachable = Vec::new();
    // One retry on another backend when the chosen one cannot be reached.
    for _ in 0..2 {
        let lease = gate.admit(peer, key, avoid).await.map_err(|refusal| {
            let message = match refusal {
                Refusal::QueueFull => format!(
                    "the queue of service `{service}` is full (queue_size {})",
                    config.queue_size
                ),
                _ => format!(
                    "no backend of service `{service}` had room within queue_timeout {:?}",
                    config.queue_timeout
                ),
            };
            refused(refusal, message)
        })?;
        let address = lease.address;
        let span = debug_span!("request", backend = %address, id = lease.id);
        match exchange(pool, address, &outgoing, config.response_timeout)
            .instrument(span)
            .await
        {
            Ok((response, upstream)) => return Ok(pass(response, upstream, lease, pool)),
            Err(Failed::Connect(error)) => {
                debug!(%address, %error, "backend unreachable");
                unreachable.push(format!("{address}: {error}"));
                // Waiting in the queue for no other backend would end in a 504, not the 502.
                if avoid.is_some() || !gate.has_backend_besides(lease.id) {
                    break;
                }
                avoid = Some(lease.id);
                gate.count_retry();
            }
            Err(Failed::ResponseTimeout) => {
                return Err(refused(
                    Refusal::ResponseTimeout,
                    format!(
                        "backend {address} of service `{service}` sent no response within \
                         response_timeout {:?}",
                        config.response_timeout
                    ),
                ));
            }
            Err(Failed::Broken(error) | Failed::Unsent(error)) => {
                return Err(refused(
                    Refusal::BadGateway,
                    format!("backend {address} of service `{service}` failed: {error}"),
                ));
            }
        }
    }
    Err(refused(
        Refusal::Connect,
        format!(
            "no backend of service `{service}` could be reached ({})",
            unreachable.join("; ")
        ),
    ))
}

/// Why a request got no response head from a backend.
enum Failed {
    /// Before anything was sent: another backend may take it.
    Connect(String),
    /// The connection ended before the request was written: it may be sent again.
    Unsent(hyper::Error),
    ResponseTimeout,
    /// After (part of) the request was written: the backend may have acted on it.
    Broken(hyper::Error),
}

/// Send `outgoing` to `address` on a pooled connection or a new one; the response head and the
/// connection its body comes on. `response_timeout` runs from when the request is sent.
async fn exchange(
    pool: &Pool,
    address: SocketAddrV4,
    outgoing: &Outgoing,
    response_timeout: Duration,
) -> Result<(Response<Incoming>, Upstream), Failed> {
    if let Some(mut upstream) = pool.take(address).await {
        match send(&mut upstream, outgoing, response_timeout).await {
            Ok(response) => return Ok((response, upstream)),
            // The backend had closed it (llama-server does after a stream): try a new one, if
            // the request never left or repeating it is harmless.
            Err(Failed::Unsent(error)) => debug!(%error, "a pooled connection was closed"),
            Err(Failed::Broken(error)) if outgoing.parts.method.is_idempotent() => {
                debug!(%error, "a pooled connection failed");
            }
            Err(other) => return Err(other),
        }
    }
    let mut upstream = Upstream::connect(address, response_timeout).await?;
    let response = send(&mut upstream, outgoing, response_timeout)
        .await
        .map_err(|failed| match failed {
            // Closed before it took anything: as good as refused.
            Failed::Unsent(error) => Failed::Connect(error.to_string()),
            other => other,
        })?;
    Ok((response, upstream))
}

async fn send(
    upstream: &mut Upstream,
    outgoing: &Outgoing,
    response_timeout: Duration,
) -> Result<Response<Incoming>, Failed> {
    let sent = upstream.sender.try_send_request(outgoing.request());
    match tokio::time::timeout(response_timeout, sent).await {
        Ok(Ok(response)) => Ok(response),
        // hyper hands the request back when it never wrote it.
        Ok(Err(error)) if error.message().is_some() => Err(Failed::Unsent(error.into_error())),
        Ok(Err(error)) => Err(Failed::Broken(error.into_error())),
        Err(_) => Err(Failed::ResponseTimeout),
    }
}

/// The client's response: the backend's head without hop-by-hop headers, its body passed on.
fn pass(
    response: Response<Incoming>,
    upstream: Upstream,
    lease: Lease,
    pool: &Arc<Pool>,
) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let body = Passed {
        reusable: body.size_hint().exact().is_some(),
        body,
        ended: false,
        held: Some((upstream, lease)),
        pool: Arc::clone(pool),
    };
    Response::from_parts(parts, Either::Right(body))
}

/// Headers of one hop (RFC 9110 7.6.1), and those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// Append the client to `X-Forwarded-For`.
fn forwarded_for(headers: &mut HeaderMap, peer: Ipv4Addr) {
    let name = HeaderName::from_static("x-forwarded-for");
    let value = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {peer}"),
        None => peer.to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(name, value);
    }
}

/// An HTTP/1.1 connection to a backend; dropping it closes the connection.
pub struct Upstream {
    address: SocketAddrV4,
    sender: SendRequest<Full<Bytes>>,
    connection: AbortHandle,
}

impl Upstream {
    /// `timeout` bounds the connect: a backend that does not answer SYNs is unreachable.
    async fn connect(address: SocketAddrV4, timeout: Duration) -> Result<Upstream, Failed> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(address))
            .await
            .map_err(|_| Failed::Connect(format!("no connection within {timeout:?}")))?
            .map_err(|error| Failed::Connect(error.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|error| Failed::Connect(error.to_string()))?;
        let connection = tokio::spawn(
            async move {
                if let Err(error) = connection.await {
                    debug!(%error, "backend connection ended");
                }
            }
            .in_current_span(),
        )
        .abort_handle();
        Ok(Upstream {
            address,
            sender,
            connection,
        })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// Idle keep-alive connections per backend address.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<SocketAddrV4, Vec<Upstream>>>,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddrV4, Vec<Upstream>>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The newest idle connection to `address` that is still open and ready.
    async fn take(&self, address: SocketAddrV4) -> Option<Upstream> {
        loop {
            let mut upstream = self.lock().get_mut(&address)?.pop()?;
            // Ready at once when idle; an error when the backend closed it.
            if upstream.sender.ready().await.is_ok() {
                return Some(upstream);
            }
        }
    }

    fn put(&self, upstream: Upstream) {
        if !upstream.sender.is_closed() {
            self.lock()
                .entry(upstream.address)
                .or_default()
                .push(upstream);
        }
    }
}

/// A backend's response body on its way to the client, holding the backend's claim and
/// connection: at its end both are given back, dropped before (the client went away) the
/// connection is closed.
pub struct Passed {
    body: Incoming,
    /// The answer declared its length. One that did not (chunked: a streamed chat completion)
    /// does not go back to the pool: llama-server closes the connection after it, and a request
    /// sent there in the moment before that FIN arrives would be lost, where a POST may not be
    /// sent again.
    reusable: bool,
    /// The body's end was read (`is_end_stream` stays false after a chunked body's end).
    ended: bool,
    held: Option<(Upstream, Lease)>,
    pool: Arc<Pool>,
}

impl Passed {
    fn finish(&mut self) {
        if let Some((upstream, lease)) = self.held.take() {
            // An empty body may never be polled.
            if self.reusable && (self.ended || self.body.is_end_stream()) {
                self.pool.put(upstream);
            }
            drop(lease);
        }
    }
}

impl Drop for Passed {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Body for Passed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) {
            self.ended = frame.is_none();
            self.finish();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::conns::ConnCounts;
    use crate::proxy::gate::tests::{config, routes_to};
    use crate::spec::ProxyMode;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A response's whole body (reading it to the end releases the claim and pools the
    /// connection).
    async fn read_body(response: Response<ProxyBody>) -> Bytes {
        response
            .into_body()
            .collect()
            .await
            .expect("the body")
            .to_bytes()
    }

    /// A backend on loopback whose every answer is a chunked body: `frames` frames, then the
    /// end, or with `frames` 0 a body that never ends. Counts the connections it accepted and
    /// the ones that were closed.
    async fn chunked_backend(frames: usize) -> (SocketAddrV4, Arc<(AtomicUsize, AtomicUsize)>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let Ok(std::net::SocketAddr::V4(address)) = listener.local_addr() else {
            unreachable!("bound to IPv4")
        };
        let seen = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
        let counts = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counts.0.fetch_add(1, Ordering::SeqCst);
                let counts = Arc::clone(&counts);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_request| async move {
                        let (tx, rx) = tokio::sync::mpsc::channel(4);
                        tokio::spawn(async move {
                            for _ in 0..frames {
                                let _ = tx.send(Bytes::from("data: x\n\n")).await;
                            }
                            if frames == 0 {
                                // Never ends: the sender lives as long as the body is read.
                                tx.closed().await;
                            }
                        });
                        Ok::<_, Infallible>(Response::new(Frames(rx)))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    counts.1.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (address, seen)
    }

    /// A body of unknown length (sent chunked): each message a data frame, then the end.
    struct Frames(tokio::sync::mpsc::Receiver<Bytes>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    /// A gate over `backend`, its counts, and the routes' sender (the table, kept alive).
    fn http_gate(
        backend: SocketAddrV4,
    ) -> (
        Arc<Gate>,
        Arc<ConnCounts>,
        tokio::sync::watch::Sender<crate::table::Routes>,
    ) {
        let counts = Arc::new(ConnCounts::anonymous(64).expect("anonymous counters"));
        let (table, routes) = tokio::sync::watch::channel(routes_to(&[backend]));
        let mut config = config(8, 1);
        config.proxy.mode = ProxyMode::Http;
        let gate = Gate::new(&config, 0, Arc::clone(&counts), routes);
        (gate, counts, table)
    }

    fn get() -> Request<Full<Bytes>> {
        Request::get("/v1/chat/completions")
            .body(Full::new(Bytes::new()))
            .expect("a request")
    }

    #[tokio::test]
    async fn a_chunked_answer_read_to_the_end_frees_the_claim_and_its_connection() {
        let (backend, seen) = chunked_backend(3).await;
        let (gate, counts, _table) = http_gate(backend);
        let pool = Arc::new(Pool::default());
        for _ in 0..2 {
            let response = handle(&gate, &pool, Ipv4Addr::LOCALHOST, get()).await;
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(counts.get(0), 1, "claimed while the body is passed");
            assert_eq!(read_body(response).await, "data: x\n\n".repeat(3));
            assert_eq!(counts.get(0), 0, "released at the body's end");
        }
        // Not pooled: llama-server closes after a streamed answer (a declared length is; see
        // a_reused_connection_lost_after_sending_repeats_only_idempotent_requests).
        assert_eq!(
            seen.0.load(Ordering::SeqCst),
            2,
            "a connection per chunked answer"
        );
    }

    #[tokio::test]
    async fn a_client_that_goes_away_frees_the_claim_and_closes_the_backend_connection() {
        let (backend, seen) = chunked_backend(0).await;
        let (gate, counts, _table) = http_gate(backend);
        let pool = Arc::new(Pool::default());
        let response = handle(&gate, &pool, Ipv4Addr::LOCALHOST, get()).await;
        assert_eq!(response.status(), StatusCode::OK);
        drop(response);
        assert_eq!(counts.get(0), 0, "released");
        let closed = async {
            while seen.1.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .expect("the backend saw its connection closed");
    }

    /// A backend that answers the first request of each connection (keep-alive) and reads the
    /// second, then closes without answering. Returns the request lines it read.
    async fn second_request_dropping_backend() -> (SocketAddrV4, Arc<Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let Ok(std::net::SocketAddr::V4(address)) = listener.local_addr() else {
            unreachable!("bound to IPv4")
        };
        let seen = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let lines = Arc::clone(&lines);
                tokio::spawn(async move {
                    for answer in [true, false] {
                        // A whole bodyless request arrives in one read on loopback.
                        let mut request = [0u8; 4096];
                        let Ok(n @ 1..) = stream.read(&mut request).await else {
                            return;
                        };
                        let text = String::from_utf8_lossy(&request[..n]);
                        let line = text.lines().next().unwrap_or_default().to_owned();
                        lines
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(line);
                        if answer {
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            let _ = stream.write_all(ok).await;
                        }
                    }
                });
            }
        });
        (address, seen)
    }

    #[tokio::test]
    async fn a_reused_connection_lost_after_sending_repeats_only_idempotent_requests() {
        let (backend, seen) = second_request_dropping_backend().await;
        let (gate, _counts, _table) = http_gate(backend);
        let pool = Arc::new(Pool::default());
        // Read to the end, so the connection goes back to the pool.
        let status = async |response: Response<ProxyBody>| {
            let status = response.status();
            read_body(response).await;
            status
        };
        let post = || {
            Request::post("/v1/chat/completions")
                .body(Full::new(Bytes::new()))
                .expect("a request")
        };
        assert_eq!(
            status(handle(&gate, &pool, Ipv4Addr::LOCALHOST, get()).await).await,
            200
        );
        // Read by the backend on the pooled connection, then lost: a POST is not sent twice.
        let lost = handle(&gate, &pool, Ipv4Addr::LOCALHOST, post()).await;
        assert_eq!(lost.status(), StatusCode::BAD_GATEWAY);
        let body = read_body(lost).await;
        assert!(
            String::from_utf8_lossy(&body).contains("bad_gateway"),
            "{body:?}"
        );
        assert_eq!(
            status(handle(&gate, &pool, Ipv4Addr::LOCALHOST, get()).await).await,
            200
        );
        // The same loss for a GET: sent again on a new connection, and answered.
        assert_eq!(
            status(handle(&gate, &pool, Ipv4Addr::LOCALHOST, get()).await).await,
            200
        );
        let lines = seen.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let get_line = "GET /v1/chat/completions HTTP/1.1";
        let post_line = "POST /v1/chat/completions HTTP/1.1";
        assert_eq!(
            lines,
            [get_line, post_line, get_line, get_line, get_line],
            "the POST once, the lost GET twice"
        );
    }

    /// A client that never finishes its request head is closed by hyper's header read timeout.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_finishes_its_head_is_closed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (backend, _seen) = chunked_backend(1).await;
        let (gate, _counts, _table) = http_gate(backend);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let front = listener.local_addr().expect("address");
        let mut client = TcpStream::connect(front).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let started = tokio::time::Instant::now();
        let registered = crate::limits::Connections::new(1).register().expect("room");
        let served = tokio::spawn(serve_connection(
            Arc::clone(&gate),
            Arc::new(Pool::default()),
            accepted,
            Ipv4Addr::LOCALHOST,
            registered,
            watch::channel(false).1,
        ));
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("half a head");
        served.await.expect("the connection task");
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest).await;
        assert!(!String::from_utf8_lossy(&rest).contains("200"), "no answer");
        assert_eq!(gate.stats().refused["client_timeout"], 1);
    }

    /// At `max_client_connections` a new client takes the place of the one quiet the longest;
    /// with every connection busy (streaming) it is closed at once and counted.
    #[tokio::test]
    async fn at_the_connection_cap_idle_clients_give_way_and_busy_ones_do_not() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (backend, _seen) = chunked_backend(0).await;
        let (table, routes) = tokio::sync::watch::channel(routes_to(&[backend]));
        let mut config = config(8, 0);
        config.proxy.mode = ProxyMode::Http;
        config.proxy.max_client_connections = 2;
        let counts = Arc::new(ConnCounts::anonymous(64).expect("anonymous counters"));
        let gate = Gate::new(&config, 0, counts, routes);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let front = listener.local_addr().expect("address");
        let proxy = tokio::spawn(crate::proxy::serve(
            Arc::clone(&gate),
            listener,
            watch::channel(false).1,
        ));
        let connected = async |n: u64| {
            let stream = TcpStream::connect(front).await.expect("connect");
            while gate.stats().accepted < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            stream
        };
        let mut idle = connected(1).await;
        let _idle_too = connected(2).await;
        let request = b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut streaming = Vec::new();
        for n in 3..=4 {
            let mut client = connected(n).await;
            client.write_all(request).await.expect("send");
            let mut head = [0u8; 12];
            client.read_exact(&mut head).await.expect("an answer");
            assert_eq!(&head, b"HTTP/1.1 200", "served in place of an idle one");
            streaming.push(client);
        }
        let mut rest = Vec::new();
        assert_eq!(idle.read_to_end(&mut rest).await.expect("EOF"), 0);
        let mut refused = connected(5).await;
        assert_eq!(
            refused.read_to_end(&mut rest).await.expect("EOF"),
            0,
            "closed at once"
        );
        let stats = gate.stats();
        assert_eq!(
            (
                stats.evicted,
                stats.refused["connection_limit"],
                stats.open_connections
            ),
            (2, 1, 2)
        );
        proxy.abort();
        drop(table);
    }

    /// A request body that fails after `sent` bytes: a client gone mid-upload.
    struct CutOff(Option<Bytes>);

    impl Body for CutOff {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            Poll::Ready(Some(match self.0.take() {
                Some(sent) => Ok(Frame::data(sent)),
                None => Err(std::io::ErrorKind::ConnectionReset.into()),
            }))
        }
    }

    #[tokio::test]
    async fn bodies_too_large_or_cut_off_are_refused_before_a_backend_is_chosen() {
        let (backend, seen) = chunked_backend(1).await;
        let (gate, _counts, _table) = http_gate(backend);
        let pool = Arc::new(Pool::default());
        let max = gate.config().max_request_body;
        let large = Request::post("/v1/chat/completions")
            .body(Full::new(Bytes::from(vec![b'x'; max + 1])))
            .expect("a request");
        let response = handle(&gate, &pool, Ipv4Addr::LOCALHOST, large).await;
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let body = read_body(response).await;
        let error: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(error["error"]["type"], "body_too_large");
        assert!(
            error["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(&format!("max_request_body {max}"))),
            "{error}"
        );
        let cut = Request::post("/v1/chat/completions")
            .body(CutOff(Some(Bytes::from("{\"messages\""))))
            .expect("a request");
        let response = handle(&gate, &pool, Ipv4Addr::LOCALHOST, cut).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let stats = gate.stats();
        assert_eq!(
            (
                stats.refused["body_too_large"],
                stats.refused["bad_request"]
            ),
            (1, 1)
        );
        assert_eq!(stats.admitted, 0, "no backend claimed");
        assert_eq!(seen.0.load(Ordering::SeqCst), 0, "no backend connection");
    }

    /// A body whose bytes stop coming after the head: 408 after `client_body_timeout`, and no
    /// backend is claimed.
    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_arrives_is_refused_after_the_body_timeout() {
        let (backend, seen) = chunked_backend(1).await;
        let (gate, _counts, _table) = http_gate(backend);
        let pool = Arc::new(Pool::default());
        let request = Request::post("/v1/chat/completions")
            .body(crate::limits::tests::Never)
            .expect("a request");
        let started = tokio::time::Instant::now();
        let response = handle(&gate, &pool, Ipv4Addr::LOCALHOST, request).await;
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(started.elapsed(), gate.config().client_body_timeout);
        assert_eq!(gate.stats().refused["body_timeout"], 1);
        assert_eq!(seen.0.load(Ordering::SeqCst), 0, "no backend connection");
    }

    #[test]
    fn hop_by_hop_headers_go_and_the_client_is_appended() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("host", "chat.example"),
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("content-type", "application/json"),
            ("x-forwarded-for", "10.1.1.1"),
        ] {
            headers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        strip_hop_by_hop(&mut headers);
        forwarded_for(&mut headers, Ipv4Addr::new(10, 9, 9, 9));
        let mut left: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap_or("?")))
            .collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [
                ("content-type", "application/json"),
                ("host", "chat.example"),
                ("x-forwarded-for", "10.1.1.1, 10.9.9.9"),
            ]
        );
    }
}
