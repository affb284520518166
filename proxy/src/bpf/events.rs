//! Kernel events: connect4/6 write one record per fast-path connect and per fail-open /
//! fail-closed decision into the `SKIFF_EVENTS` ring buffer (rate-limited per CPU in the
//! kernel, see `skiff_common::events`). A task here drains it (aya `RingBuf` behind tokio's
//! `AsyncFd`) and turns each event into:
//!
//! - an access-log line, with `--kernel-access-log PATH|stdout`, in Istio's default format
//!   (text, or its JSON format with `--kernel-access-log-format json`);
//!   the kernel path shows as `%RESPONSE_CODE_DETAILS%` and
//!   `%CONNECTION_TERMINATION_DETAILS%` = `kernel_fast_path` (or `kernel_fail_open_proxy_down`,
//!   `kernel_fail_closed_not_ready`, ...), `%UPSTREAM_HOST%` the endpoint the kernel chose;
//! - counters: `skiff.bpf.fast_path.service.<cluster>.cx_total` per service, and
//!   `skiff.bpf.events.{total,fail_open,fail_closed,lost,lost_ring_full,lost_rate_limited}`;
//!   the lost counts come from the kernel's per-CPU `SKIFF_EV_LOST`;
//! - an entry in the ring of recent connections ([`super::explain::recent`]) with the kernel's
//!   steps, for `skiff explain --recent`.
//!
//! Events are a sample once the bucket runs dry: the exact per-service connect counts stay in
//! `SKIFF_SVCST_V2` (`skiff.bpf.fast_path.<vip>.cx_total`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aya::maps::{Array, MapData, PerCpuArray, RingBuf};
use skiff_common::events::{
    EventConfig, KernelEvent, LOST_RATE_LIMITED, LOST_RING_FULL, MAX_BURST, MAX_RATE,
    VERDICT_FAST_PATH, VERDICT_NOT_READY_CLOSED, VERDICT_NOT_READY_OPEN, VERDICT_PROXY_DOWN_CLOSED,
    VERDICT_PROXY_DOWN_OPEN,
};
use tokio::io::unix::AsyncFd;

use super::explain::{RecentConn, recent};
use super::fastpath::FastPath;
use super::{BpfError, map_err, take};
use crate::accesslog::{self, AccessLog, Format, Record, Target, Template};
use crate::stats::Stats;

pub(super) const MAP_EVENTS: &str = "SKIFF_EVENTS";
pub(super) const MAP_EV_CFG: &str = "SKIFF_EV_CFG";
pub(super) const MAP_EV_LOST: &str = "SKIFF_EV_LOST";

/// Default ring size: 256 KiB, 3276 events of 80 bytes (a power-of-two number of pages).
pub const DEFAULT_RING_BYTES: u32 = 256 * 1024;
/// Default sustained events per second per CPU.
pub const DEFAULT_RATE: u64 = 1000;
/// Default burst per CPU.
pub const DEFAULT_BURST: u64 = 1000;

/// Kernel event settings (`skiff run --kernel-events-rate/--kernel-events-burst/
/// --kernel-access-log`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventsConfig {
    /// Events per second per CPU the kernel may write; 0 turns events off.
    pub rate_per_sec: u64,
    /// Events a CPU may write back to back.
    pub burst: u64,
    /// Ring buffer size in bytes (a power-of-two number of pages).
    pub ring_bytes: u32,
    /// Where kernel access-log lines go: a path, or `stdout` / `stderr`; `None`: no lines.
    pub access_log: Option<String>,
    /// The lines in Istio's default JSON format instead of its text format.
    pub access_log_json: bool,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            rate_per_sec: DEFAULT_RATE,
            burst: DEFAULT_BURST,
            ring_bytes: DEFAULT_RING_BYTES,
            access_log: None,
            access_log_json: false,
        }
    }
}

impl EventsConfig {
    /// The access log the events go to, in Istio's default text or JSON format.
    fn access_log(&self) -> Option<AccessLog> {
        let path = self.access_log.as_deref()?;
        let target = match path {
            "stdout" | "-" => Target::Stdout,
            "stderr" => Target::Stderr,
            p => Target::from_path(p),
        };
        let format = if self.access_log_json {
            Format::Json {
                template: accesslog::format::istio_default_json()
                    .expect("Istio's default JSON format parses (a unit test checks it)"),
                omit_empty: false,
            }
        } else {
            Format::Text(
                Template::parse(accesslog::format::ISTIO_DEFAULT)
                    .expect("Istio's default access-log format parses (a unit test checks it)"),
            )
        };
        Some(AccessLog {
            name: "skiff.kernel_access_log".into(),
            target,
            format: Arc::new(format),
            filter: None,
        })
    }
}

/// Counts of the events seen, by kind and by service.
#[derive(Debug, Default)]
struct Counts {
    total: u64,
    fail_open: u64,
    fail_closed: u64,
    /// Fast-path connects per service (cluster name, or the VIP when the image no longer
    /// knows it).
    per_service: BTreeMap<String, u64>,
}

/// The event maps of a loaded object and the reader task.
pub struct Events {
    /// Until the reader task takes it.
    ring: Mutex<Option<RingBuf<MapData>>>,
    lost: PerCpuArray<MapData, u64>,
    /// Kept open: the programs are loaded after this takes the maps, and a map whose fd is
    /// closed by then cannot be referenced.
    _config: Array<MapData, EventConfig>,
    counts: Arc<Mutex<Counts>>,
    access_log: Option<AccessLog>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("access_log", &self.access_log.as_ref().map(|l| &l.target))
            .finish_non_exhaustive()
    }
}

impl Events {
    /// Takes the event maps out of `ebpf` and writes the rate limit.
    pub(super) fn new(ebpf: &mut aya::Ebpf, cfg: &EventsConfig) -> Result<Events, BpfError> {
        let ring: RingBuf<MapData> = take(ebpf, MAP_EVENTS)?;
        let lost: PerCpuArray<MapData, u64> = take(ebpf, MAP_EV_LOST)?;
        let mut conf: Array<MapData, EventConfig> = take(ebpf, MAP_EV_CFG)?;
        let value = EventConfig {
            rate_per_sec: cfg.rate_per_sec.min(MAX_RATE),
            burst: cfg.burst.min(MAX_BURST),
        };
        conf.set(0, value, 0)
            .map_err(|source| map_err(MAP_EV_CFG, "write the rate limit", source))?;
        Ok(Events {
            ring: Mutex::new(Some(ring)),
            lost,
            _config: conf,
            counts: Arc::default(),
            access_log: cfg.access_log(),
            task: Mutex::new(None),
        })
    }

    /// Starts the reader task (`None` if already started or outside a tokio runtime). It
    /// names services from `fast`'s applied images and counts access-log drops in `stats`.
    pub(super) fn spawn(
        &self,
        fast: Option<Arc<FastPath>>,
        stats: Arc<Stats>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        // SAFETY: the ring owns its map fd (aya's `MapData`), which stays open and the same
        // until the ring, and with it the AsyncFd, is dropped.
        let registered =
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
        let fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %e, "kernel events unavailable: ring buffer not pollable");
                return None;
            }
        };
        let sink = Sink {
            fast,
            stats,
            counts: self.counts.clone(),
            access_log: self.access_log.clone(),
            clock: Clock::now(),
        };
        let task = handle.spawn(read_loop(fd, sink));
        *self.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task.abort_handle());
        Some(task)
    }

    /// `skiff.bpf.events.*` and `skiff.bpf.fast_path.service.*` counters (without the
    /// `skiff.bpf.` prefix).
    pub fn stats(&self) -> Vec<(String, u64)> {
        let (ring_full, rate_limited) = (
            self.lost_sum(LOST_RING_FULL),
            self.lost_sum(LOST_RATE_LIMITED),
        );
        let c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = vec![
            ("events.total".to_string(), c.total),
            ("events.fail_open".to_string(), c.fail_open),
            ("events.fail_closed".to_string(), c.fail_closed),
            ("events.lost".to_string(), ring_full + rate_limited),
            ("events.lost_ring_full".to_string(), ring_full),
            ("events.lost_rate_limited".to_string(), rate_limited),
        ];
        out.extend(
            c.per_service
                .iter()
                .map(|(name, n)| (format!("fast_path.service.{name}.cx_total"), *n)),
        );
        out
    }

    fn lost_sum(&self, index: u32) -> u64 {
        self.lost
            .get(&index, 0)
            .map(|v| v.iter().copied().sum())
            .unwrap_or(0)
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        if let Some(t) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
    }
}

/// How often the reader drains the ring without being woken: the kernel wakes it only once a
/// backlog builds up (a wakeup per event would cost each connect several microseconds).
const DRAIN_EVERY: Duration = Duration::from_millis(100);

/// Handles every event in the ring when woken (a backlog) or every [`DRAIN_EVERY`].
async fn read_loop(mut fd: AsyncFd<RingBuf<MapData>>, sink: Sink) {
    let mut tick = tokio::time::interval(DRAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ready = fd.readable_mut() => match ready {
                Ok(mut guard) => {
                    drain(guard.get_inner_mut(), &sink);
                    guard.clear_ready();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kernel event reader stopped");
                    return;
                }
            },
            _ = tick.tick() => drain(fd.get_mut(), &sink),
        }
    }
}

fn drain(ring: &mut RingBuf<MapData>, sink: &Sink) {
    while let Some(item) = ring.next() {
        match KernelEvent::from_bytes(&item) {
            Some(ev) => sink.handle(&ev),
            None => tracing::debug!(len = item.len(), "kernel event of unexpected size"),
        }
    }
}

/// Maps `bpf_ktime_get_ns` (CLOCK_MONOTONIC) to wall-clock time, from one reading of both.
#[derive(Clone, Copy, Debug)]
struct Clock {
    wall: SystemTime,
    mono_ns: u64,
}

impl Clock {
    fn now() -> Clock {
        Clock {
            wall: SystemTime::now(),
            mono_ns: monotonic_ns(),
        }
    }

    fn wall(&self, ns: u64) -> SystemTime {
        if ns >= self.mono_ns {
            self.wall + Duration::from_nanos(ns - self.mono_ns)
        } else {
            self.wall - Duration::from_nanos(self.mono_ns - ns)
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    if rc != 0 {
        return 0;
    }
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Where events go.
struct Sink {
    fast: Option<Arc<FastPath>>,
    stats: Arc<Stats>,
    counts: Arc<Mutex<Counts>>,
    access_log: Option<AccessLog>,
    clock: Clock,
}

impl Sink {
    fn handle(&self, ev: &KernelEvent) {
        let dst = ev.orig_dst();
        let service = if ev.verdict == VERDICT_FAST_PATH {
            self.fast.as_ref().and_then(|f| f.service_at(ev.scope, dst))
        } else {
            None
        };
        let lb = match (&self.fast, &service) {
            (Some(f), Some(s)) => f.lb_of(ev.scope, &s.cluster),
            _ => None,
        };
        let d = describe(ev, dst, service.as_ref(), lb, self.clock.wall(ev.time_ns));
        {
            let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            c.total += 1;
            match ev.verdict {
                VERDICT_FAST_PATH => {
                    *c.per_service.entry(d.service.clone()).or_default() += 1;
                }
                VERDICT_PROXY_DOWN_OPEN | VERDICT_NOT_READY_OPEN => c.fail_open += 1,
                _ => c.fail_closed += 1,
            }
        }
        if let Some(log) = &self.access_log {
            accesslog::log_all(std::slice::from_ref(log), &d.record, &self.stats);
        }
        recent().push(d.recent);
    }
}

/// What one event says, in the forms it is reported in.
struct Described {
    service: String,
    record: Record,
    recent: RecentConn,
}

/// `%RESPONSE_CODE_DETAILS%` of an event's verdict.
fn details(verdict: u8) -> &'static str {
    match verdict {
        VERDICT_FAST_PATH => "kernel_fast_path",
        VERDICT_PROXY_DOWN_OPEN => "kernel_fail_open_proxy_down",
        VERDICT_PROXY_DOWN_CLOSED => "kernel_fail_closed_proxy_down",
        VERDICT_NOT_READY_OPEN => "kernel_fail_open_not_ready",
        VERDICT_NOT_READY_CLOSED => "kernel_fail_closed_not_ready",
        _ => "kernel_unknown",
    }
}

/// Turns one event into its access-log record and its recent-connection steps (pure).
fn describe(
    ev: &KernelEvent,
    dst: SocketAddr,
    service: Option<&super::projection::ServiceImage>,
    lb: Option<&'static str>,
    at: SystemTime,
) -> Described {
    let ep = ev.endpoint();
    let name = service.map_or_else(|| dst.to_string(), |s| s.cluster.clone());
    let detail = details(ev.verdict);
    let record = Record {
        start: at,
        response_code_details: Some(detail.into()),
        connection_termination_details: Some(detail.into()),
        response_flags: if matches!(
            ev.verdict,
            VERDICT_PROXY_DOWN_CLOSED | VERDICT_NOT_READY_CLOSED
        ) {
            // Envoy's flag for a connection refused before any upstream was tried.
            vec!["UH"]
        } else {
            Vec::new()
        },
        upstream_host: ep,
        upstream_cluster: service.map(|s| s.cluster.clone()),
        downstream_local: Some(dst),
        ..Record::default()
    };
    let mut recent = RecentConn::new("kernel", None, Some(dst));
    recent.at = at;
    let scope = ev.scope;
    match (ev.verdict, service) {
        (VERDICT_FAST_PATH, _) => {
            recent.push(
                "capture",
                dst,
                format!(
                    "kernel fast path: connect4/6 found the VIP in the fast-path services (scope {scope}, cgroup {}, socket cookie {})",
                    ev.cgroup_id, ev.cookie
                ),
            );
            if let Some(s) = service {
                recent.push(
                    "listener",
                    &s.listener,
                    "the listener the service was projected from",
                );
                recent.push("filter_chain", &s.filter_chain, "its plain tcp_proxy chain");
                recent.push("cluster", &s.cluster, "the chain's tcp_proxy cluster");
            } else {
                recent.push("cluster", "-", "the service left the fast path since");
            }
            let how = lb.map_or_else(
                || "chosen in the kernel".to_string(),
                |lb| format!("chosen in the kernel ({lb})"),
            );
            recent.push("endpoint", ep.map_or("-".into(), |e| e.to_string()), how);
            recent.outcome = "connected straight to the endpoint (the proxy never saw it)".into();
        }
        (v, _) => {
            let why = match v {
                VERDICT_PROXY_DOWN_OPEN => {
                    "no proxy listener: fail open, the connect went to its original destination"
                }
                VERDICT_PROXY_DOWN_CLOSED => "no proxy listener: fail closed, connect refused",
                VERDICT_NOT_READY_OPEN => {
                    "proxy not ready: fail open, the connect went to its original destination"
                }
                VERDICT_NOT_READY_CLOSED => "proxy not ready: fail closed, connect refused",
                _ => "unknown kernel verdict",
            };
            recent.push("capture", dst, why);
            recent.outcome = detail.into();
        }
    }
    Described {
        service: name,
        record,
        recent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_common::{AF_INET, events::VERDICT_FAST_PATH};

    fn event(verdict: u8) -> KernelEvent {
        KernelEvent {
            time_ns: 5,
            cookie: 77,
            netns_cookie: 1,
            cgroup_id: 9,
            orig_ip_be: [u32::from_ne_bytes([10, 96, 0, 1]), 0, 0, 0],
            ep_ip_be: [u32::from_ne_bytes([127, 0, 0, 3]), 0, 0, 0],
            scope: 0,
            orig_port_be: 80u16.to_be(),
            ep_port_be: 9000u16.to_be(),
            family: AF_INET as u8,
            verdict,
            _pad: [0; 6],
        }
    }

    #[test]
    fn istio_default_format_parses() {
        let cfg = EventsConfig {
            access_log: Some("stdout".into()),
            ..EventsConfig::default()
        };
        assert_eq!(cfg.access_log().unwrap().target, Target::Stdout);
        assert!(EventsConfig::default().access_log().is_none());
    }

    #[test]
    fn a_fast_path_event_logs_as_kernel_path_and_names_its_service() {
        let ev = event(VERDICT_FAST_PATH);
        let svc = super::super::projection::ServiceImage {
            cluster: "echo".into(),
            listener: "virtual".into(),
            filter_chain: "echo-chain".into(),
        };
        let d = describe(
            &ev,
            ev.orig_dst(),
            Some(&svc),
            Some("ROUND_ROBIN"),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(d.service, "echo");
        let log = EventsConfig {
            access_log: Some("stdout".into()),
            ..EventsConfig::default()
        }
        .access_log()
        .unwrap();
        let line = log.line(&d.record).unwrap();
        assert!(
            line.contains(" kernel_fast_path kernel_fast_path "),
            "{line}"
        );
        assert!(line.contains("\"127.0.0.3:9000\" echo "), "{line}");
        assert!(line.contains(" 10.96.0.1:80 "), "{line}");
        let steps: Vec<&str> = d.recent.steps.iter().map(|s| s.step).collect();
        assert_eq!(
            steps,
            ["capture", "listener", "filter_chain", "cluster", "endpoint"]
        );
        assert_eq!(d.recent.path, "kernel");
        assert!(d.recent.steps[4].reason.contains("ROUND_ROBIN"));
    }

    #[test]
    fn a_fail_closed_event_has_no_endpoint_and_counts_as_uh() {
        let ev = event(VERDICT_PROXY_DOWN_CLOSED);
        let d = describe(&ev, ev.orig_dst(), None, None, SystemTime::UNIX_EPOCH);
        assert_eq!(d.record.upstream_host, None);
        assert_eq!(d.record.response_flags, ["UH"]);
        assert_eq!(d.recent.steps.len(), 1);
        assert!(d.recent.steps[0].reason.contains("fail closed"));
    }

    #[test]
    fn the_clock_maps_monotonic_to_wall_time() {
        let c = Clock {
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(100),
            mono_ns: 50_000_000_000,
        };
        assert_eq!(
            c.wall(51_000_000_000),
            SystemTime::UNIX_EPOCH + Duration::from_secs(101)
        );
        assert_eq!(
            c.wall(49_000_000_000),
            SystemTime::UNIX_EPOCH + Duration::from_secs(99)
        );
    }
}
