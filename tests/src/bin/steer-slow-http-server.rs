//! A real HTTP/1.1 server that sleeps `--delay` before answering any request with
//! `{"slept_ms": N}`: a backend that holds its response longer than the proxy's
//! `first_byte_timeout`, which llama-server cannot be made to do on demand.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "HTTP server that sleeps before answering, for Steer's tests")]
struct Args {
    /// Address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long)]
    listen: SocketAddr,
    /// Milliseconds to sleep before each answer.
    #[arg(long)]
    delay_ms: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    runtime.block_on(async {
        let delay = args.delay_ms;
        let app = Router::new().fallback(move || async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            axum::Json(serde_json::json!({ "slept_ms": delay }))
        });
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("bind {}", args.listen))?;
        eprintln!("sleeping {delay} ms per answer on {}", args.listen);
        axum::serve(listener, app).await.context("serve")
    })
}
