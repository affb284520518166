//! Sockmap acceleration ABI (`--sockmap`): which local socket pairs have their payload moved
//! socket-to-socket by `sk_msg` instead of through the loopback TCP stack.
//!
//! A pair is accelerated only when one of its ports (or the original destination port of a
//! captured connect) is in `SKIFF_ACCEL_PORT`. The choice is made once, when the connection is
//! established, and holds for the socket's life: switching a live socket between redirected
//! and normal delivery could reorder its bytes.

/// Key of `SKIFF_ACCEL_PORT`: a service port whose local socket pairs are accelerated.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AccelPortKey {
    /// Port, host order.
    pub port_host: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<AccelPortKey>() == 4);

impl AccelPortKey {
    /// The key for `port` (host order).
    #[inline(always)]
    pub const fn new(port_host: u16) -> Self {
        Self { port_host, _pad: 0 }
    }
}

/// Indices of the per-CPU `SKIFF_SOCKMAP_ST` counters.
pub mod stat {
    /// A socket was added to `SKIFF_SOCKS` at connection establishment.
    pub const ADDED: u32 = 0;
    /// `bpf_sock_hash_update` failed (map full, or a socket state the kernel refuses).
    pub const ADD_FAILED: u32 = 1;
    /// An `sk_msg` was redirected to its peer's ingress queue.
    pub const REDIRECTED: u32 = 2;
    /// An `sk_msg` found no peer in the map (remote end not local or not accelerated) and
    /// went through the TCP stack.
    pub const NO_PEER: u32 = 3;
    /// Number of counters.
    pub const COUNT: u32 = 4;
    /// Counter names, by index (in `/stats` as `skiff.bpf.<name>`).
    pub const NAMES: [&str; COUNT as usize] = [
        "sockmap.added",
        "sockmap.add_failed",
        "sockmap.redirected",
        "sockmap.no_peer",
    ];
}

/// The remote port of an `sk_msg_md`/`bpf_sock_ops` context as network order.
///
/// Kernels store it as a network-order u16 shifted into the high half of the u32 on
/// little-endian machines (sock_ops always did; sk_msg follows it). A real port is never 0, so
/// a value above 0xffff can only be the shifted form; otherwise the port is in the low half.
#[inline(always)]
pub const fn remote_port_be(raw: u32) -> u16 {
    if raw > 0xffff {
        (raw >> 16) as u16
    } else {
        raw as u16
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), no padding bytes left uninitialised (explicit `_pad`).
    unsafe impl aya::Pod for super::AccelPortKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_port_reads_both_layouts() {
        let be = 8080u16.to_be();
        assert_eq!(remote_port_be(u32::from(be) << 16), be);
        assert_eq!(remote_port_be(u32::from(be)), be);
        // Port 1 in network order is 0x0100 on little-endian: still below the shifted range.
        let one = 1u16.to_be();
        assert_eq!(remote_port_be(u32::from(one) << 16), one);
    }

    #[test]
    fn every_counter_has_a_name() {
        assert_eq!(stat::NAMES.len(), stat::COUNT as usize);
    }
}
