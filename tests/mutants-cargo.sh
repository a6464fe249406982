#!/usr/bin/env bash
# `cargo` as cargo-mutants runs it for the process-level parts of tests/mutants.sh: before
# `cargo test`, builds the workspace's binaries in the same profile, because the tests in
# tests/tests/ run target/<profile>/vmm (and the DMA test device, the test guest), which
# `cargo test -p vmm-tests` does not build. Every other command goes to cargo unchanged.
set -uo pipefail
real=${MUTANTS_REAL_CARGO:-cargo}
if [ "${1:-}" = test ]; then
    profile=()
    for a in "$@"; do
        case $a in
        --release) profile=(--release) ;;
        --profile=*) profile=("$a") ;;
        esac
    done
    prev=
    for a in "$@"; do
        [ "$prev" = --profile ] && profile=(--profile "$a")
        prev=$a
    done
    "$real" build --workspace --bins "${profile[@]}" || exit $?
fi
exec "$real" "$@"
