//! `cargo xtask bench`: the L4 userspace path's byte relay, `splice(2)` (what the proxy uses)
//! beside a copy through a userspace buffer (`tokio::io::copy`) measured in the same run.
//!
//! A sender thread writes a fixed number of bytes into a loopback connection, the relay under
//! test moves them to a second connection on its own single-threaded runtime and thread, and a
//! sink thread reads them. Figures: throughput, and the relay thread's CPU time per GiB
//! (`CLOCK_THREAD_CPUTIME_ID`), which is what zero copy saves. Each method runs alternately, and
//! the median of the runs is reported.
//!
//! Prints a markdown table and writes the figures as JSON (`--out`) with the table beside it.

#![expect(
    clippy::print_stdout,
    reason = "the benchmark's table is for a person to read"
)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use lb_userspace::proxy::splice;
use nix::time::{ClockId, clock_gettime};
use serde_json::json;
use tests::bench::RunArgs;

#[derive(Parser)]
#[command(about = "Splice relay beside a userspace copy, over loopback")]
struct Args {
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Method {
    /// `tokio::io::copy` on the relay's halves: read into a buffer, write it out.
    Copy,
    /// `splice::relay`: socket -> pipe -> socket in the kernel.
    Splice,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Copy => "tokio::io::copy (userspace buffer)",
            Method::Splice => "splice(2) (the proxy's relay)",
        }
    }
}

struct Run {
    seconds: f64,
    relay_cpu_seconds: f64,
}

const GIB: f64 = (1u64 << 30) as f64;

fn thread_cpu() -> anyhow::Result<Duration> {
    let t = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)?;
    Ok(Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32))
}

/// A connected loopback pair: (the relay's end, the outer end).
fn pair() -> anyhow::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let outer = TcpStream::connect(listener.local_addr()?)?;
    let (inner, _) = listener.accept()?;
    Ok((inner, outer))
}

/// Move `bytes` from a sender through the relay to a sink once.
fn run_once(method: Method, bytes: u64) -> anyhow::Result<Run> {
    let (relay_in, mut sender) = pair()?;
    let (relay_out, mut sink) = pair()?;
    let send = std::thread::spawn(move || -> std::io::Result<()> {
        let chunk = vec![0x5a_u8; 1 << 16];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            sender.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        sender.shutdown(std::net::Shutdown::Write)
    });
    let receive = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut buf = vec![0_u8; 1 << 16];
        let mut got = 0u64;
        loop {
            match sink.read(&mut buf)? {
                0 => return Ok(got),
                n => got += n as u64,
            }
        }
    });
    let started = Instant::now();
    let relay = std::thread::spawn(move || -> anyhow::Result<(u64, Duration)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        let cpu = thread_cpu()?;
        let moved = runtime.block_on(async {
            relay_in.set_nonblocking(true)?;
            relay_out.set_nonblocking(true)?;
            let from = tokio::net::TcpStream::from_std(relay_in)?;
            let to = tokio::net::TcpStream::from_std(relay_out)?;
            match method {
                Method::Splice => splice::relay(&from, &to).await,
                Method::Copy => {
                    let (mut rx, _) = from.into_split();
                    let (_, mut tx) = to.into_split();
                    let moved = tokio::io::copy(&mut rx, &mut tx).await?;
                    tokio::io::AsyncWriteExt::shutdown(&mut tx).await?;
                    Ok(moved)
                }
            }
        })?;
        Ok((moved, thread_cpu()? - cpu))
    });
    let (moved, cpu) = relay
        .join()
        .map_err(|_| anyhow::anyhow!("relay thread panicked"))??;
    send.join()
        .map_err(|_| anyhow::anyhow!("sender thread panicked"))?
        .context("sending")?;
    let got = receive
        .join()
        .map_err(|_| anyhow::anyhow!("sink thread panicked"))?
        .context("receiving")?;
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        moved == bytes && got == bytes,
        "{method:?}: sent {bytes}, relayed {moved}, received {got}"
    );
    Ok(Run {
        seconds,
        relay_cpu_seconds: cpu.as_secs_f64(),
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("steer-bench-relay: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let (bytes, runs) = if args.run.quick {
        (64 << 20, 1)
    } else {
        (4 << 30, 5)
    };
    let methods = [Method::Copy, Method::Splice];
    let mut runs_of: Vec<Vec<Run>> = methods.iter().map(|_| Vec::new()).collect();
    for _ in 0..runs {
        for (method, runs) in methods.iter().zip(&mut runs_of) {
            runs.push(run_once(*method, bytes)?);
        }
    }
    let gib = bytes as f64 / GIB;
    let figures: Vec<(Method, f64, f64)> = methods
        .iter()
        .zip(runs_of)
        .map(|(method, runs)| {
            let gib_per_s = median(runs.iter().map(|r| gib / r.seconds).collect());
            let cpu_per_gib = median(runs.iter().map(|r| r.relay_cpu_seconds / gib).collect());
            (*method, gib_per_s, cpu_per_gib)
        })
        .collect();
    let (_, base_rate, base_cpu) = figures[0];
    let mut table = format!(
        "Relay of {gib:.2} GiB over loopback, median of {runs} run(s) per method.\n\n\
         | method | GiB/s | x copy | relay CPU s/GiB | x copy |\n| --- | ---: | ---: | ---: | ---: |\n"
    );
    for (method, rate, cpu) in &figures {
        table.push_str(&format!(
            "| {} | {rate:.2} | {:.2} | {cpu:.3} | {:.2} |\n",
            method.name(),
            rate / base_rate,
            cpu / base_cpu
        ));
    }
    println!("{table}");
    if let Some(out) = args.run.out {
        let json = json!({
            "bytes": bytes,
            "runs": runs,
            "figures": figures.iter().map(|(method, rate, cpu)| json!({
                "method": method.name(),
                "gib_per_s": rate,
                "relay_cpu_s_per_gib": cpu,
                "rate_vs_copy": rate / base_rate,
                "cpu_vs_copy": cpu / base_cpu,
            })).collect::<Vec<_>>(),
        });
        tests::bench::write_results(&out, &json, &table)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
