//! Root end-to-end tests of the kernel fast path's balancing policies: the real `skiff run
//! --fast-path` in a private network namespace (loopback only) and cgroups this test creates.
//! Three backends greet each connection with their address, so one client process can tell
//! where each of many connects landed.
//!
//! - weighted ROUND_ROBIN follows `load_balancing_weight` (chi-square against the weights);
//! - LEAST_REQUEST sends clearly fewer new connects to a backend holding many open ones (the
//!   kernel counts fast-path connections per endpoint, `/stats` shows them);
//! - MAGLEV keeps each client on one backend and spreads clients across backends.
//!
//! Run: `cargo build -p skiff -p skiff-tests --bins && cargo test -p skiff-tests --features root
//! --test root_fastpath_lb -- --test-threads=1` (as root).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use skiff_tests::fastpath::{
    CAPTURE_CX, CHI2_BOUND, capture_bootstrap, count, fastpeer, fastpeer_output, netns_and_cgroup,
    spawn_fast_path, spawn_fastpeer, static_cluster_with, tcp_chain,
};
use skiff_tests::{Cgroup, Child, Netns, TempYaml, command_in, field, serial};

const BACKENDS: [&str; 3] = ["127.0.0.21:8080", "127.0.0.22:8080", "127.0.0.23:8080"];

fn cluster(name: &str, policy: &str, eps: &[(&str, u32)]) -> String {
    let lb: Vec<String> = eps
        .iter()
        .map(|(a, w)| {
            let (ip, port) = a.split_once(':').expect("ip:port");
            format!(
                "        - endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }} }}\n          load_balancing_weight: {w}\n"
            )
        })
        .collect();
    static_cluster_with(name, policy, &lb.concat())
}

/// Priority 0: the first backend healthy, the second UNHEALTHY; priority 1: the third. Envoy's
/// priority load: level 0 health = min(100, 140% x 1/2) = 70%, level 1 takes the other 30%.
const PRIORITY_CLUSTER: &str = r#"
  - name: prio
    type: STATIC
    lb_policy: RANDOM
    connect_timeout: 1s
    load_assignment:
      cluster_name: prio
      endpoints:
      - priority: 0
        lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.21, port_value: 8080 } } }
        - endpoint: { address: { socket_address: { address: 127.0.0.22, port_value: 8080 } } }
          health_status: UNHEALTHY
      - priority: 1
        lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.23, port_value: 8080 } } }"#;

/// 10.96.0.13 weighted RR (1:2:3), 10.96.0.14 LEAST_REQUEST, 10.96.0.15 MAGLEV, 10.96.0.16
/// ROUND_ROBIN to the first backend only (to pile connections onto it), 10.96.0.17 RANDOM over
/// two priority levels.
fn bootstrap_yaml() -> String {
    let [a, b, c] = BACKENDS;
    let chains = [
        ("wrr", "10.96.0.13"),
        ("lr", "10.96.0.14"),
        ("mg", "10.96.0.15"),
        ("pin", "10.96.0.16"),
        ("prio", "10.96.0.17"),
    ]
    .map(|(name, vip)| {
        let chain = tcp_chain(name, vip, 32, name);
        // MAGLEV hashes the client only with a source_ip hash policy (else it is random).
        if name == "mg" {
            chain + "\n          hash_policy: [{ source_ip: {} }]"
        } else {
            chain
        }
    });
    let clusters = [
        cluster("wrr", "ROUND_ROBIN", &[(a, 1), (b, 2), (c, 3)]),
        cluster("lr", "LEAST_REQUEST", &[(a, 1), (b, 1), (c, 1)]),
        cluster("mg", "MAGLEV", &[(a, 1), (b, 1), (c, 1)]),
        cluster("pin", "ROUND_ROBIN", &[(a, 1)]),
        PRIORITY_CLUSTER.to_string(),
    ];
    capture_bootstrap(
        &chains.concat(),
        &format!("  clusters:\n{}\n", clusters.concat()),
    )
}

struct Scenario {
    // Field order is drop order: processes first, then cgroups, the netns and the bootstrap.
    _skiff: Child,
    _backends: Child,
    ns: Netns,
    _cg: Cgroup,
    app: PathBuf,
    _bootstrap: TempYaml,
}

fn scenario(name: &str) -> Scenario {
    let (ns, mut cg) = netns_and_cgroup(name);
    let mut args = vec!["serve"];
    args.extend(BACKENDS);
    let backends = spawn_fastpeer(&ns, &args);
    let bootstrap = TempYaml::new(name, &bootstrap_yaml());
    let (skiff, app) = spawn_fast_path(&ns, &mut cg, &bootstrap, &[]);
    let s = Scenario {
        _skiff: skiff,
        _backends: backends,
        ns,
        _cg: cg,
        app,
        _bootstrap: bootstrap,
    };
    skiff_tests::wait_admin_ready(&s.ns);
    s
}

/// Connects per backend from one `spread` run (`n` sequential connects from `src`).
fn spread(s: &Scenario, vip: &str, n: usize, src: Option<&str>) -> BTreeMap<String, usize> {
    let n = n.to_string();
    let mut args = vec!["spread", vip, "--n", &n];
    if let Some(ip) = src {
        args.extend(["--src", ip]);
    }
    let line = fastpeer_output(&s.ns, Some(&s.app), &args);
    assert!(line.starts_with("ok "), "spread to {vip}: {line}");
    assert_eq!(
        field(&line, "peer"),
        Some(vip),
        "getpeername shows the VIP: {line}"
    );
    BACKENDS
        .iter()
        .map(|b| (b.to_string(), count(&line, b)))
        .collect()
}

/// Pearson's chi-square of `got` against `shares` (expected fractions, in `BACKENDS` order).
fn chi_square(got: &BTreeMap<String, usize>, shares: &[f64; 3]) -> f64 {
    let counts: Vec<usize> = BACKENDS.iter().map(|b| got[*b]).collect();
    skiff_tests::fastpath::chi_square(&counts, shares)
}

fn stat(ns: &Netns, name: &str) -> u64 {
    skiff_tests::admin_stat(ns, name)
}

#[test]
fn weighted_round_robin_follows_endpoint_weights() {
    let _g = serial();
    let s = scenario("fp-wrr");
    let got = spread(&s, "10.96.0.13:80", 120, None);
    eprintln!("weighted round robin 1:2:3 over 120 connects: {got:?}");
    let shares = [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0];
    assert!(
        chi_square(&got, &shares) < CHI2_BOUND,
        "weighted round robin 1:2:3 spread {got:?}"
    );
    assert!(got[BACKENDS[2]] > got[BACKENDS[0]], "{got:?}");
    // Straight to the backends: nothing went through the proxy.
    assert_eq!(stat(&s.ns, CAPTURE_CX), 0);
    // Per-service and per-endpoint counters.
    assert_eq!(
        stat(&s.ns, "skiff.bpf.fast_path.10.96.0.13:80.cx_total"),
        120
    );
    let (_, body) = skiff_tests::admin(&s.ns, "GET", "/stats").expect("/stats");
    assert!(
        body.contains("skiff.bpf.fast_path.10.96.0.13:80.fallback_total: 0")
            && body.contains("skiff.bpf.fast_path.10.96.0.13:80.no_healthy_total: 0"),
        "{body}"
    );
    let per_endpoint: u64 = BACKENDS
        .iter()
        .map(|b| stat(&s.ns, &format!("skiff.bpf.fast_path.endpoint.{b}.cx_total")))
        .sum();
    assert_eq!(per_endpoint, 120);
    let (_, maps) = skiff_tests::admin(&s.ns, "GET", "/debug/maps").expect("/debug/maps");
    assert!(maps.contains("\"weights\""), "{maps}");
}

#[test]
fn least_request_avoids_a_backend_holding_many_connections() {
    let _g = serial();
    let s = scenario("fp-lr");
    // Pile 30 open fast-path connections onto the first backend through the `pin` service.
    let mut holder = command_in(Some(&s.ns), Some(&s.app), fastpeer())
        .args(["hold", "10.96.0.16:80", "--n", "30"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn holder");
    let mut line = String::new();
    {
        use std::io::BufRead;
        let out = holder.stdout.as_mut().expect("holder stdout");
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .expect("holder line");
    }
    assert!(line.starts_with("held "), "holder: {line}");
    assert_eq!(field(&line, BACKENDS[0]), Some("30"), "{line}");
    // The kernel counts them against that endpoint.
    let active = format!("skiff.bpf.fast_path.endpoint.{}.cx_active", BACKENDS[0]);
    assert_eq!(stat(&s.ns, &active), 30);

    // Power of two choices: the loaded backend wins only when both picks are it (1 in 9).
    let got = spread(&s, "10.96.0.14:80", 90, None);
    eprintln!("LEAST_REQUEST with 30 connections held on the first backend: {got:?}");
    let loaded = got[BACKENDS[0]];
    let others = got[BACKENDS[1]].min(got[BACKENDS[2]]);
    // Expected about 10 vs 40. On a busy machine the spread's own connections close late and
    // count against the idle backends for a while, so the bound only asks for "clearly fewer":
    // under two thirds of the least-used other backend (round robin would give about equal).
    assert!(
        loaded * 3 < others * 2,
        "LEAST_REQUEST should avoid the loaded backend: {got:?}"
    );
    assert!(loaded < 25, "{got:?}");

    // Once the holder closes, the counter drains and the backend gets its share again.
    drop(holder.stdin.take());
    let _ = holder.wait();
    let mut drained = false;
    for _ in 0..50 {
        if stat(&s.ns, &active) == 0 {
            drained = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(drained, "{active} back to 0 after the connections closed");
    let got = spread(&s, "10.96.0.14:80", 90, None);
    assert!(
        chi_square(&got, &[1.0 / 3.0; 3]) < CHI2_BOUND,
        "idle LEAST_REQUEST spreads evenly: {got:?}"
    );
    let total = format!("skiff.bpf.fast_path.endpoint.{}.cx_total", BACKENDS[0]);
    assert!(stat(&s.ns, &total) >= 30);
    let mut prom = skiff_tests::admin(&s.ns, "GET", "/stats/prometheus")
        .expect("/stats/prometheus")
        .1;
    prom.retain(|c| c != '\r');
    assert!(
        prom.contains("fast_path"),
        "prometheus exposes the fast-path counters"
    );
}

#[test]
fn maglev_keeps_each_client_on_one_backend_and_spreads_clients() {
    let _g = serial();
    let s = scenario("fp-maglev");
    let mut per_backend: BTreeMap<String, usize> =
        BACKENDS.iter().map(|b| (b.to_string(), 0)).collect();
    // 90 clients, told apart by their source address (127.0.1.x is local on lo).
    for i in 1..=90 {
        let src = format!("127.0.1.{i}");
        let got = spread(&s, "10.96.0.15:80", 3, Some(&src));
        let hit: Vec<(&String, &usize)> = got.iter().filter(|(_, n)| **n > 0).collect();
        assert_eq!(
            hit.len(),
            1,
            "client {src} reached more than one backend: {got:?}"
        );
        assert_eq!(*hit[0].1, 3);
        *per_backend.get_mut(hit[0].0).expect("known backend") += 1;
    }
    eprintln!("MAGLEV clients per backend: {per_backend:?}");
    assert!(
        chi_square(&per_backend, &[1.0 / 3.0; 3]) < CHI2_BOUND,
        "maglev spread across clients {per_backend:?}"
    );
    let (_, explain) =
        skiff_tests::admin(&s.ns, "GET", "/debug/explain?dst=10.96.0.15:80").expect("explain");
    assert!(explain.contains("MAGLEV"), "{explain}");
    assert_eq!(stat(&s.ns, CAPTURE_CX), 0);
}

#[test]
fn priority_load_is_split_as_envoy_does() {
    let _g = serial();
    let s = scenario("fp-prio");
    let got = spread(&s, "10.96.0.17:80", 150, None);
    eprintln!("RANDOM over priority 0 (70%) and priority 1 (30%): {got:?}");
    assert_eq!(
        got[BACKENDS[1]], 0,
        "an UNHEALTHY endpoint gets nothing: {got:?}"
    );
    // Two categories: chi-square with 1 degree of freedom, p = 0.001.
    let n = 150.0;
    let chi2 = (got[BACKENDS[0]] as f64 - 0.7 * n).powi(2) / (0.7 * n)
        + (got[BACKENDS[2]] as f64 - 0.3 * n).powi(2) / (0.3 * n);
    assert!(
        chi2 < 10.83,
        "priority split 70/30: {got:?} (chi2 {chi2:.2})"
    );
    assert_eq!(stat(&s.ns, CAPTURE_CX), 0);
}
