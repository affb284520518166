//! Root end-to-end tests of the iptables fallback (`skiff run --capture iptables`): the same
//! checks as root_e2e's eBPF sidecar test, with Istio-equivalent nat rules in a private netns,
//! plus rule removal on SIGTERM and by `skiff cleanup` after SIGKILL.
//!
//! REDIRECT needs a route to the original destination before the nat OUTPUT hook runs, so the
//! VIPs are addresses on the netns' `lo` (they exist nowhere else).
//!
//! Run: `cargo build -p skiff -p skiff-tests --bins && cargo test -p skiff-tests --features root
//! --test root_iptables -- --test-threads=1` (as root).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use skiff_tests::{
    Child, Netns, admin, admin_stat as stat, built_binary, command_in, field, require_root, serial,
    wait_admin_ready,
};

fn testpeer() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_skiff-testpeer"))
}

const BOOTSTRAP: &str = r#"
node: { id: sidecar~127.0.0.1~ipt.default~default.svc.cluster.local, cluster: ipt }
admin: { address: { socket_address: { address: 127.0.0.1, port_value: 15000 } } }
static_resources:
  listeners:
  - name: virtualOutbound
    address: { socket_address: { address: 0.0.0.0, port_value: 15001 } }
    use_original_dst: true
    filter_chains:
    - name: vip-v4
      filter_chain_match:
        destination_port: 80
        prefix_ranges: [{ address_prefix: 10.96.0.1, prefix_len: 32 }]
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: svc
          cluster: svc
    - name: vip-v6
      filter_chain_match:
        destination_port: 80
        prefix_ranges: [{ address_prefix: "fd00:96::1", prefix_len: 128 }]
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: svc
          cluster: svc
    default_filter_chain:
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: PassthroughCluster
          cluster: PassthroughCluster
  clusters:
  - name: svc
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: svc
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.11, port_value: 8080 } } }
        - endpoint: { address: { socket_address: { address: 127.0.0.12, port_value: 8080 } } }
  - name: PassthroughCluster
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
"#;

struct Scenario {
    // Field order is drop order: processes first, then the netns (which takes its rules along).
    backends: Vec<Child>,
    direct: Child,
    ns: Netns,
    bootstrap: tempfile::TempPath,
}

/// A netns with the VIPs and a "real" 10.96.0.2 host on `lo`, two backends behind the VIP
/// and a listener on 10.96.0.2:80 that only passthrough or bypassed connects reach.
fn scenario(name: &str) -> Scenario {
    require_root();
    let ns = Netns::new(name);
    ns.add_lo_addr("10.96.0.1/32");
    ns.add_lo_addr("10.96.0.2/32");
    ns.add_lo_addr("fd00:96::1/128");
    let mut backends = Vec::new();
    for addr in ["127.0.0.11:8080", "127.0.0.12:8080"] {
        let mut b = Child::spawn(command_in(Some(&ns), None, testpeer()).args(["origdst", addr]));
        b.expect_line("ready", Duration::from_secs(5));
        backends.push(b);
    }
    let mut direct =
        Child::spawn(command_in(Some(&ns), None, testpeer()).args(["origdst", "10.96.0.2:80"]));
    direct.expect_line("ready", Duration::from_secs(5));
    let file = tempfile::Builder::new()
        .prefix(&skiff_tests::test_name(name))
        .suffix(".yaml")
        .tempfile()
        .expect("temp bootstrap");
    std::fs::write(file.path(), BOOTSTRAP).expect("write bootstrap");
    Scenario {
        backends,
        direct,
        ns,
        bootstrap: file.into_temp_path(),
    }
}

fn client(ns: &Netns, addr: &str) -> String {
    let out = command_in(Some(ns), None, testpeer())
        .args(["client", addr, "--bytes", "65536", "--timeout-ms", "3000"])
        .output()
        .expect("run client");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn skiff(s: &Scenario, args: &[&str]) -> Child {
    let mut c = command_in(Some(&s.ns), None, built_binary("skiff"));
    c.arg("run")
        .arg("--bootstrap")
        .arg(&s.bootstrap)
        .args(args)
        .env("RUST_LOG", "info,skiff=debug");
    Child::spawn(&mut c)
}

fn signal(p: &Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid() as i32), sig).expect("signal skiff");
}

/// The nat table of both iptables implementations and families inside `ns`.
fn nat_rules(ns: &Netns) -> String {
    let mut all = String::new();
    for tool in [
        "iptables-nft-save",
        "iptables-legacy-save",
        "ip6tables-nft-save",
        "ip6tables-legacy-save",
    ] {
        let out = command_in(Some(ns), None, tool)
            .args(["-t", "nat"])
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e} (install iptables: `cargo xtask setup`)"));
        all.push_str(&format!("## {tool}\n"));
        all.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    all
}

fn skiff_chains(ns: &Netns) -> Vec<String> {
    nat_rules(ns)
        .lines()
        .filter(|l| l.contains("SKIFF_"))
        .map(str::to_string)
        .collect()
}

fn cleanup(ns: &Netns) -> (bool, String) {
    let out = command_in(Some(ns), None, built_binary("skiff"))
        .arg("cleanup")
        .output()
        .expect("run skiff cleanup");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn iptables_mode_proxies_captured_connects_and_removes_its_rules_on_sigterm() {
    let _g = serial();
    let mut s = scenario("ipt-e2e");
    let mut proxy = skiff(&s, &["--capture", "iptables", "--exclude-ports", "9999"]);
    wait_admin_ready(&s.ns);

    // Istio-equivalent chains, only in this netns.
    let rules = nat_rules(&s.ns);
    for needle in [
        "-A OUTPUT -p tcp -j SKIFF_OUTPUT",
        "-A SKIFF_OUTPUT -m mark --mark 0x539 -j RETURN",
        "-A SKIFF_OUTPUT -d 127.0.0.0/8 -j RETURN",
        "--dport 9999 -j RETURN",
        "-A SKIFF_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A SKIFF_OUTPUT -d ::1/128 -j RETURN",
    ] {
        assert!(rules.contains(needle), "missing {needle:?} in\n{rules}");
    }
    assert!(
        !rules.contains("PREROUTING -p tcp -j SKIFF_INBOUND"),
        "no inbound rules without --capture-inbound:\n{rules}"
    );

    // v4 VIP: round robin over both backends, bytes intact both ways.
    for i in 0..4 {
        let out = client(&s.ns, "10.96.0.1:80");
        assert!(out.starts_with("ok "), "connect {i} to the VIP: {out}");
        assert_eq!(field(&out, "echoed"), Some("65536"), "{out}");
    }
    for b in &mut s.backends {
        for _ in 0..2 {
            let line = b.expect_line("accepted", Duration::from_secs(5));
            // The backend sees skiff's own connect, which nothing redirected (conntrack
            // reports an unchanged destination, or none).
            assert!(not_redirected(&line), "{line}");
        }
    }
    assert_eq!(stat(&s.ns, "cluster.svc.upstream_cx_total"), 4);

    // v6 VIP through ip6tables REDIRECT to [::1]:15001.
    let out = client(&s.ns, "[fd00:96::1]:80");
    assert!(out.starts_with("ok "), "v6 VIP: {out}");
    assert_eq!(stat(&s.ns, "cluster.svc.upstream_cx_total"), 5);

    // Passthrough: skiff's upstream connect carries the mark and is not captured again.
    let out = client(&s.ns, "10.96.0.2:80");
    assert!(out.starts_with("ok "), "passthrough: {out}");
    let line = s.direct.expect_line("accepted", Duration::from_secs(5));
    assert!(
        not_redirected(&line),
        "skiff's connect must not be redirected again: {line}"
    );
    assert_eq!(
        stat(&s.ns, "cluster.PassthroughCluster.upstream_cx_total"),
        1
    );

    // Excluded port: the kernel's own refusal, skiff sees nothing.
    let before = stat(&s.ns, "listener.127.0.0.1:15001.downstream_cx_total");
    let out = client(&s.ns, "10.96.0.2:9999");
    assert!(out.contains("stage=connect"), "excluded port: {out}");
    assert_eq!(field(&out, "errno"), Some("111"), "{out}");
    assert_eq!(
        stat(&s.ns, "listener.127.0.0.1:15001.downstream_cx_total"),
        before
    );
    let (code, _) = admin(&s.ns, "GET", "/ready").expect("admin");
    assert_eq!(code, 200);
    // nat rules see the first packet of each connection: one count per captured connect
    // (4 to the VIP and 1 passthrough over IPv4, 1 over IPv6).
    assert_eq!(stat(&s.ns, "skiff.iptables.v4.outbound_redirected"), 5);
    assert_eq!(stat(&s.ns, "skiff.iptables.v6.outbound_redirected"), 1);

    // Drain (Envoy's /drain_listeners): the rules go, connects fail open to their destination.
    let (code, _) = admin(&s.ns, "POST", "/drain_listeners").expect("admin");
    assert_eq!(code, 200);
    let left = skiff_chains(&s.ns);
    assert!(left.is_empty(), "rules left after drain: {left:#?}");
    let out = client(&s.ns, "10.96.0.2:80");
    assert!(out.starts_with("ok "), "fail-open: {out}");
    s.direct.expect_line("accepted", Duration::from_secs(5));
    assert_eq!(
        stat(&s.ns, "cluster.PassthroughCluster.upstream_cx_total"),
        1,
        "a drained skiff sees no new connects"
    );

    // SIGTERM: skiff removes exactly its rules and exits 0.
    signal(&proxy, nix::sys::signal::Signal::SIGTERM);
    let (status, _) = std::mem::replace(&mut proxy, placeholder()).wait(Duration::from_secs(15));
    assert!(status.success(), "skiff exited with {status}");
    let left = skiff_chains(&s.ns);
    assert!(left.is_empty(), "rules left after SIGTERM: {left:#?}");
    // With the rules gone the VIP is just a local address again: nothing listens on :80.
    let out = client(&s.ns, "10.96.0.1:80");
    assert!(out.starts_with("err stage=connect"), "after exit: {out}");
}

#[test]
fn cleanup_removes_what_a_killed_skiff_left_and_is_idempotent() {
    let _g = serial();
    let s = scenario("ipt-kill");
    let proxy = skiff(&s, &["--capture", "iptables"]);
    wait_admin_ready(&s.ns);
    assert!(!skiff_chains(&s.ns).is_empty(), "rules installed");
    signal(&proxy, nix::sys::signal::Signal::SIGKILL);
    let (status, _) = proxy.wait(Duration::from_secs(10));
    assert!(!status.success());
    let left = skiff_chains(&s.ns);
    assert!(
        left.iter().any(|l| l.contains("-j SKIFF_OUTPUT")),
        "SIGKILL leaves the rules: {left:#?}"
    );

    // A new skiff refuses to start over leftovers and says what to run.
    let out = command_in(Some(&s.ns), None, built_binary("skiff"))
        .args(["run", "--capture", "iptables", "--bootstrap"])
        .arg(&s.bootstrap)
        .output()
        .expect("run skiff");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must refuse: {err}");
    assert!(
        err.contains("skiff cleanup") && err.contains("SKIFF_OUTPUT"),
        "{err}"
    );

    let (ok, text) = cleanup(&s.ns);
    assert!(ok, "cleanup failed: {text}");
    assert!(text.contains("-D OUTPUT -p tcp -j SKIFF_OUTPUT"), "{text}");
    let left = skiff_chains(&s.ns);
    assert!(left.is_empty(), "rules left after cleanup: {left:#?}");
    // Idempotent: a second run finds nothing and succeeds.
    let (ok, text) = cleanup(&s.ns);
    assert!(ok && text.contains("nothing to remove"), "{text}");
}

#[test]
fn auto_without_a_cgroup_falls_back_to_iptables() {
    let _g = serial();
    let s = scenario("ipt-auto");
    let mut proxy = skiff(&s, &["--capture", "auto"]);
    wait_admin_ready(&s.ns);
    let rules = nat_rules(&s.ns);
    assert!(
        rules.contains("-j SKIFF_OUTPUT"),
        "auto without --cgroup must install iptables rules:\n{rules}"
    );
    let out = client(&s.ns, "10.96.0.1:80");
    assert!(out.starts_with("ok "), "{out}");
    signal(&proxy, nix::sys::signal::Signal::SIGTERM);
    let (status, _) = std::mem::replace(&mut proxy, placeholder()).wait(Duration::from_secs(15));
    assert!(status.success(), "{status}");
    assert!(skiff_chains(&s.ns).is_empty());
}

/// A testpeer `accepted` line of a connection that reached its listener undiverted.
fn not_redirected(line: &str) -> bool {
    match field(line, "orig_dst") {
        None => true,
        Some(o) => Some(o) == field(line, "local"),
    }
}

fn placeholder() -> Child {
    Child::spawn(Command::new("true").arg("placeholder"))
}

#[test]
fn auto_with_a_cgroup_on_this_kernel_uses_ebpf() {
    let _g = serial();
    let s = scenario("ipt-auto-bpf");
    let env = require_root();
    let mut cg = skiff_tests::Cgroup::new(&env, "ipt-auto-bpf");
    let app = cg.child("app");
    let proxy_cg = cg.child_path("proxy");
    let mut proxy = skiff(
        &s,
        &[
            "--capture",
            "auto",
            "--cgroup",
            app.to_str().unwrap(),
            "--proxy-cgroup",
            proxy_cg.to_str().unwrap(),
        ],
    );
    wait_admin_ready(&s.ns);
    assert!(
        skiff_chains(&s.ns).is_empty(),
        "auto must pick eBPF here, not iptables"
    );
    let tree = skiff_tests::bpftool_cgroup_tree(cg.path());
    assert!(tree.contains("connect4"), "{tree}");
    let out = command_in(Some(&s.ns), Some(&app), testpeer())
        .args(["client", "10.96.0.1:80", "--timeout-ms", "3000"])
        .output()
        .expect("client");
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.starts_with("ok "), "{out}");
    signal(&proxy, nix::sys::signal::Signal::SIGTERM);
    let (status, _) = std::mem::replace(&mut proxy, placeholder()).wait(Duration::from_secs(15));
    assert!(status.success(), "{status}");
    skiff_tests::assert_no_programs_attached(cg.path());
}
