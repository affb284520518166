//! Root tests of `--sockmap`: the real `skiff` binary in a private netns with cgroups this
//! test creates; payload between local sockets on policy ports moves socket-to-socket
//! (sk_msg), and the bytes must arrive intact whatever the write sizes.
//!
//! Run: `cargo build -p skiff -p skiff-tests --bins && cargo test -p skiff-tests --features root
//! --test root_sockmap -- --test-threads=1` (as root), or `cargo xtask test`.

use std::path::{Path, PathBuf};
use std::process::Command;

use skiff_tests::{
    Cgroup, Child, Netns, TempYaml, admin_stat as stat, assert_no_programs_attached, built_binary,
    field, require_root, serial, sigterm_and_wait, skiff_run, spawn_testpeer, testpeer_output,
    wait_admin_ready,
};

const BOOTSTRAP: &str = r#"
node: { id: sidecar~127.0.0.1~sockmap.default~default.svc.cluster.local, cluster: sockmap }
admin: { address: { socket_address: { address: 127.0.0.1, port_value: 15000 } } }
static_resources:
  listeners:
  - name: virtualOutbound
    address: { socket_address: { address: 0.0.0.0, port_value: 15001 } }
    use_original_dst: true
    filter_chains:
    - name: accelerated
      filter_chain_match:
        destination_port: 80
        prefix_ranges: [{ address_prefix: 10.96.0.1, prefix_len: 32 }]
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: fast
          cluster: fast
    - name: plain
      filter_chain_match:
        destination_port: 81
        prefix_ranges: [{ address_prefix: 10.96.0.1, prefix_len: 32 }]
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: plain
          cluster: plain
  clusters:
  - name: fast
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: fast
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.11, port_value: 8080 } } }
  - name: plain
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: plain
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.12, port_value: 8081 } } }
"#;

struct Scenario {
    // Field order is drop order: processes first, then cgroups, the netns and the bootstrap.
    skiff: Option<Child>,
    _backends: Vec<Child>,
    ns: Netns,
    cg: Cgroup,
    app: PathBuf,
    _bootstrap: TempYaml,
}

/// skiff with `--sockmap` on service port 80 and backend port 8080 in sidecar mode; the
/// backends run in the app cgroup, as a same-node pod whose sockets the programs see.
fn scenario(name: &str) -> Scenario {
    let env = require_root();
    let ns = Netns::new(name);
    let mut cg = Cgroup::new(&env, name);
    let app = cg.child("app");
    let proxy_cg = cg.child_path("proxy");
    let backends = ["127.0.0.11:8080", "127.0.0.12:8081"]
        .iter()
        .map(|addr| spawn_testpeer(&ns, Some(&app), &["echo", addr]))
        .collect();
    let bootstrap = TempYaml::new(name, BOOTSTRAP);
    let skiff = Child::spawn(
        skiff_run(&ns, &bootstrap)
            .arg("--cgroup")
            .arg(&app)
            .arg("--proxy-cgroup")
            .arg(&proxy_cg)
            .args(["--sockmap", "--sockmap-ports", "80,8080"]),
    );
    wait_admin_ready(&ns);
    Scenario {
        skiff: Some(skiff),
        _backends: backends,
        ns,
        cg,
        app,
        _bootstrap: bootstrap,
    }
}

fn client(ns: &Netns, cgroup: &Path, addr: &str, bytes: usize, seed: u64) -> String {
    testpeer_output(
        ns,
        Some(cgroup),
        &[
            "client",
            addr,
            "--timeout-ms",
            "10000",
            "--bytes",
            &bytes.to_string(),
            "--chunk-seed",
            &seed.to_string(),
        ],
    )
}

/// The sockmap counters, for failure messages.
fn sockmap_stats(ns: &Netns) -> String {
    ["added", "add_failed", "redirected", "no_peer"]
        .iter()
        .map(|n| format!("{n}={}", stat(ns, &format!("skiff.bpf.sockmap.{n}"))))
        .collect::<Vec<_>>()
        .join(" ")
}

fn stop(s: &mut Scenario) {
    sigterm_and_wait(s.skiff.take().expect("skiff running"));
}

#[test]
fn accelerated_pairs_keep_every_byte_in_order_whatever_the_write_sizes() {
    let _g = serial();
    let mut s = scenario("sockmap-integrity");

    // Captured app -> proxy (service port 80) and proxy -> backend (port 8080): four sockets
    // join the map per connection, and payload both ways is redirected socket-to-socket.
    let mut seeds = 0x5eed_u64;
    for (i, bytes) in [1usize, 63, 1024, 65_537, 1 << 20, 3 << 20]
        .into_iter()
        .enumerate()
    {
        seeds = seeds
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let out = client(&s.ns, &s.app, "10.96.0.1:80", bytes, seeds);
        assert!(
            out.starts_with("ok "),
            "connect {i} ({bytes} B): {out}; {}",
            sockmap_stats(&s.ns)
        );
        assert_eq!(field(&out, "same"), Some("yes"), "{out}");
        assert_eq!(
            field(&out, "echoed"),
            Some(bytes.to_string().as_str()),
            "{out}"
        );
    }
    let added = stat(&s.ns, "skiff.bpf.sockmap.added");
    let redirected = stat(&s.ns, "skiff.bpf.sockmap.redirected");
    assert_eq!(
        added,
        6 * 4,
        "app, proxy accept, proxy upstream and backend sockets"
    );
    assert!(redirected > 0, "no message was redirected");
    assert_eq!(stat(&s.ns, "skiff.bpf.sockmap.add_failed"), 0);
    assert_eq!(stat(&s.ns, "cluster.fast.upstream_cx_total"), 6);

    // Port 81 -> 8081 is not in the policy: same proxy, ordinary TCP, nothing joins the map.
    let out = client(&s.ns, &s.app, "10.96.0.1:81", 200_000, 7);
    assert!(out.starts_with("ok "), "plain: {out}");
    assert_eq!(field(&out, "same"), Some("yes"), "{out}");
    assert_eq!(stat(&s.ns, "skiff.bpf.sockmap.added"), added);
    assert_eq!(stat(&s.ns, "cluster.plain.upstream_cx_total"), 1);

    stop(&mut s);
    assert_no_programs_attached(s.cg.path());
}

#[test]
fn sockmap_without_ports_is_a_usage_error() {
    let _g = serial();
    let out = Command::new(built_binary("skiff"))
        .args(["run", "--sockmap", "--capture", "none"])
        .output()
        .expect("run skiff");
    assert_eq!(out.status.code(), Some(2), "clap usage errors exit 2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--sockmap-ports"), "{err}");
}
