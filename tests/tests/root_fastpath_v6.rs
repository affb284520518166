//! Root end-to-end test of the kernel fast path for IPv6 services: the real `skiff run
//! --fast-path` in a private network namespace (loopback only, two IPv6 addresses on lo) and
//! cgroups this test creates. connect6 sends connects to an IPv6 VIP straight to IPv6 backends,
//! and getpeername6 shows the VIP to the application.
//!
//! Run: `cargo build -p skiff -p skiff-tests --bins && cargo test -p skiff-tests --features root
//! --test root_fastpath_v6 -- --test-threads=1` (as root).

use skiff_tests::fastpath::{
    capture_bootstrap, fastpeer_output, netns_and_cgroup, per_backend, spawn_fast_path,
    spawn_fastpeer, tcp_chain,
};
use skiff_tests::{TempYaml, field, serial};

const VIP: &str = "[fd00:96::10]:80";
const BACKENDS: [&str; 2] = ["[fd00::21]:8080", "[fd00::22]:8080"];
const CAPTURE_CX: &str = "listener.[__1]_15001.downstream_cx_total";

const CLUSTERS: &str = r#"  clusters:
  - name: six
    type: STATIC
    lb_policy: ROUND_ROBIN
    connect_timeout: 1s
    load_assignment:
      cluster_name: six
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: "fd00::21", port_value: 8080 } } }
        - endpoint: { address: { socket_address: { address: "fd00::22", port_value: 8080 } } }
"#;

#[test]
fn ipv6_service_connects_go_straight_to_ipv6_backends_and_show_the_vip() {
    let _g = serial();
    let name = "fp-v6";
    let (ns, mut cg) = netns_and_cgroup(name);
    ns.add_lo_addr("fd00::21/128");
    ns.add_lo_addr("fd00::22/128");
    let mut args = vec!["serve"];
    args.extend(BACKENDS);
    let backends = spawn_fastpeer(&ns, &args);
    let bootstrap = TempYaml::new(
        name,
        &capture_bootstrap(&tcp_chain("six", "fd00:96::10", 128, "six"), CLUSTERS),
    );
    let (skiff, app) = spawn_fast_path(&ns, &mut cg, &bootstrap, &[]);
    skiff_tests::wait_admin_ready(&ns);

    let line = fastpeer_output(&ns, Some(&app), &["spread", VIP, "--n", "20"]);
    drop(bootstrap);
    assert!(line.starts_with("ok "), "spread to {VIP}: {line}");
    assert_eq!(
        field(&line, "peer"),
        Some(VIP),
        "getpeername6 shows the VIP: {line}"
    );
    let counts = per_backend(&line, &BACKENDS);
    assert_eq!(counts.iter().sum::<usize>(), 20, "{line}");
    assert!(
        counts.iter().all(|c| *c >= 5),
        "round robin over both: {line}"
    );
    assert_eq!(skiff_tests::admin_stat(&ns, CAPTURE_CX), 0);
    assert_eq!(skiff_tests::admin_stat(&ns, "skiff.bpf.fast_path_v6"), 20);
    // At least the one getpeername the client makes (socket2's connect may add its own).
    assert!(skiff_tests::admin_stat(&ns, "skiff.bpf.peername_v6") >= 1);
    let (_, explain) =
        skiff_tests::admin(&ns, "GET", "/debug/explain?dst=%5Bfd00:96::10%5D:80").expect("explain");
    assert!(explain.contains("\"path\": \"kernel\""), "{explain}");
    drop(skiff);
    drop(backends);
}
