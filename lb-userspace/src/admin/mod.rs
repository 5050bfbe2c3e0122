//! The admin API: every HTTP route the agent serves on its admin address, and the server that
//! serves them. The route sets are `backends` (backends and services: the table), `instances`
//! (llama-server arguments: the supervisor), `metrics` and `proxy_stats` (the userspace proxies'
//! counters); [`router`] puts together the ones a command has, for `steer run` and
//! `steer supervise` alike.
//!
//! Errors are `{"error": "..."}` ([`ApiError`]); mutating calls need the bearer token
//! ([`Authorized`]); unknown routes and methods get JSON too.

pub mod backends;
#[cfg(feature = "etcd")]
pub mod fleet;
pub mod instances;
pub mod metrics;
pub mod proxy_stats;
pub mod reload;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::FromRef;
use axum::extract::FromRequestParts;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::http::{HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::limits::{self, Connections};
use crate::proxy::ServiceProxy;
use crate::spec::{AdminLimits, AdminToken};
use crate::supervisor::InstanceHandle;
use crate::table::TableHandle;

/// The userspace proxies and supervised instances as they run now: a reload publishes new ones.
#[derive(Clone, Debug, Default)]
pub struct Running {
    pub proxies: Vec<Arc<ServiceProxy>>,
    pub instances: Vec<InstanceHandle>,
}

/// What the routes read [`Running`] from at each request.
pub type Live = watch::Receiver<Arc<Running>>;

impl Running {
    /// A set that never changes (`steer supervise`, tests).
    pub fn fixed(self) -> Live {
        watch::channel(Arc::new(self)).1
    }
}

/// What an admin API serves: the table (none under `steer supervise`), the supervised
/// instances and the userspace proxies, the reload (`steer run`), and the token mutating calls
/// need.
pub struct Sources {
    pub table: Option<TableHandle>,
    pub running: Live,
    pub reload: Option<crate::reload::Trigger>,
    pub token: Arc<AdminToken>,
    /// `[fleet]`: what the fleet tasks know.
    #[cfg(feature = "etcd")]
    pub fleet: Option<crate::fleet::FleetApi>,
}

/// Serves every route `sources` can answer on `listener` under `limits` until `shutdown`, then
/// as [`serve_app`] does; `steer run` and `steer supervise` both serve their API this way.
pub async fn serve(
    listener: TcpListener,
    sources: Sources,
    limits: &AdminLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let connections = Connections::new(limits.max_connections);
    let app = router(sources, Arc::clone(&connections));
    serve_app(listener, app, limits, connections, shutdown).await
}

/// Every route `sources` can answer, with the JSON fallbacks; `connections` are the admin API's
/// own client connections, which `/metrics` reports.
fn router(sources: Sources, connections: Arc<Connections>) -> Router {
    let Sources {
        table,
        running,
        reload,
        token,
        #[cfg(feature = "etcd")]
        fleet,
    } = sources;
    let metrics = metrics::MetricSources {
        table: table.clone(),
        running: running.clone(),
        admin: connections,
        #[cfg(feature = "etcd")]
        fleet: fleet.clone(),
    };
    let mut app =
        instances::router(running.clone(), Arc::clone(&token)).merge(metrics::router(metrics));
    if let Some(reload) = reload {
        app = app.merge(reload::router(reload, Arc::clone(&token)));
    }
    #[cfg(feature = "etcd")]
    if let Some(fleet) = fleet {
        app = app.merge(fleet::router(fleet, Arc::clone(&token)));
    }
    // `steer run`: the table's routes, and the proxies' (an empty list when none listens).
    if let Some(table) = table {
        app = app
            .merge(backends::router(table, token))
            .merge(proxy_stats::router(running));
    }
    with_fallbacks(app)
}

/// Request bodies are a few hundred bytes; refuse anything far larger before parsing it.
pub const BODY_LIMIT: usize = 64 * 1024;

/// JSON answers for unknown routes and methods; added once, to the complete router.
pub(crate) fn with_fallbacks(router: Router) -> Router {
    router
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            )
        })
}

#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(ErrorBody {
            error: &self.message,
        });
        let mut response = (self.status, body).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        // axum answers a well-formed body of the wrong shape with 422; callers get 400 for any
        // body they must fix, and keep 413/415 for size and content type.
        let status = match &rejection {
            JsonRejection::JsonDataError(_) | JsonRejection::JsonSyntaxError(_) => {
                StatusCode::BAD_REQUEST
            }
            other => other.status(),
        };
        ApiError::new(status, rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, rejection.body_text())
    }
}

/// Proof that a mutating request carries the token. Taken before the body, so a request
/// without the token learns nothing else. Any router whose state yields the token can use it.
pub(crate) struct Authorized;

impl<S> FromRequestParts<S> for Authorized
where
    S: Send + Sync,
    Arc<AdminToken>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let token = Arc::<AdminToken>::from_ref(state);
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        match presented {
            Some(presented) if token.matches(presented.trim()) => Ok(Authorized),
            Some(_) => {
                debug!(uri = %parts.uri, "admin request with a wrong token");
                Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "wrong bearer token",
                ))
            }
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "this call needs an `Authorization: Bearer <token>` header",
            )),
        }
    }
}

/// How long requests in flight on the admin API get to finish after `shutdown`; connections
/// still open then (a half-sent request head, say) are dropped.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves `app` under `limits`, its client connections held in `connections` (which `/metrics`
/// reads), until `shutdown` completes, then lets requests in flight finish for at most
/// [`SHUTDOWN_GRACE`]. An error is an accept error that is not about this one connection
/// or a lack of descriptors (those are waited out).
pub(crate) async fn serve_app(
    listener: TcpListener,
    app: axum::Router,
    limits: &AdminLimits,
    connections: Arc<limits::Connections>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let service = hyper_util::service::TowerToHyperService::new(app);
    let body_timeout = limits.body_timeout;
    let timeouts = limits.client_timeouts();
    let mut tasks = tokio::task::JoinSet::new();
    let mut turned_away = RateLimited::default();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let registered = connections.register();
                    turned_away.check(&connections);
                    // None: dropped, so closed at once; every connection held has a request in
                    // flight.
                    let Some(registered) = registered else { continue };
                    let service = service.clone();
                    let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
                        let request = request.map(|body| limits::Timed::new(body, body_timeout));
                        hyper::service::Service::call(&service, request)
                    });
                    let mut stopping = stopping.clone();
                    let stop = async move {
                        let _ = stopping.wait_for(|stop| *stop).await;
                    };
                    tasks.spawn(async move {
                        let ended = limits::serve_http(stream, registered, timeouts, service, stop);
                        if let limits::Ended::Failed(error) = ended.await {
                            tracing::debug!(%error, "admin API connection ended");
                        }
                    });
                }
                Err(error) if transient(&error) => {
                    warn!(%error, "accepting an admin API connection");
                    // Out of descriptors, say: give the open ones time to end.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => return Err(error),
            },
            Some(_) = tasks.join_next() => {}
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let _ = stop.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        warn!(
            connections = tasks.len(),
            grace = ?SHUTDOWN_GRACE,
            "admin API connections still open after the grace period: dropped"
        );
        tasks.shutdown().await;
    }
    Ok(())
}

/// An accept error about the one connection, or a lack of descriptors or memory: the listener
/// still works.
fn transient(error: &std::io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        error.raw_os_error().map(Errno::from_raw),
        Some(
            Errno::ECONNABORTED
                | Errno::EINTR
                | Errno::EMFILE
                | Errno::ENFILE
                | Errno::ENOBUFS
                | Errno::ENOMEM
                | Errno::EPROTO
                | Errno::EPERM
        )
    )
}

/// A warning when the admin API turned connections away, at most every 10 s.
#[derive(Default)]
struct RateLimited {
    last: Option<tokio::time::Instant>,
    /// Evicted and refused connections when it last warned.
    warned_at: u64,
}

impl RateLimited {
    fn check(&mut self, connections: &limits::Connections) {
        let stats = connections.stats();
        let now = tokio::time::Instant::now();
        let quiet = self
            .last
            .is_some_and(|last| now - last < Duration::from_secs(10));
        if stats.evicted + stats.refused == self.warned_at || quiet {
            return;
        }
        self.last = Some(now);
        self.warned_at = stats.evicted + stats.refused;
        warn!(
            open = stats.open,
            evicted = stats.evicted,
            refused = stats.refused,
            "admin API at agent.admin_max_connections: quiet connections closed for new ones"
        );
    }
}
