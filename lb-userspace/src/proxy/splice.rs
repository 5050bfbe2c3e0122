//! Zero-copy relay for the L4 userspace path: `splice(2)` moves a direction's bytes from one
//! socket into a pipe and from the pipe into the other socket, so they never enter this process.
//! Both sockets stay on tokio's reactor: a splice that would block clears the socket's readiness
//! (`try_io`) and the relay waits for the next edge.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use nix::sys::socket::{Shutdown, shutdown};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// What one splice asks for; a pipe holds 64 KiB unless raised, and Linux raises it to this size
/// for any user (`/proc/sys/fs/pipe-max-size` is 1 MiB by default).
const PIPE_SIZE: usize = 1 << 20;

/// A pipe's two ends, both non-blocking.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// What the pipe holds: bytes taken from the source, not yet given to the destination.
    held: usize,
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // A bigger pipe moves more per syscall; a refusal (a lowered pipe-max-size, the
        // per-user pipe quota) leaves the default size, which still works.
        let capacity = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32))
            .map_or(1 << 16, |size| size as usize);
        Ok(Pipe {
            read,
            write,
            held: 0,
            capacity,
        })
    }
}

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

/// Move bytes from `from` to `to` until `from` reaches EOF, then half-close `to` for writing
/// (the peer sees the EOF the other side sent). Returns the bytes moved.
///
/// `from` and `to` may be the two halves of one relay running the other direction at the same
/// time: this direction only reads `from` and writes `to`.
pub async fn relay(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let mut pipe = Pipe::new()?;
    let mut moved = 0u64;
    loop {
        let n = fill(from, &mut pipe).await?;
        if n == 0 {
            break;
        }
        drain(&mut pipe, to).await?;
        moved += n as u64;
    }
    shutdown(to.as_raw_fd(), Shutdown::Write)?;
    Ok(moved)
}

/// Splice what `from` has into the empty pipe; 0 at EOF.
async fn fill(from: &TcpStream, pipe: &mut Pipe) -> io::Result<usize> {
    loop {
        from.readable().await?;
        match from.try_io(Interest::READABLE, || {
            Ok(splice(
                from.as_fd(),
                None,
                &pipe.write,
                None,
                pipe.capacity,
                FLAGS,
            )?)
        }) {
            Ok(n) => {
                pipe.held = n;
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Splice everything the pipe holds into `to`.
async fn drain(pipe: &mut Pipe, to: &TcpStream) -> io::Result<()> {
    while pipe.held > 0 {
        to.writable().await?;
        match to.try_io(Interest::WRITABLE, || {
            Ok(splice(
                &pipe.read,
                None,
                to.as_fd(),
                None,
                pipe.held,
                FLAGS,
            )?)
        }) {
            Ok(n) => pipe.held -= n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair over loopback: (the end we drive, the end the relay uses).
    async fn pair() -> io::Result<(TcpStream, TcpStream)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let outer = TcpStream::connect(listener.local_addr()?).await?;
        let (inner, _) = listener.accept().await?;
        Ok((outer, inner))
    }

    /// Bytes that differ at every offset, so a reordering or a loss shows.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[tokio::test]
    async fn relays_both_ways_byte_identical_with_half_closes() -> io::Result<()> {
        let (mut client, client_side) = pair().await?;
        let (mut backend, backend_side) = pair().await?;
        let relay = tokio::spawn(async move {
            tokio::try_join!(
                relay(&client_side, &backend_side),
                relay(&backend_side, &client_side)
            )
        });
        // Larger than the pipe and the socket buffers, so both directions block and resume.
        let up = pattern(8 << 20);
        let down = pattern(5 << 20 | 123);
        let up_sent = up.clone();
        let client_task = tokio::spawn(async move {
            let (mut rx, mut tx) = client.split();
            let send = async {
                tx.write_all(&up_sent).await?;
                tx.shutdown().await
            };
            let mut got = Vec::new();
            let recv = rx.read_to_end(&mut got);
            tokio::try_join!(send, recv)?;
            io::Result::Ok(got)
        });
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await?;
        assert!(
            got == up,
            "client to backend: {} of {} bytes, or changed",
            got.len(),
            up.len()
        );
        // The client's EOF reached the backend while the other direction is still open.
        backend.write_all(&down).await?;
        backend.shutdown().await?;
        let received = client_task.await??;
        assert!(
            received == down,
            "backend to client: {} of {} bytes",
            received.len(),
            down.len()
        );
        let (up_moved, down_moved) = relay.await??;
        assert_eq!((up_moved, down_moved), (up.len() as u64, down.len() as u64));
        Ok(())
    }
}
