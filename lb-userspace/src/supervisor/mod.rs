//! The llama-server supervisor: runs local llama-server processes, revives them when they exit,
//! and changes their arguments over the API as transactions (see [`instance`] for the rules).
//!
//! Each instance's arguments live in a [`Store`] under a name, beside the configured arguments
//! (the config file's or the command line's: binary, `--model`, `--port` and the rest) they were
//! reached from. At start the persisted arguments win, except where the config was edited since
//! (see [`decide_args`]). Only arguments that came up healthy are ever saved.

mod args;
mod backend;
mod instance;
pub mod policy;
mod process;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use args::{ArgsError, HelpError, InputArgs};
pub use backend::BackendLink;
pub use instance::{
    ApplyLimit, InstanceError, InstanceHandle, Outcome, Rejection, Settings, State, Status,
};
pub use policy::{ArgPolicy, PolicyError, REDACTED, is_secret_flag};
/// For the admin API's tests: an instance actor without `start`'s checks.
#[cfg(test)]
pub(crate) use {args::Aliases, instance::spawn};

use crate::spec::{DriverConfig, InstanceSpec};
use crate::store::{SavedArgs, Store, StoreError, Stored};

/// Where arguments are kept when no `--config-driver` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/var/lib/steer/config.toml";
/// The config name `steer supervise` uses when no `--config-driver` is given.
pub const DEFAULT_CONFIG_NAME: &str = "default";

pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The file driver at [`DEFAULT_CONFIG_PATH`] under `name`.
pub fn default_driver(name: &str) -> DriverConfig {
    DriverConfig::File {
        path: PathBuf::from(DEFAULT_CONFIG_PATH),
        name: name.to_owned(),
    }
}

impl InstanceSpec {
    /// The operator's arguments: the binary, `--model`, `--port` and the extra arguments.
    pub fn operator_args(&self, aliases: &args::Aliases) -> Result<SavedArgs, SupervisorError> {
        let mut argv = vec![
            "--model".to_owned(),
            self.model.clone(),
            "--port".to_owned(),
            self.port.to_string(),
        ];
        argv.extend(self.extra_args.iter().cloned());
        let change = aliases
            .parse_argv(&argv)
            .map_err(|source| SupervisorError::Args {
                name: self.name.clone(),
                source,
            })?;
        Ok(change.apply_to(&SavedArgs {
            binary: self.binary.clone(),
            args: BTreeMap::new(),
        }))
    }
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
    #[error("instance `{name}`: {source}")]
    User {
        name: String,
        #[source]
        source: process::UserError,
    },
    #[error("instance `{name}`: the persisted arguments have no usable --port")]
    NoPort { name: String },
}

/// Decides the instance's arguments from the configured and the persisted ones (see
/// [`decide_args`]) and starts its actor, which starts the process, persists the arguments once
/// they are healthy, and reports to `link` when the instance is a backend. The task ends, with
/// the process stopped, once every handle is dropped.
pub async fn start(
    spec: InstanceSpec,
    applies: ApplyLimit,
    link: Option<BackendLink>,
) -> Result<(InstanceHandle, JoinHandle<()>), SupervisorError> {
    let name = spec.name.clone();
    let policy = ArgPolicy::new(
        &spec.settings.api_flags,
        &spec.settings.model_dirs,
        &spec.model,
    );
    let store_error = |source| SupervisorError::Store {
        name: name.clone(),
        source,
    };
    let help_error = |source| SupervisorError::Help {
        name: name.clone(),
        source,
    };
    let mut store = Store::open(&spec.driver).await.map_err(store_error)?;
    let stored = store.load().await.map_err(store_error)?;
    let aliases = args::Aliases::learn(&spec.binary)
        .await
        .map_err(help_error)?;
    let configured = spec.operator_args(&aliases)?;
    store.set_configured(configured.clone());
    let (args, aliases) = match stored {
        None => (configured, aliases),
        Some(stored) => {
            let aliases = if stored.args.binary == spec.binary {
                aliases
            } else {
                args::Aliases::learn(&stored.args.binary)
                    .await
                    .map_err(help_error)?
            };
            let args = decide_args(&spec, &configured, stored, &aliases);
            let args = policy::checked_at_load(&spec, &policy, &aliases, args, &store).await?;
            (args, aliases)
        }
    };
    if args.port().is_none() {
        return Err(SupervisorError::NoPort { name });
    }
    check_user(&name, spec.settings.user.as_deref(), &args)?;
    let InstanceSpec { name, settings, .. } = spec;
    let settings = Settings {
        instance: settings,
        policy,
        applies,
    };
    Ok(instance::spawn(&name, args, aliases, settings, store, link))
}

/// What to start, given the persisted record and the arguments configured now.
///
/// - The persisted arguments are the last that came up healthy, API changes included: they
///   win where the operator has not edited the config since.
/// - Where the config changed since they were saved (against the configured arguments saved
///   beside them), the config's edit is applied on top: flags the edit touches take the
///   config's value, API changes to other flags stay.
/// - A backend's `--port` is always the config's: the table sends its connections there.
fn decide_args(
    spec: &InstanceSpec,
    configured: &SavedArgs,
    stored: Stored,
    aliases: &args::Aliases,
) -> SavedArgs {
    let name = spec.name.as_str();
    // Canonical already unless edited by hand; either way one entry per option.
    let flags = stored
        .args
        .args
        .into_iter()
        .map(|(flag, value)| (flag, Some(value)));
    let saved = aliases.change(None, flags).apply_to(&SavedArgs {
        binary: stored.args.binary,
        args: BTreeMap::new(),
    });
    let mut args = match stored.configured {
        Some(before) if before == *configured => {
            info!(name, driver = ?spec.driver, "using the persisted arguments");
            saved
        }
        Some(before) => {
            let edit = args::Change::between(&before, configured);
            info!(
                name,
                driver = ?spec.driver,
                edit = ?edit,
                "the config changed since the arguments were persisted: its edit wins over them"
            );
            edit.apply_to(&saved)
        }
        None => {
            info!(
                name,
                driver = ?spec.driver,
                "using the persisted arguments (saved without the configured ones)"
            );
            saved
        }
    };
    if spec.backend.is_some() && args.port() != Some(spec.port) {
        warn!(
            name,
            persisted = ?args.port(),
            configured = spec.port,
            "the persisted --port is not the config's: the backend is at the config's, so it wins"
        );
        args.set_port(spec.port);
    }
    args
}

/// Fails at start, naming the user or the file, when llama-server could not run as its user;
/// warns when it runs as root.
fn check_user(name: &str, user: Option<&str>, args: &SavedArgs) -> Result<(), SupervisorError> {
    let error = |source| SupervisorError::User {
        name: name.to_owned(),
        source,
    };
    match process::RunAs::resolve(user).map_err(error)? {
        Some(run_as) => {
            run_as.check_access(args).map_err(error)?;
            info!(name, user = run_as.name(), "llama-server runs unprivileged");
        }
        None if nix::unistd::geteuid().is_root() => warn!(
            name,
            "llama-server runs as ROOT (`user` is a uid-0 user): every argument the params API \
             sets gets root's rights; set `user` to an unprivileged user"
        ),
        None => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{InstanceBackend, InstanceSettings};
    use crate::store::ArgValue;

    fn spec(port: u16, backend: bool) -> InstanceSpec {
        InstanceSpec {
            name: "gpt".to_owned(),
            binary: "llama-server".to_owned(),
            model: "/m/a.gguf".to_owned(),
            port,
            extra_args: Vec::new(),
            settings: InstanceSettings::default(),
            group: None,
            driver: default_driver("gpt"),
            backend: backend.then(|| InstanceBackend {
                service: "chat".to_owned(),
                address: None,
                drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            }),
        }
    }

    fn args(pairs: &[(&str, &str)]) -> SavedArgs {
        SavedArgs {
            binary: "llama-server".to_owned(),
            args: pairs
                .iter()
                .map(|(flag, value)| ((*flag).to_owned(), ArgValue::Value((*value).to_owned())))
                .collect(),
        }
    }

    #[test]
    fn persisted_arguments_win_until_the_config_is_edited() {
        let aliases = args::Aliases::default();
        let configured = args(&[("--model", "/m/a.gguf"), ("--port", "8081")]);
        let by_api = args(&[("--model", "/m/a.gguf"), ("--port", "8081"), ("-c", "8192")]);
        let stored = |configured: Option<SavedArgs>| Stored {
            args: by_api.clone(),
            configured,
        };

        // No edit since the save: the API's changes stay.
        let decided = decide_args(
            &spec(8081, false),
            &configured,
            stored(Some(configured.clone())),
            &aliases,
        );
        assert_eq!(decided, by_api);

        // The operator moved the model: that wins, the API's -c stays.
        let edited = args(&[("--model", "/m/b.gguf"), ("--port", "8081")]);
        let decided = decide_args(
            &spec(8081, false),
            &edited,
            stored(Some(configured.clone())),
            &aliases,
        );
        assert_eq!(
            decided,
            args(&[("--model", "/m/b.gguf"), ("--port", "8081"), ("-c", "8192")])
        );

        // A backend's port moved in the config: llama-server moves with it, even for a record
        // saved before the configured arguments were kept beside it.
        let moved = args(&[("--model", "/m/a.gguf"), ("--port", "9090")]);
        for record in [stored(Some(configured.clone())), stored(None)] {
            let decided = decide_args(&spec(9090, true), &moved, record, &aliases);
            assert_eq!(decided.port(), Some(9090), "{decided:?}");
            assert_eq!(decided.args.get("-c"), by_api.args.get("-c"));
        }
        // Not a backend, an old record: the persisted arguments as they are.
        let decided = decide_args(&spec(9090, false), &moved, stored(None), &aliases);
        assert_eq!(decided, by_api);
    }
}
