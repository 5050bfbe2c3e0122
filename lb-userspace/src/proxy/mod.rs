//! The userspace path: a TCP listener on each service address for what XDP does not steer
//! (loopback clients, SYNs passed because every backend was full, everything with
//! `--dataplane userspace`). Each connection (http: each request) is admitted by the [`Gate`] of
//! one of the service's pools ([`ServiceProxy`]), then carried by [`l4`] or [`http`].
//!
//! `mode = "l4"` carries each connection whole to one backend; `mode = "http"` parses HTTP/1.1
//! and admits each request on its own through the gate of the pool its `model` names. The kernel never steers an
//! http service (see [`crate::spec::ServiceSpec::kernel_steers`]), so all its connections reach
//! the listener.
//!
//! The listener binds with `IP_FREEBIND`, so a VIP that is not (yet) a local address can be
//! bound without privileges; for other hosts' SYNs to reach it, the agent, when root, makes the
//! VIP local with a [`LocalRoute`]. Loopback VIPs (127.0.0.0/8) work as they are.

mod access;
mod drain;
mod gate;
mod http;
mod l4;
mod route;
mod service;
pub mod splice;
mod timings;

use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

pub use access::{RequestMetrics, Series, SeriesKey};
pub use drain::drain_started;
pub use gate::{Gate, PoolStats};
pub use route::{LocalRoute, RouteError};
pub use service::{ProxyStats, ServiceProxy};

use crate::spec::{ProxyMode, ServiceSpec};

/// Pending connections the kernel keeps per listener.
const BACKLOG: u32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("listening on {address} for service `{service}`: {source}")]
    Listen {
        service: String,
        address: SocketAddrV4,
        #[source]
        source: std::io::Error,
    },
}

/// Bind `address` (with `IP_FREEBIND`, see the module doc).
pub fn listen(service: &ServiceSpec) -> Result<TcpListener, ProxyError> {
    let error = |source| ProxyError::Listen {
        service: service.name.clone(),
        address: service.address,
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
    socket
        .bind(SocketAddr::V4(service.address))
        .map_err(error)?;
    socket.listen(BACKLOG).map_err(error)
}

/// Accept on `listener` until `draining` turns true, then close it and return once the open
/// connections have ended (http: each after the request in flight, if any); the caller aborts
/// the task to cut them. Each connection (http: each request) is served by the proxy `current`
/// holds when it arrives: a reload replaces it, and what the old one admitted finishes there.
pub async fn serve(
    current: watch::Receiver<Arc<ServiceProxy>>,
    listener: TcpListener,
    draining: watch::Receiver<bool>,
) {
    let first = Arc::clone(&current.borrow());
    let span = info_span!("proxy", service = %first.name(), address = %first.address(), mode = ?first.config().mode);
    drop(first);
    let pool = Arc::new(http::Pool::default());
    async move {
        let mut connections = JoinSet::new();
        let mut stop = draining.clone();
        loop {
            tokio::select! {
                () = drain_started(&mut stop) => break,
                accepted = listener.accept() => match accepted {
                    Ok((client, SocketAddr::V4(peer))) => {
                        let service = Arc::clone(&current.borrow());
                        let Some(registered) = service.accept_client() else {
                            debug!(client = %peer, "max_client_connections reached");
                            continue;
                        };
                        let span = info_span!("conn", client = %peer);
                        match service.config().mode {
                            ProxyMode::L4 => {
                                // An l4 service has no pools: its one gate is over every backend.
                                let gate = Arc::clone(service.default_gate());
                                connections.spawn(
                                    async move {
                                        let proxied = l4::serve_connection(&gate, client, *peer.ip(), &registered);
                                        if let Err(refusal) = proxied.await {
                                            gate.count(refusal);
                                            debug!(?refusal, "connection closed");
                                        }
                                    }
                                    .instrument(span),
                                )
                            }
                            ProxyMode::Http => connections.spawn(
                                http::serve_connection(
                                    current.clone(),
                                    Arc::clone(&pool),
                                    client,
                                    *peer.ip(),
                                    registered,
                                    draining.clone(),
                                )
                                .instrument(span),
                            ),
                        };
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
        drop(listener);
        let open = connections.len();
        info!(
            open,
            "draining: no new connections; waiting for the open ones"
        );
        let started = tokio::time::Instant::now();
        while connections.join_next().await.is_some() {}
        info!(open, waited = ?started.elapsed(), "drained");
    }
    .instrument(span)
    .await;
}
