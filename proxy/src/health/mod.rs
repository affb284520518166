//! Health of upstream hosts over time: active health checks (TCP and HTTP `health_checks`)
//! and the outlier-detection interval, one task per cluster that needs them.
//!
//! [`run`] watches the store: when a snapshot adds a cluster with `health_checks` or
//! `outlier_detection` it starts that cluster's tasks, and it stops them when the cluster goes
//! away or its settings change. Each round reads the cluster's hosts from the current snapshot,
//! so hosts come and go with EDS; results land in the hosts' live state (kept across
//! snapshots by `lb::HostRegistry`), and every change bumps the health generation the balancer
//! and the BPF reconciler watch. Checks connect with the proxy's SO_MARK, so the capture
//! programs never redirect them. A host the cluster dials with TLS (its transport socket
//! match, or the check's `transport_socket_match_criteria`) is checked over TLS built by
//! `TlsContexts::client` on the round's snapshot secrets, as the data path dials it.

pub mod check;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::http::upstream_tls::{self, TlsFailure};
use crate::lb::host::flag;
use crate::model::cluster::lb::{HealthCheck, OutlierDetection};
use crate::model::tls::UpstreamTls;
use crate::state::{ClusterEntry, Store};
use crate::stats::Stats;
use crate::tls::TlsContexts;

/// Settings one cluster's tasks were started with (a change restarts them).
#[derive(Debug, Clone, PartialEq)]
struct Wanted {
    check: Option<HealthCheck>,
    outlier: Option<OutlierDetection>,
}

struct Running {
    wanted: Wanted,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Run health checking and outlier intervals for every cluster of `store` until `stop`.
/// `mark` is the proxy's SO_MARK for check connections.
pub async fn run(store: Arc<Store>, mark: Option<u32>, stop: CancellationToken) {
    let mut changed = store.subscribe();
    let mut running: HashMap<String, Running> = HashMap::new();
    // The checks' own cache of TLS configurations (built as the data path builds them).
    let tls = Arc::new(TlsContexts::new());
    loop {
        let snap = store.load();
        let mut wanted: HashMap<String, Wanted> = HashMap::new();
        for (name, entry) in &snap.clusters {
            let w = Wanted {
                check: entry.cluster.lb.health_checks.first().cloned(),
                outlier: entry.cluster.lb.outlier.clone(),
            };
            if w.check.is_some() || w.outlier.is_some() {
                wanted.insert(name.clone(), w);
            }
        }
        drop(snap);
        running.retain(|name, r| wanted.get(name) == Some(&r.wanted));
        for (name, w) in wanted {
            if running.contains_key(&name) {
                continue;
            }
            let mut tasks = Vec::new();
            if let Some(hc) = &w.check {
                info!(cluster = %name, interval_ms = hc.interval.as_millis() as u64, "active health checking");
                tasks.push(tokio::spawn(check_loop(
                    store.clone(),
                    name.clone(),
                    hc.clone(),
                    mark,
                    tls.clone(),
                )));
            }
            if let Some(od) = &w.outlier {
                tasks.push(tokio::spawn(outlier_loop(
                    store.clone(),
                    name.clone(),
                    od.interval,
                )));
            }
            running.insert(name, Running { wanted: w, tasks });
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            r = changed.changed() => if r.is_err() { return },
        }
    }
}

/// A random duration in `[0, max)` (zero when `max` is zero): jitter keeps the checks of many
/// proxies from arriving in step.
fn random_below(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    max.mul_f64(fastrand::f64())
}

async fn outlier_loop(store: Arc<Store>, cluster: String, interval: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    loop {
        tick.tick().await;
        let snap = store.load();
        let Some(entry) = snap.cluster(&cluster) else {
            return;
        };
        entry
            .lb
            .shared
            .outlier_tick(&entry.lb.hosts, tokio::time::Instant::now());
    }
}

/// Consecutive results of one host under one checker.
#[derive(Debug, Default, Clone, Copy)]
struct Streak {
    successes: u32,
    failures: u32,
}

/// The TLS a check of `addr` dials with (`None`: plaintext): the check's
/// `transport_socket_match_criteria` in place of the endpoint's metadata when set, with its
/// `tls_options.alpn_protocols` when given. A context that cannot be built counts in the
/// cluster's `ssl.connection_error`, as a failed handshake would.
fn check_tls(
    hc: &HealthCheck,
    entry: &ClusterEntry,
    addr: SocketAddr,
    contexts: &TlsContexts,
    secrets: &crate::model::tls::Secrets,
    stats: &Arc<Stats>,
) -> Option<Result<check::TlsCheck, TlsFailure>> {
    let tls = match &hc.transport_match {
        Some(criteria) => entry.cluster.transport.for_endpoint(criteria),
        None => upstream_tls::endpoint_tls(entry, addr),
    }?;
    let cluster = entry.cluster.name.as_str();
    let built = if hc.tls_alpn.is_empty() {
        upstream_tls::client_config(contexts, stats, cluster, tls, secrets, addr)
    } else {
        let mut t = UpstreamTls::clone(tls);
        t.common.alpn = hc.tls_alpn.clone();
        upstream_tls::client_config(contexts, stats, cluster, &t, secrets, addr)
    };
    Some(built.map(|tls| check::TlsCheck {
        tls,
        stats: stats.clone(),
        cluster: Arc::from(cluster),
    }))
}

async fn check_loop(
    store: Arc<Store>,
    cluster: String,
    hc: HealthCheck,
    mark: Option<u32>,
    contexts: Arc<TlsContexts>,
) {
    let mut streaks: HashMap<SocketAddr, Streak> = HashMap::new();
    tokio::time::sleep(random_below(hc.initial_jitter)).await;
    loop {
        let snap = store.load();
        let Some(entry) = snap.cluster(&cluster) else {
            return;
        };
        let hosts = entry.lb.hosts.clone();
        let shared = entry.lb.shared.clone();
        let stats = store.registry().stats();
        let tls: Vec<_> = hosts
            .iter()
            .map(|h| check_tls(&hc, entry, h.address(), &contexts, &snap.secrets, stats))
            .collect();
        drop(snap);
        let stats = &shared.stats.health_check;
        let mut set = tokio::task::JoinSet::new();
        for (h, tls) in hosts.iter().zip(tls) {
            let target = match hc.alt_port {
                Some(p) => SocketAddr::new(h.address().ip(), p),
                None => h.address(),
            };
            let hc = hc.clone();
            set.spawn(async move {
                let v = match tls {
                    None => check::run(&hc, target, mark, None).await,
                    Some(Ok(tls)) => check::run(&hc, target, mark, Some(&tls)).await,
                    Some(Err(e)) => check::Verdict::Unhealthy(check::CheckError::Tls(e)),
                };
                (target, v)
            });
        }
        let mut results: HashMap<SocketAddr, check::Verdict> = HashMap::new();
        while let Some(r) = set.join_next().await {
            if let Ok((target, v)) = r {
                results.insert(target, v);
            }
        }
        let mut changed = false;
        for h in &hosts {
            let target = match hc.alt_port {
                Some(p) => SocketAddr::new(h.address().ip(), p),
                None => h.address(),
            };
            let Some(v) = results.get(&target) else {
                continue;
            };
            stats.attempt.inc();
            let s = streaks.entry(h.address()).or_default();
            let st = h.state();
            let pending = st.flags() & flag::PENDING_ACTIVE_HC != 0;
            match v {
                check::Verdict::Healthy => {
                    stats.success.inc();
                    s.successes += 1;
                    s.failures = 0;
                    // A host never checked before is healthy after its first pass (Envoy);
                    // a failed one needs `healthy_threshold` passes in a row.
                    if st.flags() & flag::FAILED_ACTIVE_HC != 0
                        && (pending || s.successes >= hc.healthy_threshold)
                    {
                        changed |= h.clear_health_flags(
                            flag::FAILED_ACTIVE_HC
                                | flag::PENDING_ACTIVE_HC
                                | flag::ACTIVE_HC_TIMEOUT,
                        );
                        debug!(%cluster, host = %h.address(), "active health check passed");
                    } else if pending {
                        changed |= h.clear_health_flags(flag::PENDING_ACTIVE_HC);
                    }
                }
                check::Verdict::Unhealthy(reason) => {
                    stats.failure.inc();
                    if reason.is_timeout() {
                        stats.network_failure.inc();
                    }
                    s.failures += 1;
                    s.successes = 0;
                    if pending {
                        changed |= h.clear_health_flags(flag::PENDING_ACTIVE_HC);
                    }
                    if s.failures >= hc.unhealthy_threshold
                        && st.flags() & flag::FAILED_ACTIVE_HC == 0
                    {
                        changed |= h.set_health_flags(flag::FAILED_ACTIVE_HC);
                        info!(%cluster, host = %h.address(), %reason, "active health check failed");
                    }
                }
            }
        }
        let healthy = hosts
            .iter()
            .filter(|h| h.flags() & flag::FAILED_ACTIVE_HC == 0)
            .count() as u64;
        stats.healthy.set(healthy);
        streaks.retain(|a, _| hosts.iter().any(|h| h.address() == *a));
        if changed {
            shared.health_changed();
        }
        // Envoy checks an idle cluster at `no_traffic_interval` until it carries traffic.
        let busy = hosts.iter().any(|h| h.state().has_carried_traffic());
        let wait = if busy {
            hc.interval
        } else {
            hc.no_traffic_interval
        };
        tokio::time::sleep(wait + random_below(hc.interval_jitter)).await;
    }
}
