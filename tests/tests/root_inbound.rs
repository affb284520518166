//! Root tests of inbound capture (`skiff run --capture-inbound`): two private network
//! namespaces joined by a veth whose addresses (10.200.0.1/24 in A, 10.200.0.2/24 in B) exist
//! only inside them. A client in A connects to B's address; skiff in B captures the
//! connection (sk_lookup in eBPF mode, PREROUTING REDIRECT in iptables mode), routes it through
//! the virtualInbound listener's chains and forwards it to B's app from 127.0.0.6, as Istio does.
//! Excluded inbound ports reach the app directly, with the client's own address.
//!
//! Run: `cargo build -p skiff -p skiff-tests --bins && cargo test -p skiff-tests --features root
//! --test root_inbound -- --test-threads=1` (as root).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use skiff_tests::{
    Cgroup, Child, Netns, TempYaml, admin_stat as stat, assert_no_programs_attached, command_in,
    field, require_root, run, serial, sidecar_args, sigterm_and_wait, skiff_run, spawn_testpeer,
    testpeer_output, veth_pair, wait_admin_ready,
};

const BOOTSTRAP: &str = r#"
node: { id: sidecar~10.200.0.2~b.default~default.svc.cluster.local, cluster: b }
admin: { address: { socket_address: { address: 127.0.0.1, port_value: 15000 } } }
static_resources:
  listeners:
  - name: virtualOutbound
    address: { socket_address: { address: 0.0.0.0, port_value: 15001 } }
    use_original_dst: true
    default_filter_chain:
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: PassthroughCluster
          cluster: PassthroughCluster
  - name: virtualInbound
    address: { socket_address: { address: 0.0.0.0, port_value: 15006 } }
    traffic_direction: INBOUND
    filter_chains:
    - name: "0.0.0.0_8080"
      filter_chain_match: { destination_port: 8080 }
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: "inbound|8080||"
          cluster: "inbound|8080||"
    - name: "0.0.0.0_8081"
      filter_chain_match: { destination_port: 8081 }
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: "inbound_0.0.0.0_8081"
          route_config:
            name: "inbound|8081||"
            virtual_hosts:
            - name: "inbound|http|8081"
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: "inbound|8081||" }
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
    default_filter_chain:
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: InboundPassthroughClusterIpv4
          cluster: InboundPassthroughClusterIpv4
  clusters:
  - name: "inbound|8080||"
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
  - name: "inbound|8081||"
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
  - name: InboundPassthroughClusterIpv4
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
  - name: PassthroughCluster
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
"#;

const POD_B: &str = "10.200.0.2";
const CLIENT_A: &str = "10.200.0.1";

struct Pair {
    // Drop order: apps, then the namespaces (deleting B's netns removes the veth pair).
    apps: Vec<Child>,
    a: Netns,
    b: Netns,
    bootstrap: TempYaml,
}

/// Netns A and B joined by a veth (created inside A, its peer moved into B: it never exists in
/// this machine's own namespace), and B's apps on 0.0.0.0:8080, :7070 and :9090.
fn pair(name: &str) -> Pair {
    require_root();
    let a = Netns::new(&format!("{name}-a"));
    let b = Netns::new(&format!("{name}-b"));
    veth_pair(&a, "va", "10.200.0.1/24", &b, "vb", "10.200.0.2/24");
    for ns in [&a, &b] {
        // The only routes: loopback and the /24 on the veth; nothing leaves the pair.
        let routes = run(Command::new("ip").args(["-n", ns.name(), "-4", "route", "show"]));
        assert!(
            routes.lines().all(|l| l.starts_with("10.200.0.0/24 dev ")),
            "unexpected route in {}: {routes}",
            ns.name()
        );
    }
    let apps = [8080, 7070, 9090]
        .iter()
        .map(|port| spawn_testpeer(&b, None, &["origdst", &format!("0.0.0.0:{port}")]))
        .collect();
    let bootstrap = TempYaml::new(name, BOOTSTRAP);
    Pair {
        apps,
        a,
        b,
        bootstrap,
    }
}

/// A client in A connecting to B's `port`.
fn client(p: &Pair, port: u16) -> String {
    testpeer_output(
        &p.a,
        None,
        &[
            "client",
            &format!("{POD_B}:{port}"),
            "--bytes",
            "65536",
            "--timeout-ms",
            "3000",
        ],
    )
}

/// The peer B's app on `port` saw for its next connection.
fn app_peer(p: &mut Pair, port: u16) -> String {
    let i = [8080, 7070, 9090]
        .iter()
        .position(|&x| x == port)
        .expect("known app port");
    let line = p.apps[i].expect_line("accepted", Duration::from_secs(5));
    field(&line, "peer").unwrap_or_default().to_string()
}

fn skiff(p: &Pair, args: &[&str]) -> Child {
    let mut all = vec!["--no-ipv6"];
    all.extend_from_slice(args);
    skiff_dual_stack(p, &all)
}

fn skiff_dual_stack(p: &Pair, args: &[&str]) -> Child {
    Child::spawn(
        skiff_run(&p.b, &p.bootstrap)
            .args(["--capture-inbound", "--exclude-inbound-ports", "9090"])
            .args(args),
    )
}

/// skiff in eBPF mode in B, capturing `<cg>/app` from `<cg>/proxy` (IPv4 only unless
/// `dual_stack`), once its admin says ready.
fn skiff_ebpf(p: &Pair, cg: &mut Cgroup, dual_stack: bool) -> Child {
    let app_cg = cg.child("app");
    let proxy_cg = cg.child_path("proxy");
    let args = sidecar_args(&app_cg, &proxy_cg, &["--capture", "ebpf"]);
    let proxy = if dual_stack {
        skiff_dual_stack(p, &args)
    } else {
        skiff(p, &args)
    };
    wait_admin_ready(&p.b);
    proxy
}

/// The checks both modes pass: captured ports go through skiff's inbound listener and reach
/// the app from 127.0.0.6; the excluded port reaches it straight from A.
fn assert_inbound_capture(p: &mut Pair) {
    let out = client(p, 8080);
    assert!(out.starts_with("ok "), "captured inbound connect: {out}");
    assert_eq!(field(&out, "echoed"), Some("65536"), "{out}");
    let peer = app_peer(p, 8080);
    assert!(
        peer.starts_with("127.0.0.6:"),
        "the app must see skiff's inbound passthrough source, saw {peer}"
    );
    assert_eq!(stat(&p.b, "listener.0.0.0.0_15006.downstream_cx_total"), 1);
    assert_eq!(stat(&p.b, "cluster.inbound|8080||.upstream_cx_total"), 1);

    // A port without its own chain takes the default chain: InboundPassthroughCluster.
    let out = client(p, 7070);
    assert!(out.starts_with("ok "), "passthrough inbound: {out}");
    assert!(app_peer(p, 7070).starts_with("127.0.0.6:"));
    assert_eq!(
        stat(
            &p.b,
            "cluster.InboundPassthroughClusterIpv4.upstream_cx_total"
        ),
        1
    );

    // excludeInboundPorts: straight to the app, which sees the client's own address.
    let out = client(p, 9090);
    assert!(out.starts_with("ok "), "excluded inbound port: {out}");
    let peer = app_peer(p, 9090);
    assert!(
        peer.starts_with(&format!("{CLIENT_A}:")),
        "excluded port must bypass skiff, app saw {peer}"
    );
    assert_eq!(stat(&p.b, "listener.0.0.0.0_15006.downstream_cx_total"), 2);
}

/// After skiff exits, B's app is reached directly again.
fn assert_direct_after_exit(p: &mut Pair) {
    let out = client(p, 8080);
    assert!(out.starts_with("ok "), "after exit: {out}");
    let peer = app_peer(p, 8080);
    assert!(
        peer.starts_with(&format!("{CLIENT_A}:")),
        "after exit: {peer}"
    );
}

/// Polls a kernel-mirrored gauge (refreshed every 200 ms) until it reaches `min`.
fn wait_stat(ns: &Netns, name: &str, min: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let v = stat(ns, name);
        if v >= min || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sk_lookup_steers_connections_for_the_pod_address_to_the_inbound_listener() {
    let _g = serial();
    let env = require_root();
    let mut p = pair("in-skl");
    let mut cg = Cgroup::new(&env, "in-skl");
    let proxy = skiff_ebpf(&p, &mut cg, false);
    assert_inbound_capture(&mut p);
    assert!(wait_stat(&p.b, "skiff.inbound.steered", 2) >= 2);
    assert!(wait_stat(&p.b, "skiff.inbound.skip_excluded_port", 1) >= 1);
    // skiff's own connects to the app (from 127.0.0.6) were never steered back.
    assert!(wait_stat(&p.b, "skiff.inbound.skip_from_pod", 2) >= 2);
    sigterm_and_wait(proxy);
    assert_direct_after_exit(&mut p);
    assert_no_programs_attached(cg.path());
}

#[test]
fn iptables_prerouting_redirects_inbound_connections() {
    let _g = serial();
    let mut p = pair("in-ipt");
    let proxy = skiff(&p, &["--capture", "iptables"]);
    wait_admin_ready(&p.b);
    let rules = run(command_in(Some(&p.b), None, "iptables-save").args(["-t", "nat"]));
    assert!(
        rules.contains("-A PREROUTING -p tcp -j SKIFF_INBOUND")
            && rules.contains("--dport 9090 -j RETURN")
            && rules.contains("-A SKIFF_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"),
        "{rules}"
    );
    assert_inbound_capture(&mut p);
    sigterm_and_wait(proxy);
    let rules = run(command_in(Some(&p.b), None, "iptables-save").args(["-t", "nat"]));
    assert!(!rules.contains("SKIFF_"), "rules left: {rules}");
    assert_direct_after_exit(&mut p);
}

#[test]
fn sk_lookup_steers_ipv6_connections_to_the_v6_inbound_listener() {
    let _g = serial();
    let env = require_root();
    let p = pair("in-skl6");
    for (ns, dev, cidr) in [
        (&p.a, "va", "fd00:200::1/64"),
        (&p.b, "vb", "fd00:200::2/64"),
    ] {
        run(Command::new("ip").args([
            "-n",
            ns.name(),
            "-6",
            "addr",
            "add",
            cidr,
            "dev",
            dev,
            "nodad",
        ]));
    }
    let mut app6 = spawn_testpeer(&p.b, None, &["origdst", "[fd00:200::2]:8080"]);
    let mut cg = Cgroup::new(&env, "in-skl6");
    let proxy = skiff_ebpf(&p, &mut cg, true);
    let out = testpeer_output(
        &p.a,
        None,
        &[
            "client",
            "[fd00:200::2]:8080",
            "--bytes",
            "65536",
            "--timeout-ms",
            "3000",
        ],
    );
    assert!(out.starts_with("ok "), "v6 inbound: {out}");
    let line = app6.expect_line("accepted", Duration::from_secs(5));
    // skiff forwarded it (::6 is not configured here, so it left from the pod address,
    // which sk_lookup never steers back).
    assert_eq!(
        field(&line, "peer").map(|a| a.starts_with("[fd00:200::2]:")),
        Some(true),
        "{line}"
    );
    assert_eq!(stat(&p.b, "listener.[__]_15006.downstream_cx_total"), 1);
    assert_eq!(stat(&p.b, "cluster.inbound|8080||.upstream_cx_total"), 1);
    assert!(wait_stat(&p.b, "skiff.inbound.steered", 1) >= 1);
    sigterm_and_wait(proxy);
    drop(app6);
    assert_no_programs_attached(cg.path());
}

#[test]
fn inbound_http_is_served_by_the_connection_manager_chain() {
    let _g = serial();
    let env = require_root();
    let p = pair("in-http");
    let httppeer = PathBuf::from(env!("CARGO_BIN_EXE_skiff-httppeer"));
    let mut app = Child::spawn(command_in(Some(&p.b), None, &httppeer).args([
        "serve",
        "0.0.0.0:8081",
        "app-b",
    ]));
    app.expect_line("ready", Duration::from_secs(5));
    let mut cg = Cgroup::new(&env, "in-http");
    let proxy = skiff_ebpf(&p, &mut cg, false);
    let out = command_in(Some(&p.a), None, &httppeer)
        .args(["get", &format!("{POD_B}:8081"), "app.default.svc", "/hello"])
        .output()
        .expect("run http client");
    let out = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(field(&out, "status"), Some("200"), "{out}");
    assert_eq!(field(&out, "body"), Some("app-b"), "{out}");
    // Served by virtualInbound's HCM chain (route -> inbound|8081||), not by tcp_proxy.
    assert_eq!(stat(&p.b, "listener.0.0.0.0_15006.downstream_cx_total"), 1);
    assert_eq!(stat(&p.b, "cluster.inbound|8081||.upstream_rq_total"), 1);
    sigterm_and_wait(proxy);
    drop(app);
    assert_no_programs_attached(cg.path());
}
