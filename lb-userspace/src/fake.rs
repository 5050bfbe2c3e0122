//! An in-memory [`Dataplane`] for tests: records every write in order and keeps the resulting
//! map contents, shared through an `Arc` so a test can look while the table owns it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use std::sync::atomic::Ordering;

use lb_common::{Backend, BackendStats, Service, ServiceKey, counter};

use crate::dataplane::conns::ConnCounts;
use crate::dataplane::{Dataplane, DataplaneError};

/// One call, in the order the table made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Service(u32),
    Backend(u32),
    Ring(u32),
    Maglev(u32),
    Reset(u32),
    ForgetSteered(u32),
}

#[derive(Debug, Default)]
pub struct Maps {
    pub writes: Vec<Write>,
    pub services: HashMap<ServiceKey, Service>,
    pub backends: HashMap<u32, Backend>,
    pub rings: HashMap<u32, Vec<u32>>,
    pub maglev: HashMap<u32, Vec<u32>>,
    pub stats: HashMap<u32, BackendStats>,
    pub counters: HashMap<u32, [u64; counter::MAX as usize]>,
    /// Reads of `stats` and `counters` (each a per-CPU map syscall in the kernel's dataplane).
    pub counter_reads: usize,
    /// Addresses `is_local` answers true for.
    pub local_addrs: Vec<std::net::Ipv4Addr>,
    /// The next write of this backend id fails (once).
    pub fail_backend: Option<u32>,
    /// What `rewrites_packets` answers: XDP's true, or false (the default) for tests whose
    /// backends are servers on loopback.
    pub rewrites_packets: bool,
}

/// The maps, and connection counts in anonymous shared memory as the userspace dataplane
/// keeps them (a test sets them as the kernel's or the proxy's claims would).
#[derive(Clone, Debug)]
pub struct FakeDataplane {
    maps: Arc<Mutex<Maps>>,
    counts: Arc<ConnCounts>,
}

impl Default for FakeDataplane {
    fn default() -> Self {
        let ids = lb_common::MAX_SERVICES * lb_common::MAX_BACKENDS_PER_SERVICE;
        let counts = ConnCounts::anonymous(ids).unwrap_or_else(|e| panic!("mapping counts: {e}"));
        FakeDataplane {
            maps: Arc::default(),
            counts: Arc::new(counts),
        }
    }
}

impl FakeDataplane {
    pub fn maps(&self) -> MutexGuard<'_, Maps> {
        // A test that panicked while holding the lock has already failed.
        self.maps
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Active connections on backend `id`.
    pub fn connections(&self, id: u32) -> u64 {
        self.counts.get(id)
    }

    /// Flows steered to backend `id` since its last slot poll.
    pub fn steered(&self, id: u32) -> u64 {
        self.counts.steered(id)
    }

    /// `id` has `open` active connections, as if the kernel had counted them.
    pub fn set_connections(&self, id: u32, open: u64) {
        self.counts.as_slice()[id as usize]
            .active
            .store(open, Ordering::Release);
    }

    /// `steered` flows were steered to `id` since its last slot poll.
    pub fn set_steered(&self, id: u32, steered: u64) {
        self.counts.as_slice()[id as usize]
            .steered
            .store(steered, Ordering::Release);
    }
}

impl Dataplane for FakeDataplane {
    fn upsert_service(&mut self, key: ServiceKey, service: Service) -> Result<(), DataplaneError> {
        let mut maps = self.maps();
        maps.writes.push(Write::Service(service.id));
        maps.services.insert(key, service);
        Ok(())
    }

    fn write_backend(&mut self, id: u32, backend: Backend) -> Result<(), DataplaneError> {
        let mut maps = self.maps();
        if maps.fail_backend == Some(id) {
            maps.fail_backend = None;
            return Err(DataplaneError::MissingMap("backends"));
        }
        maps.writes.push(Write::Backend(id));
        maps.backends.insert(id, backend);
        Ok(())
    }

    fn write_rr_ring(&mut self, service_id: u32, ring: &[u32]) -> Result<(), DataplaneError> {
        let mut maps = self.maps();
        maps.writes.push(Write::Ring(service_id));
        maps.rings.insert(service_id, ring.to_vec());
        Ok(())
    }

    fn write_maglev(&mut self, service_id: u32, table: &[u32]) -> Result<(), DataplaneError> {
        let mut maps = self.maps();
        maps.writes.push(Write::Maglev(service_id));
        maps.maglev.insert(service_id, table.to_vec());
        Ok(())
    }

    fn is_local(&self, addr: std::net::Ipv4Addr) -> bool {
        self.maps().local_addrs.contains(&addr)
    }

    fn rewrites_packets(&self) -> bool {
        self.maps().rewrites_packets
    }

    fn reset_connections(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.maps().writes.push(Write::Reset(id));
        self.counts.reset(id);
        Ok(())
    }

    fn conn_counts(&self) -> Arc<ConnCounts> {
        Arc::clone(&self.counts)
    }

    fn forget_steered(&mut self, id: u32, seen: u64) -> Result<(), DataplaneError> {
        self.maps().writes.push(Write::ForgetSteered(id));
        self.counts.forget_steered(id, seen);
        Ok(())
    }

    fn backend_stats(&self, id: u32) -> Result<BackendStats, DataplaneError> {
        let mut maps = self.maps();
        maps.counter_reads += 1;
        Ok(maps.stats.get(&id).copied().unwrap_or_default())
    }

    fn service_counters(
        &self,
        service_id: u32,
    ) -> Result<[u64; counter::MAX as usize], DataplaneError> {
        let mut maps = self.maps();
        maps.counter_reads += 1;
        Ok(maps.counters.get(&service_id).copied().unwrap_or_default())
    }
}

/// Service `chat` at 10.0.0.100:80, round robin over `backends`, checked by `health` when
/// given, everything else its default.
pub fn chat_service(
    backends: Vec<crate::spec::BackendSpec>,
    health: Option<crate::spec::HealthSpec>,
) -> crate::spec::ServiceSpec {
    crate::spec::ServiceSpec {
        name: "chat".to_owned(),
        address: "10.0.0.100:80".parse().expect("vip"),
        policy: crate::spec::Policy::RoundRobin,
        backends,
        health,
        slots: None,
        proxy: crate::spec::ProxySpec::default(),
        pools: Vec::new(),
        default_pool: 0,
        affinity: None,
        ejection: None,
    }
}

/// A table over `dataplane` with one service, `chat` (checked by `health` when given), and the
/// backend of instance `gpt` at `address` in it; the backend's id. The task ends with the table.
pub async fn table_with_instance(
    dataplane: &FakeDataplane,
    health: Option<crate::spec::HealthSpec>,
    address: std::net::SocketAddrV4,
) -> (
    crate::table::TableHandle,
    tokio::task::JoinHandle<FakeDataplane>,
    u32,
) {
    let service = chat_service(Vec::new(), health);
    let (table, task) =
        crate::table::start(dataplane.clone(), &[service]).unwrap_or_else(|e| panic!("{e}"));
    let added = table
        .add_backend(crate::table::NewBackend {
            service: "chat".to_owned(),
            address,
            weight: crate::spec::Weight::ONE,
            max_connections: 0,
            models: Vec::new(),
            instance: Some("gpt".to_owned()),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    (table, task, added.id)
}
