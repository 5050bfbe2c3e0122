//! The `events` ringbuf turned into `tracing` events: flow opened/closed at DEBUG, refusals at
//! WARN, at most one line per kind per second with the count of the lines left out.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use lb_common::{Event, event_kind};
use tokio::io::unix::AsyncFd;

/// Minimum time between two WARN lines of the same kind.
const WARN_INTERVAL: Duration = Duration::from_secs(1);

/// Read one event record; `None` if it is too short (never from this program).
pub(super) fn decode(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < size_of::<Event>() {
        return None;
    }
    // SAFETY: at least `size_of::<Event>()` bytes are readable, the read tolerates any alignment,
    // and `Event` is plain integers, valid for any bit pattern.
    Some(unsafe { bytes.as_ptr().cast::<Event>().read_unaligned() })
}

/// The client of an event, from network byte order.
fn client(event: &Event) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(event.client_addr.to_ne_bytes()),
        u16::from_be(event.client_port),
    )
}

/// Per-kind WARN rate limit. `admit` says whether to log now and how many were left out since.
#[derive(Debug, Default)]
pub(super) struct WarnLimiter {
    /// Indexed by `kind - NO_BACKEND`: last line logged and lines suppressed since.
    kinds: [(Option<Instant>, u64); 3],
}

impl WarnLimiter {
    pub(super) fn admit(&mut self, kind: u32, now: Instant) -> Option<u64> {
        let index = kind.checked_sub(event_kind::NO_BACKEND)? as usize;
        let (last, suppressed) = self.kinds.get_mut(index)?;
        match *last {
            Some(at) if now.saturating_duration_since(at) < WARN_INTERVAL => {
                *suppressed += 1;
                None
            }
            _ => {
                *last = Some(now);
                Some(std::mem::take(suppressed))
            }
        }
    }
}

fn log(event: &Event, limiter: &mut WarnLimiter, now: Instant) {
    let (service_id, backend_id, client) = (event.service_id, event.backend_id, client(event));
    match event.kind {
        event_kind::FLOW_OPENED => {
            tracing::debug!(service_id, backend_id, %client, "flow opened");
        }
        event_kind::FLOW_CLOSED => {
            tracing::debug!(service_id, backend_id, %client, "flow closed");
        }
        kind @ (event_kind::NO_BACKEND | event_kind::NO_ROUTE | event_kind::NO_SNAT_PORT) => {
            let Some(suppressed) = limiter.admit(kind, now) else {
                return;
            };
            let what = match kind {
                event_kind::NO_BACKEND => "new flow passed: no active backend with room",
                event_kind::NO_ROUTE => "new flow passed: no route to the backend",
                _ => "new flow passed: no free source port towards the backend",
            };
            tracing::warn!(service_id, backend_id, %client, suppressed, "{what}");
        }
        kind => tracing::debug!(kind, "unknown event kind from the XDP program"),
    }
}

/// How often the ring is drained without a wakeup: the program wakes this reader only when a
/// quarter of the ring is waiting (a wakeup per event would cost an interrupt per new flow), so a
/// quiet ring's events reach the log within this.
const DRAIN_INTERVAL: Duration = Duration::from_millis(100);

/// Drain the ringbuf every [`DRAIN_INTERVAL`] and whenever the program wakes this task, until
/// the task is aborted.
pub(super) async fn run(mut ring: AsyncFd<RingBuf<MapData>>) {
    let mut limiter = WarnLimiter::default();
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ready = ring.readable_mut() => match ready {
                // Cleared before draining: what arrives after the drain wakes this task again.
                Ok(mut guard) => guard.clear_ready(),
                Err(error) => {
                    tracing::error!(%error, "polling the events ringbuf; no more XDP events");
                    return;
                }
            },
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let events = ring.get_mut();
        while let Some(item) = events.next() {
            match decode(&item) {
                Some(event) => log(&event, &mut limiter, now),
                None => tracing::debug!(len = item.len(), "short record in the events ringbuf"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_an_event_record() {
        let event = Event {
            timestamp_ns: 42,
            kind: event_kind::FLOW_OPENED,
            service_id: 3,
            backend_id: 3 * 64 + 1,
            client_addr: u32::from_ne_bytes([10, 0, 0, 7]),
            client_port: 40000u16.to_be(),
            ..Event::default()
        };
        // SAFETY: reading the bytes of a plain-integer #[repr(C)] value with no implicit padding.
        let bytes = unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(&event).cast::<u8>(), size_of::<Event>())
        };
        // Ringbuf records are 8-aligned, but decode must not rely on it.
        let mut unaligned = vec![0u8];
        unaligned.extend_from_slice(bytes);
        let decoded = decode(&unaligned[1..]).expect("a whole record");
        assert_eq!(decoded, event);
        assert_eq!(client(&decoded), "10.0.0.7:40000".parse().expect("addr"));
        assert_eq!(decode(&bytes[..size_of::<Event>() - 1]), None);
    }

    #[test]
    fn warn_limiter_allows_one_line_per_kind_per_second() {
        let mut limiter = WarnLimiter::default();
        let t0 = Instant::now();
        assert_eq!(limiter.admit(event_kind::NO_BACKEND, t0), Some(0));
        assert_eq!(limiter.admit(event_kind::NO_BACKEND, t0), None);
        assert_eq!(
            limiter.admit(event_kind::NO_BACKEND, t0 + Duration::from_millis(999)),
            None
        );
        // Another kind has its own budget.
        assert_eq!(limiter.admit(event_kind::NO_ROUTE, t0), Some(0));
        assert_eq!(
            limiter.admit(event_kind::NO_BACKEND, t0 + WARN_INTERVAL),
            Some(2)
        );
        assert_eq!(
            limiter.admit(event_kind::NO_SNAT_PORT, t0 + WARN_INTERVAL),
            Some(0)
        );
        // Flow events are never rate-limited here.
        assert_eq!(limiter.admit(event_kind::FLOW_OPENED, t0), None);
    }
}
