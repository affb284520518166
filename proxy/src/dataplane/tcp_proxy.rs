//! The tcp_proxy step, for every listener: take the chosen cluster's connection slot, connect
//! to the chosen target, tell the chosen host how it went, count the connection on it, and
//! copy bytes. Nothing is looked up again: the cluster entry and host are selection's.

use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, field};

use super::error::ConnError;
use super::route::{Target, TcpRoute};
use super::{Dataplane, ListenerRole, connect, forward};
use crate::addr::{EndpointAddr, OrigDstAddr};
use crate::lb::{Outcome, RoutingPriority};
use crate::model::cluster::DEFAULT_CONNECT_TIMEOUT;
use crate::state::ClusterEntry;
use crate::stats::ClusterStats;

/// Where one tcp_proxy connection goes: a cluster's target, or passthrough (no listener owns
/// the destination, so no cluster is involved).
#[derive(Debug)]
pub(super) struct Upstream {
    /// The chosen cluster entry (breaker, connect timeout); `None` for passthrough.
    cluster: Option<Arc<ClusterEntry>>,
    /// Stat name when there is no cluster: the role's passthrough cluster.
    passthrough: &'static str,
    /// The cluster's stats (the passthrough cluster's for passthrough), resolved by the
    /// snapshot selection ran on.
    stats: Arc<ClusterStats>,
    /// Where to connect.
    target: Target,
}

impl Upstream {
    /// The upstream selection chose on a tcp_proxy chain.
    pub(super) fn chosen(route: TcpRoute) -> Upstream {
        Upstream {
            stats: route.cluster.stats.clone(),
            cluster: Some(route.cluster),
            passthrough: "",
            target: route.target,
        }
    }

    /// Passthrough to `dst` for a connection of `role`, counted in `stats` (the snapshot's
    /// handles of the role's passthrough cluster).
    pub(super) fn passthrough(
        role: &ListenerRole,
        dst: EndpointAddr,
        stats: Arc<ClusterStats>,
    ) -> Upstream {
        Upstream {
            cluster: None,
            stats,
            passthrough: role.passthrough_cluster(),
            target: Target::OriginalDst(dst),
        }
    }

    /// Stat name of the cluster.
    pub(super) fn name(&self) -> &str {
        self.cluster
            .as_ref()
            .map_or(self.passthrough, |c| &c.cluster.name)
    }
}

/// Proxy `down` to `up` until both sides close.
pub(super) async fn proxy(
    dp: &Dataplane,
    role: &ListenerRole,
    mut down: TcpStream,
    orig_dst: Option<OrigDstAddr>,
    up: Upstream,
) -> Result<(), ConnError> {
    let name = up.name();
    let counters = up.stats.clone();
    // 1. The cluster's circuit breaker: tcp_proxy closes the connection at max_connections
    // (`upstream_cx_overflow` is counted by the breaker). The slot is held until the end.
    let _slot = match &up.cluster {
        Some(c) => Some(c.try_connection(RoutingPriority::Default)?),
        None => None,
    };
    let timeout = up
        .cluster
        .as_ref()
        .map_or(DEFAULT_CONNECT_TIMEOUT, |c| c.cluster.connect_timeout);
    // 2. Connect.
    let addr = connect::resolve(&up.target, name).await?;
    tracing::Span::current().record("endpoint", field::display(addr));
    counters.upstream_cx_total.inc();
    let host = up.target.host().cloned();
    let mut upstream = match connect::connect(dp, role, addr, timeout).await {
        Ok(s) => s,
        Err(source) => {
            let outcome = if source.is_timeout() {
                counters.upstream_cx_connect_timeout.inc();
                Outcome::Timeout
            } else {
                counters.upstream_cx_connect_fail.inc();
                Outcome::ConnectFailure
            };
            if let Some(h) = &host {
                h.report(outcome);
            }
            return Err(ConnError::Connect {
                cluster: name.to_string(),
                source,
            });
        }
    };
    // 3. The host hears how the connect went (outlier detection) and counts the connection
    // while it lasts: as an open connection (`/clusters` cx_active) and, as Envoy's TCP pool
    // does, as an active request, the load LEAST_REQUEST and PeakEWMA weigh.
    let _on_host = host.map(|h| {
        h.report(Outcome::Success);
        (h.start_connection(), h.start_request())
    });
    // 4. Forward. Payload that sk_msg redirected (`--sockmap`) waits in the socket's psock
    // queue, which splice(2) never reads: accelerated pairs take the buffered copy.
    let accelerated = dp
        .sockmap_ports
        .iter()
        .any(|&p| p == addr.get().port() || orig_dst.is_some_and(|o| o.get().port() == p));
    // The connection keeps its slot and host, not the configuration they came from.
    drop(up);
    counters.upstream_cx_active.inc();
    let moved = if accelerated {
        forward::forward_copy(&mut down, &mut upstream).await
    } else {
        forward::forward(&mut down, &mut upstream).await
    };
    counters.upstream_cx_active.dec();
    let t = moved.map_err(|e| ConnError::Stream {
        side: e.side,
        source: e.source,
    })?;
    counters.upstream_cx_tx_bytes_total.add(t.tx);
    counters.upstream_cx_rx_bytes_total.add(t.rx);
    debug!(tx = t.tx, rx = t.rx, "connection closed");
    Ok(())
}
