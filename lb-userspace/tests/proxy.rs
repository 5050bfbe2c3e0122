//! `steer run --dataplane userspace` on loopback, without root: every connection goes through the
//! userspace proxy. Backends are plain TCP servers in this test that answer each line with their
//! name (or, when silent, never answer) and hold the connection until the client closes it.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Upper bound for any wait.
const WAIT: Duration = Duration::from_secs(10);

/// A backend on 127.0.0.1: answers every line with `name`, unless silent.
fn backend(name: &'static str, silent: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a backend");
    let addr = listener.local_addr().expect("backend address");
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut reader = BufReader::new(&stream);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    if !silent {
                        let _ = (&stream).write_all(format!("{name}\n").as_bytes());
                    }
                    line.clear();
                }
            });
        }
    });
    addr
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Kills the agent however the test ends.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A client of the service at `vip`.
struct Client {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    fn connect(vip: SocketAddr) -> Client {
        let stream = TcpStream::connect(vip).unwrap_or_else(|e| panic!("connect {vip}: {e}"));
        stream.set_read_timeout(Some(WAIT)).expect("read timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        Client { stream, reader }
    }

    fn send(&mut self) {
        self.stream.write_all(b"hello\n").expect("send");
    }

    /// The backend's answer to a line sent earlier; `None` if the proxy closed the connection.
    fn answer(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(line.trim().to_owned()),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => None,
            Err(e) => panic!("reading an answer: {e}"),
        }
    }

    /// True if nothing arrives within `wait`.
    fn silent_for(&mut self, wait: Duration) -> bool {
        self.stream.set_read_timeout(Some(wait)).expect("timeout");
        let mut byte = [0u8; 1];
        let silent = matches!(
            self.reader.get_mut().read(&mut byte),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
        );
        self.stream.set_read_timeout(Some(WAIT)).expect("timeout");
        silent
    }
}

fn get(admin: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(admin).ok()?;
    stream.set_read_timeout(Some(WAIT)).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: steer\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

/// One service's counter from `GET /v1/proxy`.
fn counter(admin: SocketAddr, service: &str, name: &str) -> u64 {
    let response = get(admin, "/v1/proxy").expect("GET /v1/proxy");
    let body = response.split("\r\n\r\n").nth(1).expect("a body");
    let stats: serde_json::Value = serde_json::from_str(body).expect("JSON");
    stats
        .as_array()
        .and_then(|all| all.iter().find(|s| s["service"] == service))
        .and_then(|s| s[name].as_u64())
        .unwrap_or_else(|| panic!("{service}.{name} in {body}"))
}

/// Waits until the agent on `admin` proxies `service`.
fn wait_ready(admin: SocketAddr, service: &str) {
    let started = Instant::now();
    let name = format!("\"{service}\"");
    while get(admin, "/v1/proxy").is_none_or(|r| !r.contains(&name)) {
        assert!(started.elapsed() < WAIT, "steer did not come up");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Not root, no `--dataplane`: the agent warns, loads no BPF and proxies every connection.
#[test]
fn without_root_the_userspace_dataplane_is_chosen() {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let setpriv = std::path::Path::new("/usr/bin/setpriv");
    if !is_root || !setpriv.exists() {
        eprintln!("skipped: needs root and setpriv to run steer as another user");
        return;
    }
    let [a, b] = [backend("a", false), backend("b", false)];
    let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let vip = SocketAddr::from((Ipv4Addr::new(127, 0, 78, 1), free_port()));
    let id = std::process::id();
    // In /tmp itself: the agent runs as nobody and creates the token file there.
    let token = std::env::temp_dir().join(format!("steer-proxy-nobody-{id}.token"));
    let config = format!(
        "[agent]\ninterfaces = [\"lo\"]\nadmin_addr = \"{admin}\"\nadmin_token_file = {token:?}\n\n\
         [[service]]\nname = \"rr\"\n\
         address = \"{vip}\"\npolicy = \"round_robin\"\n[service.health]\nenabled = false\n\n\
         [[service.backend]]\naddress = \"{a}\"\n\n[[service.backend]]\naddress = \"{b}\"\n"
    );
    let path = std::env::temp_dir().join(format!("steer-proxy-nobody-{id}.toml"));
    std::fs::write(&path, config).expect("write the config");
    let log_path = std::env::temp_dir().join(format!("steer-proxy-nobody-{id}.log"));
    let log = std::fs::File::create(&log_path).expect("create the log");
    let agent = Agent(
        Command::new(setpriv)
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_steer"))
            .args(["run", "--config"])
            .arg(&path)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start steer"),
    );
    wait_ready(admin, "rr");
    let answers: Vec<String> = (0..2)
        .map(|_| {
            let mut client = Client::connect(vip);
            client.send();
            client.answer().expect("an answer")
        })
        .collect();
    assert_eq!(answers, ["a", "b"]);
    drop(agent);
    let log = std::fs::read_to_string(&log_path).expect("read the log");
    assert!(log.contains("not root"), "{log}");
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&log_path);
    let _ = std::fs::remove_file(&token);
}

#[test]
fn userspace_dataplane_balances_queues_and_closes_at_the_limits() {
    let [a, b, c, d, e, f] = [
        backend("a", false),
        backend("b", false),
        backend("c", false),
        backend("d", false),
        backend("e", false),
        backend("f", true),
    ];
    let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    // A VIP of its own on loopback, distinct per run.
    let vip_ip = Ipv4Addr::new(127, 0, 77, (std::process::id() % 250 + 1) as u8);
    let vip = |port: u16| SocketAddr::from((vip_ip, port));
    let [rr, cap, tight, slow] = [
        vip(free_port()),
        vip(free_port()),
        vip(free_port()),
        vip(free_port()),
    ];
    let service = |name: &str, vip: SocketAddr, extra: &str, backends: &[SocketAddr]| {
        let mut text = format!(
            "\n[[service]]\nname = \"{name}\"\naddress = \"{vip}\"\npolicy = \"round_robin\"\n{extra}\n\
             [service.health]\nenabled = false\n"
        );
        for backend in backends {
            text.push_str(&format!("\n[[service.backend]]\naddress = \"{backend}\"\n"));
        }
        text
    };
    let token = std::env::temp_dir().join(format!("steer-proxy-{}.token", std::process::id()));
    let config = format!(
        "[agent]\ninterfaces = [\"lo\"]\nadmin_addr = \"{admin}\"\nadmin_token_file = {token:?}\n{}{}{}{}",
        service("rr", rr, "", &[a, b]),
        service(
            "cap",
            cap,
            "max_connections_per_backend = 1\nqueue_size = 10",
            &[c, d]
        ),
        service(
            "tight",
            tight,
            "max_connections_per_backend = 1\nqueue_size = 1\nqueue_timeout = \"1s\"",
            &[e]
        ),
        service("slow", slow, "first_byte_timeout = \"1s\"", &[f]),
    );
    let path = std::env::temp_dir().join(format!("steer-proxy-{}.toml", std::process::id()));
    std::fs::write(&path, config).expect("write the config");
    let _agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_steer"))
            .args(["run", "--dataplane", "userspace", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .spawn()
            .expect("start steer"),
    );
    wait_ready(admin, "slow");

    // Balanced per policy: round robin alternates.
    let answers: Vec<String> = (0..4)
        .map(|_| {
            let mut client = Client::connect(rr);
            client.send();
            client.answer().expect("an answer")
        })
        .collect();
    assert_eq!(answers, ["a", "b", "a", "b"]);

    // Capacity 1 per backend: a burst of 5 fills both, queues 3 and drains them in order.
    let mut burst: Vec<Client> = (0..5)
        .map(|_| {
            let mut client = Client::connect(cap);
            client.send();
            // Accepted, and so queued, in this order.
            thread::sleep(Duration::from_millis(50));
            client
        })
        .collect();
    assert_eq!(burst[0].answer().as_deref(), Some("c"));
    assert_eq!(burst[1].answer().as_deref(), Some("d"));
    for waiting in &mut burst[2..] {
        assert!(waiting.silent_for(Duration::from_millis(200)), "queued");
    }
    assert_eq!(counter(admin, "cap", "queue_depth"), 3);
    let mut burst: Vec<Option<Client>> = burst.into_iter().map(Some).collect();
    for (done, next, backend) in [(0, 2, "c"), (1, 3, "d"), (2, 4, "c")] {
        drop(burst[done].take());
        let client = burst[next].as_mut().expect("still open");
        assert_eq!(client.answer().as_deref(), Some(backend), "client {next}");
    }
    assert_eq!(counter(admin, "cap", "queued"), 3);
    assert_eq!(counter(admin, "cap", "queue_depth"), 0);

    // queue_size 1: the 3rd client is closed at once, the 2nd after queue_timeout.
    let mut holder = Client::connect(tight);
    holder.send();
    assert_eq!(holder.answer().as_deref(), Some("e"));
    let mut waiter = Client::connect(tight);
    let queued = Instant::now();
    thread::sleep(Duration::from_millis(100));
    let mut refused = Client::connect(tight);
    assert_eq!(refused.answer(), None, "closed: the queue is full");
    assert!(queued.elapsed() < Duration::from_millis(900), "at once");
    assert_eq!(waiter.answer(), None, "closed: queue timeout");
    let waited = queued.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "after queue_timeout: {waited:?}"
    );
    assert_eq!(counter(admin, "tight", "queue_full"), 1);
    assert_eq!(counter(admin, "tight", "queue_timeout"), 1);

    // A backend silent for longer than first_byte_timeout: the client is closed.
    let mut client = Client::connect(slow);
    let sent = Instant::now();
    client.send();
    assert_eq!(client.answer(), None, "closed: first-byte timeout");
    let waited = sent.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "after first_byte_timeout: {waited:?}"
    );
    assert_eq!(counter(admin, "slow", "first_byte_timeout"), 1);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&token);
}
