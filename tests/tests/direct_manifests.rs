//! deploy/kubernetes/ checked offline: every manifest validates against the Kubernetes
//! schemas of a pinned version (`kubernetes-validate --strict`, installed by `cargo xtask
//! setup`; a missing tool fails the test), the kustomization lists exactly the node-mode
//! manifests, every `skiff run` command line in them parses with skiff's own CLI, and the
//! bootstrap template, rendered by the manifests' own init script, is a bootstrap skiff accepts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use envoy_types::pb::google::protobuf::value::Kind;
use serde_yaml::Value;

/// Kubernetes version the manifests must be valid for (native sidecars are on by default
/// since 1.29, `securityContext.appArmorProfile` is GA in 1.30).
const KUBERNETES_VERSION: &str = "1.30.0";

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .expect("deploy/kubernetes")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "{files:?}");
    files
}

fn load(name: &str) -> Value {
    let text = std::fs::read_to_string(dir().join(name)).expect(name);
    serde_yaml::from_str(&text).expect(name)
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let files: Vec<PathBuf> = manifests()
        .into_iter()
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(&files)
        .output()
        .unwrap_or_else(|e| {
            panic!("kubernetes-validate is missing ({e}): run `cargo xtask setup` (pip install kubernetes-validate)")
        });
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    // Every file passed, not merely "nothing failed" (an unknown kind is only a warning).
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy();
        assert!(
            report
                .lines()
                .any(|l| l.contains(&*name) && l.contains("passed")),
            "{name} did not pass:\n{report}"
        );
    }
    assert!(!report.contains("WARN"), "{report}");
}

#[test]
fn kustomization_lists_the_node_mode_manifests() {
    let k = load("kustomization.yaml");
    let listed: Vec<&str> = k["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .map(|v| v.as_str().expect("resource"))
        .collect();
    assert_eq!(
        listed,
        [
            "namespace.yaml",
            "serviceaccount.yaml",
            "configmap-bootstrap.yaml",
            "daemonset.yaml"
        ]
    );
    // Everything else in the directory is the sidecar alternative, applied on its own.
    let rest: Vec<String> = manifests()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|n| !listed.contains(&n.as_str()) && n != "kustomization.yaml")
        .collect();
    assert_eq!(rest, ["sidecar.yaml"]);
}

/// The pod template's containers and init containers.
fn containers(workload: &Value) -> Vec<&Value> {
    let spec = &workload["spec"]["template"]["spec"];
    ["initContainers", "containers"]
        .iter()
        .filter_map(|k| spec[*k].as_sequence())
        .flatten()
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .map(|x| x.as_str().expect("string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// /proc/self/cgroup of a container in a Burstable pod, in the host cgroup namespace
/// (systemd cgroup driver, containerd).
const CONTAINER_CGROUP: &str = "0::/kubepods.slice/kubepods-burstable.slice/\
    kubepods-burstable-pod0a1b2c3d_0000_4000_8000_000000000001.slice/cri-containerd-abc123.scope\n";

/// The `skiff ...` argv of a container: its command + args when the command is skiff, or
/// what the `exec /usr/local/bin/skiff ...` line of its `sh -c` script expands to in a pod
/// (the script runs with `exec skiff` replaced by a `printf` of the arguments, and
/// /proc/self/cgroup replaced by [`CONTAINER_CGROUP`]).
fn skiff_argv(c: &Value) -> Option<Vec<String>> {
    let command = strings(&c["command"]);
    let args = strings(&c["args"]);
    if command.first().is_some_and(|c| c.ends_with("/skiff")) {
        return Some(["skiff".to_owned()].into_iter().chain(args).collect());
    }
    let script = command.get(2)?;
    if command[..2] != ["/bin/sh", "-c"] || !script.contains("exec /usr/local/bin/skiff ") {
        return None;
    }
    let cgroup_file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(cgroup_file.path(), CONTAINER_CGROUP).expect("write");
    let script = script
        .replace("exec /usr/local/bin/skiff ", "exec printf '%s\\n' skiff ")
        .replace(
            "/proc/self/cgroup",
            &cgroup_file.path().display().to_string(),
        );
    let out = Command::new("/bin/sh")
        .args(["-c", &script])
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .lines()
            .map(str::to_owned)
            .collect(),
    )
}

#[test]
fn every_skiff_command_line_parses_with_skiffs_cli() {
    let mut runs = BTreeMap::new();
    for file in ["daemonset.yaml", "sidecar.yaml"] {
        let w = load(file);
        for c in containers(&w) {
            let name = c["name"].as_str().unwrap();
            if let Some(argv) = skiff_argv(c) {
                let cli = skiff::cli::Cli::try_parse_from(&argv)
                    .unwrap_or_else(|e| panic!("{file} {name}: {argv:?}: {e}"));
                runs.insert(format!("{file}/{name}"), cli);
            }
            // Probes that run skiff must use real subcommands too.
            for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                let cmd = strings(&c[probe]["exec"]["command"]);
                if let Some(first) = cmd.first() {
                    assert!(first.ends_with("/skiff"), "{file} {name} {probe}: {cmd:?}");
                    let mut argv = cmd.clone();
                    argv[0] = "skiff".into();
                    skiff::cli::Cli::try_parse_from(&argv)
                        .unwrap_or_else(|e| panic!("{file} {name} {probe}: {argv:?}: {e}"));
                }
            }
        }
    }
    let keys: Vec<&str> = runs.keys().map(String::as_str).collect();
    assert_eq!(keys, ["daemonset.yaml/skiff", "sidecar.yaml/skiff"]);
    use skiff::cli::{Command as Sub, Mode};
    let Sub::Run(node) = &runs["daemonset.yaml/skiff"].command else {
        panic!("the DaemonSet does not run `skiff run`")
    };
    assert_eq!(node.mode, Mode::Node);
    assert!(node.cgroup_root.is_some());
    let Sub::Run(sidecar) = &runs["sidecar.yaml/skiff"].command else {
        panic!("the sidecar does not run `skiff run`")
    };
    assert_eq!(sidecar.mode, Mode::Sidecar);
    // The pod's cgroup is the parent of skiff's container cgroup, which holds the proxy's.
    let (cgroup, proxy) = (
        sidecar.cgroup.as_deref().expect("--cgroup"),
        sidecar.proxy_cgroup.as_deref().expect("--proxy-cgroup"),
    );
    let pod = "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/\
               kubepods-burstable-pod0a1b2c3d_0000_4000_8000_000000000001.slice";
    assert_eq!(cgroup, Path::new(pod));
    assert_eq!(
        proxy,
        Path::new(pod).join("cri-containerd-abc123.scope/skiff-proxy")
    );
    // The node skiff's proxy cgroup is below its own container cgroup too.
    let node_proxy = node.proxy_cgroup.as_deref().expect("--proxy-cgroup");
    assert_eq!(
        node_proxy,
        Path::new(pod).join("cri-containerd-abc123.scope/skiff-proxy")
    );
    assert_eq!(
        node.cgroup_root.as_deref(),
        Some(Path::new("/sys/fs/cgroup/kubepods.slice"))
    );
}

/// Expands Kubernetes' `$(NAME)` references from `vars`.
fn expand(value: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = value.to_owned();
    for (k, v) in vars {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

#[test]
fn the_init_script_renders_a_bootstrap_skiff_accepts() {
    let template = load("configmap-bootstrap.yaml")["data"]["bootstrap.yaml"]
        .as_str()
        .expect("bootstrap.yaml in the ConfigMap")
        .to_owned();
    let mut scripts = Vec::new();
    for file in ["daemonset.yaml", "sidecar.yaml"] {
        let w = load(file);
        let init = containers(&w)
            .into_iter()
            .find(|c| c["name"].as_str() == Some("bootstrap"))
            .expect("bootstrap init container");
        // The downward API's values, as the kubelet would set them.
        let mut env = BTreeMap::from([
            ("POD_NAME".to_owned(), "skiff-x1".to_owned()),
            ("POD_NAMESPACE".to_owned(), "skiff-system".to_owned()),
            ("INSTANCE_IP".to_owned(), "10.1.2.3".to_owned()),
        ]);
        for e in init["env"].as_sequence().expect("env") {
            if let Some(v) = e["value"].as_str() {
                let v = expand(v, &env);
                env.insert(e["name"].as_str().unwrap().to_owned(), v);
            }
        }
        // istiod's name does not resolve here; localhost does, to 127.0.0.1.
        env.insert("ISTIOD_HOST".into(), "localhost".into());
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(tmp.path().join("template")).unwrap();
        std::fs::create_dir(tmp.path().join("run")).unwrap();
        std::fs::write(tmp.path().join("template/bootstrap.yaml"), &template).unwrap();
        scripts.push(strings(&init["command"])[2].clone());
        let script = strings(&init["command"])[2]
            .replace("/etc/skiff/", &format!("{}/", tmp.path().display()));
        let out = Command::new("/bin/sh")
            .args(["-c", &script])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .envs(&env)
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rendered = tmp.path().join("run/bootstrap.yaml");
        let text = std::fs::read_to_string(&rendered).expect("rendered bootstrap");
        assert!(
            !text
                .lines()
                .any(|l| l.matches('@').count() >= 2 && !l.contains("\"@type\"")),
            "{file}: a placeholder is left:\n{text}"
        );
        let b = skiff::config::load(&rendered).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(
            b.node.id,
            "sidecar~10.1.2.3~skiff-x1.skiff-system~skiff-system.svc.cluster.local"
        );
        assert_eq!(b.node.cluster, env["NODE_CLUSTER"]);
        let ads = b.ads.expect("ADS configured");
        assert_eq!(
            ads.server,
            skiff::config::GrpcTarget::Tcp("127.0.0.1:15010".parse().unwrap())
        );
        assert!(b.lds_ads && b.cds_ads);
        assert_eq!(b.admin, Some("127.0.0.1:15000".parse().unwrap()));
        let meta = b.raw.node.and_then(|n| n.metadata).expect("node metadata");
        let field = |k: &str| match meta.fields.get(k).and_then(|v| v.kind.as_ref()) {
            Some(Kind::StringValue(s)) => s.clone(),
            other => panic!("{file}: metadata {k}: {other:?}"),
        };
        assert_eq!(field("NAMESPACE"), "skiff-system");
        assert_eq!(field("INSTANCE_IPS"), "10.1.2.3");
        assert_eq!(field("POD_NAME"), "skiff-x1");
    }
    assert_eq!(
        scripts[0], scripts[1],
        "the two bootstrap init scripts differ"
    );
}
