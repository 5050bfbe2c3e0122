//! systemd's notification protocol (`sd_notify(3)`), for a unit with `Type=notify`: the agent
//! says READY once it serves, RELOADING and READY around a reload, STOPPING when it drains,
//! and WATCHDOG at half the unit's `WatchdogSec=` while its runtime answers. Each message is one
//! datagram to `$NOTIFY_SOCKET` (a path, or an abstract name written with a leading `@`);
//! without the variable (not under systemd) nothing is sent.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use tracing::{debug, warn};

/// Where the notifications go, as the environment named it at the start.
#[derive(Clone, Debug)]
pub struct Notifier {
    socket: Option<String>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; systemd sets it for the main process only.
    pub fn from_env() -> Notifier {
        Notifier {
            socket: std::env::var("NOTIFY_SOCKET")
                .ok()
                .filter(|s| !s.is_empty()),
        }
    }

    /// READY=1, with a STATUS line.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// RELOADING=1 with the monotonic time systemd asks for; READY=1 follows when it is done.
    pub fn reloading(&self) {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
            .unwrap_or(0);
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={now}\nSTATUS=reloading the config"
        ));
    }

    /// STOPPING=1: the drain has begun.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=draining");
    }

    /// How often to send WATCHDOG=1: half of `$WATCHDOG_USEC` when the watchdog is on for this
    /// process (`$WATCHDOG_PID` unset or ours).
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.socket.as_ref()?;
        let pid = std::env::var("WATCHDOG_PID").ok();
        if pid.is_some_and(|p| p.parse::<u32>().ok() != Some(std::process::id())) {
            return None;
        }
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        (usec > 0).then(|| Duration::from_micros(usec / 2))
    }

    /// WATCHDOG=1.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    fn send(&self, message: &str) {
        let Some(socket) = &self.socket else {
            return;
        };
        match send_to(socket, message) {
            Ok(()) => debug!(message, "sd_notify"),
            // systemd goes on without it; the unit may then time out, which says why.
            Err(error) => warn!(%error, socket, "sd_notify"),
        }
    }
}

fn send_to(socket: &str, message: &str) -> io::Result<()> {
    let sender = UnixDatagram::unbound()?;
    match socket.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sender.send_to_addr(message.as_bytes(), &address)?;
        }
        None => {
            sender.send_to(message.as_bytes(), socket)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_path_and_an_abstract_socket() -> io::Result<()> {
        let dir = std::env::temp_dir().join(format!("steer-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let receiver = UnixDatagram::bind(&path)?;
        let notifier = Notifier {
            socket: Some(path.display().to_string()),
        };
        notifier.ready("serving");
        notifier.stopping();
        let mut buf = [0; 256];
        let n = receiver.recv(&mut buf)?;
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
        let n = receiver.recv(&mut buf)?;
        assert_eq!(&buf[..n], b"STOPPING=1\nSTATUS=draining");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("steer-notify-test-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(&name)?;
        let receiver = UnixDatagram::bind_addr(&address)?;
        let notifier = Notifier {
            socket: Some(format!("@{name}")),
        };
        notifier.watchdog();
        let n = receiver.recv(&mut buf)?;
        assert_eq!(&buf[..n], b"WATCHDOG=1");
        // Not under systemd: nothing is sent, nothing fails.
        Notifier { socket: None }.ready("serving");
        std::fs::remove_dir_all(&dir)
    }
}
