//! Issue 11, finding 2: thousands of idle connections (half of them half-sent request heads) to
//! the admin API and to an http service address, under systemd's 1,024-descriptor limit, stop
//! neither the data plane, nor the health checks, nor a shutdown. Needs root.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tests::flood::Flood;
use tests::netns;
use tests::topology::{ADMIN_ADDR, HttpConn, Topology, VIP};

/// Connections in each flood: several times the agent's descriptors.
const FLOOD: usize = 3000;

/// How long the checks run while the floods are held.
const UNDER_FLOOD: Duration = Duration::from_secs(3);

#[test]
fn an_idle_flood_stops_neither_the_data_plane_nor_health_checks_nor_a_shutdown() {
    netns::require_root("the integration tests");
    let backend_bin = Path::new(env!("CARGO_BIN_EXE_steer-test-backend"));
    let mut topo = Topology::new("fld", "round_robin", 2, backend_bin);
    // Every cap and timeout at its default.
    topo.add_service_settings("mode = \"http\"");
    // systemd's soft limit, and a hard one not much higher: the defaults must fit in it.
    topo.set_agent_open_files(512, 1024);
    topo.start_agent();
    let pid = topo.agent_pid().expect("the agent runs");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("its limits");
    let open_files = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .map(|line| line.split_whitespace().skip(3).take(2).collect::<Vec<_>>());
    assert_eq!(
        open_files,
        Some(vec!["1024", "1024"]),
        "soft limit raised to the hard one: {limits}"
    );
    let other = topo.add_client_addresses(1)[0];

    let admin_flood = Flood::open(&topo.lb, SocketAddr::V4(ADMIN_ADDR), FLOOD);
    let service_flood = Flood::open(&topo.client, SocketAddr::V4(VIP), FLOOD);
    // A connect can time out when SYNs come faster than a debug build accepts: a few may.
    for (flood, target) in [(&admin_flood, "admin API"), (&service_flood, "service")] {
        assert!(
            flood.len() >= FLOOD * 9 / 10,
            "{} of {FLOOD} flood connections to the {target} opened",
            flood.len()
        );
    }

    let deadline = Instant::now() + UNDER_FLOOD;
    let mut rounds = 0;
    while Instant::now() < deadline {
        let answer = topo.client.block_on(|| async move {
            let mut conn = HttpConn::connect_from(Some(other), SocketAddr::V4(VIP)).await?;
            conn.try_request("GET", "/whoami", None).await
        });
        match answer {
            Ok(response) => assert_eq!(response.status, 200, "{}", response.text()),
            Err(error) => panic!(
                "a request through the service failed under the flood (round {rounds}): {error}"
            ),
        }
        let backends = topo
            .try_admin("GET", "/v1/backends", None)
            .unwrap_or_else(|e| panic!("the admin API under the flood (round {rounds}): {e}"));
        let healthy: Vec<_> = backends["backends"]
            .as_array()
            .map(|all| all.iter().map(|b| b["healthy"].as_bool()).collect())
            .unwrap_or_default();
        assert_eq!(
            healthy,
            [Some(true), Some(true)],
            "health checks keep passing: {backends}"
        );
        rounds += 1;
    }
    let proxy = topo.admin("GET", "/v1/proxy", None);
    let evicted = proxy[0]["evicted"].as_u64().unwrap_or_default();
    let open = proxy[0]["open_connections"].as_u64().unwrap_or(u64::MAX);
    assert!(evicted > 0 && open < 1024, "{proxy}");
    let metrics = topo.metrics();
    let admin_evicted =
        tests::metrics::value(&metrics, "steer_admin_connections_evicted_total", &[]);
    assert!(admin_evicted > 0.0, "the admin API counted its evictions");

    // With the floods, half-sent heads included, still open.
    let status = topo.stop_agent(Signal::SIGTERM);
    assert!(status.success(), "{status}");
    let log = topo.agent_log();
    assert!(
        log.contains("lowered to fit"),
        "the caps were fitted: {log}"
    );
    drop((admin_flood, service_flood));
}
