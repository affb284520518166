//! Unprivileged tests of the `skiff` binary's exit codes: 2 and one line naming the problem
//! for bad configuration, 1 for failures at run time. Nothing here captures or binds
//! anything but loopback. Needs the binary: `cargo build -p skiff --bin skiff`.

use std::process::{Command, Output};

use skiff_tests::{TempYaml, built_binary};

fn skiff(args: &[&str]) -> Output {
    Command::new(built_binary("skiff"))
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("run skiff")
}

/// Asserts the exit code and that stderr contains every one of `needles`; returns stderr.
fn expect(out: &Output, code: i32, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} missing from: {err}");
    }
    err
}

const EMPTY_BOOTSTRAP: &str = "node: { id: cli-test }\n";

#[test]
fn invalid_bootstrap_exits_2_naming_file_and_field() {
    let b = TempYaml::new(
        "cli-bad",
        "static_resources:\n  clusters:\n  - name: c\n    type: STATIC\n    connect_timeout: -1s\n",
    );
    let out = skiff(&[
        "run",
        "--capture",
        "none",
        "--bootstrap",
        b.to_str().unwrap(),
    ]);
    let err = expect(&out, 2, &["connect_timeout", "cli-bad"]);
    assert!(err.starts_with("skiff: bootstrap "), "{err}");
    let out = skiff(&[
        "run",
        "--capture",
        "none",
        "--bootstrap",
        "/nonexistent/skiff.yaml",
    ]);
    expect(&out, 2, &["skiff: bootstrap /nonexistent/skiff.yaml: "]);
}

#[test]
fn contradictory_flags_exit_2() {
    let b = TempYaml::new("cli-ok", EMPTY_BOOTSTRAP);
    let b = b.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (
            &["--capture", "iptables", "--mode", "node"],
            "skiff: --capture iptables serves one network namespace: use --mode sidecar\n",
        ),
        (
            &["--capture", "none", "--capture-inbound"],
            "skiff: --capture-inbound needs --capture ebpf, iptables or auto\n",
        ),
        (
            &["--capture", "none", "--cgroup", "/tmp"],
            "skiff: --cgroup/--cgroup-root need --capture ebpf\n",
        ),
        (
            &["--capture", "ebpf", "--cgroup", "/nonexistent-skiff-cgroup"],
            "skiff: --cgroup /nonexistent-skiff-cgroup: not a directory\n",
        ),
    ];
    for (flags, message) in cases {
        let mut args = vec!["run", "--bootstrap", b];
        args.extend_from_slice(flags);
        let err = expect(&skiff(&args), 2, &[]);
        assert_eq!(err, message, "{flags:?}");
    }
    // clap's own usage errors exit 2 too.
    expect(
        &skiff(&["run", "--bootstrap", b, "--sockmap"]),
        2,
        &["--sockmap-ports"],
    );
}

#[test]
fn admin_queries_exit_2_on_bad_input_and_1_when_unreachable() {
    let out = skiff(&["admin", "/ready", "--method", "b@d"]);
    expect(&out, 2, &["--method \"b@d\" is not an HTTP method"]);
    // A port nothing listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .port();
    let admin = format!("127.0.0.1:{port}");
    for args in [
        vec!["admin", "/ready", "--admin", &admin],
        vec!["maps", "--admin", &admin],
        vec!["node", "list-pods", "--admin", &admin],
    ] {
        let out = skiff(&args);
        expect(
            &out,
            1,
            &[&format!("skiff: cannot reach skiff admin at {admin}: ")],
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn control_plane_without_its_source_exits_2() {
    let out = skiff(&[
        "control-plane",
        "--dir",
        "/nonexistent/skiff-xds",
        "--listen",
        "127.0.0.1:0",
    ]);
    expect(
        &out,
        2,
        &["skiff: loading directory /nonexistent/skiff-xds: reading /nonexistent/skiff-xds"],
    );
}

#[test]
fn flags_that_cannot_act_in_the_chosen_mode_exit_2() {
    let b = TempYaml::new("cli-refuse", EMPTY_BOOTSTRAP);
    let b = b.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (
            &["--capture", "none", "--fast-path"],
            "skiff: --fast-path needs the eBPF capture; with --capture none it would do nothing\n",
        ),
        (
            &[
                "--capture",
                "iptables",
                "--fast-path",
                "--terminate-on-removal",
            ],
            "skiff: --fast-path needs the eBPF capture; with --capture iptables it would do nothing\n",
        ),
        (
            &[
                "--capture",
                "iptables",
                "--sockmap",
                "--sockmap-ports",
                "80",
            ],
            "skiff: --sockmap needs the eBPF capture; with --capture iptables it would do nothing\n",
        ),
        (
            &["--capture", "none", "--pod-bootstrap-dir", "/tmp"],
            "skiff: --pod-bootstrap-dir is a node-mode flag: use --mode node\n",
        ),
        (
            &["--capture", "none", "--admin", "0.0.0.0:15000"],
            "skiff: admin address 0.0.0.0:15000 (from --admin) is not loopback: anyone reaching \
             it can read the configuration; pass --admin-allow-remote to bind it anyway\n",
        ),
        (
            &["--capture", "none", "--admin", "[::]:15000"],
            "skiff: admin address [::]:15000 (from --admin) is not loopback: anyone reaching it \
             can read the configuration; pass --admin-allow-remote to bind it anyway\n",
        ),
    ];
    for (flags, message) in cases {
        let mut args = vec!["run", "--bootstrap", b];
        args.extend_from_slice(flags);
        let err = expect(&skiff(&args), 2, &[]);
        assert_eq!(err, message, "{flags:?}");
    }
    // The bootstrap's admin address is held to the same rule.
    let remote = TempYaml::new(
        "cli-remote-admin",
        "node: { id: cli-test }\nadmin: { address: { socket_address: { address: 0.0.0.0, port_value: 15000 } } }\n",
    );
    expect(
        &skiff(&[
            "run",
            "--capture",
            "none",
            "--bootstrap",
            remote.to_str().unwrap(),
        ]),
        2,
        &[
            "(from the bootstrap's admin.address) is not loopback",
            "--admin-allow-remote",
        ],
    );
}
