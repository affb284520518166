//! Upstream connects, below both the data plane and the HTTP connection manager: the proxy's
//! SO_MARK (so capture never loops), an optional bind source, the cluster's timeout, typed
//! errors. Every upstream socket skiff opens (tcp_proxy, HTTP pool, health checks) comes from
//! [`connect_from`].

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};
use tracing::debug;

use crate::addr::EndpointAddr;

/// Address an upstream socket is bound to before it connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindSource {
    /// Source address (port 0: the kernel picks one).
    pub addr: SocketAddr,
    /// When the bind fails, connect from the kernel's choice instead of failing.
    pub optional: bool,
}

/// Why an upstream connect failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The socket could not be set up (out of fds, mark refused ...).
    #[error("socket setup for {addr} failed: {source}")]
    Setup {
        /// Target.
        addr: EndpointAddr,
        /// Cause.
        source: io::Error,
    },
    /// The required bind source could not be bound.
    #[error("binding {src} to connect to {addr} failed: {source}")]
    Bind {
        /// Target.
        addr: EndpointAddr,
        /// Source address.
        src: SocketAddr,
        /// Cause.
        source: io::Error,
    },
    /// The endpoint refused or reset the connect.
    #[error("connect to {addr} failed: {source}")]
    Failed {
        /// Target.
        addr: EndpointAddr,
        /// Cause.
        source: io::Error,
    },
    /// No answer within the cluster's `connect_timeout`.
    #[error("connect to {addr} timed out after {timeout:?}")]
    Timeout {
        /// Target.
        addr: EndpointAddr,
        /// The timeout that expired.
        timeout: Duration,
    },
}

impl ConnectError {
    /// Whether the connect timed out (`upstream_cx_connect_timeout`, outlier `Timeout`).
    pub fn is_timeout(&self) -> bool {
        matches!(self, ConnectError::Timeout { .. })
    }
}

/// Connect to `addr` from the kernel's choice of source (see [`connect_from`]).
pub async fn connect(
    addr: EndpointAddr,
    mark: Option<u32>,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    connect_from(addr, None, mark, timeout).await
}

/// Connect to `addr`, marking the socket with `mark` first so skiff's own connects are never
/// captured again, bound to `bind` when given (the inbound passthrough source).
pub async fn connect_from(
    addr: EndpointAddr,
    bind: Option<BindSource>,
    mark: Option<u32>,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let setup = |source| ConnectError::Setup { addr, source };
    let sock = match addr.get() {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(setup)?;
    if let Some(mark) = mark {
        SockRef::from(&sock).set_mark(mark).map_err(setup)?;
    }
    if let Some(b) = bind
        && let Err(source) = sock.bind(b.addr)
    {
        if !b.optional {
            return Err(ConnectError::Bind {
                addr,
                src: b.addr,
                source,
            });
        }
        debug!(error = %source, src = %b.addr, "bind source unavailable; kernel picks the source");
    }
    sock.set_nodelay(true).map_err(setup)?;
    match within(timeout, sock.connect(addr.get())).await {
        Some(Ok(s)) => Ok(s),
        Some(Err(source)) => Err(ConnectError::Failed { addr, source }),
        None => Err(ConnectError::Timeout { addr, timeout }),
    }
}

/// `fut`'s output, or `None` when `timeout` (counted from the call) passes first. The timer is
/// armed only when `fut` is still pending after one turn of the reactor: a loopback or LAN
/// connect is answered by then, and a timer due before the worker's next planned wake-up
/// makes tokio's time driver wake the reactor with an eventfd write, once per connection.
async fn within<F: std::future::Future>(timeout: Duration, fut: F) -> Option<F::Output> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut fut = std::pin::pin!(fut);
    for turn in 0..2 {
        let polled = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match fut.as_mut().poll(cx) {
                std::task::Poll::Ready(out) => Some(out),
                std::task::Poll::Pending => None,
            })
        })
        .await;
        if polled.is_some() {
            return polled;
        }
        if turn == 0 {
            // Runs again after the reactor's next poll (tokio defers a yielding task until
            // then), which reports the connect's outcome if the kernel already has it.
            tokio::task::yield_now().await;
        }
    }
    tokio::time::timeout_at(deadline, fut).await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn within_times_out_from_the_call_and_passes_on_what_finishes_in_time() {
        let start = tokio::time::Instant::now();
        let t = Duration::from_millis(50);
        assert_eq!(within(t, std::future::pending::<()>()).await, None);
        assert!(start.elapsed() >= t, "the timeout counts from the call");
        // Ready at once, after one turn of the reactor, and only later but in time.
        let t = Duration::from_secs(5);
        assert_eq!(within(t, async { 1 }).await, Some(1));
        let after_a_turn = async {
            tokio::task::yield_now().await;
            2
        };
        assert_eq!(within(t, after_a_turn).await, Some(2));
        let later = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            3
        };
        assert_eq!(within(t, later).await, Some(3));
    }

    #[tokio::test]
    async fn bound_source_is_the_peer_seen_upstream_and_a_required_bind_failure_is_an_error() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = EndpointAddr(l.local_addr().unwrap());
        let src = BindSource {
            addr: "127.0.0.6:0".parse().unwrap(),
            optional: false,
        };
        let t = Duration::from_secs(5);
        let (up, accepted) = tokio::join!(connect_from(target, Some(src), None, t), l.accept());
        up.unwrap();
        assert_eq!(
            accepted.unwrap().1.ip(),
            "127.0.0.6".parse::<std::net::IpAddr>().unwrap()
        );
        // 192.0.2.1 (TEST-NET-1) is not an address of this host: binding it fails.
        let foreign = BindSource {
            addr: "192.0.2.1:0".parse().unwrap(),
            optional: false,
        };
        let err = connect_from(target, Some(foreign), None, t)
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::Bind { .. }), "{err}");
        // Optional: the kernel's source is used instead.
        let either = BindSource {
            optional: true,
            ..foreign
        };
        let (up, accepted) = tokio::join!(connect_from(target, Some(either), None, t), l.accept());
        up.unwrap();
        assert!(accepted.unwrap().1.ip().is_loopback());
    }
}
