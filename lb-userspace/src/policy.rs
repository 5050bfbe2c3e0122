//! Backend choice for a new flow: an exact model of `lb-ebpf/src/policy.h`, plus the weighted
//! round-robin ring the agent writes for the kernel to walk. Pure: no maps, no clock.
//!
//! The kernel and this model must pick the same backend for the same map state, so the code below
//! follows the C statement for statement, including its integer widths.

use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{
    MAGLEV_PROBES, MAGLEV_SIZE, MAX_BACKENDS_PER_SERVICE, MAX_SERVICES, RR_RING_SIZE,
    backend_state, client_hash,
};

/// One backend slot as the kernel sees it: its `steer_backend` fields and its connection count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendView {
    /// `enum steer_backend_state`.
    pub state: u32,
    pub weight: u32,
    /// 0: no cap.
    pub max_conns: u32,
    pub conns: u64,
    /// Idle slots at the agent's last poll.
    pub idle_slots: u32,
    /// Connections steered since that poll (`steer_backend_conns.steered`).
    pub steered: u64,
}

impl BackendView {
    /// `backend_has_room`: only an active backend with weight and room takes a new flow.
    pub fn usable(&self) -> bool {
        self.state == backend_state::ACTIVE
            && self.weight > 0
            && (self.max_conns == 0 || self.conns < u64::from(self.max_conns))
    }

    /// `pick_slots`' test: usable with a cap. The agent writes a backend's slot count as its cap
    /// once a poll knows it, so a cap of 0 is one never polled, which has no room.
    pub fn usable_for_slots(&self) -> bool {
        self.max_conns > 0 && self.usable()
    }

    /// `free_slots`: idle slots at the last poll not yet taken by a steered connection.
    pub fn free_slots(&self) -> u64 {
        u64::from(self.idle_slots).saturating_sub(self.steered)
    }
}

/// A service as the kernel sees it when a SYN arrives.
#[derive(Clone, Copy, Debug)]
pub struct ServiceView<'a> {
    /// `enum steer_policy`, raw: an unknown value chooses nothing, as in the kernel.
    pub policy: u32,
    /// Must be below `MAX_SERVICES`; the kernel finds no cursor or ring otherwise.
    pub id: u32,
    pub backend_count: u32,
    /// The ring's first `rr_len` entries (backend slots).
    pub ring: &'a [u32],
    /// The Maglev table (`MAGLEV_SIZE` backend slots) of a `maglev` service, else empty.
    pub maglev: &'a [u32],
    /// Indexed by slot; a slot past the end reads as an unwritten (DOWN) entry.
    pub backends: &'a [BackendView],
}

impl ServiceView<'_> {
    fn backend(&self, slot: u32) -> BackendView {
        usize::try_from(slot)
            .ok()
            .and_then(|slot| self.backends.get(slot))
            .copied()
            .unwrap_or_default()
    }

    fn backend_id(&self, slot: u32) -> u32 {
        self.id * MAX_BACKENDS_PER_SERVICE + slot
    }
}

/// The backend id the kernel picks for a new flow from `client`, given the service's round-robin
/// cursor value before the kernel's `fetch_add` (only round robin reads it).
pub fn choose(service: &ServiceView<'_>, cursor: u64, client: Ipv4Addr) -> Option<u32> {
    if service.id >= MAX_SERVICES {
        return None;
    }
    match service.policy {
        lb_common::policy::ROUND_ROBIN => pick_round_robin(service, cursor),
        lb_common::policy::LEAST_CONNECTIONS => pick_least_connections(service),
        lb_common::policy::MAGLEV => pick_maglev(service, client),
        lb_common::policy::SLOTS => pick_slots(service),
        _ => None,
    }
}

fn pick_maglev(service: &ServiceView<'_>, client: Ipv4Addr) -> Option<u32> {
    let start = client_hash(u32::from_ne_bytes(client.octets())) % MAGLEV_SIZE;
    for i in 0..MAGLEV_PROBES {
        let pos = (start + i) % MAGLEV_SIZE;
        // An unwritten table reads as zeros in the kernel.
        let slot = service.maglev.get(pos as usize).copied().unwrap_or(0);
        if slot >= MAX_BACKENDS_PER_SERVICE {
            return None;
        }
        if service.backend(slot).usable() {
            return Some(service.backend_id(slot));
        }
    }
    None
}

fn pick_round_robin(service: &ServiceView<'_>, cursor: u64) -> Option<u32> {
    let len = u32::try_from(service.ring.len()).ok()?;
    if len == 0 || len > RR_RING_SIZE {
        return None;
    }
    for i in 0..u64::from(len) {
        let pos = cursor.wrapping_add(i) % u64::from(len);
        let slot = *service.ring.get(usize::try_from(pos).ok()?)?;
        // A slot the kernel cannot index ends the walk, not just this step.
        if slot >= MAX_BACKENDS_PER_SERVICE {
            return None;
        }
        if service.backend(slot).usable() {
            return Some(service.backend_id(slot));
        }
    }
    None
}

fn pick_least_connections(service: &ServiceView<'_>) -> Option<u32> {
    let mut best: Option<(u32, u64, u64)> = None; // (slot, conns, weight)
    for slot in 0..service.backend_count.min(MAX_BACKENDS_PER_SERVICE) {
        let b = service.backend(slot);
        if !b.usable() {
            continue;
        }
        let weight = u64::from(b.weight);
        // Cross multiplication as in the kernel (u64, wrapping), so no division rounds.
        let better = best.is_none_or(|(_, best_conns, best_weight)| {
            b.conns.wrapping_mul(best_weight) < best_conns.wrapping_mul(weight)
        });
        if better {
            best = Some((slot, b.conns, weight));
        }
    }
    best.map(|(slot, _, _)| service.backend_id(slot))
}

fn pick_slots(service: &ServiceView<'_>) -> Option<u32> {
    let mut best: Option<(u32, u64, u64)> = None; // (slot, free, conns)
    for slot in 0..service.backend_count.min(MAX_BACKENDS_PER_SERVICE) {
        let b = service.backend(slot);
        if !b.usable_for_slots() {
            continue;
        }
        let free = b.free_slots();
        let better = best.is_none_or(|(_, best_free, best_conns)| {
            free > best_free || (free == best_free && b.conns < best_conns)
        });
        if better {
            best = Some((slot, free, b.conns));
        }
    }
    best.map(|(slot, _, _)| service.backend_id(slot))
}

/// The round-robin ring of a service: backend slots in nginx's smooth weighted round-robin order,
/// over the active backends given as `(slot, weight)`; zero weights are left out.
///
/// Weights are divided by their gcd so the ring is one period; a period longer than
/// `RR_RING_SIZE` is scaled down (each backend keeps at least one entry) and cut to fit.
pub fn rr_ring(active: &[(u32, u32)]) -> Vec<u32> {
    let active: Vec<(u32, u64)> = active
        .iter()
        .filter(|&&(_, w)| w > 0)
        .map(|&(slot, w)| (slot, u64::from(w)))
        .collect();
    let divisor = active.iter().fold(0, |g, &(_, w)| gcd(g, w)).max(1);
    let mut weights: Vec<u64> = active.iter().map(|&(_, w)| w / divisor).collect();
    let sum: u64 = weights.iter().sum();
    let size = u64::from(RR_RING_SIZE);
    if sum > size {
        for w in &mut weights {
            *w = (*w * size / sum).max(1);
        }
    }
    let total: u64 = weights.iter().sum();
    let mut current = vec![0i128; weights.len()];
    let mut ring = Vec::new();
    for _ in 0..total.min(size) {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += i128::from(w);
            // Strictly greater: the first of equal candidates wins, as in nginx.
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= i128::from(total);
        ring.push(active[best].0);
    }
    ring
}

/// A Maglev lookup table (Eisenbud et al., NSDI 2016) of `MAGLEV_SIZE` backend slots over the
/// active backends given as `(slot, weight, address)`; zero weights are left out, and an empty
/// table means no backend. Each backend's preference order derives from its address alone and
/// backends take turns in address order, so the table does not depend on slot numbers and a
/// change of one backend moves little more than its own share. Weights, divided by their gcd,
/// are the entries a backend takes per turn.
pub fn maglev_table(active: &[(u32, u32, SocketAddrV4)]) -> Vec<u32> {
    let mut backends: Vec<(SocketAddrV4, u32, u64)> = active
        .iter()
        .filter(|&&(_, w, _)| w > 0)
        .map(|&(slot, w, addr)| (addr, slot, u64::from(w)))
        .collect();
    if backends.is_empty() {
        return Vec::new();
    }
    backends.sort_unstable_by_key(|&(addr, _, _)| addr);
    let divisor = backends.iter().fold(0, |g, &(_, _, w)| gcd(g, w));
    let size = u64::from(MAGLEV_SIZE);
    // (offset, skip, next) of each backend's permutation: entry j is (offset + j * skip) % size.
    let mut permutations: Vec<(u64, u64, u64)> = backends
        .iter()
        .map(|&(addr, _, _)| {
            let key = (u64::from(u32::from(*addr.ip())) << 16) | u64::from(addr.port());
            (splitmix64(key) % size, splitmix64(!key) % (size - 1) + 1, 0)
        })
        .collect();
    const EMPTY: u32 = u32::MAX;
    let mut table = vec![EMPTY; MAGLEV_SIZE as usize];
    let mut filled = 0u64;
    'fill: loop {
        for (i, &(_, slot, weight)) in backends.iter().enumerate() {
            for _ in 0..weight / divisor {
                let (offset, skip, next) = &mut permutations[i];
                let mut pos = (*offset + *next * *skip) % size;
                while table[pos as usize] != EMPTY {
                    *next += 1;
                    pos = (*offset + *next * *skip) % size;
                }
                table[pos as usize] = slot;
                *next += 1;
                filled += 1;
                if filled == size {
                    break 'fill;
                }
            }
        }
    }
    table
}

/// SplitMix64's output function: a fixed, well-mixed hash, the same on every host and run.
pub(crate) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

pub(crate) fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::policy::{LEAST_CONNECTIONS, ROUND_ROBIN, SLOTS};
    use proptest::prelude::*;

    /// `choose` for the policies that ignore the client.
    fn pick(service: &ServiceView<'_>, cursor: u64) -> Option<u32> {
        choose(service, cursor, Ipv4Addr::LOCALHOST)
    }

    fn active(weight: u32) -> BackendView {
        BackendView {
            state: backend_state::ACTIVE,
            weight,
            max_conns: 0,
            conns: 0,
            idle_slots: 0,
            steered: 0,
        }
    }

    fn view<'a>(
        policy: u32,
        id: u32,
        ring: &'a [u32],
        backends: &'a [BackendView],
    ) -> ServiceView<'a> {
        ServiceView {
            policy,
            id,
            backend_count: u32::try_from(backends.len()).unwrap_or(u32::MAX),
            ring,
            maglev: &[],
            backends,
        }
    }

    #[test]
    fn usable_needs_active_weight_and_room() {
        assert!(active(1).usable());
        assert!(!active(0).usable());
        let draining = BackendView {
            state: backend_state::DRAINING,
            ..active(1)
        };
        assert!(!draining.usable());
        let down = BackendView {
            state: backend_state::DOWN,
            ..active(1)
        };
        assert!(!down.usable());
        let full = BackendView {
            max_conns: 2,
            conns: 2,
            ..active(1)
        };
        assert!(!full.usable());
        let room = BackendView {
            max_conns: 2,
            conns: 1,
            ..active(1)
        };
        assert!(room.usable());
    }

    #[test]
    fn round_robin_walks_from_cursor_and_skips_unusable() {
        let draining = BackendView {
            state: backend_state::DRAINING,
            ..active(1)
        };
        let backends = [active(1), draining, active(1)];
        let ring = [0, 1, 2];
        let svc = view(ROUND_ROBIN, 2, &ring, &backends);
        assert_eq!(pick(&svc, 0), Some(128));
        assert_eq!(pick(&svc, 1), Some(130), "slot 1 drains: next in ring");
        assert_eq!(pick(&svc, 2), Some(130));
        assert_eq!(
            pick(&svc, 3),
            Some(128),
            "cursor wraps modulo the ring length"
        );
    }

    #[test]
    fn round_robin_edge_cases_match_kernel() {
        let one = [active(1)];
        let rr = |id, ring: &[u32]| pick(&view(ROUND_ROBIN, id, ring, &one), 0);
        assert_eq!(rr(0, &[]), None, "empty ring");
        assert_eq!(rr(0, &[64, 0]), None, "a slot out of range aborts the walk");
        assert_eq!(rr(64, &[0]), None, "no such service id");
        assert_eq!(rr(0, &[3]), None, "an unwritten slot is down");
        assert_eq!(rr(0, &vec![0; RR_RING_SIZE as usize + 1]), None);
        assert_eq!(pick(&view(7, 0, &[0], &one), 0), None, "unknown policy");
    }

    #[test]
    fn least_connections_per_weight_ties_to_lowest_slot() {
        let b = |weight, conns| BackendView {
            conns,
            ..active(weight)
        };
        // 3/1, 4/2, 2/1: slots 1 and 2 tie at 2 per unit of weight; the lower slot wins.
        let svc = [b(1, 3), b(2, 4), b(1, 2)];
        assert_eq!(pick(&view(LEAST_CONNECTIONS, 1, &[], &svc), 0), Some(65));
        let svc = [b(1, 1), b(1, 1)];
        assert_eq!(pick(&view(LEAST_CONNECTIONS, 0, &[], &svc), 0), Some(0));
        let capped_full = BackendView {
            max_conns: 1,
            ..b(1, 1)
        };
        let svc = [b(1, 5), capped_full, b(1, 2)];
        assert_eq!(pick(&view(LEAST_CONNECTIONS, 0, &[], &svc), 0), Some(2));
        let short = ServiceView {
            backend_count: 1,
            ..view(LEAST_CONNECTIONS, 0, &[], &svc)
        };
        assert_eq!(
            pick(&short, 0),
            Some(0),
            "slots past backend_count are not read"
        );
    }

    #[test]
    fn ring_is_smooth_weighted() {
        assert_eq!(rr_ring(&[(0, 5), (1, 1), (2, 1)]), [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(
            rr_ring(&[(3, 2), (7, 2)]),
            [3, 7],
            "weights divided by their gcd"
        );
        assert_eq!(rr_ring(&[(0, 0), (1, 3)]), [1], "zero weight left out");
        assert!(rr_ring(&[]).is_empty());
    }

    #[test]
    fn long_ring_is_scaled_and_cut() {
        // 65535 : 63 x 1 scales to 255 + 63 x 1 = 318 entries, cut to the ring size.
        let mut weights = vec![(0, 65535)];
        weights.extend((1..64).map(|slot| (slot, 1)));
        assert_eq!(rr_ring(&weights).len(), RR_RING_SIZE as usize);
        assert_eq!(
            rr_ring(&[(0, 1000), (1, 3000)]).len(),
            4,
            "gcd first: 1:3 fits"
        );
        let ring = rr_ring(&[(0, 301), (1, 1)]);
        assert_eq!(ring.len(), 255 + 1);
        assert_eq!(
            ring.iter().filter(|&&s| s == 1).count(),
            1,
            "keeps one entry"
        );
    }

    fn backend_strategy() -> impl Strategy<Value = BackendView> {
        (0u32..3, 0u32..4, 0u32..4, 0u64..5, 0u32..5, 0u64..6).prop_map(
            |(state, weight, max_conns, conns, idle_slots, steered)| BackendView {
                state,
                weight,
                max_conns,
                conns,
                idle_slots,
                steered,
            },
        )
    }

    #[test]
    fn slots_prefers_free_slots_then_fewer_connections_then_lowest_slot() {
        let b = |idle_slots, steered, conns| BackendView {
            idle_slots,
            steered,
            conns,
            max_conns: 8,
            ..active(1)
        };
        let slots = |backends: &[BackendView]| pick(&view(SLOTS, 1, &[], backends), 0);
        assert_eq!(slots(&[b(1, 0, 0), b(3, 0, 5)]), Some(65), "most idle");
        assert_eq!(
            slots(&[b(1, 0, 0), b(3, 3, 0)]),
            Some(64),
            "steered since the poll count as taken"
        );
        assert_eq!(
            slots(&[b(2, 9, 4), b(0, 0, 3)]),
            Some(65),
            "none free anywhere: fewer connections"
        );
        assert_eq!(slots(&[b(2, 0, 1), b(2, 0, 1)]), Some(64), "lowest slot");
        let full = BackendView {
            max_conns: 1,
            ..b(4, 0, 1)
        };
        assert_eq!(
            slots(&[full, b(0, 0, 7)]),
            Some(65),
            "a full backend is skipped"
        );
        let never_polled = BackendView {
            max_conns: 0,
            ..b(4, 0, 0)
        };
        assert_eq!(
            slots(&[never_polled, b(0, 0, 7)]),
            Some(65),
            "never polled (no cap): no room, whatever its idle slots"
        );
        assert_eq!(slots(&[never_polled]), None);
        assert_eq!(slots(&[]), None);
    }

    /// A burst between two polls: each choice takes a slot, so it spreads by free slots.
    #[test]
    fn slots_spreads_a_burst_between_polls() {
        let mut backends = [3, 1, 2].map(|idle_slots| BackendView {
            idle_slots,
            max_conns: 8,
            ..active(1)
        });
        let mut picks = Vec::new();
        for _ in 0..8 {
            let id = pick(&view(SLOTS, 0, &[], &backends), 0).expect("a usable backend");
            let b = &mut backends[id as usize];
            b.steered += 1;
            b.conns += 1;
            picks.push(id);
        }
        // The first 6 fill the 3 + 1 + 2 free slots (equal free goes to fewer connections);
        // then none is free and fewest connections wins.
        assert_eq!(picks, [0, 2, 0, 1, 2, 0, 1, 1]);
    }

    fn addr(slot: u32) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 0, (slot >> 8) as u8, slot as u8), 8080)
    }

    #[test]
    fn maglev_table_is_fixed_by_addresses_not_slots() {
        let a = [(0, 1, addr(1)), (1, 2, addr(2)), (2, 1, addr(3))];
        let table = maglev_table(&a);
        // Golden prefix: clients keep their backend across agent versions only if this holds.
        assert_eq!(table[..12], [2, 1, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1]);
        // The same backends in other slots make the same table, relabelled.
        let b = [(5, 1, addr(3)), (7, 1, addr(1)), (9, 2, addr(2))];
        let relabel = |s: u32| match s {
            0 => 7,
            1 => 9,
            _ => 5,
        };
        let expected: Vec<u32> = table.iter().map(|&s| relabel(s)).collect();
        assert_eq!(maglev_table(&b), expected);
        assert!(maglev_table(&[]).is_empty());
        assert!(
            maglev_table(&[(0, 0, addr(1))]).is_empty(),
            "zero weight is no backend"
        );
    }

    #[test]
    fn maglev_tries_the_next_entries_when_the_clients_backend_is_full() {
        let table = maglev_table(&[(0, 1, addr(1)), (1, 1, addr(2))]);
        let client = Ipv4Addr::new(192, 0, 2, 7);
        let pos = (client_hash(u32::from_ne_bytes(client.octets())) % MAGLEV_SIZE) as usize;
        let own = table[pos];
        let mut backends = [active(1), active(1)];
        backends[own as usize].max_conns = 1;
        backends[own as usize].conns = 1;
        let svc = ServiceView {
            maglev: &table,
            ..view(lb_common::policy::MAGLEV, 0, &[], &backends)
        };
        let next_other = table[pos..pos + MAGLEV_PROBES as usize]
            .iter()
            .any(|&s| s != own);
        assert_eq!(choose(&svc, 0, client), next_other.then_some(1 - own));
        let none_free = [BackendView {
            state: backend_state::DRAINING,
            ..active(1)
        }; 2];
        let svc = ServiceView {
            maglev: &table,
            ..view(lb_common::policy::MAGLEV, 0, &[], &none_free)
        };
        assert_eq!(choose(&svc, 0, client), None);
    }

    proptest! {
        #[test]
        fn never_picks_an_unusable_backend(
            backends in prop::collection::vec(backend_strategy(), 0..8),
            ring in prop::collection::vec(0u32..8, 0..16),
            policy in 0u32..4,
            id in 0u32..MAX_SERVICES,
            cursor in any::<u64>(),
        ) {
            let svc = view(policy, id, &ring, &backends);
            if let Some(backend) = pick(&svc, cursor) {
                prop_assert_eq!(backend / MAX_BACKENDS_PER_SERVICE, id);
                let slot = (backend % MAX_BACKENDS_PER_SERVICE) as usize;
                prop_assert!(backends[slot].usable());
            }
        }

        #[test]
        fn least_connections_picks_a_minimum(
            backends in prop::collection::vec(backend_strategy(), 1..8),
        ) {
            let svc = view(LEAST_CONNECTIONS, 0, &[], &backends);
            let usable: Vec<&BackendView> = backends.iter().filter(|b| b.usable()).collect();
            let picked = pick(&svc, 0);
            prop_assert_eq!(picked.is_some(), !usable.is_empty());
            if let Some(id) = picked {
                let p = backends[id as usize];
                for o in usable {
                    prop_assert!(p.conns * u64::from(o.weight) <= o.conns * u64::from(p.weight));
                }
            }
        }

        #[test]
        fn slots_picks_a_maximum_of_free_slots(
            backends in prop::collection::vec(backend_strategy(), 1..8),
        ) {
            let svc = view(SLOTS, 0, &[], &backends);
            let usable: Vec<&BackendView> =
                backends.iter().filter(|b| b.usable_for_slots()).collect();
            let picked = pick(&svc, 0);
            prop_assert_eq!(picked.is_some(), !usable.is_empty());
            if let Some(id) = picked {
                let p = backends[id as usize];
                prop_assert!(p.usable_for_slots());
                for o in usable {
                    prop_assert!(p.free_slots() >= o.free_slots());
                    if p.free_slots() == o.free_slots() {
                        prop_assert!(p.conns <= o.conns);
                    }
                }
            }
        }

        #[test]
        fn equal_weights_alternate_exactly(n in 1u32..64, weight in 1u32..100, cursor in 0u64..1000) {
            let slots: Vec<(u32, u32)> = (0..n).map(|s| (s, weight)).collect();
            let ring = rr_ring(&slots);
            prop_assert_eq!(&ring, &(0..n).collect::<Vec<_>>());
            let backends = vec![active(weight); n as usize];
            let svc = view(ROUND_ROBIN, 0, &ring, &backends);
            for k in 0..2 * u64::from(n) {
                let expected = ((cursor + k) % u64::from(n)) as u32;
                prop_assert_eq!(pick(&svc, cursor + k), Some(expected));
            }
        }

        #[test]
        fn ring_counts_are_proportional_to_weights(
            weights in prop::collection::vec(0u32..70_000, 0..64),
        ) {
            let slots: Vec<(u32, u32)> = (0u32..).zip(weights.iter().copied()).collect();
            let ring = rr_ring(&slots);
            prop_assert!(ring.len() <= RR_RING_SIZE as usize);
            // The expected count of each slot, computed the way the doc comment states it.
            let g = weights.iter().fold(0, |g, &w| gcd(g, u64::from(w))).max(1);
            let mut expected: Vec<u64> = weights.iter().map(|&w| u64::from(w) / g).collect();
            let sum: u64 = expected.iter().sum();
            let size = u64::from(RR_RING_SIZE);
            if sum > size {
                for w in expected.iter_mut().filter(|w| **w > 0) {
                    *w = (*w * size / sum).max(1);
                }
            }
            let cut = expected.iter().sum::<u64>() > size;
            for (slot, &w) in (0u32..).zip(&expected) {
                let count = ring.iter().filter(|&&s| s == slot).count() as u64;
                if cut {
                    prop_assert!(count <= w);
                } else {
                    prop_assert_eq!(count, w);
                }
            }
        }

        #[test]
        fn maglev_shares_follow_weights(weights in prop::collection::vec(1u32..8, 1..12)) {
            let active: Vec<(u32, u32, SocketAddrV4)> =
                (0u32..).zip(&weights).map(|(slot, &w)| (slot, w, addr(slot))).collect();
            let table = maglev_table(&active);
            prop_assert_eq!(table.len(), MAGLEV_SIZE as usize);
            let sum: u64 = weights.iter().map(|&w| u64::from(w)).sum();
            for (slot, &w) in (0u32..).zip(&weights) {
                let count = table.iter().filter(|&&s| s == slot).count() as u64;
                let fair = u64::from(MAGLEV_SIZE) * u64::from(w) / sum;
                // Backends take turns of `weight` entries: a share is off by at most one turn.
                prop_assert!(count.abs_diff(fair) <= sum, "slot {} has {} entries, fair {}", slot, count, fair);
            }
        }

        #[test]
        fn maglev_removal_moves_little_besides_the_removed_share(
            n in 3u32..20,
            removed in 0u32..20,
        ) {
            let removed = removed % n;
            let all: Vec<(u32, u32, SocketAddrV4)> = (0..n).map(|s| (s, 1, addr(s))).collect();
            let rest: Vec<_> = all.iter().copied().filter(|&(s, _, _)| s != removed).collect();
            let (before, after) = (maglev_table(&all), maglev_table(&rest));
            let moved = before
                .iter()
                .zip(&after)
                .filter(|&(b, a)| *b != removed && b != a)
                .count();
            let others = before.iter().filter(|&&b| b != removed).count();
            // Maglev trades a little disruption for balance; the paper measures a few percent.
            prop_assert!(moved * 100 <= others * 6, "{} of {} entries of other backends moved", moved, others);
            prop_assert!(!after.contains(&removed));
        }

        #[test]
        fn maglev_follows_clients_to_their_entry(
            octets in prop::array::uniform4(0u8..),
            n in 1u32..8,
        ) {
            let all: Vec<(u32, u32, SocketAddrV4)> = (0..n).map(|s| (s, 1, addr(s))).collect();
            let table = maglev_table(&all);
            let backends = vec![active(1); n as usize];
            let svc = ServiceView { maglev: &table, ..view(lb_common::policy::MAGLEV, 0, &[], &backends) };
            let client = Ipv4Addr::from(octets);
            let pos = client_hash(u32::from_ne_bytes(octets)) % MAGLEV_SIZE;
            prop_assert_eq!(choose(&svc, 0, client), Some(table[pos as usize]));
            prop_assert_eq!(choose(&svc, 99, client), choose(&svc, 0, client), "the cursor plays no part");
        }
    }
}
