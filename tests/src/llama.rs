//! Where tests find llama-server and its model: `STEER_LLAMA_SERVER` / `STEER_MODEL` when set,
//! else the cache `cargo xtask deps` fills; and the arguments and chat client the llama.cpp
//! benchmarks share.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Instant,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpSocket,
};

/// The cache layout, shared with xtask so the two never disagree.
mod cache {
    include!("../../xtask/src/cache.rs");
}

pub use cache::{LLAMA_VERSION, MODEL_FILE};

/// The llama-server binary to test with. Panics, saying how to get it, when it is missing.
pub fn llama_server_path() -> PathBuf {
    resolve(
        "STEER_LLAMA_SERVER",
        cache::llama_server_path(&cache::cache_dir()),
    )
}

/// The GGUF model to test with. Panics, saying how to get it, when it is missing.
pub fn model_path() -> PathBuf {
    resolve("STEER_MODEL", cache::model_path(&cache::cache_dir()))
}

fn resolve(var: &str, cached: PathBuf) -> PathBuf {
    let path = std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map_or(cached, PathBuf::from);
    assert!(
        path.is_file(),
        "{} does not exist: run `cargo xtask deps` (or set {var}; the cache is \
         $STEER_CACHE, default /var/cache/steer)",
        path.display()
    );
    path
}

/// The arguments of a llama-server with the test model, `slots` slots of 1024 tokens each and
/// `threads` threads, listening on `host:port`; `--alias` makes every answer's `model` name it.
pub fn server_args(alias: &str, slots: u32, threads: u32, host: &str, port: u16) -> Vec<String> {
    let model = model_path().display().to_string();
    [
        "-m",
        &model,
        "-np",
        &slots.to_string(),
        "-c",
        &(1024 * slots).to_string(),
        "-t",
        &threads.to_string(),
        "--host",
        host,
        "--port",
        &port.to_string(),
        "--alias",
        alias,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A chat completion's answer as a client sees it.
#[derive(Debug, Clone)]
pub struct ChatAnswer {
    /// From the connect to the end of the answer.
    pub total_s: f64,
    /// Streamed: to the first event carrying content.
    pub ttft_s: Option<f64>,
    /// `model` of the answer (a server's `--alias`).
    pub model: Option<String>,
    /// `timings.prompt_n`: the prompt tokens the server evaluated (not found in its cache).
    pub prompt_n: Option<u64>,
    /// `timings.predicted_per_second`: the server's generation speed for this answer.
    pub decode_per_s: Option<f64>,
    /// The generated text.
    pub content: String,
}

/// POSTs `body` to `/v1/chat/completions` at `to`, on a new connection (from `from` when
/// given) with `Connection: close` and the extra `headers`, and reads the answer to its end;
/// `"stream": true` in `body` reads it as server-sent events. Any status but 200 is an error.
pub async fn chat(
    from: Option<Ipv4Addr>,
    to: SocketAddr,
    headers: &[(&str, &str)],
    body: &serde_json::Value,
) -> Result<ChatAnswer, String> {
    let started = Instant::now();
    let stream = body["stream"] == true;
    let body = body.to_string();
    let mut request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: steer\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        let _ = write!(request, "{name}: {value}\r\n");
    }
    request.push_str("\r\n");
    request.push_str(&body);
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    if let Some(from) = from {
        socket
            .bind(SocketAddr::from((from, 0)))
            .map_err(|e| format!("bind {from}: {e}"))?;
    }
    let mut conn = socket
        .connect(to)
        .await
        .map_err(|e| format!("connect {to}: {e}"))?;
    conn.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::new();
    let mut ttft_s = None;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = conn
            .read(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        // A streamed token arrives as an event whose delta has content; the first event (the
        // role) has none.
        if stream && ttft_s.is_none() && contains(&answer, b"\"content\":\"") {
            ttft_s = Some(started.elapsed().as_secs_f64());
        }
    }
    let total_s = started.elapsed().as_secs_f64();
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(answer.len(), |at| at + 4);
    let (head, payload) = answer.split_at(split);
    let head = String::from_utf8_lossy(head);
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "answer: {} {}",
            head.lines().next().unwrap_or("(none)"),
            String::from_utf8_lossy(&payload[..payload.len().min(200)])
        ));
    }
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let payload = if chunked {
        dechunk(payload)?
    } else {
        payload.to_vec()
    };
    let payload = String::from_utf8_lossy(&payload);
    let mut parsed = ChatAnswer {
        total_s,
        ttft_s,
        model: None,
        prompt_n: None,
        decode_per_s: None,
        content: String::new(),
    };
    let mut read = |v: &serde_json::Value, content: &serde_json::Value| {
        if let Some(m) = v["model"].as_str() {
            parsed.model = Some(m.to_owned());
        }
        if let Some(n) = v["timings"]["prompt_n"].as_u64() {
            parsed.prompt_n = Some(n);
        }
        if let Some(speed) = v["timings"]["predicted_per_second"].as_f64() {
            parsed.decode_per_s = Some(speed);
        }
        parsed
            .content
            .push_str(content.as_str().unwrap_or_default());
    };
    if stream {
        for event in payload.lines().filter_map(|l| l.strip_prefix("data: ")) {
            if event.trim() == "[DONE]" {
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_str(event).map_err(|e| format!("event {event:?}: {e}"))?;
            read(&v, &v["choices"][0]["delta"]["content"]);
        }
    } else {
        let v: serde_json::Value =
            serde_json::from_str(&payload).map_err(|e| format!("answer {payload:?}: {e}"))?;
        read(&v, &v["choices"][0]["message"]["content"]);
    }
    Ok(parsed)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The body of a chunked transfer encoding (bytes: a chunk may end inside a character).
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunk without its size line")?;
        let line = String::from_utf8_lossy(&rest[..eol]);
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("chunk size {line:?}: {e}"))?;
        if size == 0 {
            return Ok(body);
        }
        let after = &rest[eol + 2..];
        body.extend_from_slice(after.get(..size).ok_or("a chunk cut short")?);
        rest = after[size..]
            .strip_prefix(b"\r\n")
            .unwrap_or(&after[size..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunked_body_is_joined_even_where_a_chunk_ends_inside_a_character() -> Result<(), String> {
        // "né" split inside the two bytes of é (0xc3 0xa9).
        let wire = b"2\r\nn\xc3\r\n1;ext=1\r\n\xa9\r\n0\r\n\r\n";
        assert_eq!(dechunk(wire)?, "né".as_bytes());
        assert!(dechunk(b"5\r\nab").is_err(), "a chunk cut short");
        assert!(dechunk(b"zz\r\n").is_err(), "a bad size");
        Ok(())
    }
}
