//! Network-namespace guards and the `ip`/`ethtool` helpers the test topologies are built from.
//!
//! Every namespace is named `steer-t-<prefix>-<pid>-<counter>`, created with `ip netns add` and
//! deleted when its [`NetNs`] guard drops (also while a test panics; dropping never panics).
//! The first [`NetNs::new`] of a process sweeps namespaces left behind by dead test processes:
//! only names that start with [`NAME_PREFIX`] and whose pid is no longer alive.

use std::{
    ffi::OsStr,
    fs::File,
    os::{fd::AsFd, unix::process::CommandExt},
    path::Path,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use nix::{
    sched::{CloneFlags, setns},
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// Every namespace this harness creates starts with this; the sweep touches nothing else.
pub const NAME_PREFIX: &str = "steer-t-";

static COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// True when the process runs as root (the harness needs it for `ip netns`, XDP and BPF).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Panics with a clear message unless running as root: privileged tests never silently pass.
pub fn require_root(what: &str) {
    assert!(
        is_root(),
        "{what}: root is needed (network namespaces, veth, XDP): run `cargo xtask test` as root"
    );
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `steer-t-<prefix>-<pid>-<n>` with its loopback up. Panics (with the `ip` error)
    /// when that fails, e.g. without root.
    pub fn new(prefix: &str) -> NetNs {
        SWEEP.call_once(sweep_stale);
        let name = format!(
            "{NAME_PREFIX}{prefix}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The name given to `ip netns add` (usable with `ip -n NAME` and `ip netns exec NAME`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of the namespace file bind-mounted by `ip netns add`.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `f` on a fresh thread that has joined this namespace, and returns its result.
    /// Sockets made there stay in this namespace. A panic in `f` is re-raised here. For async
    /// code, build a current-thread tokio runtime inside `f` (see [`NetNs::block_on`]).
    pub fn run<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let file = File::open(self.path()).unwrap_or_else(|e| panic!("open {}: {e}", self.path()));
        thread::scope(|scope| {
            let handle = thread::Builder::new()
                .name(format!("netns-{}", self.name))
                // Debug-build futures run with block_on live on this stack: give them room.
                .stack_size(16 << 20)
                .spawn_scoped(scope, move || {
                    setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                        .unwrap_or_else(|e| panic!("setns into {}: {e}", self.name));
                    drop(file);
                    f()
                })
                .unwrap_or_else(|e| panic!("spawn thread for {}: {e}", self.name));
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Runs a future to completion on a current-thread tokio runtime inside this namespace.
    pub fn block_on<F, Fut, R>(&self, f: F) -> R
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = R>,
        R: Send,
    {
        self.run(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("build tokio runtime")
                .block_on(f())
        })
    }

    /// `ip netns exec NAME args...`, waiting for it; the output is returned whatever the status.
    pub fn exec<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        cmd.output()
            .unwrap_or_else(|e| panic!("run ip netns exec {}: {e}", self.name))
    }

    /// Like [`NetNs::exec`], but panics with stderr unless the command succeeds; returns stdout.
    pub fn exec_ok<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        run_ok(&mut cmd)
    }

    /// `ip -n NAME args...`; panics with stderr on failure, returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        run_ok(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Spawns a long-running child inside this namespace (the command keeps its stdio, env and
    /// arguments). The child is killed and reaped when the returned guard drops.
    pub fn spawn(&self, mut cmd: Command) -> ChildGuard {
        let file = File::open(self.path()).unwrap_or_else(|e| panic!("open {}: {e}", self.path()));
        let program = cmd.get_program().to_string_lossy().into_owned();
        // SAFETY: the closure only calls setns(2), which is async-signal-safe, on an fd that
        // stays open in the parent until `spawn` returns.
        unsafe {
            cmd.pre_exec(move || {
                setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        ChildGuard::spawn(cmd).unwrap_or_else(|e| panic!("spawn {program} in {}: {e}", self.name))
    }

    /// Sets a sysctl of this namespace (`key` like `net.ipv4.ip_forward`) and reads it back.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let got = self.run(|| {
            std::fs::write(&path, value).unwrap_or_else(|e| panic!("write {path}: {e}"));
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
        });
        assert_eq!(got.trim(), value, "{key} in {}", self.name);
    }

    /// Creates a veth pair with `local` in this namespace and `remote` in `peer`, both up.
    pub fn veth(&self, local: &str, peer: &NetNs, remote: &str) {
        self.ip(&[
            "link", "add", local, "type", "veth", "peer", "name", remote, "netns", &peer.name,
        ]);
        self.ip(&["link", "set", local, "up"]);
        peer.ip(&["link", "set", remote, "up"]);
    }

    /// `ip addr add CIDR dev IF`.
    pub fn addr_add(&self, ifname: &str, cidr: &str) {
        self.ip(&["addr", "add", cidr, "dev", ifname]);
    }

    /// `ip route replace DST via GW`.
    pub fn route_via(&self, dst: &str, gateway: &str) {
        self.ip(&["route", "replace", dst, "via", gateway]);
    }

    /// A static, permanent neighbour entry.
    pub fn neigh_permanent(&self, ifname: &str, addr: &str, mac: &str) {
        self.ip(&[
            "neigh",
            "replace",
            addr,
            "lladdr",
            mac,
            "dev",
            ifname,
            "nud",
            "permanent",
        ]);
    }

    /// The MAC address of an interface in this namespace.
    pub fn mac(&self, ifname: &str) -> String {
        let out = self.ip(&["-j", "link", "show", "dev", ifname]);
        let links: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("parse ip -j link show {ifname}: {e}: {out}"));
        links[0]["address"]
            .as_str()
            .unwrap_or_else(|| panic!("no address for {ifname} in {out}"))
            .to_owned()
    }

    /// `ethtool -K IF feature on|off ...` inside this namespace.
    pub fn ethtool_features(&self, ifname: &str, features: &[(&str, bool)]) {
        let mut args = vec!["ethtool".to_owned(), "-K".to_owned(), ifname.to_owned()];
        for (feature, on) in features {
            args.push((*feature).to_owned());
            args.push(if *on { "on" } else { "off" }.to_owned());
        }
        self.exec_ok(&args);
    }

    /// Applies the veth settings a traffic-sending test host needs (see DESIGN "veth pitfalls"):
    /// GRO on, so frames XDP redirects into the peer are accepted, and tx checksum offload off,
    /// so XDP on the other end never sees partial checksums.
    pub fn prepare_test_host_veth(&self, ifname: &str) {
        self.ethtool_features(ifname, &[("gro", true)]);
        self.ethtool_features(ifname, &[("tx", false)]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("warning: ip netns del {}: {e}", self.name),
        }
    }
}

/// A child process that is killed (SIGKILL) and reaped on drop unless it already exited.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    program: String,
}

impl ChildGuard {
    /// Starts `cmd` (in this process's namespace, unless `cmd` says otherwise).
    pub fn spawn(mut cmd: Command) -> std::io::Result<ChildGuard> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        Ok(ChildGuard {
            child: Some(cmd.spawn()?),
            program,
        })
    }

    /// The child's pid.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Mutable access to the child (e.g. to take its stdout).
    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child already reaped")
    }

    /// Whether the child has exited (and its status), without waiting.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let program = self.program.clone();
        self.child_mut()
            .try_wait()
            .unwrap_or_else(|e| panic!("wait for {program}: {e}"))
    }

    /// Sends `signal` and waits up to `timeout` for the child to exit. Returns its status, or
    /// `None` if it is still running after `timeout` (it is then killed on drop).
    pub fn signal_and_wait(&mut self, signal: Signal, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.try_wait() {
            return Some(status);
        }
        let pid = Pid::from_raw(i32::try_from(self.id()).expect("pid fits i32"));
        kill(pid, signal).unwrap_or_else(|e| panic!("kill -{signal} {}: {e}", self.program));
        self.wait_timeout(timeout)
    }

    /// Waits up to `timeout` (polling every 20 ms) for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// Runs a command, panicking with its stderr unless it succeeds; returns stdout.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e} (is iproute2 installed?)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deletes `steer-t-*` namespaces whose creating process is gone. Names of live processes
/// (another test binary running now) and names not made by this harness are left alone.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NAME_PREFIX) else {
            continue;
        };
        // rest = "<prefix>-<pid>-<counter>"; the prefix itself may contain dashes.
        let mut parts = rest.rsplitn(3, '-');
        let (_counter, pid) = (parts.next(), parts.next());
        let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
