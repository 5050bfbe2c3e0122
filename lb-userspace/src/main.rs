//! `steer`: parse flags and config, run the agent until SIGINT or SIGTERM, and turn any error into
//! a message on stderr and exit code 1.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use lb_userspace::config::{Config, Overrides, parse_duration};
use lb_userspace::spec::{DataplaneKind, DriverConfig, InstanceSettings, InstanceSpec, XdpMode};
use lb_userspace::supervisor;
use lb_userspace::token;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "steer",
    version,
    about = "XDP load balancer for llama.cpp fleets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach XDP, program the services and serve the admin API until SIGINT or SIGTERM.
    Run(RunArgs),
    /// Validate a config file and print what it sets up.
    CheckConfig {
        /// Config file (TOML; see steer.example.toml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Ask the running agent to re-read its config and apply what changed (as SIGHUP does);
    /// print what changed, or why the config was refused (exit 1; the running one stays).
    Reload {
        /// The agent's config file: where its admin API and token file are.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The admin API's address, when `steer run` was given `--admin-addr`.
        #[arg(long, value_name = "ADDR")]
        admin_addr: Option<SocketAddr>,
    },
    /// Run one llama-server, revive it when it exits, and change its arguments over
    /// `POST /v1/params` until SIGINT or SIGTERM.
    Supervise(Box<SuperviseArgs>),
    /// The fleet in etcd (`[fleet]` of the config).
    #[cfg(feature = "etcd")]
    #[command(subcommand)]
    Fleet(FleetCommand),
}

#[cfg(feature = "etcd")]
#[derive(Subcommand)]
enum FleetCommand {
    /// Print every host, instance, group and rolling change the fleet holds, as etcd has them
    /// now (exit 1 if etcd does not answer).
    Get {
        /// Config file whose `[fleet]` names etcd and the prefix.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Every key with its revision and lease, as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct SuperviseArgs {
    /// Address of the params API (changes need the token in --admin-token-file).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8084")]
    supervisor_addr: SocketAddr,
    /// The llama-server binary (a path, or a name looked up in PATH).
    #[arg(long, value_name = "PATH")]
    binary: String,
    /// The GGUF model llama-server loads (`--model`).
    #[arg(long, value_name = "FILE")]
    model: String,
    /// The port llama-server listens on; the supervisor checks /health there.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    /// Where the arguments are persisted, as JSON: {"type": "file", "path": "...", "name": "..."}
    /// or {"type": "etcd", "addr": "127.0.0.1:2379", "name": "...", "cache": "FILE"} (etcd
    /// needs the `etcd` feature). Default: the file /var/lib/steer/config.toml, name "default".
    /// Persisted arguments win over --binary, --model, --port and the arguments after `--`
    /// where those are unchanged since they were saved; an edit of them wins.
    #[arg(long, value_name = "JSON", value_parser = parse_driver)]
    config_driver: Option<DriverConfig>,
    /// How long a start may take to answer 200 on /health.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration)]
    startup_timeout: Duration,
    /// Changes closer together than this are applied as one.
    #[arg(long, value_name = "DURATION", default_value = "200ms", value_parser = duration)]
    debounce: Duration,
    /// How long llama-server gets between SIGTERM and SIGKILL.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    stop_grace: Duration,
    /// File holding the bearer token that changes need; generated (mode 0600) when missing.
    /// It must not be open to group or others.
    #[arg(long, value_name = "FILE", default_value = token::DEFAULT_TOKEN_FILE)]
    admin_token_file: PathBuf,
    /// A binary the API may switch `binary` to (repeatable).
    #[arg(long = "allowed-binary", value_name = "PATH")]
    allowed_binaries: Vec<String>,
    /// A flag the API may set beyond the default tuning flags (repeatable), e.g. `--host`.
    #[arg(long = "api-flag", value_name = "FLAG")]
    api_flags: Vec<String>,
    /// A directory path-valued flags set over the API (`--model`, `--lora`, ...) must lie in
    /// (repeatable); default: the directory of --model.
    #[arg(long = "model-dir", value_name = "DIR")]
    model_dirs: Vec<PathBuf>,
    /// The user llama-server runs as when the supervisor is root (default `nobody`); `root`
    /// keeps root, with a warning.
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    /// Log filter (`info`, `debug`; llama-server's output is `llama_server=debug`); default:
    /// RUST_LOG, else `info`.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    log_format: LogFormat,
    /// More llama-server arguments, e.g. `-- -np 2 -c 2048`.
    #[arg(last = true, value_name = "ARGS")]
    extra: Vec<String>,
}

fn parse_driver(text: &str) -> Result<DriverConfig, String> {
    text.parse::<DriverConfig>().map_err(|err| err.to_string())
}

fn duration(text: &str) -> Result<Duration, String> {
    parse_duration(text).ok_or_else(|| {
        format!("`{text}` is not a duration like 500ms, 10s, 10m or 1h (above zero, at most 8760h)")
    })
}

#[derive(Args)]
struct RunArgs {
    /// Config file (TOML; see steer.example.toml).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Interface to attach to (repeatable); replaces the config's `agent.interfaces`.
    #[arg(long = "interface", value_name = "IF")]
    interfaces: Vec<String>,
    #[arg(long, value_enum)]
    xdp_mode: Option<XdpMode>,
    /// Admin API listen address; replaces the config's `agent.admin_addr`.
    #[arg(long, value_name = "ADDR")]
    admin_addr: Option<SocketAddr>,
    /// `userspace`: no BPF, every connection through the proxy; replaces `agent.dataplane`.
    #[arg(long, value_enum)]
    dataplane: Option<DataplaneKind>,
    /// Log filter (`info`, `debug`, `lb_userspace=debug,...`; the access log is
    /// `steer::access`); default: RUST_LOG, else `info`.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    log_format: LogFormat,
}

/// How log lines are written (to stderr).
#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
enum LogFormat {
    /// `TIME LEVEL target: message key=value...`, coloured on a terminal only.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields` (`message` among
    /// them), `span`.
    Json,
}

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("steer: error: {}", describe(&err));
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::CheckConfig { config } => {
            let config = Config::load(&config, &Overrides::default())?;
            // A token file that exists must already pass the checks `run` makes; one this user
            // may not open is the agent's to judge.
            match token::read_existing(&config.admin_token_file) {
                Err(token::TokenError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::PermissionDenied => {}
                other => {
                    other.context("agent.admin_token_file")?;
                }
            }
            write!(std::io::stdout().lock(), "{config}").context("writing the summary")?;
            Ok(())
        }
        Command::Run(args) => {
            init_logging(args.log_level.as_deref(), args.log_format)?;
            let overrides = Overrides {
                interfaces: args.interfaces,
                xdp_mode: args.xdp_mode,
                admin_addr: args.admin_addr,
                dataplane: args.dataplane,
            };
            let config = Config::load(&args.config, &overrides)?;
            let open_files = lb_userspace::limits::raise_open_files();
            let reloading = lb_userspace::Reloading::new(overrides, open_files);
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            runtime.block_on(async {
                let trigger = reloading.trigger.clone();
                let (shutdown, force) =
                    shutdown_signals(Some(trigger)).context("installing signal handlers")?;
                lb_userspace::run(config, reloading, shutdown, force).await?;
                Ok(())
            })
        }
        Command::Reload { config, admin_addr } => {
            let (admin, token_file) = Config::admin_endpoint(&config, admin_addr)?;
            let token = token::read_existing(&token_file)
                .context("agent.admin_token_file")?
                .with_context(|| {
                    format!(
                        "no token in {} (has the agent started?)",
                        token_file.display()
                    )
                })?;
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            let wait = Duration::from_secs(600);
            let (status, body) =
                runtime.block_on(lb_userspace::reload::ask(admin, token.secret(), wait))?;
            let answer: serde_json::Value = serde_json::from_str(&body)
                .with_context(|| format!("the agent answered {status}: {body}"))?;
            if status != 200 {
                let error = answer["error"].as_str().unwrap_or(&body);
                anyhow::bail!("reload refused ({status}): {error}");
            }
            writeln!(std::io::stdout().lock(), "{answer:#}").context("writing the report")?;
            Ok(())
        }
        Command::Supervise(args) => supervise(*args),
        #[cfg(feature = "etcd")]
        Command::Fleet(FleetCommand::Get { config, json }) => {
            use lb_userspace::fleet;
            let config = Config::load(&config, &Overrides::default())?;
            let spec = config
                .fleet
                .with_context(|| format!("{}: no [fleet]", config.path.display()))?;
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            let (view, stored, skipped) = runtime.block_on(fleet::read(&spec))?;
            let text = if json {
                format!("{:#}\n", fleet::show::json(&view, &stored, &skipped))
            } else {
                fleet::show::text(&spec, &view, &skipped)
            };
            std::io::stdout()
                .lock()
                .write_all(text.as_bytes())
                .context("writing the fleet")?;
            Ok(())
        }
    }
}

fn supervise(args: SuperviseArgs) -> anyhow::Result<()> {
    init_logging(args.log_level.as_deref(), args.log_format)?;
    lb_userspace::limits::raise_open_files();
    let driver = args
        .config_driver
        .unwrap_or_else(|| supervisor::default_driver(supervisor::DEFAULT_CONFIG_NAME));
    let spec = InstanceSpec {
        name: driver.name().to_owned(),
        binary: args.binary,
        model: args.model,
        port: args.port,
        extra_args: args.extra,
        settings: InstanceSettings {
            startup_timeout: args.startup_timeout,
            debounce: args.debounce,
            stop_grace: args.stop_grace,
            allowed_binaries: args.allowed_binaries,
            api_flags: args.api_flags,
            model_dirs: args.model_dirs,
            user: args.user,
        },
        driver,
        backend: None,
        group: None,
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    runtime.block_on(async {
        let (shutdown, _) = shutdown_signals(None).context("installing signal handlers")?;
        let token = &args.admin_token_file;
        lb_userspace::supervise(spec, args.supervisor_addr, token, shutdown).await?;
        Ok(())
    })
}

fn init_logging(level: Option<&str>, format: LogFormat) -> anyhow::Result<()> {
    let filter = match (level, std::env::var("RUST_LOG")) {
        (Some(level), _) => log_filter(level).context("--log-level")?,
        (None, Ok(env)) => log_filter(&env).context("RUST_LOG")?,
        (None, Err(_)) => EnvFilter::new("info"),
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().with_current_span(false).init(),
    }
    Ok(())
}

/// A log filter of comma-separated directives, each a level or `target[span{field}]=level`. A
/// bare word that is neither a level nor looks like a module path (`lb_userspace`,
/// `steer::access`) is refused: tracing would read `verbose` as "everything of target
/// `verbose`", which logs nothing, in silence.
fn log_filter(directives: &str) -> anyhow::Result<EnvFilter> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    for directive in directives.split(',').map(str::trim) {
        let is_level = LEVELS.iter().any(|l| l.eq_ignore_ascii_case(directive))
            || matches!(directive, "0" | "1" | "2" | "3" | "4" | "5");
        let is_path = directive.contains("::") || directive.contains('_');
        if !directive.contains('=') && !directive.is_empty() && !is_level && !is_path {
            anyhow::bail!(
                "`{directive}` is not a level ({}) nor a directive like `lb_userspace=debug` \
                 (every event of a target: `{directive}=trace`)",
                LEVELS.join(", ")
            );
        }
        EnvFilter::try_new(directive).with_context(|| format!("`{directive}`"))?;
    }
    Ok(EnvFilter::try_new(directives)?)
}

/// The first SIGINT or SIGTERM completes the first future (drain), the next one the second
/// (cut it short). SIGHUP asks `reload` for a reload (its outcome is logged by the agent);
/// without one (`steer supervise`), and always for SIGUSR1 and SIGUSR2, whose default is to kill
/// the process, the signal is logged and otherwise ignored. The handlers are installed before
/// either future is awaited; call in the runtime.
fn shutdown_signals(
    reload: Option<lb_userspace::reload::Trigger>,
) -> std::io::Result<(impl Future<Output = ()>, impl Future<Output = ()>)> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut user1 = signal(SignalKind::user_defined1())?;
    let mut user2 = signal(SignalKind::user_defined2())?;
    let (seen, signals) = tokio::sync::watch::channel(0u32);
    // One reload at a time, off the signal loop; SIGHUPs during one make one more (a stored
    // permit), which reads the file as it is then. The agent logs each outcome.
    let hangups = Arc::new(tokio::sync::Notify::new());
    if let Some(trigger) = reload.clone() {
        let hangups = Arc::clone(&hangups);
        tokio::spawn(async move {
            loop {
                hangups.notified().await;
                let _ = trigger.reload().await;
            }
        });
    }
    tokio::spawn(async move {
        loop {
            let (name, stops) = tokio::select! {
                _ = interrupt.recv() => ("SIGINT", true),
                _ = terminate.recv() => ("SIGTERM", true),
                _ = hangup.recv() => ("SIGHUP", false),
                _ = user1.recv() => ("SIGUSR1", false),
                _ = user2.recv() => ("SIGUSR2", false),
            };
            if !stops {
                if let (Some(_), "SIGHUP") = (&reload, name) {
                    tracing::info!(signal = name, "reloading the config");
                    hangups.notify_one();
                } else if name == "SIGHUP" {
                    tracing::warn!(signal = name, "ignored: `steer supervise` has no reload");
                } else {
                    tracing::warn!(signal = name, "ignored: it means nothing to the agent");
                }
                continue;
            }
            seen.send_modify(|n| *n += 1);
            match *seen.borrow() {
                1 => tracing::info!(signal = name, "shutting down; another signal cuts it short"),
                _ => tracing::warn!(signal = name, "shutting down now"),
            }
        }
    });
    let after = |count: u32| {
        let mut signals = signals.clone();
        async move {
            // The sender lives as long as the runtime.
            let _ = signals.wait_for(|n| *n >= count).await;
        }
    };
    Ok((after(1), after(2)))
}

/// The error and its causes on one line, skipping a cause whose text the line already carries
/// (several errors print their source inline).
fn describe(err: &anyhow::Error) -> String {
    let mut line = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_filter_is_levels_and_directives_and_nothing_that_would_log_nothing() {
        for good in [
            "info",
            "DEBUG",
            "warn,lb_userspace=debug",
            "steer::access=off,info",
        ] {
            assert!(log_filter(good).is_ok(), "{good}");
        }
        for (bad, says) in [
            ("verbose", "`verbose` is not a level"),
            ("info,loud", "`loud` is not a level"),
            ("lb_userspace=loudest", "loudest"),
        ] {
            let error = format!("{:#}", log_filter(bad).expect_err(bad));
            assert!(error.contains(says), "{bad}: {error}");
        }
    }
}
