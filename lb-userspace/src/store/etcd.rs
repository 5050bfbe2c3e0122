//! The etcd driver: key `/steer/configs/<name>` holds the JSON of [`SavedArgs`].
//!
//! One key per name, written with a single put, so names under the prefix never disturb each
//! other and every save is atomic. Each request is bounded by [`REQUEST_TIMEOUT`], so an
//! unreachable etcd is an error naming its address, never a hang.

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, KvClient};
use tracing::debug;

use super::{ETCD_PREFIX, SavedArgs, StoreError};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct EtcdStore {
    addr: String,
    name: String,
    key: String,
    kv: KvClient,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("addr", &self.addr)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Sets up a client for `addr` (`host:port`). The connection itself is made by the first
    /// request.
    pub async fn connect(addr: &str, name: &str) -> Result<EtcdStore, StoreError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT);
        let client = bounded(addr, "connecting", Client::connect([addr], Some(options))).await?;
        Ok(EtcdStore {
            addr: addr.to_owned(),
            name: name.to_owned(),
            key: format!("{ETCD_PREFIX}{name}"),
            kv: client.kv_client(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub async fn load(&self) -> Result<Option<SavedArgs>, StoreError> {
        let mut kv = self.kv.clone();
        let response = bounded(&self.addr, "reading", kv.get(self.key.as_str(), None)).await?;
        let Some(entry) = response.kvs().first() else {
            return Ok(None);
        };
        let args =
            serde_json::from_slice(entry.value()).map_err(|source| StoreError::EtcdCorrupt {
                addr: self.addr.clone(),
                key: self.key.clone(),
                source,
            })?;
        Ok(Some(args))
    }

    pub async fn save(&self, args: &SavedArgs) -> Result<(), StoreError> {
        let json = serde_json::to_vec(args).map_err(|e| StoreError::Encode {
            name: self.name.clone(),
            message: e.to_string(),
        })?;
        let mut kv = self.kv.clone();
        bounded(&self.addr, "writing", kv.put(self.key.as_str(), json, None)).await?;
        debug!(addr = %self.addr, key = %self.key, "saved config");
        Ok(())
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
