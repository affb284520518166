//! Shared harness for skiff's end-to-end tests.
//!
//! `direct_*` tests need no privilege. `root_*` tests use real cgroup v2, network namespaces
//! and BPF; they start with [`require_root`], which panics naming what is missing (never a
//! silent skip). Everything a root test creates is a Drop guard, so it is removed even when the
//! test panics:
//!
//! - [`Netns`]: `ip netns add skiff-test-<name>-<pid>` with only `lo` (up) and no route out,
//!   so addresses like 10.96.0.1 can never leave the machine.
//! - [`Cgroup`]: `<cgroup2>/skiff-test-<name>-<pid>` and children (`app`, `proxy`, ...).
//!   Drop only removes directories; it kills and moves nothing.
//! - [`Child`]: a spawned process killed by PID on drop, with its stdout readable line by line.
//!
//! [`command_in`] builds a command that runs inside a netns (`nsenter --net=/run/netns/NAME`,
//! not `ip netns exec`, which remounts /sys and hides cgroup2 and bpffs) and joins a cgroup
//! before exec. `skiff-testpeer` (this package's bin) is the echo server / client /
//! `SO_ORIGINAL_DST` reporter these tests drive; see its `--help`.
//!
//! `direct_*` tests run skiff ([`InProcessSkiff`], [`SkiffThread`]) and its control plane
//! ([`ControlPlane`]) inside the test process, on loopback ports from [`free_port`].
//!
//! Root tests change process-wide state (the process's cgroup), so run them serially:
//! `cargo test -p skiff-tests --features root --test root_bpf -- --test-threads=1`.

use std::{
    ffi::{CString, OsStr},
    fs,
    io::{BufRead, BufReader},
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

mod envoy;
pub mod fastpath;
pub mod pods;
pub mod tls;
pub mod xdp;
pub use envoy::{Envoy, envoy_ads_bootstrap, envoy_binary};
mod http;
pub use http::{
    SEED_SCENARIO, blocking_admin, blocking_backend, blocking_get, copy_seed_scenario, h1_client,
    h1_send, h2c_client, h2c_send, header_or, loopback_stat, serve_h2c, serve_http1,
};

/// What a root test needs, found by [`require_root`].
#[derive(Clone, Debug)]
pub struct RootEnv {
    /// The cgroup2 mount (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified` on hybrid hosts).
    pub cgroup2: PathBuf,
}

/// Checks the machine can run root tests and returns what it found. Panics naming what is
/// missing and how to get it. Mounts bpffs at /sys/fs/bpf when it is missing.
pub fn require_root() -> RootEnv {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "root tests need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN): run \
             `sudo -E cargo test -p skiff-tests --features root --test root_bpf -- --test-threads=1`"
        );
    }
    let cgroup2 = cgroup2_mount().unwrap_or_else(|| {
        panic!("root tests need a cgroup2 mount: `mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified`")
    });
    for (tool, package) in [
        ("bpftool", "bpftool"),
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
    ] {
        if !tool_exists(tool) {
            panic!("root tests need `{tool}` on PATH: `apt-get install -y {package}`");
        }
    }
    if !is_mount_point_of("/sys/fs/bpf", "bpf") {
        let _ = fs::create_dir_all("/sys/fs/bpf");
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            panic!("root tests need bpffs: `mount -t bpf bpf /sys/fs/bpf` failed");
        }
    }
    RootEnv { cgroup2 }
}

fn tool_exists(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

fn mountinfo() -> String {
    fs::read_to_string("/proc/self/mountinfo").unwrap_or_default()
}

/// The first cgroup2 mount point in /proc/self/mountinfo.
pub fn cgroup2_mount() -> Option<PathBuf> {
    mountinfo().lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(left.split_whitespace().nth(4)?))
    })
}

fn is_mount_point_of(path: &str, fstype: &str) -> bool {
    mountinfo().lines().any(|l| {
        l.split_once(" - ").is_some_and(|(left, right)| {
            left.split_whitespace().nth(4) == Some(path)
                && right.split_whitespace().next() == Some(fstype)
        })
    })
}

/// The name root tests give what they create: `skiff-test-<name>-<pid>`.
pub fn test_name(name: &str) -> String {
    format!("skiff-test-{name}-{}", std::process::id())
}

/// Runs a command to completion, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// === Netns ===

/// A network namespace with only `lo` (up) and no routes off the machine. Drop deletes it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// `ip netns add skiff-test-<name>-<pid>`, brings `lo` up and checks that `lo` is the only
    /// link and every route goes through it.
    pub fn new(name: &str) -> Netns {
        let name = test_name(name);
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        ns.assert_isolated();
        ns
    }

    /// Panics unless `lo` is the only link and every route uses it.
    pub fn assert_isolated(&self) {
        let links = run(Command::new("ip").args(["-n", &self.name, "-o", "link", "show"]));
        for line in links.lines() {
            let ifname = line.split(':').nth(1).map(str::trim).unwrap_or("");
            assert_eq!(
                ifname, "lo",
                "netns {} has a link besides lo: {line}",
                self.name
            );
        }
        for family in ["-4", "-6"] {
            let routes = run(Command::new("ip")
                .args(["-n", &self.name, family, "route", "show", "table", "all"]));
            for line in routes.lines() {
                assert!(
                    line.contains("dev lo"),
                    "netns {} has a route off loopback: {line}",
                    self.name
                );
            }
        }
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, what `nsenter --net=` takes.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Adds an address to `lo` (e.g. `10.96.0.1/32` to make a VIP reachable in this netns only).
    pub fn add_lo_addr(&self, cidr: &str) {
        run(Command::new("ip").args(["-n", &self.name, "addr", "add", cidr, "dev", "lo"]));
        self.assert_isolated();
    }

    /// Whether `ip netns list` shows a namespace named `name`.
    pub fn exists(name: &str) -> bool {
        Path::new("/run/netns").join(name).exists()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

// === Cgroup ===

/// A cgroup v2 directory created for a test, with children. Drop removes the children, then
/// the directory, retrying briefly while exiting processes leave; it kills and moves nothing.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    children: Vec<PathBuf>,
}

impl Cgroup {
    /// Creates `<cgroup2>/skiff-test-<name>-<pid>`.
    pub fn new(env: &RootEnv, name: &str) -> Cgroup {
        let path = env.cgroup2.join(test_name(name));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        Cgroup {
            path,
            children: Vec::new(),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the child cgroup `name` and returns its path.
    pub fn child(&mut self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        fs::create_dir(&p).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", p.display()));
        self.children.push(p.clone());
        p
    }

    /// The path of a child something else creates (removed on drop if it still exists).
    pub fn child_path(&mut self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        self.children.push(p.clone());
        p
    }

    /// The PIDs in a cgroup.
    pub fn procs(path: &Path) -> Vec<u32> {
        fs::read_to_string(path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

fn rmdir_retrying(p: &Path) {
    for _ in 0..40 {
        match fs::remove_dir(p) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => thread::sleep(Duration::from_millis(25)),
        }
    }
    eprintln!(
        "warning: could not remove cgroup {} (pids {:?})",
        p.display(),
        Cgroup::procs(p)
    );
}

/// skiff's default eBPF pin directory for a capture on the cgroup at `app`
/// (`/sys/fs/bpf/skiff/<cgroup id>`).
pub fn default_pin_dir(app: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    Ok(Path::new("/sys/fs/bpf/skiff").join(fs::metadata(app)?.ino().to_string()))
}

/// The names in the pin directory `dir`, sorted (empty when it does not exist).
pub fn pins(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Removes the default eBPF pin directory of the cgroup at `p` (`/sys/fs/bpf/skiff/<id>`),
/// which a skiff killed on this cgroup leaves behind.
fn remove_default_pins(p: &Path) {
    if let Ok(dir) = default_pin_dir(p)
        && dir.exists()
        && let Err(e) = fs::remove_dir_all(&dir)
    {
        eprintln!("warning: could not remove pins {}: {e}", dir.display());
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for c in self.children.iter().rev() {
            remove_default_pins(c);
            rmdir_retrying(c);
        }
        remove_default_pins(&self.path);
        rmdir_retrying(&self.path);
    }
}

// === Processes ===

/// A command running `program` inside `netns` (if given) via `nsenter --net=...`, joining
/// `cgroup` (if given) between fork and exec by writing `0` to its `cgroup.procs`. Sockets the
/// program creates belong to that cgroup.
pub fn command_in(
    netns: Option<&Netns>,
    cgroup: Option<&Path>,
    program: impl AsRef<OsStr>,
) -> Command {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.path().display()))
                .arg("--")
                .arg(program);
            c
        }
        None => Command::new(program),
    };
    if let Some(cg) = cgroup {
        let procs = CString::new(cg.join("cgroup.procs").as_os_str().as_bytes())
            .expect("cgroup path has no NUL");
        // SAFETY: the closure only calls async-signal-safe functions (open, write, close) on
        // memory allocated before fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if n != 1 {
                    return Err(err);
                }
                Ok(())
            });
        }
    }
    cmd
}

/// The path of a binary built in this workspace's target directory (`target/<profile>/<name>`),
/// for binaries of other packages and this package's own bins alike (cargo builds those before
/// the tests run). Panics with the build command if missing.
pub fn built_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let p = profile_dir.join(name);
    if !p.is_file() {
        panic!(
            "{} is missing: run `cargo build --bin {name}` first",
            p.display()
        );
    }
    p
}

/// A spawned process, killed by PID (and reaped) on drop. Its stdout is read line by line
/// from a background thread.
#[derive(Debug)]
pub struct Child {
    child: std::process::Child,
    what: String,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Child {
    /// Spawns `cmd` with stdout piped (stderr inherited, so it shows in test output).
    pub fn spawn(cmd: &mut Command) -> Child {
        let what = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Child {
            child,
            what,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` to this process (by its PID only).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig)
            .unwrap_or_else(|e| panic!("{sig} to {}: {e}", self.what));
    }

    /// Waits up to `timeout` for the next stdout line that starts with `prefix` (lines before
    /// it are kept in [`Child::seen`]). Panics on timeout or exit.
    pub fn expect_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "{}: no line starting with {prefix:?} within {timeout:?} ({e}); seen: {:?}",
                    self.what, self.seen
                ),
            }
        }
    }

    /// Like [`Child::expect_line`], but `None` instead of a panic when no such line comes
    /// within `timeout` (to count lines that may or may not come).
    pub fn try_line(&mut self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).ok()?;
            self.seen.push(line.clone());
            if line.starts_with(prefix) {
                return Some(line);
            }
        }
    }

    /// Every stdout line read so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// Waits up to `timeout` for exit; returns the status and the remaining stdout. Panics
    /// (after killing it) on timeout.
    pub fn wait(mut self, timeout: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                let mut out: Vec<String> = std::mem::take(&mut self.seen);
                // The reader thread ends at EOF; give it a moment to deliver the last lines.
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    out.push(l);
                }
                return (status, out.join("\n"));
            }
            if Instant::now() >= deadline {
                panic!("{} did not exit within {timeout:?}", self.what);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Kill only the process this guard started, by its PID.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// === BPF inspection ===

/// `bpftool cgroup tree <path>`: the programs attached at or below `path`.
pub fn bpftool_cgroup_tree(path: &Path) -> String {
    run(Command::new("bpftool").arg("cgroup").arg("tree").arg(path))
}

/// Panics if any BPF program is attached at or below `path`.
pub fn assert_no_programs_attached(path: &Path) {
    let tree = bpftool_cgroup_tree(path);
    let attached: Vec<&str> = tree
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|w| w.chars().all(|c| c.is_ascii_digit()))
        })
        .collect();
    assert!(
        attached.is_empty(),
        "programs still attached under {}:\n{tree}",
        path.display()
    );
}

/// Parses `key=value` words of a testpeer output line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

// === skiff inside a test netns ===

/// Runs `f` on a thread that has entered `ns` (only that thread changes namespace).
pub fn in_netns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = ns.path();
    thread::spawn(move || {
        let file = fs::File::open(&path).expect("open netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread panicked")
}

/// One HTTP/1.0 request to skiff's admin (127.0.0.1:15000) inside `ns`: `(status, body)`, or
/// `None` when nothing answers yet.
pub fn admin(ns: &Netns, method: &str, path: &str) -> Option<(u16, String)> {
    admin_on(ns, 15000, method, path)
}

/// Like [`admin`], for a skiff whose admin listens on 127.0.0.1:`port` (a second skiff in the
/// same netns cannot take 15000).
pub fn admin_on(ns: &Netns, port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let req = format!("{method} {path} HTTP/1.0\r\nHost: admin\r\nContent-Length: 0\r\n\r\n");
    in_netns(ns, move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(req.as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let status = out.split_whitespace().nth(1)?.parse().ok()?;
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
        Some((status, body))
    })
}

/// One counter or gauge from skiff's `/stats` inside `ns` (0 when absent).
pub fn admin_stat(ns: &Netns, name: &str) -> u64 {
    let (_, body) = admin(ns, "GET", "/stats").expect("admin /stats");
    stat_value(&body, name)
}

/// The value of `name` in an Envoy-format `/stats` text body (0 when absent).
pub fn stat_value(body: &str, name: &str) -> u64 {
    body.lines()
        .find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(": ")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// An Envoy/skiff bootstrap whose whole config comes over ADS (`api`: `GRPC` or `DELTA_GRPC`)
/// from the server at `xds`, with the admin on 127.0.0.1:`admin`.
pub fn ads_bootstrap(api: &str, node: &str, xds: std::net::SocketAddr, admin: u16) -> String {
    format!(
        r#"
node: {{ id: "sidecar~127.0.0.1~{node}.default~default.svc.cluster.local", cluster: {node} }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}
dynamic_resources:
  ads_config:
    api_type: {api}
    transport_api_version: V3
    grpc_services: [ {{ envoy_grpc: {{ cluster_name: xds }} }} ]
  lds_config: {{ ads: {{}} }}
  cds_config: {{ ads: {{}} }}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: xds
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }} }} ] }} ]
"#,
        xds.ip(),
        xds.port()
    )
}

/// Waits up to 20 s for skiff's `/ready` inside `ns` to answer 200.
pub fn wait_admin_ready(ns: &Netns) {
    wait_admin_ready_on(ns, 15000)
}

/// Like [`wait_admin_ready`], for a skiff whose admin listens on 127.0.0.1:`port`.
pub fn wait_admin_ready_on(ns: &Netns, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some((200, _)) = admin_on(ns, port, "GET", "/ready") {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "skiff (admin port {port}) in netns {} not ready within 20s",
        ns.name()
    );
}

// === skiff and testpeer processes in a test netns ===

/// `skiff-testpeer`, this package's echo server / client / `SO_ORIGINAL_DST` reporter (cargo
/// builds it next to the test binaries).
pub fn testpeer() -> PathBuf {
    built_binary("skiff-testpeer")
}

/// Spawns `skiff-testpeer ARGS` (a server: `origdst ADDR`, `echo ADDR`) inside `ns`, in
/// `cgroup` if given, and waits up to 5 s for its `ready` line.
pub fn spawn_testpeer(ns: &Netns, cgroup: Option<&Path>, args: &[&str]) -> Child {
    let mut peer = Child::spawn(command_in(Some(ns), cgroup, testpeer()).args(args));
    peer.expect_line("ready", Duration::from_secs(5));
    peer
}

/// Runs `skiff-testpeer ARGS` (usually `client ADDR ...`) inside `ns`, in `cgroup` if given
/// (so the capture sees it), to completion; returns its stdout trimmed (`ok ...`/`err ...`).
pub fn testpeer_output(ns: &Netns, cgroup: Option<&Path>, args: &[&str]) -> String {
    let out = command_in(Some(ns), cgroup, testpeer())
        .args(args)
        .output()
        .expect("run testpeer");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `--cgroup <app> --proxy-cgroup <proxy>` (skiff's sidecar capture) followed by `more`.
pub fn sidecar_args<'a>(app: &'a Path, proxy: &'a Path, more: &[&'a str]) -> Vec<&'a str> {
    let path = |p: &'a Path| p.to_str().expect("cgroup paths are UTF-8");
    let mut args = vec!["--cgroup", path(app), "--proxy-cgroup", path(proxy)];
    args.extend_from_slice(more);
    args
}

/// `skiff run --bootstrap <bootstrap> --admin-mutations` (the workspace's built binary) inside
/// `ns`, with `RUST_LOG=info,skiff=debug`; callers add flags (and may override `RUST_LOG`).
/// Tests drive the admin API's state changes (`/drain_listeners`, `skiff node`), which skiff
/// refuses without `--admin-mutations`.
pub fn skiff_run(ns: &Netns, bootstrap: &Path) -> Command {
    let mut c = command_in(Some(ns), None, built_binary("skiff"));
    c.arg("run")
        .arg("--bootstrap")
        .arg(bootstrap)
        .arg("--admin-mutations")
        .env("RUST_LOG", "info,skiff=debug");
    c
}

/// Runs `skiff node ARGS` (talks to the node-mode skiff's admin) inside `ns`, asserts it
/// succeeds and returns its stdout.
pub fn skiff_node(ns: &Netns, args: &[&str]) -> String {
    let out = command_in(Some(ns), None, built_binary("skiff"))
        .arg("node")
        .args(args)
        .output()
        .expect("run skiff node");
    assert!(
        out.status.success(),
        "skiff node {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sends SIGTERM to `p` and asserts it exits 0 within 15 s: SIGTERM, not kill, because skiff
/// must drain, detach its programs and remove its rules and proxy cgroup by itself.
pub fn sigterm_and_wait(p: Child) {
    p.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, _) = p.wait(Duration::from_secs(15));
    assert!(status.success(), "skiff exited with {status}");
}

/// A file in the temp dir named `skiff-test-<name>-<pid>-<n>.yaml`, removed on drop (also when
/// the test panics). Derefs to its path.
#[derive(Debug)]
pub struct TempYaml {
    path: PathBuf,
}

impl TempYaml {
    /// Writes `text` to a new temp file for `name`.
    pub fn new(name: &str, text: &str) -> TempYaml {
        // A sequence number keeps two files of the same name in one process apart.
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("{}-{n}.yaml", test_name(name)));
        fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        TempYaml { path }
    }
}

impl std::ops::Deref for TempYaml {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for TempYaml {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<OsStr> for TempYaml {
    fn as_ref(&self) -> &OsStr {
        self.path.as_os_str()
    }
}

impl Drop for TempYaml {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Creates a veth pair inside `a` (device `a_dev`, address `a_cidr`) whose peer moves straight
/// into `b` (`b_dev`, `b_cidr`), and brings both up: the pair never exists in this machine's
/// own namespace, and deleting either netns removes it.
pub fn veth_pair(a: &Netns, a_dev: &str, a_cidr: &str, b: &Netns, b_dev: &str, b_cidr: &str) {
    run(Command::new("ip").args([
        "-n",
        a.name(),
        "link",
        "add",
        a_dev,
        "type",
        "veth",
        "peer",
        "name",
        b_dev,
        "netns",
        b.name(),
    ]));
    for (ns, dev, cidr) in [(a, a_dev, a_cidr), (b, b_dev, b_cidr)] {
        run(Command::new("ip").args(["-n", ns.name(), "addr", "add", cidr, "dev", dev]));
        run(Command::new("ip").args(["-n", ns.name(), "link", "set", dev, "up"]));
    }
}

/// Istio's sidecar outbound bootstrap for node `node` (admin on 127.0.0.1:15000): the
/// virtualOutbound listener on :15001 sends VIPs 10.96.0.1:80 and [fd00:96::1]:80 to cluster
/// `svc` (127.0.0.11:8080 and 127.0.0.12:8080, round robin) and everything else to
/// PassthroughCluster (ORIGINAL_DST).
pub fn vip_bootstrap(node: &str) -> String {
    format!(
        r#"
node: {{ id: sidecar~127.0.0.1~{node}.default~default.svc.cluster.local, cluster: {node} }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 15000 }} }} }}
static_resources:
  listeners:
  - name: virtualOutbound
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: 15001 }} }}
    use_original_dst: true
    filter_chains:
    - name: vip-v4
      filter_chain_match:
        destination_port: 80
        prefix_ranges: [{{ address_prefix: 10.96.0.1, prefix_len: 32 }}]
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: svc
          cluster: svc
    - name: vip-v6
      filter_chain_match:
        destination_port: 80
        prefix_ranges: [{{ address_prefix: "fd00:96::1", prefix_len: 128 }}]
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: svc
          cluster: svc
    default_filter_chain:
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: PassthroughCluster
          cluster: PassthroughCluster
  clusters:
  - name: svc
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: svc
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.11, port_value: 8080 }} }} }}
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.12, port_value: 8080 }} }} }}
  - name: PassthroughCluster
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
"#
    )
}

/// A bootstrap with node id `node_id` (cluster `cluster`), admin on 127.0.0.1:15000 and only
/// PassthroughCluster: for a skiff whose listeners do not matter to the test (node mode, or
/// capture that must merely attach).
pub fn passthrough_bootstrap(node_id: &str, cluster: &str) -> String {
    format!(
        r#"
node: {{ id: {node_id}, cluster: {cluster} }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 15000 }} }} }}
static_resources:
  clusters:
  - name: PassthroughCluster
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
"#
    )
}

/// A loopback TCP port that was free a moment ago (for in-process servers in direct tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

/// Serialises the root tests of one test binary: they share the machine's attach points and
/// fixed ports inside their namespaces. A panicking test does not poison the others.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// One item of a bootstrap's `static_resources.listeners` YAML: listener `name` on
/// 127.0.0.1:`port` whose only filter is a tcp_proxy to `cluster`. Ends with the `cluster:`
/// line, so a caller may append more tcp_proxy fields (indented 10 spaces).
pub fn tcp_proxy_listener_yaml(name: &str, port: u16, stat_prefix: &str, cluster: &str) -> String {
    format!(
        r#"  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {stat_prefix}
          cluster: {cluster}
"#
    )
}

/// The `lb_endpoints` items of a static cluster's YAML for `endpoints`, one line each,
/// indented for `load_assignment.endpoints[0].lb_endpoints`.
pub fn lb_endpoints_yaml(endpoints: &[std::net::SocketAddr]) -> String {
    endpoints
        .iter()
        .map(|e| {
            format!(
                "        - endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }}\n",
                e.ip(),
                e.port()
            )
        })
        .collect()
}

/// [`free_port`] as a 127.0.0.1 address (for something that must not answer, or a server to
/// start later on a known address).
pub fn free_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], free_port()))
}

// === skiff and its control plane in-process (direct tests) ===

/// How long an in-process skiff or control plane may take to bind or to stop.
const IN_PROCESS_WAIT: Duration = Duration::from_secs(15);

/// Options for skiff in-process on `bootstrap`: no capture, the capture listener on a free
/// loopback port (nothing is redirected to it), the bootstrap's admin and a 200 ms drain.
/// Tests change fields (`admin`, `drain`) as they need.
pub fn run_options(bootstrap: skiff::config::Bootstrap) -> skiff::app::RunOptions {
    skiff::app::RunOptions {
        admin: bootstrap.admin,
        admin_options: Default::default(),
        bootstrap,
        capture: None,
        outbound_v4: std::net::SocketAddrV4::new([127, 0, 0, 1].into(), free_port()),
        outbound_v6: None,
        upstream_mark: None,
        drain: Duration::from_millis(200),
        // Two workers: every in-process test runs the per-worker listeners.
        concurrency: 2,
        cpu_affinity: Default::default(),
    }
}

/// A oneshot pair whose receiver, as a future, is skiff's or the control plane's shutdown
/// signal (it also fires when the sender is dropped).
fn shutdown_signal() -> (
    tokio::sync::oneshot::Sender<()>,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}

/// Fires `stop`, then waits up to 15 s for `task` to end: `Err` when it failed, panicked or
/// still runs.
async fn stop_task(
    what: &str,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: &mut tokio::task::JoinHandle<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    if let Some(s) = stop {
        let _ = s.send(());
    }
    match tokio::time::timeout(IN_PROCESS_WAIT, task).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(anyhow::anyhow!("{what} task: {e}")),
        Err(_) => Err(anyhow::anyhow!(
            "{what} did not stop within {IN_PROCESS_WAIT:?}"
        )),
    }
}

/// skiff (`skiff::app::run`) running as a task on the current tokio runtime.
#[derive(Debug)]
pub struct InProcessSkiff {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcessSkiff {
    /// Spawns skiff with `opts`; it runs until [`InProcessSkiff::stop`].
    pub fn start(opts: skiff::app::RunOptions) -> InProcessSkiff {
        let (stop, shutdown) = shutdown_signal();
        InProcessSkiff {
            stop: Some(stop),
            task: tokio::spawn(skiff::app::run(opts, shutdown)),
        }
    }

    /// Shuts skiff down and waits up to 15 s: `Err` when it failed, panicked or still runs
    /// (callers that only tidy up ignore it, the others unwrap it).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        stop_task("skiff", self.stop.take(), &mut self.task).await
    }
}

/// skiff (`skiff::app::run`) on its own thread and 2-worker tokio runtime, for tests that
/// drive it with blocking I/O from the test thread.
#[derive(Debug)]
pub struct SkiffThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: thread::JoinHandle<anyhow::Result<()>>,
}

impl SkiffThread {
    /// Starts skiff with `opts` on a new thread; it runs until [`SkiffThread::stop`].
    pub fn start(opts: skiff::app::RunOptions) -> SkiffThread {
        let (stop, shutdown) = shutdown_signal();
        let thread = thread::spawn(move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(skiff::app::run(opts, shutdown))
        });
        SkiffThread {
            stop: Some(stop),
            thread,
        }
    }

    /// Shuts skiff down and joins its thread: `Err` when it failed or panicked.
    pub fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.thread
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("skiff thread panicked")))
    }
}

/// `skiff control-plane` (`skiff::controlplane::serve`) running as a task on the current tokio
/// runtime.
#[derive(Debug)]
pub struct ControlPlane {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl ControlPlane {
    /// Serves `source` on `listen` (port 0: any free port) and returns once it is bound. It
    /// polls the source every 50 ms, so a test's file edits are pushed at once.
    pub async fn start(source: skiff::controlplane::Source, listen: std::net::SocketAddr) -> Self {
        let mut opts = skiff::controlplane::ControlPlaneOptions::new(source);
        opts.listen = listen;
        opts.poll_interval = Duration::from_millis(50);
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let (stop, shutdown) = shutdown_signal();
        let served = skiff::controlplane::serve(
            opts,
            move |addr| {
                let _ = bound_tx.send(addr);
            },
            shutdown,
        );
        let task = tokio::spawn(async move { Ok(served.await?) });
        let addr = tokio::time::timeout(IN_PROCESS_WAIT, bound_rx)
            .await
            .expect("control plane did not bind in time")
            .expect("control plane failed before binding");
        ControlPlane {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// The address it serves on.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Stops it and waits up to 15 s: `Err` when it failed, panicked or still runs.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        stop_task("control plane", self.stop.take(), &mut self.task).await
    }
}

/// A loopback TCP backend that answers each connection with `<name>:` and everything it read,
/// closing only after the client's EOF (so a proxied half-close is proven to reach it).
pub async fn echo_backend(name: &'static str) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp_backend(move |mut s| async move {
        let mut buf = Vec::new();
        if s.read_to_end(&mut buf).await.is_ok() {
            let _ = s.write_all(format!("{name}:").as_bytes()).await;
            let _ = s.write_all(&buf).await;
            let _ = s.shutdown().await;
        }
    })
    .await
}

/// A loopback TCP backend on a free port running `serve` on each connection in a task of its
/// own; returns its address.
async fn tcp_backend<F, Fut>(serve: F) -> std::net::SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = l.local_addr().expect("backend address");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve(s));
        }
    });
    addr
}

/// A loopback TCP backend that writes `<name>` to each connection and closes it.
pub async fn named_backend(name: &'static str) -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    tcp_backend(move |mut s| async move {
        let _ = s.write_all(name.as_bytes()).await;
        let _ = s.shutdown().await;
    })
    .await
}

/// What a connection to 127.0.0.1:`port` reads until EOF (2 s at most); `None` when refused,
/// timed out or empty.
pub async fn tcp_ask(port: u16) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut out))
        .await
        .ok()?
        .ok()?;
    (!out.is_empty()).then_some(out)
}

/// Retries [`tcp_ask`] on `port` for up to 15 s until it answers `want` (configuration
/// propagates asynchronously); panics with the last answer otherwise.
pub async fn eventually_answers(port: u16, want: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = None;
    while Instant::now() < deadline {
        last = tcp_ask(port).await;
        if last.as_deref() == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("port {port}: wanted {want:?}, last answer {last:?}");
}

/// Resources of the `tests/fixtures/xds` dumps that skiff refuses under the honour-or-refuse
/// rule (docs/COMPATIBILITY.md): (file, resource name, what the refusal must name). Istio's ambient/waypoint plumbing (internal
/// listeners, CONNECT tunnels, `internal_upstream`), CUSTOM authorization and OSM's Lua/Wasm are
/// refused rather than served differently from Envoy; their mTLS (auto-mTLS clusters, TLS
/// filter chains) is honoured.
pub const FIXTURE_REFUSALS: &[(&str, &str, &str)] = &[
    // The internal listener selects chains with the xDS matcher API.
    (
        "istio-proxyconfig-full.json",
        "main_internal",
        "filter_chain_matcher",
    ),
    (
        "istio-compare-before.json",
        "main_internal",
        "filter_chain_matcher",
    ),
    // Clusters reaching internal listeners.
    (
        "istio-proxyconfig-full.json",
        "inbound-vip|8000|http|httpbin.default.svc.cluster.local",
        "InternalUpstreamTransport",
    ),
    (
        "istio-compare-before.json",
        "inbound-vip|9080|http|ratings.default.svc.cluster.local",
        "InternalUpstreamTransport",
    ),
    // HBONE origination: tcp_proxy tunnelling over HTTP CONNECT, which skiff does not run
    // (served as plain TCP it would send the raw bytes).
    (
        "istio-compare-before.json",
        "connect_originate",
        "typed_config.tunneling_config",
    ),
    // HBONE termination: CONNECT routes (then filter state).
    (
        "istio-compare-before.json",
        "connect_terminate",
        "connect_matcher",
    ),
    (
        "istio-sidecar-listeners-27.yaml",
        "connect_terminate",
        "connect_matcher",
    ),
    (
        "istio-sidecar-listeners-27.yaml",
        "main_internal",
        "set_dst_address",
    ),
    (
        "istio-sidecar-listeners-27.yaml",
        "connect_originate",
        "set_dst_address",
    ),
    // Its HTTP RBAC policies also require JWT claims (`istio_authn` dynamic metadata), which
    // skiff's RBAC cannot evaluate (it also carries a CUSTOM AuthorizationPolicy's ext_authz):
    // refusing keeps either from letting everything through.
    (
        "istio-sidecar-listeners-27.yaml",
        "virtualInbound",
        "dynamic metadata is not supported by skiff's RBAC",
    ),
    // OSM: Lua and Wasm filters.
    (
        "osm-curl-egress-config-dump.json",
        "outbound-listener",
        "envoy.filters.http.lua",
    ),
];
