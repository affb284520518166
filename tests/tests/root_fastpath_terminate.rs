//! Root end-to-end test of `skiff run --fast-path --terminate-on-removal`: the real skiff fed
//! over ADS by the real `skiff control-plane --dir`, in a private network namespace (loopback
//! only) and cgroups this test creates. An application holds fast-path connections to three
//! backends; when an EDS update removes one backend, the connections to it are destroyed (the
//! application sees a reset) and the others stay open.
//!
//! Run: `cargo build -p skiff -p skiff-tests --bins && cargo test -p skiff-tests --features root
//! --test root_fastpath_terminate -- --test-threads=1` (as root).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use skiff_tests::fastpath::{
    Holder, count, eds_control_plane, endpoints_file, fastpeer, netns_and_cgroup, per_backend,
    spawn_fast_path, spawn_fastpeer, wait_kernel_endpoints, write_atomic,
};
use skiff_tests::{Cgroup, Child, Netns, TempYaml, command_in, serial};

const VIP: &str = "10.96.0.10:80";
const BACKENDS: [&str; 3] = ["127.0.0.21:8080", "127.0.0.22:8080", "127.0.0.23:8080"];

struct Scenario {
    // Field order is drop order: processes first, then cgroups, the netns and the files.
    _skiff: Child,
    _control_plane: Child,
    _backends: Child,
    ns: Netns,
    _cg: Cgroup,
    dir: tempfile::TempDir,
    _bootstrap: TempYaml,
    app: PathBuf,
}

fn scenario(name: &str) -> Scenario {
    let (ns, mut cg) = netns_and_cgroup(name);
    let mut args = vec!["serve"];
    args.extend(BACKENDS);
    let backends = spawn_fastpeer(&ns, &args);
    let dir = tempfile::Builder::new()
        .prefix(&format!("{}-", skiff_tests::test_name(name)))
        .tempdir()
        .expect("tempdir");
    let (control_plane, bootstrap) = eds_control_plane(&ns, dir.path(), name, &BACKENDS);
    let (skiff, app) = spawn_fast_path(&ns, &mut cg, &bootstrap, &["--terminate-on-removal"]);
    Scenario {
        _skiff: skiff,
        _control_plane: control_plane,
        _backends: backends,
        ns,
        _cg: cg,
        dir,
        _bootstrap: bootstrap,
        app,
    }
}

#[test]
fn removed_endpoint_connections_are_reset_and_the_others_survive() {
    let _g = serial();
    let s = scenario("fp-term");
    wait_kernel_endpoints(&s.ns, &BACKENDS);
    // Connects are captured only once skiff opens its ready gate.
    skiff_tests::wait_admin_ready(&s.ns);

    let mut hold = command_in(Some(&s.ns), Some(&s.app), fastpeer());
    hold.args(["hold", VIP, "--n", "9"]);
    let (mut h, held) = Holder::spawn(hold);
    // Round robin (per-CPU cursors): every backend holds some.
    let n = per_backend(&held, &BACKENDS);
    assert!(n.iter().all(|c| *c > 0), "{held}");
    let before = h.check();
    assert_eq!(
        BACKENDS
            .iter()
            .map(|b| count(&before, &format!("alive.{b}")))
            .sum::<usize>(),
        9,
        "{before}"
    );

    // EDS drops the second backend; once the kernel maps no longer hold it, its sockets are gone.
    write_atomic(
        s.dir.path(),
        "endpoints.json",
        &endpoints_file(2, &[BACKENDS[0], BACKENDS[2]]),
    );
    wait_kernel_endpoints(&s.ns, &[BACKENDS[0], BACKENDS[2]]);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after = h.check();
    while count(&after, &format!("dead.{}", BACKENDS[1])) < n[1] && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        after = h.check();
    }
    assert_eq!(
        count(&after, &format!("dead.{}", BACKENDS[1])),
        n[1],
        "{after}"
    );
    assert_eq!(
        count(&after, &format!("alive.{}", BACKENDS[0])),
        n[0],
        "{after}"
    );
    assert_eq!(
        count(&after, &format!("alive.{}", BACKENDS[2])),
        n[2],
        "{after}"
    );
    assert_eq!(
        skiff_tests::admin_stat(&s.ns, "skiff.bpf.fast_path.terminated_sockets"),
        n[1] as u64
    );
}
