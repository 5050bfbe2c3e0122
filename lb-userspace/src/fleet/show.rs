//! `steer fleet get`: the fleet as etcd holds it, as text (or JSON, with every key's revision).

use std::fmt::Write;

use super::record::redacted;
use super::view::{Skipped, View};
use super::{FleetSpec, StoredKey};

/// The fleet in `view` as lines of text: hosts, instances, groups and rollouts, then the keys
/// an agent skips.
pub fn text(spec: &FleetSpec, view: &View, skipped: &[Skipped]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "fleet {} at revision {} ({} hosts, {} instances)",
        spec.prefix,
        view.revision,
        view.hosts.len(),
        view.instances.len()
    );
    for (name, host) in &view.hosts {
        let waiting = if host.not_serving.is_empty() {
            String::new()
        } else {
            format!(", waiting on {:?}", host.not_serving)
        };
        let _ = writeln!(
            out,
            "host {name}: steer {}, since {}{waiting}",
            host.version, host.since
        );
    }
    for ((host, name), record) in &view.instances {
        let group = record
            .group
            .as_ref()
            .map_or(String::new(), |g| format!(" group {g}"));
        let slots = record
            .slots
            .map_or(String::new(), |s| format!(" slots {s}"));
        let _ = writeln!(
            out,
            "instance {host}/{name}: {:?} {} in {} models {:?}{slots}{group}",
            record.state, record.address, record.service, record.models
        );
    }
    for (group, record) in &view.groups {
        let _ = writeln!(
            out,
            "group {group}: last good {} (rollout {})",
            record.args, record.rollout
        );
    }
    for (group, rollout) in &view.rollouts {
        let error = rollout
            .error
            .as_ref()
            .map_or(String::new(), |e| format!(": {e}"));
        let _ = writeln!(
            out,
            "rollout {group} {}: {:?} at step {} of {} by {}, args {}{error}",
            rollout.id,
            rollout.state,
            rollout.step + 1,
            rollout.order.len(),
            rollout.by,
            redacted(&rollout.args)
        );
    }
    for (group, lock) in &view.locks {
        let _ = writeln!(
            out,
            "lock {group}: held by {} for {}",
            lock.by, lock.rollout
        );
    }
    for why in skipped {
        let _ = writeln!(out, "skipped {why}");
    }
    out
}

/// Every key with its revision and lease (secret argument values redacted), and the keys
/// skipped, as JSON.
pub fn json(view: &View, stored: &[StoredKey], skipped: &[Skipped]) -> serde_json::Value {
    let keys: Vec<serde_json::Value> = stored
        .iter()
        .map(|k| {
            let mut key = serde_json::json!(k);
            if let Some(args) = key["value"].get("args").map(redacted) {
                key["value"]["args"] = args;
            }
            key
        })
        .collect();
    serde_json::json!({
        "revision": view.revision,
        "keys": keys,
        "skipped": skipped.iter().map(ToString::to_string).collect::<Vec<_>>(),
    })
}
