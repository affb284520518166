//! Root end-to-end test of `skiff run --fast-path --terminate-on-removal`: the real skiff fed
//! over ADS by the real `skiff control-plane --dir`, in a private network namespace (loopback
//! only) and cgroups this test creates. An application holds fast-path connections to three
//! backends; when an EDS update removes one backend, the connections to it are destroyed (the
//! application sees a reset) and the others stay open.
//!
//! Run: `cargo build -p skiff -p skiff-tests --bins && cargo test -p skiff-tests --features root
//! --test root_fastpath_terminate -- --test-threads=1` (as root).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, ChildStdout, Stdio};
use std::time::{Duration, Instant};

use skiff_tests::{Cgroup, Child, Netns, built_binary, command_in, field, require_root, serial};

fn fastpeer() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_skiff-fastpeer"))
}

const VIP: &str = "10.96.0.10:80";
const BACKENDS: [&str; 3] = ["127.0.0.21:8080", "127.0.0.22:8080", "127.0.0.23:8080"];
const XDS: &str = "127.0.0.1:15010";
const WAIT: Duration = Duration::from_secs(20);

const BOOTSTRAP: &str = r#"
node: { id: "sidecar~127.0.0.1~fp-term.default~default.svc.cluster.local", cluster: fp-term }
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

/// The endpoints the kernel serves for cluster `svc` (from `/debug/maps`).
fn kernel_endpoints(ns: &Netns) -> Option<Vec<String>> {
    let (code, body) = skiff_tests::admin(ns, "GET", "/debug/maps")?;
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

fn wait_kernel_endpoints(ns: &Netns, want: &[&str]) {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
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
    // Field order is drop order: processes first, then cgroups, the netns and the files.
    _skiff: Child,
    _control_plane: Child,
    _backends: Child,
    ns: Netns,
    _cg: Cgroup,
    dir: tempfile::TempDir,
    app: PathBuf,
}

impl Drop for Scenario {
    // The bootstrap sits beside the temp dir, whose own drop does not remove it.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.dir.path().with_extension("bootstrap.yaml"));
    }
}

fn scenario(name: &str) -> Scenario {
    let env = require_root();
    let ns = Netns::new(name);
    let mut cg = Cgroup::new(&env, name);
    let mut backends = Child::spawn(
        command_in(Some(&ns), None, fastpeer())
            .arg("serve")
            .args(BACKENDS),
    );
    backends.expect_line("ready", Duration::from_secs(5));
    let dir = tempfile::Builder::new()
        .prefix(&format!("{}-", skiff_tests::test_name(name)))
        .tempdir()
        .expect("tempdir");
    write_atomic(dir.path(), "listeners.json", LISTENERS);
    write_atomic(dir.path(), "clusters.json", CLUSTERS);
    write_atomic(dir.path(), "endpoints.json", &endpoints_file(1, &BACKENDS));
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
        .args(["--fast-path", "--terminate-on-removal", "--cgroup"])
        .arg(&app)
        .arg("--proxy-cgroup")
        .arg(&proxy_cg)
        .env("RUST_LOG", "info,skiff=debug");
    let skiff = Child::spawn(&mut cmd);
    Scenario {
        _skiff: skiff,
        _control_plane: control_plane,
        _backends: backends,
        ns,
        _cg: cg,
        dir,
        app,
    }
}

/// An application holding fast-path connections; killed and reaped on drop.
struct Holder {
    child: std::process::Child,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
}

impl Holder {
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.out.read_line(&mut l).expect("holder output");
        l.trim().to_string()
    }

    fn check(&mut self) -> String {
        let stdin = self.stdin.as_mut().expect("holder stdin");
        writeln!(stdin, "check").expect("ask holder");
        stdin.flush().expect("flush holder stdin");
        self.line()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn count(line: &str, key: &str) -> usize {
    field(line, key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

#[test]
fn removed_endpoint_connections_are_reset_and_the_others_survive() {
    let _g = serial();
    let s = scenario("fp-term");
    wait_kernel_endpoints(&s.ns, &BACKENDS);
    // Connects are captured only once skiff opens its ready gate.
    skiff_tests::wait_admin_ready(&s.ns);

    let mut child = command_in(Some(&s.ns), Some(&s.app), fastpeer())
        .args(["hold", VIP, "--n", "9"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn holder");
    let mut h = Holder {
        stdin: child.stdin.take(),
        out: BufReader::new(child.stdout.take().expect("holder stdout")),
        child,
    };
    let held = h.line();
    assert!(held.starts_with("held "), "holder: {held}");
    // Round robin (per-CPU cursors): every backend holds some.
    let n: Vec<usize> = BACKENDS.iter().map(|b| count(&held, b)).collect();
    assert!(n.iter().all(|c| *c > 0), "{held}");
    let before = h.check();
    assert_eq!(
        BACKENDS
            .iter()
            .map(|b| count(&before, &format!("alive.{b}")))
            .sum::<usize>(),
        9,
        "{before}"
    );

    // EDS drops the second backend; once the kernel maps no longer hold it, its sockets are gone.
    write_atomic(
        s.dir.path(),
        "endpoints.json",
        &endpoints_file(2, &[BACKENDS[0], BACKENDS[2]]),
    );
    wait_kernel_endpoints(&s.ns, &[BACKENDS[0], BACKENDS[2]]);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after = h.check();
    while count(&after, &format!("dead.{}", BACKENDS[1])) < n[1] && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        after = h.check();
    }
    assert_eq!(
        count(&after, &format!("dead.{}", BACKENDS[1])),
        n[1],
        "{after}"
    );
    assert_eq!(
        count(&after, &format!("alive.{}", BACKENDS[0])),
        n[0],
        "{after}"
    );
    assert_eq!(
        count(&after, &format!("alive.{}", BACKENDS[2])),
        n[2],
        "{after}"
    );
    assert_eq!(
        skiff_tests::admin_stat(&s.ns, "skiff.bpf.fast_path.terminated_sockets"),
        n[1] as u64
    );
}
