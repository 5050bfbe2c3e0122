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
use tokio::time::{Instant, Sleep};
use tracing::{Instrument, debug, debug_span, warn};

use super::access::{Access, Outcome};
use super::drain::drain_started;
use super::gate::{Ask, Gate, Lease, Refusal, Retry};
use super::service::ServiceProxy;
use super::timings::Tail;
use crate::affinity;
use crate::limits::{self, Closed, Ended, Registered};
use crate::probe;
use crate::requests::{Class, InFlight};
use crate::spec::UpstreamTimeouts;

/// What the client gets: an error of the proxy's own, or the backend's body passed on.
type ProxyBody = Either<Full<Bytes>, Passed>;

/// Serve one client connection (keep-alive) until the client closes it or its limits do
/// ([`crate::limits`]: `client_header_timeout`, `client_idle_timeout`, eviction at
/// `max_client_connections`).
pub async fn serve_connection(
    current: watch::Receiver<Arc<ServiceProxy>>,
    pool: Arc<Pool>,
    client: TcpStream,
    peer: Ipv4Addr,
    registered: Registered,
    mut draining: watch::Receiver<bool>,
) {
    let timeouts = current.borrow().config().client_timeouts();
    let serve = hyper::service::service_fn({
        let current = current.clone();
        move |request| {
            // Each request by the service's proxy as it is now (a reload may have replaced it).
            let service = Arc::clone(&current.borrow());
            let pool = Arc::clone(&pool);
            async move { Ok::<_, Infallible>(handle(&service, &pool, peer, request).await) }
        }
    });
    // Draining: the request in flight (and its streamed answer) finishes; then it closes.
    let stop = drain_started(&mut draining);
    match limits::serve_http(client, registered, timeouts, serve, stop).await {
        Ended::Done | Ended::Closed(Closed::Idle | Closed::Evicted) => {}
        Ended::Closed(Closed::Header) => current.borrow().count(Refusal::ClientTimeout),
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
    /// A POST to one of [`MODEL_PATHS`]: a generation (or an embedding, a rerank), which does
    /// nothing at a backend but compute.
    generation: bool,
    /// Its body asks for a streamed answer.
    streamed: bool,
    /// The tokens its body asks to generate at most.
    tokens: Option<u64>,
}

impl Outgoing {
    fn request(&self) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(self.body.clone()));
        *request.method_mut() = self.parts.method.clone();
        *request.uri_mut() = self.parts.uri.clone();
        *request.headers_mut() = self.parts.headers.clone();
        request
    }

    /// Whether it may be sent to another backend after one failed before any byte of an answer
    /// although it may have read it: a generation (run twice, it only costs compute) or an
    /// idempotent method.
    fn repeatable(&self) -> bool {
        self.generation || self.parts.method.is_idempotent()
    }
}

/// The protocol an HTTP/1.1 request asks to switch to, when it is a WebSocket (`Connection:
/// upgrade`, `Upgrade: websocket`). Any other upgrade (curl's `h2c`, say) is declined as RFC 9110
/// allows: its headers are dropped as hop-by-hop and the request is served as it is.
fn upgrade_asked<B>(request: &Request<B>) -> Option<HeaderValue> {
    let headers = request.headers();
    let connection_upgrade =
        connection_tokens(headers).any(|token| token.eq_ignore_ascii_case("upgrade"));
    let http1 = request.version() == hyper::Version::HTTP_11;
    let websocket = headers
        .get(header::UPGRADE)
        .filter(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    websocket.filter(|_| connection_upgrade && http1).cloned()
}

/// The most of a backend's answer that declines an upgrade the proxy reads.
const TUNNEL_REFUSAL: usize = 1 << 20;

/// A request to switch to `protocol` (a WebSocket), sent to a backend of the default pool on a
/// connection of its own; on the backend's 101 the client's and the backend's connections are
/// joined into one tunnel, which holds its claim (a slot, as one long request) until either
/// side closes it. Any other answer is passed on as it is.
async fn tunnel<B: ClientBody>(
    service: &ServiceProxy,
    peer: Ipv4Addr,
    mut request: Request<B>,
    protocol: HeaderValue,
    access: &mut Access,
) -> Result<Response<ProxyBody>, Refused> {
    let client_side = hyper::upgrade::on(&mut request);
    let (mut outgoing, _) = read(service, peer, request).await?;
    let headers = &mut outgoing.parts.headers;
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
    let gate = service.default_gate();
    let lease = gate
        .admit(peer, Ask::default(), &[])
        .await
        .map_err(|refusal| {
            let message = format!(
                "no backend of service `{}` had room for an upgrade ({})",
                gate.service(),
                refusal.name()
            );
            Refused::new(refusal, message)
        })?;
    access.backend = Some(lease.address);
    access.queue_wait = lease.waited;
    let in_flight = gate.requests().begin(lease.id);
    // Before any answer: counted as none.
    let failed = |refusal, error: String| {
        in_flight.answered(match refusal {
            Refusal::Connect => Class::Unreachable,
            _ => Class::Failed,
        });
        let message = format!("backend {}, upgrading: {error}", lease.address);
        Refused::new(refusal, message)
    };
    let mut upstream = Upstream::connect(lease.address, gate.config().upstream.connect)
        .await
        .map_err(|error| failed(Refusal::Connect, error.to_string()))?;
    let first_byte = gate.config().upstream.first_byte;
    let mut response = tokio::time::timeout(first_byte, send(&mut upstream, &outgoing))
        .await
        .map_err(|_| {
            let error = format!("no answer within first_byte_timeout {first_byte:?}");
            failed(Refusal::FirstByteTimeout, error)
        })?
        .map_err(|error| failed(Refusal::BadGateway, error.to_string()))?;
    let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switched {
        in_flight.answered(Class::Success);
    } else {
        in_flight.answered_status(response.status().as_u16());
    }
    access.status = Some(response.status().as_u16());
    if !switched {
        // Refused by the backend: its answer (short: an error), read whole, then the claim goes.
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::CONTENT_LENGTH);
        let read = tokio::time::timeout(first_byte, Limited::new(body, TUNNEL_REFUSAL).collect());
        let Ok(Ok(body)) = read.await else {
            let message = format!(
                "backend {}: its answer to the upgrade did not arrive whole",
                lease.address
            );
            return Err(Refused::new(Refusal::BadGateway, message));
        };
        access.log(Outcome::Done, None);
        let body = Full::new(body.to_bytes());
        return Ok(Response::from_parts(parts, Either::Left(body)));
    }
    let backend_side = hyper::upgrade::on(&mut response);
    // Logged when the tunnel closes.
    let finished = access.clone();
    tokio::spawn(
        async move {
            let joined = match tokio::try_join!(client_side, backend_side) {
                Ok((client, backend)) => {
                    let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
                    tokio::io::copy_bidirectional(&mut client, &mut backend)
                        .await
                        .map(drop)
                        .map_err(|error| error.to_string())
                }
                Err(error) => Err(error.to_string()),
            };
            if let Err(error) = joined {
                debug!(%error, "tunnel ended");
            }
            drop((upstream, lease, in_flight));
            finished.log(Outcome::Done, None);
        }
        .in_current_span(),
    );
    let (parts, _) = response.into_parts();
    Ok(Response::from_parts(
        parts,
        Either::Left(Full::new(Bytes::new())),
    ))
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
    let mut access = Access::begin(
        service.request_metrics(),
        request.method(),
        request.uri().path(),
    );
    let refused = |error: Refused, access: &mut Access| {
        debug!(refusal = ?error.refusal, message = %error.message, "request refused");
        access.status = Some(error.status().as_u16());
        access.log(Outcome::Refused(error.refusal.name()), None);
        error.response()
    };
    if let Some(protocol) = upgrade_asked(&request) {
        return match tunnel(service, peer, request, protocol, &mut access).await {
            Ok(response) => response,
            Err(error) => {
                service.default_gate().count(error.refusal);
                refused(error, &mut access)
            }
        };
    }
    let lists_models = request.method() == hyper::Method::GET
        && matches!(request.uri().path(), "/v1/models" | "/models");
    if service.routes_by_model() && lists_models {
        let list = model_list(service);
        access.status = Some(list.status().as_u16());
        access.log(Outcome::Done, None);
        return list;
    }
    let (outgoing, model) = match read(service, peer, request).await {
        Ok(read) => read,
        Err(error) => {
            service.count(error.refusal);
            return refused(error, &mut access);
        }
    };
    access.streamed = outgoing.streamed;
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
        access.model = Some(model);
        return refused(error, &mut access);
    };
    access.model = model;
    access.pool = gate.model().map(str::to_owned);
    match forward(gate, pool, peer, &outgoing, &mut access).await {
        Ok(answer) => answer.pass(access),
        Err(error) => {
            gate.count(error.refusal);
            refused(error, &mut access)
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
            // An idle timeout cuts a body whose head is out: no status of its own.
            Refusal::FirstByteTimeout | Refusal::TotalTimeout | Refusal::IdleTimeout => {
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

/// The request as it will be sent (its body read whole), and the `model` its body names when
/// its path is one of [`MODEL_PATHS`].
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
    let generation = parts.method == hyper::Method::POST && MODEL_PATHS.contains(&parts.uri.path());
    let asked = if generation {
        Asked::read(&body)
    } else {
        Asked::default()
    };
    // A service without pools routes no request by its model: a bad one is the backend's to
    // judge.
    let model = match asked.model {
        Ok(model) => model,
        Err(error) if service.routes_by_model() => {
            return Err(Refused::new(
                Refusal::InvalidBody,
                format!(
                    "the body of POST {} must be a JSON object with a string `model` (or none, \
                     for the default model): {error}",
                    parts.uri.path()
                ),
            ));
        }
        Err(_) => None,
    };
    // An HTTP/2 client names the host in `:authority` alone; HTTP/1.1 to the backend needs Host.
    if !parts.headers.contains_key(header::HOST)
        && let Some(host) = parts.uri.authority().and_then(|a| a.as_str().parse().ok())
    {
        parts.headers.insert(header::HOST, host);
    }
    strip_hop_by_hop(&mut parts.headers);
    // The body is here already: a backend asked to wait for it would only add a round trip.
    parts.headers.remove(header::EXPECT);
    forwarded_for(&mut parts.headers, peer);
    // The backend gets origin form; Host stays as the client sent it.
    if let Some(path) = parts.uri.path_and_query() {
        parts.uri = path.clone().into();
    }
    let outgoing = Outgoing {
        parts,
        body,
        generation,
        streamed: asked.streamed,
        tokens: asked.tokens,
    };
    Ok((outgoing, model))
}

/// What a generation's JSON body says of itself, read in one pass. A field of another type than
/// expected is as good as absent, but for `model`, which routes the request.
#[derive(Debug, PartialEq)]
struct Asked {
    /// `None` for none or `null`; why not for a body that is not a JSON object or a `model` that
    /// is not a string.
    model: Result<Option<String>, String>,
    /// `"stream": true`.
    streamed: bool,
    /// The tokens to generate at most: OpenAI's `max_completion_tokens` or `max_tokens`
    /// (Anthropic's too), llama.cpp's `n_predict`; `None` for a limit that is none (-1).
    tokens: Option<u64>,
}

impl Default for Asked {
    fn default() -> Self {
        Asked {
            model: Ok(None),
            streamed: false,
            tokens: None,
        }
    }
}

impl Asked {
    fn read(body: &[u8]) -> Asked {
        #[derive(serde::Deserialize)]
        struct Fields {
            model: Option<serde_json::Value>,
            stream: Option<serde_json::Value>,
            max_completion_tokens: Option<serde_json::Value>,
            max_tokens: Option<serde_json::Value>,
            n_predict: Option<serde_json::Value>,
        }
        // serde takes a JSON array for a struct too (its fields in order), which a body naming
        // its fields must not be.
        let fields = if body.trim_ascii_start().first() == Some(&b'{') {
            serde_json::from_slice::<Fields>(body).map_err(|error| error.to_string())
        } else {
            Err(serde_json::from_slice::<serde::de::IgnoredAny>(body)
                .map_or_else(|error| error.to_string(), |_| "not an object".to_owned()))
        };
        let fields = match fields {
            Ok(fields) => fields,
            Err(why) => {
                return Asked {
                    model: Err(why),
                    ..Asked::default()
                };
            }
        };
        let tokens = [
            fields.max_completion_tokens,
            fields.max_tokens,
            fields.n_predict,
        ]
        .into_iter()
        .flatten()
        .find_map(|n| n.as_u64().filter(|&n| n > 0));
        Asked {
            model: fields.model.map_or(Ok(None), |model| {
                serde_json::from_value(model)
                    .map(Some)
                    .map_err(|error| error.to_string())
            }),
            streamed: fields.stream == Some(serde_json::Value::Bool(true)),
            tokens,
        }
    }
}

/// Send `outgoing` to a backend of `gate`'s pool, waiting for room in its queue; on a failure
/// that proves the backend did not answer ([`Failed::retry`]), to another one, up to
/// `max_retries` times within `retry_window`.
async fn forward(
    gate: &Arc<Gate>,
    pool: &Arc<Pool>,
    peer: Ipv4Addr,
    outgoing: &Outgoing,
    access: &mut Access,
) -> Result<Passing, Refused> {
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
        tokens: outgoing.tokens.filter(|_| timed),
        // About four bytes of a JSON body a token (markup included: rather more than fewer).
        prompt_tokens: if timed {
            outgoing.body.len() as u64 / 4
        } else {
            0
        },
    };
    // The backends tried, and why each failed.
    let mut tried: Vec<u32> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut first_sent = None;
    loop {
        let lease = gate.admit(peer, ask, &tried).await.map_err(|refusal| {
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
        let (id, address) = (lease.id, lease.address);
        access.backend = Some(address);
        access.queue_wait += lease.waited;
        let sent = *first_sent.get_or_insert_with(Instant::now);
        let clock = Clock::new(&config.upstream, outgoing, sent);
        let in_flight = gate.requests().begin(lease.id);
        let span = debug_span!("request", backend = %address, id);
        let exchanged = exchange(pool, address, outgoing, &clock)
            .instrument(span)
            .await;
        let loading = exchanged.as_ref().is_ok_and(Answer::is_loading);
        match &exchanged {
            Ok(_) if loading => in_flight.loading(),
            Ok(answer) => in_flight.answered_status(answer.head.status.as_u16()),
            Err(Failed::Connect(_)) => in_flight.answered(Class::Unreachable),
            Err(_) => in_flight.answered(Class::Failed),
        }
        let passing = |answer| Passing {
            answer,
            clock,
            lease,
            in_flight,
            pool: Arc::clone(pool),
        };
        let (why, exchanged) = match exchanged {
            Ok(answer) if !loading => return Ok(passing(answer)),
            Ok(answer) => (Some(Retry::Loading), Ok(answer)),
            Err(failed) => (failed.retry(outgoing), Err(failed)),
        };
        tried.push(id);
        let retry = why.filter(|_| {
            tried.len() <= config.max_retries as usize
                && sent.elapsed() < config.retry_window
                && gate.has_backend_besides(&tried)
        });
        let Some(why) = retry else {
            return match exchanged {
                // Loading, with nowhere else to go: llama.cpp's own answer says so.
                Ok(answer) => Ok(passing(answer)),
                Err(failed) => Err(failed.refused(address, &service, &failures)),
            };
        };
        let failure = exchanged.map_or_else(|failed| failed.to_string(), |_| "loading".into());
        debug!(%address, %failure, reason = why.name(), "sending the request to another backend");
        failures.push(format!("{address}: {failure}"));
        gate.count_retry(why);
        access.retries += 1;
    }
}

/// The deadlines of one try at a backend.
struct Clock {
    connect: Duration,
    /// When the answer's first byte is due, and the key that set it.
    first_byte: Option<(Instant, Duration, &'static str)>,
    idle: Duration,
    /// When the whole exchange, counted from its first try, must be done.
    total: Option<(Instant, Duration)>,
}

impl Clock {
    /// The deadlines of a try sent now, of a request first sent at `first_sent`.
    fn new(timeouts: &UpstreamTimeouts, outgoing: &Outgoing, first_sent: Instant) -> Clock {
        let now = Instant::now();
        // A non-streamed generation's head comes with the whole answer.
        let first_byte = if outgoing.generation && !outgoing.streamed {
            timeouts
                .first_byte_unstreamed
                .map(|t| (now + t, t, "first_byte_timeout_unstreamed"))
        } else {
            let t = timeouts.first_byte;
            Some((now + t, t, "first_byte_timeout"))
        };
        Clock {
            connect: timeouts.connect,
            first_byte,
            idle: timeouts.idle,
            total: timeouts.total.map(|t| (first_sent + t, t)),
        }
    }

    /// The first deadline of the wait for the answer's first byte, and the failure it is.
    fn first_byte_deadline(&self) -> Option<(Instant, Failed)> {
        let first_byte = self
            .first_byte
            .map(|(at, t, key)| (at, Failed::FirstByteTimeout(t, key)));
        let total = self.total.map(|(at, t)| (at, Failed::TotalTimeout(t)));
        match (first_byte, total) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    /// When a body still coming at `now` is cut: after `idle` without a byte, or at the total
    /// deadline.
    fn body_deadline(&self, now: Instant) -> Instant {
        let idle = now + self.idle;
        self.total.map_or(idle, |(at, _)| at.min(idle))
    }

    /// Why a body was cut at `now`.
    fn cut(&self, now: Instant) -> Refusal {
        match self.total {
            Some((at, _)) if now >= at => Refusal::TotalTimeout,
            _ => Refusal::IdleTimeout,
        }
    }
}

/// Why a try at a backend got no answer to pass on.
#[derive(Debug, thiserror::Error)]
enum Failed {
    /// Before anything was sent: another backend may take it.
    #[error("could not be reached: {0}")]
    Connect(String),
    /// The connection ended before the request was written: it may be sent again.
    #[error("closed the connection before taking the request: {0}")]
    Unsent(hyper::Error),
    /// The connection ended after (part of) the request was written, before any byte of an
    /// answer's body: the backend may have acted on it.
    #[error("failed before answering: {0}")]
    Reset(hyper::Error),
    #[error("sent no byte of its answer within {1} {0:?}")]
    FirstByteTimeout(Duration, &'static str),
    #[error("did not finish within total_timeout {0:?}")]
    TotalTimeout(Duration),
}

impl Failed {
    /// Why the request may go to another backend after this, if it may: the backend cannot have
    /// acted on it, or it does nothing there but compute (a generation, an idempotent method).
    fn retry(&self, outgoing: &Outgoing) -> Option<Retry> {
        match self {
            Failed::Connect(_) | Failed::Unsent(_) => Some(Retry::Connect),
            Failed::Reset(_) if outgoing.repeatable() => Some(Retry::Reset),
            Failed::Reset(_) | Failed::FirstByteTimeout(..) | Failed::TotalTimeout(_) => None,
        }
    }

    /// The client's answer to this failure at `address`, after the `earlier` ones.
    fn refused(self, address: SocketAddrV4, service: &str, earlier: &[String]) -> Refused {
        let refusal = match self {
            Failed::Connect(_) | Failed::Unsent(_) => Refusal::Connect,
            Failed::Reset(_) => Refusal::BadGateway,
            Failed::FirstByteTimeout(..) => Refusal::FirstByteTimeout,
            Failed::TotalTimeout(_) => Refusal::TotalTimeout,
        };
        let mut message = format!("backend {address} of {service} {self}");
        if !earlier.is_empty() {
            message += &format!(" (tried before: {})", earlier.join("; "));
        }
        Refused::new(refusal, message)
    }
}

/// A backend's answer: its head and the first piece of its body, on the connection the rest
/// comes on. The head is held until that first piece is here, so that until then nothing has
/// reached the client and the request may still go elsewhere.
struct Answer {
    head: hyper::http::response::Parts,
    body: Incoming,
    /// `None`: the body is empty.
    first: Option<Frame<Bytes>>,
    /// The body declared its length (see [`Passed::reusable`]).
    reusable: bool,
    upstream: Upstream,
}

impl Answer {
    /// llama.cpp's answer while it loads its model.
    fn is_loading(&self) -> bool {
        let start = self.first.as_ref().and_then(Frame::data_ref);
        probe::is_loading(self.head.status.as_u16(), start.map_or(&[], |d| &d[..]))
    }
}

/// Send `outgoing` to `address` on a pooled connection or a new one; the answer, before the
/// first-byte deadline of `clock`.
async fn exchange(
    pool: &Pool,
    address: SocketAddrV4,
    outgoing: &Outgoing,
    clock: &Clock,
) -> Result<Answer, Failed> {
    let answered = async {
        let mut upstream = pool.take(address).await;
        let mut response = None;
        if let Some(pooled) = &mut upstream {
            match send(pooled, outgoing).await {
                Ok(answered) => response = Some(answered),
                // The backend had closed it (llama-server does after a stream): a new one, if
                // the request never left or repeating it is harmless.
                Err(Failed::Unsent(error)) => debug!(%error, "a pooled connection was closed"),
                Err(Failed::Reset(error)) if outgoing.repeatable() => {
                    debug!(%error, "a pooled connection failed");
                }
                Err(other) => return Err(other),
            }
        }
        let response = match response {
            Some(response) => response,
            None => new_exchange(address, outgoing, clock, &mut upstream).await?,
        };
        let Some(upstream) = upstream else {
            unreachable!("a response came on a connection")
        };
        let (head, mut body) = response.into_parts();
        let reusable = body.size_hint().exact().is_some();
        let first = body.frame().await.transpose().map_err(Failed::Reset)?;
        Ok(Answer {
            head,
            body,
            first,
            reusable,
            upstream,
        })
    };
    match clock.first_byte_deadline() {
        Some((at, late)) => tokio::time::timeout_at(at, answered)
            .await
            .unwrap_or(Err(late)),
        None => answered.await,
    }
}

/// `outgoing` on a new connection to `address`, which replaces `upstream`.
async fn new_exchange(
    address: SocketAddrV4,
    outgoing: &Outgoing,
    clock: &Clock,
    upstream: &mut Option<Upstream>,
) -> Result<Response<Incoming>, Failed> {
    let upstream = upstream.insert(Upstream::connect(address, clock.connect).await?);
    send(upstream, outgoing)
        .await
        .map_err(|failed| match failed {
            // Closed before it took anything: as good as refused.
            Failed::Unsent(error) => Failed::Connect(error.to_string()),
            other => other,
        })
}

async fn send(upstream: &mut Upstream, outgoing: &Outgoing) -> Result<Response<Incoming>, Failed> {
    match upstream.sender.try_send_request(outgoing.request()).await {
        Ok(response) => Ok(response),
        // hyper hands the request back when it never wrote it.
        Err(error) if error.message().is_some() => Err(Failed::Unsent(error.into_error())),
        Err(error) => Err(Failed::Reset(error.into_error())),
    }
}

/// An answer to pass on, with the claim, counts and deadlines it is passed under.
struct Passing {
    answer: Answer,
    clock: Clock,
    lease: Lease,
    in_flight: InFlight,
    pool: Arc<Pool>,
}

impl Passing {
    /// The client's response: the backend's head without hop-by-hop headers, its body passed
    /// on under the body's deadlines (a success's end kept to learn the backend's speed from),
    /// logged to `access` at its end.
    fn pass(self, mut access: Access) -> Response<ProxyBody> {
        let Answer {
            mut head,
            body,
            first,
            reusable,
            upstream,
        } = self.answer;
        strip_hop_by_hop(&mut head.headers);
        let timer = Box::pin(tokio::time::sleep_until(
            self.clock.body_deadline(Instant::now()),
        ));
        access.status = Some(head.status.as_u16());
        access.first_byte();
        let body = Passed {
            body,
            ended: first.is_none(),
            first,
            reusable,
            tail: head.status.is_success().then(Tail::default),
            held: Some((upstream, self.lease, self.in_flight)),
            pool: self.pool,
            clock: self.clock,
            timer,
            access,
            outcome: None,
        };
        Response::from_parts(head, Either::Right(body))
    }
}

/// Headers of one hop (RFC 9110 7.6.1), and those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
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

/// The tokens of the `Connection` headers (trimmed).
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
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
            .map_err(|_| {
                Failed::Connect(format!("no connection within connect_timeout {timeout:?}"))
            })?
            .map_err(|error| Failed::Connect(error.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|error| Failed::Connect(error.to_string()))?;
        // Upgradeable: a WebSocket's 101 hands the connection over ([`tunnel`]); any other
        // answer leaves it as it is.
        let connection = tokio::spawn(
            async move {
                if let Err(error) = connection.with_upgrades().await {
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
/// connection: at its end both are given back, dropped before (the client went away, or the
/// body was cut) the connection is closed.
pub struct Passed {
    body: Incoming,
    /// The first piece, read before the head went out ([`Answer`]), until it is passed too.
    first: Option<Frame<Bytes>>,
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
    /// The exchange's deadlines: `idle_timeout` between two pieces, `total_timeout`.
    clock: Clock,
    /// Fires at the body's next deadline; moved on with each piece.
    timer: Pin<Box<Sleep>>,
    access: Access,
    /// How it ended, when not at its end nor by the client leaving.
    outcome: Option<Outcome>,
}

/// Why a body was cut short (the client's connection is closed mid-answer).
#[derive(Debug, thiserror::Error)]
#[error("the backend's answer was cut at {0}")]
struct Cut(&'static str);

impl Passed {
    fn finish(&mut self) {
        if let Some((upstream, lease, in_flight)) = self.held.take() {
            // An empty body may never be polled.
            let ended = self.ended || self.body.is_end_stream();
            if self.reusable && ended {
                self.pool.put(upstream);
            }
            // Learnt before the claim is given back: the next choice weighs by it.
            let measured = self
                .tail
                .as_mut()
                .filter(|_| ended)
                .and_then(Tail::measured);
            if let Some(measured) = &measured {
                in_flight.measured(measured.model.as_deref(), &measured.timings);
            }
            drop((lease, in_flight));
            let outcome = self.outcome.unwrap_or(if ended {
                Outcome::Done
            } else {
                Outcome::ClientGone
            });
            self.access
                .log(outcome, measured.as_ref().map(|m| &m.timings));
        }
    }

    /// Stop passing the body: it stalled for `idle_timeout`, or the exchange ran past
    /// `total_timeout`.
    fn cut(&mut self) -> Cut {
        let refusal = self.clock.cut(Instant::now());
        if let Some((upstream, lease, in_flight)) = &self.held {
            warn!(
                backend = %upstream.address,
                reason = refusal.name(),
                "an answer was cut short"
            );
            lease.count(refusal);
            in_flight.cut();
        }
        self.outcome = Some(Outcome::Cut(refusal.name()));
        self.finish();
        Cut(refusal.name())
    }

    fn note(&mut self, frame: &Frame<Bytes>) {
        if let (Some(tail), Some(data)) = (&mut self.tail, frame.data_ref()) {
            tail.push(data);
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
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(first) = self.first.take() {
            self.note(&first);
            return Poll::Ready(Some(Ok(first)));
        }
        if self.ended {
            self.finish();
            return Poll::Ready(None);
        }
        let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) else {
            ready!(self.timer.as_mut().poll(cx));
            return Poll::Ready(Some(Err(self.cut().into())));
        };
        let next = self.clock.body_deadline(Instant::now());
        self.timer.as_mut().reset(next);
        match &frame {
            Some(Ok(frame)) => self.note(frame),
            end => {
                self.ended = end.is_none();
                if !self.ended {
                    self.outcome = Some(Outcome::BackendFailed);
                    if let Some((_, _, in_flight)) = &self.held {
                        in_flight.cut();
                    }
                }
                self.finish();
            }
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && (self.ended || self.body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.body.size_hint();
        let Some(first) = self.first.as_ref().and_then(Frame::data_ref) else {
            return rest;
        };
        let n = first.len() as u64;
        let mut hint = SizeHint::new();
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + n);
        }
        hint.set_lower(rest.lower() + n);
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::conns::ConnCounts;
    use crate::proxy::RequestMetrics;
    use crate::proxy::gate::tests::{config, routes_to};
    use crate::requests::RequestCounts;
    use crate::spec::{ProxyMode, ProxySpec};
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

    /// A listener on a free loopback port, and its address.
    async fn loopback_listener() -> (tokio::net::TcpListener, SocketAddrV4) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let Ok(std::net::SocketAddr::V4(address)) = listener.local_addr() else {
            unreachable!("bound to IPv4")
        };
        (listener, address)
    }

    /// A backend on loopback whose every answer is a chunked body: `frames` frames, then the
    /// end, or with `frames` 0 one frame and no end. Counts the connections it accepted and
    /// the ones that were closed.
    async fn chunked_backend(frames: usize) -> (SocketAddrV4, Arc<(AtomicUsize, AtomicUsize)>) {
        let (listener, address) = loopback_listener().await;
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
                            for _ in 0..frames.max(1) {
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

    /// The service, its counts, and the routes' sender (the table, kept alive).
    type Served = (
        Arc<ServiceProxy>,
        Arc<ConnCounts>,
        tokio::sync::watch::Sender<crate::table::Routes>,
    );

    /// A service over `backend`, one request at a time each.
    fn http_service(backend: SocketAddrV4) -> Served {
        http_service_over(&[backend], |_| {})
    }

    /// A round-robin service over `backends` with its proxy settings as `set` leaves them.
    fn http_service_over(backends: &[SocketAddrV4], set: impl FnOnce(&mut ProxySpec)) -> Served {
        let counts = Arc::new(ConnCounts::anonymous(64).expect("anonymous counters"));
        let (table, routes) = tokio::sync::watch::channel(routes_to(backends));
        let mut config = config(8, 1);
        config.proxy.mode = ProxyMode::Http;
        set(&mut config.proxy);
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
        let (listener, address) = loopback_listener().await;
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
        let (listener, address) = loopback_listener().await;
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
        let post = |path: &str| {
            Request::post(path)
                .body(Full::new(Bytes::new()))
                .expect("a request")
        };
        assert_eq!(
            status(handle(&service, &pool, Ipv4Addr::LOCALHOST, get()).await).await,
            200
        );
        // Read by the backend on the pooled connection, then lost: a POST that is not a
        // generation is not sent twice.
        let save = "/slots/0?action=save";
        let lost = handle(&service, &pool, Ipv4Addr::LOCALHOST, post(save)).await;
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
        // The same loss for a generation and for a GET: sent again on a new connection, and
        // answered.
        let chat = "/v1/chat/completions";
        assert_eq!(
            status(handle(&service, &pool, Ipv4Addr::LOCALHOST, post(chat)).await).await,
            200
        );
        assert_eq!(
            status(handle(&service, &pool, Ipv4Addr::LOCALHOST, get()).await).await,
            200
        );
        let lines = seen.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let get_line = "GET /v1/chat/completions HTTP/1.1";
        let save_line = "POST /slots/0?action=save HTTP/1.1";
        let chat_line = "POST /v1/chat/completions HTTP/1.1";
        assert_eq!(
            lines,
            [
                get_line, save_line, get_line, chat_line, chat_line, get_line, get_line
            ],
            "the save once, the lost generation and GET twice"
        );
        assert_eq!(
            service.stats().retried.values().sum::<u64>(),
            0,
            "a new connection to the same backend is no retry"
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
            tokio::sync::watch::channel(Arc::clone(&service)).1,
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
            tokio::sync::watch::channel(Arc::clone(&service)).1,
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
        let tokens = |body: &str| Asked::read(body.as_bytes()).tokens;
        assert_eq!(tokens(r#"{"messages":[],"max_tokens":64}"#), Some(64));
        assert_eq!(
            tokens(r#"{"max_completion_tokens":8,"max_tokens":64}"#),
            Some(8),
            "OpenAI's newer name first"
        );
        assert_eq!(tokens(r#"{"prompt":"hi","n_predict":16}"#), Some(16));
        assert_eq!(
            tokens(r#"{"model":3,"max_tokens":64}"#),
            Some(64),
            "a bad field spoils only itself"
        );
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
        let model = |body: &str| Asked::read(body.as_bytes()).model;
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
            ("3", "not an object"),
            ("model=qwen", "expected value"),
            ("", "EOF while parsing"),
            (r#"{"model":"a","model":"b"}"#, "duplicate field `model`"),
        ] {
            let error = model(bad).expect_err(bad);
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn a_body_is_streamed_only_when_it_says_stream_true() {
        let streamed = |body: &str| Asked::read(body.as_bytes()).streamed;
        assert!(streamed(r#"{"messages":[],"stream":true}"#));
        for not in [
            r#"{"messages":[]}"#,
            r#"{"stream":false}"#,
            r#"{"stream":"true"}"#,
            r#"[true]"#,
        ] {
            assert!(!streamed(not), "{not}");
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
            upstream: crate::spec::UpstreamTimeouts::default(),
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
    /// A backend on loopback that plays `script` on each connection it accepts, after reading
    /// the request (one read: a small request arrives whole on loopback); a stand-in for a
    /// llama-server that stalls, resets or loads on demand, which a real one cannot be made to.
    async fn scripted_backend(script: &'static [Step]) -> SocketAddrV4 {
        scripted_backend_seen(script).await.0
    }

    /// A [`scripted_backend`] and the requests it read, as text.
    async fn scripted_backend_seen(
        script: &'static [Step],
    ) -> (SocketAddrV4, Arc<Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (listener, address) = loopback_listener().await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let requests = Arc::clone(&requests);
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    let Ok(n @ 1..) = stream.read(&mut request).await else {
                        return;
                    };
                    requests
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(String::from_utf8_lossy(&request[..n]).into_owned());
                    for step in script {
                        match step {
                            Step::Send(bytes) => {
                                if stream.write_all(bytes).await.is_err() {
                                    return;
                                }
                            }
                            Step::Wait(ms) => tokio::time::sleep(Duration::from_millis(*ms)).await,
                            // Dropping the stream closes it.
                            Step::Close => return,
                        }
                    }
                    // Held open, silent, until the peer closes.
                    let _ = stream.read(&mut request).await;
                });
            }
        });
        (address, seen)
    }

    /// What a [`scripted_backend`] does after reading a request.
    enum Step {
        Send(&'static [u8]),
        Wait(u64),
        Close,
    }

    const CHUNKED_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
    const CHUNK: &[u8] = b"9\r\ndata: x\n\n\r\n";
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    /// llama-server's answer on every path while it loads its model.
    const LOADING: &[u8] =
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
        content-length: 75\r\n\r\n\
        {\"error\":{\"code\":503,\"message\":\"Loading model\",\"type\":\"unavailable_error\"}}";

    fn chat(streamed: bool) -> Request<Full<Bytes>> {
        let body =
            format!(r#"{{"messages":[{{"role":"user","content":"hi"}}],"stream":{streamed}}}"#);
        Request::post("/v1/chat/completions")
            .body(Full::new(Bytes::from(body)))
            .expect("a request")
    }

    /// The `error.type` of a refusal's body.
    async fn error_type(response: Response<ProxyBody>) -> String {
        let body = read_body(response).await;
        let json: serde_json::Value = serde_json::from_slice(&body).expect("a JSON error");
        json["error"]["type"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    const SHORT: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn a_streamed_answer_with_no_first_token_within_first_byte_timeout_is_524() {
        // The head comes at once (as llama-server's may), the first token never.
        let backend = scripted_backend(&[Step::Send(CHUNKED_HEAD)]).await;
        let (service, counts, _table) = http_service_over(&[backend], |proxy| {
            proxy.upstream.first_byte = SHORT;
        });
        let pool = Arc::new(Pool::default());
        let started = std::time::Instant::now();
        let response = handle(&service, &pool, Ipv4Addr::LOCALHOST, chat(true)).await;
        assert!(started.elapsed() >= SHORT);
        assert_eq!(response.status().as_u16(), 524);
        assert_eq!(error_type(response).await, "first_byte_timeout");
        assert_eq!(service.stats().refused["first_byte_timeout"], 1);
        assert_eq!(counts.get(0), 0, "the claim is given back");
    }

    #[tokio::test]
    async fn a_non_streamed_generation_is_not_timed_by_default_and_is_by_its_own_key() {
        // Works for twice the first-byte timeout, then answers whole, as llama-server does.
        let backend = scripted_backend(&[Step::Wait(600), Step::Send(OK)]).await;
        let (service, _counts, _table) = http_service_over(&[backend], |proxy| {
            proxy.upstream.first_byte = SHORT;
        });
        let pool = Arc::new(Pool::default());
        let response = handle(&service, &pool, Ipv4Addr::LOCALHOST, chat(false)).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.body().size_hint().exact(),
            Some(2),
            "the declared length, its first piece read already"
        );
        assert_eq!(read_body(response).await, "ok");
        // Any request that is not a generation is timed by first_byte_timeout.
        let response = handle(&service, &pool, Ipv4Addr::LOCALHOST, get()).await;
        assert_eq!(response.status().as_u16(), 524);

        let (service, _counts, _table) = http_service_over(&[backend], |proxy| {
            proxy.upstream.first_byte_unstreamed = Some(SHORT);
        });
        let response = handle(&service, &pool, Ipv4Addr::LOCALHOST, chat(false)).await;
        assert_eq!(response.status().as_u16(), 524);
        let body = read_body(response).await;
        assert!(
            String::from_utf8_lossy(&body).contains("first_byte_timeout_unstreamed 300ms"),
            "{body:?}"
        );
    }

    #[tokio::test]
    async fn an_answer_that_stalls_mid_body_is_cut_after_idle_timeout() {
        let backend = scripted_backend(&[
            Step::Send(CHUNKED_HEAD),
            Step::Send(CHUNK),
            Step::Wait(100),
            Step::Send(CHUNK),
        ])
        .await;
        let (service, counts, _table) = http_service_over(&[backend], |proxy| {
            proxy.upstream.idle = SHORT;
        });
        let pool = Arc::new(Pool::default());
        let response = handle(&service, &pool, Ipv4Addr::LOCALHOST, chat(true)).await;
        assert_eq!(response.status(), StatusCode::OK);
        let started = std::time::Instant::now();
        let mut body = response.into_body();
        let mut read = Vec::new();
        let error = loop {
            match body.frame().await {
                Some(Ok(frame)) => read.extend_from_slice(frame.data_ref().expect("data")),
                Some(Err(error)) => break error,
                None => panic!("the body ended"),
            }
        };
        assert!(started.elapsed() >= SHORT);
        assert_eq!(
            read, b"data: x\n\ndata: x\n\n",
            "what came before the stall is passed"
        );
        assert!(error.to_string().contains("idle_timeout"), "{error}");
        assert_eq!(service.stats().refused["idle_timeout"], 1);
        assert_eq!(counts.get(0), 0, "the claim is given back");
    }

    #[tokio::test]
    async fn total_timeout_bounds_the_whole_exchange_before_and_after_the_head() {
        let trickling = scripted_backend(&[
            Step::Send(CHUNKED_HEAD),
            Step::Send(CHUNK),
            Step::Wait(100),
            Step::Send(CHUNK),
            Step::Wait(100),
            Step::Send(CHUNK),
            Step::Wait(100),
            Step::Send(CHUNK),
            Step::Wait(100),
            Step::Send(CHUNK),
        ])
        .await;
        let (service, _counts, _table) = http_service_over(&[trickling], |proxy| {
            proxy.upstream.total = Some(SHORT);
        });
        let pool = Arc::new(Pool::default());
        let response = handle(&service, &pool, Ipv4Addr::LOCALHOST, chat(true)).await;
        assert_eq!(response.status(), StatusCode::OK);
        let error = response.into_body().collect().await.expect_err("cut");
        assert!(error.to_string().contains("total_timeout"), "{error}");

        let silent = scripted_backend(&[]).await;
        let (service, _counts, _table) = http_service_over(&[silent], |proxy| {
            proxy.upstream.total = Some(SHORT);
        });
        let response = handle(&service, &pool, Ipv4Addr::LOCALHOST, chat(false)).await;
        assert_eq!(response.status().as_u16(), 524);
        assert_eq!(error_type(response).await, "total_timeout");
    }

    #[tokio::test]
    async fn a_generation_reset_before_any_answer_byte_goes_to_another_backend() {
        let resetting = scripted_backend(&[Step::Close]).await;
        let answering = scripted_backend(&[Step::Send(OK)]).await;
        let (service, _counts, _table) = http_service_over(&[resetting, answering], |_| {});
        let pool = Arc::new(Pool::default());
        let response = handle(&service, &pool, Ipv4Addr::LOCALHOST, chat(false)).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(read_body(response).await, "ok");
        assert_eq!(service.stats().retried["reset"], 1);
        // A POST that is not a generation may have done its work: 502, not sent again.
        let save = Request::post("/slots/0?action=save")
            .body(Full::new(Bytes::new()))
            .expect("a request");
        let response = handle(&service, &pool, Ipv4Addr::LOCALHOST, save).await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(service.stats().retried["reset"], 1);
    }

    #[tokio::test]
    async fn llama_cpps_loading_503_goes_to_another_backend_or_to_the_client_as_it_is() {
        let loading = scripted_backend(&[Step::Send(LOADING)]).await;
        let answering = scripted_backend(&[Step::Send(OK)]).await;
        let (service, _counts, _table) = http_service_over(&[loading, answering], |_| {});
        let pool = Arc::new(Pool::default());
        let response = handle(&service, &pool, Ipv4Addr::LOCALHOST, chat(true)).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(service.stats().retried["loading"], 1);

        let (alone, _counts, _table) = http_service_over(&[loading], |_| {});
        let response = handle(&alone, &pool, Ipv4Addr::LOCALHOST, chat(true)).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = read_body(response).await;
        assert!(
            String::from_utf8_lossy(&body).contains("Loading model"),
            "{body:?}"
        );
        assert_eq!(alone.stats().retried["loading"], 0, "nowhere else to go");
    }

    #[tokio::test]
    async fn retries_stop_at_max_retries_and_name_every_backend_tried() {
        let mut backends = Vec::new();
        for _ in 0..4 {
            backends.push(scripted_backend(&[Step::Close]).await);
        }
        let (service, _counts, _table) = http_service_over(&backends, |proxy| {
            proxy.max_retries = 2;
        });
        let pool = Arc::new(Pool::default());
        let response = handle(&service, &pool, Ipv4Addr::LOCALHOST, chat(false)).await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        let body = String::from_utf8_lossy(&read_body(response).await).into_owned();
        for tried in &backends[..3] {
            assert!(body.contains(&tried.to_string()), "{tried} in {body}");
        }
        assert!(!body.contains(&backends[3].to_string()), "{body}");
        assert_eq!(service.stats().retried["reset"], 2);

        let (service, _counts, _table) = http_service_over(&backends, |proxy| {
            proxy.max_retries = 0;
        });
        let response = handle(&service, &pool, Ipv4Addr::LOCALHOST, chat(false)).await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            service.stats().retried["reset"],
            0,
            "none with max_retries 0"
        );
    }

    /// Every access line logged in this test process so far (JSON): a global subscriber, set
    /// once, since a scoped one misses events whose callsites other tests' threads registered
    /// first. Tests tell theirs by their backends' addresses.
    fn access_lines() -> Vec<serde_json::Value> {
        #[derive(Clone, Default)]
        struct Captured(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        static CAPTURED: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
        let captured = CAPTURED.get_or_init(|| {
            let captured = Captured::default();
            let writer = captured.clone();
            let subscriber = tracing_subscriber::fmt()
                .json()
                .with_env_filter("steer::access=info")
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber).expect("the only global one");
            captured
        });
        let text = captured
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        String::from_utf8_lossy(&text)
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
    }

    #[tokio::test]
    async fn every_request_gets_one_access_line_with_how_it_ended() {
        let answering = scripted_backend(&[Step::Send(OK)]).await;
        let stalling = scripted_backend(&[Step::Send(CHUNKED_HEAD), Step::Send(CHUNK)]).await;
        let (service, _counts, _table) = http_service(answering);
        let (stalled, _counts2, _table2) = http_service_over(&[stalling], |proxy| {
            proxy.upstream.idle = SHORT;
        });
        let dead = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let Ok(std::net::SocketAddr::V4(address)) = listener.local_addr() else {
                unreachable!("bound to IPv4")
            };
            address
        };
        let (unreachable, _counts3, _table3) = http_service(dead);
        let pool = Arc::new(Pool::default());
        access_lines();
        let done = handle(&service, &pool, Ipv4Addr::LOCALHOST, chat(false)).await;
        read_body(done).await;
        let gone = handle(&stalled, &pool, Ipv4Addr::LOCALHOST, chat(true)).await;
        drop(gone);
        let cut = handle(&stalled, &pool, Ipv4Addr::LOCALHOST, chat(true)).await;
        let _ = cut.into_body().collect().await;
        let refused = handle(&unreachable, &pool, Ipv4Addr::LOCALHOST, get()).await;
        assert_eq!(refused.status(), StatusCode::BAD_GATEWAY);
        let ours = [answering, stalling, dead].map(|a| serde_json::json!(a.to_string()));
        let lines: Vec<serde_json::Value> = access_lines()
            .into_iter()
            .filter(|line| ours.contains(&line["fields"]["backend"]))
            .collect();
        let fields: Vec<&serde_json::Value> = lines.iter().map(|l| &l["fields"]).collect();
        let outcomes: Vec<&str> = fields
            .iter()
            .map(|f| f["outcome"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(
            outcomes,
            ["done", "client_gone", "idle_timeout", "connect_failed"],
            "{lines:?}"
        );
        let levels: Vec<&str> = lines
            .iter()
            .map(|l| l["level"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(levels, ["INFO", "INFO", "WARN", "WARN"]);
        assert_eq!(fields[0]["method"], "POST");
        assert_eq!(fields[0]["path"], "/v1/chat/completions");
        assert_eq!(fields[0]["status"], 200);
        assert_eq!(fields[0]["backend"], answering.to_string());
        assert!(fields[0]["duration_ms"].as_f64() >= Some(0.0));
        assert!(fields[0].get("ttft_ms").is_none(), "not streamed");
        assert!(
            fields[1]["ttft_ms"].as_f64() >= Some(0.0),
            "streamed: {}",
            fields[1]
        );
        assert_eq!(fields[3]["status"], 502);
        assert_eq!(fields[3]["method"], "GET");

        // The metrics count the same requests, by backend.
        let only = |metrics: &RequestMetrics| {
            let mut all = metrics.snapshot();
            assert_eq!(all.len(), 1, "{all:?}");
            all.remove(0)
        };
        let (key, done) = only(service.request_metrics());
        assert_eq!(key.backend, Some(answering));
        assert_eq!(done.by_status, [(200, 1)].into());
        let (_, streamed) = only(stalled.request_metrics());
        assert_eq!(
            streamed.by_status,
            [(200, 2)].into(),
            "a cut counts its head's"
        );
        let count = |h: &prometheus_client::metrics::histogram::Histogram| {
            let mut text = String::new();
            let mut registry = prometheus_client::registry::Registry::default();
            registry.register("h", "", h.clone());
            prometheus_client::encoding::text::encode(&mut text, &registry).expect("encoded");
            text.lines()
                .find_map(|l| l.strip_prefix("h_count ")?.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{text}"))
        };
        assert_eq!(count(&streamed.ttft), 2, "both streamed");
        assert_eq!(count(&done.ttft), 0, "not streamed");
        assert_eq!(count(&done.duration), 1);
        let (key, refused) = only(unreachable.request_metrics());
        assert_eq!(
            (key.backend, refused.by_status),
            (Some(dead), [(502, 1)].into())
        );
    }

    /// The proxy serving `service` on a loopback listener, and its address.
    async fn serving(
        service: &Arc<ServiceProxy>,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let front = listener.local_addr().expect("address");
        let proxy = tokio::spawn(crate::proxy::serve(
            tokio::sync::watch::channel(Arc::clone(service)).1,
            listener,
            watch::channel(false).1,
        ));
        (front, proxy)
    }

    /// A WebSocket server on loopback that echoes every message: llama-server speaks none.
    async fn websocket_echo_backend() -> SocketAddrV4 {
        use futures_util::{SinkExt, StreamExt};
        let (listener, address) = loopback_listener().await;
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    while let Some(Ok(message)) = socket.next().await {
                        if message.is_text() && socket.send(message).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        address
    }

    #[tokio::test]
    async fn a_websocket_passes_through_as_one_request_holding_its_slot() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let echo = websocket_echo_backend().await;
        let (service, counts, _table) = http_service(echo);
        let (front, proxy) = serving(&service).await;
        let stream = TcpStream::connect(front).await.expect("connect");
        let (mut socket, response) =
            tokio_tungstenite::client_async(format!("ws://{front}/ws"), stream)
                .await
                .expect("a WebSocket handshake through the proxy");
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        for text in ["hello", "again"] {
            socket.send(Message::text(text)).await.expect("send");
            let echoed = socket.next().await.expect("a message").expect("no error");
            assert_eq!(echoed.to_text().expect("text"), text);
        }
        assert_eq!(counts.get(0), 1, "the tunnel holds its slot");
        socket.close(None).await.expect("close");
        drop(socket);
        let released = async {
            while counts.get(0) != 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), released)
            .await
            .expect("the slot is given back once the tunnel closes");
        assert_eq!(
            service.default_gate().requests().get(0).requests.by_class["3xx"],
            0
        );
        proxy.abort();
    }

    #[tokio::test]
    async fn an_h2c_client_is_answered_through_an_http1_backend() {
        let (backend, seen) = scripted_backend_seen(&[Step::Send(OK)]).await;
        let (service, _counts, _table) = http_service(backend);
        let (front, proxy) = serving(&service).await;
        let stream = TcpStream::connect(front).await.expect("connect");
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(stream),
        )
        .await
        .expect("an h2c handshake (prior knowledge)");
        tokio::spawn(connection);
        for _ in 0..2 {
            let request = Request::post(format!("http://{front}/v1/chat/completions"))
                .body(Full::new(Bytes::from_static(br#"{"messages":[]}"#)))
                .expect("a request");
            let response = sender.send_request(request).await.expect("an answer");
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.version(), hyper::Version::HTTP_2);
            let body = response.into_body().collect().await.expect("the body");
            assert_eq!(body.to_bytes(), "ok");
        }
        let seen = seen.lock().unwrap_or_else(PoisonError::into_inner).clone();
        assert!(
            seen[0].starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
            "{seen:?}"
        );
        assert!(
            seen[0]
                .to_ascii_lowercase()
                .contains(&format!("host: {front}")),
            "the backend gets Host from :authority: {seen:?}"
        );
        proxy.abort();
    }

    #[tokio::test]
    async fn an_upgrade_to_anything_but_a_websocket_is_declined_and_served() {
        let (backend, seen) = scripted_backend_seen(&[Step::Send(OK)]).await;
        let (service, _counts, _table) = http_service(backend);
        let pool = Arc::new(Pool::default());
        let request = Request::get("/v1/models")
            .header("connection", "Upgrade, HTTP2-Settings")
            .header("upgrade", "h2c")
            .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")
            .body(Full::new(Bytes::new()))
            .expect("a request");
        let response = handle(&service, &pool, Ipv4Addr::LOCALHOST, request).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(read_body(response).await, "ok");
        let sent = seen.lock().unwrap_or_else(PoisonError::into_inner)[0].to_ascii_lowercase();
        assert!(
            !sent.contains("upgrade") && !sent.contains("http2-settings"),
            "hop-by-hop, dropped: {sent}"
        );
    }

    #[tokio::test]
    async fn a_backend_that_left_leaves_no_request_series_behind() {
        let answering = scripted_backend(&[Step::Send(OK)]).await;
        let (service, _counts, table) = http_service(answering);
        let pool = Arc::new(Pool::default());
        read_body(handle(&service, &pool, Ipv4Addr::LOCALHOST, chat(false)).await).await;
        let series = service.request_series();
        assert_eq!(series.len(), 1);
        assert_eq!(series[0].0.backend, Some(answering));
        let other = scripted_backend(&[Step::Send(OK)]).await;
        table.send(routes_to(&[other])).expect("the routes");
        assert!(
            service.request_series().is_empty(),
            "forgotten with its backend"
        );
    }
}
