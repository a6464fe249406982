#!/usr/bin/env bash
# The long stress runs, outside the test command: the Linux DMA suite with its full 100,000
# map/unmap cycles and 10,000 latency samples (lazy; strict 20,000 cycles; without the vIOMMU
# 100,000), and the Linux net suite with 10,000 frames each way behind the vIOMMU (lazy and
# strict) and 3,000 without it, and the concurrent suite on two vCPUs with 300 rounds per CPU,
# lazy and strict. The test command (tests/run.sh) runs the same cases short
# (3,000 cycles, 300 samples, 300 frames, 50 rounds; the concurrent suite lazy only). Prints the suites' figures: throughput,
# latency, map/unmap rate, frames, IOTLB counters. About 20 minutes on this project's
# machines, more with linux_concurrent. Then, as the pseudo-test `fuzz`, every fuzz target
# for 60 s under AddressSanitizer (tests/fuzz.sh 60; the test command runs the same bodies as
# property tests instead, without building the fuzzers). Installs what it needs, as
# tests/run.sh does.
#
# Usage: tests/stress.sh [TEST...]   (default: linux_suite linux_net linux_concurrent fuzz)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
. ./images/common.sh
install_packages tests/stress.sh dpdk-dev

kernel=$(./images/build-kernel.sh | tail -1)
export VMM_TEST_KERNEL="$kernel" VMM_STRESS=1

tests=("$@")
((${#tests[@]})) || tests=(linux_suite linux_net linux_concurrent fuzz)
args=()
fuzz=0
for t in "${tests[@]}"; do
    if [ "$t" = fuzz ]; then fuzz=1; else args+=(--test "$t"); fi
done

start=$(date +%s)
status=0
if ((${#args[@]})); then
    cargo test --release -p vmm-tests "${args[@]}" -- --nocapture 2>&1 |
        tee "${TMPDIR:-/tmp}/vmm-stress.log" |
        grep -E '^(test |test result|figure|# (throughput|latency:|map_unmap: [0-9]+ cycles in|net)|(Lazy|Strict|NoIommu): [0-9]+ s|counters: )' || true
    status=${PIPESTATUS[0]}
fi
if ((fuzz)); then
    ./tests/fuzz.sh 60 || status=1
fi
echo "stress: ${tests[*]} in $(( $(date +%s) - start )) s (exit $status; full log in ${TMPDIR:-/tmp}/vmm-stress.log)"
exit "$status"
