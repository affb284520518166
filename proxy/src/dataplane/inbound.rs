//! The inbound listener (Istio's virtualInbound, 15006): connections captured on their way
//! into the pod, by `sk_lookup` (the accepted socket's local address is the original
//! destination) or by iptables PREROUTING REDIRECT (conntrack answers `SO_ORIGINAL_DST`).
//!
//! Routing follows Envoy's virtualInbound: the listener configured on the inbound port (no
//! hand-off to the listener on the destination, which would be an outbound one) -> filter
//! chain by destination port/prefix and detected protocol -> tcp_proxy or HCM -> the
//! `inbound|PORT||` cluster or `InboundPassthroughCluster`. With no inbound listener
//! configured, connections pass through to their destination. Connects to a non-loopback
//! destination (the app on the pod address) leave from 127.0.0.6 (::6), as Istio's inbound
//! clusters' `upstream_bind_config` does, so neither capture sees them again.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use socket2::SockRef;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{debug, field};

use super::{Dataplane, Decision, decide_on, forward, orig_dst};
use crate::addr::{EndpointAddr, OrigDstAddr};
use crate::model::Listener;
use crate::state::Snapshot;

/// How long the http_inspector waits for the first bytes.
const HTTP_INSPECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Upstream source of inbound connects to the app (Istio's inbound passthrough address).
pub const PASSTHROUGH_SRC_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// IPv6 counterpart of [`PASSTHROUGH_SRC_V4`].
pub const PASSTHROUGH_SRC_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// The listener that serves inbound connections: the one on the inbound port (virtualInbound).
pub fn inbound_listener(snap: &Snapshot, port: u16) -> Option<&Arc<Listener>> {
    snap.listeners
        .values()
        .find(|l| l.name == "virtualInbound" && l.address.port() == port)
        .or_else(|| {
            snap.listeners
                .values()
                .find(|l| l.udp.is_none() && l.address.port() == port)
        })
}

/// Accept inbound connections on `listener` until `shutdown`; stats under
/// `listener.<addr>.downstream_cx_*` like the capture listener.
pub async fn run(
    listener: TcpListener,
    dp: Arc<Dataplane>,
    inbound_port: u16,
    shutdown: impl Future<Output = ()>,
) {
    let stat = format!(
        "listener.{}",
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    );
    let conn_dp = dp.clone();
    super::listen::accept_loop(
        listener,
        &dp,
        &stat,
        "inbound",
        shutdown,
        move |stream, peer| {
            let dp = conn_dp.clone();
            async move { handle(&dp, stream, peer, inbound_port).await }
        },
    )
    .await
}

/// The original destination of an inbound connection: conntrack's (iptables REDIRECT) if it
/// has one, else the socket's own local address (sk_lookup keeps it).
fn original_destination(down: &TcpStream) -> Option<OrigDstAddr> {
    match orig_dst::read(down) {
        Ok(Some(o)) => Some(o),
        Ok(None) => down.local_addr().ok().map(OrigDstAddr),
        Err(e) => {
            debug!(error = %e, "SO_ORIGINAL_DST failed; using the local address");
            down.local_addr().ok().map(OrigDstAddr)
        }
    }
}

async fn handle(dp: &Arc<Dataplane>, down: TcpStream, client: SocketAddr, inbound_port: u16) {
    let span = tracing::Span::current();
    let _ = down.set_nodelay(true);
    let Some(orig) = original_destination(&down) else {
        debug!("inbound connection without a local address");
        return;
    };
    span.record("orig_dst", field::display(orig));
    let snap = dp.store().load();
    let decision = match inbound_listener(&snap, inbound_port) {
        None => Decision::Passthrough(orig.into()),
        Some(l) => {
            let detected: Vec<String> = if l
                .listener_filters
                .iter()
                .any(|f| f == crate::http::sniff::HTTP_INSPECTOR)
            {
                crate::http::sniff::detect(&down, HTTP_INSPECT_TIMEOUT)
                    .await
                    .map(|p| vec![p.to_string()])
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            decide_on(dp, &snap, l, client, orig.get(), Some(orig), &detected)
        }
    };
    let (cluster, target, timeout) = match decision {
        Decision::Upstream {
            listener,
            filter_chain,
            cluster,
            endpoint: Some(ep),
            ..
        } => {
            span.record("listener", field::display(&listener));
            span.record("filter_chain", field::display(&filter_chain));
            span.record("cluster", field::display(&cluster));
            let timeout = snap
                .cluster(&cluster)
                .map(|c| c.cluster.connect_timeout)
                .unwrap_or(crate::model::cluster::DEFAULT_CONNECT_TIMEOUT);
            (cluster, ep, timeout)
        }
        Decision::Upstream { cluster, .. } => {
            // DNS clusters make no sense for traffic into the pod.
            dp.stats()
                .counter(&format!("cluster.{cluster}.upstream_cx_none_healthy"))
                .inc();
            debug!(%cluster, "inbound cluster without a resolved endpoint");
            return;
        }
        Decision::Http {
            listener,
            filter_chain,
            manager,
        } => {
            span.record("listener", field::display(&listener));
            span.record("filter_chain", field::display(&filter_chain));
            drop(snap);
            let conn = crate::http::HttpConn {
                dp: dp.shared.clone(),
                manager,
                listener,
                client,
                orig_dst: Some(orig),
            };
            crate::http::serve(conn, down).await;
            return;
        }
        Decision::Passthrough(ep) => (
            "InboundPassthroughCluster".to_string(),
            ep,
            crate::model::cluster::DEFAULT_CONNECT_TIMEOUT,
        ),
        Decision::Reject(why) => {
            dp.stats()
                .counter("skiff.inbound.downstream_cx_rejected")
                .inc();
            debug!(reason = %why, "closing inbound connection");
            return;
        }
    };
    span.record("endpoint", field::display(target));
    drop(snap);
    let stat = |s: &str| dp.stats().counter(&format!("cluster.{cluster}.{s}"));
    stat("upstream_cx_total").inc();
    let mut up = match connect_app(target, dp.upstream_mark(), timeout).await {
        Ok(s) => s,
        Err(e) => {
            if e.kind() == std::io::ErrorKind::TimedOut {
                stat("upstream_cx_connect_timeout").inc();
            } else {
                stat("upstream_cx_connect_fail").inc();
            }
            debug!(error = %e, "inbound upstream connect failed");
            return;
        }
    };
    let active = dp
        .stats()
        .gauge(&format!("cluster.{cluster}.upstream_cx_active"));
    active.inc();
    let mut down = down;
    match forward::forward(&mut down, &mut up).await {
        Ok(t) => {
            stat("upstream_cx_tx_bytes_total").add(t.tx);
            stat("upstream_cx_rx_bytes_total").add(t.rx);
        }
        Err(e) => debug!(error = %e, "inbound connection ended with error"),
    }
    active.dec();
}

/// The source address an inbound connect to `target` leaves from: 127.0.0.6 (::6) for a
/// pod address, nothing special for loopback targets.
pub fn passthrough_source(target: SocketAddr) -> Option<SocketAddr> {
    match target.ip() {
        ip if ip.is_loopback() => None,
        IpAddr::V4(_) => Some(SocketAddr::new(PASSTHROUGH_SRC_V4.into(), 0)),
        IpAddr::V6(_) => Some(SocketAddr::new(PASSTHROUGH_SRC_V6.into(), 0)),
    }
}

/// Connect to the app at `target` with the proxy's mark, from [`passthrough_source`].
async fn connect_app(
    target: EndpointAddr,
    mark: Option<u32>,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let addr = target.get();
    let sock = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(mark) = mark {
        SockRef::from(&sock).set_mark(mark)?;
    }
    if let Some(src) = passthrough_source(addr) {
        // ::6 is not configured anywhere by default: binding it needs IP_FREEBIND-like
        // transparency, so v6 falls back to the kernel's choice when the bind fails.
        if let Err(e) = sock.bind(src) {
            if addr.is_ipv4() {
                return Err(e);
            }
            debug!(error = %e, %src, "cannot bind the inbound passthrough source");
        }
    }
    sock.set_nodelay(true)?;
    match tokio::time::timeout(timeout, sock.connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connect to {addr} timed out after {timeout:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_connects_leave_from_the_passthrough_address_except_on_loopback() {
        assert_eq!(
            passthrough_source("10.200.0.2:8080".parse().unwrap()),
            Some("127.0.0.6:0".parse().unwrap())
        );
        assert_eq!(
            passthrough_source("[fd00::2]:8080".parse().unwrap()),
            Some("[::6]:0".parse().unwrap())
        );
        assert_eq!(passthrough_source("127.0.0.1:8080".parse().unwrap()), None);
    }
}
