#!/usr/bin/env bash
# The project's test command. On a fresh Debian 12 machine with a Rust toolchain it installs
# what it needs (kernel build dependencies and DPDK's testpmd via apt-get, crates via cargo),
# builds the guest kernel (cached outside the tree), checks formatting and lints, builds
# everything and runs every test: unit, device, property, process-level and guest tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || {
    echo "tests/run.sh: needs a Rust toolchain (https://rustup.rs)" >&2
    exit 1
}

start=$(date +%s)
step() { printf '\n=== [%d s] %s\n' "$(($(date +%s) - start))" "$*"; }

step "packages: dpdk-dev (dpdk-testpmd, the vhost-user back end of the net tests)"
. ./images/common.sh
install_packages tests/run.sh dpdk-dev
command -v dpdk-testpmd

step "guest kernel (images/build-kernel.sh)"
kernel=$(./images/build-kernel.sh | tail -1)
export VMM_TEST_KERNEL="$kernel"
echo "$kernel"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

step "cargo build --release"
cargo build --workspace --release --quiet

step "cargo test --release"
cargo test --workspace --release

step "the patched vhost crate's own tests (third_party/vhost: the device IOTLB messages and their reply-ack wait)"
# Outside the workspace (a patched copy of rust-vmm's crate), so built on its own, in a target
# directory of its own under this one.
CARGO_TARGET_DIR=target/third-party cargo test --release --quiet \
    --manifest-path third_party/vhost/Cargo.toml \
    --features vhost-user-frontend,vhost-user-backend --lib

step "every fuzz target for 10 s (tests/fuzz.sh 10: libFuzzer under AddressSanitizer, from the bodies' seeds and the corpus)"
./tests/fuzz.sh 10

step "the main job, short (images/run-suite.sh --cycles 500 --samples 200: its own verdict and page-set check)"
# The workspace build above has the test hooks (the vmm-tests crate asks for them): the same
# features here reuse it instead of building vmm and devices again without them.
VMM_CARGO_FEATURES=vmm/test-hooks ./images/run-suite.sh --cycles 500 --samples 200

step "host VFIO against a real kernel (devices: passthrough::vfio::tests::real_host_vfio)"
if [ -n "${VMM_TEST_VFIO_DEVICE:-}" ] && [ -e /dev/vfio/vfio ]; then
    cargo test --release -p devices --lib -- --ignored real_host_vfio
elif [ ! -e /dev/vfio/vfio ]; then
    echo "SKIP: /dev/vfio/vfio does not exist (no VFIO on this host); the type1 and iommufd"
    echo "      request layouts and retry protocols are covered against fakes above"
else
    echo "SKIP: set VMM_TEST_VFIO_DEVICE=/sys/bus/pci/devices/<BDF> (bound to vfio-pci) to run it"
fi

step "all tests passed in $(( $(date +%s) - start )) s"
