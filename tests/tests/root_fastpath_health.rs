//! Root end-to-end test of the one owner of the kernel fast-path maps: endpoint health flips
//! (an active TCP health check against a backend this test stops and restarts) race EDS pushes
//! from the real `skiff control-plane --dir` (which flip another endpoint's `health_status`).
//! Both kinds of input reach the kernel maps through one task that always writes the latest
//! state, so once the loop stops the maps end on the latest state and stay there: never an
//! older image written late.
//!
//! Run: `cargo build -p skiff -p skiff-tests --bins && cargo test -p skiff-tests --features root
//! --test root_fastpath_health -- --test-threads=1` (as root).

use std::time::{Duration, Instant};

use skiff_tests::fastpath::{
    CAPTURE_CX, count, eds_control_plane, endpoints_file_with_health, fastpeer_output,
    kernel_endpoints, netns_and_cgroup, spawn_fast_path, spawn_fastpeer, wait_kernel_endpoints,
    write_atomic,
};
use skiff_tests::{admin_stat, assert_no_programs_attached, sigterm_and_wait, wait_admin_ready};

const VIP: &str = "10.96.0.10:80";

/// A, B always healthy; C health-checked (its backend flips); D flipped by EDS.
const A: &str = "127.0.0.21:8080";
const B: &str = "127.0.0.22:8080";
const C: &str = "127.0.0.23:8080";
const D: &str = "127.0.0.24:8080";

/// Cluster `svc` over EDS with a fast TCP health check (one failure or success flips a host).
const CLUSTERS_WITH_HC: &str = r#"{"version_info": "2", "resources": [{
  "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
  "name": "svc", "type": "EDS", "lb_policy": "ROUND_ROBIN", "connect_timeout": "1s",
  "eds_cluster_config": {"eds_config": {"ads": {}}},
  "health_checks": [{"timeout": "0.2s", "interval": "0.03s", "no_traffic_interval": "0.03s",
    "unhealthy_threshold": 1, "healthy_threshold": 1, "tcp_health_check": {}}]}]}"#;

/// Iterations of the flip loop (bounded).
const ROUNDS: u32 = 24;

#[test]
fn health_flips_racing_eds_pushes_leave_the_maps_on_the_latest_state() {
    let _g = skiff_tests::serial();
    let name = "fp-health";
    let (ns, mut cg) = netns_and_cgroup(name);
    // Backends greet each connection with their address (so a client knows which it reached);
    // C is a process of its own, stopped and restarted by the loop.
    let _steady = spawn_fastpeer(&ns, &["serve", A, B, D]);
    let mut c_backend = Some(spawn_fastpeer(&ns, &["serve", C]));
    let dir = tempfile::Builder::new()
        .prefix(&format!("{}-", skiff_tests::test_name(name)))
        .tempdir()
        .expect("tempdir");
    let (_control_plane, bootstrap) = eds_control_plane(&ns, dir.path(), name, &[A, B, C, D]);
    write_atomic(dir.path(), "clusters.json", CLUSTERS_WITH_HC);
    let (skiff, app) = spawn_fast_path(&ns, &mut cg, &bootstrap, &[]);
    wait_admin_ready(&ns);
    wait_kernel_endpoints(&ns, &[A, B, C, D]);

    // The loop: every round pushes a new EDS version (D healthy on even versions) and stops or
    // restarts C's backend (the health check flips C). Short pauses let both kinds of input
    // overlap with the owner's writes.
    let mut version = 1;
    for round in 0..ROUNDS {
        version += 1;
        let d_healthy = version % 2 == 0;
        write_atomic(
            dir.path(),
            "endpoints.json",
            &endpoints_file_with_health(
                version,
                &[(A, true), (B, true), (C, true), (D, d_healthy)],
            ),
        );
        if c_backend.is_some() {
            c_backend = None;
        } else {
            c_backend = Some(spawn_fastpeer(&ns, &["serve", C]));
        }
        std::thread::sleep(Duration::from_millis(20 + u64::from(round % 4) * 25));
    }
    // Final state: the last EDS version's D, and C's backend up again.
    let d_final = version % 2 == 0;
    if c_backend.is_none() {
        c_backend = Some(spawn_fastpeer(&ns, &["serve", C]));
    }
    let mut want = vec![A, B, C];
    if d_final {
        want.push(D);
    }
    wait_kernel_endpoints(&ns, &want);

    // It stays there: nothing older is written after the latest state (watch for 2 s, longer
    // than many health-check intervals and any in-flight apply).
    let mut want_sorted: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want_sorted.sort();
    let until = Instant::now() + Duration::from_secs(2);
    let mut reads = 0;
    while Instant::now() < until {
        assert_eq!(
            kernel_endpoints(&ns).as_ref(),
            Some(&want_sorted),
            "the maps left the latest state after {reads} reads"
        );
        reads += 1;
        std::thread::sleep(Duration::from_millis(40));
    }
    assert_eq!(
        admin_stat(&ns, "skiff.bpf.fast_path.endpoints"),
        want.len() as u64,
        "gauge from the applied image"
    );
    assert_eq!(admin_stat(&ns, "skiff.bpf.fast_path.services"), 1);

    // What the kernel itself picks (not only what the reconciler says it wrote): round robin
    // over the latest endpoints, every one of them and nothing else, none through the proxy.
    let n = 8 * want.len();
    let line = fastpeer_output(&ns, Some(&app), &["spread", VIP, "--n", &n.to_string()]);
    assert!(line.starts_with("ok "), "spread: {line}");
    for e in [A, B, C, D] {
        let hits = count(&line, e);
        if want.contains(&e) {
            assert!(hits > 0, "{e} is served but got no connect: {line}");
        } else {
            assert_eq!(hits, 0, "{e} is not served but got connects: {line}");
        }
    }
    assert_eq!(
        want.iter().map(|e| count(&line, e)).sum::<usize>(),
        n,
        "{line}"
    );
    assert_eq!(admin_stat(&ns, CAPTURE_CX), 0, "all through the kernel");
    drop(c_backend);

    sigterm_and_wait(skiff);
    assert_no_programs_attached(cg.path());
}
