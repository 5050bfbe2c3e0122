//! A real HTTP/1.1 server (axum on hyper, keep-alive on) used as a backend host in the
//! integration tests and the demo.
//!
//! - `GET /whoami` -> `NAME <peer ip>:<peer port>` (the peer as this server sees it, so a test can
//!   tell which backend answered and which source address the load balancer used)
//! - `GET /bytes/{n}` -> `n` deterministic bytes ([`tests::topology::pattern`])
//! - `POST /echo` -> the request body back (up to 64 MiB)
//! - `GET /health` -> 200, or 503 (as llama.cpp while loading) after `PUT /health` with body
//!   `fail`; `PUT /health` with `ok` heals it. A test can make a backend fail its health checks
//!   on demand, which a real llama-server cannot do.
//! - `POST /v1/chat/completions` -> `--chat-status` (500 by default) with an OpenAI error body: a
//!   backend that passes its health checks and fails every request, for passive health.

use std::net::SocketAddr;
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use anyhow::Context;
use axum::{
    Router,
    body::{Body, Bytes},
    extract::{ConnectInfo, DefaultBodyLimit, Path, State},
    http::StatusCode,
    response::IntoResponse,
    routing::{get, post},
};

#[derive(Clone)]
struct Backend {
    name: String,
    failing: Arc<AtomicBool>,
    chat_status: StatusCode,
}
use clap::Parser;

/// Largest body `/echo` accepts and `/bytes` produces.
const MAX_BODY: usize = 64 << 20;

#[derive(Debug, Parser)]
#[command(about = "HTTP backend for Steer's integration tests")]
struct Args {
    /// Name returned by /whoami.
    #[arg(long)]
    name: String,
    /// Address to listen on, e.g. 0.0.0.0:8080.
    #[arg(long)]
    listen: SocketAddr,
    /// The status every chat completion gets.
    #[arg(long, default_value_t = 500)]
    chat_status: u16,
}

async fn whoami(
    State(backend): State<Backend>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> String {
    format!("{} {peer}", backend.name)
}

async fn health(State(backend): State<Backend>) -> StatusCode {
    if backend.failing.load(Ordering::Relaxed) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

async fn set_health(State(backend): State<Backend>, body: Bytes) -> StatusCode {
    match &body[..] {
        b"fail" => backend.failing.store(true, Ordering::Relaxed),
        b"ok" => backend.failing.store(false, Ordering::Relaxed),
        _ => return StatusCode::BAD_REQUEST,
    }
    StatusCode::OK
}

async fn bytes(Path(n): Path<usize>) -> impl IntoResponse {
    if n > MAX_BODY {
        return (StatusCode::PAYLOAD_TOO_LARGE, Body::from("too large"));
    }
    (StatusCode::OK, Body::from(tests::topology::pattern(n)))
}

async fn echo(body: Bytes) -> Bytes {
    body
}

async fn chat(State(backend): State<Backend>) -> impl IntoResponse {
    let status = backend.chat_status;
    let error = serde_json::json!({
        "error": {"code": status.as_u16(), "type": "server_error", "message": "failing on purpose"}
    });
    (status, error.to_string())
}

/// Lifts the soft open-file limit to the hard limit (1,000+ concurrent connections).
fn raise_nofile() -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit")?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit")?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    raise_nofile()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    runtime.block_on(async {
        let app = Router::new()
            .route("/whoami", get(whoami))
            .route("/bytes/{n}", get(bytes))
            .route("/echo", post(echo))
            .route("/health", get(health).put(set_health))
            .route("/v1/chat/completions", post(chat))
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(Backend {
                name: args.name.clone(),
                failing: Arc::new(AtomicBool::new(false)),
                chat_status: StatusCode::from_u16(args.chat_status)
                    .context("--chat-status is no HTTP status")?,
            });
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("bind {}", args.listen))?;
        eprintln!("{} listening on {}", args.name, args.listen);
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .context("serve")
    })
}
