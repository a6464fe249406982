#!/usr/bin/env bash
# Builds and runs every fuzz target (devices/fuzz) for SECONDS each (default 60), starting from
# the seeds the bodies' unit tests write (requests that attach, map and unmap; a whole
# vfio-user conversation; a minimal migration stream, as records and raw) and from the corpus
# kept in devices/fuzz/corpus/<target>. The bodies are devices::fuzzing, vmm::migration::fuzzing and
# vmm::api::fuzzing; the test command runs them as property tests and runs this script for
# 10 s each, and tests/stress.sh runs it for 60 s each. Prints the executions of each target;
# fails on the first crash (its input is in devices/fuzz/artifacts/<target>).
#
# Installs cargo-fuzz when missing. libFuzzer needs nightly features: RUSTC_BOOTSTRAP=1 lets
# the stable toolchain build them.
#
# FUZZ_SANITIZER=none builds without AddressSanitizer (cargo fuzz -s none): several times the
# executions per second for long runs of these targets, whose code is safe Rust over
# vm-memory; the default (address) is what the test command's run (10 s each) uses.
#
# Usage: tests/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-60}
shift || true
[[ "$secs" =~ ^[0-9]+$ ]] || { echo "fuzz.sh: '$secs' is not a number of seconds" >&2; exit 2; }
all=(virtio_iommu_queue migration_stream vfio_user_replies virtio_blk pci_dispatch function_states api_requests vhost_user_backend_channel)
targets=("$@")
((${#targets[@]})) || targets=("${all[@]}")

if ! command -v cargo >/dev/null 2>&1; then
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked --quiet
fi
seeds=$(mktemp -d "${TMPDIR:-/tmp}/vmm-fuzz-seeds.XXXXXX")
trap 'rm -rf "$seeds"' EXIT
# The same command as the test command's own run (every test binary, filtered to the seed
# writers): it reuses that build instead of building the crates once more.
echo "fuzz.sh: writing seeds" >&2
VMM_FUZZ_SEED_DIR=$seeds cargo test --workspace --release --quiet -- \
    fuzzing::tests::the_seeds_pass >/dev/null
export RUSTC_BOOTSTRAP=1

# FUZZ_DEV=1 builds the targets unoptimised (cargo fuzz --dev): half the build time, fewer
# executions per second.
profile=()
[ "${FUZZ_DEV:-0}" = 1 ] && profile=(--dev)

cd devices/fuzz
status=0
for t in "${targets[@]}"; do
    corpus=corpus/$t
    mkdir -p "$corpus" "$seeds/$t"
    echo "fuzz.sh: $t for $secs s" >&2
    log=$(mktemp)
    if cargo fuzz run ${profile[@]+"${profile[@]}"} -s "${FUZZ_SANITIZER:-address}" "$t" "$corpus" "$seeds/$t" -- -max_total_time="$secs" \
        -print_final_stats=1 > "$log" 2>&1; then
        runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
        echo "fuzz: $t: $runs executions in $secs s, no crash"
    else
        echo "fuzz: $t: CRASHED (input in devices/fuzz/artifacts/$t); the fuzzer's last lines:"
        tail -30 "$log"
        status=1
    fi
    rm -f "$log"
done
exit $status
