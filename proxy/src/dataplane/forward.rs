//! Bidirectional byte copy with half-close, byte counters and the connection's time limits.
//!
//! A direction starts in userspace: each read goes through the worker's scratch buffer
//! straight into a write (no pipe, no per-connection buffer), which is what short
//! connections and small messages cost least with. The first read that fills the scratch
//! buffer marks a bulk flow: that direction then moves socket -> pipe -> socket with
//! `splice(2)`, so the kernel moves pages and the payload never enters userspace (as HAProxy's
//! automatic splicing does). If a pipe cannot be created (fd limit) the direction stays in
//! userspace. Either way an error names the side whose socket failed (Envoy's `DC`/`UC`).
//!
//! A TLS session (terminated downstream or originated upstream) cannot be spliced: its bytes
//! are decrypted and encrypted in userspace. [`forward_io`] takes the buffered copy whenever
//! either side is TLS, with the same half-close (a TLS EOF is the peer's `close_notify`, passed
//! on as ours), byte counts (plaintext) and limits.
//!
//! Time limits (tcp_proxy's `idle_timeout` and `max_downstream_connection_duration`) are kept
//! by a watchdog beside the two directions, not inside them: each direction only adds what it
//! moved to a shared atomic counter (no clock read, no syscall per chunk), and the watchdog
//! wakes every quarter of the idle timeout to see whether the counters moved. So an idle
//! connection is closed between `idle` and `1.25 * idle` after its last byte.
//!
//! A [`Report`] (Istio's `tcp_reporting_duration`) is also kept beside the directions: every
//! period it hands on the bytes moved since the last report, and once more when the copy ends
//! however it ends, so a long-lived connection's bytes show while it lasts and no byte is
//! counted twice or lost.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::ReadHalf;

use super::error::Side;
use crate::gate::Gated;

/// Largest amount moved per splice call: the default pipe capacity, so a splice into an empty
/// pipe never blocks.
const CHUNK: usize = 64 * 1024;
/// Per-direction buffer of the buffered copy.
const BUF: usize = 64 * 1024;
/// The worker's scratch buffer for userspace moves: a read that fills it marks a bulk flow.
const SMALL: usize = 16 * 1024;

thread_local! {
    /// Borrowed only between a read and the write that follows it, never across an await.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; SMALL].into_boxed_slice());
}

/// The limits one copy runs under.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Close both sides after this long without a byte either way (`None`: never).
    pub idle: Option<Duration>,
    /// Close both sides this long after the copy started (`None`: never).
    pub max_duration: Option<Duration>,
    /// Most bytes held at once per direction (`per_connection_buffer_limit_bytes`); the copy
    /// never moves more than 64 KiB at once either way.
    pub buffer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            idle: None,
            max_duration: None,
            buffer: CHUNK,
        }
    }
}

impl Limits {
    fn chunk(&self, most: usize) -> usize {
        self.buffer.clamp(1, most)
    }
}

/// Why the copy ended before both sides closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// No byte moved either way for the idle timeout.
    Idle,
    /// The connection reached its maximum duration.
    MaxDuration,
}

/// How a copy ended: what moved, and whether a limit closed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// Bytes moved.
    pub transferred: Transferred,
    /// The limit that closed the connection; `None`: both sides closed.
    pub cut: Option<Cut>,
}

/// Bytes moved so far, per direction, shared by the directions and the watchdog.
#[derive(Debug, Default)]
struct Moved {
    tx: AtomicU64,
    rx: AtomicU64,
}

impl Moved {
    fn total(&self) -> u64 {
        self.tx.load(Ordering::Relaxed) + self.rx.load(Ordering::Relaxed)
    }

    fn get(&self) -> Transferred {
        Transferred {
            tx: self.tx.load(Ordering::Relaxed),
            rx: self.rx.load(Ordering::Relaxed),
        }
    }
}

/// Resolves when a limit is reached: the maximum duration, or no movement in `moved` for the
/// idle timeout (checked every quarter of it). Never resolves without limits.
async fn watchdog(moved: &Moved, limits: Limits) -> Cut {
    use tokio::time::{Instant, sleep_until};
    let start = Instant::now();
    let end = limits.max_duration.map(|d| start + d);
    let Some(idle) = limits.idle else {
        match end {
            Some(e) => {
                sleep_until(e).await;
                return Cut::MaxDuration;
            }
            None => return std::future::pending().await,
        }
    };
    let tick = (idle / 4).max(Duration::from_millis(1));
    let mut seen = moved.total();
    let mut last = start;
    loop {
        let now = Instant::now();
        let mut wake = (now + tick).min(last + idle);
        if let Some(e) = end {
            wake = wake.min(e);
        }
        sleep_until(wake).await;
        let now = Instant::now();
        if end.is_some_and(|e| now >= e) {
            return Cut::MaxDuration;
        }
        let total = moved.total();
        if total != seen {
            seen = total;
            last = now;
        } else if now.duration_since(last) >= idle {
            return Cut::Idle;
        }
    }
}

/// Bytes moved in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Downstream to upstream.
    pub tx: u64,
    /// Upstream to downstream.
    pub rx: u64,
}

impl std::iter::Sum for Transferred {
    fn sum<I: Iterator<Item = Transferred>>(iter: I) -> Transferred {
        iter.fold(Transferred::default(), |a, t| Transferred {
            tx: a.tx + t.tx,
            rx: a.rx + t.rx,
        })
    }
}

impl std::ops::Sub for Transferred {
    type Output = Transferred;

    fn sub(self, earlier: Transferred) -> Transferred {
        Transferred {
            tx: self.tx - earlier.tx,
            rx: self.rx - earlier.rx,
        }
    }
}

/// Where a copy reports its bytes while it runs: every `every`, what moved since the last
/// report, and the rest when it ends.
#[derive(Clone, Copy)]
pub struct Report<'a> {
    /// The period.
    pub every: Duration,
    /// Receives each increment.
    pub sink: &'a (dyn Fn(Transferred) + Sync),
}

impl std::fmt::Debug for Report<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Report")
            .field("every", &self.every)
            .finish()
    }
}

/// Hands `sink` the increments of `moved` every `every` for ever, advancing `reported`.
async fn reporter(moved: &Moved, report: Option<Report<'_>>, reported: &mut Transferred) {
    let Some(r) = report else {
        return std::future::pending().await;
    };
    let start = tokio::time::Instant::now() + r.every;
    let mut tick = tokio::time::interval_at(start, r.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = moved.get();
        if now != *reported {
            (r.sink)(now - *reported);
            *reported = now;
        }
    }
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

/// Copy both ways until both sides have closed or a limit is reached. An EOF from one side is
/// passed on as a write shutdown to the other (half-close), and the other direction keeps
/// flowing. An error in either direction ends both. When a limit is reached the copy stops;
/// the caller closes both sockets by dropping them.
pub async fn forward(
    down: &mut TcpStream,
    up: &mut TcpStream,
    limits: Limits,
    report: Option<Report<'_>>,
) -> Result<Ended, ForwardError> {
    let moved = Moved::default();
    let chunk = limits.chunk(CHUNK);
    let (dr, dw) = down.split();
    let (ur, uw) = up.split();
    // Pinned in place and lent: passed by value, it would sit in this future and again
    // in the watchdog's.
    let both = std::pin::pin!(async {
        tokio::try_join!(
            pump(
                dr,
                uw.as_ref(),
                (Side::Downstream, Side::Upstream),
                &moved.tx,
                chunk
            ),
            pump(
                ur,
                dw.as_ref(),
                (Side::Upstream, Side::Downstream),
                &moved.rx,
                chunk
            )
        )
    });
    under_watchdog(both, &moved, limits, report).await
}

/// One side of a proxied connection: a TCP socket (spliced when the other side is one too),
/// or a TLS session over one (copied through userspace).
#[derive(Debug)]
pub enum Io {
    /// Plaintext.
    Tcp(TcpStream),
    /// TLS, either end (terminated downstream, originated upstream).
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl Io {
    /// The TCP socket under the stream.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Io::Tcp(s) => s,
            Io::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Tcp(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Copy both ways between two sides of any kind: spliced when both are TCP and `buffered` is
/// not asked for (see [`forward_copy`] for when it must be), else through userspace.
pub async fn forward_io(
    down: &mut Io,
    up: &mut Io,
    limits: Limits,
    buffered: bool,
    report: Option<Report<'_>>,
) -> Result<Ended, ForwardError> {
    match (down, up) {
        (Io::Tcp(d), Io::Tcp(u)) if !buffered => forward(d, u, limits, report).await,
        (d, u) => forward_copy(d, u, limits, report).await,
    }
}

/// As [`forward`], with a userspace buffer per direction instead of splice: for TLS sessions,
/// and for sockets whose incoming payload may sit in a sockmap psock queue (`--sockmap`),
/// which only recvmsg reads.
pub async fn forward_copy<D, U>(
    down: &mut D,
    up: &mut U,
    limits: Limits,
    report: Option<Report<'_>>,
) -> Result<Ended, ForwardError>
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let moved = Moved::default();
    let buf = limits.chunk(BUF);
    let (dr, dw) = tokio::io::split(down);
    let (ur, uw) = tokio::io::split(up);
    // Pinned in place and lent: passed by value, it would sit in this future and again
    // in the watchdog's.
    let both = std::pin::pin!(async {
        tokio::try_join!(
            copy(dr, uw, (Side::Downstream, Side::Upstream), &moved.tx, buf),
            copy(ur, dw, (Side::Upstream, Side::Downstream), &moved.rx, buf)
        )
    });
    under_watchdog(both, &moved, limits, report).await
}

/// Runs `both` directions until they end or the watchdog cuts the connection (then they are
/// dropped); either way reports what `moved`, to `report` too (the rest since its last
/// period, also when a side failed).
async fn under_watchdog<T>(
    both: Pin<&mut impl Future<Output = Result<T, ForwardError>>>,
    moved: &Moved,
    limits: Limits,
    report: Option<Report<'_>>,
) -> Result<Ended, ForwardError> {
    let mut reported = Transferred::default();
    // The timers are polled when they fire, not again on every read of either direction.
    let ended = tokio::select! {
        biased;
        r = both => r.map(|_| None),
        cut = Gated::new(watchdog(moved, limits)) => Ok(Some(cut)),
        () = Gated::new(reporter(moved, report, &mut reported)) => unreachable!("the reporter never ends"),
    };
    if let Some(r) = report {
        let rest = moved.get() - reported;
        if rest != Transferred::default() {
            (r.sink)(rest);
        }
    }
    let cut = ended?;
    Ok(Ended {
        transferred: moved.get(),
        cut,
    })
}

/// One buffered direction: `src` -> `dst` until EOF, then shut down `dst`'s write side.
async fn copy(
    mut src: impl AsyncRead + Unpin,
    mut dst: impl AsyncWrite + Unpin,
    (src_side, dst_side): (Side, Side),
    moved: &AtomicU64,
    size: usize,
) -> Result<(), ForwardError> {
    let mut buf = vec![0u8; size];
    loop {
        let n = match src.read(&mut buf).await {
            Ok(n) => n,
            // A TLS peer that closed its socket without `close_notify`: the end of its
            // stream all the same (TCP's EOF never reads as an error).
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(on(src_side)(e)),
        };
        if n == 0 {
            return match dst.shutdown().await {
                Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(on(dst_side)(e)),
                _ => Ok(()),
            };
        }
        dst.write_all(&buf[..n]).await.map_err(on(dst_side))?;
        moved.fetch_add(n as u64, Ordering::Relaxed);
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(io::Error::from)
}

/// Passes `src`'s EOF on to `dst` (a write shutdown); the other direction may still flow.
fn half_close(dst: &TcpStream, dst_side: Side) -> Result<(), ForwardError> {
    match SockRef::from(dst).shutdown(Shutdown::Write) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        Err(e) => Err(on(dst_side)(e)),
    }
}

/// One read of at most `size` bytes from `src` through the worker's scratch buffer, written to
/// `dst` before the next read; returns how many bytes moved (0: EOF).
///
/// The read goes through tokio's `AsyncRead` of the read half, not `readable` + `try_read`:
/// a read shorter than the buffer shows the socket drained, and that path then forgets the
/// readiness itself (as nginx does after a short `recv`), where `try_read` keeps it until a
/// read fails with EAGAIN: one wasted `recvfrom` per message and direction.
async fn relay_once(
    src: &mut ReadHalf<'_>,
    dst: &TcpStream,
    (src_side, dst_side): (Side, Side),
    size: usize,
) -> Result<usize, ForwardError> {
    let (n, rest) = std::future::poll_fn(|cx| {
        SCRATCH.with_borrow_mut(|scratch| {
            let mut buf = ReadBuf::new(&mut scratch[..size]);
            match Pin::new(&mut *src).poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(on(src_side)(e))),
                Poll::Ready(Ok(())) => {}
            }
            let n = buf.filled().len();
            if n == 0 {
                return Poll::Ready(Ok((0, Vec::new())));
            }
            // What `dst` cannot take now waits in a buffer of its own (the scratch buffer
            // belongs to the worker): rare, the peer's receive window is full.
            let w = match dst.try_write(&scratch[..n]) {
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Poll::Ready(Err(on(dst_side)(e))),
            };
            Poll::Ready(Ok((n, scratch[w..n].to_vec())))
        })
    })
    .await?;
    let mut at = 0;
    while at < rest.len() {
        dst.writable().await.map_err(on(dst_side))?;
        match dst.try_write(&rest[at..]) {
            Ok(w) => at += w,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(on(dst_side)(e)),
        }
    }
    Ok(n)
}

/// One direction, `src` -> `dst`, then shut down `dst`'s write side at EOF: in userspace
/// until a read fills the scratch buffer (a bulk flow), then through a pipe with splice.
async fn pump(
    mut src: ReadHalf<'_>,
    dst: &TcpStream,
    sides: (Side, Side),
    moved: &AtomicU64,
    chunk: usize,
) -> Result<(), ForwardError> {
    let small = chunk.min(SMALL);
    let mut may_splice = true;
    loop {
        let n = relay_once(&mut src, dst, sides, small).await?;
        if n == 0 {
            return half_close(dst, sides.1);
        }
        moved.fetch_add(n as u64, Ordering::Relaxed);
        if n == small && may_splice {
            match pipe() {
                Ok(p) => return splice_pump(src.as_ref(), dst, sides, p, moved, chunk).await,
                Err(e) => {
                    may_splice = false;
                    tracing::debug!(error = %e, "no pipe for splice: the direction stays in userspace");
                }
            }
        }
    }
}

/// One direction: `src` -> pipe -> `dst`, then shut down `dst`'s write side at EOF.
async fn splice_pump(
    src: &TcpStream,
    dst: &TcpStream,
    (src_side, dst_side): (Side, Side),
    (pr, pw): (OwnedFd, OwnedFd),
    moved: &AtomicU64,
    chunk: usize,
) -> Result<(), ForwardError> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        // Fill the (empty) pipe from the source socket.
        let n = loop {
            src.readable().await.map_err(on(src_side))?;
            match src.try_io(Interest::READABLE, || {
                splice(src.as_fd(), None, pw.as_fd(), None, chunk, flags).map_err(io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(on(src_side)(e)),
            }
        };
        if n == 0 {
            return half_close(dst, dst_side);
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
                    moved.fetch_add(w as u64, Ordering::Relaxed);
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
                forward_copy(&mut down, &mut up, Limits::default(), None).await
            } else {
                forward(&mut down, &mut up, Limits::default(), None).await
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
        let ended = proxy.await.unwrap().unwrap();
        assert_eq!(ended.cut, None);
        let t = ended.transferred;
        assert_eq!(t.tx, req.len() as u64);
        assert_eq!(t.rx, resp.len() as u64);
    }

    /// Small messages each way, each answered before the next is sent: every read is shorter
    /// than the buffer, so the reading side forgets the socket's readiness without an EAGAIN
    /// read and must hear of the next message from the reactor again.
    #[tokio::test]
    async fn ping_pong_of_small_messages_keeps_flowing() {
        let (mut client, mut down) = pair().await;
        let (mut up, mut server) = pair().await;
        let proxy =
            tokio::spawn(async move { forward(&mut down, &mut up, Limits::default(), None).await });
        let echo = tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            loop {
                let n = server.read(&mut buf).await.unwrap();
                if n == 0 {
                    server.shutdown().await.unwrap();
                    return;
                }
                server.write_all(&buf[..n]).await.unwrap();
            }
        });
        let mut sent = 0u64;
        for i in 1..=200usize {
            let msg: Vec<u8> = (0..(i * 7) % 1500 + 1).map(|b| (b + i) as u8).collect();
            client.write_all(&msg).await.unwrap();
            let mut back = vec![0u8; msg.len()];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(back, msg, "message {i}");
            sent += msg.len() as u64;
        }
        client.shutdown().await.unwrap();
        assert_eq!(client.read(&mut [0u8; 1]).await.unwrap(), 0);
        echo.await.unwrap();
        let t = proxy.await.unwrap().unwrap().transferred;
        assert_eq!((t.tx, t.rx), (sent, sent));
    }

    /// A TLS client and server over a loopback pair: (client session, server session).
    async fn tls_pair() -> (
        tokio_rustls::client::TlsStream<TcpStream>,
        tokio_rustls::server::TlsStream<TcpStream>,
    ) {
        use std::sync::Arc;
        // ring is the project's one crypto provider; only its post-quantum default is missing.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = ck.cert.der().clone();
        let key =
            rustls_pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (c, s) = pair().await;
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let (c, s) = tokio::join!(
            tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, c),
            tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(s)
        );
        (c.unwrap(), s.unwrap())
    }

    #[tokio::test]
    async fn tls_sides_are_copied_with_close_notify_as_half_close() {
        // client =TLS= (down | proxy | up) =TLS= server: the proxy terminates one session and
        // originates the other, as a skiff between two meshed workloads does.
        let (mut client, down) = tls_pair().await;
        let (up, mut server) = tls_pair().await;
        let mut down = Io::Tls(Box::new(down.into()));
        let mut up = Io::Tls(Box::new(up.into()));
        let proxy = tokio::spawn(async move {
            forward_io(&mut down, &mut up, Limits::default(), false, None).await
        });
        let req: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        let resp: Vec<u8> = (0..300_000u32).map(|i| (i % 239) as u8).collect();
        let (req2, resp2) = (req.clone(), resp.clone());
        let server_task = tokio::spawn(async move {
            let mut got = Vec::new();
            // close_notify from the client, passed on by the proxy, ends this read.
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
        let ended = proxy.await.unwrap().unwrap();
        assert_eq!(ended.cut, None);
        assert_eq!(ended.transferred.tx, req.len() as u64);
        assert_eq!(ended.transferred.rx, resp.len() as u64);
    }

    #[tokio::test]
    async fn a_tls_peer_that_drops_its_socket_without_close_notify_ends_its_direction() {
        // A TLS client on one side, plain TCP upstream: the client's socket closes without
        // close_notify, which ends its direction like an EOF (as Envoy does), not as an error.
        let (client, down) = tls_pair().await;
        let (up, mut server) = pair().await;
        let mut down = Io::Tls(Box::new(down.into()));
        let mut up = Io::Tcp(up);
        let proxy = tokio::spawn(async move {
            forward_io(&mut down, &mut up, Limits::default(), false, None).await
        });
        let (tcp, _) = client.into_inner();
        drop(tcp);
        // The upstream sees the end of the request stream (not a hang, not a reset).
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty());
        server.shutdown().await.unwrap();
        // Passing the upstream's EOF on to a client that is gone may fail; if so, it is the
        // client's side that failed.
        match proxy.await.unwrap() {
            Ok(ended) => assert_eq!(ended.transferred.tx, 0),
            Err(e) => assert_eq!(e.side, Side::Downstream, "{e}"),
        }
    }

    #[tokio::test]
    async fn a_reset_names_the_side_that_failed() {
        for buffered in [false, true] {
            let (client, mut down) = pair().await;
            let (mut up, server) = pair().await;
            let proxy = tokio::spawn(async move {
                if buffered {
                    forward_copy(&mut down, &mut up, Limits::default(), None).await
                } else {
                    forward(&mut down, &mut up, Limits::default(), None).await
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

    #[tokio::test]
    async fn idle_connections_are_cut_and_busy_ones_are_not() {
        for buffered in [false, true] {
            let limits = Limits {
                idle: Some(Duration::from_millis(200)),
                ..Limits::default()
            };
            // A silent pair is cut after about 200 ms.
            let (_client, mut down) = pair().await;
            let (mut up, _server) = pair().await;
            let t = tokio::time::Instant::now();
            let ended = if buffered {
                forward_copy(&mut down, &mut up, limits, None).await
            } else {
                forward(&mut down, &mut up, limits, None).await
            }
            .unwrap();
            assert_eq!(ended.cut, Some(Cut::Idle), "buffered {buffered}");
            let took = t.elapsed();
            assert!(
                took >= Duration::from_millis(200) && took < Duration::from_millis(1000),
                "{took:?}"
            );
            // A pair that talks every 50 ms for 600 ms is not cut.
            let (mut client, mut down) = pair().await;
            let (mut up, mut server) = pair().await;
            let proxy = tokio::spawn(async move {
                if buffered {
                    forward_copy(&mut down, &mut up, limits, None).await
                } else {
                    forward(&mut down, &mut up, limits, None).await
                }
            });
            for _ in 0..12 {
                client.write_all(b"x").await.unwrap();
                let mut b = [0u8; 1];
                server.read_exact(&mut b).await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            client.shutdown().await.unwrap();
            server.shutdown().await.unwrap();
            let ended = proxy.await.unwrap().unwrap();
            assert_eq!(ended.cut, None, "buffered {buffered}");
            assert_eq!(ended.transferred.tx, 12);
        }
    }

    #[tokio::test]
    async fn a_busy_connection_is_cut_at_its_max_duration() {
        let limits = Limits {
            idle: Some(Duration::from_secs(10)),
            max_duration: Some(Duration::from_millis(300)),
            ..Limits::default()
        };
        let (mut client, mut down) = pair().await;
        let (mut up, mut server) = pair().await;
        let proxy = tokio::spawn(async move { forward(&mut down, &mut up, limits, None).await });
        let t = tokio::time::Instant::now();
        let talk = async {
            loop {
                if client.write_all(b"y").await.is_err() {
                    break;
                }
                let mut b = [0u8; 1];
                if server.read_exact(&mut b).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        // The talk ends when the cut closes its sockets; the copy must have ended by then
        // (both are awaited: which one a select would see first is a race).
        let (r, ()) =
            tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(proxy, talk) })
                .await
                .expect("the busy connection was never cut");
        let ended = r.unwrap().unwrap();
        assert_eq!(ended.cut, Some(Cut::MaxDuration));
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(ended.transferred.tx > 0);
    }

    #[tokio::test]
    async fn a_report_hands_on_increments_while_the_connection_lasts_and_the_rest_at_its_end() {
        for buffered in [false, true] {
            let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Transferred>::new()));
            let (mut client, mut down) = pair().await;
            let (mut up, mut server) = pair().await;
            let sink_got = got.clone();
            let proxy = tokio::spawn(async move {
                let sink = move |t: Transferred| sink_got.lock().unwrap().push(t);
                let report = Some(Report {
                    every: Duration::from_millis(20),
                    sink: &sink,
                });
                if buffered {
                    forward_copy(&mut down, &mut up, Limits::default(), report).await
                } else {
                    forward(&mut down, &mut up, Limits::default(), report).await
                }
            });
            client.write_all(b"hello").await.unwrap();
            let mut b = [0u8; 5];
            server.read_exact(&mut b).await.unwrap();
            server.write_all(b"hi").await.unwrap();
            client.read_exact(&mut b[..2]).await.unwrap();
            // The open connection's bytes are reported within a few periods.
            let mut seen = Transferred::default();
            for _ in 0..250 {
                seen = got.lock().unwrap().iter().copied().sum();
                if seen == (Transferred { tx: 5, rx: 2 }) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(seen, Transferred { tx: 5, rx: 2 }, "buffered {buffered}");
            // More after the last report: handed on at the end, never counted twice.
            client.write_all(b"abc").await.unwrap();
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest, b"abc");
            server.shutdown().await.unwrap();
            let ended = proxy.await.unwrap().unwrap();
            let all = got.lock().unwrap().clone();
            assert!(all.iter().all(|t| *t != Transferred::default()), "{all:?}");
            let sum: Transferred = all.iter().copied().sum();
            assert_eq!(sum, ended.transferred, "buffered {buffered}");
            assert_eq!(sum, Transferred { tx: 8, rx: 2 });
        }
    }

    /// Small writes into a peer that does not read yet: the scratch buffer's leftovers wait
    /// in the direction's own buffer, and nothing is lost or reordered, also across the
    /// switch to splice when reads start to fill the scratch buffer.
    #[tokio::test]
    async fn small_messages_into_a_full_peer_arrive_whole_and_in_order() {
        let (mut client, mut down) = pair().await;
        let (mut up, server) = pair().await;
        SockRef::from(&up).set_send_buffer_size(4096).unwrap();
        SockRef::from(&server).set_recv_buffer_size(4096).unwrap();
        let proxy =
            tokio::spawn(async move { forward(&mut down, &mut up, Limits::default(), None).await });
        let msgs: Vec<Vec<u8>> = (0..200u32)
            .map(|i| (0..1000).map(|j| ((i * 7 + j) % 251) as u8).collect())
            .collect();
        let want: Vec<u8> = msgs.concat();
        let writer = tokio::spawn(async move {
            for m in &msgs {
                client.write_all(m).await.unwrap();
                tokio::task::yield_now().await;
            }
            client.shutdown().await.unwrap();
            client
        });
        // The server starts reading only once the proxy's writes had to wait.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut server = server;
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == want, "{} bytes, want {}", got.len(), want.len());
        server.shutdown().await.unwrap();
        drop(writer.await.unwrap());
        let ended = proxy.await.unwrap().unwrap();
        assert_eq!(ended.transferred.tx, want.len() as u64);
    }
}
