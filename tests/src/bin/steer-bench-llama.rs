//! `cargo xtask bench`: balancing quality on llama.cpp. Three real llama-servers of unequal capacity
//! (slots) in backend namespaces behind Steer's XDP path, one mixed workload, and
//! each policy in turn: `round_robin`, `least_connections`, `slots`, `maglev`.
//!
//! Backends (the test model, SmolLM2-135M), one thread each: `big` with 4 slots, `medium` with
//! 2, `small` with 1 ([`SERVERS`] says why not more threads); they start once and serve every
//! policy's run (the agent restarts with the next policy, and a run starts only once all three
//! are healthy and polled).
//!
//! Workload, from the client namespace, the same for every policy: `CONCURRENCY` workers in a
//! closed loop for a fixed time, each request a chat completion on a new connection to the VIP
//! (the policy chooses per connection): 70% short (`max_tokens` 8), 30% long (64), half of each
//! streamed; `ignore_eos` so each generates exactly its tokens. The worker's client addresses
//! are distinct (maglev hashes the client address), fixed per worker.
//!
//! Per policy: completed requests/s (answers complete within the run's time, over that time),
//! time to first token p50/p99 (streamed requests: the first SSE event carrying content), total
//! latency p50/p99 (all, and long ones) of every request started in the run, and where requests
//! went. Requests still running 30 s after the run's end are cut and counted, so a run is
//! bounded in time. Prints markdown, writes JSON (`--out`, the table beside it) and a plot (`--plots`).

#![expect(
    clippy::print_stdout,
    reason = "the benchmark's table is for a person to read"
)]

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex, PoisonError},
    thread,
    time::{Duration, Instant},
};

use clap::Parser;
use lb_userspace::spec::Policy;
use serde_json::{Value, json};
use tests::{
    bench::{
        Rng, RunArgs, Scale, Series, bar_chart, p50_p99, replace_once, save_results, spawn_agent,
        spawn_logged, stop,
    },
    llama::{self, llama_server_path, server_args},
    netns::{self, ChildGuard},
    topology::{Topology, VIP, sibling_binary},
};
use tokio::time::timeout_at;

#[derive(Parser)]
#[command(about = "Steer's policies over three unequal real llama-servers")]
struct Args {
    #[command(flatten)]
    run: RunArgs,
    /// Where to draw the PNG plots.
    #[arg(long, value_name = "DIR")]
    plots: Option<PathBuf>,
    /// Runs only this policy (repeatable, in the order given); all of them by default.
    #[arg(long = "policy", value_name = "POLICY", value_parser = parse_policy)]
    policies: Vec<Policy>,
}

fn parse_policy(name: &str) -> Result<Policy, String> {
    Policy::ALL
        .into_iter()
        .find(|p| p.to_string() == name)
        .ok_or_else(|| format!("no policy {name:?}"))
}

/// (alias, threads, slots) of the three backends, one per backend namespace. One thread each:
/// a 2-thread server oversubscribed this 2-core VM (its threads wait for each other at every
/// step) and was the slowest of the three in a trial run, so capacity differs by slots (a
/// batch of 4 decodes at little more than the cost of 1 on this small model).
const SERVERS: [(&str, u32, u32); 3] = [("big", 1, 4), ("medium", 1, 2), ("small", 1, 1)];
const LLAMA_PORT: u16 = 8081;
/// Requests in flight from the client (the backends have 7 slots in all).
const CONCURRENCY: usize = 8;
const SHORT_TOKENS: u32 = 8;
const LONG_TOKENS: u32 = 64;
const LONG_SHARE: f64 = 0.3;
const STREAM_SHARE: f64 = 0.5;
/// How a request still running `drain` after the run's end is counted.
const UNFINISHED: &str = "unfinished at the end of the run";
/// Longest wait for the backends (model loaded, health checks passed, slots polled).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// One request's outcome.
#[derive(Debug, Clone)]
struct Done {
    long: bool,
    stream: bool,
    total_s: f64,
    /// Streamed requests: to the first event carrying content.
    ttft_s: Option<f64>,
    /// The answering server's alias (`model` of the answer); None when it failed.
    server: Option<String>,
}

/// One policy's figures.
#[derive(Debug)]
struct Run {
    policy: Policy,
    seconds: f64,
    completed: usize,
    failed: usize,
    /// Requests cut at the end of the run's drain time.
    unfinished: usize,
    per_s: f64,
    ttft: (f64, f64),
    total: (f64, f64),
    long_total: (f64, f64),
    by_server: BTreeMap<String, usize>,
}

/// A llama-server in `ns` (see [`server_args`]).
fn llama_server(
    ns: &netns::NetNs,
    dir: &std::path::Path,
    (alias, threads, slots): (&str, u32, u32),
) -> ChildGuard {
    let args = server_args(alias, slots, threads, "0.0.0.0", LLAMA_PORT);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn_logged(
        ns,
        &llama_server_path(),
        &args,
        &dir.join(format!("{alias}.log")),
    )
}

/// One chat completion from `from` on a new connection to the VIP, read to the end.
/// `tokens`: `max_tokens` of a short and a long request.
async fn chat(
    from: Ipv4Addr,
    long: bool,
    stream: bool,
    tokens: (u32, u32),
) -> Result<Done, String> {
    let body = json!({
        "messages": [{"role": "user", "content": "Tell a story about a lighthouse."}],
        "max_tokens": if long { tokens.1 } else { tokens.0 },
        "ignore_eos": true,
        "stream": stream,
    });
    let answer = llama::chat(Some(from), SocketAddr::V4(VIP), &[], &body).await?;
    Ok(Done {
        long,
        stream,
        total_s: answer.total_s,
        ttft_s: answer.ttft_s,
        server: answer.model,
    })
}

/// The workload for `secs`: `CONCURRENCY` workers in a closed loop, worker `i` from
/// `clients[i]`, each drawing its requests from its own seeded stream (the same for every
/// policy). Returns every outcome and whether it ended within the `secs`.
fn workload(
    topo: &Topology,
    clients: &[Ipv4Addr],
    secs: u64,
    drain: Duration,
    tokens: (u32, u32),
) -> Vec<(Result<Done, String>, bool)> {
    let results = Arc::new(Mutex::new(Vec::new()));
    topo.client.block_on(|| async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        let mut workers = tokio::task::JoinSet::new();
        for (i, &from) in clients.iter().enumerate().take(CONCURRENCY) {
            let results = Arc::clone(&results);
            workers.spawn(async move {
                let mut rng = Rng::new(0x11a_3a00 + i as u64);
                // Requests start until the deadline and must end within `drain` after it.
                while tokio::time::Instant::now() < deadline {
                    let long = rng.unit() < LONG_SHARE;
                    let stream = rng.unit() < STREAM_SHARE;
                    let outcome = timeout_at(deadline + drain, chat(from, long, stream, tokens))
                        .await
                        .unwrap_or_else(|_| Err(UNFINISHED.to_owned()));
                    let in_run = tokio::time::Instant::now() <= deadline;
                    results
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push((outcome, in_run));
                }
            });
        }
        while let Some(joined) = workers.join_next().await {
            joined.expect("a workload worker");
        }
    });
    std::mem::take(&mut *results.lock().unwrap_or_else(PoisonError::into_inner))
}

/// Waits until the agent lists all three servers healthy with their slots polled, then one
/// poll interval more (nothing steered before the run is left uncounted).
fn wait_ready(topo: &Topology, addrs: &[SocketAddrV4], log: &std::path::Path) {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let ready = topo.try_admin("GET", "/v1/backends", None).is_ok_and(|v| {
            addrs.iter().all(|a| {
                v["backends"].as_array().is_some_and(|bs| {
                    bs.iter().any(|b| {
                        b["address"] == a.to_string()
                            && b["healthy"] == true
                            && b["total_slots"].as_u64().is_some()
                    })
                })
            })
        });
        if ready {
            thread::sleep(Duration::from_millis(700));
            return;
        }
        assert!(
            Instant::now() < deadline,
            "backends not healthy and polled within {READY_TIMEOUT:?}; agent log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

fn summarize(policy: Policy, ran: Vec<(Result<Done, String>, bool)>, seconds: f64) -> Run {
    let in_run = ran
        .iter()
        .filter(|(o, in_run)| o.is_ok() && *in_run)
        .count();
    let outcomes: Vec<Result<Done, String>> = ran.into_iter().map(|(o, _)| o).collect();
    let done: Vec<Done> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().ok())
        .cloned()
        .collect();
    let unfinished = outcomes
        .iter()
        .filter(|o| o.as_ref().is_err_and(|e| e == UNFINISHED))
        .count();
    let failed = outcomes.len() - done.len() - unfinished;
    if let Some(Err(e)) = outcomes
        .iter()
        .find(|o| o.as_ref().is_err_and(|e| e != UNFINISHED))
    {
        eprintln!("steer-bench-llama: {policy}: {failed} failed, e.g. {e}");
    }
    let mut ttft: Vec<f64> = done.iter().filter_map(|d| d.ttft_s).collect();
    let mut total: Vec<f64> = done.iter().map(|d| d.total_s).collect();
    let mut long: Vec<f64> = done.iter().filter(|d| d.long).map(|d| d.total_s).collect();
    let mut by_server = BTreeMap::new();
    for d in &done {
        *by_server
            .entry(d.server.clone().unwrap_or_else(|| "?".to_owned()))
            .or_default() += 1;
    }
    let streamed = done.iter().filter(|d| d.stream).count();
    if streamed > ttft.len() {
        eprintln!(
            "steer-bench-llama: {policy}: {} streamed answers had no content event",
            streamed - ttft.len()
        );
    }
    Run {
        policy,
        seconds,
        completed: done.len(),
        failed,
        unfinished,
        per_s: in_run as f64 / seconds,
        ttft: p50_p99(&mut ttft),
        total: p50_p99(&mut total),
        long_total: p50_p99(&mut long),
        by_server,
    }
}

fn run(policies: &[Policy], secs: u64, drain: Duration, tokens: (u32, u32)) -> Vec<Run> {
    let backend_bin = sibling_binary("steer-test-backend");
    let mut topo = Topology::new("llama", "round_robin", SERVERS.len(), &backend_bin);
    let addrs: Vec<SocketAddrV4> = topo
        .backends
        .iter()
        .map(|b| SocketAddrV4::new(*b.addr.ip(), LLAMA_PORT))
        .collect();
    topo.set_service_backends(addrs.clone());
    let clients = topo.add_client_addresses(CONCURRENCY as u8);
    let _llamas: Vec<ChildGuard> = SERVERS
        .iter()
        .zip(&topo.backends)
        .map(|(&server, b)| llama_server(&b.ns, &topo.dir, server))
        .collect();
    // Slot polls for every policy (only `slots` reads them; the agent's work stays the same),
    // and health checks that a busy llama-server on shared cores still answers in time.
    let base = replace_once(
        &topo.config(),
        "[service.health]\ninterval = \"200ms\"\ntimeout = \"150ms\"\n",
        "[service.slots]\ninterval = \"500ms\"\n\n[service.health]\ninterval = \"1s\"\ntimeout = \"900ms\"\n",
    );
    let mut runs = Vec::new();
    for &policy in policies {
        let config = replace_once(
            &base,
            "policy = \"round_robin\"\n",
            &format!("policy = \"{policy}\"\n"),
        );
        let name = format!("steer-{policy}");
        let (agent, log) = spawn_agent(&topo, &name, &config);
        wait_ready(&topo, &addrs, &log);
        eprintln!("steer-bench-llama: {policy}: {secs} s of chats");
        let ran = workload(&topo, &clients, secs, drain, tokens);
        runs.push(summarize(policy, ran, secs as f64));
        stop(agent, &name);
    }
    runs
}

fn table(runs: &[Run]) -> String {
    let mut md = String::new();
    let servers: Vec<&str> = SERVERS.iter().map(|s| s.0).collect();
    let _ = writeln!(
        md,
        "| policy | completed/s | TTFT p50 s | TTFT p99 s | latency p50 s | latency p99 s | long p50 s | long p99 s | failed | cut | {} |",
        servers
            .iter()
            .map(|s| format!("to {s}"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(
        md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |{}",
        " ---: |".repeat(servers.len())
    );
    for r in runs {
        let shares: Vec<String> = servers
            .iter()
            .map(|s| {
                let n = r.by_server.get(*s).copied().unwrap_or(0);
                format!("{:.0}%", 100.0 * n as f64 / r.completed.max(1) as f64)
            })
            .collect();
        let _ = writeln!(
            md,
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
            r.policy,
            r.per_s,
            r.ttft.0,
            r.ttft.1,
            r.total.0,
            r.total.1,
            r.long_total.0,
            r.long_total.1,
            r.failed,
            r.unfinished,
            shares.join(" | ")
        );
    }
    md
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !netns::is_root() {
        eprintln!(
            "steer-bench-llama needs root (network namespaces, XDP): run `cargo xtask bench`"
        );
        return ExitCode::FAILURE;
    }
    // A smoke run: short answers only, cut 3 s after its 2 s.
    let (secs, drain, tokens) = if args.run.quick {
        (2, Duration::from_secs(3), (SHORT_TOKENS, 2 * SHORT_TOKENS))
    } else {
        (45, Duration::from_secs(30), (SHORT_TOKENS, LONG_TOKENS))
    };
    let policies = if args.policies.is_empty() {
        // The service is l4 (steered by XDP): the kernel's policies.
        Policy::ALL
            .into_iter()
            .filter(|p| p.abi().is_some())
            .collect()
    } else {
        args.policies.clone()
    };
    let runs = run(&policies, secs, drain, tokens);
    let md = table(&runs);
    println!("\n{md}");
    if let Some(dir) = &args.plots {
        let series = |name: &str, f: &dyn Fn(&Run) -> f64| Series {
            name: name.to_owned(),
            values: runs.iter().map(f).collect(),
        };
        let groups: Vec<String> = runs.iter().map(|r| r.policy.to_string()).collect();
        let drawn = bar_chart(
            &dir.join("llama-latency.png"),
            "llama.cpp, 3 unequal backends: latency by policy (log scale, lower is better)",
            "seconds",
            &groups,
            &[
                series("TTFT p50", &|r| r.ttft.0),
                series("TTFT p99", &|r| r.ttft.1),
                series("latency p50", &|r| r.total.0),
                series("latency p99", &|r| r.total.1),
            ],
            None,
            Scale::Log,
        );
        if let Err(e) = drawn {
            eprintln!("steer-bench-llama: {e}");
            return ExitCode::FAILURE;
        }
    }
    if let Some(out) = &args.run.out {
        let json = json!({
            "method": "3 llama-servers in backend namespaces behind Steer XDP; closed-loop \
                       client in the client namespace, one new connection per request",
            "quick": args.run.quick,
            "seconds_per_policy": secs,
            "drain_seconds": drain.as_secs(),
            "servers": SERVERS.iter().map(|&(alias, threads, slots)| json!({
                "alias": alias, "threads": threads, "slots": slots,
            })).collect::<Vec<_>>(),
            "workload": {
                "concurrency": CONCURRENCY,
                "short_max_tokens": tokens.0,
                "long_max_tokens": tokens.1,
                "long_share": LONG_SHARE,
                "stream_share": STREAM_SHARE,
            },
            "runs": runs.iter().map(|r| json!({
                "policy": r.policy.to_string(),
                "seconds": r.seconds,
                "completed": r.completed,
                "failed": r.failed,
                "unfinished_at_end": r.unfinished,
                "completed_per_s": r.per_s,
                "ttft_p50_s": r.ttft.0,
                "ttft_p99_s": r.ttft.1,
                "latency_p50_s": r.total.0,
                "latency_p99_s": r.total.1,
                "long_latency_p50_s": r.long_total.0,
                "long_latency_p99_s": r.long_total.1,
                "by_server": r.by_server,
            })).collect::<Vec<Value>>(),
        });
        return save_results("steer-bench-llama", out, &json, &md);
    }
    ExitCode::SUCCESS
}
