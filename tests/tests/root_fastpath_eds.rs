//! Root end-to-end test of the kernel fast path under EDS updates: the real `skiff run
//! --fast-path` fed over ADS by the real `skiff control-plane --dir`, in a private network
//! namespace (loopback only) and cgroups this test creates. An endpoint removed from the
//! endpoints file stops receiving fast-path connects once skiff has ACKed the new version, and a
//! cluster left without endpoints falls back to the proxy, which closes (never hangs).
//!
//! Run: `cargo build -p skiff -p skiff-tests --bins && cargo test -p skiff-tests --features root
//! --test root_fastpath_eds -- --test-threads=1` (as root).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use skiff_tests::{
    Cgroup, Child, Netns, assert_no_programs_attached, built_binary, command_in, field,
    require_root,
};

fn testpeer() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_skiff-testpeer"))
}

const VIP: &str = "10.96.0.10:80";
const BACKENDS: [&str; 3] = ["127.0.0.21:8080", "127.0.0.22:8080", "127.0.0.23:8080"];
const CAPTURE_CX: &str = "listener.127.0.0.1:15001.downstream_cx_total";
const XDS: &str = "127.0.0.1:15010";
const WAIT: Duration = Duration::from_secs(20);

/// skiff's bootstrap: everything but the xDS cluster comes over ADS.
const BOOTSTRAP: &str = r#"
node: { id: "sidecar~127.0.0.1~fp-eds.default~default.svc.cluster.local", cluster: fp-eds }
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: 15000 } }
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [ { envoy_grpc: { cluster_name: xds } } ]
  lds_config: { ads: {} }
  cds_config: { ads: {} }
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: xds
      endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 15010 } } } } ] } ]
"#;

/// The virtual outbound listener: 10.96.0.10:80 (/32) -> tcp_proxy -> EDS cluster `svc`.
const LISTENERS: &str = r#"{"version_info": "1", "resources": [{
  "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
  "name": "virtualOutbound",
  "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15001}},
  "use_original_dst": true,
  "filter_chains": [{
    "name": "svc",
    "filter_chain_match": {"destination_port": 80,
      "prefix_ranges": [{"address_prefix": "10.96.0.10", "prefix_len": 32}]},
    "filters": [{"name": "envoy.filters.network.tcp_proxy",
      "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "svc", "cluster": "svc"}}]}]}]}"#;

const CLUSTERS: &str = r#"{"version_info": "1", "resources": [{
  "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
  "name": "svc", "type": "EDS", "lb_policy": "ROUND_ROBIN", "connect_timeout": "1s",
  "eds_cluster_config": {"eds_config": {"ads": {}}}}]}"#;

fn endpoints_file(version: u32, endpoints: &[&str]) -> String {
    let lb: Vec<String> = endpoints
        .iter()
        .map(|e| {
            let (ip, port) = e.split_once(':').expect("ip:port");
            format!(
                r#"{{"endpoint": {{"address": {{"socket_address": {{"address": "{ip}", "port_value": {port}}}}}}}}}"#
            )
        })
        .collect();
    format!(
        r#"{{"version_info": "{version}", "resources": [{{
  "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
  "cluster_name": "svc",
  "endpoints": [{{"lb_endpoints": [{}]}}]}}]}}"#,
        lb.join(", ")
    )
}

/// Write through a temporary name and rename, so the control plane never reads half a file.
fn write_atomic(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write discovery file");
    std::fs::rename(&tmp, dir.join(name)).expect("rename discovery file");
}

fn admin(ns: &Netns, path: &str) -> Option<(u16, String)> {
    skiff_tests::admin(ns, "GET", path)
}

fn stat(ns: &Netns, name: &str) -> u64 {
    skiff_tests::admin_stat(ns, name)
}

/// The endpoints the kernel serves for cluster `svc` (from `/debug/maps`, the reconciler's
/// applied image), or `None` if the cluster is not in the maps.
fn kernel_endpoints(ns: &Netns) -> Option<Vec<String>> {
    let (code, body) = admin(ns, "/debug/maps")?;
    assert_eq!(code, 200, "/debug/maps: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("/debug/maps is JSON");
    let cluster = v["clusters"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == "svc")?;
    let mut eps: Vec<String> = cluster["endpoints"]
        .as_array()?
        .iter()
        .filter_map(|e| e.as_str().map(str::to_string))
        .collect();
    eps.sort();
    Some(eps)
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

/// Poll (bounded) until the kernel serves exactly `want` for `svc`.
fn wait_kernel_endpoints(ns: &Netns, want: &[&str]) {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    let deadline = Instant::now() + WAIT;
    let mut last = None;
    while Instant::now() < deadline {
        last = kernel_endpoints(ns);
        if last.as_ref() == Some(&want) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("kernel endpoints of svc: wanted {want:?}, last {last:?}");
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
    app: PathBuf,
}

fn scenario(name: &str) -> Scenario {
    let env = require_root();
    let ns = Netns::new(name);
    let mut cg = Cgroup::new(&env, name);
    let mut backends = Vec::new();
    for addr in BACKENDS {
        let mut b = Child::spawn(command_in(Some(&ns), None, testpeer()).args(["origdst", addr]));
        b.expect_line("ready", Duration::from_secs(5));
        backends.push(b);
    }
    let dir = tempfile::Builder::new()
        .prefix(&format!("{}-", skiff_tests::test_name(name)))
        .tempdir()
        .expect("tempdir");
    write_atomic(dir.path(), "listeners.json", LISTENERS);
    write_atomic(dir.path(), "clusters.json", CLUSTERS);
    write_atomic(dir.path(), "endpoints.json", &endpoints_file(1, &BACKENDS));
    // Beside the directory: the control plane reads every file inside it.
    let bootstrap = dir.path().with_extension("bootstrap.yaml");
    std::fs::write(&bootstrap, BOOTSTRAP).expect("write bootstrap");

    let control_plane = Child::spawn(
        command_in(Some(&ns), None, built_binary("skiff"))
            .args(["control-plane", "--listen", XDS, "--poll-interval", "50ms"])
            .arg("--dir")
            .arg(dir.path())
            .env("RUST_LOG", "info"),
    );

    let app = cg.child("app");
    let proxy_cg = cg.child_path("proxy");
    let mut cmd = command_in(Some(&ns), None, built_binary("skiff"));
    cmd.arg("run")
        .arg("--bootstrap")
        .arg(&bootstrap)
        .args(["--fast-path", "--cgroup"])
        .arg(&app)
        .arg("--proxy-cgroup")
        .arg(&proxy_cg)
        .env("RUST_LOG", "info,skiff=debug");
    let skiff = Child::spawn(&mut cmd);
    Scenario {
        skiff: Some(skiff),
        _control_plane: control_plane,
        backends,
        ns,
        cg,
        dir,
        app,
    }
}

impl Drop for Scenario {
    // The bootstrap sits beside the temp dir, whose own drop does not remove it.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.dir.path().with_extension("bootstrap.yaml"));
    }
}

fn client(s: &Scenario) -> String {
    let out = command_in(Some(&s.ns), Some(&s.app), testpeer())
        .args(["client", VIP, "--bytes", "4096", "--timeout-ms", "3000"])
        .output()
        .expect("run client");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
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
    let skiff = s.skiff.take().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(skiff.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM skiff");
    let (status, _) = skiff.wait(Duration::from_secs(15));
    assert!(status.success(), "skiff exited with {status}");
    assert_no_programs_attached(s.cg.path());
}
