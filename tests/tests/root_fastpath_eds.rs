//! Root end-to-end test of the kernel fast path under EDS updates: the real `skiff run
//! --fast-path` fed over ADS by the real `skiff control-plane --dir`, in a private network
//! namespace (loopback only) and cgroups this test creates. An endpoint removed from the
//! endpoints file stops receiving fast-path connects once skiff has ACKed the new version, and a
//! cluster left without endpoints falls back to the proxy, which closes (never hangs).
//!
//! Run: `cargo build -p skiff -p skiff-tests --bins && cargo test -p skiff-tests --features root
//! --test root_fastpath_eds -- --test-threads=1` (as root).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use skiff_tests::fastpath::{
    CAPTURE_CX, EDS_WAIT as WAIT, eds_control_plane, endpoints_file, netns_and_cgroup,
    spawn_fast_path, tcp_client, wait_kernel_endpoints, write_atomic,
};
use skiff_tests::{
    Cgroup, Child, Netns, TempYaml, assert_no_programs_attached, field, sigterm_and_wait,
    spawn_testpeer,
};

const VIP: &str = "10.96.0.10:80";
const BACKENDS: [&str; 3] = ["127.0.0.21:8080", "127.0.0.22:8080", "127.0.0.23:8080"];

fn admin(ns: &Netns, path: &str) -> Option<(u16, String)> {
    skiff_tests::admin(ns, "GET", path)
}

fn stat(ns: &Netns, name: &str) -> u64 {
    skiff_tests::admin_stat(ns, name)
}

/// The endpoint addresses of `svc` in skiff's `/config_dump` (its xDS state; Envoy, and so
/// skiff, leaves `version_info` empty on EDS entries, so the content is what tells versions apart).
fn dumped_endpoints(ns: &Netns) -> Vec<String> {
    let Some((200, body)) = admin(ns, "/config_dump?resource=dynamic_endpoint_configs") else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&body).expect("/config_dump is JSON");
    let mut out = Vec::new();
    for entry in v["configs"].as_array().into_iter().flatten() {
        let cla = &entry["endpoint_config"];
        if cla["cluster_name"] != "svc" {
            continue;
        }
        for locality in cla["endpoints"].as_array().into_iter().flatten() {
            for ep in locality["lb_endpoints"].as_array().into_iter().flatten() {
                let sa = &ep["endpoint"]["address"]["socket_address"];
                out.push(format!(
                    "{}:{}",
                    sa["address"].as_str().unwrap_or("?"),
                    sa["port_value"]
                ));
            }
        }
    }
    out.sort();
    out
}

struct Scenario {
    // Field order is drop order: processes first (the control plane is only kept alive), then
    // cgroups, the netns and the files.
    skiff: Option<Child>,
    _control_plane: Child,
    backends: Vec<Child>,
    ns: Netns,
    cg: Cgroup,
    dir: tempfile::TempDir,
    _bootstrap: TempYaml,
    app: PathBuf,
}

fn scenario(name: &str) -> Scenario {
    let (ns, mut cg) = netns_and_cgroup(name);
    let backends = BACKENDS
        .iter()
        .map(|addr| spawn_testpeer(&ns, None, &["origdst", addr]))
        .collect();
    let dir = tempfile::Builder::new()
        .prefix(&format!("{}-", skiff_tests::test_name(name)))
        .tempdir()
        .expect("tempdir");
    let (control_plane, bootstrap) = eds_control_plane(&ns, dir.path(), name, &BACKENDS);
    let (skiff, app) = spawn_fast_path(&ns, &mut cg, &bootstrap, &[]);
    Scenario {
        skiff: Some(skiff),
        _control_plane: control_plane,
        backends,
        ns,
        cg,
        dir,
        _bootstrap: bootstrap,
        app,
    }
}

fn client(s: &Scenario) -> String {
    tcp_client(&s.ns, &s.app, VIP)
}

/// `n` connects to the VIP; each must reach one backend directly (the backend's peer is the
/// client's own address, the app's getpeername shows the VIP). Returns connects per backend.
fn spread(s: &mut Scenario, n: usize) -> [usize; 3] {
    let mut counts = [0usize; 3];
    for i in 0..n {
        let out = client(s);
        assert!(out.starts_with("ok "), "connect {i} to {VIP}: {out}");
        assert_eq!(field(&out, "same"), Some("yes"), "{out}");
        assert_eq!(
            field(&out, "peer"),
            Some(VIP),
            "getpeername shows the VIP: {out}"
        );
        let local = field(&out, "local").expect("client local").to_string();
        // The backend printed `accepted` before echoing; poll all three, bounded.
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut hit = None;
        while hit.is_none() && Instant::now() < deadline {
            for (b, backend) in s.backends.iter_mut().enumerate() {
                if let Some(line) = backend.try_line("accepted", Duration::from_millis(10)) {
                    assert_eq!(
                        field(&line, "peer"),
                        Some(local.as_str()),
                        "backend {b} saw {line}"
                    );
                    hit = Some(b);
                    break;
                }
            }
        }
        counts[hit.unwrap_or_else(|| panic!("no backend accepted connect {i} ({out})"))] += 1;
    }
    // No backend accepted anything beyond the `n` connects counted above.
    for (b, backend) in s.backends.iter_mut().enumerate() {
        assert!(
            backend
                .try_line("accepted", Duration::from_millis(200))
                .is_none(),
            "backend {b} accepted an extra connection"
        );
    }
    counts
}

#[test]
fn eds_removal_stops_fast_path_connects_to_the_removed_endpoint_and_empty_falls_back() {
    let _g = skiff_tests::serial();
    let mut s = scenario("fp-eds");
    wait_kernel_endpoints(&s.ns, &BACKENDS);
    // The maps can hold the service before skiff opens its ready gate (until then connects are
    // not captured at all): wait for both.
    skiff_tests::wait_admin_ready(&s.ns);

    // All three endpoints take connects, none through skiff's listener.
    let before = spread(&mut s, 30);
    assert!(before.iter().all(|&c| c > 0), "spread over 3: {before:?}");
    assert_eq!(stat(&s.ns, CAPTURE_CX), 0, "fast path bypasses the proxy");
    assert_eq!(stat(&s.ns, "skiff.bpf.fast_path.services"), 1);
    assert_eq!(stat(&s.ns, "skiff.bpf.fast_path.endpoints"), 3);

    // Remove 127.0.0.22. skiff publishes its snapshot (config_dump), reconciles the maps, and
    // only then ACKs; wait for both views before connecting.
    let kept = [BACKENDS[0], BACKENDS[2]];
    write_atomic(s.dir.path(), "endpoints.json", &endpoints_file(2, &kept));
    let deadline = Instant::now() + WAIT;
    while dumped_endpoints(&s.ns) != kept {
        assert!(
            Instant::now() < deadline,
            "config_dump still shows {:?}",
            dumped_endpoints(&s.ns)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_kernel_endpoints(&s.ns, &kept);
    assert_eq!(stat(&s.ns, "skiff.bpf.fast_path.endpoints"), 2);

    let after = spread(&mut s, 30);
    assert_eq!(after[1], 0, "the removed endpoint got connects: {after:?}");
    assert!(
        after[0] >= 5 && after[2] >= 5,
        "the remaining two share the connects: {after:?}"
    );
    assert_eq!(stat(&s.ns, CAPTURE_CX), 0, "still the fast path");

    // Remove every endpoint: the kernel has nothing to pick, connects go to the proxy, which
    // has no healthy upstream and closes. The client sees an error or EOF, never a hang.
    write_atomic(s.dir.path(), "endpoints.json", &endpoints_file(3, &[]));
    let deadline = Instant::now() + WAIT;
    while stat(&s.ns, "skiff.bpf.fast_path.endpoints") != 0 {
        assert!(Instant::now() < deadline, "kernel still serves endpoints");
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in 0..3 {
        let out = client(&s);
        let echoed_all = out.starts_with("ok ") && field(&out, "same") == Some("yes");
        assert!(
            !echoed_all,
            "connect {i} without endpoints was served: {out}"
        );
        let ms: u64 = field(&out, "elapsed_ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("client output without elapsed_ms: {out:?}"));
        assert!(ms < 2500, "connect {i} hung for {ms} ms: {out}");
    }
    assert_eq!(
        stat(&s.ns, CAPTURE_CX),
        3,
        "the fallback went through the proxy"
    );
    for (b, backend) in s.backends.iter_mut().enumerate() {
        assert!(
            backend
                .try_line("accepted", Duration::from_millis(200))
                .is_none(),
            "backend {b} accepted a connect with no endpoints"
        );
    }

    // SIGTERM: skiff detaches everything.
    sigterm_and_wait(s.skiff.take().unwrap());
    assert_no_programs_attached(s.cg.path());
}
