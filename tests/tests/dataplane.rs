//! End-to-end tests: a client namespace talks to the VIP through the agent's XDP program in the
//! LB namespace (forwarding off there) to real HTTP servers in backend namespaces.
//!
//! Each test builds its own topology (see `tests::topology`), runs `steer` as a child with a
//! generated config, and tears everything down on drop, also when it fails. They need root and
//! panic with a message saying so otherwise.

use std::{
    collections::{HashMap, HashSet},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use nix::sys::signal::Signal;
use tests::{
    metrics, netns,
    topology::{CLIENT_ADDR, HttpConn, LB_CLIENT_SIDE, Topology, VIP, pattern},
};
use tokio::task::JoinSet;

fn backend_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_steer-test-backend"))
}

fn topology(tag: &str, policy: &str, backends: usize) -> Topology {
    netns::require_root("the integration tests");
    Topology::new(tag, policy, backends, backend_bin())
}

/// Opens a new connection to the VIP from the client and asks `/whoami` on it.
async fn whoami_new(conn_to: SocketAddrV4) -> (HttpConn, String) {
    let mut conn = HttpConn::connect(SocketAddr::V4(conn_to))
        .await
        .unwrap_or_else(|e| panic!("connect to VIP {conn_to}: {e}"));
    let answer = conn.get("/whoami").await.text();
    (conn, answer)
}

/// The topology itself, without the agent: the client reaches the LB's address on its link, the
/// LB namespace reaches every backend's HTTP server, and forwarding is off on the LB.
#[test]
fn topology_hosts_reach_their_neighbours() {
    let topo = topology("topo", "round_robin", 2);
    // A listener made inside the LB namespace stays there, whatever thread accepts on it.
    let listener = topo
        .lb
        .run(|| TcpListener::bind((LB_CLIENT_SIDE, 7000)).expect("bind in the LB namespace"));
    let peer = std::thread::scope(|s| {
        let accepted = s.spawn(|| listener.accept().expect("accept").1);
        topo.client.run(|| {
            TcpStream::connect_timeout(&(LB_CLIENT_SIDE, 7000).into(), Duration::from_secs(5))
                .expect("client connects to the LB's address")
        });
        accepted.join().expect("accept thread")
    });
    assert_eq!(peer.ip(), std::net::IpAddr::V4(CLIENT_ADDR));
    let forward = topo.lb.exec_ok(&["cat", "/proc/sys/net/ipv4/ip_forward"]);
    assert_eq!(forward.trim(), "0", "forwarding must be off on the LB");
    // Topology::new already checked every backend's /whoami from the LB namespace.
    assert_eq!(topo.backends.len(), 2);
}

#[test]
fn round_robin_alternates_exactly_over_200_connections() {
    let mut topo = topology("rr", "round_robin", 2);
    topo.start_agent();
    let answers = topo.client.block_on(|| async {
        let mut answers = Vec::with_capacity(200);
        for _ in 0..200 {
            let (conn, answer) = whoami_new(VIP).await;
            drop(conn);
            answers.push(answer);
        }
        answers
    });
    let names: Vec<String> = answers.iter().map(|a| topo.check_whoami(a).0).collect();
    for (i, pair) in names.windows(2).enumerate() {
        assert_ne!(
            pair[0],
            pair[1],
            "connections {i} and {} both went to {}: {names:?}",
            i + 1,
            pair[0]
        );
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for n in &names {
        *counts.entry(n.as_str()).or_default() += 1;
    }
    assert_eq!(counts.get("b1"), Some(&100), "{counts:?}");
    assert_eq!(counts.get("b2"), Some(&100), "{counts:?}");
    for b in &topo.backends {
        let view = topo.backend_view(b.addr).expect("backend listed");
        assert_eq!(view["new_flows"].as_u64(), Some(100), "{view}");
    }
}

/// `/metrics` parses as Prometheus text and counts what the client sent: each connection is one
/// new flow of the service and of the backend that answered it, and the backends' packets and
/// bytes add up to the service's, both directions.
#[test]
fn metrics_count_the_connections_sent_through_the_vip() {
    const CONNECTIONS: u64 = 20;
    let mut topo = topology("metrics", "round_robin", 2);
    topo.start_agent();
    let web = [("service", "web")];
    let scrape = topo.metrics();
    assert_eq!(
        metrics::value(&scrape, "steer_service_new_flows_total", &web),
        0.0
    );
    let answers = topo.client.block_on(|| async {
        let mut answers = Vec::new();
        for _ in 0..CONNECTIONS {
            let (conn, answer) = whoami_new(VIP).await;
            drop(conn);
            answers.push(answer);
        }
        answers
    });
    let mut sent: HashMap<String, u64> = HashMap::new();
    for answer in &answers {
        *sent.entry(topo.check_whoami(answer).0).or_default() += 1;
    }
    // Every flow closed: no packet of them is still on its way while the counters are read.
    for b in &topo.backends {
        topo.wait_active_connections(b.addr, 0, Duration::from_secs(5));
    }

    let scrape = topo.metrics();
    let value = |name: &str, labels: &[(&str, &str)]| metrics::value(&scrape, name, labels);
    let count = |value: u64| value as f64;
    assert_eq!(
        value("steer_service_new_flows_total", &web),
        count(CONNECTIONS)
    );
    assert_eq!(
        value("steer_service_closed_flows_total", &web),
        count(CONNECTIONS)
    );
    assert_eq!(value("steer_service_no_backend_total", &web), 0.0);
    let (mut packets, mut bytes) = (0.0, 0.0);
    for b in &topo.backends {
        let address = b.addr.to_string();
        let labels = [("service", "web"), ("backend", address.as_str())];
        let want = sent.get(&b.name).copied().unwrap_or(0);
        assert_eq!(want, CONNECTIONS / 2, "round robin: {sent:?}");
        assert_eq!(
            value("steer_backend_connections_total", &labels),
            count(want),
            "{}",
            b.name
        );
        assert_eq!(value("steer_backend_up", &labels), 1.0);
        assert_eq!(value("steer_backend_active_connections", &labels), 0.0);
        let mut state = labels.to_vec();
        state.push(("state", "active"));
        assert_eq!(value("steer_backend_state", &state), 1.0);
        packets += value("steer_backend_packets_total", &labels);
        bytes += value("steer_backend_bytes_total", &labels);
    }
    let both = |name: &str| {
        value(name, &[("service", "web"), ("direction", "forward")])
            + value(name, &[("service", "web"), ("direction", "reply")])
    };
    // At least SYN, request and FIN forward and SYN-ACK, response and FIN back, per connection.
    assert!(packets >= count(6 * CONNECTIONS), "{packets} packets");
    assert_eq!(packets, both("steer_service_packets_total"));
    assert_eq!(bytes, both("steer_service_bytes_total"));
}

/// With forwarding off, nothing but the agent makes the LB resolve a backend's MAC: without that,
/// every SYN to the VIP would be passed to a stack that drops it.
#[test]
fn agent_resolves_backend_neighbours_itself() {
    let mut topo = topology("neigh", "round_robin", 2);
    topo.forget_backend_neighbours();
    topo.start_agent();
    let names = topo.client.block_on(|| async {
        let mut names = Vec::new();
        for _ in 0..4 {
            let connect = whoami_new(VIP);
            let (_, answer) = tokio::time::timeout(std::time::Duration::from_secs(5), connect)
                .await
                .expect("connection through the VIP within 5 s");
            names.push(answer);
        }
        names
    });
    let names: Vec<String> = names.iter().map(|a| topo.check_whoami(a).0).collect();
    assert_eq!(names, ["b1", "b2", "b1", "b2"]);
}

/// Maglev: each of 50 clients keeps its backend over 10 new connections, and removing a backend
/// moves only the clients it had.
#[test]
fn maglev_keeps_clients_on_their_backend_and_moves_only_the_removed_ones() {
    let mut topo = topology("maglev", "maglev", 3);
    let clients = topo.add_client_addresses(50);
    topo.start_agent();
    let placement = |topo: &Topology| -> Vec<String> {
        let clients = clients.clone();
        let answers = topo.client.block_on(|| async move {
            let mut answers = Vec::new();
            for from in clients {
                let mut seen = Vec::new();
                for _ in 0..10 {
                    let mut conn = HttpConn::connect_from(Some(from), SocketAddr::V4(VIP))
                        .await
                        .unwrap_or_else(|e| panic!("connect from {from}: {e}"));
                    seen.push(conn.get("/whoami").await.text());
                }
                answers.push((from, seen));
            }
            answers
        });
        answers
            .iter()
            .map(|(from, seen)| {
                let names: Vec<String> = seen.iter().map(|a| topo.check_whoami(a).0).collect();
                assert!(
                    names.iter().all(|n| *n == names[0]),
                    "client {from} moved between backends: {names:?}"
                );
                names[0].clone()
            })
            .collect()
    };
    let before = placement(&topo);
    for name in ["b1", "b2", "b3"] {
        assert!(
            before.iter().any(|n| n == name),
            "no client on {name}: {before:?}"
        );
    }
    let b3 = topo
        .backend_view(topo.backend("b3").addr)
        .expect("b3 listed")["id"]
        .as_u64()
        .expect("id");
    topo.admin("DELETE", &format!("/v1/backends/{b3}"), None);
    let after = placement(&topo);
    for (i, (was, is)) in before.iter().zip(&after).enumerate() {
        if was == "b3" {
            assert_ne!(is, "b3", "client {i} still on the removed backend");
        } else {
            assert_eq!(was, is, "client {i} moved from {was} although {was} stayed");
        }
    }
}

/// A backend on the LB host itself (added through the API at one of the host's addresses) mixes
/// with a remote one in one service: it sees the client's own address (destination NAT only),
/// and its replies reach the client from the VIP (TC egress undoes the NAT).
#[test]
fn local_backend_on_the_lb_host_mixes_with_a_remote_one() {
    let mut topo = topology("local", "round_robin", 1);
    let local = SocketAddrV4::new(LB_CLIENT_SIDE, 8081);
    let mut server = Command::new(backend_bin());
    server
        .args(["--name", "local", "--listen", "0.0.0.0:8081"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _server = topo.lb.spawn(server);
    topo.start_agent();
    let body = serde_json::json!({"service": "web", "address": local.to_string()});
    let added = topo.admin("POST", "/v1/backends", Some(&body));
    assert_eq!(added["kind"].as_str(), Some("local"), "{added}");
    // It takes connections once a check passed (the server may not listen at once).
    topo.wait_status(local, "healthy", Duration::from_secs(10));
    assert_eq!(
        topo.backend_view(topo.backend("b1").addr).expect("b1")["kind"].as_str(),
        Some("remote")
    );

    let answers = topo.client.block_on(|| async {
        let mut answers = Vec::new();
        for _ in 0..10 {
            let (mut conn, answer) = whoami_new(VIP).await;
            // A second request on the same connection: the reply path works both ways.
            let again = conn.get("/whoami").await.text();
            assert_eq!(answer, again, "one connection, one backend");
            answers.push(answer);
        }
        answers
    });
    let mut on_local = 0;
    for answer in &answers {
        if let Some(peer) = answer.trim().strip_prefix("local ") {
            let peer: SocketAddrV4 = peer.parse().expect("peer address");
            assert_eq!(
                *peer.ip(),
                CLIENT_ADDR,
                "the local backend sees the client itself"
            );
            on_local += 1;
        } else {
            assert_eq!(topo.check_whoami(answer).0, "b1");
        }
    }
    assert_eq!(
        on_local, 5,
        "round robin over one local and one remote: {answers:?}"
    );
    let view = topo.backend_view(local).expect("local listed");
    assert_eq!(view["new_flows"].as_u64(), Some(5), "{view}");
}

/// A backend failing its health checks (503, as llama.cpp while loading) gets no new connection
/// while an open one to it completes; it rejoins once it passes again.
#[test]
fn unhealthy_backend_gets_no_new_connections_and_rejoins_when_healthy() {
    let mut topo = topology("health", "round_robin", 2);
    topo.start_agent();
    let b2 = topo.backend("b2").addr;
    let set_health = |verdict: &'static str| {
        topo.lb.block_on(|| async move {
            let mut conn = HttpConn::connect(SocketAddr::V4(b2))
                .await
                .expect("connect b2");
            conn.request_ok("PUT", "/health", Some(verdict.as_bytes()))
                .await;
        });
    };
    let wait_healthy = |want: bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let view = topo.backend_view(b2).expect("b2 listed");
            if view["healthy"].as_bool() == Some(want) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "b2 not healthy={want}: {view}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    topo.client.block_on(|| async {
        // An open connection on b2.
        let mut held = None;
        for _ in 0..4 {
            let (conn, answer) = whoami_new(VIP).await;
            if topo.check_whoami(&answer).0 == "b2" {
                held = Some(conn);
                break;
            }
        }
        let mut held = held.expect("a connection on b2 within 4");

        set_health("fail");
        wait_healthy(false);
        for i in 0..10 {
            let (_, answer) = whoami_new(VIP).await;
            assert_eq!(topo.check_whoami(&answer).0, "b1", "new connection {i}");
        }
        let answer = held.get("/whoami").await.text();
        assert_eq!(
            topo.check_whoami(&answer).0,
            "b2",
            "the open connection completes"
        );

        set_health("ok");
        wait_healthy(true);
        let mut names = HashSet::new();
        for _ in 0..4 {
            names.insert(topo.check_whoami(&whoami_new(VIP).await.1).0);
        }
        assert_eq!(names.len(), 2, "b2 takes new connections again: {names:?}");
    });
}

#[test]
fn least_connections_follows_held_open_connections() {
    const HELD: usize = 8;
    let mut topo = topology("lc", "least_connections", 2);
    topo.start_agent();
    let (b1, b2) = (topo.backend("b1").addr, topo.backend("b2").addr);

    // Open 2 * HELD connections and hold them all: least connections keeps the two backends
    // within one of each other, so each ends up with HELD. Then close the ones on b2.
    let opened = topo.client.block_on(|| async {
        let mut opened = Vec::new();
        for _ in 0..2 * HELD {
            opened.push(whoami_new(VIP).await);
        }
        opened
    });
    let (mut on_b1, mut on_b2) = (0usize, 0usize);
    let mut held = Vec::new();
    for (conn, answer) in opened {
        match topo.check_whoami(&answer).0.as_str() {
            "b1" => {
                on_b1 += 1;
                held.push(conn);
            }
            _ => on_b2 += 1,
        }
        assert!(
            on_b1.abs_diff(on_b2) <= 1,
            "least connections let b1={on_b1} and b2={on_b2} drift apart"
        );
    }
    assert_eq!((on_b1, on_b2), (HELD, HELD));
    topo.wait_active_connections(b1, HELD as u64, Duration::from_secs(15));
    topo.wait_active_connections(b2, 0, Duration::from_secs(15));

    // b2 has HELD fewer connections: the next HELD new connections all go to it, and after that
    // the two stay within one of each other.
    let (next, more) = topo.client.block_on(|| async {
        let mut next = Vec::new();
        for _ in 0..HELD {
            next.push(whoami_new(VIP).await);
        }
        let mut more = Vec::new();
        for _ in 0..10 {
            more.push(whoami_new(VIP).await);
        }
        (next, more)
    });
    for (i, (_, answer)) in next.iter().enumerate() {
        let (name, _) = topo.check_whoami(answer);
        assert_eq!(name, "b2", "new connection {i} while b1 held {HELD} more");
    }
    let (mut on_b1, mut on_b2) = (HELD, HELD);
    for (_, answer) in &more {
        match topo.check_whoami(answer).0.as_str() {
            "b1" => on_b1 += 1,
            _ => on_b2 += 1,
        }
        assert!(
            on_b1.abs_diff(on_b2) <= 1,
            "least connections let b1={on_b1} and b2={on_b2} drift apart"
        );
    }
    topo.wait_active_connections(b1, on_b1 as u64, Duration::from_secs(5));
    topo.wait_active_connections(b2, on_b2 as u64, Duration::from_secs(5));
    held.clear();
}

#[test]
fn sixteen_mib_bodies_are_byte_identical_both_ways() {
    const LEN: usize = 16 << 20;
    let mut topo = topology("big", "round_robin", 2);
    topo.start_agent();
    let (download, upload, sent) = topo.client.block_on(|| async {
        let sent = pattern(LEN).into_iter().rev().collect::<Vec<u8>>();
        let mut conn = HttpConn::connect(SocketAddr::V4(VIP))
            .await
            .expect("connect to VIP");
        let download = conn.get(&format!("/bytes/{LEN}")).await.body;
        let upload = conn.request_ok("POST", "/echo", Some(&sent)).await.body;
        (download, upload, sent)
    });
    assert_eq!(download.len(), LEN, "GET /bytes/{LEN} length");
    assert!(
        download == pattern(LEN),
        "GET /bytes/{LEN} differs from the pattern"
    );
    assert_eq!(upload.len(), LEN, "POST /echo length");
    assert!(upload == sent, "POST /echo came back different");
}

/// A backend added through the API takes new connections at its weight, and the service's
/// counters add up to what the client did.
#[test]
fn backend_added_through_the_api_takes_its_weighted_share() {
    let mut topo = topology("add", "round_robin", 2);
    topo.start_agent();
    let b2 = topo.backend("b2").addr;
    let id = topo.backend_view(b2).expect("b2 listed")["id"]
        .as_u64()
        .expect("id");
    topo.admin("DELETE", &format!("/v1/backends/{id}"), None);
    let body = serde_json::json!({"service": "web", "address": b2.to_string(), "weight": 2});
    let added = topo.admin("POST", "/v1/backends", Some(&body));
    assert_eq!(added["weight"].as_u64(), Some(2), "{added}");
    assert_eq!(added["state"].as_str(), Some("active"), "{added}");
    assert_eq!(added["active_connections"].as_u64(), Some(0), "{added}");
    topo.wait_status(b2, "healthy", Duration::from_secs(10));

    // 30 consecutive connections walk the 3-entry weighted ring exactly ten times.
    let names: Vec<String> = topo.client.block_on(|| async {
        let mut answers = Vec::new();
        for _ in 0..30 {
            answers.push(whoami_new(VIP).await.1);
        }
        answers
    });
    let names: Vec<String> = names.iter().map(|a| topo.check_whoami(a).0).collect();
    let on_b2 = names.iter().filter(|n| *n == "b2").count();
    assert_eq!((30 - on_b2, on_b2), (10, 20), "{names:?}");

    let services = topo.admin("GET", "/v1/services", None);
    let web = &services["services"][0];
    assert_eq!(web["name"].as_str(), Some("web"), "{services}");
    assert_eq!(web["new_flows"].as_u64(), Some(30), "{web}");
    assert_eq!(web["no_backend"].as_u64(), Some(0), "{web}");
    let added = topo.backend_view(b2).expect("b2 listed again");
    assert_eq!(added["new_flows"].as_u64(), Some(20), "{added}");
}

#[test]
fn removed_and_drained_backends_get_no_new_connections_but_finish_open_ones() {
    let mut topo = topology("drain", "round_robin", 3);
    topo.start_agent();
    let topo = &topo;
    let id_of = |name: &str| {
        topo.backend_view(topo.backend(name).addr)
            .unwrap_or_else(|| panic!("{name} not listed"))["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("{name} has no id"))
    };
    // One runtime for the whole test: the connections opened first are used again at the end.
    topo.client.block_on(|| async {
        // One open connection on each backend.
        let mut open: HashMap<String, HttpConn> = HashMap::new();
        for _ in 0..30 {
            if open.len() == 3 {
                break;
            }
            let (conn, answer) = whoami_new(VIP).await;
            open.entry(topo.check_whoami(&answer).0).or_insert(conn);
        }
        assert_eq!(
            open.len(),
            3,
            "no open connection on every backend: {:?}",
            open.keys()
        );

        // The admin calls run on their own thread in the LB namespace; blocking here is fine.
        let (removed, drained) = (id_of("b1"), id_of("b2"));
        topo.admin("DELETE", &format!("/v1/backends/{removed}"), None);
        topo.admin("POST", &format!("/v1/backends/{drained}/drain"), None);
        assert!(
            topo.backend_view(topo.backend("b1").addr).is_none(),
            "b1 still listed after DELETE"
        );
        let b2 = topo
            .backend_view(topo.backend("b2").addr)
            .expect("b2 listed");
        assert_eq!(b2["state"].as_str(), Some("draining"), "{b2}");

        for i in 0..30 {
            let (conn, answer) = whoami_new(VIP).await;
            drop(conn);
            assert_eq!(
                topo.check_whoami(&answer).0,
                "b3",
                "new connection {i} after removing b1 and draining b2"
            );
        }

        // The connections opened before still complete requests on their old backends.
        for name in ["b1", "b2", "b3"] {
            let conn = open.get_mut(name).expect("open connection");
            let answer = conn.get("/whoami").await.text();
            assert_eq!(topo.check_whoami(&answer).0, name, "open connection moved");
            let body = conn
                .request_ok("POST", "/echo", Some(b"still here"))
                .await
                .body;
            assert_eq!(body, b"still here", "echo on the open connection to {name}");
        }
    });
}

#[test]
fn thousand_concurrent_connections_never_share_a_source_tuple() {
    const CONNS: usize = 1000;
    let mut topo = topology("many", "round_robin", 2);
    topo.start_agent();
    let answers = topo.client.block_on(|| async {
        // Open all of them first (100 at a time), then ask /whoami on all at once.
        let mut conns = Vec::with_capacity(CONNS);
        for _ in 0..CONNS / 100 {
            let mut set = JoinSet::new();
            for _ in 0..100 {
                set.spawn(HttpConn::connect(SocketAddr::V4(VIP)));
            }
            while let Some(res) = set.join_next().await {
                conns.push(res.expect("connect task").expect("connect to VIP"));
            }
        }
        let mut set = JoinSet::new();
        for mut conn in conns {
            set.spawn(async move {
                let answer = conn.get("/whoami").await.text();
                (conn, answer)
            });
        }
        let mut held = Vec::with_capacity(CONNS);
        while let Some(res) = set.join_next().await {
            held.push(res.expect("request task"));
        }
        // Every connection is still open here; the answers were all given while they were.
        held.into_iter().map(|(_, a)| a).collect::<Vec<_>>()
    });
    assert_eq!(answers.len(), CONNS);
    let mut seen: HashSet<(String, SocketAddrV4)> = HashSet::new();
    for answer in &answers {
        let (name, peer) = topo.check_whoami(answer);
        assert!(
            seen.insert((name.clone(), peer)),
            "two connections reached {name} from the same {peer}"
        );
    }
}

/// A restarted agent's maps know nothing of the source ports its previous run used, which the
/// backends may still hold in TIME_WAIT: each run starts its port search at a random port, not at
/// the range's first, so the first flow of two runs gets different ports (the same random start,
/// a false failure, is 1 chance in 16,384).
#[test]
fn a_restarted_agent_does_not_start_on_its_previous_runs_ports() {
    let mut topo = topology("restart", "round_robin", 1);
    let mut ports = Vec::new();
    for _ in 0..2 {
        topo.start_agent();
        let answer = topo.client.block_on(|| async { whoami_new(VIP).await.1 });
        ports.push(topo.check_whoami(&answer).1.port());
        let status = topo.stop_agent(Signal::SIGTERM);
        assert!(status.success(), "agent exited with {status}");
    }
    assert_ne!(
        ports[0], ports[1],
        "both runs started on the same source port"
    );
}

/// SIGTERM with XDP: the program stays attached while the flows it carries go on (up to
/// `agent.shutdown_timeout`), a new connection meanwhile is refused (no backend takes a new flow
/// and the proxy no longer listens), and the agent exits once the last flow has closed. (Was:
/// XDP was detached right after the proxies' drain, cutting the flows it carried.)
#[test]
fn sigterm_lets_xdp_flows_finish_and_refuses_new_ones() {
    let mut topo = topology("drainx", "round_robin", 1);
    topo.start_agent();
    let pid = topo.agent_pid().expect("the agent runs");
    let runs = move || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
            .unwrap_or(false)
    };
    let log = topo.agent_log_path();
    let (first, again, refused, ran_while_held) = topo.client.block_on(|| async {
        let (mut held, first) = whoami_new(VIP).await;
        let agent = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("a pid"));
        nix::sys::signal::kill(agent, Signal::SIGTERM).expect("SIGTERM");
        // Bounded: 10 s.
        for _ in 0..200 {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("waiting for the open flows to end") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let again = held.get("/whoami").await.text();
        let refused = HttpConn::connect(SocketAddr::V4(VIP)).await.is_err();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let ran_while_held = runs();
        drop(held);
        (first, again, refused, ran_while_held)
    });
    let log = topo.agent_log();
    assert!(
        log.contains("waiting for the open flows to end open=1"),
        "{log}"
    );
    assert_eq!(
        topo.check_whoami(&first),
        topo.check_whoami(&again),
        "one flow, one backend"
    );
    assert!(
        refused,
        "a new connection during the drain was taken:\n{log}"
    );
    assert!(
        ran_while_held,
        "the agent did not wait for the open flow:\n{log}"
    );
    let status = topo.wait_agent(Duration::from_secs(10));
    let log = topo.agent_log();
    assert!(status.is_some_and(|s| s.success()), "{status:?}:\n{log}");
    assert!(log.contains("open flows ended"), "{log}");
}

/// A reload changes one service and leaves the other's XDP flows alone: a flow held through XDP
/// to `web` answers on the same connection, from the same backend and SNAT port, after SIGHUP
/// changed service `other` (its policy and backends), which then steers by its new policy.
#[test]
fn a_reload_leaves_an_unchanged_services_xdp_flows_alone() {
    let mut topo = topology("reloadx", "round_robin", 2);
    let (b1, b2) = (topo.backend("b1").addr, topo.backend("b2").addr);
    let other = SocketAddrV4::new(*VIP.ip(), 8081);
    let service = |policy: &str, backends: &[SocketAddrV4]| {
        let mut text = format!(
            "[[service]]\nname = \"other\"\naddress = \"{other}\"\npolicy = \"{policy}\"\n"
        );
        for b in backends {
            text += &format!("[[service.backend]]\naddress = \"{b}\"\n");
        }
        text
    };
    topo.add_service(&service("round_robin", &[b1]));
    topo.start_agent();
    topo.wait_status(b1, "healthy", Duration::from_secs(10));
    topo.wait_status(b2, "healthy", Duration::from_secs(10));
    let config = topo.config();
    let changed = config.replace(
        &service("round_robin", &[b1]),
        &service("least_connections", &[b1, b2]),
    );
    assert_ne!(config, changed);
    let path = topo.agent_log_path().with_file_name("steer.toml");
    let log = topo.agent_log_path();
    let pid = topo.agent_pid().expect("the agent runs");
    let (first, again, reloaded) = topo.client.block_on(|| async {
        let (mut held, first) = whoami_new(VIP).await;
        std::fs::write(&path, &changed).expect("rewrite the config");
        let agent = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("a pid"));
        nix::sys::signal::kill(agent, Signal::SIGHUP).expect("SIGHUP");
        let mut reloaded = false;
        // Bounded: 10 s.
        for _ in 0..200 {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("reloaded report") {
                reloaded = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let again = held.get("/whoami").await.text();
        (first, again, reloaded)
    });
    assert!(reloaded, "no reload logged:\n{}", topo.agent_log());
    assert_eq!(
        topo.check_whoami(&first),
        topo.check_whoami(&again),
        "the held flow: one backend, one SNAT port"
    );
    let services = topo.admin("GET", "/v1/services", None);
    let listed = services["services"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == "other"))
        .cloned()
        .unwrap_or_else(|| panic!("no service other: {services}"));
    assert_eq!(listed["policy"], "least_connections", "{listed}");
    assert_eq!(listed["backends"], 2, "{listed}");
    let log = topo.agent_log();
    assert!(log.contains("service reconfigured service=other"), "{log}");
    assert!(!log.contains("service reconfigured service=web"), "{log}");
}

#[test]
fn agent_exit_detaches_xdp_from_every_interface_and_restores_lo_forwarding() {
    for (tag, signal) in [("exit-t", Signal::SIGTERM), ("exit-i", Signal::SIGINT)] {
        agent_exit_detaches_xdp(tag, signal);
    }
}

fn agent_exit_detaches_xdp(tag: &str, signal: Signal) {
    let mut topo = topology(tag, "round_robin", 2);
    let mut ifaces = vec![topo.lb_client_if.clone()];
    ifaces.extend(topo.backends.iter().map(|b| b.lb_if.clone()));
    let xdp_attached = |topo: &Topology, ifname: &str| {
        let link = topo.lb.ip(&["-d", "link", "show", "dev", ifname]);
        link.contains("prog/xdp")
    };
    let bpftool_xdp = |topo: &Topology| {
        let out = topo.lb.exec_ok(&["bpftool", "-j", "net", "show"]);
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("bpftool -j net show: {e}: {out}"));
        v.as_array()
            .into_iter()
            .flatten()
            .flat_map(|entry| entry["xdp"].as_array().cloned().unwrap_or_default())
            .collect::<Vec<_>>()
    };

    let lo_forwarding = |topo: &Topology| {
        topo.lb
            .exec_ok(&["sysctl", "-n", "net.ipv4.conf.lo.forwarding"])
    };
    assert_eq!(
        lo_forwarding(&topo).trim(),
        "0",
        "a new namespace's default"
    );

    topo.start_agent();
    for ifname in &ifaces {
        assert!(
            xdp_attached(&topo, ifname),
            "no XDP program on {ifname} while running"
        );
    }
    assert_eq!(
        lo_forwarding(&topo).trim(),
        "1",
        "the program's route lookups need it"
    );
    let attached = bpftool_xdp(&topo);
    assert_eq!(
        attached.len(),
        ifaces.len(),
        "bpftool net while running: {attached:?}"
    );
    for entry in &attached {
        assert_eq!(
            entry["mode"].as_str(),
            Some("driver"),
            "not native XDP: {entry}"
        );
    }
    let status = topo.stop_agent(signal);
    assert!(
        status.success(),
        "agent exited with {status} after {signal}; log:\n{}",
        topo.agent_log()
    );
    for ifname in &ifaces {
        assert!(!xdp_attached(&topo, ifname), "XDP program left on {ifname}");
    }
    assert_eq!(
        bpftool_xdp(&topo),
        Vec::<serde_json::Value>::new(),
        "bpftool net after exit"
    );
    assert_eq!(lo_forwarding(&topo).trim(), "0", "forwarding on lo left on");

    // A killed agent cannot turn it off; the next one knows the `1` is an agent's, not the
    // operator's, and turns it off at its exit.
    topo.start_agent();
    topo.stop_agent(Signal::SIGKILL);
    assert_eq!(
        lo_forwarding(&topo).trim(),
        "1",
        "left on by the killed agent"
    );
    topo.start_agent();
    let status = topo.stop_agent(signal);
    assert!(status.success(), "log:\n{}", topo.agent_log());
    assert_eq!(
        lo_forwarding(&topo).trim(),
        "0",
        "forwarding on lo left on after an agent was killed; log:\n{}",
        topo.agent_log()
    );
}

/// Issue 13 point 4 through XDP: a backend whose `/health` answers llama.cpp's 503 "Loading
/// model" (`steer-loading-front` before b2's server) is `loading`, DOWN in the kernel, and gets no
/// new connection until it answers 200; then round robin gives it its half.
#[test]
fn a_loading_backend_gets_no_connection_through_xdp_until_it_serves() {
    let mut topo = topology("loadx", "round_robin", 2);
    let b2 = topo.backend("b2");
    let front = SocketAddrV4::new(*b2.addr.ip(), b2.addr.port() + 2);
    let ready_file = topo.dir.join("b2.ready");
    let _ = std::fs::remove_file(&ready_file);
    let mut loading = Command::new(env!("CARGO_BIN_EXE_steer-loading-front"));
    loading
        .args(["--listen", &format!("0.0.0.0:{}", front.port())])
        .args(["--upstream", &format!("127.0.0.1:{}", b2.addr.port())])
        .arg("--ready-file")
        .arg(&ready_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _loading = b2.ns.spawn(loading);
    let b1 = topo.backend("b1").addr;
    topo.set_service_backends(vec![b1, front]);
    topo.start_agent();
    topo.wait_status(front, "loading", Duration::from_secs(10));
    let names = |topo: &Topology| -> Vec<String> {
        let answers: Vec<String> = topo.client.block_on(|| async {
            let mut answers = Vec::new();
            for _ in 0..10 {
                answers.push(whoami_new(VIP).await.1);
            }
            answers
        });
        // The name only: through the front, b2 sees the front's address, not the LB's.
        answers
            .iter()
            .map(|a| a.split(' ').next().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(names(&topo), vec!["b1"; 10], "only b1 while b2 loads");
    let view = topo.backend_view(front).expect("listed");
    assert_eq!(
        (view["status"].as_str(), view["new_flows"].as_u64()),
        (Some("loading"), Some(0)),
        "{view}"
    );

    std::fs::write(&ready_file, b"").expect("the ready file");
    topo.wait_status(front, "healthy", Duration::from_secs(10));
    let served = names(&topo);
    let on_b2 = served.iter().filter(|n| *n == "b2").count();
    assert_eq!(on_b2, 5, "round robin, b2 serving: {served:?}");
}

/// Issue 14 point 3 through XDP: the http proxy's passive health takes a server out for every
/// service on it. An `http` service over the same two backends as the l4 service XDP steers
/// (`steer-test-backend` answers every chat 500: a backend that passes its health checks and
/// fails every request, which llama-server cannot be made to do) ejects one of them after its
/// fifth 500 in a row (at most half of two); the l4 service's entry for that server is `ejected`
/// too, DOWN in the kernel, and new connections through XDP all go to the other.
#[test]
fn a_backend_ejected_by_the_http_proxy_gets_no_connection_through_xdp() {
    let mut topo = topology("ejectx", "round_robin", 2);
    let (b1, b2) = (topo.backend("b1").addr, topo.backend("b2").addr);
    let chat = SocketAddrV4::new(*VIP.ip(), 8080);
    topo.add_service(&format!(
        "[[service]]\nname = \"chat\"\naddress = \"{chat}\"\nmode = \"http\"\n\
         policy = \"round_robin\"\n[service.ejection]\nbase_time = \"60s\"\nmax_time = \"60s\"\n\
         [[service.backend]]\naddress = \"{b1}\"\n[[service.backend]]\naddress = \"{b2}\"\n"
    ));
    topo.start_agent();
    topo.wait_status(b1, "healthy", Duration::from_secs(10));
    topo.wait_status(b2, "healthy", Duration::from_secs(10));
    let statuses: Vec<u16> = topo.client.block_on(|| async {
        let mut conn = HttpConn::connect(SocketAddr::V4(chat))
            .await
            .unwrap_or_else(|e| panic!("connect to {chat}: {e}"));
        let mut statuses = Vec::new();
        for _ in 0..10 {
            let answer = conn
                .try_request("POST", "/v1/chat/completions", Some(b"{\"messages\":[]}"))
                .await
                .expect("an answer");
            statuses.push(answer.status);
        }
        statuses
    });
    assert_eq!(statuses, [500; 10], "the stand-in fails every chat");
    let view = |service: &str, addr: SocketAddrV4| {
        topo.backends_view()
            .into_iter()
            .find(|b| b["service"] == service && b["address"] == addr.to_string())
            .unwrap_or_else(|| panic!("{service} {addr} listed"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let out = loop {
        let ejected: Vec<SocketAddrV4> = [b1, b2]
            .into_iter()
            .filter(|&b| view("chat", b)["status"] == "ejected")
            .collect();
        if !ejected.is_empty() {
            assert_eq!(ejected.len(), 1, "at most half of two");
            break ejected[0];
        }
        assert!(
            std::time::Instant::now() < deadline,
            "none ejected: {:?}",
            topo.backends_view()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let serving = if out == b1 { b2 } else { b1 };
    assert_eq!(
        view("web", out)["status"],
        "ejected",
        "the same server, XDP's service"
    );
    assert_eq!(view("web", serving)["status"], "healthy");
    let serving_name = if serving == b1 { "b1" } else { "b2" };
    let answers: Vec<String> = topo.client.block_on(|| async {
        let mut answers = Vec::new();
        for _ in 0..10 {
            answers.push(whoami_new(VIP).await.1);
        }
        answers
    });
    for answer in &answers {
        let (host, _) = topo.check_whoami(answer);
        assert_eq!(
            host, serving_name,
            "through XDP, only the one serving: {answers:?}"
        );
    }
}
