//! `steer`: parse flags and config, run the agent until SIGINT or SIGTERM, and turn any error into
//! a message on stderr and exit code 1.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use lb_userspace::config::{Config, Overrides};
use lb_userspace::dataplane::xdp::XdpMode;
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
    /// Log filter (`info`, `debug`, `lb_userspace=debug,...`); default: RUST_LOG, else `info`.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
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
            write!(std::io::stdout().lock(), "{config}").context("writing the summary")?;
            Ok(())
        }
        Command::Run(args) => {
            init_logging(args.log_level.as_deref())?;
            let overrides = Overrides {
                interfaces: args.interfaces,
                xdp_mode: args.xdp_mode,
                admin_addr: args.admin_addr,
            };
            let config = Config::load(&args.config, &overrides)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            runtime.block_on(async {
                let shutdown = shutdown_signal().context("installing signal handlers")?;
                lb_userspace::run(config, shutdown).await?;
                Ok(())
            })
        }
    }
}

fn init_logging(level: Option<&str>) -> anyhow::Result<()> {
    let filter = match (level, std::env::var("RUST_LOG")) {
        (Some(level), _) => EnvFilter::try_new(level).context("--log-level")?,
        (None, Ok(env)) => EnvFilter::try_new(env).context("RUST_LOG")?,
        (None, Err(_)) => EnvFilter::new("info"),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

/// Completes on the first SIGINT or SIGTERM; the handlers are installed before it is awaited.
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        tracing::info!(signal = name, "shutting down");
    })
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
