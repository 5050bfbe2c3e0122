//! A throwaway etcd (Debian's `etcd-server`) on loopback ports with its own data directory.

use std::{
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
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
        let client = free_port()?;
        let peer = free_port()?;
        let member = Member {
            name: "steer-test".to_owned(),
            dir,
            client,
            peer,
            cluster: format!("steer-test=http://{peer}"),
            extra: Vec::new(),
            health: client,
        };
        let child = member.spawn()?;
        // From here the guard owns the process and the directory, also on failure.
        let mut etcd = Etcd {
            child,
            dir: member.dir.clone(),
            client,
        };
        match wait_healthy(client, || etcd.child.try_wait().ok().flatten()) {
            Ok(()) => Ok(etcd),
            Err(why) => Err(format!("{why}\netcd log:\n{}", member.log())),
        }
    }
}

/// One etcd member: its name, data directory, ports and the cluster it starts in.
struct Member {
    name: String,
    dir: PathBuf,
    client: SocketAddr,
    peer: SocketAddr,
    /// `--initial-cluster`: every member's `name=http://peer`.
    cluster: String,
    /// More flags (TLS, say).
    extra: Vec<String>,
    /// Where `/health` answers in plain HTTP (`--listen-metrics-urls`): the client port serves
    /// only https once TLS flags are given.
    health: SocketAddr,
}

impl Member {
    fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the member, its output appended to its log; with its data directory from an
    /// earlier run it rejoins with what it had.
    fn spawn(&self) -> Result<Child, String> {
        let log_file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("creating the log: {e}"))?;
        let stderr = log_file
            .try_clone()
            .map_err(|e| format!("cloning the log: {e}"))?;
        let scheme = if self.extra.iter().any(|f| f.starts_with("--cert-file")) {
            "https"
        } else {
            "http"
        };
        let mut command = Command::new("etcd");
        if self.health != self.client {
            command.arg(format!("--listen-metrics-urls=http://{}", self.health));
        }
        command
            .arg(format!("--name={}", self.name))
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={scheme}://{}", self.client))
            .arg(format!(
                "--advertise-client-urls={scheme}://{}",
                self.client
            ))
            .arg(format!("--listen-peer-urls=http://{}", self.peer))
            .arg(format!(
                "--initial-advertise-peer-urls=http://{}",
                self.peer
            ))
            .arg(format!("--initial-cluster={}", self.cluster))
            .arg("--initial-cluster-state=new")
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(stderr)
            .spawn()
            .map_err(|e| {
                format!("running etcd (is etcd-server installed? run `cargo xtask deps`): {e}")
            })
    }
}

/// A cluster of etcd members on loopback ports, each with its own data directory; members can
/// be stopped (SIGKILL, as a crash) and started again. Killed and removed on drop.
pub struct EtcdCluster {
    members: Vec<Member>,
    children: Vec<Option<Child>>,
    root: PathBuf,
}

impl EtcdCluster {
    /// Starts `size` members and waits until every one reports healthy (a leader elected).
    pub fn start(size: usize) -> EtcdCluster {
        Self::start_with(size, &[])
    }

    /// As [`EtcdCluster::start`], every member with `extra` flags (TLS ones serve https).
    pub fn start_with(size: usize, extra: &[String]) -> EtcdCluster {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let root =
            std::env::temp_dir().join(format!("steer-etcd-cluster-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let ports: Vec<(SocketAddr, SocketAddr)> = (0..size)
            .map(|_| Ok::<_, String>((free_port()?, free_port()?)))
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("{e}"));
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let members: Vec<Member> = ports
            .iter()
            .enumerate()
            .map(|(i, &(client, peer))| Member {
                name: format!("m{i}"),
                dir: root.join(format!("m{i}")),
                client,
                peer,
                cluster: cluster.clone(),
                extra: extra.to_vec(),
                health: if extra.is_empty() {
                    client
                } else {
                    free_port().unwrap_or_else(|e| panic!("{e}"))
                },
            })
            .collect();
        let mut etcd = EtcdCluster {
            members,
            children: Vec::new(),
            root,
        };
        for member in &etcd.members {
            fs::create_dir_all(&member.dir).unwrap_or_else(|e| panic!("{e}"));
            let child = member.spawn().unwrap_or_else(|e| panic!("{e}"));
            etcd.children.push(Some(child));
        }
        for i in 0..size {
            etcd.wait_member(i);
        }
        etcd
    }

    /// The members' client addresses, `127.0.0.1:<port>`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client.to_string()).collect()
    }

    /// Kills member `i` (SIGKILL: no goodbye to its peers).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again from its data directory. Waits for it to be healthy only when
    /// `wait` (a member without a quorum never is).
    pub fn restart(&mut self, i: usize, wait: bool) {
        assert!(self.children[i].is_none(), "member {i} runs");
        let child = self.members[i].spawn().unwrap_or_else(|e| panic!("{e}"));
        self.children[i] = Some(child);
        if wait {
            self.wait_member(i);
        }
    }

    /// Waits until member `i` reports healthy.
    pub fn wait_member(&mut self, i: usize) {
        let member = &self.members[i];
        let child = &mut self.children[i];
        let exited = || child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        if let Err(why) = wait_healthy(member.health, exited) {
            panic!("etcd member {}: {why}\nlog:\n{}", member.name, member.log());
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.stop(i);
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// Waits until etcd on `client` says it is healthy; `exited` tells whether it died meanwhile.
fn wait_healthy(
    client: SocketAddr,
    mut exited: impl FnMut() -> Option<std::process::ExitStatus>,
) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if let Some(status) = exited() {
            return Err(format!("etcd exited with {status}"));
        }
        if health(client).is_some_and(|body| body.contains(r#""health":"true""#)) {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "etcd not healthy on {client} within {READY_TIMEOUT:?}"
    ))
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Result<SocketAddr, String> {
    Ok(SocketAddr::from((
        Ipv4Addr::LOCALHOST,
        crate::bench::free_port(),
    )))
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
