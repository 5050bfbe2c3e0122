//! `--dataplane userspace`: no BPF. The table's writes have no kernel to go to (the proxy reads
//! the table's published routes instead), and connection counts live in anonymous memory of the
//! same [`ConnCounts`] type the kernel would share, so the proxy has one code path.

use std::net::Ipv4Addr;
use std::sync::Arc;

use lb_common::{Backend, BackendStats, Service, ServiceKey, counter};

use super::conns::ConnCounts;
use super::{Dataplane, DataplaneError};

/// Counts for every backend id the table can hand out.
const IDS: u32 = lb_common::MAX_SERVICES * lb_common::MAX_BACKENDS_PER_SERVICE;

#[derive(Debug)]
pub struct Userspace {
    conns: Arc<ConnCounts>,
}

impl Userspace {
    pub fn new() -> Result<Self, DataplaneError> {
        let conns = ConnCounts::anonymous(IDS).map_err(|source| DataplaneError::Io {
            what: "mapping the connection counts".to_owned(),
            source,
        })?;
        Ok(Userspace {
            conns: Arc::new(conns),
        })
    }
}

impl Dataplane for Userspace {
    fn upsert_service(&mut self, _: ServiceKey, _: Service) -> Result<(), DataplaneError> {
        Ok(())
    }

    fn write_backend(&mut self, _: u32, _: Backend) -> Result<(), DataplaneError> {
        Ok(())
    }

    fn write_rr_ring(&mut self, _: u32, _: &[u32]) -> Result<(), DataplaneError> {
        Ok(())
    }

    fn write_maglev(&mut self, _: u32, _: &[u32]) -> Result<(), DataplaneError> {
        Ok(())
    }

    /// The proxy connects to every backend alike: no NAT to tell apart.
    fn is_local(&self, _: Ipv4Addr) -> bool {
        false
    }

    fn rewrites_packets(&self) -> bool {
        false
    }

    fn reset_connections(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.conns.reset(id);
        Ok(())
    }

    fn conn_counts(&self) -> Arc<ConnCounts> {
        Arc::clone(&self.conns)
    }

    fn forget_steered(&mut self, id: u32, seen: u64) -> Result<(), DataplaneError> {
        self.conns.forget_steered(id, seen);
        Ok(())
    }

    /// Packet counters exist only in the kernel program.
    fn backend_stats(&self, _: u32) -> Result<BackendStats, DataplaneError> {
        Ok(BackendStats::default())
    }

    fn service_counters(&self, _: u32) -> Result<[u64; counter::MAX as usize], DataplaneError> {
        Ok([0; counter::MAX as usize])
    }
}
