//! Inbound capture ABI (`skiff run --capture-inbound` in eBPF mode): an `sk_lookup` program in
//! the pod's network namespace steers connections arriving for the pod's addresses to the
//! proxy's inbound listener (Istio's virtualInbound, 15006), which reads the original
//! destination from the accepted socket's local address.
//!
//! Maps (defined in `skiff-ebpf/src/sk_lookup.rs`):
//! - `SKIFF_IN_LSN` (sockmap, 2 slots): [`LISTENER_V4`], [`LISTENER_V6`]; writer: userspace.
//! - `SKIFF_POD_IPS` (hash [`PodIpKey`] -> u8): the pod's addresses; writer: userspace.
//! - `SKIFF_IN_EXCL` (hash [`InboundPortKey`] -> u8): excludeInboundPorts; writer: userspace.
//! - `SKIFF_IN_STATS` (per-CPU array, [`stat::COUNT`]): counters; writer: the program.

/// Sockmap slot of the IPv4 inbound listener.
pub const LISTENER_V4: u32 = 0;
/// Sockmap slot of the IPv6 inbound listener.
pub const LISTENER_V6: u32 = 1;

/// Key of `SKIFF_POD_IPS`: one address of the pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PodIpKey {
    /// Address, network-order words (IPv4 in word 0, the rest zero).
    pub addr_be: [u32; 4],
    /// 2 (AF_INET) or 10 (AF_INET6).
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<PodIpKey>() == 20);

impl PodIpKey {
    /// The key of an IPv4 address (network order).
    #[inline(always)]
    pub const fn v4(addr_be: u32) -> Self {
        Self {
            addr_be: [addr_be, 0, 0, 0],
            family: 2,
            _pad: [0; 3],
        }
    }

    /// The key of an IPv6 address (network-order words).
    #[inline(always)]
    pub const fn v6(addr_be: [u32; 4]) -> Self {
        Self {
            addr_be,
            family: 10,
            _pad: [0; 3],
        }
    }
}

/// Key of `SKIFF_IN_EXCL`: a destination port never steered.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InboundPortKey {
    /// Port, host order (sk_lookup's `local_port` is host order).
    pub port_host: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<InboundPortKey>() == 4);

impl InboundPortKey {
    /// The key for `port_host`.
    #[inline(always)]
    pub const fn new(port_host: u16) -> Self {
        Self { port_host, _pad: 0 }
    }
}

/// Indices of the `SKIFF_IN_STATS` counters.
pub mod stat {
    /// Steered to the inbound listener.
    pub const STEERED: u32 = 0;
    /// Destination is not one of the pod's addresses (loopback, another address).
    pub const NOT_POD_IP: u32 = 1;
    /// Source is the pod itself (loopback or a pod address: the proxy's own connects to the app).
    pub const FROM_POD: u32 = 2;
    /// Destination port is excluded.
    pub const EXCLUDED_PORT: u32 = 3;
    /// No listener in the sockmap, or the kernel refused the assignment: regular lookup.
    pub const NO_LISTENER: u32 = 4;
    /// Number of counters.
    pub const COUNT: u32 = 5;
    /// Counter names by index (`/stats` shows them as `skiff.inbound.<name>`).
    pub const NAMES: [&str; COUNT as usize] = [
        "steered",
        "skip_not_pod_ip",
        "skip_from_pod",
        "skip_excluded_port",
        "no_listener",
    ];
}

/// What `sk_lookup` does with one TCP lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Steer {
    /// Assign the inbound listener.
    ToProxy,
    /// Leave it to the regular socket lookup; the counter index says why.
    Pass(u32),
}

/// The inbound steering decision over plain facts (the kernel and host tests run this).
/// `dst_is_pod`: the destination is a pod address; `src_is_pod`: the source is loopback or a
/// pod address (so the connect came from inside the pod, e.g. the proxy forwarding to the app).
#[inline(always)]
pub fn steer(dst_is_pod: bool, src_is_pod: bool, port_excluded: bool) -> Steer {
    if !dst_is_pod {
        Steer::Pass(stat::NOT_POD_IP)
    } else if src_is_pod {
        Steer::Pass(stat::FROM_POD)
    } else if port_excluded {
        Steer::Pass(stat::EXCLUDED_PORT)
    } else {
        Steer::ToProxy
    }
}

#[cfg(feature = "user")]
mod user {
    use super::{InboundPortKey, PodIpKey};

    // SAFETY: repr(C), no implicit padding (explicit `_pad`), every bit pattern valid.
    unsafe impl aya::Pod for PodIpKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for InboundPortKey {}

    impl From<std::net::IpAddr> for PodIpKey {
        fn from(ip: std::net::IpAddr) -> Self {
            match ip {
                std::net::IpAddr::V4(a) => PodIpKey::v4(u32::from_ne_bytes(a.octets())),
                std::net::IpAddr::V6(a) => {
                    let o = a.octets();
                    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                    PodIpKey::v6([w(0), w(4), w(8), w(12)])
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steering_order() {
        assert_eq!(steer(true, false, false), Steer::ToProxy);
        assert_eq!(steer(false, false, false), Steer::Pass(stat::NOT_POD_IP));
        // The proxy's own connect to the app (from 127.0.0.6) is never steered back.
        assert_eq!(steer(true, true, false), Steer::Pass(stat::FROM_POD));
        assert_eq!(steer(true, false, true), Steer::Pass(stat::EXCLUDED_PORT));
        assert_eq!(stat::NAMES.len(), stat::COUNT as usize);
    }
}
