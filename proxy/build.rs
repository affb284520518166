//! Puts the eBPF object at `$OUT_DIR/skiff-bpf` for `include_bytes_aligned!`.
//!
//! `SKIFF_EBPF_OBJ=<path>` uses a prebuilt object (CI: `cargo xtask build-ebpf` once);
//! otherwise the object is built with the same recipe as `cargo xtask build-ebpf`, always in
//! release mode and cached in `target/ebpf`, so repeated check/clippy/test builds are fast.

use std::{
    env,
    path::{Path, PathBuf},
};

include!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../xtask/src/ebpf_recipe.rs"
));

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dest = out_dir.join(EBPF_BIN);
    println!("cargo:rerun-if-env-changed=SKIFF_EBPF_OBJ");

    let object = match env::var_os("SKIFF_EBPF_OBJ") {
        Some(obj) => {
            let obj = PathBuf::from(obj);
            println!("cargo:rerun-if-changed={}", obj.display());
            obj
        }
        None => {
            let workspace = manifest_dir
                .parent()
                .expect("proxy/ has a parent: the workspace root");
            for rel in [
                "ebpf/skiff-ebpf/src",
                "ebpf/skiff-ebpf/Cargo.toml",
                "ebpf/skiff-common/src",
                "ebpf/skiff-common/Cargo.toml",
                "xtask/src/ebpf_recipe.rs",
            ] {
                println!("cargo:rerun-if-changed={}", workspace.join(rel).display());
            }
            if let Some(linker) = find_in_path("bpf-linker") {
                println!("cargo:rerun-if-changed={}", linker.display());
            }
            match build_ebpf(workspace, true) {
                Ok(obj) => obj,
                Err(e) => panic!(
                    "\n\nskiff: building the eBPF object failed. Run `cargo xtask setup` \
                     (installs bpf-linker, the {EBPF_TOOLCHAIN} toolchain with rust-src), or set \
                     SKIFF_EBPF_OBJ to a prebuilt object from `cargo xtask build-ebpf`.\n\n{e}\n"
                ),
            }
        }
    };
    if let Err(e) = std::fs::copy(&object, &dest) {
        panic!(
            "\n\nskiff: copying the eBPF object {} to {}: {e}. Run `cargo xtask setup`, or set \
             SKIFF_EBPF_OBJ to an object built by `cargo xtask build-ebpf`.\n",
            object.display(),
            dest.display()
        );
    }
}

/// `which`, in plain std: the first executable `name` on PATH, else in `~/.cargo/bin`.
fn find_in_path(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = env::var_os("CARGO_HOME") {
        dirs.push(Path::new(&home).join("bin"));
    }
    if let Some(home) = env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo").join("bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}
