//! The seam between skiff's configuration task and the SDS clients of sources other than ADS
//! (gRPC clusters such as Istio's `sds-grpc` Unix socket, `xds::sds`).
//!
//! The configuration task tells the clients which secret names the accepted configuration
//! takes from them (a `watch` of names), and the clients hand back every secret they hold (a
//! `watch` of [`Secrets`]); each change of the latter republishes the snapshot, so a rotated
//! certificate reaches new connections while established ones keep their session. With ADS,
//! the ADS client does both (`XdsOptions::external_secrets`); without ADS,
//! [`spawn_static_republisher`] does.
//!
//! Wiring, one gRPC SDS source (Istio has one: `sds-grpc` on the workload's Unix socket):
//! `let (seam, ends) = ExternalSecrets::channel();` then the client on the cluster's
//! `config::GrpcTarget` (`bootstrap.grpc_targets["sds-grpc"]`) takes `ends.names` and
//! `ends.secrets`, and `seam` goes to `XdsOptions::external_secrets` (with ADS) or to
//! [`spawn_static_republisher`] (without). The names are those of every gRPC SDS cluster
//! together: one client serves them all.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{Snapshot, Store};
use crate::config::Bootstrap;
use crate::model::tls::{SdsSource, Secrets};
use crate::model::{Cluster, Listener};

/// The configuration task's ends of the two channels.
#[derive(Debug, Clone)]
pub struct ExternalSecrets {
    /// Every secret the SDS clients hold, by name; a change republishes the snapshot.
    pub secrets: watch::Receiver<Secrets>,
    /// The names the configuration takes from gRPC SDS sources: what the clients ask for.
    pub names: watch::Sender<BTreeSet<String>>,
}

/// The SDS clients' ends: the names to ask for, and where to put what they hold.
#[derive(Debug)]
pub struct SdsClientEnds {
    /// Names to subscribe to (changes as clusters and listeners come and go).
    pub names: watch::Receiver<BTreeSet<String>>,
    /// Every secret held, replaced whole on each change.
    pub secrets: watch::Sender<Secrets>,
}

impl ExternalSecrets {
    /// Both ends, starting with no names and no secrets.
    pub fn channel() -> (ExternalSecrets, SdsClientEnds) {
        let (names_tx, names_rx) = watch::channel(BTreeSet::new());
        let (secrets_tx, secrets_rx) = watch::channel(Secrets::new());
        (
            ExternalSecrets {
                secrets: secrets_rx,
                names: names_tx,
            },
            SdsClientEnds {
                names: names_rx,
                secrets: secrets_tx,
            },
        )
    }

    /// Tells the clients the names to ask for, waking them only when the set changed.
    pub fn want(&self, names: BTreeSet<String>) {
        self.names.send_if_modified(|cur| {
            if *cur == names {
                return false;
            }
            *cur = names;
            true
        });
    }
}

/// Names of the secrets `listeners` and `clusters` take from gRPC SDS clusters.
pub fn grpc_secret_names<'a>(
    listeners: impl IntoIterator<Item = &'a Listener>,
    clusters: impl IntoIterator<Item = &'a Cluster>,
) -> BTreeSet<String> {
    let grpc = |s: &SdsSource| matches!(s, SdsSource::Grpc { .. });
    let from_listeners = listeners
        .into_iter()
        .flat_map(|l| l.sds_refs().filter(|r| grpc(&r.source)));
    let from_clusters = clusters
        .into_iter()
        .flat_map(|c| c.transport.sds_refs().filter(|r| grpc(&r.source)));
    from_listeners
        .chain(from_clusters)
        .map(|r| r.name.clone())
        .collect()
}

/// The snapshot of a bootstrap without ADS: its static resources and secrets, then those of
/// the SDS clients (a later source wins a name, as with ADS).
pub fn static_snapshot(bootstrap: &Bootstrap, external: &Secrets) -> Snapshot {
    let mut snap = Snapshot::new(
        bootstrap.listeners.clone(),
        bootstrap.clusters.clone(),
        &Default::default(),
    );
    snap.secrets = bootstrap.secrets.clone();
    snap.secrets
        .extend(external.iter().map(|(n, s)| (n.clone(), s.clone())));
    snap
}

/// Without ADS: asks the SDS clients for the bootstrap's gRPC secret names once, then
/// republishes the static snapshot with their secrets on every change, until `stop`.
pub fn spawn_static_republisher(
    bootstrap: Arc<Bootstrap>,
    store: Arc<Store>,
    mut external: ExternalSecrets,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    external.want(grpc_secret_names(&bootstrap.listeners, &bootstrap.clusters));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = external.secrets.changed() => if r.is_err() { return },
            }
            let secrets = external.secrets.borrow_and_update().clone();
            debug!(secrets = secrets.len(), "SDS secrets changed; republishing");
            store.publish(static_snapshot(&bootstrap, &secrets));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tls::{DataSource, Secret, SecretKind, TlsCertificate};

    fn secret(name: &str, key: &str) -> Arc<Secret> {
        Arc::new(Secret {
            name: name.into(),
            kind: SecretKind::Certificate(TlsCertificate {
                certificate_chain: DataSource::File("/c.pem".into()),
                private_key: DataSource::Inline(key.as_bytes().into()),
            }),
        })
    }

    const BOOTSTRAP: &str = r#"
static_resources:
  clusters:
  - name: sds-grpc
    type: STATIC
    load_assignment:
      cluster_name: sds-grpc
      endpoints: [{ lb_endpoints: [{ endpoint: { address: { pipe: { path: /run/sds.sock } } } }] }]
  - name: up
    type: STATIC
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          tls_certificate_sds_secret_configs:
          - name: default
            sds_config: { api_config_source: { api_type: GRPC, grpc_services: [{ envoy_grpc: { cluster_name: sds-grpc } }] } }
          validation_context_sds_secret_config:
            name: ROOTCA
            sds_config: { api_config_source: { api_type: GRPC, grpc_services: [{ envoy_grpc: { cluster_name: sds-grpc } }] } }
    load_assignment:
      cluster_name: up
      endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 8443 } } } }] }]
"#;

    /// Without ADS, secrets fed by the SDS clients reach the store on every change, and the
    /// clients are told which names the bootstrap takes from them.
    #[tokio::test]
    async fn fed_secrets_republish_the_static_snapshot() {
        let bootstrap = Arc::new(crate::config::parse(BOOTSTRAP, "<test>").unwrap());
        assert_eq!(
            bootstrap.grpc_targets.get("sds-grpc"),
            Some(&crate::config::GrpcTarget::Unix("/run/sds.sock".into()))
        );
        let store = Store::for_bootstrap(&bootstrap, Default::default());
        let (seam, mut ends) = ExternalSecrets::channel();
        let stop = CancellationToken::new();
        let task = spawn_static_republisher(bootstrap, store.clone(), seam, stop.clone());
        assert_eq!(
            ends.names.borrow_and_update().iter().collect::<Vec<_>>(),
            ["ROOTCA", "default"]
        );
        let mut published = store.subscribe();
        ends.secrets
            .send([("default".to_string(), secret("default", "k1"))].into())
            .unwrap();
        published.changed().await.unwrap();
        let snap = store.load();
        assert_eq!(snap.secrets["default"], secret("default", "k1"));
        assert!(snap.cluster("up").is_some());
        // Rotation: the next change replaces it.
        ends.secrets
            .send([("default".to_string(), secret("default", "k2"))].into())
            .unwrap();
        published.changed().await.unwrap();
        assert_eq!(store.load().secrets["default"], secret("default", "k2"));
        stop.cancel();
        task.await.unwrap();
    }

    /// A directory removed on drop.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!("skiff-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Waits (10 s at most) until the store's snapshot satisfies `ok`.
    async fn until(store: &Store, what: &str, ok: impl Fn(&Snapshot) -> bool) {
        let mut changed = store.subscribe();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while !ok(&store.load()) {
            tokio::time::timeout_at(deadline, changed.changed())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .unwrap();
        }
    }

    fn ads_options(server: std::net::SocketAddr) -> crate::xds::XdsOptions {
        let ads = crate::config::AdsConfig {
            api: crate::config::AdsApi::Sotw,
            cluster: "xds".into(),
            server: crate::config::GrpcTarget::Tcp(server),
            tls: None,
            token: None,
            backoff: Some((
                std::time::Duration::from_millis(50),
                std::time::Duration::from_millis(200),
            )),
        };
        crate::xds::XdsOptions::new(ads, None)
    }

    /// With ADS, the client republishes on every change of the fed secrets: while its server
    /// is unreachable (between reconnects) and while its stream is up; the names it asks the
    /// SDS clients for follow the clusters it accepts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fed_secrets_republish_through_the_ads_client() {
        let bootstrap = crate::config::parse(BOOTSTRAP, "<test>").unwrap();
        // 1. The ADS server is down: a port nobody listens on.
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (seam, mut ends) = ExternalSecrets::channel();
        let mut opts = ads_options(dead);
        opts.external_secrets = Some(seam);
        let store = Store::for_bootstrap(&bootstrap, Default::default());
        let stats = Arc::new(crate::stats::Stats::default());
        let stop = CancellationToken::new();
        let task = crate::xds::spawn(
            opts,
            crate::xds::Resources::for_bootstrap(&bootstrap),
            store.clone(),
            stats.clone(),
            stop.clone(),
        );
        ends.names.changed().await.unwrap();
        assert_eq!(
            ends.names.borrow_and_update().iter().collect::<Vec<_>>(),
            ["ROOTCA", "default"]
        );
        ends.secrets
            .send([("default".to_string(), secret("default", "k1"))].into())
            .unwrap();
        until(&store, "the fed secret with ADS down", |s| {
            s.secrets.get("default") == Some(&secret("default", "k1"))
        })
        .await;
        stop.cancel();
        task.await.unwrap();

        // 2. The stream is up: skiff's own control plane serves a cluster naming another
        // secret of the SDS clients.
        let dir = TempDir::new("fed-secrets");
        let cds = r#"{"version_info": "1", "resources": [{
  "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
  "name": "dyn", "type": "STATIC", "connect_timeout": "1s",
  "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
    "common_tls_context": {"tls_certificate_sds_secret_configs": [{"name": "spiffe-other",
      "sds_config": {"api_config_source": {"api_type": "GRPC",
        "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]}}}]}}}}]}"#;
        std::fs::write(dir.0.join("clusters.json"), cds).unwrap();
        let mut cp = crate::controlplane::ControlPlaneOptions::new(
            crate::controlplane::Source::Dir(dir.0.clone()),
        );
        cp.listen = "127.0.0.1:0".parse().unwrap();
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let cp_stop = CancellationToken::new();
        let cp_done = cp_stop.clone();
        let server = tokio::spawn(crate::controlplane::serve(
            cp,
            move |a| {
                let _ = bound_tx.send(a);
            },
            async move { cp_done.cancelled().await },
        ));
        let addr = bound_rx.await.unwrap();
        let (seam, mut ends) = ExternalSecrets::channel();
        let mut opts = ads_options(addr);
        opts.external_secrets = Some(seam);
        let stop = CancellationToken::new();
        let task = crate::xds::spawn(
            opts,
            crate::xds::Resources::for_bootstrap(&bootstrap),
            store.clone(),
            stats,
            stop.clone(),
        );
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while !ends.names.borrow_and_update().contains("spiffe-other") {
            tokio::time::timeout_at(deadline, ends.names.changed())
                .await
                .expect("the accepted cluster's secret name reaches the SDS clients")
                .unwrap();
        }
        until(&store, "the dynamic cluster", |s| {
            s.cluster("dyn").is_some()
        })
        .await;
        ends.secrets
            .send([("spiffe-other".to_string(), secret("spiffe-other", "k2"))].into())
            .unwrap();
        until(&store, "the fed secret with ADS up", |s| {
            s.secrets.contains_key("spiffe-other") && s.cluster("dyn").is_some()
        })
        .await;
        stop.cancel();
        task.await.unwrap();
        cp_stop.cancel();
        let _ = server.await;
    }
}
