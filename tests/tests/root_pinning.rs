//! Root tests of pinned capture (issue 18): a killed skiff leaves its programs attached through
//! bpffs pins, new connects follow the fail mode (the kernel sees the proxy's listener is gone),
//! the fast path keeps serving, a restarted skiff takes the pins over and proxies again, a
//! clean shutdown leaves nothing, and `skiff cleanup` removes what a crash left.
//!
//! Run: `cargo build -p skiff -p skiff-tests --bins && cargo test -p skiff-tests --features root
//! --test root_pinning -- --test-threads=1` (as root).

use std::path::{Path, PathBuf};
use std::time::Duration;

use skiff_tests::{
    Cgroup, Child, Netns, TempYaml, admin_stat as stat, assert_no_programs_attached,
    bpftool_cgroup_tree, built_binary, command_in, default_pin_dir, field, pins, require_root,
    serial, sidecar_args, sigterm_and_wait as stop, skiff_run, spawn_testpeer, testpeer_output,
    vip_bootstrap, wait_admin_ready as wait_ready,
};

struct Scenario {
    // Field order is drop order: processes first, then cgroups, the netns and the bootstrap.
    _backends: Vec<Child>,
    direct: Child,
    ns: Netns,
    cg: Cgroup,
    bootstrap: TempYaml,
}

/// A netns with two backends behind the VIP 10.96.0.1:80 and a "real" 10.96.0.2:80 host that
/// only passthrough or uncaptured connects reach.
fn scenario(name: &str) -> Scenario {
    let env = require_root();
    let ns = Netns::new(name);
    ns.add_lo_addr("10.96.0.2/32");
    let cg = Cgroup::new(&env, name);
    let backends = ["127.0.0.11:8080", "127.0.0.12:8080"]
        .iter()
        .map(|addr| spawn_testpeer(&ns, None, &["origdst", addr]))
        .collect();
    let direct = spawn_testpeer(&ns, None, &["origdst", "10.96.0.2:80"]);
    let bootstrap = TempYaml::new(name, &vip_bootstrap("pin"));
    Scenario {
        _backends: backends,
        direct,
        ns,
        cg,
        bootstrap,
    }
}

fn client(ns: &Netns, cgroup: &Path, addr: &str) -> String {
    testpeer_output(
        ns,
        Some(cgroup),
        &["client", addr, "--bytes", "4096", "--timeout-ms", "3000"],
    )
}

fn skiff(s: &Scenario, args: &[&str]) -> Child {
    Child::spawn(skiff_run(&s.ns, &s.bootstrap).args(args))
}

/// SIGKILL: no drain, no drop, nothing undone.
fn kill9(p: Child) {
    p.signal(nix::sys::signal::Signal::SIGKILL);
    let (status, _) = p.wait(Duration::from_secs(10));
    assert!(!status.success(), "skiff was killed: {status}");
}

/// The id of the program named `name` attached to `cgroup` (`bpftool cgroup tree`); panics
/// unless exactly one is.
fn attached_id(cgroup: &Path, name: &str) -> u32 {
    let tree = bpftool_cgroup_tree(cgroup);
    let ids: Vec<u32> = tree
        .lines()
        .filter(|l| l.split_whitespace().last() == Some(name))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(ids.len(), 1, "{name} on {}:\n{tree}", cgroup.display());
    ids[0]
}

/// `skiff cleanup ARGS` inside `ns`: (success, stdout + stderr).
fn cleanup(ns: &Netns, args: &[&str]) -> (bool, String) {
    let out = command_in(Some(ns), None, built_binary("skiff"))
        .arg("cleanup")
        .args(args)
        .output()
        .expect("run skiff cleanup");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn killed_skiff_keeps_capture_fails_open_and_a_restart_takes_over() {
    let _g = serial();
    let mut s = scenario("pin-restart");
    let app = s.cg.child("app");
    let proxy_cg = s.cg.child_path("proxy");
    let pin_dir = default_pin_dir(&app).expect("app cgroup");
    let args = sidecar_args(&app, &proxy_cg, &["--fast-path"]);

    let proxy = skiff(&s, &args);
    wait_ready(&s.ns);
    let names = pins(&pin_dir);
    for want in [
        "link_skiff_connect4",
        "link_skiff_connect6",
        "link_skiff_sock_ops",
        "SKIFF_CONFIG",
        "SKIFF_ORIG_DST",
        "SKIFF_SVC4_V2",
        "SKIFF_EP_ACTIVE",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    // The VIP is a plain-L4 service: the kernel connects it straight to a backend.
    let out = client(&s.ns, &app, "10.96.0.1:80");
    assert!(out.starts_with("ok "), "VIP before the crash: {out}");
    assert_eq!(stat(&s.ns, "skiff.bpf.fast_path_v4"), 1);
    // Anything else goes through the proxy (passthrough).
    let out = client(&s.ns, &app, "10.96.0.2:80");
    assert!(
        out.starts_with("ok "),
        "passthrough before the crash: {out}"
    );
    s.direct.expect_line("accepted", Duration::from_secs(5));
    assert_eq!(
        stat(&s.ns, "cluster.PassthroughCluster.upstream_cx_total"),
        1
    );
    let first = attached_id(&app, "skiff_connect4");

    kill9(proxy);

    // Capture is still attached: the same programs, through the pins.
    assert_eq!(attached_id(&app, "skiff_connect4"), first);
    attached_id(&app, "skiff_sock_ops");
    // The fast path serves on without the proxy.
    for i in 0..4 {
        let out = client(&s.ns, &app, "10.96.0.1:80");
        assert!(out.starts_with("ok "), "VIP {i} with skiff dead: {out}");
        assert_eq!(field(&out, "echoed"), Some("4096"), "{out}");
    }
    // Proxy-bound connects fail open: the gate still says ready, but connect4 finds no
    // listener on 127.0.0.1:15001 and leaves the connect to its original destination.
    let out = client(&s.ns, &app, "10.96.0.2:80");
    assert!(out.starts_with("ok "), "fail-open with skiff dead: {out}");
    let line = s.direct.expect_line("accepted", Duration::from_secs(5));
    assert!(field(&line, "orig_dst").is_none(), "{line}");

    // A restarted skiff takes the pins over: new programs swapped into the same links.
    let proxy = skiff(&s, &args);
    wait_ready(&s.ns);
    let second = attached_id(&app, "skiff_connect4");
    assert_ne!(second, first, "the restart swaps its own program in");
    let out = client(&s.ns, &app, "10.96.0.2:80");
    assert!(
        out.starts_with("ok "),
        "passthrough after the restart: {out}"
    );
    s.direct.expect_line("accepted", Duration::from_secs(5));
    assert_eq!(
        stat(&s.ns, "cluster.PassthroughCluster.upstream_cx_total"),
        1,
        "the restarted skiff proxies again"
    );
    // Its fast path is filled again from its own configuration.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let out = client(&s.ns, &app, "10.96.0.1:80");
        assert!(out.starts_with("ok "), "VIP after the restart: {out}");
        if stat(&s.ns, "skiff.bpf.fast_path_v4") >= 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "fast path not served again"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A clean shutdown leaves no pins and no programs.
    stop(proxy);
    assert!(!pin_dir.exists(), "pins left: {:?}", pins(&pin_dir));
    assert_no_programs_attached(&app);
}

#[test]
fn fail_closed_after_a_crash_and_cleanup_removes_the_pins() {
    let _g = serial();
    let mut s = scenario("pin-closed");
    let app = s.cg.child("app");
    let proxy_cg = s.cg.child_path("proxy");
    // An explicit pin directory (below skiff's root, so `skiff cleanup` owns it).
    let pin_dir = Path::new("/sys/fs/bpf/skiff").join(skiff_tests::test_name("pin-closed"));
    let pin_arg = pin_dir.to_str().unwrap().to_string();
    let _guard = PinGuard(pin_dir.clone());
    let args = sidecar_args(&app, &proxy_cg, &["--fail-closed", "--pin-dir", &pin_arg]);

    let proxy = skiff(&s, &args);
    wait_ready(&s.ns);
    assert!(pins(&pin_dir).contains(&"link_skiff_connect4".to_string()));
    // A live skiff's pins are never taken over: a second one naming the same directory is
    // refused (its own netns and proxy cgroup, told to coexist on the app's hooks).
    let other_ns = Netns::new("pin-closed-2");
    let proxy2_cg = s.cg.child_path("proxy2");
    let second = sidecar_args(
        &app,
        &proxy2_cg,
        &["--allow-coexist", "--pin-dir", &pin_arg],
    );
    let out = skiff_run(&other_ns, &s.bootstrap)
        .args(&second)
        .output()
        .expect("run a second skiff");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("held by a running skiff"),
        "{err}"
    );
    kill9(proxy);
    attached_id(&app, "skiff_connect4");

    // Fail-closed: refused at once, and nothing reaches the original destination.
    let out = client(&s.ns, &app, "10.96.0.2:80");
    assert!(out.contains("stage=connect"), "fail-closed: {out}");
    assert_eq!(field(&out, "errno"), Some("111"), "{out}");
    assert!(
        s.direct
            .try_line("accepted", Duration::from_millis(300))
            .is_none()
    );

    // `skiff cleanup` removes the pins; the programs detach with them. Idempotent.
    let (ok, text) = cleanup(&s.ns, &["--pin-dir", &pin_arg]);
    assert!(ok, "cleanup failed: {text}");
    assert!(text.contains("link_skiff_connect4"), "{text}");
    assert!(!pin_dir.exists());
    assert_no_programs_attached(&app);
    let (ok, text) = cleanup(&s.ns, &["--pin-dir", &pin_arg]);
    assert!(ok && text.contains("nothing to remove"), "{text}");
    // Not captured any more: straight to the original destination.
    let out = client(&s.ns, &app, "10.96.0.2:80");
    assert!(out.starts_with("ok "), "after cleanup: {out}");
    s.direct.expect_line("accepted", Duration::from_secs(5));
}

/// Removes an explicit pin directory when the test ends, also on failure.
struct PinGuard(PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
