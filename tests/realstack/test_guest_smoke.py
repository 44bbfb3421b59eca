"""Smoke test of the real stack's test guest: boot, hot-plug, read, detach.

Needs a running libvirtd on qemu:///system (scripts/setup-host.sh) and builds
the test guest on first use (scripts/build-test-guest.sh). Timings are printed
(run with -s to see them).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET

import pytest

from tests.support.guest import (
    DEFAULT_URI,
    GuestError,
    TestGuest,
    ensure_guest_image,
    virsh,
)

PATTERN_BYTES = 4 * 1024 * 1024
DISK_BYTES = 64 * 1024 * 1024
VIRTIO_SERIAL_MAX = 20  # virtio-blk shows the guest the first 20 characters
SCSI_SERIAL_MAX = 36  # QEMU's scsi-hd silently cuts longer serials to 36


def _libvirt_unavailable_reason() -> str | None:
    if shutil.which("virsh") is None:
        return "virsh not installed (run scripts/setup-host.sh)"
    try:
        proc = subprocess.run(["virsh", "-c", DEFAULT_URI, "version"],
                              capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return f"virsh -c {DEFAULT_URI} version timed out"
    if proc.returncode != 0:
        return (f"libvirtd not reachable on {DEFAULT_URI} (run scripts/setup-host.sh): "
                f"{proc.stderr.strip()}")
    return None


@pytest.fixture(scope="module")
def guest_image():
    reason = _libvirt_unavailable_reason()
    if reason:
        pytest.skip(reason)
    try:
        return ensure_guest_image()
    except GuestError as exc:
        pytest.skip(f"cannot build the test guest: {exc}")


@pytest.fixture
def workdir():
    path = tempfile.mkdtemp(prefix="vmattach-smoke-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def linux_guest(guest_image):
    guest = TestGuest.start(guest_dir=guest_image)
    try:
        print(f"\nTIMING boot-to-ready {guest.boot_seconds:.2f}s ({guest.name})")
        yield guest
    finally:
        guest.destroy()


def _make_disk(workdir: str, label: str) -> tuple[str, str]:
    """A 64 MiB sparse file whose first 4 MiB are a known pattern; (path, sha256)."""
    pattern = hashlib.shake_256(label.encode()).digest(PATTERN_BYTES)
    path = os.path.join(workdir, f"{label}.img")
    with open(path, "wb") as f:
        f.write(pattern)
        f.truncate(DISK_BYTES)
    return path, hashlib.sha256(pattern).hexdigest()


def _disk_xml(path: str, bus: str, serial: str) -> str:
    disk = ET.Element("disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="raw")
    ET.SubElement(disk, "source", file=path)
    ET.SubElement(disk, "target", dev="vdb" if bus == "virtio" else "sda", bus=bus)
    ET.SubElement(disk, "serial").text = serial
    return ET.tostring(disk, encoding="unicode")


def _attached_sources(guest: TestGuest) -> list[str]:
    out = virsh(guest.uri, "domblklist", guest.uuid).stdout
    return [line.split(None, 1)[1] for line in out.splitlines()[2:] if len(line.split(None, 1)) == 2]


@pytest.mark.parametrize("bus", ["virtio", "scsi"])
def test_hotplug_read_detach(linux_guest, workdir, bus):
    guest = linux_guest
    serial = f"smoke-{uuid.uuid4()}"
    path, expected_sha = _make_disk(workdir, f"{bus}-{serial}")
    xml_path = os.path.join(workdir, f"{bus}.xml")
    with open(xml_path, "w") as f:
        f.write(_disk_xml(path, bus, serial))

    attached = False
    try:
        t0 = time.monotonic()
        virsh(guest.uri, "attach-device", guest.uuid, xml_path, "--live")
        attached = True
        disk = guest.wait_disk(serial, timeout=30)
        visible = time.monotonic() - t0
        print(f"TIMING {bus} hot-plug-to-visible {visible:.3f}s")

        expected_serial = serial[:VIRTIO_SERIAL_MAX if bus == "virtio" else SCSI_SERIAL_MAX]
        assert disk["serial"] == expected_serial
        assert disk["name"].startswith("vd" if bus == "virtio" else "sd")
        assert disk["size"] == DISK_BYTES
        assert disk["sha256"] == expected_sha
        assert path in _attached_sources(guest)
        assert any(d["serial"] == expected_serial and d["sha256"] == expected_sha
                   for d in guest.disks())

        t0 = time.monotonic()
        virsh(guest.uri, "detach-device", guest.uuid, xml_path, "--live")
        guest.wait_disk_gone(serial, timeout=30)
        gone = time.monotonic() - t0
        print(f"TIMING {bus} detach-to-gone {gone:.3f}s")
        attached = False
        assert not any(d["serial"] == expected_serial for d in guest.disks())
        # QEMU releases the device asynchronously after the guest ejected it
        deadline = time.monotonic() + 10
        while path in _attached_sources(guest) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path not in _attached_sources(guest)
    finally:
        if attached:
            virsh(guest.uri, "detach-device", guest.uuid, xml_path, "--live", check=False)


def test_diskless_guest_boots_and_is_destroyed(guest_image):
    with TestGuest.start(kind="diskless") as guest:
        state = virsh(guest.uri, "domstate", guest.uuid).stdout.strip()
        assert state == "running"
        domain_uuid = guest.uuid
    proc = virsh(DEFAULT_URI, "domstate", domain_uuid, check=False)
    assert proc.returncode != 0  # transient domain is gone
