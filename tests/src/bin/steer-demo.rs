//! `cargo xtask demo`: brings up a client, the load balancer and two backends in network
//! namespaces, runs the agent on the LB, sends 20 connections from the client to the VIP, shows
//! which backend answered each and the agent's per-backend counters, then cleans up.

#![expect(
    clippy::print_stdout,
    reason = "the demo's output is for a person to read"
)]

use std::{net::SocketAddr, process::ExitCode};

use tests::{
    netns,
    topology::{HttpConn, Topology, VIP, sibling_binary},
};

const CONNECTIONS: usize = 20;

fn main() -> ExitCode {
    if !netns::is_root() {
        eprintln!(
            "steer-demo needs root (network namespaces, veth, XDP): run `cargo xtask demo` as root"
        );
        return ExitCode::FAILURE;
    }
    let backend_bin = sibling_binary("steer-test-backend");
    println!("bringing up namespaces: client, load balancer, backends b1 and b2 ...");
    let mut topo = Topology::new("demo", "round_robin", 2, &backend_bin);
    println!(
        "  client {} -> LB {} (net.ipv4.ip_forward=0) -> b1 {}, b2 {}",
        topo.client.name(),
        topo.lb.name(),
        topo.backend("b1").addr,
        topo.backend("b2").addr
    );
    println!("agent config:\n{}", topo.config());
    topo.start_agent();
    println!("agent ready (native XDP on the LB's veths); {CONNECTIONS} connections to {VIP}:");

    let answers = topo.client.block_on(|| async {
        let mut answers = Vec::new();
        for _ in 0..CONNECTIONS {
            let mut conn = HttpConn::connect(SocketAddr::V4(VIP))
                .await
                .unwrap_or_else(|e| panic!("connect to {VIP}: {e}"));
            let local = conn.local_addr();
            answers.push((local, conn.get("/whoami").await.text()));
        }
        answers
    });
    for (i, (local, answer)) in answers.iter().enumerate() {
        let (name, peer) = topo.check_whoami(answer);
        println!(
            "  #{:<2} client {local} -> {VIP} answered by {name}, which saw it from {peer}",
            i + 1
        );
    }

    println!("\nGET /v1/backends:");
    println!(
        "  {:<4} {:<18} {:<9} {:>7} {:>9} {:>9} {:>6}",
        "id", "address", "state", "active", "packets", "bytes", "flows"
    );
    for b in topo.backends_view() {
        println!(
            "  {:<4} {:<18} {:<9} {:>7} {:>9} {:>9} {:>6}",
            b["id"].to_string(),
            b["address"].as_str().unwrap_or("?"),
            b["state"].as_str().unwrap_or("?"),
            b["active_connections"].to_string(),
            b["packets"].to_string(),
            b["bytes"].to_string(),
            b["new_flows"].to_string()
        );
    }
    let status = topo.stop_agent(nix::sys::signal::Signal::SIGTERM);
    println!("\nagent stopped ({status}); removing namespaces");
    drop(topo);
    if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
