//! The data plane's counters, named in this one place. Listener counters are resolved once
//! when a listener starts; cluster counters are looked up by name per connection here, and
//! only here, so handles resolved when a snapshot is built can replace [`ClusterCounters`]'
//! lookups without touching the pipeline.

use std::sync::Arc;

use super::error::{ConnError, ResponseFlag};
use crate::stats::{Counter, Gauge, Stats};

/// Envoy's `cluster.<name>.*` stats one tcp_proxy connection updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cx {
    /// `upstream_cx_total`: connect attempts.
    Total,
    /// `upstream_cx_connect_fail`.
    ConnectFail,
    /// `upstream_cx_connect_timeout`.
    ConnectTimeout,
    /// `upstream_cx_none_healthy`: no host to connect to.
    NoneHealthy,
    /// `upstream_cx_tx_bytes_total`.
    TxBytes,
    /// `upstream_cx_rx_bytes_total`.
    RxBytes,
}

impl Cx {
    fn name(self) -> &'static str {
        match self {
            Cx::Total => "upstream_cx_total",
            Cx::ConnectFail => "upstream_cx_connect_fail",
            Cx::ConnectTimeout => "upstream_cx_connect_timeout",
            Cx::NoneHealthy => "upstream_cx_none_healthy",
            Cx::TxBytes => "upstream_cx_tx_bytes_total",
            Cx::RxBytes => "upstream_cx_rx_bytes_total",
        }
    }
}

/// The counters of one cluster (or passthrough name) for one connection.
pub(super) struct ClusterCounters<'a> {
    stats: &'a Stats,
    cluster: &'a str,
}

impl<'a> ClusterCounters<'a> {
    /// Counters of `cluster` in `stats`.
    pub(super) fn new(stats: &'a Stats, cluster: &'a str) -> Self {
        ClusterCounters { stats, cluster }
    }

    /// One counter.
    pub(super) fn counter(&self, c: Cx) -> Arc<Counter> {
        self.stats
            .counter(&format!("cluster.{}.{}", self.cluster, c.name()))
    }

    /// Add one to a counter.
    pub(super) fn inc(&self, c: Cx) {
        self.counter(c).inc();
    }

    /// `upstream_cx_active`.
    pub(super) fn active(&self) -> Arc<Gauge> {
        self.stats
            .gauge(&format!("cluster.{}.upstream_cx_active", self.cluster))
    }
}

/// Counters of one listener, resolved when it starts accepting.
#[derive(Debug)]
pub(super) struct ListenerCounters {
    /// `<listener>.downstream_cx_total`.
    pub(super) total: Arc<Counter>,
    /// `<listener>.downstream_cx_active`.
    pub(super) active: Arc<Gauge>,
    /// `<listener>.no_filter_chain_match` (Envoy's).
    no_filter_chain_match: Arc<Counter>,
    /// `skiff.downstream_cx_rejected`: closed because selection chose no upstream, on any
    /// listener.
    rejected: Arc<Counter>,
    /// `skiff.response_flags.<FLAG>`: failed connections by Envoy response flag.
    flags: Vec<(ResponseFlag, Arc<Counter>)>,
}

impl ListenerCounters {
    /// Counters of the listener whose stats start with `prefix` (`listener.<name or addr>`).
    pub(super) fn new(stats: &Stats, prefix: &str) -> Self {
        ListenerCounters {
            total: stats.counter(&format!("{prefix}.downstream_cx_total")),
            active: stats.gauge(&format!("{prefix}.downstream_cx_active")),
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

    /// Count a connection that failed with `e` (a cluster without a host to connect to also
    /// counts its `upstream_cx_none_healthy`, as Envoy's tcp_proxy does).
    pub(super) fn failed(&self, stats: &Stats, e: &ConnError) {
        if let ConnError::NoHealthyUpstream { cluster }
        | ConnError::NoOriginalDst { cluster }
        | ConnError::Unresolved { cluster, .. } = e
        {
            ClusterCounters::new(stats, cluster).inc(Cx::NoneHealthy);
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
