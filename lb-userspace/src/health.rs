//! Active health checks: every `interval`, an HTTP GET of the service's health path on each of its
//! backends (llama.cpp's `/health` answers 503 "Loading model" while the model loads, 200 when it
//! serves). The verdicts go to the backend table, which alone decides what the kernel sees: it
//! combines them with the supervisor's view of an instance's process, so each can take a backend
//! out.
//!
//! The checker sends its verdict whenever it differs from the one the table holds (so also the
//! first one, and again after the table forgot it for a new process).

use std::collections::HashMap;
use std::net::SocketAddrV4;

use bytes::Bytes;
use tracing::{Instrument, debug, info, info_span};

use crate::probe::{self, GetError};
use crate::spec::HealthSpec;
use crate::table::{Checks, TableHandle};

/// One check's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// 200 within the timeout.
    Pass,
    /// 503 "Loading model": up, not ready yet.
    Loading,
    /// Anything else: no answer, another status.
    Fail,
}

/// Where the counting of one backend stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Unknown,
    Loading,
    Healthy,
    Unhealthy,
}

impl Verdict {
    /// As the table holds it.
    fn checks(self) -> Checks {
        match self {
            Verdict::Unknown => Checks::Unchecked,
            Verdict::Loading => Checks::Loading,
            Verdict::Healthy => Checks::Passing,
            Verdict::Unhealthy => Checks::Failing,
        }
    }
}

/// Rise and fall counting for one backend, which starts unknown (the table keeps it out):
/// - one pass makes an unknown or loading backend healthy: a server that answers 200 serves;
///   an unhealthy one needs `rise` passes in a row;
/// - "Loading model" makes any backend loading at once and counts towards nothing: a server
///   that loads its model is not failing (a passing check after it is the load's end);
/// - `fall` failures in a row make any other one unhealthy, an unknown one too.
#[derive(Debug)]
struct Tracker {
    verdict: Verdict,
    /// Outcomes in a row that pull away from `verdict`.
    streak: u32,
}

impl Tracker {
    fn new() -> Self {
        Tracker {
            verdict: Verdict::Unknown,
            streak: 0,
        }
    }

    /// Count one check; the verdict after it.
    fn observe(&mut self, outcome: Outcome, config: &HealthSpec) -> Verdict {
        let (target, needed) = match (self.verdict, outcome) {
            (_, Outcome::Loading) => (Verdict::Loading, 1),
            (Verdict::Unhealthy, Outcome::Pass) => (Verdict::Healthy, config.rise.get()),
            (_, Outcome::Pass) => (Verdict::Healthy, 1),
            (_, Outcome::Fail) => (Verdict::Unhealthy, config.fall.get()),
        };
        if target == self.verdict {
            self.streak = 0;
            return self.verdict;
        }
        self.streak += 1;
        if self.streak >= needed {
            self.verdict = target;
            self.streak = 0;
        }
        self.verdict
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
            trackers.retain(|key, tracker| {
                backends.get(key).is_some_and(|&held| {
                    held != Checks::Unchecked || tracker.verdict == Verdict::Unknown
                })
            });
            // One round's checks run side by side, each bounded by the timeout.
            let mut checks = tokio::task::JoinSet::new();
            for &(id, address) in backends.keys() {
                let (path, timeout) = (config.path.clone(), config.timeout);
                checks.spawn(async move {
                    let result = crate::probe::get(address, &path, timeout).await;
                    (id, address, result)
                });
            }
            while let Some(Ok((id, address, result))) = checks.join_next().await {
                if let Err(why) = &result {
                    debug!(id, %address, %why, "health check did not pass");
                }
                let tracker = trackers.entry((id, address)).or_insert_with(Tracker::new);
                let from = tracker.verdict;
                let to = tracker.observe(outcome(&result), &config);
                if to != from {
                    info!(id, %address, ?from, ?to, "health check verdict");
                }
                let held = backends.get(&(id, address)).copied().unwrap_or_default();
                if to.checks() != held && table.set_checks(id, address, to.checks()).await.is_err()
                {
                    return;
                }
            }
        }
    }
    .instrument(span)
    .await;
}

/// A check passes on a 200; llama.cpp's 503 "Loading model" is loading, not failing.
fn outcome(result: &Result<Bytes, GetError>) -> Outcome {
    match result {
        Ok(_) => Outcome::Pass,
        Err(GetError::Status { status, body, .. })
            if probe::is_loading(*status, body.as_bytes()) =>
        {
            Outcome::Loading
        }
        Err(_) => Outcome::Fail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::tests::{LOADING_BODY, answering};
    use std::num::NonZeroU32;
    use std::time::Duration;
    use tokio::net::TcpListener;

    fn config(rise: u32, fall: u32) -> HealthSpec {
        HealthSpec {
            rise: NonZeroU32::new(rise).expect("rise"),
            fall: NonZeroU32::new(fall).expect("fall"),
            ..HealthSpec::default()
        }
    }

    /// The verdicts after each outcome, from a new tracker.
    fn verdicts(c: &HealthSpec, outcomes: &[Outcome]) -> Vec<Verdict> {
        let mut t = Tracker::new();
        outcomes.iter().map(|&o| t.observe(o, c)).collect()
    }

    #[test]
    fn rise_and_fall_need_that_many_checks_in_a_row() {
        use Outcome::{Fail, Pass};
        use Verdict::{Healthy, Unhealthy};
        let c = config(2, 3);
        // Healthy at the first pass; a pass breaks the failing streak; the third failure in a
        // row turns it down, the second pass in a row up.
        assert_eq!(
            verdicts(&c, &[Pass, Fail, Fail, Pass, Fail, Fail, Fail, Pass, Pass]),
            [
                Healthy, Healthy, Healthy, Healthy, Healthy, Healthy, Unhealthy, Unhealthy, Healthy
            ]
        );
    }

    #[test]
    fn a_new_backend_is_unknown_until_it_passes_or_fails_fall_times() {
        use Outcome::{Fail, Pass};
        use Verdict::{Healthy, Unhealthy, Unknown};
        let c = config(2, 3);
        assert_eq!(
            verdicts(&c, &[Fail, Fail, Pass]),
            [Unknown, Unknown, Healthy],
            "one pass, not rise"
        );
        assert_eq!(
            verdicts(&c, &[Fail, Fail, Fail, Pass, Pass]),
            [Unknown, Unknown, Unhealthy, Unhealthy, Healthy],
            "never answered: unhealthy, then rise applies"
        );
    }

    #[test]
    fn loading_keeps_it_out_without_counting_towards_fall() {
        use Outcome::{Fail, Loading, Pass};
        let c = config(3, 2);
        assert_eq!(
            verdicts(&c, &[Loading, Loading, Loading, Loading, Pass]),
            [
                Verdict::Loading,
                Verdict::Loading,
                Verdict::Loading,
                Verdict::Loading,
                Verdict::Healthy
            ],
            "loading as long as it says so, in at its first pass"
        );
        assert_eq!(
            verdicts(&c, &[Pass, Fail, Loading, Fail, Fail]),
            [
                Verdict::Healthy,
                Verdict::Healthy,
                Verdict::Loading,
                Verdict::Loading,
                Verdict::Unhealthy
            ],
            "out at once when it reloads; failures after count from there"
        );
        assert_eq!(
            verdicts(&c, &[Fail, Fail, Loading, Pass]),
            [
                Verdict::Unknown,
                Verdict::Unhealthy,
                Verdict::Loading,
                Verdict::Healthy
            ],
            "an unhealthy server that loads again needs one pass, not rise"
        );
    }

    /// An HTTP server on loopback answering `status` to whatever it is asked.
    async fn server(status: &'static str) -> SocketAddrV4 {
        answering(move |_| reply(status)).await
    }

    fn reply(status: &str) -> Vec<u8> {
        answer(status, "")
    }

    fn answer(status: &str, body: &str) -> Vec<u8> {
        let length = body.len();
        format!("HTTP/1.1 {status}\r\nContent-Length: {length}\r\n\r\n{body}").into_bytes()
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
    async fn only_200_passes_and_only_llama_cpps_loading_503_is_loading() {
        let timeout = Duration::from_secs(2);
        let check =
            |address| async move { outcome(&crate::probe::get(address, "/health", timeout).await) };
        assert_eq!(check(server("200 OK").await).await, Outcome::Pass);
        let unavailable = "503 Service Unavailable";
        assert_eq!(check(server(unavailable).await).await, Outcome::Fail);
        let loading = answering(move |_| answer(unavailable, LOADING_BODY)).await;
        assert_eq!(check(loading).await, Outcome::Loading);
        let busy = r#"{"error":{"code":503,"message":"no slot available"}}"#;
        let busy = answering(move |_| answer(unavailable, busy)).await;
        assert_eq!(check(busy).await, Outcome::Fail, "another 503 fails");
        let closed = {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            drop(listener);
            addr
        };
        let std::net::SocketAddr::V4(closed) = closed else {
            panic!("not IPv4");
        };
        assert_eq!(check(closed).await, Outcome::Fail);
    }

    /// A configured backend of a checked service is kept out (DOWN) until its first check, and
    /// while it answers "Loading model"; its first 200 takes it in.
    #[tokio::test]
    async fn a_loading_backend_is_kept_out_until_it_serves() {
        use crate::fake::FakeDataplane;
        use crate::table::BackendStatus;
        use lb_common::backend_state::{ACTIVE, DOWN};
        use std::sync::atomic::{AtomicBool, Ordering};

        let ready = std::sync::Arc::new(AtomicBool::new(false));
        let serving = ready.clone();
        let address = answering(move |_| {
            if serving.load(Ordering::SeqCst) {
                reply("200 OK")
            } else {
                answer("503 Service Unavailable", LOADING_BODY)
            }
        })
        .await;
        let health = HealthSpec {
            interval: Duration::from_millis(20),
            ..config(3, 1)
        };
        let backend = crate::spec::BackendSpec {
            address,
            weight: crate::spec::Weight::ONE,
            max_connections: 0,
            models: Vec::new(),
        };
        let service = crate::fake::chat_service(vec![backend], Some(health.clone()));
        let dataplane = FakeDataplane::default();
        let (table, _task) = crate::table::start(dataplane.clone(), &[service]).expect("start");
        let status = || table.snapshot().expect("snapshot").backends[0].status;
        let state = || dataplane.maps().backends[&0].state;
        assert_eq!((status(), state()), (BackendStatus::Unknown, DOWN));
        let checker = tokio::spawn(run(table.clone(), "chat".to_owned(), health));
        // Bounded waits for the events, not timing assertions.
        let until = |wanted: BackendStatus| async move {
            for _ in 0..500 {
                if status() == wanted {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            status()
        };
        assert_eq!(until(BackendStatus::Loading).await, BackendStatus::Loading);
        assert_eq!(state(), DOWN);
        assert!(dataplane.maps().rings[&0].is_empty(), "not in the ring");
        // Loading longer than `fall` checks: still loading, not unhealthy.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(status(), BackendStatus::Loading);
        ready.store(true, Ordering::SeqCst);
        assert_eq!(until(BackendStatus::Healthy).await, BackendStatus::Healthy);
        assert_eq!(state(), ACTIVE);
        assert_eq!(dataplane.maps().rings[&0], [0]);
        checker.abort();
    }
}
