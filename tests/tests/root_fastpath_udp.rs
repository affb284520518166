//! Root end-to-end test of the UDP kernel fast path: the real `skiff run --fast-path` in a
//! private network namespace (loopback only) and cgroups this test creates. Datagrams to a UDP
//! service VIP (a `udp_proxy` listener) are sent straight to a backend by sendmsg4 (or
//! connect4 for connected sockets), and recvmsg4 / getpeername4 show the VIP to the app.
//!
//! Run: `cargo build -p skiff -p skiff-tests --bins && cargo test -p skiff-tests --features root
//! --test root_fastpath_udp -- --test-threads=1` (as root).

use std::path::{Path, PathBuf};

use skiff_tests::fastpath::{
    capture_bootstrap, fastpeer_output, netns_and_cgroup, per_backend, skiff_maps, spawn_fast_path,
    spawn_fastpeer, static_cluster, tcp_chain,
};
use skiff_tests::{
    Cgroup, Child, Netns, TempYaml, assert_no_programs_attached, command_in, field, serial,
    sigterm_and_wait,
};

const BACKENDS: [&str; 3] = ["127.0.0.31:5353", "127.0.0.32:5353", "127.0.0.33:5353"];
/// The `cluster` form of udp_proxy.
const VIP: &str = "10.96.0.10:53";
/// The `matcher` form (on_no_match Route).
const VIP_MATCHER: &str = "10.96.0.11:53";

/// The two udp_proxy listeners (the capture listener skiff needs comes first).
const UDP_LISTENERS: &str = r#"  - name: dns
    address: { socket_address: { protocol: UDP, address: 10.96.0.10, port_value: 53 } }
    listener_filters:
    - name: envoy.filters.udp_listener.udp_proxy
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig
        stat_prefix: dns
        cluster: dns
  - name: dns_matcher
    address: { socket_address: { protocol: UDP, address: 10.96.0.11, port_value: 53 } }
    listener_filters:
    - name: envoy.filters.udp_listener.udp_proxy
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig
        stat_prefix: dns_matcher
        matcher:
          on_no_match:
            action:
              name: route
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.Route
                cluster: dns
"#;

/// Two UDP services over the same three backends, plus the capture listener skiff needs.
fn bootstrap_yaml() -> String {
    capture_bootstrap(
        &tcp_chain("tcp", "10.96.0.99", 32, "dns"),
        &format!(
            "{UDP_LISTENERS}  clusters:\n{}",
            static_cluster("dns", "ROUND_ROBIN", &BACKENDS)
        ),
    )
}

struct Scenario {
    // Field order is drop order: processes first, then cgroups, the netns and the bootstrap.
    skiff: Option<Child>,
    _backends: Child,
    ns: Netns,
    cg: Cgroup,
    _bootstrap: TempYaml,
}

fn scenario(name: &str) -> (Scenario, PathBuf) {
    let (ns, mut cg) = netns_and_cgroup(name);
    let mut args = vec!["udp-serve"];
    args.extend(BACKENDS);
    let backends = spawn_fastpeer(&ns, &args);
    let bootstrap = TempYaml::new(name, &bootstrap_yaml());
    let (skiff, app) = spawn_fast_path(&ns, &mut cg, &bootstrap, &[]);
    let s = Scenario {
        skiff: Some(skiff),
        _backends: backends,
        ns,
        cg,
        _bootstrap: bootstrap,
    };
    skiff_tests::wait_admin_ready(&s.ns);
    (s, app)
}

/// Runs `skiff-fastpeer udp-spread` (in `cgroup` if given) and returns its result line.
fn udp_spread(ns: &Netns, cgroup: Option<&Path>, vip: &str, n: usize, connected: bool) -> String {
    let n = n.to_string();
    let mut args = vec!["udp-spread", vip, "--n", &n];
    if connected {
        args.push("--connected");
    }
    fastpeer_output(ns, cgroup, &args)
}

fn stat(ns: &Netns, name: &str) -> u64 {
    skiff_tests::admin_stat(ns, name)
}

#[test]
fn udp_datagrams_to_a_vip_reach_backends_and_replies_come_from_the_vip() {
    let _g = serial();
    let (mut s, app) = scenario("fp-udp");

    // (a) Unconnected sendto: the reply arrives, and recvfrom shows the VIP as its source.
    let out = udp_spread(&s.ns, Some(&app), VIP, 1, false);
    assert!(out.starts_with("ok "), "sendto {VIP}: {out}");
    assert_eq!(field(&out, "from"), Some(VIP), "reply source: {out}");
    assert_eq!(
        per_backend(&out, &BACKENDS).iter().sum::<usize>(),
        1,
        "{out}"
    );
    assert!(stat(&s.ns, "skiff.bpf.fast_udp_send") >= 1);
    assert!(stat(&s.ns, "skiff.bpf.fast_udp_reply") >= 1);

    // (b) Connected UDP: getpeername shows the VIP, replies arrive.
    let out = udp_spread(&s.ns, Some(&app), VIP, 3, true);
    assert!(out.starts_with("ok "), "connected {VIP}: {out}");
    assert_eq!(field(&out, "from"), Some(VIP), "getpeername: {out}");
    assert_eq!(
        per_backend(&out, &BACKENDS).iter().sum::<usize>(),
        3,
        "{out}"
    );
    assert!(stat(&s.ns, "skiff.bpf.fast_udp_connect") >= 3);

    // (c) Many datagrams spread over the three backends (round robin: each gets some); the
    // matcher form of udp_proxy is a service too.
    for vip in [VIP, VIP_MATCHER] {
        let out = udp_spread(&s.ns, Some(&app), vip, 30, false);
        assert!(out.starts_with("ok "), "spread {vip}: {out}");
        assert_eq!(field(&out, "from"), Some(vip), "{out}");
        let counts = per_backend(&out, &BACKENDS);
        assert_eq!(counts.iter().sum::<usize>(), 30, "{out}");
        assert!(
            counts.iter().all(|&c| c > 0),
            "every backend answers: {counts:?}"
        );
    }

    // (d) Outside the app cgroup nothing is rewritten: the VIP is routed nowhere.
    let out = udp_spread(&s.ns, None, VIP, 1, false);
    assert!(out.starts_with("err "), "outside the cgroup: {out}");
    assert_eq!(field(&out, "errno"), Some("101"), "ENETUNREACH: {out}");

    // skiff's proxy never bound the UDP listeners, and no datagram went through it.
    let (code, body) =
        skiff_tests::admin(&s.ns, "GET", "/debug/explain?dst=10.96.0.10:53").expect("explain");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"udp\""), "{body}");
    assert!(body.contains("\"path\": \"kernel\""), "{body}");
    let text = skiff_maps(&s.ns);
    assert!(
        text.contains("vip=10.96.0.10:53") && text.contains("proto=UDP"),
        "skiff maps lacks the UDP service:\n{text}"
    );

    // The proxy bound no UDP socket at all (only the backends' sockets exist).
    let out = command_in(Some(&s.ns), None, "ss")
        .args(["-ulnH"])
        .output()
        .expect("ss");
    let sockets = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ss: {out:?}");
    let bound: Vec<&str> = sockets
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .collect();
    assert_eq!(bound.len(), 3, "UDP sockets in the netns: {sockets}");
    assert!(
        bound.iter().all(|a| BACKENDS.contains(a)),
        "UDP sockets in the netns: {sockets}"
    );

    // SIGTERM: skiff detaches everything.
    sigterm_and_wait(s.skiff.take().expect("skiff running"));
    assert_no_programs_attached(s.cg.path());
}
