//! skiff's embedded ADS control plane (`skiff control-plane`).
//!
//! A small Aggregated Discovery Service server for demos, tests and replaying a captured
//! Envoy `/config_dump`: it serves files, it does not compute configuration.
//!
//! # Layout
//! - this file: the public API ([`ControlPlaneOptions`], [`Source`], [`serve`]) and the tonic
//!   service that starts one task per ADS stream.
//! - `source`: reads the [`Source`] into an immutable `Snapshot` (per type URL: a version and
//!   the resources by name), polls it for changes and publishes each new snapshot on a
//!   `watch` channel.
//! - `sotw`: one state-of-the-world ADS stream (`StreamAggregatedResources`).
//! - `delta`: one incremental ADS stream (`DeltaAggregatedResources`).
//! - `security`: TLS for the gRPC listener (`--tls-cert/--tls-key`, `--client-ca`) and the
//!   bearer-token check (`--require-token`).
//!
//! # Secrets
//! Secret resources (`…transport_sockets.tls.v3.Secret`, a file of them in the directory) are
//! served by name over ADS (SotW and delta) and, with `--sds-socket PATH`, by the
//! SecretDiscoveryService on that Unix socket (as Istio's node agent serves `default` and
//! `ROOTCA`); SDS requests without a type URL mean secrets. A rewritten file is pushed.
//!
//! # Protocol choices
//! - Wildcard: LDS and CDS requests with no resource names (or with `*`) get every resource of
//!   the type; any other type gets only the names subscribed (`*` also works for them), and
//!   only the subset that exists.
//! - SotW: a response is sent when a type is first requested on the stream, and afterwards
//!   only when what the client would receive changes (type version, subscribed names, or the
//!   bytes of the resources served). A NACK is logged and the rejected content is not sent
//!   again; the next change is. Requests carrying a stale nonce are ignored, as the xDS
//!   protocol asks.
//! - Delta: the per-resource version is a hash of the resource's bytes; the server remembers
//!   what the client has (seeded from `initial_resource_versions`) and sends only resources
//!   whose version differs, plus `removed_resources` for resources that disappeared and for
//!   newly subscribed names that do not exist. The first request for a type always gets a
//!   response, so a client's initial fetch completes even when there is nothing to send.
//! - Every ACK is logged at info and every NACK at warn, with node id, type URL, version,
//!   nonce (and the NACK's `error_detail` message).

mod delta;
mod security;
mod sotw;
mod source;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{ControlPlane, Node};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::source::{Loader, Snapshot};

pub use self::security::ServerTls;
pub use self::source::LoadError;

/// The identifier every response carries in `control_plane.identifier`.
pub const CONTROL_PLANE_ID: &str = "skiff-control-plane";

/// Default gRPC listen address (Istio's plain-text xDS port).
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    15010,
));

/// Default interval between two looks at the source for changes.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// How long shutdown waits for open streams and connections to close.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Responses queued per stream before the stream task waits for the client to read.
const STREAM_QUEUE: usize = 16;

/// What to serve, and where.
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    /// Where the resources come from.
    pub source: Source,
    /// gRPC listen address; port 0 picks a free port (reported through `on_bound`).
    pub listen: SocketAddr,
    /// How often the source is checked for changes (file modification time and size).
    pub poll_interval: Duration,
    /// Serve ADS over TLS (`--tls-cert/--tls-key`, client certificates with `--client-ca`).
    pub tls: Option<ServerTls>,
    /// Refuse ADS streams whose `authorization` is not `Bearer <this file's content>`
    /// (UNAUTHENTICATED); the file is re-read for every stream, so it can rotate.
    pub require_token: Option<PathBuf>,
    /// Also serve the SecretDiscoveryService on this Unix socket (plain gRPC; the socket's
    /// permissions protect it, as Istio's node agent socket).
    pub sds_socket: Option<PathBuf>,
    /// Also serve ADS on this Unix socket, as pilot-agent's xDS proxy serves its sidecar
    /// (`/etc/istio/proxy/XDS`); no token check (the socket's permissions protect it).
    pub ads_socket: Option<PathBuf>,
}

impl ControlPlaneOptions {
    /// Options with the default listen address and poll interval.
    pub fn new(source: Source) -> Self {
        Self {
            source,
            listen: DEFAULT_LISTEN,
            poll_interval: DEFAULT_POLL_INTERVAL,
            tls: None,
            require_token: None,
            sds_socket: None,
            ads_socket: None,
        }
    }
}

/// Why the control plane could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// The task reading the source panicked or was cancelled.
    #[error("loading the control plane source")]
    LoadTask(#[source] tokio::task::JoinError),
    /// The source cannot be read at all (missing directory, config dump that does not parse).
    #[error("loading {what}")]
    Load {
        /// The source.
        what: Source,
        /// Cause.
        #[source]
        error: LoadError,
    },
    /// The listen address cannot be bound.
    #[error("binding the control plane to {addr}")]
    Bind {
        /// Listen address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        error: std::io::Error,
    },
    /// The SDS Unix socket cannot be bound.
    #[error("binding the SDS socket {}", path.display())]
    BindUnix {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        error: std::io::Error,
    },
    /// The TLS certificate, key or client CA cannot be used.
    #[error(transparent)]
    Tls(Box<security::TlsError>),
    /// The bound socket has no local address.
    #[error("control plane local address")]
    LocalAddr(#[source] std::io::Error),
    /// The gRPC server failed.
    #[error("control plane gRPC server")]
    Server(#[source] tonic::transport::Error),
}

/// Where the served resources come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A directory of discovery files (`{"version_info", "resources": [...]}`, JSON or YAML),
    /// one xDS type per file. The type comes from the resources' `@type` (for a file without
    /// resources: its `type_url`, else its name: `listeners`/`lds`, `clusters`/`cds`,
    /// `routes`/`rds`, `endpoints`/`eds`, `secrets`/`sds`). A file without `version_info` is versioned by a
    /// hash of its resources. Files are `*.json`, `*.yaml`, `*.yml`; hidden files are skipped.
    Dir(PathBuf),
    /// An Envoy (or Istio, OSM, Kuma) admin `/config_dump`: its dynamic listeners, clusters,
    /// route configurations and endpoints (active state) are served. Envoy keeps one version
    /// per type, so each type is served at the newest `version_info` among its resources:
    /// the largest number when every version is an integer, otherwise the greatest string
    /// (Istio's `2023-12-26T05:57:39Z/1` versions sort by time). A type whose resources carry
    /// no version at all is versioned by a hash of its resources. The file is polled like a
    /// directory; a new dump that does not parse is logged and the previous one kept.
    ConfigDump(PathBuf),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Dir(p) => write!(f, "directory {}", p.display()),
            Source::ConfigDump(p) => write!(f, "config dump {}", p.display()),
        }
    }
}

/// Loads the source, binds `opts.listen`, reports the bound address through `on_bound`, then
/// serves ADS (state of the world and delta) until `shutdown` completes.
///
/// Fails before binding when the source cannot be read at all (missing directory, config dump
/// that does not parse); a discovery file that does not parse is logged and its type is
/// served from its last good version (or not at all).
pub async fn serve(
    opts: ControlPlaneOptions,
    on_bound: impl FnOnce(SocketAddr) + Send,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ControlPlaneError> {
    let mut loader = Loader::new(opts.source.clone());
    let first = tokio::task::spawn_blocking(move || loader.load_initial().map(|s| (loader, s)))
        .await
        .map_err(ControlPlaneError::LoadTask)?;
    let (loader, snapshot) = first.map_err(|error| ControlPlaneError::Load {
        what: opts.source.clone(),
        error,
    })?;
    let (snapshots_tx, snapshots) = watch::channel(Arc::new(snapshot));
    // Read before binding: a bad certificate fails the start, not the first handshake.
    let tls = opts
        .tls
        .as_ref()
        .map(ServerTls::load)
        .transpose()
        .map_err(|e| ControlPlaneError::Tls(Box::new(e)))?;

    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|error| ControlPlaneError::Bind {
            addr: opts.listen,
            error,
        })?;
    let bound = listener
        .local_addr()
        .map_err(ControlPlaneError::LocalAddr)?;
    info!(
        addr = %bound,
        source = %opts.source,
        tls = opts.tls.is_some(),
        client_certificates = opts.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        token_required = opts.require_token.is_some(),
        "control plane listening"
    );
    let sds_listener = bind_unix_opt(opts.sds_socket.as_deref())?;
    let ads_listener = bind_unix_opt(opts.ads_socket.as_deref())?;
    on_bound(bound);

    let stop = CancellationToken::new();
    let poller = tokio::spawn(source::poll(
        loader,
        snapshots_tx,
        opts.poll_interval,
        stop.clone(),
    ));
    let ctx = StreamCtx {
        snapshots,
        nonces: Arc::new(AtomicU64::new(0)),
        stop: stop.clone(),
    };
    let sds_server = sds_listener.map(|(path, listener)| {
        let server = tonic::transport::Server::builder().serve_with_incoming_shutdown(
            SecretDiscoveryServiceServer::new(SdsService { ctx: ctx.clone() }),
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            stop.clone().cancelled_owned(),
        );
        spawn_unix_server("SDS", path, server)
    });
    let ads_socket_server = ads_listener.map(|(path, listener)| {
        let server = tonic::transport::Server::builder().serve_with_incoming_shutdown(
            AggregatedDiscoveryServiceServer::new(AdsService { ctx: ctx.clone() }),
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            stop.clone().cancelled_owned(),
        );
        spawn_unix_server("ADS", path, server)
    });
    let service = AdsService { ctx };
    let service = AggregatedDiscoveryServiceServer::with_interceptor(
        service,
        security::TokenCheck::new(opts.require_token.clone()),
    );
    let signal = {
        let stop = stop.clone();
        async move {
            tokio::select! {
                () = shutdown => {}
                () = stop.cancelled() => {}
            }
            info!("control plane shutting down");
            // Ends every stream task, so graceful shutdown does not wait for clients.
            stop.cancel();
        }
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).map_err(ControlPlaneError::Server)?;
    }
    // One service, so no router: tonic serves it directly.
    let server = builder.serve_with_incoming_shutdown(
        service,
        tonic::transport::server::TcpIncoming::from(listener),
        signal,
    );
    let result = tokio::select! {
        r = server => r.map_err(ControlPlaneError::Server),
        () = async { stop.cancelled().await; tokio::time::sleep(DRAIN_TIMEOUT).await } => {
            warn!(timeout = ?DRAIN_TIMEOUT, "control plane connections did not close in time");
            Ok(())
        }
    };
    stop.cancel();
    for task in sds_server.into_iter().chain(ads_socket_server) {
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, task).await;
    }
    if let Err(e) = poller.await {
        warn!(error = %e, "control plane source poller failed");
    }
    result
}

/// Binds the Unix socket at `path`, when one is asked for (see [`bind_unix`]).
// The error `serve` itself returns; it happens once, at start-up.
#[allow(clippy::result_large_err)]
fn bind_unix_opt(
    path: Option<&std::path::Path>,
) -> Result<Option<(PathBuf, tokio::net::UnixListener)>, ControlPlaneError> {
    path.map(|path| {
        bind_unix(path)
            .map(|l| (path.to_path_buf(), l))
            .map_err(|error| ControlPlaneError::BindUnix {
                path: path.to_path_buf(),
                error,
            })
    })
    .transpose()
}

/// Runs a gRPC server on a Unix socket (`what`: SDS or ADS) until it stops, then removes the
/// socket file so the next start does not trip over it.
fn spawn_unix_server(
    what: &'static str,
    path: PathBuf,
    server: impl std::future::Future<Output = Result<(), tonic::transport::Error>> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    info!(socket = %path.display(), "{what} listening on a Unix socket");
    tokio::spawn(async move {
        if let Err(e) = server.await {
            warn!(socket = %path.display(), error = %e, "{what} socket server failed");
        }
        let _ = std::fs::remove_file(&path);
    })
}

/// Binds a Unix socket (SDS, ADS), replacing a stale one (a socket file nobody listens on).
fn bind_unix(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    if std::os::unix::net::UnixStream::connect(path).is_err() {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    tokio::net::UnixListener::bind(path)
}

/// What every stream task shares.
#[derive(Clone)]
struct StreamCtx {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    nonces: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl StreamCtx {
    /// A nonce unique for the life of the server.
    fn next_nonce(&self) -> String {
        (self.nonces.fetch_add(1, Ordering::Relaxed) + 1).to_string()
    }
}

/// The client no longer reads responses.
struct Gone;

/// What one ADS stream keeps, whatever its protocol: where responses go, who the client is,
/// and per-type state `T` (`R` is the response message).
struct Stream<T, R> {
    ctx: StreamCtx,
    tx: mpsc::Sender<Result<R, tonic::Status>>,
    /// Node id named by the client so far (`-` until then), for logs.
    node: String,
    /// Peer address, for logs.
    peer: String,
    /// The type of requests that name none (SDS streams: secrets).
    default_type: Option<&'static str>,
    types: std::collections::BTreeMap<String, T>,
}

impl<T, R> Stream<T, R> {
    fn new(
        ctx: StreamCtx,
        peer: Option<SocketAddr>,
        default_type: Option<&'static str>,
        tx: mpsc::Sender<Result<R, tonic::Status>>,
    ) -> Self {
        Stream {
            ctx,
            tx,
            node: "-".to_owned(),
            peer: peer.map_or_else(
                || {
                    if default_type.is_some() {
                        "unix".to_owned()
                    } else {
                        "-".to_owned()
                    }
                },
                |p| p.to_string(),
            ),
            default_type,
            types: std::collections::BTreeMap::new(),
        }
    }

    /// The request's type URL, or the stream's default when it names none.
    fn type_url(&self, given: String) -> Option<String> {
        if given.is_empty() {
            self.default_type.map(str::to_owned)
        } else {
            Some(given)
        }
    }
}

/// One ADS stream's protocol (state of the world or delta): what a request and a new
/// snapshot do to it. [`drive`] owns the loop both share.
trait StreamProtocol {
    /// The request message of this protocol.
    type Request;
    /// "state of the world" or "delta", for logs.
    const NAME: &'static str;
    /// Handle one client request.
    async fn on_request(
        &mut self,
        request: Self::Request,
        snapshot: &Arc<Snapshot>,
    ) -> Result<(), Gone>;
    /// Push what changed in a new snapshot.
    async fn on_snapshot(&mut self, snapshot: &Arc<Snapshot>) -> Result<(), Gone>;
}

/// Serves one stream until the client goes away or the server stops.
async fn drive<T, R>(
    mut stream: Stream<T, R>,
    mut requests: tonic::Streaming<<Stream<T, R> as StreamProtocol>::Request>,
) where
    Stream<T, R>: StreamProtocol,
    <Stream<T, R> as StreamProtocol>::Request: Default + Send + 'static,
{
    let mut snapshots = stream.ctx.snapshots.clone();
    let stop = stream.ctx.stop.clone();
    let name = <Stream<T, R> as StreamProtocol>::NAME;
    info!(peer = stream.peer.as_str(), "ADS stream opened ({})", name);
    let mut snapshot = snapshots.borrow_and_update().clone();
    let outcome = loop {
        let sent = tokio::select! {
            () = stop.cancelled() => break "server stopping",
            msg = requests.message() => match msg {
                Ok(Some(request)) => stream.on_request(request, &snapshot).await,
                Ok(None) => break "client closed the stream",
                Err(status) => {
                    tracing::debug!(peer = stream.peer.as_str(), error = %status, "{} ADS stream error", name);
                    break "stream error";
                }
            },
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break "server stopping";
                }
                snapshot = snapshots.borrow_and_update().clone();
                stream.on_snapshot(&snapshot).await
            }
        };
        if sent.is_err() {
            break "client gone";
        }
    };
    info!(
        peer = stream.peer.as_str(),
        node = stream.node.as_str(),
        outcome,
        "ADS stream closed ({})",
        name
    );
}

fn control_plane() -> Option<ControlPlane> {
    Some(ControlPlane {
        identifier: CONTROL_PLANE_ID.to_owned(),
    })
}

/// The node id for logs (`-` until a request names the node).
fn node_id(current: &mut String, node: Option<&Node>) {
    if let Some(node) = node
        && !node.id.is_empty()
    {
        node.id.clone_into(current);
    }
}

/// Whether an empty subscription means "everything" for this type (LDS and CDS).
fn wildcard_by_default(type_url: &str) -> bool {
    crate::xds::ResourceKind::from_type_url(type_url)
        .is_some_and(crate::xds::ResourceKind::is_wildcard)
}

/// FNV-1a, 64 bits: a version derived from content, stable across runs and Rust releases.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in *part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separate the parts so ("ab", "c") and ("a", "bc") differ.
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

// === impl AdsService ===

struct AdsService {
    ctx: StreamCtx,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, tonic::Status>>;
    type DeltaAggregatedResourcesStream =
        ReceiverStream<Result<DeltaDiscoveryResponse, tonic::Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamAggregatedResourcesStream>, tonic::Status> {
        let peer = request.remote_addr();
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        tokio::spawn(sotw::run(
            self.ctx.clone(),
            peer,
            None,
            request.into_inner(),
            tx,
        ));
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        let peer = request.remote_addr();
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        tokio::spawn(delta::run(
            self.ctx.clone(),
            peer,
            None,
            request.into_inner(),
            tx,
        ));
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

// === impl SdsService ===

/// The SecretDiscoveryService on the `--sds-socket`: the same streams as ADS, secrets only
/// by default.
struct SdsService {
    ctx: StreamCtx,
}

#[tonic::async_trait]
impl SecretDiscoveryService for SdsService {
    type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, tonic::Status>>;
    type DeltaSecretsStream = ReceiverStream<Result<DeltaDiscoveryResponse, tonic::Status>>;

    async fn stream_secrets(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamSecretsStream>, tonic::Status> {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let secret = Some(crate::xds::sds::SECRET_TYPE_URL);
        tokio::spawn(sotw::run(
            self.ctx.clone(),
            None,
            secret,
            request.into_inner(),
            tx,
        ));
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_secrets(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaSecretsStream>, tonic::Status> {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let secret = Some(crate::xds::sds::SECRET_TYPE_URL);
        tokio::spawn(delta::run(
            self.ctx.clone(),
            None,
            secret,
            request.into_inner(),
            tx,
        ));
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_secrets(
        &self,
        _request: tonic::Request<DiscoveryRequest>,
    ) -> Result<tonic::Response<DiscoveryResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "FetchSecrets (REST-style polling) is not served; use StreamSecrets",
        ))
    }
}

#[cfg(test)]
mod tests;
