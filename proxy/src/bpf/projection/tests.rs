//! Projection tests: eligibility rules, and properties (the kernel's choice set is the
//! userspace balancer's eligible set, arrival order does not matter).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::model::endpoint::Locality;
use crate::model::listener::HttpManager;
use crate::model::test_util::{assignment, static_cluster, tcp_chain, virtual_listener};
use crate::model::{
    Cidr, Cluster, ClusterKind, HealthStatus, LbEndpoint, LbPolicy, Listener, LoadAssignment,
    LocalityEndpoints,
};

fn snap(listeners: Vec<Listener>, clusters: Vec<Cluster>) -> Snapshot {
    Snapshot::new(listeners, clusters, &BTreeMap::new())
}

const EPS: [&str; 3] = ["127.0.0.11:8080", "127.0.0.12:8080", "127.0.0.13:8080"];

fn reason(img: &MapImage, dst: &str) -> String {
    img.verdicts[&dst.parse::<SocketAddr>().unwrap()].to_string()
}

#[test]
fn plain_tcp_proxy_service_is_projected() {
    let s = snap(
        vec![virtual_listener(vec![tcp_chain(
            "svc",
            "10.96.0.10",
            80,
            "svc",
        )])],
        vec![static_cluster("svc", LbPolicy::RoundRobin, &EPS)],
    );
    let img = project(&s, 15001);
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    assert_eq!(img.services[&vip].cluster, "svc");
    assert_eq!(img.services[&vip].listener, "virtualOutbound");
    assert_eq!(img.clusters["svc"].lb, FastLb::RoundRobin);
    assert_eq!(img.clusters["svc"].endpoints.len(), 3);
    assert_eq!(img.cluster_id("svc"), Some(0));
    assert!(reason(&img, "10.96.0.10:80").starts_with("kernel: plain tcp_proxy"));
}

#[test]
fn ipv6_services_are_projected_with_ipv6_endpoints_only() {
    let mut v6 = tcp_chain("v6", "fd00:96::10", 80, "six");
    v6.matcher.prefix_ranges[0].len = 128;
    let mut mixed = tcp_chain("mixed", "fd00:96::11", 80, "svc");
    mixed.matcher.prefix_ranges[0].len = 128;
    let s = snap(
        vec![virtual_listener(vec![v6, mixed])],
        vec![
            static_cluster(
                "six",
                LbPolicy::RoundRobin,
                &["[fd00::21]:8080", "[fd00::22]:8080"],
            ),
            static_cluster("svc", LbPolicy::RoundRobin, &EPS),
        ],
    );
    let img = project(&s, 15001);
    let vip: SocketAddr = "[fd00:96::10]:80".parse().unwrap();
    assert_eq!(img.services[&vip].cluster, "six");
    assert_eq!(img.clusters["six"].endpoints.len(), 2);
    // An IPv6 service whose endpoints are IPv4 stays in the proxy (connect6 cannot send an
    // AF_INET6 socket to an IPv4 address).
    assert!(reason(&img, "[fd00:96::11]:80").contains("address family"));
}

#[test]
fn per_vip_listener_wins_and_is_projected() {
    let mut per_vip = virtual_listener(vec![]);
    per_vip.name = "10.96.0.11_80".into();
    per_vip.address = "10.96.0.11:80".parse().unwrap();
    per_vip.use_original_dst = false;
    per_vip.bind_to_port = false;
    per_vip.default_filter_chain = Some(tcp_chain("d", "0.0.0.0", 0, "svc"));
    per_vip.default_filter_chain.as_mut().unwrap().matcher = Default::default();
    let s = snap(
        vec![virtual_listener(vec![]), per_vip],
        vec![static_cluster("svc", LbPolicy::Random, &EPS)],
    );
    let img = project(&s, 15001);
    let vip: SocketAddr = "10.96.0.11:80".parse().unwrap();
    assert_eq!(img.services[&vip].listener, "10.96.0.11_80");
    assert_eq!(img.clusters["svc"].lb, FastLb::Random);
}

#[test]
fn l7_tls_filters_and_other_clusters_stay_in_the_proxy() {
    let mut http = tcp_chain("http", "10.96.0.1", 80, "svc");
    http.action = NetworkAction::Http(std::sync::Arc::new(HttpManager {
        stat_prefix: "h".into(),
        rds_route_config_name: Some("80".into()),
        ..Default::default()
    }));
    let mut tls = tcp_chain("tls", "10.96.0.2", 443, "svc");
    tls.tls = Some(crate::model::test_util::downstream_tls());
    let mut filtered = tcp_chain("rbac", "10.96.0.3", 80, "svc");
    filtered.filters = vec!["envoy.filters.network.rbac".into()];
    let odst = tcp_chain("odst", "10.96.0.4", 80, "passthrough");
    let lr = tcp_chain("lr", "10.96.0.5", 80, "lr");
    let mut sni = tcp_chain("sni", "10.96.0.6", 443, "svc");
    sni.matcher.server_names = vec!["a.example".into()];
    // Istio's auto-mTLS: dialled with TLS, so only the proxy can carry it.
    let mtls_chain = tcp_chain("mtls", "10.96.0.7", 80, "mtls");
    let mut mtls = static_cluster("mtls", LbPolicy::RoundRobin, &EPS);
    mtls.transport.default = Some(crate::model::test_util::upstream_tls());
    let s = snap(
        vec![virtual_listener(vec![
            http, tls, filtered, odst, lr, sni, mtls_chain,
        ])],
        vec![
            mtls,
            static_cluster("svc", LbPolicy::RoundRobin, &EPS),
            static_cluster("lr", LbPolicy::RingHash, &EPS),
            Cluster {
                istio_service: None,
                name: "passthrough".into(),
                kind: ClusterKind::OriginalDst,
                lb_policy: LbPolicy::ClusterProvided,
                connect_timeout: Duration::from_secs(1),
                transport: Default::default(),
                lb: Default::default(),
                upstream_http: Default::default(),
            },
        ],
    );
    let img = project(&s, 15001);
    assert!(img.services.is_empty(), "{:?}", img.services);
    assert!(img.clusters.is_empty());
    assert!(reason(&img, "10.96.0.1:80").contains("HTTP connection manager"));
    assert!(reason(&img, "10.96.0.2:443").contains("TLS"));
    assert!(reason(&img, "10.96.0.3:80").contains("rbac"));
    assert!(reason(&img, "10.96.0.4:80").contains("ORIGINAL_DST"));
    assert!(reason(&img, "10.96.0.5:80").contains("RING_HASH"));
    assert!(reason(&img, "10.96.0.7:80").contains("dials TLS"));
    assert!(reason(&img, "10.96.0.6:443").contains("SNI"));
}

#[test]
fn unhealthy_endpoints_are_left_out_and_an_empty_cluster_is_not_projected() {
    let eds = Cluster {
        istio_service: None,
        name: "eds".into(),
        kind: ClusterKind::Eds {
            service_name: "eds".into(),
        },
        lb_policy: LbPolicy::RoundRobin,
        connect_timeout: Duration::from_secs(1),
        transport: Default::default(),
        lb: Default::default(),
        upstream_http: Default::default(),
    };
    let mut assignments = BTreeMap::new();
    assignments.insert(
        "eds".to_string(),
        Arc::new(assignment(
            "eds",
            &[
                ("127.0.0.11:80", HealthStatus::Healthy),
                ("127.0.0.12:80", HealthStatus::Unhealthy),
                ("127.0.0.13:80", HealthStatus::Unknown),
                ("127.0.0.14:80", HealthStatus::Draining),
            ],
        )),
    );
    let s = Snapshot::new(
        vec![virtual_listener(vec![tcp_chain(
            "e",
            "10.96.0.20",
            80,
            "eds",
        )])],
        vec![eds.clone()],
        &assignments,
    );
    let img = project(&s, 15001);
    let eps: Vec<String> = img.clusters["eds"]
        .endpoints
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert_eq!(eps, ["127.0.0.11:80", "127.0.0.13:80"]);

    let none = Snapshot::new(
        vec![virtual_listener(vec![tcp_chain(
            "e",
            "10.96.0.20",
            80,
            "eds",
        )])],
        vec![eds],
        &BTreeMap::new(),
    );
    let img = project(&none, 15001);
    assert!(img.services.is_empty());
    assert!(reason(&img, "10.96.0.20:80").contains("no healthy endpoint"));
}

#[test]
fn fit_keeps_whole_services_and_names_the_limit() {
    let chains = (1..=4)
        .map(|i| {
            tcp_chain(
                &format!("s{i}"),
                &format!("10.96.0.{i}"),
                80,
                &format!("c{i}"),
            )
        })
        .collect();
    let clusters = (1..=4)
        .map(|i| static_cluster(&format!("c{i}"), LbPolicy::RoundRobin, &EPS))
        .collect();
    let img = project(&snap(vec![virtual_listener(chains)], clusters), 15001);
    assert_eq!(img.services.len(), 4);
    let (fit, msg) = img.fit(10, 10, 7, 10);
    assert_eq!(fit.services.len(), 2);
    assert_eq!(fit.endpoint_slots(), 6);
    let msg = msg.unwrap();
    assert!(msg.contains("max_endpoints"), "{msg}");
    assert!(
        fit.verdicts[&"10.96.0.4:80".parse::<SocketAddr>().unwrap()]
            .reason
            .contains("capacity")
    );
    let (same, none) = img.fit(10, 10, 100, 10);
    assert_eq!(same, img);
    assert!(none.is_none());
    let (two, msg) = img.fit(2, 10, 100, 10);
    assert_eq!(two.services.len(), 2);
    assert!(msg.unwrap().contains("max_services"));
}

fn health() -> impl Strategy<Value = HealthStatus> {
    prop_oneof![
        Just(HealthStatus::Healthy),
        Just(HealthStatus::Unknown),
        Just(HealthStatus::Unhealthy),
        Just(HealthStatus::Draining),
        Just(HealthStatus::Degraded),
    ]
}

/// One endpoint of a generated assignment: host byte, health, priority, weight.
type Ep = (u8, HealthStatus, u32, u32);

fn prioritized(name: &str, eps: &[Ep]) -> LoadAssignment {
    let mut by_priority: BTreeMap<u32, Vec<LbEndpoint>> = BTreeMap::new();
    for (host, h, p, w) in eps {
        by_priority.entry(*p).or_default().push(LbEndpoint {
            address: format!("127.0.1.{host}:8080").parse().unwrap(),
            internal: None,
            health: *h,
            weight: *w,
            transport_socket_match: Default::default(),
            istio_workload: None,
        });
    }
    LoadAssignment {
        cluster_name: name.into(),
        localities: by_priority
            .into_iter()
            .map(|(priority, endpoints)| LocalityEndpoints {
                locality: Locality::default(),
                priority,
                weight: None,
                endpoints,
            })
            .collect(),
        overprovisioning_factor: 140,
    }
}

/// The fast-path maps in memory, written by the real reconciler.
#[derive(Default)]
struct Maps {
    services: BTreeMap<ServiceKey, ServiceValue>,
    clusters: BTreeMap<u32, skiff_common::ClusterValue>,
    endpoints: BTreeMap<u32, skiff_common::EndpointValue>,
    maglev: BTreeMap<u32, u32>,
    active: u8,
}

impl crate::bpf::reconciler::FastMaps for Maps {
    fn set_service(&mut self, k: ServiceKey, v: ServiceValue) -> Result<(), crate::bpf::BpfError> {
        self.services.insert(k, v);
        Ok(())
    }
    fn delete_service(&mut self, k: ServiceKey) -> Result<(), crate::bpf::BpfError> {
        self.services.remove(&k);
        Ok(())
    }
    fn set_cluster(
        &mut self,
        i: u32,
        v: skiff_common::ClusterValue,
    ) -> Result<(), crate::bpf::BpfError> {
        self.clusters.insert(i, v);
        Ok(())
    }
    fn set_endpoint(
        &mut self,
        i: u32,
        v: skiff_common::EndpointValue,
    ) -> Result<(), crate::bpf::BpfError> {
        self.endpoints.insert(i, v);
        Ok(())
    }
    fn set_maglev(&mut self, i: u32, v: u32) -> Result<(), crate::bpf::BpfError> {
        self.maglev.insert(i, v);
        Ok(())
    }
    fn flip(&mut self, g: u8) -> Result<(), crate::bpf::BpfError> {
        self.active = g;
        Ok(())
    }
}

use crate::bpf::reconciler::ServiceKey;
use skiff_common::ServiceValue;

proptest! {
    /// For random assignments (priorities, health incl. degraded, weights, any arrival order):
    /// the endpoints the kernel can choose, read back from the map image exactly as the kernel
    /// walks it, are the userspace balancer's eligible set (`lb::plan::eligible`), and round
    /// robin's hits follow the eligible shares.
    #[test]
    fn kernel_choice_set_is_the_userspace_eligible_set(
        eps in proptest::collection::btree_map(1u8..250, (health(), 0u32..3, 1u32..4), 1..16),
        random in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let list: Vec<Ep> = eps.iter().map(|(i, (h, p, w))| (*i, *h, *p, *w)).collect();
        let mut shuffled = list.clone();
        // A deterministic shuffle from the seed.
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let lb = if random { LbPolicy::Random } else { LbPolicy::RoundRobin };
        let build = |l: &[Ep]| {
            let c = Cluster {
                istio_service: None,
                name: "c".into(),
                kind: ClusterKind::Static(prioritized("c", l)),
                lb_policy: lb,
                connect_timeout: Duration::from_secs(1),
                transport: Default::default(),
                lb: Default::default(),
                upstream_http: Default::default(),
            };
            snap(vec![virtual_listener(vec![tcp_chain("s", "10.96.0.10", 80, "c")])], vec![c])
        };
        let s = build(&list);
        let a = project(&s, 15001);
        prop_assert_eq!(&a, &project(&build(&shuffled), 15001));

        // What userspace would balance over.
        let entry = s.cluster("c").unwrap();
        let (views, _) = entry.lb.views();
        let eligible: BTreeMap<SocketAddr, f64> = crate::lb::plan::eligible(&entry.lb.plan(), &views)
            .into_iter()
            .filter(|e| e.share > 0.0)
            .map(|e| (entry.lb.hosts[e.index as usize].address(), e.share))
            .collect();

        // What the kernel would choose from.
        let caps = crate::bpf::Capacity { max_services: 8, max_clusters: 8, max_endpoints: 256, max_maglev: 1 };
        let mut maps = Maps::default();
        let mut r = crate::bpf::reconciler::Reconciler::new(caps);
        r.apply(&mut maps, &a).unwrap();
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let seen = crate::bpf::reconciler::choices(
            &maps.services,
            &|i| maps.clusters.get(&i).copied(),
            &|i| maps.endpoints.get(&i).copied(),
            &|i| maps.maglev.get(&i).copied(),
            maps.active,
            vip,
        );
        match seen {
            None => prop_assert!(
                eligible.values().sum::<f64>() < 0.999,
                "kernel sends to the proxy, userspace has {:?}",
                eligible
            ),
            Some((_, hits)) => {
                let kernel: Vec<&SocketAddr> = hits.keys().collect();
                let user: Vec<&SocketAddr> = eligible.keys().collect();
                prop_assert_eq!(kernel, user);
                if !random {
                    let total: u64 = hits.values().sum();
                    for (ep, n) in &hits {
                        let got = *n as f64 / total as f64;
                        // Round robin over one cycle hits each endpoint in proportion to its
                        // weight: host weights on one level, eligible shares otherwise; both
                        // are the userspace shares (to the 1e-4 share resolution).
                        prop_assert!(
                            (got - eligible[ep]).abs() < 1e-3,
                            "{} got {} want {}",
                            ep,
                            got,
                            eligible[ep]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn indexed_chain_lookup_agrees_with_a_scan_of_every_chain() {
    // /32 chains, a duplicate /32 (ambiguous), a /24 and a /32 + /16 chain sharing VIPs with
    // them, and a chain without prefix ranges: `project` (indexed) and `classify` (full scan)
    // must give the same verdict for every candidate.
    let mut wide = tcp_chain("wide", "10.96.1.0", 80, "b");
    wide.matcher.prefix_ranges[0].len = 24;
    let mut mixed = tcp_chain("mixed", "10.96.2.1", 80, "b");
    mixed.matcher.prefix_ranges.push(Cidr {
        addr: "10.96.0.0".parse().unwrap(),
        len: 16,
    });
    let mut any_ip = tcp_chain("any-ip", "0.0.0.0", 9090, "b");
    any_ip.matcher.prefix_ranges.clear();
    let chains = vec![
        tcp_chain("a1", "10.96.1.1", 80, "a"),
        tcp_chain("a2", "10.96.1.2", 80, "a"),
        tcp_chain("dup1", "10.96.1.3", 80, "a"),
        tcp_chain("dup2", "10.96.1.3", 80, "b"),
        wide,
        mixed,
        any_ip,
        tcp_chain("a3", "10.96.2.1", 81, "a"),
        tcp_chain("a4", "10.96.3.1", 9090, "a"),
    ];
    let s = snap(
        vec![virtual_listener(chains)],
        vec![
            static_cluster("a", LbPolicy::RoundRobin, &EPS),
            static_cluster("b", LbPolicy::Random, &EPS),
        ],
    );
    let img = project(&s, 15001);
    assert!(img.verdicts.len() >= 6, "{:?}", img.verdicts);
    for (dst, v) in &img.verdicts {
        let (scan, _) = classify(&s, 15001, *dst);
        assert_eq!(v.to_string(), scan.to_string(), "{dst}");
        assert_eq!(v.filter_chain, scan.filter_chain, "{dst}");
    }
    assert!(reason(&img, "10.96.1.3:80").contains("2 filter chains"));
    assert_eq!(
        img.services[&"10.96.1.1:80".parse().unwrap()].filter_chain,
        "a1"
    );
    assert_eq!(
        img.services[&"10.96.2.1:80".parse().unwrap()].filter_chain,
        "mixed"
    );
    assert_eq!(
        img.services[&"10.96.3.1:9090".parse().unwrap()].filter_chain,
        "a4"
    );
}

fn udp_listener(name: &str, addr: &str, cluster: Option<&str>) -> Listener {
    Listener {
        name: name.into(),
        address: addr.parse().unwrap(),
        internal: None,
        use_original_dst: false,
        bind_to_port: true,
        filter_chains: vec![],
        default_filter_chain: None,
        listener_filters: vec![crate::model::listener::UDP_PROXY_NAME.into()],
        listener_filters_timeout: None,
        continue_on_listener_filters_timeout: false,
        udp: Some(UdpProxy {
            stat_prefix: name.into(),
            cluster: cluster.map(Into::into),
            extras: vec![],
        }),
        unsupported: vec![],
        access_log: vec![],
    }
}

fn udp_reason(img: &MapImage, dst: &str) -> String {
    img.udp_verdicts[&dst.parse::<SocketAddr>().unwrap()].to_string()
}

#[test]
fn udp_proxy_listener_on_a_vip_becomes_a_udp_service() {
    let s = snap(
        vec![
            virtual_listener(vec![tcp_chain("svc", "10.96.0.10", 80, "svc")]),
            udp_listener("dns", "10.96.0.10:53", Some("dns")),
        ],
        vec![
            static_cluster("svc", LbPolicy::RoundRobin, &EPS),
            static_cluster(
                "dns",
                LbPolicy::Random,
                &["127.0.0.31:5353", "127.0.0.32:5353"],
            ),
        ],
    );
    let img = project(&s, 15001);
    let vip: SocketAddr = "10.96.0.10:53".parse().unwrap();
    assert_eq!(img.udp_services[&vip].cluster, "dns");
    assert_eq!(img.udp_services[&vip].listener, "dns");
    // It is not a TCP service, and the TCP service on the same VIP is unaffected.
    assert!(!img.services.contains_key(&vip));
    assert!(!img.verdicts.contains_key(&vip));
    assert!(img.services.contains_key(&"10.96.0.10:80".parse().unwrap()));
    assert_eq!(img.clusters["dns"].lb, FastLb::Random);
    assert_eq!(img.clusters["dns"].endpoints.len(), 2);
    assert!(
        udp_reason(&img, "10.96.0.10:53").starts_with("kernel: udp_proxy to STATIC cluster dns"),
        "{}",
        udp_reason(&img, "10.96.0.10:53")
    );
    // The reconciler writes it under proto UDP, the TCP one under proto TCP.
    use crate::bpf::reconciler::{Capacity, ServiceKey, layout};
    let keys = layout(&img, 0, Capacity::default()).services;
    let udp_key = ServiceKey::udp(vip).unwrap();
    let tcp_key = ServiceKey::tcp("10.96.0.10:80".parse().unwrap());
    assert!(keys.contains_key(&udp_key), "{:?}", keys.keys());
    assert!(keys.contains_key(&tcp_key), "{:?}", keys.keys());
    assert!(!keys.contains_key(&ServiceKey::tcp(vip)));
    assert_eq!(keys.len(), 2);
}

#[test]
fn ineligible_udp_listeners_stay_out_with_a_reason() {
    let mut hashed = udp_listener("hashed", "10.96.0.13:53", Some("dns"));
    if let Some(u) = hashed.udp.as_mut() {
        u.extras.push("hash_policies");
    }
    let s = snap(
        vec![
            udp_listener("matcher", "10.96.0.11:53", None),
            udp_listener("v6", "[fd00:96::10]:53", Some("dns")),
            udp_listener("wild", "0.0.0.0:53", Some("dns")),
            udp_listener("unknown", "10.96.0.12:53", Some("nope")),
            hashed,
            udp_listener("ring", "10.96.0.14:53", Some("ring")),
        ],
        vec![
            static_cluster("dns", LbPolicy::RoundRobin, &EPS),
            static_cluster("ring", LbPolicy::RingHash, &EPS),
        ],
    );
    let img = project(&s, 15001);
    assert!(img.udp_services.is_empty(), "{:?}", img.udp_services);
    assert!(udp_reason(&img, "10.96.0.11:53").contains("matcher routes per datagram"));
    assert!(udp_reason(&img, "[fd00:96::10]:53").contains("IPv6"));
    assert!(udp_reason(&img, "10.96.0.12:53").contains("unknown cluster nope"));
    assert!(udp_reason(&img, "10.96.0.13:53").contains("hash_policies"));
    assert!(udp_reason(&img, "10.96.0.14:53").contains("not implemented in the kernel"));
    // A wildcard UDP listener names no VIP: not a candidate at all.
    assert!(
        !img.udp_verdicts
            .contains_key(&"0.0.0.0:53".parse().unwrap())
    );
    // UDP listeners never become TCP candidates either.
    assert!(img.verdicts.is_empty(), "{:?}", img.verdicts);
}

#[test]
fn udp_services_count_against_max_services() {
    let s = snap(
        vec![
            virtual_listener(vec![tcp_chain("svc", "10.96.0.10", 80, "svc")]),
            udp_listener("dns", "10.96.0.10:53", Some("svc")),
        ],
        vec![static_cluster("svc", LbPolicy::RoundRobin, &EPS)],
    );
    let img = project(&s, 15001);
    let (fit, msg) = img.fit(1, 10, 100, 1);
    assert_eq!(fit.services.len(), 1);
    assert!(fit.udp_services.is_empty());
    assert!(msg.expect("over max_services").contains("max_services"));
    assert!(udp_reason(&fit, "10.96.0.10:53").contains("max_services"));
    let (fit, msg) = img.fit(2, 10, 100, 1);
    assert!(msg.is_none());
    assert_eq!(fit.udp_services.len(), 1);
}

#[test]
fn maglev_without_a_source_ip_hash_policy_is_random_by_weight_as_in_the_proxy() {
    let hashed = {
        let mut c = tcp_chain("hashed", "10.96.0.20", 80, "mg");
        if let NetworkAction::TcpProxy(t) = &mut c.action {
            t.hash_policy = Some(crate::model::listener::TcpHashPolicy::SourceIp);
        }
        c
    };
    let plain = tcp_chain("plain", "10.96.0.21", 80, "mg2");
    let mixed = tcp_chain("mixed", "10.96.0.22", 80, "mg");
    let mut mg2 = static_cluster("mg2", LbPolicy::Maglev, &EPS);
    if let ClusterKind::Static(la) = &mut mg2.kind {
        la.localities[0].endpoints[0].weight = 3;
    }
    let s = snap(
        vec![virtual_listener(vec![hashed, plain, mixed])],
        vec![static_cluster("mg", LbPolicy::Maglev, &EPS), mg2],
    );
    // The proxy's own decision, which the projection must follow.
    for (vip, hashes) in [("10.96.0.20", true), ("10.96.0.21", false)] {
        let chain = s
            .virtual_listener(15001)
            .unwrap()
            .filter_chains
            .iter()
            .find(|c| c.matcher.prefix_ranges[0].addr == vip.parse::<IpAddr>().unwrap())
            .unwrap();
        let NetworkAction::TcpProxy(t) = &chain.action else {
            unreachable!()
        };
        assert_eq!(route::tcp_hashes(t, LbPolicy::Maglev), hashes);
    }
    let img = project(&s, 15001);
    assert_eq!(img.clusters["mg"].lb, FastLb::Maglev);
    let random = &img.clusters["mg2"];
    assert_eq!(random.lb, FastLb::Random);
    assert!(
        random.shares,
        "RANDOM draws by weight, as the Maglev table does"
    );
    assert_eq!(random.weights, vec![3, 1, 1]);
    assert!(reason(&img, "10.96.0.21:80").contains("without a source_ip hash_policy"));
    // One kernel image per cluster: the unhashed service of a hashed cluster stays out.
    let mixed: SocketAddr = "10.96.0.22:80".parse().unwrap();
    assert!(!img.services.contains_key(&mixed));
    assert!(reason(&img, "10.96.0.22:80").starts_with("proxy: cluster mg is already"));
}
