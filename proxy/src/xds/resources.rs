//! The client's view of the xDS resources: what was accepted, what is warming, what was
//! rejected, and the snapshot that follows from it. Pure: no I/O, no clock reads (callers pass
//! `now`), so both protocol flavours and the tests drive it directly.
//!
//! # Acceptance (Envoy's rules)
//! - Decoding is all-or-nothing per response: a resource whose `Any` has another type URL,
//!   whose bytes do not decode, or that breaks a proto validation rule (Envoy's PGV rules, e.g.
//!   a cluster's `connect_timeout: -1s`) rejects the whole response and nothing changes
//!   (Envoy's gRPC mux decodes and PGV-validates every resource before any is applied; checked
//!   against real Envoy in tests/tests/direct_envoy_diff.rs).
//! - Validation is per resource: valid resources are applied, invalid ones are rejected and
//!   keep their previous accepted version, and the response is NACKed listing `name: reason`
//!   (Envoy's LDS/CDS/RDS/EDS/SDS all apply the valid part of a response).
//! - SotW LDS and CDS responses carry the whole state: a resource missing from a response is
//!   removed (a name present but invalid is not). SotW RDS, EDS and SDS responses only add or
//!   update; their resources go away when nothing subscribes to them any more.
//! - Delta: `removed_resources` removes; everything else is an add or update.
//!
//! Each type's own rules (decoding, proto rules, model, dependencies, checks across a
//! response) are in its `handler`; this file runs the steps every type shares.
//!
//! # Warming
//! An EDS cluster is warming until the `ClusterLoadAssignment` of its service name is known; a
//! listener is warming until every RDS route configuration its HTTP connection managers name is
//! known. A cluster or listener whose TLS contexts name secrets with `sds_config: {ads: {}}`
//! also warms until those secrets are known, or until the secret fetch timeout (the
//! bootstrap's `initial_fetch_timeout`, Envoy's 15 s by default) has passed since the name was
//! first wanted: then it activates without them and its TLS handshakes fail, as Envoy's do.
//! While a new version warms, the previous version (if any) keeps serving.
//!
//! # Secrets
//! The snapshot's [`Secrets`] are the bootstrap's static secrets, then those of other SDS
//! sources ([`Resources::set_external_secrets`]: the gRPC SDS clients, Istio's Unix socket),
//! then the active secrets of ADS, a later source winning a name.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use envoy_types::pb::google::protobuf::Any;

use crate::model::tls::{SdsSource, Secret, Secrets};
use crate::model::{Cluster, Listener, LoadAssignment, RouteConfig};
use crate::state::{ErrorRecord, ResourceRecord, Snapshot, TypeDump, XdsDump};
use crate::xds::ResourceKind;

use self::handler::{
    Batch, ClusterHandler, EndpointsHandler, Handler, ListenerHandler, Rejection, RouteHandler,
    SecretHandler, Upsert, cluster_secrets, eds_name, listener_secrets, rds_names,
};
pub use self::handler::{ProtoRule, RejectReason, Rejected, nack_message};

mod handler;

/// The type URLs skiff subscribes to, in the order Envoy first requests them.
pub const TYPE_URLS: [&str; 5] = [
    ResourceKind::ALL[0].type_url(),
    ResourceKind::ALL[1].type_url(),
    ResourceKind::ALL[2].type_url(),
    ResourceKind::ALL[3].type_url(),
    ResourceKind::ALL[4].type_url(),
];

/// Envoy's default `initial_fetch_timeout`, for secrets over ADS.
pub const DEFAULT_SECRET_FETCH_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs `$body` with `$h` the handler type of `$kind`: the one place a kind picks its handler.
macro_rules! with_handler {
    ($kind:expr, $h:ident => $body:expr) => {
        match $kind {
            ResourceKind::Listener => {
                type $h = ListenerHandler;
                $body
            }
            ResourceKind::Cluster => {
                type $h = ClusterHandler;
                $body
            }
            ResourceKind::Route => {
                type $h = RouteHandler;
                $body
            }
            ResourceKind::Endpoints => {
                type $h = EndpointsHandler;
                $body
            }
            ResourceKind::Secret => {
                type $h = SecretHandler;
                $body
            }
        }
    };
}

/// One accepted resource: the model and what `/config_dump` shows of it.
#[derive(Debug)]
struct Entry<M> {
    model: Arc<M>,
    record: ResourceRecord,
}

impl<M> Clone for Entry<M> {
    fn clone(&self) -> Self {
        Entry {
            model: self.model.clone(),
            record: self.record.clone(),
        }
    }
}

/// One type URL's state.
#[derive(Debug)]
struct TypeState<M> {
    /// Version of the last response applied without rejection (SotW: what ACKs carry).
    version_info: String,
    last_updated: Option<SystemTime>,
    /// Latest accepted version of each resource.
    accepted: BTreeMap<String, Entry<M>>,
    /// What is in the snapshot (differs from `accepted` while a new version warms).
    active: BTreeMap<String, Entry<M>>,
    errors: BTreeMap<String, ErrorRecord>,
}

impl<M> Default for TypeState<M> {
    fn default() -> Self {
        TypeState {
            version_info: String::new(),
            last_updated: None,
            accepted: BTreeMap::new(),
            active: BTreeMap::new(),
            errors: BTreeMap::new(),
        }
    }
}

impl<M> TypeState<M> {
    fn resource_versions(&self) -> BTreeMap<String, String> {
        self.accepted
            .iter()
            .map(|(k, e)| (k.clone(), e.record.version_info.clone()))
            .collect()
    }

    fn retain_names(&mut self, keep: &BTreeSet<String>) {
        self.accepted.retain(|n, _| keep.contains(n));
        self.errors.retain(|n, _| keep.contains(n));
    }

    /// Make every accepted resource that `ready` says has warmed active; drop active ones
    /// that are no longer accepted.
    fn promote(&mut self, ready: impl Fn(&M) -> bool) {
        let accepted = &self.accepted;
        self.active.retain(|n, _| accepted.contains_key(n));
        for (n, e) in accepted {
            if ready(&e.model) {
                self.active.insert(n.clone(), e.clone());
            }
        }
    }

    fn warming_names(&self) -> Vec<String> {
        self.accepted
            .iter()
            .filter(|(n, e)| self.active.get(*n).is_none_or(|a| a.record != e.record))
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn dump(&self) -> TypeDump {
        let warming = self
            .warming_names()
            .into_iter()
            .filter_map(|n| self.accepted.get(&n).map(|e| (n, e.record.clone())))
            .collect();
        TypeDump {
            version_info: self.version_info.clone(),
            last_updated: self.last_updated,
            active: self
                .active
                .iter()
                .map(|(n, e)| (n.clone(), e.record.clone()))
                .collect(),
            warming,
            errors: self.errors.clone(),
        }
    }

    fn error(
        &mut self,
        r: &Rejected,
        version_info: &str,
        now: SystemTime,
        raw: Option<&prost_types::Any>,
    ) {
        self.errors.insert(
            r.name.clone(),
            ErrorRecord {
                version_info: version_info.to_string(),
                last_update_attempt: now,
                details: r.to_string(),
                resource: raw.cloned(),
            },
        );
    }
}

/// One resource as it came off the wire.
#[derive(Debug, Clone)]
pub struct Incoming<'a> {
    /// The name the delta `Resource` wrapper gives (SotW: `None`).
    pub name: Option<&'a str>,
    /// The resource's own version (delta), else the response's `version_info`.
    pub version: &'a str,
    /// The resource.
    pub resource: &'a Any,
}

/// One response of either flavour, as [`Resources::apply`] takes it.
struct Update<'a, 'r> {
    version_info: &'a str,
    resources: &'a [Incoming<'r>],
    removed: &'a [String],
    /// State of the world for a wildcard type: what is missing is removed.
    full_state: bool,
    now: SystemTime,
}

fn to_prost(a: &Any) -> prost_types::Any {
    prost_types::Any {
        type_url: a.type_url.clone(),
        value: a.value.clone(),
    }
}

/// A decoded resource: its name, its model or why it alone is rejected, and where it came from.
type Decoded<'i, 'r, M> = (String, Result<M, RejectReason>, &'i Incoming<'r>);

/// A response after validation.
struct Checked<M> {
    upserts: Vec<Upsert<M>>,
    rejected: Vec<Rejection>,
    /// Every name the response carried, rejected ones included.
    seen: BTreeSet<String>,
}

/// Step 1: decode every resource of a response; `Err` lists what does not decode, breaks a
/// proto rule or disagrees with its delta wrapper, and rejects the whole response.
fn decode_all<'i, 'r, H: Handler>(
    resources: &'i [Incoming<'r>],
) -> Result<Vec<Decoded<'i, 'r, H::Model>>, Vec<Rejected>> {
    let mut decoded = Vec::with_capacity(resources.len());
    let mut errors = Vec::new();
    for (i, inc) in resources.iter().enumerate() {
        let label = inc
            .name
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| format!("resources[{i}]"));
        match handler::decode::<H>(inc.resource) {
            Ok((name, model)) => match inc.name {
                Some(wrapper) if wrapper != name => errors.push(Rejected {
                    name: label,
                    reason: RejectReason::NameMismatch {
                        name,
                        wrapper: wrapper.to_owned(),
                    },
                }),
                _ => decoded.push((name, model, inc)),
            },
            Err(reason) => errors.push(Rejected {
                name: label,
                reason,
            }),
        }
    }
    if errors.is_empty() {
        Ok(decoded)
    } else {
        Err(errors)
    }
}

/// Everything the client knows, plus the bootstrap's static resources.
#[derive(Debug, Default)]
pub struct Resources {
    static_listeners: Vec<Listener>,
    static_clusters: Vec<Cluster>,
    static_secrets: Secrets,
    lds: TypeState<Listener>,
    cds: TypeState<Cluster>,
    rds: TypeState<RouteConfig>,
    eds: TypeState<LoadAssignment>,
    sds: TypeState<Secret>,
    /// Secrets of the other SDS sources (gRPC clusters), as last fed.
    external_secrets: Secrets,
    /// How long a cluster or listener waits for a secret over ADS.
    secret_fetch_timeout: FetchTimeout,
    /// When each secret subscribed over ADS was first wanted.
    secret_waits: BTreeMap<String, SystemTime>,
    /// Secrets whose fetch timed out: they no longer hold anything warming.
    secrets_given_up: BTreeSet<String>,
}

/// `None`: wait for ever (`initial_fetch_timeout: 0s`).
#[derive(Debug, Clone, Copy)]
struct FetchTimeout(Option<Duration>);

impl Default for FetchTimeout {
    fn default() -> Self {
        FetchTimeout(Some(DEFAULT_SECRET_FETCH_TIMEOUT))
    }
}

impl Resources {
    /// Start from the bootstrap's static listeners and clusters.
    pub fn new(static_listeners: Vec<Listener>, static_clusters: Vec<Cluster>) -> Self {
        Resources {
            static_listeners,
            static_clusters,
            ..Default::default()
        }
    }

    /// Start from a bootstrap: its static listeners, clusters and secrets, and its
    /// `initial_fetch_timeout` as the fetch timeout of secrets over ADS.
    pub fn for_bootstrap(b: &crate::config::Bootstrap) -> Self {
        Resources::new(b.listeners.clone(), b.clusters.clone())
            .with_static_secrets(b.secrets.clone())
            .with_secret_fetch_timeout(b.initial_fetch_timeout)
    }

    /// With the bootstrap's static secrets (`static_resources.secrets`).
    pub fn with_static_secrets(mut self, secrets: Secrets) -> Self {
        self.static_secrets = secrets;
        self
    }

    /// With how long clusters and listeners wait for their secrets over ADS (the bootstrap's
    /// `initial_fetch_timeout`; `None` waits for ever).
    pub fn with_secret_fetch_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.secret_fetch_timeout = FetchTimeout(timeout);
        self
    }

    /// Replace the secrets of the other SDS sources (what the gRPC SDS clients hold now); the
    /// next [`Resources::snapshot`] carries them.
    pub fn set_external_secrets(&mut self, secrets: Secrets) {
        self.external_secrets = secrets;
    }

    /// Names of the secrets that accepted and static clusters and listeners take from
    /// sources `from` accepts.
    fn secret_names(&self, from: impl Fn(&SdsSource) -> bool + Copy) -> BTreeSet<String> {
        let clusters = self
            .cds
            .accepted
            .values()
            .map(|e| &*e.model)
            .chain(&self.static_clusters);
        let listeners = self
            .lds
            .accepted
            .values()
            .map(|e| &*e.model)
            .chain(&self.static_listeners);
        clusters
            .flat_map(|c| cluster_secrets(c, from))
            .chain(listeners.flat_map(|l| listener_secrets(l, from)))
            .collect()
    }

    /// Names of the secrets the configuration takes from gRPC SDS clusters (`api_config_source`,
    /// Istio's `sds-grpc`): what the SDS clients must ask for.
    pub fn grpc_secret_names(&self) -> BTreeSet<String> {
        self.secret_names(|s| matches!(s, SdsSource::Grpc { .. }))
    }

    /// Starts the fetch clock of newly wanted ADS secrets, forgets unwanted ones, and gives up
    /// on those past the fetch timeout (what they held warming activates). Returns whether
    /// anything was given up.
    pub fn poll_secret_waits(&mut self, now: SystemTime) -> bool {
        let wanted = self.secret_names(|s| *s == SdsSource::Ads);
        self.secret_waits.retain(|n, _| wanted.contains(n));
        self.secrets_given_up.retain(|n| wanted.contains(n));
        for n in &wanted {
            self.secret_waits.entry(n.clone()).or_insert(now);
        }
        let Some(timeout) = self.secret_fetch_timeout.0 else {
            return false;
        };
        let mut changed = false;
        for (n, since) in &self.secret_waits {
            let late = now.duration_since(*since).is_ok_and(|d| d >= timeout);
            if late && !self.sds.accepted.contains_key(n) && self.secrets_given_up.insert(n.clone())
            {
                tracing::warn!(
                    secret = %n,
                    timeout_ms = timeout.as_millis() as u64,
                    "secret not received over ADS within the fetch timeout; activating without it"
                );
                changed = true;
            }
        }
        if changed {
            self.reconcile();
        }
        changed
    }

    /// When the next wanted ADS secret reaches its fetch timeout, if one is still awaited.
    pub fn next_secret_deadline(&self) -> Option<SystemTime> {
        let timeout = self.secret_fetch_timeout.0?;
        self.secret_waits
            .iter()
            .filter(|(n, _)| {
                !self.sds.accepted.contains_key(*n) && !self.secrets_given_up.contains(*n)
            })
            .map(|(_, since)| *since + timeout)
            .min()
    }

    /// Prefixes of the update counters of a push of `kind`, Envoy's names:
    /// `listener_manager.lds`, `cluster_manager.cds`, `cluster.<name>` for each EDS cluster and
    /// `http.<stat_prefix>.rds.<route_config>` for each HTTP connection manager on RDS, `sds.<name>` for each secret over ADS (every
    /// subscriber is counted: the response's own names are not at hand here).
    pub fn update_stat_prefixes(&self, kind: ResourceKind) -> Vec<String> {
        if let Some(p) = kind.stat_prefix() {
            return vec![p.to_string()];
        }
        let mut out = BTreeSet::new();
        if kind == ResourceKind::Endpoints {
            let clusters = self.cds.accepted.values().map(|e| &*e.model);
            for c in clusters.chain(&self.static_clusters) {
                if handler::eds_name(c).is_some() {
                    out.insert(format!("cluster.{}", c.name));
                }
            }
        } else if kind == ResourceKind::Secret {
            // Envoy counts SDS updates per secret: `sds.<name>.update_success`.
            for n in self.secret_names(|s| *s == SdsSource::Ads) {
                out.insert(format!("sds.{n}"));
            }
        } else {
            let listeners = self.lds.accepted.values().map(|e| &*e.model);
            for l in listeners.chain(&self.static_listeners) {
                let chains = l.filter_chains.iter().chain(&l.default_filter_chain);
                for fc in chains {
                    if let crate::model::NetworkAction::Http(h) = &fc.action
                        && let Some(rc) = &h.rds_route_config_name
                    {
                        out.insert(format!("http.{}.rds.{rc}", h.stat_prefix));
                    }
                }
            }
        }
        out.into_iter().collect()
    }

    /// Version of the last fully accepted response of this type (what SotW requests carry).
    pub fn version_info(&self, type_url: &str) -> String {
        match ResourceKind::from_type_url(type_url) {
            Some(kind) => with_handler!(kind, H => H::state(self).version_info.clone()),
            None => String::new(),
        }
    }

    /// Per-resource versions of what is accepted (delta's `initial_resource_versions`).
    pub fn resource_versions(&self, type_url: &str) -> BTreeMap<String, String> {
        match ResourceKind::from_type_url(type_url) {
            Some(kind) => with_handler!(kind, H => H::state(self).resource_versions()),
            None => BTreeMap::new(),
        }
    }

    /// Names to subscribe to; `None` is a wildcard subscription (LDS, CDS).
    pub fn subscriptions(&self, type_url: &str) -> Option<BTreeSet<String>> {
        match ResourceKind::from_type_url(type_url) {
            Some(kind) => with_handler!(kind, H => H::subscriptions(self)),
            None => Some(BTreeSet::new()),
        }
    }

    /// Apply a state-of-the-world response. `Err` lists the rejections (NACK); valid resources
    /// were applied anyway unless a resource could not be decoded.
    pub fn apply_sotw(
        &mut self,
        type_url: &str,
        version_info: &str,
        resources: &[Any],
        now: SystemTime,
    ) -> Result<(), Vec<Rejected>> {
        let incoming: Vec<Incoming<'_>> = resources
            .iter()
            .map(|r| Incoming {
                name: None,
                version: version_info,
                resource: r,
            })
            .collect();
        let full_state =
            ResourceKind::from_type_url(type_url).is_some_and(ResourceKind::is_wildcard);
        self.apply(
            type_url,
            &Update {
                version_info,
                resources: &incoming,
                removed: &[],
                full_state,
                now,
            },
        )
    }

    /// Apply a delta response (`removed` lists names to drop).
    pub fn apply_delta(
        &mut self,
        type_url: &str,
        system_version_info: &str,
        resources: &[Incoming<'_>],
        removed: &[String],
        now: SystemTime,
    ) -> Result<(), Vec<Rejected>> {
        self.apply(
            type_url,
            &Update {
                version_info: system_version_info,
                resources,
                removed,
                full_state: false,
                now,
            },
        )
    }

    fn apply(&mut self, type_url: &str, u: &Update<'_, '_>) -> Result<(), Vec<Rejected>> {
        let Some(kind) = ResourceKind::from_type_url(type_url) else {
            return Err(vec![Rejected {
                name: if type_url.is_empty() {
                    "<empty type_url>".to_string()
                } else {
                    type_url.to_string()
                },
                reason: RejectReason::UnknownType,
            }]);
        };
        with_handler!(kind, H => self.apply_as::<H>(u))
    }

    /// The steps every type shares: decode all (any failure rejects the response), validate
    /// each (a failure rejects that resource) with the type's checks across the response,
    /// then record what was accepted and rejected and promote what has warmed.
    fn apply_as<H: Handler>(&mut self, u: &Update<'_, '_>) -> Result<(), Vec<Rejected>> {
        let decoded = match decode_all::<H>(u.resources) {
            Ok(d) => d,
            Err(rejected) => {
                // Nothing changes but the error state `/config_dump` shows.
                let st = H::state_mut(self);
                for r in &rejected {
                    st.error(r, u.version_info, u.now, None);
                }
                return Err(rejected);
            }
        };
        let checked = self.validate::<H>(decoded, u);
        self.commit::<H>(checked, u)
    }

    /// Step 2: each resource against the names of the response and the static resources,
    /// then the type's checks across the response.
    fn validate<H: Handler>(
        &self,
        decoded: Vec<Decoded<'_, '_, H::Model>>,
        u: &Update<'_, '_>,
    ) -> Checked<H::Model> {
        let static_names = H::static_names(self);
        let mut rejected: Vec<Rejection> = Vec::new();
        let mut seen = BTreeSet::new();
        let mut upserts: Vec<Upsert<H::Model>> = Vec::new();
        for (name, model, inc) in decoded {
            let model = if !seen.insert(name.clone()) {
                Err(RejectReason::Duplicate(name.clone()))
            } else if static_names.contains(&name) {
                Err(RejectReason::Static)
            } else {
                model
            };
            match model {
                Ok(model) => upserts.push((
                    name,
                    Entry {
                        model: Arc::new(model),
                        record: ResourceRecord {
                            version_info: inc.version.to_string(),
                            last_updated: u.now,
                            resource: to_prost(inc.resource),
                        },
                    },
                )),
                Err(reason) => rejected.push((
                    Rejected {
                        name: if name.is_empty() {
                            "<unnamed>".into()
                        } else {
                            name
                        },
                        reason,
                    },
                    to_prost(inc.resource),
                )),
            }
        }
        let batch = Batch {
            full_state: u.full_state,
            seen: &seen,
        };
        let (upserts, more) = H::check_batch(self, upserts, &batch);
        rejected.extend(more);
        Checked {
            upserts,
            rejected,
            seen,
        }
    }

    /// Step 3: removals (explicit, or missing from a full state), upserts and rejections go
    /// into the type's state; the type's version moves only when nothing was rejected.
    fn commit<H: Handler>(
        &mut self,
        c: Checked<H::Model>,
        u: &Update<'_, '_>,
    ) -> Result<(), Vec<Rejected>> {
        let st = H::state_mut(self);
        if u.full_state {
            st.retain_names(&c.seen);
        }
        for n in u.removed {
            st.accepted.remove(n);
            st.errors.remove(n);
        }
        for (n, e) in c.upserts {
            st.errors.remove(&n);
            st.accepted.insert(n, e);
        }
        for (r, raw) in &c.rejected {
            st.error(r, u.version_info, u.now, Some(raw));
        }
        st.last_updated = Some(u.now);
        if c.rejected.is_empty() {
            st.version_info = u.version_info.to_string();
        }
        self.poll_secret_waits(u.now);
        self.reconcile();
        if c.rejected.is_empty() {
            Ok(())
        } else {
            Err(c.rejected.into_iter().map(|(r, _)| r).collect())
        }
    }

    /// Forget RDS/EDS/SDS resources nobody subscribes to any more.
    pub fn drop_unsubscribed(&mut self) {
        if let Some(wanted) = RouteHandler::subscriptions(self) {
            self.rds.retain_names(&wanted);
        }
        if let Some(wanted) = EndpointsHandler::subscriptions(self) {
            self.eds.retain_names(&wanted);
        }
        if let Some(wanted) = SecretHandler::subscriptions(self) {
            self.sds.retain_names(&wanted);
        }
        self.reconcile();
    }

    /// Promote warmed resources to active; drop active ones that were removed.
    fn reconcile(&mut self) {
        let eds_known = &self.eds.accepted;
        let rds_known = &self.rds.accepted;
        let (sds_known, given_up) = (&self.sds.accepted, &self.secrets_given_up);
        let secret_ready = |n: &String| sds_known.contains_key(n) || given_up.contains(n);
        let ads = |s: &SdsSource| *s == SdsSource::Ads;
        self.cds.promote(|c| {
            eds_name(c).is_none_or(|s| eds_known.contains_key(&s))
                && cluster_secrets(c, ads).iter().all(secret_ready)
        });
        self.lds.promote(|l| {
            rds_names(l).iter().all(|r| rds_known.contains_key(r))
                && listener_secrets(l, ads).iter().all(secret_ready)
        });
        self.rds.promote(|_| true);
        self.eds.promote(|_| true);
        self.sds.promote(|_| true);
    }

    /// Names of the dynamic listeners and clusters that are warming.
    pub fn warming(&self) -> (Vec<String>, Vec<String>) {
        (self.lds.warming_names(), self.cds.warming_names())
    }

    /// The snapshot that serves traffic: static resources plus active dynamic ones.
    pub fn snapshot(&self) -> Snapshot {
        let listeners = self
            .static_listeners
            .iter()
            .cloned()
            .chain(self.lds.active.values().map(|e| (*e.model).clone()));
        let clusters = self
            .static_clusters
            .iter()
            .cloned()
            .chain(self.cds.active.values().map(|e| (*e.model).clone()));
        let assignments: BTreeMap<String, Arc<LoadAssignment>> = self
            .eds
            .active
            .iter()
            .map(|(n, e)| (n.clone(), e.model.clone()))
            .collect();
        let routes = self
            .rds
            .active
            .iter()
            .map(|(n, e)| (n.clone(), e.model.clone()))
            .collect();
        let dump = XdsDump {
            listeners: self.lds.dump(),
            clusters: self.cds.dump(),
            routes: self.rds.dump(),
            endpoints: self.eds.dump(),
            secrets: self.sds.dump(),
        };
        let mut secrets = self.static_secrets.clone();
        secrets.extend(
            self.external_secrets
                .iter()
                .map(|(n, s)| (n.clone(), s.clone())),
        );
        secrets.extend(
            self.sds
                .active
                .iter()
                .map(|(n, e)| (n.clone(), e.model.clone())),
        );
        let mut snap = Snapshot::with_xds(
            listeners,
            clusters,
            &assignments,
            routes,
            self.static_listeners
                .iter()
                .map(|l| l.name.clone())
                .collect(),
            self.static_clusters
                .iter()
                .map(|c| c.name.clone())
                .collect(),
            Arc::new(dump),
        );
        snap.secrets = secrets;
        snap
    }
}

#[cfg(test)]
mod tests;
