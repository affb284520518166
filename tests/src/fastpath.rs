//! Shared pieces of the `root_fastpath*` tests: the real `skiff run --fast-path` in a private
//! netns and cgroups, the `skiff-fastpeer` driver, per-backend counts and chi-square, the kernel
//! maps as `/debug/maps` shows them, and the `skiff control-plane --dir` files of the EDS tests.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{
    Cgroup, Child, Netns, TempYaml, admin, ads_bootstrap, built_binary, command_in, field,
    require_root, sidecar_args, skiff_run,
};

/// skiff's capture listener's connection counter (IPv4 scenarios).
pub const CAPTURE_CX: &str = "listener.127.0.0.1_15001.downstream_cx_total";

/// chi-square, 2 degrees of freedom, p = 0.001.
pub const CHI2_BOUND: f64 = 13.82;

/// `skiff-fastpeer`, this package's many-connection / UDP driver and multi-address server.
pub fn fastpeer() -> PathBuf {
    built_binary("skiff-fastpeer")
}

/// Spawns `skiff-fastpeer ARGS` (a server: `serve ADDR...`, `udp-serve ADDR...`) inside `ns`
/// and waits up to 5 s for its `ready` line.
pub fn spawn_fastpeer(ns: &Netns, args: &[&str]) -> Child {
    let mut peer = Child::spawn(command_in(Some(ns), None, fastpeer()).args(args));
    peer.expect_line("ready", Duration::from_secs(5));
    peer
}

/// Runs `skiff-fastpeer ARGS` inside `ns`, in `cgroup` if given, to completion; returns its
/// stdout trimmed.
pub fn fastpeer_output(ns: &Netns, cgroup: Option<&Path>, args: &[&str]) -> String {
    let out = command_in(Some(ns), cgroup, fastpeer())
        .args(args)
        .output()
        .expect("run fastpeer");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A fresh netns and cgroup named `name` (panics unless root).
pub fn netns_and_cgroup(name: &str) -> (Netns, Cgroup) {
    let env = require_root();
    let ns = Netns::new(name);
    let cg = Cgroup::new(&env, name);
    (ns, cg)
}

/// Spawns `skiff run --bootstrap <bootstrap> --fast-path MORE` inside `ns`, capturing the new
/// `app` child of `cg` (skiff moves itself to the `proxy` child). Returns skiff and `app`.
pub fn spawn_fast_path(
    ns: &Netns,
    cg: &mut Cgroup,
    bootstrap: &Path,
    more: &[&str],
) -> (Child, PathBuf) {
    let app = cg.child("app");
    let proxy = cg.child_path("proxy");
    let mut flags = vec!["--fast-path"];
    flags.extend_from_slice(more);
    let skiff = Child::spawn(skiff_run(ns, bootstrap).args(sidecar_args(&app, &proxy, &flags)));
    (skiff, app)
}

/// A static bootstrap for `skiff run --fast-path`: admin on 127.0.0.1:15000 and the capture
/// listener `virtualOutbound` (0.0.0.0:15001, original destination) with `chains`
/// ([`tcp_chain`] items), followed by `rest` (more listener items, then `  clusters:`).
pub fn capture_bootstrap(chains: &str, rest: &str) -> String {
    format!(
        r#"
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 15000 }} }}
static_resources:
  listeners:
  - name: virtualOutbound
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: 15001 }} }}
    use_original_dst: true
    filter_chains:{chains}
{rest}"#
    )
}

/// One `filter_chains` item of the capture listener: destination `vip`/`prefix_len` port 80,
/// a tcp_proxy (stat prefix `name`) to `cluster`.
pub fn tcp_chain(name: &str, vip: &str, prefix_len: u8, cluster: &str) -> String {
    format!(
        r#"
    - name: {name}
      filter_chain_match:
        destination_port: 80
        prefix_ranges: [{{ address_prefix: "{vip}", prefix_len: {prefix_len} }}]
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}"#
    )
}

/// One `filter_chains` item of the capture listener: destination `vip`/32 port 80, an HTTP
/// connection manager (stat prefix `http`) routing everything to `cluster` (stays in the
/// proxy: the fast path never takes HCM chains).
pub fn http_chain(vip: &str, cluster: &str) -> String {
    format!(
        r#"
    - name: http
      filter_chain_match:
        destination_port: 80
        prefix_ranges: [{{ address_prefix: "{vip}", prefix_len: 32 }}]
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: http
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: {cluster} }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"#
    )
}

/// One `clusters` item: STATIC cluster `name` with `policy` over `endpoints` (`ip:port`).
pub fn static_cluster(name: &str, policy: &str, endpoints: &[&str]) -> String {
    let eps: Vec<std::net::SocketAddr> = endpoints
        .iter()
        .map(|e| e.parse().expect("ip:port"))
        .collect();
    static_cluster_with(name, policy, &crate::lb_endpoints_yaml(&eps))
}

/// One `clusters` item: STATIC cluster `name` with `policy` and the given `lb_endpoints` items
/// (YAML lines indented 8 spaces, each ending in a newline).
pub fn static_cluster_with(name: &str, policy: &str, lb_endpoints: &str) -> String {
    format!(
        r#"  - name: {name}
    type: STATIC
    lb_policy: {policy}
    connect_timeout: 1s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
{lb_endpoints}"#
    )
}

/// One plain TCP connect from `app` to `vip` with `skiff-testpeer client` (4 KiB echoed,
/// 3 s timeout); returns its result line.
pub fn tcp_client(ns: &Netns, app: &Path, vip: &str) -> String {
    crate::testpeer_output(
        ns,
        Some(app),
        &["client", vip, "--bytes", "4096", "--timeout-ms", "3000"],
    )
}

/// Runs `skiff maps` inside `ns`, asserts it succeeds and returns its stdout.
pub fn skiff_maps(ns: &Netns) -> String {
    let out = command_in(Some(ns), None, built_binary("skiff"))
        .arg("maps")
        .output()
        .expect("skiff maps");
    assert!(out.status.success(), "skiff maps: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The number `key=N` in `line`, 0 if absent.
pub fn count(line: &str, key: &str) -> usize {
    field(line, key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Per-backend counts (`backend=N`) from a fastpeer result line, in `backends` order.
pub fn per_backend(line: &str, backends: &[&str]) -> Vec<usize> {
    backends.iter().map(|b| count(line, b)).collect()
}

/// Pearson's chi-square of `counts` against `shares` (expected fractions, same order).
pub fn chi_square(counts: &[usize], shares: &[f64]) -> f64 {
    let n: usize = counts.iter().sum();
    counts
        .iter()
        .zip(shares)
        .map(|(&o, p)| {
            let e = n as f64 * p;
            (o as f64 - e).powi(2) / e
        })
        .sum()
}

// === EDS updates through `skiff control-plane --dir` ===

/// Where `skiff control-plane` listens for skiff's ADS stream.
pub const XDS: &str = "127.0.0.1:15010";

/// How long the EDS tests wait for an update to reach the kernel.
pub const EDS_WAIT: Duration = Duration::from_secs(20);

/// The virtual outbound listener at `version`: `vip`:80 (/32, or /128 for IPv6) -> tcp_proxy -> EDS cluster
/// `svc`; `tcp_proxy_extra` is appended to the tcp_proxy's fields (`, "hash_policy": ...`).
pub fn eds_listeners(version: u32, vip: &str, tcp_proxy_extra: &str) -> String {
    let prefix_len = if vip.contains(':') { 128 } else { 32 };
    format!(
        r#"{{"version_info": "{version}", "resources": [{{
  "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
  "name": "virtualOutbound",
  "address": {{"socket_address": {{"address": "0.0.0.0", "port_value": 15001}}}},
  "use_original_dst": true,
  "filter_chains": [{{
    "name": "svc",
    "filter_chain_match": {{"destination_port": 80,
      "prefix_ranges": [{{"address_prefix": "{vip}", "prefix_len": {prefix_len}}}]}},
    "filters": [{{"name": "envoy.filters.network.tcp_proxy",
      "typed_config": {{"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "svc", "cluster": "svc"{tcp_proxy_extra}}}}}]}}]}}]}}"#
    )
}

/// Cluster `svc`: ROUND_ROBIN over EDS.
pub const EDS_CLUSTERS: &str = r#"{"version_info": "1", "resources": [{
  "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
  "name": "svc", "type": "EDS", "lb_policy": "ROUND_ROBIN", "connect_timeout": "1s",
  "eds_cluster_config": {"eds_config": {"ads": {}}}}]}"#;

/// The endpoints file of cluster `svc` at `version` with `endpoints` (`ip:port`).
pub fn endpoints_file(version: u32, endpoints: &[&str]) -> String {
    svc_endpoints_file(version, endpoints.iter().map(|e| lb_endpoint(e, "")))
}

/// One `lb_endpoints` item for `ip:port` (`[ip]:port` for IPv6), after `fields` (more JSON
/// fields, each ending in `, `).
fn lb_endpoint(endpoint: &str, fields: &str) -> String {
    let (ip, port) = endpoint.rsplit_once(':').expect("ip:port");
    let ip = ip.trim_start_matches('[').trim_end_matches(']');
    format!(
        r#"{{{fields}"endpoint": {{"address": {{"socket_address": {{"address": "{ip}", "port_value": {port}}}}}}}}}"#
    )
}

/// The ClusterLoadAssignment file of cluster `svc` at `version` with the `lb_endpoints` items.
fn svc_endpoints_file(version: u32, lb: impl Iterator<Item = String>) -> String {
    format!(
        r#"{{"version_info": "{version}", "resources": [{{
  "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
  "cluster_name": "svc",
  "endpoints": [{{"lb_endpoints": [{}]}}]}}]}}"#,
        lb.collect::<Vec<_>>().join(", ")
    )
}

/// Write through a temporary name and rename, so the control plane never reads half a file.
pub fn write_atomic(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write discovery file");
    std::fs::rename(&tmp, dir.join(name)).expect("rename discovery file");
}

/// Writes the listener, cluster and (version 1) `endpoints` files into `dir`, starts
/// `skiff control-plane --dir <dir>` on [`XDS`] inside `ns`, and returns it with an ADS
/// bootstrap for node `node` (admin on 15000) kept outside `dir`.
pub fn eds_control_plane(
    ns: &Netns,
    dir: &Path,
    node: &str,
    endpoints: &[&str],
) -> (Child, TempYaml) {
    write_atomic(dir, "listeners.json", &eds_listeners(1, "10.96.0.10", ""));
    write_atomic(dir, "clusters.json", EDS_CLUSTERS);
    write_atomic(dir, "endpoints.json", &endpoints_file(1, endpoints));
    let xds = XDS.parse().expect("XDS address");
    let bootstrap = TempYaml::new(node, &ads_bootstrap("GRPC", node, xds, 15000));
    let control_plane = Child::spawn(
        command_in(Some(ns), None, built_binary("skiff"))
            .args(["control-plane", "--listen", XDS, "--poll-interval", "50ms"])
            .arg("--dir")
            .arg(dir)
            .env("RUST_LOG", "info"),
    );
    (control_plane, bootstrap)
}

/// The endpoints the kernel serves for cluster `svc` (from `/debug/maps`, the reconciler's
/// applied image), sorted, or `None` if the cluster is not in the maps.
pub fn kernel_endpoints(ns: &Netns) -> Option<Vec<String>> {
    let (code, body) = admin(ns, "GET", "/debug/maps")?;
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

/// Polls (up to [`EDS_WAIT`]) until the kernel serves exactly `want` for `svc`.
pub fn wait_kernel_endpoints(ns: &Netns, want: &[&str]) {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    let deadline = Instant::now() + EDS_WAIT;
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

/// The endpoints file of cluster `svc` at `version`: each `(ip:port, healthy)` with its EDS
/// `health_status` (HEALTHY or UNHEALTHY).
pub fn endpoints_file_with_health(version: u32, endpoints: &[(&str, bool)]) -> String {
    svc_endpoints_file(
        version,
        endpoints.iter().map(|(e, healthy)| {
            let status = if *healthy { "HEALTHY" } else { "UNHEALTHY" };
            lb_endpoint(e, &format!(r#""health_status": "{status}", "#))
        }),
    )
}

/// Per node-mode pod scope, the services the kernel serves (`/debug/maps` `scope_services`, on
/// admin `port`): `(scope, vip, endpoints sorted)`, sorted.
pub fn scope_services(ns: &Netns, port: u16) -> Vec<(u64, String, Vec<String>)> {
    let Some((200, body)) = crate::admin_on(ns, port, "GET", "/debug/maps") else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&body).expect("/debug/maps is JSON");
    let mut out: Vec<(u64, String, Vec<String>)> = v["scope_services"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let mut eps: Vec<String> = s["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e.as_str().map(str::to_string))
                .collect();
            eps.sort();
            (
                s["scope"].as_u64().unwrap_or(0),
                s["vip"].as_str().unwrap_or("").to_string(),
                eps,
            )
        })
        .collect();
    out.sort();
    out
}

/// `skiff-fastpeer hold`: an application holding connections open, asked over its stdin to
/// check them (`check`); killed and reaped on drop.
pub struct Holder {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Holder {
    /// Starts `cmd` (a `skiff-fastpeer hold ...` command line) and waits for its `held ...`
    /// line, returned with it.
    pub fn spawn(mut cmd: std::process::Command) -> (Holder, String) {
        use std::process::Stdio;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn holder");
        let mut h = Holder {
            stdin: child.stdin.take(),
            out: std::io::BufReader::new(child.stdout.take().expect("holder stdout")),
            child,
        };
        let held = h.line();
        assert!(held.starts_with("held "), "holder: {held}");
        (h, held)
    }

    /// The next line the holder prints, trimmed.
    pub fn line(&mut self) -> String {
        use std::io::BufRead;
        let mut l = String::new();
        self.out.read_line(&mut l).expect("holder output");
        l.trim().to_string()
    }

    /// Asks the holder to check every held connection; its answer line.
    pub fn check(&mut self) -> String {
        use std::io::Write;
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
