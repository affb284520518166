//! `cargo xtask bench --http`: HTTP/1.1 keep-alive through skiff, Envoy, nginx and HAProxy.
//!
//! In a namespace created here (loopback only), `skiff-httppeer` serves `200 bench` on
//! 127.0.0.1:18080. Each proxy in turn listens on :18000 and forwards every request to the peer
//! over reused upstream connections: skiff and Envoy from the same static bootstrap (an HCM
//! with an inline route to a STATIC cluster), nginx (`proxy_pass` to an `upstream` with
//! `keepalive`) and HAProxy (`mode http`, `http-reuse always`) from configs written to the run
//! dir. `direct` is the peer itself. Per path, three cases:
//! - saturation: wrk, N keep-alive connections, requests/s, and the proxy's CPU per request;
//! - fixed rate: an open-loop generator at 1000 requests/s (as Istio's benchmark) on N
//!   connections, p50/p99 timed from when each request was due (no coordinated omission);
//! - one connection, closed loop: p50/p99 of one request at a time.
//!
//! skiff runs with a data-plane worker per core and with one (`--concurrency 1`), Envoy with
//! `--concurrency 1` and 2; nginx and HAProxy with one worker or thread per CPU.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use super::env::{Netns, Proc, check_interrupt, interrupted, run_bounded};
use super::openloop::HttpLatency;
use super::procstat;

const PEER: &str = "127.0.0.1:18080";
const LISTEN: &str = "127.0.0.1:18000";
const ADMIN: u16 = 18001;

/// Every path `--http` knows, in table order.
pub const PATHS: [&str; 7] = [
    "direct", "skiff", "skiff-1w", "envoy-c1", "envoy-c2", "nginx", "haproxy",
];

/// The peers skiff is judged against (best of them per figure).
const PEERS: [&str; 4] = ["nginx", "haproxy", "envoy-c1", "envoy-c2"];

/// The cases `--profile` can record under `--http`.
pub const CASES: [&str; 3] = ["saturation", "fixed-rate", "1conn"];

fn describe(path: &str) -> &'static str {
    match path {
        "direct" => "wrk -> backend, no proxy",
        "skiff" => "skiff --capture none, HCM with an inline route to one STATIC upstream",
        "skiff-1w" => "as skiff with --concurrency 1 (one data-plane worker)",
        "envoy-c1" => "Envoy, same bootstrap, --concurrency 1",
        "envoy-c2" => "Envoy, same bootstrap, --concurrency 2",
        "nginx" => "nginx proxy_pass to an upstream with keepalive (worker_processes auto)",
        "haproxy" => "HAProxy mode http, http-reuse always (threads = CPUs)",
        _ => "",
    }
}

/// What `--http` was asked to do.
pub struct Options {
    /// The skiff binary.
    pub skiff: PathBuf,
    /// Envoy, if installed.
    pub envoy: Option<PathBuf>,
    /// Seconds per case.
    pub secs: f64,
    /// Keep-alive connections of the saturation and fixed-rate cases.
    pub connections: usize,
    /// Requests per second of the fixed-rate case.
    pub rate: f64,
    /// Only these paths (empty: all).
    pub paths: Vec<String>,
    /// Record a perf profile of skiff during this case.
    pub profile: Option<String>,
    /// `--quick`.
    pub quick: bool,
}

/// One measured path.
#[derive(Debug, Clone, Serialize, Default)]
pub struct HttpResult {
    /// One of [`PATHS`].
    pub path: String,
    /// What the path is.
    pub description: String,
    /// Why the path has no figures.
    pub error: Option<String>,
    /// wrk connections (saturation) and open-loop connections (fixed rate).
    pub connections: usize,
    /// Saturation: requests per second.
    pub rps: f64,
    /// Saturation: requests wrk completed.
    pub requests: u64,
    /// Saturation: wrk's latency percentiles, microseconds.
    pub p50_us: f64,
    /// Saturation: 99th percentile, microseconds.
    pub p99_us: f64,
    /// Saturation: non-2xx answers and socket errors wrk saw.
    pub errors: u64,
    /// Saturation: proxy CPU seconds (utime+stime of the process tree).
    pub proxy_cpu_s: Option<f64>,
    /// Saturation: proxy CPU microseconds per request.
    pub cpu_us_per_req: Option<f64>,
    /// Saturation: of those, user-space microseconds (the rest is the kernel's).
    pub user_us_per_req: Option<f64>,
    /// Fixed rate, open loop.
    pub fixed_rate: Option<HttpLatency>,
    /// One connection, closed loop.
    pub one_conn: Option<HttpLatency>,
    /// Fixed rate: proxy CPU microseconds per request.
    pub fixed_cpu_us_per_req: Option<f64>,
    /// Proxy RSS once ready, KiB.
    pub idle_rss_kb: Option<u64>,
    /// Largest proxy RSS after a case, KiB.
    pub max_rss_kb: Option<u64>,
}

/// Everything one `--http` run measured.
#[derive(Debug, Clone, Serialize, Default)]
pub struct HttpReport {
    /// Unix time of the start.
    pub started_unix: u64,
    /// `uname -srm`.
    pub kernel: String,
    /// CPUs.
    pub cores: usize,
    /// /proc/loadavg at the start.
    pub loadavg_start: String,
    /// /proc/loadavg at the end.
    pub loadavg_end: String,
    /// `--quick`.
    pub quick: bool,
    /// Seconds per case.
    pub secs_per_case: f64,
    /// Fixed-rate requests per second.
    pub rate: f64,
    /// git revision of the tree the bench ran from.
    pub skiff_rev: String,
    /// Peer versions.
    pub versions: Vec<(String, String)>,
    /// Per path.
    pub results: Vec<HttpResult>,
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

/// What `wrk --latency` printed.
#[derive(Debug, PartialEq)]
struct WrkOut {
    rps: f64,
    requests: u64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
}

/// Pull requests/s, the request count, p50, p99 and errors out of `wrk --latency` output.
fn parse_wrk(out: &str) -> Option<WrkOut> {
    let mut rps = None;
    let mut requests = None;
    let (mut p50, mut p99) = (None, None);
    let mut errors = 0u64;
    for l in out.lines() {
        let t = l.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().ok();
        } else if let Some((n, _)) = t.split_once(" requests in ") {
            requests = n.trim().parse().ok();
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
    Some(WrkOut {
        rps: rps?,
        requests: requests?,
        p50_us: p50?,
        p99_us: p99?,
        errors,
    })
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

/// A helper client (`xtask bench --helper MODE ...`) in the namespace; its JSON answer.
fn helper_client(ns: &Netns, args: &[String], secs: f64) -> anyhow::Result<HttpLatency> {
    let me = std::env::current_exe().context("locating the xtask binary")?;
    let out = run_bounded(
        ns.cmd(me).args(["bench", "--helper"]).args(args),
        "HTTP latency client",
        Duration::from_secs_f64(secs + 30.0),
    )?;
    serde_json::from_str(out.trim()).with_context(|| format!("latency client output {out:?}"))
}

/// Run the HTTP cases; results go to `target/bench/<time>-http/` (results.md, results.json).
pub fn standalone(opts: Options) -> anyhow::Result<()> {
    super::tools::require("wrk").context("the HTTP bench drives the proxies with wrk")?;
    let wanted: Vec<&str> = if opts.paths.is_empty() {
        PATHS.to_vec()
    } else {
        for p in &opts.paths {
            if !PATHS.contains(&p.as_str()) {
                bail!("unknown --http path {p:?}; known: {}", PATHS.join(", "));
            }
        }
        PATHS
            .iter()
            .copied()
            .filter(|p| opts.paths.iter().any(|w| w == p))
            .collect()
    };
    if let Some(c) = &opts.profile
        && !CASES.contains(&c.as_str())
    {
        bail!("--profile with --http takes one of {}", CASES.join(", "));
    }
    let root = crate::util::workspace_root();
    let peer = build_httppeer(&root)?;
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let out = root.join("target/bench").join(format!("{started}-http"));
    std::fs::create_dir_all(out.join("logs"))?;
    std::fs::create_dir_all(out.join("configs"))?;
    let mut rep = HttpReport {
        started_unix: started,
        kernel: super::first_line(Command::new("uname").args(["-srm"])),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        loadavg_start: super::loadavg(),
        quick: opts.quick,
        secs_per_case: opts.secs,
        rate: opts.rate,
        skiff_rev: super::skiff_rev(&root),
        ..Default::default()
    };
    if let Some(e) = &opts.envoy {
        rep.versions.push((
            "envoy".into(),
            super::first_line(Command::new(e).arg("--version")),
        ));
    }
    for (name, arg) in [("nginx", "-v"), ("haproxy", "-v"), ("wrk", "-v")] {
        if let Some(b) = super::tools::which(name) {
            rep.versions
                .push((name.into(), super::first_line(Command::new(b).arg(arg))));
        }
    }
    let ns = Netns::create(
        &format!("skiff-bench-http-{}", std::process::id()),
        super::VIP,
    )
    .context("creating the bench namespace")?;
    let res = run(&ns, &peer, &opts, &wanted, &out, &mut rep);
    drop(ns);
    rep.loadavg_end = super::loadavg();
    // Write whatever was measured, also after an error or Ctrl-C.
    let md = markdown(&rep);
    std::fs::write(out.join("results.md"), &md)?;
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&rep)?,
    )?;
    res?;
    println!("{md}");
    eprintln!("bench: results in {}", out.display());
    Ok(())
}

/// The command that starts `path`'s proxy (None for direct, or when the proxy is not installed).
fn proxy_cmd(
    ns: &Netns,
    path: &str,
    opts: &Options,
    boot: &Path,
    out: &Path,
) -> anyhow::Result<Option<Command>> {
    Ok(Some(match path {
        "direct" => return Ok(None),
        "skiff" | "skiff-1w" => {
            let mut c = ns.cmd(&opts.skiff);
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
            if path == "skiff-1w" {
                c.args(["--concurrency", "1"]);
            }
            c
        }
        "envoy-c1" | "envoy-c2" => {
            let e = opts.envoy.as_ref().context("envoy is not installed")?;
            let mut c = ns.cmd(e);
            c.arg("-c").arg(boot).args([
                "--concurrency",
                if path == "envoy-c1" { "1" } else { "2" },
                "--log-level",
                "warn",
                "--base-id",
                "9",
            ]);
            c
        }
        "nginx" => {
            let bin = super::tools::require("nginx")?;
            let dir = out.join("configs/nginx-http");
            std::fs::create_dir_all(&dir)?;
            let cfg = dir.join("nginx.conf");
            std::fs::write(&cfg, super::configs::nginx_http_conf(&dir, LISTEN, PEER))?;
            let mut c = ns.cmd(bin);
            c.arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&cfg)
                .args(["-e", "stderr"]);
            c
        }
        "haproxy" => {
            let bin = super::tools::require("haproxy")?;
            let cfg = out.join("configs/haproxy-http.cfg");
            std::fs::write(&cfg, super::configs::haproxy_http_cfg(LISTEN, PEER))?;
            let mut c = ns.cmd(bin);
            c.args(["-db", "-f"]).arg(cfg);
            c
        }
        other => bail!("unknown path {other}"),
    }))
}

fn run(
    ns: &Netns,
    peer: &Path,
    opts: &Options,
    wanted: &[&str],
    out: &Path,
    rep: &mut HttpReport,
) -> anyhow::Result<()> {
    let log = |n: &str| out.join("logs").join(format!("http-{n}.log"));
    let boot = out.join("configs/bootstrap.yaml");
    std::fs::write(&boot, bootstrap())?;
    let mut peer_proc = Proc::spawn(
        "skiff-httppeer",
        ns.cmd(peer).args(["serve", PEER, "bench"]),
        &log("peer"),
    )?;
    ns.wait_port(PEER.parse()?, Duration::from_secs(20))?;
    for &path in wanted {
        check_interrupt()?;
        let mut r = HttpResult {
            path: path.into(),
            description: describe(path).into(),
            connections: opts.connections,
            ..Default::default()
        };
        let cmd = match proxy_cmd(ns, path, opts, &boot, out) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("bench: http {path} unavailable: {e:#}");
                r.error = Some(format!("{e:#}"));
                rep.results.push(r);
                continue;
            }
        };
        let mut proc = match cmd {
            Some(mut c) => Some(Proc::spawn(path, &mut c, &log(path))?),
            None => None,
        };
        let target = if proc.is_some() { LISTEN } else { PEER };
        let res = (|| -> anyhow::Result<()> {
            ns.wait_port(target.parse()?, Duration::from_secs(30))?;
            measure(
                ns,
                path,
                target,
                proc.as_ref().map(Proc::pid),
                opts,
                out,
                &mut r,
            )
        })();
        if let Some(p) = proc.as_mut()
            && let Err(e) = p.check_alive(&log(path))
        {
            r.error.get_or_insert(format!("{e:#}"));
        }
        if let Err(e) = res {
            eprintln!("bench: http {path} failed: {e:#}");
            r.error.get_or_insert(format!("{e:#}"));
        }
        rep.results.push(r);
        drop(proc);
        if interrupted() {
            break;
        }
        // Let the listener and admin ports go before the next proxy binds them.
        std::thread::sleep(Duration::from_millis(500));
    }
    peer_proc.check_alive(&log("peer"))?;
    Ok(())
}

/// The three cases on one path; the proxy (if any) is `pid`.
fn measure(
    ns: &Netns,
    path: &str,
    target: &str,
    pid: Option<u32>,
    opts: &Options,
    out: &Path,
    r: &mut HttpResult,
) -> anyhow::Result<()> {
    let (secs, conns) = (opts.secs, opts.connections);
    let usage = || pid.map(procstat::usage);
    let note_rss = |r: &mut HttpResult| {
        if let Some(u) = usage() {
            r.max_rss_kb = Some(r.max_rss_kb.unwrap_or(0).max(u.rss_kb));
        }
    };
    std::thread::sleep(Duration::from_millis(300));
    r.idle_rss_kb = usage().map(|u| u.rss_kb);
    // Profile skiff (all workers) only, during the case asked for.
    let profiling =
        |case: &str| path == "skiff" && opts.profile.as_deref() == Some(case) && pid.is_some();
    let record = |case: &str| -> anyhow::Result<Option<super::profile::Recording>> {
        match pid {
            Some(p) if profiling(case) => {
                super::profile::start(p, out, &format!("http-{path}-{case}")).map(Some)
            }
            _ => Ok(None),
        }
    };
    let finish = |rec: Option<super::profile::Recording>, case: &str| {
        if let Some(rec) = rec
            && let Err(e) = rec.finish(&format!(
                "skiff, bench --http {case} ({conns} connections, {secs}s)"
            ))
        {
            eprintln!("bench: profile failed: {e:#}");
        }
    };

    eprintln!("bench: http {path}: saturation, wrk {conns} keep-alive connections, {secs}s");
    // Warm up (connections, pools, caches) before the measured run.
    wrk(ns, target, 1.0, conns)?;
    let rec = record("saturation")?;
    let before = usage();
    let text = wrk(ns, target, secs, conns)?;
    let after = usage();
    finish(rec, "saturation");
    std::fs::write(out.join("logs").join(format!("http-{path}-wrk.log")), &text)?;
    let Some(w) = parse_wrk(&text) else {
        bail!("could not read wrk's output for {path}:\n{text}");
    };
    r.rps = w.rps;
    r.requests = w.requests;
    r.p50_us = w.p50_us;
    r.p99_us = w.p99_us;
    r.errors = w.errors;
    if let (Some(b), Some(a)) = (before, after) {
        let cpu = a.cpu_s - b.cpu_s;
        r.proxy_cpu_s = Some(cpu);
        r.cpu_us_per_req = Some(cpu * 1e6 / w.requests.max(1) as f64);
        r.user_us_per_req = Some((a.user_s - b.user_s) * 1e6 / w.requests.max(1) as f64);
    }
    note_rss(r);
    check_interrupt()?;

    eprintln!(
        "bench: http {path}: fixed rate {} req/s on {conns} connections, {secs}s",
        opts.rate
    );
    let rec = record("fixed-rate")?;
    let before = usage();
    let fixed = helper_client(
        ns,
        &[
            "http-open".into(),
            target.into(),
            opts.rate.to_string(),
            conns.to_string(),
            secs.to_string(),
        ],
        secs,
    )?;
    let after = usage();
    finish(rec, "fixed-rate");
    if let (Some(b), Some(a)) = (before, after) {
        r.fixed_cpu_us_per_req = Some((a.cpu_s - b.cpu_s) * 1e6 / fixed.count.max(1) as f64);
    }
    r.fixed_rate = Some(fixed);
    note_rss(r);
    check_interrupt()?;

    eprintln!("bench: http {path}: one connection, closed loop, {secs}s");
    let rec = record("1conn")?;
    let one = helper_client(
        ns,
        &["http-1c".into(), target.into(), secs.to_string()],
        secs,
    )?;
    finish(rec, "1conn");
    r.one_conn = Some(one);
    note_rss(r);
    Ok(())
}

/// The best peer's figure (and its name): highest when `higher` is better, else lowest.
fn best_peer(
    rep: &HttpReport,
    fig: impl Fn(&HttpResult) -> Option<f64>,
    higher: bool,
) -> Option<(String, f64)> {
    rep.results
        .iter()
        .filter(|r| PEERS.contains(&r.path.as_str()) && r.error.is_none())
        .filter_map(|r| {
            Some((
                r.path.clone(),
                fig(r).filter(|v| v.is_finite() && *v > 0.0)?,
            ))
        })
        .reduce(|a, b| if (b.1 > a.1) == higher { b } else { a })
}

fn sat_rps(r: &HttpResult) -> Option<f64> {
    (r.rps > 0.0).then_some(r.rps)
}
fn fixed_p50(r: &HttpResult) -> Option<f64> {
    r.fixed_rate.as_ref().map(|l| l.p50_us)
}
fn fixed_p99(r: &HttpResult) -> Option<f64> {
    r.fixed_rate.as_ref().map(|l| l.p99_us)
}
fn one_p50(r: &HttpResult) -> Option<f64> {
    r.one_conn.as_ref().map(|l| l.p50_us)
}
fn one_p99(r: &HttpResult) -> Option<f64> {
    r.one_conn.as_ref().map(|l| l.p99_us)
}

fn f(v: Option<f64>, prec: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.prec$}"),
        _ => "-".into(),
    }
}

fn mb(kb: Option<u64>) -> String {
    kb.map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

/// The results.md of an `--http` run.
pub fn markdown(rep: &HttpReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# skiff bench --http, run {}\n", rep.started_unix);
    let _ = writeln!(
        s,
        "- machine: {} cores, kernel {}; load average at start `{}`, at end `{}`",
        rep.cores, rep.kernel, rep.loadavg_start, rep.loadavg_end
    );
    let conns = rep.results.first().map_or(0, |r| r.connections);
    let _ = writeln!(
        s,
        "- {} s per case{}; {conns} keep-alive connections (saturation and fixed rate); fixed rate {} req/s; skiff {}",
        rep.secs_per_case,
        if rep.quick { " (--quick)" } else { "" },
        rep.rate,
        rep.skiff_rev
    );
    for (k, v) in &rep.versions {
        let _ = writeln!(s, "- {k}: `{v}`");
    }
    let _ = writeln!(
        s,
        "\nSaturation: wrk -t1 for the whole case, requests/s and proxy CPU (utime+stime of the \
         proxy process tree) per request. Fixed rate: open loop, latency from when each request \
         was due. One connection: one request at a time. `best peer` is the best of nginx, \
         HAProxy and Envoy (c1, c2) for that figure; `x best` is this path's figure over it.\n"
    );
    let _ = writeln!(s, "## Paths\n\n| path | what |\n|---|---|");
    for r in &rep.results {
        let err = r
            .error
            .as_ref()
            .map(|e| format!(" **failed: {}**", e.lines().next().unwrap_or("")))
            .unwrap_or_default();
        let _ = writeln!(s, "| {} | {}{err} |", r.path, r.description);
    }

    let best_rps = best_peer(rep, sat_rps, true);
    let best_cpu = best_peer(rep, |r| r.cpu_us_per_req, false);
    let _ = writeln!(
        s,
        "\n## Saturation (wrk, {conns} connections)\n\n\
         | path | req/s | x best peer | p50 (us) | p99 (us) | proxy CPU us/req | x best peer | of which user us/req | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let ratio = |v: Option<f64>, b: &Option<(String, f64)>| match (v, b) {
        (Some(v), Some((_, b))) if v.is_finite() => format!("{:.2}x", v / b),
        _ => "-".into(),
    };
    for r in &rep.results {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.path,
            f(sat_rps(r), 0),
            ratio(sat_rps(r), &best_rps),
            f((r.p50_us > 0.0).then_some(r.p50_us), 0),
            f((r.p99_us > 0.0).then_some(r.p99_us), 0),
            f(r.cpu_us_per_req, 1),
            ratio(r.cpu_us_per_req, &best_cpu),
            f(r.user_us_per_req, 1),
            r.errors
        );
    }

    let best_f50 = best_peer(rep, fixed_p50, false);
    let best_f99 = best_peer(rep, fixed_p99, false);
    let _ = writeln!(
        s,
        "\n## Fixed rate ({} req/s open loop, {conns} connections, microseconds)\n\n\
         | path | p50 | x best peer | p90 | p99 | x best peer | p99.9 | max | answered/s | errors | proxy CPU us/req |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        rep.rate
    );
    for r in &rep.results {
        let l = r.fixed_rate.as_ref();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.path,
            f(fixed_p50(r), 0),
            ratio(fixed_p50(r), &best_f50),
            f(l.map(|l| l.p90_us), 0),
            f(fixed_p99(r), 0),
            ratio(fixed_p99(r), &best_f99),
            f(l.map(|l| l.p999_us), 0),
            f(l.map(|l| l.max_us), 0),
            f(l.map(|l| l.achieved_rps), 0),
            l.map_or("-".into(), |l| l.errors.to_string()),
            f(r.fixed_cpu_us_per_req, 1)
        );
    }

    let direct1 = rep
        .results
        .iter()
        .find(|r| r.path == "direct")
        .and_then(one_p50);
    let added = |r: &HttpResult| one_p50(r).zip(direct1).map(|(v, d)| v - d);
    let best_added = best_peer(rep, added, false);
    let best_o99 = best_peer(rep, one_p99, false);
    let nginx_added = rep
        .results
        .iter()
        .find(|r| r.path == "nginx" && r.error.is_none())
        .and_then(added);
    let _ = writeln!(
        s,
        "\n## One connection, closed loop (microseconds)\n\n\
         | path | p50 | added p50 (minus direct) | x best peer (added) | p99 | x best peer | requests/s |\n\
         |---|---:|---:|---:|---:|---:|---:|"
    );
    for r in &rep.results {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.path,
            f(one_p50(r), 0),
            f(added(r), 0),
            ratio(added(r), &best_added),
            f(one_p99(r), 0),
            ratio(one_p99(r), &best_o99),
            f(r.one_conn.as_ref().map(|l| l.achieved_rps), 0)
        );
    }

    let _ = writeln!(
        s,
        "\n## Memory (VmRSS of the proxy process tree, MB)\n\n| path | idle | max after a case |\n|---|---:|---:|"
    );
    for r in rep.results.iter().filter(|r| r.path != "direct") {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            r.path,
            mb(r.idle_rss_kb),
            mb(r.max_rss_kb)
        );
    }

    let _ = writeln!(s, "\n## Issue 16 goals (reported, not enforced)\n");
    let named = |b: &Option<(String, f64)>, prec: usize| {
        b.as_ref()
            .map_or("-".into(), |(n, v)| format!("{n} {v:.prec$}"))
    };
    for r in rep
        .results
        .iter()
        .filter(|r| r.path.starts_with("skiff") && r.error.is_none())
    {
        let _ = writeln!(
            s,
            "- {}: {} req/s vs best peer {} = {} (goal >= 1.00x) at {} us CPU/req vs {} = {} (goal <= 1.00x)",
            r.path,
            f(sat_rps(r), 0),
            named(&best_rps, 0),
            ratio(sat_rps(r), &best_rps),
            f(r.cpu_us_per_req, 1),
            named(&best_cpu, 1),
            ratio(r.cpu_us_per_req, &best_cpu)
        );
        let _ = writeln!(
            s,
            "- {}: 1-connection added p50 {} us vs nginx {} us = {} (goal <= 1.00x)",
            r.path,
            f(added(r), 0),
            f(nginx_added, 0),
            ratio(added(r), &nginx_added.map(|v| (String::new(), v)))
        );
    }
    s
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
        assert_eq!(
            parse_wrk(out),
            Some(WrkOut {
                rps: 61728.0,
                requests: 123456,
                p50_us: 198.0,
                p99_us: 1050.0,
                errors: 7
            })
        );
        assert_eq!(wrk_duration_us("1.5s"), Some(1.5e6));
    }

    fn lat(p50: f64, p99: f64) -> Option<HttpLatency> {
        Some(HttpLatency {
            count: 1000,
            p50_us: p50,
            p99_us: p99,
            ..Default::default()
        })
    }

    fn path(name: &str, rps: f64, cpu: f64, one_p50: f64) -> HttpResult {
        HttpResult {
            path: name.into(),
            rps,
            cpu_us_per_req: Some(cpu),
            fixed_rate: lat(one_p50 * 2.0, one_p50 * 4.0),
            one_conn: lat(one_p50, one_p50 * 2.0),
            ..Default::default()
        }
    }

    #[test]
    fn skiff_is_judged_against_the_best_peer_per_figure() {
        let mut failed = path("envoy-c2", 90000.0, 1.0, 10.0);
        failed.error = Some("did not start".into());
        let rep = HttpReport {
            results: vec![
                path("direct", 40000.0, 0.0, 50.0),
                path("skiff", 20000.0, 30.0, 150.0),
                path("nginx", 25000.0, 25.0, 100.0),
                path("haproxy", 24000.0, 20.0, 120.0),
                path("envoy-c1", 10000.0, 60.0, 90.0),
                // A failed path is no one's best.
                failed,
            ],
            ..Default::default()
        };
        // Highest requests/s, lowest CPU and latency, each from whichever peer has it.
        assert_eq!(
            best_peer(&rep, sat_rps, true),
            Some(("nginx".into(), 25000.0))
        );
        assert_eq!(
            best_peer(&rep, |r| r.cpu_us_per_req, false),
            Some(("haproxy".into(), 20.0))
        );
        assert_eq!(
            best_peer(&rep, one_p50, false),
            Some(("envoy-c1".into(), 90.0))
        );
        let md = markdown(&rep);
        assert!(md.contains("| skiff | 20000 | 0.80x |"), "{md}");
        // skiff adds 100 us on one connection, nginx 50 us.
        assert!(
            md.contains("- skiff: 1-connection added p50 100 us vs nginx 50 us = 2.00x"),
            "{md}"
        );
        assert!(
            md.contains("- skiff: 20000 req/s vs best peer nginx 25000 = 0.80x (goal >= 1.00x) at 30.0 us CPU/req vs haproxy 20.0 = 1.50x"),
            "{md}"
        );
    }
}
