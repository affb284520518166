//! Root tests of coexistence: skiff refuses to attach its eBPF capture where other programs
//! already act on the same cgroup hooks (on the cgroup itself or inherited from an ancestor),
//! naming them, and starts anyway with `--allow-coexist`. The foreign programs here are a
//! first skiff's (`skiff_connect4`, ...): real programs on the real hooks.
//!
//! Run: `cargo build -p skiff -p skiff-tests --bins && cargo test -p skiff-tests --features root
//! --test root_coexist -- --test-threads=1` (as root).

use std::path::Path;

use skiff_tests::{
    Cgroup, Child, Netns, TempYaml, assert_no_programs_attached, command_in, passthrough_bootstrap,
    require_root, serial, sidecar_args, sigterm_and_wait, skiff_run, wait_admin_ready,
    wait_admin_ready_on,
};

fn skiff_cmd(ns: &Netns, bootstrap: &Path, args: &[&str]) -> std::process::Command {
    let mut c = skiff_run(ns, bootstrap);
    c.args(args).env("RUST_LOG", "info");
    c
}

/// Runs a skiff that must refuse; returns its stderr.
fn refused(ns: &Netns, bootstrap: &Path, args: &[&str]) -> String {
    let out = skiff_cmd(ns, bootstrap, args)
        .output()
        .expect("run second skiff");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "must refuse with exit 1: {err}");
    err
}

fn bootstrap_file(name: &str) -> TempYaml {
    TempYaml::new(
        name,
        &passthrough_bootstrap(
            "sidecar~127.0.0.1~coexist.default~default.svc.cluster.local",
            "coexist",
        ),
    )
}

#[test]
fn refuses_programs_on_the_same_cgroup_hooks_unless_allowed() {
    let _g = serial();
    let env = require_root();
    let ns1 = Netns::new("coex-a");
    let ns2 = Netns::new("coex-b");
    let mut cg = Cgroup::new(&env, "coex");
    let app = cg.child("app");
    let p1 = cg.child_path("proxy1");
    let p2 = cg.child_path("proxy2");
    let boot = bootstrap_file("coex");

    let first = Child::spawn(&mut skiff_cmd(&ns1, &boot, &sidecar_args(&app, &p1, &[])));
    wait_admin_ready(&ns1);

    let args = sidecar_args(&app, &p2, &[]);
    let err = refused(&ns2, &boot, &args);
    for needle in [
        "skiff_connect4 (id ",
        "on cgroup/connect4 of",
        "skiff_connect6 (id ",
        "skiff_sock_ops (id ",
        "--allow-coexist",
    ] {
        assert!(err.contains(needle), "refusal lacks {needle:?}: {err}");
    }
    assert!(!p2.exists(), "a refused skiff creates no proxy cgroup");

    let mut allowed: Vec<&str> = args.to_vec();
    allowed.push("--allow-coexist");
    let second = Child::spawn(&mut skiff_cmd(&ns2, &boot, &allowed));
    wait_admin_ready(&ns2);
    sigterm_and_wait(second);
    sigterm_and_wait(first);
    assert_no_programs_attached(cg.path());
}

#[test]
fn refuses_programs_inherited_from_an_ancestor_cgroup() {
    let _g = serial();
    let env = require_root();
    let ns1 = Netns::new("coex-node");
    let ns2 = Netns::new("coex-pod");
    let mut cg = Cgroup::new(&env, "coex-anc");
    let app = cg.child("app");
    let node_proxy = cg.child_path("skiff-proxy");
    let p2 = cg.child_path("proxy2");
    let boot = bootstrap_file("coex-anc");

    // A node-mode skiff attaches at the test's node root, the app cgroup's parent.
    let node = Child::spawn(&mut skiff_cmd(
        &ns1,
        &boot,
        &[
            "--mode",
            "node",
            "--cgroup-root",
            cg.path().to_str().unwrap(),
        ],
    ));
    wait_admin_ready(&ns1);
    let err = refused(&ns2, &boot, &sidecar_args(&app, &p2, &[]));
    assert!(
        err.contains("skiff_connect4 (id ") && err.contains(app.to_str().unwrap()),
        "inherited programs must be named: {err}"
    );
    sigterm_and_wait(node);
    assert!(!node_proxy.exists());
    assert_no_programs_attached(cg.path());
}

#[test]
fn refuses_a_second_sk_lookup_program_in_the_network_namespace() {
    let _g = serial();
    let env = require_root();
    let ns = Netns::new("coex-skl");
    // A pod address, so the inbound capture has something to steer.
    ns.add_lo_addr("10.200.9.1/32");
    let mut cg = Cgroup::new(&env, "coex-skl");
    let app1 = cg.child("app1");
    let app2 = cg.child("app2");
    let p1 = cg.child_path("proxy1");
    let p2 = cg.child_path("proxy2");
    let boot = bootstrap_file("coex-skl");

    let first = Child::spawn(&mut skiff_cmd(
        &ns,
        &boot,
        &sidecar_args(&app1, &p1, &["--capture-inbound", "--no-ipv6"]),
    ));
    wait_admin_ready(&ns);

    // A second skiff in the same netns (other cgroups, other ports): its cgroup hooks are
    // free, but the netns already has an sk_lookup program.
    let args = sidecar_args(
        &app2,
        &p2,
        &[
            "--capture-inbound",
            "--no-ipv6",
            "--outbound-port",
            "15101",
            "--inbound-port",
            "15106",
            "--admin",
            "127.0.0.1:15100",
        ],
    );
    let err = refused(&ns, &boot, &args);
    assert!(
        err.contains("skiff_sk_lookup (id ")
            && err.contains("on sk_lookup of /proc/self/ns/net")
            && err.contains("--allow-coexist"),
        "{err}"
    );

    let mut allowed: Vec<&str> = args.to_vec();
    allowed.push("--allow-coexist");
    let second = Child::spawn(&mut skiff_cmd(&ns, &boot, &allowed));
    wait_admin_ready_on(&ns, 15100);
    sigterm_and_wait(second);
    sigterm_and_wait(first);
    assert_no_programs_attached(cg.path());
}

#[test]
fn auto_falls_back_to_iptables_when_the_hooks_are_taken() {
    let _g = serial();
    let env = require_root();
    let ns1 = Netns::new("coex-auto-a");
    let ns2 = Netns::new("coex-auto-b");
    let mut cg = Cgroup::new(&env, "coex-auto");
    let app = cg.child("app");
    let p1 = cg.child_path("proxy1");
    let p2 = cg.child_path("proxy2");
    let boot = bootstrap_file("coex-auto");
    let first = Child::spawn(&mut skiff_cmd(&ns1, &boot, &sidecar_args(&app, &p1, &[])));
    wait_admin_ready(&ns1);

    // --capture auto: this kernel supports eBPF, but the app cgroup's hooks are taken, so the
    // second skiff serves its netns with iptables instead of refusing.
    let second = Child::spawn(&mut skiff_cmd(
        &ns2,
        &boot,
        &sidecar_args(&app, &p2, &["--capture", "auto"]),
    ));
    wait_admin_ready(&ns2);
    let out = command_in(Some(&ns2), None, "iptables-save")
        .args(["-t", "nat"])
        .output()
        .expect("iptables-save");
    let rules = String::from_utf8_lossy(&out.stdout);
    assert!(
        rules.contains("-A OUTPUT -p tcp -j SKIFF_OUTPUT"),
        "{rules}"
    );
    assert!(!p2.exists(), "the eBPF attempt left no proxy cgroup behind");
    sigterm_and_wait(second);
    let out = command_in(Some(&ns2), None, "iptables-save")
        .args(["-t", "nat"])
        .output()
        .expect("iptables-save");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("SKIFF_"));
    sigterm_and_wait(first);
    assert_no_programs_attached(cg.path());
}
