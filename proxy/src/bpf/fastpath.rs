//! The kernel fast-path maps and the one place that writes them.
//!
//! [`FastPath`] holds the service, cluster, slot and Maglev maps with their [`Reconciler`];
//! only [`owner::Owner`](super::owner::Owner)'s task calls [`FastPath::apply`]. After each update
//! it removes idle per-endpoint counters and, with `--terminate-on-removal`, destroys the
//! sockets still connected to endpoints the update took out.
//!
//! # Grace period
//!
//! A connect reads `ConfigValue::fast_gen` once and then walks that generation's cluster and
//! slots. After a flip, the reconciler next rewrites the generation connects used to read, so it
//! must first know that no program that read the old number is still running. The cgroup
//! sock_addr programs (connect4/6, sendmsg4) are non-sleepable: the kernel runs them through
//! `bpf_prog_run_array_cg()`, inside `rcu_read_lock()` (kernel/bpf/cgroup.c). A grace period
//! (`synchronize_rcu()`) therefore waits until every program that could have seen the old
//! number has returned. Userspace gets one from `membarrier(MEMBARRIER_CMD_GLOBAL, 0)`: on a
//! machine with more than one online CPU the kernel implements that command as
//! `synchronize_rcu()` (kernel/sched/membarrier.c). It skips the wait with a single online CPU
//! (a preemptible kernel could then still have a preempted reader) and fails with EINVAL on
//! `nohz_full` kernels; in both cases [`grace_period`] falls back to a bounded wait that yields
//! the CPU, logged once. (The other way to get a grace period from userspace, updating a
//! map-in-map, after which the kernel calls `synchronize_rcu()` itself, needs one more map in
//! the object for no gain.) The wait costs milliseconds once per update, never per connect.

use std::collections::{HashMap as StdHashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use aya::maps::{Array, HashMap, MapData, MapError};
use skiff_common::{
    ClusterValue, EndpointKey, EndpointLoad, EndpointValue, ServiceKeyV4, ServiceKeyV6,
    ServiceValue,
};

use super::gate::ConfigMap;
use super::projection::{FastLb, MapImage};
use super::reconciler::{
    ApplyReport, Capacity, FastMaps, Reconciler, ScopeId, ScopedImages, ServiceKey,
};
use super::{BpfError, map_err};

pub(super) const MAP_SVC_V4: &str = "SKIFF_SVC4_V2";
pub(super) const MAP_SVC_V6: &str = "SKIFF_SVC6_V2";
pub(super) const MAP_CLUSTERS: &str = "SKIFF_CLUSTERS";
pub(super) const MAP_ENDPOINTS: &str = "SKIFF_ENDPOINTS";
pub(super) const MAP_RR: &str = "SKIFF_RR";
pub(super) const MAP_MAGLEV: &str = "SKIFF_MAGLEV";
pub(super) const MAP_EP_ACTIVE: &str = "SKIFF_EP_ACTIVE";
pub(super) const MAP_EP_LOAD: &str = "SKIFF_EP_LOAD";
pub(super) const MAP_FAST_SK: &str = "SKIFF_FAST_SK";

/// `membarrier(2)` command that waits for an RCU grace period (uapi linux/membarrier.h).
const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;

/// Where `membarrier` cannot wait for a grace period (`nohz_full`): how long to wait instead.
/// Programs hold a generation for microseconds; this is three orders of magnitude more.
const FALLBACK_GRACE: Duration = Duration::from_millis(10);

/// Waits for an RCU grace period: every non-sleepable BPF program running when this is called
/// has returned when it returns (see the module doc).
pub fn grace_period() -> Result<(), BpfError> {
    static SINGLE_CPU: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
        std::fs::read_to_string("/sys/devices/system/cpu/online")
            .ok()
            .and_then(|s| online_cpus(&s))
            == Some(1)
    });
    if *SINGLE_CPU {
        fallback_wait("one online CPU: membarrier does not wait for readers");
        return Ok(());
    }
    // SAFETY: membarrier takes two integers and reads or writes no memory of this process.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            fallback_wait(&format!(
                "membarrier(MEMBARRIER_CMD_GLOBAL) unavailable: {err}"
            ));
            Ok(())
        }
        _ => Err(BpfError::Io {
            what: "membarrier(MEMBARRIER_CMD_GLOBAL) for a grace period",
            path: "/proc/self".into(),
            source: err,
        }),
    }
}

/// Waits [`FALLBACK_GRACE`] where no grace period can be had; says why once.
fn fallback_wait(why: &str) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!(
            reason = why,
            wait_ms = FALLBACK_GRACE.as_millis() as u64,
            "no RCU grace period from membarrier; fast-path updates wait a fixed time instead"
        );
    });
    std::thread::sleep(FALLBACK_GRACE);
}

/// The number of CPUs in a kernel CPU list (`0-3,5`, as `/sys/devices/system/cpu/online`).
fn online_cpus(list: &str) -> Option<usize> {
    list.trim().split(',').try_fold(0, |n, part| {
        Some(
            n + match part.split_once('-') {
                Some((a, b)) => b.parse::<usize>().ok()?.checked_sub(a.parse().ok()?)? + 1,
                None => {
                    part.parse::<usize>().ok()?;
                    1
                }
            },
        )
    })
}

/// The fast-path maps and their reconciler (one lock: one writer at a time).
pub struct FastPath {
    config: Arc<ConfigMap>,
    state: Mutex<FastState>,
}

/// The maps a [`FastPath`] writes or reads, taken out of the loaded object.
pub(super) struct FastMapsTaken {
    pub(super) services: HashMap<MapData, ServiceKeyV4, ServiceValue>,
    pub(super) services6: HashMap<MapData, ServiceKeyV6, ServiceValue>,
    pub(super) clusters: Array<MapData, ClusterValue>,
    pub(super) endpoints: Array<MapData, EndpointValue>,
    pub(super) maglev: Array<MapData, u32>,
    pub(super) ep_active: HashMap<MapData, EndpointKey, EndpointLoad>,
    pub(super) fast_sk: HashMap<MapData, u64, EndpointKey>,
}

struct FastState {
    maps: FastMapsTaken,
    terminate_on_removal: bool,
    /// Sockets destroyed by `--terminate-on-removal`.
    terminated: u64,
    reconciler: Reconciler,
    timings: FastTimings,
}

/// Durations of the last update, microseconds.
#[derive(Clone, Copy, Debug, Default)]
struct FastTimings {
    last_project_us: u64,
    last_apply_us: u64,
}

/// Fast-path gauges for `/stats` (`skiff.bpf.fast_path.*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastPathGauges {
    /// Services in the applied generation (every scope).
    pub services: u64,
    /// Clusters in the applied generation (every scope).
    pub clusters: u64,
    /// Endpoint slots in the applied generation (every scope).
    pub endpoints: u64,
    /// Duration of the last projection (snapshot -> image), microseconds.
    pub last_project_us: u64,
    /// Duration of the last reconcile (image -> kernel maps, incl. the generation flip and the
    /// grace period), microseconds.
    pub last_apply_us: u64,
    /// Fast-path sockets destroyed by `--terminate-on-removal`.
    pub terminated: u64,
}

/// What the kernel fast path serves, for `skiff maps` and `/debug/explain`.
#[derive(Clone, Debug)]
pub struct FastPathView {
    /// The applied image of the node's own scope (trimmed to capacity).
    pub image: MapImage,
    /// The applied images of the pod scopes (node mode), by scope.
    pub scopes: ScopedImages,
    /// Active generation.
    pub generation: u8,
    /// Map sizes.
    pub capacity: Capacity,
}

impl FastPath {
    pub(super) fn new(
        config: Arc<ConfigMap>,
        maps: FastMapsTaken,
        caps: Capacity,
        terminate_on_removal: bool,
    ) -> Self {
        FastPath {
            config,
            state: Mutex::new(FastState {
                maps,
                terminate_on_removal,
                terminated: 0,
                reconciler: Reconciler::new(caps),
                timings: FastTimings::default(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, FastState> {
        // A panic while holding the lock leaves the maps consistent (each write is one syscall).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Mirrors one image per scope into the maps (see `bpf::reconciler`). The report's
    /// `overflow` names a capacity limit that left services out. Only the owner task calls it.
    pub(super) fn apply(&self, images: &ScopedImages) -> Result<ApplyReport, BpfError> {
        let mut guard = self.lock();
        let FastState {
            maps,
            terminate_on_removal,
            terminated,
            reconciler,
            timings,
        } = &mut *guard;
        let before = terminate_on_removal.then(|| all_endpoints(reconciler.applied_scopes()));
        let mut w = KernelWriter {
            maps,
            config: &self.config,
        };
        let started = std::time::Instant::now();
        let report = reconciler.apply_scopes(&mut w, images)?;
        timings.last_apply_us = started.elapsed().as_micros() as u64;
        let applied = reconciler.applied_scopes();
        tracing::info!(
            apply_us = timings.last_apply_us,
            generation = report.generation,
            scopes = applied.len(),
            services_written = report.services_written,
            services_deleted = report.services_deleted,
            clusters_written = report.clusters_written,
            endpoints_written = report.endpoints_written,
            maglev_written = report.maglev_written,
            services = applied.values().map(|i| i.services.len()).sum::<usize>(),
            udp_services = applied
                .values()
                .map(|i| i.udp_services.len())
                .sum::<usize>(),
            overflow = report.overflow.as_deref().unwrap_or(""),
            "fast path reconciled"
        );
        let served = all_endpoints(applied);
        remove_idle_counters(&mut maps.ep_active, &served);
        // After the flip no connect can pick a removed endpoint any more; now the sockets
        // already connected to it go.
        if let Some(before) = before {
            let gone: std::collections::BTreeSet<std::net::SocketAddrV4> = before
                .difference(&served)
                .filter_map(|e| match e {
                    SocketAddr::V4(a) => Some(*a),
                    SocketAddr::V6(_) => None,
                })
                .collect();
            if !gone.is_empty() {
                let cookies: HashSet<u64> = maps
                    .fast_sk
                    .iter()
                    .filter_map(Result::ok)
                    .filter(
                        |(_, ep)| matches!(ep.addr(), Some(SocketAddr::V4(a)) if gone.contains(&a)),
                    )
                    .map(|(cookie, _)| cookie)
                    .collect();
                match super::terminate::destroy_sockets(&gone, &cookies) {
                    Ok(n) => {
                        *terminated += n as u64;
                        tracing::info!(
                            endpoints = gone.len(),
                            sockets = n,
                            "destroyed fast-path sockets to removed endpoints"
                        );
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        endpoints = gone.len(),
                        "could not destroy fast-path sockets to removed endpoints"
                    ),
                }
            }
        }
        Ok(report)
    }

    /// Records how long the projection feeding the next [`FastPath::apply`] took.
    pub(super) fn note_projection(&self, took: Duration) {
        self.lock().timings.last_project_us = took.as_micros() as u64;
    }

    /// Whether this process has applied an image (its first generation flip turns the kernel's
    /// fast path on): until then an empty view means nothing applied yet, not nothing served.
    pub(super) fn is_on(&self) -> bool {
        self.config.current().fast_path != 0
    }

    /// What the fast path currently serves.
    pub fn view(&self) -> FastPathView {
        let g = self.lock();
        let mut scopes = g.reconciler.applied_scopes().clone();
        let image = scopes.remove(&skiff_common::NODE_SCOPE).unwrap_or_default();
        FastPathView {
            image,
            scopes,
            generation: g.reconciler.active_generation(),
            capacity: g.reconciler.capacity(),
        }
    }

    /// The service the applied image of `scope` serves at `vip` (TCP), without copying the
    /// images: for kernel events.
    pub fn service_at(
        &self,
        scope: u32,
        vip: std::net::SocketAddr,
    ) -> Option<super::projection::ServiceImage> {
        let g = self.lock();
        g.reconciler
            .applied_scopes()
            .get(&scope)?
            .services
            .get(&vip)
            .cloned()
    }

    /// The load-balancing policy of a cluster in the applied image of `scope`.
    pub fn lb_of(&self, scope: u32, cluster: &str) -> Option<&'static str> {
        let g = self.lock();
        Some(
            g.reconciler
                .applied_scopes()
                .get(&scope)?
                .clusters
                .get(cluster)?
                .lb
                .as_str(),
        )
    }

    /// Gauges, without copying the images: what the applied generation holds and how long the
    /// last update took.
    pub fn gauges(&self) -> FastPathGauges {
        let g = self.lock();
        let imgs = g.reconciler.applied_scopes().values();
        let (mut services, mut clusters, mut endpoints) = (0, 0, 0);
        for img in imgs {
            services += (img.services.len() + img.udp_services.len()) as u64;
            clusters += img.clusters.len() as u64;
            endpoints += img.endpoint_slots() as u64;
        }
        FastPathGauges {
            services,
            clusters,
            endpoints,
            last_project_us: g.timings.last_project_us,
            last_apply_us: g.timings.last_apply_us,
            terminated: g.terminated,
        }
    }

    /// Fast-path connections per endpoint as the kernel counts them (open, ever opened),
    /// sorted by endpoint.
    pub fn endpoint_stats(&self) -> Vec<(SocketAddr, EndpointLoad)> {
        let g = self.lock();
        let mut out: Vec<(SocketAddr, EndpointLoad)> = g
            .maps
            .ep_active
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(k, mut v)| {
                // A close that raced a lost increment wraps below zero: show it as idle.
                if v.active >> 63 != 0 {
                    v.active = 0;
                }
                Some((k.addr()?, v))
            })
            .collect();
        out.sort_by_key(|(a, _)| *a);
        out
    }

    /// The LEAST_REQUEST clusters the kernel serves: per scope, cluster name and endpoints.
    pub(super) fn least_request_clusters(&self) -> Vec<(ScopeId, String, Vec<SocketAddr>)> {
        let g = self.lock();
        g.reconciler
            .applied_scopes()
            .iter()
            .flat_map(|(scope, img)| {
                img.clusters
                    .iter()
                    .filter(|(_, c)| c.lb == FastLb::LeastRequest)
                    .map(|(name, c)| (*scope, name.clone(), c.endpoints.clone()))
            })
            .collect()
    }
}

impl std::fmt::Debug for FastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FastPath")
    }
}

/// Every endpoint any scope's image serves.
fn all_endpoints(images: &ScopedImages) -> HashSet<SocketAddr> {
    images
        .values()
        .flat_map(|i| i.clusters.values())
        .flat_map(|c| c.endpoints.iter().copied())
        .collect()
}

/// Idle counters of endpoints the fast path no longer serves go (the map is not LRU).
fn remove_idle_counters(
    ep_active: &mut HashMap<MapData, EndpointKey, EndpointLoad>,
    served: &HashSet<SocketAddr>,
) {
    let idle: Vec<EndpointKey> = ep_active
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| v.active == 0 && !k.addr().is_some_and(|a| served.contains(&a)))
        .map(|(k, _)| k)
        .collect();
    for k in idle {
        if let Err(e) = ep_active.remove(&k) {
            tracing::debug!(error = %e, "removing an idle endpoint counter");
        }
    }
}

/// The proxy's own load per endpoint, exported to `SKIFF_EP_LOAD` for the kernel's
/// LEAST_REQUEST choice. Only the owner task writes it.
pub(super) struct LoadExport {
    ep_load: HashMap<MapData, EndpointKey, u32>,
    /// What `ep_load` holds (only changes are written).
    exported: StdHashMap<EndpointKey, u32>,
}

impl LoadExport {
    pub(super) fn new(ep_load: HashMap<MapData, EndpointKey, u32>) -> Self {
        LoadExport {
            ep_load,
            exported: StdHashMap::new(),
        }
    }

    /// Writes the values that changed since the last export and deletes endpoints no longer
    /// listed (an endpoint listed twice, by two scopes, carries the sum); returns how many
    /// entries were written or deleted.
    pub(super) fn export(&mut self, loads: &[(SocketAddr, u32)]) -> Result<usize, BpfError> {
        let mut next: StdHashMap<EndpointKey, u32> = StdHashMap::new();
        for (a, n) in loads {
            let e = next.entry(EndpointKey::from_socket_addr(*a)).or_default();
            *e = e.saturating_add(*n);
        }
        let mut changes = 0;
        for (k, n) in &next {
            if self.exported.get(k) != Some(n) {
                self.ep_load.insert(k, n, 0).map_err(|source| {
                    map_err(MAP_EP_LOAD, format!("insert {:?}", k.addr()), source)
                })?;
                changes += 1;
            }
        }
        for k in self.exported.keys().filter(|k| !next.contains_key(k)) {
            match self.ep_load.remove(k) {
                Ok(()) | Err(MapError::KeyNotFound) => changes += 1,
                Err(source) => {
                    return Err(map_err(
                        MAP_EP_LOAD,
                        format!("delete {:?}", k.addr()),
                        source,
                    ));
                }
            }
        }
        self.exported = next;
        Ok(changes)
    }
}

/// The reconciler's writes, on the real maps.
struct KernelWriter<'a> {
    maps: &'a mut FastMapsTaken,
    config: &'a ConfigMap,
}

impl FastMaps for KernelWriter<'_> {
    fn set_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), BpfError> {
        let (map, r) = match key {
            ServiceKey::V4(k) => (MAP_SVC_V4, self.maps.services.insert(k, value, 0)),
            ServiceKey::V6(k) => (MAP_SVC_V6, self.maps.services6.insert(k, value, 0)),
        };
        r.map_err(|source| {
            map_err(
                map,
                format!("insert {} scope {}", key.addr(), key.scope()),
                source,
            )
        })
    }

    fn delete_service(&mut self, key: ServiceKey) -> Result<(), BpfError> {
        let (map, r) = match key {
            ServiceKey::V4(k) => (MAP_SVC_V4, self.maps.services.remove(&k)),
            ServiceKey::V6(k) => (MAP_SVC_V6, self.maps.services6.remove(&k)),
        };
        match r {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(map_err(
                map,
                format!("delete {} scope {}", key.addr(), key.scope()),
                source,
            )),
        }
    }

    fn set_cluster(&mut self, index: u32, value: ClusterValue) -> Result<(), BpfError> {
        self.maps
            .clusters
            .set(index, value, 0)
            .map_err(|source| map_err(MAP_CLUSTERS, format!("set index {index}"), source))
    }

    fn set_endpoint(&mut self, index: u32, value: EndpointValue) -> Result<(), BpfError> {
        self.maps
            .endpoints
            .set(index, value, 0)
            .map_err(|source| map_err(MAP_ENDPOINTS, format!("set index {index}"), source))
    }

    fn set_maglev(&mut self, index: u32, value: u32) -> Result<(), BpfError> {
        self.maps
            .maglev
            .set(index, value, 0)
            .map_err(|source| map_err(MAP_MAGLEV, format!("set index {index}"), source))
    }

    fn flip(&mut self, generation: u8) -> Result<(), BpfError> {
        self.config.update(
            || format!("set fast_gen={generation}"),
            |v| {
                v.fast_gen = generation;
                v.fast_path = 1;
            },
        )
    }

    fn quiesce(&mut self) -> Result<(), BpfError> {
        grace_period()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(online_cpus("0\n"), Some(1));
        assert_eq!(online_cpus("0-3\n"), Some(4));
        assert_eq!(online_cpus("0-1,4,6-7"), Some(5));
        assert_eq!(online_cpus("x"), None);
    }

    #[test]
    fn a_grace_period_is_available_and_returns() {
        // membarrier(MEMBARRIER_CMD_GLOBAL) needs no privilege; a failure here means updates
        // would fall back to a fixed wait.
        let started = std::time::Instant::now();
        grace_period().expect("grace period");
        // A grace period is bounded (milliseconds), not a hang.
        assert!(started.elapsed() < Duration::from_secs(5));
        // SAFETY: the query command only returns a bit mask.
        let supported = unsafe { libc::syscall(libc::SYS_membarrier, 0, 0) };
        assert!(
            supported >= 0 && supported & i64::from(MEMBARRIER_CMD_GLOBAL) != 0,
            "membarrier supports MEMBARRIER_CMD_GLOBAL here (mask {supported})"
        );
    }
}
