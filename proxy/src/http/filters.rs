//! The HTTP filters the connection manager runs before the router, in configuration order
//! (today `envoy.filters.http.rbac`). Each sees the request after the connection manager's own
//! header changes and after route selection (a route's `typed_per_filter_config` may replace
//! or disable it), and may answer in the router's place: Envoy's filters run even when no
//! route matches, and before a route's `direct_response` or redirect.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hyper::{HeaderMap, Method};
use tracing::debug;

use crate::model::listener::{HttpManager, HttpRbacFilter, RunFilter};
use crate::model::route::{self, PerFilterConfig, Route, RouteConfig, VirtualHost};
use crate::rbac::{self, ConnectionFacts, HttpRbacPerRoute, RequestFacts};
use crate::state::Snapshot;

/// A connection manager's filters with their counters, resolved once per downstream
/// connection.
#[derive(Debug)]
pub(super) struct Filters(Vec<Resolved>);

#[derive(Debug)]
enum Resolved {
    Rbac(Arc<HttpRbacFilter>, Arc<rbac::Counters>),
}

/// The request as the filters see it.
pub(super) struct Request<'a> {
    /// The downstream peer.
    pub client: SocketAddr,
    /// The downstream local address (the original destination on capture listeners).
    pub local: SocketAddr,
    /// The verified TLS peer, if the connection is TLS with a client certificate.
    pub peer: Option<&'a rbac::PeerIdentity>,
    /// The downstream remote address the connection manager trusts (`x-forwarded-for` per
    /// `use_remote_address` / `xff_num_trusted_hops`).
    pub remote: IpAddr,
    /// `:method`.
    pub method: &'a Method,
    /// `:path`, query included.
    pub path: &'a str,
    /// `:authority`.
    pub authority: &'a str,
    /// `:scheme`.
    pub scheme: &'a str,
    /// Headers after the connection manager's changes.
    pub headers: &'a HeaderMap,
}

/// Where the request was routed, if anywhere: per-filter configs come from there.
#[derive(Clone, Copy)]
pub(super) struct Routed<'a> {
    pub rc: &'a RouteConfig,
    pub vh: &'a VirtualHost,
    pub route: Option<&'a Route>,
}

/// Why a filter answered in the router's place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Stop {
    /// RBAC denied the request: 403 `RBAC: access denied`, with Envoy's response detail.
    RbacDenied {
        /// `rbac_access_denied_matched_policy[<policy or none>]`.
        detail: String,
    },
}

impl Filters {
    /// The filters of `manager`, with counters from `snap` (the snapshot the connection
    /// started on).
    pub(super) fn resolve(manager: &HttpManager, snap: &Snapshot) -> Filters {
        Filters(
            manager
                .filters
                .iter()
                .map(|f| match f {
                    RunFilter::Rbac(r) => Resolved::Rbac(r.clone(), snap.rbac_counters(&r.stats)),
                })
                .collect(),
        )
    }

    /// Whether there is any filter to run.
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Run the filters in order on `req`; the first that answers stops the request.
    pub(super) fn decode(&self, req: &Request<'_>, routed: Option<Routed<'_>>) -> Option<Stop> {
        for f in &self.0 {
            match f {
                Resolved::Rbac(filter, counters) => {
                    if let Some(stop) = run_rbac(filter, counters, req, routed) {
                        return Some(stop);
                    }
                }
            }
        }
        None
    }
}

/// One RBAC filter: its own rules, or the route's (`RBACPerRoute`, most specific level
/// first), counted in the filter's counters as Envoy does.
fn run_rbac(
    filter: &HttpRbacFilter,
    counters: &rbac::Counters,
    req: &Request<'_>,
    routed: Option<Routed<'_>>,
) -> Option<Stop> {
    let per_route =
        routed.and_then(|r| route::per_filter_config(r.rc, r.vh, r.route, &filter.name));
    let config = match per_route {
        Some(PerFilterConfig::Disabled) => return None,
        Some(PerFilterConfig::Rbac(p)) => match p.as_ref() {
            HttpRbacPerRoute::Disabled => return None,
            HttpRbacPerRoute::Override(c) => c,
        },
        None => &filter.config,
    };
    let conn = ConnectionFacts {
        source: req.client.ip(),
        direct_remote: req.client.ip(),
        remote: req.remote,
        destination: req.local,
        sni: None,
        peer: req.peer,
    };
    let facts = RequestFacts {
        method: req.method.as_str(),
        path: req.path,
        authority: req.authority,
        scheme: req.scheme,
        headers: req.headers,
    };
    let d = config.check(&conn, &facts);
    counters.count(&d);
    if d.allowed() {
        return None;
    }
    let detail = rbac::denied_detail(d.enforced.and_then(|v| v.policy));
    debug!(filter = %filter.name, %detail, "request denied by RBAC");
    Some(Stop::RbacDenied { detail })
}
