//! Reconciler tests on an in-memory model of the maps: applying diff(a, b) to a gives b, and
//! no write in between lets a connect see a service half-way between a and b.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;

use proptest::prelude::*;

use super::*;
use crate::bpf::projection::{ClusterImage, ServiceImage};

/// What a connect would get for one service: the policy and endpoints, or `None` (proxy).
type Seen = Option<(u8, Vec<SocketAddrV4>)>;

#[derive(Default)]
struct MemMaps {
    services: BTreeMap<ServiceKeyV4, ServiceValue>,
    clusters: BTreeMap<u32, ClusterValue>,
    endpoints: BTreeMap<u32, EndpointValue>,
    active: u8,
    enabled: bool,
    caps: Option<Capacity>,
    /// For each checked service: the allowed views (before, after).
    allowed: BTreeMap<SocketAddrV4, (Seen, Seen)>,
    writes: usize,
}

impl MemMaps {
    fn seen(&self, vip: SocketAddrV4) -> Seen {
        if !self.enabled {
            return None;
        }
        resolve(
            &self.services,
            &|i| self.clusters.get(&i).copied(),
            &|i| self.endpoints.get(&i).copied(),
            self.active,
            vip,
        )
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
    fn set_service(&mut self, key: ServiceKeyV4, value: ServiceValue) -> Result<(), BpfError> {
        self.services.insert(key, value);
        self.check();
        Ok(())
    }
    fn delete_service(&mut self, key: ServiceKeyV4) -> Result<(), BpfError> {
        self.services.remove(&key);
        self.check();
        Ok(())
    }
    fn set_cluster(&mut self, index: u32, value: ClusterValue) -> Result<(), BpfError> {
        assert!(index < 2 * self.caps.unwrap().max_clusters);
        self.clusters.insert(index, value);
        self.check();
        Ok(())
    }
    fn set_endpoint(&mut self, index: u32, value: EndpointValue) -> Result<(), BpfError> {
        assert!(index < 2 * self.caps.unwrap().max_endpoints);
        self.endpoints.insert(index, value);
        self.check();
        Ok(())
    }
    fn flip(&mut self, generation: u8) -> Result<(), BpfError> {
        self.active = generation;
        self.enabled = true;
        self.check();
        Ok(())
    }
}

fn expected(img: &MapImage, vip: SocketAddrV4) -> Seen {
    let s = img.services.get(&vip)?;
    let c = &img.clusters[&s.cluster];
    let lb = match c.lb {
        FastLb::RoundRobin => LB_ROUND_ROBIN,
        FastLb::Random => LB_RANDOM,
    };
    Some((lb, c.endpoints.clone()))
}

fn image(spec: &[(u8, u8, Vec<u8>, bool)]) -> MapImage {
    let mut img = MapImage::default();
    for (vip, cluster, eps, random) in spec {
        let name = format!("c{cluster}");
        let vip: SocketAddrV4 = format!("10.96.0.{vip}:80").parse().unwrap();
        let mut endpoints: Vec<SocketAddrV4> = eps
            .iter()
            .map(|e| format!("127.0.{cluster}.{e}:8080").parse().unwrap())
            .collect();
        endpoints.sort();
        endpoints.dedup();
        if endpoints.is_empty() {
            continue;
        }
        // One definition per cluster name: the first wins.
        img.clusters.entry(name.clone()).or_insert(ClusterImage {
            lb: if *random {
                FastLb::Random
            } else {
                FastLb::RoundRobin
            },
            endpoints,
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

fn apply_checked(
    r: &mut Reconciler,
    m: &mut MemMaps,
    from: &MapImage,
    to: &MapImage,
) -> ApplyReport {
    let vips: BTreeSet<SocketAddrV4> = from
        .services
        .keys()
        .chain(to.services.keys())
        .copied()
        .collect();
    m.allowed = vips
        .into_iter()
        .map(|v| (v, (m.seen(v), expected(to, v))))
        .collect();
    let report = r.apply(m, to).unwrap();
    for (vip, (_, after)) in &m.allowed {
        assert_eq!(&m.seen(*vip), after, "{vip} after the update");
    }
    report
}

fn spec() -> impl Strategy<Value = Vec<(u8, u8, Vec<u8>, bool)>> {
    proptest::collection::vec(
        (
            1u8..12,
            1u8..6,
            proptest::collection::vec(1u8..9, 0..5),
            any::<bool>(),
        ),
        0..10,
    )
}

const SMALL: Capacity = Capacity {
    max_services: 64,
    max_clusters: 16,
    max_endpoints: 64,
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
        prop_assert_eq!(r.applied(), &c.fit(64, 16, 64).0);
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
    let img = image(&[(1, 1, vec![1, 2, 3], false), (2, 2, vec![4, 5], true)]);
    let (clusters, endpoints, services) = layout(&img, 1, SMALL);
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
    };
    let img = image(&[
        (1, 1, vec![1, 2], false),
        (2, 2, vec![1, 2], false),
        (3, 3, vec![1], false),
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
    let other = image(&[(7, 1, vec![1], false), (8, 2, vec![1], false)]);
    let prev = r.applied().clone();
    apply_checked(&mut r, &mut m, &prev, &other);
    assert_eq!(m.services.len(), 2);
}
