//! The backend table: one task owns it and is the only writer of the kernel's service, backend
//! and ring maps. Everything else talks to it through a [`TableHandle`] (bounded `mpsc` in,
//! `oneshot` replies); the task ends when the last handle is dropped and hands its dataplane back.
//!
//! Ids: services are numbered 0..MAX_SERVICES in config order; a backend lives in a slot
//! 0..MAX_BACKENDS_PER_SERVICE of its service, and its id is `service_id * 64 + slot`.
//!
//! Every change writes the backend slot first, then the round-robin ring, then the service entry
//! that announces `backend_count` and `rr_len`, so the kernel never sees a ring or count pointing
//! at something unwritten: a removed backend is written DOWN before it leaves the ring.
//!
//! Readers do not ask: the table publishes an [`Arc<Snapshot>`] on a `watch` after every command
//! it applies (before it answers, so a caller that acts on the answer finds it there) and on a
//! counters tick. The kernel's per-CPU counters cost a map syscall per service and backend, so
//! they are read once per tick ([`COUNTERS_TICK`]) whoever reads, or on demand for the admin
//! API and `/metrics` ([`TableHandle::fresh_snapshot`]); connection counts are shared memory,
//! read at every publish and live through [`TableHandle::connections`], and so are the http
//! proxy's request counters and speeds ([`RequestCounts`]), which start over with each backend
//! an id gets.
//!
//! Health is the table's to decide, from two inputs kept apart: the active checks' verdict
//! ([`TableHandle::set_checks`]) and, for a supervised instance's backend, the supervisor's view
//! of its process ([`TableHandle::set_process`]). Both give one [`BackendStatus`], computed in
//! one place (`SlotBackend::status`): a backend takes new connections only when `healthy`, so
//! neither input can undo the other's "no", and a new backend takes none before a check (or the
//! supervisor's "up") passed.

use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::Duration;

use lb_common::{
    Backend, BackendStats, MAX_BACKENDS_PER_SERVICE, MAX_SERVICES, Service, ServiceKey,
    backend_kind, backend_state, counter,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{Instrument, info, warn};

use crate::affinity::{Member, Ring};
use crate::dataplane::conns::ConnCounts;
use crate::dataplane::{Dataplane, DataplaneError};
use crate::policy::{BackendView, maglev_table, rr_ring};
use crate::requests::{BackendRequests, RequestCounts};
use crate::spec::{BackendSpec, Policy, PoolSpec, ServiceSpec, Weight};

/// Commands waiting for the table task; callers wait beyond this.
const QUEUE: usize = 64;
const SLOTS: usize = MAX_BACKENDS_PER_SERVICE as usize;
const UNSPECIFIED: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0);
/// How often the kernel's counters are read and published: the lag a subscriber sees on them.
pub const COUNTERS_TICK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("no service named `{0}`")]
    UnknownService(String),
    #[error("no backend with id {0}")]
    UnknownBackend(u32),
    #[error("service `{service}` already has a backend at {address}")]
    DuplicateAddress {
        service: String,
        address: SocketAddrV4,
    },
    #[error(
        "service `{service}`: {address} is a loopback address, which XDP cannot forward this l4 \
         service's connections to; give the backend an address other hosts reach"
    )]
    LoopbackSteered {
        service: String,
        address: SocketAddrV4,
    },
    #[error("service `{service}` already has the maximum of {MAX_BACKENDS_PER_SERVICE} backends")]
    ServiceFull { service: String },
    /// The supervisor drains and revives it; removing it would leave the instance steering an
    /// id that could go to another backend.
    #[error(
        "backend {id} is instance `{instance}`'s: the supervisor owns it; drain it, or remove \
         the instance from the config"
    )]
    Supervised { id: u32, instance: String },
    #[error("{count} services configured; at most {MAX_SERVICES} are supported")]
    TooManyServices { count: usize },
    #[error("writing the data plane: {0}")]
    Dataplane(#[from] DataplaneError),
    #[error("the backend table has stopped")]
    Stopped,
}

/// A backend to add to a service.
#[derive(Clone, Debug)]
pub struct NewBackend {
    pub service: String,
    pub address: SocketAddrV4,
    pub weight: Weight,
    pub max_connections: u32,
    /// The models it serves; empty: the ones its `/v1/models` lists.
    pub models: Vec<String>,
    /// The supervised instance this backend is: it takes no connections before the supervisor
    /// reports its process up, and the API cannot remove it.
    pub instance: Option<String>,
}

/// What a listed backend may be; a removed one is no longer listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Takes new flows.
    Active,
    /// Keeps its flows, takes no new ones.
    Draining,
}

/// The supervisor's view of an instance's llama-server process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessHealth {
    /// Not (yet, or no longer) answering `/health` 200: no new flows.
    Down,
    /// Came up healthy and runs.
    Up,
    /// About to be stopped (apply, shutdown): keeps its flows, takes no new ones.
    Draining,
}

/// The active checks' verdict after rise/fall counting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Checks {
    /// No verdict yet (no checks configured, a new backend or a new process).
    #[default]
    Unchecked,
    Passing,
    Failing,
    /// `/health` answers llama.cpp's 503 "Loading model".
    Loading,
}

/// Whether a backend takes new connections, from its state, checks and process together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendStatus {
    /// New: no check passed yet (an instance: its process not up yet). No new connections.
    Unknown,
    /// Its `/health` says it loads the model. No new connections, until a check passes.
    Loading,
    /// Takes new connections.
    Healthy,
    /// Failing checks, or an instance's process that went down. No new connections.
    Unhealthy,
    /// Healthy, drained (by the operator or the supervisor): keeps its flows, takes no new ones.
    Draining,
    /// Healthy to its checks, but taken out for a while by passive health: the http proxy saw
    /// it fail requests in a row ([`crate::outlier`]). No new connections.
    Ejected,
}

impl BackendStatus {
    /// The kernel entry's state: only a healthy backend is active.
    fn abi(self) -> u32 {
        match self {
            BackendStatus::Healthy => backend_state::ACTIVE,
            BackendStatus::Draining => backend_state::DRAINING,
            BackendStatus::Unknown
            | BackendStatus::Loading
            | BackendStatus::Unhealthy
            | BackendStatus::Ejected => backend_state::DOWN,
        }
    }
}

/// Both health inputs of a backend, as listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Health {
    /// Only for a supervised instance's backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessHealth>,
    pub checks: Checks,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendInfo {
    pub id: u32,
    pub service: String,
    pub address: SocketAddrV4,
    pub weight: u16,
    pub max_connections: u32,
    /// `draining` also while the supervisor drains it for a restart.
    pub state: BackendState,
    /// `local` (on this host) or `remote`.
    pub kind: BackendKind,
    /// Takes new connections only when `healthy`.
    pub status: BackendStatus,
    /// Neither health input (checks, process) nor passive health says no: `status` is `healthy`
    /// or `draining`.
    pub healthy: bool,
    pub health: Health,
    /// The supervised instance it is, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The models it serves: the configured ones, else the ones its last model poll listed
    /// (empty until one answers).
    pub models: Vec<String>,
    pub active_connections: u64,
    /// llama.cpp slots at the last slot poll (policy `slots`); absent until one answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_slots: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_slots: Option<u32>,
    /// New flows steered to it and not yet seen by a published slot poll.
    pub steered_since_poll: u64,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// The http proxy's requests to it: in flight and by class, tokens and speeds.
    #[serde(flatten)]
    pub requests: BackendRequests,
    /// llama-server's own `/metrics` text at the last poll (http services; it needs
    /// `--metrics`), passed on by the agent's `/metrics`.
    #[serde(skip)]
    pub llama_metrics: Option<Arc<str>>,
}

/// Where a backend runs, which decides how its packets are rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// On this host: destination NAT, delivered by the stack.
    Local,
    /// Elsewhere: full NAT, forwarded by XDP.
    Remote,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceInfo {
    pub id: u32,
    pub name: String,
    pub address: SocketAddrV4,
    pub policy: Policy,
    pub backends: usize,
    #[serde(flatten)]
    pub counters: ServiceCounters,
}

/// Kernel counters of a service, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ServiceCounters {
    pub new_flows: u64,
    pub no_backend: u64,
    pub no_route: u64,
    pub no_snat_port: u64,
    pub no_flow: u64,
    pub closed_flows: u64,
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
}

impl ServiceCounters {
    fn from_array(c: &[u64; counter::MAX as usize]) -> Self {
        let at = |i: u32| c[i as usize];
        ServiceCounters {
            new_flows: at(counter::NEW_FLOWS),
            no_backend: at(counter::NO_BACKEND),
            no_route: at(counter::NO_ROUTE),
            no_snat_port: at(counter::NO_SNAT_PORT),
            no_flow: at(counter::NO_FLOW),
            closed_flows: at(counter::CLOSED_FLOWS),
            fwd_packets: at(counter::FWD_PACKETS),
            fwd_bytes: at(counter::FWD_BYTES),
            reply_packets: at(counter::REPLY_PACKETS),
            reply_bytes: at(counter::REPLY_BYTES),
        }
    }
}

/// The table at one moment: services, backends with their state, health and slots, connection
/// counts as of the publish, and the kernel's counters as of the last read.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Snapshot {
    pub services: Vec<ServiceInfo>,
    pub backends: Vec<BackendInfo>,
}

/// One service as the kernel's maps describe it, for the userspace proxy to choose exactly as
/// the kernel does; connection counts are read live at choice time, so they are left at zero.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Route {
    pub id: u32,
    pub backend_count: u32,
    /// Indexed by slot: the kernel's view of the entry, and where to connect. The cap is the
    /// backend's own whatever the policy (the kernel's entry under `slots` has none until
    /// polled; a pool under `slots` applies that rule with [`Route::polled`]).
    pub backends: Vec<(BackendView, SocketAddrV4)>,
    /// Bit `slot` set: a slot poll has answered for that backend.
    pub polled: u64,
    /// The proxy's pools in the service's pool order; a service without `[[service.pool]]`
    /// has one, over every backend with the service's policy, ring and Maglev table (the
    /// kernel's).
    pub pools: Vec<PoolRoute>,
}

/// One pool of a service as the proxy chooses in it: the pool's policy, and its round-robin
/// ring and Maglev table over the active backends that serve its model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolRoute {
    pub policy: Policy,
    pub ring: Vec<u32>,
    /// Empty until a `maglev` pool first has an active backend.
    pub maglev: Vec<u32>,
    /// The ring of a `cache_affinity` pool's active backends (none for other policies).
    pub affinity: Option<Arc<Ring>>,
    /// Bit `slot` set: the backend in that slot serves the pool's model.
    pub members: u64,
}

impl Route {
    /// Whether a slot poll has answered for the backend in `slot`.
    pub fn is_polled(&self, slot: usize) -> bool {
        slot < SLOTS && self.polled & (1 << slot) != 0
    }
}

impl PoolRoute {
    pub fn has_member(&self, slot: usize) -> bool {
        slot < SLOTS && self.members & (1 << slot) != 0
    }
}

/// Every service's [`Route`], indexed by service id.
pub type Routes = Arc<Vec<Route>>;

type Reply<T> = oneshot::Sender<Result<T, TableError>>;

/// A command's reply, sent once the snapshot holding its result is published (given to it).
type Answer = Box<dyn FnOnce(&Arc<Snapshot>) + Send>;

fn answer<T: Send + 'static>(reply: Reply<T>, result: Result<T, TableError>) -> Answer {
    // A caller that stopped waiting does not need the answer.
    Box::new(move |_| drop(reply.send(result)))
}

enum Command {
    Add(NewBackend, Reply<BackendInfo>),
    Reconfigure(Box<ServiceSpec>, Reply<()>),
    /// With the supervised instance whose backend it is, if it is one.
    Remove(u32, Option<String>, Reply<BackendInfo>),
    SetState(u32, BackendState, Reply<BackendInfo>),
    SetChecks(u32, SocketAddrV4, Checks, Reply<()>),
    SetProcess(u32, SocketAddrV4, ProcessHealth, Reply<()>),
    SetSlots(SlotReport, Reply<()>),
    SetModels(u32, SocketAddrV4, Vec<String>, Reply<()>),
    SetEjected(u32, SocketAddrV4, bool, Reply<()>),
    SetMetrics(u32, SocketAddrV4, Arc<str>, Reply<()>),
    /// Read the kernel's counters now and publish.
    Refresh(Reply<Arc<Snapshot>>),
    StopNewFlows(Reply<()>),
    Close(oneshot::Sender<()>),
}

/// A cheap, cloneable way to ask the table task for changes and to read what it publishes.
#[derive(Clone, Debug)]
pub struct TableHandle {
    tx: mpsc::Sender<Command>,
    routes: watch::Receiver<Routes>,
    published: watch::Receiver<Arc<Snapshot>>,
    counts: Arc<ConnCounts>,
    requests: Arc<RequestCounts>,
}

impl TableHandle {
    async fn call<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, TableError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(command(reply))
            .await
            .map_err(|_| TableError::Stopped)?;
        rx.await.map_err(|_| TableError::Stopped)?
    }

    pub async fn add_backend(&self, backend: NewBackend) -> Result<BackendInfo, TableError> {
        self.call(|reply| Command::Add(backend, reply)).await
    }

    /// A reload's new spec of the service of that name (its address and mode unchanged):
    /// policy, pools and health checking, and the config's backends by difference with the
    /// spec before (added, removed, reweighted); backends the config did not change, and those
    /// of the API, the fleet and the instances, are left as they are.
    pub async fn reconfigure(&self, spec: ServiceSpec) -> Result<(), TableError> {
        self.call(|reply| Command::Reconfigure(Box::new(spec), reply))
            .await
    }

    /// Stops new flows at once; the backend's open flows go on in the kernel. A supervised
    /// instance's backend is refused ([`TableError::Supervised`]).
    pub async fn remove_backend(&self, id: u32) -> Result<BackendInfo, TableError> {
        self.call(|reply| Command::Remove(id, None, reply)).await
    }

    /// Removes the backend of supervised `instance` once it has stopped for good (a reload
    /// took the instance out); refused for another instance's or an unsupervised backend.
    pub async fn remove_instance_backend(
        &self,
        id: u32,
        instance: &str,
    ) -> Result<BackendInfo, TableError> {
        let instance = instance.to_owned();
        self.call(|reply| Command::Remove(id, Some(instance), reply))
            .await
    }

    pub async fn drain_backend(&self, id: u32) -> Result<BackendInfo, TableError> {
        self.call(|reply| Command::SetState(id, BackendState::Draining, reply))
            .await
    }

    pub async fn activate_backend(&self, id: u32) -> Result<BackendInfo, TableError> {
        self.call(|reply| Command::SetState(id, BackendState::Active, reply))
            .await
    }

    /// Record the active checks' verdict for the backend at `address` under `id`; a verdict
    /// about a backend that has since left the id is dropped.
    pub async fn set_checks(
        &self,
        id: u32,
        address: SocketAddrV4,
        checks: Checks,
    ) -> Result<(), TableError> {
        self.call(|reply| Command::SetChecks(id, address, checks, reply))
            .await
    }

    /// Record the supervisor's view of the process behind the instance backend at `address`
    /// under `id`; dropped for any other backend. A process that comes up (from down or
    /// draining) is a new one: the checks' verdict about the old one is forgotten.
    pub async fn set_process(
        &self,
        id: u32,
        address: SocketAddrV4,
        process: ProcessHealth,
    ) -> Result<(), TableError> {
        self.call(|reply| Command::SetProcess(id, address, process, reply))
            .await
    }

    /// Take the backend at `address` under `id` out of service for passive health (`true`), or
    /// back (`false`); dropped if the id has since changed hands. It shows as `ejected` while
    /// its other inputs say healthy; the kernel and the proxy give it nothing new.
    pub async fn set_ejected(
        &self,
        id: u32,
        address: SocketAddrV4,
        ejected: bool,
    ) -> Result<(), TableError> {
        self.call(|reply| Command::SetEjected(id, address, ejected, reply))
            .await
    }

    /// Keep the text of llama-server's own `/metrics` at `address` under `id` (dropped if the
    /// id has since changed hands), for the agent's `/metrics` to pass on.
    pub async fn set_metrics(
        &self,
        id: u32,
        address: SocketAddrV4,
        text: Arc<str>,
    ) -> Result<(), TableError> {
        self.call(|reply| Command::SetMetrics(id, address, text, reply))
            .await
    }

    /// The agent is stopping: from now on the kernel gives no backend a new flow (a SYN to a VIP
    /// then goes to the stack, where the closed listener refuses it) while the flows it carries
    /// go on; the proxies' routes are untouched, so the requests they hold or queue still find
    /// their backends. Whatever changes later (a fleet update, a health verdict) keeps to it.
    pub async fn stop_new_flows(&self) -> Result<(), TableError> {
        self.call(Command::StopNewFlows).await
    }

    /// Ends the table task (it hands the dataplane back) even while other handles remain, say
    /// in admin connections a shutdown cut; their later calls get [`TableError::Stopped`].
    pub async fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self.tx.send(Command::Close(reply)).await.is_ok() {
            let _ = done.await;
        }
    }

    /// Publish a slot poll of the backend at `address` under `id` (dropped if the id has since
    /// changed hands): the kernel and the proxy's routes get its idle slots (and the cap that
    /// follows them), then the kernel forgets the steered flows it saw.
    pub async fn set_slots(&self, report: SlotReport) -> Result<(), TableError> {
        self.call(|reply| Command::SetSlots(report, reply)).await
    }

    /// Record the models the backend at `address` under `id` listed (dropped if the id has since
    /// changed hands); its configured models, if any, still win.
    pub async fn set_models(
        &self,
        id: u32,
        address: SocketAddrV4,
        models: Vec<String>,
    ) -> Result<(), TableError> {
        self.call(|reply| Command::SetModels(id, address, models, reply))
            .await
    }

    /// The latest published snapshot: no round trip. It holds every change whose call has
    /// returned; its kernel counters may be up to a [`COUNTERS_TICK`] old.
    pub fn snapshot(&self) -> Result<Arc<Snapshot>, TableError> {
        // The sending side lives in the task: gone, the table has stopped.
        self.published
            .has_changed()
            .map_err(|_| TableError::Stopped)?;
        Ok(self.published.borrow().clone())
    }

    /// Every snapshot the table publishes, from the latest on.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.published.clone()
    }

    /// A snapshot with the kernel's counters read now (published to every subscriber too), for
    /// the admin API and `/metrics`, whose readers expect counters to include what they just
    /// sent. Costs the table a map syscall per service and backend.
    pub async fn fresh_snapshot(&self) -> Result<Arc<Snapshot>, TableError> {
        self.call(Command::Refresh).await
    }

    /// Active connections on backend `id` right now, from the shared counts.
    pub fn connections(&self, id: u32) -> u64 {
        self.counts.get(id)
    }

    /// Flows steered to backend `id` since its last published slot poll, right now.
    pub fn steered(&self, id: u32) -> u64 {
        self.counts.steered(id)
    }

    /// The http proxy's per-backend request counters and speeds, which the table starts over
    /// for each backend an id gets.
    pub fn requests(&self) -> Arc<RequestCounts> {
        Arc::clone(&self.requests)
    }

    /// The routes, republished after every write to the maps: no round trip per connection.
    pub fn routes(&self) -> watch::Receiver<Routes> {
        self.routes.clone()
    }
}

/// One slot poll of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotReport {
    pub id: u32,
    pub address: SocketAddrV4,
    pub slots: SlotCounts,
    /// The backend's `steered_since_poll` when the poll was sent: the flows the poll has seen.
    pub steered_before: u64,
}

/// A llama.cpp server's slots: all of them, and those not processing a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotCounts {
    pub total: u32,
    pub idle: u32,
}

/// Program the configured services into `dataplane`, then spawn the task that owns the table.
/// The task returns the dataplane once every handle is gone. Call inside a tokio runtime.
pub fn start<D: Dataplane>(
    dataplane: D,
    services: &[ServiceSpec],
) -> Result<(TableHandle, JoinHandle<D>), TableError> {
    let (routes_tx, routes) = watch::channel(Routes::default());
    let mut table = Table::new(dataplane, services, routes_tx)?;
    for id in 0..table.services.len() {
        table.sync(id, 0..SLOTS)?;
    }
    // As on every tick: counters that cannot be read are published as zero, not a start error.
    if let Err(error) = table.read_counters() {
        warn!(%error, "reading the kernel's counters; publishing zeros until the next tick");
    }
    table.publish();
    let (tx, rx) = mpsc::channel(QUEUE);
    let handle = TableHandle {
        tx,
        routes,
        published: table.published.subscribe(),
        counts: Arc::clone(&table.counts),
        requests: Arc::clone(&table.requests),
    };
    let task = tokio::spawn(table.run(rx).instrument(tracing::info_span!("table")));
    Ok((handle, task))
}

struct Table<D> {
    dataplane: D,
    services: Vec<ServiceEntry>,
    routes: watch::Sender<Routes>,
    published: watch::Sender<Arc<Snapshot>>,
    /// The dataplane's, held here so a publish reads them without a call.
    counts: Arc<ConnCounts>,
    /// Indexed by backend id like `counts`.
    requests: Arc<RequestCounts>,
    /// The kernel's counters as last read.
    counters: Counters,
    /// Set by [`TableHandle::stop_new_flows`]: every kernel backend entry is written DOWN.
    stopping: bool,
}

/// The kernel's per-CPU counters summed, as last read (on the tick or for a fresh snapshot).
#[derive(Default)]
struct Counters {
    /// By service id.
    services: Vec<[u64; counter::MAX as usize]>,
    /// By backend id: the id's totals, before a backend's `stats_base` is taken off.
    backends: Vec<BackendStats>,
}

struct ServiceEntry {
    name: String,
    address: SocketAddrV4,
    policy: Policy,
    /// Whether active health checks run: without, a backend is healthy once added.
    checked: bool,
    /// Whether the kernel gets a service entry (see [`ServiceSpec::kernel_steers`]); without one
    /// XDP passes the service's SYNs to the proxy. Backends and rings are written either way:
    /// ids and connection counts are shared with the proxy.
    kernel_steers: bool,
    /// The proxy's model pools (see [`Route::pools`]).
    pools: Vec<PoolSpec>,
    /// The config's backends as last applied: a reload changes what differs from them.
    configured: Vec<BackendSpec>,
    slots: Vec<Slot>,
    /// The active backends (slot, weight, address) the kernel's Maglev table was last built for.
    maglev_of: Option<Vec<(u32, u32, SocketAddrV4)>>,
    /// The round-robin ring as last written to the kernel.
    ring_written: Option<Vec<u32>>,
}

#[derive(Clone, Default)]
struct Slot {
    /// Bumped when the slot is freed, so flows of the old owner no longer release its counts.
    generation: u32,
    backend: Option<SlotBackend>,
}

#[derive(Clone)]
struct SlotBackend {
    address: SocketAddrV4,
    weight: Weight,
    max_connections: u32,
    state: BackendState,
    /// On this host: destination NAT only, replies un-NATed on egress.
    local: bool,
    /// The active checks' verdict.
    checks: Checks,
    /// The service's: whether a check must pass before it takes connections.
    checked: bool,
    /// For a supervised instance's backend: the instance and its process.
    supervised: Option<Supervised>,
    /// The id's kernel counters when this backend got it: an id's counters are never reset.
    stats_base: BackendStats,
    /// At the last slot poll; `None` until one answers.
    slots: Option<SlotCounts>,
    /// From the config or the API; they win over `learnt_models`.
    models: Vec<String>,
    /// At the last model poll.
    learnt_models: Vec<String>,
    /// Taken out by passive health.
    ejected: bool,
    /// llama-server's own `/metrics`, as last polled.
    llama_metrics: Option<Arc<str>>,
}

#[derive(Clone)]
struct Supervised {
    instance: String,
    process: ProcessHealth,
    /// A process of it has come up: down is then unhealthy, not unknown.
    came_up: bool,
}

impl SlotBackend {
    /// The models it serves: the configured ones, else the learnt ones.
    fn models(&self) -> &[String] {
        if self.models.is_empty() {
            &self.learnt_models
        } else {
            &self.models
        }
    }

    fn process(&self) -> Option<ProcessHealth> {
        self.supervised.as_ref().map(|s| s.process)
    }

    /// The one place that combines the inputs. The checks' "failing" or "loading" holds
    /// against the supervisor's "up"; that "up" (it saw `/health` answer 200) counts as a passed
    /// check, as does no check at all where none run.
    fn status(&self) -> BackendStatus {
        let health = match (self.checks, &self.supervised) {
            (Checks::Failing, _) => BackendStatus::Unhealthy,
            (Checks::Loading, _) => BackendStatus::Loading,
            (_, Some(s)) if s.process == ProcessHealth::Down => {
                if s.came_up {
                    BackendStatus::Unhealthy
                } else {
                    BackendStatus::Unknown
                }
            }
            (Checks::Passing, _) | (Checks::Unchecked, Some(_)) => BackendStatus::Healthy,
            (Checks::Unchecked, None) if self.checked => BackendStatus::Unknown,
            (Checks::Unchecked, None) => BackendStatus::Healthy,
        };
        match health {
            BackendStatus::Healthy if self.state() == BackendState::Draining => {
                BackendStatus::Draining
            }
            BackendStatus::Healthy if self.ejected => BackendStatus::Ejected,
            health => health,
        }
    }

    /// The operator's state, or draining while the supervisor drains the process.
    fn state(&self) -> BackendState {
        match self.process() {
            Some(ProcessHealth::Draining) => BackendState::Draining,
            _ => self.state,
        }
    }

    /// The kernel's cap: `max_connections` when configured, else the slot count once a poll
    /// knows it, else none (0).
    fn max_conns(&self) -> u32 {
        match (self.max_connections, self.slots) {
            (0, Some(slots)) => slots.total,
            (configured, _) => configured,
        }
    }
}

/// A slot's `steer_backend` entry under `policy`: its own cap ([`backend_entry`]), except
/// that under `slots` a backend never polled has none, which the kernel reads as no room.
fn kernel_backend(s: &Slot, policy: Policy) -> Backend {
    let mut entry = backend_entry(s);
    if policy == Policy::Slots && s.backend.as_ref().is_some_and(|b| b.slots.is_none()) {
        entry.max_conns = 0;
    }
    entry
}

/// A slot's `steer_backend` entry whatever the policy (the routes' view: each pool applies
/// its own policy's rule, see [`Route::polled`]).
fn backend_entry(s: &Slot) -> Backend {
    match &s.backend {
        Some(b) => Backend {
            addr: u32::from_ne_bytes(b.address.ip().octets()),
            port: b.address.port().to_be(),
            weight: u32::from(b.weight.get()),
            // Not healthy: DOWN for new flows; open ones keep going (conntrack).
            state: b.status().abi(),
            max_conns: b.max_conns(),
            kind: if b.local {
                backend_kind::LOCAL
            } else {
                backend_kind::REMOTE
            },
            generation: s.generation,
            idle_slots: b.slots.map_or(0, |slots| slots.idle),
            ..Backend::default()
        },
        None => Backend {
            state: backend_state::DOWN,
            generation: s.generation,
            ..Backend::default()
        },
    }
}

/// A `cache_affinity` pool's ring over its active backends `(slot, weight, address)`; none for
/// other policies.
fn affinity_ring(policy: Policy, active: &[(u32, u32, SocketAddrV4)]) -> Option<Arc<Ring>> {
    (policy == Policy::CacheAffinity).then(|| {
        let members: Vec<Member> = active
            .iter()
            .map(|&(slot, weight, address)| Member {
                slot,
                address,
                weight: u64::from(weight),
            })
            .collect();
        Arc::new(Ring::new(&members))
    })
}

fn split_id(id: u32) -> (usize, usize) {
    (
        (id / MAX_BACKENDS_PER_SERVICE) as usize,
        (id % MAX_BACKENDS_PER_SERVICE) as usize,
    )
}

fn backend_id(service: usize, slot: usize) -> u32 {
    // Both are below 64 (checked at start and by the slot count).
    (service * SLOTS + slot) as u32
}

impl<D: Dataplane> Table<D> {
    fn new(
        dataplane: D,
        services: &[ServiceSpec],
        routes: watch::Sender<Routes>,
    ) -> Result<Self, TableError> {
        if services.len() > MAX_SERVICES as usize {
            return Err(TableError::TooManyServices {
                count: services.len(),
            });
        }
        let counts = dataplane.conn_counts();
        let mut table = Table {
            dataplane,
            services: Vec::with_capacity(services.len()),
            routes,
            published: watch::channel(Arc::default()).0,
            counts,
            requests: Arc::new(RequestCounts::new(MAX_SERVICES as usize * SLOTS)),
            counters: Counters::default(),
            stopping: false,
        };
        for service in services {
            let checked = service.health.is_some();
            table.services.push(ServiceEntry {
                name: service.name.clone(),
                address: service.address,
                policy: service.policy,
                checked,
                kernel_steers: service.kernel_steers(),
                pools: service.pools.clone(),
                configured: service.backends.clone(),
                slots: vec![Slot::default(); SLOTS],
                maglev_of: None,
                ring_written: None,
            });
            let id = table.services.len() - 1;
            for BackendSpec {
                address,
                weight,
                max_connections,
                models,
            } in service.backends.iter().cloned()
            {
                let slot = table.free_slot(id, address)?;
                let local = table.dataplane.is_local(*address.ip());
                table.services[id].slots[slot].backend = Some(SlotBackend {
                    address,
                    weight,
                    max_connections,
                    state: BackendState::Active,
                    local,
                    checks: Checks::Unchecked,
                    checked,
                    supervised: None,
                    stats_base: BackendStats::default(),
                    slots: None,
                    models,
                    learnt_models: Vec::new(),
                    ejected: false,
                    llama_metrics: None,
                });
            }
        }
        Ok(table)
    }

    /// Apply commands until every handle is gone or one closes the table, publishing the
    /// counters on their tick; then hand the dataplane back.
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) -> D {
        // `start` has just read them.
        let first = tokio::time::Instant::now() + COUNTERS_TICK;
        let mut tick = tokio::time::interval_at(first, COUNTERS_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = commands.recv() => {
                    let Some(command) = command else { break };
                    if self.apply(command, &mut commands).is_break() {
                        break;
                    }
                }
                _ = tick.tick() => {
                    if let Err(error) = self.read_counters() {
                        warn!(%error, "reading the kernel's counters; publishing the last ones");
                    }
                    self.publish();
                }
            }
        }
        self.dataplane
    }

    /// Run `first` and the commands already queued behind it, publish once what they left, then
    /// answer each: its receiver finds its change published. One publish per burst, not per
    /// command, as a snapshot costs a copy of the whole table. Breaks on a close, after
    /// answering the commands before it.
    fn apply(
        &mut self,
        first: Command,
        commands: &mut mpsc::Receiver<Command>,
    ) -> std::ops::ControlFlow<()> {
        let mut answers = Vec::new();
        let mut closed = None;
        let mut next = Some(first);
        while let Some(command) = next.take() {
            match command {
                Command::Close(done) => closed = Some(done),
                command => answers.push(self.run_one(command)),
            }
            if closed.is_none() && answers.len() < QUEUE {
                next = commands.try_recv().ok();
            }
        }
        self.publish();
        let published = self.published.borrow().clone();
        for answer in answers {
            answer(&published);
        }
        match closed {
            Some(done) => {
                let _ = done.send(());
                std::ops::ControlFlow::Break(())
            }
            None => std::ops::ControlFlow::Continue(()),
        }
    }

    /// Apply one command (not a close); its answer, to send once the result is published.
    fn run_one(&mut self, command: Command) -> Answer {
        match command {
            Command::Add(backend, reply) => answer(reply, self.add(backend)),
            Command::Reconfigure(spec, reply) => answer(reply, self.reconfigure(&spec)),
            Command::StopNewFlows(reply) => {
                self.stopping = true;
                let synced = (0..self.services.len())
                    .try_for_each(|service| self.sync(service, 0..SLOTS))
                    .map_err(TableError::from);
                info!("stopping: no new flows in the kernel");
                answer(reply, synced)
            }
            Command::Remove(id, instance, reply) => {
                answer(reply, self.remove(id, instance.as_deref()))
            }
            Command::SetState(id, state, reply) => answer(reply, self.set_state(id, state)),
            Command::SetChecks(id, address, checks, reply) => {
                answer(reply, self.set_checks(id, address, checks))
            }
            Command::SetProcess(id, address, process, reply) => {
                answer(reply, self.set_process(id, address, process))
            }
            Command::SetSlots(report, reply) => answer(reply, self.set_slots(report)),
            Command::SetModels(id, address, models, reply) => {
                answer(reply, self.set_models(id, address, models))
            }
            Command::SetMetrics(id, address, text, reply) => {
                let (service, slot) = split_id(id);
                let backend = self
                    .services
                    .get_mut(service)
                    .and_then(|s| s.slots[slot].backend.as_mut())
                    .filter(|b| b.address == address);
                if let Some(backend) = backend {
                    // Nothing the kernel or the routes see.
                    backend.llama_metrics = Some(text);
                }
                answer(reply, Ok(()))
            }
            Command::SetEjected(id, address, ejected, reply) => {
                let set = self.set_health(id, address, |b| {
                    b.ejected = ejected;
                    Some(())
                });
                answer(reply, set)
            }
            Command::Refresh(reply) => {
                let read = self.read_counters();
                Box::new(move |published| {
                    let result = read.map(|()| Arc::clone(published));
                    drop(reply.send(result.map_err(TableError::from)));
                })
            }
            // `apply` ends the batch on it before it gets here.
            Command::Close(done) => Box::new(move |_| {
                let _ = done.send(());
            }),
        }
    }

    /// The lowest free slot of a service that has no backend at `address`.
    fn free_slot(&self, service: usize, address: SocketAddrV4) -> Result<usize, TableError> {
        self.addable(service, address)?;
        let entry = &self.services[service];
        entry
            .slots
            .iter()
            .position(|s| s.backend.is_none())
            .ok_or_else(|| TableError::ServiceFull {
                service: entry.name.clone(),
            })
    }

    fn add(&mut self, new: NewBackend) -> Result<BackendInfo, TableError> {
        let service = self
            .services
            .iter()
            .position(|s| s.name == new.service)
            .ok_or_else(|| TableError::UnknownService(new.service.clone()))?;
        let slot = self.free_slot(service, new.address)?;
        let id = backend_id(service, slot);
        // The slot is DOWN with a generation no live flow has, so its count can start over.
        self.dataplane.reset_connections(id)?;
        self.requests.reset(id);
        let stats_base = self.dataplane.backend_stats(id)?;
        let backend = SlotBackend {
            address: new.address,
            weight: new.weight,
            max_connections: new.max_connections,
            state: BackendState::Active,
            local: self.dataplane.is_local(*new.address.ip()),
            checks: Checks::Unchecked,
            checked: self.services[service].checked,
            supervised: new.instance.clone().map(|instance| Supervised {
                instance,
                process: ProcessHealth::Down,
                came_up: false,
            }),
            stats_base,
            slots: None,
            models: new.models.clone(),
            learnt_models: Vec::new(),
            ejected: false,
            llama_metrics: None,
        };
        self.change(service, slot, |s| s.backend = Some(backend))?;
        let info = self.info(service, slot)?;
        info!(id, service = %new.service, address = %new.address, weight = new.weight.get(), status = ?info.status, "backend added");
        Ok(info)
    }

    fn reconfigure(&mut self, spec: &ServiceSpec) -> Result<(), TableError> {
        let service = self
            .services
            .iter()
            .position(|s| s.name == spec.name)
            .ok_or_else(|| TableError::UnknownService(spec.name.clone()))?;
        self.reconfigurable(service, spec)?;
        let checked = spec.health.is_some();
        let entry = &mut self.services[service];
        entry.policy = spec.policy;
        entry.checked = checked;
        entry.kernel_steers = spec.kernel_steers();
        entry.pools = spec.pools.clone();
        // Rebuilt at the sync below: a policy turned to maglev needs the kernel's table.
        entry.maglev_of = None;
        for backend in entry.slots.iter_mut().filter_map(|s| s.backend.as_mut()) {
            backend.checked = checked;
        }
        let before = std::mem::replace(&mut entry.configured, spec.backends.clone());
        let at = |table: &Self, address| table.slot_at(service, address);
        for gone in before
            .iter()
            .filter(|b| !spec.backends.iter().any(|n| n.address == b.address))
        {
            // Gone already if the API removed it.
            if let Some(slot) = at(self, gone.address) {
                self.remove(backend_id(service, slot), None)?;
            }
        }
        for backend in &spec.backends {
            match before.iter().find(|b| b.address == backend.address) {
                None => {
                    self.add(NewBackend {
                        service: spec.name.clone(),
                        address: backend.address,
                        weight: backend.weight,
                        max_connections: backend.max_connections,
                        models: backend.models.clone(),
                        instance: None,
                    })?;
                }
                Some(old) if old != backend => {
                    if let Some(slot) = at(self, backend.address) {
                        self.change(service, slot, |s| {
                            if let Some(b) = &mut s.backend {
                                b.weight = backend.weight;
                                b.max_connections = backend.max_connections;
                                b.models = backend.models.clone();
                            }
                        })?;
                        info!(id = backend_id(service, slot), address = %backend.address, weight = backend.weight.get(), max_connections = backend.max_connections, "backend reconfigured");
                    }
                }
                // Unchanged in the config: left as it is, whatever the API did to it since.
                Some(_) => {}
            }
        }
        self.sync(service, 0..SLOTS)?;
        info!(service = %spec.name, policy = ?spec.policy, checked, "service reconfigured");
        Ok(())
    }

    /// Whether `address` is on loopback and `entry` a service XDP steers: packets rewritten to
    /// it from the wire would be dropped as martians.
    fn loopback_steered(&self, entry: &ServiceEntry, address: SocketAddrV4) -> bool {
        entry.kernel_steers && self.dataplane.rewrites_packets() && address.ip().is_loopback()
    }

    /// The slot of `service` whose backend is at `address`.
    fn slot_at(&self, service: usize, address: SocketAddrV4) -> Option<usize> {
        self.services[service]
            .slots
            .iter()
            .position(|s| s.backend.as_ref().is_some_and(|b| b.address == address))
    }

    /// Whether a backend at `address` may join `service`, room aside: not on loopback where XDP
    /// steers, not at an address it already has.
    fn addable(&self, service: usize, address: SocketAddrV4) -> Result<(), TableError> {
        let entry = &self.services[service];
        if self.loopback_steered(entry, address) {
            return Err(TableError::LoopbackSteered {
                service: entry.name.clone(),
                address,
            });
        }
        if self.slot_at(service, address).is_some() {
            return Err(TableError::DuplicateAddress {
                service: entry.name.clone(),
                address,
            });
        }
        Ok(())
    }

    /// Whether `spec`'s backends can all be added where the config adds them: checked before
    /// anything changes, so a refusal leaves the service as it was.
    fn reconfigurable(&self, service: usize, spec: &ServiceSpec) -> Result<(), TableError> {
        let entry = &self.services[service];
        let listed =
            |backends: &[BackendSpec], address| backends.iter().any(|b| b.address == address);
        let held = |address| self.slot_at(service, address).is_some();
        let added: Vec<SocketAddrV4> = spec
            .backends
            .iter()
            .map(|b| b.address)
            .filter(|&a| !listed(&entry.configured, a))
            .collect();
        let freed = entry
            .configured
            .iter()
            .filter(|b| !listed(&spec.backends, b.address) && held(b.address))
            .count();
        for &address in &added {
            self.addable(service, address)?;
        }
        let free = entry.slots.iter().filter(|s| s.backend.is_none()).count() + freed;
        if added.len() > free {
            return Err(TableError::ServiceFull {
                service: entry.name.clone(),
            });
        }
        Ok(())
    }

    /// `owner`: the supervised instance whose backend `id` must be; `None`: one of no instance.
    fn remove(&mut self, id: u32, owner: Option<&str>) -> Result<BackendInfo, TableError> {
        let (service, slot) = self.occupied(id)?;
        let info = self.info(service, slot)?;
        if info.instance.as_deref() != owner {
            return match info.instance {
                Some(instance) => Err(TableError::Supervised { id, instance }),
                None => Err(TableError::UnknownBackend(id)),
            };
        }
        self.change(service, slot, |s| {
            s.backend = None;
            s.generation = s.generation.wrapping_add(1);
        })?;
        info!(id, service = %info.service, address = %info.address, "backend removed");
        Ok(info)
    }

    fn set_state(&mut self, id: u32, state: BackendState) -> Result<BackendInfo, TableError> {
        let (service, slot) = self.occupied(id)?;
        self.change(service, slot, |s| {
            if let Some(backend) = &mut s.backend {
                backend.state = state;
            }
        })?;
        let info = self.info(service, slot)?;
        info!(id, service = %info.service, address = %info.address, ?state, "backend state changed");
        Ok(info)
    }

    fn set_checks(
        &mut self,
        id: u32,
        address: SocketAddrV4,
        checks: Checks,
    ) -> Result<(), TableError> {
        self.set_health(id, address, |b| {
            b.checks = checks;
            Some(())
        })
    }

    fn set_process(
        &mut self,
        id: u32,
        address: SocketAddrV4,
        process: ProcessHealth,
    ) -> Result<(), TableError> {
        self.set_health(id, address, |b| {
            let supervised = b.supervised.as_mut()?;
            if process == ProcessHealth::Up && supervised.process != ProcessHealth::Up {
                // A new process: what was seen of the old one no longer holds.
                b.checks = Checks::Unchecked;
                b.ejected = false;
                supervised.came_up = true;
            }
            supervised.process = process;
            Some(())
        })
    }

    /// Apply `edit` to the backend at `address` under `id` (nothing if the id changed hands or
    /// `edit` says `None`), writing it out if that changed what the kernel sees.
    fn set_health(
        &mut self,
        id: u32,
        address: SocketAddrV4,
        edit: impl FnOnce(&mut SlotBackend) -> Option<()>,
    ) -> Result<(), TableError> {
        let Some((service, slot, _)) = self.reported(id, address) else {
            return Ok(());
        };
        let Some(current) = self.services[service].slots[slot].backend.as_mut() else {
            return Ok(());
        };
        let from = current.status();
        let mut edited = current.clone();
        if edit(&mut edited).is_none() {
            return Ok(());
        }
        let to = edited.status();
        if to == from {
            // Nothing the kernel sees changes: no map write.
            *current = edited;
            return Ok(());
        }
        let (checks, process) = (edited.checks, edited.process());
        self.change(service, slot, |s| s.backend = Some(edited))?;
        if matches!(to, BackendStatus::Unhealthy | BackendStatus::Ejected) {
            warn!(id, %address, ?from, ?to, ?checks, ?process, "backend status: no new connections");
        } else {
            info!(id, %address, ?from, ?to, ?checks, ?process, "backend status");
        }
        Ok(())
    }

    /// The backend's idle slots (and cap, when that follows the slots) go out as any change
    /// does, to the kernel and the proxy's routes. Written before the steered flows the poll saw
    /// are forgotten, so the kernel may briefly count them twice (too few free slots) but never
    /// as free.
    fn set_slots(&mut self, report: SlotReport) -> Result<(), TableError> {
        let Some((service, slot, old)) = self
            .reported(report.id, report.address)
            .map(|(service, slot, b)| (service, slot, b.slots))
        else {
            return Ok(());
        };
        // The same counts as the last poll's are written already (most polls of an idle or
        // steadily busy backend): nothing to rewrite or republish.
        if old != Some(report.slots) {
            self.change(service, slot, |s| {
                if let Some(backend) = &mut s.backend {
                    backend.slots = Some(report.slots);
                }
            })?;
        }
        if old.map(|o| o.total) != Some(report.slots.total) {
            info!(id = report.id, address = %report.address, total = report.slots.total, "slot count known");
        }
        self.dataplane
            .forget_steered(report.id, report.steered_before)?;
        Ok(())
    }

    /// A model poll: rewrites the routes only when the models changed.
    fn set_models(
        &mut self,
        id: u32,
        address: SocketAddrV4,
        models: Vec<String>,
    ) -> Result<(), TableError> {
        let Some((service, slot, backend)) = self.reported(id, address) else {
            return Ok(());
        };
        if backend.learnt_models == models {
            return Ok(());
        }
        info!(id, %address, ?models, "backend models learnt");
        self.change(service, slot, |s| {
            if let Some(backend) = &mut s.backend {
                backend.learnt_models = models;
            }
        })
    }

    /// The backend a probe's report names: `id`'s, if it is still at `address` (a report on an
    /// id that changed hands since it was sent is dropped), with its service and slot.
    fn reported(&self, id: u32, address: SocketAddrV4) -> Option<(usize, usize, &SlotBackend)> {
        let (service, slot) = split_id(id);
        let backend = self.services.get(service)?.slots[slot].backend.as_ref()?;
        (backend.address == address).then_some((service, slot, backend))
    }

    fn occupied(&self, id: u32) -> Result<(usize, usize), TableError> {
        let (service, slot) = split_id(id);
        match self.services.get(service).map(|s| &s.slots[slot].backend) {
            Some(Some(_)) => Ok((service, slot)),
            _ => Err(TableError::UnknownBackend(id)),
        }
    }

    /// Apply `edit` to one slot and write it out; if a write fails, put the slot back and rewrite
    /// the old state, so the table keeps describing what the kernel has.
    fn change(
        &mut self,
        service: usize,
        slot: usize,
        edit: impl FnOnce(&mut Slot),
    ) -> Result<(), TableError> {
        let old = self.services[service].slots[slot].clone();
        edit(&mut self.services[service].slots[slot]);
        if let Err(err) = self.sync(service, slot..slot + 1) {
            self.services[service].slots[slot] = old;
            if let Err(again) = self.sync(service, slot..slot + 1) {
                warn!(service, slot, error = %again, "restoring a backend after a failed write");
            }
            return Err(err.into());
        }
        Ok(())
    }

    /// Write `slots`, then the ring, then the service entry, in that order.
    fn sync(
        &mut self,
        service: usize,
        slots: std::ops::Range<usize>,
    ) -> Result<(), DataplaneError> {
        let entry = &self.services[service];
        let service_id = service as u32;
        for slot in slots {
            let mut backend = kernel_backend(&entry.slots[slot], entry.policy);
            if self.stopping {
                backend.state = backend_state::DOWN;
            }
            self.dataplane
                .write_backend(backend_id(service, slot), backend)?;
        }
        let active: Vec<(u32, u32, SocketAddrV4)> = (0u32..)
            .zip(&entry.slots)
            .filter_map(|(slot, s)| match &s.backend {
                Some(b) if b.status() == BackendStatus::Healthy => {
                    Some((slot, u32::from(b.weight.get()), b.address))
                }
                _ => None,
            })
            .collect();
        let weights: Vec<(u32, u32)> = active.iter().map(|&(slot, w, _)| (slot, w)).collect();
        let ring = rr_ring(&weights);
        // Written only when it changed (a slot poll changes no ring): a syscall per entry.
        // Forgotten before the write: one that fails halfway leaves the kernel's unknown.
        if entry.ring_written.as_ref() != Some(&ring) {
            self.services[service].ring_written = None;
            self.dataplane.write_rr_ring(service_id, &ring)?;
            self.services[service].ring_written = Some(ring.clone());
        }
        let entry = &self.services[service];
        // Built and written only for a new set of active backends (a slot poll changes none).
        let maglev = if entry.policy == Policy::Maglev && entry.maglev_of.as_ref() != Some(&active)
        {
            maglev_table(&active)
        } else {
            Vec::new()
        };
        // With no active backend the old table stays: the kernel finds no room either way.
        if !maglev.is_empty() {
            self.services[service].maglev_of = None;
            self.dataplane.write_maglev(service_id, &maglev)?;
            self.services[service].maglev_of = Some(active.clone());
        }
        let entry = &self.services[service];
        let backend_count = entry
            .slots
            .iter()
            .rposition(|s| s.backend.is_some())
            .map_or(0, |last| last + 1);
        let backend_count = backend_count as u32;
        // A policy the kernel lacks is http only (config), so never kernel-steered.
        if entry.kernel_steers
            && let Some(policy) = entry.policy.abi()
        {
            let kernel = Service {
                id: service_id,
                policy,
                backend_count,
                rr_len: ring.len() as u32,
            };
            self.dataplane
                .upsert_service(ServiceKey::tcp(entry.address), kernel)?;
        }
        let pools = self.pool_routes(service, &active, &ring, &maglev);
        let polled = (0..SLOTS)
            .filter(|&slot| {
                let backend = entry.slots[slot].backend.as_ref();
                backend.is_some_and(|b| b.slots.is_some())
            })
            .fold(0u64, |bits, slot| bits | 1 << slot);
        let backends = entry
            .slots
            .iter()
            .map(|s| {
                let b = backend_entry(s);
                let view = BackendView {
                    state: b.state,
                    weight: b.weight,
                    max_conns: b.max_conns,
                    idle_slots: b.idle_slots,
                    ..BackendView::default()
                };
                (view, s.backend.as_ref().map_or(UNSPECIFIED, |b| b.address))
            })
            .collect();
        self.routes.send_modify(|routes| {
            let routes = Arc::make_mut(routes);
            if routes.len() <= service {
                routes.resize_with(service + 1, Route::default);
            }
            let route = &mut routes[service];
            route.id = service_id;
            route.backend_count = backend_count;
            route.backends = backends;
            route.polled = polled;
            route.pools.resize_with(pools.len(), PoolRoute::default);
            for (route, mut pool) in route.pools.iter_mut().zip(pools) {
                // As in the kernel, an empty Maglev table leaves the old one in place.
                if pool.maglev.is_empty() {
                    pool.maglev = std::mem::take(&mut route.maglev);
                }
                *route = pool;
            }
        });
        Ok(())
    }

    /// Each pool's route over `active` (slot, weight, address) backends; without pools, one over
    /// all of them with the service's `ring` and `maglev`. A Maglev table left empty keeps the
    /// route's old one, as in the kernel.
    fn pool_routes(
        &self,
        service: usize,
        active: &[(u32, u32, SocketAddrV4)],
        ring: &[u32],
        maglev: &[u32],
    ) -> Vec<PoolRoute> {
        let entry = &self.services[service];
        if entry.pools.is_empty() {
            let members = (0..SLOTS)
                .filter(|&slot| entry.slots[slot].backend.is_some())
                .fold(0, |bits, slot| bits | 1 << slot);
            return vec![PoolRoute {
                policy: entry.policy,
                ring: ring.to_vec(),
                maglev: maglev.to_vec(),
                affinity: affinity_ring(entry.policy, active),
                members,
            }];
        }
        entry
            .pools
            .iter()
            .map(|pool| {
                let members = (0..SLOTS)
                    .filter(|&slot| {
                        entry.slots[slot]
                            .backend
                            .as_ref()
                            .is_some_and(|b| pool.served_by(b.models()))
                    })
                    .fold(0, |bits, slot| bits | 1 << slot);
                let serving: Vec<(u32, u32, SocketAddrV4)> = active
                    .iter()
                    .copied()
                    .filter(|&(slot, _, _)| members & (1 << slot) != 0)
                    .collect();
                let weights: Vec<(u32, u32)> =
                    serving.iter().map(|&(slot, w, _)| (slot, w)).collect();
                PoolRoute {
                    policy: pool.policy,
                    ring: rr_ring(&weights),
                    maglev: if pool.policy == Policy::Maglev {
                        maglev_table(&serving)
                    } else {
                        Vec::new()
                    },
                    affinity: affinity_ring(pool.policy, &serving),
                    members,
                }
            })
            .collect()
    }

    /// A backend as listed, with its counters read now (a write's answer).
    fn info(&self, service: usize, slot: usize) -> Result<BackendInfo, TableError> {
        let id = backend_id(service, slot);
        let b = self.services[service].slots[slot]
            .backend
            .as_ref()
            .ok_or(TableError::UnknownBackend(id))?;
        let stats = self.dataplane.backend_stats(id)?;
        Ok(self.describe(service, slot, b, stats))
    }

    /// The backend `b` in `slot` of `service` as listed, given its id's kernel counters.
    fn describe(
        &self,
        service: usize,
        slot: usize,
        b: &SlotBackend,
        stats: BackendStats,
    ) -> BackendInfo {
        let id = backend_id(service, slot);
        BackendInfo {
            id,
            service: self.services[service].name.clone(),
            address: b.address,
            weight: b.weight.get(),
            max_connections: b.max_conns(),
            state: b.state(),
            kind: if b.local {
                BackendKind::Local
            } else {
                BackendKind::Remote
            },
            status: b.status(),
            healthy: matches!(b.status(), BackendStatus::Healthy | BackendStatus::Draining),
            health: Health {
                process: b.process(),
                checks: b.checks,
            },
            instance: b.supervised.as_ref().map(|s| s.instance.clone()),
            models: b.models().to_vec(),
            active_connections: self.counts.get(id),
            total_slots: b.slots.map(|s| s.total),
            idle_slots: b.slots.map(|s| s.idle),
            steered_since_poll: self.counts.steered(id),
            packets: stats.packets.saturating_sub(b.stats_base.packets),
            bytes: stats.bytes.saturating_sub(b.stats_base.bytes),
            new_flows: stats.new_flows.saturating_sub(b.stats_base.new_flows),
            requests: self.requests.get(id),
            llama_metrics: b.llama_metrics.clone(),
        }
    }

    /// Read the kernel's counters of every service and backend: a per-CPU map lookup each.
    /// On an error the last ones stay.
    fn read_counters(&mut self) -> Result<(), DataplaneError> {
        let mut read = Counters {
            services: Vec::with_capacity(self.services.len()),
            backends: vec![BackendStats::default(); self.services.len() * SLOTS],
        };
        for (service, entry) in self.services.iter().enumerate() {
            read.services
                .push(self.dataplane.service_counters(service as u32)?);
            for (slot, s) in entry.slots.iter().enumerate() {
                if s.backend.is_some() {
                    let id = backend_id(service, slot);
                    read.backends[id as usize] = self.dataplane.backend_stats(id)?;
                }
            }
        }
        self.counters = read;
        Ok(())
    }

    /// The table as it is, with the counters as last read; no map syscall.
    fn snapshot(&self) -> Snapshot {
        let mut services = Vec::with_capacity(self.services.len());
        let mut backends = Vec::new();
        for (service, entry) in self.services.iter().enumerate() {
            let mut count = 0;
            for (slot, s) in entry.slots.iter().enumerate() {
                if let Some(b) = &s.backend {
                    let id = backend_id(service, slot) as usize;
                    let stats = self.counters.backends.get(id).copied().unwrap_or_default();
                    backends.push(self.describe(service, slot, b, stats));
                    count += 1;
                }
            }
            let counters = self.counters.services.get(service);
            services.push(ServiceInfo {
                id: service as u32,
                name: entry.name.clone(),
                address: entry.address,
                policy: entry.policy,
                backends: count,
                counters: counters
                    .map_or_else(ServiceCounters::default, ServiceCounters::from_array),
            });
        }
        Snapshot { services, backends }
    }

    /// Publish the table as it is; subscribers wake only if something they can see changed.
    fn publish(&self) {
        let snapshot = self.snapshot();
        self.published.send_if_modified(|published| {
            let changed = **published != snapshot;
            if changed {
                *published = Arc::new(snapshot);
            }
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeDataplane, Write};

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn weight(n: u16) -> Weight {
        serde_json::from_value(n.into()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn backend(address: &str, w: u16) -> BackendSpec {
        BackendSpec {
            address: addr(address),
            weight: weight(w),
            max_connections: 0,
            models: Vec::new(),
        }
    }

    fn services() -> Vec<ServiceSpec> {
        vec![
            ServiceSpec {
                name: "chat".to_owned(),
                address: addr("10.0.0.100:80"),
                policy: Policy::RoundRobin,
                backends: vec![backend("10.0.1.2:8080", 1), backend("10.0.1.3:8080", 1)],
                health: None,
                slots: None,
                proxy: crate::spec::ProxySpec::default(),
                pools: Vec::new(),
                default_pool: 0,
                affinity: None,
                ejection: None,
            },
            ServiceSpec {
                name: "embed".to_owned(),
                address: addr("10.0.0.100:81"),
                policy: Policy::LeastConnections,
                backends: vec![],
                health: None,
                slots: None,
                proxy: crate::spec::ProxySpec::default(),
                pools: Vec::new(),
                default_pool: 0,
                affinity: None,
                ejection: None,
            },
        ]
    }

    /// A reload's spec changes the policy and the config's backends by difference: a backend
    /// added, one removed, one reweighted; the one the API removed and the config still lists
    /// unchanged stays out, and the API's own backend stays in.
    #[tokio::test]
    async fn reconfigure_applies_the_configs_difference_only() -> Result<(), TableError> {
        let mut services = services();
        services[0].backends.push(backend("10.0.1.4:8080", 1));
        let fake = FakeDataplane::default();
        let (table, _task) = start(fake.clone(), &services)?;
        table.remove_backend(1).await?;
        table
            .add_backend(new_backend("chat", "10.0.1.9:8080"))
            .await?;
        let mut chat = services[0].clone();
        chat.policy = Policy::Maglev;
        chat.backends = vec![
            backend("10.0.1.2:8080", 3),
            backend("10.0.1.3:8080", 1),
            backend("10.0.1.5:8080", 1),
        ];
        table.reconfigure(chat).await?;
        let listed: Vec<(String, u16)> = table
            .snapshot()?
            .backends
            .iter()
            .filter(|b| b.service == "chat")
            .map(|b| (b.address.to_string(), b.weight))
            .collect();
        assert_eq!(
            listed,
            [
                ("10.0.1.2:8080".to_owned(), 3),
                ("10.0.1.9:8080".to_owned(), 1),
                ("10.0.1.5:8080".to_owned(), 1),
            ],
            "10.0.1.3 stays removed (the config did not change it), 10.0.1.4 went, 10.0.1.5 came"
        );
        {
            let maps = fake.maps();
            let kernel = maps.services[&ServiceKey::tcp(addr("10.0.0.100:80"))];
            assert_eq!(kernel.policy, lb_common::policy::MAGLEV);
            assert!(maps.maglev.contains_key(&0), "the maglev table is written");
        }
        // A config backend at the API's backend's address: refused before anything changes.
        let mut clash = services[0].clone();
        clash.policy = Policy::LeastConnections;
        clash.backends = vec![backend("10.0.1.9:8080", 1)];
        assert!(matches!(
            table.reconfigure(clash).await,
            Err(TableError::DuplicateAddress { .. })
        ));
        let kernel = fake.maps().services[&ServiceKey::tcp(addr("10.0.0.100:80"))];
        assert_eq!(kernel.policy, lb_common::policy::MAGLEV, "as it was");
        assert_eq!(table.snapshot()?.backends.len(), 3, "as it was");
        assert!(matches!(
            table.reconfigure(ServiceSpec {
                name: "nope".to_owned(),
                ..services[0].clone()
            })
            .await,
            Err(TableError::UnknownService(name)) if name == "nope"
        ));
        Ok(())
    }

    /// An http service chooses per request: XDP must pass its SYNs to the proxy, so only the l4
    /// service gets a kernel entry.
    #[tokio::test]
    async fn http_services_get_no_kernel_entry() -> Result<(), TableError> {
        let mut services = services();
        services[1].proxy.mode = crate::spec::ProxyMode::Http;
        let fake = FakeDataplane::default();
        let (_table, _task) = start(fake.clone(), &services)?;
        let ports: Vec<u16> = fake
            .maps()
            .services
            .keys()
            .map(|key| u16::from_be(key.port))
            .collect();
        assert_eq!(ports, [80], "only the l4 service is the kernel's");
        Ok(())
    }

    /// A pool's route gathers the backends that serve its model or an alias: configured models,
    /// else the learnt ones, which a model poll updates.
    #[tokio::test]
    async fn pools_route_to_the_backends_serving_their_model() -> Result<(), TableError> {
        let mut services = services();
        let chat = &mut services[0];
        chat.proxy.mode = crate::spec::ProxyMode::Http;
        chat.backends[0].models = vec!["a".to_owned()];
        chat.backends.push(BackendSpec {
            models: vec!["b2".to_owned()],
            ..backend("10.0.1.4:8080", 3)
        });
        let pool = |model: &str, aliases: &[&str], policy| PoolSpec {
            upstream: crate::spec::UpstreamTimeouts::default(),
            model: model.to_owned(),
            aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
            policy,
            max_per_backend: 0,
            queue_size: 1,
            queue_timeout: Duration::from_secs(1),
        };
        chat.pools = vec![
            pool("a", &[], Policy::RoundRobin),
            pool("b", &["b2"], Policy::Maglev),
        ];
        let (table, _task) = start(FakeDataplane::default(), &services)?;
        let members = |table: &TableHandle| -> Vec<(u64, Policy)> {
            table.routes().borrow()[0]
                .pools
                .iter()
                .map(|p| (p.members, p.policy))
                .collect()
        };
        let (rr, maglev) = (Policy::RoundRobin, Policy::Maglev);
        assert_eq!(members(&table), [(0b001, rr), (0b100, maglev)]);
        {
            let routes = table.routes();
            let route = &routes.borrow()[0];
            assert_eq!(route.pools[0].ring, [0]);
            assert_eq!(route.pools[1].ring, [2]);
            assert!(route.pools[1].maglev.iter().all(|&slot| slot == 2));
            assert_eq!(route.pools[0].maglev, Vec::<u32>::new());
        }
        let learnt = vec!["a".to_owned(), "b".to_owned()];
        table
            .set_models(1, addr("10.0.1.3:8080"), learnt.clone())
            .await?;
        assert_eq!(members(&table), [(0b011, rr), (0b110, maglev)]);
        assert_eq!(table.routes().borrow()[0].pools[1].ring, [2, 1, 2, 2]);
        // Configured models win; a poll of an address the id no longer has is dropped.
        table
            .set_models(0, addr("10.0.1.2:8080"), vec!["b".to_owned()])
            .await?;
        table
            .set_models(2, addr("10.0.1.9:8080"), vec!["a".to_owned()])
            .await?;
        assert_eq!(members(&table), [(0b011, rr), (0b110, maglev)]);
        let models: Vec<Vec<String>> = table
            .snapshot()?
            .backends
            .iter()
            .map(|b| b.models.clone())
            .collect();
        assert_eq!(
            models,
            [vec!["a".to_owned()], learnt, vec!["b2".to_owned()]]
        );

        let added = NewBackend {
            models: vec!["b".to_owned()],
            ..new_backend("chat", "10.0.1.5:8080")
        };
        assert_eq!(table.add_backend(added).await?.models, ["b"]);
        assert_eq!(members(&table), [(0b0011, rr), (0b1110, maglev)]);
        // Without pools: one over every backend, with the service's policy.
        assert_eq!(
            table.routes().borrow()[1].pools,
            [PoolRoute {
                policy: Policy::LeastConnections,
                ..PoolRoute::default()
            }]
        );
        Ok(())
    }

    /// A `cache_affinity` service's route carries the ring of its active backends, rebuilt
    /// with every change; other routes carry none, and the kernel gets no entry for it.
    #[tokio::test]
    async fn cache_affinity_routes_carry_the_ring_of_active_backends() -> Result<(), TableError> {
        let mut services = services();
        services[0].policy = Policy::CacheAffinity;
        services[0].proxy.mode = crate::spec::ProxyMode::Http;
        services[0].affinity = Some(crate::spec::AffinitySpec::default());
        let fake = FakeDataplane::default();
        let (handle, _task) = start(fake.clone(), &services)?;
        let ring = |backends: &[(u32, &str)]| {
            let members: Vec<Member> = backends
                .iter()
                .map(|&(slot, address)| Member {
                    slot,
                    address: addr(address),
                    weight: 1,
                })
                .collect();
            Some(Arc::new(Ring::new(&members)))
        };
        let mut routes = handle.routes();
        let chat = routes.borrow_and_update()[0].pools[0].clone();
        assert_eq!(chat.policy, Policy::CacheAffinity);
        assert_eq!(
            chat.affinity,
            ring(&[(0, "10.0.1.2:8080"), (1, "10.0.1.3:8080")])
        );
        assert_eq!(
            routes.borrow()[1].pools[0].affinity,
            None,
            "least_connections"
        );
        handle.drain_backend(0).await?;
        let chat = routes.borrow_and_update()[0].pools[0].clone();
        assert_eq!(chat.affinity, ring(&[(1, "10.0.1.3:8080")]));
        let ports: Vec<u16> = fake
            .maps()
            .services
            .keys()
            .map(|key| u16::from_be(key.port))
            .collect();
        assert_eq!(ports, [81], "only the l4 service is the kernel's");
        Ok(())
    }

    fn new_backend(service: &str, address: &str) -> NewBackend {
        NewBackend {
            service: service.to_owned(),
            address: addr(address),
            weight: Weight::ONE,
            max_connections: 0,
            models: Vec::new(),
            instance: None,
        }
    }

    fn started() -> Result<(FakeDataplane, TableHandle, JoinHandle<FakeDataplane>), TableError> {
        let fake = FakeDataplane::default();
        let (handle, task) = start(fake.clone(), &services())?;
        Ok((fake, handle, task))
    }

    fn chat_key() -> ServiceKey {
        ServiceKey::tcp(SocketAddrV4::new(
            std::net::Ipv4Addr::new(10, 0, 0, 100),
            80,
        ))
    }

    #[tokio::test]
    async fn start_writes_backends_then_ring_then_service() -> Result<(), TableError> {
        let (fake, _handle, _task) = started()?;
        let maps = fake.maps();
        let chat: Vec<Write> = maps.writes.iter().take(SLOTS + 2).cloned().collect();
        let mut expected: Vec<Write> = (0..SLOTS as u32).map(Write::Backend).collect();
        expected.extend([Write::Ring(0), Write::Service(0)]);
        assert_eq!(chat, expected);
        assert_eq!(maps.writes[SLOTS + 2..].last(), Some(&Write::Service(1)));
        assert_eq!(maps.rings[&0], [0, 1]);
        assert!(maps.rings[&1].is_empty());
        let service = maps.services[&chat_key()];
        assert_eq!(
            (service.id, service.backend_count, service.rr_len),
            (0, 2, 2)
        );
        assert_eq!(service.policy, lb_common::policy::ROUND_ROBIN);
        let b = maps.backends[&1];
        assert_eq!(
            (b.addr, b.port),
            (u32::from_ne_bytes([10, 0, 1, 3]), 8080u16.to_be())
        );
        assert_eq!(
            (b.state, b.weight, b.generation),
            (backend_state::ACTIVE, 1, 0)
        );
        assert_eq!(maps.backends[&2].state, backend_state::DOWN);
        Ok(())
    }

    #[tokio::test]
    async fn a_backend_at_a_host_address_is_local() -> Result<(), TableError> {
        let (fake, handle, _task) = started()?;
        fake.maps()
            .local_addrs
            .push("10.0.2.9".parse().expect("address"));
        let local = handle
            .add_backend(new_backend("embed", "10.0.2.9:9000"))
            .await?;
        let remote = handle
            .add_backend(new_backend("embed", "10.0.2.1:9000"))
            .await?;
        assert_eq!(
            (local.kind, remote.kind),
            (BackendKind::Local, BackendKind::Remote)
        );
        let maps = fake.maps();
        assert_eq!(maps.backends[&local.id].kind, backend_kind::LOCAL);
        assert_eq!(maps.backends[&remote.id].kind, backend_kind::REMOTE);
        Ok(())
    }

    #[tokio::test]
    async fn add_writes_slot_ring_service_in_order() -> Result<(), TableError> {
        let (fake, handle, _task) = started()?;
        fake.maps().writes.clear();
        let info = handle
            .add_backend(new_backend("embed", "10.0.2.1:9000"))
            .await?;
        assert_eq!(info.id, 64);
        assert_eq!(info.state, BackendState::Active);
        assert_eq!(
            fake.maps().writes,
            [
                Write::Reset(64),
                Write::Backend(64),
                Write::Ring(1),
                Write::Service(1)
            ]
        );
        Ok(())
    }

    #[tokio::test]
    async fn remove_writes_down_and_reuse_bumps_generation() -> Result<(), TableError> {
        let (fake, handle, _task) = started()?;
        fake.set_connections(0, 5);
        let removed = handle.remove_backend(0).await?;
        assert_eq!(removed.address, addr("10.0.1.2:8080"));
        assert_eq!(removed.active_connections, 5);
        {
            let maps = fake.maps();
            assert_eq!(maps.backends[&0].state, backend_state::DOWN);
            assert_eq!(maps.backends[&0].generation, 1);
            assert_eq!(maps.rings[&0], [1]);
            assert_eq!(
                maps.services[&chat_key()].backend_count,
                2,
                "slot 1 still used"
            );
            assert_eq!(
                fake.connections(0),
                5,
                "open flows keep counting until the id is reused"
            );
        }
        let list = handle.snapshot()?;
        assert_eq!(list.backends.iter().map(|b| b.id).collect::<Vec<_>>(), [1]);

        fake.maps().writes.clear();
        let reused = handle
            .add_backend(new_backend("chat", "10.0.1.9:8080"))
            .await?;
        assert_eq!(reused.id, 0, "lowest free slot");
        assert_eq!(reused.active_connections, 0);
        let maps = fake.maps();
        assert_eq!(maps.writes[..2], [Write::Reset(0), Write::Backend(0)]);
        assert_eq!(maps.backends[&0].generation, 1);
        assert_eq!(maps.backends[&0].state, backend_state::ACTIVE);
        assert_eq!(maps.rings[&0], [0, 1]);
        Ok(())
    }

    #[tokio::test]
    async fn removing_the_last_slot_shrinks_backend_count() -> Result<(), TableError> {
        let (fake, handle, _task) = started()?;
        handle.remove_backend(1).await?;
        assert_eq!(fake.maps().services[&chat_key()].backend_count, 1);
        handle.remove_backend(0).await?;
        let maps = fake.maps();
        let service = maps.services[&chat_key()];
        assert_eq!((service.backend_count, service.rr_len), (0, 0));
        Ok(())
    }

    #[tokio::test]
    async fn drain_and_activate_rebuild_the_ring() -> Result<(), TableError> {
        let (fake, handle, _task) = started()?;
        let drained = handle.drain_backend(1).await?;
        assert_eq!(drained.state, BackendState::Draining);
        {
            let maps = fake.maps();
            assert_eq!(maps.backends[&1].state, backend_state::DRAINING);
            assert_eq!(maps.rings[&0], [0]);
            assert_eq!(maps.services[&chat_key()].rr_len, 1);
            assert_eq!(maps.services[&chat_key()].backend_count, 2);
        }
        let active = handle.activate_backend(1).await?;
        assert_eq!(active.state, BackendState::Active);
        assert_eq!(fake.maps().rings[&0], [0, 1]);
        Ok(())
    }

    #[tokio::test]
    async fn weights_shape_the_ring() -> Result<(), TableError> {
        let (fake, handle, _task) = started()?;
        let heavy = NewBackend {
            weight: weight(3),
            ..new_backend("chat", "10.0.1.4:8080")
        };
        handle.add_backend(heavy).await?;
        let ring = fake.maps().rings[&0].clone();
        assert_eq!(ring.len(), 5);
        assert_eq!(ring.iter().filter(|&&s| s == 2).count(), 3);
        Ok(())
    }

    #[tokio::test]
    async fn errors() -> Result<(), TableError> {
        let (fake, handle, _task) = started()?;
        let writes = fake.maps().writes.len();
        assert!(matches!(
            handle.add_backend(new_backend("nope", "10.0.1.2:1")).await,
            Err(TableError::UnknownService(name)) if name == "nope"
        ));
        assert!(matches!(
            handle
                .add_backend(new_backend("chat", "10.0.1.2:8080"))
                .await,
            Err(TableError::DuplicateAddress { .. })
        ));
        // `chat` is l4: with XDP a loopback backend is refused, with the proxy alone it is not.
        fake.maps().rewrites_packets = true;
        assert!(matches!(
            handle.add_backend(new_backend("chat", "127.0.0.1:8080")).await,
            Err(TableError::LoopbackSteered { service, .. }) if service == "chat"
        ));
        for id in [2, 64, 4095, u32::MAX] {
            assert!(matches!(
                handle.drain_backend(id).await,
                Err(TableError::UnknownBackend(i)) if i == id
            ));
            assert!(matches!(
                handle.remove_backend(id).await,
                Err(TableError::UnknownBackend(_))
            ));
        }
        assert_eq!(
            fake.maps().writes.len(),
            writes,
            "refused changes write nothing"
        );
        for i in 0..SLOTS {
            handle
                .add_backend(new_backend("embed", &format!("10.0.3.{i}:80")))
                .await?;
        }
        assert!(matches!(
            handle
                .add_backend(new_backend("embed", "10.0.4.1:80"))
                .await,
            Err(TableError::ServiceFull { .. })
        ));
        Ok(())
    }

    #[tokio::test]
    async fn failed_write_keeps_the_table_as_it_was() -> Result<(), TableError> {
        let (fake, handle, _task) = started()?;
        fake.maps().fail_backend = Some(1);
        assert!(matches!(
            handle.drain_backend(1).await,
            Err(TableError::Dataplane(_))
        ));
        let list = handle.snapshot()?;
        assert_eq!(list.backends[1].state, BackendState::Active);
        let maps = fake.maps();
        assert_eq!(maps.backends[&1].state, backend_state::ACTIVE);
        assert_eq!(maps.rings[&0], [0, 1]);
        Ok(())
    }

    #[tokio::test]
    async fn list_reports_counters_since_the_backend_got_its_id() -> Result<(), TableError> {
        let (fake, handle, _task) = started()?;
        {
            let mut maps = fake.maps();
            maps.stats.insert(
                1,
                BackendStats {
                    packets: 10,
                    bytes: 1000,
                    new_flows: 2,
                },
            );
            fake.set_connections(1, 1);
            let mut counters = [0; counter::MAX as usize];
            counters[counter::NEW_FLOWS as usize] = 7;
            counters[counter::NO_BACKEND as usize] = 3;
            maps.counters.insert(0, counters);
        }
        // The http proxy's, as it counts a request answered 200.
        let requests = handle.requests();
        requests.begin(1).answered(crate::requests::Class::Success);
        let list = handle.fresh_snapshot().await?;
        let b = &list.backends[1];
        assert_eq!(
            (b.packets, b.bytes, b.new_flows, b.active_connections),
            (10, 1000, 2, 1)
        );
        assert_eq!(b.requests.requests.by_class["2xx"], 1);
        assert_eq!(list.services[0].counters.new_flows, 7);
        assert_eq!(list.services[0].counters.no_backend, 3);
        assert_eq!(list.services[0].backends, 2);
        assert_eq!(list.services[1].policy, Policy::LeastConnections);

        handle.remove_backend(1).await?;
        let reused = handle
            .add_backend(new_backend("chat", "10.0.1.7:8080"))
            .await?;
        assert_eq!((reused.id, reused.packets, reused.new_flows), (1, 0, 0));
        assert_eq!(reused.requests.requests.by_class["2xx"], 0, "starts over");
        Ok(())
    }

    #[tokio::test]
    async fn task_returns_the_dataplane_when_handles_drop() -> Result<(), Box<dyn std::error::Error>>
    {
        let (fake, handle, task) = started()?;
        let other = handle.clone();
        drop(handle);
        other.fresh_snapshot().await?;
        drop(other);
        let returned = task.await?;
        returned.maps().writes.clear();
        assert!(
            fake.maps().writes.is_empty(),
            "the same dataplane came back"
        );
        Ok(())
    }

    /// What the kernel would pick from the fake's maps at `cursor`, through the policy model.
    fn kernel_choice(fake: &FakeDataplane, key: ServiceKey, cursor: u64) -> Option<u32> {
        use crate::policy::{BackendView, ServiceView, choose};
        let maps = fake.maps();
        let service = maps.services[&key];
        let backends: Vec<BackendView> = (0..MAX_BACKENDS_PER_SERVICE)
            .map(|slot| {
                let id = service.id * MAX_BACKENDS_PER_SERVICE + slot;
                let b = maps.backends.get(&id).copied().unwrap_or_default();
                BackendView {
                    state: b.state,
                    weight: b.weight,
                    max_conns: b.max_conns,
                    conns: fake.connections(id),
                    idle_slots: b.idle_slots,
                    steered: fake.steered(id),
                }
            })
            .collect();
        let ring = &maps.rings[&service.id][..service.rr_len as usize];
        let maglev = maps.maglev.get(&service.id).map_or(&[][..], Vec::as_slice);
        let view = ServiceView {
            policy: service.policy,
            id: service.id,
            backend_count: service.backend_count,
            ring,
            maglev,
            backends: &backends,
        };
        choose(&view, cursor, std::net::Ipv4Addr::LOCALHOST)
    }

    #[tokio::test]
    async fn routes_are_republished_with_every_write() -> Result<(), TableError> {
        let (_fake, handle, _task) = started()?;
        let mut routes = handle.routes();
        let chat = routes.borrow_and_update()[0].clone();
        assert_eq!(chat.pools[0].ring, [0, 1]);
        assert_eq!(chat.backends[1].1, addr("10.0.1.3:8080"));
        assert_eq!(chat.backends[1].0.state, backend_state::ACTIVE);
        handle.drain_backend(1).await?;
        assert!(routes.has_changed().unwrap_or(false));
        let chat = routes.borrow_and_update()[0].clone();
        assert_eq!(chat.pools[0].ring, [0]);
        assert_eq!(chat.backends[1].0.state, backend_state::DRAINING);
        Ok(())
    }

    #[tokio::test]
    async fn kernel_choices_follow_the_table() -> Result<(), TableError> {
        let (fake, handle, _task) = started()?;
        let picks = |n: u64| -> Vec<Option<u32>> {
            (0..n)
                .map(|c| kernel_choice(&fake, chat_key(), c))
                .collect()
        };
        assert_eq!(picks(4), [Some(0), Some(1), Some(0), Some(1)]);
        handle.drain_backend(1).await?;
        assert_eq!(picks(3), [Some(0); 3]);
        handle.activate_backend(1).await?;
        handle.remove_backend(0).await?;
        assert_eq!(picks(3), [Some(1); 3]);
        handle.remove_backend(1).await?;
        assert_eq!(picks(1), [None]);

        let embed = ServiceKey {
            port: 81u16.to_be(),
            ..chat_key()
        };
        handle
            .add_backend(new_backend("embed", "10.0.2.1:80"))
            .await?;
        handle
            .add_backend(new_backend("embed", "10.0.2.2:80"))
            .await?;
        fake.set_connections(64, 3);
        assert_eq!(
            kernel_choice(&fake, embed, 0),
            Some(65),
            "fewest connections"
        );
        fake.set_connections(65, 3);
        assert_eq!(kernel_choice(&fake, embed, 0), Some(64), "tie: lowest slot");
        Ok(())
    }

    #[tokio::test]
    async fn slot_polls_set_idle_slots_and_the_default_cap() -> Result<(), TableError> {
        let (fake, handle, _task) = started()?;
        let capped = NewBackend {
            max_connections: 1,
            ..new_backend("chat", "10.0.1.4:8080")
        };
        handle.add_backend(capped).await?;
        fake.set_steered(0, 5);
        fake.set_steered(2, 1);
        fake.maps().writes.clear();
        let report = |id, address: &str, total, idle, steered_before| SlotReport {
            id,
            address: addr(address),
            slots: SlotCounts { total, idle },
            steered_before,
        };
        handle
            .set_slots(report(0, "10.0.1.2:8080", 4, 3, 2))
            .await?;
        handle
            .set_slots(report(2, "10.0.1.4:8080", 4, 4, 1))
            .await?;
        {
            let maps = fake.maps();
            assert_eq!(
                maps.writes,
                [
                    Write::Backend(0),
                    Write::Service(0),
                    Write::ForgetSteered(0),
                    Write::Backend(2),
                    Write::Service(0),
                    Write::ForgetSteered(2)
                ],
                "written as any change (the ring is the same), then the steered flows the poll \
                 saw are forgotten"
            );
            let b = maps.backends[&0];
            assert_eq!(
                (b.idle_slots, b.max_conns),
                (3, 4),
                "cap defaults to the slots"
            );
            assert_eq!(
                fake.steered(0),
                3,
                "flows steered after the poll was sent stay"
            );
            assert_eq!(maps.backends[&2].max_conns, 1, "a configured cap stays");
        }
        let list = handle.snapshot()?;
        let b = &list.backends[0];
        assert_eq!(
            (
                b.total_slots,
                b.idle_slots,
                b.max_connections,
                b.steered_since_poll
            ),
            (Some(4), Some(3), 4, 3)
        );
        assert_eq!(
            (
                list.backends[1].total_slots,
                list.backends[1].max_connections
            ),
            (None, 0)
        );

        fake.maps().writes.clear();
        handle
            .set_slots(report(1, "10.0.9.9:8080", 2, 2, 0))
            .await?;
        handle
            .set_slots(report(5, "10.0.1.2:8080", 2, 2, 0))
            .await?;
        assert!(fake.maps().writes.is_empty(), "stale reports are dropped");

        // The slots policy through the model: free 3 - 3, 0 (never polled), 4 - 0.
        fake.maps()
            .services
            .get_mut(&chat_key())
            .expect("chat")
            .policy = lb_common::policy::SLOTS;
        assert_eq!(kernel_choice(&fake, chat_key(), 0), Some(2), "most free");
        fake.set_steered(2, 4);
        fake.set_connections(0, 1);
        assert_eq!(
            kernel_choice(&fake, chat_key(), 0),
            Some(2),
            "all taken: fewer connections, of the polled ones"
        );
        Ok(())
    }

    /// Point 5 of issue 13: a slot poll reaches the proxy's routes, not only the kernel, so the
    /// http proxy holds requests at the slot count.
    #[tokio::test]
    async fn a_slot_poll_republishes_the_routes() -> Result<(), TableError> {
        let (_fake, handle, _task) = started()?;
        let mut routes = handle.routes();
        let before = routes.borrow_and_update()[0].backends[0].0;
        assert_eq!((before.max_conns, before.idle_slots), (0, 0));
        let report = SlotReport {
            id: 0,
            address: addr("10.0.1.2:8080"),
            slots: SlotCounts { total: 4, idle: 3 },
            steered_before: 0,
        };
        handle.set_slots(report).await?;
        assert!(routes.has_changed().unwrap_or(false), "republished");
        let after = routes.borrow_and_update()[0].clone();
        assert_eq!(
            (
                after.backends[0].0.max_conns,
                after.backends[0].0.idle_slots
            ),
            (4, 3)
        );
        assert_eq!(after.pools[0].ring, [0, 1], "the ring is the same");
        Ok(())
    }

    /// Under policy `slots` a backend takes nothing before its first poll: its kernel entry
    /// (and route) has no cap, which the policy reads as no room, even with a configured cap.
    #[tokio::test]
    async fn under_slots_a_backend_never_polled_has_no_room() -> Result<(), TableError> {
        let mut config = services();
        config[0].policy = Policy::Slots;
        config[0].backends[1].max_connections = 8;
        let fake = FakeDataplane::default();
        let (handle, _task) = start(fake.clone(), &config)?;
        let caps = |fake: &FakeDataplane| {
            let maps = fake.maps();
            (maps.backends[&0].max_conns, maps.backends[&1].max_conns)
        };
        assert_eq!(caps(&fake), (0, 0));
        assert_eq!(
            kernel_choice(&fake, chat_key(), 0),
            None,
            "no room anywhere"
        );
        let report = SlotReport {
            id: 1,
            address: addr("10.0.1.3:8080"),
            slots: SlotCounts { total: 2, idle: 0 },
            steered_before: 0,
        };
        handle.set_slots(report).await?;
        assert_eq!(caps(&fake), (0, 8), "the configured cap once polled");
        assert_eq!(
            kernel_choice(&fake, chat_key(), 0),
            Some(1),
            "the polled one, though none of its slots is idle"
        );
        let listed = handle.snapshot()?;
        assert_eq!(listed.backends[1].max_connections, 8);
        Ok(())
    }

    /// A backend added to a checked service is unknown, and DOWN for the kernel, until its
    /// first passing check; without checks it is healthy at once.
    #[tokio::test]
    async fn with_checks_a_new_backend_waits_for_a_passing_check() -> Result<(), TableError> {
        let mut config = services();
        config[1].health = Some(crate::spec::HealthSpec::default());
        let fake = FakeDataplane::default();
        let (handle, _task) = start(fake.clone(), &config)?;
        let listed = handle.snapshot()?;
        assert_eq!(
            listed.backends[0].status,
            BackendStatus::Healthy,
            "chat: no checks"
        );
        let added = handle
            .add_backend(new_backend("embed", "10.0.2.1:80"))
            .await?;
        assert_eq!(
            (added.status, added.healthy),
            (BackendStatus::Unknown, false)
        );
        let state = |fake: &FakeDataplane| fake.maps().backends[&added.id].state;
        assert_eq!(state(&fake), backend_state::DOWN);
        assert!(fake.maps().rings[&1].is_empty());
        let status = |handle: &TableHandle, id| -> Result<Option<BackendStatus>, TableError> {
            let listed = handle.snapshot()?;
            Ok(listed
                .backends
                .iter()
                .find(|b| b.id == id)
                .map(|b| b.status))
        };
        for (checks, want, kernel) in [
            (Checks::Loading, BackendStatus::Loading, backend_state::DOWN),
            (
                Checks::Passing,
                BackendStatus::Healthy,
                backend_state::ACTIVE,
            ),
            (
                Checks::Failing,
                BackendStatus::Unhealthy,
                backend_state::DOWN,
            ),
        ] {
            handle.set_checks(added.id, added.address, checks).await?;
            assert_eq!(
                (status(&handle, added.id)?, state(&fake)),
                (Some(want), kernel),
                "{checks:?}"
            );
        }
        handle
            .set_checks(added.id, added.address, Checks::Passing)
            .await?;
        let drained = handle.drain_backend(added.id).await?;
        assert_eq!(drained.status, BackendStatus::Draining);
        assert_eq!(state(&fake), backend_state::DRAINING);

        // An instance's process seen up counts as a passed check; down after that is unhealthy.
        let gpt = NewBackend {
            instance: Some("gpt".to_owned()),
            ..new_backend("embed", "10.0.2.2:80")
        };
        let gpt = handle.add_backend(gpt).await?;
        assert_eq!(gpt.status, BackendStatus::Unknown);
        let process = |health| handle.set_process(gpt.id, gpt.address, health);
        process(ProcessHealth::Up).await?;
        assert_eq!(status(&handle, gpt.id)?, Some(BackendStatus::Healthy));
        process(ProcessHealth::Down).await?;
        assert_eq!(status(&handle, gpt.id)?, Some(BackendStatus::Unhealthy));
        Ok(())
    }

    /// Issue 11 finding 3: the checks' "no" holds against the supervisor's "up" and the other
    /// way round; only a new process (down or draining, then up) starts the checks over.
    #[tokio::test]
    async fn checks_and_process_both_decide() -> Result<(), TableError> {
        let (fake, handle, _task) = started()?;
        let address = addr("10.0.1.4:8080");
        let gpt = NewBackend {
            models: Vec::new(),
            instance: Some("gpt".to_owned()),
            ..new_backend("chat", "10.0.1.4:8080")
        };
        let id = handle.add_backend(gpt).await?.id;
        let state = |fake: &FakeDataplane| fake.maps().backends[&id].state;
        let health = |list: Arc<Snapshot>| {
            let b = list.backends.iter().find(|b| b.id == id).expect("listed");
            (b.healthy, b.health.process, b.health.checks)
        };
        assert_eq!(
            state(&fake),
            backend_state::DOWN,
            "not before the process is up"
        );
        handle.set_checks(id, address, Checks::Passing).await?;
        assert_eq!(
            state(&fake),
            backend_state::DOWN,
            "passing checks alone do not do"
        );
        handle.set_process(id, address, ProcessHealth::Up).await?;
        assert_eq!(state(&fake), backend_state::ACTIVE);
        assert_eq!(fake.maps().rings[&0], [0, 1, 2]);

        handle.set_checks(id, address, Checks::Failing).await?;
        assert_eq!(state(&fake), backend_state::DOWN);
        handle.set_process(id, address, ProcessHealth::Up).await?;
        assert_eq!(
            state(&fake),
            backend_state::DOWN,
            "an up does not erase failing checks"
        );
        assert_eq!(
            health(handle.snapshot()?),
            (false, Some(ProcessHealth::Up), Checks::Failing)
        );
        assert_eq!(fake.maps().rings[&0], [0, 1]);

        // A new process: the old one's verdict no longer applies.
        handle.set_process(id, address, ProcessHealth::Down).await?;
        handle.set_process(id, address, ProcessHealth::Up).await?;
        assert_eq!(state(&fake), backend_state::ACTIVE);
        assert_eq!(
            health(handle.snapshot()?),
            (true, Some(ProcessHealth::Up), Checks::Unchecked)
        );

        // The supervisor's drain holds against an operator's activate.
        handle
            .set_process(id, address, ProcessHealth::Draining)
            .await?;
        assert_eq!(
            handle.activate_backend(id).await?.state,
            BackendState::Draining
        );
        assert_eq!(state(&fake), backend_state::DRAINING);

        // A configured backend has no process: a process report about its id is dropped.
        fake.maps().writes.clear();
        handle
            .set_process(0, addr("10.0.1.2:8080"), ProcessHealth::Down)
            .await?;
        handle
            .set_process(id, addr("10.0.1.9:8080"), ProcessHealth::Down)
            .await?;
        assert!(fake.maps().writes.is_empty(), "{:?}", fake.maps().writes);
        Ok(())
    }

    /// Issue 11 finding 6: an instance's backend cannot be removed, so its id is never given to
    /// another backend while the instance steers it.
    #[tokio::test]
    async fn supervised_backend_is_not_removed() -> Result<(), TableError> {
        let (fake, handle, _task) = started()?;
        let gpt = NewBackend {
            models: Vec::new(),
            instance: Some("gpt".to_owned()),
            ..new_backend("chat", "10.0.1.4:8080")
        };
        let id = handle.add_backend(gpt).await?.id;
        let writes = fake.maps().writes.len();
        match handle.remove_backend(id).await {
            Err(err @ TableError::Supervised { .. }) => {
                assert!(err.to_string().contains("`gpt`"), "{err}");
            }
            other => panic!("removing an instance's backend: {other:?}"),
        }
        assert_eq!(fake.maps().writes.len(), writes, "nothing written");
        let other = handle
            .add_backend(new_backend("chat", "10.0.1.9:8080"))
            .await?;
        assert_ne!(other.id, id);
        let listed = handle.snapshot()?;
        let b = listed
            .backends
            .iter()
            .find(|b| b.id == id)
            .expect("still listed");
        assert_eq!(b.instance.as_deref(), Some("gpt"));
        Ok(())
    }

    /// Readers do not ask: a write is published before its call returns, and a subscriber
    /// waiting for a change wakes on it.
    #[tokio::test]
    async fn a_subscriber_sees_a_write_without_asking() -> Result<(), Box<dyn std::error::Error>> {
        let (_fake, handle, _task) = started()?;
        let mut published = handle.subscribe();
        published.borrow_and_update();
        let waiting = tokio::spawn(async move {
            published.changed().await?;
            let snapshot = published.borrow_and_update().clone();
            Ok::<_, watch::error::RecvError>(snapshot)
        });
        let added = handle
            .add_backend(new_backend("embed", "10.0.2.1:80"))
            .await?;
        let seen = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await???;
        let listed = seen.backends.iter().find(|b| b.id == added.id);
        assert_eq!(listed, Some(&added), "the subscriber got the new backend");
        assert_eq!(seen.services[1].backends, 1);

        handle
            .set_checks(0, addr("10.0.1.2:8080"), Checks::Failing)
            .await?;
        let latest = handle.snapshot()?;
        assert_eq!(
            (latest.backends[0].healthy, latest.backends[0].health.checks),
            (false, Checks::Failing),
            "the latest snapshot holds the verdict as soon as the call returned"
        );
        Ok(())
    }

    /// The kernel's counters are read once per tick for every reader (a snapshot costs no map
    /// read), a tick that changes nothing wakes no subscriber, and a fresh snapshot reads them
    /// at once.
    #[tokio::test(start_paused = true)]
    async fn counters_are_read_on_the_tick_not_per_reader() -> Result<(), Box<dyn std::error::Error>>
    {
        let (fake, handle, _task) = started()?;
        let mut published = handle.subscribe();
        published.borrow_and_update();
        let since = tokio::time::Instant::now();
        let reads = fake.maps().counter_reads;
        {
            let mut maps = fake.maps();
            let stats = BackendStats {
                packets: 6,
                bytes: 600,
                new_flows: 4,
            };
            maps.stats.insert(1, stats);
            let mut counters = [0; counter::MAX as usize];
            counters[counter::NEW_FLOWS as usize] = 9;
            maps.counters.insert(0, counters);
        }
        for _ in 0..10 {
            assert_eq!(
                handle.snapshot()?.backends[1].new_flows,
                0,
                "not before the tick"
            );
        }
        assert_eq!(fake.maps().counter_reads, reads, "readers cost no map read");

        published.changed().await?;
        assert!(since.elapsed() <= COUNTERS_TICK, "{:?}", since.elapsed());
        let ticked = published.borrow_and_update().clone();
        assert_eq!(
            (ticked.backends[1].new_flows, ticked.backends[1].bytes),
            (4, 600)
        );
        assert_eq!(ticked.services[0].counters.new_flows, 9);
        assert_eq!(
            fake.maps().counter_reads,
            reads + 4,
            "one read per service (2) and backend (2)"
        );

        // Three more ticks (half a tick on, so the test does not race the third).
        tokio::time::sleep(COUNTERS_TICK * 3 + COUNTERS_TICK / 2).await;
        assert!(!published.has_changed()?, "nothing changed: nobody woken");
        assert_eq!(fake.maps().counter_reads, reads + 4 * 4);

        fake.maps().counters.get_mut(&0).expect("chat's")[counter::NEW_FLOWS as usize] = 10;
        let fresh = handle.fresh_snapshot().await?;
        assert_eq!(fresh.services[0].counters.new_flows, 10);
        assert!(
            published.has_changed()?,
            "a fresh snapshot is published too"
        );
        Ok(())
    }

    #[tokio::test]
    async fn close_ends_the_task_while_handles_remain() -> Result<(), Box<dyn std::error::Error>> {
        let (_fake, handle, task) = started()?;
        let other = handle.clone();
        handle.close().await;
        task.await?;
        assert!(matches!(
            other.fresh_snapshot().await,
            Err(TableError::Stopped)
        ));
        assert!(matches!(other.snapshot(), Err(TableError::Stopped)));
        Ok(())
    }

    #[test]
    fn duplicate_backend_in_config_is_refused() {
        let mut config = services();
        config[0].backends.push(backend("10.0.1.2:8080", 2));
        assert!(matches!(
            Table::new(
                FakeDataplane::default(),
                &config,
                watch::channel(Routes::default()).0
            ),
            Err(TableError::DuplicateAddress { .. })
        ));
    }
}
