#!/usr/bin/env bash
# The project's main job: build the guest kernel and the VMM, then boot the guest.
# On a fresh Debian 12 machine with a Rust toolchain it installs what it needs itself.
# Extra arguments are passed to the vmm.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
kernel=$(./images/build-kernel.sh | tail -1)
initramfs=$(dirname "$kernel")/initramfs.cpio
cargo build --workspace --release --quiet
exec ./target/release/vmm --kernel "$kernel" --initramfs "$initramfs" --memory 256M "$@"
