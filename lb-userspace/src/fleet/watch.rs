//! The fleet's other hosts into this agent's table: a full read, then a watch from the revision
//! after it; after a disconnect the watch resumes from the revision after the last one applied,
//! so no change is missed or applied twice. Only a compaction past that revision (or no view at
//! all) needs a full read again. While etcd is away the table keeps what it has.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, WatchOptions};
use tokio::sync::watch as signal;
use tokio::time::Instant;
use tracing::{info, warn};

use super::program::Programmed;
use super::rollout::Participant;
use super::view::{Cached, Skipped, View};
use super::{Etcd, FleetError, FleetStatus, RETRY_MIN, backoff, stopped};
use crate::durable;
use crate::table::TableHandle;

/// The cache is written at most this often (the last change always gets written).
const CACHE_EVERY: Duration = Duration::from_secs(1);

struct Watcher {
    etcd: Arc<Etcd>,
    table: TableHandle,
    services: BTreeSet<String>,
    status: Arc<FleetStatus>,
    participant: Participant,
    view: View,
    programmed: Programmed,
    /// The view holds changes the cache does not, since then.
    unsaved: Option<Instant>,
    saved: Option<Instant>,
}

pub(super) async fn run(
    etcd: Arc<Etcd>,
    table: TableHandle,
    services: BTreeSet<String>,
    status: Arc<FleetStatus>,
    participant: Participant,
    mut stop: signal::Receiver<bool>,
) {
    let mut watcher = Watcher {
        etcd,
        table,
        services,
        status,
        participant,
        view: View::default(),
        programmed: Programmed::default(),
        unsaved: None,
        saved: None,
    };
    let mut delay = RETRY_MIN;
    let mut lost_since: Option<Instant> = None;
    let mut first = true;
    let mut client = None;
    let mut failures = 0;
    loop {
        let result = watcher
            .session(&mut client, &mut stop, &mut lost_since, &mut delay)
            .await;
        watcher.status.update(|inner| inner.watching = false);
        watcher.save_cache(true).await;
        let error = match result {
            Ok(()) => return,
            Err(error) => error,
        };
        // A session that watched (and cleared `lost_since`) counts from zero.
        failures = if lost_since.is_none() {
            1
        } else {
            failures + 1
        };
        if failures > 1 {
            // Retried once on the same client (its other endpoints); then a new one.
            client = None;
        }
        if first && watcher.view.revision == 0 {
            watcher.serve_cached(&error).await;
        }
        first = false;
        if lost_since.is_none() {
            lost_since = Some(Instant::now());
            warn!(
                %error,
                revision = watcher.view.revision,
                instances = watcher.view.instances.len(),
                "fleet watch lost: serving the last fleet seen until etcd answers"
            );
        }
        if !backoff(&mut delay, &mut stop).await {
            return;
        }
    }
}

impl Watcher {
    /// Reads (if needed) and watches until an error or `stop`.
    async fn session(
        &mut self,
        client: &mut Option<Client>,
        stop: &mut signal::Receiver<bool>,
        lost_since: &mut Option<Instant>,
        delay: &mut Duration,
    ) -> Result<(), FleetError> {
        let etcd = Arc::clone(&self.etcd);
        let client = match client {
            Some(client) => client,
            None => client.insert(etcd.connect().await?),
        };
        let from_cache = self.status.update(|inner| inner.from_cache);
        if self.view.revision > 0 && !self.same_history(client).await? {
            warn!(
                revision = self.view.revision,
                "etcd is another cluster or behind the fleet view (restored, rebuilt?): reading the whole fleet"
            );
            self.view.revision = 0;
        }
        if self.view.revision == 0 {
            self.read_all(client).await?;
        }
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(self.view.revision + 1);
        let mut stream = etcd
            .timed(client.watch(etcd.keys.all(), Some(options)))
            .await?;
        loop {
            let message = tokio::select! {
                message = stream.message() => message.map_err(|source| etcd.error(source))?,
                () = save_due(self.unsaved) => {
                    self.save_cache(false).await;
                    continue;
                }
                () = stopped(stop) => return Ok(()),
            };
            let Some(response) = message else {
                return Err(etcd.error(etcd_client::Error::WatchError(
                    "the watch stream ended".to_owned(),
                )));
            };
            if response.created() {
                // Created on a member with a leader (the client requires one): current now.
                self.status.update(|inner| {
                    inner.watching = true;
                    inner.from_cache = false;
                    inner.confirmed = Some(Instant::now());
                });
                *delay = RETRY_MIN;
                match lost_since.take() {
                    Some(since) => info!(
                        down = ?since.elapsed(),
                        revision = self.view.revision,
                        "fleet watch back: resumed after the last revision applied"
                    ),
                    None if from_cache => info!(
                        revision = self.view.revision,
                        "etcd answers: the cached fleet is brought up to date"
                    ),
                    None => info!(
                        revision = self.view.revision,
                        instances = self.view.instances.len(),
                        "watching the fleet"
                    ),
                }
            }
            if response.canceled() {
                if response.compact_revision() > 0 {
                    // The history after our revision is gone: read everything again.
                    warn!(
                        revision = self.view.revision,
                        compacted = response.compact_revision(),
                        "fleet watch behind etcd's compaction: reading the whole fleet"
                    );
                    self.view.revision = 0;
                }
                return Err(etcd.error(etcd_client::Error::WatchError(format!(
                    "watch canceled: {}",
                    response.cancel_reason()
                ))));
            }
            if response.events().is_empty() {
                continue;
            }
            let mut skipped = Vec::new();
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let applied = match event.event_type() {
                    EventType::Put => self.view.put(&etcd.keys, kv.key(), kv.value()),
                    EventType::Delete => self.view.delete(&etcd.keys, kv.key()).map(drop),
                };
                if let Err(why) = applied {
                    skipped.push(why);
                }
                self.view.revision = self.view.revision.max(kv.mod_revision());
            }
            self.changed(skipped).await;
            // Only a view etcd gave: a cached one may name steps long taken.
            self.participant.changed(&self.view);
        }
    }

    /// Whether etcd is the cluster the view came from and at or past its revision, so a watch
    /// from the revision after it resumes the same history (one count-only read).
    async fn same_history(&self, client: &mut Client) -> Result<bool, FleetError> {
        let etcd = &self.etcd;
        let options = etcd_client::GetOptions::new()
            .with_prefix()
            .with_count_only();
        let response = etcd
            .timed(client.get(etcd.keys.all(), Some(options)))
            .await?;
        let Some(header) = response.header() else {
            return Ok(false);
        };
        let cluster_known = self.view.cluster != 0;
        Ok((!cluster_known || header.cluster_id() == self.view.cluster)
            && header.revision() >= self.view.revision)
    }

    /// Replaces the view with everything under the prefix now.
    async fn read_all(&mut self, client: &mut Client) -> Result<(), FleetError> {
        let (view, skipped, _) = self.etcd.read_view(client).await?;
        self.view = view;
        self.changed(skipped).await;
        self.participant.changed(&self.view);
        Ok(())
    }

    /// The view changed: program the table, publish the view, mark the cache due.
    async fn changed(&mut self, skipped: Vec<Skipped>) {
        for why in &skipped {
            warn!(%why, "fleet key skipped");
        }
        let wanted = self.view.wanted(&self.etcd.spec.host, &self.services);
        self.programmed.apply(&self.table, &wanted).await;
        let view = Arc::new(self.view.clone());
        let backends = self.programmed.len();
        self.status.update(|inner| {
            inner.view = view;
            inner.backends = backends;
            inner.skipped_keys += skipped.len() as u64;
        });
        self.unsaved.get_or_insert_with(|| {
            // Written at once if the last write is old enough, else within CACHE_EVERY.
            self.saved
                .map_or_else(Instant::now, |at| (at + CACHE_EVERY).max(Instant::now()))
        });
    }

    /// Writes the cache if it is behind (`now`: whatever the time).
    async fn save_cache(&mut self, now: bool) {
        let Some(due) = self.unsaved else { return };
        if !now && Instant::now() < due {
            return;
        }
        self.unsaved = None;
        self.saved = Some(Instant::now());
        let path = self.etcd.spec.cache.clone();
        let cached = self
            .view
            .to_cached(&self.etcd.keys, self.status.confirmed_epoch());
        let bytes = serde_json::to_vec_pretty(&cached).unwrap_or_default();
        let written = tokio::task::spawn_blocking(move || {
            durable::create_dir(&path)?;
            durable::replace(&path, &bytes)
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                warn!(cache = %self.etcd.spec.cache.display(), %error, "writing the fleet cache")
            }
            Err(error) => warn!(%error, "writing the fleet cache"),
        }
    }

    /// etcd did not answer at the start: the last fleet this host saw, from the cache.
    async fn serve_cached(&mut self, error: &FleetError) {
        let path = &self.etcd.spec.cache;
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                warn!(%error, cache = %path.display(), "etcd does not answer and no fleet is cached: only this host's backends until it does");
                return;
            }
            Err(e) => {
                warn!(%error, cache = %path.display(), read_error = %e, "etcd does not answer and the fleet cache cannot be read");
                return;
            }
        };
        let cached: Cached = match serde_json::from_slice(&text) {
            Ok(cached) => cached,
            Err(e) => {
                warn!(%error, cache = %path.display(), parse_error = %e, "etcd does not answer and the fleet cache is not readable: ignored");
                return;
            }
        };
        let (view, skipped) = View::from_cached(&self.etcd.keys, &cached);
        warn!(
            %error,
            cache = %path.display(),
            revision = view.revision,
            instances = view.instances.len(),
            "etcd does not answer: serving the cached fleet"
        );
        self.view = view;
        self.status.update(|inner| inner.from_cache = true);
        self.status.confirmed_at_epoch(cached.confirmed);
        self.changed(skipped).await;
        // Nothing new to write back.
        self.unsaved = None;
    }
}

/// Completes when the cache is due; never without unsaved changes.
async fn save_due(unsaved: Option<Instant>) {
    match unsaved {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}
