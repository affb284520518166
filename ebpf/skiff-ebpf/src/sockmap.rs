//! `--sockmap`: local socket pairs whose payload skips the loopback TCP stack.
//!
//! At connection establishment `sock_ops` calls [`on_established`]: when the pair's port policy
//! matches (`SKIFF_ACCEL_PORT`: a port of either end, or the original destination port of a
//! captured connect), the socket joins `SKIFF_SOCKS` under its own tuple. `skiff_sk_msg` runs on
//! every send of such a socket and moves the message straight into the peer socket's receive
//! queue when the peer (the reversed tuple) is in the map too; otherwise the message takes the
//! normal TCP path. Sockets leave the map by themselves when they close.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, BPF_F_INGRESS, sk_action::SK_PASS},
    helpers::bpf_get_netns_cookie,
    macros::{map, sk_msg},
    maps::{HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};
use core::ptr::read_volatile;
use skiff_common::{
    AF_INET, AF_INET6, ConnKey, is_v4_mapped,
    sockmap::{AccelPortKey, remote_port_be, stat},
};

use crate::maps::SKIFF_ORIG_DST;

/// Accelerated sockets. Key: `ConnKey` built from the socket's own view (client = local end,
/// listener = remote end); value: the socket; max 65536. Writer: sock_ops (at establishment);
/// the kernel removes closed sockets. Readers: skiff_sk_msg (peer lookup, redirect).
#[map]
pub static SKIFF_SOCKS: SockHash<ConnKey> = SockHash::with_max_entries(65536, 0);

/// Ports whose local pairs are accelerated. Key: `AccelPortKey`; value: u8 (1); max 1024; not LRU.
/// Empty (the default) disables acceleration. Writer: userspace loader. Readers: sock_ops.
#[map]
pub static SKIFF_ACCEL_PORT: HashMap<AccelPortKey, u8> = HashMap::with_max_entries(1024, 0);

/// Accelerated sockets that sent a message before their peer joined `SKIFF_SOCKS` (a narrow
/// race at establishment). Such a socket never redirects again: bytes already queued on the
/// TCP path would otherwise be overtaken by redirected ones. Key: the socket's own `ConnKey`;
/// value: u8 (1); max 65536; LRU. Writer and reader: skiff_sk_msg.
#[map]
pub static SKIFF_SOCK_TCP: LruHashMap<ConnKey, u8> = LruHashMap::with_max_entries(65536, 0);

/// Sockmap counters. Key: u32 `skiff_common::sockmap::stat::*`; value: u64 per CPU.
/// Writer: sock_ops, skiff_sk_msg. Readers: userspace (`/stats`).
#[map]
pub static SKIFF_SOCKMAP_ST: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

#[inline(always)]
fn bump(i: u32) {
    if let Some(p) = SKIFF_SOCKMAP_ST.get_ptr_mut(i) {
        // SAFETY: per-CPU slot from a successful lookup; no concurrent writer on this CPU.
        unsafe { *p += 1 }
    }
}

#[inline(always)]
fn accelerated_port(port_be: u16) -> bool {
    let key = AccelPortKey::new(u16::from_be(port_be));
    // SAFETY: plain lookup; the value is not dereferenced.
    unsafe { SKIFF_ACCEL_PORT.get(key) }.is_some()
}

/// The socket's key as `ConnKey` (client = this end) and the same connection seen from the
/// other end; v4-mapped IPv6 is normalised to v4 as the capture maps do.
#[inline(always)]
fn keys(
    netns: u64,
    family: u32,
    local: [u32; 4],
    remote: [u32; 4],
    local_port_be: u16,
    remote_port_be: u16,
) -> Option<(ConnKey, ConnKey)> {
    let v4 = |l: u32, r: u32| {
        (
            ConnKey::v4(netns, l, local_port_be, r, remote_port_be),
            ConnKey::v4(netns, r, remote_port_be, l, local_port_be),
        )
    };
    match family {
        AF_INET => Some(v4(local[0], remote[0])),
        AF_INET6 if is_v4_mapped(remote) => Some(v4(local[3], remote[3])),
        AF_INET6 => Some((
            ConnKey::v6(netns, local, local_port_be, remote, remote_port_be),
            ConnKey::v6(netns, remote, remote_port_be, local, local_port_be),
        )),
        _ => None,
    }
}

/// Called by sock_ops at ACTIVE_/PASSIVE_ESTABLISHED_CB: add the socket when its pair is
/// accelerated by policy.
#[inline(always)]
pub fn on_established(ctx: &SockOpsContext) {
    let so = crate::ctx::SockOps(ctx);
    let family = so.family();
    let (local, remote) = if family == AF_INET {
        ([so.local_ip4_be(), 0, 0, 0], [so.remote_ip4_be(), 0, 0, 0])
    } else {
        (so.local_ip6_be(), so.remote_ip6_be())
    };
    let local_port = so.local_port_be();
    let remote_port = so.remote_port_be();
    let Some((mut own, peer)) = keys(
        so.netns_cookie(),
        family,
        local,
        remote,
        local_port,
        remote_port,
    ) else {
        return;
    };
    // A captured connect's pair is app <-> proxy listener; policy speaks of the service port,
    // which only the recorded original destination knows (keyed by the client's view).
    let orig_port = |k: &ConnKey| {
        // SAFETY: lookup result copied out at once.
        unsafe { SKIFF_ORIG_DST.get(k) }.map(|v| v.port_be)
    };
    let wanted = accelerated_port(local_port)
        || accelerated_port(remote_port)
        || orig_port(&own).is_some_and(accelerated_port)
        || orig_port(&peer).is_some_and(accelerated_port);
    if !wanted {
        return;
    }
    // SAFETY: the sock_ops context is valid for this run; the helper only reads it.
    let ops = unsafe { &mut *ctx.ops };
    match SKIFF_SOCKS.update(&mut own, ops, u64::from(BPF_ANY)) {
        Ok(()) => bump(stat::ADDED),
        Err(_) => bump(stat::ADD_FAILED),
    }
}

/// Runs on every sendmsg of an accelerated socket: redirect to the peer's ingress queue.
#[sk_msg]
pub fn skiff_sk_msg(ctx: SkMsgContext) -> u32 {
    let md = ctx.msg;
    // SAFETY: context fields, one 4-byte load each.
    let (family, remote_raw, local_port_host) = unsafe {
        (
            read_volatile(&raw const (*md).family),
            read_volatile(&raw const (*md).remote_port),
            read_volatile(&raw const (*md).local_port),
        )
    };
    let (local, remote) = if family == AF_INET {
        // SAFETY: as above.
        unsafe {
            (
                [read_volatile(&raw const (*md).local_ip4), 0, 0, 0],
                [read_volatile(&raw const (*md).remote_ip4), 0, 0, 0],
            )
        }
    } else {
        // SAFETY: as above, word by word.
        unsafe {
            (
                [
                    read_volatile(&raw const (*md).local_ip6[0]),
                    read_volatile(&raw const (*md).local_ip6[1]),
                    read_volatile(&raw const (*md).local_ip6[2]),
                    read_volatile(&raw const (*md).local_ip6[3]),
                ],
                [
                    read_volatile(&raw const (*md).remote_ip6[0]),
                    read_volatile(&raw const (*md).remote_ip6[1]),
                    read_volatile(&raw const (*md).remote_ip6[2]),
                    read_volatile(&raw const (*md).remote_ip6[3]),
                ],
            )
        }
    };
    // SAFETY: helper call with the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some((own, mut peer)) = keys(
        netns,
        family,
        local,
        remote,
        (local_port_host as u16).to_be(),
        remote_port_be(remote_raw),
    ) else {
        return SK_PASS;
    };
    // SAFETY: plain lookup; the value is not dereferenced.
    if unsafe { SKIFF_SOCK_TCP.get(own) }.is_some() {
        return SK_PASS;
    }
    // On a miss the helper returns SK_DROP; pass instead so the bytes take the TCP path, and
    // keep this socket on it from now on.
    if SKIFF_SOCKS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        bump(stat::REDIRECTED);
    } else {
        let _ = SKIFF_SOCK_TCP.insert(own, 1, 0);
        bump(stat::NO_PEER);
    }
    SK_PASS
}
