//! Snapshots attached to a store: cluster stats kept across publishes while the cluster
//! exists and dropped with it; HCM and virtual-cluster handles resolved at attach.

use std::sync::Arc;

use super::*;

const BOOTSTRAP: &str = r#"
static_resources:
  listeners:
  - name: web
    address: {socket_address: {address: 127.0.0.1, port_value: 8080}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            virtual_hosts:
            - name: vh
              domains: ["*"]
              virtual_clusters:
              - name: api
                headers: [{name: ":path", string_match: {prefix: "/api"}}]
              routes:
              - match: {prefix: "/"}
                route: {cluster: a}
  clusters:
  - name: a
    type: STATIC
    load_assignment:
      cluster_name: a
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 9001}}}}]}]
  - name: a.b
    type: STATIC
    load_assignment:
      cluster_name: a.b
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 9002}}}}]}]
"#;

fn names(stats: &Stats) -> Vec<String> {
    stats.snapshot().into_iter().map(|(k, _)| k).collect()
}

#[test]
fn cluster_stats_live_as_long_as_the_cluster() {
    let b = crate::config::parse(BOOTSTRAP, "test").expect("bootstrap");
    let stats = Arc::new(Stats::default());
    let store = Store::with_registry(
        Snapshot::new(b.listeners.clone(), b.clusters.clone(), &Default::default()),
        HostRegistry::new(stats.clone()),
    );
    let first = store.load();
    let a = first.cluster("a").expect("a").stats.clone();
    let ab = first.cluster("a.b").expect("a.b").stats.clone();
    a.upstream_cx_total.inc();
    a.rq.status(200);
    ab.upstream_cx_total.inc();
    assert!(Arc::ptr_eq(&a, first.cluster_stats("a").unwrap()));

    // A new snapshot of the same clusters keeps the same handles and values.
    store.publish(Snapshot::new(
        b.listeners.clone(),
        b.clusters.clone(),
        &Default::default(),
    ));
    let second = store.load();
    assert!(Arc::ptr_eq(&a, &second.cluster("a").unwrap().stats));
    second.cluster("a").unwrap().stats.upstream_cx_total.inc();
    assert_eq!(stats.counter("cluster.a.upstream_cx_total").get(), 2);

    // Cluster `a` removed: its names leave /stats, `a.b`'s stay.
    let without_a: Vec<_> = b
        .clusters
        .iter()
        .filter(|c| c.name != "a")
        .cloned()
        .collect();
    store.publish(Snapshot::new(
        b.listeners.clone(),
        without_a,
        &Default::default(),
    ));
    let listed = names(&stats);
    assert!(
        !listed
            .iter()
            .any(|n| n.starts_with("cluster.a.") && !n.starts_with("cluster.a.b.")),
        "{listed:?}"
    );
    assert!(listed.contains(&"cluster.a.b.upstream_cx_total".to_string()));
    // The connection still holding `a`'s entry counts on, unlisted.
    first
        .cluster("a")
        .unwrap()
        .stats
        .upstream_cx_connect_fail
        .inc();
    assert!(
        !names(&stats)
            .iter()
            .any(|n| n == "cluster.a.upstream_cx_connect_fail")
    );

    // Added back, `a` starts from zero, as a new cluster does in Envoy.
    store.publish(Snapshot::new(
        b.listeners.clone(),
        b.clusters.clone(),
        &Default::default(),
    ));
    let again = store.load().cluster("a").unwrap().stats.clone();
    assert!(!Arc::ptr_eq(&a, &again));
    assert_eq!(again.upstream_cx_total.get(), 0);
}

#[test]
fn http_and_virtual_cluster_handles_are_resolved_at_attach() {
    let b = crate::config::parse(BOOTSTRAP, "test").expect("bootstrap");
    let stats = Arc::new(Stats::default());
    let store = Store::with_registry(
        Snapshot::new(b.listeners.clone(), b.clusters.clone(), &Default::default()),
        HostRegistry::new(stats.clone()),
    );
    let snap = store.load();
    assert!(Arc::ptr_eq(
        &snap.http_stats("ingress"),
        &stats.http("ingress")
    ));
    for vc in ["api", "other"] {
        assert!(Arc::ptr_eq(
            &snap.vcluster_stats("vh", vc),
            &stats.vcluster("vh", vc)
        ));
    }
    // Passthrough stats exist without a cluster of that name and survive publishes.
    let pt = snap
        .cluster_stats(PASSTHROUGH_CLUSTER)
        .expect("passthrough")
        .clone();
    pt.upstream_cx_total.inc();
    store.publish(Snapshot::new(
        b.listeners.clone(),
        b.clusters.clone(),
        &Default::default(),
    ));
    assert!(Arc::ptr_eq(
        &pt,
        store.load().cluster_stats(PASSTHROUGH_CLUSTER).unwrap()
    ));
    assert_eq!(
        stats
            .counter("cluster.PassthroughCluster.upstream_cx_total")
            .get(),
        1
    );
}

#[test]
fn rbac_counters_are_listed_at_attach_per_filter_names() {
    // Two network filters share `tcp.` but not their shadow prefix (as Istio's dry-run and
    // enforced policies do): each gets its own four counters, listed at zero.
    let listener = |name: &str, port: u16, shadow: &str| {
        format!(
            r#"
  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.rbac
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC
          stat_prefix: tcp.
          shadow_rules_stat_prefix: "{shadow}"
          rules: {{}}
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: t
          cluster: c"#
        )
    };
    let yaml = format!(
        "static_resources:\n  listeners:{}{}\n",
        listener("a", 81, ""),
        listener("b", 82, "dry_")
    );
    let b = crate::config::parse(&yaml, "test").expect("bootstrap");
    let stats = Arc::new(Stats::default());
    let store = Store::with_registry(
        Snapshot::new(b.listeners.clone(), vec![], &Default::default()),
        HostRegistry::new(stats.clone()),
    );
    let listed = names(&stats);
    for n in [
        "tcp.rbac.allowed",
        "tcp.rbac.denied",
        "tcp.rbac.shadow_allowed",
        "tcp.rbac.dry_.shadow_denied",
    ] {
        assert!(listed.iter().any(|l| l == n), "{n} in {listed:?}");
    }
    let snap = store.load();
    let chain = &snap.listeners["b"].filter_chains[0];
    let d = chain.rbac[0]
        .config
        .check(&crate::rbac::ConnectionFacts::new(
            [127, 0, 0, 1].into(),
            "127.0.0.1:82".parse().unwrap(),
        ));
    snap.rbac_counters(&chain.rbac[0].stats).count(&d);
    assert_eq!(stats.counter("tcp.rbac.denied").get(), 1);
}
