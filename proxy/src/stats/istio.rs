//! Istio's standard metrics (issue 17), recorded where a chain or an HCM carries Istio's stats
//! filter (`model::istio`): `istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes` for HTTP, `istio_tcp_connections_opened_total`,
//! `_closed_total`, `istio_tcp_sent_bytes_total`, `_received_bytes_total` for TCP, with Istio's
//! labels, rendered unprefixed into `/stats/prometheus` as Envoy does with the filter's stats.
//!
//! Each label set gets one [`Series`] of handles. The set is looked up in a copy-on-write map
//! behind an `ArcSwap`: a label set seen before costs one atomic load and a hash lookup, no
//! lock; only a new label set takes the writers' mutex and republishes the map. A TCP
//! connection resolves its series once; a request resolves it once at its end (its labels
//! include the response code).
//!
//! Labels follow Istio's `istio_stats` filter: the reporter's own side comes from the node's
//! Istio metadata, the peer's principal from the TLS peer identity (its namespace from the
//! SPIFFE id), the destination service from the cluster's `istio.services` metadata (else its
//! Istio name, else `Host`), and anything
//! unknown is `unknown` (`source_canonical_revision`/`destination_canonical_revision`:
//! `latest`). skiff runs no metadata exchange, so the peer's workload, app and version are
//! `unknown` unless known from the node itself.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;

use super::histogram::HistogramSnapshot;
use super::prometheus::escape_label_value;
use super::{Counter, Histogram};
use crate::model::istio::{
    IstioService, IstioStats, MetricOverride, Reporter, Workload, cluster_service, shape,
};

/// `unknown`, Istio's value for a label it cannot fill.
pub const UNKNOWN: &str = "unknown";

/// Label names of the HTTP metrics, in Istio's order.
const HTTP_LABELS: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

/// TCP metrics carry the same labels but the response code and gRPC status.
const TCP_SKIPS: [&str; 2] = ["response_code", "grpc_response_status"];

/// One label set: TCP or HTTP, the values in [`HTTP_LABELS`] order, and the filter's
/// `metrics` overrides (applied when rendering: a dropped metric is not shown, removed tags
/// merge the series that differ only in them).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Labels {
    tcp: bool,
    values: Vec<Arc<str>>,
    overrides: Arc<[MetricOverride]>,
}

impl Labels {
    /// The value of label `name`, if the set has it.
    pub fn get(&self, name: &str) -> Option<&str> {
        if self.tcp && TCP_SKIPS.contains(&name) {
            return None;
        }
        HTTP_LABELS
            .iter()
            .position(|n| *n == name)
            .map(|i| &*self.values[i])
    }

    /// The label text of metric `metric` (`requests_total`, ...), or `None` when the overrides
    /// drop it.
    fn render(&self, metric: &str) -> Option<String> {
        let (keep, removed) = shape(&self.overrides, metric);
        if !keep {
            return None;
        }
        let text = HTTP_LABELS
            .iter()
            .zip(&self.values)
            .filter(|(n, _)| !(removed.contains(n) || self.tcp && TCP_SKIPS.contains(n)))
            .map(|(n, v)| format!("{n}=\"{}\"", escape_label_value(v)))
            .collect::<Vec<_>>()
            .join(",");
        Some(text)
    }
}

/// The handles of one label set.
#[derive(Debug, Default)]
pub struct Series {
    /// `istio_requests_total`.
    pub requests_total: Counter,
    /// `istio_request_duration_milliseconds`.
    pub request_duration: Histogram,
    /// `istio_request_bytes`.
    pub request_bytes: Histogram,
    /// `istio_response_bytes`.
    pub response_bytes: Histogram,
    /// `istio_tcp_connections_opened_total`.
    pub tcp_opened: Counter,
    /// `istio_tcp_connections_closed_total`.
    pub tcp_closed: Counter,
    /// `istio_tcp_sent_bytes_total` (to the downstream).
    pub tcp_sent: Counter,
    /// `istio_tcp_received_bytes_total` (from the downstream).
    pub tcp_received: Counter,
}

/// Reads one counter family of a series.
type CounterOf = fn(&Series) -> &Counter;
/// Reads one histogram family of a series.
type HistogramOf = fn(&Series) -> &Histogram;

/// Istio's metrics of one skiff process (or node-mode pipeline): the proxy's own workload and
/// every label set recorded so far.
#[derive(Debug, Default)]
pub struct IstioMetrics {
    local: OnceLock<Arc<Workload>>,
    series: ArcSwap<HashMap<Arc<Labels>, Arc<Series>>>,
    /// Serialises inserts (readers never take it).
    insert: Mutex<()>,
}

/// What one connection or request knows for its labels.
#[derive(Debug, Clone, Default)]
pub struct Facts<'a> {
    /// The peer's principal: the downstream client's for a server-side reporter, the
    /// upstream's for a client-side one (first URI SAN).
    pub peer_principal: Option<&'a str>,
    /// This proxy's own principal on that connection (its certificate's first URI SAN), when
    /// known.
    pub local_principal: Option<&'a str>,
    /// A server side's connection is mutual TLS: terminated here, and the client presented a
    /// verified certificate.
    pub mtls: bool,
    /// The cluster the connection or request went to.
    pub cluster: Option<&'a str>,
    /// That cluster's Istio service (its `istio.services` metadata), when it has one.
    pub service: Option<&'a IstioService>,
    /// The upstream endpoint's Istio workload (a client side's destination), when known.
    pub endpoint: Option<&'a Workload>,
    /// The request's `Host`.
    pub host: Option<&'a str>,
}

/// What a request ended with.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestEnd<'a> {
    /// The response status.
    pub status: u16,
    /// A gRPC request (`content-type: application/grpc*`).
    pub grpc: bool,
    /// The response's `grpc-status`, if any.
    pub grpc_status: Option<&'a str>,
    /// Envoy's response flags (`-` for none).
    pub flags: &'a str,
}

/// The namespace in a SPIFFE id (`spiffe://td/ns/<ns>/sa/<sa>`).
fn spiffe_namespace(principal: &str) -> Option<&str> {
    let rest = principal.split_once("/ns/")?.1;
    Some(rest.split('/').next().unwrap_or(rest))
}

fn or_unknown(s: &str) -> Arc<str> {
    if s.is_empty() {
        Arc::from(UNKNOWN)
    } else {
        Arc::from(s)
    }
}

impl IstioMetrics {
    /// Set the proxy's own workload (from the node's Istio metadata); the first call wins.
    pub fn set_local(&self, w: Workload) {
        let _ = self.local.set(Arc::new(w));
    }

    fn local(&self) -> Arc<Workload> {
        self.local.get().cloned().unwrap_or_default()
    }

    /// The label values of one connection (TCP) or request (HTTP, with `end`).
    pub fn labels(&self, cfg: &IstioStats, f: &Facts<'_>, end: Option<&RequestEnd<'_>>) -> Labels {
        let local = self.local();
        let none = Workload::default();
        let peer_workload = if cfg.reporter.is_server() {
            &none
        } else {
            f.endpoint.unwrap_or(&none)
        };
        let (src, dst) = if cfg.reporter.is_server() {
            (peer_workload, &*local)
        } else {
            (&*local, peer_workload)
        };
        let peer = f.peer_principal.filter(|p| !p.is_empty());
        let mine = f.local_principal.filter(|p| !p.is_empty());
        let (src_principal, dst_principal) = if cfg.reporter.is_server() {
            (peer, mine)
        } else {
            (mine, peer)
        };
        // The peer's namespace from its SPIFFE id, else from its metadata, as Istio does.
        let peer_ns = peer
            .and_then(spiffe_namespace)
            .unwrap_or(peer_workload.namespace.as_str());
        let (src_ns, dst_ns) = if cfg.reporter.is_server() {
            (peer_ns, local.namespace.as_str())
        } else {
            (local.namespace.as_str(), peer_ns)
        };
        // The cluster's `istio.services` metadata, else the service its Istio name spells,
        // else (unless disabled) the request's `Host`.
        let service = f
            .service
            .cloned()
            .or_else(|| f.cluster.and_then(cluster_service))
            .or_else(|| {
                (!cfg.disable_host_header_fallback)
                    .then_some(f.host)
                    .flatten()
                    .map(|h| IstioService {
                        host: h.to_string(),
                        name: h.to_string(),
                        namespace: String::new(),
                    })
            });
        let service = service.unwrap_or_default();
        // Istio: mutual TLS only a server side can tell (both ends have a SAN); a client
        // reports `unknown`.
        let policy = match cfg.reporter {
            Reporter::Source => UNKNOWN,
            _ if f.mtls && peer.is_some() => "mutual_tls",
            _ => "none",
        };
        let revision = |r: &str| -> Arc<str> {
            if r.is_empty() {
                Arc::from("latest")
            } else {
                Arc::from(r)
            }
        };
        let values: Vec<Arc<str>> = vec![
            Arc::from(cfg.reporter.as_str()),
            or_unknown(&src.name),
            or_unknown(&src.canonical_service),
            revision(&src.canonical_revision),
            or_unknown(src_ns),
            or_unknown(src_principal.unwrap_or_default()),
            or_unknown(&src.app),
            or_unknown(&src.version),
            or_unknown(&src.cluster),
            or_unknown(&dst.name),
            or_unknown(dst_ns),
            or_unknown(dst_principal.unwrap_or_default()),
            or_unknown(&dst.app),
            or_unknown(&dst.version),
            or_unknown(&service.host),
            or_unknown(&dst.canonical_service),
            revision(&dst.canonical_revision),
            or_unknown(&service.name),
            or_unknown(&service.namespace),
            or_unknown(&dst.cluster),
            Arc::from(match end {
                None => "tcp",
                Some(e) if e.grpc => "grpc",
                Some(_) => "http",
            }),
            Arc::from(end.map_or(String::new(), |e| e.status.to_string()).as_str()),
            Arc::from(end.and_then(|e| e.grpc_status).unwrap_or_default()),
            Arc::from(end.map_or("-", |e| if e.flags.is_empty() { "-" } else { e.flags })),
            Arc::from(policy),
        ];
        Labels {
            tcp: end.is_none(),
            values,
            overrides: cfg.overrides.clone(),
        }
    }

    /// The handles of `labels`, created on first use.
    pub fn series(&self, labels: Labels) -> Arc<Series> {
        if let Some(s) = self.series.load().get(&labels) {
            return s.clone();
        }
        let _guard = self.insert.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.series.load_full();
        if let Some(s) = current.get(&labels) {
            return s.clone();
        }
        let s = Arc::new(Series::default());
        let mut next = HashMap::clone(&current);
        next.insert(Arc::new(labels), s.clone());
        self.series.store(Arc::new(next));
        s
    }

    /// Record one finished request.
    pub fn request(
        &self,
        cfg: &IstioStats,
        f: &Facts<'_>,
        end: &RequestEnd<'_>,
        duration: std::time::Duration,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        let s = self.series(self.labels(cfg, f, Some(end)));
        s.requests_total.inc();
        s.request_duration.record_duration(duration);
        s.request_bytes.record(request_bytes);
        s.response_bytes.record(response_bytes);
    }

    /// How many label sets exist.
    pub fn len(&self) -> usize {
        self.series.load().len()
    }

    /// Whether nothing was recorded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The Prometheus text of every family recorded so far (nothing when none was). Series
    /// whose labels become equal once the overrides' tags are removed are summed.
    pub fn render(&self) -> String {
        let map = self.series.load_full();
        let mut out = String::new();
        let counters: [(&str, bool, CounterOf); 5] = [
            ("requests_total", false, |s| &s.requests_total),
            ("tcp_connections_closed_total", true, |s| &s.tcp_closed),
            ("tcp_connections_opened_total", true, |s| &s.tcp_opened),
            ("tcp_received_bytes_total", true, |s| &s.tcp_received),
            ("tcp_sent_bytes_total", true, |s| &s.tcp_sent),
        ];
        for (metric, tcp, get) in counters {
            let mut rows: BTreeMap<String, u64> = BTreeMap::new();
            for (l, s) in map.iter().filter(|(l, _)| l.tcp == tcp) {
                if let Some(text) = l.render(metric) {
                    *rows.entry(text).or_default() += get(s).get();
                }
            }
            if rows.is_empty() {
                continue;
            }
            let _ = writeln!(out, "# TYPE istio_{metric} counter");
            for (l, v) in rows {
                let _ = writeln!(out, "istio_{metric}{{{l}}} {v}");
            }
        }
        let histograms: [(&str, HistogramOf); 3] = [
            ("request_bytes", |s| &s.request_bytes),
            ("request_duration_milliseconds", |s| &s.request_duration),
            ("response_bytes", |s| &s.response_bytes),
        ];
        for (metric, get) in histograms {
            let mut rows: BTreeMap<String, HistogramSnapshot> = BTreeMap::new();
            for (l, s) in map.iter().filter(|(l, _)| !l.tcp) {
                if let Some(text) = l.render(metric) {
                    let snap = get(s).snapshot();
                    match rows.entry(text) {
                        Entry::Vacant(v) => {
                            v.insert(snap);
                        }
                        Entry::Occupied(mut o) => o.get_mut().merge(&snap),
                    }
                }
            }
            if rows.is_empty() {
                continue;
            }
            let name = format!("istio_{metric}");
            let _ = writeln!(out, "# TYPE {name} histogram");
            for (l, snap) in rows {
                super::prometheus::histogram(&mut out, &name, &l, &snap);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> Workload {
        Workload {
            name: "reviews-v2".into(),
            namespace: "default".into(),
            app: "reviews".into(),
            version: "v2".into(),
            ..Default::default()
        }
    }

    fn cfg(reporter: Reporter) -> IstioStats {
        IstioStats {
            reporter,
            ..Default::default()
        }
    }

    #[test]
    fn server_side_labels_take_the_peer_from_mtls() {
        let m = IstioMetrics::default();
        m.set_local(local());
        let f = Facts {
            peer_principal: Some("spiffe://cluster.local/ns/shop/sa/productpage"),
            local_principal: Some("spiffe://cluster.local/ns/default/sa/reviews"),
            mtls: true,
            cluster: Some("inbound|9080||"),
            host: Some("reviews:9080"),
            service: None,
            endpoint: None,
        };
        let end = RequestEnd {
            status: 200,
            flags: "-",
            ..Default::default()
        };
        let l = m.labels(&cfg(Reporter::Destination), &f, Some(&end));
        assert_eq!(l.get("reporter"), Some("destination"));
        assert_eq!(l.get("source_workload_namespace"), Some("shop"));
        assert_eq!(
            l.get("source_principal"),
            Some("spiffe://cluster.local/ns/shop/sa/productpage")
        );
        assert_eq!(l.get("source_workload"), Some("unknown"));
        assert_eq!(l.get("destination_workload"), Some("reviews-v2"));
        assert_eq!(l.get("destination_app"), Some("reviews"));
        assert_eq!(l.get("destination_service"), Some("reviews:9080"));
        assert_eq!(l.get("connection_security_policy"), Some("mutual_tls"));
        assert_eq!(l.get("destination_canonical_revision"), Some("latest"));
        assert_eq!(l.get("response_code"), Some("200"));
        let plain = m.labels(&cfg(Reporter::Destination), &Facts::default(), None);
        assert_eq!(plain.get("connection_security_policy"), Some("none"));
        assert_eq!(plain.get("request_protocol"), Some("tcp"));
        assert_eq!(plain.get("response_code"), None);
    }

    #[test]
    fn client_side_labels_and_one_series_per_label_set() {
        let m = IstioMetrics::default();
        m.set_local(local());
        let f = Facts {
            cluster: Some("outbound|9080||ratings.default.svc.cluster.local"),
            ..Default::default()
        };
        let l = m.labels(&cfg(Reporter::Source), &f, None);
        assert_eq!(l.get("source_workload"), Some("reviews-v2"));
        assert_eq!(l.get("source_version"), Some("v2"));
        assert_eq!(
            l.get("destination_service"),
            Some("ratings.default.svc.cluster.local")
        );
        assert_eq!(l.get("destination_service_name"), Some("ratings"));
        assert_eq!(l.get("destination_service_namespace"), Some("default"));
        assert_eq!(l.get("connection_security_policy"), Some("unknown"));
        let meta = IstioService {
            host: "ratings.prod.svc.cluster.local".into(),
            name: "ratings".into(),
            namespace: "prod".into(),
        };
        let with_meta = Facts {
            service: Some(&meta),
            ..f.clone()
        };
        let lm = m.labels(&cfg(Reporter::Source), &with_meta, None);
        assert_eq!(lm.get("destination_service_namespace"), Some("prod"));
        let a = m.series(l.clone());
        let b = m.series(l);
        assert!(Arc::ptr_eq(&a, &b));
        a.tcp_opened.inc();
        let end = RequestEnd {
            status: 503,
            flags: "UF",
            ..Default::default()
        };
        m.request(
            &cfg(Reporter::Source),
            &f,
            &end,
            std::time::Duration::from_millis(7),
            10,
            20,
        );
        assert_eq!(m.len(), 2);
        let text = m.render();
        assert!(text.contains("# TYPE istio_tcp_connections_opened_total counter\n"));
        assert!(text.contains("# TYPE istio_request_duration_milliseconds histogram\n"));
        assert!(text.contains("response_code=\"503\""), "{text}");
        assert!(text.contains("response_flags=\"UF\""), "{text}");
        assert!(text.contains("le=\"10\"} 1"), "{text}");
    }

    #[test]
    fn overrides_drop_metrics_and_merge_series_without_removed_tags() {
        use crate::model::istio::MetricOverride;
        let m = IstioMetrics::default();
        m.set_local(local());
        let c = IstioStats {
            overrides: Arc::from(vec![
                MetricOverride {
                    name: Some("requests_total".into()),
                    drop: false,
                    tags_to_remove: vec!["response_code".into(), "response_flags".into()],
                },
                MetricOverride {
                    name: Some("request_bytes".into()),
                    drop: true,
                    tags_to_remove: vec![],
                },
            ]),
            ..cfg(Reporter::Source)
        };
        let f = Facts {
            cluster: Some("outbound|9080||ratings.default.svc.cluster.local"),
            ..Default::default()
        };
        for (status, flags) in [(200, "-"), (503, "UF"), (200, "-")] {
            let end = RequestEnd {
                status,
                flags,
                ..Default::default()
            };
            m.request(&c, &f, &end, std::time::Duration::from_millis(3), 5, 7);
        }
        assert_eq!(m.len(), 2, "two label sets recorded");
        let text = m.render();
        let totals: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .collect();
        assert_eq!(totals.len(), 1, "{text}");
        assert!(totals[0].ends_with("} 3"), "{text}");
        assert!(!totals[0].contains("response_code"), "{text}");
        assert!(!text.contains("istio_request_bytes"), "{text}");
        // Other metrics keep every label.
        assert!(
            text.contains("istio_response_bytes_count{") && text.contains("response_code=\"503\""),
            "{text}"
        );
    }

    #[test]
    fn concurrent_first_uses_lose_no_label_set_and_share_handles() {
        let m = Arc::new(IstioMetrics::default());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..50u16 {
                        // Each thread's own sets, and one set every thread shares.
                        for status in [1000 * (t + 1) + i, 200] {
                            let end = RequestEnd {
                                status,
                                flags: "-",
                                ..Default::default()
                            };
                            let l = m.labels(&cfg(Reporter::Source), &Facts::default(), Some(&end));
                            m.series(l).requests_total.inc();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(m.len(), 4 * 50 + 1);
        let end = RequestEnd {
            status: 200,
            flags: "-",
            ..Default::default()
        };
        let shared = m.series(m.labels(&cfg(Reporter::Source), &Facts::default(), Some(&end)));
        assert_eq!(shared.requests_total.get(), 200);
    }
}
