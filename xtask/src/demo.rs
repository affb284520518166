//! `cargo xtask demo`: the capture demo on the embedded default configuration.
//!
//! Everything happens in a network namespace created here (only loopback, no route out) and a
//! cgroup created here that stands for the pod; both are removed at the end, also on failure.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::ebpf_recipe::build_ebpf;
use crate::util::{cgroup2_mount, is_root, run as sh, workspace_root};

/// The demo's bootstrap, embedded so the demo needs no file beside the binary.
const BOOTSTRAP: &str = include_str!("../../deploy/demo/bootstrap.yaml");

/// The reference Istio scenario (loopback variant) that `skiff control-plane` serves.
const XDS_FILES: [(&str, &str); 4] = [
    (
        "listeners.json",
        include_str!("../../deploy/demo/xds/listeners.json"),
    ),
    (
        "routes.json",
        include_str!("../../deploy/demo/xds/routes.json"),
    ),
    (
        "clusters.json",
        include_str!("../../deploy/demo/xds/clusters.json"),
    ),
    (
        "endpoints.json",
        include_str!("../../deploy/demo/xds/endpoints.json"),
    ),
];

struct Netns(String);
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Cgroups(Vec<PathBuf>);
impl Drop for Cgroups {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            for _ in 0..40 {
                if std::fs::remove_dir(p).is_ok() || !p.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
    }
}

/// A process this demo started; stopped by PID on drop (SIGTERM, then SIGKILL).
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: kill has no memory-safety preconditions; the PID is our own child.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn in_ns(ns: &str, program: &Path) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg(program);
    c
}

/// Runs the testpeer client from inside `cgroup` (joined by a shell before exec).
fn client(ns: &str, cgroup: Option<&Path>, peer: &Path, addr: &str) -> anyhow::Result<String> {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}")).arg("--");
    match cgroup {
        Some(cg) => c
            .args([
                "sh",
                "-c",
                "echo 0 > \"$1/cgroup.procs\" && shift && exec \"$@\"",
                "sh",
            ])
            .arg(cg)
            .arg(peer),
        None => c.arg(peer),
    };
    c.args(["client", addr, "--bytes", "1024", "--timeout-ms", "2000"]);
    let out = c.output().context("running the demo client")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn start_peer(ns: &str, peer: &Path, args: &[&str]) -> anyhow::Result<Proc> {
    let addr = args.get(1).copied().unwrap_or("");
    let mut child = in_ns(ns, peer)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting a demo backend")?;
    let out = child.stdout.take().context("backend stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    if !line.starts_with("ready") {
        bail!("backend {addr} did not start: {line}");
    }
    Ok(Proc(child))
}

/// Build, set up the namespace and cgroups, run skiff and the clients, print the paths.
pub fn run() -> anyhow::Result<()> {
    if !is_root() {
        bail!("the demo loads BPF programs and creates a netns and cgroups: run it as root");
    }
    crate::setup::run()?;
    let root = workspace_root();
    let obj = build_ebpf(&root, true).map_err(|e| anyhow::anyhow!(e))?;
    sh(Command::new(env!("CARGO"))
        .current_dir(&root)
        .env("SKIFF_EBPF_OBJ", &obj)
        .args(["build", "-p", "skiff", "-p", "skiff-tests", "--bins"]))?;
    let skiff = root.join("target/debug/skiff");
    let peer = root.join("target/debug/skiff-testpeer");
    let http_peer = root.join("target/debug/skiff-httppeer");

    let pid = std::process::id();
    let ns_name = format!("skiff-demo-{pid}");
    sh(Command::new("ip").args(["netns", "add", &ns_name]))?;
    let ns = Netns(ns_name.clone());
    sh(Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]))?;
    // A "real" host outside the mesh, reachable only inside the namespace.
    sh(Command::new("ip").args(["-n", &ns.0, "addr", "add", "10.96.0.2/32", "dev", "lo"]))?;

    let node = cgroup2_mount()?.join(format!("skiff-demo-{pid}"));
    let app = node.join("app");
    let mut cgs = Cgroups(vec![node.clone()]);
    std::fs::create_dir(&node).with_context(|| format!("creating {}", node.display()))?;
    std::fs::create_dir(&app)?;
    cgs.0.push(app.clone());
    cgs.0.push(node.join("skiff-proxy"));

    let _backends = [
        start_peer(&ns.0, &peer, &["echo", "127.0.0.11:8080"])?,
        start_peer(&ns.0, &peer, &["echo", "127.0.0.12:8080"])?,
        start_peer(&ns.0, &peer, &["echo", "10.96.0.2:80"])?,
        // The reference scenario's three HTTP endpoints (two zones).
        start_peer(
            &ns.0,
            &http_peer,
            &["serve", "127.0.0.11:50002", "bar-v1-zone-a-1"],
        )?,
        start_peer(
            &ns.0,
            &http_peer,
            &["serve", "127.0.0.12:50002", "bar-v1-zone-a-2"],
        )?,
        start_peer(
            &ns.0,
            &http_peer,
            &["serve", "127.0.0.13:50002", "bar-v1-zone-d-1"],
        )?,
    ];

    let bootstrap = std::env::temp_dir().join(format!("skiff-demo-{pid}.yaml"));
    std::fs::write(&bootstrap, BOOTSTRAP)?;
    let xds_dir = std::env::temp_dir().join(format!("skiff-demo-{pid}-xds"));
    std::fs::create_dir_all(&xds_dir)?;
    for (name, text) in XDS_FILES {
        std::fs::write(xds_dir.join(name), text)?;
    }
    let cp_log = std::env::temp_dir().join(format!("skiff-demo-{pid}-cp.log"));
    let _control_plane = Proc(
        in_ns(&ns.0, &skiff)
            .arg("control-plane")
            .arg("--dir")
            .arg(&xds_dir)
            .stderr(std::fs::File::create(&cp_log)?)
            .spawn()
            .context("starting skiff control-plane")?,
    );
    let log = std::env::temp_dir().join(format!("skiff-demo-{pid}.log"));
    let log_file = std::fs::File::create(&log)?;
    println!(
        "== skiff demo: netns {}, pod cgroup {}",
        ns.0,
        app.display()
    );
    let proxy = Proc(
        in_ns(&ns.0, &skiff)
            .arg("run")
            .arg("--bootstrap")
            .arg(&bootstrap)
            .arg("--cgroup")
            .arg(&app)
            .env("RUST_LOG", "info,skiff::dataplane=debug")
            .stderr(log_file)
            .spawn()
            .context("starting skiff")?,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("skiff ready") {
            break;
        }
        if Instant::now() > deadline || text.contains("ERROR") {
            bail!("skiff did not become ready:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "== skiff is ready; eBPF capture attached to the pod cgroup; config from skiff control-plane\n"
    );

    let cases: [(&str, Option<&Path>, &str); 4] = [
        (
            "pod -> service VIP (captured, cluster)",
            Some(&app),
            "10.96.0.1:80",
        ),
        (
            "pod -> service VIP again (round robin)",
            Some(&app),
            "10.96.0.1:80",
        ),
        (
            "pod -> 10.96.0.2:80 (captured, passthrough)",
            Some(&app),
            "10.96.0.2:80",
        ),
        (
            "host process -> service VIP (not captured)",
            None,
            "10.96.0.1:80",
        ),
    ];
    let mut failures = 0;
    for (what, cg, addr) in cases {
        let out = client(&ns.0, cg, &peer, addr)?;
        let expect_ok = cg.is_some();
        let ok = out.starts_with("ok ") == expect_ok;
        if !ok {
            failures += 1;
        }
        println!(
            "{what}\n    client: {out}{}",
            if ok { "" } else { "   <-- unexpected" }
        );
    }
    // HTTP through the reference scenario: listener 0.0.0.0_50002 -> route 50002 -> virtual
    // host by Host header -> EDS cluster outbound|50002|v1|bar-service... -> 3 endpoints.
    println!(
        "\n== HTTP through the reference Istio scenario (listener 127.0.0.1:50002, route 50002):"
    );
    for host in [
        "bar-service.bar-namespace.svc.cluster.local:50002",
        "bar-service",
        "172.16.0.2:50002",
        "bar-service.bar-namespace.svc.cluster.local:50002",
        "bar-service",
        "unknown.example",
    ] {
        let out = in_ns(&ns.0, &http_peer)
            .args(["get", "127.0.0.1:50002", host, "/"])
            .output()?;
        let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let expect_ok = host != "unknown.example";
        let ok = line.starts_with("status=200") == expect_ok
            && (expect_ok || line.starts_with("status=404"));
        if !ok {
            failures += 1;
        }
        println!(
            "    GET Host: {host:<52} -> {line}{}",
            if ok { "" } else { "   <-- unexpected" }
        );
    }

    // The configuration skiff took from the control plane, in Envoy's admin dialect.
    let path = "/config_dump?resource=dynamic_active_clusters";
    let mut dump = String::new();
    for _ in 0..100 {
        let out = in_ns(&ns.0, &skiff).args(["admin", path]).output()?;
        dump = String::from_utf8_lossy(&out.stdout).into_owned();
        if dump.contains("outbound|50002|v1|bar-service") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("\n== skiff admin {path}   (what `curl 127.0.0.1:15000{path}` shows in the pod)");
    for line in dump
        .lines()
        .filter(|l| l.contains("\"name\"") || l.contains("version_info") || l.contains("\"type\""))
    {
        println!("  {}", line.trim());
    }
    if !dump.contains("outbound|50002|v1|bar-service.bar-namespace.svc.cluster.local") {
        failures += 1;
        println!("  <-- the EDS cluster from the control plane is missing");
    }
    let acks = std::fs::read_to_string(&cp_log).unwrap_or_default();
    println!("\n== the control plane's log of this client:");
    for line in acks
        .lines()
        .filter(|l| l.contains(" ACK ") || l.contains(" NACK "))
    {
        let l = line
            .split_once("skiff::controlplane")
            .map(|(_, r)| r)
            .unwrap_or(line);
        println!("    {}", l.trim_start_matches(|c| c != ' ').trim());
    }
    std::thread::sleep(Duration::from_millis(200));
    drop(proxy);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    println!("\n== the path of each proxied connection, from skiff's log:");
    for line in text.lines().filter(|l| l.contains("connection closed")) {
        // Drop the timestamp and level; keep the span (the path) and the byte counts.
        let l = line.split_once("conn{").map(|(_, r)| r).unwrap_or(line);
        println!("    {{{l}");
    }
    let _ = std::fs::remove_file(&bootstrap);
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&cp_log);
    let _ = std::fs::remove_dir_all(&xds_dir);
    drop(cgs);
    drop(ns);
    if failures > 0 {
        bail!("{failures} demo step(s) did not behave as expected");
    }
    println!("\n== done: namespace, cgroups and BPF links removed");
    Ok(())
}
