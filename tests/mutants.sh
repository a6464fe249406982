#!/usr/bin/env bash
# Mutation testing (cargo-mutants): every mutant of the mapping core (iommu/) and of the
# virtio-iommu device (devices/src/virtio/iommu/) must be caught by a test, or be listed in
# tests/README.md as equivalent with the reason. With `all`, also the dirty-tracking and
# migration paths (vmm/src/machine/dirty.rs, vmm/src/migration/, the vfio-user DMA backend).
#
# Not part of the test command (it takes most of an hour on 2 cores). Installs cargo-mutants
# when missing. Property tests run with PROPTEST_CASES=16 (default here) to keep each
# mutant's test run short. Results: target/mutants/<part>/mutants.out/{caught,missed}.txt.
#
# Usage: tests/mutants.sh [all|crates|process]   (ITERATE=1: only re-test what was missed or timed
# out last time, cargo-mutants --iterate). `process`: the parts judged with the process-level
# tests too (hours; VMM_TEST_KERNEL as for the tests).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
if ! cargo mutants --version >/dev/null 2>&1; then
    echo "mutants.sh: installing cargo-mutants" >&2
    cargo install cargo-mutants --locked --quiet
fi
export PROPTEST_CASES=${PROPTEST_CASES:-16}
out=${MUTANTS_OUT:-target/mutants}
jobs=${JOBS:-2}
# Seconds a mutant's tests may take before it counts as timed out (caught: a mutant that
# makes a test loop is detected). The unmutated tests take about 2 s with 16 cases.
limit=${MUTANTS_TIMEOUT:-10}
# Test helpers (the recording backend, request builders, the migration tests' fault hook,
# the vhost-user log's test hook) and Debug impls are not product code.
skip='RecordingBackend|RecordingLog|impl Debug|impl fmt::Debug|<impl Debug|test_fault|LogFault::from_env'

run() { # run NAME cargo-mutants-args...
    local name=$1
    shift
    echo "mutants.sh: $name" >&2
    ${mutants_bin:-cargo} mutants ${ITERATE:+--iterate} --jobs "$jobs" --timeout "${limit}" --output "$out/$name" --exclude-re "$skip" "$@" \
        > "$out/$name.log" 2>&1 || true
    local d="$out/$name/mutants.out" caught missed timeout unviable
    # Unviable mutants of every run of this part: with ITERATE, cargo-mutants lists them in
    # previously_caught.txt with what earlier runs caught, and they must not count as caught.
    local unv="$out/$name.unviable.txt"
    { cat "$d/unviable.txt" ${ITERATE:+"$unv"} 2>/dev/null || true; } | sort -u > "$unv.new"
    mv "$unv.new" "$unv"
    # With ITERATE, what earlier runs caught is in previously_caught.txt.
    # (`|| true`: without an earlier run there is no previously_caught.txt, and with
    # pipefail a failing cat would end the script here.)
    caught=$({ cat "$d/caught.txt" "$d/previously_caught.txt" 2>/dev/null || true; } | sort -u \
        | comm -23 - "$unv" | wc -l)
    missed=$(wc -l < "$d/missed.txt")
    timeout=$(wc -l < "$d/timeout.txt"); unviable=$(wc -l < "$unv")
    echo "mutants: $name: $caught caught, $missed missed, $timeout timed out, $unviable unviable;" \
        "score $(( 100 * (caught + timeout) / (caught + missed + timeout) ))% (missed: $d/missed.txt)"
}

# process NAME PACKAGE TEST FILE...: the mutants of FILE... that PACKAGE's unit tests miss
# are tested again with the process-level test binary TEST of tests/tests/ (release build,
# the workspace's binaries built before each test run by tests/mutants-cargo.sh). The part's
# figures are those of the second run (cargo-mutants --iterate counts what the first caught).
process() {
    local name=$1 package=$2 test=$3
    shift 3
    local files=()
    for f in "$@"; do files+=(--file "$f"); done
    run "$name" --package "$package" "${files[@]}" -- --lib
    # cargo-mutants run as a cargo subcommand would get $CARGO set back to cargo itself.
    MUTANTS_REAL_CARGO=$(command -v cargo) CARGO=$PWD/tests/mutants-cargo.sh ITERATE=1 \
        limit=${PROCESS_TIMEOUT:-300} mutants_bin=cargo-mutants \
        run "$name" --package "$package" --test-package vmm-tests --profile release \
        --baseline skip "${files[@]}" -- --test "$test"
}

mkdir -p "$out"
if [ "${1:-}" = crates ]; then
    # The scope issue 24 names, by crate, with each crate's unit tests. `vmm`: the machine
    # (memory, vCPUs, dirty tracking, passthrough, restore order) and migration (the sender
    # too: its unit tests migrate between two machines of one process), but the fuzz target
    # (not product code). `devices`: the network device and its vhost-user back end,
    # passthrough (VFIO, vfio-user) and seccomp, but the fuzz targets' bodies (`fuzzing::`,
    # not product code); without the fuzz tests of the block device and the vIOMMU queue,
    # which reach none of it. `tests/mutants.sh crates devices` runs one crate.
    [ "${2:-vmm}" = vmm ] && run vmm --package vmm --file 'vmm/src/machine/**/*.rs' \
        --file 'vmm/src/migration/**/*.rs' --exclude vmm/src/migration/fuzzing.rs -- --lib
    devices=(--package devices --exclude-re 'fuzzing::'
        --file 'devices/src/virtio/net/**/*.rs' --file 'devices/src/passthrough/**/*.rs'
        --file devices/src/seccomp.rs --exclude devices/src/passthrough/pci/testing.rs)
    skips=(--skip fuzzing::tests::virtio_blk --skip fuzzing::tests::virtio_iommu_queue)
    [ "${2:-devices}" = devices ] && run devices "${devices[@]}" -- --lib -- "${skips[@]}"
    # Then every mutant `devices`' own tests missed, judged again by name with `vmm`'s unit
    # tests too (`crates devices-vmm` runs this alone): they build machines with the DMA test
    # device served in-process, and so drive the passthrough model and the vfio-user client
    # and backend as the VMM does. About 11 s a mutant here (both crates' tests take 7 s: a
    # 30 s limit).
    if [ "${2:-devices}" = devices ] || [ "${2:-}" = devices-vmm ]; then
        d1="$out/devices/mutants.out" d2="$out/devices-vmm/mutants.out"
        res=()
        while IFS= read -r m; do
            res+=(--re "^$(printf '%s' "$m" | sed 's/[][\.*^$(){}?+|/]/\\&/g')\$")
        done < <(grep -v -E "$skip" "$d1/missed.txt" || true)
        rm -rf "$out/devices-vmm"
        if [ ${#res[@]} -gt 0 ]; then
            limit=${MUTANTS_TIMEOUT:-30} run devices-vmm "${devices[@]}" "${res[@]}" \
                --test-package devices --test-package vmm -- --lib -- "${skips[@]}"
        fi
        # The crate's figures: the first run's caught and timed out, and the second run's
        # outcomes for the first run's survivors.
        missed=$({ cat "$d2/missed.txt" 2>/dev/null || true; } | wc -l)
        timeout=$({ cat "$d1/timeout.txt"; cat "$d2/timeout.txt" 2>/dev/null || true; } | wc -l)
        caught=$({ cat "$d1/caught.txt" "$d1/previously_caught.txt" "$d2/caught.txt" \
            2>/dev/null || true; } | sort -u | comm -23 - "$out/devices.unviable.txt" | wc -l)
        sort "$d2/missed.txt" > "$out/devices-crate-missed.txt" 2>/dev/null || true
        echo "mutants: devices (crate): $caught caught, $missed missed, $timeout timed out;" \
            "score $(( 100 * (caught + timeout) / (caught + missed + timeout) ))%" \
            "(missed: $out/devices-crate-missed.txt)"
    fi
    exit 0
fi
if [ "${1:-}" = process ]; then
    # Seccomp, with the seccomp tests (about a minute per mutant here).
    process devices-seccomp devices seccomp devices/src/seccomp.rs
    # The vhost-user back end's dirty log, with the vhost-user migration tests.
    process devices-net-log devices migration_net devices/src/virtio/net/dirty_log.rs \
        devices/src/virtio/net/vhost_user/migration.rs
    # The migration sender, with the migration tests (about 2 minutes per mutant here).
    process vmm-send vmm migration vmm/src/migration/send.rs
    exit 0
fi
run iommu --package iommu --exclude iommu/src/testing.rs
run virtio-iommu --package devices --file 'devices/src/virtio/iommu/*.rs'
if [ "${1:-}" = all ]; then
    run vmm-dirty-migration --package vmm --file vmm/src/machine/dirty.rs --file 'vmm/src/migration/*.rs'
    run vfio-user-dma --package devices --file devices/src/passthrough/vfio_user_backend.rs
fi
