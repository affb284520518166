// The one recipe for building skiff's eBPF object (`skiff-bpf`), shared by
// `cargo xtask build-ebpf` (`mod ebpf_recipe;`) and `proxy/build.rs`
// (`include!`, hence no inner attributes or `//!` docs here). Plain std only.

/// The pinned nightly with rust-src; its LLVM must not be newer than bpf-linker's (22).
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

/// The eBPF target triple.
pub const EBPF_TARGET: &str = "bpfel-unknown-none";

/// The eBPF crate and the name of its bin (the object file).
pub const EBPF_PACKAGE: &str = "skiff-ebpf";
pub const EBPF_BIN: &str = "skiff-bpf";

/// rustc flags, as aya-build passes them: the target arch cfg for aya-ebpf, debug info for BTF,
/// and `--btf` so bpf-linker emits a .BTF section (aya-log and readable verifier output).
pub const EBPF_RUSTFLAGS: [&str; 3] = [
    "--cfg=bpf_target_arch=\"x86_64\"",
    "-Cdebuginfo=2",
    "-Clink-arg=--btf",
];

/// Builds the eBPF object with the pinned nightly into `<workspace_root>/target/ebpf` (a
/// target dir of its own, so this can run nested inside an outer cargo) and returns its path.
///
/// Environment an outer cargo or rustup sets for a build script (compiler, wrappers, flags,
/// `CARGO_*` package and target settings, the jobserver) is removed so it cannot leak in.
pub fn build_ebpf(
    workspace_root: &std::path::Path,
    release: bool,
) -> Result<std::path::PathBuf, String> {
    let target_dir = workspace_root.join("target").join("ebpf");
    let mut cmd = std::process::Command::new("rustup");
    cmd.current_dir(workspace_root).args([
        "run",
        EBPF_TOOLCHAIN,
        "cargo",
        "build",
        "-p",
        EBPF_PACKAGE,
        "--bins",
        "--target",
        EBPF_TARGET,
        "-Z",
        "build-std=core",
    ]);
    if release {
        cmd.arg("--release");
    }
    cmd.arg("--target-dir").arg(&target_dir);
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if ebpf_env_leaks(key) {
            cmd.env_remove(key);
        }
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", EBPF_RUSTFLAGS.join("\x1f"));
    let output = cmd.output().map_err(|e| {
        format!("running `rustup run {EBPF_TOOLCHAIN} cargo build -p {EBPF_PACKAGE}`: {e} (is rustup installed?)")
    })?;
    if !output.status.success() {
        return Err(format!(
            "building {EBPF_PACKAGE} with {EBPF_TOOLCHAIN} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let profile = if release { "release" } else { "debug" };
    let object = target_dir.join(EBPF_TARGET).join(profile).join(EBPF_BIN);
    if object.is_file() {
        Ok(object)
    } else {
        Err(format!(
            "{EBPF_PACKAGE} built but {} is missing",
            object.display()
        ))
    }
}

/// Whether an environment variable set by an outer cargo/rustup/clippy must not reach the
/// nested build. Registry, network, terminal and home settings are kept.
pub fn ebpf_env_leaks(key: &str) -> bool {
    const KEEP: [&str; 6] = [
        "CARGO_HOME",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_TERM_",
    ];
    const DROP: [&str; 18] = [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_LINKER",
        "RUSTC_BOOTSTRAP",
        "RUSTFLAGS",
        "RUSTDOC",
        "RUSTDOCFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CLIPPY_ARGS",
        "TARGET",
        "HOST",
        "OUT_DIR",
        "OPT_LEVEL",
        "PROFILE",
        "DEBUG",
        "NUM_JOBS",
        "MAKEFLAGS",
    ];
    if key.starts_with("CARGO") {
        return !KEEP.iter().any(|k| key.starts_with(k));
    }
    DROP.contains(&key)
        || key == "MFLAGS"
        || key.starts_with("__CARGO")
        || key.starts_with("__CLIPPY")
}
