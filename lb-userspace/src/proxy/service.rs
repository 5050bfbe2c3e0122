//! The userspace proxy of one service: its client connections and the [`Gate`] of each of its
//! model pools. A request is counted here until it has a pool (a body too large, a model no
//! pool has), then by its pool's gate; the service's figures are the sums.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;
use tokio::sync::watch;

use super::access::{RequestMetrics, Series, SeriesKey};
use super::gate::{Carried, Gate, PoolStats, Refusal, Retry, WAIT_BUCKETS};
use crate::dataplane::conns::ConnCounts;
use crate::limits::{Connections, Registered};
use crate::requests::RequestCounts;
use crate::spec::{PoolSpec, ProxyMode, ProxySpec, ServiceSpec};
use crate::table::Routes;

#[derive(Debug)]
pub struct ServiceProxy {
    name: String,
    address: SocketAddrV4,
    config: ProxySpec,
    /// `[[service.pool]]`, in config order; empty: one pool over every backend.
    specs: Vec<PoolSpec>,
    /// By pool, like `specs` (or the one pool).
    gates: Vec<Arc<Gate>>,
    /// The gate of `default_model`'s pool (or the one pool).
    default: Arc<Gate>,
    /// The client connections held, at most `max_client_connections`.
    connections: Arc<Connections>,
    /// Counted across reloads, like `connections`, `wait` and `requests`: a reloaded proxy
    /// takes them over.
    accepted: Arc<AtomicU64>,
    /// Refusals before a pool was chosen, indexed like [`Refusal::ALL`].
    refused: Arc<[AtomicU64; Refusal::ALL.len()]>,
    /// Every pool's queue waits.
    wait: Histogram,
    /// http: each request's latency, status and tokens, by model and backend.
    requests: Arc<RequestMetrics>,
}

/// The counters of one service at one moment: its own and its pools' summed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProxyStats {
    pub service: String,
    pub address: SocketAddrV4,
    pub mode: ProxyMode,
    /// Client connections accepted.
    pub accepted: u64,
    /// Connections (l4) or requests (http) that got a backend.
    pub admitted: u64,
    /// Of those and the ones that timed out: how many had to wait for room.
    pub queued: u64,
    pub queue_depth: u64,
    /// By [`Retry::name`].
    pub retried: BTreeMap<&'static str, u64>,
    /// Client connections open now.
    pub open_connections: u64,
    /// Quiet client connections closed to make room at `max_client_connections`.
    pub evicted: u64,
    /// By [`Refusal::name`].
    #[serde(flatten)]
    pub refused: BTreeMap<&'static str, u64>,
    /// Each pool's own, for a service with `[[service.pool]]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolStats>,
}

/// A request's `model` that no pool answers to.
#[derive(Debug, PartialEq, Eq)]
pub struct UnknownModel;

impl ServiceProxy {
    /// `id` is the service's index in the routes.
    pub fn new(
        service: &ServiceSpec,
        id: usize,
        counts: &Arc<ConnCounts>,
        requests: Arc<RequestCounts>,
        routes: &watch::Receiver<Routes>,
    ) -> Arc<Self> {
        Self::build(service, id, counts, requests, routes, None)
    }

    /// The proxy of `service` as a reload changed it, taking over this one's client
    /// connections, counters and, pool by pool (matched by model), its gates' counters. The
    /// requests this one admitted or queued finish here; new ones go to the new proxy.
    pub fn reconfigured(
        &self,
        service: &ServiceSpec,
        counts: &Arc<ConnCounts>,
        requests: Arc<RequestCounts>,
        routes: &watch::Receiver<Routes>,
    ) -> Arc<Self> {
        self.connections
            .set_max(service.proxy.max_client_connections);
        let id = self.default.service_id();
        Self::build(service, id, counts, requests, routes, Some(self))
    }

    fn build(
        service: &ServiceSpec,
        id: usize,
        counts: &Arc<ConnCounts>,
        requests: Arc<RequestCounts>,
        routes: &watch::Receiver<Routes>,
        previous: Option<&ServiceProxy>,
    ) -> Arc<Self> {
        let wait = previous.map_or_else(|| Histogram::new(WAIT_BUCKETS), |p| p.wait.clone());
        let model = |pool: usize| service.pools.get(pool).map(|p| p.model.as_str());
        let gates: Vec<Arc<Gate>> = (0..service.pools.len().max(1))
            .map(|pool| {
                let (counts, routes) = (Arc::clone(counts), routes.clone());
                let requests = Arc::clone(&requests);
                let old = previous.and_then(|p| p.gates.iter().find(|g| g.model() == model(pool)));
                let carried = match old {
                    Some(old) => Carried::from(old, wait.clone()),
                    None => Carried::fresh(wait.clone()),
                };
                Gate::new(service, pool, id, counts, requests, routes, carried)
            })
            .collect();
        // There is at least one gate, and the config names an existing pool.
        let default = Arc::clone(&gates[service.default_pool.min(gates.len() - 1)]);
        Arc::new(ServiceProxy {
            name: service.name.clone(),
            address: service.address,
            config: service.proxy.clone(),
            specs: service.pools.clone(),
            gates,
            default,
            connections: previous.map_or_else(
                || Connections::new(service.proxy.max_client_connections),
                |p| Arc::clone(&p.connections),
            ),
            accepted: previous.map_or_else(Arc::default, |p| Arc::clone(&p.accepted)),
            refused: previous.map_or_else(Arc::default, |p| Arc::clone(&p.refused)),
            wait,
            requests: previous.map_or_else(Arc::default, |p| Arc::clone(&p.requests)),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where its listener is.
    pub fn address(&self) -> SocketAddrV4 {
        self.address
    }

    pub fn config(&self) -> &ProxySpec {
        &self.config
    }

    /// Whether requests are routed by their `model` (the service has `[[service.pool]]`).
    pub fn routes_by_model(&self) -> bool {
        !self.specs.is_empty()
    }

    /// The gate of the pool named `model` (a model or an alias), or of the default pool for a
    /// request without one or when the service has no pools.
    pub fn pool(&self, model: Option<&str>) -> Result<&Arc<Gate>, UnknownModel> {
        match model {
            Some(model) if self.routes_by_model() => self
                .specs
                .iter()
                .zip(&self.gates)
                .find(|(pool, _)| pool.names().any(|name| name == model))
                .map(|(_, gate)| gate)
                .ok_or(UnknownModel),
            _ => Ok(&self.default),
        }
    }

    /// The default pool's gate: the only one of a service without pools (every l4 service).
    pub fn default_gate(&self) -> &Arc<Gate> {
        &self.default
    }

    /// The pools' models, in config order.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.specs.iter().map(|pool| pool.model.as_str())
    }

    /// The pools with at least one healthy, active backend now.
    pub fn available(&self) -> impl Iterator<Item = &PoolSpec> {
        self.specs
            .iter()
            .zip(&self.gates)
            .filter(|(_, gate)| gate.has_active_backend())
            .map(|(spec, _)| spec)
    }

    /// A client connection accepted: registered among the ones held, or `None` (counted as a
    /// refusal) when `max_client_connections` are held, each with something in flight; the
    /// caller then closes it at once.
    pub fn accept_client(&self) -> Option<Registered> {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        let registered = self.connections.register();
        if registered.is_none() {
            self.count(Refusal::ConnectionLimit);
        }
        registered
    }

    /// Count a refusal made before a pool was chosen.
    pub fn count(&self, refusal: Refusal) {
        // `ALL` lists them in declaration order.
        self.refused[refusal as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> ProxyStats {
        let pools: Vec<PoolStats> = self.gates.iter().map(|gate| gate.stats()).collect();
        let sum = |field: fn(&PoolStats) -> u64| pools.iter().map(field).sum::<u64>();
        let connections = self.connections.stats();
        let refused = Refusal::ALL
            .iter()
            .zip(self.refused.iter())
            .map(|(r, n)| {
                let in_pools: u64 = pools.iter().filter_map(|p| p.refused.get(r.name())).sum();
                (r.name(), n.load(Ordering::Relaxed) + in_pools)
            })
            .collect();
        ProxyStats {
            service: self.name.clone(),
            address: self.address,
            mode: self.config.mode,
            accepted: self.accepted.load(Ordering::Relaxed),
            admitted: sum(|p| p.admitted),
            queued: sum(|p| p.queued),
            queue_depth: sum(|p| p.queue_depth),
            retried: Retry::ALL
                .iter()
                .map(|r| {
                    let n = pools.iter().filter_map(|p| p.retried.get(r.name())).sum();
                    (r.name(), n)
                })
                .collect(),
            open_connections: connections.open,
            evicted: connections.evicted,
            refused,
            pools: if self.routes_by_model() {
                pools
            } else {
                Vec::new()
            },
        }
    }

    /// http: its request series, by model and backend.
    pub fn request_metrics(&self) -> &Arc<RequestMetrics> {
        &self.requests
    }

    /// Its request series now; those of backends it no longer has are forgotten, so backends
    /// that come and go leave no series behind.
    pub fn request_series(&self) -> Vec<(SeriesKey, Series)> {
        self.requests
            .retain_backends(&self.default.backend_addresses());
        self.requests.snapshot()
    }

    /// The service's queue wait histogram (every pool's waits).
    pub fn wait_histogram(&self) -> Histogram {
        self.wait.clone()
    }

    /// Each pool's model and queue wait histogram, for a service with pools.
    pub fn pool_wait_histograms(&self) -> Vec<(String, Histogram)> {
        self.specs
            .iter()
            .zip(&self.gates)
            .map(|(spec, gate)| (spec.model.clone(), gate.wait_histogram()))
            .collect()
    }
}
