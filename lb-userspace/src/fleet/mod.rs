//! A fleet of agents sharing one etcd cluster (`[fleet]`).
//!
//! Each agent registers under a lease it keeps alive ([`register`]): a host key, and one record
//! per supervised instance that is a backend, rewritten as soon as the table's view of it changes
//! (ready, draining, crashed). Each agent watches the whole prefix ([`watch`]) and turns the
//! other hosts' serving instances into backends of its services of the same name through the one
//! table ([`program`]); its own instances are its supervisor's. A dead host's lease expires and
//! its records go with it, from every balancer at once.
//!
//! etcd is the only engine: no consensus or gossip here. Losing it never takes a backend away
//! (fail-static): the table keeps the last fleet seen, the agent exports how stale that is
//! ([`FleetStatus`]) and resumes the watch from its revision when etcd is back, so no change is
//! missed or replayed. The last fleet seen is also kept in a local cache (written atomically),
//! which an agent starting while etcd does not answer comes up from.

mod program;
pub mod record;
mod register;
pub mod rollout;
pub mod show;
pub mod view;
mod watch;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use serde::Serialize;
use tokio::sync::watch as signal;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::spec::FleetSpec;
use crate::supervisor::InstanceHandle;
use crate::table::TableHandle;
use record::{InstanceRecord, Keys};
use view::View;

/// Bounds every unary etcd call, so an etcd that does not answer is an error, never a hang.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 pings: a connection to a member cut off without a reset breaks within about
/// `KEEPALIVE + KEEPALIVE_TIMEOUT`, and its watch with it. etcd closes the connection of a
/// client that pings more often than every 5 s (`--grpc-keepalive-min-time`).
const KEEPALIVE: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Between tries while etcd does not answer, doubling up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("etcd at {endpoints}: {source}")]
    Etcd {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd at {endpoints}: no answer within {timeout:?}")]
    Timeout {
        endpoints: String,
        timeout: Duration,
    },
    #[error("reading {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the registration lease expired (etcd went without renewals longer than lease_ttl)")]
    LeaseExpired,
    #[error("the rolling change of group `{group}` lost its lock (its lease expired)")]
    LockLost { group: String },
    #[error("another change of group `{group}` held its lock for over {waited:?}")]
    LockTimeout { group: String, waited: Duration },
    #[error(
        "host key {key} belongs to another live agent (lease {lease:x}): another agent runs with \
         this fleet.host, or this agent's last run has not expired yet"
    )]
    HostTaken { key: String, lease: i64 },
}

/// A fleet connection's settings, shared by the tasks.
struct Etcd {
    spec: FleetSpec,
    keys: Keys,
}

impl Etcd {
    fn endpoints(&self) -> String {
        self.spec.endpoints.join(",")
    }

    fn error(&self, source: etcd_client::Error) -> FleetError {
        FleetError::Etcd {
            endpoints: self.endpoints(),
            source,
        }
    }

    /// `call` bounded by [`REQUEST_TIMEOUT`], its error naming the endpoints.
    async fn timed<T>(
        &self,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, FleetError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
            Ok(result) => result.map_err(|source| self.error(source)),
            Err(_) => Err(FleetError::Timeout {
                endpoints: self.endpoints(),
                timeout: REQUEST_TIMEOUT,
            }),
        }
    }

    /// Everything under the prefix now: the view, what it skipped, and etcd's answer itself
    /// (each key's revision and lease, for `steer fleet get`).
    async fn read_view(
        &self,
        client: &mut Client,
    ) -> Result<(View, Vec<view::Skipped>, etcd_client::GetResponse), FleetError> {
        let options = etcd_client::GetOptions::new().with_prefix();
        let response = self
            .timed(client.get(self.keys.all(), Some(options)))
            .await?;
        let mut view = View {
            revision: response.header().map_or(0, |h| h.revision()),
            cluster: response.header().map_or(0, |h| h.cluster_id()),
            ..View::default()
        };
        let mut skipped = Vec::new();
        for kv in response.kvs() {
            if let Err(why) = view.put(&self.keys, kv.key(), kv.value()) {
                skipped.push(why);
            }
        }
        Ok((view, skipped, response))
    }

    /// The JSON value at `key`, if there is one that reads as a `T`.
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        client: &mut Client,
        key: String,
    ) -> Result<Option<T>, FleetError> {
        let response = self.timed(client.get(key, None)).await?;
        Ok(response
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice(kv.value()).ok()))
    }

    /// Renews a lease once through `keeper`, its answer read from `replies`; `LeaseExpired`
    /// when etcd says the lease is gone, another error when the stream broke (the lease may
    /// live on: resume it).
    async fn renew_once(
        &self,
        keeper: &mut etcd_client::LeaseKeeper,
        replies: &mut etcd_client::LeaseKeepAliveStream,
    ) -> Result<(), FleetError> {
        self.timed(keeper.keep_alive()).await?;
        match self.timed(replies.message()).await? {
            Some(reply) if reply.ttl() > 0 => Ok(()),
            Some(_) => Err(FleetError::LeaseExpired),
            None => Err(self.error(etcd_client::Error::LeaseKeepAliveError(
                "the keep-alive stream ended".to_owned(),
            ))),
        }
    }

    /// A client over every endpoint. Requests need a leader: a member cut off from the quorum
    /// refuses them (and ends its watches) instead of serving what it last knew as current.
    async fn connect(&self) -> Result<Client, FleetError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEPALIVE, KEEPALIVE_TIMEOUT)
            .with_require_leader(true);
        if let Some(auth) = &self.spec.auth {
            let password = read_file("fleet.password_file", &auth.password_file)?;
            let password = String::from_utf8_lossy(&password).trim_end().to_owned();
            options = options.with_user(auth.user.clone(), password);
        }
        if let Some(tls) = &self.spec.tls {
            let mut config = TlsOptions::new()
                .ca_certificate(Certificate::from_pem(read_file("fleet.tls.ca", &tls.ca)?));
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                config = config.identity(Identity::from_pem(
                    read_file("fleet.tls.cert", cert)?,
                    read_file("fleet.tls.key", key)?,
                ));
            }
            if let Some(name) = &tls.server_name {
                config = config.domain_name(name.clone());
            }
            options = options.with_tls(config);
        }
        self.timed(Client::connect(&self.spec.endpoints, Some(options)))
            .await
    }
}

fn read_file(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, FleetError> {
    std::fs::read(path).map_err(|source| FleetError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// One key of the fleet as etcd holds it (`steer fleet get --json`).
#[derive(Debug, Serialize)]
pub struct StoredKey {
    pub key: String,
    pub mod_revision: i64,
    /// The lease it lives under (0: none); a host's keys go with its lease.
    pub lease: i64,
    /// The JSON value, or the text of one that is not JSON.
    pub value: serde_json::Value,
}

/// The whole fleet as etcd holds it now, for `steer fleet get`: the view built from it (what an
/// agent would act on), every key with its revision, and the keys an agent would skip.
pub async fn read(
    spec: &FleetSpec,
) -> Result<(View, Vec<StoredKey>, Vec<view::Skipped>), FleetError> {
    let etcd = Etcd {
        keys: Keys::new(&spec.prefix),
        spec: spec.clone(),
    };
    let mut client = etcd.connect().await?;
    let (view, skipped, response) = etcd.read_view(&mut client).await?;
    let stored = response
        .kvs()
        .iter()
        .map(|kv| StoredKey {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            mod_revision: kv.mod_revision(),
            lease: kv.lease(),
            value: serde_json::from_slice(kv.value()).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(kv.value()).into_owned())
            }),
        })
        .collect();
    Ok((view, stored, skipped))
}

/// What the fleet tasks know of etcd and the fleet, for `/metrics` and `/v1/fleet`.
#[derive(Debug)]
pub struct FleetStatus {
    host: String,
    prefix: String,
    started: Instant,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The watch is open on a member with a leader.
    watching: bool,
    /// The lease of the current registration, once granted.
    lease: Option<i64>,
    /// The last keep-alive etcd answered while the watch was open: the view was current then.
    confirmed: Option<Instant>,
    view: Arc<View>,
    /// The view came from the local cache and etcd has not answered since.
    from_cache: bool,
    backends: usize,
    skipped_keys: u64,
    lease_renewals: u64,
}

/// The fleet as `/v1/fleet` lists it.
#[derive(Debug, Serialize)]
pub struct FleetReport {
    pub host: String,
    pub prefix: String,
    /// The watch is open and etcd answered the last keep-alive: the view is current.
    pub connected: bool,
    /// Seconds since the view was last known current (since the start, if never).
    pub stale_seconds: f64,
    /// The etcd revision the view is current to.
    pub revision: i64,
    pub from_cache: bool,
    pub registered: bool,
    /// Backends the fleet put in this agent's services.
    pub backends: usize,
    pub skipped_keys: u64,
    pub hosts: Vec<String>,
    pub instances: Vec<ListedInstance>,
}

#[derive(Debug, Serialize)]
pub struct ListedInstance {
    pub host: String,
    pub name: String,
    #[serde(flatten)]
    pub record: InstanceRecord,
}

impl FleetStatus {
    fn new(spec: &FleetSpec) -> FleetStatus {
        FleetStatus {
            host: spec.host.clone(),
            prefix: spec.prefix.clone(),
            started: Instant::now(),
            inner: Mutex::default(),
        }
    }

    fn update<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Whether the view is current, and for how long it has not been known to be.
    fn freshness(&self, inner: &Inner) -> (bool, Duration) {
        let since = inner.confirmed.unwrap_or(self.started).elapsed();
        // Every failed keep-alive or watch clears `lease` or `watching`: no grace here.
        let connected = inner.watching && inner.lease.is_some() && inner.confirmed.is_some();
        (connected, since)
    }

    pub fn report(&self) -> FleetReport {
        self.update(|inner| {
            let (connected, stale) = self.freshness(inner);
            FleetReport {
                host: self.host.clone(),
                prefix: self.prefix.clone(),
                connected,
                stale_seconds: stale.as_secs_f64(),
                revision: inner.view.revision,
                from_cache: inner.from_cache,
                registered: inner.lease.is_some(),
                backends: inner.backends,
                skipped_keys: inner.skipped_keys,
                hosts: inner.view.hosts.keys().cloned().collect(),
                instances: inner
                    .view
                    .instances
                    .iter()
                    .map(|((host, name), record)| ListedInstance {
                        host: host.clone(),
                        name: name.clone(),
                        record: record.clone(),
                    })
                    .collect(),
            }
        })
    }

    pub fn lease_renewals(&self) -> u64 {
        self.update(|inner| inner.lease_renewals)
    }

    /// When the view was last known current, in seconds since the epoch (for the cache).
    fn confirmed_epoch(&self) -> f64 {
        let stale = self.update(|inner| self.freshness(inner).1);
        epoch_now() - stale.as_secs_f64()
    }

    /// The view came from a cache last known current at `confirmed` (epoch seconds).
    fn confirmed_at_epoch(&self, confirmed: f64) {
        let ago = Duration::from_secs_f64((epoch_now() - confirmed).max(0.0));
        self.update(|inner| inner.confirmed = Instant::now().checked_sub(ago));
    }

    /// The fleet as last read.
    pub fn view(&self) -> Arc<View> {
        self.update(|inner| Arc::clone(&inner.view))
    }
}

/// What the admin API reads and asks of the fleet.
#[derive(Clone)]
pub struct FleetApi {
    status: Arc<FleetStatus>,
    etcd: Arc<Etcd>,
}

impl FleetApi {
    pub fn report(&self) -> FleetReport {
        self.status.report()
    }

    pub fn lease_renewals(&self) -> u64 {
        self.status.lease_renewals()
    }

    /// Starts a rolling change of `group`'s arguments to `args` (as `POST /v1/params` takes
    /// them); its rollout id.
    pub fn roll(
        &self,
        group: &str,
        args: serde_json::Value,
    ) -> Result<String, rollout::RolloutError> {
        rollout::start(&self.etcd, &self.status, group, args)
    }

    /// The group's latest rollout and its steps so far, as the view holds them.
    pub fn rollout(&self, group: &str) -> Option<(record::RolloutRecord, Vec<record::StepRecord>)> {
        let view = self.status.view();
        let rollout = view.rollouts.get(group)?.clone();
        let steps = rollout
            .order
            .iter()
            .filter_map(|(host, name)| {
                view.steps
                    .get(&(group.to_owned(), host.clone(), name.clone()))
                    .filter(|s| s.rollout == rollout.id)
                    .cloned()
            })
            .collect();
        Some((rollout, steps))
    }
}

/// The running fleet tasks.
pub struct Fleet {
    api: FleetApi,
    stop: signal::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Fleet {
    /// Registers this agent's instances (from `table`) and programs the others' into `table`'s
    /// `services`, until [`Fleet::stop`]; `members` are this agent's instances that are in a
    /// group, with the group, by name. Nothing here waits for etcd.
    pub fn start(
        spec: FleetSpec,
        table: TableHandle,
        services: BTreeSet<String>,
        members: BTreeMap<String, (InstanceHandle, String)>,
    ) -> Fleet {
        let status = Arc::new(FleetStatus::new(&spec));
        let etcd = Arc::new(Etcd {
            keys: Keys::new(&spec.prefix),
            spec,
        });
        let groups = members
            .iter()
            .map(|(name, (_, group))| (name.clone(), group.clone()))
            .collect();
        let participant = rollout::Participant::new(Arc::clone(&etcd), members);
        let (stop, stopped) = signal::channel(false);
        let mut tasks = JoinSet::new();
        tasks.spawn(register::run(
            Arc::clone(&etcd),
            table.clone(),
            Arc::clone(&status),
            groups,
            stopped.clone(),
        ));
        tasks.spawn(watch::run(
            Arc::clone(&etcd),
            table,
            services,
            Arc::clone(&status),
            participant,
            stopped,
        ));
        Fleet {
            api: FleetApi { status, etcd },
            stop,
            tasks,
        }
    }

    pub fn api(&self) -> FleetApi {
        self.api.clone()
    }

    /// Ends the watch and revokes the registration, so the other balancers drop this host's
    /// instances at once; bounded by the request timeout.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let stopped = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(REQUEST_TIMEOUT * 2, stopped)
            .await
            .is_err()
        {
            self.tasks.shutdown().await;
        }
    }
}

/// Seconds since the epoch, now (the timestamps the records and the cache keep).
fn epoch_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Sleeps `delay` (then doubles it up to [`RETRY_MAX`]) unless `stop` turns true first;
/// whether to go on.
async fn backoff(delay: &mut Duration, stop: &mut signal::Receiver<bool>) -> bool {
    let wait = *delay;
    *delay = (*delay * 2).min(RETRY_MAX);
    tokio::select! {
        () = tokio::time::sleep(wait) => {}
        () = stopped(stop) => {}
    }
    !*stop.borrow()
}

/// Completes once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut signal::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
