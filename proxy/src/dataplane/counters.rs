//! The data plane's counters, named in this one place. Listener counters are resolved once
//! when a listener starts; a connection's cluster counters are the `ClusterStats` handles its
//! snapshot resolved (`ClusterEntry::stats`, `Snapshot::cluster_stats` for passthrough), so the
//! per-connection path formats no stat name.

use std::sync::{Arc, OnceLock};

use super::error::{ConnError, ResponseFlag};
use crate::stats::{Counter, Gauge, Histogram, Stats};

/// Counters of one listener, resolved when it starts accepting.
#[derive(Debug)]
pub(super) struct ListenerCounters {
    /// `<listener>.downstream_cx_total`.
    pub(super) total: Arc<Counter>,
    /// `<listener>.downstream_cx_active`.
    pub(super) active: Arc<Gauge>,
    /// `<listener>.worker_<i>.downstream_cx_total` (Envoy's per-worker counter), when the
    /// listener runs on one of `skiff run`'s workers.
    worker_total: Option<Arc<Counter>>,
    /// `<listener>.downstream_cx_length_ms`.
    length: Arc<Histogram>,
    /// `<listener>.no_filter_chain_match` (Envoy's).
    no_filter_chain_match: Arc<Counter>,
    /// `<listener>.downstream_pre_cx_timeout`: closed because the listener filters did not
    /// decide in time.
    pub(super) pre_cx_timeout: Arc<Counter>,
    /// `tls_inspector.*`, resolved when this listener first inspects a connection (Envoy
    /// lists them only where the filter runs).
    tls_inspector: OnceLock<TlsInspectorCounters>,
    /// `<listener>.ssl.handshake`, resolved at the listener's first TLS handshake (failures
    /// are rare: their names are formatted when they happen).
    ssl_handshake: OnceLock<Arc<Counter>>,
    /// `<listener>.ssl.session_reused`, resolved at the first resumed session.
    ssl_session_reused: OnceLock<Arc<Counter>>,
    prefix: String,
    stats: Arc<Stats>,
    /// `skiff.downstream_cx_rejected`: closed because selection chose no upstream, on any
    /// listener.
    rejected: Arc<Counter>,
    /// `skiff.response_flags.<FLAG>`: failed connections by Envoy response flag.
    flags: Vec<(ResponseFlag, Arc<Counter>)>,
}

impl ListenerCounters {
    /// Counters of the listener whose stats start with `prefix` (`listener.<name or addr>`).
    pub(super) fn new(stats: &Arc<Stats>, prefix: &str) -> Self {
        ListenerCounters {
            pre_cx_timeout: stats.counter(&format!("{prefix}.downstream_pre_cx_timeout")),
            tls_inspector: OnceLock::new(),
            ssl_handshake: OnceLock::new(),
            ssl_session_reused: OnceLock::new(),
            prefix: prefix.to_string(),
            stats: stats.clone(),
            total: stats.counter(&format!("{prefix}.downstream_cx_total")),
            worker_total: None,
            active: stats.gauge(&format!("{prefix}.downstream_cx_active")),
            length: stats.histogram(&format!("{prefix}.downstream_cx_length_ms")),
            no_filter_chain_match: stats.counter(&format!("{prefix}.no_filter_chain_match")),
            rejected: stats.counter("skiff.downstream_cx_rejected"),
            flags: ResponseFlag::ALL
                .iter()
                .map(|f| {
                    let name = format!("skiff.response_flags.{}", f.as_str());
                    (*f, stats.counter(&name))
                })
                .collect(),
        }
    }

    /// These counters, also counting connections under the worker `worker`.
    pub(super) fn for_worker(mut self, worker: usize) -> Self {
        let name = format!("{}.worker_{worker}.downstream_cx_total", self.prefix);
        self.worker_total = Some(self.stats.counter(&name));
        self
    }

    /// Where the listener's stats live: Envoy's `listener.<address>`.
    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Count a downstream TLS handshake that succeeded, whether it resumed a session, and
    /// what it negotiated (`negotiated`: `versions.TLSv1.3`, ... under `ssl.`).
    pub(super) fn ssl_handshake(&self, resumed: bool, negotiated: Vec<String>) {
        for s in negotiated {
            self.stats
                .counter(&format!("{}.ssl.{s}", self.prefix))
                .inc();
        }
        let named = |cell: &OnceLock<Arc<Counter>>, name: &str| {
            cell.get_or_init(|| self.stats.counter(&format!("{}.ssl.{name}", self.prefix)))
                .inc();
        };
        named(&self.ssl_handshake, "handshake");
        if resumed {
            named(&self.ssl_session_reused, "session_reused");
        }
    }

    /// The tls_inspector's counters.
    pub(super) fn tls_inspector(&self) -> &TlsInspectorCounters {
        self.tls_inspector
            .get_or_init(|| TlsInspectorCounters::new(&self.stats))
    }

    /// Count an accepted connection; the guard marks it closed (`downstream_cx_active`,
    /// `downstream_cx_length_ms`) when dropped.
    pub(super) fn open(&self) -> Open {
        self.total.inc();
        if let Some(w) = &self.worker_total {
            w.inc();
        }
        self.active.inc();
        Open {
            active: self.active.clone(),
            length: self.length.clone(),
            since: tokio::time::Instant::now(),
        }
    }

    /// Count a connection that failed with `e` (a cluster without a host to connect to also
    /// counts its `upstream_cx_none_healthy`, as Envoy's tcp_proxy does).
    pub(super) fn failed(&self, stats: &Stats, e: &ConnError) {
        if let ConnError::NoHealthyUpstream { cluster }
        | ConnError::NoOriginalDst { cluster }
        | ConnError::Unresolved { cluster, .. } = e
        {
            // Failure path only: the cluster's own handle is not at hand here.
            stats
                .counter(&format!("cluster.{cluster}.upstream_cx_none_healthy"))
                .inc();
        }
        if matches!(e, ConnError::NoFilterChain { .. }) {
            self.no_filter_chain_match.inc();
        }
        if matches!(
            e,
            ConnError::NoListener
                | ConnError::NoFilterChain { .. }
                | ConnError::Unsupported { .. }
                | ConnError::NoCluster { .. }
                | ConnError::NoHealthyUpstream { .. }
                | ConnError::NoOriginalDst { .. }
        ) {
            self.rejected.inc();
        }
        for f in e.flags() {
            if let Some((_, c)) = self.flags.iter().find(|(k, _)| k == f) {
                c.inc();
            }
        }
    }
}

/// Envoy's `tls_inspector.*` counters (one set per process, as Envoy's filter config scope).
#[derive(Debug)]
pub(super) struct TlsInspectorCounters {
    /// `tls_found`.
    pub(super) tls_found: Arc<Counter>,
    /// `tls_not_found`.
    pub(super) tls_not_found: Arc<Counter>,
    /// `client_hello_too_large`.
    pub(super) client_hello_too_large: Arc<Counter>,
    /// `sni_found`.
    pub(super) sni_found: Arc<Counter>,
    /// `sni_not_found`.
    pub(super) sni_not_found: Arc<Counter>,
    /// `alpn_found`.
    pub(super) alpn_found: Arc<Counter>,
    /// `alpn_not_found`.
    pub(super) alpn_not_found: Arc<Counter>,
}

impl TlsInspectorCounters {
    fn new(stats: &Stats) -> Self {
        let c = |n: &str| stats.counter(&format!("tls_inspector.{n}"));
        TlsInspectorCounters {
            tls_found: c("tls_found"),
            tls_not_found: c("tls_not_found"),
            client_hello_too_large: c("client_hello_too_large"),
            sni_found: c("sni_found"),
            sni_not_found: c("sni_not_found"),
            alpn_found: c("alpn_found"),
            alpn_not_found: c("alpn_not_found"),
        }
    }
}

/// One open downstream connection of a listener (see [`ListenerCounters::open`]).
#[derive(Debug)]
pub(super) struct Open {
    active: Arc<Gauge>,
    length: Arc<Histogram>,
    since: tokio::time::Instant,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.active.dec();
        self.length.record_duration(self.since.elapsed());
    }
}
