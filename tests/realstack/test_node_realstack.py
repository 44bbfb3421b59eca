"""The Node on the real stack: a private tgtd, libvirtd + QEMU (TCG) and the
tiny Linux test guest, driven through the gRPC API of a vmattach server that
runs the Controller and the Node.

Attach and detach wall times are printed (run with -s to see them)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.conftest import REQUIRE_REALSTACK, make_settings, need
from tests.support.guest import GuestError, TestGuest, ensure_guest_image, virsh
from tests.support.tgtd import TgtDaemon
from vmattach.clients.serve import Running, start
from vmattach.common.config import Settings
from vmattach.common.enums import BUS
from vmattach.common.errors import FailedPrecondition
from vmattach.common.grpcutil import call, channel
from vmattach.controller.tgt import iter_targets
from vmattach.v1 import controller_pb2 as cpb
from vmattach.v1 import controller_pb2_grpc, node_pb2_grpc, types_pb2
from vmattach.v1 import node_pb2 as npb

pytestmark = pytest.mark.realstack

PATTERN_BYTES = 4 * 1024 * 1024
DETACH_TIMEOUT = 3.0
DETACH_RETRIES = 2
TIMINGS: list[str] = []


@dataclass
class Stack:
    settings: Settings
    tgtd: TgtDaemon
    running: Running
    controller: controller_pb2_grpc.ControllerStub
    node: node_pb2_grpc.NodeStub

    def node_call(self, name: str, request):
        return call(getattr(self.node, name), request, timeout=60)

    def controller_call(self, name: str, request):
        return call(getattr(self.controller, name), request, timeout=60)

    def connector(self) -> types_pb2.Connector:
        return self.node_call("NodeGetInfo", npb.NodeGetInfoRequest()).connector

    def initiators(self, target_iqn: str) -> list[str]:
        out = subprocess.run(["tgtadm", "--control-port", str(self.tgtd.control_port), "--lld",
                              "iscsi", "--mode", "target", "--op", "show"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return next((t.initiators for t in iter_targets(out.splitlines()) if t.iqn == target_iqn), [])


@pytest.fixture(scope="module")
def guest_dir():
    need("tgtd", "tgtadm", "virsh")
    try:
        return ensure_guest_image()
    except GuestError as exc:
        (pytest.fail if REQUIRE_REALSTACK else pytest.skip)(f"no test guest: {exc}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, guest_dir):
    tmp = tmp_path_factory.mktemp("node-realstack")
    tgtd = TgtDaemon(log_path=tmp / "tgtd.log").start()
    settings = make_settings(tmp, services="controller,node", tgt_portal=tgtd.portal,
                             tgt_control_port=tgtd.control_port, detach_timeout=DETACH_TIMEOUT,
                             detach_retries=DETACH_RETRIES)
    running = start(settings)
    ch = channel(f"127.0.0.1:{running.port}")
    try:
        yield Stack(settings, tgtd, running, controller_pb2_grpc.ControllerStub(ch),
                    node_pb2_grpc.NodeStub(ch))
    finally:
        ch.close()
        running.stop(grace=1)
        tgtd.stop()
        if TIMINGS:
            print("\n" + "\n".join(TIMINGS))


@pytest.fixture(scope="module")
def guest(guest_dir):
    with TestGuest.start(guest_dir=guest_dir) as g:
        yield g


# -- helpers ---------------------------------------------------------------------------

def write_pattern(path: Path) -> str:
    """4 MiB of random bytes at the start of the volume file; their sha256."""
    pattern = os.urandom(PATTERN_BYTES)
    with open(path, "r+b") as fh:
        fh.write(pattern)
        fh.flush()
        os.fsync(fh.fileno())
    return hashlib.sha256(pattern).hexdigest()


@dataclass
class PatternedVolume:
    volume_id: str
    path: Path
    sha256: str


@contextmanager
def volume(stack: Stack, name: str):
    vol = stack.controller_call("CreateVolume", cpb.CreateVolumeRequest(name=name, size_gb=1))
    path = Path(stack.settings.volume_path()) / f"volume-{vol.volume_id}.img"
    try:
        yield PatternedVolume(vol.volume_id, path, write_pattern(path))
    finally:
        stack.controller_call("DeleteVolume", cpb.DeleteVolumeRequest(volume_id=vol.volume_id))


@contextmanager
def exported(stack: Stack, vol: PatternedVolume, server_id: str):
    """Reserve and ControllerPublishVolume with the node's connector; undone after."""
    ids = dict(volume_id=vol.volume_id, server_id=server_id)
    stack.controller_call("ReserveVolume", cpb.ReserveVolumeRequest(**ids))
    connector = stack.connector()
    try:
        yield stack.controller_call("ControllerPublishVolume", cpb.ControllerPublishVolumeRequest(
            connector=connector, **ids)).connection_info
    finally:
        stack.controller_call("ControllerUnpublishVolume", cpb.ControllerUnpublishVolumeRequest(
            connector=connector, **ids))
        stack.controller_call("UnreserveVolume", cpb.UnreserveVolumeRequest(**ids))


def domain_disks(server_id: str) -> dict[str, ET.Element]:
    """serial -> <disk> of the live domain XML."""
    root = ET.fromstring(virsh("qemu:///system", "dumpxml", server_id).stdout)
    return {d.findtext("serial"): d for d in root.iterfind("devices/disk")}


def secret_usages() -> str:
    return virsh("qemu:///system", "secret-list").stdout


def listed_server(stack: Stack, server_id: str) -> types_pb2.Server:
    servers = stack.node_call("ListServers", npb.NodeListServersRequest()).servers
    return next(s for s in servers if s.server_id == server_id)


def wait_until(predicate, timeout: float, what: str) -> None:
    """Poll a condition with a deadline (tgtd has no event to wait for)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {timeout}s"
        time.sleep(0.05)


def stage_and_publish(stack, server_id, volume_id, device, info):
    staged = stack.node_call("NodeStageVolume", npb.NodeStageVolumeRequest(
        volume_id=volume_id, connection_info=info)).staged
    disk = stack.node_call("NodePublishVolume", npb.NodePublishVolumeRequest(
        server_id=server_id, volume_id=volume_id, device=device, connection_info=info,
        staged=staged)).disk
    return staged, disk


def unpublish_and_unstage(stack, server_id, volume_id, info):
    stack.node_call("NodeUnpublishVolume", npb.NodeUnpublishVolumeRequest(
        server_id=server_id, volume_id=volume_id))
    stack.node_call("NodeUnstageVolume", npb.NodeUnstageVolumeRequest(
        volume_id=volume_id, connection_info=info))


# -- tests -----------------------------------------------------------------------------

def test_info_and_list_servers(stack, guest):
    connector = stack.connector()
    assert connector.initiator.startswith("iqn.") and connector.ip == "127.0.0.1"
    assert connector.os_type == "linux" and connector.platform and not connector.multipath
    server = listed_server(stack, guest.uuid)
    assert (server.name, server.state) == (guest.name, types_pb2.SERVER_STATE_RUNNING)
    assert (server.device_prefix, server.root_device) == ("vd", "")


@pytest.mark.parametrize("device, bus", [("/dev/vdb", "virtio"), ("/dev/sda", "scsi")])
def test_iscsi_attach_read_detach(stack, guest, device, bus):
    with volume(stack, f"node-iscsi-{bus}") as vol, exported(stack, vol, guest.uuid) as info:
        vid, initiator = vol.volume_id, stack.connector().initiator
        try:
            t0 = time.monotonic()
            staged, disk = stage_and_publish(stack, guest.uuid, vid, device, info)
            attach = time.monotonic() - t0
            assert staged.secret_usage == f"volume-{vid}" and f"volume-{vid}" in secret_usages()
            assert (disk.device, disk.serial, disk.bus) == (device[5:], vid, BUS.to_pb(bus))

            xml = domain_disks(guest.uuid)[vid]
            assert xml.find("target").attrib == {"dev": device[5:], "bus": bus}
            assert xml.find("source").get("protocol") == "iscsi"
            assert xml.find("source/initiator/iqn").get("name") == initiator
            assert xml.find("alias").get("name") == f"ua-{vid}"
            assert initiator in stack.initiators(info.data.target_iqn)

            seen = guest.wait_disk(vid)
            assert seen["serial"] == (vid[:20] if bus == "virtio" else vid)  # virtio-blk: 20
            assert seen["sha256"] == vol.sha256

            # the same again is a no-op
            assert stage_and_publish(stack, guest.uuid, vid, device, info) == (staged, disk)
            assert [d.serial for d in listed_server(stack, guest.uuid).disks] == [vid]

            t0 = time.monotonic()
            unpublish_and_unstage(stack, guest.uuid, vid, info)
            detach = time.monotonic() - t0
            guest.wait_disk_gone(vid)
            assert vid not in domain_disks(guest.uuid)
            assert f"volume-{vid}" not in secret_usages()
            wait_until(lambda: initiator not in stack.initiators(info.data.target_iqn), 10,
                       "the initiator's session did not end")
            unpublish_and_unstage(stack, guest.uuid, vid, info)  # again: OK
            TIMINGS.append(f"TIMING iscsi {bus}: attach (stage+publish) {attach * 1000:.0f} ms, "
                           f"detach (unpublish+unstage) {detach * 1000:.0f} ms")
        finally:
            cleanup(stack, guest.uuid, vid, info)


def test_iscsi_publish_without_stage_is_not_staged(stack, guest):
    """libvirt looks the disk's CHAP secret up at the attach (the Node does
    not ask first): a volume never staged here has none, and no disk."""
    with volume(stack, "node-unstaged") as vol, exported(stack, vol, guest.uuid) as info:
        with pytest.raises(FailedPrecondition, match="not staged") as err:
            stack.node_call("NodePublishVolume", npb.NodePublishVolumeRequest(
                server_id=guest.uuid, volume_id=vol.volume_id, device="/dev/vdb",
                connection_info=info))
        assert err.value.reason == "VOLUME_NOT_STAGED"
        assert vol.volume_id not in domain_disks(guest.uuid)


def cleanup(stack: Stack, server_id: str, volume_id: str, info) -> None:
    """After a failed test: detach and unstage what it left (only its own
    disk and secret); a no-op after a passing one."""
    try:
        unpublish_and_unstage(stack, server_id, volume_id, info)
    except Exception as exc:  # best effort; the test already failed
        print(f"cleanup of volume {volume_id}: {exc}")
    for line in secret_usages().splitlines():
        if line.strip().endswith(f"volume-{volume_id}"):
            virsh("qemu:///system", "secret-undefine", line.split()[0], check=False)


def test_file_volume_attach_read_detach(stack, guest):
    with volume(stack, "node-file") as vol:
        info = types_pb2.ConnectionInfo(driver_volume_type=types_pb2.DRIVER_VOLUME_TYPE_FILE, serial=vol.volume_id,
                                        data=types_pb2.ConnectionData(device_path=str(vol.path)))
        t0 = time.monotonic()
        staged, disk = stage_and_publish(stack, guest.uuid, vol.volume_id, "/dev/vdc", info)
        attach = time.monotonic() - t0
        assert staged.device_path == str(vol.path) and disk.device == "vdc"
        assert domain_disks(guest.uuid)[vol.volume_id].find("source").get("file") == str(vol.path)
        assert guest.wait_disk(vol.volume_id)["sha256"] == vol.sha256
        t0 = time.monotonic()
        unpublish_and_unstage(stack, guest.uuid, vol.volume_id, info)
        detach = time.monotonic() - t0
        guest.wait_disk_gone(vol.volume_id)
        TIMINGS.append(f"TIMING file virtio: attach {attach * 1000:.0f} ms, "
                       f"detach {detach * 1000:.0f} ms")


def test_unpublish_from_diskless_guest_fails_and_disk_stays(stack, guest_dir, tmp_path):
    path = stack.settings.volume_path() / "stuck.img"  # the file connector: volume dirs only
    path.write_bytes(b"\0" * 1024 * 1024)
    info = types_pb2.ConnectionInfo(driver_volume_type=types_pb2.DRIVER_VOLUME_TYPE_FILE,
                                    data=types_pb2.ConnectionData(device_path=str(path)))
    vid = "6f1c2a7e-0000-4000-8000-" + os.urandom(6).hex()
    with TestGuest.start(kind="diskless", guest_dir=guest_dir) as diskless:
        stage_and_publish(stack, diskless.uuid, vid, "/dev/vdb", info)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stack.node.NodeUnpublishVolume(npb.NodeUnpublishVolumeRequest(
                server_id=diskless.uuid, volume_id=vid), timeout=120)
        elapsed = time.monotonic() - t0
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.details() == (f"The guest did not release the device vdb of server "
                                       f"{diskless.uuid} after {DETACH_RETRIES} attempts")
        assert elapsed >= DETACH_TIMEOUT * DETACH_RETRIES
        assert [d.serial for d in listed_server(stack, diskless.uuid).disks] == [vid]
        assert vid in domain_disks(diskless.uuid)
        TIMINGS.append(f"TIMING diskless virtio unpublish gave up after {elapsed:.1f} s")
