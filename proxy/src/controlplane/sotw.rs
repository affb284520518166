//! One state-of-the-world ADS stream.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::source::Snapshot;
use super::{
    Gone, StreamCtx, StreamProtocol, control_plane, drive, fnv1a, node_id, wildcard_by_default,
};

type Tx = mpsc::Sender<Result<DiscoveryResponse, tonic::Status>>;

/// Which resources of a type the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Subscription {
    All,
    Names(BTreeSet<String>),
}

impl Subscription {
    fn from_request(type_url: &str, names: &[String]) -> Self {
        if names.iter().any(|n| n == "*") || (names.is_empty() && wildcard_by_default(type_url)) {
            Subscription::All
        } else {
            Subscription::Names(names.iter().cloned().collect())
        }
    }
}

/// What a response carried, to tell whether the next one would differ.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Content {
    version: String,
    /// Hash of the served resources' names and bytes.
    fingerprint: u64,
    subscription: Subscription,
}

/// The last response of one type on this stream.
struct Sent {
    nonce: String,
    content: Content,
}

struct TypeState {
    subscription: Subscription,
    last: Option<Sent>,
}

/// This protocol's stream.
type Stream = super::Stream<TypeState, DiscoveryResponse>;

/// Serves one SotW stream until the client goes away or the server stops.
pub(super) async fn run(
    ctx: StreamCtx,
    peer: Option<SocketAddr>,
    default_type: Option<&'static str>,
    requests: tonic::Streaming<DiscoveryRequest>,
    tx: Tx,
) {
    drive(Stream::new(ctx, peer, default_type, tx), requests).await;
}

impl StreamProtocol for Stream {
    type Request = DiscoveryRequest;
    const NAME: &'static str = "state of the world";

    async fn on_request(
        &mut self,
        request: DiscoveryRequest,
        snapshot: &Arc<Snapshot>,
    ) -> Result<(), Gone> {
        node_id(&mut self.node, request.node.as_ref());
        let Some(type_url) = self.type_url(request.type_url) else {
            warn!(
                node = self.node,
                "request without a type_url on an ADS stream; ignored"
            );
            return Ok(());
        };
        let subscription = Subscription::from_request(&type_url, &request.resource_names);
        let state = self
            .types
            .entry(type_url.clone())
            .or_insert_with(|| TypeState {
                subscription: subscription.clone(),
                last: None,
            });
        // A nonce on the first request of a type (one from an earlier stream) is not stale:
        // the request is a new subscription.
        if let Some(sent) = state.last.as_ref()
            && !request.response_nonce.is_empty()
        {
            if sent.nonce != request.response_nonce {
                debug!(
                    node = self.node,
                    type_url,
                    nonce = request.response_nonce,
                    "stale nonce; request ignored"
                );
                return Ok(());
            }
            match &request.error_detail {
                Some(status) => warn!(
                    node = self.node,
                    type_url,
                    version = sent.content.version,
                    accepted_version = request.version_info,
                    nonce = request.response_nonce,
                    error = status.message,
                    "NACK"
                ),
                None => info!(
                    node = self.node,
                    type_url,
                    version = request.version_info,
                    nonce = request.response_nonce,
                    "ACK"
                ),
            }
        }
        state.subscription = subscription;
        self.maybe_send(&type_url, snapshot).await
    }

    async fn on_snapshot(&mut self, snapshot: &Arc<Snapshot>) -> Result<(), Gone> {
        let types: Vec<String> = self.types.keys().cloned().collect();
        for type_url in types {
            self.maybe_send(&type_url, snapshot).await?;
        }
        Ok(())
    }
}

impl Stream {
    /// Sends the current content of `type_url` unless the client's last response had the same.
    async fn maybe_send(&mut self, type_url: &str, snapshot: &Snapshot) -> Result<(), Gone> {
        let Some(state) = self.types.get_mut(type_url) else {
            return Ok(());
        };
        let served = snapshot.types.get(type_url);
        let resources: Vec<(&String, _)> = match (&state.subscription, served) {
            (_, None) => Vec::new(),
            (Subscription::All, Some(t)) => t.resources.iter().collect(),
            (Subscription::Names(names), Some(t)) => names
                .iter()
                .filter_map(|n| t.resources.get_key_value(n))
                .collect(),
        };
        let mut parts: Vec<&[u8]> = Vec::with_capacity(resources.len() * 2);
        for (name, r) in &resources {
            parts.push(name.as_bytes());
            parts.push(&r.any.value);
        }
        let content = Content {
            version: served.map(|t| t.version.clone()).unwrap_or_default(),
            fingerprint: fnv1a(&parts),
            subscription: state.subscription.clone(),
        };
        if state.last.as_ref().is_some_and(|s| s.content == content) {
            return Ok(());
        }
        let nonce = self.ctx.next_nonce();
        let response = DiscoveryResponse {
            version_info: content.version.clone(),
            resources: resources.iter().map(|(_, r)| r.any.clone()).collect(),
            type_url: type_url.to_owned(),
            nonce: nonce.clone(),
            control_plane: control_plane(),
            ..Default::default()
        };
        info!(
            node = self.node,
            type_url,
            version = content.version,
            nonce,
            count = response.resources.len(),
            "sending"
        );
        state.last = Some(Sent { nonce, content });
        self.tx.send(Ok(response)).await.map_err(|_| Gone)
    }
}
