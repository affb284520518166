//! `skiff run` arguments -> the options of [`crate::app::run_with`].
//!
//! [`run_options`] does the two things that touch the machine (read the bootstrap, probe the
//! kernel for `--capture auto`); [`build`] is the pure rest, so tests drive it directly.

use std::net::{Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::path::PathBuf;

use tracing::{info, warn};

use super::{CaptureKind, KernelLogFormat, Mode, RunArgs};
use crate::admin::AdminOptions;
use crate::app::RunOptions;
use crate::bpf::{BpfError, Capacity, CaptureConfig, CaptureMode};
use crate::capture::{CaptureExtras, InboundOptions, IptablesConfig};
use crate::config::{Bootstrap, ConfigError};

/// Why the command line cannot be run; the binary exits 2 for each of these.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    /// The bootstrap file is unreadable or invalid.
    #[error(transparent)]
    Bootstrap(#[from] ConfigError),
    /// The iptables capture is per network namespace, so per pod.
    #[error("--capture iptables serves one network namespace: use --mode sidecar")]
    IptablesInNodeMode,
    /// Inbound capture needs something that captures.
    #[error("--capture-inbound needs --capture ebpf, iptables or auto")]
    InboundWithoutCapture,
    /// cgroups are only attached to by the eBPF capture.
    #[error("--cgroup/--cgroup-root need --capture ebpf")]
    CgroupWithoutEbpf,
    /// Sidecar mode captures one application cgroup, which must be named.
    #[error("--mode sidecar needs --cgroup PATH (the application's cgroup)")]
    SidecarWithoutCgroup,
    /// A cgroup flag names something that is not a directory.
    #[error("--{flag} {}: not a directory", path.display())]
    NotADirectory {
        /// `cgroup` or `cgroup-root`.
        flag: &'static str,
        /// The path given.
        path: PathBuf,
    },
    /// The default proxy cgroup goes beside `--cgroup`, which needs a parent.
    #[error("--cgroup has no parent directory")]
    CgroupWithoutParent,
    /// Node mode without `--cgroup-root`, and no cgroup v2 mount was found.
    #[error(transparent)]
    CgroupRoot(#[from] BpfError),
    /// `skiff admin --method` is not an HTTP method.
    #[error("--method {0:?} is not an HTTP method")]
    Method(String),
    /// `skiff control-plane` without a source (clap normally refuses this first).
    #[error("control-plane needs --dir or --from-config-dump")]
    NoControlPlaneSource,
    /// A flag only the eBPF capture acts on, with a capture that would ignore it.
    #[error("{flag} needs the eBPF capture; with --capture {capture} it would do nothing")]
    NeedsEbpf {
        /// The flag, e.g. `--fast-path`.
        flag: &'static str,
        /// The capture in use (`none`, `iptables`, or `auto` when it chose iptables).
        capture: &'static str,
    },
    /// `--capture auto` in node mode can only mean eBPF (iptables serves one namespace).
    #[error(
        "--capture auto in node mode needs the eBPF capture, which is unavailable here: {reason}"
    )]
    AutoNodeWithoutEbpf {
        /// Why the probe refused eBPF.
        reason: crate::capture::probe::ProbeError,
    },
    /// A node-mode flag in sidecar mode.
    #[error("{0} is a node-mode flag: use --mode node")]
    NodeOnly(&'static str),
    /// The admin address is not loopback and `--admin-allow-remote` was not given.
    #[error(transparent)]
    Admin(#[from] crate::admin::policy::AddrError),
    /// `--pod-bootstrap-dir` is not a directory.
    #[error("--pod-bootstrap-dir {}: not a directory", .0.display())]
    PodBootstrapDir(PathBuf),
    /// An `--xds-*` flag cannot be used as given.
    #[error("{flag}: {reason}")]
    Xds {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The ADS connection settings cannot be used (CA or token file unreadable, no PEM
    /// certificate, ...). The cause is in the message, so not a `source()`.
    #[error("ADS connection: {0}")]
    XdsConnection(crate::xds::channel::ChannelError),
    /// The Istio node cannot be built from flags and environment.
    #[error(transparent)]
    Node(#[from] crate::xds::node::NodeError),
}

/// Reads the bootstrap, resolves `--capture auto` by probing this kernel and process, and
/// builds the run's options.
pub fn run_options(a: RunArgs) -> Result<(RunOptions, CaptureExtras), OptionsError> {
    let bootstrap = crate::config::load(&a.bootstrap)?;
    crate::config::release_parser_memory();
    let bootstrap = control_plane_flags(&a, bootstrap, &crate::xds::node::process_env())?;
    let kind = match a.capture {
        CaptureKind::Auto => {
            // Node mode attaches at the node's cgroup: probe that one (there is no --cgroup).
            let cgroup = match a.mode {
                Mode::Sidecar => a.cgroup.clone(),
                Mode::Node => a
                    .cgroup_root
                    .clone()
                    .or_else(|| crate::bpf::cgroup2_mount().ok()),
            };
            let probed = crate::capture::probe::ebpf_supported(cgroup.as_deref());
            resolve_auto(a.mode, probed)?
        }
        k => k,
    };
    build(a, bootstrap, kind)
}

/// What `--capture auto` becomes given the probe's answer: eBPF when supported; otherwise
/// iptables in sidecar mode, and a refusal in node mode (iptables serves one namespace).
pub fn resolve_auto(
    mode: Mode,
    probed: Result<(), crate::capture::probe::ProbeError>,
) -> Result<CaptureKind, OptionsError> {
    match (probed, mode) {
        (Ok(()), _) => {
            info!("--capture auto: the eBPF capture is supported here; using it");
            Ok(CaptureKind::Ebpf)
        }
        (Err(reason), Mode::Node) => Err(OptionsError::AutoNodeWithoutEbpf { reason }),
        (Err(reason), Mode::Sidecar) => {
            warn!(%reason, "--capture auto: eBPF capture unavailable; using iptables");
            Ok(CaptureKind::Iptables)
        }
    }
}

/// Refuses flags that cannot act with capture `kind` (`--capture auto` already resolved):
/// the kernel fast path, its socket termination and sockmap exist only in the eBPF capture,
/// and `--pod-bootstrap-dir` only in node mode.
pub fn check_flags(a: &RunArgs, kind: CaptureKind) -> Result<(), OptionsError> {
    let capture = match (kind, a.capture) {
        (CaptureKind::Ebpf, _) => None,
        (_, CaptureKind::Auto) => Some("auto (which chose iptables)"),
        (CaptureKind::Iptables, _) => Some("iptables"),
        _ => Some("none"),
    };
    if let Some(capture) = capture {
        for (on, flag) in [
            (a.fast_path, "--fast-path"),
            (a.terminate_on_removal, "--terminate-on-removal"),
            (a.sockmap, "--sockmap"),
            (!a.xdp.is_empty(), "--xdp"),
        ] {
            if on {
                return Err(OptionsError::NeedsEbpf { flag, capture });
            }
        }
    }
    if a.mode == Mode::Sidecar && a.pod_bootstrap_dir.is_some() {
        return Err(OptionsError::NodeOnly("--pod-bootstrap-dir"));
    }
    if let Some(d) = &a.pod_bootstrap_dir
        && !d.is_dir()
    {
        return Err(OptionsError::PodBootstrapDir(d.clone()));
    }
    Ok(())
}

/// The admin server's settings for `a`, its address resolved with the bootstrap's
/// (`bootstrap_admin`): `--admin`, else the bootstrap's, else 127.0.0.1:15000, and never a
/// non-loopback address without `--admin-allow-remote`.
pub fn admin_options(
    a: &RunArgs,
    bootstrap_admin: Option<std::net::SocketAddr>,
) -> Result<(std::net::SocketAddr, AdminOptions), OptionsError> {
    let addr = crate::admin::policy::admin_addr(a.admin, bootstrap_admin, a.admin_allow_remote)?;
    Ok((
        addr,
        AdminOptions {
            allow_mutations: a.admin_mutations,
            pod_bootstrap_dir: a.pod_bootstrap_dir.clone(),
            drain_time: a.drain_time,
            ..AdminOptions::default()
        },
    ))
}

/// The run's options for `a`, with `kind` the capture actually used (`--capture auto`
/// already resolved to eBPF or iptables).
pub fn build(
    a: RunArgs,
    bootstrap: Bootstrap,
    kind: CaptureKind,
) -> Result<(RunOptions, CaptureExtras), OptionsError> {
    check_flags(&a, kind)?;
    let (admin, admin_options) = admin_options(&a, bootstrap.admin)?;
    let outbound_v4 = SocketAddrV4::new([127, 0, 0, 1].into(), a.outbound_port);
    let outbound_v6 =
        (!a.no_ipv6).then(|| SocketAddrV6::new(Ipv6Addr::LOCALHOST, a.outbound_port, 0, 0));
    let mut extras = CaptureExtras {
        allow_coexist: a.allow_coexist,
        ..Default::default()
    };
    if a.capture_inbound {
        extras.inbound = Some(InboundOptions {
            port: a.inbound_port,
            exclude_ports: a.exclude_inbound_ports.clone(),
            sk_lookup: kind == CaptureKind::Ebpf,
            pod_ips: a.pod_ips.clone(),
            ipv6: !a.no_ipv6,
        });
    }
    let exclude_cidrs: Vec<_> = a.exclude_cidrs.iter().map(|c| (c.addr, c.len)).collect();
    let iptables = IptablesConfig {
        outbound_port: a.outbound_port,
        inbound_port: a.capture_inbound.then_some(a.inbound_port),
        proxy_mark: a.proxy_mark,
        proxy_uid: a.proxy_uid,
        proxy_gid: a.proxy_gid,
        exclude_ports: a.exclude_ports.clone(),
        exclude_cidrs: exclude_cidrs.clone(),
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
                return Err(OptionsError::IptablesInNodeMode);
            }
            extras.iptables = Some(iptables);
            None
        }
        CaptureKind::None => {
            if a.capture_inbound {
                return Err(OptionsError::InboundWithoutCapture);
            }
            if a.cgroup.is_some() || a.cgroup_root.is_some() {
                return Err(OptionsError::CgroupWithoutEbpf);
            }
            None
        }
        CaptureKind::Ebpf | CaptureKind::Auto => Some(CaptureConfig {
            mode: capture_mode(a.mode, a.cgroup, a.cgroup_root, a.proxy_cgroup)?,
            outbound_v4,
            outbound_v6,
            proxy_mark: a.proxy_mark,
            fail_closed: a.fail_closed,
            exclude_ports: a.exclude_ports,
            exclude_cidrs,
            fast_path: a.fast_path.then(Capacity::default),
            terminate_on_removal: a.terminate_on_removal,
            sockmap_ports: if a.sockmap {
                a.sockmap_ports
            } else {
                Vec::new()
            },
            xdp_interfaces: a.xdp,
            pinning: match (a.no_pin, a.pin_dir) {
                (true, _) => crate::bpf::Pinning::Off,
                (false, Some(dir)) => crate::bpf::Pinning::Dir(dir),
                (false, None) => crate::bpf::Pinning::Default,
            },
            events: crate::bpf::events::EventsConfig {
                rate_per_sec: a.kernel_events_rate,
                burst: a.kernel_events_burst,
                access_log: a.kernel_access_log,
                access_log_json: a.kernel_access_log_format == KernelLogFormat::Json,
                ..Default::default()
            },
        }),
    };
    let upstream_mark = (capture.is_some() || extras.iptables.is_some()).then_some(a.proxy_mark);
    let opts = RunOptions {
        admin: Some(admin),
        admin_options,
        bootstrap,
        capture,
        outbound_v4,
        outbound_v6,
        upstream_mark,
        drain: a.drain_time,
        concurrency: a
            .concurrency
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        cpu_affinity: a.cpu_affinity,
    };
    Ok((opts, extras))
}

/// Applies `--xds-*` and the node flags to the bootstrap: the ADS server, its TLS and token,
/// and (with `--xds-address` or `--istio-node`) Istio's node id and metadata from the flags
/// and `env`. TLS files are read once here, so a bad CA file is a configuration error.
pub fn control_plane_flags(
    a: &RunArgs,
    mut bootstrap: Bootstrap,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<Bootstrap, OptionsError> {
    use crate::config::{AdsApi, AdsConfig};
    use crate::model::tls::{
        CertificateSource, CommonTls, DataSource, SanMatcher, SanType, TlsCertificate, TlsVersion,
        UpstreamTls, Validation, ValidationContext,
    };
    use crate::rbac::{StringKind, StringMatch};
    let x = &a.xds;
    let mut host = None;
    if let Some(addr) = &x.xds_address {
        let xds_err = |reason: String| OptionsError::Xds {
            flag: "--xds-address",
            reason,
        };
        let (h, _) = addr
            .rsplit_once(':')
            .ok_or_else(|| xds_err(format!("{addr:?} is not HOST:PORT")))?;
        host = Some(h.trim_start_matches('[').trim_end_matches(']').to_owned());
        let server = std::net::ToSocketAddrs::to_socket_addrs(addr.as_str())
            .map_err(|e| xds_err(format!("resolving {addr:?}: {e}")))?
            .next()
            .ok_or_else(|| xds_err(format!("{addr:?} resolves to no address")))?;
        let api = if x.xds_delta {
            AdsApi::Delta
        } else {
            bootstrap.ads.as_ref().map_or(AdsApi::Sotw, |ads| ads.api)
        };
        let backoff = bootstrap.ads.as_ref().and_then(|ads| ads.backoff);
        bootstrap.ads = Some(AdsConfig {
            api,
            cluster: "xds-grpc".into(),
            server: crate::config::GrpcTarget::Tcp(server),
            backoff,
            tls: None,
            token: None,
        });
        // pilot-agent's bootstrap: listeners and clusters over ADS.
        bootstrap.lds_ads = true;
        bootstrap.cds_ads = true;
    }
    let needs_ads = [
        (x.xds_ca.is_some(), "--xds-ca"),
        (x.xds_token.is_some(), "--xds-token"),
    ];
    if let Some((_, flag)) = needs_ads.iter().find(|(set, _)| *set)
        && bootstrap.ads.is_none()
    {
        return Err(OptionsError::Xds {
            flag,
            reason: "needs --xds-address or a bootstrap with dynamic_resources.ads_config".into(),
        });
    }
    if let Some(ads) = bootstrap.ads.as_mut() {
        if let Some(ca) = &x.xds_ca {
            // The name to verify: --xds-san, else the address's host (what gRPC checks).
            let ip = |h: &str| h.parse::<std::net::IpAddr>().ok();
            let name = x.xds_san.clone().or_else(|| host.clone());
            let (sni, matcher) = match name {
                Some(n) if ip(&n).is_some() => (String::new(), Some((SanType::IpAddress, n))),
                Some(n) => (n.clone(), Some((SanType::Dns, n))),
                None => (String::new(), None),
            };
            let certificate = match (&x.xds_cert, &x.xds_key) {
                (Some(c), Some(k)) => Some(CertificateSource::Inline(TlsCertificate {
                    certificate_chain: DataSource::File(c.clone()),
                    private_key: DataSource::File(k.clone()),
                })),
                _ => None,
            };
            ads.tls = Some(std::sync::Arc::new(UpstreamTls {
                max_session_keys: 1,
                common: CommonTls {
                    certificate,
                    validation: Some(Validation {
                        inline: ValidationContext {
                            trusted_ca: Some(DataSource::File(ca.clone())),
                            san_matchers: matcher
                                .into_iter()
                                .map(|(san_type, n)| SanMatcher {
                                    san_type,
                                    matcher: StringMatch {
                                        kind: StringKind::Exact(n),
                                        ignore_case: false,
                                    },
                                })
                                .collect(),
                        },
                        sds: None,
                    }),
                    alpn: vec!["h2".into()],
                    min_version: TlsVersion::V1_2,
                    max_version: TlsVersion::V1_3,
                    cipher_suites: Vec::new(),
                    ecdh_curves: Vec::new(),
                },
                sni,
            }));
        }
        if let Some(t) = &x.xds_token {
            ads.token = Some(t.clone());
            // Fail now on a missing token file; it is re-read at every reconnect.
            crate::xds::channel::bearer(t).map_err(OptionsError::XdsConnection)?;
        }
        if let Some(tls) = &ads.tls {
            crate::xds::channel::endpoint(&ads.server, Some(tls))
                .map_err(OptionsError::XdsConnection)?;
        }
    }
    if x.xds_address.is_some() || a.node.istio_node {
        let node =
            crate::xds::node::istio_node(&a.node.options(), env, bootstrap.raw.node.as_ref())?;
        bootstrap.node = crate::config::NodeInfo {
            id: node.id.clone(),
            cluster: node.cluster.clone(),
        };
        bootstrap.raw.node = Some(node);
    }
    Ok(bootstrap)
}

/// The cgroups the eBPF capture attaches to: the application's (sidecar) or the node's, and
/// the proxy's own (default `skiff-proxy` beside the first, or under the node root).
fn capture_mode(
    mode: Mode,
    cgroup: Option<PathBuf>,
    cgroup_root: Option<PathBuf>,
    proxy_cgroup: Option<PathBuf>,
) -> Result<CaptureMode, OptionsError> {
    let not_dir = |flag, path| OptionsError::NotADirectory { flag, path };
    Ok(match mode {
        Mode::Sidecar => {
            let cgroup = cgroup.ok_or(OptionsError::SidecarWithoutCgroup)?;
            if !cgroup.is_dir() {
                return Err(not_dir("cgroup", cgroup));
            }
            let proxy_cgroup = match proxy_cgroup {
                Some(p) => p,
                None => cgroup
                    .parent()
                    .ok_or(OptionsError::CgroupWithoutParent)?
                    .join("skiff-proxy"),
            };
            CaptureMode::Sidecar {
                cgroup,
                proxy_cgroup,
            }
        }
        Mode::Node => {
            let cgroup_root = match cgroup_root {
                Some(p) => p,
                None => crate::bpf::cgroup2_mount()?,
            };
            if !cgroup_root.is_dir() {
                return Err(not_dir("cgroup-root", cgroup_root));
            }
            let proxy_cgroup = proxy_cgroup.unwrap_or_else(|| cgroup_root.join("skiff-proxy"));
            CaptureMode::Node {
                cgroup_root,
                proxy_cgroup,
            }
        }
    })
}
