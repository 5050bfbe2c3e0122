//! Active health checks: every `interval`, an HTTP GET of the service's health path on each of its
//! backends (llama.cpp's `/health` answers 503 while the model loads, 200 when it serves). The
//! verdicts go to the backend table, which alone decides what the kernel sees.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::time::Duration;

use tracing::{Instrument, debug, info_span};

use crate::config::HealthConfig;
use crate::table::TableHandle;

/// Rise and fall counting for one backend. A backend starts healthy: one that never answers
/// turns down after `fall` checks.
#[derive(Debug)]
struct Tracker {
    healthy: bool,
    /// Verdicts in a row that disagree with `healthy`.
    streak: u32,
}

impl Tracker {
    fn new() -> Self {
        Tracker {
            healthy: true,
            streak: 0,
        }
    }

    /// Count one check; `Some(new state)` when the state flips.
    fn observe(&mut self, passed: bool, config: &HealthConfig) -> Option<bool> {
        if passed == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if passed { config.rise } else { config.fall };
        if self.streak < needed.get() {
            return None;
        }
        self.healthy = passed;
        self.streak = 0;
        Some(passed)
    }
}

/// Check the backends of `service` until the task is aborted.
pub async fn run(table: TableHandle, service: String, config: HealthConfig) {
    let span = info_span!("health", service = %service);
    async move {
        let mut trackers: HashMap<(u32, SocketAddrV4), Tracker> = HashMap::new();
        let mut tick = tokio::time::interval(config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Ok(snapshot) = table.list().await else {
                return; // the table is gone: the agent is stopping
            };
            let backends: Vec<(u32, SocketAddrV4)> = snapshot
                .backends
                .iter()
                .filter(|b| b.service == service)
                .map(|b| (b.id, b.address))
                .collect();
            // Backends that left, or whose id now holds another address, start over.
            trackers.retain(|key, _| backends.contains(key));
            // One round's checks run side by side, each bounded by the timeout.
            let mut checks = tokio::task::JoinSet::new();
            for &(id, address) in &backends {
                let (path, timeout) = (config.path.clone(), config.timeout);
                checks.spawn(async move { (id, address, probe(address, &path, timeout).await) });
            }
            while let Some(Ok((id, address, result))) = checks.join_next().await {
                if let Err(why) = &result {
                    debug!(id, %address, %why, "health check failed");
                }
                let tracker = trackers.entry((id, address)).or_insert_with(Tracker::new);
                if let Some(healthy) = tracker.observe(result.is_ok(), &config)
                    && table.set_health(id, address, healthy).await.is_err()
                {
                    return;
                }
            }
        }
    }
    .instrument(span)
    .await;
}

/// One GET of `path`; `Ok` when the answer's status is 200 within `timeout`.
async fn probe(address: SocketAddrV4, path: &str, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, crate::probe::get(address, path)).await {
        Ok(answer) => answer.map(drop).map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn config(rise: u32, fall: u32) -> HealthConfig {
        HealthConfig {
            rise: NonZeroU32::new(rise).expect("rise"),
            fall: NonZeroU32::new(fall).expect("fall"),
            ..HealthConfig::default()
        }
    }

    #[test]
    fn rise_and_fall_need_that_many_checks_in_a_row() {
        let c = config(2, 3);
        let mut t = Tracker::new();
        assert_eq!(t.observe(false, &c), None);
        assert_eq!(t.observe(false, &c), None);
        assert_eq!(
            t.observe(true, &c),
            None,
            "a pass breaks the failing streak"
        );
        assert_eq!(t.observe(false, &c), None);
        assert_eq!(t.observe(false, &c), None);
        assert_eq!(t.observe(false, &c), Some(false), "third failure in a row");
        assert_eq!(t.observe(false, &c), None, "already down");
        assert_eq!(t.observe(true, &c), None);
        assert_eq!(t.observe(true, &c), Some(true), "second pass in a row");
    }

    /// A one-shot HTTP server on loopback answering `status` to whatever it is asked.
    async fn server(status: &'static str) -> SocketAddrV4 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let std::net::SocketAddr::V4(addr) = listener.local_addr().expect("addr") else {
            panic!("not IPv4");
        };
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 256];
                let _ = stream.read(&mut buf).await;
                let reply = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                let _ = stream.write_all(reply.as_bytes()).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn probe_passes_on_200_only() {
        let timeout = Duration::from_secs(2);
        assert_eq!(
            probe(server("200 OK").await, "/health", timeout).await,
            Ok(())
        );
        let loading = probe(server("503 Service Unavailable").await, "/health", timeout).await;
        assert_eq!(loading, Err("GET /health: status 503".to_owned()));
        let closed = {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            drop(listener);
            addr
        };
        let std::net::SocketAddr::V4(closed) = closed else {
            panic!("not IPv4");
        };
        let refused = probe(closed, "/health", timeout).await;
        assert!(refused.is_err_and(|e| e.contains("refused")));
    }
}
