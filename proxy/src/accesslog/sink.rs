//! Where lines go: one writer thread per file (or per standard stream) for the whole process,
//! fed through a bounded queue, so a slow disk never blocks the data path: a full queue drops
//! the line and the caller counts it. `POST /reopen_logs` reopens every file (log rotation).
//!
//! Threads rather than tokio tasks: node mode runs pods on their own runtimes, and a writer
//! must outlive whichever runtime first logged to its file.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};

use tracing::warn;

/// Lines a writer queues before new ones are dropped.
pub const QUEUE_LINES: usize = 16 * 1024;

/// A log destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// The process's standard output (`envoy.access_loggers.stdout`, or the path
    /// `/dev/stdout`).
    Stdout,
    /// The process's standard error.
    Stderr,
    /// A file, appended to (created if absent).
    File(PathBuf),
}

impl Target {
    /// `/dev/stdout` and `/dev/stderr` are the streams, as for Envoy's file logger.
    pub fn from_path(path: &str) -> Target {
        match path {
            "/dev/stdout" => Target::Stdout,
            "/dev/stderr" => Target::Stderr,
            p => Target::File(p.into()),
        }
    }
}

/// Why a line was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// The writer's queue is full.
    QueueFull,
    /// The writer is gone (could not start).
    NoWriter,
}

enum Msg {
    Line(String),
    Wake,
}

struct Writer {
    tx: SyncSender<Msg>,
    reopen: Arc<AtomicBool>,
}

/// Every writer of the process, by target.
struct Registry {
    writers: Mutex<HashMap<Target, Arc<Writer>>>,
}

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| Registry {
        writers: Mutex::new(HashMap::new()),
    })
}

fn writer(target: &Target) -> Option<Arc<Writer>> {
    let mut w = registry().writers.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(x) = w.get(target) {
        return Some(x.clone());
    }
    let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
    let reopen = Arc::new(AtomicBool::new(false));
    let (t, r) = (target.clone(), reopen.clone());
    let spawned = std::thread::Builder::new()
        .name("skiff-access-log".into())
        .spawn(move || run(t, rx, r));
    if let Err(e) = spawned {
        warn!(error = %e, target = ?target, "access log writer did not start");
        return None;
    }
    let x = Arc::new(Writer { tx, reopen });
    w.insert(target.clone(), x.clone());
    Some(x)
}

/// Queue `line` for `target` without waiting.
pub fn send(target: &Target, line: String) -> Result<(), Dropped> {
    let w = writer(target).ok_or(Dropped::NoWriter)?;
    match w.tx.try_send(Msg::Line(line)) {
        Ok(()) => Ok(()),
        Err(TrySendError::Full(_)) => Err(Dropped::QueueFull),
        Err(TrySendError::Disconnected(_)) => Err(Dropped::NoWriter),
    }
}

/// Make every file writer reopen its file before its next write (`POST /reopen_logs`).
/// Returns how many writers were told.
pub fn reopen_all() -> usize {
    let w = registry().writers.lock().unwrap_or_else(|e| e.into_inner());
    for x in w.values() {
        x.reopen.store(true, Ordering::Release);
        // A full queue will be drained anyway; the flag is read before each write.
        let _ = x.tx.try_send(Msg::Wake);
    }
    w.len()
}

enum Out {
    Stdout,
    Stderr,
    File(Option<io::BufWriter<File>>),
}

fn open(path: &PathBuf) -> Option<io::BufWriter<File>> {
    match OpenOptions::new().create(true).append(true).open(path) {
        Ok(f) => Some(io::BufWriter::new(f)),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "access log file cannot be opened");
            None
        }
    }
}

/// The writer loop: write what is queued, flush when the queue is empty.
fn run(target: Target, rx: Receiver<Msg>, reopen: Arc<AtomicBool>) {
    let mut out = match &target {
        Target::Stdout => Out::Stdout,
        Target::Stderr => Out::Stderr,
        Target::File(p) => Out::File(open(p)),
    };
    let mut failing = false;
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            if reopen.swap(false, Ordering::AcqRel)
                && let (Out::File(f), Target::File(p)) = (&mut out, &target)
            {
                if let Some(old) = f.as_mut() {
                    let _ = old.flush();
                }
                *f = open(p);
            }
            if let Msg::Line(line) = msg {
                let r = match &mut out {
                    Out::Stdout => io::stdout().lock().write_all(line.as_bytes()),
                    Out::Stderr => io::stderr().lock().write_all(line.as_bytes()),
                    Out::File(Some(f)) => f.write_all(line.as_bytes()),
                    Out::File(None) => Err(io::ErrorKind::NotFound.into()),
                };
                if let Err(e) = r {
                    if !failing {
                        warn!(target = ?target, error = %e, "access log write failed");
                    }
                    failing = true;
                } else {
                    failing = false;
                }
            }
            next = rx.try_recv().ok();
        }
        let _ = match &mut out {
            Out::Stdout => io::stdout().flush(),
            Out::Stderr => io::stderr().flush(),
            Out::File(Some(f)) => f.flush(),
            Out::File(None) => Ok(()),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer stuck in `open` (a FIFO nobody reads): the queue fills, further lines are
    /// dropped at once and counted, and the caller never waits.
    #[test]
    fn a_stuck_writer_drops_lines_and_counts_them() {
        let dir = std::env::temp_dir().join(format!("skiff-al-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("stuck.fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let log = crate::accesslog::AccessLog {
            name: "stuck".into(),
            target: Target::File(fifo.clone()),
            format: std::sync::Arc::new(crate::accesslog::Format::Text(
                crate::accesslog::Template::parse("x\n").unwrap(),
            )),
            filter: None,
        };
        let stats = crate::stats::Stats::default();
        let rec = crate::accesslog::Record::default();
        for _ in 0..QUEUE_LINES + 10 {
            crate::accesslog::log_all(std::slice::from_ref(&log), &rec, &stats);
        }
        // The queue holds about QUEUE_LINES lines (std's channel may keep one fewer).
        let dropped = stats.counter(crate::accesslog::DROPPED_STAT).get() as usize;
        assert!((10..=11).contains(&dropped), "{dropped} dropped");
        let queued = QUEUE_LINES + 10 - dropped;
        // Unblock the writer: it drains what was queued into the reader.
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || {
                use std::io::Read;
                let mut f = File::open(fifo).unwrap();
                let mut got = vec![0u8; queued * 2];
                f.read_exact(&mut got).unwrap();
                got
            })
        };
        let got = reader.join().unwrap();
        assert!(got.chunks(2).all(|c| c == b"x\n"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lines_reach_the_file_and_reopen_follows_a_rename() {
        let dir = std::env::temp_dir().join(format!("skiff-al-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.log");
        let target = Target::File(path.clone());
        send(&target, "one\n".into()).unwrap();
        let wait_for = |p: &PathBuf, want: &str| {
            for _ in 0..200 {
                if std::fs::read_to_string(p).is_ok_and(|s| s == want) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            panic!("{} never held {want:?}", p.display());
        };
        wait_for(&path, "one\n");
        let rotated = dir.join("a.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        assert!(reopen_all() >= 1);
        send(&target, "two\n".into()).unwrap();
        wait_for(&path, "two\n");
        wait_for(&rotated, "one\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
