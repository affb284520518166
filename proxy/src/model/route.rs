//! Route configurations (RDS): virtual hosts and the clusters their routes name.
//!
//! skiff does not route HTTP yet; it validates what Envoy validates up front (names, unique
//! virtual hosts and domains) and keeps what the rest of skiff needs: which clusters are named.

use std::collections::BTreeSet;

use envoy_types::pb::envoy::config::route::v3 as pb;

use super::{FieldError, ModelError};

/// Validated `RouteConfiguration`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// Route configuration name (what an HCM's `rds.route_config_name` asks for).
    pub name: String,
    /// Virtual hosts in configuration order.
    pub virtual_hosts: Vec<VirtualHost>,
}

/// One `VirtualHost`.
#[derive(Debug, Clone, PartialEq)]
pub struct VirtualHost {
    /// Name (unique within the route configuration).
    pub name: String,
    /// `domains` (`*`, `example.com`, `*.example.com` ...).
    pub domains: Vec<String>,
    /// Number of routes.
    pub routes: usize,
    /// Clusters named by `route.cluster` or `route.weighted_clusters`, sorted.
    pub clusters: BTreeSet<String>,
}

impl RouteConfig {
    /// Every cluster any route names.
    pub fn clusters(&self) -> BTreeSet<&str> {
        self.virtual_hosts
            .iter()
            .flat_map(|v| v.clusters.iter().map(String::as_str))
            .collect()
    }
}

fn virtual_host(v: &pb::VirtualHost) -> Result<VirtualHost, FieldError> {
    if v.name.is_empty() {
        return Err(FieldError::new("name", "must not be empty"));
    }
    if v.domains.is_empty() {
        return Err(FieldError::new("domains", "needs at least one domain"));
    }
    let mut clusters = BTreeSet::new();
    for (i, r) in v.routes.iter().enumerate() {
        use pb::route::Action;
        use pb::route_action::ClusterSpecifier as Cs;
        if r.r#match.is_none() {
            return Err(FieldError::new(format!("routes[{i}].match"), "missing"));
        }
        if let Some(Action::Route(a)) = &r.action {
            match &a.cluster_specifier {
                Some(Cs::Cluster(c)) if c.is_empty() => {
                    return Err(FieldError::new(
                        format!("routes[{i}].route.cluster"),
                        "must not be empty",
                    ));
                }
                Some(Cs::Cluster(c)) => {
                    clusters.insert(c.clone());
                }
                Some(Cs::WeightedClusters(w)) => {
                    for (j, c) in w.clusters.iter().enumerate() {
                        if c.name.is_empty() {
                            return Err(FieldError::new(
                                format!("routes[{i}].route.weighted_clusters.clusters[{j}].name"),
                                "must not be empty",
                            ));
                        }
                        clusters.insert(c.name.clone());
                    }
                }
                _ => {}
            }
        }
    }
    Ok(VirtualHost {
        name: v.name.clone(),
        domains: v.domains.clone(),
        routes: v.routes.len(),
        clusters,
    })
}

impl TryFrom<&pb::RouteConfiguration> for RouteConfig {
    type Error = ModelError;
    fn try_from(rc: &pb::RouteConfiguration) -> Result<Self, ModelError> {
        let err = |e: FieldError| e.on("route_configuration", &rc.name);
        if rc.name.is_empty() {
            return Err(err(FieldError::new("name", "must not be empty")));
        }
        let mut names = BTreeSet::new();
        let mut domains = BTreeSet::new();
        let mut virtual_hosts = Vec::with_capacity(rc.virtual_hosts.len());
        for (i, v) in rc.virtual_hosts.iter().enumerate() {
            let at = format!("virtual_hosts[{i}]");
            let vh = virtual_host(v).map_err(|e| err(e.within(&at)))?;
            // Envoy refuses duplicate virtual host names and a domain served by two hosts.
            if !names.insert(vh.name.clone()) {
                return Err(err(FieldError::new(
                    format!("{at}.name"),
                    format!("duplicate virtual host {:?}", vh.name),
                )));
            }
            for d in &vh.domains {
                if !domains.insert(d.to_ascii_lowercase()) {
                    return Err(err(FieldError::new(
                        format!("{at}.domains"),
                        format!("domain {d:?} is already served by another virtual host"),
                    )));
                }
            }
            virtual_hosts.push(vh);
        }
        Ok(RouteConfig {
            name: rc.name.clone(),
            virtual_hosts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vh(name: &str, domains: &[&str], cluster: &str) -> pb::VirtualHost {
        pb::VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            routes: vec![pb::Route {
                r#match: Some(pb::RouteMatch::default()),
                action: Some(pb::route::Action::Route(pb::RouteAction {
                    cluster_specifier: Some(pb::route_action::ClusterSpecifier::Cluster(
                        cluster.into(),
                    )),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn route_config_collects_clusters() {
        let rc = pb::RouteConfiguration {
            name: "r".into(),
            virtual_hosts: vec![vh("a", &["a.com"], "ca"), vh("b", &["*"], "cb")],
            ..Default::default()
        };
        let m = RouteConfig::try_from(&rc).unwrap();
        assert_eq!(m.clusters().into_iter().collect::<Vec<_>>(), ["ca", "cb"]);
    }

    #[test]
    fn duplicate_domains_are_rejected_with_the_field() {
        let rc = pb::RouteConfiguration {
            name: "r".into(),
            virtual_hosts: vec![vh("a", &["x.com"], "c"), vh("b", &["X.com"], "c")],
            ..Default::default()
        };
        let e = RouteConfig::try_from(&rc).unwrap_err().to_string();
        assert!(
            e.contains("route_configuration \"r\": virtual_hosts[1].domains"),
            "{e}"
        );
    }
}
