//! Rust mirror of `include/steer_abi.h`, the types Steer's kernel programs share with the agent.
//!
//! Every struct is `#[repr(C)]` with its padding spelled out, so no byte of a map key or value is
//! left undefined. Sizes and offsets are asserted here at compile time and, against the compiled
//! object's BTF, by `lb-ebpf/tests/btf_abi.rs`.
#![no_std]

use core::mem::{offset_of, size_of};

/// Path of the C header this crate mirrors, for build scripts and the BTF test.
pub const ABI_HEADER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/include/steer_abi.h");

pub const MAX_SERVICES: u32 = 64;
pub const MAX_BACKENDS_PER_SERVICE: u32 = 64;
pub const MAX_BACKENDS: u32 = 4096;
pub const RR_RING_SIZE: u32 = 256;
pub const MAX_INTERFACES: u32 = 64;
pub const MAGLEV_SIZE: u32 = 16381;
pub const MAGLEV_PROBES: u32 = 16;
pub const VIP_FILTER_SIZE: u32 = 4096;

/// `enum steer_policy`.
pub mod policy {
    pub const ROUND_ROBIN: u32 = 0;
    pub const LEAST_CONNECTIONS: u32 = 1;
    pub const MAGLEV: u32 = 2;
    pub const SLOTS: u32 = 3;
}

/// `enum steer_backend_state`.
pub mod backend_state {
    pub const DOWN: u32 = 0;
    pub const ACTIVE: u32 = 1;
    pub const DRAINING: u32 = 2;
}

/// `enum steer_backend_kind`.
pub mod backend_kind {
    pub const REMOTE: u32 = 0;
    pub const LOCAL: u32 = 1;
}

/// `enum steer_counter`: per-service counters.
pub mod counter {
    pub const NEW_FLOWS: u32 = 0;
    pub const FWD_PACKETS: u32 = 1;
    pub const FWD_BYTES: u32 = 2;
    pub const REPLY_PACKETS: u32 = 3;
    pub const REPLY_BYTES: u32 = 4;
    pub const NO_BACKEND: u32 = 5;
    pub const NO_ROUTE: u32 = 6;
    pub const NO_SNAT_PORT: u32 = 7;
    pub const NO_FLOW: u32 = 8;
    pub const CLOSED_FLOWS: u32 = 9;
    pub const MAX: u32 = 10;
}

/// `enum steer_flow_flags`.
pub mod flow_flags {
    pub const LOCAL: u32 = 1;
}

/// `enum steer_flow_close`: `FlowRev::closed`.
pub mod flow_close {
    pub const OPEN: u32 = 0;
    pub const CLOSED: u32 = 1;
    pub const TAKEN: u32 = 2;
    pub const BACKEND_CLOSED: u32 = 3;
}

/// `enum steer_event_kind`.
pub mod event_kind {
    pub const FLOW_OPENED: u32 = 1;
    pub const FLOW_CLOSED: u32 = 2;
    pub const NO_BACKEND: u32 = 3;
    pub const NO_ROUTE: u32 = 4;
    pub const NO_SNAT_PORT: u32 = 5;
}

/// Every enum of the header with its values, for the BTF comparison.
pub const ENUMS: &[(&str, &[(&str, u32)])] = &[
    (
        "steer_limits",
        &[
            ("STEER_MAX_SERVICES", MAX_SERVICES),
            ("STEER_MAX_BACKENDS_PER_SERVICE", MAX_BACKENDS_PER_SERVICE),
            ("STEER_MAX_BACKENDS", MAX_BACKENDS),
            ("STEER_RR_RING_SIZE", RR_RING_SIZE),
            ("STEER_MAX_INTERFACES", MAX_INTERFACES),
            ("STEER_MAGLEV_SIZE", MAGLEV_SIZE),
            ("STEER_MAGLEV_PROBES", MAGLEV_PROBES),
            ("STEER_VIP_FILTER_SIZE", VIP_FILTER_SIZE),
        ],
    ),
    (
        "steer_policy",
        &[
            ("STEER_POLICY_ROUND_ROBIN", policy::ROUND_ROBIN),
            ("STEER_POLICY_LEAST_CONNECTIONS", policy::LEAST_CONNECTIONS),
            ("STEER_POLICY_MAGLEV", policy::MAGLEV),
            ("STEER_POLICY_SLOTS", policy::SLOTS),
        ],
    ),
    (
        "steer_backend_state",
        &[
            ("STEER_BACKEND_DOWN", backend_state::DOWN),
            ("STEER_BACKEND_ACTIVE", backend_state::ACTIVE),
            ("STEER_BACKEND_DRAINING", backend_state::DRAINING),
        ],
    ),
    (
        "steer_backend_kind",
        &[
            ("STEER_BACKEND_REMOTE", backend_kind::REMOTE),
            ("STEER_BACKEND_LOCAL", backend_kind::LOCAL),
        ],
    ),
    (
        "steer_counter",
        &[
            ("STEER_CNT_NEW_FLOWS", counter::NEW_FLOWS),
            ("STEER_CNT_FWD_PACKETS", counter::FWD_PACKETS),
            ("STEER_CNT_FWD_BYTES", counter::FWD_BYTES),
            ("STEER_CNT_REPLY_PACKETS", counter::REPLY_PACKETS),
            ("STEER_CNT_REPLY_BYTES", counter::REPLY_BYTES),
            ("STEER_CNT_NO_BACKEND", counter::NO_BACKEND),
            ("STEER_CNT_NO_ROUTE", counter::NO_ROUTE),
            ("STEER_CNT_NO_SNAT_PORT", counter::NO_SNAT_PORT),
            ("STEER_CNT_NO_FLOW", counter::NO_FLOW),
            ("STEER_CNT_CLOSED_FLOWS", counter::CLOSED_FLOWS),
            ("STEER_COUNTER_MAX", counter::MAX),
        ],
    ),
    (
        "steer_flow_flags",
        &[("STEER_FLOW_LOCAL", flow_flags::LOCAL)],
    ),
    (
        "steer_flow_close",
        &[
            ("STEER_FLOW_OPEN", flow_close::OPEN),
            ("STEER_FLOW_CLOSED", flow_close::CLOSED),
            ("STEER_FLOW_TAKEN", flow_close::TAKEN),
            ("STEER_FLOW_BACKEND_CLOSED", flow_close::BACKEND_CLOSED),
        ],
    ),
    (
        "steer_event_kind",
        &[
            ("STEER_EVENT_FLOW_OPENED", event_kind::FLOW_OPENED),
            ("STEER_EVENT_FLOW_CLOSED", event_kind::FLOW_CLOSED),
            ("STEER_EVENT_NO_BACKEND", event_kind::NO_BACKEND),
            ("STEER_EVENT_NO_ROUTE", event_kind::NO_ROUTE),
            ("STEER_EVENT_NO_SNAT_PORT", event_kind::NO_SNAT_PORT),
        ],
    ),
];

/// The client-address hash the kernel's Maglev lookup uses (murmur3's 32-bit finalizer), over
/// the address in network byte order as it sits in the packet.
pub const fn client_hash(addr_be: u32) -> u32 {
    let mut h = addr_be;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// The slot of the kernel's VIP filter (`vip_filter`) that counts the services on `vip_be` (an
/// address in network byte order): the program looks `services` up only for a destination whose
/// slot is not zero.
pub const fn vip_filter_slot(vip_be: u32) -> u32 {
    client_hash(vip_be) % VIP_FILTER_SIZE
}

/// Key of the `services` map. Address and port in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub vip: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl ServiceKey {
    /// The key of the TCP service at `addr`, as the program builds it from a packet's header:
    /// address and port in network byte order.
    pub const fn tcp(addr: core::net::SocketAddrV4) -> ServiceKey {
        ServiceKey {
            vip: u32::from_ne_bytes(addr.ip().octets()),
            port: addr.port().to_be(),
            // IPPROTO_TCP
            proto: 6,
            _pad: 0,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    pub id: u32,
    pub policy: u32,
    pub backend_count: u32,
    pub rr_len: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: u32,
    pub port: u16,
    pub _pad0: u16,
    pub weight: u32,
    pub state: u32,
    pub max_conns: u32,
    pub kind: u32,
    pub generation: u32,
    /// Idle llama.cpp slots at the agent's last poll (policy `slots`).
    pub idle_slots: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendConns {
    pub active: u64,
    /// New flows steered to the backend, less those the agent's last slot poll already saw.
    pub steered: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// A flow's next hop as `bpf_fib_lookup` found it; `ifindex` 0: not looked up yet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowFwd {
    pub backend_id: u32,
    pub generation: u32,
    pub backend_addr: u32,
    pub snat_addr: u32,
    pub backend_port: u16,
    pub snat_port: u16,
    pub released: u32,
    pub flags: u32,
    pub _pad: u32,
    pub last_seen_ns: u64,
    /// Towards the backend (remote flows).
    pub hop: NextHop,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowRev {
    pub client_addr: u32,
    pub vip: u32,
    pub client_port: u16,
    pub vip_port: u16,
    pub backend_id: u32,
    pub last_seen_ns: u64,
    /// Towards the client, found on the first reply.
    pub hop: NextHop,
    /// `flow_close`: who closed first, or taken over by a new flow.
    pub closed: u32,
    /// Host-order sequence number just past the client's FIN (0: none seen).
    pub client_fin_end: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Iface {
    pub snat_addr: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub timestamp_ns: u64,
    pub kind: u32,
    pub service_id: u32,
    pub backend_id: u32,
    pub client_addr: u32,
    pub client_port: u16,
    pub _pad0: u16,
    pub _pad1: u32,
}

/// One shared struct: its C name and its members' (name, byte offset), plus its size.
pub struct Layout {
    pub c_name: &'static str,
    pub size: usize,
    pub members: &'static [(&'static str, usize)],
}

macro_rules! layouts {
    ($($ty:ident = $c:literal { $($field:ident),* $(,)? })*) => {
        /// Every shared struct's layout as Rust sees it, for the BTF comparison.
        pub const LAYOUTS: &[Layout] = &[$(Layout {
            c_name: $c,
            size: size_of::<$ty>(),
            members: &[$((stringify!($field), offset_of!($ty, $field))),*],
        }),*];
    };
}

layouts! {
    ServiceKey = "steer_service_key" { vip, port, proto, _pad }
    Service = "steer_service" { id, policy, backend_count, rr_len }
    Backend = "steer_backend" {
        addr, port, _pad0, weight, state, max_conns, kind, generation, idle_slots,
    }
    BackendConns = "steer_backend_conns" { active, steered }
    BackendStats = "steer_backend_stats" { packets, bytes, new_flows }
    FlowKey = "steer_flow_key" { src_addr, dst_addr, src_port, dst_port, proto, _pad }
    NextHop = "steer_next_hop" { ifindex, smac, dmac }
    FlowFwd = "steer_flow_fwd" {
        backend_id, generation, backend_addr, snat_addr, backend_port, snat_port, released,
        flags, _pad, last_seen_ns, hop,
    }
    FlowRev = "steer_flow_rev" {
        client_addr, vip, client_port, vip_port, backend_id, last_seen_ns, hop, closed,
        client_fin_end,
    }
    Iface = "steer_iface" { snat_addr, _pad }
    Event = "steer_event" {
        timestamp_ns, kind, service_id, backend_id, client_addr, client_port, _pad0, _pad1,
    }
}

// The same sizes the C header asserts; a mismatch fails the build on either side.
const _: () = {
    assert!(size_of::<ServiceKey>() == 8);
    assert!(size_of::<Service>() == 16);
    assert!(size_of::<Backend>() == 32);
    assert!(size_of::<BackendConns>() == 16);
    assert!(size_of::<BackendStats>() == 24);
    assert!(size_of::<FlowKey>() == 16);
    assert!(size_of::<NextHop>() == 16);
    assert!(size_of::<FlowFwd>() == 56);
    assert!(offset_of!(FlowFwd, last_seen_ns) == 32);
    assert!(size_of::<FlowRev>() == 48);
    assert!(size_of::<Iface>() == 8);
    assert!(size_of::<Event>() == 32);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: each type is #[repr(C)], made only of integers, with every padding byte a field.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for BackendConns {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for FlowFwd {}
    unsafe impl aya::Pod for FlowRev {}
    unsafe impl aya::Pod for Iface {}
    unsafe impl aya::Pod for Event {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::{Ipv4Addr, SocketAddrV4};

    #[test]
    fn a_tcp_service_key_holds_address_and_port_as_the_packet_does() {
        let key = ServiceKey::tcp(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 8080));
        assert_eq!(key.vip.to_ne_bytes(), [10, 0, 0, 100]);
        assert_eq!(key.port.to_ne_bytes(), 8080u16.to_be_bytes());
        assert_eq!((key.proto, key._pad), (6, 0));
    }
}
