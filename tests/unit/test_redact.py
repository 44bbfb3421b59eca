"""common/redact.py: the copies of requests written to logs, secrets blanked,
through nested and repeated message fields (on the protobuf runtime in use)."""

from __future__ import annotations

from vmattach.common.redact import REDACTED, redacted
from vmattach.v1 import controller_pb2 as cpb
from vmattach.v1 import node_pb2 as npb
from vmattach.v1 import types_pb2


def test_a_nested_secret_is_blanked_and_the_original_is_untouched():
    request = npb.NodeStageVolumeRequest(volume_id="v")
    request.connection_info.data.auth_password = "s3cret"
    request.connection_info.data.target_iqn = "iqn.2010-10.org.openstack:volume-v"
    copy = redacted(request)
    assert copy.connection_info.data.auth_password == REDACTED
    assert copy.connection_info.data.target_iqn == request.connection_info.data.target_iqn
    assert request.connection_info.data.auth_password == "s3cret"
    assert "s3cret" not in str(copy)


def test_messages_with_repeated_and_singular_message_fields_are_walked():
    volume = cpb.Volume(volume_id="v", attachments=[
        cpb.VolumeAttachmentRecord(server_id="s", connector=types_pb2.Connector(initiator="iqn.x"))])
    request = cpb.ControllerPublishVolumeRequest(volume_id="v", connector=types_pb2.Connector(
        initiator="iqn.1993-08.org.debian:01:a"))
    assert redacted(request) == request  # nothing secret in it
    assert redacted(cpb.ListVolumesResponse(volumes=[volume])).volumes[0] == volume
