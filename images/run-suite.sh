#!/usr/bin/env bash
# The project's main job: build the guest kernel (with the DMA suite built in), the VMM and
# the DMA test device; start the device; boot Linux with the virtio-iommu in front of the
# device; show the suite's KTAP results and a summary. Exit status 0 when every case passed.
#
# On a fresh Debian 12 machine with a Rust toolchain it installs what it needs itself
# (Debian packages with apt-get, crates with cargo).
#
# Usage: images/run-suite.sh [options] [-- extra vmm arguments]
#   --no-iommu        the device is not behind the vIOMMU (fault cases are then skipped)
#   --strict          strict invalidation in the guest (iommu.strict=1); default lazy
#   --cycles N        map/unmap cycles of the many-small-mappings case (default 100000)
#   --samples N       map+unmap latency samples (default 10000)
#   --cases LIST      comma-separated case groups: copy,fill,sg,coherent,map_unmap,
#                     fault_ro,fault_unmapped,fault_stale,latency,throughput (default all)
#   --max-size BYTES  largest copy/fill (default 4194304)
#   --memory SIZE     guest RAM (default 256M)
#   --logs DIR        where the console and VMM logs go (default a new temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."

iommu=1 strict=0 cycles=100000 samples=10000 cases=all max_size=4194304 memory=256M logs=
extra=()
while (($#)); do
    case "$1" in
    --no-iommu) iommu=0 ;;
    --strict) strict=1 ;;
    --cycles) cycles=${2:?--cycles needs a number}; shift ;;
    --samples) samples=${2:?--samples needs a number}; shift ;;
    --cases) cases=${2:?--cases needs a list}; shift ;;
    --max-size) max_size=${2:?--max-size needs a number}; shift ;;
    --memory) memory=${2:?--memory needs a size}; shift ;;
    --logs) logs=${2:?--logs needs a directory}; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run-suite: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for n in "$cycles" "$samples" "$max_size"; do
    [[ "$n" =~ ^[0-9]+$ ]] || { echo "run-suite: '$n' is not a number" >&2; exit 2; }
done

say() { printf '\033[1mrun-suite:\033[0m %s\n' "$*" >&2; }
start=$(date +%s)

if ! command -v cargo >/dev/null 2>&1; then
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || {
    echo "run-suite: cargo not found; install a Rust toolchain (https://rustup.rs)" >&2
    exit 1
}

say "building the guest kernel with the DMA suite (cached after the first build)"
kernel=$(./images/build-kernel.sh | tail -1)
initramfs=$(dirname "$kernel")/initramfs.cpio
say "building the VMM and the DMA test device"
cargo build --release --quiet -p vmm -p devices --bin vmm --bin dma-test-device

[ -n "$logs" ] || logs=$(mktemp -d "${TMPDIR:-/tmp}/vmm-suite.XXXXXX")
mkdir -p "$logs"
socket="$logs/dma-test-device.sock"
rm -f "$socket"
./target/release/dma-test-device --socket "$socket" 2> "$logs/device.log" &
device=$!
trap 'kill $device 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$socket" ] && break; sleep 0.05; done
[ -S "$socket" ] || { echo "run-suite: the DMA test device did not start; see $logs/device.log" >&2; exit 1; }

cmdline="console=ttyS0 reboot=k panic=1 vmm_dmatest.required=1 vmm_dmatest.cases=$cases"
cmdline+=" vmm_dmatest.cycles=$cycles vmm_dmatest.samples=$samples vmm_dmatest.max_size=$max_size"
[ $strict -eq 1 ] && cmdline+=" iommu.strict=1"
args=(--kernel "$kernel" --initramfs "$initramfs" --memory "$memory" --counters --track-dirty
      --serial "file=$logs/console.log")
if [ $iommu -eq 1 ]; then
    args+=(--iommu --vfio-user "socket=$socket,iommu=on")
    mode="behind the virtio-iommu, $([ $strict -eq 1 ] && echo strict || echo lazy) invalidation"
else
    args+=(--vfio-user "socket=$socket")
    mode="not behind an IOMMU"
fi
say "booting Linux with the DMA test device $mode; $cycles map/unmap cycles (guest code runs in"
say "KVM's instruction emulator on PVM hosts: expect about 4 ms per cycle behind the vIOMMU)"
: > "$logs/console.log"
# The suite's lines as they come (KTAP and comments), without the boot log.
tail -F -n +1 "$logs/console.log" 2>/dev/null |
    sed -un 's/^\[ *[0-9.]*\] //; /^\(KTAP\|ok \|not ok \|1\.\.\|# \)/p; /page fault from EP/p' &
follower=$!
trap 'kill $device $follower 2>/dev/null || true' EXIT
set +e
./target/release/vmm "${args[@]}" --cmdline "$cmdline" "${extra[@]}" 2> "$logs/vmm.log"
status=$?
set -e
sleep 0.3
kill $follower 2>/dev/null || true

# Summary.
console=$(sed 's/^\[ *[0-9.]*\] //' "$logs/console.log")
field() { # field LINE-PREFIX KEY: the value of KEY= on the first line starting with PREFIX
    grep -m1 "^$1" | grep -o " $2=[0-9]*" | cut -d= -f2
}
passed=$(grep -c '^ok ' <<<"$console" || true)
skipped=$(grep -c '^ok .* # SKIP' <<<"$console" || true)
failed=$(grep -c '^not ok ' <<<"$console" || true)
planned=$(grep -m1 '^1\.\.' <<<"$console" | cut -c4- || true)
echo
echo "== summary ($mode)"
echo "cases: $((passed - skipped)) passed, $failed failed, $skipped skipped of ${planned:-?}"
grep '^# throughput:' <<<"$console" | sed 's/^# throughput: /DMA throughput: /' || true
grep '^# latency:' <<<"$console" | sed 's/^# latency: /latency: /' || true
grep '^# map_unmap:' <<<"$console" | sed 's/^# map_unmap: /map\/unmap: /' || true
counters=$(sed -n 's/^counters: //p' "$logs/vmm.log")
if [ $iommu -eq 1 ]; then
    v=$(grep '^virtio-iommu' <<<"$counters" || true)
    printf 'vIOMMU requests: attach=%s map=%s unmap=%s probe=%s in %s notifications; host map calls=%s unmap calls=%s; faults=%s\n' \
        "$(field virtio-iommu attach <<<"$v")" "$(field virtio-iommu map <<<"$v")" \
        "$(field virtio-iommu unmap <<<"$v")" "$(field virtio-iommu probe <<<"$v")" \
        "$(field virtio-iommu batches <<<"$v")" "$(field virtio-iommu host_maps <<<"$v")" \
        "$(field virtio-iommu host_unmaps <<<"$v")" "$(field virtio-iommu faults <<<"$v")"
fi
traffic=$(grep -m1 '^# traffic:' <<<"$console" || true)
dirty=$(field 'dirty log' pages <<<"$counters" || true)
written=$(grep -o 'written_pages=[0-9]*' <<<"$traffic" | cut -d= -f2 || true)
echo "suite traffic: ${traffic#\# traffic: }"
echo "pages the device wrote: ${written:-?} by the suite's account, ${dirty:-?} in the VMM's dirty log$([ "${written:-x}" = "${dirty:-y}" ] && echo ' (agree)' || echo ' (DISAGREE)')"
echo "wall time: $(( $(date +%s) - start )) s; logs in $logs"
if [ $status -ne 0 ]; then
    echo "vmm exit status $status; the last lines of its log:" >&2
    tail -5 "$logs/vmm.log" >&2
fi
exit $status
