#!/usr/bin/env bash
# The project's main job: build the guest kernel (with the DMA suite built in), the VMM and
# the DMA test device; start the device; boot Linux with the virtio-iommu in front of the
# device; show the suite's KTAP results and a summary. Exit status 0 only when every suite ran
# its whole plan with no failure, the guest gave its verdict (a panic or a reset is not one),
# and the VMM's dirty log holds exactly the pages the suite made the devices write.
#
# On a fresh Debian 12 machine with a Rust toolchain it installs what it needs itself
# (Debian packages with apt-get, crates with cargo). $VMM_CARGO_FEATURES, when set, goes to
# that build as --features (the test command sets vmm/test-hooks, so that the binary its
# tests built is used as it is rather than rebuilt without the hooks).
#
# Usage: images/run-suite.sh [options] [-- extra vmm arguments]
#   --no-iommu        the device is not behind the vIOMMU (fault cases are then skipped)
#   --devices N       DMA test devices, each its own process (default 1); the suite runs on each
#   --strict          strict invalidation in the guest (iommu.strict=1); default lazy
#   --stress          the full stress run: 100,000 map/unmap cycles and 10,000 latency
#                     samples (about 9 minutes here; the test command runs it)
#   --cycles N        map/unmap cycles of the many-small-mappings case (default 5000: results
#                     within a couple of minutes of the build)
#   --samples N       map+unmap latency samples (default 2000)
#   --cases LIST      comma-separated case groups: copy,fill,dirty_sparse,sg,coherent,
#                     map_unmap,fault_ro,fault_unmapped,fault_stale,latency,throughput (default all)
#   --max-size BYTES  largest copy/fill (default 4194304)
#   --memory SIZE     guest RAM (default 256M)
#   --logs DIR        where the console and VMM logs go (default a new temporary directory)
#   --compare DIR     the logs of an earlier run (say with --no-iommu): its throughput is drawn
#                     next to this run's in throughput.svg
#   --deadline SECS   the VM is stopped after SECS seconds without a verdict, and the run says
#                     it hung (default 1800; 3600 with --stress)
#
# Pictures (gnuplot from Debian): LOGS/latency.svg, the map+unmap latency histogram, and
# LOGS/throughput.svg, the DMA throughput of each copy size (with --compare, both runs).
set -euo pipefail
cd "$(dirname "$0")/.."

iommu=1 strict=0 cycles=5000 samples=2000 cases=all max_size=4194304 memory=256M logs= devices=1
compare= deadline=
extra=()
while (($#)); do
    case "$1" in
    --no-iommu) iommu=0 ;;
    --strict) strict=1 ;;
    --stress) cycles=100000 samples=10000 ;;
    --devices) devices=${2:?--devices needs a number}; shift ;;
    --cycles) cycles=${2:?--cycles needs a number}; shift ;;
    --samples) samples=${2:?--samples needs a number}; shift ;;
    --cases) cases=${2:?--cases needs a list}; shift ;;
    --max-size) max_size=${2:?--max-size needs a number}; shift ;;
    --memory) memory=${2:?--memory needs a size}; shift ;;
    --logs) logs=${2:?--logs needs a directory}; shift ;;
    --compare) compare=${2:?--compare needs a directory}; shift ;;
    --deadline) deadline=${2:?--deadline needs a number of seconds}; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run-suite: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ -n "$deadline" ] || { [ "$cycles" -ge 100000 ] 2>/dev/null && deadline=3600 || deadline=1800; }
for n in "$cycles" "$samples" "$max_size" "$devices" "$deadline"; do
    [[ "$n" =~ ^[0-9]+$ ]] || { echo "run-suite: '$n' is not a number" >&2; exit 2; }
done

. ./images/common.sh
say() { printf '\033[1mrun-suite:\033[0m %s\n' "$*" >&2; }
start=$(date +%s)
need_cargo run-suite

say "building the guest kernel with the DMA suite (cached after the first build)"
kernel=$(./images/build-kernel.sh | tail -1)
initramfs=$(dirname "$kernel")/initramfs.cpio
say "building the VMM and the DMA test device"
cargo build --release --quiet -p vmm -p testdev --bin vmm --bin dma-test-device \
    ${VMM_CARGO_FEATURES:+--features "$VMM_CARGO_FEATURES"}

[ -n "$logs" ] || logs=$(mktemp -d "${TMPDIR:-/tmp}/vmm-suite.XXXXXX")
mkdir -p "$logs"
pids=()
trap 'kill ${pids[*]} ${follower:-} 2>/dev/null || true' EXIT
sockets=()
for i in $(seq "$devices"); do
    socket="$logs/dma-test-device-$i.sock"
    rm -f "$socket"
    ./target/release/dma-test-device --socket "$socket" 2> "$logs/device-$i.log" &
    pids+=($!)
    for _ in $(seq 100); do [ -S "$socket" ] && break; sleep 0.05; done
    [ -S "$socket" ] || { echo "run-suite: DMA test device $i did not start; see $logs/device-$i.log" >&2; exit 1; }
    sockets+=("$socket")
done

cmdline="console=ttyS0 reboot=k panic=1 vmm_dmatest.required=1 vmm_dmatest.cases=$cases"
cmdline+=" vmm_dmatest.cycles=$cycles vmm_dmatest.samples=$samples vmm_dmatest.max_size=$max_size"
[ $strict -eq 1 ] && cmdline+=" iommu.strict=1"
rm -f "$logs/dirty.log"
args=(--kernel "$kernel" --initramfs "$initramfs" --memory "$memory" --counters --track-dirty
      --dirty-log-out "$logs/dirty.log" --serial "file=$logs/console.log")
behind=
[ $iommu -eq 1 ] && behind=,iommu=on
for socket in "${sockets[@]}"; do
    args+=(--vfio-user "socket=$socket$behind")
done
if [ $iommu -eq 1 ]; then
    args+=(--iommu)
    mode="behind the virtio-iommu, $([ $strict -eq 1 ] && echo strict || echo lazy) invalidation"
else
    mode="not behind an IOMMU"
fi
mode+=", $devices DMA test device"
[ "$devices" -gt 1 ] && mode+=s
say "booting Linux with the DMA test device $mode; $cycles map/unmap cycles (guest code runs in"
say "KVM's instruction emulator on PVM hosts: expect about 4 ms per cycle behind the vIOMMU)"
: > "$logs/console.log"
follow_ktap "$logs/console.log"
set +e
timeout -k 10 "$deadline" ./target/release/vmm "${args[@]}" --cmdline "$cmdline" "${extra[@]}" \
    2> "$logs/vmm.log"
status=$?
set -e
stop_following
hung=0
[ $status -eq 124 ] && hung=1

# Summary: one line per suite (one per DMA test device), the guest's verdict, the figures, and
# the written pages as a set against the VMM's dirty log.
console=$(sed 's/^\[ *[0-9.]*\] //' "$logs/console.log" | tr -d '\r')
field() { # field LINE-PREFIX KEY: the value of KEY= on the first line starting with PREFIX
    grep -m1 "^$1" | grep -o " $2=[0-9]*" | cut -d= -f2
}
echo
echo "== summary ($mode)"
verdict=0
if [ $hung -eq 1 ]; then
    echo "hung: no verdict within $deadline s (--deadline); the VM was stopped"
    verdict=1
fi
# Without the vIOMMU the fault cases cannot fault: they, and only they, are skipped.
skips=()
[ $iommu -eq 0 ] && skips=(--skip fault_read_only --skip fault_unmapped --skip fault_already_unmapped)
ktap_summary "$console" "$logs/vmm.log" --suites vmm_dmatest "$devices" "${skips[@]}" || verdict=1
grep '^# throughput:' <<<"$console" | sed 's/^# throughput: /DMA throughput: /' || true
grep '^# latency:' <<<"$console" | sed 's/^# latency: /latency: /' || true
grep '^# map_unmap:' <<<"$console" | sed 's/^# map_unmap: /map\/unmap: /' || true
counters=$(sed -n 's/^counters: //p' "$logs/vmm.log")
if [ $iommu -eq 1 ]; then
    v=$(grep '^virtio-iommu' <<<"$counters" || true)
    printf 'vIOMMU requests: attach=%s map=%s unmap=%s probe=%s in %s notifications; host map calls=%s unmap calls=%s; faults=%s; dirty reads=%s\n' \
        "$(field virtio-iommu attach <<<"$v")" "$(field virtio-iommu map <<<"$v")" \
        "$(field virtio-iommu unmap <<<"$v")" "$(field virtio-iommu probe <<<"$v")" \
        "$(field virtio-iommu batches <<<"$v")" "$(field virtio-iommu host_maps <<<"$v")" \
        "$(field virtio-iommu host_unmaps <<<"$v")" "$(field virtio-iommu faults <<<"$v")" \
        "$(field virtio-iommu dirty_reads <<<"$v")"
fi
grep '^# traffic:' <<<"$console" | sed 's/^# traffic: /suite traffic: /' || true
untracked=$(field 'dirty log' untracked <<<"$counters" || true)
if [ "${untracked:-1}" != 0 ]; then
    echo "dirty log: ${untracked:-?} device(s) could not report their writes (every writable page counted)"
    verdict=1
fi
compare_written "$logs/console.log" "$logs/dirty.log" || verdict=1

# Pictures.
label=$([ $iommu -eq 1 ] && echo "vIOMMU-$([ $strict -eq 1 ] && echo strict || echo lazy)" || echo "no-IOMMU")
hist=$(grep -m1 '^# latency histogram:' <<<"$console" | sed 's/^# latency histogram://' || true)
if [ -n "$hist" ]; then
    { echo "bound_us $label"
      for b in $hist; do echo "$(( ${b%%:*} / 1000 )) ${b##*:}"; done; } > "$logs/latency.dat"
    plot_svg run-suite "$logs/latency.svg" \
        "map+unmap latency of one 4 KiB page ($mode)" \
        "latency below (us, powers of two)" "samples (log scale)" "$logs/latency.dat" histogram
    echo "latency histogram: $logs/latency.svg"
fi
grep '^# throughput:' <<<"$console" |
    sed -n 's/^# throughput: \([0-9]*\) B \(.*\): \([0-9.]*\) MB\/s .*/\1 B \2\t\3/p' |
    awk -F'\t' '{ gsub(/,/, "", $1); print $1 "\t" $2 }' > "$logs/throughput.raw" || true
# The case names have spaces: quoted for gnuplot.
quote_cases() { awk -F'\t' '{ printf "\"%s\"", $1; for (i = 2; i <= NF; i++) printf " %s", $i; print "" }'; }
if [ -s "$logs/throughput.raw" ]; then
    if [ -n "$compare" ] && [ -s "$compare/throughput.raw" ]; then
        other=$(cat "$compare/label" 2>/dev/null || echo earlier)
        { echo "case $label $other"
          join -t $'\t' <(sort "$logs/throughput.raw") <(sort "$compare/throughput.raw") |
              quote_cases; } > "$logs/throughput.dat"
    else
        { echo "case $label"; quote_cases < "$logs/throughput.raw"; } > "$logs/throughput.dat"
    fi
    echo "$label" > "$logs/label"
    plot_svg run-suite "$logs/throughput.svg" "DMA throughput (MB/s) by copy size and mapping" \
        "" "MB/s (log scale)" "$logs/throughput.dat" histogram
    echo "throughput: $logs/throughput.svg"
fi
echo "wall time: $(( $(date +%s) - start )) s; logs in $logs"
if [ $verdict -ne 0 ]; then
    echo "run-suite: FAILED (vmm exit status $status); the last lines of its log:" >&2
    tail -5 "$logs/vmm.log" >&2
fi
exit $verdict
