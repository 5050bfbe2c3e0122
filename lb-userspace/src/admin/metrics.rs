//! `GET /metrics`: backends, services, userspace proxies and supervised instances in the
//! Prometheus text format (0.0.4), encoded by `prometheus-client`.
//!
//! Nothing is kept between scrapes: each one takes a table snapshot with the kernel's counters
//! read for it ([`TableHandle::fresh_snapshot`]), every proxy's counters and wait histogram
//! (kept by its gate) and every instance's status and encodes them, so values are as fresh as
//! the kernel's counters. Backend counters count from the moment the backend got its id (the
//! table rebases them), so a backend removed and added again at the same id starts its series
//! over from zero, which Prometheus reads as a counter reset; service counters run for as long
//! as the agent's maps live.
//!
//! Per-backend series come from [`BackendInfo`]: a new per-backend value (idle and busy slots,
//! say) is a field there and one more [`family`] call in [`backends`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabel, EncodeLabelSet, EncodeMetric, LabelSetEncoder, prometheus_text,
};
use prometheus_client::metrics::TypedMetric;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tracing::warn;

use super::ApiError;
use crate::limits::{ConnectionStats, Connections};
use crate::proxy::{ProxyStats, Series, SeriesKey};
use crate::supervisor::{Outcome, State as InstanceState, Status};
use crate::table::{
    BackendInfo, BackendState, BackendStatus, ServiceCounters, ServiceInfo, Snapshot, TableHandle,
};

/// What `/metrics` reads from: the agent's table and userspace proxies (none under
/// `steer supervise`) and instances.
#[derive(Clone)]
pub struct MetricSources {
    pub table: Option<TableHandle>,
    pub running: super::Live,
    /// The admin API's client connections.
    pub admin: Arc<Connections>,
    #[cfg(feature = "etcd")]
    pub fleet: Option<crate::fleet::FleetApi>,
}

/// `GET /metrics`: the series of what there is (no table and no proxies under
/// `steer supervise`). Reads need no token.
pub fn router(sources: MetricSources) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(sources)
}

#[derive(Debug, thiserror::Error)]
#[error("encoding the metrics: {0}")]
struct EncodeError(#[from] fmt::Error);

impl From<EncodeError> for ApiError {
    fn from(err: EncodeError) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())
    }
}

async fn scrape(State(sources): State<MetricSources>) -> Result<impl IntoResponse, ApiError> {
    let snapshot = match &sources.table {
        Some(table) => Some(table.fresh_snapshot().await?),
        None => None,
    };
    let running = Arc::clone(&sources.running.borrow());
    let mut instances = Vec::with_capacity(running.instances.len());
    for instance in &running.instances {
        match instance.status().await {
            Ok(status) => instances.push(status),
            // Stopped by a reload between the list and the ask: no longer there.
            Err(crate::supervisor::InstanceError::Stopped(_)) => {}
            Err(error) => return Err(error.into()),
        }
    }
    let proxies = running
        .proxies
        .iter()
        .map(|proxy| ProxyScrape {
            stats: proxy.stats(),
            wait: proxy.wait_histogram(),
            pool_waits: proxy.pool_wait_histograms(),
            requests: proxy.request_series(),
        })
        .collect();
    let text = Scrape {
        snapshot,
        instances,
        proxies,
        admin: sources.admin.stats(),
        #[cfg(feature = "etcd")]
        fleet: sources
            .fleet
            .as_ref()
            .map(|f| (f.report(), f.lease_renewals())),
    }
    .render()
    .inspect_err(|err| warn!(%err, "/metrics not served"))?;
    Ok((
        [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
        text,
    ))
}

/// One scrape's values.
#[derive(Debug)]
struct Scrape {
    snapshot: Option<Arc<Snapshot>>,
    instances: Vec<Status>,
    proxies: Vec<ProxyScrape>,
    admin: ConnectionStats,
    /// The fleet's report and lease renewals so far.
    #[cfg(feature = "etcd")]
    fleet: Option<(crate::fleet::FleetReport, u64)>,
}

/// A proxy's counters and queue wait histograms: the service's and, with pools, each pool's
/// (by model, in the order of `stats.pools`).
#[derive(Debug)]
struct ProxyScrape {
    stats: ProxyStats,
    wait: Histogram,
    pool_waits: Vec<(String, Histogram)>,
    requests: Vec<(SeriesKey, Series)>,
}

impl Scrape {
    fn render(self) -> Result<String, EncodeError> {
        let llama = self
            .snapshot
            .as_ref()
            .map(|snapshot| llama_series(&snapshot.backends))
            .unwrap_or_default();
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut text = String::new();
        prometheus_text::encode(&mut text, &registry)?;
        text.push_str(&llama);
        Ok(text)
    }
}

/// llama-server's own series (`llamacpp:*`) from each backend's last `/metrics` poll, as
/// `llamacpp_*`: a colon is for recording rules (promtool refuses it in an exposition), so each
/// name has `_` for it. Every sample is labelled with the backend's `service`, `backend` and
/// `model` (its first; empty while none is known), and grouped into one family each with one
/// HELP and TYPE, as the text format wants; a "counter" whose name has no `_total`
/// (`n_tokens_max`, a high-water mark) is a gauge. Lines of other names, and lines that are not
/// samples, are left out.
fn llama_series(backends: &[BackendInfo]) -> String {
    #[derive(Default)]
    struct Family {
        help: Option<String>,
        kind: Option<String>,
        samples: Vec<String>,
    }
    // The exported name of one of llama-server's.
    let exported = |name: &str| {
        let rest = name.strip_prefix("llamacpp:")?;
        rest.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_')
            .then(|| format!("llamacpp_{rest}"))
    };
    fn family<'a>(families: &'a mut Vec<(String, Family)>, name: &str) -> &'a mut Family {
        let at = match families.iter().position(|(n, _)| n == name) {
            Some(at) => at,
            None => {
                families.push((name.to_owned(), Family::default()));
                families.len() - 1
            }
        };
        &mut families[at].1
    }
    // In the order first seen.
    let mut families: Vec<(String, Family)> = Vec::new();
    for backend in backends {
        let Some(text) = &backend.llama_metrics else {
            continue;
        };
        let model = backend.models.first().map_or("", String::as_str);
        let labels = format!(
            "service=\"{}\",backend=\"{}\",model=\"{}\"",
            escape_label(&backend.service),
            backend.address,
            escape_label(model)
        );
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                if let Some(name) = exported(name) {
                    let family = family(&mut families, &name);
                    family.help.get_or_insert_with(|| help.to_owned());
                }
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
                if let Some(name) = exported(name) {
                    let kind = match kind {
                        "counter" if !name.ends_with("_total") => "gauge",
                        kind => kind,
                    };
                    let family = family(&mut families, &name);
                    family.kind.get_or_insert_with(|| kind.to_owned());
                }
            } else if !line.is_empty() && !line.starts_with('#') {
                let end = line.find(['{', ' ']).unwrap_or(line.len());
                let (name, rest) = line.split_at(end);
                let Some(name) = exported(name).filter(|_| !rest.is_empty()) else {
                    continue;
                };
                let sample = match rest.strip_prefix('{') {
                    Some(inner) if inner.starts_with('}') => format!("{name}{{{labels}{inner}"),
                    Some(inner) => format!("{name}{{{labels},{inner}"),
                    None => format!("{name}{{{labels}}}{rest}"),
                };
                family(&mut families, &name).samples.push(sample);
            }
        }
    }
    let mut text = String::new();
    for (name, family) in families.iter().filter(|(_, f)| !f.samples.is_empty()) {
        if let Some(help) = &family.help {
            text += &format!("# HELP {name} {help}\n");
        }
        if let Some(kind) = &family.kind {
            text += &format!("# TYPE {name} {kind}\n");
        }
        for sample in &family.samples {
            text += sample;
            text.push('\n');
        }
    }
    text
}

/// A label value as the text format writes it.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        admin(&mut encoder, self.admin)?;
        #[cfg(feature = "etcd")]
        if let Some((report, renewals)) = &self.fleet {
            fleet(&mut encoder, report, *renewals)?;
        }
        if let Some(snapshot) = &self.snapshot {
            backends(&mut encoder, &snapshot.backends)?;
            services(&mut encoder, &snapshot.services)?;
        }
        if !self.proxies.is_empty() {
            proxies(&mut encoder, &self.proxies)?;
        }
        if self.instances.is_empty() {
            return Ok(());
        }
        instances(&mut encoder, &self.instances)
    }
}

/// The fleet's freshness and size: `steer_fleet_stale_seconds` is what an alert on a balancer
/// cut off from etcd (serving its last fleet) watches.
#[cfg(feature = "etcd")]
fn fleet(
    encoder: &mut DescriptorEncoder,
    report: &crate::fleet::FleetReport,
    renewals: u64,
) -> fmt::Result {
    // A family of one series without labels.
    fn one<M>(metric: M) -> [([(&'static str, String); 0], M); 1] {
        [([], metric)]
    }
    family(
        encoder,
        "steer_fleet_connected",
        "1 while the fleet watch is open and etcd answers the lease keep-alives: the fleet view is current",
        one(gauge(u64::from(report.connected))),
    )?;
    family(
        encoder,
        "steer_fleet_stale_seconds",
        "Seconds since the fleet view was last known current (etcd answered while watched)",
        one(ConstGauge::new(report.stale_seconds)),
    )?;
    family(
        encoder,
        "steer_fleet_revision",
        "The etcd revision the fleet view is current to",
        one(gauge(report.revision.max(0) as u64)),
    )?;
    family(
        encoder,
        "steer_fleet_from_cache",
        "1 while the fleet view came from the local cache and etcd has not answered since",
        one(gauge(u64::from(report.from_cache))),
    )?;
    family(
        encoder,
        "steer_fleet_registered",
        "1 while this agent's registration lease is live",
        one(gauge(u64::from(report.registered))),
    )?;
    family(
        encoder,
        "steer_fleet_hosts",
        "Hosts registered in the fleet view",
        one(gauge(report.hosts.len() as u64)),
    )?;
    family(
        encoder,
        "steer_fleet_instances",
        "Instance records in the fleet view, every host's",
        one(gauge(report.instances.len() as u64)),
    )?;
    family(
        encoder,
        "steer_fleet_backends",
        "Backends the fleet put in this agent's services (other hosts' serving instances)",
        one(gauge(report.backends as u64)),
    )?;
    family(
        encoder,
        "steer_fleet_skipped_keys",
        "Fleet keys or values that could not be read and were skipped",
        one(counter(report.skipped_keys)),
    )?;
    family(
        encoder,
        "steer_fleet_lease_renewals",
        "Keep-alives of the registration lease etcd answered",
        one(counter(renewals)),
    )
}

/// One metric family: `name` (the encoder appends `_total` to counters) and its series.
fn family<L: EncodeLabelSet, M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, M::TYPE)?;
    for (labels, value) in series {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One counter series per reason of `counts`: `labels` and `reason`.
fn by_reason<'a, const N: usize>(
    labels: [(&'static str, String); N],
    counts: &'a BTreeMap<&'static str, u64>,
) -> impl Iterator<Item = (Vec<(&'static str, String)>, ConstCounter<u64>)> + 'a {
    counts.iter().map(move |(&reason, &n)| {
        let mut set = labels.to_vec();
        set.push(("reason", reason.to_owned()));
        (set, counter(n))
    })
}

fn counter(value: u64) -> ConstCounter<u64> {
    ConstCounter::new(value)
}

fn gauge(value: u64) -> ConstGauge<u64> {
    ConstGauge::new(value)
}

/// `service`, `backend` (its address) and `id`.
struct BackendLabels<'a>(&'a BackendInfo);

impl EncodeLabelSet for BackendLabels<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> fmt::Result {
        ("service", self.0.service.as_str()).encode(encoder.encode_label())?;
        ("backend", self.0.address.to_string()).encode(encoder.encode_label())?;
        ("id", self.0.id).encode(encoder.encode_label())
    }
}

/// Every state a listed backend can be in.
const STATES: [BackendState; 2] = [BackendState::Active, BackendState::Draining];

/// As the API spells it. A new state fails to compile here: add it to [`STATES`] as well.
fn state_label(state: BackendState) -> &'static str {
    match state {
        BackendState::Active => "active",
        BackendState::Draining => "draining",
    }
}

/// Every status a listed backend can have.
const STATUSES: [BackendStatus; 6] = [
    BackendStatus::Unknown,
    BackendStatus::Loading,
    BackendStatus::Healthy,
    BackendStatus::Unhealthy,
    BackendStatus::Draining,
    BackendStatus::Ejected,
];

/// As the API spells it. A new status fails to compile here: add it to [`STATUSES`] as well.
fn status_label(status: BackendStatus) -> &'static str {
    match status {
        BackendStatus::Unknown => "unknown",
        BackendStatus::Loading => "loading",
        BackendStatus::Healthy => "healthy",
        BackendStatus::Unhealthy => "unhealthy",
        BackendStatus::Draining => "draining",
        BackendStatus::Ejected => "ejected",
    }
}

fn per_backend<M>(
    backends: &[BackendInfo],
    value: impl Fn(&BackendInfo) -> M,
) -> impl Iterator<Item = (BackendLabels<'_>, M)> {
    backends.iter().map(move |b| (BackendLabels(b), value(b)))
}

fn backends(encoder: &mut DescriptorEncoder, backends: &[BackendInfo]) -> fmt::Result {
    family(
        encoder,
        "steer_backend_up",
        "1 when the backend takes new connections: active and healthy.",
        per_backend(backends, |b| {
            gauge(u64::from(b.state == BackendState::Active && b.healthy))
        }),
    )?;
    family(
        encoder,
        "steer_backend_state",
        "1 for the backend's current state (active: takes new flows; draining: keeps its flows, \
         takes no new ones).",
        backends.iter().flat_map(|b| {
            STATES.map(|state| {
                let labels = (BackendLabels(b), [("state", state_label(state))]);
                (labels, gauge(u64::from(b.state == state)))
            })
        }),
    )?;
    family(
        encoder,
        "steer_backend_status",
        "1 for the backend's current status (unknown: no check passed yet; loading: its model \
         loads; healthy: takes new connections; unhealthy; draining).",
        backends.iter().flat_map(|b| {
            STATUSES.map(|status| {
                let labels = (BackendLabels(b), [("status", status_label(status))]);
                (labels, gauge(u64::from(b.status == status)))
            })
        }),
    )?;
    family(
        encoder,
        "steer_backend_healthy",
        "1 while neither its health checks nor (for an instance) the supervisor say it is down.",
        per_backend(backends, |b| gauge(u64::from(b.healthy))),
    )?;
    family(
        encoder,
        "steer_backend_active_connections",
        "Connections the kernel counts as open to the backend.",
        per_backend(backends, |b| gauge(b.active_connections)),
    )?;
    family(
        encoder,
        "steer_backend_connections",
        "New connections (flows) steered to the backend since it got its id.",
        per_backend(backends, |b| counter(b.new_flows)),
    )?;
    // The kernel counts a flow's packets both ways in one per-backend counter.
    family(
        encoder,
        "steer_backend_packets",
        "Packets of the backend's flows, both directions (client to backend and replies).",
        per_backend(backends, |b| counter(b.packets)),
    )?;
    family(
        encoder,
        "steer_backend_bytes",
        "IP bytes (headers included) of the backend's flows, both directions.",
        per_backend(backends, |b| counter(b.bytes)),
    )?;
    family(
        encoder,
        "steer_backend_requests",
        "Requests the http proxy sent to the backend since it got its id, by what became of them \
         (class 2xx to 5xx: the status answered; unreachable: not connected, sent nowhere; \
         failed: no answer after sending).",
        backends.iter().flat_map(|b| {
            b.requests
                .requests
                .by_class
                .iter()
                .map(move |(&class, &n)| ((BackendLabels(b), [("class", class)]), counter(n)))
        }),
    )?;
    family(
        encoder,
        "steer_backend_requests_in_flight",
        "Requests the http proxy sent to the backend and is still passing the answer of.",
        per_backend(backends, |b| gauge(b.requests.requests.in_flight)),
    )?;
    family(
        encoder,
        "steer_backend_tokens",
        "Tokens in the backend's answers' llama.cpp timings, by kind (prompt: evaluated, cache \
         hits not counted; generated).",
        backends.iter().flat_map(|b| {
            let tokens = b.requests.tokens;
            [("prompt", tokens.prompt), ("generated", tokens.generated)]
                .map(|(kind, n)| ((BackendLabels(b), [("kind", kind)]), counter(n)))
        }),
    )?;
    // Only backends with a measured answer have these series.
    family(
        encoder,
        "steer_backend_decode_tokens_per_second",
        "Moving average of the backend's generation speed, from its answers' timings; the \
         proxy's choice weighs by it.",
        backends.iter().filter_map(|b| {
            let speed = b.requests.speed.backend.decode_tokens_per_second?;
            Some((BackendLabels(b), ConstGauge::new(speed)))
        }),
    )?;
    family(
        encoder,
        "steer_backend_prompt_tokens_per_second",
        "Moving average of the backend's prompt evaluation speed, from its answers' timings.",
        backends.iter().filter_map(|b| {
            let speed = b.requests.speed.backend.prompt_tokens_per_second?;
            Some((BackendLabels(b), ConstGauge::new(speed)))
        }),
    )?;
    family(
        encoder,
        "steer_backend_generated_tokens_per_answer",
        "Moving average of the tokens the backend's answers generate, from their timings; the \
         proxy times a wait for the backend by it.",
        backends.iter().filter_map(|b| {
            let tokens = b.requests.speed.backend.generated_tokens_per_answer?;
            Some((BackendLabels(b), ConstGauge::new(tokens)))
        }),
    )?;
    // Only backends whose llama.cpp slots were polled (policy slots) have these series.
    family(
        encoder,
        "steer_backend_slots",
        "llama.cpp slots of the backend at the last poll, by state (idle or busy).",
        backends.iter().flat_map(|b| {
            let (total, idle) = (b.total_slots.unwrap_or(0), b.idle_slots.unwrap_or(0));
            let polled = b.total_slots.is_some();
            [("idle", idle), ("busy", total.saturating_sub(idle))]
                .into_iter()
                .filter(move |_| polled)
                .map(move |(state, n)| {
                    ((BackendLabels(b), [("state", state)]), gauge(u64::from(n)))
                })
        }),
    )
}

type Counted = fn(&ServiceCounters) -> u64;

/// One counter per service, labelled `service`.
fn per_service(
    services: &[ServiceInfo],
    value: Counted,
) -> impl Iterator<Item = ([(&str, &str); 1], ConstCounter<u64>)> {
    services
        .iter()
        .map(move |s| ([("service", s.name.as_str())], counter(value(&s.counters))))
}

/// `N` counters per service, labelled `service` and `label` (one value per counter).
fn per_service_by<'a, const N: usize>(
    services: &'a [ServiceInfo],
    label: &'static str,
    values: [(&'static str, Counted); N],
) -> impl Iterator<Item = ([(&'static str, &'a str); 2], ConstCounter<u64>)> {
    services.iter().flat_map(move |s| {
        values.map(|(name, value)| {
            let labels = [("service", s.name.as_str()), (label, name)];
            (labels, counter(value(&s.counters)))
        })
    })
}

fn services(encoder: &mut DescriptorEncoder, services: &[ServiceInfo]) -> fmt::Result {
    family(
        encoder,
        "steer_service_new_flows",
        "New connections steered to a backend.",
        per_service(services, |c| c.new_flows),
    )?;
    family(
        encoder,
        "steer_service_no_backend",
        "New connections (SYNs) that found no active, healthy backend with room; passed to the \
         host stack.",
        per_service(services, |c| c.no_backend),
    )?;
    family(
        encoder,
        "steer_service_passed",
        "Packets to the service passed to the host stack untouched: no_route (no route or \
         neighbour for the next hop), no_snat_port (every source port towards the backend taken), \
         no_flow (not a SYN and no tracked flow).",
        per_service_by(
            services,
            "reason",
            [
                ("no_route", |c| c.no_route),
                ("no_snat_port", |c| c.no_snat_port),
                ("no_flow", |c| c.no_flow),
            ],
        ),
    )?;
    family(
        encoder,
        "steer_service_closed_flows",
        "Flows that ended with FIN or RST.",
        per_service(services, |c| c.closed_flows),
    )?;
    family(
        encoder,
        "steer_service_packets",
        "Packets steered: forward (client to backend) and reply (backend to client).",
        per_service_by(
            services,
            "direction",
            [
                ("forward", |c| c.fwd_packets),
                ("reply", |c| c.reply_packets),
            ],
        ),
    )?;
    family(
        encoder,
        "steer_service_bytes",
        "IP bytes (headers included) steered: forward (client to backend) and reply.",
        per_service_by(
            services,
            "direction",
            [("forward", |c| c.fwd_bytes), ("reply", |c| c.reply_bytes)],
        ),
    )
}

fn admin(encoder: &mut DescriptorEncoder, stats: ConnectionStats) -> fmt::Result {
    let none: [(&str, &str); 0] = [];
    family(
        encoder,
        "steer_admin_connections",
        "Admin API client connections open (at most agent.admin_max_connections).",
        [(none, gauge(stats.open))],
    )?;
    family(
        encoder,
        "steer_admin_connections_evicted",
        "Quiet admin API connections closed to make room for a new one at the cap.",
        [(none, counter(stats.evicted))],
    )?;
    family(
        encoder,
        "steer_admin_connections_refused",
        "Admin API connections closed at once: at the cap, each had a request in flight.",
        [(none, counter(stats.refused))],
    )
}

fn proxies(encoder: &mut DescriptorEncoder, proxies: &[ProxyScrape]) -> fmt::Result {
    let labels = |s: &ProxyStats| [("service", s.service.clone())];
    let stats = || proxies.iter().map(|p| (&p.stats, &p.wait));
    family(
        encoder,
        "steer_proxy_queue_depth",
        "Connections (l4) or requests (http) waiting in the userspace proxy's queue for room on a \
         backend.",
        stats().map(|(s, _)| (labels(s), gauge(s.queue_depth))),
    )?;
    family(
        encoder,
        "steer_proxy_admitted",
        "Connections (l4) or requests (http) given a backend by the userspace proxy (a retry on another backend counts again).",
        stats().map(|(s, _)| (labels(s), counter(s.admitted))),
    )?;
    family(
        encoder,
        "steer_proxy_queue_wait_seconds",
        "How long admitted connections or requests waited for room (0 when there was room).",
        stats().map(|(s, wait)| (labels(s), wait.clone())),
    )?;
    family(
        encoder,
        "steer_proxy_refused",
        "Connections (l4: closed) or requests (http: answered with an error) the userspace proxy \
         refused, by reason: queue_full (503), queue_timeout (504), first_byte_timeout (524), \
         idle_timeout (an answer cut: its body stalled), total_timeout (524, or an answer cut), \
         connect_failed (502 after the retries), bad_gateway (502), body_too_large (413), \
         bad_request (400: the body could not be read), body_timeout (408), connection_limit \
         (closed at once: max_client_connections open, each busy), client_timeout (closed: a \
         head not done within client_header_timeout; l4: no byte within client_idle_timeout), \
         model_not_found (404: a model no pool has), invalid_body (400: a body naming no string \
         model).",
        stats().flat_map(|(s, _)| by_reason(labels(s), &s.refused)),
    )?;
    family(
        encoder,
        "steer_proxy_client_connections",
        "Client connections the userspace proxy holds open (at most max_client_connections).",
        stats().map(|(s, _)| (labels(s), gauge(s.open_connections))),
    )?;
    family(
        encoder,
        "steer_proxy_evicted",
        "Quiet client connections (nothing in flight) closed to make room for a new one at \
         max_client_connections.",
        stats().map(|(s, _)| (labels(s), counter(s.evicted))),
    )?;
    family(
        encoder,
        "steer_proxy_retried",
        "http requests sent again to another backend, by reason: connect_failed (refused or \
         timed out), reset (closed before any byte of an answer), loading (llama.cpp's 503 \
         Loading model).",
        stats().flat_map(|(s, _)| by_reason(labels(s), &s.retried)),
    )?;
    pools(encoder, proxies)?;
    requests(encoder, proxies)
}

/// Which histogram of a [`Series`] a family encodes.
type SeriesHistogram = fn(&Series) -> &Histogram;

/// The http proxy's request series, by service, model (the pool's; empty: a service without
/// pools, or refused before a pool) and backend (empty: refused before one was chosen).
fn requests(encoder: &mut DescriptorEncoder, proxies: &[ProxyScrape]) -> fmt::Result {
    let series = || {
        proxies.iter().flat_map(|p| {
            p.requests.iter().map(|(key, series)| {
                let labels = [
                    ("service", p.stats.service.clone()),
                    ("model", key.model.clone()),
                    (
                        "backend",
                        key.backend.map(|b| b.to_string()).unwrap_or_default(),
                    ),
                ];
                (labels, series)
            })
        })
    };
    let histograms: [(&str, &str, SeriesHistogram); 4] = [
        (
            "steer_request_ttft_seconds",
            "Streamed http requests: from the request's arrival to the first piece of the \
             answer's body (the first token).",
            |s| &s.ttft,
        ),
        (
            "steer_request_time_per_output_token_seconds",
            "llama-server's decode time per generated token of each answer (its timings).",
            |s| &s.time_per_output_token,
        ),
        (
            "steer_request_duration_seconds",
            "http requests: from the request's arrival to the answer's end, or its refusal.",
            |s| &s.duration,
        ),
        (
            "steer_request_queue_wait_seconds",
            "http requests that got a backend: time in the queue, over every try.",
            |s| &s.queue_wait,
        ),
    ];
    for (name, help, histogram) in histograms {
        family(
            encoder,
            name,
            help,
            series().map(|(labels, s)| (labels, histogram(s).clone())),
        )?;
    }
    family(
        encoder,
        "steer_requests",
        "http requests by the status code the client got (a body cut short counts its head's).",
        series().flat_map(|([service, model, backend], s)| {
            s.by_status.iter().map(move |(code, &n)| {
                let labels = [
                    service.clone(),
                    model.clone(),
                    backend.clone(),
                    ("code", code.to_string()),
                ];
                (labels, counter(n))
            })
        }),
    )?;
    family(
        encoder,
        "steer_request_prompt_tokens",
        "Prompt tokens llama-server evaluated for the answers passed (timings.prompt_n).",
        series().map(|(labels, s)| (labels, counter(s.prompt_tokens))),
    )?;
    family(
        encoder,
        "steer_request_completion_tokens",
        "Tokens llama-server generated for the answers passed (timings.predicted_n).",
        series().map(|(labels, s)| (labels, counter(s.completion_tokens))),
    )
}

/// The per-pool series of services with `[[service.pool]]` (the service series above are their
/// sums).
fn pools(encoder: &mut DescriptorEncoder, proxies: &[ProxyScrape]) -> fmt::Result {
    let pools = || {
        proxies.iter().flat_map(|p| {
            p.stats
                .pools
                .iter()
                .zip(&p.pool_waits)
                .map(|(pool, (_, wait))| {
                    let model = pool.model.clone().unwrap_or_default();
                    (
                        [("service", p.stats.service.clone()), ("pool", model)],
                        pool,
                        wait,
                    )
                })
        })
    };
    family(
        encoder,
        "steer_proxy_pool_queue_depth",
        "Requests waiting in a model pool's queue for room on one of its backends.",
        pools().map(|(labels, p, _)| (labels, gauge(p.queue_depth))),
    )?;
    family(
        encoder,
        "steer_proxy_pool_admitted",
        "Requests given a backend of their model pool (a retry on another backend counts again).",
        pools().map(|(labels, p, _)| (labels, counter(p.admitted))),
    )?;
    family(
        encoder,
        "steer_proxy_pool_queue_wait_seconds",
        "How long a model pool's admitted requests waited for room (0 when there was room).",
        pools().map(|(labels, _, wait)| (labels, wait.clone())),
    )?;
    family(
        encoder,
        "steer_proxy_pool_refused",
        "Requests of a model pool the proxy refused after choosing the pool, by reason (see \
         steer_proxy_refused; model_not_found and invalid_body come before a pool, so only \
         there).",
        pools().flat_map(|(labels, p, _)| by_reason(labels, &p.refused)),
    )?;
    family(
        encoder,
        "steer_proxy_pool_retried",
        "Requests of a model pool sent again to another of its backends, by reason (see \
         steer_proxy_retried).",
        pools().flat_map(|(labels, p, _)| by_reason(labels, &p.retried)),
    )
}

fn instances(encoder: &mut DescriptorEncoder, instances: &[Status]) -> fmt::Result {
    // `name`, not `instance`: Prometheus sets `instance` on every scraped series itself.
    let labels = |status: &Status| [("name", status.name.clone())];
    family(
        encoder,
        "steer_instance_up",
        "1 while the instance's llama-server runs healthy with its applied arguments.",
        instances.iter().map(|s| {
            (
                labels(s),
                gauge(u64::from(s.state == InstanceState::Running)),
            )
        }),
    )?;
    family(
        encoder,
        "steer_instance_starts",
        "llama-server processes started, revivals and rollbacks included.",
        instances.iter().map(|s| (labels(s), counter(s.starts))),
    )?;
    family(
        encoder,
        "steer_instance_restarts",
        "Revivals of llama-server after it exited on its own.",
        instances.iter().map(|s| (labels(s), counter(s.revivals))),
    )?;
    family(
        encoder,
        "steer_instance_last_apply_success",
        "1 if the last argument change was applied, 0 if it was rejected; absent before the first.",
        instances.iter().filter_map(|s| {
            let applied = matches!(s.last_outcome.as_ref()?, Outcome::Applied { .. });
            Some((labels(s), gauge(u64::from(applied))))
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sources of an agent with `table`, no instances, proxies or fleet.
    fn test_sources(table: Option<TableHandle>) -> MetricSources {
        MetricSources {
            table,
            running: crate::admin::Running::default().fixed(),
            admin: Connections::new(8),
            #[cfg(feature = "etcd")]
            fleet: None,
        }
    }
    use crate::fake::FakeDataplane;
    use crate::spec::{BackendSpec, ServiceSpec, Weight};
    use crate::store::SavedArgs;
    use crate::supervisor::Rejection;
    use crate::table;
    use axum::body::Body;
    use axum::http::Request;
    use lb_common::{BackendStats, counter as kernel};
    use prometheus_parse::{Sample, Value};
    use tower::ServiceExt;

    fn services() -> Vec<ServiceSpec> {
        let backend = |address: &str| BackendSpec {
            address: address.parse().unwrap_or_else(|e| panic!("{address}: {e}")),
            weight: Weight::ONE,
            max_connections: 0,
            models: Vec::new(),
        };
        let backends = vec![backend("10.0.1.2:8080"), backend("10.0.1.3:8080")];
        vec![crate::fake::chat_service(backends, None)]
    }

    fn parse(text: &str) -> Vec<Sample> {
        let lines = text.lines().map(|line| Ok(line.to_owned()));
        prometheus_parse::Scrape::parse(lines)
            .unwrap_or_else(|e| panic!("{e}: {text}"))
            .samples
    }

    /// The value of the one sample of `name` whose labels include `labels`.
    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .collect();
        match found[..] {
            [sample] => match sample.value {
                Value::Counter(v) | Value::Gauge(v) => v,
                ref other => panic!("{name}{labels:?}: neither counter nor gauge: {other:?}"),
            },
            _ => panic!("{name}{labels:?}: {} samples, want 1", found.len()),
        }
    }

    async fn get_metrics(app: Router) -> (Option<String>, String) {
        let request = Request::get("/metrics")
            .body(Body::empty())
            .unwrap_or_else(|e| panic!("{e}"));
        let response = app.oneshot(request).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(response.status(), StatusCode::OK);
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        (content_type, String::from_utf8_lossy(&body).into_owned())
    }

    /// `promtool check metrics` on `text`, where promtool is installed (`cargo xtask deps` puts
    /// it there; under CI its absence fails the test).
    fn promtool_clean(text: &str) {
        use std::io::Write;
        let spawned = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(error) if std::env::var_os("CI").is_none() => {
                eprintln!(
                    "SKIPPED promtool check metrics: promtool not found ({error}); `cargo xtask deps` installs it"
                );
                return;
            }
            Err(error) => panic!("promtool (Debian prometheus) is needed under CI: {error}"),
        };
        child
            .stdin
            .take()
            .expect("a pipe")
            .write_all(text.as_bytes())
            .expect("promtool's stdin");
        let out = child.wait_with_output().expect("promtool ran");
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[tokio::test]
    async fn llama_servers_own_series_are_passed_on_per_backend_and_promtool_clean()
    -> Result<(), table::TableError> {
        const LLAMA_METRICS: &str = include_str!("../../fixtures/llama-server/metrics.txt");
        let fake = FakeDataplane::default();
        let (handle, _task) = table::start(fake, &services())?;
        let snapshot = handle.snapshot()?;
        for backend in &snapshot.backends {
            handle
                .set_metrics(backend.id, backend.address, LLAMA_METRICS.into())
                .await?;
        }
        handle
            .set_models(1, snapshot.backends[1].address, vec!["smol".to_owned()])
            .await?;
        let app = router(test_sources(Some(handle)));
        let (_, text) = get_metrics(app).await;
        let samples = parse(&text);
        for (backend, model) in [("10.0.1.2:8080", ""), ("10.0.1.3:8080", "smol")] {
            let labels = [("service", "chat"), ("backend", backend), ("model", model)];
            assert_eq!(
                value(&samples, "llamacpp_prompt_tokens_total", &labels),
                31.0
            );
            assert_eq!(
                value(&samples, "llamacpp_predicted_tokens_seconds", &labels),
                155.86
            );
        }
        assert_eq!(
            text.matches("# TYPE llamacpp_prompt_tokens_total counter\n")
                .count(),
            1,
            "one family for both backends"
        );
        assert!(
            text.contains("# TYPE llamacpp_n_tokens_max gauge\n"),
            "a high-water mark without _total is a gauge"
        );
        assert!(!text.contains("llamacpp:"), "no colon is exported");
        promtool_clean(&text);
        Ok(())
    }

    #[tokio::test]
    async fn backends_and_services_from_the_table() -> Result<(), table::TableError> {
        let fake = FakeDataplane::default();
        let (handle, _task) = table::start(fake.clone(), &services())?;
        {
            let mut maps = fake.maps();
            maps.stats.insert(
                1,
                BackendStats {
                    packets: 12,
                    bytes: 3400,
                    new_flows: 3,
                },
            );
            fake.set_connections(1, 2);
            let mut counters = [0; kernel::MAX as usize];
            for (i, c) in counters.iter_mut().enumerate() {
                *c = 100 + i as u64;
            }
            maps.counters.insert(0, counters);
        }
        handle.drain_backend(0).await?;
        // The http proxy's: one request in flight, one answered 503 after 120 tokens at 40/s
        // beside it (so the backend's speed is 80/s).
        let requests = handle.requests();
        let _in_flight = requests.begin(1);
        let answered = requests.begin(1);
        answered.answered(crate::requests::Class::ServerError);
        answered.measured(
            None,
            &crate::requests::Timings {
                prompt_n: 30,
                predicted_n: 120,
                predicted_per_second: 40.0,
                ..Default::default()
            },
        );
        drop(answered);
        let app = router(test_sources(Some(handle.clone())));

        let (content_type, text) = get_metrics(app.clone()).await;
        assert_eq!(content_type.as_deref(), Some(prometheus_text::CONTENT_TYPE));
        assert!(
            text.contains("# TYPE steer_backend_connections_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE steer_backend_up gauge\n"), "{text}");
        let samples = parse(&text);
        let b0 = [
            ("service", "chat"),
            ("backend", "10.0.1.2:8080"),
            ("id", "0"),
        ];
        let b1 = [
            ("service", "chat"),
            ("backend", "10.0.1.3:8080"),
            ("id", "1"),
        ];
        for (name, labels, want) in [
            ("steer_backend_up", &b0, 0.0),
            ("steer_backend_up", &b1, 1.0),
            ("steer_backend_healthy", &b0, 1.0),
            ("steer_backend_active_connections", &b1, 2.0),
            ("steer_backend_connections_total", &b1, 3.0),
            ("steer_backend_connections_total", &b0, 0.0),
            ("steer_backend_packets_total", &b1, 12.0),
            ("steer_backend_bytes_total", &b1, 3400.0),
            ("steer_backend_requests_in_flight", &b1, 1.0),
            ("steer_backend_decode_tokens_per_second", &b1, 80.0),
        ] {
            assert_eq!(value(&samples, name, labels), want, "{name}{labels:?}");
        }
        for (label, name, want) in [
            (("class", "5xx"), "steer_backend_requests_total", 1.0),
            (("class", "2xx"), "steer_backend_requests_total", 0.0),
            (("kind", "prompt"), "steer_backend_tokens_total", 30.0),
            (("kind", "generated"), "steer_backend_tokens_total", 120.0),
        ] {
            let mut labels = b1.to_vec();
            labels.push(label);
            assert_eq!(value(&samples, name, &labels), want, "{name}{labels:?}");
        }
        assert!(
            !text.contains(
                "steer_backend_decode_tokens_per_second{service=\"chat\",backend=\"10.0.1.2:8080\""
            ),
            "no series before a measurement: {text}"
        );
        for (labels, state, want) in [
            (&b0, "draining", 1.0),
            (&b0, "active", 0.0),
            (&b1, "active", 1.0),
            (&b1, "draining", 0.0),
        ] {
            let mut labels = labels.to_vec();
            labels.push(("state", state));
            assert_eq!(value(&samples, "steer_backend_state", &labels), want);
        }
        for (labels, status, want) in [
            (&b0, "draining", 1.0),
            (&b0, "healthy", 0.0),
            (&b1, "healthy", 1.0),
            (&b1, "unknown", 0.0),
            (&b1, "loading", 0.0),
        ] {
            let mut labels = labels.to_vec();
            labels.push(("status", status));
            assert_eq!(value(&samples, "steer_backend_status", &labels), want);
        }

        let chat = [("service", "chat")];
        let at = |i: u32| 100.0 + f64::from(i);
        for (name, labels, want) in [
            (
                "steer_service_new_flows_total",
                &chat[..],
                at(kernel::NEW_FLOWS),
            ),
            (
                "steer_service_no_backend_total",
                &chat,
                at(kernel::NO_BACKEND),
            ),
            (
                "steer_service_closed_flows_total",
                &chat,
                at(kernel::CLOSED_FLOWS),
            ),
            (
                "steer_service_passed_total",
                &[("service", "chat"), ("reason", "no_route")],
                at(kernel::NO_ROUTE),
            ),
            (
                "steer_service_passed_total",
                &[("reason", "no_snat_port")],
                at(kernel::NO_SNAT_PORT),
            ),
            (
                "steer_service_passed_total",
                &[("reason", "no_flow")],
                at(kernel::NO_FLOW),
            ),
            (
                "steer_service_packets_total",
                &[("direction", "forward")],
                at(kernel::FWD_PACKETS),
            ),
            (
                "steer_service_packets_total",
                &[("direction", "reply")],
                at(kernel::REPLY_PACKETS),
            ),
            (
                "steer_service_bytes_total",
                &[("direction", "forward")],
                at(kernel::FWD_BYTES),
            ),
            (
                "steer_service_bytes_total",
                &[("direction", "reply")],
                at(kernel::REPLY_BYTES),
            ),
        ] {
            assert_eq!(value(&samples, name, labels), want, "{name}{labels:?}");
        }
        assert!(
            !text.contains("steer_instance_"),
            "no instance families without instances"
        );

        // Removed and added again, the backend gets the same id and its counters start over.
        handle.remove_backend(1).await?;
        let again = Request::post("/v1/backends")
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", crate::admin::backends::tests::TEST_TOKEN),
            )
            .body(Body::from(
                r#"{"service":"chat","address":"10.0.1.3:8080"}"#,
            ))
            .unwrap_or_else(|e| panic!("{e}"));
        let added =
            crate::admin::backends::router(handle, crate::admin::backends::tests::test_token())
                .oneshot(again)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(added.status(), StatusCode::CREATED);
        let samples = parse(&get_metrics(app).await.1);
        assert_eq!(value(&samples, "steer_backend_connections_total", &b1), 0.0);
        assert_eq!(value(&samples, "steer_backend_packets_total", &b1), 0.0);
        Ok(())
    }

    fn status(name: &str, state: InstanceState, last_outcome: Option<Outcome>) -> Status {
        let args = SavedArgs {
            binary: "/opt/llama/llama-server".to_owned(),
            args: Default::default(),
        };
        Status {
            name: name.to_owned(),
            state,
            applied: args,
            applying: None,
            pending: None,
            pid: None,
            starts: 5,
            revivals: 3,
            last_outcome,
        }
    }

    #[test]
    fn instances_with_their_last_apply() -> Result<(), EncodeError> {
        let args = SavedArgs {
            binary: "/opt/llama/llama-server".to_owned(),
            args: Default::default(),
        };
        let applied = Outcome::Applied {
            args: args.clone(),
            pid: 42,
            persist_error: None,
        };
        let rejected = Outcome::Rejected(Rejection {
            args,
            error: "exited".to_owned(),
            exit_status: None,
            output_tail: Vec::new(),
            restored: true,
        });
        let text = Scrape {
            snapshot: None,
            instances: vec![
                status("a", InstanceState::Running, Some(applied)),
                status("b", InstanceState::Reviving, Some(rejected)),
                status("c", InstanceState::Down, None),
            ],
            proxies: Vec::new(),
            admin: ConnectionStats {
                open: 3,
                refused: 1,
                evicted: 2,
            },
            #[cfg(feature = "etcd")]
            fleet: None,
        }
        .render()?;
        let samples = parse(&text);
        for (name, instance, want) in [
            ("steer_instance_up", "a", 1.0),
            ("steer_instance_up", "b", 0.0),
            ("steer_instance_starts_total", "a", 5.0),
            ("steer_instance_restarts_total", "c", 3.0),
            ("steer_instance_last_apply_success", "a", 1.0),
            ("steer_instance_last_apply_success", "b", 0.0),
        ] {
            assert_eq!(
                value(&samples, name, &[("name", instance)]),
                want,
                "{name} {instance}"
            );
        }
        for (name, want) in [
            ("steer_admin_connections", 3.0),
            ("steer_admin_connections_refused_total", 1.0),
            ("steer_admin_connections_evicted_total", 2.0),
        ] {
            assert_eq!(value(&samples, name, &[]), want, "{name}");
        }
        assert!(
            !samples
                .iter()
                .any(|s| s.metric == "steer_instance_last_apply_success"
                    && s.labels.get("name") == Some("c")),
            "no apply yet: no sample"
        );
        assert!(
            samples
                .iter()
                .all(|s| !s.metric.starts_with("steer_backend_")),
            "`steer supervise` has no table"
        );
        Ok(())
    }

    #[tokio::test]
    async fn slots_of_polled_backends_by_state() -> Result<(), table::TableError> {
        let (handle, _task) = table::start(FakeDataplane::default(), &services())?;
        let report = table::SlotReport {
            id: 1,
            address: std::net::SocketAddrV4::new([10, 0, 1, 3].into(), 8080),
            slots: table::SlotCounts { total: 4, idle: 1 },
            steered_before: 0,
        };
        handle.set_slots(report).await?;
        let samples = parse(&get_metrics(router(test_sources(Some(handle)))).await.1);
        let b1 = |state| [("backend", "10.0.1.3:8080"), ("state", state)];
        assert_eq!(value(&samples, "steer_backend_slots", &b1("idle")), 1.0);
        assert_eq!(value(&samples, "steer_backend_slots", &b1("busy")), 3.0);
        assert!(
            !samples.iter().any(|s| s.metric == "steer_backend_slots"
                && s.labels.get("backend") == Some("10.0.1.2:8080")),
            "a backend never polled has no slot series"
        );
        Ok(())
    }

    #[test]
    fn state_labels_are_the_api_spelling() {
        for state in STATES {
            assert_eq!(
                serde_json::to_value(state).ok(),
                Some(serde_json::Value::from(state_label(state)))
            );
        }
    }
}
