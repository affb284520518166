//! Bidirectional byte copy with half-close and byte counters.
//!
//! Bytes move socket -> pipe -> socket with `splice(2)`, so the kernel moves pages and the
//! payload never enters userspace: one pipe per direction, allocated once per connection, no
//! per-byte work in skiff. If pipes cannot be created (fd limit) the copy falls back to
//! tokio's buffered `copy_bidirectional`.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Largest amount moved per splice call: the default pipe capacity, so a splice into an empty
/// pipe never blocks.
const CHUNK: usize = 64 * 1024;
/// Per-direction buffer of the fallback copy.
const BUF: usize = 64 * 1024;

/// Bytes moved in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Downstream to upstream.
    pub tx: u64,
    /// Upstream to downstream.
    pub rx: u64,
}

/// Copy both ways until both sides have closed. An EOF from one side is passed on as a
/// write shutdown to the other (half-close), and the other direction keeps flowing. An error
/// in either direction ends both.
pub async fn forward(down: &mut TcpStream, up: &mut TcpStream) -> io::Result<Transferred> {
    let pipes = (pipe(), pipe());
    let (Ok(p1), Ok(p2)) = pipes else {
        return forward_copy(down, up).await;
    };
    let (tx, rx) = tokio::try_join!(pump(down, up, p1), pump(up, down, p2))?;
    Ok(Transferred { tx, rx })
}

/// As [`forward`], with a userspace buffer per direction instead of splice: for sockets whose
/// incoming payload may sit in a sockmap psock queue (`--sockmap`), which only recvmsg reads.
pub async fn forward_copy(down: &mut TcpStream, up: &mut TcpStream) -> io::Result<Transferred> {
    let (tx, rx) = tokio::io::copy_bidirectional_with_sizes(down, up, BUF, BUF).await?;
    Ok(Transferred { tx, rx })
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(io::Error::from)
}

/// One direction: `src` -> pipe -> `dst`, then shut down `dst`'s write side at EOF.
async fn pump(src: &TcpStream, dst: &TcpStream, (pr, pw): (OwnedFd, OwnedFd)) -> io::Result<u64> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut total = 0u64;
    loop {
        // Fill the (empty) pipe from the source socket.
        let n = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || {
                splice(src.as_fd(), None, pw.as_fd(), None, CHUNK, flags).map_err(io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            // EOF: pass the half-close on; the other direction may still be flowing.
            match SockRef::from(dst).shutdown(Shutdown::Write) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                Err(e) => return Err(e),
            }
            return Ok(total);
        }
        // Drain the pipe completely into the destination socket.
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pr.as_fd(), None, dst.as_fd(), None, left, flags).map_err(io::Error::from)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(w) => {
                    left -= w;
                    total += w as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of sockets over loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap());
        let (a, b) = tokio::join!(a, l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn both_directions_half_close_and_exact_bytes() {
        // client <-> (down | proxy | up) <-> server
        let (mut client, mut down) = pair().await;
        let (mut up, mut server) = pair().await;
        let proxy = tokio::spawn(async move { forward(&mut down, &mut up).await });
        let req: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let resp: Vec<u8> = (0..1_000_000u32).map(|i| (i % 241) as u8).collect();
        let req2 = req.clone();
        let resp2 = resp.clone();
        let server_task = tokio::spawn(async move {
            let mut got = Vec::new();
            // The server only answers after the client's EOF arrived through the proxy.
            server.read_to_end(&mut got).await.unwrap();
            assert!(got == req2, "request bytes differ");
            server.write_all(&resp2).await.unwrap();
            server.shutdown().await.unwrap();
        });
        client.write_all(&req).await.unwrap();
        client.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert!(back == resp, "response bytes differ");
        server_task.await.unwrap();
        let t = proxy.await.unwrap().unwrap();
        assert_eq!(t.tx, req.len() as u64);
        assert_eq!(t.rx, resp.len() as u64);
    }
}
