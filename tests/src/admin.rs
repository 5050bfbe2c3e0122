//! The admin token every test agent and supervisor runs with: mutating calls on the admin and
//! params APIs need it. Tests write it with [`token_file`], point `agent.admin_token_file` (see
//! [`crate::topology::Topology`], which does) or `--admin-token-file` at that file, and send
//! [`TOKEN`] as `Authorization: Bearer` (`HttpConn::with_token` does).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The token itself: tests have nothing to hide, only the agent's checks to pass.
pub const TOKEN: &str = "steer-test-admin-token";

/// Writes [`TOKEN`] to `dir/admin.token`, mode 0600 (the agent refuses a shared file), and
/// returns that path.
pub fn token_file(dir: &Path) -> PathBuf {
    let path = dir.join("admin.token");
    std::fs::write(&path, format!("{TOKEN}\n"))
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod 600 {}: {e}", path.display()));
    path
}
