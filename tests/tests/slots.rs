//! Policy `slots` end to end: two real llama-servers in backend namespaces, `big` with 3 slots
//! and `small` with 1, behind the agent's XDP program. A burst of 4 chat requests sent at once
//! from the client namespace lands 3 on `big` and 1 on `small`, by free slots counting the
//! connections steered since the last poll (round robin would split it 2 and 2; the caps are set
//! high so only the policy decides), and the agent's slot polls count the slots again after.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tests::{
    llama::{llama_server_path, model_path},
    netns::{self, ChildGuard, NetNs},
    topology::{HttpConn, Topology, VIP},
};

const LLAMA_PORT: u16 = 8081;
/// Upper bound for any wait.
const WAIT: Duration = Duration::from_secs(60);

fn backend_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_steer-test-backend"))
}

/// A llama-server in `ns` with `slots` slots of 1024 tokens each; `--alias` makes every answer's
/// `model` field name it.
fn llama_server(ns: &NetNs, dir: &Path, alias: &str, slots: u32) -> ChildGuard {
    let log = std::fs::File::create(dir.join(format!("{alias}.log"))).expect("create log");
    let mut cmd = Command::new(llama_server_path());
    cmd.arg("-m").arg(model_path());
    // One thread each: the two share the test host's cores.
    cmd.args([
        "-np",
        &slots.to_string(),
        "-c",
        &(1024 * slots).to_string(),
        "-t",
        "1",
    ])
    .args(["--host", "0.0.0.0", "--port", &LLAMA_PORT.to_string()])
    .args(["--alias", alias])
    .stdin(Stdio::null())
    .stdout(log.try_clone().expect("dup log"))
    .stderr(log);
    ns.spawn(cmd)
}

/// Polls `check` every 100 ms until it holds, for at most `WAIT`.
fn wait_until(what: &str, topo: &Topology, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {WAIT:?}; agent log:\n{}",
            topo.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One chat completion on a new connection to the VIP; the alias of the server that answered.
/// Short: the choice is made at the SYN, and the 4 SYNs of a burst come well within a poll.
async fn chat() -> String {
    let mut conn = HttpConn::connect(SocketAddr::V4(VIP))
        .await
        .unwrap_or_else(|e| panic!("connect to the VIP: {e}"));
    let body = json!({
        "messages": [{"role": "user", "content": "Tell a story about a lighthouse."}],
        "max_tokens": 8,
        "ignore_eos": true,
    });
    let answer = conn
        .request_ok(
            "POST",
            "/v1/chat/completions",
            Some(body.to_string().as_bytes()),
        )
        .await;
    let answer: Value = serde_json::from_slice(&answer.body).expect("a JSON answer");
    answer["model"].as_str().expect("a model field").to_owned()
}

#[test]
fn a_burst_spreads_by_free_slots() {
    netns::require_root("the integration tests");
    let mut topo = Topology::new("slots", "slots", 2, backend_bin());
    let servers: Vec<(SocketAddrV4, &str, u32)> = [("big", 3), ("small", 1)]
        .into_iter()
        .zip(&topo.backends)
        .map(|((alias, slots), b)| (SocketAddrV4::new(*b.addr.ip(), LLAMA_PORT), alias, slots))
        .collect();
    let _llamas: Vec<ChildGuard> = servers
        .iter()
        .zip(&topo.backends)
        .map(|(&(_, alias, slots), b)| llama_server(&b.ns, &topo.dir, alias, slots))
        .collect();
    topo.start_agent();

    // The service's backends become the two llama-servers.
    for b in topo.backends_view() {
        let id = b["id"].as_u64().expect("an id");
        topo.admin("DELETE", &format!("/v1/backends/{id}"), None);
    }
    for &(address, _, _) in &servers {
        let body = json!({"service": "web", "address": address.to_string(), "max_connections": 16});
        topo.admin("POST", "/v1/backends", Some(&body));
    }
    let slots = |topo: &Topology, address: SocketAddrV4| {
        let b = topo.backend_view(address).expect("listed");
        (b["total_slots"].as_u64(), b["idle_slots"].as_u64())
    };
    // Health checks pass once the model is loaded, and a poll has counted the slots.
    wait_until(
        "both servers healthy and polled, all slots idle",
        &topo,
        || {
            servers.iter().all(|&(address, _, n)| {
                let n = u64::from(n);
                topo.backend_view(address)
                    .is_some_and(|b| b["healthy"] == true)
                    && slots(&topo, address) == (Some(n), Some(n))
            })
        },
    );
    // A poll after the last connection: nothing steered is left uncounted.
    std::thread::sleep(Duration::from_millis(700));

    let burst = topo.client.block_on(|| async {
        let mut chats = tokio::task::JoinSet::new();
        for _ in 0..4 {
            chats.spawn(chat());
        }
        let mut by_server: BTreeMap<String, usize> = BTreeMap::new();
        while let Some(alias) = chats.join_next().await {
            *by_server.entry(alias.expect("a chat task")).or_default() += 1;
        }
        by_server
    });
    let expected = BTreeMap::from([("big".to_owned(), 3), ("small".to_owned(), 1)]);
    assert_eq!(burst, expected, "agent log:\n{}", topo.agent_log());
    wait_until("all slots idle again", &topo, || {
        servers
            .iter()
            .all(|&(address, _, n)| slots(&topo, address).1 == Some(u64::from(n)))
    });
}
