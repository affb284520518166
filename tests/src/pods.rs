//! Shared pieces of the node-mode pod tests (`root_pods`, `root_fastpath_pods`): one skiff in a
//! "node" netns serving pods registered with `skiff node add-pod`, each pod with its own
//! bootstrap sending the VIP [`VIP`] to one of two backends, [`A`] and [`B`].

use std::path::{Path, PathBuf};

use crate::{
    Cgroup, Child, Netns, TempYaml, passthrough_bootstrap, require_root, skiff_node, skiff_run,
    spawn_testpeer, wait_admin_ready,
};

/// The VIP every pod's configuration routes.
pub const VIP: &str = "10.96.0.1:80";
/// Backend A, as every pod's netns holds it.
pub const A: &str = "127.0.0.11:8080";
/// Backend B, as every pod's netns holds it.
pub const B: &str = "127.0.0.12:8080";

/// The node skiff's own bootstrap: nothing but PassthroughCluster (each pod brings its own).
pub fn node_bootstrap() -> String {
    passthrough_bootstrap(
        "node~127.0.0.1~skiff-node.default~default.svc.cluster.local",
        "node",
    )
}

/// A pod's own bootstrap: [`VIP`] goes to cluster `name` (STATIC, one endpoint `backend`,
/// `ip:port`).
pub fn pod_bootstrap(name: &str, backend: &str) -> String {
    let (ip, port) = backend.split_once(':').expect("backend is ip:port");
    format!(
        r#"
node: {{ id: placeholder, cluster: pods }}
static_resources:
  listeners:
  - name: virtualOutbound
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: 15001 }} }}
    use_original_dst: true
    filter_chains:
    - name: vip
      filter_chain_match:
        destination_port: 80
        prefix_ranges: [{{ address_prefix: 10.96.0.1, prefix_len: 32 }}]
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {name}
  clusters:
  - name: {name}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }} }}
"#
    )
}

/// A pod's listeners over ADS (`skiff control-plane --dir` file): [`VIP`] goes to cluster
/// `svc-ads`.
pub const ADS_LISTENERS: &str = r#"{"version_info": "1", "resources": [{
  "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
  "name": "virtualOutbound",
  "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15001}},
  "use_original_dst": true,
  "filter_chains": [{
    "name": "vip",
    "filter_chain_match": {"destination_port": 80,
      "prefix_ranges": [{"address_prefix": "10.96.0.1", "prefix_len": 32}]},
    "filters": [{"name": "envoy.filters.network.tcp_proxy",
      "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "svc-ads", "cluster": "svc-ads"}}]}]}]}"#;

/// A pod's clusters over ADS: `svc-ads`, STATIC, endpoint [`A`].
pub const ADS_CLUSTERS: &str = r#"{"version_info": "1", "resources": [{
  "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
  "name": "svc-ads", "type": "STATIC", "connect_timeout": "1s",
  "load_assignment": {"cluster_name": "svc-ads", "endpoints": [{"lb_endpoints": [
    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.11", "port_value": 8080}}}}]}]}}]}"#;

/// Backends [`A`] and [`B`] (`skiff-testpeer origdst`) inside `ns`.
pub fn backends_in(ns: &Netns) -> [Child; 2] {
    [A, B].map(|addr| spawn_testpeer(ns, None, &["origdst", addr]))
}

/// `skiff run --mode node ARGS --cgroup-root <root>` inside `ns`: the node skiff serving the
/// pods.
pub fn node_skiff(ns: &Netns, bootstrap: &Path, root: &Path, args: &[&str]) -> Child {
    Child::spawn(
        skiff_run(ns, bootstrap)
            .args(["--mode", "node"])
            // Pod bootstraps are TempYaml files: the node skiff reads them only from there.
            .arg("--pod-bootstrap-dir")
            .arg(std::env::temp_dir())
            .args(args)
            .arg("--cgroup-root")
            .arg(root)
            .env("RUST_LOG", "info"),
    )
}

/// One connect from `cgroup` in `ns` to [`VIP`] with `skiff-testpeer client` (4 KiB echoed,
/// 3 s timeout); returns its result line.
pub fn vip_client(ns: &Netns, cgroup: &Path) -> String {
    crate::testpeer_output(
        ns,
        Some(cgroup),
        &["client", VIP, "--bytes", "4096", "--timeout-ms", "3000"],
    )
}

/// `skiff node add-pod` registering cgroup `pod` with its netns, node id and (unless it comes
/// over ADS) bootstrap; returns the node skiff's JSON answer.
pub fn add_pod(
    node_ns: &Netns,
    pod: &Path,
    pod_ns: &Netns,
    node_id: &str,
    bootstrap: Option<&Path>,
) -> String {
    let pod_ns = pod_ns.path();
    let mut args = vec![
        "add-pod",
        "--cgroup",
        pod.to_str().unwrap(),
        "--netns",
        pod_ns.to_str().unwrap(),
        "--node-id",
        node_id,
    ];
    if let Some(b) = bootstrap {
        args.extend(["--bootstrap", b.to_str().unwrap()]);
    }
    skiff_node(node_ns, &args)
}

/// Two pods under one node skiff, none registered yet: pod 1 (cgroup `pods[0]`, netns `ns[0]`)
/// with bootstrap `boots[0]` sending [`VIP`] to cluster `svc-a` at [`A`], pod 2 likewise to
/// `svc-b` at [`B`]. Both backends run in each pod's netns (`backends[pod][0]` is A), so the
/// backend a connect reaches shows whose configuration served it. Fields drop in the order that
/// cleans up: skiff first, the netns last.
pub struct TwoPods {
    /// The node skiff (`skiff run --mode node`), admin ready.
    pub proxy: Child,
    /// The pods' bootstraps, for `add-pod --bootstrap`.
    pub boots: [TempYaml; 2],
    /// The node skiff's bootstrap ([`node_bootstrap`]).
    pub node_boot: TempYaml,
    /// Backends A and B in each pod's netns.
    pub backends: [[Child; 2]; 2],
    /// The pods' cgroups (children of `cg`).
    pub pods: [PathBuf; 2],
    /// The node root cgroup.
    pub cg: Cgroup,
    /// The pods' netns.
    pub ns: [Netns; 2],
    /// The node skiff's netns.
    pub node_ns: Netns,
}

impl TwoPods {
    /// Creates netns `<name>-node`, `<name>-p1`, `<name>-p2`, cgroup `<name>` with `pod1` and
    /// `pod2`, the backends and bootstraps, and starts the node skiff with `skiff_args` on
    /// `<name>` (panics unless root).
    pub fn start(name: &str, skiff_args: &[&str]) -> TwoPods {
        let env = require_root();
        let node_ns = Netns::new(&format!("{name}-node"));
        let ns = [1, 2].map(|i| Netns::new(&format!("{name}-p{i}")));
        let mut cg = Cgroup::new(&env, name);
        let pods = [cg.child("pod1"), cg.child("pod2")];
        let backends = [backends_in(&ns[0]), backends_in(&ns[1])];
        let node_boot = TempYaml::new(&format!("{name}-node"), &node_bootstrap());
        let boots = [("1", "svc-a", A), ("2", "svc-b", B)]
            .map(|(i, svc, at)| TempYaml::new(&format!("{name}-{i}"), &pod_bootstrap(svc, at)));
        let proxy = node_skiff(&node_ns, &node_boot, cg.path(), skiff_args);
        wait_admin_ready(&node_ns);
        TwoPods {
            proxy,
            boots,
            node_boot,
            backends,
            pods,
            cg,
            ns,
            node_ns,
        }
    }
}
