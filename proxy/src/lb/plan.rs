//! The host-set plan of one cluster: from each host's priority, locality, weight and coarse
//! health, which hosts each priority level balances over (healthy, degraded, all in panic),
//! the locality split and the priority load. Pure, so the userspace balancer and the BPF
//! projection see the same eligible set ([`eligible`]).

use std::sync::Arc;

use super::host::{Coarse, Host};
use super::priority::{self, LevelCounts, PriorityLoad, ZoneRouting, effective_locality_weight};
use crate::model::cluster::lb::CommonLbConfig;
use crate::model::endpoint::Locality;

/// What the plan needs to know about one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostView {
    /// Priority level.
    pub priority: u32,
    /// Index of its locality (into the localities list given with the views).
    pub locality: usize,
    /// `load_balancing_weight`.
    pub weight: u32,
    /// The weight of its locality, when set.
    pub locality_weight: Option<u32>,
    /// Coarse health.
    pub health: Coarse,
    /// Left out of the counts (EDS DRAINING, as Envoy's excluded hosts): neither picked nor
    /// counted in the health percentages.
    pub excluded: bool,
}

/// Hosts of one locality with the locality's effective weight.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalitySet {
    /// Locality index.
    pub locality: usize,
    /// Effective weight (weight scaled by availability).
    pub weight: f64,
    /// Host indices.
    pub hosts: Vec<u32>,
}

/// Host sets of one priority level.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LevelPlan {
    /// Healthy hosts.
    pub healthy: Vec<u32>,
    /// Degraded hosts.
    pub degraded: Vec<u32>,
    /// Every host (used in panic).
    pub all: Vec<u32>,
    /// Localities of the healthy hosts, when `locality_weighted_lb_config` is set.
    pub healthy_localities: Option<Vec<LocalitySet>>,
    /// Localities of the degraded hosts, likewise.
    pub degraded_localities: Option<Vec<LocalitySet>>,
}

/// The whole plan.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Priority load and panic per level.
    pub load: PriorityLoad,
    /// Host sets per level (index = priority).
    pub levels: Vec<LevelPlan>,
    /// Zone-aware routing of level 0, when configured and applicable.
    pub zone: Option<ZoneRouting>,
    /// Level 0 healthy hosts per locality, local locality first (with `zone`).
    pub zone_sets: Option<Vec<Vec<u32>>>,
}

/// The proxy's own side for zone-aware routing: its locality (index into the localities) and
/// the local cluster's healthy hosts per locality.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalCluster {
    /// Index of the proxy's own locality.
    pub locality: usize,
    /// Local-cluster hosts in each upstream locality (aligned with the localities list).
    pub per_locality: Vec<u64>,
    /// Local-cluster hosts in localities the upstream does not have.
    pub elsewhere: u64,
}

/// Views of `hosts` and the distinct localities they name.
pub fn views(hosts: &[Arc<Host>]) -> (Vec<HostView>, Vec<Locality>) {
    let mut localities: Vec<Locality> = Vec::new();
    let v = hosts
        .iter()
        .map(|h| {
            let locality = match localities.iter().position(|l| *l == *h.locality) {
                Some(i) => i,
                None => {
                    localities.push((*h.locality).clone());
                    localities.len() - 1
                }
            };
            HostView {
                priority: h.priority,
                locality,
                weight: h.weight,
                locality_weight: h.locality_weight,
                health: h.coarse(),
                excluded: h.eds_health == crate::model::endpoint::HealthStatus::Draining,
            }
        })
        .collect();
    (v, localities)
}

/// Build the plan for `hosts` (with `n_localities` distinct localities), the assignment's
/// overprovisioning factor, `common_lb_config`, and the proxy's own side for zone-aware
/// routing.
pub fn plan(
    hosts: &[HostView],
    n_localities: usize,
    overprovisioning_factor: u32,
    common: &CommonLbConfig,
    local: Option<&LocalCluster>,
) -> Plan {
    let n_levels = hosts
        .iter()
        .map(|h| h.priority as usize + 1)
        .max()
        .unwrap_or(0);
    let mut levels = vec![LevelPlan::default(); n_levels];
    let mut counts = vec![LevelCounts::default(); n_levels];
    for (i, h) in hosts.iter().enumerate() {
        let p = h.priority as usize;
        let i = i as u32;
        counts[p].total += 1;
        if h.excluded {
            counts[p].excluded += 1;
            continue;
        }
        levels[p].all.push(i);
        match h.health {
            Coarse::Healthy => {
                levels[p].healthy.push(i);
                counts[p].healthy += 1;
            }
            Coarse::Degraded => {
                levels[p].degraded.push(i);
                counts[p].degraded += 1;
            }
            Coarse::Unhealthy => {}
        }
    }
    let load = priority::priority_load(
        &counts,
        overprovisioning_factor,
        common.healthy_panic_threshold,
    );
    if common.locality_weighted {
        for level in &mut levels {
            let sets = |subset: &[u32]| {
                let mut out = Vec::new();
                for loc in 0..n_localities {
                    let in_loc: Vec<u32> = level
                        .all
                        .iter()
                        .copied()
                        .filter(|i| hosts[*i as usize].locality == loc)
                        .collect();
                    if in_loc.is_empty() {
                        continue;
                    }
                    let avail: Vec<u32> = subset
                        .iter()
                        .copied()
                        .filter(|i| hosts[*i as usize].locality == loc)
                        .collect();
                    let w = effective_locality_weight(
                        hosts[in_loc[0] as usize].locality_weight,
                        avail.len() as u64,
                        in_loc.len() as u64,
                        overprovisioning_factor,
                    );
                    if w > 0.0 && !avail.is_empty() {
                        out.push(LocalitySet {
                            locality: loc,
                            weight: w,
                            hosts: avail,
                        });
                    }
                }
                out
            };
            level.healthy_localities = Some(sets(&level.healthy));
            level.degraded_localities = Some(sets(&level.degraded));
        }
    }
    let (mut zone, mut zone_sets) = (None, None);
    if let (Some(z), Some(lc), 1) = (&common.zone_aware, local, n_levels) {
        // Local locality first, then the others in order.
        let mut order = vec![lc.locality];
        order.extend((0..n_localities).filter(|l| *l != lc.locality));
        let sets: Vec<Vec<u32>> = order
            .iter()
            .map(|loc| {
                levels[0]
                    .healthy
                    .iter()
                    .copied()
                    .filter(|i| hosts[*i as usize].locality == *loc)
                    .collect()
            })
            .collect();
        // Local hosts in localities the upstream lacks count in the totals, never as targets.
        let mut upstream: Vec<u64> = sets.iter().map(|s| s.len() as u64).collect();
        let mut local_counts: Vec<u64> = order
            .iter()
            .map(|l| lc.per_locality.get(*l).copied().unwrap_or(0))
            .collect();
        upstream.push(0);
        local_counts.push(lc.elsewhere);
        let r = priority::zone_routing(&upstream, &local_counts, z.min_cluster_size);
        if r != ZoneRouting::None {
            zone = Some(r);
            zone_sets = Some(sets);
        }
    }
    Plan {
        load,
        levels,
        zone,
        zone_sets,
    }
}

/// One host that new traffic may reach, with its expected share.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EligibleHost {
    /// Index into the cluster's hosts.
    pub index: u32,
    /// Expected fraction of picks (0..=1) under a weight-proportional policy.
    pub share: f64,
}

/// The hosts new traffic may reach and their expected shares (summing to 1 when any host is
/// eligible): the set both the userspace balancer and the BPF projection use. Shares follow
/// the priority load, then locality weights (when configured), then host weights; under
/// zone-aware routing the level 0 split is left to the balancer (shares as without it).
pub fn eligible(plan: &Plan, hosts: &[HostView]) -> Vec<EligibleHost> {
    let mut share = vec![0.0f64; hosts.len()];
    let spread = |share: &mut Vec<f64>, set: &[u32], total: f64| {
        let w: f64 = set
            .iter()
            .map(|i| f64::from(hosts[*i as usize].weight))
            .sum();
        if w <= 0.0 {
            return;
        }
        for i in set {
            share[*i as usize] += total * f64::from(hosts[*i as usize].weight) / w;
        }
    };
    for (p, level) in plan.levels.iter().enumerate() {
        let panic = plan.load.panic.get(p).copied().unwrap_or(false);
        for (which, load) in [
            (0usize, plan.load.healthy.get(p).copied().unwrap_or(0)),
            (1, plan.load.degraded.get(p).copied().unwrap_or(0)),
        ] {
            if load == 0 {
                continue;
            }
            let total = f64::from(load) / 100.0;
            if panic {
                spread(&mut share, &level.all, total);
                continue;
            }
            let (set, locs) = if which == 0 {
                (&level.healthy, &level.healthy_localities)
            } else {
                (&level.degraded, &level.degraded_localities)
            };
            match locs {
                Some(ls) if ls.iter().any(|l| l.weight > 0.0) => {
                    let sum: f64 = ls.iter().map(|l| l.weight).sum();
                    for l in ls {
                        spread(&mut share, &l.hosts, total * l.weight / sum);
                    }
                }
                // No weighted locality: the balancer uses the whole set, as Envoy.
                _ => spread(&mut share, set, total),
            }
        }
    }
    share
        .into_iter()
        .enumerate()
        .filter(|(_, s)| *s > 0.0)
        .map(|(i, s)| EligibleHost {
            index: i as u32,
            share: s,
        })
        .collect()
}
