//! Bidirectional byte copy with half-close and byte counters.
//!
//! Bytes move socket -> pipe -> socket with `splice(2)`, so the kernel moves pages and the
//! payload never enters userspace: one pipe per direction, allocated once per connection, no
//! per-byte work in skiff. If pipes cannot be created (fd limit) the copy falls back to a
//! buffered copy. Either way an error names the side whose socket failed (Envoy's `DC`/`UC`).

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::TcpStream;

use super::error::Side;

/// Largest amount moved per splice call: the default pipe capacity, so a splice into an empty
/// pipe never blocks.
const CHUNK: usize = 64 * 1024;
/// Per-direction buffer of the buffered copy.
const BUF: usize = 64 * 1024;

/// Bytes moved in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Downstream to upstream.
    pub tx: u64,
    /// Upstream to downstream.
    pub rx: u64,
}

/// A copy that ended because one side's socket failed.
#[derive(Debug, thiserror::Error)]
#[error("{side} socket: {source}")]
pub struct ForwardError {
    /// Whose socket failed.
    pub side: Side,
    /// Cause.
    pub source: io::Error,
}

fn on(side: Side) -> impl Fn(io::Error) -> ForwardError {
    move |source| ForwardError { side, source }
}

/// Copy both ways until both sides have closed. An EOF from one side is passed on as a
/// write shutdown to the other (half-close), and the other direction keeps flowing. An error
/// in either direction ends both.
pub async fn forward(
    down: &mut TcpStream,
    up: &mut TcpStream,
) -> Result<Transferred, ForwardError> {
    let pipes = (pipe(), pipe());
    let (Ok(p1), Ok(p2)) = pipes else {
        return forward_copy(down, up).await;
    };
    let (tx, rx) = tokio::try_join!(
        pump(down, up, (Side::Downstream, Side::Upstream), p1),
        pump(up, down, (Side::Upstream, Side::Downstream), p2)
    )?;
    Ok(Transferred { tx, rx })
}

/// As [`forward`], with a userspace buffer per direction instead of splice: for sockets whose
/// incoming payload may sit in a sockmap psock queue (`--sockmap`), which only recvmsg reads.
pub async fn forward_copy(
    down: &mut TcpStream,
    up: &mut TcpStream,
) -> Result<Transferred, ForwardError> {
    let (dr, dw) = down.split();
    let (ur, uw) = up.split();
    let (tx, rx) = tokio::try_join!(
        copy(dr, uw, (Side::Downstream, Side::Upstream)),
        copy(ur, dw, (Side::Upstream, Side::Downstream))
    )?;
    Ok(Transferred { tx, rx })
}

/// One buffered direction: `src` -> `dst` until EOF, then shut down `dst`'s write side.
async fn copy(
    mut src: impl AsyncRead + Unpin,
    mut dst: impl AsyncWrite + Unpin,
    (src_side, dst_side): (Side, Side),
) -> Result<u64, ForwardError> {
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    loop {
        let n = src.read(&mut buf).await.map_err(on(src_side))?;
        if n == 0 {
            return match dst.shutdown().await {
                Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(on(dst_side)(e)),
                _ => Ok(total),
            };
        }
        dst.write_all(&buf[..n]).await.map_err(on(dst_side))?;
        total += n as u64;
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(io::Error::from)
}

/// One direction: `src` -> pipe -> `dst`, then shut down `dst`'s write side at EOF.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    (src_side, dst_side): (Side, Side),
    (pr, pw): (OwnedFd, OwnedFd),
) -> Result<u64, ForwardError> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut total = 0u64;
    loop {
        // Fill the (empty) pipe from the source socket.
        let n = loop {
            src.readable().await.map_err(on(src_side))?;
            match src.try_io(Interest::READABLE, || {
                splice(src.as_fd(), None, pw.as_fd(), None, CHUNK, flags).map_err(io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(on(src_side)(e)),
            }
        };
        if n == 0 {
            // EOF: pass the half-close on; the other direction may still be flowing.
            match SockRef::from(dst).shutdown(Shutdown::Write) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                Err(e) => return Err(on(dst_side)(e)),
            }
            return Ok(total);
        }
        // Drain the pipe completely into the destination socket.
        let mut left = n;
        while left > 0 {
            dst.writable().await.map_err(on(dst_side))?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pr.as_fd(), None, dst.as_fd(), None, left, flags).map_err(io::Error::from)
            }) {
                Ok(0) => return Err(on(dst_side)(io::ErrorKind::WriteZero.into())),
                Ok(w) => {
                    left -= w;
                    total += w as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(on(dst_side)(e)),
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
        both_ways(false).await;
        both_ways(true).await;
    }

    async fn both_ways(buffered: bool) {
        // client <-> (down | proxy | up) <-> server
        let (mut client, mut down) = pair().await;
        let (mut up, mut server) = pair().await;
        let proxy = tokio::spawn(async move {
            if buffered {
                forward_copy(&mut down, &mut up).await
            } else {
                forward(&mut down, &mut up).await
            }
        });
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

    #[tokio::test]
    async fn a_reset_names_the_side_that_failed() {
        for buffered in [false, true] {
            let (client, mut down) = pair().await;
            let (mut up, server) = pair().await;
            let proxy = tokio::spawn(async move {
                if buffered {
                    forward_copy(&mut down, &mut up).await
                } else {
                    forward(&mut down, &mut up).await
                }
            });
            // SO_LINGER 0: close sends RST, so the proxy's read fails with ECONNRESET.
            SockRef::from(&server)
                .set_linger(Some(std::time::Duration::ZERO))
                .unwrap();
            drop(server);
            let err = proxy.await.unwrap().unwrap_err();
            assert_eq!(err.side, Side::Upstream, "buffered {buffered}: {err}");
            drop(client);
        }
    }
}
