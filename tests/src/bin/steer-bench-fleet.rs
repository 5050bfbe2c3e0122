//! `cargo xtask bench`: the balancing policies at fleet scale, in a discrete-event simulation
//! that drives the project's own policy code ([`lb_userspace::policy::choose`], the exact model of
//! the kernel's choice) over 100 and 1,000 simulated llama.cpp backends in virtual time.
//!
//! The kernel holds at most `MAX_BACKENDS_PER_SERVICE` (64) backends per service and `choose`
//! reads no more, so a fleet is split into services of at most 64 (100 = 2 x 50, 1,000 = 16 x 62
//! or 63: one VIP per shard) and each request goes to a service drawn uniformly, as DNS or ECMP in
//! front of the VIPs would spread it.
//!
//! Model (seeded, so every run replays exactly): each backend has 1, 2 or 4 slots and a speed of
//! 0.5, 1 or 2 (drawn per backend); a slot serves one request at a time for `work / speed`
//! seconds and a backend queues what finds every slot busy (as llama-server defers). Requests
//! arrive as a Poisson stream at 80% of the fleet's capacity from 10,000 client addresses; 80%
//! are short (exponential work, mean 0.3 s) and 20% long (mean 3 s). The agent's view follows
//! the real one: connection counts change at once, idle slots are polled every 500 ms, and
//! `steered` counts choices since the last poll. Weights are all 1 (Steer does not learn them).
//!
//! Reported per fleet and policy: latency (arrival to completion) and queueing p50/p99 in virtual
//! seconds, and the load spread (max/mean in-flight across backends and their coefficient of
//! variation, averaged over the polls). Separately, the real cost of one `choose` call in ns at 2,
//! 16 and 64 backends beside a trivial choice (`cursor % backends`) timed in the same loop.

#![expect(
    clippy::print_stdout,
    reason = "the benchmark's table is for a person to read"
)]

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, VecDeque},
    fmt::Write as _,
    hint::black_box,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::ExitCode,
    time::Instant,
};

use clap::Parser;
use lb_common::{MAX_BACKENDS_PER_SERVICE, backend_state};
use lb_userspace::policy::{BackendView, ServiceView, choose, maglev_table, rr_ring};
use lb_userspace::spec::Policy;
use serde_json::json;
use tests::bench::{Rng, RunArgs, Scale, Series, bar_chart, p50_p99, ratio, save_results};

#[derive(Parser)]
#[command(about = "Steer's policies over 100 and 1,000 simulated backends, and their cost")]
struct Args {
    #[command(flatten)]
    run: RunArgs,
    /// Where to draw the PNG plots.
    #[arg(long, value_name = "DIR")]
    plots: Option<PathBuf>,
}

const FLEETS: [usize; 2] = [100, 1000];
const SEED: u64 = 0x5745_4552;
/// Offered load as a share of the fleet's capacity.
const LOAD: f64 = 0.8;
const SHORT_SHARE: f64 = 0.8;
const SHORT_WORK_S: f64 = 0.3;
const LONG_WORK_S: f64 = 3.0;
const CLIENTS: u64 = 10_000;
/// The agent's default slot poll interval.
const POLL_S: f64 = 0.5;
/// A polled backend's cap that no load reaches: the policies choose, no cap holds a request
/// (under `slots` a cap of 0 would be a backend never polled, with no room).
const UNCAPPED: u32 = u32::MAX;
/// Requests before this share of the run are a warm-up, left out of every figure.
const WARMUP: f64 = 0.1;

/// One simulated llama-server.
#[derive(Debug)]
struct Backend {
    slots: u32,
    speed: f64,
    busy: u32,
    /// Arrival times and work of requests waiting for a slot.
    queue: VecDeque<(f64, f64)>,
}

/// One service (VIP) of the fleet: its backends and the kernel's view of them.
struct Service {
    id: u32,
    backends: Vec<Backend>,
    views: Vec<BackendView>,
    ring: Vec<u32>,
    maglev: Vec<u32>,
    cursor: u64,
}

impl Service {
    fn view(&self, policy: Policy) -> ServiceView<'_> {
        ServiceView {
            policy: kernel_abi(policy),
            id: self.id,
            backend_count: self.views.len() as u32,
            ring: &self.ring,
            maglev: if policy == Policy::Maglev {
                &self.maglev
            } else {
                &[]
            },
            backends: &self.views,
        }
    }
}

fn backend_addr(service: u32, slot: u32) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 100 + service as u8, 0, slot as u8), 8080)
}

/// `n` backends split into services of at most 64, slot counts and speeds drawn from `rng`.
fn fleet(n: usize, rng: &mut Rng) -> Vec<Service> {
    let per = MAX_BACKENDS_PER_SERVICE as usize;
    let services = n.div_ceil(per);
    (0..services)
        .map(|s| {
            let id = s as u32;
            let count = n / services + usize::from(s < n % services);
            let backends: Vec<Backend> = (0..count)
                .map(|_| Backend {
                    slots: [1, 2, 4][rng.below(3) as usize],
                    speed: [0.5, 1.0, 2.0][rng.below(3) as usize],
                    busy: 0,
                    queue: VecDeque::new(),
                })
                .collect();
            let slots: Vec<u32> = (0..count as u32).collect();
            let views = backends
                .iter()
                .map(|b| BackendView {
                    state: backend_state::ACTIVE,
                    weight: 1,
                    max_conns: UNCAPPED,
                    idle_slots: b.slots,
                    ..BackendView::default()
                })
                .collect();
            Service {
                id,
                ring: rr_ring(&slots.iter().map(|&s| (s, 1)).collect::<Vec<_>>()),
                maglev: maglev_table(
                    &slots
                        .iter()
                        .map(|&s| (s, 1, backend_addr(id, s)))
                        .collect::<Vec<_>>(),
                ),
                backends,
                views,
                cursor: 0,
            }
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Arrival,
    Poll,
    /// A slot of (service, backend) finished; the request arrived at the given virtual ns.
    Done(u32, u32, u64),
}

/// What one simulation measured (virtual seconds).
#[derive(Debug, Clone)]
struct SimResult {
    fleet: usize,
    services: usize,
    policy: Policy,
    requests: usize,
    latency: (f64, f64),
    wait: (f64, f64),
    max_over_mean: f64,
    cv: f64,
    virtual_s: f64,
}

fn ns(t: f64) -> u64 {
    (t * 1e9) as u64
}

fn simulate(n: usize, policy: Policy, requests: usize) -> SimResult {
    let mut rng = Rng::new(SEED ^ n as u64);
    let mut services = fleet(n, &mut rng);
    let capacity: f64 = services
        .iter()
        .flat_map(|s| &s.backends)
        .map(|b| f64::from(b.slots) * b.speed)
        .sum();
    let mean_work = SHORT_SHARE * SHORT_WORK_S + (1.0 - SHORT_SHARE) * LONG_WORK_S;
    let rate = LOAD * capacity / mean_work;
    // The workload draws come from their own stream, so every policy sees the same requests.
    let mut load = Rng::new(SEED.rotate_left(17) ^ n as u64);

    let mut events: BinaryHeap<Reverse<(u64, Event)>> = BinaryHeap::new();
    events.push(Reverse((0, Event::Arrival)));
    events.push(Reverse((ns(POLL_S), Event::Poll)));
    let warmup_until = (requests as f64 * WARMUP) as usize;
    let (mut arrived, mut done) = (0usize, 0usize);
    let (mut latencies, mut waits) = (Vec::new(), Vec::new());
    let (mut spread_sum, mut cv_sum, mut samples) = (0.0, 0.0, 0u32);
    let mut now = 0.0;
    let start = |now: f64, arrival: f64, work: f64, s: usize, slot: usize, b: &mut Backend| {
        b.busy += 1;
        (
            ns(now + work / b.speed),
            Event::Done(s as u32, slot as u32, ns(arrival)),
            now - arrival,
        )
    };
    // Each request is one arrival and one completion; the polls in between are bounded by time.
    while let Some(Reverse((t, event))) = events.pop() {
        now = t as f64 / 1e9;
        match event {
            Event::Arrival => {
                arrived += 1;
                if arrived < requests {
                    events.push(Reverse((ns(now + load.exp(1.0 / rate)), Event::Arrival)));
                }
                let work = if load.unit() < SHORT_SHARE {
                    load.exp(SHORT_WORK_S)
                } else {
                    load.exp(LONG_WORK_S)
                };
                let s = load.below(services.len() as u64) as usize;
                let client = Ipv4Addr::from(0x0b00_0000 + load.below(CLIENTS) as u32);
                let svc = &mut services[s];
                let id = choose(&svc.view(policy), svc.cursor, client)
                    .expect("every backend is active and uncapped");
                svc.cursor += 1;
                let slot = (id % MAX_BACKENDS_PER_SERVICE) as usize;
                svc.views[slot].conns += 1;
                svc.views[slot].steered += 1;
                let b = &mut svc.backends[slot];
                if b.busy < b.slots {
                    let (at, ev, wait) = start(now, now, work, s, slot, b);
                    events.push(Reverse((at, ev)));
                    if arrived > warmup_until {
                        waits.push(wait);
                    }
                } else {
                    b.queue.push_back((now, work));
                }
            }
            Event::Done(s, slot, arrival_ns) => {
                let (s, slot) = (s as usize, slot as usize);
                done += 1;
                let svc = &mut services[s];
                svc.views[slot].conns -= 1;
                let b = &mut svc.backends[slot];
                b.busy -= 1;
                if done > warmup_until {
                    latencies.push(now - arrival_ns as f64 / 1e9);
                }
                if let Some((arrival, work)) = b.queue.pop_front() {
                    let (at, ev, wait) = start(now, arrival, work, s, slot, b);
                    events.push(Reverse((at, ev)));
                    if done > warmup_until {
                        waits.push(wait);
                    }
                }
            }
            Event::Poll => {
                for svc in &mut services {
                    for (v, b) in svc.views.iter_mut().zip(&svc.backends) {
                        v.idle_slots = b.slots - b.busy;
                        v.steered = 0;
                    }
                }
                if arrived > warmup_until {
                    let inflight: Vec<f64> = services
                        .iter()
                        .flat_map(|s| s.views.iter().map(|v| v.conns as f64))
                        .collect();
                    let mean = inflight.iter().sum::<f64>() / inflight.len() as f64;
                    if mean > 0.0 {
                        let max = inflight.iter().copied().fold(0.0, f64::max);
                        let var = inflight.iter().map(|x| (x - mean).powi(2)).sum::<f64>()
                            / inflight.len() as f64;
                        spread_sum += max / mean;
                        cv_sum += var.sqrt() / mean;
                        samples += 1;
                    }
                }
                if arrived < requests {
                    events.push(Reverse((ns(now + POLL_S), Event::Poll)));
                }
            }
        }
    }
    SimResult {
        fleet: n,
        services: services.len(),
        policy,
        requests: latencies.len(),
        latency: p50_p99(&mut latencies),
        wait: p50_p99(&mut waits),
        max_over_mean: spread_sum / f64::from(samples.max(1)),
        cv: cv_sum / f64::from(samples.max(1)),
        virtual_s: now,
    }
}

/// ns per call of `choose` for `policy` over `backends` backends, and of the trivial choice in
/// the same loop shape, over `calls` calls each (client address and cursor change every call).
fn choice_cost(policy: Policy, backends: u32, calls: u64) -> (f64, f64) {
    let mut rng = Rng::new(SEED ^ u64::from(backends));
    let views: Vec<BackendView> = (0..backends)
        .map(|_| BackendView {
            state: backend_state::ACTIVE,
            weight: 1,
            max_conns: UNCAPPED,
            conns: rng.below(8),
            idle_slots: rng.below(4) as u32,
            steered: rng.below(2),
        })
        .collect();
    let slots: Vec<(u32, u32)> = (0..backends).map(|s| (s, 1)).collect();
    let ring = rr_ring(&slots);
    let maglev = maglev_table(
        &slots
            .iter()
            .map(|&(s, w)| (s, w, backend_addr(0, s)))
            .collect::<Vec<_>>(),
    );
    let view = ServiceView {
        policy: kernel_abi(policy),
        id: 0,
        backend_count: backends,
        ring: &ring,
        maglev: &maglev,
        backends: &views,
    };
    let run = |f: &dyn Fn(u64) -> Option<u32>, n: u64| {
        let started = Instant::now();
        let mut sum = 0u64;
        for i in 0..n {
            sum = sum.wrapping_add(u64::from(black_box(f(black_box(i))).unwrap_or(0)));
        }
        black_box(sum);
        started.elapsed().as_nanos() as f64 / n as f64
    };
    // A tenth untimed first: page faults and cold caches are not the choice's cost.
    let time = |f: &dyn Fn(u64) -> Option<u32>| {
        run(f, calls / 10 + 1);
        run(f, calls)
    };
    let view = &view;
    let real = time(&|i| {
        let client = Ipv4Addr::from(0x0b00_0000 + (i.wrapping_mul(2_654_435_761) as u32 >> 8));
        choose(view, i, client)
    });
    let trivial = time(&|i| {
        let _client = Ipv4Addr::from(0x0b00_0000 + (i.wrapping_mul(2_654_435_761) as u32 >> 8));
        Some(view.id * MAX_BACKENDS_PER_SERVICE + (i % u64::from(view.backend_count)) as u32)
    });
    (real, trivial)
}

/// The policies the kernel has, which `choose` models (`cache_affinity` is the proxy's alone).
fn kernel_policies() -> impl Iterator<Item = Policy> {
    Policy::ALL.into_iter().filter(|p| p.abi().is_some())
}

fn kernel_abi(policy: Policy) -> u32 {
    policy
        .abi()
        .unwrap_or_else(|| panic!("{policy} is not a kernel policy"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (requests, calls) = if args.run.quick {
        (4_000, 20_000)
    } else {
        (300_000, 2_000_000)
    };
    let mut sims = Vec::new();
    for &n in &FLEETS {
        for policy in kernel_policies() {
            eprintln!("steer-bench-fleet: {n} backends, {policy}");
            sims.push(simulate(n, policy, requests));
        }
    }
    let sizes = [2u32, 16, 64];
    let costs: Vec<(Policy, u32, f64, f64)> = kernel_policies()
        .flat_map(|p| sizes.iter().map(move |&m| (p, m)))
        .map(|(p, m)| {
            let (real, trivial) = choice_cost(p, m, calls);
            (p, m, real, trivial)
        })
        .collect();

    let mut md = String::new();
    let _ = writeln!(
        md,
        "| backends (services) | policy | latency p50 s | p99 s | queueing p50 s | p99 s | max/mean in-flight | CV in-flight |"
    );
    let _ = writeln!(
        md,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for s in &sims {
        let _ = writeln!(
            md,
            "| {} ({}) | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            s.fleet,
            s.services,
            s.policy,
            s.latency.0,
            s.latency.1,
            s.wait.0,
            s.wait.1,
            s.max_over_mean,
            s.cv
        );
    }
    let _ = writeln!(
        md,
        "\n| policy | backends | ns per choice | trivial choice, same loop | over trivial |"
    );
    let _ = writeln!(md, "| --- | ---: | ---: | ---: | ---: |");
    for &(p, m, real, trivial) in &costs {
        let _ = writeln!(
            md,
            "| {p} | {m} | {real:.1} | {trivial:.1} | {:.1} |",
            real - trivial
        );
    }
    println!("\n{md}");

    if let Some(dir) = &args.plots {
        let groups: Vec<String> = FLEETS.iter().map(|n| format!("{n} backends")).collect();
        let by_policy = |f: &dyn Fn(&SimResult) -> f64| -> Vec<Series> {
            kernel_policies()
                .map(|p| Series {
                    name: p.to_string(),
                    values: FLEETS
                        .iter()
                        .map(|&n| {
                            sims.iter()
                                .find(|s| s.fleet == n && s.policy == p)
                                .map_or(f64::NAN, f)
                        })
                        .collect(),
                })
                .collect()
        };
        let cost_series: Vec<Series> = kernel_policies()
            .map(|p| Series {
                name: p.to_string(),
                values: sizes
                    .iter()
                    .map(|&m| {
                        costs
                            .iter()
                            .find(|c| c.0 == p && c.1 == m)
                            .map_or(f64::NAN, |c| c.2)
                    })
                    .collect(),
            })
            .chain([Series {
                name: "trivial".to_owned(),
                values: sizes
                    .iter()
                    .map(|&m| costs.iter().find(|c| c.1 == m).map_or(f64::NAN, |c| c.3))
                    .collect(),
            }])
            .collect();
        let plots = [
            (
                "fleet-latency-p99.png",
                "Fleet simulation: request latency p99 (virtual s, log scale)",
                "p99 latency, s",
                groups.clone(),
                by_policy(&|s| s.latency.1),
                Scale::Log,
            ),
            (
                "fleet-spread.png",
                "Fleet simulation: max/mean in-flight across backends",
                "max / mean in-flight",
                groups,
                by_policy(&|s| s.max_over_mean),
                Scale::Linear,
            ),
            (
                "fleet-choice-cost.png",
                "Cost of one policy choice (lb_userspace::policy::choose)",
                "ns per choice",
                sizes.iter().map(|m| format!("{m} backends")).collect(),
                cost_series,
                Scale::Linear,
            ),
        ];
        for (file, title, y, groups, series, scale) in plots {
            if let Err(e) = bar_chart(&dir.join(file), title, y, &groups, &series, None, scale) {
                eprintln!("steer-bench-fleet: {e}");
                return ExitCode::FAILURE;
            }
        }
    }

    if let Some(out) = &args.run.out {
        let json = json!({
            "method": "discrete-event simulation in virtual time driving lb_userspace::policy::choose",
            "quick": args.run.quick,
            "seed": SEED,
            "model": {
                "requests_per_run": requests,
                "warmup_share": WARMUP,
                "offered_load_share_of_capacity": LOAD,
                "short_share": SHORT_SHARE,
                "short_work_mean_s": SHORT_WORK_S,
                "long_work_mean_s": LONG_WORK_S,
                "backend_slots": [1, 2, 4],
                "backend_speeds": [0.5, 1.0, 2.0],
                "clients": CLIENTS,
                "slot_poll_s": POLL_S,
                "max_backends_per_service": MAX_BACKENDS_PER_SERVICE,
            },
            "simulations": sims.iter().map(|s| json!({
                "backends": s.fleet,
                "services": s.services,
                "policy": s.policy.to_string(),
                "requests_measured": s.requests,
                "virtual_seconds": s.virtual_s,
                "latency_p50_s": s.latency.0,
                "latency_p99_s": s.latency.1,
                "queueing_p50_s": s.wait.0,
                "queueing_p99_s": s.wait.1,
                "max_over_mean_inflight": s.max_over_mean,
                "cv_inflight": s.cv,
            })).collect::<Vec<_>>(),
            "choice_cost": costs.iter().map(|&(p, m, real, trivial)| json!({
                "policy": p.to_string(),
                "backends": m,
                "calls": calls,
                "ns_per_choice": real,
                "trivial_ns_per_choice": trivial,
                "ratio_to_trivial": ratio(real, trivial),
            })).collect::<Vec<_>>(),
        });
        return save_results("steer-bench-fleet", out, &json, &md);
    }
    ExitCode::SUCCESS
}
