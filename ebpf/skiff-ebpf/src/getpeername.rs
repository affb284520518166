//! `cgroup/getpeername4` and `cgroup/getpeername6`: an app whose connect was rewritten (to an endpoint by the fast path,
//! or to the proxy) sees the address it connected to, as it would behind iptables DNAT.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use skiff_common::{AF_INET, AF_INET6, reason, v4_mapped_word};

use crate::{
    ctx::SockAddr,
    maps::{SKIFF_PEER, count},
};

/// getpeername programs must return 1.
const PROCEED: i32 = 1;

#[cgroup_sock_addr(getpeername4)]
pub fn skiff_peername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the helper reads the context's socket pointer; null when nothing was stored.
    let p = unsafe { SKIFF_PEER.get_ptr_mut(&ctx) };
    if p.is_null() {
        return PROCEED;
    }
    // SAFETY: non-null storage of this socket; copied out at once.
    let orig = unsafe { *p };
    if u32::from(orig.family) == AF_INET {
        SockAddr(&ctx).set_dst4(orig.ip_be[0], orig.port_be);
        count(reason::PEERNAME_V4);
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn skiff_peername6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the helper reads the context's socket pointer; null when nothing was stored.
    let p = unsafe { SKIFF_PEER.get_ptr_mut(&ctx) };
    if p.is_null() {
        return PROCEED;
    }
    // SAFETY: non-null storage of this socket; copied out at once.
    let orig = unsafe { *p };
    match u32::from(orig.family) {
        AF_INET6 => SockAddr(&ctx).set_dst6(orig.ip_be, orig.port_be),
        // An AF_INET6 socket that connected to `::ffff:<VIP>`.
        AF_INET => SockAddr(&ctx).set_dst6([0, 0, v4_mapped_word(), orig.ip_be[0]], orig.port_be),
        _ => return PROCEED,
    }
    count(reason::PEERNAME_V6);
    PROCEED
}
