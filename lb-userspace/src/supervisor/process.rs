//! One llama-server process: spawn it (argv, never a shell), keep the tail of its output, wait
//! until `/health` says 200, stop it gracefully.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, User};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};
use tracing::{debug, warn};

use crate::store::{ArgValue, SavedArgs};

/// Lines of output kept for a failure report.
const TAIL_LINES: usize = 64;
/// Readiness has no event to wait for: `/health` is asked this often during a start.
const HEALTH_PROBE_INTERVAL: Duration = Duration::from_millis(20);
const HEALTH_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a failed start's output may take to arrive after its exit.
const OUTPUT_DRAIN: Duration = Duration::from_secs(1);

/// Why a start did not reach healthy. The process, if any, is gone when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("starting {binary}: {source}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for llama-server: {0}")]
    Wait(#[source] std::io::Error),
    #[error("port {0} on 127.0.0.1 is already in use by another process")]
    PortTaken(u16),
    #[error("llama-server exited before it was healthy ({status})")]
    Exited { status: ExitStatus },
    #[error("llama-server was not healthy within {timeout:?}")]
    Unhealthy { timeout: Duration },
    #[error(transparent)]
    User(#[from] UserError),
}

/// Why llama-server cannot run as the configured user.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("user `{user}` (llama-server's) does not exist: create it, or set `user`")]
    Unknown { user: String },
    #[error("looking up user `{user}`: {source}")]
    Lookup {
        user: String,
        #[source]
        source: nix::Error,
    },
    #[error(
        "llama-server cannot run as `{user}`: only a supervisor running as root can switch users"
    )]
    NotRoot { user: String },
    #[error("user `{user}` (llama-server's) cannot {what} {}: {why}", path.display())]
    NoAccess {
        user: String,
        path: PathBuf,
        what: &'static str,
        why: String,
    },
}

/// The unprivileged user a root supervisor runs llama-server as: a hostile argument then gets
/// that user's rights, not root's.
#[derive(Clone, Debug)]
pub struct RunAs {
    name: String,
    uid: u32,
    gid: u32,
}

/// The user llama-server runs as when the supervisor is root and none is configured.
pub const DEFAULT_USER: &str = "nobody";

impl RunAs {
    /// The user for `configured` (default [`DEFAULT_USER`]) when the supervisor is root; `None`
    /// when llama-server keeps the supervisor's uid: not root, or a uid-0 user asked for.
    pub fn resolve(configured: Option<&str>) -> Result<Option<RunAs>, UserError> {
        let name = configured.unwrap_or(DEFAULT_USER);
        let user = User::from_name(name)
            .map_err(|source| UserError::Lookup {
                user: name.to_owned(),
                source,
            })?
            .ok_or_else(|| UserError::Unknown {
                user: name.to_owned(),
            })?;
        let me = nix::unistd::geteuid();
        if user.uid.is_root() || (!me.is_root() && configured.is_none()) || user.uid == me {
            return Ok(None);
        }
        if !me.is_root() {
            return Err(UserError::NotRoot {
                user: name.to_owned(),
            });
        }
        Ok(Some(RunAs {
            name: name.to_owned(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this user can run `args`' binary and read its `--model` (when they exist):
    /// checked before a start, so the error names the file and the missing right rather than
    /// llama-server failing on it.
    pub fn check_access(&self, args: &SavedArgs) -> Result<(), UserError> {
        let binary = find_binary(&args.binary);
        self.check(&binary, EXECUTE, "execute")?;
        if let Some(ArgValue::Value(model)) = args.args.get("--model") {
            self.check(Path::new(model), READ, "read")?;
        }
        Ok(())
    }

    fn check(&self, path: &Path, bits: u32, what: &'static str) -> Result<(), UserError> {
        let denied = |why: String| UserError::NoAccess {
            user: self.name.clone(),
            path: path.to_owned(),
            what,
            why,
        };
        let resolved = match std::fs::canonicalize(path) {
            Ok(resolved) => resolved,
            // A missing file is llama-server's to report; only rights are judged here.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(denied(err.to_string())),
        };
        for dir in resolved.ancestors().skip(1) {
            let meta = std::fs::metadata(dir).map_err(|e| denied(e.to_string()))?;
            if !self.may(&meta, EXECUTE) {
                return Err(denied(format!("no search permission on {}", dir.display())));
            }
        }
        let meta = std::fs::metadata(&resolved).map_err(|e| denied(e.to_string()))?;
        if !self.may(&meta, bits) {
            return Err(denied(format!("mode {:04o}", meta.mode() & 0o7777)));
        }
        Ok(())
    }

    /// The owner, group or other bits that apply to this user (supplementary groups are
    /// dropped at the switch, so only its own group counts).
    fn may(&self, meta: &std::fs::Metadata, bits: u32) -> bool {
        let mode = meta.mode();
        let class = if meta.uid() == self.uid {
            mode >> 6
        } else if meta.gid() == self.gid {
            mode >> 3
        } else {
            mode
        };
        class & bits == bits
    }
}

const READ: u32 = 0o4;
const EXECUTE: u32 = 0o1;

/// `binary` as exec would find it: a name without a slash is looked up in PATH.
fn find_binary(binary: &str) -> PathBuf {
    if binary.contains('/') {
        return PathBuf::from(binary);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from(binary))
}

impl StartError {
    pub fn exit_status(&self) -> Option<ExitStatus> {
        match self {
            StartError::Exited { status } => Some(*status),
            _ => None,
        }
    }
}

/// The last lines a process printed, shared with the tasks reading its pipes.
#[derive(Clone, Debug, Default)]
struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    fn push(&self, line: String) {
        let mut lines = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if lines.len() == TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    fn lines(&self) -> Vec<String> {
        let lines = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        lines.iter().cloned().collect()
    }
}

/// Starts processes. The instance actor is written against this and [`Process`] so its timing
/// can be tested on paused time; [`Spawner`] starts real llama-servers.
pub trait Launcher: Send + Sync + 'static {
    type Process: Process;

    /// Starts `args` and returns once healthy; a failed start leaves no process behind.
    fn start(
        &self,
        args: &SavedArgs,
        startup: Duration,
    ) -> impl Future<Output = Result<Self::Process, Failed>> + Send;
}

/// A healthy process.
pub trait Process: Send + 'static {
    fn pid(&self) -> u32;
    /// When it was started, to tell a stable process from a crash loop.
    fn started(&self) -> Instant;
    /// Completes when it exits on its own; cancel-safe.
    fn exited(&mut self) -> impl Future<Output = std::io::Result<ExitStatus>> + Send;
    /// Stops it gracefully, within `grace`.
    fn stop(self, grace: Duration) -> impl Future<Output = Option<ExitStatus>> + Send;
}

/// Starts real llama-servers, as `user` when the supervisor is root (see [`RunAs`]).
pub struct Spawner {
    pub user: Option<String>,
}

impl Launcher for Spawner {
    type Process = Running;

    fn start(
        &self,
        args: &SavedArgs,
        startup: Duration,
    ) -> impl Future<Output = Result<Running, Failed>> + Send {
        // Resolved at each start, so a user created or changed since is seen.
        let run_as = RunAs::resolve(self.user.as_deref());
        async move {
            let failed = |error: UserError| Failed {
                error: error.into(),
                tail: Vec::new(),
            };
            let run_as = run_as.map_err(failed)?;
            if let Some(run_as) = &run_as {
                run_as.check_access(args).map_err(failed)?;
            }
            Running::start(args, run_as.as_ref(), startup).await
        }
    }
}

/// A healthy llama-server. Dropping it kills the process (SIGKILL); [`Process::stop`] is the
/// graceful way.
#[derive(Debug)]
pub struct Running {
    child: Child,
    pid: u32,
    started: Instant,
}

/// A start that failed, with what the process printed.
#[derive(Debug)]
pub struct Failed {
    pub error: StartError,
    pub tail: Vec<String>,
}

impl Running {
    /// Spawns `args` (as `run_as`, if given) and waits until `/health` answers 200 on its port,
    /// at most `startup`. A process that exits first or is not healthy in time is killed and
    /// reported.
    pub async fn start(
        args: &SavedArgs,
        run_as: Option<&RunAs>,
        startup: Duration,
    ) -> Result<Running, Failed> {
        let failed = |error, tail: &Tail| Failed {
            error,
            tail: tail.lines(),
        };
        let tail = Tail::default();
        let port = args.port().unwrap_or_default();
        // llama-server may need a while to notice a taken port; meanwhile another server there
        // would answer our health probe. Check first (best effort: the window is small).
        if let Err(err) = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))
            && err.kind() == std::io::ErrorKind::AddrInUse
        {
            return Err(failed(StartError::PortTaken(port), &tail));
        }
        let mut child = spawn(args, run_as).map_err(|source| {
            let binary = args.binary.clone();
            failed(StartError::Spawn { binary, source }, &tail)
        })?;
        let pid = child.id().unwrap_or_default();
        let mut readers = Vec::with_capacity(2);
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            readers.push(tokio::spawn(forward_output(pipe, pid, tail.clone())));
        }
        let started = Instant::now();
        let deadline = started + startup;
        loop {
            tokio::select! {
                status = child.wait() => {
                    let error = match status {
                        Ok(status) => StartError::Exited { status },
                        Err(source) => StartError::Wait(source),
                    };
                    drain(readers).await;
                    return Err(failed(error, &tail));
                }
                () = tokio::time::sleep_until(deadline) => {
                    let running = Running { child, pid, started };
                    running.kill().await;
                    drain(readers).await;
                    return Err(failed(StartError::Unhealthy { timeout: startup }, &tail));
                }
                healthy = probe(port) => if healthy {
                    debug!(pid, port, elapsed = ?started.elapsed(), "llama-server healthy");
                    return Ok(Running { child, pid, started });
                }
            }
        }
    }

    /// SIGKILL and wait.
    async fn kill(mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.child.wait().await;
    }

    fn signal(&self, signal: Signal) {
        // The child leads its own group (see `spawn`), so helpers it forks get the signal too.
        let group = Pid::from_raw(self.pid as i32);
        if let Err(err) = killpg(group, signal) {
            debug!(pid = self.pid, %signal, %err, "signalling llama-server");
        }
    }
}

impl Process for Running {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn started(&self) -> Instant {
        self.started
    }

    async fn exited(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// SIGTERM to the process group, SIGKILL after `grace`; returns once it is gone.
    async fn stop(mut self, grace: Duration) -> Option<ExitStatus> {
        self.signal(Signal::SIGTERM);
        match timeout(grace, self.child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                warn!(
                    pid = self.pid,
                    ?grace,
                    "llama-server ignored SIGTERM; killing it"
                );
                self.signal(Signal::SIGKILL);
                self.child.wait().await.ok()
            }
        }
    }
}

fn spawn(args: &SavedArgs, run_as: Option<&RunAs>) -> std::io::Result<Child> {
    let mut command = Command::new(&args.binary);
    command
        .args(args.argv())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    if let Some(run_as) = run_as {
        // std sets the group, then drops the supplementary groups (it does when root sets a uid
        // and no groups), then the user, all before the pre_exec hook below.
        command.uid(run_as.uid).gid(run_as.gid);
    }
    let parent = std::process::id();
    // SAFETY: between fork and exec only async-signal-safe calls: prctl, getppid, _exit.
    unsafe {
        command.pre_exec(move || {
            // Nothing llama-server execs can gain privileges (setuid binaries, file caps).
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // A supervisor that dies (even by SIGKILL) takes its llama-server with it, so a
            // restarted supervisor finds the port free. The signal follows the spawning thread:
            // a runtime worker, which lives as long as the supervisor. Set after the uid switch,
            // which would clear it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    command.spawn()
}

/// Lets the pipe readers take in the last lines of a process that is gone. Bounded: a
/// grandchild could hold a pipe open.
async fn drain(readers: Vec<tokio::task::JoinHandle<()>>) {
    let deadline = Instant::now() + OUTPUT_DRAIN;
    for reader in readers {
        let _ = tokio::time::timeout_at(deadline, reader).await;
    }
}

async fn forward_output(pipe: impl AsyncRead + Unpin, pid: u32, tail: Tail) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        debug!(target: "llama_server", pid, "{line}");
        tail.push(line);
    }
}

/// Whether `/health` answers 200; after a no, waits a probe interval before answering.
async fn probe(port: u16) -> bool {
    let ok = healthy(port).await;
    if !ok {
        sleep(HEALTH_PROBE_INTERVAL).await;
    }
    ok
}

/// Whether `GET /health` on the port answers 200.
async fn healthy(port: u16) -> bool {
    let address = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    crate::probe::get(address, "/health", HEALTH_PROBE_TIMEOUT)
        .await
        .is_ok()
}
