//! The instance actor: one task per llama-server instance owns its process and its arguments.
//!
//! Changes arrive on a bounded channel and merge into one batch, later keys winning. A batch is
//! applied once no change has come for the debounce window (at most [`DEBOUNCE_CAP`] windows
//! after its first change, so a steady stream cannot starve it); one that arrives during an
//! apply waits for it and goes right after. An apply is a transaction run as one future the
//! actor polls beside its channel, so GETs are answered and changes merged meanwhile but nothing
//! interrupts it: stop the old process, start the new arguments, wait for health, persist; on
//! failure start the previous arguments again. Only that future or the idle actor holds the
//! process, so there are never two. A batch that would change nothing is answered
//! without a restart.
//!
//! An exit the actor did not cause is seen at once (it awaits the child) and revived with the
//! applied arguments, at once when the process had come up healthy (a kill or a crash after
//! start costs no delay); only starts that fail to come up healthy in a row (a crash loop)
//! back off, doubling. Applies across the instances that share an [`ApplyLimit`] take turns;
//! revivals never wait for one.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::pin::Pin;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tracing::{Instrument, debug, info, info_span, warn};

use super::args::{Aliases, ArgsError, Change, InputArgs};
use super::backend::BackendLink;
use super::policy::{ArgPolicy, PolicyError};
use super::process::{Failed, Launcher, Process, RunAs, Spawner, StartError, UserError};
use crate::spec::InstanceSettings;
use crate::store::{ArgValue, SavedArgs, Store};

/// A batch waits at most this many debounce windows after its first change.
const DEBOUNCE_CAP: u32 = 5;
/// Revival delays after the first (immediate) one: doubling from the first, up to the second.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const CHANNEL: usize = 64;

/// What the actor runs an instance with: the operator's settings, and what `start` made of
/// them.
#[derive(Clone, Debug)]
pub struct Settings {
    pub instance: InstanceSettings,
    /// The flags and paths the API may set, from `instance.api_flags` and `model_dirs`.
    pub policy: ArgPolicy,
    /// Shared by every instance of the agent.
    pub applies: ApplyLimit,
}

/// How many applies (stop, start with new arguments) may run at once across the instances
/// that share it (`agent.max_concurrent_applies`): parallel changes to several instances roll
/// one group at a time, so applies never take every instance down together. Revivals of
/// crashed processes do not take from it.
#[derive(Clone, Debug)]
pub struct ApplyLimit(Arc<Semaphore>);

impl ApplyLimit {
    pub fn new(max: std::num::NonZeroUsize) -> Self {
        ApplyLimit(Arc::new(Semaphore::new(max.get())))
    }

    /// Resolves with a turn.
    fn turn(&self) -> TurnFuture {
        let semaphore = self.0.clone();
        Box::pin(async move {
            match semaphore.acquire_owned().await {
                Ok(turn) => turn,
                // Only a closed semaphore fails, and this one is never closed.
                Err(_) => std::future::pending().await,
            }
        })
    }
}

impl Default for ApplyLimit {
    /// One apply at a time.
    fn default() -> Self {
        ApplyLimit::new(std::num::NonZeroUsize::MIN)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error(transparent)]
    Invalid(#[from] ArgsError),
    #[error("binary {0} is not allowed: the supervisor lists allowed ones with --allowed-binary")]
    BinaryNotAllowed(String),
    /// The table sends the service's connections to this port; moving it needs a config change.
    #[error(
        "--port {port} is refused: this instance is the backend {backend} of a service, so its \
         port is fixed by `port` in the config file"
    )]
    PortFixed { port: u16, backend: SocketAddrV4 },
    #[error(transparent)]
    Denied(#[from] PolicyError),
    #[error(transparent)]
    User(#[from] UserError),
    #[error("instance `{0}` has stopped")]
    Stopped(Arc<str>),
}

/// How a change ended.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    Applied {
        args: SavedArgs,
        pid: u32,
        /// Set when the arguments run but could not be saved.
        #[serde(skip_serializing_if = "Option::is_none")]
        persist_error: Option<String>,
    },
    Rejected(Rejection),
}

impl Outcome {
    /// A copy for views: secret values replaced (see [`SavedArgs::redacted`]).
    pub fn redacted(&self) -> Outcome {
        let mut out = self.clone();
        match &mut out {
            Outcome::Applied { args, .. } | Outcome::Rejected(Rejection { args, .. }) => {
                *args = args.redacted();
            }
        }
        out
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Rejection {
    /// The arguments that failed.
    pub args: SavedArgs,
    pub error: String,
    pub exit_status: Option<String>,
    pub output_tail: Vec<String>,
    /// Whether the previous arguments came up again.
    pub restored: bool,
}

/// What `GET /v1/params` shows.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub name: String,
    pub state: State,
    pub applied: SavedArgs,
    /// The arguments an apply in progress is starting.
    pub applying: Option<SavedArgs>,
    /// Changes merged and waiting for the next apply.
    pub pending: Option<Change>,
    /// The healthy process; none while an apply or revival has it in hand, or while down.
    pub pid: Option<u32>,
    /// Processes spawned so far, revivals and rollbacks included.
    pub starts: u64,
    pub revivals: u64,
    pub last_outcome: Option<Outcome>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Starting,
    Running,
    Applying,
    Reviving,
    Down,
}

impl Serialize for Change {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        if let Some(binary) = &self.binary {
            map.serialize_entry("binary", binary)?;
        }
        for (flag, value) in &self.flags {
            match value {
                None => map.serialize_entry(flag, &())?,
                Some(ArgValue::Flag) => map.serialize_entry(flag, &true)?,
                Some(ArgValue::Value(text)) => map.serialize_entry(flag, text)?,
            }
        }
        map.end()
    }
}

/// A cheap handle on an instance; the actor stops its process and ends when the last one drops.
#[derive(Clone, Debug)]
pub struct InstanceHandle {
    name: Arc<str>,
    requests: mpsc::Sender<Request>,
}

type Accepted = Result<oneshot::Receiver<Outcome>, InstanceError>;

#[derive(Debug)]
enum Request {
    Submit {
        input: InputArgs,
        reply: oneshot::Sender<Accepted>,
    },
    Status {
        reply: oneshot::Sender<Status>,
    },
    /// Stop as if every handle were gone, though some remain.
    Shutdown,
}

impl InstanceHandle {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Queues a change; the receiver gets its outcome (drop it not to wait).
    pub async fn submit(&self, input: InputArgs) -> Accepted {
        let (reply, accepted) = oneshot::channel();
        self.request(Request::Submit { input, reply }).await?;
        accepted.await.map_err(|_| self.stopped())?
    }

    /// Drains the backend, stops the process and ends the actor (after an apply in progress),
    /// even while other handles remain; await the actor's task for the end.
    pub async fn shutdown(&self) {
        let _ = self.request(Request::Shutdown).await;
    }

    pub async fn status(&self) -> Result<Status, InstanceError> {
        let (reply, status) = oneshot::channel();
        self.request(Request::Status { reply }).await?;
        status.await.map_err(|_| self.stopped())
    }

    async fn request(&self, request: Request) -> Result<(), InstanceError> {
        self.requests
            .send(request)
            .await
            .map_err(|_| self.stopped())
    }

    fn stopped(&self) -> InstanceError {
        InstanceError::Stopped(self.name.clone())
    }
}

/// Starts the actor for `args` (already canonical under `aliases`), reporting to `link` when
/// the instance is a backend. The task ends, after stopping the process, when every handle is
/// gone.
pub fn spawn(
    name: &str,
    args: SavedArgs,
    aliases: Aliases,
    settings: Settings,
    store: Store,
    link: Option<BackendLink>,
) -> (InstanceHandle, JoinHandle<()>) {
    let spawner = Spawner {
        user: settings.instance.user.clone(),
    };
    spawn_with(spawner, name, args, aliases, settings, store, link)
}

/// [`spawn`] with processes from `launcher`.
pub(crate) fn spawn_with<L: Launcher>(
    launcher: L,
    name: &str,
    args: SavedArgs,
    aliases: Aliases,
    settings: Settings,
    store: Store,
    link: Option<BackendLink>,
) -> (InstanceHandle, JoinHandle<()>) {
    let name: Arc<str> = Arc::from(name);
    let (requests, inbox) = mpsc::channel(CHANNEL);
    let mut actor = Actor {
        name: name.clone(),
        aliases: HashMap::from([(args.binary.clone(), Arc::new(aliases))]),
        applied: args,
        settings,
        store: Arc::new(store),
        launcher: Arc::new(launcher),
        link: link.map(Arc::new),
        running: None,
        op: None,
        batch: None,
        crashes: 0,
        crash_status: None,
        retry_at: None,
        waiting_turn: None,
        turn: None,
        starts: 0,
        revivals: 0,
        last_outcome: None,
    };
    actor.begin(OpKind::Start, None, None);
    let span = info_span!("instance", name = %name);
    let task = tokio::spawn(actor.run(inbox).instrument(span));
    (InstanceHandle { name, requests }, task)
}

type OpFuture<P> = Pin<Box<dyn Future<Output = OpDone<P>> + Send>>;
type TurnFuture = Pin<Box<dyn Future<Output = OwnedSemaphorePermit> + Send>>;

/// The one process operation in progress.
struct Op<P> {
    kind: OpKind,
    future: OpFuture<P>,
}

enum OpKind {
    Start,
    Revive,
    Apply {
        target: SavedArgs,
        waiters: Vec<oneshot::Sender<Outcome>>,
    },
}

struct OpDone<P> {
    running: Option<P>,
    /// Processes spawned.
    spawns: u64,
    /// The start of the wanted arguments.
    result: Result<(), Failed>,
    /// After a failed apply: the restart of the previous arguments.
    restore: Option<Result<(), Failed>>,
    persist_error: Option<String>,
}

struct Batch {
    change: Change,
    waiters: Vec<oneshot::Sender<Outcome>>,
    first: Instant,
    deadline: Instant,
    /// Arrived during an apply: goes right after it.
    due_now: bool,
}

struct Actor<L: Launcher> {
    name: Arc<str>,
    aliases: HashMap<String, Arc<Aliases>>,
    applied: SavedArgs,
    settings: Settings,
    store: Arc<Store>,
    launcher: Arc<L>,
    /// The instance's backend, when it serves a service.
    link: Option<Arc<BackendLink>>,
    /// The healthy process while no operation holds it.
    running: Option<L::Process>,
    op: Option<Op<L::Process>>,
    batch: Option<Batch>,
    /// Revival attempts since a process last came up healthy, for the backoff.
    crashes: u32,
    crash_status: Option<ExitStatus>,
    /// When the next revival starts, while down.
    retry_at: Option<Instant>,
    /// A due batch waits for its turn under the apply limit; the process stays with the actor
    /// meanwhile, so an exit is still seen and revived at once.
    waiting_turn: Option<TurnFuture>,
    turn: Option<OwnedSemaphorePermit>,
    starts: u64,
    revivals: u64,
    last_outcome: Option<Outcome>,
}

impl<L: Launcher> Actor<L> {
    async fn run(mut self, mut inbox: mpsc::Receiver<Request>) {
        loop {
            if self.op.is_none() {
                self.next_op(Instant::now());
            }
            let wake = self.wake_at();
            tokio::select! {
                request = inbox.recv() => match request {
                    Some(Request::Shutdown) | None => break,
                    Some(request) => self.handle(request).await,
                },
                done = op_done(&mut self.op) => self.finish(done),
                status = exited(&mut self.running), if self.op.is_none() => {
                    let seen = Instant::now();
                    self.crashed(status);
                    if let Some(link) = &self.link {
                        link.down(seen).await;
                    }
                }
                turn = turn_ready(&mut self.waiting_turn) => {
                    self.waiting_turn = None;
                    self.turn = Some(turn);
                }
                () = sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {}
            }
        }
        // Let an apply in progress finish: it is never cut short. A start or revival is dropped,
        // which kills its process.
        if matches!(
            &self.op,
            Some(Op {
                kind: OpKind::Apply { .. },
                ..
            })
        ) {
            let done = op_done(&mut self.op).await;
            self.finish(done);
        }
        self.op = None;
        if let Some(running) = self.running.take() {
            if let Some(link) = &self.link {
                link.drain().await;
            }
            let pid = running.pid();
            let status = running.stop(self.settings.instance.stop_grace).await;
            info!(pid, ?status, "llama-server stopped");
        }
    }

    /// When idle, what to wait for before [`Actor::next_op`] has work.
    fn wake_at(&self) -> Option<Instant> {
        if self.op.is_some() {
            return None;
        }
        // Waiting for a turn: that wakes the actor, not the (passed) deadline.
        let batch = self
            .batch
            .as_ref()
            .filter(|_| self.waiting_turn.is_none())
            .map(|b| b.deadline);
        match (batch, self.retry_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Starts a due batch once it has its turn, else a due revival.
    fn next_op(&mut self, now: Instant) {
        if let Some(batch) = self.batch.take_if(|b| b.due_now || b.deadline <= now) {
            let target = batch.change.apply_to(&self.applied);
            if let Some(running) = self.running.as_ref().filter(|_| target == self.applied) {
                // Nothing would change: answer without a restart.
                let outcome = Outcome::Applied {
                    args: target,
                    pid: running.pid(),
                    persist_error: None,
                };
                for waiter in batch.waiters {
                    let _ = waiter.send(outcome.clone());
                }
                self.last_outcome = Some(outcome);
                return;
            }
            let Some(turn) = self.turn.take() else {
                if self.waiting_turn.is_none() {
                    info!("waiting for a turn to apply (agent.max_concurrent_applies)");
                    self.waiting_turn = Some(self.settings.applies.turn());
                }
                self.batch = Some(batch);
                return self.revive_if_due(now);
            };
            debug!(change = ?batch.change.redacted(), "applying");
            let running = self.running.take();
            let kind = OpKind::Apply {
                target,
                waiters: batch.waiters,
            };
            self.begin(kind, running, Some(turn));
        } else {
            self.revive_if_due(now);
        }
    }

    fn revive_if_due(&mut self, now: Instant) {
        if self.running.is_none() && self.retry_at.is_some_and(|at| at <= now) {
            self.retry_at = None;
            self.begin(OpKind::Revive, None, None);
        }
    }

    /// `turn`: an apply's, held until it is done.
    fn begin(
        &mut self,
        kind: OpKind,
        running: Option<L::Process>,
        turn: Option<OwnedSemaphorePermit>,
    ) {
        let startup = self.settings.instance.startup_timeout;
        let launcher = self.launcher.clone();
        let link = self.link.clone();
        let future: OpFuture<L::Process> = match &kind {
            OpKind::Start | OpKind::Revive => {
                let args = self.applied.clone();
                // The first start's arguments are persisted once healthy (with the configured
                // ones beside them), never before: a config that does not come up is not kept.
                let store = matches!(kind, OpKind::Start).then(|| self.store.clone());
                Box::pin(async move {
                    let result = launcher.start(&args, startup).await;
                    if let (Ok(_), Some(link)) = (&result, &link) {
                        link.up().await;
                    }
                    let persist_error = match (result.is_ok(), store) {
                        (true, Some(store)) => persist(&store, &args).await,
                        _ => None,
                    };
                    let spawns = spawned(&result);
                    let (running, result) = split(result);
                    OpDone {
                        running,
                        spawns,
                        result,
                        restore: None,
                        persist_error,
                    }
                })
            }
            OpKind::Apply { target, .. } => {
                let apply = apply(
                    launcher,
                    running,
                    self.applied.clone(),
                    target.clone(),
                    self.settings.clone(),
                    self.store.clone(),
                    link,
                );
                Box::pin(async move {
                    let _turn = turn;
                    apply.await
                })
            }
        };
        self.op = Some(Op { kind, future });
    }

    fn finish(&mut self, done: OpDone<L::Process>) {
        let Some(op) = self.op.take() else { return };
        self.starts += done.spawns;
        self.running = done.running;
        if self.running.is_some() {
            // Up again (an apply can start from down): no revival is due.
            self.retry_at = None;
        }
        let pid = self.running.as_ref().map(Process::pid);
        match (op.kind, done.result) {
            (OpKind::Start, Ok(())) => {
                info!(pid, args = ?self.applied.redacted().argv(), "llama-server started");
                self.crashes = 0;
            }
            (OpKind::Revive, Ok(())) => {
                self.revivals += 1;
                let exit_status = self.crash_status.map(|s| s.to_string());
                info!(
                    pid,
                    exit_status,
                    crashes = self.crashes,
                    "llama-server revived"
                );
            }
            (OpKind::Start | OpKind::Revive, Err(failed)) => {
                warn!(error = %failed.error, tail = ?failed.tail, "llama-server did not come up");
                self.crash_status = failed.error.exit_status();
                self.schedule_revival();
            }
            (OpKind::Apply { target, waiters }, result) => {
                let outcome = match result {
                    Ok(()) => {
                        info!(pid, args = ?target.redacted().argv(), "arguments applied");
                        self.applied = target.clone();
                        self.crashes = 0;
                        Outcome::Applied {
                            args: target,
                            pid: pid.unwrap_or_default(),
                            persist_error: done.persist_error,
                        }
                    }
                    Err(failed) => self.rejected(target, failed, done.restore),
                };
                for waiter in waiters {
                    let _ = waiter.send(outcome.clone());
                }
                self.last_outcome = Some(outcome);
            }
        }
    }

    fn rejected(
        &mut self,
        target: SavedArgs,
        failed: Failed,
        restore: Option<Result<(), Failed>>,
    ) -> Outcome {
        let restored = matches!(restore, Some(Ok(())));
        let args = target.redacted();
        warn!(error = %failed.error, args = ?args.argv(), restored, "arguments rejected");
        if let Some(Err(again)) = restore {
            warn!(error = %again.error, tail = ?again.tail, "previous arguments did not come up");
            self.crash_status = again.error.exit_status();
            self.schedule_revival();
        }
        Outcome::Rejected(Rejection {
            args: target,
            exit_status: failed.error.exit_status().map(|s| s.to_string()),
            error: failed.error.to_string(),
            output_tail: failed.tail,
            restored,
        })
    }

    fn crashed(&mut self, status: std::io::Result<ExitStatus>) {
        let Some(running) = self.running.take() else {
            return;
        };
        let uptime = running.started().elapsed();
        // It had come up healthy: no crash loop, so no delay.
        self.crashes = 0;
        self.crash_status = status.as_ref().ok().copied();
        warn!(
            pid = running.pid(),
            exit_status = ?self.crash_status.map(|s| s.to_string()),
            ?uptime,
            "llama-server exited; reviving"
        );
        drop(running);
        self.schedule_revival();
    }

    fn schedule_revival(&mut self) {
        self.crashes += 1;
        let delay = backoff(self.crashes);
        if !delay.is_zero() {
            info!(
                ?delay,
                crashes = self.crashes,
                "backing off before the next start"
            );
        }
        self.retry_at = Some(Instant::now() + delay);
    }

    async fn handle(&mut self, request: Request) {
        match request {
            Request::Submit { input, reply } => {
                let accepted = self.submit(input).await;
                let _ = reply.send(accepted);
            }
            Request::Status { reply } => {
                let _ = reply.send(self.status());
            }
            // The run loop stops on it before it gets here.
            Request::Shutdown => {}
        }
    }

    async fn submit(&mut self, input: InputArgs) -> Accepted {
        input.check()?;
        let current = self.target_binary();
        if let Some(binary) = &input.binary
            && *binary != current
            && !self.settings.instance.allowed_binaries.contains(binary)
        {
            return Err(InstanceError::BinaryNotAllowed(binary.clone()));
        }
        let binary = input.binary.clone().unwrap_or(current);
        let aliases = self.aliases(&binary).await;
        let change = aliases.change(input.binary, input.flags);
        change.check()?;
        if let (Some(port), Some(link)) = (change.port(), &self.link)
            && port != link.address().port()
        {
            return Err(InstanceError::PortFixed {
                port,
                backend: link.address(),
            });
        }
        // Before anything is queued: a refused change touches no process.
        let change = self.settings.policy.admit(change, &aliases)?;
        self.check_access(&binary, &change)?;
        let (waiter, outcome) = oneshot::channel();
        let now = Instant::now();
        let debounce = self.settings.instance.debounce;
        let busy = self.op.is_some();
        match &mut self.batch {
            Some(batch) => {
                batch.change.merge(change);
                batch.waiters.push(waiter);
                batch.deadline = (now + debounce).min(batch.first + debounce * DEBOUNCE_CAP);
                batch.due_now |= busy;
            }
            None => {
                self.batch = Some(Batch {
                    change,
                    waiters: vec![waiter],
                    first: now,
                    deadline: now + debounce,
                    due_now: busy,
                });
            }
        }
        Ok(outcome)
    }

    /// Whether llama-server's user can run `binary` and read the `--model` that `change` sets,
    /// so a file it cannot open is refused now rather than after a stop and a failed start.
    fn check_access(&self, binary: &str, change: &Change) -> Result<(), UserError> {
        let Some(run_as) = RunAs::resolve(self.settings.instance.user.as_deref())? else {
            return Ok(());
        };
        let mut args = SavedArgs {
            binary: binary.to_owned(),
            args: Default::default(),
        };
        if let Some(Some(model)) = change.flags.get("--model") {
            args.args.insert("--model".to_owned(), model.clone());
        }
        run_as.check_access(&args)
    }

    /// The binary the next apply starts unless a change names another.
    fn target_binary(&self) -> String {
        let pending = self.batch.as_ref().and_then(|b| b.change.binary.clone());
        let applying = match &self.op {
            Some(Op {
                kind: OpKind::Apply { target, .. },
                ..
            }) => Some(target.binary.clone()),
            _ => None,
        };
        pending
            .or(applying)
            .unwrap_or_else(|| self.applied.binary.clone())
    }

    /// The binary's aliases, learned from its `--help` the first time. A binary whose help
    /// cannot be read gets none: its start will fail and say why. This holds up the actor (and
    /// the polling of an apply) for one `--help` run per new binary.
    async fn aliases(&mut self, binary: &str) -> Arc<Aliases> {
        if let Some(aliases) = self.aliases.get(binary) {
            return aliases.clone();
        }
        match Aliases::learn(binary).await {
            Ok(aliases) => {
                let aliases = Arc::new(aliases);
                self.aliases.insert(binary.to_owned(), aliases.clone());
                aliases
            }
            Err(err) => {
                warn!(%err, "no aliases for this binary");
                Arc::default()
            }
        }
    }

    fn status(&self) -> Status {
        let (state, applying) = match &self.op {
            Some(Op { kind, .. }) => match kind {
                OpKind::Start => (State::Starting, None),
                OpKind::Revive => (State::Reviving, None),
                OpKind::Apply { target, .. } => (State::Applying, Some(target.redacted())),
            },
            None if self.running.is_some() => (State::Running, None),
            None => (State::Down, None),
        };
        Status {
            name: self.name.to_string(),
            state,
            applied: self.applied.redacted(),
            applying,
            pending: self.batch.as_ref().map(|b| b.change.redacted()),
            pid: self.running.as_ref().map(Process::pid),
            starts: self.starts,
            revivals: self.revivals,
            last_outcome: self.last_outcome.as_ref().map(Outcome::redacted),
        }
    }
}

/// The transaction: drain the backend, stop `running`, start `target`, wait for health,
/// persist; on failure start `previous` again. The backend rejoins once a start is healthy.
async fn apply<L: Launcher>(
    launcher: Arc<L>,
    running: Option<L::Process>,
    previous: SavedArgs,
    target: SavedArgs,
    settings: Settings,
    store: Arc<Store>,
    link: Option<Arc<BackendLink>>,
) -> OpDone<L::Process> {
    if let Some(link) = &link {
        link.drain().await;
    }
    if let Some(running) = running {
        let pid = running.pid();
        let status = running.stop(settings.instance.stop_grace).await;
        debug!(pid, ?status, "stopped for an apply");
    }
    let started = launcher
        .start(&target, settings.instance.startup_timeout)
        .await;
    let mut spawns = spawned(&started);
    match started {
        Ok(running) => {
            if let Some(link) = &link {
                link.up().await;
            }
            let persist_error = persist(&store, &target).await;
            OpDone {
                running: Some(running),
                spawns,
                result: Ok(()),
                restore: None,
                persist_error,
            }
        }
        Err(failed) => {
            let restarted = launcher
                .start(&previous, settings.instance.startup_timeout)
                .await;
            spawns += spawned(&restarted);
            // Failed too: the backend stays drained until a revival is healthy.
            if let (Ok(_), Some(link)) = (&restarted, &link) {
                link.up().await;
            }
            let (running, restore) = split(restarted);
            OpDone {
                running,
                spawns,
                result: Err(failed),
                restore: Some(restore),
                persist_error: None,
            }
        }
    }
}

/// Saves `args`; the error's text when that failed (the arguments run all the same).
async fn persist(store: &Store, args: &SavedArgs) -> Option<String> {
    store.save(args).await.err().map(|err| {
        warn!(%err, "healthy arguments not persisted");
        err.to_string()
    })
}

fn spawned<P>(result: &Result<P, Failed>) -> u64 {
    match result {
        Ok(_) => 1,
        Err(failed) => match failed.error {
            StartError::Spawn { .. } | StartError::PortTaken(_) | StartError::User(_) => 0,
            StartError::Wait(_) | StartError::Exited { .. } | StartError::Unhealthy { .. } => 1,
        },
    }
}

fn split<P>(result: Result<P, Failed>) -> (Option<P>, Result<(), Failed>) {
    match result {
        Ok(running) => (Some(running), Ok(())),
        Err(failed) => (None, Err(failed)),
    }
}

/// The first revival after a healthy process is at once; each failed one makes the next wait
/// longer.
fn backoff(crashes: u32) -> Duration {
    match crashes {
        0 | 1 => Duration::ZERO,
        n => BACKOFF_FIRST
            .saturating_mul(1 << (n - 2).min(16))
            .min(BACKOFF_MAX),
    }
}

async fn op_done<P>(op: &mut Option<Op<P>>) -> OpDone<P> {
    match op {
        Some(op) => op.future.as_mut().await,
        None => std::future::pending().await,
    }
}

async fn turn_ready(waiting: &mut Option<TurnFuture>) -> OwnedSemaphorePermit {
    match waiting {
        Some(turn) => turn.as_mut().await,
        None => std::future::pending().await,
    }
}

async fn exited<P: Process>(running: &mut Option<P>) -> std::io::Result<ExitStatus> {
    match running {
        Some(running) => running.exited().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::DriverConfig;
    use crate::store::ArgValue;
    use serde_json::json;
    use std::os::unix::process::ExitStatusExt;
    use std::path::PathBuf;
    use std::sync::Mutex;
    use std::sync::atomic::Ordering::SeqCst;
    use tokio::time::sleep;

    #[test]
    fn backoff_doubles_to_a_cap() {
        let secs: Vec<f64> = (1..=10).map(|n| backoff(n).as_secs_f64()).collect();
        assert_eq!(secs, [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    /// Processes on paused time: a start takes `restart`, args with `--bad` exit before they
    /// are healthy, and the test can crash the running one.
    #[derive(Clone)]
    struct Fake {
        restart: Duration,
        /// Every start: when it began and with what.
        starts: Arc<Mutex<Vec<(Instant, SavedArgs)>>>,
        crash: Arc<Mutex<Option<oneshot::Sender<ExitStatus>>>>,
        /// The next this many starts exit before they are healthy.
        failing: Arc<std::sync::atomic::AtomicU32>,
    }

    struct FakeProcess {
        pid: u32,
        started: Instant,
        exit: oneshot::Receiver<ExitStatus>,
    }

    impl Launcher for Fake {
        type Process = FakeProcess;

        async fn start(&self, args: &SavedArgs, _: Duration) -> Result<FakeProcess, Failed> {
            let began = Instant::now();
            let pid = {
                let mut starts = self.starts.lock().unwrap_or_else(|e| e.into_inner());
                starts.push((began, args.clone()));
                starts.len() as u32
            };
            sleep(self.restart).await;
            let failing = self
                .failing
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if failing || args.args.contains_key("--bad") {
                return Err(Failed {
                    error: StartError::Exited {
                        status: ExitStatus::from_raw(1 << 8),
                    },
                    tail: vec!["error: invalid argument: --bad".to_owned()],
                });
            }
            let (crash, exit) = oneshot::channel();
            *self.crash.lock().unwrap_or_else(|e| e.into_inner()) = Some(crash);
            Ok(FakeProcess {
                pid,
                started: began,
                exit,
            })
        }
    }

    impl Process for FakeProcess {
        fn pid(&self) -> u32 {
            self.pid
        }

        fn started(&self) -> Instant {
            self.started
        }

        async fn exited(&mut self) -> std::io::Result<ExitStatus> {
            match (&mut self.exit).await {
                Ok(status) => Ok(status),
                // A later start replaced the crash switch: this one never exits on its own.
                Err(_) => std::future::pending().await,
            }
        }

        async fn stop(self, _: Duration) -> Option<ExitStatus> {
            Some(ExitStatus::from_raw(0))
        }
    }

    impl Fake {
        fn new(restart: Duration) -> Fake {
            Fake {
                restart,
                starts: Arc::default(),
                crash: Arc::default(),
                failing: Arc::default(),
            }
        }

        /// The starts after the first, as (time since `t0`, --model, --ctx-size).
        fn restarts(&self, t0: Instant) -> Vec<(Duration, String, String)> {
            let starts = self.starts.lock().unwrap_or_else(|e| e.into_inner());
            let flag = |args: &SavedArgs, name: &str| match args.args.get(name) {
                Some(ArgValue::Value(v)) => v.clone(),
                Some(ArgValue::Flag) => "true".to_owned(),
                None => String::new(),
            };
            starts[1..]
                .iter()
                .map(|(at, args)| {
                    let since = at.saturating_duration_since(t0);
                    (since, flag(args, "--model"), flag(args, "--ctx-size"))
                })
                .collect()
        }

        fn crash(&self) {
            let crash = self.crash.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(crash) = crash {
                let _ = crash.send(ExitStatus::from_raw(libc::SIGKILL));
            }
        }
    }

    const HELP: &str = "-m,    --model FNAME    model path\n-c,    --ctx-size N     context size\n";

    struct Setup {
        handle: InstanceHandle,
        fake: Fake,
        dir: PathBuf,
    }

    impl Drop for Setup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// An instance on fake processes with a 200 ms window, its first start done.
    async fn setup(tag: &str, restart: Duration) -> Setup {
        setup_with(tag, restart, None).await
    }

    /// [`setup`], the instance reporting to `link`.
    async fn setup_with(tag: &str, restart: Duration, link: Option<BackendLink>) -> Setup {
        setup_full(tag, restart, link, ApplyLimit::default()).await
    }

    /// [`setup_with`], its applies taking turns under `applies`.
    async fn setup_full(
        tag: &str,
        restart: Duration,
        link: Option<BackendLink>,
        applies: ApplyLimit,
    ) -> Setup {
        let dir = std::env::temp_dir().join(format!("steer-actor-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let driver = DriverConfig::File {
            path: dir.join("config.toml"),
            name: "gpt".to_owned(),
        };
        let store = Store::open(&driver).await.unwrap_or_else(|e| panic!("{e}"));
        let args = SavedArgs {
            binary: "llama-server".to_owned(),
            args: [
                (
                    "--model".to_owned(),
                    ArgValue::Value("first.gguf".to_owned()),
                ),
                ("--port".to_owned(), ArgValue::Value("8080".to_owned())),
            ]
            .into(),
        };
        let settings = Settings {
            instance: InstanceSettings {
                startup_timeout: Duration::from_secs(60),
                debounce: Duration::from_millis(200),
                stop_grace: Duration::from_secs(1),
                ..InstanceSettings::default()
            },
            policy: ArgPolicy::unrestricted(),
            applies,
        };
        let fake = Fake::new(restart);
        let aliases = Aliases::parse_help(HELP);
        let (handle, _task) = spawn_with(fake.clone(), "gpt", args, aliases, settings, store, link);
        sleep(restart + Duration::from_millis(1)).await;
        let status = handle.status().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status.state, State::Running);
        Setup { handle, fake, dir }
    }

    fn input(value: serde_json::Value) -> InputArgs {
        serde_json::from_value(value).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Submits each change at its time (ms after `t0`) and returns the outcome receivers.
    async fn submit_at(
        handle: &InstanceHandle,
        t0: Instant,
        changes: Vec<(u64, serde_json::Value)>,
    ) -> Vec<oneshot::Receiver<Outcome>> {
        let mut outcomes = Vec::new();
        for (ms, change) in changes {
            sleep_until(t0 + Duration::from_millis(ms)).await;
            let outcome = handle.submit(input(change)).await;
            outcomes.push(outcome.unwrap_or_else(|e| panic!("{e}")));
        }
        outcomes
    }

    async fn applied_model(outcome: oneshot::Receiver<Outcome>) -> String {
        match outcome.await {
            Ok(Outcome::Applied { args, .. }) => match &args.args["--model"] {
                ArgValue::Value(model) => model.clone(),
                ArgValue::Flag => panic!("--model without a value"),
            },
            other => panic!("not applied: {other:?}"),
        }
    }

    /// Issue example 1: window 200 ms; changes at 0, 20, 100 and 200 ms -> one restart, with
    /// -m foo.gguf -c 6, once the window after the last change has passed.
    #[tokio::test(start_paused = true)]
    async fn debounce_example_one_restart() {
        let setup = setup("example1", Duration::from_millis(500)).await;
        let t0 = Instant::now();
        let outcomes = submit_at(
            &setup.handle,
            t0,
            vec![
                (0, json!({"-m": "foo.gguf"})),
                (20, json!({"-m": "baz.gguf", "-c": 5})),
                (100, json!({"-m": "foo.gguf"})),
                (200, json!({"-c": 6})),
            ],
        )
        .await;
        for outcome in outcomes {
            assert_eq!(applied_model(outcome).await, "foo.gguf");
        }
        let restarts = setup.fake.restarts(t0);
        assert_eq!(
            restarts,
            [(
                Duration::from_millis(400),
                "foo.gguf".to_owned(),
                "6".to_owned()
            )]
        );
    }

    /// Issue example 2: restarts take 2 s; changes at 200, 401 and 602 ms -> exactly two
    /// restarts, foo then baz; bar is never applied.
    #[tokio::test(start_paused = true)]
    async fn debounce_example_pending_change() {
        let setup = setup("example2", Duration::from_secs(2)).await;
        let t0 = Instant::now();
        let mut outcomes = submit_at(
            &setup.handle,
            t0,
            vec![
                (200, json!({"-m": "foo"})),
                (401, json!({"-m": "bar"})),
                (602, json!({"-m": "baz"})),
            ],
        )
        .await
        .into_iter();
        let mut next = || outcomes.next().unwrap_or_else(|| panic!("three outcomes"));
        assert_eq!(applied_model(next()).await, "foo");
        assert_eq!(applied_model(next()).await, "baz", "bar merged into baz");
        assert_eq!(applied_model(next()).await, "baz");
        let models: Vec<_> = setup.fake.restarts(t0).into_iter().map(|r| r.1).collect();
        assert_eq!(models, ["foo", "baz"]);
        assert_eq!(setup.fake.restarts(t0)[0].0, Duration::from_millis(400));
        let status = setup
            .handle
            .status()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status.starts, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_args_roll_back_and_are_not_persisted() {
        let setup = setup("rollback", Duration::from_millis(300)).await;
        let t0 = Instant::now();
        let outcome = setup
            .handle
            .submit(input(json!({"--bad": true, "-c": 64})))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        match outcome.await {
            Ok(Outcome::Rejected(rejection)) => {
                assert!(rejection.restored);
                assert_eq!(rejection.exit_status.as_deref(), Some("exit status: 1"));
                assert_eq!(rejection.output_tail, ["error: invalid argument: --bad"]);
            }
            other => panic!("not rejected: {other:?}"),
        }
        let restarts = setup.fake.restarts(t0);
        let ctx: Vec<_> = restarts.iter().map(|r| r.2.as_str()).collect();
        assert_eq!(ctx, ["64", ""], "the bad args, then the previous ones");
        let status = setup
            .handle
            .status()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status.state, State::Running);
        assert!(!status.applied.args.contains_key("--bad"));
        let persisted = std::fs::read_to_string(setup.dir.join("config.toml")).unwrap_or_default();
        assert!(!persisted.contains("--bad"), "{persisted}");
    }

    /// Issue 11 finding 9: a process that came up healthy and is then killed (or crashes) is
    /// revived at once, however often that happens.
    #[tokio::test(start_paused = true)]
    async fn killed_healthy_processes_revive_at_once() {
        let setup = setup("crash", Duration::ZERO).await;
        let t0 = Instant::now();
        let mut crashes = Vec::new();
        for wait in [1, 1, 1, 5] {
            sleep(Duration::from_secs(wait)).await;
            crashes.push(Instant::now().saturating_duration_since(t0));
            setup.fake.crash();
            // Virtual time stands still until the actor has seen the exit.
            sleep(Duration::from_secs(2)).await;
        }
        let revived: Vec<Duration> = setup.fake.restarts(t0).iter().map(|r| r.0).collect();
        let delays: Vec<f64> = revived
            .iter()
            .zip(&crashes)
            .map(|(r, c)| (r.saturating_sub(*c)).as_secs_f64())
            .collect();
        assert_eq!(delays, [0.0; 4], "revived at {revived:?} after {crashes:?}");
        let status = setup
            .handle
            .status()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((status.revivals, status.starts), (4, 5));
    }

    /// Revivals that fail to come up healthy back off, doubling (0, 0.5, 1, 2 s); once one is
    /// healthy, the next kill revives at once again.
    #[tokio::test(start_paused = true)]
    async fn failed_revivals_back_off() {
        let setup = setup("crashloop", Duration::ZERO).await;
        let t0 = Instant::now();
        setup.fake.failing.store(3, SeqCst);
        setup.fake.crash();
        sleep(Duration::from_secs(10)).await;
        setup.fake.crash();
        sleep(Duration::from_secs(1)).await;
        let revived: Vec<f64> = setup
            .fake
            .restarts(t0)
            .iter()
            .map(|r| r.0.as_secs_f64())
            .collect();
        assert_eq!(revived, [0.0, 0.5, 1.5, 3.5, 10.0]);
    }

    /// Issue 11 finding 9: parallel changes to three instances sharing a limit of one apply
    /// roll one at a time (never two processes stopped by applies at once), and a crash during
    /// an apply elsewhere is revived at once.
    #[tokio::test(start_paused = true)]
    async fn applies_take_turns_and_revivals_do_not_wait() {
        let restart = Duration::from_secs(2);
        let applies = ApplyLimit::default();
        let mut instances = Vec::new();
        for tag in ["turn-a", "turn-b", "turn-c"] {
            instances.push(setup_full(tag, restart, None, applies.clone()).await);
        }
        let t0 = Instant::now();
        let mut outcomes = Vec::new();
        for setup in &instances {
            let outcome = setup.handle.submit(input(json!({"-c": 64}))).await;
            outcomes.push(outcome.unwrap_or_else(|e| panic!("{e}")));
        }
        // A's apply holds the turn (debounce 200 ms, then a 2 s start); C crashes meanwhile.
        sleep(Duration::from_millis(300)).await;
        let c = &instances[2];
        let crashed = Instant::now().saturating_duration_since(t0);
        c.fake.crash();
        for outcome in outcomes {
            assert!(matches!(outcome.await, Ok(Outcome::Applied { .. })));
        }
        let starts = |setup: &Setup| -> Vec<Duration> {
            setup.fake.restarts(t0).iter().map(|r| r.0).collect()
        };
        let (a, b) = (starts(&instances[0]), starts(&instances[1]));
        let c_starts = starts(c);
        assert_eq!(
            c_starts[0], crashed,
            "the revival did not wait for A's apply"
        );
        let mut applies: Vec<Duration> = vec![a[0], b[0], c_starts[1]];
        applies.sort();
        for pair in applies.windows(2) {
            assert!(
                pair[1] >= pair[0] + restart,
                "applies overlapped: {applies:?} (each start takes {restart:?})"
            );
        }
    }

    /// A served instance's backend: DOWN until the first start is healthy, DOWN at once when
    /// the process exits and up again once revived; an apply drains it first, waits for its
    /// connections (or the drain timeout) before stopping the process, and activates it after,
    /// unless an operator had drained it.
    #[tokio::test(start_paused = true)]
    async fn backend_follows_the_process() {
        use crate::fake::FakeDataplane;
        use lb_common::backend_state::{ACTIVE, DOWN, DRAINING};

        let dataplane = FakeDataplane::default();
        // Loopback, nothing listening: the drain's slot check finds no server.
        let address = "127.0.0.1:9".parse().expect("address");
        let (table, _table_task, id) =
            crate::fake::table_with_instance(&dataplane, None, address).await;
        let state = || dataplane.maps().backends[&id].state;
        assert_eq!(state(), DOWN, "not before the first healthy start");
        let link = BackendLink::new(table.clone(), id, address, Duration::from_secs(5));
        let restart = Duration::from_millis(300);
        let setup = setup_with("backend", restart, Some(link)).await;
        assert_eq!(state(), ACTIVE);

        // The table's address holds the port: a move is refused, the same port is fine.
        let moved = setup.handle.submit(input(json!({"--port": 10}))).await;
        match moved {
            Err(err @ InstanceError::PortFixed { .. }) => {
                assert!(err.to_string().contains("127.0.0.1:9"), "{err}");
            }
            other => panic!("a port move must be refused: {other:?}"),
        }
        let same = setup.handle.submit(input(json!({"--port": 9}))).await;
        assert!(matches!(same.map(|_| ()), Ok(())), "same port accepted");
        sleep(Duration::from_secs(1)).await;

        setup.fake.crash();
        sleep(Duration::from_millis(1)).await;
        assert_eq!(state(), DOWN, "down as soon as the exit is seen");
        sleep(restart).await;
        assert_eq!(state(), ACTIVE, "revived and healthy");

        // An apply with one open connection: drained, the process kept until it is gone.
        dataplane.set_connections(id, 1);
        let t0 = Instant::now();
        let before = setup.fake.restarts(t0).len();
        let outcome = setup
            .handle
            .submit(input(json!({"-c": 64})))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        sleep(Duration::from_secs(1)).await;
        assert_eq!(state(), DRAINING);
        assert_eq!(
            setup.fake.restarts(t0).len(),
            before,
            "waits for the connection"
        );
        dataplane.set_connections(id, 0);
        sleep(Duration::from_millis(150)).await;
        assert_eq!(
            setup.fake.restarts(t0).len(),
            before + 1,
            "restarted once drained"
        );
        assert_eq!(state(), DRAINING, "not back before healthy");
        assert!(matches!(outcome.await, Ok(Outcome::Applied { .. })));
        assert_eq!(state(), ACTIVE);

        // A connection that never ends holds the restart up for the drain timeout only.
        dataplane.set_connections(id, 1);
        let t1 = Instant::now();
        let outcome = setup
            .handle
            .submit(input(json!({"-c": 128})))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(outcome.await, Ok(Outcome::Applied { .. })));
        let restarted = setup.fake.restarts(t1)[before + 1].0;
        assert!(
            restarted >= Duration::from_millis(5200) && restarted < Duration::from_millis(5400),
            "debounce + drain timeout, then the restart: {restarted:?}"
        );
        assert_eq!(state(), ACTIVE);

        // One an operator drained stays drained through a revival and an apply.
        dataplane.set_connections(id, 0);
        table
            .drain_backend(id)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        setup.fake.crash();
        sleep(restart * 2).await;
        let outcome = setup
            .handle
            .submit(input(json!({"-c": 256})))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(outcome.await, Ok(Outcome::Applied { .. })));
        assert_eq!(state(), DRAINING);
    }
}
