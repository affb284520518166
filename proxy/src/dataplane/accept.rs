//! The accept step: what routing needs to know about a connection, computed once, on one
//! snapshot load, before anything is decided.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tracing::debug;

use super::error::ConnError;
use super::route::{self, ConnFacts};
use super::{Dataplane, ListenerRole, inbound, orig_dst};
use crate::addr::{ClientAddr, OrigDstAddr};
use crate::http::sniff;
use crate::model::Listener;
use crate::state::Snapshot;

/// How long the http_inspector listener filter waits for the first bytes before giving up
/// (the chain is then chosen without an application protocol).
const HTTP_INSPECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The facts of one accepted connection, all read against [`Accepted::snap`].
#[derive(Debug)]
pub struct Accepted {
    /// The snapshot loaded at accept: the connection is routed on this one only.
    pub snap: Arc<Snapshot>,
    /// Peer.
    pub client: ClientAddr,
    /// Local address of the accepted socket.
    pub local: SocketAddr,
    /// Where the client meant to go, when that is not `local`: SO_ORIGINAL_DST (eBPF or
    /// iptables capture); inbound, conntrack's answer or else the local address (sk_lookup).
    pub orig_dst: Option<OrigDstAddr>,
    /// The listener that serves the connection; `None`: no listener does.
    pub listener: Option<Arc<Listener>>,
    /// Application protocols a listener filter detected (`http/1.1`, `h2c`), else empty.
    pub application_protocols: Vec<String>,
    /// Transport protocol for chain matching: `raw_buffer` (no TLS inspector yet).
    pub transport_protocol: &'static str,
    /// SNI, once a TLS inspector finds one (none yet).
    pub server_name: Option<String>,
}

impl Accepted {
    /// Read the facts of `down`, accepted by a listener of `role` from `client`.
    pub async fn read(
        dp: &Dataplane,
        down: &TcpStream,
        client: ClientAddr,
        role: &ListenerRole,
    ) -> Result<Accepted, ConnError> {
        let local = down.local_addr().map_err(ConnError::Accept)?;
        let snap = dp.store().load();
        let orig_dst = match role {
            ListenerRole::Inbound { .. } => Some(inbound::original_destination(down, local)),
            ListenerRole::Capture => redirected(down, local),
            ListenerRole::Static { name }
                if snap.listeners.get(name).is_some_and(|l| l.use_original_dst) =>
            {
                redirected(down, local)
            }
            ListenerRole::Static { .. } => None,
        };
        let listener =
            route::listener_for(&snap, role, orig_dst.map(|o| o.get()), dp.capture_port).cloned();
        // http_inspector: peek (never consume) the first bytes when the listener asks for it.
        let inspect = listener.as_ref().is_some_and(|l| {
            l.listener_filters
                .iter()
                .any(|f| f == sniff::HTTP_INSPECTOR)
        });
        let application_protocols = if inspect {
            sniff::detect(down, HTTP_INSPECT_TIMEOUT)
                .await
                .map(|p| vec![p.to_string()])
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        Ok(Accepted {
            snap,
            client,
            local,
            orig_dst,
            listener,
            application_protocols,
            transport_protocol: "raw_buffer",
            server_name: None,
        })
    }

    /// What filter chain and upstream selection read.
    pub fn facts(&self) -> ConnFacts<'_> {
        ConnFacts {
            dst: self.orig_dst.map_or(self.local, |o| o.get()),
            orig_dst: self.orig_dst,
            src: self.client.get(),
            direct_src: self.client.get(),
            server_name: self.server_name.as_deref(),
            transport_protocol: self.transport_protocol,
            application_protocols: &self.application_protocols,
        }
    }
}

/// SO_ORIGINAL_DST of a captured connection, unless it is the accepting socket itself.
fn redirected(down: &TcpStream, local: SocketAddr) -> Option<OrigDstAddr> {
    match orig_dst::read(down) {
        Ok(o) => o.filter(|o| o.get() != local),
        Err(e) => {
            debug!(error = %e, "SO_ORIGINAL_DST failed");
            None
        }
    }
}
