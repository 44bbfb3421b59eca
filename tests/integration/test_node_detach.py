"""A detach waiting for its guest does not hold up the rest of the server:
a real Node gRPC server (port 0) on the fake hypervisor, whose guest holds
on to disk A. Meanwhile disk B of the same server is detached and disk C
attached, both within a deadline far shorter than A's wait; then the guest
lets go of A (its detach succeeds) or never does (its detach fails as
before), and the server's disks and the host's secrets are what a user
expects."""

from __future__ import annotations

import time

import grpc
import pytest

from tests.conftest import make_settings
from tests.integration.test_node_grpc import iscsi_pb
from tests.support.fake_hypervisor import FakeHypervisor
from tests.support.fake_runner import FakeRunner
from tests.support.node_helpers import new_id
from vmattach.common.errors import BackendError
from vmattach.common.grpcutil import create_server, error_from_rpc
from vmattach.node.app import build_with
from vmattach.node.hypervisor import Disk
from vmattach.v1 import node_pb2 as pb
from vmattach.v1 import node_pb2_grpc

DETACH_TIMEOUT = 60  # A's detach gives up after this (one attempt)
QUICK = 5  # the deadline of every call that must not wait for A


@pytest.fixture
def node(tmp_path):
    hv = FakeHypervisor()
    service = build_with(make_settings(tmp_path, node_id="node-a", initiator_iqn="iqn.2000-01.x:n",
                                       detach_timeout=DETACH_TIMEOUT, detach_retries=1),
                         FakeRunner(), hv)
    server, port = create_server([service])
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = node_pb2_grpc.NodeStub(ch)
    yield stub, hv
    hv.release_waits()
    ch.close()
    server.stop(0)
    for hook in service.on_stop:
        hook()


def attach(node, server_id: str, device: str) -> str:
    vid = new_id()
    staged = node.NodeStageVolume(pb.NodeStageVolumeRequest(
        volume_id=vid, connection_info=iscsi_pb(vid)), timeout=QUICK).staged
    node.NodePublishVolume(pb.NodePublishVolumeRequest(
        server_id=server_id, volume_id=vid, device=device, connection_info=iscsi_pb(vid),
        staged=staged), timeout=QUICK)
    return vid


def detach(node, server_id: str, vid: str, timeout: float = QUICK) -> None:
    node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(server_id=server_id, volume_id=vid),
                             timeout=timeout)
    node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
        volume_id=vid, connection_info=iscsi_pb(vid)), timeout=timeout)


def disks(node) -> list[tuple[str, str]]:
    (server,) = node.ListServers(pb.NodeListServersRequest(), timeout=QUICK).servers
    return [(d.device, d.serial) for d in server.disks]


def secrets(node) -> set[str]:
    return set(node.ListSecrets(pb.NodeListSecretsRequest(), timeout=QUICK).usages)


@pytest.mark.parametrize("guest", ["lets-go", "never-lets-go"])
def test_other_disks_of_the_server_come_and_go_while_a_detach_waits(node, guest):
    node, hv = node
    dom = hv.add_domain(disks=(Disk("vda", "virtio", "", "virtio-disk0"),), holds=("vdb",))
    a, b = attach(node, dom.uuid, "/dev/vdb"), attach(node, dom.uuid, "/dev/vdc")
    started = time.monotonic()
    detaching_a = node.NodeUnpublishVolume.future(
        pb.NodeUnpublishVolumeRequest(server_id=dom.uuid, volume_id=a), timeout=2 * DETACH_TIMEOUT)
    while (dom.uuid, "vdb") not in hv.pending_detaches():
        assert not detaching_a.done(), detaching_a.exception()
        assert time.monotonic() - started < QUICK, "A's detach never reached the guest"
        time.sleep(0.01)

    detach(node, dom.uuid, b)  # B: detached and its secret removed
    c = attach(node, dom.uuid, "/dev/vdd")  # C: attached
    assert not detaching_a.done()  # A still waits for its guest
    assert disks(node) == [("vda", ""), ("vdb", a), ("vdd", c)]
    assert secrets(node) == {f"volume-{a}", f"volume-{c}"}
    # A's name stays taken while the guest has the disk, and A itself is refused
    for device, volume, code, reason in [("/dev/vdb", new_id(), grpc.StatusCode.FAILED_PRECONDITION,
                                          "DEVICE_IN_USE"),
                                         ("/dev/vde", a, grpc.StatusCode.ABORTED,
                                          "DETACH_IN_PROGRESS")]:
        with pytest.raises(grpc.RpcError) as err:
            node.NodePublishVolume(pb.NodePublishVolumeRequest(
                server_id=dom.uuid, volume_id=volume, device=device,
                connection_info=iscsi_pb(volume)), timeout=QUICK)
        assert (err.value.code(), error_from_rpc(err.value).reason) == (code, reason)

    if guest == "lets-go":
        hv.let_go(dom.uuid, "vdb")
        detaching_a.result(timeout=QUICK)
        assert disks(node) == [("vda", ""), ("vdd", c)]
        detach(node, dom.uuid, a)
        assert secrets(node) == {f"volume-{c}"}
    else:
        hv.release_waits()  # A's wait times out, as it would after DETACH_TIMEOUT
        with pytest.raises(grpc.RpcError) as err:
            detaching_a.result(timeout=QUICK)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_from_rpc(err.value).reason == "DETACH_NOT_COMPLETED"
        assert disks(node) == [("vda", ""), ("vdb", a), ("vdd", c)]
        node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
            volume_id=a, connection_info=iscsi_pb(a)), timeout=QUICK)
        assert secrets(node) == {f"volume-{a}", f"volume-{c}"}  # A's disk still uses its secret
    assert time.monotonic() - started < DETACH_TIMEOUT


def test_a_publish_with_stage_connects_the_host_and_attaches_the_disk_in_one_call(node):
    """The facade's one Node call of an attach: NodePublishVolume with stage.
    A publish refused after its stage leaves the volume staged, for the
    caller's undo (NodeUnstageVolume)."""
    node, hv = node
    dom = hv.add_domain(disks=(Disk("vda", "virtio", "", "virtio-disk0"),))
    vid, other = new_id(), new_id()

    def publish(volume_id: str) -> None:
        node.NodePublishVolume(pb.NodePublishVolumeRequest(
            server_id=dom.uuid, volume_id=volume_id, device="/dev/vdb",
            connection_info=iscsi_pb(volume_id), stage=True), timeout=QUICK)

    publish(vid)
    assert disks(node) == [("vda", ""), ("vdb", vid)]
    assert secrets(node) == {f"volume-{vid}"}
    publish(vid)  # again: the same disk, nothing new
    assert disks(node) == [("vda", ""), ("vdb", vid)]

    with pytest.raises(grpc.RpcError) as err:
        publish(other)  # vdb is taken
    assert (err.value.code(), error_from_rpc(err.value).reason) == (
        grpc.StatusCode.FAILED_PRECONDITION, "DEVICE_IN_USE")
    assert secrets(node) == {f"volume-{vid}", f"volume-{other}"}
    node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
        volume_id=other, connection_info=iscsi_pb(other)), timeout=QUICK)
    detach(node, dom.uuid, vid)
    assert disks(node) == [("vda", "")] and secrets(node) == set()


def test_an_unpublish_with_unstage_detaches_and_disconnects_in_one_call(node, caplog):
    """The facade's one Node call of a detach: NodeUnpublishVolume with
    unstage. An unstage that fails after the disk left the guest is not the
    call's error: the answer says unstaged = false (the caller unstages
    later), and the Node logs why."""
    node, hv = node
    dom = hv.add_domain(disks=(Disk("vda", "virtio", "", "virtio-disk0"),))
    a, b = attach(node, dom.uuid, "/dev/vdb"), attach(node, dom.uuid, "/dev/vdc")

    def unpublish(volume_id: str) -> pb.NodeUnpublishVolumeResponse:
        return node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
            server_id=dom.uuid, volume_id=volume_id, unstage=True,
            connection_info=iscsi_pb(volume_id)), timeout=QUICK)

    assert unpublish(a).unstaged is True
    assert disks(node) == [("vda", ""), ("vdc", b)] and secrets(node) == {f"volume-{b}"}
    assert unpublish(a).unstaged is True  # again: nothing left to do

    hv.inject_error("undefine_secret", BackendError("libvirt said no", reason="LIBVIRT_ERROR"))
    assert unpublish(b).unstaged is False
    assert disks(node) == [("vda", "")] and secrets(node) == {f"volume-{b}"}
    assert f"volume {b} left server {dom.uuid}; its unstage failed" in caplog.text
    node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
        volume_id=b, connection_info=iscsi_pb(b)), timeout=QUICK)
    assert secrets(node) == set()

    with pytest.raises(grpc.RpcError) as err:  # unstage needs the volume's connection_info
        node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
            server_id=dom.uuid, volume_id=a, unstage=True), timeout=QUICK)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "connection_info" in err.value.details()
