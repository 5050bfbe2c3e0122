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

/// Every change needs the token: check-config says where it lives, and refuses a token file
/// others may read, saying how to fix it.
#[test]
fn check_config_names_the_token_file_and_refuses_a_shared_one() {
    use std::os::unix::fs::PermissionsExt;
    let out = steer(&["check-config", "--config", &example().to_string_lossy()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("changes need the bearer token in /var/lib/steer/admin.token"),
        "{stdout}"
    );
    let token = std::env::temp_dir().join(format!("steer-cli-{}-token", std::process::id()));
    std::fs::write(&token, "s3cret\n").unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644))
        .unwrap_or_else(|e| panic!("{e}"));
    let text = format!(
        "[agent]\ninterfaces = [\"eth0\"]\nadmin_addr = \"0.0.0.0:9090\"\nadmin_token_file = {:?}\n",
        token.display().to_string()
    );
    let path = temp_config("shared-token", &text);
    let out = steer(&["check-config", "--config", &path.to_string_lossy()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("run `chmod 600 {}`", token.display())),
        "{stderr}"
    );
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("{e}"));
    let out = steer(&["check-config", "--config", &path.to_string_lossy()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&token);
    let _ = std::fs::remove_file(&path);
}
