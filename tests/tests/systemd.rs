//! The agent under systemd: `dist/steer.service` passes `systemd-analyze verify` without a
//! warning, and a real agent speaks `sd_notify` to a test `NOTIFY_SOCKET` as systemd would read
//! it (READY once serving, RELOADING then READY around a SIGHUP, WATCHDOG at half of
//! `WATCHDOG_USEC`, STOPPING on SIGTERM).

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tests::admin::token_file;
use tests::bench::free_port;
use tests::blocking::scratch;
use tests::topology::steer_bin;

#[test]
fn the_unit_file_verifies_without_a_warning() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/steer.service");
    let text = std::fs::read_to_string(&unit).expect("dist/steer.service");
    let dir = scratch("steer-unit");
    // verify checks that the commands exist: the binary as built, where the unit has /usr/bin.
    let local = dir.join("steer.service");
    let steer = steer_bin().display().to_string();
    std::fs::write(&local, text.replace("/usr/bin/steer", &steer)).expect("write the unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&local)
        .output()
        .expect("systemd-analyze (Debian's systemd; `cargo xtask deps` installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {stderr}", out.status);
    assert!(stderr.trim().is_empty(), "warnings: {stderr}");
    for key in [
        "Type=notify",
        "ExecReload=",
        "Restart=on-failure",
        "WatchdogSec=",
    ] {
        assert!(text.contains(key), "no {key}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The next message on `socket` that is not a WATCHDOG=1 (counted into `watchdogs`).
fn next(socket: &UnixDatagram, watchdogs: &mut usize, deadline: Instant) -> String {
    let mut buf = [0; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no message in time");
        socket.set_read_timeout(Some(left)).expect("timeout");
        let n = socket.recv(&mut buf).expect("a notification");
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        if message == "WATCHDOG=1" {
            *watchdogs += 1;
        } else {
            return message;
        }
    }
}

#[test]
fn the_agent_speaks_sd_notify_to_a_notify_socket() {
    let dir = scratch("steer-notify");
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    let admin = format!("127.0.0.1:{}", free_port());
    let config = format!(
        "[agent]\ninterfaces = [\"lo\"]\nadmin_addr = \"{admin}\"\nadmin_token_file = {:?}\n\
         dataplane = \"userspace\"\n\n[[service]]\nname = \"chat\"\naddress = \"127.0.0.1:{}\"\n",
        token_file(&dir).display().to_string(),
        free_port()
    );
    let config_path = dir.join("steer.toml");
    std::fs::write(&config_path, config).expect("write the config");
    let log = std::fs::File::create(dir.join("steer.log")).expect("a log");
    let mut agent = Command::new(steer_bin())
        .args(["run", "--config"])
        .arg(&config_path)
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "400000")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup"))
        .stderr(log)
        .spawn()
        .expect("start steer");
    let pid = Pid::from_raw(agent.id() as i32);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut watchdogs = 0;
    let ready = next(&socket, &mut watchdogs, deadline);
    assert!(
        ready.starts_with("READY=1\nSTATUS=serving 1 services"),
        "{ready:?}"
    );
    // 200 ms apart: a few within a second.
    std::thread::sleep(Duration::from_secs(1));
    kill(pid, Signal::SIGHUP).expect("SIGHUP");
    let reloading = next(&socket, &mut watchdogs, deadline);
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .expect("MONOTONIC_USEC");
    assert!(usec > 0);
    let ready = next(&socket, &mut watchdogs, deadline);
    assert!(ready.starts_with("READY=1"), "after the reload: {ready:?}");
    assert!(watchdogs >= 3, "{watchdogs} WATCHDOG=1 in over a second");
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let stopping = next(&socket, &mut watchdogs, deadline);
    assert!(stopping.starts_with("STOPPING=1"), "{stopping:?}");
    let status = agent.wait().expect("the agent's exit");
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&dir);
}
