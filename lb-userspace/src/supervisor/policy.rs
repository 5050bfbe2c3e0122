//! What the params API may change, so a client holding the token still cannot turn
//! llama-server against the host: it may set only flags on an allowlist (by canonical name, so
//! an alias cannot slip past), and a path-valued flag only to a file that, symlinks and `..`
//! resolved, lies under one of the instance's model directories. Everything else is refused with
//! a 403 naming the flag. The value is passed on as written (it is what views show): model
//! directories must not be writable by those the check keeps out, or a link swapped in after
//! the check would redirect llama-server (running unprivileged all the same).
//!
//! The operator's own arguments (config file, command line) are not limited: the operator
//! already controls the host. Arguments persisted earlier are checked again at load (see
//! [`checked_at_load`]), since an older agent took any flag.
//!
//! Secret values (`--api-key`, `--hf-token`) are passed to llama-server and persisted, but every
//! view of them (`GET /v1/params`, logs) shows [`REDACTED`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use tracing::error;

use super::SupervisorError;
use super::args::{Aliases, Change};
use crate::spec::InstanceSpec;
use crate::store::{ArgValue, SavedArgs, Store};

/// Tuning flags the API may set by default: every long spelling of each option, so whichever
/// one a llama.cpp build prints first (the canonical name) is listed.
const DEFAULT_API_FLAGS: &[&str] = &[
    // Context, batching, slots.
    "--ctx-size",
    "--parallel",
    "--batch-size",
    "--ubatch-size",
    "--keep",
    "--predict",
    "--n-predict",
    "--cont-batching",
    "--no-cont-batching",
    "--cache-reuse",
    "--context-shift",
    "--no-context-shift",
    "--swa-full",
    "--kv-unified",
    "--no-kv-unified",
    "--slot-prompt-similarity",
    "--timeout",
    "--threads-http",
    // Threads and devices.
    "--threads",
    "--threads-batch",
    "--gpu-layers",
    "--n-gpu-layers",
    "--split-mode",
    "--tensor-split",
    "--main-gpu",
    "--device",
    "--cpu-moe",
    "--n-cpu-moe",
    "--numa",
    "--mlock",
    "--mmap",
    "--no-mmap",
    "--kv-offload",
    "--no-kv-offload",
    "--flash-attn",
    // KV cache.
    "--cache-type-k",
    "--cache-type-v",
    "--defrag-thold",
    // RoPE.
    "--rope-scaling",
    "--rope-scale",
    "--rope-freq-base",
    "--rope-freq-scale",
    "--yarn-orig-ctx",
    "--yarn-ext-factor",
    "--yarn-attn-factor",
    "--yarn-beta-slow",
    "--yarn-beta-fast",
    // Sampling defaults.
    "--seed",
    "--samplers",
    "--sampling-seq",
    "--temp",
    "--top-k",
    "--top-p",
    "--min-p",
    "--typical",
    "--top-nsigma",
    "--xtc-probability",
    "--xtc-threshold",
    "--repeat-last-n",
    "--repeat-penalty",
    "--presence-penalty",
    "--frequency-penalty",
    "--dry-multiplier",
    "--dry-base",
    "--dry-allowed-length",
    "--dry-penalty-last-n",
    "--mirostat",
    "--mirostat-lr",
    "--mirostat-ent",
    "--ignore-eos",
    "--grammar",
    "--json-schema",
    // Model, adapters, templates (paths: see PATH_FLAGS).
    "--model",
    "--alias",
    "--lora",
    "--control-vector",
    "--mmproj",
    "--no-mmproj",
    "--no-mmproj-offload",
    "--model-draft",
    "--ctx-size-draft",
    "--gpu-layers-draft",
    "--n-gpu-layers-draft",
    "--threads-draft",
    "--draft-max",
    "--draft",
    "--draft-n",
    "--draft-min",
    "--draft-n-min",
    "--draft-p-min",
    "--chat-template",
    "--chat-template-file",
    "--jinja",
    "--no-jinja",
    "--reasoning-format",
    "--reasoning-budget",
    "--grammar-file",
    "--json-schema-file",
    "--embedding",
    "--embeddings",
    "--reranking",
    "--rerank",
    "--pooling",
    // Endpoints that only report.
    "--metrics",
    "--slots",
    "--no-slots",
    "--props",
    // The supervisor checks --port itself (a backend's is fixed).
    "--port",
];

/// Flags whose value names a file llama-server opens; comma lists are checked item by item.
const PATH_FLAGS: &[&str] = &[
    "--model",
    "--lora",
    "--control-vector",
    "--mmproj",
    "--model-draft",
    "--chat-template-file",
    "--grammar-file",
    "--json-schema-file",
];

/// Path flags that take a comma-separated list.
const LIST_FLAGS: &[&str] = &["--lora", "--control-vector"];

/// Flags whose value is a secret, every spelling.
const SECRET_FLAGS: &[&str] = &["--api-key", "--hf-token", "-hft"];

/// What views show instead of a secret value.
pub const REDACTED: &str = "<redacted>";

/// Why the API refuses a change. `NotAllowed` and `OutsideModelDirs` are 403s, the rest 400s.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "{flag} may not be set over the API: an operator allows it with `api_flags` in the \
         instance's config (steer run) or --api-flag (steer supervise)"
    )]
    NotAllowed { flag: String },
    #[error(
        "{flag} {path}: not under a model directory ({dirs}); an operator adds directories \
         with `model_dirs` in the instance's config or --model-dir"
    )]
    OutsideModelDirs {
        flag: String,
        path: String,
        dirs: String,
    },
    #[error("{flag} {path}: {source}")]
    Unreadable {
        flag: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{flag} needs a value")]
    NeedsValue { flag: String },
    #[error("{flag} takes no value: send true to set it")]
    TakesNoValue { flag: String },
}

/// The allowlist and model directories of one instance.
#[derive(Clone, Debug)]
pub struct ArgPolicy {
    flags: BTreeSet<String>,
    model_dirs: Vec<PathBuf>,
    /// Tests of the actor's timing: any flag, any path.
    #[cfg(test)]
    unrestricted: bool,
}

impl ArgPolicy {
    /// The default flags plus `extra_flags`; paths under `model_dirs`, or when there are none,
    /// under the directory of `model` (the operator's model).
    pub fn new(extra_flags: &[String], model_dirs: &[PathBuf], model: &str) -> ArgPolicy {
        let mut flags: BTreeSet<String> =
            DEFAULT_API_FLAGS.iter().map(|f| (*f).to_owned()).collect();
        flags.extend(extra_flags.iter().cloned());
        let model_dirs = if model_dirs.is_empty() {
            let dir = Path::new(model).parent().unwrap_or(Path::new(""));
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            vec![dir.to_owned()]
        } else {
            model_dirs.to_vec()
        };
        ArgPolicy {
            flags,
            model_dirs,
            #[cfg(test)]
            unrestricted: false,
        }
    }

    #[cfg(test)]
    pub(crate) fn unrestricted() -> ArgPolicy {
        ArgPolicy {
            unrestricted: true,
            ..ArgPolicy::new(&[], &[], "")
        }
    }

    /// `change` (canonical under `aliases`) if the API may make it.
    pub fn admit(&self, change: Change, aliases: &Aliases) -> Result<Change, PolicyError> {
        #[cfg(test)]
        if self.unrestricted {
            return Ok(change);
        }
        for (flag, value) in &change.flags {
            self.allowed(flag, aliases)?;
            // A value where none belongs (or none where one does) would shift the words after
            // it: a later value would be read as a flag.
            match (value.as_ref(), aliases.takes_value(flag)) {
                (Some(ArgValue::Flag), Some(true)) => {
                    return Err(PolicyError::NeedsValue { flag: flag.clone() });
                }
                (Some(ArgValue::Value(_)), Some(false)) => {
                    return Err(PolicyError::TakesNoValue { flag: flag.clone() });
                }
                _ => {}
            }
            if let Some(ArgValue::Value(path)) = value
                && PATH_FLAGS.contains(&flag.as_str())
            {
                self.check_paths(flag, path)?;
            }
        }
        Ok(change)
    }

    /// A flag set or removed must be allowed; a removal may also be the other side of an
    /// allowed `--x` / `--no-x` pair (setting one removes the other).
    fn allowed(&self, flag: &str, aliases: &Aliases) -> Result<(), PolicyError> {
        let opposite = aliases.opposite(flag);
        if self.flags.contains(flag) || opposite.is_some_and(|o| self.flags.contains(o)) {
            Ok(())
        } else {
            Err(PolicyError::NotAllowed {
                flag: flag.to_owned(),
            })
        }
    }

    /// Whether each path in `value`, resolved (symlinks, `..`), lies under a model directory.
    fn check_paths(&self, flag: &str, value: &str) -> Result<(), PolicyError> {
        let items: Vec<&str> = if LIST_FLAGS.contains(&flag) {
            value.split(',').collect()
        } else {
            vec![value]
        };
        let dirs: Vec<PathBuf> = self
            .model_dirs
            .iter()
            .filter_map(|dir| std::fs::canonicalize(dir).ok())
            .collect();
        for item in items {
            let unreadable = |source| PolicyError::Unreadable {
                flag: flag.to_owned(),
                path: item.to_owned(),
                source,
            };
            let path = std::fs::canonicalize(item).map_err(unreadable)?;
            if !dirs.iter().any(|dir| path.starts_with(dir)) {
                return Err(PolicyError::OutsideModelDirs {
                    flag: flag.to_owned(),
                    path: item.to_owned(),
                    dirs: self.dirs_text(),
                });
            }
        }
        Ok(())
    }

    fn dirs_text(&self) -> String {
        let dirs: Vec<String> = self
            .model_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        dirs.join(", ")
    }

    /// `loaded` (persisted) with every flag the API could not have set now put back to the
    /// operator's value (or removed, when the operator sets none), and a binary the API may not
    /// switch to put back to the operator's. Returns the names put back.
    pub fn sanitize(
        &self,
        loaded: &SavedArgs,
        operator: &SavedArgs,
        aliases: &Aliases,
        allowed_binaries: &[String],
    ) -> (SavedArgs, Vec<String>) {
        let mut out = loaded.clone();
        let mut dropped = Vec::new();
        if out.binary != operator.binary && !allowed_binaries.contains(&out.binary) {
            out.binary.clone_from(&operator.binary);
            dropped.push("binary".to_owned());
        }
        let flags: BTreeSet<&String> = loaded.args.keys().chain(operator.args.keys()).collect();
        for flag in flags {
            let (mine, theirs) = (loaded.args.get(flag), operator.args.get(flag));
            if mine == theirs {
                continue;
            }
            let change = Change {
                binary: None,
                flags: [(flag.clone(), mine.cloned())].into(),
            };
            // A path that no longer resolves keeps its text: the start will say what is wrong.
            match self.admit(change, aliases) {
                Ok(_) | Err(PolicyError::Unreadable { .. }) => continue,
                Err(_) => {}
            }
            match theirs {
                Some(value) => out.args.insert(flag.clone(), value.clone()),
                None => out.args.remove(flag),
            };
            dropped.push(flag.clone());
        }
        (out, dropped)
    }
}

/// The persisted `loaded` checked against `policy` (see [`ArgPolicy::sanitize`]): each flag put
/// back is logged as an error and the store rewritten, so the refused value is gone for good.
pub async fn checked_at_load(
    spec: &InstanceSpec,
    policy: &ArgPolicy,
    aliases: &Aliases,
    loaded: SavedArgs,
    store: &Store,
) -> Result<SavedArgs, SupervisorError> {
    let operator = spec.operator_args(aliases)?;
    let (args, dropped) =
        policy.sanitize(&loaded, &operator, aliases, &spec.settings.allowed_binaries);
    if dropped.is_empty() {
        return Ok(args);
    }
    for flag in &dropped {
        error!(
            name = spec.name,
            flag, "a persisted argument the API may not set differs from the operator's: put back"
        );
    }
    store
        .save(&args)
        .await
        .map_err(|source| SupervisorError::Store {
            name: spec.name.clone(),
            source,
        })?;
    Ok(args)
}

/// `argv` (spellings as written) with every secret value replaced by [`REDACTED`].
pub fn redact_argv(argv: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(argv.len());
    let mut secret_next = false;
    for word in argv {
        if std::mem::take(&mut secret_next) {
            out.push(REDACTED.to_owned());
            continue;
        }
        match word.split_once('=') {
            Some((flag, _)) if SECRET_FLAGS.contains(&flag) => {
                out.push(format!("{flag}={REDACTED}"));
            }
            _ => {
                secret_next = SECRET_FLAGS.contains(&word.as_str());
                out.push(word.clone());
            }
        }
    }
    out
}

/// Whether `flag` (as spelled) carries a secret, which views show as [`REDACTED`].
pub fn is_secret_flag(flag: &str) -> bool {
    SECRET_FLAGS.contains(&flag)
}

fn redact_value(flag: &str, value: &mut ArgValue) {
    if is_secret_flag(flag)
        && let ArgValue::Value(text) = value
    {
        *text = REDACTED.to_owned();
    }
}

impl SavedArgs {
    /// A copy for views: secret values replaced by [`REDACTED`].
    pub fn redacted(&self) -> SavedArgs {
        let mut out = self.clone();
        for (flag, value) in &mut out.args {
            redact_value(flag, value);
        }
        out
    }
}

impl Change {
    /// A copy for views: secret values replaced by [`REDACTED`].
    pub fn redacted(&self) -> Change {
        let mut out = self.clone();
        for (flag, value) in &mut out.flags {
            if let Some(value) = value {
                redact_value(flag, value);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const HELP: &str = "\
-m,    --model FNAME                    model path to load
-c,    --ctx-size N                     size of the prompt context
--path PATH                             path to serve static files from
-lf,   --log-file FNAME                 log to file
--mmap, --no-mmap                       whether to memory-map model
--mlock                                 force system to keep model in RAM
--lora FNAME                            path to LoRA adapter
--host HOST                             ip address to listen
--api-key KEY                           API key to use for authentication
";

    fn text(s: &str) -> Option<ArgValue> {
        Some(ArgValue::Value(s.to_owned()))
    }

    fn change(aliases: &Aliases, flags: &[(&str, Option<ArgValue>)]) -> Change {
        let flags = flags.iter().map(|(f, v)| ((*f).to_owned(), v.clone()));
        aliases.change(None, flags)
    }

    /// A model directory with a model, a sibling outside it and a link from inside to outside.
    struct Dirs {
        root: PathBuf,
    }

    impl Dirs {
        fn new(tag: &str) -> Dirs {
            let root =
                std::env::temp_dir().join(format!("steer-policy-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            for dir in ["models/sub", "outside"] {
                std::fs::create_dir_all(root.join(dir)).unwrap_or_else(|e| panic!("{e}"));
            }
            for file in ["models/a.gguf", "models/sub/b.gguf", "outside/secret"] {
                std::fs::write(root.join(file), "x").unwrap_or_else(|e| panic!("{e}"));
            }
            std::os::unix::fs::symlink(root.join("outside/secret"), root.join("models/link.gguf"))
                .unwrap_or_else(|e| panic!("{e}"));
            Dirs { root }
        }

        fn path(&self, rel: &str) -> String {
            self.root.join(rel).display().to_string()
        }

        fn policy(&self, extra: &[&str]) -> ArgPolicy {
            let extra: Vec<String> = extra.iter().map(|f| (*f).to_owned()).collect();
            ArgPolicy::new(&extra, &[], &self.path("models/a.gguf"))
        }
    }

    impl Drop for Dirs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    #[test]
    fn tuning_flags_pass_and_dangerous_ones_are_named() {
        let dirs = Dirs::new("names");
        let aliases = Aliases::parse_help(HELP);
        let policy = dirs.policy(&[]);
        let ok = policy.admit(change(&aliases, &[("-c", text("4096"))]), &aliases);
        assert!(ok.is_ok(), "{ok:?}");
        for (flag, value) in [
            ("--path", "/etc"),
            ("--log-file", "/tmp/x"),
            ("--host", "0.0.0.0"),
            ("--api-key", "k"),
            ("--slot-save-path", "/"),
            ("--ssl-key-file", "/etc/shadow"),
            ("--never-heard-of", "1"),
        ] {
            match policy.admit(change(&aliases, &[(flag, text(value))]), &aliases) {
                Err(err @ PolicyError::NotAllowed { .. }) => {
                    let message = err.to_string();
                    assert!(message.starts_with(flag), "{message}");
                    assert!(message.contains("api_flags"), "{message}");
                }
                other => panic!("{flag}: {other:?}"),
            }
        }
        // Removing one is a change too.
        let removal = policy.admit(change(&aliases, &[("--host", None)]), &aliases);
        assert!(matches!(removal, Err(PolicyError::NotAllowed { .. })));
        // An operator may allow one.
        let policy = dirs.policy(&["--host"]);
        let host = policy.admit(change(&aliases, &[("--host", text("0.0.0.0"))]), &aliases);
        assert!(host.is_ok(), "{host:?}");
    }

    #[test]
    fn aliases_cannot_evade_the_allowlist() {
        let dirs = Dirs::new("aliases");
        let aliases = Aliases::parse_help(HELP);
        let policy = dirs.policy(&[]);
        // `-lf` is `--log-file`.
        let short = policy.admit(change(&aliases, &[("-lf", text("/tmp/x"))]), &aliases);
        match short {
            Err(PolicyError::NotAllowed { flag }) => assert_eq!(flag, "--log-file"),
            other => panic!("{other:?}"),
        }
        // `--mmap` is allowed, and setting it removes `--no-mmap`.
        let mmap = policy.admit(
            change(&aliases, &[("--mmap", Some(ArgValue::Flag))]),
            &aliases,
        );
        assert!(mmap.is_ok(), "{mmap:?}");
        // A bare flag given a value, or a valued one given none, would shift later words.
        let shifted = policy.admit(change(&aliases, &[("--mlock", text("--path"))]), &aliases);
        assert!(matches!(shifted, Err(PolicyError::TakesNoValue { .. })));
        let shifted = policy.admit(change(&aliases, &[("-c", Some(ArgValue::Flag))]), &aliases);
        assert!(matches!(shifted, Err(PolicyError::NeedsValue { .. })));
    }

    #[test]
    fn paths_must_resolve_under_a_model_dir() {
        let dirs = Dirs::new("paths");
        let aliases = Aliases::parse_help(HELP);
        let policy = dirs.policy(&[]);
        let model = |value: &str| policy.admit(change(&aliases, &[("-m", text(value))]), &aliases);
        let inside = dirs.path("models/sub/../sub/b.gguf");
        let admitted = model(&inside).unwrap_or_else(|e| panic!("{e}"));
        let written = admitted.flags.get("--model");
        assert_eq!(written, Some(&text(&inside)), "passed on as written");
        for escape in ["models/../outside/secret", "models/link.gguf"] {
            match model(&dirs.path(escape)) {
                Err(err @ PolicyError::OutsideModelDirs { .. }) => {
                    let message = err.to_string();
                    assert!(message.contains("--model") && message.contains("model_dirs"));
                }
                other => panic!("{escape}: {other:?}"),
            }
        }
        assert!(matches!(
            model(&dirs.path("models/missing.gguf")),
            Err(PolicyError::Unreadable { .. })
        ));
        let list = format!(
            "{},{}",
            dirs.path("models/a.gguf"),
            dirs.path("outside/secret")
        );
        let lora = policy.admit(change(&aliases, &[("--lora", text(&list))]), &aliases);
        assert!(
            matches!(lora, Err(PolicyError::OutsideModelDirs { .. })),
            "{lora:?}"
        );
        // Configured directories replace the model's own.
        let policy = ArgPolicy::new(
            &[],
            &[dirs.root.join("outside")],
            &dirs.path("models/a.gguf"),
        );
        let secret = text(&dirs.path("outside/secret"));
        assert!(
            policy
                .admit(change(&aliases, &[("-m", secret)]), &aliases)
                .is_ok()
        );
    }

    #[test]
    fn persisted_args_the_api_could_not_set_go_back_to_the_operators() {
        let dirs = Dirs::new("load");
        let aliases = Aliases::parse_help(HELP);
        let policy = dirs.policy(&[]);
        let args = |binary: &str, flags: &[(&str, &str)]| SavedArgs {
            binary: binary.to_owned(),
            args: flags
                .iter()
                .map(|(f, v)| ((*f).to_owned(), ArgValue::Value((*v).to_owned())))
                .collect::<BTreeMap<_, _>>(),
        };
        let operator = args(
            "/opt/llama-server",
            &[
                ("--host", "0.0.0.0"),
                ("--model", &dirs.path("models/a.gguf")),
            ],
        );
        let loaded = args(
            "/bin/sh",
            &[
                ("--host", "10.9.9.9"),
                ("--path", "/etc"),
                ("--ctx-size", "8192"),
                ("--model", &dirs.path("outside/secret")),
            ],
        );
        let (clean, dropped) = policy.sanitize(&loaded, &operator, &aliases, &[]);
        assert_eq!(dropped, ["binary", "--host", "--model", "--path"]);
        let mut want = operator.clone();
        want.args
            .insert("--ctx-size".to_owned(), ArgValue::Value("8192".to_owned()));
        assert_eq!(clean, want, "the allowed --ctx-size stays");
        // The operator's own --host is kept even though the API may not set it.
        let (same, dropped) = policy.sanitize(&operator, &operator, &aliases, &[]);
        assert_eq!((same, dropped.len()), (operator.clone(), 0));
        let allowed = ["/bin/sh".to_owned()];
        let (_, dropped) = policy.sanitize(&loaded, &operator, &aliases, &allowed);
        assert!(!dropped.contains(&"binary".to_owned()));
    }

    #[test]
    fn secrets_are_redacted_in_views_only() {
        let args = SavedArgs {
            binary: "llama-server".to_owned(),
            args: [
                ("--api-key".to_owned(), ArgValue::Value("k3y".to_owned())),
                ("--ctx-size".to_owned(), ArgValue::Value("64".to_owned())),
            ]
            .into(),
        };
        assert_eq!(
            args.redacted().argv(),
            ["--api-key", REDACTED, "--ctx-size", "64"]
        );
        assert_eq!(args.argv(), ["--api-key", "k3y", "--ctx-size", "64"]);
        let argv: Vec<String> = ["-c", "1", "--api-key", "k", "--hf-token=t", "-hft", "u"]
            .iter()
            .map(|w| (*w).to_owned())
            .collect();
        assert_eq!(
            redact_argv(&argv),
            [
                "-c",
                "1",
                "--api-key",
                REDACTED,
                "--hf-token=<redacted>",
                "-hft",
                REDACTED
            ]
        );
    }
}
