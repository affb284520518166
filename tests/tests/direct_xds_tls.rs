//! skiff joins a control plane the way pilot-agent joins istiod: ADS over TLS verified against
//! a root CA and a server name, with a bearer token on the stream. skiff's own control plane
//! (`--tls-cert/--tls-key`, `--require-token`) is the server; skiff runs in-process from the
//! real `skiff run` flags (`--xds-address --xds-ca --xds-san --xds-token`). Certificates come
//! from an rcgen CA written to a tempdir; every port is free-picked.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use clap::Parser;
use skiff::controlplane::{ControlPlaneOptions, ServerTls, Source};
use skiff::xds::channel::{self, GrpcTarget};
use skiff_tests::tls::{Ca, write_pem as write};
use skiff_tests::{InProcessSkiff, free_port, named_backend, tcp_ask};

const WAIT: Duration = Duration::from_secs(15);
const ISTIOD: &str = "istiod.istio-system.svc";

/// A running control plane and what stops it.
struct Cp {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), skiff::controlplane::ControlPlaneError>>,
}

async fn control_plane(opts: ControlPlaneOptions) -> Cp {
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(skiff::controlplane::serve(
        opts,
        move |a| {
            let _ = bound_tx.send(a);
        },
        async move {
            let _ = stopped.await;
        },
    ));
    let addr = tokio::time::timeout(WAIT, bound_rx)
        .await
        .expect("control plane did not bind")
        .expect("control plane failed before binding");
    Cp { addr, stop, task }
}

impl Cp {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(WAIT, self.task).await;
    }
}

/// A listener on `listen` forwarding to a static cluster whose one endpoint is `backend`.
fn write_config(dir: &Path, listen: u16, backend: SocketAddr) {
    let lds = format!(
        r#"{{"version_info": "1", "resources": [{{
  "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
  "name": "front",
  "address": {{"socket_address": {{"address": "127.0.0.1", "port_value": {listen}}}}},
  "filter_chains": [{{"filters": [{{"name": "envoy.filters.network.tcp_proxy",
    "typed_config": {{"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
      "stat_prefix": "front", "cluster": "svc"}}}}]}}]}}]}}"#
    );
    let cds = format!(
        r#"{{"version_info": "1", "resources": [{{
  "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
  "name": "svc", "type": "STATIC", "connect_timeout": "1s",
  "load_assignment": {{"cluster_name": "svc", "endpoints": [{{"lb_endpoints": [{{"endpoint":
    {{"address": {{"socket_address": {{"address": "{}", "port_value": {}}}}}}}}}]}}]}}}}]}}"#,
        backend.ip(),
        backend.port()
    );
    std::fs::write(dir.join("listeners.json"), lds).unwrap();
    std::fs::write(dir.join("clusters.json"), cds).unwrap();
}

/// The certificates of one test: the mesh root, istiod's certificate, a foreign root.
struct Pki {
    ca: std::path::PathBuf,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    other_ca: std::path::PathBuf,
}

fn pki(dir: &Path) -> Pki {
    let ca = Ca::new("mesh root");
    let leaf = ca.leaf(
        &[ISTIOD],
        &["spiffe://cluster.local/ns/istio-system/sa/istiod"],
    );
    Pki {
        ca: write(dir, "root-cert.pem", &ca.pem),
        cert: write(dir, "istiod.pem", &leaf.cert),
        key: write(dir, "istiod-key.pem", &leaf.key),
        other_ca: write(dir, "other-root.pem", &Ca::new("someone else").pem),
    }
}

/// skiff started from `skiff run` flags (no capture, its own admin and outbound ports).
fn start_skiff(dir: &Path, admin: u16, flags: &[&str]) -> InProcessSkiff {
    let bootstrap = write(
        dir,
        "bootstrap.yaml",
        &format!(
            "admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}\n"
        ),
    );
    let outbound = free_port().to_string();
    let mut argv = vec![
        "skiff",
        "run",
        "--bootstrap",
        bootstrap.to_str().unwrap(),
        "--capture",
        "none",
        "--no-ipv6",
        "--outbound-port",
        &outbound,
        "--node-id",
        "sidecar~127.0.0.1~tls-test.default~default.svc.cluster.local",
    ];
    argv.extend_from_slice(flags);
    let skiff::cli::Command::Run(args) = skiff::cli::Cli::try_parse_from(argv).unwrap().command
    else {
        unreachable!("parsed `skiff run`")
    };
    let (opts, _extras) = skiff::cli::run_options(args).expect("run options");
    InProcessSkiff::start(opts)
}

async fn stat(admin: u16, name: &str) -> u64 {
    let addr: SocketAddr = ([127, 0, 0, 1], admin).into();
    let body = skiff::admin::request(addr, hyper::Method::GET, "/stats")
        .await
        .unwrap_or_default();
    skiff_tests::stat_value(&body, name)
}

/// Waits until counter `name` reaches `at_least`.
async fn wait_stat(admin: u16, name: &str, at_least: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = stat(admin, name).await;
        if v >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed at {v}, wanted >= {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn eventually(listen: u16, want: &str) {
    let deadline = Instant::now() + WAIT;
    let mut last = None;
    while Instant::now() < deadline {
        last = tcp_ask(listen).await;
        if last.as_deref() == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("port {listen}: wanted {want:?}, last answer {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ads_over_tls_needs_the_bearer_token_and_reads_it_again_on_reconnect() {
    token_scenario(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_ads_over_tls_needs_the_bearer_token_too() {
    token_scenario(&["--xds-delta"]).await;
}

/// Refused with a stale token (counted, retried), served once the token file holds the
/// right one; `extra` flags choose the protocol.
async fn token_scenario(extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path());
    let config = tmp.path().join("config");
    std::fs::create_dir(&config).unwrap();
    let listen = free_port();
    write_config(&config, listen, named_backend("A").await);
    let server_token = write(tmp.path(), "server-token", "s3cret-token\n");
    let mut opts = ControlPlaneOptions::new(Source::Dir(config));
    opts.listen = "127.0.0.1:0".parse().unwrap();
    opts.poll_interval = Duration::from_millis(50);
    opts.tls = Some(ServerTls {
        cert: pki.cert.clone(),
        key: pki.key.clone(),
        client_ca: None,
    });
    opts.require_token = Some(server_token);
    let cp = control_plane(opts).await;

    // The workload's token is not the one the server wants (yet).
    let token = write(tmp.path(), "istio-token", "expired-token");
    let admin = free_port();
    let xds = cp.addr.to_string();
    let mut flags = vec![
        "--xds-address",
        &xds,
        "--xds-ca",
        pki.ca.to_str().unwrap(),
        "--xds-san",
        ISTIOD,
        "--xds-token",
        token.to_str().unwrap(),
    ];
    flags.extend_from_slice(extra);
    let skiff = start_skiff(tmp.path(), admin, &flags);
    // Refused: UNAUTHENTICATED is counted, retried, and no configuration arrives.
    wait_stat(admin, "skiff.xds.unauthenticated", 2).await;
    assert_eq!(tcp_ask(listen).await, None, "served without a valid token");
    assert_eq!(stat(admin, "skiff.xds.tls_failure").await, 0);

    // The token rotates: the next reconnect reads it and the snapshot arrives.
    write(tmp.path(), "istio-token", "s3cret-token");
    eventually(listen, "A").await;
    assert!(stat(admin, "cluster_manager.cds.update_success").await >= 1);
    assert_eq!(stat(admin, "control_plane.connected_state").await, 1);

    skiff.stop().await.unwrap();
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_outside_the_trusted_root_or_name_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path());
    let config = tmp.path().join("config");
    std::fs::create_dir(&config).unwrap();
    let listen = free_port();
    write_config(&config, listen, named_backend("A").await);
    let mut opts = ControlPlaneOptions::new(Source::Dir(config));
    opts.listen = "127.0.0.1:0".parse().unwrap();
    opts.tls = Some(ServerTls {
        cert: pki.cert.clone(),
        key: pki.key.clone(),
        client_ca: None,
    });
    let cp = control_plane(opts).await;

    // skiff trusting another root never gets configuration and counts TLS failures.
    let admin = free_port();
    let xds = cp.addr.to_string();
    let skiff = start_skiff(
        tmp.path(),
        admin,
        &[
            "--xds-address",
            &xds,
            "--xds-ca",
            pki.other_ca.to_str().unwrap(),
            "--xds-san",
            ISTIOD,
        ],
    );
    wait_stat(admin, "skiff.xds.tls_failure", 2).await;
    assert_eq!(
        tcp_ask(listen).await,
        None,
        "configured by an untrusted server"
    );
    skiff.stop().await.unwrap();

    // The error names the cause: an unknown issuer, or a name the certificate lacks.
    let tls = |ca: &Path, san: &str| skiff::cli::XdsArgs {
        xds_address: Some(xds.clone()),
        xds_ca: Some(ca.to_path_buf()),
        xds_san: Some(san.to_owned()),
        ..Default::default()
    };
    let server = GrpcTarget::Tcp(cp.addr);
    for (ca, san, want) in [
        (&pki.other_ca, ISTIOD, "UnknownIssuer"),
        (&pki.ca, "istiod.other-ns.svc", "NotValidForName"),
    ] {
        let upstream = upstream_tls(tls(ca, san));
        let err = channel::connect(&server, Some(&upstream))
            .await
            .expect_err("handshake must fail");
        assert!(err.is_tls_failure(), "{err}");
        assert!(err.to_string().contains(want), "{err}");
    }
    // The right root and name connect.
    let upstream = upstream_tls(tls(&pki.ca, ISTIOD));
    channel::connect(&server, Some(&upstream)).await.unwrap();
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_with_client_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path());
    let config = tmp.path().join("config");
    std::fs::create_dir(&config).unwrap();
    let listen = free_port();
    write_config(&config, listen, named_backend("B").await);
    let workloads = Ca::new("workload root");
    let workload = workloads.leaf(&[], &["spiffe://cluster.local/ns/default/sa/tls-test"]);
    let mut opts = ControlPlaneOptions::new(Source::Dir(config));
    opts.listen = "127.0.0.1:0".parse().unwrap();
    opts.tls = Some(ServerTls {
        cert: pki.cert.clone(),
        key: pki.key.clone(),
        client_ca: Some(write(tmp.path(), "workload-root.pem", &workloads.pem)),
    });
    let cp = control_plane(opts).await;
    let xds = cp.addr.to_string();
    let admin = free_port();
    let cert = write(tmp.path(), "workload.pem", &workload.cert);
    let key = write(tmp.path(), "workload-key.pem", &workload.key);
    let skiff = start_skiff(
        tmp.path(),
        admin,
        &[
            "--xds-address",
            &xds,
            "--xds-ca",
            pki.ca.to_str().unwrap(),
            "--xds-san",
            ISTIOD,
            "--xds-cert",
            cert.to_str().unwrap(),
            "--xds-key",
            key.to_str().unwrap(),
        ],
    );
    eventually(listen, "B").await;
    skiff.stop().await.unwrap();

    // Without a certificate the server ends the connection during or right after the
    // handshake: no stream is ever served.
    let admin = free_port();
    let skiff = start_skiff(
        tmp.path(),
        admin,
        &[
            "--xds-address",
            &xds,
            "--xds-ca",
            pki.ca.to_str().unwrap(),
            "--xds-san",
            ISTIOD,
        ],
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(stat(admin, "control_plane.connected_state").await, 0);
    assert_eq!(stat(admin, "cluster_manager.cds.update_success").await, 0);
    skiff.stop().await.unwrap();
    cp.stop().await;
}

/// The `UpstreamTls` `skiff run` builds from these flags.
fn upstream_tls(xds: skiff::cli::XdsArgs) -> skiff::model::tls::UpstreamTls {
    let bootstrap = skiff::config::parse("{}", "<test>").unwrap();
    let argv = ["skiff", "run", "--bootstrap", "unused.yaml"];
    let skiff::cli::Command::Run(mut args) = skiff::cli::Cli::try_parse_from(argv).unwrap().command
    else {
        unreachable!("parsed `skiff run`")
    };
    args.xds = xds;
    args.node.node_id = Some("test".into());
    let b = skiff::cli::run::control_plane_flags(&args, bootstrap, &Default::default()).unwrap();
    (*b.ads.unwrap().tls.unwrap()).clone()
}
