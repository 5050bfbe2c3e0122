//! The userspace path: a TCP listener on each service address for what XDP does not steer
//! (loopback clients, SYNs passed because every backend was full, everything with
//! `--dataplane userspace`). It chooses with the kernel's policy model over the table's published
//! [`Routes`] and claims capacity in the same [`ConnCounts`] the kernel reads, so both paths share
//! one count per backend.
//!
//! A connection that finds no backend with room waits in the service's FIFO queue. Releasing a
//! proxied connection and every table change wake the queue at once; a flow the kernel ends
//! changes only the shared counter, which nothing can wait on, so waiters also look again every
//! [`KERNEL_RELEASE_TICK`].
//!
//! The listener binds with `IP_FREEBIND`, so a VIP that is not (yet) a local address can be
//! bound without privileges. For SYNs from other hosts (passed by XDP, or every one without it)
//! to reach it, the agent, when root, makes the VIP local with a [`LocalRoute`] (`ip route replace
//! local VIP/32 dev lo`), removed on exit. Loopback VIPs (127.0.0.0/8) work as they are.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info_span, warn};

use super::conns::ConnCounts;
use crate::config::ProxyConfig;
use crate::policy::{BackendView, ServiceView, choose};
use crate::table::Routes;

/// How often a waiter looks again for room the kernel's own flows freed.
pub const KERNEL_RELEASE_TICK: Duration = Duration::from_millis(50);
/// Pending connections the kernel keeps per listener.
const BACKLOG: u32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("`ip {args}`: {message}")]
    Route { args: String, message: String },
    #[error("listening on {address} for service `{service}`: {source}")]
    Listen {
        service: String,
        address: SocketAddrV4,
        #[source]
        source: std::io::Error,
    },
}

/// Why a connection was closed without being proxied to the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The queue held `queue_size` connections already.
    QueueFull,
    /// No backend had room within `queue_timeout`.
    QueueTimeout,
    /// The backend sent nothing within `response_timeout`.
    ResponseTimeout,
    /// The chosen backend refused or could not be reached.
    Connect,
}

/// A service's proxy counters (`GET /v1/proxy`).
#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    queued: AtomicU64,
    queue_full: AtomicU64,
    queue_timeout: AtomicU64,
    response_timeout: AtomicU64,
    connect_failed: AtomicU64,
}

/// The counters of one service at one moment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProxyStats {
    pub service: String,
    pub address: SocketAddrV4,
    pub accepted: u64,
    /// Connections that had to wait for room.
    pub queued: u64,
    pub queue_depth: u64,
    pub queue_full: u64,
    pub queue_timeout: u64,
    pub response_timeout: u64,
    pub connect_failed: u64,
}

/// Backend choice, capacity and the FIFO queue of one service.
#[derive(Debug)]
pub struct Gate {
    config: ProxyConfig,
    /// Service id: the index into the routes.
    id: usize,
    counts: Arc<ConnCounts>,
    routes: watch::Receiver<Routes>,
    /// The proxy's own round-robin cursor (the kernel's is per CPU in a map).
    cursor: AtomicU64,
    /// Tickets of the waiting connections, oldest first.
    queue: Mutex<VecDeque<u64>>,
    next_ticket: AtomicU64,
    released: Notify,
    counters: Counters,
}

/// A claimed connection on a backend; dropping it gives the connection back and wakes the queue.
#[derive(Debug)]
pub struct Lease {
    gate: Arc<Gate>,
    pub id: u32,
    pub address: SocketAddrV4,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.gate.counts.release(self.id);
        self.gate.released.notify_waiters();
    }
}

/// Takes the ticket out of the queue however the wait ends (served, timed out, cancelled).
struct Waiting<'a> {
    gate: &'a Gate,
    ticket: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut queue = self.gate.lock_queue();
        let was_head = queue.front() == Some(&self.ticket);
        queue.retain(|&t| t != self.ticket);
        drop(queue);
        // The next one may find the room this one was waiting for (or just took less of).
        if was_head {
            self.gate.released.notify_waiters();
        }
    }
}

impl Gate {
    pub fn new(
        config: ProxyConfig,
        id: usize,
        counts: Arc<ConnCounts>,
        routes: watch::Receiver<Routes>,
    ) -> Arc<Self> {
        Arc::new(Gate {
            config,
            id,
            counts,
            routes,
            cursor: AtomicU64::new(0),
            queue: Mutex::new(VecDeque::new()),
            next_ticket: AtomicU64::new(0),
            released: Notify::new(),
            counters: Counters::default(),
        })
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, VecDeque<u64>> {
        // The queue stays consistent under a panic elsewhere: every edit is one call.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Claim room on a backend for `client` now, or wait in line for it; the error says why not.
    pub async fn admit(self: &Arc<Self>, client: Ipv4Addr) -> Result<Lease, Refusal> {
        let ticket = {
            let mut queue = self.lock_queue();
            // Nobody waiting: no one to overtake.
            if queue.is_empty()
                && let Some(lease) = self.try_claim(client)
            {
                return Ok(lease);
            }
            if queue.len() >= self.config.queue_size {
                self.counters.queue_full.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::QueueFull);
            }
            let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
            queue.push_back(ticket);
            ticket
        };
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
        let waiting = Waiting { gate: self, ticket };
        let mut routes = self.routes.clone();
        // Only changes from here on should wake this waiter.
        drop(routes.borrow_and_update());
        let deadline = tokio::time::sleep(self.config.queue_timeout);
        tokio::pin!(deadline);
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before looking, so a release between the look and the wait still wakes.
            released.as_mut().enable();
            if self.lock_queue().front() == Some(&waiting.ticket)
                && let Some(lease) = self.try_claim(client)
            {
                return Ok(lease);
            }
            tokio::select! {
                () = &mut released => {}
                changed = routes.changed() => {
                    if changed.is_err() {
                        // The table is gone: the agent is stopping.
                        self.counters.queue_timeout.fetch_add(1, Ordering::Relaxed);
                        return Err(Refusal::QueueTimeout);
                    }
                }
                () = tokio::time::sleep(KERNEL_RELEASE_TICK) => {}
                () = &mut deadline => {
                    self.counters.queue_timeout.fetch_add(1, Ordering::Relaxed);
                    return Err(Refusal::QueueTimeout);
                }
            }
        }
    }

    /// The kernel's choice over the current routes and live counts, then its claim; a claim lost
    /// to a concurrent claimer chooses again with the new counts.
    fn try_claim(self: &Arc<Self>, client: Ipv4Addr) -> Option<Lease> {
        let routes = self.routes.borrow().clone();
        let route = routes.get(self.id)?;
        let cap = self.config.max_connections_per_backend;
        for _ in 0..route.backends.len().max(1) {
            let backends: Vec<BackendView> = (0u32..)
                .zip(&route.backends)
                .map(|(slot, &(view, _))| {
                    let id = route.id * lb_common::MAX_BACKENDS_PER_SERVICE + slot;
                    BackendView {
                        max_conns: if cap == 0 { view.max_conns } else { cap },
                        conns: self.counts.get(id),
                        steered: self.counts.steered(id),
                        ..view
                    }
                })
                .collect();
            let view = ServiceView {
                policy: route.policy,
                id: route.id,
                backend_count: route.backend_count,
                ring: &route.ring,
                maglev: &route.maglev,
                backends: &backends,
            };
            let cursor = self.cursor.fetch_add(1, Ordering::Relaxed);
            let id = choose(&view, cursor, client)?;
            let slot = (id % lb_common::MAX_BACKENDS_PER_SERVICE) as usize;
            let (picked, address) = backends.get(slot).zip(route.backends.get(slot))?;
            if self.counts.acquire(id, picked.max_conns) {
                return Some(Lease {
                    gate: Arc::clone(self),
                    id,
                    address: address.1,
                });
            }
        }
        None
    }

    pub fn stats(&self) -> ProxyStats {
        let c = &self.counters;
        ProxyStats {
            service: self.config.service.clone(),
            address: self.config.address,
            accepted: c.accepted.load(Ordering::Relaxed),
            queued: c.queued.load(Ordering::Relaxed),
            queue_depth: self.lock_queue().len() as u64,
            queue_full: c.queue_full.load(Ordering::Relaxed),
            queue_timeout: c.queue_timeout.load(Ordering::Relaxed),
            response_timeout: c.response_timeout.load(Ordering::Relaxed),
            connect_failed: c.connect_failed.load(Ordering::Relaxed),
        }
    }

    fn count(&self, refusal: Refusal) {
        let c = &self.counters;
        let counter = match refusal {
            // Counted where they happen.
            Refusal::QueueFull | Refusal::QueueTimeout => return,
            Refusal::ResponseTimeout => &c.response_timeout,
            Refusal::Connect => &c.connect_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A local route that delivers a VIP to this host's stack, deleted on drop.
#[derive(Debug)]
pub struct LocalRoute {
    vip: Ipv4Addr,
}

impl LocalRoute {
    /// Route `vip` locally unless it is one of the host's addresses already (then `None`: that
    /// route is not ours to delete). `replace`, so a route a killed agent left behind is taken.
    pub fn add(vip: Ipv4Addr) -> Result<Option<Self>, ProxyError> {
        if vip.is_loopback() || host_has(vip) {
            return Ok(None);
        }
        ip_route("replace", vip)?;
        Ok(Some(LocalRoute { vip }))
    }
}

impl Drop for LocalRoute {
    fn drop(&mut self) {
        if let Err(error) = ip_route("del", self.vip) {
            warn!(%error, "removing the VIP's local route");
        }
    }
}

fn host_has(addr: Ipv4Addr) -> bool {
    nix::ifaddrs::getifaddrs().is_ok_and(|mut addrs| {
        addrs.any(|a| {
            a.address
                .and_then(|sa| sa.as_sockaddr_in().map(|sin| sin.ip()))
                == Some(addr)
        })
    })
}

fn ip_route(verb: &str, vip: Ipv4Addr) -> Result<(), ProxyError> {
    let args = [
        "route".to_owned(),
        verb.to_owned(),
        "local".to_owned(),
        format!("{vip}/32"),
        "dev".to_owned(),
        "lo".to_owned(),
        "table".to_owned(),
        "local".to_owned(),
    ];
    let error = |message: String| ProxyError::Route {
        args: args.join(" "),
        message,
    };
    let output = std::process::Command::new("ip")
        .args(&args)
        .output()
        .map_err(|e| error(e.to_string()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(error(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ))
    }
}

/// `GET /v1/proxy`: every listening service's counters.
pub fn router(gates: Vec<Arc<Gate>>) -> axum::Router {
    let gates: Arc<[Arc<Gate>]> = gates.into();
    axum::Router::new().route(
        "/v1/proxy",
        axum::routing::get(move || {
            let stats: Vec<ProxyStats> = gates.iter().map(|gate| gate.stats()).collect();
            async move { axum::Json(stats) }
        }),
    )
}

/// Bind `address` (with `IP_FREEBIND`, see the module doc).
pub fn listen(config: &ProxyConfig) -> Result<TcpListener, ProxyError> {
    let error = |source| ProxyError::Listen {
        service: config.service.clone(),
        address: config.address,
        source,
    };
    let socket = TcpSocket::new_v4().map_err(error)?;
    socket.set_reuseaddr(true).map_err(error)?;
    nix::sys::socket::setsockopt(
        &socket.as_fd(),
        nix::sys::socket::sockopt::IpFreebind,
        &true,
    )
    .map_err(|errno| error(errno.into()))?;
    socket.bind(SocketAddr::V4(config.address)).map_err(error)?;
    socket.listen(BACKLOG).map_err(error)
}

/// Accept on `listener` until the task is dropped; each connection runs in `connections`, which
/// the caller aborts on shutdown.
pub async fn serve(gate: Arc<Gate>, listener: TcpListener) {
    let span = info_span!("proxy", service = %gate.config.service, address = %gate.config.address, mode = ?gate.config.mode);
    async move {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((client, SocketAddr::V4(peer))) => {
                        gate.counters.accepted.fetch_add(1, Ordering::Relaxed);
                        let gate = Arc::clone(&gate);
                        connections.spawn(
                            async move {
                                if let Err(refusal) = proxy(&gate, client, *peer.ip()).await {
                                    gate.count(refusal);
                                    debug!(?refusal, "connection closed");
                                }
                            }
                            .instrument(info_span!("conn", client = %peer)),
                        );
                    }
                    // The listener is IPv4.
                    Ok((_, SocketAddr::V6(_))) => {}
                    Err(error) => {
                        warn!(%error, "accepting a connection");
                        // Out of descriptors, say: give the open ones time to end.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = connections.join_next() => {}
            }
        }
    }
    .instrument(span)
    .await;
}

/// Carry one client connection to a backend and back. Half-closes pass through: each direction
/// ends on its own EOF with a `shutdown(SHUT_WR)` towards the other side.
async fn proxy(gate: &Arc<Gate>, mut client: TcpStream, peer: Ipv4Addr) -> Result<(), Refusal> {
    let lease = gate.admit(peer).await?;
    let backend = TcpStream::connect(lease.address)
        .await
        .map_err(|_| Refusal::Connect)?;
    debug!(backend = %lease.address, id = lease.id, "proxying");
    let (mut client_rx, mut client_tx) = client.split();
    let (mut backend_rx, mut backend_tx) = backend.into_split();
    let up = async {
        tokio::io::copy(&mut client_rx, &mut backend_tx).await?;
        backend_tx.shutdown().await
    };
    let response_timeout = gate.config.response_timeout;
    let down = async {
        let mut first = [0u8; 4096];
        let n = tokio::time::timeout(response_timeout, backend_rx.read(&mut first))
            .await
            .map_err(|_| Ended::ResponseTimeout)??;
        client_tx.write_all(&first[..n]).await?;
        if n > 0 {
            tokio::io::copy(&mut backend_rx, &mut client_tx).await?;
        }
        client_tx.shutdown().await?;
        Ok::<(), Ended>(())
    };
    match tokio::try_join!(async { up.await.map_err(Ended::Io) }, down) {
        Ok(((), ())) => Ok(()),
        Err(Ended::ResponseTimeout) => Err(Refusal::ResponseTimeout),
        // A peer reset: nothing more to carry.
        Err(Ended::Io(error)) => {
            debug!(%error, "connection ended");
            Ok(())
        }
    }
}

enum Ended {
    Io(std::io::Error),
    ResponseTimeout,
}

impl From<std::io::Error> for Ended {
    fn from(error: std::io::Error) -> Self {
        Ended::Io(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProxyMode;
    use crate::table::Route;
    use lb_common::{backend_state, policy};
    use tokio::time::Instant;

    fn config(queue_size: usize, cap: u32) -> ProxyConfig {
        ProxyConfig {
            service: "chat".to_owned(),
            address: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 80),
            mode: ProxyMode::L4,
            max_connections_per_backend: cap,
            queue_size,
            queue_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(10),
        }
    }

    /// Round robin over `n` active backends 10.0.1.<slot+1>:80.
    fn routes(n: u32) -> Routes {
        let backends = (0..n)
            .map(|slot| {
                let view = BackendView {
                    state: backend_state::ACTIVE,
                    weight: 1,
                    ..BackendView::default()
                };
                let ip = Ipv4Addr::new(10, 0, 1, (slot + 1) as u8);
                (view, SocketAddrV4::new(ip, 80))
            })
            .collect();
        Arc::new(vec![Route {
            id: 0,
            policy: policy::ROUND_ROBIN,
            backend_count: n,
            ring: (0..n).collect(),
            maglev: Vec::new(),
            backends,
        }])
    }

    fn gate(
        queue_size: usize,
        cap: u32,
        n: u32,
    ) -> (Arc<Gate>, Arc<ConnCounts>, watch::Sender<Routes>) {
        let counts = Arc::new(ConnCounts::anonymous(64).expect("anonymous counters"));
        let (tx, rx) = watch::channel(routes(n));
        let gate = Gate::new(config(queue_size, cap), 0, Arc::clone(&counts), rx);
        (gate, counts, tx)
    }

    fn client() -> Ipv4Addr {
        Ipv4Addr::new(10, 9, 9, 9)
    }

    #[tokio::test(start_paused = true)]
    async fn claims_by_policy_up_to_the_cap_and_counts_in_the_shared_array() {
        let (gate, counts, _routes) = gate(0, 1, 2);
        let a = gate.admit(client()).await.expect("room on backend 0");
        let b = gate.admit(client()).await.expect("room on backend 1");
        assert_eq!((a.id, b.id), (0, 1));
        assert_eq!(b.address, "10.0.1.2:80".parse().expect("address"));
        assert_eq!((counts.get(0), counts.get(1)), (1, 1));
        assert_eq!(gate.admit(client()).await.err(), Some(Refusal::QueueFull));
        drop(a);
        assert_eq!(counts.get(0), 0, "released on drop");
        assert_eq!(gate.stats().queue_full, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_in_order_as_soon_as_a_lease_is_dropped() {
        let (gate, _counts, _routes) = gate(8, 1, 1);
        let first = gate.admit(client()).await.expect("room");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for n in 0..3 {
            let (gate, tx) = (Arc::clone(&gate), tx.clone());
            tokio::spawn(async move {
                let lease = gate.admit(client()).await;
                let _ = tx.send((n, Instant::now(), lease));
            });
            // Queue them in a known order.
            tokio::task::yield_now().await;
        }
        assert_eq!(gate.stats().queue_depth, 3);
        let mut held = first;
        for expected in 0..3 {
            let released = Instant::now();
            drop(held);
            let (n, at, lease) = rx.recv().await.expect("a waiter got through");
            assert_eq!(n, expected, "FIFO");
            assert_eq!(at, released, "woken by the release, not a tick");
            held = lease.expect("served");
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(gate.stats().queued, 3);
        assert_eq!(gate.stats().queue_depth, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_times_out_and_leaves_the_queue() {
        let (gate, _counts, _routes) = gate(1, 1, 1);
        let _held = gate.admit(client()).await.expect("room");
        let started = Instant::now();
        let waiter = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move { gate.admit(client()).await.map(|lease| lease.id) }
        });
        tokio::task::yield_now().await;
        assert_eq!(
            gate.admit(client()).await.err(),
            Some(Refusal::QueueFull),
            "queue_size 1 is taken"
        );
        assert_eq!(
            waiter.await.expect("waiter task"),
            Err(Refusal::QueueTimeout)
        );
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        let stats = gate.stats();
        assert_eq!((stats.queue_timeout, stats.queue_depth), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn room_freed_outside_the_proxy_is_found_by_the_tick_and_new_backends_at_once() {
        let (gate, counts, routes_tx) = gate(4, 1, 1);
        // A kernel flow holds backend 0.
        assert!(counts.acquire(0, 1));
        let started = Instant::now();
        let waiter = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move { gate.admit(client()).await.map(|lease| lease.id) }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(counts.release(0), "the kernel's flow ends");
        assert_eq!(waiter.await.expect("waiter"), Ok(0));
        assert!(started.elapsed() <= Duration::from_secs(1) + KERNEL_RELEASE_TICK);

        assert!(counts.acquire(0, 1));
        let waiter = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move { gate.admit(client()).await.map(|lease| lease.id) }
        });
        tokio::task::yield_now().await;
        let added = Instant::now();
        routes_tx.send_replace(routes(2));
        assert_eq!(waiter.await.expect("waiter"), Ok(1));
        assert_eq!(
            added.elapsed(),
            Duration::ZERO,
            "a table change wakes at once"
        );
    }
}
