use super::*;
use envoy_types::pb::envoy::config::cluster::v3::Cluster as PbCluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig,
};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as ep;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment as PbCla;
use envoy_types::pb::envoy::config::listener::v3 as lpb;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp;
use prost::Message;
use skiff_proto::{CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL, LISTENER_TYPE_URL, ROUTE_TYPE_URL};

fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.into(),
        value: m.encode_to_vec(),
    }
}

fn addr(ip: &str, port: u32) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: ip.into(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

fn listener(name: &str, port: u32, cluster: &str) -> Any {
    let t = tcp::TcpProxy {
        stat_prefix: name.into(),
        cluster_specifier: Some(tcp::tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
        ..Default::default()
    };
    let l = lpb::Listener {
        name: name.into(),
        address: Some(addr("127.0.0.1", port)),
        filter_chains: vec![lpb::FilterChain {
            filters: vec![lpb::Filter {
                name: "envoy.filters.network.tcp_proxy".into(),
                config_type: Some(lpb::filter::ConfigType::TypedConfig(any(
                    &format!(
                        "type.googleapis.com/{}",
                        crate::model::listener::TCP_PROXY_TYPE
                    ),
                    &t,
                ))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    any(LISTENER_TYPE_URL, &l)
}

fn eds_cluster(name: &str) -> Any {
    let c = PbCluster {
        name: name.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            service_name: format!("{name}-svc"),
            ..Default::default()
        }),
        ..Default::default()
    };
    any(CLUSTER_TYPE_URL, &c)
}

/// Refused by validation of its content (Envoy: when the cluster is built), not by proto rules.
fn bad_cluster(name: &str) -> Any {
    let mut la = match PbCla::decode(cla(name, 1).value.as_slice()) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    if let Some(ep::lb_endpoint::HostIdentifier::Endpoint(e)) =
        &mut la.endpoints[0].lb_endpoints[0].host_identifier
        && let Some(core::address::Address::SocketAddress(sa)) =
            e.address.as_mut().and_then(|a| a.address.as_mut())
    {
        sa.address = "not-an-ip".into();
    }
    let c = PbCluster {
        name: name.into(),
        load_assignment: Some(la),
        ..Default::default()
    };
    any(CLUSTER_TYPE_URL, &c)
}

fn cla(name: &str, port: u32) -> Any {
    let c = PbCla {
        cluster_name: name.into(),
        endpoints: vec![ep::LocalityLbEndpoints {
            lb_endpoints: vec![ep::LbEndpoint {
                host_identifier: Some(ep::lb_endpoint::HostIdentifier::Endpoint(ep::Endpoint {
                    address: Some(addr("127.0.0.1", port)),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    any(ENDPOINT_TYPE_URL, &c)
}

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH
}

#[test]
fn eds_cluster_warms_until_its_assignment_arrives() {
    let mut r = Resources::default();
    r.apply_sotw(CLUSTER_TYPE_URL, "1", &[eds_cluster("a")], now())
        .unwrap();
    assert!(r.snapshot().cluster("a").is_none());
    assert_eq!(r.warming().1, ["a"]);
    assert_eq!(
        r.subscriptions(ENDPOINT_TYPE_URL)
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        ["a-svc"]
    );
    r.apply_sotw(ENDPOINT_TYPE_URL, "1", &[cla("a-svc", 9)], now())
        .unwrap();
    let s = r.snapshot();
    assert_eq!(s.cluster("a").unwrap().healthy_endpoints().len(), 1);
    assert!(r.warming().1.is_empty());
    assert!(s.xds.clusters.active.contains_key("a"));
}

#[test]
fn partial_nack_applies_valid_resources_and_keeps_last_good() {
    let mut r = Resources::default();
    r.apply_sotw(
        ENDPOINT_TYPE_URL,
        "0",
        &[cla("a-svc", 9), cla("b-svc", 9)],
        now(),
    )
    .unwrap();
    r.apply_sotw(
        CLUSTER_TYPE_URL,
        "1",
        &[eds_cluster("a"), eds_cluster("b")],
        now(),
    )
    .unwrap();
    let err = r
        .apply_sotw(
            CLUSTER_TYPE_URL,
            "2",
            &[bad_cluster("a"), eds_cluster("c")],
            now(),
        )
        .unwrap_err();
    assert_eq!(err.len(), 1);
    assert_eq!(err[0].name, "a");
    assert!(
        matches!(err[0].reason, RejectReason::Invalid(_)),
        "{}",
        err[0]
    );
    assert!(
        err[0].reason.to_string().starts_with("load_assignment"),
        "{}",
        err[0]
    );
    // NACK: the type version stays at the last good one.
    assert_eq!(r.version_info(CLUSTER_TYPE_URL), "1");
    let s = r.snapshot();
    // "a" keeps its previous version, "b" was removed (absent), "c" is new (warming: no CLA).
    assert!(s.cluster("a").is_some());
    assert!(s.cluster("b").is_none());
    assert!(s.cluster("c").is_none());
    assert_eq!(r.warming().1, ["c"]);
    assert!(
        s.xds.clusters.errors["a"]
            .details
            .starts_with("a: load_assignment")
    );
    assert!(
        nack_message(CLUSTER_TYPE_URL, &err).starts_with("Error adding/updating cluster(s) a: ")
    );
}

#[test]
fn undecodable_resource_rejects_the_whole_response() {
    let mut r = Resources::default();
    r.apply_sotw(LISTENER_TYPE_URL, "1", &[listener("l", 1000, "c")], now())
        .unwrap();
    let junk = Any {
        type_url: LISTENER_TYPE_URL.into(),
        value: vec![0xff, 0xff, 0xff],
    };
    let err = r
        .apply_sotw(
            LISTENER_TYPE_URL,
            "2",
            &[listener("m", 1001, "c"), junk],
            now(),
        )
        .unwrap_err();
    assert_eq!(err[0].name, "resources[1]");
    assert!(
        matches!(err[0].reason, RejectReason::Decode { .. }),
        "{}",
        err[0]
    );
    let s = r.snapshot();
    assert!(s.listeners.contains_key("l"));
    assert!(!s.listeners.contains_key("m"));
}

#[test]
fn listeners_on_one_address_and_static_names_are_refused() {
    let st = Listener::try_from(
        &lpb::Listener::decode(listener("static", 2000, "c").value.as_slice()).unwrap(),
    )
    .unwrap();
    let mut r = Resources::new(vec![st], vec![]);
    let err = r
        .apply_sotw(
            LISTENER_TYPE_URL,
            "1",
            &[
                listener("static", 2001, "c"),
                listener("dup", 2000, "c"),
                listener("ok", 2002, "c"),
            ],
            now(),
        )
        .unwrap_err();
    let names: Vec<_> = err.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["static", "dup"]);
    assert_eq!(err[0].reason, RejectReason::Static);
    assert_eq!(
        err[1].to_string(),
        "dup: address 127.0.0.1:2000 is already used by listener \"static\""
    );
    assert!(r.snapshot().listeners.contains_key("ok"));
}

#[test]
fn delta_adds_updates_and_removes() {
    let mut r = Resources::default();
    let a = eds_cluster("a");
    let inc = [Incoming {
        name: Some("a"),
        version: "v1",
        resource: &a,
    }];
    r.apply_delta(CLUSTER_TYPE_URL, "s1", &inc, &[], now())
        .unwrap();
    assert_eq!(r.resource_versions(CLUSTER_TYPE_URL)["a"], "v1");
    r.apply_delta(CLUSTER_TYPE_URL, "s2", &[], &["a".to_string()], now())
        .unwrap();
    assert!(r.resource_versions(CLUSTER_TYPE_URL).is_empty());
    // A wrapper name that disagrees with the resource is rejected.
    let inc = [Incoming {
        name: Some("zzz"),
        version: "v1",
        resource: &a,
    }];
    let err = r
        .apply_delta(CLUSTER_TYPE_URL, "s3", &inc, &[], now())
        .unwrap_err();
    assert_eq!(
        err[0].to_string(),
        "zzz: resource is named \"a\" but its wrapper says \"zzz\""
    );
}

#[test]
fn proto_rule_violation_rejects_the_whole_response() {
    let mut r = Resources::default();
    let neg = PbCluster {
        name: "neg".into(),
        connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
            seconds: -1,
            nanos: 0,
        }),
        ..Default::default()
    };
    let err = r
        .apply_sotw(
            CLUSTER_TYPE_URL,
            "1",
            &[eds_cluster("a"), any(CLUSTER_TYPE_URL, &neg)],
            now(),
        )
        .unwrap_err();
    assert_eq!(
        err[0].reason,
        RejectReason::ProtoRule {
            name: "neg".into(),
            rule: ProtoRule::ConnectTimeout
        }
    );
    assert_eq!(
        err[0].to_string(),
        "resources[1]: \"neg\": connect_timeout: value must be greater than 0s"
    );
    assert!(r.warming().1.is_empty() && r.snapshot().cluster("a").is_none());
}

#[test]
fn unknown_type_urls_are_rejected() {
    let mut r = Resources::default();
    let err = r
        .apply_sotw("type.googleapis.com/foo.Bar", "1", &[], now())
        .unwrap_err();
    assert_eq!(err[0].reason, RejectReason::UnknownType);
    assert_eq!(err[0].name, "type.googleapis.com/foo.Bar");
}

mod prop {
    use super::*;
    use proptest::prelude::{Just, Strategy, prop_assert, prop_oneof, proptest};

    fn type_url() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(LISTENER_TYPE_URL.to_string()),
            Just(CLUSTER_TYPE_URL.to_string()),
            Just(ROUTE_TYPE_URL.to_string()),
            Just(ENDPOINT_TYPE_URL.to_string()),
            "[a-z./]{0,30}",
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_responses_never_panic_and_nacks_explain(
            resp_type in type_url(),
            items in proptest::collection::vec((type_url(), proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)), 0..6),
            delta in proptest::prelude::any::<bool>(),
        ) {
            let mut r = Resources::default();
            let anys: Vec<Any> = items
                .into_iter()
                .map(|(t, v)| Any { type_url: t, value: v })
                .collect();
            let res = if delta {
                let inc: Vec<Incoming<'_>> = anys.iter().map(|a| Incoming { name: None, version: "v", resource: a }).collect();
                r.apply_delta(&resp_type, "1", &inc, &["x".into()], now())
            } else {
                r.apply_sotw(&resp_type, "1", &anys, now())
            };
            if let Err(rej) = res {
                prop_assert!(!rej.is_empty());
                prop_assert!(!nack_message(&resp_type, &rej).is_empty());
                prop_assert!(rej.iter().all(|x| !x.name.is_empty() && !x.reason.to_string().is_empty()));
            }
            let _ = r.snapshot();
        }
    }
}

#[test]
fn a_duplicate_rejects_only_its_second_copy() {
    let mut r = Resources::default();
    let err = r
        .apply_sotw(
            ENDPOINT_TYPE_URL,
            "1",
            &[cla("a-svc", 9), cla("a-svc", 10), cla("", 11)],
            now(),
        )
        .unwrap_err();
    assert_eq!(
        err.iter().map(ToString::to_string).collect::<Vec<_>>(),
        [
            "a-svc: duplicate resource name \"a-svc\" in one response",
            "<unnamed>: cluster_name: must not be empty",
        ]
    );
    // The first copy is applied; the version stays (NACK).
    assert_eq!(r.resource_versions(ENDPOINT_TYPE_URL)["a-svc"], "1");
    assert_eq!(r.version_info(ENDPOINT_TYPE_URL), "");
    assert_eq!(
        nack_message(ENDPOINT_TYPE_URL, &err),
        "a-svc: duplicate resource name \"a-svc\" in one response; <unnamed>: cluster_name: must not be empty"
    );
}

#[test]
fn a_resource_of_another_type_rejects_the_response() {
    let mut r = Resources::default();
    let err = r
        .apply_sotw(
            CLUSTER_TYPE_URL,
            "1",
            &[eds_cluster("a"), listener("l", 1, "a")],
            now(),
        )
        .unwrap_err();
    assert_eq!(err.len(), 1);
    assert_eq!(err[0].name, "resources[1]");
    assert_eq!(
        err[0].reason,
        RejectReason::WrongType {
            found: LISTENER_TYPE_URL.into(),
            expected: CLUSTER_TYPE_URL,
        }
    );
    assert!(r.warming().1.is_empty() && r.resource_versions(CLUSTER_TYPE_URL).is_empty());
    // The error state shows it, without a resource (it never decoded as a cluster).
    let dump = r.snapshot().xds.clusters.errors.clone();
    assert!(dump["resources[1]"].resource.is_none());
}

#[test]
fn subscriptions_follow_accepted_listeners_and_clusters() {
    let mut r = Resources::default();
    assert_eq!(r.subscriptions(LISTENER_TYPE_URL), None);
    assert_eq!(r.subscriptions(CLUSTER_TYPE_URL), None);
    assert_eq!(r.subscriptions(ROUTE_TYPE_URL), Some(BTreeSet::new()));
    r.apply_sotw(
        CLUSTER_TYPE_URL,
        "1",
        &[eds_cluster("a"), eds_cluster("b")],
        now(),
    )
    .unwrap();
    let eds = r.subscriptions(ENDPOINT_TYPE_URL).unwrap();
    assert_eq!(eds.into_iter().collect::<Vec<_>>(), ["a-svc", "b-svc"]);
    // An assignment nobody subscribes to any more is forgotten.
    r.apply_sotw(ENDPOINT_TYPE_URL, "1", &[cla("b-svc", 9)], now())
        .unwrap();
    r.apply_sotw(CLUSTER_TYPE_URL, "2", &[eds_cluster("a")], now())
        .unwrap();
    r.drop_unsubscribed();
    assert!(r.resource_versions(ENDPOINT_TYPE_URL).is_empty());
}
