//! The etcd driver: key `/steer/configs/<name>` holds the JSON of the stored record, and a file
//! store (the cache) keeps a local copy.
//!
//! One key per name, written with a single put, so names under the prefix never disturb each
//! other and every save is atomic. Each request is bounded by [`REQUEST_TIMEOUT`], so an
//! unreachable etcd is an error naming its address, never a hang.
//!
//! Losing etcd must not stop an instance: every load and save also writes the cache, and a load
//! etcd does not answer reads the cache instead. A save etcd does not confirm (refused, or timed
//! out, when it may still land) is kept and written again by a background task until etcd has
//! it, so a timed-out write is never left in doubt. A start that found neither etcd nor a cache
//! runs the configured arguments; its saves then reach etcd only where the key is still absent,
//! never over arguments written while it could not see them.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, Weak};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, KvClient, PutOptions, Txn, TxnOp};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use super::file::FileStore;
use super::{ETCD_PREFIX, Record, StoreError, Stored};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Between two tries of the background write of an unconfirmed save.
const RETRY: Duration = Duration::from_secs(1);

pub struct EtcdStore {
    shared: Arc<Shared>,
    name: String,
    cache: FileStore,
    /// Set when a load found neither etcd nor a cache: saves must not overwrite etcd's key.
    blind: AtomicBool,
}

/// What the store and its sync task share; the task holds it weakly and ends with the store.
struct Shared {
    etcd: Etcd,
    /// The latest save etcd has not confirmed, numbered so a retry never clears a newer one.
    unconfirmed: std::sync::Mutex<Option<(u64, Unconfirmed)>>,
    saves: AtomicU64,
}

#[derive(Clone, Debug)]
struct Unconfirmed {
    json: Vec<u8>,
    only_if_absent: bool,
}

/// The connection, made on first use and again after a failure.
struct Etcd {
    addr: String,
    key: String,
    client: Mutex<Option<KvClient>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("addr", &self.shared.etcd.addr)
            .field("key", &self.shared.etcd.key)
            .field("cache", &self.cache.path())
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// A store for `name` at `addr` (`host:port`) with `cache` beside it. Nothing is contacted
    /// until the first load or save. Must be called inside a tokio runtime (it starts the sync
    /// task, which ends with the store).
    pub fn new(addr: &str, name: &str, cache: FileStore) -> EtcdStore {
        let shared = Arc::new(Shared {
            etcd: Etcd {
                addr: addr.to_owned(),
                key: format!("{ETCD_PREFIX}{name}"),
                client: Mutex::new(None),
            },
            unconfirmed: std::sync::Mutex::new(None),
            saves: AtomicU64::new(0),
        });
        tokio::spawn(sync(Arc::downgrade(&shared)));
        EtcdStore {
            shared,
            name: name.to_owned(),
            cache,
            blind: AtomicBool::new(false),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn key(&self) -> &str {
        &self.shared.etcd.key
    }

    /// etcd's record (copied to the cache); the cache's when etcd does not answer.
    pub async fn load(&self) -> Result<Option<Stored>, StoreError> {
        let etcd = &self.shared.etcd;
        match etcd.get().await {
            Ok(Some(json)) => {
                let record: Record =
                    serde_json::from_slice(&json).map_err(|source| StoreError::EtcdCorrupt {
                        addr: etcd.addr.clone(),
                        key: etcd.key.clone(),
                        source,
                    })?;
                let stored = Stored::from(record);
                if let Ok(Some(cached)) = self.cache.load().await
                    && cached != stored
                {
                    warn!(
                        key = %etcd.key,
                        cache = %self.cache.path().display(),
                        "the cache holds other arguments than etcd (a save etcd never \
                         confirmed before the agent stopped): using etcd's"
                    );
                }
                self.write_cache(&stored).await;
                Ok(Some(stored))
            }
            Ok(None) => Ok(None),
            Err(error) if error.is_unreachable() => {
                let cached = self.cache.load().await?;
                match &cached {
                    Some(_) => warn!(
                        %error,
                        cache = %self.cache.path().display(),
                        "etcd does not answer: using the arguments cached at the last load or save"
                    ),
                    None => {
                        self.blind.store(true, Ordering::SeqCst);
                        warn!(
                            %error,
                            cache = %self.cache.path().display(),
                            "etcd does not answer and nothing is cached: using the configured \
                             arguments; they reach etcd later only if it holds none"
                        );
                    }
                }
                Ok(cached)
            }
            Err(error) => Err(error),
        }
    }

    /// Writes the cache, then etcd. A write etcd does not confirm is an error that says it is
    /// cached and retried; the retry ends once etcd has it (or a later save replaces it).
    pub async fn save(&self, stored: &Stored) -> Result<(), StoreError> {
        let json = serde_json::to_vec(&Record::from(stored)).map_err(|e| StoreError::Encode {
            name: self.name.clone(),
            message: e.to_string(),
        })?;
        self.cache.save(stored).await?;
        let write = Unconfirmed {
            json,
            only_if_absent: self.blind.load(Ordering::SeqCst),
        };
        let shared = &self.shared;
        let seq = shared.saves.fetch_add(1, Ordering::SeqCst);
        match shared.etcd.write(&write).await {
            Ok(()) => {
                // Confirmed: an older unconfirmed save must not be written over it later.
                shared.clear_unconfirmed(|pending| pending < seq);
                debug!(addr = %shared.etcd.addr, key = %shared.etcd.key, "saved config");
                Ok(())
            }
            Err(error) => {
                let mut unconfirmed = shared.lock_unconfirmed();
                if unconfirmed
                    .as_ref()
                    .is_none_or(|(pending, _)| *pending < seq)
                {
                    *unconfirmed = Some((seq, write));
                }
                Err(StoreError::EtcdUnconfirmed {
                    cache: self.cache.path().to_path_buf(),
                    source: Box::new(error),
                })
            }
        }
    }

    async fn write_cache(&self, stored: &Stored) {
        if let Err(error) = self.cache.save(stored).await {
            warn!(%error, "writing the etcd cache");
        }
    }
}

impl Etcd {
    async fn kv(&self) -> Result<KvClient, StoreError> {
        let mut client = self.client.lock().await;
        if let Some(kv) = client.as_ref() {
            return Ok(kv.clone());
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT);
        let connected = bounded(
            &self.addr,
            "connecting",
            Client::connect([&self.addr], Some(options)),
        )
        .await?;
        let kv = connected.kv_client();
        *client = Some(kv.clone());
        Ok(kv)
    }

    /// Runs `call` on the client; a failure drops the client so the next call connects anew.
    async fn with_kv<T, F>(
        &self,
        action: &'static str,
        call: impl FnOnce(KvClient) -> F,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        let kv = self.kv().await?;
        let result = bounded(&self.addr, action, call(kv)).await;
        if result.is_err() {
            *self.client.lock().await = None;
        }
        result
    }

    async fn get(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.key.clone();
        let response = self
            .with_kv("reading", |mut kv| async move { kv.get(key, None).await })
            .await?;
        Ok(response.kvs().first().map(|entry| entry.value().to_vec()))
    }

    async fn write(&self, write: &Unconfirmed) -> Result<(), StoreError> {
        let key = self.key.clone();
        let json = write.json.clone();
        if !write.only_if_absent {
            return self
                .with_kv(
                    "writing",
                    |mut kv| async move { kv.put(key, json, None).await },
                )
                .await
                .map(drop);
        }
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, json, Some(PutOptions::new()))]);
        let response = self
            .with_kv(
                "writing if absent",
                |mut kv| async move { kv.txn(txn).await },
            )
            .await?;
        if !response.succeeded() {
            warn!(
                key = %self.key,
                "etcd holds arguments written while this agent could not reach it: \
                 not overwritten; the next start uses them"
            );
        }
        Ok(())
    }
}

impl Shared {
    fn lock_unconfirmed(&self) -> std::sync::MutexGuard<'_, Option<(u64, Unconfirmed)>> {
        self.unconfirmed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets the unconfirmed save if `done` says etcd has it or something newer.
    fn clear_unconfirmed(&self, done: impl FnOnce(u64) -> bool) {
        let mut unconfirmed = self.lock_unconfirmed();
        if unconfirmed.as_ref().is_some_and(|(seq, _)| done(*seq)) {
            *unconfirmed = None;
        }
    }
}

/// Writes the latest unconfirmed save until etcd has it, looking every [`RETRY`]; ends with
/// its store.
async fn sync(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(RETRY).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let Some((seq, write)) = shared.lock_unconfirmed().clone() else {
            continue;
        };
        let etcd = &shared.etcd;
        // A timed-out put may have landed after all: then there is nothing to write.
        let landed = matches!(etcd.get().await, Ok(Some(json)) if json == write.json);
        let written = landed || etcd.write(&write).await.is_ok();
        if written {
            shared.clear_unconfirmed(|pending| pending == seq);
            info!(key = %etcd.key, landed, "etcd has the save it had not confirmed");
        }
    }
}

/// Runs one etcd call with an overall deadline (on top of the client's own timeouts, which do
/// not cover every stage of a lazy connect) and names the address in any error.
async fn bounded<T>(
    addr: &str,
    action: &'static str,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(CONNECT_TIMEOUT + REQUEST_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(StoreError::Etcd {
            addr: addr.to_owned(),
            action,
            source,
        }),
        Err(_) => Err(StoreError::EtcdTimeout {
            addr: addr.to_owned(),
            action,
            after: CONNECT_TIMEOUT + REQUEST_TIMEOUT,
        }),
    }
}
