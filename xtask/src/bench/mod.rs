//! `cargo xtask bench`: skiff against direct, iptables and peer proxies, side by side.

/// Command-line options of `cargo xtask bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A few seconds per case (smoke run).
    #[arg(long)]
    pub quick: bool,
}

/// Install the benchmark peers and load generators (`cargo xtask setup --bench`).
pub fn install_tools() -> anyhow::Result<()> {
    anyhow::bail!("bench tools: not written yet")
}

/// Run the benchmark.
pub fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench: not written yet")
}
