//! The fleet's keys in etcd, all under the fleet's prefix (`fleet.prefix`):
//!
//! - `<prefix>/hosts/<host>`: an agent that is up ([`HostRecord`]), under its lease;
//! - `<prefix>/instances/<host>/<instance>`: one of that agent's supervised llama-servers that
//!   serves a service ([`InstanceRecord`]), under the same lease;
//! - `<prefix>/groups/<group>`: an instance group's last good arguments ([`GroupRecord`]);
//! - `<prefix>/rollouts/<group>`: the group's latest rolling change ([`RolloutRecord`]), and
//!   `<prefix>/rollouts/<group>/<host>/<instance>` each instance's step of it ([`StepRecord`]);
//! - `<prefix>/locks/<group>`: held (under the coordinator's lease) while a change of the group
//!   rolls, so two never roll at once.
//!
//! Values are JSON. A reader ignores fields it does not know and reads an instance state it does
//! not know as not serving (a newer agent may add either), and a key or value it cannot read is
//! logged and skipped, never applied.

use std::net::SocketAddrV4;

use serde::{Deserialize, Serialize};

use crate::spec::is_fleet_name;
use crate::table::{BackendInfo, BackendStatus};

/// The fleet's key layout under one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

/// What a key under the prefix names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    Host(String),
    Instance {
        host: String,
        name: String,
    },
    Group(String),
    Rollout(String),
    Step {
        group: String,
        host: String,
        name: String,
    },
    Lock(String),
}

/// A record an agent writes for each supervised instance that is a backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// The service it is a backend of: every agent with a service of that name balances to it.
    pub service: String,
    /// Where balancers connect to it.
    pub address: SocketAddrV4,
    /// The models its `/v1/models` lists (empty until its first poll answered).
    #[serde(default)]
    pub models: Vec<String>,
    /// llama.cpp slots, once polled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
    pub state: InstanceState,
    /// Its decode speed as the agent's proxy measured it, rounded to whole tokens per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_tokens_per_second: Option<u32>,
    /// The instance group it is in (`group` in its `[[instance]]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// An instance group's last good arguments: those of the last rolling change every instance
/// took. A host that joins later starts its instances of the group with them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// The change, as `POST /v1/params` takes it (`{"--ctx-size": "4096", ...}`).
    pub args: serde_json::Value,
    /// The rollout that made them good.
    pub rollout: String,
}

/// A change's `args` (`{"--flag": value}`) for views: secret values (`--api-key`, ...)
/// replaced, as every other view of arguments has them.
pub fn redacted(args: &serde_json::Value) -> serde_json::Value {
    let mut out = args.clone();
    if let Some(flags) = out.as_object_mut() {
        for (flag, value) in flags.iter_mut() {
            if crate::supervisor::is_secret_flag(flag) && value.is_string() {
                *value = serde_json::Value::from(crate::supervisor::REDACTED);
            }
        }
    }
    out
}

/// A rolling change of a group's arguments: one instance at a time, in `order`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub id: String,
    /// The host whose agent coordinates it.
    pub by: String,
    pub args: serde_json::Value,
    pub state: RolloutState,
    /// Every instance of the group when it started, by host and name.
    pub order: Vec<(String, String)>,
    /// The index in `order` of the instance applying now (while running), else of the last one
    /// tried.
    pub step: usize,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutState {
    Running,
    /// Every instance took the change.
    Done,
    /// One did not; it was rolled back and the rest were left alone.
    Failed,
}

/// One instance's step of a rollout, written by its own agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub rollout: String,
    pub step: usize,
    pub applied: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// After a failure: whether the previous arguments came up again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored: Option<bool>,
}

/// Who holds a group's lock.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LockRecord {
    pub by: String,
    pub rollout: String,
}

/// An instance's state as its own agent sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Started, not healthy yet (loading its model): no traffic.
    Starting,
    /// Takes requests.
    Ready,
    /// Keeps what it has, takes nothing new (an apply or a stop is coming, or an operator's drain).
    Draining,
    /// Exited or failing its checks.
    Down,
    /// A state a newer agent writes that this one does not know: taken as not serving, so the
    /// record still reads.
    #[serde(other)]
    Unknown,
}

/// The record of a live agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    /// The agent's version.
    pub version: String,
    /// When it registered, in seconds since the epoch.
    pub since: u64,
    /// Its backends that should serve but do not yet (new, loading, failing their checks): a
    /// rolling change waits until no balancer lists the instance it just restarted.
    #[serde(default)]
    pub not_serving: Vec<SocketAddrV4>,
}

impl HostRecord {
    /// The record for `snapshot`, registered `since`.
    pub fn of(snapshot: &crate::table::Snapshot, since: u64) -> HostRecord {
        let mut not_serving: Vec<SocketAddrV4> = snapshot
            .backends
            .iter()
            .filter(|b| {
                matches!(
                    b.status,
                    BackendStatus::Unknown | BackendStatus::Loading | BackendStatus::Unhealthy
                )
            })
            .map(|b| b.address)
            .collect();
        not_serving.sort_unstable();
        not_serving.dedup();
        HostRecord {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            since,
            not_serving,
        }
    }
}

/// A key under the prefix that is not one of the fleet's.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not under the fleet's prefix")]
    Foreign,
    #[error(
        "not a fleet key (`hosts/<host>`, `instances/<host>/<instance>`, `groups/<group>`, \
         `rollouts/<group>[/<host>/<instance>]` or `locks/<group>`)"
    )]
    Unknown,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    /// The range every fleet key is in: `<prefix>/`.
    pub fn all(&self) -> String {
        format!("{}/", self.prefix)
    }

    pub fn host(&self, host: &str) -> String {
        format!("{}/hosts/{host}", self.prefix)
    }

    pub fn instance(&self, host: &str, name: &str) -> String {
        format!("{}/instances/{host}/{name}", self.prefix)
    }

    pub fn group(&self, group: &str) -> String {
        format!("{}/groups/{group}", self.prefix)
    }

    pub fn rollout(&self, group: &str) -> String {
        format!("{}/rollouts/{group}", self.prefix)
    }

    pub fn step(&self, group: &str, host: &str, name: &str) -> String {
        format!("{}/rollouts/{group}/{host}/{name}", self.prefix)
    }

    pub fn lock(&self, group: &str) -> String {
        format!("{}/locks/{group}", self.prefix)
    }

    #[cfg(test)]
    pub fn of(&self, key: &Key) -> String {
        match key {
            Key::Host(host) => self.host(host),
            Key::Instance { host, name } => self.instance(host, name),
            Key::Group(group) => self.group(group),
            Key::Rollout(group) => self.rollout(group),
            Key::Step { group, host, name } => self.step(group, host, name),
            Key::Lock(group) => self.lock(group),
        }
    }

    pub fn parse(&self, key: &[u8]) -> Result<Key, KeyError> {
        let key = std::str::from_utf8(key).map_err(|_| KeyError::Unknown)?;
        let rest = key
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or(KeyError::Foreign)?;
        let parts: Vec<&str> = rest.split('/').collect();
        if !parts[1..].iter().all(|p| is_fleet_name(p)) {
            return Err(KeyError::Unknown);
        }
        let owned = |i: usize| parts[i].to_owned();
        match parts.as_slice() {
            ["hosts", _] => Ok(Key::Host(owned(1))),
            ["instances", _, _] => Ok(Key::Instance {
                host: owned(1),
                name: owned(2),
            }),
            ["groups", _] => Ok(Key::Group(owned(1))),
            ["rollouts", _] => Ok(Key::Rollout(owned(1))),
            ["rollouts", _, _, _] => Ok(Key::Step {
                group: owned(1),
                host: owned(2),
                name: owned(3),
            }),
            ["locks", _] => Ok(Key::Lock(owned(1))),
            _ => Err(KeyError::Unknown),
        }
    }
}

impl InstanceRecord {
    /// The record of a supervised instance's backend (in `group`, if the instance is in one);
    /// `None` for any other backend.
    pub fn of(
        backend: &BackendInfo,
        group: impl FnOnce(&str) -> Option<String>,
    ) -> Option<(String, InstanceRecord)> {
        let name = backend.instance.clone()?;
        let state = match backend.status {
            BackendStatus::Healthy | BackendStatus::Ejected => InstanceState::Ready,
            BackendStatus::Draining => InstanceState::Draining,
            BackendStatus::Unknown | BackendStatus::Loading => InstanceState::Starting,
            BackendStatus::Unhealthy => InstanceState::Down,
        };
        let speed = backend.requests.speed.backend.decode_tokens_per_second;
        let group = group(&name);
        Some((
            name,
            InstanceRecord {
                service: backend.service.clone(),
                address: backend.address,
                models: backend.models.clone(),
                slots: backend.total_slots,
                state,
                decode_tokens_per_second: speed
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(|s| s.round().min(f64::from(u32::MAX)) as u32),
                group,
            },
        ))
    }

    /// Equal but for the measured speed, which alone is not worth a write each request.
    pub fn same_but_speed(&self, other: &InstanceRecord) -> bool {
        InstanceRecord {
            decode_tokens_per_second: other.decode_tokens_per_second,
            ..self.clone()
        } == *other
    }

    /// Whether balancers send it anything: ready, or draining (its flows stay).
    pub fn is_serving(&self) -> bool {
        matches!(self.state, InstanceState::Ready | InstanceState::Draining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_anything_else_is_refused() {
        let keys = Keys::new("/steer/fleet/prod");
        let instance = Key::Instance {
            host: "gpu-a".into(),
            name: "qwen-0".into(),
        };
        assert_eq!(
            keys.of(&instance),
            "/steer/fleet/prod/instances/gpu-a/qwen-0"
        );
        assert_eq!(
            keys.parse(keys.of(&instance).as_bytes()).ok(),
            Some(instance)
        );
        for key in [
            Key::Host("gpu-a".into()),
            Key::Group("smol".into()),
            Key::Rollout("smol".into()),
            Key::Step {
                group: "smol".into(),
                host: "gpu-a".into(),
                name: "qwen-0".into(),
            },
            Key::Lock("smol".into()),
        ] {
            assert_eq!(keys.parse(keys.of(&key).as_bytes()).ok(), Some(key));
        }
        for foreign in ["/steer/fleet/production/hosts/a", "/other/hosts/a", ""] {
            assert!(
                matches!(keys.parse(foreign.as_bytes()), Err(KeyError::Foreign)),
                "{foreign}"
            );
        }
        for unknown in [
            &b"/steer/fleet/prod/hosts/"[..],
            b"/steer/fleet/prod/hosts/a/b",
            b"/steer/fleet/prod/instances/a",
            b"/steer/fleet/prod/instances/a/b/c",
            b"/steer/fleet/prod/instances/a/../b",
            b"/steer/fleet/prod/services/chat",
            b"/steer/fleet/prod/rollouts/g/h",
            b"/steer/fleet/prod/locks/g/h",
            b"/steer/fleet/prod/hosts/\xff",
        ] {
            assert!(
                matches!(keys.parse(unknown), Err(KeyError::Unknown)),
                "{}",
                String::from_utf8_lossy(unknown)
            );
        }
    }

    #[test]
    fn a_record_reads_with_fields_and_states_it_does_not_know_and_not_without_its_own() {
        let text = r#"{"service":"chat","address":"10.0.0.2:8080","models":["m"],
            "state":"ready","decode_tokens_per_second":41,"added_later":true}"#;
        let record: InstanceRecord = serde_json::from_str(text).expect("record");
        assert_eq!(record.state, InstanceState::Ready);
        assert_eq!(record.decode_tokens_per_second, Some(41));
        assert!(serde_json::from_str::<InstanceRecord>(r#"{"service":"chat"}"#).is_err());
        let later: InstanceRecord = serde_json::from_str(
            r#"{"service":"chat","address":"10.0.0.2:8080","state":"hibernating"}"#,
        )
        .expect("a state from a newer agent");
        assert_eq!(later.state, InstanceState::Unknown);
        assert!(!later.is_serving());
    }
}
