//! Node mode, one pipeline per pod (`skiff node add-pod --cgroup PATH --netns PATH --node-id
//! ID`): a DaemonSet skiff serving many pods, each with its own identity and configuration.
//!
//! The kernel tells pods apart by cgroup id: `connect4/6` (attached once at the node root)
//! capture only tasks whose cgroup is registered, and redirect them to 127.0.0.1:15001 *inside
//! the pod's network namespace*. So each pod gets a thread that enters that namespace with
//! `setns` (only that thread does), binds the outbound listeners there and runs a
//! current-thread runtime serving them with the pod's [`Dataplane`]: its own [`Store`] of
//! snapshots, fed by its own ADS client under the pod's node id (or the pod's own bootstrap).
//! A pod's connections therefore never see another pod's configuration, and every socket the
//! pod's thread creates (upstream connects included) lives in the pod's namespace: upstream
//! traffic leaves from the pod, with its addresses, as from a sidecar. The ADS streams stay in
//! skiff's own namespace, like a node proxy's. `getsockopt` still answers: the listeners are
//! created by this process, in the proxy cgroup, and the original-destination keys carry the
//! pod's netns cookie.
//!
//! Pods whose configuration must be identical share one pipeline (store, ADS stream, data
//! plane, counters): the same bootstrap and, with ADS, the same node id. Pods with different
//! node ids keep separate streams even when the control plane happens to send the same
//! resources (content-level sharing is not done).
//!
//! Each pipeline is at parity with a sidecar: its store knows the pod bootstrap's locality and
//! local cluster, its active health checks run from a thread in the network namespace of the
//! pod that started it, and with `--fast-path` it is a scope of its own in the kernel maps
//! (scope = pipeline id): the cgroup is registered in `SKIFF_MESHED_V2` with that scope, so a
//! pod's connect only ever sees its own pipeline's services and endpoints. A pod's cgroup is
//! registered only once its pipeline has its initial configuration (the first LDS/CDS
//! responses, or `initial_fetch_timeout`), like a sidecar's ready gate; until then its connects
//! go direct.
//!
//! Removing a pod unregisters its cgroup (new connects go direct) and stops its listeners;
//! its pipeline stops with the last pod using it, and its scope's fast-path entries go.
//! Connections in flight finish on the snapshot they started with.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::InboundOptions;
use crate::bpf::{Capture, Owner, ScopeId};
use crate::config::Bootstrap;
use crate::dataplane::{self, Dataplane, ListenerRole};
use crate::state::Store;
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
    /// The inbound capture could not be set up in the pod's namespace.
    #[error("inbound capture in network namespace {netns}: {reason}")]
    Inbound {
        /// Namespace.
        netns: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// What makes two pods' configuration identical: the same bootstrap and, when it uses ADS,
/// the same node id (the control plane answers per node). Pods with equal keys share one
/// pipeline: one store of snapshots, one ADS stream, one data plane.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct PipelineKey {
    /// The pod's own bootstrap file (canonical), or `None` for the node's.
    bootstrap: Option<PathBuf>,
    /// The node id, when the bootstrap uses ADS.
    node_id: Option<String>,
}

/// One configuration pipeline and the data plane serving it.
struct Pipeline {
    id: u64,
    /// Its fast-path scope (its id).
    scope: ScopeId,
    store: Arc<Store>,
    stats: Arc<Stats>,
    dp: Arc<Dataplane>,
    stop: CancellationToken,
    /// Turns true once the initial configuration is in (`None`: no ADS, in from the start).
    initialized: Option<tokio::sync::watch::Receiver<bool>>,
    /// Envoy's `initial_fetch_timeout` of its bootstrap.
    initial_fetch_timeout: Option<Duration>,
}

/// Whether a pod's cgroup is in the kernel's meshed set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Registration {
    /// Waiting for the pipeline's initial configuration.
    Pending,
    /// Registered: its connects are captured.
    Registered,
    /// Removed before it was registered (or after): never register it again.
    Removed,
}

/// One registered pod: its listeners (in its netns) feed a possibly shared pipeline.
struct Pod {
    spec: PodSpec,
    cgroup_id: u64,
    key: PipelineKey,
    pipeline: Arc<Pipeline>,
    listeners: Vec<SocketAddr>,
    stop: CancellationToken,
    closed: std::sync::mpsc::Receiver<()>,
    registration: Arc<Mutex<Registration>>,
}

#[derive(Default)]
struct State {
    pods: BTreeMap<u64, Pod>,
    pipelines: BTreeMap<PipelineKey, Arc<Pipeline>>,
    next_pipeline: u64,
}

/// Every pod of this node, by cgroup id, and the pipelines they use.
pub struct PodRegistry {
    bootstrap: Bootstrap,
    inbound: Option<InboundOptions>,
    allow_coexist: bool,
    upstream_mark: Option<u32>,
    outbound_v4: SocketAddr,
    outbound_v6: Option<SocketAddr>,
    /// The owner of the kernel fast-path maps (`None` without `--fast-path`).
    fast: Option<Owner>,
    state: Mutex<State>,
    stop: CancellationToken,
}

impl std::fmt::Debug for PodRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodRegistry")
            .field("pods", &self.lock().pods.len())
            .finish_non_exhaustive()
    }
}

/// How long a removed pod's connections get to finish before its thread stops.
const POD_DRAIN: Duration = Duration::from_secs(5);

/// Binds `addrs` (listening, non-blocking) in the calling thread's network namespace.
fn bind_all(netns: &Path, addrs: &[SocketAddr]) -> Result<Vec<std::net::TcpListener>, PodError> {
    addrs
        .iter()
        .map(|&addr| {
            let err = |source| PodError::Bind {
                netns: netns.to_path_buf(),
                addr,
                source,
            };
            let s = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )
            .map_err(err)?;
            s.set_reuse_address(true)
                .and_then(|()| s.bind(&addr.into()))
                .and_then(|()| s.listen(4096))
                .and_then(|()| s.set_nonblocking(true))
                .map_err(err)?;
            Ok(std::net::TcpListener::from(s))
        })
        .collect()
}

/// The pod's inbound listeners (0.0.0.0 and, with IPv6, a v6-only [::] on `port`), bound in
/// the calling thread's network namespace.
fn bind_inbound(
    netns: &Path,
    port: u16,
    ipv6: bool,
) -> Result<(std::net::TcpListener, Option<std::net::TcpListener>), PodError> {
    let v4 = bind_all(netns, &[SocketAddr::from(([0, 0, 0, 0], port))])?
        .pop()
        .ok_or_else(|| PodError::Bootstrap("no inbound listener".into()))?;
    if !ipv6 {
        return Ok((v4, None));
    }
    let addr = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
    let err = |source| PodError::Bind {
        netns: netns.to_path_buf(),
        addr,
        source,
    };
    let s =
        socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).map_err(err)?;
    // v6-only: the IPv4 listener serves IPv4 (sk_lookup assigns by family).
    s.set_only_v6(true)
        .and_then(|()| s.set_reuse_address(true))
        .and_then(|()| s.bind(&addr.into()))
        .and_then(|()| s.listen(4096))
        .and_then(|()| s.set_nonblocking(true))
        .map_err(err)?;
    Ok((v4, Some(std::net::TcpListener::from(s))))
}

/// Starts the pod's data-plane thread: it enters the pod's network namespace (only this
/// thread does), binds `addrs` there and runs a current-thread runtime accepting on them with
/// `dp` until `stop`. Every socket it creates (accepted, upstream, DNS lookups on its blocking
/// threads, which inherit the namespace) lives in the pod's namespace. Returns the bound
/// addresses once listening; after `stop`, in-flight connections get [`POD_DRAIN`].
fn start_pod_thread(
    name: String,
    netns: &Path,
    addrs: &[SocketAddr],
    inbound: Option<InboundOptions>,
    allow_coexist: bool,
    dp: Arc<Dataplane>,
    stop: CancellationToken,
) -> Result<(Vec<SocketAddr>, std::sync::mpsc::Receiver<()>), PodError> {
    let netns = netns.to_path_buf();
    let addrs = addrs.to_vec();
    let first = addrs
        .first()
        .copied()
        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    let err = move |netns: &Path, source| PodError::Bind {
        netns: netns.to_path_buf(),
        addr: first,
        source,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    // Signalled once the pod's listeners and steering are gone (removal waits for it).
    let (closed_tx, closed_rx) = std::sync::mpsc::channel();
    let thread_netns = netns.clone();
    let spawned = std::thread::Builder::new().name(name).spawn(move || {
        let netns = thread_netns;
        let setup = (|| {
            let file = std::fs::File::open(&netns).map_err(|e| err(&netns, e))?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| err(&netns, std::io::Error::from(e)))?;
            let listeners = bind_all(&netns, &addrs)?;
            // Inbound: listeners in the pod and sk_lookup steering in its namespace, detached
            // when this thread ends (the steering is dropped with the runtime's future).
            let inbound = match &inbound {
                Some(ib) => {
                    let inbound_err = |reason: String| PodError::Inbound {
                        netns: netns.clone(),
                        reason,
                    };
                    if !allow_coexist {
                        let found = super::coexist::netns_programs(&netns)
                            .map_err(|e| inbound_err(e.to_string()))?;
                        if !found.is_empty() {
                            return Err(inbound_err(super::coexist::refusal(&found)));
                        }
                    }
                    let (v4, v6) = bind_inbound(&netns, ib.port, ib.ipv6)?;
                    let pod_ips = if ib.pod_ips.is_empty() {
                        crate::bpf::inbound::local_addresses()
                            .map_err(|e| inbound_err(e.to_string()))?
                    } else {
                        ib.pod_ips.clone()
                    };
                    let steering = crate::bpf::inbound::InboundSteering::install_in(
                        &netns,
                        &v4,
                        v6.as_ref(),
                        &pod_ips,
                        &ib.exclude_ports,
                    )
                    .map_err(|e| inbound_err(e.to_string()))?;
                    Some((ib.port, v4, v6, steering))
                }
                None => None,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| err(&netns, e))?;
            Ok((rt, listeners, inbound))
        })();
        let (rt, listeners, inbound) = match setup {
            Ok(x) => x,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        rt.block_on(async move {
            let mut bound = Vec::new();
            let mut tasks = Vec::new();
            for l in listeners {
                let l = match tokio::net::TcpListener::from_std(l) {
                    Ok(l) => l,
                    Err(e) => {
                        stop.cancel();
                        let _ = tx.send(Err(err(&netns, e)));
                        return;
                    }
                };
                bound.extend(l.local_addr().ok());
                let token = stop.clone();
                tasks.push(tokio::spawn(dataplane::run(
                    l,
                    ListenerRole::Capture,
                    dp.clone(),
                    async move { token.cancelled().await },
                )));
            }
            let mut steering = None;
            if let Some((port, v4, v6, s)) = inbound {
                steering = Some(s);
                for l in std::iter::once(v4).chain(v6) {
                    let l = match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => l,
                        Err(e) => {
                            stop.cancel();
                            let _ = tx.send(Err(err(&netns, e)));
                            return;
                        }
                    };
                    bound.extend(l.local_addr().ok());
                    let token = stop.clone();
                    tasks.push(tokio::spawn(dataplane::run(
                        l,
                        ListenerRole::Inbound { port },
                        dp.clone(),
                        async move { token.cancelled().await },
                    )));
                }
            }
            let _ = tx.send(Ok(bound));
            stop.cancelled().await;
            // New inbound connections take the regular lookup again from here on.
            drop(steering);
            let _ = closed_tx.send(());
            for t in tasks {
                let _ = t.await;
            }
            // Connections already accepted run on this runtime: let them finish (bounded).
            let deadline = tokio::time::Instant::now() + POD_DRAIN;
            while tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
                > 0
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    });
    if let Err(e) = spawned {
        return Err(err(&netns, e));
    }
    let bound = rx.recv().unwrap_or_else(|_| {
        Err(PodError::Bootstrap(
            "the pod thread exited before listening".into(),
        ))
    })?;
    Ok((bound, closed_rx))
}

impl PodRegistry {
    /// A registry whose pods start from `bootstrap` (unless they bring their own), mark
    /// their upstream sockets with `upstream_mark` and listen on the outbound addresses.
    #[allow(clippy::too_many_arguments)] // one per setting of `skiff run` a pod inherits
    pub fn new(
        bootstrap: Bootstrap,
        upstream_mark: Option<u32>,
        outbound_v4: std::net::SocketAddrV4,
        outbound_v6: Option<std::net::SocketAddrV6>,
        inbound: Option<InboundOptions>,
        allow_coexist: bool,
        fast: Option<Owner>,
        stop: CancellationToken,
    ) -> Self {
        PodRegistry {
            bootstrap,
            inbound,
            allow_coexist,
            upstream_mark,
            outbound_v4: SocketAddr::V4(outbound_v4),
            outbound_v6: outbound_v6.map(SocketAddr::V6),
            fast,
            state: Mutex::new(State::default()),
            stop,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves the maps usable: each entry is whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pipeline for `key`, started from `bootstrap` if no pod uses it yet: its store, ADS
    /// client (publishing to the fast-path owner under its scope), active health checks (from
    /// `netns`, the namespace of the pod that starts it) and health-driven fast-path updates.
    fn pipeline(
        &self,
        st: &mut State,
        key: &PipelineKey,
        bootstrap: &Bootstrap,
        netns: &Path,
    ) -> Result<Arc<Pipeline>, PodError> {
        if let Some(p) = st.pipelines.get(key) {
            return Ok(p.clone());
        }
        let id = st.next_pipeline + 1;
        let scope = ScopeId::try_from(id)
            .map_err(|_| PodError::Bootstrap("out of fast-path scopes".into()))?;
        let stop = self.stop.child_token();
        let stats = Arc::new(Stats::default());
        let store = Store::for_bootstrap(bootstrap, stats.clone());
        let port = self.outbound_v4.port();
        start_health_thread(id, netns, store.clone(), self.upstream_mark, stop.clone())?;
        let mut initialized = None;
        if let (Some(ads), Some(node_id)) = (&bootstrap.ads, &key.node_id) {
            let resources = Resources::for_bootstrap(bootstrap);
            store.publish(resources.snapshot());
            let mut node = bootstrap.raw.node.clone().unwrap_or_default();
            node.id.clone_from(node_id);
            let mut xopts = XdsOptions::new(ads.clone(), Some(node));
            if bootstrap.lds_ads {
                xopts.initial_types.push(skiff_proto::LISTENER_TYPE_URL);
            }
            if bootstrap.cds_ads {
                xopts.initial_types.push(skiff_proto::CLUSTER_TYPE_URL);
            }
            if !xopts.initial_types.is_empty() {
                let (tx, rx) = tokio::sync::watch::channel(false);
                xopts.initialized = Some(tx);
                initialized = Some(rx);
            }
            if let Some(owner) = &self.fast {
                owner.publish(scope, store.load(), port);
                xopts.on_publish = Some(owner.publish_hook(scope, port));
            }
            xds::spawn(xopts, resources, store.clone(), stats.clone(), stop.clone());
        } else if let Some(owner) = &self.fast {
            owner.publish(scope, store.load(), port);
        }
        if let Some(owner) = &self.fast {
            owner.follow_health(scope, store.registry().subscribe_health(), stop.clone());
        }
        let dp = Arc::new(Dataplane::new(
            store.clone(),
            stats.clone(),
            self.upstream_mark,
            port,
        ));
        st.next_pipeline = id;
        let p = Arc::new(Pipeline {
            id,
            scope,
            store,
            stats,
            dp,
            stop,
            initialized,
            initial_fetch_timeout: bootstrap.initial_fetch_timeout,
        });
        st.pipelines.insert(key.clone(), p.clone());
        Ok(p)
    }

    /// Registers a pod: its listeners in its namespace, its pipeline, then its cgroup in the
    /// kernel (last, so nothing is captured before the listeners exist). Must run inside the
    /// tokio runtime.
    pub fn add(&self, capture: &Capture, spec: PodSpec) -> Result<serde_json::Value, PodError> {
        let id = crate::bpf::cgroup_id(&spec.cgroup).map_err(|source| PodError::Cgroup {
            cgroup: spec.cgroup.clone(),
            source,
        })?;
        if self.lock().pods.contains_key(&id) {
            return Err(PodError::Exists(spec.cgroup));
        }
        let (bootstrap, own) = match &spec.bootstrap {
            Some(p) => {
                let b = crate::config::load(p).map_err(|e| PodError::Bootstrap(e.to_string()))?;
                (
                    b,
                    Some(std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())),
                )
            }
            None => (self.bootstrap.clone(), None),
        };
        let key = PipelineKey {
            bootstrap: own,
            node_id: bootstrap.ads.is_some().then(|| spec.node_id.clone()),
        };
        let mut addrs = vec![self.outbound_v4];
        addrs.extend(self.outbound_v6);

        let mut st = self.lock();
        if st.pods.contains_key(&id) {
            return Err(PodError::Exists(spec.cgroup));
        }
        let pipeline = self.pipeline(&mut st, &key, &bootstrap, &spec.netns)?;
        let stop = pipeline.stop.child_token();
        let bound = match start_pod_thread(
            format!("skiff-pod-{id}"),
            &spec.netns,
            &addrs,
            self.inbound.clone(),
            self.allow_coexist,
            pipeline.dp.clone(),
            stop.clone(),
        ) {
            Ok(b) => b,
            Err(e) => {
                stop.cancel();
                release(&mut st, &key, self.fast.as_ref());
                return Err(e);
            }
        };
        let (bound, closed) = bound;
        let registration = Arc::new(Mutex::new(Registration::Pending));
        let ready_now = pipeline.initialized.as_ref().is_none_or(|rx| *rx.borrow());
        if ready_now {
            if let Err(source) = capture.meshed().add(&spec.cgroup, pipeline.scope) {
                stop.cancel();
                release(&mut st, &key, self.fast.as_ref());
                return Err(PodError::Cgroup {
                    cgroup: spec.cgroup,
                    source,
                });
            }
            *lock(&registration) = Registration::Registered;
        } else {
            register_when_initialized(
                capture.meshed().clone(),
                &pipeline,
                spec.cgroup.clone(),
                registration.clone(),
                stop.clone(),
            );
        }
        tracing::info!(
            cgroup = %spec.cgroup.display(),
            cgroup_id = id,
            netns = %spec.netns.display(),
            node_id = %spec.node_id,
            pipeline = pipeline.id,
            registered = ready_now,
            "pod added"
        );
        let pod = Pod {
            spec,
            cgroup_id: id,
            key,
            pipeline,
            listeners: bound,
            stop,
            closed,
            registration,
        };
        st.pods.insert(id, pod);
        let view = st.pods.get(&id).map(|p| pod_json(&st, p));
        Ok(view.unwrap_or_default())
    }

    /// Unregisters the pod of `cgroup` (by path, or by id when the directory is gone): new
    /// connects go direct, its listeners and ADS client stop.
    pub fn remove(&self, capture: &Capture, cgroup: &Path) -> Result<(), PodError> {
        let id = {
            let st = self.lock();
            st.pods
                .iter()
                .find(|(_, p)| p.spec.cgroup == cgroup)
                .map(|(id, _)| *id)
                .or_else(|| crate::bpf::cgroup_id(cgroup).ok())
                .filter(|id| st.pods.contains_key(id))
                .ok_or_else(|| PodError::Unknown(cgroup.into()))?
        };
        {
            let st = self.lock();
            if let Some(pod) = st.pods.get(&id) {
                // Under the registration lock: a pending registration never happens after this.
                let mut reg = lock(&pod.registration);
                capture
                    .remove_meshed_cgroup_id(id)
                    .map_err(|source| PodError::Cgroup {
                        cgroup: cgroup.into(),
                        source,
                    })?;
                *reg = Registration::Removed;
            }
        }
        let removed = {
            let mut st = self.lock();
            let pod = st.pods.remove(&id);
            if let Some(pod) = &pod {
                pod.stop.cancel();
                release(&mut st, &pod.key, self.fast.as_ref());
            }
            pod
        };
        if let Some(pod) = removed {
            // Wait (bounded) until the pod's listeners and sk_lookup program are gone, so the
            // caller can rely on new connections no longer reaching skiff.
            let _ = pod.closed.recv_timeout(Duration::from_secs(2));
            tracing::info!(cgroup = %cgroup.display(), cgroup_id = id, node_id = %pod.spec.node_id, "pod removed");
        }
        Ok(())
    }

    /// Every pod: cgroup, id, namespace, node id, listeners, its config's listener and
    /// cluster names, and its counters.
    pub fn list(&self) -> serde_json::Value {
        let st = self.lock();
        let pods: Vec<serde_json::Value> = st.pods.values().map(|p| pod_json(&st, p)).collect();
        serde_json::json!({ "pods": pods })
    }
}

/// Stops the pipeline of `key` once no pod uses it, and removes its fast-path scope.
fn release(st: &mut State, key: &PipelineKey, fast: Option<&Owner>) {
    if st.pods.values().any(|p| &p.key == key) {
        return;
    }
    if let Some(p) = st.pipelines.remove(key) {
        p.stop.cancel();
        if let Some(owner) = fast {
            owner.remove_scope(p.scope);
        }
        tracing::info!(
            pipeline = p.id,
            scope = p.scope,
            "pipeline stopped (no pod left)"
        );
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves the value whole (each update is one assignment).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Registers the pod's cgroup with its pipeline's scope once the pipeline has its initial
/// configuration (or its `initial_fetch_timeout` passed), unless the pod was removed first.
fn register_when_initialized(
    meshed: Arc<crate::bpf::meshed::Meshed>,
    pipeline: &Pipeline,
    cgroup: PathBuf,
    registration: Arc<Mutex<Registration>>,
    stop: CancellationToken,
) {
    let Some(mut rx) = pipeline.initialized.clone() else {
        return;
    };
    let timeout = pipeline.initial_fetch_timeout;
    let scope = pipeline.scope;
    tokio::spawn(async move {
        let initialized = async {
            match timeout {
                Some(t) => {
                    if tokio::time::timeout(t, rx.wait_for(|v| *v)).await.is_err() {
                        tracing::warn!(cgroup = %cgroup.display(), "pod's initial_fetch_timeout elapsed; capturing with what is there");
                    }
                }
                None => {
                    let _ = rx.wait_for(|v| *v).await;
                }
            }
        };
        tokio::select! {
            () = initialized => {}
            () = stop.cancelled() => return,
        }
        let mut reg = lock(&registration);
        if *reg != Registration::Pending {
            return;
        }
        match meshed.add(&cgroup, scope) {
            Ok(id) => {
                *reg = Registration::Registered;
                tracing::info!(cgroup = %cgroup.display(), cgroup_id = id, scope, "pod ready: cgroup captured");
            }
            Err(e) => {
                tracing::warn!(cgroup = %cgroup.display(), error = %e, "registering the pod's cgroup failed")
            }
        }
    });
}

/// Runs the pipeline's active health checks (`crate::health::run`) on a thread of their own
/// inside `netns`, so probes leave from the pod's namespace as its upstream connections do.
/// The thread (which keeps the namespace alive) ends with `stop`.
fn start_health_thread(
    id: u64,
    netns: &Path,
    store: Arc<Store>,
    mark: Option<u32>,
    stop: CancellationToken,
) -> Result<(), PodError> {
    let netns = netns.to_path_buf();
    let err = |netns: &Path, source| PodError::Bind {
        netns: netns.to_path_buf(),
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let thread_netns = netns.clone();
    std::thread::Builder::new()
        .name(format!("skiff-hc-{id}"))
        .spawn(move || {
            let setup = (|| {
                let file = std::fs::File::open(&thread_netns)?;
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            })();
            match setup {
                Ok(rt) => {
                    let _ = tx.send(Ok(()));
                    rt.block_on(crate::health::run(store, mark, stop));
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })
        .map_err(|e| err(&netns, e))?;
    match rx.recv() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(err(&netns, e)),
        Err(_) => Err(PodError::Bootstrap(
            "the health-check thread exited before starting".into(),
        )),
    }
}

fn pod_json(st: &State, p: &Pod) -> serde_json::Value {
    let snap = p.pipeline.store.load();
    let shared_by = st.pods.values().filter(|q| q.key == p.key).count();
    let stats: serde_json::Map<String, serde_json::Value> = p
        .pipeline
        .stats
        .snapshot()
        .into_iter()
        .map(|(k, v)| (k, v.into()))
        .collect();
    serde_json::json!({
        "cgroup": p.spec.cgroup.display().to_string(),
        "cgroup_id": p.cgroup_id,
        "ready": *lock(&p.registration) == Registration::Registered,
        "scope": p.pipeline.scope,
        "netns": p.spec.netns.display().to_string(),
        "node_id": p.spec.node_id,
        "listeners": p.listeners.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "pipeline": { "id": p.pipeline.id, "shared_by": shared_by },
        "config": {
            "listeners": snap.listeners.keys().collect::<Vec<_>>(),
            "clusters": snap.clusters.keys().collect::<Vec<_>>(),
        },
        "stats": stats,
    })
}
