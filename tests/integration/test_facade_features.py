"""Extend, read-only, multiattach, one attachment id, attachments by volume,
servers that vanish, a detach whose unplug may have happened, and refusals
by server state: the servers facade through its gRPC API on a real
Controller and tgtd, the fake hypervisor, SQLite and PostgreSQL."""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest

from tests.integration.test_facade import Stack
from vmattach.common import turns
from vmattach.common.errors import (
    Aborted,
    BackendError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    VmattachError,
)
from vmattach.server.models import BlockDeviceMapping as BDM
from vmattach.server.models import PendingExtend
from vmattach.server.reconciler import Reconciler
from vmattach.v1 import types_pb2

GIB = 1 << 30


@pytest.fixture
def stack(tmp_path, tgtd, serve, database_url):
    s = Stack(tmp_path, tgtd, serve, max_volume_gb=8, quota_gigabytes=10,
              database_url=database_url if database_url.startswith("postgres") else "")
    yield s
    s.client.close()


def reconcile(stack) -> int:
    return Reconciler(stack.facade, lease=60.0, instance_id=str(uuid.uuid4())).run_once()


def volume_path(stack, volume_id) -> str:
    return os.path.join(stack.settings.state_dir, "volumes", f"volume-{volume_id}.img")


def resized(stack, server_id) -> list[int]:
    return [c[3] for c in stack.hv.calls if c[0] == "resize_disk" and c[1] == server_id]


# -- extend -----------------------------------------------------------------------------

def test_extend_of_an_attached_volume_resizes_every_server_disk(stack):
    a, b = stack.server(), stack.server()
    volume_id = stack.volume(multiattach=True)
    stack.client.attach_volume(a, volume_id)
    stack.client.attach_volume(b, volume_id)
    done = stack.client.extend_volume(volume_id, 3)
    assert done.size_gb == 3 and sorted(done.server_ids) == sorted([a, b])
    assert resized(stack, a) == [3 * GIB] and resized(stack, b) == [3 * GIB]
    assert stack.client.get_volume(volume_id).size_gb == 3
    assert os.path.getsize(volume_path(stack, volume_id)) == 3 * GIB
    assert {r.volume_size for r in stack.live_bdms(volume_id)} == {3}
    again = stack.client.extend_volume(volume_id, 3)  # a retry: nothing more to resize
    assert again.size_gb == 3 and resized(stack, a) == [3 * GIB]


def test_extend_of_an_available_volume_touches_no_node(stack):
    volume_id = stack.volume()
    done = stack.client.extend_volume(volume_id, 2)
    assert done.size_gb == 2 and list(done.server_ids) == []
    assert not [c for c in stack.hv.calls if c[0] == "resize_disk"]


@pytest.mark.parametrize("size, error, message", [
    (0, InvalidArgument, "new_size_gb must be between"),
    (9, InvalidArgument, "new_size_gb must be between 1 and 8"),
])
def test_extend_refusals_change_nothing(stack, size, error, message):
    server_id, volume_id = stack.server(), stack.volume()
    stack.client.attach_volume(server_id, volume_id)
    with pytest.raises(error, match=message):
        stack.client.extend_volume(volume_id, size)
    assert stack.client.get_volume(volume_id).size_gb == 1
    assert os.path.getsize(volume_path(stack, volume_id)) == GIB
    assert not resized(stack, server_id)
    with stack.facade.db.connection_context():
        assert PendingExtend.select().count() == 0


def test_shrink_and_quota_are_refused_with_cinders_messages(stack):
    server_id = stack.server()
    volume_id = stack.client.create_volume("big", 4).volume_id
    stack.client.attach_volume(server_id, volume_id)
    with pytest.raises(InvalidArgument, match=r"New size for extend must be greater than current"
                       r" size. \(current: 4, extended: 2\)."):
        stack.client.extend_volume(volume_id, 2)
    stack.client.create_volume("other", 5)
    with pytest.raises(ResourceExhausted, match="Requested 2G, quota is 10G and 9G has been"
                       " consumed."):
        stack.client.extend_volume(volume_id, 6)
    assert stack.client.get_volume(volume_id).size_gb == 4
    assert not resized(stack, server_id)
    with pytest.raises(NotFound):
        stack.client.extend_volume(str(uuid.uuid4()), 2)


def test_extend_interrupted_after_the_controller_is_finished_by_the_reconciler(stack):
    server_id, volume_id = stack.server(), stack.volume()
    stack.client.attach_volume(server_id, volume_id)
    stack.facade.faults.arm("before:node_extend", "unavailable")
    try:
        with pytest.raises(Unavailable):
            stack.client.extend_volume(volume_id, 2)
    finally:
        stack.facade.faults.disarm()
    assert stack.client.get_volume(volume_id).size_gb == 2  # the Controller's part is done
    assert not resized(stack, server_id)
    with stack.facade.db.connection_context():
        [row] = PendingExtend.select()
    assert (row.new_size_gb, row.owner) == (2, None)
    assert reconcile(stack) == 1
    assert resized(stack, server_id) == [2 * GIB]
    with stack.facade.db.connection_context():
        assert PendingExtend.select().count() == 0


def test_a_second_extend_while_one_runs_is_aborted(stack):
    server_id, volume_id = stack.server(), stack.volume()
    stack.client.attach_volume(server_id, volume_id)
    entered, release = threading.Event(), threading.Event()
    original = stack.hv.resize_disk

    def slow(*args):
        entered.set()
        with turns.outside():  # a wait on libvirtd, as the real hypervisor's (common/turns.py)
            release.wait(30)
        return original(*args)
    stack.hv.resize_disk = slow
    first = threading.Thread(target=stack.client.extend_volume, args=(volume_id, 2))
    first.start()
    assert entered.wait(30)
    try:
        with pytest.raises(Aborted, match="an extend of volume .* is in progress"):
            stack.client.extend_volume(volume_id, 3)
    finally:
        release.set()
        first.join(30)
    assert stack.client.get_volume(volume_id).size_gb == 2


# -- read-only, multiattach, attachment ids, attachments by volume ------------------------

def test_read_only_attach_is_stored_and_reaches_the_disk(stack):
    server_id, volume_id = stack.server(), stack.volume()
    att = stack.client.attach_volume(server_id, volume_id, mode="ro")
    assert att.mode == types_pb2.ACCESS_MODE_READ_ONLY
    assert stack.client.get_attachment(server_id, volume_id).mode == types_pb2.ACCESS_MODE_READ_ONLY
    [record] = stack.client.get_volume(volume_id).attachments
    assert record.attach_mode == types_pb2.ACCESS_MODE_READ_ONLY
    spec = stack.hv.attached[(server_id, "vdb")]
    assert spec.readonly and not spec.shareable
    rw = stack.client.attach_volume(stack.server(), stack.volume())
    assert rw.mode == types_pb2.ACCESS_MODE_READ_WRITE
    with pytest.raises(InvalidArgument, match="mode 'rx' must be 'rw' or 'ro'"):
        stack.client.attach_volume(stack.server(), stack.volume(), mode="rx")


def test_multiattach_two_servers_shareable_and_one_detach_keeps_the_other(stack):
    a, b = stack.server(), stack.server()
    volume_id = stack.volume(multiattach=True)
    att_a = stack.client.attach_volume(a, volume_id)
    att_b = stack.client.attach_volume(b, volume_id)
    assert stack.hv.attached[(a, "vdb")].shareable and stack.hv.attached[(b, "vdb")].shareable
    # 4. the BDM's attachment id is the Controller's, for each server
    records = {r.server_id: r.attachment_id for r in stack.client.get_volume(volume_id).attachments}
    assert records == {a: att_a.attachment_id, b: att_b.attachment_id}
    stack.client.detach_volume(a, volume_id)
    volume = stack.client.get_volume(volume_id)
    assert volume.status == types_pb2.VOLUME_STATUS_IN_USE and [r.server_id for r in volume.attachments] == [b]
    [target] = stack.targets_of(volume_id)
    assert target.acls == ["iqn.2004-10.org.vmattach:test-node"]
    assert stack.hv.has_secret(f"volume-{volume_id}")
    assert stack.hv.get_domain(b).disk_of_volume(volume_id) is not None
    stack.client.detach_volume(b, volume_id)
    stack.assert_clean(b, volume_id)


def test_a_volume_that_is_not_multiattach_refuses_a_second_server(stack):
    a, b = stack.server(), stack.server()
    volume_id = stack.volume()
    stack.client.attach_volume(a, volume_id)
    with pytest.raises(FailedPrecondition, match=f"Invalid volume: volume {volume_id} is already"
                       f" attached to instances: {a}"):
        stack.client.attach_volume(b, volume_id)
    assert [r.volume_id for r in stack.live_bdms()] == [volume_id]


def test_attachments_of_a_volume_page_through_all_its_servers(stack):
    volume_id = stack.volume(multiattach=True)
    servers = [stack.server() for _ in range(3)]
    for server_id in servers:
        stack.client.attach_volume(server_id, volume_id)
    stack.client.attach_volume(servers[0], stack.volume())  # another volume: not listed
    listed = list(stack.client.list_attachments(volume_id=volume_id, page_size=2))
    assert [a.server_id for a in listed] == servers
    assert list(stack.client.list_attachments(volume_id=str(uuid.uuid4()))) == []
    with pytest.raises(InvalidArgument):
        list(stack.client.list_attachments())
    with pytest.raises(InvalidArgument):
        list(stack.client.list_attachments(servers[0], volume_id=volume_id))


# -- servers that vanish -----------------------------------------------------------------

def test_a_vanished_server_is_detached_everywhere_and_its_temporary_volume_deleted(stack):
    doomed, other = stack.server(), stack.server()
    keep, temporary = stack.volume(), stack.volume()
    shared = stack.volume(multiattach=True)
    stack.client.attach_volume(doomed, keep)
    stack.client.attach_volume(doomed, temporary, delete_on_termination=True)
    stack.client.attach_volume(doomed, shared)
    stack.client.attach_volume(other, shared)
    stack.hv.remove_domain(doomed)  # undefined behind vmattach's back (a lifecycle event)

    def cleaned() -> bool:
        try:
            stack.client.get_volume(temporary)
            return False
        except NotFound:
            return (stack.client.get_volume(keep).status == types_pb2.VOLUME_STATUS_AVAILABLE
                    and [r.instance_uuid for r in stack.live_bdms()] == [other])
    deadline = time.monotonic() + 30  # the node's event wakes the facade: no reconciler run
    while not cleaned() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cleaned()
    assert stack.targets_of(keep) == [] and not stack.hv.has_secret(f"volume-{keep}")
    assert [r.instance_uuid for r in stack.live_bdms()] == [other]
    volume = stack.client.get_volume(shared)
    assert volume.status == types_pb2.VOLUME_STATUS_IN_USE
    assert [r.server_id for r in volume.attachments] == [other]
    [target] = stack.targets_of(shared)
    assert target.acls == ["iqn.2004-10.org.vmattach:test-node"]
    assert stack.hv.has_secret(f"volume-{shared}")
    assert reconcile(stack) == 0  # nothing left to do


def test_the_periodic_run_finds_a_server_whose_event_was_missed(stack):
    server_id, volume_id = stack.server(), stack.volume()
    stack.client.attach_volume(server_id, volume_id)
    with stack.hv._lock:
        stack.hv.domains.pop(server_id)  # gone without an event
    assert reconcile(stack) == 0  # the servers cache still shows it
    stack.facade.nodes.refresh()  # the periodic server listing
    assert reconcile(stack) == 1
    assert stack.client.get_volume(volume_id).status == types_pb2.VOLUME_STATUS_AVAILABLE
    assert stack.live_bdms(volume_id) == [] and stack.targets_of(volume_id) == []


# -- a detach whose unplug may have happened ----------------------------------------------

def _hanging_detach(stack, *, then_remove: bool):
    """The guest takes its time: the node's wait for it ends past the caller's
    deadline; the disk leaves (or not) meanwhile."""
    from vmattach.node.hypervisor import DetachOutcome, PendingDetach
    original = stack.hv.request_detach

    class Slow(PendingDetach):
        def __init__(self, server_id, device, kw):
            self.args = server_id, device, kw

        def wait(self, timeout):
            time.sleep(2.5)
            if then_remove:
                server_id, device, kw = self.args
                return original(server_id, device, **kw).wait(timeout)
            return DetachOutcome.TIMED_OUT

    stack.hv.request_detach = lambda server_id, device, **kw: Slow(server_id, device, kw)


def _left_by_a_dead_facade(stack, volume_id) -> None:
    """The volume's row as a facade leaves it when it dies between bdm_insert
    and bdm_attached: attaching, last record bdm_insert, no connection_info,
    nobody's."""
    with stack.facade.db.connection_context():
        BDM.update(state="attaching", progress="bdm_insert", owner=None, connection_info=None,
                   volume_size=None).where(BDM.volume_id == volume_id).execute()


def _disk_gone(stack, server_id, volume_id) -> None:
    """The domain no longer shows the volume's disk (live or persistent)."""
    dom = stack.hv.domains[server_id]
    dom.live = [d for d in dom.live if d.serial != volume_id]
    dom.config = [d for d in dom.config if d.serial != volume_id]


def test_a_dead_facades_attach_waits_for_the_node_then_rolls_forward(stack):
    """A facade that died after the node's publish recorded nothing of it:
    the reconciler asks the Controller for the connection_info and the node
    whether the disk reached the guest. While the node cannot say, the row
    waits (no rollback of a disk that may be in the guest); once it shows the
    disk, the attach is finished, the row with its connection_info."""
    server_id, volume_id = stack.server(), stack.volume()
    att = stack.client.attach_volume(server_id, volume_id)
    _left_by_a_dead_facade(stack, volume_id)  # after mark_attached
    stack.hv.reachable = False
    try:
        assert reconcile(stack) == 0
    finally:
        stack.hv.reachable = True
    [row] = stack.live_bdms(volume_id)
    assert (row.state, row.progress, row.owner) == ("attaching", "bdm_insert", None)
    assert stack.hv.get_domain(server_id).disk_of_volume(volume_id) is not None
    assert reconcile(stack) == 1
    stack.assert_attached(server_id, volume_id, att.device)
    [row] = stack.live_bdms(volume_id)
    assert row.volume_size == 1
    info = stack.facade.bdms.unseal(row.connection_info)
    assert (info.serial, info.data.auth_method) == (volume_id, types_pb2.AUTH_METHOD_CHAP)
    assert info.data.auth_password  # sealed on the row, whole again when unsealed
    # and the detach that needs it works
    stack.client.detach_volume(server_id, volume_id)
    stack.assert_clean(server_id, volume_id)


def test_a_dead_facades_attach_before_the_controller_published_is_undone_without_the_node(
        stack):
    """A facade that died after bdm_insert, before the Controller published
    the volume: the node never had it, so the attach is undone even while the
    node does not answer."""
    server_id, volume_id = stack.server(), stack.volume()
    with stack.facade.db.connection_context():
        BDM.create(device_name="/dev/vdb", volume_id=volume_id, instance_uuid=server_id,
                   attachment_id=str(uuid.uuid4()), state="attaching", progress="bdm_insert",
                   owner=None, node_id="node-1")
    stack.hv.reachable = False
    try:
        assert reconcile(stack) == 1
    finally:
        stack.hv.reachable = True
    stack.assert_clean(server_id, volume_id)


def test_an_attach_whose_rollback_failed_keeps_the_connection_info_for_the_reconciler(stack):
    """The node's undo fails while the attachment's undo succeeds: the row,
    left rolling back, holds the connection_info the Controller no longer
    gives, and the reconciler unstages with it."""
    server_id, volume_id = stack.server(), stack.volume()
    stack.facade.faults.arm("before:mark_attached", "error")
    stack.hv.inject_error("undefine_secret", BackendError("libvirt said no"), times=2)
    with pytest.raises(VmattachError, match="injected fault"):
        stack.client.attach_volume(server_id, volume_id)
    stack.facade.faults.disarm()
    [row] = stack.live_bdms(volume_id)
    assert (row.state, row.progress, row.owner) == ("attaching", "rolling_back", None)
    assert stack.facade.bdms.unseal(row.connection_info).serial == volume_id
    assert stack.client.get_volume(volume_id).attachments == []  # its undo ran
    assert stack.hv.has_secret(f"volume-{volume_id}")  # the node's did not
    assert reconcile(stack) == 1
    stack.assert_clean(server_id, volume_id)


def test_a_dead_facades_attach_whose_disk_never_reached_the_guest_is_undone(stack):
    server_id, volume_id = stack.server(), stack.volume()
    stack.client.attach_volume(server_id, volume_id)
    _disk_gone(stack, server_id, volume_id)  # the node's publish never happened
    _left_by_a_dead_facade(stack, volume_id)
    assert reconcile(stack) == 1
    stack.assert_clean(server_id, volume_id)


def test_detach_timing_out_after_the_unplug_rolls_forward_from_what_the_domain_shows(stack):
    server_id, volume_id = stack.server(), stack.volume()
    stack.client.attach_volume(server_id, volume_id)
    _hanging_detach(stack, then_remove=True)
    stack.facade.call_cap = 1.0  # the facade's call to the node ends before the unplug
    original_unpublish = stack.facade.node

    def node_of(node_id):
        calls = original_unpublish(node_id)
        unpublish = calls.unpublish

        def late(server, volume, timeout, unstage=None):
            try:
                unpublish(server, volume, timeout, unstage)
            finally:
                time.sleep(2.0)  # the node finishes the unplug meanwhile
        calls.unpublish = late
        return calls
    stack.facade.node = node_of
    stack.client.detach_volume(server_id, volume_id)  # the domain shows no disk: done
    stack.facade.node = original_unpublish
    stack.assert_clean(server_id, volume_id)


def test_detach_timing_out_with_the_disk_still_there_rolls_back(stack):
    server_id, volume_id = stack.server(), stack.volume()
    att = stack.client.attach_volume(server_id, volume_id)
    _hanging_detach(stack, then_remove=False)
    stack.facade.call_cap = 1.0
    with pytest.raises(DeadlineExceeded):
        stack.client.detach_volume(server_id, volume_id)
    stack.assert_attached(server_id, volume_id, att.device)


def test_audit_repair_finishes_a_detach_whose_disk_left_after_the_rollback(stack):
    from vmattach.server.audit import Divergence, _finish_detach_without_disk
    server_id, volume_id = stack.server(), stack.volume()
    stack.client.attach_volume(server_id, volume_id)
    _disk_gone(stack, server_id, volume_id)  # the late unplug completed
    _finish_detach_without_disk(stack.facade, Divergence("node-1", "bdm-without-disk",
                                                         volume_id, server_id, ""))
    stack.assert_clean(server_id, volume_id)


# -- refusals by server state ----------------------------------------------------------------

@pytest.mark.parametrize("state, words", [("shutdown", "task_state powering-off"),
                                          ("crashed", "vm_state error"),
                                          ("pmsuspended", "vm_state suspended")])
def test_servers_that_cannot_take_a_disk_are_refused_with_novas_state(stack, state, words):
    server_id, volume_id = stack.server(state=state), stack.volume()
    with pytest.raises(FailedPrecondition, match=f"Cannot 'attach_volume' instance {server_id}"
                       f" while it is in {words}"):
        stack.client.attach_volume(server_id, volume_id)


def test_a_blocked_server_takes_and_gives_back_a_disk_like_an_active_one(stack):
    server_id, volume_id = stack.server(state="blocked"), stack.volume()
    stack.client.attach_volume(server_id, volume_id)
    stack.client.detach_volume(server_id, volume_id)
    stack.assert_clean(server_id, volume_id)


def test_detach_from_a_server_being_shut_down_is_refused_and_keeps_the_disk(stack):
    server_id, volume_id = stack.server(), stack.volume()
    att = stack.client.attach_volume(server_id, volume_id)
    stack.hv.domains[server_id].state = "shutdown"
    stack.facade.nodes.refresh()
    with pytest.raises(FailedPrecondition, match="Cannot 'detach_volume' instance .* while it is"
                       " in task_state powering-off"):
        stack.client.detach_volume(server_id, volume_id)
    stack.hv.domains[server_id].state = "running"
    stack.facade.nodes.refresh()
    stack.assert_attached(server_id, volume_id, att.device)
