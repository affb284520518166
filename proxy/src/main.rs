//! The `skiff` binary: parse the command line, start tracing, run.

use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use skiff::bpf::{CaptureConfig, CaptureMode};
use skiff::model::Cidr;

/// skiff: an eBPF-accelerated, Envoy-compatible transparent proxy.
#[derive(Parser, Debug)]
#[command(name = "skiff", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy.
    Run(RunArgs),
    /// Serve xDS (ADS, state of the world and delta) from files or an Envoy config dump.
    ControlPlane(ControlPlaneArgs),
    /// Send one request to a running skiff's admin API and print the answer
    /// (e.g. `skiff admin /config_dump?resource=dynamic_active_clusters`).
    Admin {
        /// Path and query.
        path: String,
        /// HTTP method.
        #[arg(long, default_value = "GET")]
        method: String,
        /// Admin address of the running skiff.
        #[arg(long, default_value = skiff::config::DEFAULT_ADMIN)]
        admin: SocketAddr,
    },
    /// Show the kernel fast-path maps of a running skiff: services, clusters, endpoints,
    /// generation and capacity used.
    Maps {
        /// Print the JSON as the admin API returns it.
        #[arg(long)]
        json: bool,
        /// Admin address of the running skiff.
        #[arg(long, default_value = skiff::config::DEFAULT_ADMIN)]
        admin: SocketAddr,
    },
    /// Which path a connect to DST takes (kernel fast path / proxy / passthrough / excluded).
    Explain {
        /// Destination, e.g. 10.96.0.1:80.
        dst: SocketAddr,
        /// Admin address of the running skiff.
        #[arg(long, default_value = skiff::config::DEFAULT_ADMIN)]
        admin: SocketAddr,
    },
    /// Remove the iptables rules (every `SKIFF_*` nat chain and the jumps to them) a killed
    /// `skiff run --capture iptables` left in this network namespace. Idempotent.
    Cleanup,
    /// Node mode: add or remove pods and pod cgroups at run time (through the admin API).
    Node {
        #[command(subcommand)]
        op: NodeOp,
        /// Admin address of the running skiff.
        #[arg(long, default_value = skiff::config::DEFAULT_ADMIN, global = true)]
        admin: SocketAddr,
    },
}

#[derive(clap::Args, Debug)]
struct ControlPlaneArgs {
    /// Directory with one discovery file per type (JSON or YAML), watched for changes.
    #[arg(
        long,
        conflicts_with = "from_config_dump",
        required_unless_present = "from_config_dump"
    )]
    dir: Option<PathBuf>,
    /// Serve the dynamic resources of an Envoy/Istio /config_dump.
    #[arg(long)]
    from_config_dump: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:15010")]
    listen: SocketAddr,
    /// How often the directory is checked for changes.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    poll_interval: Duration,
}

#[derive(Subcommand, Debug)]
enum NodeOp {
    /// Start capturing the processes of a cgroup.
    AddCgroup {
        /// cgroup v2 directory.
        path: PathBuf,
    },
    /// Stop capturing a cgroup.
    RemoveCgroup {
        /// cgroup v2 directory.
        path: PathBuf,
    },
    /// List captured cgroup ids.
    ListCgroups,
    /// Serve a pod with its own node id and configuration: capture its cgroup and listen in
    /// its network namespace.
    AddPod {
        /// The pod's cgroup v2 directory.
        #[arg(long)]
        cgroup: PathBuf,
        /// The pod's network namespace (`/run/netns/NAME` or `/proc/PID/ns/net`).
        #[arg(long)]
        netns: PathBuf,
        /// The pod's xDS node id.
        #[arg(long)]
        node_id: String,
        /// The pod's own bootstrap (default: the node's, with --node-id).
        #[arg(long)]
        bootstrap: Option<PathBuf>,
    },
    /// Stop serving the pod of a cgroup.
    RemovePod {
        /// The pod's cgroup v2 directory.
        #[arg(long)]
        cgroup: PathBuf,
    },
    /// List the pods served, with their node ids, config and counters.
    ListPods,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CaptureKind {
    /// cgroup connect4/6 + getsockopt eBPF programs.
    Ebpf,
    /// Istio-equivalent iptables nat rules in this network namespace (removed on exit).
    Iptables,
    /// eBPF when this kernel and process support it, else iptables (the log says why).
    Auto,
    /// Install nothing: something else (iptables REDIRECT) sends traffic, or plain proxying.
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Capture one pod's cgroup.
    Sidecar,
    /// Attach once at a node cgroup root; capture the cgroups registered at run time.
    Node,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Envoy v3 bootstrap (YAML or JSON).
    #[arg(long)]
    bootstrap: PathBuf,
    /// How traffic reaches the proxy.
    #[arg(long, value_enum, default_value_t = CaptureKind::Ebpf)]
    capture: CaptureKind,
    /// Sidecar (one pod cgroup) or node (one skiff per node).
    #[arg(long, value_enum, default_value_t = Mode::Sidecar)]
    mode: Mode,
    /// Sidecar mode: the application's cgroup v2 directory to capture.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Node mode: the cgroup that stands for the node (default: the cgroup v2 root).
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    /// cgroup the proxy runs in (created if missing). Default: `skiff-proxy` beside the
    /// captured cgroup (sidecar) or under the node root (node).
    #[arg(long)]
    proxy_cgroup: Option<PathBuf>,
    /// Port of the outbound capture listener (Istio's 15001).
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    /// Do not listen on or capture IPv6.
    #[arg(long)]
    no_ipv6: bool,
    /// When the proxy is not ready, fail connects instead of letting them through.
    #[arg(long)]
    fail_closed: bool,
    /// Kernel fast path: connects to plain-TCP services go straight to an endpoint chosen in
    /// the kernel (default map sizes: 10k services, 100k endpoints).
    #[arg(long)]
    fast_path: bool,
    /// With --fast-path: when an update removes an endpoint (or it turns unhealthy), destroy the
    /// application's fast-path sockets still connected to it (netlink SOCK_DESTROY).
    #[arg(long, requires = "fast_path")]
    terminate_on_removal: bool,
    /// Sockmap acceleration (sk_msg) for local socket pairs on `--sockmap-ports`. Off by
    /// default: it speeds up request/response on long-lived connections but slows bulk
    /// streams and short connections, and blocking readers may see EAGAIN at EOF
    /// (docs/ARCHITECTURE.md, docs/BENCHMARKS.md).
    #[arg(long, requires = "sockmap_ports")]
    sockmap: bool,
    /// Service ports whose local pairs `--sockmap` accelerates, comma separated.
    #[arg(long, value_delimiter = ',', requires = "sockmap")]
    sockmap_ports: Vec<u16>,
    /// Ports never captured (Istio's excludeOutboundPorts), comma separated.
    #[arg(long, value_delimiter = ',')]
    exclude_ports: Vec<u16>,
    /// CIDRs never captured (Istio's excludeOutboundIPRanges), comma separated.
    #[arg(long, value_delimiter = ',')]
    exclude_cidrs: Vec<Cidr>,
    /// SO_MARK on the proxy's upstream sockets; marked sockets are never captured.
    #[arg(long, default_value = "0x539", value_parser = parse_u32)]
    proxy_mark: u32,
    /// iptables mode: the proxy's uid; its connects are never captured (Istio's 1337).
    #[arg(long)]
    proxy_uid: Option<u32>,
    /// iptables mode: the proxy's gid; its connects are never captured.
    #[arg(long)]
    proxy_gid: Option<u32>,
    /// Start even if other BPF programs act on the cgroup hooks skiff attaches to.
    #[arg(long)]
    allow_coexist: bool,
    /// Also capture inbound connections to the pod's addresses and serve them with the
    /// listener on --inbound-port (sk_lookup in eBPF mode, PREROUTING in iptables mode).
    #[arg(long)]
    capture_inbound: bool,
    /// Port of the inbound listener (Istio's virtualInbound 15006).
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// Ports never captured inbound (Istio's excludeInboundPorts), comma separated.
    #[arg(long, value_delimiter = ',')]
    exclude_inbound_ports: Vec<u16>,
    /// The pod's addresses steered inbound (default: every non-loopback address here).
    #[arg(long, value_delimiter = ',')]
    pod_ips: Vec<IpAddr>,
    /// Admin address (overrides the bootstrap's admin.address).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Time in-flight connections get to finish on shutdown.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    drain_time: Duration,
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a 32-bit number"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 5s or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: unit must be ms, s or m")),
    }
}

/// Exit code for bad configuration (clap uses 2 for usage errors too).
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("skiff: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Run(args) => {
            let (opts, extras) = match run_options(args) {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("skiff: {e:#}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            match rt.block_on(skiff::app::run_with(opts, extras, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("skiff: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::ControlPlane(a) => {
            use skiff::controlplane::{ControlPlaneOptions, Source};
            let source = match (a.dir, a.from_config_dump) {
                (Some(d), _) => Source::Dir(d),
                (None, Some(f)) => Source::ConfigDump(f),
                (None, None) => {
                    eprintln!("skiff: control-plane needs --dir or --from-config-dump");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let opts = ControlPlaneOptions {
                source,
                listen: a.listen,
                poll_interval: a.poll_interval,
            };
            let served = skiff::controlplane::serve(opts, |_addr| {}, shutdown_signal());
            match rt.block_on(served) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("skiff: {e:#}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
        Command::Admin {
            path,
            method,
            admin,
        } => {
            let method = match hyper::Method::from_bytes(method.to_ascii_uppercase().as_bytes()) {
                Ok(m) => m,
                Err(_) => {
                    eprintln!("skiff: --method {method:?} is not an HTTP method");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let path = if path.starts_with('/') {
                path
            } else {
                format!("/{path}")
            };
            match rt.block_on(skiff::admin::request(admin, method, &path)) {
                Ok(body) => {
                    print!("{body}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("skiff: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Maps { json, admin } => {
            match rt.block_on(skiff::admin::request(
                admin,
                hyper::Method::GET,
                "/debug/maps",
            )) {
                Ok(body) if json => {
                    print!("{body}");
                    ExitCode::SUCCESS
                }
                Ok(body) => match serde_json::from_str::<serde_json::Value>(&body) {
                    Ok(v) => {
                        print!("{}", maps_text(&v));
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("skiff: /debug/maps is not JSON ({e}): {body}");
                        ExitCode::FAILURE
                    }
                },
                Err(e) => {
                    eprintln!("skiff: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Explain { dst, admin } => {
            let path = format!("/debug/explain?dst={dst}");
            match rt.block_on(skiff::admin::request(admin, hyper::Method::GET, &path)) {
                Ok(body) => {
                    print!("{body}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("skiff: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Cleanup => match skiff::capture::iptables::cleanup() {
            Ok(report) => {
                if report.removed.is_empty() {
                    println!("nothing to remove");
                }
                for (tool, ops) in report.removed {
                    for op in ops {
                        println!("{tool}: {op}");
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("skiff: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Node { op, admin } => {
            let (method, uri) = node_request(&op);
            match rt.block_on(skiff::admin::request(admin, method, &uri)) {
                Ok(body) => {
                    print!("{body}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("skiff: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The admin request behind a `skiff node` subcommand. The server resolves nothing
/// relative, so paths are sent absolute.
fn node_request(op: &NodeOp) -> (hyper::Method, String) {
    use hyper::Method;
    let abs = |p: &PathBuf| {
        std::path::absolute(p)
            .unwrap_or_else(|_| p.clone())
            .to_string_lossy()
            .into_owned()
    };
    let mut q = form_urlencoded::Serializer::new(String::new());
    let (method, base) = match op {
        NodeOp::AddCgroup { path } => {
            q.append_pair("path", &abs(path));
            (Method::POST, "/debug/node/cgroups")
        }
        NodeOp::RemoveCgroup { path } => {
            q.append_pair("path", &abs(path));
            (Method::DELETE, "/debug/node/cgroups")
        }
        NodeOp::ListCgroups => (Method::GET, "/debug/node/cgroups"),
        NodeOp::AddPod {
            cgroup,
            netns,
            node_id,
            bootstrap,
        } => {
            q.append_pair("cgroup", &abs(cgroup))
                .append_pair("netns", &abs(netns))
                .append_pair("node_id", node_id);
            if let Some(b) = bootstrap {
                q.append_pair("bootstrap", &abs(b));
            }
            (Method::POST, "/debug/node/pods")
        }
        NodeOp::RemovePod { cgroup } => {
            q.append_pair("cgroup", &abs(cgroup));
            (Method::DELETE, "/debug/node/pods")
        }
        NodeOp::ListPods => (Method::GET, "/debug/node/pods"),
    };
    let q = q.finish();
    if q.is_empty() {
        (method, base.to_string())
    } else {
        (method, format!("{base}?{q}"))
    }
}

/// A human-readable rendering of `/debug/maps`: one block per map, one line per entry.
fn maps_text(v: &serde_json::Value) -> String {
    let mut out = String::new();
    for (k, val) in v.as_object().into_iter().flatten() {
        match val {
            serde_json::Value::Array(items) => {
                out.push_str(&format!("{k} ({}):\n", items.len()));
                for it in items {
                    let line = match it.as_object() {
                        Some(o) => o
                            .iter()
                            .map(|(f, x)| match x {
                                serde_json::Value::String(s) => format!("{f}={s}"),
                                other => format!("{f}={other}"),
                            })
                            .collect::<Vec<_>>()
                            .join(" "),
                        None => it.to_string(),
                    };
                    out.push_str(&format!("  {line}\n"));
                }
            }
            other => out.push_str(&format!("{k}: {other}\n")),
        }
    }
    out
}

fn run_options(
    a: RunArgs,
) -> anyhow::Result<(skiff::app::RunOptions, skiff::capture::CaptureExtras)> {
    use anyhow::{Context, bail};
    let bootstrap = skiff::config::load(&a.bootstrap)?;
    skiff::config::release_parser_memory();
    let outbound_v4 = SocketAddrV4::new([127, 0, 0, 1].into(), a.outbound_port);
    let outbound_v6 = (!a.no_ipv6)
        .then(|| SocketAddrV6::new(std::net::Ipv6Addr::LOCALHOST, a.outbound_port, 0, 0));
    let kind = match a.capture {
        CaptureKind::Auto => match skiff::capture::probe::ebpf_supported(a.cgroup.as_deref()) {
            Ok(()) => {
                tracing::info!("--capture auto: the eBPF capture is supported here; using it");
                CaptureKind::Ebpf
            }
            Err(why) => {
                tracing::warn!(reason = %why, "--capture auto: eBPF capture unavailable; using iptables");
                CaptureKind::Iptables
            }
        },
        k => k,
    };
    let mut extras = skiff::capture::CaptureExtras {
        allow_coexist: a.allow_coexist,
        ..Default::default()
    };
    if a.capture_inbound {
        extras.inbound = Some(skiff::capture::InboundOptions {
            port: a.inbound_port,
            exclude_ports: a.exclude_inbound_ports.clone(),
            sk_lookup: kind == CaptureKind::Ebpf,
            pod_ips: a.pod_ips.clone(),
            ipv6: !a.no_ipv6,
        });
    }
    let iptables = skiff::capture::IptablesConfig {
        outbound_port: a.outbound_port,
        inbound_port: a.capture_inbound.then_some(a.inbound_port),
        proxy_mark: a.proxy_mark,
        proxy_uid: a.proxy_uid,
        proxy_gid: a.proxy_gid,
        exclude_ports: a.exclude_ports.clone(),
        exclude_cidrs: a.exclude_cidrs.iter().map(|c| (c.addr, c.len)).collect(),
        exclude_inbound_ports: a.exclude_inbound_ports.clone(),
        ipv6: !a.no_ipv6,
    };
    // --capture auto chose eBPF: should installing it fail, iptables takes over (sidecar only).
    if a.capture == CaptureKind::Auto && kind == CaptureKind::Ebpf && a.mode == Mode::Sidecar {
        extras.auto_fallback = Some(iptables.clone());
    }
    let capture = match kind {
        CaptureKind::Iptables => {
            if a.mode == Mode::Node {
                bail!("--capture iptables serves one network namespace: use --mode sidecar");
            }
            extras.iptables = Some(iptables);
            None
        }
        CaptureKind::None => {
            if a.capture_inbound {
                bail!("--capture-inbound needs --capture ebpf, iptables or auto");
            }
            if a.cgroup.is_some() || a.cgroup_root.is_some() {
                bail!("--cgroup/--cgroup-root need --capture ebpf");
            }
            None
        }
        CaptureKind::Ebpf | CaptureKind::Auto => {
            let mode = match a.mode {
                Mode::Sidecar => {
                    let cgroup = a
                        .cgroup
                        .context("--mode sidecar needs --cgroup PATH (the application's cgroup)")?;
                    if !cgroup.is_dir() {
                        bail!("--cgroup {}: not a directory", cgroup.display());
                    }
                    let proxy_cgroup = match a.proxy_cgroup {
                        Some(p) => p,
                        None => cgroup
                            .parent()
                            .context("--cgroup has no parent directory")?
                            .join("skiff-proxy"),
                    };
                    CaptureMode::Sidecar {
                        cgroup,
                        proxy_cgroup,
                    }
                }
                Mode::Node => {
                    let cgroup_root = match a.cgroup_root {
                        Some(p) => p,
                        None => skiff::bpf::cgroup2_mount()?,
                    };
                    if !cgroup_root.is_dir() {
                        bail!("--cgroup-root {}: not a directory", cgroup_root.display());
                    }
                    let proxy_cgroup = a
                        .proxy_cgroup
                        .unwrap_or_else(|| cgroup_root.join("skiff-proxy"));
                    CaptureMode::Node {
                        cgroup_root,
                        proxy_cgroup,
                    }
                }
            };
            Some(CaptureConfig {
                mode,
                outbound_v4,
                outbound_v6,
                proxy_mark: a.proxy_mark,
                fail_closed: a.fail_closed,
                exclude_ports: a.exclude_ports,
                exclude_cidrs: a
                    .exclude_cidrs
                    .iter()
                    .map(|c| (c.addr, c.len))
                    .collect::<Vec<(IpAddr, u8)>>(),
                fast_path: a.fast_path.then(skiff::bpf::Capacity::default),
                terminate_on_removal: a.terminate_on_removal,
                sockmap_ports: if a.sockmap {
                    a.sockmap_ports
                } else {
                    Vec::new()
                },
            })
        }
    };
    let upstream_mark = (capture.is_some() || extras.iptables.is_some()).then_some(a.proxy_mark);
    let opts = skiff::app::RunOptions {
        admin: a.admin.or(bootstrap.admin),
        bootstrap,
        capture,
        outbound_v4,
        outbound_v6,
        upstream_mark,
        drain: a.drain_time,
    };
    Ok((opts, extras))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still stops on SIGTERM, just without draining.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
