//! Outlier detection (Envoy's passive health checking): consecutive 5xx, gateway and
//! local-origin failures eject a host at once; success rate and failure percentage are judged
//! at each `interval`, when ejected hosts whose time is up also come back. A host is ejected for
//! `base_ejection_time * times ejected` (at most `max_ejection_time`), and never while
//! `max_ejection_percent` of the cluster is already ejected.

use std::sync::Arc;

use tokio::time::Instant;
use tracing::info;

use super::host::{ClusterShared, Host, Outcome, flag};
use crate::model::cluster::lb::OutlierDetection;
use crate::stats::{OutlierStats, ScopedCounter};

/// Why a host is ejected (the suffix of Envoy's `ejections_*` stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EjectionType {
    /// `consecutive_5xx`.
    Consecutive5xx,
    /// `consecutive_gateway_failure`.
    ConsecutiveGatewayFailure,
    /// `consecutive_local_origin_failure`.
    ConsecutiveLocalOriginFailure,
    /// success rate.
    SuccessRate,
    /// failure percentage.
    FailurePercentage,
}

impl EjectionType {
    fn stat(self) -> &'static str {
        match self {
            EjectionType::Consecutive5xx => "consecutive_5xx",
            EjectionType::ConsecutiveGatewayFailure => "consecutive_gateway_failure",
            EjectionType::ConsecutiveLocalOriginFailure => "consecutive_local_origin_failure",
            EjectionType::SuccessRate => "success_rate",
            EjectionType::FailurePercentage => "failure_percentage",
        }
    }

    /// `outlier_detection.ejections_detected_<type>`.
    fn detected(self, s: &OutlierStats) -> &ScopedCounter {
        match self {
            EjectionType::Consecutive5xx => &s.ejections_detected_consecutive_5xx,
            EjectionType::ConsecutiveGatewayFailure => {
                &s.ejections_detected_consecutive_gateway_failure
            }
            EjectionType::ConsecutiveLocalOriginFailure => {
                &s.ejections_detected_consecutive_local_origin_failure
            }
            EjectionType::SuccessRate => &s.ejections_detected_success_rate,
            EjectionType::FailurePercentage => &s.ejections_detected_failure_percentage,
        }
    }

    /// `outlier_detection.ejections_enforced_<type>`.
    fn enforced(self, s: &OutlierStats) -> &ScopedCounter {
        match self {
            EjectionType::Consecutive5xx => &s.ejections_enforced_consecutive_5xx,
            EjectionType::ConsecutiveGatewayFailure => {
                &s.ejections_enforced_consecutive_gateway_failure
            }
            EjectionType::ConsecutiveLocalOriginFailure => {
                &s.ejections_enforced_consecutive_local_origin_failure
            }
            EjectionType::SuccessRate => &s.ejections_enforced_success_rate,
            EjectionType::FailurePercentage => &s.ejections_enforced_failure_percentage,
        }
    }

    fn enforcing(self, c: &OutlierDetection) -> u32 {
        match self {
            EjectionType::Consecutive5xx => c.enforcing_consecutive_5xx,
            EjectionType::ConsecutiveGatewayFailure => c.enforcing_consecutive_gateway_failure,
            EjectionType::ConsecutiveLocalOriginFailure => {
                c.enforcing_consecutive_local_origin_failure
            }
            EjectionType::SuccessRate => c.enforcing_success_rate,
            EjectionType::FailurePercentage => c.enforcing_failure_percentage,
        }
    }
}

/// An outcome as outlier detection sees it.
enum Seen {
    /// An HTTP status from the host (external origin).
    Status(u16),
    /// A locally detected failure (connect, timeout, reset) in split mode.
    LocalFailure,
    /// A local success (connect established) in split mode.
    LocalSuccess,
}

fn classify(o: Outcome, split: bool) -> Seen {
    match (o, split) {
        (Outcome::Status(s), _) => Seen::Status(s),
        (Outcome::Success, false) => Seen::Status(200),
        (Outcome::Success, true) => Seen::LocalSuccess,
        (_, true) => Seen::LocalFailure,
        // Without the split, Envoy maps local failures to the status the router would answer.
        (Outcome::Timeout, false) => Seen::Status(504),
        (Outcome::ConnectFailure | Outcome::Reset | Outcome::LocalOriginFailure, false) => {
            Seen::Status(503)
        }
    }
}

impl ClusterShared {
    /// Count one outcome of `host`; eject it when a consecutive-failure threshold is reached.
    pub(crate) fn report(&self, host: &Host, o: Outcome, now: Instant) {
        let cfg = self.outlier.load_full();
        let Some(cfg) = cfg.as_ref() else { return };
        let mut detected = Vec::new();
        {
            let mut st = host.state.outlier.lock().unwrap_or_else(|e| e.into_inner());
            match classify(o, cfg.split_external_local_origin_errors) {
                Seen::Status(s) => {
                    st.interval_total += 1;
                    if s >= 500 {
                        if (502..=504).contains(&s) {
                            st.consecutive_gateway_failure += 1;
                            if st.consecutive_gateway_failure == cfg.consecutive_gateway_failure {
                                st.consecutive_gateway_failure = 0;
                                detected.push(EjectionType::ConsecutiveGatewayFailure);
                            }
                        } else {
                            st.consecutive_gateway_failure = 0;
                        }
                        st.consecutive_5xx += 1;
                        if st.consecutive_5xx == cfg.consecutive_5xx {
                            st.consecutive_5xx = 0;
                            detected.push(EjectionType::Consecutive5xx);
                        }
                    } else {
                        st.interval_success += 1;
                        st.consecutive_5xx = 0;
                        st.consecutive_gateway_failure = 0;
                    }
                }
                Seen::LocalFailure => {
                    st.consecutive_local_origin_failure += 1;
                    if st.consecutive_local_origin_failure == cfg.consecutive_local_origin_failure {
                        st.consecutive_local_origin_failure = 0;
                        detected.push(EjectionType::ConsecutiveLocalOriginFailure);
                    }
                }
                Seen::LocalSuccess => st.consecutive_local_origin_failure = 0,
            }
        }
        for t in detected {
            if host.state.flags() & flag::FAILED_OUTLIER_CHECK != 0 {
                break;
            }
            t.detected(&self.stats.outlier_detection).inc();
            self.eject(host, t, cfg, now);
        }
    }

    /// Eject `host` unless `max_ejection_percent` is reached or the enforcement roll says no.
    fn eject(&self, host: &Host, t: EjectionType, cfg: &OutlierDetection, now: Instant) {
        let total = self.host_count().max(1);
        let active = self.ejections_active();
        let ejected_pct = 100.0 * active as f64 / total as f64;
        if ejected_pct >= f64::from(cfg.max_ejection_percent) {
            self.stats.outlier_detection.ejections_overflow.inc();
            return;
        }
        if matches!(t, EjectionType::Consecutive5xx | EjectionType::SuccessRate) {
            // Envoy keeps this deprecated counter for these two types only.
            self.stats.outlier_detection.ejections_total.inc();
        }
        let enforce = t.enforcing(cfg);
        if enforce < 100 && fastrand::u32(0..100) >= enforce {
            return;
        }
        {
            let mut st = host.state.outlier.lock().unwrap_or_else(|e| e.into_inner());
            st.num_ejections += 1;
            st.ejected_at = Some(now);
        }
        if host.state.set_flag(flag::FAILED_OUTLIER_CHECK) {
            let od = &self.stats.outlier_detection;
            od.ejections_enforced_total.inc();
            t.enforced(od).inc();
            self.set_ejections_active(active + 1);
            info!(cluster = %self.name, host = %host.address, reason = t.stat(), "outlier ejected");
            self.health_changed();
        }
    }

    /// One outlier-detection interval over the cluster's current `hosts`: bring back hosts
    /// whose ejection is over, judge success rate and failure percentage, start new windows.
    pub fn outlier_tick(&self, hosts: &[Arc<Host>], now: Instant) {
        let cfg = self.outlier.load_full();
        let Some(cfg) = cfg.as_ref() else { return };
        let mut changed = false;
        // (host index, success rate %, volume) of this window.
        let mut window = Vec::with_capacity(hosts.len());
        for (i, h) in hosts.iter().enumerate() {
            let mut st = h.state.outlier.lock().unwrap_or_else(|e| e.into_inner());
            let ejected = h.state.flags() & flag::FAILED_OUTLIER_CHECK != 0;
            if ejected {
                let for_ = cfg
                    .base_ejection_time
                    .saturating_mul(st.num_ejections.max(1))
                    .min(cfg.max_ejection_time.max(cfg.base_ejection_time));
                let since = st
                    .ejected_at
                    .map(|t| now.saturating_duration_since(t))
                    .unwrap_or(for_);
                if since >= for_ && h.state.clear_flag(flag::FAILED_OUTLIER_CHECK) {
                    st.ejected_at = None;
                    st.consecutive_5xx = 0;
                    st.consecutive_gateway_failure = 0;
                    st.consecutive_local_origin_failure = 0;
                    changed = true;
                    info!(cluster = %self.name, host = %h.address, "outlier ejection ended");
                }
            } else if st.num_ejections > 0 {
                // A host that stays in service earns back its shorter ejection time.
                st.num_ejections -= 1;
            }
            let total = st.interval_total;
            let rate = if total > 0 {
                Some(100.0 * st.interval_success as f64 / total as f64)
            } else {
                None
            };
            st.last_success_rate = if total >= u64::from(cfg.success_rate_request_volume) {
                rate
            } else {
                None
            };
            if let Some(r) = rate
                && !ejected
            {
                window.push((i, r, total));
            }
            st.interval_total = 0;
            st.interval_success = 0;
        }
        // Recomputed each interval so concurrent ejections never leave the gauge off.
        self.set_ejections_active(self.ejections_active());
        if changed {
            self.health_changed();
        }
        // Success rate: below mean - stdev_factor * stdev, among hosts with enough volume.
        let sr: Vec<(usize, f64)> = window
            .iter()
            .filter(|(_, _, v)| *v >= u64::from(cfg.success_rate_request_volume))
            .map(|(i, r, _)| (*i, *r))
            .collect();
        if !sr.is_empty() && sr.len() >= cfg.success_rate_minimum_hosts as usize {
            let n = sr.len() as f64;
            let mean = sr.iter().map(|(_, r)| r).sum::<f64>() / n;
            let var = sr.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / n;
            let threshold = mean - f64::from(cfg.success_rate_stdev_factor) / 1000.0 * var.sqrt();
            *self
                .success_rate_summary
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some((mean, threshold));
            for (i, r) in &sr {
                if *r < threshold {
                    EjectionType::SuccessRate
                        .detected(&self.stats.outlier_detection)
                        .inc();
                    self.eject(&hosts[*i], EjectionType::SuccessRate, cfg, now);
                }
            }
        }
        // Failure percentage: at or above the threshold.
        let fp: Vec<(usize, f64)> = window
            .iter()
            .filter(|(_, _, v)| *v >= u64::from(cfg.failure_percentage_request_volume))
            .map(|(i, r, _)| (*i, 100.0 - r))
            .collect();
        if !fp.is_empty() && fp.len() >= cfg.failure_percentage_minimum_hosts as usize {
            for (i, f) in &fp {
                if *f >= f64::from(cfg.failure_percentage_threshold)
                    && hosts[*i].state.flags() & flag::FAILED_OUTLIER_CHECK == 0
                {
                    EjectionType::FailurePercentage
                        .detected(&self.stats.outlier_detection)
                        .inc();
                    self.eject(&hosts[*i], EjectionType::FailurePercentage, cfg, now);
                }
            }
        }
    }
}
