//! aya-log records from the kernel programs, forwarded to `tracing` (target
//! `skiff::bpf::kernel`) by a task that drains the ring buffer.

use std::time::Duration;

use aya::Ebpf;

/// How often the log pump drains aya-log's ring buffer.
const LOG_FLUSH_EVERY: Duration = Duration::from_millis(20);

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

    /// Starts the task draining the ring buffer every 20 ms. `None` if already started, if
    /// the object has no log map, or outside a tokio runtime.
    pub(super) fn spawn(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let mut logger = self.logger.take()?;
        let task = handle.spawn(async move {
            let mut tick = tokio::time::interval(LOG_FLUSH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                logger.flush();
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
        match r.level() {
            log::Level::Error => tracing::error!(target: "skiff::bpf::kernel", "{msg}"),
            log::Level::Warn => tracing::warn!(target: "skiff::bpf::kernel", "{msg}"),
            log::Level::Info => tracing::info!(target: "skiff::bpf::kernel", "{msg}"),
            log::Level::Debug => tracing::debug!(target: "skiff::bpf::kernel", "{msg}"),
            log::Level::Trace => tracing::trace!(target: "skiff::bpf::kernel", "{msg}"),
        }
    }

    fn flush(&self) {}
}
