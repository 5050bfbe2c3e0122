//! The XDP program and its maps: load, attach, write, read counters, detach on drop.
//!
//! Two steps, so a test can run the agent's own writer on a program it never attaches:
//! [`Loaded::load`] (object loaded, programs verified, maps typed; nothing attached) and
//! [`Loaded::attach`] (interfaces registered and attached, background tasks started).
//!
//! Who owns what:
//! - [`KernelMaps`] (the table, through [`Dataplane`] and `&mut self`) holds the handles of the
//!   maps it writes (`services`, `service_keys`, `vip_filter`, `backends`, `rr_ring`, `maglev`)
//!   and reads (`backend_stats`, `service_stats`).
//! - [`Xdp`], once attached, holds the program and its links inside the [`Ebpf`].
//! - The conntrack expiry task owns `ct_fwd` and `ct_rev`, and reads `backends` through a second
//!   handle on a duplicated fd.
//! - The events task owns the `events` ringbuf.
//! - `backend_conns` is mmap-ed once into a [`ConnCounts`] shared by `Arc` (table, expiry, and
//!   the proxy through [`Dataplane::conn_counts`]); every access to it is atomic.
//! - `ifaces` and `tx_ports` are written once, when the interfaces are registered, and stay in
//!   the [`Ebpf`].

mod events;
mod expiry;
mod sys;

use std::{
    collections::HashMap as StdHashMap, fs, net::Ipv4Addr, ops::RangeInclusive, os::fd::AsFd,
    path::Path, sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, HashMap, IterableMap, Map, MapData, MapError, PerCpuArray, RingBuf},
    programs,
};
use lb_common::{Backend, BackendConns, BackendStats, Iface, Service, ServiceKey};
use tokio::{
    io::{Interest, unix::AsyncFd},
    task::AbortHandle,
};

use super::{Dataplane, DataplaneError, conns::ConnCounts};
use crate::spec::{XdpMode, XdpOptions};

const PROGRAM: &str = "steer_xdp";
/// Undoes the destination NAT of local backends on their replies.
const EGRESS_PROGRAM: &str = "steer_tc_egress";
/// How long the connect that resolves a new backend's neighbour may take.
const NEIGHBOUR_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// bpf_fib_lookup refuses a lookup for a device with forwarding off, and the program looks
/// routes up as if from lo (see nat.h): lo needs it on, while the data interfaces keep theirs.
const LO_FORWARDING: &str = "/proc/sys/net/ipv4/conf/lo/forwarding";
/// The ports the host's own outgoing connections (health checks, slot polls) take.
const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// An interface to attach to, resolved before anything is loaded.
#[derive(Debug)]
struct Interface {
    name: String,
    ifindex: u32,
    snat_addr: Ipv4Addr,
}

/// The program loaded (its maps created, sized and seeded, both programs through the verifier)
/// and nothing attached: what [`Loaded::attach`] attaches, and what the packet tests and the
/// XDP benchmark run frames through with `BPF_PROG_TEST_RUN`.
pub struct Loaded {
    /// The programs and the maps [`KernelMaps`] does not own (conntrack, events, `ifaces`,
    /// `tx_ports`, cursors).
    ebpf: Ebpf,
    maps: KernelMaps,
    /// The options' interfaces, resolved before anything was loaded.
    interfaces: Vec<Interface>,
    /// What it was loaded with: the attach mode and the expiry's timeouts, which must agree with
    /// the program's own (`closed_flow_ns`, `time_wait_ns`).
    options: XdpOptions,
}

/// The maps the backend table writes, typed: the one writer of them, through [`Dataplane`].
pub struct KernelMaps {
    services: HashMap<MapData, ServiceKey, Service>,
    /// The keys in `services` and their service ids: what `service_keys` holds, and what each
    /// `vip_filter` slot's count is taken from.
    service_ids: StdHashMap<ServiceKey, u32>,
    service_keys: Array<MapData, ServiceKey>,
    vip_filter: Array<MapData, u32>,
    backends: Array<MapData, Backend>,
    rr_ring: Array<MapData, u32>,
    maglev: Array<MapData, u32>,
    backend_stats: PerCpuArray<MapData, BackendStats>,
    service_stats: PerCpuArray<MapData, u64>,
    conns: Arc<ConnCounts>,
}

/// The program attached to the agent's interfaces. Dropping it detaches from every interface
/// and stops the events reader and the conntrack expiry.
pub struct Xdp {
    /// Background tasks (events, conntrack expiry), aborted on drop.
    tasks: Vec<AbortHandle>,
    interfaces: Vec<String>,
    mode: XdpMode,
    /// The program and its links: dropping it detaches from every interface (aya's `Links`
    /// detach on drop; closing an XDP bpf_link fd detaches it).
    _ebpf: Ebpf,
    /// After `_ebpf`: lo's forwarding goes back off once the program is detached.
    _lo_forwarding: Option<LoForwarding>,
}

impl Loaded {
    /// Resolve `options`' interfaces (a missing one fails before anything is loaded), load the
    /// program with their SNAT ports, timeouts and conntrack size, run both programs through the
    /// verifier and take the table's maps. Writes nothing about the interfaces yet, attaches
    /// nothing and needs no tokio runtime.
    pub fn load(options: &XdpOptions) -> Result<Self, DataplaneError> {
        let interfaces = resolve_interfaces(&options.interfaces)?;
        check_snat_ports(&options.snat_ports)?;
        let flow_events = u32::from(options.flow_events);
        // The kernel takes over a closed flow's reply tuple after the same time expiry frees it.
        let closed_flow_ns =
            u64::try_from(options.closed_flow_timeout.as_nanos()).unwrap_or(u64::MAX);
        let time_wait_ns = u64::try_from(options.backend_time_wait.as_nanos()).unwrap_or(u64::MAX);
        let mut ebpf = EbpfLoader::new()
            .override_global("snat_port_min", options.snat_ports.start(), true)
            .override_global("snat_port_max", options.snat_ports.end(), true)
            .override_global("flow_events", &flow_events, true)
            .override_global("closed_flow_ns", &closed_flow_ns, true)
            .override_global("time_wait_ns", &time_wait_ns, true)
            .map_max_entries("ct_fwd", options.conntrack_entries)
            .map_max_entries("ct_rev", options.conntrack_entries)
            .load(lb_ebpf::steer_bpf())
            .map_err(DataplaneError::Load)?;
        verify(&mut ebpf)?;
        let maps = KernelMaps {
            conns: Arc::new(map_conn_counts(&ebpf)?),
            services: take_map(&mut ebpf, "services")?,
            service_ids: StdHashMap::new(),
            service_keys: take_map(&mut ebpf, "service_keys")?,
            vip_filter: take_map(&mut ebpf, "vip_filter")?,
            backends: take_map(&mut ebpf, "backends")?,
            rr_ring: take_map(&mut ebpf, "rr_ring")?,
            maglev: take_map(&mut ebpf, "maglev")?,
            backend_stats: take_map(&mut ebpf, "backend_stats")?,
            service_stats: take_map(&mut ebpf, "service_stats")?,
        };
        Ok(Loaded {
            ebpf,
            maps,
            interfaces,
            options: options.clone(),
        })
    }

    /// The table's writer.
    pub fn maps(&mut self) -> &mut KernelMaps {
        &mut self.maps
    }

    /// The programs and the maps the writer does not own, for test runs and what a test reads.
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Register the interfaces the program forwards through: `ifaces` (each one's first IPv4
    /// address, the source towards backends reached through it) and `tx_ports`.
    pub fn register_interfaces(&mut self) -> Result<(), DataplaneError> {
        fill_interfaces(&mut self.ebpf, &self.interfaces)
    }

    /// Register the interfaces, seed the SNAT cursors, turn lo's forwarding on, attach both
    /// programs to every interface in the options' mode and start the events reader and the
    /// conntrack expiry with their timeouts (inside the tokio runtime this must be called in).
    /// Returns the table's writer and the attachment.
    ///
    /// On error nothing stays attached: everything attached so far is owned by locals that
    /// detach on return.
    pub fn attach(mut self) -> Result<(KernelMaps, Xdp), DataplaneError> {
        // Registering the ringbuf would panic without one; say so instead.
        require_runtime("attaching XDP")?;
        self.register_interfaces()?;
        seed_snat_cursors(&mut self.ebpf)?;
        let Loaded {
            mut ebpf,
            maps,
            interfaces,
            options,
        } = self;
        let backends_for_expiry = dup_map(&maps.backends, "backends")?;
        let ct_fwd = take_map(&mut ebpf, "ct_fwd")?;
        let ct_rev = take_map(&mut ebpf, "ct_rev")?;
        let events: RingBuf<MapData> = take_map(&mut ebpf, "events")?;
        // SAFETY: the fd is the ringbuf map's own, owned by the `RingBuf` moved into the
        // `AsyncFd`, so it stays open and the same for the whole life of the registration.
        let events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
            .map_err(|e| DataplaneError::Io {
                what: "registering the events ringbuf with tokio".into(),
                source: e.into(),
            })?;

        let lo_forwarding = LoForwarding::enable()?;
        attach(&mut ebpf, &interfaces, options.mode)?;

        let expiry = expiry::Expiry::new(
            ct_fwd,
            ct_rev,
            backends_for_expiry,
            Arc::clone(&maps.conns),
            expiry::Timeouts::new(
                options.flow_idle_timeout,
                options.closed_flow_timeout,
                options.backend_time_wait,
            ),
        );
        let tasks = vec![
            tokio::spawn(events::run(events)).abort_handle(),
            tokio::spawn(expiry::run(expiry)).abort_handle(),
        ];
        let xdp = Xdp {
            tasks,
            interfaces: interfaces.into_iter().map(|i| i.name).collect(),
            mode: options.mode,
            _ebpf: ebpf,
            _lo_forwarding: lo_forwarding,
        };
        Ok((maps, xdp))
    }
}

impl KernelMaps {
    /// What service id `id` serves, for the packets of its flows.
    fn write_service_key(&mut self, id: u32, key: ServiceKey) -> Result<(), DataplaneError> {
        self.service_keys
            .set(id, key, 0)
            .map_err(map_err("service_keys"))
    }

    /// Set the `vip_filter` slot of `vip` to the number of known services whose VIP shares it.
    fn write_vip_filter(&mut self, vip: u32) -> Result<(), DataplaneError> {
        let slot = lb_common::vip_filter_slot(vip);
        let count = self
            .service_ids
            .keys()
            .filter(|k| lb_common::vip_filter_slot(k.vip) == slot)
            .count();
        self.vip_filter
            .set(slot, count as u32, 0)
            .map_err(map_err("vip_filter"))
    }
}

impl Drop for Xdp {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        // The fields drop after this; `_ebpf` detaches both programs from every interface.
        tracing::info!(
            interfaces = ?self.interfaces,
            mode = self.mode.name(),
            "detaching XDP"
        );
    }
}

/// The first IPv4 address of interface `name` (where a supervised instance is reached by
/// default).
pub fn interface_ipv4(name: &str) -> Result<Ipv4Addr, DataplaneError> {
    first_ipv4(&interface_addresses()?, name)
}

fn interface_addresses() -> Result<Vec<nix::ifaddrs::InterfaceAddress>, DataplaneError> {
    Ok(nix::ifaddrs::getifaddrs()
        .map_err(|errno| DataplaneError::Io {
            what: "listing interface addresses".into(),
            source: errno.into(),
        })?
        .collect())
}

fn first_ipv4(
    addrs: &[nix::ifaddrs::InterfaceAddress],
    name: &str,
) -> Result<Ipv4Addr, DataplaneError> {
    addrs
        .iter()
        .filter(|a| a.interface_name == name)
        .find_map(|a| a.address.as_ref()?.as_sockaddr_in().map(|sin| sin.ip()))
        .ok_or_else(|| DataplaneError::NoIpv4Address(name.to_owned()))
}

/// Each interface's index and first IPv4 address, or the error naming the first that lacks one.
fn resolve_interfaces(names: &[String]) -> Result<Vec<Interface>, DataplaneError> {
    let addrs = interface_addresses()?;
    names
        .iter()
        .map(|name| {
            let ifindex = nix::net::if_::if_nametoindex(name.as_str())
                .map_err(|_| DataplaneError::NoSuchInterface(name.clone()))?;
            let snat_addr = first_ipv4(&addrs, name)?;
            Ok(Interface {
                name: name.clone(),
                ifindex,
                snat_addr,
            })
        })
        .collect()
}

/// `ifaces` (ifindex -> SNAT address) and `tx_ports` (ifindex -> ifindex): written before the
/// program is attached, so it never sees an interface it cannot source from or redirect to.
fn fill_interfaces(ebpf: &mut Ebpf, interfaces: &[Interface]) -> Result<(), DataplaneError> {
    let mut ifaces: HashMap<&mut MapData, u32, Iface> = ebpf
        .map_mut("ifaces")
        .ok_or(DataplaneError::MissingMap("ifaces"))?
        .try_into()
        .map_err(map_err("ifaces"))?;
    for iface in interfaces {
        let value = Iface {
            snat_addr: u32::from_ne_bytes(iface.snat_addr.octets()),
            _pad: 0,
        };
        ifaces
            .insert(iface.ifindex, value, 0)
            .map_err(map_err("ifaces"))?;
    }
    let mut tx_ports: DevMapHash<&mut MapData> = ebpf
        .map_mut("tx_ports")
        .ok_or(DataplaneError::MissingMap("tx_ports"))?
        .try_into()
        .map_err(map_err("tx_ports"))?;
    for iface in interfaces {
        tx_ports
            .insert(iface.ifindex, iface.ifindex, None, 0)
            .map_err(|source| DataplaneError::DevMap {
                map: "tx_ports",
                source,
            })?;
        tracing::debug!(
            interface = iface.name,
            ifindex = iface.ifindex,
            snat_addr = %iface.snat_addr,
            "interface registered"
        );
    }
    Ok(())
}

/// Start each backend's SNAT port search at a random port. A restarted agent's maps know nothing
/// of the ports its previous run handed out, which the backends may still hold in TIME_WAIT
/// (60 s after they closed first): from the range's first port again, new flows would meet them
/// one after another, each SYN answered with a stale ACK and retried by the client, for a second
/// or more (seen in steer-bench-llama after each agent restart: a quarter of the connections).
fn seed_snat_cursors(ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
    const NAME: &str = "snat_cursor";
    let mut cursors: Array<&mut MapData, u32> = ebpf
        .map_mut(NAME)
        .ok_or(DataplaneError::MissingMap(NAME))?
        .try_into()
        .map_err(map_err(NAME))?;
    let mut random = vec![0u8; cursors.len() as usize * 4];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random))
        .map_err(|source| DataplaneError::Io {
            what: "reading /dev/urandom".into(),
            source,
        })?;
    for (id, bytes) in (0..).zip(random.chunks_exact(4)) {
        let seed = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        cursors.set(id, seed, 0).map_err(map_err(NAME))?;
    }
    Ok(())
}

/// mmap `backend_conns`; the typed view first checks its value size is `steer_backend_conns`'.
fn map_conn_counts(ebpf: &Ebpf) -> Result<ConnCounts, DataplaneError> {
    const NAME: &str = "backend_conns";
    let map = ebpf.map(NAME).ok_or(DataplaneError::MissingMap(NAME))?;
    let array: Array<&MapData, BackendConns> = map
        .try_into()
        .map_err(|source| DataplaneError::Map { map: NAME, source })?;
    ConnCounts::map_bpf_array(array.map().fd().as_fd(), array.len()).map_err(|source| {
        DataplaneError::Io {
            what: format!("mmap of map `{NAME}`"),
            source,
        }
    })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DataplaneError::MissingMap(name))?;
    T::try_from(map).map_err(|source| DataplaneError::Map { map: name, source })
}

/// A second, independent handle on an array map (its own fd), for another task.
fn dup_map<V: aya::Pod>(
    map: &Array<MapData, V>,
    name: &'static str,
) -> Result<Array<MapData, V>, DataplaneError> {
    let fd = map
        .map()
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| DataplaneError::Io {
            what: format!("duplicating the fd of map `{name}`"),
            source,
        })?;
    let data = MapData::from_fd(fd).map_err(|source| DataplaneError::Map { map: name, source })?;
    Map::from_map_data(data)
        .and_then(Array::try_from)
        .map_err(|source| DataplaneError::Map { map: name, source })
}

/// A SNAT port inside the host's ephemeral range could be claimed by a flow while the host's
/// own connection to the same backend uses it; its replies would then go to the client.
fn check_snat_ports(snat: &RangeInclusive<u16>) -> Result<(), DataplaneError> {
    let text = fs::read_to_string(LOCAL_PORT_RANGE).map_err(|source| DataplaneError::Io {
        what: format!("reading {LOCAL_PORT_RANGE}"),
        source,
    })?;
    match parse_port_range(&text) {
        Some(local) if ranges_overlap(snat, &local) => Err(DataplaneError::SnatPortsOverlap {
            snat: format!("{}-{}", snat.start(), snat.end()),
            local: format!("{}-{}", local.start(), local.end()),
        }),
        Some(_) => Ok(()),
        None => Err(DataplaneError::Io {
            what: format!("reading {LOCAL_PORT_RANGE}"),
            source: std::io::Error::other(format!("unexpected content {text:?}")),
        }),
    }
}

/// `"32768\t60999\n"`, as the kernel prints `ip_local_port_range`.
fn parse_port_range(text: &str) -> Option<RangeInclusive<u16>> {
    let mut ports = text.split_whitespace().map(str::parse::<u16>);
    match (ports.next(), ports.next(), ports.next()) {
        (Some(Ok(low)), Some(Ok(high)), None) if low <= high => Some(low..=high),
        _ => None,
    }
}

fn ranges_overlap(a: &RangeInclusive<u16>, b: &RangeInclusive<u16>) -> bool {
    a.start() <= b.end() && b.start() <= a.end()
}

/// Forwarding on lo, turned on for the program's route lookups while it is attached and back
/// off when the agent detaches; `None` when it was on already (then not the agent's to undo).
///
/// While it is on, a mark file under [`LO_FORWARDING_MARKS`] says so: an agent killed before it could turn it off
/// leaves the mark, and the next agent then knows the `1` it finds is its predecessor's, not
/// the operator's (`/run` is emptied at boot, as the sysctl is reset).
struct LoForwarding {
    mark: std::path::PathBuf,
}

/// Where the marks live, one per network namespace (each has its own sysctl).
const LO_FORWARDING_MARKS: &str = "/run/steer";

/// The mark of this process's network namespace, named by the namespace's inode.
fn lo_forwarding_mark() -> Result<std::path::PathBuf, DataplaneError> {
    use std::os::unix::fs::MetadataExt;
    let netns = fs::metadata("/proc/self/ns/net").map_err(|source| DataplaneError::Io {
        what: "reading /proc/self/ns/net".to_owned(),
        source,
    })?;
    Ok(Path::new(LO_FORWARDING_MARKS).join(format!("lo-forwarding-netns-{}", netns.ino())))
}

impl LoForwarding {
    fn enable() -> Result<Option<Self>, DataplaneError> {
        let current = fs::read_to_string(LO_FORWARDING).map_err(|source| DataplaneError::Io {
            what: format!("reading {LO_FORWARDING}"),
            source,
        })?;
        let mark = lo_forwarding_mark()?;
        let left_by_agent = mark.exists();
        if current.trim() == "1" && !left_by_agent {
            return Ok(None);
        }
        if left_by_agent {
            tracing::info!(
                mark = %mark.display(),
                "forwarding on lo was turned on by an agent that did not exit cleanly: \
                 turning it off again at exit"
            );
        }
        // The mark first: a kill between the two writes must not leave a forgotten `1`.
        fs::create_dir_all(LO_FORWARDING_MARKS)
            .and_then(|()| fs::write(&mark, b""))
            .map_err(|source| DataplaneError::Io {
                what: format!("writing {}", mark.display()),
                source,
            })?;
        fs::write(LO_FORWARDING, "1").map_err(|source| DataplaneError::Io {
            what: format!("writing 1 to {LO_FORWARDING}"),
            source,
        })?;
        tracing::info!(
            path = LO_FORWARDING,
            "enabled forwarding on lo: the program's route lookups are made as if from lo, \
             and the kernel refuses them for a device with forwarding off"
        );
        Ok(Some(LoForwarding { mark }))
    }
}

impl Drop for LoForwarding {
    fn drop(&mut self) {
        match fs::write(LO_FORWARDING, "0") {
            Ok(()) => {
                tracing::info!(path = LO_FORWARDING, "forwarding on lo off again");
                if let Err(error) = fs::remove_file(&self.mark) {
                    tracing::warn!(%error, path = %self.mark.display(), "removing the mark");
                }
            }
            Err(error) => {
                tracing::warn!(%error, path = LO_FORWARDING, "turning forwarding on lo off")
            }
        }
    }
}

fn aya_mode(mode: XdpMode) -> programs::XdpMode {
    match mode {
        XdpMode::Native => programs::XdpMode::Driver,
        XdpMode::Skb => programs::XdpMode::Skb,
    }
}

/// An error, not a panic, when `what` needs a tokio runtime and there is none.
fn require_runtime(what: &str) -> Result<(), DataplaneError> {
    tokio::runtime::Handle::try_current()
        .map(drop)
        .map_err(|e| DataplaneError::Io {
            what: format!("{what} outside a tokio runtime"),
            source: std::io::Error::other(e),
        })
}

/// Both programs through the verifier (loaded into the kernel, not attached).
fn verify(ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
    let program: &mut programs::Xdp = ebpf
        .program_mut(PROGRAM)
        .ok_or(DataplaneError::MissingProgram(PROGRAM))?
        .try_into()
        .map_err(|e: programs::ProgramError| DataplaneError::Load(e.into()))?;
    program.load().map_err(|e| DataplaneError::Load(e.into()))?;
    let egress: &mut programs::SchedClassifier = ebpf
        .program_mut(EGRESS_PROGRAM)
        .ok_or(DataplaneError::MissingProgram(EGRESS_PROGRAM))?
        .try_into()
        .map_err(|e: programs::ProgramError| DataplaneError::Load(e.into()))?;
    egress.load().map_err(|e| DataplaneError::Load(e.into()))
}

fn attach(ebpf: &mut Ebpf, interfaces: &[Interface], mode: XdpMode) -> Result<(), DataplaneError> {
    let program: &mut programs::Xdp = ebpf
        .program_mut(PROGRAM)
        .ok_or(DataplaneError::MissingProgram(PROGRAM))?
        .try_into()
        .map_err(|e: programs::ProgramError| DataplaneError::Load(e.into()))?;
    for iface in interfaces {
        program
            .attach_to_if_index(iface.ifindex, aya_mode(mode))
            .map_err(|source| DataplaneError::Attach {
                interface: iface.name.clone(),
                mode: mode.name(),
                source,
            })?;
        tracing::info!(
            interface = iface.name,
            ifindex = iface.ifindex,
            mode = mode.name(),
            "XDP attached"
        );
    }
    // Replies of local backends leave through the stack, on any of these interfaces.
    let egress: &mut programs::SchedClassifier = ebpf
        .program_mut(EGRESS_PROGRAM)
        .ok_or(DataplaneError::MissingProgram(EGRESS_PROGRAM))?
        .try_into()
        .map_err(|e: programs::ProgramError| DataplaneError::Load(e.into()))?;
    for iface in interfaces {
        egress
            .attach(&iface.name, programs::TcAttachType::Egress)
            .map_err(|source| DataplaneError::AttachEgress {
                interface: iface.name.clone(),
                source,
            })?;
    }
    Ok(())
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

fn out_of_range(what: &'static str, value: impl Into<u64>, limit: u32) -> DataplaneError {
    DataplaneError::OutOfRange {
        what,
        value: value.into(),
        limit: limit.into(),
    }
}

impl Dataplane for KernelMaps {
    /// The filter counts the service before the program can find it, and forgets it after; its
    /// flows find it in `service_keys` once it is in `services`, and no more before it leaves.
    fn upsert_service(&mut self, key: ServiceKey, service: Service) -> Result<(), DataplaneError> {
        let old_id = self.service_ids.insert(key, service.id);
        if old_id.is_none() {
            self.write_vip_filter(key.vip)?;
        }
        self.services
            .insert(key, service, 0)
            .map_err(map_err("services"))?;
        if let Some(old_id) = old_id.filter(|&old_id| old_id != service.id) {
            self.write_service_key(old_id, ServiceKey::default())?;
        }
        self.write_service_key(service.id, key)
    }

    fn write_backend(&mut self, id: u32, backend: Backend) -> Result<(), DataplaneError> {
        self.backends
            .set(id, backend, 0)
            .map_err(map_err("backends"))?;
        if backend.state == lb_common::backend_state::ACTIVE {
            resolve_neighbour(&backend);
        }
        Ok(())
    }

    fn write_rr_ring(&mut self, service_id: u32, ring: &[u32]) -> Result<(), DataplaneError> {
        use lb_common::{MAX_SERVICES, RR_RING_SIZE};
        if service_id >= MAX_SERVICES {
            return Err(out_of_range("service id", service_id, MAX_SERVICES));
        }
        if ring.len() > RR_RING_SIZE as usize {
            return Err(out_of_range(
                "round-robin ring length",
                ring.len() as u64,
                RR_RING_SIZE,
            ));
        }
        for (pos, slot) in (0..).zip(ring) {
            self.rr_ring
                .set(service_id * RR_RING_SIZE + pos, slot, 0)
                .map_err(map_err("rr_ring"))?;
        }
        Ok(())
    }

    fn write_maglev(&mut self, service_id: u32, table: &[u32]) -> Result<(), DataplaneError> {
        use lb_common::{MAGLEV_SIZE, MAX_SERVICES};
        if service_id >= MAX_SERVICES {
            return Err(out_of_range("service id", service_id, MAX_SERVICES));
        }
        if table.len() != MAGLEV_SIZE as usize {
            return Err(out_of_range(
                "Maglev table length",
                table.len() as u64,
                MAGLEV_SIZE,
            ));
        }
        for (pos, slot) in (0..).zip(table) {
            self.maglev
                .set(service_id * MAGLEV_SIZE + pos, slot, 0)
                .map_err(map_err("maglev"))?;
        }
        Ok(())
    }

    fn rewrites_packets(&self) -> bool {
        true
    }

    fn is_local(&self, addr: Ipv4Addr) -> bool {
        match crate::host::has_address(addr) {
            Ok(local) => local,
            Err(error) => {
                tracing::warn!(%addr, %error, "listing this host's addresses; taking the backend as remote");
                false
            }
        }
    }

    fn reset_connections(&mut self, id: u32) -> Result<(), DataplaneError> {
        if self.conns.reset(id) {
            Ok(())
        } else {
            Err(out_of_range("backend id", id, self.conns.len() as u32))
        }
    }

    fn conn_counts(&self) -> Arc<ConnCounts> {
        Arc::clone(&self.conns)
    }

    fn forget_steered(&mut self, id: u32, seen: u64) -> Result<(), DataplaneError> {
        if self.conns.forget_steered(id, seen) {
            Ok(())
        } else {
            Err(out_of_range("backend id", id, self.conns.len() as u32))
        }
    }

    fn backend_stats(&self, id: u32) -> Result<BackendStats, DataplaneError> {
        let per_cpu = self
            .backend_stats
            .get(&id, 0)
            .map_err(map_err("backend_stats"))?;
        Ok(per_cpu
            .iter()
            .fold(BackendStats::default(), |sum, cpu| BackendStats {
                packets: sum.packets.wrapping_add(cpu.packets),
                bytes: sum.bytes.wrapping_add(cpu.bytes),
                new_flows: sum.new_flows.wrapping_add(cpu.new_flows),
            }))
    }

    fn service_counters(
        &self,
        service_id: u32,
    ) -> Result<[u64; lb_common::counter::MAX as usize], DataplaneError> {
        use lb_common::{MAX_SERVICES, counter};
        if service_id >= MAX_SERVICES {
            return Err(out_of_range("service id", service_id, MAX_SERVICES));
        }
        let mut counters = [0u64; counter::MAX as usize];
        for (index, value) in (0..).zip(counters.iter_mut()) {
            let per_cpu = self
                .service_stats
                .get(&(service_id * counter::MAX + index), 0)
                .map_err(map_err("service_stats"))?;
            *value = per_cpu.iter().fold(0u64, |sum, cpu| sum.wrapping_add(*cpu));
        }
        Ok(counters)
    }
}

/// `bpf_fib_lookup` forwards only to a next hop whose MAC the kernel knows, and with forwarding
/// off the stack never resolves it for a passed packet. One TCP connect from the agent to a
/// backend that turns active makes the kernel resolve it, before clients need it.
fn resolve_neighbour(backend: &Backend) {
    let addr = std::net::SocketAddrV4::new(
        Ipv4Addr::from(backend.addr.to_ne_bytes()),
        u16::from_be(backend.port),
    );
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let connect = tokio::net::TcpStream::connect(addr);
        match tokio::time::timeout(NEIGHBOUR_PROBE_TIMEOUT, connect).await {
            Ok(Ok(_)) => tracing::debug!(%addr, "backend answered; its next hop is resolved"),
            Ok(Err(error)) => tracing::warn!(%addr, %error, "backend refused the first connect"),
            Err(_) => tracing::warn!(%addr, timeout = ?NEIGHBOUR_PROBE_TIMEOUT, "backend did not answer the first connect"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snat_ports_must_stay_out_of_the_hosts_ephemeral_range() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some(32768..=60999));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("1 2 3"), None);
        let local = 32768..=60999;
        assert!(!ranges_overlap(&(16384..=32767), &local));
        assert!(!ranges_overlap(&(61000..=65535), &local));
        assert!(ranges_overlap(&(30000..=40000), &local));
        assert!(ranges_overlap(&(60999..=61000), &local));
    }

    #[test]
    fn attach_outside_a_runtime_is_an_error_not_a_panic() {
        let err = require_runtime("attaching XDP").expect_err("no runtime");
        assert!(matches!(err, DataplaneError::Io { .. }), "{err}");
    }

    #[test]
    fn interfaces_resolve_to_index_and_first_ipv4_address() {
        let lo = resolve_interfaces(&["lo".to_string()]).expect("lo");
        assert_eq!(lo[0].ifindex, 1);
        assert_eq!(lo[0].snat_addr, Ipv4Addr::LOCALHOST);
        let missing = resolve_interfaces(&["lo".to_string(), "steer-nosuch0".to_string()]);
        assert!(
            matches!(&missing, Err(DataplaneError::NoSuchInterface(name)) if name == "steer-nosuch0"),
            "{missing:?}"
        );
    }
}
