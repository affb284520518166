//! `cargo xtask test`: every test, unprivileged and root, the same way on a laptop and in CI.

use std::path::Path;
use std::process::Command;

use crate::ebpf_recipe::build_ebpf;
use crate::util::{cgroup2_mount, is_root, run as sh, workspace_root};

/// Name prefixes of everything tests and the demo create (netns, cgroups).
pub const PREFIXES: [&str; 2] = ["skiff-test-", "skiff-demo-"];

/// Install, build the eBPF object once, then run unit, integration and root tests.
pub fn run() -> anyhow::Result<()> {
    if !is_root() {
        anyhow::bail!(
            "the root eBPF tests load BPF programs and create cgroups and network namespaces: \
             run `cargo xtask test` as root"
        );
    }
    crate::setup::run()?;
    let root = workspace_root();
    let obj = build_ebpf(&root, true).map_err(|e| anyhow::anyhow!(e))?;
    let cargo = || {
        let mut c = Command::new(env!("CARGO"));
        c.current_dir(&root).env("SKIFF_EBPF_OBJ", &obj);
        c
    };
    // The end-to-end tests run the real binaries (`skiff`, the test peers): built first, since
    // `cargo test` builds only the binaries of the crate under test.
    sh(cargo().args(["build", "-p", "skiff", "-p", "skiff-tests", "--bins"]))?;
    // Unit tests and unprivileged end-to-end tests.
    sh(cargo().args(["test", "--workspace", "--exclude", "skiff-ebpf"]))?;
    // Root tests: real BPF, cgroups and network namespaces; serial, since a process's cgroup
    // and the machine's attach points are shared state.
    sh(cargo().args([
        "test",
        "-p",
        "skiff-tests",
        "--features",
        "root",
        "--test",
        "root_bpf",
        "--test",
        "root_e2e",
        "--test",
        "root_fastpath",
        "--test",
        "root_fastpath_eds",
        "--test",
        "root_fastpath_health",
        "--test",
        "root_fastpath_pods",
        "--test",
        "root_fastpath_lb",
        "--test",
        "root_fastpath_terminate",
        "--test",
        "root_fastpath_v6",
        "--test",
        "root_fastpath_udp",
        "--test",
        "root_events",
        "--test",
        "root_sockmap",
        "--test",
        "root_xdp",
        "--test",
        "root_iptables",
        "--test",
        "root_inbound",
        "--test",
        "root_coexist",
        "--test",
        "root_pods",
        "--test",
        "root_pinning",
        "--test",
        "root_takeover",
        "--",
        "--test-threads=1",
    ]))?;
    Ok(())
}

/// Remove leftovers of crashed tests: their network namespaces and cgroups (and the processes
/// still inside those cgroups, which only tests started).
pub fn clean_env() -> anyhow::Result<()> {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if PREFIXES.iter().any(|p| name.starts_with(p)) {
                let _ = sh(Command::new("ip").args(["netns", "del", name]));
            }
        }
    }
    let cg = cgroup2_mount()?;
    for entry in std::fs::read_dir(&cg)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if PREFIXES.iter().any(|p| name.starts_with(p)) {
            remove_pins_of(&entry.path());
            remove_cgroup_tree(&entry.path());
        }
    }
    Ok(())
}

/// Removes skiff's pins (`/sys/fs/bpf/skiff/<cgroup id>`, the pinned links and maps a killed
/// skiff leaves) of the test cgroup tree at `dir`: unpinned links detach with their last fd.
fn remove_pins_of(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    if let Ok(m) = std::fs::metadata(dir) {
        let pins = Path::new("/sys/fs/bpf/skiff").join(m.ino().to_string());
        if pins.exists() && std::fs::remove_dir_all(&pins).is_ok() {
            eprintln!("removed pins {}", pins.display());
        }
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten().filter(|e| e.path().is_dir()) {
            remove_pins_of(&e.path());
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            eprintln!("removed cgroup {}", dir.display());
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    eprintln!("could not remove cgroup {}", dir.display());
}
