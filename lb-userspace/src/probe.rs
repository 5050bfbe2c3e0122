//! The agent's own HTTP/1.1 GET towards its backends (health checks, slot polls): one request
//! with `Connection: close`, read to the end, the body of a 200 answer. Small on purpose: these
//! answers are short, and llama-server sends `Content-Length` and closes after it.

use std::net::SocketAddrV4;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest answer read. `/slots` grows with the slot count and each busy slot's sampling
/// parameters (about 1.3 KB for one); this leaves room for hundreds of slots.
pub const MAX_RESPONSE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("GET {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("GET {path}: not an HTTP response")]
    Malformed { path: String },
    #[error("GET {path}: status {status}")]
    Status { path: String, status: u16 },
    #[error("GET {path}: more than {MAX_RESPONSE} bytes")]
    TooLarge { path: String },
}

/// `GET path` from `address`; the body of a 200 answer. No timeout of its own: callers bound
/// the whole exchange.
pub async fn get(address: SocketAddrV4, path: &str) -> Result<Vec<u8>, GetError> {
    let io = |source| GetError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream = TcpStream::connect(address).await.map_err(io)?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    let mut response = Vec::new();
    let read = (&mut stream)
        .take(MAX_RESPONSE as u64 + 1)
        .read_to_end(&mut response)
        .await
        .map_err(io)?;
    if read > MAX_RESPONSE {
        return Err(GetError::TooLarge {
            path: path.to_owned(),
        });
    }
    parse_response(&response, path)
}

/// The body of a 200 response, cut to its `Content-Length` when it has one.
fn parse_response(response: &[u8], path: &str) -> Result<Vec<u8>, GetError> {
    let malformed = || GetError::Malformed {
        path: path.to_owned(),
    };
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(malformed)?;
    let head = std::str::from_utf8(&response[..end]).map_err(|_| malformed())?;
    let body = &response[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(malformed)?;
    let status: u16 = match status_line.split(' ').collect::<Vec<_>>()[..] {
        [version, status, ..] if version.starts_with("HTTP/1.") => {
            status.parse().map_err(|_| malformed())?
        }
        _ => return Err(malformed()),
    };
    if status != 200 {
        return Err(GetError::Status {
            path: path.to_owned(),
            status,
        });
    }
    let length = lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    });
    match length {
        Some(length) => body.get(..length).map(<[u8]>::to_vec).ok_or_else(malformed),
        None => Ok(body.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama-server's answer on `/slots` when started with `--no-slots`.
    const NO_SLOTS: &str = "HTTP/1.1 501 Not Implemented\r\nServer: llama.cpp\r\n\
        Content-Type: application/json; charset=utf-8\r\nContent-Length: 2\r\n\r\n{}";

    #[test]
    fn responses_are_cut_to_their_length_and_errors_keep_the_status() {
        let ok = "HTTP/1.1 200 OK\r\nServer: llama.cpp\r\ncontent-length: 2\r\n\r\n[]garbage";
        assert_eq!(
            parse_response(ok.as_bytes(), "/slots").ok(),
            Some(b"[]".to_vec())
        );
        assert!(matches!(
            parse_response(NO_SLOTS.as_bytes(), "/slots"),
            Err(GetError::Status { status: 501, .. })
        ));
        assert!(matches!(
            parse_response(b"SSH-2.0-OpenSSH\r\n\r\n", "/slots"),
            Err(GetError::Malformed { .. })
        ));
        let short = "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n[]";
        assert!(matches!(
            parse_response(short.as_bytes(), "/slots"),
            Err(GetError::Malformed { .. })
        ));
    }
}
