//! The tcp_proxy step, for every listener: take the chosen cluster's connection slot, connect
//! to the chosen target (again on another host, up to `max_connect_attempts`) and, when the
//! cluster dials that endpoint with TLS, set the session up (`http::upstream_tls`: a failed
//! handshake is a failed connect), tell each host how it went, count the connection on the one that answered, and copy bytes under the
//! chain's `idle_timeout`, `max_downstream_connection_duration` and buffer limit. The cluster
//! entry and first host are selection's; only a further attempt asks the balancer again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, field};

use super::error::ConnError;
use super::forward::{Cut, Io, Limits};
use super::route::{Target, TcpRoute};
use super::{Dataplane, ListenerRole, connect, forward};
use crate::accesslog::Record;
use crate::addr::{EndpointAddr, OrigDstAddr};
use crate::http::upstream_tls::{self, TlsFailure};
use crate::lb::{self, Outcome, RoutingPriority};
use crate::model::cluster::DEFAULT_CONNECT_TIMEOUT;
use crate::model::istio::IstioStats;
use crate::model::listener::{DEFAULT_TCP_IDLE_TIMEOUT, TcpProxy};
use crate::model::tls::Secrets;
use crate::model::upstream_http::DEFAULT_BUFFER_LIMIT;
use crate::state::ClusterEntry;
use crate::stats::ClusterStats;

/// What the chain's tcp_proxy asks of the connection (passthrough: Envoy's defaults).
#[derive(Debug, Clone)]
struct Settings {
    /// `stat_prefix` (`tcp.<prefix>.*`); empty for passthrough.
    stat_prefix: String,
    idle: Option<Duration>,
    max_duration: Option<Duration>,
    attempts: u32,
    /// The listener's buffer limit.
    buffer: u32,
}

impl Settings {
    fn of(t: &TcpProxy) -> Settings {
        Settings {
            stat_prefix: t.stat_prefix.clone(),
            idle: t.idle_timeout,
            max_duration: t.max_downstream_connection_duration,
            attempts: t.max_connect_attempts.max(1),
            buffer: t.buffer_limit,
        }
    }

    fn passthrough() -> Settings {
        Settings {
            stat_prefix: String::new(),
            idle: Some(DEFAULT_TCP_IDLE_TIMEOUT),
            max_duration: None,
            attempts: 1,
            buffer: DEFAULT_BUFFER_LIMIT,
        }
    }
}

/// Where one tcp_proxy connection goes: a cluster's target, or passthrough (no listener owns
/// the destination, so no cluster is involved).
#[derive(Debug)]
pub(super) struct Upstream {
    /// The chosen cluster entry (breaker, connect timeout); `None` for passthrough.
    cluster: Option<Arc<ClusterEntry>>,
    /// Stat name when there is no cluster: the role's passthrough cluster.
    passthrough: &'static str,
    /// The cluster's stats (the passthrough cluster's for passthrough), resolved by the
    /// snapshot selection ran on.
    stats: Arc<ClusterStats>,
    /// Where to connect first.
    target: Target,
    /// The balancer's hash for further attempts.
    hash: Option<u64>,
    /// The chain's tcp_proxy settings.
    settings: Settings,
    /// The snapshot's secrets, kept only when the cluster may dial TLS.
    secrets: Option<Secrets>,
    /// The chain's `istio.stats` filter and the downstream peer's principal: Istio's TCP
    /// metrics are recorded for this connection.
    istio: Option<(IstioStats, Option<String>)>,
}

impl Upstream {
    /// The upstream selection chose on a tcp_proxy chain; `secrets` are those of the
    /// snapshot it chose on (TLS origination builds its configuration from them).
    pub(super) fn chosen(route: TcpRoute, secrets: &Secrets) -> Upstream {
        let settings = match &route.chain.get().action {
            crate::model::NetworkAction::TcpProxy(t) => Settings::of(t),
            // Selection only builds a TcpRoute from a tcp_proxy chain.
            _ => Settings::passthrough(),
        };
        let secrets = route
            .cluster
            .cluster
            .transport
            .may_use_tls()
            .then(|| secrets.clone());
        Upstream {
            secrets,
            stats: route.cluster.stats.clone(),
            cluster: Some(route.cluster),
            passthrough: "",
            target: route.target,
            hash: route.hash,
            settings,
            istio: None,
        }
    }

    /// Record Istio's TCP metrics for this connection (the chain carries `istio.stats`);
    /// `peer` is the verified downstream client's principal.
    pub(super) fn with_istio(mut self, cfg: IstioStats, peer: Option<String>) -> Upstream {
        self.istio = Some((cfg, peer));
        self
    }

    /// Passthrough to `dst` for a connection of `role`, counted in `stats` (the snapshot's
    /// handles of the role's passthrough cluster).
    pub(super) fn passthrough(
        role: &ListenerRole,
        dst: EndpointAddr,
        stats: Arc<ClusterStats>,
    ) -> Upstream {
        Upstream {
            cluster: None,
            stats,
            passthrough: role.passthrough_cluster(),
            target: Target::OriginalDst(dst),
            hash: None,
            settings: Settings::passthrough(),
            secrets: None,
            istio: None,
        }
    }

    /// Stat name of the cluster.
    pub(super) fn name(&self) -> &str {
        self.cluster
            .as_ref()
            .map_or(self.passthrough, |c| &c.cluster.name)
    }

    /// The target of attempt `n` (from 1): selection's first, then, for balanced clusters,
    /// another host than those `tried` when there is one; other targets are tried again.
    fn target(&self, n: u32, tried: &[SocketAddr]) -> Option<Target> {
        match (&self.target, &self.cluster) {
            (Target::Host(_), Some(c)) if n > 1 => {
                let req = lb::LbRequest {
                    hash: self.hash,
                    exclude: tried,
                    max_attempts: 3,
                };
                lb::choose(&c.lb, &req).map(Target::Host)
            }
            (t, _) => Some(t.clone()),
        }
    }
}

/// Proxy `down` to `up` until both sides close.
pub(super) async fn proxy(
    dp: &Dataplane,
    role: &ListenerRole,
    mut down: Io,
    orig_dst: Option<OrigDstAddr>,
    mut up: Upstream,
    mut rec: Option<&mut Record>,
) -> Result<(), ConnError> {
    let name = up.name();
    if let Some(r) = rec.as_deref_mut() {
        r.upstream_cluster = Some(name.to_string());
    }
    let counters = up.stats.clone();
    // 1. The cluster's circuit breaker: tcp_proxy closes the connection at max_connections
    // (`upstream_cx_overflow` is counted by the breaker). The slot is held until the end.
    let _slot = match &up.cluster {
        Some(c) => Some(c.try_connection(RoutingPriority::Default)?),
        None => None,
    };
    let timeout = up
        .cluster
        .as_ref()
        .map_or(DEFAULT_CONNECT_TIMEOUT, |c| c.cluster.connect_timeout);
    // 2. Connect, up to `max_connect_attempts` times, each failure reported to its host.
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut attempt = 0;
    let (mut upstream, addr, host, upstream_peer) = loop {
        attempt += 1;
        let Some(target) = up.target(attempt, &tried) else {
            return Err(ConnError::NoHealthyUpstream {
                cluster: name.to_string(),
            });
        };
        let addr = connect::resolve(&dp.dns, &target, name).await?;
        tracing::Span::current().record("endpoint", field::display(addr));
        crate::bpf::explain::trace::step("endpoint", addr, "chosen by the cluster's balancer");
        if let Some(r) = rec.as_deref_mut() {
            r.upstream_host = Some(addr.get());
        }
        counters.upstream_cx_total.inc();
        let host = target.host().cloned();
        let started = tokio::time::Instant::now();
        let connected = match counters
            .upstream_cx_connect_ms
            .time_ok(connect::connect(dp, role, addr, timeout))
            .await
        {
            Ok(s) => s,
            Err(source) => {
                let outcome = if source.is_timeout() {
                    counters.upstream_cx_connect_timeout.inc();
                    Outcome::Timeout
                } else {
                    counters.upstream_cx_connect_fail.inc();
                    Outcome::ConnectFailure
                };
                if let Some(h) = &host {
                    h.report(outcome);
                }
                if attempt < up.settings.attempts {
                    debug!(%addr, attempt, error = %source, "connect failed; trying again");
                    tried.push(addr.get());
                    continue;
                }
                // Envoy counts the attempts used up even at the default of one.
                counters.upstream_cx_connect_attempts_exceeded.inc();
                return Err(ConnError::Connect {
                    cluster: name.to_string(),
                    source,
                });
            }
        };
        // The transport, within what is left of the connect timeout.
        let budget = timeout.saturating_sub(started.elapsed());
        match originate(dp, &up, connected, addr, budget).await {
            Ok((io, peer)) => break (io, addr, host, peer),
            Err(source) => {
                counters.upstream_cx_connect_fail.inc();
                if let Some(h) = &host {
                    h.report(Outcome::ConnectFailure);
                }
                if attempt < up.settings.attempts {
                    debug!(%addr, attempt, error = %source, "upstream TLS failed; trying again");
                    tried.push(addr.get());
                    continue;
                }
                counters.upstream_cx_connect_attempts_exceeded.inc();
                return Err(ConnError::UpstreamTls {
                    cluster: name.to_string(),
                    addr,
                    source: Box::new(source),
                });
            }
        }
    };
    // Istio's TCP metrics: the label set resolved once, now that the upstream is known
    // (Istio reports the open once the peer is known, or at close).
    let istio = up.istio.as_ref().map(|(cfg, down_peer)| {
        let peer = if cfg.reporter.is_server() {
            down_peer.as_deref()
        } else {
            upstream_peer.as_deref()
        };
        let facts = crate::stats::istio::Facts {
            peer_principal: peer,
            mtls: cfg.reporter.is_server() && peer.is_some(),
            cluster: Some(name),
            service: up
                .cluster
                .as_ref()
                .and_then(|c| c.cluster.istio_service.as_deref()),
            endpoint: host.as_ref().and_then(|h| h.istio_workload.as_deref()),
            ..Default::default()
        };
        let m = &dp.stats().istio;
        let series = m.series(m.labels(cfg, &facts, None));
        series.tcp_opened.inc();
        (series, cfg.tcp_reporting)
    });
    // 3. The host hears how the connect went (outlier detection) and counts the connection
    // while it lasts: as an open connection (`/clusters` cx_active) and, as Envoy's TCP pool
    // does, as an active request, the load LEAST_REQUEST and PeakEWMA weigh.
    let _on_host = host.map(|h| {
        h.report(Outcome::Success);
        (h.start_connection(), h.start_request())
    });
    // 4. Forward. Payload that sk_msg redirected (`--sockmap`) waits in the socket's psock
    // queue, which splice(2) never reads: accelerated pairs take the buffered copy, as TLS
    // on either side does.
    let accelerated = dp
        .sockmap_ports
        .iter()
        .any(|&p| p == addr.get().port() || orig_dst.is_some_and(|o| o.get().port() == p));
    // The connection keeps its slot and host, not the configuration they came from.
    // Taken, not cloned (its stat prefix is a string): `up` is dropped below.
    let mut settings = std::mem::replace(&mut up.settings, Settings::passthrough());
    // The copy buffers no more than either side's per_connection_buffer_limit_bytes allows.
    if let Some(c) = &up.cluster {
        settings.buffer = settings.buffer.min(c.cluster.upstream_http.buffer_limit);
    }
    drop(up);
    if let Some(r) = rec.as_deref_mut() {
        r.upstream_local = upstream.tcp().local_addr().ok();
    }
    counters.upstream_cx_active.inc();
    let limits = Limits {
        idle: settings.idle,
        max_duration: settings.max_duration,
        buffer: settings.buffer as usize,
    };
    // Istio counts the downstream's bytes: received from it (sent upstream) and sent to it
    // (received from upstream), every tcp_reporting_duration while the connection lasts.
    let istio_bytes = istio.as_ref().map(|(s, _)| {
        move |t: forward::Transferred| {
            s.tcp_received.add(t.tx);
            s.tcp_sent.add(t.rx);
        }
    });
    let report = istio
        .as_ref()
        .zip(istio_bytes.as_ref())
        .map(|((_, every), sink)| forward::Report {
            every: *every,
            sink,
        });
    let moved = forward::forward_io(&mut down, &mut upstream, limits, accelerated, report).await;
    counters.upstream_cx_active.dec();
    if let Some((s, _)) = &istio {
        s.tcp_closed.inc();
    }
    let ended = moved.map_err(|e| ConnError::Stream {
        side: e.side,
        source: e.source,
    })?;
    let t = ended.transferred;
    if let Some(r) = rec {
        r.bytes_received = t.tx;
        r.bytes_sent = t.rx;
    }
    counters.upstream_cx_tx_bytes_total.add(t.tx);
    counters.upstream_cx_rx_bytes_total.add(t.rx);
    if let Some(cut) = ended.cut {
        // Rare, once per connection at most: the name is formatted here, not kept per chain.
        let stat = match cut {
            Cut::Idle => "idle_timeout",
            Cut::MaxDuration => "max_downstream_connection_duration",
        };
        if !settings.stat_prefix.is_empty() {
            dp.stats()
                .counter(&format!("tcp.{}.{stat}", settings.stat_prefix))
                .inc();
        }
        debug!(
            tx = t.tx,
            rx = t.rx,
            reason = stat,
            "connection closed by a limit"
        );
        return Ok(());
    }
    debug!(tx = t.tx, rx = t.rx, "connection closed");
    Ok(())
}

/// The upstream side of a connected socket: plaintext, or TLS when the cluster dials `addr`
/// with TLS (counted in `cluster.<name>.ssl.*`), with the server's principal (first URI SAN).
async fn originate(
    dp: &Dataplane,
    up: &Upstream,
    tcp: tokio::net::TcpStream,
    addr: EndpointAddr,
    budget: Duration,
) -> Result<(Io, Option<String>), TlsFailure> {
    let (Some(cluster), Some(secrets)) = (&up.cluster, &up.secrets) else {
        return Ok((Io::Tcp(tcp), None));
    };
    let Some(tls) = upstream_tls::endpoint_tls(cluster, addr.get()) else {
        return Ok((Io::Tcp(tcp), None));
    };
    let name = &cluster.cluster.name;
    let config =
        upstream_tls::client_config(&dp.shared.tls, dp.stats(), name, tls, secrets, addr.get())?;
    let o = upstream_tls::originate(dp.stats(), name, &config, tcp, addr.get(), budget).await?;
    debug!(%addr, peer = ?o.peer.uri_sans, "upstream TLS established");
    let principal = o.peer.uri_sans.first().cloned();
    Ok((Io::Tls(Box::new(o.stream.into())), principal))
}
