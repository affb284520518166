//! `cgroup/connect4` and `cgroup/connect6`: rewrite captured TCP connects to the proxy's
//! outbound listener and remember the original destination by socket cookie. connect4 also
//! sends a connected UDP socket addressed to a UDP fast-path service straight to an endpoint;
//! `cgroup/sendmsg4` / `cgroup/recvmsg4` do the same per datagram for unconnected UDP.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock_tuple},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_prandom_u32,
        generated::{bpf_set_retval, bpf_sk_lookup_tcp, bpf_sk_release},
    },
    macros::cgroup_sock_addr,
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use aya_log_ebpf::error;
use skiff_common::{
    AF_INET, AF_INET6, CidrV4Key, CidrV6Key, ConfigValue, ConnectFacts, Decision, Draws,
    ECONNREFUSED, EndpointKey, EndpointValue, ExcludePortKey, HEALTH_OK, IPPROTO_TCP, IPPROTO_UDP,
    LB_LEAST_REQUEST, LB_MAGLEV, LB_RANDOM, LB_ROUND_ROBIN, NO_CLUSTER, NODE_SCOPE, OrigDstValue,
    ServiceKeyV4, ServiceKeyV6, ServiceStats, ServiceValue, SlotFacts, UdpRevKey, UdpRevValue,
    capture_decision, client_hash, is_local_v4, is_local_v6, is_v4_mapped, pick_slot,
    proxy_down_decision, reason,
};

use skiff_common::events::{
    VERDICT_FAST_PATH, VERDICT_NOT_READY_CLOSED, VERDICT_NOT_READY_OPEN, VERDICT_PROXY_DOWN_CLOSED,
    VERDICT_PROXY_DOWN_OPEN,
};

use crate::{
    ctx::SockAddr,
    events::{Emit, emit},
    maps::{
        SKIFF_CLUSTERS, SKIFF_COOKIE, SKIFF_ENDPOINTS, SKIFF_EP_ACTIVE, SKIFF_EP_LOAD,
        SKIFF_EXCL_PORT, SKIFF_EXCL_V4, SKIFF_EXCL_V6, SKIFF_FAST_SK, SKIFF_MAGLEV,
        SKIFF_MESHED_V2, SKIFF_PEER, SKIFF_RR, SKIFF_SVC4_V2, SKIFF_SVC6_V2, SKIFF_SVCST_V2,
        SKIFF_UDP_REV, config, count,
    },
};

/// Verdict: let the connect proceed (rewritten or not).
const ALLOW: i32 = 1;
/// Verdict: refuse the connect (with the errno set by `bpf_set_retval`, EPERM otherwise).
const DENY: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn skiff_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(verdict) => verdict,
        Err(why) => {
            count(why);
            ALLOW
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn skiff_connect6(ctx: SockAddrContext) -> i32 {
    match try_connect6(&ctx) {
        Ok(verdict) => verdict,
        Err(why) => {
            count(why);
            ALLOW
        }
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn skiff_sendmsg4(ctx: SockAddrContext) -> i32 {
    if let Err(why) = try_sendmsg4(&ctx) {
        count(why);
    }
    // sendmsg programs must allow: UDP is never refused or sent to the proxy.
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn skiff_recvmsg4(ctx: SockAddrContext) -> i32 {
    recvmsg4(&ctx);
    // recvmsg programs must return 1.
    ALLOW
}

/// UDP fast path for one service address: the endpoint (address, port, network order) when
/// `ip_be:port_be` is a UDP service in the active generation and the socket would be captured,
/// else `None` (the datagram or connect is left alone: UDP never goes to the proxy).
#[inline(always)]
fn udp_endpoint(
    sa: &SockAddr<'_>,
    cfg: &ConfigValue,
    ip_be: u32,
    port_be: u16,
) -> Option<(u32, u16)> {
    match decide_v4(sa, cfg, ip_be, port_be) {
        Decision::Capture => fast_path_v4(sa, cfg, ip_be, port_be, IPPROTO_UDP),
        // Not-ready (fail-closed) only refuses TCP connects; a UDP datagram goes where it was sent.
        Decision::Reject => {
            count(reason::SKIP_NOT_READY);
            None
        }
        Decision::Pass(why) => {
            count(why);
            None
        }
    }
}

/// Records that datagrams from this socket to the endpoint were addressed to the VIP, so
/// recvmsg4 can rewrite the endpoint's replies. Best effort: without it the reply shows the
/// endpoint's address.
#[inline(always)]
fn remember_udp(sa: &SockAddr<'_>, ep_ip_be: u32, ep_port_be: u16, vip_be: u32, port_be: u16) {
    let key = UdpRevKey {
        cookie: sa.socket_cookie(),
        ep_ip_be,
        ep_port_be,
        _pad: 0,
    };
    let value = UdpRevValue {
        vip_be,
        port_be,
        _pad: 0,
    };
    if SKIFF_UDP_REV.insert(key, value, 0).is_err() {
        count(reason::ERR_UDP_REV);
    }
}

/// connect4 for a UDP socket: a service hit connects it to an endpoint (the VIP kept for
/// getpeername4 and recvmsg4); anything else is left alone.
#[inline(always)]
fn connect4_udp(ctx: &SockAddrContext, sa: &SockAddr<'_>) -> Result<i32, u32> {
    let cfg = config().ok_or(reason::ERR_NO_CONFIG)?;
    if cfg.fast_path == 0 {
        count(reason::SKIP_NOT_TCP);
        return Ok(ALLOW);
    }
    let ip_be = sa.dst_ip4_be();
    let port_be = sa.dst_port_be();
    match udp_endpoint(sa, &cfg, ip_be, port_be) {
        Some((ep_ip_be, ep_port_be)) => {
            remember_peer(ctx, OrigDstValue::v4(ip_be, port_be));
            remember_udp(sa, ep_ip_be, ep_port_be, ip_be, port_be);
            sa.set_dst4(ep_ip_be, ep_port_be);
            count(reason::FAST_UDP_CONNECT);
        }
        None => {
            // A socket re-connected away from a service must stop answering the old VIP.
            forget_peer(ctx);
            count(reason::SKIP_UDP_MISS);
        }
    }
    Ok(ALLOW)
}

fn try_sendmsg4(ctx: &SockAddrContext) -> Result<(), u32> {
    let sa = SockAddr(ctx);
    if sa.protocol() != IPPROTO_UDP {
        return Ok(());
    }
    let cfg = config().ok_or(reason::ERR_NO_CONFIG)?;
    if cfg.fast_path == 0 {
        return Ok(());
    }
    let ip_be = sa.dst_ip4_be();
    let port_be = sa.dst_port_be();
    match udp_endpoint(&sa, &cfg, ip_be, port_be) {
        Some((ep_ip_be, ep_port_be)) => {
            remember_udp(&sa, ep_ip_be, ep_port_be, ip_be, port_be);
            sa.set_dst4(ep_ip_be, ep_port_be);
            count(reason::FAST_UDP_SEND);
        }
        None => count(reason::SKIP_UDP_MISS),
    }
    Ok(())
}

/// recvmsg4: a datagram from an endpoint this socket reached through a VIP shows the VIP as
/// its source (as conntrack's reverse NAT would).
#[inline(always)]
fn recvmsg4(ctx: &SockAddrContext) {
    let sa = SockAddr(ctx);
    let key = UdpRevKey {
        cookie: sa.socket_cookie(),
        ep_ip_be: sa.dst_ip4_be(),
        ep_port_be: sa.dst_port_be(),
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    if let Some(vip) = unsafe { SKIFF_UDP_REV.get(key) }.copied() {
        sa.set_dst4(vip.vip_be, vip.port_be);
        count(reason::FAST_UDP_REPLY);
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, u32> {
    let sa = SockAddr(ctx);
    if sa.protocol() == IPPROTO_UDP {
        return connect4_udp(ctx, &sa);
    }
    if sa.protocol() != IPPROTO_TCP {
        count(reason::SKIP_NOT_TCP);
        return Ok(ALLOW);
    }
    let cfg = config().ok_or(reason::ERR_NO_CONFIG)?;
    let ip_be = sa.dst_ip4_be();
    let port_be = sa.dst_port_be();
    match decide_v4(&sa, &cfg, ip_be, port_be) {
        Decision::Capture => {
            // Kernel fast path: a plain-L4 service connects straight to an endpoint.
            if let Some((ep_ip_be, ep_port_be)) =
                fast_path_v4(&sa, &cfg, ip_be, port_be, IPPROTO_TCP)
            {
                remember_peer(ctx, OrigDstValue::v4(ip_be, port_be));
                sa.set_dst4(ep_ip_be, ep_port_be);
                count(reason::FAST_PATH_V4);
                return Ok(ALLOW);
            }
            if !proxy_listening4(ctx, cfg.outbound_ip4_be, cfg.outbound_port4_be) {
                return Ok(proxy_down(&sa, &cfg, OrigDstValue::v4(ip_be, port_be)));
            }
            remember(ctx, &sa, OrigDstValue::v4(ip_be, port_be))?;
            sa.set_dst4(cfg.outbound_ip4_be, cfg.outbound_port4_be);
            count(reason::CAPTURED_V4);
            Ok(ALLOW)
        }
        other => Ok(not_captured(&sa, other, OrigDstValue::v4(ip_be, port_be))),
    }
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, u32> {
    let sa = SockAddr(ctx);
    if sa.protocol() != IPPROTO_TCP {
        count(reason::SKIP_NOT_TCP);
        return Ok(ALLOW);
    }
    let cfg = config().ok_or(reason::ERR_NO_CONFIG)?;
    let ip_be = sa.dst_ip6_be();
    let port_be = sa.dst_port_be();

    // An AF_INET6 socket talking IPv4 (`::ffff:a.b.c.d`) runs only connect6: apply the v4
    // rules, keep the v4 original destination, and send it to `::ffff:<outbound v4>`, which
    // reaches the proxy's AF_INET listener.
    if is_v4_mapped(ip_be) {
        let ip4_be = ip_be[3];
        return match decide_v4(&sa, &cfg, ip4_be, port_be) {
            Decision::Capture => {
                if let Some((ep_ip_be, ep_port_be)) =
                    fast_path_v4(&sa, &cfg, ip4_be, port_be, IPPROTO_TCP)
                {
                    remember_peer(ctx, OrigDstValue::v4(ip4_be, port_be));
                    sa.set_dst6([ip_be[0], ip_be[1], ip_be[2], ep_ip_be], ep_port_be);
                    count(reason::FAST_PATH_V4);
                    return Ok(ALLOW);
                }
                if !proxy_listening4(ctx, cfg.outbound_ip4_be, cfg.outbound_port4_be) {
                    return Ok(proxy_down(&sa, &cfg, OrigDstValue::v4(ip4_be, port_be)));
                }
                remember(ctx, &sa, OrigDstValue::v4(ip4_be, port_be))?;
                sa.set_dst6(
                    [ip_be[0], ip_be[1], ip_be[2], cfg.outbound_ip4_be],
                    cfg.outbound_port4_be,
                );
                count(reason::CAPTURED_V4_MAPPED);
                Ok(ALLOW)
            }
            other => Ok(not_captured(&sa, other, OrigDstValue::v4(ip4_be, port_be))),
        };
    }

    if cfg.capture_v6 == 0 {
        count(reason::SKIP_V6_DISABLED);
        return Ok(ALLOW);
    }
    let facts = Facts {
        sa: &sa,
        node_mode: cfg.node_mode != 0,
        port_be,
        ip: Dst::V6(ip_be),
    };
    match capture_decision(&cfg, &facts) {
        Decision::Capture => {
            // Kernel fast path: an IPv6 plain-L4 service connects straight to an endpoint.
            if let Some((ep_ip_be, ep_port_be)) = fast_path_v6(&sa, &cfg, ip_be, port_be) {
                remember_peer(ctx, OrigDstValue::v6(ip_be, port_be));
                sa.set_dst6(ep_ip_be, ep_port_be);
                count(reason::FAST_PATH_V6);
                return Ok(ALLOW);
            }
            if !proxy_listening6(ctx, cfg.outbound_ip6_be, cfg.outbound_port6_be) {
                return Ok(proxy_down(&sa, &cfg, OrigDstValue::v6(ip_be, port_be)));
            }
            remember(ctx, &sa, OrigDstValue::v6(ip_be, port_be))?;
            sa.set_dst6(cfg.outbound_ip6_be, cfg.outbound_port6_be);
            count(reason::CAPTURED_V6);
            Ok(ALLOW)
        }
        other => Ok(not_captured(&sa, other, OrigDstValue::v6(ip_be, port_be))),
    }
}

/// The capture decision for an IPv4 destination (plain or v4-mapped).
#[inline(always)]
fn decide_v4(sa: &SockAddr<'_>, cfg: &ConfigValue, ip_be: u32, port_be: u16) -> Decision {
    let facts = Facts {
        sa,
        node_mode: cfg.node_mode != 0,
        port_be,
        ip: Dst::V4(ip_be),
    };
    capture_decision(cfg, &facts)
}

/// A destination address, network order.
#[derive(Clone, Copy)]
enum Dst {
    V4(u32),
    V6([u32; 4]),
}

/// The facts `capture_decision` asks for, looked up only when asked.
struct Facts<'a, 'c> {
    sa: &'a SockAddr<'c>,
    node_mode: bool,
    port_be: u16,
    ip: Dst,
}

impl ConnectFacts for Facts<'_, '_> {
    #[inline(always)]
    fn sk_mark(&self) -> u32 {
        self.sa.sk_mark()
    }

    #[inline(always)]
    fn dst_local(&self) -> bool {
        match self.ip {
            Dst::V4(ip) => is_local_v4(ip),
            Dst::V6(ip) => is_local_v6(ip),
        }
    }

    #[inline(always)]
    fn meshed(&self) -> bool {
        self.node_mode && task_is_meshed()
    }

    #[inline(always)]
    fn port_excluded(&self) -> bool {
        found(SKIFF_EXCL_PORT.get_ptr(ExcludePortKey {
            port_be: self.port_be,
            _pad: 0,
        }))
    }

    #[inline(always)]
    fn cidr_excluded(&self) -> bool {
        match self.ip {
            Dst::V4(addr_be) => found(
                SKIFF_EXCL_V4
                    .get(Key::new(32, CidrV4Key { addr_be }))
                    .map(|v| v as *const u8),
            ),
            Dst::V6(addr_be) => found(
                SKIFF_EXCL_V6
                    .get(Key::new(128, CidrV6Key { addr_be }))
                    .map(|v| v as *const u8),
            ),
        }
    }
}

/// Whether a lookup hit, as a plain boolean: `black_box` keeps LLVM from combining two
/// lookups' null checks into arithmetic on possibly-null map pointers (rejected by the verifier).
#[inline(always)]
fn found<T>(p: Option<*const T>) -> bool {
    core::hint::black_box(p.is_some())
}

/// Node mode: the calling task's cgroup (exactly; not its ancestors) is meshed.
#[inline(always)]
fn task_is_meshed() -> bool {
    // SAFETY: plain helper call without arguments.
    let id = unsafe { bpf_get_current_cgroup_id() };
    found(SKIFF_MESHED_V2.get_ptr(id))
}

/// The fast-path scope whose services the calling task sees: `NODE_SCOPE` in sidecar mode,
/// else the scope its meshed cgroup is registered with (`None`: not meshed, which
/// `capture_decision` already ruled out; such a connect never takes the fast path).
#[inline(always)]
fn caller_scope(cfg: &ConfigValue) -> Option<u32> {
    if cfg.node_mode == 0 {
        return Some(NODE_SCOPE);
    }
    // SAFETY: plain helper call without arguments.
    let id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is copied out at once.
    unsafe { SKIFF_MESHED_V2.get(id) }.copied()
}

/// The kernel fast path for an IPv4 service of protocol `proto`: the endpoint (address, port,
/// network order) to connect to, or `None` to send the connect to the proxy (TCP) or leave it
/// alone (UDP): not a fast-path service in the active generation, no healthy endpoint, or an
/// internal error; each but the first counted.
#[inline(always)]
fn fast_path_v4(
    sa: &SockAddr<'_>,
    cfg: &ConfigValue,
    ip_be: u32,
    port_be: u16,
    proto: u32,
) -> Option<(u32, u16)> {
    if cfg.fast_path == 0 {
        return None;
    }
    let key = ServiceKeyV4 {
        scope: caller_scope(cfg)?,
        vip_be: ip_be,
        port_be,
        proto: proto as u8,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    let svc = unsafe { SKIFF_SVC4_V2.get(key) }.copied()?;
    // Per-service counters count TCP connects (`cx_total`); UDP shows in the reason counters.
    let stat = if proto == IPPROTO_TCP {
        Some(key)
    } else {
        None
    };
    let ep = fast_pick(sa, cfg, svc, ip_be, port_be, stat, AF_INET)?;
    // One event per TCP connect; UDP datagrams would flood the ring.
    if proto == IPPROTO_TCP {
        emit(
            sa,
            Emit {
                verdict: VERDICT_FAST_PATH,
                family: AF_INET as u8,
                scope: key.scope,
                orig: OrigDstValue::v4(ip_be, port_be),
                ep_ip_be: ep.addr_be,
                ep_port_be: ep.port_be,
            },
        );
    }
    Some((ep.addr_be[0], ep.port_be))
}

/// The kernel fast path for an IPv6 service (not v4-mapped): as [`fast_path_v4`], with IPv6
/// endpoints.
#[inline(always)]
fn fast_path_v6(
    sa: &SockAddr<'_>,
    cfg: &ConfigValue,
    ip_be: [u32; 4],
    port_be: u16,
) -> Option<([u32; 4], u16)> {
    if cfg.fast_path == 0 {
        return None;
    }
    let key = ServiceKeyV6 {
        scope: caller_scope(cfg)?,
        vip_be: ip_be,
        port_be,
        proto: IPPROTO_TCP as u8,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    let svc = unsafe { SKIFF_SVC6_V2.get(key) }.copied()?;
    let vip_word = ip_be[0] ^ ip_be[1] ^ ip_be[2] ^ ip_be[3];
    let ep = fast_pick(sa, cfg, svc, vip_word, port_be, None, AF_INET6)?;
    emit(
        sa,
        Emit {
            verdict: VERDICT_FAST_PATH,
            family: AF_INET6 as u8,
            scope: key.scope,
            orig: OrigDstValue::v6(ip_be, port_be),
            ep_ip_be: ep.addr_be,
            ep_port_be: ep.port_be,
        },
    );
    Some((ep.addr_be, ep.port_be))
}

/// Picks the endpoint of a service hit in the active generation (its family must be
/// `family`); `stat` is the key of the per-service counters (IPv4 services).
#[inline(always)]
fn fast_pick(
    sa: &SockAddr<'_>,
    cfg: &ConfigValue,
    svc: ServiceValue,
    vip_word_be: u32,
    port_be: u16,
    stat: Option<ServiceKeyV4>,
    family: u32,
) -> Option<EndpointValue> {
    // One read of the generation for the whole lookup (cfg is a copy).
    let idx = if cfg.fast_gen & 1 == 0 {
        svc.cluster_idx[0]
    } else {
        svc.cluster_idx[1]
    };
    if idx == NO_CLUSTER {
        count(reason::FAST_FALLBACK);
        service_count(stat, ServiceEvent::Fallback);
        return None;
    }
    let Some(cluster) = SKIFF_CLUSTERS.get(idx).copied() else {
        count(reason::ERR_FAST_SLOT);
        return None;
    };
    let mut draws = Draws::default();
    match cluster.lb_policy {
        LB_ROUND_ROBIN => {
            if let Some(p) = SKIFF_RR.get_ptr_mut(idx) {
                // SAFETY: per-CPU slot from a successful lookup; no other program runs on
                // this CPU's slot meanwhile.
                unsafe {
                    draws.rr_cursor = *p;
                    *p = draws.rr_cursor.wrapping_add(1);
                }
            }
        }
        LB_RANDOM | LB_LEAST_REQUEST => {
            // SAFETY: plain helper calls.
            draws.random = unsafe { [bpf_get_prandom_u32(), bpf_get_prandom_u32()] };
        }
        LB_MAGLEV => {
            // The client is its bound source address, else its network namespace (the pod):
            // before connect() returns the kernel has not picked a source address yet.
            let src = if family == AF_INET {
                sa.src_ip4_be()
            } else {
                0
            };
            let client = if src != 0 {
                u64::from(src)
            } else {
                sa.netns_cookie()
            };
            draws.client_hash = client_hash(client, vip_word_be, port_be);
        }
        _ => {}
    }
    let facts = KernelSlots {
        slot_base: cluster.slot_base,
        maglev_base: cluster.maglev_base,
    };
    let Some(offset) = pick_slot(&cluster, &draws, &facts) else {
        count(reason::FAST_NO_HEALTHY);
        service_count(stat, ServiceEvent::NoHealthy);
        return None;
    };
    let Some(ep) = SKIFF_ENDPOINTS
        .get(cluster.slot_base.wrapping_add(offset))
        .copied()
    else {
        count(reason::ERR_FAST_SLOT);
        return None;
    };
    if ep.health != HEALTH_OK || u32::from(ep.family) != family {
        count(reason::FAST_NO_HEALTHY);
        service_count(stat, ServiceEvent::NoHealthy);
        return None;
    }
    service_count(stat, ServiceEvent::Connect);
    // sock_ops counts the connection against this endpoint from TCP_CONNECT_CB to TCP_CLOSE;
    // UDP sockets never reach sock_ops, so tracking them would only fill the LRU.
    if sa.protocol() == IPPROTO_TCP
        && SKIFF_FAST_SK
            .insert(sa.socket_cookie(), EndpointKey::of(&ep), 0)
            .is_err()
    {
        count(reason::ERR_FAST_TRACK);
    }
    Some(ep)
}

/// What happened to one connect to a fast-path service.
#[derive(Clone, Copy)]
enum ServiceEvent {
    Connect,
    Fallback,
    NoHealthy,
}

/// Bumps the service's per-CPU counter for `event` (creating its entry on first use).
#[inline(always)]
fn service_count(key: Option<ServiceKeyV4>, event: ServiceEvent) {
    let Some(key) = key else {
        return;
    };
    let p = match SKIFF_SVCST_V2.get_ptr_mut(key) {
        Some(p) => p,
        None => {
            let _ = SKIFF_SVCST_V2.insert(key, ServiceStats::default(), 0);
            match SKIFF_SVCST_V2.get_ptr_mut(key) {
                Some(p) => p,
                None => return,
            }
        }
    };
    // SAFETY: per-CPU value from a successful lookup; no other program runs on this CPU's
    // copy meanwhile.
    unsafe {
        match event {
            ServiceEvent::Connect => (*p).connects += 1,
            ServiceEvent::Fallback => (*p).fallbacks += 1,
            ServiceEvent::NoHealthy => (*p).no_healthy += 1,
        }
    }
}

/// The map facts a choice reads, for one cluster of the active generation.
struct KernelSlots {
    slot_base: u32,
    maglev_base: u32,
}

impl KernelSlots {
    #[inline(always)]
    fn endpoint(&self, offset: u32) -> Option<EndpointValue> {
        SKIFF_ENDPOINTS
            .get(self.slot_base.wrapping_add(offset))
            .copied()
    }
}

impl SlotFacts for KernelSlots {
    #[inline(always)]
    fn weight_end(&self, offset: u32) -> Option<u32> {
        self.endpoint(offset).map(|e| e.weight_end)
    }

    #[inline(always)]
    fn load(&self, offset: u32) -> u64 {
        let Some(ep) = self.endpoint(offset) else {
            return u64::MAX;
        };
        let key = EndpointKey::of(&ep);
        let active = match SKIFF_EP_ACTIVE.get_ptr(key) {
            // SAFETY: pointer from a successful lookup; one 8-byte load (sock_ops updates it
            // with atomic adds).
            Some(p) => unsafe { core::ptr::read_volatile(&raw const (*p).active) },
            None => 0,
        };
        // A close racing a lost increment can wrap the counter below zero: read that as idle.
        let active = if active >> 63 != 0 { 0 } else { active };
        let exported = match SKIFF_EP_LOAD.get_ptr(key) {
            // SAFETY: as above.
            Some(p) => unsafe { core::ptr::read_volatile(p) },
            None => 0,
        };
        active + u64::from(exported)
    }

    #[inline(always)]
    fn maglev(&self, entry: u32) -> Option<u32> {
        SKIFF_MAGLEV
            .get(self.maglev_base.wrapping_add(entry))
            .copied()
    }
}

/// Remembers the address the app connected to in the socket's storage, so getpeername4 can
/// answer it for a fast-path socket. Best effort: without it the app sees the endpoint.
/// (Captured sockets keep showing the proxy listener as their peer, as they always have.)
#[inline(always)]
fn remember_peer(ctx: &SockAddrContext, mut orig: OrigDstValue) {
    // SAFETY: the helper reads the context's socket pointer; the value is copied in.
    let _ = unsafe { SKIFF_PEER.get_or_insert_ptr_mut(ctx, Some(&mut orig)) };
}

/// Drops the socket's remembered VIP (a UDP socket connected again, now to no service).
#[inline(always)]
fn forget_peer(ctx: &SockAddrContext) {
    // SAFETY: reading the context's socket pointer (PTR_TO_SOCKET in a sock_addr program).
    let sk = unsafe { core::ptr::read_volatile(&raw const (*ctx.sock_addr).__bindgen_anon_1.sk) };
    // SAFETY: `sk` is the program's own socket; a missing entry is not an error worth counting.
    let _ = unsafe { SKIFF_PEER.delete(sk) };
}

/// Records the original destination under the socket cookie; on failure the caller does not
/// rewrite (fail open: the connect goes to its original destination).
#[inline(always)]
fn remember(ctx: &SockAddrContext, sa: &SockAddr<'_>, orig: OrigDstValue) -> Result<(), u32> {
    if SKIFF_COOKIE.insert(sa.socket_cookie(), orig, 0).is_err() {
        error!(ctx, "skiff: cookie map insert failed; connect not captured");
        return Err(reason::ERR_COOKIE_INSERT);
    }
    Ok(())
}

/// The proxy's liveness as the kernel sees it: a TCP listener exists at the outbound address
/// in the caller's network namespace (where the rewritten connect would land). A killed skiff
/// leaves its pinned programs and an open gate behind, but its listening sockets close with
/// it, so this needs no heartbeat and no userspace write: it is exact the moment the process
/// is gone (or its listeners are closed by a drain).
#[inline(always)]
fn proxy_listening4(ctx: &SockAddrContext, ip_be: u32, port_be: u16) -> bool {
    let mut tuple = Tuple4 {
        saddr_be: 0,
        daddr_be: ip_be,
        sport_be: 0,
        dport_be: port_be,
    };
    sk_exists(
        ctx,
        (&raw mut tuple).cast(),
        core::mem::size_of::<Tuple4>() as u32,
    )
}

/// [`proxy_listening4`] for the IPv6 outbound listener.
#[inline(always)]
fn proxy_listening6(ctx: &SockAddrContext, ip_be: [u32; 4], port_be: u16) -> bool {
    let mut tuple = Tuple6 {
        saddr_be: [0; 4],
        daddr_be: ip_be,
        sport_be: 0,
        dport_be: port_be,
    };
    sk_exists(
        ctx,
        (&raw mut tuple).cast(),
        core::mem::size_of::<Tuple6>() as u32,
    )
}

/// `bpf_sock_tuple`'s IPv4 half (addresses and ports network order).
#[repr(C)]
struct Tuple4 {
    saddr_be: u32,
    daddr_be: u32,
    sport_be: u16,
    dport_be: u16,
}

/// `bpf_sock_tuple`'s IPv6 half.
#[repr(C)]
struct Tuple6 {
    saddr_be: [u32; 4],
    daddr_be: [u32; 4],
    sport_be: u16,
    dport_be: u16,
}

/// One `bpf_sk_lookup_tcp` in the current network namespace: the zero source never matches an
/// established socket, so only a listener on the destination is found.
#[inline(always)]
fn sk_exists(ctx: &SockAddrContext, tuple: *mut bpf_sock_tuple, size: u32) -> bool {
    // SAFETY: `tuple` points to an initialised stack value of `size` bytes; a found socket
    // is released at once, as the verifier requires.
    unsafe {
        let sk = bpf_sk_lookup_tcp(ctx.as_ptr(), tuple, size, BPF_F_CURRENT_NETNS as u64, 0);
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
    }
    true
}

/// The verdict for a captured connect whose proxy is gone: the fail mode, counted apart and
/// reported as an event.
#[inline(always)]
fn proxy_down(sa: &SockAddr<'_>, cfg: &ConfigValue, orig: OrigDstValue) -> i32 {
    let decision = proxy_down_decision(cfg);
    let verdict = match decision {
        Decision::Reject => VERDICT_PROXY_DOWN_CLOSED,
        _ => VERDICT_PROXY_DOWN_OPEN,
    };
    emit(sa, fail_event(verdict, orig));
    match decision {
        Decision::Reject => {
            count(reason::REJECT_PROXY_DOWN);
            // SAFETY: plain helper call; cgroup sock_addr programs may set the return value.
            if unsafe { bpf_set_retval(-ECONNREFUSED) } != 0 {
                count(reason::ERR_SET_RETVAL);
            }
            DENY
        }
        other => not_captured(sa, other, orig),
    }
}

/// A fail-open / fail-closed event for the connect to `orig` (no endpoint, no scope).
#[inline(always)]
fn fail_event(verdict: u8, orig: OrigDstValue) -> Emit {
    Emit {
        verdict,
        family: orig.family,
        scope: 0,
        orig,
        ep_ip_be: [0; 4],
        ep_port_be: 0,
    }
}

/// Counts a pass or refuses the connect (fail-closed while the proxy is not ready). The
/// not-ready decisions, open or closed, are reported as events.
#[inline(always)]
fn not_captured(sa: &SockAddr<'_>, decision: Decision, orig: OrigDstValue) -> i32 {
    match decision {
        Decision::Reject => emit(sa, fail_event(VERDICT_NOT_READY_CLOSED, orig)),
        Decision::Pass(reason::SKIP_NOT_READY) => {
            emit(sa, fail_event(VERDICT_NOT_READY_OPEN, orig))
        }
        _ => {}
    }
    match decision {
        Decision::Pass(why) => {
            count(why);
            ALLOW
        }
        Decision::Reject => {
            count(reason::REJECT_NOT_READY);
            // ECONNREFUSED is what a connect to a closed port gets; without it, DENY alone
            // gives EPERM.
            // SAFETY: plain helper call; cgroup sock_addr programs may set the return value.
            if unsafe { bpf_set_retval(-ECONNREFUSED) } != 0 {
                count(reason::ERR_SET_RETVAL);
            }
            DENY
        }
        Decision::Capture => ALLOW,
    }
}
