//! `cargo xtask bench`: end to end on network namespaces, Steer against direct forwarding,
//! HAProxy and nginx.
//!
//! One topology for every case ([`Topology`]): a client namespace, the LB namespace and two
//! backend namespaces running `steer-test-backend`. The load generator is Debian's `wrk`, run
//! inside the client namespace against `GET /whoami`, for a bounded time per figure:
//! - new connections: `Connection: close` on every request (one request per TCP connection);
//! - keep-alive: requests per second on long-lived connections, with wrk's latency p50/p99
//!   at that fixed concurrency (closed loop; a fixed offered rate needs wrk2, not in Debian).
//!
//! Cases, in this order on the same hosts:
//! - `direct`: the client to both backends at their own addresses (one wrk each, at once) through
//!   the LB namespace with kernel forwarding on and no XDP (the limit);
//! - `steer-xdp`: the agent running with XDP on the LB's veths, forwarding off, client to the VIP;
//! - `haproxy`: HAProxy `mode tcp` in the LB namespace listening on the VIP (nbthread 2,
//!   maxconn, balance roundrobin), forwarding off;
//! - `nginx`: nginx `stream` proxy on the VIP (2 workers, round robin), forwarding off.
//!
//! Prints a table (each figure also as a ratio to direct) and writes JSON (`--out`). Every
//! process is stopped and every namespace deleted on the way out (the harness guards).

#![expect(
    clippy::print_stdout,
    reason = "the benchmark's table is for a person to read"
)]

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    thread,
    time::{Duration, Instant},
};

use clap::Parser;
use nix::sys::signal::Signal;
use serde_json::json;
use tests::{
    netns::{self, ChildGuard, NetNs},
    topology::{HttpConn, LB_CLIENT_SIDE, Topology, VIP, sibling_binary},
};

#[derive(Parser)]
#[command(about = "End-to-end requests per second through Steer, HAProxy and nginx vs direct")]
struct Args {
    /// About 1 s per figure (a smoke of the harness, not a measurement).
    #[arg(long)]
    quick: bool,
    /// Where to write the results as JSON.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// Concurrent connections wrk keeps open.
const CONNECTIONS: u32 = 32;
/// wrk threads (the VM has 2 cores, shared with everything else).
const WRK_THREADS: u32 = 2;
/// The request every figure is made of: a few bytes each way.
const PATH: &str = "/whoami";

/// What one wrk run measured.
#[derive(Debug, Clone, Copy, Default)]
struct Wrk {
    requests_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Socket errors plus non-2xx answers.
    errors: u64,
}

/// One case's figures.
struct Case {
    name: &'static str,
    what: &'static str,
    new_conn: Wrk,
    /// SYNs the client retransmitted during the new-connections run (`TcpExtTCPSynRetrans`).
    syn_retrans: u64,
    keepalive: Wrk,
    /// The load balancer process's CPU over the new-connections and keep-alive runs, in cores
    /// (CPU seconds per second; 2 is the whole VM). None for direct.
    lb_cpu: (Option<f64>, Option<f64>),
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

fn parse_wrk(text: &str) -> Option<Wrk> {
    let mut w = Wrk::default();
    let mut rate = None;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => rate = v.parse::<f64>().ok(),
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

/// One figure over `urls` at once, the connections and threads split between them (one wrk per
/// URL): requests per second summed, latency the worst of the runs'.
fn wrk_all(client: &NetNs, urls: &[String], close: bool, secs: u32) -> Wrk {
    let n = u32::try_from(urls.len()).expect("a few URLs");
    let threads = (WRK_THREADS / n).max(1);
    let conns = (CONNECTIONS / n).max(threads);
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
        p50_ms: acc.p50_ms.max(w.p50_ms),
        p99_ms: acc.p99_ms.max(w.p99_ms),
        errors: acc.errors + w.errors,
    })
}

/// Both figures for `urls` (loaded at once); a short keep-alive warm-up first (ARP, caches, the
/// proxy's pools).
/// `lb_pid` is the load balancer's process (the agent or the proxy), whose CPU time (with its
/// children's, e.g. nginx's workers) is measured over each run.
fn measure(
    client: &NetNs,
    name: &'static str,
    what: &'static str,
    urls: &[String],
    secs: u32,
    lb_pid: Option<u32>,
) -> Case {
    eprintln!("steer-bench-e2e: {name}: {}", urls.join(" "));
    let cpu = || lb_pid.map_or(0.0, cpu_seconds);
    wrk_all(client, urls, false, 1);
    let before = (syn_retrans(client), cpu());
    let new_conn = wrk_all(client, urls, true, secs);
    let syn_retrans = syn_retrans(client).saturating_sub(before.0);
    let mid = cpu();
    let keepalive = wrk_all(client, urls, false, secs);
    let after = cpu();
    let share = |cpu_s: f64| lb_pid.map(|_| cpu_s / f64::from(secs));
    Case {
        name,
        what,
        new_conn,
        syn_retrans,
        keepalive,
        lb_cpu: (share(mid - before.1), share(after - mid)),
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
                .contains(&config)
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

/// Starts a proxy in the LB namespace with its output in `log`.
fn spawn_proxy(lb: &NetNs, program: &str, args: &[&str], log: &Path) -> ChildGuard {
    let out =
        std::fs::File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup log"))
        .stderr(out);
    lb.spawn(cmd)
}

/// Stops a proxy with SIGTERM (nginx's master then stops its workers), killing it after 5 s.
fn stop_proxy(mut child: ChildGuard, what: &str) {
    if child
        .signal_and_wait(Signal::SIGTERM, Duration::from_secs(5))
        .is_none()
    {
        eprintln!("steer-bench-e2e: {what} still running 5 s after SIGTERM; killing it");
    }
}

fn haproxy_config(topo: &Topology) -> String {
    let mut cfg = format!(
        "global\n    nbthread 2\n    maxconn 8000\n\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n    \
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

fn run(secs: u32) -> (Vec<Case>, AgentCounters) {
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

    // (a) direct: each backend at its own address through the LB's kernel forwarding, both at
    // once (one wrk each, half the connections), so the limit has the same two backends.
    let mut direct = Vec::new();
    topo.lb.sysctl("net.ipv4.ip_forward", "1");
    for b in &topo.backends {
        topo.client
            .route_via(&format!("{}/32", b.addr.ip()), &LB_CLIENT_SIDE.to_string());
        wait_serving(
            &topo.client,
            b.addr,
            &format!("backend {} (direct)", b.name),
            None,
        );
        direct.push(format!("http://{}{PATH}", b.addr));
    }
    cases.push(measure(
        &topo.client,
        "direct",
        "client to both backends' own addresses via the LB's kernel forwarding (no XDP)",
        &direct,
        secs,
        None,
    ));
    topo.lb.sysctl("net.ipv4.ip_forward", "0");

    let vip = [format!("http://{VIP}{PATH}")];

    // (b) Steer with XDP.
    topo.start_agent();
    wait_serving(&topo.client, VIP, "steer", None);
    cases.push(measure(
        &topo.client,
        "steer-xdp",
        "Steer agent, XDP on the LB's veths, forwarding off",
        &vip,
        secs,
        Some(agent_pid(&dir)),
    ));
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

    // The proxies listen on the VIP, a local address of the LB from now on.
    topo.lb.addr_add("lo", &format!("{}/32", VIP.ip()));

    // (c) HAProxy mode tcp.
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, haproxy_config(&topo)).expect("write haproxy.cfg");
    let cfg_arg = cfg.display().to_string();
    let log = dir.join("haproxy.log");
    let haproxy = spawn_proxy(&topo.lb, "haproxy", &["-db", "-f", &cfg_arg], &log);
    wait_serving(&topo.client, VIP, "haproxy", Some(&log));
    cases.push(measure(
        &topo.client,
        "haproxy",
        "HAProxy 2.6 mode tcp on the VIP, nbthread 2, roundrobin",
        &vip,
        secs,
        Some(haproxy.id()),
    ));
    stop_proxy(haproxy, "haproxy");

    // (d) nginx stream.
    let cfg = dir.join("nginx.conf");
    std::fs::write(&cfg, nginx_config(&topo, &dir)).expect("write nginx.conf");
    let cfg_arg = cfg.display().to_string();
    let prefix = format!("{}/", dir.display());
    let log = dir.join("nginx.log");
    let nginx = spawn_proxy(&topo.lb, "nginx", &["-p", &prefix, "-c", &cfg_arg], &log);
    wait_serving(&topo.client, VIP, "nginx", Some(&log));
    cases.push(measure(
        &topo.client,
        "nginx",
        "nginx stream proxy on the VIP, 2 workers, round robin",
        &vip,
        secs,
        Some(nginx.id()),
    ));
    stop_proxy(nginx, "nginx");
    // Give nginx's workers a moment to go before the namespaces do.
    thread::sleep(Duration::from_millis(200));
    (cases, steer_counters)
}

/// The agent's own counters for the service after the Steer runs (warm-up, new connections,
/// keep-alive), to tell where new flows went.
#[derive(Debug, Clone, Copy)]
struct AgentCounters {
    new_flows: u64,
    closed_flows: u64,
    no_backend: u64,
    no_snat_port: u64,
    no_route: u64,
}

fn ratio(x: f64, direct: f64) -> f64 {
    if direct > 0.0 { x / direct } else { f64::NAN }
}

fn print_table(cases: &[Case]) {
    let Some(direct) = cases.first() else { return };
    println!(
        "\n| case | new conn/s | x direct | LB CPU | SYN retrans | keep-alive req/s | x direct | LB CPU \
         | p50 ms | p99 ms | errors |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let cores = |c: Option<f64>| c.map_or("-".to_owned(), |c| format!("{c:.2}"));
    for c in cases {
        println!(
            "| {} | {:.0} | {:.2} | {} | {} | {:.0} | {:.2} | {} | {:.2} | {:.2} | {} |",
            c.name,
            c.new_conn.requests_per_s,
            ratio(c.new_conn.requests_per_s, direct.new_conn.requests_per_s),
            cores(c.lb_cpu.0),
            c.syn_retrans,
            c.keepalive.requests_per_s,
            ratio(c.keepalive.requests_per_s, direct.keepalive.requests_per_s),
            cores(c.lb_cpu.1),
            c.keepalive.p50_ms,
            c.keepalive.p99_ms,
            c.new_conn.errors + c.keepalive.errors,
        );
    }
    println!(
        "\np50/p99: wrk's latency on the keep-alive run at {CONNECTIONS} connections (closed \
         loop); latency at a fixed offered load is not measured (wrk2 is not in Debian). LB CPU: \
         the agent's or proxy's own CPU (user + system, with children) in cores, not the \
         softirq time XDP and the kernel spend on the packets."
    );
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !netns::is_root() {
        eprintln!("steer-bench-e2e needs root (network namespaces, XDP): run `cargo xtask bench`");
        return ExitCode::FAILURE;
    }
    let secs = if args.quick { 1 } else { 5 };
    let (cases, steer) = run(secs);
    print_table(&cases);
    println!("Steer's counters after its runs: {steer:?}");
    if let Some(out) = args.out {
        let direct = cases.first().map(|c| (c.new_conn, c.keepalive));
        let (dn, dk) = direct.unwrap_or_default();
        let figure = |w: &Wrk, d: &Wrk| {
            json!({
                "requests_per_s": w.requests_per_s,
                "ratio_to_direct": ratio(w.requests_per_s, d.requests_per_s),
                "latency_p50_ms": w.p50_ms,
                "latency_p99_ms": w.p99_ms,
                "errors": w.errors,
            })
        };
        let json = json!({
            "method": "wrk in the client namespace, GET /whoami of steer-test-backend, \
                       2 backend namespaces, one LB namespace",
            "quick": args.quick,
            "seconds_per_figure": secs,
            "wrk_threads": WRK_THREADS,
            "connections": CONNECTIONS,
            "fixed_rate_latency": "not measured: wrk2 is not packaged in Debian; latency is \
                                   wrk's closed-loop p50/p99 at the given connections",
            "steer_agent_counters": {
                "new_flows": steer.new_flows,
                "closed_flows": steer.closed_flows,
                "no_backend": steer.no_backend,
                "passed_no_snat_port": steer.no_snat_port,
                "passed_no_route": steer.no_route,
            },
            "cases": cases.iter().map(|c| json!({
                "case": c.name,
                "what": c.what,
                "new_connections": figure(&c.new_conn, &dn),
                "new_connections_client_syn_retransmits": c.syn_retrans,
                "new_connections_lb_process_cpu_cores": c.lb_cpu.0,
                "keepalive_lb_process_cpu_cores": c.lb_cpu.1,
                "keepalive": figure(&c.keepalive, &dk),
            })).collect::<Vec<_>>(),
        });
        if let Some(dir) = out.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = std::fs::write(&out, format!("{json:#}\n")) {
            eprintln!("steer-bench-e2e: writing {}: {e}", out.display());
            return ExitCode::FAILURE;
        }
        println!("\nwrote {}", out.display());
    }
    ExitCode::SUCCESS
}
