"""The facade's pure pieces: request checks, device names, deadlines, undo."""

from __future__ import annotations

import json

import pytest

from vmattach.common.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from vmattach.server.calls import Deadline
from vmattach.server.devices import device_names, guest_path_hint, pick_device
from vmattach.server.facade import AttachRequest, validate_attach
from vmattach.server.models import ServerRecord
from vmattach.server.steps import ATTACH, ATTACH_STEPS, Attach, Saga, attach_saga, undo_attach

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
    pick = pick_device
    assert pick("", _server(), []) == "/dev/vdb"
    assert pick("", _server(), ["/dev/vdb", "/dev/vdc"]) == "/dev/vdd"
    disks = json.dumps([{"device": "vdb", "serial": "x", "bus": "virtio"}])
    assert pick("", _server(disks=disks), []) == "/dev/vdc"
    scsi = _server(device_prefix="sd", root_device="sda")
    assert pick("", scsi, []) == "/dev/sdb"


def test_requested_device_must_match_the_bus_and_be_free():
    pick = pick_device
    assert pick("/dev/vdf", _server(), []) == "/dev/vdf"
    with pytest.raises(InvalidArgument, match="is invalid"):
        pick("/dev/sdb", _server(), [])
    with pytest.raises(FailedPrecondition, match=r"The supplied device path \(/dev/vdb\) is in use\."):
        pick("/dev/vdb", _server(), ["/dev/vdb"])


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


class _Recorder:
    """Stands in for the typed calls; records each undo call in order."""

    def __init__(self, calls: list[str], fail: str = ""):
        self.calls, self.fail = calls, fail

    def __getattr__(self, name):
        def record(*args, **kwargs):
            self.calls.append(name)
            if name == self.fail:
                raise RuntimeError(f"{name} failed")
        return record


def test_the_attach_table_lists_every_step_once_in_flow_order():
    assert ATTACH_STEPS == ("bdm_insert", "get_connector", "create_attachment", "node_publish",
                            "mark_attached", "bdm_attached")
    assert [step for step, undo in ATTACH if undo is not None] == \
        ["create_attachment", "node_publish"]


def test_reconciler_undo_runs_the_tables_undo_last_step_first():
    calls: list[str] = []
    node, controller = _Recorder(calls), _Recorder(calls)
    undo_attach(controller, Attach(SERVER, VOLUME, node=node, info=object()))
    assert calls == ["unpublish", "unstage", "delete_attachment"]


def test_undo_without_connection_info_leaves_the_node_alone():
    calls: list[str] = []
    undo_attach(_Recorder(calls), Attach(SERVER, VOLUME, node=_Recorder(calls)))
    assert calls == ["delete_attachment"]


def test_reconciler_undo_stops_at_the_first_failure():
    calls: list[str] = []
    node = _Recorder(calls, fail="unpublish")
    with pytest.raises(RuntimeError):
        undo_attach(_Recorder(calls), Attach(SERVER, VOLUME, node=node, info=object()))
    assert calls == ["unpublish"]


def test_attach_saga_owes_the_undo_of_each_begun_step_only():
    calls: list[str] = []
    controller = _Recorder(calls)
    saga = attach_saga(controller, Attach(SERVER, VOLUME))
    for step in ("bdm_insert", "get_connector", "create_attachment"):
        saga.begin(step)
    assert saga.rollback() is True
    assert calls == ["delete_attachment"]
