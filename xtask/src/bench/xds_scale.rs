//! Control-plane scale: N EDS clusters with 10 endpoints each, pushed through
//! `skiff control-plane` to skiff and to Envoy (the same bootstrap for both), one at a time.
//! Measures time from process start until every cluster is active (all CDS and EDS updates
//! applied and ACKed), the process's RSS then, and its CPU seconds.
//!
//! With a pod cgroup, also `skiff-fastpath`: skiff `--fast-path` with the same clusters plus a
//! virtual listener with one /32 VIP chain per cluster (N services, 10 N endpoints), timed until
//! the BPF maps hold all N services and 10 N endpoints (the `skiff.bpf.fast_path.*` gauges),
//! with the duration of the last projection and map update skiff reports.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use super::env::{Cgroups, Netns, Proc, check_interrupt};
use super::procstat;

/// Endpoints per cluster, as the issue asks.
const ENDPOINTS: usize = 10;
const XDS: &str = "127.0.0.1:15010";
/// Admin and capture (virtual listener) ports of the proxy under test.
const ADMIN: u16 = 15900;
const CAPTURE: u16 = 15901;

/// One measured push.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleResult {
    /// `skiff` or `envoy`.
    pub proxy: String,
    /// Clusters pushed.
    pub clusters: usize,
    /// Seconds from start until all clusters were active (`None`: not within the limit).
    pub secs_to_active: Option<f64>,
    /// RSS then, MB.
    pub rss_mb: f64,
    /// CPU seconds used by the proxy until then.
    pub cpu_s: f64,
    /// `skiff-fastpath`: the last projection (snapshot -> map image), ms.
    pub project_ms: Option<f64>,
    /// `skiff-fastpath`: the last map update (image -> kernel, generation flip), ms.
    pub apply_ms: Option<f64>,
}

/// Service `i`'s VIP, inside 10.96.0.0/12 (only a map key; nothing connects to it).
fn vip(i: usize) -> String {
    format!("10.{}.{}.{}", 96 + i / 62_500, (i / 250) % 250, 1 + i % 250)
}

fn cluster_name(i: usize) -> String {
    format!("outbound|80||svc-{i}.bench.svc.cluster.local")
}

/// A virtual outbound listener with one /32 chain per cluster: tcp_proxy to `cluster_name(i)`.
fn fastpath_listeners(n: usize) -> String {
    let chains: Vec<String> = (0..n)
        .map(|i| {
            let (v, c) = (vip(i), cluster_name(i));
            format!(
                "{{\"name\": \"{v}_80\", \"filter_chain_match\": {{\"destination_port\": 80, \
                 \"prefix_ranges\": [{{\"address_prefix\": \"{v}\", \"prefix_len\": 32}}]}}, \
                 \"filters\": [{{\"name\": \"envoy.filters.network.tcp_proxy\", \"typed_config\": {{\
                 \"@type\": \"type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\", \
                 \"stat_prefix\": \"{c}\", \"cluster\": \"{c}\"}}}}]}}"
            )
        })
        .collect();
    format!(
        "{{\"version_info\": \"1\", \"resources\": [{{\
         \"@type\": \"type.googleapis.com/envoy.config.listener.v3.Listener\", \
         \"name\": \"virtualOutbound\", \"address\": {{\"socket_address\": {{\"address\": \"0.0.0.0\", \
         \"port_value\": {CAPTURE}}}}}, \"use_original_dst\": true, \"filter_chains\": [\n{}\n]}}]}}\n",
        chains.join(",\n")
    )
}

fn write_files(dir: &Path, n: usize) -> anyhow::Result<()> {
    let mut cds = String::from("{\"version_info\": \"1\", \"resources\": [\n");
    let mut eds = String::from("{\"version_info\": \"1\", \"resources\": [\n");
    for i in 0..n {
        let sep = if i + 1 == n { "" } else { "," };
        let name = cluster_name(i);
        cds.push_str(&format!(
            "{{\"@type\": \"type.googleapis.com/envoy.config.cluster.v3.Cluster\", \"name\": \"{name}\", \
             \"type\": \"EDS\", \"connect_timeout\": \"1s\", \"eds_cluster_config\": {{\"eds_config\": {{\"ads\": {{}}}}}}}}{sep}\n"
        ));
        let eps: Vec<String> = (0..ENDPOINTS)
            .map(|j| {
                let k = i * ENDPOINTS + j;
                format!(
                    "{{\"endpoint\": {{\"address\": {{\"socket_address\": {{\"address\": \"127.{}.{}.{}\", \"port_value\": 8080}}}}}}}}",
                    1 + (k >> 16) % 254,
                    (k >> 8) & 255,
                    1 + (k & 255) % 254
                )
            })
            .collect();
        eds.push_str(&format!(
            "{{\"@type\": \"type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment\", \
             \"cluster_name\": \"{name}\", \"endpoints\": [{{\"lb_endpoints\": [{}]}}]}}{sep}\n",
            eps.join(", ")
        ));
    }
    cds.push_str("]}\n");
    eds.push_str("]}\n");
    std::fs::write(dir.join("clusters.json"), cds)?;
    std::fs::write(dir.join("endpoints.json"), eds)?;
    std::fs::write(
        dir.join("listeners.json"),
        "{\"version_info\": \"1\", \"type_url\": \"type.googleapis.com/envoy.config.listener.v3.Listener\", \"resources\": []}\n",
    )?;
    Ok(())
}

fn bootstrap(admin: u16) -> String {
    format!(
        r#"node: {{ id: "sidecar~127.0.0.1~bench.default~default.svc.cluster.local", cluster: bench }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [ {{ envoy_grpc: {{ cluster_name: xds }} }} ]
  lds_config: {{ ads: {{}}, resource_api_version: V3 }}
  cds_config: {{ ads: {{}}, resource_api_version: V3 }}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: xds
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 15010 }} }} }} }} ] }} ]
"#
    )
}

/// One counter or gauge from an admin `/stats` (call on a thread inside the namespace).
pub fn stat(admin: SocketAddr, name: &str) -> Option<u64> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let req =
        format!("GET /stats?filter={name} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.lines().find_map(|l| {
        l.trim()
            .strip_prefix(name)?
            .strip_prefix(": ")?
            .trim()
            .parse()
            .ok()
    })
}

/// `cluster_manager.active_clusters` (skiff and Envoy name it alike).
fn active_clusters(admin: SocketAddr) -> Option<u64> {
    stat(admin, "cluster_manager.active_clusters")
}

/// Whether the fast-path maps hold `n` services and `n * ENDPOINTS` endpoints.
fn fast_path_complete(admin: SocketAddr, n: usize) -> bool {
    stat(admin, "skiff.bpf.fast_path.services") == Some(n as u64)
        && stat(admin, "skiff.bpf.fast_path.endpoints") == Some((n * ENDPOINTS) as u64)
}

/// Start `cmd` and poll (bounded) until `done(admin)`; the time from start, RSS and CPU then.
fn measure(
    ns: &Netns,
    name: &str,
    cmd: &mut std::process::Command,
    log: &Path,
    n: usize,
    done: fn(SocketAddr, usize) -> bool,
) -> anyhow::Result<(ScaleResult, Proc)> {
    let admin_addr: SocketAddr = format!("127.0.0.1:{ADMIN}").parse()?;
    let start = Instant::now();
    let mut p = Proc::spawn(name, cmd, log)?;
    let limit = Duration::from_secs(120);
    let reached = ns.on_thread(move || {
        while start.elapsed() < limit && !super::env::interrupted() {
            if done(admin_addr, n) {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    })?;
    p.check_alive(log)?;
    let u = procstat::usage(p.pid());
    Ok((
        ScaleResult {
            proxy: name.into(),
            clusters: n,
            secs_to_active: reached.map(|d| d.as_secs_f64()),
            rss_mb: u.rss_kb as f64 / 1024.0,
            cpu_s: u.cpu_s,
            project_ms: None,
            apply_ms: None,
        },
        p,
    ))
}

fn start_control_plane(ns: &Netns, skiff: &Path, dir: &Path, log: &Path) -> anyhow::Result<Proc> {
    let cp = Proc::spawn(
        "skiff control-plane",
        ns.cmd(skiff)
            .args(["control-plane", "--listen", XDS, "--dir"])
            .arg(dir)
            .env("RUST_LOG", "warn"),
        log,
    )?;
    ns.wait_port(XDS.parse()?, Duration::from_secs(60))?;
    Ok(cp)
}

/// Push `sizes` clusters to skiff (and Envoy when given), one process at a time; with `pod`
/// (a cgroup created by the caller), also N fast-path services to skiff `--fast-path`.
pub fn run(
    ns: &Netns,
    skiff: &Path,
    envoy: Option<&Path>,
    pod: Option<&Path>,
    sizes: &[usize],
    out: &Path,
) -> anyhow::Result<Vec<ScaleResult>> {
    let mut results = Vec::new();
    let all_active = |admin: SocketAddr, n: usize| {
        // + the static xds cluster
        active_clusters(admin).is_some_and(|a| a > n as u64)
    };
    for &n in sizes {
        let dir = out.join(format!("xds-scale-{n}"));
        std::fs::create_dir_all(&dir)?;
        write_files(&dir, n)?;
        let cp_log = out
            .join("logs")
            .join(format!("xds-scale-{n}-control-plane.log"));
        let mut cp = start_control_plane(ns, skiff, &dir, &cp_log)?;
        let boot = dir.join("bootstrap.yaml");
        std::fs::write(&boot, bootstrap(ADMIN))?;
        let mut proxies: Vec<(&str, std::process::Command)> = Vec::new();
        let mut c = ns.cmd(skiff);
        c.args(["run", "--capture", "none", "--outbound-port"])
            .arg(CAPTURE.to_string())
            .arg("--bootstrap")
            .arg(&boot)
            .env("RUST_LOG", "warn");
        proxies.push(("skiff", c));
        if let Some(e) = envoy {
            let mut c = ns.cmd(e);
            c.arg("-c").arg(&boot).args([
                "--concurrency",
                "1",
                "--log-level",
                "warn",
                "--base-id",
                "7",
            ]);
            proxies.push(("envoy", c));
        }
        for (name, mut cmd) in proxies {
            check_interrupt()?;
            eprintln!("bench: xds-scale {n} clusters -> {name}");
            let log = out.join("logs").join(format!("xds-scale-{n}-{name}.log"));
            let (r, p) = measure(ns, name, &mut cmd, &log, n, all_active)?;
            results.push(r);
            drop(p);
            // Let the admin and listener ports go before the next proxy binds them.
            std::thread::sleep(Duration::from_millis(300));
        }
        cp.check_alive(&cp_log)?;
        drop(cp);

        let Some(pod) = pod else { continue };
        check_interrupt()?;
        // The same clusters, plus one /32 VIP chain per cluster on the virtual listener.
        let dir = out.join(format!("xds-scale-{n}-fastpath"));
        std::fs::create_dir_all(&dir)?;
        write_files(&dir, n)?;
        std::fs::write(dir.join("listeners.json"), fastpath_listeners(n))?;
        let cp_log = out
            .join("logs")
            .join(format!("xds-scale-{n}-fastpath-control-plane.log"));
        let mut cp = start_control_plane(ns, skiff, &dir, &cp_log)?;
        let boot = out.join(format!("xds-scale-{n}-fastpath-bootstrap.yaml"));
        std::fs::write(&boot, bootstrap(ADMIN))?;
        let name = "skiff-fastpath";
        eprintln!("bench: xds-scale {n} services -> {name}");
        let log = out.join("logs").join(format!("xds-scale-{n}-{name}.log"));
        let mut c = ns.cmd(skiff);
        c.args(["run", "--fast-path", "--no-ipv6", "--outbound-port"])
            .arg(CAPTURE.to_string())
            .arg("--bootstrap")
            .arg(&boot)
            .arg("--cgroup")
            .arg(pod);
        if let Some(parent) = pod.parent() {
            c.arg("--proxy-cgroup").arg(parent.join("skiff-proxy"));
        }
        c.env("RUST_LOG", "warn");
        let (mut r, p) = measure(ns, name, &mut c, &log, n, fast_path_complete)?;
        let admin_addr: SocketAddr = format!("127.0.0.1:{ADMIN}").parse()?;
        let (project, apply) = ns.on_thread(move || {
            (
                stat(admin_addr, "skiff.bpf.fast_path.last_project_us"),
                stat(admin_addr, "skiff.bpf.fast_path.last_apply_us"),
            )
        })?;
        r.project_ms = project.map(|us| us as f64 / 1000.0);
        r.apply_ms = apply.map(|us| us as f64 / 1000.0);
        results.push(r);
        drop(p);
        std::thread::sleep(Duration::from_millis(300));
        cp.check_alive(&cp_log)?;
        drop(cp);
    }
    if results.iter().all(|r| r.secs_to_active.is_none()) {
        bail!(
            "no proxy reached the pushed cluster count; see the logs in {}",
            out.display()
        );
    }
    Ok(results)
}

/// Markdown table of the results.
pub fn table(results: &[ScaleResult]) -> String {
    let ms = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
    let mut md = String::from(
        "| proxy | clusters (x10 endpoints) | time to all active (s) | RSS (MB) | CPU (s) | last projection (ms) | last map update (ms) |\n|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        md.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.2} | {} | {} |\n",
            r.proxy,
            r.clusters,
            r.secs_to_active
                .map(|s| format!("{s:.2}"))
                .unwrap_or_else(|| "not reached".into()),
            r.rss_mb,
            r.cpu_s,
            ms(r.project_ms),
            ms(r.apply_ms),
        ));
    }
    md
}

/// Run the scale case on its own: `cargo xtask bench --xds-scale 1000,10000`.
pub fn standalone(skiff: &Path, envoy: Option<&Path>, sizes: &[usize]) -> anyhow::Result<()> {
    let root = crate::util::workspace_root();
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let out = root
        .join("target/bench")
        .join(format!("{started}-xds-scale"));
    std::fs::create_dir_all(out.join("logs"))?;
    let pid = std::process::id();
    let ns = Netns::create(&format!("skiff-bench-{pid}"), super::VIP)
        .context("creating the bench namespace")?;
    // skiff --fast-path needs a pod cgroup to attach to: one created here, removed at the end.
    let mut cgroups = Cgroups(Vec::new());
    let node = cgroups.create(crate::util::cgroup2_mount()?.join(format!("skiff-bench-{pid}")))?;
    let pod = cgroups.create(node.join("app"))?;
    cgroups.adopt(node.join("skiff-proxy"));
    let res = run(&ns, skiff, envoy, Some(&pod), sizes, &out);
    drop(ns);
    drop(cgroups);
    let res = res?;
    let md = table(&res);
    std::fs::write(out.join("xds-scale.md"), &md)?;
    std::fs::write(
        out.join("xds-scale.json"),
        serde_json::to_string_pretty(&res)?,
    )?;
    println!("{md}");
    eprintln!("bench: results in {}", out.display());
    Ok(())
}
