"""The facade's pure pieces: request checks, device names, deadlines, undo."""

from __future__ import annotations

import json

import pytest

from vmattach.common.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from vmattach.server.facade import (
    AttachRequest,
    Deadline,
    Facade,
    Saga,
    device_names,
    guest_path_hint,
    validate_attach,
)
from vmattach.server.models import ServerRecord

SERVER = "11111111-1111-4111-8111-111111111111"
VOLUME = "22222222-2222-4222-8222-222222222222"


@pytest.mark.parametrize("device", ["/dev/vdb", "/dev/sdc", "/dev/hdb", "/dev/xvdb", "/dev/vdaa"])
def test_nova_device_names_are_accepted(device):
    validate_attach(AttachRequest(SERVER, VOLUME, device=device))


@pytest.mark.parametrize("device", ["vdb", "/dev/../etc/passwd", "/dev/vd b", "/dev/<vdb>",
                                    "/dev/VDB", "/dev/", "/dev/vdb/", "/dev/" + "v" * 40])
def test_bad_device_names_are_refused_with_novas_message(device):
    with pytest.raises(InvalidArgument, match=r"The supplied device path \(.*\) is invalid\."):
        validate_attach(AttachRequest(SERVER, VOLUME, device=device))


@pytest.mark.parametrize("tag", ["a/b", "a,b", "x" * 61, "bad\nline"])
def test_bad_tags_are_refused(tag):
    with pytest.raises(InvalidArgument, match="tag"):
        validate_attach(AttachRequest(SERVER, VOLUME, tag=tag))


def test_device_names_follow_novas_order():
    names = list(device_names("vd"))
    assert names[:3] == ["vda", "vdb", "vdc"]
    assert names[25:28] == ["vdz", "vdaa", "vdab"]
    assert len(set(names)) == len(names)


def _server(**kw) -> ServerRecord:
    values = dict(server_id=SERVER, name="s", state="running", device_prefix="vd",
                  root_device="", disks="[]", node_id="n1")
    values.update(kw)
    return ServerRecord(**values)


def test_auto_device_skips_the_root_letter_and_used_names():
    pick = Facade._pick_device
    assert pick(AttachRequest(SERVER, VOLUME), _server(), []) == "/dev/vdb"
    assert pick(AttachRequest(SERVER, VOLUME), _server(), ["/dev/vdb", "/dev/vdc"]) == "/dev/vdd"
    disks = json.dumps([{"device": "vdb", "serial": "x", "bus": "virtio"}])
    assert pick(AttachRequest(SERVER, VOLUME), _server(disks=disks), []) == "/dev/vdc"
    scsi = _server(device_prefix="sd", root_device="sda")
    assert pick(AttachRequest(SERVER, VOLUME), scsi, []) == "/dev/sdb"


def test_requested_device_must_match_the_bus_and_be_free():
    pick = Facade._pick_device
    assert pick(AttachRequest(SERVER, VOLUME, device="/dev/vdf"), _server(), []) == "/dev/vdf"
    with pytest.raises(InvalidArgument, match="is invalid"):
        pick(AttachRequest(SERVER, VOLUME, device="/dev/sdb"), _server(), [])
    with pytest.raises(FailedPrecondition, match=r"The supplied device path \(/dev/vdb\) is in use\."):
        pick(AttachRequest(SERVER, VOLUME, device="/dev/vdb"), _server(), ["/dev/vdb"])


def test_guest_path_hint_is_udevs_by_id_name():
    assert guest_path_hint("vd", VOLUME) == "/dev/disk/by-id/virtio-" + VOLUME[:20]
    assert guest_path_hint("sd", VOLUME).endswith("_" + VOLUME)


class _Context:
    def __init__(self, remaining):
        self._remaining = remaining

    def time_remaining(self):
        return self._remaining


def test_deadline_takes_the_callers_time_and_clamps_no_deadline():
    assert 4.9 < Deadline.of(_Context(5.0), cap=300).remaining() <= 5.0
    # no client deadline: grpc reports None or a huge number
    assert 299 < Deadline.of(_Context(None), cap=300).remaining() <= 300
    assert 299 < Deadline.of(_Context(1e12), cap=300).remaining() <= 300


def test_deadline_past_raises_deadline_exceeded():
    deadline = Deadline(-1.0)
    with pytest.raises(DeadlineExceeded):
        deadline.remaining()


def test_saga_undoes_in_reverse_and_runs_every_step_even_after_a_failing_one():
    done = []
    saga = Saga("t")
    saga.on_failure("a", lambda: done.append("a"))
    saga.on_failure("b", lambda: (_ for _ in ()).throw(RuntimeError("b failed")))
    saga.on_failure("c", lambda: done.append("c"))
    assert saga.rollback() is False
    assert done == ["c", "a"]
