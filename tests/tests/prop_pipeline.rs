//! Structured fuzzing of what a hostile (or buggy) control plane can send, from the resource
//! to the kernel's choice: valid-shaped Envoy protos with random but plausible fields
//! (addresses, ports, weights, priorities including huge ones, health, localities, policies,
//! listeners with tcp_proxy and HCM chains, routes) go through xDS acceptance
//! (`Resources::apply_sotw`: decode, proto rules, `TryFrom` into the model, cross-resource
//! checks), the snapshot and its store, every cluster's balancer plan and picks, the BPF
//! projection, the reconciler writing an in-memory copy of the maps, and the walk the kernel
//! does over them. Property: nothing panics or aborts, and every refusal is a typed rejection
//! naming a resource. A second fuzz routes generated connections (`dataplane::route`) and
//! requests (`http::route`) on the generated snapshots: no panic, and every listener, cluster,
//! host, virtual host and route chosen is the snapshot's own.
//!
//! Cases: `SKIFF_FUZZ_CASES` (default 100000, about two minutes in debug on two cores):
//! `SKIFF_FUZZ_CASES=2000000 cargo test --release -p skiff-tests --test prop_pipeline`.
//! docs/compat/hostile.md describes it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use envoy_types::pb::envoy::config::cluster::v3 as cpb;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as epb;
use envoy_types::pb::envoy::config::listener::v3 as lpb;
use envoy_types::pb::envoy::config::route::v3 as rpb;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp;
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration, UInt32Value, UInt64Value};
use proptest::prelude::*;
use prost::Message;
use skiff::bpf::reconciler::{FastMaps, Reconciler, ServiceKey};
use skiff::bpf::{BpfError, Capacity};
use skiff::lb::LbRequest;
use skiff::state::Store;
use skiff::xds::Resources;
use skiff_common::{ClusterValue, EndpointValue, ServiceValue};
use skiff_proto::{CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL, LISTENER_TYPE_URL, ROUTE_TYPE_URL};

const CAPTURE_PORT: u16 = 15001;
const TCP_PROXY: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

fn cases() -> u32 {
    std::env::var("SKIFF_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn pack<M: Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.into(),
        value: m.encode_to_vec(),
    }
}

fn u32v(value: u32) -> UInt32Value {
    UInt32Value { value }
}

// === strategies: small values that matter, and the edges ===

/// Cluster names come from a small pool, so listeners and routes often name real clusters.
fn cluster_name() -> impl Strategy<Value = String> {
    prop_oneof![
        40 => (0u8..4).prop_map(|i| format!("c{i}")),
        1 => Just(String::new()),
        1 => "[a-z|.~]{1,12}",
    ]
}

fn edge_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => 0u32..4,
        1 => Just(100),
        1 => Just(127),
        1 => Just(128),
        1 => Just(129),
        1 => Just(65_535),
        1 => Just(65_536),
        1 => Just(u32::MAX - 1),
        1 => Just(u32::MAX),
        1 => any::<u32>(),
    ]
}

/// Mostly small valid weights, sometimes an edge (0 is invalid, u32::MAX overflows sums).
fn weight() -> impl Strategy<Value = u32> {
    prop_oneof![200 => 1u32..5, 1 => edge_u32()]
}

fn ip() -> impl Strategy<Value = String> {
    prop_oneof![
        300 => (0u8..2, 1u8..4).prop_map(|(a, b)| format!("10.96.{a}.{b}")),
        100 => (1u8..6).prop_map(|b| format!("127.0.0.{b}")),
        4 => Just("0.0.0.0".to_string()),
        8 => (0u16..4).prop_map(|a| format!("fd00::{a:x}")),
        1 => Just("::".to_string()),
        2 => Just("::ffff:10.96.0.1".to_string()),
        1 => Just("not-an-ip".to_string()),
        1 => Just(String::new()),
    ]
}

fn port() -> impl Strategy<Value = u32> {
    prop_oneof![
        400 => prop::sample::select(vec![80u32, 443, 8080]),
        1 => Just(0),
        2 => Just(u32::from(CAPTURE_PORT)),
        1 => Just(65_535),
        1 => Just(65_536),
        1 => Just(u32::MAX),
    ]
}

fn address() -> impl Strategy<Value = core::Address> {
    (ip(), port()).prop_map(|(address, p)| core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address,
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(p)),
            ..Default::default()
        })),
    })
}

fn locality() -> impl Strategy<Value = Option<core::Locality>> {
    prop::option::of((0u8..3, 0u8..3).prop_map(|(r, z)| core::Locality {
        region: format!("r{r}"),
        zone: format!("z{z}"),
        sub_zone: String::new(),
    }))
}

fn lb_endpoint() -> impl Strategy<Value = epb::LbEndpoint> {
    (
        address(),
        prop_oneof![400 => 0i32..6, 1 => Just(6), 1 => Just(-1)],
        prop::option::of(weight()),
    )
        .prop_map(|(a, health_status, w)| epb::LbEndpoint {
            host_identifier: Some(epb::lb_endpoint::HostIdentifier::Endpoint(epb::Endpoint {
                address: Some(a),
                ..Default::default()
            })),
            health_status,
            load_balancing_weight: w.map(u32v),
            ..Default::default()
        })
}

fn locality_group() -> impl Strategy<Value = epb::LocalityLbEndpoints> {
    (
        locality(),
        prop::collection::vec(lb_endpoint(), 0..5),
        prop::option::of(weight()),
        prop_oneof![100 => 0u32..3, 1 => edge_u32()],
    )
        .prop_map(
            |(locality, lb_endpoints, w, priority)| epb::LocalityLbEndpoints {
                locality,
                lb_endpoints,
                load_balancing_weight: w.map(u32v),
                priority,
                ..Default::default()
            },
        )
}

fn assignment(name: String) -> impl Strategy<Value = epb::ClusterLoadAssignment> {
    (
        prop::collection::vec(locality_group(), 0..4),
        prop::option::of(prop_oneof![10 => Just(140u32), 1 => edge_u32()]),
    )
        .prop_map(move |(endpoints, op)| epb::ClusterLoadAssignment {
            cluster_name: name.clone(),
            endpoints,
            policy: op.map(|f| epb::cluster_load_assignment::Policy {
                overprovisioning_factor: Some(u32v(f)),
                ..Default::default()
            }),
            ..Default::default()
        })
}

fn lb_config() -> impl Strategy<Value = Option<cpb::cluster::LbConfig>> {
    use cpb::cluster::LbConfig;
    let size = || prop_oneof![1 => Just(0u64), 2 => Just(1), 10 => Just(1024), 2 => Just(65_537), 1 => Just(8_388_609), 1 => Just(u64::MAX)];
    prop_oneof![
        9 => Just(None),
        1 => (size(), size()).prop_map(|(a, b)| Some(LbConfig::RingHashLbConfig(
            cpb::cluster::RingHashLbConfig {
                minimum_ring_size: Some(UInt64Value { value: a.min(4096) }),
                maximum_ring_size: Some(UInt64Value { value: b }),
                ..Default::default()
            }
        ))),
        1 => prop_oneof![40 => Just(251u64), 1 => Just(65_537), 2 => Just(65_536), 2 => Just(0), 1 => Just(5_000_011), 2 => Just(u64::MAX)]
            .prop_map(|t| Some(LbConfig::MaglevLbConfig(cpb::cluster::MaglevLbConfig {
                table_size: Some(UInt64Value { value: t }),
            }))),
        1 => prop::option::of(edge_u32()).prop_map(|c| Some(LbConfig::LeastRequestLbConfig(
            cpb::cluster::LeastRequestLbConfig {
                choice_count: c.map(u32v),
                ..Default::default()
            }
        ))),
    ]
}

fn common_lb_config() -> impl Strategy<Value = Option<cpb::cluster::CommonLbConfig>> {
    use cpb::cluster::common_lb_config::{
        LocalityConfigSpecifier as L, LocalityWeightedLbConfig, ZoneAwareLbConfig,
    };
    prop_oneof![3 => Just(None), 1 => prop::option::of(
        (
            prop::option::of(prop_oneof![5 => Just(0.0f64), 5 => Just(50.0), 5 => Just(100.0), 1 => Just(1e9), 1 => Just(-1.0), 1 => Just(f64::NAN)]),
            0u8..3,
        )
            .prop_map(|(panic, loc)| cpb::cluster::CommonLbConfig {
                healthy_panic_threshold: panic
                    .map(|value| envoy_types::pb::envoy::r#type::v3::Percent { value }),
                locality_config_specifier: match loc {
                    0 => None,
                    1 => Some(L::LocalityWeightedLbConfig(LocalityWeightedLbConfig {})),
                    _ => Some(L::ZoneAwareLbConfig(ZoneAwareLbConfig {
                        min_cluster_size: Some(UInt64Value { value: 1 }),
                        ..Default::default()
                    })),
                },
                ..Default::default()
            }),
    )]
}

fn cluster(name: String) -> impl Strategy<Value = cpb::Cluster> {
    (
        Just(name),
        prop_oneof![60 => Just(3i32), 40 => Just(0), 2 => Just(4), 2 => Just(1), 1 => Just(9)],
        prop_oneof![60 => Just(0i32), 20 => 1i32..4, 5 => Just(5), 2 => Just(6), 2 => Just(7), 1 => Just(42)],
        lb_config(),
        common_lb_config(),
        prop::option::of(assignment(String::new())),
        prop_oneof![100 => Just(1i64), 1 => Just(0), 1 => Just(-1), 1 => Just(i64::MAX)],
        prop::bool::weighted(0.95),
    )
        .prop_map(
            |(name, discovery, lb_policy, lb_config, common_lb_config, la, secs, small)| {
                // Maglev's default table (65537 entries) dominates a debug run; most Maglev
                // cases use a small prime table, some the default.
                let lb_config = match lb_config {
                    None if lb_policy == 5 && small => {
                        Some(cpb::cluster::LbConfig::MaglevLbConfig(
                            cpb::cluster::MaglevLbConfig {
                                table_size: Some(UInt64Value { value: 251 }),
                            },
                        ))
                    }
                    other => other,
                };
                let load_assignment = la.map(|mut la| {
                    la.cluster_name = name.clone();
                    la
                });
                cpb::Cluster {
                    name: name.clone(),
                    cluster_discovery_type: Some(cpb::cluster::ClusterDiscoveryType::Type(
                        discovery,
                    )),
                    eds_cluster_config: (discovery == 3).then(|| cpb::cluster::EdsClusterConfig {
                        service_name: name.clone(),
                        ..Default::default()
                    }),
                    connect_timeout: Some(Duration {
                        seconds: secs,
                        nanos: 0,
                    }),
                    lb_policy,
                    lb_config,
                    common_lb_config,
                    load_assignment,
                    ..Default::default()
                }
            },
        )
}

fn tcp_proxy() -> impl Strategy<Value = Any> {
    use tcp::tcp_proxy::{ClusterSpecifier as S, WeightedCluster};
    prop_oneof![
        3 => cluster_name().prop_map(S::Cluster),
        1 => prop::collection::vec((cluster_name(), weight()), 1..3).prop_map(|cs| {
            S::WeightedClusters(WeightedCluster {
                clusters: cs
                    .into_iter()
                    .map(|(name, weight)| tcp::tcp_proxy::weighted_cluster::ClusterWeight {
                        name,
                        weight,
                        ..Default::default()
                    })
                    .collect(),
            })
        }),
    ]
    .prop_flat_map(|s| (Just(s), prop::bool::weighted(0.3)))
    .prop_map(|(s, hashed)| {
        use envoy_types::pb::envoy::r#type::v3::{HashPolicy, hash_policy};
        let hash_policy = if hashed {
            vec![HashPolicy {
                policy_specifier: Some(hash_policy::PolicySpecifier::SourceIp(
                    hash_policy::SourceIp {},
                )),
            }]
        } else {
            vec![]
        };
        pack(
            TCP_PROXY,
            &tcp::TcpProxy {
                stat_prefix: "s".into(),
                cluster_specifier: Some(s),
                hash_policy,
                ..Default::default()
            },
        )
    })
}

fn route() -> impl Strategy<Value = rpb::Route> {
    use rpb::route_match::PathSpecifier as P;
    let path = prop_oneof![
        10 => "/[a-z]{0,4}".prop_map(P::Prefix),
        3 => "/[a-z]{0,4}".prop_map(P::Path),
        1 => prop_oneof![Just("/api/v[0-9]+/.*"), Just("a{20000}"), Just("(unclosed"), Just(".*")]
            .prop_map(|r| P::SafeRegex(envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher {
                regex: r.to_string(),
                ..Default::default()
            })),
    ];
    let action = prop_oneof![
        3 => cluster_name().prop_map(|c| rpb::route::Action::Route(rpb::RouteAction {
            cluster_specifier: Some(rpb::route_action::ClusterSpecifier::Cluster(c)),
            ..Default::default()
        })),
        1 => prop::collection::vec((cluster_name(), weight()), 0..3).prop_map(|cs| {
            rpb::route::Action::Route(rpb::RouteAction {
                cluster_specifier: Some(rpb::route_action::ClusterSpecifier::WeightedClusters(
                    rpb::WeightedCluster {
                        clusters: cs
                            .into_iter()
                            .map(|(name, w)| rpb::weighted_cluster::ClusterWeight {
                                name,
                                weight: Some(u32v(w)),
                                ..Default::default()
                            })
                            .collect(),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            })
        }),
        1 => prop_oneof![20 => 200u32..600, 1 => any::<u32>()].prop_map(|status| rpb::route::Action::DirectResponse(
            rpb::DirectResponseAction { status, ..Default::default() }
        )),
    ];
    (path, action, prop::collection::vec("[a-z:-]{1,6}", 0..2)).prop_map(|(p, action, headers)| {
        rpb::Route {
            r#match: Some(rpb::RouteMatch {
                path_specifier: Some(p),
                headers: headers
                    .into_iter()
                    .map(|name| rpb::HeaderMatcher {
                        name,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            action: Some(action),
            ..Default::default()
        }
    })
}

fn route_config(name: String) -> impl Strategy<Value = rpb::RouteConfiguration> {
    prop::collection::vec(
        (
            "[a-z]{1,3}",
            prop_oneof![
                20 => "[a-z]{1,6}".prop_map(|d| vec![format!("{d}.svc")]),
                2 => Just(vec!["*".to_string()]),
                1 => prop::collection::vec(prop_oneof![Just("*".to_string()), "[a-z.]{1,8}"], 0..3),
            ],
            prop::collection::vec(route(), 0..4),
        ),
        0..3,
    )
    .prop_map(move |vhs| rpb::RouteConfiguration {
        name: name.clone(),
        virtual_hosts: vhs
            .into_iter()
            .map(|(name, domains, routes)| rpb::VirtualHost {
                name,
                domains,
                routes,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
}

fn hcm() -> impl Strategy<Value = Any> {
    use hcm::http_connection_manager::RouteSpecifier as R;
    let spec = prop_oneof![
        1 => route_config(String::new()).prop_map(R::RouteConfig),
        1 => (0u8..3).prop_map(|i| R::Rds(hcm::Rds {
            route_config_name: format!("r{i}"),
            config_source: Some(core::ConfigSource {
                config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
                    core::AggregatedConfigSource {},
                )),
                resource_api_version: 2,
                ..Default::default()
            }),
        })),
    ];
    (spec, any::<bool>()).prop_map(|(s, with_router)| {
        let http_filters = if with_router {
            vec![hcm::HttpFilter {
                name: "envoy.filters.http.router".into(),
                config_type: Some(hcm::http_filter::ConfigType::TypedConfig(Any {
                    type_url: ROUTER.into(),
                    value: vec![],
                })),
                ..Default::default()
            }]
        } else {
            vec![]
        };
        pack(
            HCM,
            &hcm::HttpConnectionManager {
                stat_prefix: "h".into(),
                route_specifier: Some(s),
                http_filters,
                ..Default::default()
            },
        )
    })
}

fn filter_chain() -> impl Strategy<Value = lpb::FilterChain> {
    let filter = prop_oneof![
        4 => tcp_proxy().prop_map(|a| ("envoy.filters.network.tcp_proxy", a)),
        1 => hcm().prop_map(|a| ("envoy.filters.network.http_connection_manager", a)),
    ];
    (
        prop_oneof![8 => port().prop_map(Some), 1 => Just(None)],
        prop::collection::vec(
            (ip(), prop::option::of(prop_oneof![20 => Just(32u32), 2 => Just(24), 2 => Just(0), 1 => Just(128), 1 => Just(200)])),
            0..2,
        ),
        filter,
        "[a-z]{0,3}",
        prop_oneof![6 => Just(None), 1 => connection_match().prop_map(Some)],
    )
        .prop_map(|(dport, prefixes, (fname, typed), name, by_conn)| lpb::FilterChain {
            name,
            filter_chain_match: Some(lpb::FilterChainMatch {
                destination_port: dport.map(u32v),
                prefix_ranges: prefixes
                    .into_iter()
                    .map(|(address_prefix, len)| core::CidrRange {
                        address_prefix,
                        prefix_len: len.map(u32v),
                    })
                    .collect(),
                ..by_conn.unwrap_or_default()
            }),
            filters: vec![lpb::Filter {
                name: fname.into(),
                config_type: Some(lpb::filter::ConfigType::TypedConfig(typed)),
            }],
            ..Default::default()
        })
}

/// A chain's match on more than the destination: SNI, transport and application protocols,
/// source ranges and ports (what the connection routing fuzz drives).
fn connection_match() -> impl Strategy<Value = lpb::FilterChainMatch> {
    (
        prop::collection::vec(
            prop_oneof![
                Just("a.svc".to_string()),
                Just("*.svc".to_string()),
                "[a-z.*]{0,6}"
            ],
            0..2,
        ),
        prop_oneof![
            Just(String::new()),
            Just("tls".to_string()),
            Just("raw_buffer".to_string())
        ],
        prop::collection::vec(
            prop_oneof![
                Just("http/1.1".to_string()),
                Just("h2c".to_string()),
                Just("istio".to_string())
            ],
            0..2,
        ),
        prop::collection::vec(
            (
                ip(),
                prop::option::of(prop_oneof![Just(32u32), Just(8), Just(0), Just(128)]),
            ),
            0..2,
        ),
        prop::collection::vec(prop_oneof![Just(40000u32), Just(0), any::<u32>()], 0..2),
    )
        .prop_map(
            |(server_names, transport_protocol, application_protocols, sources, source_ports)| {
                lpb::FilterChainMatch {
                    server_names,
                    transport_protocol,
                    application_protocols,
                    source_prefix_ranges: sources
                        .into_iter()
                        .map(|(address_prefix, len)| core::CidrRange {
                            address_prefix,
                            prefix_len: len.map(u32v),
                        })
                        .collect(),
                    source_ports,
                    ..Default::default()
                }
            },
        )
}

fn listener(name: String) -> impl Strategy<Value = lpb::Listener> {
    (
        Just(name),
        prop_oneof![
            1 => Just(("0.0.0.0".to_string(), u32::from(CAPTURE_PORT), true)),
            1 => (ip(), port(), any::<bool>()),
        ],
        prop_oneof![20 => prop::collection::vec(filter_chain(), 1..4), 1 => Just(vec![])],
        any::<bool>(),
    )
        .prop_map(|(name, (ip, p, orig), filter_chains, bind)| lpb::Listener {
            name,
            address: Some(core::Address {
                address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                    address: ip,
                    port_specifier: Some(core::socket_address::PortSpecifier::PortValue(p)),
                    ..Default::default()
                })),
            }),
            use_original_dst: orig.then_some(BoolValue { value: true }),
            bind_to_port: (!bind).then_some(BoolValue { value: false }),
            filter_chains,
            ..Default::default()
        })
}

/// One control plane's worth of pushes.
#[derive(Debug, Clone)]
struct Push {
    clusters: Vec<cpb::Cluster>,
    assignments: Vec<epb::ClusterLoadAssignment>,
    listeners: Vec<lpb::Listener>,
    routes: Vec<rpb::RouteConfiguration>,
}

/// Distinct names from `pool` (a control plane sends each once), sometimes one repeated or
/// an empty one (which it must not).
fn names(pool: &'static [&'static str], min: usize) -> impl Strategy<Value = Vec<String>> {
    (
        prop::sample::subsequence(pool, min..=pool.len()).prop_shuffle(),
        prop_oneof![30 => Just(None), 1 => Just(Some(String::new())), 1 => Just(Some(pool[0].to_string()))],
    )
        .prop_map(|(names, extra)| {
            let mut v: Vec<String> = names.into_iter().map(str::to_string).collect();
            v.extend(extra);
            v
        })
}

fn each<S: Strategy>(names: Vec<String>, f: impl Fn(String) -> S) -> Vec<S> {
    names.into_iter().map(f).collect()
}

fn push() -> impl Strategy<Value = Push> {
    const CLUSTERS: &[&str] = &["c0", "c1", "c2", "c3"];
    const LISTENERS: &[&str] = &["virtualOutbound", "l1", "l2"];
    const ROUTES: &[&str] = &["r0", "r1", "r2"];
    (
        names(CLUSTERS, 1).prop_flat_map(|n| each(n, cluster)),
        names(CLUSTERS, 0).prop_flat_map(|n| each(n, assignment)),
        names(LISTENERS, 0).prop_flat_map(|n| {
            each(n, |name| {
                // The virtual listener is Istio's: the capture port, original destination.
                let virtual_listener = name == "virtualOutbound";
                listener(name).prop_map(move |mut l| {
                    if virtual_listener {
                        l.address = Some(core::Address {
                            address: Some(core::address::Address::SocketAddress(
                                core::SocketAddress {
                                    address: "0.0.0.0".into(),
                                    port_specifier: Some(
                                        core::socket_address::PortSpecifier::PortValue(u32::from(
                                            CAPTURE_PORT,
                                        )),
                                    ),
                                    ..Default::default()
                                },
                            )),
                        });
                        l.use_original_dst = Some(BoolValue { value: true });
                    }
                    l
                })
            })
        }),
        names(ROUTES, 0).prop_flat_map(|n| each(n, route_config)),
    )
        .prop_map(|(clusters, assignments, listeners, routes)| Push {
            clusters,
            assignments,
            listeners,
            routes,
        })
}

// === the pipeline ===

/// The kernel's maps, in memory, written by the real reconciler.
#[derive(Default)]
struct Maps {
    services: BTreeMap<ServiceKey, ServiceValue>,
    clusters: BTreeMap<u32, ClusterValue>,
    endpoints: BTreeMap<u32, EndpointValue>,
    maglev: BTreeMap<u32, u32>,
    active: u8,
}

impl FastMaps for Maps {
    fn set_service(&mut self, k: ServiceKey, v: ServiceValue) -> Result<(), BpfError> {
        self.services.insert(k, v);
        Ok(())
    }
    fn delete_service(&mut self, k: ServiceKey) -> Result<(), BpfError> {
        self.services.remove(&k);
        Ok(())
    }
    fn set_cluster(&mut self, i: u32, v: ClusterValue) -> Result<(), BpfError> {
        self.clusters.insert(i, v);
        Ok(())
    }
    fn set_endpoint(&mut self, i: u32, v: EndpointValue) -> Result<(), BpfError> {
        self.endpoints.insert(i, v);
        Ok(())
    }
    fn set_maglev(&mut self, i: u32, v: u32) -> Result<(), BpfError> {
        self.maglev.insert(i, v);
        Ok(())
    }
    fn flip(&mut self, g: u8) -> Result<(), BpfError> {
        self.active = g;
        Ok(())
    }
}

/// Applies one response; a rejection must name a resource (or its position) and a reason.
fn apply(r: &mut Resources, type_url: &str, version: &str, resources: &[Any]) -> usize {
    match r.apply_sotw(type_url, version, resources, SystemTime::UNIX_EPOCH) {
        Ok(()) => 0,
        Err(rejected) => {
            assert!(!rejected.is_empty(), "an Err without rejections");
            let nack = skiff::xds::nack_message(type_url, &rejected);
            assert!(!nack.is_empty());
            if std::env::var_os("SKIFF_FUZZ_DEBUG").is_some() {
                eprintln!("NACK {nack}");
            }
            for x in &rejected {
                assert!(!x.to_string().is_empty());
            }
            bump(&REACHED.rejected);
            rejected.len()
        }
    }
}

/// Everything after acceptance: snapshot, balancers, projection, reconciler, kernel walk.
fn exercise(store: &Store) {
    let snap = store.load();
    let mut balanced = false;
    for entry in snap.clusters.values() {
        balanced |= !entry.lb.hosts.is_empty();
        let plan = entry.lb.plan();
        let (views, _) = entry.lb.views();
        let shares = skiff::lb::plan::eligible(&plan, &views);
        let total: f64 = shares.iter().map(|e| e.share).sum();
        assert!(
            total.is_finite() && total <= 1.0 + 1e-6,
            "shares sum to {total}"
        );
        for hash in [None, Some(0u64), Some(u64::MAX)] {
            let req = LbRequest {
                hash,
                ..Default::default()
            };
            if let Some(h) = skiff::lb::choose(&entry.lb, &req) {
                assert!(
                    entry.lb.host(h.address()).is_some(),
                    "picked a host it does not have"
                );
            }
        }
        let _ = entry.healthy_endpoints();
    }
    if balanced {
        bump(&REACHED.balanced);
    }
    let image = skiff::bpf::projection::project(&snap, CAPTURE_PORT);
    if !image.services.is_empty() {
        bump(&REACHED.projected);
    }
    let caps = Capacity {
        max_services: 16,
        max_clusters: 16,
        max_endpoints: 512,
        max_maglev: 2,
    };
    let mut maps = Maps::default();
    let mut rec = Reconciler::new(caps);
    if rec.apply(&mut maps, &image).is_err() {
        return;
    }
    let vips: Vec<SocketAddr> = image.services.keys().copied().collect();
    for vip in vips {
        let seen = skiff::bpf::reconciler::choices(
            &maps.services,
            &|i| maps.clusters.get(&i).copied(),
            &|i| maps.endpoints.get(&i).copied(),
            &|i| maps.maglev.get(&i).copied(),
            maps.active,
            vip,
        );
        if seen.is_some_and(|(_, hits)| !hits.is_empty()) {
            bump(&REACHED.kernel_choices);
        }
    }
}

fn run(pushes: &[Push]) -> Store {
    let mut r = Resources::default();
    let store = Store::new(r.snapshot());
    for (i, p) in pushes.iter().enumerate() {
        let v = i.to_string();
        let order: [(&str, Vec<Any>); 4] = [
            (
                CLUSTER_TYPE_URL,
                p.clusters
                    .iter()
                    .map(|c| pack(CLUSTER_TYPE_URL, c))
                    .collect(),
            ),
            (
                ENDPOINT_TYPE_URL,
                p.assignments
                    .iter()
                    .map(|c| pack(ENDPOINT_TYPE_URL, c))
                    .collect(),
            ),
            (
                LISTENER_TYPE_URL,
                p.listeners
                    .iter()
                    .map(|c| pack(LISTENER_TYPE_URL, c))
                    .collect(),
            ),
            (
                ROUTE_TYPE_URL,
                p.routes.iter().map(|c| pack(ROUTE_TYPE_URL, c)).collect(),
            ),
        ];
        for (t, ms) in &order {
            apply(&mut r, t, &v, ms);
        }
        // The accepted state is published, as the ADS client does after each response (one
        // publish per round keeps a case cheap; every response's state is a prefix of it).
        store.publish(r.snapshot());
        exercise(&store);
    }
    store
}

/// How deep the cases went: a fuzz whose inputs never reach the projection would pass while
/// testing nothing, so the test asserts each stage is reached often enough.
#[derive(Debug, Default)]
struct Reached {
    rejected: AtomicU64,
    balanced: AtomicU64,
    projected: AtomicU64,
    kernel_choices: AtomicU64,
}

static REACHED: Reached = Reached {
    rejected: AtomicU64::new(0),
    balanced: AtomicU64::new(0),
    projected: AtomicU64::new(0),
    kernel_choices: AtomicU64::new(0),
};

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Runs `body` on `n` values of `strategy`, split over the machine's cores (up to 4), each
/// thread with its own seed (`SKIFF_FUZZ_SEED` fixes the base).
fn fuzz<S, G, F>(n: u32, strategy: G, body: F)
where
    S: Strategy,
    G: Fn() -> S + Copy + Send + 'static,
    F: Fn(S::Value) + Copy + Send + 'static,
{
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get().min(4)) as u32;
    let base: u64 = std::env::var("SKIFF_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("SKIFF_FUZZ_SEED={base} SKIFF_FUZZ_CASES={n} ({threads} threads)");
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let share = n / threads + u32::from(t < n % threads);
            std::thread::spawn(move || {
                let config = ProptestConfig {
                    cases: share,
                    failure_persistence: None,
                    ..ProptestConfig::default()
                };
                // XorShift: ChaCha (the default) dominates a case's time in a debug build.
                let mut seed = [0u8; 16];
                seed[..8].copy_from_slice(&base.to_le_bytes());
                seed[8..12].copy_from_slice(&t.to_le_bytes());
                let rng = proptest::test_runner::TestRng::from_seed(
                    proptest::test_runner::RngAlgorithm::XorShift,
                    &seed,
                );
                let mut runner = proptest::test_runner::TestRunner::new_with_rng(config, rng);
                runner
                    .run(&strategy(), |v| {
                        body(v);
                        Ok(())
                    })
                    .map_err(|e| format!("thread {t} of seed {base}: {e}"))
            })
        })
        .collect();
    for w in workers {
        match w.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => panic!("a fuzz thread panicked outside a case (seed {base})"),
        }
    }
}

/// A control plane's pushes (one or two rounds: the second updates or removes what the first
/// created) never make skiff panic or abort, from acceptance to the kernel's choice. The cases
/// are split over the machine's cores (up to 4), each thread with its own seed.
#[test]
fn hostile_pushes_never_panic() {
    let n = cases();
    fuzz(
        n,
        || prop::collection::vec(push(), 1..3),
        |pushes| {
            run(&pushes);
        },
    );
    let r = &REACHED;
    let seen = |c: &AtomicU64| c.load(Ordering::Relaxed);
    eprintln!(
        "{n} cases: {} with a rejection, {} balanced a cluster with hosts, {} projected a \
         service, {} walked the kernel's choice to an endpoint",
        seen(&r.rejected),
        seen(&r.balanced),
        seen(&r.projected),
        seen(&r.kernel_choices)
    );
    // Each stage is reached by a fair share of the cases (measured: well above these).
    let at_least = |c: &AtomicU64, pct: u64, what: &str| {
        assert!(
            seen(c) * 100 >= u64::from(n) * pct,
            "only {} of {n} cases {what}",
            seen(c)
        );
    };
    at_least(&r.rejected, 10, "had a rejection");
    at_least(&r.balanced, 10, "balanced a cluster with hosts");
    at_least(&r.projected, 1, "projected a service");
    at_least(&r.kernel_choices, 1, "reached a kernel choice");
}

// === traffic on the generated snapshot ===

/// How a connection arrived: which listener accepted it and whether capture redirected it.
#[derive(Debug, Clone)]
enum Arrival {
    /// Redirected to the capture listener (the original destination is known).
    Captured,
    /// On the capture listener without an original destination.
    CapturedUnknown,
    /// On a listener bound to its own address (by name).
    Static(String),
    /// On the inbound listener's port.
    Inbound(u16),
}

/// One generated connection: its addresses and what the listener filters detected.
#[derive(Debug, Clone)]
struct Conn {
    arrival: Arrival,
    dst: SocketAddr,
    src: SocketAddr,
    server_name: Option<String>,
    transport: &'static str,
    protocols: Vec<String>,
}

/// One generated HTTP request.
#[derive(Debug, Clone)]
struct Req {
    method: String,
    host: String,
    path: String,
    headers: Vec<(String, String)>,
}

fn traffic_ip() -> impl Strategy<Value = std::net::IpAddr> {
    prop_oneof![
        30 => (0u8..2, 1u8..4).prop_map(|(a, b)| std::net::IpAddr::from([10, 96, a, b])),
        10 => (1u8..6).prop_map(|b| std::net::IpAddr::from([127, 0, 0, b])),
        3 => (0u16..4).prop_map(|a| std::net::IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, a])),
        1 => Just(std::net::IpAddr::from([0u8; 4])),
        1 => Just("::ffff:10.96.0.1".parse().expect("address")),
        1 => any::<[u8; 4]>().prop_map(std::net::IpAddr::from),
        1 => any::<[u8; 16]>().prop_map(std::net::IpAddr::from),
    ]
}

fn traffic_port() -> impl Strategy<Value = u16> {
    prop_oneof![
        20 => prop::sample::select(vec![80u16, 443, 8080, CAPTURE_PORT]),
        1 => Just(0),
        1 => any::<u16>(),
    ]
}

fn conn() -> impl Strategy<Value = Conn> {
    (
        prop_oneof![
            6 => Just(Arrival::Captured),
            1 => Just(Arrival::CapturedUnknown),
            2 => prop::sample::select(vec!["virtualOutbound", "l1", "l2", "nope"])
                .prop_map(|n| Arrival::Static(n.to_string())),
            1 => traffic_port().prop_map(Arrival::Inbound),
        ],
        (traffic_ip(), traffic_port()),
        (traffic_ip(), any::<u16>()),
        prop::option::of(prop_oneof![Just("a.svc".to_string()), "[a-z.*]{0,8}"]),
        prop::sample::select(vec!["raw_buffer", "tls", ""]),
        prop::collection::vec(
            prop_oneof![
                Just("http/1.1".to_string()),
                Just("h2c".to_string()),
                Just("h2".to_string()),
                "[a-z]{0,3}"
            ],
            0..3,
        ),
    )
        .prop_map(
            |(arrival, (dip, dport), (sip, sport), server_name, transport, protocols)| Conn {
                arrival,
                dst: SocketAddr::new(dip, dport),
                src: SocketAddr::new(sip, sport),
                server_name,
                transport,
                protocols,
            },
        )
}

fn req() -> impl Strategy<Value = Req> {
    (
        prop_oneof![
            10 => prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS"])
                .prop_map(str::to_string),
            1 => "[A-Z]{1,8}",
        ],
        prop_oneof![
            10 => "[a-z]{1,6}".prop_map(|d| format!("{d}.svc")),
            3 => "[a-z]{1,6}".prop_map(|d| format!("{d}.svc:80")),
            1 => Just("*".to_string()),
            1 => Just(String::new()),
            1 => Just("[::1]:8080".to_string()),
            1 => "[a-zA-Z0-9.:*\\[\\]-]{0,12}",
        ],
        prop_oneof![
            10 => "/[a-z/]{0,6}",
            2 => "/[a-z]{0,4}\\?[a-z=&]{0,6}",
            1 => Just("/api/v12/x".to_string()),
            1 => Just("*".to_string()),
            1 => Just(String::new()),
            1 => "[ -~]{0,10}",
        ],
        prop::collection::vec(("[a-z:-]{1,6}", "[ -~]{0,6}"), 0..3),
    )
        .prop_map(|(method, host, path, headers)| Req {
            method,
            host,
            path,
            headers,
        })
}

/// What the traffic fuzz reached, so it cannot pass while routing nothing.
#[derive(Debug, Default)]
struct Routed {
    tcp: AtomicU64,
    http_chain: AtomicU64,
    http_route: AtomicU64,
}

static ROUTED: Routed = Routed {
    tcp: AtomicU64::new(0),
    http_chain: AtomicU64::new(0),
    http_route: AtomicU64::new(0),
};

/// Requests through one route configuration: the virtual host and route chosen, when any, are
/// the configuration's own. Each request is also sent to the first domain of every virtual
/// host (a wildcard's `*` made a label), so generated hosts are not the only ones tried.
fn route_requests(rc: &skiff::model::RouteConfig, reqs: &[Req]) -> bool {
    use skiff::http::route::{RequestFacts, select_route, select_virtual_host};
    let domains = rc
        .virtual_hosts
        .iter()
        .filter_map(|v| v.domains.first())
        .map(|d| d.replace('*', "x"));
    let reqs: Vec<Req> = reqs
        .iter()
        .cloned()
        .chain(
            domains
                .zip(reqs.iter().cycle())
                .map(|(host, r)| Req { host, ..r.clone() }),
        )
        .collect();
    let mut routed = false;
    for r in &reqs {
        let Ok(method) = hyper::Method::from_bytes(r.method.as_bytes()) else {
            continue;
        };
        let mut headers = hyper::HeaderMap::new();
        for (k, v) in &r.headers {
            if let (Ok(k), Ok(v)) = (
                hyper::header::HeaderName::from_bytes(k.as_bytes()),
                hyper::header::HeaderValue::from_str(v),
            ) {
                headers.append(k, v);
            }
        }
        let Some(vh) = select_virtual_host(rc, &r.host) else {
            continue;
        };
        assert!(
            rc.virtual_hosts.iter().any(|v| std::ptr::eq(v, vh)),
            "virtual host {} is not one of {}'s",
            vh.name,
            rc.name
        );
        let facts = RequestFacts {
            host: &r.host,
            method: &method,
            path: &r.path,
            headers: &headers,
        };
        if let Some(route) = select_route(vh, &facts) {
            assert!(
                vh.routes.iter().any(|x| std::ptr::eq(x, route)),
                "route {:?} is not one of virtual host {}'s",
                route.name,
                vh.name
            );
            routed = true;
        }
    }
    routed
}

/// Connections through `dataplane::route` on the published snapshot, then requests through
/// the HTTP route selection of the connection manager they reach (and of every RDS
/// configuration): no panic, and what is chosen is the snapshot's own.
fn traffic(store: &Store, conns: &[Conn], reqs: &[Req]) {
    use skiff::dataplane::ListenerRole;
    use skiff::dataplane::route::{self, ConnFacts, Route, Target};
    let snap = store.load();
    let weighted = std::sync::atomic::AtomicUsize::new(0);
    for c in conns {
        let (role, redirected) = match &c.arrival {
            Arrival::Captured => (ListenerRole::Capture, Some(c.dst)),
            Arrival::CapturedUnknown => (ListenerRole::Capture, None),
            Arrival::Static(name) => (ListenerRole::Static { name: name.clone() }, None),
            Arrival::Inbound(port) => (ListenerRole::Inbound { port: *port }, Some(c.dst)),
        };
        let listener = route::listener_for(&snap, &role, redirected, CAPTURE_PORT);
        if let Some(l) = listener {
            assert!(
                snap.listeners.values().any(|x| Arc::ptr_eq(x, l)),
                "listener {} is not the snapshot's",
                l.name
            );
        }
        let facts = ConnFacts {
            dst: c.dst,
            orig_dst: redirected.map(skiff::addr::OrigDstAddr),
            src: c.src,
            direct_src: c.src,
            server_name: c.server_name.as_deref(),
            transport_protocol: c.transport,
            application_protocols: &c.protocols,
        };
        match route::select(&snap, listener, &facts, &weighted) {
            Route::TcpProxy(t) => {
                assert!(
                    snap.clusters.values().any(|e| Arc::ptr_eq(e, &t.cluster)),
                    "cluster {} is not the snapshot's",
                    t.cluster.cluster.name
                );
                if let Target::Host(h) = &t.target {
                    assert!(
                        t.cluster.lb.host(h.address()).is_some(),
                        "host {} is not in cluster {}",
                        h.address(),
                        t.cluster.cluster.name
                    );
                }
                bump(&ROUTED.tcp);
            }
            Route::Http { chain, manager } => {
                assert!(
                    listener.is_some_and(|l| Arc::ptr_eq(l, chain.listener())),
                    "the chain is not the serving listener's"
                );
                bump(&ROUTED.http_chain);
                let rc = manager.inline_route_config.clone().or_else(|| {
                    manager
                        .rds_route_config_name
                        .as_ref()
                        .and_then(|n| snap.routes.get(n))
                        .cloned()
                });
                if rc.is_some_and(|rc| route_requests(&rc, reqs)) {
                    bump(&ROUTED.http_route);
                }
            }
            Route::Passthrough(_) | Route::Reject(_) => {}
        }
    }
    for rc in snap.routes.values() {
        if route_requests(rc, reqs) {
            bump(&ROUTED.http_route);
        }
    }
}

/// Generated connections (addresses, ports, SNI, detected protocols, how they arrived) and
/// requests (method, host, path, headers) routed on a generated snapshot never panic, and pick
/// only the snapshot's listeners, clusters, hosts, virtual hosts and routes. A twentieth of the
/// cases of the test above: a case also runs the whole pipeline.
#[test]
fn generated_traffic_routes_only_to_the_snapshot() {
    let n = (cases() / 20).max(1);
    fuzz(
        n,
        || {
            (
                prop::collection::vec(push(), 1..3),
                prop::collection::vec(conn(), 1..6),
                prop::collection::vec(req(), 1..6),
            )
        },
        |(pushes, conns, reqs)| {
            let store = run(&pushes);
            traffic(&store, &conns, &reqs);
        },
    );
    let seen = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let r = &ROUTED;
    eprintln!(
        "{n} cases: {} tcp_proxy routes, {} HCM chains, {} route configurations chose an \
         HTTP route",
        seen(&r.tcp),
        seen(&r.http_chain),
        seen(&r.http_route)
    );
    for (c, what) in [
        (&r.tcp, "tcp_proxy route"),
        (&r.http_chain, "HCM chain"),
        (&r.http_route, "route configuration choosing an HTTP route"),
    ] {
        assert!(
            seen(c) * 100 >= u64::from(n),
            "only {} {what}s in {n} cases",
            seen(c)
        );
    }
}

/// Regression: an EDS `priority: 4294967295` made skiff allocate one balancer level per
/// priority and abort. It is now NACKed naming the field, and the last good assignment serves.
#[test]
fn huge_eds_priority_is_nacked_and_the_last_good_assignment_serves() {
    let cla = |priority: u32| epb::ClusterLoadAssignment {
        cluster_name: "c0".into(),
        endpoints: vec![epb::LocalityLbEndpoints {
            priority,
            lb_endpoints: vec![epb::LbEndpoint {
                host_identifier: Some(epb::lb_endpoint::HostIdentifier::Endpoint(epb::Endpoint {
                    address: Some(core::Address {
                        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                            address: "10.0.0.1".into(),
                            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(
                                80,
                            )),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let eds = cpb::Cluster {
        name: "c0".into(),
        cluster_discovery_type: Some(cpb::cluster::ClusterDiscoveryType::Type(3)),
        connect_timeout: Some(Duration {
            seconds: 1,
            nanos: 0,
        }),
        ..Default::default()
    };
    let mut r = Resources::default();
    let now = SystemTime::UNIX_EPOCH;
    r.apply_sotw(CLUSTER_TYPE_URL, "1", &[pack(CLUSTER_TYPE_URL, &eds)], now)
        .unwrap();
    r.apply_sotw(
        ENDPOINT_TYPE_URL,
        "1",
        &[pack(ENDPOINT_TYPE_URL, &cla(2))],
        now,
    )
    .unwrap();
    let rejected = r
        .apply_sotw(
            ENDPOINT_TYPE_URL,
            "2",
            &[pack(ENDPOINT_TYPE_URL, &cla(u32::MAX))],
            now,
        )
        .unwrap_err();
    let nack = skiff::xds::nack_message(ENDPOINT_TYPE_URL, &rejected);
    assert!(
        nack.contains("c0")
            && nack.contains("endpoints[0].priority: 4294967295 is above the maximum of 128"),
        "{nack}"
    );
    assert_eq!(r.version_info(ENDPOINT_TYPE_URL), "1");
    let store = Store::new(r.snapshot());
    let snap = store.load();
    let entry = snap.cluster("c0").expect("the last good assignment serves");
    assert_eq!(entry.lb.plan().levels.len(), 3);
    exercise(&store);
    let _ = Arc::clone(&snap);
}

/// Regression (found by the fuzz above): LEAST_REQUEST with `choice_count: 4294967295` drew
/// that many random hosts on every pick. As many choices as hosts is now one full scan.
#[test]
fn huge_least_request_choice_count_picks_in_one_scan() {
    let cluster = cpb::Cluster {
        name: "c0".into(),
        cluster_discovery_type: Some(cpb::cluster::ClusterDiscoveryType::Type(0)),
        connect_timeout: Some(Duration {
            seconds: 1,
            nanos: 0,
        }),
        lb_policy: 1,
        lb_config: Some(cpb::cluster::LbConfig::LeastRequestLbConfig(
            cpb::cluster::LeastRequestLbConfig {
                choice_count: Some(u32v(u32::MAX)),
                ..Default::default()
            },
        )),
        load_assignment: Some(epb::ClusterLoadAssignment {
            cluster_name: "c0".into(),
            endpoints: vec![epb::LocalityLbEndpoints {
                lb_endpoints: (1..4)
                    .map(|i| epb::LbEndpoint {
                        host_identifier: Some(epb::lb_endpoint::HostIdentifier::Endpoint(
                            epb::Endpoint {
                                address: Some(core::Address {
                                    address: Some(core::address::Address::SocketAddress(
                                        core::SocketAddress {
                                            address: format!("10.0.0.{i}"),
                                            port_specifier: Some(
                                                core::socket_address::PortSpecifier::PortValue(80),
                                            ),
                                            ..Default::default()
                                        },
                                    )),
                                }),
                                ..Default::default()
                            },
                        )),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut r = Resources::default();
    r.apply_sotw(
        CLUSTER_TYPE_URL,
        "1",
        &[pack(CLUSTER_TYPE_URL, &cluster)],
        SystemTime::UNIX_EPOCH,
    )
    .unwrap();
    let store = Store::new(r.snapshot());
    let snap = store.load();
    let entry = snap.cluster("c0").unwrap();
    let started = std::time::Instant::now();
    for _ in 0..1000 {
        assert!(skiff::lb::choose(&entry.lb, &LbRequest::default()).is_some());
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}
