//! A CPU quota on one process, to make a llama-server slow on purpose: a child cgroup of the cpu
//! controller, with the cgroup v2 `cpu.max` where the controller is on the unified hierarchy and
//! the v1 `cpu.cfs_quota_us` where it is not (these machines mount cpu as v1). The guard moves the
//! process back and removes the cgroup on drop; [`CpuCap::new`] first sweeps cgroups a crashed
//! run left behind.

use std::path::{Path, PathBuf};

const PREFIX: &str = "steer-test-cpu-";
/// The quota's period, microseconds.
const PERIOD_US: u64 = 100_000;

/// A process held in a cgroup with a CPU quota; released on drop.
pub struct CpuCap {
    dir: PathBuf,
}

/// The cpu controller's root and whether it is cgroup v2.
fn cpu_root() -> (PathBuf, bool) {
    let unified = Path::new("/sys/fs/cgroup");
    let controllers = std::fs::read_to_string(unified.join("cgroup.controllers"));
    if controllers.is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu")) {
        (unified.to_owned(), true)
    } else {
        (unified.join("cpu"), false)
    }
}

fn write(path: &Path, value: &str) {
    std::fs::write(path, value)
        .unwrap_or_else(|e| panic!("writing {value:?} to {}: {e}", path.display()));
}

/// Move every process of `dir` to its parent cgroup, then remove it.
fn release(dir: &Path) -> std::io::Result<()> {
    let parent = dir.parent().map(|p| p.join("cgroup.procs"));
    if let (Ok(procs), Some(parent)) = (std::fs::read_to_string(dir.join("cgroup.procs")), parent) {
        for pid in procs.lines() {
            // It may have exited meanwhile.
            let _ = std::fs::write(&parent, pid);
        }
    }
    std::fs::remove_dir(dir)
}

impl CpuCap {
    /// Hold process `pid` to `percent` of one CPU. Panics when the cgroup cannot be made.
    pub fn new(pid: u32, percent: u64) -> CpuCap {
        let (root, v2) = cpu_root();
        for stale in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            if stale.file_name().to_string_lossy().starts_with(PREFIX) {
                let _ = release(&stale.path());
            }
        }
        let dir = root.join(format!("{PREFIX}{pid}"));
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
        // Owned from here: dropped on a panic below, the cgroup goes.
        let cap = CpuCap { dir };
        let quota = PERIOD_US * percent / 100;
        if v2 {
            write(&cap.dir.join("cpu.max"), &format!("{quota} {PERIOD_US}"));
        } else {
            write(&cap.dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string());
            write(&cap.dir.join("cpu.cfs_quota_us"), &quota.to_string());
        }
        write(&cap.dir.join("cgroup.procs"), &pid.to_string());
        cap
    }
}

impl Drop for CpuCap {
    fn drop(&mut self) {
        if let Err(e) = release(&self.dir) {
            eprintln!("removing cgroup {}: {e}", self.dir.display());
        }
    }
}
