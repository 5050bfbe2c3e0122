//! Reading the agent's and the supervisor's `/metrics` (Prometheus text) in tests.

use prometheus_parse::{Scrape, Value};

/// Parses `text`, panicking with it when it is not Prometheus text.
pub fn parse(text: &str) -> Scrape {
    let lines = text.lines().map(|line| Ok(line.to_owned()));
    Scrape::parse(lines).unwrap_or_else(|e| panic!("/metrics does not parse ({e}):\n{text}"))
}

/// The value of the one sample of `name` whose labels include `labels`; panics unless there is
/// exactly one and it is a counter or a gauge.
pub fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
        .collect();
    match found[..] {
        [sample] => match sample.value {
            Value::Counter(v) | Value::Gauge(v) => v,
            ref other => panic!("{name}{labels:?} is neither a counter nor a gauge: {other:?}"),
        },
        _ => panic!("{name}{labels:?}: {} samples, want 1", found.len()),
    }
}

/// Panics with promtool's findings unless `promtool check metrics` (Debian prometheus, from
/// `cargo xtask deps`) passes `text`, a whole exposition.
pub fn assert_promtool_clean(text: &str) {
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask deps installs Debian prometheus)");
    std::io::Write::write_all(&mut promtool.stdin.take().expect("a pipe"), text.as_bytes())
        .expect("promtool's stdin");
    let linted = promtool.wait_with_output().expect("promtool ran");
    assert!(
        linted.status.success(),
        "{}{}",
        String::from_utf8_lossy(&linted.stdout),
        String::from_utf8_lossy(&linted.stderr)
    );
}
