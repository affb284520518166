//! Upstream connects: the proxy's mark (so capture never loops), a timeout, typed errors.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};

use crate::addr::EndpointAddr;

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

/// Connect to `addr`, marking the socket with `mark` first so skiff's own connects are never
/// captured again.
pub async fn connect(
    addr: EndpointAddr,
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
    sock.set_nodelay(true).map_err(setup)?;
    match tokio::time::timeout(timeout, sock.connect(addr.get())).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(source)) => Err(ConnectError::Failed { addr, source }),
        Err(_) => Err(ConnectError::Timeout { addr, timeout }),
    }
}
