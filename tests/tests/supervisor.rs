//! The llama-server supervisor against real processes: `steer supervise` runs a real
//! llama-server (`tests::llama`) on loopback ports picked free, and the tests drive it over its
//! params API while watching the OS for the processes it starts.
//!
//! No root is needed, only llama-server and the model (`cargo xtask deps`); without them the
//! tests fail and say how to get them. Every process started here is killed on drop.
//!
//! Timing figures (POST to healthy, crash to healthy) are printed, not asserted, except that a
//! revival must come within the startup timeout plus a margin.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use lb_userspace::spec::DriverConfig;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tests::admin;
use tests::bench::free_port;
use tests::llama::{llama_server_path, model_path};
use tests::metrics;
use tests::topology::steer_bin;

const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a revival may take beyond the startup timeout.
const REVIVAL_MARGIN: Duration = Duration::from_secs(2);

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// A temp directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("steer-sv-{tag}-{}-{id}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a `steer supervise` run is started with.
#[derive(Clone)]
struct Options {
    driver: DriverConfig,
    port: u16,
    model: PathBuf,
    alias: String,
    extra: Vec<String>,
}

/// A running `steer supervise`, stopped (SIGTERM, then SIGKILL) on drop along with any
/// llama-server still carrying its alias.
struct Supervisor {
    child: Option<Child>,
    api: SocketAddr,
    alias: String,
    log: PathBuf,
}

impl Supervisor {
    fn start(dir: &Path, options: &Options) -> Supervisor {
        Supervisor::start_with(dir, options, &[])
    }

    fn start_with(dir: &Path, options: &Options, flags: &[&str]) -> Supervisor {
        let supervisor = Supervisor::spawn(dir, options, flags);
        supervisor.wait_running("the first start");
        supervisor
    }

    /// Starts `steer supervise` without waiting for llama-server to come up.
    fn spawn(dir: &Path, options: &Options, flags: &[&str]) -> Supervisor {
        let api = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let log = dir.join(format!("supervisor-{id}.log"));
        let out = std::fs::File::create(&log).expect("create supervisor log");
        let err = out.try_clone().expect("clone log handle");
        let driver = serde_json::to_string(&options.driver).expect("driver JSON");
        // The test token unless the test brings its own; the API may point --model into the
        // test's directory and the model's own, where the links there resolve.
        let mut security = Vec::new();
        if !flags.contains(&"--admin-token-file") {
            security.push("--admin-token-file".to_owned());
            security.push(path_str(&admin::token_file(dir)).to_owned());
        }
        let model_dir = model_path()
            .parent()
            .expect("the model's directory")
            .to_owned();
        for dir in [dir, model_dir.as_path()] {
            security.extend(["--model-dir".to_owned(), path_str(dir).to_owned()]);
        }
        let child = Command::new(steer_bin())
            .arg("supervise")
            .args(["--supervisor-addr", &api.to_string()])
            .args(["--binary", path_str(&llama_server_path())])
            .args(["--model", path_str(&options.model)])
            .args(["--port", &options.port.to_string()])
            .args(["--config-driver", &driver])
            .args([
                "--startup-timeout",
                &format!("{}s", STARTUP_TIMEOUT.as_secs()),
            ])
            .args(["--stop-grace", &format!("{}s", STOP_GRACE.as_secs())])
            .args(["--log-level", "info,llama_server=debug"])
            .args(&security)
            .args(flags)
            .arg("--")
            .args(["-np", "2", "-c", "2048", "--alias", &options.alias])
            .args(&options.extra)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start steer supervise");
        Supervisor {
            child: Some(child),
            api,
            alias: options.alias.clone(),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn get(&self) -> Value {
        let (status, body) = http(self.api, "GET", "/v1/params", None, None);
        assert_eq!(status, 200, "GET /v1/params: {body}");
        body
    }

    /// `GET /metrics` and this instance's `name` label.
    fn metrics(&self) -> (prometheus_parse::Scrape, String) {
        let (status, body) = http(self.api, "GET", "/metrics", None, None);
        assert_eq!(status, 200, "GET /metrics: {body}");
        let scrape = metrics::parse(body.as_str().unwrap_or_default());
        let name = self.get()["name"].as_str().unwrap_or_default().to_owned();
        (scrape, name)
    }

    fn post(&self, args: Value) -> (u16, Value) {
        self.post_to("/v1/params", args, Some(admin::TOKEN))
    }

    fn post_to(&self, path: &str, args: Value, token: Option<&str>) -> (u16, Value) {
        let body = json!({ "args": args }).to_string();
        http(self.api, "POST", path, Some(&body), token)
    }

    /// Polls GET until the instance is running with nothing pending (at most 2 startup
    /// timeouts), returning that status.
    fn wait_running(&self, what: &str) -> Value {
        let deadline = Instant::now() + 2 * STARTUP_TIMEOUT + STOP_GRACE;
        loop {
            if let Some(status) = try_http(self.api, "GET", "/v1/params", None, None)
                .filter(|(code, _)| *code == 200)
                .map(|(_, body)| body)
                && status["state"] == "running"
                && status["pending"].is_null()
            {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the instance is not running after {:?}; log:\n{}",
                2 * STARTUP_TIMEOUT + STOP_GRACE,
                self.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, as a crash would; llama-server dies with it (parent-death signal).
    fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + STOP_GRACE + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in llama_pids(&self.alias) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// One HTTP/1.1 request on a new connection; panics when there is no answer.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, Value) {
    try_http(addr, method, path, body, token)
        .unwrap_or_else(|| panic!("{method} {path} on {addr}: no HTTP answer"))
}

fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> Option<(u16, Value)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    // An apply may stop, start and roll back: up to two startup timeouts plus the grace.
    stream.set_read_timeout(Some(3 * STARTUP_TIMEOUT)).ok()?;
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: steer-test\r\nConnection: close\r\n");
    if let Some(token) = token {
        request += &format!("Authorization: Bearer {token}\r\n");
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        request += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    request += "\r\n";
    request += body;
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let body = serde_json::from_str(body).unwrap_or(Value::String(body.to_owned()));
    Some((status, body))
}

/// Pids of llama-server processes whose command line carries `alias` (the supervisor's own
/// command line also does, so only llama-server's count).
fn llama_pids(alias: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let mut words = cmdline.split(|&b| b == 0);
        let is_llama = words
            .next()
            .is_some_and(|argv0| argv0.ends_with(b"llama-server"));
        if is_llama && words.any(|w| w == alias.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

/// The `--model` of the running llama-server with this pid.
fn process_model(pid: u32) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let words: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let at = words.iter().position(|w| *w == b"--model")?;
    words
        .get(at + 1)
        .map(|w| String::from_utf8_lossy(w).into_owned())
}

/// Watches /proc for one alias's llama-servers until dropped: every pid seen, in order, with its
/// model, and the most seen at once.
struct ProcessWatch {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<WatchReport>>,
}

#[derive(Debug, Default)]
struct WatchReport {
    /// (pid, model) in the order first seen.
    processes: Vec<(u32, Option<String>)>,
    most_at_once: usize,
}

impl ProcessWatch {
    fn start(alias: &str) -> ProcessWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let alias = alias.to_owned();
        let thread = thread::spawn({
            let stop = stop.clone();
            move || {
                let mut report = WatchReport::default();
                // Bounded: a test never runs this long.
                let deadline = Instant::now() + Duration::from_secs(600);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let pids = llama_pids(&alias);
                    report.most_at_once = report.most_at_once.max(pids.len());
                    for pid in pids {
                        if !report.processes.iter().any(|(p, _)| *p == pid) {
                            report.processes.push((pid, process_model(pid)));
                        }
                    }
                    thread::sleep(Duration::from_millis(2));
                }
                report
            }
        });
        ProcessWatch {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> WatchReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("watch thread"))
            .unwrap_or_default()
    }
}

impl Drop for ProcessWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A test's directory, driver and options: a file store in the directory, free ports, a unique
/// alias, and the model under a few names (symlinks) for changes that must start.
struct Setup {
    dir: TempDir,
    options: Options,
}

impl Setup {
    /// With the file driver: `config.toml` in the test's directory, name `gpt`.
    fn new(tag: &str) -> Setup {
        Setup::with_driver(tag, |dir| DriverConfig::File {
            path: dir.join("config.toml"),
            name: "gpt".to_owned(),
        })
    }

    /// With the driver `driver` makes, given the test's directory.
    fn with_driver(tag: &str, driver: impl FnOnce(&Path) -> DriverConfig) -> Setup {
        let dir = TempDir::new(tag);
        let driver = driver(&dir.0);
        let model = model_path();
        for name in ["foo.gguf", "bar.gguf", "baz.gguf", "main.gguf"] {
            std::os::unix::fs::symlink(&model, dir.0.join(name)).expect("symlink the model");
        }
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let options = Options {
            driver,
            port: free_port(),
            model: dir.0.join("main.gguf"),
            alias: format!("steer-sv-{}-{id}", std::process::id()),
            extra: Vec::new(),
        };
        Setup { dir, options }
    }

    fn model(&self, name: &str) -> String {
        path_str(&self.dir.0.join(name)).to_owned()
    }

    /// The setup's options with another model, from the test's directory.
    fn with_model(&self, name: &str) -> Options {
        Options {
            model: self.dir.0.join(name),
            ..self.options.clone()
        }
    }

    fn start(&self) -> Supervisor {
        Supervisor::start(&self.dir.0, &self.options)
    }
}

fn starts(status: &Value) -> u64 {
    status["starts"].as_u64().expect("starts is a number")
}

fn pid(status: &Value) -> u32 {
    status["pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .expect("a running instance has a pid")
}

fn applied_flag<'a>(status: &'a Value, flag: &str) -> &'a Value {
    &status["applied"]["args"][flag]
}

/// Prints a figure for the README. Straight to stderr, past libtest's capture, so it shows in
/// `cargo xtask test` output for passing tests too.
fn measured(what: &str, took: Duration) {
    let _ = writeln!(
        std::io::stderr(),
        "measured: {what}: {} ms",
        took.as_millis()
    );
}

/// UTC seconds since midnight, the part of a log timestamp that matters within a test.
fn seconds_of_day(time: std::time::SystemTime) -> f64 {
    let since_epoch = time
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    (since_epoch.as_secs() % 86_400) as f64 + f64::from(since_epoch.subsec_nanos()) / 1e9
}

/// The time of a log line (`2026-11-25T12:50:42.885208Z ...`, maybe in ANSI colours) as UTC
/// seconds since midnight.
fn log_seconds_of_day(line: &str) -> Option<f64> {
    let start = line.find('T')? + 1;
    let clock = line.get(start..)?.split('Z').next()?;
    let mut parts = clock.split(':');
    let hours: f64 = parts.next()?.parse().ok()?;
    let minutes: f64 = parts.next()?.parse().ok()?;
    let seconds: f64 = parts.next()?.parse().ok()?;
    Some(hours * 3600.0 + minutes * 60.0 + seconds)
}

fn health(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    matches!(try_http(addr, "GET", "/health", None, None), Some((200, _)))
}

#[test]
fn sigkill_is_revived_within_the_startup_time() {
    let setup = Setup::new("revive");
    let supervisor = setup.start();
    let posted = Instant::now();
    let (status, body) = supervisor.post(json!({"-c": 1024}));
    assert_eq!(status, 200, "{body}");
    measured(
        "POST to healthy (one change, 200 ms debounce included)",
        posted.elapsed(),
    );
    let before = supervisor.get();
    let old = pid(&before);
    assert!(health(setup.options.port));

    let crashed = Instant::now();
    let crashed_at = seconds_of_day(std::time::SystemTime::now());
    kill(Pid::from_raw(old as i32), Signal::SIGKILL).expect("SIGKILL llama-server");
    let deadline = crashed + STARTUP_TIMEOUT + REVIVAL_MARGIN;
    let mut new_pid = None;
    while Instant::now() < deadline {
        let pids = llama_pids(&setup.options.alias);
        if let [pid] = pids[..]
            && pid != old
            && health(setup.options.port)
        {
            new_pid = Some(pid);
            break;
        }
        thread::sleep(Duration::from_millis(5));
    }
    let elapsed = crashed.elapsed();
    let new_pid = new_pid.unwrap_or_else(|| {
        panic!(
            "not revived within {:?}; log:\n{}",
            STARTUP_TIMEOUT + REVIVAL_MARGIN,
            supervisor.log()
        )
    });
    measured("crash to healthy again", elapsed);
    // The supervisor awaits the child: it logs the exit as soon as it happens, with no
    // monitoring interval to wait out.
    let log = supervisor.log();
    let noticed = log
        .lines()
        .find(|line| line.contains("llama-server exited; reviving"))
        .and_then(log_seconds_of_day)
        .unwrap_or_else(|| panic!("no exit logged:\n{log}"));
    measured(
        "crash noticed by the supervisor after",
        Duration::from_secs_f64((noticed - crashed_at).max(0.0)),
    );

    let after = supervisor.wait_running("after the revival");
    assert_eq!(pid(&after), new_pid);
    assert_eq!(after["revivals"], 1);
    assert_eq!(starts(&after), starts(&before) + 1);
    assert_eq!(
        after["applied"], before["applied"],
        "revived with the same args"
    );
    let (scrape, name) = supervisor.metrics();
    let name = [("name", name.as_str())];
    let value = |metric| metrics::value(&scrape, metric, &name);
    assert_eq!(value("steer_instance_restarts_total"), 1.0);
    assert_eq!(value("steer_instance_starts_total"), starts(&after) as f64);
    assert_eq!(value("steer_instance_up"), 1.0);
    assert_eq!(value("steer_instance_last_apply_success"), 1.0);
    assert!(
        supervisor.log().contains("llama-server revived"),
        "{}",
        supervisor.log()
    );
}

/// Issue 11 finding 9: a llama-server that came up healthy and is SIGKILLed is revived at once
/// each time, however close the kills (was: backoff after the second kill within 60 s).
#[test]
fn repeated_kills_of_a_healthy_process_never_back_off() {
    let setup = Setup::new("kills");
    let supervisor = setup.start();
    let mut status = supervisor.wait_running("at start");
    for kill_number in 1..=3 {
        let old = pid(&status);
        kill(Pid::from_raw(old as i32), Signal::SIGKILL).expect("SIGKILL llama-server");
        let deadline = Instant::now() + 2 * STARTUP_TIMEOUT;
        status = loop {
            let now = supervisor.wait_running("after a kill");
            if pid(&now) != old {
                break now;
            }
            assert!(
                Instant::now() < deadline,
                "kill {kill_number}: not revived; log:\n{}",
                supervisor.log()
            );
            thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status["revivals"], kill_number, "{status}");
    }
    let log = supervisor.log();
    assert!(
        !log.contains("backing off"),
        "a healthy process's kill backed off:\n{log}"
    );
}

#[test]
fn bad_args_are_rejected_and_the_old_args_serve_again() {
    let setup = Setup::new("reject");
    let supervisor = setup.start();
    let before = supervisor.get();
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a port to take");
    let taken_port = taken.local_addr().expect("local_addr").port();

    let cases = [
        // Allowed flags with values llama-server refuses once started.
        (
            "bad cache type",
            json!({"--cache-type-k": "bogus-type"}),
            true,
        ),
        ("bad context size", json!({"-c": "many"}), true),
        ("taken port", json!({"--port": taken_port}), false),
    ];
    for (what, args, exits) in cases {
        let (status, body) = supervisor.post(args);
        assert_eq!(status, 422, "{what}: {body}");
        assert_eq!(body["restored"], true, "{what}: {body}");
        if exits {
            assert!(body["exit_status"].is_string(), "{what}: {body}");
            assert!(
                body["output_tail"]
                    .as_array()
                    .is_some_and(|t| !t.is_empty()),
                "{what}: {body}"
            );
        } else {
            assert!(
                body["error"].as_str().is_some_and(|e| e.contains("in use")),
                "{what}: {body}"
            );
        }
        let now = supervisor.wait_running(what);
        assert_eq!(now["applied"], before["applied"], "{what}");
        assert!(health(setup.options.port), "{what}: the old args serve");
        assert_eq!(now["last_outcome"]["result"], "rejected", "{what}");
        let (scrape, name) = supervisor.metrics();
        let name = [("name", name.as_str())];
        let success = metrics::value(&scrape, "steer_instance_last_apply_success", &name);
        assert_eq!(success, 0.0, "{what}");
    }
    let persisted = std::fs::read_to_string(setup.dir.0.join("config.toml")).expect("config");
    assert!(!persisted.contains("bogus-type") && !persisted.contains("many"));
    assert!(!persisted.contains(&taken_port.to_string()), "{persisted}");
    drop(taken);

    // Refused before anything starts: 400 and nothing changes.
    let starts_before = starts(&supervisor.get());
    for body in [
        r#"{"args": {"-c": 1024"#,
        r#"{"args": {"-c": 1024}, "extra": 1}"#,
        r#"{"args": {"model": "x"}}"#,
        r#"{"args": {"--mlock": false}}"#,
        r#"{"args": {"-c": [1]}}"#,
        r#"{"args": {"--port": null}}"#,
        r#"{"args": {"--port": "http"}}"#,
        r#"{"args": {"-m": "/nonexistent/model.gguf"}}"#,
        r#"{"args": {"--alias": "nul\u0000byte"}}"#,
    ] {
        let token = Some(admin::TOKEN);
        let (status, answer) = http(supervisor.api, "POST", "/v1/params", Some(body), token);
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer["error"].is_string(), "{body}: {answer}");
    }
    let after = supervisor.get();
    assert_eq!(starts(&after), starts_before);
    assert!(after["pending"].is_null());
    assert_eq!(after["applied"], before["applied"]);
}

/// Example 1: window 200 ms, POSTs at 0, 20, 100 and 200 ms -> one restart with -m foo -c 6.
#[test]
fn debounce_merges_a_burst_into_one_restart() {
    let setup = Setup::new("burst");
    let supervisor = setup.start();
    let before = supervisor.get();
    let watch = ProcessWatch::start(&setup.options.alias);
    let (foo, baz) = (setup.model("foo.gguf"), setup.model("baz.gguf"));
    let schedule = [
        (0, json!({"-m": foo}), false),
        (20, json!({"-m": baz, "-c": 5}), false),
        (100, json!({"-m": foo}), false),
        (200, json!({"-c": 6}), true),
    ];
    let begin = Instant::now();
    let mut last = None;
    for (at, args, wait) in schedule {
        let at = begin + Duration::from_millis(at);
        thread::sleep(at.saturating_duration_since(Instant::now()));
        let path = if wait {
            "/v1/params"
        } else {
            "/v1/params?wait=false"
        };
        let (status, body) = supervisor.post_to(path, args, Some(admin::TOKEN));
        assert_eq!(status, if wait { 200 } else { 202 }, "{body}");
        last = Some(body);
    }
    let applied = last.expect("the last answer");
    measured(
        "POST to healthy (4 POSTs in 200 ms, from the first)",
        begin.elapsed(),
    );
    assert_eq!(applied["applied"]["args"]["--model"], foo.as_str());
    assert_eq!(applied["applied"]["args"]["--ctx-size"], "6");
    let after = supervisor.wait_running("after the burst");
    let report = watch.finish();
    assert_eq!(starts(&after), starts(&before) + 1, "one restart: {after}");
    let new: Vec<_> = report
        .processes
        .iter()
        .filter(|(p, _)| *p != pid(&before))
        .collect();
    assert_eq!(new.len(), 1, "one new process: {report:?}");
    assert_eq!(new[0].0, pid(&after));
    assert_eq!(new[0].1.as_deref(), Some(foo.as_str()));
    assert_eq!(report.most_at_once, 1, "never two processes: {report:?}");
}

/// Example 2: a change during an apply waits for it, and changes during one apply merge: foo,
/// then (bar, baz) merged -> exactly two restarts, foo then baz; bar never runs.
#[test]
fn changes_during_an_apply_merge_into_one_pending_change() {
    let setup = Setup::new("pending");
    let supervisor = setup.start();
    let before = supervisor.get();
    let watch = ProcessWatch::start(&setup.options.alias);
    let [foo, bar, baz] = ["foo.gguf", "bar.gguf", "baz.gguf"].map(|m| setup.model(m));

    let later = "/v1/params?wait=false";
    let (status, _) = supervisor.post_to(later, json!({"-m": foo}), Some(admin::TOKEN));
    assert_eq!(status, 202);
    // Wait (bounded) until foo's apply is in progress: bar and baz must arrive during it.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = supervisor.get();
        if status["state"] == "applying" {
            assert_eq!(status["applying"]["args"]["--model"], foo.as_str());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "foo's apply never began: {status}"
        );
        thread::sleep(Duration::from_millis(2));
    }
    let (status, _) = supervisor.post_to(later, json!({"-m": bar}), Some(admin::TOKEN));
    assert_eq!(status, 202);
    let (status, body) = supervisor.post(json!({"--model": baz}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["applied"]["args"]["--model"], baz.as_str());

    let after = supervisor.wait_running("after foo and baz");
    let report = watch.finish();
    assert_eq!(starts(&after), starts(&before) + 2, "two restarts: {after}");
    let models: Vec<_> = report
        .processes
        .iter()
        .filter(|(p, _)| *p != pid(&before))
        .map(|(_, model)| model.clone().unwrap_or_default())
        .collect();
    assert_eq!(models, [foo, baz], "foo then baz, never bar: {report:?}");
    assert_eq!(report.most_at_once, 1, "never two processes: {report:?}");
}

/// A tiny deterministic generator, so a failure can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

/// 500 changes, faster than restarts complete: the end state is exactly the merged
/// last-writer-wins of all of them, restarts stay few, and there are never two processes.
#[test]
fn five_hundred_changes_end_in_the_merged_args() {
    let setup = Setup::new("stress");
    let supervisor = setup.start();
    let before = supervisor.get();
    let watch = ProcessWatch::start(&setup.options.alias);
    // (spelling sent, canonical name, values; None removes).
    let flags: [(&str, &str, &[Option<&str>]); 5] = [
        (
            "-c",
            "--ctx-size",
            &[Some("1024"), Some("2048"), Some("1536")],
        ),
        ("--ctx-size", "--ctx-size", &[Some("512"), Some("3072")]),
        ("-t", "--threads", &[Some("1"), Some("2")]),
        ("--temp", "--temp", &[Some("0.5"), Some("0.7"), None]),
        ("--top-k", "--top-k", &[Some("20"), Some("40"), None]),
    ];
    let mut expected: BTreeMap<String, Value> = before["applied"]["args"]
        .as_object()
        .expect("applied args")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut rng = Lcg(0x5eed);
    let begin = Instant::now();
    let mut last = None;
    for i in 0..500 {
        let mut change = serde_json::Map::new();
        for _ in 0..=rng.next(2) {
            let (spelling, canonical, values) = flags[rng.next(flags.len() as u64) as usize];
            let value = values[rng.next(values.len() as u64) as usize];
            // A second spelling of the same option in one body: the later one wins.
            change.retain(|k, _| flags.iter().all(|f| f.0 != k || f.1 != canonical));
            change.insert(spelling.to_owned(), value.map_or(Value::Null, Value::from));
            match value {
                Some(v) => expected.insert(canonical.to_owned(), Value::from(v)),
                None => expected.remove(canonical),
            };
        }
        let wait = i == 499;
        let path = if wait {
            "/v1/params"
        } else {
            "/v1/params?wait=false"
        };
        let token = Some(admin::TOKEN);
        let (status, body) = supervisor.post_to(path, Value::Object(change), token);
        assert_eq!(status, if wait { 200 } else { 202 }, "change {i}: {body}");
        last = Some(body);
        thread::sleep(Duration::from_millis(rng.next(8)));
    }
    measured("500 changes sent and all applied", begin.elapsed());
    let expected = Value::Object(expected.into_iter().collect());
    let last = last.expect("an answer");
    assert_eq!(last["applied"]["args"], expected, "the last POST's answer");
    let after = supervisor.wait_running("after 500 changes");
    let report = watch.finish();
    assert_eq!(after["applied"]["args"], expected);
    let restarts = starts(&after) - starts(&before);
    let _ = writeln!(std::io::stderr(), "restarts for 500 changes: {restarts}");
    assert!((1..=50).contains(&restarts), "restarts: {restarts}");
    assert_eq!(report.most_at_once, 1, "never two processes: {report:?}");
    // The running process has the merged args.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid(&after))).expect("cmdline");
    let words: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    for (flag, value) in expected.as_object().expect("object") {
        let at = words.iter().position(|w| w == flag);
        let at = at.unwrap_or_else(|| panic!("{flag} missing from {words:?}"));
        if let Some(value) = value.as_str() {
            assert_eq!(words.get(at + 1).map(String::as_str), Some(value), "{flag}");
        }
    }
    // Persisted too.
    let persisted = std::fs::read_to_string(setup.dir.0.join("config.toml")).expect("config");
    let ctx = format!("--ctx-size = {}", expected["--ctx-size"]);
    assert!(persisted.contains(&ctx), "{ctx} not in {persisted}");
}

/// A supervisor killed with SIGKILL and started again, with other command-line args, comes back
/// with the last persisted arguments. One test per driver calls this.
/// API changes persist across a SIGKILL of the supervisor; an edit of the command line made
/// meanwhile wins for the flags it changes and leaves the API's other changes alone.
fn persisted_args_survive_a_sigkill(setup: Setup) {
    let mut supervisor = setup.start();
    let (status, body) = supervisor.post(json!({"-c": 1024, "--temp": 0.25}));
    assert_eq!(status, 200, "{body}");
    let applied = supervisor.get()["applied"].clone();
    let restart = |supervisor: &mut Supervisor, options: &Options| {
        let old = pid(&supervisor.get());
        supervisor.kill_hard();
        // llama-server follows its supervisor (parent-death signal), freeing the port.
        let deadline = Instant::now() + Duration::from_secs(10);
        while llama_pids(&setup.options.alias).contains(&old) {
            assert!(
                Instant::now() < deadline,
                "llama-server outlived its supervisor"
            );
            thread::sleep(Duration::from_millis(10));
        }
        Supervisor::start(&setup.dir.0, options)
    };

    // The same command line: the persisted arguments, API changes included.
    let mut again = restart(&mut supervisor, &setup.options);
    let status = again.get();
    assert_eq!(status["applied"], applied, "the persisted args win");
    assert_eq!(applied_flag(&status, "--ctx-size"), "1024");
    assert_eq!(
        process_model(pid(&status)).as_deref(),
        Some(setup.model("main.gguf").as_str())
    );

    // The operator edits the command line (another model): the edit wins for --model, the
    // API's --ctx-size and --temp stay.
    let edited = setup.with_model("foo.gguf");
    let edited_run = restart(&mut again, &edited);
    let status = edited_run.get();
    assert_eq!(
        applied_flag(&status, "--model"),
        setup.model("foo.gguf").as_str()
    );
    assert_eq!(applied_flag(&status, "--ctx-size"), "1024", "{status}");
    assert_eq!(applied_flag(&status, "--temp"), "0.25", "{status}");
    assert_eq!(
        process_model(pid(&status)).as_deref(),
        Some(setup.model("foo.gguf").as_str())
    );
}

/// Arguments are persisted only once they came up healthy: a first deploy with a wrong model
/// leaves nothing behind, so fixing the command line is enough.
#[test]
fn arguments_that_never_came_up_are_not_persisted() {
    let setup = Setup::new("never-up");
    let wrong = setup.with_model("missing.gguf");
    let mut supervisor = Supervisor::spawn(&setup.dir.0, &wrong, &[]);
    // Bounded: llama-server exits at once on a missing model; let it fail and be revived.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let revivals = try_http(supervisor.api, "GET", "/v1/params", None, None)
            .and_then(|(_, body)| body["starts"].as_u64())
            .unwrap_or(0);
        if revivals >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no failed start seen; log:\n{}",
            supervisor.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
    supervisor.kill_hard();
    let persisted = std::fs::read_to_string(setup.dir.0.join("config.toml")).unwrap_or_default();
    assert!(
        !persisted.contains("missing.gguf"),
        "arguments that never came up were persisted:\n{persisted}"
    );
    let fixed = setup.start();
    assert_eq!(
        process_model(pid(&fixed.get())).as_deref(),
        Some(setup.model("main.gguf").as_str())
    );
    let persisted = std::fs::read_to_string(setup.dir.0.join("config.toml")).unwrap_or_default();
    assert!(
        persisted.contains("main.gguf"),
        "healthy arguments persisted:\n{persisted}"
    );
}

#[test]
fn persisted_args_survive_a_sigkill_file_driver() {
    persisted_args_survive_a_sigkill(Setup::new("persist-file"));
}

#[test]
fn persisted_args_survive_a_sigkill_etcd_driver() {
    let etcd = tests::etcd::Etcd::start();
    persisted_args_survive_a_sigkill(Setup::with_driver("persist-etcd", |dir| {
        DriverConfig::Etcd {
            addr: etcd.endpoint(),
            name: "gpt".into(),
            cache: Some(dir.join("etcd-cache.toml")),
        }
    }));
}

/// etcd gone at start: the instance comes up with the arguments cached at the last save, and
/// a change still applies, answered with a persist error that says where it is kept.
#[test]
fn etcd_down_at_start_uses_the_cached_arguments() {
    let etcd = tests::etcd::Etcd::start();
    let setup = Setup::with_driver("etcd-down", |dir| DriverConfig::Etcd {
        addr: etcd.endpoint(),
        name: "gpt".into(),
        cache: Some(dir.join("etcd-cache.toml")),
    });
    let mut supervisor = setup.start();
    let (status, body) = supervisor.post(json!({"-c": 1024}));
    assert_eq!(status, 200, "{body}");
    supervisor.kill_hard();
    drop(etcd);

    let again = setup.start();
    let status = again.get();
    assert_eq!(applied_flag(&status, "--ctx-size"), "1024", "{status}");
    assert!(
        again
            .log()
            .contains("etcd does not answer: using the arguments cached"),
        "{}",
        again.log()
    );
    let (code, body) = again.post(json!({"-c": 1536}));
    assert_eq!(code, 200, "{body}");
    let persist_error = body["persist_error"].as_str().unwrap_or_default();
    assert!(
        persist_error.contains("etcd-cache.toml"),
        "the answer says where the change is kept: {body}"
    );
}

/// Two instances keep their configs in one file under two names; each change touches only its
/// own, and each comes back with its own after a restart.
#[test]
fn two_named_configs_in_one_file_do_not_disturb_each_other() {
    let setup = Setup::new("two-names");
    let other = Options {
        driver: DriverConfig::File {
            path: setup.dir.0.join("config.toml"),
            name: "other".to_owned(),
        },
        port: free_port(),
        model: setup.dir.0.join("foo.gguf"),
        alias: format!("{}-other", setup.options.alias),
        extra: Vec::new(),
    };
    let first = setup.start();
    let second = Supervisor::start(&setup.dir.0, &other);
    let (status, body) = first.post(json!({"-c": 1024}));
    assert_eq!(status, 200, "{body}");
    let (status, body) = second.post(json!({"-c": 512}));
    assert_eq!(status, 200, "{body}");
    let applied = [
        first.get()["applied"].clone(),
        second.get()["applied"].clone(),
    ];
    drop((first, second));

    let persisted = std::fs::read_to_string(setup.dir.0.join("config.toml")).expect("config");
    assert!(
        persisted.contains("[gpt]") && persisted.contains("[other]"),
        "{persisted}"
    );
    let first = setup.start();
    let second = Supervisor::start(&setup.dir.0, &other);
    assert_eq!(first.get()["applied"], applied[0]);
    assert_eq!(second.get()["applied"], applied[1]);
    assert_eq!(applied[0]["args"]["--ctx-size"], "1024");
    assert_eq!(applied[1]["args"]["--ctx-size"], "512");
}

#[test]
fn token_and_binary_allowlist() {
    let setup = Setup::new("token");
    let token_file = setup.dir.0.join("token");
    std::fs::write(&token_file, "s3cret\n").expect("write token");
    let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(&token_file, private).expect("chmod 600");
    let allowed = setup.dir.0.join("alt/llama-server");
    std::fs::create_dir_all(setup.dir.0.join("alt")).expect("create alt/");
    std::os::unix::fs::symlink(llama_server_path(), &allowed).expect("symlink llama-server");
    let flags = [
        "--admin-token-file",
        path_str(&token_file),
        "--allowed-binary",
        path_str(&allowed),
    ];
    let supervisor = Supervisor::start_with(&setup.dir.0, &setup.options, &flags);
    let before = supervisor.get();
    let change = json!({"-c": 1024});
    let (status, body) = supervisor.post_to("/v1/params", change.clone(), None);
    assert_eq!(status, 401, "{body}");
    let (status, _) = supervisor.post_to("/v1/params", change.clone(), Some("wrong"));
    assert_eq!(status, 401);
    let (status, body) = supervisor.post_to("/v1/instances/gpt/params", change, Some("s3cret"));
    assert_eq!(status, 200, "{body}");

    let (status, body) =
        supervisor.post_to("/v1/params", json!({"binary": "/bin/sh"}), Some("s3cret"));
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("/bin/sh")),
        "{body}"
    );
    let (status, body) = supervisor.post_to(
        "/v1/params",
        json!({"binary": path_str(&allowed)}),
        Some("s3cret"),
    );
    assert_eq!(status, 200, "{body}");
    let after = supervisor.get();
    assert_eq!(after["applied"]["binary"], path_str(&allowed));
    assert_eq!(starts(&after), starts(&before) + 2);
    let exe = std::fs::read(format!("/proc/{}/cmdline", pid(&after))).expect("cmdline");
    assert!(exe.starts_with(path_str(&allowed).as_bytes()));

    // A token file others may read: refused at start, saying how to fix it.
    let shared = std::os::unix::fs::PermissionsExt::from_mode(0o644);
    std::fs::set_permissions(&token_file, shared).expect("chmod 644");
    let output = Command::new(steer_bin())
        .args(["supervise", "--supervisor-addr", "127.0.0.1:0"])
        .args(["--admin-token-file", path_str(&token_file)])
        .args(["--binary", "x", "--model", "m", "--port", "1"])
        .output()
        .expect("run steer supervise");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let fix = format!("chmod 600 {}", token_file.display());
    assert!(stderr.contains(&fix), "{stderr}");

    // Two drivers: a clear error, no panic.
    let driver = r#"{"type": "file", "path": "/tmp/x.toml", "name": "a"}"#;
    let output = Command::new(steer_bin())
        .args(["supervise", "--binary", "x", "--model", "m", "--port", "1"])
        .args(["--config-driver", driver, "--config-driver", driver])
        .output()
        .expect("run steer supervise");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--config-driver") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// `/proc/PID/status` field `name` (`Uid`, `Gid`, `Groups`), split on whitespace.
fn proc_status(pid: u32, name: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"));
    line.split_whitespace().map(str::to_owned).collect()
}

/// Issue 11, finding 1: with the supervisor as root, llama-server runs as `nobody` (no
/// supplementary groups, no new privileges); even with the token, `--path /etc` and
/// `--log-file` are 403s that touch no process; a `--path` persisted by an older agent is put
/// back to the operator's (none) at load, with an error logged and the store rewritten.
#[test]
fn llama_server_runs_unprivileged_and_host_flags_are_forbidden() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to show that llama-server does not run as root");
        return;
    }
    let setup = Setup::new("unprivileged");
    let mut supervisor = setup.start();
    let before = supervisor.get();
    let pid = pid(&before);
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("look up nobody")
        .expect("a user nobody");
    let uid = nobody.uid.to_string();
    assert_eq!(proc_status(pid, "Uid"), [uid.as_str(); 4]);
    let gid = nobody.gid.to_string();
    assert_eq!(proc_status(pid, "Gid"), [gid.as_str(); 4]);
    assert!(
        proc_status(pid, "Groups").is_empty(),
        "supplementary groups kept"
    );
    assert_eq!(proc_status(pid, "NoNewPrivs"), ["1"]);
    assert!(
        supervisor.log().contains("llama-server runs unprivileged"),
        "{}",
        supervisor.log()
    );

    for (flag, value) in [
        ("--path", "/etc"),
        ("--log-file", "/root/steer-owned"),
        ("-lf", "/root/steer-owned"),
        ("--host", "0.0.0.0"),
        ("--slot-save-path", "/root"),
    ] {
        let (status, body) = supervisor.post(json!({ flag: value }));
        assert_eq!(status, 403, "{flag}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("may not be set over the API"),
            "{flag}: {error}"
        );
    }
    // A model in a model directory that nobody may read: 400 naming it, no restart.
    let private = setup.dir.0.join("private.gguf");
    std::fs::write(&private, "GGUF").expect("write a model");
    let mode = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(&private, mode).expect("chmod 600");
    let (status, body) = supervisor.post(json!({"-m": path_str(&private)}));
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("`nobody` (llama-server's) cannot read"),
        "{error}"
    );
    let after = supervisor.get();
    assert_eq!(self::pid(&after), pid, "nothing restarted");
    assert_eq!(starts(&after), starts(&before));
    assert!(after["pending"].is_null());
    assert!(!Path::new("/root/steer-owned").exists());
    // An older agent took any flag: a persisted --path is dropped at the next start.
    supervisor.kill_hard();
    let store = setup.dir.0.join("config.toml");
    let persisted = std::fs::read_to_string(&store).expect("read the store");
    let edited = persisted.replacen("[gpt.args]\n", "[gpt.args]\n--path = \"/etc\"\n", 1);
    assert_ne!(edited, persisted, "no [gpt.args] in {persisted}");
    std::fs::write(&store, edited).expect("write the store");
    let supervisor = setup.start();
    let status = supervisor.get();
    assert!(
        status["applied"]["args"].get("--path").is_none(),
        "{status}"
    );
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", self::pid(&status))).expect("cmdline");
    assert!(
        !cmdline.split(|&b| b == 0).any(|w| w == b"--path"),
        "llama-server got --path"
    );
    let log = supervisor.log();
    assert!(log.contains("ERROR") && log.contains("--path"), "{log}");
    let rewritten = std::fs::read_to_string(&store).expect("read the store");
    assert!(!rewritten.contains("--path"), "{rewritten}");
}
