//! Root end-to-end test of the kernel fast path for IPv6 services: the real `skiff run
//! --fast-path` in a private network namespace (loopback only, two IPv6 addresses on lo) and
//! cgroups this test creates. connect6 sends connects to an IPv6 VIP straight to IPv6 backends,
//! and getpeername6 shows the VIP to the application.
//!
//! Run: `cargo build -p skiff -p skiff-tests --bins && cargo test -p skiff-tests --features root
//! --test root_fastpath_v6 -- --test-threads=1` (as root).

use std::path::PathBuf;
use std::time::Duration;

use skiff_tests::{Cgroup, Child, Netns, built_binary, command_in, field, require_root, serial};

fn fastpeer() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_skiff-fastpeer"))
}

const VIP: &str = "[fd00:96::10]:80";
const BACKENDS: [&str; 2] = ["[fd00::21]:8080", "[fd00::22]:8080"];
const CAPTURE_CX: &str = "listener.[::1]:15001.downstream_cx_total";

const BOOTSTRAP: &str = r#"
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: 15000 } }
static_resources:
  listeners:
  - name: virtualOutbound
    address: { socket_address: { address: 0.0.0.0, port_value: 15001 } }
    use_original_dst: true
    filter_chains:
    - name: six
      filter_chain_match:
        destination_port: 80
        prefix_ranges: [{ address_prefix: "fd00:96::10", prefix_len: 128 }]
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: six
          cluster: six
  clusters:
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
    let env = require_root();
    let name = "fp-v6";
    let ns = Netns::new(name);
    ns.add_lo_addr("fd00::21/128");
    ns.add_lo_addr("fd00::22/128");
    let mut cg = Cgroup::new(&env, name);
    let mut backends = Child::spawn(
        command_in(Some(&ns), None, fastpeer())
            .arg("serve")
            .args(BACKENDS),
    );
    backends.expect_line("ready", Duration::from_secs(5));
    let bootstrap = std::env::temp_dir().join(format!("{}.yaml", skiff_tests::test_name(name)));
    std::fs::write(&bootstrap, BOOTSTRAP).expect("write bootstrap");
    let app = cg.child("app");
    let proxy_cg = cg.child_path("proxy");
    let skiff = Child::spawn(
        command_in(Some(&ns), None, built_binary("skiff"))
            .arg("run")
            .arg("--bootstrap")
            .arg(&bootstrap)
            .args(["--fast-path", "--cgroup"])
            .arg(&app)
            .arg("--proxy-cgroup")
            .arg(&proxy_cg)
            .env("RUST_LOG", "info,skiff=debug"),
    );
    skiff_tests::wait_admin_ready(&ns);

    let out = command_in(Some(&ns), Some(&app), fastpeer())
        .args(["spread", VIP, "--n", "20"])
        .output()
        .expect("run spread");
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let _ = std::fs::remove_file(&bootstrap);
    assert!(line.starts_with("ok "), "spread to {VIP}: {line}");
    assert_eq!(
        field(&line, "peer"),
        Some(VIP),
        "getpeername6 shows the VIP: {line}"
    );
    let counts: Vec<usize> = BACKENDS
        .iter()
        .map(|b| field(&line, b).and_then(|v| v.parse().ok()).unwrap_or(0))
        .collect();
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
