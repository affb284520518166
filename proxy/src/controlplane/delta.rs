//! One incremental (delta) ADS stream.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::source::Snapshot;
use super::{Gone, StreamCtx, StreamProtocol, control_plane, drive, node_id, wildcard_by_default};

type Tx = mpsc::Sender<Result<DeltaDiscoveryResponse, tonic::Status>>;

/// One type URL on this stream.
#[derive(Default)]
struct TypeState {
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the client holds: name -> per-resource version (sent by us, or claimed in
    /// `initial_resource_versions`).
    client_has: BTreeMap<String, String>,
    /// Nonce and system version of the last response.
    last: Option<(String, String)>,
}

impl TypeState {
    fn interested(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

/// This protocol's stream.
type Stream = super::Stream<TypeState, DeltaDiscoveryResponse>;

/// Serves one delta stream until the client goes away or the server stops.
pub(super) async fn run(
    ctx: StreamCtx,
    peer: Option<SocketAddr>,
    default_type: Option<&'static str>,
    requests: tonic::Streaming<DeltaDiscoveryRequest>,
    tx: Tx,
) {
    drive(Stream::new(ctx, peer, default_type, tx), requests).await;
}

impl StreamProtocol for Stream {
    type Request = DeltaDiscoveryRequest;
    const NAME: &'static str = "delta";

    async fn on_request(
        &mut self,
        request: DeltaDiscoveryRequest,
        snapshot: &Arc<Snapshot>,
    ) -> Result<(), Gone> {
        node_id(&mut self.node, request.node.as_ref());
        let Some(type_url) = self.type_url(request.type_url) else {
            warn!(
                node = self.node,
                "delta request without a type_url; ignored"
            );
            return Ok(());
        };
        let first = !self.types.contains_key(&type_url);
        let state = self.types.entry(type_url.clone()).or_default();
        if first {
            state.wildcard =
                wildcard_by_default(&type_url) && request.resource_names_subscribe.is_empty();
            state.client_has = request.initial_resource_versions.into_iter().collect();
        }
        if !request.response_nonce.is_empty() {
            match &state.last {
                Some((nonce, version)) if *nonce == request.response_nonce => {
                    match &request.error_detail {
                        Some(status) => warn!(
                            node = self.node,
                            type_url,
                            version,
                            nonce,
                            error = status.message,
                            "NACK"
                        ),
                        None => info!(node = self.node, type_url, version, nonce, "ACK"),
                    }
                }
                // Delta subscriptions are incremental: a stale nonce still carries changes.
                _ => debug!(
                    node = self.node,
                    type_url,
                    nonce = request.response_nonce,
                    "stale nonce"
                ),
            }
        }
        // Newly subscribed names the client does not hold: if they do not exist, say so.
        let mut asked = Vec::new();
        for name in request.resource_names_subscribe {
            if name == "*" {
                state.wildcard = true;
            } else if state.names.insert(name.clone()) && !state.client_has.contains_key(&name) {
                asked.push(name);
            }
        }
        for name in request.resource_names_unsubscribe {
            if name == "*" {
                state.wildcard = false;
            } else {
                state.names.remove(&name);
            }
        }
        // The client forgets what it is no longer subscribed to.
        let keep: BTreeSet<String> = state
            .client_has
            .keys()
            .filter(|n| state.interested(n))
            .cloned()
            .collect();
        state.client_has.retain(|n, _| keep.contains(n));
        self.maybe_send(&type_url, snapshot, first, &asked).await
    }

    async fn on_snapshot(&mut self, snapshot: &Arc<Snapshot>) -> Result<(), Gone> {
        let types: Vec<String> = self.types.keys().cloned().collect();
        for type_url in types {
            self.maybe_send(&type_url, snapshot, false, &[]).await?;
        }
        Ok(())
    }
}

impl Stream {
    /// Sends what the client lacks or holds at another version, and what it holds that is
    /// gone; `always` sends even an empty response.
    async fn maybe_send(
        &mut self,
        type_url: &str,
        snapshot: &Snapshot,
        always: bool,
        asked: &[String],
    ) -> Result<(), Gone> {
        let Some(state) = self.types.get_mut(type_url) else {
            return Ok(());
        };
        let served = snapshot.types.get(type_url);
        let mut resources = Vec::new();
        if let Some(t) = served {
            for (name, r) in &t.resources {
                if state.interested(name) && state.client_has.get(name) != Some(&r.version) {
                    resources.push(Resource {
                        name: name.clone(),
                        version: r.version.clone(),
                        resource: Some(r.any.clone()),
                        ..Default::default()
                    });
                }
            }
        }
        let exists = |name: &str| served.is_some_and(|t| t.resources.contains_key(name));
        let mut removed: Vec<String> = state
            .client_has
            .keys()
            .filter(|n| !exists(n))
            .cloned()
            .collect();
        removed.extend(asked.iter().filter(|n| !exists(n)).cloned());
        if resources.is_empty() && removed.is_empty() && !always {
            return Ok(());
        }
        for r in &resources {
            state.client_has.insert(r.name.clone(), r.version.clone());
        }
        for name in &removed {
            state.client_has.remove(name);
        }
        let version = served.map(|t| t.version.clone()).unwrap_or_default();
        let nonce = self.ctx.next_nonce();
        info!(
            node = self.node,
            type_url,
            version,
            nonce,
            count = resources.len(),
            removed = removed.len(),
            "sending delta"
        );
        state.last = Some((nonce.clone(), version.clone()));
        let response = DeltaDiscoveryResponse {
            system_version_info: version,
            resources,
            type_url: type_url.to_owned(),
            removed_resources: removed,
            nonce,
            control_plane: control_plane(),
            ..Default::default()
        };
        self.tx.send(Ok(response)).await.map_err(|_| Gone)
    }
}
