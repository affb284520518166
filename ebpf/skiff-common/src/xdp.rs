//! XDP node-ingress load balancer ABI (`skiff run --fast-path --xdp IFACE`).
//!
//! The XDP program balances packets for the fast path's own services: it reads the same
//! `SKIFF_SVC4_V2`/`SKIFF_SVC6_V2`, `SKIFF_CLUSTERS`, `SKIFF_ENDPOINTS` and `SKIFF_MAGLEV`
//! maps (node scope, active generation) that connect4/6 read, so one projection and one
//! generation flip feed both. Its own maps are connection tracking (forward and reverse),
//! the redirect targets, the VIP addresses it answers echo requests for, and the counters
//! defined here.
//!
//! Pure pieces (checksum arithmetic, the flow hash, the slot choice) live here so that host
//! unit tests run the code the kernel runs.

use crate::{
    AF_INET, ClusterValue, Draws, LB_MAGLEV, SlotFacts, client_hash, pick_slot, weighted_slot,
};

/// One direction of a flow: key of `SKIFF_XDP_CT` (client -> VIP) and `SKIFF_XDP_RCT`
/// (endpoint -> client). IPv4 uses word 0 of the address arrays only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct XdpFlowKey {
    /// Source address, network-order words.
    pub src_be: [u32; 4],
    /// Destination address, network-order words.
    pub dst_be: [u32; 4],
    /// Source port, network order.
    pub sport_be: u16,
    /// Destination port, network order.
    pub dport_be: u16,
    /// IP protocol (TCP or UDP).
    pub proto: u8,
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<XdpFlowKey>() == 40);
const _: () = assert!(core::mem::align_of::<XdpFlowKey>() == 4);

impl XdpFlowKey {
    /// The key of the replies of this client -> VIP flow once it goes to `ep`: endpoint ->
    /// client (the kernel inserts it, userspace deletes it with the forward entry).
    #[inline(always)]
    pub fn reply_of(&self, ep: &XdpNat) -> XdpFlowKey {
        XdpFlowKey {
            src_be: ep.addr_be,
            dst_be: self.src_be,
            sport_be: ep.port_be,
            dport_be: self.sport_be,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }
}

/// Value of the conntrack maps: the address and port a packet of the flow is rewritten to
/// (forward: the endpoint's destination; reverse: the VIP as source).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct XdpNat {
    /// Address, network-order words.
    pub addr_be: [u32; 4],
    /// Port, network order.
    pub port_be: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<XdpNat>() == 20);

/// Key of the per-VIP counters `SKIFF_XDP_VST`: a service address and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct XdpVipKey {
    /// VIP, network-order words.
    pub addr_be: [u32; 4],
    /// Service port, network order.
    pub port_be: u16,
    /// IP protocol.
    pub proto: u8,
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<XdpVipKey>() == 20);

/// Key of `SKIFF_XDP_VIP`: a VIP address alone (the fast path serves some port of it at node
/// scope), for the echo replies. IPv4 uses word 0 only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct XdpAddrKey {
    /// Address, network-order words.
    pub addr_be: [u32; 4],
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<XdpAddrKey>() == 20);
const _: () = assert!(core::mem::align_of::<XdpAddrKey>() == 4);

/// Per-CPU counters of one VIP (`SKIFF_XDP_VST`) or one endpoint (`SKIFF_XDP_EST`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpCounters {
    /// Packets translated towards the endpoint (client -> VIP).
    pub packets: u64,
    /// Bytes of those packets (whole frames).
    pub bytes: u64,
    /// New flows: conntrack misses that chose an endpoint.
    pub flows: u64,
    /// Packets for the VIP with no endpoint to pick (passed to the stack untouched).
    pub no_endpoint: u64,
    /// Reply packets translated back to come from the VIP.
    pub reply_packets: u64,
    /// Bytes of those replies.
    pub reply_bytes: u64,
}
const _: () = assert!(core::mem::size_of::<XdpCounters>() == 48);

/// Indices of the per-CPU `SKIFF_XDP_ST` counters.
pub mod stat {
    /// Frame not IPv4/IPv6 (after an optional VLAN tag), or too short for its headers.
    pub const PASS_NOT_IP: u32 = 0;
    /// IP fragment (offset or more-fragments set): never balanced (no ports in later fragments).
    pub const PASS_FRAGMENT: u32 = 1;
    /// Not TCP/UDP to a fast-path service, and no reply of a tracked flow.
    pub const PASS_NO_SERVICE: u32 = 2;
    /// ICMP/ICMPv6 other than an echo request to a VIP or an error about a tracked flow (or
    /// one whose quoted packet does not parse): passed to the stack untouched.
    pub const PASS_ICMP: u32 = 3;
    /// Bad header fields (IHL < 5, total length beyond the frame, TTL <= 1): passed untouched.
    pub const PASS_MALFORMED: u32 = 4;
    /// Translated and redirected out of the interface the FIB chose.
    pub const REDIRECT: u32 = 5;
    /// Translated and handed to the stack (FIB: not forwarded here, no neighbour, or the egress
    /// interface is not an XDP interface).
    pub const PASS_TRANSLATED: u32 = 6;
    /// Flow tracked in `SKIFF_XDP_CT` (new flow).
    pub const CT_NEW: u32 = 7;
    /// Flow found in `SKIFF_XDP_CT` (established).
    pub const CT_HIT: u32 = 8;
    /// Conntrack insert failed.
    pub const CT_ERR: u32 = 9;
    /// Reply translated back to the VIP.
    pub const REPLY: u32 = 10;
    /// Service hit but no endpoint (empty cluster, unhealthy, family mismatch).
    pub const NO_ENDPOINT: u32 = 11;
    /// IPv4 header with options (IHL > 5): passed untouched, not balanced.
    pub const PASS_IP_OPTIONS: u32 = 12;
    /// ICMP echo request (or ICMPv6 echo request) to a VIP answered at the driver (XDP_TX).
    pub const ICMP_ECHO_REPLY: u32 = 13;
    /// ICMP/ICMPv6 error for a VIP about a tracked flow's reply, translated and sent on to the
    /// flow's endpoint.
    pub const ICMP_ERROR_FORWARD: u32 = 14;
    /// ICMP/ICMPv6 error from the endpoint side about a tracked flow's packet, translated back
    /// to quote (and, when the endpoint sent it, come from) the VIP.
    pub const ICMP_ERROR_REPLY: u32 = 15;
    /// Number of counters.
    pub const COUNT: u32 = 16;
    /// Counter names, by index (in `/stats` as `skiff.xdp.<name>`).
    pub const NAMES: [&str; COUNT as usize] = [
        "pass_not_ip",
        "pass_fragment",
        "pass_no_service",
        "pass_icmp",
        "pass_malformed",
        "redirect",
        "pass_translated",
        "ct_new",
        "ct_hit",
        "ct_err",
        "reply",
        "no_endpoint",
        "pass_ip_options",
        "icmp_echo_reply",
        "icmp_error_forward",
        "icmp_error_reply",
    ];
}

/// The flow hash of a 5-tuple (source address words folded, ports, protocol) mixed with the
/// service as [`client_hash`] mixes a client with a service (splitmix64).
#[inline(always)]
pub fn flow_hash(
    src_be: &[u32; 4],
    sport_be: u16,
    proto: u8,
    vip_word_be: u32,
    port_be: u16,
) -> u64 {
    let src = src_be[0]
        ^ src_be[1].rotate_left(8)
        ^ src_be[2].rotate_left(16)
        ^ src_be[3].rotate_left(24);
    let client = u64::from(src) << 32 | u64::from(sport_be) << 16 | u64::from(proto);
    client_hash(client, vip_word_be, port_be)
}

/// The slot offset the XDP balancer picks for a new flow with hash `hash`: the cluster's Maglev
/// table when its policy is MAGLEV (built by `lb::maglev`, weights honoured), else a weighted
/// draw over `weight_end` keyed by the hash (per-flow stable, weights honoured).
#[inline(always)]
pub fn xdp_pick_slot(c: &ClusterValue, hash: u64, f: &impl SlotFacts) -> Option<u32> {
    if c.endpoint_count == 0 {
        return None;
    }
    if c.lb_policy == LB_MAGLEV {
        let d = Draws {
            client_hash: hash,
            ..Draws::default()
        };
        return pick_slot(c, &d, f);
    }
    if c.total_weight == 0 {
        return Some((hash % u64::from(c.endpoint_count)) as u32);
    }
    weighted_slot(
        c.endpoint_count,
        (hash % u64::from(c.total_weight)) as u32,
        f,
    )
}

/// Whether an ICMP (`v6` false) or ICMPv6 message type is an error that quotes the packet it
/// is about and is forwarded along that packet's flow: destination unreachable (IPv4: every
/// code, fragmentation needed included) and time exceeded; ICMPv6 also packet too big.
#[inline(always)]
pub const fn icmp_error_type(v6: bool, typ: u8) -> bool {
    if v6 {
        // Destination unreachable, packet too big, time exceeded.
        matches!(typ, 1..=3)
    } else {
        // Destination unreachable, time exceeded.
        matches!(typ, 3 | 11)
    }
}

/// One's-complement sum folded to 16 bits.
#[inline(always)]
pub const fn csum_fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// RFC 1624 incremental update of an Internet checksum `check` (as stored, network-order
/// bytes read as a native u16) when a 32-bit word changes from `from` to `to` (both as stored).
#[inline(always)]
pub const fn csum_replace4(check: u16, from: u32, to: u32) -> u16 {
    // HC' = ~(~HC + ~m + m'), summed in 16-bit halves. Byte order does not matter as long as
    // every operand is read the same way (one's-complement sums commute with byte swaps).
    let mut s: u32 = (!check) as u32;
    s += (!from & 0xffff) + (!from >> 16);
    s += (to & 0xffff) + (to >> 16);
    !csum_fold(s)
}

/// As [`csum_replace4`] for a 16-bit field.
#[inline(always)]
pub const fn csum_replace2(check: u16, from: u16, to: u16) -> u16 {
    let s: u32 = (!check) as u32 + (!from) as u32 + to as u32;
    !csum_fold(s)
}

/// The UDP checksum after an update: a computed 0 is sent as 0xffff (0 means "none" in IPv4).
#[inline(always)]
pub const fn udp_mangled(check: u16) -> u16 {
    if check == 0 { 0xffff } else { check }
}

impl XdpVipKey {
    /// The key of an IPv4 VIP.
    #[inline(always)]
    pub const fn v4(vip_be: u32, port_be: u16, proto: u8) -> Self {
        Self {
            addr_be: [vip_be, 0, 0, 0],
            port_be,
            proto,
            family: AF_INET as u8,
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), no padding bytes left uninitialised (explicit `_pad`, sizes asserted).
    unsafe impl aya::Pod for super::XdpFlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::XdpNat {}
    // SAFETY: as above (20 bytes, no implicit padding).
    unsafe impl aya::Pod for super::XdpVipKey {}
    // SAFETY: as above (20 bytes, explicit `_pad`).
    unsafe impl aya::Pod for super::XdpAddrKey {}
    // SAFETY: six u64, no padding.
    unsafe impl aya::Pod for super::XdpCounters {}
}

#[cfg(feature = "user")]
impl XdpAddrKey {
    /// The key of `ip`.
    pub fn new(ip: std::net::IpAddr) -> Self {
        let (family, addr_be) = match ip {
            std::net::IpAddr::V4(a) => (AF_INET, [u32::from_ne_bytes(a.octets()), 0, 0, 0]),
            std::net::IpAddr::V6(a) => {
                let o = a.octets();
                let mut w = [0u32; 4];
                for (i, c) in o.chunks_exact(4).enumerate() {
                    w[i] = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
                }
                (crate::AF_INET6, w)
            }
        };
        Self {
            addr_be,
            family: family as u8,
            _pad: [0; 3],
        }
    }

    /// The address (`None` for an unknown family).
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        crate_addr(self.family, &self.addr_be, 0).map(|a| a.ip())
    }
}

#[cfg(feature = "user")]
impl XdpNat {
    /// The address as a socket address (`None` for an unknown family).
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        crate_addr(self.family, &self.addr_be, self.port_be)
    }
}

#[cfg(feature = "user")]
impl XdpVipKey {
    /// The VIP as a socket address (`None` for an unknown family).
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        crate_addr(self.family, &self.addr_be, self.port_be)
    }
}

#[cfg(feature = "user")]
impl XdpFlowKey {
    /// Source and destination as socket addresses.
    pub fn addrs(&self) -> Option<(std::net::SocketAddr, std::net::SocketAddr)> {
        Some((
            crate_addr(self.family, &self.src_be, self.sport_be)?,
            crate_addr(self.family, &self.dst_be, self.dport_be)?,
        ))
    }
}

#[cfg(feature = "user")]
fn crate_addr(family: u8, addr_be: &[u32; 4], port_be: u16) -> Option<std::net::SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    let port = u16::from_be(port_be);
    match u32::from(family) {
        AF_INET => Some(SocketAddr::new(
            Ipv4Addr::from(u32::from_be(addr_be[0])).into(),
            port,
        )),
        crate::AF_INET6 => {
            let mut b = [0u8; 16];
            for (i, w) in addr_be.iter().enumerate() {
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(SocketAddr::new(Ipv6Addr::from(b).into(), port))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The full Internet checksum of `data` (big-endian 16-bit words), as stored.
    fn full(data: &[u8]) -> u16 {
        let mut s = 0u32;
        for c in data.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_be_bytes([c[0], 0])
            };
            s += u32::from(w);
        }
        (!csum_fold(s)).to_be()
    }

    #[test]
    fn incremental_update_matches_recompute() {
        let mut hdr = [
            0x45u8, 0, 0, 60, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 96, 0, 1,
        ];
        let c = full(&hdr);
        hdr[10..12].copy_from_slice(&c.to_ne_bytes());
        let old = u32::from_ne_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]);
        let new_bytes = [10u8, 1, 2, 3];
        let new = u32::from_ne_bytes(new_bytes);
        let upd = csum_replace4(c, old, new);
        hdr[16..20].copy_from_slice(&new_bytes);
        hdr[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(upd, full(&hdr));
        // A 16-bit field (a port) too.
        let old_p = u16::from_ne_bytes([hdr[0], hdr[1]]);
        let new_p = 0x4600u16.to_be();
        hdr[10..12].copy_from_slice(&upd.to_ne_bytes());
        let upd2 = csum_replace2(upd, old_p, new_p);
        hdr[0..2].copy_from_slice(&new_p.to_ne_bytes());
        hdr[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(upd2, full(&hdr));
    }

    #[test]
    fn flow_hash_differs_by_port_and_is_stable() {
        let a = flow_hash(&[1, 0, 0, 0], 1000u16.to_be(), 6, 7, 80u16.to_be());
        let b = flow_hash(&[1, 0, 0, 0], 1001u16.to_be(), 6, 7, 80u16.to_be());
        assert_ne!(a, b);
        assert_eq!(
            a,
            flow_hash(&[1, 0, 0, 0], 1000u16.to_be(), 6, 7, 80u16.to_be())
        );
    }

    struct Weights(&'static [u32]);
    impl SlotFacts for Weights {
        fn weight_end(&self, offset: u32) -> Option<u32> {
            self.0.get(offset as usize).copied()
        }
        fn load(&self, _: u32) -> u64 {
            0
        }
        fn maglev(&self, entry: u32) -> Option<u32> {
            Some(entry % 2)
        }
    }

    #[test]
    fn weighted_pick_honours_weights() {
        let c = ClusterValue {
            slot_base: 0,
            endpoint_count: 2,
            total_weight: 4,
            rr_stride: 1,
            maglev_base: 0,
            lb_policy: crate::LB_ROUND_ROBIN,
            flags: crate::CLUSTER_WEIGHTED,
            _pad: [0; 2],
        };
        let f = Weights(&[1, 4]);
        let mut n = [0u32; 2];
        for port in 0..4000u16 {
            let h = flow_hash(&[1, 0, 0, 0], port.to_be(), 6, 7, 80);
            n[xdp_pick_slot(&c, h, &f).unwrap() as usize] += 1;
        }
        // weights 1:3
        assert!(n[0] > 800 && n[0] < 1200, "{n:?}");
        let m = ClusterValue {
            lb_policy: LB_MAGLEV,
            ..c
        };
        assert!(xdp_pick_slot(&m, 5, &f).is_some());
        let empty = ClusterValue {
            endpoint_count: 0,
            ..c
        };
        assert_eq!(xdp_pick_slot(&empty, 5, &f), None);
    }

    #[test]
    fn reply_key_swaps_the_endpoint_and_the_client() {
        let fwd = XdpFlowKey {
            src_be: [1, 0, 0, 0],
            dst_be: [9, 0, 0, 0],
            sport_be: 1000,
            dport_be: 80,
            proto: 6,
            family: AF_INET as u8,
            _pad: [0; 2],
        };
        let ep = XdpNat {
            addr_be: [5, 0, 0, 0],
            port_be: 8080,
            family: AF_INET as u8,
            _pad: 0,
        };
        let r = fwd.reply_of(&ep);
        assert_eq!((r.src_be, r.sport_be), ([5, 0, 0, 0], 8080));
        assert_eq!((r.dst_be, r.dport_be), ([1, 0, 0, 0], 1000));
        assert_eq!((r.proto, r.family), (6, AF_INET as u8));
    }

    #[test]
    fn only_errors_that_quote_a_flow_are_forwarded() {
        assert!(icmp_error_type(false, 3) && icmp_error_type(false, 11));
        assert!(!icmp_error_type(false, 8) && !icmp_error_type(false, 0));
        assert!(!icmp_error_type(false, 5) && !icmp_error_type(false, 12));
        assert!(icmp_error_type(true, 1) && icmp_error_type(true, 2) && icmp_error_type(true, 3));
        assert!(!icmp_error_type(true, 4) && !icmp_error_type(true, 128));
        assert!(!icmp_error_type(true, 135));
    }

    #[test]
    fn every_counter_has_a_name() {
        assert_eq!(stat::NAMES.len(), stat::COUNT as usize);
    }
}
