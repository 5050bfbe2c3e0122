//! `cargo xtask`: the developer and CI entry points (`deps`, `check-imports`,
//! `build-ebpf`, `test`, `demo`, `bench`).
//!
//! Kept light on purpose (clap, anyhow, serde_json): it must build before anything else is
//! installed, so that `cargo xtask deps` can install the rest.

#![expect(
    clippy::print_stdout,
    reason = "a CLI: paths and test summaries go to stdout"
)]

mod bench;
mod cache;
mod cargo;
mod deps;
mod imports;
mod llama;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Steer's build, test and demo tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install the Debian packages Steer needs (clang-19, libbpf-dev, bpftool, cmake, protoc,
    /// etcd, ...) when any is missing, then build llama-server and fetch the test model into
    /// ${STEER_CACHE:-/var/cache/steer} (STEER_LLAMA_SERVER / STEER_MODEL skip them); a quick
    /// no-op when all are present.
    Deps,
    /// Fail when the agent's modules (lb-userspace/src) import each other in a cycle, naming
    /// the files of each (what counts as an import: xtask/src/imports.rs).
    CheckImports,
    /// Build lb-ebpf and copy the compiled XDP object to target/bpf/steer.bpf.o.
    BuildEbpf,
    /// Run unit tests, then (as root) the packet and integration tests one at a time.
    Test {
        /// Arguments passed to every privileged test binary (after `--`), e.g. a test name.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Bring up a client and the load balancer in network namespaces; the agent supervises two
    /// llama-servers and balances chats over them (needs root).
    Demo,
    /// Run the benchmarks (needs root), each beside a baseline of the same run: XDP cost per
    /// packet, end to end against direct/HAProxy/nginx, the l4 relay, balancing quality on
    /// llama.cpp, a fleet simulation; results in bench/results/, plots in docs/img/.
    Bench {
        /// A short smoke of the harness; its figures are not measurements.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Deps => deps::install_missing(),
        Task::CheckImports => imports::check(&cargo::root().join("lb-userspace/src")),
        Task::BuildEbpf => cargo::build_ebpf().map(|path| println!("{}", path.display())),
        Task::Test { args } => test::run(&args),
        Task::Demo => test::demo(),
        Task::Bench { quick } => bench::run(quick),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
