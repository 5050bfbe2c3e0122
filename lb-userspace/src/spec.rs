//! The agent's vocabulary: plain descriptions of what it runs (services and their backends,
//! which path carries each, proxy limits, health checks and slot polls, the data plane's
//! options, the admin token). `config` parses files into these; the table, the proxy, the
//! checkers and the admin API act on them. Nothing here imports the rest of the crate, so every
//! module may import it without an arrow back.

use std::fmt;
use std::net::SocketAddrV4;
use std::num::{NonZeroU16, NonZeroU32, NonZeroUsize};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What carries new connections: XDP, with the userspace proxy for what it passes, or the proxy
/// alone (no BPF at all).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DataplaneKind {
    #[default]
    Xdp,
    Userspace,
}

/// How the userspace proxy carries a service's connections (`[[service]] mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    /// TCP spliced both ways, unparsed.
    #[default]
    L4,
    /// An HTTP/1.1 reverse proxy that chooses a backend per request.
    Http,
}

/// The userspace proxy of one service (it listens on the service's address): its per-backend
/// cap, the FIFO queue of connections waiting for room, and the limits on its clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxySpec {
    pub mode: ProxyMode,
    /// Per backend: connections (`max_connections_per_backend`, l4) or requests in flight
    /// (`max_requests_per_backend`, http); 0: the backend's own `max_connections`.
    pub max_per_backend: u32,
    /// Connections or requests that may wait; one more is refused at once.
    pub queue_size: usize,
    /// Longest wait in the queue.
    pub queue_timeout: Duration,
    /// How long a backend may take in each phase of an exchange.
    pub upstream: UpstreamTimeouts,
    /// http: tries on other backends after a failure that proves the backend did not answer
    /// (see `proxy::http`); 0: none.
    pub max_retries: u32,
    /// http: no retry starts later than this after the request was first sent.
    pub retry_window: Duration,
    /// http: the largest request body taken (it is read whole before a backend is chosen).
    pub max_request_body: usize,
    /// Client connections held at once; at the cap a new one replaces the one quiet the longest
    /// (see `limits`).
    pub max_client_connections: usize,
    /// http: a request head's time from its first byte to its end.
    pub client_header_timeout: Duration,
    /// A client connection with nothing in flight (http: between requests; l4: before either
    /// side's first byte).
    pub client_idle_timeout: Duration,
    /// http: a request body's time from the end of its head to its end.
    pub client_body_timeout: Duration,
}

impl Default for ProxySpec {
    /// What a `[[service]]` gets for each key it leaves out.
    fn default() -> Self {
        ProxySpec {
            mode: ProxyMode::L4,
            max_per_backend: 0,
            queue_size: 1024,
            queue_timeout: Duration::from_secs(100),
            upstream: UpstreamTimeouts::default(),
            max_retries: 2,
            retry_window: Duration::from_secs(30),
            // Chat requests with long prompts stay well below this; a body is held in memory
            // until sent.
            max_request_body: 16 << 20,
            // Far above what a llama.cpp fleet serves at once, far below a typical hard
            // `RLIMIT_NOFILE` (524288 under systemd).
            max_client_connections: 4096,
            // What hyper used before it was configurable.
            client_header_timeout: Duration::from_secs(30),
            client_idle_timeout: Duration::from_secs(60),
            // A body up to `max_request_body` (16 MiB) over a slow link.
            client_body_timeout: Duration::from_secs(60),
        }
    }
}

/// The phases of an exchange with a backend and how long each may take. The defaults never cut a
/// llama-server that is working: a generation's own length is bounded by nothing but `total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpstreamTimeouts {
    /// The TCP connect to the backend.
    pub connect: Duration,
    /// From the request's send to the first byte of the answer's body (l4: the backend's first
    /// byte after the client's first bytes): a streamed generation's first token, after its
    /// prompt was read; the whole answer of any request that is not a generation.
    pub first_byte: Duration,
    /// The same for a generation that is not streamed, whose head llama-server sends only once
    /// it is done, so the clock runs over the whole generation; `None`: no limit.
    pub first_byte_unstreamed: Option<Duration>,
    /// http: between two pieces of an answer's body, once it started (an SSE comment counts).
    pub idle: Duration,
    /// http: the whole exchange, from the send to the body's end; `None`: no limit.
    pub total: Option<Duration>,
}

impl Default for UpstreamTimeouts {
    fn default() -> Self {
        UpstreamTimeouts {
            connect: Duration::from_secs(5),
            // A prompt of 60k tokens at 200 tokens/s (a CPU) is read in 300 s.
            first_byte: Duration::from_secs(300),
            first_byte_unstreamed: None,
            // llama.cpp reads a long prompt in batches between two decoded tokens of the others.
            idle: Duration::from_secs(120),
            total: None,
        }
    }
}

impl ProxySpec {
    /// The timers of a quiet client connection.
    pub fn client_timeouts(&self) -> ClientTimeouts {
        ClientTimeouts {
            header: (self.mode == ProxyMode::Http).then_some(self.client_header_timeout),
            idle: self.client_idle_timeout,
        }
    }
}

/// `[agent] admin_*`: what clients of the admin API may hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminLimits {
    /// Connections at once (`admin_max_connections`); at the cap a new one replaces the one quiet
    /// the longest.
    pub max_connections: usize,
    /// A request head, from its first byte (`admin_header_timeout`).
    pub header_timeout: Duration,
    /// A keep-alive connection between requests (`admin_idle_timeout`).
    pub idle_timeout: Duration,
    /// A request body, from the end of its head (`admin_body_timeout`).
    pub body_timeout: Duration,
}

impl Default for AdminLimits {
    fn default() -> Self {
        AdminLimits {
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(10),
        }
    }
}

impl AdminLimits {
    pub fn client_timeouts(&self) -> ClientTimeouts {
        ClientTimeouts {
            header: Some(self.header_timeout),
            idle: self.idle_timeout,
        }
    }
}

impl ProxySpec {
    /// The config field [`Self::max_per_backend`] comes from.
    pub fn cap_field(&self) -> &'static str {
        match self.mode {
            ProxyMode::L4 => "max_connections_per_backend",
            ProxyMode::Http => "max_requests_per_backend",
        }
    }
}

/// A service: its address, policy and backends, and how the kernel and the proxy carry it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub address: SocketAddrV4,
    pub policy: Policy,
    pub backends: Vec<BackendSpec>,
    /// Active health checks of the backends; `None` when `[service.health] enabled = false`.
    pub health: Option<HealthSpec>,
    /// Slot polls, with policy `slots` or a `[service.slots]` table.
    pub slots: Option<SlotPoll>,
    /// The userspace proxy on `address`.
    pub proxy: ProxySpec,
    /// `[[service.pool]]` (http only): requests are routed by their `model` to the pool of that
    /// name, each with its own cap, queue and policy over the backends serving it. Empty: one
    /// pool over every backend, with the service's settings, whatever `model` a request names.
    pub pools: Vec<PoolSpec>,
    /// The pool a request without `model` goes to (`default_model`; the first pool when unset).
    pub default_pool: usize,
    /// `[service.affinity]`: with policy `cache_affinity` (the service's or a pool's), and only
    /// then.
    pub affinity: Option<AffinitySpec>,
    /// `[service.ejection]`: passive health of an http service's backends; `None` for l4, or
    /// with `consecutive_failures = 0`.
    pub ejection: Option<EjectionSpec>,
}

/// Passive health: a backend that fails `consecutive_failures` requests in a row is taken out
/// for `base_time`, twice as long each time it is taken out again, at most `max_time`; never more
/// than `max_percent` of a service's backends at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EjectionSpec {
    pub consecutive_failures: u32,
    pub base_time: Duration,
    pub max_time: Duration,
    /// 1 to 100.
    pub max_percent: u32,
}

impl Default for EjectionSpec {
    fn default() -> Self {
        EjectionSpec {
            consecutive_failures: 5,
            base_time: Duration::from_secs(30),
            max_time: Duration::from_secs(300),
            max_percent: 50,
        }
    }
}

impl EjectionSpec {
    /// How many of `backends` may be out at once: `max_percent` of them (rounded down), at
    /// least one when there are two or more (one alone is never taken out).
    pub fn allowed(&self, backends: usize) -> usize {
        if backends < 2 {
            return 0;
        }
        (backends * self.max_percent as usize / 100).max(1)
    }

    /// How long the `n`th ejection in a row (from 1) lasts.
    pub fn time(&self, n: u32) -> Duration {
        let doubled = self
            .base_time
            .saturating_mul(1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX));
        doubled.min(self.max_time)
    }
}

/// A model pool of an http service: the backends serving `model` (or one of its `aliases`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolSpec {
    pub model: String,
    /// More names clients may ask for; a backend that reports one serves the pool too.
    pub aliases: Vec<String>,
    /// The service's unless the pool sets its own.
    pub policy: Policy,
    /// `max_requests_per_backend` (0: each backend's own cap), the service's unless set.
    pub max_per_backend: u32,
    pub queue_size: usize,
    pub queue_timeout: Duration,
    pub upstream: UpstreamTimeouts,
}

impl PoolSpec {
    /// The names the pool answers to: its model, then its aliases.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.model.as_str()).chain(self.aliases.iter().map(String::as_str))
    }

    /// Whether a backend that serves `models` is in the pool.
    pub fn served_by(&self, models: &[String]) -> bool {
        self.names().any(|name| models.iter().any(|m| m == name))
    }
}

impl ServiceSpec {
    /// Whether the kernel steers this service's connections (the proxy then takes only what XDP
    /// passes): `l4` services. An `http` service chooses per request, so XDP must pass its SYNs
    /// to the proxy and the table writes no kernel entry for it.
    pub fn kernel_steers(&self) -> bool {
        self.proxy.mode == ProxyMode::L4
    }
}

/// `[service.affinity]` of a `cache_affinity` service: what keys a request, and how far above the
/// mean load a backend may go before a key overflows to the next backend on the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AffinitySpec {
    /// Tried in order; the first one the request has keys it (none: the client address).
    pub keys: Vec<AffinityKey>,
    /// How many bytes of the canonical JSON of `messages` (or `prompt`) key a request by its
    /// prompt prefix.
    pub prefix_bytes: NonZeroUsize,
    pub load_factor: LoadFactor,
}

impl Default for AffinitySpec {
    fn default() -> Self {
        AffinitySpec {
            keys: vec![
                AffinityKey::Header("x-session-id".to_owned()),
                AffinityKey::ApiKey,
                AffinityKey::PromptPrefix,
                AffinityKey::Client,
            ],
            // About a system prompt of 100 tokens: enough to tell conversations apart, short
            // enough that the system prompt and first message are usually longer (a prefix
            // that reaches into a second turn keys the turns apart).
            prefix_bytes: NonZeroUsize::MIN.saturating_add(511),
            load_factor: LoadFactor::DEFAULT,
        }
    }
}

/// One source of a request's affinity key (`[service.affinity] key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AffinityKey {
    /// `header:NAME`: that header's value; the name is kept lowercase.
    Header(String),
    /// `api_key`: the token of `Authorization: Bearer TOKEN`.
    ApiKey,
    /// `prompt_prefix`: the first `prefix_bytes` of `messages` or `prompt`.
    PromptPrefix,
    /// `client`: the client's address (always present).
    Client,
}

impl fmt::Display for AffinityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AffinityKey::Header(name) => write!(f, "header:{name}"),
            AffinityKey::ApiKey => f.write_str("api_key"),
            AffinityKey::PromptPrefix => f.write_str("prompt_prefix"),
            AffinityKey::Client => f.write_str("client"),
        }
    }
}

/// c of consistent hashing with bounded loads: a backend takes a request only while it holds
/// fewer than `ceil(c * (in flight + 1) * weight / total weight)`. Kept in thousandths, so every
/// host computes the same bound in integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadFactor {
    thousandths: u32,
}

impl LoadFactor {
    pub const DEFAULT: LoadFactor = LoadFactor { thousandths: 1250 };
    /// Above this the bound never binds on any fleet of up to 64 backends: no point in more.
    pub const MAX: f64 = 1000.0;

    /// `value` rounded to thousandths; `None` unless above 1 (at 1 or below the backends'
    /// capacities add up to less than the load) and at most [`Self::MAX`].
    pub fn new(value: f64) -> Option<LoadFactor> {
        let thousandths = (value * 1000.0).round();
        (value > 1.0 && value <= Self::MAX && thousandths > 1000.0).then_some(LoadFactor {
            thousandths: thousandths as u32,
        })
    }

    /// The most a backend of `weight` (of `total_weight` on the ring) may hold once a request
    /// brings the in-flight total to `in_flight`: `ceil(c * in_flight * weight / total_weight)`,
    /// at least 1.
    pub fn capacity(self, in_flight: u64, weight: u64, total_weight: u64) -> u64 {
        let numerator = u128::from(self.thousandths) * u128::from(in_flight) * u128::from(weight);
        let denominator = 1000 * u128::from(total_weight.max(1));
        u64::try_from(numerator.div_ceil(denominator).max(1)).unwrap_or(u64::MAX)
    }
}

/// `[service.health]`: an HTTP GET of `path` on every backend each `interval`; 200 within
/// `timeout` is a pass (llama.cpp's `/health` answers 503 while loading). A backend turns down
/// after `fall` failures in a row and up again after `rise` passes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthSpec {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: NonZeroU32,
    pub fall: NonZeroU32,
}

impl Default for HealthSpec {
    fn default() -> Self {
        HealthSpec {
            path: "/health".to_owned(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: NonZeroU32::MIN.saturating_add(1),
            fall: NonZeroU32::MIN.saturating_add(1),
        }
    }
}

/// `[service.slots]`: every `interval`, a GET of each backend's llama.cpp `/slots` (or, where
/// that is off, `/metrics` and `/props`), answered within `timeout`; the idle slots it finds
/// steer policy `slots`. An http service's backends are asked for their models at the same pace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotPoll {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for SlotPoll {
    fn default() -> Self {
        SlotPoll {
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(400),
        }
    }
}

/// Whether a VIP or backend address names a real host and port.
pub fn usable_endpoint(addr: SocketAddrV4) -> bool {
    addr.port() != 0 && !addr.ip().is_unspecified() && !addr.ip().is_broadcast()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub address: SocketAddrV4,
    pub weight: Weight,
    /// 0: no cap.
    pub max_connections: u32,
    /// The models it serves (`models`); empty: the ones its `/v1/models` lists.
    pub models: Vec<String>,
}

/// A backend's weight, 1..=65535 (default 1). Parsed by serde, so the file and the API report a
/// bad one with its position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct Weight(NonZeroU16);

impl Weight {
    pub const ONE: Weight = Weight(NonZeroU16::MIN);

    pub fn get(self) -> u16 {
        self.0.get()
    }
}

impl Default for Weight {
    fn default() -> Self {
        Weight::ONE
    }
}

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = i64::deserialize(deserializer)?;
        u16::try_from(value)
            .ok()
            .and_then(NonZeroU16::new)
            .map(Weight)
            .ok_or_else(|| {
                serde::de::Error::custom(format_args!(
                    "weight must be between 1 and 65535, got {value}"
                ))
            })
    }
}
/// A service's load-balancing policy (`enum steer_policy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    RoundRobin,
    LeastConnections,
    /// Client-address affinity: a returning client lands on the backend that holds its cache.
    Maglev,
    /// Request-keyed affinity (session header, API key, prompt prefix, client) by consistent
    /// hashing with bounded loads (`[service.affinity]`). http only: the kernel has no model of
    /// it.
    CacheAffinity,
    /// Most free llama.cpp slots: idle at the last poll, less the connections steered since.
    /// The default: Steer's services are llama.cpp servers. A backend that answers no slot poll
    /// counts no free slot, so among such backends the choice is the least connected.
    #[default]
    Slots,
}

impl Policy {
    /// Every policy, in the order reports list them.
    pub const ALL: [Policy; 5] = [
        Policy::RoundRobin,
        Policy::LeastConnections,
        Policy::Slots,
        Policy::Maglev,
        Policy::CacheAffinity,
    ];

    /// The value the kernel reads in `steer_service.policy`; `None` for a policy only the proxy
    /// has (`cache_affinity`, http only, so never in a kernel entry).
    pub fn abi(self) -> Option<u32> {
        match self {
            Policy::RoundRobin => Some(lb_common::policy::ROUND_ROBIN),
            Policy::LeastConnections => Some(lb_common::policy::LEAST_CONNECTIONS),
            Policy::Maglev => Some(lb_common::policy::MAGLEV),
            Policy::Slots => Some(lb_common::policy::SLOTS),
            Policy::CacheAffinity => None,
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Policy::RoundRobin => "round_robin",
            Policy::LeastConnections => "least_connections",
            Policy::Maglev => "maglev",
            Policy::Slots => "slots",
            Policy::CacheAffinity => "cache_affinity",
        })
    }
}

/// The admin API's bearer token, read from `admin_token_file` (see [`load_or_create`]). Never
/// printed.
#[derive(Clone)]
pub struct AdminToken(String);

impl AdminToken {
    /// The token in a token file's text, trimmed; `None` when there is none.
    pub fn from_text(text: &str) -> Option<AdminToken> {
        let token = text.trim();
        (!token.is_empty()).then(|| AdminToken(token.to_owned()))
    }

    /// The token itself, for a client of the agent's own (`steer reload`) to present.
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// Compares in time independent of where the first difference is.
    pub fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// How the program is attached (`--xdp-mode`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Deserialize,
    serde::Serialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver (fast; what production and the tests use).
    #[default]
    Native,
    /// Generic mode in the stack, for drivers without XDP support.
    Skb,
}

impl XdpMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Skb => "skb",
        }
    }
}

/// What the agent's config decides about the data plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpOptions {
    /// Interfaces to attach to; each one's first IPv4 address is the source towards backends
    /// reached through it.
    pub interfaces: Vec<String>,
    pub mode: XdpMode,
    /// Source ports for flows to remote backends.
    pub snat_ports: RangeInclusive<u16>,
    /// Emit flow opened/closed events (they become `tracing` debug events).
    pub flow_events: bool,
    /// Capacity of each conntrack map.
    pub conntrack_entries: u32,
    /// Idle time after which an open flow is expired and its count released.
    pub flow_idle_timeout: std::time::Duration,
    /// Time a closed (FIN/RST) flow's entries stay, for the last packets of the close.
    pub closed_flow_timeout: std::time::Duration,
    /// How long a reply tuple the backend closed first stays held before its SNAT port is used
    /// again. Not a config key: Linux backends keep it in TIME_WAIT for 60 s (fixed) and may
    /// refuse a SYN on it from another client, whose TCP timestamps can be older; hence
    /// [`XdpOptions::BACKEND_TIME_WAIT`]. Tests shorten it.
    pub backend_time_wait: std::time::Duration,
}

impl XdpOptions {
    /// TIME_WAIT's 60 s and 2 s more for the program's coarse clock.
    pub const BACKEND_TIME_WAIT: std::time::Duration = std::time::Duration::from_secs(62);
}

/// How long a quiet client connection may stay so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// From the first byte of a request head to its end; `None`: no heads (l4).
    pub header: Option<Duration>,
    /// With nothing in flight: from the accept or the last response's end to the next byte.
    pub idle: Duration,
}

/// `[fleet]`: the etcd cluster several agents share ([`crate::fleet`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetSpec {
    /// etcd client endpoints, `host:port` (spoken to over TLS when `tls` is set).
    pub endpoints: Vec<String>,
    /// The fleet's key prefix, without a trailing `/`: every key of the fleet is under it.
    pub prefix: String,
    /// This agent's name in the fleet (default: the hostname); its records are under it.
    pub host: String,
    /// The registration lease's time to live: a host that stops renewing it (killed, cut off)
    /// leaves every balancer this long after its last renewal.
    pub lease_ttl: Duration,
    /// The local copy of the last fleet seen, read at a start while etcd does not answer.
    pub cache: PathBuf,
    pub auth: Option<EtcdAuth>,
    pub tls: Option<EtcdTls>,
}

/// A fleet host, instance or key prefix segment: it becomes part of etcd keys, so no `/`, and not
/// `.` or `..`.
pub fn is_fleet_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// etcd's user and password authentication; the password is read from a file, never the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdAuth {
    pub user: String,
    pub password_file: PathBuf,
}

/// TLS to etcd: the CA that signs its certificates, and a client certificate when etcd asks one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name etcd's certificate is checked against (default: the endpoint's host).
    pub server_name: Option<String>,
}

impl FleetSpec {
    pub const DEFAULT_PREFIX: &str = "/steer/fleet/default";
    pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);
    pub const DEFAULT_CACHE: &str = "/var/lib/steer/fleet-cache.json";
}

/// Which store to use and the config name inside it, as given to `--config-driver`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum DriverConfig {
    /// A TOML file with one table per name.
    File { path: PathBuf, name: String },
    /// An etcd v3 endpoint (`host:port`, plain HTTP/2 on loopback); needs the `etcd` feature.
    /// `cache` is a file store kept beside it (default [`DEFAULT_ETCD_CACHE`]): every load and
    /// save writes it, and a start while etcd is unreachable reads it.
    Etcd {
        addr: String,
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cache: Option<PathBuf>,
    },
}

/// The etcd driver's local copy when `cache` is not given.
pub const DEFAULT_ETCD_CACHE: &str = "/var/lib/steer/etcd-cache.toml";

impl DriverConfig {
    /// The config name inside the store.
    pub fn name(&self) -> &str {
        match self {
            DriverConfig::File { name, .. } | DriverConfig::Etcd { name, .. } => name,
        }
    }
}

/// One instance as the command line or the agent's config describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceSpec {
    pub name: String,
    pub binary: String,
    pub model: String,
    pub port: u16,
    /// More llama-server arguments (`-np 2 -c 2048`).
    pub extra_args: Vec<String>,
    pub settings: InstanceSettings,
    pub driver: DriverConfig,
    /// The service it is a backend of, if any.
    pub backend: Option<InstanceBackend>,
    /// The fleet instance group it belongs to (`group`): a rolling change of the group's
    /// arguments reaches it, and after its first start it takes the group's last good ones.
    pub group: Option<String>,
}

impl InstanceSpec {
    /// The address its llama-server binds: `--host` (the last one given), else llama-server's
    /// default 127.0.0.1; a host that is no IP address (a name, a socket path) as the wildcard,
    /// which clashes with every address.
    pub fn listen_ip(&self) -> std::net::IpAddr {
        let mut host = None;
        let mut args = self.extra_args.iter();
        while let Some(arg) = args.next() {
            if arg == "--host" {
                host = args.next().map(String::as_str);
            } else if let Some(value) = arg.strip_prefix("--host=") {
                host = Some(value);
            }
        }
        match host {
            None => std::net::Ipv4Addr::LOCALHOST.into(),
            Some(host) => host
                .parse()
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()),
        }
    }
}

/// How an instance is run and what its API may change (`[[instance]]` keys, or `steer
/// supervise` flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceSettings {
    /// How long a start may take to answer its health check.
    pub startup_timeout: Duration,
    /// How long API changes are gathered before one apply.
    pub debounce: Duration,
    /// How long a stop waits after SIGTERM before SIGKILL.
    pub stop_grace: Duration,
    /// Binaries the API may switch to.
    pub allowed_binaries: Vec<String>,
    /// Flags the API may set beyond the default allowlist (`api_flags`).
    pub api_flags: Vec<String>,
    /// Where path arguments set through the API must lie (`model_dirs`; none: the model's own
    /// directory).
    pub model_dirs: Vec<PathBuf>,
    /// Who llama-server runs as when the agent is root (`None`: `nobody`).
    pub user: Option<String>,
}

impl Default for InstanceSettings {
    /// What an `[[instance]]` gets for each key it leaves out.
    fn default() -> Self {
        InstanceSettings {
            startup_timeout: Duration::from_secs(60),
            debounce: Duration::from_millis(200),
            stop_grace: Duration::from_secs(10),
            allowed_binaries: Vec::new(),
            api_flags: Vec::new(),
            model_dirs: Vec::new(),
            user: None,
        }
    }
}

/// `[[instance]] service = ...`: the instance is a backend of that service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceBackend {
    pub service: String,
    /// Where clients' traffic reaches it; `None`: the first IPv4 address of the agent's first
    /// interface, at the instance's port.
    pub address: Option<SocketAddrV4>,
    /// How long a restart or shutdown waits for its connections to finish.
    pub drain_timeout: Duration,
}
