//! The data plane's counters, named in this one place. Listener counters are resolved once
//! when a listener starts; a connection's cluster counters are the `ClusterStats` handles its
//! snapshot resolved (`ClusterEntry::stats`, `Snapshot::cluster_stats` for passthrough), so the
//! per-connection path formats no stat name.

use std::sync::Arc;

use super::error::{ConnError, ResponseFlag};
use crate::stats::{Counter, Gauge, Histogram, Stats};

/// Counters of one listener, resolved when it starts accepting.
#[derive(Debug)]
pub(super) struct ListenerCounters {
    /// `<listener>.downstream_cx_total`.
    pub(super) total: Arc<Counter>,
    /// `<listener>.downstream_cx_active`.
    pub(super) active: Arc<Gauge>,
    /// `<listener>.downstream_cx_length_ms`.
    length: Arc<Histogram>,
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

    /// Count an accepted connection; the guard marks it closed (`downstream_cx_active`,
    /// `downstream_cx_length_ms`) when dropped.
    pub(super) fn open(&self) -> Open {
        self.total.inc();
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
