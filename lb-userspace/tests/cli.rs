//! The `steer` binary without root: config checking, error reporting and exit codes.

use std::path::PathBuf;
use std::process::{Command, Output};

fn steer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_steer"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running steer: {e}"))
}

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../steer.example.toml")
}

fn temp_config(name: &str, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("steer-cli-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

#[test]
fn check_config_prints_a_summary_of_the_example() {
    let out = steer(&["check-config", "--config", &example().to_string_lossy()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("interfaces: eth0 (native XDP)"), "{stdout}");
    assert!(
        stdout.contains("service chat 10.0.0.100:80 slots: 2 backend(s)"),
        "{stdout}"
    );
}

#[test]
fn config_errors_exit_1_naming_file_line_and_field() {
    let text = std::fs::read_to_string(example())
        .unwrap_or_else(|e| panic!("{e}"))
        .replace("address = \"10.0.1.3:8080\"", "address = \"10.0.1.3\"");
    let path = temp_config("bad-address", &text);
    let line = text
        .lines()
        .position(|l| l.contains("\"10.0.1.3\""))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("edited line not found"));
    for args in [
        vec!["check-config", "--config"],
        vec!["run", "--interface", "lo", "--config"],
    ] {
        let mut args = args.clone();
        let path = path.to_string_lossy();
        args.push(&path);
        let out = steer(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let expected = format!("{path}:{line}:11: service[0].backend[1].address:");
        assert!(stderr.contains(&expected), "{stderr}");
        assert!(out.stdout.is_empty());
    }
    std::fs::remove_file(&path).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn missing_config_file_is_named() {
    let out = steer(&["check-config", "--config", "/nonexistent/steer.toml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.starts_with("steer: error: reading config file /nonexistent/steer.toml: "),
        "{stderr}"
    );
}

#[test]
fn public_admin_address_needs_a_token() {
    let out = steer(&[
        "run",
        "--config",
        &example().to_string_lossy(),
        "--admin-addr",
        "0.0.0.0:9090",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("--admin-addr: 0.0.0.0:9090 is not a loopback address"),
        "{stderr}"
    );
}
