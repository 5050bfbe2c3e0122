//! The integration-test hosts: a client, the load balancer (where the agent runs) and N backends,
//! each a network namespace joined to the LB by one veth pair, plus a tiny HTTP/1.1 client.
//!
//! ```text
//!  client 10.201.0.2 ──veth── 10.201.0.1 LB 10.201.i.1 ──veth── 10.201.i.2 backend i (i = 1..=N)
//! ```
//!
//! The LB has `net.ipv4.ip_forward=0`, so only XDP can move packets between its veths, and static
//! permanent neighbours for the client and every backend (`bpf_fib_lookup` returns NO_NEIGH
//! otherwise). The client routes the VIP via the LB; backends use the LB as default route. Every
//! client and backend veth end gets GRO on and tx checksum offload off (DESIGN "veth pitfalls").
//! All addresses are inside namespaces created here.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

use crate::netns::{ChildGuard, NetNs};

/// Where backends listen inside their namespace.
pub const BACKEND_PORT: u16 = 8080;
/// The service address (VIP:port) the client connects to.
pub const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 201, 200, 100), 80);
/// The agent's admin API, on the LB namespace's own loopback.
pub const ADMIN_ADDR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9090);
/// The range the agent takes SNAT source ports from (set in the generated config).
pub const SNAT_PORTS: std::ops::RangeInclusive<u16> = 16384..=32767;
/// The client's address.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
/// The LB's address on the client link.
pub const LB_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);

/// Deterministic content for `/bytes/{n}`: byte `i` of every such body.
pub fn pattern_byte(i: u64) -> u8 {
    let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8 ^ (i as u8)
}

/// The first `len` bytes of the deterministic pattern.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len as u64).map(pattern_byte).collect()
}

/// Finds a binary built next to the running executable (`target/<profile>/NAME`), whether that
/// executable is a test in `target/<profile>/deps/` or a binary in `target/<profile>/`.
pub fn sibling_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe has a parent").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir.join(name)
}

/// The agent binary: `$STEER_BIN`, else `steer` next to the running executable.
pub fn steer_bin() -> PathBuf {
    let path = std::env::var_os("STEER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| sibling_binary("steer"));
    assert!(
        path.is_file(),
        "agent binary {} not found: build it with `cargo build -p lb-userspace` or set STEER_BIN",
        path.display()
    );
    path
}

/// One backend host.
#[derive(Debug)]
pub struct Backend {
    /// Name it answers `/whoami` with (`b1`, `b2`, ...).
    pub name: String,
    /// The HTTP server process; dropped before the namespace.
    server: Option<ChildGuard>,
    /// Its namespace.
    pub ns: NetNs,
    /// Where it listens (its own address).
    pub addr: SocketAddrV4,
    /// The LB's address on this backend's link: the source address NATed flows arrive from.
    pub lb_addr: Ipv4Addr,
    /// The LB-side interface of this backend's link.
    pub lb_if: String,
}

/// The running agent.
#[derive(Debug)]
pub struct Agent {
    child: ChildGuard,
    log: PathBuf,
}

impl Agent {
    /// Everything the agent wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Client + LB + backends. Dropping it stops the agent and backends, then deletes namespaces.
#[derive(Debug)]
pub struct Topology {
    /// The agent, once started.
    agent: Option<Agent>,
    /// Backend hosts, `b1` first.
    pub backends: Vec<Backend>,
    /// The load-balancer host.
    pub lb: NetNs,
    /// The client host.
    pub client: NetNs,
    /// LB-side interface facing the client.
    pub lb_client_if: String,
    /// Client-side interface.
    pub client_if: String,
    /// Scratch directory for the config and the agent's log.
    pub dir: PathBuf,
    policy: String,
    /// Replaces the backend hosts' `steer-test-backend`s as the service's configured backends.
    service_backends: Option<Vec<SocketAddrV4>>,
    /// Bodies of `[[instance]]` sections, each a backend of the service.
    instances: Vec<String>,
    /// More `[[service]]` tables, after the test service's.
    more_services: String,
    /// More `[[service]]` settings, one per line (e.g. `mode = "http"`).
    service_settings: String,
    /// More `[agent]` settings, one per line.
    agent_settings: String,
    /// The agent's `snat_ports`.
    snat_ports: std::ops::RangeInclusive<u16>,
    /// `RLIMIT_NOFILE` (soft, hard) the agent starts with, when not inherited.
    agent_open_files: Option<(u64, u64)>,
}

impl Topology {
    /// Builds client, LB and `backends` backend hosts, with interface names starting with `tag`
    /// (at most 8 characters) and namespaces named after `tag`; each backend runs
    /// `backend_bin` (the `steer-test-backend` binary). Waits until every backend answers
    /// `/whoami` from the LB namespace. `policy` goes into the generated agent config.
    pub fn new(tag: &str, policy: &str, backends: usize, backend_bin: &Path) -> Topology {
        assert!(tag.len() <= 8, "tag {tag:?} too long for interface names");
        assert!((1..=50).contains(&backends), "1..=50 backends");
        crate::netns::require_root("the veth + netns topology");
        let client = NetNs::new(&format!("{tag}-c"));
        let lb = NetNs::new(&format!("{tag}-lb"));
        let dir = std::env::temp_dir().join(lb.name());
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));

        let client_if = format!("{tag}-c");
        let lb_client_if = format!("{tag}-l0");
        lb.veth(&lb_client_if, &client, &client_if);
        lb.addr_add(&lb_client_if, &format!("{LB_CLIENT_SIDE}/24"));
        client.addr_add(&client_if, &format!("{CLIENT_ADDR}/24"));
        client.prepare_test_host_veth(&client_if);
        client.route_via(&format!("{}/32", VIP.ip()), &LB_CLIENT_SIDE.to_string());
        lb.sysctl("net.ipv4.ip_forward", "0");

        let mut topo = Topology {
            agent: None,
            backends: Vec::new(),
            lb,
            client,
            lb_client_if,
            client_if,
            dir,
            policy: policy.to_owned(),
            service_backends: None,
            instances: Vec::new(),
            more_services: String::new(),
            service_settings: String::new(),
            agent_settings: String::new(),
            snat_ports: SNAT_PORTS,
            agent_open_files: None,
        };
        let client_mac = topo.client.mac(&topo.client_if);
        topo.lb
            .neigh_permanent(&topo.lb_client_if, &CLIENT_ADDR.to_string(), &client_mac);
        let lb_mac = topo.lb.mac(&topo.lb_client_if);
        topo.client
            .neigh_permanent(&topo.client_if, &LB_CLIENT_SIDE.to_string(), &lb_mac);

        for i in 1..=backends {
            let octet = u8::try_from(i).expect("backend index fits u8");
            let name = format!("b{i}");
            let ns = NetNs::new(&format!("{tag}-{name}"));
            let lb_if = format!("{tag}-l{i}");
            let be_if = format!("{tag}-b");
            let lb_addr = Ipv4Addr::new(10, 201, octet, 1);
            let addr = Ipv4Addr::new(10, 201, octet, 2);
            topo.lb.veth(&lb_if, &ns, &be_if);
            topo.lb.addr_add(&lb_if, &format!("{lb_addr}/24"));
            ns.addr_add(&be_if, &format!("{addr}/24"));
            ns.prepare_test_host_veth(&be_if);
            ns.route_via("default", &lb_addr.to_string());
            let be_mac = ns.mac(&be_if);
            topo.lb.neigh_permanent(&lb_if, &addr.to_string(), &be_mac);
            let lb_mac = topo.lb.mac(&lb_if);
            ns.neigh_permanent(&be_if, &lb_addr.to_string(), &lb_mac);

            let log = std::fs::File::create(topo.dir.join(format!("{name}.log")))
                .expect("create backend log");
            let mut cmd = Command::new(backend_bin);
            cmd.args([
                "--name",
                &name,
                "--listen",
                &format!("0.0.0.0:{BACKEND_PORT}"),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
            let server = ns.spawn(cmd);
            topo.backends.push(Backend {
                name,
                server: Some(server),
                ns,
                addr: SocketAddrV4::new(addr, BACKEND_PORT),
                lb_addr,
                lb_if,
            });
        }
        for backend in &topo.backends {
            let target = backend.addr;
            let answer = topo.lb.block_on(|| async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    match HttpConn::connect(SocketAddr::V4(target)).await {
                        Ok(mut conn) => break conn.get("/whoami").await.text(),
                        Err(_) if Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("backend {target} not serving after 10 s: {e}"),
                    }
                }
            });
            assert!(
                answer.starts_with(&format!("{} {}:", backend.name, backend.lb_addr)),
                "backend {} answered {answer:?} to the LB namespace",
                backend.name
            );
        }
        topo
    }

    /// Backend by name (`b1`...).
    pub fn backend(&self, name: &str) -> &Backend {
        self.backends
            .iter()
            .find(|b| b.name == name)
            .unwrap_or_else(|| panic!("no backend {name}"))
    }

    /// The backend whose LB-side address is `ip` (the SNAT source a backend sees).
    pub fn backend_by_lb_addr(&self, ip: Ipv4Addr) -> Option<&Backend> {
        self.backends.iter().find(|b| b.lb_addr == ip)
    }

    /// The agent config this topology runs with.
    pub fn config(&self) -> String {
        let mut interfaces = vec![format!("{:?}", self.lb_client_if)];
        interfaces.extend(self.backends.iter().map(|b| format!("{:?}", b.lb_if)));
        let mut cfg = format!(
            "[agent]\ninterfaces = [{}]\nxdp_mode = \"native\"\nadmin_addr = \"{ADMIN_ADDR}\"\n\
             admin_token_file = {:?}\n\
             snat_ports = \"{}-{}\"\n{}\n[[service]]\nname = \"web\"\naddress = \"{VIP}\"\n\
             policy = \"{}\"\n{}\n[service.health]\ninterval = \"200ms\"\ntimeout = \"150ms\"\n",
            interfaces.join(", "),
            self.dir.join("admin.token").display().to_string(),
            self.snat_ports.start(),
            self.snat_ports.end(),
            self.agent_settings,
            self.policy,
            self.service_settings,
        );
        for addr in self.configured_backends() {
            let _ = write!(
                cfg,
                "\n[[service.backend]]\naddress = \"{addr}\"\nweight = 1\nmax_connections = 0\n"
            );
        }
        for body in &self.instances {
            let _ = write!(cfg, "\n[[instance]]\nservice = \"web\"\n{body}");
        }
        cfg.push_str(&self.more_services);
        cfg
    }

    /// The service's `[[service.backend]]` addresses: every backend host's unless replaced.
    fn configured_backends(&self) -> Vec<SocketAddrV4> {
        self.service_backends
            .clone()
            .unwrap_or_else(|| self.backends.iter().map(|b| b.addr).collect())
    }

    /// Makes `addrs` the service's configured backends instead of the backend hosts' servers
    /// (e.g. a llama-server a test runs in a backend namespace). Before [`Topology::start_agent`].
    pub fn set_service_backends(&mut self, addrs: Vec<SocketAddrV4>) {
        self.service_backends = Some(addrs);
    }

    /// Adds `lines` (e.g. `closed_flow_timeout = "5s"`) to the agent's settings. Before
    /// [`Topology::start_agent`].
    pub fn add_agent_settings(&mut self, lines: &str) {
        self.agent_settings.push_str(lines);
        self.agent_settings.push('\n');
    }

    /// Starts the agent with `RLIMIT_NOFILE` at `soft` and `hard` (as systemd's 1024 soft limit
    /// does) instead of the test's own. Before [`Topology::start_agent`].
    pub fn set_agent_open_files(&mut self, soft: u64, hard: u64) {
        self.agent_open_files = Some((soft, hard));
    }

    /// Waits up to `within` for the agent to exit (a signal sent by the test); its status, or
    /// `None` while it still runs.
    pub fn wait_agent(&mut self, within: Duration) -> Option<ExitStatus> {
        self.agent_mut().child.wait_timeout(within)
    }

    /// The running agent's pid.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|agent| agent.child.id())
    }

    /// The agent's `snat_ports` (default [`SNAT_PORTS`]). Before [`Topology::start_agent`].
    pub fn set_snat_ports(&mut self, ports: std::ops::RangeInclusive<u16>) {
        self.snat_ports = ports;
    }

    /// Adds `lines` (e.g. `mode = "http"`) to the service's settings. Before
    /// [`Topology::start_agent`].
    pub fn add_service_settings(&mut self, lines: &str) {
        self.service_settings.push_str(lines);
        self.service_settings.push('\n');
    }

    /// Adds `tables` (a `[[service]]` with its own sub-tables) after the test service. Before
    /// [`Topology::start_agent`].
    pub fn add_service(&mut self, tables: &str) {
        self.more_services.push('\n');
        self.more_services.push_str(tables);
    }

    /// Adds an `[[instance]]` section with `body` (name, binary, model, port, ...) that serves
    /// the service: a llama-server the agent supervises as a local backend. Before
    /// [`Topology::start_agent`], which then waits for its backend to be listed too.
    pub fn add_instance(&mut self, body: &str) {
        self.instances.push(body.to_owned());
    }

    /// Gives the client `n` more addresses (10.201.0.10 on), each known to the LB as a neighbour,
    /// so a test can be many clients from one namespace.
    pub fn add_client_addresses(&self, n: u8) -> Vec<Ipv4Addr> {
        assert!(n <= 200, "at most 200 extra client addresses");
        let mac = self.client.mac(&self.client_if);
        (0..n)
            .map(|i| {
                let addr = Ipv4Addr::new(10, 201, 0, 10 + i);
                self.client.addr_add(&self.client_if, &format!("{addr}/24"));
                self.lb
                    .neigh_permanent(&self.lb_client_if, &addr.to_string(), &mac);
                addr
            })
            .collect()
    }

    /// Deletes the LB's neighbour entries for every backend, as on a host that never talked to
    /// them, so the agent has to get them resolved.
    pub fn forget_backend_neighbours(&self) {
        for backend in &self.backends {
            let addr = backend.addr.ip().to_string();
            self.lb.ip(&["neigh", "del", &addr, "dev", &backend.lb_if]);
        }
        let left = self.lb.ip(&["neigh", "show", "nud", "permanent"]);
        for backend in &self.backends {
            let addr = backend.addr.ip().to_string();
            assert!(
                !left.contains(&format!("{addr} ")),
                "neighbour {addr} still there: {left}"
            );
        }
    }

    /// Writes the config, starts `steer run` inside the LB namespace (again after
    /// [`Topology::stop_agent`], as a restart) and waits (at most 30 s)
    /// until `GET /v1/backends` lists every backend (configured ones and instances). Panics with
    /// the agent's log otherwise.
    pub fn start_agent(&mut self) {
        assert!(
            self.agent
                .as_mut()
                .is_none_or(|a| a.child.try_wait().is_some()),
            "agent already running"
        );
        let config = self.dir.join("steer.toml");
        std::fs::write(&config, self.config()).expect("write steer.toml");
        crate::admin::token_file(&self.dir);
        let log = self.dir.join("steer.log");
        let out = std::fs::File::create(&log).expect("create steer.log");
        let mut cmd = Command::new(steer_bin());
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .args(["--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup log"))
            .stderr(out);
        if let Some((soft, hard)) = self.agent_open_files {
            use std::os::unix::process::CommandExt;
            // SAFETY: the closure only calls setrlimit(2), which is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sys::resource::setrlimit(
                        nix::sys::resource::Resource::RLIMIT_NOFILE,
                        soft,
                        hard,
                    )
                    .map_err(std::io::Error::from)
                });
            }
        }
        let child = self.lb.spawn(cmd);
        self.agent = Some(Agent { child, log });

        let expected = self.configured_backends().len()
            + self.instances.len()
            + self.more_services.matches("[[service.backend]]").count();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.agent_mut().child.try_wait() {
                panic!(
                    "agent exited with {status} before serving; log:\n{}",
                    self.agent_log()
                );
            }
            // Every configured backend checked once: none still `unknown` (instances come up
            // on their own time).
            if let Ok(v) = self.try_admin("GET", "/v1/backends", None)
                && let Some(listed) = v["backends"].as_array()
                && listed.len() == expected
                && listed
                    .iter()
                    .all(|b| !b["instance"].is_null() || b["status"] != "unknown")
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready after 30 s (GET /v1/backends); log:\n{}",
                self.agent_log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn agent_mut(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("agent not started")
    }

    /// The agent's log so far (empty before it started).
    pub fn agent_log(&self) -> String {
        self.agent.as_ref().map(Agent::log).unwrap_or_default()
    }

    /// Where the agent's log is, to read from another thread or namespace.
    pub fn agent_log_path(&self) -> PathBuf {
        self.agent
            .as_ref()
            .map(|a| a.log.clone())
            .expect("agent not started")
    }

    /// Sends `signal` to the agent and waits up to 10 s for it to exit; returns its status.
    pub fn stop_agent(&mut self, signal: Signal) -> ExitStatus {
        let status = self
            .agent_mut()
            .child
            .signal_and_wait(signal, Duration::from_secs(10));
        status.unwrap_or_else(|| {
            panic!(
                "agent still running 10 s after {signal}; log:\n{}",
                self.agent_log()
            )
        })
    }

    /// One admin API call inside the LB namespace, with the token; `Err` on connection or HTTP
    /// failure.
    pub fn try_admin(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, String> {
        let body = body.map(|b| b.to_string().into_bytes());
        let method = method.to_owned();
        let path = path.to_owned();
        self.lb.block_on(|| async move {
            let mut conn = HttpConn::connect(SocketAddr::V4(ADMIN_ADDR))
                .await
                .map_err(|e| format!("connect {ADMIN_ADDR}: {e}"))?
                .with_token(crate::admin::TOKEN);
            let resp = conn
                .try_request(&method, &path, body.as_deref())
                .await
                .map_err(|e| format!("{method} {path}: {e}"))?;
            if !(200..300).contains(&resp.status) {
                return Err(format!(
                    "{method} {path}: HTTP {}: {}",
                    resp.status,
                    resp.text()
                ));
            }
            if resp.body.is_empty() {
                return Ok(serde_json::Value::Null);
            }
            serde_json::from_slice(&resp.body)
                .map_err(|e| format!("{method} {path}: bad JSON ({e}): {}", resp.text()))
        })
    }

    /// Like [`Topology::try_admin`], panicking (with the agent's log) on error.
    pub fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> serde_json::Value {
        self.try_admin(method, path, body)
            .unwrap_or_else(|e| panic!("admin API: {e}; agent log:\n{}", self.agent_log()))
    }

    /// `GET /metrics` from the admin API, parsed (see [`crate::metrics`]).
    pub fn metrics(&self) -> prometheus_parse::Scrape {
        let text = self.lb.block_on(|| async {
            let mut conn = HttpConn::connect(SocketAddr::V4(ADMIN_ADDR))
                .await
                .unwrap_or_else(|e| panic!("connect {ADMIN_ADDR}: {e}"));
            conn.get("/metrics").await.text()
        });
        crate::metrics::parse(&text)
    }

    /// `GET /v1/backends` as a list.
    pub fn backends_view(&self) -> Vec<serde_json::Value> {
        self.admin("GET", "/v1/backends", None)["backends"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("GET /v1/backends has no backends array"))
    }

    /// The API entry of the backend listening on `addr`, if listed.
    pub fn backend_view(&self, addr: SocketAddrV4) -> Option<serde_json::Value> {
        let want = addr.to_string();
        self.backends_view()
            .into_iter()
            .find(|b| b["address"].as_str() == Some(want.as_str()))
    }

    /// Polls `GET /v1/backends` (every 50 ms, at most `within`) until `active_connections` of
    /// the backend on `addr` equals `want`; panics with the last value otherwise.
    pub fn wait_active_connections(&self, addr: SocketAddrV4, want: u64, within: Duration) {
        self.wait_backend_field(addr, "active_connections", &want.into(), within);
    }

    /// Like [`Topology::wait_active_connections`], until the backend's `status` is `want`
    /// (`healthy`: it takes connections; a backend added with health checks on is `unknown`
    /// until its first check passes).
    pub fn wait_status(&self, addr: SocketAddrV4, want: &str, within: Duration) {
        self.wait_backend_field(addr, "status", &want.into(), within);
    }

    fn wait_backend_field(
        &self,
        addr: SocketAddrV4,
        field: &str,
        want: &serde_json::Value,
        within: Duration,
    ) {
        let deadline = Instant::now() + within;
        loop {
            let got = self.backend_view(addr).map(|b| b[field].clone());
            if got.as_ref() == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "backend {addr}: {field} {got:?}, want {want} (waited {within:?})"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Parses a `/whoami` answer seen through the LB and checks that it is full NAT: the peer is
    /// the LB's own address on that backend's link with a port in [`SNAT_PORTS`]. Returns
    /// (backend name, peer address).
    pub fn check_whoami(&self, answer: &str) -> (String, SocketAddrV4) {
        let (name, peer) = answer
            .trim()
            .split_once(' ')
            .unwrap_or_else(|| panic!("bad /whoami answer {answer:?}"));
        let peer: SocketAddrV4 = peer
            .parse()
            .unwrap_or_else(|e| panic!("bad peer in /whoami answer {answer:?}: {e}"));
        let backend = self.backend(name);
        assert_eq!(
            *peer.ip(),
            backend.lb_addr,
            "{name} saw the connection from {peer}, not from the LB's address on its link"
        );
        assert!(
            self.snat_ports.contains(&peer.port()),
            "{name} saw source port {} outside {:?}",
            peer.port(),
            self.snat_ports
        );
        (name.to_owned(), peer)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Children first (the agent detaches XDP on SIGTERM; on drop it is killed), namespaces
        // follow with the fields.
        if let Some(mut agent) = self.agent.take() {
            if thread::panicking() {
                eprintln!("--- agent log ---\n{}\n---", agent.log());
            }
            let _ = agent
                .child
                .signal_and_wait(Signal::SIGTERM, Duration::from_secs(5));
        }
        for b in &mut self.backends {
            b.server.take();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An HTTP response: status and body.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// The whole body.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A bound on every read and write; above the instance test's 20 s drain timeout plus a restart,
/// since an admin POST of new arguments answers only once they are applied.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// One keep-alive HTTP/1.1 client connection (bodies with Content-Length or chunked).
#[derive(Debug)]
pub struct HttpConn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Sent as `Authorization: Bearer` with every request (see [`HttpConn::with_token`]).
    token: Option<String>,
}

impl HttpConn {
    /// Connects within 10 s.
    pub async fn connect(addr: SocketAddr) -> std::io::Result<HttpConn> {
        Self::connect_from(None, addr).await
    }

    /// Connects within 10 s, from source address `from` when given.
    pub async fn connect_from(
        from: Option<Ipv4Addr>,
        addr: SocketAddr,
    ) -> std::io::Result<HttpConn> {
        Self::connect_bound(from.map(|ip| SocketAddrV4::new(ip, 0)), addr).await
    }

    /// Connects within 10 s from `from` (address and port; port 0: any) when given. The port may
    /// be one a closed connection of this host used just before (`SO_REUSEADDR`).
    pub async fn connect_bound(
        from: Option<SocketAddrV4>,
        addr: SocketAddr,
    ) -> std::io::Result<HttpConn> {
        let connect = async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            if let Some(from) = from {
                socket.set_reuseaddr(true)?;
                socket.bind(SocketAddr::V4(from))?;
            }
            socket.connect(addr).await
        };
        let stream = timeout(Duration::from_secs(10), connect)
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        stream.set_nodelay(true)?;
        Ok(HttpConn {
            stream,
            buf: Vec::new(),
            token: None,
        })
    }

    /// Sends `token` as `Authorization: Bearer` with every request from now on (the admin API
    /// needs it for changes; see [`crate::admin`]).
    pub fn with_token(mut self, token: &str) -> HttpConn {
        self.token = Some(token.to_owned());
        self
    }

    /// Ends the connection with a reset (`SO_LINGER` 0), leaving this host no TIME_WAIT.
    pub fn reset(self) {
        self.stream
            .set_zero_linger()
            .expect("SO_LINGER on a connected socket");
    }

    /// Our end of the connection.
    pub fn local_addr(&self) -> SocketAddr {
        self.stream.local_addr().expect("local_addr")
    }

    /// `GET path`, panicking on failure or a non-200 status.
    pub async fn get(&mut self, path: &str) -> Response {
        self.request_ok("GET", path, None).await
    }

    /// A request that must answer 200.
    pub async fn request_ok(&mut self, method: &str, path: &str, body: Option<&[u8]>) -> Response {
        let resp = self
            .try_request(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path} via {}: {e}", self.local_addr()));
        assert_eq!(resp.status, 200, "{method} {path}: {}", resp.text());
        resp
    }

    /// Sends one request and reads the response, each step within 20 s.
    pub async fn try_request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> std::io::Result<Response> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: steer-test\r\n");
        if let Some(token) = &self.token {
            let _ = write!(head, "Authorization: Bearer {token}\r\n");
        }
        if let Some(body) = body {
            let _ = write!(
                head,
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            );
        }
        head.push_str("\r\n");
        let write = async {
            self.stream.write_all(head.as_bytes()).await?;
            if let Some(body) = body {
                self.stream.write_all(body).await?;
            }
            self.stream.flush().await
        };
        timeout(IO_TIMEOUT, write)
            .await
            .map_err(|_| timed_out("write"))??;
        timeout(IO_TIMEOUT, self.read_response())
            .await
            .map_err(|_| timed_out("read"))?
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        // Read straight into the heap buffer: a stack array would make every request future
        // (and 1,000 of them) that much bigger.
        self.buf.reserve(64 * 1024);
        let n = self.stream.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed mid-response",
            ));
        }
        Ok(())
    }

    async fn read_line(&mut self) -> std::io::Result<String> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..pos]).into_owned();
                self.buf.drain(..pos + 2);
                return Ok(line);
            }
            self.fill().await?;
        }
    }

    async fn read_exact_body(&mut self, len: usize) -> std::io::Result<Vec<u8>> {
        while self.buf.len() < len {
            self.fill().await?;
        }
        Ok(self.buf.drain(..len).collect())
    }

    async fn read_response(&mut self) -> std::io::Result<Response> {
        let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
        let status_line = self.read_line().await?;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
        let mut length = None;
        let mut chunked = false;
        loop {
            let line = self.read_line().await?;
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = Some(
                        value
                            .parse::<usize>()
                            .map_err(|_| bad(format!("bad {line:?}")))?,
                    );
                } else if name.eq_ignore_ascii_case("transfer-encoding")
                    && value.eq_ignore_ascii_case("chunked")
                {
                    chunked = true;
                }
            }
        }
        let body = if chunked {
            let mut body = Vec::new();
            loop {
                let size_line = self.read_line().await?;
                let size =
                    usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| bad(format!("bad chunk size {size_line:?}")))?;
                if size == 0 {
                    // Trailers end with an empty line.
                    while !self.read_line().await?.is_empty() {}
                    break;
                }
                body.extend(self.read_exact_body(size).await?);
                self.read_line().await?;
            }
            body
        } else {
            self.read_exact_body(length.unwrap_or(0)).await?
        };
        Ok(Response { status, body })
    }
}

fn timed_out(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{what} timed out"))
}
