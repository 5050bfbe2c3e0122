//! An instance that serves a service is one of its backends: the actor tells the backend table
//! what it sees of the process (data flows supervisor -> table -> maps; nothing comes back but
//! counters). The table combines that with the active checks' verdict: the supervisor's "up"
//! never overrides failing checks.
//!
//! - exit seen: process down at once, without waiting for active checks;
//! - healthy start (first start, revival, apply, rollback): process up;
//! - before an apply or a shutdown stops the process: process draining, then a wait until its
//!   connections are gone and its llama-server's slots idle (other balancers of a fleet send it
//!   work too), or the drain timeout passes. An operator's drain is the operator's
//!   own state and outlives restarts.

use std::net::SocketAddrV4;
use std::time::Duration;

use tokio::time::{Instant, sleep};
use tracing::{debug, info, warn};

use crate::table::{ProcessHealth, TableError, TableHandle};

/// How often the drain wait looks at the backend's connection count: a load of the count the
/// kernel and the proxy share, not a call to the table.
const DRAIN_POLL: Duration = Duration::from_millis(100);

/// The instance's backend in the table.
#[derive(Debug)]
pub struct BackendLink {
    table: TableHandle,
    id: u32,
    address: SocketAddrV4,
    drain_timeout: Duration,
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
        }
    }

    /// Its id in the table.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Where the table sends this backend's connections.
    pub fn address(&self) -> SocketAddrV4 {
        self.address
    }

    /// The process is gone: no new connections. `exited` is when that was seen (the actor
    /// awaits the child, so an exit is seen as it happens); the delay until the kernel map holds
    /// DOWN is logged.
    pub async fn down(&self, exited: Instant) {
        match self.report(ProcessHealth::Down).await {
            Ok(()) => info!(
                id = self.id,
                address = %self.address,
                exit_to_map_us = exited.elapsed().as_micros() as u64,
                "llama-server gone: backend down"
            ),
            Err(err) => self.failed("marking the backend down", &err),
        }
    }

    /// The process answered `/health` 200: the backend takes new connections unless its
    /// checks fail or an operator drained it.
    pub async fn up(&self) {
        match self.report(ProcessHealth::Up).await {
            Ok(()) => info!(id = self.id, address = %self.address, "process up"),
            Err(err) => self.failed("marking the process up", &err),
        }
    }

    /// No new connections; returns once the open ones are gone or the drain timeout passed.
    pub async fn drain(&self) {
        let started = Instant::now();
        if let Err(err) = self.report(ProcessHealth::Draining).await {
            return self.failed("draining the backend", &err);
        }
        let deadline = started + self.drain_timeout;
        loop {
            let open = self.table.connections(self.id);
            if open == 0 {
                break;
            }
            if Instant::now() >= deadline {
                warn!(id = self.id, open, timeout = ?self.drain_timeout, "drain timed out");
                return;
            }
            sleep(DRAIN_POLL).await;
        }
        // Other balancers of a fleet send it work this agent does not count: llama-server's own
        // slots are the shared truth. A server whose slots cannot be read is taken as idle.
        loop {
            match crate::slots::poll_backend(self.address, DRAIN_POLL * 10).await {
                Ok(slots) if slots.idle < slots.total => {}
                Ok(_) => break,
                Err(error) => {
                    debug!(id = self.id, %error, "slots unreadable: drained by connections alone");
                    break;
                }
            }
            if Instant::now() >= deadline {
                warn!(id = self.id, timeout = ?self.drain_timeout, "drain timed out with slots busy");
                return;
            }
            sleep(DRAIN_POLL).await;
        }
        info!(id = self.id, waited = ?started.elapsed(), "backend drained");
    }

    async fn report(&self, process: ProcessHealth) -> Result<(), TableError> {
        self.table.set_process(self.id, self.address, process).await
    }

    fn failed(&self, what: &str, err: &TableError) {
        warn!(id = self.id, address = %self.address, %err, "{what}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeDataplane;
    use lb_common::backend_state::DRAINING;

    /// The drain reads the shared count, not the table: with the table's queue gone after the
    /// drain began, it still waits for the connections and ends one poll after they are gone.
    #[tokio::test(start_paused = true)]
    async fn a_drain_ends_when_the_count_reaches_zero_without_asking_the_table() {
        let dataplane = FakeDataplane::default();
        // Nothing listens there: the slot check after the count finds no server and ends.
        let address = "127.0.0.1:9".parse().expect("address");
        let (table, task, id) = crate::fake::table_with_instance(&dataplane, None, address).await;
        dataplane.set_connections(id, 2);
        let link = BackendLink::new(table.clone(), id, address, Duration::from_secs(30));
        let drain = tokio::spawn(async move {
            link.drain().await;
            Instant::now()
        });
        for _ in 0..1000 {
            if dataplane.maps().backends[&id].state == DRAINING {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(dataplane.maps().backends[&id].state, DRAINING);
        // A drain that asked the table from here on would end at once, on `Stopped`.
        table.close().await;
        task.await.expect("table task");

        sleep(Duration::from_secs(5)).await;
        assert!(!drain.is_finished(), "waits while connections are open");
        dataplane.set_connections(id, 0);
        let gone = Instant::now();
        let ended = drain.await.expect("drain task");
        assert!(
            ended - gone <= DRAIN_POLL,
            "ended {:?} after the last connection",
            ended - gone
        );
    }

    /// With no connection of its own left, the drain still waits while llama-server's `/slots`
    /// says a slot is busy (another balancer's request), and ends once all are idle. The
    /// stand-in is a loopback server answering `/slots` busy for its first answers.
    #[tokio::test]
    async fn a_drain_waits_for_the_servers_own_slots() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        const BUSY_ANSWERS: usize = 3;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let std::net::SocketAddr::V4(address) = listener.local_addr().expect("address") else {
            panic!("an IPv4 address");
        };
        let answered = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&answered);
        let server = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let mut head = [0u8; 1024];
                let _ = stream.read(&mut head).await;
                let n = counted.fetch_add(1, Ordering::SeqCst);
                let busy = n < BUSY_ANSWERS;
                let body = format!(
                    r#"[{{"id":0,"is_processing":{busy}}},{{"id":1,"is_processing":false}}]"#
                );
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        let dataplane = FakeDataplane::default();
        let (table, task, id) = crate::fake::table_with_instance(&dataplane, None, address).await;
        let link = BackendLink::new(table.clone(), id, address, Duration::from_secs(30));
        link.drain().await;
        assert_eq!(
            answered.load(Ordering::SeqCst),
            BUSY_ANSWERS + 1,
            "ended on the first answer with every slot idle, not before"
        );
        assert_eq!(dataplane.maps().backends[&id].state, DRAINING);
        server.abort();
        table.close().await;
        task.await.expect("table task");
    }
}
