//! Selection tests: Envoy's chain order, listener ownership per role, and the typed routes.

use std::collections::BTreeMap;

use super::*;
use crate::model::listener::{FilterChainMatch, HttpManager};
use crate::model::test_util::{self, listener, tcp_chain, tcp_proxy_chain, virtual_listener};
use crate::model::{Cluster, LbPolicy};

fn chain(name: &str, m: FilterChainMatch) -> FilterChain {
    tcp_proxy_chain(name, m, name)
}

/// A ROUND_ROBIN STATIC cluster over healthy `eps`.
fn static_cluster(name: &str, eps: &[&str]) -> Cluster {
    test_util::static_cluster(name, LbPolicy::RoundRobin, eps)
}

fn facts(dst: &str) -> ConnFacts<'static> {
    ConnFacts {
        dst: dst.parse().unwrap(),
        orig_dst: Some(OrigDstAddr(dst.parse().unwrap())),
        src: "127.0.0.1:40000".parse().unwrap(),
        direct_src: "127.0.0.1:40000".parse().unwrap(),
        server_name: None,
        transport_protocol: "raw_buffer",
        application_protocols: &[],
    }
}

fn pick<'a>(l: &'a Listener, dst: &str) -> Option<&'a str> {
    select_chain(l, &facts(dst)).map(|(_, c)| c.name.as_str())
}

#[test]
fn port_then_longest_prefix() {
    let l = listener(
        vec![
            chain("any", FilterChainMatch::default()),
            chain(
                "port80",
                FilterChainMatch {
                    destination_port: Some(80),
                    ..Default::default()
                },
            ),
            chain(
                "port80-vip",
                FilterChainMatch {
                    destination_port: Some(80),
                    prefix_ranges: vec!["10.96.0.1/32".parse().unwrap()],
                    ..Default::default()
                },
            ),
            chain(
                "port80-net",
                FilterChainMatch {
                    destination_port: Some(80),
                    prefix_ranges: vec!["10.96.0.0/12".parse().unwrap()],
                    ..Default::default()
                },
            ),
        ],
        None,
    );
    assert_eq!(pick(&l, "10.96.0.1:80"), Some("port80-vip"));
    assert_eq!(pick(&l, "10.96.0.2:80"), Some("port80-net"));
    assert_eq!(pick(&l, "192.168.0.1:80"), Some("port80"));
    assert_eq!(pick(&l, "10.96.0.1:81"), Some("any"));
    assert_eq!(pick(&l, "[::ffff:10.96.0.1]:80"), Some("port80-vip"));
    assert_eq!(
        select_chain(&l, &facts("10.96.0.2:80")).map(|(id, _)| id),
        Some(ChainId::At(3))
    );
}

#[test]
fn no_backtracking_to_less_specific_port() {
    // The port-80 chain only accepts tls; a raw connection to :80 must not fall back to the
    // port-less chain (Envoy does not backtrack), so the default chain is used.
    let l = listener(
        vec![
            chain("any", FilterChainMatch::default()),
            chain(
                "tls80",
                FilterChainMatch {
                    destination_port: Some(80),
                    transport_protocol: "tls".into(),
                    ..Default::default()
                },
            ),
        ],
        Some(chain("default", FilterChainMatch::default())),
    );
    assert_eq!(pick(&l, "10.0.0.1:80"), Some("default"));
    assert_eq!(
        select_chain(&l, &facts("10.0.0.1:80")).map(|(id, _)| id),
        Some(ChainId::Default)
    );
    assert_eq!(pick(&l, "10.0.0.1:81"), Some("any"));
}

#[test]
fn application_protocols_need_detection() {
    let l = listener(
        vec![
            chain(
                "http",
                FilterChainMatch {
                    application_protocols: vec!["http/1.1".into(), "h2c".into()],
                    ..Default::default()
                },
            ),
            chain(
                "raw",
                FilterChainMatch {
                    transport_protocol: "raw_buffer".into(),
                    ..Default::default()
                },
            ),
        ],
        None,
    );
    assert_eq!(pick(&l, "10.0.0.1:80"), Some("raw"));
    let alpn = vec!["h2c".to_string()];
    let f = ConnFacts {
        application_protocols: &alpn,
        ..facts("10.0.0.1:80")
    };
    assert_eq!(
        select_chain(&l, &f).map(|(_, c)| c.name.as_str()),
        Some("raw")
    );
}

#[test]
fn nothing_matches_without_default() {
    let l = listener(
        vec![chain(
            "p1",
            FilterChainMatch {
                destination_port: Some(1),
                ..Default::default()
            },
        )],
        None,
    );
    assert_eq!(pick(&l, "10.0.0.1:2"), None);
}

#[test]
fn chain_for_destination_only_answers_when_the_destination_decides() {
    let l = listener(
        vec![
            tcp_chain("vip", "10.96.0.1", 80, "svc"),
            chain(
                "vip-tls",
                FilterChainMatch {
                    destination_port: Some(443),
                    prefix_ranges: vec!["10.96.0.1/32".parse().unwrap()],
                    transport_protocol: "tls".into(),
                    ..Default::default()
                },
            ),
        ],
        None,
    );
    let dst = |s: &str| s.parse::<SocketAddr>().unwrap();
    assert_eq!(
        chain_for_destination(&l.filter_chains, dst("10.96.0.1:80")).map(|c| c.map(|c| &*c.name)),
        Ok(Some("vip"))
    );
    assert_eq!(
        chain_for_destination(&l.filter_chains, dst("10.96.0.2:80")),
        Ok(None)
    );
    assert_eq!(
        chain_for_destination(&l.filter_chains, dst("10.96.0.1:443")),
        Err(Ambiguous::MoreCriteria("vip-tls"))
    );
}

// === listeners ===

fn bound(name: &str, addr: &str, chains: Vec<FilterChain>) -> Listener {
    Listener {
        name: name.into(),
        address: addr.parse().unwrap(),
        use_original_dst: false,
        ..listener(chains, None)
    }
}

fn snap(listeners: Vec<Listener>, clusters: Vec<Cluster>) -> Snapshot {
    Snapshot::new(listeners, clusters, &BTreeMap::new())
}

fn name(l: Option<&Arc<Listener>>) -> Option<&str> {
    l.map(|l| l.name.as_str())
}

#[test]
fn owner_is_the_listener_on_the_destination_else_the_virtual_one() {
    let s = snap(
        vec![
            virtual_listener(vec![]),
            bound("vip_80", "10.96.0.1:80", vec![]),
            bound("any_9080", "0.0.0.0:9080", vec![]),
        ],
        vec![],
    );
    let d = |s: &str| s.parse::<SocketAddr>().unwrap();
    assert_eq!(name(owner(&s, d("10.96.0.1:80"), 15001)), Some("vip_80"));
    assert_eq!(name(owner(&s, d("10.1.2.3:9080"), 15001)), Some("any_9080"));
    assert_eq!(
        name(owner(&s, d("10.96.0.2:80"), 15001)),
        Some("virtualOutbound")
    );
    assert_eq!(name(owner(&s, d("10.96.0.2:80"), 15002)), None);
}

#[test]
fn each_role_finds_its_listener() {
    let s = snap(
        vec![
            virtual_listener(vec![]),
            bound("vip_80", "10.96.0.1:80", vec![]),
            bound("own", "127.0.0.1:7000", vec![]),
            bound("virtualInbound", "0.0.0.0:15006", vec![]),
        ],
        vec![],
    );
    let d = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
    let capture = ListenerRole::Capture;
    let own = ListenerRole::Static { name: "own".into() };
    let inbound = ListenerRole::Inbound { port: 15006 };
    assert_eq!(
        name(listener_for(&s, &capture, d("10.96.0.1:80"), 15001)),
        Some("vip_80")
    );
    assert_eq!(
        name(listener_for(&s, &capture, None, 15001)),
        Some("virtualOutbound")
    );
    // A static listener hands a redirected connection to the listener on its destination, and
    // keeps it when none is there (no virtual-listener fallback).
    assert_eq!(
        name(listener_for(&s, &own, d("10.96.0.1:80"), 15001)),
        Some("vip_80")
    );
    assert_eq!(
        name(listener_for(&s, &own, d("10.96.0.9:80"), 15001)),
        Some("own")
    );
    assert_eq!(name(listener_for(&s, &own, None, 15001)), Some("own"));
    // The inbound listener never hands off, even to a listener on the destination.
    assert_eq!(
        name(listener_for(&s, &inbound, d("10.96.0.1:80"), 15001)),
        Some("virtualInbound")
    );
}

// === routes ===

fn original_dst(name: &str) -> Cluster {
    Cluster {
        kind: ClusterKind::OriginalDst,
        lb_policy: LbPolicy::ClusterProvided,
        ..static_cluster(name, &[])
    }
}

fn route(s: &Snapshot, l: Option<&str>, f: &ConnFacts<'_>) -> Route {
    let l = l.map(|n| &s.listeners[n]);
    select(s, l, f, &AtomicUsize::new(0))
}

#[test]
fn tcp_proxy_keeps_the_chosen_cluster_entry_and_host() {
    let s = snap(
        vec![virtual_listener(vec![tcp_chain(
            "vip",
            "10.96.0.1",
            80,
            "svc",
        )])],
        vec![static_cluster("svc", &["127.0.0.11:8080"])],
    );
    let Route::TcpProxy(t) = route(&s, Some("virtualOutbound"), &facts("10.96.0.1:80")) else {
        panic!("expected tcp_proxy");
    };
    assert!(Arc::ptr_eq(&t.cluster, &s.clusters["svc"]));
    let host = t.target.host().expect("a balancer host");
    assert!(Arc::ptr_eq(host, &s.clusters["svc"].lb.hosts[0]));
    assert_eq!(t.target.to_string(), "127.0.0.11:8080");
    assert_eq!(t.chain.get().name, "vip");
    assert_eq!(t.chain.listener().name, "virtualOutbound");
}

#[test]
fn original_dst_needs_an_original_destination() {
    let mut l = virtual_listener(vec![]);
    l.default_filter_chain = Some(chain("PassthroughCluster", FilterChainMatch::default()));
    let s = snap(vec![l], vec![original_dst("PassthroughCluster")]);
    let Route::TcpProxy(t) = route(&s, Some("virtualOutbound"), &facts("10.1.1.1:5432")) else {
        panic!("expected tcp_proxy");
    };
    assert!(matches!(t.target, Target::OriginalDst(a) if a.to_string() == "10.1.1.1:5432"));
    assert_eq!(t.chain.id(), ChainId::Default);
    let direct = ConnFacts {
        orig_dst: None,
        ..facts("127.0.0.1:15001")
    };
    assert!(matches!(
        route(&s, Some("virtualOutbound"), &direct),
        Route::Reject(ConnError::NoOriginalDst { .. })
    ));
}

#[test]
fn without_a_listener_redirected_connections_pass_through() {
    let s = snap(vec![], vec![]);
    assert!(matches!(
        route(&s, None, &facts("10.1.1.1:80")),
        Route::Passthrough(a) if a.to_string() == "10.1.1.1:80"
    ));
    let direct = ConnFacts {
        orig_dst: None,
        ..facts("127.0.0.1:15001")
    };
    assert!(matches!(
        route(&s, None, &direct),
        Route::Reject(ConnError::NoListener)
    ));
}

#[test]
fn rejects_carry_their_reason() {
    let mut http = tcp_chain("http", "10.96.0.2", 80, "svc");
    http.action = NetworkAction::Http(std::sync::Arc::new(HttpManager::default()));
    let mut other = tcp_chain("other", "10.96.0.3", 80, "svc");
    other.action = NetworkAction::Unsupported {
        name: "envoy.filters.network.redis_proxy".into(),
        type_url: String::new(),
    };
    let s = snap(
        vec![virtual_listener(vec![
            tcp_chain("gone", "10.96.0.1", 80, "missing"),
            http,
            other,
            tcp_chain("empty", "10.96.0.4", 80, "empty"),
        ])],
        vec![static_cluster("empty", &[])],
    );
    let r = |dst: &str| route(&s, Some("virtualOutbound"), &facts(dst));
    assert!(
        matches!(r("10.96.0.1:80"), Route::Reject(ConnError::NoCluster { cluster }) if cluster == "missing")
    );
    assert!(matches!(r("10.96.0.2:80"), Route::Http { chain, .. } if chain.get().name == "http"));
    assert!(matches!(
        r("10.96.0.3:80"),
        Route::Reject(ConnError::Unsupported { .. })
    ));
    assert!(matches!(
        r("10.96.0.4:80"),
        Route::Reject(ConnError::NoHealthyUpstream { .. })
    ));
    assert!(matches!(
        r("10.96.0.5:80"),
        Route::Reject(ConnError::NoFilterChain { .. })
    ));
}

#[test]
fn tcp_proxy_hashes_only_with_a_hash_policy_and_a_hashing_balancer() {
    use crate::model::listener::TcpHashPolicy;
    let ip: std::net::IpAddr = "10.1.2.3".parse().unwrap();
    let NetworkAction::TcpProxy(mut tcp) = tcp_chain("t", "10.0.0.1", 80, "c").action else {
        unreachable!("tcp_chain builds a tcp_proxy chain")
    };
    // No hash_policy: Envoy's RING_HASH / MAGLEV get no hash and pick at random.
    assert_eq!(super::tcp_hash(&tcp, LbPolicy::RingHash, ip), None);
    assert_eq!(super::tcp_hash(&tcp, LbPolicy::Maglev, ip), None);
    tcp.hash_policy = Some(TcpHashPolicy::SourceIp);
    assert_eq!(
        super::tcp_hash(&tcp, LbPolicy::Maglev, ip),
        Some(crate::lb::source_ip_hash(ip))
    );
    assert_eq!(super::tcp_hash(&tcp, LbPolicy::RoundRobin, ip), None);
}

// === TLS facts (tls_inspector) ===

fn pick_with(l: &Listener, sni: Option<&str>, transport: &str, alpn: &[&str]) -> Option<String> {
    let alpn: Vec<String> = alpn.iter().map(|s| s.to_string()).collect();
    let f = ConnFacts {
        server_name: sni,
        transport_protocol: transport,
        application_protocols: &alpn,
        ..facts("10.0.0.1:443")
    };
    select_chain(l, &f).map(|(_, c)| c.name.clone())
}

fn names(list: &[&str]) -> FilterChainMatch {
    FilterChainMatch {
        server_names: list.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[test]
fn server_names_exact_then_most_specific_wildcard_then_none() {
    let l = listener(
        vec![
            chain("wild", names(&["*.example.com"])),
            chain("deeper", names(&["*.b.example.com"])),
            chain("exact", names(&["a.b.example.com"])),
            chain("partial", names(&["*w.example.com"])),
            chain("none", FilterChainMatch::default()),
        ],
        Some(chain("default", FilterChainMatch::default())),
    );
    let p = |sni| pick_with(&l, sni, "tls", &[]);
    assert_eq!(p(Some("a.b.example.com")).as_deref(), Some("exact"));
    assert_eq!(p(Some("A.B.Example.COM")).as_deref(), Some("exact"));
    assert_eq!(p(Some("c.b.example.com")).as_deref(), Some("deeper"));
    assert_eq!(p(Some("x.y.b.example.com")).as_deref(), Some("deeper"));
    assert_eq!(p(Some("c.example.com")).as_deref(), Some("wild"));
    // A partial wildcard is no wildcard; a wildcard never matches its bare suffix.
    assert_eq!(p(Some("www.example.com")).as_deref(), Some("wild"));
    assert_eq!(p(Some("example.com")).as_deref(), Some("none"));
    assert_eq!(p(Some(".example.com")).as_deref(), Some("none"));
    assert_eq!(p(None).as_deref(), Some("none"));
}

#[test]
fn a_server_name_match_is_never_given_up_for_a_later_criterion() {
    // Envoy narrows by server name first: the SNI chain wants TLS, so a raw_buffer
    // connection with that SNI gets no chain at all (the default), not the catch-all.
    let l = listener(
        vec![
            chain(
                "sni-tls",
                FilterChainMatch {
                    transport_protocol: "tls".into(),
                    ..names(&["a.example.com"])
                },
            ),
            chain("catch-all", FilterChainMatch::default()),
        ],
        Some(chain("default", FilterChainMatch::default())),
    );
    assert_eq!(
        pick_with(&l, Some("a.example.com"), "tls", &[]).as_deref(),
        Some("sni-tls")
    );
    assert_eq!(
        pick_with(&l, Some("a.example.com"), "raw_buffer", &[]).as_deref(),
        Some("default")
    );
    assert_eq!(
        pick_with(&l, Some("b.example.com"), "tls", &[]).as_deref(),
        Some("catch-all")
    );
}

#[test]
fn application_protocols_follow_the_clients_order() {
    let alpn = |list: &[&str]| FilterChainMatch {
        application_protocols: list.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let l = listener(
        vec![
            chain("h2", alpn(&["h2"])),
            chain("h1", alpn(&["http/1.1"])),
            chain("both", alpn(&["http/1.1", "istio"])),
        ],
        Some(chain("default", FilterChainMatch::default())),
    );
    // The client prefers h2: the chains listing h2 win, though others list its second choice.
    assert_eq!(
        pick_with(&l, None, "tls", &["h2", "http/1.1"]).as_deref(),
        Some("h2")
    );
    // http/1.1 first: both chains listing it are left, the first in configuration order wins.
    assert_eq!(
        pick_with(&l, None, "tls", &["http/1.1", "h2"]).as_deref(),
        Some("h1")
    );
    assert_eq!(
        pick_with(&l, None, "tls", &["istio"]).as_deref(),
        Some("both")
    );
    // Nothing listed: no chain without protocols either, so the default.
    assert_eq!(
        pick_with(&l, None, "tls", &["foo"]).as_deref(),
        Some("default")
    );
}

#[test]
fn istio_permissive_inbound_tells_mtls_from_plaintext() {
    // virtualInbound's shape for one port: mTLS (Istio's ALPNs), TLS passthrough, plaintext
    // HTTP (http_inspector) and plaintext TCP.
    let m = |transport: &str, alpn: &[&str]| FilterChainMatch {
        destination_port: Some(443),
        transport_protocol: transport.into(),
        application_protocols: alpn.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let l = listener(
        vec![
            chain(
                "mtls-http",
                m("tls", &["istio-http/1.0", "istio-http/1.1", "istio-h2"]),
            ),
            chain("mtls-tcp", m("tls", &["istio-peer-exchange", "istio"])),
            chain("tls-passthrough", m("tls", &[])),
            chain(
                "plain-http",
                m("raw_buffer", &["http/1.1", "http/1.0", "h2c"]),
            ),
            chain("plain-tcp", m("raw_buffer", &[])),
        ],
        None,
    );
    let p = |t, alpn: &[&str]| pick_with(&l, None, t, alpn);
    assert_eq!(
        p("tls", &["istio-http/1.1", "istio", "http/1.1"]).as_deref(),
        Some("mtls-http")
    );
    assert_eq!(
        p("tls", &["istio-peer-exchange", "istio", "h2"]).as_deref(),
        Some("mtls-tcp")
    );
    assert_eq!(
        p("tls", &["h2", "http/1.1"]).as_deref(),
        Some("tls-passthrough")
    );
    assert_eq!(
        p("raw_buffer", &["http/1.1"]).as_deref(),
        Some("plain-http")
    );
    assert_eq!(p("raw_buffer", &[]).as_deref(), Some("plain-tcp"));
}
