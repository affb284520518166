//! skiff's developer tasks: `cargo xtask setup | build-ebpf | demo | test | image | clean-test-env`.

mod bench;
mod demo;
mod ebpf_recipe;
mod image;
mod setup;
mod test;
mod util;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "skiff developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks (apt packages, eBPF toolchain, bpf-linker); idempotent.
    Setup {
        /// Also install the benchmark peers (iperf3, sockperf, wrk, haproxy, nginx, Envoy).
        #[arg(long)]
        bench: bool,
    },
    /// Build the eBPF object (target/ebpf/bpfel-unknown-none/release/skiff-bpf).
    BuildEbpf {
        /// Build in debug mode instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Lint the eBPF crate with its own toolchain and target (clippy, warnings are errors).
    CheckEbpf,
    /// Capture demo in a private network namespace: a client connects to a service VIP, the
    /// kernel steers it to skiff, skiff proxies it to a backend; prints the path taken.
    Demo,
    /// Benchmarks: skiff vs direct, iptables and Envoy/HAProxy/nginx, in one run.
    Bench(bench::BenchArgs),
    /// Run every test: unit, end-to-end, and root eBPF tests (needs root).
    Test,
    /// Build the container image (root `Dockerfile`) with docker or podman; without either,
    /// say so and build nothing.
    Image {
        /// Image tag.
        #[arg(long, default_value_t = image::default_tag())]
        tag: String,
    },
    /// Remove cgroups, network namespaces and processes that crashed tests left behind.
    CleanTestEnv,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Setup { bench } => setup::run().and_then(|()| {
            if bench {
                bench::install_tools()
            } else {
                Ok(())
            }
        }),
        Cmd::Bench(args) => bench::run(args),
        Cmd::BuildEbpf { debug } => ebpf_recipe::build_ebpf(&util::workspace_root(), !debug)
            .map(|p: PathBuf| println!("{}", p.display()))
            .map_err(|e| anyhow::anyhow!(e)),
        Cmd::CheckEbpf => check_ebpf(),
        Cmd::Demo => demo::run(),
        Cmd::Test => test::run(),
        Cmd::Image { tag } => image::run(&tag),
        Cmd::CleanTestEnv => test::clean_env(),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_ebpf() -> anyhow::Result<()> {
    let root = util::workspace_root();
    let mut cmd = std::process::Command::new("rustup");
    cmd.current_dir(&root)
        .args(["run", ebpf_recipe::EBPF_TOOLCHAIN, "cargo", "clippy", "-p"])
        .arg(ebpf_recipe::EBPF_PACKAGE)
        .args([
            "--bins",
            "--target",
            ebpf_recipe::EBPF_TARGET,
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(root.join("target").join("ebpf-check"))
        .args(["--", "-D", "warnings"]);
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(ebpf_recipe::ebpf_env_leaks) {
            cmd.env_remove(&key);
        }
    }
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        ebpf_recipe::EBPF_RUSTFLAGS.join("\x1f"),
    );
    util::run(&mut cmd)
}
