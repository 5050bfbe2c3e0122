//! `cargo xtask bench`: the connection flood of issue 11 (finding 2). The agent runs under
//! systemd's descriptor limit (`RLIMIT_NOFILE` 1024, hard 1024), every cap and timeout at its
//! default, in front of two `steer-test-backend`s with an http service. A fixed-rate client
//! ([`fixed_rate`], open loop, from its own address) runs `GET /whoami` through the service, once
//! with a new connection per request and once on keep-alive connections, while a probe asks the
//! admin API for `GET /v1/backends` every 50 ms; then the same again while `N` idle connections
//! (every other one a half-sent request head) are held open to the admin API and `N` to the
//! service address. Figures: requests failed (target: none) and not sent (the client keeps at
//! most `MAX_OUTSTANDING` outstanding), latency p50/p99 and their ratio to
//! the run without the flood, admin probes failed, and whether every probe saw both backends
//! healthy.
//!
//! Prints a markdown table and writes the figures as JSON (`--out`, the table beside it).

#![expect(
    clippy::print_stdout,
    reason = "the benchmark's table is for a person to read"
)]

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};
use tests::bench::{Fixed, RunArgs, fixed_rate, p50_p99, ratio, save_results};
use tests::flood::Flood;
use tests::netns;
use tests::topology::{ADMIN_ADDR, HttpConn, Topology, VIP, sibling_binary};

#[derive(Parser)]
#[command(about = "Requests through an http service and the admin API beside an idle flood")]
struct Args {
    #[command(flatten)]
    run: RunArgs,
}

/// The offered load: far below the path's capacity, so any failure is the flood's.
const RATE: f64 = 200.0;
/// The admin probe's period.
const PROBE_EVERY: Duration = Duration::from_millis(50);

/// What the admin probe saw during one run.
#[derive(Debug, Default)]
struct Probes {
    sent: u64,
    failed: u64,
    /// Answers in which a backend was not healthy.
    unhealthy: u64,
    p99_ms: f64,
}

/// One client mode's runs: without and with the flood.
struct Row {
    mode: &'static str,
    quiet: (Fixed, Probes),
    flooded: (Fixed, Probes),
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !netns::is_root() {
        eprintln!("steer-bench-flood needs root (network namespaces): run `cargo xtask bench`");
        return ExitCode::FAILURE;
    }
    let (secs, flood) = if args.run.quick { (1, 300) } else { (10, 3000) };
    let (rows, opened) = run(secs, flood);
    let md = table(&rows, flood, opened, secs);
    println!("\n{md}");
    match args.run.out {
        Some(out) => save_results(
            "steer-bench-flood",
            &out,
            &json(&rows, flood, opened, secs),
            &md,
        ),
        None => ExitCode::SUCCESS,
    }
}

/// Every run on one topology; also how many flood connections opened (admin, service).
fn run(secs: u32, flood: usize) -> (Vec<Row>, (usize, usize)) {
    let backend = sibling_binary("steer-test-backend");
    let mut topo = Topology::new("bfl", "round_robin", 2, &backend);
    topo.add_service_settings("mode = \"http\"");
    topo.set_agent_open_files(1024, 1024);
    topo.start_agent();
    let from = topo.add_client_addresses(1)[0];
    let modes = [("new connection per request", true), ("keep-alive", false)];
    // Warm-up (neighbours, the proxy's pool, page cache), not counted.
    measure(&topo, from, 1, true);
    let quiet: Vec<_> = modes
        .iter()
        .map(|&(_, fresh)| measure(&topo, from, secs, fresh))
        .collect();
    let admin = Flood::open(&topo.lb, SocketAddr::V4(ADMIN_ADDR), flood);
    let service = Flood::open(&topo.client, SocketAddr::V4(VIP), flood);
    let opened = (admin.len(), service.len());
    let flooded: Vec<_> = modes
        .iter()
        .map(|&(_, fresh)| measure(&topo, from, secs, fresh))
        .collect();
    drop((admin, service));
    let rows = modes
        .iter()
        .zip(quiet.into_iter().zip(flooded))
        .map(|(&(mode, _), (quiet, flooded))| Row {
            mode,
            quiet,
            flooded,
        })
        .collect();
    (rows, opened)
}

/// The fixed-rate client for `secs` from `from`, with the admin probe running beside it.
fn measure(topo: &Topology, from: Ipv4Addr, secs: u32, fresh: bool) -> (Fixed, Probes) {
    let until = Instant::now() + Duration::from_secs(u64::from(secs));
    std::thread::scope(|scope| {
        let probes = scope.spawn(|| topo.lb.block_on(|| probe(until)));
        let targets = [VIP];
        let fixed = topo
            .client
            .block_on(|| async { fixed_rate(from, &targets, "/whoami", RATE, secs, fresh).await });
        let probes = probes
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        (fixed, probes)
    })
}

/// `GET /v1/backends` on a new connection every [`PROBE_EVERY`] until `until`.
async fn probe(until: Instant) -> Probes {
    let mut probes = Probes::default();
    let mut latencies = Vec::new();
    while Instant::now() < until {
        let began = Instant::now();
        probes.sent += 1;
        let answer = async {
            let mut conn = HttpConn::connect(SocketAddr::V4(ADMIN_ADDR)).await?;
            conn.try_request("GET", "/v1/backends", None).await
        };
        match answer.await {
            Ok(response) if response.status == 200 => {
                latencies.push(began.elapsed().as_secs_f64() * 1e3);
                let view: Value = serde_json::from_slice(&response.body).unwrap_or_default();
                let healthy = view["backends"]
                    .as_array()
                    .is_some_and(|all| all.iter().all(|b| b["healthy"] == true));
                probes.unhealthy += u64::from(!healthy);
            }
            _ => probes.failed += 1,
        }
        tokio::time::sleep_until((began + PROBE_EVERY).into()).await;
    }
    (_, probes.p99_ms) = p50_p99(&mut latencies);
    probes
}

fn table(rows: &[Row], flood: usize, opened: (usize, usize), secs: u32) -> String {
    let mut md = format!(
        "Connection flood: {} of {flood} idle connections held open to the admin API and {} of \
         {flood} to the http service address (every other one a half-sent head), agent at \
         RLIMIT_NOFILE 1024 with default caps; `GET /whoami` at {RATE:.0}/s for {secs} s per run, \
         the admin API probed every {} ms.\n\n\
         | client | flood | requests | failed | not sent | p50 ms | p99 ms | p99 x quiet | admin probes | \
         failed | backend unhealthy |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        opened.0,
        opened.1,
        PROBE_EVERY.as_millis()
    );
    for row in rows {
        for (flood, (fixed, probes)) in [("none", &row.quiet), ("on", &row.flooded)] {
            let _ = writeln!(
                md,
                "| {} | {flood} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
                row.mode,
                fixed.completed + fixed.errors + fixed.late,
                fixed.errors,
                fixed.late,
                fixed.p50_ms,
                fixed.p99_ms,
                ratio(fixed.p99_ms, row.quiet.0.p99_ms),
                probes.sent,
                probes.failed,
                probes.unhealthy,
            );
        }
    }
    md
}

fn json(rows: &[Row], flood: usize, opened: (usize, usize), secs: u32) -> Value {
    let run = |(fixed, probes): &(Fixed, Probes), quiet: &Fixed| {
        json!({
            "requests": fixed.completed + fixed.errors + fixed.late,
            "failed": fixed.errors,
            "late": fixed.late,
            "p50_ms": fixed.p50_ms,
            "p99_ms": fixed.p99_ms,
            "p50_vs_quiet": ratio(fixed.p50_ms, quiet.p50_ms),
            "p99_vs_quiet": ratio(fixed.p99_ms, quiet.p99_ms),
            "admin_probes": probes.sent,
            "admin_probes_failed": probes.failed,
            "admin_probes_unhealthy": probes.unhealthy,
            "admin_p99_ms": probes.p99_ms,
        })
    };
    json!({
        "method": "client, LB and 2 backend namespaces; agent at RLIMIT_NOFILE 1024/1024, \
                   defaults; open-loop GET /whoami through an http service beside an admin \
                   API probe, without and with idle floods to both",
        "flood_per_target": flood,
        "opened": {"admin": opened.0, "service": opened.1},
        "rate_per_s": RATE,
        "seconds_per_run": secs,
        "rows": rows.iter().map(|row| json!({
            "client": row.mode,
            "quiet": run(&row.quiet, &row.quiet.0),
            "flooded": run(&row.flooded, &row.quiet.0),
        })).collect::<Vec<_>>(),
    })
}
