//! Counters the kernel programs keep: per reason (`SKIFF_STATS`), per fast-path service
//! (`SKIFF_SVCST_V2`) and the tracked original destinations (`SKIFF_ORIG_DST`). Read-only here.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;

use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap};
use skiff_common::{ConnKey, OrigDstValue, ServiceKeyV4, ServiceStats, reason};

use super::{BpfError, map_err};

pub(super) const MAP_STATS: &str = "SKIFF_STATS";
pub(super) const MAP_ORIG_DST: &str = "SKIFF_ORIG_DST";
pub(super) const MAP_SVC_STAT: &str = "SKIFF_SVCST_V2";

/// The kernel's counters.
pub struct Counters {
    pub(super) stats: PerCpuArray<MapData, u64>,
    pub(super) orig_dst: HashMap<MapData, ConnKey, OrigDstValue>,
    pub(super) svc_stats: PerCpuHashMap<MapData, ServiceKeyV4, ServiceStats>,
}

impl Counters {
    /// Counters by reason, summed over CPUs, in `skiff_common::reason` order.
    pub fn by_reason(&self) -> Result<Vec<(&'static str, u64)>, BpfError> {
        (0..reason::COUNT)
            .map(|i| {
                let per_cpu = self
                    .stats
                    .get(&i, 0)
                    .map_err(|source| map_err(MAP_STATS, format!("read index {i}"), source))?;
                Ok((reason::NAMES[i as usize], per_cpu.iter().copied().sum()))
            })
            .collect()
    }

    /// What happened to connects per fast-path service (summed over CPUs and over the scopes
    /// that serve the same VIP), sorted by service.
    pub fn per_service(&self) -> Vec<(SocketAddrV4, ServiceStats)> {
        let mut out: BTreeMap<SocketAddrV4, ServiceStats> = BTreeMap::new();
        for (k, v) in self.svc_stats.iter().filter_map(Result::ok) {
            let a = out.entry(k.addr()).or_default();
            for c in v.iter() {
                a.connects += c.connects;
                a.fallbacks += c.fallbacks;
                a.no_healthy += c.no_healthy;
            }
        }
        out.into_iter().collect()
    }

    /// Number of connections whose original destination is recorded (entries are removed
    /// when the client socket closes).
    pub fn tracked_connections(&self) -> Result<usize, BpfError> {
        self.orig_dst
            .keys()
            .try_fold(0, |n, k| k.map(|_| n + 1))
            .map_err(|source| map_err(MAP_ORIG_DST, "list keys", source))
    }
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Counters")
    }
}
