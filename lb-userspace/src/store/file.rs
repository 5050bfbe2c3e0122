//! The file driver: one TOML file, one top-level table per config name.
//!
//! ```toml
//! [gpt]
//! binary = "/opt/llama/llama-server"
//!
//! [gpt.args]
//! --model = "/models/gpt.gguf"
//! --flash-attn = true
//! "-c" = "4096"  # quoting keys is optional
//! ```
//!
//! A save rewrites the whole file atomically (temp file, fsync, rename, fsync of the directory)
//! under an exclusive `flock` on the sibling `<file>.lock`, re-reading the file inside the lock
//! so concurrent savers of other names never lose each other's tables. Other tables keep their
//! content; comments and formatting are not preserved.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use toml::Spanned;
use tracing::debug;

use super::{Record, StoreError, Stored};
use crate::durable;

/// How long a save waits for another writer's lock before giving up.
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);
const LOCK_RETRY: Duration = Duration::from_millis(5);

/// The parsed file: each top-level entry with where it starts, for error lines.
type Document = BTreeMap<String, Spanned<toml::Value>>;

#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
    name: String,
}

impl FileStore {
    pub fn new(path: PathBuf, name: String) -> FileStore {
        FileStore { path, name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub async fn load(&self) -> Result<Option<Stored>, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.load_blocking())
            .await
            .map_err(StoreError::Task)?
    }

    pub async fn save(&self, stored: &Stored) -> Result<(), StoreError> {
        let value =
            toml::Value::try_from(Record::from(stored)).map_err(|e| StoreError::Encode {
                name: self.name.clone(),
                message: e.to_string(),
            })?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.save_blocking(value))
            .await
            .map_err(StoreError::Task)?
    }

    fn load_blocking(&self) -> Result<Option<Stored>, StoreError> {
        // Saves replace the file by rename, so a reader needs no lock: it sees the old or the
        // new file, never a mix.
        let Some(text) = self.read()? else {
            return Ok(None);
        };
        let doc = self.parse(&text)?;
        let Some(entry) = doc.get(&self.name) else {
            return Ok(None);
        };
        let record =
            entry
                .get_ref()
                .clone()
                .try_into::<Record>()
                .map_err(|e| StoreError::Corrupt {
                    path: self.path.clone(),
                    line: line_of(&text, entry.span().start),
                    message: format!("config {:?}: {}", self.name, e.message()),
                })?;
        Ok(Some(record.into()))
    }

    fn save_blocking(&self, value: toml::Value) -> Result<(), StoreError> {
        durable::create_dir(&self.path).map_err(|source| self.write_error(source))?;
        let _lock = self.lock()?;
        let text = self.read()?.unwrap_or_default();
        // Refuse to replace a file we cannot parse: that would drop every other config in it.
        let doc = self.parse(&text)?;
        let mut table: toml::Table = doc
            .into_iter()
            .map(|(name, entry)| (name, entry.into_inner()))
            .collect();
        table.insert(self.name.clone(), value);
        let text = toml::to_string(&table).map_err(|e| StoreError::Encode {
            name: self.name.clone(),
            message: e.to_string(),
        })?;
        durable::replace(&self.path, text.as_bytes()).map_err(|source| self.write_error(source))?;
        debug!(path = %self.path.display(), name = %self.name, "saved config");
        Ok(())
    }

    /// The file's text, or `None` when it does not exist yet.
    fn read(&self) -> Result<Option<String>, StoreError> {
        match fs::read_to_string(&self.path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Read {
                path: self.path.clone(),
                source,
            }),
        }
    }

    fn parse(&self, text: &str) -> Result<Document, StoreError> {
        toml::from_str(text).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            line: e.span().map_or(1, |span| line_of(text, span.start)),
            message: e.message().to_owned(),
        })
    }

    /// Takes the exclusive save lock. The lock lives on a sibling file because the config file
    /// itself is replaced by each save, and a lock on a replaced inode excludes nobody.
    fn lock(&self) -> Result<Flock<File>, StoreError> {
        let path = durable::sibling(&self.path, ".lock");
        let lock_error = |source| StoreError::Lock {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(lock_error)?;
        let deadline = Instant::now() + LOCK_TIMEOUT;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(lock),
                Err((f, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                    file = f;
                    std::thread::sleep(LOCK_RETRY);
                }
                Err((_, Errno::EWOULDBLOCK)) => {
                    return Err(lock_error(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("another writer held the lock for {LOCK_TIMEOUT:?}"),
                    )));
                }
                Err((_, errno)) => return Err(lock_error(errno.into())),
            }
        }
    }

    fn write_error(&self, source: io::Error) -> StoreError {
        StoreError::Write {
            path: self.path.clone(),
            source,
        }
    }
}

/// The 1-based line holding byte `offset` of `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ArgValue, SavedArgs};
    use std::os::unix::fs::PermissionsExt;

    fn stored(model: &str) -> Stored {
        Stored {
            args: args(model),
            configured: None,
        }
    }

    fn args(model: &str) -> SavedArgs {
        SavedArgs {
            binary: "/opt/llama/llama-server".into(),
            args: BTreeMap::from([
                ("--model".into(), ArgValue::Value(model.into())),
                ("--flash-attn".into(), ArgValue::Flag),
            ]),
        }
    }

    fn temp_dir() -> io::Result<PathBuf> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("steer-store-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    #[tokio::test]
    async fn missing_file_loads_none_and_save_creates_it_private()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = temp_dir()?;
        let path = dir.join("new/sub/config.toml");
        let store = FileStore::new(path.clone(), "gpt".into());
        assert_eq!(store.load().await?, None);
        store.save(&stored("/m.gguf")).await?;
        assert_eq!(store.load().await?, Some(stored("/m.gguf")));
        let with_configured = Stored {
            args: args("/m.gguf"),
            configured: Some(args("/configured.gguf")),
        };
        store.save(&with_configured).await?;
        assert_eq!(store.load().await?, Some(with_configured));
        assert_eq!(fs::metadata(&path)?.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            fs::metadata(dir.join("new"))?.permissions().mode() & 0o777,
            0o700
        );
        let text = fs::read_to_string(&path)?;
        assert!(text.contains("[gpt.args]"), "{text}");
        // Dashes are allowed in bare keys: `--flash-attn = true`.
        assert!(text.contains("\n--flash-attn = true\n"), "{text}");
        fs::remove_dir_all(dir)?;
        Ok(())
    }

    #[tokio::test]
    async fn hand_written_table_loads() -> Result<(), Box<dyn std::error::Error>> {
        let dir = temp_dir()?;
        let path = dir.join("c.toml");
        fs::write(
            &path,
            "# comment\n[other]\nbinary = \"x\"\n\n[gpt]\nbinary = \"/b\"\n[gpt.args]\n\"-c\" = 4096\n\"--mlock\" = true\n",
        )?;
        let store = FileStore::new(path, "gpt".into());
        let loaded = store.load().await?;
        let expected = SavedArgs {
            binary: "/b".into(),
            args: BTreeMap::from([
                ("-c".into(), ArgValue::Value("4096".into())),
                ("--mlock".into(), ArgValue::Flag),
            ]),
        };
        assert_eq!(loaded.map(|s| s.args), Some(expected));
        fs::remove_dir_all(dir)?;
        Ok(())
    }

    #[tokio::test]
    async fn invalid_table_names_its_line() -> Result<(), Box<dyn std::error::Error>> {
        let dir = temp_dir()?;
        let path = dir.join("c.toml");
        fs::write(
            &path,
            "[other]\nbinary = \"x\"\n\n[gpt]\nbinnary = \"/b\"\n",
        )?;
        let store = FileStore::new(path.clone(), "gpt".into());
        match store.load().await {
            Err(e @ StoreError::Corrupt { line: 4, .. }) => {
                let text = e.to_string();
                assert!(
                    text.starts_with(&format!("{}:4:", path.display())),
                    "{text}"
                );
                assert!(text.contains("binnary"), "{text}");
            }
            other => panic!("expected a corrupt-file error at line 4, got {other:?}"),
        }
        // Another name in the same file is unaffected.
        let other = FileStore::new(path, "other".into());
        assert_eq!(other.load().await?.map(|s| s.args.binary), Some("x".into()));
        fs::remove_dir_all(dir)?;
        Ok(())
    }

    #[tokio::test]
    async fn other_entries_keep_their_content_across_a_save()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = temp_dir()?;
        let path = dir.join("c.toml");
        // A plain value after a table in name order: the writer must still put it first.
        let before = "zz = 1\n[aa]\nbinary = \"/a\"\nx = [1, 2]\n[aa.args]\n\"-c\" = 5\n";
        fs::write(&path, before)?;
        FileStore::new(path.clone(), "gpt".into())
            .save(&stored("/m.gguf"))
            .await?;
        let after: toml::Table = fs::read_to_string(&path)?.parse()?;
        let mut expected: toml::Table = before.parse()?;
        expected.insert("gpt".into(), toml::Value::try_from(args("/m.gguf"))?);
        assert_eq!(after, expected);
        fs::remove_dir_all(dir)?;
        Ok(())
    }

    #[test]
    fn lines_are_one_based() {
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 99), 3);
    }
}
