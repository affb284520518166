//! One handler per resource type: how its wire bytes become a model value, the proto rules
//! Envoy checks while decoding, the names it depends on, and any rule across a response.
//! A resource that fails rejects itself with a typed [`RejectReason`]; [`super::Resources`]
//! runs the steps common to every type (decode all, validate each, record, warm).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::cluster::v3::Cluster as PbCluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment as PbCla;
use envoy_types::pb::envoy::config::listener::v3::Listener as PbListener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration as PbRoute;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret as PbSecret;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use super::{Entry, Resources, TypeState};
use crate::model::tls::{SdsRef, SdsSource, Secret};
use crate::model::{
    Cluster, ClusterKind, Listener, LoadAssignment, ModelError, NetworkAction, RouteConfig,
};
use crate::xds::ResourceKind;

/// A resource the client refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}: {reason}")]
pub struct Rejected {
    /// Resource name, `resources[i]` when the name could not be read, `<unnamed>` when empty,
    /// or the type URL when the whole type is unknown.
    pub name: String,
    /// What is wrong.
    pub reason: RejectReason,
}

/// Why a resource (or a whole response) was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// The response's type URL is not one skiff subscribes to.
    #[error("type URL is not one skiff subscribes to")]
    UnknownType,
    /// The resource's `Any` holds another type than the response's.
    #[error("resource type {found:?} does not match the response type {expected:?}")]
    WrongType {
        /// The resource's type URL.
        found: String,
        /// The response's.
        expected: &'static str,
    },
    /// The bytes are not a message of the type.
    #[error("cannot decode {type_name}: {error}")]
    Decode {
        /// Proto message name.
        type_name: &'static str,
        /// prost's error.
        error: prost::DecodeError,
    },
    /// A rule Envoy checks while decoding (protoc-gen-validate): rejects the whole response.
    #[error("{name:?}: {rule}")]
    ProtoRule {
        /// Resource name.
        name: String,
        /// The rule broken.
        rule: ProtoRule,
    },
    /// A delta `Resource` wrapper names another resource than the one it carries.
    #[error("resource is named {name:?} but its wrapper says {wrapper:?}")]
    NameMismatch {
        /// Name inside the resource.
        name: String,
        /// Name on the wrapper.
        wrapper: String,
    },
    /// The name appears twice in one response.
    #[error("duplicate resource name {0:?} in one response")]
    Duplicate(String),
    /// The name is a bootstrap static resource's.
    #[error("cannot update a static resource over xDS")]
    Static,
    /// The content fails the model's validation.
    #[error("{}", field_and_reason(.0))]
    Invalid(ModelError),
    /// A TLS context names a secret without `sds_config` that the bootstrap does not have
    /// (Envoy: "Unknown static secret").
    #[error(
        "unknown static secret {0:?}: a TLS context names it without sds_config and the bootstrap's static_resources.secrets has none"
    )]
    UnknownStaticSecret(String),
    /// Another listener already has the address (Envoy refuses two listeners on one address).
    #[error("address {address} is already used by listener {other:?}")]
    AddressInUse {
        /// The address.
        address: SocketAddr,
        /// The listener that has it.
        other: String,
    },
}

/// `field: reason`, or the reason alone for a resource-level problem.
fn field_and_reason(e: &ModelError) -> String {
    if e.field.is_empty() {
        e.reason.clone()
    } else {
        format!("{}: {}", e.field, e.reason)
    }
}

/// A protoc-gen-validate rule of Envoy's protos that skiff checks while decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtoRule {
    /// `Cluster.connect_timeout` must be > 0.
    #[error("connect_timeout: value must be greater than 0s")]
    ConnectTimeout,
    /// `Cluster.lb_policy` must be a defined enum value.
    #[error("lb_policy: {0} is not a defined value")]
    LbPolicy(i32),
    /// `Cluster.type` must be a defined enum value.
    #[error("type: {0} is not a defined value")]
    DiscoveryType(i32),
}

/// The NACK message for a list of rejections (Envoy's wording for LDS and CDS).
pub fn nack_message(type_url: &str, rejected: &[Rejected]) -> String {
    let list = rejected
        .iter()
        .map(Rejected::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    match ResourceKind::from_type_url(type_url) {
        Some(ResourceKind::Listener) => format!("Error adding/updating listener(s) {list}"),
        Some(ResourceKind::Cluster) => format!("Error adding/updating cluster(s) {list}"),
        _ => list,
    }
}

/// What one response is, for the checks across its resources.
pub(super) struct Batch<'a> {
    /// A state-of-the-world response of a wildcard type: it carries the whole set.
    pub(super) full_state: bool,
    /// Every name the response carries, rejected ones included.
    pub(super) seen: &'a BTreeSet<String>,
}

/// A validated resource about to be accepted, by name.
pub(super) type Upsert<M> = (String, Entry<M>);

/// A rejection and the raw resource it refers to (kept for `/config_dump`'s error state).
pub(super) type Rejection = (Rejected, prost_types::Any);

/// One xDS resource type.
pub(super) trait Handler {
    /// Its kind.
    const KIND: ResourceKind;
    /// The wire message.
    type Proto: Message + Default;
    /// skiff's validated type.
    type Model;

    /// The resource's name (`cluster_name` for a ClusterLoadAssignment).
    fn name(p: &Self::Proto) -> &str;

    /// Envoy's decode-time (PGV) rules; breaking one rejects the whole response.
    fn proto_rules(_p: &Self::Proto) -> Result<(), ProtoRule> {
        Ok(())
    }

    /// Validation into the model; a failure rejects only this resource.
    fn to_model(p: &Self::Proto) -> Result<Self::Model, ModelError>;

    /// This type's state in `r`.
    fn state(r: &Resources) -> &TypeState<Self::Model>;

    /// This type's state in `r`, to change.
    fn state_mut(r: &mut Resources) -> &mut TypeState<Self::Model>;

    /// Names of the bootstrap's static resources of this type (xDS cannot replace them).
    fn static_names(_r: &Resources) -> BTreeSet<String> {
        BTreeSet::new()
    }

    /// Rules across the resources of one response and what is already accepted: returns the
    /// upserts kept and the ones rejected.
    fn check_batch(
        _r: &Resources,
        upserts: Vec<Upsert<Self::Model>>,
        _batch: &Batch<'_>,
    ) -> (Vec<Upsert<Self::Model>>, Vec<Rejection>) {
        (upserts, Vec::new())
    }

    /// Names to subscribe to; `None` is a wildcard subscription.
    fn subscriptions(r: &Resources) -> Option<BTreeSet<String>>;
}

/// Decodes one resource of `H`'s type: `Err` rejects the whole response; `Ok` carries the
/// name and the model, or the reason this resource alone is rejected.
pub(super) fn decode<H: Handler>(
    any: &Any,
) -> Result<(String, Result<H::Model, RejectReason>), RejectReason> {
    if any.type_url != H::KIND.type_url() {
        return Err(RejectReason::WrongType {
            found: any.type_url.clone(),
            expected: H::KIND.type_url(),
        });
    }
    let p = H::Proto::decode(any.value.as_slice()).map_err(|error| RejectReason::Decode {
        type_name: H::KIND.type_name(),
        error,
    })?;
    H::proto_rules(&p).map_err(|rule| RejectReason::ProtoRule {
        name: H::name(&p).to_owned(),
        rule,
    })?;
    let model = H::to_model(&p).map_err(RejectReason::Invalid);
    Ok((H::name(&p).to_owned(), model))
}

// === impl ListenerHandler ===

/// LDS. Valid listeners of a response are applied, invalid ones rejected (Envoy's LDS applies
/// the valid part). A listener is also rejected when its name is a static listener's or its
/// address is taken by another listener (static, accepted and kept, or earlier in the
/// response); internal listeners have no address and never conflict.
pub(super) struct ListenerHandler;

impl Handler for ListenerHandler {
    const KIND: ResourceKind = ResourceKind::Listener;
    type Proto = PbListener;
    type Model = Listener;

    fn name(p: &PbListener) -> &str {
        &p.name
    }

    fn to_model(p: &PbListener) -> Result<Listener, ModelError> {
        Listener::try_from(p)
    }

    fn state(r: &Resources) -> &TypeState<Listener> {
        &r.lds
    }

    fn state_mut(r: &mut Resources) -> &mut TypeState<Listener> {
        &mut r.lds
    }

    fn static_names(r: &Resources) -> BTreeSet<String> {
        r.static_listeners.iter().map(|l| l.name.clone()).collect()
    }

    fn check_batch(
        r: &Resources,
        upserts: Vec<Upsert<Listener>>,
        batch: &Batch<'_>,
    ) -> (Vec<Upsert<Listener>>, Vec<Rejection>) {
        let (upserts, mut rejected) =
            static_secrets_known(r, upserts, |l| listener_secrets(l, is_static));
        let mut taken: BTreeMap<SocketAddr, String> = r
            .static_listeners
            .iter()
            .filter(|l| l.internal.is_none())
            .map(|l| (l.address, l.name.clone()))
            .collect();
        let names_in: BTreeSet<&str> = upserts.iter().map(|(n, _)| n.as_str()).collect();
        // Accepted listeners that this response keeps as they are.
        for (n, e) in &r.lds.accepted {
            if !names_in.contains(n.as_str())
                && (!batch.full_state || batch.seen.contains(n))
                && e.model.internal.is_none()
            {
                taken.insert(e.model.address, n.clone());
            }
        }
        let mut keep = Vec::new();
        for (name, e) in upserts {
            // Internal listeners have no socket address: they are reached by name.
            if e.model.internal.is_some() {
                keep.push((name, e));
                continue;
            }
            let address = e.model.address;
            match taken.get(&address) {
                Some(other) if *other != name => rejected.push((
                    Rejected {
                        name,
                        reason: RejectReason::AddressInUse {
                            address,
                            other: other.clone(),
                        },
                    },
                    e.record.resource.clone(),
                )),
                _ => {
                    taken.insert(address, name.clone());
                    keep.push((name, e));
                }
            }
        }
        (keep, rejected)
    }

    fn subscriptions(_r: &Resources) -> Option<BTreeSet<String>> {
        None
    }
}

/// The RDS names a listener's HTTP connection managers wait for.
pub(super) fn rds_names(l: &Listener) -> Vec<String> {
    l.filter_chains
        .iter()
        .chain(l.default_filter_chain.iter())
        .filter_map(|fc| match &fc.action {
            NetworkAction::Http(h) => h.rds_route_config_name.clone(),
            _ => None,
        })
        .collect()
}

// === impl ClusterHandler ===

/// CDS. The proto rules (`connect_timeout` > 0, defined `lb_policy` and `type`) reject the
/// whole response, as Envoy's decoding does; otherwise valid clusters are applied and invalid
/// ones rejected, as are clusters named like a static one.
pub(super) struct ClusterHandler;

impl Handler for ClusterHandler {
    const KIND: ResourceKind = ResourceKind::Cluster;
    type Proto = PbCluster;
    type Model = Cluster;

    fn name(p: &PbCluster) -> &str {
        &p.name
    }

    fn proto_rules(c: &PbCluster) -> Result<(), ProtoRule> {
        use envoy_types::pb::envoy::config::cluster::v3::cluster::ClusterDiscoveryType as Cdt;
        if let Some(d) = &c.connect_timeout
            && (d.seconds < 0 || (d.seconds == 0 && d.nanos <= 0))
        {
            return Err(ProtoRule::ConnectTimeout);
        }
        if !matches!(c.lb_policy, 0..=3 | 5..=7) {
            return Err(ProtoRule::LbPolicy(c.lb_policy));
        }
        if let Some(Cdt::Type(t)) = c.cluster_discovery_type
            && !(0..=4).contains(&t)
        {
            return Err(ProtoRule::DiscoveryType(t));
        }
        Ok(())
    }

    fn to_model(p: &PbCluster) -> Result<Cluster, ModelError> {
        Cluster::try_from(p)
    }

    fn state(r: &Resources) -> &TypeState<Cluster> {
        &r.cds
    }

    fn state_mut(r: &mut Resources) -> &mut TypeState<Cluster> {
        &mut r.cds
    }

    fn static_names(r: &Resources) -> BTreeSet<String> {
        r.static_clusters.iter().map(|c| c.name.clone()).collect()
    }

    fn check_batch(
        r: &Resources,
        upserts: Vec<Upsert<Cluster>>,
        _batch: &Batch<'_>,
    ) -> (Vec<Upsert<Cluster>>, Vec<Rejection>) {
        static_secrets_known(r, upserts, |c| cluster_secrets(c, is_static))
    }

    fn subscriptions(_r: &Resources) -> Option<BTreeSet<String>> {
        None
    }
}

/// The EDS service name an EDS cluster waits for.
pub(super) fn eds_name(c: &Cluster) -> Option<String> {
    match &c.kind {
        ClusterKind::Eds { service_name } => Some(service_name.clone()),
        _ => None,
    }
}

// === impl RouteHandler ===

/// RDS. Valid route configurations are applied, invalid ones rejected. Subscribed by name:
/// those the HTTP connection managers of accepted and static listeners name.
pub(super) struct RouteHandler;

impl Handler for RouteHandler {
    const KIND: ResourceKind = ResourceKind::Route;
    type Proto = PbRoute;
    type Model = RouteConfig;

    fn name(p: &PbRoute) -> &str {
        &p.name
    }

    fn to_model(p: &PbRoute) -> Result<RouteConfig, ModelError> {
        RouteConfig::try_from(p)
    }

    fn state(r: &Resources) -> &TypeState<RouteConfig> {
        &r.rds
    }

    fn state_mut(r: &mut Resources) -> &mut TypeState<RouteConfig> {
        &mut r.rds
    }

    fn subscriptions(r: &Resources) -> Option<BTreeSet<String>> {
        Some(
            r.lds
                .accepted
                .values()
                .flat_map(|e| rds_names(&e.model))
                .chain(r.static_listeners.iter().flat_map(rds_names))
                .collect(),
        )
    }
}

// === impl EndpointsHandler ===

/// EDS. Valid load assignments are applied, invalid ones (an empty `cluster_name` included)
/// rejected. Subscribed by name: the service names of accepted and static EDS clusters.
pub(super) struct EndpointsHandler;

impl Handler for EndpointsHandler {
    const KIND: ResourceKind = ResourceKind::Endpoints;
    type Proto = PbCla;
    type Model = LoadAssignment;

    fn name(p: &PbCla) -> &str {
        &p.cluster_name
    }

    fn to_model(p: &PbCla) -> Result<LoadAssignment, ModelError> {
        LoadAssignment::try_from(p)
    }

    fn state(r: &Resources) -> &TypeState<LoadAssignment> {
        &r.eds
    }

    fn state_mut(r: &mut Resources) -> &mut TypeState<LoadAssignment> {
        &mut r.eds
    }

    fn subscriptions(r: &Resources) -> Option<BTreeSet<String>> {
        Some(
            r.cds
                .accepted
                .values()
                .filter_map(|e| eds_name(&e.model))
                .chain(r.static_clusters.iter().filter_map(eds_name))
                .collect(),
        )
    }
}

// === impl SecretHandler ===

/// SDS over ADS. Valid secrets are applied, invalid ones rejected (Envoy's SDS applies each
/// secret on its own). Subscribed by name: the secrets that accepted and static clusters and
/// listeners name with `sds_config: {ads: {}}`; a secret named like a bootstrap static secret
/// is rejected (`Static`).
pub(super) struct SecretHandler;

impl Handler for SecretHandler {
    const KIND: ResourceKind = ResourceKind::Secret;
    type Proto = PbSecret;
    type Model = Secret;

    fn name(p: &PbSecret) -> &str {
        &p.name
    }

    fn to_model(p: &PbSecret) -> Result<Secret, ModelError> {
        Secret::try_from(p)
    }

    fn state(r: &Resources) -> &TypeState<Secret> {
        &r.sds
    }

    fn state_mut(r: &mut Resources) -> &mut TypeState<Secret> {
        &mut r.sds
    }

    fn static_names(r: &Resources) -> BTreeSet<String> {
        r.static_secrets.keys().cloned().collect()
    }

    fn subscriptions(r: &Resources) -> Option<BTreeSet<String>> {
        Some(r.secret_names(|s| *s == SdsSource::Ads))
    }
}

/// The names of the secrets a cluster takes from sources `from` accepts.
pub(super) fn cluster_secrets(c: &Cluster, from: impl Fn(&SdsSource) -> bool) -> Vec<String> {
    names(c.transport.sds_refs(), from)
}

/// The names of the secrets a listener takes from sources `from` accepts.
pub(super) fn listener_secrets(l: &Listener, from: impl Fn(&SdsSource) -> bool) -> Vec<String> {
    names(l.sds_refs(), from)
}

fn names<'a>(
    refs: impl Iterator<Item = &'a SdsRef>,
    from: impl Fn(&SdsSource) -> bool,
) -> Vec<String> {
    refs.filter(|r| from(&r.source))
        .map(|r| r.name.clone())
        .collect()
}

fn is_static(s: &SdsSource) -> bool {
    *s == SdsSource::Static
}

/// Rejects the upserts whose TLS contexts name a static secret the bootstrap does not have.
fn static_secrets_known<M>(
    r: &Resources,
    upserts: Vec<Upsert<M>>,
    names: impl Fn(&M) -> Vec<String>,
) -> (Vec<Upsert<M>>, Vec<Rejection>) {
    let mut keep = Vec::new();
    let mut rejected = Vec::new();
    for (name, e) in upserts {
        match names(&e.model)
            .into_iter()
            .find(|s| !r.static_secrets.contains_key(s))
        {
            Some(missing) => rejected.push((
                Rejected {
                    name,
                    reason: RejectReason::UnknownStaticSecret(missing),
                },
                e.record.resource.clone(),
            )),
            None => keep.push((name, e)),
        }
    }
    (keep, rejected)
}
