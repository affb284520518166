//! Reconciler tests on an in-memory model of the maps: applying diff(a, b) to a gives b, and
//! no write in between lets a connect see a service half-way between a and b.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use proptest::prelude::*;

use super::*;
use crate::bpf::projection::{ClusterImage, ServiceImage};

/// What a connect would get for one service: the policy and the endpoints its draws reach
/// (with how many draws each), or `None` (proxy).
type Seen = Option<(u8, BTreeMap<SocketAddr, u64>)>;

#[derive(Default)]
struct MemMaps {
    services: BTreeMap<ServiceKey, ServiceValue>,
    clusters: BTreeMap<u32, ClusterValue>,
    endpoints: BTreeMap<u32, EndpointValue>,
    maglev: BTreeMap<u32, u32>,
    active: u8,
    enabled: bool,
    caps: Option<Capacity>,
    /// For each checked service: the allowed views (before, after).
    allowed: BTreeMap<SocketAddr, (Seen, Seen)>,
    writes: usize,
    /// A flip happened and `quiesce` was not called since.
    flipped: bool,
    quiesces: usize,
}

impl MemMaps {
    fn seen(&self, vip: SocketAddr) -> Seen {
        if !self.enabled {
            return None;
        }
        choices(
            &self.services,
            &|i| self.clusters.get(&i).copied(),
            &|i| self.endpoints.get(&i).copied(),
            &|i| self.maglev.get(&i).copied(),
            self.active,
            vip,
        )
    }

    /// A write to the cluster, slot or maglev arrays: connects that read the generation number
    /// before the last flip may still walk the generation written, unless a grace period
    /// passed since that flip.
    fn generation_write(&mut self) {
        assert!(
            !self.flipped,
            "the inactive generation was written without a grace period after the flip"
        );
    }

    fn check(&mut self) {
        self.writes += 1;
        let caps = self.caps.unwrap();
        assert!(self.services.len() <= caps.max_services as usize);
        for (vip, (before, after)) in &self.allowed {
            let now = self.seen(*vip);
            assert!(
                now.is_none() || &now == before || &now == after,
                "{vip} mid-update saw {now:?}; allowed {before:?} or {after:?}"
            );
        }
    }
}

impl FastMaps for MemMaps {
    fn set_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), BpfError> {
        self.services.insert(key, value);
        self.check();
        Ok(())
    }
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), BpfError> {
        self.services.remove(&key);
        self.check();
        Ok(())
    }
    fn set_cluster(&mut self, index: u32, value: ClusterValue) -> Result<(), BpfError> {
        assert!(index < 2 * self.caps.unwrap().max_clusters);
        self.generation_write();
        self.clusters.insert(index, value);
        self.check();
        Ok(())
    }
    fn set_endpoint(&mut self, index: u32, value: EndpointValue) -> Result<(), BpfError> {
        assert!(index < 2 * self.caps.unwrap().max_endpoints);
        self.generation_write();
        self.endpoints.insert(index, value);
        self.check();
        Ok(())
    }
    fn set_maglev(&mut self, index: u32, value: u32) -> Result<(), BpfError> {
        let per_gen = self.caps.unwrap().max_maglev * MAGLEV_TABLE_SIZE;
        assert!(index < 2 * per_gen);
        self.generation_write();
        // Thousands of entries per table: instead of re-walking every service after each one,
        // check the invariant that makes them safe: only the inactive generation is written.
        assert!(
            !self.enabled || index / per_gen != u32::from(self.active),
            "maglev entry {index} written in the active generation"
        );
        self.maglev.insert(index, value);
        self.writes += 1;
        Ok(())
    }
    fn flip(&mut self, generation: u8) -> Result<(), BpfError> {
        self.active = generation;
        self.enabled = true;
        self.flipped = true;
        self.check();
        Ok(())
    }
    fn quiesce(&mut self) -> Result<(), BpfError> {
        self.flipped = false;
        self.quiesces += 1;
        Ok(())
    }
}

fn expected(img: &MapImage, vip: SocketAddr) -> Seen {
    let s = img.services.get(&vip)?;
    let c = &img.clusters[&s.cluster];
    let lb = match c.lb {
        FastLb::RoundRobin => LB_ROUND_ROBIN,
        FastLb::Random => LB_RANDOM,
        FastLb::LeastRequest => LB_LEAST_REQUEST,
        FastLb::Maglev => LB_MAGLEV,
    };
    // What each policy's draws give, straight from the image.
    let n = c.endpoints.len();
    let hits: Vec<u64> = match c.lb {
        FastLb::RoundRobin if c.weighted() => c.weights.iter().map(|w| u64::from(*w)).collect(),
        FastLb::RoundRobin | FastLb::Random => vec![1; n],
        // Every pair (a, b) at equal load picks a: n draws per endpoint.
        FastLb::LeastRequest => vec![n as u64; n],
        FastLb::Maglev => {
            let mut h = vec![0u64; n];
            for i in maglev_table(c) {
                h[i as usize] += 1;
            }
            h
        }
    };
    let set = c
        .endpoints
        .iter()
        .zip(hits)
        .filter(|(_, h)| *h > 0)
        .map(|(e, h)| (*e, h))
        .collect();
    Some((lb, set))
}

/// (vip, cluster, endpoints as (host, weight), policy 0..4)
type Spec = Vec<(u8, u8, Vec<(u8, u32)>, u8)>;

fn image(spec: &Spec) -> MapImage {
    let mut img = MapImage::default();
    for (vip, cluster, eps, policy) in spec {
        let name = format!("c{cluster}");
        let vip: SocketAddr = format!("10.96.0.{vip}:80").parse().unwrap();
        let mut slots: Vec<(SocketAddr, u32)> = eps
            .iter()
            .map(|(e, w)| (format!("127.0.{cluster}.{e}:8080").parse().unwrap(), *w))
            .collect();
        slots.sort();
        slots.dedup_by_key(|(e, _)| *e);
        if slots.is_empty() {
            continue;
        }
        let lb = match policy % 4 {
            0 => FastLb::RoundRobin,
            1 => FastLb::Random,
            2 => FastLb::LeastRequest,
            _ => FastLb::Maglev,
        };
        if lb == FastLb::LeastRequest {
            // The projection admits LEAST_REQUEST with equal weights only.
            for s in &mut slots {
                s.1 = 1;
            }
        }
        let (endpoints, weights) = slots.into_iter().unzip();
        // One definition per cluster name: the first wins.
        img.clusters.entry(name.clone()).or_insert(ClusterImage {
            lb,
            endpoints,
            weights,
            shares: false,
        });
        img.services.insert(
            vip,
            ServiceImage {
                cluster: name,
                listener: "l".into(),
                filter_chain: "fc".into(),
            },
        );
    }
    img
}

/// Hosts of weight 1.
fn w1(hosts: &[u8]) -> Vec<(u8, u32)> {
    hosts.iter().map(|h| (*h, 1)).collect()
}

fn apply_checked(
    r: &mut Reconciler,
    m: &mut MemMaps,
    from: &MapImage,
    to: &MapImage,
) -> ApplyReport {
    let vips: BTreeSet<SocketAddr> = from
        .services
        .keys()
        .chain(to.services.keys())
        .copied()
        .collect();
    // What fits the maps is served; the rest (beyond a capacity) stays with the proxy.
    let caps = m.caps.unwrap();
    let fitted = to
        .fit(
            caps.max_services as usize,
            caps.max_clusters as usize,
            caps.max_endpoints as usize,
            caps.max_maglev as usize,
        )
        .0;
    m.allowed = vips
        .into_iter()
        .map(|v| (v, (m.seen(v), expected(&fitted, v))))
        .collect();
    let report = r.apply(m, to).unwrap();
    for (vip, (_, after)) in &m.allowed {
        assert_eq!(&m.seen(*vip), after, "{vip} after the update");
    }
    report
}

fn spec() -> impl Strategy<Value = Spec> {
    proptest::collection::vec(
        (
            1u8..12,
            1u8..6,
            proptest::collection::vec((1u8..9, 1u32..4), 0..5),
            0u8..4,
        ),
        0..10,
    )
}

const SMALL: Capacity = Capacity {
    max_services: 64,
    max_clusters: 16,
    max_endpoints: 64,
    max_maglev: 4,
};

proptest! {
    #[test]
    fn applying_a_then_b_serves_exactly_b(a in spec(), b in spec(), c in spec()) {
        let (a, b, c) = (image(&a), image(&b), image(&c));
        let mut m = MemMaps { caps: Some(SMALL), ..Default::default() };
        let mut r = Reconciler::new(SMALL);
        apply_checked(&mut r, &mut m, &MapImage::default(), &a);
        apply_checked(&mut r, &mut m, &a, &b);
        apply_checked(&mut r, &mut m, &b, &c);
        prop_assert_eq!(r.applied(), &c.fit(64, 16, 64, 4).0);
        prop_assert_eq!(m.services.len(), c.services.len());
        // Applying the same image again writes nothing.
        let again = apply_checked(&mut r, &mut m, &c, &c);
        prop_assert_eq!(again.services_written, 0);
        prop_assert_eq!(again.services_deleted, 0);
        prop_assert_eq!(again.endpoints_written, 0);
    }
}

#[test]
fn slots_of_a_cluster_are_contiguous_and_generation_specific() {
    let img = image(&vec![(1, 1, w1(&[1, 2, 3]), 0), (2, 2, w1(&[4, 5]), 1)]);
    let Layout {
        clusters,
        endpoints,
        services,
        ..
    } = layout(&img, 1, SMALL);
    assert_eq!(endpoints.len(), 5);
    assert_eq!(clusters[0].slot_base, SMALL.max_endpoints);
    assert_eq!(clusters[0].endpoint_count, 3);
    assert_eq!(clusters[1].slot_base, SMALL.max_endpoints + 3);
    assert_eq!(clusters[1].lb_policy, LB_RANDOM);
    let idx: Vec<u32> = services.values().copied().collect();
    assert_eq!(idx, [SMALL.max_clusters, SMALL.max_clusters + 1]);
}

#[test]
fn an_image_too_big_is_trimmed_and_reported() {
    let caps = Capacity {
        max_services: 2,
        max_clusters: 2,
        max_endpoints: 4,
        max_maglev: 1,
    };
    let img = image(&vec![
        (1, 1, w1(&[1, 2]), 0),
        (2, 2, w1(&[1, 2]), 0),
        (3, 3, w1(&[1]), 0),
    ]);
    let mut m = MemMaps {
        caps: Some(caps),
        ..Default::default()
    };
    let mut r = Reconciler::new(caps);
    let rep = r.apply(&mut m, &img).unwrap();
    let msg = rep.overflow.unwrap();
    assert!(msg.contains("max_services"), "{msg}");
    assert_eq!(r.applied().services.len(), 2);
    // Swapping every service for new ones still fits: the leaving ones are deleted first.
    let other = image(&vec![(7, 1, w1(&[1]), 0), (8, 2, w1(&[1]), 0)]);
    let prev = r.applied().clone();
    apply_checked(&mut r, &mut m, &prev, &other);
    assert_eq!(m.services.len(), 2);
}

#[test]
fn a_grace_period_separates_each_flip_from_the_next_generation_write() {
    let a = image(&vec![(1, 1, w1(&[1, 2]), 0)]);
    let b = image(&vec![(1, 1, w1(&[3]), 0)]);
    let mut m = MemMaps {
        caps: Some(SMALL),
        ..Default::default()
    };
    let mut r = Reconciler::new(SMALL);
    // The first update writes a generation no connect has read: no wait.
    apply_checked(&mut r, &mut m, &MapImage::default(), &a);
    assert_eq!(m.quiesces, 0);
    apply_checked(&mut r, &mut m, &a, &b);
    apply_checked(&mut r, &mut m, &b, &a);
    assert_eq!(m.quiesces, 2, "one grace period per update after a flip");
    // Nothing changed: no write, no wait.
    apply_checked(&mut r, &mut m, &a, &a);
    assert_eq!(m.quiesces, 2);
}

#[test]
fn scopes_hold_the_same_vip_apart_and_removing_one_removes_its_entries() {
    let pod_a = image(&vec![(1, 1, w1(&[1]), 0)]);
    let pod_b = image(&vec![(1, 1, w1(&[2, 3]), 0)]);
    let mut m = MemMaps {
        caps: Some(SMALL),
        ..Default::default()
    };
    let mut r = Reconciler::new(SMALL);
    let both = ScopedImages::from([(1, pod_a.clone()), (2, pod_b.clone())]);
    r.apply_scopes(&mut m, &both).unwrap();
    let seen = |m: &MemMaps, scope, vip| {
        choices_in(
            &m.services,
            &|i| m.clusters.get(&i).copied(),
            &|i| m.endpoints.get(&i).copied(),
            &|i| m.maglev.get(&i).copied(),
            m.active,
            scope,
            vip,
        )
    };
    let vip_a = *pod_a.services.keys().next().unwrap();
    assert_eq!(vip_a, *pod_b.services.keys().next().unwrap());
    assert_eq!(seen(&m, 1, vip_a), expected(&pod_a, vip_a));
    assert_eq!(seen(&m, 2, vip_a), expected(&pod_b, vip_a));
    // The node's own scope holds nothing: its connects go to the proxy.
    assert_eq!(seen(&m, NODE_SCOPE, vip_a), None);
    // Scope 1 goes (its last pod was removed): its keys go, scope 2 is untouched.
    r.apply_scopes(&mut m, &ScopedImages::from([(2, pod_b.clone())]))
        .unwrap();
    assert_eq!(seen(&m, 1, vip_a), None);
    assert_eq!(seen(&m, 2, vip_a), expected(&pod_b, vip_a));
    assert!(m.services.keys().all(|k| k.scope() == 2));
    assert_eq!(r.applied_scopes().keys().copied().collect::<Vec<_>>(), [2]);
}

#[test]
fn scopes_share_the_capacity_in_scope_order() {
    let caps = Capacity {
        max_services: 2,
        max_clusters: 4,
        max_endpoints: 8,
        max_maglev: 1,
    };
    let two = image(&vec![(1, 1, w1(&[1]), 0), (2, 2, w1(&[2]), 0)]);
    let mut m = MemMaps {
        caps: Some(caps),
        ..Default::default()
    };
    let mut r = Reconciler::new(caps);
    let rep = r
        .apply_scopes(&mut m, &ScopedImages::from([(0, two.clone()), (5, two)]))
        .unwrap();
    assert!(!rep.overflow_by_scope.contains_key(&0), "{rep:?}");
    let msg = &rep.overflow_by_scope[&5];
    assert!(msg.contains("max_services"), "{msg}");
    assert!(rep.overflow.unwrap().starts_with("scope 5: "));
    assert!(m.services.keys().all(|k| k.scope() == 0));
}
