//! Running cargo from xtask: the workspace root, the target directory, JSON build messages.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, bail};
use serde_json::Value;

/// The workspace root (xtask lives in `<root>/xtask`).
pub fn root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// A `cargo` command (the one running us, via `$CARGO`) in the workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Runs a command with inherited stdio and fails unless it succeeds.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// The workspace's target directory, from `cargo metadata`.
pub fn target_dir() -> anyhow::Result<PathBuf> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed with {}", out.status);
    }
    let meta: Value = serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    let dir = meta["target_directory"]
        .as_str()
        .context("cargo metadata has no target_directory")?;
    Ok(PathBuf::from(dir))
}

/// Runs a cargo command with `--message-format=json` added and returns its JSON messages
/// (human-readable diagnostics go to stderr via `json-render-diagnostics`).
pub fn json_messages(args: &[&str]) -> anyhow::Result<Vec<Value>> {
    let out = cargo()
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("cargo {} failed with {}", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Builds lb-ebpf and copies its compiled object to `target/bpf/steer.bpf.o`; returns that path.
pub fn build_ebpf() -> anyhow::Result<PathBuf> {
    let messages = json_messages(&["build", "-p", "lb-ebpf"])?;
    let out_dir = messages
        .iter()
        .filter(|m| m["reason"] == "build-script-executed")
        .find(|m| {
            m["package_id"].as_str().is_some_and(|id| {
                id.contains("/lb-ebpf#") || id.starts_with("lb-ebpf ") || id.contains("#lb-ebpf@")
            })
        })
        .and_then(|m| m["out_dir"].as_str())
        .context("cargo reported no build-script output for lb-ebpf")?;
    let object = Path::new(out_dir).join("steer.bpf.o");
    let dest_dir = target_dir()?.join("bpf");
    std::fs::create_dir_all(&dest_dir)
        .with_context(|| format!("creating {}", dest_dir.display()))?;
    let dest = dest_dir.join("steer.bpf.o");
    std::fs::copy(&object, &dest)
        .with_context(|| format!("copying {} to {}", object.display(), dest.display()))?;
    Ok(dest)
}
