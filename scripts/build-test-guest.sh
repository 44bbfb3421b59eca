#!/usr/bin/env bash
# Build the tiny Linux test guest of docs/operations.md ("The real stack on
# one host") from Debian packages, and cache it.
#
# Output: ${VMATTACH_GUEST_DIR:-/var/cache/vmattach/guest}/{vmlinuz,initrd.gz}
# A stamp file (hash of this script) makes a second run a no-op; set
# VMATTACH_GUEST_REBUILD=1 to force a rebuild (e.g. for a newer kernel).
#
# The guest's /init (busybox sh) speaks a line protocol on /dev/ttyS0:
#   VMATTACH-GUEST-READY                       once, when it serves commands
#   DISK-ADDED name=<vdX|sdX> serial=<s> size=<bytes> sha256=<first 4 MiB>
#   DISK-REMOVED name=<..> serial=<..>
#   <output of a command line sent by the host, run with sh -c>
#   VMATTACH-RC <exit code>                    after each command
# The command `vmattach-disks` prints one `DISK name=.. serial=.. size=..
# sha256=..` line per current disk.
set -euo pipefail

OUT="${VMATTACH_GUEST_DIR:-/var/cache/vmattach/guest}"
MODULES=(virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio virtio_pci
         virtio_blk scsi_common scsi_mod virtio_scsi sd_mod)

say() { printf 'build-test-guest: %s\n' "$*"; }
die() { printf 'build-test-guest: ERROR: %s\n' "$*" >&2; exit 1; }

self_hash=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)
stamp="$OUT/.stamp"
if [ "${VMATTACH_GUEST_REBUILD:-0}" != 1 ] && [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.gz" ] \
        && [ -f "$stamp" ] && grep -qx "script=$self_hash" "$stamp"; then
    say "cached in $OUT ($(grep '^kernel=' "$stamp" | cut -d= -f2))"
    exit 0
fi

for tool in apt-get apt-cache dpkg gzip sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found"
done

work=$(mktemp -d /tmp/vmattach-guest.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/debs" "$work/kernel" "$work/busybox" "$work/root"
# apt-get download drops privileges to _apt; let it write there.
chmod 755 "$work"
if getent passwd _apt >/dev/null; then chown _apt "$work/debs"; fi

resolve_kernel() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
kpkg=$(resolve_kernel || true)
if [ -z "$kpkg" ]; then
    say "linux-image-cloud-amd64 unknown to apt; running apt-get update"
    apt-get -o DPkg::Lock::Timeout=600 update -qq || die "apt-get update failed"
    kpkg=$(resolve_kernel || true)
fi
[ -n "$kpkg" ] || die "cannot resolve the versioned package of linux-image-cloud-amd64"

say "downloading $kpkg and busybox-static"
(cd "$work/debs" && apt-get download -qq "$kpkg" busybox-static) \
    || die "apt-get download $kpkg busybox-static failed"
dpkg -x "$work"/debs/linux-image-*.deb "$work/kernel"
dpkg -x "$work"/debs/busybox-static_*.deb "$work/busybox"

bb="$work/busybox/bin/busybox"
[ -x "$bb" ] || die "busybox not found in busybox-static"
kver=${kpkg#linux-image-}
vmlinuz="$work/kernel/boot/vmlinuz-$kver"
[ -s "$vmlinuz" ] || die "kernel image $vmlinuz missing from $kpkg"
moddir="$work/kernel/lib/modules/$kver"
[ -d "$moddir" ] || die "module dir $moddir missing from $kpkg"

# --- initramfs tree -------------------------------------------------------
root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules}
cp "$bb" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true

loaded=" "
for m in "${MODULES[@]}"; do
    src=$(find "$moddir" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" \) -print -quit)
    [ -n "$src" ] || die "module $m not found in $kpkg"
    dst="$root/lib/modules/$m.ko"
    case "$src" in
        *.ko)     cp "$src" "$dst" ;;
        *.ko.xz)  if command -v xz >/dev/null; then xz -dc "$src" >"$dst"; else "$bb" unxz -c "$src" >"$dst"; fi ;;
        *.ko.zst) command -v zstd >/dev/null || die "$src is zstd-compressed: apt-get install zstd"
                  zstd -qdc "$src" >"$dst" ;;
        *.ko.gz)  gzip -dc "$src" >"$dst" ;;
    esac
    # no depmod here: check the load order against each module's depends=
    deps=$(grep -aoE 'depends=[A-Za-z0-9_,-]*' "$dst" | head -n1 | cut -d= -f2 | tr ',-' ' _')
    for d in $deps; do
        case "$loaded" in *" $d "*) ;; *) die "module $m needs $d, which is not loaded before it" ;; esac
    done
    loaded="$loaded$m "
done

cat >"$root/bin/vmattach-diskinfo" <<'SH'
#!/bin/sh
# vmattach-diskinfo <PREFIX> <name>: one line "PREFIX name=.. serial=.. size=.. sha256=.."
prefix=$1 n=$2 d=/sys/block/$2
serial=
if [ -r "$d/serial" ]; then
    serial=$(cat "$d/serial")
elif [ -r "$d/device/vpd_pg80" ]; then
    serial=$(tail -c +5 "$d/device/vpd_pg80" | tr -d '\000')
fi
serial=$(printf '%s' "$serial" | tr -d ' \t\r\n')
read -r sectors <"$d/size" 2>/dev/null || sectors=0
dev=/dev/$n
i=0
while [ ! -b "$dev" ] && [ "$i" -lt 50 ]; do sleep 0.02; i=$((i + 1)); done
if [ ! -b "$dev" ] && read -r mm <"$d/dev" 2>/dev/null; then
    dev=/tmp/blk-$n; rm -f "$dev"; mknod "$dev" b "${mm%%:*}" "${mm##*:}"
fi
sha=$(head -c 4194304 "$dev" 2>/dev/null | sha256sum | cut -d' ' -f1)
printf '%s name=%s serial=%s size=%s sha256=%s\n' "$prefix" "$n" "$serial" "$((sectors * 512))" "$sha"
SH

cat >"$root/bin/vmattach-disks" <<'SH'
#!/bin/sh
# one "DISK name=.. serial=.. size=.. sha256=.." line per current disk
for p in /sys/block/vd* /sys/block/sd*; do
    [ -e "$p" ] || continue
    vmattach-diskinfo DISK "${p##*/}"
done
true
SH

cat >"$root/bin/vmattach-bylink" <<'SH'
#!/bin/sh
# vmattach-bylink add|remove <name> <serial>: the /dev/disk/by-id link udev
# would make (virtio-<serial> for vd*, scsi-0QEMU_QEMU_HARDDISK_<serial> for sd*).
[ -n "$3" ] || exit 0
case "$2" in
    vd*) link=/dev/disk/by-id/virtio-$3 ;;
    sd*) link=/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_$3 ;;
    *) exit 0 ;;
esac
if [ "$1" = add ]; then
    mkdir -p /dev/disk/by-id
    ln -sf "../../$2" "$link"
else
    rm -f "$link"
fi
SH

cat >"$root/bin/vmattach-diskmon" <<'SH'
#!/bin/sh
# Poll /sys/block every 100 ms; report DISK-ADDED / DISK-REMOVED.
# A disk is identified by name:diskseq, so a name reused between two polls
# still shows up as removed + added.
mkdir -p /tmp/disks
known=
while :; do
    cur=
    for p in /sys/block/vd* /sys/block/sd*; do
        [ -e "$p" ] || continue
        seq=0
        read -r seq <"$p/diskseq" 2>/dev/null || true
        cur="$cur ${p##*/}:$seq"
    done
    if [ "$cur" != "$known" ]; then
        for k in $known; do
            case "$cur " in *" $k "*) continue ;; esac
            n=${k%%:*}
            s=; read -r s <"/tmp/disks/$k" 2>/dev/null || true
            rm -f "/tmp/disks/$k"
            vmattach-bylink remove "$n" "$s"
            printf 'DISK-REMOVED name=%s serial=%s\n' "$n" "$s"
        done
        for k in $cur; do
            case "$known " in *" $k "*) continue ;; esac
            n=${k%%:*}
            line=$(vmattach-diskinfo DISK-ADDED "$n")
            s=${line#* serial=}; s=${s%% size=*}
            printf '%s\n' "$s" >"/tmp/disks/$k"
            vmattach-bylink add "$n" "$s"
            printf '%s\n' "$line"
        done
        known=$cur
    fi
    sleep 0.1
done
SH

cat >"$root/init" <<'SH'
#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
exec </dev/ttyS0 >/dev/ttyS0 2>&1
echo 1 >/proc/sys/kernel/printk
for m in @MODULES@; do
    insmod "/lib/modules/$m.ko" || printf 'VMATTACH-GUEST-ERROR insmod %s\n' "$m"
done
stty -F /dev/ttyS0 raw -echo
vmattach-diskmon &
printf 'VMATTACH-GUEST-READY\n'
cr=$(printf '\r')
while :; do
    while IFS= read -r line; do
        line=${line%"$cr"}
        [ -n "$line" ] || continue
        sh -c "$line" </dev/null >/tmp/cmd.out 2>&1
        rc=$?
        while IFS= read -r out || [ -n "$out" ]; do
            printf '%s\n' "$out"
        done </tmp/cmd.out
        printf 'VMATTACH-RC %s\n' "$rc"
    done
    sleep 0.1
done
SH
sed -i "s/@MODULES@/${MODULES[*]}/" "$root/init"
chmod 755 "$root/init" "$root/bin/vmattach-diskinfo" "$root/bin/vmattach-disks" "$root/bin/vmattach-diskmon" "$root/bin/vmattach-bylink"

# --- pack and install -----------------------------------------------------
(cd "$root" && find . | "$bb" cpio -o -H newc 2>/dev/null) | gzip -9 >"$work/initrd.gz"
mkdir -p "$OUT"
rm -f "$stamp"
cp "$vmlinuz" "$OUT/vmlinuz.tmp" && mv -f "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
cp "$work/initrd.gz" "$OUT/initrd.gz.tmp" && mv -f "$OUT/initrd.gz.tmp" "$OUT/initrd.gz"
printf 'script=%s\nkernel=%s\nbusybox=%s\n' "$self_hash" "$kpkg" \
    "$(dpkg-deb -f "$work"/debs/busybox-static_*.deb Version)" >"$stamp"
say "built $OUT (kernel $kpkg; initrd $(du -k "$OUT/initrd.gz" | cut -f1) KiB)"
