//! An instance that serves a service is one of its backends: the actor tells the backend table
//! what it sees (data flows supervisor -> table -> maps; nothing comes back but counters).
//!
//! - exit seen: unhealthy at once, without waiting for active checks;
//! - healthy start (first start, revival, apply, rollback): healthy, and active again if the
//!   supervisor had drained it;
//! - before an apply or a shutdown stops the process: draining, then a wait until its
//!   connections are gone or the drain timeout passes.

use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::{Instant, sleep};
use tracing::{info, warn};

use crate::table::{BackendInfo, BackendState, TableError, TableHandle};

/// How often the drain wait looks at the backend's connection count.
const DRAIN_POLL: Duration = Duration::from_millis(100);

/// The instance's backend in the table.
#[derive(Debug)]
pub struct BackendLink {
    table: TableHandle,
    id: u32,
    address: SocketAddrV4,
    drain_timeout: Duration,
    /// Drained by the supervisor (not by an operator): a healthy start activates it again.
    drained: AtomicBool,
}

impl BackendLink {
    pub fn new(
        table: TableHandle,
        id: u32,
        address: SocketAddrV4,
        drain_timeout: Duration,
    ) -> Self {
        BackendLink {
            table,
            id,
            address,
            drain_timeout,
            drained: AtomicBool::new(false),
        }
    }

    /// Where the table sends this backend's connections.
    pub fn address(&self) -> SocketAddrV4 {
        self.address
    }

    /// The process is gone: no new connections. `exited` is when that was seen (the actor
    /// awaits the child, so an exit is seen as it happens); the delay until the kernel map holds
    /// DOWN is logged.
    pub async fn down(&self, exited: Instant) {
        match self.table.set_health(self.id, self.address, false).await {
            Ok(()) => info!(
                id = self.id,
                address = %self.address,
                exit_to_map_us = exited.elapsed().as_micros() as u64,
                "llama-server gone: backend down"
            ),
            Err(err) => self.failed("marking the backend down", &err),
        }
    }

    /// The process answered `/health` 200: the backend takes new connections again.
    pub async fn up(&self) {
        if let Err(err) = self.table.set_health(self.id, self.address, true).await {
            return self.failed("marking the backend healthy", &err);
        }
        if self.drained.swap(false, Ordering::SeqCst)
            && let Err(err) = self.table.activate_backend(self.id).await
        {
            return self.failed("activating the backend", &err);
        }
        info!(id = self.id, address = %self.address, "backend up");
    }

    /// No new connections; returns once the open ones are gone or the drain timeout passed.
    pub async fn drain(&self) {
        let started = Instant::now();
        // One an operator drained stays drained after the restart.
        let was_active = match self.backend().await {
            Ok(backend) => backend.is_some_and(|b| b.state == BackendState::Active),
            Err(err) => return self.failed("reading the backend", &err),
        };
        if let Err(err) = self.table.drain_backend(self.id).await {
            return self.failed("draining the backend", &err);
        }
        self.drained.fetch_or(was_active, Ordering::SeqCst);
        let deadline = started + self.drain_timeout;
        loop {
            let open = match self.backend().await {
                Ok(backend) => backend.map_or(0, |b| b.active_connections),
                Err(err) => return self.failed("reading the backend's connections", &err),
            };
            if open == 0 {
                info!(id = self.id, waited = ?started.elapsed(), "backend drained");
                return;
            }
            if Instant::now() >= deadline {
                warn!(id = self.id, open, timeout = ?self.drain_timeout, "drain timed out");
                return;
            }
            sleep(DRAIN_POLL).await;
        }
    }

    async fn backend(&self) -> Result<Option<BackendInfo>, TableError> {
        let snapshot = self.table.list().await?;
        Ok(snapshot.backends.into_iter().find(|b| b.id == self.id))
    }

    fn failed(&self, what: &str, err: &TableError) {
        warn!(id = self.id, address = %self.address, %err, "{what}");
    }
}
