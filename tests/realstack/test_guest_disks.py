"""What the guest keeps, on the real stack (tgtd, libvirtd, QEMU and the
small Linux test guest), through the servers facade:

- a persistent (defined) domain keeps an attached disk across a restart of
  the guest, and a detached one is gone from its persistent definition and
  stays gone after a restart (CONFIG and LIVE, not LIVE only);
- 50 concurrent auto-named attaches to one server get 50 distinct device
  names, and the guest sees all 50 disks. virtio-blk takes a PCI slot per
  disk (the pc machine has 32 slots), so this server's disks are on the SCSI
  bus (its root disk is sda): libvirt adds a virtio-scsi controller per 7
  disks and the names run sdb ... sdz, sdaa ... sdaz."""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import make_settings, need
from tests.support.guest import TestGuest, ensure_guest_image, virsh
from tests.support.tgtd import TgtDaemon
from vmattach.clients.client import VmattachClient
from vmattach.clients.serve import start
from vmattach.common.runner import CommandRunner
from vmattach.controller.tgt import TgtAdm
from vmattach.v1 import types_pb2

pytestmark = pytest.mark.realstack

PATTERN = 4 << 20  # the guest reports the sha256 of a disk's first 4 MiB
MANY = 50


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    need("tgtd", "virsh")
    ensure_guest_image()
    tmp = tmp_path_factory.mktemp("guest-disks")
    tgtd = TgtDaemon(log_path=tmp / "tgtd.log").start()
    settings = make_settings(tmp, tgt_portal=tgtd.portal, tgt_control_port=tgtd.control_port,
                             detach_timeout=10, detach_retries=2,
                             max_volumes_per_server=MANY + 10)
    running = start(settings)

    class Real:
        pass
    r = Real()
    r.settings, r.tgtd, r.running = settings, tgtd, running
    r.client = VmattachClient(f"127.0.0.1:{running.port}", timeout=180)
    r.tgtadm = TgtAdm(CommandRunner(), tgtd.control_port)
    try:
        yield r
    finally:
        r.client.close()
        running.stop(grace=1)
        tgtd.stop()


@pytest.fixture
def guest_factory():
    guests: list[TestGuest] = []

    def _start(**kw) -> TestGuest:
        guest = TestGuest.start(kind="linux", name=f"vmattach-h16-{uuid.uuid4().hex[:8]}",
                               ready_timeout=120, **kw)
        guests.append(guest)
        return guest

    yield _start
    for guest in guests:
        guest.destroy()


def new_volume(real, pattern: bytes | None = None) -> str:
    volume_id = real.client.create_volume(f"gd-{uuid.uuid4().hex[:8]}", 1).volume_id
    if pattern:
        path = Path(real.settings.state_dir) / "volumes" / f"volume-{volume_id}.img"
        with open(path, "r+b") as f:
            f.write(pattern)
    return volume_id


def guest_serials(guest) -> list[str]:
    """The serials of the live domain's disks, as libvirt has them."""
    import xml.etree.ElementTree as ET
    root = ET.fromstring(virsh(guest.uri, "dumpxml", guest.uuid).stdout)
    return [d.findtext("serial") or "" for d in root.findall("devices/disk")]


def assert_clean(real, guest, volume_id):
    volume = real.client.get_volume(volume_id)
    assert (volume.status, len(volume.attachments)) == (types_pb2.VOLUME_STATUS_AVAILABLE, 0)
    assert not [t for t in real.tgtadm.show().values() if t.iqn.endswith(volume_id)]
    assert f"volume-{volume_id}" not in virsh(guest.uri, "secret-list").stdout
    assert list(real.client.list_attachments(guest.uuid)) == []


def test_persistent_guest_keeps_an_attached_disk_across_a_restart_and_not_a_detached_one(
        real, guest_factory):
    guest = guest_factory(persistent=True)
    pattern = os.urandom(PATTERN)
    volume_id = new_volume(real, pattern)

    att = real.client.attach_volume(guest.uuid, volume_id)
    assert att.device == "/dev/vdb"
    assert guest.wait_disk(volume_id, timeout=60)["sha256"] == hashlib.sha256(pattern).hexdigest()
    assert guest.persistent_serials() == [volume_id]

    # the disk is in the persistent definition: it comes back with the guest
    guest.restart()
    seen = guest.wait_disk(volume_id, timeout=60)
    assert seen["sha256"] == hashlib.sha256(pattern).hexdigest()
    assert [a.volume_id for a in real.client.list_attachments(guest.uuid)] == [volume_id]

    real.client.detach_volume(guest.uuid, volume_id)
    guest.wait_disk_gone(volume_id, timeout=60)
    assert guest.persistent_serials() == []
    assert_clean(real, guest, volume_id)

    # ... and a detached disk does not come back with it
    guest.restart()
    assert [d for d in guest.disks() if volume_id.startswith(d["serial"] or "-")] == []
    assert guest.persistent_serials() == []
    real.client.delete_volume(volume_id)


def test_fifty_concurrent_auto_named_attaches_get_distinct_devices_the_guest_sees(
        real, guest_factory):
    guest = guest_factory(scsi_root=True)
    server = real.client.get_server(guest.uuid)
    assert (server.device_prefix, server.root_device) == ("sd", "sda")
    volumes = [new_volume(real) for _ in range(MANY)]
    barrier = threading.Barrier(MANY)

    def attach(volume_id):
        barrier.wait()
        return real.client.attach_volume(guest.uuid, volume_id)

    with ThreadPoolExecutor(MANY) as pool:
        attachments = list(pool.map(attach, volumes))
    devices = [a.device for a in attachments]
    assert len(set(devices)) == MANY and "/dev/sda" not in devices
    assert all(d.startswith("/dev/sd") for d in devices)
    assert len(guest_serials(guest)) == MANY + 1
    # every disk reached the guest, each under its own name, with its serial
    seen = eventually(lambda: guest_has(guest, volumes), timeout=180)
    assert len(set(seen.values())) == MANY

    with ThreadPoolExecutor(MANY) as pool:
        list(pool.map(lambda v: real.client.detach_volume(guest.uuid, v), volumes))
    eventually(lambda: guest_has(guest, volumes, present=False), timeout=180)
    assert guest_serials(guest) == [""]  # the root disk only
    for volume_id in volumes:
        assert_clean(real, guest, volume_id)
        real.client.delete_volume(volume_id)


def guest_has(guest, volumes, present=True) -> dict[str, str]:
    """{volume: name in the guest} once the guest has all the volumes (none,
    with present=False)."""
    found = {}
    for name, serial in guest.serials().items():
        volume = next((v for v in volumes if serial and v.startswith(serial)), None)
        if volume is not None:
            found[volume] = name
    if present:
        assert set(found) == set(volumes), f"the guest lacks {set(volumes) - set(found)}"
    else:
        assert found == {}, f"the guest still has {found}"
    return found


def eventually(check, timeout):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
