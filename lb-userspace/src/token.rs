//! The admin API's bearer token file: read at start, or generated there at the first start.
//!
//! Whoever reads the token can steer traffic and change llama-server's arguments, so the file
//! must be the agent's own and private (mode 0600, no access for group or others): any other
//! file is refused with the command that fixes it. A new token is 32 random bytes from
//! `/dev/urandom` as hex, written to a private temp file and linked into place, so a reader never
//! sees half a token and two agents starting together end up with the same one.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tracing::info;

use crate::spec::AdminToken;

/// Where the token lives when neither `agent.admin_token_file` nor `--admin-token-file` says.
pub const DEFAULT_TOKEN_FILE: &str = "/var/lib/steer/admin.token";
const TOKEN_BYTES: usize = 32;
/// Permission bits that give group or others any access.
const SHARED_BITS: u32 = 0o077;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("admin token file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "admin token file {} is open to group or others (mode {mode:04o}): run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    Shared { path: PathBuf, mode: u32 },
    #[error(
        "admin token file {} belongs to uid {owner}, not to the agent's uid {uid}: run \
         `chown {uid} {}`",
        path.display(),
        path.display()
    )]
    NotOwned { path: PathBuf, owner: u32, uid: u32 },
    #[error("admin token file {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error(
        "admin token file {} is empty: write a token into it, or delete it to have one generated",
        path.display()
    )]
    Empty { path: PathBuf },
}

/// The token in `path`, generated there first when the file does not exist. Logs where it is.
pub fn load_or_create(path: &Path) -> Result<AdminToken, TokenError> {
    if let Some(token) = read_existing(path)? {
        info!(path = %path.display(), "admin API token read");
        return Ok(token);
    }
    create(path)?;
    // Read back what is in place: another agent may have linked its token first.
    let token = read_existing(path)?.ok_or_else(|| io(path, ErrorKind::NotFound.into()))?;
    info!(path = %path.display(), "generated the admin API token (mutating calls need it)");
    Ok(token)
}

/// The token in `path`, `None` when the file does not exist; refused when others can read it.
pub fn read_existing(path: &Path) -> Result<Option<AdminToken>, TokenError> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(io(path, err)),
    };
    // Checked on the open file, so a swapped path cannot slip past.
    let meta = file.metadata().map_err(|e| io(path, e))?;
    if !meta.is_file() {
        return Err(TokenError::NotAFile {
            path: path.to_owned(),
        });
    }
    if meta.mode() & SHARED_BITS != 0 {
        return Err(TokenError::Shared {
            path: path.to_owned(),
            mode: meta.mode() & 0o7777,
        });
    }
    let uid = nix::unistd::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(TokenError::NotOwned {
            path: path.to_owned(),
            owner: meta.uid(),
            uid,
        });
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(|e| io(path, e))?;
    AdminToken::from_text(&text)
        .map(Some)
        .ok_or_else(|| TokenError::Empty {
            path: path.to_owned(),
        })
}

/// Writes a new token to `path` unless a file appeared there meanwhile. Missing directories are
/// created private (0700).
fn create(path: &Path) -> Result<(), TokenError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io(dir, e))?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = write_private(&temp, &random_hex()?);
    let linked = written.and_then(|()| match std::fs::hard_link(&temp, path) {
        Err(err) if err.kind() != ErrorKind::AlreadyExists => Err(io(path, err)),
        _ => Ok(()),
    });
    let _ = std::fs::remove_file(&temp);
    linked?;
    // The link is durable once the directory is.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))
}

fn write_private(path: &Path, token: &str) -> Result<(), TokenError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io(path, e))?;
    file.write_all(token.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .map_err(|e| io(path, e))
}

fn random_hex() -> Result<String, TokenError> {
    let source = Path::new("/dev/urandom");
    let mut bytes = [0u8; TOKEN_BYTES];
    File::open(source)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| io(source, e))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn io(path: &Path, source: std::io::Error) -> TokenError {
    TokenError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_trimmed_compared_whole_and_never_printed() {
        let token = AdminToken::from_text(" s3cret\n");
        assert!(token.as_ref().is_some_and(|t| t.matches("s3cret")));
        assert!(token.as_ref().is_some_and(|t| !t.matches("s3cre")));
        assert_eq!(format!("{token:?}"), "Some(AdminToken(<redacted>))");
        assert!(AdminToken::from_text(" \n").is_none());
    }
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("steer-token-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn generated_once_private_and_then_read_back() {
        let dir = temp_dir("generate");
        let path = dir.join("state/admin.token");
        let token = load_or_create(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.join("state")), 0o700);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
        let hex = text.trim();
        assert_eq!(hex.len(), 2 * TOKEN_BYTES);
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()), "{hex}");
        assert!(token.matches(hex));
        let again = load_or_create(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(again.matches(hex), "the second start keeps the token");
        let leftovers: Vec<_> = std::fs::read_dir(dir.join("state"))
            .unwrap_or_else(|e| panic!("{e}"))
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers, ["admin.token"], "no temp file left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_token_file_others_can_read_is_refused_with_the_fix() {
        let dir = temp_dir("shared");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("admin.token");
        std::fs::write(&path, "s3cret\n").unwrap_or_else(|e| panic!("{e}"));
        for bits in [0o644, 0o640, 0o604, 0o620] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(bits))
                .unwrap_or_else(|e| panic!("{e}"));
            match load_or_create(&path) {
                Err(err @ TokenError::Shared { .. }) => {
                    let text = err.to_string();
                    assert!(
                        text.contains(&format!("chmod 600 {}", path.display())),
                        "{text}"
                    );
                    assert!(text.contains(&format!("{bits:04o}")), "{text}");
                }
                other => panic!("mode {bits:o}: {other:?}"),
            }
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .unwrap_or_else(|e| panic!("{e}"));
        let token = load_or_create(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(token.matches("s3cret"));
        std::fs::write(&path, "\n").unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            load_or_create(&path),
            Err(TokenError::Empty { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
