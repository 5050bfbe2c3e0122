//! Compiles the C kernel programs with clang into `$OUT_DIR`, so `lib.rs` can embed them.

use std::{env, path::PathBuf, process::Command};

use anyhow::{Context, bail};

/// clang binaries tried in order; `STEER_CLANG` overrides.
const CLANGS: &[&str] = &["clang-19", "clang"];
const PROGRAMS: &[&str] = &["steer.bpf.c", "empty.bpf.c"];
const HEADERS: &[&str] = &[
    "src/parsing.h",
    "src/csum.h",
    "src/clock.h",
    "src/compiler.h",
    "src/conntrack.h",
    "src/counters.h",
    "src/events.h",
    "src/hash.h",
    "src/ids.h",
    "src/maps.h",
    "src/nat.h",
    "src/policy.h",
    "../lb-common/include/steer_abi.h",
];

fn clang() -> anyhow::Result<String> {
    if let Ok(clang) = env::var("STEER_CLANG") {
        return Ok(clang);
    }
    for candidate in CLANGS {
        if Command::new(candidate).arg("--version").output().is_ok() {
            return Ok((*candidate).to_owned());
        }
    }
    bail!(
        "clang not found (tried {CLANGS:?}): run `cargo xtask deps` or `apt-get install clang-19 libbpf-dev`"
    )
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=STEER_CLANG");
    for header in HEADERS {
        println!("cargo:rerun-if-changed={header}");
    }
    let clang = clang()?;
    let out_dir = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?);
    let arch_include = format!("-I/usr/include/{}-linux-gnu", env::consts::ARCH);
    for program in PROGRAMS {
        let source = PathBuf::from("src").join(program);
        println!("cargo:rerun-if-changed={}", source.display());
        let object = out_dir.join(program.replace(".c", ".o"));
        let output = Command::new(&clang)
            .args([
                "-O2",
                "-g",
                "-target",
                "bpf",
                "-mcpu=v3",
                "-D__TARGET_ARCH_x86",
            ])
            .args(["-Wall", "-Wextra", "-Werror"])
            .arg(&arch_include)
            .arg("-I../lb-common/include")
            .arg("-c")
            .arg(&source)
            .arg("-o")
            .arg(&object)
            .output()
            .with_context(|| format!("running {clang}"))?;
        if !output.status.success() {
            bail!(
                "{clang} failed on {}:\n{}",
                source.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    Ok(())
}
