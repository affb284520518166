//! The HTTP connection manager's timers and limits, kept beside the work they watch rather
//! than inside it: a request or response only bumps an atomic counter when it moves, and a
//! watchdog that wakes every quarter of its timeout sees whether anything moved. So a timeout
//! fires between its value and 1.25 times it after the last activity.
//!
//! - Per connection ([`ConnState`], [`watch_connection`]): `idle_timeout` (no stream for that
//!   long), `max_connection_duration`, `max_requests_per_connection` and the listener's drain
//!   each start a drain (HTTP/1.1: close once the current response is done; HTTP/2: GOAWAY),
//!   and a connection drained by its own limits is closed `drain_timeout` later if it is
//!   still open (a draining listener's connections end with the process's drain window).
//!   `request_headers_timeout` runs from the first byte of an HTTP/1.1 request head (seen by
//!   [`HeadTimed`] on the socket) until hyper hands the head over; when it expires the
//!   connection is closed. (hyper's own header timer would also run while a kept-alive
//!   connection waits for its next request, which Envoy's does not.)
//! - Per stream ([`StreamActivity`], [`watch_stream`]): `stream_idle_timeout` (or the route's
//!   `idle_timeout`) and `request_timeout` until the response starts (408); the response body's
//!   idle timer is [`super::body::Timed`].

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::{Body, BoxError};
use crate::model::listener::HttpLimits;

/// Why a connection is drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// No stream for the connection's `idle_timeout`.
    Idle,
    /// `max_connection_duration` reached.
    MaxDuration,
    /// `max_requests_per_connection` served.
    MaxRequests,
    /// The listener is draining (shutdown).
    Listener,
    /// A request head did not arrive within `request_headers_timeout` (close at once).
    HeadTimeout,
}

/// What the connection's watchdog reads of its streams.
#[derive(Debug, Default)]
pub struct ConnState {
    /// Streams whose response is not finished.
    active: AtomicUsize,
    /// Bumped when a stream starts or ends.
    events: AtomicU64,
    /// Requests seen.
    requests: AtomicU32,
    /// Woken when the request limit is reached.
    limit_reached: Notify,
    /// The request head timer.
    head: HeadTimer,
}

/// `request_headers_timeout`'s timer: armed by the first byte of a head, disarmed when the
/// head was parsed, waiting again once the response is done (HTTP/1.1; off for HTTP/2).
#[derive(Debug)]
pub struct HeadTimer {
    origin: Instant,
    /// Between requests: the next byte starts a head.
    awaiting: AtomicBool,
    /// Milliseconds since `origin` + 1 when the current head started; 0: none.
    started: AtomicU64,
    /// HTTP/2: streams, not heads.
    off: AtomicBool,
}

impl Default for HeadTimer {
    fn default() -> Self {
        HeadTimer {
            origin: Instant::now(),
            awaiting: AtomicBool::new(true),
            started: AtomicU64::new(0),
            off: AtomicBool::new(false),
        }
    }
}

impl HeadTimer {
    fn on_bytes(&self) {
        if !self.off.load(Ordering::Relaxed)
            && self.awaiting.load(Ordering::Relaxed)
            && self.started.load(Ordering::Relaxed) == 0
        {
            let ms = self.origin.elapsed().as_millis() as u64 + 1;
            self.started.store(ms, Ordering::Relaxed);
        }
    }

    fn head_done(&self, h2: bool) {
        self.awaiting.store(false, Ordering::Relaxed);
        self.started.store(0, Ordering::Relaxed);
        if h2 {
            self.off.store(true, Ordering::Relaxed);
        }
    }

    fn response_done(&self) {
        if !self.off.load(Ordering::Relaxed) {
            self.awaiting.store(true, Ordering::Relaxed);
        }
    }

    /// Resolves when a head has been arriving for `timeout`.
    async fn expired(&self, timeout: Duration) {
        let tick = (timeout / 4).max(Duration::from_millis(1));
        loop {
            tokio::time::sleep(tick).await;
            let started = self.started.load(Ordering::Relaxed);
            if started == 0 || self.off.load(Ordering::Relaxed) {
                continue;
            }
            let at = self.origin + Duration::from_millis(started - 1);
            if Instant::now().duration_since(at) >= timeout {
                return;
            }
        }
    }
}

/// The downstream socket, telling the connection's [`HeadTimer`] when bytes arrive.
pub struct HeadTimed<S> {
    inner: S,
    state: Arc<ConnState>,
}

impl<S> HeadTimed<S> {
    /// Wrap `inner` for the connection `state`.
    pub fn new(inner: S, state: Arc<ConnState>) -> HeadTimed<S> {
        HeadTimed { inner, state }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HeadTimed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.head.on_bytes();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeadTimed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl ConnState {
    /// State for a connection whose manager sets no `request_headers_timeout`: nothing waits
    /// on its heads, so their arrival is not timed (a clock read per request saved).
    pub fn without_head_timeout() -> ConnState {
        let s = ConnState::default();
        s.head.off.store(true, Ordering::Relaxed);
        s
    }

    /// A new stream: counted active until the returned guard drops (with its response body).
    /// Returns the guard and whether this request is the connection's last
    /// (`max_requests_per_connection`).
    pub fn start(self: &Arc<Self>, max_requests: Option<u32>, h2: bool) -> (StreamGuard, bool) {
        self.head.head_done(h2);
        self.active.fetch_add(1, Ordering::AcqRel);
        self.events.fetch_add(1, Ordering::Relaxed);
        let n = self.requests.fetch_add(1, Ordering::AcqRel) + 1;
        let last = max_requests.is_some_and(|m| n >= m);
        if last {
            self.limit_reached.notify_one();
        }
        (StreamGuard(self.clone()), last)
    }
}

/// Keeps a stream counted as active; released with the response body.
#[derive(Debug)]
pub struct StreamGuard(Arc<ConnState>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.events.fetch_add(1, Ordering::Relaxed);
        self.0.head.response_done();
    }
}

/// A response body that keeps its stream counted until it is dropped (sent or abandoned).
pub struct Guarded {
    inner: Body,
    _guard: StreamGuard,
}

impl Guarded {
    /// `inner`, holding `guard` for its life.
    pub fn new(inner: Body, guard: StreamGuard) -> Guarded {
        Guarded {
            inner,
            _guard: guard,
        }
    }
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Resolves with the first reason to drain the connection: `idle_timeout` without streams,
/// `max_connection_duration`, the request limit, or the listener's `drain` token.
pub async fn watch_connection(
    state: &ConnState,
    limits: &HttpLimits,
    drain: &CancellationToken,
) -> Drain {
    let start = Instant::now();
    let end = limits.max_connection_duration.map(|d| start + d);
    let idle = idle_for(limits.idle_timeout, &state.events, || {
        state.active.load(Ordering::Acquire) > 0
    });
    let duration = async {
        match end {
            Some(e) => sleep_until(e).await,
            None => std::future::pending().await,
        }
    };
    let head = async {
        match limits.request_headers_timeout {
            Some(t) => state.head.expired(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = head => Drain::HeadTimeout,
        () = idle => Drain::Idle,
        () = duration => Drain::MaxDuration,
        () = state.limit_reached.notified() => Drain::MaxRequests,
        () = drain.cancelled() => Drain::Listener,
    }
}

/// Resolves once `events` has not moved and `busy` has not held for `idle` (checked every
/// quarter of it, so between `idle` and 1.25 times it); never without `idle`.
async fn idle_for(idle: Option<Duration>, events: &AtomicU64, busy: impl Fn() -> bool) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    let tick = (idle / 4).max(Duration::from_millis(1));
    let mut seen = events.load(Ordering::Relaxed);
    let mut last = Instant::now();
    loop {
        sleep_until((Instant::now() + tick).min(last + idle)).await;
        let now = Instant::now();
        let moved = events.load(Ordering::Relaxed);
        if moved != seen || busy() {
            seen = moved;
            last = now;
        } else if now.duration_since(last) >= idle {
            return;
        }
    }
}

/// What a stream's watchdog reads of the request while the response has not started.
#[derive(Debug, Default)]
pub struct StreamActivity {
    /// Bumped with each request body frame.
    events: AtomicU64,
    /// The whole request has arrived.
    complete: AtomicBool,
}

impl StreamActivity {
    /// The whole request has arrived (a request without a body has from the start).
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// The whole request has arrived (it had no body).
    pub fn mark_complete(&self) {
        self.complete.store(true, Ordering::Release);
    }
}

/// Why a stream was ended before its response started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamCut {
    /// No activity for the stream idle timeout (`stream timeout`).
    Idle,
    /// The request did not arrive within `request_timeout` (`request timeout`).
    Request,
}

impl StreamCut {
    /// Envoy's local reply body.
    pub fn body(self) -> &'static str {
        match self {
            StreamCut::Idle => "stream timeout",
            StreamCut::Request => "request timeout",
        }
    }
}

/// Resolves when the stream idles for `idle` or the request is still incomplete at
/// `request_deadline`; never without either.
pub async fn watch_stream(
    act: &StreamActivity,
    idle: Option<Duration>,
    request_deadline: Option<Instant>,
) -> StreamCut {
    let request = async {
        match request_deadline {
            Some(d) => {
                sleep_until(d).await;
                // A complete request disarms the timer: wait for the response instead.
                if act.complete.load(Ordering::Acquire) {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    };
    let idle = idle_for(idle, &act.events, || false);
    tokio::select! {
        () = request => StreamCut::Request,
        () = idle => StreamCut::Idle,
    }
}

/// A request body that reports its frames and its end to a [`StreamActivity`].
pub struct Watched {
    inner: Body,
    act: Arc<StreamActivity>,
}

impl Watched {
    /// Watch `inner`; a body that is already complete (no body) marks the request complete.
    pub fn new(inner: Body, act: Arc<StreamActivity>) -> Watched {
        if inner.is_end_stream() {
            act.complete.store(true, Ordering::Release);
        }
        Watched { inner, act }
    }
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(_))) => {
                self.act.events.fetch_add(1, Ordering::Relaxed);
                if self.inner.is_end_stream() {
                    self.act.complete.store(true, Ordering::Release);
                }
            }
            Poll::Ready(None) => self.act.complete.store(true, Ordering::Release),
            _ => {}
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_idle_connection_drains_and_a_busy_one_does_not() {
        let state = Arc::new(ConnState::default());
        let limits = HttpLimits {
            idle_timeout: Some(Duration::from_millis(200)),
            ..HttpLimits::default()
        };
        let drain = CancellationToken::new();
        // One stream open for 400 ms: no idle timeout while it lasts.
        let (g, last) = state.start(None, false);
        assert!(!last);
        let t = Instant::now();
        let watch = watch_connection(&state, &limits, &drain);
        tokio::pin!(watch);
        tokio::select! {
            _ = &mut watch => panic!("a connection with an open stream is not idle"),
            () = tokio::time::sleep(Duration::from_millis(400)) => {}
        }
        drop(g);
        assert_eq!(watch.await, Drain::Idle);
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(600), "{took:?}");
        assert!(took <= Duration::from_millis(1000), "{took:?}");
    }

    #[tokio::test]
    async fn request_limit_duration_and_listener_drain() {
        let limits = HttpLimits {
            idle_timeout: None,
            max_requests_per_connection: Some(2),
            ..HttpLimits::default()
        };
        let drain = CancellationToken::new();
        let state = Arc::new(ConnState::default());
        let (_a, last_a) = state.start(limits.max_requests_per_connection, false);
        let (_b, last_b) = state.start(limits.max_requests_per_connection, false);
        assert_eq!((last_a, last_b), (false, true));
        assert_eq!(
            watch_connection(&state, &limits, &drain).await,
            Drain::MaxRequests
        );
        let limits = HttpLimits {
            idle_timeout: None,
            max_connection_duration: Some(Duration::from_millis(300)),
            ..HttpLimits::default()
        };
        let state = Arc::new(ConnState::default());
        assert_eq!(
            watch_connection(&state, &limits, &drain).await,
            Drain::MaxDuration
        );
        drain.cancel();
        let limits = HttpLimits {
            idle_timeout: None,
            ..HttpLimits::default()
        };
        assert_eq!(
            watch_connection(&state, &limits, &drain).await,
            Drain::Listener
        );
    }

    #[tokio::test]
    async fn stream_idle_and_request_timeouts() {
        // Idle: nothing moves for 200 ms.
        let act = StreamActivity::default();
        let t = Instant::now();
        assert_eq!(
            watch_stream(&act, Some(Duration::from_millis(200)), None).await,
            StreamCut::Idle
        );
        assert!(
            t.elapsed() <= Duration::from_millis(600),
            "{:?}",
            t.elapsed()
        );
        // request_timeout: an incomplete request is cut at its deadline...
        let act = StreamActivity::default();
        let d = Instant::now() + Duration::from_millis(100);
        assert_eq!(
            watch_stream(&act, Some(Duration::from_secs(5)), Some(d)).await,
            StreamCut::Request
        );
        // ...and a complete one is not.
        act.complete.store(true, Ordering::Release);
        let d = Instant::now() + Duration::from_millis(100);
        assert_eq!(
            watch_stream(&act, Some(Duration::from_millis(500)), Some(d)).await,
            StreamCut::Idle
        );
    }
}
