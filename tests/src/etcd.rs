//! A throwaway etcd (Debian's `etcd-server`) on loopback ports with its own data directory.

use std::{
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

/// How long etcd gets to report healthy (it takes well under a second here).
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Start attempts: a free port found by binding `:0` can be taken before etcd binds it.
const ATTEMPTS: u32 = 3;

/// A running etcd, killed and its data directory removed on drop.
pub struct Etcd {
    child: Child,
    dir: PathBuf,
    client: SocketAddr,
}

impl Etcd {
    /// Starts etcd on free loopback client and peer ports and waits until `/health` says so.
    /// Panics with etcd's log when it does not come up.
    pub fn start() -> Etcd {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let mut failures = Vec::new();
        for _ in 0..ATTEMPTS {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("steer-etcd-{}-{n}", std::process::id()));
            match Etcd::try_start(dir) {
                Ok(etcd) => return etcd,
                Err(why) => failures.push(why),
            }
        }
        panic!("etcd did not start:\n{}", failures.join("\n---\n"));
    }

    /// Stops etcd with SIGSTOP: connections stay open and requests go unanswered, as with a
    /// hung or partitioned server. [`Etcd::resume`] lets it go on (and answer what it queued).
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap_or_else(|e| panic!("{signal} to etcd: {e}"));
    }

    /// The client address, `127.0.0.1:<port>`, as the etcd config driver takes it.
    pub fn endpoint(&self) -> String {
        self.client.to_string()
    }

    fn try_start(dir: PathBuf) -> Result<Etcd, String> {
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let log = dir.join("etcd.log");
        let log_file = fs::File::create(&log).map_err(|e| format!("creating the log: {e}"))?;
        let stderr = log_file
            .try_clone()
            .map_err(|e| format!("cloning the log: {e}"))?;
        let client = free_port()?;
        let peer = free_port()?;
        let child = Command::new("etcd")
            .arg("--name=steer-test")
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg(format!("--listen-client-urls=http://{client}"))
            .arg(format!("--advertise-client-urls=http://{client}"))
            .arg(format!("--listen-peer-urls=http://{peer}"))
            .arg(format!("--initial-advertise-peer-urls=http://{peer}"))
            .arg(format!("--initial-cluster=steer-test=http://{peer}"))
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(stderr)
            .spawn()
            .map_err(|e| {
                format!("running etcd (is etcd-server installed? run `cargo xtask deps`): {e}")
            })?;
        // From here the guard owns the process and the directory, also on failure.
        let mut etcd = Etcd { child, dir, client };
        match etcd.wait_healthy() {
            Ok(()) => Ok(etcd),
            Err(why) => {
                let log = fs::read_to_string(&log).unwrap_or_default();
                Err(format!("{why}\netcd log:\n{log}"))
            }
        }
    }

    fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("etcd exited with {status}"));
            }
            if health(self.client).is_some_and(|body| body.contains(r#""health":"true""#)) {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "etcd not healthy on {} within {READY_TIMEOUT:?}",
            self.client
        ))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Result<SocketAddr, String> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("finding a free loopback port: {e}"))
}

/// The body of `GET /health`, or `None` while etcd does not answer.
fn health(addr: SocketAddr) -> Option<String> {
    let timeout = Duration::from_secs(1);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}
