//! Root end-to-end tests of the iptables fallback (`skiff run --capture iptables`): the same
//! checks as root_e2e's eBPF sidecar test, with Istio-equivalent nat rules in a private netns,
//! plus rule removal on SIGTERM and by `skiff cleanup` after SIGKILL.
//!
//! REDIRECT needs a route to the original destination before the nat OUTPUT hook runs, so the
//! VIPs are addresses on the netns' `lo` (they exist nowhere else).
//!
//! Run: `cargo build -p skiff -p skiff-tests --bins && cargo test -p skiff-tests --features root
//! --test root_iptables -- --test-threads=1` (as root).

use std::time::Duration;

use nix::sys::signal::Signal;
use skiff_tests::{
    Child, Netns, TempYaml, admin, admin_stat as stat, built_binary, command_in, field,
    require_root, serial, sidecar_args, sigterm_and_wait, skiff_run, spawn_testpeer,
    testpeer_output, vip_bootstrap, wait_admin_ready,
};

struct Scenario {
    // Field order is drop order: processes first, then the netns (which takes its rules along).
    backends: Vec<Child>,
    direct: Child,
    ns: Netns,
    bootstrap: TempYaml,
}

/// A netns with the VIPs and a "real" 10.96.0.2 host on `lo`, two backends behind the VIP
/// and a listener on 10.96.0.2:80 that only passthrough or bypassed connects reach.
fn scenario(name: &str) -> Scenario {
    require_root();
    let ns = Netns::new(name);
    ns.add_lo_addr("10.96.0.1/32");
    ns.add_lo_addr("10.96.0.2/32");
    ns.add_lo_addr("fd00:96::1/128");
    let backends = ["127.0.0.11:8080", "127.0.0.12:8080"]
        .iter()
        .map(|addr| spawn_testpeer(&ns, None, &["origdst", addr]))
        .collect();
    let direct = spawn_testpeer(&ns, None, &["origdst", "10.96.0.2:80"]);
    let bootstrap = TempYaml::new(name, &vip_bootstrap("ipt"));
    Scenario {
        backends,
        direct,
        ns,
        bootstrap,
    }
}

fn client(ns: &Netns, addr: &str) -> String {
    testpeer_output(
        ns,
        None,
        &["client", addr, "--bytes", "65536", "--timeout-ms", "3000"],
    )
}

fn skiff(s: &Scenario, args: &[&str]) -> Child {
    Child::spawn(skiff_run(&s.ns, &s.bootstrap).args(args))
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
    let proxy = skiff(&s, &["--capture", "iptables", "--exclude-ports", "9999"]);
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
    let before = stat(&s.ns, "listener.127.0.0.1_15001.downstream_cx_total");
    let out = client(&s.ns, "10.96.0.2:9999");
    assert!(out.contains("stage=connect"), "excluded port: {out}");
    assert_eq!(field(&out, "errno"), Some("111"), "{out}");
    assert_eq!(
        stat(&s.ns, "listener.127.0.0.1_15001.downstream_cx_total"),
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
    sigterm_and_wait(proxy);
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
    proxy.signal(Signal::SIGKILL);
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
    let proxy = skiff(&s, &["--capture", "auto"]);
    wait_admin_ready(&s.ns);
    let rules = nat_rules(&s.ns);
    assert!(
        rules.contains("-j SKIFF_OUTPUT"),
        "auto without --cgroup must install iptables rules:\n{rules}"
    );
    let out = client(&s.ns, "10.96.0.1:80");
    assert!(out.starts_with("ok "), "{out}");
    sigterm_and_wait(proxy);
    assert!(skiff_chains(&s.ns).is_empty());
}

/// A testpeer `accepted` line of a connection that reached its listener undiverted.
fn not_redirected(line: &str) -> bool {
    match field(line, "orig_dst") {
        None => true,
        Some(o) => Some(o) == field(line, "local"),
    }
}

#[test]
fn auto_with_a_cgroup_on_this_kernel_uses_ebpf() {
    let _g = serial();
    let s = scenario("ipt-auto-bpf");
    let env = require_root();
    let mut cg = skiff_tests::Cgroup::new(&env, "ipt-auto-bpf");
    let app = cg.child("app");
    let proxy_cg = cg.child_path("proxy");
    let proxy = skiff(&s, &sidecar_args(&app, &proxy_cg, &["--capture", "auto"]));
    wait_admin_ready(&s.ns);
    assert!(
        skiff_chains(&s.ns).is_empty(),
        "auto must pick eBPF here, not iptables"
    );
    let tree = skiff_tests::bpftool_cgroup_tree(cg.path());
    assert!(tree.contains("connect4"), "{tree}");
    let out = testpeer_output(
        &s.ns,
        Some(&app),
        &["client", "10.96.0.1:80", "--timeout-ms", "3000"],
    );
    assert!(out.starts_with("ok "), "{out}");
    sigterm_and_wait(proxy);
    skiff_tests::assert_no_programs_attached(cg.path());
}
