//! Accept loops, one per listener of any role, and the per-connection pipeline they all run:
//! accept facts -> select -> tcp_proxy or HCM.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, field, info_span, warn};

use super::accept::Accepted;
use super::counters::ListenerCounters;
use super::error::ConnError;
use super::forward::Io;
use super::rbac;
use super::route::{self, Route};
use super::tcp_proxy::{self, Upstream};
use super::{Dataplane, ListenerRole};
use crate::accesslog::{self, Record};
use crate::addr::ClientAddr;
use crate::bpf::explain::trace;
use crate::http::upstream_tls::TlsFailure;
use crate::model::Listener;
use crate::model::tls::{DownstreamTls, Secrets};
use crate::rbac::PeerIdentity;
use crate::stats::Stats;

/// Cap on concurrent connections per listener, so a flood cannot exhaust file descriptors.
const MAX_CONNECTIONS: usize = 32 * 1024;

static CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Accept on `listener` (of `role`) until `shutdown` completes; each connection runs the
/// pipeline on its own task. Connections already accepted keep running after this returns.
/// Stats go under Envoy's `listener.<address>` (`listener.127.0.0.1_15001`).
pub async fn run(
    listener: TcpListener,
    role: ListenerRole,
    dp: Arc<Dataplane>,
    shutdown: impl Future<Output = ()>,
) {
    let bound = listener.local_addr();
    let prefix = bound.as_ref().map_or_else(
        |_| "listener.unknown".into(),
        |a| crate::stats::listener_prefix(*a),
    );
    // A static listener bound to one address only accepts connections to that address (skiff
    // steers captured traffic to the capture and inbound listeners, never to these, and sets
    // no IP_TRANSPARENT): its connections' local address needs no getsockname each.
    let known_local = match &role {
        ListenerRole::Static { .. } => bound.ok().filter(|a| !a.ip().is_unspecified()),
        ListenerRole::Capture | ListenerRole::Inbound { .. } => None,
    };
    let mut counters = ListenerCounters::new(dp.stats(), &prefix);
    if let Some(w) = dp.worker {
        counters = counters.for_worker(w);
    }
    let counters = Arc::new(counters);
    dp.start_tls_sweeper();
    let direction = role.direction();
    let role = Arc::new(role);
    let conn_counters = counters.clone();
    // Cancelled when the listener stops accepting: HTTP connections then drain.
    let drain = CancellationToken::new();
    let conn_drain = drain.clone();
    let shutdown = async move {
        shutdown.await;
        drain.cancel();
    };
    accept_loop(
        listener,
        &counters,
        &prefix,
        direction,
        shutdown,
        move |stream, peer| {
            let (dp, role, counters) = (dp.clone(), role.clone(), conn_counters.clone());
            let drain = conn_drain.clone();
            // Boxed: the connection's state (kilobytes) is then copied once, into the box, and
            // the task that tokio copies as it spawns and again as it finishes stays small.
            Box::pin(async move {
                let mut log = ConnLog::new(peer);
                // Built in place: a named local moved into `traced` may keep its own slot in
                // this future.
                let result = trace::traced(
                    peer,
                    serve(
                        &dp,
                        stream,
                        (ClientAddr(peer), known_local),
                        &role,
                        drain,
                        &counters,
                        &mut log,
                    ),
                    |e| e.response_flags().to_string(),
                )
                .await;
                log.finish(&result, dp.stats());
                if let Err(e) = result {
                    counters.failed(dp.stats(), &e);
                    debug!(
                        side = %e.side(),
                        response_flags = e.response_flags(),
                        error = %e,
                        "connection failed"
                    );
                }
            })
        },
    )
    .await
}

/// The accept loop: at most [`MAX_CONNECTIONS`] at once, counted in `counters`, each served
/// by `serve` on its own task inside a `conn` span tagged with `direction` (its fields are
/// filled in as the connection is routed). Accept errors back off exponentially (5 ms to 1 s).
async fn accept_loop<F>(
    listener: TcpListener,
    counters: &ListenerCounters,
    name: &str,
    direction: &'static str,
    shutdown: impl Future<Output = ()>,
    serve: impl Fn(TcpStream, SocketAddr) -> F,
) where
    F: Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
                    warn!(error = %e, listener = name, backoff_ms = backoff.as_millis() as u64, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        backoff = Duration::from_millis(5);
        let open = counters.open();
        let span = info_span!(
            "conn",
            conn_id = CONN_ID.fetch_add(1, Ordering::Relaxed),
            direction,
            client = %peer,
            orig_dst = field::Empty,
            listener = field::Empty,
            filter_chain = field::Empty,
            peer = field::Empty,
            cluster = field::Empty,
            endpoint = field::Empty,
        );
        // Not an `async move { conn.await; .. }`: that block would hold `conn` twice (as
        // captured and as awaited), and tokio copies the whole task into its allocation.
        tokio::spawn(
            Holding {
                fut: serve(stream, peer),
                held: Some((open, permit)),
            }
            .instrument(span),
        );
    }
}

pin_project_lite::pin_project! {
    /// A connection's future with what it holds until it ends: its slot under
    /// [`MAX_CONNECTIONS`] and its count in the listener's open connections.
    struct Holding<F, H> {
        #[pin]
        fut: F,
        held: Option<H>,
    }
}

impl<F: Future<Output = ()>, H> Future for Holding<F, H> {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let this = self.project();
        std::task::ready!(this.fut.poll(cx));
        this.held.take();
        std::task::Poll::Ready(())
    }
}

/// One connection, start to end: `down` from `client` to `local` (`None`: not known without
/// asking the socket).
async fn serve(
    dp: &Dataplane,
    down: TcpStream,
    (client, local): (ClientAddr, Option<SocketAddr>),
    role: &ListenerRole,
    drain: CancellationToken,
    counters: &ListenerCounters,
    log: &mut ConnLog,
) -> Result<(), ConnError> {
    let span = tracing::Span::current();
    let _ = down.set_nodelay(true);
    // 1. Facts, on one snapshot (the listener filters peek at the first bytes).
    let accepted = Accepted::read(dp, &down, (client, local), role, counters).await?;
    let orig_dst = accepted.orig_dst;
    let local = accepted.local;
    log.accepted(&accepted);
    trace::accepted(
        local,
        orig_dst.map(|o| o.get()),
        accepted.listener.as_ref().map(|l| l.name.as_str()),
    );
    if let Some(o) = orig_dst {
        span.record("orig_dst", field::display(o));
    }
    // 2. Selection, pure over that snapshot.
    let facts = accepted.facts();
    let route = route::select(
        &accepted.snap,
        accepted.listener.as_ref(),
        &facts,
        &dp.weighted_cursor,
    );
    trace::routed(&route);
    let chain = match &route {
        Route::TcpProxy(r) => Some(&r.chain),
        Route::Http { chain, .. } => Some(chain),
        Route::Passthrough(_) | Route::Reject(_) => None,
    };
    if let Some(chain) = chain {
        span.record("listener", field::display(&chain.listener().name));
        span.record("filter_chain", field::display(&chain.get().name));
    }
    // A tcp_proxy chain whose cluster has no host was chosen all the same: its access log
    // records the failure (Envoy's `UH`).
    if let (Route::Reject(_), Some(l)) = (&route, accepted.listener.as_ref())
        && let Some((id, _)) = route::select_chain(l, &facts)
        && let Some(c) = route::Chain::new(l.clone(), id)
    {
        log.tcp_proxy(&c);
    }
    // 3. The chain's transport socket: a TLS chain terminates here, before any network
    // filter runs (as Envoy's transport socket), with the secrets of this snapshot.
    let tls = chain.and_then(|c| c.get().tls.clone());
    let (down, peer, local_uri_sans) = match (tls, chain) {
        (Some(ctx), Some(chain)) => {
            let listener = &chain.listener().name;
            match terminate(dp, &accepted.snap.secrets, &ctx, down, counters, client).await {
                Ok(t) => t,
                Err(source) => {
                    return Err(ConnError::DownstreamTls {
                        listener: listener.clone(),
                        source: Box::new(source),
                    });
                }
            }
        }
        _ => (Io::Tcp(down), None, None),
    };
    if let Some(p) = &peer {
        span.record("peer", field::display(peer_name(p)));
    }
    log.downstream(&down, peer.as_ref());
    // 4. The chain's network RBAC filters, before anything reaches an upstream.
    if let Some(chain) = chain
        && let Err(denied) = rbac::check(&accepted.snap, chain, &facts, peer.as_ref())
    {
        drop(route);
        drop(accepted);
        return Err(denied.close().await);
    }
    // Passthrough has no cluster entry: its stats come from the same snapshot.
    let passthrough_stats = match &route {
        Route::Passthrough(_) => accepted
            .snap
            .cluster_stats(role.passthrough_cluster())
            .cloned(),
        _ => None,
    };
    // 5. The chain's terminal filter. The connection keeps what was chosen, not the
    // configuration it was chosen from (a tcp_proxy to a cluster that may dial TLS keeps the
    // secrets it will dial with).
    match route {
        Route::TcpProxy(r) => {
            span.record("cluster", field::display(&r.cluster.cluster.name));
            log.tcp_proxy(&r.chain);
            let istio = r.chain.get().istio_stats.clone();
            let mut up = Upstream::chosen(r, &accepted.snap.secrets);
            if let Some(cfg) = istio {
                // Istio names the client by its certificate's first URI SAN (SPIFFE).
                let principal = peer.as_ref().and_then(|p| p.uri_sans.first().cloned());
                up = up.with_istio(cfg, principal);
            }
            drop(accepted);
            tcp_proxy::proxy(dp, role, down, orig_dst, up, log.record()).await
        }
        Route::Passthrough(dst) => {
            drop(accepted);
            let Some(stats) = passthrough_stats else {
                // Every published snapshot resolves both passthrough clusters' stats.
                return Err(ConnError::NoCluster {
                    cluster: role.passthrough_cluster().to_string(),
                });
            };
            let up = Upstream::passthrough(role, dst, stats);
            span.record("cluster", field::display(up.name()));
            tcp_proxy::proxy(dp, role, down, orig_dst, up, log.record()).await
        }
        Route::Http { chain, manager } => {
            drop(accepted);
            let client_cert = match (&down, &peer, &local_uri_sans) {
                (Io::Tls(s), Some(p), Some(by)) if manager.forward_client_cert.sets_details() => s
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|der| {
                        Arc::from(crate::http::headers::client_cert_element(
                            manager.client_cert_details,
                            by,
                            der,
                            p,
                        ))
                    }),
                _ => None,
            };
            let conn = crate::http::HttpConn {
                client_cert,
                dp: dp.shared.clone(),
                manager,
                listener: chain.listener().name.clone(),
                client: client.get(),
                local: orig_dst.map_or(local, |o| o.get()),
                orig_dst,
                drain,
                tls: matches!(down, Io::Tls(_)),
                peer: peer.map(Arc::new),
                log_base: match &chain.get().action {
                    crate::model::NetworkAction::Http(h) if !h.access_log.is_empty() => {
                        Some(Arc::new(log.http_base(&down)))
                    }
                    _ => None,
                },
            };
            drop(chain);
            crate::http::serve(conn, down).await;
            Ok(())
        }
        Route::Reject(e) => Err(e),
    }
}

/// What a connection's access logs (the listener's and its tcp_proxy's) need, filled in as
/// the pipeline decides; nothing is collected when neither has any.
#[derive(Debug)]
pub(super) struct ConnLog {
    rec: Record,
    started: tokio::time::Instant,
    listener: Option<Arc<Listener>>,
    chain: Option<route::Chain>,
}

impl ConnLog {
    fn new(client: SocketAddr) -> ConnLog {
        ConnLog {
            rec: Record {
                downstream_remote: Some(client),
                ..Record::starting_now()
            },
            started: tokio::time::Instant::now(),
            listener: None,
            chain: None,
        }
    }

    fn wanted(&self) -> bool {
        self.listener
            .as_ref()
            .is_some_and(|l| !l.access_log.is_empty())
            || self.chain.is_some()
    }

    /// The record, when some access log will read it.
    fn record(&mut self) -> Option<&mut Record> {
        self.wanted().then_some(&mut self.rec)
    }

    fn accepted(&mut self, a: &Accepted) {
        self.listener = a.listener.clone();
        self.rec.downstream_local = Some(a.orig_dst.map_or(a.local, |o| o.get()));
        self.rec.requested_server_name = a.server_name.clone();
    }

    fn downstream(&mut self, down: &Io, peer: Option<&PeerIdentity>) {
        if !self.wanted() {
            return;
        }
        self.rec.peer_uri_san = peer.and_then(|p| p.uri_sans.first().cloned());
        if let Io::Tls(t) = down {
            self.rec.tls_version = t.get_ref().1.protocol_version().map(tls_version_name);
        }
    }

    /// The connection's part of its HTTP requests' records (the HCM logs per request).
    fn http_base(&self, down: &Io) -> Record {
        let mut r = self.rec.clone();
        if let Io::Tls(t) = down {
            r.tls_version = t.get_ref().1.protocol_version().map(tls_version_name);
        }
        r
    }

    fn tcp_proxy(&mut self, chain: &route::Chain) {
        if let crate::model::NetworkAction::TcpProxy(t) = &chain.get().action
            && !t.access_log.is_empty()
        {
            self.chain = Some(chain.clone());
        }
    }

    /// Write the lines of the connection that ended with `result`.
    fn finish(mut self, result: &Result<(), ConnError>, stats: &Stats) {
        if !self.wanted() {
            return;
        }
        self.rec.duration = self.started.elapsed();
        if let Err(e) = result {
            e.log_into(&mut self.rec);
        }
        if let Some(c) = &self.chain
            && let crate::model::NetworkAction::TcpProxy(t) = &c.get().action
        {
            accesslog::log_all(&t.access_log, &self.rec, stats);
        }
        if let Some(l) = &self.listener {
            accesslog::log_all(&l.access_log, &self.rec, stats);
        }
    }
}

/// Envoy's name of a TLS version (`%DOWNSTREAM_TLS_VERSION%`).
fn tls_version_name(v: rustls::ProtocolVersion) -> &'static str {
    match v {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
        rustls::ProtocolVersion::TLSv1_1 => "TLSv1.1",
        rustls::ProtocolVersion::TLSv1_0 => "TLSv1",
        _ => "unknown",
    }
}

/// TLS termination of `down` with the chain's context `ctx` over `secrets`; the client's
/// verified identity when it presented a certificate. Counted in `<listener>.ssl.*`.
async fn terminate(
    dp: &Dataplane,
    secrets: &Secrets,
    ctx: &DownstreamTls,
    down: TcpStream,
    counters: &ListenerCounters,
    client: ClientAddr,
) -> Result<(Io, Option<PeerIdentity>, Option<Arc<[String]>>), TlsFailure> {
    let result = match dp.shared.tls.server(ctx, secrets) {
        Ok(server) => crate::tls::accept(down, &server)
            .await
            .map_err(TlsFailure::Handshake),
        Err(e) => Err(TlsFailure::Context(e)),
    };
    match result {
        Ok(a) => {
            let tls = a.stream.get_ref().1;
            let resumed = tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            counters.ssl_handshake(resumed, crate::tls::negotiated::stat_suffixes(tls));
            Ok((
                Io::Tls(Box::new(a.stream.into())),
                a.peer,
                Some(a.local_uri_sans),
            ))
        }
        Err(e) => {
            e.report(dp.stats(), counters.prefix(), client.get());
            Err(e)
        }
    }
}

/// How a peer is named in logs: its first URI SAN (SPIFFE), else DNS SAN, else subject.
fn peer_name(p: &PeerIdentity) -> &str {
    p.uri_sans
        .first()
        .or(p.dns_sans.first())
        .map_or(p.subject.as_str(), String::as_str)
}
