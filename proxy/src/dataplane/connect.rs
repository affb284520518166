//! The connect step: where a [`Target`] is (DNS names resolve here) and where the connect
//! leaves from (inbound: the passthrough source), then the one upstream connect,
//! [`crate::net::connect_from`].

use std::time::Duration;

use tokio::net::TcpStream;

use super::error::ConnError;
use super::route::Target;
use super::{Dataplane, ListenerRole, inbound};
use crate::addr::EndpointAddr;
use crate::net::{self, ConnectError};

/// The address to connect to for `target` of `cluster`.
pub(super) async fn resolve(target: &Target, cluster: &str) -> Result<EndpointAddr, ConnError> {
    match target {
        Target::Host(h) => Ok(EndpointAddr(h.address())),
        Target::OriginalDst(a) => Ok(*a),
        Target::Dns { host, port } => {
            let found = tokio::net::lookup_host((host.as_str(), *port))
                .await
                .ok()
                .and_then(|mut addrs| addrs.next());
            found
                .map(EndpointAddr)
                .ok_or_else(|| ConnError::Unresolved {
                    cluster: cluster.to_string(),
                    host: host.clone(),
                    port: *port,
                })
        }
    }
}

/// Connect to `addr` for a connection accepted by a listener of `role`, with the proxy's mark
/// and `timeout`.
pub(super) async fn connect(
    dp: &Dataplane,
    role: &ListenerRole,
    addr: EndpointAddr,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let source = match role {
        ListenerRole::Inbound { .. } => inbound::passthrough_source(addr.get()),
        ListenerRole::Capture | ListenerRole::Static { .. } => None,
    };
    net::connect_from(addr, source, dp.upstream_mark(), timeout).await
}
