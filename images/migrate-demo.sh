#!/usr/bin/env bash
# Live migration of a guest whose passthrough DMA device sits behind the vIOMMU, on one
# machine: two DMA test device processes, a source VMM running the bare-metal test guest's
# `migrate_dma` case (the device keeps filling guest memory through mappings that change
# every iteration) and a destination VMM waiting with --incoming. When the guest is under
# way the script asks the source's API to migrate with "verify" (every RAM page of both
# sides compared before the guest runs again), prints the report with the dirty pages each
# source found, and waits for the guest's verdict on the destination (every page must hold
# its last write).
#
# Usage: images/migrate-demo.sh [--memory SIZE] [--touch MIB] [--iters N] [--unsafe-no-device-dirty]
#   --memory   guest RAM (1G)
#   --touch    MiB the device fills before the run, so that there is RAM to copy (960)
#   --iters    fills after the guest lands on the destination (40); before, it fills until migrated
#   --unsafe-no-device-dirty   migrate without the device's dirty pages: verify then finds
#              the pages the device wrote meanwhile and the migration fails (the guest goes
#              on at the source; shows that the tracking matters)
set -euo pipefail
cd "$(dirname "$0")/.."

memory=1G touch=960 iters=40 extra=""
while (($#)); do
    case "$1" in
    --memory) memory=${2:?}; shift ;;
    --touch) touch=${2:?}; shift ;;
    --iters) iters=${2:?}; shift ;;
    --unsafe-no-device-dirty) extra=unsafe ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "migrate-demo: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if ! command -v cargo >/dev/null 2>&1; then
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
. ./images/common.sh
install_packages migrate-demo gnuplot-nox
cargo build --release --quiet -p vmm -p testdev -p test-guest
b=target/release
d=$(mktemp -d "${TMPDIR:-/tmp}/vmm-migrate.XXXXXX")
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
for x in a b; do
    $b/dma-test-device --socket "$d/dev-$x.sock" 2> "$d/dev-$x.log" &
    pids+=($!)
done
for x in a b; do
    for _ in $(seq 100); do [ -S "$d/dev-$x.sock" ] && break; sleep 0.05; done
done
common=(--memory "$memory" --iommu --counters)
$b/vmm "${common[@]}" --vfio-user "socket=$d/dev-b.sock,iommu=on" \
    --incoming "unix:$d/migration.sock" --serial "file=$d/destination.console" \
    2> "$d/destination.log" &
dst=$!
pids+=($dst)
$b/vmm "${common[@]}" --vfio-user "socket=$d/dev-a.sock,iommu=on" --kernel $b/test-guest \
    --cmdline "tests=migrate_dma until_migrated=1 iters=$iters touch=$touch" --api-socket "$d/api.sock" \
    --serial "file=$d/source.console" 2> "$d/source.log" &
src=$!
pids+=($src)
for _ in $(seq 600); do
    grep -q "migrate-ready" "$d/source.console" 2>/dev/null && break
    sleep 0.1
done
echo "migrate-demo: the guest runs; migrating (logs in $d)"
verify=(--verify)
[ -n "$extra" ] && verify=(--verify --no-device-dirty-tracking)
# vmm-ctl draws a progress bar while it runs (on a terminal); the JSON report is printed
# readably here and drawn as an SVG of the pages each dirty source found, round by round.
set +e
$b/vmm-ctl --socket "$d/api.sock" --json migrate "unix:$d/migration.sock" "${verify[@]}" \
    > "$d/report.json"
migrated=$?
set -e
python3 - "$d/report.json" "$d/rounds.dat" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
if not r.get("ok"):
    print("migration failed:", r.get("error"))
    sys.exit(0)
with open(sys.argv[2], "w") as out:
    out.write("round sent vCPUs VMM-devices passthrough vhost-user\n")
    for x in r["rounds"]:
        s = x["dirty_by_source"]
        out.write("%d %d %d %d %d %d\n" % (x["round"], x["pages"], s["kvm"], s["vmm_devices"],
                                           s["passthrough"], s.get("vhost_user", 0)))
        print("round %d: %d pages in %d ms, %d dirty after it (vCPUs %d, VMM devices %d, "
              "passthrough %d, vhost-user %d), harvest %.2f ms" % (x["round"], x["pages"],
              x["ms"], x["dirty_after"], s["kvm"], s["vmm_devices"], s["passthrough"],
              s.get("vhost_user", 0), x["harvest_ms"]))
    f = r["final_by_source"]
    out.write("stop %d %d %d %d %d\n" % (r["final_pages"], f["kvm"], f["vmm_devices"],
                                        f["passthrough"], f.get("vhost_user", 0)))
print("stop-and-copy: %d pages; downtime %d ms; total %d ms; %d MiB sent" %
      (r["final_pages"], r["downtime_ms"], r["total_ms"], r["bytes"] >> 20))
by = r["dirty_by_source"]
print("dirty pages by source over all harvests: vCPUs (KVM) %d, VMM devices %d, "
      "passthrough devices %d (%d device dirty reads), vhost-user back ends %d; "
      "untracked devices: %s" %
      (by["kvm"], by["vmm_devices"], by["passthrough"], r["device_dirty_reads"],
       by.get("vhost_user", 0), ", ".join(r["untracked_devices"]) or "none"))
print("verify: %d RAM pages identical on both sides" % r["verified_pages"])
EOF
if [ $migrated -ne 0 ]; then
    echo "migrate-demo: the migration failed; the guest goes on at the source (logs in $d)"
    exit 1
fi
svg="$d/migration-rounds.svg"
plot_svg migrate-demo "$svg" "Pages per pre-copy round: sent, and found dirty by each source" \
    "round" "pages (log scale)" "$d/rounds.dat" histogram
echo "migrate-demo: pages per round and per dirty source drawn in $svg"
wait $src || true
set +e
wait $dst
status=$?
set -e
grep -E "^# migrate_dma: [0-9]+ fills|^(not )?ok " "$d/destination.console" || true
echo "migrate-demo: destination exit status $status (0: every page held its last write)"
exit $status
