//! The data path: one pipeline for every listener (outbound capture, bootstrap and LDS
//! listeners, inbound, node-mode pods), in small typed steps:
//!
//! 1. `listen`: accept (connection cap, backoff), one task and one `conn` span per connection;
//! 2. `accept`: the connection's facts on ONE snapshot load: client, local address, original
//!    destination (`orig_dst`; inbound: the local address unless conntrack knows better), the
//!    listener that serves it, sniffed application protocols ([`Accepted`]);
//! 3. `route` (pure): listener -> filter chain -> what the chain does ([`route::Route`]), down
//!    to the cluster entry and host for tcp_proxy ([`route::Target`]); the BPF projection
//!    calls the same listener and chain selection;
//! 4. the chain's transport socket: a chain with a `DownstreamTlsContext` terminates TLS
//!    (`crate::tls::accept` with the snapshot's secrets; `<listener>.ssl.*`), and the client's
//!    verified identity becomes the connection's peer (span field `peer`, RBAC's
//!    `authenticated`); `rbac`: the chain's network RBAC filters decide the connection
//!    (denied: closed, after `delay_deny`), counted in their `rbac.*` counters;
//! 5. `tcp_proxy`: the cluster's breaker slot, then `connect` (one connect path; inbound
//!    leaves from the passthrough source) and TLS origination when the cluster dials that
//!    endpoint with TLS (`http::upstream_tls`; a failed handshake is a failed connect, `UF`),
//!    the host's outcome and active connection, then `forward` (splice; a buffered copy on
//!    `--sockmap` ports and when either side is TLS). HCM chains go to [`crate::http`]
//!    instead, over the TCP socket or the terminated TLS session.
//!
//! Inbound differs only in step 2 (how its listener and original destination are found) and
//! in the connect source. Every failure is a typed [`error::ConnError`] with a side and Envoy's
//! response flags, counted in one place (`counters`).

mod accept;
mod connect;
mod counters;
pub mod error;
pub mod forward;
pub mod inbound;
pub mod listen;
pub mod orig_dst;
pub mod placement;
mod rbac;
pub mod route;
mod tcp_proxy;
pub mod workers;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use crate::http;
use crate::state::Store;
use crate::stats::Stats;

pub use accept::Accepted;
pub use error::{ConnError, ResponseFlag, Side};
pub use listen::run;
pub use workers::Workers;

/// How often unused TLS configurations are dropped.
const TLS_SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// What kind of listener accepted a connection: decides how its listener and original
/// destination are found and where its upstream connects leave from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerRole {
    /// The outbound capture listener (15001): every connection was redirected; read its
    /// original destination and hand it to the listener that owns it.
    Capture,
    /// A bootstrap/xDS listener bound to its own address.
    Static {
        /// Listener name.
        name: String,
    },
    /// The inbound listener (15006): the listener on the inbound port serves every connection;
    /// connects to the app leave from the passthrough source.
    Inbound {
        /// The inbound port (finds the virtualInbound listener).
        port: u16,
    },
}

impl ListenerRole {
    /// `direction` field of the connection span.
    pub fn direction(&self) -> &'static str {
        match self {
            ListenerRole::Capture => "outbound",
            ListenerRole::Static { .. } => "listener",
            ListenerRole::Inbound { .. } => "inbound",
        }
    }

    /// Stat name of the cluster a connection no listener owns goes through.
    pub fn passthrough_cluster(&self) -> &'static str {
        match self {
            ListenerRole::Inbound { .. } => "InboundPassthroughCluster",
            _ => "PassthroughCluster",
        }
    }
}

/// What the listener tasks of one worker share (each worker has its own: its HTTP upstream
/// pool is driven by that worker alone); store, stats and TLS contexts are the same for all.
#[derive(Debug)]
pub struct Dataplane {
    /// Configuration, counters, upstream mark and HTTP pool: the part the HTTP connection
    /// manager gets too.
    pub shared: Arc<http::Shared>,
    /// Port of the capture listener, whose `use_original_dst` listener is the virtual one.
    pub capture_port: u16,
    /// `--sockmap` service ports: their connections are copied, not spliced (see `forward`).
    pub sockmap_ports: Vec<u16>,
    /// The data-plane worker this belongs to (`None`: not one of `skiff run`'s workers, e.g. a
    /// node-mode pod); its listeners count `listener.<addr>.worker_<i>.downstream_cx_total`.
    pub worker: Option<usize>,
    /// Recent answers for DNS clusters' names (tcp_proxy).
    dns: connect::DnsCache,
    weighted_cursor: AtomicUsize,
    tls_sweeper: std::sync::Once,
}

impl Dataplane {
    /// A data plane serving `store`.
    pub fn new(
        store: Arc<Store>,
        stats: Arc<Stats>,
        upstream_mark: Option<u32>,
        capture_port: u16,
    ) -> Self {
        let tls = Arc::new(crate::tls::TlsContexts::new());
        Self::with_tls(store, stats, upstream_mark, capture_port, tls)
    }

    /// A data plane serving `store` with the TLS contexts `tls` (shared by the workers) and
    /// its own, empty HTTP upstream pool.
    pub fn with_tls(
        store: Arc<Store>,
        stats: Arc<Stats>,
        upstream_mark: Option<u32>,
        capture_port: u16,
        tls: Arc<crate::tls::TlsContexts>,
    ) -> Self {
        Dataplane {
            shared: Arc::new(http::Shared {
                store,
                stats,
                upstream_mark,
                http_pool: http::pool::Pool::new(),
                tls,
            }),
            capture_port,
            sockmap_ports: Vec::new(),
            worker: None,
            dns: connect::DnsCache::default(),
            weighted_cursor: AtomicUsize::new(0),
            tls_sweeper: std::sync::Once::new(),
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

    /// Start, once, the task that drops TLS configurations no connection used for a
    /// minute (contexts gone from the configuration, secrets rotated away). It holds the
    /// shared parts weakly and ends with them. Workers share their contexts: only the first
    /// worker sweeps them (a sweep drops what was unused since the previous one).
    fn start_tls_sweeper(&self) {
        if self.worker.is_some_and(|w| w > 0) {
            return;
        }
        self.tls_sweeper.call_once(|| {
            let shared = Arc::downgrade(&self.shared);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(TLS_SWEEP_EVERY).await;
                    let Some(s) = shared.upgrade() else {
                        return;
                    };
                    s.tls.sweep();
                }
            });
        });
    }
}
