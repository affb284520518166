//! Accept loops: one task per listener, one task and one span per connection.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, field, info_span, warn};

use super::{Accepted, Dataplane, Decision, decide, forward, listener_of, orig_dst};
use crate::addr::{ClientAddr, EndpointAddr};

/// What kind of listener accepted a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerRole {
    /// skiff's capture listener: every connection was redirected; read its original destination.
    Capture,
    /// A bootstrap/xDS listener bound to its own address.
    Static {
        /// Listener name.
        name: String,
    },
}

/// Cap on concurrent connections per listener, so a flood cannot exhaust file descriptors.
const MAX_CONNECTIONS: usize = 32 * 1024;

static CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Accept until `shutdown` completes. Accept errors (EMFILE ...) back off exponentially instead
/// of spinning. Connections already accepted keep running after this returns.
pub async fn run(
    listener: TcpListener,
    role: ListenerRole,
    dp: Arc<Dataplane>,
    shutdown: impl Future<Output = ()>,
) {
    let stat = match &role {
        ListenerRole::Capture => format!(
            "listener.{}",
            listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default()
        ),
        ListenerRole::Static { name } => format!("listener.{name}"),
    };
    let direction = match role {
        ListenerRole::Capture => "outbound",
        ListenerRole::Static { .. } => "listener",
    };
    let conn_dp = dp.clone();
    accept_loop(
        listener,
        &dp,
        &stat,
        direction,
        shutdown,
        move |stream, peer| {
            let dp = conn_dp.clone();
            let role = role.clone();
            async move { handle(&dp, stream, ClientAddr(peer), &role).await }
        },
    )
    .await
}

/// The accept loop every listener shares: at most [`MAX_CONNECTIONS`] at once, counted under
/// `<stat>.downstream_cx_total` / `_active`, each served by `serve` on its own task inside a
/// `conn` span tagged with `direction` (its fields are filled in as the connection is
/// routed). Accept errors back off exponentially (5 ms to 1 s).
pub(super) async fn accept_loop<F>(
    listener: TcpListener,
    dp: &Dataplane,
    stat: &str,
    direction: &'static str,
    shutdown: impl Future<Output = ()>,
    serve: impl Fn(TcpStream, SocketAddr) -> F,
) where
    F: Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let accepted = dp.stats().counter(&format!("{stat}.downstream_cx_total"));
    let active = dp.stats().gauge(&format!("{stat}.downstream_cx_active"));
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => return,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, listener = stat, backoff_ms = backoff.as_millis() as u64, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        backoff = Duration::from_millis(5);
        accepted.inc();
        active.inc();
        let active = active.clone();
        let span = info_span!(
            "conn",
            conn_id = CONN_ID.fetch_add(1, Ordering::Relaxed),
            direction,
            client = %peer,
            orig_dst = field::Empty,
            listener = field::Empty,
            filter_chain = field::Empty,
            cluster = field::Empty,
            endpoint = field::Empty,
        );
        let conn = serve(stream, peer);
        tokio::spawn(
            async move {
                conn.await;
                active.dec();
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// How long the http_inspector listener filter waits for the first bytes before giving up
/// (the chain is then chosen without an application protocol).
const HTTP_INSPECT_TIMEOUT: Duration = Duration::from_secs(1);

async fn handle(dp: &Arc<Dataplane>, mut down: TcpStream, client: ClientAddr, role: &ListenerRole) {
    let span = tracing::Span::current();
    let local = match down.local_addr() {
        Ok(a) => a,
        Err(e) => {
            debug!(error = %e, "accepted socket has no local address");
            return;
        }
    };
    let _ = down.set_nodelay(true);
    let wants_orig = match role {
        ListenerRole::Capture => true,
        ListenerRole::Static { name } => dp
            .store()
            .load()
            .listeners
            .get(name)
            .is_some_and(|l| l.use_original_dst),
    };
    let orig = if wants_orig {
        match orig_dst::read(&down) {
            Ok(o) => o,
            Err(e) => {
                debug!(error = %e, "SO_ORIGINAL_DST failed");
                None
            }
        }
    } else {
        None
    };
    if let Some(o) = orig {
        span.record("orig_dst", field::display(o));
    }
    let snap = dp.store().load();
    let mut accepted = Accepted {
        role,
        client: client.get(),
        local,
        orig_dst: orig,
        application_protocols: &[],
    };
    let inspect = listener_of(dp, &snap, &accepted).is_some_and(|l| {
        l.listener_filters
            .iter()
            .any(|f| f == crate::http::sniff::HTTP_INSPECTOR)
    });
    let detected: Vec<String> = if inspect {
        crate::http::sniff::detect(&down, HTTP_INSPECT_TIMEOUT)
            .await
            .map(|p| vec![p.to_string()])
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    accepted.application_protocols = &detected;
    let decision = decide(dp, &snap, &accepted);
    let (cluster, target, timeout) = match decision {
        Decision::Upstream {
            listener,
            filter_chain,
            cluster,
            endpoint,
            dns,
        } => {
            span.record("listener", field::display(&listener));
            span.record("filter_chain", field::display(&filter_chain));
            span.record("cluster", field::display(&cluster));
            let timeout = snap
                .cluster(&cluster)
                .map(|c| c.cluster.connect_timeout)
                .unwrap_or(crate::model::cluster::DEFAULT_CONNECT_TIMEOUT);
            let target = match (endpoint, dns) {
                (Some(ep), _) => ep,
                (None, Some((host, port))) => match resolve(&host, port).await {
                    Some(a) => EndpointAddr(a),
                    None => {
                        dp.stats()
                            .counter(&format!("cluster.{cluster}.upstream_cx_none_healthy"))
                            .inc();
                        debug!(%host, "DNS resolution failed");
                        return;
                    }
                },
                (None, None) => return,
            };
            (cluster, target, timeout)
        }
        Decision::Http {
            listener,
            filter_chain,
            manager,
        } => {
            span.record("listener", field::display(&listener));
            span.record("filter_chain", field::display(&filter_chain));
            drop(snap);
            let conn = crate::http::HttpConn {
                dp: dp.shared.clone(),
                manager,
                listener,
                client: client.get(),
                orig_dst: orig,
            };
            crate::http::serve(conn, down).await;
            return;
        }
        Decision::Passthrough(ep) => (
            "PassthroughCluster".to_string(),
            ep,
            crate::model::cluster::DEFAULT_CONNECT_TIMEOUT,
        ),
        Decision::Reject(why) => {
            dp.stats().counter("skiff.downstream_cx_rejected").inc();
            debug!(reason = %why, "closing connection");
            return;
        }
    };
    span.record("endpoint", field::display(target));
    // The cluster's circuit breaker and the host's live state outlive the snapshot; take them
    // now. tcp_proxy closes the downstream connection when max_connections is reached.
    let (cx_slot, host) = match snap.cluster(&cluster) {
        Some(entry) => match entry.try_connection(crate::lb::RoutingPriority::Default) {
            Ok(slot) => (Some(slot), entry.lb.host(target.get()).cloned()),
            Err(e) => {
                debug!(error = %e, "closing connection");
                return;
            }
        },
        None => (None, None),
    };
    // Drop the snapshot before the long copy: the connection keeps its decision, not the config.
    drop(snap);
    let stat = |s: &str| dp.stats().counter(&format!("cluster.{cluster}.{s}"));
    stat("upstream_cx_total").inc();
    let mut up = match crate::net::connect(target, dp.upstream_mark(), timeout).await {
        Ok(s) => s,
        Err(e) => {
            let outcome = match e {
                crate::net::ConnectError::Timeout { .. } => {
                    stat("upstream_cx_connect_timeout").inc();
                    crate::lb::Outcome::Timeout
                }
                _ => {
                    stat("upstream_cx_connect_fail").inc();
                    crate::lb::Outcome::ConnectFailure
                }
            };
            if let Some(h) = &host {
                h.report(outcome);
            }
            debug!(error = %e, "upstream connect failed");
            return;
        }
    };
    // Outlier detection and LEAST_REQUEST see L4 connections as tcp_proxy reports them.
    let _cx = host.map(|h| {
        h.report(crate::lb::Outcome::Success);
        h.start_connection()
    });
    let _cx_slot = cx_slot;
    let active = dp
        .stats()
        .gauge(&format!("cluster.{cluster}.upstream_cx_active"));
    active.inc();
    // Payload that sk_msg redirected (`--sockmap`) waits in the socket's psock queue, which
    // splice(2) never reads: accelerated pairs take the buffered copy.
    let accelerated = dp
        .sockmap_ports
        .iter()
        .any(|&p| p == target.get().port() || orig.is_some_and(|o| o.get().port() == p));
    let moved = if accelerated {
        forward::forward_copy(&mut down, &mut up).await
    } else {
        forward::forward(&mut down, &mut up).await
    };
    match moved {
        Ok(t) => {
            stat("upstream_cx_tx_bytes_total").add(t.tx);
            stat("upstream_cx_rx_bytes_total").add(t.rx);
            debug!(tx = t.tx, rx = t.rx, "connection closed");
        }
        Err(e) => debug!(error = %e, "connection ended with error"),
    }
    active.dec();
}

async fn resolve(host: &str, port: u16) -> Option<SocketAddr> {
    tokio::net::lookup_host((host, port)).await.ok()?.next()
}
