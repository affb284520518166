//! ADS client: state of the world and delta, ACK/NACK, warming, last good config.
//!
//! # Layout
//! - [`kind`]: [`ResourceKind`], the five types skiff decodes (LDS, CDS, RDS, EDS, SDS), parsed
//!   from a type URL once.
//! - [`resources`]: what is accepted, warming and rejected per type URL, and the snapshot that
//!   follows (pure; both protocol flavours drive it); `resources/handler.rs` has one handler
//!   per resource type (decode, proto rules, model, dependencies) and the typed rejections.
//! - [`channel`]: the connection to a control plane: h2c, TLS verified as Envoy verifies an
//!   upstream (`trusted_ca`, SAN matchers, SNI), a Unix socket; the bearer token.
//! - [`node`]: the node pilot-agent would send to istiod (id and Istio metadata from flags and
//!   environment).
//! - [`sds`]: the SecretDiscoveryService client (Istio's SDS server on a Unix socket).
//! - this file: the stream loops ([`spawn`]), requests, ACK/NACK, reconnect with backoff.
//!
//! # Protocol (as Envoy)
//! - One ADS stream. CDS and LDS are wildcard subscriptions; RDS follows the route config names
//!   of the HTTP connection managers of known listeners; EDS follows the service names of known
//!   EDS clusters; SDS follows the secrets their TLS contexts take with `sds_config: {ads: {}}`.
//!   Subscriptions are re-sent whenever they change.
//! - Secrets of other SDS sources (`state::secrets`) and secret fetch timeouts republish the
//!   snapshot between responses, also while the stream is down.
//! - SotW ACK: `version_info` of the response + its nonce. NACK: the previous good
//!   `version_info`, the nonce, and `error_detail` {code 3 (INVALID_ARGUMENT), message listing
//!   `name: reason`}. Delta ACK/NACK: the nonce (+ `error_detail`).
//! - The node is sent on the first request of each stream.
//! - With a token file (`--xds-token`), each stream carries `authorization: Bearer <token>`,
//!   the file re-read at every reconnect (projected tokens rotate), and `clusterid` (the node's
//!   `CLUSTER_ID`), as pilot-agent sends them. A server's
//!   UNAUTHENTICATED is logged and counted (`skiff.xds.unauthenticated`) and retried with
//!   backoff, as any lost stream.
//! - A lost stream keeps the last good snapshot serving; the client reconnects with exponential
//!   backoff and jitter and re-sends its subscriptions (SotW: last accepted versions; delta:
//!   `initial_resource_versions`).

pub mod channel;
pub mod kind;
pub mod node;
pub mod resources;
pub mod sds;

use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status;
use skiff_proto::{ENDPOINT_TYPE_URL, ROUTE_TYPE_URL};

use kind::SECRET_TYPE_URL;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::{AdsApi, AdsConfig};
use crate::state::Store;
use crate::state::secrets::ExternalSecrets;
use crate::stats::Stats;

pub use kind::ResourceKind;
pub use resources::{
    Incoming, ProtoRule, RejectReason, Rejected, Resources, TYPE_URLS, nack_message,
};

/// gRPC `INVALID_ARGUMENT`, the code Envoy puts in a NACK's `error_detail`.
pub const NACK_CODE: i32 = 3;

/// Why one ADS stream ended.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    /// The server could not be reached, the TLS handshake failed, or the TLS settings or the
    /// token file could not be read.
    #[error(transparent)]
    Channel(#[from] channel::ChannelError),
    /// The stream failed or the server closed it with an error.
    #[error("ADS stream: {0}")]
    Stream(#[from] tonic::Status),
    /// The server closed the stream cleanly.
    #[error("ADS stream closed by the server")]
    Closed,
    /// Our own request channel closed (shutdown).
    #[error("ADS request channel closed")]
    RequestsClosed,
}

/// What the ADS client needs.
#[derive(Debug, Clone)]
pub struct XdsOptions {
    /// Server and protocol flavour.
    pub ads: AdsConfig,
    /// Node sent on the first request of each stream.
    pub node: Option<Node>,
    /// First reconnect delay.
    pub backoff_base: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Runs on every published snapshot; the update is ACKed once its future resolves (the
    /// kernel fast-path owner: once a generation containing the snapshot is in the maps); an
    /// `Err` turns the ACK into a NACK carrying its message.
    pub on_publish: Option<PublishHook>,
    /// Set to `true` once every type in `initial_types` has had its first response applied
    /// (accepted or rejected) and nothing is warming: Envoy's end of initialization, which
    /// `/ready` and the kernel's ready gate wait for.
    pub initialized: Option<tokio::sync::watch::Sender<bool>>,
    /// Types whose first response initialization waits for (LDS and CDS when they use ADS).
    pub initial_types: Vec<&'static str>,
    /// The secrets of other SDS sources (gRPC clusters, Istio's Unix socket), whose changes
    /// republish the snapshot, and the names the configuration takes from them, kept up to
    /// date after every update (`state::secrets`).
    pub external_secrets: Option<ExternalSecrets>,
}

/// A function run on each published snapshot before the ACK (see [`XdsOptions::on_publish`]).
#[derive(Clone)]
pub struct PublishHook(pub Arc<PublishFn>);

/// The function behind a [`PublishHook`]: its future resolves once the snapshot is mirrored
/// (the ACK waits for it); `Err` turns the ACK into a NACK.
pub type PublishFn = dyn Fn(
        std::sync::Arc<crate::state::Snapshot>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), PublishError>> + Send>>
    + Send
    + Sync;

/// Why a [`PublishHook`] did not mirror a snapshot (the kernel fast-path owner's
/// `bpf::ApplyError`, reached by downcasting [`PublishError::cause`]). Its text is the NACK's
/// `error_detail`. The client does not depend on what the hook mirrors to, so the cause is
/// boxed.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct PublishError(Box<dyn std::error::Error + Send + Sync>);

impl PublishError {
    /// Wraps the hook's own error.
    pub fn new(cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        PublishError(Box::new(cause))
    }

    /// The hook's own error.
    pub fn cause(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl std::fmt::Debug for PublishHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PublishHook")
    }
}

impl XdsOptions {
    /// Backoff from the bootstrap's `retry_back_off`, else 100 ms doubling up to 3 s; jittered.
    pub fn new(ads: AdsConfig, node: Option<Node>) -> Self {
        let (backoff_base, backoff_max) = ads
            .backoff
            .unwrap_or((Duration::from_millis(100), Duration::from_secs(3)));
        XdsOptions {
            ads,
            node,
            backoff_base,
            backoff_max,
            on_publish: None,
            initialized: None,
            initial_types: Vec::new(),
            external_secrets: None,
        }
    }
}

/// Start the ADS client; it publishes to `store` until `stop` is cancelled.
pub fn spawn(
    opts: XdsOptions,
    resources: Resources,
    store: Arc<Store>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(opts, resources, store, stats, stop).instrument(info_span!("xds")))
}

/// Shared by the stream loops of one client.
struct Client {
    opts: XdsOptions,
    resources: Resources,
    store: Arc<Store>,
    stats: Arc<Stats>,
    /// Types that have had a response applied since start (for `initialized`).
    responded: BTreeSet<String>,
}

async fn run(
    opts: XdsOptions,
    resources: Resources,
    store: Arc<Store>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let mut opts = opts;
    let mut resources = resources;
    if let Some(ext) = opts.external_secrets.as_mut() {
        resources.set_external_secrets(ext.secrets.borrow_and_update().clone());
        ext.want(resources.grpc_secret_names());
    }
    let mut c = Client {
        opts,
        resources,
        store,
        stats,
        responded: BTreeSet::new(),
    };
    let mut backoff = c.opts.backoff_base;
    let mut attempt: u64 = 0;
    loop {
        attempt += 1;
        let mut got_response = false;
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = c.stream(&mut got_response) => r,
        };
        c.stats.gauge("control_plane.connected_state").get(); // created even if never connected
        if got_response {
            backoff = c.opts.backoff_base;
        }
        let delay = jitter(backoff, attempt);
        match &result {
            Ok(()) | Err(XdsError::Closed) => {
                info!(
                    delay_ms = delay.as_millis() as u64,
                    "ADS stream closed; reconnecting"
                )
            }
            Err(XdsError::Stream(status)) if status.code() == tonic::Code::Unauthenticated => {
                c.stats.counter("skiff.xds.unauthenticated").inc();
                warn!(
                    error = %status.message(),
                    token_file = c.opts.ads.token.as_ref().map(|p| p.display().to_string()),
                    delay_ms = delay.as_millis() as u64,
                    "ADS server refused the stream: UNAUTHENTICATED (token missing, wrong or expired); retrying"
                )
            }
            Err(XdsError::Channel(e)) => {
                c.stats.counter("skiff.xds.connect_failure").inc();
                if e.is_tls_failure() {
                    c.stats.counter("skiff.xds.tls_failure").inc();
                }
                warn!(error = %e, delay_ms = delay.as_millis() as u64, "cannot connect to the ADS server; keeping last good config")
            }
            Err(e) => {
                warn!(error = %e, delay_ms = delay.as_millis() as u64, "ADS stream lost; keeping last good config")
            }
        }
        for p in ["listener_manager.lds", "cluster_manager.cds"] {
            c.stats.counter(&format!("{p}.update_failure")).inc();
        }
        // Secrets of other sources keep flowing while the ADS server is away.
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = &mut sleep => break,
                ev = c.side_event() => c.on_side_event(ev).await,
            }
        }
        backoff = (backoff * 2).min(c.opts.backoff_max);
    }
}

/// `d` scaled by a random factor in [0.5, 1.0] (decorrelates clients reconnecting together).
fn jitter(d: Duration, salt: u64) -> Duration {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(salt);
    let r = h.finish() % 1000;
    d.mul_f64(0.5 + r as f64 / 2000.0)
}

/// Something other than the ADS server that changes what to publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SideEvent {
    /// The secrets of other SDS sources changed.
    ExternalSecrets,
    /// A secret awaited over ADS may have reached its fetch timeout.
    SecretTimeout,
}

/// The stream's request with `headers` (the bearer token and cluster id, when there are).
fn with_headers<T>(requests: T, headers: MetadataMap) -> tonic::Request<T> {
    let mut req = tonic::Request::new(requests);
    *req.metadata_mut() = headers;
    req
}

/// What pilot-agent sends with each stream: `authorization: Bearer <token>` (read from
/// `token` now: projected tokens rotate) and, with a token, `clusterid` from the node's
/// `CLUSTER_ID` (istiod picks the cluster that validates the token by it).
fn stream_headers(
    token: Option<&std::path::Path>,
    node: Option<&Node>,
) -> Result<MetadataMap, channel::ChannelError> {
    let mut headers = MetadataMap::new();
    let Some(token) = token else {
        return Ok(headers);
    };
    headers.insert("authorization", channel::bearer(token)?);
    let cluster_id = node
        .and_then(|n| n.metadata.as_ref())
        .and_then(|m| m.fields.get("CLUSTER_ID"))
        .and_then(|v| match &v.kind {
            Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) => s.parse().ok(),
            _ => None,
        });
    if let Some(id) = cluster_id {
        headers.insert("clusterid", id);
    }
    Ok(headers)
}

/// Marks the connection up while alive.
struct Connected(Arc<crate::stats::Gauge>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Client {
    async fn stream(&mut self, got_response: &mut bool) -> Result<(), XdsError> {
        let server = self.opts.ads.server.clone();
        // Read before connecting: a missing token file is reported as such, not as a refusal.
        let headers = stream_headers(self.opts.ads.token.as_deref(), self.opts.node.as_ref())?;
        let channel = channel::connect(&server, self.opts.ads.tls.as_deref()).await?;
        let client = AggregatedDiscoveryServiceClient::new(channel);
        match self.opts.ads.api {
            AdsApi::Sotw => self.sotw(client, headers, got_response).await,
            AdsApi::Delta => self.delta(client, headers, got_response).await,
        }
    }

    fn connected(&self) -> Connected {
        let g = self.stats.gauge("control_plane.connected_state");
        g.inc();
        Connected(g)
    }

    /// Resolves (cancel-safe) when the secrets of other SDS sources change or a secret awaited
    /// over ADS reaches its fetch timeout.
    async fn side_event(&mut self) -> SideEvent {
        let deadline = self.resources.next_secret_deadline();
        let timeout = async move {
            match deadline {
                Some(d) => {
                    let left = d.duration_since(SystemTime::now()).unwrap_or_default();
                    tokio::time::sleep(left).await;
                }
                None => std::future::pending().await,
            }
        };
        let external = async {
            match self.opts.external_secrets.as_mut() {
                Some(ext) => {
                    if ext.secrets.changed().await.is_err() {
                        // The SDS clients are gone: their last secrets stay.
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = external => SideEvent::ExternalSecrets,
            () = timeout => SideEvent::SecretTimeout,
        }
    }

    /// Applies a [`SideEvent`] and republishes.
    async fn on_side_event(&mut self, ev: SideEvent) {
        match ev {
            SideEvent::ExternalSecrets => {
                if let Some(ext) = self.opts.external_secrets.as_mut() {
                    let secrets = ext.secrets.borrow_and_update().clone();
                    debug!(secrets = secrets.len(), "SDS secrets changed; republishing");
                    self.resources.set_external_secrets(secrets);
                }
            }
            SideEvent::SecretTimeout => {
                if !self.resources.poll_secret_waits(SystemTime::now()) {
                    return;
                }
            }
        }
        if let Some(err) = self.publish().await {
            warn!(error = %err, "snapshot published but not fully mirrored to the kernel");
        }
        self.check_initialized();
    }

    /// Notes that `type_url` had a response applied and signals `initialized` once every
    /// initial type has and no listener or cluster is warming.
    fn note_response(&mut self, type_url: &str) {
        self.responded.insert(type_url.to_owned());
        self.check_initialized();
    }

    /// Signals `initialized` once every initial type has had a response and no listener or
    /// cluster is warming.
    fn check_initialized(&mut self) {
        let Some(tx) = &self.opts.initialized else {
            return;
        };
        if *tx.borrow() {
            return;
        }
        let all = self
            .opts
            .initial_types
            .iter()
            .all(|t| self.responded.contains(*t));
        let (wl, wc) = self.resources.warming();
        if all && wl.is_empty() && wc.is_empty() {
            info!("initial configuration received");
            tx.send_replace(true);
        }
    }

    /// Publishes the snapshot, then runs the publish hook on it; returns the hook's error.
    async fn publish(&mut self) -> Option<PublishError> {
        self.resources.drop_unsubscribed();
        let snap = self.resources.snapshot();
        let (wl, wc) = self.resources.warming();
        debug!(
            listeners = snap.listeners.len(),
            clusters = snap.clusters.len(),
            warming_listeners = wl.len(),
            warming_clusters = wc.len(),
            "publishing snapshot"
        );
        self.store.publish(snap);
        if let Some(ext) = &self.opts.external_secrets {
            ext.want(self.resources.grpc_secret_names());
        }
        let hook = self.opts.on_publish.as_ref()?;
        (hook.0)(self.store.load()).await.err()
    }

    /// Adds a publish-hook failure to the ACK/NACK of the update that caused it.
    fn with_hook_error(
        &self,
        type_url: &str,
        nack: Option<Status>,
        hook: Option<PublishError>,
    ) -> Option<Status> {
        let Some(err) = hook else {
            return nack;
        };
        warn!(type_url, error = %err, outcome = "NACK", "update applied but not fully mirrored to the kernel");
        self.count_update(type_url, "update_rejected");
        Some(match nack {
            Some(mut s) => {
                s.message = format!("{}; {err}", s.message);
                s
            }
            None => Status {
                code: NACK_CODE,
                message: err.to_string(),
                details: vec![],
            },
        })
    }

    /// Count `stat` (`update_attempt`, ...) of a push of `type_url` under Envoy's names
    /// ([`resources::Resources::update_stat_prefixes`]).
    fn count_update(&self, type_url: &str, stat: &str) {
        let prefixes = match ResourceKind::from_type_url(type_url) {
            Some(kind) => self.resources.update_stat_prefixes(kind),
            None => vec!["skiff.xds.unknown".to_string()],
        };
        for p in prefixes {
            self.stats.counter(&format!("{p}.{stat}")).inc();
        }
    }

    /// Count and log one push; returns the NACK detail, if any.
    fn outcome(
        &self,
        type_url: &str,
        version: &str,
        nonce: &str,
        count: usize,
        result: Result<(), Vec<Rejected>>,
    ) -> Option<Status> {
        self.count_update(type_url, "update_attempt");
        let span = info_span!("xds_push", type_url, version, nonce, count);
        let _g = span.enter();
        match result {
            Ok(()) => {
                self.count_update(type_url, "update_success");
                info!(outcome = "ACK", "config accepted");
                None
            }
            Err(rejected) => {
                self.count_update(type_url, "update_rejected");
                let message = nack_message(type_url, &rejected);
                warn!(outcome = "NACK", error = %message, "config rejected");
                Some(Status {
                    code: NACK_CODE,
                    message,
                    details: vec![],
                })
            }
        }
    }

    // === state of the world ===

    async fn sotw(
        &mut self,
        mut client: AggregatedDiscoveryServiceClient<Channel>,
        headers: MetadataMap,
        got_response: &mut bool,
    ) -> Result<(), XdsError> {
        let (tx, rx) = mpsc::channel::<DiscoveryRequest>(64);
        let mut node = self.opts.node.clone();
        // Names last requested per type (None: wildcard), and the last nonce seen per type.
        let mut requested: HashMap<&'static str, Option<BTreeSet<String>>> = HashMap::new();
        let mut nonces: HashMap<String, String> = HashMap::new();
        for type_url in TYPE_URLS {
            let subs = self.resources.subscriptions(type_url);
            if subs.as_ref().is_some_and(|s| s.is_empty()) {
                continue;
            }
            let req = DiscoveryRequest {
                version_info: self.resources.version_info(type_url),
                node: node.take(),
                resource_names: subs.iter().flatten().cloned().collect(),
                type_url: type_url.to_string(),
                ..Default::default()
            };
            tx.send(req).await.map_err(|_| XdsError::RequestsClosed)?;
            requested.insert(type_url, subs);
        }
        let mut stream = client
            .stream_aggregated_resources(with_headers(ReceiverStream::new(rx), headers))
            .await?
            .into_inner();
        let _connected = self.connected();
        info!(server = %self.opts.ads.server, tls = self.opts.ads.tls.is_some(), token = self.opts.ads.token.is_some(), "ADS stream (state of the world) up");
        loop {
            let resp = tokio::select! {
                m = stream.message() => match m? {
                    Some(r) => r,
                    None => break,
                },
                ev = self.side_event() => {
                    self.on_side_event(ev).await;
                    continue;
                }
            };
            *got_response = true;
            let DiscoveryResponse {
                version_info,
                resources,
                type_url,
                nonce,
                ..
            } = resp;
            let result =
                self.resources
                    .apply_sotw(&type_url, &version_info, &resources, SystemTime::now());
            let nack = self.outcome(&type_url, &version_info, &nonce, resources.len(), result);
            // Publish (and mirror into the kernel) before answering: an ACK means applied.
            let hook = self.publish().await;
            self.note_response(&type_url);
            let nack = self.with_hook_error(&type_url, nack, hook);
            let ack_version = match &nack {
                None => version_info.clone(),
                Some(_) => self.resources.version_info(&type_url),
            };
            let names = self
                .resources
                .subscriptions(&type_url)
                .into_iter()
                .flatten()
                .collect();
            tx.send(DiscoveryRequest {
                version_info: ack_version,
                node: node.take(),
                resource_names: names,
                type_url: type_url.clone(),
                response_nonce: nonce.clone(),
                error_detail: nack,
                ..Default::default()
            })
            .await
            .map_err(|_| XdsError::RequestsClosed)?;
            nonces.insert(type_url.clone(), nonce);
            if let Some(t) = TYPE_URLS.iter().find(|t| **t == type_url) {
                requested.insert(t, self.resources.subscriptions(t));
            }
            // Follow the configuration: new or gone route/endpoint/secret names.
            for t in [ROUTE_TYPE_URL, ENDPOINT_TYPE_URL, SECRET_TYPE_URL] {
                let subs = self.resources.subscriptions(t);
                let before = requested.get(t).cloned().flatten().unwrap_or_default();
                let now = subs.clone().unwrap_or_default();
                if before == now {
                    continue;
                }
                tx.send(DiscoveryRequest {
                    version_info: self.resources.version_info(t),
                    node: node.take(),
                    resource_names: now.iter().cloned().collect(),
                    type_url: t.to_string(),
                    response_nonce: nonces.get(t).cloned().unwrap_or_default(),
                    ..Default::default()
                })
                .await
                .map_err(|_| XdsError::RequestsClosed)?;
                requested.insert(t, subs);
            }
        }
        Err(XdsError::Closed)
    }

    // === delta ===

    async fn delta(
        &mut self,
        mut client: AggregatedDiscoveryServiceClient<Channel>,
        headers: MetadataMap,
        got_response: &mut bool,
    ) -> Result<(), XdsError> {
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(64);
        let mut node = self.opts.node.clone();
        let mut requested: HashMap<&'static str, BTreeSet<String>> = HashMap::new();
        for type_url in TYPE_URLS {
            let subs = self.resources.subscriptions(type_url);
            if subs.as_ref().is_some_and(|s| s.is_empty()) {
                continue;
            }
            let names: BTreeSet<String> = subs.unwrap_or_default();
            let req = DeltaDiscoveryRequest {
                node: node.take(),
                type_url: type_url.to_string(),
                resource_names_subscribe: names.iter().cloned().collect(),
                initial_resource_versions: self
                    .resources
                    .resource_versions(type_url)
                    .into_iter()
                    .collect(),
                ..Default::default()
            };
            tx.send(req).await.map_err(|_| XdsError::RequestsClosed)?;
            requested.insert(type_url, names);
        }
        let mut stream = client
            .delta_aggregated_resources(with_headers(ReceiverStream::new(rx), headers))
            .await?
            .into_inner();
        let _connected = self.connected();
        info!(server = %self.opts.ads.server, tls = self.opts.ads.tls.is_some(), token = self.opts.ads.token.is_some(), "ADS stream (delta) up");
        loop {
            let resp = tokio::select! {
                m = stream.message() => match m? {
                    Some(r) => r,
                    None => break,
                },
                ev = self.side_event() => {
                    self.on_side_event(ev).await;
                    continue;
                }
            };
            *got_response = true;
            let DeltaDiscoveryResponse {
                system_version_info,
                resources,
                type_url,
                removed_resources,
                nonce,
                ..
            } = resp;
            let incoming: Vec<Incoming<'_>> = resources
                .iter()
                .filter_map(|r| {
                    r.resource.as_ref().map(|any| Incoming {
                        name: Some(r.name.as_str()),
                        version: r.version.as_str(),
                        resource: any,
                    })
                })
                .collect();
            let result = self.resources.apply_delta(
                &type_url,
                &system_version_info,
                &incoming,
                &removed_resources,
                SystemTime::now(),
            );
            let nack = self.outcome(
                &type_url,
                &system_version_info,
                &nonce,
                incoming.len() + removed_resources.len(),
                result,
            );
            let hook = self.publish().await;
            self.note_response(&type_url);
            let nack = self.with_hook_error(&type_url, nack, hook);
            tx.send(DeltaDiscoveryRequest {
                node: node.take(),
                type_url: type_url.clone(),
                response_nonce: nonce,
                error_detail: nack,
                ..Default::default()
            })
            .await
            .map_err(|_| XdsError::RequestsClosed)?;
            for t in [ROUTE_TYPE_URL, ENDPOINT_TYPE_URL, SECRET_TYPE_URL] {
                let now = self.resources.subscriptions(t).unwrap_or_default();
                let before = requested.get(t).cloned().unwrap_or_default();
                if before == now {
                    continue;
                }
                tx.send(DeltaDiscoveryRequest {
                    node: node.take(),
                    type_url: t.to_string(),
                    resource_names_subscribe: now.difference(&before).cloned().collect(),
                    resource_names_unsubscribe: before.difference(&now).cloned().collect(),
                    ..Default::default()
                })
                .await
                .map_err(|_| XdsError::RequestsClosed)?;
                requested.insert(t, now);
            }
        }
        Err(XdsError::Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

    #[test]
    fn a_token_brings_the_cluster_id_header() {
        assert!(stream_headers(None, None).unwrap().is_empty());
        let dir = std::env::temp_dir().join(format!("skiff-xds-headers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("istio-token");
        std::fs::write(&token, "jwt\n").unwrap();
        let node = Node {
            metadata: Some(Struct {
                fields: [(
                    "CLUSTER_ID".to_string(),
                    Value {
                        kind: Some(Kind::StringValue("Kubernetes".into())),
                    },
                )]
                .into(),
            }),
            ..Default::default()
        };
        let h = stream_headers(Some(&token), Some(&node)).unwrap();
        assert_eq!(h.get("authorization").unwrap(), "Bearer jwt");
        assert_eq!(h.get("clusterid").unwrap(), "Kubernetes");
        let h = stream_headers(Some(&token), None).unwrap();
        assert!(h.get("clusterid").is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
