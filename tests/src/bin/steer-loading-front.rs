//! A llama-server that is still loading its model, for as long as a test needs: in front of a
//! real llama-server at `--upstream`, it answers every request as llama-server does while it
//! loads (503, llama.cpp's "Loading model" body, on every path) until `--ready-file` exists, then
//! relays each new connection byte for byte to the real one. A real llama-server loads the test
//! model in well under a second: too short a window for a test to act in, and not its to choose.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What llama-server answers on any path before its model is loaded (tools/server/server-http.cpp).
const LOADING: &str =
    r#"{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}"#;
/// The most of a request head read before answering.
const MAX_HEAD: usize = 64 * 1024;

#[derive(Debug, Parser)]
#[command(about = "A llama-server still loading its model, then the real one; for Steer's tests")]
struct Args {
    /// Address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long)]
    listen: SocketAddr,
    /// The real llama-server, relayed to once loaded.
    #[arg(long)]
    upstream: SocketAddr,
    /// Loading until this file exists.
    #[arg(long)]
    ready_file: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    runtime.block_on(async {
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("bind {}", args.listen))?;
        eprintln!(
            "loading on {} until {} exists, then relaying to {}",
            args.listen,
            args.ready_file.display(),
            args.upstream
        );
        loop {
            let (client, _) = listener.accept().await.context("accept")?;
            let (upstream, ready) = (args.upstream, args.ready_file.exists());
            tokio::spawn(async move {
                let served = if ready {
                    relay(client, upstream).await
                } else {
                    answer_loading(client).await
                };
                if let Err(e) = served {
                    eprintln!("connection: {e:#}");
                }
            });
        }
    })
}

async fn relay(mut client: TcpStream, upstream: SocketAddr) -> anyhow::Result<()> {
    let mut server = TcpStream::connect(upstream)
        .await
        .with_context(|| format!("connect {upstream}"))?;
    tokio::io::copy_bidirectional(&mut client, &mut server)
        .await
        .context("relay")?;
    Ok(())
}

/// Reads the request head, answers 503 "Loading model" and closes, as llama-server does.
async fn answer_loading(mut client: TcpStream) -> anyhow::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let n = client.read(&mut buf).await.context("read")?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nServer: llama.cpp\r\n\
         Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{LOADING}",
        LOADING.len()
    );
    client
        .write_all(response.as_bytes())
        .await
        .context("write")?;
    client.shutdown().await.context("shutdown")?;
    // Whatever body followed is read, not left to turn the close into a reset.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while client.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    })
    .await;
    Ok(())
}
