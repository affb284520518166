//! Istio's standard metrics between two in-process skiffs standing for two Istio sidecars: a
//! client (`productpage-v1` in `shop`, outbound listeners with Istio's `istio.stats` filters)
//! originates mTLS with a SPIFFE certificate to a server (`reviews-v1` in `default`, an
//! INBOUND listener with TLS chains for TCP and HTTP and a plaintext chain, each with
//! `istio.stats`). Both scrapes parse with a Prometheus text-format parser; the `istio_*`
//! families carry Istio's names, types and label values: reporter, the local workload from
//! the node's Istio metadata, the peer's principal and namespace from its certificate, the
//! destination service from the cluster's `istio.services` metadata or its Istio name,
//! `mutual_tls` only where the server
//! terminated mTLS. The server's `/stats/prometheus` is also scraped through a bootstrap
//! listener routed to the admin, as Istio's 15090 `prometheus_stats` listener does.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use openmetrics_parser::PrometheusValue;
use skiff_tests::{InProcessSkiff, echo_backend, free_port, run_options, serve_http1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use skiff_tests::tls::{Ca, write_pem as write};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/productpage";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/reviews";
const TCP_CLUSTER: &str = "outbound|9000||reviews.default.svc.cluster.local";
/// Not an Istio cluster name: its service comes from its `istio.services` metadata.
const HTTP_CLUSTER: &str = "reviews-http";
const ISTIO_SERVICES: &str = r#"
    metadata: { filter_metadata: { istio: { services: [{ host: reviews.default.svc.cluster.local, name: reviews, namespace: default }] } } }"#;

/// Istio's stats filter as istiod writes it (a TypedStruct around `stats.PluginConfig`).
const ISTIO_STATS_NET: &str = r#"
      - name: istio.stats
        typed_config:
          "@type": type.googleapis.com/udpa.type.v1.TypedStruct
          type_url: type.googleapis.com/stats.PluginConfig
          value: {}"#;

const ISTIO_STATS_HTTP: &str = r#"
          - name: istio.stats
            typed_config:
              "@type": type.googleapis.com/udpa.type.v1.TypedStruct
              type_url: type.googleapis.com/stats.PluginConfig
              value: {}"#;

/// The node as pilot-agent describes a pod to istiod.
fn node(id: &str, workload: &str, ns: &str, app: &str) -> String {
    format!(
        r#"node:
  id: {id}
  cluster: {app}.{ns}
  metadata:
    WORKLOAD_NAME: {workload}
    NAMESPACE: {ns}
    CLUSTER_ID: Kubernetes
    LABELS: {{ app: {app}, version: v1 }}"#
    )
}

fn secrets(cert: &Path, key: &Path, root: &Path) -> String {
    format!(
        r#"
  secrets:
  - name: default
    tls_certificate:
      certificate_chain: {{ filename: "{}" }}
      private_key: {{ filename: "{}" }}
  - name: ROOTCA
    validation_context:
      trusted_ca: {{ filename: "{}" }}"#,
        cert.display(),
        key.display(),
        root.display()
    )
}

fn common(san: &str, alpn: &[&str], indent: &str) -> String {
    format!(
        r#"
common_tls_context:
  alpn_protocols: [{}]
  tls_certificate_sds_secret_configs: [{{ name: default }}]
  combined_validation_context:
    default_validation_context:
      match_typed_subject_alt_names: [{{ san_type: URI, matcher: {san} }}]
    validation_context_sds_secret_config: {{ name: ROOTCA }}"#,
        alpn.iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    )
    .replace('\n', &format!("\n{indent}"))
}

fn downstream(alpn: &[&str]) -> String {
    format!(
        r#"
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true{}"#,
        common(
            r#"{ prefix: "spiffe://cluster.local/" }"#,
            alpn,
            "          "
        )
    )
}

fn tcp_proxy(cluster: &str) -> String {
    format!(
        r#"
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: "{cluster}"
          cluster: "{cluster}""#
    )
}

fn hcm(prefix: &str, cluster: &str, path: &str, istio: bool) -> String {
    format!(
        r#"
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {prefix}
          http_filters:{}
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{ match: {{ prefix: "{path}" }}, route: {{ cluster: "{cluster}" }} }}]"#,
        if istio { ISTIO_STATS_HTTP } else { "" }
    )
}

/// A STATIC cluster to `addr`; `mtls`: Istio's outbound mTLS to `SERVER_ID`; `workload`: the
/// endpoint's Istio metadata (`<workload>;<ns>;<canonical service>;<revision>;<cluster>`).
fn cluster(name: &str, addr: SocketAddr, mtls: Option<&[&str]>, workload: Option<&str>) -> String {
    let metadata = workload.map_or(String::new(), |w| {
        format!(r#", metadata: {{ filter_metadata: {{ istio: {{ workload: "{w}" }} }} }}"#)
    });
    let tls = match mtls {
        None => String::new(),
        Some(alpn) => format!(
            r#"
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: outbound_.9080_._.reviews.default.svc.cluster.local{}"#,
            common(&format!("{{ exact: \"{SERVER_ID}\" }}"), alpn, "        ")
        ),
    };
    format!(
        r#"
  - name: "{name}"
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: "{name}"
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }}{metadata} }}] }}]{tls}"#,
        addr.ip(),
        addr.port()
    )
}

fn admin(port: u16) -> String {
    format!(
        "admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}"
    )
}

/// `ping` through 127.0.0.1:`port`, half-closed: what came back.
async fn ping(port: u16) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    out
}

/// `GET path` through 127.0.0.1:`port`: (status, body).
async fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: reviews:9080\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

async fn wait_listening(ports: &[u16]) {
    for &p in ports {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", p)).await.is_err() {
            assert!(Instant::now() < deadline, "port {p} never listened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn scrape(admin: u16) -> String {
    let addr = SocketAddr::from(([127, 0, 0, 1], admin));
    skiff::admin::request(addr, hyper::Method::GET, "/stats/prometheus")
        .await
        .unwrap()
}

type Labels = BTreeMap<String, String>;

/// Each family of a scrape: its type and every sample's labels and value.
type Families = BTreeMap<String, (String, Vec<(Labels, PrometheusValue)>)>;

fn parse(text: &str) -> Families {
    let exposition = openmetrics_parser::prometheus::parse_prometheus(text)
        .unwrap_or_else(|e| panic!("the scrape does not parse: {e:?}\n{text}"));
    exposition
        .families
        .into_iter()
        .map(|(name, f)| {
            let samples = f
                .iter_samples()
                .map(|s| {
                    let labels = s
                        .get_labelset()
                        .expect("a parsed sample has its family's label names")
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    (labels, s.value.clone())
                })
                .collect();
            (name, (f.family_type.to_string(), samples))
        })
        .collect()
}

/// The samples of `family` whose labels include every pair of `want`: (labels, value).
fn find<'a>(
    f: &'a Families,
    family: &str,
    want: &[(&str, &str)],
) -> Vec<(&'a Labels, &'a PrometheusValue)> {
    let Some((_, samples)) = f.get(family) else {
        return Vec::new();
    };
    samples
        .iter()
        .filter(|(l, _)| {
            want.iter()
                .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(l, v)| (l, v))
        .collect()
}

fn counter(v: &PrometheusValue) -> f64 {
    match v {
        PrometheusValue::Counter(c) => c.value.as_f64(),
        other => panic!("expected a counter, got {other:?}"),
    }
}

/// The one sample of counter `family` with `want`'s labels; its labels and value.
fn one(f: &Families, family: &str, want: &[(&str, &str)]) -> (Labels, f64) {
    let got = find(f, family, want);
    assert_eq!(
        got.len(),
        1,
        "{family} with {want:?}: {got:?}\nfamilies: {:?}",
        f.keys()
    );
    (got[0].0.clone(), counter(got[0].1))
}

/// Waits until the scrape of `admin` has `family` with `want`'s labels at `value`.
async fn wait_counter(admin: u16, family: &str, want: &[(&str, &str)], value: f64) -> Families {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let f = parse(&scrape(admin).await);
        let got: Vec<f64> = find(&f, family, want)
            .iter()
            .map(|(_, v)| counter(v))
            .collect();
        if got == [value] {
            return f;
        }
        assert!(
            Instant::now() < deadline,
            "{family} {want:?} never reached {value}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_labels(l: &Labels, want: &[(&str, &str)]) {
    for (k, v) in want {
        assert_eq!(l.get(*k).map(String::as_str), Some(*v), "{k} in {l:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_metrics_for_a_tcp_and_an_http_service_over_mtls() {
    // Failures are explained by skiff's log lines (shown for failed tests only).
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_max_level(tracing_subscriber::filter::LevelFilter::DEBUG)
        .try_init();
    let ca = Ca::new("cluster.local");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let leaf = |name: &str, id: &str| {
        let l = ca.leaf(&[], &[id]);
        (
            write(d, &format!("{name}.pem"), &l.cert),
            write(d, &format!("{name}.key"), &l.key),
        )
    };
    let (server_c, server_k) = leaf("server", SERVER_ID);
    let (client_c, client_k) = leaf("client", CLIENT_ID);
    let root = write(d, "root.pem", &ca.pem);

    let echo = echo_backend("echo").await;
    let web_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let web = web_l.local_addr().unwrap();
    serve_http1(web_l, |_req| async {
        hyper::Response::new(Full::new(Bytes::from_static(b"reviews")))
    });

    // The server sidecar: one INBOUND listener (mTLS TCP, mTLS HTTP, plaintext TCP), and a
    // bootstrap listener that routes /stats/prometheus to its own admin (Istio's 15090).
    let (inbound, server_admin, prom) = (free_port(), free_port(), free_port());
    let server_yaml = format!(
        r#"
{}
{}
static_resources:{}
  listeners:
  - name: virtualInbound
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {inbound} }} }}
    traffic_direction: INBOUND
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector
    filter_chains:
    - name: mtls-tcp
      filter_chain_match: {{ transport_protocol: tls, application_protocols: [istio-peer-exchange, istio] }}{}
      filters:{ISTIO_STATS_NET}{}
    - name: mtls-http
      filter_chain_match: {{ transport_protocol: tls, application_protocols: [istio-http/1.1] }}{}
      filters:{}
    - name: plaintext
      filter_chain_match: {{ transport_protocol: raw_buffer }}
      filters:{ISTIO_STATS_NET}{}
  - name: 0.0.0.0_15090
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {prom} }} }}
    filter_chains:
    - filters:{}
  clusters:{}{}{}
"#,
        node(
            "sidecar~127.0.0.1~reviews-v1-abc.default~default.svc.cluster.local",
            "reviews-v1",
            "default",
            "reviews"
        ),
        admin(server_admin),
        secrets(&server_c, &server_k, &root),
        downstream(&["istio-peer-exchange", "istio"]),
        tcp_proxy("inbound|9000||"),
        downstream(&["istio-http/1.1"]),
        hcm("inbound_0.0.0.0_9080", "inbound|9080||", "/", true),
        tcp_proxy("inbound|9000||"),
        hcm("stats", "prometheus_stats", "/stats/prometheus", false),
        cluster("inbound|9000||", echo, None, None),
        cluster("inbound|9080||", web, None, None),
        cluster(
            "prometheus_stats",
            SocketAddr::from(([127, 0, 0, 1], server_admin)),
            None,
            None
        ),
    );
    let inbound_addr = SocketAddr::from(([127, 0, 0, 1], inbound));

    // The client sidecar: OUTBOUND listeners with istio.stats to mTLS clusters.
    let (out_tcp, out_http, client_admin) = (free_port(), free_port(), free_port());
    let client_yaml = format!(
        r#"
{}
{}
static_resources:{}
  listeners:
  - name: out-tcp
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {out_tcp} }} }}
    traffic_direction: OUTBOUND
    filter_chains:
    - filters:{ISTIO_STATS_NET}{}
  - name: out-http
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {out_http} }} }}
    traffic_direction: OUTBOUND
    filter_chains:
    - filters:{}
  clusters:{}{}
"#,
        node(
            "sidecar~127.0.0.2~productpage-v1-xyz.shop~shop.svc.cluster.local",
            "productpage-v1",
            "shop",
            "productpage"
        ),
        admin(client_admin),
        secrets(&client_c, &client_k, &root),
        tcp_proxy(TCP_CLUSTER),
        hcm("outbound_0.0.0.0_9080", HTTP_CLUSTER, "/", true),
        cluster(
            TCP_CLUSTER,
            inbound_addr,
            Some(&["istio-peer-exchange", "istio"]),
            Some("reviews-v1;default;reviews;v1;Kubernetes")
        ),
        cluster(HTTP_CLUSTER, inbound_addr, Some(&["istio-http/1.1"]), None) + ISTIO_SERVICES,
    );

    let server = InProcessSkiff::start(run_options(
        skiff::config::parse(&server_yaml, "<server>").expect("server bootstrap"),
    ));
    let client = InProcessSkiff::start(run_options(
        skiff::config::parse(&client_yaml, "<client>").expect("client bootstrap"),
    ));
    // Static listeners are bound before the admin answers; probing a port with istio.stats
    // would count a connection.
    wait_listening(&[server_admin, client_admin]).await;

    // Traffic: one TCP connection and two requests over mTLS, one plaintext TCP connection
    // straight to the inbound port.
    assert_eq!(ping(out_tcp).await, b"echo:ping");
    assert_eq!(get(out_http, "/").await, (200, "reviews".to_string()));
    assert_eq!(get(out_http, "/").await.0, 200);
    assert_eq!(ping(inbound).await, b"echo:ping");

    // --- The client reports as the source. ---
    let source = [
        ("reporter", "source"),
        ("source_workload", "productpage-v1"),
        ("source_workload_namespace", "shop"),
        ("source_app", "productpage"),
        ("source_version", "v1"),
        ("source_cluster", "Kubernetes"),
        ("destination_service", "reviews.default.svc.cluster.local"),
        ("destination_service_name", "reviews"),
        ("destination_service_namespace", "default"),
        ("connection_security_policy", "unknown"),
    ];
    let c = wait_counter(
        client_admin,
        "istio_tcp_connections_closed_total",
        &[("reporter", "source")],
        1.0,
    )
    .await;
    let (l, opened) = one(&c, "istio_tcp_connections_opened_total", &[]);
    assert_eq!(opened, 1.0);
    assert_labels(&l, &source);
    // The server's principal and namespace come from the certificate it presented.
    assert_labels(
        &l,
        &[
            ("destination_principal", SERVER_ID),
            ("destination_workload_namespace", "default"),
            ("request_protocol", "tcp"),
            ("response_flags", "-"),
            // From the endpoint's Istio metadata.
            ("destination_workload", "reviews-v1"),
            ("destination_canonical_service", "reviews"),
            ("destination_canonical_revision", "v1"),
            ("destination_cluster", "Kubernetes"),
        ],
    );
    assert!(!l.contains_key("response_code"), "{l:?}");
    // Received from the app: "ping"; sent to it: "echo:ping".
    assert_eq!(one(&c, "istio_tcp_received_bytes_total", &[]).1, 4.0);
    assert_eq!(one(&c, "istio_tcp_sent_bytes_total", &[]).1, 9.0);
    let (l, requests) = one(&c, "istio_requests_total", &[("response_code", "200")]);
    assert_eq!(requests, 2.0);
    assert_labels(&l, &source);
    assert_labels(
        &l,
        &[
            ("request_protocol", "http"),
            ("grpc_response_status", ""),
            ("destination_workload", "unknown"),
            ("destination_canonical_revision", "latest"),
        ],
    );
    for (family, kind) in [
        ("istio_requests_total", "counter"),
        ("istio_request_duration_milliseconds", "histogram"),
        ("istio_request_bytes", "histogram"),
        ("istio_response_bytes", "histogram"),
        ("istio_tcp_connections_opened_total", "counter"),
        ("istio_tcp_connections_closed_total", "counter"),
        ("istio_tcp_sent_bytes_total", "counter"),
        ("istio_tcp_received_bytes_total", "counter"),
    ] {
        assert_eq!(
            c.get(family).map(|f| f.0.as_str()),
            Some(kind),
            "{family} in {:?}",
            c.keys()
        );
    }
    match find(&c, "istio_request_duration_milliseconds", &source)[..] {
        [(_, PrometheusValue::Histogram(h))] => assert_eq!(h.count, Some(2)),
        ref other => panic!("one duration histogram expected: {other:?}"),
    }

    // --- The server reports as the destination. ---
    let destination = [
        ("reporter", "destination"),
        ("destination_workload", "reviews-v1"),
        ("destination_workload_namespace", "default"),
        ("destination_app", "reviews"),
        ("destination_version", "v1"),
        ("source_workload", "unknown"),
    ];
    for policy in ["mutual_tls", "none"] {
        wait_counter(
            server_admin,
            "istio_tcp_connections_closed_total",
            &[
                ("reporter", "destination"),
                ("connection_security_policy", policy),
            ],
            1.0,
        )
        .await;
    }
    let s = parse(&scrape(server_admin).await);
    let (l, n) = one(
        &s,
        "istio_tcp_connections_opened_total",
        &[("connection_security_policy", "mutual_tls")],
    );
    assert_eq!(n, 1.0);
    assert_labels(&l, &destination);
    assert_labels(
        &l,
        &[
            ("source_principal", CLIENT_ID),
            ("source_workload_namespace", "shop"),
        ],
    );
    let (l, n) = one(
        &s,
        "istio_tcp_connections_opened_total",
        &[("connection_security_policy", "none")],
    );
    assert_eq!(n, 1.0);
    assert_labels(&l, &destination);
    assert_labels(
        &l,
        &[
            ("source_principal", "unknown"),
            ("source_workload_namespace", "unknown"),
        ],
    );
    let (l, n) = one(&s, "istio_requests_total", &[("response_code", "200")]);
    assert_eq!(n, 2.0);
    assert_labels(&l, &destination);
    assert_labels(
        &l,
        &[
            ("source_principal", CLIENT_ID),
            ("connection_security_policy", "mutual_tls"),
            ("request_protocol", "http"),
            ("destination_service", "reviews:9080"),
        ],
    );

    // Istio's 15090: the bootstrap listener's route to the admin serves the same families.
    let (status, body) = get(prom, "/stats/prometheus").await;
    assert_eq!(status, 200);
    let through = parse(&body);
    assert!(through.contains_key("istio_requests_total"), "{body}");
    assert!(through.contains_key("envoy_cluster_upstream_cx_total"));

    client.stop().await.unwrap();
    server.stop().await.unwrap();
}

/// Istio's own sidecar bootstrap (the fixture envoy-rev.json) with its ports moved to free
/// loopback ones and without ADS: its `0.0.0.0_15090` listener serves the admin's
/// `/stats/prometheus` through the `prometheus_stats` cluster, as Envoy's does, and its
/// `0.0.0.0_15021` listener forwards `/healthz/ready` to pilot-agent's port (15020): with no
/// agent there, skiff answers 503 as Envoy would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_bootstrap_15090_serves_the_scrape_and_15021_goes_to_the_agent() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let f = "fixtures/xds/istio-bootstrap-default.json";
    let text = std::fs::read_to_string(root.join(f)).unwrap();
    let mut boot: serde_json::Value = serde_json::from_str(&text).unwrap();
    let (admin_port, prom, status, agent) = (free_port(), free_port(), free_port(), free_port());
    boot.as_object_mut().unwrap().remove("dynamic_resources");
    boot["admin"]["address"]["socket_address"]["port_value"] = admin_port.into();
    for l in boot["static_resources"]["listeners"]
        .as_array_mut()
        .unwrap()
    {
        let sa = &mut l["address"]["socket_address"];
        let port = match sa["port_value"].as_u64() {
            Some(15090) => prom,
            Some(15021) => status,
            other => panic!("unexpected bootstrap listener port {other:?}"),
        };
        sa["address"] = "127.0.0.1".into();
        sa["port_value"] = port.into();
    }
    for c in boot["static_resources"]["clusters"].as_array_mut().unwrap() {
        let port = match c["name"].as_str() {
            Some("prometheus_stats") => admin_port,
            Some("agent") => agent,
            _ => continue,
        };
        c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
            ["port_value"] = port.into();
    }
    let boot = skiff::config::parse(&boot.to_string(), f).unwrap_or_else(|e| panic!("{f}: {e}"));
    let skiff = InProcessSkiff::start(run_options(boot));
    wait_listening(&[admin_port]).await;

    let (code, body) = get(prom, "/stats/prometheus").await;
    assert_eq!(code, 200, "{body}");
    let families = parse(&body);
    // The scrape counts itself: the `stats` HCM of the 15090 listener.
    assert!(
        families.contains_key("envoy_http_downstream_rq_total")
            || families.contains_key("envoy_cluster_upstream_rq_total"),
        "{:?}",
        families.keys()
    );
    // Nothing listens on the agent's port: no healthy answer, as Envoy without pilot-agent.
    let (code, _) = get(status, "/healthz/ready").await;
    assert_eq!(code, 503);
    skiff.stop().await.unwrap();
}

/// `tcp_reporting_duration`: a connection that stays open reports its bytes every period, not
/// only when it closes; the close adds the rest once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lived_connection_reports_its_bytes_every_tcp_reporting_duration() {
    let echo = echo_backend("echo").await;
    let (listen, admin_port) = (free_port(), free_port());
    let yaml = format!(
        r#"
{}
{}
static_resources:
  listeners:
  - name: out-tcp
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen} }} }}
    traffic_direction: OUTBOUND
    filter_chains:
    - filters:
      - name: istio.stats
        typed_config:
          "@type": type.googleapis.com/udpa.type.v1.TypedStruct
          type_url: type.googleapis.com/stats.PluginConfig
          value: {{ tcp_reporting_duration: 0.2s }}{}
  clusters:{}
"#,
        node(
            "sidecar~127.0.0.2~a-1.shop~shop.svc.cluster.local",
            "a-v1",
            "shop",
            "a"
        ),
        admin(admin_port),
        tcp_proxy(TCP_CLUSTER),
        cluster(TCP_CLUSTER, echo, None, None),
    );
    let skiff = InProcessSkiff::start(run_options(
        skiff::config::parse(&yaml, "<test>").expect("bootstrap"),
    ));
    wait_listening(&[admin_port]).await;
    let mut s = TcpStream::connect(("127.0.0.1", listen)).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    // Still open (the echo answers only after EOF): the 4 bytes received show anyway.
    let f = wait_counter(admin_port, "istio_tcp_received_bytes_total", &[], 4.0).await;
    let closed = find(&f, "istio_tcp_connections_closed_total", &[]);
    assert!(
        closed.iter().all(|(_, v)| counter(v) == 0.0),
        "the connection is still open: {closed:?}"
    );
    assert_eq!(one(&f, "istio_tcp_connections_opened_total", &[]).1, 1.0);
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    assert_eq!(out, b"echo:ping");
    let f = wait_counter(admin_port, "istio_tcp_connections_closed_total", &[], 1.0).await;
    assert_eq!(one(&f, "istio_tcp_received_bytes_total", &[]).1, 4.0);
    assert_eq!(one(&f, "istio_tcp_sent_bytes_total", &[]).1, 9.0);
    skiff.stop().await.unwrap();
}
