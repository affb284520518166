//! Envoy's role-based access control (`envoy.filters.network.rbac`, `envoy.filters.http.rbac`)
//! as a pure engine: validated configuration ([`NetworkRbac`], [`HttpRbac`],
//! [`HttpRbacPerRoute`], converted by `TryFrom` from the envoy-types protos), facts of a
//! connection or request ([`ConnectionFacts`], [`RequestFacts`]) and a [`Decision`].
//!
//! Envoy's semantics: ALLOW allows iff a policy matches; DENY denies iff a policy matches; LOG
//! always allows and reports whether a policy matched; absent `rules` enforce nothing; `rules`
//! with no policies and action ALLOW deny everything (Istio's allow-nothing). Shadow rules are
//! evaluated and only counted. Policies are tried in name order; the first match is the
//! effective policy id. What the engine cannot evaluate (metadata, CEL conditions, the xDS
//! matcher API, extensions) is refused with [`RbacError`] naming the field. See docs/RBAC.md.

mod eval;
mod model;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use crate::stats::{Counter, Stats};

pub use eval::{ConnectionFacts, Decision, PeerIdentity, RequestFacts, Verdict, downstream_remote};
pub use model::{
    Action, HeaderMatch, HeaderTest, HttpRbac, HttpRbacPerRoute, ISTIO_PEER_PRINCIPAL, MAX_DEPTH,
    MAX_REGEX_LEN, MAX_REGEX_PROGRAM, NetworkRbac, Permission, Policy, Principal, RbacError,
    RegexError, Rules, StringKind, StringMatch, compile_regex,
};

/// The network filter's name in listener configurations.
pub const NETWORK_FILTER: &str = "envoy.filters.network.rbac";
/// The HTTP filter's name in HCM configurations.
pub const HTTP_FILTER: &str = "envoy.filters.http.rbac";
/// Status of an HTTP request the enforced rules deny.
pub const DENIED_STATUS: u16 = 403;
/// Body of that answer, as Envoy's.
pub const DENIED_BODY: &str = "RBAC: access denied";

/// Envoy's response (or connection termination) detail for a denial:
/// `rbac_access_denied_matched_policy[<policy id or none>]`, whitespace replaced by `_`.
pub fn denied_detail(policy: Option<&str>) -> String {
    let id: String = policy
        .unwrap_or("none")
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .collect();
    format!("rbac_access_denied_matched_policy[{id}]")
}

/// The full names of a filter's four counters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StatNames {
    /// Enforced rules allowed (LOG counts here too).
    pub allowed: String,
    /// Enforced rules denied.
    pub denied: String,
    /// Shadow rules would have allowed.
    pub shadow_allowed: String,
    /// Shadow rules would have denied.
    pub shadow_denied: String,
}

/// Envoy's `statPrefixJoin`: `prefix` and `token`, with one `.` between them.
fn join(prefix: &str, token: &str) -> String {
    if prefix.is_empty() {
        token.to_string()
    } else if prefix.ends_with('.') {
        format!("{prefix}{token}")
    } else {
        format!("{prefix}.{token}")
    }
}

/// Envoy's `RBAC::generateStats`: `<prefix>.rbac.<rules_prefix>.{allowed,denied}` and
/// `<prefix>.rbac.<shadow_prefix>.{shadow_allowed,shadow_denied}`, each `.` added only where
/// the part before it does not already end with one and is not empty (`statPrefixJoin`):
/// Istio's `tcp.` and `istio_dry_run_allow_` give `tcp.rbac.allowed` and
/// `tcp.rbac.istio_dry_run_allow_.shadow_allowed`.
pub fn stat_names(prefix: &str, rules_prefix: &str, shadow_prefix: &str) -> StatNames {
    let base = join(prefix, "rbac.");
    let rules = join(&base, rules_prefix);
    let shadow = join(&base, shadow_prefix);
    StatNames {
        allowed: join(&rules, "allowed"),
        denied: join(&rules, "denied"),
        shadow_allowed: join(&shadow, "shadow_allowed"),
        shadow_denied: join(&shadow, "shadow_denied"),
    }
}

/// A filter's four counters, resolved once from their [`StatNames`] (when the snapshot that
/// holds the filter is published), so a decision only adds to atomics.
#[derive(Debug)]
pub struct Counters {
    allowed: Arc<Counter>,
    denied: Arc<Counter>,
    shadow_allowed: Arc<Counter>,
    shadow_denied: Arc<Counter>,
}

impl Counters {
    /// The counters called `names` in `stats`, listed at zero from now on (as Envoy creates
    /// all four with the filter).
    pub fn resolve(stats: &Stats, names: &StatNames) -> Counters {
        Counters {
            allowed: stats.counter(&names.allowed),
            denied: stats.counter(&names.denied),
            shadow_allowed: stats.counter(&names.shadow_allowed),
            shadow_denied: stats.counter(&names.shadow_denied),
        }
    }

    /// Count one decision: its enforced and shadow answers, where those rules exist.
    pub fn count(&self, d: &Decision<'_>) {
        let (enforced, shadow) = d.counts();
        match enforced {
            Some(true) => self.allowed.inc(),
            Some(false) => self.denied.inc(),
            None => {}
        }
        match shadow {
            Some(true) => self.shadow_allowed.inc(),
            Some(false) => self.shadow_denied.inc(),
            None => {}
        }
    }
}

impl NetworkRbac {
    /// Counter names: `<stat_prefix>.rbac.allowed`, ... (Istio's `tcp.` gives `tcp.rbac.allowed`).
    pub fn stat_names(&self) -> StatNames {
        stat_names(&self.stat_prefix, "", &self.shadow_rules_stat_prefix)
    }
}

impl HttpRbac {
    /// Counter names under the HCM's: `http.<hcm_stat_prefix>.rbac.[<rules_stat_prefix>.]allowed`, ...
    pub fn stat_names(&self, hcm_stat_prefix: &str) -> StatNames {
        stat_names(
            &format!("http.{hcm_stat_prefix}."),
            &self.rules_stat_prefix,
            &self.shadow_rules_stat_prefix,
        )
    }
}

/// The dynamic metadata Envoy's RBAC filter sets on a request it lets through (measured on
/// Envoy 1.40): under the filter's name, `<rules_prefix>enforced_engine_result` and
/// `<rules_prefix>enforced_effective_policy_id` (when a policy matched), and the same with
/// `<shadow_prefix>shadow_` for the shadow rules; LOG rules set `access_log_hint` under
/// `envoy.common`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// Fields under the filter's name (`envoy.filters.http.rbac`), values `allowed`/`denied`
    /// or a policy id.
    pub fields: std::collections::BTreeMap<String, String>,
    /// `envoy.common.access_log_hint`, set by LOG rules.
    pub access_log_hint: Option<bool>,
}

impl Decision<'_> {
    /// The metadata this decision leaves for access logs, with the filter's stat prefixes
    /// (`rules_stat_prefix`, or "" for the network filter; `shadow_rules_stat_prefix`).
    pub fn metadata(&self, rules_prefix: &str, shadow_prefix: &str) -> Metadata {
        let result = |allowed: bool| if allowed { "allowed" } else { "denied" }.to_string();
        let mut m = Metadata::default();
        if let Some(v) = self.enforced {
            m.fields.insert(
                format!("{rules_prefix}enforced_engine_result"),
                result(v.allowed),
            );
            if let Some(id) = v.policy {
                m.fields.insert(
                    format!("{rules_prefix}enforced_effective_policy_id"),
                    id.to_string(),
                );
            }
            m.access_log_hint = v.log;
        }
        if let Some(v) = self.shadow {
            m.fields.insert(
                format!("{shadow_prefix}shadow_engine_result"),
                result(v.allowed),
            );
            if let Some(id) = v.policy {
                m.fields.insert(
                    format!("{shadow_prefix}shadow_effective_policy_id"),
                    id.to_string(),
                );
            }
        }
        m
    }

    /// Which counters this decision adds one to: (enforced, shadow), each `Some(true)` for
    /// allowed, `Some(false)` for denied, `None` when those rules are absent.
    pub fn counts(&self) -> (Option<bool>, Option<bool>) {
        (
            self.enforced.map(|v| v.allowed),
            self.shadow.map(|v| v.allowed),
        )
    }
}
