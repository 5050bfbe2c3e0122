//! One llama-server process: spawn it (argv, never a shell), keep the tail of its output, wait
//! until `/health` says 200, stop it gracefully.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};
use tracing::{debug, warn};

use crate::store::SavedArgs;

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

/// Starts real llama-servers.
pub struct Spawner;

impl Launcher for Spawner {
    type Process = Running;

    fn start(
        &self,
        args: &SavedArgs,
        startup: Duration,
    ) -> impl Future<Output = Result<Running, Failed>> + Send {
        Running::start(args, startup)
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
    /// Spawns `args` and waits until `/health` answers 200 on its port, at most `startup`. A
    /// process that exits first or is not healthy in time is killed and reported.
    pub async fn start(args: &SavedArgs, startup: Duration) -> Result<Running, Failed> {
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
        let mut child = spawn(args).map_err(|source| {
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

fn spawn(args: &SavedArgs) -> std::io::Result<Child> {
    let mut command = Command::new(&args.binary);
    command
        .args(args.argv())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let parent = std::process::id();
    // SAFETY: between fork and exec only async-signal-safe calls: prctl, getppid, _exit.
    unsafe {
        command.pre_exec(move || {
            // A supervisor that dies (even by SIGKILL) takes its llama-server with it, so a
            // restarted supervisor finds the port free. The signal follows the spawning thread:
            // a runtime worker, which lives as long as the supervisor.
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
    let probe = async {
        let mut stream = TcpStream::connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).await?;
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        Ok::<_, std::io::Error>(
            head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200"),
        )
    };
    matches!(timeout(HEALTH_PROBE_TIMEOUT, probe).await, Ok(Ok(true)))
}
