//! Control-plane scale: N EDS clusters with 10 endpoints each, pushed through
//! `skiff control-plane` to skiff and to Envoy (the same bootstrap for both), one at a time.
//! Measures time from process start until every cluster is active (all CDS and EDS updates
//! applied and ACKed), the process's RSS then, and its CPU seconds.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use super::env::{Netns, Proc, check_interrupt};
use super::procstat;

/// Endpoints per cluster, as the issue asks.
const ENDPOINTS: usize = 10;
const XDS: &str = "127.0.0.1:15010";

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
}

fn write_files(dir: &Path, n: usize) -> anyhow::Result<()> {
    let mut cds = String::from("{\"version_info\": \"1\", \"resources\": [\n");
    let mut eds = String::from("{\"version_info\": \"1\", \"resources\": [\n");
    for i in 0..n {
        let sep = if i + 1 == n { "" } else { "," };
        let name = format!("outbound|80||svc-{i}.bench.svc.cluster.local");
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

/// `cluster_manager.active_clusters` from an admin `/stats` (skiff and Envoy name it alike).
fn active_clusters(admin: SocketAddr) -> Option<u64> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let req = format!(
        "GET /stats?filter=cluster_manager.active_clusters HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.lines().find_map(|l| {
        l.trim()
            .strip_prefix("cluster_manager.active_clusters: ")?
            .trim()
            .parse()
            .ok()
    })
}

/// Push `sizes` clusters to skiff (and Envoy when given), one process at a time.
pub fn run(
    ns: &Netns,
    skiff: &Path,
    envoy: Option<&Path>,
    sizes: &[usize],
    out: &Path,
) -> anyhow::Result<Vec<ScaleResult>> {
    let mut results = Vec::new();
    for &n in sizes {
        let dir = out.join(format!("xds-scale-{n}"));
        std::fs::create_dir_all(&dir)?;
        write_files(&dir, n)?;
        let cp_log = out
            .join("logs")
            .join(format!("xds-scale-{n}-control-plane.log"));
        let mut cp = Proc::spawn(
            "skiff control-plane",
            ns.cmd(skiff)
                .args(["control-plane", "--listen", XDS, "--dir"])
                .arg(&dir)
                .env("RUST_LOG", "warn"),
            &cp_log,
        )?;
        ns.wait_port(XDS.parse()?, Duration::from_secs(60))?;
        let admin = 15900;
        let boot = dir.join("bootstrap.yaml");
        std::fs::write(&boot, bootstrap(admin))?;
        let mut proxies: Vec<(&str, std::process::Command)> = Vec::new();
        let mut c = ns.cmd(skiff);
        c.args([
            "run",
            "--capture",
            "none",
            "--outbound-port",
            "15901",
            "--bootstrap",
        ])
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
            let start = Instant::now();
            let mut p = Proc::spawn(name, &mut cmd, &log)?;
            let want = n as u64 + 1; // + the static xds cluster
            let limit = Duration::from_secs(120);
            let admin_addr: SocketAddr = format!("127.0.0.1:{admin}").parse()?;
            let done = ns.on_thread(move || {
                while start.elapsed() < limit && !super::env::interrupted() {
                    if active_clusters(admin_addr).is_some_and(|a| a >= want) {
                        return Some(start.elapsed());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                None
            })?;
            p.check_alive(&log)?;
            let u = procstat::usage(p.pid());
            results.push(ScaleResult {
                proxy: name.into(),
                clusters: n,
                secs_to_active: done.map(|d| d.as_secs_f64()),
                rss_mb: u.rss_kb as f64 / 1024.0,
                cpu_s: u.cpu_s,
            });
            drop(p);
            // Let the admin and listener ports go before the next proxy binds them.
            std::thread::sleep(Duration::from_millis(300));
        }
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
    let mut md = String::from(
        "| proxy | clusters (x10 endpoints) | time to all active (s) | RSS (MB) | CPU (s) |\n|---|---|---|---|---|\n",
    );
    for r in results {
        md.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.2} |\n",
            r.proxy,
            r.clusters,
            r.secs_to_active
                .map(|s| format!("{s:.2}"))
                .unwrap_or_else(|| "not reached".into()),
            r.rss_mb,
            r.cpu_s
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
    let ns = Netns::create(&format!("skiff-bench-{}", std::process::id()), super::VIP)
        .context("creating the bench namespace")?;
    let res = run(&ns, skiff, envoy, sizes, &out);
    drop(ns);
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
