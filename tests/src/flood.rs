//! Idle-connection floods (issue 11, finding 2): many TCP connections held open without a
//! request, every other one with half a request head sent, as a hostile local user or client
//! can open them. Used by `tests/tests/flood.rs` and the connection-flood benchmark.

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::netns::NetNs;

/// Half a request head: the server waits for the rest.
const HALF_HEAD: &[u8] = b"GET /v1/backends HTTP/1.1\r\nHost: flood\r\n";

/// Open connections, closed when dropped.
#[derive(Debug)]
pub struct Flood {
    streams: Vec<TcpStream>,
    /// Connects that failed or timed out.
    pub failed: usize,
}

impl Flood {
    /// Opens up to `n` connections to `target` from inside `ns`, one after the other: each
    /// connect within 1 s, all within 60 s (a server that stopped accepting fills its backlog,
    /// and connects then hang).
    pub fn open(ns: &NetNs, target: SocketAddr, n: usize) -> Flood {
        raise_own_open_files();
        ns.run(|| {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut flood = Flood {
                streams: Vec::with_capacity(n),
                failed: 0,
            };
            for i in 0..n {
                if Instant::now() > deadline {
                    flood.failed += n - i;
                    break;
                }
                match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                    Ok(mut stream) => {
                        // A closed connection takes no write: it still counts as opened.
                        if i % 2 == 0 {
                            let _ = stream.write_all(HALF_HEAD);
                        }
                        flood.streams.push(stream);
                    }
                    Err(_) => flood.failed += 1,
                }
            }
            flood
        })
    }

    /// Connections opened.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }
}

/// This process holds every flood connection: its soft `RLIMIT_NOFILE` goes to the hard limit.
fn raise_own_open_files() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
