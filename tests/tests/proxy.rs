//! The userspace proxy beside XDP: a client on the LB host itself (its packets never cross XDP)
//! connects to the VIP, which the agent routes locally while it runs, and the proxy balances it
//! over the same backends. Needs root.

use std::net::SocketAddr;
use std::path::Path;

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
