//! Upstream HTTP connections, kept alive and reused per endpoint, under the cluster's limits.
//!
//! HTTP/1.1: a list of idle connections per endpoint; a request takes one that is ready (its
//! previous response fully read) or opens a new one, and puts it back as soon as the response
//! head arrives (it becomes ready again once the body is done). HTTP/2: one multiplexed
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
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
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

    /// Count one more request, started at `now`; `true` when it is the connection's last.
    fn take_request(&self, now: Instant) -> bool {
        let ms = now.saturating_duration_since(self.created).as_millis() as u64;
        self.last_used_ms.store(ms, Ordering::Relaxed);
        let n = self.requests.fetch_add(1, Ordering::AcqRel) + 1;
        let last = self.max_requests.is_some_and(|m| n >= m);
        if last {
            self.stats.upstream_cx_max_requests.inc();
        }
        last
    }
}

/// One endpoint's connections.
#[derive(Default)]
struct Slot {
    /// Idle HTTP/1.1 connections and since when.
    idle: Vec<(http1::SendRequest<Body>, Instant, Arc<ConnInfo>)>,
    /// The HTTP/2 connection.
    h2: Option<(http2::SendRequest<Body>, Arc<ConnInfo>)>,
    /// Connections open to the endpoint (idle, busy or connecting).
    live: Arc<AtomicUsize>,
}

type Slots = Mutex<HashMap<Key, Slot>>;

/// Connections to upstream endpoints, shared by every listener of one data plane.
pub struct Pool {
    slots: Arc<Slots>,
    /// Woken when a connection comes back or closes (a slot may be free).
    freed: Arc<Notify>,
    /// Requests in the pending loop of `checkout`: a connection coming back wakes `freed`
    /// only when someone waits (waking takes the `Notify`'s lock on every request otherwise).
    pending: AtomicUsize,
    sweeper: AtomicBool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.slots.lock().map(|s| s.len()).unwrap_or(0);
        f.debug_struct("Pool").field("endpoints", &n).finish()
    }
}

impl Default for Pool {
    fn default() -> Self {
        Pool::new()
    }
}

/// A connection ready for one request.
pub enum Conn {
    /// HTTP/1.1.
    Http1(http1::SendRequest<Body>),
    /// HTTP/2.
    Http2(http2::SendRequest<Body>),
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
    /// When the attempt started: what checking out a kept connection compares its idle time
    /// with, and its last use, instead of two more clock reads per request.
    pub now: Instant,
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
    pub result: Result<Response<Incoming>, SendError>,
    /// A new upstream connection was opened for it (`upstream_cx_total`).
    pub new_connection: bool,
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
            slots: Arc::new(Mutex::new(HashMap::new())),
            freed: Arc::new(Notify::new()),
            pending: AtomicUsize::new(0),
            sweeper: AtomicBool::new(false),
        }
    }

    /// A ready connection to `key` that may take another request at `now`, or `None`.
    fn take_idle(&self, key: Key, now: Instant) -> Option<(Conn, Arc<ConnInfo>)> {
        let mut slots = self.slots.lock().ok()?;
        let slot = slots.get_mut(&key)?;
        // Newest first: the connection most recently used is the likeliest to be ready and
        // warm. Closed or expired ones met on the way are dropped; the sweeper takes the rest,
        // so a request does not walk every idle connection.
        let h1 = |slot: &mut Slot| {
            let mut i = slot.idle.len();
            while i > 0 {
                i -= 1;
                let (s, since, info) = &slot.idle[i];
                if s.is_closed() || info.expired(Some(*since), now) {
                    slot.idle.remove(i);
                    continue;
                }
                if s.is_ready() {
                    let (s, _, info) = slot.idle.remove(i);
                    return Some((Conn::Http1(s), info));
                }
            }
            None
        };
        let h2 = |slot: &mut Slot| {
            let usable = slot.h2.as_ref().is_some_and(|(s, info)| {
                !s.is_closed() && !info.expired(Some(info.last_used()), now)
            });
            if !usable {
                slot.h2 = None;
                return None;
            }
            slot.h2
                .as_ref()
                .map(|(s, info)| (Conn::Http2(s.clone()), info.clone()))
        };
        match key.proto {
            Proto::Http1 => h1(slot),
            Proto::Http2 => h2(slot),
            // An endpoint's auto connections all negotiate alike; whichever kind is there.
            Proto::Auto => h2(slot).or_else(|| h1(slot)),
        }
    }

    /// Connections open to `key`.
    fn live(&self, key: Key) -> usize {
        self.slots
            .lock()
            .ok()
            .and_then(|s| s.get(&key).map(|s| s.live.load(Ordering::Acquire)))
            .unwrap_or(0)
    }

    /// Keep an HTTP/1.1 connection for later requests (it becomes ready once its current
    /// response has been read).
    fn put_back(&self, key: Key, s: http1::SendRequest<Body>, info: Arc<ConnInfo>) {
        if s.is_closed() {
            return;
        }
        if let Ok(mut slots) = self.slots.lock() {
            let slot = slots.entry(key).or_default();
            if slot.idle.len() < MAX_IDLE_PER_ENDPOINT {
                slot.idle.push((s, Instant::now(), info));
            }
        }
        // A waiter counts itself before it looks for an idle connection under the same lock,
        // so either it finds this one or it is counted here.
        if self.pending.load(Ordering::SeqCst) > 0 {
            self.freed.notify_waiters();
        }
    }

    /// Close idle connections past their limits; forget endpoints without connections.
    fn sweep(slots: &Slots) {
        let Ok(mut slots) = slots.lock() else {
            return;
        };
        let now = Instant::now();
        slots.retain(|_, slot| {
            slot.idle
                .retain(|(s, since, info)| !s.is_closed() && !info.expired(Some(*since), now));
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
        let slots: Weak<Slots> = Arc::downgrade(&self.slots);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SWEEP_EVERY).await;
                let Some(s) = slots.upgrade() else {
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
    ) -> Result<(Conn, Arc<ConnInfo>), SendError> {
        let live = {
            let mut slots = self.slots.lock().map_err(|_| poisoned(key.addr))?;
            slots.entry(key).or_default().live.clone()
        };
        live.fetch_add(1, Ordering::AcqRel);
        // Released when the connection ends (or fails to open).
        let release = Release {
            live,
            freed: self.freed.clone(),
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
                let (tx, conn) = http1::Builder::new()
                    .max_buf_size(info_buffer(target))
                    .handshake(io)
                    .await
                    .map_err(handshake)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(error = %e, "upstream http/1.1 connection ended with error");
                    }
                    drop(release);
                });
                Ok((Conn::Http1(tx), info))
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
                if let Ok(mut slots) = self.slots.lock() {
                    slots.entry(key).or_default().h2 = Some((tx.clone(), info.clone()));
                }
                Ok((Conn::Http2(tx), info))
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
    ) -> Result<(Conn, Arc<ConnInfo>, bool), SendError> {
        if !fresh && let Some((c, info)) = self.take_idle(key, target.now) {
            return Ok((c, info, false));
        }
        // Pending from here until a connection is ours.
        let _pending = target
            .take(Resource::PendingRequests, false)
            .map_err(SendError::Overflow)?;
        self.pending.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.pending);
        let mut counted = false;
        loop {
            let waiting = self.freed.notified();
            // Possibly after a wait: the clock, not the attempt's start.
            if !fresh && let Some((c, info)) = self.take_idle(key, Instant::now()) {
                return Ok((c, info, false));
            }
            match target.take(Resource::Connections, counted) {
                // Boxed: opening (connect, TLS, handshake) is the rare path, and its state
                // would otherwise sit in every request's future.
                Ok(slot) => {
                    let (c, info) = Box::pin(self.open(key, target, Some(slot))).await?;
                    return Ok((c, info, true));
                }
                // Envoy's rule: an endpoint without any connection gets one anyway.
                Err(_) if self.live(key) == 0 => {
                    let (c, info) = Box::pin(self.open(key, target, None)).await?;
                    return Ok((c, info, true));
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
            let (conn, info, opened) = match self.checkout(key, &target, fresh).await {
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
                req = fit(req, matches!(conn, Conn::Http2(_)));
            }
            let last = info.take_request(target.now);
            let (result, back) = match conn {
                Conn::Http1(mut tx) => {
                    if tx.ready().await.is_err() {
                        continue;
                    }
                    let r = tx.try_send_request(req).await;
                    (r, Some(tx))
                }
                Conn::Http2(mut tx) => {
                    if last
                        && let Ok(mut slots) = self.slots.lock()
                        && let Some(slot) = slots.get_mut(&key)
                    {
                        // No new stream after this one; it closes once its streams end.
                        slot.h2 = None;
                    }
                    if tx.ready().await.is_err() {
                        continue;
                    }
                    (tx.try_send_request(req).await, None)
                }
            };
            match result {
                Ok(mut resp) => {
                    if target.upstream_local
                        && let Some(l) = info.local
                    {
                        resp.extensions_mut().insert(UpstreamLocal(l));
                    }
                    if let Some(tx) = back {
                        if last {
                            // Dropped: hyper closes it once this response is read.
                            drop(tx);
                        } else {
                            self.put_back(key, tx, info);
                        }
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
        // Both loops `continue`d: only reachable when a fresh connection was not ready, which
        // hyper reports as closed.
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
            now: Instant::now(),
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
            now: Instant::now(),
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
}
