use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use clap::Parser;
use hyper::Method;

use super::run::build;
use super::*;
use crate::bpf::CaptureMode;

const BOOTSTRAP: &str =
    "admin: { address: { socket_address: { address: 127.0.0.1, port_value: 9901 } } }\n";

fn bootstrap() -> crate::config::Bootstrap {
    crate::config::parse(BOOTSTRAP, "<test>").unwrap()
}

fn run_args(args: &[&str]) -> RunArgs {
    let argv = ["skiff", "run", "--bootstrap", "b.yaml"]
        .into_iter()
        .chain(args.iter().copied());
    match Cli::try_parse_from(argv).unwrap().command {
        Command::Run(a) => a,
        other => panic!("not run: {other:?}"),
    }
}

/// A directory that exists for the test's life (stands for a cgroup: only `is_dir` is checked).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("skiff-cli-{name}-{}", std::process::id()));
        std::fs::create_dir_all(p.join("app")).unwrap();
        TempDir(p)
    }
    fn app(&self) -> PathBuf {
        self.0.join("app")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn value_parsers_take_hex_and_units() {
    assert_eq!(parse_u32("0x539"), Ok(1337));
    assert_eq!(parse_u32("1337"), Ok(1337));
    assert_eq!(
        parse_u32("0xzz").unwrap_err().to_string(),
        "\"0xzz\" is not a 32-bit number"
    );
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("5h"), Err(ValueError::Unit("5h".into())));
    assert_eq!(parse_duration("ms"), Err(ValueError::Duration("ms".into())));
    // clap reports the parser's message after the flag.
    let err = Cli::try_parse_from(["skiff", "run", "--bootstrap", "b", "--drain-time", "1h"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("unit must be ms, s or m"), "{err}");
}

#[test]
fn pin_dir_and_no_pin_choose_the_pinning() {
    let dir = TempDir::new("pin");
    let app = dir.app();
    let pinning = |more: &[&str]| {
        let mut args = vec!["--cgroup", path(&app)];
        args.extend_from_slice(more);
        let (opts, _) = build(run_args(&args), bootstrap(), CaptureKind::Ebpf).unwrap();
        opts.capture.unwrap().pinning
    };
    assert_eq!(
        pinning(&["--pin-dir", "/sys/fs/bpf/x"]),
        crate::bpf::Pinning::Dir("/sys/fs/bpf/x".into())
    );
    assert_eq!(pinning(&["--no-pin"]), crate::bpf::Pinning::Off);
    let both = [
        "skiff",
        "run",
        "--bootstrap",
        "b",
        "--no-pin",
        "--pin-dir",
        "/x",
    ];
    assert!(Cli::try_parse_from(both).is_err());
}

#[test]
fn clap_refuses_flags_without_their_companions() {
    for args in [
        &["--sockmap"][..],
        &["--sockmap-ports", "80"],
        &["--terminate-on-removal"],
    ] {
        let argv = ["skiff", "run", "--bootstrap", "b"]
            .into_iter()
            .chain(args.iter().copied());
        let err = Cli::try_parse_from(argv).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{args:?}: {err}");
    }
    assert!(Cli::try_parse_from(["skiff", "control-plane"]).is_err());
}

#[test]
fn capture_none_installs_nothing_and_marks_nothing() {
    let (opts, extras) = build(
        run_args(&["--capture", "none", "--no-ipv6"]),
        bootstrap(),
        CaptureKind::None,
    )
    .unwrap();
    assert!(opts.capture.is_none() && extras.iptables.is_none());
    assert_eq!(opts.upstream_mark, None);
    assert_eq!(opts.outbound_v4.to_string(), "127.0.0.1:15001");
    assert_eq!(opts.outbound_v6, None);
    // The bootstrap's admin address unless --admin overrides it.
    assert_eq!(opts.admin, Some("127.0.0.1:9901".parse().unwrap()));
    assert_eq!(opts.drain, Duration::from_secs(5));
    let (opts, _) = build(
        run_args(&["--capture", "none", "--admin", "127.0.0.1:1"]),
        bootstrap(),
        CaptureKind::None,
    )
    .unwrap();
    assert_eq!(opts.admin, Some("127.0.0.1:1".parse().unwrap()));
    assert_eq!(opts.outbound_v6.unwrap().to_string(), "[::1]:15001");
}

#[test]
fn misconfigurations_are_typed() {
    let err = |args: &[&str], kind| build(run_args(args), bootstrap(), kind).unwrap_err();
    assert!(matches!(
        err(&["--mode", "node"], CaptureKind::Iptables),
        OptionsError::IptablesInNodeMode
    ));
    assert!(matches!(
        err(&["--capture-inbound"], CaptureKind::None),
        OptionsError::InboundWithoutCapture
    ));
    assert!(matches!(
        err(&["--cgroup", "/tmp"], CaptureKind::None),
        OptionsError::CgroupWithoutEbpf
    ));
    assert!(matches!(
        err(&[], CaptureKind::Ebpf),
        OptionsError::SidecarWithoutCgroup
    ));
    let e = err(
        &["--cgroup", "/nonexistent-skiff-cgroup"],
        CaptureKind::Ebpf,
    );
    assert_eq!(
        e.to_string(),
        "--cgroup /nonexistent-skiff-cgroup: not a directory"
    );
    let e = err(
        &["--mode", "node", "--cgroup-root", "/nonexistent-skiff-root"],
        CaptureKind::Ebpf,
    );
    assert!(
        matches!(
            e,
            OptionsError::NotADirectory {
                flag: "cgroup-root",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn a_missing_bootstrap_names_the_file() {
    let a = run_args(&["--capture", "none"]);
    let e = run_options(RunArgs {
        bootstrap: "/nonexistent/skiff-b.yaml".into(),
        ..a
    })
    .unwrap_err();
    assert!(matches!(e, OptionsError::Bootstrap(_)), "{e}");
    assert!(e.to_string().contains("/nonexistent/skiff-b.yaml"), "{e}");
}

#[test]
fn sidecar_ebpf_capture_takes_every_flag() {
    let dir = TempDir::new("sidecar");
    let app = dir.app();
    let (opts, extras) = build(
        run_args(&[
            "--cgroup",
            path(&app),
            "--outbound-port",
            "16001",
            "--fail-closed",
            "--fast-path",
            "--terminate-on-removal",
            "--exclude-ports",
            "22,53",
            "--exclude-cidrs",
            "10.0.0.0/8,fd00::/8",
            "--proxy-mark",
            "7",
            "--capture-inbound",
            "--pod-ips",
            "10.1.2.3",
        ]),
        bootstrap(),
        CaptureKind::Ebpf,
    )
    .unwrap();
    let c = opts.capture.unwrap();
    assert_eq!(
        c.mode,
        CaptureMode::Sidecar {
            cgroup: app.clone(),
            proxy_cgroup: dir.0.join("skiff-proxy"),
        }
    );
    assert_eq!(c.outbound_v4.port(), 16001);
    assert!(c.fail_closed && c.fast_path.is_some() && c.terminate_on_removal);
    assert_eq!(c.exclude_ports, [22, 53]);
    let v4: IpAddr = "10.0.0.0".parse().unwrap();
    let v6: IpAddr = "fd00::".parse().unwrap();
    assert_eq!(c.exclude_cidrs, [(v4, 8), (v6, 8)]);
    assert_eq!(c.proxy_mark, 7);
    assert!(c.sockmap_ports.is_empty());
    assert_eq!(c.pinning, crate::bpf::Pinning::Default);
    assert_eq!(opts.upstream_mark, Some(7));
    let inbound = extras.inbound.unwrap();
    assert!(inbound.sk_lookup && inbound.port == 15006);
    assert_eq!(inbound.pod_ips, ["10.1.2.3".parse::<IpAddr>().unwrap()]);
    assert!(extras.iptables.is_none() && extras.auto_fallback.is_none());
}

#[test]
fn auto_keeps_iptables_as_the_fallback_of_a_sidecar() {
    let dir = TempDir::new("auto");
    let app = dir.app();
    let args = [
        "--capture",
        "auto",
        "--cgroup",
        path(&app),
        "--sockmap",
        "--sockmap-ports",
        "80",
    ];
    // The probe said eBPF: iptables rules wait as the fallback.
    let (opts, extras) = build(run_args(&args), bootstrap(), CaptureKind::Ebpf).unwrap();
    assert_eq!(opts.capture.unwrap().sockmap_ports, [80]);
    let fallback = extras.auto_fallback.unwrap();
    assert_eq!(fallback.outbound_port, 15001);
    assert_eq!(fallback.proxy_mark, 0x539);
    // The probe said no: sockmap cannot act, so it is refused.
    assert_eq!(
        build(run_args(&args), bootstrap(), CaptureKind::Iptables)
            .unwrap_err()
            .to_string(),
        "--sockmap needs the eBPF capture; with --capture auto (which chose iptables) it would \
         do nothing"
    );
    // Without it, iptables is the capture, with the inbound chain when asked.
    let mut with_inbound = args[..4].to_vec();
    with_inbound.push("--capture-inbound");
    let (opts, extras) =
        build(run_args(&with_inbound), bootstrap(), CaptureKind::Iptables).unwrap();
    assert!(opts.capture.is_none() && extras.auto_fallback.is_none());
    assert_eq!(extras.iptables.unwrap().inbound_port, Some(15006));
    assert!(!extras.inbound.unwrap().sk_lookup);
    assert_eq!(opts.upstream_mark, Some(0x539));
}

#[test]
fn node_mode_puts_the_proxy_under_the_root() {
    let dir = TempDir::new("node");
    let (opts, extras) = build(
        run_args(&["--mode", "node", "--cgroup-root", path(&dir.0)]),
        bootstrap(),
        CaptureKind::Ebpf,
    )
    .unwrap();
    assert_eq!(
        opts.capture.unwrap().mode,
        CaptureMode::Node {
            cgroup_root: dir.0.clone(),
            proxy_cgroup: dir.0.join("skiff-proxy"),
        }
    );
    assert!(extras.auto_fallback.is_none());
}

#[test]
fn control_plane_sources() {
    let parse = |args: &[&str]| {
        let argv = ["skiff", "control-plane"]
            .into_iter()
            .chain(args.iter().copied());
        match Cli::try_parse_from(argv).unwrap().command {
            Command::ControlPlane(a) => a.options().unwrap(),
            other => panic!("{other:?}"),
        }
    };
    let o = parse(&["--dir", "/d", "--poll-interval", "50ms"]);
    assert!(matches!(o.source, crate::controlplane::Source::Dir(ref d) if d == Path::new("/d")));
    assert_eq!(o.poll_interval, Duration::from_millis(50));
    assert_eq!(o.listen, crate::controlplane::DEFAULT_LISTEN);
    let o = parse(&["--from-config-dump", "/f.json"]);
    assert!(matches!(
        o.source,
        crate::controlplane::Source::ConfigDump(_)
    ));
}

#[test]
fn admin_calls() {
    let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
    let c = AdminCall::admin(admin, "post", "quitquitquit").unwrap();
    assert_eq!((c.method, c.path.as_str()), (Method::POST, "/quitquitquit"));
    assert_eq!(
        AdminCall::admin(admin, "b@d", "/").unwrap_err().to_string(),
        "--method \"b@d\" is not an HTTP method"
    );
    let dst: SocketAddr = "10.96.0.1:80".parse().unwrap();
    assert_eq!(
        AdminCall::explain(admin, dst).path,
        "/debug/explain?dst=10.96.0.1:80"
    );
    let (m, p) = query::node_request(&NodeOp::AddPod {
        cgroup: "/sys/fs/cgroup/pod a".into(),
        netns: "/run/netns/p".into(),
        node_id: "sidecar~1".into(),
        bootstrap: None,
    });
    assert_eq!(m, Method::POST);
    assert_eq!(
        p,
        "/debug/node/pods?cgroup=%2Fsys%2Ffs%2Fcgroup%2Fpod+a&netns=%2Frun%2Fnetns%2Fp&node_id=sidecar%7E1"
    );
    assert_eq!(
        query::node_request(&NodeOp::ListCgroups),
        (Method::GET, "/debug/node/cgroups".to_string())
    );
}

#[test]
fn maps_render_one_line_per_entry() {
    let v = serde_json::json!({
        "generation": 3,
        "services": [ { "vip": "10.96.0.1:80", "slots": 2 } ],
    });
    assert_eq!(
        query::maps_text(&v),
        "generation: 3\nservices (1):\n  slots=2 vip=10.96.0.1:80\n"
    );
    let empty = crate::capture::iptables::CleanupReport::default();
    assert_eq!(query::cleanup_text(&empty), "nothing to remove\n");
}

#[test]
fn flags_that_cannot_act_in_the_chosen_capture_are_refused() {
    for (args, kind, msg) in [
        (
            &["--capture", "none", "--fast-path"][..],
            CaptureKind::None,
            "--fast-path needs the eBPF capture; with --capture none it would do nothing",
        ),
        (
            &[
                "--capture",
                "iptables",
                "--fast-path",
                "--terminate-on-removal",
            ],
            CaptureKind::Iptables,
            "--fast-path needs the eBPF capture; with --capture iptables it would do nothing",
        ),
        (
            &["--capture", "none", "--sockmap", "--sockmap-ports", "80"],
            CaptureKind::None,
            "--sockmap needs the eBPF capture; with --capture none it would do nothing",
        ),
        (
            &["--capture", "none", "--pod-bootstrap-dir", "/tmp"],
            CaptureKind::None,
            "--pod-bootstrap-dir is a node-mode flag: use --mode node",
        ),
    ] {
        let e = build(run_args(args), bootstrap(), kind).unwrap_err();
        assert_eq!(e.to_string(), msg, "{args:?}");
    }
}

#[test]
fn auto_in_node_mode_is_ebpf_or_refused() {
    use super::run::resolve_auto;
    use crate::capture::probe::ProbeError;
    assert_eq!(resolve_auto(Mode::Node, Ok(())).unwrap(), CaptureKind::Ebpf);
    assert_eq!(
        resolve_auto(Mode::Sidecar, Err(ProbeError::NoBpffs)).unwrap(),
        CaptureKind::Iptables
    );
    let e = resolve_auto(Mode::Node, Err(ProbeError::NoCapBpf)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "--capture auto in node mode needs the eBPF capture, which is unavailable here: the \
         process lacks CAP_BPF (or CAP_SYS_ADMIN)"
    );
}

#[test]
fn admin_is_on_loopback_15000_unless_told_and_remote_needs_the_flag() {
    let none = crate::config::parse("node: { id: n }\n", "<test>").unwrap();
    let (opts, _) = build(run_args(&["--capture", "none"]), none, CaptureKind::None).unwrap();
    assert_eq!(opts.admin, Some("127.0.0.1:15000".parse().unwrap()));
    let (opts, _) = build(
        run_args(&["--capture", "none"]),
        bootstrap(),
        CaptureKind::None,
    )
    .unwrap();
    assert_eq!(opts.admin, Some("127.0.0.1:9901".parse().unwrap()));
    let remote = ["--capture", "none", "--admin", "0.0.0.0:15000"];
    let e = build(run_args(&remote), bootstrap(), CaptureKind::None).unwrap_err();
    assert!(e.to_string().contains("--admin-allow-remote"), "{e}");
    let mut allowed = remote.to_vec();
    allowed.push("--admin-allow-remote");
    let (opts, _) = build(run_args(&allowed), bootstrap(), CaptureKind::None).unwrap();
    assert_eq!(opts.admin, Some("0.0.0.0:15000".parse().unwrap()));
    let (_, o) = super::run::admin_options(
        &run_args(&["--admin-mutations", "--drain-time", "2s"]),
        None,
    )
    .unwrap();
    assert!(o.allow_mutations && o.pod_bootstrap_dir.is_none());
    assert_eq!(o.drain_time, Duration::from_secs(2));
    assert!(
        !super::run::admin_options(&run_args(&[]), None)
            .unwrap()
            .1
            .allow_mutations
    );
}

#[test]
fn capture_none_without_a_capture_port_listener_binds_no_capture_listener() {
    use crate::app::needs_capture_listener;
    let plain = crate::config::parse("node: { id: n }\n", "<test>").unwrap();
    let (opts, extras) = build(run_args(&["--capture", "none"]), plain, CaptureKind::None).unwrap();
    assert!(!needs_capture_listener(&opts, &extras));
    let on_port = crate::config::parse(
        "static_resources:\n  listeners:\n  - name: v\n    address: { socket_address: { address: 0.0.0.0, port_value: 15001 } }\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.tcp_proxy\n        typed_config:\n          '@type': type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\n          stat_prefix: s\n          cluster: c\n  clusters:\n  - name: c\n    type: STATIC\n    connect_timeout: 1s\n",
        "<test>",
    )
    .unwrap();
    let (opts, extras) =
        build(run_args(&["--capture", "none"]), on_port, CaptureKind::None).unwrap();
    assert!(needs_capture_listener(&opts, &extras));
    let dir = TempDir::new("needs");
    let (opts, extras) = build(
        run_args(&["--cgroup", path(&dir.app())]),
        bootstrap(),
        CaptureKind::Ebpf,
    )
    .unwrap();
    assert!(needs_capture_listener(&opts, &extras));
}

#[test]
fn xds_flags_point_ads_at_istiod_with_tls_token_and_the_istio_node() {
    use crate::model::tls::{DataSource, SanType};
    let dir = TempDir::new("xds-flags");
    let ca = dir.0.join("root-cert.pem");
    let root = rcgen::generate_simple_self_signed(vec!["root".into()]).unwrap();
    std::fs::write(&ca, root.cert.pem()).unwrap();
    let token = dir.0.join("istio-token");
    std::fs::write(&token, "jwt").unwrap();
    let a = run_args(&[
        "--capture",
        "none",
        "--xds-address",
        "127.0.0.1:15012",
        "--xds-ca",
        path(&ca),
        "--xds-san",
        "istiod.istio-system.svc",
        "--xds-token",
        path(&token),
        "--pod-name",
        "p-1",
        "--pod-namespace",
        "ns",
        "--instance-ips",
        "10.0.0.5",
    ]);
    let env = [("ISTIO_META_CLUSTER_ID".to_string(), "east".to_string())].into();
    let b = super::run::control_plane_flags(&a, bootstrap(), &env).unwrap();
    assert!(b.lds_ads && b.cds_ads);
    let ads = b.ads.unwrap();
    assert_eq!(
        ads.server,
        crate::config::GrpcTarget::Tcp("127.0.0.1:15012".parse().unwrap())
    );
    assert_eq!(ads.api, crate::config::AdsApi::Sotw);
    assert_eq!(ads.token.as_deref(), Some(token.as_path()));
    let tls = ads.tls.unwrap();
    assert_eq!(tls.sni, "istiod.istio-system.svc");
    assert_eq!(tls.common.alpn, ["h2"]);
    let v = tls.common.validation.as_ref().unwrap();
    assert_eq!(v.inline.trusted_ca, Some(DataSource::File(ca.clone())));
    assert_eq!(v.inline.san_matchers.len(), 1);
    assert_eq!(v.inline.san_matchers[0].san_type, SanType::Dns);
    assert!(
        v.inline.san_matchers[0]
            .matcher
            .matches("istiod.istio-system.svc")
    );
    assert_eq!(b.node.id, "sidecar~10.0.0.5~p-1.ns~ns.svc.cluster.local");
    let meta = b.raw.node.unwrap().metadata.unwrap();
    assert!(matches!(
        &meta.fields["CLUSTER_ID"].kind,
        Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) if s == "east"
    ));

    // Without --xds-address the bootstrap's node is left alone.
    let plain = super::run::control_plane_flags(&run_args(&[]), bootstrap(), &env).unwrap();
    assert!(plain.ads.is_none() && plain.raw.node.is_none());
}

#[test]
fn xds_flags_that_cannot_work_are_refused_naming_the_cause() {
    let dir = TempDir::new("xds-refusals");
    let env = Default::default();
    let flags = |extra: &[&str]| {
        super::run::control_plane_flags(&run_args(extra), bootstrap(), &env)
            .unwrap_err()
            .to_string()
    };
    let missing = dir.0.join("missing.pem");
    let e = flags(&["--xds-ca", path(&missing)]);
    assert!(e.starts_with("--xds-ca: needs --xds-address"), "{e}");
    let e = flags(&[
        "--xds-address",
        "127.0.0.1:1",
        "--node-id",
        "n",
        "--xds-ca",
        path(&missing),
    ]);
    assert!(e.contains("CA file") && e.contains("missing.pem"), "{e}");
    let e = flags(&[
        "--xds-address",
        "127.0.0.1:1",
        "--node-id",
        "n",
        "--xds-token",
        path(&missing),
    ]);
    assert!(e.contains("token file"), "{e}");
    let e = flags(&["--xds-address", "no-port", "--node-id", "n"]);
    assert!(e.starts_with("--xds-address"), "{e}");
    let e = flags(&["--xds-address", "127.0.0.1:1"]);
    assert!(e.contains("no node id"), "{e}");
}
