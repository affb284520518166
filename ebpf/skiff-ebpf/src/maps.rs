//! Every map of the skiff-bpf object. Names fit the kernel's 15-character map-name limit.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use skiff_common::{
    CidrV4Key, CidrV6Key, ConfigValue, ConnKey, ExcludePortKey, OrigDstValue, reason,
};

/// Proxy config. Key: u32 index 0; value: `ConfigValue`; max 1; not LRU.
/// Writer: userspace loader (install, set_ready, drop). Readers: connect4, connect6, getsockopt.
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
/// Writer: userspace loader (install). Readers: connect4, connect6.
#[map]
pub static SKIFF_EXCL_PORT: HashMap<ExcludePortKey, u8> = HashMap::with_max_entries(1024, 0);

/// IPv4 CIDRs never captured. Key: LPM `{prefix_len, CidrV4Key}`; value: u8 (1); max 1024; not LRU.
/// Writer: userspace loader (install). Readers: connect4, connect6 (v4-mapped).
#[map]
pub static SKIFF_EXCL_V4: LpmTrie<CidrV4Key, u8> = LpmTrie::with_max_entries(1024, 0);

/// IPv6 CIDRs never captured. Key: LPM `{prefix_len, CidrV6Key}`; value: u8 (1); max 1024; not LRU.
/// Writer: userspace loader (install). Readers: connect6.
#[map]
pub static SKIFF_EXCL_V6: LpmTrie<CidrV6Key, u8> = LpmTrie::with_max_entries(1024, 0);

/// Node mode: cgroups whose tasks are captured. Key: u64 cgroup id (`bpf_get_current_cgroup_id`,
/// the cgroup directory's inode); value: u8 (1); max 16384; not LRU.
/// Writer: userspace (add/remove_meshed_cgroup). Readers: connect4, connect6.
#[map]
pub static SKIFF_MESHED: HashMap<u64, u8> = HashMap::with_max_entries(16384, 0);

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

/// A copy of the config entry (None only if the array lookup fails, which it cannot at index 0).
#[inline(always)]
pub fn config() -> Option<ConfigValue> {
    SKIFF_CONFIG.get(skiff_common::CONFIG_INDEX).copied()
}
