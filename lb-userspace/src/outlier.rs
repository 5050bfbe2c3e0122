//! Passive health (outlier detection) of the backends of http services, from what the proxy
//! sees of them. A backend that fails `consecutive_failures` requests in a row
//! ([`RequestCounts::failures_in_a_row`]: 500/502/503/504 but llama.cpp's loading 503,
//! connections refused, reset or timed out, answers cut short or broken off) is ejected: the
//! table marks it `ejected`, so neither the kernel nor the proxy gives it anything new, for
//! `base_time`, twice as long each time it is ejected again before it stayed in for `max_time`,
//! at most `max_time`. At most `max_ejected_percent` of the backends serving or ejected of each
//! model pool (a service without pools is one) are out at once, and never a pool's last one
//! serving. The same server (address) in the agent's other services, an l4 service that XDP
//! steers say, goes out and comes back with it, unless it is the last one serving there. An
//! ejected backend comes back by itself when its time is up; active health checks, if any, keep
//! judging it meanwhile.
//!
//! [`RequestCounts::failures_in_a_row`]: crate::requests::RequestCounts::failures_in_a_row

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::spec::{EjectionSpec, PoolSpec};
use crate::table::{BackendInfo, BackendStatus, TableError, TableHandle};

/// How often the records are looked at without a failure to wake for (they come back on their
/// own deadlines too): a bound on missed wake-ups, not a clock anything depends on.
const TICK: Duration = Duration::from_secs(1);

/// What passive health remembers of one backend (an id with its address).
#[derive(Debug, Default)]
struct Record {
    /// Ejections in a row: each lasts twice the one before.
    ejections: u32,
    /// While ejected: when it comes back.
    out_until: Option<Instant>,
    /// Since when it is back from its last ejection.
    back_since: Option<Instant>,
    /// Its streak reached the threshold while the share was out: said once.
    held_back: bool,
}

/// A service whose backends passive health judges.
#[derive(Clone, Debug)]
pub struct Judged {
    pub service: String,
    pub spec: EjectionSpec,
    /// Its model pools: the share out is bounded in each (none: the service is one pool).
    pub pools: Vec<PoolSpec>,
}

/// Judge the backends of `services` until the table stops.
pub async fn run(table: TableHandle, services: Vec<Judged>) {
    let requests = table.requests();
    let mut records: HashMap<(u32, SocketAddrV4), Record> = HashMap::new();
    loop {
        let next = records.values().filter_map(|r| r.out_until).min();
        let wake = next.map_or(Instant::now() + TICK, |at| at.min(Instant::now() + TICK));
        tokio::select! {
            () = requests.failure() => {}
            () = tokio::time::sleep_until(wake) => {}
        }
        let Ok(snapshot) = table.snapshot() else {
            return;
        };
        let now = Instant::now();
        for Judged {
            service,
            spec,
            pools,
        } in &services
        {
            let backends: Vec<&BackendInfo> = snapshot
                .backends
                .iter()
                .filter(|b| &b.service == service)
                .collect();
            // Each pool's members, by index into `backends`.
            let groups: Vec<Vec<usize>> = if pools.is_empty() {
                vec![(0..backends.len()).collect()]
            } else {
                pools
                    .iter()
                    .map(|pool| {
                        (0..backends.len())
                            .filter(|&i| pool.served_by(&backends[i].models))
                            .collect()
                    })
                    .collect()
            };
            // Those whose time is up come back first: they count as serving below.
            for backend in &backends {
                let (id, address) = (backend.id, backend.address);
                let record = records.entry((id, address)).or_default();
                if record.out_until.is_none_or(|until| until > now) {
                    continue;
                }
                match table.set_ejected(id, address, false).await {
                    Ok(()) => {}
                    Err(TableError::Stopped) => return,
                    // Kept out: tried again at the next wake.
                    Err(error) => {
                        warn!(service, id, %address, %error, "backend not taken back yet");
                        continue;
                    }
                }
                info!(service, id, %address, "backend back from ejection");
                record.out_until = None;
                for (other, _) in same_server(&snapshot.backends, id, address) {
                    let judged_out = records
                        .get(&(other, address))
                        .is_some_and(|r| r.out_until.is_some());
                    if !judged_out && take_out(&table, other, address, false).await.is_err() {
                        return;
                    }
                }
                let record = records.entry((id, address)).or_default();
                record.back_since = Some(now);
                // Its failures were before it went out.
                requests.forget_failures(id);
            }
            for (i, backend) in backends.iter().enumerate() {
                let (id, address) = (backend.id, backend.address);
                let record = records.entry((id, address)).or_default();
                if record.out_until.is_some() {
                    continue;
                }
                if record
                    .back_since
                    .is_some_and(|since| now - since >= spec.max_time)
                {
                    record.ejections = 0;
                    record.back_since = None;
                }
                if backend.status != BackendStatus::Healthy {
                    // Out for another reason, which explains its failures.
                    requests.forget_failures(id);
                    continue;
                }
                let failures = requests.failures_in_a_row(id);
                if failures < u64::from(spec.consecutive_failures) {
                    record.held_back = false;
                    continue;
                }
                if !room_to_eject(spec, &groups, i, &backends, &records) {
                    let record = records.entry((id, address)).or_default();
                    if !record.held_back {
                        warn!(
                            service, id, %address, failures,
                            "backend not ejected: max_ejected_percent of its pool is out \
                             already, or it is the last one serving"
                        );
                        record.held_back = true;
                    }
                    continue;
                }
                let record = records.entry((id, address)).or_default();
                record.ejections += 1;
                let time = spec.time(record.ejections);
                match table.set_ejected(id, address, true).await {
                    Ok(()) => {}
                    Err(TableError::Stopped) => return,
                    Err(error) => {
                        record.ejections -= 1;
                        warn!(service, id, %address, %error, "backend not ejected");
                        continue;
                    }
                }
                requests.forget_failures(id);
                record.out_until = Some(now + time);
                record.held_back = false;
                warn!(
                    service, id, %address, failures, ejections = record.ejections, ?time,
                    "backend ejected: it failed requests in a row"
                );
                // The same server in other services (an l4 service XDP steers, say) goes out
                // with it, unless it is the last one serving there.
                for (other, others_serving) in same_server(&snapshot.backends, id, address) {
                    if others_serving && take_out(&table, other, address, true).await.is_err() {
                        return;
                    }
                }
            }
        }
        // A backend that left (or whose id went to another) is forgotten.
        records.retain(|&(id, address), _| {
            snapshot
                .backends
                .iter()
                .any(|b| b.id == id && b.address == address)
        });
    }
}

/// The other services' backends at `address` (the same server as `id`), each with whether its
/// service has another healthy backend.
fn same_server(backends: &[BackendInfo], id: u32, address: SocketAddrV4) -> Vec<(u32, bool)> {
    backends
        .iter()
        .filter(|b| b.address == address && b.id != id)
        .map(|b| {
            let others = backends.iter().any(|o| {
                o.service == b.service && o.id != b.id && o.status == BackendStatus::Healthy
            });
            (b.id, others)
        })
        .collect()
}

/// Set a companion entry's ejection; an error other than a stopped table is logged and
/// dropped (it only widens what is out).
async fn take_out(
    table: &TableHandle,
    id: u32,
    address: SocketAddrV4,
    ejected: bool,
) -> Result<(), TableError> {
    match table.set_ejected(id, address, ejected).await {
        Err(TableError::Stopped) => Err(TableError::Stopped),
        Err(error) => {
            warn!(id, %address, %error, ejected, "the same server in another service");
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

/// Whether `backends[candidate]` may go out: in every pool it is in, the ones out would stay
/// within `max_ejected_percent` of those serving or out, and one would still serve.
fn room_to_eject(
    spec: &EjectionSpec,
    groups: &[Vec<usize>],
    candidate: usize,
    backends: &[&BackendInfo],
    records: &HashMap<(u32, SocketAddrV4), Record>,
) -> bool {
    let out = |i: usize| {
        records
            .get(&(backends[i].id, backends[i].address))
            .is_some_and(|r| r.out_until.is_some())
    };
    // Serving: healthy, or ejected in the snapshot but back since.
    let serving = |i: usize| {
        matches!(
            backends[i].status,
            BackendStatus::Healthy | BackendStatus::Ejected
        ) && !out(i)
    };
    groups
        .iter()
        .filter(|members| members.contains(&candidate))
        .all(|members| {
            let serving_now = members.iter().filter(|&&i| serving(i)).count();
            let out_now = members.iter().filter(|&&i| out(i)).count();
            out_now < spec.allowed(serving_now + out_now) && serving_now > 1
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeDataplane, chat_service};
    use crate::spec::BackendSpec;
    use lb_common::backend_state::{ACTIVE, DOWN};

    fn backend(port: u16) -> BackendSpec {
        BackendSpec {
            address: SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port),
            weight: crate::spec::Weight::ONE,
            max_connections: 0,
            models: Vec::new(),
        }
    }

    fn judged(spec: EjectionSpec, pools: Vec<PoolSpec>) -> Judged {
        Judged {
            service: "chat".to_owned(),
            spec,
            pools,
        }
    }

    /// `n` requests to `id` answered `status`.
    fn answered(table: &TableHandle, id: u32, status: u16, n: usize) {
        let requests = table.requests();
        for _ in 0..n {
            requests.begin(id).answered_status(status);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn five_failures_in_a_row_eject_a_backend_for_a_time_that_doubles() {
        let dataplane = FakeDataplane::default();
        let service = chat_service(vec![backend(8081), backend(8082)], None);
        let (table, _task) = crate::table::start(dataplane.clone(), &[service]).expect("start");
        let spec = EjectionSpec {
            consecutive_failures: 5,
            base_time: Duration::from_secs(10),
            max_time: Duration::from_secs(100),
            max_percent: 50,
        };
        let judge = tokio::spawn(run(table.clone(), vec![judged(spec, Vec::new())]));
        let status = |id: usize| table.snapshot().expect("snapshot").backends[id].status;
        let state = |id: u32| dataplane.maps().backends[&id].state;
        let settle = || tokio::time::sleep(Duration::from_millis(10));

        // Four 500s, a 200, four more: no five in a row.
        answered(&table, 0, 500, 4);
        answered(&table, 0, 200, 1);
        answered(&table, 0, 500, 4);
        settle().await;
        assert_eq!(status(0), BackendStatus::Healthy);
        // The fifth in a row.
        answered(&table, 0, 502, 1);
        settle().await;
        assert_eq!(
            (status(0), state(0)),
            (BackendStatus::Ejected, DOWN),
            "the kernel too"
        );
        assert_eq!(dataplane.maps().rings[&0], [1], "out of the ring");
        // The other may not go too: at 50% of two, one is out.
        answered(&table, 1, 500, 5);
        settle().await;
        assert_eq!(status(1), BackendStatus::Healthy, "max_ejected_percent");
        answered(&table, 1, 200, 1);

        tokio::time::sleep(Duration::from_secs(10)).await;
        settle().await;
        assert_eq!(
            (status(0), state(0)),
            (BackendStatus::Healthy, ACTIVE),
            "back after 10 s"
        );
        // Failing again at once: out for twice as long.
        answered(&table, 0, 500, 5);
        settle().await;
        assert_eq!(status(0), BackendStatus::Ejected);
        tokio::time::sleep(Duration::from_secs(15)).await;
        assert_eq!(status(0), BackendStatus::Ejected, "20 s this time");
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(status(0), BackendStatus::Healthy);
        judge.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_services_only_backend_and_loading_answers_are_never_ejected() {
        let dataplane = FakeDataplane::default();
        let service = chat_service(vec![backend(8081)], None);
        let (table, _task) = crate::table::start(dataplane.clone(), &[service]).expect("start");
        let judge = tokio::spawn(run(
            table.clone(),
            vec![judged(EjectionSpec::default(), Vec::new())],
        ));
        answered(&table, 0, 500, 10);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let status = || table.snapshot().expect("snapshot").backends[0].status;
        assert_eq!(status(), BackendStatus::Healthy, "the only one stays");
        assert_eq!(table.requests().failures_in_a_row(0), 10);
        let requests = table.requests();
        answered(&table, 0, 501, 1);
        assert_eq!(
            requests.failures_in_a_row(0),
            0,
            "a 501 (a feature not started) ends it"
        );
        answered(&table, 0, 500, 3);
        answered(&table, 0, 200, 1);
        for _ in 0..10 {
            requests.begin(0).loading();
        }
        assert_eq!(
            requests.failures_in_a_row(0),
            0,
            "a loading 503 is no failure"
        );
        judge.abort();
    }

    #[test]
    fn the_share_out_is_rounded_down_but_at_least_one_of_two() {
        let spec = EjectionSpec::default();
        assert_eq!([1, 2, 3, 4, 10].map(|n| spec.allowed(n)), [0, 1, 1, 2, 5]);
        let times: Vec<u64> = (1..=6).map(|n| spec.time(n).as_secs()).collect();
        assert_eq!(times, [30, 60, 120, 240, 300, 300]);
        assert_eq!(spec.time(40), spec.max_time, "no overflow");
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_healthy_backend_is_never_ejected() {
        let dataplane = FakeDataplane::default();
        let service = chat_service(vec![backend(8081), backend(8082)], None);
        let (table, _task) = crate::table::start(dataplane.clone(), &[service]).expect("start");
        let address = table.snapshot().expect("snapshot").backends[1].address;
        table
            .set_checks(1, address, crate::table::Checks::Failing)
            .await
            .expect("checks");
        let judge = tokio::spawn(run(
            table.clone(),
            vec![judged(EjectionSpec::default(), Vec::new())],
        ));
        answered(&table, 0, 500, 5);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let status = |id: usize| table.snapshot().expect("snapshot").backends[id].status;
        assert_eq!(
            (status(0), status(1)),
            (BackendStatus::Healthy, BackendStatus::Unhealthy),
            "the other is out already: this one stays"
        );
        judge.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_pools_only_backend_stays_though_the_service_has_others() {
        let dataplane = FakeDataplane::default();
        let serving = |port, model: &str| BackendSpec {
            models: vec![model.to_owned()],
            ..backend(port)
        };
        let service = chat_service(
            vec![serving(8081, "a"), serving(8082, "a"), serving(8083, "b")],
            None,
        );
        let (table, _task) = crate::table::start(dataplane.clone(), &[service]).expect("start");
        let pool = |model: &str| PoolSpec {
            model: model.to_owned(),
            aliases: Vec::new(),
            policy: crate::spec::Policy::RoundRobin,
            max_per_backend: 0,
            queue_size: 8,
            queue_timeout: Duration::from_secs(1),
            upstream: crate::spec::UpstreamTimeouts::default(),
        };
        let judge = tokio::spawn(run(
            table.clone(),
            vec![judged(EjectionSpec::default(), vec![pool("a"), pool("b")])],
        ));
        answered(&table, 2, 500, 5);
        answered(&table, 0, 500, 5);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let status = |id: usize| table.snapshot().expect("snapshot").backends[id].status;
        assert_eq!(status(2), BackendStatus::Healthy, "the only one of pool b");
        assert_eq!(status(0), BackendStatus::Ejected, "one of pool a's two");
        judge.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_server_in_another_service_goes_out_and_back_with_it() {
        let dataplane = FakeDataplane::default();
        let chat = chat_service(vec![backend(8081), backend(8082)], None);
        let web = crate::spec::ServiceSpec {
            name: "web".to_owned(),
            address: "10.0.0.101:80".parse().expect("vip"),
            ..chat_service(vec![backend(8081), backend(8082)], None)
        };
        let (table, _task) = crate::table::start(dataplane.clone(), &[chat, web]).expect("start");
        let entry = |service: &str, port: u16| {
            let snapshot = table.snapshot().expect("snapshot");
            let b = snapshot
                .backends
                .iter()
                .find(|b| b.service == service && b.address.port() == port)
                .cloned()
                .expect("listed");
            (b.id, b.status)
        };
        let spec = EjectionSpec {
            base_time: Duration::from_secs(10),
            ..EjectionSpec::default()
        };
        let judge = tokio::spawn(run(table.clone(), vec![judged(spec, Vec::new())]));
        let (chat_id, _) = entry("chat", 8081);
        answered(&table, chat_id, 500, 5);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let (web_id, web_status) = entry("web", 8081);
        assert_eq!(entry("chat", 8081).1, BackendStatus::Ejected);
        assert_eq!(
            web_status,
            BackendStatus::Ejected,
            "the same server, XDP's service"
        );
        assert_eq!(
            dataplane.maps().backends[&web_id].state,
            DOWN,
            "the kernel sees it"
        );
        assert_eq!(entry("web", 8082).1, BackendStatus::Healthy);
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(entry("chat", 8081).1, BackendStatus::Healthy);
        assert_eq!(entry("web", 8081).1, BackendStatus::Healthy, "back with it");
        assert_eq!(dataplane.maps().backends[&web_id].state, ACTIVE);
        judge.abort();
    }
}
