//! `cargo xtask bench`: routers on an unequal fleet and on conversations. Three real
//! llama-servers on loopback (the test model, 2 slots of 1024 tokens, one thread each), one of
//! them CPU-capped by a cgroup ([`SLOW_SHARE`] of one CPU) so it is several times slower; the
//! routers in the same run, one at a time in front of the same servers:
//!
//! - Steer (`steer run`, `dataplane = "userspace"`, `mode = "http"`, slot polls on, every other
//!   setting its default) with each policy of [`STEER_POLICIES`] the agent accepts (probed with
//!   `steer check-config`; one it refuses is skipped with a line saying so);
//! - no router: the client sends its requests round robin straight to the servers;
//! - vllm-router (PyPI, installed by `bench/install-vllm-router.sh`) with each policy of
//!   [`VLLM_POLICIES`], its other options at their defaults.
//!
//! Workloads, the same requests for every router (seeded), each on a new connection with
//! `Connection: close`:
//! - **mixed**: [`CONCURRENCY`] workers (above the 6 slots) in a closed loop for a fixed time,
//!   70% short and 30% long `max_tokens`, half streamed, `ignore_eos`: completed requests/s,
//!   latency p50/p99, TTFT p99 (streamed);
//! - **burst**: 30 non-streamed chats at once: how many completed and when the last did;
//! - **conversations**: 6 in parallel, each re-sending its growing history (a system prompt of
//!   about 350 tokens shared by all, then its turns) streamed, with `x-session-id`:
//!   TTFT p50/p99 and the prompt tokens the servers evaluated (`timings.prompt_n`: what their
//!   prompt caches did not hold).
//!
//! Per workload and router also the router's CPU per request: utime + stime of its process tree
//! (`/proc/PID/stat`) over the workload, over the requests. Between workloads the servers are
//! left to go idle (`/slots`). Each router run's system prompt starts with the router's name, so
//! no run finds another's conversations in the servers' caches.
//! Prints a markdown table per workload with ratios to the best vllm-router figure and to the
//! client's round robin; writes JSON (`--out`, the tables beside it). [`FULL`] has the sizes of
//! a measurement, [`QUICK`] those of `--quick`, a smoke of every path.

#![expect(
    clippy::print_stdout,
    reason = "the benchmark's tables are for a person to read"
)]

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use clap::Parser;
use serde_json::{Value, json};
use tests::{
    bench::{
        CpuCap, Rng, RunArgs, cpu_seconds, free_port, p50_p99, ratio, save_results,
        spawn_logged_here, stop, write_atomic,
    },
    llama::{self, ChatAnswer, llama_server_path, server_args},
    netns::{self, ChildGuard},
    topology::{HttpConn, steer_bin},
};
use tokio::time::{Instant, sleep, timeout};

#[derive(Parser)]
#[command(about = "Steer's policies beside vllm-router and client round robin on an unequal fleet")]
struct Args {
    #[command(flatten)]
    run: RunArgs,
    /// Run only the routers named so (as the tables name them, e.g. `steer slots`,
    /// `vllm-router cache_aware`, `client round robin`; repeatable): for trying a change, not
    /// for the figures of `docs/benchmarks.md`, which compare every router.
    #[arg(long = "router", value_name = "NAME")]
    routers: Vec<String>,
}

/// Steer's policies, each measured when the agent accepts it.
const STEER_POLICIES: [&str; 4] = [
    "round_robin",
    "least_connections",
    "slots",
    "cache_affinity",
];
/// vllm-router's policies: its prefix-cache one and its load one.
const VLLM_POLICIES: [&str; 2] = ["cache_aware", "power_of_two"];
/// The servers' aliases; the last one is CPU-capped.
const SERVERS: [&str; 3] = ["fast-1", "fast-2", "slow"];
const SLOTS: u32 = 2;
/// The slow server's CPU: this share of one CPU (each server has one thread).
const SLOW_SHARE: f64 = 0.15;
/// Mixed workload: requests in flight (the servers have 6 slots in all).
const CONCURRENCY: usize = 8;
const LONG_SHARE: f64 = 0.3;
const STREAM_SHARE: f64 = 0.5;
/// About the tokens of a system prompt's rule (24 each, 480 for 20, by llama-server's
/// `/tokenize`).
const TOKENS_PER_RULE: usize = 24;
/// The header the conversations are keyed with.
const SESSION_HEADER: &str = "x-session-id";
/// Longest wait for a router (or the servers) to answer a chat at start.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// The sizes of one run (`--quick`: a smoke).
#[derive(Debug, Clone, Copy)]
struct Sizes {
    mixed_secs: u64,
    /// How long after the mixed run's end its requests may still finish (else "cut").
    drain: Duration,
    short_tokens: u32,
    long_tokens: u32,
    burst: usize,
    burst_tokens: u32,
    conversations: usize,
    turns: usize,
    /// Rules in the system prompt, [`TOKENS_PER_RULE`] each.
    rules: usize,
    reply_tokens: u32,
    /// Longest a burst request or a conversation's turn may take.
    timeout: Duration,
}

const FULL: Sizes = Sizes {
    mixed_secs: 30,
    drain: Duration::from_secs(30),
    short_tokens: 8,
    long_tokens: 64,
    burst: 30,
    burst_tokens: 16,
    conversations: 6,
    turns: 4,
    rules: 14,
    reply_tokens: 16,
    timeout: Duration::from_secs(150),
};

const QUICK: Sizes = Sizes {
    mixed_secs: 3,
    drain: Duration::from_secs(5),
    short_tokens: 4,
    long_tokens: 8,
    burst: 6,
    burst_tokens: 4,
    conversations: 2,
    turns: 2,
    rules: 4,
    reply_tokens: 4,
    timeout: Duration::from_secs(30),
};

#[derive(Debug, Clone)]
enum Router {
    Steer(&'static str),
    /// No router: the client sends round robin to the servers.
    ClientRoundRobin,
    Vllm(&'static str),
}

impl Router {
    /// Every router measured, in the tables' order.
    fn all() -> Vec<Router> {
        STEER_POLICIES
            .iter()
            .map(|p| Router::Steer(p))
            .chain([Router::ClientRoundRobin])
            .chain(VLLM_POLICIES.iter().map(|p| Router::Vllm(p)))
            .collect()
    }

    fn name(&self) -> String {
        match self {
            Router::Steer(policy) => format!("steer {policy}"),
            Router::ClientRoundRobin => "client round robin".to_owned(),
            Router::Vllm(policy) => format!("vllm-router {policy}"),
        }
    }
}

/// Where the client sends a router's requests, and whose CPU is counted.
struct Front {
    /// One address for a router; the servers for the client's round robin.
    targets: Vec<SocketAddr>,
    next: AtomicUsize,
    /// The router process (none for the client's round robin).
    router: Option<ChildGuard>,
}

impl Front {
    fn pick(&self) -> SocketAddr {
        self.targets[self.next.fetch_add(1, Ordering::Relaxed) % self.targets.len()]
    }

    fn cpu(&self) -> Option<f64> {
        self.router.as_ref().map(|r| cpu_seconds(r.id()))
    }
}

/// One workload's figures on one router.
#[derive(Debug, Default, Clone)]
struct Figures {
    sent: usize,
    completed: usize,
    failed: usize,
    /// An example failure.
    failure: Option<String>,
    /// Mixed: requests completed within the run's time, per second.
    per_s: f64,
    latency: (f64, f64),
    ttft: (f64, f64),
    /// The mean TTFT: what p50 hides when some conversations are left on a slow server.
    ttft_mean: f64,
    /// Burst: when the last answer came, from the burst's start.
    last_s: f64,
    /// Conversations: prompt tokens the servers evaluated, over all turns.
    prompt_tokens: u64,
    /// Router CPU per request (ms); NaN without a router.
    cpu_ms: f64,
}

#[derive(Debug)]
struct RouterRun {
    router: String,
    mixed: Figures,
    burst: Figures,
    conversations: Figures,
}

/// Outcomes of one workload.
#[derive(Default)]
struct Outcomes {
    answers: Vec<ChatAnswer>,
    failures: Vec<String>,
}

impl Outcomes {
    fn push(&mut self, outcome: Result<ChatAnswer, String>) {
        match outcome {
            Ok(a) => self.answers.push(a),
            Err(e) => self.failures.push(e),
        }
    }

    fn figures(self, cpu: Option<f64>) -> Figures {
        let completed = self.answers.len();
        let mut total: Vec<f64> = self.answers.iter().map(|a| a.total_s).collect();
        let mut ttft: Vec<f64> = self.answers.iter().filter_map(|a| a.ttft_s).collect();
        Figures {
            sent: completed + self.failures.len(),
            completed,
            failed: self.failures.len(),
            failure: self.failures.first().cloned(),
            latency: p50_p99(&mut total),
            ttft_mean: if ttft.is_empty() {
                f64::NAN
            } else {
                ttft.iter().sum::<f64>() / ttft.len() as f64
            },
            ttft: p50_p99(&mut ttft),
            last_s: f64::NAN,
            prompt_tokens: self.answers.iter().filter_map(|a| a.prompt_n).sum(),
            cpu_ms: cpu.map_or(f64::NAN, |s| 1e3 * s / completed.max(1) as f64),
            per_s: f64::NAN,
        }
    }
}

fn chat_body(content: &str, max_tokens: u32, stream: bool) -> Value {
    json!({
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "stream": stream,
    })
}

/// The mixed closed loop: [`CONCURRENCY`] workers for `mixed_secs`, each from its own seeded
/// stream of requests (the same for every router).
async fn mixed(front: &Arc<Front>, sizes: Sizes) -> Figures {
    let cpu_before = front.cpu();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(sizes.mixed_secs);
    let mut workers = tokio::task::JoinSet::new();
    for i in 0..CONCURRENCY {
        let front = Arc::clone(front);
        workers.spawn(async move {
            let mut rng = Rng::new(0x0007_0e00 + i as u64);
            let mut ran = Vec::new();
            while Instant::now() < deadline {
                let long = rng.unit() < LONG_SHARE;
                let stream = rng.unit() < STREAM_SHARE;
                let tokens = if long {
                    sizes.long_tokens
                } else {
                    sizes.short_tokens
                };
                let body = chat_body("Tell a story about a lighthouse.", tokens, stream);
                let outcome = tokio::time::timeout_at(
                    deadline + sizes.drain,
                    llama::chat(None, front.pick(), &[], &body),
                )
                .await
                .unwrap_or_else(|_| Err("cut: unfinished at the end of the drain".to_owned()));
                ran.push((outcome, Instant::now() <= deadline));
            }
            ran
        });
    }
    let mut outcomes = Outcomes::default();
    let mut in_time = 0;
    while let Some(joined) = workers.join_next().await {
        for (outcome, in_run) in joined.expect("a mixed-workload worker") {
            in_time += usize::from(outcome.is_ok() && in_run);
            outcomes.push(outcome);
        }
    }
    let cpu = cpu_before.zip(front.cpu()).map(|(a, b)| b - a);
    let mut figures = outcomes.figures(cpu);
    figures.per_s = in_time as f64 / sizes.mixed_secs as f64;
    figures
}

/// `sizes.burst` non-streamed chats at once.
async fn burst(front: &Arc<Front>, sizes: Sizes) -> Figures {
    let cpu_before = front.cpu();
    let started = Instant::now();
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..sizes.burst {
        let front = Arc::clone(front);
        let body = chat_body(
            &format!("Burst request {i}: describe a harbour at night."),
            sizes.burst_tokens,
            false,
        );
        requests.spawn(async move {
            timeout(sizes.timeout, llama::chat(None, front.pick(), &[], &body))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {:?}", sizes.timeout)))
        });
    }
    let mut outcomes = Outcomes::default();
    let mut last_s = f64::NAN;
    while let Some(joined) = requests.join_next().await {
        let outcome = joined.expect("a burst request");
        if outcome.is_ok() {
            last_s = started.elapsed().as_secs_f64();
        }
        outcomes.push(outcome);
    }
    let mut figures = outcomes.figures(cpu_before.zip(front.cpu()).map(|(a, b)| b - a));
    figures.last_s = last_s;
    figures
}

/// The system prompt every conversation of a run starts with: `rules` rules, led by the run's
/// name so no other run's conversations are in the servers' caches.
fn system_prompt(run: &str, rules: usize) -> String {
    let mut prompt = format!("You are the harbour assistant of run {run}. Follow these rules.\n");
    for i in 1..=rules {
        let _ = writeln!(
            prompt,
            "Rule {i}: answer briefly, politely and in plain English, citing rule {i} where it applies."
        );
    }
    prompt
}

const TOPICS: [&str; 6] = ["fog", "storms", "ships", "the lamp", "supplies", "visitors"];

/// `sizes.conversations` in parallel, `sizes.turns` turns each, every turn re-sending the whole
/// history, streamed, keyed with [`SESSION_HEADER`].
async fn conversations(front: &Arc<Front>, sizes: Sizes, run: &str) -> Figures {
    let cpu_before = front.cpu();
    let system = system_prompt(run, sizes.rules);
    let mut talks = tokio::task::JoinSet::new();
    for c in 0..sizes.conversations {
        let front = Arc::clone(front);
        let mut history = vec![json!({"role": "system", "content": system})];
        let session = format!("{run}-{c}");
        talks.spawn(async move {
            let mut outcomes = Vec::new();
            for turn in 1..=sizes.turns {
                let question = format!(
                    "Conversation {c}, question {turn}: what should a lighthouse keeper do about {}?",
                    TOPICS[(c + turn) % TOPICS.len()]
                );
                history.push(json!({"role": "user", "content": question}));
                let body = json!({
                    "messages": history,
                    "max_tokens": sizes.reply_tokens,
                    "ignore_eos": true,
                    "stream": true,
                });
                let outcome = timeout(
                    sizes.timeout,
                    llama::chat(None, front.pick(), &[(SESSION_HEADER, &session)], &body),
                )
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {:?}", sizes.timeout)));
                let reply = outcome.as_ref().map_or(String::new(), |a| a.content.clone());
                history.push(json!({"role": "assistant", "content": reply}));
                outcomes.push(outcome);
            }
            outcomes
        });
    }
    let mut outcomes = Outcomes::default();
    while let Some(joined) = talks.join_next().await {
        for outcome in joined.expect("a conversation") {
            outcomes.push(outcome);
        }
    }
    outcomes.figures(cpu_before.zip(front.cpu()).map(|(a, b)| b - a))
}

/// Waits until `front` answers a chat (the router up and its backends found).
async fn wait_answering(front: &Front, what: &str, log: Option<&Path>) {
    let deadline = Instant::now() + READY_TIMEOUT;
    let body = chat_body("Hello.", 2, false);
    loop {
        match llama::chat(None, front.pick(), &[], &body).await {
            Ok(_) => return,
            Err(e) if Instant::now() > deadline => panic!(
                "{what} answered no chat within {READY_TIMEOUT:?} (last: {e}); log:\n{}",
                log.map(|l| std::fs::read_to_string(l).unwrap_or_default())
                    .unwrap_or_default()
            ),
            Err(_) => sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Waits until no slot of any server is processing (a request cut by the client may still run),
/// at most a minute.
async fn wait_idle(servers: &[SocketAddr]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for &server in servers {
        loop {
            let busy = match HttpConn::connect(server).await {
                Ok(mut conn) => conn
                    .try_request("GET", "/slots", None)
                    .await
                    .ok()
                    .and_then(|r| serde_json::from_slice::<Value>(&r.body).ok())
                    .and_then(|v| {
                        v.as_array()
                            .map(|slots| slots.iter().any(|s| s["is_processing"] == true))
                    })
                    .unwrap_or(true),
                Err(_) => true,
            };
            if !busy {
                break;
            }
            if Instant::now() > deadline {
                eprintln!("steer-bench-router: {server} still busy after a minute; going on");
                return;
            }
            sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Waits until the agent lists every server healthy with its slots polled.
async fn wait_polled(admin: SocketAddr, servers: &[SocketAddr]) {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let view = match HttpConn::connect(admin).await {
            Ok(mut conn) => conn.try_request("GET", "/v1/backends", None).await.ok(),
            Err(_) => None,
        };
        let polled = view
            .and_then(|r| serde_json::from_slice::<Value>(&r.body).ok())
            .is_some_and(|v| {
                servers.iter().all(|s| {
                    v["backends"].as_array().is_some_and(|bs| {
                        bs.iter().any(|b| {
                            b["address"] == s.to_string()
                                && b["healthy"] == true
                                && b["total_slots"].as_u64().is_some()
                        })
                    })
                })
            });
        if polled {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not list the servers healthy and polled within {READY_TIMEOUT:?}"
        );
        sleep(Duration::from_millis(100)).await;
    }
}

fn steer_config(
    policy: &str,
    admin: SocketAddr,
    vip: SocketAddr,
    servers: &[SocketAddr],
) -> String {
    let mut config = format!(
        "[agent]\ninterfaces = [\"lo\"]\nadmin_addr = \"{admin}\"\ndataplane = \"userspace\"\n\
         admin_token_file = \"admin.token\"\n\n[[service]]\nname = \"chat\"\naddress = \"{vip}\"\n\
         mode = \"http\"\npolicy = \"{policy}\"\n\n[service.slots]\ninterval = \"500ms\"\n"
    );
    for server in servers {
        let _ = write!(config, "\n[[service.backend]]\naddress = \"{server}\"\n");
    }
    config
}

/// Whether `steer check-config` accepts `config`; says why not on stderr.
fn steer_accepts(path: &Path, policy: &str) -> bool {
    let out = Command::new(steer_bin())
        .args(["check-config", "--config"])
        .arg(path)
        .output()
        .expect("run steer check-config");
    if !out.status.success() {
        eprintln!(
            "steer-bench-router: SKIPPING steer {policy}: this agent refuses it:\n{}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    out.status.success()
}

/// Starts `router` in front of `servers`; `None` when it cannot run here (said on stderr).
async fn start(
    router: &Router,
    dir: &Path,
    servers: &[SocketAddr],
    vllm: Option<&Path>,
) -> Option<Front> {
    let front = |targets, router| Front {
        targets,
        next: AtomicUsize::new(0),
        router,
    };
    match router {
        Router::ClientRoundRobin => Some(front(servers.to_vec(), None)),
        Router::Steer(policy) => {
            let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let vip = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let path = dir.join(format!("steer-{policy}.toml"));
            write_atomic(&path, steer_config(policy, admin, vip, servers).as_bytes())
                .expect("write the agent config");
            if !steer_accepts(&path, policy) {
                return None;
            }
            let log = dir.join(format!("steer-{policy}.log"));
            let config = path.display().to_string();
            let agent = spawn_logged_here(
                &steer_bin(),
                &["run", "--config", &config, "--log-level", "warn"],
                &log,
            );
            let front = front(vec![vip], Some(agent));
            wait_polled(admin, servers).await;
            wait_answering(&front, &router.name(), Some(&log)).await;
            Some(front)
        }
        Router::Vllm(policy) => {
            let vllm = vllm?;
            let port = free_port().to_string();
            let urls: Vec<String> = servers.iter().map(|s| format!("http://{s}")).collect();
            let mut args = vec!["--host", "127.0.0.1", "--port", &port, "--policy", policy];
            args.push("--worker-urls");
            args.extend(urls.iter().map(String::as_str));
            let log = dir.join(format!("vllm-router-{policy}.log"));
            let child = spawn_logged_here(vllm, &args, &log);
            let addr = SocketAddr::from(([127, 0, 0, 1], port.parse().expect("a port")));
            let front = front(vec![addr], Some(child));
            wait_answering(&front, &router.name(), Some(&log)).await;
            Some(front)
        }
    }
}

/// vllm-router from `bench/install-vllm-router.sh` (which installs it when missing): the path
/// it prints last. `None`, said loudly, when it cannot be installed.
fn install_vllm_router() -> Option<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/install-vllm-router.sh");
    let out = Command::new("sh").arg(&script).output();
    match out {
        Ok(out) if out.status.success() => {
            let stdout = String::from_utf8_lossy(&out.stdout);
            stdout.lines().last().map(PathBuf::from)
        }
        Ok(out) => {
            eprintln!(
                "steer-bench-router: SKIPPING vllm-router: {} failed:\n{}",
                script.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            None
        }
        Err(e) => {
            eprintln!(
                "steer-bench-router: SKIPPING vllm-router: running {}: {e}",
                script.display()
            );
            None
        }
    }
}

/// Each server's generation speed alone: one chat straight to it, one after the other.
async fn decode_speeds(servers: &[SocketAddr], tokens: u32) -> Vec<f64> {
    let mut speeds = Vec::new();
    for &server in servers {
        let body = chat_body("Tell a story about a lighthouse.", tokens, false);
        let answer = llama::chat(None, server, &[], &body).await;
        speeds.push(answer.ok().and_then(|a| a.decode_per_s).unwrap_or(f64::NAN));
    }
    speeds
}

fn run_all(sizes: Sizes, dir: &Path, only: &[String]) -> (Vec<RouterRun>, Vec<f64>, String) {
    let vllm = install_vllm_router();
    let servers: Vec<SocketAddr> = SERVERS
        .iter()
        .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
        .collect();
    // Declared before the servers, so it is removed after they are stopped.
    let cap = CpuCap::new("steer-bench-router", SLOW_SHARE).unwrap_or_else(|e| {
        panic!(
            "creating a cpu cgroup under /sys/fs/cgroup (needs root and the cpu controller): {e}"
        )
    });
    let llamas: Vec<ChildGuard> = SERVERS
        .iter()
        .zip(&servers)
        .map(|(alias, addr)| {
            let args = server_args(alias, SLOTS, 1, "127.0.0.1", addr.port());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            spawn_logged_here(
                &llama_server_path(),
                &args,
                &dir.join(format!("{alias}.log")),
            )
        })
        .collect();
    let slow = llamas.last().expect("a slow server");
    cap.add(slow.id())
        .expect("put the slow server in its cgroup");
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async {
        for &server in &servers {
            let one = Front {
                targets: vec![server],
                next: AtomicUsize::new(0),
                router: None,
            };
            wait_answering(&one, &format!("llama-server {server}"), None).await;
        }
        let speeds = decode_speeds(&servers, sizes.long_tokens).await;
        let routers = Router::all()
            .into_iter()
            .filter(|router| only.is_empty() || only.contains(&router.name()));
        let mut runs = Vec::new();
        for router in routers {
            let name = router.name();
            let Some(front) = start(&router, dir, &servers, vllm.as_deref()).await else {
                continue;
            };
            let front = Arc::new(front);
            eprintln!("steer-bench-router: {name}: mixed, {} s", sizes.mixed_secs);
            let mixed = mixed(&front, sizes).await;
            wait_idle(&servers).await;
            eprintln!("steer-bench-router: {name}: a burst of {}", sizes.burst);
            let burst = burst(&front, sizes).await;
            wait_idle(&servers).await;
            eprintln!(
                "steer-bench-router: {name}: {} conversations",
                sizes.conversations
            );
            let conversations = conversations(&front, sizes, &name.replace(' ', "-")).await;
            wait_idle(&servers).await;
            for (workload, f) in [
                ("mixed", &mixed),
                ("burst", &burst),
                ("conversations", &conversations),
            ] {
                if let Some(e) = &f.failure {
                    eprintln!(
                        "steer-bench-router: {name}: {workload}: {} failed, e.g. {e}",
                        f.failed
                    );
                }
            }
            runs.push(RouterRun {
                router: name.clone(),
                mixed,
                burst,
                conversations,
            });
            if let Some(child) = Arc::into_inner(front).and_then(|f| f.router) {
                stop(child, &name);
            }
        }
        (runs, speeds, cap.describe())
    })
}

/// A figure beside its baseline: `x` and the ratio, or `-` when either is missing.
fn times(x: f64, base: f64) -> String {
    let r = ratio(x, base);
    if r.is_finite() {
        format!("{r:.2}x")
    } else {
        "-".to_owned()
    }
}

fn ms(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "-".to_owned()
    }
}

/// The best vllm-router figure of `f` (`max`: higher is better) and the client's round robin's.
fn baselines(runs: &[RouterRun], f: impl Fn(&RouterRun) -> f64, max: bool) -> (f64, f64) {
    let vllm = runs
        .iter()
        .filter(|r| r.router.starts_with("vllm-router"))
        .map(&f)
        .filter(|v| v.is_finite())
        .reduce(|a, b| if max == (b > a) { b } else { a })
        .unwrap_or(f64::NAN);
    let rr = runs
        .iter()
        .find(|r| r.router == Router::ClientRoundRobin.name())
        .map_or(f64::NAN, &f);
    (vllm, rr)
}

fn tables(runs: &[RouterRun], sizes: Sizes) -> String {
    let mut md = String::new();
    let req_s = baselines(runs, |r| r.mixed.per_s, true);
    let p99 = baselines(runs, |r| r.mixed.latency.1, false);
    let ttft99 = baselines(runs, |r| r.mixed.ttft.1, false);
    let _ = writeln!(
        md,
        "Mixed closed loop ({CONCURRENCY} in flight, {} s, 30% `max_tokens` {} / 70% {}, half \
         streamed); ratios to the best vllm-router figure and to the client's round robin.\n\n\
         | router | req/s | x vllm | x client rr | latency p50 s | latency p99 s | x vllm | x client rr | TTFT p99 s | x vllm | x client rr | failed | router CPU ms/req |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        sizes.mixed_secs, sizes.long_tokens, sizes.short_tokens
    );
    for r in runs {
        let m = &r.mixed;
        let _ = writeln!(
            md,
            "| {} | {:.2} | {} | {} | {:.2} | {:.2} | {} | {} | {:.2} | {} | {} | {} | {} |",
            r.router,
            m.per_s,
            times(m.per_s, req_s.0),
            times(m.per_s, req_s.1),
            m.latency.0,
            m.latency.1,
            times(m.latency.1, p99.0),
            times(m.latency.1, p99.1),
            m.ttft.1,
            times(m.ttft.1, ttft99.0),
            times(m.ttft.1, ttft99.1),
            m.failed,
            ms(m.cpu_ms)
        );
    }
    let last = baselines(runs, |r| r.burst.last_s, false);
    let _ = writeln!(
        md,
        "\nBurst of {} non-streamed chats at once (`max_tokens` {}); time of the last answer.\n\n\
         | router | completed | last done s | x vllm | x client rr | router CPU ms/req |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |",
        sizes.burst, sizes.burst_tokens
    );
    for r in runs {
        let b = &r.burst;
        let _ = writeln!(
            md,
            "| {} | {}/{} | {:.2} | {} | {} | {} |",
            r.router,
            b.completed,
            b.sent,
            b.last_s,
            times(b.last_s, last.0),
            times(b.last_s, last.1),
            ms(b.cpu_ms)
        );
    }
    let ttft50 = baselines(runs, |r| r.conversations.ttft.0, false);
    let ttft_mean = baselines(runs, |r| r.conversations.ttft_mean, false);
    let prompt = baselines(runs, |r| r.conversations.prompt_tokens as f64, false);
    let _ = writeln!(
        md,
        "\n{} conversations in parallel, {} turns each re-sending the history (a system prompt of \
         about {} tokens), `max_tokens` {}, `{SESSION_HEADER}` per conversation; prompt tokens: \
         what the servers evaluated (`timings.prompt_n`, summed).\n\n\
         | router | TTFT p50 s | x vllm | x client rr | TTFT mean s | x vllm | x client rr | TTFT p99 s | prompt tokens | x vllm | x client rr | failed | router CPU ms/req |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        sizes.conversations,
        sizes.turns,
        TOKENS_PER_RULE * sizes.rules,
        sizes.reply_tokens
    );
    for r in runs {
        let c = &r.conversations;
        let _ = writeln!(
            md,
            "| {} | {:.3} | {} | {} | {:.3} | {} | {} | {:.3} | {} | {} | {} | {} | {} |",
            r.router,
            c.ttft.0,
            times(c.ttft.0, ttft50.0),
            times(c.ttft.0, ttft50.1),
            c.ttft_mean,
            times(c.ttft_mean, ttft_mean.0),
            times(c.ttft_mean, ttft_mean.1),
            c.ttft.1,
            c.prompt_tokens,
            times(c.prompt_tokens as f64, prompt.0),
            times(c.prompt_tokens as f64, prompt.1),
            c.failed,
            ms(c.cpu_ms)
        );
    }
    md
}

fn figures_json(f: &Figures) -> Value {
    json!({
        "sent": f.sent,
        "completed": f.completed,
        "failed": f.failed,
        "failure_example": f.failure,
        "completed_per_s": f.per_s,
        "latency_p50_s": f.latency.0,
        "latency_p99_s": f.latency.1,
        "ttft_p50_s": f.ttft.0,
        "ttft_p99_s": f.ttft.1,
        "ttft_mean_s": f.ttft_mean,
        "last_done_s": f.last_s,
        "prompt_tokens_evaluated": f.prompt_tokens,
        "router_cpu_ms_per_request": f.cpu_ms,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !netns::is_root() {
        eprintln!("steer-bench-router needs root (a cpu cgroup): run `cargo xtask bench`");
        return ExitCode::FAILURE;
    }
    let sizes = if args.run.quick { QUICK } else { FULL };
    let dir = std::env::temp_dir().join(format!("steer-bench-router-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    tests::admin::token_file(&dir);
    let known: Vec<String> = Router::all().iter().map(Router::name).collect();
    if let Some(unknown) = args.routers.iter().find(|name| !known.contains(name)) {
        eprintln!(
            "steer-bench-router: no router `{unknown}`; there are: {}",
            known.join(", ")
        );
        return ExitCode::FAILURE;
    }
    let (runs, speeds, cap) = run_all(sizes, &dir, &args.routers);
    let mut md = format!(
        "Servers alone, generation tokens/s: {}.\n\n",
        SERVERS
            .iter()
            .zip(&speeds)
            .map(|(s, v)| format!("{s} {v:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    md.push_str(&tables(&runs, sizes));
    println!("\n{md}");
    let code = match &args.run.out {
        Some(out) => {
            let json = json!({
                "method": "3 llama-servers on loopback (2 slots, 1 thread each), the last \
                           CPU-capped; each router in turn in front of them; one new \
                           connection per request",
                "quick": args.run.quick,
                "servers": SERVERS,
                "slots_per_server": SLOTS,
                "slow_cpu_share": SLOW_SHARE,
                "slow_cgroup": cap,
                "decode_tokens_per_s_alone": speeds,
                "sizes": {
                    "mixed_seconds": sizes.mixed_secs,
                    "concurrency": CONCURRENCY,
                    "short_max_tokens": sizes.short_tokens,
                    "long_max_tokens": sizes.long_tokens,
                    "long_share": LONG_SHARE,
                    "stream_share": STREAM_SHARE,
                    "burst": sizes.burst,
                    "burst_max_tokens": sizes.burst_tokens,
                    "conversations": sizes.conversations,
                    "turns": sizes.turns,
                    "system_prompt_rules": sizes.rules,
                    "reply_max_tokens": sizes.reply_tokens,
                },
                "runs": runs.iter().map(|r| json!({
                    "router": r.router,
                    "mixed": figures_json(&r.mixed),
                    "burst": figures_json(&r.burst),
                    "conversations": figures_json(&r.conversations),
                })).collect::<Vec<_>>(),
            });
            save_results("steer-bench-router", out, &json, &md)
        }
        None => ExitCode::SUCCESS,
    };
    let _ = std::fs::remove_dir_all(&dir);
    code
}
