//! `cargo xtask bench`: chaos. The agent supervises three real llama-servers (the test model,
//! one slot each) as the backends of one `http` service on loopback; a steady closed-loop
//! client load runs first with no kills (the baseline), then while one llama-server is
//! SIGKILLed every few seconds, round robin across the three.
//!
//! Per phase: requests sent, answered 200, failed; of the failed, how many were in flight when
//! a server was killed (started before the kill, ended after it: the ones a kill may cut);
//! the time with no instance able to take a request (no backend both healthy and active, seen
//! by polling `GET /v1/backends` every [`POLL`]); and per kill the time until the killed
//! instance's backend took requests again (its revival, to that poll's resolution).
//!
//! Full run: a 60 s baseline, then 180 s with a kill every 5 s; `--quick`: 6 s and 14 s with a
//! kill every 3 s (a smoke). Prints markdown, writes JSON (`--out`, the table beside it).

#![expect(
    clippy::print_stdout,
    reason = "the benchmark's table is for a person to read"
)]

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    process::{Command, ExitCode, Stdio},
    time::Duration,
};

use clap::Parser;
use serde_json::{Value, json};
use tests::{
    bench::{RunArgs, free_port, p50_p99, save_results},
    llama::{llama_server_path, model_path},
    topology::steer_bin,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{Instant, sleep, timeout},
};

#[derive(Parser)]
#[command(about = "Steer under SIGKILLs of its supervised llama-servers")]
struct Args {
    #[command(flatten)]
    run: RunArgs,
}

const INSTANCES: [&str; 3] = ["a", "b", "c"];
/// Closed-loop clients: one per slot, so each server is busy most of the time and a kill finds
/// a request in flight.
const WORKERS: usize = 3;
/// Each answer generates exactly this many tokens.
const TOKENS: u32 = 16;
/// How often the backends are polled for the zero-up time and the revivals.
const POLL: Duration = Duration::from_millis(20);
/// A request (or poll) that takes longer is counted failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the three servers to come up healthy at start.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// One request: when it started and ended (since the phase began), and why it failed.
#[derive(Debug, Clone)]
struct Request {
    start: f64,
    end: f64,
    /// `None`: 200.
    error: Option<String>,
}

/// One poll of the backends: when, and which instances' backends take requests.
#[derive(Debug, Clone)]
struct Sample {
    at: f64,
    up: Vec<String>,
}

/// One phase's figures.
#[derive(Debug)]
struct Phase {
    name: &'static str,
    seconds: f64,
    sent: usize,
    ok: usize,
    failed: usize,
    failed_in_flight_at_kill: usize,
    /// The other failures by reason (status line or transport error).
    other_failures: std::collections::BTreeMap<String, usize>,
    per_s: f64,
    latency: (f64, f64),
    kills: usize,
    /// Seconds with no backend taking requests.
    zero_up_s: f64,
    /// Seconds with fewer than all backends taking requests.
    degraded_s: f64,
    /// Per kill: seconds until the instance's backend took requests again (None: not within
    /// the phase).
    revivals: Vec<Option<f64>>,
}

/// `GET`/`POST` with `Connection: close` on a new connection; the status and the body.
async fn http(
    to: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), String> {
    let exchange = async {
        let mut conn = TcpStream::connect(to)
            .await
            .map_err(|e| format!("connect {to}: {e}"))?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: steer\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&answer).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status line in {:?}", text.lines().next()))?;
        let body = text
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, b)| b.to_owned());
        Ok((status, body))
    };
    timeout(REQUEST_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {REQUEST_TIMEOUT:?}")))
}

async fn admin_json(admin: SocketAddr, path: &str) -> Result<Value, String> {
    let (status, body) = http(admin, "GET", path, "").await?;
    if status != 200 {
        return Err(format!("GET {path}: {status} {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("GET {path}: {e}: {body}"))
}

/// The instances whose backends take requests now (healthy and active).
async fn up(admin: SocketAddr) -> Result<Vec<String>, String> {
    let list = admin_json(admin, "/v1/backends").await?;
    Ok(list["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["healthy"] == true && b["state"] == "active")
        .filter_map(|b| b["instance"].as_str().map(str::to_owned))
        .collect())
}

/// Runs the load for `secs`, killing one llama-server every `kill_every` (round robin) when set.
async fn phase(
    name: &'static str,
    vip: SocketAddr,
    admin: SocketAddr,
    secs: u64,
    kill_every: Option<Duration>,
) -> Phase {
    let began = Instant::now();
    let deadline = began + Duration::from_secs(secs);
    let since = move || began.elapsed().as_secs_f64();
    let body = json!({
        "messages": [{"role": "user", "content": "Tell a story about a lighthouse."}],
        "max_tokens": TOKENS,
        "ignore_eos": true,
    })
    .to_string();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..WORKERS {
        let body = body.clone();
        workers.spawn(async move {
            let mut done = Vec::new();
            while Instant::now() < deadline {
                let start = since();
                let error = match http(vip, "POST", "/v1/chat/completions", &body).await {
                    Ok((200, _)) => None,
                    Ok((status, body)) => Some(format!("{status} {body}")),
                    Err(error) => Some(error),
                };
                let ok = error.is_none();
                done.push(Request {
                    start,
                    end: since(),
                    error,
                });
                if !ok {
                    // Not a hot loop while nothing is up.
                    sleep(Duration::from_millis(10)).await;
                }
            }
            done
        });
    }
    let poller = tokio::spawn(async move {
        let mut samples = Vec::new();
        while Instant::now() < deadline {
            let at = since();
            samples.push(Sample {
                at,
                up: up(admin).await.unwrap_or_default(),
            });
            sleep(POLL).await;
        }
        samples
    });
    let mut kills: Vec<(f64, String)> = Vec::new();
    if let Some(every) = kill_every {
        let mut next = 0;
        loop {
            sleep(every).await;
            if Instant::now() + every / 2 > deadline {
                break;
            }
            let instance = INSTANCES[next % INSTANCES.len()];
            next += 1;
            let path = format!("/v1/instances/{instance}/params");
            let pid = admin_json(admin, &path)
                .await
                .ok()
                .and_then(|s| s["pid"].as_i64());
            let Some(pid) = pid else {
                eprintln!("chaos: {instance} has no running llama-server to kill; skipped");
                continue;
            };
            let at = since();
            match nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            ) {
                Ok(()) => kills.push((at, instance.to_owned())),
                Err(e) => eprintln!("chaos: SIGKILL {instance} (pid {pid}): {e}"),
            }
        }
    }
    let mut requests = Vec::new();
    while let Some(joined) = workers.join_next().await {
        requests.extend(joined.expect("a load worker"));
    }
    let samples = poller.await.expect("the poller");
    summarize(name, secs as f64, &requests, &samples, &kills)
}

fn summarize(
    name: &'static str,
    seconds: f64,
    requests: &[Request],
    samples: &[Sample],
    kills: &[(f64, String)],
) -> Phase {
    let ok = requests.iter().filter(|r| r.error.is_none()).count();
    let failed: Vec<&Request> = requests.iter().filter(|r| r.error.is_some()).collect();
    let at_kill = |r: &Request| kills.iter().any(|(at, _)| r.start <= *at && *at <= r.end);
    let failed_in_flight_at_kill = failed.iter().filter(|r| at_kill(r)).count();
    let mut other_failures = std::collections::BTreeMap::new();
    for r in failed.iter().filter(|r| !at_kill(r)) {
        let reason = r.error.clone().unwrap_or_default();
        *other_failures.entry(reason).or_insert(0) += 1;
    }
    let mut latencies: Vec<f64> = requests
        .iter()
        .filter(|r| r.error.is_none())
        .map(|r| r.end - r.start)
        .collect();
    let all = INSTANCES.len();
    let (mut zero_up_s, mut degraded_s) = (0.0, 0.0);
    for pair in samples.windows(2) {
        let span = pair[1].at - pair[0].at;
        if pair[0].up.is_empty() {
            zero_up_s += span;
        }
        if pair[0].up.len() < all {
            degraded_s += span;
        }
    }
    let revivals = kills
        .iter()
        .map(|(at, instance)| {
            // The first poll after the kill that saw it out, then the first that saw it back.
            let out = samples
                .iter()
                .position(|s| s.at >= *at && !s.up.contains(instance))?;
            samples[out..]
                .iter()
                .find(|s| s.up.contains(instance))
                .map(|s| s.at - at)
        })
        .collect();
    Phase {
        name,
        seconds,
        sent: requests.len(),
        ok,
        failed: failed.len(),
        failed_in_flight_at_kill,
        other_failures,
        per_s: ok as f64 / seconds,
        latency: p50_p99(&mut latencies),
        kills: kills.len(),
        zero_up_s,
        degraded_s,
        revivals,
    }
}

/// The agent's config: one http service on loopback, its three instances as backends.
fn config(dir: &Path, admin: SocketAddr, vip: SocketAddr, ports: &[u16]) -> String {
    let mut text = format!(
        "[agent]\ninterfaces = [\"lo\"]\nadmin_addr = \"{admin}\"\ndataplane = \"userspace\"\n\
         admin_token_file = \"admin.token\"\n\n[[service]]\nname = \"chat\"\naddress = \"{vip}\"\n\
         mode = \"http\"\npolicy = \"round_robin\"\n"
    );
    let (binary, model) = (llama_server_path(), model_path());
    for (name, port) in INSTANCES.iter().zip(ports) {
        let store = dir.join(format!("{name}.args.toml"));
        let _ = write!(
            text,
            "\n[[instance]]\nname = \"{name}\"\nbinary = {binary:?}\nmodel = {model:?}\n\
             port = {port}\nargs = [\"-np\", \"1\", \"-c\", \"1024\", \"-t\", \"1\", \"--host\", \
             \"127.0.0.1\"]\nservice = \"chat\"\naddress = \"127.0.0.1:{port}\"\n\
             drain_timeout = \"5s\"\nconfig_driver = {{ type = \"file\", path = {store:?}, \
             name = \"{name}\" }}\n"
        );
    }
    text
}

/// The agent process; SIGTERM and a bounded wait on drop (it stops its llama-servers).
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..300 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("steer still running 30 s after SIGTERM; killing it");
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(dir: &Path, config: &str) -> Agent {
    tests::admin::token_file(dir);
    let path = dir.join("steer.toml");
    std::fs::write(&path, config).expect("write the config");
    let log = std::fs::File::create(dir.join("steer.log")).expect("agent log");
    let child = Command::new(steer_bin())
        .args(["run", "--config"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log)
        .spawn()
        .expect("start steer");
    Agent(child)
}

fn fmt_s(s: Option<f64>) -> String {
    s.map_or_else(|| "-".to_owned(), |s| format!("{s:.2}"))
}

fn markdown(phases: &[Phase], kill_every: Duration) -> String {
    let mut md = format!(
        "| phase | s | sent | 200 | failed | of which in flight at a kill | answers/s | latency p50 / p99 (s) | kills (every {:.0} s) | no instance up (s) | fewer than 3 up (s) | revival p50 / max (s) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        kill_every.as_secs_f64()
    );
    for p in phases {
        let mut revived: Vec<f64> = p.revivals.iter().flatten().copied().collect();
        let (p50, _) = p50_p99(&mut revived);
        let max = revived.iter().copied().fold(f64::NAN, f64::max);
        let revival = if p.kills == 0 {
            "-".to_owned()
        } else {
            format!(
                "{} / {} ({} of {} back)",
                fmt_s(Some(p50)),
                fmt_s(Some(max)),
                revived.len(),
                p.kills
            )
        };
        let _ = writeln!(
            md,
            "| {} | {:.0} | {} | {} | {} | {} | {:.2} | {:.2} / {:.2} | {} | {:.2} | {:.2} | {} |",
            p.name,
            p.seconds,
            p.sent,
            p.ok,
            p.failed,
            p.failed_in_flight_at_kill,
            p.per_s,
            p.latency.0,
            p.latency.1,
            p.kills,
            p.zero_up_s,
            p.degraded_s,
            revival
        );
    }
    for p in phases.iter().filter(|p| !p.other_failures.is_empty()) {
        let _ = writeln!(
            md,
            "\nFailures in \"{}\" not in flight at a kill:\n",
            p.name
        );
        for (reason, n) in &p.other_failures {
            let _ = writeln!(md, "- {n} x `{}`", reason.replace('\n', " "));
        }
    }
    md
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (baseline_s, chaos_s, kill_every) = if args.run.quick {
        (6, 14, Duration::from_secs(3))
    } else {
        (60, 180, Duration::from_secs(5))
    };
    let dir = std::env::temp_dir().join(format!("steer-bench-chaos-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let vip = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let ports: Vec<u16> = INSTANCES.iter().map(|_| free_port()).collect();
    let agent = start_agent(&dir, &config(&dir, admin, vip, &ports));
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let phases = runtime.block_on(async {
        let ready = Instant::now() + READY_TIMEOUT;
        while up(admin).await.map_or(0, |u| u.len()) < INSTANCES.len() {
            assert!(
                Instant::now() < ready,
                "the three instances not up within {READY_TIMEOUT:?}; agent log in {}",
                dir.display()
            );
            sleep(Duration::from_millis(100)).await;
        }
        let baseline = phase("no kills", vip, admin, baseline_s, None).await;
        let chaos = phase(
            "SIGKILL one llama-server",
            vip,
            admin,
            chaos_s,
            Some(kill_every),
        )
        .await;
        vec![baseline, chaos]
    });
    drop(agent);
    let md = markdown(&phases, kill_every);
    println!("\n{md}");
    let json = json!({
        "quick": args.run.quick,
        "instances": INSTANCES.len(),
        "workers": WORKERS,
        "tokens": TOKENS,
        "kill_every_s": kill_every.as_secs_f64(),
        "poll_ms": POLL.as_millis() as u64,
        "phases": phases.iter().map(|p| json!({
            "name": p.name,
            "seconds": p.seconds,
            "sent": p.sent,
            "ok": p.ok,
            "failed": p.failed,
            "failed_in_flight_at_kill": p.failed_in_flight_at_kill,
            "other_failures": p.other_failures,
            "answers_per_s": p.per_s,
            "latency_p50_s": p.latency.0,
            "latency_p99_s": p.latency.1,
            "kills": p.kills,
            "zero_up_s": p.zero_up_s,
            "degraded_s": p.degraded_s,
            "revival_s": p.revivals,
        })).collect::<Vec<_>>(),
    });
    let code = match &args.run.out {
        Some(out) => save_results("steer-bench-chaos", out, &json, &md),
        None => ExitCode::SUCCESS,
    };
    let _ = std::fs::remove_dir_all(&dir);
    code
}
