//! The `skiff` command line: clap definitions and what turns parsed arguments into the
//! library's options. The binary (`main.rs`) only parses, starts tracing, calls and picks the
//! exit code; everything here is testable without spawning it.
//!
//! # Layout
//! - this file: [`Cli`] and its subcommands (flags, defaults, help text), value parsers.
//! - [`run`]: `skiff run` arguments -> [`crate::app::RunOptions`] + [`crate::capture::CaptureExtras`].
//! - [`query`]: the subcommands that send one request to a running skiff's admin API
//!   (`admin`, `maps`, `explain`, `node`) and render its answer.

pub mod query;
pub mod run;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::model::Cidr;

pub use query::{AdminCall, QueryError};
pub use run::{OptionsError, run_options};

/// skiff: an eBPF-accelerated, Envoy-compatible transparent proxy.
#[derive(Parser, Debug)]
#[command(name = "skiff", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands of `skiff`.
#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once per process; boxing buys nothing
pub enum Command {
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
        #[arg(long, default_value = crate::config::DEFAULT_ADMIN)]
        admin: SocketAddr,
    },
    /// Show the kernel fast-path maps of a running skiff: services, clusters, endpoints,
    /// generation and capacity used.
    Maps {
        /// Print the JSON as the admin API returns it.
        #[arg(long)]
        json: bool,
        /// Admin address of the running skiff.
        #[arg(long, default_value = crate::config::DEFAULT_ADMIN)]
        admin: SocketAddr,
    },
    /// Which path a connect to DST takes (kernel fast path / proxy / passthrough / excluded),
    /// or with `--recent [N]` what happened to the last N connections, step by step.
    Explain {
        /// Destination, e.g. 10.96.0.1:80.
        #[arg(required_unless_present = "recent")]
        dst: Option<SocketAddr>,
        /// Print the last N connections (kernel fast path and proxy alike) with each step
        /// (capture, listener, chain, route, cluster, endpoint) and its reason, newest first.
        #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "20", conflicts_with = "dst")]
        recent: Option<usize>,
        /// Admin address of the running skiff.
        #[arg(long, default_value = crate::config::DEFAULT_ADMIN)]
        admin: SocketAddr,
    },
    /// Remove what a killed skiff left: the iptables rules (every `SKIFF_*` nat chain and the
    /// jumps to them) of `--capture iptables` in this network namespace, and the eBPF pins
    /// (links and maps) under /sys/fs/bpf/skiff (or only `--pin-dir`), which detaches its
    /// programs. Idempotent; run it when no skiff runs.
    Cleanup {
        /// Remove only this pin directory.
        #[arg(long, value_name = "DIR")]
        pin_dir: Option<std::path::PathBuf>,
    },
    /// Node mode: add or remove pods and pod cgroups at run time (through the admin API).
    Node {
        /// The operation.
        #[command(subcommand)]
        op: NodeOp,
        /// Admin address of the running skiff.
        #[arg(long, default_value = crate::config::DEFAULT_ADMIN, global = true)]
        admin: SocketAddr,
    },
}

/// `skiff control-plane` arguments.
#[derive(clap::Args, Debug)]
pub struct ControlPlaneArgs {
    /// Directory with one discovery file per type (JSON or YAML), watched for changes.
    #[arg(
        long,
        conflicts_with = "from_config_dump",
        required_unless_present = "from_config_dump"
    )]
    pub dir: Option<PathBuf>,
    /// Serve the dynamic resources of an Envoy/Istio /config_dump.
    #[arg(long)]
    pub from_config_dump: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:15010")]
    pub listen: SocketAddr,
    /// How often the directory is checked for changes.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// Serve ADS over TLS with this PEM certificate chain (as istiod on 15012).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// With TLS: require client certificates issued by this PEM CA.
    #[arg(long, requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// Refuse ADS streams (UNAUTHENTICATED) whose `authorization` is not `Bearer <content of
    /// FILE>`; the file is re-read for every stream.
    #[arg(long, value_name = "FILE")]
    pub require_token: Option<PathBuf>,
    /// Also serve the SecretDiscoveryService (the directory's Secret resources) on this Unix
    /// socket, as Istio's node agent does.
    #[arg(long, value_name = "PATH")]
    pub sds_socket: Option<PathBuf>,
    /// Also serve ADS on this Unix socket, as pilot-agent's xDS proxy does for its sidecar.
    #[arg(long, value_name = "PATH")]
    pub ads_socket: Option<PathBuf>,
}

/// `skiff run`'s control-plane connection: ADS to istiod as pilot-agent makes it.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct XdsArgs {
    /// ADS server HOST:PORT (istiod: `istiod.istio-system.svc:15012`); overrides the
    /// bootstrap's ADS cluster and turns on LDS and CDS over ADS and Istio's node metadata.
    /// The host is resolved once, at start.
    #[arg(long, value_name = "HOST:PORT")]
    pub xds_address: Option<String>,
    /// Talk TLS to the ADS server, verified against this PEM root (Istio's mesh root,
    /// `/var/run/secrets/istio/root-cert.pem`).
    #[arg(long, value_name = "FILE")]
    pub xds_ca: Option<PathBuf>,
    /// The name the server's certificate must carry (a DNS SAN), also sent as SNI. Default:
    /// the --xds-address host.
    #[arg(long, value_name = "NAME", requires = "xds_ca")]
    pub xds_san: Option<String>,
    /// Client certificate (PEM chain) to present to the ADS server.
    #[arg(long, value_name = "FILE", requires_all = ["xds_key", "xds_ca"])]
    pub xds_cert: Option<PathBuf>,
    /// Private key of --xds-cert.
    #[arg(long, value_name = "FILE", requires = "xds_cert")]
    pub xds_key: Option<PathBuf>,
    /// Send `authorization: Bearer <content of FILE>` on every ADS stream, re-read at each
    /// reconnect (Istio: `/var/run/secrets/tokens/istio-token`).
    #[arg(long, value_name = "FILE")]
    pub xds_token: Option<PathBuf>,
    /// Delta ADS instead of state of the world (with --xds-address).
    #[arg(long, requires = "xds_address")]
    pub xds_delta: bool,
}

/// The node sent to the control plane, as pilot-agent fills it; each flag defaults to the
/// environment Istio's injector sets (see `skiff::xds::node`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct NodeArgs {
    /// Send Istio's node id and metadata even without --xds-address.
    #[arg(long)]
    pub istio_node: bool,
    /// The node id, as given (default `sidecar~IP~POD.NS~NS.svc.cluster.local`).
    #[arg(long)]
    pub node_id: Option<String>,
    /// Pod name (env POD_NAME).
    #[arg(long)]
    pub pod_name: Option<String>,
    /// Pod namespace (env POD_NAMESPACE).
    #[arg(long)]
    pub pod_namespace: Option<String>,
    /// The pod's addresses, comma separated; the first goes in the node id (env INSTANCE_IP).
    #[arg(long, value_delimiter = ',')]
    pub instance_ips: Vec<IpAddr>,
    /// Service account (env SERVICE_ACCOUNT).
    #[arg(long)]
    pub service_account: Option<String>,
    /// CLUSTER_ID (env ISTIO_META_CLUSTER_ID, default Kubernetes).
    #[arg(long)]
    pub cluster_id: Option<String>,
    /// MESH_ID (env ISTIO_META_MESH_ID, default the cluster domain).
    #[arg(long)]
    pub mesh_id: Option<String>,
    /// ISTIO_VERSION sent to istiod (env ISTIO_META_ISTIO_VERSION).
    #[arg(long)]
    pub istio_version: Option<String>,
    /// WORKLOAD_NAME (env ISTIO_META_WORKLOAD_NAME).
    #[arg(long)]
    pub workload_name: Option<String>,
    /// The pod's labels: a downward API file of `key="value"` lines (Istio mounts one at
    /// `/etc/istio/pod/labels`).
    #[arg(long, value_name = "FILE")]
    pub pod_labels: Option<PathBuf>,
    /// DNS domain of the cluster (the node id's suffix).
    #[arg(long)]
    pub cluster_domain: Option<String>,
}

impl NodeArgs {
    /// The node builder's options.
    pub fn options(&self) -> crate::xds::node::IstioNodeOptions {
        crate::xds::node::IstioNodeOptions {
            node_id: self.node_id.clone(),
            pod_name: self.pod_name.clone(),
            pod_namespace: self.pod_namespace.clone(),
            instance_ips: self.instance_ips.clone(),
            service_account: self.service_account.clone(),
            cluster_id: self.cluster_id.clone(),
            mesh_id: self.mesh_id.clone(),
            istio_version: self.istio_version.clone(),
            workload_name: self.workload_name.clone(),
            labels_file: self.pod_labels.clone(),
            cluster_domain: self.cluster_domain.clone(),
        }
    }
}

/// `skiff node` operations.
#[derive(Subcommand, Debug)]
pub enum NodeOp {
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

/// `--capture`: how traffic reaches the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CaptureKind {
    /// cgroup connect4/6 + getsockopt eBPF programs.
    Ebpf,
    /// Istio-equivalent iptables nat rules in this network namespace (removed on exit).
    Iptables,
    /// eBPF when this kernel and process support it, else iptables (the log says why).
    Auto,
    /// Install nothing: something else (iptables REDIRECT) sends traffic, or plain proxying.
    None,
}

/// Encoding of `--kernel-access-log` (Istio's `accessLogEncoding`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KernelLogFormat {
    /// Istio's default text format.
    Text,
    /// Istio's default JSON format.
    Json,
}

/// `--mode`: one pod or one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Capture one pod's cgroup.
    Sidecar,
    /// Attach once at a node cgroup root; capture the cgroups registered at run time.
    Node,
}

/// `skiff run` arguments.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Envoy v3 bootstrap (YAML or JSON).
    #[arg(long)]
    pub bootstrap: PathBuf,
    /// How traffic reaches the proxy.
    #[arg(long, value_enum, default_value_t = CaptureKind::Ebpf)]
    pub capture: CaptureKind,
    /// Sidecar (one pod cgroup) or node (one skiff per node).
    #[arg(long, value_enum, default_value_t = Mode::Sidecar)]
    pub mode: Mode,
    /// Sidecar mode: the application's cgroup v2 directory to capture.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Node mode: the cgroup that stands for the node (default: the cgroup v2 root).
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// cgroup the proxy runs in (created if missing). Default: `skiff-proxy` beside the
    /// captured cgroup (sidecar) or under the node root (node).
    #[arg(long)]
    pub proxy_cgroup: Option<PathBuf>,
    /// Port of the outbound capture listener (Istio's 15001).
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// Do not listen on or capture IPv6.
    #[arg(long)]
    pub no_ipv6: bool,
    /// When the proxy is not ready, fail connects instead of letting them through.
    #[arg(long)]
    pub fail_closed: bool,
    /// Kernel fast path: connects to plain-TCP services go straight to an endpoint chosen in
    /// the kernel (default map sizes: 10k services, 100k endpoints).
    #[arg(long)]
    pub fast_path: bool,
    /// With --fast-path: when an update removes an endpoint (or it turns unhealthy), destroy the
    /// application's fast-path sockets still connected to it (netlink SOCK_DESTROY).
    #[arg(long, requires = "fast_path")]
    pub terminate_on_removal: bool,
    /// Kernel events (fast-path connects, fail-open/closed decisions) per second per CPU the
    /// kernel may report; 0 turns them off. Beyond it they are counted in
    /// `skiff.bpf.events.lost`.
    #[arg(long, value_name = "N", default_value_t = crate::bpf::events::DEFAULT_RATE)]
    pub kernel_events_rate: u64,
    /// Kernel events a CPU may report back to back (token bucket size).
    #[arg(long, value_name = "N", default_value_t = crate::bpf::events::DEFAULT_BURST)]
    pub kernel_events_burst: u64,
    /// Write an access-log line per kernel event (fast-path connects are marked
    /// `kernel_fast_path`) to this file, or `stdout`, in Istio's default format.
    #[arg(long, value_name = "PATH|stdout")]
    pub kernel_access_log: Option<String>,
    /// The kernel access log's encoding, as Istio's `accessLogEncoding`: Istio's default text
    /// format, or its default JSON format (one object per line).
    #[arg(long, value_enum, default_value_t = KernelLogFormat::Text, requires = "kernel_access_log")]
    pub kernel_access_log_format: KernelLogFormat,
    /// Pin the capture's links and kept maps (gate, original destinations, meshed cgroups,
    /// fast path) in this bpffs directory, so a killed skiff leaves capture attached and a
    /// restarted one with the same directory takes them over. Default:
    /// /sys/fs/bpf/skiff/<capture cgroup id> (off when /sys/fs/bpf is not bpffs).
    #[arg(long, value_name = "DIR", conflicts_with = "no_pin")]
    pub pin_dir: Option<std::path::PathBuf>,
    /// Pin nothing: a killed skiff detaches its capture (traffic then flows directly).
    #[arg(long)]
    pub no_pin: bool,
    /// Sockmap acceleration (sk_msg) for local socket pairs on `--sockmap-ports`. Off by
    /// default: it speeds up request/response on long-lived connections but slows bulk
    /// streams and short connections, and blocking readers may see EAGAIN at EOF
    /// (docs/ARCHITECTURE.md, docs/BENCHMARKS.md).
    #[arg(long, requires = "sockmap_ports")]
    pub sockmap: bool,
    /// Service ports whose local pairs `--sockmap` accelerates, comma separated.
    #[arg(long, value_delimiter = ',', requires = "sockmap")]
    pub sockmap_ports: Vec<u16>,
    /// XDP node-ingress load balancer on this interface (repeatable): packets for the fast
    /// path's services are DNATed to an endpoint at the driver (native mode where the driver
    /// supports it, else generic).
    #[arg(long = "xdp", value_name = "IFACE", requires = "fast_path")]
    pub xdp: Vec<String>,
    /// Ports never captured (Istio's excludeOutboundPorts), comma separated.
    #[arg(long, value_delimiter = ',')]
    pub exclude_ports: Vec<u16>,
    /// CIDRs never captured (Istio's excludeOutboundIPRanges), comma separated.
    #[arg(long, value_delimiter = ',')]
    pub exclude_cidrs: Vec<Cidr>,
    /// SO_MARK on the proxy's upstream sockets; marked sockets are never captured.
    #[arg(long, default_value = "0x539", value_parser = parse_u32)]
    pub proxy_mark: u32,
    /// iptables mode: the proxy's uid; its connects are never captured (Istio's 1337).
    #[arg(long)]
    pub proxy_uid: Option<u32>,
    /// iptables mode: the proxy's gid; its connects are never captured.
    #[arg(long)]
    pub proxy_gid: Option<u32>,
    /// Start even if other BPF programs act on the cgroup hooks skiff attaches to.
    #[arg(long)]
    pub allow_coexist: bool,
    /// Also capture inbound connections to the pod's addresses and serve them with the
    /// listener on --inbound-port (sk_lookup in eBPF mode, PREROUTING in iptables mode).
    #[arg(long)]
    pub capture_inbound: bool,
    /// Port of the inbound listener (Istio's virtualInbound 15006).
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// Ports never captured inbound (Istio's excludeInboundPorts), comma separated.
    #[arg(long, value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<u16>,
    /// The pod's addresses steered inbound (default: every non-loopback address here).
    #[arg(long, value_delimiter = ',')]
    pub pod_ips: Vec<IpAddr>,
    /// Admin address (overrides the bootstrap's admin.address; default 127.0.0.1:15000).
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// Let the admin listen on a non-loopback address (anyone reaching it reads the
    /// configuration).
    #[arg(long)]
    pub admin_allow_remote: bool,
    /// Allow admin requests that change state (`POST /drain_listeners`, `POST`/`DELETE
    /// /debug/node/*`); without it the admin is read-only.
    #[arg(long)]
    pub admin_mutations: bool,
    /// Node mode: the only directory pod bootstraps (`skiff node add-pod --bootstrap`) are
    /// read from.
    #[arg(long)]
    pub pod_bootstrap_dir: Option<PathBuf>,
    /// Time in-flight connections get to finish on shutdown.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain_time: Duration,
    /// Data-plane worker threads (Envoy's flag): each runs its own event loop and accepts on its
    /// own socket of every listener (SO_REUSEPORT). Default: the number of CPUs available.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// With one worker per CPU this process may use (auto), pin worker i to the i-th CPU and
    /// steer each new connection to the worker of the CPU it arrived on; off: never pin, the
    /// kernel hashes connections over the workers.
    #[arg(long, value_enum, default_value = "auto")]
    pub cpu_affinity: crate::dataplane::placement::CpuAffinity,
    /// Take over from the running skiff whose handover socket is SOCKET (default: the one
    /// this run would use, see --handover-socket): receive its listening sockets and pins,
    /// serve, then make it drain. No listen queue closes, no connection is reset.
    #[arg(long, value_name = "SOCKET", num_args = 0..=1)]
    pub takeover: Option<Option<PathBuf>>,
    /// Accept a successor (`skiff run --takeover`) on this Unix socket. Default, with pins:
    /// /run/skiff/<pin directory name>.sock.
    #[arg(long, value_name = "SOCKET", conflicts_with = "no_handover")]
    pub handover_socket: Option<PathBuf>,
    /// Accept no successor (no handover socket).
    #[arg(long)]
    pub no_handover: bool,
    /// Keep every capability. By default, once the capture is attached and the listeners
    /// are bound, skiff keeps only CAP_NET_ADMIN, CAP_NET_BIND_SERVICE, CAP_NET_RAW,
    /// CAP_BPF, CAP_SYS_ADMIN, CAP_SYS_RESOURCE (and CAP_SYS_PTRACE in node mode).
    #[arg(long)]
    pub keep_caps: bool,
    /// The ADS connection (address, TLS, token).
    #[command(flatten)]
    pub xds: XdsArgs,
    /// The node identity sent to the control plane.
    #[command(flatten)]
    pub node: NodeArgs,
}

/// A flag value clap could not take (clap prints it after the flag's name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// Not a decimal or `0x` hexadecimal 32-bit number.
    #[error("{0:?} is not a 32-bit number")]
    U32(String),
    /// Not `<digits>` followed by nothing or a unit.
    #[error("{0:?}: expected e.g. 5s or 500ms")]
    Duration(String),
    /// A duration with a unit other than `ms`, `s` or `m`.
    #[error("{0:?}: unit must be ms, s or m")]
    Unit(String),
}

impl RunArgs {
    /// The takeover and handover-socket flags.
    pub fn handover(&self) -> crate::takeover::HandoverOptions {
        crate::takeover::HandoverOptions {
            takeover: self.takeover.clone(),
            socket: self.handover_socket.clone(),
            disabled: self.no_handover,
            drop_caps: !self.keep_caps,
        }
    }
}

/// `0x539` or `1337`.
pub fn parse_u32(s: &str) -> Result<u32, ValueError> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| ValueError::U32(s.to_owned()))
}

/// `500ms`, `5s` (the default unit), `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    let (n, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = n.parse().map_err(|_| ValueError::Duration(s.to_owned()))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(ValueError::Unit(s.to_owned())),
    }
}

impl ControlPlaneArgs {
    /// The control plane's options (clap already requires one of `--dir`,
    /// `--from-config-dump`).
    pub fn options(self) -> Result<crate::controlplane::ControlPlaneOptions, OptionsError> {
        use crate::controlplane::{ControlPlaneOptions, Source};
        let source = match (self.dir, self.from_config_dump) {
            (Some(d), _) => Source::Dir(d),
            (None, Some(f)) => Source::ConfigDump(f),
            (None, None) => return Err(OptionsError::NoControlPlaneSource),
        };
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(crate::controlplane::ServerTls {
                cert,
                key,
                client_ca: self.client_ca,
            }),
            _ => None,
        };
        Ok(ControlPlaneOptions {
            source,
            listen: self.listen,
            poll_interval: self.poll_interval,
            tls,
            require_token: self.require_token,
            sds_socket: self.sds_socket,
            ads_socket: self.ads_socket,
        })
    }
}

#[cfg(test)]
mod tests;
