//! Circuit breakers: per cluster and routing priority, limits on connections, pending
//! requests, requests and retries. A `try_*` either returns a guard (the count goes down when
//! it drops) or [`Overflow`], which is counted in Envoy's overflow stat.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::model::cluster::lb::{CircuitBreakers, Thresholds};
use crate::stats::{ClusterStats, ScopedCounter};

/// Envoy's routing priority (`RoutingPriority`), which selects the thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RoutingPriority {
    /// DEFAULT.
    #[default]
    Default,
    /// HIGH.
    High,
}

/// Which limit a request or connection ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    /// `max_connections`.
    Connections,
    /// `max_pending_requests`.
    PendingRequests,
    /// `max_requests`.
    Requests,
    /// `max_retries` (or the retry budget).
    Retries,
}

impl Resource {
    /// The `cluster.<name>.` stat Envoy counts an overflow in.
    pub fn overflow_stat(self, s: &ClusterStats) -> &ScopedCounter {
        match self {
            Resource::Connections => &s.upstream_cx_overflow,
            // Envoy counts max_requests overflows as pending overflows too.
            Resource::PendingRequests | Resource::Requests => &s.upstream_rq_pending_overflow,
            Resource::Retries => &s.upstream_rq_retry_overflow,
        }
    }
}

/// A circuit breaker is open: the limit named is reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cluster {cluster}: circuit breaker {resource:?} open (limit {limit})")]
pub struct Overflow {
    /// Cluster.
    pub cluster: String,
    /// The limit.
    pub resource: Resource,
    /// Its value.
    pub limit: u64,
}

/// Counters of one routing priority.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub connections: AtomicU64,
    pub pending: AtomicU64,
    pub requests: AtomicU64,
    pub retries: AtomicU64,
}

/// Live circuit breaker counts of one cluster (kept across snapshots).
#[derive(Debug, Default)]
pub struct Breakers {
    pub(crate) default: Arc<Counts>,
    pub(crate) high: Arc<Counts>,
}

/// Holds one unit of a resource; releases it on drop.
#[derive(Debug)]
pub struct BreakerGuard {
    counts: Arc<Counts>,
    resource: Resource,
}

impl Drop for BreakerGuard {
    fn drop(&mut self) {
        counter(&self.counts, self.resource).fetch_sub(1, Ordering::AcqRel);
    }
}

fn counter(c: &Counts, r: Resource) -> &AtomicU64 {
    match r {
        Resource::Connections => &c.connections,
        Resource::PendingRequests => &c.pending,
        Resource::Requests => &c.requests,
        Resource::Retries => &c.retries,
    }
}

impl Breakers {
    fn counts(&self, p: RoutingPriority) -> &Arc<Counts> {
        match p {
            RoutingPriority::Default => &self.default,
            RoutingPriority::High => &self.high,
        }
    }

    /// Current count of `resource` at priority `p`.
    pub fn current(&self, p: RoutingPriority, resource: Resource) -> u64 {
        counter(self.counts(p), resource).load(Ordering::Acquire)
    }

    /// Take one unit of `resource` if below `limit`, else count the overflow.
    pub(crate) fn try_take(
        &self,
        cfg: &CircuitBreakers,
        p: RoutingPriority,
        resource: Resource,
        stats: &ClusterStats,
    ) -> Result<BreakerGuard, Overflow> {
        self.take(cfg, p, resource, stats, true)
    }

    /// As [`Breakers::try_take`], without counting an overflow: for a caller that waits and
    /// asks again (a pending request waiting for a connection slot), which counts once.
    pub fn try_take_quiet(
        &self,
        cfg: &CircuitBreakers,
        p: RoutingPriority,
        resource: Resource,
        stats: &ClusterStats,
    ) -> Result<BreakerGuard, Overflow> {
        self.take(cfg, p, resource, stats, false)
    }

    fn take(
        &self,
        cfg: &CircuitBreakers,
        p: RoutingPriority,
        resource: Resource,
        stats: &ClusterStats,
        count: bool,
    ) -> Result<BreakerGuard, Overflow> {
        let t: &Thresholds = match p {
            RoutingPriority::Default => &cfg.default,
            RoutingPriority::High => &cfg.high,
        };
        let counts = self.counts(p);
        let limit = match resource {
            Resource::Connections => t.max_connections,
            Resource::PendingRequests => t.max_pending_requests,
            Resource::Requests => t.max_requests,
            Resource::Retries => match t.retry_budget {
                // Envoy's retry budget: a share of the active requests, with a floor.
                Some((pct, min)) => {
                    let active = counts.requests.load(Ordering::Acquire)
                        + counts.pending.load(Ordering::Acquire);
                    ((active as f64 * pct / 100.0) as u64).max(min)
                }
                None => t.max_retries,
            },
        };
        let c = counter(counts, resource);
        let taken = c
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (v < limit).then_some(v + 1)
            })
            .is_ok();
        if taken {
            Ok(BreakerGuard {
                counts: counts.clone(),
                resource,
            })
        } else {
            if count {
                resource.overflow_stat(stats).inc();
            }
            Err(Overflow {
                cluster: stats.name().to_string(),
                resource,
                limit,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Stats;

    #[test]
    fn guard_releases_and_overflow_is_counted() {
        let b = Breakers::default();
        let mut cfg = CircuitBreakers::default();
        cfg.default.max_connections = 2;
        let stats = Stats::default();
        let cs = stats.cluster("c");
        let take = || b.try_take(&cfg, RoutingPriority::Default, Resource::Connections, &cs);
        let g1 = take().unwrap();
        let _g2 = take().unwrap();
        let e = take().unwrap_err();
        assert_eq!(e.resource, Resource::Connections);
        assert_eq!(stats.counter("cluster.c.upstream_cx_overflow").get(), 1);
        drop(g1);
        assert!(take().is_ok());
        // HIGH has its own counts and its defaults.
        assert!(
            b.try_take(&cfg, RoutingPriority::High, Resource::Connections, &cs)
                .is_ok()
        );
    }

    #[test]
    fn retry_budget_is_a_share_of_active_requests_with_a_floor() {
        let b = Breakers::default();
        let mut cfg = CircuitBreakers::default();
        cfg.default.retry_budget = Some((20.0, 3));
        let stats = Stats::default();
        let cs = stats.cluster("c");
        let p = RoutingPriority::Default;
        // 25 requests in flight: 20% = 5 retries (above the floor of 3).
        let rq: Vec<_> = (0..25)
            .map(|_| b.try_take(&cfg, p, Resource::Requests, &cs).unwrap())
            .collect();
        let r: Vec<_> = (0..5)
            .map(|_| b.try_take(&cfg, p, Resource::Retries, &cs).unwrap())
            .collect();
        assert!(b.try_take(&cfg, p, Resource::Retries, &cs).is_err());
        drop(r);
        drop(rq);
        // Nothing in flight: the floor still allows 3.
        let _r: Vec<_> = (0..3)
            .map(|_| b.try_take(&cfg, p, Resource::Retries, &cs).unwrap())
            .collect();
        assert!(b.try_take(&cfg, p, Resource::Retries, &cs).is_err());
        assert_eq!(
            stats.counter("cluster.c.upstream_rq_retry_overflow").get(),
            2
        );
    }

    #[test]
    fn high_priority_has_its_own_thresholds_and_quiet_takes_count_nothing() {
        let b = Breakers::default();
        let mut cfg = CircuitBreakers::default();
        cfg.default.max_pending_requests = 1;
        cfg.high.max_pending_requests = 2;
        let stats = Stats::default();
        let cs = stats.cluster("c");
        let take = |p| b.try_take(&cfg, p, Resource::PendingRequests, &cs);
        let _d = take(RoutingPriority::Default).unwrap();
        assert!(take(RoutingPriority::Default).is_err());
        let _h1 = take(RoutingPriority::High).unwrap();
        let _h2 = take(RoutingPriority::High).unwrap();
        assert!(take(RoutingPriority::High).is_err());
        assert_eq!(
            stats
                .counter("cluster.c.upstream_rq_pending_overflow")
                .get(),
            2
        );
        cfg.default.max_connections = 0;
        let quiet = b.try_take_quiet(&cfg, RoutingPriority::Default, Resource::Connections, &cs);
        assert!(quiet.is_err());
        assert_eq!(stats.counter("cluster.c.upstream_cx_overflow").get(), 0);
    }

    #[test]
    fn retries_default_to_three() {
        let b = Breakers::default();
        let cfg = CircuitBreakers::default();
        let stats = Stats::default();
        let cs = stats.cluster("c");
        let g: Vec<_> = (0..3)
            .map(|_| {
                b.try_take(&cfg, RoutingPriority::Default, Resource::Retries, &cs)
                    .unwrap()
            })
            .collect();
        assert!(
            b.try_take(&cfg, RoutingPriority::Default, Resource::Retries, &cs)
                .is_err()
        );
        assert_eq!(
            stats.counter("cluster.c.upstream_rq_retry_overflow").get(),
            1
        );
        drop(g);
    }
}
