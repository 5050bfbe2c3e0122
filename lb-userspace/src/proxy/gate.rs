//! Admission to a pool's backends for the userspace proxy: the choice, with the kernel's
//! policy model over the table's published [`Routes`], and the claim, in the same
//! [`ConnCounts`] the kernel reads, so both paths share one count per backend. A service has a
//! gate per model pool (one, over every backend, without pools; see [`super::ServiceProxy`]).
//!
//! The choice weighs each backend by its decode speed as the http proxy learnt it
//! ([`Gate::speed_factors`]): `least_connections` compares requests in flight per
//! weight times speed factor, `slots` free slots times speed factor (see [`weighed`]). Until a
//! backend is measured its factor is 1, so with nothing measured (l4, or no llama-server
//! `timings`) the proxy chooses exactly as the kernel does. Once paces are learnt, the
//! speed-aware policies also time the request itself (its tokens and prompt): they pass over a
//! backend with room that would be done with it over twice as late as another, and keep it
//! waiting for a full faster backend when that ends at least twice as soon
//! ([`Gate::waits_for_faster`]).
//!
//! A connection (http: a request) that finds no backend with room waits in the pool's FIFO
//! queue. Releasing a claim and every table change wake the queue at once; a flow the kernel ends
//! changes only the shared counter, which nothing can wait on, so waiters also look again every
//! [`KERNEL_RELEASE_TICK`].

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tracing::trace;

use crate::affinity::{self, Load};
use crate::dataplane::conns::ConnCounts;
use crate::policy::{BackendView, ServiceView, choose};
use crate::requests::{Pace, RequestCounts, speed_factors};
use crate::spec::{AffinitySpec, Policy, ProxySpec, ServiceSpec};
use crate::table::{Route, Routes};

/// How often a waiter looks again for room the kernel's own flows freed.
pub const KERNEL_RELEASE_TICK: Duration = Duration::from_millis(50);

/// Why a connection (l4) or request (http) was refused or cut short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The queue held `queue_size` connections or requests already.
    QueueFull,
    /// No backend had room within `queue_timeout`.
    QueueTimeout,
    /// The backend sent no first byte of its answer within `first_byte_timeout` (or
    /// `first_byte_timeout_unstreamed`) of the request.
    FirstByteTimeout,
    /// http: an answer's body stopped for `idle_timeout`; it is cut.
    IdleTimeout,
    /// http: the exchange was not done within `total_timeout` (524, or cut once the answer
    /// started).
    TotalTimeout,
    /// No backend could be reached (http: after its retries on others).
    Connect,
    /// http: the backend failed after the request was sent, before a response head.
    BadGateway,
    /// http: the request body was over `max_request_body`.
    BodyTooLarge,
    /// http: the request body could not be read (the client went away mid-body).
    BadRequest,
    /// http: the request body did not arrive within `client_body_timeout`.
    BodyTimeout,
    /// The client connection was closed at once: `max_client_connections` were open, each with
    /// something in flight.
    ConnectionLimit,
    /// The client connection was closed: a request head not done within
    /// `client_header_timeout` (http), or no byte either way within `client_idle_timeout` (l4).
    ClientTimeout,
    /// http with pools: the request's `model` is none of the pools' names.
    UnknownModel,
    /// http with pools: the body of a request that names a model is not a JSON object with a
    /// string (or no) `model`.
    InvalidBody,
}

impl Refusal {
    pub const ALL: [Refusal; 14] = [
        Refusal::QueueFull,
        Refusal::QueueTimeout,
        Refusal::FirstByteTimeout,
        Refusal::IdleTimeout,
        Refusal::TotalTimeout,
        Refusal::Connect,
        Refusal::BadGateway,
        Refusal::BodyTooLarge,
        Refusal::BadRequest,
        Refusal::BodyTimeout,
        Refusal::ConnectionLimit,
        Refusal::ClientTimeout,
        Refusal::UnknownModel,
        Refusal::InvalidBody,
    ];

    /// As `/v1/proxy` and the `reason` label of `/metrics` spell it.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::QueueFull => "queue_full",
            Refusal::QueueTimeout => "queue_timeout",
            Refusal::FirstByteTimeout => "first_byte_timeout",
            Refusal::IdleTimeout => "idle_timeout",
            Refusal::TotalTimeout => "total_timeout",
            Refusal::Connect => "connect_failed",
            Refusal::BadGateway => "bad_gateway",
            Refusal::BodyTooLarge => "body_too_large",
            Refusal::BadRequest => "bad_request",
            Refusal::BodyTimeout => "body_timeout",
            Refusal::ConnectionLimit => "connection_limit",
            Refusal::ClientTimeout => "client_timeout",
            Refusal::UnknownModel => "model_not_found",
            Refusal::InvalidBody => "invalid_body",
        }
    }
}

/// Why an http request was sent again to another backend: each proves the first did not act on
/// it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// The connect was refused or timed out.
    Connect,
    /// The connection closed or reset before any byte of an answer, for a request that may be
    /// sent twice (see `proxy::http`).
    Reset,
    /// llama.cpp's `503 Loading model`: the server took nothing yet.
    Loading,
}

impl Retry {
    pub const ALL: [Retry; 3] = [Retry::Connect, Retry::Reset, Retry::Loading];

    /// As `/v1/proxy` and the `reason` label of `/metrics` spell it.
    pub fn name(self) -> &'static str {
        match self {
            Retry::Connect => "connect_failed",
            Retry::Reset => "reset",
            Retry::Loading => "loading",
        }
    }
}

/// Upper bounds (seconds) of the queue wait histogram: 1 ms to `queue_timeout`'s default 100 s.
pub const WAIT_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0,
];

/// A pool's proxy counters (`GET /v1/proxy`, `/metrics`).
#[derive(Debug)]
struct Counters {
    admitted: AtomicU64,
    queued: AtomicU64,
    /// http: requests sent again to another backend, indexed like [`Retry::ALL`].
    retried: [AtomicU64; Retry::ALL.len()],
    /// Indexed like [`Refusal::ALL`].
    refused: [AtomicU64; Refusal::ALL.len()],
    /// Seconds each admitted connection or request waited (0 without a wait).
    wait: Histogram,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            admitted: AtomicU64::default(),
            queued: AtomicU64::default(),
            retried: Default::default(),
            refused: Default::default(),
            wait: Histogram::new(WAIT_BUCKETS),
        }
    }
}

/// The counters of one pool at one moment.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PoolStats {
    /// The pool's model; `None` for the one pool of a service without pools.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Connections (l4) or requests (http) that got a backend.
    pub admitted: u64,
    /// Of those and the ones that timed out: how many had to wait for room.
    pub queued: u64,
    pub queue_depth: u64,
    /// By [`Retry::name`].
    pub retried: BTreeMap<&'static str, u64>,
    /// By [`Refusal::name`].
    #[serde(flatten)]
    pub refused: BTreeMap<&'static str, u64>,
}

/// Backend choice, capacity and the FIFO queue of one pool.
#[derive(Debug)]
pub struct Gate {
    service: String,
    /// The pool's model, for its stats.
    model: Option<String>,
    /// The service's settings with the pool's cap, queue size and queue timeout.
    config: ProxySpec,
    /// The pool's policy.
    policy: Policy,
    /// Policy `cache_affinity`'s keys and load bound.
    affinity: Option<AffinitySpec>,
    /// Service id: the index into the routes.
    id: usize,
    /// The index into the service route's pools.
    pool: usize,
    counts: Arc<ConnCounts>,
    /// What the http proxy learns per backend: the speeds the choice weighs by.
    requests: Arc<RequestCounts>,
    routes: watch::Receiver<Routes>,
    /// The proxy's own round-robin cursor (the kernel's is per CPU in a map).
    cursor: AtomicU64,
    /// Tickets of the waiting connections, oldest first.
    queue: Mutex<VecDeque<u64>>,
    next_ticket: AtomicU64,
    /// Shared with the gate it replaced at a reload (see [`Carried`]).
    released: Arc<Notify>,
    counters: Arc<Counters>,
    /// The service's queue wait histogram, which every pool's waits go into too.
    service_wait: Histogram,
    /// When the last few waiters were served, newest last: the queue's recent pace, from which
    /// a refusal tells the client when to come back.
    served_from_queue: Mutex<VecDeque<tokio::time::Instant>>,
}

/// `b` as the policy ranks it, weighed by its speed `factor` (0.1 to 1): room is decided here on
/// the real counts (a backend without room is DOWN for the policy, one with room has no cap),
/// then the load the policy compares is scaled: requests in flight by 1 / factor (so
/// `least_connections` compares them per weight times factor) and free slots by factor (so
/// `slots` prefers free slots on fast backends). Factors are in thousandths, exact integers as
/// the policy needs; with every factor 1 the policy's order is the kernel's.
///
/// Once any backend is measured slower (`ahead` 1), the in-flight count includes the request
/// being placed: `least_connections` then picks the shortest expected delay, (in flight + 1) /
/// speed, so an idle backend 20 times slower waits until the fast ones hold nine each (its
/// factor's floor is 0.1), where in flight / speed alone would hand it one whenever it is idle.
fn weighed(b: BackendView, factor: f64, policy: u32, ahead: u64) -> BackendView {
    // Within 100..=1000: the factor's clamp.
    let milli = (factor * 1000.0).round().clamp(1.0, 1000.0) as u64;
    let room = has_room(&b, policy == lb_common::policy::SLOTS);
    BackendView {
        state: if room {
            b.state
        } else {
            lb_common::backend_state::DOWN
        },
        // Room is decided: no cap (0 would be "never polled", no room, under `slots`).
        max_conns: u32::MAX,
        conns: (b.conns + ahead).saturating_mul(1_000_000) / milli,
        idle_slots: u32::try_from(b.free_slots().saturating_mul(milli)).unwrap_or(u32::MAX),
        steered: 0,
        ..b
    }
}

/// Whether `b` can take one more: under `slots` a backend never polled (cap 0) cannot.
fn has_room(b: &BackendView, slots: bool) -> bool {
    if slots {
        b.usable_for_slots()
    } else {
        b.usable()
    }
}

/// What a request brings to the choice besides its client's address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ask {
    /// Its affinity key (policy `cache_affinity`; `None`: the client's address keys it).
    pub affinity: Option<u64>,
    /// The tokens it asks to generate (`max_tokens`) and about those of its prompt: what the
    /// speed-aware policies time it by ([`Gate::waits_for_faster`]); `None`: as many as the
    /// backend's answers average.
    pub tokens: Option<u64>,
    pub prompt_tokens: u64,
}

/// The speed-aware policies: they weigh backends by speed and keep a request waiting for a
/// faster backend when that ends sooner ([`Gate::waits_for_faster`]).
fn times_requests(policy: Policy) -> bool {
    matches!(
        policy,
        Policy::LeastConnections | Policy::Slots | Policy::CacheAffinity
    )
}

/// What a choice is keyed by: the client's address (policy `maglev`) and what the request asks.
#[derive(Clone, Copy, Debug)]
struct Key {
    client: Ipv4Addr,
    ask: Ask,
}

/// Where a claim stands in the queue: the waiters (itself included; 1 with nobody waiting) and
/// how long it has waited.
#[derive(Clone, Copy, Debug)]
struct Turn {
    queued: usize,
    waited: Duration,
}

/// A request's expected times on a pool's backends (see [`Gate::timing`]).
struct Timing {
    /// By slot; `None` for a backend not measured yet.
    paces: Vec<Option<Pace>>,
    /// The tokens it asks for, else the mean of the measured backends' tokens per answer: one
    /// figure for all, so backends are compared on one workload.
    tokens: f64,
    prompt: f64,
}

impl Timing {
    fn pace(&self, slot: usize) -> Option<Pace> {
        self.paces.get(slot).copied().flatten()
    }

    /// Seconds to be done with it on `slot` beside `others` requests.
    fn on(&self, slot: usize, others: u64) -> Option<f64> {
        Some(self.pace(slot)?.seconds(self.prompt, self.tokens, others))
    }

    /// Which of `backends` a time-aware policy passes over although they have room: those
    /// that are both over [`WAIT_MARGIN`] times slower than the fastest backend with room and,
    /// as loaded now, would be done with the request over that many times later than another
    /// backend with room. Servers of about one speed are left to the policy and its own load
    /// rules (`cache_affinity`'s bound). Under `cache_affinity` a conversation homed on a server
    /// several times slower goes on round the ring (to the same next backend every turn, whose
    /// cache then holds it; the home's cache is worth less than the margin); under `slots` such
    /// a server is passed over even when a poll older than the last answers shows the fast
    /// servers' slots still busy. The load is this agent's requests in flight, which are current:
    /// a poll's busy slots would count answers that ended since the poll as load (measured:
    /// `slots` then left conversations on a server ten times slower), at the price of not
    /// seeing other balancers' requests on a shared backend.
    fn outrun(&self, policy: Policy, backends: &[BackendView]) -> Vec<bool> {
        let slots = policy == Policy::Slots;
        let times: Vec<Option<(f64, f64)>> = (0..)
            .zip(backends)
            .map(|(slot, b)| {
                has_room(b, slots)
                    .then(|| Some((self.on(slot, 0)?, self.on(slot, b.conns)?)))
                    .flatten()
            })
            .collect();
        let fastest = times
            .iter()
            .flatten()
            .map(|t| t.0)
            .fold(f64::INFINITY, f64::min);
        let soonest = times
            .iter()
            .flatten()
            .map(|t| t.1)
            .fold(f64::INFINITY, f64::min);
        times
            .iter()
            .map(|t| {
                t.is_some_and(|(alone, loaded)| {
                    alone > WAIT_MARGIN * fastest && loaded > WAIT_MARGIN * soonest
                })
            })
            .collect()
    }
}

/// How many times sooner than on the backend with room a request must expect to be done on a
/// full faster one to wait for it ([`Gate::waits_for_faster`]): estimates are rough (speeds
/// move with load, prompts with what is cached), and between servers of about one speed their
/// noise alone would keep requests waiting beside idle slots.
const WAIT_MARGIN: f64 = 2.0;

/// Waiters' service times kept for [`Gate::retry_after`].
const PACE_SAMPLES: usize = 16;

/// What a pool's gate takes over from the one it replaces when a reload changes its service:
/// its counters (they never go back) and its wake-up, so the old gate's waiters also wake when a
/// request admitted by the new one ends.
pub struct Carried {
    service_wait: Histogram,
    counters: Arc<Counters>,
    released: Arc<Notify>,
}

impl Carried {
    /// For a new pool: fresh counters; its waits also go into the service's `service_wait`.
    pub fn fresh(service_wait: Histogram) -> Carried {
        Carried {
            service_wait,
            counters: Arc::default(),
            released: Arc::default(),
        }
    }

    /// For the pool `old` served, under its service's `service_wait`.
    pub fn from(old: &Gate, service_wait: Histogram) -> Carried {
        Carried {
            service_wait,
            counters: Arc::clone(&old.counters),
            released: Arc::clone(&old.released),
        }
    }
}

/// A claimed connection on a backend; dropping it gives the connection back and wakes the queue.
#[derive(Debug)]
pub struct Lease {
    gate: Arc<Gate>,
    pub id: u32,
    pub address: SocketAddrV4,
    /// How long the claim waited in the queue.
    pub waited: Duration,
}

impl Lease {
    /// Count a refusal of the request this room was claimed for.
    pub fn count(&self, refusal: Refusal) {
        self.gate.count(refusal);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.gate.counts.release(self.id);
        self.gate.released.notify_waiters();
    }
}

/// Takes the ticket out of the queue however the wait ends (served, timed out, cancelled).
struct Waiting<'a> {
    gate: &'a Gate,
    ticket: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut queue = self.gate.lock_queue();
        let was_head = queue.front() == Some(&self.ticket);
        queue.retain(|&t| t != self.ticket);
        drop(queue);
        // The next one may find the room this one was waiting for (or just took less of).
        if was_head {
            self.gate.released.notify_waiters();
        }
    }
}

impl Gate {
    /// The gate of `service`'s pool `pool` (0 without pools); `id` is the service's.
    pub fn new(
        service: &ServiceSpec,
        pool: usize,
        id: usize,
        counts: Arc<ConnCounts>,
        requests: Arc<RequestCounts>,
        routes: watch::Receiver<Routes>,
        carried: Carried,
    ) -> Arc<Self> {
        let mut config = service.proxy.clone();
        let spec = service.pools.get(pool);
        if let Some(spec) = spec {
            config.max_per_backend = spec.max_per_backend;
            config.queue_size = spec.queue_size;
            config.queue_timeout = spec.queue_timeout;
            config.upstream = spec.upstream;
        }
        let policy = spec.map_or(service.policy, |p| p.policy);
        Arc::new(Gate {
            service: service.name.clone(),
            model: spec.map(|p| p.model.clone()),
            config,
            policy,
            // Policy `cache_affinity`'s keys and bound, for a pool with that policy only.
            affinity: service
                .affinity
                .clone()
                .filter(|_| policy == Policy::CacheAffinity),
            id,
            pool,
            counts,
            requests,
            routes,
            cursor: AtomicU64::new(0),
            queue: Mutex::new(VecDeque::new()),
            next_ticket: AtomicU64::new(0),
            released: carried.released,
            counters: carried.counters,
            service_wait: carried.service_wait,
            served_from_queue: Mutex::new(VecDeque::with_capacity(PACE_SAMPLES)),
        })
    }

    /// When a client refused for a full queue should try again: the time between two waiters
    /// served at the queue's recent pace (then a place is likely free), rounded up to whole
    /// seconds; `queue_timeout` when no waiter was served within it (by then the head has
    /// left either way).
    pub fn retry_after(&self) -> Duration {
        let limit = self.config.queue_timeout.max(Duration::from_secs(1));
        let served = self
            .served_from_queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (Some(&oldest), Some(&newest)) = (served.front(), served.back()) else {
            return limit;
        };
        if served.len() < 2 || newest.elapsed() > limit {
            return limit;
        }
        let gap = (newest - oldest).as_secs_f64() / (served.len() - 1) as f64;
        Duration::from_secs(gap.ceil().max(1.0) as u64).min(limit)
    }

    fn note_served_from_queue(&self) {
        let mut served = self
            .served_from_queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if served.len() == PACE_SAMPLES {
            served.pop_front();
        }
        served.push_back(tokio::time::Instant::now());
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, VecDeque<u64>> {
        // The queue stays consistent under a panic elsewhere: every edit is one call.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn config(&self) -> &ProxySpec {
        &self.config
    }

    /// With policy `cache_affinity`: what keys a request ([`affinity::key`]).
    pub fn affinity(&self) -> Option<&AffinitySpec> {
        self.affinity.as_ref()
    }

    /// Whether its policy times requests by the tokens they ask for ([`Ask::tokens`]).
    pub fn times_requests(&self) -> bool {
        times_requests(self.policy)
    }

    /// The name of the service it admits to.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Its service's index in the routes.
    pub fn service_id(&self) -> usize {
        self.id
    }

    /// The model of its pool; `None` for the one pool of a service without pools.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// The per-backend request counters and speeds it weighs by.
    pub fn requests(&self) -> &Arc<RequestCounts> {
        &self.requests
    }

    /// Claim room on a backend for `client` now, or wait in line for it; the error says why not.
    /// `ask`: what the request brings to the choice. `avoid`: backend ids not to choose (those
    /// that failed it already).
    pub async fn admit(
        self: &Arc<Self>,
        client: Ipv4Addr,
        ask: Ask,
        avoid: &[u32],
    ) -> Result<Lease, Refusal> {
        let key = Key { client, ask };
        let started = tokio::time::Instant::now();
        let turn = |queued| Turn {
            queued,
            waited: started.elapsed(),
        };
        let admitted = |mut lease: Lease| {
            self.counters.admitted.fetch_add(1, Ordering::Relaxed);
            lease.waited = started.elapsed();
            let waited = lease.waited.as_secs_f64();
            self.counters.wait.observe(waited);
            self.service_wait.observe(waited);
            Ok(lease)
        };
        let ticket = {
            let mut queue = self.lock_queue();
            // Nobody waiting: no one to overtake.
            if queue.is_empty()
                && let Some(lease) = self.try_claim(key, turn(1), avoid)
            {
                return admitted(lease);
            }
            if queue.len() >= self.config.queue_size {
                self.tally(Refusal::QueueFull);
                return Err(Refusal::QueueFull);
            }
            let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
            queue.push_back(ticket);
            ticket
        };
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
        let waiting = Waiting { gate: self, ticket };
        let mut routes = self.routes.clone();
        // Only changes from here on should wake this waiter.
        drop(routes.borrow_and_update());
        let deadline = tokio::time::sleep(self.config.queue_timeout);
        tokio::pin!(deadline);
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before looking, so a release between the look and the wait still wakes.
            released.as_mut().enable();
            let queued = {
                let queue = self.lock_queue();
                (queue.front() == Some(&waiting.ticket)).then_some(queue.len())
            };
            if let Some(queued) = queued
                && let Some(lease) = self.try_claim(key, turn(queued), avoid)
            {
                self.note_served_from_queue();
                return admitted(lease);
            }
            tokio::select! {
                () = &mut released => {}
                changed = routes.changed() => {
                    if changed.is_err() {
                        // The table is gone: the agent is stopping.
                        self.tally(Refusal::QueueTimeout);
                        return Err(Refusal::QueueTimeout);
                    }
                }
                () = tokio::time::sleep(KERNEL_RELEASE_TICK) => {}
                () = &mut deadline => {
                    self.tally(Refusal::QueueTimeout);
                    return Err(Refusal::QueueTimeout);
                }
            }
        }
    }

    /// The kernel's choice over the current routes and live counts, then its claim; a claim lost
    /// to a concurrent claimer chooses again with the new counts.
    fn try_claim(self: &Arc<Self>, key: Key, turn: Turn, avoid: &[u32]) -> Option<Lease> {
        let routes = self.routes.borrow().clone();
        let route = routes.get(self.id)?;
        for _ in 0..route.backends.len().max(1) {
            let cursor = self.cursor.fetch_add(1, Ordering::Relaxed);
            let (id, max, address) = self.choose(route, cursor, key, turn, avoid)?;
            if self.counts.acquire(id, max) {
                return Some(Lease {
                    gate: Arc::clone(self),
                    id,
                    address,
                    waited: Duration::ZERO,
                });
            }
        }
        None
    }

    /// What [`Gate::admit`] would choose now with the round-robin cursor at `cursor`, without
    /// claiming: the packet tests hold it against the kernel's choice on the same state.
    pub fn choose_at(&self, cursor: u64, client: Ipv4Addr) -> Option<u32> {
        let routes = self.routes.borrow().clone();
        let route = routes.get(self.id)?;
        let key = Key {
            client,
            ask: Ask::default(),
        };
        let turn = Turn {
            queued: 1,
            waited: Duration::ZERO,
        };
        self.choose(route, cursor, key, turn, &[])
            .map(|(id, ..)| id)
    }

    /// The speed factor of each of `backends` (ids `ids`), relative to the fastest active one
    /// ([`speed_factors`]): what the choice weighs each by.
    pub fn speed_factors(&self, ids: &[u32], backends: &[BackendView]) -> Vec<f64> {
        let speeds: Vec<Option<f64>> = ids
            .iter()
            .zip(backends)
            .map(|(&id, b)| {
                let active = b.state == lb_common::backend_state::ACTIVE;
                active.then(|| self.requests.decode_speed(id)).flatten()
            })
            .collect();
        speed_factors(&speeds)
    }

    /// The policy's backend for `key` over `route`, the live counts and the learnt speeds: its
    /// id, cap (for `cache_affinity` the load bound too) and address; `None` when none has room
    /// or (`least_connections`, `slots`) the request at `turn` is better off waiting for a
    /// faster one.
    fn choose(
        &self,
        route: &Route,
        cursor: u64,
        key: Key,
        turn: Turn,
        avoid: &[u32],
    ) -> Option<(u32, u32, SocketAddrV4)> {
        let cap = self.config.max_per_backend;
        let pool = route.pools.get(self.pool)?;
        let ids: Vec<u32> = (0u32..)
            .take(route.backends.len())
            .map(|slot| route.id * lb_common::MAX_BACKENDS_PER_SERVICE + slot)
            .collect();
        let backends: Vec<BackendView> = ids
            .iter()
            .zip(&route.backends)
            .enumerate()
            .map(|(slot, (&id, &(view, _)))| BackendView {
                // Down for this choice: the policy skips it as the kernel would.
                state: if avoid.contains(&id) || !pool.has_member(slot) {
                    lb_common::backend_state::DOWN
                } else {
                    view.state
                },
                max_conns: match cap {
                    // Never polled, under `slots`: no room, whatever cap it or the pool has.
                    _ if pool.policy == Policy::Slots && !route.is_polled(slot) => 0,
                    0 => view.max_conns,
                    cap => cap,
                },
                conns: self.counts.get(id),
                steered: self.counts.steered(id),
                ..view
            })
            .collect();
        // Once a time-aware policy has paces to time the request by, those it passes over (see
        // `outrun`) are down for its choice.
        let timing = times_requests(pool.policy)
            .then(|| self.timing(&ids, key.ask))
            .flatten();
        let passed_over: Option<Vec<BackendView>> = timing.as_ref().map(|timing| {
            let outrun = timing.outrun(pool.policy, &backends);
            backends
                .iter()
                .zip(outrun)
                .map(|(&b, outrun)| BackendView {
                    state: if outrun {
                        lb_common::backend_state::DOWN
                    } else {
                        b.state
                    },
                    ..b
                })
                .collect()
        });
        let candidates = passed_over.as_deref().unwrap_or(&backends);
        let (slot, max) = match (&pool.affinity, &self.affinity) {
            (Some(ring), Some(spec)) => {
                let loads: Vec<Load> = candidates
                    .iter()
                    .zip(self.speed_factors(&ids, &backends))
                    .map(|(b, factor)| Load {
                        in_flight: b.conns,
                        open: b.usable(),
                        speed: (factor * 1000.0).round() as u64,
                    })
                    .collect();
                let key = key
                    .ask
                    .affinity
                    .unwrap_or_else(|| affinity::client_key(key.client));
                let (slot, bound) = affinity::choose(ring, key, spec.load_factor, &loads)?;
                let max_conns = backends.get(slot as usize)?.max_conns;
                // Claimed against the bound, so a concurrent claimer cannot take it past.
                let bound = u32::try_from(bound).unwrap_or(u32::MAX);
                let max = if max_conns == 0 {
                    bound
                } else {
                    max_conns.min(bound)
                };
                (slot as usize, max)
            }
            _ => {
                let policy = pool.policy.abi()?;
                let factors = self.speed_factors(&ids, &backends);
                let ahead = u64::from(factors.iter().any(|&f| f < 1.0));
                let ranked: Vec<BackendView> = candidates
                    .iter()
                    .zip(factors)
                    .map(|(&b, factor)| weighed(b, factor, policy, ahead))
                    .collect();
                let view = ServiceView {
                    policy,
                    id: route.id,
                    backend_count: route.backend_count,
                    ring: &pool.ring,
                    maglev: &pool.maglev,
                    backends: &ranked,
                };
                let id = choose(&view, cursor, key.client)?;
                let slot = (id % lb_common::MAX_BACKENDS_PER_SERVICE) as usize;
                (slot, backends.get(slot)?.max_conns)
            }
        };
        if timing
            .as_ref()
            .is_some_and(|timing| self.waits_for_faster(timing, &backends, slot, turn))
        {
            return None;
        }
        let (_, address) = route.backends.get(slot)?;
        let id = route.id * lb_common::MAX_BACKENDS_PER_SERVICE + slot as u32;
        Some((id, max, *address))
    }

    /// How long a request asking `ask` would take on each of `ids`, from their learnt paces;
    /// `None` while no backend has one. A backend whose prompt speed is unknown (its prompts
    /// were short or cached) is taken to evaluate as much slower than a measured one as it
    /// decodes slower: left at none, its prompts would look free and draw long ones to it.
    fn timing(&self, ids: &[u32], ask: Ask) -> Option<Timing> {
        let mut paces: Vec<Option<Pace>> = ids.iter().map(|&id| self.requests.pace(id)).collect();
        let measured: Vec<Pace> = paces.iter().flatten().copied().collect();
        if measured.is_empty() {
            return None;
        }
        let reference = measured
            .iter()
            .find_map(|p| Some(p.prompt_tokens_per_second? / p.decode_tokens_per_second));
        for pace in paces.iter_mut().flatten() {
            pace.prompt_tokens_per_second = pace
                .prompt_tokens_per_second
                .or(reference.map(|ratio| ratio * pace.decode_tokens_per_second));
        }
        let tokens = ask.tokens.map_or_else(
            || {
                let sum: f64 = measured.iter().map(|p| p.generated_tokens_per_answer).sum();
                sum / measured.len() as f64
            },
            |t| t as f64,
        );
        Some(Timing {
            paces,
            tokens,
            prompt: ask.prompt_tokens as f64,
        })
    }

    /// Whether the request `timing` times is better off waiting for a faster backend that is
    /// full than taking `room` (of `backends`) now. On `room` it is evaluated and generated
    /// beside what it holds; on a full backend it first waits for a slot to free, then beside
    /// the rest. The wait is judged for the whole queue, not its head alone: the head taking
    /// `room` moves everyone behind it up, so it waits only if even the last waiter
    /// (`turn.queued` slots to free, at the full faster backends' combined pace) would be done
    /// on one of them [`WAIT_MARGIN`] times sooner than the head would be done on `room`. It
    /// never waits where it could not: without a queue, or past `queue_timeout` (it would be
    /// refused while `room` was free). A head that has waited as long as `room` would take
    /// stops waiting: the estimate was wrong (a stalled backend, say).
    fn waits_for_faster(
        &self,
        timing: &Timing,
        backends: &[BackendView],
        room: usize,
        turn: Turn,
    ) -> bool {
        let (Some(room_view), true) = (backends.get(room), self.config.queue_size > 0) else {
            return false;
        };
        let Some(on_room) = timing.on(room, room_view.conns) else {
            return false;
        };
        // Leaves the head a look at the room before its deadline.
        let limit = self
            .config
            .queue_timeout
            .saturating_sub(2 * KERNEL_RELEASE_TICK)
            .as_secs_f64();
        let waited = turn.waited.as_secs_f64();
        if waited >= on_room.min(limit) {
            return false;
        }
        let (mut frees_per_second, mut soonest) = (0.0, f64::INFINITY);
        for (slot, b) in backends.iter().enumerate() {
            let full = b.state == lb_common::backend_state::ACTIVE
                && b.weight > 0
                && b.max_conns > 0
                && b.conns >= u64::from(b.max_conns);
            let (Some(pace), true) = (timing.pace(slot), full) else {
                continue;
            };
            let Some(on_it) = timing.on(slot, u64::from(b.max_conns) - 1) else {
                continue;
            };
            if on_it < on_room {
                frees_per_second += pace.answers_per_second();
                soonest = soonest.min(on_it);
            }
        }
        if frees_per_second == 0.0 {
            return false;
        }
        let wait = turn.queued as f64 / frees_per_second + soonest;
        let waits = wait * WAIT_MARGIN < on_room && waited + wait < limit;
        trace!(
            service = %self.service,
            room,
            on_room,
            wait,
            queued = turn.queued,
            waits,
            "a faster backend is full"
        );
        waits
    }

    pub fn stats(&self) -> PoolStats {
        let c = &self.counters;
        PoolStats {
            model: self.model.clone(),
            admitted: c.admitted.load(Ordering::Relaxed),
            queued: c.queued.load(Ordering::Relaxed),
            queue_depth: self.lock_queue().len() as u64,
            retried: Retry::ALL
                .iter()
                .zip(&c.retried)
                .map(|(r, n)| (r.name(), n.load(Ordering::Relaxed)))
                .collect(),
            refused: Refusal::ALL
                .iter()
                .zip(&c.refused)
                .map(|(r, n)| (r.name(), n.load(Ordering::Relaxed)))
                .collect(),
        }
    }

    /// Whether the pool has an active backend other than those of `ids` (one to retry on).
    pub fn has_backend_besides(&self, ids: &[u32]) -> bool {
        self.has_active_backend_but(ids)
    }

    /// Whether the pool has an active backend (its model is listed).
    pub fn has_active_backend(&self) -> bool {
        self.has_active_backend_but(&[])
    }

    fn has_active_backend_but(&self, besides: &[u32]) -> bool {
        let routes = self.routes.borrow();
        routes.get(self.id).is_some_and(|route| {
            route.pools.get(self.pool).is_some_and(|pool| {
                (0u32..).zip(&route.backends).any(|(slot, (view, _))| {
                    !besides.contains(&(route.id * lb_common::MAX_BACKENDS_PER_SERVICE + slot))
                        && pool.has_member(slot as usize)
                        && view.state == lb_common::backend_state::ACTIVE
                })
            })
        })
    }

    /// Where the service's backends are now (every pool's).
    pub fn backend_addresses(&self) -> Vec<SocketAddrV4> {
        let routes = self.routes.borrow();
        routes.get(self.id).map_or_else(Vec::new, |route| {
            route
                .backends
                .iter()
                .map(|&(_, address)| address)
                .filter(|address| !address.ip().is_unspecified())
                .collect()
        })
    }

    /// The queue wait histogram (shares its counts with the gate's).
    pub fn wait_histogram(&self) -> Histogram {
        self.counters.wait.clone()
    }

    /// Count a refusal of the caller's; the queue's own ([`Gate::admit`]'s) are counted already.
    pub fn count(&self, refusal: Refusal) {
        if !matches!(refusal, Refusal::QueueFull | Refusal::QueueTimeout) {
            self.tally(refusal);
        }
    }

    fn tally(&self, refusal: Refusal) {
        // `ALL` lists them in declaration order.
        self.counters.refused[refusal as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A request sent again to another backend.
    pub fn count_retry(&self, why: Retry) {
        // `ALL` lists them in declaration order.
        self.counters.retried[why as usize].fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::spec::ProxyMode;
    use crate::table::PoolRoute;
    use lb_common::backend_state;
    use tokio::time::Instant;

    /// Service `chat` on 127.0.0.1:80, l4, with `queue_size` places and `cap` per backend.
    pub(crate) fn config(queue_size: usize, cap: u32) -> ServiceSpec {
        let proxy = ProxySpec {
            mode: ProxyMode::L4,
            max_per_backend: cap,
            max_request_body: 1 << 20,
            queue_size,
            queue_timeout: Duration::from_secs(10),
            upstream: crate::spec::UpstreamTimeouts::default(),
            max_retries: 2,
            retry_window: Duration::from_secs(30),
            max_client_connections: 16,
            client_header_timeout: Duration::from_secs(30),
            client_idle_timeout: Duration::from_secs(60),
            client_body_timeout: Duration::from_secs(60),
        };
        ServiceSpec {
            name: "chat".to_owned(),
            address: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 80),
            policy: crate::spec::Policy::RoundRobin,
            backends: Vec::new(),
            health: None,
            slots: None,
            proxy,
            pools: Vec::new(),
            default_pool: 0,
            affinity: None,
            ejection: None,
        }
    }

    /// Round robin over `n` active backends 10.0.1.<slot+1>:80.
    fn routes(n: u32) -> Routes {
        let addresses: Vec<SocketAddrV4> = (0..n)
            .map(|slot| SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, (slot + 1) as u8), 80))
            .collect();
        routes_to(&addresses)
    }

    /// Round robin over active backends at `addresses`.
    pub(crate) fn routes_to(addresses: &[SocketAddrV4]) -> Routes {
        let backends: Vec<_> = addresses
            .iter()
            .map(|&address| {
                let view = BackendView {
                    state: backend_state::ACTIVE,
                    weight: 1,
                    ..BackendView::default()
                };
                (view, address)
            })
            .collect();
        let n = backends.len() as u32;
        Arc::new(vec![Route {
            id: 0,
            backend_count: n,
            backends,
            // As if polled: tests under `slots` set the slots they poll.
            polled: u64::MAX,
            pools: vec![PoolRoute {
                policy: crate::spec::Policy::RoundRobin,
                ring: (0..n).collect(),
                maglev: Vec::new(),
                affinity: None,
                members: u64::MAX,
            }],
        }])
    }

    fn gate(
        queue_size: usize,
        cap: u32,
        n: u32,
    ) -> (Arc<Gate>, Arc<ConnCounts>, watch::Sender<Routes>) {
        gate_for(&config(queue_size, cap), n)
    }

    /// A gate of `service` over `n` active backends.
    fn gate_for(
        service: &ServiceSpec,
        n: u32,
    ) -> (Arc<Gate>, Arc<ConnCounts>, watch::Sender<Routes>) {
        let counts = Arc::new(ConnCounts::anonymous(64).expect("anonymous counters"));
        let (tx, rx) = watch::channel(routes(n));
        let wait = Histogram::new(WAIT_BUCKETS);
        let requests = Arc::new(RequestCounts::new(64));
        let gate = Gate::new(
            service,
            0,
            0,
            Arc::clone(&counts),
            requests,
            rx,
            Carried::fresh(wait),
        );
        (gate, counts, tx)
    }

    fn client() -> Ipv4Addr {
        Ipv4Addr::new(10, 9, 9, 9)
    }

    /// A request from [`client`] that brings nothing else to the choice.
    async fn admit(gate: &Arc<Gate>) -> Result<Lease, Refusal> {
        gate.admit(client(), Ask::default(), &[]).await
    }

    #[tokio::test(start_paused = true)]
    async fn claims_by_policy_up_to_the_cap_and_counts_in_the_shared_array() {
        let (gate, counts, _routes) = gate(0, 1, 2);
        let a = admit(&gate).await.expect("room on backend 0");
        let b = admit(&gate).await.expect("room on backend 1");
        assert_eq!((a.id, b.id), (0, 1));
        assert_eq!(b.address, "10.0.1.2:80".parse().expect("address"));
        assert_eq!((counts.get(0), counts.get(1)), (1, 1));
        assert_eq!(admit(&gate).await.err(), Some(Refusal::QueueFull));
        drop(a);
        assert_eq!(counts.get(0), 0, "released on drop");
        assert_eq!(gate.stats().refused["queue_full"], 1);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_in_order_as_soon_as_a_lease_is_dropped() {
        let (gate, _counts, _routes) = gate(8, 1, 1);
        let first = admit(&gate).await.expect("room");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for n in 0..3 {
            let (gate, tx) = (Arc::clone(&gate), tx.clone());
            tokio::spawn(async move {
                let lease = admit(&gate).await;
                let _ = tx.send((n, Instant::now(), lease));
            });
            // Queue them in a known order.
            tokio::task::yield_now().await;
        }
        assert_eq!(gate.stats().queue_depth, 3);
        let mut held = first;
        for expected in 0..3 {
            let released = Instant::now();
            drop(held);
            let (n, at, lease) = rx.recv().await.expect("a waiter got through");
            assert_eq!(n, expected, "FIFO");
            assert_eq!(at, released, "woken by the release, not a tick");
            held = lease.expect("served");
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(gate.stats().queued, 3);
        assert_eq!(gate.stats().queue_depth, 0);
        // Waits of 0 (the first), 0, 1 and 2 s (each release a second after the one before).
        let wait = wait_buckets(&gate);
        for (le, count) in [("0.001", 2), ("0.5", 2), ("1", 3), ("2.5", 4)] {
            assert_eq!(wait.get(le), Some(&count), "le {le}: {wait:?}");
        }
        assert_eq!(gate.stats().admitted, 4);
    }

    /// Cumulative counts of the wait histogram by upper bound, as `/metrics` shows them.
    fn wait_buckets(gate: &Gate) -> std::collections::HashMap<String, u64> {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("wait", "", gate.wait_histogram());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        text.lines()
            .filter_map(|line| {
                let rest = line.strip_prefix("wait_bucket{le=\"")?;
                let (le, count) = rest.split_once("\"} ")?;
                Some((le.trim_end_matches(".0").to_owned(), count.parse().ok()?))
            })
            .collect()
    }

    /// A gate under `cache_affinity` over `n` backends of weight 1, without caps.
    fn affinity_gate(n: u32) -> (Arc<Gate>, Arc<ConnCounts>) {
        let mut service = config(0, 0);
        service.policy = crate::spec::Policy::CacheAffinity;
        service.proxy.mode = ProxyMode::Http;
        service.affinity = Some(AffinitySpec::default());
        let mut routes = routes(n);
        let route = &mut Arc::make_mut(&mut routes)[0];
        let members: Vec<affinity::Member> = (0u32..)
            .zip(&route.backends)
            .map(|(slot, &(_, address))| affinity::Member {
                slot,
                address,
                weight: 1,
            })
            .collect();
        route.pools[0].policy = crate::spec::Policy::CacheAffinity;
        route.pools[0].affinity = Some(Arc::new(affinity::Ring::new(&members)));
        let counts = Arc::new(ConnCounts::anonymous(64).expect("anonymous counters"));
        // The routes never change: the sender may go.
        let (_, rx) = watch::channel(routes);
        let requests = Arc::new(RequestCounts::new(64));
        let wait = Histogram::new(WAIT_BUCKETS);
        let gate = Gate::new(
            &service,
            0,
            0,
            Arc::clone(&counts),
            requests,
            rx,
            Carried::fresh(wait),
        );
        (gate, counts)
    }

    #[tokio::test(start_paused = true)]
    async fn cache_affinity_leaves_a_home_over_twice_as_slow_as_another_backend_with_room() {
        let (gate, counts) = affinity_gate(2);
        let ask = |key, prompt_tokens, tokens| Ask {
            affinity: Some(key),
            tokens: Some(tokens),
            prompt_tokens,
        };
        // A key homed on backend 1 (nothing measured: the ring alone decides).
        let mut key = 0;
        while gate
            .admit(client(), ask(key, 0, 1), &[])
            .await
            .map(|l| l.id)
            != Ok(1)
        {
            key += 1;
            assert!(key < 64, "no key of 64 is homed on backend 1");
        }
        // Backend 1 turns out ten times slower at both decoding and prompts.
        for (id, speed) in [(0, 100.0), (1, 10.0)] {
            let timings = crate::requests::Timings {
                prompt_n: 100,
                prompt_per_second: speed * 10.0,
                predicted_per_second: speed,
                predicted_n: 20,
                ..Default::default()
            };
            gate.requests().begin(id).measured(None, &timings);
        }
        // A turn of 1000 prompt tokens and 20 to generate: 12 s at home, 1.2 s on backend 0.
        let turn = gate.admit(client(), ask(key, 1000, 20), &[]).await;
        assert_eq!(turn.map(|l| l.id), Ok(0));
        // Backend 0 holding nine others (a tenth of its speed each): 12 s there too, home it is.
        for _ in 0..9 {
            assert!(counts.acquire(0, u32::MAX));
        }
        let turn = gate.admit(client(), ask(key, 1000, 20), &[]).await;
        assert_eq!(turn.map(|l| l.id), Ok(1));
    }

    #[tokio::test(start_paused = true)]
    async fn cache_affinity_keeps_a_key_on_its_backend_up_to_the_load_bound() {
        let (gate, counts) = affinity_gate(3);
        let admit = |key| {
            let gate = Arc::clone(&gate);
            async move {
                let ask = Ask {
                    affinity: key,
                    ..Ask::default()
                };
                gate.admit(client(), ask, &[]).await.expect("room")
            }
        };
        let home = admit(Some(42)).await.id;
        for _ in 0..5 {
            assert_eq!(admit(Some(42)).await.id, home, "one at a time: home");
        }
        // Held: the bound is ceil(1.25 * 2 / 3) = 1 for the second, ceil(1.25 * 3 / 3) = 2
        // for the third.
        let first = admit(Some(42)).await;
        let second = admit(Some(42)).await;
        let third = admit(Some(42)).await;
        assert_eq!((first.id, third.id), (home, home));
        assert_ne!(second.id, home, "over the bound: the next on the ring");
        assert_eq!(counts.get(home), 2);
        drop((first, second, third));
        // No key: the client's address keys it.
        let by_client = admit(None).await.id;
        assert_eq!(admit(None).await.id, by_client);
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_to_avoid_is_not_chosen_even_when_the_policy_would() {
        let (gate, _counts, _routes) = gate(0, 1, 2);
        // Round robin's next pick is backend 0.
        let lease = gate
            .admit(client(), Ask::default(), &[0])
            .await
            .expect("room on 1");
        assert_eq!(lease.id, 1);
        assert_eq!(
            gate.admit(client(), Ask::default(), &[0]).await.err(),
            Some(Refusal::QueueFull),
            "1 is full and 0 avoided"
        );
        assert_eq!(admit(&gate).await.map(|l| l.id).ok(), Some(0));
        assert!(gate.has_backend_besides(&[0]) && gate.has_backend_besides(&[1]));
        assert!(!gate.has_backend_besides(&[0, 1]));
        let (alone, _counts, _routes) = self::gate(0, 1, 1);
        assert!(
            !alone.has_backend_besides(&[0]),
            "no other backend to retry on"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_says_when_to_come_back_from_its_recent_pace() {
        let (gate, _counts, _routes) = gate(1, 1, 1);
        let timeout = gate.config().queue_timeout;
        assert_eq!(gate.retry_after(), timeout, "no pace yet: queue_timeout");
        let mut held = admit(&gate).await.expect("room");
        // A waiter served every 2.5 s.
        for _ in 0..4 {
            let waiter = {
                let gate = Arc::clone(&gate);
                tokio::spawn(async move { admit(&gate).await })
            };
            tokio::task::yield_now().await;
            assert_eq!(gate.stats().queue_depth, 1);
            tokio::time::advance(Duration::from_millis(2500)).await;
            drop(held);
            held = waiter.await.expect("the waiter").expect("served");
        }
        assert_eq!(
            gate.retry_after(),
            Duration::from_secs(3),
            "2.5 s, rounded up"
        );
        tokio::time::advance(timeout + Duration::from_secs(1)).await;
        assert_eq!(gate.retry_after(), timeout, "nobody served lately");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_times_out_and_leaves_the_queue() {
        let (gate, _counts, _routes) = gate(1, 1, 1);
        let _held = admit(&gate).await.expect("room");
        let started = Instant::now();
        let waiter = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move { admit(&gate).await.map(|lease| lease.id) }
        });
        tokio::task::yield_now().await;
        assert_eq!(
            admit(&gate).await.err(),
            Some(Refusal::QueueFull),
            "queue_size 1 is taken"
        );
        assert_eq!(
            waiter.await.expect("waiter task"),
            Err(Refusal::QueueTimeout)
        );
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        let stats = gate.stats();
        assert_eq!((stats.refused["queue_timeout"], stats.queue_depth), (1, 0));
    }

    /// A gate over two active backends under `policy`, each with `idle` idle slots polled, the
    /// second measured three times slower than the first.
    fn slow_second(policy: crate::spec::Policy, idle: u32) -> (Arc<Gate>, watch::Sender<Routes>) {
        let (gate, _counts, routes_tx) = gate(0, 0, 2);
        routes_tx.send_modify(|routes| {
            let route = &mut Arc::make_mut(routes)[0];
            route.pools[0].policy = policy;
            for (view, _) in &mut route.backends {
                // Polled: the slot count is the cap.
                (view.idle_slots, view.max_conns) = (idle, idle);
            }
        });
        answered(&gate, [(0, 90.0), (1, 30.0)], 0);
        (gate, routes_tx)
    }

    #[tokio::test(start_paused = true)]
    async fn least_connections_gives_a_three_times_slower_backend_a_third_of_the_in_flight() {
        let (gate, _routes) = slow_second(crate::spec::Policy::LeastConnections, 0);
        assert_eq!(
            gate.speed_factors(&[0, 1], &[view(), view()]),
            [1.0, 1.0 / 3.0]
        );
        let mut held = Vec::new();
        for _ in 0..8 {
            held.push(admit(&gate).await.expect("no cap"));
        }
        let on_slow = held.iter().filter(|lease| lease.id == 1).count();
        assert_eq!((held.len() - on_slow, on_slow), (6, 2));
    }

    /// A pool under `slots` gives a backend never polled no room, whatever its own cap (the
    /// route carries caps whatever the policy); under another policy that cap holds.
    #[tokio::test(start_paused = true)]
    async fn under_slots_a_backend_never_polled_has_no_room_whatever_its_cap() {
        let (gate, _counts, routes_tx) = gate(1, 0, 2);
        let set = |policy| {
            routes_tx.send_modify(|routes| {
                let route = &mut Arc::make_mut(routes)[0];
                route.pools[0].policy = policy;
                route.polled = 0b10;
                route
                    .backends
                    .iter_mut()
                    .for_each(|(view, _)| (view.idle_slots, view.max_conns) = (2, 2));
            });
        };
        set(crate::spec::Policy::Slots);
        let held = [
            admit(&gate).await.expect("room"),
            admit(&gate).await.expect("room"),
        ];
        assert_eq!(
            held.each_ref().map(|lease| lease.id),
            [1, 1],
            "the polled one only"
        );
        assert_eq!(
            admit(&gate).await.map(|lease| lease.id),
            Err(Refusal::QueueTimeout),
            "the unpolled one has no room"
        );
        set(crate::spec::Policy::RoundRobin);
        let lease = admit(&gate).await.expect("its own cap");
        assert_eq!(lease.id, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn slots_fill_the_fast_backend_first() {
        let (gate, _routes) = slow_second(crate::spec::Policy::Slots, 2);
        let first = admit(&gate).await.expect("room");
        let second = admit(&gate).await.expect("room");
        let third = admit(&gate).await.expect("room");
        assert_eq!((first.id, second.id, third.id), (0, 0, 1));
        // Unmeasured, the second goes to the backend with more free slots, as in the kernel.
        let (even, _counts, routes_tx) = self::gate(0, 0, 2);
        routes_tx.send_modify(|routes| {
            let route = &mut Arc::make_mut(routes)[0];
            route.pools[0].policy = crate::spec::Policy::Slots;
            route
                .backends
                .iter_mut()
                .for_each(|(view, _)| (view.idle_slots, view.max_conns) = (2, 2));
        });
        let first = admit(&even).await.expect("room");
        let second = admit(&even).await.expect("room");
        assert_eq!((first.id, second.id), (0, 1));
    }

    /// One answer from each `(id, decode tokens/s)` of `gate`'s backends, of `tokens` tokens (0:
    /// the tokens per answer stay unknown).
    fn answered<const N: usize>(gate: &Gate, speeds: [(u32, f64); N], tokens: u64) {
        for (id, decode) in speeds {
            let timings = crate::requests::Timings {
                predicted_per_second: decode,
                predicted_n: tokens,
                ..Default::default()
            };
            gate.requests().begin(id).measured(None, &timings);
        }
    }

    /// A gate under `least_connections` over a fast backend (100 tokens/s) and one ten times
    /// slower, one slot each, every answer 20 tokens, with the fast one held.
    async fn fast_one_held() -> (Arc<Gate>, Lease, watch::Sender<Routes>) {
        fast_one_held_in(&config(16, 1)).await
    }

    /// [`fast_one_held`] with `service`'s queue (its cap is 1).
    async fn fast_one_held_in(service: &ServiceSpec) -> (Arc<Gate>, Lease, watch::Sender<Routes>) {
        let (gate, _counts, routes_tx) = gate_for(service, 2);
        routes_tx.send_modify(|routes| {
            Arc::make_mut(routes)[0].pools[0].policy = crate::spec::Policy::LeastConnections;
        });
        answered(&gate, [(0, 100.0), (1, 10.0)], 20);
        let held = admit(&gate).await;
        let held = held.expect("room");
        assert_eq!(held.id, 0, "the fast one first");
        (gate, held, routes_tx)
    }

    fn asking(tokens: u64) -> Ask {
        Ask {
            tokens: Some(tokens),
            ..Ask::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_for_a_full_fast_backend_while_that_beats_an_idle_slow_one() {
        let (gate, held, _routes) = fast_one_held().await;
        // 20 tokens: 2 s on the slow one, 0.2 s on the fast one after a 0.2 s wait for its slot
        // (over twice as soon).
        let waiter = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move { gate.admit(client(), asking(20), &[]).await.map(|l| l.id) }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(gate.stats().queue_depth, 1, "waiting, the slow one idle");
        drop(held);
        assert_eq!(waiter.await.expect("waiter"), Ok(0), "the fast one, freed");
        // 2 tokens: 0.2 s on the slow one now, 0.22 s behind the fast one's slot.
        let (gate, _held, _routes) = fast_one_held().await;
        let short = gate.admit(client(), asking(2), &[]).await.map(|l| l.id);
        assert_eq!(short, Ok(1));
    }

    #[tokio::test(start_paused = true)]
    async fn under_slots_a_server_ten_times_slower_is_passed_over_while_a_fast_one_has_room() {
        let (gate, _counts, routes) = gate(0, 0, 2);
        routes.send_modify(|routes| {
            let route = &mut Arc::make_mut(routes)[0];
            route.pools[0].policy = crate::spec::Policy::Slots;
            for (view, _) in &mut route.backends {
                (view.idle_slots, view.max_conns) = (2, 2);
            }
            // The fast one's last poll saw its slots busy: answers that ended since.
            route.backends[0].0.idle_slots = 0;
        });
        answered(&gate, [(0, 100.0), (1, 10.0)], 20);
        // 20 tokens: 0.2 s there, 2 s on the slow one.
        let first = admit(&gate).await;
        assert_eq!(first.map(|l| l.id), Ok(0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_prompt_waits_for_the_fast_backend_whose_prompt_speed_alone_is_known() {
        let (gate, held, _routes) = fast_one_held().await;
        // The fast one evaluated a prompt at 1000 tokens/s; the slow one only short ones, so
        // its prompt speed is taken as its decode speed's share of that: 100 tokens/s.
        let prompt = crate::requests::Timings {
            prompt_n: 100,
            prompt_per_second: 1000.0,
            predicted_per_second: 100.0,
            predicted_n: 20,
            ..Default::default()
        };
        gate.requests().begin(0).measured(None, &prompt);
        let long_prompt = Ask {
            tokens: Some(2),
            prompt_tokens: 1000,
            ..Ask::default()
        };
        // 10.2 s on the slow one; 0.2 s for the fast one's slot, then 1.02 s there.
        let waiter = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move { gate.admit(client(), long_prompt, &[]).await.map(|l| l.id) }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(held);
        assert_eq!(waiter.await.expect("waiter"), Ok(0));
    }

    #[tokio::test(start_paused = true)]
    async fn no_request_waits_for_a_faster_backend_past_its_queue_timeout_or_without_a_queue() {
        // The wait for the fast one (0.4 s) would end past a queue_timeout of 300 ms: a 504
        // while the slow one was idle. So the slow one, at once.
        let mut service = config(16, 1);
        service.proxy.queue_timeout = Duration::from_millis(300);
        let (gate, _held, _routes) = fast_one_held_in(&service).await;
        let started = Instant::now();
        let id = gate.admit(client(), asking(20), &[]).await.map(|l| l.id);
        assert_eq!((id, started.elapsed()), (Ok(1), Duration::ZERO));
        // No queue: waiting would be a refusal.
        let (gate, _held, _routes) = fast_one_held_in(&config(0, 1)).await;
        let id = gate.admit(client(), asking(20), &[]).await.map(|l| l.id);
        assert_eq!(id, Ok(1));
    }

    #[tokio::test(start_paused = true)]
    async fn cache_affinity_passes_over_no_backend_as_fast_as_the_others_whatever_its_load() {
        let (gate, counts) = affinity_gate(3);
        // Spread over the ring: small numbers all fall before its first point.
        let keyed = |n| Ask {
            affinity: Some(crate::policy::splitmix64(n)),
            tokens: Some(20),
            ..Ask::default()
        };
        let mut key = 0;
        while gate.admit(client(), keyed(key), &[]).await.map(|l| l.id) != Ok(0) {
            key += 1;
            assert!(key < 64, "no key of 64 is homed on backend 0");
        }
        answered(&gate, [(0, 100.0), (1, 100.0), (2, 100.0)], 20);
        // Loads 2, 0, 2: three times the idle one's time at home, but below the bound
        // (ceil(1.25 * 5 / 3) = 3), which alone decides between servers of one speed.
        for id in [0, 0, 2, 2] {
            assert!(counts.acquire(id, u32::MAX));
        }
        let id = gate.admit(client(), keyed(key), &[]).await.map(|l| l.id);
        assert_eq!(id, Ok(0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_queue_sends_its_head_to_the_slow_backend_and_a_stalled_wait_gives_up() {
        let (gate, _held, _routes) = fast_one_held().await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for n in 0..10 {
            let (gate, tx) = (Arc::clone(&gate), tx.clone());
            tokio::spawn(async move {
                let lease = gate.admit(client(), asking(20), &[]).await;
                let _ = tx.send((n, lease.map(|l| (l.id, l))));
            });
            tokio::task::yield_now().await;
        }
        assert_eq!(gate.stats().queue_depth, 10);
        // The tenth waiter would get the fast slot after 10 x 0.2 s, done at 2.2 s: not twice as
        // soon as the head would be on the slow one (2 s), so the head takes it at its next
        // look (from four waiters on it would).
        tokio::time::advance(KERNEL_RELEASE_TICK).await;
        let (n, got) = rx.recv().await.expect("one admitted");
        let (id, _slow) = got.expect("admitted");
        assert_eq!((n, id), (0, 1));
        assert_eq!(
            gate.stats().queue_depth,
            9,
            "the rest wait for the fast one"
        );

        // Alone in the queue, a wait that outlasts the 2 s the slow one would take gives up.
        let (gate, _held, _routes) = fast_one_held().await;
        let started = Instant::now();
        let id = gate.admit(client(), asking(20), &[]).await.map(|l| l.id);
        assert_eq!(id, Ok(1));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(2)
                && waited <= Duration::from_secs(2) + KERNEL_RELEASE_TICK,
            "{waited:?}"
        );
    }

    fn view() -> BackendView {
        BackendView {
            state: backend_state::ACTIVE,
            weight: 1,
            ..BackendView::default()
        }
    }

    proptest::proptest! {
        /// With nothing measured (every factor 1) the weighed views choose as the kernel's model
        /// does on the real ones.
        #[test]
        fn unmeasured_the_weighed_choice_is_the_kernels(
            policy in 0u32..4,
            raw in proptest::collection::vec((0u32..4, 0u32..4, 0u32..4, 0u64..6, 0u32..5, 0u64..6), 1..8),
            cursor in 0u64..16,
        ) {
            let backends: Vec<BackendView> = raw
                .iter()
                .map(|&(state, weight, max_conns, conns, idle_slots, steered)| BackendView {
                    state: [backend_state::ACTIVE, backend_state::ACTIVE, backend_state::DRAINING, backend_state::DOWN][state as usize],
                    weight,
                    max_conns,
                    conns,
                    idle_slots,
                    steered,
                })
                .collect();
            let weighed_views: Vec<BackendView> = backends.iter().map(|&b| weighed(b, 1.0, policy, 0)).collect();
            let n = backends.len() as u32;
            let ring: Vec<u32> = (0..n).collect();
            let maglev: Vec<u32> = (0..lb_common::MAGLEV_SIZE).map(|i| i % n).collect();
            let service = |backends| ServiceView {
                policy,
                id: 0,
                backend_count: n,
                ring: &ring,
                maglev: &maglev,
                backends,
            };
            let client = Ipv4Addr::new(10, 1, 2, 3);
            proptest::prop_assert_eq!(
                choose(&service(&weighed_views), cursor, client),
                choose(&service(&backends), cursor, client)
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn room_freed_outside_the_proxy_is_found_by_the_tick_and_new_backends_at_once() {
        let (gate, counts, routes_tx) = gate(4, 1, 1);
        // A kernel flow holds backend 0.
        assert!(counts.acquire(0, 1));
        let started = Instant::now();
        let waiter = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move { admit(&gate).await.map(|lease| lease.id) }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(counts.release(0), "the kernel's flow ends");
        assert_eq!(waiter.await.expect("waiter"), Ok(0));
        assert!(started.elapsed() <= Duration::from_secs(1) + KERNEL_RELEASE_TICK);

        assert!(counts.acquire(0, 1));
        let waiter = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move { admit(&gate).await.map(|lease| lease.id) }
        });
        tokio::task::yield_now().await;
        let added = Instant::now();
        routes_tx.send_replace(routes(2));
        assert_eq!(waiter.await.expect("waiter"), Ok(1));
        assert_eq!(
            added.elapsed(),
            Duration::ZERO,
            "a table change wakes at once"
        );
    }
}
