//! Root end-to-end tests of the kernel fast path: the real `skiff run --fast-path` in a private
//! network namespace (loopback only) and cgroups this test creates. Plain-TCP services are
//! connected straight to a backend by connect4; skiff's listener never sees them.
//!
//! Run: `cargo build -p skiff -p skiff-tests --bins && cargo test -p skiff-tests --features root
//! --test root_fastpath -- --test-threads=1` (as root).

use std::path::{Path, PathBuf};
use std::time::Duration;

use skiff_tests::{
    Cgroup, Child, Netns, assert_no_programs_attached, built_binary, command_in, field,
    require_root, serial,
};

fn testpeer() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_skiff-testpeer"))
}

const BACKENDS: [&str; 3] = ["127.0.0.21:8080", "127.0.0.22:8080", "127.0.0.23:8080"];
const CAPTURE_CX: &str = "listener.127.0.0.1:15001.downstream_cx_total";

/// 10.96.0.10 (ROUND_ROBIN) and 10.96.0.12 (RANDOM): plain tcp_proxy, fast path.
/// 10.96.0.11: HTTP connection manager, stays in the proxy.
const BOOTSTRAP: &str = r#"
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: 15000 } }
static_resources:
  listeners:
  - name: virtualOutbound
    address: { socket_address: { address: 0.0.0.0, port_value: 15001 } }
    use_original_dst: true
    filter_chains:
    - name: rr
      filter_chain_match:
        destination_port: 80
        prefix_ranges: [{ address_prefix: 10.96.0.10, prefix_len: 32 }]
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: rr
          cluster: rr
    - name: rnd
      filter_chain_match:
        destination_port: 80
        prefix_ranges: [{ address_prefix: 10.96.0.12, prefix_len: 32 }]
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: rnd
          cluster: rnd
    - name: http
      filter_chain_match:
        destination_port: 80
        prefix_ranges: [{ address_prefix: 10.96.0.11, prefix_len: 32 }]
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: http
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: rr }
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: rr
    type: STATIC
    lb_policy: ROUND_ROBIN
    connect_timeout: 1s
    load_assignment:
      cluster_name: rr
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.21, port_value: 8080 } } }
        - endpoint: { address: { socket_address: { address: 127.0.0.22, port_value: 8080 } } }
        - endpoint: { address: { socket_address: { address: 127.0.0.23, port_value: 8080 } } }
  - name: rnd
    type: STATIC
    lb_policy: RANDOM
    connect_timeout: 1s
    load_assignment:
      cluster_name: rnd
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.21, port_value: 8080 } } }
        - endpoint: { address: { socket_address: { address: 127.0.0.22, port_value: 8080 } } }
        - endpoint: { address: { socket_address: { address: 127.0.0.23, port_value: 8080 } } }
"#;

fn admin(ns: &Netns, path: &str) -> Option<(u16, String)> {
    skiff_tests::admin(ns, "GET", path)
}

fn stat(ns: &Netns, name: &str) -> u64 {
    skiff_tests::admin_stat(ns, name)
}

fn wait_ready(ns: &Netns) {
    skiff_tests::wait_admin_ready(ns)
}

struct Scenario {
    // Field order is drop order: processes first, then cgroups and the netns.
    skiff: Option<Child>,
    backends: Vec<Child>,
    ns: Netns,
    cg: Cgroup,
    bootstrap: PathBuf,
}

impl Drop for Scenario {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.bootstrap);
    }
}

fn scenario(name: &str) -> (Scenario, PathBuf) {
    let env = require_root();
    let ns = Netns::new(name);
    let mut cg = Cgroup::new(&env, name);
    let mut backends = Vec::new();
    for addr in BACKENDS {
        let mut b = Child::spawn(command_in(Some(&ns), None, testpeer()).args(["origdst", addr]));
        b.expect_line("ready", Duration::from_secs(5));
        backends.push(b);
    }
    let bootstrap = std::env::temp_dir().join(format!("{}.yaml", skiff_tests::test_name(name)));
    std::fs::write(&bootstrap, BOOTSTRAP).expect("write bootstrap");
    let app = cg.child("app");
    let proxy_cg = cg.child_path("proxy");
    let mut cmd = command_in(Some(&ns), None, built_binary("skiff"));
    cmd.arg("run")
        .arg("--bootstrap")
        .arg(&bootstrap)
        .args(["--fast-path", "--cgroup"])
        .arg(&app)
        .arg("--proxy-cgroup")
        .arg(&proxy_cg)
        .env("RUST_LOG", "info,skiff=debug");
    let skiff = Child::spawn(&mut cmd);
    let s = Scenario {
        skiff: Some(skiff),
        backends,
        ns,
        cg,
        bootstrap,
    };
    wait_ready(&s.ns);
    (s, app)
}

fn client(ns: &Netns, cgroup: &Path, addr: &str) -> String {
    let out = command_in(Some(ns), Some(cgroup), testpeer())
        .args(["client", addr, "--bytes", "4096", "--timeout-ms", "3000"])
        .output()
        .expect("run client");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `n` connects to `vip`; every one must reach a backend directly (the backend's peer is the
/// client's own address, and the app's getpeername shows the VIP). Returns connects per backend.
fn spread(s: &mut Scenario, app: &Path, vip: &str, n: usize) -> [usize; 3] {
    let mut counts = [0usize; 3];
    for i in 0..n {
        let out = client(&s.ns, app, vip);
        assert!(out.starts_with("ok "), "connect {i} to {vip}: {out}");
        assert_eq!(field(&out, "same"), Some("yes"), "{out}");
        assert_eq!(
            field(&out, "peer"),
            Some(vip),
            "getpeername shows the VIP: {out}"
        );
        let local = field(&out, "local").expect("client local").to_string();
        let mut hit = None;
        for (b, backend) in s.backends.iter_mut().enumerate() {
            if let Some(line) = backend.try_line("accepted", Duration::from_millis(300)) {
                assert_eq!(
                    field(&line, "peer"),
                    Some(local.as_str()),
                    "backend {b} saw {line}"
                );
                assert!(hit.is_none(), "two backends accepted connect {i}");
                hit = Some(b);
                break;
            }
        }
        counts[hit.unwrap_or_else(|| panic!("no backend accepted connect {i} ({out})"))] += 1;
    }
    counts
}

/// Pearson's chi-square against a uniform spread over 3 backends.
fn chi_square(counts: [usize; 3]) -> f64 {
    let n: usize = counts.iter().sum();
    let e = n as f64 / 3.0;
    counts.iter().map(|&o| (o as f64 - e).powi(2) / e).sum()
}

/// chi-square, 2 degrees of freedom, p = 0.001.
const CHI2_BOUND: f64 = 13.82;

#[test]
fn plain_tcp_services_connect_straight_to_backends_and_l7_stays_in_the_proxy() {
    let _g = serial();
    let (mut s, app) = scenario("fp-spread");

    let rr = spread(&mut s, &app, "10.96.0.10:80", 30);
    assert!(chi_square(rr) < CHI2_BOUND, "round robin spread {rr:?}");
    assert!(
        rr.iter().all(|&c| c > 0),
        "round robin reaches every backend: {rr:?}"
    );
    let rnd = spread(&mut s, &app, "10.96.0.12:80", 45);
    assert!(chi_square(rnd) < CHI2_BOUND, "random spread {rnd:?}");

    // Not one of them went through skiff.
    assert_eq!(stat(&s.ns, CAPTURE_CX), 0);
    assert_eq!(stat(&s.ns, "skiff.bpf.fast_path_v4"), 75);
    assert_eq!(stat(&s.ns, "cluster.rr.upstream_cx_total"), 0);

    // The HTTP service still goes to the proxy.
    let _ = client(&s.ns, &app, "10.96.0.11:80");
    assert_eq!(stat(&s.ns, CAPTURE_CX), 1);
    for b in &mut s.backends {
        assert!(b.try_line("accepted", Duration::from_millis(300)).is_none());
    }

    // Explain agrees.
    let (code, body) = admin(&s.ns, "/debug/explain?dst=10.96.0.10:80").expect("explain");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"path\": \"kernel\""), "{body}");
    let (_, body) = admin(&s.ns, "/debug/explain?dst=10.96.0.11:80").expect("explain");
    assert!(body.contains("\"path\": \"proxy\""), "{body}");

    // `skiff maps` (the CLI over /debug/maps) shows the fast-path service and its endpoints.
    let out = command_in(Some(&s.ns), None, built_binary("skiff"))
        .arg("maps")
        .output()
        .expect("skiff maps");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "skiff maps: {out:?}");
    assert!(
        text.contains("10.96.0.10"),
        "skiff maps lacks the VIP:\n{text}"
    );

    // SIGTERM: skiff detaches everything and removes its proxy cgroup.
    let skiff = s.skiff.take().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(skiff.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM skiff");
    let (status, _) = skiff.wait(Duration::from_secs(15));
    assert!(status.success(), "skiff exited with {status}");
    assert_no_programs_attached(s.cg.path());
}
