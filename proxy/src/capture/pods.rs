//! Node mode, one pipeline per pod (`skiff node add-pod --cgroup PATH --netns PATH --node-id
//! ID`): a DaemonSet skiff serving many pods, each with its own identity and configuration.
//!
//! The kernel tells pods apart by cgroup id: `connect4/6` (attached once at the node root)
//! capture only tasks whose cgroup is registered, and redirect them to 127.0.0.1:15001 *inside
//! the pod's network namespace*. So for each pod skiff binds its outbound listeners in that
//! namespace (a short-lived thread enters it with `setns`; sockets keep the namespace they
//! were created in) and serves what they accept with the pod's own [`Dataplane`]: its own
//! [`Store`] of snapshots, fed by its own ADS client under the pod's node id (or the pod's
//! own bootstrap). A pod's connections therefore never see another pod's configuration.
//! `getsockopt` still answers: the listeners are created by this process, in the proxy cgroup,
//! and the original-destination keys carry the pod's netns cookie. Upstream connects leave
//! from skiff's own namespace (the node's), as from a node proxy.
//!
//! Removing a pod unregisters its cgroup (new connects go direct), stops its listeners and
//! its ADS client; connections in flight finish on the snapshot they started with.
//! Identical snapshots are not shared between pods yet: each pod holds its own.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::bpf::Capture;
use crate::config::Bootstrap;
use crate::dataplane::{self, Dataplane, ListenerRole};
use crate::state::{Snapshot, Store};
use crate::stats::Stats;
use crate::xds::{self, Resources, XdsOptions};

/// What `add-pod` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    /// The pod's cgroup v2 directory (its tasks are captured).
    pub cgroup: PathBuf,
    /// The pod's network namespace (`/run/netns/NAME`, `/proc/PID/ns/net`).
    pub netns: PathBuf,
    /// The pod's xDS node id.
    pub node_id: String,
    /// The pod's own bootstrap; `None`: the node's, with `node_id`.
    pub bootstrap: Option<PathBuf>,
}

/// Errors of pod registration; each names the pod's cgroup or namespace.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// Already registered.
    #[error("pod with cgroup {0} is already registered")]
    Exists(PathBuf),
    /// Not registered.
    #[error("no pod with cgroup {0}")]
    Unknown(PathBuf),
    /// Kernel registration failed.
    #[error("registering cgroup {cgroup}: {source}")]
    Cgroup {
        /// Cgroup.
        cgroup: PathBuf,
        /// Cause.
        #[source]
        source: crate::bpf::BpfError,
    },
    /// The listeners could not be created in the pod's namespace.
    #[error("binding {addr} in network namespace {netns}: {source}")]
    Bind {
        /// Namespace.
        netns: PathBuf,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The pod's bootstrap is invalid.
    #[error("pod bootstrap: {0}")]
    Bootstrap(String),
}

/// One registered pod.
struct Pod {
    spec: PodSpec,
    cgroup_id: u64,
    store: Arc<Store>,
    stats: Arc<Stats>,
    listeners: Vec<SocketAddr>,
    stop: CancellationToken,
}

/// Every pod of this node, by cgroup id.
pub struct PodRegistry {
    bootstrap: Bootstrap,
    upstream_mark: Option<u32>,
    outbound_v4: SocketAddr,
    outbound_v6: Option<SocketAddr>,
    pods: Mutex<BTreeMap<u64, Pod>>,
    stop: CancellationToken,
}

impl std::fmt::Debug for PodRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodRegistry")
            .field("pods", &self.lock().len())
            .finish_non_exhaustive()
    }
}

/// Binds `addrs` inside the network namespace at `netns`, from a thread that enters it (only
/// that thread changes namespace; the sockets stay in the pod's namespace).
fn bind_in_netns(
    netns: &Path,
    addrs: &[SocketAddr],
) -> Result<Vec<std::net::TcpListener>, PodError> {
    let netns = netns.to_path_buf();
    let addrs = addrs.to_vec();
    let ns_err = |netns: &Path, addr: SocketAddr, source| PodError::Bind {
        netns: netns.to_path_buf(),
        addr,
        source,
    };
    let first = addrs
        .first()
        .copied()
        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    std::thread::spawn(move || {
        let file = std::fs::File::open(&netns).map_err(|e| ns_err(&netns, first, e))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| ns_err(&netns, first, std::io::Error::from(e)))?;
        addrs
            .iter()
            .map(|&addr| {
                let domain = socket2::Domain::for_address(addr);
                let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)
                    .map_err(|e| ns_err(&netns, addr, e))?;
                s.set_reuse_address(true)
                    .and_then(|()| s.bind(&addr.into()))
                    .and_then(|()| s.listen(4096))
                    .and_then(|()| s.set_nonblocking(true))
                    .map_err(|e| ns_err(&netns, addr, e))?;
                Ok(std::net::TcpListener::from(s))
            })
            .collect()
    })
    .join()
    .unwrap_or_else(|_| {
        Err(PodError::Bootstrap(
            "the thread binding in the pod namespace panicked".into(),
        ))
    })
}

impl PodRegistry {
    /// A registry whose pods start from `bootstrap` (unless they bring their own), mark
    /// their upstream sockets with `upstream_mark` and listen on the outbound addresses.
    pub fn new(
        bootstrap: Bootstrap,
        upstream_mark: Option<u32>,
        outbound_v4: std::net::SocketAddrV4,
        outbound_v6: Option<std::net::SocketAddrV6>,
        stop: CancellationToken,
    ) -> Self {
        PodRegistry {
            bootstrap,
            upstream_mark,
            outbound_v4: SocketAddr::V4(outbound_v4),
            outbound_v6: outbound_v6.map(SocketAddr::V6),
            pods: Mutex::new(BTreeMap::new()),
            stop,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Pod>> {
        // A panic while holding the lock leaves the map usable: each entry is whole.
        self.pods.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a pod: its listeners in its namespace, its pipeline, then its cgroup in the
    /// kernel (last, so nothing is captured before the listeners exist). Must run inside the
    /// tokio runtime.
    pub fn add(&self, capture: &Capture, spec: PodSpec) -> Result<serde_json::Value, PodError> {
        let id = crate::bpf::cgroup_id(&spec.cgroup).map_err(|source| PodError::Cgroup {
            cgroup: spec.cgroup.clone(),
            source,
        })?;
        if self.lock().contains_key(&id) {
            return Err(PodError::Exists(spec.cgroup));
        }
        let bootstrap = match &spec.bootstrap {
            Some(p) => crate::config::load(p).map_err(|e| PodError::Bootstrap(e.to_string()))?,
            None => self.bootstrap.clone(),
        };
        let mut addrs = vec![self.outbound_v4];
        addrs.extend(self.outbound_v6);
        let listeners = bind_in_netns(&spec.netns, &addrs)?;

        let stop = self.stop.child_token();
        let stats = Arc::new(Stats::default());
        let store = Arc::new(Store::new(Snapshot::new(
            bootstrap.listeners.clone(),
            bootstrap.clusters.clone(),
            &Default::default(),
        )));
        if let Some(ads) = &bootstrap.ads {
            let resources = Resources::new(bootstrap.listeners.clone(), bootstrap.clusters.clone());
            store.publish(resources.snapshot());
            let mut node = bootstrap.raw.node.clone().unwrap_or_default();
            node.id.clone_from(&spec.node_id);
            let xopts = XdsOptions::new(ads.clone(), Some(node));
            xds::spawn(xopts, resources, store.clone(), stats.clone(), stop.clone());
        }
        let dp = Arc::new(Dataplane::new(
            store.clone(),
            stats.clone(),
            self.upstream_mark,
            self.outbound_v4.port(),
        ));
        let mut bound = Vec::new();
        for l in listeners {
            let l = tokio::net::TcpListener::from_std(l).map_err(|source| PodError::Bind {
                netns: spec.netns.clone(),
                addr: self.outbound_v4,
                source,
            })?;
            bound.extend(l.local_addr().ok());
            let token = stop.clone();
            tokio::spawn(dataplane::run(
                l,
                ListenerRole::Capture,
                dp.clone(),
                async move { token.cancelled().await },
            ));
        }
        if let Err(source) = capture.add_meshed_cgroup(&spec.cgroup) {
            stop.cancel();
            return Err(PodError::Cgroup {
                cgroup: spec.cgroup,
                source,
            });
        }
        tracing::info!(
            cgroup = %spec.cgroup.display(),
            cgroup_id = id,
            netns = %spec.netns.display(),
            node_id = %spec.node_id,
            "pod added"
        );
        let pod = Pod {
            spec,
            cgroup_id: id,
            store,
            stats,
            listeners: bound,
            stop,
        };
        let view = pod_json(&pod);
        self.lock().insert(id, pod);
        Ok(view)
    }

    /// Unregisters the pod of `cgroup` (by path, or by id when the directory is gone): new
    /// connects go direct, its listeners and ADS client stop.
    pub fn remove(&self, capture: &Capture, cgroup: &Path) -> Result<(), PodError> {
        let id = {
            let pods = self.lock();
            pods.iter()
                .find(|(_, p)| p.spec.cgroup == cgroup)
                .map(|(id, _)| *id)
                .or_else(|| crate::bpf::cgroup_id(cgroup).ok())
                .filter(|id| pods.contains_key(id))
                .ok_or_else(|| PodError::Unknown(cgroup.into()))?
        };
        capture
            .remove_meshed_cgroup_id(id)
            .map_err(|source| PodError::Cgroup {
                cgroup: cgroup.into(),
                source,
            })?;
        if let Some(pod) = self.lock().remove(&id) {
            pod.stop.cancel();
            tracing::info!(cgroup = %cgroup.display(), cgroup_id = id, node_id = %pod.spec.node_id, "pod removed");
        }
        Ok(())
    }

    /// Every pod: cgroup, id, namespace, node id, listeners, its config's listener and
    /// cluster names, and its counters.
    pub fn list(&self) -> serde_json::Value {
        let pods: Vec<serde_json::Value> = self.lock().values().map(pod_json).collect();
        serde_json::json!({ "pods": pods })
    }
}

fn pod_json(p: &Pod) -> serde_json::Value {
    let snap = p.store.load();
    let stats: serde_json::Map<String, serde_json::Value> = p
        .stats
        .snapshot()
        .into_iter()
        .map(|(k, v)| (k, v.into()))
        .collect();
    serde_json::json!({
        "cgroup": p.spec.cgroup.display().to_string(),
        "cgroup_id": p.cgroup_id,
        "netns": p.spec.netns.display().to_string(),
        "node_id": p.spec.node_id,
        "listeners": p.listeners.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "config": {
            "listeners": snap.listeners.keys().collect::<Vec<_>>(),
            "clusters": snap.clusters.keys().collect::<Vec<_>>(),
        },
        "stats": stats,
    })
}
