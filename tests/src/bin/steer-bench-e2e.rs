//! `cargo xtask bench`: end to end on network namespaces, Steer's XDP and userspace paths against
//! direct forwarding, HAProxy and nginx, and the agent's own cost.
//!
//! One topology for every case ([`Topology`]): a client namespace, the LB namespace and two
//! backend namespaces running `steer-test-backend`. Figures, each for a bounded time, all from
//! the client namespace:
//! - new connections/s: Debian's `wrk` with `Connection: close` (one request per TCP connection)
//!   on `GET /whoami`;
//! - keep-alive requests/s: `wrk` on long-lived connections;
//! - latency at a fixed offered load: this file's open-loop client ([`fixed_rate`]) starts
//!   `GET /whoami` on schedule whatever the answers (wrk2 is not in Debian), once on keep-alive
//!   connections and once with a new connection per request (so the handshake through the load
//!   balancer counts);
//! - bulk: `wrk` downloading `GET /bytes/1048576` on 4 connections, bytes per second.
//!
//! The new-connection run comes last in each case (see [`measure`]).
//!
//! Cases, in this order on the same hosts:
//! - `direct`: the client to both backends at their own addresses (load split between them)
//!   through the LB namespace with kernel forwarding on and no XDP (the limit);
//! - `steer-xdp`: the agent with XDP on the LB's veths, forwarding off, client to the VIP;
//! - `steer-userspace-l4`: the agent with `--dataplane userspace` (no BPF): its proxy listens on
//!   the VIP and splices TCP;
//! - `steer-userspace-http`: the same with the service's `mode = "http"`, when this agent
//!   accepts that mode (a row saying it was skipped otherwise);
//! - `haproxy-tcp` / `haproxy-http`: HAProxy in `mode tcp` / `mode http` on the VIP (nbthread 2,
//!   maxconn, balance roundrobin), forwarding off;
//! - `nginx`: nginx `stream` proxy on the VIP (2 workers, round robin), forwarding off.
//!
//! For both Steer agents also: idle CPU and resident memory (before the load), resident memory
//! after it, CPU under it, and the kernel memory of the agent's BPF maps.
//!
//! Prints markdown tables (every figure also as a ratio to direct), writes JSON (`--out`, the
//! tables beside it) and PNG plots (`--plots`). Every process is stopped and every namespace
//! deleted on the way out (the harness guards).

#![expect(
    clippy::print_stdout,
    reason = "the benchmark's tables are for a person to read"
)]

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    thread,
    time::{Duration, Instant},
};

use clap::Parser;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tests::{
    bench::{
        Fixed, MAX_OUTSTANDING, RunArgs, Scale, Series, bar_chart, fixed_rate, ratio, replace_once,
        save_results, spawn_agent, spawn_logged, status_kib, stop,
    },
    netns::{self, NetNs},
    topology::{HttpConn, LB_CLIENT_SIDE, Topology, VIP, sibling_binary, steer_bin},
};

#[derive(Parser)]
#[command(about = "End to end through Steer (XDP, userspace), HAProxy and nginx vs direct")]
struct Args {
    #[command(flatten)]
    run: RunArgs,
    /// Where to draw the PNG plots.
    #[arg(long, value_name = "DIR")]
    plots: Option<PathBuf>,
}

/// Concurrent connections wrk keeps open.
const CONNECTIONS: u32 = 32;
/// wrk threads (the VM has 2 cores, shared with everything else).
const WRK_THREADS: u32 = 2;
/// The request of every figure but bulk: a few bytes each way.
const PATH: &str = "/whoami";
/// The bulk download: 1 MiB bodies on a few connections.
const BULK_PATH: &str = "/bytes/1048576";
const BULK_CONNECTIONS: u32 = 4;
/// Fixed offered loads, well below every path's capacity on this VM.
const KEEPALIVE_RATE: f64 = 2000.0;
const NEW_CONN_RATE: f64 = 1000.0;

/// What one wrk run measured.
#[derive(Debug, Clone, Copy, Default)]
struct Wrk {
    requests_per_s: f64,
    /// wrk's `Transfer/sec` (response bytes, headers included).
    bytes_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Socket errors plus non-2xx answers.
    errors: u64,
}

/// The agent's cost beside its case.
#[derive(Debug, Clone, Copy, Default)]
struct AgentCost {
    idle_cpu_cores: f64,
    idle_rss_kib: u64,
    loaded_rss_kib: u64,
    /// Peak resident memory over the whole run (`VmHWM`).
    hwm_kib: u64,
    bpf_maps: u64,
    /// Sum of the maps' `memlock` (kernel memory charged for them).
    bpf_map_bytes: u64,
}

/// One case's figures.
struct Case {
    name: &'static str,
    what: String,
    new_conn: Wrk,
    /// SYNs the client retransmitted during the new-connections run (`TcpExtTCPSynRetrans`).
    syn_retrans: u64,
    keepalive: Wrk,
    fixed_keepalive: Fixed,
    fixed_new: Fixed,
    bulk: Wrk,
    /// The load balancer process's CPU over the new-connections and keep-alive runs, in cores
    /// (CPU seconds per second; 2 is the whole VM). None for direct.
    lb_cpu: (Option<f64>, Option<f64>),
    agent: Option<AgentCost>,
}

/// A case that did not run, and why.
struct Skipped {
    name: &'static str,
    why: String,
}

/// The client's `TcpExt: TCPSynRetrans` counter (from `/proc/net/netstat` in its namespace).
fn syn_retrans(client: &NetNs) -> u64 {
    let out = client.exec(&["cat", "/proc/net/netstat"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        panic!("no TcpExt in /proc/net/netstat: {text}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "TCPSynRetrans")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no TCPSynRetrans in /proc/net/netstat: {text}"))
}

/// Runs wrk in the client namespace for `secs` against `url`; panics with wrk's output when it
/// fails or prints no rate.
fn wrk(client: &NetNs, url: &str, close: bool, secs: u32, threads: u32, conns: u32) -> Wrk {
    let mut args: Vec<String> = [
        "wrk",
        "-t",
        &threads.to_string(),
        "-c",
        &conns.to_string(),
        "-d",
        &format!("{secs}s"),
        "--timeout",
        "2s",
        "--latency",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    if close {
        args.extend(["-H".to_owned(), "Connection: close".to_owned()]);
    }
    args.push(url.to_owned());
    let out = client.exec(&args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "wrk {url} failed ({}): {}{}",
        out.status,
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    parse_wrk(&text).unwrap_or_else(|| panic!("no Requests/sec in wrk's output:\n{text}"))
}

/// A wrk latency like `1.23ms`, `850.00us` or `1.02s`, in milliseconds.
fn parse_latency(s: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e3)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

/// A wrk byte count like `1.05GB`, `812.33KB` or `120B` (powers of 1024).
fn parse_bytes(s: &str) -> Option<f64> {
    let units = [("TB", 4), ("GB", 3), ("MB", 2), ("KB", 1), ("B", 0)];
    units.iter().find_map(|&(unit, power)| {
        let n = s.strip_suffix(unit)?;
        n.parse::<f64>().ok().map(|v| v * 1024f64.powi(power))
    })
}

fn parse_wrk(text: &str) -> Option<Wrk> {
    let mut w = Wrk::default();
    let mut rate = None;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => rate = v.parse::<f64>().ok(),
            ["Transfer/sec:", v] => w.bytes_per_s = parse_bytes(v).unwrap_or(f64::NAN),
            ["50%", v] => w.p50_ms = parse_latency(v).unwrap_or(f64::NAN),
            ["99%", v] => w.p99_ms = parse_latency(v).unwrap_or(f64::NAN),
            ["Non-2xx", "or", "3xx", "responses:", n] => w.errors += n.parse::<u64>().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                // "connect 0, read 0, write 0, timeout 0"
                for pair in rest.chunks(2) {
                    if let [_, n] = pair {
                        w.errors += n.trim_end_matches(',').parse::<u64>().unwrap_or(0);
                    }
                }
            }
            _ => {}
        }
    }
    w.requests_per_s = rate?;
    Some(w)
}

/// One figure over `urls` at once, `conns` connections and the threads split between them (one
/// wrk each): rates summed, latency the worst of the runs'.
fn wrk_all(client: &NetNs, urls: &[String], close: bool, secs: u32, conns: u32) -> Wrk {
    let n = u32::try_from(urls.len()).expect("a few URLs");
    let threads = (WRK_THREADS / n).max(1);
    let conns = (conns / n).max(threads);
    let runs: Vec<Wrk> = thread::scope(|scope| {
        let handles: Vec<_> = urls
            .iter()
            .map(|url| scope.spawn(move || wrk(client, url, close, secs, threads, conns)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    runs.iter().fold(Wrk::default(), |acc, w| Wrk {
        requests_per_s: acc.requests_per_s + w.requests_per_s,
        bytes_per_s: acc.bytes_per_s + w.bytes_per_s,
        p50_ms: acc.p50_ms.max(w.p50_ms),
        p99_ms: acc.p99_ms.max(w.p99_ms),
        errors: acc.errors + w.errors,
    })
}

/// Every figure of a case, for `targets` (loaded at once); a short keep-alive warm-up first
/// (ARP, caches, the proxy's pools). The wrk new-connection run comes last: through XDP it can
/// use up the SNAT ports (each held up to 62 s after a backend-first close), and the runs after
/// it would then measure the proxy the kernel passes SYNs to, not the XDP path. The fixed-rate
/// runs connect from `from`, an address no earlier run used: the wrk runs leave thousands of
/// closed connections in TIME_WAIT (at the side that closed first), and a new SYN that reuses
/// such a tuple can wait a 1 s retransmit; that is the client's port reuse, not the load
/// balancer. `lb_pid` is the load balancer's process (the agent or the proxy), whose CPU time
/// (with its children's, e.g. nginx's workers) is measured over the keep-alive and
/// new-connection runs.
fn measure(
    client: &NetNs,
    from: Ipv4Addr,
    name: &'static str,
    what: &str,
    targets: &[SocketAddrV4],
    secs: u32,
    lb_pid: Option<u32>,
) -> Case {
    let urls: Vec<String> = targets
        .iter()
        .map(|a| format!("http://{a}{PATH}"))
        .collect();
    let bulk: Vec<String> = targets
        .iter()
        .map(|a| format!("http://{a}{BULK_PATH}"))
        .collect();
    eprintln!("steer-bench-e2e: {name}: {}", urls.join(" "));
    let cpu = || lb_pid.map_or(0.0, cpu_seconds);
    // A smoke run (1 s figures) skips the warm-up.
    if secs > 1 {
        wrk_all(client, &urls, false, 1, CONNECTIONS);
    }
    let keepalive_cpu = cpu();
    let keepalive = wrk_all(client, &urls, false, secs, CONNECTIONS);
    let keepalive_cpu = cpu() - keepalive_cpu;
    let fixed_keepalive = client
        .block_on(|| async { fixed_rate(from, targets, PATH, KEEPALIVE_RATE, secs, false).await });
    let retrans_before = syn_retrans(client);
    let mut fixed_new = client
        .block_on(|| async { fixed_rate(from, targets, PATH, NEW_CONN_RATE, secs, true).await });
    fixed_new.syn_retrans = syn_retrans(client).saturating_sub(retrans_before);
    let bulk = wrk_all(client, &bulk, false, secs, BULK_CONNECTIONS);
    let before = (syn_retrans(client), cpu());
    let new_conn = wrk_all(client, &urls, true, secs, CONNECTIONS);
    let new_conn_retrans = syn_retrans(client).saturating_sub(before.0);
    let new_conn_cpu = cpu() - before.1;
    let share = |cpu_s: f64| lb_pid.map(|_| cpu_s / f64::from(secs));
    Case {
        name,
        what: what.to_owned(),
        new_conn,
        syn_retrans: new_conn_retrans,
        keepalive,
        fixed_keepalive,
        fixed_new,
        bulk,
        lb_cpu: (share(new_conn_cpu), share(keepalive_cpu)),
        agent: None,
    }
}

/// User + system CPU seconds of `pid` and its direct children, from `/proc` (0 when gone).
fn cpu_seconds(pid: u32) -> f64 {
    // utime and stime are fields 14 and 15, counted after the ")" that ends the command name.
    let read = |path: &Path| -> Option<(u32, f64)> {
        let stat = std::fs::read_to_string(path).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ppid = fields.get(1)?.parse().ok()?;
        let ticks: f64 =
            fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Some((ppid, ticks / hz))
    };
    let mut total = read(Path::new(&format!("/proc/{pid}/stat"))).map_or(0.0, |(_, s)| s);
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            if let Some((ppid, s)) = read(&entry.path().join("stat"))
                && ppid == pid
            {
                total += s;
            }
        }
    }
    total
}

/// The BPF maps `pid` holds open (counted once each, by map id) and the sum of their `memlock`,
/// from `/proc/<pid>/fdinfo`.
fn bpf_maps(pid: u32) -> (u64, u64) {
    let mut maps = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) {
        for entry in entries.flatten() {
            let Ok(info) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            let field = |name: &str| {
                info.lines().find_map(|l| {
                    l.strip_prefix(name)?
                        .strip_prefix(':')?
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
            };
            if let (Some(id), Some(memlock)) = (field("map_id"), field("memlock")) {
                maps.insert(id, memlock);
            }
        }
    }
    (maps.len() as u64, maps.values().sum())
}

/// The agent's idle cost: CPU over `secs` of no traffic, resident memory, its BPF maps.
fn agent_idle(pid: u32, secs: u32) -> AgentCost {
    let before = cpu_seconds(pid);
    thread::sleep(Duration::from_secs(u64::from(secs)));
    let (bpf_maps, bpf_map_bytes) = bpf_maps(pid);
    AgentCost {
        idle_cpu_cores: (cpu_seconds(pid) - before) / f64::from(secs),
        idle_rss_kib: status_kib(pid, "VmRSS"),
        bpf_maps,
        bpf_map_bytes,
        ..AgentCost::default()
    }
}

/// Adds the after-load memory figures to `case`'s agent cost.
fn agent_loaded(mut idle: AgentCost, pid: u32) -> AgentCost {
    idle.loaded_rss_kib = status_kib(pid, "VmRSS");
    idle.hwm_kib = status_kib(pid, "VmHWM");
    idle
}

/// The agent's pid: the process whose command line names this topology's config.
fn agent_pid(dir: &Path) -> u32 {
    let config = dir.join("steer.toml").display().to_string();
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .split('\0')
                .any(|arg| arg == config)
                .then_some(pid)
        })
        .unwrap_or_else(|| panic!("no agent process running with {config}"))
}

/// Waits (at most 10 s) until `addr` answers `GET /whoami` from the client namespace; the panic
/// message carries `log` (the proxy's output) when given.
fn wait_serving(client: &NetNs, addr: SocketAddrV4, what: &str, log: Option<&Path>) {
    client.block_on(|| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let tried = async {
                let mut conn = HttpConn::connect(SocketAddr::V4(addr)).await?;
                conn.try_request("GET", PATH, None).await
            };
            match tried.await {
                Ok(r) if r.status == 200 => return,
                other if Instant::now() >= deadline => {
                    let log = log.map(std::fs::read_to_string);
                    panic!("{what} not serving on {addr} after 10 s: {other:?}; its log: {log:?}")
                }
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

fn haproxy_config(topo: &Topology, mode: &str) -> String {
    let mut cfg = format!(
        "global\n    nbthread 2\n    maxconn 8000\n\n\
         defaults\n    mode {mode}\n    timeout connect 5s\n    timeout client 30s\n    \
         timeout server 30s\n    maxconn 8000\n\n\
         frontend web\n    bind {VIP}\n    default_backend llama\n\n\
         backend llama\n    balance roundrobin\n"
    );
    for b in &topo.backends {
        cfg.push_str(&format!("    server {} {}\n", b.name, b.addr));
    }
    cfg
}

fn nginx_config(topo: &Topology, dir: &Path) -> String {
    let mut upstream = String::new();
    for b in &topo.backends {
        upstream.push_str(&format!("        server {};\n", b.addr));
    }
    format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         daemon off;\nmaster_process on;\nworker_processes 2;\nworker_rlimit_nofile 16384;\n\
         pid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log warn;\n\n\
         events {{\n    worker_connections 8192;\n}}\n\n\
         stream {{\n    upstream llama {{\n{upstream}    }}\n    server {{\n        \
         listen {VIP} reuseport;\n        proxy_pass llama;\n    }}\n}}\n",
        dir = dir.display()
    )
}

fn need(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(found, "{tool} not found: run `cargo xtask deps` as root");
}

/// `steer check-config` on `config`: Err with the agent's words when it refuses it.
fn agent_accepts(config: &Path) -> Result<(), String> {
    let out = Command::new(steer_bin())
        .arg("check-config")
        .arg("--config")
        .arg(config)
        .output()
        .map_err(|e| format!("running steer check-config: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// Runs the agent with `config` (text) in the LB namespace as `name`, measures its idle cost and
/// the case, and stops it. Err when the agent refuses the config.
fn userspace_case(
    topo: &Topology,
    from: Ipv4Addr,
    name: &'static str,
    what: &str,
    config: &str,
    secs: u32,
    idle_secs: u32,
) -> Result<Case, String> {
    let path = topo.dir.join(format!("{name}-check.toml"));
    std::fs::write(&path, config).expect("write the agent config");
    agent_accepts(&path)?;
    let (agent, log) = spawn_agent(topo, name, config);
    wait_serving(&topo.client, VIP, name, Some(&log));
    let idle = agent_idle(agent.id(), idle_secs);
    let mut case = measure(
        &topo.client,
        from,
        name,
        what,
        &[VIP],
        secs,
        Some(agent.id()),
    );
    case.agent = Some(agent_loaded(idle, agent.id()));
    stop(agent, name);
    Ok(case)
}

/// The agent's own counters for the service after the XDP runs, to tell where new flows went.
#[derive(Debug, Clone, Copy)]
struct AgentCounters {
    new_flows: u64,
    closed_flows: u64,
    no_backend: u64,
    no_snat_port: u64,
    no_route: u64,
}

fn run(secs: u32, idle_secs: u32) -> (Vec<Case>, Vec<Skipped>, AgentCounters) {
    for tool in ["wrk", "haproxy", "nginx"] {
        need(tool);
    }
    let backend_bin = sibling_binary("steer-test-backend");
    assert!(
        backend_bin.is_file(),
        "{} not found: build it with `cargo build -p tests`",
        backend_bin.display()
    );
    let mut topo = Topology::new("e2e", "round_robin", 2, &backend_bin);
    let dir = topo.dir.clone();
    let mut cases = Vec::new();
    let mut skipped = Vec::new();
    // One fresh source address per case for its fixed-rate runs (see `measure`).
    let mut sources = topo.add_client_addresses(8).into_iter();
    let mut source = || sources.next().expect("a source address per case");

    // (a) direct: each backend at its own address through the LB's kernel forwarding, both at
    // once (one wrk each, half the connections), so the limit has the same two backends.
    topo.lb.sysctl("net.ipv4.ip_forward", "1");
    let direct: Vec<SocketAddrV4> = topo.backends.iter().map(|b| b.addr).collect();
    for b in &topo.backends {
        topo.client
            .route_via(&format!("{}/32", b.addr.ip()), &LB_CLIENT_SIDE.to_string());
        wait_serving(
            &topo.client,
            b.addr,
            &format!("backend {} (direct)", b.name),
            None,
        );
    }
    cases.push(measure(
        &topo.client,
        source(),
        "direct",
        "client to both backends' own addresses via the LB's kernel forwarding (no XDP)",
        &direct,
        secs,
        None,
    ));
    topo.lb.sysctl("net.ipv4.ip_forward", "0");

    // (b) Steer with XDP.
    let base_config = topo.config();
    topo.start_agent();
    wait_serving(&topo.client, VIP, "steer", None);
    let pid = agent_pid(&dir);
    let idle = agent_idle(pid, idle_secs);
    let mut xdp = measure(
        &topo.client,
        source(),
        "steer-xdp",
        "Steer agent, XDP on the LB's veths, forwarding off",
        &[VIP],
        secs,
        Some(pid),
    );
    xdp.agent = Some(agent_loaded(idle, pid));
    cases.push(xdp);
    let scrape = topo.metrics();
    let web = [("service", "web")];
    let counter =
        |name: &str, labels: &[(&str, &str)]| tests::metrics::value(&scrape, name, labels) as u64;
    let steer_counters = AgentCounters {
        new_flows: counter("steer_service_new_flows_total", &web),
        closed_flows: counter("steer_service_closed_flows_total", &web),
        no_backend: counter("steer_service_no_backend_total", &web),
        no_snat_port: counter(
            "steer_service_passed_total",
            &[("service", "web"), ("reason", "no_snat_port")],
        ),
        no_route: counter(
            "steer_service_passed_total",
            &[("service", "web"), ("reason", "no_route")],
        ),
    };
    let status = topo.stop_agent(Signal::SIGTERM);
    assert!(status.success(), "agent exited with {status}");

    // (c) Steer's userspace path: no BPF; the agent makes the VIP local itself (and undoes it
    // on exit), so these run before the VIP becomes an address of the LB's lo below.
    let userspace = replace_once(
        &base_config,
        "[agent]\n",
        "[agent]\ndataplane = \"userspace\"\n",
    );
    let policy_line = "policy = \"round_robin\"\n";
    let variants = [
        (
            "steer-userspace-l4",
            "Steer agent, --dataplane userspace, proxy mode l4 (TCP splice)",
            userspace.clone(),
        ),
        (
            "steer-userspace-http",
            "Steer agent, --dataplane userspace, proxy mode http",
            replace_once(
                &userspace,
                policy_line,
                &format!("{policy_line}mode = \"http\"\n"),
            ),
        ),
    ];
    for (name, what, config) in variants {
        match userspace_case(&topo, source(), name, what, &config, secs, idle_secs) {
            Ok(case) => cases.push(case),
            Err(why) => {
                eprintln!("steer-bench-e2e: {name} skipped: {why}");
                skipped.push(Skipped { name, why });
            }
        }
    }

    // The proxies listen on the VIP, a local address of the LB from now on.
    topo.lb.addr_add("lo", &format!("{}/32", VIP.ip()));

    // (d) HAProxy, mode tcp and mode http.
    for (name, mode) in [("haproxy-tcp", "tcp"), ("haproxy-http", "http")] {
        let cfg = dir.join(format!("{name}.cfg"));
        std::fs::write(&cfg, haproxy_config(&topo, mode)).expect("write haproxy.cfg");
        let cfg_arg = cfg.display().to_string();
        let log = dir.join(format!("{name}.log"));
        let haproxy = spawn_logged(
            &topo.lb,
            Path::new("haproxy"),
            &["-db", "-f", &cfg_arg],
            &log,
        );
        wait_serving(&topo.client, VIP, name, Some(&log));
        cases.push(measure(
            &topo.client,
            source(),
            name,
            &format!("HAProxy 2.6 mode {mode} on the VIP, nbthread 2, roundrobin"),
            &[VIP],
            secs,
            Some(haproxy.id()),
        ));
        stop(haproxy, name);
    }

    // (e) nginx stream.
    let cfg = dir.join("nginx.conf");
    std::fs::write(&cfg, nginx_config(&topo, &dir)).expect("write nginx.conf");
    let cfg_arg = cfg.display().to_string();
    let prefix = format!("{}/", dir.display());
    let log = dir.join("nginx.log");
    let nginx = spawn_logged(
        &topo.lb,
        Path::new("nginx"),
        &["-p", &prefix, "-c", &cfg_arg],
        &log,
    );
    wait_serving(&topo.client, VIP, "nginx", Some(&log));
    cases.push(measure(
        &topo.client,
        source(),
        "nginx",
        "nginx stream proxy on the VIP, 2 workers, round robin",
        &[VIP],
        secs,
        Some(nginx.id()),
    ));
    stop(nginx, "nginx");
    // Give nginx's workers a moment to go before the namespaces do.
    thread::sleep(Duration::from_millis(200));
    (cases, skipped, steer_counters)
}

fn tables(cases: &[Case], skipped: &[Skipped]) -> String {
    let Some(d) = cases.first() else {
        return String::new();
    };
    let mut md = String::new();
    let cores = |c: Option<f64>| c.map_or("-".to_owned(), |c| format!("{c:.2}"));
    let _ = writeln!(
        md,
        "| case | new conn/s | x direct | LB CPU | SYN retrans | keep-alive req/s | x direct | LB CPU | bulk MB/s | x direct | errors |"
    );
    let _ = writeln!(
        md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for c in cases {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.2} | {} | {} | {:.0} | {:.2} | {} | {:.0} | {:.2} | {} |",
            c.name,
            c.new_conn.requests_per_s,
            ratio(c.new_conn.requests_per_s, d.new_conn.requests_per_s),
            cores(c.lb_cpu.0),
            c.syn_retrans,
            c.keepalive.requests_per_s,
            ratio(c.keepalive.requests_per_s, d.keepalive.requests_per_s),
            cores(c.lb_cpu.1),
            c.bulk.bytes_per_s / 1e6,
            ratio(c.bulk.bytes_per_s, d.bulk.bytes_per_s),
            c.new_conn.errors + c.keepalive.errors + c.bulk.errors,
        );
    }
    let _ = writeln!(
        md,
        "\n| case | keep-alive at {KEEPALIVE_RATE:.0}/s: p50 ms | p99 ms | p99 x direct | new connection at {NEW_CONN_RATE:.0}/s: p50 ms | p99 ms | p99 x direct | SYN retrans | failed or late |"
    );
    let _ = writeln!(
        md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for c in cases {
        let (k, n) = (&c.fixed_keepalive, &c.fixed_new);
        let _ = writeln!(
            md,
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |",
            c.name,
            k.p50_ms,
            k.p99_ms,
            ratio(k.p99_ms, d.fixed_keepalive.p99_ms),
            n.p50_ms,
            n.p99_ms,
            ratio(n.p99_ms, d.fixed_new.p99_ms),
            n.syn_retrans,
            k.errors + k.late + n.errors + n.late,
        );
    }
    let _ = writeln!(
        md,
        "\n| agent | idle CPU (cores) | idle RSS MiB | RSS after load MiB | peak RSS MiB | CPU under new conns | CPU under keep-alive | BPF maps | map memory MiB |"
    );
    let _ = writeln!(
        md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for c in cases {
        if let Some(a) = &c.agent {
            let mib = |kib: u64| kib as f64 / 1024.0;
            let _ = writeln!(
                md,
                "| {} | {:.3} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {:.1} |",
                c.name,
                a.idle_cpu_cores,
                mib(a.idle_rss_kib),
                mib(a.loaded_rss_kib),
                mib(a.hwm_kib),
                cores(c.lb_cpu.0),
                cores(c.lb_cpu.1),
                a.bpf_maps,
                a.bpf_map_bytes as f64 / (1024.0 * 1024.0),
            );
        }
    }
    for s in skipped {
        let _ = writeln!(md, "\n{} skipped: {}", s.name, s.why);
    }
    md
}

fn plots(cases: &[Case], dir: &Path) -> Result<(), tests::bench::PlotError> {
    let Some(d) = cases.first() else {
        return Ok(());
    };
    let series = |values: &dyn Fn(&Case) -> Vec<f64>| -> Vec<Series> {
        cases
            .iter()
            .map(|c| Series {
                name: c.name.to_owned(),
                values: values(c),
            })
            .collect()
    };
    let throughput = series(&|c| {
        vec![
            ratio(c.new_conn.requests_per_s, d.new_conn.requests_per_s),
            ratio(c.keepalive.requests_per_s, d.keepalive.requests_per_s),
            ratio(c.bulk.bytes_per_s, d.bulk.bytes_per_s),
        ]
    });
    bar_chart(
        &dir.join("e2e-throughput.png"),
        "End to end: throughput as a ratio to direct (higher is better)",
        "x direct",
        &[
            "new connections/s".to_owned(),
            "keep-alive requests/s".to_owned(),
            "bulk bytes/s".to_owned(),
        ],
        &throughput,
        Some(1.0),
        Scale::Linear,
    )?;
    let latency = series(&|c| {
        vec![
            c.fixed_keepalive.p50_ms,
            c.fixed_keepalive.p99_ms,
            c.fixed_new.p50_ms,
            c.fixed_new.p99_ms,
        ]
    });
    bar_chart(
        &dir.join("e2e-latency.png"),
        "End to end: latency at a fixed offered load (log scale, lower is better)",
        "ms",
        &[
            format!("keep-alive {KEEPALIVE_RATE:.0}/s p50"),
            "p99".to_owned(),
            format!("new conn {NEW_CONN_RATE:.0}/s p50"),
            "p99".to_owned(),
        ],
        &latency,
        None,
        Scale::Log,
    )
}

fn wrk_json(w: &Wrk, d: &Wrk) -> Value {
    json!({
        "requests_per_s": w.requests_per_s,
        "bytes_per_s": w.bytes_per_s,
        "ratio_to_direct": ratio(w.requests_per_s, d.requests_per_s),
        "bytes_ratio_to_direct": ratio(w.bytes_per_s, d.bytes_per_s),
        "latency_p50_ms": w.p50_ms,
        "latency_p99_ms": w.p99_ms,
        "errors": w.errors,
    })
}

fn fixed_json(f: &Fixed, d: &Fixed) -> Value {
    json!({
        "offered_per_s": f.rate,
        "completed": f.completed,
        "failed": f.errors,
        "late": f.late,
        "client_syn_retransmits": f.syn_retrans,
        "latency_p50_ms": f.p50_ms,
        "latency_p99_ms": f.p99_ms,
        "p50_ratio_to_direct": ratio(f.p50_ms, d.p50_ms),
        "p99_ratio_to_direct": ratio(f.p99_ms, d.p99_ms),
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !netns::is_root() {
        eprintln!("steer-bench-e2e needs root (network namespaces, XDP): run `cargo xtask bench`");
        return ExitCode::FAILURE;
    }
    let (secs, idle_secs) = if args.run.quick { (1, 1) } else { (5, 5) };
    let (cases, skipped, steer) = run(secs, idle_secs);
    let mut md = tables(&cases, &skipped);
    let _ = writeln!(md, "\nSteer XDP's counters after its runs: {steer:?}");
    println!("\n{md}");
    if let Some(dir) = &args.plots
        && let Err(e) = plots(&cases, dir)
    {
        eprintln!("steer-bench-e2e: {e}");
        return ExitCode::FAILURE;
    }
    if let Some(out) = args.run.out {
        let d = cases.first();
        let json = json!({
            "method": "client, LB and 2 backend namespaces; wrk for rates and bulk, the \
                       benchmark's own open-loop client for latency at a fixed offered load",
            "quick": args.run.quick,
            "seconds_per_figure": secs,
            "wrk_threads": WRK_THREADS,
            "connections": CONNECTIONS,
            "bulk": {"path": BULK_PATH, "connections": BULK_CONNECTIONS},
            "fixed_rate": {
                "keepalive_per_s": KEEPALIVE_RATE,
                "new_connection_per_s": NEW_CONN_RATE,
                "max_outstanding": MAX_OUTSTANDING,
            },
            "steer_xdp_agent_counters": {
                "new_flows": steer.new_flows,
                "closed_flows": steer.closed_flows,
                "no_backend": steer.no_backend,
                "passed_no_snat_port": steer.no_snat_port,
                "passed_no_route": steer.no_route,
            },
            "skipped": skipped.iter().map(|s| json!({"case": s.name, "why": s.why})).collect::<Vec<_>>(),
            "cases": cases.iter().map(|c| {
                let d = d.unwrap_or(c);
                json!({
                    "case": c.name,
                    "what": c.what,
                    "new_connections": wrk_json(&c.new_conn, &d.new_conn),
                    "new_connections_client_syn_retransmits": c.syn_retrans,
                    "new_connections_lb_process_cpu_cores": c.lb_cpu.0,
                    "keepalive": wrk_json(&c.keepalive, &d.keepalive),
                    "keepalive_lb_process_cpu_cores": c.lb_cpu.1,
                    "fixed_rate_keepalive": fixed_json(&c.fixed_keepalive, &d.fixed_keepalive),
                    "fixed_rate_new_connection": fixed_json(&c.fixed_new, &d.fixed_new),
                    "bulk": wrk_json(&c.bulk, &d.bulk),
                    "agent": c.agent.map(|a| json!({
                        "idle_cpu_cores": a.idle_cpu_cores,
                        "idle_rss_kib": a.idle_rss_kib,
                        "rss_after_load_kib": a.loaded_rss_kib,
                        "peak_rss_kib": a.hwm_kib,
                        "bpf_maps": a.bpf_maps,
                        "bpf_map_memlock_bytes": a.bpf_map_bytes,
                    })),
                })
            }).collect::<Vec<_>>(),
        });
        return save_results("steer-bench-e2e", &out, &json, &md);
    }
    ExitCode::SUCCESS
}
