//! Root test of node mode with one pipeline per pod (`skiff node add-pod`): one skiff in a
//! "node" netns serves pods (cgroups under a node root this test creates, one netns each),
//! each with its own node id and configuration. Each pod's connects follow its own config
//! (pod1's VIP goes to backend A, pod2's same VIP to backend B; both backends exist in every
//! pod's netns and skiff connects from inside the pod), and removing a pod stops its capture
//! while the others keep working.
//!
//! Run: `cargo build -p skiff -p skiff-tests --bins && cargo test -p skiff-tests --features root
//! --test root_pods -- --test-threads=1` (as root).

use std::time::Duration;

use skiff_tests::pods::{
    A, ADS_CLUSTERS, ADS_LISTENERS, TwoPods, add_pod, backends_in, node_bootstrap, node_skiff,
    vip_client as client,
};
use skiff_tests::{
    Cgroup, Child, Netns, TempYaml, assert_no_programs_attached, built_binary, command_in,
    require_root, serial, sigterm_and_wait, skiff_node as node, spawn_testpeer, testpeer_output,
    veth_pair, wait_admin_ready, wait_admin_ready_on,
};

#[test]
fn each_pod_follows_its_own_config_and_removal_detaches_it() {
    let _g = serial();
    // Both backends in each pod's netns: skiff connects from inside the pod, so the backend a
    // connection reaches shows which config served it.
    let TwoPods {
        node_ns,
        ns: [ns1, ns2],
        mut cg,
        pods: [pod1, pod2],
        backends: [mut b1, mut b2],
        node_boot: _node_boot,
        boots: [boot1, boot2],
        proxy,
    } = TwoPods::start("pods", &[]);
    let node_proxy = cg.child_path("skiff-proxy");

    // Not registered: not captured (the VIP has no route in the pod's netns).
    let out = client(&ns1, &pod1);
    assert!(
        out.starts_with("err stage=connect"),
        "unregistered pod: {out}"
    );

    let added = add_pod(
        &node_ns,
        &pod1,
        &ns1,
        "sidecar~10.0.0.1~pod1.default~default.svc.cluster.local",
        Some(&boot1),
    );
    let added: serde_json::Value = serde_json::from_str(&added).expect("add-pod answers JSON");
    assert_eq!(
        added["node_id"], "sidecar~10.0.0.1~pod1.default~default.svc.cluster.local",
        "{added}"
    );
    assert_eq!(added["listeners"][0], "127.0.0.1:15001", "{added}");
    add_pod(
        &node_ns,
        &pod2,
        &ns2,
        "sidecar~10.0.0.2~pod2.default~default.svc.cluster.local",
        Some(&boot2),
    );

    // Same VIP, two configurations: pod1 -> backend A, pod2 -> backend B.
    for _ in 0..2 {
        let out = client(&ns1, &pod1);
        assert!(out.starts_with("ok "), "pod1: {out}");
        b1[0].expect_line("accepted", Duration::from_secs(5));
        let out = client(&ns2, &pod2);
        assert!(out.starts_with("ok "), "pod2: {out}");
        b2[1].expect_line("accepted", Duration::from_secs(5));
    }
    assert!(
        b1[1]
            .try_line("accepted", Duration::from_millis(300))
            .is_none()
            && b2[0]
                .try_line("accepted", Duration::from_millis(300))
                .is_none(),
        "no connection followed the other pod's config"
    );

    let listed: serde_json::Value =
        serde_json::from_str(&node(&node_ns, &["list-pods"])).expect("list-pods is JSON");
    let pods = listed["pods"].as_array().expect("pods array");
    assert_eq!(pods.len(), 2, "{listed}");
    for (p, cluster) in pods.iter().zip(["svc-a", "svc-b"]) {
        let clusters = p["config"]["clusters"].as_array().unwrap();
        assert!(
            clusters.iter().any(|c| c == cluster) && clusters.len() == 1,
            "each pod holds only its own config: {p}"
        );
        assert_eq!(
            p["stats"][format!("cluster.{cluster}.upstream_cx_total")],
            2,
            "{p}"
        );
    }

    // A third pod with pod1's bootstrap (no ADS: identical config) shares pod1's pipeline.
    let ns3 = Netns::new("pods-p3");
    let pod3 = cg.child("pod3");
    let mut b3 = backends_in(&ns3);
    let added3: serde_json::Value = serde_json::from_str(&add_pod(
        &node_ns,
        &pod3,
        &ns3,
        "sidecar~10.0.0.4~pod3.default~default.svc.cluster.local",
        Some(&boot1),
    ))
    .expect("JSON");
    assert_eq!(
        added3["pipeline"]["id"], pods[0]["pipeline"]["id"],
        "{added3}"
    );
    assert_eq!(added3["pipeline"]["shared_by"], 2, "{added3}");
    assert_ne!(pods[0]["pipeline"]["id"], pods[1]["pipeline"]["id"]);
    let out = client(&ns3, &pod3);
    assert!(out.starts_with("ok "), "pod3: {out}");
    b3[0].expect_line("accepted", Duration::from_secs(5));

    // Removing pod1 detaches it: its connects go direct again (and fail: no route); pod3
    // keeps the shared pipeline and pod2 its own.
    node(
        &node_ns,
        &["remove-pod", "--cgroup", pod1.to_str().unwrap()],
    );
    let out = client(&ns1, &pod1);
    assert!(out.starts_with("err stage=connect"), "removed pod: {out}");
    let out = client(&ns2, &pod2);
    assert!(out.starts_with("ok "), "pod2 after pod1's removal: {out}");
    let out = client(&ns3, &pod3);
    assert!(out.starts_with("ok "), "pod3 after pod1's removal: {out}");
    let listed = node(&node_ns, &["list-pods"]);
    assert!(
        !listed.contains("pod1.") && listed.contains("pod2.") && listed.contains("pod3."),
        "{listed}"
    );

    sigterm_and_wait(proxy);
    assert!(!node_proxy.exists());
    assert_no_programs_attached(cg.path());
}

#[test]
fn a_pod_fetches_its_config_over_ads_under_its_own_node_id() {
    let _g = serial();
    let env = require_root();
    let node_ns = Netns::new("pods-ads");
    let pod_ns = Netns::new("pods-ads-p");
    let mut cg = Cgroup::new(&env, "pods-ads");
    let pod = cg.child("pod");
    let _proxy_cg = cg.child_path("skiff-proxy");
    let mut backend = spawn_testpeer(&pod_ns, None, &["origdst", A]);
    let dir = tempfile::Builder::new()
        .prefix(&skiff_tests::test_name("pods-ads"))
        .tempdir()
        .expect("temp dir");
    std::fs::write(dir.path().join("listeners.json"), ADS_LISTENERS).unwrap();
    std::fs::write(dir.path().join("clusters.json"), ADS_CLUSTERS).unwrap();
    let cp_log = dir.path().join("control-plane.log");
    // The control plane's log (stderr) goes to a file: it names the node of every ACK.
    let _cp = Child::spawn(
        command_in(Some(&node_ns), None, "sh")
            .args(["-c", "exec \"$0\" \"$@\" 2>\"$CP_LOG\""])
            .arg(built_binary("skiff"))
            .args(["control-plane", "--listen", "127.0.0.1:15010", "--dir"])
            .arg(dir.path())
            .env("CP_LOG", &cp_log)
            .env("RUST_LOG", "info"),
    );
    let node_boot = TempYaml::new(
        "pods-ads-node",
        &skiff_tests::ads_bootstrap("GRPC", "node", "127.0.0.1:15010".parse().unwrap(), 15000),
    );
    let proxy = node_skiff(&node_ns, &node_boot, cg.path(), &[]);
    wait_admin_ready(&node_ns);

    let pod_id = "sidecar~10.0.0.3~pod3.default~default.svc.cluster.local";
    add_pod(&node_ns, &pod, &pod_ns, pod_id, None);
    // The pod's own ADS client warms its own snapshot, then its connects follow it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut out = String::new();
    while std::time::Instant::now() < deadline {
        out = client(&pod_ns, &pod);
        if out.starts_with("ok ") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(out.starts_with("ok "), "pod over ADS: {out}");
    backend.expect_line("accepted", Duration::from_secs(5));
    let log = std::fs::read_to_string(&cp_log).unwrap_or_default();
    assert!(
        log.contains(pod_id),
        "the control plane never saw the pod's node id:\n{log}"
    );
    let listed: serde_json::Value =
        serde_json::from_str(&node(&node_ns, &["list-pods"])).expect("JSON");
    assert_eq!(listed["pods"][0]["node_id"], pod_id, "{listed}");
    assert_eq!(
        listed["pods"][0]["stats"]["cluster.svc-ads.upstream_cx_total"], 1,
        "{listed}"
    );

    sigterm_and_wait(proxy);
    assert_no_programs_attached(cg.path());
}

/// A pod's bootstrap with Istio's virtualInbound: port 8080 -> `inbound|8080||` (ORIGINAL_DST).
const INBOUND_POD_BOOTSTRAP: &str = r#"
node: { id: placeholder, cluster: pods }
static_resources:
  listeners:
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
  clusters:
  - name: "inbound|8080||"
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
"#;

#[test]
fn a_pod_gets_inbound_capture_in_its_own_netns() {
    let _g = serial();
    let env = require_root();
    let node_ns = Netns::new("pods-in-node");
    let client_ns = Netns::new("pods-in-c");
    let pod_ns = Netns::new("pods-in-p");
    // client netns <-> pod netns over a veth created inside them (never in this machine's).
    veth_pair(
        &client_ns,
        "vc",
        "10.200.0.1/24",
        &pod_ns,
        "vp",
        "10.200.0.2/24",
    );
    let mut cg = Cgroup::new(&env, "pods-in");
    let pod = cg.child("pod");
    let _proxy_cg = cg.child_path("skiff-proxy");
    let mut app = spawn_testpeer(&pod_ns, None, &["origdst", "0.0.0.0:8080"]);
    let node_boot = TempYaml::new("pods-in-node", &node_bootstrap());
    let pod_boot = TempYaml::new("pods-in-pod", INBOUND_POD_BOOTSTRAP);
    let proxy = node_skiff(
        &node_ns,
        &node_boot,
        cg.path(),
        &["--capture-inbound", "--no-ipv6"],
    );
    wait_admin_ready(&node_ns);

    let connect = || {
        testpeer_output(
            &client_ns,
            None,
            &[
                "client",
                "10.200.0.2:8080",
                "--bytes",
                "4096",
                "--timeout-ms",
                "3000",
            ],
        )
    };
    let peer = |app: &mut Child| {
        let line = app.expect_line("accepted", Duration::from_secs(5));
        skiff_tests::field(&line, "peer")
            .unwrap_or_default()
            .to_string()
    };

    // Coexistence: while another sk_lookup program (a sidecar skiff's, here) steers the pod's
    // netns, add-pod refuses and names it.
    let side_cg = cg.child("sidecar-app");
    let side_proxy = cg.child_path("sidecar-proxy");
    let sidecar = Child::spawn(
        command_in(Some(&pod_ns), None, built_binary("skiff"))
            // --allow-coexist: the node skiff's programs sit on an ancestor of its cgroup.
            .args([
                "run",
                "--capture-inbound",
                "--no-ipv6",
                "--allow-coexist",
                "--cgroup",
            ])
            .arg(&side_cg)
            .arg("--proxy-cgroup")
            .arg(&side_proxy)
            .args([
                "--outbound-port",
                "15101",
                "--inbound-port",
                "15106",
                "--admin",
                "127.0.0.1:15100",
                "--bootstrap",
            ])
            .arg(&pod_boot)
            .env("RUST_LOG", "warn"),
    );
    wait_admin_ready_on(&pod_ns, 15100);
    let out = command_in(Some(&node_ns), None, built_binary("skiff"))
        .args(["node", "add-pod", "--cgroup"])
        .arg(&pod)
        .arg("--netns")
        .arg(pod_ns.path())
        .args(["--node-id", "x", "--bootstrap"])
        .arg(&pod_boot)
        .output()
        .expect("skiff node add-pod");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("skiff_sk_lookup (id ")
            && err.contains("--allow-coexist"),
        "{err}"
    );
    let listed = node(&node_ns, &["list-pods"]);
    assert!(
        !listed.contains("\"x\""),
        "a refused pod is not registered: {listed}"
    );
    sigterm_and_wait(sidecar);

    let added: serde_json::Value = serde_json::from_str(&add_pod(
        &node_ns,
        &pod,
        &pod_ns,
        "sidecar~10.200.0.2~app.default~default.svc.cluster.local",
        Some(&pod_boot),
    ))
    .expect("JSON");
    assert!(
        added["listeners"]
            .as_array()
            .is_some_and(|l| l.iter().any(|a| a == "0.0.0.0:15006")),
        "{added}"
    );
    let out = connect();
    assert!(out.starts_with("ok "), "inbound to the pod: {out}");
    let p = peer(&mut app);
    assert!(
        p.starts_with("127.0.0.6:"),
        "served by skiff inside the pod: {p}"
    );
    let listed: serde_json::Value =
        serde_json::from_str(&node(&node_ns, &["list-pods"])).expect("JSON");
    assert_eq!(
        listed["pods"][0]["stats"]["cluster.inbound|8080||.upstream_cx_total"], 1,
        "{listed}"
    );

    // Removal detaches the pod's sk_lookup program: the app is reached directly again.
    node(&node_ns, &["remove-pod", "--cgroup", pod.to_str().unwrap()]);
    let out = connect();
    assert!(out.starts_with("ok "), "after removal: {out}");
    let p = peer(&mut app);
    assert!(p.starts_with("10.200.0.1:"), "direct after removal: {p}");

    sigterm_and_wait(proxy);
    assert_no_programs_attached(cg.path());
}
