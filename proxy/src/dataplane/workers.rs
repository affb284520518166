//! Data-plane workers, as nginx's and Envoy's: `skiff run --concurrency N` starts N threads,
//! each running a current-thread tokio runtime with its own [`Dataplane`] (its own HTTP
//! upstream pool). Every data-plane listener gets one `SO_REUSEPORT` socket per worker, so
//! the kernel spreads connections over the workers' accept queues and a connection lives its
//! whole life (accept, select, connect, forward, HTTP) on the worker that accepted it: no task
//! hand-off and no cross-thread wake-up per connection. With one worker per CPU, each worker is
//! pinned to its CPU and the sockets steer a connection to the worker of the CPU it arrived on
//! ([`placement`](super::placement)). Snapshots, stats, host state, circuit breakers and TLS
//! contexts stay shared.

use std::future::Future;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tracing::warn;

use super::{Dataplane, ListenerRole, placement};

/// How long a stopping worker waits for its blocking tasks.
const STOP_WAIT: Duration = Duration::from_secs(1);

/// The running workers; dropping them stops every thread (connections still open on them are
/// closed) and waits for it.
#[derive(Debug)]
pub struct Workers {
    workers: Vec<Worker>,
    /// The CPU of each worker, when placed (see [`placement`](super::placement)).
    cpus: Option<Vec<usize>>,
}

#[derive(Debug)]
struct Worker {
    handle: Handle,
    dp: Arc<Dataplane>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

// === impl Workers ===

impl Workers {
    /// Start `n` workers (at least one); worker `i` serves with the data plane `make(i)` and,
    /// when `cpus` places them (one CPU per worker), runs on `cpus[i]`.
    pub fn start(
        n: usize,
        cpus: Option<Vec<usize>>,
        make: impl Fn(usize) -> Dataplane,
    ) -> std::io::Result<Workers> {
        let cpus = cpus.filter(|c| c.len() == n.max(1));
        let mut workers = Workers {
            workers: Vec::new(),
            cpus: cpus.clone(),
        };
        for i in 0..n.max(1) {
            let cpu = cpus.as_ref().map(|c| c[i]);
            let mut dp = make(i);
            dp.worker = Some(i);
            let (stop, stopped) = oneshot::channel::<()>();
            let (ready, handle) = std::sync::mpsc::channel();
            let thread = std::thread::Builder::new()
                .name(format!("skiff-worker-{i}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        // Not fatal: unpinned, the worker still serves what is steered to it.
                        if let Err(e) = placement::pin_current_thread(cpu) {
                            warn!(worker = i, cpu, error = %e, "cannot pin worker to its CPU");
                        }
                    }
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        // No signal or process driver: signals are the main runtime's, and
                        // that driver would look for orphaned children at every park.
                        .enable_io()
                        .enable_time()
                        // Capabilities are per thread: a worker drops what `skiff run` gave
                        // up at its next idle moment.
                        .on_thread_park(crate::takeover::caps::apply_pending)
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready.send(Ok(rt.handle().clone()));
                    // Drives every task spawned on this worker until told to stop.
                    rt.block_on(async {
                        let _ = stopped.await;
                    });
                    rt.shutdown_timeout(STOP_WAIT);
                })?;
            let handle = match handle.recv() {
                Ok(Ok(h)) => h,
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(std::io::Error::other(format!("worker {i} did not start"))),
            };
            workers.workers.push(Worker {
                handle,
                dp: Arc::new(dp),
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(workers)
    }

    /// How many workers run.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Whether there is no worker (never, once started).
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// The CPU each worker is pinned to, in worker order, when they are placed.
    pub fn cpus(&self) -> Option<&[usize]> {
        self.cpus.as_deref()
    }

    /// The data plane of each worker, in worker order.
    pub fn dataplanes(&self) -> impl Iterator<Item = &Arc<Dataplane>> {
        self.workers.iter().map(|w| &w.dp)
    }

    /// Wakes every worker once, so each passes its park hook (where it applies state recorded
    /// for all threads, such as dropped capabilities) even if it is idle now.
    pub fn wake_all(&self) {
        for w in &self.workers {
            drop(w.handle.spawn(async {}));
        }
    }

    /// Run one accept loop of a listener of `role` per socket in `sockets`, socket `i` on
    /// worker `i % len` (from `app::listen_sockets` one per worker; sockets inherited from a
    /// predecessor with another worker count are all served, none closed with connections
    /// queued in it); each stops when the future `shutdown()` made for it completes. Returns
    /// the loops' tasks.
    pub fn serve<F>(
        &self,
        sockets: Vec<std::net::TcpListener>,
        role: &ListenerRole,
        shutdown: impl Fn() -> F,
    ) -> Vec<tokio::task::JoinHandle<()>>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        // One socket per placed worker, in worker order: steer each connection to its CPU's.
        // A group of another size (inherited from a predecessor with another worker count)
        // keeps the kernel's hash.
        if let Some(first) = sockets.first() {
            let steered = match &self.cpus {
                Some(cpus) if sockets.len() == cpus.len() => placement::steer(first, cpus),
                _ => placement::unsteer(first),
            };
            if let Err(e) = steered {
                warn!(error = %e, cpus = ?self.cpus, "cannot set how connections pick a worker");
            }
        }
        self.workers
            .iter()
            .cycle()
            .zip(sockets)
            .map(|(w, sock)| {
                let (dp, role, shutdown) = (w.dp.clone(), role.clone(), shutdown());
                w.handle.spawn(async move {
                    // Registered with this worker's reactor: its readiness wakes only it.
                    match tokio::net::TcpListener::from_std(sock) {
                        Ok(l) => super::run(l, role, dp, shutdown).await,
                        Err(e) => warn!(error = %e, worker = ?dp.worker, "cannot serve listener"),
                    }
                })
            })
            .collect()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.workers {
            if let Some(s) = w.stop.take() {
                let _ = s.send(());
            }
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Snapshot, Store};
    use crate::stats::Stats;

    fn workers(n: usize) -> Workers {
        let stats = Arc::new(Stats::default());
        let store = Arc::new(Store::new(Snapshot::default()));
        Workers::start(n, None, |_| {
            Dataplane::new(store.clone(), stats.clone(), None, 15001)
        })
        .unwrap()
    }

    #[test]
    fn each_worker_is_its_own_thread_with_its_own_pool() {
        let w = workers(3);
        assert_eq!(w.len(), 3);
        let ids: Vec<_> = w.dataplanes().map(|d| d.worker).collect();
        assert_eq!(ids, [Some(0), Some(1), Some(2)]);
        let threads: std::collections::BTreeSet<_> = w
            .workers
            .iter()
            .map(|w| {
                let (tx, rx) = std::sync::mpsc::channel();
                w.handle.spawn(async move {
                    let _ = tx.send(std::thread::current().name().map(str::to_string));
                });
                rx.recv().unwrap()
            })
            .collect();
        assert_eq!(threads.len(), 3, "{threads:?}");
        let a = &w.workers[0].dp.shared;
        let b = &w.workers[1].dp.shared;
        assert!(!Arc::ptr_eq(a, b));
        assert!(Arc::ptr_eq(&a.store, &b.store));
    }

    /// Sockets inherited from a predecessor with more workers: every one gets an accept loop
    /// (none is left with connections queued and no one to take them).
    #[test]
    fn more_sockets_than_workers_are_all_served() {
        use std::io::Read;
        let w = workers(2);
        let socks: Vec<std::net::TcpListener> = (0..3)
            .map(|_| {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.set_nonblocking(true).unwrap();
                l
            })
            .collect();
        let addrs: Vec<_> = socks.iter().map(|l| l.local_addr().unwrap()).collect();
        let loops = w.serve(socks, &ListenerRole::Capture, std::future::pending::<()>);
        assert_eq!(loops.len(), 3);
        for a in addrs {
            // No listener in the empty snapshot: an accepted connection is closed at once; one
            // nobody accepts would wait in the backlog until the timeout.
            let mut c = std::net::TcpStream::connect(a).unwrap();
            c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            let mut buf = [0u8; 1];
            match c.read(&mut buf) {
                Ok(0) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                other => panic!("{a}: not served: {other:?}"),
            }
        }
    }

    #[test]
    fn zero_means_one_and_drop_stops_the_threads() {
        let w = workers(0);
        assert_eq!(w.len(), 1);
        drop(w);
    }
}
