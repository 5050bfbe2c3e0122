//! `mode = "http"`: an HTTP/1.1 reverse proxy that admits every request on its own through the
//! [`Gate`] of one of the service's pools (policy, shared counts, FIFO queue), so one keep-alive
//! client connection is balanced request by request.
//!
//! With `[[service.pool]]`, a request to one of [`MODEL_PATHS`] goes to the pool its JSON body's
//! `model` names (model or alias; forwarded as it is), or without `model` to the default pool,
//! as does any other request; `GET /v1/models` is answered here, from the pools.
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
use super::gate::{Ask, Gate, Lease, Refusal};
use super::service::ServiceProxy;
use super::timings::Tail;
use crate::affinity;
use crate::limits::{self, Closed, Ended, Registered};
use crate::requests::{Class, InFlight};

/// What the client gets: an error of the proxy's own, or the backend's body passed on.
type ProxyBody = Either<Full<Bytes>, Passed>;

/// Serve one client connection (keep-alive) until the client closes it or its limits do
/// ([`crate::limits`]: `client_header_timeout`, `client_idle_timeout`, eviction at
/// `max_client_connections`).
pub async fn serve_connection(
    service: Arc<ServiceProxy>,
    pool: Arc<Pool>,
    client: TcpStream,
    peer: Ipv4Addr,
    registered: Registered,
    mut draining: watch::Receiver<bool>,
) {
    let timeouts = service.config().client_timeouts();
    let serve = hyper::service::service_fn({
        let service = Arc::clone(&service);
        move |request| {
            let (service, pool) = (Arc::clone(&service), Arc::clone(&pool));
            async move { Ok::<_, Infallible>(handle(&service, &pool, peer, request).await) }
        }
    });
    // Draining: the request in flight (and its streamed answer) finishes; then it closes.
    let stop = drain_started(&mut draining);
    match limits::serve_http1(client, registered, timeouts, serve, stop).await {
        Ended::Done | Ended::Closed(Closed::Idle | Closed::Evicted) => {}
        Ended::Closed(Closed::Header) => service.count(Refusal::ClientTimeout),
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

/// The POST paths whose JSON body names the `model`: OpenAI's, llama.cpp's own (with its
/// legacy spellings) and Anthropic's.
pub const MODEL_PATHS: [&str; 15] = [
    "/v1/chat/completions",
    "/chat/completions",
    "/v1/completions",
    "/completions",
    "/completion",
    "/v1/embeddings",
    "/embeddings",
    "/embedding",
    "/v1/rerank",
    "/rerank",
    "/v1/reranking",
    "/reranking",
    "/infill",
    "/v1/messages",
    "/v1/messages/count_tokens",
];

async fn handle<B: ClientBody>(
    service: &ServiceProxy,
    pool: &Arc<Pool>,
    peer: Ipv4Addr,
    request: Request<B>,
) -> Response<ProxyBody> {
    let refused = |error: Refused| {
        debug!(refusal = ?error.refusal, message = %error.message, "request refused");
        error.response()
    };
    let lists_models = request.method() == hyper::Method::GET
        && matches!(request.uri().path(), "/v1/models" | "/models");
    if service.routes_by_model() && lists_models {
        return model_list(service);
    }
    let (outgoing, model) = match read(service, peer, request).await {
        Ok(read) => read,
        Err(error) => {
            service.count(error.refusal);
            return refused(error);
        }
    };
    let Ok(gate) = service.pool(model.as_deref()) else {
        let model = model.unwrap_or_default();
        let models: Vec<&str> = service.models().collect();
        let error = Refused::new(
            Refusal::UnknownModel,
            format!(
                "model `{model}` not found; models here: {}",
                models.join(", ")
            ),
        );
        service.count(error.refusal);
        return refused(error);
    };
    match forward(gate, pool, peer, &outgoing).await {
        Ok(response) => response,
        Err(error) => {
            gate.count(error.refusal);
            refused(error)
        }
    }
}

/// `GET /v1/models` of a service with pools: OpenAI's list, of the pools with a backend that
/// takes requests now; aliases under each.
fn model_list(service: &ServiceProxy) -> Response<ProxyBody> {
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let data: Vec<serde_json::Value> = service
        .available()
        .map(|pool| {
            serde_json::json!({
                "id": pool.model,
                "object": "model",
                "created": created,
                "owned_by": "steer",
                "aliases": pool.aliases,
            })
        })
        .collect();
    let body = serde_json::json!({"object": "list", "data": data});
    json_response(StatusCode::OK, &body)
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(body.to_string()))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A refused request: its status, reason and a message naming the limit.
struct Refused {
    refusal: Refusal,
    message: String,
    /// With a full queue: when to try again.
    retry_after: Option<Duration>,
}

impl Refused {
    fn new(refusal: Refusal, message: String) -> Refused {
        Refused {
            refusal,
            message,
            retry_after: None,
        }
    }

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
            Refusal::BadRequest | Refusal::InvalidBody => StatusCode::BAD_REQUEST,
            Refusal::UnknownModel => StatusCode::NOT_FOUND,
            // The last two close the connection instead of answering.
            Refusal::BodyTimeout | Refusal::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
            Refusal::ConnectionLimit => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// llama.cpp's error shape (its clients display it); for a request the client must change
    /// (the model, the body), OpenAI's, with the reason as its `code`.
    fn response(&self) -> Response<ProxyBody> {
        let status = self.status();
        let (code, kind) = match self.refusal {
            Refusal::UnknownModel | Refusal::InvalidBody => (
                serde_json::json!(self.refusal.name()),
                "invalid_request_error",
            ),
            refusal => (serde_json::json!(status.as_u16()), refusal.name()),
        };
        let body = serde_json::json!({
            "error": {"code": code, "type": kind, "message": self.message}
        });
        let mut response = json_response(status, &body);
        if let Some(after) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(after.as_secs()));
        }
        response
    }
}

/// The request as it will be sent (its body read whole), and the `model` it names when the
/// service routes by model and its path is one of [`MODEL_PATHS`].
async fn read<B: ClientBody>(
    service: &ServiceProxy,
    peer: Ipv4Addr,
    request: Request<B>,
) -> Result<(Outgoing, Option<String>), Refused> {
    let config = service.config();
    let name = service.name();
    let (mut parts, body) = request.into_parts();
    let max = config.max_request_body;
    let timeout = config.client_body_timeout;
    let Ok(collected) = tokio::time::timeout(timeout, Limited::new(body, max).collect()).await
    else {
        return Err(Refused::new(
            Refusal::BodyTimeout,
            format!(
                "the request body did not arrive within client_body_timeout {timeout:?} of \
                 service `{name}`"
            ),
        ));
    };
    let body = match collected {
        Ok(body) => body.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            return Err(Refused::new(
                Refusal::BodyTooLarge,
                format!(
                    "the request body of service `{name}` is over max_request_body {max} bytes"
                ),
            ));
        }
        Err(error) => {
            // The client went away mid-body: most likely nobody reads this answer.
            return Err(Refused::new(
                Refusal::BadRequest,
                format!("reading the request body: {error}"),
            ));
        }
    };
    let names_model =
        parts.method == hyper::Method::POST && MODEL_PATHS.contains(&parts.uri.path());
    let model = if service.routes_by_model() && names_model {
        requested_model(&body).map_err(|error| {
            Refused::new(
                Refusal::InvalidBody,
                format!(
                    "the body of POST {} must be a JSON object with a string `model` (or none, \
                     for the default model): {error}",
                    parts.uri.path()
                ),
            )
        })?
    } else {
        None
    };
    strip_hop_by_hop(&mut parts.headers);
    // The body is here already: a backend asked to wait for it would only add a round trip.
    parts.headers.remove(header::EXPECT);
    forwarded_for(&mut parts.headers, peer);
    // The backend gets origin form; Host stays as the client sent it.
    if let Some(path) = parts.uri.path_and_query() {
        parts.uri = path.clone().into();
    }
    Ok((Outgoing { parts, body }, model))
}

/// The `model` of a JSON object body (`null` or none: `None`), read without building the rest;
/// otherwise why not.
fn requested_model(body: &[u8]) -> Result<Option<String>, String> {
    #[derive(serde::Deserialize)]
    struct Named {
        #[serde(default)]
        model: Option<String>,
    }
    let named = serde_json::from_slice::<Named>(body).map_err(|error| error.to_string())?;
    if !is_json_object(body) {
        return Err("not an object".to_owned());
    }
    Ok(named.model)
}

/// Whether `body` starts as a JSON object: serde takes a JSON array for a struct too (its
/// fields in order), which a body naming its fields must not be.
fn is_json_object(body: &[u8]) -> bool {
    body.trim_ascii_start().first() == Some(&b'{')
}

/// The tokens a JSON body asks to generate at most: OpenAI's `max_completion_tokens` or
/// `max_tokens` (Anthropic's too), llama.cpp's `n_predict`; `None` for a body that is not such
/// an object, or a limit that is none (llama.cpp's -1).
fn requested_tokens(body: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Limits {
        max_completion_tokens: Option<i64>,
        max_tokens: Option<i64>,
        n_predict: Option<i64>,
    }
    if !is_json_object(body) {
        return None;
    }
    let limits = serde_json::from_slice::<Limits>(body).ok()?;
    [
        limits.max_completion_tokens,
        limits.max_tokens,
        limits.n_predict,
    ]
    .into_iter()
    .flatten()
    .find_map(|n| u64::try_from(n).ok().filter(|&n| n > 0))
}

/// Send `outgoing` to a backend of `gate`'s pool, waiting for room in its queue.
async fn forward(
    gate: &Arc<Gate>,
    pool: &Arc<Pool>,
    peer: Ipv4Addr,
    outgoing: &Outgoing,
) -> Result<Response<ProxyBody>, Refused> {
    let config = gate.config();
    let service = match gate.model() {
        Some(model) => format!("service `{}` (model `{model}`)", gate.service()),
        None => format!("service `{}`", gate.service()),
    };
    let refused = |refusal, message: String| Refused {
        refusal,
        message,
        retry_after: (refusal == Refusal::QueueFull).then(|| gate.retry_after()),
    };
    // Only a `cache_affinity` pool keys its requests (session header, API key, prompt), and
    // only the speed-aware policies time them.
    let timed = gate.times_requests();
    let ask = Ask {
        affinity: gate.affinity().map(|spec| {
            let header = |name: &str| outgoing.parts.headers.get(name).map(HeaderValue::as_bytes);
            affinity::key(spec, header, &outgoing.body, peer)
        }),
        tokens: timed.then(|| requested_tokens(&outgoing.body)).flatten(),
        // About four bytes of a JSON body a token (markup included: rather more than fewer).
        prompt_tokens: if timed {
            outgoing.body.len() as u64 / 4
        } else {
            0
        },
    };
    let mut avoid = None;
    let mut unreachable = Vec::new();
    // One retry on another backend when the chosen one cannot be reached.
    for _ in 0..2 {
        let lease = gate.admit(peer, ask, avoid).await.map_err(|refusal| {
            let message = match refusal {
                Refusal::QueueFull => format!(
                    "the queue of {service} is full (queue_size {})",
                    config.queue_size
                ),
                _ => format!(
                    "no backend of {service} had room within queue_timeout {:?}",
                    config.queue_timeout
                ),
            };
            refused(refusal, message)
        })?;
        let address = lease.address;
        let in_flight = gate.requests().begin(lease.id);
        let span = debug_span!("request", backend = %address, id = lease.id);
        let exchanged = exchange(pool, address, outgoing, config.response_timeout)
            .instrument(span)
            .await;
        in_flight.answered(match &exchanged {
            Ok((response, _)) => Class::of_status(response.status().as_u16()),
            Err(Failed::Connect(_)) => Class::Unreachable,
            Err(Failed::Unsent(_) | Failed::Broken(_) | Failed::ResponseTimeout) => Class::Failed,
        });
        match exchanged {
            Ok((response, upstream)) => {
                return Ok(pass(response, upstream, lease, in_flight, pool));
            }
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
                        "backend {address} of {service} sent no response within \
                         response_timeout {:?}",
                        config.response_timeout
                    ),
                ));
            }
            Err(Failed::Broken(error) | Failed::Unsent(error)) => {
                return Err(refused(
                    Refusal::BadGateway,
                    format!("backend {address} of {service} failed: {error}"),
                ));
            }
        }
    }
    Err(refused(
        Refusal::Connect,
        format!(
            "no backend of {service} could be reached ({})",
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

/// The client's response: the backend's head without hop-by-hop headers, its body passed on
/// (a success's end kept to learn the backend's speed from).
fn pass(
    response: Response<Incoming>,
    upstream: Upstream,
    lease: Lease,
    in_flight: InFlight,
    pool: &Arc<Pool>,
) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let body = Passed {
        reusable: body.size_hint().exact().is_some(),
        body,
        ended: false,
        tail: parts.status.is_success().then(Tail::default),
        held: Some((upstream, lease, in_flight)),
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
    /// A success's last bytes, for llama-server's `timings`.
    tail: Option<Tail>,
    held: Option<(Upstream, Lease, InFlight)>,
    pool: Arc<Pool>,
}

impl Passed {
    fn finish(&mut self) {
        if let Some((upstream, lease, in_flight)) = self.held.take() {
            // An empty body may never be polled.
            let ended = self.ended || self.body.is_end_stream();
            if self.reusable && ended {
                self.pool.put(upstream);
            }
            // Learnt before the claim is given back: the next choice weighs by it.
            if let Some(measured) = self
                .tail
                .as_mut()
                .filter(|_| ended)
                .and_then(Tail::measured)
            {
                in_flight.measured(measured.model.as_deref(), &measured.timings);
            }
            drop((lease, in_flight));
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
        if let (Some(tail), Some(data)) = (
            &mut self.tail,
            frame.as_ref().and_then(|f| f.as_ref().ok()?.data_ref()),
        ) {
            tail.push(data);
        }
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
    use crate::requests::RequestCounts;
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

    /// A service over `backend`, its counts, and the routes' sender (the table, kept alive).
    fn http_service(
        backend: SocketAddrV4,
    ) -> (
        Arc<ServiceProxy>,
        Arc<ConnCounts>,
        tokio::sync::watch::Sender<crate::table::Routes>,
    ) {
        let counts = Arc::new(ConnCounts::anonymous(64).expect("anonymous counters"));
        let (table, routes) = tokio::sync::watch::channel(routes_to(&[backend]));
        let mut config = config(8, 1);
        config.proxy.mode = ProxyMode::Http;
        let requests = Arc::new(RequestCounts::new(64));
        let service = ServiceProxy::new(&config, 0, &counts, requests, &routes);
        (service, counts, table)
    }

    fn get() -> Request<Full<Bytes>> {
        Request::get("/v1/chat/completions")
            .body(Full::new(Bytes::new()))
            .expect("a request")
    }

    /// A backend on loopback answering every request with `status` and `body` in chunks of
    /// 100 bytes.
    async fn answering_backend(status: StatusCode, body: &'static [u8]) -> SocketAddrV4 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let Ok(std::net::SocketAddr::V4(address)) = listener.local_addr() else {
            unreachable!("bound to IPv4")
        };
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper::service::service_fn(move |_request| async move {
                    let (tx, rx) = tokio::sync::mpsc::channel(body.len() / 100 + 1);
                    for chunk in body.chunks(100) {
                        let _ = tx.try_send(Bytes::from_static(chunk));
                    }
                    let mut response = Response::new(Frames(rx));
                    *response.status_mut() = status;
                    Ok::<_, Infallible>(response)
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        address
    }

    #[tokio::test]
    async fn answers_are_counted_by_class_and_a_streams_timings_are_learnt() {
        const STREAM: &[u8] = include_bytes!("../../fixtures/llama-server/chat_stream.sse");
        const ERROR: &[u8] = include_bytes!("../../fixtures/llama-server/chat_error.json");
        let pool = Arc::new(Pool::default());
        let (service, _counts, _table) =
            http_service(answering_backend(StatusCode::OK, STREAM).await);
        let response = handle(&service, &pool, Ipv4Addr::LOCALHOST, get()).await;
        assert_eq!(
            service.default_gate().requests().get(0).requests.in_flight,
            1,
            "while passed"
        );
        assert_eq!(read_body(response).await, STREAM, "passed unchanged");
        let got = service.default_gate().requests().get(0);
        assert_eq!(got.requests.in_flight, 0);
        assert_eq!(got.requests.by_class["2xx"], 1);
        assert_eq!((got.tokens.prompt, got.tokens.generated), (1, 12));
        assert_eq!(
            got.speed.backend.decode_tokens_per_second,
            Some(54.37576620397833)
        );
        assert!(got.speed.models.contains_key("smol"), "{got:?}");

        let (service, _counts, _table) =
            http_service(answering_backend(StatusCode::BAD_REQUEST, ERROR).await);
        read_body(handle(&service, &pool, Ipv4Addr::LOCALHOST, get()).await).await;
        let got = service.default_gate().requests().get(0);
        assert_eq!(got.requests.by_class["4xx"], 1);
        assert_eq!(got.speed.backend.decode_tokens_per_second, None);

        // Nothing listens there: unreachable, and no other backend to retry on.
        let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let std::net::SocketAddr::V4(nowhere) = nowhere else {
            unreachable!("bound to IPv4")
        };
        let (service, _counts, _table) = http_service(nowhere);
        let response = handle(&service, &pool, Ipv4Addr::LOCALHOST, get()).await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            service.default_gate().requests().get(0).requests.by_class["unreachable"],
            1
        );
    }

    #[tokio::test]
    async fn a_chunked_answer_read_to_the_end_frees_the_claim_and_its_connection() {
        let (backend, seen) = chunked_backend(3).await;
        let (service, counts, _table) = http_service(backend);
        let pool = Arc::new(Pool::default());
        for _ in 0..2 {
            let response = handle(&service, &pool, Ipv4Addr::LOCALHOST, get()).await;
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
        let (service, counts, _table) = http_service(backend);
        let pool = Arc::new(Pool::default());
        let response = handle(&service, &pool, Ipv4Addr::LOCALHOST, get()).await;
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
        let (service, _counts, _table) = http_service(backend);
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
            status(handle(&service, &pool, Ipv4Addr::LOCALHOST, get()).await).await,
            200
        );
        // Read by the backend on the pooled connection, then lost: a POST is not sent twice.
        let lost = handle(&service, &pool, Ipv4Addr::LOCALHOST, post()).await;
        assert_eq!(lost.status(), StatusCode::BAD_GATEWAY);
        let body = read_body(lost).await;
        assert!(
            String::from_utf8_lossy(&body).contains("bad_gateway"),
            "{body:?}"
        );
        assert_eq!(
            status(handle(&service, &pool, Ipv4Addr::LOCALHOST, get()).await).await,
            200
        );
        // The same loss for a GET: sent again on a new connection, and answered.
        assert_eq!(
            status(handle(&service, &pool, Ipv4Addr::LOCALHOST, get()).await).await,
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
        let (service, _counts, _table) = http_service(backend);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let front = listener.local_addr().expect("address");
        let mut client = TcpStream::connect(front).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let started = tokio::time::Instant::now();
        let registered = crate::limits::Connections::new(1).register().expect("room");
        let served = tokio::spawn(serve_connection(
            Arc::clone(&service),
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
        assert_eq!(service.stats().refused["client_timeout"], 1);
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
        let requests = Arc::new(RequestCounts::new(64));
        let service = ServiceProxy::new(&config, 0, &counts, requests, &routes);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let front = listener.local_addr().expect("address");
        let proxy = tokio::spawn(crate::proxy::serve(
            Arc::clone(&service),
            listener,
            watch::channel(false).1,
        ));
        let connected = async |n: u64| {
            let stream = TcpStream::connect(front).await.expect("connect");
            while service.stats().accepted < n {
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
        let stats = service.stats();
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
        let (service, _counts, _table) = http_service(backend);
        let pool = Arc::new(Pool::default());
        let max = service.config().max_request_body;
        let large = Request::post("/v1/chat/completions")
            .body(Full::new(Bytes::from(vec![b'x'; max + 1])))
            .expect("a request");
        let response = handle(&service, &pool, Ipv4Addr::LOCALHOST, large).await;
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
        let response = handle(&service, &pool, Ipv4Addr::LOCALHOST, cut).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let stats = service.stats();
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
        let (service, _counts, _table) = http_service(backend);
        let pool = Arc::new(Pool::default());
        let request = Request::post("/v1/chat/completions")
            .body(crate::limits::tests::Never)
            .expect("a request");
        let started = tokio::time::Instant::now();
        let response = handle(&service, &pool, Ipv4Addr::LOCALHOST, request).await;
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(started.elapsed(), service.config().client_body_timeout);
        assert_eq!(service.stats().refused["body_timeout"], 1);
        assert_eq!(seen.0.load(Ordering::SeqCst), 0, "no backend connection");
    }

    #[test]
    fn the_tokens_asked_for_are_read_from_a_json_objects_limits() {
        let tokens = |body: &str| requested_tokens(body.as_bytes());
        assert_eq!(tokens(r#"{"messages":[],"max_tokens":64}"#), Some(64));
        assert_eq!(
            tokens(r#"{"max_completion_tokens":8,"max_tokens":64}"#),
            Some(8),
            "OpenAI's newer name first"
        );
        assert_eq!(tokens(r#"{"prompt":"hi","n_predict":16}"#), Some(16));
        for none in [
            r#"{"prompt":"hi"}"#,
            r#"{"n_predict":-1}"#,
            r#"{"max_tokens":0}"#,
            r#"{"max_tokens":"64"}"#,
            "[64]",
            "not json",
        ] {
            assert_eq!(tokens(none), None, "{none}");
        }
    }

    #[test]
    fn the_model_is_read_from_a_json_object_and_nothing_else() {
        let model = |body: &str| requested_model(body.as_bytes());
        assert_eq!(
            model(r#"{"messages":[{"role":"user","content":"hi"}],"model":"qwen"}"#),
            Ok(Some("qwen".to_owned()))
        );
        assert_eq!(model(r#"{"prompt":"hi"}"#), Ok(None));
        assert_eq!(model(r#"{"model":null}"#), Ok(None));
        assert_eq!(model(r#"{"model":"a\u0062"}"#), Ok(Some("ab".to_owned())));
        for (bad, says) in [
            (
                r#"{"model":3}"#,
                "invalid type: integer `3`, expected a string",
            ),
            (r#"["qwen"]"#, "not an object"),
            ("3", "invalid type: integer"),
            ("model=qwen", "expected value"),
            ("", "EOF while parsing"),
            (r#"{"model":"a","model":"b"}"#, "duplicate field `model`"),
        ] {
            let error = model(bad).expect_err(bad);
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    /// A service with pools `a` (alias `a2`, the default) and `b` over one backend each.
    fn pooled_service(
        a: SocketAddrV4,
        b: SocketAddrV4,
    ) -> (
        Arc<ServiceProxy>,
        tokio::sync::watch::Sender<crate::table::Routes>,
    ) {
        let mut routes = routes_to(&[a, b]);
        let pool = |slot: u32| crate::table::PoolRoute {
            policy: crate::spec::Policy::RoundRobin,
            ring: vec![slot],
            maglev: Vec::new(),
            affinity: None,
            members: 1 << slot,
        };
        Arc::make_mut(&mut routes)[0].pools = vec![pool(0), pool(1)];
        let (table, routes) = tokio::sync::watch::channel(routes);
        let mut config = config(8, 1);
        config.proxy.mode = ProxyMode::Http;
        let spec = |model: &str, aliases: &[&str]| crate::spec::PoolSpec {
            model: model.to_owned(),
            aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
            policy: crate::spec::Policy::RoundRobin,
            max_per_backend: 1,
            queue_size: 8,
            queue_timeout: Duration::from_secs(10),
        };
        config.pools = vec![spec("a", &["a2"]), spec("b", &[])];
        let counts = Arc::new(ConnCounts::anonymous(64).expect("anonymous counters"));
        let requests = Arc::new(RequestCounts::new(64));
        (
            ServiceProxy::new(&config, 0, &counts, requests, &routes),
            table,
        )
    }

    fn post(path: &str, body: &str) -> Request<Full<Bytes>> {
        Request::post(path)
            .body(Full::new(Bytes::from(body.to_owned())))
            .expect("a request")
    }

    #[tokio::test]
    async fn requests_go_to_the_pool_their_model_names_and_bad_ones_are_refused() {
        let (a, seen_a) = chunked_backend(1).await;
        let (b, seen_b) = chunked_backend(1).await;
        let (service, _table) = pooled_service(a, b);
        let pool = Arc::new(Pool::default());
        let send = async |request| {
            let response = handle(&service, &pool, Ipv4Addr::LOCALHOST, request).await;
            let status = response.status();
            (status, read_body(response).await)
        };
        let served = || {
            (
                seen_a.0.load(Ordering::SeqCst),
                seen_b.0.load(Ordering::SeqCst),
            )
        };
        for (request, want) in [
            (post("/v1/chat/completions", r#"{"model":"b"}"#), (0, 1)),
            (
                post("/v1/embeddings", r#"{"model":"a2","input":"x"}"#),
                (1, 1),
            ),
            (post("/v1/messages", r#"{"model":"a"}"#), (2, 1)),
            (post("/infill", r#"{"model":"b"}"#), (2, 2)),
            (post("/v1/completions", r#"{"prompt":"no model"}"#), (3, 2)),
            // Not a path that names a model: the default pool, body unread.
            (post("/tokenize", r#"{"model":"b"}"#), (4, 2)),
            (get(), (5, 2)),
        ] {
            let path = request.uri().path().to_owned();
            let (status, _) = send(request).await;
            assert_eq!((status, served()), (StatusCode::OK, want), "{path}");
        }
        let error =
            |body: &Bytes| -> serde_json::Value { serde_json::from_slice(body).expect("JSON") };
        let (status, body) = send(post("/v1/chat/completions", r#"{"model":"c"}"#)).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(
            error(&body),
            serde_json::json!({"error": {
                "message": "model `c` not found; models here: a, b",
                "type": "invalid_request_error",
                "code": "model_not_found",
            }})
        );
        for bad in [r#"{"model":["a"]}"#, "not json"] {
            let (status, body) = send(post("/v1/rerank", bad)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
            let error = error(&body);
            assert_eq!(error["error"]["code"], "invalid_body", "{error}");
            assert!(
                error["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("the body of POST /v1/rerank must be")),
                "{error}"
            );
        }
        assert_eq!(served(), (5, 2), "no backend saw the refused ones");
        let stats = service.stats();
        assert_eq!(
            (
                stats.refused["model_not_found"],
                stats.refused["invalid_body"]
            ),
            (1, 2)
        );
        assert_eq!(stats.admitted, 7);
        let by_pool: Vec<(Option<&str>, u64)> = stats
            .pools
            .iter()
            .map(|p| (p.model.as_deref(), p.admitted))
            .collect();
        assert_eq!(by_pool, [(Some("a"), 5), (Some("b"), 2)]);
    }

    #[tokio::test]
    async fn the_model_list_is_the_pools_with_an_active_backend() {
        let (a, _) = chunked_backend(1).await;
        let (b, seen_b) = chunked_backend(1).await;
        let (service, table) = pooled_service(a, b);
        let pool = Arc::new(Pool::default());
        let list = async || {
            let request = Request::get("/v1/models")
                .body(Full::new(Bytes::new()))
                .expect("a request");
            let response = handle(&service, &pool, Ipv4Addr::LOCALHOST, request).await;
            assert_eq!(response.status(), StatusCode::OK);
            let list: serde_json::Value =
                serde_json::from_slice(&read_body(response).await).expect("JSON");
            assert_eq!(list["object"], "list");
            list["data"]
                .as_array()
                .expect("data")
                .iter()
                .map(|m| {
                    assert_eq!(
                        (&m["object"], &m["owned_by"]),
                        (&"model".into(), &"steer".into())
                    );
                    (
                        m["id"].as_str().unwrap_or("?").to_owned(),
                        m["aliases"].clone(),
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            list().await,
            [
                ("a".to_owned(), serde_json::json!(["a2"])),
                ("b".to_owned(), serde_json::json!([]))
            ]
        );
        table.send_modify(|routes| {
            Arc::make_mut(routes)[0].backends[1].0.state = lb_common::backend_state::DOWN;
        });
        assert_eq!(list().await, [("a".to_owned(), serde_json::json!(["a2"]))]);
        assert_eq!(seen_b.0.load(Ordering::SeqCst), 0, "answered by the proxy");
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
