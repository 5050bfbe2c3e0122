//! The agent's TOML config, read in two stages: `Raw*` mirror the file (serde, unknown fields
//! rejected, typed values such as addresses parsed there so toml reports their position), then
//! [`Config::parse`] checks what needs the whole file and builds the typed [`Config`].
//!
//! Every error names the file, and where the file has one, the line, column and field.

use std::fmt;
use std::net::{SocketAddr, SocketAddrV4};
use std::num::{NonZeroU16, NonZeroU32, NonZeroUsize};
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::spec::{
    AdminLimits, AffinityKey, AffinitySpec, BackendSpec, DataplaneKind, DriverConfig, EjectionSpec,
    EtcdAuth, EtcdTls, FleetSpec, HealthSpec, InstanceBackend, InstanceSettings, InstanceSpec,
    LoadFactor, Policy, PoolSpec, ProxyMode, ProxySpec, ServiceSpec, SlotPoll, UpstreamTimeouts,
    Weight, XdpMode, XdpOptions, is_fleet_name, usable_endpoint,
};
use crate::{host, supervisor};

const DEFAULT_ADMIN_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 9090));
/// Below Linux's default ephemeral range (32768-60999), so the host's own connections never take
/// a port a flow holds; 16,384 ports per backend.
const DEFAULT_SNAT_PORTS: RangeInclusive<u16> = 16384..=32767;
const DEFAULT_CONNTRACK_ENTRIES: u32 = 262_144;
const DEFAULT_FLOW_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
const DEFAULT_CLOSED_FLOW_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a SIGTERM lets proxied requests finish. Generations run for tens of seconds; this
/// plus an instance's drain timeout and stop grace stays within systemd's default 90 s stop
/// timeout when the drains overlap little (a second signal cuts it short anyway).
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);
/// Linux interface names are at most IFNAMSIZ - 1 bytes.
const MAX_INTERFACE_NAME: usize = 15;

/// Command-line values that replace the file's.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// Replaces `agent.interfaces` when not empty.
    pub interfaces: Vec<String>,
    pub xdp_mode: Option<XdpMode>,
    pub admin_addr: Option<SocketAddr>,
    pub dataplane: Option<DataplaneKind>,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// The file it was read from, for messages.
    pub path: PathBuf,
    pub xdp: XdpOptions,
    pub admin_addr: SocketAddr,
    /// The file holding the token mutating API calls need (`Authorization: Bearer <token>`);
    /// generated at the first start when missing (see [`crate::token`]).
    pub admin_token_file: PathBuf,
    pub admin_limits: AdminLimits,
    pub services: Vec<ServiceSpec>,
    pub dataplane: DataplaneKind,
    /// llama-server processes the agent supervises (`[[instance]]`).
    pub instances: Vec<InstanceSpec>,
    /// `agent.shutdown_timeout`: how long the first SIGTERM/SIGINT lets proxied requests and
    /// admin calls in flight finish before they are cut.
    pub shutdown_timeout: Duration,
    /// `agent.max_concurrent_applies`: applies in progress at once across the instances.
    pub max_concurrent_applies: NonZeroUsize,
    /// `[fleet]`: the etcd cluster this agent registers in and takes remote backends from.
    pub fleet: Option<FleetSpec>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{location}: {field}: {message}")]
    Invalid {
        location: Location,
        /// Dotted path of the field (`service[0].backend[1].address`), or the flag.
        field: String,
        message: String,
    },
}

/// Where in the config an error is: the file, and the line and column when there is one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    /// 1-based line and column.
    pub line_column: Option<(usize, usize)>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line_column {
            Some((line, column)) => write!(f, "{}:{line}:{column}", self.path.display()),
            None => write!(f, "{}", self.path.display()),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    agent: RawAgent,
    #[serde(default)]
    service: Vec<Spanned<RawService>>,
    #[serde(default)]
    instance: Vec<RawInstance>,
    fleet: Option<Spanned<RawFleet>>,
}

/// `[fleet]`: the etcd cluster shared with the fleet's other agents.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    endpoints: Spanned<Vec<String>>,
    prefix: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    lease_ttl: Option<Spanned<Timeout>>,
    cache: Option<PathBuf>,
    user: Option<Spanned<String>>,
    password_file: Option<Spanned<PathBuf>>,
    tls: Option<Spanned<RawEtcdTls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEtcdTls {
    ca: PathBuf,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    server_name: Option<String>,
}

/// `[[instance]]`: a llama-server the agent supervises. Its arguments are persisted through
/// `config_driver` (default: the file driver at /var/lib/steer/config.toml, under the
/// instance's name), which wins over `model`, `port` and `args` where they are unchanged since it
/// was saved (see `supervisor::start`).
/// With `service`, it is a backend of that service at `address`; llama-server then gets
/// `--host 0.0.0.0` unless `args` set `--host`, so that traffic NATed to that address reaches it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstance {
    name: Spanned<String>,
    binary: String,
    model: String,
    port: Spanned<NonZeroU16>,
    /// More llama-server arguments, as on a command line.
    #[serde(default)]
    args: Vec<String>,
    startup_timeout: Option<Timeout>,
    debounce: Option<Timeout>,
    stop_grace: Option<Timeout>,
    /// Binaries `binary` may be changed to over the API.
    #[serde(default)]
    allowed_binaries: Vec<String>,
    /// Flags the API may set beyond the default tuning flags (`supervisor::policy`).
    #[serde(default)]
    api_flags: Vec<String>,
    /// Where path-valued flags set over the API must point; default: `model`'s directory.
    #[serde(default)]
    model_dirs: Vec<PathBuf>,
    /// Who llama-server runs as when the agent is root; default `nobody`.
    user: Option<String>,
    config_driver: Option<DriverConfig>,
    service: Option<Spanned<String>>,
    address: Option<Spanned<SocketAddrV4>>,
    drain_timeout: Option<Spanned<Timeout>>,
    /// The fleet instance group (needs `service` and `[fleet]`).
    group: Option<Spanned<String>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    interfaces: Option<Spanned<Vec<String>>>,
    xdp_mode: Option<XdpMode>,
    admin_addr: Option<Spanned<SocketAddr>>,
    admin_token_file: Option<Spanned<PathBuf>>,
    snat_ports: Option<Spanned<PortRange>>,
    conntrack_entries: Option<NonZeroU32>,
    flow_idle_timeout: Option<Timeout>,
    closed_flow_timeout: Option<Timeout>,
    flow_events: Option<bool>,
    dataplane: Option<DataplaneKind>,
    admin_max_connections: Option<Spanned<u32>>,
    admin_header_timeout: Option<Timeout>,
    admin_idle_timeout: Option<Timeout>,
    admin_body_timeout: Option<Timeout>,
    shutdown_timeout: Option<Timeout>,
    max_concurrent_applies: Option<NonZeroUsize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    address: Spanned<SocketAddrV4>,
    policy: Option<Spanned<Policy>>,
    affinity: Option<Spanned<RawAffinity>>,
    ejection: Option<Spanned<RawEjection>>,
    #[serde(default)]
    backend: Vec<Spanned<RawBackend>>,
    #[serde(default)]
    health: Option<Spanned<RawHealth>>,
    slots: Option<Spanned<RawSlots>>,
    #[serde(default)]
    mode: ProxyMode,
    max_connections_per_backend: Option<Spanned<u32>>,
    max_requests_per_backend: Option<Spanned<u32>>,
    max_request_body: Option<Spanned<usize>>,
    queue_size: Option<usize>,
    queue_timeout: Option<Timeout>,
    /// Split by phase: named only to say into what ([`RESPONSE_TIMEOUT_SPLIT`]).
    response_timeout: Option<Spanned<serde::de::IgnoredAny>>,
    connect_timeout: Option<Timeout>,
    first_byte_timeout: Option<Timeout>,
    first_byte_timeout_unstreamed: Option<Spanned<OptionalTimeout>>,
    idle_timeout: Option<Spanned<Timeout>>,
    total_timeout: Option<Spanned<OptionalTimeout>>,
    max_retries: Option<Spanned<u32>>,
    retry_window: Option<Spanned<Timeout>>,
    #[serde(default)]
    pool: Vec<Spanned<RawPool>>,
    default_model: Option<Spanned<String>>,
    max_client_connections: Option<Spanned<u32>>,
    client_header_timeout: Option<Spanned<Timeout>>,
    client_idle_timeout: Option<Timeout>,
    client_body_timeout: Option<Spanned<Timeout>>,
}

/// `[[service.pool]]`: the backends serving one model, with the service's settings unless set.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    model: Spanned<String>,
    aliases: Option<Spanned<Vec<String>>>,
    policy: Option<Policy>,
    max_requests_per_backend: Option<u32>,
    queue_size: Option<usize>,
    queue_timeout: Option<Timeout>,
    connect_timeout: Option<Timeout>,
    first_byte_timeout: Option<Timeout>,
    first_byte_timeout_unstreamed: Option<Spanned<OptionalTimeout>>,
    idle_timeout: Option<Spanned<Timeout>>,
    total_timeout: Option<Spanned<OptionalTimeout>>,
}

/// The timeouts of an exchange with a backend, as a service or one of its pools sets them (both
/// have the same keys: serde's `flatten` would lose `deny_unknown_fields` and the spans).
struct RawUpstream<'a> {
    connect_timeout: &'a Option<Timeout>,
    first_byte_timeout: &'a Option<Timeout>,
    first_byte_timeout_unstreamed: &'a Option<Spanned<OptionalTimeout>>,
    idle_timeout: &'a Option<Spanned<Timeout>>,
    total_timeout: &'a Option<Spanned<OptionalTimeout>>,
}

/// A raw service's or pool's [`RawUpstream`].
macro_rules! raw_upstream {
    ($raw:expr) => {
        RawUpstream {
            connect_timeout: &$raw.connect_timeout,
            first_byte_timeout: &$raw.first_byte_timeout,
            first_byte_timeout_unstreamed: &$raw.first_byte_timeout_unstreamed,
            idle_timeout: &$raw.idle_timeout,
            total_timeout: &$raw.total_timeout,
        }
    };
}

impl RawUpstream<'_> {
    /// These timeouts over `base` (the defaults, or a pool's service).
    fn over(&self, base: UpstreamTimeouts) -> UpstreamTimeouts {
        UpstreamTimeouts {
            connect: self.connect_timeout.as_ref().map_or(base.connect, |t| t.0),
            first_byte: self
                .first_byte_timeout
                .as_ref()
                .map_or(base.first_byte, |t| t.0),
            first_byte_unstreamed: self
                .first_byte_timeout_unstreamed
                .as_ref()
                .map_or(base.first_byte_unstreamed, |t| t.get_ref().0),
            idle: self
                .idle_timeout
                .as_ref()
                .map_or(base.idle, |t| t.get_ref().0),
            total: self
                .total_timeout
                .as_ref()
                .map_or(base.total, |t| t.get_ref().0),
        }
    }

    /// Those that only an http exchange has, with where each was set.
    fn http_only(&self) -> [(&'static str, Option<Range<usize>>); 3] {
        [
            (
                "first_byte_timeout_unstreamed",
                self.first_byte_timeout_unstreamed
                    .as_ref()
                    .map(Spanned::span),
            ),
            (
                "idle_timeout",
                self.idle_timeout.as_ref().map(Spanned::span),
            ),
            (
                "total_timeout",
                self.total_timeout.as_ref().map(Spanned::span),
            ),
        ]
    }
}

/// What a config that still sets `response_timeout` is told.
const RESPONSE_TIMEOUT_SPLIT: &str = "was split by phase, since llama-server sends the head of a \
     non-streamed answer only when its generation is done: set `connect_timeout`, \
     `first_byte_timeout` (until the first byte of the answer's body: a streamed generation's \
     first token, any other request's answer; default 300s), `first_byte_timeout_unstreamed` (a \
     non-streamed generation; default \"off\"), `idle_timeout` (between body bytes) or \
     `total_timeout` instead";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAffinity {
    key: Option<Vec<Spanned<String>>>,
    prefix_bytes: Option<Spanned<usize>>,
    load_factor: Option<Spanned<f64>>,
}

impl RawService {
    fn policy(&self) -> Policy {
        self.policy
            .as_ref()
            .map_or_else(Policy::default, |p| *p.get_ref())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEjection {
    consecutive_failures: Option<u32>,
    base_time: Option<Timeout>,
    max_time: Option<Timeout>,
    max_ejected_percent: Option<Spanned<u32>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlots {
    interval: Option<Timeout>,
    timeout: Option<Timeout>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    enabled: Option<bool>,
    path: Option<String>,
    interval: Option<Timeout>,
    timeout: Option<Timeout>,
    rise: Option<NonZeroU32>,
    fall: Option<NonZeroU32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Spanned<SocketAddrV4>,
    #[serde(default)]
    weight: Weight,
    #[serde(default)]
    max_connections: u32,
    #[serde(default)]
    models: Vec<String>,
}

/// An HTTP header name: one or more token characters (RFC 9110).
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// `"16384-32767"`: SNAT source ports, unprivileged and in order.
struct PortRange(RangeInclusive<u16>);

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let bad = |why: &str| serde::de::Error::custom(format_args!("`{text}`: {why}"));
        let (start, end) = text
            .split_once('-')
            .ok_or_else(|| bad("expected a port range like \"16384-32767\""))?;
        let port = |s: &str| {
            s.trim()
                .parse::<u16>()
                .map_err(|_| bad("ports are 1024..=65535"))
        };
        let (start, end) = (port(start)?, port(end)?);
        if start < 1024 {
            return Err(bad("ports below 1024 are reserved for services"));
        }
        if start > end {
            return Err(bad("the first port is above the last"));
        }
        Ok(PortRange(start..=end))
    }
}

/// `"500ms"`, `"10s"`, `"10m"`, `"1h"`; not zero.
struct Timeout(Duration);

impl<'de> Deserialize<'de> for Timeout {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text).map(Timeout).ok_or_else(|| {
            serde::de::Error::custom(format_args!(
                "`{text}` is not a duration like \"500ms\", \"10s\", \"10m\" or \"1h\" (above zero, at \
                 most 8760h)"
            ))
        })
    }
}

/// A duration, or `"off"` for none.
struct OptionalTimeout(Option<Duration>);

impl<'de> Deserialize<'de> for OptionalTimeout {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text == "off" {
            return Ok(OptionalTimeout(None));
        }
        parse_duration(&text)
            .map(|d| OptionalTimeout(Some(d)))
            .ok_or_else(|| {
                serde::de::Error::custom(format_args!(
                    "`{text}` is not \"off\" or a duration like \"500ms\", \"10s\", \"10m\" or \
                     \"1h\" (above zero, at most 8760h)"
                ))
            })
    }
}

/// The longest duration taken: a year. Longer ones mean "never" and would overflow the clock
/// they are added to.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// `"500ms"`, `"10s"`, `"10m"`, `"1h"`; `None` for anything else, zero or over a year.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let duration = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    };
    (!duration.is_zero() && duration <= MAX_DURATION).then_some(duration)
}

impl Config {
    /// The settings that differ in `new` and that a running agent cannot change (a reload
    /// refuses them), by key: the data plane, the admin API, the fleet and the apply limit.
    /// Services and instances are the reload's own to compare ([`crate::reload::Plan`]).
    pub fn needs_restart(&self, new: &Config) -> Vec<&'static str> {
        let (x, y) = (&self.xdp, &new.xdp);
        [
            (x.interfaces != y.interfaces, "agent.interfaces"),
            (x.mode != y.mode, "agent.xdp_mode"),
            (x.snat_ports != y.snat_ports, "agent.snat_ports"),
            (x.flow_events != y.flow_events, "agent.flow_events"),
            (
                x.conntrack_entries != y.conntrack_entries,
                "agent.conntrack_entries",
            ),
            (
                x.flow_idle_timeout != y.flow_idle_timeout,
                "agent.flow_idle_timeout",
            ),
            (
                x.closed_flow_timeout != y.closed_flow_timeout,
                "agent.closed_flow_timeout",
            ),
            (self.dataplane != new.dataplane, "agent.dataplane"),
            (self.admin_addr != new.admin_addr, "agent.admin_addr"),
            (
                self.admin_token_file != new.admin_token_file,
                "agent.admin_token_file",
            ),
            (
                self.admin_limits != new.admin_limits,
                "agent.admin_* limits",
            ),
            (
                self.max_concurrent_applies != new.max_concurrent_applies,
                "agent.max_concurrent_applies",
            ),
            (self.fleet != new.fleet, "[fleet]"),
        ]
        .into_iter()
        .filter_map(|(changed, key)| changed.then_some(key))
        .collect()
    }

    /// Where a client of the running agent (`steer reload`) reaches it: `admin_addr` (or
    /// `agent.admin_addr`, else the default) and the token file, read without validating the
    /// rest of the file, which is the agent's to judge (it says why it refuses one).
    pub fn admin_endpoint(
        path: &Path,
        admin_addr: Option<SocketAddr>,
    ) -> Result<(SocketAddr, PathBuf), ConfigError> {
        #[derive(Deserialize)]
        struct Admin {
            #[serde(default)]
            agent: AdminKeys,
        }
        #[derive(Default, Deserialize)]
        struct AdminKeys {
            admin_addr: Option<SocketAddr>,
            admin_token_file: Option<Spanned<PathBuf>>,
        }
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let facts = host::Facts::read();
        let doc = Doc {
            path,
            text: &text,
            facts: &facts,
        };
        let admin: Admin = toml::from_str(&text)
            .map_err(|error| doc.invalid(error.span(), "agent", error.message().trim()))?;
        let addr = admin_addr
            .or(admin.agent.admin_addr)
            .unwrap_or(DEFAULT_ADMIN_ADDR);
        Ok((addr, doc.token_path(admin.agent.admin_token_file.as_ref())))
    }

    /// Read and validate the config file, with command-line overrides applied.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(path, &text, overrides)
    }

    /// Validate config text against this host (its interfaces and ephemeral ports); `path`
    /// names it in errors, and relative token paths are taken from its directory.
    pub fn parse(path: &Path, text: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
        Config::parse_on(path, text, overrides, &host::Facts::read())
    }

    /// [`Config::parse`] against the host `facts` describe.
    pub fn parse_on(
        path: &Path,
        text: &str,
        overrides: &Overrides,
        facts: &host::Facts,
    ) -> Result<Config, ConfigError> {
        let doc = Doc { path, text, facts };
        let raw: RawConfig = serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|err| {
                let field = field_path(err.path());
                let inner = err.into_inner();
                doc.invalid(inner.span(), field, inner.message().trim())
            })?;
        doc.build(raw, overrides)
    }
}

/// etcd's shortest lease (`1.5 x` its default election timeout, rounded up) and a sane longest.
const MIN_LEASE_TTL: Duration = Duration::from_secs(2);
const MAX_LEASE_TTL: Duration = Duration::from_secs(3600);

/// `host:port`, as etcd-client takes an endpoint.
fn is_endpoint(endpoint: &str) -> bool {
    endpoint.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok_and(|p| p != 0)
    })
}

/// `service[0].backend[1].address`, without the segments `toml::Spanned` adds; `toml` for the
/// document itself (a syntax error).
fn field_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out += &format!("[{index}]"),
            Segment::Map { key } if key.starts_with("$__serde_spanned_private") => {}
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out += key;
            }
            Segment::Unknown => {}
        }
    }
    if out.is_empty() {
        "toml".to_owned()
    } else {
        out
    }
}

/// The text being validated, to turn byte spans into positions.
struct Doc<'a> {
    path: &'a Path,
    text: &'a str,
    facts: &'a host::Facts,
}

/// Where an instance's port and address are in the file.
struct InstanceSpans {
    port: Range<usize>,
    address: Option<Range<usize>>,
}

/// What the cross checks of [`Doc::addresses_apart`] read, once every part is built.
struct Settled<'a> {
    admin_addr: SocketAddr,
    services: &'a [ServiceSpec],
    instances: &'a [InstanceSpec],
}

/// Whether two listening sockets would clash: one port, and one address or a wildcard.
fn same_listener(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

impl Doc<'_> {
    fn location(&self, span: Option<Range<usize>>) -> Location {
        let line_column = span.map(|span| {
            let before = &self.text[..span.start.min(self.text.len())];
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            (
                before.matches('\n').count() + 1,
                before[line_start..].chars().count() + 1,
            )
        });
        Location {
            path: self.path.to_owned(),
            line_column,
        }
    }

    fn invalid(
        &self,
        span: Option<Range<usize>>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            location: self.location(span),
            field: field.into(),
            message: message.into(),
        }
    }

    fn build(&self, raw: RawConfig, overrides: &Overrides) -> Result<Config, ConfigError> {
        let agent = raw.agent;
        let interfaces_span = agent.interfaces.as_ref().map(Spanned::span);
        let interfaces = self.interfaces(agent.interfaces, &overrides.interfaces)?;
        let admin_token_file = self.token_path(agent.admin_token_file.as_ref());
        let admin_addr = overrides
            .admin_addr
            .or(agent.admin_addr.map(Spanned::into_inner))
            .unwrap_or(DEFAULT_ADMIN_ADDR);
        if raw.service.len() > lb_common::MAX_SERVICES as usize {
            let extra = &raw.service[lb_common::MAX_SERVICES as usize];
            return Err(self.invalid(
                Some(extra.span()),
                format!("service[{}]", lb_common::MAX_SERVICES),
                format!("at most {} services", lb_common::MAX_SERVICES),
            ));
        }
        let mut services: Vec<ServiceSpec> = Vec::with_capacity(raw.service.len());
        for (i, service) in raw.service.iter().enumerate() {
            let service = self.service(i, service.get_ref(), &services)?;
            services.push(service);
        }
        let max_concurrent_applies = agent.max_concurrent_applies.unwrap_or(NonZeroUsize::MIN);
        let fleet = raw.fleet.map(|f| self.fleet(f)).transpose()?;
        let instance_spans: Vec<InstanceSpans> = raw
            .instance
            .iter()
            .map(|i| InstanceSpans {
                port: i.port.span(),
                address: i.address.as_ref().map(Spanned::span),
            })
            .collect();
        let instances = self.instances(raw.instance, &services, fleet.is_some())?;
        let dataplane = overrides.dataplane.or(agent.dataplane).unwrap_or_default();
        let snat_span = agent.snat_ports.as_ref().map(Spanned::span);
        let snat_ports = agent
            .snat_ports
            .map_or(DEFAULT_SNAT_PORTS, |p| p.into_inner().0);
        let settled = Settled {
            admin_addr,
            services: &services,
            instances: &instances,
        };
        self.addresses_apart(&settled, &raw.service, &instance_spans)?;
        // Not root, `xdp` runs as `userspace` (with a warning): these would not apply.
        let xdp = dataplane == DataplaneKind::Xdp && self.facts.loads_bpf;
        if xdp {
            self.loopback_unsteered(&raw.service, &services, &instances, &instance_spans)?;
            self.snat_outside_ephemeral(&snat_ports, snat_span)?;
        }
        // XDP attaches to them; an instance without `address` takes the first one's.
        if xdp
            || instances
                .iter()
                .any(|i| i.backend.as_ref().is_some_and(|b| b.address.is_none()))
        {
            self.interfaces_exist(&interfaces, interfaces_span, &overrides.interfaces)?;
        }
        let default = AdminLimits::default();
        let admin_limits = AdminLimits {
            max_connections: self.at_least_one(
                agent.admin_max_connections.as_ref(),
                "agent.admin_max_connections",
                default.max_connections,
            )?,
            header_timeout: agent
                .admin_header_timeout
                .map_or(default.header_timeout, |t| t.0),
            idle_timeout: agent
                .admin_idle_timeout
                .map_or(default.idle_timeout, |t| t.0),
            body_timeout: agent
                .admin_body_timeout
                .map_or(default.body_timeout, |t| t.0),
        };
        Ok(Config {
            path: self.path.to_owned(),
            xdp: XdpOptions {
                interfaces,
                mode: overrides.xdp_mode.or(agent.xdp_mode).unwrap_or_default(),
                snat_ports,
                flow_events: agent.flow_events.unwrap_or(true),
                conntrack_entries: agent
                    .conntrack_entries
                    .map_or(DEFAULT_CONNTRACK_ENTRIES, NonZeroU32::get),
                flow_idle_timeout: agent
                    .flow_idle_timeout
                    .map_or(DEFAULT_FLOW_IDLE_TIMEOUT, |t| t.0),
                closed_flow_timeout: agent
                    .closed_flow_timeout
                    .map_or(DEFAULT_CLOSED_FLOW_TIMEOUT, |t| t.0),
                backend_time_wait: XdpOptions::BACKEND_TIME_WAIT,
            },
            admin_addr,
            admin_token_file,
            admin_limits,
            services,
            dataplane,
            instances,
            shutdown_timeout: agent
                .shutdown_timeout
                .map_or(DEFAULT_SHUTDOWN_TIMEOUT, |t| t.0),
            max_concurrent_applies,
            fleet,
        })
    }

    /// No two of the admin API, the services and the instances listen where another does, and
    /// no backend is a service's own address (a connection to it would loop back to the agent).
    fn addresses_apart(
        &self,
        settled: &Settled<'_>,
        raw_services: &[Spanned<RawService>],
        instance_spans: &[InstanceSpans],
    ) -> Result<(), ConfigError> {
        let mut listeners: Vec<(SocketAddr, String)> = vec![(
            settled.admin_addr,
            "the admin API (agent.admin_addr)".to_owned(),
        )];
        for (i, (service, raw)) in settled.services.iter().zip(raw_services).enumerate() {
            let address = SocketAddr::V4(service.address);
            if let Some((_, owner)) = listeners.iter().find(|(a, _)| same_listener(*a, address)) {
                return Err(self.invalid(
                    Some(raw.get_ref().address.span()),
                    format!("service[{i}].address"),
                    format!("{address} is where {owner} listens"),
                ));
            }
            listeners.push((address, format!("service `{}`", service.name)));
        }
        for (i, (instance, spans)) in settled.instances.iter().zip(instance_spans).enumerate() {
            let address = SocketAddr::new(instance.listen_ip(), instance.port);
            if let Some((_, owner)) = listeners.iter().find(|(a, _)| same_listener(*a, address)) {
                return Err(self.invalid(
                    Some(spans.port.clone()),
                    format!("instance[{i}].port"),
                    format!("llama-server would listen on {address}, where {owner} listens"),
                ));
            }
        }
        let vip = |address: SocketAddrV4| settled.services.iter().find(|s| s.address == address);
        for (i, raw) in raw_services.iter().enumerate() {
            for (j, backend) in raw.get_ref().backend.iter().enumerate() {
                let address = *backend.get_ref().address.get_ref();
                if let Some(service) = vip(address) {
                    return Err(self.invalid(
                        Some(backend.get_ref().address.span()),
                        format!("service[{i}].backend[{j}].address"),
                        format!(
                            "{address} is the address of service `{}`: a backend must be a \
                             server, not the balancer",
                            service.name
                        ),
                    ));
                }
            }
        }
        for (i, (instance, spans)) in settled.instances.iter().zip(instance_spans).enumerate() {
            let address = instance.backend.as_ref().and_then(|b| b.address);
            if let Some(service) = address.and_then(vip) {
                return Err(self.invalid(
                    spans.address.clone(),
                    format!("instance[{i}].address"),
                    format!(
                        "{} is the address of service `{}`: a backend must be a server, not \
                         the balancer",
                        SocketAddr::V4(service.address),
                        service.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// With XDP, a service the kernel steers (l4) cannot have a backend on loopback: the
    /// program rewrites a packet from the wire to it, and the kernel drops it as a martian.
    fn loopback_unsteered(
        &self,
        raw_services: &[Spanned<RawService>],
        services: &[ServiceSpec],
        instances: &[InstanceSpec],
        instance_spans: &[InstanceSpans],
    ) -> Result<(), ConfigError> {
        const FIX: &str = "XDP steers this l4 service's connections and cannot forward them to \
                           loopback (they would be lost): give the backend an address other hosts \
                           reach, or carry the service through the proxy with `mode = \"http\"` or \
                           `agent.dataplane = \"userspace\"`";
        for (i, (service, raw)) in services.iter().zip(raw_services).enumerate() {
            if !service.kernel_steers() {
                continue;
            }
            let looped = service
                .backends
                .iter()
                .position(|b| b.address.ip().is_loopback());
            if let Some(j) = looped {
                let address = &raw.get_ref().backend[j].get_ref().address;
                return Err(self.invalid(
                    Some(address.span()),
                    format!("service[{i}].backend[{j}].address"),
                    format!("{} is a loopback address: {FIX}", address.get_ref()),
                ));
            }
        }
        for (i, (instance, spans)) in instances.iter().zip(instance_spans).enumerate() {
            let Some(backend) = &instance.backend else {
                continue;
            };
            let steered = services
                .iter()
                .any(|s| s.name == backend.service && s.kernel_steers());
            if let Some(address) = backend.address.filter(|a| steered && a.ip().is_loopback()) {
                return Err(self.invalid(
                    spans.address.clone(),
                    format!("instance[{i}].address"),
                    format!("{address} is a loopback address: {FIX}"),
                ));
            }
        }
        Ok(())
    }

    /// The SNAT ports must lie outside the kernel's ephemeral range: a connection of the host's
    /// own could take a port a balanced flow holds, and replies would reach the wrong one.
    fn snat_outside_ephemeral(
        &self,
        snat: &RangeInclusive<u16>,
        span: Option<Range<usize>>,
    ) -> Result<(), ConfigError> {
        let Some(ephemeral) = &self.facts.ephemeral_ports else {
            return Ok(());
        };
        let (first, last) = (
            *snat.start().max(ephemeral.start()),
            *snat.end().min(ephemeral.end()),
        );
        // Reserved ports are the kernel's way out: it picks none of them for itself.
        let reserved = |port: u16| self.facts.reserved_ports.iter().any(|r| r.contains(&port));
        if first > last || (first..=last).all(reserved) {
            return Ok(());
        }
        let set = if span.is_some() {
            "they are set here"
        } else {
            "they are the default"
        };
        Err(self.invalid(
            span,
            "agent.snat_ports",
            format!(
                "SNAT ports {}-{} overlap this host's ephemeral ports {}-{} \
                 (net.ipv4.ip_local_port_range; {set}): set agent.snat_ports to a range outside \
                 them, reserve them (net.ipv4.ip_local_reserved_ports), or narrow the ephemeral \
                 range",
                snat.start(),
                snat.end(),
                ephemeral.start(),
                ephemeral.end()
            ),
        ))
    }

    fn interfaces_exist(
        &self,
        interfaces: &[String],
        span: Option<Range<usize>>,
        flags: &[String],
    ) -> Result<(), ConfigError> {
        let Some(missing) = interfaces
            .iter()
            .find(|name| !self.facts.interfaces.contains(name))
        else {
            return Ok(());
        };
        let (span, field) = if flags.is_empty() {
            (span, "agent.interfaces")
        } else {
            (None, "--interface")
        };
        let mut known = self.facts.interfaces.clone();
        known.sort();
        Err(self.invalid(
            span,
            field,
            format!(
                "`{missing}` is not an interface of this host (it has {})",
                known.join(", ")
            ),
        ))
    }

    /// `[fleet]`; it needs a steer built with the `etcd` feature.
    fn fleet(&self, raw: Spanned<RawFleet>) -> Result<FleetSpec, ConfigError> {
        if !cfg!(feature = "etcd") {
            return Err(self.invalid(
                Some(raw.span()),
                "fleet",
                "this steer was built without the `etcd` feature (`cargo build --features \
                 lb-userspace/etcd`)",
            ));
        }
        let raw = raw.into_inner();
        let endpoints_span = raw.endpoints.span();
        let endpoints = raw.endpoints.into_inner();
        if endpoints.is_empty() {
            return Err(self.invalid(
                Some(endpoints_span),
                "fleet.endpoints",
                "give at least one etcd endpoint (`host:port`)",
            ));
        }
        if let Some(bad) = endpoints.iter().find(|e| !is_endpoint(e)) {
            return Err(self.invalid(
                Some(endpoints_span),
                "fleet.endpoints",
                format!("`{bad}` is not `host:port`"),
            ));
        }
        let prefix = match raw.prefix {
            None => FleetSpec::DEFAULT_PREFIX.to_owned(),
            Some(prefix) => {
                let span = prefix.span();
                let prefix = prefix.into_inner();
                let segments_ok = prefix
                    .strip_prefix('/')
                    .is_some_and(|rest| rest.split('/').all(is_fleet_name));
                if !segments_ok {
                    return Err(self.invalid(
                        Some(span),
                        "fleet.prefix",
                        format!(
                            "`{prefix}` is not a key prefix: `/` then names of letters, digits, \
                             `.`, `_` or `-` joined by `/`, no trailing `/` (e.g. `/steer/fleet/prod`)"
                        ),
                    ));
                }
                prefix
            }
        };
        let host = match raw.host {
            Some(host) => {
                let span = host.span();
                let host = host.into_inner();
                if !is_fleet_name(&host) {
                    return Err(self.invalid(
                        Some(span),
                        "fleet.host",
                        format!("`{host}` is not a name of letters, digits, `.`, `_` or `-`"),
                    ));
                }
                host
            }
            None => {
                let name = nix::unistd::gethostname()
                    .ok()
                    .and_then(|n| n.into_string().ok())
                    .filter(|n| is_fleet_name(n));
                name.ok_or_else(|| {
                    self.invalid(
                        None,
                        "fleet.host",
                        "the hostname is not a usable fleet name: set `fleet.host`",
                    )
                })?
            }
        };
        let lease_ttl = match raw.lease_ttl {
            None => FleetSpec::DEFAULT_LEASE_TTL,
            Some(ttl) => {
                let span = ttl.span();
                let ttl = ttl.into_inner().0;
                if !(MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&ttl) || ttl.subsec_nanos() != 0 {
                    return Err(self.invalid(
                        Some(span),
                        "fleet.lease_ttl",
                        format!(
                            "whole seconds from {MIN_LEASE_TTL:?} (etcd's shortest lease) to \
                             {MAX_LEASE_TTL:?}"
                        ),
                    ));
                }
                ttl
            }
        };
        let auth = match (raw.user, raw.password_file) {
            (None, None) => None,
            (Some(user), Some(password_file)) => Some(EtcdAuth {
                user: user.into_inner(),
                password_file: self.relative(password_file.into_inner()),
            }),
            (Some(user), None) => {
                return Err(self.invalid(
                    Some(user.span()),
                    "fleet.password_file",
                    "`user` needs `password_file` (the password is never in the config)",
                ));
            }
            (None, Some(file)) => {
                return Err(self.invalid(
                    Some(file.span()),
                    "fleet.user",
                    "`password_file` needs `user`",
                ));
            }
        };
        let tls = match raw.tls {
            None => None,
            Some(tls) => {
                let span = tls.span();
                let tls = tls.into_inner();
                if tls.cert.is_some() != tls.key.is_some() {
                    return Err(self.invalid(
                        Some(span),
                        "fleet.tls",
                        "`cert` and `key` go together (a client certificate and its key)",
                    ));
                }
                Some(EtcdTls {
                    ca: self.relative(tls.ca),
                    cert: tls.cert.map(|p| self.relative(p)),
                    key: tls.key.map(|p| self.relative(p)),
                    server_name: tls.server_name,
                })
            }
        };
        Ok(FleetSpec {
            endpoints,
            prefix,
            host,
            lease_ttl,
            cache: raw.cache.map_or_else(
                || PathBuf::from(FleetSpec::DEFAULT_CACHE),
                |p| self.relative(p),
            ),
            auth,
            tls,
        })
    }

    /// `path` taken from the config file's directory when relative.
    fn relative(&self, path: PathBuf) -> PathBuf {
        match self.path.parent() {
            Some(dir) => dir.join(path),
            None => path,
        }
    }

    /// The service's proxy settings; a cap or body limit of the other mode is an error.
    fn proxy(&self, i: usize, raw: &RawService) -> Result<ProxySpec, ConfigError> {
        let span = |field: &Option<Spanned<u32>>| field.as_ref().map(Spanned::span);
        let timeout_span = |field: &Option<Spanned<Timeout>>| field.as_ref().map(Spanned::span);
        if let Some(old) = &raw.response_timeout {
            return Err(self.invalid(
                Some(old.span()),
                format!("service[{i}].response_timeout"),
                RESPONSE_TIMEOUT_SPLIT,
            ));
        }
        let (cap, misplaced) = match raw.mode {
            ProxyMode::L4 => (
                &raw.max_connections_per_backend,
                vec![
                    (
                        "max_requests_per_backend",
                        span(&raw.max_requests_per_backend),
                    ),
                    (
                        "max_request_body",
                        raw.max_request_body.as_ref().map(Spanned::span),
                    ),
                    (
                        "client_header_timeout",
                        timeout_span(&raw.client_header_timeout),
                    ),
                    (
                        "client_body_timeout",
                        timeout_span(&raw.client_body_timeout),
                    ),
                    ("max_retries", span(&raw.max_retries)),
                    ("retry_window", timeout_span(&raw.retry_window)),
                ]
                .into_iter()
                .chain(raw_upstream!(raw).http_only())
                .collect::<Vec<_>>(),
            ),
            ProxyMode::Http => (
                &raw.max_requests_per_backend,
                vec![(
                    "max_connections_per_backend",
                    span(&raw.max_connections_per_backend),
                )],
            ),
        };
        let default = ProxySpec::default();
        let config = ProxySpec {
            mode: raw.mode,
            max_per_backend: cap.as_ref().map_or(0, |c| *c.get_ref()),
            queue_size: raw.queue_size.unwrap_or(default.queue_size),
            queue_timeout: raw
                .queue_timeout
                .as_ref()
                .map_or(default.queue_timeout, |t| t.0),
            upstream: raw_upstream!(raw).over(default.upstream),
            max_retries: raw
                .max_retries
                .as_ref()
                .map_or(default.max_retries, |n| *n.get_ref()),
            retry_window: raw
                .retry_window
                .as_ref()
                .map_or(default.retry_window, |t| t.get_ref().0),
            max_request_body: raw
                .max_request_body
                .as_ref()
                .map_or(default.max_request_body, |b| *b.get_ref()),
            max_client_connections: self.at_least_one(
                raw.max_client_connections.as_ref(),
                &format!("service[{i}].max_client_connections"),
                default.max_client_connections,
            )?,
            client_header_timeout: raw
                .client_header_timeout
                .as_ref()
                .map_or(default.client_header_timeout, |t| t.get_ref().0),
            client_idle_timeout: raw
                .client_idle_timeout
                .as_ref()
                .map_or(default.client_idle_timeout, |t| t.0),
            client_body_timeout: raw
                .client_body_timeout
                .as_ref()
                .map_or(default.client_body_timeout, |t| t.get_ref().0),
        };
        for (field, span) in misplaced {
            if let Some(span) = span {
                let mode = if raw.mode == ProxyMode::L4 {
                    "l4"
                } else {
                    "http"
                };
                let hint = if field.starts_with("client_") {
                    "an l4 connection has no request head or body; client_idle_timeout bounds \
                     its wait for a first byte"
                        .to_owned()
                } else if !field.starts_with("max_") || field == "max_retries" {
                    "an l4 connection is carried as bytes, with no request to send again or \
                     answer to time; connect_timeout and first_byte_timeout bound its backend"
                        .to_owned()
                } else {
                    format!("this service's cap per backend is `{}`", config.cap_field())
                };
                return Err(self.invalid(
                    Some(span),
                    format!("service[{i}].{field}"),
                    format!("not for mode = \"{mode}\" ({hint})"),
                ));
            }
        }
        Ok(config)
    }

    /// A connection cap: `default` when unset, at least 1.
    fn at_least_one(
        &self,
        value: Option<&Spanned<u32>>,
        field: &str,
        default: usize,
    ) -> Result<usize, ConfigError> {
        match value {
            None => Ok(default),
            Some(value) if *value.get_ref() == 0 => Err(self.invalid(
                Some(value.span()),
                field,
                "must be at least 1 (it caps the connections held at once)",
            )),
            Some(value) => Ok(*value.get_ref() as usize),
        }
    }

    /// A service's slot poll: with policy `slots` or a `[service.slots]` table.
    fn slot_poll(&self, i: usize, raw: &RawService) -> Result<Option<SlotPoll>, ConfigError> {
        let slots_policy = std::iter::once(raw.policy())
            .chain(raw.pool.iter().filter_map(|p| p.get_ref().policy))
            .any(|policy| policy == Policy::Slots);
        let (span, slots) = match &raw.slots {
            Some(slots) => (Some(slots.span()), slots.get_ref()),
            None if slots_policy => (None, &RawSlots::default()),
            None => return Ok(None),
        };
        let default = SlotPoll::default();
        let poll = SlotPoll {
            interval: slots.interval.as_ref().map_or(default.interval, |t| t.0),
            timeout: slots.timeout.as_ref().map_or(default.timeout, |t| t.0),
        };
        if poll.timeout > poll.interval {
            return Err(self.invalid(
                span,
                format!("service[{i}].slots.timeout"),
                "must not be longer than the interval",
            ));
        }
        Ok(Some(poll))
    }

    /// `fleet`: whether the config has `[fleet]` (an instance group needs it).
    fn instances(
        &self,
        raw: Vec<RawInstance>,
        services: &[ServiceSpec],
        fleet: bool,
    ) -> Result<Vec<InstanceSpec>, ConfigError> {
        let mut instances: Vec<InstanceSpec> = Vec::with_capacity(raw.len());
        for (i, instance) in raw.into_iter().enumerate() {
            let name = instance.name.get_ref().trim();
            let field = |what: &str| format!("instance[{i}].{what}");
            if name.is_empty() {
                let span = Some(instance.name.span());
                return Err(self.invalid(span, field("name"), "must not be empty"));
            }
            if let Some(other) = instances.iter().position(|s| s.name == name) {
                let span = Some(instance.name.span());
                let message = format!("`{name}` is already the name of instance[{other}]");
                return Err(self.invalid(span, field("name"), message));
            }
            // The name is a URL path segment and, by default, the store's config name.
            if let Err(error) = crate::store::check_name(name) {
                return Err(self.invalid(
                    Some(instance.name.span()),
                    field("name"),
                    error.to_string(),
                ));
            }
            let driver = match instance.config_driver.clone() {
                Some(driver) => {
                    let span = Some(instance.name.span());
                    if let Err(error) = crate::store::check_name(driver.name()) {
                        return Err(self.invalid(
                            span,
                            field("config_driver.name"),
                            error.to_string(),
                        ));
                    }
                    driver
                }
                None => supervisor::default_driver(name),
            };
            // Two instances on one stored config would each start the other's arguments.
            if let Some(other) = instances.iter().position(|s| s.driver == driver) {
                let span = Some(instance.name.span());
                let message = format!(
                    "its arguments would be stored under config name `{}` in the same store as \
                     instance[{other}]'s: give it its own `config_driver` name",
                    driver.name()
                );
                return Err(self.invalid(span, field("config_driver"), message));
            }
            let port = instance.port.get_ref().get();
            if let Some(other) = instances.iter().position(|s| s.port == port) {
                let span = Some(instance.port.span());
                let message = format!("port {port} is already instance[{other}]'s");
                return Err(self.invalid(span, field("port"), message));
            }
            let timeout = |t: Option<Timeout>, default| t.map_or(default, |t| t.0);
            let default = InstanceSettings::default();
            let backend = self.instance_backend(i, &instance, services)?;
            let group = match instance.group {
                None => None,
                Some(group) => {
                    let span = Some(group.span());
                    let group = group.into_inner();
                    let problem = if !is_fleet_name(&group) {
                        Some(format!(
                            "`{group}` is not a name of letters, digits, `.`, `_` or `-`"
                        ))
                    } else if backend.is_none() {
                        Some(
                            "a group's instances are in the fleet as backends: set `service`"
                                .to_owned(),
                        )
                    } else if !fleet {
                        Some("groups are shared through the fleet: add `[fleet]`".to_owned())
                    } else {
                        None
                    };
                    if let Some(message) = problem {
                        return Err(self.invalid(span, field("group"), message));
                    }
                    Some(group)
                }
            };
            let mut extra_args = instance.args;
            let sets_host = extra_args
                .iter()
                .any(|a| a == "--host" || a.starts_with("--host="));
            if backend.is_some() && !sets_host {
                // llama-server listens on 127.0.0.1 by default: NATed traffic would not reach it.
                extra_args.extend(["--host".to_owned(), "0.0.0.0".to_owned()]);
            }
            instances.push(InstanceSpec {
                driver,
                name: name.to_owned(),
                binary: instance.binary,
                model: instance.model,
                port,
                extra_args,
                backend,
                group,
                settings: InstanceSettings {
                    startup_timeout: timeout(instance.startup_timeout, default.startup_timeout),
                    debounce: timeout(instance.debounce, default.debounce),
                    stop_grace: timeout(instance.stop_grace, default.stop_grace),
                    allowed_binaries: instance.allowed_binaries,
                    api_flags: instance.api_flags,
                    model_dirs: instance.model_dirs,
                    user: instance.user,
                },
            });
        }
        Ok(instances)
    }

    /// The backend an instance with `service` is; `address` and `drain_timeout` need `service`.
    fn instance_backend(
        &self,
        i: usize,
        instance: &RawInstance,
        services: &[ServiceSpec],
    ) -> Result<Option<InstanceBackend>, ConfigError> {
        let field = |what: &str| format!("instance[{i}].{what}");
        let Some(service) = &instance.service else {
            let stray = [
                ("address", instance.address.as_ref().map(Spanned::span)),
                (
                    "drain_timeout",
                    instance.drain_timeout.as_ref().map(Spanned::span),
                ),
            ];
            if let Some((what, span)) = stray.into_iter().find(|(_, span)| span.is_some()) {
                let message = "only an instance with `service` is a backend";
                return Err(self.invalid(span, field(what), message));
            }
            return Ok(None);
        };
        let name = service.get_ref().trim();
        if !services.iter().any(|s| s.name == name) {
            let message = format!("no service named `{name}`");
            return Err(self.invalid(Some(service.span()), field("service"), message));
        }
        let address = match &instance.address {
            Some(address) => Some(self.endpoint(address, || field("address"))?),
            None => None,
        };
        Ok(Some(InstanceBackend {
            service: name.to_owned(),
            address,
            drain_timeout: instance
                .drain_timeout
                .as_ref()
                .map_or(supervisor::DEFAULT_DRAIN_TIMEOUT, |t| t.get_ref().0),
        }))
    }

    fn interfaces(
        &self,
        file: Option<Spanned<Vec<String>>>,
        flags: &[String],
    ) -> Result<Vec<String>, ConfigError> {
        let (names, span, field) = match file {
            _ if !flags.is_empty() => (flags.to_vec(), None, "--interface"),
            Some(names) => {
                let span = names.span();
                (names.into_inner(), Some(span), "agent.interfaces")
            }
            None => (Vec::new(), None, "agent.interfaces"),
        };
        if names.is_empty() {
            return Err(self.invalid(
                span,
                field,
                "no interface to attach to: list at least one, or pass --interface",
            ));
        }
        if names.len() > lb_common::MAX_INTERFACES as usize {
            return Err(self.invalid(
                span,
                field,
                format!("at most {} interfaces", lb_common::MAX_INTERFACES),
            ));
        }
        for (i, name) in names.iter().enumerate() {
            let valid = !name.is_empty()
                && name.len() <= MAX_INTERFACE_NAME
                && !name.contains(['/', ' ', '\0']);
            if !valid {
                return Err(self.invalid(
                    span.clone(),
                    field,
                    format!("`{name}` is not a valid interface name"),
                ));
            }
            if names[..i].contains(name) {
                return Err(self.invalid(span, field, format!("`{name}` is listed twice")));
            }
        }
        Ok(names)
    }

    /// `agent.admin_token_file`, relative to the config's directory; the default otherwise.
    fn token_path(&self, file: Option<&Spanned<PathBuf>>) -> PathBuf {
        match file {
            Some(file) => self.relative(file.get_ref().clone()),
            None => PathBuf::from(crate::token::DEFAULT_TOKEN_FILE),
        }
    }

    /// Service `i`; its name and address must differ from the `earlier` ones'.
    fn service(
        &self,
        i: usize,
        raw: &RawService,
        earlier: &[ServiceSpec],
    ) -> Result<ServiceSpec, ConfigError> {
        let slots = self.slot_poll(i, raw)?;
        let name = raw.name.get_ref().trim();
        if name.is_empty() {
            return Err(self.invalid(
                Some(raw.name.span()),
                format!("service[{i}].name"),
                "must not be empty",
            ));
        }
        let address = self.endpoint(&raw.address, || format!("service[{i}].address"))?;
        let max = lb_common::MAX_BACKENDS_PER_SERVICE as usize;
        if let Some(extra) = raw.backend.get(max) {
            return Err(self.invalid(
                Some(extra.span()),
                format!("service[{i}].backend[{max}]"),
                format!("at most {max} backends per service"),
            ));
        }
        let mut backends: Vec<BackendSpec> = Vec::with_capacity(raw.backend.len());
        for (j, backend) in raw.backend.iter().map(Spanned::get_ref).enumerate() {
            let field = || format!("service[{i}].backend[{j}].address");
            let address = self.endpoint(&backend.address, field)?;
            if let Some(other) = backends.iter().position(|b| b.address == address) {
                return Err(self.invalid(
                    Some(backend.address.span()),
                    field(),
                    format!("{address} is already backend[{other}] of this service"),
                ));
            }
            backends.push(BackendSpec {
                address,
                weight: backend.weight,
                max_connections: backend.max_connections,
                models: backend.models.clone(),
            });
        }
        let health = self.health(i, raw.health.as_ref())?;
        // After every error above, in the order the file's errors were always reported.
        if let Some(other) = earlier.iter().position(|s| s.name == name) {
            return Err(self.invalid(
                Some(raw.name.span()),
                format!("service[{i}].name"),
                format!("`{name}` is already the name of service[{other}]"),
            ));
        }
        if let Some(other) = earlier.iter().position(|s| s.address == address) {
            return Err(self.invalid(
                Some(raw.address.span()),
                format!("service[{i}].address"),
                format!("{address} is already the address of service[{other}]"),
            ));
        }
        let proxy = self.proxy(i, raw)?;
        let (pools, default_pool) = self.pools(i, raw, &proxy)?;
        Ok(ServiceSpec {
            name: name.to_owned(),
            address,
            policy: raw.policy(),
            backends,
            health,
            slots,
            proxy,
            pools,
            default_pool,
            affinity: self.affinity(i, raw)?,
            ejection: self.ejection(i, raw)?,
        })
    }

    /// A service's model pools and the index of its default one; each name (model or alias)
    /// belongs to one pool only.
    fn pools(
        &self,
        i: usize,
        raw: &RawService,
        proxy: &ProxySpec,
    ) -> Result<(Vec<PoolSpec>, usize), ConfigError> {
        if let (Some(first), ProxyMode::L4) = (raw.pool.first(), raw.mode) {
            return Err(self.invalid(
                Some(first.span()),
                format!("service[{i}].pool[0]"),
                "not for mode = \"l4\" (pools route each request by its `model`: set mode = \"http\")",
            ));
        }
        let mut pools: Vec<PoolSpec> = Vec::with_capacity(raw.pool.len());
        for (j, pool) in raw.pool.iter().map(Spanned::get_ref).enumerate() {
            let field = |what: &str| format!("service[{i}].pool[{j}].{what}");
            let model = pool.model.get_ref().trim();
            let aliases_span = pool.aliases.as_ref().map(Spanned::span);
            let aliases: Vec<String> = pool
                .aliases
                .as_ref()
                .map_or(&[][..], |a| a.get_ref())
                .iter()
                .map(|a| a.trim().to_owned())
                .collect();
            let names: Vec<&str> = std::iter::once(model)
                .chain(aliases.iter().map(String::as_str))
                .collect();
            for (n, &name) in names.iter().enumerate() {
                let (what, span) = if n == 0 {
                    ("model", Some(pool.model.span()))
                } else {
                    ("aliases", aliases_span.clone())
                };
                let message = if name.is_empty() {
                    "a name must not be empty".to_owned()
                } else if let Some(other) = pools.iter().position(|p| p.names().any(|m| m == name))
                {
                    format!("`{name}` is already a name of pool[{other}]")
                } else if names[..n].contains(&name) {
                    format!("`{name}` is listed twice in this pool")
                } else {
                    continue;
                };
                return Err(self.invalid(span, field(what), message));
            }
            pools.push(PoolSpec {
                model: model.to_owned(),
                aliases,
                policy: pool.policy.unwrap_or(raw.policy()),
                max_per_backend: pool
                    .max_requests_per_backend
                    .unwrap_or(proxy.max_per_backend),
                queue_size: pool.queue_size.unwrap_or(proxy.queue_size),
                queue_timeout: pool
                    .queue_timeout
                    .as_ref()
                    .map_or(proxy.queue_timeout, |t| t.0),
                upstream: raw_upstream!(pool).over(proxy.upstream),
            });
        }
        let Some(default_model) = &raw.default_model else {
            return Ok((pools, 0));
        };
        let wanted = default_model.get_ref().trim();
        match pools.iter().position(|p| p.names().any(|n| n == wanted)) {
            Some(default) => Ok((pools, default)),
            None => {
                let message = if pools.is_empty() {
                    "needs [[service.pool]] tables: it names the pool of requests without `model`"
                        .to_owned()
                } else {
                    let models: Vec<&str> = pools.iter().map(|p| p.model.as_str()).collect();
                    format!(
                        "no pool has model `{wanted}` (models: {})",
                        models.join(", ")
                    )
                };
                Err(self.invalid(
                    Some(default_model.span()),
                    format!("service[{i}].default_model"),
                    message,
                ))
            }
        }
    }

    /// `[service.affinity]`, which policy `cache_affinity` (http only; of the service or of a
    /// pool) reads and nothing else.
    /// `[service.ejection]`: on by default for an http service (the proxy sees its answers), an
    /// error for l4.
    fn ejection(&self, i: usize, raw: &RawService) -> Result<Option<EjectionSpec>, ConfigError> {
        let field = |what: &str| format!("service[{i}].ejection{what}");
        if raw.mode != ProxyMode::Http {
            return match &raw.ejection {
                Some(table) => Err(self.invalid(
                    Some(table.span()),
                    field(""),
                    "only mode = \"http\" sees the answers it counts failures by",
                )),
                None => Ok(None),
            };
        }
        let default = EjectionSpec::default();
        let Some(table) = &raw.ejection else {
            return Ok(Some(default));
        };
        let table = table.get_ref();
        let spec = EjectionSpec {
            consecutive_failures: table
                .consecutive_failures
                .unwrap_or(default.consecutive_failures),
            base_time: table.base_time.as_ref().map_or(default.base_time, |t| t.0),
            max_time: table.max_time.as_ref().map_or(default.max_time, |t| t.0),
            max_percent: table
                .max_ejected_percent
                .as_ref()
                .map_or(default.max_percent, |p| *p.get_ref()),
        };
        if let Some(percent) = &table.max_ejected_percent
            && !(1..=100).contains(percent.get_ref())
        {
            return Err(self.invalid(
                Some(percent.span()),
                field(".max_ejected_percent"),
                "must be 1 to 100",
            ));
        }
        if spec.max_time < spec.base_time {
            return Err(self.invalid(
                raw.ejection.as_ref().map(Spanned::span),
                field(".max_time"),
                "must not be shorter than base_time",
            ));
        }
        Ok((spec.consecutive_failures > 0).then_some(spec))
    }

    fn affinity(&self, i: usize, raw: &RawService) -> Result<Option<AffinitySpec>, ConfigError> {
        let field = |what: &str| format!("service[{i}].{what}");
        let keyed = std::iter::once(raw.policy())
            .chain(raw.pool.iter().filter_map(|p| p.get_ref().policy))
            .any(|policy| policy == Policy::CacheAffinity);
        if !keyed {
            return match &raw.affinity {
                Some(table) => Err(self.invalid(
                    Some(table.span()),
                    field("affinity"),
                    "only policy \"cache_affinity\" reads it",
                )),
                None => Ok(None),
            };
        }
        if raw.mode != ProxyMode::Http {
            return Err(self.invalid(
                raw.policy.as_ref().map(Spanned::span),
                field("policy"),
                "`cache_affinity` keys each request (session header, API key, prompt): it needs \
                 mode = \"http\"",
            ));
        }
        let mut spec = AffinitySpec::default();
        let Some(table) = &raw.affinity else {
            return Ok(Some(spec));
        };
        let table = table.get_ref();
        if let Some(keys) = &table.key {
            spec.keys = self.affinity_keys(i, keys, raw.affinity.as_ref().map(Spanned::span))?;
        }
        if let Some(bytes) = &table.prefix_bytes {
            spec.prefix_bytes = NonZeroUsize::new(*bytes.get_ref()).ok_or_else(|| {
                self.invalid(
                    Some(bytes.span()),
                    field("affinity.prefix_bytes"),
                    "must be at least 1 (the bytes of the prompt that key a request)",
                )
            })?;
        }
        if let Some(factor) = &table.load_factor {
            let value = *factor.get_ref();
            spec.load_factor = LoadFactor::new(value).ok_or_else(|| {
                self.invalid(
                    Some(factor.span()),
                    field("affinity.load_factor"),
                    format!(
                        "must be above 1 and at most {} (c in: no backend above c times the \
                         mean load; at 1 or below the bounds leave no room), got {value}",
                        LoadFactor::MAX
                    ),
                )
            })?;
        }
        Ok(Some(spec))
    }

    /// `[service.affinity] key`: `header:NAME`, `api_key`, `prompt_prefix`, `client`, each at
    /// most once, nothing after `client` (always present).
    fn affinity_keys(
        &self,
        i: usize,
        raw: &[Spanned<String>],
        table: Option<Range<usize>>,
    ) -> Result<Vec<AffinityKey>, ConfigError> {
        if raw.is_empty() {
            return Err(self.invalid(
                table,
                format!("service[{i}].affinity.key"),
                "must name at least one key (the default: [\"header:x-session-id\", \
                 \"api_key\", \"prompt_prefix\", \"client\"])",
            ));
        }
        let mut keys: Vec<AffinityKey> = Vec::with_capacity(raw.len());
        for (j, text) in raw.iter().enumerate() {
            let bad = |message: String| {
                self.invalid(
                    Some(text.span()),
                    format!("service[{i}].affinity.key[{j}]"),
                    message,
                )
            };
            let key = match text.get_ref().as_str() {
                "api_key" => AffinityKey::ApiKey,
                "prompt_prefix" => AffinityKey::PromptPrefix,
                "client" => AffinityKey::Client,
                other => match other.strip_prefix("header:") {
                    Some(name) if is_header_name(name) => {
                        AffinityKey::Header(name.to_ascii_lowercase())
                    }
                    Some(name) => {
                        return Err(bad(format!("`{name}` is not an HTTP header name")));
                    }
                    None => {
                        return Err(bad(format!(
                            "`{other}` is not a key: use \"header:NAME\", \"api_key\", \
                             \"prompt_prefix\" or \"client\""
                        )));
                    }
                },
            };
            if let Some(earlier) = keys.iter().position(|k| *k == key) {
                return Err(bad(format!("`{key}` is already key[{earlier}]")));
            }
            if let Some(client) = keys.iter().position(|k| *k == AffinityKey::Client) {
                return Err(bad(format!(
                    "`client` (key[{client}]) is always present: a key after it is never used"
                )));
            }
            keys.push(key);
        }
        Ok(keys)
    }

    fn health(
        &self,
        i: usize,
        raw: Option<&Spanned<RawHealth>>,
    ) -> Result<Option<HealthSpec>, ConfigError> {
        let Some(raw) = raw else {
            return Ok(Some(HealthSpec::default()));
        };
        let (span, raw) = (raw.span(), raw.get_ref());
        if raw.enabled == Some(false) {
            return Ok(None);
        }
        let default = HealthSpec::default();
        let health = HealthSpec {
            path: raw.path.clone().unwrap_or(default.path),
            interval: raw.interval.as_ref().map_or(default.interval, |t| t.0),
            timeout: raw.timeout.as_ref().map_or(default.timeout, |t| t.0),
            rise: raw.rise.unwrap_or(default.rise),
            fall: raw.fall.unwrap_or(default.fall),
        };
        if !health.path.starts_with('/') || health.path.chars().any(char::is_whitespace) {
            return Err(self.invalid(
                Some(span),
                format!("service[{i}].health.path"),
                format!(
                    "`{}` is not an absolute URL path like \"/health\"",
                    health.path
                ),
            ));
        }
        if health.timeout > health.interval {
            return Err(self.invalid(
                Some(span),
                format!("service[{i}].health.timeout"),
                "must not be longer than the interval",
            ));
        }
        Ok(Some(health))
    }

    /// A VIP or backend address: a real host and port.
    fn endpoint(
        &self,
        address: &Spanned<SocketAddrV4>,
        field: impl Fn() -> String,
    ) -> Result<SocketAddrV4, ConfigError> {
        let addr = *address.get_ref();
        if !usable_endpoint(addr) {
            return Err(self.invalid(
                Some(address.span()),
                field(),
                format!("{addr} is not a usable address and port"),
            ));
        }
        Ok(addr)
    }
}

/// The summary `steer check-config` prints.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let xdp = &self.xdp;
        writeln!(f, "{}: valid", self.path.display())?;
        let mode = match (self.dataplane, xdp.mode) {
            (DataplaneKind::Userspace, _) => "no XDP: dataplane userspace",
            (DataplaneKind::Xdp, XdpMode::Native) => "native XDP",
            (DataplaneKind::Xdp, XdpMode::Skb) => "skb XDP",
        };
        writeln!(f, "interfaces: {} ({mode})", xdp.interfaces.join(", "))?;
        writeln!(
            f,
            "admin API: {} (changes need the bearer token in {})",
            self.admin_addr,
            self.admin_token_file.display()
        )?;
        writeln!(
            f,
            "flows: SNAT ports {}-{}, {} conntrack entries, idle timeout {:?}, closed timeout {:?}, events {}",
            xdp.snat_ports.start(),
            xdp.snat_ports.end(),
            xdp.conntrack_entries,
            xdp.flow_idle_timeout,
            xdp.closed_flow_timeout,
            if xdp.flow_events { "on" } else { "off" },
        )?;
        writeln!(
            f,
            "shutdown: requests in flight get {:?}; {} apply(s) at a time across instances",
            self.shutdown_timeout, self.max_concurrent_applies,
        )?;
        for service in &self.services {
            writeln!(
                f,
                "service {} {} {}: {} backend(s)",
                service.name,
                service.address,
                service.policy,
                service.backends.len()
            )?;
            for b in &service.backends {
                writeln!(
                    f,
                    "  {} weight {} max_connections {}{}",
                    b.address,
                    b.weight.get(),
                    b.max_connections,
                    if b.models.is_empty() {
                        String::new()
                    } else {
                        format!(" models {}", b.models.join(", "))
                    }
                )?;
            }
            for (i, pool) in service.pools.iter().enumerate() {
                writeln!(
                    f,
                    "  pool {}{} {}{}",
                    pool.names().collect::<Vec<_>>().join(" = "),
                    if i == service.default_pool {
                        " (default)"
                    } else {
                        ""
                    },
                    pool.policy,
                    format_args!(
                        " max_requests_per_backend {} queue_size {} queue_timeout {:?}",
                        pool.max_per_backend, pool.queue_size, pool.queue_timeout
                    ),
                )?;
            }
        }
        for instance in &self.instances {
            writeln!(
                f,
                "instance {}: {} --model {} --port {} {} (config {:?})",
                instance.name,
                instance.binary,
                instance.model,
                instance.port,
                supervisor::policy::redact_argv(&instance.extra_args).join(" "),
                instance.driver,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[agent]
interfaces = ["eth0", "eth1"]
xdp_mode = "skb"
snat_ports = "10000-10999"
conntrack_entries = 1024
flow_idle_timeout = "1h"
closed_flow_timeout = "500ms"
flow_events = false

[[service]]
name = "chat"
address = "10.0.0.100:80"
policy = "least_connections"

[[service.backend]]
address = "10.0.1.2:8080"
weight = 3
max_connections = 8

[[service.backend]]
address = "10.0.1.3:8080"

[[service]]
name = "embed"
address = "10.0.0.100:81"
"#;

    /// The host the tests' configs are checked against.
    fn facts() -> host::Facts {
        host::Facts {
            interfaces: ["lo", "eth0", "eth1"].map(String::from).to_vec(),
            ephemeral_ports: Some(32768..=60999),
            reserved_ports: Vec::new(),
            loads_bpf: true,
        }
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse_on(
            Path::new("steer.toml"),
            text,
            &Overrides::default(),
            &facts(),
        )
    }

    /// The error's line, field and message, or a panic naming what came back instead.
    fn invalid(text: &str) -> (usize, String, String) {
        match parse(text) {
            Err(ConfigError::Invalid {
                location:
                    Location {
                        line_column: Some((line, _)),
                        ..
                    },
                field,
                message,
            }) => (line, field, message),
            other => panic!("expected a located error, got {other:?}"),
        }
    }

    #[test]
    fn full_config_is_typed() -> Result<(), ConfigError> {
        let config = parse(EXAMPLE)?;
        assert_eq!(config.xdp.interfaces, ["eth0", "eth1"]);
        assert_eq!(config.xdp.mode, XdpMode::Skb);
        assert_eq!(config.xdp.snat_ports, 10000..=10999);
        assert_eq!(config.xdp.conntrack_entries, 1024);
        assert_eq!(config.xdp.flow_idle_timeout, Duration::from_secs(3600));
        assert_eq!(config.xdp.closed_flow_timeout, Duration::from_millis(500));
        assert!(!config.xdp.flow_events);
        assert_eq!(config.admin_addr, DEFAULT_ADMIN_ADDR);
        assert_eq!(
            config.admin_token_file,
            Path::new(crate::token::DEFAULT_TOKEN_FILE)
        );
        assert_eq!(config.services.len(), 2);
        let chat = &config.services[0];
        assert_eq!(chat.policy, Policy::LeastConnections);
        assert_eq!(chat.backends[0].weight.get(), 3);
        assert_eq!(chat.backends[0].max_connections, 8);
        assert_eq!(chat.backends[1].weight, Weight::ONE);
        assert_eq!(config.services[1].policy, Policy::Slots, "the default");
        assert!(config.services[1].backends.is_empty());
        assert!(
            config
                .to_string()
                .contains("service chat 10.0.0.100:80 least_connections")
        );
        Ok(())
    }

    #[test]
    fn proxy_settings_default_per_service() -> Result<(), ConfigError> {
        let text = "[agent]\ninterfaces = [\"lo\"]\ndataplane = \"userspace\"\n\n[[service]]\nname = \"a\"\n\
                    address = \"127.0.0.2:80\"\nmode = \"l4\"\nmax_connections_per_backend = 1\n\
                    queue_size = 3\nqueue_timeout = \"2s\"\nfirst_byte_timeout = \"5s\"\n\
                    connect_timeout = \"1s\"\n\n\
                    [[service]]\nname = \"b\"\naddress = \"127.0.0.2:81\"\n";
        let config = parse(text)?;
        assert_eq!(config.dataplane, DataplaneKind::Userspace);
        let a = &config.services[0].proxy;
        assert_eq!(
            (
                config.services[0].name.as_str(),
                a.max_per_backend,
                a.queue_size
            ),
            ("a", 1, 3)
        );
        assert_eq!(a.queue_timeout, Duration::from_secs(2));
        assert_eq!(
            (a.upstream.first_byte, a.upstream.connect),
            (Duration::from_secs(5), Duration::from_secs(1))
        );
        let b = &config.services[1].proxy;
        assert_eq!((b.mode, b.max_per_backend), (ProxyMode::L4, 0));
        assert_eq!(b.queue_size, ProxySpec::default().queue_size);
        assert_eq!(b.queue_timeout, ProxySpec::default().queue_timeout);
        assert_eq!(b.upstream, UpstreamTimeouts::default());
        assert_eq!(parse(EXAMPLE)?.dataplane, DataplaneKind::Xdp);
        Ok(())
    }

    #[test]
    fn http_services_cap_requests_and_each_mode_rejects_the_others_fields()
    -> Result<(), ConfigError> {
        let service = |extra: &str| {
            format!(
                "[agent]\ninterfaces = [\"lo\"]\n\n[[service]]\nname = \"chat\"\n\
                 address = \"127.0.0.2:80\"\n{extra}\n"
            )
        };
        let config = parse(&service(
            "mode = \"http\"\nmax_requests_per_backend = 1\nmax_request_body = 1000",
        ))?;
        let chat = &config.services[0].proxy;
        assert_eq!(
            (chat.mode, chat.max_per_backend, chat.max_request_body),
            (ProxyMode::Http, 1, 1000)
        );
        assert_eq!(chat.cap_field(), "max_requests_per_backend");
        assert_eq!(
            parse(&service("mode = \"http\""))?.services[0]
                .proxy
                .max_request_body,
            ProxySpec::default().max_request_body
        );
        for (extra, line, field, names) in [
            (
                "mode = \"http\"\nmax_connections_per_backend = 1",
                8,
                "service[0].max_connections_per_backend",
                "max_requests_per_backend",
            ),
            (
                "max_requests_per_backend = 1",
                7,
                "service[0].max_requests_per_backend",
                "max_connections_per_backend",
            ),
            (
                "max_request_body = 10",
                7,
                "service[0].max_request_body",
                "max_connections_per_backend",
            ),
            (
                "idle_timeout = \"10s\"",
                7,
                "service[0].idle_timeout",
                "connect_timeout and first_byte_timeout",
            ),
            (
                "max_retries = 1",
                7,
                "service[0].max_retries",
                "no request to send again",
            ),
        ] {
            let (at, got, message) = invalid(&service(extra));
            assert_eq!((at, got.as_str()), (line, field), "{extra}: {message}");
            assert!(message.contains(names), "{extra}: {message}");
        }
        Ok(())
    }

    #[test]
    fn upstream_timeouts_are_set_by_phase_per_service_and_pool() -> Result<(), ConfigError> {
        let service = |extra: &str| {
            format!(
                "[agent]\ninterfaces = [\"lo\"]\n\n[[service]]\nname = \"chat\"\n\
                 address = \"127.0.0.2:80\"\nmode = \"http\"\n{extra}\n"
            )
        };
        let defaults = parse(&service(""))?;
        let proxy = &defaults.services[0].proxy;
        assert_eq!(proxy.upstream, UpstreamTimeouts::default());
        assert_eq!(
            (proxy.upstream.first_byte_unstreamed, proxy.upstream.total),
            (None, None),
            "nothing bounds a working generation by default"
        );
        let set = parse(&service(
            "connect_timeout = \"2s\"\nfirst_byte_timeout = \"1m\"\n\
             first_byte_timeout_unstreamed = \"10m\"\nidle_timeout = \"30s\"\n\
             total_timeout = \"1h\"\nmax_retries = 0\nretry_window = \"5s\"\n\
             [[service.pool]]\nmodel = \"a\"\n\
             [[service.pool]]\nmodel = \"b\"\nfirst_byte_timeout_unstreamed = \"off\"\n\
             idle_timeout = \"5s\"",
        ))?;
        let chat = &set.services[0];
        let service_timeouts = UpstreamTimeouts {
            connect: Duration::from_secs(2),
            first_byte: Duration::from_secs(60),
            first_byte_unstreamed: Some(Duration::from_secs(600)),
            idle: Duration::from_secs(30),
            total: Some(Duration::from_secs(3600)),
        };
        assert_eq!(chat.proxy.upstream, service_timeouts);
        assert_eq!(
            (chat.proxy.max_retries, chat.proxy.retry_window),
            (0, Duration::from_secs(5))
        );
        assert_eq!(chat.pools[0].upstream, service_timeouts, "the service's");
        assert_eq!(
            chat.pools[1].upstream,
            UpstreamTimeouts {
                first_byte_unstreamed: None,
                idle: Duration::from_secs(5),
                ..service_timeouts
            }
        );
        let (line, field, message) = invalid(&service("response_timeout = \"100s\""));
        assert_eq!((line, field.as_str()), (8, "service[0].response_timeout"));
        assert!(
            message.contains("first_byte_timeout_unstreamed") && message.contains("idle_timeout"),
            "{message}"
        );
        let message = parse(&service("total_timeout = \"never\""))
            .expect_err("not a duration")
            .to_string();
        assert!(
            message.contains("is not \"off\" or a duration"),
            "{message}"
        );
        Ok(())
    }

    #[test]
    fn ejection_is_on_for_http_services_and_refused_for_l4() -> Result<(), ConfigError> {
        let service = |extra: &str| {
            format!(
                "[agent]\ninterfaces = [\"lo\"]\n\n[[service]]\nname = \"chat\"\n\
                 address = \"127.0.0.2:80\"\n{extra}\n"
            )
        };
        let http = parse(&service("mode = \"http\""))?;
        assert_eq!(http.services[0].ejection, Some(EjectionSpec::default()));
        assert_eq!(parse(&service(""))?.services[0].ejection, None, "l4");
        let set = parse(&service(
            "mode = \"http\"\n[service.ejection]\nconsecutive_failures = 3\nbase_time = \"5s\"\n\
             max_time = \"1m\"\nmax_ejected_percent = 20",
        ))?;
        assert_eq!(
            set.services[0].ejection,
            Some(EjectionSpec {
                consecutive_failures: 3,
                base_time: Duration::from_secs(5),
                max_time: Duration::from_secs(60),
                max_percent: 20,
            })
        );
        let off = "mode = \"http\"\n[service.ejection]\nconsecutive_failures = 0";
        assert_eq!(parse(&service(off))?.services[0].ejection, None);
        for (extra, field, says) in [
            (
                "[service.ejection]\nconsecutive_failures = 3",
                "service[0].ejection",
                "mode = \"http\"",
            ),
            (
                "mode = \"http\"\n[service.ejection]\nmax_ejected_percent = 0",
                "service[0].ejection.max_ejected_percent",
                "1 to 100",
            ),
            (
                "mode = \"http\"\n[service.ejection]\nbase_time = \"10m\"",
                "service[0].ejection.max_time",
                "not be shorter than base_time",
            ),
        ] {
            let (_, got, message) = invalid(&service(extra));
            assert_eq!(got, field, "{extra}: {message}");
            assert!(message.contains(says), "{extra}: {message}");
        }
        Ok(())
    }

    #[test]
    fn pools_take_the_service_settings_unless_set_and_names_are_unique() -> Result<(), ConfigError>
    {
        let service = |extra: &str| {
            format!(
                "[agent]\ninterfaces = [\"lo\"]\n\n[[service]]\nname = \"chat\"\n\
                 address = \"127.0.0.2:80\"\nmode = \"http\"\npolicy = \"round_robin\"\n\
                 max_requests_per_backend = 2\nqueue_size = 9\n{extra}\n\
                 [[service.backend]]\naddress = \"127.0.0.1:8081\"\nmodels = [\"qwen\"]\n"
            )
        };
        let plain = parse(&service(""))?;
        assert!(plain.services[0].pools.is_empty(), "no pools: one over all");
        assert!(plain.services[0].slots.is_none());
        let pools = "[[service.pool]]\nmodel = \"smol\"\naliases = [\"gpt-4o-mini\"]\n\
                     [[service.pool]]\nmodel = \"qwen\"\npolicy = \"slots\"\n\
                     max_requests_per_backend = 1\nqueue_size = 3\nqueue_timeout = \"2s\"\n";
        let config = parse(&service(&format!("default_model = \"qwen\"\n{pools}")))?;
        let chat = &config.services[0];
        assert_eq!(chat.backends[0].models, ["qwen"]);
        assert_eq!(chat.default_pool, 1);
        assert_eq!(
            chat.pools[0],
            PoolSpec {
                model: "smol".to_owned(),
                aliases: vec!["gpt-4o-mini".to_owned()],
                policy: Policy::RoundRobin,
                max_per_backend: 2,
                queue_size: 9,
                queue_timeout: ProxySpec::default().queue_timeout,
                upstream: UpstreamTimeouts::default(),
            }
        );
        let qwen = &chat.pools[1];
        assert_eq!(
            (qwen.policy, qwen.max_per_backend, qwen.queue_size),
            (Policy::Slots, 1, 3)
        );
        assert_eq!(qwen.queue_timeout, Duration::from_secs(2));
        assert!(chat.slots.is_some(), "a slots pool polls slots");
        assert!(qwen.served_by(&["qwen".to_owned()]));
        assert!(chat.pools[0].served_by(&["x".to_owned(), "gpt-4o-mini".to_owned()]));
        assert!(!chat.pools[0].served_by(&["qwen".to_owned()]));
        assert_eq!(
            parse(&service(pools))?.services[0].default_pool,
            0,
            "the first"
        );
        let by_alias = parse(&service(&format!(
            "default_model = \"gpt-4o-mini\"\n{pools}"
        )))?;
        assert_eq!(by_alias.services[0].default_pool, 0);
        assert!(
            by_alias
                .to_string()
                .contains("pool smol = gpt-4o-mini (default) round_robin")
        );

        for (extra, field, says) in [
            (
                pools.replace("\"gpt-4o-mini\"", "\"qwen\""),
                "service[0].pool[1].model",
                "`qwen` is already a name of pool[0]",
            ),
            (
                pools.replace("\"gpt-4o-mini\"", "\"smol\""),
                "service[0].pool[0].aliases",
                "`smol` is listed twice in this pool",
            ),
            (
                pools.replace("\"gpt-4o-mini\"", "\" \""),
                "service[0].pool[0].aliases",
                "a name must not be empty",
            ),
            (
                format!("default_model = \"llama\"\n{pools}"),
                "service[0].default_model",
                "no pool has model `llama` (models: smol, qwen)",
            ),
            (
                "default_model = \"llama\"".to_owned(),
                "service[0].default_model",
                "needs [[service.pool]] tables",
            ),
            (
                pools.replace("queue_size = 3", "queue_sise = 3"),
                "service[0].pool[1].queue_sise",
                "unknown field `queue_sise`",
            ),
            (
                pools.replace("model = \"qwen\"", "model = 3"),
                "service[0].pool[1].model",
                "invalid type",
            ),
        ] {
            let (_, got, message) = invalid(&service(&extra));
            assert_eq!(got, field, "{extra}: {message}");
            assert!(message.contains(says), "{extra}: {message}");
        }
        let l4 = service(pools)
            .replace("mode = \"http\"", "mode = \"l4\"")
            .replace("max_requests_per_backend = 2\n", "");
        let (line, field, message) = invalid(&l4);
        assert_eq!((line, field.as_str()), (10, "service[0].pool[0]"));
        assert!(message.contains("set mode = \"http\""), "{message}");
        Ok(())
    }

    #[test]
    fn defaults_and_overrides() -> Result<(), ConfigError> {
        let overrides = Overrides {
            interfaces: vec!["veth9".to_owned()],
            xdp_mode: Some(XdpMode::Native),
            admin_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            dataplane: Some(DataplaneKind::Userspace),
        };
        let config = Config::parse_on(Path::new("x.toml"), "", &overrides, &facts())?;
        assert_eq!(config.dataplane, DataplaneKind::Userspace);
        assert_eq!(config.xdp.interfaces, ["veth9"]);
        assert_eq!(config.xdp.mode, XdpMode::Native);
        assert_eq!(config.admin_addr.port(), 0);
        assert_eq!(config.xdp.snat_ports, DEFAULT_SNAT_PORTS);
        assert_eq!(config.xdp.flow_idle_timeout, DEFAULT_FLOW_IDLE_TIMEOUT);
        assert_eq!(config.shutdown_timeout, DEFAULT_SHUTDOWN_TIMEOUT);
        assert_eq!(config.max_concurrent_applies.get(), 1);
        assert!(config.xdp.flow_events);
        let summary = config.to_string();
        assert!(
            summary.contains("interfaces: veth9 (no XDP: dataplane userspace)"),
            "check-config must not claim XDP under userspace: {summary}"
        );
        let config = Config::parse_on(Path::new("x.toml"), EXAMPLE, &overrides, &facts())?;
        assert_eq!(
            config.xdp.interfaces,
            ["veth9"],
            "--interface replaces the file's list"
        );
        Ok(())
    }

    #[test]
    fn serde_errors_name_line_and_field() {
        let text = EXAMPLE.replace("\"10.0.1.3:8080\"", "\"10.0.1.3\"");
        let (line, field, message) = invalid(&text);
        assert_eq!(
            (line, field.as_str()),
            (22, "service[0].backend[1].address")
        );
        assert!(message.contains("socket address"), "{message}");

        let text = EXAMPLE.replace("weight = 3", "weight = 0");
        let (line, field, message) = invalid(&text);
        assert_eq!((line, field.as_str()), (18, "service[0].backend[0].weight"));
        assert_eq!(message, "weight must be between 1 and 65535, got 0");

        let text = EXAMPLE.replace("flow_events = false", "flow_event = false");
        let (line, field, message) = invalid(&text);
        assert_eq!((line, field.as_str()), (9, "agent.flow_event"));
        assert!(message.contains("unknown field `flow_event`"), "{message}");

        let (line, field, _) = invalid(&EXAMPLE.replace("\"1h\"", "\"1 hour\""));
        assert_eq!((line, field.as_str()), (7, "agent.flow_idle_timeout"));
        let (line, field, _) = invalid(&EXAMPLE.replace("\"skb\"", "\"generic\""));
        assert_eq!((line, field.as_str()), (4, "agent.xdp_mode"));
        let (line, field, _) = invalid(&EXAMPLE.replace("10000-10999", "10999-10000"));
        assert_eq!((line, field.as_str()), (5, "agent.snat_ports"));
        let (line, field, _) = invalid(&EXAMPLE.replace("10000-10999", "80-90"));
        assert_eq!((line, field.as_str()), (5, "agent.snat_ports"));
        let (line, _, _) = invalid("[agent]\ninterfaces = eth0\nxdp_mode = \"skb\"\n");
        assert_eq!(line, 2, "syntax errors are located too");
    }

    #[test]
    fn validation_errors_name_line_and_field() {
        let text = EXAMPLE.replace("\"embed\"", "\"chat\"");
        let (line, field, message) = invalid(&text);
        assert_eq!((line, field.as_str()), (25, "service[1].name"));
        assert!(message.contains("service[0]"), "{message}");

        let (line, field, _) = invalid(&EXAMPLE.replace(":81", ":80"));
        assert_eq!((line, field.as_str()), (26, "service[1].address"));

        let text = EXAMPLE.replace("10.0.1.3:8080", "10.0.1.2:8080");
        let (line, field, message) = invalid(&text);
        assert_eq!(
            (line, field.as_str()),
            (22, "service[0].backend[1].address")
        );
        assert!(message.contains("backend[0]"), "{message}");

        let (line, field, _) = invalid(&EXAMPLE.replace("10.0.1.3:8080", "10.0.1.3:0"));
        assert_eq!(
            (line, field.as_str()),
            (22, "service[0].backend[1].address")
        );

        let (line, field, _) = invalid(&EXAMPLE.replace("[\"eth0\", \"eth1\"]", "[]"));
        assert_eq!((line, field.as_str()), (3, "agent.interfaces"));
        let (line, field, _) = invalid(&EXAMPLE.replace("\"eth1\"", "\"eth0\""));
        assert_eq!((line, field.as_str()), (3, "agent.interfaces"));
    }

    #[test]
    fn health_checks_default_on_and_can_be_tuned_or_turned_off() -> Result<(), ConfigError> {
        let config = parse(EXAMPLE)?;
        assert_eq!(config.services[0].health, Some(HealthSpec::default()));
        let tuned = EXAMPLE.replace(
            "policy = \"least_connections\"\n",
            "policy = \"least_connections\"\n[service.health]\npath = \"/ready\"\n\
             interval = \"2s\"\ntimeout = \"1s\"\nrise = 3\nfall = 1\n",
        );
        let health = parse(&tuned)?.services[0].health.clone();
        assert_eq!(
            health,
            Some(HealthSpec {
                path: "/ready".to_owned(),
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(1),
                rise: NonZeroU32::MIN.saturating_add(2),
                fall: NonZeroU32::MIN,
            })
        );
        let off = format!("{EXAMPLE}[service.health]\nenabled = false\n");
        assert_eq!(parse(&off)?.services[1].health, None);

        let bad_path = tuned.replace("\"/ready\"", "\"ready\"");
        let (line, field, _) = invalid(&bad_path);
        assert_eq!((line, field.as_str()), (15, "service[0].health.path"));
        let slow = tuned.replace("\"1s\"", "\"3s\"");
        let (_, field, message) = invalid(&slow);
        assert_eq!(field, "service[0].health.timeout");
        assert!(message.contains("interval"), "{message}");
        Ok(())
    }

    #[test]
    fn missing_interfaces_names_file_and_field() {
        match parse("") {
            Err(err @ ConfigError::Invalid { .. }) => {
                let text = err.to_string();
                assert!(
                    text.starts_with("steer.toml: agent.interfaces: no interface"),
                    "{text}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    /// What check-config (and `steer run`) refuse although each part alone is valid: the
    /// error's line (0: none), field and message.
    fn refusal(text: &str, overrides: &Overrides, facts: &host::Facts) -> (usize, String, String) {
        match Config::parse_on(Path::new("steer.toml"), text, overrides, facts) {
            Err(ConfigError::Invalid {
                location,
                field,
                message,
            }) => (location.line_column.map_or(0, |(l, _)| l), field, message),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn configs_that_cannot_work_are_refused_with_line_and_reason() -> Result<(), ConfigError> {
        let none = Overrides::default();
        let chat = "[agent]\ninterfaces = [\"eth0\"]\n\n[[service]]\nname = \"chat\"\n\
                    address = \"10.0.0.100:80\"\n";
        let backend =
            |address: &str| format!("{chat}[[service.backend]]\naddress = \"{address}\"\n");
        let instance = |extra: &str| {
            format!(
                "{chat}\n[[instance]]\nname = \"gpt\"\nbinary = \"llama-server\"\n\
                 model = \"m.gguf\"\nport = 8081\n{extra}"
            )
        };

        // A backend that is the balancer itself.
        let (line, field, message) = refusal(&backend("10.0.0.100:80"), &none, &facts());
        assert_eq!((line, field.as_str()), (8, "service[0].backend[0].address"));
        assert!(
            message.contains("is the address of service `chat`"),
            "{message}"
        );
        let text = instance("service = \"chat\"\naddress = \"10.0.0.100:80\"\n");
        let (line, field, message) = refusal(&text, &none, &facts());
        assert_eq!((line, field.as_str()), (14, "instance[0].address"));
        assert!(
            message.contains("10.0.0.100:80 is the address of service `chat`"),
            "{message}"
        );

        // Two listeners on one address, or on one port with a wildcard.
        let text = chat.replace("[agent]\n", "[agent]\nadmin_addr = \"10.0.0.100:80\"\n");
        let (line, field, message) = refusal(&text, &none, &facts());
        assert_eq!((line, field.as_str()), (7, "service[0].address"));
        assert!(
            message.contains("where the admin API (agent.admin_addr) listens"),
            "{message}"
        );
        let text = chat.replace("[agent]\n", "[agent]\nadmin_addr = \"0.0.0.0:80\"\n");
        assert_eq!(refusal(&text, &none, &facts()).1, "service[0].address");
        let text = instance("").replace("[agent]\n", "[agent]\nadmin_addr = \"127.0.0.1:8081\"\n");
        let (line, field, message) = refusal(&text, &none, &facts());
        assert_eq!((line, field.as_str()), (13, "instance[0].port"));
        assert!(
            message.contains("would listen on 127.0.0.1:8081, where the admin API"),
            "{message}"
        );
        // llama-server's own 127.0.0.1 is apart from the VIP's port; its --host 0.0.0.0 is not.
        let on_80 = instance("").replace("port = 8081", "port = 80");
        parse(&on_80)?;
        let text = on_80.replace(
            "port = 80\n",
            "port = 80\nargs = [\"--host\", \"0.0.0.0\"]\n",
        );
        let (_, field, message) = refusal(&text, &none, &facts());
        assert_eq!(field, "instance[0].port");
        assert!(
            message.contains("0.0.0.0:80, where service `chat` listens"),
            "{message}"
        );

        // Loopback backends of a service XDP steers; the proxy's paths may have them.
        let (line, field, message) = refusal(&backend("127.0.0.1:8080"), &none, &facts());
        assert_eq!((line, field.as_str()), (8, "service[0].backend[0].address"));
        assert!(
            message.contains("127.0.0.1:8080 is a loopback address"),
            "{message}"
        );
        assert!(
            message.contains("agent.dataplane = \"userspace\""),
            "{message}"
        );
        let text = instance("service = \"chat\"\naddress = \"127.0.0.1:8081\"\n");
        assert_eq!(refusal(&text, &none, &facts()).1, "instance[0].address");
        let http = backend("127.0.0.1:8080").replace(
            "[[service.backend]]",
            "mode = \"http\"\n[[service.backend]]",
        );
        parse(&http)?;
        let userspace =
            backend("127.0.0.1:8080").replace("[agent]\n", "[agent]\ndataplane = \"userspace\"\n");
        parse(&userspace)?;
        let flag = Overrides {
            dataplane: Some(DataplaneKind::Userspace),
            ..Overrides::default()
        };
        Config::parse_on(
            Path::new("x.toml"),
            &backend("127.0.0.1:8080"),
            &flag,
            &facts(),
        )?;
        // Not root, `xdp` runs as `userspace`: nothing of XDP's is checked.
        let not_root = host::Facts {
            loads_bpf: false,
            ..facts()
        };
        let text = backend("127.0.0.1:8080").replace("\"eth0\"", "\"eth9\"");
        Config::parse_on(Path::new("x.toml"), &text, &none, &not_root)?;

        // SNAT ports among the ephemeral ones, set or by default.
        let text = chat.replace("[agent]\n", "[agent]\nsnat_ports = \"30000-40000\"\n");
        let (line, field, message) = refusal(&text, &none, &facts());
        assert_eq!((line, field.as_str()), (2, "agent.snat_ports"));
        assert!(
            message
                .contains("SNAT ports 30000-40000 overlap this host's ephemeral ports 32768-60999"),
            "{message}"
        );
        let wide = host::Facts {
            ephemeral_ports: Some(1024..=65535),
            ..facts()
        };
        let (line, field, message) = refusal(chat, &none, &wide);
        assert_eq!((line, field.as_str()), (0, "agent.snat_ports"));
        assert!(message.contains("they are the default"), "{message}");
        Config::parse_on(Path::new("x.toml"), &userspace, &none, &wide)?;
        // Reserved, the overlap is no clash: the kernel picks none of them for itself.
        let mut reserved = host::Facts {
            reserved_ports: vec![32768..=39999],
            ..facts()
        };
        assert_eq!(
            refusal(&text, &none, &reserved).1,
            "agent.snat_ports",
            "40000 is not"
        );
        reserved.reserved_ports.push(40000..=40000);
        Config::parse_on(Path::new("x.toml"), &text, &none, &reserved)?;

        // Interfaces the host lacks, from the file or the flag; not needed without XDP.
        let text = chat.replace("\"eth0\"", "\"eth9\"");
        let (line, field, message) = refusal(&text, &none, &facts());
        assert_eq!((line, field.as_str()), (2, "agent.interfaces"));
        assert_eq!(
            message,
            "`eth9` is not an interface of this host (it has eth0, eth1, lo)"
        );
        let flag = Overrides {
            interfaces: vec!["eth9".to_owned()],
            ..Overrides::default()
        };
        assert_eq!(refusal(chat, &flag, &facts()).1, "--interface");
        parse(&text.replace("[agent]\n", "[agent]\ndataplane = \"userspace\"\n"))?;
        // ...unless an instance takes its address from the first one.
        let text = instance("service = \"chat\"\n")
            .replace("\"eth0\"", "\"eth9\"")
            .replace("[agent]\n", "[agent]\ndataplane = \"userspace\"\n");
        assert_eq!(refusal(&text, &none, &facts()).1, "agent.interfaces");
        Ok(())
    }

    #[test]
    fn a_reload_names_the_settings_that_need_a_restart() -> Result<(), ConfigError> {
        let running = parse(EXAMPLE)?;
        let edited = |from: &str, to: &str| parse(&EXAMPLE.replace(from, to));
        let timeout = edited("[agent]\n", "[agent]\nshutdown_timeout = \"5s\"\n")?;
        assert!(
            running.needs_restart(&timeout).is_empty(),
            "the timeout reloads"
        );
        let backends = edited("max_connections = 8", "max_connections = 9")?;
        assert!(
            running.needs_restart(&backends).is_empty(),
            "services are the plan's"
        );
        let moved = edited("[agent]\n", "[agent]\nadmin_addr = \"127.0.0.1:9191\"\n")?;
        assert_eq!(running.needs_restart(&moved), ["agent.admin_addr"]);
        let both = parse(
            &EXAMPLE
                .replace("10000-10999", "11000-11999")
                .replace("\"eth0\", \"eth1\"", "\"eth0\""),
        )?;
        assert_eq!(
            running.needs_restart(&both),
            ["agent.interfaces", "agent.snat_ports"]
        );
        Ok(())
    }

    #[test]
    fn too_many_backends_and_services() {
        let mut text = String::from(
            "[agent]\ninterfaces = [\"eth0\"]\n[[service]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\n",
        );
        for i in 0..=lb_common::MAX_BACKENDS_PER_SERVICE {
            text += &format!("[[service.backend]]\naddress = \"10.0.1.{}:80\"\n", i + 1);
        }
        let (line, field, _) = invalid(&text);
        assert_eq!(field, "service[0].backend[64]");
        assert_eq!(line, 6 + 2 * 64);

        let mut text = String::from("[agent]\ninterfaces = [\"eth0\"]\n");
        for i in 0..=lb_common::MAX_SERVICES {
            text += &format!(
                "[[service]]\nname = \"s{i}\"\naddress = \"10.0.0.1:{}\"\n",
                i + 1
            );
        }
        let (line, field, _) = invalid(&text);
        assert_eq!((line, field.as_str()), (3 + 3 * 64, "service[64]"));
    }

    /// The token itself is read (or generated) at start, by `crate::token`; the config only
    /// says where, relative to its own directory.
    #[test]
    fn token_file_is_relative_to_the_config() -> Result<(), ConfigError> {
        let text = "[agent]\ninterfaces = [\"eth0\"]\nadmin_addr = \"0.0.0.0:9090\"\n\
                    admin_token_file = \"state/token\"\n";
        let config = Config::parse_on(
            Path::new("/etc/steer/steer.toml"),
            text,
            &Overrides::default(),
            &facts(),
        )?;
        assert_eq!(config.admin_token_file, Path::new("/etc/steer/state/token"));
        assert_eq!(config.admin_addr.to_string(), "0.0.0.0:9090");
        Ok(())
    }

    /// `[fleet]` with its defaults, relative paths from the config's directory, and each bad
    /// value refused with its field (built with the `etcd` feature; without it the table is an
    /// error of its own).
    #[test]
    fn fleet_with_defaults_and_errors() -> Result<(), ConfigError> {
        let base = "[agent]\ninterfaces = [\"eth0\"]\n[fleet]\n";
        if !cfg!(feature = "etcd") {
            let (_, field, message) = invalid(&format!("{base}endpoints = [\"127.0.0.1:2379\"]\n"));
            assert_eq!(field, "fleet");
            assert!(message.contains("`etcd` feature"), "{message}");
            return Ok(());
        }
        let config = Config::parse_on(
            Path::new("/etc/steer/steer.toml"),
            &format!(
                "{base}endpoints = [\"10.0.0.1:2379\", \"etcd-b:2379\"]\nhost = \"gpu-a\"\n\
                 user = \"steer\"\npassword_file = \"etcd.password\"\n\
                 tls = {{ ca = \"ca.pem\", cert = \"c.pem\", key = \"k.pem\" }}\n"
            ),
            &Overrides::default(),
            &facts(),
        )?;
        let fleet = config.fleet.expect("[fleet]");
        assert_eq!(fleet.endpoints, ["10.0.0.1:2379", "etcd-b:2379"]);
        assert_eq!(fleet.prefix, FleetSpec::DEFAULT_PREFIX);
        assert_eq!(fleet.host, "gpu-a");
        assert_eq!(fleet.lease_ttl, FleetSpec::DEFAULT_LEASE_TTL);
        assert_eq!(fleet.cache, PathBuf::from(FleetSpec::DEFAULT_CACHE));
        let auth = fleet.auth.expect("auth");
        assert_eq!(
            auth.password_file,
            PathBuf::from("/etc/steer/etcd.password")
        );
        let tls = fleet.tls.expect("tls");
        assert_eq!(tls.ca, PathBuf::from("/etc/steer/ca.pem"));
        assert_eq!(tls.key, Some(PathBuf::from("/etc/steer/k.pem")));

        let endpoint = "endpoints = [\"127.0.0.1:2379\"]\n";
        for (more, field, says) in [
            ("endpoints = []\n", "fleet.endpoints", "at least one"),
            (
                "endpoints = [\"http://127.0.0.1\"]\n",
                "fleet.endpoints",
                "is not `host:port`",
            ),
            (
                "endpoints = [\"127.0.0.1:0\"]\n",
                "fleet.endpoints",
                "is not `host:port`",
            ),
            ("prefix = \"steer\"\n", "fleet.prefix", "not a key prefix"),
            ("prefix = \"/steer/\"\n", "fleet.prefix", "not a key prefix"),
            (
                "prefix = \"/steer/../x\"\n",
                "fleet.prefix",
                "not a key prefix",
            ),
            ("host = \"a/b\"\n", "fleet.host", "not a name"),
            (
                "lease_ttl = \"1s\"\n",
                "fleet.lease_ttl",
                "whole seconds from 2s",
            ),
            (
                "lease_ttl = \"2500ms\"\n",
                "fleet.lease_ttl",
                "whole seconds",
            ),
            (
                "user = \"steer\"\n",
                "fleet.password_file",
                "needs `password_file`",
            ),
            ("password_file = \"p\"\n", "fleet.user", "needs `user`"),
            (
                "tls = { ca = \"ca.pem\", cert = \"c.pem\" }\n",
                "fleet.tls",
                "go together",
            ),
            ("servers = []\n", "fleet.servers", "unknown field `servers`"),
        ] {
            let host = if more.starts_with("host") {
                ""
            } else {
                "host = \"h\"\n"
            };
            let endpoint = if more.starts_with("endpoints") {
                ""
            } else {
                endpoint
            };
            let text = format!("{base}{host}{endpoint}{more}");
            let (_, got, message) = invalid(&text);
            assert_eq!(got, field, "{more}: {message}");
            assert!(message.contains(says), "{more}: {message}");
        }
        Ok(())
    }

    #[test]
    fn instances_with_defaults_and_errors() -> Result<(), ConfigError> {
        let base = "[agent]\ninterfaces = [\"eth0\"]\n";
        let gpt = "[[instance]]\nname = \"gpt\"\nbinary = \"llama-server\"\nmodel = \"/m/a.gguf\"\nport = 8081\n";
        let text = format!(
            "{base}{gpt}args = [\"-np\", \"2\"]\ndebounce = \"50ms\"\n\
             [[instance]]\nname = \"qwen\"\nbinary = \"llama-server\"\nmodel = \"/m/b.gguf\"\nport = 8082\n\
             config_driver = {{ type = \"file\", path = \"/tmp/c.toml\", name = \"q\" }}\n"
        );
        let config = parse(&text)?;
        let [first, qwen] = &config.instances[..] else {
            panic!("{:?}", config.instances);
        };
        assert_eq!((first.name.as_str(), first.port), ("gpt", 8081));
        assert_eq!(first.extra_args, ["-np", "2"]);
        assert_eq!(first.settings.debounce, Duration::from_millis(50));
        assert_eq!(
            first.settings.startup_timeout,
            InstanceSettings::default().startup_timeout
        );
        assert_eq!(first.driver, supervisor::default_driver("gpt"));
        assert_eq!(
            qwen.driver,
            DriverConfig::File {
                path: "/tmp/c.toml".into(),
                name: "q".to_owned()
            }
        );

        let (line, field, _) = invalid(&format!("{base}{gpt}{gpt}"));
        assert_eq!((line, field.as_str()), (9, "instance[1].name"));
        let twin = gpt.replace("gpt", "twin");
        let (line, field, _) = invalid(&format!("{base}{gpt}{twin}"));
        assert_eq!((line, field.as_str()), (12, "instance[1].port"));
        let (line, field, _) = invalid(&format!("{base}{}", gpt.replace("8081", "0")));
        assert_eq!((line, field.as_str()), (7, "instance[0].port"));

        // One stored config for two instances: the second would start the first's arguments.
        let shared = "config_driver = { type = \"file\", path = \"/tmp/c.toml\", name = \"q\" }\n";
        let twin = twin.replace("8081", "8083");
        let (_, field, message) = invalid(&format!("{base}{gpt}{shared}{twin}{shared}"));
        assert_eq!(field, "instance[1].config_driver");
        assert!(message.contains("config name `q`"), "{message}");
        // The default driver is the instance's name in the default file.
        let default_q = "config_driver = { type = \"file\", path = \"/var/lib/steer/config.toml\", name = \"q\" }\n";
        let q = twin.replace("\"twin\"", "\"q\"");
        let (_, field, _) = invalid(&format!("{base}{q}{gpt}{default_q}"));
        assert_eq!(field, "instance[1].config_driver");
        let elsewhere = shared.replace("/tmp/c.toml", "/tmp/d.toml");
        parse(&format!("{base}{gpt}{shared}{twin}{elsewhere}"))?;

        // Names `run` would refuse are refused here already, with the store's rule.
        for bad in ["a/b", "a b", "../x"] {
            let (_, field, message) = invalid(&format!(
                "{base}{}",
                gpt.replace("\"gpt\"", &format!("{bad:?}"))
            ));
            assert_eq!(field, "instance[0].name", "{bad}");
            assert!(message.contains("ASCII letters"), "{message}");
        }
        let (_, field, _) = invalid(&format!(
            "{base}{gpt}{}",
            shared.replace("\"q\"", "\"a/b\"")
        ));
        assert_eq!(field, "instance[0].config_driver.name");
        Ok(())
    }

    #[test]
    fn instances_as_backends() -> Result<(), ConfigError> {
        let base = "[agent]\ninterfaces = [\"eth0\"]\n\n[[service]]\nname = \"chat\"\n\
                    address = \"10.0.0.100:80\"\n\n";
        let gpt = "[[instance]]\nname = \"gpt\"\nbinary = \"llama-server\"\nmodel = \"m.gguf\"\n\
                   port = 8081\nargs = [\"-np\", \"2\"]\n";
        let config = parse(&format!("{base}{gpt}service = \"chat\"\n"))?;
        let gpt_spec = &config.instances[0];
        let backend = gpt_spec.backend.as_ref().expect("a backend");
        assert_eq!(backend.service, "chat");
        assert_eq!(backend.address, None, "the first interface's address");
        assert_eq!(backend.drain_timeout, supervisor::DEFAULT_DRAIN_TIMEOUT);
        assert_eq!(gpt_spec.extra_args, ["-np", "2", "--host", "0.0.0.0"]);

        let text = format!(
            "{base}{}service = \"chat\"\naddress = \"10.0.1.5:9000\"\ndrain_timeout = \"2s\"\n",
            gpt.replace("\"2\"]", "\"2\", \"--host\", \"10.0.1.5\"]")
        );
        let config = parse(&text)?;
        let backend = config.instances[0].backend.as_ref().expect("a backend");
        assert_eq!(
            backend.address,
            Some("10.0.1.5:9000".parse().expect("addr"))
        );
        assert_eq!(backend.drain_timeout, Duration::from_secs(2));
        assert_eq!(
            config.instances[0].extra_args,
            ["-np", "2", "--host", "10.0.1.5"],
            "its own --host is kept"
        );
        assert!(
            parse(&format!("{base}{gpt}"))?.instances[0]
                .backend
                .is_none()
        );

        let (line, field, message) = invalid(&format!("{base}{gpt}service = \"nope\"\n"));
        assert_eq!((line, field.as_str()), (14, "instance[0].service"));
        assert!(message.contains("`nope`"), "{message}");
        let (line, field, _) = invalid(&format!("{base}{gpt}address = \"10.0.1.5:9000\"\n"));
        assert_eq!((line, field.as_str()), (14, "instance[0].address"));
        let (_, field, _) = invalid(&format!("{base}{gpt}drain_timeout = \"1s\"\n"));
        assert_eq!(field, "instance[0].drain_timeout");
        Ok(())
    }

    /// One http service `chat` with policy `cache_affinity` and `extra` lines after it.
    fn affinity_config(extra: &str) -> String {
        format!(
            "[agent]\ninterfaces = [\"eth0\"]\n[[service]]\nname = \"chat\"\n\
             address = \"10.0.0.100:80\"\nmode = \"http\"\npolicy = \"cache_affinity\"\n{extra}"
        )
    }

    #[test]
    fn cache_affinity_reads_its_table_with_defaults() -> Result<(), ConfigError> {
        let config = parse(&affinity_config(""))?;
        assert_eq!(config.services[0].policy, Policy::CacheAffinity);
        let spec = config.services[0].affinity.clone();
        assert_eq!(spec, Some(AffinitySpec::default()));
        assert_eq!(
            AffinitySpec::default().keys,
            [
                AffinityKey::Header("x-session-id".to_owned()),
                AffinityKey::ApiKey,
                AffinityKey::PromptPrefix,
                AffinityKey::Client
            ]
        );
        assert_eq!(AffinitySpec::default().prefix_bytes.get(), 512);
        let config = parse(&affinity_config(
            "[service.affinity]\nkey = [\"header:X-Conversation\", \"prompt_prefix\"]\n\
             prefix_bytes = 64\nload_factor = 1.5\n",
        ))?;
        let spec = config.services[0].affinity.clone().expect("affinity");
        assert_eq!(
            spec.keys,
            [
                AffinityKey::Header("x-conversation".to_owned()),
                AffinityKey::PromptPrefix
            ]
        );
        assert_eq!(spec.prefix_bytes.get(), 64);
        assert_eq!(spec.load_factor, LoadFactor::new(1.5).expect("above 1"));
        Ok(())
    }

    #[test]
    fn cache_affinity_errors_name_the_key() {
        let l4 = affinity_config("").replace("mode = \"http\"", "mode = \"l4\"");
        let (line, field, message) = invalid(&l4);
        assert_eq!((line, field.as_str()), (7, "service[0].policy"));
        assert!(message.contains("mode = \"http\""), "{message}");
        let misplaced = affinity_config("[service.affinity]\nload_factor = 2.0\n")
            .replace("policy = \"cache_affinity\"", "policy = \"maglev\"");
        let (_, field, message) = invalid(&misplaced);
        assert_eq!(field, "service[0].affinity");
        assert!(message.contains("cache_affinity"), "{message}");
        for (table, field, says) in [
            (
                "load_factor = 1.0",
                "service[0].affinity.load_factor",
                "above 1",
            ),
            (
                "load_factor = 0.5",
                "service[0].affinity.load_factor",
                "got 0.5",
            ),
            (
                "load_factor = 1e9",
                "service[0].affinity.load_factor",
                "at most 1000",
            ),
            (
                "prefix_bytes = 0",
                "service[0].affinity.prefix_bytes",
                "at least 1",
            ),
            ("key = []", "service[0].affinity.key", "at least one key"),
            (
                "key = [\"cookie\"]",
                "service[0].affinity.key[0]",
                "`cookie` is not a key",
            ),
            (
                "key = [\"header:\"]",
                "service[0].affinity.key[0]",
                "not an HTTP header",
            ),
            (
                "key = [\"header:a b\"]",
                "service[0].affinity.key[0]",
                "not an HTTP header",
            ),
            (
                "key = [\"api_key\", \"api_key\"]",
                "service[0].affinity.key[1]",
                "already key[0]",
            ),
            (
                "key = [\"header:A\", \"header:a\"]",
                "service[0].affinity.key[1]",
                "already key[0]",
            ),
            (
                "key = [\"client\", \"api_key\"]",
                "service[0].affinity.key[1]",
                "never used",
            ),
            (
                "keys = [\"client\"]",
                "service[0].affinity.keys",
                "unknown field `keys`",
            ),
        ] {
            let (line, got, message) =
                invalid(&affinity_config(&format!("[service.affinity]\n{table}\n")));
            assert_eq!(got, field, "{table}: {message}");
            assert!(message.contains(says), "{table}: {message}");
            assert!(line >= 8, "{table}: line {line}");
        }
    }

    #[test]
    fn slot_polls_follow_policy_slots_or_a_slots_table() -> Result<(), ConfigError> {
        let service = |name: &str, port: u16, extra: &str| {
            format!("[[service]]\nname = \"{name}\"\naddress = \"10.0.0.100:{port}\"\n{extra}\n")
        };
        let text = [
            "[agent]\ninterfaces = [\"eth0\"]\n".to_owned(),
            service("chat", 80, "policy = \"slots\""),
            service("rr", 81, "policy = \"round_robin\""),
            service(
                "tuned",
                82,
                "[service.slots]\ninterval = \"2s\"\ntimeout = \"1s\"",
            ),
        ]
        .concat();
        let config = parse(&text)?;
        assert_eq!(config.services[0].policy, Policy::Slots);
        let polls: Vec<(&str, Duration, Duration)> = config
            .services
            .iter()
            .filter_map(|s| Some((s.name.as_str(), s.slots.as_ref()?)))
            .map(|(service, p)| (service, p.interval, p.timeout))
            .collect();
        assert_eq!(
            polls,
            [
                (
                    "chat",
                    Duration::from_millis(500),
                    Duration::from_millis(400)
                ),
                ("tuned", Duration::from_secs(2), Duration::from_secs(1)),
            ]
        );
        let slow = text.replace("timeout = \"1s\"", "timeout = \"3s\"");
        let (line, field, message) = invalid(&slow);
        assert!(line > 11, "in the third service, line {line}");
        assert_eq!(field, "service[2].slots.timeout");
        assert_eq!(message, "must not be longer than the interval");
        Ok(())
    }

    #[test]
    fn connection_limits_default_safe_and_are_validated() -> Result<(), ConfigError> {
        let config = parse(EXAMPLE)?;
        assert_eq!(config.admin_limits, AdminLimits::default());
        let chat = &config.services[0].proxy;
        assert_eq!(
            chat.max_client_connections,
            ProxySpec::default().max_client_connections
        );
        assert_eq!(
            chat.client_timeouts(),
            crate::spec::ClientTimeouts {
                header: None,
                idle: ProxySpec::default().client_idle_timeout
            },
            "l4: no head to time"
        );
        let text = EXAMPLE
            .replace(
                "flow_events = false\n",
                "flow_events = false\nadmin_max_connections = 8\nadmin_header_timeout = \"2s\"\n\
                 admin_idle_timeout = \"3s\"\nadmin_body_timeout = \"4s\"\n",
            )
            .replace(
                "name = \"embed\"\n",
                "name = \"embed\"\nmode = \"http\"\nmax_client_connections = 100\n\
                 client_header_timeout = \"5s\"\nclient_idle_timeout = \"6s\"\n\
                 client_body_timeout = \"7s\"\n",
            );
        let config = parse(&text)?;
        assert_eq!(
            config.admin_limits,
            AdminLimits {
                max_connections: 8,
                header_timeout: Duration::from_secs(2),
                idle_timeout: Duration::from_secs(3),
                body_timeout: Duration::from_secs(4),
            }
        );
        let embed = &config.services[1].proxy;
        assert_eq!(embed.max_client_connections, 100);
        assert_eq!(
            (embed.client_header_timeout, embed.client_body_timeout),
            (Duration::from_secs(5), Duration::from_secs(7))
        );
        assert_eq!(embed.client_timeouts().idle, Duration::from_secs(6));

        let (line, field, message) =
            invalid(&text.replace("admin_max_connections = 8", "admin_max_connections = 0"));
        assert_eq!((line, field.as_str()), (10, "agent.admin_max_connections"));
        assert!(message.starts_with("must be at least 1"), "{message}");
        let (_, field, _) =
            invalid(&text.replace("max_client_connections = 100", "max_client_connections = 0"));
        assert_eq!(field, "service[1].max_client_connections");
        let (_, field, _) = invalid(&text.replace("\"6s\"", "\"0s\""));
        assert_eq!(field, "service[1].client_idle_timeout");
        let l4 = EXAMPLE.replace(
            "policy = \"least_connections\"\n",
            "policy = \"least_connections\"\nclient_header_timeout = \"5s\"\n",
        );
        let (line, field, message) = invalid(&l4);
        assert_eq!(
            (line, field.as_str()),
            (15, "service[0].client_header_timeout")
        );
        assert!(
            message.starts_with("not for mode = \"l4\" (an l4 connection has no request head"),
            "{message}"
        );
        Ok(())
    }

    #[test]
    fn shutdown_timeout_and_apply_limit() -> Result<(), ConfigError> {
        let text = "[agent]\ninterfaces = [\"lo\"]\nshutdown_timeout = \"2m\"\n\
                    max_concurrent_applies = 2\n";
        let config = parse(text)?;
        assert_eq!(config.shutdown_timeout, Duration::from_secs(120));
        assert_eq!(config.max_concurrent_applies.get(), 2);
        let zero = parse("[agent]\ninterfaces = [\"lo\"]\nmax_concurrent_applies = 0\n");
        assert!(zero.is_err_and(|e| e.to_string().contains("max_concurrent_applies")));
        Ok(())
    }

    #[test]
    fn missing_file_names_the_path() {
        let path = Path::new("/nonexistent/steer.toml");
        match Config::load(path, &Overrides::default()) {
            Err(err @ ConfigError::Read { .. }) => {
                assert!(err.to_string().contains("/nonexistent/steer.toml"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        for bad in ["0s", "10", "s", "1.5s", "-1s", "10 s", "1d"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
