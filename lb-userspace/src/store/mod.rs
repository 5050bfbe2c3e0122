//! Persisted llama-server arguments, one named config per instance, in a TOML file or in etcd.
//!
//! Several names share one store: a file holds one table per name, etcd one key per name under
//! [`ETCD_PREFIX`]. Saving one name never changes another.

mod file;

#[cfg(feature = "etcd")]
mod etcd;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

pub use file::FileStore;

use crate::spec::DriverConfig;

#[cfg(feature = "etcd")]
pub use etcd::EtcdStore;

/// Where the etcd driver keeps configs: `<ETCD_PREFIX><name>` holds the JSON of [`SavedArgs`].
pub const ETCD_PREFIX: &str = "/steer/configs/";

/// One llama-server argument's value: a bare flag or a flag with a value.
///
/// Serialized as `true` for a flag and a string for a value. Integers and floats are accepted
/// when reading (a hand-edited `"-c" = 8192`) and kept as their decimal text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgValue {
    Flag,
    Value(String),
}

impl Serialize for ArgValue {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ArgValue::Flag => serializer.serialize_bool(true),
            ArgValue::Value(v) => serializer.serialize_str(v),
        }
    }
}

impl<'de> Deserialize<'de> for ArgValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ArgVisitor;

        impl Visitor<'_> for ArgVisitor {
            type Value = ArgValue;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`true` for a bare flag, or a string or number value")
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<ArgValue, E> {
                if v {
                    Ok(ArgValue::Flag)
                } else {
                    // A stored `false` would be ambiguous: absent flags are simply not stored.
                    Err(E::invalid_value(de::Unexpected::Bool(false), &self))
                }
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<ArgValue, E> {
                Ok(ArgValue::Value(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<ArgValue, E> {
                Ok(ArgValue::Value(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ArgValue, E> {
                Ok(ArgValue::Value(v.to_string()))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ArgValue, E> {
                Ok(ArgValue::Value(v.to_string()))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ArgValue, E> {
                Ok(ArgValue::Value(v.to_string()))
            }
        }

        deserializer.deserialize_any(ArgVisitor)
    }
}

/// The arguments of one instance: the binary to run and its flags (keys include the dashes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedArgs {
    pub binary: String,
    #[serde(default)]
    pub args: BTreeMap<String, ArgValue>,
}

/// What a store keeps under a name: the arguments last applied, and the operator's own (the
/// config file's or the command line's) they were reached from by API changes. Knowing the
/// latter lets a restart tell an operator's edit of the config (which wins for the flags it
/// changed) from API changes made since (which stay).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub args: SavedArgs,
    /// `None` in a record written before this was kept.
    pub configured: Option<SavedArgs>,
}

/// [`Stored`] as a file table or etcd value: `binary`, `args` and, when known, `configured`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    binary: String,
    #[serde(default)]
    args: BTreeMap<String, ArgValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    configured: Option<SavedArgs>,
}

impl From<Record> for Stored {
    fn from(record: Record) -> Stored {
        Stored {
            args: SavedArgs {
                binary: record.binary,
                args: record.args,
            },
            configured: record.configured,
        }
    }
}

impl From<&Stored> for Record {
    fn from(stored: &Stored) -> Record {
        Record {
            binary: stored.args.binary.clone(),
            args: stored.args.args.clone(),
            configured: stored.configured.clone(),
        }
    }
}

impl FromStr for DriverConfig {
    type Err = StoreError;

    /// Parses the JSON form, e.g. `{"type": "file", "path": "/var/lib/steer/config.toml",
    /// "name": "gpt"}`.
    fn from_str(s: &str) -> Result<Self, StoreError> {
        serde_json::from_str(s).map_err(StoreError::Driver)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid config driver: {0}")]
    Driver(#[source] serde_json::Error),
    #[error("invalid config name {name:?}: use 1 to 128 ASCII letters, digits, `-`, `_` or `.`")]
    InvalidName { name: String },
    #[error(
        "the etcd config driver is not compiled in: build steer with `--features etcd` \
         (or use {{\"type\": \"file\", ...}})"
    )]
    EtcdNotCompiled,
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or the named table is not a valid config. Never overwritten.
    #[error("{}:{line}: corrupt config file: {message}", path.display())]
    Corrupt {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("locking {}: {source}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding config {name:?}: {message}")]
    Encode { name: String, message: String },
    #[error("the store's blocking I/O task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    #[cfg(feature = "etcd")]
    #[error("etcd at {addr}: {action}: {source}")]
    Etcd {
        addr: String,
        action: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[cfg(feature = "etcd")]
    #[error("etcd at {addr}: {action}: no answer within {after:?}")]
    EtcdTimeout {
        addr: String,
        action: &'static str,
        after: std::time::Duration,
    },
    #[cfg(feature = "etcd")]
    #[error(
        "{source}; kept in the cache {} and written to etcd once it answers",
        cache.display()
    )]
    EtcdUnconfirmed {
        cache: PathBuf,
        source: Box<StoreError>,
    },
    #[cfg(feature = "etcd")]
    #[error("etcd at {addr}: key {key} does not hold a valid config: {source}")]
    EtcdCorrupt {
        addr: String,
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

impl StoreError {
    /// Whether etcd did not answer (refused, unreachable, timed out), as opposed to answering
    /// with something wrong.
    #[cfg(feature = "etcd")]
    fn is_unreachable(&self) -> bool {
        matches!(
            self,
            StoreError::Etcd { .. } | StoreError::EtcdTimeout { .. }
        )
    }
}

/// An open store for one config name.
#[derive(Debug)]
pub struct Store {
    kind: Kind,
    /// Written beside every save (see [`Stored::configured`]).
    configured: Option<SavedArgs>,
}

#[derive(Debug)]
enum Kind {
    File(FileStore),
    /// Boxed: the etcd client is several hundred bytes, the file store a path and a name.
    #[cfg(feature = "etcd")]
    Etcd(Box<EtcdStore>),
}

impl Store {
    /// Opens the store `driver` names. Neither driver touches its backing store until the first
    /// load or save, so an etcd that is down does not stop the open.
    pub async fn open(driver: &DriverConfig) -> Result<Store, StoreError> {
        check_name(driver.name())?;
        let kind = match driver {
            DriverConfig::File { path, name } => {
                Kind::File(FileStore::new(path.clone(), name.clone()))
            }
            #[cfg(feature = "etcd")]
            DriverConfig::Etcd { addr, name, cache } => {
                let cache = cache
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(crate::spec::DEFAULT_ETCD_CACHE));
                Kind::Etcd(Box::new(EtcdStore::new(
                    addr,
                    name,
                    FileStore::new(cache, name.clone()),
                )))
            }
            #[cfg(not(feature = "etcd"))]
            DriverConfig::Etcd { .. } => return Err(StoreError::EtcdNotCompiled),
        };
        Ok(Store {
            kind,
            configured: None,
        })
    }

    /// The config name this store reads and writes.
    pub fn name(&self) -> &str {
        match &self.kind {
            Kind::File(s) => s.name(),
            #[cfg(feature = "etcd")]
            Kind::Etcd(s) => s.name(),
        }
    }

    /// The operator's arguments, saved beside the applied ones from now on.
    pub fn set_configured(&mut self, configured: SavedArgs) {
        self.configured = Some(configured);
    }

    /// What was saved, or `None` when nothing was saved under this name yet.
    pub async fn load(&self) -> Result<Option<Stored>, StoreError> {
        match &self.kind {
            Kind::File(s) => s.load().await,
            #[cfg(feature = "etcd")]
            Kind::Etcd(s) => s.load().await,
        }
    }

    /// Replaces what is saved under this name with `args` (and the configured arguments),
    /// leaving other names alone.
    pub async fn save(&self, args: &SavedArgs) -> Result<(), StoreError> {
        let stored = Stored {
            args: args.clone(),
            configured: self.configured.clone(),
        };
        match &self.kind {
            Kind::File(s) => s.save(&stored).await,
            #[cfg(feature = "etcd")]
            Kind::Etcd(s) => s.save(&stored).await,
        }
    }
}

/// Names become TOML table names and etcd key suffixes: keep them plain so neither needs
/// escaping and no name can reach outside its own key.
pub fn check_name(name: &str) -> Result<(), StoreError> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > 128 || !name.chars().all(plain) {
        return Err(StoreError::InvalidName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SavedArgs {
        SavedArgs {
            binary: "/opt/llama/llama-server".into(),
            args: BTreeMap::from([
                ("--model".into(), ArgValue::Value("/m.gguf".into())),
                ("--flash-attn".into(), ArgValue::Flag),
            ]),
        }
    }

    #[test]
    fn saved_args_json_uses_true_for_flags() -> Result<(), serde_json::Error> {
        let json = serde_json::to_string(&sample())?;
        assert_eq!(
            json,
            r#"{"binary":"/opt/llama/llama-server","args":{"--flash-attn":true,"--model":"/m.gguf"}}"#
        );
        assert_eq!(serde_json::from_str::<SavedArgs>(&json)?, sample());
        Ok(())
    }

    #[test]
    fn numbers_read_as_values_and_false_is_rejected() -> Result<(), serde_json::Error> {
        let args: SavedArgs = serde_json::from_str(r#"{"binary": "b", "args": {"-c": 8192}}"#)?;
        assert_eq!(args.args["-c"], ArgValue::Value("8192".into()));
        let err = serde_json::from_str::<SavedArgs>(r#"{"binary": "b", "args": {"-x": false}}"#)
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("`true` for a bare flag")));
        Ok(())
    }

    #[test]
    fn driver_config_parses_both_kinds() -> Result<(), StoreError> {
        let file: DriverConfig =
            r#"{"type": "file", "path": "/var/lib/steer/config.toml", "name": "gpt"}"#.parse()?;
        assert_eq!(
            file,
            DriverConfig::File {
                path: "/var/lib/steer/config.toml".into(),
                name: "gpt".into()
            }
        );
        let etcd: DriverConfig =
            r#"{"type": "etcd", "addr": "127.0.0.1:2379", "name": "deepseek"}"#.parse()?;
        assert_eq!(etcd.name(), "deepseek");
        Ok(())
    }

    #[test]
    fn driver_config_rejects_unknown_fields_and_types() {
        for bad in [
            r#"{"type": "file", "path": "/c.toml", "name": "gpt", "mode": 1}"#,
            r#"{"type": "redis", "addr": "x", "name": "gpt"}"#,
            r#"{"type": "etcd", "name": "gpt"}"#,
            r#"{"path": "/c.toml", "name": "gpt"}"#,
        ] {
            assert!(
                matches!(bad.parse::<DriverConfig>(), Err(StoreError::Driver(_))),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn bad_names_are_rejected_at_open() {
        for name in ["", "a/b", "a b", "../x", &"n".repeat(129)] {
            let driver = DriverConfig::File {
                path: "/nonexistent/c.toml".into(),
                name: name.into(),
            };
            assert!(
                matches!(
                    Store::open(&driver).await,
                    Err(StoreError::InvalidName { .. })
                ),
                "{name:?}"
            );
        }
    }

    #[cfg(not(feature = "etcd"))]
    #[tokio::test]
    async fn etcd_without_the_feature_says_how_to_get_it() {
        let driver = DriverConfig::Etcd {
            addr: "127.0.0.1:2379".into(),
            name: "gpt".into(),
            cache: None,
        };
        match Store::open(&driver).await {
            Err(e @ StoreError::EtcdNotCompiled) => {
                assert!(e.to_string().contains("--features etcd"), "{e}");
            }
            other => panic!("expected EtcdNotCompiled, got {other:?}"),
        }
    }
}
