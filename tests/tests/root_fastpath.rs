//! Root end-to-end tests of the kernel fast path: the real `skiff run --fast-path` in a private
//! network namespace (loopback only) and cgroups this test creates. Plain-TCP services are
//! connected straight to a backend by connect4; skiff's listener never sees them.
//!
//! Run: `cargo build -p skiff -p skiff-tests --bins && cargo test -p skiff-tests --features root
//! --test root_fastpath -- --test-threads=1` (as root).

use std::path::{Path, PathBuf};
use std::time::Duration;

use skiff_tests::fastpath::{
    CAPTURE_CX, CHI2_BOUND, capture_bootstrap, chi_square, http_chain, netns_and_cgroup,
    skiff_maps, spawn_fast_path, static_cluster, tcp_chain, tcp_client,
};
use skiff_tests::{
    Cgroup, Child, Netns, TempYaml, assert_no_programs_attached, field, serial, sigterm_and_wait,
    spawn_testpeer,
};

const BACKENDS: [&str; 3] = ["127.0.0.21:8080", "127.0.0.22:8080", "127.0.0.23:8080"];

/// 10.96.0.10 (ROUND_ROBIN) and 10.96.0.12 (RANDOM): plain tcp_proxy, fast path.
/// 10.96.0.11: HTTP connection manager, stays in the proxy.
fn bootstrap_yaml() -> String {
    let chains = [
        tcp_chain("rr", "10.96.0.10", 32, "rr"),
        tcp_chain("rnd", "10.96.0.12", 32, "rnd"),
        http_chain("10.96.0.11", "rr"),
    ];
    let clusters = [
        static_cluster("rr", "ROUND_ROBIN", &BACKENDS),
        static_cluster("rnd", "RANDOM", &BACKENDS),
    ];
    capture_bootstrap(
        &chains.concat(),
        &format!("  clusters:\n{}", clusters.concat()),
    )
}

fn admin(ns: &Netns, path: &str) -> Option<(u16, String)> {
    skiff_tests::admin(ns, "GET", path)
}

fn stat(ns: &Netns, name: &str) -> u64 {
    skiff_tests::admin_stat(ns, name)
}

struct Scenario {
    // Field order is drop order: processes first, then cgroups, the netns and the bootstrap.
    skiff: Option<Child>,
    backends: Vec<Child>,
    ns: Netns,
    cg: Cgroup,
    _bootstrap: TempYaml,
}

fn scenario(name: &str) -> (Scenario, PathBuf) {
    let (ns, mut cg) = netns_and_cgroup(name);
    let backends = BACKENDS
        .iter()
        .map(|addr| spawn_testpeer(&ns, None, &["origdst", addr]))
        .collect();
    let bootstrap = TempYaml::new(name, &bootstrap_yaml());
    let (skiff, app) = spawn_fast_path(&ns, &mut cg, &bootstrap, &[]);
    let s = Scenario {
        skiff: Some(skiff),
        backends,
        ns,
        cg,
        _bootstrap: bootstrap,
    };
    skiff_tests::wait_admin_ready(&s.ns);
    (s, app)
}

/// `n` connects to `vip`; every one must reach a backend directly (the backend's peer is the
/// client's own address, and the app's getpeername shows the VIP). Returns connects per backend.
fn spread(s: &mut Scenario, app: &Path, vip: &str, n: usize) -> [usize; 3] {
    let mut counts = [0usize; 3];
    for i in 0..n {
        let out = tcp_client(&s.ns, app, vip);
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

#[test]
fn plain_tcp_services_connect_straight_to_backends_and_l7_stays_in_the_proxy() {
    let _g = serial();
    let (mut s, app) = scenario("fp-spread");

    let rr = spread(&mut s, &app, "10.96.0.10:80", 30);
    assert!(
        chi_square(&rr, &[1.0 / 3.0; 3]) < CHI2_BOUND,
        "round robin spread {rr:?}"
    );
    assert!(
        rr.iter().all(|&c| c > 0),
        "round robin reaches every backend: {rr:?}"
    );
    let rnd = spread(&mut s, &app, "10.96.0.12:80", 45);
    assert!(
        chi_square(&rnd, &[1.0 / 3.0; 3]) < CHI2_BOUND,
        "random spread {rnd:?}"
    );

    // Not one of them went through skiff.
    assert_eq!(stat(&s.ns, CAPTURE_CX), 0);
    assert_eq!(stat(&s.ns, "skiff.bpf.fast_path_v4"), 75);
    assert_eq!(stat(&s.ns, "cluster.rr.upstream_cx_total"), 0);

    // The HTTP service still goes to the proxy.
    let _ = tcp_client(&s.ns, &app, "10.96.0.11:80");
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
    let text = skiff_maps(&s.ns);
    assert!(
        text.contains("10.96.0.10"),
        "skiff maps lacks the VIP:\n{text}"
    );

    // SIGTERM: skiff detaches everything and removes its proxy cgroup.
    sigterm_and_wait(s.skiff.take().unwrap());
    assert_no_programs_attached(s.cg.path());
}
