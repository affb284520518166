//! `cgroup/getsockopt`: answers `SO_ORIGINAL_DST` (SOL_IP) and `IP6T_SO_ORIGINAL_DST`
//! (SOL_IPV6) on the proxy's accepted sockets exactly as iptables REDIRECT would.
//!
//! Runs for the SOCKET's cgroup: attach it to the proxy's cgroup and create the listener
//! after joining it (accepted sockets inherit the listener's cgroup). Only sockets whose local
//! port is the configured outbound port are answered; every other getsockopt passes through
//! untouched.

use core::ptr::write_volatile;

use aya_ebpf::{macros::cgroup_sockopt, programs::SockoptContext};
use skiff_common::{
    AF_INET, AF_INET6, ConnKey, ENOENT, OrigDstValue, SO_ORIGINAL_DST, SOL_IP, SOL_IPV6,
    is_v4_mapped, reason, v4_mapped_word,
};

use crate::{
    ctx::Sockopt,
    maps::{SKIFF_ORIG_DST, config, count},
};

/// A cgroup sockopt program must return 1; 0 would turn every call into EPERM.
const PROCEED: i32 = 1;

const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;

#[cgroup_sockopt(getsockopt)]
pub fn skiff_orig_dst(ctx: SockoptContext) -> i32 {
    if let Err(why) = try_getsockopt(&ctx) {
        count(why);
    }
    PROCEED
}

fn try_getsockopt(ctx: &SockoptContext) -> Result<(), u32> {
    let so = Sockopt(ctx);
    let level = so.level();
    if so.optname() != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6) {
        return Ok(());
    }
    let cfg = config().ok_or(reason::ERR_NO_CONFIG)?;
    let Some(key) = proxy_conn_key(&so, cfg.outbound_port4_host, cfg.outbound_port6_host) else {
        // Not one of the proxy's outbound sockets: leave the kernel's answer alone.
        return Ok(());
    };
    let Some(orig) = SKIFF_ORIG_DST.get_ptr(key) else {
        // The same answer as a conntrack miss; written explicitly because a kernel without
        // nf_conntrack would say ENOPROTOOPT.
        so.set_error(ENOENT);
        count(reason::ORIG_DST_MISS);
        return Ok(());
    };
    // SAFETY: pointer from a successful lookup; copied out at once.
    let orig = unsafe { *orig };
    let family = u32::from(orig.family);
    if level == SOL_IP && family == AF_INET {
        answer_v4(&so, &orig)
    } else if level == SOL_IPV6 && family == AF_INET6 {
        answer_v6(&so, orig.ip_be, orig.port_be)
    } else if level == SOL_IPV6 && family == AF_INET {
        // An IPv6 caller asking about an IPv4 destination gets the v4-mapped form.
        answer_v6(&so, [0, 0, v4_mapped_word(), orig.ip_be[0]], orig.port_be)
    } else {
        so.set_error(ENOENT);
        count(reason::ORIG_DST_MISS);
        Ok(())
    }
}

/// The accepted socket's key if its local port is the proxy's outbound port.
#[inline(always)]
fn proxy_conn_key(so: &Sockopt<'_>, port4_host: u16, port6_host: u16) -> Option<ConnKey> {
    let local_port = so.local_port_host();
    let netns = so.netns_cookie();
    match so.family() {
        AF_INET if local_port == port4_host => Some(ConnKey::v4(
            netns,
            so.remote_ip4_be(),
            so.remote_port_be(),
            so.local_ip4_be(),
            so.local_port_be(),
        )),
        AF_INET6 => {
            let remote = so.remote_ip6_be();
            if is_v4_mapped(remote) {
                // A dual-stack listener accepting IPv4: normalised like sock_ops does.
                if local_port != port4_host {
                    return None;
                }
                let local = so.local_ip6_be();
                Some(ConnKey::v4(
                    netns,
                    remote[3],
                    so.remote_port_be(),
                    local[3],
                    so.local_port_be(),
                ))
            } else if port6_host != 0 && local_port == port6_host {
                Some(ConnKey::v6(
                    netns,
                    remote,
                    so.remote_port_be(),
                    so.local_ip6_be(),
                    so.local_port_be(),
                ))
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Writes a `sockaddr_in` (family host order, port and address network order, 8 zero bytes).
#[inline(always)]
fn answer_v4(so: &Sockopt<'_>, orig: &OrigDstValue) -> Result<(), u32> {
    let Some(buf) = so.optval::<SOCKADDR_IN_LEN>() else {
        count(reason::ORIG_DST_SHORT_BUF);
        return Ok(());
    };
    let p = buf as *mut u32;
    // SAFETY: `optval` checked to hold 16 bytes; the kernel buffer is word aligned.
    unsafe {
        write_volatile(p, family_and_port(AF_INET, orig.port_be));
        write_volatile(p.add(1), orig.ip_be[0]);
        write_volatile(p.add(2), 0);
        write_volatile(p.add(3), 0);
    }
    so.set_answer_len(SOCKADDR_IN_LEN as i32);
    count(reason::ORIG_DST_V4);
    Ok(())
}

/// Writes a `sockaddr_in6` (family, port, flowinfo 0, address, scope id 0).
#[inline(always)]
fn answer_v6(so: &Sockopt<'_>, ip_be: [u32; 4], port_be: u16) -> Result<(), u32> {
    let Some(buf) = so.optval::<SOCKADDR_IN6_LEN>() else {
        count(reason::ORIG_DST_SHORT_BUF);
        return Ok(());
    };
    let p = buf as *mut u32;
    // SAFETY: `optval` checked to hold 28 bytes; the kernel buffer is word aligned.
    unsafe {
        write_volatile(p, family_and_port(AF_INET6, port_be));
        write_volatile(p.add(1), 0);
        write_volatile(p.add(2), ip_be[0]);
        write_volatile(p.add(3), ip_be[1]);
        write_volatile(p.add(4), ip_be[2]);
        write_volatile(p.add(5), ip_be[3]);
        write_volatile(p.add(6), 0);
    }
    so.set_answer_len(SOCKADDR_IN6_LEN as i32);
    count(reason::ORIG_DST_V6);
    Ok(())
}

/// The first word of a sockaddr: `sa_family` (host-order u16) then the network-order port,
/// as they lie in memory on this little-endian target.
#[inline(always)]
fn family_and_port(family: u32, port_be: u16) -> u32 {
    family | (u32::from(port_be) << 16)
}
