//! Envoy's priority and locality arithmetic, as pure functions over host counts.
//!
//! Both the userspace balancer and the BPF projection call these, so the kernel mirrors the
//! same split. The formulas follow Envoy's load balancing documentation (priority levels,
//! degraded endpoints, panic threshold, locality weighted and zone aware routing):
//!
//! - **Priority health.** For each level, `health = min(100, overprovisioning_factor *
//!   healthy / eligible)` and `degraded = min(100, overprovisioning_factor * degraded /
//!   eligible)` in integer percent, where `eligible = hosts - excluded` and
//!   `overprovisioning_factor` is in percent (140 by default).
//! - **Spill-over.** With `total = min(100, sum(health) + sum(degraded))`, healthy load goes
//!   to the levels in order, each taking `min(left, health * 100 / total)`; what is left goes
//!   to the degraded hosts the same way; rounding remainders go to the first level with healthy
//!   hosts (else the first with degraded ones).
//! - **Panic.** A level is in panic when `100 * (healthy + degraded) / eligible` is below the
//!   panic threshold (50% by default; 0 disables panic); a panicking level balances over all its
//!   hosts. When every level panics, load is split in proportion to each level's host count.
//!   When nothing is available and the threshold is 0, level 0 gets all the load (and, having
//!   no healthy host, answers 503).
//! - **Locality weights** (`locality_weighted_lb_config`): a locality's effective weight is
//!   `load_balancing_weight * min(1, overprovisioning_factor / 100 * healthy / eligible)`.
//! - **Zone aware routing**: [`zone_routing`].

/// Host counts of one priority level (or one locality).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LevelCounts {
    /// Every host in the level.
    pub total: u64,
    /// Healthy hosts.
    pub healthy: u64,
    /// Degraded hosts (used only when not enough healthy hosts).
    pub degraded: u64,
    /// Excluded hosts (not counted at all, e.g. waiting for their first health check).
    pub excluded: u64,
}

impl LevelCounts {
    /// Hosts that count: total minus excluded.
    pub fn eligible(&self) -> u64 {
        self.total.saturating_sub(self.excluded)
    }
}

/// How load is spread across priority levels: percent per level, summing to 100 (or 0 when no
/// level has hosts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriorityLoad {
    /// Percent of requests sent to the healthy hosts of each level.
    pub healthy: Vec<u32>,
    /// Percent of requests sent to the degraded hosts of each level.
    pub degraded: Vec<u32>,
    /// Whether each level is in panic (balances over all its hosts).
    pub panic: Vec<bool>,
}

/// Which hosts of the chosen level to balance over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Availability {
    /// The healthy hosts.
    Healthy,
    /// The degraded hosts.
    Degraded,
}

/// Health of one level in percent, scaled by the overprovisioning factor, capped at 100.
pub fn level_health(count: u64, eligible: u64, overprovisioning_factor: u32) -> u32 {
    if eligible == 0 {
        return 0;
    }
    (u64::from(overprovisioning_factor) * count / eligible).min(100) as u32
}

/// Envoy's priority load for `levels` (index = priority), with the overprovisioning factor in
/// percent and the panic threshold in percent.
pub fn priority_load(
    levels: &[LevelCounts],
    overprovisioning_factor: u32,
    panic_threshold: f64,
) -> PriorityLoad {
    let n = levels.len();
    let mut out = PriorityLoad {
        healthy: vec![0; n],
        degraded: vec![0; n],
        panic: vec![false; n],
    };
    if n == 0 {
        return out;
    }
    let health: Vec<u32> = levels
        .iter()
        .map(|l| level_health(l.healthy, l.eligible(), overprovisioning_factor))
        .collect();
    let degraded: Vec<u32> = levels
        .iter()
        .map(|l| level_health(l.degraded, l.eligible(), overprovisioning_factor))
        .collect();
    let total_avail = total_availability(&health, &degraded);
    if total_avail > 0 {
        let (first_healthy, left) = distribute(&mut out.healthy, &health, 100, total_avail);
        let (first_degraded, left) = distribute(&mut out.degraded, &degraded, left, total_avail);
        if left > 0 {
            match (first_healthy, first_degraded) {
                (Some(i), _) => out.healthy[i] += left,
                (None, Some(i)) => out.degraded[i] += left,
                (None, None) => {}
            }
        }
    }
    // Panic, per level.
    if panic_threshold <= 0.0 && total_avail == 0 {
        out.healthy[0] = 100;
        return out;
    }
    for (i, l) in levels.iter().enumerate() {
        out.panic[i] = total_avail == 0 || in_panic(l, panic_threshold);
    }
    // Every level panics: split by host count.
    if out.panic.iter().all(|p| *p) {
        let hosts: u64 = levels.iter().map(|l| l.total).sum();
        if hosts == 0 {
            return out;
        }
        let mut left = 100u32;
        for (i, l) in levels.iter().enumerate() {
            let share = (100 * l.total / hosts) as u32;
            out.healthy[i] = share;
            out.degraded[i] = 0;
            left -= share;
        }
        out.healthy[0] += left;
    }
    out
}

/// Whether a level is in panic: fewer than `threshold` percent of its eligible hosts are
/// healthy or degraded (a threshold of 0 disables panic).
pub fn in_panic(l: &LevelCounts, threshold: f64) -> bool {
    if threshold <= 0.0 {
        return false;
    }
    let eligible = l.eligible();
    let pct = if eligible == 0 {
        0.0
    } else {
        100.0 * (l.healthy + l.degraded) as f64 / eligible as f64
    };
    pct < threshold
}

fn total_availability(health: &[u32], degraded: &[u32]) -> u32 {
    let s: u64 = health.iter().chain(degraded).map(|v| u64::from(*v)).sum();
    s.min(100) as u32
}

/// Give each level `min(left, availability * 100 / total)` in order; returns the first level
/// with availability and what is left.
fn distribute(
    load: &mut [u32],
    availability: &[u32],
    mut left: u32,
    total: u32,
) -> (Option<usize>, u32) {
    let mut first = None;
    for (i, a) in availability.iter().enumerate() {
        if first.is_none() && *a > 0 {
            first = Some(i);
        }
        load[i] = left.min(a * 100 / total);
        left -= load[i];
    }
    (first, left)
}

/// The level and host set a request goes to, from a roll (any u64: a hash or a random
/// number): Envoy maps it to 1..=100 and walks the cumulative healthy loads, then the
/// degraded ones. `None` when every load is 0.
pub fn choose_priority(load: &PriorityLoad, roll: u64) -> Option<(usize, Availability)> {
    let r = (roll % 100) as u32 + 1;
    let mut acc = 0u32;
    for (i, l) in load.healthy.iter().enumerate() {
        acc += l;
        if r <= acc {
            return Some((i, Availability::Healthy));
        }
    }
    for (i, l) in load.degraded.iter().enumerate() {
        acc += l;
        if r <= acc {
            return Some((i, Availability::Degraded));
        }
    }
    None
}

/// Effective weight of a locality under `locality_weighted_lb_config`: its weight scaled by
/// its availability, `min(1, overprovisioning_factor / 100 * available / eligible)`. A locality
/// without a weight gets none (Envoy sends it nothing).
pub fn effective_locality_weight(
    weight: Option<u32>,
    available: u64,
    eligible: u64,
    overprovisioning_factor: u32,
) -> f64 {
    let Some(w) = weight else { return 0.0 };
    if eligible == 0 {
        return 0.0;
    }
    let ratio = available as f64 / eligible as f64;
    let avail = (f64::from(overprovisioning_factor) / 100.0 * ratio).min(1.0);
    f64::from(w) * avail
}

/// Zone-aware routing decision (Envoy's locality routing state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZoneRouting {
    /// Not applied (too few hosts, no local hosts, several priorities, ...).
    None,
    /// Send everything to the local locality.
    Direct,
    /// Send `local_percent / 10000` of requests to the local locality; the rest goes to the
    /// other localities in proportion to their residual capacity (cumulative, index = locality,
    /// local first and 0).
    Residual {
        /// Share kept local, in 1/10000.
        local_percent: u64,
        /// Cumulative residual capacity per locality (index 0 is the local one).
        residual: Vec<u64>,
    },
}

/// Envoy's zone-aware routing over healthy host counts per locality, index 0 being the proxy's
/// own locality, for the upstream cluster and for the local (calling) cluster. Applies only
/// when the upstream has at least `min_cluster_size` healthy hosts and the local cluster has
/// hosts. Without a local cluster, skiff counts itself as the only local host (all of the
/// local cluster in its own zone); Envoy's formula then keeps local exactly the upstream's
/// local share unless every upstream host is local, so the preference bites only when the
/// local cluster is spread wider than the upstream.
pub fn zone_routing(upstream: &[u64], local: &[u64], min_cluster_size: u64) -> ZoneRouting {
    let up_total: u64 = upstream.iter().sum();
    let local_total: u64 = local.iter().sum();
    if upstream.is_empty() || up_total < min_cluster_size || local_total == 0 {
        return ZoneRouting::None;
    }
    let pct = |v: &[u64], total: u64, i: usize| v.get(i).copied().unwrap_or(0) * 10000 / total;
    let up0 = pct(upstream, up_total, 0);
    let lo0 = pct(local, local_total, 0);
    if lo0 == 0 {
        return ZoneRouting::None;
    }
    if up0 >= lo0 {
        return ZoneRouting::Direct;
    }
    let local_percent = up0 * 10000 / lo0;
    let mut residual = vec![0u64; upstream.len()];
    for i in 1..upstream.len() {
        let u = pct(upstream, up_total, i);
        let l = pct(local, local_total, i);
        residual[i] = residual[i - 1] + u.saturating_sub(l);
    }
    ZoneRouting::Residual {
        local_percent,
        residual,
    }
}

/// The locality a request goes to under zone-aware routing, from two random rolls; `None` when
/// routing does not apply.
pub fn zone_pick(z: &ZoneRouting, roll_local: u64, roll_residual: u64) -> Option<usize> {
    match z {
        ZoneRouting::None => None,
        ZoneRouting::Direct => Some(0),
        ZoneRouting::Residual {
            local_percent,
            residual,
        } => {
            if roll_local % 10000 < *local_percent {
                return Some(0);
            }
            let last = *residual.last()?;
            if last == 0 {
                return Some(0);
            }
            let t = roll_residual % last;
            residual.iter().position(|c| t < *c)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lv(total: u64, healthy: u64) -> LevelCounts {
        LevelCounts {
            total,
            healthy,
            ..Default::default()
        }
    }

    #[test]
    fn envoy_documented_examples() {
        // Envoy's priority levels table (overprovisioning 1.4).
        type Case<'a> = (&'a [(u64, u64)], &'a [u32]);
        let cases: &[Case<'_>] = &[
            (&[(10, 10), (10, 10)], &[100, 0]),
            (&[(10, 7), (10, 10)], &[98, 2]),
            (&[(10, 5), (10, 10)], &[70, 30]),
            (&[(10, 2), (10, 10)], &[28, 72]),
            (&[(10, 2), (10, 2), (10, 10)], &[28, 28, 44]),
        ];
        for (levels, want) in cases {
            let l: Vec<LevelCounts> = levels.iter().map(|(t, h)| lv(*t, *h)).collect();
            let got = priority_load(&l, 140, 0.0);
            assert_eq!(&got.healthy, want, "{levels:?}");
        }
        // Envoy's panic example: P0 20% healthy, P1 20% healthy -> normalised 28/28 of 56.
        let l = [lv(10, 2), lv(10, 2)];
        let got = priority_load(&l, 140, 50.0);
        assert_eq!(got.healthy, vec![50, 50]);
        assert_eq!(got.panic, vec![true, true]);
    }

    #[test]
    fn degraded_take_what_healthy_cannot() {
        // P0: 2 healthy 3 degraded of 10 -> health 28, degraded 42; total 70.
        let l = [LevelCounts {
            total: 10,
            healthy: 2,
            degraded: 3,
            excluded: 0,
        }];
        let got = priority_load(&l, 140, 0.0);
        assert_eq!(got.healthy, vec![40]);
        assert_eq!(got.degraded, vec![60]);
    }

    #[test]
    fn zone_routing_examples() {
        assert_eq!(
            zone_routing(&[3, 3], &[1], 6),
            ZoneRouting::Residual {
                local_percent: 5000,
                residual: vec![0, 5000]
            }
        );
        assert_eq!(zone_routing(&[6, 0], &[1, 1], 6), ZoneRouting::Direct);
        assert_eq!(zone_routing(&[2, 2], &[1], 6), ZoneRouting::None);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, rng_seed: proptest::test_runner::RngSeed::Fixed(8), failure_persistence: None, ..ProptestConfig::default() })]

        /// Priority spill-over follows Envoy's documented formula for any health mix.
        #[test]
        fn spill_over_matches_formula(levels in proptest::collection::vec((1u64..20, 0u64..20), 1..5), opf in 100u32..200) {
            let l: Vec<LevelCounts> = levels.iter().map(|(t, h)| lv(*t, (*h).min(*t))).collect();
            let got = priority_load(&l, opf, 0.0);
            let health: Vec<u32> = l.iter().map(|x| ((u64::from(opf) * x.healthy / x.total).min(100)) as u32).collect();
            let total: u32 = health.iter().sum::<u32>().min(100);
            if total == 0 {
                prop_assert_eq!(got.healthy[0], 100);
                return Ok(());
            }
            let mut left = 100u32;
            let mut want = Vec::new();
            for h in &health {
                let x = left.min(h * 100 / total);
                want.push(x);
                left -= x;
            }
            if left > 0 {
                let first = health.iter().position(|h| *h > 0).unwrap();
                want[first] += left;
            }
            prop_assert_eq!(&got.healthy, &want);
            prop_assert_eq!(got.healthy.iter().sum::<u32>(), 100);
            // Higher levels are filled first: a level gets load only if those above are not
            // fully healthy.
            for i in 1..l.len() {
                if got.healthy[i] > 0 {
                    prop_assert!(health[..i].iter().all(|h| *h < 100));
                }
            }
        }

        /// Loads always sum to 100 when any host exists, with or without panic.
        #[test]
        fn loads_sum_to_100(levels in proptest::collection::vec((0u64..10, 0u64..10, 0u64..10), 1..5), th in 0.0f64..100.0) {
            let l: Vec<LevelCounts> = levels.iter().map(|(t, h, d)| {
                let h = (*h).min(*t);
                LevelCounts { total: *t, healthy: h, degraded: (*d).min(t - h), excluded: 0 }
            }).collect();
            let got = priority_load(&l, 140, th);
            let hosts: u64 = l.iter().map(|x| x.total).sum();
            let sum: u32 = got.healthy.iter().chain(&got.degraded).sum();
            if hosts > 0 || th <= 0.0 {
                prop_assert_eq!(sum, 100, "{:?}", got);
            }
            for r in 0..100u64 {
                if sum == 100 {
                    prop_assert!(choose_priority(&got, r).is_some());
                }
            }
        }
    }
}
