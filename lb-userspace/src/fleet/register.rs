//! This agent in the fleet: a lease kept alive, the host key and a record per supervised
//! instance under it, each record rewritten as soon as the table's view of its backend changes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio::sync::watch as signal;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::record::{HostRecord, InstanceRecord};
use super::{Etcd, FleetError, FleetStatus, RETRY_MIN, backoff, stopped};
use crate::table::{Snapshot, TableHandle};

/// A record whose only change is its measured speed is rewritten at most this often.
const SPEED_REFRESH: Duration = Duration::from_secs(30);

/// Registers until `stop`, then revokes the lease. A failed session (a member gone, etcd
/// unreachable) is retried on the same client, resuming the same lease while etcd still has it,
/// so a failover within the TTL leaves the registration as it was; a lease that expired is
/// replaced and every record written again.
pub(super) async fn run(
    etcd: Arc<Etcd>,
    table: TableHandle,
    status: Arc<FleetStatus>,
    groups: BTreeMap<String, String>,
    mut stop: signal::Receiver<bool>,
) {
    let mut delay = RETRY_MIN;
    let mut client = None;
    // This run's last lease: resumed if alive; its host key is ours to take over.
    let mut previous = None;
    let mut lost_since: Option<Instant> = None;
    // What the last session wrote, kept while its lease lives on.
    let mut published = BTreeMap::new();
    let mut host = None;
    let mut failures = 0;
    loop {
        let mut session = Session {
            etcd: &etcd,
            table: &table,
            status: &status,
            groups: &groups,
            lease: None,
            published: std::mem::take(&mut published),
            host: host.take(),
        };
        let result = session
            .run(
                &mut client,
                previous,
                &mut stop,
                &mut lost_since,
                &mut delay,
            )
            .await;
        previous = session.lease.or(previous);

        published = std::mem::take(&mut session.published);
        host = session.host.take();
        status.update(|inner| inner.lease = None);
        match result {
            Ok(()) => return,
            Err(error) => {
                // A session that registered (and cleared `lost_since`) counts from zero.
                failures = if lost_since.is_none() {
                    1
                } else {
                    failures + 1
                };
                if failures > 1 {
                    // Retried once on the same client (its other endpoints); then a new one.
                    client = None;
                }
                if lost_since.is_none() {
                    lost_since = Some(Instant::now());
                    if previous.is_some() {
                        warn!(%error, "fleet registration interrupted: retrying; other balancers keep this host's instances until its lease expires");
                    } else {
                        warn!(%error, "cannot register in the fleet: retrying");
                    }
                } else {
                    debug!(%error, "fleet registration: still no answer");
                }
                if !backoff(&mut delay, &mut stop).await {
                    return;
                }
            }
        }
    }
}

struct Session<'a> {
    etcd: &'a Etcd,
    table: &'a TableHandle,
    status: &'a FleetStatus,
    /// Each local instance's group, by instance name.
    groups: &'a BTreeMap<String, String>,
    lease: Option<i64>,
    /// Each instance's record as last written under `lease`, and when.
    published: BTreeMap<String, (InstanceRecord, Instant)>,
    /// The host record as last written under `lease`.
    host: Option<HostRecord>,
}

impl Session<'_> {
    async fn run(
        &mut self,
        client: &mut Option<Client>,
        previous: Option<i64>,
        stop: &mut signal::Receiver<bool>,
        lost_since: &mut Option<Instant>,
        delay: &mut Duration,
    ) -> Result<(), FleetError> {
        let etcd = self.etcd;
        let client = match client {
            Some(client) => client,
            None => client.insert(etcd.connect().await?),
        };
        let ttl = etcd.spec.lease_ttl;
        let resumed = match previous {
            Some(old) => match etcd.timed(client.lease_keep_alive(old)).await {
                Ok(kept) => Some((old, kept)),
                Err(FleetError::Etcd {
                    source: etcd_client::Error::LeaseKeepAliveError(_),
                    ..
                }) => None,
                Err(error) => return Err(error),
            },
            None => None,
        };
        let (lease, (mut keeper, mut replies)) = match resumed {
            Some(resumed) => resumed,
            None => {
                // A new lease: nothing is written under it yet.
                self.published.clear();
                self.host = None;
                let lease = etcd
                    .timed(client.lease_grant(ttl.as_secs() as i64, None))
                    .await?
                    .id();
                (lease, etcd.timed(client.lease_keep_alive(lease)).await?)
            }
        };
        self.lease = Some(lease);
        let mut snapshots = self.table.subscribe();
        let snapshot = snapshots.borrow_and_update().clone();
        if self.host.is_none() {
            self.claim_host(client, lease, previous, &snapshot).await?;
        }
        self.publish(client, &snapshot).await?;
        if let Some(old) = previous.filter(|&old| old != lease) {
            // Whatever the last lease held that this one did not write again.
            let _ = etcd.timed(client.lease_revoke(old)).await;
        }
        self.status.update(|inner| inner.lease = Some(lease));
        match lost_since.take() {
            Some(since) => info!(
                lease = format!("{lease:x}"),
                resumed = Some(lease) == previous,
                down = ?since.elapsed(),
                "fleet registration back"
            ),
            None => {
                info!(host = %etcd.spec.host, lease = format!("{lease:x}"), ttl = ?ttl, "registered in the fleet")
            }
        }
        *delay = super::RETRY_MIN;
        let mut renew = tokio::time::interval(ttl / 3);
        loop {
            tokio::select! {
                _ = renew.tick() => {
                    etcd.renew_once(&mut keeper, &mut replies).await?;
                    self.status.update(|inner| {
                        inner.lease_renewals += 1;
                        if inner.watching {
                            inner.confirmed = Some(Instant::now());
                        }
                    });
                }
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        // The table stopped: the agent is going away.
                        return self.revoke(client, lease).await;
                    }
                    let snapshot = snapshots.borrow_and_update().clone();
                    self.publish(client, &snapshot).await?;
                }
                () = stopped(stop) => {
                    let snapshot = snapshots.borrow_and_update().clone();
                    // The instances' last states (stopped) go out before the lease.
                    let _ = self.publish(client, &snapshot).await;
                    return self.revoke(client, lease).await;
                }
            }
        }
    }

    /// Puts the host key under `lease`, unless another live lease holds it.
    async fn claim_host(
        &mut self,
        client: &mut Client,
        lease: i64,
        previous: Option<i64>,
        snapshot: &Snapshot,
    ) -> Result<(), FleetError> {
        let etcd = self.etcd;
        let key = etcd.keys.host(&etcd.spec.host);
        let record = HostRecord::of(snapshot, super::epoch_now() as u64);
        let value = serde_json::to_vec(&record).unwrap_or_default();
        let put = TxnOp::put(
            key.as_str(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        );
        let mut holders = vec![Compare::version(key.as_str(), CompareOp::Equal, 0)];
        holders.extend(previous.map(|old| Compare::lease(key.as_str(), CompareOp::Equal, old)));
        for holder in holders {
            let txn = Txn::new().when([holder]).and_then([put.clone()]);
            if etcd.timed(client.txn(txn)).await?.succeeded() {
                self.host = Some(record);
                return Ok(());
            }
        }
        let held = etcd.timed(client.get(key.as_str(), None)).await?;
        let lease = held.kvs().first().map_or(0, |kv| kv.lease());
        Err(FleetError::HostTaken { key, lease })
    }

    /// Writes the records that changed since the last write and deletes the ones gone, in one
    /// transaction.
    async fn publish(
        &mut self,
        client: &mut Client,
        snapshot: &Snapshot,
    ) -> Result<(), FleetError> {
        let Some(lease) = self.lease else {
            return Ok(());
        };
        let etcd = self.etcd;
        let now = Instant::now();
        let current: BTreeMap<String, InstanceRecord> = snapshot
            .backends
            .iter()
            .filter_map(|b| InstanceRecord::of(b, |name| self.groups.get(name).cloned()))
            .collect();
        let mut ops = Vec::new();
        let mut written = Vec::new();
        for (name, record) in &current {
            let due = match self.published.get(name) {
                None => true,
                Some((old, at)) => {
                    !old.same_but_speed(record)
                        || (old != record && now.duration_since(*at) >= SPEED_REFRESH)
                }
            };
            if due {
                let value = serde_json::to_vec(record).unwrap_or_default();
                let key = etcd.keys.instance(&etcd.spec.host, name);
                ops.push(TxnOp::put(
                    key,
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                ));
                written.push(name.clone());
            }
        }
        let gone: Vec<String> = self
            .published
            .keys()
            .filter(|name| !current.contains_key(*name))
            .cloned()
            .collect();
        for name in &gone {
            ops.push(TxnOp::delete(
                etcd.keys.instance(&etcd.spec.host, name),
                None,
            ));
        }
        let host = self
            .host
            .as_ref()
            .map(|old| HostRecord::of(snapshot, old.since))
            .filter(|new| self.host.as_ref() != Some(new));
        if let Some(host) = &host {
            let value = serde_json::to_vec(host).unwrap_or_default();
            let key = etcd.keys.host(&etcd.spec.host);
            ops.push(TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease)),
            ));
        }
        if ops.is_empty() {
            return Ok(());
        }
        etcd.timed(client.txn(Txn::new().and_then(ops))).await?;
        if host.is_some() {
            self.host = host;
        }
        for name in gone {
            self.published.remove(&name);
        }
        for name in written {
            let state = current[&name].state;
            info!(instance = %name, ?state, "fleet record written");
            self.published
                .insert(name.clone(), (current[&name].clone(), now));
        }
        Ok(())
    }

    async fn revoke(&self, client: &mut Client, lease: i64) -> Result<(), FleetError> {
        match self.etcd.timed(client.lease_revoke(lease)).await {
            Ok(_) => info!(lease = format!("{lease:x}"), "left the fleet"),
            Err(error) => warn!(%error, "leaving the fleet: the lease expires on its own"),
        }
        Ok(())
    }
}
