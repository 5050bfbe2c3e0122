//! The XDP program and its maps: load, attach, write, read counters, detach on drop.
//! SKELETON: the interface below is agreed; the bodies are being written.

use std::ops::RangeInclusive;

use super::DataplaneError;

/// How the program is attached (`--xdp-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver (fast; what production and the tests use).
    #[default]
    Native,
    /// Generic mode in the stack, for drivers without XDP support.
    Skb,
}

/// What the agent's config decides about the data plane.
#[derive(Clone, Debug)]
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
}

/// The loaded, attached program. Dropping it detaches from every interface.
pub struct Xdp {
    _todo: (),
}

impl Xdp {
    /// Load the program, create its maps, attach it to every interface and fill `ifaces` and
    /// `tx_ports`. Must be called inside a tokio runtime (it spawns the event reader and the
    /// conntrack expiry task).
    pub fn load(_options: &XdpOptions) -> Result<Self, DataplaneError> {
        unimplemented!("being written")
    }
}
