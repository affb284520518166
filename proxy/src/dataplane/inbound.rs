//! What only the inbound listener (Istio's virtualInbound, 15006) does differently: its
//! connections were captured on their way into the pod, by `sk_lookup` (the accepted socket's
//! local address is the original destination) or by iptables PREROUTING REDIRECT (conntrack
//! answers `SO_ORIGINAL_DST`), and its connects to the app leave from 127.0.0.6 (::6), as
//! Istio's inbound clusters' `upstream_bind_config` does, so neither capture sees them again.
//!
//! Everything else is the shared pipeline: the listener on the inbound port
//! ([`super::route::inbound_listener`], no hand-off to the listener on the destination, which
//! would be an outbound one) -> filter chain by destination port/prefix and detected protocol
//! -> tcp_proxy (breaker, outlier outcome, active connections) or HCM -> the `inbound|PORT||`
//! cluster or `InboundPassthroughCluster`. With no inbound listener configured, connections
//! pass through to their destination.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::TcpStream;
use tracing::debug;

use super::orig_dst;
use crate::addr::OrigDstAddr;
use crate::net::BindSource;

/// Upstream source of inbound connects to the app (Istio's inbound passthrough address).
pub const PASSTHROUGH_SRC_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// IPv6 counterpart of [`PASSTHROUGH_SRC_V4`].
pub const PASSTHROUGH_SRC_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// The original destination of an inbound connection: conntrack's (iptables REDIRECT) if it
/// has one, else the socket's own local address (sk_lookup keeps it).
pub(super) fn original_destination(down: &TcpStream, local: SocketAddr) -> OrigDstAddr {
    match orig_dst::read(down) {
        Ok(Some(o)) => o,
        Ok(None) => OrigDstAddr(local),
        Err(e) => {
            debug!(error = %e, "SO_ORIGINAL_DST failed; using the local address");
            OrigDstAddr(local)
        }
    }
}

/// The source an inbound connect to `target` leaves from: 127.0.0.6 (::6) for a pod address,
/// nothing special for loopback targets. ::6 is not configured anywhere by default (binding it
/// needs IP_FREEBIND-like transparency), so v6 falls back to the kernel's choice.
pub fn passthrough_source(target: SocketAddr) -> Option<BindSource> {
    match target.ip() {
        ip if ip.is_loopback() => None,
        IpAddr::V4(_) => Some(BindSource {
            addr: SocketAddr::new(PASSTHROUGH_SRC_V4.into(), 0),
            optional: false,
        }),
        IpAddr::V6(_) => Some(BindSource {
            addr: SocketAddr::new(PASSTHROUGH_SRC_V6.into(), 0),
            optional: true,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_connects_leave_from_the_passthrough_address_except_on_loopback() {
        let src = |t: &str| passthrough_source(t.parse().unwrap()).map(|b| (b.addr, b.optional));
        assert_eq!(
            src("10.200.0.2:8080"),
            Some(("127.0.0.6:0".parse().unwrap(), false))
        );
        assert_eq!(
            src("[fd00::2]:8080"),
            Some(("[::6]:0".parse().unwrap(), true))
        );
        assert_eq!(src("127.0.0.1:8080"), None);
    }
}
