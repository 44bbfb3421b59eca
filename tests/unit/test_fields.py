"""The table of field bounds (common/fields.py): every input field of every
RPC has a rule, and the rules refuse what a database, a command or libvirt
would refuse."""

from __future__ import annotations

import pytest

from vmattach.common import fields
from vmattach.common.errors import InvalidArgument
from vmattach.v1 import controller_pb2, node_pb2, servers_pb2, types_pb2

VID = "0f2b6c1e-3f0a-4d0c-9a57-5b0e2b1c9d11"


def test_every_field_of_every_request_has_a_rule():
    missing = [f"{m.full_name}.{f.name}" for m in fields.request_messages() for f in m.fields
               if f"{m.full_name}.{f.name}" not in fields.FIELD_RULES]
    assert missing == []
    assert len(fields.request_messages()) >= 30


def test_no_rule_for_a_field_that_does_not_exist():
    known = {f"{m.full_name}.{f.name}" for m in fields.request_messages() for f in m.fields}
    assert set(fields.FIELD_RULES) - known == set()


def refused(msg) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as err:
        fields.check(msg)
    return err.value


@pytest.mark.parametrize("msg, field", [
    (controller_pb2.ControllerPublishVolumeRequest(
        volume_id=VID, server_id=VID, connector=types_pb2.Connector(initiator="iqn.2000-01.x:a\x00b")),
     "connector.initiator"),
    (controller_pb2.ControllerUnpublishVolumeRequest(
        volume_id=VID, server_id=VID, connector=types_pb2.Connector(initiator="iqn.2000-01.x:" + "a" * 131072)),
     "connector.initiator"),
    (controller_pb2.ControllerPublishVolumeRequest(
        volume_id=VID, server_id=VID, connector=types_pb2.Connector(initiator="iqn.2000-01.x:a",
                                                                    host="h" * (4 << 20))),
     "connector.host"),
    (controller_pb2.MarkAttachedRequest(volume_id=VID, server_id=VID, mountpoint="/dev/" + "v" * 300),
     "mountpoint"),
    (controller_pb2.MarkAttachedRequest(volume_id=VID, server_id=VID, mountpoint="/dev/vdb\x00"),
     "mountpoint"),
    (controller_pb2.ListVolumesRequest(page_token="\u00b2"), "page_token"),
    (servers_pb2.ListVolumeAttachmentsRequest(page_token="9" * 40), "page_token"),
    (servers_pb2.ListServersRequest(page_size=-1), "page_size"),
    (node_pb2.NodePublishVolumeRequest(server_id=VID, volume_id=VID, device="/dev/" + "v" * 100_000),
     "device"),
    (node_pb2.NodeStageVolumeRequest(volume_id=VID, connection_info=types_pb2.ConnectionInfo(
        driver_volume_type=1, data=types_pb2.ConnectionData(auth_password="p" * (4 << 20)))),
     "connection_info.data.auth_password"),
    (node_pb2.NodeStageVolumeRequest(volume_id=VID, connection_info=types_pb2.ConnectionInfo(
        driver_volume_type=1, data=types_pb2.ConnectionData(qos_specs={str(i): "x" for i in range(100)}))),
     "connection_info.data.qos_specs"),
    (node_pb2.NodeStageVolumeRequest(volume_id=VID, connection_info=types_pb2.ConnectionInfo(
        driver_volume_type=99)), "connection_info.driver_volume_type"),
    (node_pb2.NodeWatchServersRequest(wait_seconds=61), "wait_seconds"),
    (servers_pb2.AttachVolumeRequest(server_id="x" * 5000, volume_id=VID), "server_id"),
    (servers_pb2.AttachVolumeRequest(server_id=VID, volume_id=VID, mode=7), "mode"),
])
def test_a_value_out_of_bounds_is_refused_naming_the_field(msg, field):
    err = refused(msg)
    assert err.field == field and err.violations[0][0] == field
    assert len(err.message) < 400  # never the whole value


def test_a_secret_is_never_quoted():
    secret = "s3cr3t passw\u00f6rd"
    err = refused(node_pb2.NodeStageVolumeRequest(volume_id=VID, connection_info=types_pb2.ConnectionInfo(
        driver_volume_type=1, data=types_pb2.ConnectionData(auth_username="u", auth_password=secret))))
    assert "s3cr3t" not in err.message and "auth_password" in err.message


def test_sound_requests_pass():
    fields.check(controller_pb2.ControllerPublishVolumeRequest(
        volume_id=VID, server_id=VID,
        connector=types_pb2.Connector(initiator="iqn.1993-08.org.debian:01:abc", ip="127.0.0.1",
                                      host="compute-1.example", platform="x86_64", os_type="linux")))
    fields.check(node_pb2.NodePublishVolumeRequest(
        server_id=VID, volume_id=VID, device="/dev/vdb",
        connection_info=types_pb2.ConnectionInfo(
            driver_volume_type=1, serial=VID,
            data=types_pb2.ConnectionData(target_portal="127.0.0.1:3260",
                                          target_iqn="iqn.2010-10.org.openstack:volume-" + VID,
                                          target_lun=1, auth_method=2, auth_username="abc",
                                          auth_password="Abc123", volume_id=VID,
                                          qos_specs={"total_iops_sec": "100"})),
        staged=node_pb2.StagedVolume(volume_id=VID, driver_volume_type=1,
                                     device_path="/dev/disk/by-path/x", secret_usage="x")))
    fields.check(servers_pb2.ListServersRequest(page_size=10))


def test_several_violations_are_all_named():
    err = refused(servers_pb2.AttachVolumeRequest(server_id="a\x00", volume_id="b\x00", tag="t" * 61))
    assert [f for f, _ in err.violations] == ["server_id", "volume_id", "tag"]
