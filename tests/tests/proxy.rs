//! The userspace proxy beside XDP: a client on the LB host itself (its packets never cross XDP)
//! connects to the VIP, which the agent routes locally while it runs, and the proxy balances it
//! over the same backends. Needs root.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use tests::netns;
use tests::topology::{HttpConn, Topology, VIP};

#[test]
fn a_client_on_the_lb_host_is_balanced_by_the_proxy() {
    netns::require_root("the integration tests");
    let backend_bin = Path::new(env!("CARGO_BIN_EXE_steer-test-backend"));
    let mut topo = Topology::new("prx", "round_robin", 2, backend_bin);
    topo.start_agent();
    let local = topo.lb.exec_ok(&["ip", "route", "show", "table", "local"]);
    assert!(
        local.contains(&format!("local {} dev lo", VIP.ip())),
        "{local}"
    );
    let names: Vec<String> = topo.lb.block_on(|| async {
        let mut names = Vec::new();
        for _ in 0..4 {
            let mut conn = HttpConn::connect(SocketAddr::V4(VIP))
                .await
                .unwrap_or_else(|e| panic!("connect to {VIP} from the LB host: {e}"));
            let answer = conn.get("/whoami").await.text();
            let (name, _) = answer
                .split_once(' ')
                .unwrap_or_else(|| panic!("bad /whoami answer {answer:?}"));
            names.push(name.to_owned());
        }
        names
    });
    assert_ne!(names[0], names[1], "round robin: {names:?}");
    assert_eq!(names[0..2], names[2..4], "round robin: {names:?}");
    let proxy = topo.admin("GET", "/v1/proxy", None);
    assert_eq!(proxy[0]["accepted"].as_u64(), Some(4), "{proxy}");
    let backends = topo.admin("GET", "/v1/backends", None);
    let steered: Vec<u64> = backends["backends"]
        .as_array()
        .map(|all| {
            all.iter()
                .filter_map(|b| b["steered_since_poll"].as_u64())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        steered,
        [2, 2],
        "the proxy counts in the kernel's array: {backends}"
    );

    assert!(topo.stop_agent(Signal::SIGTERM).success());
    let local = topo.lb.exec_ok(&["ip", "route", "show", "table", "local"]);
    assert!(
        !local.contains(&VIP.ip().to_string()),
        "route left: {local}"
    );
}

/// The backend's name in a `/whoami` answer.
fn name(answer: &str) -> String {
    let (name, _) = answer
        .split_once(' ')
        .unwrap_or_else(|| panic!("bad /whoami answer {answer:?}"));
    name.to_owned()
}

/// XDP on, one connection per backend: with both taken, the kernel passes the next SYNs to the
/// stack, the VIP's local route hands them to the proxy, and they wait in its queue until a
/// kernel flow ends; each is then served by the backend that flow freed.
#[test]
fn connections_beyond_capacity_queue_in_the_proxy_and_complete() {
    netns::require_root("the integration tests");
    let backend_bin = Path::new(env!("CARGO_BIN_EXE_steer-test-backend"));
    let mut topo = Topology::new("prq", "round_robin", 2, backend_bin);
    topo.set_service_backends(Vec::new());
    topo.start_agent();
    for backend in [topo.backend("b1").addr, topo.backend("b2").addr] {
        let body = serde_json::json!({"service": "web", "address": backend.to_string(), "weight": 1, "max_connections": 1});
        topo.admin("POST", "/v1/backends", Some(&body));
    }
    topo.client.block_on(|| async {
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut conn = HttpConn::connect(SocketAddr::V4(VIP))
                .await
                .unwrap_or_else(|e| panic!("connect to {VIP}: {e}"));
            let backend = name(&conn.get("/whoami").await.text());
            held.push((conn, backend));
        }
        assert_ne!(held[0].1, held[1].1, "one flow per backend");
        let mut waiting = Vec::new();
        for _ in 0..2 {
            let mut conn = HttpConn::connect(SocketAddr::V4(VIP))
                .await
                .unwrap_or_else(|e| panic!("connect to {VIP} beyond capacity: {e}"));
            waiting.push(tokio::spawn(async move {
                let answer = conn.get("/whoami").await.text();
                (conn, name(&answer))
            }));
            // Queued in this order.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(waiting.iter().all(|w| !w.is_finished()), "both wait");
        // Served connections stay open: only the ended kernel flows free room.
        let mut served = Vec::new();
        for waiter in waiting {
            let (conn, freed) = held.remove(0);
            drop(conn);
            let (conn, served_by) = tokio::time::timeout(Duration::from_secs(10), waiter)
                .await
                .expect("served once a flow ended")
                .expect("waiter task");
            assert_eq!(served_by, freed, "the backend the ended flow freed");
            served.push(conn);
        }
    });
    let proxy = topo.admin("GET", "/v1/proxy", None);
    assert_eq!(proxy[0]["queued"].as_u64(), Some(2), "{proxy}");
}
