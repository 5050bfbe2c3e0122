//! Active health checks: every `interval`, an HTTP GET of the service's health path on each of its
//! backends (llama.cpp's `/health` answers 503 while the model loads, 200 when it serves). The
//! verdicts go to the backend table, which alone decides what the kernel sees: it combines them
//! with the supervisor's view of an instance's process, so each can take a backend out.
//!
//! The checker sends its verdict whenever it differs from the one the table holds (so also the
//! first one, and again after the table forgot it for a new process).

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::time::Duration;

use tracing::{Instrument, debug, info_span};

use crate::spec::HealthSpec;
use crate::table::{Checks, TableHandle};

/// Rise and fall counting for one backend. A backend starts healthy: one that never answers
/// turns down after `fall` checks (until then the table counts it unchecked, which passes).
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

    /// Count one check; the verdict after it.
    fn observe(&mut self, passed: bool, config: &HealthSpec) -> bool {
        if passed == self.healthy {
            self.streak = 0;
            return self.healthy;
        }
        self.streak += 1;
        let needed = if passed { config.rise } else { config.fall };
        if self.streak >= needed.get() {
            self.healthy = passed;
            self.streak = 0;
        }
        self.healthy
    }
}

/// Check the backends of `service` until the task is aborted.
pub async fn run(table: TableHandle, service: String, config: HealthSpec) {
    let span = info_span!("health", service = %service);
    async move {
        let mut trackers: HashMap<(u32, SocketAddrV4), Tracker> = HashMap::new();
        let mut tick = tokio::time::interval(config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Ok(snapshot) = table.snapshot() else {
                return; // the table is gone: the agent is stopping
            };
            let backends: HashMap<(u32, SocketAddrV4), Checks> = snapshot
                .backends
                .iter()
                .filter(|b| b.service == service)
                .map(|b| ((b.id, b.address), b.health.checks))
                .collect();
            // Backends that left, or whose id now holds another address, start over; so do
            // those whose verdict the table forgot (a new process). Every verdict reaches the
            // table in the round it was made, before the next snapshot.
            trackers.retain(|key, _| {
                backends
                    .get(key)
                    .is_some_and(|&held| held != Checks::Unchecked)
            });
            // One round's checks run side by side, each bounded by the timeout.
            let mut checks = tokio::task::JoinSet::new();
            for &(id, address) in backends.keys() {
                let (path, timeout) = (config.path.clone(), config.timeout);
                checks.spawn(async move { (id, address, probe(address, &path, timeout).await) });
            }
            while let Some(Ok((id, address, result))) = checks.join_next().await {
                if let Err(why) = &result {
                    debug!(id, %address, %why, "health check failed");
                }
                let tracker = trackers.entry((id, address)).or_insert_with(Tracker::new);
                let passing = tracker.observe(result.is_ok(), &config);
                let held = backends.get(&(id, address)).copied().unwrap_or_default();
                let verdict = if passing {
                    Checks::Passing
                } else {
                    Checks::Failing
                };
                if verdict != held && table.set_checks(id, address, passing).await.is_err() {
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
    crate::probe::get(address, path, timeout)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::tests::answering;
    use std::num::NonZeroU32;
    use tokio::net::TcpListener;

    fn config(rise: u32, fall: u32) -> HealthSpec {
        HealthSpec {
            rise: NonZeroU32::new(rise).expect("rise"),
            fall: NonZeroU32::new(fall).expect("fall"),
            ..HealthSpec::default()
        }
    }

    #[test]
    fn rise_and_fall_need_that_many_checks_in_a_row() {
        let c = config(2, 3);
        let mut t = Tracker::new();
        let verdicts: Vec<bool> = [false, false, true, false, false, false, false, true, true]
            .into_iter()
            .map(|passed| t.observe(passed, &c))
            .collect();
        // A pass breaks the failing streak; the third failure in a row turns it down, the
        // second pass in a row up.
        assert_eq!(
            verdicts,
            [true, true, true, true, true, false, false, false, true]
        );
    }

    /// An HTTP server on loopback answering `status` to whatever it is asked.
    async fn server(status: &'static str) -> SocketAddrV4 {
        answering(move |_| reply(status)).await
    }

    fn reply(status: &str) -> Vec<u8> {
        format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").into_bytes()
    }

    /// An HTTP server on loopback whose `/health` answers 200 to the first `healthy` checks, 503
    /// after (a llama-server that lost its model, say); counts the checks.
    async fn failing_server(
        healthy: u32,
    ) -> (SocketAddrV4, std::sync::Arc<std::sync::atomic::AtomicU32>) {
        use std::sync::atomic::{AtomicU32, Ordering};
        let checks = std::sync::Arc::new(AtomicU32::new(0));
        let seen = checks.clone();
        let addr = answering(move |_| {
            let status = if seen.fetch_add(1, Ordering::SeqCst) < healthy {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            reply(status)
        })
        .await;
        (addr, checks)
    }

    /// Issue 11 finding 3: an instance's backend whose process the supervisor sees up, but whose
    /// `/health` keeps failing, is taken out after `fall` checks, and the supervisor's next
    /// "up" does not bring it back.
    #[tokio::test]
    async fn failing_checks_take_out_an_instance_the_supervisor_sees_up() {
        use crate::fake::FakeDataplane;
        use crate::supervisor::BackendLink;
        use lb_common::backend_state::{ACTIVE, DOWN};
        use std::sync::atomic::Ordering;

        let (address, checks) = failing_server(2).await;
        let health = HealthSpec {
            interval: Duration::from_millis(20),
            ..config(1, 3)
        };
        let dataplane = FakeDataplane::default();
        let (table, _task, id) =
            crate::fake::table_with_instance(&dataplane, Some(health.clone()), address).await;
        let link = BackendLink::new(table.clone(), id, address, Duration::from_secs(1));
        link.up().await;
        let state = || dataplane.maps().backends[&id].state;
        assert_eq!(state(), ACTIVE);
        let checker = tokio::spawn(run(table.clone(), "chat".to_owned(), health));

        // Bounded wait for the event, not a timing assertion.
        for _ in 0..500 {
            if state() == DOWN {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(state(), DOWN, "failing checks took it out");
        let failed = checks.load(Ordering::SeqCst).saturating_sub(2);
        assert!(failed >= 3, "out after fall = 3 failures, not {failed}");

        link.up().await;
        let seen = checks.load(Ordering::SeqCst);
        while checks.load(Ordering::SeqCst) < seen + 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            state(),
            DOWN,
            "the supervisor's up does not erase failing checks"
        );
        let listed = table.snapshot().expect("snapshot");
        let b = &listed.backends[0];
        assert!(!b.healthy);
        assert_eq!(
            (b.health.process, b.health.checks),
            (Some(crate::table::ProcessHealth::Up), Checks::Failing)
        );
        checker.abort();
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
