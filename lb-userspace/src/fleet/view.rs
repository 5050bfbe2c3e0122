//! The fleet as this agent last read it from etcd, and the backends it asks of this agent.
//! Pure: the watch feeds it puts and deletes, the cache saves and restores it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddrV4;

use serde::{Deserialize, Serialize};

use super::record::{
    GroupRecord, HostRecord, InstanceRecord, Key, KeyError, Keys, LockRecord, RolloutRecord,
    StepRecord,
};

/// Every readable fleet key and the etcd revision the view is current to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct View {
    pub revision: i64,
    /// The etcd cluster it came from (its id; 0: not known): a view is resumed only on the same
    /// cluster.
    pub cluster: u64,
    pub hosts: BTreeMap<String, HostRecord>,
    /// By (host, instance).
    pub instances: BTreeMap<(String, String), InstanceRecord>,
    pub groups: BTreeMap<String, GroupRecord>,
    pub rollouts: BTreeMap<String, RolloutRecord>,
    /// By (group, host, instance).
    pub steps: BTreeMap<(String, String, String), StepRecord>,
    pub locks: BTreeMap<String, LockRecord>,
}

/// A key that was not applied, and why.
#[derive(Debug, thiserror::Error)]
pub enum Skipped {
    #[error("{key}: {source}")]
    Key {
        key: String,
        #[source]
        source: KeyError,
    },
    #[error("{key}: not a fleet record: {source}")]
    Value {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A backend the fleet asks of this agent: another host's instance of a service it has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub host: String,
    pub instance: String,
    pub draining: bool,
    pub models: Vec<String>,
}

/// A service and a backend address in it.
pub type BackendKey = (String, SocketAddrV4);

/// The view as the local cache keeps it: the entries as etcd holds them.
#[derive(Debug, Serialize, Deserialize)]
pub struct Cached {
    pub revision: i64,
    #[serde(default)]
    pub cluster: u64,
    /// When the view was last known current, in seconds since the epoch.
    #[serde(default)]
    pub confirmed: f64,
    pub entries: BTreeMap<String, serde_json::Value>,
}

impl View {
    /// A put of `key`. A key or value that cannot be read is skipped, and what the key held
    /// before is forgotten: it no longer says what it said.
    pub fn put(&mut self, keys: &Keys, key: &[u8], value: &[u8]) -> Result<(), Skipped> {
        let parsed = self.delete(keys, key)?;
        let bad_value = |source| Skipped::Value {
            key: String::from_utf8_lossy(key).into_owned(),
            source,
        };
        fn read<T: serde::de::DeserializeOwned>(value: &[u8]) -> Result<T, serde_json::Error> {
            serde_json::from_slice(value)
        }
        match parsed {
            Key::Host(host) => {
                self.hosts.insert(host, read(value).map_err(bad_value)?);
            }
            Key::Instance { host, name } => {
                self.instances
                    .insert((host, name), read(value).map_err(bad_value)?);
            }
            Key::Group(group) => {
                self.groups.insert(group, read(value).map_err(bad_value)?);
            }
            Key::Rollout(group) => {
                self.rollouts.insert(group, read(value).map_err(bad_value)?);
            }
            Key::Step { group, host, name } => {
                self.steps
                    .insert((group, host, name), read(value).map_err(bad_value)?);
            }
            Key::Lock(group) => {
                self.locks.insert(group, read(value).map_err(bad_value)?);
            }
        }
        Ok(())
    }

    /// A delete of `key` (or the first half of a put).
    pub fn delete(&mut self, keys: &Keys, key: &[u8]) -> Result<Key, Skipped> {
        let parsed = keys.parse(key).map_err(|source| Skipped::Key {
            key: String::from_utf8_lossy(key).into_owned(),
            source,
        })?;
        match parsed.clone() {
            Key::Host(host) => drop(self.hosts.remove(&host)),
            Key::Instance { host, name } => drop(self.instances.remove(&(host, name))),
            Key::Group(group) => drop(self.groups.remove(&group)),
            Key::Rollout(group) => drop(self.rollouts.remove(&group)),
            Key::Step { group, host, name } => drop(self.steps.remove(&(group, host, name))),
            Key::Lock(group) => drop(self.locks.remove(&group)),
        }
        Ok(parsed)
    }

    /// The backends the fleet asks of the agent of `own_host` with `services`: every other
    /// registered host's instance that serves (ready or draining) in one of them. The agent's
    /// own instances are its supervisor's. Two records of one address in one service (a stale
    /// key beside a new one) make one backend, draining only if both are.
    pub fn wanted(
        &self,
        own_host: &str,
        services: &BTreeSet<String>,
    ) -> BTreeMap<BackendKey, Wanted> {
        let mut wanted: BTreeMap<BackendKey, Wanted> = BTreeMap::new();
        for ((host, name), record) in &self.instances {
            // A record without its host's key (which lives under the same lease) is a stray
            // one, left by some other writer: no agent keeps it alive, so it is not a backend.
            let registered = self.hosts.contains_key(host);
            if host == own_host
                || !registered
                || !record.is_serving()
                || !services.contains(&record.service)
            {
                continue;
            }
            let draining = record.state == super::record::InstanceState::Draining;
            wanted
                .entry((record.service.clone(), record.address))
                .and_modify(|w| w.draining &= draining)
                .or_insert_with(|| Wanted {
                    host: host.clone(),
                    instance: name.clone(),
                    draining,
                    models: record.models.clone(),
                });
        }
        wanted
    }

    /// The view as the cache keeps it, last known current at `confirmed` (epoch seconds).
    pub fn to_cached(&self, keys: &Keys, confirmed: f64) -> Cached {
        let mut entries = BTreeMap::new();
        for (host, record) in &self.hosts {
            entries.insert(keys.host(host), serde_json::json!(record));
        }
        for ((host, name), record) in &self.instances {
            entries.insert(keys.instance(host, name), serde_json::json!(record));
        }
        for (group, record) in &self.groups {
            entries.insert(keys.group(group), serde_json::json!(record));
        }
        for (group, record) in &self.rollouts {
            entries.insert(keys.rollout(group), serde_json::json!(record));
        }
        for ((group, host, name), record) in &self.steps {
            entries.insert(keys.step(group, host, name), serde_json::json!(record));
        }
        // Locks live under their holder's lease: a cached one would be stale at once.
        Cached {
            revision: self.revision,
            cluster: self.cluster,
            confirmed,
            entries,
        }
    }

    /// The view a cache holds; its unreadable entries are skipped as a watch skips them.
    pub fn from_cached(keys: &Keys, cached: &Cached) -> (View, Vec<Skipped>) {
        let mut view = View {
            revision: cached.revision,
            cluster: cached.cluster,
            ..View::default()
        };
        let mut skipped = Vec::new();
        for (key, value) in &cached.entries {
            let value = serde_json::to_vec(value).unwrap_or_default();
            if let Err(why) = view.put(keys, key.as_bytes(), &value) {
                skipped.push(why);
            }
        }
        (view, skipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(service: &str, address: &str, state: &str) -> Vec<u8> {
        format!(
            r#"{{"service":"{service}","address":"{address}","models":["m"],"state":"{state}"}}"#
        )
        .into_bytes()
    }

    #[test]
    fn other_hosts_serving_instances_of_known_services_are_wanted() {
        let keys = Keys::new("/f");
        let mut view = View::default();
        for host in ["a", "b", "c", "me"] {
            let key = format!("/f/hosts/{host}");
            view.put(&keys, key.as_bytes(), br#"{"version":"1","since":5}"#)
                .expect("host");
        }
        let puts = [
            (
                "/f/instances/stray/x",
                record("chat", "10.0.0.8:8080", "ready"),
            ),
            ("/f/instances/a/x", record("chat", "10.0.0.1:8080", "ready")),
            (
                "/f/instances/b/x",
                record("chat", "10.0.0.2:8080", "draining"),
            ),
            (
                "/f/instances/b/y",
                record("chat", "10.0.0.3:8080", "starting"),
            ),
            ("/f/instances/c/x", record("code", "10.0.0.4:8080", "ready")),
            (
                "/f/instances/me/x",
                record("chat", "10.0.0.9:8080", "ready"),
            ),
        ];
        for (key, value) in &puts {
            view.put(&keys, key.as_bytes(), value).expect("put");
        }
        let services = BTreeSet::from(["chat".to_owned()]);
        let wanted = view.wanted("me", &services);
        let addresses: Vec<_> = wanted
            .iter()
            .map(|((_, a), w)| (a.to_string(), w.draining))
            .collect();
        assert_eq!(
            addresses,
            [
                ("10.0.0.1:8080".to_owned(), false),
                ("10.0.0.2:8080".to_owned(), true)
            ]
        );
        view.delete(&keys, b"/f/instances/a/x").expect("delete");
        assert_eq!(view.wanted("me", &services).len(), 1);
    }

    #[test]
    fn garbage_is_skipped_and_forgets_what_the_key_held() {
        let keys = Keys::new("/f");
        let mut view = View::default();
        view.put(
            &keys,
            b"/f/instances/a/x",
            &record("chat", "10.0.0.1:8080", "ready"),
        )
        .expect("put");
        let skipped = view.put(&keys, b"/f/instances/a/x", b"{not json");
        assert!(matches!(skipped, Err(Skipped::Value { .. })), "{skipped:?}");
        assert!(view.instances.is_empty());
        assert!(matches!(
            view.put(&keys, b"/f/nonsense", b"{}"),
            Err(Skipped::Key { .. })
        ));
        assert!(matches!(
            view.put(&keys, b"/g/hosts/a", b"{}"),
            Err(Skipped::Key { .. })
        ));
    }

    #[test]
    fn the_cache_round_trips_the_view() {
        let keys = Keys::new("/f");
        let mut view = View {
            revision: 42,
            ..View::default()
        };
        view.put(
            &keys,
            b"/f/instances/a/x",
            &record("chat", "10.0.0.1:8080", "ready"),
        )
        .expect("put");
        view.put(&keys, b"/f/hosts/a", br#"{"version":"1","since":5}"#)
            .expect("put");
        let text = serde_json::to_string(&view.to_cached(&keys, 1.0)).expect("json");
        let cached: Cached = serde_json::from_str(&text).expect("cached");
        let (back, skipped) = View::from_cached(&keys, &cached);
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(back, view);
    }
}
