//! The packet lab: a network namespace with the LB's two interfaces (client side, backend side),
//! routes and static neighbours that make `bpf_fib_lookup` succeed, and Steer's programs loaded
//! by the agent's own `Loaded::load` (not attached: `BPF_PROG_TEST_RUN` needs no attachment),
//! their services and backends written by the agent's writer, `KernelMaps`. The packet tests and
//! the XDP benchmark run crafted frames through it.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsFd,
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, MapInfo},
    programs::{SchedClassifier, Xdp},
};
use lb_common::{
    Backend, BackendConns, FlowFwd, FlowKey, Service, ServiceKey, backend_kind, backend_state,
    policy,
};
use lb_userspace::dataplane::Dataplane;
use lb_userspace::dataplane::xdp::{KernelMaps, Loaded};
use lb_userspace::spec::{XdpMode, XdpOptions};

use crate::{
    netns::{self, NetNs},
    packet::{Frame, assert_only_nat_fields_changed, parse_checked},
    testrun::{XDP_REDIRECT, test_run},
};

pub const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 210, 0, 100), 80);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 1, 2);
pub const LB_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 210, 1, 1);
pub const LB_BACKEND_SIDE: Ipv4Addr = Ipv4Addr::new(10, 210, 2, 1);
pub const BACKENDS: [SocketAddrV4; 2] = [
    SocketAddrV4::new(Ipv4Addr::new(10, 210, 2, 2), 8080),
    SocketAddrV4::new(Ipv4Addr::new(10, 210, 2, 3), 8080),
];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 2];
pub const LB_CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 1];
pub const LB_BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 1];
pub const BACKEND_MACS: [[u8; 6]; 2] = [[0x02, 0, 0, 0, 2, 2], [0x02, 0, 0, 0, 2, 3]];
pub const SNAT_PORTS: std::ops::RangeInclusive<u16> = 16384..=32767;
/// The data of every packet [`Lab::forward`] sends.
pub const CLIENT_PAYLOAD: &[u8] = b"hello";
/// Backends of the policy model test: slot n is 10.210.2.(MODEL_HOST_BASE + n).
pub const MODEL_SLOTS: u32 = 8;
pub const MODEL_HOST_BASE: u8 = 10;

pub fn model_backend(slot: u32) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::new(10, 210, 2, MODEL_HOST_BASE + slot as u8),
        8080,
    )
}

pub fn mac_str(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

pub fn ne(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT_IP, port)
}

/// A namespace with the LB's two interfaces (client side, backend side), static neighbours for
/// the client and both backends, and the program loaded by the agent's own code, not attached
/// (test runs need no attach). Services and backends are written through the agent's map writer,
/// [`KernelMaps`], the one the backend table uses.
pub struct Lab {
    loaded: Loaded,
    /// Each backend slot as last written, so a test can change one field of it.
    backends: std::collections::HashMap<u32, Backend>,
}

pub fn build_namespace() -> NetNs {
    netns::require_root("the packet lab (tests and XDP benchmark)");
    let ns = NetNs::new("pkt");
    let sh = |args: &[&str]| {
        let out = ns.exec(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for (name, mac, addr) in [
        ("pcli", LB_CLIENT_MAC, LB_CLIENT_SIDE),
        ("pbe", LB_BACKEND_MAC, LB_BACKEND_SIDE),
    ] {
        let peer = format!("{name}-peer");
        sh(&[
            "ip", "link", "add", name, "type", "veth", "peer", "name", &peer,
        ]);
        sh(&["ip", "link", "set", name, "address", &mac_str(mac)]);
        sh(&["ip", "addr", "add", &format!("{addr}/24"), "dev", name]);
        sh(&["ip", "link", "set", name, "up"]);
        sh(&["ip", "link", "set", &peer, "up"]);
    }
    sh(&["ip", "link", "set", "lo", "up"]);
    let neighbours = [
        (CLIENT_IP, CLIENT_MAC, "pcli"),
        (*BACKENDS[0].ip(), BACKEND_MACS[0], "pbe"),
        (*BACKENDS[1].ip(), BACKEND_MACS[1], "pbe"),
    ];
    let model = (0..MODEL_SLOTS).map(|slot| (*model_backend(slot).ip(), BACKEND_MACS[0], "pbe"));
    for (ip, mac, dev) in neighbours.into_iter().chain(model) {
        let (ip, mac) = (ip.to_string(), mac_str(mac));
        sh(&[
            "ip",
            "neigh",
            "replace",
            &ip,
            "lladdr",
            &mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
    }
    // As the agent does: the program looks routes up as if from lo (see nat.h).
    sh(&["sysctl", "-qw", "net.ipv4.conf.lo.forwarding=1"]);
    ns
}

impl Lab {
    /// Load the program and write the maps for one service at VIP with both backends active.
    pub fn load(policy: u32) -> Lab {
        Lab::load_with(policy, None)
    }

    /// Like [`Lab::load`], with each conntrack map sized `conntrack_entries` when given (else
    /// the agent's default).
    pub fn load_with(policy: u32, conntrack_entries: Option<u32>) -> Lab {
        let mut options = Lab::options();
        if let Some(entries) = conntrack_entries {
            options.conntrack_entries = entries;
        }
        Lab::load_from(&options, policy)
    }

    /// Like [`Lab::load`], with a small SNAT port range and the given holds of a closed flow's
    /// reply tuple (closed first by the client, by the backend), so tests can fill the range and
    /// watch reply tuples being held and taken over.
    pub fn load_snat_ports(
        policy: u32,
        ports: std::ops::RangeInclusive<u16>,
        closed_flow_ns: u64,
        time_wait_ns: u64,
    ) -> Lab {
        let options = XdpOptions {
            snat_ports: ports,
            closed_flow_timeout: Duration::from_nanos(closed_flow_ns),
            backend_time_wait: Duration::from_nanos(time_wait_ns),
            ..Lab::options()
        };
        Lab::load_from(&options, policy)
    }

    /// The agent's defaults (as `steer run` takes them from an empty `[agent]`), on the lab's
    /// two interfaces.
    fn options() -> XdpOptions {
        XdpOptions {
            interfaces: vec!["pcli".to_owned(), "pbe".to_owned()],
            mode: XdpMode::Native,
            snat_ports: SNAT_PORTS,
            flow_events: true,
            conntrack_entries: 262_144,
            flow_idle_timeout: Duration::from_secs(600),
            closed_flow_timeout: Duration::from_secs(10),
            backend_time_wait: XdpOptions::BACKEND_TIME_WAIT,
        }
    }

    fn load_from(options: &XdpOptions, policy: u32) -> Lab {
        let mut loaded = Loaded::load(options).expect("loading the program as the agent does");
        loaded
            .register_interfaces()
            .expect("registering the lab's interfaces");
        let mut lab = Lab {
            loaded,
            backends: std::collections::HashMap::new(),
        };
        for (slot, addr) in BACKENDS.iter().enumerate() {
            lab.set_backend(slot as u32, *addr, backend_state::ACTIVE, 1, 0);
        }
        lab.set_service(policy, 2, &[0, 1]);
        lab
    }

    /// The agent's writer of the service and backend maps.
    pub fn maps(&mut self) -> &mut KernelMaps {
        self.loaded.maps()
    }

    /// The programs and the maps the writer does not own (conntrack, events, cursors).
    pub fn ebpf(&self) -> &Ebpf {
        self.loaded.ebpf()
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        self.loaded.ebpf_mut()
    }

    /// Write backend `slot` as the table would for a backend at `addr` in `state`.
    pub fn set_backend(
        &mut self,
        slot: u32,
        addr: SocketAddrV4,
        state: u32,
        weight: u32,
        max: u32,
    ) {
        self.write_backend(
            slot,
            Backend {
                addr: ne(*addr.ip()),
                port: addr.port().to_be(),
                weight,
                state,
                max_conns: max,
                generation: 1,
                ..Default::default()
            },
        );
    }

    fn write_backend(&mut self, slot: u32, backend: Backend) {
        self.maps()
            .write_backend(slot, backend)
            .expect("writing the backend");
        self.backends.insert(slot, backend);
    }

    /// Make slot 0 the only backend: one on this host at `addr`.
    pub fn set_only_local_backend(&mut self, addr: SocketAddrV4) {
        let backend = Backend {
            addr: ne(*addr.ip()),
            port: addr.port().to_be(),
            weight: 1,
            state: backend_state::ACTIVE,
            kind: backend_kind::LOCAL,
            generation: 1,
            ..Default::default()
        };
        self.write_backend(0, backend);
        self.set_service(policy::ROUND_ROBIN, 1, &[0]);
    }

    pub fn set_state(&mut self, slot: u32, state: u32) {
        self.set_backend(slot, BACKENDS[slot as usize], state, 1, 0);
    }

    /// Service 0 at VIP, written as the table writes one: its ring, then the entry that
    /// announces the ring's length (the writer keeps `vip_filter` and `service_keys` with it).
    pub fn set_service(&mut self, policy: u32, backend_count: u32, ring: &[u32]) {
        self.maps()
            .write_rr_ring(0, ring)
            .expect("writing the ring");
        let service = Service {
            id: 0,
            policy,
            backend_count,
            rr_len: ring.len() as u32,
        };
        self.maps()
            .upsert_service(ServiceKey::tcp(VIP), service)
            .expect("writing the service");
    }

    /// Take the service away in the order a removal must keep: its id serves nothing, then no
    /// entry, then the filter forgets its VIP. No agent path removes a service yet (the table's
    /// services come from the config), so the writer has no call for it: this writes the
    /// program's maps by hand, found through the program's own map ids.
    pub fn remove_service(&mut self) {
        let key = ServiceKey::tcp(VIP);
        Array::<_, ServiceKey>::try_from(self.program_map("service_keys"))
            .expect("array")
            .set(0, ServiceKey::default(), 0)
            .expect("service_keys set");
        HashMap::<_, ServiceKey, Service>::try_from(self.program_map("services"))
            .expect("hash")
            .remove(&key)
            .expect("services remove");
        Array::<_, u32>::try_from(self.program_map("vip_filter"))
            .expect("array")
            .set(lb_common::vip_filter_slot(key.vip), 0, 0)
            .expect("vip_filter set");
    }

    /// A second handle on one of the program's maps, by name.
    fn program_map(&self, name: &str) -> Map {
        let ids = self
            .program()
            .info()
            .expect("program info")
            .map_ids()
            .expect("map ids")
            .expect("the kernel reports map ids");
        let id = ids
            .into_iter()
            .find(|&id| MapInfo::from_id(id).is_ok_and(|info| info.name_as_str() == Some(name)))
            .unwrap_or_else(|| panic!("the program uses no map `{name}`"));
        let data = MapData::from_id(id).expect("opening the map by id");
        match name {
            "services" => Map::HashMap(data),
            _ => Map::Array(data),
        }
    }

    /// Service 0's Maglev table; an empty one (another policy) writes nothing, as in the table.
    pub fn set_maglev(&mut self, table: &[u32]) {
        if !table.is_empty() {
            self.maps().write_maglev(0, table).expect("writing maglev");
        }
    }

    pub fn set_cursor(&mut self, value: u64) {
        let mut cursor: Array<&mut MapData, u64> =
            Array::try_from(self.ebpf_mut().map_mut("rr_cursor").expect("rr_cursor"))
                .expect("array");
        cursor.set(0, value, 0).expect("rr_cursor set");
    }

    /// As the agent publishes a slot poll: the backend's idle slots.
    pub fn set_idle_slots(&mut self, slot: u32, idle_slots: u32) {
        let backend = Backend {
            idle_slots,
            ..self.backends[&slot]
        };
        self.write_backend(slot, backend);
    }

    pub fn set_conns(&mut self, id: u32, active: u64, steered: u64) {
        let mut conns: Array<&mut MapData, BackendConns> =
            Array::try_from(self.ebpf_mut().map_mut("backend_conns").expect("conns"))
                .expect("array");
        conns
            .set(id, BackendConns { active, steered }, 0)
            .expect("conns set");
    }

    pub fn backend_conns(&self, id: u32) -> BackendConns {
        let conns: Array<&MapData, BackendConns> =
            Array::try_from(self.ebpf().map("backend_conns").expect("conns")).expect("array");
        conns.get(&id, 0).expect("conns get")
    }

    pub fn conns(&self, id: u32) -> u64 {
        self.backend_conns(id).active
    }

    /// Service 0's counter `which`, summed over CPUs as the agent reads it.
    pub fn counter(&mut self, which: u32) -> u64 {
        self.maps().service_counters(0).expect("service counters")[which as usize]
    }

    pub fn flow(&self, client: SocketAddrV4) -> Option<FlowFwd> {
        let ct: HashMap<&MapData, FlowKey, FlowFwd> =
            HashMap::try_from(self.ebpf().map("ct_fwd").expect("ct_fwd")).expect("hash");
        let key = FlowKey {
            src_addr: ne(*client.ip()),
            dst_addr: ne(*VIP.ip()),
            src_port: client.port().to_be(),
            dst_port: VIP.port().to_be(),
            proto: 6,
            _pad: [0; 3],
        };
        ct.get(&key, 0).ok()
    }

    /// The XDP program, loaded and verified.
    pub fn program(&self) -> &Xdp {
        self.ebpf()
            .program("steer_xdp")
            .expect("program steer_xdp")
            .try_into()
            .expect("an XDP program")
    }

    pub fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let fd = self.program().fd().expect("loaded program fd");
        let out = test_run(fd.as_fd(), frame, 1).expect("BPF_PROG_TEST_RUN");
        (out.verdict, out.data)
    }

    /// Run the TC egress program on a frame the host sends.
    pub fn run_egress(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog: &SchedClassifier = self
            .ebpf()
            .program("steer_tc_egress")
            .expect("program")
            .try_into()
            .expect("tc");
        let fd = prog.fd().expect("loaded program fd");
        let out = test_run(fd.as_fd(), frame, 1).expect("BPF_PROG_TEST_RUN");
        (out.verdict, out.data)
    }

    /// Send a client packet of `flags` and return where it was sent (must be redirected).
    pub fn forward(&self, from: SocketAddrV4, flags: u8) -> (SocketAddrV4, SocketAddrV4) {
        let input = Frame::tcp(from, VIP, flags)
            .with_payload(CLIENT_PAYLOAD)
            .build();
        let (verdict, output) = self.run(&input);
        assert_eq!(
            verdict, XDP_REDIRECT,
            "client packet {flags:#x} not redirected"
        );
        assert_only_nat_fields_changed(&input, &output);
        let out = parse_checked(&output);
        assert_eq!(out.src_mac, LB_BACKEND_MAC);
        let backend = BACKENDS
            .iter()
            .position(|b| *b == out.dst)
            .unwrap_or_else(|| panic!("sent to {} which is no backend", out.dst));
        assert_eq!(out.dst_mac, BACKEND_MACS[backend]);
        assert_eq!(
            *out.src.ip(),
            LB_BACKEND_SIDE,
            "source is the LB's egress address"
        );
        assert!(
            SNAT_PORTS.contains(&out.src.port()),
            "source port {}",
            out.src.port()
        );
        (out.src, out.dst)
    }

    /// Send a backend reply to `snat` and check it comes back as VIP -> client.
    pub fn reply(
        &self,
        backend: SocketAddrV4,
        snat: SocketAddrV4,
        flags: u8,
        client: SocketAddrV4,
    ) {
        let input = Frame::tcp(backend, snat, flags)
            .with_payload(b"world")
            .build();
        let (verdict, output) = self.run(&input);
        assert_eq!(verdict, XDP_REDIRECT, "reply {flags:#x} not redirected");
        assert_only_nat_fields_changed(&input, &output);
        let out = parse_checked(&output);
        assert_eq!((out.src, out.dst), (VIP, client));
        assert_eq!((out.src_mac, out.dst_mac), (LB_CLIENT_MAC, CLIENT_MAC));
    }
}

pub fn in_lab(policy: u32, test: impl FnOnce(&mut Lab) + Send) {
    let ns = build_namespace();
    ns.run(move || {
        let mut lab = Lab::load(policy);
        test(&mut lab);
    });
}
