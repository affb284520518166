//! Root test of node mode with `--fast-path`: each pod pipeline is a scope of its own in the
//! kernel maps. Two pods (cgroups under a node root and one netns each, created here) have
//! different endpoints for the same VIP 10.96.0.1:80; each pod's connects go straight (in the
//! kernel, not through its pipeline's listener) to its own endpoint only. Removing a pod removes
//! its scope's entries while the other pod keeps its own.
//!
//! Run: `cargo build -p skiff -p skiff-tests --bins && cargo test -p skiff-tests --features root
//! --test root_fastpath_pods -- --test-threads=1` (as root).

use std::path::Path;
use std::time::{Duration, Instant};

use skiff_tests::fastpath::scope_services;
use skiff_tests::pods::{
    A, ADS_CLUSTERS, ADS_LISTENERS, B, TwoPods, VIP, add_pod, backends_in, node_bootstrap,
    node_skiff, vip_client as client,
};
use skiff_tests::{
    Cgroup, Child, Netns, TempYaml, assert_no_programs_attached, built_binary, command_in, field,
    require_root, serial, sigterm_and_wait, skiff_node as node, wait_admin_ready,
};

/// Polls `/debug/maps` until the pod scopes serve exactly `want` (scope order), as
/// `(vip, endpoints)` per scope.
fn wait_scopes(ns: &Netns, want: &[(&str, &[&str])]) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = Vec::new();
    while Instant::now() < deadline {
        last = scope_services(ns, 15000);
        let got: Vec<(String, Vec<String>)> = last
            .iter()
            .map(|(_, v, e)| (v.clone(), e.clone()))
            .collect();
        let wanted: Vec<(String, Vec<String>)> = want
            .iter()
            .map(|(v, e)| (v.to_string(), e.iter().map(|s| s.to_string()).collect()))
            .collect();
        if got == wanted {
            return last.iter().map(|(s, _, _)| *s).collect();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("pod scopes in the kernel: wanted {want:?}, last {last:?}");
}

/// One connect from `pod`; it must land on `backend` (and not on `other`) directly.
fn reaches(ns: &Netns, pod: &Path, backends: &mut [Child; 2], mine: usize) {
    let out = client(ns, pod);
    assert!(out.starts_with("ok "), "connect to {VIP}: {out}");
    assert_eq!(
        field(&out, "peer"),
        Some(VIP),
        "getpeername shows the VIP: {out}"
    );
    let local = field(&out, "local").expect("client local").to_string();
    let line = backends[mine].expect_line("accepted", Duration::from_secs(5));
    // The backend's peer is the client itself: no proxy in between.
    assert_eq!(field(&line, "peer"), Some(local.as_str()), "{line}");
    assert!(
        backends[1 - mine]
            .try_line("accepted", Duration::from_millis(200))
            .is_none(),
        "a connect reached the other pod's endpoint"
    );
}

#[test]
fn each_pod_reaches_only_its_own_endpoints_in_the_kernel() {
    let _g = serial();
    // Both endpoints exist in each pod's netns: the one a connect reaches shows whose
    // configuration the kernel used.
    let TwoPods {
        node_ns,
        ns: [ns1, ns2],
        cg,
        pods: [pod1, pod2],
        backends: [mut b1, mut b2],
        node_boot: _node_boot,
        boots: [boot1, boot2],
        proxy,
    } = TwoPods::start("fp-pods", &["--fast-path"]);

    let p1 = add_pod(
        &node_ns,
        &pod1,
        &ns1,
        "sidecar~10.0.0.1~pod1.default~default.svc.cluster.local",
        Some(&boot1),
    );
    let p1: serde_json::Value = serde_json::from_str(&p1).expect("add-pod answers JSON");
    assert_eq!(p1["ready"], true, "a static pod is ready at once: {p1}");
    add_pod(
        &node_ns,
        &pod2,
        &ns2,
        "sidecar~10.0.0.2~pod2.default~default.svc.cluster.local",
        Some(&boot2),
    );
    // One scope per pipeline, the same VIP in each, each with its own endpoint.
    let scopes = wait_scopes(&node_ns, &[(VIP, &[A]), (VIP, &[B])]);
    assert_ne!(scopes[0], scopes[1]);
    assert!(
        scopes.iter().all(|s| *s != 0),
        "pods never use the node's scope"
    );

    for _ in 0..3 {
        reaches(&ns1, &pod1, &mut b1, 0);
        reaches(&ns2, &pod2, &mut b2, 1);
    }
    // The kernel served them: the pods' pipelines never proxied a connection.
    let listed: serde_json::Value =
        serde_json::from_str(&node(&node_ns, &["list-pods"])).expect("list-pods is JSON");
    for p in listed["pods"].as_array().expect("pods") {
        let proxied = p["stats"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| k.ends_with(".upstream_cx_total"))
                    .map(|(_, v)| v.as_u64().unwrap_or(0))
                    .sum::<u64>()
            })
            .unwrap_or(0);
        assert_eq!(proxied, 0, "fast path bypasses the pod's proxy: {p}");
    }

    // Removing pod1 removes its scope; pod2 keeps its own entries and endpoint.
    node(
        &node_ns,
        &["remove-pod", "--cgroup", pod1.to_str().unwrap()],
    );
    wait_scopes(&node_ns, &[(VIP, &[B])]);
    let out = client(&ns1, &pod1);
    assert!(out.starts_with("err stage=connect"), "removed pod: {out}");
    reaches(&ns2, &pod2, &mut b2, 1);

    sigterm_and_wait(proxy);
    assert_no_programs_attached(cg.path());
}

/// `ready` of the only pod in `list-pods`.
fn pod_ready(node_ns: &Netns) -> bool {
    let listed: serde_json::Value =
        serde_json::from_str(&node(node_ns, &["list-pods"])).expect("list-pods is JSON");
    listed["pods"][0]["ready"] == true
}

#[test]
fn a_pod_is_captured_only_once_its_initial_config_is_in() {
    let _g = serial();
    let env = require_root();
    let node_ns = Netns::new("fp-pods-rdy");
    let pod_ns = Netns::new("fp-pods-rdy-p");
    let mut cg = Cgroup::new(&env, "fp-pods-rdy");
    let pod = cg.child("pod");
    let mut backends = backends_in(&pod_ns);
    let node_boot = TempYaml::new("fp-pods-rdy-node", &node_bootstrap());
    // The pod's own bootstrap fetches its config over ADS from a control plane not up yet.
    let pod_boot = TempYaml::new(
        "fp-pods-rdy-pod",
        &skiff_tests::ads_bootstrap("GRPC", "pod", "127.0.0.1:15010".parse().unwrap(), 15100),
    );
    let proxy = node_skiff(&node_ns, &node_boot, cg.path(), &["--fast-path"]);
    wait_admin_ready(&node_ns);

    let added = add_pod(
        &node_ns,
        &pod,
        &pod_ns,
        "sidecar~10.0.0.5~pod5.default~default.svc.cluster.local",
        Some(&pod_boot),
    );
    let added: serde_json::Value = serde_json::from_str(&added).expect("add-pod answers JSON");
    assert_eq!(added["ready"], false, "no config yet: {added}");
    // Not captured yet: the connect goes to the VIP itself (no route in the pod's netns).
    let out = client(&pod_ns, &pod);
    assert!(
        out.starts_with("err stage=connect"),
        "pod before its config: {out}"
    );
    assert!(!pod_ready(&node_ns));

    // The control plane comes up: the pod's initial config arrives, the kernel gets its scope
    // and only then is the cgroup captured.
    let dir = tempfile::Builder::new()
        .prefix(&skiff_tests::test_name("fp-pods-rdy"))
        .tempdir()
        .expect("temp dir");
    std::fs::write(dir.path().join("listeners.json"), ADS_LISTENERS).unwrap();
    std::fs::write(dir.path().join("clusters.json"), ADS_CLUSTERS).unwrap();
    let _cp = Child::spawn(
        command_in(Some(&node_ns), None, built_binary("skiff"))
            .args(["control-plane", "--listen", "127.0.0.1:15010", "--dir"])
            .arg(dir.path()),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !pod_ready(&node_ns) {
        assert!(Instant::now() < deadline, "the pod never became ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_scopes(&node_ns, &[(VIP, &[A])]);
    reaches(&pod_ns, &pod, &mut backends, 0);

    sigterm_and_wait(proxy);
    assert_no_programs_attached(cg.path());
}
