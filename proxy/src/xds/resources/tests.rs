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
            Just(crate::xds::kind::SECRET_TYPE_URL.to_string()),
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

// === secrets (SDS over ADS) ===

mod secrets {
    use super::*;
    use crate::model::tls::{SecretKind, UPSTREAM_TLS_TYPE};
    use crate::xds::kind::SECRET_TYPE_URL;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
    use std::time::Duration;

    fn pem_pair() -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec!["a.example".to_string()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    fn inline(text: &str) -> core::DataSource {
        core::DataSource {
            specifier: Some(core::data_source::Specifier::InlineString(text.into())),
            ..Default::default()
        }
    }

    fn cert_secret(name: &str, cert: &str, key: &str) -> Any {
        let s = tls::Secret {
            name: name.into(),
            r#type: Some(tls::secret::Type::TlsCertificate(tls::TlsCertificate {
                certificate_chain: Some(inline(cert)),
                private_key: Some(inline(key)),
                ..Default::default()
            })),
        };
        any(SECRET_TYPE_URL, &s)
    }

    fn sds(name: &str, ads: bool) -> tls::SdsSecretConfig {
        use self::core::config_source::ConfigSourceSpecifier as Spec;
        use self::core::grpc_service::{EnvoyGrpc, TargetSpecifier};
        let spec = if ads {
            Spec::Ads(Default::default())
        } else {
            Spec::ApiConfigSource(core::ApiConfigSource {
                api_type: 2,
                grpc_services: vec![core::GrpcService {
                    target_specifier: Some(TargetSpecifier::EnvoyGrpc(EnvoyGrpc {
                        cluster_name: "sds-grpc".into(),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            })
        };
        tls::SdsSecretConfig {
            name: name.into(),
            sds_config: Some(core::ConfigSource {
                config_source_specifier: Some(spec),
                ..Default::default()
            }),
        }
    }

    /// A STATIC cluster dialling mTLS with the client certificate `secret` (over ADS when
    /// `ads`, else from `sds-grpc`).
    fn tls_cluster(name: &str, secret: &str, ads: bool) -> Any {
        let ctx = tls::UpstreamTlsContext {
            common_tls_context: Some(tls::CommonTlsContext {
                tls_certificate_sds_secret_configs: vec![sds(secret, ads)],
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = PbCluster {
            name: name.into(),
            transport_socket: Some(core::TransportSocket {
                name: "envoy.transport_sockets.tls".into(),
                config_type: Some(core::transport_socket::ConfigType::TypedConfig(Any {
                    type_url: format!("type.googleapis.com/{UPSTREAM_TLS_TYPE}"),
                    value: ctx.encode_to_vec(),
                })),
            }),
            ..Default::default()
        };
        any(CLUSTER_TYPE_URL, &c)
    }

    /// A listener on `port` terminating TLS with the server certificate `secret` over ADS.
    fn tls_listener(name: &str, port: u32, secret: &str) -> Any {
        let mut l = lpb::Listener::decode(listener(name, port, "c").value.as_slice()).unwrap();
        let ctx = tls::DownstreamTlsContext {
            common_tls_context: Some(tls::CommonTlsContext {
                tls_certificate_sds_secret_configs: vec![sds(secret, true)],
                ..Default::default()
            }),
            ..Default::default()
        };
        l.filter_chains[0].transport_socket = Some(core::TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(core::transport_socket::ConfigType::TypedConfig(Any {
                type_url: format!(
                    "type.googleapis.com/{}",
                    crate::model::tls::DOWNSTREAM_TLS_TYPE
                ),
                value: ctx.encode_to_vec(),
            })),
        });
        any(LISTENER_TYPE_URL, &l)
    }

    fn subs(r: &Resources) -> Vec<String> {
        r.subscriptions(SECRET_TYPE_URL)
            .unwrap()
            .into_iter()
            .collect()
    }

    fn key_of(r: &Resources, name: &str) -> Vec<u8> {
        match &r.snapshot().secrets[name].kind {
            SecretKind::Certificate(c) => c.private_key.inline().unwrap().to_vec(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn clusters_and_listeners_warm_until_their_ads_secrets_arrive_sotw() {
        let (cert, key) = pem_pair();
        let mut r = Resources::default();
        r.apply_sotw(
            CLUSTER_TYPE_URL,
            "1",
            &[tls_cluster("a", "client", true)],
            now(),
        )
        .unwrap();
        r.apply_sotw(
            LISTENER_TYPE_URL,
            "1",
            &[tls_listener("l", 8443, "server")],
            now(),
        )
        .unwrap();
        // Subscriptions follow the references, by name (not a wildcard).
        assert_eq!(subs(&r), ["client", "server"]);
        assert_eq!(r.warming(), (vec!["l".to_string()], vec!["a".to_string()]));
        let s = r.snapshot();
        assert!(s.cluster("a").is_none() && !s.listeners.contains_key("l"));
        // Only the cluster's secret: the listener still warms.
        r.apply_sotw(
            SECRET_TYPE_URL,
            "1",
            &[cert_secret("client", &cert, &key)],
            now(),
        )
        .unwrap();
        assert_eq!(r.warming(), (vec!["l".to_string()], vec![]));
        let s = r.snapshot();
        assert!(s.cluster("a").is_some());
        assert!(s.secrets.contains_key("client"));
        assert!(s.xds.secrets.active.contains_key("client"));
        // SotW SDS only adds or updates: the response naming `server` alone keeps `client`.
        r.apply_sotw(
            SECRET_TYPE_URL,
            "2",
            &[cert_secret("server", &cert, &key)],
            now(),
        )
        .unwrap();
        let s = r.snapshot();
        assert!(s.listeners.contains_key("l"));
        assert!(s.secrets.contains_key("client") && s.secrets.contains_key("server"));
        assert_eq!(r.version_info(SECRET_TYPE_URL), "2");
        // The cluster goes: its secret is no longer subscribed, and is forgotten.
        r.apply_sotw(CLUSTER_TYPE_URL, "2", &[], now()).unwrap();
        assert_eq!(subs(&r), ["server"]);
        r.drop_unsubscribed();
        assert!(!r.snapshot().secrets.contains_key("client"));
    }

    #[test]
    fn delta_secrets_add_update_and_remove() {
        let (cert, key) = pem_pair();
        let (_, key2) = pem_pair();
        let mut r = Resources::default();
        r.apply_delta(
            CLUSTER_TYPE_URL,
            "s1",
            &[Incoming {
                name: Some("a"),
                version: "c1",
                resource: &tls_cluster("a", "client", true),
            }],
            &[],
            now(),
        )
        .unwrap();
        assert_eq!(r.warming().1, ["a"]);
        let v1 = cert_secret("client", &cert, &key);
        r.apply_delta(
            SECRET_TYPE_URL,
            "s1",
            &[Incoming {
                name: Some("client"),
                version: "k1",
                resource: &v1,
            }],
            &[],
            now(),
        )
        .unwrap();
        assert!(r.warming().1.is_empty());
        assert_eq!(r.resource_versions(SECRET_TYPE_URL)["client"], "k1");
        // Rotation: the new key replaces the old one in the next snapshot.
        let v2 = cert_secret("client", &cert, &key2);
        r.apply_delta(
            SECRET_TYPE_URL,
            "s2",
            &[Incoming {
                name: Some("client"),
                version: "k2",
                resource: &v2,
            }],
            &[],
            now(),
        )
        .unwrap();
        assert_eq!(key_of(&r, "client"), key2.as_bytes());
        r.apply_delta(SECRET_TYPE_URL, "s3", &[], &["client".into()], now())
            .unwrap();
        let s = r.snapshot();
        assert!(!s.secrets.contains_key("client"));
        // The cluster that was active stays (Envoy keeps it; its handshakes then fail).
        assert!(s.cluster("a").is_some());
    }

    #[test]
    fn a_bad_secret_is_nacked_by_name_and_the_last_good_one_kept() {
        let (cert, key) = pem_pair();
        let mut r = Resources::default();
        r.apply_sotw(
            CLUSTER_TYPE_URL,
            "1",
            &[tls_cluster("a", "client", true)],
            now(),
        )
        .unwrap();
        r.apply_sotw(
            SECRET_TYPE_URL,
            "1",
            &[cert_secret("client", &cert, &key)],
            now(),
        )
        .unwrap();
        // The certificate where the key belongs.
        let bad = cert_secret("client", &cert, &cert);
        let rejected = r
            .apply_sotw(SECRET_TYPE_URL, "2", &[bad], now())
            .unwrap_err();
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].name, "client");
        let msg = nack_message(SECRET_TYPE_URL, &rejected);
        assert!(msg.contains("client: tls_certificate.private_key"), "{msg}");
        assert!(!msg.contains("BEGIN"), "no key material in a NACK: {msg}");
        assert_eq!(r.version_info(SECRET_TYPE_URL), "1");
        assert_eq!(key_of(&r, "client"), key.as_bytes());
        let s = r.snapshot();
        assert!(s.xds.secrets.errors.contains_key("client"));
        assert!(s.cluster("a").is_some());
    }

    #[test]
    fn a_secret_never_sent_stops_holding_its_cluster_after_the_fetch_timeout() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let mut r = Resources::default().with_secret_fetch_timeout(Some(Duration::from_secs(10)));
        r.apply_sotw(
            CLUSTER_TYPE_URL,
            "1",
            &[tls_cluster("a", "client", true)],
            t0,
        )
        .unwrap();
        assert_eq!(r.next_secret_deadline(), Some(t0 + Duration::from_secs(10)));
        assert!(!r.poll_secret_waits(t0 + Duration::from_secs(9)));
        assert_eq!(r.warming().1, ["a"]);
        assert!(r.poll_secret_waits(t0 + Duration::from_secs(10)));
        assert!(r.warming().1.is_empty());
        assert!(r.snapshot().cluster("a").is_some());
        assert_eq!(r.next_secret_deadline(), None);
        // `initial_fetch_timeout: 0s` waits for ever.
        let mut r = Resources::default().with_secret_fetch_timeout(None);
        r.apply_sotw(
            CLUSTER_TYPE_URL,
            "1",
            &[tls_cluster("a", "client", true)],
            t0,
        )
        .unwrap();
        assert_eq!(r.next_secret_deadline(), None);
        assert!(!r.poll_secret_waits(t0 + Duration::from_secs(3600)));
        assert_eq!(r.warming().1, ["a"]);
    }

    #[test]
    fn grpc_secrets_come_from_outside_and_static_names_are_not_replaced() {
        let (cert, key) = pem_pair();
        let parse = |a: &Any| {
            crate::model::tls::Secret::try_from(&tls::Secret::decode(a.value.as_slice()).unwrap())
                .map(Arc::new)
                .unwrap()
        };
        let static_ca = parse(&cert_secret("static", &cert, &key));
        let mut r =
            Resources::default().with_static_secrets([("static".to_string(), static_ca)].into());
        // A cluster on Istio's sds-grpc: no ADS subscription, no warming, a gRPC name.
        r.apply_sotw(
            CLUSTER_TYPE_URL,
            "1",
            &[tls_cluster("g", "default", false)],
            now(),
        )
        .unwrap();
        assert!(subs(&r).is_empty());
        assert!(r.warming().1.is_empty());
        assert_eq!(
            r.grpc_secret_names().into_iter().collect::<Vec<_>>(),
            ["default"]
        );
        r.set_external_secrets(
            [(
                "default".to_string(),
                parse(&cert_secret("default", &cert, &key)),
            )]
            .into(),
        );
        let s = r.snapshot();
        assert!(s.secrets.contains_key("default") && s.secrets.contains_key("static"));
        // A secret over ADS may not replace a bootstrap one.
        let rejected = r
            .apply_sotw(
                SECRET_TYPE_URL,
                "1",
                &[cert_secret("static", &cert, &key)],
                now(),
            )
            .unwrap_err();
        assert_eq!(rejected[0].reason, RejectReason::Static);
    }

    #[test]
    fn a_static_secret_the_bootstrap_lacks_rejects_the_cluster() {
        let ctx = tls::UpstreamTlsContext {
            common_tls_context: Some(tls::CommonTlsContext {
                tls_certificate_sds_secret_configs: vec![tls::SdsSecretConfig {
                    name: "missing".into(),
                    sds_config: None,
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = PbCluster {
            name: "s".into(),
            transport_socket: Some(core::TransportSocket {
                name: "envoy.transport_sockets.tls".into(),
                config_type: Some(core::transport_socket::ConfigType::TypedConfig(Any {
                    type_url: format!("type.googleapis.com/{UPSTREAM_TLS_TYPE}"),
                    value: ctx.encode_to_vec(),
                })),
            }),
            ..Default::default()
        };
        let mut r = Resources::default();
        let rejected = r
            .apply_sotw(CLUSTER_TYPE_URL, "1", &[any(CLUSTER_TYPE_URL, &c)], now())
            .unwrap_err();
        assert_eq!(rejected[0].name, "s");
        assert_eq!(
            rejected[0].reason,
            RejectReason::UnknownStaticSecret("missing".into())
        );
    }
}
