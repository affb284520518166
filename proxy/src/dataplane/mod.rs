//! The data path: accept, find listener -> filter chain -> cluster -> endpoint, connect, copy.
//!
//! `decide` is pure over one snapshot so it can be tested and explained without sockets; the
//! rest is I/O around it.

pub mod forward;
pub mod inbound;
pub mod listen;
pub mod orig_dst;
pub mod route;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use crate::addr::{EndpointAddr, OrigDstAddr};
use crate::lb;
use crate::model::listener::HttpManager;
use crate::model::{ClusterKind, ClusterSpecifier, Listener, NetworkAction};
use crate::state::{Snapshot, Store};
use crate::stats::Stats;

pub use listen::{ListenerRole, run};

/// Shared state of every listener task.
#[derive(Debug)]
pub struct Dataplane {
    /// Configuration, counters, upstream mark and HTTP pool: the part the HTTP connection
    /// manager gets too.
    pub shared: Arc<crate::http::Shared>,
    /// Port of the capture listener, whose `use_original_dst` listener is the virtual one.
    pub capture_port: u16,
    /// `--sockmap` service ports: their connections are copied, not spliced (see `forward`).
    pub sockmap_ports: Vec<u16>,
    weighted_cursor: AtomicUsize,
}

impl Dataplane {
    /// A data plane serving `store`.
    pub fn new(
        store: Arc<Store>,
        stats: Arc<Stats>,
        upstream_mark: Option<u32>,
        capture_port: u16,
    ) -> Self {
        Dataplane {
            shared: Arc::new(crate::http::Shared {
                store,
                stats,
                upstream_mark,
                http_pool: crate::http::pool::Pool::new(),
            }),
            capture_port,
            sockmap_ports: Vec::new(),
            weighted_cursor: AtomicUsize::new(0),
        }
    }

    /// Current configuration.
    pub fn store(&self) -> &Arc<Store> {
        &self.shared.store
    }

    /// Counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.shared.stats
    }

    /// SO_MARK put on every upstream socket (the capture programs skip marked sockets).
    pub fn upstream_mark(&self) -> Option<u32> {
        self.shared.upstream_mark
    }
}

/// Where one connection goes, and the names that led there (for logs and explain).
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Proxy to `endpoint` of `cluster`.
    Upstream {
        /// Listener whose chain matched.
        listener: String,
        /// Filter chain name.
        filter_chain: String,
        /// Cluster chosen.
        cluster: String,
        /// Endpoint chosen, or `None` for DNS clusters resolved at connect time.
        endpoint: Option<EndpointAddr>,
        /// (host, port) to resolve for DNS clusters.
        dns: Option<(String, u16)>,
    },
    /// No listener handles it: connect straight to the original destination.
    Passthrough(EndpointAddr),
    /// The chain runs the HTTP connection manager: serve the connection with `crate::http`.
    Http {
        /// Listener whose chain matched.
        listener: String,
        /// Filter chain name.
        filter_chain: String,
        /// The chain's HCM settings.
        manager: HttpManager,
    },
    /// Close the connection; the string says why (also the stat suffix).
    Reject(RejectReason),
}

/// Why a connection is closed without an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RejectReason {
    /// No filter chain matched and there is no default chain.
    NoFilterChainMatch {
        /// Listener.
        listener: String,
    },
    /// The chain's terminal filter is not run by skiff (yet).
    Unsupported {
        /// Listener.
        listener: String,
        /// Filter config type.
        filter: String,
    },
    /// The chain names a cluster that does not exist.
    NoCluster {
        /// Cluster.
        cluster: String,
    },
    /// The cluster has no healthy endpoint.
    NoHealthyUpstream {
        /// Cluster.
        cluster: String,
    },
    /// An ORIGINAL_DST cluster was used but the connection has no original destination.
    NoOriginalDst {
        /// Cluster.
        cluster: String,
    },
    /// Nothing handles a connection made directly to the capture port.
    NoListener,
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RejectReason::NoFilterChainMatch { listener } => {
                write!(f, "listener {listener}: no filter chain matches")
            }
            RejectReason::Unsupported { listener, filter } => {
                write!(f, "listener {listener}: filter {filter} is not served yet")
            }
            RejectReason::NoCluster { cluster } => write!(f, "unknown cluster {cluster}"),
            RejectReason::NoHealthyUpstream { cluster } => {
                write!(f, "cluster {cluster}: no healthy upstream")
            }
            RejectReason::NoOriginalDst { cluster } => {
                write!(
                    f,
                    "cluster {cluster}: connection has no original destination"
                )
            }
            RejectReason::NoListener => write!(f, "no listener for this connection"),
        }
    }
}

/// Facts about one accepted connection that routing needs.
#[derive(Debug, Clone, Copy)]
pub struct Accepted<'a> {
    /// Role of the listener that accepted it.
    pub role: &'a ListenerRole,
    /// Peer address.
    pub client: SocketAddr,
    /// Local address of the accepted socket.
    pub local: SocketAddr,
    /// Original destination, when redirected.
    pub orig_dst: Option<OrigDstAddr>,
    /// Application protocols detected by a listener filter (`http/1.1`, `h2c`), else empty.
    pub application_protocols: &'a [String],
}

/// The listener that owns a connection: the one on its original destination when redirected,
/// else the one that accepted it (the virtual outbound listener for the capture port).
pub fn listener_of<'s>(
    dp: &Dataplane,
    snap: &'s Snapshot,
    conn: &Accepted<'_>,
) -> Option<&'s Arc<Listener>> {
    let redirected = conn.orig_dst.filter(|o| o.get() != conn.local);
    match (redirected, conn.role) {
        (Some(o), ListenerRole::Capture) => snap
            .listener_for(o.get())
            .or_else(|| snap.virtual_listener(dp.capture_port)),
        (Some(o), ListenerRole::Static { name }) => snap
            .listener_for(o.get())
            .or_else(|| snap.listeners.get(name)),
        (None, ListenerRole::Capture) => snap.virtual_listener(dp.capture_port),
        (None, ListenerRole::Static { name }) => snap.listeners.get(name),
    }
}

/// Route one connection over one snapshot (pure apart from balancer cursors).
pub fn decide(dp: &Dataplane, snap: &Snapshot, conn: &Accepted<'_>) -> Decision {
    let redirected = conn.orig_dst.filter(|o| o.get() != conn.local);
    let dst = redirected.map(|o| o.get()).unwrap_or(conn.local);

    // Envoy: a redirected connection belongs to the listener on its original destination,
    // else stays on the listener that accepted it (the virtual outbound listener).
    let listener = listener_of(dp, snap, conn);
    let Some(listener) = listener else {
        return match redirected {
            Some(o) => Decision::Passthrough(o.into()),
            None => Decision::Reject(RejectReason::NoListener),
        };
    };
    decide_on(
        dp,
        snap,
        listener,
        conn.client,
        dst,
        redirected,
        conn.application_protocols,
    )
}

/// Route one connection on a known listener: filter chain by `dst`/`client`, then cluster and
/// endpoint; `original` serves ORIGINAL_DST clusters. (The inbound listener uses this directly:
/// its connections never hand off to the listener on their destination.)
pub fn decide_on(
    dp: &Dataplane,
    snap: &Snapshot,
    listener: &Listener,
    client: SocketAddr,
    dst: SocketAddr,
    original: Option<OrigDstAddr>,
    application_protocols: &[String],
) -> Decision {
    let redirected = original;
    let facts = route::ConnFacts {
        dst,
        src: client,
        direct_src: client,
        server_name: None,
        transport_protocol: "raw_buffer",
        application_protocols,
    };
    let Some(chain) = route::select_chain(listener, &facts) else {
        return Decision::Reject(RejectReason::NoFilterChainMatch {
            listener: listener.name.clone(),
        });
    };
    let tcp = match &chain.action {
        NetworkAction::TcpProxy(t) => t,
        NetworkAction::Http(h) => {
            return Decision::Http {
                listener: listener.name.clone(),
                filter_chain: chain.name.clone(),
                manager: h.clone(),
            };
        }
        NetworkAction::Unsupported { name, .. } => {
            return Decision::Reject(RejectReason::Unsupported {
                listener: listener.name.clone(),
                filter: name.clone(),
            });
        }
    };
    let cluster_name = match &tcp.cluster {
        ClusterSpecifier::Cluster(c) => c.as_str(),
        ClusterSpecifier::Weighted(w) => match lb::pick_weighted(w, &dp.weighted_cursor) {
            Some(c) => c,
            None => {
                return Decision::Reject(RejectReason::NoCluster {
                    cluster: String::new(),
                });
            }
        },
    };
    let Some(entry) = snap.cluster(cluster_name) else {
        return Decision::Reject(RejectReason::NoCluster {
            cluster: cluster_name.to_string(),
        });
    };
    let upstream = |endpoint, dns| Decision::Upstream {
        listener: listener.name.clone(),
        filter_chain: chain.name.clone(),
        cluster: cluster_name.to_string(),
        endpoint,
        dns,
    };
    match &entry.cluster.kind {
        ClusterKind::OriginalDst => match redirected {
            Some(o) => upstream(Some(o.into()), None),
            None => Decision::Reject(RejectReason::NoOriginalDst {
                cluster: cluster_name.to_string(),
            }),
        },
        ClusterKind::Dns { hosts } => match lb::next_index(&entry.rr, hosts.len()) {
            Some(i) => upstream(None, Some(hosts[i].clone())),
            None => Decision::Reject(RejectReason::NoHealthyUpstream {
                cluster: cluster_name.to_string(),
            }),
        },
        ClusterKind::Static(_) | ClusterKind::Eds { .. } => {
            // tcp_proxy hashes the source IP for RING_HASH / MAGLEV (`hash_policy: source_ip`).
            let req = lb::LbRequest {
                hash: lb::uses_hash(entry.cluster.lb_policy)
                    .then(|| lb::source_ip_hash(client.ip())),
                ..Default::default()
            };
            match lb::choose(entry, &req) {
                Some(h) => upstream(Some(EndpointAddr(h.address())), None),
                None => Decision::Reject(RejectReason::NoHealthyUpstream {
                    cluster: cluster_name.to_string(),
                }),
            }
        }
    }
}
