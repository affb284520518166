//! `cargo xtask bench --http`: HTTP/1.1 keep-alive through the HTTP connection manager.
//!
//! In a namespace created here (loopback only), `skiff-httppeer` serves `200 bench` on
//! 127.0.0.1:18080. skiff and Envoy (one at a time, from the same static bootstrap: a listener
//! on :18000 whose HCM carries an inline route to a STATIC cluster holding the peer) are driven
//! by `wrk` with keep-alive connections for a fixed time; `direct` is wrk against the peer
//! itself. Reported: requests per second and wrk's latency percentiles. skiff runs with all
//! runtime workers and with one (`TOKIO_WORKER_THREADS=1`), Envoy with `--concurrency 1` and 2.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use super::env::{Netns, Proc, check_interrupt, run_bounded};

const PEER: &str = "127.0.0.1:18080";
const LISTEN: &str = "127.0.0.1:18000";
const ADMIN: u16 = 18001;

/// One measured path.
#[derive(Debug, Clone, Serialize)]
pub struct HttpResult {
    /// `direct`, `skiff`, `skiff-1w`, `envoy-c1`, `envoy-c2`.
    pub path: String,
    /// wrk connections.
    pub connections: usize,
    /// Requests per second.
    pub rps: f64,
    /// Latency percentiles from wrk, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// Non-2xx answers and socket errors wrk saw.
    pub errors: u64,
}

fn bootstrap() -> String {
    let (peer_ip, peer_port) = PEER.split_once(':').unwrap_or(("127.0.0.1", "18080"));
    let (ip, port) = LISTEN.split_once(':').unwrap_or(("127.0.0.1", "18000"));
    format!(
        r#"
node: {{ id: bench-http, cluster: bench }}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {ADMIN} }} }}
static_resources:
  listeners:
  - name: http
    address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            name: bench
            virtual_hosts:
            - name: bench
              domains: ["*"]
              routes:
              - match: {{ prefix: / }}
                route: {{ cluster: peer }}
  clusters:
  - name: peer
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: peer
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {peer_ip}, port_value: {peer_port} }} }} }}
"#
    )
}

/// wrk's duration like `1.23ms` / `456.00us` / `1.2s`, in microseconds.
fn wrk_duration_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * mult)
}

/// Pull requests/s, p50, p99 and errors out of `wrk --latency` output.
fn parse_wrk(out: &str) -> Option<(f64, f64, f64, u64)> {
    let mut rps = None;
    let (mut p50, mut p99) = (None, None);
    let mut errors = 0u64;
    for l in out.lines() {
        let t = l.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().ok();
        } else if let Some(v) = t.strip_prefix("50%") {
            p50 = wrk_duration_us(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            p99 = wrk_duration_us(v);
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    Some((rps?, p50?, p99?, errors))
}

fn wrk(ns: &Netns, target: &str, secs: f64, connections: usize) -> anyhow::Result<String> {
    let d = format!("{}s", secs.ceil() as u64);
    run_bounded(
        ns.cmd("wrk").args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{d}"),
            "--latency",
            &format!("http://{target}/"),
        ]),
        "wrk",
        Duration::from_secs_f64(secs + 30.0),
    )
}

fn build_httppeer(root: &Path) -> anyhow::Result<PathBuf> {
    crate::util::run(Command::new(env!("CARGO")).current_dir(root).args([
        "build",
        "--release",
        "-p",
        "skiff-tests",
        "--bin",
        "skiff-httppeer",
    ]))?;
    Ok(root.join("target/release/skiff-httppeer"))
}

/// Run the HTTP cases and print a table; results go to `target/bench/<time>-http/`.
pub fn standalone(
    skiff: &Path,
    envoy: Option<&Path>,
    secs: f64,
    connections: usize,
) -> anyhow::Result<()> {
    super::tools::require("wrk").context("the HTTP bench drives the proxies with wrk")?;
    let root = crate::util::workspace_root();
    let peer = build_httppeer(&root)?;
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let out = root.join("target/bench").join(format!("{started}-http"));
    std::fs::create_dir_all(out.join("logs"))?;
    let boot = out.join("bootstrap.yaml");
    std::fs::write(&boot, bootstrap())?;
    let ns = Netns::create(
        &format!("skiff-bench-http-{}", std::process::id()),
        super::VIP,
    )
    .context("creating the bench namespace")?;
    let res = run(&ns, &peer, skiff, envoy, &boot, secs, connections, &out);
    drop(ns);
    let res = res?;
    let md = table(&res, secs);
    std::fs::write(out.join("http.md"), &md)?;
    std::fs::write(out.join("http.json"), serde_json::to_string_pretty(&res)?)?;
    println!("{md}");
    eprintln!("bench: results in {}", out.display());
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run(
    ns: &Netns,
    peer: &Path,
    skiff: &Path,
    envoy: Option<&Path>,
    boot: &Path,
    secs: f64,
    connections: usize,
    out: &Path,
) -> anyhow::Result<Vec<HttpResult>> {
    let log = |n: &str| out.join("logs").join(format!("http-{n}.log"));
    let mut peer_proc = Proc::spawn(
        "skiff-httppeer",
        ns.cmd(peer).args(["serve", PEER, "bench"]),
        &log("peer"),
    )?;
    ns.wait_port(PEER.parse()?, Duration::from_secs(20))?;
    let mut results = Vec::new();
    let mut measure = |name: &str, target: &str| -> anyhow::Result<()> {
        check_interrupt()?;
        eprintln!("bench: http {name}, {connections} keep-alive connections, {secs}s");
        // Warm up (connections, pools, caches) before the measured run.
        wrk(ns, target, 1.0, connections)?;
        let text = wrk(ns, target, secs, connections)?;
        std::fs::write(log(&format!("{name}-wrk")), &text)?;
        let Some((rps, p50, p99, errors)) = parse_wrk(&text) else {
            bail!("could not read wrk's output for {name}:\n{text}");
        };
        results.push(HttpResult {
            path: name.into(),
            connections,
            rps,
            p50_us: p50,
            p99_us: p99,
            errors,
        });
        Ok(())
    };
    measure("direct", PEER)?;

    let mut proxies: Vec<(&str, Command)> = Vec::new();
    for (name, one_worker) in [("skiff", false), ("skiff-1w", true)] {
        let mut c = ns.cmd(skiff);
        c.args([
            "run",
            "--capture",
            "none",
            "--outbound-port",
            "18002",
            "--bootstrap",
        ])
        .arg(boot)
        .env("RUST_LOG", "warn");
        if one_worker {
            c.env("TOKIO_WORKER_THREADS", "1");
        }
        proxies.push((name, c));
    }
    if let Some(e) = envoy {
        for (name, conc) in [("envoy-c1", "1"), ("envoy-c2", "2")] {
            let mut c = ns.cmd(e);
            c.arg("-c").arg(boot).args([
                "--concurrency",
                conc,
                "--log-level",
                "warn",
                "--base-id",
                "9",
            ]);
            proxies.push((name, c));
        }
    }
    for (name, mut cmd) in proxies {
        let mut p = Proc::spawn(name, &mut cmd, &log(name))?;
        ns.wait_port(LISTEN.parse()?, Duration::from_secs(30))?;
        let r = measure(name, LISTEN);
        p.check_alive(&log(name))?;
        drop(p);
        r?;
        // Let the listener and admin ports go before the next proxy binds them.
        std::thread::sleep(Duration::from_millis(500));
    }
    peer_proc.check_alive(&log("peer"))?;
    Ok(results)
}

fn table(res: &[HttpResult], secs: f64) -> String {
    let mut md = format!(
        "HTTP/1.1 keep-alive, GET / -> 200 (wrk -t1, {secs}s per path)\n\n\
         | path | connections | req/s | p50 (us) | p99 (us) | errors |\n\
         |---|---|---|---|---|---|\n"
    );
    for r in res {
        md.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {} |\n",
            r.path, r.connections, r.rps, r.p50_us, r.p99_us, r.errors
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_parsed() {
        let out = "Running 2s test @ http://127.0.0.1:18000/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   210.55us   80.10us   2.10ms   90.00%
  Latency Distribution
     50%  198.00us
     75%  230.00us
     90%  280.00us
     99%    1.05ms
  123456 requests in 2.00s, 10.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  61728.00
Transfer/sec:      5.00MB
";
        assert_eq!(parse_wrk(out), Some((61728.0, 198.0, 1050.0, 7)));
        assert_eq!(wrk_duration_us("1.5s"), Some(1.5e6));
    }
}
