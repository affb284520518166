//! The accept step: what routing needs to know about a connection, computed once, on one
//! snapshot load, before anything is decided.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::counters::ListenerCounters;
use super::error::ConnError;
use super::route::{self, ConnFacts};
use super::{Dataplane, ListenerRole, inbound, orig_dst};
use crate::addr::{ClientAddr, OrigDstAddr};
use crate::http::sniff;
use crate::model::Listener;
use crate::state::Snapshot;
use crate::tls::inspect::{self, Inspect, TLS_INSPECTOR};

/// `transport_protocol` of a connection no TLS inspector recognised.
pub const RAW_BUFFER: &str = "raw_buffer";
/// `transport_protocol` of a connection whose ClientHello the TLS inspector read.
pub const TLS: &str = "tls";

/// Bytes peeked first; http_inspector never needs more, the TLS inspector may (up to
/// [`inspect::MAX_CLIENT_HELLO`]).
const FIRST_PEEK: usize = 4 * 1024;

/// How long to wait before peeking again when no new byte arrived (peek does not consume, so
/// the socket stays readable and cannot be waited on).
const PEEK_AGAIN: Duration = Duration::from_millis(2);

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
    /// Application protocols the listener filters detected: the ClientHello's ALPN list, or
    /// `http/1.0`, `http/1.1`, `h2c` from http_inspector; else empty.
    pub application_protocols: Vec<String>,
    /// Transport protocol for chain matching: [`TLS`] when tls_inspector read a ClientHello,
    /// else [`RAW_BUFFER`].
    pub transport_protocol: &'static str,
    /// The ClientHello's SNI.
    pub server_name: Option<String>,
}

impl Accepted {
    /// Read the facts of `down`, accepted by a listener of `role` from `client` at `local`
    /// (`None`: read from the socket); its listener filters' outcomes are counted in
    /// `counters`.
    pub(super) async fn read(
        dp: &Dataplane,
        down: &TcpStream,
        (client, local): (ClientAddr, Option<SocketAddr>),
        role: &ListenerRole,
        counters: &ListenerCounters,
    ) -> Result<Accepted, ConnError> {
        let local = match local {
            Some(a) => a,
            None => down.local_addr().map_err(ConnError::Accept)?,
        };
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
        let found = match &listener {
            Some(l) => listener_filters(down, l, counters).await?,
            None => Detected::default(),
        };
        Ok(Accepted {
            snap,
            client,
            local,
            orig_dst,
            listener,
            application_protocols: found.application_protocols,
            transport_protocol: found.transport_protocol,
            server_name: found.server_name,
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

// === listener filters ===

/// What the listener filters found in the first bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Detected {
    /// [`TLS`] or [`RAW_BUFFER`].
    pub(super) transport_protocol: &'static str,
    /// SNI.
    pub(super) server_name: Option<String>,
    /// ALPN, or the HTTP version http_inspector saw.
    pub(super) application_protocols: Vec<String>,
}

impl Default for Detected {
    fn default() -> Self {
        Detected {
            transport_protocol: RAW_BUFFER,
            server_name: None,
            application_protocols: Vec::new(),
        }
    }
}

/// Run the listener's tls_inspector and http_inspector on `down`'s first bytes, peeked and
/// never consumed, until each has decided, within the listener's `listener_filters_timeout`.
/// At the timeout the connection is closed, or with `continue_on_listener_filters_timeout`
/// routed on what is known (nothing). A peer that closes or fails before they decide is
/// routed on nothing too (its next read tells the rest).
async fn listener_filters(
    down: &TcpStream,
    listener: &Listener,
    counters: &ListenerCounters,
) -> Result<Detected, ConnError> {
    let has = |name: &str| listener.listener_filters.iter().any(|f| f == name);
    let mut tls = has(TLS_INSPECTOR);
    let mut http = has(sniff::HTTP_INSPECTOR);
    let mut found = Detected::default();
    if !tls && !http {
        return Ok(found);
    }
    let deadline = listener
        .listener_filters_timeout
        .map(|t| Instant::now() + t);
    // Most first flights fit in a few KiB: the buffer grows (to the inspector's 64 KiB) only
    // when a ClientHello fills it.
    let mut buf = vec![0u8; FIRST_PEEK];
    let mut seen = 0;
    loop {
        let peeked = match deadline {
            Some(d) => match tokio::time::timeout_at(d, down.peek(&mut buf)).await {
                Ok(r) => r,
                Err(_) => return timed_out(listener, counters, found),
            },
            None => down.peek(&mut buf).await,
        };
        let n = match peeked {
            Ok(0) | Err(_) => return Ok(found),
            Ok(n) => n,
        };
        let bytes = &buf[..n];
        if tls {
            let c = counters.tls_inspector();
            match inspect::inspect(bytes) {
                Inspect::NeedMore => {}
                Inspect::NotTls => {
                    c.tls_not_found.inc();
                    tls = false;
                }
                Inspect::TooLarge => {
                    c.client_hello_too_large.inc();
                    return Err(ConnError::ClientHelloTooLarge {
                        listener: listener.name.clone(),
                        max: inspect::MAX_CLIENT_HELLO,
                    });
                }
                Inspect::ClientHello(hello) => {
                    c.tls_found.inc();
                    match hello.sni {
                        Some(_) => c.sni_found.inc(),
                        None => c.sni_not_found.inc(),
                    }
                    match hello.alpn.is_empty() {
                        false => c.alpn_found.inc(),
                        true => c.alpn_not_found.inc(),
                    }
                    // http_inspector leaves connections another filter found a transport for.
                    return Ok(Detected {
                        transport_protocol: TLS,
                        server_name: hello.sni,
                        application_protocols: hello.alpn,
                    });
                }
            }
        }
        if http {
            match sniff::classify(&bytes[..n.min(sniff::MAX_PEEK)]) {
                sniff::Verdict::NeedMore => {}
                v => {
                    found.application_protocols =
                        v.protocol().map(|p| vec![p.into()]).unwrap_or_default();
                    http = false;
                }
            }
        }
        if !tls && !http {
            return Ok(found);
        }
        if tls && n == buf.len() && n < inspect::MAX_CLIENT_HELLO {
            buf.resize((n * 4).min(inspect::MAX_CLIENT_HELLO), 0);
            seen = n;
            continue;
        }
        if n == seen {
            // Nothing new: a peer that half-closed sends nothing more, so decide now.
            if down
                .ready(Interest::READABLE)
                .await
                .map_or(true, |r| r.is_read_closed())
            {
                return Ok(found);
            }
            match deadline {
                Some(d) if Instant::now() >= d => return timed_out(listener, counters, found),
                _ => tokio::time::sleep(PEEK_AGAIN).await,
            }
        }
        seen = n;
    }
}

/// The listener filters ran out of time.
fn timed_out(
    listener: &Listener,
    counters: &ListenerCounters,
    found: Detected,
) -> Result<Detected, ConnError> {
    counters.pre_cx_timeout.inc();
    if listener.continue_on_listener_filters_timeout {
        debug!(listener = %listener.name, "listener filters timed out; choosing a chain anyway");
        Ok(found)
    } else {
        Err(ConnError::ListenerFilterTimeout {
            listener: listener.name.clone(),
        })
    }
}

#[cfg(test)]
mod tests;
