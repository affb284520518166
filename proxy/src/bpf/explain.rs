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

// === Recent connections ===

/// How many connections [`recent`] keeps.
pub const RECENT_KEPT: usize = 256;
/// How many `/debug/explain?recent` prints when no count is given.
pub const RECENT_DEFAULT: usize = 20;

/// One decision on a connection's way: what was decided and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// `capture`, `listener`, `filter_chain`, `route`, `cluster`, `endpoint`.
    pub step: &'static str,
    /// What was chosen (a name or address; `-` for nothing).
    pub value: StepValue,
    /// Why.
    pub reason: std::borrow::Cow<'static, str>,
}

/// What a step chose, kept as given and rendered when read: every proxied connection writes a
/// record, and few are ever read (formatting an address costs more than storing it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepValue {
    /// A name, or `-` for nothing.
    Text(String),
    /// An address.
    Addr(SocketAddr),
}

impl std::fmt::Display for StepValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepValue::Text(t) => f.write_str(t),
            StepValue::Addr(a) => a.fmt(f),
        }
    }
}

impl From<SocketAddr> for StepValue {
    fn from(a: SocketAddr) -> Self {
        StepValue::Addr(a)
    }
}

impl From<crate::addr::EndpointAddr> for StepValue {
    fn from(a: crate::addr::EndpointAddr) -> Self {
        StepValue::Addr(a.get())
    }
}

impl From<&str> for StepValue {
    fn from(t: &str) -> Self {
        StepValue::Text(t.to_string())
    }
}

impl From<&String> for StepValue {
    fn from(t: &String) -> Self {
        StepValue::Text(t.clone())
    }
}

impl From<String> for StepValue {
    fn from(t: String) -> Self {
        StepValue::Text(t)
    }
}

/// One connection as the kernel or the proxy handled it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecentConn {
    /// When it started (kernel: the connect; proxy: the accept).
    pub at: std::time::SystemTime,
    /// `kernel` (decided in connect4/6) or `proxy` (the userspace pipeline).
    pub path: &'static str,
    /// The client, when known (a kernel event is written before the source port is bound).
    pub client: Option<SocketAddr>,
    /// Where the application connected to (the original destination).
    pub dst: Option<SocketAddr>,
    /// The decisions, in order.
    pub steps: Vec<Step>,
    /// How it ended (`ok`, or the error with its response flags).
    pub outcome: std::borrow::Cow<'static, str>,
}

impl RecentConn {
    /// A connection of `path` starting now, with no steps yet.
    pub fn new(path: &'static str, client: Option<SocketAddr>, dst: Option<SocketAddr>) -> Self {
        RecentConn {
            at: std::time::SystemTime::now(),
            path,
            client,
            dst,
            steps: Vec::with_capacity(6),
            outcome: std::borrow::Cow::Borrowed(""),
        }
    }

    /// Appends a step.
    pub fn push(
        &mut self,
        step: &'static str,
        value: impl Into<StepValue>,
        reason: impl Into<std::borrow::Cow<'static, str>>,
    ) {
        self.steps.push(Step {
            step,
            value: value.into(),
            reason: reason.into(),
        });
    }

    fn json(&self) -> Value {
        let at = crate::accesslog::format::TimeFormat::Default.render(self.at);
        json!({
            "at": at,
            "path": self.path,
            "client": self.client.map(|c| c.to_string()),
            "dst": self.dst.map(|d| d.to_string()),
            "steps": self.steps.iter().map(|s| json!({
                "step": s.step,
                "value": s.value.to_string(),
                "reason": s.reason,
            })).collect::<Vec<_>>(),
            "outcome": self.outcome,
        })
    }
}

/// Shards of [`Recent`]: each thread pushes into one of its own (chosen once per thread).
const SHARDS: usize = 8;

/// One shard: its connections with the instant each was pushed, oldest first.
type Shard = std::collections::VecDeque<(std::time::Instant, RecentConn)>;

/// The last [`RECENT_KEPT`] connections, kernel and proxy alike. Process-wide: the data plane
/// and the kernel event reader write it, `/debug/explain?recent` reads it.
///
/// Sharded by thread: every data-plane worker pushes a record per connection, and one shared
/// lock would make the workers wait on each other and free one another's records (glibc then
/// takes the allocating thread's arena lock). Each shard keeps `cap`, so the newest `cap`
/// overall are always there; a read merges the shards by push time.
#[derive(Debug)]
pub struct Recent {
    shards: Box<[std::sync::Mutex<Shard>]>,
    cap: usize,
}

impl Recent {
    /// An empty ring keeping `cap` connections.
    pub fn new(cap: usize) -> Self {
        Recent {
            shards: (0..SHARDS).map(|_| Default::default()).collect(),
            cap,
        }
    }

    /// Records a finished connection, forgetting this thread's oldest when its shard is full.
    pub fn push(&self, c: RecentConn) {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        thread_local! {
            static SHARD: usize = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % SHARDS;
        }
        let shard = &self.shards[SHARD.with(|s| *s)];
        let at = std::time::Instant::now();
        let mut r = shard.lock().unwrap_or_else(|e| e.into_inner());
        if r.len() >= self.cap {
            r.pop_front();
        }
        r.push_back((at, c));
    }

    /// The last `n` connections, newest first.
    pub fn last(&self, n: usize) -> Vec<RecentConn> {
        let mut all: Vec<(std::time::Instant, RecentConn)> = Vec::new();
        for shard in &self.shards {
            let r = shard.lock().unwrap_or_else(|e| e.into_inner());
            all.extend(r.iter().rev().take(n).cloned());
        }
        // Stable: pushes of one shard at the same instant keep their order.
        all.sort_by_key(|c| std::cmp::Reverse(c.0));
        all.into_iter()
            .take(n.min(self.cap))
            .map(|(_, c)| c)
            .collect()
    }

    /// `/debug/explain?recent=N`: the last `n` connections with their steps, newest first.
    pub fn json(&self, n: usize) -> Value {
        json!({ "recent": self.last(n).iter().map(RecentConn::json).collect::<Vec<_>>() })
    }
}

/// The process's ring of recent connections.
pub fn recent() -> &'static Recent {
    static R: std::sync::OnceLock<Recent> = std::sync::OnceLock::new();
    R.get_or_init(|| Recent::new(RECENT_KEPT))
}

/// The data plane's hook: each connection task runs inside [`trace::traced`], and each
/// pipeline step is one [`trace::step`] call (a no-op outside a traced task). The steps live
/// in a task-local until the connection ends, then go to [`recent`].
pub mod trace {
    use std::borrow::Cow;
    use std::cell::RefCell;
    use std::fmt::Display;
    use std::future::Future;
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::{RecentConn, recent};

    tokio::task_local! {
        static CONN: RefCell<RecentConn>;
    }

    /// Runs one proxied connection from `client`, recording its steps; the result (its error,
    /// if any, with `flags`) becomes the connection's outcome.
    ///
    /// A plain future rather than an `async fn`: awaiting `fut` inside one (and inside the
    /// task-local scope's block) would hold the connection's large future two or three times
    /// over, and every connection's task is copied whole into its allocation.
    pub fn traced<T, E: Display, F: Future<Output = Result<T, E>>>(
        client: SocketAddr,
        fut: F,
        flags: impl FnOnce(&E) -> String,
    ) -> impl Future<Output = Result<T, E>> {
        CONN.scope(
            RefCell::new(RecentConn::new("proxy", Some(client), None)),
            Traced {
                fut,
                flags: Some(flags),
            },
        )
    }

    pin_project_lite::pin_project! {
        /// The connection inside its [`CONN`] scope; at its end the record is pushed to
        /// [`recent`] (still inside the scope, which is what lets it take the record).
        struct Traced<F, G> {
            #[pin]
            fut: F,
            flags: Option<G>,
        }
    }

    impl<T, E: Display, F: Future<Output = Result<T, E>>, G: FnOnce(&E) -> String> Future
        for Traced<F, G>
    {
        type Output = Result<T, E>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let this = self.project();
            let result = std::task::ready!(this.fut.poll(cx));
            // What replaces the record in the task-local needs no clock read and no
            // allocation (one of each per connection saved).
            let mut conn = CONN.with(|c| {
                c.replace(RecentConn {
                    at: std::time::UNIX_EPOCH,
                    path: "proxy",
                    client: None,
                    dst: None,
                    steps: Vec::new(),
                    outcome: std::borrow::Cow::Borrowed(""),
                })
            });
            conn.outcome = match (&result, this.flags.take()) {
                (Ok(_), _) => "ok".into(),
                (Err(e), Some(flags)) => format!("{} ({e})", flags(e)).into(),
                (Err(e), None) => e.to_string().into(),
            };
            recent().push(conn);
            Poll::Ready(result)
        }
    }

    /// Records one step of the current connection.
    pub fn step(
        step: &'static str,
        value: impl Into<super::StepValue>,
        reason: impl Into<Cow<'static, str>>,
    ) {
        let _ = CONN.try_with(|c| c.borrow_mut().push(step, value, reason));
    }

    /// Records the original destination and the capture decision of the current connection:
    /// `orig_dst` is `Some` when the connection was redirected to a capture listener.
    pub fn accepted(local: SocketAddr, orig_dst: Option<SocketAddr>, listener: Option<&str>) {
        let _ = CONN.try_with(|c| {
            let mut c = c.borrow_mut();
            c.dst = Some(orig_dst.unwrap_or(local));
            match orig_dst {
                Some(o) => c.push(
                    "capture",
                    o,
                    format!("redirected to the proxy at {local}; original destination read with SO_ORIGINAL_DST"),
                ),
                None => c.push("capture", local, "connected to the listener's own address"),
            }
            c.push(
                "listener",
                listener.unwrap_or("-"),
                if listener.is_some() {
                    "the listener bound to (or owning) the destination"
                } else {
                    "no listener owns the destination"
                },
            );
        });
    }

    /// Records what route selection chose: the chain, and the cluster or why none.
    pub fn routed(route: &crate::dataplane::route::Route) {
        use crate::dataplane::route::Route;
        let _ = CONN.try_with(|c| {
            let mut c = c.borrow_mut();
            match route {
                Route::TcpProxy(r) => {
                    c.push(
                        "filter_chain",
                        &r.chain.get().name,
                        "the chain whose match fits the destination, source and SNI",
                    );
                    c.push("cluster", &r.cluster.cluster.name, "the chain's tcp_proxy cluster");
                }
                Route::Http { chain, .. } => {
                    c.push(
                        "filter_chain",
                        &chain.get().name,
                        "the chain whose match fits the destination, source and SNI",
                    );
                    c.push(
                        "route",
                        "http_connection_manager",
                        "routes and clusters are chosen per request",
                    );
                }
                Route::Passthrough(dst) => {
                    c.push(
                        "cluster",
                        "PassthroughCluster",
                        format!("no listener or chain matched: connect to the original destination {dst}"),
                    );
                }
                Route::Reject(e) => c.push("route", "-", format!("rejected: {e}")),
            }
        });
    }
}

#[cfg(test)]
mod recent_tests {
    use super::*;

    #[test]
    fn keeps_the_last_connections_newest_first() {
        let r = Recent::new(3);
        for port in 1..=5u16 {
            let mut c =
                RecentConn::new("proxy", None, Some(SocketAddr::from(([10, 0, 0, 1], port))));
            c.push("capture", "x", "y");
            r.push(c);
        }
        let last = r.last(10);
        let ports: Vec<u16> = last.iter().map(|c| c.dst.unwrap().port()).collect();
        assert_eq!(ports, [5, 4, 3]);
        assert_eq!(r.last(1).len(), 1);
        let j = r.json(2);
        assert_eq!(j["recent"][0]["dst"], "10.0.0.1:5");
        assert_eq!(j["recent"][0]["steps"][0]["step"], "capture");
    }

    #[test]
    fn pushes_from_several_threads_merge_newest_first_up_to_the_cap() {
        let r = std::sync::Arc::new(Recent::new(6));
        let dst = |t: u16, i: u16| Some(SocketAddr::from(([10, 0, 0, t as u8], i)));
        // Four threads, one after the other, four connections each: the newest six are the
        // last thread's four and the two before them, whatever shard each thread got.
        for t in 1..=4u16 {
            let r = r.clone();
            std::thread::spawn(move || {
                for i in 1..=4u16 {
                    r.push(RecentConn::new("proxy", None, dst(t, i)));
                }
            })
            .join()
            .unwrap();
        }
        let got: Vec<_> = r.last(100).into_iter().map(|c| c.dst).collect();
        let want = vec![
            dst(4, 4),
            dst(4, 3),
            dst(4, 2),
            dst(4, 1),
            dst(3, 4),
            dst(3, 3),
        ];
        assert_eq!(got, want);
        assert_eq!(r.last(2).len(), 2);
    }

    #[tokio::test]
    async fn a_traced_task_records_its_steps_and_outcome() {
        let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let dst: SocketAddr = "10.96.7.7:8080".parse().unwrap();
        let r: Result<(), String> = trace::traced(
            client,
            async {
                trace::accepted(
                    "127.0.0.1:15001".parse().unwrap(),
                    Some(dst),
                    Some("virtual"),
                );
                trace::step("endpoint", "127.0.0.9:80", "round robin");
                Err("refused".to_string())
            },
            |_| "UF".into(),
        )
        .await;
        assert!(r.is_err());
        let c = recent()
            .last(RECENT_KEPT)
            .into_iter()
            .find(|c| c.dst == Some(dst))
            .expect("recorded");
        let steps: Vec<&str> = c.steps.iter().map(|s| s.step).collect();
        assert_eq!(steps, ["capture", "listener", "endpoint"]);
        assert_eq!(c.client, Some(client));
        assert_eq!(c.outcome, "UF (refused)");
        // Outside a traced task a step is a no-op.
        trace::step("endpoint", "x", "y");
    }
}
