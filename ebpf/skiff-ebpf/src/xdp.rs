//! `skiff_xdp` (`--xdp IFACE`): node-ingress L4 load balancer at the driver.
//!
//! A packet for a fast-path service (node scope, `SKIFF_SVC4_V2` / `SKIFF_SVC6_V2`, TCP or UDP)
//! is DNATed to an endpoint of the service's cluster in the active generation, chosen by the
//! flow hash (Maglev table for MAGLEV clusters, else a weighted hash draw; see
//! `skiff_common::xdp::xdp_pick_slot`) and remembered in `SKIFF_XDP_CT`, so the flow keeps its
//! endpoint when the endpoint set changes. A reply from an endpoint of a tracked flow (the same
//! program attached to the interfaces facing the endpoints) is SNATed back to the VIP through
//! `SKIFF_XDP_RCT`. After a rewrite the FIB decides: a forwarded route out of an interface in
//! `SKIFF_XDP_TX` is redirected there (MACs rewritten, TTL decremented); anything else goes to
//! the stack translated (XDP_PASS), which forwards it itself.
//!
//! An ICMP echo request (ICMPv6 echo request) to a VIP of a node-scope fast-path service, by
//! address alone (`SKIFF_XDP_VIP`, written by userspace from the applied fast path), is
//! answered at the driver as Katran and Cilium do: MACs and addresses swapped, type echo reply,
//! TTL / hop limit 64, checksums updated incrementally (ICMPv6's pseudo-header sum does not
//! change when the addresses swap), sent back out of the same interface (XDP_TX).
//!
//! An ICMP error about a tracked flow (IPv4 destination unreachable, fragmentation needed
//! included, and time exceeded; ICMPv6 destination unreachable, packet too big and time
//! exceeded) follows the flow, as in Linux's NAT: one sent to the VIP about a reply (quoting
//! VIP:port -> client) goes to the flow's endpoint with the outer destination and the quoted
//! source rewritten to the endpoint; one from the endpoint side about a forwarded packet
//! (quoting client -> endpoint) goes to the client quoting the VIP, and from the VIP when the
//! endpoint itself sent it. Without that, path MTU discovery breaks for balanced flows (the
//! VIP is on no interface, so the stack drops the error). The outer IPv4 header checksum, the
//! quoted header's checksum, the quoted L4 checksum when quoted, and the ICMP checksum (over
//! the quoted bytes; ICMPv6's pseudo-header too) are updated incrementally.
//!
//! Everything else passes untouched: non-IP, fragments (later fragments carry no ports), every
//! other ICMP (the stack answers or drops it), IPv6 extension headers, malformed headers.
//! VLAN-tagged frames are translated but always passed to the stack (the redirect would keep
//! the tag on another interface).

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::generated::bpf_fib_lookup as fib_lookup,
    macros::{map, xdp},
    maps::{DevMapHash, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray},
    programs::XdpContext,
};
use skiff_common::{
    AF_INET, AF_INET6, ClusterValue, EndpointKey, EndpointValue, HEALTH_OK, IPPROTO_TCP,
    IPPROTO_UDP, NO_CLUSTER, NODE_SCOPE, ServiceKeyV4, ServiceKeyV6, ServiceValue, SlotFacts,
    xdp::{
        XdpAddrKey, XdpCounters, XdpFlowKey, XdpNat, XdpVipKey, csum_replace2, csum_replace4,
        flow_hash, icmp_error_type, stat, udp_mangled, xdp_pick_slot,
    },
};

use crate::maps::{
    SKIFF_CLUSTERS, SKIFF_ENDPOINTS, SKIFF_MAGLEV, SKIFF_SVC4_V2, SKIFF_SVC6_V2, config,
};

/// Forward conntrack: client -> VIP flow to the endpoint it was given. Key: `XdpFlowKey`
/// (client source, VIP destination); value: `XdpNat` (endpoint); max 65536 ; LRU. Writer: skiff_xdp (insert on a new flow); userspace deletes entries
/// of endpoints the fast path no longer serves. Readers: skiff_xdp; userspace (`skiff maps`).
#[map]
pub static SKIFF_XDP_CT: LruHashMap<XdpFlowKey, XdpNat> = LruHashMap::with_max_entries(65536, 0);

/// Reverse conntrack: endpoint -> client replies to the VIP they must come from. Key:
/// `XdpFlowKey` (endpoint source, client destination); value: `XdpNat` (VIP); max 65536; LRU.
/// Writer: skiff_xdp (with the forward entry); userspace (as above). Readers: skiff_xdp.
#[map]
pub static SKIFF_XDP_RCT: LruHashMap<XdpFlowKey, XdpNat> = LruHashMap::with_max_entries(65536, 0);

/// Interfaces a translated packet may be redirected to (every `--xdp` interface). Key: ifindex;
/// value: ifindex; max 64. Writer: userspace (`bpf::xdp`). Readers: skiff_xdp.
#[map]
pub static SKIFF_XDP_TX: DevMapHash = DevMapHash::with_max_entries(64, 0);

/// VIP addresses answered with ICMP echo replies: every address some node-scope fast-path
/// service (any port, TCP or UDP) is at. Key: `XdpAddrKey`; value: u8 (1); max `max_services`
/// (set at load); not LRU. Writer: userspace (`bpf::xdp`, from the applied fast path).
/// Readers: skiff_xdp; userspace (`skiff maps`).
#[map]
pub static SKIFF_XDP_VIP: HashMap<XdpAddrKey, u8> = HashMap::with_max_entries(10240, 0);

/// Per-VIP counters. Key: `XdpVipKey`; value: `XdpCounters` per CPU; max 10240; LRU.
/// Writer: skiff_xdp. Readers: userspace (`/stats` `skiff.xdp.<vip>.*`, `skiff maps`).
#[map]
pub static SKIFF_XDP_VST: LruPerCpuHashMap<XdpVipKey, XdpCounters> =
    LruPerCpuHashMap::with_max_entries(10240, 0);

/// Per-endpoint counters. Key: `EndpointKey`; value: `XdpCounters` per CPU; max 102400; LRU.
/// Writer: skiff_xdp. Readers: userspace.
#[map]
pub static SKIFF_XDP_EST: LruPerCpuHashMap<EndpointKey, XdpCounters> =
    LruPerCpuHashMap::with_max_entries(102400, 0);

/// Scratch space for the packet being handled (one per CPU; programs do not nest on a CPU).
/// Key: u32 0; value: `Plan`; max 1. Writer and reader: skiff_xdp.
#[map]
static SKIFF_XDP_SCR: PerCpuArray<Plan> = PerCpuArray::with_max_entries(1, 0);

/// Counters by `skiff_common::xdp::stat`. Writer: skiff_xdp. Readers: userspace.
#[map]
pub static SKIFF_XDP_ST: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const IPV6_HLEN: usize = 40;
/// Type and code words (as stored) of the ICMP echo messages.
const ICMP_ECHO_REQUEST: u16 = u16::from_ne_bytes([8, 0]);
const ICMP_ECHO_REPLY: u16 = u16::from_ne_bytes([0, 0]);
const ICMPV6_ECHO_REQUEST: u16 = u16::from_ne_bytes([128, 0]);
const ICMPV6_ECHO_REPLY: u16 = u16::from_ne_bytes([129, 0]);
/// TTL / hop limit of an echo reply (the stack's default).
const ECHO_TTL: u8 = 64;
/// Offset of the L4 checksum within TCP and UDP headers.
const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;

fn bump(i: u32) {
    if let Some(p) = SKIFF_XDP_ST.get_ptr_mut(i) {
        // SAFETY: pointer from a successful per-CPU array lookup; not shared across CPUs.
        unsafe { *p += 1 }
    }
}

#[xdp]
pub fn skiff_xdp(ctx: XdpContext) -> u32 {
    match try_xdp(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            bump(reason);
            xdp_action::XDP_PASS
        }
    }
}

/// `xdp_md.data` as a packet pointer. A volatile load: LLVM would otherwise hoist plain loads
/// of the context into the caller of a BPF function and pass packet pointers as arguments,
/// which the verifier then refuses to zero-extend ("pointer arithmetic on pkt_end").
#[inline(always)]
fn data(ctx: &XdpContext) -> usize {
    // SAFETY: `ctx.ctx` is the program's context pointer.
    unsafe { core::ptr::read_volatile(&raw const (*ctx.ctx).data) as usize }
}

/// `xdp_md.data_end`, as [`data`].
#[inline(always)]
fn data_end(ctx: &XdpContext) -> usize {
    // SAFETY: as `data`.
    unsafe { core::ptr::read_volatile(&raw const (*ctx.ctx).data_end) as usize }
}

/// A bounds-checked pointer to `len` bytes at `off` into the frame.
#[inline(always)]
fn at(ctx: &XdpContext, off: usize, len: usize) -> Result<usize, u32> {
    let start = data(ctx);
    if start + off + len > data_end(ctx) {
        return Err(stat::PASS_MALFORMED);
    }
    Ok(start + off)
}

#[inline(always)]
fn ld16(p: usize) -> u16 {
    // SAFETY: callers pass a pointer from `at` covering the two bytes.
    unsafe { (p as *const u16).read_unaligned() }
}

#[inline(always)]
fn ld32(p: usize) -> u32 {
    // SAFETY: as `ld16`, four bytes.
    unsafe { (p as *const u32).read_unaligned() }
}

#[inline(always)]
fn st16(p: usize, v: u16) {
    // SAFETY: as `ld16`; the frame is writable in XDP.
    unsafe { (p as *mut u16).write_unaligned(v) }
}

#[inline(always)]
fn st32(p: usize, v: u32) {
    // SAFETY: as `st16`, four bytes.
    unsafe { (p as *mut u32).write_unaligned(v) }
}

/// What the parser found: where the headers are and the 5-tuple. For ICMP, `sport` is the
/// type and code word (as stored) and `dport` the checksum.
struct Pkt {
    family: u32,
    proto: u8,
    src: [u32; 4],
    dst: [u32; 4],
    sport: u16,
    dport: u16,
    len: u64,
    /// IP payload length (from the IP header, not the frame: a frame may carry padding).
    payload: u32,
}

#[inline(always)]
fn try_xdp(ctx: &XdpContext) -> Result<u32, u32> {
    let len = (data_end(ctx) - data(ctx)) as u64;
    let eth = at(ctx, 0, ETH_HLEN).map_err(|_| stat::PASS_NOT_IP)?;
    let mut ethertype = u16::from_be(ld16(eth + 12));
    let mut vlan = false;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let tag = at(ctx, ETH_HLEN, 4).map_err(|_| stat::PASS_NOT_IP)?;
        ethertype = u16::from_be(ld16(tag + 2));
        vlan = true;
    }
    // Every header offset is a constant of its instantiation: the verifier only trusts packet
    // pointers whose bounds check it saw on the same register, which variable offsets lose.
    // `decide` and `apply` are separate BPF functions, siblings under this one, so their
    // stack frames do not add up (inlined, the instantiations overflow the 512-byte stack).
    // The plan lives in a per-CPU scratch slot rather than on this frame's stack, which the
    // deepest callee's frame is added to.
    let plan = SKIFF_XDP_SCR.get_ptr_mut(0).ok_or(stat::PASS_NO_SERVICE)?;
    // SAFETY: per-CPU value from a successful lookup; nothing else uses it on this CPU while
    // this program runs.
    let plan = unsafe { &mut *plan };
    plan.pkt.len = len;
    match (vlan, ethertype) {
        (false, ETH_P_IP) => {
            decide::<14, 34, false>(ctx, plan)?;
            apply::<14, 34>(ctx, plan)
        }
        (false, ETH_P_IPV6) => {
            decide::<14, 54, true>(ctx, plan)?;
            apply::<14, 54>(ctx, plan)
        }
        (true, ETH_P_IP) => {
            decide::<18, 38, false>(ctx, plan)?;
            apply::<18, 38>(ctx, plan)
        }
        (true, ETH_P_IPV6) => {
            decide::<18, 58, true>(ctx, plan)?;
            apply::<18, 58>(ctx, plan)
        }
        _ => Err(stat::PASS_NOT_IP),
    }
}

/// What to do with a packet: answer an echo request (`echo`); translate an ICMP error about a
/// tracked flow (`err` not `ERR_NONE`: to `nat`, the endpoint or the VIP, with the quoted
/// packet's protocol `inner_proto`); else rewrite the destination (`reply` false) or the
/// source (`reply` true) of `pkt` to `nat`.
struct Plan {
    pkt: Pkt,
    nat: XdpNat,
    reply: bool,
    echo: bool,
    err: u8,
    inner_proto: u8,
}

/// `Plan::err`: not an ICMP error.
const ERR_NONE: u8 = 0;
/// `Plan::err`: an error sent to the VIP about a reply; goes to the endpoint.
const ERR_TO_ENDPOINT: u8 = 1;
/// `Plan::err`: an error from the endpoint side about a forwarded packet; goes to the client.
const ERR_TO_CLIENT: u8 = 2;
/// Length of the ICMP / ICMPv6 error header before the quoted packet.
const ICMP_ERR_HLEN: usize = 8;

/// Parses the packet (IP header at `L3`, L4 at `L4`, IPv6 if `V6`), finds its service or
/// tracked flow and fills `plan`; an error is the reason it passes untouched.
#[inline(never)]
fn decide<const L3: usize, const L4: usize, const V6: bool>(
    ctx: &XdpContext,
    plan: &mut Plan,
) -> Result<(), u32> {
    let len = plan.pkt.len;
    plan.pkt = if V6 {
        parse_v6::<L3, L4>(ctx, len)?
    } else {
        parse_v4::<L3, L4>(ctx, len)?
    };
    plan.echo = false;
    plan.err = ERR_NONE;
    let cfg = config().ok_or(stat::PASS_NO_SERVICE)?;
    let icmp = if V6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP };
    if plan.pkt.proto == IPPROTO_ICMP || plan.pkt.proto == IPPROTO_ICMPV6 {
        let request = if V6 {
            ICMPV6_ECHO_REQUEST
        } else {
            ICMP_ECHO_REQUEST
        };
        // Only ICMP of the header's own family, with the fast path on.
        if plan.pkt.proto != icmp || cfg.fast_path == 0 {
            return Err(stat::PASS_ICMP);
        }
        // An echo request to a VIP the fast path serves.
        if plan.pkt.sport == request && is_vip(&plan.pkt) {
            plan.echo = true;
            return Ok(());
        }
        if icmp_error_type(V6, plan.pkt.sport.to_ne_bytes()[0]) {
            return icmp_error_flow::<L4, V6>(ctx, plan);
        }
        return Err(stat::PASS_ICMP);
    }
    if cfg.fast_path != 0
        && let Some(svc) = service(&plan.pkt)
    {
        let idx = if cfg.fast_gen & 1 == 0 {
            svc.cluster_idx[0]
        } else {
            svc.cluster_idx[1]
        };
        plan.nat = forward(&plan.pkt, idx)?;
        plan.reply = false;
        return Ok(());
    }
    plan.nat = reply(&plan.pkt)?;
    plan.reply = true;
    Ok(())
}

/// Rewrites the packet as `plan` says and sends it on.
#[inline(never)]
fn apply<const L3: usize, const L4: usize>(ctx: &XdpContext, plan: &Plan) -> Result<u32, u32> {
    if plan.echo {
        return echo_reply::<L3, L4>(ctx, plan.pkt.family == AF_INET6);
    }
    if plan.err != ERR_NONE {
        let to_ep = plan.err == ERR_TO_ENDPOINT;
        if plan.pkt.family == AF_INET6 {
            icmp_error_v6::<L3, L4>(ctx, plan, to_ep)?;
        } else {
            icmp_error_v4::<L3, L4>(ctx, plan, to_ep)?;
        }
        let dst = if to_ep {
            plan.nat.addr_be
        } else {
            plan.pkt.dst
        };
        bump(if to_ep {
            stat::ICMP_ERROR_FORWARD
        } else {
            stat::ICMP_ERROR_REPLY
        });
        return send::<L3>(ctx, &plan.pkt, &dst);
    }
    rewrite::<L3, L4>(ctx, &plan.pkt, plan.reply, &plan.nat)?;
    let dst = if plan.reply {
        plan.pkt.dst
    } else {
        plan.nat.addr_be
    };
    send::<L3>(ctx, &plan.pkt, &dst)
}

#[inline(always)]
fn parse_v4<const L3: usize, const L4: usize>(ctx: &XdpContext, len: u64) -> Result<Pkt, u32> {
    let ip = at(ctx, L3, 20).map_err(|_| stat::PASS_NOT_IP)?;
    // SAFETY: `ip` covers 20 bytes.
    let ver_ihl = unsafe { *(ip as *const u8) };
    let ihl = (ver_ihl & 0x0f) as usize;
    if ver_ihl >> 4 != 4 || ihl < 5 {
        return Err(stat::PASS_MALFORMED);
    }
    // Options (rare, and mostly on control traffic) are not balanced, as in Katran.
    if ihl != 5 {
        return Err(stat::PASS_IP_OPTIONS);
    }
    let tot_len = u16::from_be(ld16(ip + 2)) as usize;
    if tot_len < 20 || (L3 + tot_len) as u64 > len {
        return Err(stat::PASS_MALFORMED);
    }
    // More-fragments or a fragment offset: only the first fragment has ports.
    if u16::from_be(ld16(ip + 6)) & 0x3fff != 0 {
        return Err(stat::PASS_FRAGMENT);
    }
    // SAFETY: as above.
    let proto = unsafe { *((ip + 9) as *const u8) };
    let src = ld32(ip + 12);
    let dst = ld32(ip + 16);
    let (sport, dport) = ports::<L4>(ctx, proto, tot_len - 20)?;
    Ok(Pkt {
        family: AF_INET,
        proto,
        src: [src, 0, 0, 0],
        dst: [dst, 0, 0, 0],
        sport,
        dport,
        len,
        payload: (tot_len - 20) as u32,
    })
}

#[inline(always)]
fn parse_v6<const L3: usize, const L4: usize>(ctx: &XdpContext, len: u64) -> Result<Pkt, u32> {
    let ip = at(ctx, L3, IPV6_HLEN).map_err(|_| stat::PASS_NOT_IP)?;
    // SAFETY: `ip` covers 40 bytes.
    let ver = unsafe { *(ip as *const u8) } >> 4;
    if ver != 6 {
        return Err(stat::PASS_MALFORMED);
    }
    let payload = u16::from_be(ld16(ip + 4)) as usize;
    if (L3 + IPV6_HLEN + payload) as u64 > len {
        return Err(stat::PASS_MALFORMED);
    }
    // SAFETY: as above. Extension headers (incl. the fragment header) are not followed: passed.
    let proto = unsafe { *((ip + 6) as *const u8) };
    let mut src = [0u32; 4];
    let mut dst = [0u32; 4];
    for i in 0..4 {
        src[i] = ld32(ip + 8 + i * 4);
        dst[i] = ld32(ip + 24 + i * 4);
    }
    let (sport, dport) = ports::<L4>(ctx, proto, payload)?;
    Ok(Pkt {
        family: AF_INET6,
        proto,
        src,
        dst,
        sport,
        dport,
        len,
        payload: payload as u32,
    })
}

/// The ports of a TCP/UDP header at `L4` whose IP payload is `payload` bytes; errors name why
/// the packet passes.
#[inline(always)]
fn ports<const L4: usize>(ctx: &XdpContext, proto: u8, payload: usize) -> Result<(u16, u16), u32> {
    let need = match u32::from(proto) {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        // Type, code, checksum and the echo identifier and sequence number.
        _ if proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6 => {
            if payload < 8 {
                return Err(stat::PASS_ICMP);
            }
            8
        }
        _ => return Err(stat::PASS_NO_SERVICE),
    };
    if payload < need {
        return Err(stat::PASS_MALFORMED);
    }
    // The whole TCP header's first 20 bytes or UDP's 8, each a constant-length check.
    let p = if need == 20 {
        at(ctx, L4, 20)?
    } else {
        at(ctx, L4, 8)?
    };
    Ok((ld16(p), ld16(p + 2)))
}

/// The node-scope service the packet is addressed to, if any.
#[inline(always)]
fn service(pkt: &Pkt) -> Option<ServiceValue> {
    if pkt.family == AF_INET {
        let key = ServiceKeyV4 {
            scope: NODE_SCOPE,
            vip_be: pkt.dst[0],
            port_be: pkt.dport,
            proto: pkt.proto,
            _pad: 0,
        };
        // SAFETY: copied out at once.
        unsafe { SKIFF_SVC4_V2.get(key) }.copied()
    } else {
        let key = ServiceKeyV6 {
            scope: NODE_SCOPE,
            vip_be: pkt.dst,
            port_be: pkt.dport,
            proto: pkt.proto,
            _pad: 0,
        };
        // SAFETY: copied out at once.
        unsafe { SKIFF_SVC6_V2.get(key) }.copied()
    }
}

/// Whether the packet's destination is a VIP the fast path serves (any port).
#[inline(always)]
fn is_vip(pkt: &Pkt) -> bool {
    let key = XdpAddrKey {
        addr_be: pkt.dst,
        family: pkt.family as u8,
        _pad: [0; 3],
    };
    // SAFETY: only tested for presence.
    unsafe { SKIFF_XDP_VIP.get(key) }.is_some()
}

/// Turns the echo request (`v6`: ICMPv6) into its reply and sends it back where it came from.
#[inline(always)]
fn echo_reply<const L3: usize, const L4: usize>(ctx: &XdpContext, v6: bool) -> Result<u32, u32> {
    let icmp = at(ctx, L4, 4)?;
    let old = ld16(icmp);
    let new = if v6 {
        ICMPV6_ECHO_REPLY
    } else {
        ICMP_ECHO_REPLY
    };
    // Only the type changes in the ICMP message; ICMPv6's pseudo-header (addresses, length,
    // next header) sums the same with the addresses swapped.
    st16(icmp + 2, csum_replace2(ld16(icmp + 2), old, new));
    st16(icmp, new);
    if v6 {
        let ip = at(ctx, L3, IPV6_HLEN)?;
        // SAFETY: `ip` covers the 40-byte header.
        unsafe { *((ip + 7) as *mut u8) = ECHO_TTL };
        for i in 0..4 {
            let s = ld32(ip + 8 + i * 4);
            st32(ip + 8 + i * 4, ld32(ip + 24 + i * 4));
            st32(ip + 24 + i * 4, s);
        }
    } else {
        let ip = at(ctx, L3, 20)?;
        // TTL shares a checksummed word with the protocol; swapped addresses sum the same.
        let old = ld16(ip + 8);
        // SAFETY: `ip` covers the 20-byte header.
        unsafe { *((ip + 8) as *mut u8) = ECHO_TTL };
        st16(ip + 10, csum_replace2(ld16(ip + 10), old, ld16(ip + 8)));
        let s = ld32(ip + 12);
        st32(ip + 12, ld32(ip + 16));
        st32(ip + 16, s);
    }
    let eth = at(ctx, 0, ETH_HLEN)?;
    for i in 0..6 {
        // SAFETY: `eth` covers the 14-byte header.
        unsafe {
            let d = *((eth + i) as *const u8);
            *((eth + i) as *mut u8) = *((eth + 6 + i) as *const u8);
            *((eth + 6 + i) as *mut u8) = d;
        }
    }
    bump(stat::ICMP_ECHO_REPLY);
    Ok(xdp_action::XDP_TX)
}

/// Finds the tracked flow an ICMP error (type already checked) is about from the packet it
/// quotes (at `L4` + 8; IPv6 if `V6`) and fills `plan` to translate it. An error whose quoted
/// packet does not parse (IPv4 options, a later fragment, not TCP/UDP, ports not quoted) or
/// belongs to no tracked flow passes untouched.
#[inline(always)]
fn icmp_error_flow<const L4: usize, const V6: bool>(
    ctx: &XdpContext,
    plan: &mut Plan,
) -> Result<(), u32> {
    let q = L4 + ICMP_ERR_HLEN;
    let (qsrc, qdst, proto, ql4) = if V6 {
        let ip = at(ctx, q, IPV6_HLEN).map_err(|_| stat::PASS_ICMP)?;
        // SAFETY: `ip` covers the 40-byte quoted header.
        let (ver, proto) = unsafe { (*(ip as *const u8) >> 4, *((ip + 6) as *const u8)) };
        if ver != 6 {
            return Err(stat::PASS_ICMP);
        }
        let mut src = [0u32; 4];
        let mut dst = [0u32; 4];
        for i in 0..4 {
            src[i] = ld32(ip + 8 + i * 4);
            dst[i] = ld32(ip + 24 + i * 4);
        }
        (src, dst, proto, q + IPV6_HLEN)
    } else {
        let ip = at(ctx, q, 20).map_err(|_| stat::PASS_ICMP)?;
        // SAFETY: `ip` covers the 20-byte quoted header.
        let (ver_ihl, proto) = unsafe { (*(ip as *const u8), *((ip + 9) as *const u8)) };
        // Without options the quoted ports are at a constant offset (our flows carry none);
        // a later fragment quotes no ports.
        if ver_ihl != 0x45 || u16::from_be(ld16(ip + 6)) & 0x1fff != 0 {
            return Err(stat::PASS_ICMP);
        }
        (
            [ld32(ip + 12), 0, 0, 0],
            [ld32(ip + 16), 0, 0, 0],
            proto,
            q + 20,
        )
    };
    if u32::from(proto) != IPPROTO_TCP && u32::from(proto) != IPPROTO_UDP {
        return Err(stat::PASS_ICMP);
    }
    // The quoted ports must lie inside the ICMP message, not merely inside the frame.
    if (plan.pkt.payload as usize) < ql4 - L4 + 8 {
        return Err(stat::PASS_ICMP);
    }
    let ports = at(ctx, ql4, 8).map_err(|_| stat::PASS_ICMP)?;
    // An error goes back to where the quoted packet came from.
    if plan.pkt.dst != qsrc {
        return Err(stat::PASS_ICMP);
    }
    // The quoted packet went the other way: its reverse is the flow's key in either map.
    let key = XdpFlowKey {
        src_be: qdst,
        dst_be: qsrc,
        sport_be: ld16(ports + 2),
        dport_be: ld16(ports),
        proto,
        family: plan.pkt.family as u8,
        _pad: [0; 2],
    };
    // SAFETY: copied out at once.
    if let Some(ep) = unsafe { SKIFF_XDP_CT.get(key) }.copied() {
        // About a reply from the VIP (VIP -> client): the endpoint sent it.
        plan.err = ERR_TO_ENDPOINT;
        plan.nat = ep;
    // SAFETY: as above.
    } else if let Some(vip) = unsafe { SKIFF_XDP_RCT.get(key) }.copied() {
        // About a forwarded packet (client -> endpoint): the client sent it to the VIP.
        plan.err = ERR_TO_CLIENT;
        plan.nat = vip;
    } else {
        return Err(stat::PASS_ICMP);
    }
    plan.inner_proto = proto;
    Ok(())
}

/// Translates the IPv4 ICMP error `plan` found (`to_ep`: to the endpoint, else to the client):
/// the outer destination (to the endpoint) or the outer source when the endpoint sent it (to
/// the client), and the quoted source (destination) address and port, with the outer and
/// quoted header checksums, the quoted L4 checksum and the ICMP checksum updated.
#[inline(always)]
fn icmp_error_v4<const L3: usize, const L4: usize>(
    ctx: &XdpContext,
    plan: &Plan,
    to_ep: bool,
) -> Result<(), u32> {
    let q = L4 + ICMP_ERR_HLEN;
    let new = plan.nat.addr_be[0];
    let qip = at(ctx, q, 20)?;
    let qaddr = qip + if to_ep { 12 } else { 16 };
    let old = ld32(qaddr);
    let ip = at(ctx, L3, 20)?;
    let outer = if to_ep {
        Some(ip + 16)
    } else if plan.pkt.src[0] == old {
        Some(ip + 12)
    } else {
        None
    };
    if let Some(o) = outer {
        st16(ip + 10, csum_replace4(ld16(ip + 10), ld32(o), new));
        st32(o, new);
    }
    let icmp = at(ctx, L4, 4)?;
    // The ICMP checksum covers every quoted byte that changes.
    let mut ic = ld16(icmp + 2);
    let qc = ld16(qip + 10);
    let qc_new = csum_replace4(qc, old, new);
    st16(qip + 10, qc_new);
    ic = csum_replace2(ic, qc, qc_new);
    ic = csum_replace4(ic, old, new);
    st32(qaddr, new);
    ic = quoted_l4::<L4, 1>(ctx, plan, q + 20, to_ep, &[old, 0, 0, 0], ic)?;
    st16(icmp + 2, ic);
    Ok(())
}

/// As [`icmp_error_v4`] for ICMPv6 (no header checksums; the ICMPv6 checksum's
/// pseudo-header covers the outer addresses).
#[inline(always)]
fn icmp_error_v6<const L3: usize, const L4: usize>(
    ctx: &XdpContext,
    plan: &Plan,
    to_ep: bool,
) -> Result<(), u32> {
    let q = L4 + ICMP_ERR_HLEN;
    let new = plan.nat.addr_be;
    let qip = at(ctx, q, IPV6_HLEN)?;
    let qaddr = qip + if to_ep { 8 } else { 24 };
    let mut old = [0u32; 4];
    for (i, o) in old.iter_mut().enumerate() {
        *o = ld32(qaddr + i * 4);
    }
    let ip = at(ctx, L3, IPV6_HLEN)?;
    let icmp = at(ctx, L4, 4)?;
    let mut ic = ld16(icmp + 2);
    let outer = if to_ep {
        Some(ip + 24)
    } else if plan.pkt.src == old {
        Some(ip + 8)
    } else {
        None
    };
    if let Some(o) = outer {
        for (i, n) in new.iter().enumerate() {
            ic = csum_replace4(ic, ld32(o + i * 4), *n);
            st32(o + i * 4, *n);
        }
    }
    for (i, n) in new.iter().enumerate() {
        ic = csum_replace4(ic, old[i], *n);
        st32(qaddr + i * 4, *n);
    }
    ic = quoted_l4::<L4, 4>(ctx, plan, q + IPV6_HLEN, to_ep, &old, ic)?;
    st16(icmp + 2, ic);
    Ok(())
}

/// The quoted TCP/UDP header at `l4` (its first 8 bytes checked by `icmp_error_flow`; the
/// ICMP header at `L4`): the source port (`sport`) or the destination port becomes
/// `plan.nat.port_be`, and the quoted L4 checksum, when the quote reaches it, follows the port
/// and the first `W` words of the address (`old` to `plan.nat.addr_be`, its pseudo-header).
/// Returns the ICMP checksum `ic` updated for both.
#[inline(always)]
fn quoted_l4<const L4: usize, const W: usize>(
    ctx: &XdpContext,
    plan: &Plan,
    l4: usize,
    sport: bool,
    old: &[u32; 4],
    mut ic: u16,
) -> Result<u16, u32> {
    let port_at = if sport {
        at(ctx, l4, 2)?
    } else {
        at(ctx, l4 + 2, 2)?
    };
    let old_port = ld16(port_at);
    let new_port = plan.nat.port_be;
    ic = csum_replace2(ic, old_port, new_port);
    st16(port_at, new_port);
    let udp = u32::from(plan.inner_proto) == IPPROTO_UDP;
    // UDP's checksum is within the 8 quoted bytes; TCP's only when the quote reaches it
    // (RFC 792 asks for 8 bytes, Linux quotes up to 576 in all).
    let csum_off = if udp { UDP_CSUM } else { TCP_CSUM };
    if (plan.pkt.payload as usize) < l4 - L4 + csum_off + 2 {
        return Ok(ic);
    }
    let csum_at = if udp {
        at(ctx, l4 + UDP_CSUM, 2)
    } else {
        at(ctx, l4 + TCP_CSUM, 2)
    };
    let Ok(csum_at) = csum_at else {
        return Ok(ic);
    };
    let c = ld16(csum_at);
    // A UDP datagram sent without a checksum keeps none.
    if udp && c == 0 {
        return Ok(ic);
    }
    let mut c_new = csum_replace2(c, old_port, new_port);
    for (i, o) in old.iter().enumerate().take(W) {
        c_new = csum_replace4(c_new, *o, plan.nat.addr_be[i]);
    }
    if udp {
        c_new = udp_mangled(c_new);
    }
    ic = csum_replace2(ic, c, c_new);
    st16(csum_at, c_new);
    Ok(ic)
}

#[inline(always)]
fn flow(pkt: &Pkt) -> XdpFlowKey {
    XdpFlowKey {
        src_be: pkt.src,
        dst_be: pkt.dst,
        sport_be: pkt.sport,
        dport_be: pkt.dport,
        proto: pkt.proto,
        family: pkt.family as u8,
        _pad: [0; 2],
    }
}

/// Client -> VIP: the tracked endpoint, else a new choice (tracked now).
#[inline(always)]
fn forward(pkt: &Pkt, cluster_idx: u32) -> Result<XdpNat, u32> {
    let key = flow(pkt);
    let vip = XdpVipKey {
        addr_be: pkt.dst,
        port_be: pkt.dport,
        proto: pkt.proto,
        family: pkt.family as u8,
    };
    // SAFETY: copied out at once.
    let (nat, dir) = match unsafe { SKIFF_XDP_CT.get(key) }.copied() {
        Some(nat) => {
            bump(stat::CT_HIT);
            (nat, Dir::Packet)
        }
        None => {
            let Some(ep) = choose(pkt, cluster_idx) else {
                count_vip_no_endpoint(&vip);
                return Err(stat::NO_ENDPOINT);
            };
            let nat = XdpNat {
                addr_be: ep.addr_be,
                port_be: ep.port_be,
                family: ep.family,
                _pad: 0,
            };
            let rkey = key.reply_of(&nat);
            let back = XdpNat {
                addr_be: pkt.dst,
                port_be: pkt.dport,
                family: pkt.family as u8,
                _pad: 0,
            };
            // Reverse first: a reply can only exist once the forward packet left.
            if SKIFF_XDP_RCT.insert(rkey, back, 0).is_err()
                || SKIFF_XDP_CT.insert(key, nat, 0).is_err()
            {
                bump(stat::CT_ERR);
            } else {
                bump(stat::CT_NEW);
            }
            (nat, Dir::NewFlow)
        }
    };
    count_vip(&vip, pkt.len, dir);
    count_ep(
        &EndpointKey {
            addr_be: nat.addr_be,
            port_be: nat.port_be,
            family: nat.family,
            _pad: 0,
        },
        pkt.len,
        dir,
    );
    Ok(nat)
}

/// Endpoint -> client reply of a tracked flow: the VIP it must come from.
#[inline(always)]
fn reply(pkt: &Pkt) -> Result<XdpNat, u32> {
    let key = flow(pkt);
    // SAFETY: copied out at once.
    let Some(back) = unsafe { SKIFF_XDP_RCT.get(key) }.copied() else {
        return Err(stat::PASS_NO_SERVICE);
    };
    bump(stat::REPLY);
    let vip = XdpVipKey {
        addr_be: back.addr_be,
        port_be: back.port_be,
        proto: pkt.proto,
        family: back.family,
    };
    count_vip(&vip, pkt.len, Dir::Reply);
    count_ep(
        &EndpointKey {
            addr_be: pkt.src,
            port_be: pkt.sport,
            family: pkt.family as u8,
            _pad: 0,
        },
        pkt.len,
        Dir::Reply,
    );
    Ok(back)
}

/// The endpoint for a new flow in the cluster at absolute index `idx`.
#[inline(always)]
fn choose(pkt: &Pkt, idx: u32) -> Option<EndpointValue> {
    if idx == NO_CLUSTER {
        return None;
    }
    let cluster: ClusterValue = SKIFF_CLUSTERS.get(idx).copied()?;
    let vip_word = pkt.dst[0] ^ pkt.dst[1] ^ pkt.dst[2] ^ pkt.dst[3];
    let hash = flow_hash(&pkt.src, pkt.sport, pkt.proto, vip_word, pkt.dport);
    let facts = Slots {
        slot_base: cluster.slot_base,
        maglev_base: cluster.maglev_base,
    };
    let off = xdp_pick_slot(&cluster, hash, &facts)?;
    let ep = SKIFF_ENDPOINTS
        .get(cluster.slot_base.wrapping_add(off))
        .copied()?;
    if ep.health != HEALTH_OK || u32::from(ep.family) != pkt.family {
        return None;
    }
    Some(ep)
}

/// The map facts of one cluster of the active generation.
struct Slots {
    slot_base: u32,
    maglev_base: u32,
}

impl SlotFacts for Slots {
    #[inline(always)]
    fn weight_end(&self, offset: u32) -> Option<u32> {
        SKIFF_ENDPOINTS
            .get(self.slot_base.wrapping_add(offset))
            .map(|e| e.weight_end)
    }

    #[inline(always)]
    fn load(&self, _offset: u32) -> u64 {
        0
    }

    #[inline(always)]
    fn maglev(&self, entry: u32) -> Option<u32> {
        SKIFF_MAGLEV
            .get(self.maglev_base.wrapping_add(entry))
            .copied()
    }
}

/// Rewrites the destination (`src` false: DNAT) or the source (`src` true: reply SNAT) address
/// and port to `nat`, updating the IPv4 header checksum and the L4 checksum incrementally.
#[inline(always)]
fn rewrite<const L3: usize, const L4: usize>(
    ctx: &XdpContext,
    pkt: &Pkt,
    src: bool,
    nat: &XdpNat,
) -> Result<(), u32> {
    let udp = u32::from(pkt.proto) != IPPROTO_TCP;
    let l4csum = if udp {
        at(ctx, L4 + UDP_CSUM, 2)?
    } else {
        at(ctx, L4 + TCP_CSUM, 2)?
    };
    let mut l4c = ld16(l4csum);
    // IPv4 UDP without a checksum stays without one.
    let l4_on = !(udp && l4c == 0);
    let port_at = if src {
        at(ctx, L4, 2)?
    } else {
        at(ctx, L4 + 2, 2)?
    };
    if l4_on {
        l4c = csum_replace2(l4c, ld16(port_at), nat.port_be);
    }
    st16(port_at, nat.port_be);
    if pkt.family == AF_INET {
        let ip = at(ctx, L3, 20)?;
        let addr_at = ip + if src { 12 } else { 16 };
        let old = ld32(addr_at);
        let new = nat.addr_be[0];
        st16(ip + 10, csum_replace4(ld16(ip + 10), old, new));
        if l4_on {
            l4c = csum_replace4(l4c, old, new);
        }
        st32(addr_at, new);
    } else {
        let ip = at(ctx, L3, IPV6_HLEN)?;
        let base = ip + if src { 8 } else { 24 };
        for i in 0..4 {
            let old = ld32(base + i * 4);
            let new = nat.addr_be[i];
            l4c = csum_replace4(l4c, old, new);
            st32(base + i * 4, new);
        }
    }
    if l4_on {
        st16(l4csum, if udp { udp_mangled(l4c) } else { l4c });
    }
    Ok(())
}

/// After a rewrite: redirect out of the FIB's interface when it is an XDP interface and the
/// neighbour is known, else hand the translated packet to the stack.
#[inline(always)]
fn send<const L3: usize>(ctx: &XdpContext, pkt: &Pkt, dst: &[u32; 4]) -> Result<u32, u32> {
    if L3 != ETH_HLEN {
        bump(stat::PASS_TRANSLATED);
        return Ok(xdp_action::XDP_PASS);
    }
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = pkt.family as u8;
    fib.l4_protocol = pkt.proto;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    let ttl_at;
    if pkt.family == AF_INET {
        let ip = at(ctx, L3, 20)?;
        fib.__bindgen_anon_1.tot_len = u16::from_be(ld16(ip + 2));
        fib.__bindgen_anon_3.ipv4_src = ld32(ip + 12);
        fib.__bindgen_anon_4.ipv4_dst = dst[0];
        // SAFETY: `ip` covers 20 bytes.
        fib.__bindgen_anon_2.tos = unsafe { *((ip + 1) as *const u8) };
        ttl_at = ip + 8;
    } else {
        let ip = at(ctx, L3, IPV6_HLEN)?;
        fib.__bindgen_anon_1.tot_len = u16::from_be(ld16(ip + 4)) + IPV6_HLEN as u16;
        for (i, d) in dst.iter().enumerate() {
            // SAFETY: writes to a local union.
            unsafe {
                fib.__bindgen_anon_3.ipv6_src[i] = ld32(ip + 8 + i * 4);
                fib.__bindgen_anon_4.ipv6_dst[i] = *d;
            }
        }
        ttl_at = ip + 7;
    }
    // SAFETY: valid context and a local request of the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.ctx.cast(),
            &mut fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    // SAFETY: `ttl_at` was bounds-checked above.
    let ttl = unsafe { *(ttl_at as *const u8) };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS)
        || ttl <= 1
        || SKIFF_XDP_TX.get(fib.ifindex).is_none()
    {
        bump(stat::PASS_TRANSLATED);
        return Ok(xdp_action::XDP_PASS);
    }
    // Forwarding: decrement the TTL / hop limit (IPv4: fix the header checksum).
    if pkt.family == AF_INET {
        let ip = at(ctx, L3, 20)?;
        let old = ld16(ip + 8);
        // SAFETY: in bounds (checked by `at`).
        unsafe { *(ttl_at as *mut u8) = ttl - 1 };
        st16(ip + 10, csum_replace2(ld16(ip + 10), old, ld16(ip + 8)));
    } else {
        // SAFETY: in bounds.
        unsafe { *(ttl_at as *mut u8) = ttl - 1 };
    }
    let eth = at(ctx, 0, ETH_HLEN)?;
    for i in 0..6 {
        // SAFETY: `eth` covers the 14-byte header.
        unsafe {
            *((eth + i) as *mut u8) = fib.dmac[i];
            *((eth + 6 + i) as *mut u8) = fib.smac[i];
        }
    }
    match SKIFF_XDP_TX.redirect(fib.ifindex, 0) {
        Ok(a) => {
            bump(stat::REDIRECT);
            Ok(a)
        }
        // Lost a race with userspace removing the interface: the frame is already rewritten
        // for the next hop, so the stack would not take it either.
        Err(_) => Ok(xdp_action::XDP_DROP),
    }
}

/// What a VIP counter update counts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Packet,
    NewFlow,
    Reply,
}

#[inline(always)]
fn count_vip(vip: &XdpVipKey, len: u64, dir: Dir) {
    if let Some(p) = counters(&SKIFF_XDP_VST, vip) {
        add(p, len, dir);
    }
}

/// Adds one packet of `len` bytes to the per-CPU counters at `p`.
#[inline(always)]
fn add(p: *mut XdpCounters, len: u64, dir: Dir) {
    // SAFETY: per-CPU value from a successful lookup; no other program runs on this CPU's copy.
    unsafe {
        if dir == Dir::Reply {
            (*p).reply_packets += 1;
            (*p).reply_bytes += len;
        } else {
            (*p).packets += 1;
            (*p).bytes += len;
            if dir == Dir::NewFlow {
                (*p).flows += 1;
            }
        }
    }
}

#[inline(always)]
fn count_vip_no_endpoint(vip: &XdpVipKey) {
    if let Some(p) = counters(&SKIFF_XDP_VST, vip) {
        // SAFETY: as above.
        unsafe { (*p).no_endpoint += 1 }
    }
}

#[inline(always)]
fn count_ep(ep: &EndpointKey, len: u64, dir: Dir) {
    if let Some(p) = counters(&SKIFF_XDP_EST, ep) {
        add(p, len, dir);
    }
}

/// The per-CPU counters of `key`, created on first use.
#[inline(always)]
fn counters<K>(map: &LruPerCpuHashMap<K, XdpCounters>, key: &K) -> Option<*mut XdpCounters> {
    if let Some(p) = map.get_ptr_mut(key) {
        return Some(p);
    }
    let _ = map.insert(key, XdpCounters::default(), 0);
    map.get_ptr_mut(key)
}
