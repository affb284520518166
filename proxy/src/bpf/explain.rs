//! `/debug/explain` and `skiff maps`: what happens to a connect, and what the kernel fast path
//! holds, from the same image and lookup logic the kernel follows (pure).

use std::net::SocketAddr;

use serde_json::{Value, json};

use super::CaptureConfig;
use super::fastpath::FastPathView;
use super::projection::{FastLb, classify};
use crate::state::Snapshot;
use skiff_common::{EndpointLoad, ServiceStats};

/// Where a connect from the captured cgroup to `dst` goes: `kernel` (fast path), `proxy`,
/// `passthrough` (proxy, no listener) or `excluded` (never captured), with the reason; plus,
/// under `udp`, where datagrams to `dst` go when a UDP listener owns it.
pub fn explain(
    cfg: &CaptureConfig,
    view: Option<&FastPathView>,
    snap: &Snapshot,
    capture_port: u16,
    dst: SocketAddr,
) -> Value {
    let mut out = explain_tcp(cfg, view, snap, capture_port, dst);
    if let (Some(udp), Value::Object(map)) = (explain_udp(view, snap, dst), &mut out) {
        map.insert("udp".into(), udp);
    }
    out
}

/// Datagrams to `dst` when a UDP listener is bound there: `kernel` (sendmsg4/connect4 send
/// them to an endpoint) or `none` (skiff's proxy serves no UDP).
fn explain_udp(view: Option<&FastPathView>, snap: &Snapshot, dst: SocketAddr) -> Option<Value> {
    let listener = snap
        .listeners
        .values()
        .find(|l| l.udp.is_some() && l.address == dst)?;
    let udp = listener.udp.as_ref()?;
    let (verdict, _) = super::projection::classify_udp(snap, listener, udp);
    if let Some(view) = view
        && let Some(svc) = view.image.udp_services.get(&dst)
    {
        let c = &view.image.clusters[&svc.cluster];
        return Some(json!({
            "path": "kernel",
            "reason": verdict.reason,
            "listener": svc.listener,
            "cluster": svc.cluster,
            "lb_policy": c.lb.as_str(),
            "candidate_endpoints": c.endpoints.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            "selection": selection(c.lb),
            "generation": view.generation,
        }));
    }
    let reason = match view {
        None => format!("kernel fast path is off; {}", verdict.reason),
        Some(v) => v
            .image
            .udp_verdicts
            .get(&dst)
            .map(|v| v.reason.clone())
            .unwrap_or(verdict.reason),
    };
    Some(json!({
        "path": "none",
        "reason": reason,
        "listener": listener.name,
        "cluster": verdict.cluster,
    }))
}

/// The TCP part of [`explain`].
fn explain_tcp(
    cfg: &CaptureConfig,
    view: Option<&FastPathView>,
    snap: &Snapshot,
    capture_port: u16,
    dst: SocketAddr,
) -> Value {
    let excluded =
        |reason: &str| json!({ "dst": dst.to_string(), "path": "excluded", "reason": reason });
    if dst.ip().is_loopback() || dst.ip().is_unspecified() {
        return excluded("loopback or unspecified destination: never captured");
    }
    if cfg.exclude_ports.contains(&dst.port()) {
        return excluded("destination port is excluded");
    }
    if cfg.exclude_cidrs.iter().any(|(net, len)| {
        crate::model::Cidr {
            addr: *net,
            len: *len,
        }
        .contains(dst.ip())
    }) {
        return excluded("destination is in an excluded CIDR");
    }
    let (verdict, cluster) = classify(snap, capture_port, dst);
    if let Some(view) = view
        && let Some(svc) = view.image.services.get(&dst)
    {
        let c = &view.image.clusters[&svc.cluster];
        return json!({
            "dst": dst.to_string(),
            "path": "kernel",
            "reason": verdict.reason,
            "listener": svc.listener,
            "filter_chain": svc.filter_chain,
            "cluster": svc.cluster,
            "lb_policy": c.lb.as_str(),
            "candidate_endpoints": c.endpoints.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            "weights": c.weights,
            "selection": selection(c.lb),
            "generation": view.generation,
        });
    }
    let reason = match (&view, verdict.fast) {
        (None, _) => format!("kernel fast path is off; {}", verdict.reason),
        (Some(v), true) => v
            .image
            .verdicts
            .get(&dst)
            .filter(|v| !v.fast)
            .map(|v| v.reason.clone())
            .unwrap_or_else(|| {
                "eligible, but not a service VIP (only /32 chain matches and per-VIP listeners are projected)".into()
            }),
        (Some(_), false) => verdict.reason.clone(),
    };
    let path = if verdict.listener.is_none() {
        "passthrough"
    } else {
        "proxy"
    };
    json!({
        "dst": dst.to_string(),
        "path": path,
        "reason": reason,
        "listener": verdict.listener,
        "filter_chain": verdict.filter_chain,
        "cluster": verdict.cluster,
        "candidate_endpoints": cluster
            .map(|c| c.endpoints.iter().map(|e| e.to_string()).collect::<Vec<_>>())
            .unwrap_or_default(),
    })
}

/// How the kernel picks among the candidate endpoints for a policy.
fn selection(lb: FastLb) -> &'static str {
    match lb {
        FastLb::RoundRobin => {
            "per-CPU round-robin cursor; with unequal weights it walks the weight space \
             (cursor * stride mod total weight) and searches the slot that owns that unit"
        }
        FastLb::Random => "uniform random slot (weights ignored, as Envoy's RANDOM)",
        FastLb::LeastRequest => {
            "two random slots, the one with fewer open connections (kernel-counted plus the \
             proxy's exported load) wins"
        }
        FastLb::Maglev => {
            "Maglev table (4093 entries) indexed by a hash of the client (bound source IPv4, \
             else its network namespace) and the service"
        }
    }
}

/// The fast-path maps as `skiff maps --json` shows them: services, clusters and endpoints of
/// the active generation, capacity used, fast-path connects per service, and per endpoint the
/// connections the kernel counts.
pub fn maps_json(
    view: Option<&FastPathView>,
    per_service: &[(std::net::SocketAddrV4, ServiceStats)],
    per_endpoint: &[(SocketAddr, EndpointLoad)],
) -> Value {
    let Some(view) = view else {
        return json!({ "fast_path": false });
    };
    let img = &view.image;
    let udp_services = img.udp_services.iter().map(|(vip, s)| {
        json!({
            "vip": vip.to_string(),
            "proto": "UDP",
            "cluster": s.cluster,
            "cluster_id": img.cluster_id(&s.cluster),
            "listener": s.listener,
        })
    });
    let services: Vec<Value> = img
        .services
        .iter()
        .map(|(vip, s)| {
            let st = per_service
                .iter()
                .find(|(a, _)| SocketAddr::V4(*a) == *vip)
                .map(|(_, n)| *n)
                .unwrap_or_default();
            json!({
                "vip": vip.to_string(),
                "proto": "TCP",
                "cluster": s.cluster,
                "cluster_id": img.cluster_id(&s.cluster),
                "listener": s.listener,
                "filter_chain": s.filter_chain,
                "fast_path_connects": st.connects,
                "fallbacks": st.fallbacks,
                "no_healthy": st.no_healthy,
            })
        })
        .chain(udp_services)
        .collect();
    let clusters: Vec<Value> = img
        .clusters
        .iter()
        .enumerate()
        .map(|(id, (name, c))| {
            json!({
                "id": id,
                "name": name,
                "lb_policy": c.lb.as_str(),
                "endpoints": c.endpoints.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                "weights": c.weights,
            })
        })
        .collect();
    let mut out = json!({
        "fast_path": true,
        "generation": view.generation,
        "capacity": {
            "services": {
                "used": img.services.len() + img.udp_services.len(),
                "max": view.capacity.max_services,
            },
            "clusters": { "used": img.clusters.len(), "max": view.capacity.max_clusters },
            "endpoints": { "used": img.endpoint_slots(), "max": view.capacity.max_endpoints },
            "maglev_tables": {
                "used": img.clusters.values().filter(|c| c.lb == FastLb::Maglev).count(),
                "max": view.capacity.max_maglev,
            },
        },
        "endpoint_connections": per_endpoint
            .iter()
            .map(|(a, l)| json!({ "endpoint": a.to_string(), "active": l.active, "total": l.total }))
            .collect::<Vec<_>>(),
        "services": services,
        "clusters": clusters,
    });
    // Node mode: each pod pipeline's own services (a pod's connect sees only its scope's).
    if !view.scopes.is_empty()
        && let Value::Object(map) = &mut out
    {
        map.insert("scopes".into(), scopes_json(view));
        map.insert("scope_services".into(), scope_services_json(view));
    }
    out
}

/// One line per pod scope: what it holds.
fn scopes_json(view: &FastPathView) -> Value {
    view.scopes
        .iter()
        .map(|(scope, img)| {
            json!({
                "scope": scope,
                "services": img.services.len() + img.udp_services.len(),
                "clusters": img.clusters.len(),
                "endpoints": img.endpoint_slots(),
            })
        })
        .collect()
}

/// Every service of the pod scopes, with its cluster's endpoints.
fn scope_services_json(view: &FastPathView) -> Value {
    let mut out = Vec::new();
    for (scope, img) in &view.scopes {
        let tcp = img.services.iter().map(|s| ("TCP", s));
        let udp = img.udp_services.iter().map(|s| ("UDP", s));
        for (proto, (vip, s)) in tcp.chain(udp) {
            let endpoints: Vec<String> = img
                .clusters
                .get(&s.cluster)
                .map(|c| c.endpoints.iter().map(ToString::to_string).collect())
                .unwrap_or_default();
            out.push(json!({
                "scope": scope,
                "vip": vip.to_string(),
                "proto": proto,
                "cluster": s.cluster,
                "endpoints": endpoints,
            }));
        }
    }
    Value::Array(out)
}
