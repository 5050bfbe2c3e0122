//! Rolling changes of an instance group's arguments across the fleet, one instance at a time.
//!
//! Any agent coordinates a change it is given (`POST /v1/fleet/groups/<group>/params`): it takes
//! the group's lock (a key under its own lease, so a coordinator that dies frees it within the
//! TTL; a second change waits for it), then for each instance of the group in turn writes the
//! rollout record naming that instance and waits for its step record. Each agent's watch sees
//! the record; the agent whose instance is named applies the change through its own supervisor
//! (its policy, its drain, its health check and rollback) and writes the step record. The first
//! failure stops the rollout (the supervisor has rolled that instance back); a rollout every
//! instance took makes its arguments the group's last good ones, which every agent applies to
//! its instances of the group that were not part of it (a host that joined later).
//!
//! Everything is in etcd, so any agent, or a restarted one, can tell where a rollout stands. An
//! agent restarted in the middle of its step applies the change again (a no-op once applied).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::record::{GroupRecord, LockRecord, RolloutRecord, RolloutState, StepRecord};
use super::view::View;
use super::{Etcd, FleetError, FleetStatus};
use crate::supervisor::{InputArgs, InstanceHandle, Outcome};

/// How long a change waits for another change of its group to finish.
const LOCK_WAIT: Duration = Duration::from_secs(30 * 60);
/// How long one instance may take to apply a change (drain, restart, load its model).
const STEP_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// How often a coordinator looks at its view (which the watch keeps current) for a step's
/// record, and at the lock while another change holds it.
const POLL: Duration = Duration::from_millis(100);
const LOCK_POLL: Duration = Duration::from_millis(500);
/// How many times (a second apart) a rollout record is written while etcd does not answer.
const WRITE_TRIES: usize = 30;
/// After a step, how long the balancers have to list the instance (back in their tables from
/// the same revision the step came after) before their lists are read, and then to take it
/// back (their health checks pass).
const SETTLE: Duration = Duration::from_secs(1);
const REJOIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a rollout could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("the change is not a set of llama-server arguments: {0}")]
    Args(#[source] serde_json::Error),
    #[error("group `{0}` has no instance in the fleet")]
    NoInstance(String),
    #[error("`{0}` is not a group name (letters, digits, `.`, `_` or `-`)")]
    Group(String),
}

/// A change `args` for `group` checked and handed to its coordinator task; its rollout id.
pub(super) fn start(
    etcd: &Arc<Etcd>,
    status: &Arc<FleetStatus>,
    group: &str,
    args: serde_json::Value,
) -> Result<String, RolloutError> {
    if !crate::spec::is_fleet_name(group) {
        return Err(RolloutError::Group(group.to_owned()));
    }
    serde_json::from_value::<InputArgs>(args.clone()).map_err(RolloutError::Args)?;
    let view = status.view();
    if !view
        .instances
        .values()
        .any(|i| i.group.as_deref() == Some(group))
    {
        return Err(RolloutError::NoInstance(group.to_owned()));
    }
    let millis = (super::epoch_now() * 1000.0) as u64;
    // Unique even for two changes in one millisecond.
    static STARTED: AtomicU64 = AtomicU64::new(0);
    let n = STARTED.fetch_add(1, Ordering::Relaxed);
    let id = format!("{}-{millis}-{n}", etcd.spec.host);
    let coordinator = Coordinator {
        etcd: Arc::clone(etcd),
        status: Arc::clone(status),
        group: group.to_owned(),
        args,
        id: id.clone(),
    };
    tokio::spawn(coordinator.run());
    Ok(id)
}

struct Coordinator {
    etcd: Arc<Etcd>,
    status: Arc<FleetStatus>,
    group: String,
    args: serde_json::Value,
    id: String,
}

impl Coordinator {
    async fn run(self) {
        let (group, id) = (self.group.clone(), self.id.clone());
        match self.roll().await {
            Ok(RolloutState::Done) => info!(%group, rollout = %id, "rolling change done"),
            Ok(state) => warn!(%group, rollout = %id, ?state, "rolling change stopped"),
            Err(error) => warn!(%group, rollout = %id, %error, "rolling change abandoned"),
        }
    }

    async fn roll(&self) -> Result<RolloutState, FleetError> {
        let etcd = &self.etcd;
        let mut client = etcd.connect().await?;
        let ttl = etcd.spec.lease_ttl;
        let lease = etcd
            .timed(client.lease_grant(ttl.as_secs() as i64, None))
            .await?
            .id();
        // The lock lives while the lease does; `lost` turns true once etcd no longer has it.
        let lost = Arc::new(AtomicBool::new(false));
        let renewing = tokio::spawn(renew(
            Arc::clone(&self.etcd),
            client.clone(),
            lease,
            Arc::clone(&lost),
        ));
        let rolled = Locked {
            coordinator: self,
            client: client.clone(),
            lease,
            lost,
        }
        .roll()
        .await;
        renewing.abort();
        let _ = etcd.timed(client.lease_revoke(lease)).await;
        rolled
    }
}

/// Keeps `lease` alive, resuming the keep-alive on another endpoint after an error, until etcd
/// says the lease is gone: then `lost`.
async fn renew(etcd: Arc<Etcd>, mut client: Client, lease: i64, lost: Arc<AtomicBool>) {
    let every = etcd.spec.lease_ttl / 3;
    loop {
        match etcd.timed(client.lease_keep_alive(lease)).await {
            Ok((mut keeper, mut replies)) => loop {
                tokio::time::sleep(every).await;
                match etcd.renew_once(&mut keeper, &mut replies).await {
                    Ok(()) => {}
                    Err(FleetError::LeaseExpired) => {
                        lost.store(true, Ordering::SeqCst);
                        return;
                    }
                    Err(error) => {
                        debug!(%error, "renewing a rollout's lease: resuming");
                        break;
                    }
                }
            },
            Err(FleetError::Etcd {
                source: etcd_client::Error::LeaseKeepAliveError(_),
                ..
            }) => {
                lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(error) => debug!(%error, "renewing a rollout's lease: retrying"),
        }
        tokio::time::sleep(super::RETRY_MIN).await;
    }
}

/// A coordinator's work while it holds the group's lock under `lease`.
struct Locked<'a> {
    coordinator: &'a Coordinator,
    client: Client,
    lease: i64,
    lost: Arc<AtomicBool>,
}

impl Locked<'_> {
    async fn roll(mut self) -> Result<RolloutState, FleetError> {
        let this = self.coordinator;
        let keys = &this.etcd.keys;
        this.lock(&mut self.client, self.lease).await?;
        let view = this.status.view();
        let order: Vec<(String, String)> = view
            .instances
            .iter()
            .filter(|(_, i)| i.group.as_deref() == Some(this.group.as_str()))
            .map(|(key, _)| key.clone())
            .collect();
        let mut record = RolloutRecord {
            id: this.id.clone(),
            by: this.etcd.spec.host.clone(),
            args: this.args.clone(),
            state: RolloutState::Running,
            order: order.clone(),
            step: 0,
            error: None,
        };
        info!(group = %this.group, rollout = %this.id, instances = order.len(), "rolling change started");
        if order.is_empty() {
            record.state = RolloutState::Failed;
            record.error = Some("no instance of the group is in the fleet".to_owned());
        }
        for (step, (host, name)) in order.iter().enumerate() {
            record.step = step;
            self.write(&keys.rollout(&this.group), &record).await?;
            let outcome = match this.wait_step(step, host, name, &self.lost).await {
                Ok(()) => {
                    info!(group = %this.group, %host, instance = %name, step, "instance took the change");
                    // Healthy on its host; the next goes out once every balancer took it back.
                    this.wait_rejoined(host, name, &self.lost).await
                }
                Err(error) => Err(error),
            };
            if let Err(error) = outcome {
                record.state = RolloutState::Failed;
                record.error = Some(format!("{host}/{name}: {error}"));
                break;
            }
        }
        if record.state == RolloutState::Running {
            record.state = RolloutState::Done;
            let good = self.merged_args().await?;
            self.write(&keys.group(&this.group), &good).await?;
        }
        self.write(&keys.rollout(&this.group), &record).await?;
        let unlock = TxnOp::delete(keys.lock(&this.group), None);
        let txn = Txn::new().when([self.holding()]).and_then([unlock]);
        let _ = this.etcd.timed(self.client.txn(txn)).await;
        Ok(record.state)
    }

    /// The group's arguments so far, read from etcd under the lock, with this change over them:
    /// a host that joins later gets every change, not the last one alone.
    async fn merged_args(&mut self) -> Result<GroupRecord, FleetError> {
        let this = self.coordinator;
        let key = this.etcd.keys.group(&this.group);
        let current: Option<GroupRecord> = this.etcd.get_json(&mut self.client, key).await?;
        let mut args = current.map_or_else(|| serde_json::json!({}), |g| g.args);
        if let (Some(all), Some(change)) = (args.as_object_mut(), this.args.as_object()) {
            all.extend(change.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        Ok(GroupRecord {
            args,
            rollout: this.id.clone(),
        })
    }

    /// The lock is still this coordinator's: its key under this lease.
    fn holding(&self) -> Compare {
        let key = self.coordinator.etcd.keys.lock(&self.coordinator.group);
        Compare::lease(key, CompareOp::Equal, self.lease)
    }

    /// Puts `value` at `key` only while the lock is held (a coordinator that lost it writes
    /// nothing more), trying again for up to [`WRITE_TRIES`] seconds while etcd does not answer.
    async fn write(&mut self, key: &str, value: &impl serde::Serialize) -> Result<(), FleetError> {
        let this = self.coordinator;
        let value = serde_json::to_vec(value).unwrap_or_default();
        let mut last = None;
        for _ in 0..WRITE_TRIES {
            let txn =
                Txn::new()
                    .when([self.holding()])
                    .and_then([TxnOp::put(key, value.clone(), None)]);
            match this.etcd.timed(self.client.txn(txn)).await {
                Ok(done) if done.succeeded() => return Ok(()),
                Ok(_) => {
                    return Err(FleetError::LockLost {
                        group: this.group.clone(),
                    });
                }
                Err(error) => {
                    debug!(%error, %key, "writing a rollout record: retrying");
                    last = Some(error);
                }
            }
            if self.lost.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Err(last.unwrap_or(FleetError::LockLost {
            group: this.group.clone(),
        }))
    }
}

impl Coordinator {
    /// Takes the group's lock under `lease`, waiting for another change that holds it.
    async fn lock(&self, client: &mut Client, lease: i64) -> Result<(), FleetError> {
        let etcd = &self.etcd;
        let key = etcd.keys.lock(&self.group);
        let holder = LockRecord {
            by: etcd.spec.host.clone(),
            rollout: self.id.clone(),
        };
        let value = serde_json::to_vec(&holder).unwrap_or_default();
        let deadline = Instant::now() + LOCK_WAIT;
        let mut waited = false;
        loop {
            let take = Txn::new()
                .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.as_str(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            if etcd.timed(client.txn(take)).await?.succeeded() {
                return Ok(());
            }
            if !waited {
                waited = true;
                let by = self.status.view().locks.get(&self.group).cloned();
                info!(group = %self.group, rollout = %self.id, holder = ?by, "another change of the group rolls: waiting for it");
            }
            if Instant::now() >= deadline {
                return Err(FleetError::LockTimeout {
                    group: self.group.clone(),
                    waited: LOCK_WAIT,
                });
            }
            tokio::time::sleep(LOCK_POLL).await;
        }
    }

    /// Waits until no balancer lists the instance among the backends it does not serve yet.
    async fn wait_rejoined(&self, host: &str, name: &str, lost: &AtomicBool) -> Result<(), String> {
        tokio::time::sleep(SETTLE).await;
        let deadline = Instant::now() + REJOIN_TIMEOUT;
        let instance = (host.to_owned(), name.to_owned());
        loop {
            let view = self.status.view();
            let address = view
                .instances
                .get(&instance)
                .map(|i| i.address)
                .ok_or("left the fleet after its step")?;
            let waiting: Vec<&String> = view
                .hosts
                .iter()
                .filter(|(_, h)| h.not_serving.contains(&address))
                .map(|(host, _)| host)
                .collect();
            if waiting.is_empty() {
                return Ok(());
            }
            if lost.load(Ordering::SeqCst) {
                return Err("the coordinator lost the group's lock".to_owned());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "healthy on its host but not taken back by {waiting:?} within {REJOIN_TIMEOUT:?}"
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits for `host`'s agent to report step `step` on `name`, as the watched view shows it.
    async fn wait_step(
        &self,
        step: usize,
        host: &str,
        name: &str,
        lost: &AtomicBool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let key = (self.group.clone(), host.to_owned(), name.to_owned());
        let instance = (host.to_owned(), name.to_owned());
        loop {
            let view = self.status.view();
            if let Some(done) = view
                .steps
                .get(&key)
                .filter(|s| s.rollout == self.id && s.step == step)
            {
                return match (&done.error, done.restored) {
                    _ if done.applied => Ok(()),
                    (Some(error), Some(false)) => Err(format!(
                        "{error}; its previous arguments did not come up either"
                    )),
                    (Some(error), _) => Err(format!("{error}; rolled back")),
                    (None, _) => Err("not applied".to_owned()),
                };
            }
            if !view.instances.contains_key(&instance) {
                return Err("left the fleet during its step".to_owned());
            }
            if lost.load(Ordering::SeqCst) {
                return Err("the coordinator lost the group's lock".to_owned());
            }
            if Instant::now() >= deadline {
                return Err(format!("no outcome within {STEP_TIMEOUT:?}"));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// This agent's part in rollouts: its instances' steps, and the groups' last good arguments.
pub(super) struct Participant {
    etcd: Arc<Etcd>,
    /// This agent's instances that are in a group: handle and group, by name.
    instances: BTreeMap<String, (InstanceHandle, String)>,
    /// Steps taken on, by rollout and step.
    taken: BTreeSet<(String, usize)>,
    /// Each group's last good rollout applied here.
    good: BTreeMap<String, String>,
}

impl Participant {
    pub(super) fn new(
        etcd: Arc<Etcd>,
        instances: BTreeMap<String, (InstanceHandle, String)>,
    ) -> Participant {
        Participant {
            etcd,
            instances,
            taken: BTreeSet::new(),
            good: BTreeMap::new(),
        }
    }

    /// Acts on the view after a change: takes the steps that name this host's instances, and
    /// applies a group's new last good arguments to its instances that did not take part.
    pub(super) fn changed(&mut self, view: &View) {
        let host = self.etcd.spec.host.clone();
        for (group, rollout) in &view.rollouts {
            if rollout.state != RolloutState::Running {
                continue;
            }
            let Some((target_host, name)) = rollout.order.get(rollout.step) else {
                continue;
            };
            // A rollout whose coordinator holds no lock (it died, or it is an old record
            // replayed) is no one's to act on.
            let locked = view
                .locks
                .get(group)
                .is_some_and(|l| l.rollout == rollout.id);
            let reported = view
                .steps
                .get(&(group.clone(), target_host.clone(), name.clone()))
                .is_some_and(|s| s.rollout == rollout.id && s.step == rollout.step);
            if *target_host != host
                || !locked
                || reported
                || !self.taken.insert((rollout.id.clone(), rollout.step))
            {
                continue;
            }
            let key = self.etcd.keys.step(group, &host, name);
            let handle = self.instances.get(name).map(|(h, _)| h.clone());
            tokio::spawn(take_step(
                Arc::clone(&self.etcd),
                handle,
                group.clone(),
                key,
                rollout.args.clone(),
                rollout.id.clone(),
                rollout.step,
            ));
        }
        for (group, good) in &view.groups {
            if self.good.get(group) == Some(&good.rollout) {
                continue;
            }
            self.good.insert(group.clone(), good.rollout.clone());
            let part_of = view.rollouts.get(group).filter(|r| r.id == good.rollout);
            let behind: Vec<(String, InstanceHandle)> = self
                .instances
                .iter()
                .filter(|(name, (_, g))| {
                    g == group
                        && !part_of
                            .is_some_and(|r| r.order.contains(&(host.clone(), (*name).clone())))
                })
                .map(|(name, (handle, _))| (name.clone(), handle.clone()))
                .collect();
            if behind.is_empty() {
                continue;
            }
            let (group, args, rollout) = (group.clone(), good.args.clone(), good.rollout.clone());
            // One instance at a time, as a rollout would.
            tokio::spawn(async move {
                for (name, handle) in behind {
                    info!(%group, instance = %name, %rollout, "applying the group's last good arguments");
                    let (applied, error, _) = apply(handle, args.clone()).await;
                    if !applied {
                        warn!(%group, instance = %name, error = error.as_deref().unwrap_or(""), "the group's last good arguments did not apply");
                    }
                }
            });
        }
    }
}

/// Applies `args` to the instance (none: not on this host any more) and records the step.
async fn take_step(
    etcd: Arc<Etcd>,
    handle: Option<InstanceHandle>,
    group: String,
    key: String,
    args: serde_json::Value,
    rollout: String,
    step: usize,
) {
    // The view may be a replay of history: etcd itself must say this step is due now.
    let confirmed = async {
        let mut client = etcd.connect().await?;
        let due = due_now(&etcd, &mut client, &group, &rollout, step).await?;
        Ok::<_, FleetError>((client, due))
    };
    let mut client = match confirmed.await {
        Ok((client, true)) => client,
        Ok((_, false)) => {
            debug!(%rollout, step, "a rolling change's step no longer due: skipped");
            return;
        }
        Err(error) => {
            // Taken again on the next change of the view, or by a restarted agent.
            warn!(%error, %rollout, step, "cannot confirm a rolling change's step: not taken");
            return;
        }
    };
    info!(%rollout, step, "taking a rolling change");
    let (applied, error, restored) = match handle {
        Some(handle) => apply(handle, args).await,
        None => (false, Some("no such instance on its host".to_owned()), None),
    };
    let record = StepRecord {
        rollout,
        step,
        applied,
        error,
        restored,
    };
    let value = serde_json::to_vec(&record).unwrap_or_default();
    // The coordinator waits for it: tried until etcd has it (bounded), on a new client after a
    // failure.
    for _ in 0..120 {
        match etcd
            .timed(client.put(key.as_str(), value.clone(), None))
            .await
        {
            Ok(_) => return,
            Err(error) => warn!(%error, %key, "recording a rolling change's step"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Ok(fresh) = etcd.connect().await {
            client = fresh;
        }
    }
}

/// Whether etcd holds rollout `id` of `group` as running at `step` with its lock held.
async fn due_now(
    etcd: &Etcd,
    client: &mut Client,
    group: &str,
    id: &str,
    step: usize,
) -> Result<bool, FleetError> {
    let lock: Option<LockRecord> = etcd.get_json(client, etcd.keys.lock(group)).await?;
    let record: Option<RolloutRecord> = etcd.get_json(client, etcd.keys.rollout(group)).await?;
    let locked = lock.is_some_and(|l| l.rollout == id);
    let running =
        record.is_some_and(|r| r.id == id && r.step == step && r.state == RolloutState::Running);
    Ok(locked && running)
}

/// Submits `args` to the instance and waits for the outcome: (applied, error, restored).
async fn apply(
    handle: InstanceHandle,
    args: serde_json::Value,
) -> (bool, Option<String>, Option<bool>) {
    let input = match serde_json::from_value::<InputArgs>(args) {
        Ok(input) => input,
        Err(error) => {
            return (
                false,
                Some(format!("not llama-server arguments: {error}")),
                None,
            );
        }
    };
    let outcome = match handle.submit(input).await {
        Ok(outcome) => outcome,
        Err(error) => return (false, Some(error.to_string()), None),
    };
    match outcome.await {
        Ok(Outcome::Applied { .. }) => (true, None, None),
        Ok(Outcome::Rejected(rejection)) => {
            (false, Some(rejection.error), Some(rejection.restored))
        }
        Err(_) => (
            false,
            Some(format!("instance `{}` stopped", handle.name())),
            None,
        ),
    }
}
