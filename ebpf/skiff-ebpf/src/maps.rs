//! Every map of the skiff-bpf object. Names fit the kernel's 15-character map-name limit.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray},
};
use skiff_common::{
    CidrV4Key, CidrV6Key, ClusterValue, ConfigValue, ConnKey, EndpointKey, EndpointLoad,
    EndpointValue, ExcludePortKey, OrigDstValue, ServiceKeyV4, ServiceKeyV6, ServiceStats,
    ServiceValue, UdpRevKey, UdpRevValue, reason,
};

/// Proxy config. Key: u32 index 0; value: `ConfigValue`; max 1; not LRU.
/// Writer: userspace loader (install, set_ready, drop). Readers: connect4, connect6, getsockopt,
/// sendmsg4.
#[map]
pub static SKIFF_CONFIG: Array<ConfigValue> = Array::with_max_entries(1, 0);

/// Original destination by socket cookie, between connect() and the SYN. Key: u64 socket cookie;
/// value: `OrigDstValue`; max 65536; LRU (a connect that never reaches sock_ops is evicted).
/// Writer: connect4/connect6 (insert), sock_ops (delete on re-key). Readers: sock_ops.
#[map]
pub static SKIFF_COOKIE: LruHashMap<u64, OrigDstValue> = LruHashMap::with_max_entries(65536, 0);

/// Original destination by connection tuple. Key: `ConnKey` (netns cookie + client and listener
/// address/port, v4-mapped normalised to v4); value: `OrigDstValue`; max 65536; LRU (backstop:
/// entries are deleted at TCP_CLOSE). Writer: sock_ops (insert at TCP_CONNECT_CB, delete at
/// TCP_CLOSE). Readers: getsockopt; userspace (debug only).
#[map]
pub static SKIFF_ORIG_DST: LruHashMap<ConnKey, OrigDstValue> =
    LruHashMap::with_max_entries(65536, 0);

/// Destination ports never captured. Key: `ExcludePortKey`; value: u8 (1); max 1024; not LRU.
/// Writer: userspace loader (install). Readers: connect4, connect6, sendmsg4.
#[map]
pub static SKIFF_EXCL_PORT: HashMap<ExcludePortKey, u8> = HashMap::with_max_entries(1024, 0);

/// IPv4 CIDRs never captured. Key: LPM `{prefix_len, CidrV4Key}`; value: u8 (1); max 1024; not LRU.
/// Writer: userspace loader (install). Readers: connect4, connect6 (v4-mapped), sendmsg4.
#[map]
pub static SKIFF_EXCL_V4: LpmTrie<CidrV4Key, u8> = LpmTrie::with_max_entries(1024, 0);

/// IPv6 CIDRs never captured. Key: LPM `{prefix_len, CidrV6Key}`; value: u8 (1); max 1024; not LRU.
/// Writer: userspace loader (install). Readers: connect6.
#[map]
pub static SKIFF_EXCL_V6: LpmTrie<CidrV6Key, u8> = LpmTrie::with_max_entries(1024, 0);

/// Node mode: cgroups whose tasks are captured, and the fast-path scope their connects look
/// services up in. Key: u64 cgroup id (`bpf_get_current_cgroup_id`, the cgroup directory's
/// inode); value: u32 scope (`NODE_SCOPE` for `add-cgroup`, a pod pipeline's scope for
/// `add-pod`); max 16384; not LRU.
/// Writer: userspace (`bpf::cgroup::Meshed`). Readers: connect4, connect6, sendmsg4.
#[map]
pub static SKIFF_MESHED_V2: HashMap<u64, u32> = HashMap::with_max_entries(16384, 0);

// === Kernel fast path ===
//
// Sizes here are placeholders: userspace sets every max_entries at load time from
// `CaptureConfig::fast_path` (defaults: 10240 services, 2 x 10240 clusters, 2 x 102400 slots).

/// Fast-path services. Key: `ServiceKeyV4` (scope, VIP be, port be, proto); value: `ServiceValue`
/// (cluster index per generation); max `max_services`; not LRU; no prealloc (an update replaces
/// the element under RCU, so a reader sees the old or the new value, never a mix).
/// Writer: userspace `bpf::reconciler`. Readers: connect4, connect6 (v4-mapped), sendmsg4
/// (proto UDP).
#[map]
pub static SKIFF_SVC4_V2: HashMap<ServiceKeyV4, ServiceValue> =
    HashMap::with_max_entries(10240, BPF_F_NO_PREALLOC);

/// IPv6 fast-path services. Key: `ServiceKeyV6` (scope, VIP be words, port be, proto); value:
/// `ServiceValue`; max `max_services`; not LRU; no prealloc. Writer: userspace
/// `bpf::reconciler`. Readers: connect6.
#[map]
pub static SKIFF_SVC6_V2: HashMap<ServiceKeyV6, ServiceValue> =
    HashMap::with_max_entries(10240, BPF_F_NO_PREALLOC);

/// Fast-path clusters, both generations. Key: u32 `gen * max_clusters + id`; value:
/// `ClusterValue`; max `2 * max_clusters`; array. Writer: userspace `bpf::reconciler` (only the
/// inactive generation). Readers: connect4, connect6 (v4-mapped).
#[map]
pub static SKIFF_CLUSTERS: Array<ClusterValue> = Array::with_max_entries(2 * 10240, 0);

/// Fast-path endpoint slots, both generations. Key: u32 slot (`ClusterValue::slot_base + i`);
/// value: `EndpointValue`; max `2 * max_endpoints`; array. Writer: userspace `bpf::reconciler`
/// (only the inactive generation). Readers: connect4, connect6 (v4-mapped).
#[map]
pub static SKIFF_ENDPOINTS: Array<EndpointValue> = Array::with_max_entries(2 * 102400, 0);

/// Round-robin cursors. Key: u32 absolute cluster index (as `SKIFF_CLUSTERS`); value: u32 per
/// CPU; max `2 * max_clusters`. Writer: connect4/6 (increment). Readers: connect4/6.
#[map]
pub static SKIFF_RR: PerCpuArray<u32> = PerCpuArray::with_max_entries(2 * 10240, 0);

/// Maglev tables, both generations: `MAGLEV_TABLE_SIZE` entries per MAGLEV cluster, each a
/// slot offset within the cluster. Key: u32 `ClusterValue::maglev_base + entry`; value: u32; max
/// `2 * max_maglev * MAGLEV_TABLE_SIZE`; array. Writer: userspace `bpf::reconciler` (only the
/// inactive generation). Readers: connect4/6.
#[map]
pub static SKIFF_MAGLEV: Array<u32> = Array::with_max_entries(2 * 64 * 4093, 0);

/// Fast-path connections per endpoint, counted by the kernel. Key: `EndpointKey`; value:
/// `EndpointLoad` (atomic adds); max `max_endpoints`; not LRU, no prealloc (only endpoints that
/// carried a connection take memory). Writer: sock_ops (insert, TCP_CONNECT_CB +1, TCP_CLOSE -1);
/// userspace removes idle entries of endpoints the fast path no longer serves. Readers:
/// connect4/6 (LEAST_REQUEST); userspace (`/stats`).
#[map]
pub static SKIFF_EP_ACTIVE: HashMap<EndpointKey, EndpointLoad> =
    HashMap::with_max_entries(102400, BPF_F_NO_PREALLOC);

/// Load of each endpoint as the proxy sees it (its own active requests/connections there).
/// Key: `EndpointKey`; value: u32; max `max_endpoints`; not LRU, no prealloc. Writer: userspace
/// (the load exporter). Readers: connect4/6 (LEAST_REQUEST).
#[map]
pub static SKIFF_EP_LOAD: HashMap<EndpointKey, u32> =
    HashMap::with_max_entries(102400, BPF_F_NO_PREALLOC);

/// The endpoint a fast-path socket was sent to, by socket cookie, from connect() to TCP_CLOSE
/// (so sock_ops counts it in `SKIFF_EP_ACTIVE`). Key: u64 socket cookie; value: `EndpointKey`;
/// max 65536; LRU (a connect that never reaches sock_ops is evicted). Writer: connect4/6
/// (insert), sock_ops (delete at TCP_CLOSE). Readers: sock_ops.
#[map]
pub static SKIFF_FAST_SK: LruHashMap<u64, EndpointKey> = LruHashMap::with_max_entries(65536, 0);

/// What happened to connects per fast-path service. Key: `ServiceKeyV4`; value:
/// `ServiceStats` per CPU (connects, fallbacks, no healthy endpoint); max `max_services`; LRU.
/// Writer: connect4/6. Readers: userspace (`Capture::service_stats`, summed over CPUs).
#[map]
pub static SKIFF_SVCST_V2: LruPerCpuHashMap<ServiceKeyV4, ServiceStats> =
    LruPerCpuHashMap::with_max_entries(10240, 0);

/// The address an app connected to (the VIP), per socket, for getpeername4. BTF socket
/// storage: freed with the socket. Value: `OrigDstValue`. Writer: connect4 (fast path, TCP and
/// connected UDP; a UDP re-connect to a non-service deletes it).
/// Readers: getpeername4.
#[btf_map]
pub static SKIFF_PEER: SkStorage<OrigDstValue> = SkStorage::new();

/// UDP reverse translation: the VIP an unconnected (sendmsg4) or connected (connect4) UDP
/// socket addressed, by (socket cookie, endpoint). Key: `UdpRevKey`; value: `UdpRevValue`; max
/// 65536; LRU (UDP has no close event the programs see, so old entries are evicted).
/// Writer: connect4 and sendmsg4 (UDP fast path). Readers: recvmsg4.
#[map]
pub static SKIFF_UDP_REV: LruHashMap<UdpRevKey, UdpRevValue> =
    LruHashMap::with_max_entries(65536, 0);

/// Counters by reason. Key: u32 `skiff_common::reason::*`; value: u64 per CPU; max `reason::COUNT`;
/// not LRU. Writer: every program. Readers: userspace (`Capture::stats`, summed over CPUs).
#[map]
pub static SKIFF_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(reason::COUNT, 0);

/// Bumps the per-CPU counter for `reason` (a per-CPU slot needs no atomic).
#[inline(always)]
pub fn count(reason: u32) {
    if let Some(p) = SKIFF_STATS.get_ptr_mut(reason) {
        // SAFETY: the pointer comes from a successful lookup in a per-CPU array, and a BPF
        // program is not preempted by another program on the same CPU for this slot.
        unsafe { *p += 1 }
    }
}

/// Adds `v` to the u64 at `p` atomically (wrapping; `u64::MAX` subtracts one). The result is
/// unused, so this is one BPF atomic add (no fetch variant needed).
///
/// # Safety
/// `p` must point into a map value for the duration of the call.
#[inline(always)]
pub unsafe fn atomic_add(p: *mut u64, v: u64) {
    // SAFETY: the caller guarantees `p` is valid; the intrinsic is a relaxed atomic add.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            p, v,
        );
    }
}

/// A copy of the config entry (None only if the array lookup fails, which it cannot at index 0).
#[inline(always)]
pub fn config() -> Option<ConfigValue> {
    SKIFF_CONFIG.get(skiff_common::CONFIG_INDEX).copied()
}
