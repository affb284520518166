//! aya-log records from the kernel programs, forwarded to `tracing` (target
//! `skiff::bpf::kernel`, the program's module as field `program`) by a task that drains the
//! ring buffer when the kernel signals data (epoll on the ring's fd: no timer wakes an idle
//! proxy).

use aya::Ebpf;
use tokio::io::unix::AsyncFd;

/// The log forwarder of one loaded object; dropping it stops its task.
pub(super) struct LogPump {
    logger: Option<aya_log::EbpfLogger<TracingLog>>,
    task: Option<tokio::task::AbortHandle>,
}

impl LogPump {
    /// Takes the object's log map (warns and forwards nothing if it has none).
    pub(super) fn new(ebpf: &mut Ebpf) -> Self {
        let logger = match aya_log::EbpfLogger::init_with_logger(ebpf, TracingLog) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "eBPF log forwarding unavailable");
                None
            }
        };
        LogPump { logger, task: None }
    }

    /// Starts the task draining the ring buffer whenever it has records (the runtime needs its
    /// IO driver). `None` if already started, if the object has no log map, or outside a tokio
    /// runtime.
    pub(super) fn spawn(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let logger = self.logger.take()?;
        let _entered = handle.enter();
        // SAFETY: the fd is the logger's ring buffer map, owned by the logger that the AsyncFd
        // owns from here on: it stays open and the same for the AsyncFd's whole life.
        let registered =
            unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %e, "eBPF log forwarding unavailable");
                return None;
            }
        };
        let task = handle.spawn(async move {
            loop {
                let Ok(mut ready) = fd.readable_mut().await else {
                    return;
                };
                ready.get_inner_mut().flush();
                ready.clear_ready();
            }
        });
        self.task = Some(task.abort_handle());
        Some(task)
    }
}

impl Drop for LogPump {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Forwards aya-log records (the `log` crate's API) to `tracing`.
struct TracingLog;

impl log::Log for TracingLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, r: &log::Record<'_>) {
        let msg = r.args();
        // aya-log's target is the module of the eBPF crate that logged: the program.
        let program = r.target();
        match r.level() {
            log::Level::Error => tracing::error!(target: "skiff::bpf::kernel", program, "{msg}"),
            log::Level::Warn => tracing::warn!(target: "skiff::bpf::kernel", program, "{msg}"),
            log::Level::Info => tracing::info!(target: "skiff::bpf::kernel", program, "{msg}"),
            log::Level::Debug => tracing::debug!(target: "skiff::bpf::kernel", program, "{msg}"),
            log::Level::Trace => tracing::trace!(target: "skiff::bpf::kernel", program, "{msg}"),
        }
    }

    fn flush(&self) {}
}
