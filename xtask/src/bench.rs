//! `cargo xtask bench`: the benchmarks, as root, each printing its figures beside a baseline
//! measured in the same run. A full run builds everything it runs in release (the agent, the test
//! backends, the benchmark binaries), writes `bench/results/*.json`, the PNG plots in
//! `docs/img/` and every markdown table in `bench/results/report.md`. `--quick` is a smoke of
//! every harness path (debug builds, about a second per figure, results and plots under the
//! target directory), never a measurement.

use std::{fmt::Write as _, path::Path, process::Command, time::Instant};

use anyhow::{Context, bail};

use crate::{cargo, deps};

/// The benchmarks in the order they run: binary, results file, whether it draws plots (takes
/// `--plots DIR`), and the report's heading.
const BENCHES: [(&str, &str, bool, &str); 9] = [
    (
        "steer-bench-xdp",
        "xdp.json",
        false,
        "XDP program, cost per packet",
    ),
    (
        "steer-bench-e2e",
        "e2e.json",
        true,
        "End to end on namespaces, and the agent's cost",
    ),
    (
        "steer-bench-relay",
        "relay.json",
        false,
        "The l4 proxy's relay: splice(2) beside a userspace copy",
    ),
    (
        "steer-bench-llama",
        "llama.json",
        true,
        "Balancing quality on llama.cpp",
    ),
    (
        "steer-bench-router",
        "router.json",
        false,
        "Routers on an unequal fleet and on conversations",
    ),
    (
        "steer-bench-fleet",
        "fleet.json",
        true,
        "Fleet-scale simulation of the policies",
    ),
    (
        "steer-bench-etcd",
        "etcd.json",
        false,
        "The fleet through etcd: convergence, a large fleet, requests at rest",
    ),
    (
        "steer-bench-flood",
        "flood.json",
        false,
        "Connection flood: requests failed meanwhile",
    ),
    (
        "steer-bench-chaos",
        "chaos.json",
        false,
        "Chaos: SIGKILLs of supervised llama-servers under load",
    ),
];

pub fn run(quick: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    deps::install_missing()?;
    if !deps::running_as_root() {
        bail!(
            "the benchmarks need root (BPF, network namespaces): run `cargo xtask bench` as root"
        );
    }
    let target = cargo::target_dir()?;
    // The end-to-end and llama benchmarks run the agent and the test backends next to
    // themselves, so all come from one build of one profile.
    let mut build = cargo::cargo();
    build.arg("build");
    if !quick {
        build.arg("--release");
    }
    build.args(["-p", "tests"]);
    for (bin, ..) in BENCHES {
        build.args(["--bin", bin]);
    }
    build.args([
        "--bin",
        "steer-test-backend",
        "-p",
        "lb-userspace",
        "--bin",
        "steer",
        // The fleet benchmark's agents need the etcd client.
        "--features",
        "lb-userspace/etcd",
    ]);
    cargo::run(&mut build)?;
    let built = started.elapsed();

    let bins = target.join(if quick { "debug" } else { "release" });
    let (results, plots) = if quick {
        let dir = target.join("bench-quick");
        (dir.clone(), dir)
    } else {
        let root = cargo::root();
        (
            root.join("bench").join("results"),
            root.join("docs").join("img"),
        )
    };
    let mut report = format!(
        "# cargo xtask bench{}\n\nTables from the latest run; the JSON beside this file has every \
         figure, the plots are in {}.\n",
        if quick {
            " --quick (a smoke, not a measurement)"
        } else {
            ""
        },
        plots.display()
    );
    for (bin, json, draws, heading) in BENCHES {
        let out = results.join(json);
        let mut bench = Command::new(bins.join(bin));
        bench.arg("--out").arg(&out);
        if draws {
            bench.arg("--plots").arg(&plots);
        }
        if quick {
            bench.arg("--quick");
        }
        let one = Instant::now();
        cargo::run(&mut bench)?;
        let _ = write!(
            report,
            "\n## {heading}\n\n`{bin}`, {:.0} s.\n\n{}",
            one.elapsed().as_secs_f64(),
            tables(&out)?
        );
    }
    let _ = writeln!(
        report,
        "\nTotal: {:.0} s, of which {:.0} s building.",
        started.elapsed().as_secs_f64(),
        built.as_secs_f64()
    );
    let path = results.join("report.md");
    std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    println!("{report}\nwrote {}", path.display());
    Ok(())
}

/// The markdown tables a benchmark wrote beside its JSON, or a pointer to the JSON for one that
/// writes none (the XDP benchmark prints its table).
fn tables(json: &Path) -> anyhow::Result<String> {
    let md = json.with_extension("md");
    if md.is_file() {
        std::fs::read_to_string(&md).with_context(|| format!("reading {}", md.display()))
    } else {
        Ok(format!(
            "Printed above by the benchmark; figures in {}.\n",
            json.display()
        ))
    }
}
