//! Policy `cache_affinity` (http only): a request's key (session header, API key, prompt
//! prefix, client address) picks a point on a ring of virtual nodes, and the request goes to the
//! first backend clockwise from it that is below its bound, consistent hashing with bounded
//! loads (Mirrokni, Thorup, Zadimoghaddam, SODA 2018). A backend of weight `w` (of `W` on the
//! ring) is below its bound while it holds fewer than `ceil(c * (in flight + 1) * w / W)`, so no
//! backend goes above `c` times its share of the load and overflow walks on round the ring.
//!
//! Pure: the ring derives from the backends' addresses and weights alone, never from slot
//! numbers or anything else local to this host, so every balancer with the same backend set
//! builds the same ring and, unloaded, puts a key on the same backend.

use std::net::{Ipv4Addr, SocketAddrV4};

use serde::Deserialize;

use crate::policy::{gcd, splitmix64};
use crate::spec::{AffinityKey, AffinitySpec, LoadFactor};

/// Virtual nodes per unit of weight (weights divided by their gcd): with 160 per backend each
/// one's share of the keys is within about 10% of its weight's.
const POINTS_PER_WEIGHT: u64 = 160;
/// The most points on a ring (64 backends of 160); unequal weights past it are scaled down.
const MAX_POINTS: u64 = 10_240;

/// A backend on the ring: its slot (where the proxy finds it), its address (where its points
/// come from) and its effective weight (the configured weight today; a speed factor would
/// scale it here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub slot: u32,
    pub address: SocketAddrV4,
    pub weight: u64,
}

/// The ring of a service's active backends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ring {
    /// (point, slot), in ring order: by point, ties by address.
    points: Vec<(u64, u32)>,
    /// Effective weight by slot; 0 off the ring.
    weights: Vec<u64>,
}

/// A slot's state at choice time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load {
    /// Requests it holds now.
    pub in_flight: u64,
    /// Takes a request at all: active, not to be avoided, below its own cap.
    pub open: bool,
    /// Its speed factor in thousandths (1..=1000; 1000: the fastest, or not measured yet): its
    /// bound scales its weight by it, so a slower backend's share is smaller.
    pub speed: u64,
}

impl Default for Load {
    fn default() -> Load {
        Load {
            in_flight: 0,
            open: false,
            speed: 1000,
        }
    }
}

impl Ring {
    pub fn new(members: &[Member]) -> Ring {
        let members: Vec<Member> = members.iter().copied().filter(|m| m.weight > 0).collect();
        let divisor = members.iter().fold(0, |g, m| gcd(g, m.weight)).max(1);
        let units: u64 = members.iter().map(|m| m.weight / divisor).sum();
        let scale = |weight: u64| {
            let points = weight / divisor * POINTS_PER_WEIGHT;
            if units * POINTS_PER_WEIGHT > MAX_POINTS {
                (points * MAX_POINTS / (units * POINTS_PER_WEIGHT)).max(1)
            } else {
                points
            }
        };
        let mut points: Vec<(u64, SocketAddrV4, u32)> = Vec::new();
        let slots = members
            .iter()
            .map(|m| m.slot as usize + 1)
            .max()
            .unwrap_or(0);
        let mut weights = vec![0; slots];
        for m in &members {
            weights[m.slot as usize] = m.weight;
            // A backend's i-th point is the same whatever its count, so a weight change or a
            // rescale adds or drops points at the end of its sequence and moves little else.
            points.extend((0..scale(m.weight)).map(|i| (point(m.address, i), m.address, m.slot)));
        }
        points.sort_unstable_by_key(|&(point, address, _)| (point, address));
        Ring {
            points: points.into_iter().map(|(p, _, slot)| (p, slot)).collect(),
            weights,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

/// The slot for the request keyed `key`, and the bound it is below (the most it may hold with
/// this request), given each slot's load (indexed by slot): the first open backend clockwise
/// from the key's point whose in-flight count is below its bound over the ring's total plus
/// this request. `None` when every backend is closed or at its bound (the request waits).
pub fn choose(ring: &Ring, key: u64, factor: LoadFactor, loads: &[Load]) -> Option<(u32, u64)> {
    let load = |slot: u32| loads.get(slot as usize).copied().unwrap_or_default();
    let weight = |slot: u32| ring.weights[slot as usize] * load(slot).speed.clamp(1, 1000);
    let members = || {
        (0u32..)
            .zip(&ring.weights)
            .filter(|&(_, &w)| w > 0)
            .map(|(slot, _)| slot)
    };
    let total: u64 = members().map(|slot| load(slot).in_flight).sum();
    // A member that takes nothing and holds nothing (down, avoided, refusing) leaves its share
    // to the others, or a dead backend would hold every other below its bound; a full one holds
    // requests and keeps its share.
    let counted: u64 = members()
        .filter(|&slot| load(slot).open || load(slot).in_flight > 0)
        .map(weight)
        .sum();
    let start = ring.points.partition_point(|&(point, _)| point < key);
    let mut seen = vec![false; ring.weights.len()];
    let mut left = ring.weights.iter().filter(|&&w| w > 0).count();
    let (wrapped, from_key) = ring.points.split_at(start);
    for &(_, slot) in from_key.iter().chain(wrapped) {
        let index = slot as usize;
        if left == 0 {
            break;
        }
        if seen[index] {
            continue;
        }
        seen[index] = true;
        left -= 1;
        let bound = factor.capacity(total + 1, weight(slot), counted);
        let b = load(slot);
        if b.open && b.in_flight < bound {
            return Some((slot, bound));
        }
    }
    None
}

/// The request's key: from the first of `spec.keys` the request has, else from its client
/// address. `header` looks a header up by its lowercase name; `body` is the request body
/// (JSON for the prompt prefix; anything else has none).
pub fn key<'a>(
    spec: &AffinitySpec,
    header: impl Fn(&str) -> Option<&'a [u8]>,
    body: &[u8],
    client: Ipv4Addr,
) -> u64 {
    spec.keys
        .iter()
        .find_map(|source| match source {
            AffinityKey::Header(name) => header(name)
                .filter(|value| !value.is_empty())
                .map(|value| hash(Source::Header, value)),
            AffinityKey::ApiKey => header("authorization")
                .and_then(bearer)
                .map(|token| hash(Source::ApiKey, token)),
            AffinityKey::PromptPrefix => prompt_prefix(body, spec.prefix_bytes.get())
                .map(|prefix| hash(Source::PromptPrefix, &prefix)),
            AffinityKey::Client => None,
        })
        .unwrap_or_else(|| client_key(client))
}

/// The key of a request from `client` that has no other.
pub fn client_key(client: Ipv4Addr) -> u64 {
    hash(Source::Client, &client.octets())
}

/// Keeps equal bytes from different sources apart.
#[derive(Clone, Copy)]
enum Source {
    Header = 1,
    ApiKey,
    PromptPrefix,
    Client,
}

/// The token of `Bearer TOKEN` (scheme in any case), if not empty.
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    let token = token.trim_ascii();
    (scheme.eq_ignore_ascii_case(b"bearer ") && !token.is_empty()).then_some(token)
}

/// The first `limit` bytes of the canonical JSON (serde_json's, object keys sorted) of the
/// body's `messages`, else its `prompt`: the same for every client that sends the same
/// conversation, however it spaces its JSON.
fn prompt_prefix(body: &[u8], limit: usize) -> Option<Vec<u8>> {
    #[derive(Deserialize)]
    struct Prompt {
        messages: Option<serde_json::Value>,
        prompt: Option<serde_json::Value>,
    }
    let parsed: Prompt = serde_json::from_slice(body).ok()?;
    let value = parsed.messages.or(parsed.prompt)?;
    let mut prefix = Prefix {
        bytes: Vec::with_capacity(limit),
        limit,
    };
    // Ends with an error once the prefix is full: what was written is what is wanted.
    let _ = serde_json::to_writer(&mut prefix, &value);
    Some(prefix.bytes)
}

/// A writer that takes `limit` bytes and then refuses, so a long history is not serialized
/// whole for its first bytes.
struct Prefix {
    bytes: Vec<u8>,
    limit: usize,
}

impl std::io::Write for Prefix {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = self.limit - self.bytes.len();
        let taken = &buf[..buf.len().min(room)];
        self.bytes.extend_from_slice(taken);
        // 0 for a non-empty buffer ends `write_all` with an error.
        Ok(taken.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// FNV-1a over the bytes, then SplitMix64's finalizer: the same on every host and run.
fn hash(source: Source, bytes: &[u8]) -> u64 {
    let fnv = std::iter::once(source as u8)
        .chain(bytes.iter().copied())
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    splitmix64(fnv)
}

/// A backend's `i`-th point on the ring.
fn point(address: SocketAddrV4, i: u64) -> u64 {
    let id = (u64::from(address.ip().to_bits()) << 16) | u64::from(address.port());
    splitmix64(splitmix64(id) ^ i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(n: u32) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, n as u8), 8080)
    }

    /// Backends 10.0.1.1.. of weight 1 in slots 0..n.
    fn members(n: u32) -> Vec<Member> {
        (0..n)
            .map(|slot| Member {
                slot,
                address: address(slot + 1),
                weight: 1,
            })
            .collect()
    }

    fn idle(slots: usize) -> Vec<Load> {
        vec![
            Load {
                open: true,
                ..Load::default()
            };
            slots
        ]
    }

    /// Keys spread over the hash space, the same every run.
    fn keys(n: u64) -> impl Iterator<Item = u64> {
        (0..n).map(|i| splitmix64(i ^ 0x5eed))
    }

    fn unloaded(ring: &Ring, key: u64, slots: usize) -> u32 {
        let (slot, _) = choose(ring, key, LoadFactor::DEFAULT, &idle(slots)).expect("a backend");
        slot
    }

    #[test]
    fn removing_one_of_five_backends_moves_only_its_keys_about_a_fifth() {
        let all = Ring::new(&members(5));
        // Backend 2 leaves; the others keep their slots.
        let rest: Vec<Member> = members(5).into_iter().filter(|m| m.slot != 2).collect();
        let fewer = Ring::new(&rest);
        let mut moved = 0;
        for key in keys(10_000) {
            let (before, after) = (unloaded(&all, key, 5), unloaded(&fewer, key, 5));
            if before != after {
                assert_eq!(before, 2, "key {key:#x} moved off a backend that stayed");
                moved += 1;
            }
        }
        let fraction = f64::from(moved) / 10_000.0;
        assert!((0.15..=0.25).contains(&fraction), "moved {fraction}");
    }

    #[test]
    fn a_key_moves_only_when_its_backend_is_full_or_closed() {
        let ring = Ring::new(&members(4));
        for key in keys(500) {
            let home = unloaded(&ring, key, 4);
            for other in (0..4).filter(|&s| s != home) {
                // Others loaded, closed or at their bound: the key stays home.
                let mut loads = idle(4);
                loads[other as usize] = Load {
                    in_flight: 3,
                    ..Load::default()
                };
                loads[home as usize].in_flight = 1;
                let chosen = choose(&ring, key, LoadFactor::DEFAULT, &loads).map(|c| c.0);
                assert_eq!(chosen, Some(home), "key {key:#x}");
            }
            // Home closed, or at its bound (4 of 4 in flight: bound ceil(1.25 * 5 / 4) = 2).
            let mut closed = idle(4);
            closed[home as usize].open = false;
            let mut full = idle(4);
            full[home as usize].in_flight = 4;
            for loads in [closed, full] {
                let (moved, _) = choose(&ring, key, LoadFactor::DEFAULT, &loads).expect("room");
                assert_ne!(moved, home);
            }
        }
    }

    #[test]
    fn a_closed_idle_backend_leaves_its_share_and_a_slow_one_gets_a_smaller_bound() {
        let ring = Ring::new(&members(2));
        // Slot 0 refuses (closed, holding nothing), slot 1 holds 2: the bound is slot 1's alone,
        // ceil(1.25 * 3), not ceil(1.25 * 3 / 2) = 2, which would leave it full.
        let mut loads = idle(2);
        loads[0].open = false;
        loads[1].in_flight = 2;
        for key in keys(50) {
            assert_eq!(
                choose(&ring, key, LoadFactor::DEFAULT, &loads),
                Some((1, 4))
            );
        }
        // Equal weights, slot 0 measured a third as fast: with 3 in flight on slot 1 it may
        // hold ceil(1.25 * 4 * 333 / 1333) = 2 where slot 1 may hold ceil(1.25 * 4 * 1000 / 1333)
        // = 4.
        let mut loads = idle(2);
        loads[0].speed = 333;
        loads[1].in_flight = 3;
        let chosen: std::collections::BTreeSet<(u32, u64)> = keys(200)
            .filter_map(|key| choose(&ring, key, LoadFactor::DEFAULT, &loads))
            .collect();
        assert_eq!(chosen, [(0, 2), (1, 4)].into());
    }

    #[test]
    fn no_backend_exceeds_the_bound_under_any_sequence_of_admits_and_releases() {
        // Unequal weights, all requests on few keys: the bound, not the hash, spreads them.
        let ring = Ring::new(&[
            Member {
                slot: 0,
                address: address(1),
                weight: 1,
            },
            Member {
                slot: 1,
                address: address(2),
                weight: 2,
            },
            Member {
                slot: 2,
                address: address(3),
                weight: 1,
            },
        ]);
        let weights = [1u64, 2, 1];
        for factor in [1.05, 1.25, 2.0] {
            let factor = LoadFactor::new(factor).expect("above 1");
            let mut loads = idle(3);
            let mut state = 7u64;
            for _ in 0..5_000 {
                state = splitmix64(state);
                let total: u64 = loads.iter().map(|l| l.in_flight).sum();
                // Mostly admits, a release now and then, so the load rises and falls.
                if state.is_multiple_of(4) && total > 0 {
                    let slot = (state >> 8) as usize % 3;
                    loads[slot].in_flight = loads[slot].in_flight.saturating_sub(1);
                    continue;
                }
                let key = state >> 60;
                let (slot, bound) =
                    choose(&ring, key, factor, &loads).expect("the bounds add up to more");
                let slot = slot as usize;
                loads[slot].in_flight += 1;
                assert!(loads[slot].in_flight <= bound);
                assert_eq!(bound, factor.capacity(total + 1, weights[slot], 4));
            }
        }
    }

    #[test]
    fn the_same_backend_set_in_any_slot_order_makes_the_same_choices() {
        let forward = members(5);
        // The same addresses in other slots, listed in another order.
        let permuted: Vec<Member> = forward
            .iter()
            .map(|m| Member {
                slot: (m.slot * 3 + 1) % 5,
                ..*m
            })
            .rev()
            .collect();
        let (a, b) = (Ring::new(&forward), Ring::new(&permuted));
        let address_of = |members: &[Member], slot: u32| {
            members.iter().find(|m| m.slot == slot).map(|m| m.address)
        };
        let mut loads_a = idle(5);
        let mut loads_b = idle(5);
        for key in keys(2_000) {
            let (sa, _) = choose(&a, key, LoadFactor::DEFAULT, &loads_a).expect("room");
            let (sb, _) = choose(&b, key, LoadFactor::DEFAULT, &loads_b).expect("room");
            assert_eq!(address_of(&forward, sa), address_of(&permuted, sb));
            // Loads follow the choices, so the bound binds the same way on both.
            loads_a[sa as usize].in_flight += 1;
            loads_b[sb as usize].in_flight += 1;
        }
    }

    #[test]
    fn weights_shape_the_shares_of_keys() {
        let mut weighted = members(3);
        weighted[0].weight = 3;
        let ring = Ring::new(&weighted);
        let on_heavy = keys(10_000)
            .filter(|&key| unloaded(&ring, key, 3) == 0)
            .count();
        // 3 of 5 weight units.
        assert!((5_400..=6_600).contains(&on_heavy), "{on_heavy}");
    }

    #[test]
    fn nothing_to_choose_when_every_backend_is_closed_or_the_ring_empty() {
        let ring = Ring::new(&members(2));
        let closed = vec![Load::default(); 2];
        assert_eq!(choose(&ring, 1, LoadFactor::DEFAULT, &closed), None);
        assert_eq!(
            choose(&Ring::new(&[]), 1, LoadFactor::DEFAULT, &idle(2)),
            None
        );
        assert!(Ring::new(&[]).is_empty());
    }

    fn spec(keys: Vec<AffinityKey>, prefix_bytes: usize) -> AffinitySpec {
        AffinitySpec {
            keys,
            prefix_bytes: std::num::NonZeroUsize::new(prefix_bytes).expect("not zero"),
            ..AffinitySpec::default()
        }
    }

    /// `key` over headers given as (name, value), names matched in any case.
    fn key_of(spec: &AffinitySpec, headers: &[(&str, &str)], body: &str, client: u8) -> u64 {
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_bytes())
        };
        key(
            spec,
            header,
            body.as_bytes(),
            Ipv4Addr::new(10, 9, 9, client),
        )
    }

    #[test]
    fn the_first_key_present_wins_and_the_client_address_is_the_last_resort() {
        let spec = AffinitySpec::default();
        let chat = r#"{"messages":[{"role":"system","content":"You are terse."}]}"#;
        let session = key_of(&spec, &[("X-Session-Id", "s1")], chat, 1);
        assert_eq!(
            session,
            key_of(
                &spec,
                &[("x-session-id", "s1"), ("authorization", "Bearer k")],
                "",
                2
            ),
            "the header wins over the API key, the prompt and the client; its name in any case"
        );
        assert_ne!(session, key_of(&spec, &[("x-session-id", "s2")], chat, 1));
        let api = key_of(&spec, &[("Authorization", "bearer  k ")], chat, 1);
        assert_eq!(api, key_of(&spec, &[("authorization", "Bearer k")], "", 2));
        assert_ne!(api, session);
        let prompt = key_of(&spec, &[("authorization", "Basic k")], chat, 1);
        assert_eq!(prompt, key_of(&spec, &[], chat, 2), "not a bearer token");
        let client = key_of(&spec, &[("x-session-id", "")], "not json", 1);
        assert_eq!(client, key_of(&spec, &[], r#"{"model":"m"}"#, 1));
        assert_ne!(client, key_of(&spec, &[], "", 2));
        // Only the configured sources count.
        let api_only = self::spec(vec![AffinityKey::ApiKey], 512);
        assert_eq!(
            key_of(&api_only, &[("x-session-id", "s1")], chat, 1),
            client
        );
    }

    #[test]
    fn the_prompt_prefix_is_of_canonical_json_and_cut_at_prefix_bytes() {
        let spec = spec(vec![AffinityKey::PromptPrefix], 40);
        let first = r#"{"messages":[{"role":"system","content":"You are a careful assistant."},{"role":"user","content":"hi"}]}"#;
        // Spaced and ordered otherwise, one more turn past the prefix, and other fields.
        let later = r#"{ "stream": true, "messages": [ {"content": "You are a careful assistant.", "role": "system"},
            {"role":"user","content":"hi"}, {"role":"assistant","content":"hello"} ] }"#;
        assert_eq!(key_of(&spec, &[], first, 1), key_of(&spec, &[], later, 2));
        let other = r#"{"messages":[{"role":"system","content":"You are a careless assistant."}]}"#;
        assert_ne!(key_of(&spec, &[], first, 1), key_of(&spec, &[], other, 1));
        let completion = r#"{"prompt":"Once upon a time"}"#;
        assert_eq!(
            key_of(&spec, &[], completion, 1),
            key_of(
                &spec,
                &[],
                r#"{"prompt": "Once upon a time", "n_predict": 8}"#,
                2
            )
        );
        assert_eq!(
            prompt_prefix(first.as_bytes(), 40).map(|p| p.len()),
            Some(40)
        );
        assert_eq!(
            prompt_prefix(br#"{"prompt":"ab"}"#, 40),
            Some(br#""ab""#.to_vec())
        );
        assert_eq!(prompt_prefix(br#"{"messages":null}"#, 40), None);
    }
}
