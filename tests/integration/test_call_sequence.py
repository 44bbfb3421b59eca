"""The calls the servers facade makes, as the Controller and the Node receive
them, against the flow tables of docs/attach-flow.md: an attach, a detach,
the rollback after each step's failure, an undo step that fails itself (the
reconciler finishes it), and calls that took effect but answered after the
caller's deadline ("timed out but happened").

The Controller (on a real tgtd) and the Node (fake hypervisor) run in one
server with tests/support/call_recorder.py's interceptor; the facade runs in
another server and reaches them over gRPC, as in a split deployment."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.conftest import make_settings
from tests.support.call_recorder import CallRecorder
from tests.support.fake_hypervisor import FakeHypervisor
from tests.support.older_node import OlderNode
from vmattach.clients.client import VmattachClient
from vmattach.common.errors import VmattachError
from vmattach.common.runner import CommandRunner
from vmattach.controller.tgt import TgtAdm
from vmattach.v1 import servers_pb2, types_pb2

FLOW_DOC = Path(__file__).resolve().parents[2] / "docs" / "attach-flow.md"
INITIATOR = "iqn.2004-10.org.vmattach:h16-sequence-node"
CALL_RE = re.compile(r"`((?:Controller|Node)\.\w+)`")


# -- the flow tables --------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    number: str
    call: str | None       # "Controller.CreateAttachment"
    undo: tuple[str, ...]  # its undo's calls, in order
    after_failure: str     # "roll back", "roll forward", or an error without a call


def _cell_call(cell: str) -> str | None:
    found = CALL_RE.findall(cell)
    assert len(found) <= 1, f"more than one call in a cell of {FLOW_DOC.name}: {cell!r}"
    return found[0] if found else None


def flow_table(section: str) -> list[Step]:
    """The rows of the table under `## <section>` in docs/attach-flow.md."""
    text = FLOW_DOC.read_text()
    match = re.search(rf"^## {section}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{FLOW_DOC} has no '## {section}' section"
    lines = [line for line in match.group(1).splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    steps = []
    for line in lines[2:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        steps.append(Step(cells["#"], _cell_call(cells["call"]),
                          tuple(CALL_RE.findall(cells["undo"])), cells["after a failure"]))
    assert steps, f"the {section} table of {FLOW_DOC} is empty"
    return steps


ATTACH = flow_table("Attach")
DETACH = flow_table("Detach")


def calls_through(steps: list[Step], failing: str) -> list[str]:
    """The calls up to and including the failing one."""
    calls = [s.call for s in steps if s.call]
    return calls[:calls.index(failing) + 1]


def rollback_after(steps: list[Step], failing: str) -> list[str]:
    """The documented rule: the failing call, then the undo of it and of every
    step before it, in reverse order."""
    upto = steps[:[s.call for s in steps].index(failing) + 1]
    return calls_through(steps, failing) + [call for s in reversed(upto) for call in s.undo]


def step_calls(steps: list[Step], rule: str) -> list[str]:
    return [s.call for s in steps if s.call and s.after_failure == rule]


def test_the_flow_tables_name_the_calls():
    """The tables parse into what the tests below rely on."""
    assert [s.call for s in ATTACH if s.call][:2] == ["Node.NodeGetInfo",
                                                      "Controller.CreateAttachment"]
    assert all(s.after_failure == "roll back" for s in ATTACH if s.call)
    assert step_calls(DETACH, "roll back") and step_calls(DETACH, "roll forward")


# -- the stack --------------------------------------------------------------------------

class Split:
    """Controller + Node in one server (recorded), the facade in another."""

    def __init__(self, tmp_path, tgtd, serve, older_node: bool = False):
        self.recorder = CallRecorder()
        self.hv = FakeHypervisor()
        backend = serve(make_settings(
            tmp_path / "backend", services="controller,node", tgt_portal=tgtd.portal,
            tgt_control_port=tgtd.control_port, node_id="node-1", initiator_iqn=INITIATOR,
            detach_timeout=0.5, detach_retries=1, reconcile_interval=3600),
            hypervisor=self.hv, interceptors=[self.recorder, *([OlderNode()] * older_node)])
        backend_address = f"127.0.0.1:{backend.port}"
        self.facade_running = serve(make_settings(
            tmp_path / "facade", services="servers", controller_address=backend_address,
            nodes=backend_address, server_refresh_interval=3600,
            reconcile_interval=3600))  # the tests run the reconciler themselves
        self.client = VmattachClient(f"127.0.0.1:{self.facade_running.port}",
                                     controller_address=backend_address, timeout=60)
        self.tgtadm = TgtAdm(CommandRunner(), tgtd.control_port)

    @property
    def facade(self):
        return next(s.servicer.f for s in self.facade_running.services
                    if hasattr(s.servicer, "f"))

    def reconcile(self) -> int:
        from vmattach.server.reconciler import Reconciler
        return Reconciler(self.facade, lease=60.0, instance_id=str(uuid.uuid4())).run_once()

    def server(self) -> str:
        server_id = self.hv.add_domain().uuid
        self.client.get_server(server_id)  # the facade caches it (NodeGetInfo, ListServers)
        return server_id

    def volume(self) -> str:
        return self.client.create_volume(f"seq-{uuid.uuid4().hex[:8]}", 1).volume_id

    def start_recording(self) -> None:
        self.recorder.clear()

    def recorded(self) -> list[str]:
        return self.recorder.names("Controller", "Node")

    def targets_of(self, volume_id):
        return [t for t in self.tgtadm.show().values() if t.iqn.endswith(volume_id)]

    def assert_clean(self, server_id, volume_id):
        volume = self.client.get_volume(volume_id)
        assert (volume.status, volume.attach_status, len(volume.attachments)) == \
            (types_pb2.VOLUME_STATUS_AVAILABLE, types_pb2.ATTACH_STATUS_DETACHED, 0)
        assert list(self.client.list_attachments(server_id)) == []
        assert self.targets_of(volume_id) == []
        assert not self.hv.has_secret(f"volume-{volume_id}")
        assert self.hv.get_domain(server_id).disk_of_volume(volume_id) is None

    def assert_attached(self, server_id, volume_id):
        volume = self.client.get_volume(volume_id)
        assert (volume.status, volume.attach_status) == \
            (types_pb2.VOLUME_STATUS_IN_USE, types_pb2.ATTACH_STATUS_ATTACHED)
        assert [a.server_id for a in volume.attachments] == [server_id]
        [att] = self.client.list_attachments(server_id)
        assert (att.volume_id, att.state) == (volume_id, types_pb2.ATTACHMENT_STATE_ATTACHED)
        [target] = self.targets_of(volume_id)
        assert target.acls == [INITIATOR]
        assert self.hv.has_secret(f"volume-{volume_id}")
        assert self.hv.get_domain(server_id).disk_of_volume(volume_id) is not None


@pytest.fixture
def split(tmp_path, tgtd, serve):
    s = Split(tmp_path, tgtd, serve)
    yield s
    s.client.close()


def eventually(check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# -- the happy paths ---------------------------------------------------------------------

def test_attach_and_detach_make_the_documented_calls_in_order(split):
    server_id, volume_id = split.server(), split.volume()
    split.start_recording()
    split.client.attach_volume(server_id, volume_id)
    assert split.recorded() == [s.call for s in ATTACH if s.call]
    assert {c.outcome for c in split.recorder.calls()} == {"ok"}
    split.assert_attached(server_id, volume_id)

    split.start_recording()
    split.client.detach_volume(server_id, volume_id)
    assert split.recorded() == [s.call for s in DETACH if s.call]
    split.assert_clean(server_id, volume_id)


def test_an_older_node_is_staged_and_unstaged_in_calls_of_their_own(tmp_path, tgtd, serve):
    """A Node from before NodeGetInfo's stage_in_publish (a fleet half-way
    through an upgrade) ignores `stage` and `unstage`: the facade stages
    before the publish and unstages after the unpublish, one call each."""
    split = Split(tmp_path, tgtd, serve, older_node=True)
    try:
        server_id, volume_id = split.server(), split.volume()
        split.start_recording()
        split.client.attach_volume(server_id, volume_id)
        assert split.recorded() == ["Node.NodeGetInfo", "Controller.CreateAttachment",
                                    "Node.NodeStageVolume", "Node.NodePublishVolume",
                                    "Controller.MarkAttached"]
        split.assert_attached(server_id, volume_id)
        split.start_recording()
        split.client.detach_volume(server_id, volume_id)
        assert split.recorded() == ["Controller.BeginDetaching", "Node.NodeUnpublishVolume",
                                    "Node.NodeUnstageVolume", "Controller.DeleteAttachment"]
        split.assert_clean(server_id, volume_id)
    finally:
        split.client.close()


# -- every rollback -------------------------------------------------------------------------

@pytest.mark.parametrize("failing", [s.call for s in ATTACH if s.call])
def test_attach_rollback_after_each_call_fails_is_the_documented_one(split, failing):
    server_id, volume_id = split.server(), split.volume()
    split.start_recording()
    split.recorder.fail(failing)
    with pytest.raises(VmattachError, match=f"injected failure of {failing}"):
        split.client.attach_volume(server_id, volume_id)
    assert split.recorded() == rollback_after(ATTACH, failing)
    split.assert_clean(server_id, volume_id)


def test_a_detach_refused_by_the_servers_state_makes_no_call_and_changes_nothing(split):
    """Step 1 refuses it before anything is written: no BeginDetaching and
    no RollDetaching reach the Controller."""
    server_id, volume_id = split.server(), split.volume()
    split.client.attach_volume(server_id, volume_id)
    split.hv.domains[server_id].state = "shutdown"
    split.facade.nodes.refresh()
    split.start_recording()
    with pytest.raises(VmattachError, match="task_state powering-off"):
        split.client.detach_volume(server_id, volume_id)
    assert split.recorded() == []
    split.hv.domains[server_id].state = "running"
    split.facade.nodes.refresh()
    split.assert_attached(server_id, volume_id)
    split.start_recording()
    split.client.detach_volume(server_id, volume_id)  # and then it detaches, as documented
    assert split.recorded() == [s.call for s in DETACH if s.call]
    split.assert_clean(server_id, volume_id)


@pytest.mark.parametrize("failing", step_calls(DETACH, "roll back"))
def test_detach_rollback_after_each_call_fails_is_the_documented_one(split, failing):
    server_id, volume_id = split.server(), split.volume()
    split.client.attach_volume(server_id, volume_id)
    split.start_recording()
    split.recorder.fail(failing)
    with pytest.raises(VmattachError, match=f"injected failure of {failing}"):
        split.client.detach_volume(server_id, volume_id)
    assert split.recorded() == rollback_after(DETACH, failing)
    split.assert_attached(server_id, volume_id)
    split.client.detach_volume(server_id, volume_id)  # and a later detach works
    split.assert_clean(server_id, volume_id)


@pytest.mark.parametrize("failing", step_calls(DETACH, "roll forward"))
def test_detach_failing_after_the_guest_let_go_is_finished_by_the_reconciler(split, failing):
    server_id, volume_id = split.server(), split.volume()
    split.client.attach_volume(server_id, volume_id)
    split.start_recording()
    split.recorder.fail(failing)
    with pytest.raises(VmattachError, match=f"injected failure of {failing}"):
        split.client.detach_volume(server_id, volume_id)
    assert split.recorded() == calls_through(DETACH, failing)
    [att] = split.client.list_attachments(server_id)
    assert att.state == types_pb2.ATTACHMENT_STATE_DETACHING
    split.start_recording()
    assert split.reconcile() == 1
    assert split.recorded() == step_calls(DETACH, "roll forward")
    split.assert_clean(server_id, volume_id)


# -- an undo step that fails itself ------------------------------------------------------------

def test_failed_undo_leaves_the_row_to_the_reconciler_which_finishes_it(split):
    """The publish on the node fails; while rolling back, the Controller
    cannot delete the attachment. The target stays on tgtd and the BDM row
    stays `attaching`; the reconciler repeats the undo and cleans up."""
    server_id, volume_id = split.server(), split.volume()
    split.start_recording()
    split.recorder.fail("Node.NodePublishVolume")
    split.recorder.fail("Controller.DeleteAttachment")
    with pytest.raises(VmattachError, match="injected failure of Node.NodePublishVolume"):
        split.client.attach_volume(server_id, volume_id)
    assert split.recorded() == rollback_after(ATTACH, "Node.NodePublishVolume")
    # what the failed undo left: the export on tgtd, the reservation, the row
    [target] = split.targets_of(volume_id)
    assert target.acls == [INITIATOR]
    assert split.client.get_volume(volume_id).status == types_pb2.VOLUME_STATUS_ATTACHING
    [att] = split.client.list_attachments(server_id)
    assert (att.volume_id, att.state) == (volume_id, types_pb2.ATTACHMENT_STATE_ATTACHING)

    split.start_recording()
    assert split.reconcile() == 1
    assert "Controller.DeleteAttachment" in split.recorded()
    split.assert_clean(server_id, volume_id)
    split.client.attach_volume(server_id, volume_id)  # the volume is usable again
    split.assert_attached(server_id, volume_id)


# -- a call that took effect but answered after the deadline ----------------------------------

ATTACH_EFFECTS = [s.call for s in ATTACH if s.undo]
CALLER_DEADLINE = 4.0


def attach_with_deadline(split, server_id, volume_id) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        split.client.servers.AttachVolume(servers_pb2.AttachVolumeRequest(
            server_id=server_id, volume_id=volume_id), timeout=CALLER_DEADLINE)
    return err.value.code()


@pytest.mark.parametrize("late", ATTACH_EFFECTS)
def test_attach_call_done_but_answered_past_the_deadline_is_undone(split, late):
    server_id, volume_id = split.server(), split.volume()
    split.start_recording()
    split.recorder.answer_late(late)
    assert attach_with_deadline(split, server_id, volume_id) == grpc.StatusCode.DEADLINE_EXCEEDED
    # the facade answers its caller at the deadline and rolls back meanwhile
    eventually(lambda: split.assert_clean(server_id, volume_id))
    undo = next(s.undo for s in ATTACH if s.call == late)
    assert (late, "late") in [(c.name, c.outcome) for c in split.recorder.calls()]
    after = split.recorded()[split.recorded().index(late):]
    assert all(call in after for call in undo), (undo, after)
    split.client.attach_volume(server_id, volume_id)
    split.assert_attached(server_id, volume_id)


def test_begin_detaching_done_but_answered_past_the_deadline_is_rolled_back(split):
    server_id, volume_id = split.server(), split.volume()
    split.client.attach_volume(server_id, volume_id)
    split.recorder.answer_late("Controller.BeginDetaching")
    with pytest.raises(grpc.RpcError) as err:
        split.client.servers.DetachVolume(servers_pb2.DetachVolumeRequest(
            server_id=server_id, volume_id=volume_id), timeout=CALLER_DEADLINE)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # the Controller is back to in-use, as the BDM row and the guest are
    eventually(lambda: split.assert_attached(server_id, volume_id))
    split.client.detach_volume(server_id, volume_id)
    split.assert_clean(server_id, volume_id)
