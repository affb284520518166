//! Upstream HTTP connections, kept alive and reused per endpoint.
//!
//! HTTP/1.1: a list of idle connections per endpoint; a request takes one that is ready (its
//! previous response fully read) or opens a new one, and puts it back as soon as the response
//! head arrives (it becomes ready again once the body is done). HTTP/2: one multiplexed
//! connection per endpoint, replaced when it closes. Every socket is opened by
//! `net::connect` (the proxy's SO_MARK, the cluster's `connect_timeout`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;
use tracing::debug;

use super::Body;
use crate::addr::EndpointAddr;
use crate::net::{self as connect, ConnectError};

/// Idle HTTP/1.1 connections kept per endpoint; more are closed after their response.
const MAX_IDLE_PER_ENDPOINT: usize = 64;
/// An idle HTTP/1.1 connection unused for this long is closed (Envoy's upstream idle default is
/// 1 h; a shorter one frees sockets of endpoints that went away).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Sweep the whole pool for idle connections every this many checkouts.
const SWEEP_EVERY: usize = 1024;

/// Upstream protocol of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    /// HTTP/1.1 with keep-alive.
    Http1,
    /// HTTP/2 prior knowledge (h2c).
    Http2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    addr: SocketAddr,
    proto: Proto,
}

enum Slot {
    Http1(Vec<(http1::SendRequest<Body>, Instant)>),
    Http2(http2::SendRequest<Body>),
}

/// Connections to upstream endpoints, shared by every listener of one data plane.
pub struct Pool {
    slots: Mutex<HashMap<Key, Slot>>,
    checkouts: AtomicUsize,
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

/// Why a request got no response head.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The connect failed (refused, unreachable, timed out, no socket).
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The HTTP handshake on a fresh connection failed.
    #[error("upstream handshake with {addr} failed: {source}")]
    Handshake {
        /// Endpoint.
        addr: SocketAddr,
        /// Cause.
        source: hyper::Error,
    },
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
            slots: Mutex::new(HashMap::new()),
            checkouts: AtomicUsize::new(0),
        }
    }

    fn take_idle(&self, key: Key) -> Option<Conn> {
        let mut slots = self.slots.lock().ok()?;
        match slots.get_mut(&key)? {
            Slot::Http1(list) => {
                list.retain(|(s, _)| !s.is_closed());
                let i = list.iter().position(|(s, _)| s.is_ready())?;
                Some(Conn::Http1(list.swap_remove(i).0))
            }
            Slot::Http2(s) if !s.is_closed() => Some(Conn::Http2(s.clone())),
            Slot::Http2(_) => None,
        }
    }

    /// Keep an HTTP/1.1 connection for later requests (it becomes ready once its current
    /// response has been read).
    fn put_back(&self, key: Key, s: http1::SendRequest<Body>) {
        if s.is_closed() {
            return;
        }
        let Ok(mut slots) = self.slots.lock() else {
            return;
        };
        let slot = slots.entry(key).or_insert_with(|| Slot::Http1(Vec::new()));
        if let Slot::Http1(list) = slot
            && list.len() < MAX_IDLE_PER_ENDPOINT
        {
            list.push((s, Instant::now()));
        }
    }

    fn sweep(&self) {
        let Ok(mut slots) = self.slots.lock() else {
            return;
        };
        let now = Instant::now();
        slots.retain(|_, slot| match slot {
            Slot::Http1(list) => {
                list.retain(|(s, since)| {
                    !s.is_closed() && now.duration_since(*since) < IDLE_TIMEOUT
                });
                !list.is_empty()
            }
            Slot::Http2(s) => !s.is_closed(),
        });
    }

    async fn open(
        &self,
        key: Key,
        mark: Option<u32>,
        connect_timeout: Duration,
    ) -> Result<Conn, SendError> {
        let stream = connect::connect(EndpointAddr(key.addr), mark, connect_timeout).await?;
        let io = TokioIo::new(stream);
        let handshake = |source| SendError::Handshake {
            addr: key.addr,
            source,
        };
        match key.proto {
            Proto::Http1 => {
                let (tx, conn) = http1::handshake(io).await.map_err(handshake)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(error = %e, "upstream http/1.1 connection ended with error");
                    }
                });
                Ok(Conn::Http1(tx))
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
                });
                if let Ok(mut slots) = self.slots.lock() {
                    slots.insert(key, Slot::Http2(tx.clone()));
                }
                Ok(Conn::Http2(tx))
            }
        }
    }

    /// Send `req` to `addr`, reusing a kept-alive connection when one is ready. A request that
    /// a reused connection closed before sending it is sent again on a fresh connection (the
    /// usual keep-alive race; nothing reached the upstream).
    pub async fn send(
        &self,
        addr: SocketAddr,
        proto: Proto,
        mark: Option<u32>,
        connect_timeout: Duration,
        req: Request<Body>,
    ) -> Sent {
        if self.checkouts.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.sweep();
        }
        let key = Key { addr, proto };
        let mut req = req;
        let mut new_connection = false;
        // At most one reused attempt, then one on a fresh connection.
        for fresh in [false, true] {
            let conn = match (fresh, self.take_idle(key)) {
                (false, Some(c)) => c,
                (false, None) => continue,
                (true, _) => {
                    new_connection = true;
                    match self.open(key, mark, connect_timeout).await {
                        Ok(c) => c,
                        Err(e) => {
                            return Sent {
                                result: Err(e),
                                new_connection,
                            };
                        }
                    }
                }
            };
            let (result, back) = match conn {
                Conn::Http1(mut tx) => {
                    if tx.ready().await.is_err() {
                        continue;
                    }
                    let r = tx.try_send_request(req).await;
                    (r, Some(tx))
                }
                Conn::Http2(mut tx) => {
                    if tx.ready().await.is_err() {
                        continue;
                    }
                    (tx.try_send_request(req).await, None)
                }
            };
            match result {
                Ok(resp) => {
                    if let Some(tx) = back {
                        self.put_back(key, tx);
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
