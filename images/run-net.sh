#!/usr/bin/env bash
# The net job: Linux's virtio-net driver behind the project's virtio-iommu, with DPDK's
# vhost-user back end (dpdk-testpmd, device IOTLB on, frames looped back with their MACs
# swapped) as the datapath. Builds the guest kernel (with the vmm_nettest suite built in) and
# the VMM, starts testpmd and the VM, streams the suite's KTAP, and prints a summary: frames,
# bytes, drops, the device IOTLB counters. Exit status 0 only when every case passed.
#
# On a fresh Debian 12 machine with a Rust toolchain it installs what it needs itself
# (dpdk-dev and the kernel's build dependencies with apt-get, crates with cargo).
#
# Usage: images/run-net.sh [options] [-- extra vmm arguments]
#   --no-iommu        the device is not behind the vIOMMU
#   --strict          strict invalidation in the guest (iommu.strict=1); default lazy
#   --frames N        frames that must come back intact (default 10000)
#   --iotlb MODE      prefetch (default: each guest mapping is sent as it is made) or miss
#                     (only when the back end misses)
#   --memory SIZE     guest RAM (default 256M)
#   --logs DIR        where the console, VMM and testpmd logs go (default a new temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."

iommu=1 strict=0 frames=10000 memory=256M logs= iotlb=prefetch
extra=()
while (($#)); do
    case "$1" in
    --no-iommu) iommu=0 ;;
    --strict) strict=1 ;;
    --frames) frames=${2:?--frames needs a number}; shift ;;
    --iotlb) iotlb=${2:?--iotlb needs prefetch or miss}; shift ;;
    --memory) memory=${2:?--memory needs a size}; shift ;;
    --logs) logs=${2:?--logs needs a directory}; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run-net: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ "$frames" =~ ^[0-9]+$ ]] || { echo "run-net: '$frames' is not a number" >&2; exit 2; }
[[ "$iotlb" =~ ^(prefetch|miss)$ ]] || { echo "run-net: --iotlb '$iotlb': expected prefetch or miss" >&2; exit 2; }

. ./images/common.sh
say() { printf '\033[1mrun-net:\033[0m %s\n' "$*" >&2; }
start=$(date +%s)
need_cargo run-net
install_packages run-net dpdk-dev

say "building the guest kernel (cached after the first build)"
kernel=$(./images/build-kernel.sh | tail -1)
initramfs=$(dirname "$kernel")/initramfs.cpio
say "building the VMM"
cargo build --release --quiet -p vmm --bin vmm

[ -n "$logs" ] || logs=$(mktemp -d "${TMPDIR:-/tmp}/vmm-net.XXXXXX")
mkdir -p "$logs"
socket="$logs/vhost-user-net.sock"
rm -f "$socket" "$logs/testpmd.stdin"
mkfifo "$logs/testpmd.stdin"
say "starting dpdk-testpmd (vhost-user server on $socket, device IOTLB on, macswap)"
dpdk-testpmd --no-huge -m 512 --no-pci --lcores '0@0,1@0' --file-prefix="vmm-net-$$" \
    --vdev "net_vhost0,iface=$socket,iommu-support=1,queues=1" \
    -- --total-num-mbufs=8192 --nb-cores=1 --forward-mode=macswap --port-topology=loop \
    --auto-start < "$logs/testpmd.stdin" > "$logs/testpmd.log" 2>&1 &
testpmd=$!
exec 3> "$logs/testpmd.stdin" # testpmd runs until its stdin gets a line
trap 'kill $testpmd 2>/dev/null || true' EXIT
for _ in $(seq 300); do [ -S "$socket" ] && break; sleep 0.1; done
[ -S "$socket" ] || { echo "run-net: testpmd did not start; see $logs/testpmd.log" >&2; exit 1; }

cmdline="console=ttyS0 reboot=k panic=1 vmm_nettest.required=1 vmm_nettest.frames=$frames"
[ $strict -eq 1 ] && cmdline+=" iommu.strict=1"
args=(--kernel "$kernel" --initramfs "$initramfs" --memory "$memory" --counters
      --serial "file=$logs/console.log")
if [ $iommu -eq 1 ]; then
    args+=(--iommu --vhost-user-net "socket=$socket,iommu=on,iotlb=$iotlb")
    mode="behind the virtio-iommu, $([ $strict -eq 1 ] && echo strict || echo lazy) invalidation, IOTLB $iotlb"
else
    args+=(--vhost-user-net "socket=$socket")
    mode="not behind an IOMMU"
fi
say "booting Linux with virtio-net on DPDK's vhost-user back end $mode; $frames frames"
: > "$logs/console.log"
follow_ktap "$logs/console.log"
set +e
./target/release/vmm "${args[@]}" --cmdline "$cmdline" "${extra[@]}" 2> "$logs/vmm.log"
status=$?
set -e
stop_following

echo >&3 # Enter: testpmd stops and prints its statistics
exec 3>&-
for _ in $(seq 100); do kill -0 $testpmd 2>/dev/null || break; sleep 0.1; done

console=$(sed 's/^\[ *[0-9.]*\] //' "$logs/console.log" | tr -d '\r')
echo
echo "== summary ($mode)"
verdict=0
ktap_summary "$console" "$logs/vmm.log" || verdict=1
grep '^# net' <<<"$console" | sed 's/^# //' || true
counters=$(sed -n 's/^counters: //p' "$logs/vmm.log")
grep '^vhost-user-net' <<<"$counters" | sed 's/^/device: /' || true
[ $iommu -eq 1 ] && grep '^virtio-iommu' <<<"$counters" | sed 's/^/vIOMMU: /' || true
stats=$(sed -n '/Forward statistics for port 0/,/^  -----*$/p' "$logs/testpmd.log" |
    grep -E 'RX-packets|TX-packets' | tr -s ' ' | sed 's/^ //' | tr '\n' ' ')
echo "testpmd port 0: ${stats:-no statistics (see $logs/testpmd.log)}"
echo "wall time: $(( $(date +%s) - start )) s; logs in $logs"
if [ $verdict -ne 0 ]; then
    echo "vmm exit status $status; the last lines of its log:" >&2
    tail -5 "$logs/vmm.log" >&2
fi
exit $verdict
