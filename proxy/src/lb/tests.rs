//! Balancer tests over real cluster entries (no sockets).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::model::cluster::lb::{LbSettings, OutlierDetection};
use crate::model::endpoint::{HealthStatus, LbEndpoint, Locality, LocalityEndpoints};
use crate::model::{Cluster, ClusterKind, LoadAssignment};
use crate::state::ClusterEntry;
use crate::stats::Stats;

/// (address, weight, priority, locality zone, health)
type Ep<'a> = (&'a str, u32, u32, &'a str, HealthStatus);

fn assignment(eps: &[Ep<'_>], locality_weights: &[(&str, u32)]) -> LoadAssignment {
    let mut groups: BTreeMap<(u32, String), Vec<LbEndpoint>> = BTreeMap::new();
    for (a, w, p, z, h) in eps {
        groups
            .entry((*p, z.to_string()))
            .or_default()
            .push(LbEndpoint {
                address: a.parse().unwrap(),
                internal: None,
                health: *h,
                weight: *w,
                transport_socket_match: Default::default(),
                istio_workload: None,
            });
    }
    LoadAssignment {
        cluster_name: "c".into(),
        localities: groups
            .into_iter()
            .map(|((p, z), endpoints)| LocalityEndpoints {
                weight: locality_weights
                    .iter()
                    .find(|(n, _)| *n == z)
                    .map(|(_, w)| *w),
                locality: Locality {
                    region: "r".into(),
                    zone: z,
                    sub_zone: String::new(),
                },
                priority: p,
                endpoints,
            })
            .collect(),
        overprovisioning_factor: 140,
    }
}

fn cluster(policy: LbPolicy, la: LoadAssignment, lb: LbSettings) -> Cluster {
    Cluster {
        istio_service: None,
        name: "c".into(),
        kind: ClusterKind::Static(la),
        lb_policy: policy,
        connect_timeout: Duration::from_secs(1),
        transport: Default::default(),
        lb,
        upstream_http: Default::default(),
    }
}

fn entry_on(c: Cluster, reg: &HostRegistry) -> ClusterEntry {
    let la = match &c.kind {
        ClusterKind::Static(la) => Some(Arc::new(la.clone())),
        _ => None,
    };
    ClusterEntry::new(c, la, reg)
}

fn entry(policy: LbPolicy, eps: &[Ep<'_>]) -> ClusterEntry {
    let reg = HostRegistry::new(Arc::new(Stats::default()));
    entry_on(
        cluster(policy, assignment(eps, &[]), LbSettings::default()),
        &reg,
    )
}

fn counts(e: &ClusterEntry, n: usize, req: &LbRequest<'_>) -> HashMap<SocketAddr, usize> {
    let mut m = HashMap::new();
    for _ in 0..n {
        let h = choose(&e.lb, req).expect("a host");
        *m.entry(h.address()).or_default() += 1;
    }
    m
}

fn a(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

const H: HealthStatus = HealthStatus::Healthy;

#[test]
fn round_robin_equal_weights_is_exact() {
    let e = entry(
        LbPolicy::RoundRobin,
        &[
            ("10.0.0.1:80", 1, 0, "a", H),
            ("10.0.0.2:80", 1, 0, "a", H),
            ("10.0.0.3:80", 1, 0, "a", H),
        ],
    );
    let c = counts(&e, 300, &LbRequest::default());
    assert!(c.values().all(|v| *v == 100), "{c:?}");
}

#[test]
fn weighted_round_robin_follows_weights_exactly() {
    let e = entry(
        LbPolicy::RoundRobin,
        &[("10.0.0.1:80", 1, 0, "a", H), ("10.0.0.2:80", 3, 0, "a", H)],
    );
    let c = counts(&e, 400, &LbRequest::default());
    assert_eq!(c[&a("10.0.0.1:80")], 100);
    assert_eq!(c[&a("10.0.0.2:80")], 300);
}

#[test]
fn unhealthy_draining_and_degraded_as_envoy() {
    let e = entry(
        LbPolicy::RoundRobin,
        &[
            ("10.0.0.1:80", 1, 0, "a", H),
            ("10.0.0.2:80", 1, 0, "a", HealthStatus::Unhealthy),
            ("10.0.0.3:80", 1, 0, "a", HealthStatus::Draining),
            ("10.0.0.4:80", 1, 0, "a", HealthStatus::Degraded),
            ("10.0.0.5:80", 1, 0, "a", H),
        ],
    );
    // DRAINING is excluded: 2 of 4 healthy -> health 70, 1 degraded -> 35; total availability
    // is capped at 100, so the healthy hosts take 70% and the degraded one the other 30%.
    let plan = e.lb.plan();
    assert_eq!(plan.load.healthy, vec![70]);
    assert_eq!(plan.load.degraded, vec![30]);
    let c = counts(&e, 2000, &LbRequest::default());
    assert!(!c.contains_key(&a("10.0.0.2:80")));
    assert!(!c.contains_key(&a("10.0.0.3:80")));
    let d = c[&a("10.0.0.4:80")] as f64 / 2000.0;
    assert!((d - 0.30).abs() < 0.05, "degraded share {d}");
}

#[test]
fn panic_mode_uses_every_host() {
    let e = entry(
        LbPolicy::RoundRobin,
        &[
            ("10.0.0.1:80", 1, 0, "a", H),
            ("10.0.0.2:80", 1, 0, "a", HealthStatus::Unhealthy),
            ("10.0.0.3:80", 1, 0, "a", HealthStatus::Unhealthy),
        ],
    );
    // 33% healthy < 50%: panic, all three used.
    let c = counts(&e, 300, &LbRequest::default());
    assert_eq!(c.len(), 3, "{c:?}");
    assert_eq!(e.stats.lb_healthy_panic.get(), 300);
}

#[test]
fn exclude_moves_to_another_host_when_attempts_allow() {
    let e = entry(
        LbPolicy::Random,
        &[("10.0.0.1:80", 1, 0, "a", H), ("10.0.0.2:80", 1, 0, "a", H)],
    );
    let ex = [a("10.0.0.1:80")];
    let req = LbRequest {
        exclude: &ex,
        max_attempts: 20,
        ..Default::default()
    };
    for _ in 0..50 {
        assert_eq!(choose(&e.lb, &req).unwrap().address(), a("10.0.0.2:80"));
    }
}

#[test]
fn ring_hash_and_maglev_are_sticky_per_hash() {
    for policy in [LbPolicy::RingHash, LbPolicy::Maglev] {
        let e = entry(
            policy,
            &[
                ("10.0.0.1:80", 1, 0, "a", H),
                ("10.0.0.2:80", 1, 0, "a", H),
                ("10.0.0.3:80", 1, 0, "a", H),
            ],
        );
        let mut seen = std::collections::HashSet::new();
        for k in 0..64u32 {
            let req = LbRequest {
                hash: Some(hash_bytes(&k.to_le_bytes())),
                ..Default::default()
            };
            let first = choose(&e.lb, &req).unwrap().address();
            for _ in 0..3 {
                assert_eq!(choose(&e.lb, &req).unwrap().address(), first);
            }
            seen.insert(first);
        }
        assert_eq!(seen.len(), 3, "{policy:?} spreads keys");
    }
}

#[test]
fn host_state_survives_a_new_snapshot() {
    let reg = HostRegistry::new(Arc::new(Stats::default()));
    let eps = [("10.0.0.1:80", 1, 0, "a", H), ("10.0.0.2:80", 1, 0, "a", H)];
    let e1 = entry_on(
        cluster(
            LbPolicy::RoundRobin,
            assignment(&eps, &[]),
            LbSettings::default(),
        ),
        &reg,
    );
    let g = e1.lb.host(a("10.0.0.1:80")).unwrap().start_request();
    let e2 = entry_on(
        cluster(
            LbPolicy::RoundRobin,
            assignment(&eps, &[]),
            LbSettings::default(),
        ),
        &reg,
    );
    assert_eq!(
        e2.lb
            .host(a("10.0.0.1:80"))
            .unwrap()
            .state()
            .active_requests(),
        1
    );
    drop(g);
    assert_eq!(
        e2.lb
            .host(a("10.0.0.1:80"))
            .unwrap()
            .state()
            .active_requests(),
        0
    );
}

#[test]
fn consecutive_5xx_ejects_and_the_host_returns_after_base_ejection_time() {
    let stats = Arc::new(Stats::default());
    let reg = HostRegistry::new(stats.clone());
    let mut health = reg.subscribe_health();
    let lb = LbSettings {
        outlier: Some(OutlierDetection {
            consecutive_5xx: 3,
            max_ejection_percent: 50,
            base_ejection_time: Duration::from_secs(30),
            interval: Duration::from_secs(1),
            ..Default::default()
        }),
        ..Default::default()
    };
    let eps = [("10.0.0.1:80", 1, 0, "a", H), ("10.0.0.2:80", 1, 0, "a", H)];
    let e = entry_on(
        cluster(LbPolicy::RoundRobin, assignment(&eps, &[]), lb),
        &reg,
    );
    let bad = e.lb.host(a("10.0.0.1:80")).unwrap().clone();
    for _ in 0..3 {
        bad.report(Outcome::Status(503));
    }
    assert!(bad.flags() & host::flag::FAILED_OUTLIER_CHECK != 0);
    assert!(health.has_changed().unwrap());
    health.borrow_and_update();
    assert_eq!(
        stats
            .counter("cluster.c.outlier_detection.ejections_enforced_consecutive_5xx")
            .get(),
        1
    );
    assert_eq!(
        stats
            .gauge("cluster.c.outlier_detection.ejections_active")
            .get(),
        1
    );
    let c = counts(&e, 100, &LbRequest::default());
    assert_eq!(c.get(&a("10.0.0.1:80")), None, "ejected host not chosen");
    // A second host may not be ejected: 50% already ejected.
    let good = e.lb.host(a("10.0.0.2:80")).unwrap().clone();
    for _ in 0..3 {
        good.report(Outcome::ConnectFailure);
    }
    assert_eq!(good.flags() & host::flag::FAILED_OUTLIER_CHECK, 0);
    assert_eq!(
        stats
            .counter("cluster.c.outlier_detection.ejections_overflow")
            .get(),
        1
    );
    // Not back before base_ejection_time ...
    let t0 = tokio::time::Instant::now();
    e.lb.shared
        .outlier_tick(&e.lb.hosts, t0 + Duration::from_secs(29));
    assert!(bad.flags() & host::flag::FAILED_OUTLIER_CHECK != 0);
    // ... back after it.
    e.lb.shared
        .outlier_tick(&e.lb.hosts, t0 + Duration::from_secs(30));
    assert_eq!(bad.flags() & host::flag::FAILED_OUTLIER_CHECK, 0);
    assert!(counts(&e, 10, &LbRequest::default()).contains_key(&a("10.0.0.1:80")));
    assert_eq!(
        stats
            .gauge("cluster.c.outlier_detection.ejections_active")
            .get(),
        0
    );
}

#[test]
fn least_request_prefers_idle_hosts() {
    let e = entry(
        LbPolicy::LeastRequest,
        &[("10.0.0.1:80", 1, 0, "a", H), ("10.0.0.2:80", 1, 0, "a", H)],
    );
    let busy = e.lb.host(a("10.0.0.1:80")).unwrap().clone();
    let _g: Vec<_> = (0..5).map(|_| busy.start_request()).collect();
    let c = counts(&e, 400, &LbRequest::default());
    // P2C picks the busy host only when both choices fall on it: ~1/4.
    let share = c.get(&a("10.0.0.1:80")).copied().unwrap_or(0) as f64 / 400.0;
    assert!(share < 0.35, "busy host share {share}");
}

#[test]
fn locality_weighted_split_follows_locality_weights() {
    let reg = HostRegistry::new(Arc::new(Stats::default()));
    let mut lb = LbSettings::default();
    lb.common.locality_weighted = true;
    let la = assignment(
        &[
            ("10.0.0.1:80", 1, 0, "a", H),
            ("10.0.0.2:80", 1, 0, "b", H),
            ("10.0.0.3:80", 1, 0, "b", H),
        ],
        &[("a", 3), ("b", 1)],
    );
    let e = entry_on(cluster(LbPolicy::RoundRobin, la, lb), &reg);
    let c = counts(&e, 400, &LbRequest::default());
    assert_eq!(c[&a("10.0.0.1:80")], 300);
    assert_eq!(c[&a("10.0.0.2:80")] + c[&a("10.0.0.3:80")], 100);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, rng_seed: proptest::test_runner::RngSeed::Fixed(8), failure_persistence: None, ..ProptestConfig::default() })]

    /// Weighted round robin and weighted least request (idle hosts) converge to the weights;
    /// random converges to equal shares.
    #[test]
    fn selection_frequencies_converge_to_weights(ws in proptest::collection::vec(1u32..8, 2..6), seed in any::<u64>()) {
        fastrand::seed(seed);
        let addrs: Vec<String> = (0..ws.len()).map(|i| format!("10.0.1.{}:80", i + 1)).collect();
        let eps: Vec<Ep<'_>> = addrs.iter().zip(&ws).map(|(a, w)| (a.as_str(), *w, 0, "a", H)).collect();
        let total: u32 = ws.iter().sum();
        let n = 4000usize;
        for policy in [LbPolicy::RoundRobin, LbPolicy::LeastRequest, LbPolicy::Random] {
            let e = entry(policy, &eps);
            let c = counts(&e, n, &LbRequest::default());
            for (addr, w) in addrs.iter().zip(&ws) {
                let want = if policy == LbPolicy::Random { 1.0 / ws.len() as f64 } else { f64::from(*w) / f64::from(total) };
                let got = c.get(&a(addr)).copied().unwrap_or(0) as f64 / n as f64;
                // 5 standard deviations of a binomial proportion (deterministic picks are exact).
                let bound = 5.0 * (want * (1.0 - want) / n as f64).sqrt() + 0.002;
                prop_assert!((got - want).abs() <= bound, "{:?} {} want {} got {}", policy, addr, want, got);
            }
        }
        // Consistent hashing over random keys: Maglev's table gives each host its weighted
        // share of entries almost exactly; a ring of >= 1024 points only approximately (arc
        // lengths vary), so it gets a relative bound.
        for policy in [LbPolicy::Maglev, LbPolicy::RingHash] {
            let e = entry(policy, &eps);
            let mut c: HashMap<SocketAddr, usize> = HashMap::new();
            for _ in 0..n {
                let req = LbRequest { hash: Some(fastrand::u64(..)), ..Default::default() };
                *c.entry(choose(&e.lb, &req).unwrap().address()).or_default() += 1;
            }
            for (addr, w) in addrs.iter().zip(&ws) {
                let want = f64::from(*w) / f64::from(total);
                let got = c.get(&a(addr)).copied().unwrap_or(0) as f64 / n as f64;
                let sampling = 5.0 * (want * (1.0 - want) / n as f64).sqrt();
                let bound = if policy == LbPolicy::Maglev { sampling + 0.01 } else { sampling + 0.3 * want };
                prop_assert!((got - want).abs() <= bound, "{:?} {} want {} got {}", policy, addr, want, got);
            }
        }
    }

    /// Removing one of N equal endpoints changes the host of few keys beyond the 1/N that
    /// were on it. Ring hash: survivors keep their points, and the rescaled ring adds about as
    /// many new points as the removed host had, so at most ~2/N of keys move. Maglev: the
    /// paper's (and Envoy's) "minimal disruption", 1/N plus a few percent.
    #[test]
    fn consistent_hash_disruption_is_bounded(n in 3usize..12) {
        let addrs: Vec<String> = (0..n).map(|i| format!("10.0.2.{}:80", i + 1)).collect();
        let all: Vec<Ep<'_>> = addrs.iter().map(|a| (a.as_str(), 1, 0, "a", H)).collect();
        let fewer = &all[..n - 1];
        let keys = 4000u32;
        for policy in [LbPolicy::RingHash, LbPolicy::Maglev] {
            let e1 = entry(policy, &all);
            let e2 = entry(policy, fewer);
            let mut changed = 0u32;
            for k in 0..keys {
                let req = LbRequest { hash: Some(hash_bytes(&k.to_le_bytes())), ..Default::default() };
                let x = choose(&e1.lb, &req).unwrap().address();
                let y = choose(&e2.lb, &req).unwrap().address();
                if x != y {
                    changed += 1;
                }
            }
            let frac = f64::from(changed) / f64::from(keys);
            let minimal = 1.0 / n as f64;
            let bound = if policy == LbPolicy::RingHash { 2.0 * minimal + 0.03 } else { minimal + 0.06 };
            prop_assert!(frac <= bound, "{:?} n={} changed {} bound {}", policy, n, frac, bound);
            prop_assert!(frac >= minimal - 0.03, "{:?} n={} changed {} (keys of the removed host must move)", policy, n, frac);
        }
    }
}

#[test]
fn peak_ewma_avoids_the_slow_host() {
    let e = entry(
        LbPolicy::PeakEwma,
        &[("10.0.0.1:80", 1, 0, "a", H), ("10.0.0.2:80", 1, 0, "a", H)],
    );
    let now = tokio::time::Instant::now();
    let slow = e.lb.host(a("10.0.0.1:80")).unwrap().clone();
    let fast = e.lb.host(a("10.0.0.2:80")).unwrap().clone();
    slow.state().observe_rtt(Duration::from_millis(200), now);
    fast.state().observe_rtt(Duration::from_millis(2), now);
    let c = counts(&e, 200, &LbRequest::default());
    // Two distinct hosts are compared on every pick: the slow one never wins.
    assert_eq!(c.get(&a("10.0.0.1:80")), None, "{c:?}");
    // Load counts too: enough requests in flight on the fast host make the slow one cheaper.
    let _busy: Vec<_> = (0..200).map(|_| fast.start_request()).collect();
    assert_eq!(
        choose(&e.lb, &LbRequest::default()).unwrap().address(),
        a("10.0.0.1:80")
    );
}

#[test]
fn eligible_shares_follow_priority_and_locality() {
    let reg = HostRegistry::new(Arc::new(Stats::default()));
    let mut lb = LbSettings::default();
    lb.common.locality_weighted = true;
    let la = assignment(
        &[
            ("10.0.0.1:80", 1, 0, "a", H),
            ("10.0.0.2:80", 1, 0, "a", HealthStatus::Unhealthy),
            ("10.0.0.3:80", 1, 0, "b", H),
            ("10.0.0.4:80", 1, 1, "c", H),
        ],
        &[("a", 1), ("b", 3), ("c", 1)],
    );
    let e = entry_on(cluster(LbPolicy::RoundRobin, la, lb), &reg);
    let shares: HashMap<SocketAddr, f64> = e
        .eligible()
        .into_iter()
        .map(|(h, s)| (h.address(), s))
        .collect();
    // P0: 2 of 3 healthy -> 93%; zone a weighs 0.7, zone b 3; P1 takes 7%.
    let close = |x: f64, y: f64| (x - y).abs() < 1e-9;
    assert!(
        close(shares[&a("10.0.0.1:80")], 0.93 * 0.7 / 3.7),
        "{shares:?}"
    );
    assert!(
        close(shares[&a("10.0.0.3:80")], 0.93 * 3.0 / 3.7),
        "{shares:?}"
    );
    assert!(close(shares[&a("10.0.0.4:80")], 0.07), "{shares:?}");
    assert!(!shares.contains_key(&a("10.0.0.2:80")));
    // The balancer follows the same plan.
    let c = counts(&e, 3700, &LbRequest::default());
    let p1 = c.get(&a("10.0.0.4:80")).copied().unwrap_or(0) as f64 / 3700.0;
    assert!((p1 - 0.07).abs() < 0.03, "P1 share {p1}");
}

#[test]
fn zone_aware_routing_weighs_the_local_cluster() {
    let zone = |z: &str| Locality {
        region: "r".into(),
        zone: z.into(),
        sub_zone: String::new(),
    };
    let eps = [
        ("10.0.3.1:80", 1, 0, "a", H),
        ("10.0.3.2:80", 1, 0, "a", H),
        ("10.0.3.3:80", 1, 0, "a", H),
        ("10.0.3.4:80", 1, 0, "b", H),
        ("10.0.3.5:80", 1, 0, "b", H),
        ("10.0.3.6:80", 1, 0, "b", H),
    ];
    let mut lb = LbSettings::default();
    lb.common.zone_aware = Some(crate::model::cluster::lb::ZoneAware {
        routing_enabled: 100.0,
        min_cluster_size: 6,
        fail_traffic_on_panic: false,
    });
    let share_a = |local_hosts: Vec<(Locality, u64)>| {
        let reg = HostRegistry::new(Arc::new(Stats::default()));
        reg.set_local_locality(Some(zone("a")));
        reg.set_local_hosts(local_hosts);
        let e = entry_on(
            cluster(LbPolicy::RoundRobin, assignment(&eps, &[]), lb.clone()),
            &reg,
        );
        let c = counts(&e, 3000, &LbRequest::default());
        let a: usize = (1..=3)
            .map(|i| c.get(&a(&format!("10.0.3.{i}:80"))).copied().unwrap_or(0))
            .sum();
        a as f64 / 3000.0
    };
    // Local cluster 25% in zone a, upstream 50%: everything stays in zone a.
    assert_eq!(share_a(vec![(zone("a"), 1), (zone("b"), 3)]), 1.0);
    // Local 75% in zone a, upstream 50%: 50/75 of the requests stay local.
    let s = share_a(vec![(zone("a"), 3), (zone("b"), 1)]);
    assert!((s - 2.0 / 3.0).abs() < 0.05, "local share {s}");
    // Without a local cluster skiff is the only local host: the upstream's own split.
    let s = share_a(vec![]);
    assert!((s - 0.5).abs() < 0.05, "local share {s}");
}

#[test]
fn success_rate_outlier_is_ejected_at_the_interval() {
    let stats = Arc::new(Stats::default());
    let reg = HostRegistry::new(stats.clone());
    let lb = LbSettings {
        outlier: Some(OutlierDetection::default()),
        ..Default::default()
    };
    let addrs: Vec<String> = (1..=5).map(|i| format!("10.0.4.{i}:80")).collect();
    let eps: Vec<Ep<'_>> = addrs.iter().map(|a| (a.as_str(), 1, 0, "a", H)).collect();
    let e = entry_on(
        cluster(LbPolicy::RoundRobin, assignment(&eps, &[]), lb),
        &reg,
    );
    for (i, h) in e.lb.hosts.iter().enumerate() {
        for k in 0..100 {
            // Host 0 fails every other request: 50% success, never 5 in a row.
            let fail = i == 0 && k % 2 == 0;
            h.report(if fail {
                Outcome::Status(500)
            } else {
                Outcome::Success
            });
        }
    }
    assert_eq!(
        stats
            .gauge("cluster.c.outlier_detection.ejections_active")
            .get(),
        0
    );
    // mean 90, stdev 20: threshold 90 - 1.9 * 20 = 52 > 50.
    e.lb.shared
        .outlier_tick(&e.lb.hosts, tokio::time::Instant::now());
    assert!(e.lb.hosts[0].flags() & host::flag::FAILED_OUTLIER_CHECK != 0);
    assert!(e.lb.hosts[1..].iter().all(|h| h.flags() == 0));
    assert_eq!(
        stats
            .counter("cluster.c.outlier_detection.ejections_enforced_success_rate")
            .get(),
        1
    );
    assert_eq!(e.lb.hosts[0].state().success_rate(), Some(50.0));
    let (avg, threshold) = e.lb.shared.success_rate_summary().unwrap();
    assert!(
        (avg - 90.0).abs() < 1e-9 && (threshold - 52.0).abs() < 1e-9,
        "{avg} {threshold}"
    );
    assert_eq!(e.lb.hosts[1].state().success_rate(), Some(100.0));
}

#[test]
fn weighted_least_request_bias_shifts_load_from_busy_hosts() {
    let mut lb = LbSettings::default();
    lb.least_request.active_request_bias = 1.0;
    let reg = HostRegistry::new(Arc::new(Stats::default()));
    let la = assignment(
        &[("10.0.5.1:80", 2, 0, "a", H), ("10.0.5.2:80", 1, 0, "a", H)],
        &[],
    );
    let e = entry_on(cluster(LbPolicy::LeastRequest, la, lb), &reg);
    // The weight-2 host has 3 requests in flight: effective weight 2 / 4 = 0.5 against 1.
    let busy = e.lb.host(a("10.0.5.1:80")).unwrap().clone();
    let _g: Vec<_> = (0..3).map(|_| busy.start_request()).collect();
    let c = counts(&e, 300, &LbRequest::default());
    let share = c.get(&a("10.0.5.1:80")).copied().unwrap_or(0) as f64 / 300.0;
    assert!(
        (share - 1.0 / 3.0).abs() < 0.05,
        "busy weighted host share {share}"
    );
}
