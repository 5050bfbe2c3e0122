//! The fleet through etcd, measured: how long an etcd write takes to reach the backend table of
//! every agent, what one agent costs watching a large fleet, and how many etcd requests agents
//! make at rest. Real etcd (a 3-member cluster on loopback), real `steer run` agents (release
//! build by default: `STEER_BIN`), on loopback only.
//!
//! 1. Convergence: 3 balancer agents (service `chat`, health checks off so nothing but the fleet
//!    path is timed); `changes` times an instance record of a host that does not run an agent is
//!    put (added everywhere) and deleted (removed everywhere). For each change, the time from the
//!    put to the last of the three agents' `fleet backend added`/`gone` log lines (their own
//!    timestamps), beside the time to a plain etcd watch client in this process (the floor any
//!    watcher pays): ratio.
//! 2. Scale: one agent with 16 services watches 1,000 instance records (62 or 63 per service),
//!    put at once, then changed at 10 changes/s (drained and activated in turn) for `seconds`:
//!    time until all are backends, its CPU and memory at rest and under the changes, and the
//!    apply time of each change (put to its log line).
//! 3. At rest: etcd's own gRPC counters over `seconds` with the 3 agents idle: requests per
//!    second per agent, lease keep-alives apart.
//! 4. Two balancers of one fleet on one real llama-server: how slots and in-flight counts
//!    behave (each balancer counts its own; the server's own gauges are the shared truth).

#![expect(
    clippy::print_stdout,
    reason = "the benchmark's table is for a person to read"
)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use serde_json::{Value, json};
use tests::bench::{
    cpu_seconds, free_port, p50_p99, ratio, save_results, spawn_logged_here, status_kib, stop,
};
use tests::etcd::EtcdCluster;
use tests::llama::{llama_server_path, model_path};
use tests::netns::ChildGuard;
use tests::topology::steer_bin;

#[derive(Parser)]
#[command(about = "Fleet convergence, scale and etcd load at rest, with real etcd and agents")]
struct Args {
    /// Changes timed for convergence (each an add and a remove).
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// Seconds of 10 changes/s at scale, and of rest.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Results (JSON; the markdown beside it).
    #[arg(long, value_name = "FILE", default_value = "bench/results/etcd.json")]
    out: PathBuf,
    /// A smoke of every path (5 changes, 3 s): figures that mean nothing.
    #[arg(long)]
    quick: bool,
}

/// Bounds every wait for an agent or a change.
const WAIT: Duration = Duration::from_secs(60);

struct Agent {
    guard: ChildGuard,
    log: PathBuf,
    admin: SocketAddr,
    /// Each service's address, in the order given.
    vips: Vec<SocketAddr>,
}

/// How an agent gets its backends.
enum Backends<'a> {
    /// From the fleet at these endpoints, under this prefix.
    Fleet(&'a [String], &'a str),
    /// From its config file: (service, address) pairs.
    Configured(&'a [(String, String, String)]),
}

/// Starts a balancer agent named `host` in `dir` with `services` (health checks off), its
/// backends from `backends`; returns once it serves (and, in a fleet, is connected).
fn agent(dir: &Path, host: &str, backends: &Backends<'_>, services: &[String]) -> Agent {
    agent_with(
        dir,
        host,
        backends,
        services,
        "",
        "policy = \"round_robin\"\n",
    )
}

/// [`agent`] with `extra` config text at the end (an `[[instance]]`) and `policy` lines in
/// every service.
fn agent_with(
    dir: &Path,
    host: &str,
    backends: &Backends<'_>,
    services: &[String],
    extra: &str,
    policy: &str,
) -> Agent {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut config = format!(
        "[agent]\ninterfaces = [\"lo\"]\nadmin_addr = \"{admin}\"\nadmin_token_file = \"{host}.token\"\n\
         dataplane = \"userspace\"\n"
    );
    let mut vips = Vec::new();
    if let Backends::Fleet(endpoints, prefix) = backends {
        let endpoints: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
        config += &format!(
            "\n[fleet]\nendpoints = [{}]\nprefix = \"{prefix}\"\nhost = \"{host}\"\n\
             cache = \"{host}-fleet.json\"\n",
            endpoints.join(", ")
        );
    }
    for (n, name) in services.iter().enumerate() {
        // An address of its own each, so two services never share one.
        let vip = SocketAddr::from(([127, 77, 0, n as u8 + 1], free_port()));
        vips.push(vip);
        config += &format!(
            "\n[[service]]\nname = \"{name}\"\naddress = \"{vip}\"\nmode = \"http\"\n{policy}\
             [service.health]\nenabled = false\n"
        );
        if let Backends::Configured(list) = backends {
            for (_, _, address) in list.iter().filter(|(_, service, _)| service == name) {
                config +=
                    &format!("[[service.backend]]\naddress = \"{address}\"\nmodels = [\"m\"]\n");
            }
        }
    }
    config += extra;
    let path = dir.join(format!("{host}.toml"));
    std::fs::write(&path, config).expect("write the config");
    let log = dir.join(format!("{host}.log"));
    let args = [
        "run",
        "--log-format",
        "json",
        "--log-level",
        "warn,lb_userspace::fleet=info",
        "--config",
        path.to_str().expect("UTF-8"),
    ];
    let guard = spawn_logged_here(&steer_bin(), &args, &log);
    let agent = Agent {
        guard,
        log,
        admin,
        vips,
    };
    let deadline = Instant::now() + WAIT;
    let ready = || match backends {
        Backends::Fleet(..) => {
            get(agent.admin, "/v1/fleet").is_some_and(|f| f["connected"] == true)
        }
        Backends::Configured(_) => get(agent.admin, "/v1/services").is_some(),
    };
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "agent {host} not in the fleet:\n{}",
            read(&agent.log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    agent
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// GET `path` on `to` as JSON (None unless 200).
fn get(to: SocketAddr, path: &str) -> Option<Value> {
    let text = get_text(to, path)?;
    serde_json::from_str(&text).ok()
}

/// GET `path` on `to` on a new connection: the body of a 200.
fn get_text(to: SocketAddr, path: &str) -> Option<String> {
    let head = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    let (status, body) = exchange(to, &head, Duration::from_secs(10))?;
    (status == 200).then_some(body)
}

/// Sends `request` whole on a new connection to `to` and reads the answer to its end, within
/// `timeout` per read: (status, body).
fn exchange(to: SocketAddr, request: &str, timeout: Duration) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5)).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.get(9..12)?.parse().ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    Some((status, body.to_owned()))
}

/// Seconds since the epoch of an RFC 3339 UTC timestamp as the agent logs it
/// (`2026-12-07T01:08:51.436123Z`).
fn epoch_seconds(stamp: &str) -> Option<f64> {
    let (date, time) = stamp.strip_suffix('Z')?.split_once('T')?;
    let mut ymd = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, d) = (ymd.next()?.ok()?, ymd.next()?.ok()?, ymd.next()?.ok()?);
    let mut hms = time.split(':');
    let (h, min) = (
        hms.next()?.parse::<f64>().ok()?,
        hms.next()?.parse::<f64>().ok()?,
    );
    let s = hms.next()?.parse::<f64>().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s)
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Reads a log as it grows and finds the time of each fleet line by (message, address).
struct LogTail {
    path: PathBuf,
    offset: usize,
    seen: BTreeMap<(String, String), f64>,
}

impl LogTail {
    fn new(path: &Path) -> LogTail {
        LogTail {
            path: path.to_owned(),
            offset: read(path).len(),
            seen: BTreeMap::new(),
        }
    }

    fn poll(&mut self) {
        let text = read(&self.path);
        // Whole lines only: a line being written is read next time.
        let Some(end) = text[self.offset.min(text.len())..].rfind('\n') else {
            return;
        };
        let end = self.offset + end + 1;
        for line in text[self.offset..end].lines() {
            let Ok(line) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let fields = &line["fields"];
            let (Some(message), Some(address), Some(at)) = (
                fields["message"].as_str(),
                fields["address"].as_str(),
                line["timestamp"].as_str().and_then(epoch_seconds),
            ) else {
                continue;
            };
            self.seen
                .insert((message.to_owned(), address.to_owned()), at);
        }
        self.offset = end;
    }

    /// When `message` was logged for `address`, waiting for it (bounded by [`WAIT`]).
    fn wait(&mut self, message: &str, address: &str) -> f64 {
        let deadline = Instant::now() + WAIT;
        let key = (message.to_owned(), address.to_owned());
        loop {
            self.poll();
            if let Some(at) = self.seen.remove(&key) {
                return at;
            }
            assert!(
                Instant::now() < deadline,
                "no {message:?} for {address} in {}",
                self.path.display()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

fn record(service: &str, address: &str, state: &str) -> String {
    json!({"service": service, "address": address, "models": ["m"], "state": state}).to_string()
}

/// etcd's `grpc_server_msg_received_total` by method, summed over the members' `/metrics`.
fn etcd_requests(endpoints: &[String]) -> BTreeMap<String, f64> {
    let mut counts = BTreeMap::new();
    for endpoint in endpoints {
        let Ok(addr) = endpoint.parse::<SocketAddr>() else {
            continue;
        };
        // HTTP/1.0: etcd answers it unchunked, so the text parses line by line.
        let request = "GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n";
        let Some((_, text)) = exchange(addr, request, Duration::from_secs(10)) else {
            continue;
        };
        for line in text
            .lines()
            .filter(|l| l.starts_with("grpc_server_msg_received_total{"))
        {
            let method = line
                .split("grpc_method=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or_default();
            let value: f64 = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            *counts.entry(method.to_owned()).or_default() += value;
        }
    }
    counts
}

fn ms(seconds: f64) -> f64 {
    seconds * 1000.0
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    if args.quick {
        args.changes = 5;
        args.seconds = 3;
    }
    let dir = std::env::temp_dir().join(format!("steer-bench-etcd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let etcd = EtcdCluster::start(3);
    let endpoints = etcd.endpoints();
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let mut client = runtime
        .block_on(etcd_client::Client::connect(&endpoints, None))
        .expect("etcd client");
    let mut md = String::new();

    // 1. Convergence through 3 agents, beside a plain watch.
    let prefix = "/steer/fleet/bench";
    let chat = vec!["chat".to_owned()];
    let agents: Vec<Agent> = (1..=3)
        .map(|i| {
            agent(
                &dir,
                &format!("b{i}"),
                &Backends::Fleet(&endpoints, prefix),
                &chat,
            )
        })
        .collect();
    let mut tails: Vec<LogTail> = agents.iter().map(|a| LogTail::new(&a.log)).collect();
    let (mut watch_stream, mut add, mut remove, mut raw) = (
        runtime
            .block_on(client.watch(
                format!("{prefix}/instances/"),
                Some(etcd_client::WatchOptions::new().with_prefix()),
            ))
            .expect("watch"),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    // The records' host, registered as an agent would (an instance without its host's key is
    // not a backend).
    let host_record = r#"{"version":"bench","since":0}"#;
    runtime
        .block_on(client.put(format!("{prefix}/hosts/nohost"), host_record, None))
        .expect("put the host");
    for i in 0..args.changes {
        let address = format!("127.0.0.1:{}", 20_000 + i);
        let key = format!("{prefix}/instances/nohost/n{i}");
        for (put, times) in [(true, &mut add), (false, &mut remove)] {
            let sent = now();
            runtime
                .block_on(async {
                    if put {
                        client
                            .put(key.as_str(), record("chat", &address, "ready"), None)
                            .await
                            .map(drop)
                    } else {
                        client.delete(key.as_str(), None).await.map(drop)
                    }
                })
                .expect("etcd write");
            // The plain watcher's event, then every agent's line.
            runtime.block_on(async {
                let event = async {
                    while let Ok(Some(message)) = watch_stream.message().await {
                        if !message.events().is_empty() {
                            return;
                        }
                    }
                    panic!("the plain watch ended");
                };
                tokio::time::timeout(WAIT, event)
                    .await
                    .expect("the plain watch's event");
            });
            raw.push(now() - sent);
            let message = if put {
                "fleet backend added"
            } else {
                "fleet backend gone"
            };
            let last = tails
                .iter_mut()
                .map(|t| t.wait(message, &address))
                .fold(f64::MIN, f64::max);
            times.push(last - sent);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let (add50, add99) = p50_p99(&mut add);
    let (rm50, rm99) = p50_p99(&mut remove);
    let (raw50, raw99) = p50_p99(&mut raw);
    let _ = writeln!(
        md,
        "### Convergence: etcd write to the table of every agent (3 agents, {} changes each way)\n",
        args.changes
    );
    let _ = writeln!(
        md,
        "| change | Steer p50 ms | Steer p99 ms | plain etcd watch p50 ms | p99 ms | ratio p99 |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for (what, p50, p99) in [
        ("instance added", add50, add99),
        ("instance removed", rm50, rm99),
    ] {
        let _ = writeln!(
            md,
            "| {what} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} |",
            ms(p50),
            ms(p99),
            ms(raw50),
            ms(raw99),
            ratio(p99, raw99)
        );
    }

    // 3. At rest: the agents' etcd requests over `seconds`.
    let before = etcd_requests(&endpoints);
    let renewals_before: f64 = agents
        .iter()
        .map(|a| metric(a.admin, "steer_fleet_lease_renewals_total"))
        .sum();
    std::thread::sleep(Duration::from_secs(args.seconds));
    let after = etcd_requests(&endpoints);
    let renewals: f64 = agents
        .iter()
        .map(|a| metric(a.admin, "steer_fleet_lease_renewals_total"))
        .sum::<f64>()
        - renewals_before;
    let per_agent = |v: f64| v / 3.0 / args.seconds as f64;
    let mut rest = BTreeMap::new();
    for (method, count) in &after {
        let delta = count - before.get(method).copied().unwrap_or(0.0);
        if delta > 0.0 {
            rest.insert(method.clone(), per_agent(delta));
        }
    }
    let keep_alive = rest.get("LeaseKeepAlive").copied().unwrap_or(0.0);
    let others = rest
        .iter()
        .filter(|(m, _)| *m != "LeaseKeepAlive")
        .fold(0.0, |sum, (_, v)| sum + v);
    let _ = writeln!(
        md,
        "\n### At rest: etcd requests per second per agent ({} s, 3 agents)\n",
        args.seconds
    );
    let _ = writeln!(md, "| lease keep-alives | everything else | by method |");
    let _ = writeln!(md, "|---|---|---|");
    let _ = writeln!(
        md,
        "| {keep_alive:.2} (agents counted {:.2}) | {others:.3} | {rest:?} |",
        per_agent(renewals)
    );
    for agent in agents {
        stop(agent.guard, "agent");
    }

    // 2. One agent, 1,000 instances over 16 services, then 10 changes/s.
    let prefix = "/steer/fleet/scale";
    let services: Vec<String> = (0..16).map(|s| format!("s{s}")).collect();
    let instances: Vec<(String, String, String)> = (0..1000)
        .map(|i| {
            let service = format!("s{}", i % 16);
            let address = format!("127.0.{}.{}:8080", 1 + i / 250, 1 + i % 250);
            (
                format!("{prefix}/instances/sim{}/i{i}", i / 8),
                service,
                address,
            )
        })
        .collect();
    // The baseline: the same 1,000 backends from a config file, no fleet, at rest.
    let configured = agent(
        &dir,
        "configured",
        &Backends::Configured(&instances),
        &services,
    );
    std::thread::sleep(Duration::from_secs(2));
    let pid = configured.guard.id();
    let cpu = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(args.seconds));
    let cpu_configured = (cpu_seconds(pid) - cpu) / args.seconds as f64;
    let rss_configured = status_kib(pid, "VmRSS");
    stop(configured.guard, "agent");

    let scale = agent(
        &dir,
        "watcher",
        &Backends::Fleet(&endpoints, prefix),
        &services,
    );
    let pid = scale.guard.id();
    let mut tail = LogTail::new(&scale.log);
    let rss0 = status_kib(pid, "VmRSS");
    let loaded = Instant::now();
    runtime.block_on(async {
        for host in 0..instances.len().div_ceil(8) {
            let key = format!("{prefix}/hosts/sim{host}");
            client
                .put(key, r#"{"version":"bench","since":0}"#, None)
                .await
                .expect("put");
        }
        for (key, service, address) in &instances {
            client
                .put(key.as_str(), record(service, address, "ready"), None)
                .await
                .expect("put");
        }
    });
    let deadline = Instant::now() + WAIT * 2;
    while get(scale.admin, "/v1/fleet").is_none_or(|f| f["backends"] != 1000) {
        assert!(
            Instant::now() < deadline,
            "1,000 backends not programmed:\n{}",
            read(&scale.log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let load_time = loaded.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let (cpu1, rss1) = (cpu_seconds(pid), status_kib(pid, "VmRSS"));
    std::thread::sleep(Duration::from_secs(args.seconds));
    let cpu_rest = (cpu_seconds(pid) - cpu1) / args.seconds as f64;
    let mut applied = Vec::new();
    let start = Instant::now();
    let cpu2 = cpu_seconds(pid);
    // Pairs of changes, 5 pairs a second: an instance drained, then active again, so the
    // fleet stays as it was.
    for n in 0..args.seconds * 5 {
        let due = start + Duration::from_millis(200 * n);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let (key, service, address) = &instances[(n as usize * 37) % instances.len()];
        for state in ["draining", "ready"] {
            let sent = now();
            runtime
                .block_on(client.put(key.as_str(), record(service, address, state), None))
                .expect("put");
            applied.push(tail.wait("fleet backend state", address) - sent);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu_changes = (cpu_seconds(pid) - cpu2) / elapsed;
    let rss2 = status_kib(pid, "VmRSS");
    let (ap50, ap99) = p50_p99(&mut applied);
    let _ = writeln!(
        md,
        "\n### One agent watching 1,000 instances (16 services), then changes\n"
    );
    let _ = writeln!(
        md,
        "| all 1,000 programmed | RSS before / with 1,000 / after changes | CPU at rest | CPU at {:.0} changes/s | apply p50 ms | p99 ms |",
        applied.len() as f64 / elapsed
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    let _ = writeln!(
        md,
        "| {load_time:.2} s | {:.1} / {:.1} / {:.1} MiB | {:.2}% | {:.2}% | {:.2} | {:.2} |",
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        rss2 as f64 / 1024.0,
        cpu_rest * 100.0,
        cpu_changes * 100.0,
        ms(ap50),
        ms(ap99)
    );
    let _ = writeln!(
        md,
        "\nBaseline, the same 1,000 backends from a config file (no fleet), at rest: CPU {:.2}%, \
         RSS {:.1} MiB; the fleet agent at rest / configured: {:.2}x CPU.",
        cpu_configured * 100.0,
        rss_configured as f64 / 1024.0,
        ratio(cpu_rest, cpu_configured)
    );
    stop(scale.guard, "agent");
    let slots = shared_slots(&dir, &endpoints, &mut md);
    print!("{md}");
    let results = json!({
        "convergence_ms": {
            "added": {"p50": ms(add50), "p99": ms(add99)},
            "removed": {"p50": ms(rm50), "p99": ms(rm99)},
            "plain_watch": {"p50": ms(raw50), "p99": ms(raw99)},
        },
        "at_rest_per_agent_per_second": rest,
        "scale": {
            "load_seconds": load_time,
            "rss_kib": [rss0, rss1, rss2],
            "cpu_rest": cpu_rest,
            "cpu_changes": cpu_changes,
            "changes_per_second": applied.len() as f64 / elapsed,
            "apply_ms": {"p50": ms(ap50), "p99": ms(ap99)},
            "configured_baseline": {"cpu_rest": cpu_configured, "rss_kib": rss_configured},
        },
        "shared_slots": slots,
    });
    drop(etcd);
    let _ = std::fs::remove_dir_all(&dir);
    save_results("steer-bench-etcd", &args.out, &results, &md)
}

/// Part 4: two balancers of one fleet on one llama-server (2 slots, policy `slots` in both): four
/// requests through one balancer, then two through each, sampling the server's own
/// `requests_processing` and `requests_deferred` and each balancer's queue. Each balancer caps
/// its own requests; only the server sees them all.
fn shared_slots(dir: &Path, endpoints: &[String], md: &mut String) -> Value {
    let prefix = "/steer/fleet/slots";
    let port = free_port();
    let server = SocketAddr::from(([127, 0, 0, 1], port));
    let instance = format!(
        "\n[[instance]]\nname = \"gen\"\nbinary = {:?}\nmodel = {:?}\nport = {port}\n\
         service = \"gen\"\naddress = \"{server}\"\n\
         args = [\"--host\", \"127.0.0.1\", \"-np\", \"2\", \"-c\", \"2048\", \"-t\", \"1\", \"--metrics\"]\n\
         config_driver = {{ type = \"file\", path = {:?}, name = \"gen\" }}\n",
        llama_server_path().display().to_string(),
        model_path().display().to_string(),
        dir.join("gen-args.toml").display().to_string(),
    );
    let services = vec!["gen".to_owned()];
    let fleet = Backends::Fleet(endpoints, prefix);
    let slots = "policy = \"slots\"\n";
    let owner = agent_with(dir, "owner", &fleet, &services, &instance, slots);
    let other = agent_with(dir, "other", &fleet, &services, "", slots);
    let polled = |a: &Agent| {
        get(a.admin, "/v1/backends").is_some_and(|v| {
            v["backends"].as_array().is_some_and(|all| {
                all.iter().any(|b| {
                    b["address"] == server.to_string()
                        && b["healthy"] == true
                        && b["total_slots"] == 2
                })
            })
        })
    };
    let deadline = Instant::now() + WAIT;
    while !(polled(&owner) && polled(&other)) {
        assert!(
            Instant::now() < deadline,
            "the instance not polled by both:\n{}",
            read(&owner.log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let queued = |a: &Agent| {
        get(a.admin, "/v1/proxy")
            .and_then(|v| v.as_array()?.iter().find(|s| s["service"] == "gen")?["queued"].as_u64())
            .unwrap_or(0)
    };
    let (a, b) = (owner.vips[0], other.vips[0]);
    let mut rows = Vec::new();
    let _ = writeln!(
        md,
        "\n### Two balancers on one llama-server (2 slots, policy `slots` in both)\n"
    );
    let _ = writeln!(
        md,
        "| requests | at the server: most processing | most deferred (queued in llama-server) | queued in balancer 1 | in balancer 2 | answered |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for (what, targets) in [
        ("4 through balancer 1", [a, a, a, a]),
        ("2 through each balancer", [a, a, b, b]),
    ] {
        let before = (queued(&owner), queued(&other));
        let senders: Vec<_> = targets
            .iter()
            .map(|&vip| {
                std::thread::spawn(move || {
                    let body = r#"{"messages":[{"role":"user","content":"Count to fifty."}],"max_tokens":48}"#;
                    post(vip, "/v1/chat/completions", body) == Some(200)
                })
            })
            .collect();
        let (mut processing, mut deferred) = (0.0f64, 0.0f64);
        let deadline = Instant::now() + WAIT * 2;
        while senders.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            if let Some(text) = get_text(server, "/metrics") {
                processing = processing.max(sample(&text, "llamacpp:requests_processing"));
                deferred = deferred.max(sample(&text, "llamacpp:requests_deferred"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let answered = senders
            .into_iter()
            .filter_map(|t| t.join().ok())
            .filter(|ok| *ok)
            .count();
        let (q1, q2) = (queued(&owner) - before.0, queued(&other) - before.1);
        let _ = writeln!(
            md,
            "| {what} | {processing} | {deferred} | {q1} | {q2} | {answered} of 4 |"
        );
        rows.push(
            json!({"requests": what, "max_processing": processing, "max_deferred": deferred,
            "queued_1": q1, "queued_2": q2, "answered": answered}),
        );
    }
    stop(other.guard, "agent");
    stop(owner.guard, "agent");
    json!(rows)
}

/// A sample of `name` (no labels) in Prometheus text; 0 when missing.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// POST `body` (JSON) to `path` on `to` on a new connection; the status.
fn post(to: SocketAddr, path: &str, body: &str) -> Option<u16> {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    exchange(to, &request, WAIT).map(|(status, _)| status)
}

/// A sample of `name` (no labels) from the agent's `/metrics`; 0 when missing.
fn metric(admin: SocketAddr, name: &str) -> f64 {
    get_text(admin, "/metrics").map_or(0.0, |text| sample(&text, name))
}
