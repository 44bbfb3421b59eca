"""Crash recovery on the real stack: the facade process is killed (SIGKILL)
right after each step of an attach and of a detach; a new facade recovers
the operation, `vmattach audit` finds nothing, and the volume attaches
again. Also: tgtd killed and restarted under an attached volume."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import need
from tests.support.guest import TestGuest, ensure_guest_image
from tests.support.tgtd import TgtDaemon
from tests.support.vmattach_process import ServeProcess
from vmattach.clients.client import VmattachClient
from vmattach.common.enums import VOLUME_STATUS
from vmattach.common.errors import Unavailable, VmattachError
from vmattach.v1 import types_pb2

pytestmark = pytest.mark.realstack

VMATTACH = str(Path(sys.executable).with_name("vmattach"))
ATTACH_BOUNDARIES = ["bdm_insert", "get_connector", "create_attachment", "node_publish",
                     "mark_attached", "bdm_attached"]
DETACH_BOUNDARIES = ["bdm_detaching", "begin_detaching", "node_unpublish",
                     "delete_attachment", "bdm_delete"]


class Deployment:
    """Controller + Node in one process, the facade in another (the one the
    tests kill), sharing a state directory; a private tgtd; one Linux guest."""

    def __init__(self, tmp: Path):
        self.tmp, self.state = tmp, tmp / "state"
        self.state.mkdir()
        self.tgtd = TgtDaemon(log_path=tmp / "tgtd.log").start()
        self.backend = ServeProcess(self._common() + [
            "--services", "controller,node", "--detach-timeout", "5",
            "--reconcile-interval", "0.5"], tmp / "backend.log")
        self.guest = TestGuest.start(kind="linux")
        self.facade: ServeProcess | None = None

    def _common(self) -> list[str]:
        return ["--listen", "127.0.0.1:0", "--state-dir", str(self.state),
                "--tgt-portal", self.tgtd.portal, "--tgt-control-port", str(self.tgtd.control_port),
                "--log-level", "INFO"]

    def start_facade(self, fault: str = "") -> VmattachClient:
        args = self._common() + ["--services", "servers",
                                 "--controller-address", self.backend.address,
                                 "--nodes", self.backend.address,
                                 "--owner-lease", "1", "--reconcile-interval", "0.3"]
        if fault:
            args += ["--fault-injection", fault]
        self.facade = ServeProcess(args, self.tmp / "facade.log")
        return VmattachClient(self.facade.address, self.backend.address, timeout=60)

    def killed(self) -> int:
        return self.facade.proc.wait(timeout=30)

    def stop_facade(self) -> None:
        if self.facade:
            self.facade.stop()
            self.facade = None

    def unfinished(self) -> list[tuple]:
        db = sqlite3.connect(self.state / "servers.db")
        try:
            return db.execute("SELECT id, state, progress FROM block_device_mapping"
                              " WHERE deleted = 0 AND state != 'attached'").fetchall()
        finally:
            db.close()

    def wait_recovered(self, client: VmattachClient, volume_id: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            status = VOLUME_STATUS.name(client.get_volume(volume_id).status)
            if not self.unfinished() and status in ("available", "in-use"):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not recovered: {self.unfinished()} volume {status}; "
                                     f"log: {self.facade.log()}")
            time.sleep(0.1)

    def audit(self) -> subprocess.CompletedProcess:
        return subprocess.run(
            [VMATTACH, "audit", "--state-dir", str(self.state), "--tgt-control-port",
             str(self.tgtd.control_port), "--listen", self.backend.address,
             "--log-level", "WARNING"], capture_output=True, text=True, timeout=120)

    def close(self) -> None:
        self.stop_facade()
        self.guest.destroy()
        self.backend.stop()
        self.tgtd.stop()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    need("tgtd", "virsh")
    ensure_guest_image()
    d = Deployment(tmp_path_factory.mktemp("recovery"))
    yield d
    d.close()


def _attach_cycle_works(client, deployment, volume_id):
    att = client.attach_volume(deployment.guest.uuid, volume_id)
    deployment.guest.wait_disk(volume_id, timeout=30)
    client.detach_volume(deployment.guest.uuid, volume_id)
    deployment.guest.wait_disk_gone(volume_id, timeout=30)
    return att


def _killed_then_recovered(deployment, client, volume_id, request):
    """request dies with the facade; a new facade recovers; audit is clean.
    Returns the new facade's client and the audit's output."""
    with pytest.raises(VmattachError):
        request(client)
    assert deployment.killed() == -9
    client.close()
    client = deployment.start_facade()
    deployment.wait_recovered(client, volume_id)
    audit = deployment.audit()
    assert audit.returncode == 0, audit.stdout + audit.stderr
    return client, audit


@pytest.mark.parametrize("step", ATTACH_BOUNDARIES)
def test_facade_killed_after_attach_step_is_recovered(deployment, step):
    client = deployment.start_facade(f"after:{step}=kill")
    volume_id = client.create_volume(f"kill-a-{step}", 1).volume_id
    client, audit = _killed_then_recovered(deployment, client, volume_id,
                                           lambda c: c.attach_volume(deployment.guest.uuid,
                                                                     volume_id))
    print(f"attach killed after {step}: volume {VOLUME_STATUS.name(client.get_volume(volume_id).status)}; "
          f"audit: {audit.stdout.strip()}")
    # killed once the disk was in the guest: rolled forward (the new facade asks
    # the node: the dead one recorded nothing after its call); before: undone
    if ATTACH_BOUNDARIES.index(step) >= ATTACH_BOUNDARIES.index("node_publish"):
        assert client.get_volume(volume_id).status == types_pb2.VOLUME_STATUS_IN_USE
        [att] = client.list_attachments(deployment.guest.uuid)
        assert att.state == types_pb2.ATTACHMENT_STATE_ATTACHED
        client.detach_volume(deployment.guest.uuid, volume_id)
        deployment.guest.wait_disk_gone(volume_id, timeout=30)
    else:
        assert client.get_volume(volume_id).status == types_pb2.VOLUME_STATUS_AVAILABLE
        assert list(client.list_attachments(deployment.guest.uuid)) == []
    _attach_cycle_works(client, deployment, volume_id)
    client.delete_volume(volume_id)
    deployment.stop_facade()


@pytest.mark.parametrize("step", DETACH_BOUNDARIES)
def test_facade_killed_after_detach_step_is_recovered(deployment, step):
    client = deployment.start_facade()
    volume_id = client.create_volume(f"kill-d-{step}", 1).volume_id
    client.attach_volume(deployment.guest.uuid, volume_id)
    deployment.guest.wait_disk(volume_id, timeout=30)
    deployment.stop_facade()

    client = deployment.start_facade(f"after:{step}=kill")
    client, audit = _killed_then_recovered(deployment, client, volume_id,
                                           lambda c: c.detach_volume(deployment.guest.uuid,
                                                                     volume_id))
    # the detach the user asked for was finished
    assert client.get_volume(volume_id).status == types_pb2.VOLUME_STATUS_AVAILABLE
    deployment.guest.wait_disk_gone(volume_id, timeout=30)
    print(f"detach killed after {step}: finished; audit: {audit.stdout.strip()}")
    _attach_cycle_works(client, deployment, volume_id)
    client.delete_volume(volume_id)
    deployment.stop_facade()


def test_tgtd_restart_under_an_attached_volume(deployment):
    client = deployment.start_facade()
    volume_id = client.create_volume("tgtd-restart", 1).volume_id
    client.attach_volume(deployment.guest.uuid, volume_id)
    deployment.guest.wait_disk(volume_id, timeout=30)

    portal, control = deployment.tgtd.portal_port, deployment.tgtd.control_port
    deployment.tgtd.kill()
    deployment.tgtd = TgtDaemon(portal, control, log_path=deployment.tmp / "tgtd2.log").start()
    # the Controller brings the export back by itself
    deadline = time.monotonic() + 20
    while f"volume-{volume_id}" not in _tgt_show(control):
        assert time.monotonic() < deadline, "the export did not come back"
        time.sleep(0.1)
    # the guest still reads its disk (QEMU's initiator logs in again)
    rc, out = deployment.guest.run(f"head -c 512 /dev/disk/by-id/virtio-{volume_id[:20]} | wc -c",
                                   timeout=60)
    assert rc == 0 and out.strip().endswith("512")
    # a new attach of another volume works, and everything agrees
    other = client.create_volume("tgtd-restart-2", 1).volume_id
    client.attach_volume(deployment.guest.uuid, other)
    deployment.guest.wait_disk(other, timeout=30)
    audit = deployment.audit()
    assert audit.returncode == 0, audit.stdout + audit.stderr
    for v in (volume_id, other):
        client.detach_volume(deployment.guest.uuid, v)
        client.delete_volume(v)
    deployment.stop_facade()


def _tgt_show(control_port: int) -> str:
    return subprocess.run(["tgtadm", "--control-port", str(control_port), "--lld", "iscsi",
                           "--mode", "target", "--op", "show"], capture_output=True,
                          text=True).stdout


def _define_secret(usage: str) -> str:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "secret-define", "/dev/stdin"],
                         input=f"<secret ephemeral='no' private='yes'><usage type='iscsi'>"
                               f"<target>{usage}</target></usage></secret>",
                         text=True, check=True, capture_output=True).stdout
    return out.split()[1]  # "Secret <uuid> created"


def test_audit_reports_and_repairs_a_divergence(deployment, tmp_path):
    """A secret of one of the deployment's volumes left behind on the host
    (as a crash of the old flow would) is reported, repaired, and the audit
    is clean again; a secret some other tool made on the host is neither
    reported nor touched."""
    client = deployment.start_facade()
    orphan = client.create_volume("audit-orphan", 1).volume_id
    _define_secret(f"volume-{orphan}")
    foreign = _define_secret(f"volume-{uuid.uuid4()}")
    try:
        audit = deployment.audit()
        assert audit.returncode == 1 and f"secret-without-bdm: volume {orphan}" in audit.stdout
        assert foreign not in audit.stdout and audit.stdout.count("secret-without-bdm") == 1
        repaired = subprocess.run(
            [VMATTACH, "audit", "--repair", "--state-dir", str(deployment.state),
             "--listen", deployment.backend.address, "--log-level", "WARNING"],
            capture_output=True, text=True, timeout=120)
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        assert deployment.audit().returncode == 0
        assert subprocess.run(["virsh", "-c", "qemu:///system", "secret-dumpxml", foreign],
                              capture_output=True).returncode == 0
    finally:
        subprocess.run(["virsh", "-c", "qemu:///system", "secret-undefine", foreign],
                       capture_output=True)
    client.delete_volume(orphan)
    client.close()
    deployment.stop_facade()


OUR_LIBVIRTD = Path("/run/vmattach/libvirtd.pid")


def _our_libvirtd_pid() -> int | None:
    """The running libvirtd's pid when scripts/setup-host.sh started it."""
    try:
        ours = OUR_LIBVIRTD.read_text().strip()
        running = Path("/run/libvirtd.pid").read_text().strip()
    except OSError:
        return None
    if ours != running or not Path(f"/proc/{ours}").exists():
        return None
    return int(ours)


def test_node_reconnects_after_libvirtd_restart(deployment):
    pid = _our_libvirtd_pid()
    if pid is None:
        pytest.skip("the running libvirtd was not started by scripts/setup-host.sh;"
                    " the suite restarts only a libvirtd of its own")
    client = deployment.start_facade()
    volume_id = client.create_volume("libvirtd-restart", 1).volume_id
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, "libvirtd did not stop"
        time.sleep(0.05)
    subprocess.run(["bash", str(Path(__file__).parents[2] / "scripts" / "setup-host.sh")],
                   check=True, capture_output=True, timeout=120)
    # the guest survived the restart and the Node reconnects by itself. A
    # facade whose refresh ran while libvirtd was down counts the node as
    # down until its next refresh; until then an attach is UNAVAILABLE, never
    # anything else, and leaves nothing behind.
    deadline = time.monotonic() + 90
    while True:
        try:
            _attach_cycle_works(client, deployment, volume_id)
            break
        except Unavailable:
            assert time.monotonic() < deadline, "the node did not come back within 90 s"
            assert client.get_volume(volume_id).status == types_pb2.VOLUME_STATUS_AVAILABLE
            time.sleep(1)
    assert deployment.audit().returncode == 0
    client.delete_volume(volume_id)
    deployment.stop_facade()
