//! `cargo xtask bench --mtls`: Istio's mutual-TLS hop, skiff on both sides against Envoy on
//! both sides, in one run.
//!
//! In a namespace created here (loopback only): the client connects in plaintext to the
//! client-side proxy (`127.0.0.1`, as an app reaches its sidecar), which dials the server-side
//! proxy (`127.0.0.3`) over mTLS with its SPIFFE certificate and checks the server's SPIFFE
//! SAN; the server-side proxy requires the client's certificate, checks its SAN and forwards
//! in plaintext to the backends (`127.0.0.2`: the echo server and `iperf3 -s`). Both proxies
//! of a pair read Envoy configuration (the same files for skiff and Envoy): certificates by
//! file name, ECDSA P-256 leaves from one root generated here, TLS 1.3 only with X25519, and
//! no session resumption (`max_session_keys: 0` upstream, both `disable_*_session_resumption`
//! downstream), so every connection is a full mTLS handshake.
//!
//! Measured per pair: new connections per second through the pair (xtask's conn-rate client:
//! connect, 1-byte round trip, close; each one a handshake between the proxies), the CPU both
//! proxies spend per handshake (utime + stime from /proc over the case, divided by the
//! handshakes the server side's `listener.127.0.0.3_17443.ssl.handshake` counted, else by the
//! connections), and single-stream throughput (`iperf3 -P 1`) with the cores both proxies
//! use. The negotiated version, cipher, curve and signature algorithm are read back from the
//! server side's `ssl.*` counters where the proxy exports them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::{Value, json};

use super::configs::{BACKEND_IP, ECHO_PORT, IPERF_PORT, PROXY_ECHO_PORT, PROXY_IPERF_PORT};
use super::env::{Netns, Proc, check_interrupt, interrupted, run_bounded};
use super::{load, procstat};

/// Where the client-side proxy listens (plaintext from the client).
const CLIENT_IP: &str = "127.0.0.1";
/// Where the server-side proxy listens (mTLS from the client-side proxy).
const SERVER_IP: &str = "127.0.0.3";
/// The server side's mTLS port for the echo service.
const MTLS_ECHO_PORT: u16 = 17443;
/// The server side's mTLS port for iperf3.
const MTLS_IPERF_PORT: u16 = 15443;
/// Admin ports (both proxies of a pair run at once).
const CLIENT_ADMIN: u16 = 15000;
const SERVER_ADMIN: u16 = 15100;
/// skiff's capture listener is not used here; each skiff gets its own port for it.
const CLIENT_OUTBOUND: u16 = 15901;
const SERVER_OUTBOUND: u16 = 15902;
/// The SPIFFE identities of the two sides.
const CLIENT_ID: &str = "spiffe://cluster.local/ns/bench/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/bench/sa/server";

/// A proxy pair under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pair {
    /// skiff on both sides.
    Skiff,
    /// Envoy `--concurrency 1` on both sides.
    EnvoyC1,
    /// Envoy `--concurrency 2` on both sides.
    EnvoyC2,
}

impl Pair {
    const ALL: [Pair; 3] = [Pair::Skiff, Pair::EnvoyC1, Pair::EnvoyC2];

    /// Short name (CLI, tables, JSON).
    pub fn name(self) -> &'static str {
        match self {
            Pair::Skiff => "skiff",
            Pair::EnvoyC1 => "envoy-c1",
            Pair::EnvoyC2 => "envoy-c2",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Pair::Skiff => "skiff run --capture none on both sides (one runtime worker per core)",
            Pair::EnvoyC1 => "Envoy --concurrency 1 on both sides",
            Pair::EnvoyC2 => "Envoy --concurrency 2 on both sides",
        }
    }
}

/// The side of the hop a proxy plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }

    fn admin(self) -> SocketAddr {
        let port = match self {
            Side::Client => CLIENT_ADMIN,
            Side::Server => SERVER_ADMIN,
        };
        SocketAddr::from(([127, 0, 0, 1], port))
    }
}

/// What one pair measured.
#[derive(Debug, Clone, Serialize, Default)]
pub struct PairResult {
    /// `skiff`, `envoy-c1`, `envoy-c2`.
    pub pair: String,
    /// One line on how the pair runs.
    pub description: String,
    /// Why the pair (or a case of it) could not be measured.
    pub error: Option<String>,
    /// Connections through the pair per second (each a full mTLS handshake between the
    /// proxies).
    pub conn_per_s: Option<f64>,
    /// Connections completed in the conn-rate case.
    pub connections: Option<u64>,
    /// Failed connection attempts in the conn-rate case.
    pub conn_errors: Option<u64>,
    /// Handshakes the server side counted (`listener.127.0.0.3_17443.ssl.handshake`) during the case;
    /// `None` when the proxy does not export the counter.
    pub server_handshakes: Option<u64>,
    /// Handshakes the client side counted (`cluster.<name>.ssl.handshake`).
    pub client_handshakes: Option<u64>,
    /// Resumed sessions either side counted (`ssl.session_reused`); 0 expected.
    pub session_reused: Option<u64>,
    /// Client-side proxy CPU per handshake, microseconds.
    pub client_cpu_us_per_handshake: Option<f64>,
    /// Server-side proxy CPU per handshake, microseconds.
    pub server_cpu_us_per_handshake: Option<f64>,
    /// Both proxies' CPU per handshake, microseconds.
    pub cpu_us_per_handshake: Option<f64>,
    /// Single-stream throughput through the pair, Gbit/s at the receiver.
    pub tput_gbps: Option<f64>,
    /// Cores the client-side proxy used during the throughput case.
    pub tput_client_cores: Option<f64>,
    /// Cores the server-side proxy used during the throughput case.
    pub tput_server_cores: Option<f64>,
    /// The negotiated parameters the server side counted (`ssl.versions.*`, `ssl.ciphers.*`,
    /// `ssl.curves.*`, `ssl.sigalgs.*` with a non-zero count).
    pub negotiated: Vec<String>,
    /// RSS of both proxies once ready, KiB.
    pub idle_rss_kb: Option<u64>,
    /// RSS of both proxies after the cases, KiB.
    pub rss_after_kb: Option<u64>,
}

/// Everything one `--mtls` run measured.
#[derive(Debug, Clone, Serialize, Default)]
pub struct MtlsReport {
    pub started_unix: u64,
    pub kernel: String,
    pub cores: usize,
    pub cpu_model: String,
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub secs_per_case: f64,
    pub conn_threads: usize,
    pub skiff_rev: String,
    pub skiff_bin: String,
    pub versions: Vec<(String, String)>,
    pub pairs: Vec<PairResult>,
}

/// The certificate files of a run.
struct Certs {
    ca: PathBuf,
    client: (PathBuf, PathBuf),
    server: (PathBuf, PathBuf),
}

fn write_certs(dir: &Path) -> anyhow::Result<Certs> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
    };
    std::fs::create_dir_all(dir)?;
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, "skiff bench mesh root");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let ca = CertifiedIssuer::self_signed(p, KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?)?;
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem())?;
    let leaf = |stem: &str, uri: &str| -> anyhow::Result<(PathBuf, PathBuf)> {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(DnType::OrganizationName, "skiff bench");
        p.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2099, 1, 1);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = p.signed_by(&key, &ca)?;
        let (c, k) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}-key.pem")),
        );
        std::fs::write(&c, cert.pem())?;
        std::fs::write(&k, key.serialize_pem())?;
        Ok((c, k))
    };
    Ok(Certs {
        client: leaf("client", CLIENT_ID)?,
        server: leaf("server", SERVER_ID)?,
        ca: ca_file,
    })
}

// === configuration (Envoy v3 bootstrap, JSON text: valid YAML for both proxies) ===

fn common_tls(cert: &(PathBuf, PathBuf), ca: &Path, peer: &str) -> Value {
    json!({
        "tls_certificates": [{
            "certificate_chain": { "filename": cert.0 },
            "private_key": { "filename": cert.1 },
        }],
        "validation_context": {
            "trusted_ca": { "filename": ca },
            "match_typed_subject_alt_names": [{ "san_type": "URI", "matcher": { "exact": peer } }],
        },
        // TLS 1.3 only, X25519: BoringSSL gives no TLS 1.3 cipher choice (`cipher_suites`
        // is for 1.2), so the suite each pair negotiated is read back from its counters.
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
            "ecdh_curves": ["X25519"],
        },
    })
}

fn tcp_proxy(prefix: &str, cluster: &str) -> Value {
    json!([{
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": prefix,
            "cluster": cluster,
        }
    }])
}

fn static_cluster(name: &str, ip: &str, port: u16, transport_socket: Option<Value>) -> Value {
    let mut c = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                "socket_address": { "address": ip, "port_value": port }
            } } }] }]
        }
    });
    if let Some(ts) = transport_socket {
        c["transport_socket"] = ts;
    }
    c
}

fn bootstrap(side: Side, listeners: Vec<Value>, clusters: Vec<Value>) -> String {
    let admin = side.admin();
    let b = json!({
        "node": { "id": format!("bench-mtls-{}", side.name()), "cluster": "bench" },
        "admin": { "address": { "socket_address": {
            "address": admin.ip().to_string(), "port_value": admin.port()
        } } },
        "static_resources": { "listeners": listeners, "clusters": clusters },
    });
    serde_json::to_string_pretty(&b).unwrap_or_default()
}

/// The client side: plaintext listeners, clusters that dial the server side over mTLS.
fn client_config(certs: &Certs) -> String {
    let services = [
        ("echo", PROXY_ECHO_PORT, MTLS_ECHO_PORT),
        ("iperf", PROXY_IPERF_PORT, MTLS_IPERF_PORT),
    ];
    let listeners = services
        .iter()
        .map(|(name, port, _)| {
            json!({
                "name": name,
                "address": { "socket_address": { "address": CLIENT_IP, "port_value": port } },
                "filter_chains": [{ "filters": tcp_proxy(name, &format!("{name}-mtls")) }],
            })
        })
        .collect();
    let clusters = services
        .iter()
        .map(|(name, _, mtls_port)| {
            let tls = json!({
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "common_tls_context": common_tls(&certs.client, &certs.ca, SERVER_ID),
                    // No resumption: every connection is a full handshake.
                    "max_session_keys": 0,
                }
            });
            static_cluster(&format!("{name}-mtls"), SERVER_IP, *mtls_port, Some(tls))
        })
        .collect();
    bootstrap(Side::Client, listeners, clusters)
}

/// The server side: mTLS listeners requiring the client's SAN, plaintext to the backends.
fn server_config(certs: &Certs) -> String {
    let services = [
        ("echo", MTLS_ECHO_PORT, ECHO_PORT),
        ("iperf", MTLS_IPERF_PORT, IPERF_PORT),
    ];
    let listeners = services
        .iter()
        .map(|(name, mtls_port, _)| {
            json!({
                "name": format!("{name}-mtls"),
                "address": { "socket_address": { "address": SERVER_IP, "port_value": mtls_port } },
                "filter_chains": [{
                    "transport_socket": {
                        "name": "envoy.transport_sockets.tls",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                            "common_tls_context": common_tls(&certs.server, &certs.ca, CLIENT_ID),
                            "require_client_certificate": true,
                            "disable_stateless_session_resumption": true,
                            "disable_stateful_session_resumption": true,
                        }
                    },
                    "filters": tcp_proxy(name, name),
                }],
            })
        })
        .collect();
    let clusters = services
        .iter()
        .map(|(name, _, port)| static_cluster(name, BACKEND_IP, *port, None))
        .collect();
    bootstrap(Side::Server, listeners, clusters)
}

/// `listener.<address>.ssl.` of the server side's echo listener (Envoy's name for a listener
/// without `stat_prefix`, which skiff uses too).
fn server_ssl_prefix() -> String {
    format!("listener.{SERVER_IP}_{MTLS_ECHO_PORT}.ssl.")
}

// === admin ===

/// `/stats` of the admin at `addr` inside the namespace (chunked bodies decoded).
fn stats(ns: &Netns, addr: SocketAddr) -> Option<String> {
    ns.on_thread(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let req = format!("GET /stats HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let (head, body) = out.split_once("\r\n\r\n")?;
        if !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            return Some(body.to_string());
        }
        let mut rest = body;
        let mut decoded = String::new();
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            if n == 0 || tail.len() < n {
                break;
            }
            decoded.push_str(&tail[..n]);
            rest = tail[n..].strip_prefix("\r\n").unwrap_or(&tail[n..]);
        }
        Some(decoded)
    })
    .ok()
    .flatten()
}

/// The value of counter `name` in a `/stats` body; `None` when absent.
fn stat(body: &str, name: &str) -> Option<u64> {
    body.lines().find_map(|l| {
        l.trim()
            .strip_prefix(name)?
            .strip_prefix(": ")?
            .trim()
            .parse()
            .ok()
    })
}

/// Sum of every counter whose name ends with `suffix` (both sides' `ssl.session_reused`).
fn stat_sum_suffix(body: &str, suffix: &str) -> Option<u64> {
    let mut found = None;
    for l in body.lines() {
        if let Some((name, v)) = l.trim().split_once(": ")
            && name.ends_with(suffix)
            && let Ok(v) = v.trim().parse::<u64>()
        {
            *found.get_or_insert(0) += v;
        }
    }
    found
}

fn delta(after: &Option<String>, before: &Option<String>, name: &str) -> Option<u64> {
    let a = stat(after.as_deref()?, name)?;
    let b = before.as_deref().and_then(|b| stat(b, name)).unwrap_or(0);
    Some(a.saturating_sub(b))
}

/// `versions.TLSv1.3`, `ciphers.TLS_AES_128_GCM_SHA256`, ... counted by the server side.
fn negotiated(body: &str) -> Vec<String> {
    let prefix = server_ssl_prefix();
    let mut out: Vec<String> = body
        .lines()
        .filter_map(|l| {
            let (name, v) = l.trim().split_once(": ")?;
            let rest = name.strip_prefix(&prefix)?;
            let kind = rest.split('.').next()?;
            let nonzero = v.trim().parse::<u64>().ok()? > 0;
            (nonzero && ["versions", "ciphers", "curves", "sigalgs"].contains(&kind))
                .then(|| rest.to_string())
        })
        .collect();
    out.sort();
    out
}

// === the run ===

struct Ctx<'a> {
    ns: &'a Netns,
    me: &'a Path,
    skiff: &'a Path,
    envoy: Option<&'a Path>,
    iperf3: &'a Path,
    out: &'a Path,
    certs: &'a Certs,
    secs: f64,
    conn_threads: usize,
}

/// Options of `cargo xtask bench --mtls`.
pub struct Options {
    /// The skiff binary.
    pub skiff: PathBuf,
    /// The real Envoy binary (`None`: the Envoy pairs report why).
    pub envoy: Option<PathBuf>,
    /// Seconds per case.
    pub secs: f64,
    /// Client threads of the conn-rate case.
    pub conn_threads: usize,
    /// Only these pairs (`skiff`, `envoy-c1`, `envoy-c2`); empty: all.
    pub pairs: Vec<String>,
}

/// Run the mTLS cases; results go to `target/bench/<time>-mtls/`.
pub fn standalone(opts: Options) -> anyhow::Result<()> {
    let pairs = super::parse_list("pair", &opts.pairs, &Pair::ALL, Pair::name)?;
    let iperf3 = super::tools::require("iperf3")?;
    let root = crate::util::workspace_root();
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let out = root.join("target/bench").join(format!("{started}-mtls"));
    for d in ["logs", "configs"] {
        std::fs::create_dir_all(out.join(d))?;
    }
    let certs = write_certs(&out.join("certs")).context("generating the certificates")?;
    let mut rep = MtlsReport {
        started_unix: started,
        kernel: super::first_line(Command::new("uname").args(["-srm"])),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model: super::cpu_model(),
        loadavg_start: super::loadavg(),
        secs_per_case: opts.secs,
        conn_threads: opts.conn_threads,
        skiff_rev: super::skiff_rev(&root),
        skiff_bin: opts.skiff.display().to_string(),
        ..Default::default()
    };
    rep.versions.push((
        "iperf3".into(),
        super::first_line(Command::new(&iperf3).arg("--version")),
    ));
    if let Some(e) = &opts.envoy {
        rep.versions.push((
            "envoy".into(),
            super::first_line(Command::new(e).arg("--version")),
        ));
    }
    let ns = Netns::create(
        &format!("skiff-bench-mtls-{}", std::process::id()),
        super::VIP,
    )
    .context("creating the bench namespace")?;
    let me = std::env::current_exe().context("locating the xtask binary")?;
    let ctx = Ctx {
        ns: &ns,
        me: &me,
        skiff: &opts.skiff,
        envoy: opts.envoy.as_deref(),
        iperf3: &iperf3,
        out: &out,
        certs: &certs,
        secs: opts.secs,
        conn_threads: opts.conn_threads,
    };
    eprintln!(
        "bench: mtls, netns {}, pairs {}, {}s per case, output {}",
        ns.0,
        pairs.iter().map(|p| p.name()).collect::<Vec<_>>().join(","),
        opts.secs,
        out.display()
    );
    let result = run_pairs(&ctx, &pairs, &mut rep);
    rep.loadavg_end = super::loadavg();
    drop(ns);
    let md = table(&rep);
    std::fs::write(out.join("mtls.md"), &md)?;
    std::fs::write(out.join("mtls.json"), serde_json::to_string_pretty(&rep)?)?;
    result?;
    println!("{md}");
    eprintln!("bench: results in {}", out.display());
    Ok(())
}

fn run_pairs(ctx: &Ctx, pairs: &[Pair], rep: &mut MtlsReport) -> anyhow::Result<()> {
    let echo_addr = SocketAddr::from(([127, 0, 0, 2], ECHO_PORT));
    let _echo = Proc::spawn(
        "echo backend",
        ctx.ns
            .cmd(ctx.me)
            .args(["bench", "--helper", "echo", &echo_addr.to_string()]),
        &ctx.out.join("logs/echo.log"),
    )?;
    ctx.ns.wait_port(echo_addr, Duration::from_secs(10))?;
    for &pair in pairs {
        check_interrupt()?;
        eprintln!("bench: == mtls {} ({})", pair.name(), pair.describe());
        let mut r = PairResult {
            pair: pair.name().into(),
            description: pair.describe().into(),
            ..Default::default()
        };
        if let Err(e) = measure_pair(ctx, pair, &mut r) {
            eprintln!("bench: mtls {}: {e:#}", pair.name());
            r.error = Some(format!("{e:#}"));
        }
        rep.pairs.push(r);
        if interrupted() {
            break;
        }
        // Let the listener and admin ports go before the next pair binds them.
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

/// A started proxy of a pair and its log.
struct Started {
    proc: Proc,
    log: PathBuf,
}

fn start_proxy(ctx: &Ctx, pair: Pair, side: Side) -> anyhow::Result<Started> {
    let name = format!("{}-{}", pair.name(), side.name());
    let cfg = ctx.out.join("configs").join(format!("{name}.yaml"));
    let text = match side {
        Side::Client => client_config(ctx.certs),
        Side::Server => server_config(ctx.certs),
    };
    std::fs::write(&cfg, text)?;
    let log = ctx.out.join("logs").join(format!("{name}.log"));
    let mut cmd = match pair {
        Pair::Skiff => {
            let mut c = ctx.ns.cmd(ctx.skiff);
            let outbound = match side {
                Side::Client => CLIENT_OUTBOUND,
                Side::Server => SERVER_OUTBOUND,
            };
            c.env("RUST_LOG", "warn")
                .arg("run")
                .arg("--bootstrap")
                .arg(&cfg)
                .args(["--capture", "none", "--no-ipv6", "--drain-time", "1s"])
                .arg("--outbound-port")
                .arg(outbound.to_string());
            c
        }
        Pair::EnvoyC1 | Pair::EnvoyC2 => {
            let bin = ctx
                .envoy
                .context("envoy is not installed: run `cargo xtask setup --bench`")?;
            let conc = if pair == Pair::EnvoyC1 { "1" } else { "2" };
            let mut c = ctx.ns.cmd(bin);
            c.arg("-c").arg(&cfg).args([
                "--concurrency",
                conc,
                "-l",
                "warn",
                "--disable-hot-restart",
            ]);
            c
        }
    };
    let mut proc = Proc::spawn(&name, &mut cmd, &log)?;
    let listen: SocketAddr = match side {
        Side::Client => format!("{CLIENT_IP}:{PROXY_ECHO_PORT}"),
        Side::Server => format!("{SERVER_IP}:{MTLS_ECHO_PORT}"),
    }
    .parse()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        check_interrupt()?;
        proc.check_alive(&log)?;
        let ready = ctx
            .ns
            .wait_http_200(side.admin(), "/ready", Duration::from_millis(500))
            .and_then(|()| ctx.ns.wait_port(listen, Duration::from_millis(500)));
        match ready {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{name} not ready (log: {})", log.display())));
            }
            Err(_) => {}
        }
    }
    Ok(Started { proc, log })
}

/// One byte echoed through the whole hop, retried for up to 10 s.
fn smoke(ctx: &Ctx) -> anyhow::Result<()> {
    let addr: SocketAddr = format!("{CLIENT_IP}:{PROXY_ECHO_PORT}").parse()?;
    let ok = ctx.ns.on_thread(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = String::new();
        while Instant::now() < deadline && !interrupted() {
            let r = (|| -> std::io::Result<()> {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.write_all(b"x")?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b)?;
                Ok(())
            })();
            match r {
                Ok(()) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(last)
    })?;
    ok.map_err(|e| anyhow::anyhow!("no echo through the pair within 10 s (last error: {e})"))
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(10).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

fn measure_pair(ctx: &Ctx, pair: Pair, r: &mut PairResult) -> anyhow::Result<()> {
    let mut server = start_proxy(ctx, pair, Side::Server)?;
    let mut client = start_proxy(ctx, pair, Side::Client)?;
    if let Err(e) = smoke(ctx) {
        bail!(
            "{e:#}\nclient side log:\n{}\nserver side log:\n{}",
            tail(&client.log),
            tail(&server.log)
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let (cpid, spid) = (client.proc.pid(), server.proc.pid());
    r.idle_rss_kb = Some(procstat::usage(cpid).rss_kb + procstat::usage(spid).rss_kb);

    // Connection rate: every connection is a handshake between the two proxies.
    check_interrupt()?;
    eprint!(
        "bench: mtls {:<9} conn-rate ({}s) ... ",
        pair.name(),
        ctx.secs
    );
    let (s0, c0) = (
        stats(ctx.ns, Side::Server.admin()),
        stats(ctx.ns, Side::Client.admin()),
    );
    let (cu0, su0) = (procstat::usage(cpid), procstat::usage(spid));
    let limit = Duration::from_secs_f64(ctx.secs + 20.0);
    let mut cmd = ctx.ns.cmd(ctx.me);
    cmd.args([
        "bench",
        "--helper",
        "connrate",
        &format!("{CLIENT_IP}:{PROXY_ECHO_PORT}"),
        &ctx.secs.to_string(),
        "1000000",
    ])
    .arg(ctx.conn_threads.to_string());
    let conn = run_bounded(&mut cmd, "connection-rate client", limit).and_then(|out| {
        serde_json::from_str::<load::ConnRate>(out.trim()).context("connrate output")
    });
    let (cu1, su1) = (procstat::usage(cpid), procstat::usage(spid));
    let (s1, c1) = (
        stats(ctx.ns, Side::Server.admin()),
        stats(ctx.ns, Side::Client.admin()),
    );
    client.proc.check_alive(&client.log)?;
    server.proc.check_alive(&server.log)?;
    match conn {
        Ok(cc) => {
            r.conn_per_s = Some(cc.count as f64 / cc.secs.max(1e-9));
            r.connections = Some(cc.count);
            r.conn_errors = Some(cc.errors);
            r.server_handshakes = delta(&s1, &s0, &format!("{}handshake", server_ssl_prefix()));
            r.client_handshakes = delta(&c1, &c0, "cluster.echo-mtls.ssl.handshake");
            let reused = |a: &Option<String>, b: &Option<String>| {
                let a = stat_sum_suffix(a.as_deref()?, "ssl.session_reused")?;
                let b = b
                    .as_deref()
                    .and_then(|b| stat_sum_suffix(b, "ssl.session_reused"))
                    .unwrap_or(0);
                Some(a.saturating_sub(b))
            };
            r.session_reused = match (reused(&s1, &s0), reused(&c1, &c0)) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
            };
            let handshakes = r.server_handshakes.filter(|&h| h > 0).unwrap_or(cc.count) as f64;
            if handshakes > 0.0 {
                let per = |cpu: f64| cpu / handshakes * 1e6;
                let (c, s) = (cu1.cpu_s - cu0.cpu_s, su1.cpu_s - su0.cpu_s);
                r.client_cpu_us_per_handshake = Some(per(c));
                r.server_cpu_us_per_handshake = Some(per(s));
                r.cpu_us_per_handshake = Some(per(c + s));
            }
            eprintln!(
                "{:.0} conn/s, {:.0} us CPU per handshake",
                r.conn_per_s.unwrap_or(0.0),
                r.cpu_us_per_handshake.unwrap_or(0.0)
            );
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            r.error = Some(format!("conn-rate: {e:#}"));
        }
    }
    if let Some(body) = &s1 {
        r.negotiated = negotiated(body);
    }

    // Single-stream throughput through the pair.
    check_interrupt()?;
    eprint!("bench: mtls {:<9} tput-1 ({}s) ... ", pair.name(), ctx.secs);
    let _iperf = Proc::spawn(
        "iperf3 server",
        ctx.ns
            .cmd(ctx.iperf3)
            .args(["-s", "-B", BACKEND_IP, "-p", &IPERF_PORT.to_string()]),
        &ctx.out
            .join(format!("logs/iperf3-server-{}.log", pair.name())),
    )?;
    ctx.ns.wait_port(
        format!("{BACKEND_IP}:{IPERF_PORT}").parse()?,
        Duration::from_secs(10),
    )?;
    let (cu0, su0, t0) = (procstat::usage(cpid), procstat::usage(spid), Instant::now());
    let mut cmd = ctx.ns.cmd(ctx.iperf3);
    cmd.args(["-c", CLIENT_IP, "-p", &PROXY_IPERF_PORT.to_string()])
        .args([
            "-J",
            "-t",
            &ctx.secs.to_string(),
            "-P",
            "1",
            "--connect-timeout",
            "3000",
        ]);
    if ctx.secs >= 5.0 {
        cmd.args(["-O", "1"]);
    }
    let tput = run_bounded(&mut cmd, "iperf3 client", limit).and_then(|out| {
        let v: Value = serde_json::from_str(&out).context("iperf3 -J output is not JSON")?;
        if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
            bail!("iperf3: {err}");
        }
        v.pointer("/end/sum_received/bits_per_second")
            .and_then(|x| x.as_f64())
            .context("iperf3 JSON has no end.sum_received.bits_per_second")
    });
    let wall = t0.elapsed().as_secs_f64().max(1e-9);
    let (cu1, su1) = (procstat::usage(cpid), procstat::usage(spid));
    match tput {
        Ok(bps) => {
            r.tput_gbps = Some(bps / 1e9);
            r.tput_client_cores = Some((cu1.cpu_s - cu0.cpu_s) / wall);
            r.tput_server_cores = Some((su1.cpu_s - su0.cpu_s) / wall);
            eprintln!("{:.2} Gbit/s", bps / 1e9);
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            let prev = r.error.take().map(|p| format!("{p}; ")).unwrap_or_default();
            r.error = Some(format!("{prev}tput-1: {e:#}"));
        }
    }
    client.proc.check_alive(&client.log)?;
    server.proc.check_alive(&server.log)?;
    r.rss_after_kb = Some(procstat::usage(cpid).rss_kb + procstat::usage(spid).rss_kb);
    Ok(())
}

fn f(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.prec$}"))
}

fn n(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// The Markdown report.
pub fn table(rep: &MtlsReport) -> String {
    let mut md = String::new();
    md.push_str(&format!(
        "## mTLS: client -> proxy -> mTLS -> proxy -> backend\n\n\
         - machine: {} cores ({}), kernel {}\n\
         - load average at start `{}`, at end `{}`\n\
         - {} s per case; conn-rate with {} client threads; skiff {} (`{}`)\n",
        rep.cores,
        rep.cpu_model,
        rep.kernel,
        rep.loadavg_start,
        rep.loadavg_end,
        rep.secs_per_case,
        rep.conn_threads,
        rep.skiff_rev,
        rep.skiff_bin
    ));
    for (k, v) in &rep.versions {
        md.push_str(&format!("- {k}: `{v}`\n"));
    }
    let envoy_rate = rep
        .pairs
        .iter()
        .find(|p| p.pair == "envoy-c2")
        .and_then(|p| p.conn_per_s);
    let envoy_tput = rep
        .pairs
        .iter()
        .find(|p| p.pair == "envoy-c2")
        .and_then(|p| p.tput_gbps);
    md.push_str(
        "\n| pair | conn/s (one mTLS handshake each) | x envoy-c2 | handshakes (server counter) | resumed | proxy CPU us/handshake (client + server) | client | server | tput-1 Gbit/s | x envoy-c2 | cores during tput-1 (client + server) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for p in &rep.pairs {
        let cores = p
            .tput_client_cores
            .zip(p.tput_server_cores)
            .map(|(c, s)| format!("{:.2} ({c:.2} + {s:.2})", c + s))
            .unwrap_or_else(|| "-".into());
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            p.pair,
            f(p.conn_per_s, 0),
            f(p.conn_per_s.zip(envoy_rate).map(|(a, b)| a / b), 2),
            n(p.server_handshakes),
            n(p.session_reused),
            f(p.cpu_us_per_handshake, 1),
            f(p.client_cpu_us_per_handshake, 1),
            f(p.server_cpu_us_per_handshake, 1),
            f(p.tput_gbps, 2),
            f(p.tput_gbps.zip(envoy_tput).map(|(a, b)| a / b), 2),
            cores,
        ));
    }
    md.push_str("\n| pair | negotiated (server side's ssl.* counters) | idle RSS, both (MB) | RSS after, both (MB) | error |\n|---|---|---:|---:|---|\n");
    for p in &rep.pairs {
        let neg = if p.negotiated.is_empty() {
            "not exported".to_string()
        } else {
            p.negotiated.join(", ")
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            p.pair,
            neg,
            f(p.idle_rss_kb.map(|k| k as f64 / 1024.0), 1),
            f(p.rss_after_kb.map(|k| k as f64 / 1024.0), 1),
            p.error
                .as_deref()
                .map(|e| {
                    let one: String = e.split_whitespace().collect::<Vec<_>>().join(" ");
                    one.chars().take(400).collect::<String>().replace('|', "/")
                })
                .unwrap_or_default(),
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_pin_tls13_and_check_the_peer_san() {
        let dir = std::env::temp_dir().join(format!("xtask-mtls-{}", std::process::id()));
        let certs = write_certs(&dir).unwrap();
        let c: Value = serde_json::from_str(&client_config(&certs)).unwrap();
        let s: Value = serde_json::from_str(&server_config(&certs)).unwrap();
        let up = &c["static_resources"]["clusters"][0]["transport_socket"]["typed_config"];
        assert_eq!(up["max_session_keys"], 0);
        assert_eq!(
            up["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"][0]["matcher"]
                ["exact"],
            SERVER_ID
        );
        let down = &s["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]["typed_config"];
        assert_eq!(down["require_client_certificate"], true);
        assert_eq!(
            down["common_tls_context"]["tls_params"]["tls_minimum_protocol_version"],
            "TLSv1_3"
        );
        assert!(
            std::fs::read_to_string(&certs.client.0)
                .unwrap()
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn negotiated_parameters_are_read_from_the_server_listener() {
        let p = server_ssl_prefix();
        let body = format!(
            "{p}ciphers.TLS_AES_128_GCM_SHA256: 10\n{p}curves.X25519: 10\n{p}versions.TLSv1.3: 10\n{p}curves.P-256: 0\n{p}handshake: 10\ncluster.echo-mtls.ssl.session_reused: 2\n{p}session_reused: 1\n"
        );
        assert_eq!(
            negotiated(&body),
            [
                "ciphers.TLS_AES_128_GCM_SHA256",
                "curves.X25519",
                "versions.TLSv1.3"
            ]
        );
        assert_eq!(stat_sum_suffix(&body, "ssl.session_reused"), Some(3));
        assert_eq!(
            delta(&Some(body.clone()), &None, &format!("{p}handshake")),
            Some(10)
        );
    }
}
