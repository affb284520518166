//! Envoy's default tag extraction: the tags (`envoy.cluster_name`, `envoy.response_code`, ...)
//! that Envoy's `well_known_names` pulls out of a stat name, and the tag-extracted name left
//! behind, which `/stats/prometheus` exports as the metric family.
//!
//! Envoy writes most extractors as regular expressions (some with look-aheads and lazy
//! quantifiers) and the rest as dotted token patterns (`cluster.$.**`). skiff matches the same
//! strings by hand: each regex below is quoted beside the function that implements it. As in
//! Envoy, every extractor looks at the whole original name; the characters each one removes are
//! collected and dropped at the end, so the order of extraction changes only the order of the
//! tags. Extractors for filters skiff does not have (Dynamo, Mongo, Thrift, Redis, rate limits,
//! ext_authz, DNS) are left out: skiff never produces such names.

use std::ops::Range;

/// One tag taken out of a stat name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    /// Envoy's tag name (`envoy.cluster_name`).
    pub name: &'static str,
    /// The value found in the stat name.
    pub value: String,
}

/// A stat name split into its tag-extracted name and tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    /// The name without the tags' characters (`cluster.upstream_rq` for
    /// `cluster.c.upstream_rq_200`).
    pub name: String,
    /// Tags in Envoy's extraction order.
    pub tags: Vec<Tag>,
}

/// What one extractor found: the tag's value and the characters to remove from the name.
struct Found {
    value: Range<usize>,
    remove: Range<usize>,
}

/// One of Envoy's default extractors.
enum Extractor {
    /// A dotted token pattern: `*` one token, `**` one or more, `$` the tag's token.
    Tokens(&'static str),
    /// A regular expression, implemented by hand.
    Re(fn(&str) -> Option<Found>),
}

/// Envoy's default extractors, those without a literal first token first (Envoy runs them on
/// every name, then the ones indexed by the name's first token), each group in Envoy's order.
const EXTRACTORS: &[(&str, Extractor)] = &[
    ("envoy.response_code", Extractor::Re(response_code)),
    (
        "envoy.response_code_class",
        Extractor::Re(response_code_class),
    ),
    ("envoy.worker_id", Extractor::Re(worker_id)),
    (
        "envoy.grpc_bridge_method",
        Extractor::Tokens("cluster.*.grpc.*.$.**"),
    ),
    (
        "envoy.http_user_agent",
        Extractor::Tokens("http.*.user_agent.$.**"),
    ),
    (
        "envoy.virtual_cluster",
        Extractor::Tokens("vhost.*.vcluster.$.**"),
    ),
    (
        "envoy.fault_downstream_cluster",
        Extractor::Tokens("http.*.fault.$.**"),
    ),
    ("envoy.ssl_cipher", Extractor::Re(ssl_cipher)),
    ("envoy.ssl_curve", Extractor::Re(ssl_curve)),
    ("envoy.ssl_sigalg", Extractor::Re(ssl_sigalg)),
    ("envoy.ssl_version", Extractor::Re(ssl_version)),
    ("envoy.ssl_cipher_suite", Extractor::Re(ssl_cipher_suite)),
    (
        "envoy.grpc_bridge_service",
        Extractor::Tokens("cluster.*.grpc.$.**"),
    ),
    ("envoy.tcp_prefix", Extractor::Tokens("tcp.$.**")),
    ("envoy.udp_prefix", Extractor::Tokens("udp.$.**")),
    ("envoy.cluster_name", Extractor::Tokens("cluster.$.**")),
    (
        "envoy.http_conn_manager_prefix",
        Extractor::Re(listener_http_prefix),
    ),
    (
        "envoy.http_conn_manager_prefix",
        Extractor::Tokens("http.$.**"),
    ),
    ("envoy.listener_address", Extractor::Re(listener_address)),
    ("envoy.virtual_host", Extractor::Tokens("vhost.$.**")),
    ("envoy.rds_route_config", Extractor::Re(rds_route_config)),
    ("envoy.route", Extractor::Tokens("vhost.*.route.$.**")),
];

/// Split `name` into Envoy's tag-extracted name and tags.
pub fn extract(name: &str) -> Extracted {
    let tokens: Vec<&str> = name.split('.').collect();
    let mut tags = Vec::new();
    let mut removed: Vec<Range<usize>> = Vec::new();
    for (tag, ex) in EXTRACTORS {
        let found = match ex {
            Extractor::Tokens(pattern) => tokens_match(pattern, name, &tokens),
            Extractor::Re(f) => f(name),
        };
        if let Some(f) = found {
            tags.push(Tag {
                name: tag,
                value: name[f.value].to_string(),
            });
            removed.push(f.remove);
        }
    }
    let name = name
        .char_indices()
        .filter(|(i, _)| !removed.iter().any(|r| r.contains(i)))
        .map(|(_, c)| c)
        .collect();
    Extracted { name, tags }
}

// === token patterns ===

/// Envoy's token matching (`TagExtractorTokensImpl`): the `$` token is the value; the removed
/// characters are the token and the dot after it, or the dot before it when it is last.
fn tokens_match(pattern: &str, name: &str, input: &[&str]) -> Option<Found> {
    let pat: Vec<&str> = pattern.split('.').collect();
    let at = pat.iter().position(|t| *t == "$")?;
    let (start, idx) = search(&pat, at, input, 0, 0, 0)?;
    let len = input[idx].len();
    // The dot after the token, or before it when it is the last one.
    let remove = if idx + 1 < input.len() {
        start..start + len + 1
    } else {
        start.saturating_sub(1)..start + len
    };
    debug_assert!(remove.end <= name.len());
    Some(Found {
        value: start..start + len,
        remove,
    })
}

/// Match `pat[p..]` against `input[i..]` (`c`: the byte offset of `input[i]`); returns the
/// offset and index of the token under `$`.
fn search(
    pat: &[&str],
    at: usize,
    input: &[&str],
    mut i: usize,
    mut p: usize,
    mut c: usize,
) -> Option<(usize, usize)> {
    let mut hit = None;
    while i < input.len() && p < pat.len() {
        if p == at {
            hit = Some((c, i));
            c += input[i].len() + 1;
        } else if pat[p] == "**" {
            if p == pat.len() - 1 {
                // A trailing `**` takes every remaining token (at least one: it was reached).
                return hit;
            }
            // `**` inside the pattern: the rest must match from some later token.
            for j in i..input.len() {
                if let Some(h) = search(pat, at, input, j, p + 1, c) {
                    return Some(h);
                }
                c += input[j].len() + 1;
            }
            return None;
        } else {
            if pat[p] != "*" && pat[p] != input[i] {
                return None;
            }
            c += input[i].len() + 1;
        }
        i += 1;
        p += 1;
    }
    (p == pat.len() && i == input.len())
        .then_some(hit)
        .flatten()
}

// === regular expressions ===

/// `\w` of RE2: ASCII letters, digits, underscore.
fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// `_rq(_(\d{3}))$`
fn response_code(name: &str) -> Option<Found> {
    let b = name.as_bytes();
    let n = b.len();
    (n >= 7 && name[..n - 3].ends_with("_rq_") && b[n - 3..].iter().all(u8::is_ascii_digit)).then(
        || Found {
            value: n - 3..n,
            remove: n - 4..n,
        },
    )
}

/// `_rq_((\d))xx$`
fn response_code_class(name: &str) -> Option<Found> {
    let b = name.as_bytes();
    let n = b.len();
    (n >= 7 && name.ends_with("xx") && name[..n - 3].ends_with("_rq_") && b[n - 3].is_ascii_digit())
        .then(|| Found {
            value: n - 3..n - 2,
            remove: n - 3..n - 2,
        })
}

/// `(?:\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[[a-fA-F_\d]+\])_\d+` at the start of `s`: the
/// length matched (Envoy's listener address with its port, `127.0.0.1_15001`, `[__1]_15001`).
fn address_len(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let digits = |from: usize, max: usize| {
        b[from..]
            .iter()
            .take(max)
            .take_while(|c| c.is_ascii_digit())
            .count()
    };
    let mut i;
    if b.first() == Some(&b'[') {
        let inner = b[1..]
            .iter()
            .take_while(|c| c.is_ascii_hexdigit() || **c == b'_')
            .count();
        if inner == 0 || b.get(1 + inner) != Some(&b']') {
            return None;
        }
        i = inner + 2;
    } else {
        i = 0;
        for octet in 0..4 {
            let d = digits(i, 3);
            if d == 0 {
                return None;
            }
            i += d;
            if octet < 3 {
                if b.get(i) != Some(&b'.') {
                    return None;
                }
                i += 1;
            }
        }
    }
    if b.get(i) != Some(&b'_') {
        return None;
    }
    let port = digits(i + 1, usize::MAX);
    (port > 0).then_some(i + 1 + port)
}

/// `^listener\.((<ADDRESS>|[^.]+)\.)`, except the value `admin`.
fn listener_address(name: &str) -> Option<Found> {
    let rest = name.strip_prefix("listener.")?;
    let start = "listener.".len();
    let len = match address_len(rest) {
        Some(n) if rest.as_bytes().get(n) == Some(&b'.') => n,
        _ => rest.find('.').filter(|n| *n > 0)?,
    };
    if &rest[..len] == "admin" {
        return None;
    }
    Some(Found {
        value: start..start + len,
        remove: start..start + len + 1,
    })
}

/// `^(?:listener\.(?:<ADDRESS>|[^.]+)\.|server\.|listener_manager\.)worker_((\d+)\.)`
fn worker_id(name: &str) -> Option<Found> {
    let after = if let Some(r) = name.strip_prefix("server.") {
        r
    } else if let Some(r) = name.strip_prefix("listener_manager.") {
        r
    } else {
        let rest = name.strip_prefix("listener.")?;
        let len = match address_len(rest) {
            Some(n) if rest.as_bytes().get(n) == Some(&b'.') => n,
            _ => rest.find('.').filter(|n| *n > 0)?,
        };
        &rest[len + 1..]
    };
    let digits_at = name.len() - after.len() + "worker_".len();
    let tail = after.strip_prefix("worker_")?;
    let d = tail.bytes().take_while(u8::is_ascii_digit).count();
    (d > 0 && tail.as_bytes().get(d) == Some(&b'.')).then(|| Found {
        value: digits_at..digits_at + d,
        remove: digits_at..digits_at + d + 1,
    })
}

/// `^listener\..*?\.http\.(([^.]+)\.)`: the first `.http.<prefix>.` after `listener.`.
fn listener_http_prefix(name: &str) -> Option<Found> {
    name.strip_prefix("listener.")?;
    let mut from = "listener.".len();
    while let Some(off) = name[from..].find(".http.") {
        let v = from + off + ".http.".len();
        if let Some(len) = name[v..].find('.').filter(|n| *n > 0) {
            return Some(Found {
                value: v..v + len,
                remove: v..v + len + 1,
            });
        }
        from += off + 1;
    }
    None
}

/// The `(\.(<value>))$` tail shared by the TLS extractors: `name` ends with
/// `<keyword>.<value>`, the keyword starting at or after `min`; `ok` checks the value.
fn tls_tail(name: &str, keyword: &str, min: usize, ok: fn(&str) -> bool) -> Option<Found> {
    let at = name.rfind(keyword)?;
    let v = at + keyword.len();
    (at >= min && ok(&name[v..])).then(|| Found {
        value: v..name.len(),
        remove: v - 1..name.len(),
    })
}

/// `[\w-]+`
fn is_cipher(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| is_word(b) || b == b'-')
}

/// `TLSv\d\.\d`
fn is_tls_version(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 7
        && s.starts_with("TLSv")
        && b[4].is_ascii_digit()
        && b[5] == b'.'
        && b[6].is_ascii_digit()
}

/// Length of `listener.` or `cluster.` at the start of `name`.
fn listener_or_cluster(name: &str) -> Option<usize> {
    if name.starts_with("listener.") {
        Some("listener.".len())
    } else if name.starts_with("cluster.") {
        Some("cluster.".len())
    } else {
        None
    }
}

/// `^listener\..*?\.ssl\.ciphers(\.([\w-]+))$`
fn ssl_cipher(name: &str) -> Option<Found> {
    name.starts_with("listener.")
        .then(|| tls_tail(name, ".ssl.ciphers.", "listener.".len(), is_cipher))
        .flatten()
}

/// `^(?:listener|cluster)\..*?\.ssl\.curves(\.([\w-]+))$`
fn ssl_curve(name: &str) -> Option<Found> {
    tls_tail(name, ".ssl.curves.", listener_or_cluster(name)?, is_cipher)
}

/// `^(?:listener|cluster)\..*?\.ssl\.sigalgs(\.([\w-]+))$`
fn ssl_sigalg(name: &str) -> Option<Found> {
    tls_tail(name, ".ssl.sigalgs.", listener_or_cluster(name)?, is_cipher)
}

/// `^(?:listener|cluster)\..*?\.ssl\.versions(\.(TLSv\d\.\d))$`
fn ssl_version(name: &str) -> Option<Found> {
    tls_tail(
        name,
        ".ssl.versions.",
        listener_or_cluster(name)?,
        is_tls_version,
    )
}

/// `^cluster\.[^.]+\.ssl\.ciphers(\.([\w-]+))$`
fn ssl_cipher_suite(name: &str) -> Option<Found> {
    let rest = name.strip_prefix("cluster.")?;
    let dot = rest.find('.').filter(|n| *n > 0)?;
    let f = tls_tail(name, ".ssl.ciphers.", "cluster.".len(), is_cipher)?;
    (f.remove.start == "cluster.".len() + dot + ".ssl.ciphers".len()).then_some(f)
}

/// `^http\.[^.]+\.rds\.(([\w\-.]+)\.)\w+?$`: the route configuration name may hold dots; the
/// base stat after it may not.
fn rds_route_config(name: &str) -> Option<Found> {
    let rest = name.strip_prefix("http.")?;
    let dot = rest.find('.').filter(|n| *n > 0)?;
    let after = rest[dot..].strip_prefix(".rds.")?;
    let v = name.len() - after.len();
    let (route, base) = after.rsplit_once('.')?;
    let ok = !route.is_empty()
        && route.bytes().all(|b| is_word(b) || b == b'-' || b == b'.')
        && !base.is_empty()
        && base.bytes().all(is_word);
    ok.then(|| Found {
        value: v..v + route.len(),
        remove: v..v + route.len() + 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(name: &str) -> (String, Vec<(&'static str, String)>) {
        let e = extract(name);
        (
            e.name,
            e.tags.into_iter().map(|t| (t.name, t.value)).collect(),
        )
    }

    fn t(pairs: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
        pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
    }

    #[test]
    fn cluster_stats_lose_the_cluster_name_and_response_codes() {
        assert_eq!(
            tags("cluster.backend.upstream_rq_200"),
            (
                "cluster.upstream_rq".into(),
                t(&[
                    ("envoy.response_code", "200"),
                    ("envoy.cluster_name", "backend")
                ])
            )
        );
        assert_eq!(
            tags("cluster.backend.upstream_rq_5xx"),
            (
                "cluster.upstream_rq_xx".into(),
                t(&[
                    ("envoy.response_code_class", "5"),
                    ("envoy.cluster_name", "backend")
                ])
            )
        );
        assert_eq!(
            tags("cluster.backend.outlier_detection.ejections_active"),
            (
                "cluster.outlier_detection.ejections_active".into(),
                t(&[("envoy.cluster_name", "backend")])
            )
        );
        assert_eq!(
            tags("cluster.backend.upstream_rq_total").0,
            "cluster.upstream_rq_total"
        );
    }

    #[test]
    fn a_dotted_cluster_name_is_cut_at_its_first_dot_as_envoy_does() {
        // Envoy 1.40 exports `outbound|80||a.b.svc.cluster.local` this way too.
        assert_eq!(
            tags("cluster.outbound|80||a.b.svc.cluster.local.upstream_cx_total"),
            (
                "cluster.b.svc.cluster.local.upstream_cx_total".into(),
                t(&[("envoy.cluster_name", "outbound|80||a")])
            )
        );
    }

    #[test]
    fn listener_and_http_stats() {
        assert_eq!(
            tags("listener.127.0.0.1_15001.downstream_cx_total"),
            (
                "listener.downstream_cx_total".into(),
                t(&[("envoy.listener_address", "127.0.0.1_15001")])
            )
        );
        assert_eq!(
            tags("listener.[__1]_15001.downstream_cx_active").1,
            t(&[("envoy.listener_address", "[__1]_15001")])
        );
        assert_eq!(
            tags("listener.admin.downstream_cx_total"),
            ("listener.admin.downstream_cx_total".into(), vec![])
        );
        assert_eq!(
            tags("listener.127.0.0.1_80.http.ingress.downstream_rq_2xx"),
            (
                "listener.http.downstream_rq_xx".into(),
                t(&[
                    ("envoy.response_code_class", "2"),
                    ("envoy.http_conn_manager_prefix", "ingress"),
                    ("envoy.listener_address", "127.0.0.1_80"),
                ])
            )
        );
        assert_eq!(
            tags("http.ingress_http.downstream_rq_total"),
            (
                "http.downstream_rq_total".into(),
                t(&[("envoy.http_conn_manager_prefix", "ingress_http")])
            )
        );
        assert_eq!(
            tags("listener_manager.worker_3.downstream_cx_total"),
            (
                "listener_manager.worker_downstream_cx_total".into(),
                t(&[("envoy.worker_id", "3")])
            )
        );
    }

    #[test]
    fn rds_vhost_tcp_and_fault_stats() {
        assert_eq!(
            tags("http.ingress.rds.route.v1.update_success"),
            (
                "http.rds.update_success".into(),
                t(&[
                    ("envoy.http_conn_manager_prefix", "ingress"),
                    ("envoy.rds_route_config", "route.v1"),
                ])
            )
        );
        assert_eq!(
            tags("vhost.vh.vcluster.other.upstream_rq_504"),
            (
                "vhost.vcluster.upstream_rq".into(),
                t(&[
                    ("envoy.response_code", "504"),
                    ("envoy.virtual_cluster", "other"),
                    ("envoy.virtual_host", "vh"),
                ])
            )
        );
        assert_eq!(
            tags("tcp.inbound_9080.downstream_cx_total"),
            (
                "tcp.downstream_cx_total".into(),
                t(&[("envoy.tcp_prefix", "inbound_9080")])
            )
        );
        // No downstream cluster between `fault.` and the stat: no fault tag.
        assert_eq!(
            tags("http.p.fault.delays_injected"),
            (
                "http.fault.delays_injected".into(),
                t(&[("envoy.http_conn_manager_prefix", "p")])
            )
        );
        assert_eq!(
            tags("http.p.fault.dc.aborts_injected").1,
            t(&[
                ("envoy.fault_downstream_cluster", "dc"),
                ("envoy.http_conn_manager_prefix", "p"),
            ])
        );
    }

    #[test]
    fn tls_stats() {
        assert_eq!(
            tags("listener.127.0.0.1_443.ssl.ciphers.ECDHE-RSA-AES128-GCM-SHA256"),
            (
                "listener.ssl.ciphers".into(),
                t(&[
                    ("envoy.ssl_cipher", "ECDHE-RSA-AES128-GCM-SHA256"),
                    ("envoy.listener_address", "127.0.0.1_443"),
                ])
            )
        );
        assert_eq!(
            tags("cluster.c.ssl.versions.TLSv1.3"),
            (
                "cluster.ssl.versions".into(),
                t(&[
                    ("envoy.ssl_version", "TLSv1.3"),
                    ("envoy.cluster_name", "c")
                ])
            )
        );
        assert_eq!(
            tags("cluster.c.ssl.ciphers.TLS_AES_128_GCM_SHA256").1,
            t(&[
                ("envoy.ssl_cipher_suite", "TLS_AES_128_GCM_SHA256"),
                ("envoy.cluster_name", "c"),
            ])
        );
    }

    #[test]
    fn names_seen_in_envoy_1_40_s_own_scrape() {
        // Envoy 1.40.0 exported these as
        // `envoy_cluster_b_svc_cluster_local_external_upstream_rq{envoy_response_code="200",
        // envoy_cluster_name="outbound|80||a"}` and `envoy_listener_admin_http_downstream_rq_xx
        // {envoy_response_code_class="2",envoy_http_conn_manager_prefix="admin"}`.
        assert_eq!(
            tags("cluster.outbound|80||a.b.svc.cluster.local.external.upstream_rq_200"),
            (
                "cluster.b.svc.cluster.local.external.upstream_rq".into(),
                t(&[
                    ("envoy.response_code", "200"),
                    ("envoy.cluster_name", "outbound|80||a")
                ])
            )
        );
        assert_eq!(
            tags("listener.admin.http.admin.downstream_rq_2xx"),
            (
                "listener.admin.http.downstream_rq_xx".into(),
                t(&[
                    ("envoy.response_code_class", "2"),
                    ("envoy.http_conn_manager_prefix", "admin")
                ])
            )
        );
        // An HCM prefix with dots (Istio's `outbound_0.0.0.0_50002`): Envoy 1.40 exported
        // `envoy_http_0_0_0_50002_rds_50002_update_success{envoy_http_conn_manager_prefix=
        // "outbound_0"}`.
        assert_eq!(
            tags("http.outbound_0.0.0.0_50002.rds.50002.update_success"),
            (
                "http.0.0.0_50002.rds.50002.update_success".into(),
                t(&[("envoy.http_conn_manager_prefix", "outbound_0")])
            )
        );
    }

    #[test]
    fn names_without_tags_stay_whole() {
        for n in [
            "cluster_manager.cds.update_success",
            "listener_manager.lds.update_rejected",
            "control_plane.connected_state",
            "skiff.response_flags.UH",
            "server.uptime",
        ] {
            assert_eq!(tags(n), (n.to_string(), vec![]));
        }
    }
}
