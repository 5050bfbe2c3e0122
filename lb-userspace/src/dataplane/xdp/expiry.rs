//! Conntrack expiry. The kernel ends a flow on FIN/RST but never deletes its entries, and a flow
//! whose peers vanish keeps its backend's connection count. Once a second this task walks a
//! bounded slice of `ct_fwd` and `ct_rev` (resuming where it stopped), deletes flows idle in both
//! directions longer than the idle timeout (or closed and idle longer than the closed timeout)
//! together with their reverse entry, and gives an unreleased flow's count back exactly as the
//! kernel's `release_flow` would.
//!
//! Ownership: this task is the only user-space holder of `ct_fwd` and `ct_rev`; it reads
//! `backends` through its own handle (the table writes it, through `KernelMaps`) and shares the count mapping.

use std::{io, os::fd::AsFd, sync::Arc, time::Duration};

use aya::maps::{Array, HashMap, IterableMap, MapData, MapError};
use lb_common::{Backend, FlowFwd, FlowKey, FlowRev, flow_close};

use super::sys;
use crate::dataplane::conns::ConnCounts;

const TICK: Duration = Duration::from_secs(1);
/// Keys visited per map per tick: 262,144 entries are swept in about a minute, at a few
/// milliseconds of syscalls a second.
const BUDGET: usize = 4096;
const IPPROTO_TCP: u8 = 6;
const BPF_NOEXIST: u64 = 1;

#[derive(Clone, Copy, Debug)]
pub(super) struct Timeouts {
    pub(super) idle_ns: u64,
    pub(super) closed_ns: u64,
    /// A reply tuple the backend closed first: its TIME_WAIT (the kernel's `time_wait_ns`).
    pub(super) time_wait_ns: u64,
}

impl Timeouts {
    pub(super) fn new(idle: Duration, closed: Duration, time_wait: Duration) -> Self {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Self {
            idle_ns: ns(idle),
            closed_ns: ns(closed),
            time_wait_ns: ns(time_wait),
        }
    }

    /// How long a reverse entry stays after its last packet: the kernel's own hold
    /// (`reclaim_reply_tuple`) once closed, the idle timeout while open.
    fn rev_hold_ns(&self, rev: &FlowRev) -> u64 {
        match rev.closed {
            flow_close::OPEN => self.idle_ns,
            flow_close::BACKEND_CLOSED => self.time_wait_ns,
            _ => self.closed_ns,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Keep,
    /// Delete both entries; `release`: the flow still holds its backend's count.
    Expire {
        release: bool,
    },
}

/// What to do with a forward entry, given the last reply seen on its reverse entry (if any):
/// a flow is idle only when neither direction has sent for the timeout.
pub(super) fn fwd_verdict(
    flow: &FlowFwd,
    reply_last_seen_ns: Option<u64>,
    now_ns: u64,
    timeouts: Timeouts,
) -> Verdict {
    let last_seen = flow.last_seen_ns.max(reply_last_seen_ns.unwrap_or(0));
    let idle = now_ns.saturating_sub(last_seen);
    let released = flow.released != 0;
    if idle > timeouts.idle_ns || (released && idle > timeouts.closed_ns) {
        Verdict::Expire { release: !released }
    } else {
        Verdict::Keep
    }
}

/// A reverse entry outlived its forward entry: past its hold, and no forward entry points at it.
pub(super) fn rev_is_orphan(
    rev: &FlowRev,
    rev_key: &FlowKey,
    fwd: Option<&FlowFwd>,
    now_ns: u64,
    timeouts: Timeouts,
) -> bool {
    !rev_is_held(rev, now_ns, timeouts) && fwd.is_none_or(|fwd| rev_key_of(fwd) != *rev_key)
}

/// A reverse entry still inside its hold: a backend's TIME_WAIT outlasts the closed timeout,
/// so the entry (and with it the SNAT port) may stay after its forward entry went.
pub(super) fn rev_is_held(rev: &FlowRev, now_ns: u64, timeouts: Timeouts) -> bool {
    now_ns.saturating_sub(rev.last_seen_ns) <= timeouts.rev_hold_ns(rev)
}

/// The `ct_rev` key of a forward entry: backend -> SNAT address and port.
pub(super) fn rev_key_of(flow: &FlowFwd) -> FlowKey {
    FlowKey {
        src_addr: flow.backend_addr,
        dst_addr: flow.snat_addr,
        src_port: flow.backend_port,
        dst_port: flow.snat_port,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    }
}

/// The `ct_fwd` key of a reverse entry: client -> VIP.
pub(super) fn fwd_key_of(rev: &FlowRev) -> FlowKey {
    FlowKey {
        src_addr: rev.client_addr,
        dst_addr: rev.vip,
        src_port: rev.client_port,
        dst_port: rev.vip_port,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_coarse_ns` (which the kernel
/// reads at tick resolution, a few ms behind at most).
pub(super) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

fn lookup<V: aya::Pod>(
    map: &HashMap<MapData, FlowKey, V>,
    key: &FlowKey,
) -> Result<Option<V>, MapError> {
    match map.get(key, 0) {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A failed map syscall with this errno (an expected race with the kernel, not an error).
fn errno_is(e: &MapError, errno: i32) -> bool {
    matches!(e, MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(errno))
}

#[derive(Debug, thiserror::Error)]
enum SweepError {
    #[error("map `{map}`: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map `{map}`: {source}")]
    Sys {
        map: &'static str,
        #[source]
        source: io::Error,
    },
}

fn fwd_err(source: MapError) -> SweepError {
    SweepError::Map {
        map: "ct_fwd",
        source,
    }
}

fn rev_err(source: MapError) -> SweepError {
    SweepError::Map {
        map: "ct_rev",
        source,
    }
}

/// Where a walk stopped: the keys visited, and whether it reached the end of the map.
struct Slice {
    keys: Vec<FlowKey>,
    at_end: bool,
}

fn walk<V: aya::Pod>(
    map: &HashMap<MapData, FlowKey, V>,
    name: &'static str,
    from: Option<FlowKey>,
) -> Result<Slice, SweepError> {
    let fd = map.map().fd().as_fd();
    let mut keys = Vec::with_capacity(BUDGET);
    let mut cursor = from;
    while keys.len() < BUDGET {
        match sys::next_key(fd, cursor.as_ref()) {
            Ok(Some(key)) => {
                keys.push(key);
                cursor = Some(key);
            }
            Ok(None) => return Ok(Slice { keys, at_end: true }),
            Err(source) => return Err(SweepError::Sys { map: name, source }),
        }
    }
    Ok(Slice {
        keys,
        at_end: false,
    })
}

pub(super) struct Expiry {
    ct_fwd: HashMap<MapData, FlowKey, FlowFwd>,
    ct_rev: HashMap<MapData, FlowKey, FlowRev>,
    /// Read-only here: the generation decides whether a count is still the flow's to release.
    backends: Array<MapData, Backend>,
    conns: Arc<ConnCounts>,
    timeouts: Timeouts,
    fwd_cursor: Option<FlowKey>,
    rev_cursor: Option<FlowKey>,
}

impl Expiry {
    pub(super) fn new(
        ct_fwd: HashMap<MapData, FlowKey, FlowFwd>,
        ct_rev: HashMap<MapData, FlowKey, FlowRev>,
        backends: Array<MapData, Backend>,
        conns: Arc<ConnCounts>,
        timeouts: Timeouts,
    ) -> Self {
        Self {
            ct_fwd,
            ct_rev,
            backends,
            conns,
            timeouts,
            fwd_cursor: None,
            rev_cursor: None,
        }
    }

    /// One bounded pass over each map.
    fn sweep(&mut self, now_ns: u64) -> Result<(), SweepError> {
        self.sweep_fwd(now_ns)?;
        self.sweep_rev(now_ns)
    }

    fn sweep_fwd(&mut self, now_ns: u64) -> Result<(), SweepError> {
        let slice = walk(&self.ct_fwd, "ct_fwd", self.fwd_cursor)?;
        let mut last_kept = None;
        for key in &slice.keys {
            if self.expire_fwd(key, now_ns)? {
                continue;
            }
            last_kept = Some(*key);
        }
        // Resume after the last entry still in the map (a deleted key would restart the walk).
        self.fwd_cursor = if slice.at_end {
            None
        } else {
            last_kept.or(self.fwd_cursor)
        };
        Ok(())
    }

    /// The last reply of the flow at `key`, unless a new flow has taken its reply tuple over.
    fn reply_last_seen(&self, key: &FlowKey, flow: &FlowFwd) -> Result<Option<u64>, SweepError> {
        Ok(lookup(&self.ct_rev, &rev_key_of(flow))
            .map_err(rev_err)?
            .filter(|rev| fwd_key_of(rev) == *key)
            .map(|rev| rev.last_seen_ns))
    }

    /// Expire one forward entry if due; true if it is gone from the map.
    fn expire_fwd(&mut self, key: &FlowKey, now_ns: u64) -> Result<bool, SweepError> {
        let Some(flow) = lookup(&self.ct_fwd, key).map_err(fwd_err)? else {
            return Ok(true);
        };
        if fwd_verdict(&flow, None, now_ns, self.timeouts) == Verdict::Keep {
            return Ok(false);
        }
        let reply = self.reply_last_seen(key, &flow)?;
        if fwd_verdict(&flow, reply, now_ns, self.timeouts) == Verdict::Keep {
            return Ok(false);
        }
        // Judge the entry as it left the map: a packet may have touched or closed it since.
        let fd = self.ct_fwd.map().fd().as_fd();
        let Some(flow) = sys::lookup_and_delete::<FlowKey, FlowFwd>(fd, key).map_err(|source| {
            SweepError::Sys {
                map: "ct_fwd",
                source,
            }
        })?
        else {
            return Ok(true);
        };
        let release = match fwd_verdict(&flow, reply, now_ns, self.timeouts) {
            Verdict::Keep => {
                // Revived in between: put it back unless a new SYN already took the tuple.
                return match self.ct_fwd.insert(key, flow, BPF_NOEXIST) {
                    Err(e) if !errno_is(&e, libc::EEXIST) => Err(fwd_err(e)),
                    _ => Ok(false),
                };
            }
            Verdict::Expire { release } => release,
        };
        let count_released = release
            && self.release(&flow).map_err(|source| SweepError::Map {
                map: "backends",
                source,
            })?;
        let rev_key = rev_key_of(&flow);
        // A tuple in the backend's TIME_WAIT stays held; the reverse pass deletes it later.
        if let Some(rev) = lookup(&self.ct_rev, &rev_key).map_err(rev_err)?
            && fwd_key_of(&rev) == *key
            && (rev.closed == flow_close::OPEN || !rev_is_held(&rev, now_ns, self.timeouts))
        {
            match self.ct_rev.remove(&rev_key) {
                Err(e) if !errno_is(&e, libc::ENOENT) => return Err(rev_err(e)),
                _ => {}
            }
        }
        tracing::debug!(
            backend_id = flow.backend_id,
            client = %std::net::SocketAddrV4::new(
                key.src_addr.to_ne_bytes().into(),
                u16::from_be(key.src_port),
            ),
            count_released,
            "conntrack entry expired"
        );
        Ok(true)
    }

    /// `release_flow` from user space: the count goes back only to the backend generation it
    /// was taken from. True if a count was given back.
    fn release(&self, flow: &FlowFwd) -> Result<bool, MapError> {
        let backend = self.backends.get(&flow.backend_id, 0)?;
        Ok(backend.generation == flow.generation && self.conns.release(flow.backend_id))
    }

    fn sweep_rev(&mut self, now_ns: u64) -> Result<(), SweepError> {
        let slice = walk(&self.ct_rev, "ct_rev", self.rev_cursor)?;
        let mut last_kept = None;
        for key in &slice.keys {
            if self.expire_rev(key, now_ns)? {
                continue;
            }
            last_kept = Some(*key);
        }
        self.rev_cursor = if slice.at_end {
            None
        } else {
            last_kept.or(self.rev_cursor)
        };
        Ok(())
    }

    /// Delete one reverse entry if it is an idle orphan; true if it is gone from the map.
    fn expire_rev(&mut self, key: &FlowKey, now_ns: u64) -> Result<bool, SweepError> {
        let Some(rev) = lookup(&self.ct_rev, key).map_err(rev_err)? else {
            return Ok(true);
        };
        let fwd = lookup(&self.ct_fwd, &fwd_key_of(&rev)).map_err(fwd_err)?;
        if !rev_is_orphan(&rev, key, fwd.as_ref(), now_ns, self.timeouts) {
            return Ok(false);
        }
        let fd = self.ct_rev.map().fd().as_fd();
        let Some(rev) = sys::lookup_and_delete::<FlowKey, FlowRev>(fd, key).map_err(|source| {
            SweepError::Sys {
                map: "ct_rev",
                source,
            }
        })?
        else {
            return Ok(true);
        };
        if !rev_is_orphan(&rev, key, fwd.as_ref(), now_ns, self.timeouts) {
            return match self.ct_rev.insert(key, rev, BPF_NOEXIST) {
                Err(e) if !errno_is(&e, libc::EEXIST) => Err(rev_err(e)),
                _ => Ok(false),
            };
        }
        Ok(true)
    }
}

/// Sweep once a second until aborted.
pub(super) async fn run(mut expiry: Expiry) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(error) = expiry.sweep(monotonic_ns()) {
            // The next tick starts over; a map error here means the kernel refused a plain
            // lookup or delete, which should never last.
            tracing::warn!(%error, "conntrack expiry pass failed");
            expiry.fwd_cursor = None;
            expiry.rev_cursor = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn timeouts() -> Timeouts {
        Timeouts::new(
            Duration::from_secs(300),
            Duration::from_secs(10),
            Duration::from_secs(62),
        )
    }

    fn flow(last_seen_s: u64, released: bool) -> FlowFwd {
        FlowFwd {
            backend_id: 65,
            generation: 2,
            backend_addr: u32::from_ne_bytes([10, 1, 0, 2]),
            snat_addr: u32::from_ne_bytes([10, 1, 0, 1]),
            backend_port: 8080u16.to_be(),
            snat_port: 61001u16.to_be(),
            released: u32::from(released),
            last_seen_ns: last_seen_s * S,
            ..FlowFwd::default()
        }
    }

    #[test]
    fn open_flow_expires_after_idle_timeout_and_releases() {
        let t = timeouts();
        assert_eq!(
            fwd_verdict(&flow(1000, false), None, 1300 * S, t),
            Verdict::Keep
        );
        assert_eq!(
            fwd_verdict(&flow(1000, false), None, 1301 * S, t),
            Verdict::Expire { release: true }
        );
        // A reply seen recently keeps it: idle means idle both ways.
        assert_eq!(
            fwd_verdict(&flow(1000, false), Some(1200 * S), 1301 * S, t),
            Verdict::Keep
        );
    }

    #[test]
    fn closed_flow_expires_after_closed_timeout_without_release() {
        let t = timeouts();
        assert_eq!(
            fwd_verdict(&flow(1000, true), None, 1010 * S, t),
            Verdict::Keep
        );
        assert_eq!(
            fwd_verdict(&flow(1000, true), None, 1011 * S, t),
            Verdict::Expire { release: false }
        );
        assert_eq!(
            fwd_verdict(&flow(1000, true), None, 5000 * S, t),
            Verdict::Expire { release: false }
        );
    }

    #[test]
    fn clock_behind_entry_keeps_it() {
        // last_seen after "now" (entry touched between the clock read and the lookup).
        assert_eq!(
            fwd_verdict(&flow(1000, false), None, 999 * S, timeouts()),
            Verdict::Keep
        );
    }

    #[test]
    fn reverse_keys_round_trip() {
        let f = flow(0, false);
        let client = FlowKey {
            src_addr: u32::from_ne_bytes([192, 168, 0, 9]),
            dst_addr: u32::from_ne_bytes([10, 0, 0, 100]),
            src_port: 40000u16.to_be(),
            dst_port: 80u16.to_be(),
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        };
        let rev = FlowRev {
            client_addr: client.src_addr,
            vip: client.dst_addr,
            client_port: client.src_port,
            vip_port: client.dst_port,
            backend_id: f.backend_id,
            ..FlowRev::default()
        };
        assert_eq!(fwd_key_of(&rev), client);
        let rev_key = rev_key_of(&f);
        assert_eq!(rev_key.src_addr, f.backend_addr);
        assert_eq!(rev_key.dst_port, f.snat_port);
        assert_eq!(rev_key.proto, IPPROTO_TCP);
    }

    #[test]
    fn reverse_entry_is_orphan_only_when_idle_and_unreferenced() {
        let t = timeouts();
        let f = flow(0, false);
        let rev_key = rev_key_of(&f);
        let rev = FlowRev {
            last_seen_ns: 1000 * S,
            ..FlowRev::default()
        };
        // Idle but its forward entry still points at it: the forward pass decides.
        assert!(!rev_is_orphan(&rev, &rev_key, Some(&f), 2000 * S, t));
        // Idle and the forward entry is gone.
        assert!(rev_is_orphan(&rev, &rev_key, None, 2000 * S, t));
        // Idle and the client's tuple now belongs to another flow (new SYN on a closed tuple).
        let other = FlowFwd {
            snat_port: 62000u16.to_be(),
            ..f
        };
        assert!(rev_is_orphan(&rev, &rev_key, Some(&other), 2000 * S, t));
        // Not idle yet.
        assert!(!rev_is_orphan(&rev, &rev_key, None, 1200 * S, t));
    }

    #[test]
    fn closed_reverse_entries_are_held_for_the_closed_timeout_or_the_backends_time_wait() {
        let t = timeouts();
        let rev_key = rev_key_of(&flow(0, true));
        let closed = |how| FlowRev {
            last_seen_ns: 1000 * S,
            closed: how,
            ..FlowRev::default()
        };
        let by_client = closed(flow_close::CLOSED);
        assert!(!rev_is_orphan(&by_client, &rev_key, None, 1010 * S, t));
        assert!(rev_is_orphan(&by_client, &rev_key, None, 1011 * S, t));
        let by_backend = closed(flow_close::BACKEND_CLOSED);
        assert!(rev_is_held(&by_backend, 1011 * S, t), "in TIME_WAIT");
        assert!(!rev_is_orphan(&by_backend, &rev_key, None, 1062 * S, t));
        assert!(rev_is_orphan(&by_backend, &rev_key, None, 1063 * S, t));
    }
}
