//! Root end-to-end tests of kernel events (issue 17): fast-path connects reported from the
//! BPF ring buffer into the kernel access log, per-service counters and `skiff explain
//! --recent`; a connect storm beyond the rate limit counts lost events and never fails a
//! connect. Real `skiff run --fast-path` in a private netns (loopback only) and test-made
//! cgroups.
//!
//! Run: `cargo build -p skiff -p skiff-tests --bins && cargo test -p skiff-tests --features root
//! --test root_events -- --test-threads=1` (as root).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use skiff_tests::fastpath::{
    capture_bootstrap, fastpeer_output, http_chain, netns_and_cgroup, spawn_fast_path,
    spawn_fastpeer, static_cluster, tcp_chain, tcp_client,
};
use skiff_tests::{
    Cgroup, Child, Netns, TempYaml, admin_stat, built_binary, command_in, field, serial,
};

const BACKENDS: [&str; 2] = ["127.0.0.31:8080", "127.0.0.32:8080"];
const FAST_VIP: &str = "10.96.0.10:80";
const HTTP_VIP: &str = "10.96.0.11:80";

/// 10.96.0.10: plain tcp_proxy to cluster `svc` (fast path). 10.96.0.11: HTTP connection
/// manager (stays in the proxy).
fn bootstrap_yaml() -> String {
    capture_bootstrap(
        &format!(
            "{}{}",
            tcp_chain("fast", "10.96.0.10", 32, "svc"),
            http_chain("10.96.0.11", "svc")
        ),
        &format!(
            "  clusters:\n{}",
            static_cluster("svc", "ROUND_ROBIN", &BACKENDS)
        ),
    )
}

/// A file removed on drop (also on panic).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Scenario {
    // Field order is drop order: processes first, then cgroups, the netns and the files.
    _skiff: Child,
    _backends: Child,
    ns: Netns,
    _cg: Cgroup,
    app: PathBuf,
    _bootstrap: TempYaml,
    log: TempFile,
}

fn scenario(name: &str, flags: &[&str]) -> Scenario {
    let (ns, mut cg) = netns_and_cgroup(name);
    let mut args = vec!["serve"];
    args.extend(BACKENDS);
    let backends = spawn_fastpeer(&ns, &args);
    let bootstrap = TempYaml::new(name, &bootstrap_yaml());
    let log = TempFile(
        std::env::temp_dir().join(format!("skiff-test-{name}-{}.log", std::process::id())),
    );
    let log_path = log.0.to_str().expect("utf-8 temp path").to_string();
    let mut all = vec!["--kernel-access-log", log_path.as_str()];
    all.extend_from_slice(flags);
    let (skiff, app) = spawn_fast_path(&ns, &mut cg, &bootstrap, &all);
    let s = Scenario {
        _skiff: skiff,
        _backends: backends,
        ns,
        _cg: cg,
        app,
        _bootstrap: bootstrap,
        log,
    };
    skiff_tests::wait_admin_ready(&s.ns);
    s
}

/// `n` sequential fast-path connects from the app cgroup; every one must succeed.
fn spread(s: &Scenario, n: usize) -> String {
    let n_arg = n.to_string();
    let line = fastpeer_output(&s.ns, Some(&s.app), &["spread", FAST_VIP, "--n", &n_arg]);
    assert!(line.starts_with("ok "), "spread to {FAST_VIP}: {line}");
    let total: usize = BACKENDS
        .iter()
        .map(|b| field(&line, b).and_then(|v| v.parse().ok()).unwrap_or(0))
        .sum();
    assert_eq!(total, n, "every connect reached a backend: {line}");
    line
}

/// Polls `cond` for up to 5 s (the event reader runs asynchronously).
fn eventually(what: &str, mut cond: impl FnMut() -> Option<String>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match cond() {
            None => return,
            Some(why) if Instant::now() > deadline => panic!("{what}: {why}"),
            Some(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[test]
fn a_fast_path_connect_is_logged_as_kernel_path_counted_and_explained() {
    let _g = serial();
    let s = scenario("ev-log", &[]);
    spread(&s, 4);

    // Kernel access log: one line per connect, marked as the kernel path, naming the VIP,
    // the endpoint the kernel chose and the cluster.
    eventually("four kernel access-log lines", || {
        let text = read(&s.log.0);
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("kernel_fast_path"))
            .collect();
        (lines.len() != 4).then(|| format!("got {}:\n{text}", lines.len()))
    });
    let text = read(&s.log.0);
    for line in text.lines() {
        assert!(
            line.contains(" kernel_fast_path kernel_fast_path "),
            "{line}"
        );
        assert!(line.contains(" 10.96.0.10:80 "), "{line}");
        assert!(line.contains(" svc "), "{line}");
        assert!(
            BACKENDS.iter().any(|b| line.contains(&format!("\"{b}\""))),
            "{line}"
        );
    }

    // Counters: per service (from the events) and nothing lost.
    assert_eq!(
        admin_stat(&s.ns, "skiff.bpf.fast_path.service.svc.cx_total"),
        4
    );
    assert_eq!(admin_stat(&s.ns, "skiff.bpf.events.total"), 4);
    assert_eq!(admin_stat(&s.ns, "skiff.bpf.events.lost"), 0);

    // A proxied connection (the HTTP service) records the userspace steps.
    let _ = tcp_client(&s.ns, &s.app, HTTP_VIP);
    let fetch = || {
        let (code, body) =
            skiff_tests::admin(&s.ns, "GET", "/debug/explain?recent=10").expect("recent");
        assert_eq!(code, 200, "{body}");
        body
    };
    // A connection is recorded when it ends.
    eventually("the proxied connection in /debug/explain?recent", || {
        let body = fetch();
        (!body.contains("\"path\": \"proxy\"")).then_some(body)
    });
    let body = fetch();
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let recent = v["recent"].as_array().expect("recent array");
    let kernel = recent
        .iter()
        .find(|c| c["path"] == "kernel" && c["dst"] == FAST_VIP)
        .unwrap_or_else(|| panic!("no kernel connection in {body}"));
    let steps = |c: &serde_json::Value| -> Vec<String> {
        c["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["step"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        steps(kernel),
        ["capture", "listener", "filter_chain", "cluster", "endpoint"],
        "{body}"
    );
    assert!(
        kernel["steps"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("kernel fast path"),
        "{body}"
    );
    let proxied = recent
        .iter()
        .find(|c| c["path"] == "proxy" && c["dst"] == HTTP_VIP)
        .unwrap_or_else(|| panic!("no proxied connection in {body}"));
    let st = steps(proxied);
    assert_eq!(
        st[..4],
        ["capture", "listener", "filter_chain", "route"],
        "{body}"
    );
    assert_eq!(proxied["steps"][2]["value"], "http", "{body}");

    // The CLI prints the same, as text.
    let out = command_in(Some(&s.ns), None, built_binary("skiff"))
        .args(["explain", "--recent", "10"])
        .output()
        .expect("skiff explain --recent");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(" kernel - -> 10.96.0.10:80: "), "{text}");
    assert!(text.contains(" proxy 127.0.0.1:"), "{text}");
    assert!(text.contains("  endpoint     127.0.0.3"), "{text}");
}

#[test]
fn a_connect_storm_beyond_the_rate_limit_counts_lost_events_and_every_connect_succeeds() {
    let _g = serial();
    // 1 event/s per CPU after a burst of 5: nearly all of 300 connects exceed it.
    let s = scenario(
        "ev-storm",
        &["--kernel-events-rate", "1", "--kernel-events-burst", "5"],
    );
    const N: u64 = 300;
    spread(&s, N as usize);
    assert_eq!(admin_stat(&s.ns, "skiff.bpf.fast_path_v4"), N);
    // Every event is either read or counted lost, once the reader caught up.
    eventually("events read + lost = connects", || {
        let total = admin_stat(&s.ns, "skiff.bpf.events.total");
        let lost = admin_stat(&s.ns, "skiff.bpf.events.lost");
        (total + lost != N).then(|| format!("total {total} + lost {lost} != {N}"))
    });
    let total = admin_stat(&s.ns, "skiff.bpf.events.total");
    let lost = admin_stat(&s.ns, "skiff.bpf.events.lost");
    let cpus = std::thread::available_parallelism().map_or(64, |n| n.get() as u64);
    // At most the burst per CPU plus what the rate refills while the storm runs.
    assert!(total <= cpus * 5 + 30, "read {total}, lost {lost}");
    assert!(lost >= N - cpus * 5 - 30, "read {total}, lost {lost}");
    assert_eq!(
        admin_stat(&s.ns, "skiff.bpf.events.lost_rate_limited"),
        lost
    );
    let lines = read(&s.log.0).lines().count() as u64;
    assert_eq!(lines, total, "one access-log line per event read");
}

#[test]
fn the_kernel_access_log_speaks_istios_default_json_when_asked() {
    let _g = serial();
    let s = scenario("ev-json", &["--kernel-access-log-format", "json"]);
    spread(&s, 2);
    eventually("two JSON kernel access-log lines", || {
        let n = read(&s.log.0).lines().count();
        (n != 2).then(|| format!("got {n}"))
    });
    for line in read(&s.log.0).lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("one JSON object per line");
        assert_eq!(v["response_code_details"], "kernel_fast_path", "{line}");
        assert_eq!(v["upstream_cluster"], "svc", "{line}");
        assert_eq!(v["downstream_local_address"], FAST_VIP, "{line}");
        let host = v["upstream_host"].as_str().unwrap_or_default();
        assert!(BACKENDS.contains(&host), "{line}");
    }
}
