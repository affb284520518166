//! Root tests of the kernel side of outbound capture (`skiff::bpf::Capture`): real cgroup v2,
//! a loopback-only network namespace, and the real eBPF programs.
//!
//! Run: `cargo test -p skiff-tests --features root --test root_bpf -- --test-threads=1`.
//!
//! Layout of each test: the test process installs the capture (and so joins the proxy
//! cgroup); `skiff-testpeer origdst` listeners run in the netns and the proxy cgroup (created
//! after the join, like the real proxy's listeners); `skiff-testpeer client`s run in the netns
//! and the app cgroup. 10.96.0.1 and fd00:96::1 exist only inside the netns, which has no
//! route out: an uncaptured connect to them fails with ENETUNREACH.

use std::{
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use skiff::bpf::{Capture, CaptureConfig, CaptureMode, cgroup_id};
use skiff_tests::{
    Cgroup, Child, Netns, RootEnv, assert_no_programs_attached, command_in, field, require_root,
    serial,
};

const PEER: &str = env!("CARGO_BIN_EXE_skiff-testpeer");
const WAIT: Duration = Duration::from_secs(10);
const ENETUNREACH: &str = "101";
const ECONNREFUSED: &str = "111";
const ENOENT: &str = "2";

/// A listener (`echo` or `origdst`) in `ns` and `cgroup`, once it printed `ready`.
fn listen(ns: &Netns, cgroup: &Path, mode: &str, addr: &str) -> Child {
    let mut child = Child::spawn(command_in(Some(ns), Some(cgroup), PEER).args([mode, addr]));
    child.expect_line("ready", WAIT);
    child
}

/// Runs a client in `ns` and `cgroup` and returns its result line (`ok ...` or `err ...`).
fn client(ns: &Netns, cgroup: &Path, addr: &str, extra: &[&str]) -> String {
    let mut cmd = command_in(Some(ns), Some(cgroup), PEER);
    cmd.args(["client", addr, "--bytes", "3000", "--timeout-ms", "3000"])
        .args(extra);
    let (_, out) = Child::spawn(&mut cmd).wait(WAIT);
    out.lines()
        .find(|l| l.starts_with("ok ") || l.starts_with("err "))
        .unwrap_or_else(|| panic!("client {addr} printed no result: {out:?}"))
        .to_string()
}

/// Asserts a captured connect: the client landed on `listener_addr` with its bytes echoed.
fn assert_captured(result: &str, listener_addr: &str) {
    assert!(
        result.starts_with("ok "),
        "expected a captured connect, got: {result}"
    );
    assert_eq!(field(result, "peer"), Some(listener_addr), "{result}");
    assert_eq!(field(result, "same"), Some("yes"), "{result}");
}

/// Asserts a connect that was not rewritten (the VIP has no route in the netns).
fn assert_not_captured(result: &str) {
    assert!(
        result.starts_with("err stage=connect"),
        "expected ENETUNREACH, got: {result}"
    );
    assert_eq!(field(result, "errno"), Some(ENETUNREACH), "{result}");
}

fn stat(capture: &Capture, name: &str) -> u64 {
    capture
        .stats()
        .expect("stats")
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
        .unwrap_or_default()
}

/// Waits until every recorded original destination has been deleted (TCP_CLOSE).
fn assert_tracking_drains(capture: &Capture) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let n = capture.tracked_connections().expect("tracked_connections");
        if n == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{n} original destinations still recorded after all connections closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// After a test: nothing attached, no cgroup dirs, no netns.
fn assert_clean(cgroup_dir: &Path, netns: &str) {
    assert!(
        !cgroup_dir.exists(),
        "cgroup {} left behind",
        cgroup_dir.display()
    );
    assert!(!Netns::exists(netns), "netns {netns} left behind");
}

fn sidecar_layout(
    env: &RootEnv,
    name: &str,
) -> (Netns, Cgroup, std::path::PathBuf, std::path::PathBuf) {
    let ns = Netns::new(name);
    let mut cg = Cgroup::new(env, name);
    let app = cg.child("app");
    let proxy = cg.child("proxy");
    (ns, cg, app, proxy)
}

#[test]
fn sidecar_captures_v4_v6_and_v4_mapped_and_answers_original_dst() {
    let env = require_root();
    let _serial = serial();
    let (ns, mut cg, app, proxy) = sidecar_layout(&env, "sidecar");
    let other = cg.child("other");
    let (cg_dir, ns_name) = (cg.path().to_path_buf(), ns.name().to_string());
    {
        let mut cfg = CaptureConfig::new(CaptureMode::Sidecar {
            cgroup: app.clone(),
            proxy_cgroup: proxy.clone(),
        });
        cfg.exclude_ports = vec![81];
        cfg.exclude_cidrs = vec![
            ("10.97.0.0".parse::<IpAddr>().unwrap(), 16),
            ("fd00:97::".parse().unwrap(), 32),
        ];
        let capture = Capture::install(&cfg).expect("install");
        assert_eq!(
            Cgroup::procs(&proxy),
            vec![std::process::id()],
            "install moves this process into the proxy cgroup"
        );

        let mut v4 = listen(&ns, &proxy, "origdst", "127.0.0.1:15001");
        let mut v6 = listen(&ns, &proxy, "origdst", "[::1]:15001");
        capture.set_ready(true).expect("set_ready");

        // IPv4: rewritten to the listener; SO_ORIGINAL_DST is the VIP.
        assert_captured(&client(&ns, &app, "10.96.0.1:80", &[]), "127.0.0.1:15001");
        let acc = v4.expect_line("accepted", WAIT);
        assert_eq!(field(&acc, "orig_dst"), Some("10.96.0.1:80"), "{acc}");

        // IPv6: [fd00:96::1]:80 -> [::1]:15001; IP6T_SO_ORIGINAL_DST is the VIP.
        assert_captured(&client(&ns, &app, "[fd00:96::1]:80", &[]), "[::1]:15001");
        let acc = v6.expect_line("accepted", WAIT);
        assert_eq!(field(&acc, "orig_dst"), Some("[fd00:96::1]:80"), "{acc}");

        // v4-mapped on an AF_INET6 socket: lands on the AF_INET listener with the v4 VIP.
        assert_captured(
            &client(&ns, &app, "[::ffff:10.96.0.1]:8080", &[]),
            "[::ffff:127.0.0.1]:15001",
        );
        let acc = v4.expect_line("accepted", WAIT);
        assert_eq!(field(&acc, "orig_dst"), Some("10.96.0.1:8080"), "{acc}");

        // Never captured: excluded port, excluded CIDRs, the proxy's mark, other cgroups.
        assert_not_captured(&client(&ns, &app, "10.96.0.1:81", &[]));
        assert_not_captured(&client(&ns, &app, "10.97.3.4:80", &[]));
        assert_not_captured(&client(&ns, &app, "[fd00:97::5]:80", &[]));
        assert_not_captured(&client(&ns, &app, "10.96.0.1:80", &["--mark", "0x539"]));
        assert_not_captured(&client(&ns, &other, "10.96.0.1:80", &[]));

        // A connection to the proxy port that was not captured: ENOENT, as a conntrack miss.
        let direct = client(&ns, &other, "127.0.0.1:15001", &[]);
        assert!(direct.starts_with("ok "), "{direct}");
        let acc = v4.expect_line("accepted", WAIT);
        assert_eq!(field(&acc, "orig_dst_errno"), Some(ENOENT), "{acc}");

        assert_tracking_drains(&capture);
        let stats = capture.stats().expect("stats");
        for (name, min) in [
            ("captured_v4", 1),
            ("captured_v6", 1),
            ("captured_v4_mapped", 1),
            ("skip_excluded_port", 1),
            ("skip_excluded_cidr", 2),
            ("skip_proxy_mark", 1),
            ("rekeyed", 3),
            ("closed", 3),
            ("orig_dst_v4", 2),
            ("orig_dst_v6", 1),
            ("orig_dst_miss", 1),
        ] {
            let got = stats.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
            assert!(
                got >= Some(min),
                "stat {name}: {got:?} < {min}; all: {stats:?}"
            );
        }
        for (name, v) in &stats {
            assert!(
                !name.starts_with("err_") || *v == 0,
                "internal error counter {name}={v}"
            );
        }
        drop((v4, v6));
        drop(capture);
        assert!(
            Cgroup::procs(&proxy).is_empty(),
            "drop moves this process back out of the proxy cgroup"
        );
        assert_no_programs_attached(cg.path());
    }
    drop(cg);
    drop(ns);
    assert_clean(&cg_dir, &ns_name);
}

#[test]
fn not_ready_fails_open_to_the_original_destination() {
    let env = require_root();
    let _serial = serial();
    let (ns, cg, app, proxy) = sidecar_layout(&env, "failopen");
    let (cg_dir, ns_name) = (cg.path().to_path_buf(), ns.name().to_string());
    {
        // The VIP exists in this netns only, with a real server behind it.
        ns.add_lo_addr("10.96.0.1/32");
        let _vip = listen(&ns, cg.path(), "echo", "10.96.0.1:80");
        let cfg = CaptureConfig::new(CaptureMode::Sidecar {
            cgroup: app.clone(),
            proxy_cgroup: proxy.clone(),
        });
        let mut capture = Capture::install(&cfg).expect("install");
        // The log pump needs a tokio runtime with IO (it waits on the log ring's fd); it runs
        // once per install and stops on drop.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_io()
            .build()
            .unwrap();
        let pump = rt
            .block_on(async { capture.spawn_log_pump() })
            .expect("log pump");
        assert!(
            rt.block_on(async { capture.spawn_log_pump() }).is_none(),
            "one pump per capture"
        );
        let mut v4 = listen(&ns, &proxy, "origdst", "127.0.0.1:15001");

        // Not ready yet: straight to 10.96.0.1.
        assert_captured(&client(&ns, &app, "10.96.0.1:80", &[]), "10.96.0.1:80");
        assert!(stat(&capture, "skip_not_ready") >= 1);

        capture.set_ready(true).unwrap();
        assert_captured(&client(&ns, &app, "10.96.0.1:80", &[]), "127.0.0.1:15001");
        let acc = v4.expect_line("accepted", WAIT);
        assert_eq!(field(&acc, "orig_dst"), Some("10.96.0.1:80"), "{acc}");

        capture.set_ready(false).unwrap();
        assert_captured(&client(&ns, &app, "10.96.0.1:80", &[]), "10.96.0.1:80");

        drop(v4);
        drop(capture);
        assert!(
            rt.block_on(pump).unwrap_err().is_cancelled(),
            "drop stops the log pump"
        );
        // Detached: still straight to the VIP.
        assert_captured(&client(&ns, &app, "10.96.0.1:80", &[]), "10.96.0.1:80");
        assert_no_programs_attached(cg.path());
    }
    drop(cg);
    drop(ns);
    assert_clean(&cg_dir, &ns_name);
}

#[test]
fn fail_closed_refuses_at_once_and_a_dead_proxy_never_hangs() {
    let env = require_root();
    let _serial = serial();
    let (ns, cg, app, proxy) = sidecar_layout(&env, "failclosed");
    let (cg_dir, ns_name) = (cg.path().to_path_buf(), ns.name().to_string());
    {
        let mut cfg = CaptureConfig::new(CaptureMode::Sidecar {
            cgroup: app.clone(),
            proxy_cgroup: proxy.clone(),
        });
        cfg.fail_closed = true;
        cfg.exclude_ports = vec![81];
        let capture = Capture::install(&cfg).expect("install");

        // Not ready, fail-closed: ECONNREFUSED (set with bpf_set_retval), immediately.
        let r = client(&ns, &app, "10.96.0.1:80", &[]);
        assert_eq!(field(&r, "stage"), Some("connect"), "{r}");
        assert_eq!(field(&r, "errno"), Some(ECONNREFUSED), "{r}");
        assert!(
            field(&r, "elapsed_ms").unwrap().parse::<u64>().unwrap() < 1000,
            "{r}"
        );
        assert_eq!(stat(&capture, "reject_not_ready"), 1);
        assert_eq!(stat(&capture, "err_set_retval"), 0);
        // Excluded traffic and the proxy's own sockets never depend on readiness.
        assert_not_captured(&client(&ns, &app, "10.96.0.1:81", &[]));
        assert_not_captured(&client(&ns, &app, "10.96.0.1:80", &["--mark", "1337"]));

        let v4 = listen(&ns, &proxy, "origdst", "127.0.0.1:15001");
        capture.set_ready(true).unwrap();
        assert_captured(&client(&ns, &app, "10.96.0.1:80", &[]), "127.0.0.1:15001");

        // The proxy died but the flag is still set: connects are refused at once, never hang.
        drop(v4);
        let r = client(&ns, &app, "10.96.0.1:80", &[]);
        assert_eq!(field(&r, "errno"), Some(ECONNREFUSED), "{r}");
        assert!(
            field(&r, "elapsed_ms").unwrap().parse::<u64>().unwrap() < 1000,
            "{r}"
        );
        assert_tracking_drains(&capture);

        drop(capture);
        assert_not_captured(&client(&ns, &app, "10.96.0.1:80", &[]));
        assert_no_programs_attached(cg.path());
    }
    drop(cg);
    drop(ns);
    assert_clean(&cg_dir, &ns_name);
}

#[test]
fn node_mode_captures_only_meshed_cgroups() {
    let env = require_root();
    let _serial = serial();
    let ns = Netns::new("node");
    let mut root = Cgroup::new(&env, "node");
    let meshed = root.child("meshed");
    let plain = root.child("plain");
    // Not created here: install creates it and removes it on drop.
    let proxy = root.child_path("proxy");
    let (cg_dir, ns_name) = (root.path().to_path_buf(), ns.name().to_string());
    {
        let cfg = CaptureConfig::new(CaptureMode::Node {
            cgroup_root: root.path().to_path_buf(),
            proxy_cgroup: proxy.clone(),
        });
        let capture = Capture::install(&cfg).expect("install");
        assert!(proxy.is_dir(), "install creates the proxy cgroup");
        let mut v4 = listen(&ns, &proxy, "origdst", "127.0.0.1:15001");
        let mut v6 = listen(&ns, &proxy, "origdst", "[::1]:15001");
        capture.set_ready(true).unwrap();

        // Nothing meshed yet.
        assert!(capture.meshed_cgroups().unwrap().is_empty());
        assert_not_captured(&client(&ns, &meshed, "10.96.0.1:80", &[]));

        let id = capture
            .add_meshed_cgroup(&meshed)
            .expect("add_meshed_cgroup");
        assert_eq!(id, cgroup_id(&meshed).unwrap());
        assert_eq!(capture.meshed_cgroups().unwrap(), vec![id]);
        assert_captured(
            &client(&ns, &meshed, "10.96.0.1:80", &[]),
            "127.0.0.1:15001",
        );
        let acc = v4.expect_line("accepted", WAIT);
        assert_eq!(field(&acc, "orig_dst"), Some("10.96.0.1:80"), "{acc}");
        assert_captured(
            &client(&ns, &meshed, "[fd00:96::1]:443", &[]),
            "[::1]:15001",
        );
        let acc = v6.expect_line("accepted", WAIT);
        assert_eq!(field(&acc, "orig_dst"), Some("[fd00:96::1]:443"), "{acc}");
        assert_not_captured(&client(&ns, &plain, "10.96.0.1:80", &[]));
        // The proxy's own cgroup is under the root but not meshed (and its sockets are marked).
        assert_not_captured(&client(&ns, &proxy, "10.96.0.1:80", &[]));
        assert!(stat(&capture, "skip_not_meshed") >= 3);

        capture.remove_meshed_cgroup(&meshed).unwrap();
        assert!(capture.meshed_cgroups().unwrap().is_empty());
        assert_not_captured(&client(&ns, &meshed, "10.96.0.1:80", &[]));
        assert_tracking_drains(&capture);

        drop((v4, v6));
        drop(capture);
        assert!(!proxy.exists(), "drop removes the proxy cgroup it created");
        assert_no_programs_attached(root.path());
    }
    drop(root);
    drop(ns);
    assert_clean(&cg_dir, &ns_name);
}

#[test]
fn refuses_the_cgroup_root_and_non_cgroups() {
    let env = require_root();
    let _serial = serial();
    let mut cg = Cgroup::new(&env, "refuse");
    let proxy = cg.child("proxy");
    let cg_dir = cg.path().to_path_buf();
    for bad in [
        env.cgroup2.clone(),
        "/tmp".into(),
        cg.path().join("missing"),
    ] {
        let cfg = CaptureConfig::new(CaptureMode::Sidecar {
            cgroup: bad.clone(),
            proxy_cgroup: proxy.clone(),
        });
        let err = Capture::install(&cfg).expect_err("must refuse");
        assert!(err.to_string().contains(&*bad.to_string_lossy()), "{err}");
    }
    assert!(
        Cgroup::procs(&proxy).is_empty(),
        "a refused install leaves the process where it was"
    );
    assert_no_programs_attached(cg.path());
    drop(cg);
    assert!(!cg_dir.exists());
}
