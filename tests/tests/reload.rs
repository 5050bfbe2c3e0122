//! Reload through a real agent (userspace dataplane, loopback) over real llama-servers, under a
//! steady chat load that must see no failure:
//!
//! 1. SIGHUP with service `chat` changed (policy, a cap of one request per backend, a second
//!    backend) and an instance added as its third: the three serve, the cap queues a burst, and
//!    service `raw` (unchanged) keeps its keep-alive connection and its counters.
//! 2. `steer reload`: a backend removed and the instance restarted with a larger context (a new
//!    process, healthy again); then `POST /v1/reload` removes it, its llama-server gone.
//! 3. Refused, the running config staying: a file that fails validation (`steer reload` exits 1
//!    with its file:line, `POST /v1/reload` answers 422), a change that needs a restart (409),
//!    and no token (401). The unchanged file reloads to an empty report.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tests::admin::{TOKEN, token_file};
use tests::bench::free_port;
use tests::blocking::{http, load, scratch};
use tests::llama::{llama_server_path, model_path, server_args};
use tests::netns::{self, ChildGuard};
use tests::topology::steer_bin;

/// Upper bound for any wait (a llama-server loading its model included).
const WAIT: Duration = Duration::from_secs(90);

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A llama-server of the test model with 2 slots on `port`, killed when dropped.
fn llama_server(dir: &Path, port: u16) -> ChildGuard {
    let log = std::fs::File::create(dir.join(format!("llama-{port}.log"))).expect("a log");
    let mut command = Command::new(llama_server_path());
    command
        .args(server_args("smol", 2, 1, "127.0.0.1", port))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup the log"))
        .stderr(log);
    ChildGuard::spawn(command).expect("start llama-server")
}

/// The agent's config: `chat` (http) over `chat_backends` with `chat_lines`, `raw` (l4) over
/// `raw_backend`, and `instance` text at the end.
struct Layout {
    admin: SocketAddr,
    chat: SocketAddr,
    raw: SocketAddr,
    token: PathBuf,
}

impl Layout {
    fn config(
        &self,
        chat_lines: &str,
        chat_backends: &[SocketAddr],
        raw_backend: SocketAddr,
        instance: &str,
    ) -> String {
        let mut text = format!(
            "[agent]\ninterfaces = [\"lo\"]\nadmin_addr = \"{admin}\"\nadmin_token_file = {token:?}\n\
             dataplane = \"userspace\"\nshutdown_timeout = \"5s\"\n\n\
             [[service]]\nname = \"chat\"\naddress = \"{chat}\"\nmode = \"http\"\n{chat_lines}\n",
            admin = self.admin,
            token = self.token.display().to_string(),
            chat = self.chat,
        );
        for backend in chat_backends {
            text += &format!("[[service.backend]]\naddress = \"{backend}\"\n");
        }
        text += &format!(
            "\n[[service]]\nname = \"raw\"\naddress = \"{}\"\n[[service.backend]]\naddress = \"{raw_backend}\"\n",
            self.raw
        );
        text + instance
    }
}

/// The agent, killed when dropped.
struct Agent {
    child: ChildGuard,
    config: PathBuf,
    log: PathBuf,
    admin: SocketAddr,
}

impl Agent {
    fn start(dir: &Path, config: &str, admin: SocketAddr) -> Agent {
        let path = dir.join("steer.toml");
        std::fs::write(&path, config).expect("write the config");
        let log_path = dir.join("steer.log");
        let log = std::fs::File::create(&log_path).expect("the agent's log");
        let mut command = Command::new(steer_bin());
        command
            .args(["run", "--log-format", "json", "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup the log"))
            .stderr(log);
        let child = ChildGuard::spawn(command).expect("start steer");
        Agent {
            child,
            config: path,
            log: log_path,
            admin,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn rewrite(&self, config: &str) {
        std::fs::write(&self.config, config).expect("rewrite the config");
    }

    fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(self.child.id() as i32);
        kill(pid, signal).expect("signal the agent");
    }

    fn get(&self, path: &str) -> Value {
        let (status, body) = http(self.admin, "GET", path, &[], None)
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.log()));
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    /// `service`'s backends: address to (healthy, instance).
    fn backends(&self, service: &str) -> BTreeMap<String, (bool, Option<String>)> {
        let all = self.get("/v1/backends");
        all["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .filter(|b| b["service"] == service)
            .map(|b| {
                let instance = b["instance"].as_str().map(str::to_owned);
                (
                    b["address"].as_str().unwrap_or_default().to_owned(),
                    (b["healthy"] == true, instance),
                )
            })
            .collect()
    }

    /// `service`'s counters in `/v1/proxy`.
    fn proxy(&self, service: &str) -> Value {
        let all = self.get("/v1/proxy");
        all.as_array()
            .expect("proxies")
            .iter()
            .find(|p| p["service"] == service)
            .cloned()
            .unwrap_or_else(|| panic!("no proxy of {service}: {all}"))
    }

    /// `steer reload` with this agent's config: (success, stdout, stderr).
    fn reload_command(&self) -> (bool, String, String) {
        let out = Command::new(steer_bin())
            .args(["reload", "--config"])
            .arg(&self.config)
            .output()
            .expect("run steer reload");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    }

    /// Waits for `done` within [`WAIT`]; panics with `what` and the log.
    fn wait_for(&self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "{what}: not within {WAIT:?}\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A keep-alive connection through `raw` to a llama-server: one `GET /health` at a time.
struct KeepAlive(BufReader<TcpStream>);

impl KeepAlive {
    fn open(to: SocketAddr) -> KeepAlive {
        let stream = TcpStream::connect(to).expect("connect through raw");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("read timeout");
        KeepAlive(BufReader::new(stream))
    }

    /// The status of one `GET /health` on this same connection.
    fn health(&mut self) -> u16 {
        self.0
            .get_mut()
            .write_all(b"GET /health HTTP/1.1\r\nHost: raw\r\n\r\n")
            .expect("write on the kept connection");
        let mut status = String::new();
        self.0.read_line(&mut status).expect("status line");
        let mut length = 0;
        loop {
            let mut line = String::new();
            self.0.read_line(&mut line).expect("header");
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse().expect("a length");
            }
        }
        let mut body = vec![0; length];
        self.0.read_exact(&mut body).expect("body");
        status.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
    }
}

/// The services the table logged as reconfigured, in order.
fn reconfigured_services(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["fields"]["message"] == "service reconfigured")
        .filter_map(|line| line["fields"]["service"].as_str().map(str::to_owned))
        .collect()
}

/// `n` chats at once through `vip`, each asking for `tokens`: their statuses.
fn burst(vip: SocketAddr, n: usize, tokens: u32) -> Vec<u16> {
    let body = format!(
        r#"{{"messages":[{{"role":"user","content":"Count to twenty."}}],"max_tokens":{tokens}}}"#
    );
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let body = body.clone();
            thread::spawn(move || {
                http(vip, "POST", "/v1/chat/completions", &[], Some(&body)).map_or(0, |(s, _)| s)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("a chat"))
        .collect()
}

#[test]
fn a_reload_applies_only_what_changed_and_a_refused_one_changes_nothing() {
    netns::require_root("the reloaded instance's llama-server runs as nobody");
    let dir = scratch("steer-reload");
    let layout = Layout {
        admin: loopback(free_port()),
        chat: loopback(free_port()),
        raw: loopback(free_port()),
        token: token_file(&dir),
    };
    let [l1, l2, extra] = [free_port(), free_port(), free_port()].map(loopback);
    let _servers = [llama_server(&dir, l1.port()), llama_server(&dir, l2.port())];
    let first = layout.config("policy = \"round_robin\"", &[l1], l2, "");
    let mut agent = Agent::start(&dir, &first, layout.admin);
    agent.wait_for("chat's and raw's backends healthy", || {
        let healthy = |s: &str| agent.backends(s).values().all(|(h, _)| *h);
        http(agent.admin, "GET", "/v1/backends", &[], None).is_ok()
            && healthy("chat")
            && healthy("raw")
            && !agent.backends("raw").is_empty()
    });
    let mut kept = KeepAlive::open(layout.raw);
    assert_eq!(kept.health(), 200);
    let raw_before = agent.proxy("raw");
    let stop = Arc::new(AtomicBool::new(false));
    let chats = load(layout.chat, Arc::clone(&stop));
    thread::sleep(Duration::from_millis(500));

    // 1. SIGHUP: chat changes and gains a supervised instance; raw is as it was.
    let instance = format!(
        "\n[[instance]]\nname = \"extra\"\nbinary = {binary:?}\nmodel = {model:?}\nport = {port}\n\
         service = \"chat\"\naddress = \"{extra}\"\n\
         args = [\"--host\", \"127.0.0.1\", \"-np\", \"2\", \"-c\", \"1024\", \"-t\", \"1\", \"--alias\", \"smol\"]\n\
         config_driver = {{ type = \"file\", path = {store:?}, name = \"extra\" }}\n",
        binary = llama_server_path().display().to_string(),
        model = model_path().display().to_string(),
        port = extra.port(),
        store = dir.join("args.toml").display().to_string(),
    );
    let capped = "policy = \"least_connections\"\nmax_requests_per_backend = 1";
    let second = layout.config(capped, &[l1, l2], l2, &instance);
    agent.rewrite(&second);
    agent.signal(Signal::SIGHUP);
    agent.wait_for("the reload logged", || agent.log().contains("\"reloaded\""));
    agent.wait_for("chat over l1, l2 and the instance, all healthy", || {
        let chat = agent.backends("chat");
        chat.len() == 3 && chat.values().all(|(healthy, _)| *healthy)
    });
    let chat = agent.backends("chat");
    assert_eq!(
        chat[&extra.to_string()].1.as_deref(),
        Some("extra"),
        "{chat:?}"
    );
    let services = agent.get("/v1/services");
    let policy = services["services"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == "chat"))
        .map(|s| s["policy"].clone());
    assert_eq!(policy, Some(Value::from("least_connections")), "{services}");
    // One request per backend: of 8 at once over 3 backends, some wait in the queue.
    let queued = agent.proxy("chat")["queued"].as_u64().unwrap_or(0);
    let statuses = burst(layout.chat, 8, 24);
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let queued_after = agent.proxy("chat")["queued"].as_u64().unwrap_or(0);
    assert!(
        queued_after >= queued + 4,
        "queued {queued} -> {queued_after}"
    );
    // The unchanged service was not touched: its kept connection goes on, no new one counted.
    assert_eq!(kept.health(), 200, "raw's kept connection goes on");
    let raw_after = agent.proxy("raw");
    assert_eq!(
        raw_after["accepted"], raw_before["accepted"],
        "no new raw connection"
    );
    assert_eq!(
        reconfigured_services(&agent.log()),
        ["chat"],
        "only chat was reconfigured"
    );

    // 2. `steer reload`: l1 goes, and the instance restarts with a larger context.
    let params = |agent: &Agent| agent.get("/v1/instances/extra/params");
    let old_pid = params(&agent)["pid"].as_u64().expect("the instance runs");
    let resized = instance.replace("\"-c\", \"1024\"", "\"-c\", \"2048\"");
    let third = layout.config(capped, &[l2], l2, &resized);
    agent.rewrite(&third);
    let (ok, out, err) = agent.reload_command();
    assert!(ok, "steer reload: {err}\n{}", agent.log());
    let report: Value = serde_json::from_str(&out).expect("the report");
    assert_eq!(report["services"], serde_json::json!(["chat"]), "{report}");
    assert_eq!(
        report["instances_changed"],
        serde_json::json!(["extra"]),
        "{report}"
    );
    agent.wait_for("chat over l2 and the restarted instance", || {
        let chat = agent.backends("chat");
        let mut want = [l2.to_string(), extra.to_string()];
        want.sort();
        chat.keys().cloned().collect::<Vec<_>>() == want
            && chat.values().all(|(healthy, _)| *healthy)
    });
    let restarted = params(&agent);
    assert_eq!(
        restarted["applied"]["args"]["--ctx-size"], "2048",
        "{restarted}"
    );
    let new_pid = restarted["pid"].as_u64();
    assert!(new_pid.is_some_and(|p| p != old_pid), "{restarted}");
    let gone = |pid: u64| kill(Pid::from_raw(pid as i32), None).is_err();
    assert!(gone(old_pid), "the old llama-server is gone");

    // POST /v1/reload: the instance goes, its backend with it.
    let fourth = layout.config(capped, &[l2], l2, "");
    agent.rewrite(&fourth);
    let auth = format!("Bearer {TOKEN}");
    let post = || {
        http(
            agent.admin,
            "POST",
            "/v1/reload",
            &[("Authorization", &auth)],
            None,
        )
        .expect("POST /v1/reload")
    };
    let (status, body) = post();
    assert_eq!(status, 200, "{body}");
    let report: Value = serde_json::from_str(&body).expect("the report");
    assert_eq!(
        report["instances_removed"],
        serde_json::json!(["extra"]),
        "{report}"
    );
    let chat = agent.backends("chat");
    assert_eq!(
        chat.keys().collect::<Vec<_>>(),
        [&l2.to_string()],
        "{chat:?}"
    );
    assert!(
        new_pid.is_some_and(gone),
        "the removed instance's llama-server is gone"
    );
    let (status, _) =
        http(agent.admin, "GET", "/v1/instances/extra/params", &[], None).expect("the params API");
    assert_eq!(status, 404);

    // 3. Refused: the running config stays.
    agent.rewrite(&fourth.replace("mode = \"http\"", "mode = \"http\"\npolcy = \"slots\""));
    let (ok, _, err) = agent.reload_command();
    assert!(!ok, "a bad config was accepted");
    assert!(err.contains("reload refused (422)"), "{err}");
    assert!(
        err.contains("steer.toml:12:1: service[0].polcy: unknown field"),
        "{err}"
    );
    let (status, body) = post();
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("the running one stays"), "{body}");
    let moved = fourth.replace(
        &layout.admin.to_string(),
        &loopback(free_port()).to_string(),
    );
    agent.rewrite(&moved);
    let (status, body) = post();
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("agent.admin_addr") && body.contains("needs a restart"),
        "{body}"
    );
    let (status, _) = http(agent.admin, "POST", "/v1/reload", &[], None).expect("POST");
    assert_eq!(status, 401, "no token, no reload");
    assert_eq!(agent.backends("chat").len(), 1, "nothing changed");
    agent.rewrite(&fourth);
    let (status, body) = post();
    assert_eq!(status, 200, "{body}");
    let report: Value = serde_json::from_str(&body).expect("a report");
    assert_eq!(report["services"], serde_json::json!([]), "{report}");

    stop.store(true, Ordering::Relaxed);
    let (sent, failed, last) = chats.join().expect("the load");
    eprintln!("{sent} chats through four reloads and three refusals, {failed} failed");
    assert!(sent > 0);
    assert_eq!(
        failed,
        0,
        "{failed} of {sent} failed, the last: {last}\n{}",
        agent.log()
    );
    // Every chat came on a connection of its own, and each proxy chat had took over its
    // predecessor's count: none went back to zero.
    let accepted = agent.proxy("chat")["accepted"].as_u64().unwrap_or(0);
    assert!(
        accepted >= sent + 8,
        "chat accepted {accepted}, for {sent} chats and a burst of 8"
    );
    assert_eq!(reconfigured_services(&agent.log()), ["chat", "chat"]);
    agent.signal(Signal::SIGTERM);
    let status = agent.child.wait_timeout(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}:\n{}",
        agent.log()
    );

    let _ = std::fs::remove_dir_all(&dir);
}
