//! What clients can hold of the agent: descriptors, connections and time.
//!
//! Every listener (the admin API, each service address) keeps its client connections in a
//! [`Connections`] registry capped at a number. A connection is *quiet* while it has nothing in
//! flight: http, no request being answered; l4, no byte seen either way yet. At the cap, a new
//! connection takes the place of the one quiet the longest (it is closed); only when every one
//! has something in flight is the new one closed instead. So a flood of idle connections can
//! neither take every descriptor nor lock out clients that send requests.
//!
//! A quiet connection is also timed ([`ClientTimeouts`]): `idle` from the accept or the end of
//! the last response to the first byte of the next request head, `header` from that first byte
//! to the head's end. hyper's own header timer runs from the moment it waits for a head, idle
//! time included, so it is off and [`serve_http`] keeps both timers itself. Nothing times a
//! request in flight here: a streamed answer (or a long prefill without a byte) is never cut.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};
use tracing::{info, warn};

use crate::spec::{AdminLimits, ClientTimeouts, ProxyMode, ServiceSpec};

/// Why a connection was closed by its limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    Idle,
    Header,
    /// A new connection took its place at the cap.
    Evicted,
}

#[derive(Debug)]
struct State {
    /// Requests being answered (http); l4: 1 for good once a byte was seen.
    in_flight: u32,
    /// Since when nothing is in flight.
    quiet_since: Instant,
    /// The first byte read while quiet: a request head has begun.
    head_since: Option<Instant>,
    evicted: bool,
}

/// One client connection's activity, shared by its task, its IO and the listener's registry.
#[derive(Debug)]
pub struct Activity {
    state: Mutex<State>,
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Activity {
            state: Mutex::new(State {
                in_flight: 0,
                quiet_since: Instant::now(),
                head_since: None,
                evicted: false,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every edit is a few field writes: the state stays consistent under a panic elsewhere.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A request's head was read: no timer runs until the returned guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        let mut state = self.lock();
        state.in_flight += 1;
        state.head_since = None;
        InFlight(Arc::clone(self))
    }

    /// l4: a byte was seen; the connection is the client's and backend's from now on.
    pub fn engaged(&self) {
        let mut state = self.lock();
        state.in_flight = state.in_flight.max(1);
    }

    fn read_some(&self) {
        let mut state = self.lock();
        if state.in_flight == 0 && state.head_since.is_none() {
            state.head_since = Some(Instant::now());
            drop(state);
            // The header timer replaces the idle one a waiting `expired` is sleeping on.
            self.changed.notify_one();
        }
    }

    fn in_flight(&self) -> u32 {
        self.lock().in_flight
    }

    /// When it went quiet, if it is and may be evicted.
    fn quiet_since(&self) -> Option<Instant> {
        let state = self.lock();
        (state.in_flight == 0 && !state.evicted).then_some(state.quiet_since)
    }

    fn evict(&self) {
        self.lock().evicted = true;
        self.changed.notify_one();
    }

    /// Completes when a timer of `timeouts` has run out or the connection was evicted; never
    /// while something is in flight.
    pub async fn expired(&self, timeouts: ClientTimeouts) -> Closed {
        loop {
            let deadline = {
                let state = self.lock();
                if state.evicted {
                    return Closed::Evicted;
                }
                match (state.in_flight, state.head_since, timeouts.header) {
                    (1.., _, _) => None,
                    (0, Some(since), Some(header)) => Some((since + header, Closed::Header)),
                    (0, _, _) => Some((state.quiet_since + timeouts.idle, Closed::Idle)),
                }
            };
            // A change wakes the wait (`notify_one` keeps the wake-up if it comes first); the
            // state is read again either way.
            match deadline {
                Some((at, why)) if at <= Instant::now() => return why,
                Some((at, _)) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = self.changed.notified() => {}
                    }
                }
                None => self.changed.notified().await,
            }
        }
    }
}

/// A request being answered; dropping it (the response's end, or the connection's) makes the
/// connection quiet again when it was the last.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        if state.in_flight == 0 {
            state.quiet_since = Instant::now();
            state.head_since = None;
        }
        drop(state);
        self.0.changed.notify_one();
    }
}

/// The client connections of one listener, at most `max` of them.
#[derive(Debug)]
pub struct Connections {
    /// Changed by a reload; connections above a lowered cap close as they end or idle.
    max: AtomicUsize,
    open: Mutex<HashMap<u64, Arc<Activity>>>,
    next: AtomicU64,
    refused: AtomicU64,
    evicted: AtomicU64,
}

/// How many connections a [`Connections`] holds and has turned away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConnectionStats {
    pub open: u64,
    /// Closed at once: at the cap, every connection had something in flight.
    pub refused: u64,
    /// Quiet connections closed to make room for a new one.
    pub evicted: u64,
}

/// A connection's place in its [`Connections`], given back on drop.
#[derive(Debug)]
pub struct Registered {
    connections: Arc<Connections>,
    id: u64,
    pub activity: Arc<Activity>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.connections.lock().remove(&self.id);
    }
}

impl Connections {
    /// A reload's new cap; the connections held stay.
    pub fn set_max(&self, max: usize) {
        self.max.store(max.max(1), Ordering::Relaxed);
    }

    /// `max` is at least 1 (config validation).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Connections {
            max: AtomicUsize::new(max.max(1)),
            open: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Activity>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for a new connection: at the cap, the one quiet the longest is evicted for it;
    /// `None` (counted) when every one has something in flight, and the new one is to be closed.
    pub fn register(self: &Arc<Self>) -> Option<Registered> {
        let mut open = self.lock();
        if open.len() >= self.max.load(Ordering::Relaxed) {
            let oldest = open
                .iter()
                .filter_map(|(&id, activity)| activity.quiet_since().map(|since| (since, id)))
                .min();
            let Some((_, id)) = oldest else {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return None;
            };
            if let Some(activity) = open.remove(&id) {
                activity.evict();
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::new());
        open.insert(id, Arc::clone(&activity));
        Some(Registered {
            connections: Arc::clone(self),
            id,
            activity,
        })
    }

    pub fn stats(&self) -> ConnectionStats {
        ConnectionStats {
            open: self.lock().len() as u64,
            refused: self.refused.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
        }
    }
}

/// How an HTTP/1.1 connection served by [`serve_http`] ended.
#[derive(Debug)]
pub enum Ended {
    /// The client closed it, or it was closed after the last answer.
    Done,
    Failed(Box<dyn std::error::Error + Send + Sync>),
    Closed(Closed),
}

/// Requests an HTTP/2 client connection may have in flight at once.
pub const H2_STREAMS: u32 = 8;

/// Serve one client connection, HTTP/1.1 (with upgrades: a WebSocket) or HTTP/2 with prior
/// knowledge (h2c, told by its preface), with `service` under `timeouts` and its registry place,
/// until it ends or is closed by its limits; once `stop` completes, the requests in flight are
/// answered and the connection closed (the caller bounds how long that may take).
pub async fn serve_http<S, B>(
    stream: TcpStream,
    registered: Registered,
    timeouts: ClientTimeouts,
    service: S,
    stop: impl Future<Output = ()>,
) -> Ended
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = Arc::clone(&registered.activity);
    let io = TokioIo::new(Watched {
        stream,
        activity: Arc::clone(&activity),
    });
    let tracking = Tracking {
        service,
        activity: Arc::clone(&activity),
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Kept by `activity` instead (see the module doc).
    builder.http1().header_read_timeout(None);
    // Each stream's body is read whole before it waits for a backend: an h2 connection holds
    // at most as many as this, as HTTP/1.1 holds one.
    builder.http2().max_concurrent_streams(H2_STREAMS);
    let connection = builder.serve_connection_with_upgrades(io, tracking);
    tokio::pin!(connection, stop);
    let mut stopping = false;
    loop {
        tokio::select! {
            served = connection.as_mut() => {
                return served.map_or_else(Ended::Failed, |()| Ended::Done);
            }
            why = activity.expired(timeouts) => return Ended::Closed(why),
            () = &mut stop, if !stopping => {
                // Nothing in flight (idle, or a head still coming): close now, or a flood of
                // half-sent heads would hold the drain for the header timeout.
                if activity.in_flight() == 0 {
                    return Ended::Closed(Closed::Idle);
                }
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The client's socket, noting the first byte of each request head in its [`Activity`].
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read_some();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// `service`, with each request in flight from its head to the end of its response body.
struct Tracking<S> {
    service: S,
    activity: Arc<Activity>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> hyper::service::Service<Request<Incoming>> for Tracking<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Answer<B>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let in_flight = self.activity.begin();
        let answer = self.service.call(request);
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|body| Answer { body, in_flight }))
        })
    }
}

/// A response body holding its request [`InFlight`] until hyper drops it (after its end).
pub struct Answer<B> {
    body: B,
    #[expect(dead_code, reason = "held for its Drop")]
    in_flight: InFlight,
}

impl<B: Body + Unpin> Body for Answer<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body that has to have arrived whole within a time of its head.
pub struct Timed<B> {
    body: B,
    deadline: Pin<Box<Sleep>>,
    limit: Duration,
}

/// The request body did not arrive within its timeout.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimeout(pub Duration);

impl<B> Timed<B> {
    pub fn new(body: B, limit: Duration) -> Self {
        Timed {
            body,
            deadline: Box::pin(tokio::time::sleep(limit)),
            limit,
        }
    }
}

impl<B> Body for Timed<B>
where
    B: Body + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(self.limit))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Descriptors the agent keeps for itself beyond its client connections: listeners, health
/// checks, backend pools, instances, the BPF maps.
const RESERVED_DESCRIPTORS: u64 = 256;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (systemd starts services at a soft 1024)
/// and logs it. Returns the limit in force (0 when it cannot be read).
pub fn raise_open_files() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(errno) => {
            warn!(%errno, "reading RLIMIT_NOFILE");
            return 0;
        }
    };
    let limit = match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => hard,
        Err(errno) => {
            warn!(%errno, soft, hard, "raising RLIMIT_NOFILE to its hard limit");
            soft
        }
    };
    info!(open_files = limit, "RLIMIT_NOFILE");
    limit
}

/// Lowers the admin API's and the services' connection caps, in proportion, until what they may
/// hold fits in `limit` descriptors with the agent's own: over the limit, accepts would fail and
/// take health checks and backend connections with them. A warning names the caps in force.
/// `limit` 0: unknown.
pub fn fit_caps(admin: &mut AdminLimits, services: &mut [ServiceSpec], limit: u64) {
    let need = descriptors_needed(admin, services);
    if limit == 0 || need <= limit {
        return;
    }
    let room = limit.saturating_sub(RESERVED_DESCRIPTORS).max(1) as f64;
    let factor = room / (need - RESERVED_DESCRIPTORS) as f64;
    let scale = |cap: usize| ((cap as f64 * factor) as usize).max(1);
    admin.max_connections = scale(admin.max_connections);
    for service in services.iter_mut() {
        service.proxy.max_client_connections = scale(service.proxy.max_client_connections);
    }
    let caps: Vec<String> = services
        .iter()
        .map(|s| format!("{}={}", s.name, s.proxy.max_client_connections))
        .collect();
    warn!(
        open_files = limit,
        need,
        admin_max_connections = admin.max_connections,
        max_client_connections = %caps.join(","),
        "the connection caps could take more descriptors than RLIMIT_NOFILE allows: lowered to \
         fit (raise the hard limit, systemd LimitNOFILE=, to keep them)"
    );
}

/// Descriptors the connection caps may take at once, with the agent's own.
pub fn descriptors_needed(admin: &AdminLimits, services: &[ServiceSpec]) -> u64 {
    let per_service: u64 = services
        .iter()
        .map(|service| {
            let proxy = &service.proxy;
            // l4: client, backend, and a pipe (two ends) each way; http: client and backend.
            let per_connection = match proxy.mode {
                ProxyMode::L4 => 6,
                ProxyMode::Http => 2,
            };
            proxy.max_client_connections as u64 * per_connection
        })
        .sum();
    RESERVED_DESCRIPTORS + admin.max_connections as u64 + per_service
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn caps_are_lowered_to_fit_a_low_descriptor_limit_and_kept_under_a_high_one() {
        let text = "[agent]\ninterfaces = [\"lo\"]\n\
                    [[service]]\nname = \"chat\"\naddress = \"10.0.0.1:80\"\nmode = \"http\"\n\
                    [[service]]\nname = \"raw\"\naddress = \"10.0.0.1:81\"\n";
        let path = std::path::Path::new("t.toml");
        let config = Config::parse(path, text, &crate::config::Overrides::default())
            .expect("a valid config");
        let fit = |config: &mut Config, limit| {
            fit_caps(&mut config.admin_limits, &mut config.services, limit)
        };
        let needed = |config: &Config| descriptors_needed(&config.admin_limits, &config.services);
        let mut high = config.clone();
        fit(&mut high, 1 << 20);
        assert_eq!(high.services, config.services, "room for the defaults");
        assert_eq!(high.admin_limits, config.admin_limits);
        let mut low = config;
        fit(&mut low, 1024);
        assert!(needed(&low) <= 1024, "{}", needed(&low));
        let caps: Vec<usize> = low
            .services
            .iter()
            .map(|s| s.proxy.max_client_connections)
            .collect();
        assert!(caps.iter().all(|&cap| cap >= 1), "{caps:?}");
        assert_eq!(caps[0], caps[1], "in proportion: same default, same cap");
        assert!(low.admin_limits.max_connections >= 1);
    }

    const TIMEOUTS: ClientTimeouts = ClientTimeouts {
        header: Some(Duration::from_secs(10)),
        idle: Duration::from_secs(60),
    };

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_the_longest_quiet_connection_gives_way_and_busy_ones_never_do() {
        let connections = Connections::new(2);
        let first = connections.register().expect("room");
        tokio::time::advance(Duration::from_secs(1)).await;
        let second = connections.register().expect("room");
        let _busy = second.activity.begin();
        let third = connections.register().expect("the first gives way");
        assert_eq!(first.activity.expired(TIMEOUTS).await, Closed::Evicted);
        assert_eq!(
            connections.stats(),
            ConnectionStats {
                open: 2,
                refused: 0,
                evicted: 1
            }
        );
        let _busy_too = third.activity.begin();
        assert!(connections.register().is_none(), "both have requests");
        assert_eq!(connections.stats().refused, 1);
        drop(first);
        assert_eq!(connections.stats().open, 2, "the evicted one left already");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_runs_while_quiet_header_from_the_first_byte_and_nothing_while_in_flight() {
        let connections = Connections::new(4);
        let conn = connections.register().expect("room");
        let started = Instant::now();
        assert_eq!(conn.activity.expired(TIMEOUTS).await, Closed::Idle);
        assert_eq!(started.elapsed(), Duration::from_secs(60));

        let conn = connections.register().expect("room");
        tokio::time::advance(Duration::from_secs(30)).await;
        conn.activity.read_some();
        let head = Instant::now();
        assert_eq!(conn.activity.expired(TIMEOUTS).await, Closed::Header);
        assert_eq!(head.elapsed(), Duration::from_secs(10));

        let conn = connections.register().expect("room");
        let in_flight = conn.activity.begin();
        let activity = Arc::clone(&conn.activity);
        let expired = tokio::spawn(async move { activity.expired(TIMEOUTS).await });
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(!expired.is_finished(), "an answer in flight is never cut");
        let answered = Instant::now();
        drop(in_flight);
        assert_eq!(expired.await.expect("the timer task"), Closed::Idle);
        assert_eq!(
            answered.elapsed(),
            Duration::from_secs(60),
            "idle from the end"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_does_not_arrive_in_time_fails() {
        use http_body_util::BodyExt;
        let started = Instant::now();
        let error = Timed::new(Never, Duration::from_secs(5))
            .collect()
            .await
            .expect_err("timed out");
        assert!(error.is::<BodyTimeout>(), "{error}");
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    /// A body whose bytes never come: a client that sent its head and stopped.
    pub(crate) struct Never;

    impl Body for Never {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            Poll::Pending
        }
    }
}
