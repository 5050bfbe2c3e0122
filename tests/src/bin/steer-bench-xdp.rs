//! `cargo xtask bench`: the XDP program's cost per packet, as the kernel measures it.
//!
//! With BPF run-time statistics on (`BPF_ENABLE_STATS`), each crafted frame goes through
//! `BPF_PROG_TEST_RUN` once per call (`repeat = 1`: a repeat would rerun on the already
//! rewritten frame), and the cost is the growth of the program's `run_time_ns` over the growth of
//! its `run_cnt`. An empty XDP program that only passes packets runs the same frames in the same
//! run: its figure is what running any program costs, and each result is also given less it.
//! A new flow needs a new tuple every run, so those frames step the client's address and port.
//!
//! Prints a table and writes the figures as JSON (`--out`).

#![expect(
    clippy::print_stdout,
    reason = "the benchmark's table is for a person to read"
)]

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsFd,
    process::ExitCode,
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
    programs::{ProgramInfo, Xdp},
};
use clap::Parser;
use lb_common::{FlowFwd, FlowKey, FlowRev, backend_state, policy};
use serde_json::json;
use tests::{
    bench::RunArgs,
    lab::{BACKENDS, LB_BACKEND_SIDE, Lab, VIP, build_namespace, client, ne},
    netns,
    packet::{ACK, Frame, SYN},
    testrun::{XDP_PASS, XDP_REDIRECT, test_run},
};

#[derive(Parser)]
#[command(about = "Per-packet cost of Steer's XDP program beside an empty one")]
struct Args {
    #[command(flatten)]
    run: RunArgs,
}

/// Conntrack capacity in the benchmark, so filling it takes seconds.
const CT_ENTRIES: u32 = 65536;
/// New flows between two clearings of conntrack: keeps SNAT ports plentiful, so the port search
/// costs what it costs on a lightly loaded backend.
const NEW_FLOW_BATCH: u32 = 256;

struct Figure {
    name: String,
    backends: u32,
    conntrack_fill: u32,
    ns: f64,
    empty_ns: f64,
    runs: u64,
}

fn stats(info: &ProgramInfo) -> (u64, u64) {
    (info.run_time().as_nanos() as u64, info.run_count())
}

/// Mean ns per run of `prog` over `frames` (each run once), each of which must get `verdict`:
/// a figure of another path than the one named would be no figure at all.
fn cost(prog: &Xdp, frames: impl Iterator<Item = Vec<u8>>, verdict: u32) -> (f64, u64) {
    let fd = prog.fd().expect("program fd");
    let before = stats(&prog.info().expect("program info"));
    for frame in frames {
        let run = test_run(fd.as_fd(), &frame, 1).expect("BPF_PROG_TEST_RUN");
        assert_eq!(run.verdict, verdict, "verdict of a benchmark frame");
    }
    let after = stats(&prog.info().expect("program info"));
    let runs = after.1 - before.1;
    ((after.0 - before.0) as f64 / runs.max(1) as f64, runs)
}

fn xdp<'a>(ebpf: &'a Ebpf, name: &str) -> &'a Xdp {
    ebpf.program(name)
        .expect("program")
        .try_into()
        .expect("an XDP program")
}

/// Client `n` of many: distinct addresses and ports, so every SYN is a new flow.
fn nth_client(n: u32) -> SocketAddrV4 {
    let [_, a, b, c] = n.to_be_bytes();
    SocketAddrV4::new(Ipv4Addr::new(10, 211, a, b), 1024 + u16::from(c))
}

/// `n` active backends of weight 1: all on the two lab hosts, on ports of their own so each has
/// its own SNAT ports; polled, with a cap no run reaches (under `slots` a cap of 0 is a backend
/// never polled, which takes no flow).
fn set_backends(lab: &mut Lab, policy: u32, n: u32) {
    for slot in 0..n {
        let host = BACKENDS[(slot % 2) as usize];
        let addr = SocketAddrV4::new(*host.ip(), 8000 + slot as u16);
        lab.set_backend(slot, addr, backend_state::ACTIVE, 1, u32::MAX);
        lab.set_conns(slot, 0, 0);
    }
    let ring: Vec<u32> = (0..n).collect();
    lab.set_service(policy, n, &ring);
}

fn clear_conntrack(lab: &mut Lab) {
    clear::<FlowFwd>(lab, "ct_fwd");
    clear::<FlowRev>(lab, "ct_rev");
}

fn clear<V: aya::Pod>(lab: &mut Lab, name: &str) {
    let mut ct: HashMap<&mut MapData, FlowKey, V> =
        HashMap::try_from(lab.ebpf_mut().map_mut(name).expect("ct map")).expect("hash");
    let keys: Vec<FlowKey> = ct.keys().filter_map(Result::ok).collect();
    for key in keys {
        let _ = ct.remove(&key);
    }
}

/// Fill `percent` of conntrack with other clients' flows, both ways.
fn fill_conntrack(lab: &mut Lab, percent: u32) {
    let entries = CT_ENTRIES * percent / 100;
    let key = |src: SocketAddrV4, dst: SocketAddrV4| FlowKey {
        src_addr: ne(*src.ip()),
        dst_addr: ne(*dst.ip()),
        src_port: src.port().to_be(),
        dst_port: dst.port().to_be(),
        proto: 6,
        _pad: [0; 3],
    };
    {
        let mut fwd: HashMap<&mut MapData, FlowKey, FlowFwd> =
            HashMap::try_from(lab.ebpf_mut().map_mut("ct_fwd").expect("ct_fwd")).expect("hash");
        for i in 0..entries {
            let client = SocketAddrV4::new(Ipv4Addr::new(10, 212, (i >> 8) as u8, i as u8), 40000);
            let _ = fwd.insert(key(client, VIP), FlowFwd::default(), 0);
        }
    }
    let mut rev: HashMap<&mut MapData, FlowKey, FlowRev> =
        HashMap::try_from(lab.ebpf_mut().map_mut("ct_rev").expect("ct_rev")).expect("hash");
    for i in 0..entries {
        let snat = SocketAddrV4::new(LB_BACKEND_SIDE, 1024 + (i % 60000) as u16);
        let backend = SocketAddrV4::new(Ipv4Addr::new(10, 213, (i >> 16) as u8, (i >> 8) as u8), 9);
        let _ = rev.insert(key(backend, snat), FlowRev::default(), 0);
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !netns::is_root() {
        eprintln!("steer-bench-xdp needs root (BPF, network namespaces): run `cargo xtask bench`");
        return ExitCode::FAILURE;
    }
    let runs: u32 = if args.run.quick { 500 } else { 20_000 };
    // Held for the whole run: the kernel counts run time only while statistics are on.
    let _stats = match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("steer-bench-xdp: enabling BPF run-time statistics: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ns = build_namespace();
    let figures = ns.run(|| measure(runs));
    print_table(&figures);
    if let Some(out) = args.run.out {
        let json = json!({
            "method": "BPF_PROG_TEST_RUN, repeat 1, run_time_ns / run_cnt with BPF_ENABLE_STATS",
            "runs_per_figure": runs,
            "figures": figures.iter().map(|f| json!({
                "case": f.name, "backends": f.backends, "conntrack_fill_percent": f.conntrack_fill,
                "ns_per_packet": f.ns, "empty_program_ns": f.empty_ns,
                "ns_over_empty": f.ns - f.empty_ns, "runs": f.runs,
            })).collect::<Vec<_>>(),
        });
        if let Some(dir) = out.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = std::fs::write(&out, format!("{json:#}\n")) {
            eprintln!("steer-bench-xdp: writing {}: {e}", out.display());
            return ExitCode::FAILURE;
        }
        println!("\nwrote {}", out.display());
    }
    ExitCode::SUCCESS
}

fn measure(runs: u32) -> Vec<Figure> {
    let mut empty = aya::EbpfLoader::new()
        .load(lb_ebpf::empty_bpf())
        .expect("loading the empty program");
    let empty_prog: &mut Xdp = empty
        .program_mut("empty_xdp")
        .expect("program empty_xdp")
        .try_into()
        .expect("an XDP program");
    empty_prog.load().expect("the verifier accepts empty_xdp");
    let empty_prog = xdp(&empty, "empty_xdp");
    let syn = |n: u32| Frame::tcp(nth_client(n), VIP, SYN).build();
    let (empty_ns, _) = cost(empty_prog, (0..runs).map(syn), XDP_PASS);

    let mut figures = Vec::new();
    let mut figure = |name: &str, backends: u32, fill: u32, (ns, runs): (f64, u64)| {
        figures.push(Figure {
            name: name.to_owned(),
            backends,
            conntrack_fill: fill,
            ns,
            empty_ns,
            runs,
        });
    };

    for (policy, label) in [
        (policy::ROUND_ROBIN, "new flow (SYN), round_robin"),
        (policy::SLOTS, "new flow (SYN), slots"),
    ] {
        for backends in [2, 16, 64] {
            let mut lab = Lab::load_with(policy, Some(CT_ENTRIES));
            set_backends(&mut lab, policy, backends);
            let (mut total_ns, mut total_runs) = (0.0, 0);
            let mut next = 0;
            while next < runs {
                let batch = NEW_FLOW_BATCH.min(runs - next);
                let (ns, done) = cost(lab.program(), (next..next + batch).map(syn), XDP_REDIRECT);
                total_ns += ns * done as f64;
                total_runs += done;
                next += batch;
                clear_conntrack(&mut lab);
                set_backends(&mut lab, policy, backends);
            }
            figure(
                label,
                backends,
                0,
                (total_ns / total_runs.max(1) as f64, total_runs),
            );
        }
    }

    for fill in [0, 50, 100] {
        // The lab's own two backends, so `forward` can check where the SYN went.
        let mut lab = Lab::load_with(policy::ROUND_ROBIN, Some(CT_ENTRIES));
        fill_conntrack(&mut lab, fill);
        // The lab's client, whose neighbour is known: replies to it are forwarded, not passed.
        let client = client(40000);
        let (snat, backend) = lab.forward(client, SYN);
        let prog = lab.program();
        let cases = [
            (
                "established flow, client to backend",
                Frame::tcp(client, VIP, ACK).build(),
                XDP_REDIRECT,
            ),
            (
                "established flow, reply",
                Frame::tcp(backend, snat, ACK).build(),
                XDP_REDIRECT,
            ),
            (
                "non-VIP packet",
                Frame::tcp(client, SocketAddrV4::new(*BACKENDS[0].ip(), 80), SYN).build(),
                XDP_PASS,
            ),
        ];
        for (name, frame, verdict) in cases {
            figure(
                name,
                2,
                fill,
                cost(prog, (0..runs).map(|_| frame.clone()), verdict),
            );
        }
    }
    figures
}

fn print_table(figures: &[Figure]) {
    println!(
        "{:<38} {:>8} {:>9} {:>10} {:>10} {:>9}",
        "case", "backends", "ct fill", "ns/packet", "empty ns", "over"
    );
    for f in figures {
        println!(
            "{:<38} {:>8} {:>8}% {:>10.1} {:>10.1} {:>9.1}",
            f.name,
            f.backends,
            f.conntrack_fill,
            f.ns,
            f.empty_ns,
            f.ns - f.empty_ns
        );
    }
}
