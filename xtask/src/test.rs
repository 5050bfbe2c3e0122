//! `cargo xtask test` and `cargo xtask demo`.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, bail};

use crate::{cargo, deps};

/// Counts summed over every `test result:` line seen.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    pub filtered: u64,
    /// Test binaries or cargo invocations that exited non-zero without a failed test to show
    /// for it (a build error, a crash, a panic outside a test).
    pub failed_runs: u64,
}

impl Totals {
    /// Adds the counts of one libtest summary line; ignores any other line.
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().skip_while(|w| w.ends_with('.'));
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                "filtered" => self.filtered += n,
                _ => {}
            }
        }
    }

    fn add(&mut self, other: Totals) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
        self.filtered += other.filtered;
        self.failed_runs += other.failed_runs;
    }

    fn ok(&self) -> bool {
        self.failed == 0 && self.failed_runs == 0
    }
}

/// Runs `cmd`, echoing its stdout line by line to `echo` while counting libtest summaries.
fn run_counting(cmd: &mut Command, echo: &mut impl Write) -> anyhow::Result<Totals> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let mut totals = Totals::default();
    let stdout = child.stdout.take().context("child stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading test output")?;
        totals.add_line(&line);
        writeln!(echo, "{line}").context("echoing test output")?;
    }
    let status = child.wait().context("waiting for tests")?;
    if !status.success() {
        eprintln!("xtask: {cmd:?} exited with {status}");
        if totals.failed == 0 {
            totals.failed_runs += 1;
        }
    }
    Ok(totals)
}

fn print_summary(totals: &Totals, started: Instant) {
    println!(
        "\ntest result: {}. {} passed; {} failed; {} ignored; 0 measured; {} filtered out; \
         finished in {:.2}s",
        if totals.ok() { "ok" } else { "FAILED" },
        totals.passed,
        totals.failed + totals.failed_runs,
        totals.ignored,
        totals.filtered,
        started.elapsed().as_secs_f64()
    );
}

/// Builds the agent binary (debug, with the etcd config driver the supervisor tests use) and
/// returns its path. The tests crate enables the same feature, so both share one lb-userspace.
fn build_steer(target: &Path) -> anyhow::Result<PathBuf> {
    cargo::run(cargo::cargo().args([
        "build",
        "-p",
        "lb-userspace",
        "--bin",
        "steer",
        "--features",
        "etcd",
    ]))?;
    Ok(target.join("debug").join("steer"))
}

/// The test executables of the `tests` crate (lib, bins and `tests/*.rs`), built now.
fn privileged_test_binaries() -> anyhow::Result<Vec<PathBuf>> {
    let messages = cargo::json_messages(&["test", "-p", "tests", "--no-run"])?;
    let binaries: Vec<PathBuf> = messages
        .iter()
        .filter(|m| m["reason"] == "compiler-artifact" && m["profile"]["test"] == true)
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .collect();
    if binaries.is_empty() {
        bail!("cargo test -p tests --no-run built no test binary");
    }
    Ok(binaries)
}

/// `cargo xtask test`: deps, unit tests, then the privileged tests as root, one at a time.
pub fn run(extra: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    deps::install_missing()?;
    let mut stdout = std::io::stdout();
    let mut totals = run_counting(
        cargo::cargo().args([
            "test",
            "--workspace",
            "--exclude",
            "tests",
            "--no-fail-fast",
        ]),
        &mut stdout,
    )?;
    if !deps::running_as_root() {
        // The privileged part counts as one failed run: never report "ok" without it.
        totals.failed_runs += 1;
        print_summary(&totals, started);
        bail!(
            "the packet and integration tests need root (network namespaces, veth, XDP, \
             BPF_PROG_TEST_RUN): run `cargo xtask test` as root; they were not run"
        );
    }
    let target = cargo::target_dir()?;
    let steer = build_steer(&target)?;
    let crate_dir = cargo::root().join("tests");
    for binary in privileged_test_binaries()? {
        eprintln!(
            "     Running {} (as root, --test-threads=1)",
            binary.display()
        );
        let mut cmd = Command::new(&binary);
        cmd.arg("--test-threads=1")
            .args(extra)
            .env("STEER_BIN", &steer)
            .current_dir(&crate_dir);
        totals.add(run_counting(&mut cmd, &mut stdout)?);
    }
    print_summary(&totals, started);
    if !totals.ok() {
        bail!("some tests failed");
    }
    Ok(())
}

/// `cargo xtask demo`: deps, build, then run `steer-demo` as root.
pub fn demo() -> anyhow::Result<()> {
    deps::install_missing()?;
    if !deps::running_as_root() {
        bail!(
            "the demo needs root (network namespaces, veth, XDP): run `cargo xtask demo` as root"
        );
    }
    let target = cargo::target_dir()?;
    let steer = build_steer(&target)?;
    cargo::run(cargo::cargo().args([
        "build",
        "-p",
        "tests",
        "--bin",
        "steer-demo",
        "--bin",
        "steer-test-backend",
    ]))?;
    cargo::run(Command::new(target.join("debug").join("steer-demo")).env("STEER_BIN", steer))
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::{Totals, run_counting};

    #[test]
    fn summary_lines_are_summed() {
        let mut t = Totals::default();
        t.add_line("test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 2 filtered out; finished in 0.1s");
        t.add_line("test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.0s");
        t.add_line("running 3 tests");
        assert_eq!(
            t,
            Totals {
                passed: 4,
                failed: 2,
                ignored: 1,
                filtered: 2,
                failed_runs: 0
            }
        );
        assert!(!t.ok());
    }

    #[test]
    fn a_failed_run_counts_once_and_a_silent_failure_still_counts() {
        let mut echo = Vec::new();
        let with_failed_test = run_counting(
            Command::new("sh").args([
                "-c",
                "echo 'test result: FAILED. 2 passed; 1 failed; 0 ignored'; exit 101",
            ]),
            &mut echo,
        )
        .expect("sh runs");
        assert!(String::from_utf8_lossy(&echo).contains("1 failed"));
        assert_eq!(
            (with_failed_test.failed, with_failed_test.failed_runs),
            (1, 0)
        );
        let crashed = run_counting(Command::new("sh").args(["-c", "exit 1"]), &mut Vec::new())
            .expect("sh runs");
        assert_eq!((crashed.failed, crashed.failed_runs), (0, 1));
        assert!(!with_failed_test.ok() && !crashed.ok());
    }
}
