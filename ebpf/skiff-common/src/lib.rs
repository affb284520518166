//! Map key/value types shared by skiff's eBPF programs and userspace.
//!
//! Every type is `#[repr(C)]` with explicit, zeroed padding so that hash keys carry no
//! uninitialised bytes. Address and port fields carry their byte order in their names:
//! `_be` is network order (exactly the bytes on the wire), `_host` is host order.
//! Kernel code compares `_be` fields as they come from the context and never converts;
//! behind the `user` feature, the constructors from and to `std::net` types are the only
//! place in userspace where `to_be`/`from_be` appear.
//!
//! Decisions that do not need a map or a helper call are plain functions here
//! ([`capture_decision`], [`is_loopback_v4`], ...) so that host unit tests exercise the same
//! code the kernel runs.
#![no_std]

#[cfg(feature = "user")]
extern crate std;

pub mod events;
pub mod inbound;
pub mod sockmap;
pub mod xdp;

/// `AF_INET`, host order, as found in `user_family` / `family` context fields.
pub const AF_INET: u32 = 2;
/// `AF_INET6`, host order.
pub const AF_INET6: u32 = 10;
/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u32 = 6;
/// `IPPROTO_UDP`.
pub const IPPROTO_UDP: u32 = 17;
/// `SOL_IP`: level of `SO_ORIGINAL_DST`.
pub const SOL_IP: i32 = 0;
/// `SOL_IPV6`: level of `IP6T_SO_ORIGINAL_DST`.
pub const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` and `IP6T_SO_ORIGINAL_DST` share the option number 80.
pub const SO_ORIGINAL_DST: i32 = 80;
/// Error returned when a proxy-port socket has no recorded original destination.
pub const ENOENT: i32 = 2;
/// Error returned by `connect()` in fail-closed mode while the proxy is not ready.
pub const ECONNREFUSED: i32 = 111;

/// Index of the single [`ConfigValue`] in `SKIFF_CONFIG`.
pub const CONFIG_INDEX: u32 = 0;

// === Config ===

/// Proxy configuration read by every hook: one entry at index 0 of the `SKIFF_CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigValue {
    /// IPv6 outbound listener address (four network-order words).
    pub outbound_ip6_be: [u32; 4],
    /// IPv4 outbound listener address, network order.
    pub outbound_ip4_be: u32,
    /// SO_MARK the proxy puts on its upstream sockets (compared with `bpf_sock.mark`).
    pub proxy_mark_host: u32,
    /// IPv4 outbound listener port, network order (written into `user_port`).
    pub outbound_port4_be: u16,
    /// IPv4 outbound listener port, host order (compared with `bpf_sock.src_port`).
    pub outbound_port4_host: u16,
    /// IPv6 outbound listener port, network order.
    pub outbound_port6_be: u16,
    /// IPv6 outbound listener port, host order.
    pub outbound_port6_host: u16,
    /// 1 once the proxy's outbound listener accepts connections; 0 otherwise.
    pub ready: u8,
    /// 1: while not ready, connects fail with ECONNREFUSED; 0: they go to their original destination.
    pub fail_closed: u8,
    /// 1: IPv6 (non v4-mapped) destinations are captured.
    pub capture_v6: u8,
    /// 1: node mode, only tasks whose cgroup id is in `SKIFF_MESHED_V2` are captured.
    pub node_mode: u8,
    /// 1: connect4 looks services up in `SKIFF_SVC4_V2` and connects hits straight to an
    /// endpoint (kernel fast path). Written by the reconciler once a generation is complete.
    pub fast_path: u8,
    /// The active generation (0 or 1) of the fast-path cluster/endpoint data: connect4 reads
    /// `ServiceValue::cluster_idx[fast_gen]`. The reconciler writes the other generation, then
    /// flips this byte (one config write).
    pub fast_gen: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<ConfigValue>() == 40);
const _: () = assert!(core::mem::align_of::<ConfigValue>() == 4);

// === Original destinations ===

/// An original destination recorded by connect4/6 (value of `SKIFF_COOKIE_ORIG_DST` and `SKIFF_ORIG_DST`).
///
/// `family` is [`AF_INET`] (address in `ip_be[0]`, other words zero) or [`AF_INET6`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDstValue {
    /// Address, network-order words; v4 uses word 0 only.
    pub ip_be: [u32; 4],
    /// Port, network order.
    pub port_be: u16,
    /// `AF_INET` or `AF_INET6`, host order.
    pub family: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<OrigDstValue>() == 20);
const _: () = assert!(core::mem::align_of::<OrigDstValue>() == 4);

impl OrigDstValue {
    /// An IPv4 original destination.
    #[inline(always)]
    pub const fn v4(ip_be: u32, port_be: u16) -> Self {
        Self {
            ip_be: [ip_be, 0, 0, 0],
            port_be,
            family: AF_INET as u8,
            _pad: 0,
        }
    }

    /// An IPv6 original destination.
    #[inline(always)]
    pub const fn v6(ip_be: [u32; 4], port_be: u16) -> Self {
        Self {
            ip_be,
            port_be,
            family: AF_INET6 as u8,
            _pad: 0,
        }
    }
}

/// One captured TCP connection as both ends see it (key of `SKIFF_ORIG_DST`).
///
/// The client's connecting socket (sock_ops) and the proxy's accepted socket (getsockopt)
/// build the same key. v4-mapped IPv6 tuples are normalised to `family` [`AF_INET`], so the
/// proxy's AF_INET listener finds them. v4 uses word 0 of the address arrays only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// `bpf_get_netns_cookie`: loopback tuples repeat across network namespaces.
    pub netns_cookie: u64,
    /// The connecting (client) address, network-order words.
    pub client_ip_be: [u32; 4],
    /// The proxy listener address the connect was rewritten to, network-order words.
    pub listener_ip_be: [u32; 4],
    /// Client port, network order.
    pub client_port_be: u16,
    /// Listener port, network order.
    pub listener_port_be: u16,
    /// `AF_INET` or `AF_INET6`, host order.
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<ConnKey>() == 48);
const _: () = assert!(core::mem::align_of::<ConnKey>() == 8);

impl ConnKey {
    /// An IPv4 (or v4-mapped, normalised) connection.
    #[inline(always)]
    pub const fn v4(
        netns_cookie: u64,
        client_ip_be: u32,
        client_port_be: u16,
        listener_ip_be: u32,
        listener_port_be: u16,
    ) -> Self {
        Self {
            netns_cookie,
            client_ip_be: [client_ip_be, 0, 0, 0],
            listener_ip_be: [listener_ip_be, 0, 0, 0],
            client_port_be,
            listener_port_be,
            family: AF_INET as u8,
            _pad: [0; 3],
        }
    }

    /// An IPv6 connection.
    #[inline(always)]
    pub const fn v6(
        netns_cookie: u64,
        client_ip_be: [u32; 4],
        client_port_be: u16,
        listener_ip_be: [u32; 4],
        listener_port_be: u16,
    ) -> Self {
        Self {
            netns_cookie,
            client_ip_be,
            listener_ip_be,
            client_port_be,
            listener_port_be,
            family: AF_INET6 as u8,
            _pad: [0; 3],
        }
    }
}

// === Exclusions ===

/// Key of `SKIFF_EXCLUDE_PORTS`: a destination port never captured.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExcludePortKey {
    /// Destination port, network order.
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<ExcludePortKey>() == 4);

/// Data part of an `SKIFF_EXCLUDE_V4` LPM-trie key (the prefix length is in the trie key).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidrV4Key {
    /// Network address, network order.
    pub addr_be: u32,
}
const _: () = assert!(core::mem::size_of::<CidrV4Key>() == 4);

/// Data part of an `SKIFF_EXCLUDE_V6` LPM-trie key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidrV6Key {
    /// Network address, network-order words.
    pub addr_be: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<CidrV6Key>() == 16);

// === Kernel fast path (services, clusters, endpoint slots) ===

/// `ServiceValue::cluster_idx` of a generation in which the service does not exist.
pub const NO_CLUSTER: u32 = u32::MAX;
/// `ClusterValue::lb_policy`: round robin over the slots (a per-CPU cursor per cluster),
/// weight-aware when [`CLUSTER_WEIGHTED`] is set.
pub const LB_ROUND_ROBIN: u8 = 1;
/// `ClusterValue::lb_policy`: uniform random slot (`bpf_get_prandom_u32`); Envoy's RANDOM
/// ignores endpoint weights too.
pub const LB_RANDOM: u8 = 2;
/// `ClusterValue::lb_policy`: power of two choices over the endpoints' load (connections the
/// kernel counts plus the load userspace exports), Envoy's LEAST_REQUEST with equal weights.
pub const LB_LEAST_REQUEST: u8 = 3;
/// `ClusterValue::lb_policy`: the client hash indexes a Maglev table built in userspace.
pub const LB_MAGLEV: u8 = 4;
/// `ClusterValue::flags`: endpoint weights differ; weighted policies search `weight_end`.
pub const CLUSTER_WEIGHTED: u8 = 1;
/// `ClusterValue::flags`: the weights are eligible shares (priority load, panic, locality
/// weights): RANDOM draws by weight too.
pub const CLUSTER_SHARES: u8 = 2;
/// `EndpointValue::health`: the slot may be chosen.
pub const HEALTH_OK: u8 = 1;
/// Entries of one kernel Maglev table (a prime, as Maglev needs). Smaller than Envoy's 65537 so
/// that a table per cluster fits a map: 4093 entries (16 KiB) keep the spread within about
/// hosts/4093 of the weights for the cluster sizes a service has.
pub const MAGLEV_TABLE_SIZE: u32 = 4093;
/// Steps of the bounded binary search over a cluster's `weight_end` (covers 2^20 slots).
pub const MAX_SEARCH_STEPS: u32 = 20;

/// Key of `SKIFF_SVC4_V2`: an IPv4 service (scope, VIP, port, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKeyV4 {
    /// Whose configuration this service belongs to: [`NODE_SCOPE`] (the sidecar's or the node's
    /// own), else a node-mode pod pipeline's scope (`SKIFF_MESHED_V2` maps the caller's cgroup to
    /// it). A connect only looks up services of its own scope.
    pub scope: u32,
    /// Service VIP, network order.
    pub vip_be: u32,
    /// Service port, network order.
    pub port_be: u16,
    /// IP protocol ([`IPPROTO_TCP`] or [`IPPROTO_UDP`]).
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKeyV4>() == 12);
const _: () = assert!(core::mem::align_of::<ServiceKeyV4>() == 4);

/// Key of `SKIFF_SVC6_V2`: an IPv6 service (scope, VIP, port, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKeyV6 {
    /// Scope, as [`ServiceKeyV4::scope`].
    pub scope: u32,
    /// Service VIP, network-order words.
    pub vip_be: [u32; 4],
    /// Service port, network order.
    pub port_be: u16,
    /// IP protocol ([`IPPROTO_TCP`] or [`IPPROTO_UDP`]).
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKeyV6>() == 24);

/// The scope of the sidecar's (or the node proxy's own) configuration; node-mode pod
/// pipelines get scopes from 1 up. Also the value of `SKIFF_MESHED_V2` for a cgroup meshed
/// without a pod pipeline (`skiff node add-cgroup`).
pub const NODE_SCOPE: u32 = 0;
const _: () = assert!(core::mem::align_of::<ServiceKeyV6>() == 4);

/// Value of `SKIFF_SVC4_V2` and `SKIFF_SVC6_V2`.
///
/// `cluster_idx[g]` is the absolute index into `SKIFF_CLUSTERS` of this service's cluster in
/// generation `g` (cluster data of generation `g` lives at `g * max_clusters ..`), or
/// [`NO_CLUSTER`] when the service does not exist in that generation. Both are written in one
/// value update, so flipping `ConfigValue::fast_gen` switches every service at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Absolute cluster index per generation (or [`NO_CLUSTER`]).
    pub cluster_idx: [u32; 2],
    /// Reserved flags (0).
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 12);
const _: () = assert!(core::mem::align_of::<ServiceValue>() == 4);

/// Value of `SKIFF_CLUSTERS` (an array: `generation * max_clusters + cluster id`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterValue {
    /// Absolute index of the first endpoint slot in `SKIFF_ENDPOINTS` (generation-specific:
    /// generation `g` owns `g * max_endpoints ..`).
    pub slot_base: u32,
    /// Number of contiguous slots; 0: no healthy endpoint (the connect goes to the proxy).
    pub endpoint_count: u32,
    /// Sum of the slots' weights (the last slot's `weight_end`).
    pub total_weight: u32,
    /// Weighted round robin walks the weight space `cursor * rr_stride mod total_weight`: the
    /// stride is coprime to the total, so every cycle hits each unit of weight once, and
    /// consecutive connects land on different endpoints instead of in runs.
    pub rr_stride: u32,
    /// [`LB_MAGLEV`]: absolute index of this cluster's first entry in `SKIFF_MAGLEV`
    /// ([`MAGLEV_TABLE_SIZE`] entries, generation-specific like the slots).
    pub maglev_base: u32,
    /// [`LB_ROUND_ROBIN`], [`LB_RANDOM`], [`LB_LEAST_REQUEST`] or [`LB_MAGLEV`].
    pub lb_policy: u8,
    /// [`CLUSTER_WEIGHTED`] and [`CLUSTER_SHARES`] bits.
    pub flags: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<ClusterValue>() == 24);
const _: () = assert!(core::mem::align_of::<ClusterValue>() == 4);

/// Value of `SKIFF_ENDPOINTS` (an array of slots; a cluster's slots are contiguous).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointValue {
    /// Endpoint address, network-order words; IPv4 uses word 0 only.
    pub addr_be: [u32; 4],
    /// Endpoint port, network order.
    pub port_be: u16,
    /// `AF_INET` or `AF_INET6`, host order.
    pub family: u8,
    /// [`HEALTH_OK`] or 0.
    pub health: u8,
    /// `load_balancing_weight` (at least 1).
    pub weight: u32,
    /// Sum of the weights of this cluster's slots up to and including this one: a weighted
    /// draw `d` (below the cluster's `total_weight`) picks the first slot with `d < weight_end`.
    pub weight_end: u32,
}
const _: () = assert!(core::mem::size_of::<EndpointValue>() == 28);
const _: () = assert!(core::mem::align_of::<EndpointValue>() == 4);

/// Key of the per-endpoint load maps (`SKIFF_EP_ACTIVE`, `SKIFF_EP_LOAD`) and value of
/// `SKIFF_FAST_SK`: an endpoint by address, so its load survives generation flips (slots move).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    /// Endpoint address, network-order words; IPv4 uses word 0 only.
    pub addr_be: [u32; 4],
    /// Endpoint port, network order.
    pub port_be: u16,
    /// `AF_INET` or `AF_INET6`, host order.
    pub family: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<EndpointKey>() == 20);
const _: () = assert!(core::mem::align_of::<EndpointKey>() == 4);

/// Key of `SKIFF_UDP_REV`: which VIP an unconnected UDP socket's datagram to an endpoint was
/// really sent to, so recvmsg4 can show the endpoint's replies as coming from the VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UdpRevKey {
    /// Socket cookie of the sending socket.
    pub cookie: u64,
    /// Endpoint address (IPv4), network order.
    pub ep_ip_be: u32,
    /// Endpoint port, network order.
    pub ep_port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<UdpRevKey>() == 16);
const _: () = assert!(core::mem::align_of::<UdpRevKey>() == 8);

/// Value of `SKIFF_UDP_REV`: the VIP the app addressed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UdpRevValue {
    /// Service VIP, network order.
    pub vip_be: u32,
    /// Service port, network order.
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<UdpRevValue>() == 8);
const _: () = assert!(core::mem::align_of::<UdpRevValue>() == 4);

impl EndpointKey {
    /// The key of an endpoint slot.
    #[inline(always)]
    pub fn of(ep: &EndpointValue) -> Self {
        Self {
            addr_be: ep.addr_be,
            port_be: ep.port_be,
            family: ep.family,
            _pad: 0,
        }
    }
}

/// Value of `SKIFF_EP_ACTIVE`: fast-path connections to one endpoint, counted by sock_ops
/// (atomic adds: connects and closes run on any CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointLoad {
    /// Open connections (incremented at TCP_CONNECT_CB, decremented at TCP_CLOSE).
    pub active: u64,
    /// Connections ever opened.
    pub total: u64,
}
const _: () = assert!(core::mem::size_of::<EndpointLoad>() == 16);

/// Value of `SKIFF_SVCST_V2` (per CPU): what happened to connects to one fast-path service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Connects sent straight to an endpoint.
    pub connects: u64,
    /// Connects sent to the proxy because the service is absent from the active generation.
    pub fallbacks: u64,
    /// Connects sent to the proxy because no endpoint could be chosen.
    pub no_healthy: u64,
}
const _: () = assert!(core::mem::size_of::<ServiceStats>() == 24);

/// The random and per-CPU inputs of one endpoint choice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Draws {
    /// The cluster's per-CPU round-robin cursor (incremented by the caller).
    pub rr_cursor: u32,
    /// Two independent random numbers (RANDOM uses the first, LEAST_REQUEST both).
    pub random: [u32; 2],
    /// Hash of the client and service ([`client_hash`]), for MAGLEV.
    pub client_hash: u64,
}

/// What a choice reads from the maps, by slot offset within the cluster (0..endpoint_count).
pub trait SlotFacts {
    /// The slot's `weight_end` (`None`: lookup failed).
    fn weight_end(&self, offset: u32) -> Option<u32>;
    /// The endpoint's load (kernel-counted connections plus the userspace-exported load).
    fn load(&self, offset: u32) -> u64;
    /// Entry `i` (below [`MAGLEV_TABLE_SIZE`]) of the cluster's Maglev table: a slot offset.
    fn maglev(&self, entry: u32) -> Option<u32>;
}

/// The slot offset (0..endpoint_count) a connect uses, given the cluster, the draws and the
/// map facts. `None` for an empty cluster, an unknown policy or a failed lookup (the connect
/// then goes to the proxy). The kernel and userspace (explain, property tests) both run this.
#[inline(always)]
pub fn pick_slot(c: &ClusterValue, d: &Draws, f: &impl SlotFacts) -> Option<u32> {
    let count = c.endpoint_count;
    if count == 0 {
        return None;
    }
    match c.lb_policy {
        LB_ROUND_ROBIN => {
            if c.flags & CLUSTER_WEIGHTED != 0 && c.total_weight != 0 {
                let draw = weighted_draw(d.rr_cursor, c.rr_stride, c.total_weight);
                weighted_slot(count, draw, f)
            } else {
                Some(d.rr_cursor % count)
            }
        }
        LB_RANDOM => {
            if c.flags & CLUSTER_SHARES != 0 && c.total_weight != 0 {
                weighted_slot(count, d.random[0] % c.total_weight, f)
            } else {
                Some(d.random[0] % count)
            }
        }
        LB_LEAST_REQUEST => {
            // Envoy's power of two choices: two independent picks (possibly the same host),
            // the less loaded wins, the first on a tie.
            let a = d.random[0] % count;
            let b = d.random[1] % count;
            if f.load(b) < f.load(a) {
                Some(b)
            } else {
                Some(a)
            }
        }
        LB_MAGLEV => {
            let entry = (d.client_hash % MAGLEV_TABLE_SIZE as u64) as u32;
            let off = f.maglev(entry)?;
            if off < count { Some(off) } else { None }
        }
        _ => None,
    }
}

/// The unit of weight a weighted round-robin connect takes: `cursor * stride mod total`.
#[inline(always)]
pub fn weighted_draw(cursor: u32, stride: u32, total: u32) -> u32 {
    if total == 0 {
        return 0;
    }
    ((u64::from(cursor) * u64::from(stride)) % u64::from(total)) as u32
}

/// The first slot whose `weight_end` exceeds `draw` (bounded binary search over `count` slots).
#[inline(always)]
pub fn weighted_slot(count: u32, draw: u32, f: &impl SlotFacts) -> Option<u32> {
    let mut lo = 0u32;
    let mut hi = count;
    let mut step = 0;
    while step < MAX_SEARCH_STEPS {
        if lo >= hi {
            break;
        }
        let mid = lo + (hi - lo) / 2;
        if f.weight_end(mid)? > draw {
            hi = mid;
        } else {
            lo = mid + 1;
        }
        step += 1;
    }
    if lo < count { Some(lo) } else { None }
}

/// The client's hash for MAGLEV: the client identity (its bound source IPv4 if any, else the
/// network namespace cookie, i.e. the pod) mixed with the service address. Envoy's tcp_proxy
/// `source_ip` hash policy keys on the client IP the same way; the mixer is splitmix64's.
#[inline(always)]
pub fn client_hash(client: u64, vip_be: u32, port_be: u16) -> u64 {
    let mut z =
        client ^ (u64::from(vip_be) << 16 | u64::from(port_be)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

// === Stats ===

/// Per-reason counters: the index into the per-CPU `SKIFF_STATS` array.
pub mod reason {
    /// connect4 rewrote an IPv4 destination.
    pub const CAPTURED_V4: u32 = 0;
    /// connect6 rewrote an IPv6 destination.
    pub const CAPTURED_V6: u32 = 1;
    /// connect6 rewrote a v4-mapped destination.
    pub const CAPTURED_V4_MAPPED: u32 = 2;
    /// The socket carries the proxy's SO_MARK.
    pub const SKIP_PROXY_MARK: u32 = 3;
    /// Destination is loopback or unspecified.
    pub const SKIP_LOOPBACK: u32 = 4;
    /// Destination port is in the exclude list.
    pub const SKIP_EXCLUDED_PORT: u32 = 5;
    /// Destination address is in an excluded CIDR.
    pub const SKIP_EXCLUDED_CIDR: u32 = 6;
    /// Node mode: the task's cgroup is not meshed.
    pub const SKIP_NOT_MESHED: u32 = 7;
    /// Proxy not ready, fail-open: the connect went to its original destination.
    pub const SKIP_NOT_READY: u32 = 8;
    /// Proxy not ready, fail-closed: the connect was refused.
    pub const REJECT_NOT_READY: u32 = 9;
    /// IPv6 capture is disabled.
    pub const SKIP_V6_DISABLED: u32 = 10;
    /// Not TCP (a UDP connect without the fast path, raw sockets and the like).
    pub const SKIP_NOT_TCP: u32 = 11;
    /// Internal error: no config entry (fail open).
    pub const ERR_NO_CONFIG: u32 = 12;
    /// Internal error: the cookie map insert failed (fail open: the connect is not rewritten).
    pub const ERR_COOKIE_INSERT: u32 = 13;
    /// sock_ops moved a cookie entry to its connection tuple.
    pub const REKEYED: u32 = 14;
    /// Internal error: the tuple map insert failed.
    pub const ERR_TUPLE_INSERT: u32 = 15;
    /// sock_ops removed a tuple entry at TCP_CLOSE.
    pub const CLOSED: u32 = 16;
    /// getsockopt answered with an IPv4 original destination.
    pub const ORIG_DST_V4: u32 = 17;
    /// getsockopt answered with an IPv6 original destination.
    pub const ORIG_DST_V6: u32 = 18;
    /// getsockopt on the proxy port found nothing (ENOENT).
    pub const ORIG_DST_MISS: u32 = 19;
    /// getsockopt's buffer was too small for the answer (passed through).
    pub const ORIG_DST_SHORT_BUF: u32 = 20;
    /// Internal error: the rejection errno could not be set (EPERM returned instead).
    pub const ERR_SET_RETVAL: u32 = 21;
    /// connect4 sent a service connect straight to an endpoint (kernel fast path).
    pub const FAST_PATH_V4: u32 = 22;
    /// A service hit whose cluster is absent from the active generation: sent to the proxy.
    pub const FAST_FALLBACK: u32 = 23;
    /// A service hit whose cluster has no healthy endpoint: sent to the proxy.
    pub const FAST_NO_HEALTHY: u32 = 24;
    /// Internal error: a cluster or endpoint slot index out of range (sent to the proxy).
    pub const ERR_FAST_SLOT: u32 = 25;
    /// getpeername4 answered the service VIP for a fast-path socket.
    pub const PEERNAME_V4: u32 = 26;
    /// Internal error: the fast-path socket could not be tracked (its connection is not
    /// counted in the endpoint's load).
    pub const ERR_FAST_TRACK: u32 = 27;
    /// sock_ops counted a fast-path connection against its endpoint.
    pub const FAST_TRACKED: u32 = 28;
    /// sock_ops released a fast-path connection at TCP_CLOSE.
    pub const FAST_RELEASED: u32 = 29;
    /// connect6 sent an IPv6 service connect straight to an endpoint.
    pub const FAST_PATH_V6: u32 = 30;
    /// getpeername6 answered the IPv6 service VIP for a fast-path socket.
    pub const PEERNAME_V6: u32 = 31;
    /// connect4 sent a connected UDP socket's service address straight to an endpoint.
    pub const FAST_UDP_CONNECT: u32 = 32;
    /// sendmsg4 sent an unconnected UDP datagram for a service straight to an endpoint.
    pub const FAST_UDP_SEND: u32 = 33;
    /// recvmsg4 showed an endpoint's reply as coming from the service VIP.
    pub const FAST_UDP_REPLY: u32 = 34;
    /// Internal error: sendmsg4 could not record the translation for replies (the datagram
    /// still goes to the endpoint; its reply shows the endpoint's address).
    pub const ERR_UDP_REV: u32 = 35;
    /// A UDP socket to a non-service address: left alone (UDP is never sent to the proxy).
    pub const SKIP_UDP_MISS: u32 = 36;
    /// The gate was open but no proxy listener exists where the connect would be sent (skiff
    /// died with its programs pinned, or is draining), fail-open: the connect went to its
    /// original destination.
    pub const SKIP_PROXY_DOWN: u32 = 37;
    /// As [`SKIP_PROXY_DOWN`], fail-closed: the connect was refused (ECONNREFUSED).
    pub const REJECT_PROXY_DOWN: u32 = 38;
    /// Number of reasons (size of the stats array).
    pub const COUNT: u32 = 39;

    /// Counter names, indexed by reason (as shown by admin `/stats`).
    pub const NAMES: [&str; COUNT as usize] = [
        "captured_v4",
        "captured_v6",
        "captured_v4_mapped",
        "skip_proxy_mark",
        "skip_loopback",
        "skip_excluded_port",
        "skip_excluded_cidr",
        "skip_not_meshed",
        "skip_not_ready",
        "reject_not_ready",
        "skip_v6_disabled",
        "skip_not_tcp",
        "err_no_config",
        "err_cookie_insert",
        "rekeyed",
        "err_tuple_insert",
        "closed",
        "orig_dst_v4",
        "orig_dst_v6",
        "orig_dst_miss",
        "orig_dst_short_buf",
        "err_set_retval",
        "fast_path_v4",
        "fast_fallback",
        "fast_no_healthy",
        "err_fast_slot",
        "peername_v4",
        "err_fast_track",
        "fast_tracked",
        "fast_released",
        "fast_path_v6",
        "peername_v6",
        "fast_udp_connect",
        "fast_udp_send",
        "fast_udp_reply",
        "err_udp_rev",
        "skip_udp_miss",
        "skip_proxy_down",
        "reject_proxy_down",
    ];
}

// === Pure decisions ===

/// What connect4/6 does with one connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Rewrite the destination to the proxy.
    Capture,
    /// Leave the connect alone; the value is the stats reason.
    Pass(u32),
    /// Refuse the connect (fail-closed while the proxy is not ready).
    Reject,
}

/// Facts about one connect, asked lazily in decision order, so connect4/6 do only the map
/// lookups a decision needs (and LLVM cannot merge two lookups' null checks into pointer
/// arithmetic the verifier rejects).
pub trait ConnectFacts {
    /// The socket's SO_MARK.
    fn sk_mark(&self) -> u32;
    /// Destination is loopback or unspecified (never captured: loops).
    fn dst_local(&self) -> bool;
    /// The task's cgroup is meshed (only asked in node mode).
    fn meshed(&self) -> bool;
    /// Destination port is excluded.
    fn port_excluded(&self) -> bool;
    /// Destination address is in an excluded CIDR.
    fn cidr_excluded(&self) -> bool;
}

/// Decides a connect. Order matters: the proxy's own sockets and local destinations are
/// never captured (loops), then node-mode membership, then exclusions, then the ready gate
/// (excluded traffic never depends on proxy health).
#[inline(always)]
pub fn capture_decision(cfg: &ConfigValue, f: &impl ConnectFacts) -> Decision {
    if cfg.proxy_mark_host != 0 && f.sk_mark() == cfg.proxy_mark_host {
        return Decision::Pass(reason::SKIP_PROXY_MARK);
    }
    if f.dst_local() {
        return Decision::Pass(reason::SKIP_LOOPBACK);
    }
    if cfg.node_mode != 0 && !f.meshed() {
        return Decision::Pass(reason::SKIP_NOT_MESHED);
    }
    if f.port_excluded() {
        return Decision::Pass(reason::SKIP_EXCLUDED_PORT);
    }
    if f.cidr_excluded() {
        return Decision::Pass(reason::SKIP_EXCLUDED_CIDR);
    }
    if cfg.ready == 0 {
        if cfg.fail_closed != 0 {
            return Decision::Reject;
        }
        return Decision::Pass(reason::SKIP_NOT_READY);
    }
    Decision::Capture
}

/// A captured connect that would go to the proxy when no proxy listener exists (the liveness
/// check of connect4/6): the fail mode applies as for a closed gate, counted apart.
pub fn proxy_down_decision(cfg: &ConfigValue) -> Decision {
    if cfg.fail_closed != 0 {
        Decision::Reject
    } else {
        Decision::Pass(reason::SKIP_PROXY_DOWN)
    }
}

/// 127.0.0.0/8 or 0.0.0.0 (both reach this host): never captured.
#[inline(always)]
pub fn is_local_v4(ip_be: u32) -> bool {
    ip_be.to_ne_bytes()[0] == 127 || ip_be == 0
}

/// ::1 or :: (both reach this host): never captured.
#[inline(always)]
pub fn is_local_v6(ip_be: [u32; 4]) -> bool {
    ip_be[0] == 0
        && ip_be[1] == 0
        && ip_be[2] == 0
        && (ip_be[3] == 0 || ip_be[3].to_ne_bytes() == [0, 0, 0, 1])
}

/// `::ffff:a.b.c.d`: an AF_INET6 socket talking IPv4.
#[inline(always)]
pub fn is_v4_mapped(ip_be: [u32; 4]) -> bool {
    ip_be[0] == 0 && ip_be[1] == 0 && ip_be[2].to_ne_bytes() == [0, 0, 0xff, 0xff]
}

/// The word-2 value of a v4-mapped address (`::ffff:0:0`), network order.
#[inline(always)]
pub fn v4_mapped_word() -> u32 {
    u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

// === Userspace ===

#[cfg(feature = "user")]
mod user {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

    use super::*;

    // SAFETY: repr(C), only integer fields, explicit padding: every bit pattern is valid and
    // there are no uninitialised bytes.
    unsafe impl aya::Pod for ConfigValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for OrigDstValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ExcludePortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CidrV4Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CidrV6Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceKeyV6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ClusterValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EndpointValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EndpointKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EndpointLoad {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for UdpRevKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for UdpRevValue {}

    impl ServiceKeyV4 {
        /// A TCP service at `vip`.
        pub fn tcp(vip: SocketAddrV4) -> Self {
            Self::tcp_in(NODE_SCOPE, vip)
        }

        /// A TCP service at `vip` in `scope`.
        pub fn tcp_in(scope: u32, vip: SocketAddrV4) -> Self {
            Self {
                scope,
                vip_be: v4_be(*vip.ip()),
                port_be: vip.port().to_be(),
                proto: IPPROTO_TCP as u8,
                _pad: 0,
            }
        }

        /// A UDP service at `vip`.
        pub fn udp(vip: SocketAddrV4) -> Self {
            Self::udp_in(NODE_SCOPE, vip)
        }

        /// A UDP service at `vip` in `scope`.
        pub fn udp_in(scope: u32, vip: SocketAddrV4) -> Self {
            Self {
                proto: IPPROTO_UDP as u8,
                ..Self::tcp_in(scope, vip)
            }
        }

        /// The service address.
        pub fn addr(&self) -> SocketAddrV4 {
            SocketAddrV4::new(
                Ipv4Addr::from(self.vip_be.to_ne_bytes()),
                u16::from_be(self.port_be),
            )
        }
    }

    impl ServiceKeyV6 {
        /// A TCP service at `vip`.
        pub fn tcp(vip: SocketAddrV6) -> Self {
            Self::tcp_in(NODE_SCOPE, vip)
        }

        /// A TCP service at `vip` in `scope`.
        pub fn tcp_in(scope: u32, vip: SocketAddrV6) -> Self {
            Self {
                scope,
                vip_be: v6_be(*vip.ip()),
                port_be: vip.port().to_be(),
                proto: IPPROTO_TCP as u8,
                _pad: 0,
            }
        }

        /// The service address.
        pub fn addr(&self) -> SocketAddrV6 {
            SocketAddrV6::new(v6_from_be(self.vip_be), u16::from_be(self.port_be), 0, 0)
        }
    }

    impl EndpointValue {
        /// A healthy endpoint slot.
        pub fn new(addr: SocketAddr, weight: u32) -> Self {
            let o = OrigDstValue::from_socket_addr(addr);
            Self {
                addr_be: o.ip_be,
                port_be: o.port_be,
                family: o.family,
                health: HEALTH_OK,
                weight,
                weight_end: 0,
            }
        }

        /// The endpoint address (`None` for an unknown family).
        pub fn addr(&self) -> Option<SocketAddr> {
            OrigDstValue {
                ip_be: self.addr_be,
                port_be: self.port_be,
                family: self.family,
                _pad: 0,
            }
            .to_socket_addr()
        }
    }

    impl EndpointKey {
        /// The key of an endpoint address.
        pub fn from_socket_addr(addr: SocketAddr) -> Self {
            let o = OrigDstValue::from_socket_addr(addr);
            Self {
                addr_be: o.ip_be,
                port_be: o.port_be,
                family: o.family,
                _pad: 0,
            }
        }

        /// The endpoint address (`None` for an unknown family).
        pub fn addr(&self) -> Option<SocketAddr> {
            OrigDstValue {
                ip_be: self.addr_be,
                port_be: self.port_be,
                family: self.family,
                _pad: 0,
            }
            .to_socket_addr()
        }
    }

    fn v4_be(ip: Ipv4Addr) -> u32 {
        u32::from_ne_bytes(ip.octets())
    }

    fn v6_be(ip: Ipv6Addr) -> [u32; 4] {
        let o = ip.octets();
        core::array::from_fn(|i| {
            u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
        })
    }

    fn v6_from_be(words: [u32; 4]) -> Ipv6Addr {
        let mut o = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        Ipv6Addr::from(o)
    }

    impl ConfigValue {
        /// A config with the given listeners and mark; not ready, fail-open, sidecar mode.
        pub fn new(
            outbound_v4: SocketAddrV4,
            outbound_v6: Option<SocketAddrV6>,
            proxy_mark: u32,
        ) -> Self {
            let (ip6, port6, capture_v6) = match outbound_v6 {
                Some(a) => (v6_be(*a.ip()), a.port(), 1),
                None => ([0; 4], 0, 0),
            };
            Self {
                outbound_ip6_be: ip6,
                outbound_ip4_be: v4_be(*outbound_v4.ip()),
                proxy_mark_host: proxy_mark,
                outbound_port4_be: outbound_v4.port().to_be(),
                outbound_port4_host: outbound_v4.port(),
                outbound_port6_be: port6.to_be(),
                outbound_port6_host: port6,
                ready: 0,
                fail_closed: 0,
                capture_v6,
                node_mode: 0,
                fast_path: 0,
                fast_gen: 0,
                _pad: [0; 2],
            }
        }
    }

    impl OrigDstValue {
        /// From a std socket address.
        pub fn from_socket_addr(addr: SocketAddr) -> Self {
            match addr {
                SocketAddr::V4(a) => Self::v4(v4_be(*a.ip()), a.port().to_be()),
                SocketAddr::V6(a) => Self::v6(v6_be(*a.ip()), a.port().to_be()),
            }
        }

        /// To a std socket address (`None` for an unknown family).
        pub fn to_socket_addr(&self) -> Option<SocketAddr> {
            let port = u16::from_be(self.port_be);
            match u32::from(self.family) {
                AF_INET => Some(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::from(self.ip_be[0].to_ne_bytes())),
                    port,
                )),
                AF_INET6 => Some(SocketAddr::new(IpAddr::V6(v6_from_be(self.ip_be)), port)),
                _ => None,
            }
        }
    }

    impl ConnKey {
        /// The key for a connection from `client` to the proxy listener `listener` in netns `netns_cookie`
        /// (both addresses of one family; v4-mapped IPv6 is normalised to IPv4 as the kernel does).
        pub fn from_socket_addrs(
            netns_cookie: u64,
            client: SocketAddr,
            listener: SocketAddr,
        ) -> Option<Self> {
            let norm = |a: SocketAddr| match a {
                SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                    Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
                    None => a,
                },
                SocketAddr::V4(_) => a,
            };
            match (norm(client), norm(listener)) {
                (SocketAddr::V4(c), SocketAddr::V4(l)) => Some(Self::v4(
                    netns_cookie,
                    v4_be(*c.ip()),
                    c.port().to_be(),
                    v4_be(*l.ip()),
                    l.port().to_be(),
                )),
                (SocketAddr::V6(c), SocketAddr::V6(l)) => Some(Self::v6(
                    netns_cookie,
                    v6_be(*c.ip()),
                    c.port().to_be(),
                    v6_be(*l.ip()),
                    l.port().to_be(),
                )),
                _ => None,
            }
        }
    }

    impl ExcludePortKey {
        /// From a host-order port.
        pub fn new(port: u16) -> Self {
            Self {
                port_be: port.to_be(),
                _pad: 0,
            }
        }

        /// The host-order port.
        pub fn port(&self) -> u16 {
            u16::from_be(self.port_be)
        }
    }

    impl CidrV4Key {
        /// From an address (the caller masks it to the prefix).
        pub fn new(addr: Ipv4Addr) -> Self {
            Self {
                addr_be: v4_be(addr),
            }
        }
    }

    impl CidrV6Key {
        /// From an address (the caller masks it to the prefix).
        pub fn new(addr: Ipv6Addr) -> Self {
            Self {
                addr_be: v6_be(addr),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn orig_dst_round_trips() {
            for s in ["10.96.0.1:80", "[fd00:96::1]:8080", "[::ffff:10.0.0.1]:1"] {
                let a: SocketAddr = s.parse().unwrap();
                assert_eq!(OrigDstValue::from_socket_addr(a).to_socket_addr(), Some(a));
            }
        }

        #[test]
        fn byte_order_matches_the_wire() {
            let v = OrigDstValue::from_socket_addr("10.96.0.1:80".parse().unwrap());
            assert_eq!(v.ip_be[0].to_ne_bytes(), [10, 96, 0, 1]);
            assert_eq!(v.port_be.to_ne_bytes(), [0, 80]);
            let c = ConfigValue::new("127.0.0.1:15001".parse().unwrap(), None, 0x539);
            assert_eq!(c.outbound_port4_host, 15001);
            assert_eq!(c.outbound_port4_be.to_ne_bytes(), 15001u16.to_be_bytes());
            assert!(is_local_v4(c.outbound_ip4_be));
            assert_eq!(c.capture_v6, 0);
        }

        #[test]
        fn service_and_endpoint_round_trip() {
            let k = ServiceKeyV4::tcp("10.96.0.10:80".parse().unwrap());
            assert_eq!(k.vip_be.to_ne_bytes(), [10, 96, 0, 10]);
            assert_eq!(k.port_be.to_ne_bytes(), [0, 80]);
            assert_eq!(k.addr(), "10.96.0.10:80".parse::<SocketAddrV4>().unwrap());
            let e = EndpointValue::new("127.0.0.2:8080".parse().unwrap(), 1);
            assert_eq!(e.addr_be[0].to_ne_bytes(), [127, 0, 0, 2]);
            assert_eq!(
                e.addr(),
                Some("127.0.0.2:8080".parse::<SocketAddr>().unwrap())
            );
            assert_eq!(e.health, HEALTH_OK);
        }

        #[test]
        fn conn_key_normalises_v4_mapped() {
            let a = ConnKey::from_socket_addrs(
                7,
                "[::ffff:127.0.0.1]:40000".parse().unwrap(),
                "[::ffff:127.0.0.1]:15001".parse().unwrap(),
            );
            let b = ConnKey::from_socket_addrs(
                7,
                "127.0.0.1:40000".parse().unwrap(),
                "127.0.0.1:15001".parse().unwrap(),
            );
            assert_eq!(a, b);
            assert_eq!(a.unwrap().family, AF_INET as u8);
            assert!(
                ConnKey::from_socket_addrs(
                    7,
                    "127.0.0.1:1".parse().unwrap(),
                    "[::1]:1".parse().unwrap()
                )
                .is_none()
            );
        }

        #[test]
        fn v6_predicates() {
            let w = |s: &str| v6_be(s.parse().unwrap());
            assert!(is_local_v6(w("::1")));
            assert!(is_local_v6(w("::")));
            assert!(!is_local_v6(w("fd00:96::1")));
            assert!(!is_local_v6(w("::2")));
            assert!(is_v4_mapped(w("::ffff:10.96.0.1")));
            assert!(!is_v4_mapped(w("::10.96.0.1")));
            assert!(!is_v4_mapped(w("64:ff9b::10.96.0.1")));
            assert_eq!(w("::ffff:1.2.3.4")[2], v4_mapped_word());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Facts as plain values.
    #[derive(Default)]
    struct Facts {
        sk_mark: u32,
        dst_local: bool,
        meshed: bool,
        port_excluded: bool,
        cidr_excluded: bool,
    }

    impl ConnectFacts for Facts {
        fn sk_mark(&self) -> u32 {
            self.sk_mark
        }
        fn dst_local(&self) -> bool {
            self.dst_local
        }
        fn meshed(&self) -> bool {
            self.meshed
        }
        fn port_excluded(&self) -> bool {
            self.port_excluded
        }
        fn cidr_excluded(&self) -> bool {
            self.cidr_excluded
        }
    }

    fn cfg(ready: u8, fail_closed: u8, node_mode: u8) -> ConfigValue {
        ConfigValue {
            outbound_ip6_be: [0; 4],
            outbound_ip4_be: u32::from_ne_bytes([127, 0, 0, 1]),
            proxy_mark_host: 0x539,
            outbound_port4_be: 15001u16.to_be(),
            outbound_port4_host: 15001,
            outbound_port6_be: 15001u16.to_be(),
            outbound_port6_host: 15001,
            ready,
            fail_closed,
            capture_v6: 1,
            node_mode,
            fast_path: 0,
            fast_gen: 0,
            _pad: [0; 2],
        }
    }

    #[test]
    fn captures_when_ready() {
        assert_eq!(
            capture_decision(&cfg(1, 0, 0), &Facts::default()),
            Decision::Capture
        );
    }

    #[test]
    fn never_captures_the_proxy_or_local_destinations() {
        let marked = Facts {
            sk_mark: 0x539,
            ..Default::default()
        };
        assert_eq!(
            capture_decision(&cfg(1, 1, 0), &marked),
            Decision::Pass(reason::SKIP_PROXY_MARK)
        );
        let local = Facts {
            dst_local: true,
            ..Default::default()
        };
        // Even fail-closed and not ready: local traffic is never refused.
        assert_eq!(
            capture_decision(&cfg(0, 1, 0), &local),
            Decision::Pass(reason::SKIP_LOOPBACK)
        );
        let other_mark = Facts {
            sk_mark: 7,
            ..Default::default()
        };
        assert_eq!(
            capture_decision(&cfg(1, 0, 0), &other_mark),
            Decision::Capture
        );
    }

    #[test]
    fn mark_zero_disables_the_mark_guard() {
        let mut c = cfg(1, 0, 0);
        c.proxy_mark_host = 0;
        assert_eq!(capture_decision(&c, &Facts::default()), Decision::Capture);
    }

    #[test]
    fn exclusions_win_over_the_ready_gate() {
        let port = Facts {
            port_excluded: true,
            ..Default::default()
        };
        let cidr = Facts {
            cidr_excluded: true,
            ..Default::default()
        };
        assert_eq!(
            capture_decision(&cfg(0, 1, 0), &port),
            Decision::Pass(reason::SKIP_EXCLUDED_PORT)
        );
        assert_eq!(
            capture_decision(&cfg(0, 1, 0), &cidr),
            Decision::Pass(reason::SKIP_EXCLUDED_CIDR)
        );
    }

    #[test]
    fn not_ready_fails_open_or_closed() {
        let f = Facts::default();
        assert_eq!(
            capture_decision(&cfg(0, 0, 0), &f),
            Decision::Pass(reason::SKIP_NOT_READY)
        );
        assert_eq!(capture_decision(&cfg(0, 1, 0), &f), Decision::Reject);
    }

    #[test]
    fn node_mode_captures_only_meshed() {
        let f = Facts::default();
        assert_eq!(
            capture_decision(&cfg(1, 0, 1), &f),
            Decision::Pass(reason::SKIP_NOT_MESHED)
        );
        // An unmeshed task is never refused, even fail-closed.
        assert_eq!(
            capture_decision(&cfg(0, 1, 1), &f),
            Decision::Pass(reason::SKIP_NOT_MESHED)
        );
        let m = Facts {
            meshed: true,
            ..Default::default()
        };
        assert_eq!(capture_decision(&cfg(1, 0, 1), &m), Decision::Capture);
        // Sidecar mode ignores membership.
        assert_eq!(capture_decision(&cfg(1, 0, 0), &f), Decision::Capture);
    }

    #[test]
    fn v4_predicates() {
        assert!(is_local_v4(u32::from_ne_bytes([127, 0, 0, 1])));
        assert!(is_local_v4(u32::from_ne_bytes([127, 255, 3, 9])));
        assert!(is_local_v4(0));
        assert!(!is_local_v4(u32::from_ne_bytes([10, 96, 0, 1])));
        assert!(!is_local_v4(u32::from_ne_bytes([1, 0, 0, 127])));
    }

    /// A cluster's slots as plain values.
    struct Slots {
        weights: [u32; 4],
        count: u32,
        loads: [u64; 4],
        maglev: [u32; 3],
    }

    impl SlotFacts for Slots {
        fn weight_end(&self, offset: u32) -> Option<u32> {
            (offset < self.count).then(|| self.weights[..=offset as usize].iter().sum())
        }
        fn load(&self, offset: u32) -> u64 {
            self.loads[offset as usize]
        }
        fn maglev(&self, entry: u32) -> Option<u32> {
            Some(self.maglev[entry as usize % 3])
        }
    }

    fn cluster(policy: u8, weighted: bool, total: u32, stride: u32) -> ClusterValue {
        ClusterValue {
            slot_base: 0,
            endpoint_count: 3,
            total_weight: total,
            rr_stride: stride,
            maglev_base: 0,
            lb_policy: policy,
            flags: if weighted { CLUSTER_WEIGHTED } else { 0 },
            _pad: [0; 2],
        }
    }

    const SLOTS: Slots = Slots {
        weights: [1, 3, 2, 0],
        count: 3,
        loads: [5, 1, 9, 0],
        maglev: [2, 0, 7],
    };

    #[test]
    fn slot_pick_follows_the_policy() {
        let d = |rr, r0, r1| Draws {
            rr_cursor: rr,
            random: [r0, r1],
            client_hash: 0,
        };
        let empty = ClusterValue {
            endpoint_count: 0,
            ..cluster(LB_ROUND_ROBIN, false, 0, 1)
        };
        assert_eq!(pick_slot(&empty, &d(0, 0, 0), &SLOTS), None);
        assert_eq!(
            pick_slot(&cluster(9, false, 6, 1), &d(0, 0, 0), &SLOTS),
            None
        );
        for i in 0..100u32 {
            let rr = cluster(LB_ROUND_ROBIN, false, 6, 1);
            assert_eq!(pick_slot(&rr, &d(i, 0, 0), &SLOTS), Some(i % 3));
            let rnd = cluster(LB_RANDOM, true, 6, 1);
            assert_eq!(
                pick_slot(&rnd, &d(0, i.wrapping_mul(2654435761), 0), &SLOTS),
                Some(i.wrapping_mul(2654435761) % 3)
            );
        }
        // LEAST_REQUEST: the less loaded of the two picks, the first on a tie.
        let lr = cluster(LB_LEAST_REQUEST, false, 3, 1);
        assert_eq!(pick_slot(&lr, &d(0, 0, 1), &SLOTS), Some(1));
        assert_eq!(pick_slot(&lr, &d(0, 2, 0), &SLOTS), Some(0));
        assert_eq!(pick_slot(&lr, &d(0, 2, 2), &SLOTS), Some(2));
        // MAGLEV: the table entry, unless it points past the cluster.
        let mg = cluster(LB_MAGLEV, false, 3, 1);
        let h = |e: u64| Draws {
            client_hash: e,
            ..Default::default()
        };
        assert_eq!(pick_slot(&mg, &h(0), &SLOTS), Some(2));
        assert_eq!(pick_slot(&mg, &h(1), &SLOTS), Some(0));
        assert_eq!(pick_slot(&mg, &h(2), &SLOTS), None);
    }

    #[test]
    fn weighted_round_robin_gives_exact_shares_per_cycle() {
        // Weights 1, 3, 2: total 6; stride 5 is coprime to 6.
        let c = cluster(LB_ROUND_ROBIN, true, 6, 5);
        let mut seen = [0u32; 3];
        for cursor in 0..60u32 {
            let s = pick_slot(
                &c,
                &Draws {
                    rr_cursor: cursor,
                    ..Default::default()
                },
                &SLOTS,
            )
            .unwrap();
            seen[s as usize] += 1;
        }
        assert_eq!(seen, [10, 30, 20]);
    }

    #[test]
    fn weighted_search_finds_the_owner_of_every_unit() {
        for draw in 0..6 {
            let want = match draw {
                0 => 0,
                1..=3 => 1,
                _ => 2,
            };
            assert_eq!(weighted_slot(3, draw, &SLOTS), Some(want), "draw {draw}");
        }
        assert_eq!(weighted_slot(3, 6, &SLOTS), None);
        // RANDOM over eligible shares draws by weight; plain RANDOM ignores weights.
        let mut shares = cluster(LB_RANDOM, true, 6, 1);
        shares.flags |= CLUSTER_SHARES;
        let mut seen = [0u32; 3];
        for r in 0..600u32 {
            let d = Draws {
                random: [r, 0],
                ..Default::default()
            };
            seen[pick_slot(&shares, &d, &SLOTS).unwrap() as usize] += 1;
        }
        assert_eq!(seen, [100, 300, 200]);
        assert_eq!(weighted_draw(7, 5, 0), 0);
    }

    #[test]
    fn client_hash_separates_clients_and_services() {
        let a = client_hash(1, 10, 80u16.to_be());
        assert_eq!(a, client_hash(1, 10, 80u16.to_be()));
        assert_ne!(a, client_hash(2, 10, 80u16.to_be()));
        assert_ne!(a, client_hash(1, 11, 80u16.to_be()));
        assert_ne!(a, client_hash(1, 10, 81u16.to_be()));
    }

    #[test]
    fn a_dead_proxy_gets_the_fail_mode_counted_apart_from_the_gate() {
        assert_eq!(
            proxy_down_decision(&cfg(1, 0, 0)),
            Decision::Pass(reason::SKIP_PROXY_DOWN)
        );
        assert_eq!(proxy_down_decision(&cfg(1, 1, 0)), Decision::Reject);
        assert_eq!(
            reason::NAMES[reason::SKIP_PROXY_DOWN as usize],
            "skip_proxy_down"
        );
        assert_eq!(
            reason::NAMES[reason::REJECT_PROXY_DOWN as usize],
            "reject_proxy_down"
        );
    }

    #[test]
    fn every_reason_has_a_name() {
        assert_eq!(reason::NAMES.len(), reason::COUNT as usize);
        let mut names = reason::NAMES;
        names.sort_unstable();
        assert!(names.windows(2).all(|w| w[0] != w[1]));
    }
}
