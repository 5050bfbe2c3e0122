//! The kernel side of the backend table. `xdp` is the only code that holds kernel map handles;
//! the table (`crate::table`) writes through [`Dataplane`], which `memory` implements without a
//! kernel (`--dataplane userspace`) and `crate::fake` records for tests.

pub mod conns;
pub mod memory;
pub mod xdp;

use lb_common::{Backend, BackendStats, Service, ServiceKey};

/// What the table needs of a dataplane: map writes (in the order their docs give), connection
/// and steering counts, counters. Every write but `forget_steered` (a subtraction) is idempotent.
pub trait Dataplane: Send + 'static {
    /// Insert or replace a service entry (the services map, keyed by VIP, port and protocol).
    fn upsert_service(&mut self, key: ServiceKey, service: Service) -> Result<(), DataplaneError>;
    /// Write one backend slot (index: backend id).
    fn write_backend(&mut self, id: u32, backend: Backend) -> Result<(), DataplaneError>;
    /// Write a service's round-robin ring (backend slots); `ring.len()` must be at most
    /// `RR_RING_SIZE`. Written before the service entry that announces its length.
    fn write_rr_ring(&mut self, service_id: u32, ring: &[u32]) -> Result<(), DataplaneError>;
    /// Write a `maglev` service's lookup table: exactly `MAGLEV_SIZE` backend slots. Written
    /// before the service entry that turns the policy on.
    fn write_maglev(&mut self, service_id: u32, table: &[u32]) -> Result<(), DataplaneError>;
    /// Whether `addr` is one of this host's own addresses: a backend there is local.
    fn is_local(&self, addr: std::net::Ipv4Addr) -> bool;
    /// Whether packets from the wire are rewritten to backends (XDP): then a backend on loopback
    /// is unreachable, the kernel drops what is rewritten to it.
    fn rewrites_packets(&self) -> bool;
    /// Set a backend id's active connection count to zero, when the id changes owner.
    fn reset_connections(&mut self, id: u32) -> Result<(), DataplaneError>;
    /// The per-backend connection counts the kernel and the proxy keep (active connections,
    /// flows steered since the last slot poll): shared memory, read without a syscall by the
    /// table and its readers alike.
    fn conn_counts(&self) -> std::sync::Arc<conns::ConnCounts>;
    /// Forget `seen` of a backend id's steered flows: a slot poll that counted them was written.
    fn forget_steered(&mut self, id: u32, seen: u64) -> Result<(), DataplaneError>;
    /// Per-backend counters summed over CPUs.
    fn backend_stats(&self, id: u32) -> Result<BackendStats, DataplaneError>;
    /// Per-service counters summed over CPUs, indexed by `lb_common::counter`.
    fn service_counters(
        &self,
        service_id: u32,
    ) -> Result<[u64; lb_common::counter::MAX as usize], DataplaneError>;
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the XDP program: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("the XDP program has no map `{0}`")]
    MissingMap(&'static str),
    #[error("map `{map}`: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("attaching XDP to interface `{interface}` in {mode} mode: {source}")]
    Attach {
        interface: String,
        mode: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching the TC egress program to interface `{interface}`: {source}")]
    AttachEgress {
        interface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "snat_ports {snat} overlap the host's own ephemeral ports {local} \
         (net.ipv4.ip_local_port_range): choose SNAT ports outside them"
    )]
    SnatPortsOverlap { snat: String, local: String },
    #[error("interface `{0}` does not exist")]
    NoSuchInterface(String),
    #[error("interface `{0}` has no IPv4 address to use as the source towards backends")]
    NoIpv4Address(String),
    #[error("the XDP object has no program `{0}`")]
    MissingProgram(&'static str),
    #[error("map `{map}`: {source}")]
    DevMap {
        map: &'static str,
        #[source]
        source: aya::maps::xdp::XdpMapError,
    },
    #[error("{what} {value} is out of range (limit {limit})")]
    OutOfRange {
        what: &'static str,
        value: u64,
        limit: u64,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}
