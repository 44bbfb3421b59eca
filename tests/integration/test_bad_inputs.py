"""Every concrete bad input of issue 11, through the real gRPC API: all three
services in one process (a real Controller on a private tgtd, a real Node
on the fake hypervisor), on SQLite and on PostgreSQL. Each is answered
INVALID_ARGUMENT naming the field (a google.rpc.BadRequest field violation
next to the ErrorInfo) before it reaches a database, a command or libvirt,
and leaves nothing behind."""

from __future__ import annotations

import logging
import uuid

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tests.integration.test_facade import Stack
from vmattach.common.errors import BackendError, FailedPrecondition
from vmattach.common.grpcutil import Service, create_server
from vmattach.common.runner import CommandRunner
from vmattach.v1 import controller_pb2 as cpb
from vmattach.v1 import controller_pb2_grpc, node_pb2_grpc, servers_pb2_grpc, types_pb2
from vmattach.v1 import node_pb2 as npb
from vmattach.v1 import servers_pb2 as spb

pytestmark = pytest.mark.realstack  # the Controller runs on a real (private) tgtd

TIMEOUT = 30
# just under gRPC's 4 MiB message limit: the service, not the transport, must refuse it
NEAR_4MIB = (4 << 20) - 4096


@pytest.fixture
def stack(tmp_path, tgtd, serve, database_url):
    s = Stack(tmp_path, tgtd, serve,
              database_url=database_url if database_url.startswith("postgres") else "")
    ch = grpc.insecure_channel(s.address, options=[("grpc.max_receive_message_length", 64 << 20),
                                                   ("grpc.max_send_message_length", 64 << 20)])
    s.ctl = controller_pb2_grpc.ControllerStub(ch)
    s.node = node_pb2_grpc.NodeStub(ch)
    s.servers = servers_pb2_grpc.ServersStub(ch)
    s.health = health_pb2_grpc.HealthStub(ch)
    s.raw = ch
    yield s
    ch.close()
    s.client.close()


def refused(method, request, field: str) -> str:
    """Call; the answer must be INVALID_ARGUMENT with an ErrorInfo and a
    BadRequest naming field. Returns the message."""
    with pytest.raises(grpc.RpcError) as err:
        method(request, timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()[:300]
    status = rpc_status.from_call(err.value)
    assert status is not None
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert status.details[0].Unpack(info) and info.domain == "vmattach.io"
    assert any(d.Unpack(bad) for d in status.details[1:]), "no BadRequest detail"
    assert field in [v.field for v in bad.field_violations]
    assert field in err.value.details()
    assert len(err.value.details()) <= 1100
    return err.value.details()


def reserved(stack) -> tuple[str, str]:
    """A volume reserved for a server (what ControllerPublish and MarkAttached need)."""
    server_id, volume_id = stack.server(), stack.volume()
    stack.ctl.ReserveVolume(cpb.ReserveVolumeRequest(volume_id=volume_id, server_id=server_id),
                            timeout=TIMEOUT)
    return server_id, volume_id


def assert_serving(stack):
    for service in ("", "vmattach.v1.Controller", "vmattach.v1.Node", "vmattach.v1.Servers"):
        answer = stack.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service


@pytest.mark.parametrize("initiator", ["iqn.1993-08.org.debian:01:a\x00b",
                                       "iqn.1993-08.org.debian:01:" + "a" * (128 << 10)],
                         ids=["nul", "128KiB"])
def test_a_bad_initiator_never_reaches_tgtadm(stack, initiator):
    server_id, volume_id = reserved(stack)
    connector = types_pb2.Connector(initiator=initiator, ip="127.0.0.1", host="h")
    refused(stack.ctl.ControllerPublishVolume, cpb.ControllerPublishVolumeRequest(
        volume_id=volume_id, server_id=server_id, connector=connector), "connector.initiator")
    refused(stack.ctl.ControllerUnpublishVolume, cpb.ControllerUnpublishVolumeRequest(
        volume_id=volume_id, server_id=server_id, connector=connector), "connector.initiator")
    assert stack.targets_of(volume_id) == []
    volume = stack.client.get_volume(volume_id)
    assert volume.status == types_pb2.VOLUME_STATUS_ATTACHING and not volume.attachments[0].HasField("connector")
    assert_serving(stack)


def list_calls(stack, token: str, server_id: str, volume_id: str):
    return [(stack.ctl.ListVolumes, cpb.ListVolumesRequest(page_token=token)),
            (stack.servers.ListVolumeAttachments,
             spb.ListVolumeAttachmentsRequest(server_id=server_id, page_token=token)),
            (stack.servers.ListVolumeAttachments,
             spb.ListVolumeAttachmentsRequest(volume_id=volume_id, page_token=token)),
            (stack.servers.ListServers, spb.ListServersRequest(page_token=token))]


@pytest.mark.parametrize("token", ["\u00b2", "9" * 40, "p1.AAAA", "p1." + "9" * 40],
                         ids=["superscript-two", "forty-nines", "shaped-garbage", "shaped-nines"])
def test_a_bad_page_token_is_invalid_argument_on_every_list(stack, token):
    server_id, volume_id = stack.server(), stack.volume()
    stack.facade.nodes.refresh()
    for method, request in list_calls(stack, token, server_id, volume_id):
        refused(method, request, "page_token")


def test_the_page_token_of_one_list_is_refused_by_another(stack):
    server_ids = [stack.server() for _ in range(3)]
    for _ in range(3):
        stack.volume()
    stack.facade.nodes.refresh()
    volumes_token = stack.ctl.ListVolumes(cpb.ListVolumesRequest(page_size=1), timeout=TIMEOUT).next_page_token
    servers_token = stack.servers.ListServers(spb.ListServersRequest(page_size=1),
                                              timeout=TIMEOUT).next_page_token
    assert volumes_token and servers_token
    refused(stack.servers.ListServers, spb.ListServersRequest(page_token=volumes_token), "page_token")
    refused(stack.ctl.ListVolumes, cpb.ListVolumesRequest(page_token=servers_token), "page_token")
    # and each list pages with its own
    assert len(list(stack.client.list_servers(page_size=1))) == len(server_ids)
    assert len(list(stack.client.list_volumes(page_size=1))) == 3


@pytest.mark.parametrize("mountpoint", ["/dev/" + "v" * 300, "/dev/vdb\x00"], ids=["300-chars", "nul"])
def test_mark_attached_refuses_a_mountpoint_the_database_would_refuse(stack, mountpoint):
    server_id, volume_id = reserved(stack)
    refused(stack.ctl.MarkAttached, cpb.MarkAttachedRequest(
        volume_id=volume_id, server_id=server_id, mountpoint=mountpoint), "mountpoint")
    assert stack.client.get_volume(volume_id).status == types_pb2.VOLUME_STATUS_ATTACHING
    # the bound is the column's: 255 characters are kept whole
    done = stack.ctl.MarkAttached(cpb.MarkAttachedRequest(
        volume_id=volume_id, server_id=server_id, mountpoint="/dev/" + "v" * 250), timeout=TIMEOUT)
    assert done.status == types_pb2.VOLUME_STATUS_IN_USE
    assert done.attachments[0].mountpoint == "/dev/" + "v" * 250


def file_connection(tmp_path, volume_id: str) -> types_pb2.ConnectionInfo:
    return types_pb2.ConnectionInfo(driver_volume_type=types_pb2.DRIVER_VOLUME_TYPE_FILE,
                                    serial=volume_id,
                                    data=types_pb2.ConnectionData(device_path=str(tmp_path / "v.img")))


@pytest.mark.parametrize("device, field", [("/dev/vdb1", "device"), ("/dev/" + "v" * 100_000, "device")],
                         ids=["partition", "100kB"])
def test_the_node_refuses_a_device_libvirt_would_refuse(stack, tmp_path, device, field):
    server_id, volume_id = stack.server(), str(uuid.uuid4())
    before = [d.device for d in stack.hv.get_domain(server_id).disks]
    with pytest.raises(grpc.RpcError) as err:
        stack.node.NodePublishVolume(npb.NodePublishVolumeRequest(
            server_id=server_id, volume_id=volume_id, device=device,
            connection_info=file_connection(tmp_path, volume_id)), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is invalid" in err.value.details() and len(err.value.details()) < 400
    status = rpc_status.from_call(err.value)
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details) and bad.field_violations[0].field == field
    assert [d.device for d in stack.hv.get_domain(server_id).disks] == before
    assert_serving(stack)


def test_a_4mib_chap_password_never_reaches_libvirt(stack, caplog):
    caplog.set_level(logging.DEBUG)
    volume_id = str(uuid.uuid4())
    password = "P" * NEAR_4MIB
    info = types_pb2.ConnectionInfo(
        driver_volume_type=types_pb2.DRIVER_VOLUME_TYPE_ISCSI, serial=volume_id,
        data=types_pb2.ConnectionData(target_portal="127.0.0.1:3260",
                                      target_iqn="iqn.2010-10.org.openstack:volume-" + volume_id,
                                      target_lun=1, auth_method=types_pb2.AUTH_METHOD_CHAP,
                                      auth_username="user", auth_password=password))
    message = refused(stack.node.NodeStageVolume,
                      npb.NodeStageVolumeRequest(volume_id=volume_id, connection_info=info),
                      "connection_info.data.auth_password")
    assert "PPPP" not in message
    assert not stack.hv.has_secret(f"volume-{volume_id}")
    assert all("PPPPPPPP" not in r.getMessage() for r in caplog.records)
    assert stack.node.NodeGetInfo(npb.NodeGetInfoRequest(), timeout=TIMEOUT).node_id == "node-1"
    assert_serving(stack)


def test_huge_connector_fields_are_refused_and_list_volumes_stays_small(stack):
    server_id, volume_id = reserved(stack)
    for field in ("host", "os_type", "platform", "ip"):
        connector = types_pb2.Connector(initiator="iqn.2004-10.org.vmattach:test-node",
                                        **{field: "h" * NEAR_4MIB})
        refused(stack.ctl.ControllerPublishVolume, cpb.ControllerPublishVolumeRequest(
            volume_id=volume_id, server_id=server_id, connector=connector), f"connector.{field}")
    answer = stack.ctl.ListVolumes(cpb.ListVolumesRequest(), timeout=TIMEOUT)
    assert answer.ByteSize() < 64 << 10
    assert [v.volume_id for v in stack.client.list_volumes()] == [volume_id]  # the CLI's client


def test_a_long_path_gives_its_documented_code_not_resource_exhausted(stack):
    volume_id = str(uuid.uuid4())
    info = types_pb2.ConnectionInfo(driver_volume_type=types_pb2.DRIVER_VOLUME_TYPE_FILE, serial=volume_id,
                                    data=types_pb2.ConnectionData(device_path="/var/" + "p" * 5000))
    refused(stack.node.NodeStageVolume, npb.NodeStageVolumeRequest(volume_id=volume_id, connection_info=info),
            "connection_info.data.device_path")


class _Loud(controller_pb2_grpc.ControllerServicer):
    """A servicer whose error quotes 20 kB (as a backend's error may)."""

    def GetVolume(self, request, context):
        raise FailedPrecondition("the path " + "/p" * 10_000 + " is gone", reason="VOLUME_FILE",
                                 metadata={f"k{i}": "v" * 5000 for i in range(40)})

    def ListVolumes(self, request, context):
        raise BackendError("tgtadm said: " + "x" * 50_000)


def test_an_error_quoting_a_long_input_keeps_its_code():
    server, port = create_server([Service("vmattach.v1.Controller",
                                          controller_pb2_grpc.add_ControllerServicer_to_server, _Loud())])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = controller_pb2_grpc.ControllerStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.GetVolume(cpb.GetVolumeRequest(volume_id=str(uuid.uuid4())), timeout=TIMEOUT)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert err.value.details().startswith("the path /p/p") and len(err.value.details()) < 1200
            status = rpc_status.from_call(err.value)
            info = error_details_pb2.ErrorInfo()
            assert status.details[0].Unpack(info) and info.reason == "VOLUME_FILE"
            with pytest.raises(grpc.RpcError) as err:
                stub.ListVolumes(cpb.ListVolumesRequest(), timeout=TIMEOUT)
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert err.value.details().startswith("tgtadm said: xxx")
    finally:
        server.stop(0)


def test_one_call_cannot_add_megabytes_to_the_log(stack, caplog):
    caplog.set_level(logging.DEBUG)
    server_id, volume_id = reserved(stack)
    huge = "x" * NEAR_4MIB
    calls = [
        (stack.ctl.CreateVolume, cpb.CreateVolumeRequest(name=huge, size_gb=1)),
        (stack.ctl.ControllerPublishVolume, cpb.ControllerPublishVolumeRequest(
            volume_id=volume_id, server_id=server_id,
            connector=types_pb2.Connector(initiator="iqn.2000-01.x:" + "a" * (NEAR_4MIB - 20)))),
        (stack.servers.AttachVolume, spb.AttachVolumeRequest(server_id=server_id, volume_id=volume_id,
                                                             tag=huge)),
        (stack.node.NodePublishVolume, npb.NodePublishVolumeRequest(server_id=server_id, volume_id=volume_id,
                                                                    device=huge)),
        (stack.ctl.GetVolume, cpb.GetVolumeRequest(volume_id=huge)),
    ]
    for method, request in calls:
        before = sum(len(r.getMessage()) for r in caplog.records)
        with pytest.raises(grpc.RpcError) as err:
            method(request, timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        added = sum(len(r.getMessage()) for r in caplog.records) - before
        assert added < 16 << 10, (method, added)


def test_the_runner_turns_every_failure_to_start_into_backend_error(tmp_path):
    runner = CommandRunner(timeout=10)
    not_executable = tmp_path / "script"
    not_executable.write_text("#!/bin/sh\n")
    for argv, reason in [(["echo", "a\x00b"], "COMMAND_NOT_STARTED"),
                         (["echo", "a" * (256 << 10)], "COMMAND_NOT_STARTED"),   # E2BIG
                         ([str(not_executable)], "COMMAND_NOT_STARTED"),          # PermissionError
                         (["no-such-command-vmattach"], "COMMAND_NOT_FOUND")]:
        with pytest.raises(BackendError) as err:
            runner.run(argv)
        assert err.value.reason == reason, argv[0]
        assert len(err.value.message) < 700
