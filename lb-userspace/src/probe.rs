//! The agent's own HTTP client towards its backends: health checks ([`crate::health`]), slot
//! polls ([`crate::slots`]) and the supervisor's readiness probe of a starting llama-server. One
//! `GET` on a new HTTP/1.1 connection (hyper), `Connection: close`, bounded in time and size; the
//! body of a 200 answer, or the status and the start of the body of another (llama.cpp says why
//! there: "Loading model"). Small on purpose: these answers are short.

use std::net::SocketAddrV4;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::Request;
use hyper::header::{CONNECTION, HOST};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The largest body read. `/slots` grows with the slot count and each busy slot's sampling
/// parameters (about 1.3 KB for one); this leaves room for hundreds of slots.
pub const MAX_RESPONSE: usize = 1 << 20;
/// How much of a non-200 answer's body an error keeps: llama.cpp's error objects fit.
pub const STATUS_BODY_PREFIX: usize = 256;

/// Whether an answer is llama-server's while it loads its model: a 503 saying "Loading model" (on
/// every path, `/health` included), from the start of its body.
pub fn is_loading(status: u16, body: &[u8]) -> bool {
    const LOADING_MODEL: &[u8] = b"Loading model";
    status == 503
        && body
            .windows(LOADING_MODEL.len())
            .any(|w| w == LOADING_MODEL)
}

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
    #[error("GET {path}: status {status}{}", said(body))]
    Status {
        path: String,
        status: u16,
        /// The body's first [`STATUS_BODY_PREFIX`] bytes (lossy UTF-8), whatever arrived in time.
        body: String,
    },
    #[error("GET {path}: more than {MAX_RESPONSE} bytes")]
    TooLarge { path: String },
    #[error("GET {path}: no answer within {timeout:?}")]
    Timeout { path: String, timeout: Duration },
}

/// `GET path` from `address`: the body of a 200 answer, all within `timeout`.
pub async fn get(address: SocketAddrV4, path: &str, timeout: Duration) -> Result<Bytes, GetError> {
    tokio::time::timeout(timeout, exchange(address, path))
        .await
        .map_err(|_| GetError::Timeout {
            path: path.to_owned(),
            timeout,
        })?
}

async fn exchange(address: SocketAddrV4, path: &str) -> Result<Bytes, GetError> {
    let io = |source| GetError::Io {
        path: path.to_owned(),
        source,
    };
    let stream = TcpStream::connect(address).await.map_err(io)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| hyper_error(e, path))?;
    let request = Request::get(path)
        .header(HOST, address.to_string())
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|_| GetError::Malformed {
            path: path.to_owned(),
        })?;
    // The request is sent while the connection is driven beside it, in this task: nothing
    // outlives a caller that gives up. The sender goes with the request, so the connection
    // ends once the answer is read.
    let answer = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| hyper_error(e, path))?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(GetError::Status {
                path: path.to_owned(),
                status,
                body: body_prefix(response.into_body()).await,
            });
        }
        let body = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => hyper_error(*e, path),
                Err(e) if e.is::<LengthLimitError>() => GetError::TooLarge {
                    path: path.to_owned(),
                },
                Err(_) => GetError::Malformed {
                    path: path.to_owned(),
                },
            })?;
        Ok(body.to_bytes())
    };
    let (answer, _closed) = tokio::join!(answer, connection);
    answer
}

/// The start of `body`: frames until [`STATUS_BODY_PREFIX`] bytes, its end or an error.
async fn body_prefix(mut body: hyper::body::Incoming) -> String {
    let mut prefix = Vec::new();
    while prefix.len() < STATUS_BODY_PREFIX {
        let Some(Ok(frame)) = body.frame().await else {
            break;
        };
        if let Ok(data) = frame.into_data() {
            prefix.extend_from_slice(&data);
        }
    }
    prefix.truncate(STATUS_BODY_PREFIX);
    String::from_utf8_lossy(&prefix).into_owned()
}

fn said(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(": {body}")
    }
}

/// An I/O error under hyper's stays one, except an answer cut short, which like anything else
/// hyper refuses is not a (whole) HTTP response.
fn hyper_error(error: hyper::Error, path: &str) -> GetError {
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && io.kind() != std::io::ErrorKind::UnexpectedEof
        {
            return GetError::Io {
                path: path.to_owned(),
                source: std::io::Error::new(io.kind(), io.to_string()),
            };
        }
        source = cause.source();
    }
    GetError::Malformed {
        path: path.to_owned(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// llama-server's answer body on any path, `/health` included, while it loads the model
    /// (llama.cpp's `tools/server/server-http.cpp`).
    pub(crate) const LOADING_BODY: &str =
        r#"{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}"#;

    /// llama-server's answer on `/slots` when started with `--no-slots`.
    const NO_SLOTS: &str = "HTTP/1.1 501 Not Implemented\r\nServer: llama.cpp\r\n\
        Content-Type: application/json; charset=utf-8\r\nContent-Length: 2\r\n\r\n{}";

    /// A loopback HTTP server for the tests of this client's users: each connection gets
    /// `answer(path)` (the whole response, raw) to its request, then is closed.
    pub(crate) async fn answering<F>(answer: F) -> SocketAddrV4
    where
        F: Fn(&str) -> Vec<u8> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let std::net::SocketAddr::V4(addr) = listener.local_addr().expect("addr") else {
            panic!("not IPv4");
        };
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 512];
                let n = stream.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split(' ').nth(1).unwrap_or("/");
                let _ = stream.write_all(&answer(path)).await;
            }
        });
        addr
    }

    async fn get_answer(answer: impl Into<Vec<u8>>) -> Result<Bytes, GetError> {
        let answer = answer.into();
        let server = answering(move |_| answer.clone()).await;
        get(server, "/slots", Duration::from_secs(2)).await
    }

    #[tokio::test]
    async fn responses_are_cut_to_their_length_and_errors_keep_the_status() {
        let ok = "HTTP/1.1 200 OK\r\nServer: llama.cpp\r\ncontent-length: 2\r\n\r\n[]garbage";
        assert_eq!(get_answer(ok).await.ok(), Some(Bytes::from_static(b"[]")));
        match get_answer(NO_SLOTS).await {
            Err(GetError::Status {
                status: 501, body, ..
            }) => assert_eq!(body, "{}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            get_answer("SSH-2.0-OpenSSH\r\n\r\n").await,
            Err(GetError::Malformed { .. })
        ));
        let short = "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n[]";
        assert!(matches!(
            get_answer(short).await,
            Err(GetError::Malformed { .. })
        ));
    }

    /// llama-server's `/health` while it loads the model: the error keeps the body that says so;
    /// a long body only its start.
    #[tokio::test]
    async fn a_status_error_keeps_the_start_of_the_body() {
        let loading = format!(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: {}\r\n\r\n{LOADING_BODY}",
            LOADING_BODY.len()
        );
        let error = get_answer(loading).await.expect_err("503");
        assert_eq!(
            error.to_string(),
            format!("GET /slots: status 503: {LOADING_BODY}")
        );
        let long = "x".repeat(STATUS_BODY_PREFIX * 8);
        let answer = format!(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\n\r\n{long}",
            long.len()
        );
        match get_answer(answer).await {
            Err(GetError::Status {
                status: 500, body, ..
            }) => {
                assert_eq!(body, long[..STATUS_BODY_PREFIX]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn answers_are_bounded_in_size_and_time() {
        let mut big = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_RESPONSE + 1
        )
        .into_bytes();
        big.resize(big.len() + MAX_RESPONSE + 1, b' ');
        assert!(matches!(
            get_answer(big).await,
            Err(GetError::TooLarge { .. })
        ));
        let mut fits =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {MAX_RESPONSE}\r\n\r\n").into_bytes();
        fits.resize(fits.len() + MAX_RESPONSE, b' ');
        assert_eq!(
            get_answer(fits).await.map(|b| b.len()).ok(),
            Some(MAX_RESPONSE)
        );

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let std::net::SocketAddr::V4(silent) = listener.local_addr().expect("addr") else {
            panic!("not IPv4");
        };
        let timeout = Duration::from_millis(100);
        let answer = get(silent, "/health", timeout).await;
        assert!(
            matches!(answer, Err(GetError::Timeout { timeout: t, .. }) if t == timeout),
            "{answer:?}"
        );
    }
}
