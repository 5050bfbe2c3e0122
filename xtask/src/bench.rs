//! `cargo xtask bench`: the benchmarks, as root, each printing its figures beside a baseline
//! measured in the same run. Full runs write `bench/results/*.json`; `--quick` is a smoke of the
//! harness (few runs, results under the target directory, never a measurement).

use std::process::Command;

use anyhow::bail;

use crate::{cargo, deps};

pub fn run(quick: bool) -> anyhow::Result<()> {
    deps::install_missing()?;
    if !deps::running_as_root() {
        bail!(
            "the benchmarks need root (BPF, network namespaces): run `cargo xtask bench` as root"
        );
    }
    let target = cargo::target_dir()?;
    cargo::run(cargo::cargo().args(["build", "-p", "tests", "--bin", "steer-bench-xdp"]))?;
    // The end-to-end benchmark runs the agent and the test backends next to itself.
    cargo::run(cargo::cargo().args([
        "build",
        "-p",
        "tests",
        "--bin",
        "steer-bench-e2e",
        "--bin",
        "steer-test-backend",
        "-p",
        "lb-userspace",
        "--bin",
        "steer",
    ]))?;
    let results = if quick {
        target.join("bench-quick")
    } else {
        cargo::root().join("bench").join("results")
    };
    for (bin, json) in [
        ("steer-bench-xdp", "xdp.json"),
        ("steer-bench-e2e", "e2e.json"),
    ] {
        let mut bench = Command::new(target.join("debug").join(bin));
        bench.arg("--out").arg(results.join(json));
        if quick {
            bench.arg("--quick");
        }
        cargo::run(&mut bench)?;
    }
    Ok(())
}
