//! `bench --profile CASE`: `perf record -g` on the skiff process during one case, rendered as a
//! flame graph SVG (folded with `inferno`) and `perf report --no-children` text, in the run dir.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use inferno::collapse::Collapse;

use super::env::Proc;

/// Sampling frequency: odd, so it does not beat with the kernel's or the runtime's timers.
const FREQ: &str = "499";

/// A running `perf record` attached to one process.
pub struct Recording {
    perf: Proc,
    data: PathBuf,
    stem: String,
    dir: PathBuf,
}

/// Attach `perf record -g` to `pid` (all its threads); files are named `profile-STEM.*` in `dir`.
pub fn start(pid: u32, dir: &Path, stem: &str) -> anyhow::Result<Recording> {
    let perf = super::tools::require("perf").context("--profile records with perf")?;
    let data = dir.join(format!("profile-{stem}.perf.data"));
    let log = dir.join("logs").join(format!("perf-record-{stem}.log"));
    let p = Proc::spawn(
        "perf record",
        Command::new(perf)
            .args(["record", "-g", "-F", FREQ, "-p", &pid.to_string(), "-o"])
            .arg(&data),
        &log,
    )?;
    // perf attaches to every thread before the first sample; give it that moment.
    std::thread::sleep(Duration::from_millis(300));
    Ok(Recording {
        perf: p,
        data,
        stem: stem.to_string(),
        dir: dir.to_path_buf(),
    })
}

impl Recording {
    /// Stop recording and write `profile-STEM.svg`, `profile-STEM.folded` and
    /// `profile-STEM.report.txt`; returns the SVG's path.
    pub fn finish(self, title: &str) -> anyhow::Result<PathBuf> {
        let Recording {
            perf,
            data,
            stem,
            dir,
        } = self;
        // SIGTERM makes perf record flush and close the data file (Proc's drop waits for it).
        drop(perf);
        if !data.is_file() {
            bail!(
                "perf wrote no {} (see logs/perf-record-{stem}.log)",
                data.display()
            );
        }
        let perf = super::tools::require("perf")?;
        let script = Command::new(&perf)
            .arg("script")
            .arg("-i")
            .arg(&data)
            .stderr(Stdio::null())
            .output()
            .context("running perf script")?;
        if !script.status.success() {
            bail!("perf script failed on {}", data.display());
        }
        let mut folded = Vec::new();
        inferno::collapse::perf::Folder::default()
            .collapse(BufReader::new(&script.stdout[..]), &mut folded)
            .context("folding perf script output")?;
        let folded_path = dir.join(format!("profile-{stem}.folded"));
        std::fs::write(&folded_path, &folded)?;
        let svg = dir.join(format!("profile-{stem}.svg"));
        let mut opts = inferno::flamegraph::Options::default();
        opts.title = title.to_string();
        opts.count_name = "samples".into();
        let text = String::from_utf8_lossy(&folded);
        let file = std::fs::File::create(&svg)?;
        inferno::flamegraph::from_lines(&mut opts, text.lines(), std::io::BufWriter::new(file))
            .context("rendering the flame graph")?;
        let report = Command::new(&perf)
            .arg("report")
            .arg("-i")
            .arg(&data)
            .args([
                "--no-children",
                "--stdio",
                "-g",
                "none",
                "--percent-limit",
                "0.5",
                "--sort",
                "dso,symbol",
            ])
            .stderr(Stdio::null())
            .output()
            .context("running perf report")?;
        std::fs::write(
            dir.join(format!("profile-{stem}.report.txt")),
            &report.stdout,
        )?;
        eprintln!("bench: profile of {stem}: {}", svg.display());
        Ok(svg)
    }
}
