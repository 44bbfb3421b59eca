#!/usr/bin/env bash
# Prepare this Debian 12 host (as root) for the real stack of
# docs/operations.md: libvirtd + QEMU (TCG), tgtd, libiscsi tools.
#
# Idempotent: packages are installed only when missing, users/groups and
# directories only created when absent, qemu.conf is appended to once
# (guarded by a marker comment), and running daemons are reused. It leaves
# libvirtd answering on qemu:///system and a tgtd answering on the default
# control port with its portal on VMATTACH_TGT_PORTAL (127.0.0.1:3260), the
# ones `vmattach serve` uses by default. A daemon it starts has its pid
# remembered in /run/vmattach/ (only those may be restarted by tests); a
# daemon already running is never restarted.
set -euo pipefail

URI="qemu:///system"
QEMU_CONF=/etc/libvirt/qemu.conf
MARKER="# vmattach: real-stack settings (scripts/setup-host.sh)"
WAIT_SECONDS="${VMATTACH_LIBVIRT_WAIT:-30}"
TGT_PORTAL="${VMATTACH_TGT_PORTAL:-127.0.0.1:3260}"
TGT_LOG=/var/log/vmattach/tgtd.log

PACKAGES=(
    # the virtual environment and libvirt-python's build
    python3 python3-venv python3-dev gcc make
    pkg-config libvirt-dev
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
    qemu-system-x86 qemu-block-extra qemu-utils
    tgt libiscsi-bin
    # used by scripts/build-test-guest.sh (module decompression, packing)
    xz-utils zstd gzip
    # the Node.js client's test (clients/node) and the zsh completion's test
    nodejs zsh
    # the README's metrics command
    curl
)

say() { printf 'setup-host: %s\n' "$*"; }
die() { printf 'setup-host: ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"

# --- packages -------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$status" = "installed" ] || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq \
        || die "apt-get update failed"
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" \
        || die "apt-get install failed for: ${missing[*]}"
else
    say "packages already installed"
fi

# Debian ships npm apart from nodejs (`make node-client` runs npm ci); a
# nodejs of NodeSource's has it built in and conflicts with Debian's npm.
if ! command -v npm >/dev/null 2>&1; then
    say "installing npm"
    [ "${#missing[@]}" -gt 0 ] || apt-get -o DPkg::Lock::Timeout=600 update -qq \
        || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
        --no-install-recommends npm || die "apt-get install failed for: npm"
fi

for tool in virsh libvirtd virtlogd qemu-system-x86_64 tgtd tgtadm iscsi-inq curl node npm; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found after installing packages"
done

# --- users, groups, directories ------------------------------------------
getent group kvm >/dev/null || { groupadd -r kvm; say "created group kvm"; }
getent group libvirt-qemu >/dev/null || { groupadd -r libvirt-qemu; say "created group libvirt-qemu"; }
if ! getent passwd libvirt-qemu >/dev/null; then
    useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
    say "created user libvirt-qemu"
fi
mkdir -p /etc/libvirt /var/log/libvirt /run/libvirt /var/lib/libvirt/qemu /var/cache/libvirt

# --- qemu.conf (append once) ----------------------------------------------
conf_changed=0
if ! grep -qxF "$MARKER" "$QEMU_CONF" 2>/dev/null; then
    {
        printf '\n%s\n' "$MARKER"
        printf 'user = "root"\ngroup = "root"\ncgroup_controllers = [ ]\nnamespaces = [ ]\nsecurity_driver = "none"\n'
    } >> "$QEMU_CONF"
    conf_changed=1
    say "appended settings to $QEMU_CONF"
else
    say "$QEMU_CONF already configured"
fi

# --- daemons --------------------------------------------------------------
pid_alive() {  # pid_alive <pidfile>
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}
virsh_ok() { virsh -c "$URI" version >/dev/null 2>&1; }

if virsh_ok; then
    say "libvirtd already answering on $URI; reusing it"
    if [ "$conf_changed" -eq 1 ]; then
        say "WARNING: $QEMU_CONF changed while libvirtd was running; restart libvirtd to apply it"
    fi
else
    if pid_alive /run/virtlogd.pid; then
        say "virtlogd already running (pid $(cat /run/virtlogd.pid))"
    else
        say "starting virtlogd"
        virtlogd -d || die "virtlogd -d failed"
    fi
    if pid_alive /run/libvirtd.pid; then
        say "libvirtd already running (pid $(cat /run/libvirtd.pid)); waiting for it"
    else
        say "starting libvirtd"
        libvirtd -d || die "libvirtd -d failed"
        started_libvirtd=1
    fi
    deadline=$((SECONDS + WAIT_SECONDS))
    until virsh_ok; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            err=$(virsh -c "$URI" version 2>&1 || true)
            die "libvirtd did not answer on $URI within ${WAIT_SECONDS}s: $err (see /var/log/libvirt/)"
        fi
        sleep 0.2
    done
    if [ -n "${started_libvirtd:-}" ]; then
        # remember that this libvirtd is ours: tests may restart it, and only it
        mkdir -p /run/vmattach
        cp /run/libvirtd.pid /run/vmattach/libvirtd.pid
    fi
fi
say "ready: $(virsh -c "$URI" version 2>/dev/null | grep -i 'running hypervisor' | sed 's/^ *//')"

# --- tgtd -----------------------------------------------------------------
# The host's tgtd on the default control port (what tgtadm talks to without
# --control-port) and the portal of the README's `vmattach serve`. No
# systemd here: started in the background, its pid kept in /run/vmattach.
tgt_ok() { tgtadm --lld iscsi --mode target --op show >/dev/null 2>&1; }

if tgt_ok; then
    say "tgtd already answering on the default control port; reusing it"
elif pid_alive /run/vmattach/tgtd.pid; then
    say "tgtd already started (pid $(cat /run/vmattach/tgtd.pid)); waiting for it"
else
    mkdir -p /run/vmattach "$(dirname "$TGT_LOG")"
    say "starting tgtd (portal $TGT_PORTAL, log $TGT_LOG)"
    # -f: stay in the foreground of its own session, so that $! is its pid
    setsid tgtd -f --iscsi "portal=$TGT_PORTAL" >>"$TGT_LOG" 2>&1 < /dev/null &
    echo $! > /run/vmattach/tgtd.pid
fi
deadline=$((SECONDS + WAIT_SECONDS))
until tgt_ok; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        die "tgtd did not answer within ${WAIT_SECONDS}s (see $TGT_LOG)"
    fi
    if [ -s /run/vmattach/tgtd.pid ] && ! pid_alive /run/vmattach/tgtd.pid; then
        die "tgtd exited: $(tail -n 3 "$TGT_LOG" 2>/dev/null | tr '\n' ' ')"
    fi
    sleep 0.2
done
say "ready: tgtd on the default control port, portal $TGT_PORTAL"
