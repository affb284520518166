# skiff's container image. Build it with `cargo xtask image [--tag T]`, which passes the pins
# below from xtask/src/setup.rs and xtask/src/ebpf_recipe.rs (a unit test in
# xtask/src/image.rs keeps these defaults equal to them).
#
# Stage 1 builds with the same toolchains as `cargo xtask setup`: the stable Rust of the
# workspace, LLVM 22 + bpf-linker for the eBPF object, and the pinned nightly with rust-src.
# Stage 2 is debian:bookworm-slim with the `skiff` binary and what its iptables fallback runs.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS builder
ARG LLVM=22
ARG BPF_LINKER=0.13.0
ARG EBPF_TOOLCHAIN=nightly-2026-05-20
# bpf-linker links against LLVM's libraries (llvm-dev, polly, zstd); clang as setup installs it.
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      llvm-${LLVM}-dev libpolly-${LLVM}-dev libzstd-dev clang-${LLVM} \
 && rm -rf /var/lib/apt/lists/*
RUN LLVM_PREFIX=/usr/lib/llvm-${LLVM} cargo install --locked bpf-linker@${BPF_LINKER} \
      --no-default-features --features llvm-${LLVM}
RUN rustup toolchain install ${EBPF_TOOLCHAIN} --profile minimal --component rust-src
WORKDIR /src
COPY . .
# One recipe for the eBPF object (`cargo xtask build-ebpf` prints its path); the proxy embeds it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    SKIFF_EBPF_OBJ="$(cargo xtask build-ebpf)" \
 && SKIFF_EBPF_OBJ="$SKIFF_EBPF_OBJ" cargo build --release --locked -p skiff \
 && install -D -m 0755 target/release/skiff /out/skiff

FROM docker.io/library/debian:bookworm-slim
# iptables: `--capture iptables`, the fallback of `--capture auto` and `skiff cleanup` run
# iptables-{nft,legacy}-{save,restore} and their ip6tables twins (the package ships both
# backends). Nothing else: skiff never runs `ip` (iproute2), speaks plain h2c to the control
# plane (no CA bundle) and links only glibc and libgcc_s, which the base image has.
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/skiff /usr/local/bin/skiff
# No USER: loading BPF, attaching to cgroups and moving itself into the proxy cgroup need
# CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN and write access to root-owned cgroup files, which a
# non-root user only gets through ambient capabilities that Kubernetes cannot grant
# (deploy/kubernetes/daemonset.yaml says which capabilities are used and why).
ENTRYPOINT ["/usr/local/bin/skiff"]
CMD ["--help"]
