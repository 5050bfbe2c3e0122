//! Supervised llama-server instances as backends, end to end: the agent in the LB namespace runs
//! two real llama-servers as local backends of the service, beside a remote llama-server in a
//! backend namespace; the client sends real `/v1/chat/completions` requests to the VIP. Each
//! server has its own `--alias`, so every answer's `model` field names the server that gave it.
//!
//! Shown: round robin spreads over all three; a SIGKILLed instance takes no new connection
//! from the moment the agent marks it down until it is revived and healthy, and nothing sent
//! meanwhile fails; an args change drains the instance first (no new connection, nothing sent
//! after the change is lost) and it comes back with the new arguments; the agent's shutdown
//! drains and stops the instances. And under policy maglev: 50 client addresses each keep their
//! instance, removing one moves only its clients, `/metrics` counts exactly what each instance
//! answered, and a streamed chat comes through event by event.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4},
    path::Path,
    process::{Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tests::{
    llama::{llama_server_path, model_path},
    netns,
    topology::{HttpConn, LB_CLIENT_SIDE, Topology, VIP},
};

/// Where the remote llama-server listens in its namespace.
const REMOTE_PORT: u16 = 8081;
const REMOTE: &str = "remote";
/// The supervised instances (name = alias) and their ports in the LB namespace.
const I1: (&str, u16) = ("i1", 8091);
const I2: (&str, u16) = ("i2", 8092);
/// Upper bound for any wait, and for a load's length.
const WAIT: Duration = Duration::from_secs(60);
/// Upper bound for the requests of one load.
const MAX_REQUESTS: usize = 300;

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// A local instance's backend address: the LB's first interface (the client link), its port.
fn instance_addr(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(LB_CLIENT_SIDE, port)
}

/// One chat completion on a new connection to `to`; the alias of the server that answered.
async fn chat(to: SocketAddrV4) -> Sent {
    let start = Instant::now();
    let mut connected = None;
    let result = async {
        let mut conn = HttpConn::connect(SocketAddr::V4(to))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        connected = Some(Instant::now());
        let body = json!({
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 4,
        })
        .to_string();
        let response = conn
            .try_request("POST", "/v1/chat/completions", Some(body.as_bytes()))
            .await
            .map_err(|e| format!("request: {e}"))?;
        if response.status != 200 {
            return Err(format!("HTTP {}: {}", response.status, response.text()));
        }
        let answer: Value =
            serde_json::from_slice(&response.body).map_err(|e| format!("bad JSON: {e}"))?;
        answer["model"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no model in {answer}"))
    }
    .await;
    Sent {
        start,
        connected,
        result,
    }
}

/// One request of a load: when it started, when its connection was up (the SYN, and with it
/// the kernel's choice of backend, came before), and who answered.
#[derive(Debug)]
struct Sent {
    start: Instant,
    connected: Option<Instant>,
    result: Result<String, String>,
}

/// Chats from the client, three in flight (fewer than the six slots: two shared cores), until
/// `stop` is set, [`WAIT`] passed or [`MAX_REQUESTS`] were sent.
fn load(topo: &Topology, stop: &AtomicBool) -> Vec<Sent> {
    let sent = Mutex::new(Vec::new());
    topo.client.block_on(|| async {
        let deadline = Instant::now() + WAIT;
        let worker = || async {
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let chat = chat(VIP).await;
                let mut sent = sent.lock().unwrap_or_else(|e| e.into_inner());
                if sent.len() >= MAX_REQUESTS {
                    return;
                }
                sent.push(chat);
            }
        };
        tokio::join!(worker(), worker(), worker());
    });
    sent.into_inner().unwrap_or_else(|e| e.into_inner())
}

/// The API view of the backend at `addr`.
fn backend(topo: &Topology, addr: SocketAddrV4) -> Value {
    topo.backend_view(addr)
        .unwrap_or_else(|| panic!("backend {addr} not listed: {:?}", topo.backends_view()))
}

fn takes_new_flows(b: &Value) -> bool {
    b["healthy"] == true && b["state"] == "active"
}

fn new_flows(b: &Value) -> u64 {
    b["new_flows"].as_u64().expect("new_flows")
}

/// How a backend left and came back, as polled every 10 ms.
#[derive(Debug)]
struct Absence {
    /// When the first poll that saw it take no new flows answered, and its `new_flows` then.
    out: Instant,
    flows_out: u64,
    /// When the last poll that still saw it out was sent (it was out until at least then),
    /// and its `new_flows` in that answer.
    last_out: Instant,
    flows_last_out: u64,
    /// When the first poll that saw it take new flows again answered (it was back by then).
    back: Instant,
}

/// Waits (bounded) for the backend at `addr` to stop taking new flows, then to take them again.
fn watch_absence(topo: &Topology, addr: SocketAddrV4) -> Absence {
    let deadline = Instant::now() + WAIT;
    // (sent, answered, view)
    let poll = || {
        assert!(
            Instant::now() < deadline,
            "backend {addr} did not leave and come back within {WAIT:?}"
        );
        thread::sleep(Duration::from_millis(10));
        let sent = Instant::now();
        let b = backend(topo, addr);
        (sent, Instant::now(), b)
    };
    let (mut last_out, out, flows_out) = loop {
        let (sent, answered, b) = poll();
        if !takes_new_flows(&b) {
            break (sent, answered, new_flows(&b));
        }
    };
    let mut flows_last_out = flows_out;
    loop {
        let (sent, answered, b) = poll();
        if takes_new_flows(&b) {
            return Absence {
                out,
                flows_out,
                last_out,
                flows_last_out,
                back: answered,
            };
        }
        (last_out, flows_last_out) = (sent, new_flows(&b));
    }
}

/// Waits (bounded) until the backend at `addr` has had more than `flows` new flows.
fn wait_new_flow(topo: &Topology, addr: SocketAddrV4, flows: u64) {
    let deadline = Instant::now() + WAIT;
    while new_flows(&backend(topo, addr)) <= flows {
        assert!(
            Instant::now() < deadline,
            "backend {addr} got no new flow within {WAIT:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Polls the API (bounded) until every listed backend takes new flows.
fn wait_all_up(topo: &Topology) {
    let deadline = Instant::now() + WAIT;
    loop {
        let view = topo.backends_view();
        if view.iter().all(takes_new_flows) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "backends not all up within {WAIT:?}: {view:?}\nagent log:\n{}",
            topo.agent_log()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

fn params(topo: &Topology, name: &str) -> Value {
    topo.admin("GET", &format!("/v1/instances/{name}/params"), None)
}

fn pid_of(topo: &Topology, name: &str) -> i32 {
    let pid = params(topo, name)["pid"].as_u64().expect("a running pid");
    i32::try_from(pid).expect("pid fits i32")
}

/// Whether `s` sent its SYN while the backend was out for certain: after the poll that saw
/// it leave and before the last one that still saw it out.
fn connected_while_out(s: &Sent, absence: &Absence) -> bool {
    s.start >= absence.out && s.connected.is_some_and(|c| c <= absence.last_out)
}

/// Who answered the `chosen` requests; panics on a failed one.
fn answered_by(sent: &[Sent], chosen: impl Fn(&Sent) -> bool) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for s in sent.iter().filter(|s| chosen(s)) {
        let alias = s
            .result
            .as_ref()
            .unwrap_or_else(|e| panic!("a request that should have been answered failed: {e}"));
        *counts.entry(alias.clone()).or_insert(0) += 1;
    }
    counts
}

/// `text` without terminal colour codes (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The exit -> kernel map delays the agent logged, in microseconds.
fn exit_to_map_delays(log: &str) -> Vec<u64> {
    strip_ansi(log)
        .lines()
        .filter(|l| l.contains("llama-server gone"))
        .filter_map(|l| {
            let rest = l.split("exit_to_map_us=").nth(1)?;
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn supervised_instances_are_local_backends() {
    netns::require_root("the instance integration test");
    let mut topo = Topology::new(
        "inst",
        "round_robin",
        1,
        Path::new(env!("CARGO_BIN_EXE_steer-test-backend")),
    );
    let binary = llama_server_path();
    let model = model_path();

    // The remote backend: a llama-server of its own in the backend namespace.
    let remote_addr = SocketAddrV4::new(*topo.backends[0].addr.ip(), REMOTE_PORT);
    let log = std::fs::File::create(topo.dir.join("remote.log")).expect("remote log");
    let mut cmd = Command::new(&binary);
    cmd.args(["-m", path_str(&model), "--host", "0.0.0.0"])
        .args(["--port", &REMOTE_PORT.to_string()])
        .args(["-np", "2", "-c", "2048", "--alias", REMOTE])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log);
    // Declared after the topology: stopped before its namespace goes.
    let _remote = topo.backends[0].ns.spawn(cmd);
    let ready = topo.lb.block_on(|| async {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(mut conn) = HttpConn::connect(SocketAddr::V4(remote_addr)).await
                && conn
                    .try_request("GET", "/health", None)
                    .await
                    .is_ok_and(|r| r.status == 200)
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });
    assert!(ready, "remote llama-server not healthy within {WAIT:?}");
    topo.set_service_backends(vec![remote_addr]);

    let store = topo.dir.join("instances.toml");
    for (name, port) in [I1, I2] {
        topo.add_instance(&format!(
            "name = \"{name}\"\nbinary = {:?}\nmodel = {:?}\nport = {port}\n\
             args = [\"-np\", \"2\", \"-c\", \"2048\", \"--alias\", \"{name}\"]\n\
             debounce = \"50ms\"\ndrain_timeout = \"20s\"\n\
             config_driver = {{ type = \"file\", path = {:?}, name = \"{name}\" }}\n",
            path_str(&binary),
            path_str(&model),
            path_str(&store),
        ));
    }
    topo.start_agent();
    for (_, port) in [I1, I2] {
        assert_eq!(backend(&topo, instance_addr(port))["kind"], "local");
    }
    assert_eq!(backend(&topo, remote_addr)["kind"], "remote");
    wait_all_up(&topo);

    // Round robin: one connection after another goes to each server in turn.
    let answers = topo.client.block_on(|| async {
        let mut answers = Vec::new();
        for i in 0..9 {
            let alias = chat(VIP)
                .await
                .result
                .unwrap_or_else(|e| panic!("chat {i} through the VIP: {e}"));
            answers.push(alias);
        }
        answers
    });
    let mut spread = BTreeMap::new();
    for alias in &answers {
        *spread.entry(alias.as_str()).or_insert(0) += 1;
    }
    eprintln!("round robin over 9 chats: {spread:?}");
    assert_eq!(
        spread,
        BTreeMap::from([(I1.0, 3), (I2.0, 3), (REMOTE, 3)]),
        "{answers:?}"
    );

    // SIGKILL i1 under load.
    let i1 = instance_addr(I1.1);
    let killed_pid = pid_of(&topo, I1.0);
    let stop = AtomicBool::new(false);
    let (sent, absence) = thread::scope(|s| {
        let loader = s.spawn(|| load(&topo, &stop));
        thread::sleep(Duration::from_secs(1));
        kill(Pid::from_raw(killed_pid), Signal::SIGKILL).expect("SIGKILL i1");
        let absence = watch_absence(&topo, i1);
        // Until a chat went to i1 again (the load waits for the ones in flight).
        wait_new_flow(&topo, i1, absence.flows_last_out);
        stop.store(true, Ordering::SeqCst);
        (loader.join().expect("load thread"), absence)
    });
    let failed = sent.iter().filter(|s| s.result.is_err()).count();
    eprintln!(
        "SIGKILL under load: {} chats, {failed} failed (sent before the agent marked i1 down), \
         i1 out for {:?} (revival and health)",
        sent.len(),
        absence.back - absence.out
    );
    assert_eq!(
        absence.flows_out, absence.flows_last_out,
        "i1 got new flows while down"
    );
    // Requests that connected while i1 was out.
    let during = answered_by(&sent, |s| connected_while_out(s, &absence));
    eprintln!("answered while i1 was out: {during:?}");
    assert!(
        !during.contains_key(I1.0),
        "i1 answered while down: {during:?}"
    );
    // Since it went out (none inside the absence, see above): i1 answered again once back.
    let after = answered_by(&sent, |s| s.start >= absence.out);
    assert!(
        after.contains_key(I1.0),
        "i1 answered nothing after it rejoined: {after:?}"
    );
    let status = params(&topo, I1.0);
    assert!(status["revivals"].as_u64() >= Some(1), "{status}");
    assert_ne!(pid_of(&topo, I1.0), killed_pid);
    let delays = exit_to_map_delays(&topo.agent_log());
    eprintln!("exit -> kernel map DOWN: {delays:?} µs");
    assert!(!delays.is_empty(), "no exit -> map delay logged");

    // Change i2's arguments under load: drained, restarted, back with the new arguments.
    let i2 = instance_addr(I2.1);
    let old_pid = pid_of(&topo, I2.0);
    let stop = AtomicBool::new(false);
    let (sent, absence, posted, applied) = thread::scope(|s| {
        let loader = s.spawn(|| load(&topo, &stop));
        thread::sleep(Duration::from_secs(1));
        let posted = Instant::now();
        let post = s.spawn(|| {
            let body = json!({"args": {"-c": 1024}});
            topo.admin("POST", "/v1/instances/i2/params", Some(&body))
        });
        let absence = watch_absence(&topo, i2);
        let applied = post.join().expect("POST thread");
        wait_new_flow(&topo, i2, absence.flows_last_out);
        stop.store(true, Ordering::SeqCst);
        (
            loader.join().expect("load thread"),
            absence,
            posted,
            applied,
        )
    });
    eprintln!(
        "args change under load: {} chats, i2 out for {:?} (drain, restart, health)",
        sent.len(),
        absence.back - absence.out
    );
    assert_eq!(
        applied["applied"]["args"]["--ctx-size"], "1024",
        "{applied}"
    );
    assert_eq!(
        absence.flows_out, absence.flows_last_out,
        "i2 got new flows while drained"
    );
    // Nothing that started after the POST failed; while out, the others answered.
    let since_post = answered_by(&sent, |s| s.start >= posted);
    eprintln!("answered after the POST: {since_post:?}");
    let during = answered_by(&sent, |s| connected_while_out(s, &absence));
    eprintln!("answered while i2 was out: {during:?}");
    assert!(
        !during.contains_key(I2.0),
        "i2 answered while out: {during:?}"
    );
    // Since it went out (none inside the absence, see above): i2 answered again once back.
    let after = answered_by(&sent, |s| s.start >= absence.out);
    assert!(
        after.contains_key(I2.0),
        "i2 answered nothing after it came back: {after:?}"
    );
    let new_pid = pid_of(&topo, I2.0);
    assert_ne!(new_pid, old_pid);
    let cmdline = std::fs::read(format!("/proc/{new_pid}/cmdline")).expect("cmdline");
    let argv: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    assert!(
        argv.windows(2)
            .any(|w| w[0] == b"--ctx-size" && w[1] == b"1024"),
        "new i2 runs {:?}",
        String::from_utf8_lossy(&cmdline)
    );

    // Shutdown drains, then stops the instances.
    let pids = [pid_of(&topo, I1.0), new_pid];
    let status = topo.stop_agent(Signal::SIGTERM);
    assert!(status.success(), "agent exited with {status}");
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "llama-server {pid} outlived the agent"
        );
    }
}

/// `GET /v1/models` on a new connection from `from` to the VIP: the alias that answered.
async fn model_from(from: std::net::Ipv4Addr) -> String {
    let mut conn = HttpConn::connect_from(Some(from), SocketAddr::V4(VIP))
        .await
        .unwrap_or_else(|e| panic!("connect from {from}: {e}"));
    let answer: Value = serde_json::from_slice(&conn.get("/v1/models").await.body)
        .unwrap_or_else(|e| panic!("/v1/models from {from}: bad JSON: {e}"));
    answer["data"][0]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no model id in {answer}"))
        .to_owned()
}

/// A streamed chat through the VIP: the server-sent events as they arrive, with their times.
async fn streamed_chat() -> Vec<(Instant, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(SocketAddr::V4(VIP))
        .await
        .expect("connect to the VIP");
    let body = json!({
        "messages": [{"role": "user", "content": "Count to five."}],
        "max_tokens": 12,
        "stream": true,
    })
    .to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {VIP}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let (mut events, mut pending) = (Vec::new(), String::new());
    let mut buf = vec![0u8; 16 << 10];
    let deadline = Instant::now() + WAIT;
    loop {
        let read = tokio::time::timeout_at(deadline.into(), stream.read(&mut buf))
            .await
            .expect("the stream ends within the wait")
            .expect("read");
        if read == 0 {
            return events;
        }
        pending.push_str(&String::from_utf8_lossy(&buf[..read]));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            if let Some(at) = event.find("data: ") {
                events.push((Instant::now(), event[at + 6..].trim().to_owned()));
            }
        }
    }
}

/// Maglev over supervised llama-servers: each of 50 client addresses keeps its instance over 10
/// new connections, removing one instance moves only its clients, `/metrics` counts exactly the
/// connections each instance answered, and a streamed chat arrives event by event.
#[test]
fn maglev_keeps_clients_on_their_instance_and_metrics_count_them() {
    netns::require_root("the instance integration test");
    let mut topo = Topology::new(
        "imag",
        "maglev",
        1,
        Path::new(env!("CARGO_BIN_EXE_steer-test-backend")),
    );
    topo.set_service_backends(Vec::new());
    let clients = topo.add_client_addresses(50);
    let (binary, model) = (llama_server_path(), model_path());
    let store = topo.dir.join("instances.toml");
    let instances = [("m1", 8093), ("m2", 8094), ("m3", 8095)];
    for (name, port) in instances {
        topo.add_instance(&format!(
            "name = \"{name}\"\nbinary = {:?}\nmodel = {:?}\nport = {port}\n\
             args = [\"-np\", \"1\", \"-c\", \"512\", \"--alias\", \"{name}\"]\n\
             config_driver = {{ type = \"file\", path = {:?}, name = \"{name}\" }}\n",
            path_str(&binary),
            path_str(&model),
            path_str(&store),
        ));
    }
    topo.start_agent();
    wait_all_up(&topo);

    let placement = |topo: &Topology| -> Vec<String> {
        let clients = clients.clone();
        let seen = topo.client.block_on(|| async move {
            let mut seen = Vec::new();
            for from in clients {
                let mut models = Vec::new();
                for _ in 0..10 {
                    models.push(model_from(from).await);
                }
                seen.push((from, models));
            }
            seen
        });
        seen.into_iter()
            .map(|(from, models)| {
                assert!(
                    models.iter().all(|m| *m == models[0]),
                    "client {from} moved between instances: {models:?}"
                );
                models[0].clone()
            })
            .collect()
    };
    let before = placement(&topo);
    let mut answered: BTreeMap<&str, u64> = BTreeMap::new();
    for name in &before {
        *answered.entry(name.as_str()).or_default() += 10;
    }
    eprintln!("maglev placement of 50 clients: {answered:?}");
    assert_eq!(
        answered.len(),
        3,
        "every instance has clients: {answered:?}"
    );

    // Each instance's connection counter is exactly what it answered.
    let scrape = topo.metrics();
    for (name, port) in instances {
        let backend = instance_addr(port).to_string();
        let counted = tests::metrics::value(
            &scrape,
            "steer_backend_connections_total",
            &[("backend", backend.as_str())],
        );
        let want = answered.get(name).copied().unwrap_or(0) as f64;
        assert_eq!(counted, want, "{name} ({backend}) connections");
    }

    let events = topo.client.block_on(streamed_chat);
    assert!(events.len() >= 3, "a stream of events: {events:?}");
    assert_eq!(events.last().map(|(_, e)| e.as_str()), Some("[DONE]"));
    let first: Value = serde_json::from_str(&events[0].1).expect("an event is JSON");
    assert_eq!(first["object"], "chat.completion.chunk", "{first}");

    let m3 = backend(&topo, instance_addr(8095))["id"]
        .as_u64()
        .expect("id");
    // An instance's backend cannot be deleted (the supervisor owns it); drained, it leaves the
    // Maglev table the same way.
    topo.admin("POST", &format!("/v1/backends/{m3}/drain"), None);
    let after = placement(&topo);
    for (i, (was, is)) in before.iter().zip(&after).enumerate() {
        if was == "m3" {
            assert_ne!(is, "m3", "client {i} still on the drained instance");
        } else {
            assert_eq!(was, is, "client {i} moved from {was} although {was} stayed");
        }
    }
}
