"""What Nova and Cinder users do after attach, proved inside real guests
(tgtd, libvirtd, QEMU's iSCSI initiator with CHAP, the small Linux test
guest): extending an attached volume online, read-only attach, one
multiattach volume in two guests, and a server that vanishes with volumes
attached."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import make_settings, need
from tests.support.guest import TestGuest, ensure_guest_image, virsh
from tests.support.tgtd import TgtDaemon
from vmattach.clients.client import VmattachClient
from vmattach.clients.serve import start
from vmattach.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    VmattachError,
)
from vmattach.common.runner import CommandRunner
from vmattach.controller.tgt import TgtAdm
from vmattach.v1 import types_pb2

pytestmark = pytest.mark.realstack

GIB = 1 << 30


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    need("tgtd", "virsh")
    ensure_guest_image()
    tmp = tmp_path_factory.mktemp("h13-features")
    tgtd = TgtDaemon(log_path=tmp / "tgtd.log").start()
    settings = make_settings(tmp, tgt_portal=tgtd.portal, tgt_control_port=tgtd.control_port,
                             detach_timeout=5, detach_retries=2, max_volume_gb=4,
                             quota_gigabytes=40, reconcile_interval=2, owner_lease=6)
    running = start(settings)
    guests = []

    class Real:
        pass
    r = Real()
    r.tgtd, r.settings, r.running = tgtd, settings, running
    r.client = VmattachClient(f"127.0.0.1:{running.port}", timeout=120)
    r.tgtadm = TgtAdm(CommandRunner(), tgtd.control_port)

    def guest():
        g = TestGuest.start(kind="linux", name=f"vmattach-h13-{uuid.uuid4().hex[:8]}",
                            ready_timeout=180)  # a loaded machine boots slowly
        guests.append(g)
        return g
    r.new_guest = guest
    try:
        r.a, r.b = guest(), guest()
        yield r
    finally:
        r.client.close()
        for g in guests:
            g.destroy()
        running.stop(grace=1)
        tgtd.stop()


def new_volume(real, size_gb: int = 1, multiattach: bool = False,
               pattern: bytes | None = None) -> str:
    volume = real.client.create_volume(f"h13-{uuid.uuid4().hex[:8]}", size_gb, multiattach)
    if pattern:
        path = Path(real.settings.state_dir) / "volumes" / f"volume-{volume.volume_id}.img"
        with open(path, "r+b") as f:
            f.write(pattern)
    return volume.volume_id


def volume_file(real, volume_id: str) -> Path:
    return Path(real.settings.state_dir) / "volumes" / f"volume-{volume_id}.img"


def guest_size(guest, volume_id: str) -> int | None:
    for disk in guest.disks():
        if disk["serial"] and volume_id.startswith(disk["serial"]):
            return disk["size"]
    return None


def wait_for(check, timeout: float = 30.0, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def disk_xml(guest, volume_id: str) -> ET.Element:
    xml = ET.fromstring(virsh(guest.uri, "dumpxml", guest.uuid).stdout)
    return next(d for d in xml.findall("devices/disk") if d.findtext("serial") == volume_id)


def target_of(real, volume_id: str):
    return next((t for t in real.tgtadm.show().values() if t.iqn.endswith(volume_id)), None)


def detach_and_delete(real, guest, volume_id: str) -> None:
    real.client.detach_volume(guest.uuid, volume_id)
    guest.wait_disk_gone(volume_id, timeout=30)
    real.client.delete_volume(volume_id)


def test_extend_of_an_attached_volume_shows_in_the_guest_and_keeps_the_data(real):
    pattern = os.urandom(1 << 20)
    volume_id = new_volume(real, 1, pattern=pattern)
    att = real.client.attach_volume(real.a.uuid, volume_id)
    assert real.a.wait_disk(volume_id, timeout=30)["size"] == GIB

    done = real.client.extend_volume(volume_id, 2)
    assert done.size_gb == 2 and list(done.server_ids) == [real.a.uuid]
    # the facade returned once QEMU had the new size; the guest's kernel follows
    assert wait_for(lambda: guest_size(real.a, volume_id) == 2 * GIB, timeout=10)
    assert real.client.get_volume(volume_id).size_gb == 2
    assert os.path.getsize(volume_file(real, volume_id)) == 2 * GIB
    rc, out = real.a.run(f"head -c {len(pattern)} {att.guest_path_hint} | sha256sum")
    assert rc == 0 and out.split()[0] == hashlib.sha256(pattern).hexdigest()
    # the new space is there and writable from the guest
    rc, out = real.a.run(f"dd if=/dev/zero of={att.guest_path_hint} bs=4096 count=1"
                         f" seek={(2 * GIB - 4096) // 4096} conv=fsync 2>&1")
    assert rc == 0, out

    # shrinking, past --max-volume-gb, past the quota: refused, nothing changed
    with pytest.raises(InvalidArgument, match="New size for extend must be greater"):
        real.client.extend_volume(volume_id, 1)
    with pytest.raises(InvalidArgument, match="between 1 and 4"):
        real.client.extend_volume(volume_id, 5)
    assert real.client.get_volume(volume_id).size_gb == 2
    assert guest_size(real.a, volume_id) == 2 * GIB
    detach_and_delete(real, real.a, volume_id)


def test_quota_refuses_an_extend_and_changes_nothing(real, tmp_path):
    volume_id = new_volume(real, 1)
    real.client.attach_volume(real.a.uuid, volume_id)
    real.a.wait_disk(volume_id, timeout=30)
    manager = next(s.servicer.m for s in real.running.services
                   if type(s.servicer).__name__ == "ControllerServicer")
    saved = manager.quota_gigabytes
    manager.quota_gigabytes = 2  # as if others used the rest of the project's quota
    try:
        with pytest.raises(ResourceExhausted, match="exceeds allowed gigabytes quota"):
            real.client.extend_volume(volume_id, 4)
    finally:
        manager.quota_gigabytes = saved
    assert real.client.get_volume(volume_id).size_gb == 1
    assert guest_size(real.a, volume_id) == GIB
    detach_and_delete(real, real.a, volume_id)


def test_read_only_attach_reads_work_writes_fail(real):
    pattern = os.urandom(1 << 20)
    volume_id = new_volume(real, 1, pattern=pattern)
    att = real.client.attach_volume(real.a.uuid, volume_id, mode="ro")
    assert att.mode == types_pb2.ACCESS_MODE_READ_ONLY
    real.a.wait_disk(volume_id, timeout=30)
    assert disk_xml(real.a, volume_id).find("readonly") is not None
    rc, out = real.a.run(f"head -c {len(pattern)} {att.guest_path_hint} | sha256sum")
    assert rc == 0 and out.split()[0] == hashlib.sha256(pattern).hexdigest()
    rc, out = real.a.run(f"dd if=/dev/zero of={att.guest_path_hint} bs=4096 count=1"
                         f" conv=fsync 2>&1")
    assert rc != 0, out
    with open(volume_file(real, volume_id), "rb") as f:
        assert f.read(len(pattern)) == pattern
    assert [a.attach_mode for a in real.client.get_volume(volume_id).attachments] == \
        [types_pb2.ACCESS_MODE_READ_ONLY]
    assert real.client.get_attachment(real.a.uuid, volume_id).mode == types_pb2.ACCESS_MODE_READ_ONLY
    detach_and_delete(real, real.a, volume_id)


def test_multiattach_volume_in_two_guests_and_detaching_one_keeps_the_other(real):
    volume_id = new_volume(real, 1, multiattach=True)
    first = real.client.attach_volume(real.a.uuid, volume_id)
    second = real.client.attach_volume(real.b.uuid, volume_id)
    real.a.wait_disk(volume_id, timeout=30)
    real.b.wait_disk(volume_id, timeout=30)
    for guest in (real.a, real.b):
        disk = disk_xml(guest, volume_id)
        assert disk.find("shareable") is not None
        assert disk.find("driver").get("cache") == "none"
    # one attachment id for each server, the same at the facade and the Controller
    controller_ids = {a.server_id: a.attachment_id
                      for a in real.client.get_volume(volume_id).attachments}
    assert controller_ids == {real.a.uuid: first.attachment_id, real.b.uuid: second.attachment_id}
    listed = list(real.client.list_attachments(volume_id=volume_id, page_size=1))
    assert sorted(a.server_id for a in listed) == sorted([real.a.uuid, real.b.uuid])

    # A writes, B reads the same bytes (B's cache dropped: it read the disk at hot-plug)
    rc, out = real.a.run("head -c 4096 /dev/urandom > /tmp/p && "
                         f"dd if=/tmp/p of={first.guest_path_hint} bs=4096 count=1 conv=fsync"
                         " 2>/dev/null && sha256sum /tmp/p")
    assert rc == 0, out
    written = out.split()[0]
    read_in_b = f"echo 3 > /proc/sys/vm/drop_caches; head -c 4096 {second.guest_path_hint} | sha256sum"
    rc, out = real.b.run(read_in_b)
    assert rc == 0 and out.split()[0] == written
    with open(volume_file(real, volume_id), "rb") as f:
        assert hashlib.sha256(f.read(4096)).hexdigest() == written

    # detaching from A leaves B's disk, the ACL and the session working
    real.client.detach_volume(real.a.uuid, volume_id)
    real.a.wait_disk_gone(volume_id, timeout=30)
    target = target_of(real, volume_id)
    assert target is not None and len(target.acls) == 1
    assert f"volume-{volume_id}" in virsh(real.b.uri, "secret-list").stdout
    rc, out = real.b.run(f"dd if=/dev/zero of={second.guest_path_hint} bs=4096 count=1"
                         f" conv=fsync 2>&1 && {read_in_b}")
    assert rc == 0 and out.split()[-2] == hashlib.sha256(b"\0" * 4096).hexdigest(), out
    volume = real.client.get_volume(volume_id)
    assert volume.status == types_pb2.VOLUME_STATUS_IN_USE
    assert [a.server_id for a in volume.attachments] == [real.b.uuid]
    detach_and_delete(real, real.b, volume_id)
    assert target_of(real, volume_id) is None


def test_a_second_server_is_refused_a_volume_that_is_not_multiattach(real):
    volume_id = new_volume(real, 1)
    real.client.attach_volume(real.a.uuid, volume_id)
    with pytest.raises(FailedPrecondition, match=f"Invalid volume: volume {volume_id} is already"
                       f" attached to instances: {real.a.uuid}"):
        real.client.attach_volume(real.b.uuid, volume_id)
    assert [a.server_id for a in real.client.get_volume(volume_id).attachments] == [real.a.uuid]
    real.a.wait_disk(volume_id, timeout=30)
    detach_and_delete(real, real.a, volume_id)


def test_a_server_that_vanishes_leaves_no_acl_session_or_volume_behind(real):
    doomed = real.new_guest()
    keep = new_volume(real, 1)
    temporary = new_volume(real, 1)
    real.client.attach_volume(doomed.uuid, keep)
    real.client.attach_volume(doomed.uuid, temporary, delete_on_termination=True)
    doomed.wait_disk(keep, timeout=30)
    doomed.wait_disk(temporary, timeout=30)
    assert target_of(real, keep) is not None

    doomed.destroy()  # a transient domain destroyed behind vmattach's back: it is gone

    def cleaned() -> bool:
        try:
            real.client.get_volume(temporary)
            return False
        except NotFound:
            pass
        return real.client.get_volume(keep).status == types_pb2.VOLUME_STATUS_AVAILABLE
    assert wait_for(cleaned, timeout=60), real.client.get_volume(keep)
    assert target_of(real, keep) is None and target_of(real, temporary) is None
    secrets = virsh(real.a.uri, "secret-list").stdout
    assert f"volume-{keep}" not in secrets and f"volume-{temporary}" not in secrets
    with pytest.raises(VmattachError):
        list(real.client.list_attachments(doomed.uuid))
    assert list(real.client.list_attachments(volume_id=keep)) == []
    real.client.delete_volume(keep)
