//! Blocking helpers for tests that drive agents from threads: one HTTP/1.1 exchange per
//! connection, a closed-loop chat load through a service, a scratch directory.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

/// One HTTP/1.1 request on a new connection (closed after it), each step within 20 s.
pub fn http(
    to: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let timeout = Duration::from_secs(20);
    let mut stream = TcpStream::connect_timeout(&to, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: steer-test\r\nConnection: close\r\n");
    for (name, value) in headers {
        head += &format!("{name}: {value}\r\n");
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" {
        head += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    head += "\r\n";
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

/// Chats sent one after another through `vip` until `stop`: (sent, failed, last failure).
pub fn load(vip: SocketAddr, stop: Arc<AtomicBool>) -> thread::JoinHandle<(u64, u64, String)> {
    thread::spawn(move || {
        let (sent, failed) = (AtomicU64::new(0), AtomicU64::new(0));
        let mut last = String::new();
        let body = r#"{"messages":[{"role":"user","content":"Say hi."}],"max_tokens":2}"#;
        // Bounded: at most this many, whatever `stop` says.
        for _ in 0..20_000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            sent.fetch_add(1, Ordering::Relaxed);
            match http(vip, "POST", "/v1/chat/completions", &[], Some(body)) {
                Ok((200, _)) => {}
                Ok((status, body)) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    last = format!("HTTP {status}: {body}");
                }
                Err(e) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    last = e.to_string();
                }
            }
        }
        (sent.into_inner(), failed.into_inner(), last)
    })
}

/// A fresh directory `<tag>-<pid>` under the temp dir, for a test's configs, logs and stores.
pub fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}
