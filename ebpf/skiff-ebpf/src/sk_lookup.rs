//! `sk_lookup`: inbound capture without iptables. Attached to the pod's network namespace, it
//! runs when a TCP SYN for a local address finds no established socket, and assigns the
//! proxy's inbound listener (from `SKIFF_IN_LSN`) to connections for the pod's addresses.
//! The accepted socket keeps the original destination as its local address, so the proxy needs
//! no getsockopt. Context quirks: `local_port` host order, `remote_port` network order,
//! addresses network order.

use core::ptr::read_volatile;

use aya_ebpf::{
    macros::{map, sk_lookup},
    maps::{HashMap, PerCpuArray, SockMap},
    programs::SkLookupContext,
};
use skiff_common::{
    AF_INET, AF_INET6, IPPROTO_TCP,
    inbound::{InboundPortKey, LISTENER_V4, LISTENER_V6, PodIpKey, Steer, stat, steer},
    is_local_v4, is_local_v6,
};

/// The proxy's inbound listeners. Key: u32 slot (`LISTENER_V4`, `LISTENER_V6`); value: socket;
/// max 2. Writer: userspace (`bpf::inbound`). Readers: skiff_sk_lookup.
#[map]
pub static SKIFF_IN_LSN: SockMap = SockMap::with_max_entries(2, 0);

/// The pod's addresses. Key: `PodIpKey`; value: u8 (1); max 64; not LRU.
/// Writer: userspace (`bpf::inbound`). Readers: skiff_sk_lookup.
#[map]
pub static SKIFF_POD_IPS: HashMap<PodIpKey, u8> = HashMap::with_max_entries(64, 0);

/// Destination ports never steered (excludeInboundPorts). Key: `InboundPortKey`; value: u8 (1);
/// max 1024; not LRU. Writer: userspace (`bpf::inbound`). Readers: skiff_sk_lookup.
#[map]
pub static SKIFF_IN_EXCL: HashMap<InboundPortKey, u8> = HashMap::with_max_entries(1024, 0);

/// Inbound counters by `skiff_common::inbound::stat`. Writer: skiff_sk_lookup. Readers:
/// userspace `/stats`.
#[map]
pub static SKIFF_IN_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// sk_lookup verdict: continue (with or without an assigned socket).
const SK_PASS: u32 = 1;

fn bump(i: u32) {
    if let Some(p) = SKIFF_IN_STATS.get_ptr_mut(i) {
        // SAFETY: pointer from a successful per-CPU array lookup; not shared across CPUs.
        unsafe { *p += 1 }
    }
}

#[sk_lookup]
pub fn skiff_sk_lookup(ctx: SkLookupContext) -> u32 {
    try_steer(&ctx);
    // Always continue: an unsteered or failed lookup proceeds as if the program were absent.
    SK_PASS
}

#[inline(always)]
fn words(p: *const [u32; 4]) -> [u32; 4] {
    // SAFETY: `p` points into the verifier-checked context; one 4-byte load per word.
    unsafe {
        [
            read_volatile(&raw const (*p)[0]),
            read_volatile(&raw const (*p)[1]),
            read_volatile(&raw const (*p)[2]),
            read_volatile(&raw const (*p)[3]),
        ]
    }
}

fn is_pod(key: &PodIpKey) -> bool {
    // SAFETY: the value is only tested for presence.
    unsafe { SKIFF_POD_IPS.get(key).is_some() }
}

fn try_steer(ctx: &SkLookupContext) {
    let l = ctx.lookup;
    // SAFETY: the context pointer is valid for the program's run; scalar fields.
    let (family, protocol, port_host) = unsafe {
        (
            read_volatile(&raw const (*l).family),
            read_volatile(&raw const (*l).protocol),
            read_volatile(&raw const (*l).local_port),
        )
    };
    if protocol != IPPROTO_TCP {
        return;
    }
    let (dst, src_local, slot) = if family == AF_INET {
        // SAFETY: as above.
        let (dst_be, src_be) = unsafe {
            (
                read_volatile(&raw const (*l).local_ip4),
                read_volatile(&raw const (*l).remote_ip4),
            )
        };
        let src = PodIpKey::v4(src_be);
        (
            PodIpKey::v4(dst_be),
            is_local_v4(src_be) || is_pod(&src),
            LISTENER_V4,
        )
    } else if family == AF_INET6 {
        // SAFETY: as above.
        let (dst_be, src_be) = unsafe {
            (
                words(&raw const (*l).local_ip6),
                words(&raw const (*l).remote_ip6),
            )
        };
        let src = PodIpKey::v6(src_be);
        (
            PodIpKey::v6(dst_be),
            is_local_v6(src_be) || is_pod(&src),
            LISTENER_V6,
        )
    } else {
        return;
    };
    // SAFETY: presence test only.
    let excluded = unsafe {
        SKIFF_IN_EXCL
            .get(InboundPortKey::new(port_host as u16))
            .is_some()
    };
    match steer(is_pod(&dst), src_local, excluded) {
        Steer::Pass(why) => bump(why),
        Steer::ToProxy => match SKIFF_IN_LSN.redirect_sk_lookup(ctx, slot, 0) {
            Ok(()) => bump(stat::STEERED),
            Err(_) => bump(stat::NO_LISTENER),
        },
    }
}
