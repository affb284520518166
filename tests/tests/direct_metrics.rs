//! skiff's `/stats/prometheus` read by a Prometheus text-format parser (the
//! `openmetrics-parser` crate's): after HTTP and TCP traffic through an in-process skiff, the
//! families carry Envoy's names, types from the stats' definitions (histograms included) and
//! Envoy's tags as labels, and a cluster name with `"` and `\` comes back intact through the
//! escaping. Also `/stats`' histogram summary, `/server_info`'s fields and `/logging`.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use openmetrics_parser::PrometheusValue;
use skiff_tests::{SkiffThread, free_port, run_options};
use skiff_tests::{blocking_admin, blocking_backend, blocking_get};

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Cluster `esc"ape\d`: its name must survive the label escaping.
const ODD_CLUSTER: &str = r#"esc"ape\d"#;

fn admin_get(admin: u16, path: &str) -> String {
    blocking_admin(admin, hyper::Method::GET, path).unwrap_or_default()
}

fn bootstrap(http: u16, tcp: u16, admin: u16, up: SocketAddr) -> String {
    let cluster = |name: &str| {
        format!(
            "  - name: '{name}'\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: '{name}'\n      endpoints:\n      - lb_endpoints:\n        - endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }}\n",
            up.ip(),
            up.port()
        )
    };
    format!(
        r#"node: {{ id: metrics, cluster: metrics }}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
  - name: http
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {http} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress_http
          route_config:
            name: local
            virtual_hosts:
            - name: vh
              domains: ["*"]
              routes:
              - match: {{ prefix: "/odd" }}
                route: {{ cluster: '{ODD_CLUSTER}' }}
              - match: {{ prefix: "/" }}
                route: {{ cluster: backend }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
{tcp_listener}  clusters:
{backend}{odd}"#,
        tcp_listener = skiff_tests::tcp_proxy_listener_yaml("tcp", tcp, "tcp_front", "backend"),
        backend = cluster("backend"),
        odd = cluster(ODD_CLUSTER),
    )
}

/// Each family of a scrape: its `# TYPE` and every sample's labels and value.
type Families = BTreeMap<String, (String, Vec<(BTreeMap<String, String>, PrometheusValue)>)>;

/// A scrape read by `openmetrics-parser`'s Prometheus text-format parser (strict: label values
/// unescaped, one label set per family, histograms cumulative with a `+Inf` bucket).
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

fn counter(v: &PrometheusValue) -> f64 {
    match v {
        PrometheusValue::Counter(c) => c.value.as_f64(),
        other => panic!("expected a counter, got {other:?}"),
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn prometheus_scrape_parses_with_envoy_names_types_labels_and_escaping() {
    let up = blocking_backend();
    let (http, tcp, admin) = (free_port(), free_port(), free_port());
    let yaml = bootstrap(http, tcp, admin, up);
    let boot = skiff::config::parse(&yaml, "<metrics>").expect("bootstrap");
    let skiff = SkiffThread::start(run_options(boot));
    wait_for("the HTTP listener", || {
        TcpStream::connect(("127.0.0.1", http)).is_ok()
    });

    for _ in 0..3 {
        assert_eq!(blocking_get(http, "/"), Some(200));
    }
    assert_eq!(blocking_get(http, "/missing"), Some(404));
    assert_eq!(blocking_get(http, "/odd"), Some(404));
    // Through the tcp_proxy: bytes only, the backend still answers.
    assert_eq!(blocking_get(tcp, "/"), Some(200));
    // Connection lengths are recorded when the proxy closes its side.
    wait_for("the listeners' connection lengths", || {
        admin_get(admin, "/stats").contains(&format!(
            "listener.127.0.0.1_{tcp}.downstream_cx_length_ms: P0"
        ))
    });

    let text = admin_get(admin, "/stats/prometheus");
    let scrape = parse(&text);

    // Types come from the definitions (one `# TYPE` per family, as the parser requires).
    let kind = |f: &str| scrape.get(f).map(|(k, _)| k.as_str());
    assert_eq!(kind("envoy_cluster_upstream_rq_total"), Some("counter"));
    assert_eq!(kind("envoy_cluster_upstream_cx_active"), Some("gauge"));
    assert_eq!(kind("envoy_control_plane_connected_state"), Some("gauge"));
    for h in [
        "envoy_cluster_upstream_cx_connect_ms",
        "envoy_cluster_upstream_rq_time",
        "envoy_listener_downstream_cx_length_ms",
        "envoy_http_downstream_rq_time",
    ] {
        assert_eq!(kind(h), Some("histogram"), "{h}:\n{text}");
    }

    // Envoy's tag extraction.
    let rq = &scrape["envoy_cluster_upstream_rq"].1;
    let by_labels: BTreeMap<_, _> = rq.iter().map(|(l, v)| (l.clone(), counter(v))).collect();
    assert_eq!(
        by_labels.get(&labels(&[
            ("envoy_cluster_name", "backend"),
            ("envoy_response_code", "200")
        ])),
        Some(&3.0),
        "{rq:?}"
    );
    assert_eq!(
        by_labels.get(&labels(&[
            ("envoy_cluster_name", "backend"),
            ("envoy_response_code", "404")
        ])),
        Some(&1.0)
    );
    let classes: BTreeMap<_, _> = scrape["envoy_http_downstream_rq_xx"]
        .1
        .iter()
        .map(|(l, v)| (l.clone(), counter(v)))
        .collect();
    assert_eq!(
        classes.get(&labels(&[
            ("envoy_http_conn_manager_prefix", "ingress_http"),
            ("envoy_response_code_class", "4")
        ])),
        Some(&2.0)
    );
    let listeners: Vec<BTreeMap<String, String>> = scrape["envoy_listener_downstream_cx_total"]
        .1
        .iter()
        .map(|(l, _)| l.clone())
        .collect();
    for port in [http, tcp] {
        assert!(
            listeners.contains(&labels(&[(
                "envoy_listener_address",
                &format!("127.0.0.1_{port}")
            )])),
            "{listeners:?}"
        );
    }

    // Escaping: the parser gives back the cluster's exact name.
    assert!(
        scrape["envoy_cluster_upstream_rq_total"]
            .1
            .iter()
            .any(|(l, _)| l.get("envoy_cluster_name").map(String::as_str) == Some(ODD_CLUSTER)),
        "{text}"
    );
    assert!(text.contains(r#"envoy_cluster_name="esc\"ape\\d""#));

    // Histograms: cumulative buckets at Envoy's bounds, `+Inf` equal to `_count`.
    let rq_time = &scrape["envoy_http_downstream_rq_time"].1;
    let (_, v) = rq_time
        .iter()
        .find(|(l, _)| {
            l.get("envoy_http_conn_manager_prefix").map(String::as_str) == Some("ingress_http")
        })
        .expect("downstream_rq_time of ingress_http");
    let PrometheusValue::Histogram(h) = v else {
        panic!("downstream_rq_time is not a histogram: {v:?}");
    };
    let bounds: Vec<f64> = h.buckets.iter().map(|b| b.upper_bound).collect();
    assert_eq!(bounds.len(), 20, "{bounds:?}");
    assert_eq!(bounds[0], 0.5);
    assert_eq!(bounds[18], 3_600_000.0);
    assert!(bounds[19].is_infinite());
    assert_eq!(h.buckets[19].count.as_f64(), 5.0);
    assert_eq!(h.count, Some(5));

    // `?filter=` narrows every format; `/stats?format=prometheus` is the same rendering.
    let filter = "filter=%5Ecluster%5C.backend%5C.";
    let only = admin_get(admin, &format!("/stats/prometheus?{filter}"));
    let narrowed = parse(&only);
    assert!(
        narrowed.contains_key("envoy_cluster_upstream_rq_total"),
        "{only}"
    );
    for (name, (_, samples)) in &narrowed {
        for (l, _) in samples {
            assert_eq!(
                l.get("envoy_cluster_name").map(String::as_str),
                Some("backend"),
                "{name}"
            );
        }
    }
    let same = parse(&admin_get(
        admin,
        &format!("/stats?format=prometheus&{filter}"),
    ));
    assert_eq!(
        same.keys().collect::<Vec<_>>(),
        narrowed.keys().collect::<Vec<_>>()
    );

    // `/stats` prints the histogram's quantile line.
    let stats = admin_get(admin, "/stats");
    let line = stats
        .lines()
        .find(|l| l.starts_with("http.ingress_http.downstream_rq_time: "))
        .expect("histogram line in /stats");
    assert!(
        line.contains(" P0(nan,") && line.contains(" P100(nan,"),
        "{line}"
    );

    // `/server_info` has Envoy's fields.
    let info: serde_json::Value =
        serde_json::from_str(&admin_get(admin, "/server_info")).expect("server_info is JSON");
    for k in [
        "version",
        "state",
        "hot_restart_version",
        "command_line_options",
        "node",
        "uptime_current_epoch",
        "uptime_all_epochs",
    ] {
        assert!(!info[k].is_null(), "server_info lacks {k}: {info}");
    }
    assert_eq!(info["node"]["id"], "metrics");
    assert_eq!(info["node"]["cluster"], "metrics");

    skiff.stop().unwrap();
}

#[test]
fn logging_levels_change_at_run_time() {
    // The binary's subscriber, installed in this test process.
    skiff::admin::logging::init();
    let admin = free_port();
    let yaml = format!(
        "node: {{ id: log, cluster: log }}\nadmin:\n  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}\n"
    );
    let boot = skiff::config::parse(&yaml, "<log>").expect("bootstrap");
    let mut opts = run_options(boot);
    opts.admin_options.allow_mutations = true;
    let skiff = SkiffThread::start(opts);
    wait_for("the admin", || {
        blocking_admin(admin, hyper::Method::GET, "/server_info").is_ok()
    });

    assert!(
        tracing::enabled!(target: "skiff::xds", tracing::Level::INFO)
            && !tracing::enabled!(target: "skiff::xds", tracing::Level::DEBUG)
    );
    let listed = admin_get(admin, "/logging");
    assert!(
        listed.starts_with("active loggers:\n  default: info\n"),
        "{listed}"
    );

    let after = blocking_admin(
        admin,
        hyper::Method::POST,
        "/logging?paths=skiff::xds:debug,skiff::http:trace",
    )
    .unwrap();
    assert!(after.contains("  skiff::xds: debug\n"), "{after}");
    assert!(after.contains("  skiff::http: trace\n"), "{after}");
    assert!(tracing::enabled!(target: "skiff::xds", tracing::Level::DEBUG));
    assert!(!tracing::enabled!(target: "skiff::lb", tracing::Level::DEBUG));

    blocking_admin(admin, hyper::Method::POST, "/logging?level=warning").unwrap();
    assert!(!tracing::enabled!(target: "skiff::xds", tracing::Level::INFO));
    assert!(tracing::enabled!(target: "skiff::xds", tracing::Level::WARN));
    assert!(admin_get(admin, "/logging").starts_with("active loggers:\n  default: warning\n"));

    // A bad level changes nothing and says why.
    let bad = blocking_admin(admin, hyper::Method::POST, "/logging?level=loud").unwrap_err();
    assert!(
        bad.contains("400") && bad.contains("unknown logger level"),
        "{bad}"
    );
    assert!(admin_get(admin, "/logging").starts_with("active loggers:\n  default: warning\n"));

    blocking_admin(admin, hyper::Method::POST, "/logging?level=info").unwrap();
    skiff.stop().unwrap();
}
