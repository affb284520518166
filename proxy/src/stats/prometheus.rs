//! `/stats/prometheus` as Envoy renders it: each stat's tags taken out by Envoy's default
//! extraction ([`super::tags`]), the family named `envoy_<tag-extracted name, dots as _>`, its
//! `# TYPE` from the stat's own kind (counter, gauge, histogram), label values escaped as the
//! text format asks. Families come counters first, then gauges, then histograms, each group
//! sorted by name, as Envoy prints them.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::tags::{self, Tag};
use super::{HistogramSnapshot, Sample, Value};

/// The kind of a family, in Envoy's output order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Envoy's metric and label name sanitizing: anything but `[a-zA-Z0-9_]` becomes `_`.
pub fn sanitize_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A label value escaped for the text format: `\` as `\\`, `"` as `\"`, newline as `\n`.
pub fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// `k="v",k2="v2"` (no braces).
fn labels(tags: &[Tag]) -> String {
    tags.iter()
        .map(|t| {
            format!(
                "{}=\"{}\"",
                sanitize_name(t.name),
                escape_label_value(&t.value)
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// One family: its kind and its samples (label text, value), in the order met.
struct Family<'a> {
    kind: Kind,
    samples: Vec<(String, &'a Value)>,
}

/// The Prometheus text exposition of `samples`.
///
/// Two stats whose tag-extracted names meet in one family must share a kind; a sample whose
/// kind differs from the family's first is left out (the format allows one `# TYPE` per
/// family).
pub fn render(samples: &[Sample]) -> String {
    let mut families: BTreeMap<String, Family<'_>> = BTreeMap::new();
    for s in samples {
        let kind = match s.value {
            Value::Counter(_) => Kind::Counter,
            Value::Gauge(_) => Kind::Gauge,
            Value::Histogram(_) => Kind::Histogram,
        };
        let e = tags::extract(&s.name);
        let name = format!("envoy_{}", sanitize_name(&e.name));
        let f = families.entry(name).or_insert(Family {
            kind,
            samples: Vec::new(),
        });
        if f.kind == kind {
            f.samples.push((labels(&e.tags), &s.value));
        }
    }
    let mut order: Vec<(&String, &Family<'_>)> = families.iter().collect();
    order.sort_by(|a, b| (a.1.kind, a.0).cmp(&(b.1.kind, b.0)));
    let mut out = String::new();
    for (name, f) in order {
        let _ = writeln!(out, "# TYPE {name} {}", f.kind.as_str());
        for (l, v) in &f.samples {
            match v {
                Value::Counter(n) | Value::Gauge(n) => {
                    let _ = writeln!(out, "{name}{{{l}}} {n}");
                }
                Value::Histogram(h) => histogram(&mut out, name, l, h),
            }
        }
    }
    out
}

/// `_bucket{le=...}` for every bound and `+Inf`, then `_sum` and `_count`.
pub(super) fn histogram(out: &mut String, name: &str, l: &str, h: &HistogramSnapshot) {
    let sep = if l.is_empty() { "" } else { "," };
    for (bound, n) in h.cumulative() {
        let _ = writeln!(out, "{name}_bucket{{{l}{sep}le=\"{bound}\"}} {n}");
    }
    let count = h.count();
    let _ = writeln!(out, "{name}_bucket{{{l}{sep}le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum{{{l}}} {}", h.sum);
    let _ = writeln!(out, "{name}_count{{{l}}} {count}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Histogram;

    fn s(name: &str, value: Value) -> Sample {
        Sample {
            name: name.to_string(),
            value,
        }
    }

    #[test]
    fn families_typed_by_definition_with_envoy_labels() {
        let h = Histogram::default();
        h.record(3);
        let out = render(&[
            s("cluster.a.upstream_cx_active", Value::Gauge(2)),
            s(
                "cluster.a.upstream_cx_connect_ms",
                Value::Histogram(h.snapshot()),
            ),
            s("cluster.a.upstream_rq_200", Value::Counter(4)),
            s("cluster.b.upstream_rq_200", Value::Counter(1)),
            s("cluster.b.upstream_rq_503", Value::Counter(1)),
            s("control_plane.connected_state", Value::Gauge(1)),
            // A gauge whose name does not end like one still is one.
            s("skiff.unsupported.envoy.filters.http.wasm", Value::Gauge(1)),
        ]);
        let want = "\
# TYPE envoy_cluster_upstream_rq counter
envoy_cluster_upstream_rq{envoy_response_code=\"200\",envoy_cluster_name=\"a\"} 4
envoy_cluster_upstream_rq{envoy_response_code=\"200\",envoy_cluster_name=\"b\"} 1
envoy_cluster_upstream_rq{envoy_response_code=\"503\",envoy_cluster_name=\"b\"} 1
# TYPE envoy_cluster_upstream_cx_active gauge
envoy_cluster_upstream_cx_active{envoy_cluster_name=\"a\"} 2
# TYPE envoy_control_plane_connected_state gauge
envoy_control_plane_connected_state{} 1
# TYPE envoy_skiff_unsupported_envoy_filters_http_wasm gauge
envoy_skiff_unsupported_envoy_filters_http_wasm{} 1
# TYPE envoy_cluster_upstream_cx_connect_ms histogram
";
        assert!(out.starts_with(want), "{out}");
        assert!(out.contains(
            "envoy_cluster_upstream_cx_connect_ms_bucket{envoy_cluster_name=\"a\",le=\"1\"} 0\n\
             envoy_cluster_upstream_cx_connect_ms_bucket{envoy_cluster_name=\"a\",le=\"5\"} 1\n"
        ));
        assert!(out.ends_with(
            "envoy_cluster_upstream_cx_connect_ms_bucket{envoy_cluster_name=\"a\",le=\"+Inf\"} 1\n\
             envoy_cluster_upstream_cx_connect_ms_sum{envoy_cluster_name=\"a\"} 3\n\
             envoy_cluster_upstream_cx_connect_ms_count{envoy_cluster_name=\"a\"} 1\n"
        ));
    }

    #[test]
    fn label_values_are_escaped() {
        let out = render(&[s(
            "cluster.we\"ird\\na\nme.upstream_cx_total",
            Value::Counter(1),
        )]);
        assert_eq!(
            out,
            "# TYPE envoy_cluster_upstream_cx_total counter\n\
             envoy_cluster_upstream_cx_total{envoy_cluster_name=\"we\\\"ird\\\\na\\nme\"} 1\n"
        );
    }

    #[test]
    fn a_sample_of_another_kind_does_not_split_a_family() {
        let out = render(&[
            s("cluster.a.x", Value::Counter(1)),
            s("cluster.b.x", Value::Gauge(1)),
        ]);
        assert_eq!(out.matches("# TYPE").count(), 1, "{out}");
    }
}
