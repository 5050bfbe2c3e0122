//! Steer's agent: loads the XDP program, owns the backend table and serves the admin API.
//!
//! This file is the composition root: [`run`] (`steer run`) and [`supervise`]
//! (`steer supervise`) wire the parts together, and nothing else imports `config`. Data flows
//! one way: the config's [`spec`]s, the admin API, the health checks, slot polls and supervised
//! instances write to the backend [`table`], whose actor alone writes the kernel maps
//! ([`dataplane`]) and publishes the proxy's routes ([`proxy`]) and its state for readers.
//!
//! `main` parses flags and the config, then hands both to [`run`] with a shutdown future, so a test
//! can drive the same code with its own.

pub mod admin;
pub mod affinity;
pub mod config;
pub mod dataplane;
pub mod durable;
#[cfg(feature = "etcd")]
pub mod fleet;
pub mod health;
pub mod host;
pub mod limits;
pub mod notify;
pub mod outlier;
pub mod policy;
pub mod probe;
pub mod proxy;
pub mod reload;
pub mod requests;
pub mod slots;
pub mod spec;
pub mod store;
pub mod supervisor;
pub mod table;
pub mod token;

#[cfg(test)]
mod fake;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::config::{Config, Overrides};
use crate::dataplane::memory::Userspace;
use crate::dataplane::xdp::Loaded;
use crate::dataplane::{Dataplane, DataplaneError};
use crate::proxy::{ProxyError, RouteError};
use crate::spec::{
    AdminLimits, AdminToken, DataplaneKind, InstanceBackend, InstanceSpec, ProxyMode, Weight,
};
use crate::supervisor::SupervisorError;
use crate::table::TableError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("binding the {api} to {addr}: {source}")]
    Bind {
        /// "admin API" (`steer run`) or "supervisor API" (`steer supervise`).
        api: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Table(#[from] TableError),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("serving the {api} on {addr}: {source}")]
    Serve {
        api: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the backend table task failed: {0}")]
    TableTask(#[source] tokio::task::JoinError),
    /// `setting`: where the token file was named (`agent.admin_token_file` or
    /// `--admin-token-file`).
    #[error("{setting}: {source}")]
    Token {
        setting: &'static str,
        #[source]
        source: token::TokenError,
    },
}

/// Run the agent until `shutdown` completes: load and attach XDP (unless the dataplane is
/// `userspace`, or not root: then with a warning), program the configured services, listen on
/// their addresses, start the configured llama-server instances, serve the admin API; then
/// drain (see [`serve`]), stop the instances and detach. `force` (awaited once `shutdown` has
/// completed: a second signal) cuts the drain short.
pub async fn run(
    config: Config,
    reloading: Reloading,
    shutdown: impl Future<Output = ()>,
    force: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    // Bind first: a taken port should fail before anything is attached.
    let listener = bind(ADMIN_API, config.admin_addr).await?;
    let mut kind = config.dataplane;
    if kind == DataplaneKind::Xdp && !nix::unistd::geteuid().is_root() {
        // Loading BPF needs root; any other load error is the operator's to fix, so it stays one.
        warn!("not root: cannot load XDP; every connection goes through the userspace proxy");
        kind = DataplaneKind::Userspace;
    }
    // Root: SYNs to the VIPs from other hosts reach the proxies; held until the agent stops.
    let mut routes = Vec::new();
    if nix::unistd::geteuid().is_root() {
        let mut vips: Vec<_> = config.services.iter().map(|s| *s.address.ip()).collect();
        vips.sort_unstable();
        vips.dedup();
        for vip in vips {
            routes.extend(proxy::LocalRoute::add(vip)?);
        }
    }
    match kind {
        DataplaneKind::Xdp => {
            let (maps, xdp) = Loaded::load(&config.xdp)?.attach()?;
            let maps = serve(maps, kind, &config, reloading, listener, shutdown, force).await?;
            drop(xdp);
            drop(maps);
            info!(interfaces = ?config.xdp.interfaces, "XDP detached");
        }
        DataplaneKind::Userspace => {
            let userspace = Userspace::new()?;
            serve(
                userspace, kind, &config, reloading, listener, shutdown, force,
            )
            .await?;
        }
    }
    drop(routes);
    Ok(())
}

/// `steer supervise`: one instance and its API on `addr` until `shutdown`, then the process is
/// stopped gracefully. Changes need the token in `token_file`, generated there if missing.
pub async fn supervise(
    spec: InstanceSpec,
    addr: SocketAddr,
    token_file: &std::path::Path,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    const API: &str = "supervisor API";
    let token = admin_token(token_file, "--admin-token-file")?;
    let listener = bind(API, addr).await?;
    let addr = listener.local_addr().map_err(|source| AgentError::Bind {
        api: API,
        addr,
        source,
    })?;
    let (handle, task) = supervisor::start(spec, supervisor::ApplyLimit::default(), None).await?;
    let sources = admin::Sources {
        table: None,
        running: admin::Running {
            instances: vec![handle],
            ..admin::Running::default()
        }
        .fixed(),
        reload: None,
        token,
        #[cfg(feature = "etcd")]
        fleet: None,
    };
    info!(api = %addr, "supervisor ready");
    let served = admin::serve(listener, sources, &AdminLimits::default(), shutdown).await;
    // The router held the last handle: the actor stops llama-server and ends.
    let _ = task.await;
    served.map_err(|source| AgentError::Serve {
        api: API,
        addr,
        source,
    })
}

/// The name of `steer run`'s API in messages.
const ADMIN_API: &str = "admin API";

/// The token in `path` (generated there if missing); `setting` names where the path came from.
fn admin_token(
    path: &std::path::Path,
    setting: &'static str,
) -> Result<Arc<AdminToken>, AgentError> {
    token::load_or_create(path)
        .map(Arc::new)
        .map_err(|source| AgentError::Token { setting, source })
}

async fn bind(api: &'static str, addr: SocketAddr) -> Result<TcpListener, AgentError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Bind { api, addr, source })
}

/// What a reload re-reads the config with, and where its asks come from.
pub struct Reloading {
    /// The command line's, applied over the file again at each reload.
    pub overrides: Overrides,
    /// RLIMIT_NOFILE, which the config's connection caps are fitted to, at the start and at
    /// each reload (0: unknown).
    pub open_files: u64,
    pub trigger: reload::Trigger,
    pub requests: tokio::sync::mpsc::Receiver<reload::Request>,
}

impl Reloading {
    /// Asks from `trigger` (SIGHUP, `POST /v1/reload`) re-read the file with `overrides`.
    pub fn new(overrides: Overrides, open_files: u64) -> Reloading {
        let (trigger, requests) = reload::channel();
        Reloading {
            overrides,
            open_files,
            trigger,
            requests,
        }
    }
}

/// Program `dataplane` with the config's services, proxy their addresses counting in its
/// connection counts, and serve the API on `listener` until `shutdown`, applying each reload
/// `reloading` asks for; the dataplane comes back once the table task has stopped. With XDP a
/// service address that cannot be listened on is a warning (XDP still carries that service);
/// with the userspace dataplane it is an error.
///
/// Shutdown: the proxies and the admin API stop accepting, and the requests and streams in
/// flight get up to `agent.shutdown_timeout` to finish (http keep-alive connections close after
/// their current request); then the instances drain their backends (XDP flows) and stop, and the
/// table hands the dataplane back for detaching. `force` cuts the wait short, and then the
/// instances' llama-servers are killed rather than drained. A stop during a reload ends it where
/// it is.
async fn serve<D: Dataplane>(
    dataplane: D,
    kind: DataplaneKind,
    configured: &Config,
    reloading: Reloading,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    force: impl Future<Output = ()>,
) -> Result<D, AgentError> {
    let mut fitted = configured.clone();
    limits::fit_caps(
        &mut fitted.admin_limits,
        &mut fitted.services,
        reloading.open_files,
    );
    let config = &fitted;
    let addr = listener.local_addr().map_err(|source| AgentError::Bind {
        api: ADMIN_API,
        addr: config.admin_addr,
        source,
    })?;
    let admin_token = admin_token(&config.admin_token_file, "agent.admin_token_file")?;
    let counts = dataplane.conn_counts();
    let (table, task) = table::start(dataplane, &config.services)?;
    let Reloading {
        overrides,
        open_files,
        trigger,
        requests: mut reloads,
    } = reloading;
    let mut agent = Agent {
        config: config.clone(),
        configured: configured.clone(),
        overrides,
        open_files,
        probes: config.services.iter().map(|s| probes(&table, s)).collect(),
        outlier: outlier(&table, &config.services),
        proxies: Vec::with_capacity(config.services.len()),
        instances: Vec::with_capacity(config.instances.len()),
        // Shared: applies across the instances take turns.
        applies: supervisor::ApplyLimit::new(config.max_concurrent_applies),
        running: tokio::sync::watch::channel(Arc::default()).0,
        table,
        counts,
    };
    // They stop accepting when this turns true; aborted (with their connections) when this
    // returns.
    let (draining_tx, draining) = tokio::sync::watch::channel(false);
    let mut proxies = tokio::task::JoinSet::new();
    for (id, service) in config.services.iter().enumerate() {
        let listener = match (proxy::listen(service), kind) {
            (Ok(listener), _) => listener,
            (Err(error), DataplaneKind::Xdp) => {
                warn!(%error, "no userspace path for this service: XDP carries it alone");
                agent.proxies.push(None);
                continue;
            }
            (Err(error), DataplaneKind::Userspace) => return Err(error.into()),
        };
        let table = &agent.table;
        let service = proxy::ServiceProxy::new(
            service,
            id,
            &agent.counts,
            table.requests(),
            &table.routes(),
        );
        let (current, serving) = tokio::sync::watch::channel(service);
        proxies.spawn(proxy::serve(serving, listener, draining.clone()));
        agent.proxies.push(Some(current));
    }
    for spec in &config.instances {
        let instance = agent.start_instance(spec).await?;
        agent.instances.push(instance);
    }
    agent.publish();
    // After the instances' backends exist: the first registration lists them all.
    #[cfg(feature = "etcd")]
    let fleet = config.fleet.clone().map(|spec| {
        let services = config.services.iter().map(|s| s.name.clone()).collect();
        let members = agent
            .instances
            .iter()
            .filter_map(|i| {
                let group = i.spec.group.clone()?;
                Some((i.spec.name.clone(), (i.handle.clone(), group)))
            })
            .collect();
        fleet::Fleet::start(spec, agent.table.clone(), services, members)
    });
    let sources = admin::Sources {
        table: Some(agent.table.clone()),
        running: agent.running.subscribe(),
        reload: Some(trigger),
        token: admin_token,
        #[cfg(feature = "etcd")]
        fleet: fleet.as_ref().map(fleet::Fleet::api),
    };
    info!(
        admin = %addr,
        dataplane = ?kind,
        interfaces = ?config.xdp.interfaces,
        services = config.services.len(),
        instances = config.instances.len(),
        "steer ready"
    );
    let notifier = notify::Notifier::from_env();
    let serving = |config: &Config| {
        format!(
            "serving {} services, {} instances",
            config.services.len(),
            config.instances.len()
        )
    };
    notifier.ready(&serving(config));
    // Sent from the runtime: a wedged agent stops sending it, and systemd restarts it.
    let mut watchdog = tokio::task::JoinSet::new();
    if let Some(interval) = notifier.watchdog_interval() {
        let notifier = notifier.clone();
        watchdog.spawn(async move {
            loop {
                notifier.watchdog();
                tokio::time::sleep(interval).await;
            }
        });
    }
    let stopping = agent.table.clone();
    let signalled = async {
        shutdown.await;
        notifier.stopping();
        info!("draining: no new connections; requests in flight may finish");
        let _ = draining_tx.send(true);
        // XDP too: no backend takes a new flow (a SYN then meets the closed listener and is
        // refused), the open ones go on.
        if let Err(error) = stopping.stop_new_flows().await {
            warn!(%error, "stopping new flows in the kernel");
        }
    };
    let admin = admin::serve(listener, sources, &config.admin_limits, signalled);
    tokio::pin!(admin, force);
    let mut served = None;
    let mut stop = draining.clone();
    // The admin API ends on its own only on an error: then the agent stops too.
    loop {
        let reload = async {
            match reloads.recv().await {
                Some(request) => {
                    notifier.reloading();
                    let outcome = agent.reload().await;
                    notifier.ready(&serving(&agent.config));
                    if let Err(error) = &outcome {
                        warn!(%error, "reload");
                    }
                    let _ = request.reply.send(outcome);
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = &mut admin => {
                served = Some(result);
                let _ = draining_tx.send(true);
                break;
            }
            () = proxy::drain_started(&mut stop) => break,
            () = reload => {}
        }
    }
    let shutdown_timeout = agent.config.shutdown_timeout;
    info!(timeout = ?shutdown_timeout, "waiting for the requests in flight");
    let started = tokio::time::Instant::now();
    let in_flight = async {
        let result = match served.take() {
            Some(result) => result,
            None => (&mut admin).await,
        };
        info!("admin API stopped");
        while proxies.join_next().await.is_some() {}
        open_flows_ended(&agent.table).await;
        result
    };
    let forced = tokio::select! {
        result = in_flight => {
            info!(waited = ?started.elapsed(), "requests in flight finished");
            served = Some(result);
            false
        }
        () = tokio::time::sleep(shutdown_timeout) => {
            warn!(timeout = ?shutdown_timeout, "shutdown timeout: cutting what is left");
            false
        }
        () = &mut force => {
            warn!("second signal: cutting what is left, killing the llama-servers");
            true
        }
    };
    for probes in &mut agent.probes {
        probes.shutdown().await;
    }
    agent.outlier.shutdown().await;
    proxies.shutdown().await;
    let instances = std::mem::take(&mut agent.instances);
    stop_instances(instances, forced, force).await;
    // The instances' last states are out; the lease goes, and this host leaves every balancer.
    #[cfg(feature = "etcd")]
    if let Some(fleet) = fleet {
        fleet.stop().await;
    }
    // Some admin connections may still hold handles: end the table task all the same.
    agent.table.close().await;
    // Through the drain and the instances' stop: both may outlast `WatchdogSec=`.
    watchdog.shutdown().await;
    drop(agent);
    let dataplane = task.await.map_err(AgentError::TableTask)?;
    if let Some(served) = served {
        served.map_err(|source| AgentError::Serve {
            api: ADMIN_API,
            addr,
            source,
        })?;
    }
    Ok(dataplane)
}

/// The parts of a running agent a reload changes, each owned here: the config they were made
/// from, a service's probes and proxy by service id, the instances.
struct Agent {
    /// What runs: the config with its connection caps fitted to `open_files`.
    config: Config,
    /// The config as read, which a reload's new one is compared with for what needs a
    /// restart: fitting makes the admin API's cap depend on every service's.
    configured: Config,
    overrides: Overrides,
    open_files: u64,
    table: table::TableHandle,
    counts: Arc<dataplane::conns::ConnCounts>,
    /// By service id: its health checks and slot polls. Aborted when dropped: the checkers
    /// hold table handles the table task waits out.
    probes: Vec<tokio::task::JoinSet<()>>,
    /// Passive health over every service with `[service.ejection]`.
    outlier: tokio::task::JoinSet<()>,
    /// By service id: the proxy its listener hands connections to now (none: XDP alone
    /// carries the service).
    proxies: Vec<Option<tokio::sync::watch::Sender<Arc<proxy::ServiceProxy>>>>,
    instances: Vec<Instance>,
    applies: supervisor::ApplyLimit,
    /// What the admin API lists.
    running: tokio::sync::watch::Sender<Arc<admin::Running>>,
}

/// A supervised instance: its spec, its actor and, for a backend, its id in the table.
struct Instance {
    spec: InstanceSpec,
    handle: supervisor::InstanceHandle,
    task: tokio::task::JoinHandle<()>,
    backend: Option<u32>,
}

/// The health checks and slot polls of `service`.
fn probes(table: &table::TableHandle, service: &spec::ServiceSpec) -> tokio::task::JoinSet<()> {
    let mut probes = tokio::task::JoinSet::new();
    if let Some(health) = &service.health {
        probes.spawn(health::run(
            table.clone(),
            service.name.clone(),
            health.clone(),
        ));
    }
    let polled = slots::Polled {
        slots: service.slots.is_some(),
        models: (service.proxy.mode == ProxyMode::Http).then_some(slots::MODELS_REFRESH),
        metrics: (service.proxy.mode == ProxyMode::Http).then_some(slots::METRICS_REFRESH),
    };
    if polled.slots || polled.models.is_some() {
        probes.spawn(slots::run(
            table.clone(),
            service.name.clone(),
            service.slots.clone().unwrap_or_default(),
            polled,
        ));
    }
    probes
}

/// Passive health of the `services` with `[service.ejection]` (none: no task).
fn outlier(table: &table::TableHandle, services: &[spec::ServiceSpec]) -> tokio::task::JoinSet<()> {
    let judged: Vec<_> = services
        .iter()
        .filter_map(|s| {
            Some(outlier::Judged {
                service: s.name.clone(),
                spec: s.ejection?,
                pools: s.pools.clone(),
            })
        })
        .collect();
    let mut task = tokio::task::JoinSet::new();
    if !judged.is_empty() {
        task.spawn(outlier::run(table.clone(), judged));
    }
    task
}

impl Agent {
    /// Starts `spec`'s llama-server; a backend first, taking no connections until healthy.
    async fn start_instance(&self, spec: &InstanceSpec) -> Result<Instance, AgentError> {
        let (link, backend) = match &spec.backend {
            Some(backend) => {
                let link = instance_backend(&self.table, &self.config, spec, backend).await?;
                let id = link.id();
                (Some(link), Some(id))
            }
            None => (None, None),
        };
        let (handle, task) = match supervisor::start(spec.clone(), self.applies.clone(), link).await
        {
            Ok(started) => started,
            Err(error) => {
                // No instance owns the backend now: it would hold the address for good.
                if let Some(id) = backend {
                    let _ = self.table.remove_instance_backend(id, &spec.name).await;
                }
                return Err(error.into());
            }
        };
        Ok(Instance {
            spec: spec.clone(),
            handle,
            task,
            backend,
        })
    }

    /// Drains and stops the instance at `at` for good, then takes it out of the list (a stop of
    /// the agent meanwhile still finds it there and waits for it) and its backend out of the
    /// table.
    async fn stop_instance(&mut self, at: usize) -> Result<(), AgentError> {
        let stopping = &mut self.instances[at];
        stopping.handle.shutdown().await;
        let _ = (&mut stopping.task).await;
        let instance = self.instances.remove(at);
        self.config
            .instances
            .retain(|i| i.name != instance.spec.name);
        self.publish();
        if let Some(id) = instance.backend {
            self.table
                .remove_instance_backend(id, &instance.spec.name)
                .await?;
        }
        info!(instance = %instance.spec.name, "instance stopped and removed");
        Ok(())
    }

    /// Publishes the proxies and instances for the admin API.
    fn publish(&self) {
        let running = admin::Running {
            proxies: self
                .proxies
                .iter()
                .flatten()
                .map(|p| Arc::clone(&p.borrow()))
                .collect(),
            instances: self.instances.iter().map(|i| i.handle.clone()).collect(),
        };
        self.running.send_replace(Arc::new(running));
    }

    /// Re-reads the config and applies what changed (see [`reload`]); the running config
    /// stays when the new one is refused.
    async fn reload(&mut self) -> Result<reload::Report, reload::ReloadError> {
        use reload::ReloadError;
        let configured = Config::load(&self.config.path, &self.overrides)
            .map_err(|error| ReloadError::Invalid(error.to_string()))?;
        let restart = self.configured.needs_restart(&configured);
        if !restart.is_empty() {
            return Err(ReloadError::NeedsRestart(restart.join(", ")));
        }
        let mut new = configured.clone();
        limits::fit_caps(&mut new.admin_limits, &mut new.services, self.open_files);
        let plan = reload::Plan::between(
            &self.config.services,
            &new.services,
            &self.config.instances,
            &new.instances,
        )?;
        let mut report = reload::Report::default();
        let applied = self.apply(plan, &mut report).await;
        self.publish();
        if let Err(error) = applied {
            return Err(ReloadError::Apply {
                error: error.to_string(),
                applied: Box::new(report),
            });
        }
        report.shutdown_timeout = self.config.shutdown_timeout != new.shutdown_timeout;
        // Every difference is applied: the new config is the running one, its order included.
        self.config = new;
        self.configured = configured;
        if report.is_empty() {
            info!("reloaded: nothing changed");
        } else {
            info!(?report, "reloaded");
        }
        Ok(report)
    }

    /// Applies `plan`, recording each step in `report` and in the running config as it is done.
    async fn apply(
        &mut self,
        plan: reload::Plan,
        report: &mut reload::Report,
    ) -> Result<(), AgentError> {
        let mut ejection_changed = false;
        for (id, spec) in plan.services {
            self.table.reconfigure(spec.clone()).await?;
            if let Some(current) = &self.proxies[id] {
                let table = &self.table;
                let next = current.borrow().reconfigured(
                    &spec,
                    &self.counts,
                    table.requests(),
                    &table.routes(),
                );
                current.send_replace(next);
            }
            let old = &self.config.services[id];
            if old.health != spec.health || old.slots != spec.slots || old.pools != spec.pools {
                self.probes[id] = probes(&self.table, &spec);
            }
            ejection_changed |= old.ejection != spec.ejection || old.pools != spec.pools;
            report.services.push(spec.name.clone());
            self.config.services[id] = spec;
        }
        if ejection_changed {
            self.outlier = outlier(&self.table, &self.config.services);
            // The new task knows nothing of the old one's ejections, and would never end them.
            let snapshot = self.table.fresh_snapshot().await?;
            for b in &snapshot.backends {
                if b.status == table::BackendStatus::Ejected {
                    self.table.set_ejected(b.id, b.address, false).await?;
                }
            }
        }
        let removed = plan
            .instances_removed
            .iter()
            .chain(plan.instances_changed.iter().map(|i| &i.name));
        for name in removed.cloned().collect::<Vec<_>>() {
            let Some(at) = self.instances.iter().position(|i| i.spec.name == name) else {
                continue;
            };
            self.stop_instance(at).await?;
            if plan.instances_removed.contains(&name) {
                report.instances_removed.push(name);
            }
        }
        for (spec, changed) in plan
            .instances_changed
            .iter()
            .map(|s| (s, true))
            .chain(plan.instances_added.iter().map(|s| (s, false)))
        {
            let instance = self.start_instance(spec).await?;
            self.instances.push(instance);
            self.config.instances.push(spec.clone());
            self.publish();
            let names = if changed {
                &mut report.instances_changed
            } else {
                &mut report.instances_added
            };
            names.push(spec.name.clone());
        }
        Ok(())
    }
}

/// Waits until no backend has an open connection: XDP's flows (the kernel's counts) and the
/// proxies' alike, each ended by its client or backend, or by `flow_idle_timeout`.
async fn open_flows_ended(table: &table::TableHandle) {
    let open = || -> u64 {
        table.snapshot().map_or(0, |s| {
            s.backends.iter().map(|b| table.connections(b.id)).sum()
        })
    };
    let at_first = open();
    if at_first == 0 {
        return;
    }
    info!(open = at_first, "waiting for the open flows to end");
    while open() > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    info!("open flows ended");
}

/// Each instance drains its backend and stops its llama-server, all at once; `force` (or
/// `forced` already) kills them instead.
async fn stop_instances(instances: Vec<Instance>, forced: bool, force: impl Future<Output = ()>) {
    if instances.is_empty() {
        return;
    }
    let aborts: Vec<_> = instances.iter().map(|i| i.task.abort_handle()).collect();
    if forced {
        // Dropping an actor kills its process.
        aborts.iter().for_each(tokio::task::AbortHandle::abort);
    } else {
        info!(instances = instances.len(), "stopping the instances");
        for instance in &instances {
            instance.handle.shutdown().await;
        }
    }
    let stopped = async {
        for instance in instances {
            let _ = instance.task.await;
        }
    };
    tokio::pin!(stopped);
    tokio::select! {
        () = &mut stopped => {}
        () = force, if !forced => {
            warn!("second signal: killing the llama-servers");
            aborts.iter().for_each(tokio::task::AbortHandle::abort);
            stopped.await;
        }
    }
    info!("instances stopped");
}

/// Adds a served instance to its service, taking no connections until its process is healthy.
async fn instance_backend(
    table: &table::TableHandle,
    config: &Config,
    spec: &InstanceSpec,
    backend: &InstanceBackend,
) -> Result<supervisor::BackendLink, AgentError> {
    let address = match backend.address {
        Some(address) => address,
        None => {
            // Config validation guarantees at least one interface.
            let interface = config.xdp.interfaces.first().map_or("", String::as_str);
            let ip = dataplane::xdp::interface_ipv4(interface)?;
            std::net::SocketAddrV4::new(ip, spec.port)
        }
    };
    let info = table
        .add_backend(table::NewBackend {
            service: backend.service.clone(),
            address,
            weight: Weight::ONE,
            max_connections: 0,
            models: Vec::new(),
            instance: Some(spec.name.clone()),
        })
        .await?;
    info!(instance = %spec.name, id = info.id, %address, kind = ?info.kind, "instance is a backend");
    Ok(supervisor::BackendLink::new(
        table.clone(),
        info.id,
        address,
        backend.drain_timeout,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::SHUTDOWN_GRACE;
    use crate::config::Overrides;
    use crate::fake::FakeDataplane;
    use lb_common::backend_state;
    use std::path::Path;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const CONFIG: &str = r#"
[agent]
interfaces = ["lo"]
admin_addr = "127.0.0.1:0"

[[service]]
name = "chat"
address = "10.0.0.100:80"

[[service.backend]]
address = "10.0.1.2:8080"
"#;

    /// A fresh directory for a test's token file and store.
    fn temp_dir(tag: &str) -> std::io::Result<std::path::PathBuf> {
        let dir = std::env::temp_dir().join(format!("steer-agent-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// [`CONFIG`] with the token file in `dir`, then `more`.
    fn config_in(dir: &Path, more: &str) -> Result<Config, config::ConfigError> {
        let token = dir.join("admin.token");
        let text = CONFIG.replace(
            "[agent]\n",
            &format!(
                "[agent]\nadmin_token_file = {:?}\n",
                token.display().to_string()
            ),
        );
        Config::parse(
            Path::new("test.toml"),
            &format!("{text}{more}"),
            &Overrides::default(),
        )
    }

    /// An agent serving `config` on `fake` until the returned sender is used (or dropped).
    async fn start_agent(
        config: Config,
        fake: FakeDataplane,
    ) -> Result<
        (
            SocketAddr,
            tokio::sync::oneshot::Sender<()>,
            tokio::task::JoinHandle<Result<FakeDataplane, AgentError>>,
        ),
        Box<dyn std::error::Error>,
    > {
        let listener = bind(ADMIN_API, config.admin_addr).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let agent = tokio::spawn(async move {
            let stopped = async {
                let _ = stopped.await;
            };
            let force = std::future::pending();
            let kind = DataplaneKind::Xdp;
            let reloading = Reloading::new(config::Overrides::default(), 0);
            serve(fake, kind, &config, reloading, listener, stopped, force).await
        });
        Ok((addr, stop, agent))
    }

    #[tokio::test]
    async fn serves_until_shutdown_and_returns_the_dataplane()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = temp_dir("serve")?;
        // Unchecked, the backend (which nothing answers for) takes connections at once.
        let config = config_in(&dir, "[service.health]\nenabled = false\n")?;
        let fake = FakeDataplane::default();
        let (addr, stop, agent) = start_agent(config, fake.clone()).await?;

        let response = get(addr, "/v1/backends").await?;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(
            response.contains(r#""address":"10.0.1.2:8080""#),
            "{response}"
        );

        assert_eq!(fake.maps().backends[&0].state, backend_state::ACTIVE);
        let _ = stop.send(());
        let returned = agent.await??;
        assert!(!returned.maps().backends.is_empty());
        // The stop took the backend out for new flows in the kernel; the routes keep it.
        assert_eq!(fake.maps().backends[&0].state, backend_state::DOWN);
        assert_eq!(fake.maps().rings[&0], [0]);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// With no token file yet, the agent generates one (mode 0600) and every mutating call
    /// needs it; reads stay open.
    #[tokio::test]
    async fn a_token_is_generated_and_required() -> Result<(), Box<dyn std::error::Error>> {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("token")?;
        let config = config_in(&dir, "")?;
        let (addr, stop, agent) = start_agent(config, FakeDataplane::default()).await?;
        let response = get(addr, "/v1/backends").await?;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        let path = dir.join("admin.token");
        assert_eq!(
            std::fs::metadata(&path)?.permissions().mode() & 0o777,
            0o600
        );
        let token = std::fs::read_to_string(&path)?;
        for uri in ["/v1/backends/0/drain", "/v1/backends/0/activate"] {
            let response = post(addr, uri, None).await?;
            assert!(response.starts_with("HTTP/1.1 401"), "{uri}: {response}");
            assert!(response.contains(r#"{"error":"#), "{response}");
        }
        let response = post(addr, "/v1/backends/0/drain", Some(token.trim())).await?;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        let _ = stop.send(());
        agent.await??;
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
        request(addr, &format!("GET {path} HTTP/1.1\r\n")).await
    }

    async fn post(addr: SocketAddr, path: &str, token: Option<&str>) -> std::io::Result<String> {
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        request(
            addr,
            &format!("POST {path} HTTP/1.1\r\n{auth}Content-Length: 0\r\n"),
        )
        .await
    }

    /// Sends `head` (request line and headers) and reads the whole response.
    async fn request(addr: SocketAddr, head: &str) -> std::io::Result<String> {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("{head}Host: steer\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok(response)
    }

    /// `[[instance]]`s answer on the admin API beside the backends. `/bin/true` stands in for
    /// llama-server: it exits at once, so the instance stays down, but its params are served.
    #[tokio::test]
    async fn instances_are_served_on_the_admin_api() -> Result<(), Box<dyn std::error::Error>> {
        let dir = temp_dir("instances")?;
        let store = dir.join("config.toml");
        let text = format!(
            "\n[[instance]]\nname = \"gpt\"\nbinary = \"/bin/true\"\nmodel = \"m.gguf\"\n\
             port = 8081\nconfig_driver = {{ type = \"file\", path = {store:?}, name = \"gpt\" }}\n"
        );
        let config = config_in(&dir, &text)?;
        let (addr, stop, agent) = start_agent(config, FakeDataplane::default()).await?;

        let response = get(addr, "/v1/instances/gpt/params").await?;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains(r#""name":"gpt""#), "{response}");
        let response = get(addr, "/v1/params").await?;
        assert!(response.contains(r#""--model":"m.gguf""#), "{response}");
        assert!(get(addr, "/v1/backends").await?.starts_with("HTTP/1.1 200"));
        let metrics = get(addr, "/metrics").await?;
        assert!(
            metrics.contains(r#"steer_instance_starts_total{name="gpt"}"#)
                && metrics.contains(r#"steer_backend_up{service="chat""#),
            "{metrics}"
        );
        assert!(get(addr, "/v2/nothing").await?.starts_with("HTTP/1.1 404"));
        assert!(
            !store.exists(),
            "arguments that never came up healthy are not persisted"
        );

        let _ = stop.send(());
        agent.await??;
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// An idle flood over `admin_max_connections` (half of it half-sent heads) closes the
    /// connections quiet the longest, every GET is answered, and a half-sent head does not hold
    /// the shutdown past [`SHUTDOWN_GRACE`].
    #[tokio::test]
    async fn an_idle_flood_neither_locks_out_the_admin_api_nor_holds_its_shutdown()
    -> Result<(), Box<dyn std::error::Error>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let limits = AdminLimits {
            max_connections: 8,
            ..AdminLimits::default()
        };
        let app = axum::Router::new().route("/ok", axum::routing::get(|| async { "fine" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let connections = limits::Connections::new(limits.max_connections);
            admin::serve_app(listener, app, &limits, connections, async {
                let _ = stopped.await;
            })
            .await
        });
        let mut flood = Vec::new();
        for i in 0..32 {
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            if i % 2 == 0 {
                stream.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n").await?;
            }
            flood.push(stream);
        }
        for _ in 0..3 {
            let response = get(addr, "/ok").await?;
            assert!(response.starts_with("HTTP/1.1 200"), "{response}");
            assert!(response.ends_with("fine"), "{response}");
        }
        // The oldest were closed for the newer ones: EOF, no answer.
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), flood[0].read_to_end(&mut rest));
        assert_eq!(read.await??, 0, "closed without an answer");

        let mut half = tokio::net::TcpStream::connect(addr).await?;
        half.write_all(b"GET /ok HTTP/1.1\r\n").await?;
        // Accepted in order: once this is answered, `half` is held.
        assert!(get(addr, "/ok").await?.starts_with("HTTP/1.1 200"));
        let _ = stop.send(());
        let bound = SHUTDOWN_GRACE + Duration::from_secs(5);
        tokio::time::timeout(bound, server)
            .await
            .map_err(|_| "the shutdown waited on a half-sent head")???;
        Ok(())
    }

    /// A request body that stops coming is answered 400 in the API's JSON shape once
    /// `admin_body_timeout` has passed, and the connection is closed.
    #[tokio::test]
    async fn an_admin_body_that_stops_coming_is_refused_after_the_body_timeout()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("steer-agent-body-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("token"), "t0ken\n")?;
        // A token file others can read is refused.
        std::fs::set_permissions(
            dir.join("token"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
        let text = CONFIG.replace(
            "admin_addr = \"127.0.0.1:0\"\n",
            "admin_addr = \"127.0.0.1:0\"\nadmin_token_file = \"token\"\n\
             admin_body_timeout = \"200ms\"\n",
        );
        let config = Config::parse(&dir.join("steer.toml"), &text, &Overrides::default())?;
        let (addr, stop, agent) = start_agent(config, FakeDataplane::default()).await?;
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                b"POST /v1/backends HTTP/1.1\r\nHost: steer\r\nAuthorization: Bearer t0ken\r\n\
                  Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"service\"",
            )
            .await?;
        let mut response = String::new();
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            stream.read_to_string(&mut response),
        );
        read.await??;
        assert!(response.starts_with("HTTP/1.1 400"), "{response}");
        assert!(
            response.contains(r#"{"error":"#) && response.contains("did not arrive within 200ms"),
            "{response}"
        );
        let _ = stop.send(());
        agent.await??;
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[tokio::test]
    async fn taken_port_names_the_address() -> Result<(), Box<dyn std::error::Error>> {
        let taken = TcpListener::bind("127.0.0.1:0").await?;
        let addr = taken.local_addr()?;
        match bind(ADMIN_API, addr).await {
            Err(err @ AgentError::Bind { .. }) => {
                let text = err.to_string();
                assert!(text.contains(&addr.to_string()), "{text}");
            }
            other => panic!("expected a bind error, got {other:?}"),
        }
        Ok(())
    }
}
