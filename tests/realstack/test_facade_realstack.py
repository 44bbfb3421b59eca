"""The servers facade on the real stack: tgtd, libvirtd, QEMU and the small
Linux test guest, driven through the `vmattach` CLI and the gRPC API."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import make_settings, need
from tests.support.guest import TestGuest, ensure_guest_image, virsh
from tests.support.tgtd import TgtDaemon
from vmattach.clients.client import VmattachClient
from vmattach.clients.serve import start
from vmattach.common.errors import VmattachError
from vmattach.common.runner import CommandRunner
from vmattach.controller.tgt import TgtAdm
from vmattach.server.models import BlockDeviceMapping as BDM
from vmattach.v1 import types_pb2

pytestmark = pytest.mark.realstack

VMATTACH = str(Path(sys.executable).with_name("vmattach"))
PATTERN = 4 << 20


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    need("tgtd", "virsh")
    ensure_guest_image()
    tmp = tmp_path_factory.mktemp("facade-real")
    tgtd = TgtDaemon(log_path=tmp / "tgtd.log").start()
    settings = make_settings(tmp, tgt_portal=tgtd.portal, tgt_control_port=tgtd.control_port,
                             detach_timeout=15, detach_retries=2)  # a guest under load is slow
    running = start(settings)
    guest = TestGuest.start(kind="linux")

    class Real:
        pass
    r = Real()
    r.tgtd, r.settings, r.running, r.guest = tgtd, settings, running, guest
    r.address = f"127.0.0.1:{running.port}"
    r.client = VmattachClient(r.address, timeout=120)
    r.facade = next(s.servicer.f for s in running.services if hasattr(s.servicer, "f"))
    r.tgtadm = TgtAdm(CommandRunner(), tgtd.control_port)
    try:
        yield r
    finally:
        r.client.close()
        guest.destroy()
        running.stop(grace=1)
        tgtd.stop()


def cli(real, *args) -> subprocess.CompletedProcess:
    return subprocess.run([VMATTACH, "--json", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "VMATTACH_ADDRESS": real.address})


def new_volume(real, pattern: bytes | None = None) -> str:
    proc = cli(real, "volume", "create", f"v-{uuid.uuid4().hex[:8]}", "--size", "1")
    assert proc.returncode == 0, proc.stderr
    volume_id = json.loads(proc.stdout)["volume_id"]
    if pattern:
        with open(Path(real.settings.state_dir) / "volumes" / f"volume-{volume_id}.img", "r+b") as f:
            f.write(pattern)
    return volume_id


def domain_serials(real) -> list[str]:
    xml = ET.fromstring(virsh(real.guest.uri, "dumpxml", real.guest.uuid).stdout)
    return [d.findtext("serial") for d in xml.findall("devices/disk") if d.findtext("serial")]


def assert_clean(real, volume_id):
    volume = real.client.get_volume(volume_id)
    assert (volume.status, len(volume.attachments)) == (types_pb2.VOLUME_STATUS_AVAILABLE, 0)
    with real.facade.db.connection_context():
        assert BDM.select().where((BDM.volume_id == volume_id) & (BDM.deleted == 0)).count() == 0
    assert not [t for t in real.tgtadm.show().values() if t.iqn.endswith(volume_id)]
    assert f"volume-{volume_id}" not in virsh(real.guest.uri, "secret-list").stdout
    assert volume_id not in domain_serials(real)


def test_cli_attach_shows_the_disk_in_the_guest_and_detach_removes_it(real):
    pattern = os.urandom(PATTERN)
    volume_id = new_volume(real, pattern)

    proc = cli(real, "volume", "attach", real.guest.uuid, volume_id, "--tag", "data")
    assert proc.returncode == 0, proc.stderr
    att = json.loads(proc.stdout)
    assert att["device"] == "/dev/vdb" and att["tag"] == "data" and att["state"] == "attached"
    hint = att["guest_path_hint"]
    assert hint == f"/dev/disk/by-id/virtio-{volume_id[:20]}"

    seen = real.guest.wait_disk(volume_id, timeout=30)
    assert volume_id.startswith(seen["serial"]) and seen["size"] == 1 << 30
    rc, out = real.guest.run(f"head -c {PATTERN} {hint} | sha256sum")
    assert rc == 0 and out.split()[0] == hashlib.sha256(pattern).hexdigest()
    assert volume_id in domain_serials(real)

    listed = cli(real, "attachment", "list", real.guest.uuid)
    assert [a["volume_id"] for a in json.loads(listed.stdout)] == [volume_id]

    proc = cli(real, "volume", "detach", real.guest.uuid, volume_id)
    assert proc.returncode == 0, proc.stderr
    real.guest.wait_disk_gone(volume_id, timeout=30)
    rc, _ = real.guest.run(f"test -e {hint}")
    assert rc != 0
    assert_clean(real, volume_id)

    again = cli(real, "volume", "detach", real.guest.uuid, volume_id)
    assert again.returncode != 0 and "is not attached to volume" in again.stderr


def test_cli_reports_errors_with_the_servers_message(real):
    proc = cli(real, "volume", "attach", real.guest.uuid, str(uuid.uuid4()))
    assert proc.returncode == 1
    assert "could not be found" in proc.stderr and "NOT_FOUND" in proc.stderr
    proc = cli(real, "volume", "attach", real.guest.uuid, str(uuid.uuid4()), "--device", "/dev/x y")
    assert proc.returncode == 1 and "is invalid" in proc.stderr


@pytest.mark.parametrize("step", ["get_connector", "create_attachment", "node_publish",
                                  "mark_attached", "bdm_attached"])
def test_each_attach_step_failing_leaves_nothing_on_the_real_stack(real, step):
    volume_id = new_volume(real)
    real.facade.faults.arm(f"before:{step}", "unavailable")
    try:
        with pytest.raises(VmattachError, match="injected fault"):
            real.client.attach_volume(real.guest.uuid, volume_id)
    finally:
        real.facade.faults.disarm()
    assert_clean(real, volume_id)
    # the guest lost any disk the rollback detached
    real.guest.wait_disk_gone(volume_id, timeout=30)
    real.client.delete_volume(volume_id)


def test_server_listing_comes_from_the_node(real):
    server = real.client.get_server(real.guest.uuid)
    assert server.name == real.guest.name and server.state == types_pb2.SERVER_STATE_RUNNING
    assert server.device_prefix == "vd"
    assert real.guest.uuid in {s.server_id for s in real.client.list_servers()}
