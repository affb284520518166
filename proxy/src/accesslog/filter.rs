//! Access-log filters (`envoy.config.accesslog.v3.AccessLogFilter`) skiff evaluates; the
//! others are refused by name when the configuration is converted.

use super::Record;

/// Envoy's response flag names, accepted by `response_flag_filter` (Envoy validates the list
/// against these).
pub const ENVOY_FLAG_NAMES: &[&str] = &[
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
    "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR",
    "UDO",
];

/// `ComparisonFilter.op`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    /// `EQ`.
    Eq,
    /// `GE`.
    Ge,
    /// `LE`.
    Le,
    /// `NE`.
    Ne,
}

impl Cmp {
    fn holds(self, actual: u64, value: u64) -> bool {
        match self {
            Cmp::Eq => actual == value,
            Cmp::Ge => actual >= value,
            Cmp::Le => actual <= value,
            Cmp::Ne => actual != value,
        }
    }
}

/// One access-log filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// `status_code_filter`: the response code (0 without one) against `value` (the runtime
    /// key's default: skiff has no runtime).
    StatusCode(Cmp, u64),
    /// `duration_filter`: the duration in milliseconds.
    Duration(Cmp, u64),
    /// `not_health_check_filter`: skiff's HCM runs no health-check filter, so no request is
    /// marked as a health check and this always passes.
    NotHealthCheck,
    /// `response_flag_filter`: any of these flags set (empty list: any flag at all).
    ResponseFlags(Vec<String>),
    /// `and_filter`.
    And(Vec<Filter>),
    /// `or_filter`.
    Or(Vec<Filter>),
}

impl Filter {
    /// Whether `rec` is logged.
    pub fn passes(&self, rec: &Record) -> bool {
        match self {
            Filter::StatusCode(op, v) => op.holds(u64::from(rec.response_code), *v),
            Filter::Duration(op, v) => op.holds(rec.duration.as_millis() as u64, *v),
            Filter::NotHealthCheck => true,
            Filter::ResponseFlags(want) if want.is_empty() => !rec.response_flags.is_empty(),
            Filter::ResponseFlags(want) => rec
                .response_flags
                .iter()
                .any(|f| want.iter().any(|w| w == f)),
            Filter::And(fs) => fs.iter().all(|f| f.passes(rec)),
            Filter::Or(fs) => fs.iter().any(|f| f.passes(rec)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_follow_envoy() {
        let mut rec = Record {
            response_code: 503,
            response_flags: vec!["UF", "URX"],
            ..Record::default()
        };
        assert!(Filter::StatusCode(Cmp::Ge, 500).passes(&rec));
        assert!(!Filter::StatusCode(Cmp::Eq, 200).passes(&rec));
        assert!(Filter::ResponseFlags(vec![]).passes(&rec));
        assert!(Filter::ResponseFlags(vec!["URX".into()]).passes(&rec));
        assert!(!Filter::ResponseFlags(vec!["NR".into()]).passes(&rec));
        let both = Filter::And(vec![
            Filter::NotHealthCheck,
            Filter::Or(vec![
                Filter::ResponseFlags(vec!["NR".into()]),
                Filter::StatusCode(Cmp::Ne, 200),
            ]),
        ]);
        assert!(both.passes(&rec));
        rec.response_flags.clear();
        rec.response_code = 200;
        assert!(!both.passes(&rec));
        assert!(!Filter::ResponseFlags(vec![]).passes(&rec));
    }
}
