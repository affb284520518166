//! SecretDiscoveryService client: secrets from an SDS server reached over a Unix socket
//! (Istio's `unix:./var/run/secrets/workload-spiffe-uds/socket`, names `default` and `ROOTCA`)
//! or TCP, published on a `watch` channel the snapshot side reads.
//!
//! # Protocol (as Envoy's SDS subscriptions)
//! - `StreamSecrets`, state of the world, type `…tls.v3.Secret`; the node on the first request
//!   of each stream; the names subscribed are those on the `names` channel, re-sent whenever it
//!   changes (no stream while it is empty).
//! - Each secret of a response is decoded and its PEM checked on its own: good ones replace
//!   their previous value, a bad one keeps its previous value and the response is NACKed
//!   (`error_detail` lists `name: reason`, version_info stays the last accepted one). Stats:
//!   `sds.<name>.update_success` / `sds.<name>.update_rejected`, as Envoy.
//! - The published map holds the subscribed names only; a lost stream keeps it serving, and the
//!   client reconnects with backoff and jitter, asking again with its last accepted version.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tlspb;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status;
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::channel::{self, ChannelError, GrpcTarget};
pub use crate::model::tls::SECRET_TYPE_URL;
use crate::model::tls::{Secret, Secrets};
use crate::stats::Stats;

/// First and longest reconnect delays.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(3));

/// Why one SDS stream ended.
#[derive(Debug, thiserror::Error)]
enum SdsError {
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("SDS stream: {0}")]
    Stream(#[from] tonic::Status),
    #[error("SDS stream closed by the server")]
    Closed,
    #[error("SDS request channel closed")]
    RequestsClosed,
    /// `names` has no sender any more: nothing will ever be asked again.
    #[error("names channel closed")]
    NamesGone,
}

/// Starts the SDS client; its counters go to a registry of its own (use
/// [`spawn_with_stats`] to list them in `/stats`).
pub fn spawn(
    target: GrpcTarget,
    node: Option<Node>,
    names: watch::Receiver<BTreeSet<String>>,
    secrets: watch::Sender<Secrets>,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    spawn_with_stats(
        target,
        node,
        names,
        secrets,
        Arc::new(Stats::default()),
        cancel,
    )
}

/// [`spawn`], counting `sds.<name>.update_success/update_rejected` in `stats`.
pub fn spawn_with_stats(
    target: GrpcTarget,
    node: Option<Node>,
    names: watch::Receiver<BTreeSet<String>>,
    secrets: watch::Sender<Secrets>,
    stats: Arc<Stats>,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    let span = info_span!("sds", server = %target);
    let client = Client {
        target,
        node,
        names,
        secrets,
        stats,
        version: String::new(),
        current: Secrets::new(),
    };
    tokio::spawn(client.run(cancel).instrument(span))
}

struct Client {
    target: GrpcTarget,
    node: Option<Node>,
    names: watch::Receiver<BTreeSet<String>>,
    secrets: watch::Sender<Secrets>,
    stats: Arc<Stats>,
    /// Last accepted version_info.
    version: String,
    /// Last good secret per subscribed name.
    current: Secrets,
}

impl Client {
    async fn run(mut self, cancel: CancellationToken) {
        let mut backoff = BACKOFF.0;
        let mut attempt = 0u64;
        loop {
            // No names, no stream (as Envoy: SDS is subscribed by the resources using it).
            while self.names.borrow_and_update().is_empty() {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    r = self.names.changed() => if r.is_err() { return },
                }
            }
            attempt += 1;
            let mut got_response = false;
            let result = tokio::select! {
                () = cancel.cancelled() => return,
                r = self.stream(&mut got_response) => r,
            };
            if got_response {
                backoff = BACKOFF.0;
            }
            let delay = super::jitter(backoff, attempt);
            match result {
                Err(SdsError::NamesGone) => return,
                // No names left: the stream was ended on purpose; wait for new names.
                Ok(()) => continue,
                Err(SdsError::Closed) => {
                    info!(
                        delay_ms = delay.as_millis() as u64,
                        "SDS stream closed; reconnecting"
                    )
                }
                Err(e) => {
                    self.stats.counter("skiff.sds.connect_failure").inc();
                    warn!(error = %e, delay_ms = delay.as_millis() as u64, "SDS stream lost; keeping the last good secrets")
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            backoff = (backoff * 2).min(BACKOFF.1);
        }
    }

    async fn stream(&mut self, got_response: &mut bool) -> Result<(), SdsError> {
        let channel = channel::connect(&self.target.clone(), None).await?;
        let mut client = SecretDiscoveryServiceClient::new(channel);
        let (tx, rx) = mpsc::channel::<DiscoveryRequest>(8);
        let mut names = self.names.borrow_and_update().clone();
        let mut node = self.node.clone();
        tx.send(DiscoveryRequest {
            version_info: self.version.clone(),
            node: node.take(),
            resource_names: names.iter().cloned().collect(),
            type_url: SECRET_TYPE_URL.into(),
            ..Default::default()
        })
        .await
        .map_err(|_| SdsError::RequestsClosed)?;
        let mut stream = client
            .stream_secrets(ReceiverStream::new(rx))
            .await?
            .into_inner();
        info!(names = ?names, "SDS stream up");
        let mut nonce = String::new();
        loop {
            tokio::select! {
                msg = stream.message() => {
                    let Some(resp) = msg? else { return Err(SdsError::Closed) };
                    *got_response = true;
                    nonce = resp.nonce.clone();
                    let nack = self.apply(&resp.version_info, &resp.nonce, &resp.resources, &names);
                    if nack.is_none() {
                        self.version = resp.version_info.clone();
                    }
                    tx.send(DiscoveryRequest {
                        version_info: self.version.clone(),
                        node: node.take(),
                        resource_names: names.iter().cloned().collect(),
                        type_url: SECRET_TYPE_URL.into(),
                        response_nonce: resp.nonce,
                        error_detail: nack,
                        ..Default::default()
                    })
                    .await
                    .map_err(|_| SdsError::RequestsClosed)?;
                }
                changed = self.names.changed() => {
                    if changed.is_err() {
                        return Err(SdsError::NamesGone);
                    }
                    let now = self.names.borrow_and_update().clone();
                    if now == names {
                        continue;
                    }
                    names = now;
                    self.publish(&names);
                    if names.is_empty() {
                        // Nothing to ask for: end the stream; `run` waits for names.
                        return Ok(());
                    }
                    debug!(names = ?names, "SDS subscription changed");
                    tx.send(DiscoveryRequest {
                        version_info: self.version.clone(),
                        node: node.take(),
                        resource_names: names.iter().cloned().collect(),
                        type_url: SECRET_TYPE_URL.into(),
                        response_nonce: nonce.clone(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|_| SdsError::RequestsClosed)?;
                }
            }
        }
    }

    /// Applies one response; returns the NACK detail when a secret was rejected.
    fn apply(
        &mut self,
        version: &str,
        nonce: &str,
        resources: &[Any],
        names: &BTreeSet<String>,
    ) -> Option<Status> {
        let mut rejected = Vec::new();
        for (i, any) in resources.iter().enumerate() {
            match decode(any) {
                Ok(secret) => {
                    let name = secret.name.clone();
                    if !names.contains(&name) {
                        debug!(name, "secret not subscribed; ignored");
                        continue;
                    }
                    self.stats
                        .counter(&format!("sds.{name}.update_success"))
                        .inc();
                    self.current.insert(name, Arc::new(secret));
                }
                Err((name, reason)) => {
                    let name = name.unwrap_or_else(|| format!("resources[{i}]"));
                    self.stats
                        .counter(&format!("sds.{name}.update_rejected"))
                        .inc();
                    rejected.push(format!("{name}: {reason}"));
                }
            }
        }
        self.publish(names);
        if rejected.is_empty() {
            info!(
                version,
                nonce,
                count = resources.len(),
                outcome = "ACK",
                "secrets accepted"
            );
            return None;
        }
        let message = format!("{SECRET_TYPE_URL}: {}", rejected.join("; "));
        warn!(version, nonce, outcome = "NACK", error = %message, "secret rejected; keeping its last good value");
        Some(Status {
            code: super::NACK_CODE,
            message,
            details: vec![],
        })
    }

    /// Publishes the good secrets of the subscribed names, if they changed.
    fn publish(&mut self, names: &BTreeSet<String>) {
        self.current.retain(|n, _| names.contains(n));
        let current = &self.current;
        self.secrets.send_if_modified(|s| {
            if s == current {
                return false;
            }
            s.clone_from(current);
            true
        });
    }
}

/// One `Any` -> a validated secret, or its name (when readable) and why not.
fn decode(any: &Any) -> Result<Secret, (Option<String>, String)> {
    if any.type_url != SECRET_TYPE_URL {
        return Err((None, format!("type {:?} is not a Secret", any.type_url)));
    }
    let pb = tlspb::Secret::decode(any.value.as_slice())
        .map_err(|e| (None, format!("does not decode: {e}")))?;
    let name = pb.name.clone();
    // The model's conversion also checks that inline PEM holds what its field promises, so a
    // broken push is NACKed here rather than failing handshakes later.
    Secret::try_from(&pb).map_err(|e| (Some(name), format!("{}: {}", e.field, e.reason)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(secret: &tlspb::Secret) -> Any {
        Any {
            type_url: SECRET_TYPE_URL.into(),
            value: secret.encode_to_vec(),
        }
    }

    fn inline(b: &str) -> Option<envoy_types::pb::envoy::config::core::v3::DataSource> {
        Some(envoy_types::pb::envoy::config::core::v3::DataSource {
            specifier: Some(
                envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineBytes(
                    b.as_bytes().to_vec(),
                ),
            ),
            ..Default::default()
        })
    }

    #[test]
    fn targets_parse_like_istio_writes_them() {
        assert_eq!(
            GrpcTarget::parse("unix:./var/run/secrets/workload-spiffe-uds/socket").unwrap(),
            GrpcTarget::Unix("./var/run/secrets/workload-spiffe-uds/socket".into())
        );
        assert_eq!(
            GrpcTarget::parse("unix:///tmp/s").unwrap(),
            GrpcTarget::Unix("/tmp/s".into())
        );
        assert_eq!(
            GrpcTarget::parse("127.0.0.1:15012").unwrap(),
            GrpcTarget::Tcp("127.0.0.1:15012".parse().unwrap())
        );
        assert!(GrpcTarget::parse("istiod:15012").is_err());
    }

    #[test]
    fn bad_pem_is_rejected_by_name() {
        let secret = tlspb::Secret {
            name: "default".into(),
            r#type: Some(tlspb::secret::Type::TlsCertificate(tlspb::TlsCertificate {
                certificate_chain: inline("not pem"),
                private_key: inline("not pem either"),
                ..Default::default()
            })),
        };
        let (name, reason) = decode(&any(&secret)).unwrap_err();
        assert_eq!(name.as_deref(), Some("default"));
        assert!(reason.contains("certificate_chain"), "{reason}");
        let root = tlspb::Secret {
            name: "ROOTCA".into(),
            r#type: None,
        };
        let (name, reason) = decode(&any(&root)).unwrap_err();
        assert_eq!(name.as_deref(), Some("ROOTCA"));
        assert!(reason.contains("no secret type"), "{reason}");
    }

    #[test]
    fn rejection_keeps_the_last_good_secret_and_nacks_by_name() {
        let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).unwrap();
        let good = tlspb::Secret {
            name: "ROOTCA".into(),
            r#type: Some(tlspb::secret::Type::ValidationContext(
                tlspb::CertificateValidationContext {
                    trusted_ca: inline(&ca.cert.pem()),
                    ..Default::default()
                },
            )),
        };
        let bad = tlspb::Secret {
            name: "ROOTCA".into(),
            r#type: Some(tlspb::secret::Type::ValidationContext(
                tlspb::CertificateValidationContext {
                    trusted_ca: inline("garbage"),
                    ..Default::default()
                },
            )),
        };
        let (tx, rx) = watch::channel(Secrets::new());
        let (_ntx, names) = watch::channel(BTreeSet::from(["ROOTCA".to_string()]));
        let stats = Arc::new(Stats::default());
        let mut c = Client {
            target: GrpcTarget::Unix("/nonexistent".into()),
            node: None,
            names,
            secrets: tx,
            stats: stats.clone(),
            version: String::new(),
            current: Secrets::new(),
        };
        let subscribed = BTreeSet::from(["ROOTCA".to_string()]);
        assert!(c.apply("1", "n1", &[any(&good)], &subscribed).is_none());
        let first = rx.borrow()["ROOTCA"].clone();
        let nack = c.apply("2", "n2", &[any(&bad)], &subscribed).unwrap();
        assert!(
            nack.message
                .contains("ROOTCA: validation_context.trusted_ca"),
            "{}",
            nack.message
        );
        assert_eq!(
            rx.borrow()["ROOTCA"],
            first,
            "the last good secret keeps serving"
        );
        assert_eq!(stats.counter("sds.ROOTCA.update_success").get(), 1);
        assert_eq!(stats.counter("sds.ROOTCA.update_rejected").get(), 1);
        // Unsubscribed names leave the published map.
        c.apply("3", "n3", &[], &BTreeSet::new());
        assert!(rx.borrow().is_empty());
    }
}
