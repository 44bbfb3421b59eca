"""A real, tiny Linux guest under libvirt/QEMU for real-stack tests.

The guest (kernel + initramfs built by ``scripts/build-test-guest.sh``) boots
in a few seconds under QEMU TCG and speaks a line protocol on its serial
console (see that script):

    VMATTACH-GUEST-READY
    DISK-ADDED name=<vdX|sdX> serial=<serial> size=<bytes> sha256=<first 4 MiB>
    DISK-REMOVED name=<vdX|sdX> serial=<serial>
    <output of a command sent by the host>
    VMATTACH-RC <exit code>

This module drives libvirt only through ``virsh -c <uri>`` (it does not import
the ``libvirt`` Python binding) and uses the standard library only.

    with TestGuest.start() as guest:           # boots, waits for the marker
        ...attach a disk with serial "vol-1234" through libvirt...
        disk = guest.wait_disk("vol-1234")     # {'name', 'serial', 'size', 'sha256'}
        rc, out = guest.run("cat /proc/partitions")
"""

from __future__ import annotations

import collections
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tty
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "BUILD_SCRIPT",
    "DEFAULT_GUEST_DIR",
    "DEFAULT_URI",
    "GuestError",
    "GuestTimeout",
    "TestGuest",
    "domain_xml",
    "ensure_guest_image",
    "guest_image_available",
    "virsh",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-test-guest.sh"
DEFAULT_GUEST_DIR = os.environ.get("VMATTACH_GUEST_DIR", "/var/cache/vmattach/guest")
DEFAULT_URI = "qemu:///system"
EMULATOR = "/usr/bin/qemu-system-x86_64"

READY_MARKER = "VMATTACH-GUEST-READY"
RC_PREFIX = "VMATTACH-RC "
BEGIN_PREFIX = "VMATTACH-BEGIN-"
VIRTIO_SERIAL_LEN = 20  # virtio-blk exposes at most 20 bytes of serial
SCSI_SERIAL_LEN = 36  # QEMU's scsi-hd silently cuts longer serials to 36
SCSI_CONTROLLERS = 8  # of a guest with a SCSI root disk

_DISK_LINE = re.compile(r"^(DISK-ADDED|DISK-REMOVED|DISK) (name=\S*(?: \w+=\S*)*)\s*$")


class GuestError(Exception):
    """The test guest could not be started, driven or destroyed."""


class GuestTimeout(GuestError, TimeoutError):
    """The guest did not show the expected line in time."""


# --------------------------------------------------------------------------
# virsh and the guest image
# --------------------------------------------------------------------------

def virsh(uri: str, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``virsh -c <uri> <args>``; raise GuestError on failure when check."""
    cmd = ["virsh", "-c", uri, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise GuestError("virsh not found (run scripts/setup-host.sh)") from exc
    except subprocess.TimeoutExpired as exc:
        raise GuestError(f"{' '.join(cmd)} timed out after {timeout}s") from exc
    if check and proc.returncode != 0:
        raise GuestError(f"{' '.join(cmd)} failed (rc {proc.returncode}): {proc.stderr.strip()}")
    return proc


def guest_image_available(guest_dir: str | os.PathLike | None = None) -> bool:
    """True when the built kernel and initramfs are in guest_dir."""
    d = Path(guest_dir or DEFAULT_GUEST_DIR)
    return all((d / f).is_file() and (d / f).stat().st_size > 0 for f in ("vmlinuz", "initrd.gz"))


def ensure_guest_image(guest_dir: str | os.PathLike | None = None, timeout: float = 600.0) -> Path:
    """Build (or reuse the cached) test guest with scripts/build-test-guest.sh.

    Returns the guest directory; raises GuestError when the build fails.
    """
    d = Path(guest_dir or DEFAULT_GUEST_DIR)
    env = dict(os.environ, VMATTACH_GUEST_DIR=str(d))
    try:
        proc = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True,
                              env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise GuestError(f"{BUILD_SCRIPT} timed out after {timeout}s") from exc
    if proc.returncode != 0 or not guest_image_available(d):
        raise GuestError(f"{BUILD_SCRIPT} failed (rc {proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()}")
    return d


NOVA_NS = "http://openstack.org/xmlns/libvirt/nova/1.1"


def domain_xml(name: str, kind: str = "linux", guest_dir: str | os.PathLike | None = None,
               scsi_root: str | os.PathLike | None = None, project_id: str = "") -> str:
    """The domain XML for a test guest of the given kind.

    kind 'linux': the tiny Linux guest, 96 MiB, serial console on a pty.
    kind 'diskless': no OS at all (enough for hot-plug to reach QEMU).
    Both have ACPI (PCI hot-plug) and an explicit virtio-scsi controller (so
    libvirt does not hot-add an lsilogic one). scsi_root: a file attached as
    sda on the SCSI bus (the guest still boots from its kernel and initramfs),
    so that the server's disks are named sd*.
    """
    if kind not in ("linux", "diskless"):
        raise ValueError(f"unknown guest kind {kind!r} (expected 'linux' or 'diskless')")
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    if project_id:  # the owner project, where Nova writes it
        instance = ET.SubElement(ET.SubElement(dom, "metadata"), f"{{{NOVA_NS}}}instance")
        owner = ET.SubElement(instance, f"{{{NOVA_NS}}}owner")
        ET.SubElement(owner, f"{{{NOVA_NS}}}project", uuid=project_id).text = project_id
    ET.SubElement(dom, "memory", unit="MiB").text = "96" if kind == "linux" else "64"
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    if kind == "linux":
        d = Path(guest_dir or DEFAULT_GUEST_DIR)
        ET.SubElement(os_el, "kernel").text = str(d / "vmlinuz")
        ET.SubElement(os_el, "initrd").text = str(d / "initrd.gz")
        ET.SubElement(os_el, "cmdline").text = "console=ttyS0 quiet panic=-1"
        tcg = ET.SubElement(features, "tcg")
        ET.SubElement(tcg, "tb-cache", unit="MiB").text = "32"
        ET.SubElement(dom, "on_poweroff").text = "destroy"
        ET.SubElement(dom, "on_reboot").text = "destroy"
        ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    ET.SubElement(devices, "emulator").text = shutil.which("qemu-system-x86_64") or EMULATOR
    ET.SubElement(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    if scsi_root is not None:
        # libvirt puts 7 SCSI disks on a controller: controllers for 56 disks
        # from the start, none hot-plugged while disks arrive
        for index in range(1, SCSI_CONTROLLERS):
            ET.SubElement(devices, "controller", type="scsi", index=str(index),
                          model="virtio-scsi")
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="raw")
        ET.SubElement(disk, "source", file=str(scsi_root))
        ET.SubElement(disk, "target", dev="sda", bus="scsi")
    if kind == "linux":
        serial = ET.SubElement(devices, "serial", type="pty")
        ET.SubElement(serial, "target", port="0")
        console = ET.SubElement(devices, "console", type="pty")
        ET.SubElement(console, "target", type="serial", port="0")
    video = ET.SubElement(devices, "video")
    ET.SubElement(video, "model", type="none")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def _parse_disk_line(line: str) -> tuple[str, dict[str, Any]] | None:
    """('DISK-ADDED'|'DISK-REMOVED'|'DISK', {name, serial[, size, sha256]}) or None."""
    m = _DISK_LINE.match(line)
    if not m:
        return None
    info: dict[str, Any] = {}
    for field in m.group(2).split(" "):
        key, _, value = field.partition("=")
        info[key] = value
    if "size" in info:
        try:
            info["size"] = int(info["size"])
        except ValueError:
            return None
    return m.group(1), info


def _serial_matches(guest_serial: str, wanted: str) -> bool:
    """The guest's serial starts with wanted, or is wanted cut to 20 (virtio-blk)
    or 36 (scsi-hd) characters."""
    if not guest_serial or not wanted:
        return False
    if guest_serial.startswith(wanted):
        return True
    return len(guest_serial) in (VIRTIO_SERIAL_LEN, SCSI_SERIAL_LEN) and wanted.startswith(guest_serial)


class _HybridMethod:
    """``TestGuest.start(...)`` makes a new guest; ``guest.start(...)`` starts that one."""

    def __init__(self, func: Callable[..., Any]):
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj: Any, owner: type) -> Callable[..., Any]:
        target = obj if obj is not None else owner()
        return self.func.__get__(target, owner)


# --------------------------------------------------------------------------
# The guest
# --------------------------------------------------------------------------

class TestGuest:
    """One transient libvirt domain running the test guest.

    ``TestGuest.start(...)`` (or ``TestGuest().start(...)``) boots it and
    returns the started guest; ``destroy()`` (or leaving the ``with`` block)
    destroys that domain only, by uuid.
    """

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self._uri = DEFAULT_URI
        self._name: str | None = None
        self._uuid: str | None = None
        self._kind = "linux"
        self._pty_path: str | None = None
        self._fd: int | None = None
        self._reader: threading.Thread | None = None
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._cmd_lock = threading.Lock()
        self._console: collections.deque[str] = collections.deque(maxlen=2000)
        self._events: list[dict[str, Any]] = []
        self._present: dict[str, dict[str, Any]] = {}
        self._ready = False
        self._closed = False
        # command state: None (idle) | 'marker' | 'marker-rc' | 'collect' | 'done'
        self._cmd_state: str | None = None
        self._cmd_marker = ""
        self._cmd_output: list[str] = []
        self._cmd_rc: int | None = None
        self._cmd_seq = 0
        self._persistent = False
        self._root_file: str | None = None
        self.boot_seconds: float | None = None

    # ---- properties ------------------------------------------------------
    @property
    def uuid(self) -> str | None:
        return self._uuid

    @property
    def name(self) -> str | None:
        return self._name

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def pty_path(self) -> str | None:
        return self._pty_path

    @property
    def persistent(self) -> bool:
        return self._persistent

    # ---- life cycle ------------------------------------------------------
    @_HybridMethod
    def start(self, uri: str = DEFAULT_URI, name: str | None = None, kind: str = "linux",
              guest_dir: str | os.PathLike | None = None, ready_timeout: float = 60.0,
              persistent: bool = False, scsi_root: bool = False,
              project_id: str = "") -> TestGuest:
        """Create the domain; for kind 'linux' wait for the ready marker.

        A transient domain by default; persistent=True defines it first (its
        persistent definition survives restart(); destroy() undefines it).
        scsi_root=True gives it a small sda on the SCSI bus (a file of its own).
        """
        if self._uuid is not None:
            raise GuestError(f"guest {self._name} already started")
        if kind not in ("linux", "diskless"):
            raise ValueError(f"unknown guest kind {kind!r} (expected 'linux' or 'diskless')")
        if kind == "linux" and not guest_image_available(guest_dir):
            raise GuestError(f"no test guest image in {guest_dir or DEFAULT_GUEST_DIR}; "
                             f"run {BUILD_SCRIPT} (or ensure_guest_image())")
        self._uri, self._kind, self._persistent = uri, kind, persistent
        self._name = name or f"vmattach-test-{uuidlib.uuid4().hex[:8]}"
        if scsi_root:
            fd, self._root_file = tempfile.mkstemp(prefix=f"{self._name}-sda-", suffix=".img")
            os.ftruncate(fd, 1 << 20)
            os.close(fd)
        xml = domain_xml(self._name, kind, guest_dir, scsi_root=self._root_file,
                         project_id=project_id)
        t0 = time.monotonic()
        try:
            with tempfile.NamedTemporaryFile("w", prefix="vmattach-dom-", suffix=".xml") as f:
                f.write(xml)
                f.flush()
                t0 = time.monotonic()
                if persistent:
                    virsh(uri, "define", f.name)
                    self._uuid = virsh(uri, "domuuid", self._name).stdout.strip()
                    virsh(uri, "start", self._uuid)
                else:
                    virsh(uri, "create", f.name)
            self._uuid = virsh(uri, "domuuid", self._name).stdout.strip()
            if kind == "linux":
                self._open_console()
                self._wait(lambda: self._ready, ready_timeout,
                           f"guest {self._name} did not print {READY_MARKER}")
                self.boot_seconds = time.monotonic() - t0
        except BaseException:
            if self._uuid is None:  # created but uuid unknown: fall back to the unique name
                virsh(uri, "destroy", self._name, check=False)
                if persistent:
                    virsh(uri, "undefine", self._name, check=False)
            self.destroy()
            raise
        return self

    def restart(self, ready_timeout: float = 60.0) -> None:
        """Power a persistent guest off and start it again from its persistent
        definition (what a host reboot or `virsh destroy; virsh start` does);
        waits for the ready marker. Disks seen before are forgotten."""
        if not self._persistent or self._uuid is None:
            raise GuestError(f"guest {self._name} is not a started persistent domain")
        virsh(self._uri, "destroy", self._uuid)
        self._close_console()
        with self._cond:
            self._ready = False
            self._closed = False
            self._present.clear()
        t0 = time.monotonic()
        virsh(self._uri, "start", self._uuid)
        if self._kind == "linux":
            self._open_console()
            self._wait(lambda: self._ready, ready_timeout,
                       f"guest {self._name} did not print {READY_MARKER} after a restart")
            self.boot_seconds = time.monotonic() - t0

    def persistent_serials(self) -> list[str]:
        """The serials of the disks in the persistent (inactive) definition."""
        xml = virsh(self._uri, "dumpxml", "--inactive", self._uuid or "").stdout
        root = ET.fromstring(xml)
        return [d.findtext("serial") or "" for d in root.findall("devices/disk")
                if d.findtext("serial")]

    def destroy(self) -> None:
        """Destroy this domain (by uuid; a persistent one is undefined too) and
        close the console; idempotent."""
        errors = []
        if self._uuid is not None:
            proc = virsh(self._uri, "destroy", self._uuid, check=False)
            if proc.returncode != 0 and "not found" not in proc.stderr.lower() \
                    and "not running" not in proc.stderr.lower():
                errors.append(proc.stderr.strip())
            if self._persistent:
                proc = virsh(self._uri, "undefine", self._uuid, check=False)
                if proc.returncode != 0 and "not found" not in proc.stderr.lower():
                    errors.append(proc.stderr.strip())
            self._uuid = None
        self._close_console()
        if self._root_file is not None:
            try:
                os.unlink(self._root_file)
            except FileNotFoundError:
                pass
            self._root_file = None
        if errors:
            raise GuestError(f"destroying {self._name} failed: {'; '.join(errors)}")

    def __enter__(self) -> TestGuest:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return f"<TestGuest {self._name} {self._kind} uuid={self._uuid}>"

    # ---- console helpers -------------------------------------------------
    def run(self, cmd: str, timeout: float = 30.0) -> tuple[int, str]:
        """Run one shell command line in the guest; return (exit code, output).

        Output is stdout and stderr together, lines joined with '\\n'.
        """
        self._require_console()
        if "\n" in cmd or "\r" in cmd:
            raise ValueError("cmd must be a single line")
        if len(cmd.encode()) > 3900:
            raise ValueError("cmd too long for the guest's tty line buffer")
        with self._cmd_lock:
            with self._cond:
                self._cmd_seq += 1
                self._cmd_marker = f"{BEGIN_PREFIX}{self._cmd_seq}-{uuidlib.uuid4().hex[:8]}"
                self._cmd_output = []
                self._cmd_rc = None
                self._cmd_state = "marker"
            # A separate marker command first: anything the guest prints before
            # the marker (e.g. a late answer to a command that timed out) is dropped.
            self._write(f"echo {self._cmd_marker}\n{cmd}\n")
            try:
                self._wait(lambda: self._cmd_state == "done", timeout,
                           f"command {cmd!r} did not finish in the guest")
                with self._cond:
                    return int(self._cmd_rc or 0), "\n".join(self._cmd_output)
            finally:
                with self._cond:
                    self._cmd_state = None

    def wait_disk(self, serial_prefix: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until a disk whose serial starts with serial_prefix is present.

        A serial cut to 20 (virtio-blk) or 36 (scsi) characters also matches
        the full one.
        Returns {'name', 'serial', 'size', 'sha256'} from its DISK-ADDED line.
        """
        self._require_console()
        found: list[dict[str, Any]] = []

        def present() -> bool:
            for info in self._present.values():
                if _serial_matches(info.get("serial", ""), serial_prefix):
                    found.append(info)
                    return True
            return False

        self._wait(present, timeout, f"no disk with serial {serial_prefix!r} appeared")
        info = found[0]
        return {k: info[k] for k in ("name", "serial", "size", "sha256")}

    def wait_disk_gone(self, serial_prefix: str, timeout: float = 30.0) -> None:
        """Wait until no disk whose serial starts with serial_prefix is present."""
        self._require_console()
        self._wait(lambda: not any(_serial_matches(i.get("serial", ""), serial_prefix)
                                   for i in self._present.values()),
                   timeout, f"disk with serial {serial_prefix!r} did not go away")

    def disks(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """The disks the guest has now, asked from the guest itself."""
        rc, out = self.run("vmattach-disks", timeout=timeout)
        if rc != 0:
            raise GuestError(f"vmattach-disks failed (rc {rc}): {out}")
        result = []
        for line in out.splitlines():
            parsed = _parse_disk_line(line)
            if parsed and parsed[0] == "DISK":
                result.append({k: parsed[1].get(k) for k in ("name", "serial", "size", "sha256")})
        return result

    def serials(self, timeout: float = 60.0) -> dict[str, str]:
        """{name: serial} of the guest's disks now, read from sysfs by the
        guest (cheap: no data is read, unlike disks())."""
        rc, out = self.run(
            "for d in /sys/block/vd* /sys/block/sd*; do [ -e $d ] || continue; s=; "
            "if [ -r $d/serial ]; then s=$(cat $d/serial); "
            "elif [ -r $d/device/vpd_pg80 ]; then s=$(tail -c +5 $d/device/vpd_pg80 | tr -d '\\000'); "
            "fi; echo ${d##*/} $s; done", timeout=timeout)
        if rc != 0:
            raise GuestError(f"listing the disks failed (rc {rc}): {out}")
        return dict((line.split() + [""])[:2] for line in out.splitlines() if line.strip())

    def events(self) -> list[dict[str, Any]]:
        """All DISK-ADDED/DISK-REMOVED events seen so far (with 'event' and 'time')."""
        with self._cond:
            return [dict(e) for e in self._events]

    def console_lines(self) -> list[str]:
        """The last console lines (for diagnostics)."""
        with self._cond:
            return list(self._console)

    # ---- internals -------------------------------------------------------
    def _require_console(self) -> None:
        if self._fd is None:
            raise GuestError(f"guest {self._name} has no console (kind {self._kind!r} or destroyed)")

    def _open_console(self) -> None:
        root = ET.fromstring(virsh(self._uri, "dumpxml", self._uuid).stdout)
        src = root.find("devices/serial/source")
        path = src.get("path") if src is not None else None
        if not path:
            raise GuestError(f"no pty path in the live XML of {self._name}")
        self._pty_path = path
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        # Raw at once: a cooked slave would echo the guest's output back into
        # the guest's console input and turn '\n' into '\r\n'.
        tty.setraw(fd)
        self._fd = fd
        self._stop.clear()
        self._reader = threading.Thread(target=self._read_loop, name=f"console-{self._name}", daemon=True)
        self._reader.start()

    def _close_console(self) -> None:
        self._stop.set()
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _write(self, text: str) -> None:
        data = text.encode()
        while data:
            n = os.write(self._fd, data)
            data = data[n:]

    def _read_loop(self) -> None:
        fd, buf = self._fd, b""
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([fd], [], [], 0.2)
                if not ready:
                    continue
                chunk = os.read(fd, 65536)
            except OSError:  # EIO once QEMU closed the pty master
                break
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            if lines:
                with self._cond:
                    for raw in lines:
                        self._handle(raw.rstrip(b"\r").decode("utf-8", "replace"))
                    self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _handle(self, line: str) -> None:  # called with self._cond held
        self._console.append(line)
        if line.endswith(READY_MARKER):
            self._ready = True
            return
        parsed = _parse_disk_line(line)
        if parsed and parsed[0] != "DISK":
            event, info = parsed
            info = dict(info, event=event, time=time.monotonic())
            self._events.append(info)
            if event == "DISK-ADDED":
                self._present[info["name"]] = info
            else:
                self._present.pop(info["name"], None)
            return
        state = self._cmd_state
        if state == "marker":
            if line == self._cmd_marker:
                self._cmd_state = "marker-rc"
        elif state == "marker-rc":
            if line.startswith(RC_PREFIX):
                self._cmd_state = "collect"
        elif state == "collect":
            if line.startswith(RC_PREFIX):
                try:
                    self._cmd_rc = int(line[len(RC_PREFIX):].strip())
                except ValueError:
                    self._cmd_rc = -1
                self._cmd_state = "done"
            else:
                self._cmd_output.append(line)

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                if self._closed:
                    raise GuestError(f"{what}: console closed (guest {self._name} gone?)"
                                     f"{self._tail()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GuestTimeout(f"{what} within {timeout}s{self._tail()}")
                self._cond.wait(remaining)

    def _tail(self, n: int = 15) -> str:
        lines = list(self._console)[-n:]
        return "; last console lines:\n  " + "\n  ".join(lines) if lines else "; console empty"


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.support.guest --project demo`: a test guest to try
    the README's commands on by hand; it runs until SIGTERM or SIGINT, then
    it is destroyed."""
    import argparse
    import signal
    import threading

    p = argparse.ArgumentParser(prog="python -m tests.support.guest",
                                description="Boot the small test guest (scripts/build-test-guest.sh)"
                                " under libvirt until SIGTERM or SIGINT.")
    p.add_argument("--project", default="", help="the project that owns it (Nova's metadata)")
    p.add_argument("--name", help="the domain's name (default: vmattach-test-RANDOM)")
    p.add_argument("--uri", default=DEFAULT_URI, help=f"libvirt URI (default {DEFAULT_URI})")
    args = p.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with TestGuest.start(uri=args.uri, name=args.name, project_id=args.project) as guest:
        print(f"server {guest.uuid} ({guest.name}) of project {args.project or '(none)'}:"
              " running until SIGTERM or Ctrl-C", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
