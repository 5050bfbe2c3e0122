//! The llama-server supervisor: runs local llama-server processes, revives them when they exit,
//! and changes their arguments over the API as transactions (see [`instance`] for the rules).
//!
//! Each instance's arguments live in a [`Store`] under a name. At start the persisted arguments
//! win over the command line; when there are none, the command line's (binary, `--model`,
//! `--port`, and the arguments after `--`) are persisted. Only arguments that came up healthy
//! are ever saved.

pub mod api;
mod args;
mod backend;
mod instance;
mod process;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::info;

pub use args::{ArgsError, HelpError};
pub use backend::BackendLink;
pub use instance::{
    ApplyLimit, InstanceError, InstanceHandle, Outcome, Rejection, Settings, State, Status,
};

use crate::config::AdminToken;
use crate::store::{DriverConfig, SavedArgs, Store, StoreError};

/// Where arguments are kept when no `--config-driver` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/var/lib/steer/config.toml";
/// The config name `steer supervise` uses when no `--config-driver` is given.
pub const DEFAULT_CONFIG_NAME: &str = "default";

pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(200);
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The file driver at [`DEFAULT_CONFIG_PATH`] under `name`.
pub fn default_driver(name: &str) -> DriverConfig {
    DriverConfig::File {
        path: PathBuf::from(DEFAULT_CONFIG_PATH),
        name: name.to_owned(),
    }
}

/// One instance as the command line or the agent's config describes it.
#[derive(Clone, Debug)]
pub struct InstanceSpec {
    pub name: String,
    pub binary: String,
    pub model: String,
    pub port: u16,
    /// More llama-server arguments (`-np 2 -c 2048`).
    pub extra_args: Vec<String>,
    pub settings: Settings,
    pub driver: DriverConfig,
    /// The service it is a backend of, if any.
    pub backend: Option<InstanceBackend>,
}

/// `[[instance]] service = ...`: the instance is a backend of that service.
#[derive(Clone, Debug)]
pub struct InstanceBackend {
    pub service: String,
    /// Where clients' traffic reaches it; `None`: the first IPv4 address of the agent's first
    /// interface, at the instance's port.
    pub address: Option<SocketAddrV4>,
    /// How long a restart or shutdown waits for its connections to finish.
    pub drain_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("instance `{name}`: {source}")]
    Store {
        name: String,
        #[source]
        source: StoreError,
    },
    #[error("instance `{name}`: {source}")]
    Help {
        name: String,
        #[source]
        source: HelpError,
    },
    #[error("instance `{name}`: llama-server arguments: {source}")]
    Args {
        name: String,
        #[source]
        source: ArgsError,
    },
    #[error("instance `{name}`: the persisted arguments have no usable --port")]
    NoPort { name: String },
    #[error("{addr} is not a loopback address: pass --admin-token-file")]
    NotLoopback { addr: SocketAddr },
    #[error("binding the supervisor API to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving the supervisor API on {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Loads (or persists) the instance's arguments and starts its actor, which starts the process
/// and reports to `link` when the instance is a backend. The task ends, with the process
/// stopped, once every handle is dropped.
pub async fn start(
    spec: InstanceSpec,
    link: Option<BackendLink>,
) -> Result<(InstanceHandle, JoinHandle<()>), SupervisorError> {
    let name = spec.name.clone();
    let store_error = |source| SupervisorError::Store {
        name: name.clone(),
        source,
    };
    let help_error = |source| SupervisorError::Help {
        name: name.clone(),
        source,
    };
    let store = Store::open(&spec.driver).await.map_err(store_error)?;
    let (args, aliases) = match store.load().await.map_err(store_error)? {
        Some(saved) => {
            let aliases = args::Aliases::learn(&saved.binary)
                .await
                .map_err(help_error)?;
            // Canonical already unless edited by hand; either way one entry per option.
            let flags = saved
                .args
                .into_iter()
                .map(|(flag, value)| (flag, Some(value)));
            let args = aliases.change(None, flags).apply_to(&SavedArgs {
                binary: saved.binary,
                args: BTreeMap::new(),
            });
            info!(name, driver = ?spec.driver, "using the persisted arguments");
            (args, aliases)
        }
        None => {
            let aliases = args::Aliases::learn(&spec.binary)
                .await
                .map_err(help_error)?;
            let mut argv = vec![
                "--model".to_owned(),
                spec.model.clone(),
                "--port".to_owned(),
                spec.port.to_string(),
            ];
            argv.extend(spec.extra_args.iter().cloned());
            let change = aliases
                .parse_argv(&argv)
                .map_err(|source| SupervisorError::Args {
                    name: name.clone(),
                    source,
                })?;
            let args = change.apply_to(&SavedArgs {
                binary: spec.binary.clone(),
                args: BTreeMap::new(),
            });
            store.save(&args).await.map_err(store_error)?;
            info!(name, driver = ?spec.driver, "persisted the command line's arguments");
            (args, aliases)
        }
    };
    if args.port().is_none() {
        return Err(SupervisorError::NoPort { name });
    }
    Ok(instance::spawn(
        &spec.name,
        args,
        aliases,
        spec.settings,
        store,
        link,
    ))
}

/// `steer supervise`: one instance and its API on `addr` until `shutdown`, then the process is
/// stopped gracefully.
pub async fn supervise(
    spec: InstanceSpec,
    addr: SocketAddr,
    token: Option<AdminToken>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SupervisorError> {
    // Whoever reaches the API can run any allowed binary: off loopback it must be authenticated.
    if !addr.ip().is_loopback() && token.is_none() {
        return Err(SupervisorError::NotLoopback { addr });
    }
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| SupervisorError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| SupervisorError::Bind { addr, source })?;
    let (handle, task) = start(spec, None).await?;
    let app = crate::api::with_fallbacks(
        api::router(vec![handle.clone()], token).merge(crate::metrics::router(None, vec![handle])),
    );
    info!(api = %addr, "supervisor ready");
    let served = crate::serve_http(listener, app, shutdown).await;
    // The router held the last handle: the actor stops llama-server and ends.
    let _ = task.await;
    served.map_err(|source| SupervisorError::Serve { addr, source })
}
