#!/usr/bin/env bash
# Builds the guest kernel the tests use, from Debian packages only:
#   linux-source-6.12 + `make tinyconfig` + images/kernel/config.fragment
#   + the guest-side drivers under images/kernel/drivers (built in, not modules)
# a tiny initramfs (images/initramfs: a static /init and /dev/console), and a 16 MiB ext2
# root disk holding the same /init (for the virtio-blk tests: root=/dev/vda).
#
# Installs its build dependencies with apt-get when they are missing. The result is cached
# outside the work tree, keyed by a hash of every input, so a fresh clone reuses it:
#   ${VMM_CACHE:-$HOME/.cache/vmm-viommu}/kernel/<hash>/vmlinux
#   ${VMM_CACHE:-$HOME/.cache/vmm-viommu}/kernel/<hash>/initramfs.cpio
#   ${VMM_CACHE:-$HOME/.cache/vmm-viommu}/kernel/<hash>/bzImage
#   ${VMM_CACHE:-$HOME/.cache/vmm-viommu}/kernel/<hash>/rootfs.ext2
# The last line printed is the path of the vmlinux; the other files sit beside it.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${VMM_CACHE:-$HOME/.cache/vmm-viommu}
jobs=${JOBS:-$(nproc)}
deps=(linux-source-6.12 bc bison flex libelf-dev libssl-dev cpio xz-utils make gcc e2fsprogs)

log() { printf 'build-kernel: %s\n' "$*" >&2; }

missing=()
for p in "${deps[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

tarball=$(ls /usr/src/linux-source-6.12.tar.xz)
src_version=$(dpkg-query -W -f='${Version}' linux-source-6.12)

# Everything that changes the output goes into the key.
key=$( {
    echo "linux-source-6.12 $src_version"
    cat "$here/build-kernel.sh" "$here/kernel/config.fragment"
    cat "$here/initramfs/init.c" "$here/initramfs/files.list"
    if [ -d "$here/kernel/drivers" ]; then
        (cd "$here/kernel/drivers" && find . -type f | LC_ALL=C sort | xargs sha256sum)
    fi
} | sha256sum | cut -c1-16)
out="$cache/kernel/$key"
if [ -f "$out/vmlinux" ] && [ -f "$out/initramfs.cpio" ] && [ -f "$out/rootfs.ext2" ]; then
    log "cached ($key)"
    echo "$out/vmlinux"
    exit 0
fi

# One extracted tree, reused across keys so that incremental builds stay fast.
tree="$cache/src/linux-source-6.12-$src_version"
if [ ! -f "$tree/.extracted" ]; then
    log "extracting $tarball"
    rm -rf "$tree"
    mkdir -p "$cache/src"
    tmp=$(mktemp -d "$cache/src/extract.XXXXXX")
    tar -C "$tmp" -xf "$tarball"
    mv "$tmp/linux-source-6.12" "$tree"
    rmdir "$tmp"
    touch "$tree/.extracted"
fi

# Our drivers live in drivers/vmm-tests, hooked into drivers/Makefile and Kconfig.
if [ -d "$here/kernel/drivers" ]; then
    rm -rf "$tree/drivers/vmm-tests"
    cp -r "$here/kernel/drivers" "$tree/drivers/vmm-tests"
    grep -q 'vmm-tests' "$tree/drivers/Makefile" || echo 'obj-y += vmm-tests/' >> "$tree/drivers/Makefile"
    grep -q 'vmm-tests' "$tree/drivers/Kconfig" ||
        sed -i 's|^endmenu$|source "drivers/vmm-tests/Kconfig"\nendmenu|' "$tree/drivers/Kconfig"
fi

log "configuring (tinyconfig + config.fragment)"
make -C "$tree" -s tinyconfig >&2
"$tree/scripts/kconfig/merge_config.sh" -m -O "$tree" "$tree/.config" "$here/kernel/config.fragment" >/dev/null
make -C "$tree" -s olddefconfig >&2

# Every option the fragment asks for must have survived olddefconfig.
bad=0
while IFS='=' read -r name want; do
    have=$(grep -E "^$name=" "$tree/.config" | cut -d= -f2- || true)
    [ -n "$have" ] || have=n
    if [ "$want" != "$have" ]; then
        log "config: $name wanted $want, got $have"
        bad=1
    fi
done < <(grep -E '^CONFIG_[A-Z0-9_]+=' "$here/kernel/config.fragment")
[ $bad -eq 0 ] || { log "the config fragment does not apply cleanly"; exit 1; }

log "building vmlinux and bzImage with $jobs jobs (takes a few minutes the first time)"
start=$(date +%s)
if ! make -C "$tree" -j"$jobs" vmlinux bzImage > "$cache/build.log" 2>&1; then
    tail -30 "$cache/build.log" >&2
    log "kernel build failed; full log in $cache/build.log"
    exit 1
fi
log "built in $(( $(date +%s) - start )) s"
mkdir -p "$out"
log "building the initramfs"
gcc -Os -static -nostdlib -fno-pie -no-pie -fno-stack-protector -Wl,--build-id=none \
    -o "$out/init" "$here/initramfs/init.c"
sed "s|@INIT@|$out/init|" "$here/initramfs/files.list" > "$out/files.list"
"$tree/usr/gen_init_cpio" "$out/files.list" > "$out/initramfs.cpio"
log "building the ext2 root disk"
rootfs=$(mktemp -d)
mkdir -p "$rootfs/dev" "$rootfs/proc" "$rootfs/sys" "$rootfs/sbin"
cp "$out/init" "$rootfs/init"
cp "$out/init" "$rootfs/sbin/init"
rm -f "$out/rootfs.ext2"
truncate -s 16M "$out/rootfs.ext2"
mke2fs -q -t ext2 -L vmm-root -d "$rootfs" -F "$out/rootfs.ext2"
rm -rf "$rootfs"
cp "$tree/arch/x86/boot/bzImage" "$out/bzImage"
cp "$tree/vmlinux" "$out/vmlinux.tmp"
cp "$tree/.config" "$out/config"
mv "$out/vmlinux.tmp" "$out/vmlinux"
# Keep the three newest builds.
ls -1dt "$cache"/kernel/*/ 2>/dev/null | tail -n +4 | xargs -r rm -rf
echo "$out/vmlinux"
