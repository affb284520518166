//! Root end-to-end tests of the real `skiff` binary: eBPF capture in a private network
//! namespace and cgroups this test creates, real clients, real backends, skiff's admin API.
//!
//! Run: `cargo build -p skiff -p skiff-tests --bins && cargo test -p skiff-tests --features root
//! --test root_e2e -- --test-threads=1` (as root), or `cargo xtask test`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use skiff_tests::{
    Cgroup, Child, Netns, TempYaml, admin, admin_stat as stat, assert_no_programs_attached,
    built_binary, command_in, field, require_root, serial, sidecar_args, sigterm_and_wait as stop,
    skiff_node, skiff_run, spawn_testpeer, testpeer_output, vip_bootstrap,
    wait_admin_ready as wait_ready,
};

struct Scenario {
    // Field order is drop order: processes first, then cgroups, the netns and the bootstrap.
    backends: Vec<Child>,
    direct: Child,
    ns: Netns,
    cg: Cgroup,
    bootstrap: TempYaml,
}

/// A netns with two backends behind the VIP and a "real" 10.96.0.2 host (on lo) that only
/// passthrough or bypassed connects reach.
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
    let bootstrap = TempYaml::new(name, &vip_bootstrap("e2e"));
    Scenario {
        backends,
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
        &["client", addr, "--bytes", "65536", "--timeout-ms", "3000"],
    )
}

fn skiff(s: &Scenario, args: &[&str]) -> Child {
    Child::spawn(skiff_run(&s.ns, &s.bootstrap).args(args))
}

#[test]
fn sidecar_proxies_captured_connects_by_filter_chain_and_never_loops() {
    let _g = serial();
    let mut s = scenario("e2e-sidecar");
    let app = s.cg.child("app");
    let proxy_cg = s.cg.child_path("proxy");
    let proxy = skiff(
        &s,
        &sidecar_args(&app, &proxy_cg, &["--exclude-ports", "9999"]),
    );
    wait_ready(&s.ns);

    // v4 VIP: round robin over both backends, bytes intact both ways.
    for i in 0..4 {
        let out = client(&s.ns, &app, "10.96.0.1:80");
        assert!(out.starts_with("ok "), "connect {i} to the VIP: {out}");
        assert_eq!(field(&out, "same"), Some("yes"), "{out}");
        assert_eq!(field(&out, "echoed"), Some("65536"), "{out}");
    }
    for b in &mut s.backends {
        for _ in 0..2 {
            let line = b.expect_line("accepted", Duration::from_secs(5));
            // The backend sees skiff, and its own socket is not a redirected one.
            assert!(field(&line, "orig_dst").is_none(), "{line}");
        }
    }
    assert_eq!(stat(&s.ns, "cluster.svc.upstream_cx_total"), 4);

    // v6 VIP reaches the same cluster.
    let out = client(&s.ns, &app, "[fd00:96::1]:80");
    assert!(out.starts_with("ok "), "v6 VIP: {out}");
    assert_eq!(stat(&s.ns, "cluster.svc.upstream_cx_total"), 5);

    // Anything else falls to the default chain: passthrough to the original destination.
    // skiff's upstream connect carries its mark, so it is not captured again (no loop).
    let out = client(&s.ns, &app, "10.96.0.2:80");
    assert!(out.starts_with("ok "), "passthrough: {out}");
    let line = s.direct.expect_line("accepted", Duration::from_secs(5));
    assert_eq!(
        stat(&s.ns, "cluster.PassthroughCluster.upstream_cx_total"),
        1,
        "{line}"
    );

    // Excluded ports are never captured: with nothing on 10.96.0.2:9999 the app sees the
    // kernel's own refusal and skiff sees nothing.
    let before = stat(&s.ns, "listener.127.0.0.1_15001.downstream_cx_total");
    let out = client(&s.ns, &app, "10.96.0.2:9999");
    assert!(out.contains("stage=connect"), "excluded port: {out}");
    assert_eq!(field(&out, "errno"), Some("111"), "{out}");
    assert_eq!(
        stat(&s.ns, "listener.127.0.0.1_15001.downstream_cx_total"),
        before
    );

    // A process outside the pod cgroup is not captured: the VIP exists nowhere.
    let out = testpeer_output(
        &s.ns,
        None,
        &["client", "10.96.0.1:80", "--timeout-ms", "1000"],
    );
    assert!(out.starts_with("err stage=connect"), "uncaptured: {out}");

    // Drain (Envoy's /drain_listeners): the kernel gate closes and connects fail open.
    let (code, _) = admin(&s.ns, "POST", "/drain_listeners").unwrap();
    assert_eq!(code, 200);
    let out = client(&s.ns, &app, "10.96.0.2:80");
    assert!(out.starts_with("ok "), "fail-open: {out}");
    s.direct.expect_line("accepted", Duration::from_secs(5));
    assert_eq!(
        stat(&s.ns, "cluster.PassthroughCluster.upstream_cx_total"),
        1
    );

    stop(proxy);
    assert!(
        !proxy_cg.exists(),
        "skiff removes the proxy cgroup it created"
    );
    assert_no_programs_attached(s.cg.path());
}

#[test]
fn fail_closed_refuses_connects_while_draining() {
    let _g = serial();
    let mut s = scenario("e2e-closed");
    let app = s.cg.child("app");
    let proxy = skiff(&s, &["--cgroup", app.to_str().unwrap(), "--fail-closed"]);
    wait_ready(&s.ns);
    let out = client(&s.ns, &app, "10.96.0.1:80");
    assert!(out.starts_with("ok "), "{out}");
    admin(&s.ns, "POST", "/drain_listeners").unwrap();
    let out = client(&s.ns, &app, "10.96.0.2:80");
    assert!(out.starts_with("err stage=connect"), "fail-closed: {out}");
    let ms: u64 = field(&out, "elapsed_ms").unwrap().parse().unwrap();
    assert!(
        ms < 2000,
        "fail-closed must refuse at once, not hang: {out}"
    );
    stop(proxy);
    assert_no_programs_attached(s.cg.path());
}

#[test]
fn node_mode_captures_registered_cgroups_only() {
    let _g = serial();
    let mut s = scenario("e2e-node");
    let pod1 = s.cg.child("pod1");
    let pod2 = s.cg.child("pod2");
    let proxy_cg = s.cg.child_path("skiff-proxy");
    let proxy = skiff(
        &s,
        &[
            "--mode",
            "node",
            "--cgroup-root",
            s.cg.path().to_str().unwrap(),
        ],
    );
    wait_ready(&s.ns);
    let node = |args: &[&str]| skiff_node(&s.ns, args);
    // Not registered yet: not captured.
    let out = client(&s.ns, &pod1, "10.96.0.1:80");
    assert!(
        out.starts_with("err stage=connect"),
        "unregistered pod: {out}"
    );
    node(&["add-cgroup", pod1.to_str().unwrap()]);
    let out = client(&s.ns, &pod1, "10.96.0.1:80");
    assert!(out.starts_with("ok "), "registered pod: {out}");
    let out = client(&s.ns, &pod2, "10.96.0.1:80");
    assert!(out.starts_with("err stage=connect"), "other pod: {out}");

    // Even if the proxy's own cgroup is registered, its upstream connects carry the mark and
    // are never captured again: passthrough still reaches the real host.
    node(&["add-cgroup", proxy_cg.to_str().unwrap()]);
    let out = client(&s.ns, &pod1, "10.96.0.2:80");
    assert!(
        out.starts_with("ok "),
        "passthrough with the proxy meshed: {out}"
    );

    node(&["remove-cgroup", pod1.to_str().unwrap()]);
    let out = client(&s.ns, &pod1, "10.96.0.1:80");
    assert!(out.starts_with("err stage=connect"), "removed pod: {out}");
    stop(proxy);
    assert_no_programs_attached(s.cg.path());
}

#[test]
fn invalid_bootstrap_exits_2_naming_the_field() {
    let dir = std::env::temp_dir().join(skiff_tests::test_name("badboot"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("b.yaml");
    std::fs::write(
        &path,
        "static_resources:\n  clusters:\n  - name: c\n    type: STATIC\n    connect_timeout: -1s\n",
    )
    .unwrap();
    let out = Command::new(built_binary("skiff"))
        .args(["run", "--capture", "none", "--bootstrap"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("b.yaml"), "{err}");
    assert!(err.contains("connect_timeout"), "{err}");
}

/// (kind, name, version) of every dynamic resource shown in a `/config_dump?include_eds`.
fn dumped(dump: &serde_json::Value) -> std::collections::BTreeSet<(String, String, String)> {
    let mut out = std::collections::BTreeSet::new();
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    for cfg in dump["configs"].as_array().into_iter().flatten() {
        let ty = cfg["@type"].as_str().unwrap_or("");
        let (kind, list, inner, name_key) = if ty.ends_with("ListenersConfigDump") {
            ("listener", "dynamic_listeners", "active_state", "name")
        } else if ty.ends_with("ClustersConfigDump") {
            // A cluster whose endpoints never come stays warming, in skiff as in Envoy.
            for e in cfg["dynamic_warming_clusters"]
                .as_array()
                .into_iter()
                .flatten()
            {
                out.insert((
                    "cluster".into(),
                    s(&e["cluster"]["name"]),
                    s(&e["version_info"]),
                ));
            }
            ("cluster", "dynamic_active_clusters", "", "name")
        } else if ty.ends_with("RoutesConfigDump") {
            ("route", "dynamic_route_configs", "", "name")
        } else if ty.ends_with("EndpointsConfigDump") {
            ("endpoints", "dynamic_endpoint_configs", "", "cluster_name")
        } else {
            continue;
        };
        for e in cfg[list].as_array().into_iter().flatten() {
            if kind == "listener" && e[inner].is_null() {
                let w = &e["warming_state"];
                out.insert((
                    kind.into(),
                    s(&w["listener"]["name"]),
                    s(&w["version_info"]),
                ));
                continue;
            }
            let (res, version) = match kind {
                "listener" => (&e[inner]["listener"], &e[inner]["version_info"]),
                "cluster" => (&e["cluster"], &e["version_info"]),
                "route" => (&e["route_config"], &e["version_info"]),
                _ => (&e["endpoint_config"], &e["version_info"]),
            };
            if !res.is_null() {
                out.insert((kind.to_string(), s(&res[name_key]), s(version)));
            }
        }
    }
    out
}

fn kind_of(type_url: &str) -> &'static str {
    match type_url.rsplit('.').next() {
        Some("Listener") => "listener",
        Some("Cluster") => "cluster",
        Some("RouteConfiguration") => "route",
        _ => "endpoints",
    }
}

/// Every real config dump in the fixtures, replayed by `skiff control-plane
/// --from-config-dump` into a real `skiff run` (SotW for some, delta for others), loads with
/// NACKs only for what `skiff_tests::FIXTURE_REFUSALS` lists, and skiff's own `/config_dump`
/// shows every other resource name. Run in a private
/// netns because the dumps' listeners bind ports (0.0.0.0:15006 and such).
#[test]
fn every_fixture_config_dump_loads_without_nack() {
    let _g = serial();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/xds");
    let dumps = [
        ("istio-proxyconfig-full.json", "GRPC"),
        ("istio-compare-before.json", "DELTA_GRPC"),
        ("istio-sidecar-listeners-27.yaml", "GRPC"),
        ("istio-endpoints-32.json", "DELTA_GRPC"),
        ("istio-describe-http.json", "GRPC"),
        ("istio-gateway-routes-prefix.json", "DELTA_GRPC"),
        ("osm-curl-egress-config-dump.json", "GRPC"),
        ("kuma-full-config-dump.json", "DELTA_GRPC"),
    ];
    for (file, api) in dumps {
        let _env = require_root();
        let ns = Netns::new("fixtures");
        let path = fixtures.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let source =
            skiff_proto::parse_config_dump(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        // Endpoints are only requested for EDS clusters that exist and routes only when a
        // listener names them (a dump is a snapshot and may hold leftovers; Envoy would not
        // fetch those either).
        // What skiff refuses (honour or refuse, docs/COMPATIBILITY.md) is NACKed, so neither
        // it nor the endpoints and routes only it would fetch show up.
        let refused: std::collections::BTreeSet<&str> = skiff_tests::FIXTURE_REFUSALS
            .iter()
            .filter(|(f, _, _)| *f == file)
            .map(|(_, n, _)| *n)
            .collect();
        let refused_kinds: std::collections::BTreeSet<&str> = source
            .dynamic
            .iter()
            .filter(|r| refused.contains(r.name.as_str()))
            .map(|r| kind_of(&r.type_url))
            .collect();
        let clusters: std::collections::BTreeSet<&str> = source
            .dynamic
            .iter()
            .filter(|r| kind_of(&r.type_url) == "cluster" && !refused.contains(r.name.as_str()))
            .map(|r| r.name.as_str())
            .collect();
        let rds: std::collections::BTreeSet<String> = source
            .dynamic
            .iter()
            .filter(|r| kind_of(&r.type_url) == "listener" && !refused.contains(r.name.as_str()))
            .filter_map(|r| {
                use prost::Message;
                let pb = envoy_types::pb::envoy::config::listener::v3::Listener::decode(
                    r.resource.value.as_slice(),
                )
                .ok()?;
                skiff::model::Listener::try_from(&pb).ok()
            })
            .flat_map(|l| {
                l.filter_chains
                    .iter()
                    .chain(&l.default_filter_chain)
                    .filter_map(|c| match &c.action {
                        skiff::model::NetworkAction::Http(h) => h.rds_route_config_name.clone(),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let expected: std::collections::BTreeSet<(String, String)> = source
            .dynamic
            .iter()
            .map(|r| (kind_of(&r.type_url).to_string(), r.name.clone()))
            .filter(|(k, n)| k == "endpoints" || k == "route" || !refused.contains(n.as_str()))
            .filter(|(k, n)| k != "endpoints" || clusters.contains(n.as_str()))
            .filter(|(k, n)| k != "route" || rds.contains(n))
            .collect();
        // Some dumps hold EDS clusters without their endpoints: those warm for ever, so skiff
        // (like Envoy) turns ready only after initial_fetch_timeout, kept short here.
        // Dumps holding only routes or endpoints have nothing a client would subscribe to:
        // their resources are covered by direct_fixtures.rs (model conversion).

        let cp = Child::spawn(
            command_in(Some(&ns), None, built_binary("skiff"))
                .args([
                    "control-plane",
                    "--listen",
                    "127.0.0.1:15010",
                    "--from-config-dump",
                ])
                .arg(&path),
        );
        // Removed on drop, also when an assertion below fails.
        let bootstrap = TempYaml::new(
            "fx",
            &format!(
                r#"
node: {{ id: "sidecar~127.0.0.1~fixtures.default~default.svc.cluster.local", cluster: fixtures }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 15000 }} }} }}
dynamic_resources:
  ads_config:
    api_type: {api}
    transport_api_version: V3
    grpc_services: [ {{ envoy_grpc: {{ cluster_name: xds-grpc }} }} ]
  lds_config: {{ ads: {{}}, resource_api_version: V3, initial_fetch_timeout: 1s }}
  cds_config: {{ ads: {{}}, resource_api_version: V3, initial_fetch_timeout: 1s }}
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: xds-grpc
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 15010 }} }} }} }} ] }} ]
"#
            ),
        );
        let mut c = command_in(Some(&ns), None, built_binary("skiff"));
        c.args([
            "run",
            "--capture",
            "none",
            "--outbound-port",
            "15901",
            "--bootstrap",
        ])
        .arg(&bootstrap);
        let proxy = Child::spawn(&mut c);
        wait_ready(&ns);

        // Wait until every expected name shows (warming may take a round trip or two).
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut got = std::collections::BTreeSet::new();
        while Instant::now() < deadline {
            if let Some((200, body)) = admin(&ns, "GET", "/config_dump?include_eds") {
                let v: serde_json::Value =
                    serde_json::from_str(&body).expect("config_dump is JSON");
                got = dumped(&v)
                    .into_iter()
                    .map(|(k, n, _)| (k, n))
                    .collect::<std::collections::BTreeSet<_>>();
                if expected.is_subset(&got) {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let missing: Vec<_> = expected.difference(&got).collect();
        assert!(
            missing.is_empty(),
            "{file}: skiff's config_dump lacks {missing:?}"
        );
        for (t, kind) in [("lds", "listener"), ("cds", "cluster")] {
            let stat_name = match t {
                "lds" => "listener_manager.lds.update_rejected",
                _ => "cluster_manager.cds.update_rejected",
            };
            let nacks = stat(&ns, stat_name);
            if refused_kinds.contains(kind) {
                assert!(nacks > 0, "{file}: {stat_name}: the refusals were NACKed");
            } else {
                assert_eq!(nacks, 0, "{file}: {stat_name}");
            }
        }
        let (_, body) = admin(&ns, "GET", "/stats").unwrap();
        let rejected: Vec<&str> = body
            .lines()
            .filter(|l| {
                l.contains("update_rejected")
                    && !l.ends_with(": 0")
                    && !l.starts_with("listener_manager.lds")
                    && !l.starts_with("cluster_manager.cds")
            })
            .collect();
        assert!(rejected.is_empty(), "{file}: NACKs: {rejected:?}");
        stop(proxy);
        drop(cp);
    }
}
