//! The one owner of the kernel fast-path maps: a task that projects and writes, always the
//! latest state of every scope.
//!
//! Inputs come from every pipeline (the sidecar's or node's own store, scope
//! [`NODE_SCOPE`](skiff_common::NODE_SCOPE), and in node mode each pod pipeline, its own scope):
//! a published snapshot ([`Owner::publish`], from the ADS client's publish hook and at start),
//! a health or outlier change of a scope's hosts ([`Owner::follow_health`]), a scope going away
//! ([`Owner::remove_scope`]). Each input bumps one monotonically increasing generation and
//! replaces the scope's entry in a watch channel: inputs that arrive while the task is busy
//! coalesce, and the task always projects the newest entry of each scope. An older image can
//! therefore never overwrite a newer one: there is only one writer, and it only ever reads the
//! latest inputs.
//!
//! After each apply the task reports the generation it applied (every input up to it is in the
//! kernel, or was superseded by a newer input of the same scope that is). The ADS client's
//! publish hook waits for that report before it ACKs, and NACKs when its scope's image did not
//! fit or the write failed. The task is also the only writer of `SKIFF_EP_LOAD` (the proxy's own
//! load per endpoint, every 200 ms).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::BpfError;
use super::fastpath::{FastPath, LoadExport};
use super::projection;
use super::reconciler::{ScopeId, ScopedImages};
use crate::state::Snapshot;
use crate::xds::{PublishError, PublishHook};

/// How often the proxy's own load per endpoint is exported.
const EXPORT_EVERY: Duration = Duration::from_millis(200);
/// How long after a failed write the task tries the latest inputs again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The latest input of one scope.
#[derive(Clone)]
struct ScopeInput {
    /// Generation of the last input for this scope (publish or health change).
    generation: u64,
    snapshot: Arc<Snapshot>,
    capture_port: u16,
}

/// Every scope's latest input.
#[derive(Clone, Default)]
struct Inputs {
    /// The newest generation handed out.
    generation: u64,
    scopes: BTreeMap<ScopeId, ScopeInput>,
}

/// What the task last applied.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    /// Every input up to this generation is served (or superseded by a newer one that is).
    pub generation: u64,
    /// Scopes whose image did not fit, with the limit hit.
    pub overflow: BTreeMap<ScopeId, String>,
    /// The write failed (the kernel keeps serving the previous image; retried).
    pub error: Option<Arc<BpfError>>,
}

/// Why a scope's published snapshot is not (all) in the kernel maps; the ADS client NACKs with
/// its text.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ApplyError {
    /// `scope`'s image did not fit the maps' capacity; the services left out are served by the
    /// proxy.
    #[error("{limit}")]
    Overflow {
        /// The scope whose image did not fit.
        scope: ScopeId,
        /// The limits hit and what they left out.
        limit: String,
    },
    /// Writing the maps failed: the kernel keeps serving the previous image (the owner retries).
    #[error("kernel fast path: {source}")]
    Write {
        /// The scope whose publish waited for the write.
        scope: ScopeId,
        /// The failed write (shared by every scope of the round).
        source: Arc<BpfError>,
    },
}

impl ApplyError {
    /// The scope whose snapshot is not (all) served by the kernel.
    pub fn scope(&self) -> ScopeId {
        match self {
            ApplyError::Overflow { scope, .. } | ApplyError::Write { scope, .. } => *scope,
        }
    }
}

impl From<ApplyError> for PublishError {
    fn from(e: ApplyError) -> PublishError {
        PublishError::new(e)
    }
}

/// Handle to the owner task; cheap to clone.
#[derive(Clone)]
pub struct Owner {
    inputs: Arc<watch::Sender<Inputs>>,
    applied: watch::Receiver<Applied>,
}

impl std::fmt::Debug for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owner")
            .field("applied", &self.applied.borrow().generation)
            .finish_non_exhaustive()
    }
}

/// Where the owner task writes; a trait so the ordering tests run without the kernel.
pub trait Sink: Send + Sync + 'static {
    /// Writes the images of every scope; `Ok(overflow per scope)`.
    fn apply(&self, images: &ScopedImages) -> Result<BTreeMap<ScopeId, String>, BpfError>;
    /// Records how long the projection took.
    fn note_projection(&self, _took: Duration) {}
    /// Exports the proxy's load per endpoint, given every scope's latest snapshot.
    fn export_loads(&self, _snapshots: &BTreeMap<ScopeId, Arc<Snapshot>>) {}
}

/// The kernel maps as a [`Sink`].
struct Kernel {
    fast: Arc<FastPath>,
    loads: std::sync::Mutex<LoadExport>,
}

impl Sink for Kernel {
    fn apply(&self, images: &ScopedImages) -> Result<BTreeMap<ScopeId, String>, BpfError> {
        self.fast.apply(images).map(|r| r.overflow_by_scope)
    }

    fn note_projection(&self, took: Duration) {
        self.fast.note_projection(took);
    }

    fn export_loads(&self, snapshots: &BTreeMap<ScopeId, Arc<Snapshot>>) {
        let mut loads = Vec::new();
        for (scope, name, endpoints) in self.fast.least_request_clusters() {
            let Some(entry) = snapshots.get(&scope).and_then(|s| s.cluster(&name)) else {
                continue;
            };
            for addr in endpoints {
                if let Some(h) = entry.lb.host(addr) {
                    let st = h.state();
                    // Active requests are the load Envoy's LEAST_REQUEST weighs; a proxied
                    // tcp_proxy connection is one too (as in Envoy's TCP pool), so adding
                    // open connections would count it twice.
                    let n = st.active_requests();
                    loads.push((addr, u32::try_from(n).unwrap_or(u32::MAX)));
                }
            }
        }
        let mut export = self.loads.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = export.export(&loads) {
            tracing::warn!(error = %e, "exporting endpoint loads to the kernel failed");
        }
    }
}

impl Owner {
    /// Starts the owner of the kernel maps `fast` (and the load export); it stops with `stop`.
    pub(super) fn start_kernel(
        fast: Arc<FastPath>,
        loads: LoadExport,
        stop: CancellationToken,
    ) -> (Owner, tokio::task::JoinHandle<()>) {
        Owner::start(
            Arc::new(Kernel {
                fast,
                loads: std::sync::Mutex::new(loads),
            }),
            stop,
        )
    }

    /// Starts an owner task writing to `sink`; it stops with `stop`.
    pub fn start(
        sink: Arc<dyn Sink>,
        stop: CancellationToken,
    ) -> (Owner, tokio::task::JoinHandle<()>) {
        let (inputs, rx) = watch::channel(Inputs::default());
        let (applied_tx, applied) = watch::channel(Applied::default());
        let task = tokio::spawn(run(sink, rx, applied_tx, stop));
        (
            Owner {
                inputs: Arc::new(inputs),
                applied,
            },
            task,
        )
    }

    /// Hands `snapshot` of `scope` to the owner; returns the generation that carries it.
    pub fn publish(&self, scope: ScopeId, snapshot: Arc<Snapshot>, capture_port: u16) -> u64 {
        let mut generation = 0;
        self.inputs.send_modify(|i| {
            i.generation += 1;
            generation = i.generation;
            i.scopes.insert(
                scope,
                ScopeInput {
                    generation,
                    snapshot,
                    capture_port,
                },
            );
        });
        generation
    }

    /// The hosts of `scope` changed health (or were ejected): project its latest snapshot
    /// again. Returns the generation, `None` if the scope is unknown.
    pub fn refresh(&self, scope: ScopeId) -> Option<u64> {
        let mut generation = None;
        self.inputs.send_if_modified(|i| {
            let next = i.generation + 1;
            let Some(s) = i.scopes.get_mut(&scope) else {
                return false;
            };
            s.generation = next;
            i.generation = next;
            generation = Some(next);
            true
        });
        generation
    }

    /// Removes every entry of `scope` (its last pod went). Returns the generation.
    pub fn remove_scope(&self, scope: ScopeId) -> u64 {
        let mut generation = 0;
        self.inputs.send_modify(|i| {
            i.generation += 1;
            generation = i.generation;
            i.scopes.remove(&scope);
        });
        generation
    }

    /// Waits until `generation` is applied; then `Err` if `scope`'s image did not fit or the
    /// write failed (the ADS client NACKs with it). `Ok` if the owner stopped meanwhile.
    pub async fn applied(&self, generation: u64, scope: ScopeId) -> Result<(), ApplyError> {
        let mut rx = self.applied.clone();
        let Ok(a) = rx.wait_for(|a| a.generation >= generation).await else {
            return Ok(());
        };
        if let Some(e) = &a.error {
            return Err(ApplyError::Write {
                scope,
                source: e.clone(),
            });
        }
        match a.overflow.get(&scope) {
            Some(limit) => Err(ApplyError::Overflow {
                scope,
                limit: limit.clone(),
            }),
            None => Ok(()),
        }
    }

    /// [`Owner::publish`] then [`Owner::applied`].
    pub async fn publish_and_wait(
        &self,
        scope: ScopeId,
        snapshot: Arc<Snapshot>,
        capture_port: u16,
    ) -> Result<(), ApplyError> {
        let g = self.publish(scope, snapshot, capture_port);
        self.applied(g, scope).await
    }

    /// The ADS client's publish hook for `scope`: hands each published snapshot to the owner and
    /// holds the ACK until it is applied.
    pub fn publish_hook(&self, scope: ScopeId, capture_port: u16) -> PublishHook {
        let owner = self.clone();
        PublishHook(Arc::new(move |snap: Arc<Snapshot>| {
            let owner = owner.clone();
            Box::pin(async move {
                owner.publish_and_wait(scope, snap, capture_port).await?;
                Ok(())
            }) as Pin<Box<dyn Future<Output = Result<(), PublishError>> + Send>>
        }))
    }

    /// Re-projects `scope` whenever `health` (a `HostRegistry::subscribe_health` receiver)
    /// changes, until `stop`.
    pub fn follow_health(
        &self,
        scope: ScopeId,
        mut health: watch::Receiver<u64>,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let owner = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = health.changed() => if r.is_err() { return },
                }
                owner.refresh(scope);
            }
        })
    }

    /// What the task last applied.
    pub fn last_applied(&self) -> Applied {
        self.applied.borrow().clone()
    }
}

/// The owner task: project what changed, apply, report; export loads on a timer.
async fn run(
    sink: Arc<dyn Sink>,
    mut rx: watch::Receiver<Inputs>,
    applied: watch::Sender<Applied>,
    stop: CancellationToken,
) {
    // Per scope: the input generation last projected, and its image.
    let mut projected = Projected::default();
    let mut export = tokio::time::interval(EXPORT_EVERY);
    export.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
            _ = export.tick() => {
                let snaps: BTreeMap<ScopeId, Arc<Snapshot>> = rx
                    .borrow()
                    .scopes
                    .iter()
                    .map(|(s, i)| (*s, i.snapshot.clone()))
                    .collect();
                let sink = sink.clone();
                let _ = tokio::task::spawn_blocking(move || sink.export_loads(&snaps)).await;
                continue;
            }
            () = async {
                match retry.as_mut() {
                    Some(wait) => wait.await,
                    None => std::future::pending().await,
                }
            } => {
                retry = None;
            }
        }
        // The newest inputs; anything arriving from here on wakes the next round.
        let inputs = rx.borrow_and_update().clone();
        let sink2 = sink.clone();
        let prev = std::mem::take(&mut projected);
        let round = tokio::task::spawn_blocking(move || reconcile(&*sink2, &inputs, prev)).await;
        let (next, report) = match round {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %e, "fast-path owner round panicked");
                retry = Some(Box::pin(tokio::time::sleep(RETRY_AFTER)));
                continue;
            }
        };
        projected = next;
        if let Some(e) = &report.error {
            tracing::warn!(error = %e, generation = report.generation, "kernel fast path not updated; retrying");
            retry = Some(Box::pin(tokio::time::sleep(RETRY_AFTER)));
        }
        applied.send_replace(report);
    }
}

/// The images the task last projected, per scope, with the input generation each came from.
#[derive(Default)]
struct Projected {
    generations: BTreeMap<ScopeId, u64>,
    images: ScopedImages,
}

/// One round: project the scopes whose input changed (others keep their image), apply all.
fn reconcile(sink: &dyn Sink, inputs: &Inputs, mut projected: Projected) -> (Projected, Applied) {
    projected
        .generations
        .retain(|s, _| inputs.scopes.contains_key(s));
    projected
        .images
        .retain(|s, _| inputs.scopes.contains_key(s));
    let started = std::time::Instant::now();
    let mut any = false;
    for (scope, input) in &inputs.scopes {
        if projected.generations.get(scope) != Some(&input.generation) {
            let image = projection::project(&input.snapshot, input.capture_port);
            projected.generations.insert(*scope, input.generation);
            projected.images.insert(*scope, image);
            any = true;
        }
    }
    if any {
        sink.note_projection(started.elapsed());
    }
    let report = match sink.apply(&projected.images) {
        Ok(overflow) => Applied {
            generation: inputs.generation,
            overflow,
            error: None,
        },
        Err(e) => Applied {
            generation: inputs.generation,
            overflow: BTreeMap::new(),
            error: Some(Arc::new(e)),
        },
    };
    (projected, report)
}

#[cfg(test)]
mod tests;
