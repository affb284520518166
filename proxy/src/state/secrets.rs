//! The seam between skiff's configuration task and the SDS clients of sources other than ADS
//! (gRPC clusters such as Istio's `sds-grpc` Unix socket, `xds::sds`).
//!
//! The configuration task tells the clients which secret names the accepted configuration
//! takes from them (a `watch` of names), and the clients hand back every secret they hold (a
//! `watch` of [`Secrets`]); each change of the latter republishes the snapshot, so a rotated
//! certificate reaches new connections while established ones keep their session. With ADS,
//! the ADS client does both (`XdsOptions::external_secrets`); without ADS,
//! [`spawn_static_republisher`] does.

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
