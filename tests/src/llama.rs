//! Where tests find llama-server and its model: `STEER_LLAMA_SERVER` / `STEER_MODEL` when set,
//! else the cache `cargo xtask deps` fills.

use std::path::PathBuf;

/// The cache layout, shared with xtask so the two never disagree.
mod cache {
    include!("../../xtask/src/cache.rs");
}

pub use cache::{LLAMA_VERSION, MODEL_FILE};

/// The llama-server binary to test with. Panics, saying how to get it, when it is missing.
pub fn llama_server_path() -> PathBuf {
    resolve(
        "STEER_LLAMA_SERVER",
        cache::llama_server_path(&cache::cache_dir()),
    )
}

/// The GGUF model to test with. Panics, saying how to get it, when it is missing.
pub fn model_path() -> PathBuf {
    resolve("STEER_MODEL", cache::model_path(&cache::cache_dir()))
}

fn resolve(var: &str, cached: PathBuf) -> PathBuf {
    let path = std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map_or(cached, PathBuf::from);
    assert!(
        path.is_file(),
        "{} does not exist: run `cargo xtask deps` (or set {var}; the cache is \
         $STEER_CACHE, default /var/cache/steer)",
        path.display()
    );
    path
}
