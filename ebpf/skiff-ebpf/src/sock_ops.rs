//! `sock_ops`: moves a captured connect's original destination from its socket cookie to
//! its connection tuple once the tuple exists, and deletes it when the socket closes.

use aya_ebpf::bindings::BPF_NOEXIST;
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    macros::sock_ops,
    programs::SockOpsContext,
};
use aya_log_ebpf::error;
use skiff_common::{AF_INET, AF_INET6, ConnKey, EndpointLoad, is_v4_mapped, reason};

use crate::{
    ctx::SockOps,
    maps::{SKIFF_COOKIE, SKIFF_EP_ACTIVE, SKIFF_FAST_SK, SKIFF_ORIG_DST, atomic_add, count},
};

/// sock_ops ignores the return value unless a reply is requested; 1 is the convention.
const DONE: u32 = 1;

/// Named `skiff_sock_ops`, not `sockops`: that is the ELF section name and bpf-linker would
/// see a duplicate symbol.
#[sock_ops]
pub fn skiff_sock_ops(ctx: SockOpsContext) -> u32 {
    if let Err(why) = try_sock_ops(&ctx) {
        count(why);
    }
    DONE
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), u32> {
    match ctx.op() {
        // The tuple is bound and the SYN not sent yet. A refused connect never reaches
        // ACTIVE_ESTABLISHED, so re-keying here is what lets TCP_CLOSE clean every entry.
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            crate::sockmap::on_established(ctx);
            Ok(())
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            let so = SockOps(ctx);
            if release_fast(&so) {
                return Ok(());
            }
            if let Some(key) = conn_key(&so)
                && SKIFF_ORIG_DST.remove(key).is_ok()
            {
                count(reason::CLOSED);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn on_connect(ctx: &SockOpsContext) -> Result<(), u32> {
    let so = SockOps(ctx);
    let cookie = so.socket_cookie();
    // Not captured by connect4/6: a fast-path socket is counted against its endpoint;
    // anything else needs nothing, and no state callbacks.
    let Some(orig) = SKIFF_COOKIE.get_ptr(cookie) else {
        track_fast(ctx, cookie);
        return Ok(());
    };
    // SAFETY: pointer from a successful lookup; the value is copied out at once.
    let orig = unsafe { *orig };
    let _ = SKIFF_COOKIE.remove(cookie);
    let Some(key) = conn_key(&so) else {
        return Ok(());
    };
    if SKIFF_ORIG_DST.insert(key, orig, 0).is_err() {
        error!(ctx, "skiff: orig-dst tuple insert failed");
        return Err(reason::ERR_TUPLE_INSERT);
    }
    // Ask for state callbacks so TCP_CLOSE can delete the entry (this call replaces all
    // flags, so keep the ones already set).
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    count(reason::REKEYED);
    Ok(())
}

/// A fast-path socket (connect4 sent it straight to an endpoint) starts counting against that
/// endpoint's load, until TCP_CLOSE.
#[inline(always)]
fn track_fast(ctx: &SockOpsContext, cookie: u64) {
    // SAFETY: the value is copied out at once.
    let Some(ep) = (unsafe { SKIFF_FAST_SK.get(cookie) }).copied() else {
        return;
    };
    let p = match SKIFF_EP_ACTIVE.get_ptr_mut(ep) {
        Some(p) => p,
        None => {
            // First connection to this endpoint (or its entry aged out). Another CPU may insert
            // at the same time: NOEXIST keeps whichever came first.
            let _ = SKIFF_EP_ACTIVE.insert(ep, EndpointLoad::default(), u64::from(BPF_NOEXIST));
            match SKIFF_EP_ACTIVE.get_ptr_mut(ep) {
                Some(p) => p,
                None => {
                    count(reason::ERR_FAST_TRACK);
                    let _ = SKIFF_FAST_SK.remove(cookie);
                    return;
                }
            }
        }
    };
    // SAFETY: pointer from a successful lookup into a map value that lives as long as the
    // element; connects and closes on other CPUs update it too, hence atomic adds.
    unsafe {
        atomic_add(&raw mut (*p).active, 1);
        atomic_add(&raw mut (*p).total, 1);
    }
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    count(reason::FAST_TRACKED);
}

/// At TCP_CLOSE: a tracked fast-path socket stops counting against its endpoint. Returns
/// whether the socket was one.
#[inline(always)]
fn release_fast(so: &SockOps<'_>) -> bool {
    let cookie = so.socket_cookie();
    // SAFETY: the value is copied out at once.
    let Some(ep) = (unsafe { SKIFF_FAST_SK.get(cookie) }).copied() else {
        return false;
    };
    let _ = SKIFF_FAST_SK.remove(cookie);
    if let Some(p) = SKIFF_EP_ACTIVE.get_ptr_mut(ep) {
        // SAFETY: as in `track_fast`. Adding u64::MAX is subtracting one.
        unsafe {
            atomic_add(&raw mut (*p).active, u64::MAX);
        }
    }
    count(reason::FAST_RELEASED);
    true
}

/// The key getsockopt will build from the accepted socket: client = our local end,
/// listener = our remote end. v4-mapped tuples are normalised to IPv4.
#[inline(always)]
fn conn_key(so: &SockOps<'_>) -> Option<ConnKey> {
    let netns = so.netns_cookie();
    let client_port = so.local_port_be();
    let listener_port = so.remote_port_be();
    match so.family() {
        AF_INET => Some(ConnKey::v4(
            netns,
            so.local_ip4_be(),
            client_port,
            so.remote_ip4_be(),
            listener_port,
        )),
        AF_INET6 => {
            let remote = so.remote_ip6_be();
            if is_v4_mapped(remote) {
                let local = so.local_ip6_be();
                Some(ConnKey::v4(
                    netns,
                    local[3],
                    client_port,
                    remote[3],
                    listener_port,
                ))
            } else {
                Some(ConnKey::v6(
                    netns,
                    so.local_ip6_be(),
                    client_port,
                    remote,
                    listener_port,
                ))
            }
        }
        _ => None,
    }
}
