"""The Node through gRPC (a real server on port 0, the fake hypervisor):
codes and messages of the error mapping, and one servicer test with
grpc_testing."""

from __future__ import annotations

import logging

import grpc
import grpc_testing
import pytest

from tests.conftest import make_settings
from tests.support.fake_hypervisor import FakeHypervisor
from tests.support.fake_runner import FakeRunner
from tests.support.node_helpers import CHAP_PASSWORD, iscsi_info, new_id
from vmattach.common.errors import BackendError
from vmattach.common.grpcutil import call, create_server, error_from_rpc
from vmattach.node.app import build_with
from vmattach.node.hypervisor import Disk
from vmattach.node.servicer import connection_info_from_pb
from vmattach.v1 import node_pb2 as pb
from vmattach.v1 import node_pb2_grpc, types_pb2


def iscsi_pb(volume_id: str) -> types_pb2.ConnectionInfo:
    i = iscsi_info(volume_id)
    return types_pb2.ConnectionInfo(
        driver_volume_type=types_pb2.DRIVER_VOLUME_TYPE_ISCSI, serial=volume_id,
        data=types_pb2.ConnectionData(target_portal=i.target_portal, target_iqn=i.target_iqn,
                                      target_lun=1, auth_method=types_pb2.AUTH_METHOD_CHAP,
                                      auth_username=i.auth_username,
                                      auth_password=i.auth_password))


@pytest.fixture
def node(tmp_path):
    hv = FakeHypervisor()
    service = build_with(make_settings(tmp_path, node_id="node-a", initiator_iqn="iqn.2000-01.x:n",
                                       node_volume_dirs=str(tmp_path)),
                         FakeRunner(), hv)
    server, port = create_server([service])
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = node_pb2_grpc.NodeStub(ch)
    stub.hv = hv
    yield stub
    ch.close()
    server.stop(0)
    for hook in service.on_stop:
        hook()
    assert hv.closed


def code_of(method, request) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as err:
        method(request, timeout=10)
    exc = error_from_rpc(err.value)
    return err.value.code(), err.value.details(), exc.reason


def test_info_and_list_servers(node):
    info = node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=10)
    assert info.node_id == "node-a" and info.connector.initiator == "iqn.2000-01.x:n"
    assert info.max_volumes_per_server == 26 and info.connector.os_type == "linux"
    dom = node.hv.add_domain("vm", disks=(Disk("sda", "scsi", "s1", "scsi0-0-0-0"),))
    (server,) = node.ListServers(pb.NodeListServersRequest(), timeout=10).servers
    assert (server.server_id, server.name, server.state) == (dom.uuid, "vm", types_pb2.SERVER_STATE_RUNNING)
    assert (server.device_prefix, server.root_device) == ("sd", "sda")
    assert [(d.device, d.serial, d.bus) for d in server.disks] == [("sda", "s1", types_pb2.BUS_SCSI)]


def test_full_cycle_and_idempotency(node):
    dom = node.hv.add_domain(persistent=False)
    vid = new_id()
    stage = pb.NodeStageVolumeRequest(volume_id=vid, connection_info=iscsi_pb(vid))
    staged = node.NodeStageVolume(stage, timeout=10).staged
    assert staged.secret_usage == f"volume-{vid}" and node.NodeStageVolume(stage).staged == staged
    publish = pb.NodePublishVolumeRequest(server_id=dom.uuid, volume_id=vid, device="/dev/vdb",
                                          connection_info=iscsi_pb(vid), staged=staged)
    disk = node.NodePublishVolume(publish, timeout=10).disk
    assert (disk.device, disk.serial, disk.bus) == ("vdb", vid, types_pb2.BUS_VIRTIO)
    assert node.NodePublishVolume(publish, timeout=10).disk == disk
    unpublish = pb.NodeUnpublishVolumeRequest(server_id=dom.uuid, volume_id=vid)
    node.NodeUnpublishVolume(unpublish, timeout=10)
    node.NodeUnpublishVolume(unpublish, timeout=10)
    unstage = pb.NodeUnstageVolumeRequest(volume_id=vid, connection_info=iscsi_pb(vid))
    node.NodeUnstageVolume(unstage, timeout=10)
    node.NodeUnstageVolume(unstage, timeout=10)
    assert node.hv.secrets == {}


def test_list_secrets_names_them_and_disks_carry_their_alias(node):
    dom = node.hv.add_domain(persistent=False)
    vid = new_id()
    staged = node.NodeStageVolume(pb.NodeStageVolumeRequest(
        volume_id=vid, connection_info=iscsi_pb(vid)), timeout=10).staged
    node.NodePublishVolume(pb.NodePublishVolumeRequest(
        server_id=dom.uuid, volume_id=vid, device="/dev/vdb", connection_info=iscsi_pb(vid),
        staged=staged), timeout=10)
    secrets = node.ListSecrets(pb.NodeListSecretsRequest(), timeout=10)
    assert list(secrets.usages) == [f"volume-{vid}"] and CHAP_PASSWORD not in str(secrets)
    (server,) = node.ListServers(pb.NodeListServersRequest(), timeout=10).servers
    assert [(d.device, d.alias) for d in server.disks] == [("vdb", f"ua-{vid}")]


def test_error_codes(node):
    dom = node.hv.add_domain(disks=(Disk("vda", "virtio", "", "virtio-disk0"),))
    vid = new_id()
    publish = lambda sid, device: pb.NodePublishVolumeRequest(  # noqa: E731
        server_id=sid, volume_id=vid, device=device, connection_info=iscsi_pb(vid))
    node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vid, connection_info=iscsi_pb(vid)))
    assert code_of(node.NodePublishVolume, publish(dom.uuid, "/dev/v d")) == (
        grpc.StatusCode.INVALID_ARGUMENT, "The supplied device path (/dev/v d) is invalid.",
        "INVALID_DEVICE")
    assert code_of(node.NodePublishVolume, publish(dom.uuid, "/dev/vda")) == (
        grpc.StatusCode.FAILED_PRECONDITION, "The supplied device path (/dev/vda) is in use.",
        "DEVICE_IN_USE")
    missing = new_id()
    assert code_of(node.NodePublishVolume, publish(missing, "/dev/vdb")) == (
        grpc.StatusCode.NOT_FOUND, f"Server {missing} could not be found.", "SERVER_NOT_FOUND")
    assert code_of(node.NodePublishVolume, publish("not-a-uuid", "/dev/vdb"))[0] == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(node.NodeStageVolume, pb.NodeStageVolumeRequest(volume_id=vid))[1] == \
        "connection_info is required"
    assert code_of(node.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(
        server_id=missing, volume_id=vid))[0] == grpc.StatusCode.NOT_FOUND


def test_backend_error_that_repeats_the_password_is_internal_without_it(node, caplog):
    """A backend (libvirt, a command) may echo the CHAP password it was given:
    the answer and the server's log show it masked."""
    vid = new_id()
    node.hv.inject_error("define_secret", BackendError(
        f"libvirt could not define the secret: invalid value '{CHAP_PASSWORD}'",
        metadata={"value": CHAP_PASSWORD}))
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(grpc.RpcError) as err:
            node.NodeStageVolume(pb.NodeStageVolumeRequest(
                volume_id=vid, connection_info=iscsi_pb(vid)), timeout=10)
    exc = error_from_rpc(err.value)
    assert (err.value.code(), exc.reason) == (grpc.StatusCode.INTERNAL, "BACKEND_ERROR")
    assert exc.message == "libvirt could not define the secret: invalid value '***'"
    assert exc.metadata.pop("request_id").startswith("req-")
    assert exc.metadata == {"value": "***"}
    assert CHAP_PASSWORD not in caplog.text


def test_unexpected_exception_repeating_the_password_is_logged_masked(node, caplog):
    vid = new_id()
    node.hv.inject_error("define_secret", RuntimeError(f"bug while handling {CHAP_PASSWORD}"))
    with caplog.at_level(logging.DEBUG):
        code, message, reason = code_of(node.NodeStageVolume, pb.NodeStageVolumeRequest(
            volume_id=vid, connection_info=iscsi_pb(vid)))
    assert (code, reason) == (grpc.StatusCode.INTERNAL, "INTERNAL")
    assert message.startswith("internal error (incident ") and CHAP_PASSWORD not in message
    assert "bug while handling ***" in caplog.text and "auth_password" in caplog.text
    assert CHAP_PASSWORD not in caplog.text


def test_never_releasing_guest_is_failed_precondition(node):
    dom = node.hv.add_domain(never_releases=True)
    vid = new_id()
    node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vid, connection_info=iscsi_pb(vid)))
    node.NodePublishVolume(pb.NodePublishVolumeRequest(
        server_id=dom.uuid, volume_id=vid, device="/dev/vdb", connection_info=iscsi_pb(vid)))
    code, message, reason = code_of(node.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(
        server_id=dom.uuid, volume_id=vid))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and reason == "DETACH_NOT_COMPLETED"
    assert message.startswith(f"The guest did not release the device vdb of server {dom.uuid}")
    (server,) = call(node.ListServers, pb.NodeListServersRequest()).servers
    assert [d.serial for d in server.disks] == [vid]


def test_servicer_with_grpc_testing(tmp_path):
    """A narrow check of the servicer alone, without a network server."""
    hv = FakeHypervisor()
    service = build_with(make_settings(tmp_path, initiator_iqn="iqn.2000-01.x:n"), FakeRunner(), hv)
    descriptor = pb.DESCRIPTOR.services_by_name["Node"]
    server = grpc_testing.server_from_dictionary({descriptor: service.servicer},
                                                 grpc_testing.strict_real_time())
    dom = hv.add_domain("vm", state="shutoff")
    rpc = server.invoke_unary_unary(descriptor.methods_by_name["ListServers"], (),
                                    pb.NodeListServersRequest(), None)
    response, _, code, _ = rpc.termination()
    assert code == grpc.StatusCode.OK
    assert [(s.server_id, s.state, s.device_prefix, s.root_device) for s in response.servers] == [
        (dom.uuid, types_pb2.SERVER_STATE_SHUTOFF, "vd", "")]


def test_connection_info_from_pb_keeps_every_field():
    vid = new_id()
    info = connection_info_from_pb(iscsi_pb(vid))
    assert info == iscsi_info(vid)


def test_watch_servers_reports_a_vanished_domain_at_once(node):
    import threading
    import time
    dom = node.hv.add_domain()
    first = node.NodeWatchServers(pb.NodeWatchServersRequest(wait_seconds=0), timeout=10)
    assert first.events == [] and first.epoch
    threading.Timer(0.2, node.hv.remove_domain, [dom.uuid]).start()
    started = time.monotonic()
    answer = node.NodeWatchServers(pb.NodeWatchServersRequest(
        after_seq=first.last_seq, wait_seconds=30), timeout=40)
    assert time.monotonic() - started < 20  # woken by the event, not by the wait's end
    assert [(e.server_id, e.event) for e in answer.events] == [(dom.uuid, "undefined")]
    assert answer.epoch == first.epoch and not answer.events_lost
    again = node.NodeWatchServers(pb.NodeWatchServersRequest(
        after_seq=answer.last_seq, wait_seconds=0), timeout=10)
    assert again.events == [] and again.last_seq == answer.last_seq
    code, _msg, _reason = code_of(node.NodeWatchServers,
                                  pb.NodeWatchServersRequest(wait_seconds=61))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_server_events_report_what_was_dropped():
    from vmattach.node.events import ServerEvents
    events = ServerEvents(keep=3)
    for i in range(5):
        events.record(f"s{i}", "stopped")
    got, last, lost = events.wait(1, 0)
    assert [e.server_id for e in got] == ["s2", "s3", "s4"] and last == 5 and lost
    got, last, lost = events.wait(2, 0)
    assert len(got) == 3 and not lost
    got, last, lost = events.wait(99, 0)  # another epoch's number: everything kept
    assert len(got) == 3


def test_extend_through_grpc(node, tmp_path):
    path = tmp_path / "v.img"
    path.write_bytes(b"\0" * 512)
    dom = node.hv.add_domain()
    vid = new_id()
    info = types_pb2.ConnectionInfo(driver_volume_type=types_pb2.DRIVER_VOLUME_TYPE_FILE,
                                    data=types_pb2.ConnectionData(device_path=str(path)))
    staged = node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vid, connection_info=info),
                                  timeout=10).staged
    node.NodePublishVolume(pb.NodePublishVolumeRequest(
        server_id=dom.uuid, volume_id=vid, device="/dev/vdb", connection_info=info,
        staged=staged), timeout=10)
    answer = node.NodeExtendVolume(pb.NodeExtendVolumeRequest(
        server_id=dom.uuid, volume_id=vid, new_size_bytes=2 << 30, connection_info=info),
        timeout=10)
    assert answer.size_bytes == 2 << 30
    code, _msg, reason = code_of(node.NodeExtendVolume, pb.NodeExtendVolumeRequest(
        server_id=dom.uuid, volume_id=new_id(), new_size_bytes=2 << 30, connection_info=info))
    assert code == grpc.StatusCode.NOT_FOUND and reason == "DISK_NOT_FOUND"
