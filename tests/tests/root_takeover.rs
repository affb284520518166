//! Root tests of `skiff run --takeover` and the graceful drain (issue 18): a second skiff
//! receives the running one's listening sockets and pins over the handover socket while a
//! client loop of short connections and 100 idle long-lived connections go through the proxy.
//! No connect fails, no connection is reset, the capture stays attached throughout, the old
//! skiff drains and exits. On SIGTERM, an HTTP request in flight to a slow backend completes
//! (its response says `Connection: close`) while new connects already follow the fail mode.
//!
//! Run: `cargo build -p skiff -p skiff-tests --bins && cargo test -p skiff-tests --features root
//! --test root_takeover -- --test-threads=1` (as root).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use skiff_tests::fastpath::http_chain;
use skiff_tests::{
    Cgroup, Child, Netns, TempYaml, admin_stat as stat, assert_no_programs_attached,
    bpftool_cgroup_tree, command_in, field, require_root, serial, sidecar_args,
    sigterm_and_wait as stop, skiff_run, spawn_testpeer, test_name, testpeer, testpeer_output,
    vip_bootstrap, wait_admin_ready as wait_ready,
};

struct Scenario {
    // Field order is drop order: processes first, then the files, cgroups and the netns.
    _backends: Vec<Child>,
    socket: SocketFile,
    cg: Cgroup,
    ns: Netns,
    bootstrap: TempYaml,
}

/// A netns with two echo backends behind the VIP 10.96.0.1:80 (tcp_proxy through skiff).
fn scenario(name: &str) -> Scenario {
    let env = require_root();
    let ns = Netns::new(name);
    let cg = Cgroup::new(&env, name);
    let backends = ["127.0.0.11:8080", "127.0.0.12:8080"]
        .iter()
        .map(|addr| spawn_testpeer(&ns, None, &["origdst", addr]))
        .collect();
    let bootstrap = TempYaml::new(name, &vip_bootstrap("takeover"));
    let socket = SocketFile(std::env::temp_dir().join(format!("{}.sock", test_name(name))));
    Scenario {
        _backends: backends,
        socket,
        cg,
        ns,
        bootstrap,
    }
}

/// Removes the handover socket file when the test ends, also on failure.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The socket file's identity (inode numbers alone are reused at once on tmpfs).
fn inode(p: &Path) -> Option<(u64, i64, i64)> {
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()))
}

fn attached(app: &Path, name: &str) -> bool {
    bpftool_cgroup_tree(app)
        .lines()
        .any(|l| l.split_whitespace().last() == Some(name))
}

/// Threads of `pid` whose effective or bounding capabilities exceed what a running skiff
/// keeps (`skiff::takeover::caps::run_time_set`), as `tid name CapEff CapBnd` lines.
fn threads_over_run_time_caps(pid: u32) -> Vec<String> {
    let keep = skiff::takeover::caps::run_time_set(false);
    let mut over = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .flatten()
    {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        let hex = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .expect(key)
        };
        let (eff, bnd) = (hex("CapEff:"), hex("CapBnd:"));
        if eff & !keep != 0 || bnd & !keep != 0 {
            let name = status.lines().next().unwrap_or("").to_string();
            over.push(format!(
                "{} {name} eff={eff:x} bnd={bnd:x}",
                t.file_name().to_string_lossy()
            ));
        }
    }
    over
}

/// One echo round on the held connections: (ok, the whole line).
fn round(hold: &mut Child) -> (u32, String) {
    hold.signal(nix::sys::signal::Signal::SIGUSR1);
    let line = hold.expect_line("round", Duration::from_secs(20));
    let ok = field(&line, "ok").and_then(|v| v.parse().ok()).unwrap_or(0);
    (ok, line)
}

#[test]
fn takeover_under_load_fails_no_connect_and_resets_no_connection() {
    let _g = serial();
    let mut s = scenario("takeover");
    let app = s.cg.child("app");
    let proxy_cg = s.cg.child_path("proxy");
    let sock = s.socket.0.to_str().expect("UTF-8 temp dir").to_string();
    // Fail-closed: a connect that skiff does not take is refused, so a gap would show.
    let base = sidecar_args(
        &app,
        &proxy_cg,
        &[
            "--fail-closed",
            "--handover-socket",
            &sock,
            "--drain-time",
            "60s",
        ],
    );
    let old = Child::spawn(skiff_run(&s.ns, &s.bootstrap).args(&base));
    wait_ready(&s.ns);
    let first_socket = inode(&s.socket.0).expect("the running skiff's handover socket");

    // 100 idle long-lived connections through the old skiff.
    let mut hold = Child::spawn(command_in(Some(&s.ns), Some(&app), testpeer()).args([
        "hold",
        "10.96.0.1:80",
        "--conns",
        "100",
    ]));
    hold.expect_line("held n=100", Duration::from_secs(20));
    let (ok, line) = round(&mut hold);
    assert_eq!(ok, 100, "before the takeover: {line}");
    // Started, skiff kept only the capabilities run time needs, on every thread.
    let over = threads_over_run_time_caps(old.pid());
    assert!(over.is_empty(), "threads with more capabilities: {over:#?}");

    let done = AtomicBool::new(false);
    let mut takeover_args = base.clone();
    takeover_args.extend(["--takeover", sock.as_str()]);
    let (results, detached, new) = std::thread::scope(|scope| {
        // The bounded client loop: short connections until the takeover is over.
        let loop_ = scope.spawn(|| {
            let mut results = Vec::new();
            let mut detached = 0;
            let deadline = Instant::now() + Duration::from_secs(60);
            while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
                let out = testpeer_output(
                    &s.ns,
                    Some(&app),
                    &[
                        "client",
                        "10.96.0.1:80",
                        "--bytes",
                        "2048",
                        "--timeout-ms",
                        "5000",
                    ],
                );
                if !attached(&app, "skiff_connect4") {
                    detached += 1;
                }
                results.push(out);
            }
            (results, detached)
        });
        std::thread::sleep(Duration::from_millis(300));
        let mut new = Child::spawn(skiff_run(&s.ns, &s.bootstrap).args(&takeover_args));
        // The successor binds its own handover socket once the old one drains.
        let deadline = Instant::now() + Duration::from_secs(30);
        while inode(&s.socket.0).is_none_or(|i| i == first_socket) {
            assert!(
                Instant::now() < deadline,
                "no takeover within 30 s: {:?}",
                new.try_line("", Duration::from_millis(1))
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Traffic keeps flowing for a while after the handover.
        std::thread::sleep(Duration::from_millis(1500));
        done.store(true, Ordering::SeqCst);
        let (results, detached) = loop_.join().expect("client loop");
        (results, detached, new)
    });
    let failed: Vec<&String> = results.iter().filter(|r| !r.starts_with("ok ")).collect();
    eprintln!(
        "client loop: {} connects during the takeover",
        results.len()
    );
    assert!(results.len() >= 5, "too few connects: {results:?}");
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        results.len()
    );
    assert!(
        results.iter().all(|r| field(r, "echoed") == Some("2048")),
        "{results:?}"
    );
    assert_eq!(detached, 0, "capture detached during the takeover");

    // The old skiff drains: its long-lived connections still echo.
    let (ok, line) = round(&mut hold);
    assert_eq!(ok, 100, "after the takeover: {line}");
    // The new skiff serves new connections (the admin is its alone now).
    let before = stat(&s.ns, "cluster.svc.upstream_cx_total");
    let out = testpeer_output(&s.ns, Some(&app), &["client", "10.96.0.1:80"]);
    assert!(out.starts_with("ok "), "{out}");
    assert_eq!(stat(&s.ns, "cluster.svc.upstream_cx_total"), before + 1);

    // Once its last connection closes, the old skiff exits well before --drain-time.
    let t = Instant::now();
    hold.signal(nix::sys::signal::Signal::SIGTERM);
    hold.expect_line("closed", Duration::from_secs(10));
    let (status, _) = old.wait(Duration::from_secs(20));
    assert!(status.success(), "old skiff: {status}");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());

    // The new skiff keeps the capture (the pins are its own now) and serves alone.
    assert!(attached(&app, "skiff_connect4"));
    for _ in 0..3 {
        let out = testpeer_output(&s.ns, Some(&app), &["client", "10.96.0.1:80"]);
        assert!(out.starts_with("ok "), "after the old skiff exited: {out}");
    }
    stop(new);
    assert_no_programs_attached(&app);
    assert!(
        !proxy_cg.exists(),
        "the successor removes the proxy cgroup it took over"
    );
}

#[test]
fn takeover_without_a_running_skiff_fails_and_a_failed_one_leaves_the_old_serving() {
    let _g = serial();
    let mut s = scenario("takeover-none");
    let app = s.cg.child("app");
    let proxy_cg = s.cg.child_path("proxy");
    let sock = s.socket.0.to_str().expect("UTF-8").to_string();
    let mut args = sidecar_args(&app, &proxy_cg, &["--takeover", &sock]);
    // Nobody listens: the new skiff says so and exits 1, attaching nothing.
    let out = skiff_run(&s.ns, &s.bootstrap)
        .args(&args)
        .output()
        .expect("run skiff");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("taking over from the running skiff"), "{err}");
    assert_no_programs_attached(&app);

    // A running skiff, and successors that fail: it serves on.
    args.truncate(args.len() - 2);
    args.extend(["--handover-socket", sock.as_str()]);
    let old = Child::spawn(skiff_run(&s.ns, &s.bootstrap).args(&args));
    wait_ready(&s.ns);
    // A successor that fails after swapping its programs in (a listener of its bootstrap
    // cannot bind: a backend holds the address): the gate stays open, the pins stay.
    let clash = TempYaml::new(
        "takeover-clash",
        &vip_bootstrap("takeover").replacen(
            "  listeners:\n",
            r#"  listeners:
  - name: clash
    address: { socket_address: { address: 127.0.0.11, port_value: 8080 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: clash
          cluster: svc
"#,
            1,
        ),
    );
    let mut clash_args = sidecar_args(&app, &proxy_cg, &["--takeover", &sock]);
    clash_args.extend(["--fail-closed"]);
    let out = skiff_run(&s.ns, &clash)
        .args(&clash_args)
        .output()
        .expect("run skiff");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("binding listener clash"), "{err}");
    assert!(attached(&app, "skiff_connect4"));
    for _ in 0..3 {
        let out = testpeer_output(&s.ns, Some(&app), &["client", "10.96.0.1:80"]);
        assert!(out.starts_with("ok "), "after a failed takeover: {out}");
    }
    assert!(
        s.socket.0.exists(),
        "the old skiff still accepts a successor"
    );
    stop(old);
    assert!(
        !s.socket.0.exists(),
        "a clean exit removes the handover socket"
    );
}

/// virtualOutbound with an HTTP connection manager for 10.96.0.1:80 (cluster `web`, a slow
/// HTTP backend at 127.0.0.11:8080) and passthrough for anything else.
fn http_bootstrap() -> String {
    r#"
node: { id: sidecar~127.0.0.1~drain.default~default.svc.cluster.local, cluster: drain }
admin: { address: { socket_address: { address: 127.0.0.1, port_value: 15000 } } }
static_resources:
  listeners:
  - name: virtualOutbound
    address: { socket_address: { address: 0.0.0.0, port_value: 15001 } }
    use_original_dst: true
    filter_chains:{HTTP_CHAIN}
    default_filter_chain:
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: PassthroughCluster
          cluster: PassthroughCluster
  clusters:
  - name: web
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: web
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.11, port_value: 8080 } } }
  - name: PassthroughCluster
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
"#
    .replace("{HTTP_CHAIN}", &http_chain("10.96.0.1", "web"))
}

#[test]
fn sigterm_drain_finishes_requests_in_flight_and_new_connects_follow_the_fail_mode() {
    let _g = serial();
    let env = require_root();
    let ns = Netns::new("drain");
    let mut cg = Cgroup::new(&env, "drain");
    let app = cg.child("app");
    let proxy_cg = cg.child_path("proxy");
    let httppeer = PathBuf::from(env!("CARGO_BIN_EXE_skiff-httppeer"));
    let mut web = Child::spawn(command_in(Some(&ns), None, &httppeer).args([
        "serve",
        "127.0.0.11:8080",
        "slow",
    ]));
    web.expect_line("ready", Duration::from_secs(5));
    let bootstrap = TempYaml::new("drain", &http_bootstrap());
    let args = sidecar_args(&app, &proxy_cg, &["--fail-closed", "--drain-time", "20s"]);
    let proxy = Child::spawn(skiff_run(&ns, &bootstrap).args(&args));
    wait_ready(&ns);
    let get = |path: &str| {
        let out = command_in(Some(&ns), Some(&app), &httppeer)
            .args(["get", "10.96.0.1:80", "web", path])
            .output()
            .expect("run http client");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let out = get("/");
    assert_eq!(field(&out, "status"), Some("200"), "{out}");
    assert_eq!(
        field(&out, "connection"),
        Some("-"),
        "kept alive before the drain: {out}"
    );

    std::thread::scope(|scope| {
        // A request in flight when the drain starts: the backend answers after 3 s.
        let slow = scope.spawn(|| get("/delay/3000"));
        std::thread::sleep(Duration::from_millis(700));
        let t = Instant::now();
        proxy.signal(nix::sys::signal::Signal::SIGTERM);
        std::thread::sleep(Duration::from_millis(300));
        // Draining: the gate is closed, a new connect follows the fail mode (refused).
        let out = testpeer_output(&ns, Some(&app), &["client", "10.96.0.1:80"]);
        assert!(
            out.contains("stage=connect"),
            "new connect during the drain: {out}"
        );
        assert_eq!(field(&out, "errno"), Some("111"), "{out}");
        let out = slow.join().expect("slow request");
        assert_eq!(field(&out, "status"), Some("200"), "in flight: {out}");
        assert_eq!(field(&out, "body"), Some("slow"), "{out}");
        assert_eq!(
            field(&out, "connection"),
            Some("close"),
            "HTTP/1.1 gets Connection: close after the response in flight: {out}"
        );
        // Its connection closed, so skiff exits without waiting out --drain-time.
        let (status, _) = proxy.wait(Duration::from_secs(15));
        assert!(status.success(), "skiff exited with {status}");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    });
    assert_no_programs_attached(&app);
}
