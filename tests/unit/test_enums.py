"""The contract's enums against the words vmattach keeps inside (common/enums.py)."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format

from vmattach.common import enums
from vmattach.common.enums import ACCESS_MODE, DRIVER_VOLUME_TYPE, VOLUME_STATUS, dict_from_words, dict_to_words
from vmattach.common.errors import InvalidArgument
from vmattach.v1 import types_pb2

CODECS = [enums.VOLUME_STATUS, enums.ATTACH_STATUS, enums.ATTACHMENT_STATE, enums.ACCESS_MODE,
          enums.DRIVER_VOLUME_TYPE, enums.AUTH_METHOD, enums.BUS, enums.SERVER_STATE]


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.enum.DESCRIPTOR.name)
def test_every_value_but_unspecified_has_one_word_and_back(codec):
    values = [v for v in codec.enum.DESCRIPTOR.values if v.number]
    assert sorted(codec.to_pb(w) for w in codec.words) == sorted(v.number for v in values)
    for word in codec.words:
        assert codec.to_word(codec.to_pb(word)) == word
        assert codec.name(codec.to_pb(word)) == word
    assert codec.enum.DESCRIPTOR.values[0].name.endswith("_UNSPECIFIED")
    assert codec.enum.DESCRIPTOR.values[0].number == 0


def test_words_are_cinders_and_libvirts():
    assert VOLUME_STATUS.to_pb("in-use") == types_pb2.VOLUME_STATUS_IN_USE
    assert ACCESS_MODE.to_pb("ro") == types_pb2.ACCESS_MODE_READ_ONLY
    assert enums.BUS.to_pb("virtio") == types_pb2.BUS_VIRTIO
    assert enums.AUTH_METHOD.to_pb("") == types_pb2.AUTH_METHOD_NONE


def test_an_unknown_word_goes_out_as_unspecified():
    assert VOLUME_STATUS.to_pb("maintenance") == types_pb2.VOLUME_STATUS_UNSPECIFIED
    assert enums.BUS.to_pb("uml") == types_pb2.BUS_UNSPECIFIED


def test_what_a_caller_sends_is_checked():
    assert ACCESS_MODE.to_word(types_pb2.ACCESS_MODE_UNSPECIFIED, default="rw") == "rw"
    with pytest.raises(InvalidArgument, match="mode must be one of ACCESS_MODE_READ_WRITE, ACCESS_MODE_READ_ONLY"):
        ACCESS_MODE.to_word(42, default="rw")
    with pytest.raises(InvalidArgument, match="driver_volume_type"):
        DRIVER_VOLUME_TYPE.to_word(types_pb2.DRIVER_VOLUME_TYPE_UNSPECIFIED)


def test_display_names_of_values_this_version_does_not_know():
    assert VOLUME_STATUS.name(0) == ""
    assert VOLUME_STATUS.name(99) == "99"


def test_stored_connection_info_keeps_the_words_and_reads_them_back():
    info = types_pb2.ConnectionInfo(
        driver_volume_type=types_pb2.DRIVER_VOLUME_TYPE_ISCSI, serial="v",
        data=types_pb2.ConnectionData(auth_method=types_pb2.AUTH_METHOD_CHAP,
                                      access_mode=types_pb2.ACCESS_MODE_READ_ONLY, target_lun=1))
    stored = json.dumps(dict_to_words(json_format.MessageToDict(info, preserving_proto_field_name=True),
                                      info.DESCRIPTOR))
    assert json.loads(stored) == {"driver_volume_type": "iscsi", "serial": "v",
                                  "data": {"auth_method": "CHAP", "access_mode": "ro", "target_lun": 1}}
    back = json_format.ParseDict(dict_from_words(json.loads(stored), info.DESCRIPTOR),
                                 types_pb2.ConnectionInfo())
    assert back == info


def test_repeated_messages_are_converted_too():
    server = types_pb2.Server(state=types_pb2.SERVER_STATE_PAUSED,
                              disks=[types_pb2.ServerDisk(device="vda", bus=types_pb2.BUS_SCSI)])
    data = dict_to_words(json_format.MessageToDict(server, preserving_proto_field_name=True),
                         server.DESCRIPTOR)
    assert (data["state"], data["disks"][0]["bus"]) == ("paused", "scsi")
