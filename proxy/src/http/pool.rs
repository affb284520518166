//! Upstream HTTP connections, kept alive and reused per endpoint, under the cluster's limits.
//!
//! HTTP/1.1: a list of idle connections per endpoint; a request takes one that is ready (its
//! previous response fully read) or opens a new one. An HTTP/1.1 connection has no task of
//! its own: the request that holds it drives it (as nginx's one event loop does), first
//! together with the response future, then from the response body handed downstream
//! ([`UpstreamBody`]), so no wake-up crosses tasks on a request's way. Once the body has ended
//! and the connection is ready again it goes back to the pool; a body dropped before its end
//! (or a connection that failed) closes it. An idle connection is polled by nobody: one the
//! upstream closed meanwhile is found when a request checks it out or the sweeper looks at
//! it, and the keep-alive race is covered by sending again on a fresh one. HTTP/2: one multiplexed
//! connection per endpoint, replaced when it closes. auto_config (`Proto::Auto`): each
//! connection becomes one or the other by what its TLS handshake's ALPN selected, and a
//! request is fitted to the connection it gets. Every socket is opened by
//! `net::connect` (the proxy's SO_MARK, the cluster's `connect_timeout`), then handed to the
//! request's [`Transport`] when it has one (TLS origination) before HTTP runs on it. Pooled
//! connections are keyed by endpoint, protocol and transport, so a TLS and a plaintext
//! connection to one endpoint (or two TLS ones with different settings or certificates) never
//! stand in for each other.
//!
//! Limits, as Envoy's pools: every connection holds a `max_connections` slot of its cluster for
//! its life. A request without a ready connection is pending (`max_pending_requests`, else 503
//! with `upstream_rq_pending_overflow`) until it has one: it opens a connection when a slot is
//! free, else it waits for a connection of its endpoint to come back (`upstream_cx_overflow`
//! counted once). As in Envoy, an endpoint with no connection at all may open one over the
//! limit, so no request waits for a connection that can never come. A connection is not reused
//! after `max_requests_per_connection` requests (`upstream_cx_max_requests`) or past
//! `max_connection_duration` (`upstream_cx_max_duration_reached`); an idle HTTP/1.1 connection
//! (an HTTP/2 one: no request started) is closed after the cluster's `idle_timeout`
//! (`upstream_cx_idle_timeout`) by a sweeper task that runs every 500 ms.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::{TrySendError, http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sync_wrapper::SyncWrapper;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::debug;

use super::{Body, BoxError};
use crate::addr::EndpointAddr;
use crate::lb::{BreakerGuard, Overflow, Resource, RoutingPriority};
use crate::net::{self as connect, ConnectError};
use crate::state::ClusterEntry;
use crate::stats::ClusterStats;

/// Idle HTTP/1.1 connections kept per endpoint; more are closed after their response.
const MAX_IDLE_PER_ENDPOINT: usize = 64;
/// How often the sweeper closes connections past their idle timeout or maximum duration.
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// A waiting request looks again this often even if nothing woke it.
const RECHECK: Duration = Duration::from_millis(25);

/// Upstream protocol of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    /// HTTP/1.1 with keep-alive.
    Http1,
    /// HTTP/2 prior knowledge (h2c).
    Http2,
    /// Chosen per connection, as Envoy's auto_config: HTTP/2 when the transport's ALPN
    /// selected `h2`, HTTP/1.1 otherwise (plaintext included). The request is built as an
    /// HTTP/1.1 one and fitted to the connection it gets.
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    addr: SocketAddr,
    proto: Proto,
    /// [`Transport::key`]; `None` for plaintext.
    transport: Option<u64>,
}

/// A byte stream HTTP runs over: a TCP socket, or a session (TLS) over one.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// A connection after its [`Transport`]: the stream to run HTTP over and the application
/// protocol its handshake negotiated (ALPN), if any.
pub struct Transported {
    /// The stream.
    pub stream: Box<dyn Stream>,
    /// The negotiated ALPN protocol.
    pub alpn: Option<Vec<u8>>,
}

/// What a [`Transport`] hands back.
pub type Wrapped = Pin<Box<dyn Future<Output = Result<Transported, BoxError>> + Send>>;

/// Sets up a fresh upstream TCP connection before HTTP runs on it (TLS origination).
pub trait Transport: Send + Sync {
    /// Tells pooled connections apart: two transports with the same key produce
    /// interchangeable connections (same TLS settings, same certificates).
    fn key(&self) -> u64;
    /// Wrap `tcp`, connected to `addr` (the handshake runs here; its failure is the
    /// connect's).
    fn wrap(&self, tcp: TcpStream, addr: SocketAddr) -> Wrapped;
}

/// What a connection knows of its cluster's limits, and its own use.
#[derive(Debug)]
struct ConnInfo {
    created: Instant,
    requests: AtomicU32,
    /// When the last request started, in milliseconds after `created` (HTTP/2's idle clock).
    last_used_ms: std::sync::atomic::AtomicU64,
    idle_timeout: Option<Duration>,
    max_duration: Option<Duration>,
    max_requests: Option<u32>,
    stats: Arc<ClusterStats>,
    /// The connection's local address (`%UPSTREAM_LOCAL_ADDRESS%`).
    local: Option<SocketAddr>,
}

/// Response extension: the local address of the upstream connection that carried it.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamLocal(pub SocketAddr);

impl ConnInfo {
    /// Why the connection must not take another request now, counted; `None`: it may.
    fn expired(&self, idle_since: Option<Instant>, now: Instant) -> bool {
        if self
            .max_duration
            .is_some_and(|d| now.duration_since(self.created) >= d)
        {
            self.stats.upstream_cx_max_duration_reached.inc();
            return true;
        }
        if let (Some(t), Some(since)) = (self.idle_timeout, idle_since)
            && now.duration_since(since) >= t
        {
            self.stats.upstream_cx_idle_timeout.inc();
            return true;
        }
        false
    }

    /// When the last request started.
    fn last_used(&self) -> Instant {
        self.created + Duration::from_millis(self.last_used_ms.load(Ordering::Relaxed))
    }

    /// A request starts now (HTTP/2's idle clock; HTTP/1.1's runs from when the connection
    /// went idle).
    fn mark_used(&self) {
        let ms = self.created.elapsed().as_millis() as u64;
        self.last_used_ms.store(ms, Ordering::Relaxed);
    }

    /// Count one more request; `true` when it is the connection's last.
    fn take_request(&self) -> bool {
        let n = self.requests.fetch_add(1, Ordering::AcqRel) + 1;
        let last = self.max_requests.is_some_and(|m| n >= m);
        if last {
            self.stats.upstream_cx_max_requests.inc();
        }
        last
    }
}

/// The future that runs one HTTP/1.1 connection's protocol (hyper's dispatcher).
type H1Driver = http1::Connection<TokioIo<Box<dyn Stream>>, Body>;

/// An HTTP/1.1 connection with no task of its own: whoever holds it polls `driver`.
struct H1 {
    tx: http1::SendRequest<Body>,
    driver: H1Driver,
    info: Arc<ConnInfo>,
    /// Its count on the endpoint and its `max_connections` slot, released when it is dropped.
    _release: Release,
}

impl H1 {
    /// Drive the connection; `true` once it has ended (closed by the upstream, failed, or
    /// done), after which it must be dropped: that also fails whatever was queued on it.
    fn poll_ended(&mut self, cx: &mut Context<'_>) -> bool {
        match Pin::new(&mut self.driver).poll(cx) {
            Poll::Pending => false,
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(e)) => {
                debug!(error = %e, "upstream http/1.1 connection ended with error");
                true
            }
        }
    }

    /// Whether an idle connection is still usable: nobody polled it while it sat in the pool,
    /// so a close by the upstream shows only when it is polled once (without a waker: an idle
    /// connection needs none, its next holder polls it again).
    fn alive(&mut self) -> bool {
        !self.poll_ended(&mut Context::from_waker(Waker::noop())) && !self.tx.is_closed()
    }
}

/// An idle HTTP/1.1 connection and since when it is idle (kept only when the cluster has an
/// `idle_timeout`: reading the clock for nothing costs on every request).
type Idle = (Box<H1>, Option<Instant>);

/// One endpoint's connections.
#[derive(Default)]
struct Slot {
    /// Idle HTTP/1.1 connections.
    idle: Vec<Idle>,
    /// The HTTP/2 connection.
    h2: Option<(http2::SendRequest<Body>, Arc<ConnInfo>)>,
    /// Connections open to the endpoint (idle, busy or connecting).
    live: Arc<AtomicUsize>,
}

/// What the pool and the response bodies holding its connections share.
struct Shared {
    slots: Mutex<HashMap<Key, Slot>>,
    /// Woken when a connection comes back or closes (a slot may be free).
    freed: Arc<Notify>,
    /// Requests in the pending loop of `checkout`: a connection coming back wakes `freed`
    /// only when someone waits (waking takes the `Notify`'s lock on every request otherwise).
    pending: AtomicUsize,
}

/// Connections to upstream endpoints, shared by every listener of one data plane.
pub struct Pool {
    shared: Arc<Shared>,
    sweeper: AtomicBool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.shared.slots.lock().map(|s| s.len()).unwrap_or(0);
        f.debug_struct("Pool").field("endpoints", &n).finish()
    }
}

impl Default for Pool {
    fn default() -> Self {
        Pool::new()
    }
}

/// A connection ready for one request.
enum Conn {
    /// HTTP/1.1, held by this request alone.
    Http1(Box<H1>),
    /// HTTP/2, shared.
    Http2(http2::SendRequest<Body>, Arc<ConnInfo>),
}

impl Conn {
    fn info(&self) -> &ConnInfo {
        match self {
            Conn::Http1(h) => &h.info,
            Conn::Http2(_, info) => info,
        }
    }
}

/// The cluster a request goes to, as the pool needs it.
#[derive(Clone, Copy)]
pub struct Target<'a> {
    /// The cluster entry (breakers, limits, stats, connect timeout).
    pub entry: &'a ClusterEntry,
    /// The route's priority (which thresholds apply).
    pub priority: RoutingPriority,
    /// SO_MARK for new sockets.
    pub mark: Option<u32>,
    /// How new connections are set up after the TCP connect (`None`: plaintext).
    pub transport: Option<&'a dyn Transport>,
    /// Tag the response with the connection's [`UpstreamLocal`] address (an access log
    /// asks for it; otherwise the response carries no extension to allocate).
    pub upstream_local: bool,
}

impl Target<'_> {
    fn take(&self, r: Resource, quiet: bool) -> Result<BreakerGuard, Overflow> {
        let b = &self.entry.lb.shared.breakers;
        let cfg = &self.entry.cluster.lb.circuit_breakers;
        if quiet {
            b.try_take_quiet(cfg, self.priority, r, &self.entry.stats)
        } else {
            b.try_take(cfg, self.priority, r, &self.entry.stats)
        }
    }

    fn info(&self, local: Option<SocketAddr>) -> Arc<ConnInfo> {
        let u = &self.entry.cluster.upstream_http;
        Arc::new(ConnInfo {
            created: Instant::now(),
            requests: AtomicU32::new(0),
            last_used_ms: std::sync::atomic::AtomicU64::new(0),
            idle_timeout: u.idle_timeout,
            max_duration: u.max_connection_duration,
            max_requests: u.max_requests_per_connection,
            stats: self.entry.stats.clone(),
            local,
        })
    }
}

/// Why a request got no response head.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The connect failed (refused, unreachable, timed out, no socket).
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The transport (TLS) handshake on a fresh connection failed: a connect failure (`UF`).
    #[error("upstream transport handshake with {addr} failed: {source}")]
    Transport {
        /// Endpoint.
        addr: SocketAddr,
        /// Cause (the transport's error: downcast it for details).
        source: BoxError,
    },
    /// The HTTP handshake on a fresh connection failed.
    #[error("upstream handshake with {addr} failed: {source}")]
    Handshake {
        /// Endpoint.
        addr: SocketAddr,
        /// Cause.
        source: hyper::Error,
    },
    /// `max_pending_requests` reached: the request waited for no connection.
    #[error(transparent)]
    Overflow(Overflow),
    /// The connection or stream was reset before the response head.
    #[error("upstream {addr} reset before response headers: {source}")]
    Reset {
        /// Endpoint.
        addr: SocketAddr,
        /// Cause.
        source: hyper::Error,
        /// An HTTP/2 REFUSED_STREAM (the request was not processed).
        refused_stream: bool,
    },
}

/// One request's outcome at the connection level, with whether a new connection was opened.
pub struct Sent {
    /// Response head (and streaming body) or the failure.
    pub result: Result<Response<UpstreamBody>, SendError>,
    /// A new upstream connection was opened for it (`upstream_cx_total`).
    pub new_connection: bool,
}

/// An HTTP/1.1 connection lent to one response body, and where it goes back.
struct Lease {
    h1: Box<H1>,
    key: Key,
    pool: Arc<Shared>,
    /// `false` after the connection's last request (`max_requests_per_connection`).
    reuse: bool,
}

impl Lease {
    /// The response has been read whole: the connection goes back to the pool once it is
    /// ready for another request (its driver may need one more poll to get there). One that
    /// is not (the request body still uploading after an early response) finishes on a task
    /// of its own, as every connection did before, and comes back from there.
    fn finish(mut self) {
        if !self.reuse {
            return;
        }
        if !self.h1.tx.is_ready() && self.h1.poll_ended(&mut Context::from_waker(Waker::noop())) {
            return;
        }
        if self.h1.tx.is_ready() {
            put_back(&self.pool, self.key, self.h1);
            return;
        }
        // Outside a runtime (shutting down) there is nothing to finish it on.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let ready = std::future::poll_fn(|cx| {
                if self.h1.poll_ended(cx) {
                    Poll::Ready(false)
                } else if self.h1.tx.is_ready() {
                    Poll::Ready(true)
                } else {
                    Poll::Pending
                }
            })
            .await;
            if ready {
                put_back(&self.pool, self.key, self.h1);
            }
        });
    }
}

/// A response body from the pool. Over HTTP/1.1 it carries the connection it arrives on:
/// polling the body drives the connection (in the task that sends the body downstream), and
/// the connection goes back to the pool when the body has ended, or closes if the body is
/// dropped before its end.
pub struct UpstreamBody {
    body: Incoming,
    /// Only ever touched through `&mut self`, so the body is `Sync` as boxed bodies must be
    /// (a connection's stream is `Send` only).
    lease: SyncWrapper<Option<Lease>>,
}

impl UpstreamBody {
    fn new(body: Incoming, lease: Option<Lease>) -> UpstreamBody {
        UpstreamBody {
            body,
            lease: SyncWrapper::new(lease),
        }
    }

    /// The body has ended: hand the connection back.
    fn ended(&mut self) {
        if let Some(l) = self.lease.get_mut().take() {
            l.finish();
        }
    }

    /// Frames already received, without waiting: enough to see the end of a small body that
    /// is dropped unread (a response given up for a retry), so its connection is kept.
    const DRAIN_FRAMES: usize = 4;
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = if this.lease.get_mut().is_some() {
            // While the connection is lent here only its driver fills the body, and only when
            // polled from here: no waker is needed for the body (one would wake this task
            // again for every frame). What is already received is taken without driving the
            // connection (a small body usually came with its head); otherwise the driver
            // runs (registering this task with the socket) and the body is looked at again.
            let mut quiet = Context::from_waker(Waker::noop());
            match Pin::new(&mut this.body).poll_frame(&mut quiet) {
                Poll::Pending => {
                    if let Some(l) = this.lease.get_mut()
                        && l.h1.poll_ended(cx)
                    {
                        // Whatever it had read is in the body's channel, then its end or
                        // error: the body no longer needs a driver to finish.
                        *this.lease.get_mut() = None;
                        Pin::new(&mut this.body).poll_frame(cx)
                    } else {
                        Pin::new(&mut this.body).poll_frame(&mut quiet)
                    }
                }
                ready => ready,
            }
        } else {
            Pin::new(&mut this.body).poll_frame(cx)
        };
        match &frame {
            // The connection broke mid-body: it closes.
            Poll::Ready(Some(Err(_))) => *this.lease.get_mut() = None,
            Poll::Ready(None) => this.ended(),
            _ if this.body.is_end_stream() => this.ended(),
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if self.lease.get_mut().is_none() {
            return;
        }
        if !self.body.is_end_stream() {
            let mut cx = Context::from_waker(Waker::noop());
            for _ in 0..Self::DRAIN_FRAMES {
                match Pin::new(&mut *self).poll_frame(&mut cx) {
                    Poll::Ready(Some(Ok(_))) if self.lease.get_mut().is_some() => continue,
                    _ => break,
                }
            }
        }
        if self.body.is_end_stream() {
            self.ended();
        }
        // Otherwise the lease drops here: the connection closes mid-response.
    }
}

/// Keep an HTTP/1.1 connection, ready for another request, for later requests.
fn put_back(shared: &Shared, key: Key, h1: Box<H1>) {
    let since = h1.info.idle_timeout.map(|_| Instant::now());
    if let Ok(mut slots) = shared.slots.lock() {
        let slot = slots.entry(key).or_default();
        if slot.idle.len() < MAX_IDLE_PER_ENDPOINT {
            slot.idle.push((h1, since));
        }
    }
    // A waiter counts itself before it looks for an idle connection under the same lock,
    // so either it finds this one or it is counted here.
    if shared.pending.load(Ordering::SeqCst) > 0 {
        shared.freed.notify_waiters();
    }
}

/// Send `req` on `h1`, driving the connection in this task until the response head arrives.
/// Hands back the connection unless it ended on the way.
async fn exchange(
    h1: Box<H1>,
    req: Request<Body>,
) -> (
    Result<Response<Incoming>, TrySendError<Request<Body>>>,
    Option<Box<H1>>,
) {
    let mut h1 = h1;
    let mut response = std::pin::pin!(h1.tx.try_send_request(req));
    let mut h1 = Some(h1);
    let result = std::future::poll_fn(|cx| {
        if let Some(h) = h1.as_mut()
            && h.poll_ended(cx)
        {
            // Dropping the driver fails a request it had not taken yet, with the request
            // given back (the keep-alive race, sent again on a fresh connection).
            h1 = None;
        }
        // Only the driver completes the response future, and only while polled here: no
        // waker is needed (one would wake this task again for nothing).
        response
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
    })
    .await;
    (result, h1)
}

/// Whether an HTTP/2 upstream refused the stream (it was not processed, so any request may be
/// retried under `refused-stream`): walk the causes down to the h2 error.
fn refused(e: &hyper::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            return h2e.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        src = s.source();
    }
    false
}

impl Pool {
    /// An empty pool.
    pub fn new() -> Pool {
        Pool {
            shared: Arc::new(Shared {
                slots: Mutex::new(HashMap::new()),
                freed: Arc::new(Notify::new()),
                pending: AtomicUsize::new(0),
            }),
            sweeper: AtomicBool::new(false),
        }
    }

    /// A ready connection to `key` that may take another request, or `None`.
    fn take_idle(&self, key: Key) -> Option<Conn> {
        loop {
            let mut h1 = {
                let mut slots = self.shared.slots.lock().ok()?;
                let slot = slots.get_mut(&key)?;
                match key.proto {
                    Proto::Http1 => Self::idle_h1(slot)?,
                    Proto::Http2 => return Self::shared_h2(slot),
                    // An endpoint's auto connections all negotiate alike; whichever kind is
                    // there.
                    Proto::Auto => match Self::shared_h2(slot) {
                        Some(c) => return Some(c),
                        None => Self::idle_h1(slot)?,
                    },
                }
            };
            // Polled outside the lock; a closed one is dropped (its slot released) and the
            // next is tried.
            if h1.alive() {
                return Some(Conn::Http1(h1));
            }
        }
    }

    /// The newest idle HTTP/1.1 connection that may take a request: the one most recently
    /// used is the likeliest to be warm. Closed or expired ones met on the way are dropped;
    /// the sweeper takes the rest, so a request does not walk every idle connection.
    fn idle_h1(slot: &mut Slot) -> Option<Box<H1>> {
        let mut now = None;
        while let Some((h1, since)) = slot.idle.pop() {
            let limited = h1.info.max_duration.is_some() || since.is_some();
            let expired = limited
                && h1
                    .info
                    .expired(since, *now.get_or_insert_with(Instant::now));
            if !expired && !h1.tx.is_closed() && h1.tx.is_ready() {
                return Some(h1);
            }
        }
        None
    }

    /// The endpoint's HTTP/2 connection, if it may take another stream.
    fn shared_h2(slot: &mut Slot) -> Option<Conn> {
        let usable = slot.h2.as_ref().is_some_and(|(s, info)| {
            !s.is_closed() && !info.expired(Some(info.last_used()), Instant::now())
        });
        if !usable {
            slot.h2 = None;
            return None;
        }
        slot.h2
            .as_ref()
            .map(|(s, info)| Conn::Http2(s.clone(), info.clone()))
    }

    /// Connections open to `key`.
    fn live(&self, key: Key) -> usize {
        self.shared
            .slots
            .lock()
            .ok()
            .and_then(|s| s.get(&key).map(|s| s.live.load(Ordering::Acquire)))
            .unwrap_or(0)
    }

    /// Close idle connections past their limits or closed by their upstream; forget
    /// endpoints without connections.
    fn sweep(shared: &Shared) {
        let Ok(mut slots) = shared.slots.lock() else {
            return;
        };
        let now = Instant::now();
        slots.retain(|_, slot| {
            slot.idle
                .retain_mut(|(h1, since)| h1.alive() && !h1.info.expired(*since, now));
            // HTTP/2's idle clock runs from the last request started; streams still open on a
            // connection dropped here finish on it (hyper keeps it until they end).
            if slot
                .h2
                .as_ref()
                .is_some_and(|(s, info)| s.is_closed() || info.expired(Some(info.last_used()), now))
            {
                slot.h2 = None;
            }
            !slot.idle.is_empty() || slot.h2.is_some() || slot.live.load(Ordering::Acquire) > 0
        });
    }

    /// Start the sweeper once: it holds the pool weakly and ends with it.
    fn start_sweeper(&self) {
        // A plain load first: the swap would write the shared line on every request.
        if self.sweeper.load(Ordering::Relaxed) || self.sweeper.swap(true, Ordering::AcqRel) {
            return;
        }
        let shared: Weak<Shared> = Arc::downgrade(&self.shared);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SWEEP_EVERY).await;
                let Some(s) = shared.upgrade() else {
                    return;
                };
                Pool::sweep(&s);
            }
        });
    }

    /// Open a connection to `key`, holding `slot` (its `max_connections` unit, if any) until
    /// it closes.
    async fn open(
        &self,
        key: Key,
        target: &Target<'_>,
        slot: Option<BreakerGuard>,
    ) -> Result<Conn, SendError> {
        let live = {
            let mut slots = self.shared.slots.lock().map_err(|_| poisoned(key.addr))?;
            slots.entry(key).or_default().live.clone()
        };
        live.fetch_add(1, Ordering::AcqRel);
        // Released when the connection ends (or fails to open).
        let release = Release {
            live,
            freed: self.shared.freed.clone(),
            _slot: slot,
        };
        let connect_timeout = target.entry.cluster.connect_timeout;
        let tcp = target
            .entry
            .stats
            .upstream_cx_connect_ms
            .time_ok(connect::connect(
                EndpointAddr(key.addr),
                target.mark,
                connect_timeout,
            ))
            .await?;
        let local = tcp.local_addr().ok();
        let (stream, alpn): (Box<dyn Stream>, _) = match target.transport {
            None => (Box::new(tcp), None),
            Some(t) => {
                let done = t
                    .wrap(tcp, key.addr)
                    .await
                    .map_err(|source| SendError::Transport {
                        addr: key.addr,
                        source,
                    })?;
                (done.stream, done.alpn)
            }
        };
        // auto_config: the handshake decided (Envoy's mixed pool: `h2` is HTTP/2, anything
        // else, or no ALPN, HTTP/1.1).
        let proto = match key.proto {
            Proto::Auto if alpn.as_deref() == Some(b"h2") => Proto::Http2,
            Proto::Auto => Proto::Http1,
            p => p,
        };
        let io = TokioIo::new(stream);
        let handshake = |source| SendError::Handshake {
            addr: key.addr,
            source,
        };
        let info = target.info(local);
        match proto {
            Proto::Http1 | Proto::Auto => {
                // hyper's read buffer cannot go below 8 KiB.
                let (tx, driver) = http1::Builder::new()
                    .max_buf_size(info_buffer(target))
                    .handshake(io)
                    .await
                    .map_err(handshake)?;
                // No task: the requests that hold it drive it.
                Ok(Conn::Http1(Box::new(H1 {
                    tx,
                    driver,
                    info,
                    _release: release,
                })))
            }
            Proto::Http2 => {
                let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(io)
                    .await
                    .map_err(handshake)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(error = %e, "upstream h2 connection ended with error");
                    }
                    drop(release);
                });
                if let Ok(mut slots) = self.shared.slots.lock() {
                    slots.entry(key).or_default().h2 = Some((tx.clone(), info.clone()));
                }
                Ok(Conn::Http2(tx, info))
            }
        }
    }

    /// A connection for one request to `key`: a ready one, else (as a pending request) a new
    /// one when the cluster's connection limit allows, else one that comes back.
    async fn checkout(
        &self,
        key: Key,
        target: &Target<'_>,
        fresh: bool,
    ) -> Result<(Conn, bool), SendError> {
        if !fresh && let Some(c) = self.take_idle(key) {
            return Ok((c, false));
        }
        // Pending from here until a connection is ours.
        let _pending = target
            .take(Resource::PendingRequests, false)
            .map_err(SendError::Overflow)?;
        self.shared.pending.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.shared.pending);
        let mut counted = false;
        loop {
            let waiting = self.shared.freed.notified();
            if !fresh && let Some(c) = self.take_idle(key) {
                return Ok((c, false));
            }
            match target.take(Resource::Connections, counted) {
                // Boxed: opening (connect, TLS, handshake) is the rare path, and its state
                // would otherwise sit in every request's future.
                Ok(slot) => {
                    let c = Box::pin(self.open(key, target, Some(slot))).await?;
                    return Ok((c, true));
                }
                // Envoy's rule: an endpoint without any connection gets one anyway.
                Err(_) if self.live(key) == 0 => {
                    let c = Box::pin(self.open(key, target, None)).await?;
                    return Ok((c, true));
                }
                Err(_) => {
                    counted = true;
                    let _ = tokio::time::timeout(RECHECK, waiting).await;
                }
            }
        }
    }

    /// Send `req` to `addr` of `target`'s cluster, reusing a kept-alive connection when one is
    /// ready. A request that a reused connection closed before sending it is sent again on a
    /// fresh connection (the usual keep-alive race; nothing reached the upstream).
    pub async fn send(
        &self,
        addr: SocketAddr,
        proto: Proto,
        target: Target<'_>,
        req: Request<Body>,
    ) -> Sent {
        self.start_sweeper();
        let key = Key {
            addr,
            proto,
            transport: target.transport.map(|t| t.key()),
        };
        let mut req = req;
        let mut new_connection = false;
        // At most one reused attempt, then one on a fresh connection.
        for fresh in [false, true] {
            let (conn, opened) = match self.checkout(key, &target, fresh).await {
                Ok(c) => c,
                Err(e) => {
                    return Sent {
                        result: Err(e),
                        new_connection,
                    };
                }
            };
            new_connection |= opened;
            if key.proto == Proto::Auto {
                req = fit(req, matches!(conn, Conn::Http2(..)));
            }
            let last = conn.info().take_request();
            let local = conn.info().local.filter(|_| target.upstream_local);
            let result = match conn {
                Conn::Http1(h1) => {
                    let (result, h1) = exchange(h1, req).await;
                    result.map(|resp| {
                        let lease = h1.map(|h1| Lease {
                            h1,
                            key,
                            pool: self.shared.clone(),
                            reuse: !last,
                        });
                        resp.map(|b| UpstreamBody::new(b, lease))
                    })
                }
                Conn::Http2(mut tx, info) => {
                    info.mark_used();
                    if last
                        && let Ok(mut slots) = self.shared.slots.lock()
                        && let Some(slot) = slots.get_mut(&key)
                    {
                        // No new stream after this one; it closes once its streams end.
                        slot.h2 = None;
                    }
                    if tx.ready().await.is_err() {
                        continue;
                    }
                    tx.try_send_request(req)
                        .await
                        .map(|resp| resp.map(|b| UpstreamBody::new(b, None)))
                }
            };
            match result {
                Ok(mut resp) => {
                    if let Some(l) = local {
                        resp.extensions_mut().insert(UpstreamLocal(l));
                    }
                    return Sent {
                        result: Ok(resp),
                        new_connection,
                    };
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if !fresh => {
                        debug!(%addr, "kept-alive connection closed before the request; reconnecting");
                        req = r;
                        continue;
                    }
                    _ => {
                        let source = TrySendError::into_error(e);
                        let refused_stream = refused(&source);
                        return Sent {
                            result: Err(SendError::Reset {
                                addr,
                                source,
                                refused_stream,
                            }),
                            new_connection,
                        };
                    }
                },
            }
        }
        // Only reachable when a fresh HTTP/2 connection was not ready, which hyper reports as
        // closed.
        Sent {
            result: Err(SendError::Connect(ConnectError::Failed {
                addr: EndpointAddr(addr),
                source: std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "connection closed before it was ready",
                ),
            })),
            new_connection,
        }
    }
}

/// An auto_config request (built as HTTP/1.1: origin-form path and `Host`) fitted to the
/// connection it got: HTTP/2 takes the authority into the URI (`:authority`) instead of
/// `Host`; a request fitted before (a retry on another connection) goes back the other way.
fn fit(mut req: Request<Body>, h2: bool) -> Request<Body> {
    use hyper::header::HOST;
    use hyper::{Uri, Version};
    if h2 && req.version() != Version::HTTP_2 {
        let host = req.headers_mut().remove(HOST);
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        if let Some(h) = host.as_ref().and_then(|h| h.to_str().ok())
            && let Ok(uri) = format!("http://{h}{path}").parse::<Uri>()
        {
            *req.uri_mut() = uri;
        }
        *req.version_mut() = Version::HTTP_2;
    } else if !h2 && req.version() == Version::HTTP_2 {
        if let Some(a) = req.uri().authority()
            && let Ok(v) = hyper::header::HeaderValue::from_str(a.as_str())
        {
            req.headers_mut().insert(HOST, v);
        }
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        if let Ok(uri) = path.parse::<Uri>() {
            *req.uri_mut() = uri;
        }
        *req.version_mut() = Version::HTTP_11;
    }
    req
}

/// One request in `checkout`'s pending loop, uncounted when it leaves however it leaves.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Held by a connection for its life: its count on the endpoint and its cluster slot.
struct Release {
    live: Arc<AtomicUsize>,
    freed: Arc<Notify>,
    _slot: Option<BreakerGuard>,
}

impl Drop for Release {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
        self.freed.notify_waiters();
    }
}

/// The cluster's `per_connection_buffer_limit_bytes` as hyper's HTTP/1 read buffer limit.
fn info_buffer(target: &Target<'_>) -> usize {
    (target.entry.cluster.upstream_http.buffer_limit as usize).max(8192)
}

fn poisoned(addr: SocketAddr) -> SendError {
    SendError::Connect(ConnectError::Failed {
        addr: EndpointAddr(addr),
        source: std::io::Error::other("connection pool lock poisoned"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::HostRegistry;
    use crate::model::Cluster;
    use crate::stats::Stats;
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    use std::convert::Infallible;

    /// A backend answering `ok` over HTTP/1.1 or h2c; counts the connections it accepted.
    async fn backend(h2: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
                    });
                    let io = TokioIo::new(s);
                    let _ = if h2 {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await
                    } else {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await
                    };
                });
            }
        });
        (addr, accepted)
    }

    fn entry(options: &str, stats: &Arc<Stats>) -> ClusterEntry {
        let text = format!(
            "name: c\ntype: STATIC\nload_assignment: {{ cluster_name: c }}\ntyped_extension_protocol_options:\n  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n    \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n    explicit_http_config: {{ http_protocol_options: {{}} }}\n    common_http_protocol_options: {options}\n"
        );
        let v = skiff_proto::parse_text(&text).expect("yaml");
        let pb: envoy_types::pb::envoy::config::cluster::v3::Cluster =
            skiff_proto::decode_json(&v).expect("cluster proto");
        let c = Cluster::try_from(&pb).expect("cluster");
        ClusterEntry::new(c, None, &HostRegistry::new(stats.clone()))
    }

    async fn get(pool: &Pool, addr: SocketAddr, proto: Proto, e: &ClusterEntry) -> bool {
        get_via(pool, addr, proto, e, None).await
    }

    async fn get_via(
        pool: &Pool,
        addr: SocketAddr,
        proto: Proto,
        e: &ClusterEntry,
        transport: Option<&dyn Transport>,
    ) -> bool {
        let req = Request::get(match proto {
            Proto::Http1 | Proto::Auto => "/".to_string(),
            Proto::Http2 => format!("http://{addr}/"),
        })
        .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
        .unwrap();
        let target = Target {
            entry: e,
            priority: RoutingPriority::Default,
            mark: None,
            transport,
            upstream_local: true,
        };
        let sent = pool.send(addr, proto, target, req).await;
        match sent.result {
            Ok(r) => r.into_body().collect().await.is_ok(),
            Err(_) => false,
        }
    }

    /// A transport that wraps nothing (the stream stays plaintext) but counts its uses, so
    /// the pool's keying can be watched without a TLS server.
    struct Counting {
        key: u64,
        wrapped: Arc<AtomicUsize>,
    }

    impl Transport for Counting {
        fn key(&self) -> u64 {
            self.key
        }
        fn wrap(&self, tcp: TcpStream, _addr: SocketAddr) -> Wrapped {
            self.wrapped.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                Ok(Transported {
                    stream: Box::new(tcp),
                    alpn: None,
                })
            })
        }
    }

    #[tokio::test]
    async fn connections_of_different_transports_never_stand_in_for_each_other() {
        let stats = Arc::new(Stats::default());
        let e = entry("{}", &stats);
        let (addr, accepted) = backend(false).await;
        let pool = Pool::new();
        let wrapped = Arc::new(AtomicUsize::new(0));
        let a = Counting {
            key: 1,
            wrapped: wrapped.clone(),
        };
        let b = Counting {
            key: 2,
            wrapped: wrapped.clone(),
        };
        // Plaintext, then transport a, then b: three connections, each reused by its own.
        for _ in 0..2 {
            assert!(get_via(&pool, addr, Proto::Http1, &e, None).await);
            assert!(get_via(&pool, addr, Proto::Http1, &e, Some(&a)).await);
            assert!(get_via(&pool, addr, Proto::Http1, &e, Some(&b)).await);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        assert_eq!(
            wrapped.load(Ordering::SeqCst),
            2,
            "each transport wrapped once"
        );
    }

    #[tokio::test]
    async fn a_failed_transport_is_a_transport_error_and_leaves_nothing_pooled() {
        struct Refusing;
        impl Transport for Refusing {
            fn key(&self) -> u64 {
                9
            }
            fn wrap(&self, _tcp: TcpStream, _addr: SocketAddr) -> Wrapped {
                Box::pin(async { Err("handshake refused".into()) })
            }
        }
        let stats = Arc::new(Stats::default());
        let e = entry("{}", &stats);
        let (addr, _accepted) = backend(false).await;
        let pool = Pool::new();
        let req = Request::get("/")
            .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
            .unwrap();
        let target = Target {
            entry: &e,
            priority: RoutingPriority::Default,
            mark: None,
            transport: Some(&Refusing),
            upstream_local: false,
        };
        let sent = pool.send(addr, Proto::Http1, target, req).await;
        assert!(
            matches!(sent.result, Err(SendError::Transport { .. })),
            "{:?}",
            sent.result.err()
        );
        assert_eq!(
            pool.live(Key {
                addr,
                proto: Proto::Http1,
                transport: Some(9)
            }),
            0
        );
    }

    #[test]
    fn auto_requests_are_fitted_to_their_connection() {
        let req = Request::get("/p?q=1")
            .header("host", "svc:8080")
            .header("x-a", "1")
            .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
            .unwrap();
        let h2 = fit(req, true);
        assert_eq!(h2.version(), hyper::Version::HTTP_2);
        assert_eq!(h2.uri().to_string(), "http://svc:8080/p?q=1");
        assert!(
            !h2.headers().contains_key("host"),
            "the authority carries it"
        );
        assert_eq!(h2.headers()["x-a"], "1");
        // A retry that lands on an HTTP/1.1 connection goes back.
        let h1 = fit(h2, false);
        assert_eq!(h1.version(), hyper::Version::HTTP_11);
        assert_eq!(h1.uri().to_string(), "/p?q=1");
        assert_eq!(h1.headers()["host"], "svc:8080");
        // Fitting to what it already is changes nothing.
        let same = fit(h1, false);
        assert_eq!(same.uri().to_string(), "/p?q=1");
    }

    #[tokio::test]
    async fn a_connection_past_its_max_duration_is_not_reused() {
        let stats = Arc::new(Stats::default());
        let e = entry("{ max_connection_duration: 0.2s }", &stats);
        let (addr, accepted) = backend(false).await;
        let pool = Pool::new();
        assert!(get(&pool, addr, Proto::Http1, &e).await);
        assert!(get(&pool, addr, Proto::Http1, &e).await);
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "reused while young");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(get(&pool, addr, Proto::Http1, &e).await);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(
            stats
                .counter("cluster.c.upstream_cx_max_duration_reached")
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn an_h2_connection_takes_no_stream_past_max_requests() {
        let stats = Arc::new(Stats::default());
        let e = entry("{ max_requests_per_connection: 2 }", &stats);
        let (addr, accepted) = backend(true).await;
        let pool = Pool::new();
        for _ in 0..3 {
            assert!(get(&pool, addr, Proto::Http2, &e).await);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(stats.counter("cluster.c.upstream_cx_max_requests").get(), 1);
    }

    #[tokio::test]
    async fn an_idle_h2_connection_is_closed_after_the_idle_timeout() {
        let stats = Arc::new(Stats::default());
        let e = entry("{ idle_timeout: 0.2s }", &stats);
        let (addr, accepted) = backend(true).await;
        let pool = Pool::new();
        assert!(get(&pool, addr, Proto::Http2, &e).await);
        // The sweeper (every 500 ms) drops it once idle for 200 ms.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(stats.counter("cluster.c.upstream_cx_idle_timeout").get(), 1);
        assert!(get(&pool, addr, Proto::Http2, &e).await);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// Idle HTTP/1.1 connections pooled for `addr` (plaintext).
    fn idle(pool: &Pool, addr: SocketAddr) -> usize {
        let key = Key {
            addr,
            proto: Proto::Http1,
            transport: None,
        };
        let slots = pool.shared.slots.lock().unwrap();
        slots.get(&key).map_or(0, |s| s.idle.len())
    }

    fn h1_key(addr: SocketAddr) -> Key {
        Key {
            addr,
            proto: Proto::Http1,
            transport: None,
        }
    }

    /// A backend answering every request with `len` bytes; counts the connections it accepted.
    async fn sized_backend(len: usize) -> (SocketAddr, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| async move {
                        let body = Bytes::from(vec![b'x'; len]);
                        Ok::<_, Infallible>(Response::new(Full::new(body)))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    async fn send_h1(pool: &Pool, addr: SocketAddr, e: &ClusterEntry) -> Sent {
        let req = Request::get("/")
            .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
            .unwrap();
        let target = Target {
            entry: e,
            priority: RoutingPriority::Default,
            mark: None,
            transport: None,
            upstream_local: false,
        };
        pool.send(addr, Proto::Http1, target, req).await
    }

    #[tokio::test]
    async fn an_http1_connection_goes_back_once_its_body_has_ended() {
        let stats = Arc::new(Stats::default());
        let e = entry("{}", &stats);
        // Larger than one read: the body streams, driven through `UpstreamBody`.
        let (addr, accepted) = sized_backend(1 << 20).await;
        let pool = Pool::new();
        for _ in 0..3 {
            let resp = send_h1(&pool, addr, &e).await.result.expect("response");
            assert_eq!(idle(&pool, addr), 0, "lent to the body while it is read");
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(body.len(), 1 << 20);
            assert_eq!(idle(&pool, addr), 1, "back once the body ended");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.live(h1_key(addr)), 1);
    }

    #[tokio::test]
    async fn an_http1_connection_whose_body_is_dropped_early_is_closed() {
        let stats = Arc::new(Stats::default());
        let e = entry("{}", &stats);
        let (addr, accepted) = sized_backend(1 << 20).await;
        let pool = Pool::new();
        let resp = send_h1(&pool, addr, &e).await.result.expect("response");
        assert_eq!(pool.live(h1_key(addr)), 1);
        drop(resp);
        assert_eq!(idle(&pool, addr), 0, "not reused mid-response");
        assert_eq!(pool.live(h1_key(addr)), 0, "closed, its slot released");
        let resp = send_h1(&pool, addr, &e).await.result.expect("response");
        assert_eq!(
            resp.into_body().collect().await.unwrap().to_bytes().len(),
            1 << 20
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_small_body_dropped_unread_keeps_its_connection() {
        let stats = Arc::new(Stats::default());
        let e = entry("{}", &stats);
        let (addr, accepted) = sized_backend(16).await;
        let pool = Pool::new();
        for _ in 0..2 {
            // Already received whole with its head: dropping it unread loses nothing.
            drop(send_h1(&pool, addr, &e).await.result.expect("response"));
            assert_eq!(idle(&pool, addr), 1);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_idle_connection_the_upstream_closed_is_discarded_at_checkout() {
        // Answers one request with keep-alive, then closes the connection while it is idle.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = l.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = s.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        got.extend_from_slice(&buf[..n]);
                    }
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                });
            }
        });
        let stats = Arc::new(Stats::default());
        let e = entry("{}", &stats);
        let pool = Pool::new();
        let resp = send_h1(&pool, addr, &e).await.result.expect("response");
        assert_eq!(
            &resp.into_body().collect().await.unwrap().to_bytes()[..],
            b"ok"
        );
        assert_eq!(idle(&pool, addr), 1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            pool.take_idle(h1_key(addr)).is_none(),
            "the closed connection is not handed out"
        );
        assert_eq!(idle(&pool, addr), 0);
        assert_eq!(pool.live(h1_key(addr)), 0, "and its slot is released");
        let sent = send_h1(&pool, addr, &e).await;
        assert!(sent.new_connection);
        assert_eq!(
            &sent
                .result
                .unwrap()
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()[..],
            b"ok"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
