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
//!   (Envoy's LDS/CDS/RDS/EDS all apply the valid part of a response).
//! - SotW LDS and CDS responses carry the whole state: a resource missing from a response is
//!   removed (a name present but invalid is not). SotW RDS and EDS responses only add or
//!   update; their resources go away when nothing subscribes to them any more.
//! - Delta: `removed_resources` removes; everything else is an add or update.
//!
//! # Warming
//! An EDS cluster is warming until the `ClusterLoadAssignment` of its service name is known; a
//! listener is warming until every RDS route configuration its HTTP connection managers name is
//! known. While a new version warms, the previous version (if any) keeps serving.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use envoy_types::pb::envoy::config::cluster::v3::Cluster as PbCluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment as PbCla;
use envoy_types::pb::envoy::config::listener::v3::Listener as PbListener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration as PbRoute;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use skiff_proto::{CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL, LISTENER_TYPE_URL, ROUTE_TYPE_URL};

use crate::model::{Cluster, ClusterKind, Listener, LoadAssignment, NetworkAction, RouteConfig};
use crate::state::{ErrorRecord, ResourceRecord, Snapshot, TypeDump, XdsDump};

/// The four type URLs skiff subscribes to, in the order Envoy first requests them.
pub const TYPE_URLS: [&str; 4] = [
    CLUSTER_TYPE_URL,
    ENDPOINT_TYPE_URL,
    LISTENER_TYPE_URL,
    ROUTE_TYPE_URL,
];

/// A resource the client refused, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Resource name, or `resources[i]` when the name could not be read.
    pub name: String,
    /// What is wrong (field path and reason).
    pub reason: String,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.name, self.reason)
    }
}

/// The NACK message for a list of rejections (Envoy's wording for LDS and CDS).
pub fn nack_message(type_url: &str, rejected: &[Rejected]) -> String {
    let list = rejected
        .iter()
        .map(Rejected::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    match type_url {
        LISTENER_TYPE_URL => format!("Error adding/updating listener(s) {list}"),
        CLUSTER_TYPE_URL => format!("Error adding/updating cluster(s) {list}"),
        _ => list,
    }
}

/// A validated resource of any of the four types.
#[derive(Debug, Clone)]
enum Model {
    Listener(Arc<Listener>),
    Cluster(Arc<Cluster>),
    Route(Arc<RouteConfig>),
    Endpoints(Arc<LoadAssignment>),
}

#[derive(Debug, Clone)]
struct Entry {
    model: Model,
    record: ResourceRecord,
}

/// One type URL's state.
#[derive(Debug, Default)]
struct TypeState {
    /// Version of the last response applied without rejection (SotW: what ACKs carry).
    version_info: String,
    last_updated: Option<SystemTime>,
    /// Latest accepted version of each resource.
    accepted: BTreeMap<String, Entry>,
    /// What is in the snapshot (differs from `accepted` while a new version warms).
    active: BTreeMap<String, Entry>,
    errors: BTreeMap<String, ErrorRecord>,
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

fn to_prost(a: &Any) -> prost_types::Any {
    prost_types::Any {
        type_url: a.type_url.clone(),
        value: a.value.clone(),
    }
}

fn reason(e: crate::model::ModelError) -> String {
    if e.field.is_empty() {
        e.reason
    } else {
        format!("{}: {}", e.field, e.reason)
    }
}

/// The cluster rules Envoy checks while decoding (protoc-gen-validate), before any resource of
/// the response is applied: breaking one rejects the whole response, as in Envoy.
fn proto_rules_cluster(c: &PbCluster) -> Result<(), String> {
    if let Some(d) = &c.connect_timeout
        && (d.seconds < 0 || (d.seconds == 0 && d.nanos <= 0))
    {
        return Err("connect_timeout: value must be greater than 0s".into());
    }
    if !matches!(c.lb_policy, 0..=3 | 5..=7) {
        return Err(format!("lb_policy: {} is not a defined value", c.lb_policy));
    }
    use envoy_types::pb::envoy::config::cluster::v3::cluster::ClusterDiscoveryType as Cdt;
    if let Some(Cdt::Type(t)) = c.cluster_discovery_type
        && !(0..=4).contains(&t)
    {
        return Err(format!("type: {t} is not a defined value"));
    }
    Ok(())
}

/// Decode one resource: `Ok((name, proto-checked model))`, or the decode error.
fn decode(type_url: &str, any: &Any) -> Result<(String, Result<Model, String>), String> {
    if any.type_url != type_url {
        return Err(format!(
            "resource type {:?} does not match the response type {type_url:?}",
            any.type_url
        ));
    }
    let bytes = any.value.as_slice();
    let bad =
        |e: prost::DecodeError| format!("cannot decode {}: {e}", skiff_proto::type_name(type_url));
    Ok(match type_url {
        LISTENER_TYPE_URL => {
            let p = PbListener::decode(bytes).map_err(bad)?;
            let m = Listener::try_from(&p).map(|l| Model::Listener(Arc::new(l)));
            (p.name, m.map_err(reason))
        }
        CLUSTER_TYPE_URL => {
            let p = PbCluster::decode(bytes).map_err(bad)?;
            proto_rules_cluster(&p).map_err(|e| format!("{:?}: {e}", p.name))?;
            let m = Cluster::try_from(&p).map(|c| Model::Cluster(Arc::new(c)));
            (p.name, m.map_err(reason))
        }
        ROUTE_TYPE_URL => {
            let p = PbRoute::decode(bytes).map_err(bad)?;
            let m = RouteConfig::try_from(&p).map(|r| Model::Route(Arc::new(r)));
            (p.name, m.map_err(reason))
        }
        ENDPOINT_TYPE_URL => {
            let p = PbCla::decode(bytes).map_err(bad)?;
            let m = if p.cluster_name.is_empty() {
                Err("cluster_name: must not be empty".to_string())
            } else {
                LoadAssignment::from_proto(&p)
                    .map(|a| Model::Endpoints(Arc::new(a)))
                    .map_err(|e| format!("{}: {}", e.field, e.reason))
            };
            (p.cluster_name, m)
        }
        other => return Err(format!("type URL {other:?} is not one skiff subscribes to")),
    })
}

/// Everything the client knows, plus the bootstrap's static resources.
#[derive(Debug, Default)]
pub struct Resources {
    static_listeners: Vec<Listener>,
    static_clusters: Vec<Cluster>,
    lds: TypeState,
    cds: TypeState,
    rds: TypeState,
    eds: TypeState,
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

    fn state(&self, type_url: &str) -> Option<&TypeState> {
        match type_url {
            LISTENER_TYPE_URL => Some(&self.lds),
            CLUSTER_TYPE_URL => Some(&self.cds),
            ROUTE_TYPE_URL => Some(&self.rds),
            ENDPOINT_TYPE_URL => Some(&self.eds),
            _ => None,
        }
    }

    fn state_mut(&mut self, type_url: &str) -> Option<&mut TypeState> {
        match type_url {
            LISTENER_TYPE_URL => Some(&mut self.lds),
            CLUSTER_TYPE_URL => Some(&mut self.cds),
            ROUTE_TYPE_URL => Some(&mut self.rds),
            ENDPOINT_TYPE_URL => Some(&mut self.eds),
            _ => None,
        }
    }

    /// Version of the last fully accepted response of this type (what SotW requests carry).
    pub fn version_info(&self, type_url: &str) -> String {
        self.state(type_url)
            .map(|s| s.version_info.clone())
            .unwrap_or_default()
    }

    /// Per-resource versions of what is accepted (delta's `initial_resource_versions`).
    pub fn resource_versions(&self, type_url: &str) -> BTreeMap<String, String> {
        self.state(type_url)
            .map(|s| {
                s.accepted
                    .iter()
                    .map(|(k, e)| (k.clone(), e.record.version_info.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Names to subscribe to; `None` is a wildcard subscription (LDS, CDS).
    pub fn subscriptions(&self, type_url: &str) -> Option<BTreeSet<String>> {
        match type_url {
            LISTENER_TYPE_URL | CLUSTER_TYPE_URL => None,
            ROUTE_TYPE_URL => Some(
                self.lds
                    .accepted
                    .values()
                    .filter_map(|e| match &e.model {
                        Model::Listener(l) => Some(rds_names(l)),
                        _ => None,
                    })
                    .flatten()
                    .chain(self.static_listeners.iter().flat_map(rds_names))
                    .collect(),
            ),
            ENDPOINT_TYPE_URL => Some(
                self.cds
                    .accepted
                    .values()
                    .filter_map(|e| match &e.model {
                        Model::Cluster(c) => eds_name(c),
                        _ => None,
                    })
                    .chain(self.static_clusters.iter().filter_map(eds_name))
                    .collect(),
            ),
            _ => Some(BTreeSet::new()),
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
        let full_state = matches!(type_url, LISTENER_TYPE_URL | CLUSTER_TYPE_URL);
        self.apply(type_url, version_info, &incoming, &[], full_state, now)
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
            system_version_info,
            resources,
            removed,
            false,
            now,
        )
    }

    fn apply(
        &mut self,
        type_url: &str,
        version_info: &str,
        resources: &[Incoming<'_>],
        removed: &[String],
        full_state: bool,
        now: SystemTime,
    ) -> Result<(), Vec<Rejected>> {
        if self.state(type_url).is_none() {
            return Err(vec![Rejected {
                name: if type_url.is_empty() {
                    "<empty type_url>".to_string()
                } else {
                    type_url.to_string()
                },
                reason: "type URL is not one skiff subscribes to".into(),
            }]);
        }
        // Step 1: decode everything; any decode failure rejects the whole response.
        let mut decoded = Vec::with_capacity(resources.len());
        let mut decode_errors = Vec::new();
        for (i, inc) in resources.iter().enumerate() {
            let label = inc
                .name
                .filter(|n| !n.is_empty())
                .map(str::to_string)
                .unwrap_or_else(|| format!("resources[{i}]"));
            match decode(type_url, inc.resource) {
                Ok((name, model)) => {
                    if let Some(wrapped) = inc.name
                        && wrapped != name
                    {
                        decode_errors.push(Rejected {
                            name: label,
                            reason: format!(
                                "resource is named {name:?} but its wrapper says {wrapped:?}"
                            ),
                        });
                        continue;
                    }
                    decoded.push((name, model, inc));
                }
                Err(reason) => decode_errors.push(Rejected {
                    name: label,
                    reason,
                }),
            }
        }
        if !decode_errors.is_empty() {
            if let Some(st) = self.state_mut(type_url) {
                for r in &decode_errors {
                    st.errors.insert(
                        r.name.clone(),
                        ErrorRecord {
                            version_info: version_info.to_string(),
                            last_update_attempt: now,
                            details: r.to_string(),
                            resource: None,
                        },
                    );
                }
            }
            return Err(decode_errors);
        }

        // Step 2: validate each resource; collect the new accepted set.
        let static_names: BTreeSet<String> = match type_url {
            LISTENER_TYPE_URL => self
                .static_listeners
                .iter()
                .map(|l| l.name.clone())
                .collect(),
            CLUSTER_TYPE_URL => self
                .static_clusters
                .iter()
                .map(|c| c.name.clone())
                .collect(),
            _ => BTreeSet::new(),
        };
        let mut rejected = Vec::new();
        let mut seen = BTreeSet::new();
        let mut upserts = Vec::new();
        for (name, model, inc) in decoded {
            let model = if !seen.insert(name.clone()) {
                Err(format!("duplicate resource name {name:?} in one response"))
            } else if static_names.contains(&name) {
                Err("cannot update a static resource over xDS".to_string())
            } else {
                model
            };
            match model {
                Ok(model) => upserts.push(Entry {
                    model,
                    record: ResourceRecord {
                        version_info: inc.version.to_string(),
                        last_updated: now,
                        resource: to_prost(inc.resource),
                    },
                }),
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
        // Listeners: two listeners on one address are refused, as Envoy does.
        if type_url == LISTENER_TYPE_URL {
            let mut taken: BTreeMap<std::net::SocketAddr, String> = self
                .static_listeners
                .iter()
                .filter(|l| l.internal.is_none())
                .map(|l| (l.address, l.name.clone()))
                .collect();
            let names_in: BTreeSet<String> = upserts.iter().map(name_of).collect();
            for (n, e) in &self.lds.accepted {
                if !names_in.contains(n)
                    && (!full_state || seen.contains(n))
                    && let Model::Listener(l) = &e.model
                    && l.internal.is_none()
                {
                    taken.insert(l.address, n.clone());
                }
            }
            let mut keep = Vec::new();
            for e in upserts {
                let Model::Listener(l) = &e.model else {
                    continue;
                };
                // Internal listeners have no socket address: they are reached by name.
                if l.internal.is_some() {
                    keep.push(e);
                    continue;
                }
                match taken.get(&l.address) {
                    Some(other) if *other != l.name => rejected.push((
                        Rejected {
                            name: l.name.clone(),
                            reason: format!(
                                "address {} is already used by listener {other:?}",
                                l.address
                            ),
                        },
                        e.record.resource.clone(),
                    )),
                    _ => {
                        taken.insert(l.address, l.name.clone());
                        keep.push(e);
                    }
                }
            }
            upserts = keep;
        }

        // Step 3: apply.
        let Some(st) = self.state_mut(type_url) else {
            return Ok(());
        };
        if full_state {
            st.accepted.retain(|n, _| seen.contains(n));
            st.errors.retain(|n, _| seen.contains(n));
        }
        for n in removed {
            st.accepted.remove(n);
            st.errors.remove(n);
        }
        for e in upserts {
            let n = name_of(&e);
            st.errors.remove(&n);
            st.accepted.insert(n, e);
        }
        for (r, raw) in &rejected {
            st.errors.insert(
                r.name.clone(),
                ErrorRecord {
                    version_info: version_info.to_string(),
                    last_update_attempt: now,
                    details: r.to_string(),
                    resource: Some(raw.clone()),
                },
            );
        }
        st.last_updated = Some(now);
        if rejected.is_empty() {
            st.version_info = version_info.to_string();
        }
        self.reconcile();
        if rejected.is_empty() {
            Ok(())
        } else {
            Err(rejected.into_iter().map(|(r, _)| r).collect())
        }
    }

    /// Forget RDS/EDS resources nobody subscribes to any more.
    pub fn drop_unsubscribed(&mut self) {
        for type_url in [ROUTE_TYPE_URL, ENDPOINT_TYPE_URL] {
            let Some(wanted) = self.subscriptions(type_url) else {
                continue;
            };
            if let Some(st) = self.state_mut(type_url) {
                st.accepted.retain(|n, _| wanted.contains(n));
                st.errors.retain(|n, _| wanted.contains(n));
            }
        }
        self.reconcile();
    }

    /// Promote warmed resources to active; drop active ones that were removed.
    fn reconcile(&mut self) {
        let eds_known: BTreeSet<String> = self.eds.accepted.keys().cloned().collect();
        let rds_known: BTreeSet<String> = self.rds.accepted.keys().cloned().collect();
        promote(&mut self.cds, |m| match m {
            Model::Cluster(c) => eds_name(c).is_none_or(|s| eds_known.contains(&s)),
            _ => true,
        });
        promote(&mut self.lds, |m| match m {
            Model::Listener(l) => rds_names(l).iter().all(|r| rds_known.contains(r)),
            _ => true,
        });
        promote(&mut self.rds, |_| true);
        promote(&mut self.eds, |_| true);
    }

    /// Names of the dynamic listeners and clusters that are warming.
    pub fn warming(&self) -> (Vec<String>, Vec<String>) {
        (warming_names(&self.lds), warming_names(&self.cds))
    }

    /// The snapshot that serves traffic: static resources plus active dynamic ones.
    pub fn snapshot(&self) -> Snapshot {
        let listeners =
            self.static_listeners
                .iter()
                .cloned()
                .chain(self.lds.active.values().filter_map(|e| match &e.model {
                    Model::Listener(l) => Some((**l).clone()),
                    _ => None,
                }));
        let clusters =
            self.static_clusters
                .iter()
                .cloned()
                .chain(self.cds.active.values().filter_map(|e| match &e.model {
                    Model::Cluster(c) => Some((**c).clone()),
                    _ => None,
                }));
        let assignments: BTreeMap<String, Arc<LoadAssignment>> = self
            .eds
            .active
            .iter()
            .filter_map(|(n, e)| match &e.model {
                Model::Endpoints(a) => Some((n.clone(), a.clone())),
                _ => None,
            })
            .collect();
        let routes = self
            .rds
            .active
            .iter()
            .filter_map(|(n, e)| match &e.model {
                Model::Route(r) => Some((n.clone(), r.clone())),
                _ => None,
            })
            .collect();
        let dump = XdsDump {
            listeners: type_dump(&self.lds),
            clusters: type_dump(&self.cds),
            routes: type_dump(&self.rds),
            endpoints: type_dump(&self.eds),
        };
        Snapshot::with_xds(
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
        )
    }
}

fn name_of(e: &Entry) -> String {
    match &e.model {
        Model::Listener(l) => l.name.clone(),
        Model::Cluster(c) => c.name.clone(),
        Model::Route(r) => r.name.clone(),
        Model::Endpoints(a) => a.cluster_name.clone(),
    }
}

fn promote(st: &mut TypeState, ready: impl Fn(&Model) -> bool) {
    st.active.retain(|n, _| st.accepted.contains_key(n));
    for (n, e) in &st.accepted {
        if ready(&e.model) {
            st.active.insert(n.clone(), e.clone());
        }
    }
}

fn warming_names(st: &TypeState) -> Vec<String> {
    st.accepted
        .iter()
        .filter(|(n, e)| st.active.get(*n).is_none_or(|a| a.record != e.record))
        .map(|(n, _)| n.clone())
        .collect()
}

fn type_dump(st: &TypeState) -> TypeDump {
    let warming = warming_names(st)
        .into_iter()
        .filter_map(|n| st.accepted.get(&n).map(|e| (n, e.record.clone())))
        .collect();
    TypeDump {
        version_info: st.version_info.clone(),
        last_updated: st.last_updated,
        active: st
            .active
            .iter()
            .map(|(n, e)| (n.clone(), e.record.clone()))
            .collect(),
        warming,
        errors: st.errors.clone(),
    }
}

fn rds_names(l: &Listener) -> Vec<String> {
    l.filter_chains
        .iter()
        .chain(l.default_filter_chain.iter())
        .filter_map(|fc| match &fc.action {
            NetworkAction::Http(h) => h.rds_route_config_name.clone(),
            _ => None,
        })
        .collect()
}

fn eds_name(c: &Cluster) -> Option<String> {
    match &c.kind {
        ClusterKind::Eds { service_name } => Some(service_name.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
