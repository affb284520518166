//! Histograms with Envoy's default buckets (milliseconds), recorded lock-free.
//!
//! Envoy keeps a circllhist per histogram and exports fixed buckets to Prometheus; skiff keeps
//! only those buckets (one atomic per bucket, plus the sum and the count), which is all that
//! `/stats/prometheus` exports and enough for `/stats`' quantile summary (interpolated inside a
//! bucket, as an estimate).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Envoy's default histogram bucket bounds, in the histogram's unit (milliseconds here).
pub const DEFAULT_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// The quantiles `/stats` prints for a histogram, as Envoy does.
pub const SUMMARY_QUANTILES: [f64; 10] = [0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0];

/// A histogram of millisecond values: one counter per bucket of [`DEFAULT_BUCKETS`] and one
/// for values above the last bound.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts: `buckets[i]` holds values in `(bound[i-1], bound[i]]`, the last
    /// slot values above every bound.
    buckets: [AtomicU64; DEFAULT_BUCKETS.len() + 1],
    sum: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Record one value of `ms` milliseconds.
    pub fn record(&self, ms: u64) {
        // Bounds are sorted; a value lands in the first bucket whose bound it does not exceed.
        let v = ms as f64;
        let i = DEFAULT_BUCKETS.partition_point(|b| *b < v);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(ms, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Record a duration, truncated to whole milliseconds as Envoy records its timers.
    pub fn record_duration(&self, d: Duration) {
        self.record(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    }

    /// The values so far.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut buckets = [0u64; DEFAULT_BUCKETS.len() + 1];
        for (out, b) in buckets.iter_mut().zip(&self.buckets) {
            *out = b.load(Ordering::Relaxed);
        }
        HistogramSnapshot {
            buckets,
            sum: self.sum.load(Ordering::Relaxed),
        }
    }
}

/// A histogram's values at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Non-cumulative bucket counts (see [`Histogram`]).
    pub buckets: [u64; DEFAULT_BUCKETS.len() + 1],
    /// Sum of the recorded values.
    pub sum: u64,
}

impl HistogramSnapshot {
    /// Add `other`'s values (two series merged into one).
    pub fn merge(&mut self, other: &HistogramSnapshot) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.sum += other.sum;
    }

    /// How many values were recorded (the bucket counts are read one by one, so this is their
    /// sum rather than a separate counter: `_count` always equals the `+Inf` bucket).
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Cumulative counts per bound of [`DEFAULT_BUCKETS`] (Prometheus `le`), without `+Inf`.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut acc = 0;
        DEFAULT_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(b, n)| {
                acc += n;
                (*b, acc)
            })
            .collect()
    }

    /// Estimate of quantile `q` (0..=1): the rank's position inside its bucket, interpolated
    /// linearly between the bucket's bounds. `None` without values.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (i, n) in self.buckets.iter().enumerate() {
            if *n == 0 {
                continue;
            }
            let upto = below + n;
            if rank <= upto as f64 {
                let lo = if i == 0 { 0.0 } else { DEFAULT_BUCKETS[i - 1] };
                // Above the last bound there is no upper edge: report the last bound.
                let Some(hi) = DEFAULT_BUCKETS.get(i).copied() else {
                    return Some(lo);
                };
                let within = (rank - below as f64) / *n as f64;
                return Some(lo + (hi - lo) * within.clamp(0.0, 1.0));
            }
            below = upto;
        }
        Some(*DEFAULT_BUCKETS.last().unwrap_or(&0.0))
    }

    /// Envoy's `/stats` line value: `P0(nan,v) P25(nan,v) ...` (skiff keeps no flush
    /// intervals, so the interval value is always `nan`), or `No recorded values`.
    pub fn summary(&self) -> String {
        if self.count() == 0 {
            return "No recorded values".to_string();
        }
        SUMMARY_QUANTILES
            .iter()
            .map(|q| {
                let v = self.quantile(*q).unwrap_or(0.0);
                format!("P{}(nan,{v})", q * 100.0)
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_in_envoy_s_buckets() {
        let h = Histogram::default();
        for v in [0, 1, 3, 5, 7000, 4_000_000] {
            h.record(v);
        }
        let s = h.snapshot();
        assert_eq!(s.count(), 6);
        assert_eq!(s.sum, 4_007_009);
        let c = s.cumulative();
        // 0 <= 0.5; 1 <= 1; 3 and 5 <= 5; 7000 <= 10000; 4e6 only in +Inf.
        assert_eq!(c[0], (0.5, 1));
        assert_eq!(c[1], (1.0, 2));
        assert_eq!(c[2], (5.0, 4));
        assert_eq!(c[11], (5000.0, 4));
        assert_eq!(c[12], (10000.0, 5));
        assert_eq!(c.last(), Some(&(3600000.0, 5)));
    }

    #[test]
    fn quantiles_interpolate_inside_a_bucket() {
        let h = Histogram::default();
        for _ in 0..4 {
            h.record(3);
        }
        let s = h.snapshot();
        assert_eq!(s.quantile(0.0), Some(1.0));
        assert_eq!(s.quantile(0.5), Some(3.0));
        assert_eq!(s.quantile(1.0), Some(5.0));
        assert!(s.summary().starts_with("P0(nan,1) P25(nan,2) P50(nan,3)"));
        assert!(s.summary().ends_with(" P100(nan,5)"));
        assert_eq!(s.summary().split(' ').count(), 10);
        assert_eq!(
            Histogram::default().snapshot().summary(),
            "No recorded values"
        );
    }

    #[test]
    fn durations_are_truncated_to_milliseconds() {
        let h = Histogram::default();
        h.record_duration(Duration::from_micros(1900));
        assert_eq!(h.snapshot().sum, 1);
    }
}
