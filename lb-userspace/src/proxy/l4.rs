//! `mode = "l4"`: each client connection carried whole to one backend, spliced both ways.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tracing::debug;

use super::gate::{Ask, Gate, Refusal};
use super::splice;
use crate::limits::{Activity, Closed, Registered};

/// Carry one client connection to a backend and back. Until either side sent a byte it is quiet
/// (evictable, and closed after `client_idle_timeout`); a client waiting in the queue with its
/// request sent is not.
pub(super) async fn serve_connection(
    gate: &Arc<Gate>,
    client: TcpStream,
    peer: Ipv4Addr,
    registered: &Registered,
) -> Result<(), Refusal> {
    let activity = &registered.activity;
    let carried = async {
        let lease = gate.admit(peer, Ask::default(), &[]).await?;
        let timeouts = gate.config().upstream;
        let backend = tokio::time::timeout(timeouts.connect, TcpStream::connect(lease.address))
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or(Refusal::Connect)?;
        debug!(backend = %lease.address, id = lease.id, "proxying");
        Ok::<_, Refusal>(carry(&client, &backend, timeouts.first_byte, activity).await)
    };
    let client_spoke = async {
        // A byte or the EOF: either way not idle any more.
        let _ = client.peek(&mut [0u8; 1]).await;
        activity.engaged();
        std::future::pending::<()>().await;
    };
    let carried = tokio::select! {
        carried = carried => carried?,
        () = client_spoke => unreachable!("pending for ever"),
        closed = activity.expired(gate.config().client_timeouts()) => {
            return match closed {
                Closed::Evicted => Ok(()),
                Closed::Idle | Closed::Header => Err(Refusal::ClientTimeout),
            };
        }
    };
    match carried {
        Ok(()) => Ok(()),
        Err(Ended::FirstByteTimeout) => Err(Refusal::FirstByteTimeout),
        // A peer reset: nothing more to carry.
        Err(Ended::Io(error)) => {
            debug!(%error, "connection ended");
            Ok(())
        }
    }
}

/// The relay both ways, zero-copy ([`splice::relay`]). Half-closes pass through: each direction
/// ends on its own EOF with a `shutdown(SHUT_WR)` towards the other side. The backend must answer
/// within `first_byte_timeout` of the client's first bytes (or speak first).
async fn carry(
    client: &TcpStream,
    backend: &TcpStream,
    first_byte_timeout: Duration,
    activity: &Activity,
) -> Result<(), Ended> {
    let (sent, request_sent) = tokio::sync::oneshot::channel::<()>();
    let up = async {
        // First bytes (or the client's EOF) there: they go out in this task's next step. A peek,
        // since readiness alone may be spurious.
        client.peek(&mut [0u8; 1]).await?;
        let _ = sent.send(());
        splice::relay(client, backend).await?;
        Ok::<(), Ended>(())
    };
    let down = async {
        let mut first = [0u8; 1];
        let answered = backend.peek(&mut first);
        tokio::pin!(answered);
        tokio::select! {
            peeked = &mut answered => peeked?,
            // Sent (or the client closed without a byte): the clock runs.
            _ = request_sent => tokio::time::timeout(first_byte_timeout, &mut answered)
                .await
                .map_err(|_| Ended::FirstByteTimeout)??,
        };
        // The backend spoke (first, for a protocol where the server does).
        activity.engaged();
        splice::relay(backend, client).await?;
        Ok::<(), Ended>(())
    };
    tokio::try_join!(up, down).map(|((), ())| ())
}

enum Ended {
    Io(std::io::Error),
    FirstByteTimeout,
}

impl From<std::io::Error> for Ended {
    fn from(error: std::io::Error) -> Self {
        Ended::Io(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::conns::ConnCounts;
    use crate::limits::Connections;
    use crate::proxy::gate::tests::{config, routes_to};
    use crate::proxy::{ServiceProxy, serve};
    use std::net::{SocketAddr, SocketAddrV4};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::watch;
    use tokio::time::Instant;

    async fn slow_echo(delay: Duration) -> SocketAddrV4 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let SocketAddr::V4(address) = listener.local_addr().expect("address") else {
            unreachable!("bound to IPv4")
        };
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut line = [0u8; 64];
                    while let Ok(n @ 1..) = stream.read(&mut line).await {
                        tokio::time::sleep(delay).await;
                        let _ = stream.write_all(&line[..n]).await;
                    }
                });
            }
        });
        address
    }

    /// Connected client and backend sides of a proxied connection through `carry`.
    async fn carried(
        backend: SocketAddrV4,
        first_byte_timeout: Duration,
    ) -> (TcpStream, tokio::task::JoinHandle<Result<(), Ended>>) {
        let front = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(front.local_addr().expect("address"))
            .await
            .expect("connect");
        let (accepted, _) = front.accept().await.expect("accept");
        let backend = TcpStream::connect(backend).await.expect("connect backend");
        let task = tokio::spawn(async move {
            let registered = Connections::new(1).register().expect("room");
            carry(
                &accepted,
                &backend,
                first_byte_timeout,
                &registered.activity,
            )
            .await
        });
        (client, task)
    }

    #[tokio::test(start_paused = true)]
    async fn l4_first_byte_timeout_runs_from_the_first_bytes_sent_not_the_connect() {
        let backend = slow_echo(Duration::from_secs(3)).await;
        let (mut client, task) = carried(backend, Duration::from_secs(5)).await;
        // Idle for longer than first_byte_timeout before asking: no timeout.
        tokio::time::sleep(Duration::from_secs(10)).await;
        client.write_all(b"hello\n").await.expect("send");
        let mut answer = [0u8; 6];
        client
            .read_exact(&mut answer)
            .await
            .expect("answered in 3 s");
        assert_eq!(&answer, b"hello\n");
        drop(client);
        assert!(task.await.expect("carry task").is_ok());

        let backend = slow_echo(Duration::from_secs(3)).await;
        let (mut client, task) = carried(backend, Duration::from_secs(2)).await;
        client.write_all(b"hello\n").await.expect("send");
        let sent = Instant::now();
        assert!(matches!(
            task.await.expect("carry task"),
            Err(Ended::FirstByteTimeout)
        ));
        assert_eq!(sent.elapsed(), Duration::from_secs(2));
    }

    /// l4: a client that sends nothing is closed after `client_idle_timeout`; one that spoke is
    /// the client's and backend's, however long it is silent after.
    #[tokio::test(start_paused = true)]
    async fn l4_idle_timeout_closes_only_a_connection_that_never_spoke() {
        let backend = slow_echo(Duration::from_millis(10)).await;
        let (_routes, rx) = watch::channel(routes_to(&[backend]));
        let counts = Arc::new(ConnCounts::anonymous(64).expect("anonymous counters"));
        let requests = Arc::new(crate::requests::RequestCounts::new(64));
        let service = ServiceProxy::new(&config(4, 0), 0, &counts, requests, &rx);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let front = listener.local_addr().expect("address");
        let proxy = tokio::spawn(serve(
            tokio::sync::watch::channel(Arc::clone(&service)).1,
            listener,
            watch::channel(false).1,
        ));
        let accepted = Instant::now();
        let mut silent = TcpStream::connect(front).await.expect("connect");
        let mut talking = TcpStream::connect(front).await.expect("connect");
        talking.write_all(b"hi\n").await.expect("send");
        let mut echo = [0u8; 3];
        talking.read_exact(&mut echo).await.expect("echo");
        let mut rest = Vec::new();
        assert_eq!(silent.read_to_end(&mut rest).await.expect("EOF"), 0);
        assert!(accepted.elapsed() >= service.config().client_idle_timeout);
        tokio::time::sleep(service.config().client_idle_timeout).await;
        talking.write_all(b"hi\n").await.expect("send again");
        talking.read_exact(&mut echo).await.expect("still carried");
        assert_eq!(service.stats().refused["client_timeout"], 1);
        proxy.abort();
    }
}
