"""The servers facade through its gRPC API: a real Controller on a real
tgtd, a real Node service, and the fake hypervisor at the outermost boundary
(the real-hypervisor versions are in tests/realstack/test_facade_realstack.py).
Every test of the `stack` fixture runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tests.conftest import make_settings
from tests.support.fake_hypervisor import FakeHypervisor
from vmattach.clients.client import VmattachClient
from vmattach.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    VmattachError,
)
from vmattach.common.runner import CommandRunner
from vmattach.controller.tgt import TgtAdm
from vmattach.server.models import BlockDeviceMapping as BDM
from vmattach.v1 import controller_pb2, types_pb2


class Stack:
    """All three services in one process on a fake hypervisor."""

    def __init__(self, tmp_path, tgtd, serve, hv=None, **settings):
        self.tgtd = tgtd
        self.hv = hv or FakeHypervisor()
        self.settings = make_settings(tmp_path, tgt_portal=tgtd.portal,
                                      tgt_control_port=tgtd.control_port, node_id="node-1",
                                      initiator_iqn="iqn.2004-10.org.vmattach:test-node",
                                      detach_timeout=0.5, detach_retries=2,
                                      # tests run the reconciler themselves
                                      reconcile_interval=3600, **settings)
        self.running = serve(self.settings, hypervisor=self.hv)
        self.address = f"127.0.0.1:{self.running.port}"
        self.client = VmattachClient(self.address, timeout=60)
        self.facade = next(s.servicer.f for s in self.running.services if hasattr(s.servicer, "f"))
        self.tgtadm = TgtAdm(CommandRunner(), tgtd.control_port)

    def server(self, **kw) -> str:
        return self.hv.add_domain(**kw).uuid

    def volume(self, name=None, **kw) -> str:
        return self.client.create_volume(name or f"vol-{uuid.uuid4().hex[:8]}", 1, **kw).volume_id

    def live_bdms(self, volume_id=None):
        with self.facade.db.connection_context():
            query = BDM.select().where(BDM.deleted == 0)
            if volume_id:
                query = query.where(BDM.volume_id == volume_id)
            return list(query)

    def targets_of(self, volume_id):
        return [t for t in self.tgtadm.show().values() if t.iqn.endswith(volume_id)]

    def assert_clean(self, server_id, volume_id):
        """Nothing of an attachment left anywhere."""
        volume = self.client.get_volume(volume_id)
        assert (volume.status, volume.attach_status, len(volume.attachments)) == \
            (types_pb2.VOLUME_STATUS_AVAILABLE, types_pb2.ATTACH_STATUS_DETACHED, 0)
        assert self.live_bdms(volume_id) == []
        assert self.targets_of(volume_id) == []
        assert not self.hv.has_secret(f"volume-{volume_id}")
        assert self.hv.get_domain(server_id).disk_of_volume(volume_id) is None

    def assert_attached(self, server_id, volume_id, device):
        volume = self.client.get_volume(volume_id)
        assert (volume.status, volume.attach_status) == \
            (types_pb2.VOLUME_STATUS_IN_USE, types_pb2.ATTACH_STATUS_ATTACHED)
        assert [a.server_id for a in volume.attachments] == [server_id]
        assert volume.attachments[0].mountpoint == device
        [bdm] = self.live_bdms(volume_id)
        assert (bdm.state, bdm.device_name, bdm.instance_uuid) == ("attached", device, server_id)
        [target] = self.targets_of(volume_id)
        assert target.acls == ["iqn.2004-10.org.vmattach:test-node"]
        assert self.hv.has_secret(f"volume-{volume_id}")
        disk = self.hv.get_domain(server_id).disk_of_volume(volume_id)
        assert disk is not None and "/dev/" + disk.device == device


@pytest.fixture
def stack(tmp_path, tgtd, serve, database_url):
    """The stack on SQLite (the default: a file per service in the state
    directory) and on PostgreSQL (both services in one fresh database)."""
    s = Stack(tmp_path, tgtd, serve,
              database_url=database_url if database_url.startswith("postgres") else "")
    yield s
    s.client.close()


def test_attach_then_detach_leaves_nothing_behind(stack):
    server_id, volume_id = stack.server(), stack.volume()
    att = stack.client.attach_volume(server_id, volume_id, tag="data")
    assert (att.server_id, att.volume_id, att.device, att.tag, att.state) == \
        (server_id, volume_id, "/dev/vdb", "data", types_pb2.ATTACHMENT_STATE_ATTACHED)
    assert att.guest_path_hint == f"/dev/disk/by-id/virtio-{volume_id[:20]}"
    uuid.UUID(att.attachment_id)
    stack.assert_attached(server_id, volume_id, "/dev/vdb")
    assert stack.client.get_attachment(server_id, volume_id) == att
    assert list(stack.client.list_attachments(server_id)) == [att]

    stack.client.detach_volume(server_id, volume_id)
    stack.assert_clean(server_id, volume_id)
    # the BDM row is soft-deleted, as Nova does
    with stack.facade.db.connection_context():
        row = BDM.get(BDM.attachment_id == att.attachment_id)
    assert row.deleted == row.id and row.deleted_at is not None


def test_bdm_row_keeps_connection_info_without_the_plain_chap_secret(stack):
    server_id, volume_id = stack.server(), stack.volume()
    stack.client.attach_volume(server_id, volume_id)
    [bdm] = stack.live_bdms(volume_id)
    assert '"target_iqn"' in bdm.connection_info and volume_id in bdm.connection_info
    assert '"auth_password"' not in bdm.connection_info
    password = stack.facade.bdms.unseal(bdm.connection_info).data.auth_password
    assert len(password) >= 16 and password not in bdm.connection_info


def test_retried_attach_is_already_exists_and_same_request_id_returns_it(stack):
    server_id, volume_id = stack.server(), stack.volume()
    request_id = str(uuid.uuid4())
    first = stack.client.attach_volume(server_id, volume_id, request_id=request_id)
    assert stack.client.attach_volume(server_id, volume_id, request_id=request_id) == first
    with pytest.raises(AlreadyExists, match=f"Invalid volume: volume {volume_id} already attached") \
            as err:
        stack.client.attach_volume(server_id, volume_id)
    assert err.value.metadata["attachment_id"] == first.attachment_id
    stack.assert_attached(server_id, volume_id, first.device)


def test_retried_detach_is_not_found_and_changes_nothing(stack):
    server_id, volume_id = stack.server(), stack.volume()
    stack.client.attach_volume(server_id, volume_id)
    stack.client.detach_volume(server_id, volume_id)
    with pytest.raises(NotFound, match=f"Instance {server_id} is not attached to volume {volume_id}"):
        stack.client.detach_volume(server_id, volume_id)
    stack.assert_clean(server_id, volume_id)


def test_attach_of_an_attached_volume_to_another_server_fails_and_leaves_no_row(stack):
    s1, s2, volume_id = stack.server(), stack.server(), stack.volume()
    stack.client.attach_volume(s1, volume_id)
    with pytest.raises(FailedPrecondition,
                       match=f"Invalid volume: volume {volume_id} is already attached to "
                             f"instances: {s1}"):
        stack.client.attach_volume(s2, volume_id)
    assert [b.instance_uuid for b in stack.live_bdms(volume_id)] == [s1]
    assert stack.hv.get_domain(s2).disks == ()


@pytest.mark.parametrize("field,kwargs,error,message", [
    ("server", dict(server_id="not-a-uuid"), InvalidArgument, "server_id"),
    ("volume", dict(volume_id="x"), InvalidArgument, "volume_id"),
    ("device", dict(device="/dev/../x"), InvalidArgument, "is invalid"),
    ("bus", dict(device="/dev/sdb"), InvalidArgument, "is invalid"),
    ("tag", dict(tag="a/b"), InvalidArgument, "tag"),
    ("unknown server", dict(server_id=str(uuid.uuid4())), NotFound, "could not be found"),
    ("unknown volume", dict(volume_id=str(uuid.uuid4())), NotFound, "could not be found"),
])
def test_bad_attach_requests_get_clear_errors_and_leave_nothing(stack, field, kwargs, error,
                                                                message):
    request = dict(server_id=stack.server(), volume_id=stack.volume())
    request.update(kwargs)
    with pytest.raises(error, match=message):
        stack.client.attach_volume(**request)
    assert stack.live_bdms() == []


def test_server_that_cannot_take_a_disk_gets_novas_message(stack):
    server_id, volume_id = stack.server(state="crashed"), stack.volume()
    with pytest.raises(FailedPrecondition,
                       match=f"Cannot 'attach_volume' instance {server_id} while it is in "
                             "vm_state error"):
        stack.client.attach_volume(server_id, volume_id)
    stack.assert_clean(server_id, volume_id)


def test_requested_device_in_use_and_limit_per_server(tmp_path, tgtd, serve):
    stack = Stack(tmp_path, tgtd, serve, max_volumes_per_server=2)
    server_id = stack.server()
    v1, v2, v3 = stack.volume(), stack.volume(), stack.volume()
    assert stack.client.attach_volume(server_id, v1, device="/dev/vdd").device == "/dev/vdd"
    with pytest.raises(FailedPrecondition, match=r"The supplied device path \(/dev/vdd\) is in use\."):
        stack.client.attach_volume(server_id, v2, device="/dev/vdd")
    assert stack.client.attach_volume(server_id, v2).device == "/dev/vdb"
    with pytest.raises(ResourceExhausted, match="Maximum number of volumes"):
        stack.client.attach_volume(server_id, v3)
    stack.assert_clean(server_id, v3)


ATTACH_STEPS = ["get_connector", "create_attachment", "node_publish", "mark_attached",
                "bdm_attached"]


@pytest.mark.parametrize("action", ["error", "unavailable"])
@pytest.mark.parametrize("step", ATTACH_STEPS)
def test_every_attach_step_failing_is_rolled_back_completely(stack, step, action):
    server_id, volume_id = stack.server(), stack.volume()
    stack.facade.faults.arm(f"before:{step}", action)
    with pytest.raises(Unavailable if action == "unavailable" else VmattachError) as err:
        stack.client.attach_volume(server_id, volume_id)
    assert "injected fault" in err.value.message
    stack.assert_clean(server_id, volume_id)
    stack.facade.faults.disarm()
    # and the volume can be attached again
    stack.client.attach_volume(server_id, volume_id)
    stack.assert_attached(server_id, volume_id, "/dev/vdb")


def test_node_failure_of_the_hypervisor_is_rolled_back(stack):
    """A failure inside the node (not injected in the facade) is undone too."""
    from vmattach.common.errors import BackendError
    server_id, volume_id = stack.server(), stack.volume()
    stack.hv.inject_error("attach_disk", BackendError("libvirt said no"))
    with pytest.raises(Exception, match="libvirt said no"):
        stack.client.attach_volume(server_id, volume_id)
    stack.assert_clean(server_id, volume_id)


@pytest.mark.parametrize("step", ["begin_detaching", "node_unpublish"])
def test_detach_failing_before_the_guest_let_go_keeps_the_attachment(stack, step):
    server_id, volume_id = stack.server(), stack.volume()
    att = stack.client.attach_volume(server_id, volume_id)
    stack.facade.faults.arm(f"before:{step}", "unavailable")
    with pytest.raises(Unavailable):
        stack.client.detach_volume(server_id, volume_id)
    stack.assert_attached(server_id, volume_id, att.device)
    stack.facade.faults.disarm()
    stack.client.detach_volume(server_id, volume_id)
    stack.assert_clean(server_id, volume_id)


@pytest.mark.parametrize("unstage_failures", [1, 2])
def test_detach_whose_unstage_fails_in_the_nodes_one_call_unstages_after_it(stack,
                                                                            unstage_failures):
    """The node unstages in the detach's one call; when that unstage fails,
    the disk has left the guest all the same: the facade unstages on its own
    (NodeUnstageVolume), and when that fails too the reconciler finishes the
    detach from the row's progress (node_unpublish, not node_unstage)."""
    from vmattach.common.errors import BackendError
    from vmattach.server.reconciler import Reconciler
    server_id, volume_id = stack.server(), stack.volume()
    stack.client.attach_volume(server_id, volume_id)
    stack.hv.inject_error("undefine_secret", BackendError("libvirt said no"),
                          times=unstage_failures)
    if unstage_failures == 1:
        stack.client.detach_volume(server_id, volume_id)
    else:
        with pytest.raises(BackendError, match="libvirt said no"):
            stack.client.detach_volume(server_id, volume_id)
        [row] = stack.live_bdms(volume_id)
        assert (row.state, row.progress, row.owner) == ("detaching", "node_unpublish", None)
        assert stack.hv.get_domain(server_id).disk_of_volume(volume_id) is None
        assert stack.hv.has_secret(f"volume-{volume_id}")
        assert Reconciler(stack.facade, lease=3600).run_once() == 1
    assert [c for c in stack.hv.calls if c[0] == "undefine_secret"] == \
        [("undefine_secret", f"volume-{volume_id}")] * (unstage_failures + 1)
    stack.assert_clean(server_id, volume_id)


def test_detach_of_a_row_without_connection_info_still_takes_the_disk_out(stack):
    """A row that lost its connection_info cannot say what to unstage: the
    node's one call only unpublishes (the disk leaves the guest), and the
    unstage after it fails with the reason; the row waits, `detaching`."""
    server_id, volume_id = stack.server(), stack.volume()
    stack.client.attach_volume(server_id, volume_id)
    with stack.facade.db.connection_context():
        BDM.update(connection_info=None).where(BDM.volume_id == volume_id).execute()
    with pytest.raises(InvalidArgument, match="connection_info"):
        stack.client.detach_volume(server_id, volume_id)
    assert stack.hv.get_domain(server_id).disk_of_volume(volume_id) is None
    [row] = stack.live_bdms(volume_id)
    assert (row.state, row.progress, row.owner) == ("detaching", "node_unpublish", None)


def test_a_detach_that_read_the_row_while_its_attach_ran_uses_the_row_as_taken(stack):
    """The detach reads the row while another facade's attach still runs
    (attaching, no connection_info yet); the attach ends before the detach
    takes the row. The detach goes on with the row as its compare-and-swap
    returned it, connection_info included, not as it was read."""
    server_id, volume_id = stack.server(), stack.volume()
    stack.client.attach_volume(server_id, volume_id)
    with stack.facade.db.connection_context():
        [row] = BDM.select().where(BDM.volume_id == volume_id)
        BDM.update(state="attaching", connection_info=None).where(BDM.id == row.id).execute()
    read = stack.facade.bdms.server_and_rows

    def read_then_the_attach_ends(server):
        seen = read(server)
        BDM.update(state="attached", connection_info=row.connection_info) \
            .where(BDM.id == row.id).execute()
        return seen

    stack.facade.bdms.server_and_rows = read_then_the_attach_ends
    stack.client.detach_volume(server_id, volume_id)
    stack.assert_clean(server_id, volume_id)


def test_guest_that_never_releases_the_disk_keeps_it_attached(stack):
    server_id, volume_id = stack.server(never_releases=True), stack.volume()
    att = stack.client.attach_volume(server_id, volume_id)
    with pytest.raises(FailedPrecondition, match="did not release"):
        stack.client.detach_volume(server_id, volume_id)
    stack.assert_attached(server_id, volume_id, att.device)


def test_deadline_reaches_downstream_calls_and_rollback_still_runs(stack):
    """The node hangs in attach; the facade's call to it ends with the caller's
    deadline, and the rollback has run before the caller gets its error."""
    from vmattach.common.errors import BackendError
    server_id, volume_id = stack.server(), stack.volume()
    release = threading.Event()
    original = stack.hv.attach_disk

    def hanging_attach(*args, **kwargs):
        release.wait(30)
        raise BackendError("the hypervisor gave up")

    stack.hv.attach_disk = hanging_attach
    from vmattach.v1 import servers_pb2
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stack.client.servers.AttachVolume(servers_pb2.AttachVolumeRequest(
            server_id=server_id, volume_id=volume_id), timeout=1.5)
    elapsed = time.monotonic() - started
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 10
    release.set()
    stack.hv.attach_disk = original
    # the facade answers the caller only after its rollback: give its thread a
    # bounded moment to finish writing, then everything is clean
    _eventually(lambda: stack.assert_clean(server_id, volume_id))


def _eventually(check, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_node_unreachable_mid_attach_is_unavailable_and_nothing_is_left(tmp_path, tgtd, serve):
    hv = FakeHypervisor()
    node_running = serve(make_settings(tmp_path / "n", services="node", node_id="node-x"),
                         hypervisor=hv)
    (tmp_path / "f").mkdir()
    stack = Stack(tmp_path / "f", tgtd, serve, hv=hv, services="controller,servers",
                  nodes=f"127.0.0.1:{node_running.port}")
    server_id, volume_id = stack.server(), stack.volume()
    assert stack.client.get_server(server_id).node_id == "node-x"
    node_running.stop(grace=0)
    with pytest.raises(Unavailable):
        stack.client.attach_volume(server_id, volume_id)
    volume = stack.client.get_volume(volume_id)
    assert (volume.status, len(volume.attachments)) == (types_pb2.VOLUME_STATUS_AVAILABLE, 0)
    assert stack.live_bdms(volume_id) == []
    assert stack.targets_of(volume_id) == []


def test_controller_unreachable_is_unavailable_and_its_row_goes_once_it_is_back(
        tmp_path, tgtd, serve):
    """The reserve is the first Controller call: when the Controller does not
    answer, the reserve may or may not have happened, and its undo cannot be
    sent either. The attach is UNAVAILABLE; its row is left, owned by nobody,
    to the reconciler, which undoes the reserve and deletes the row once the
    Controller answers; the volume was never reserved."""
    from tests.support.tgtd import free_ports
    from vmattach.server.reconciler import Reconciler
    [port] = free_ports(1)
    hv = FakeHypervisor()
    stack = Stack(tmp_path, tgtd, serve, hv=hv, services="node,servers",
                  controller_address=f"127.0.0.1:{port}")
    server_id = stack.server()
    controller_settings = make_settings(tmp_path / "controller", services="controller",
                                        listen=f"127.0.0.1:{port}", tgt_portal=tgtd.portal,
                                        tgt_control_port=tgtd.control_port)
    controller = serve(controller_settings)
    with VmattachClient(f"127.0.0.1:{port}", timeout=30) as admin:
        volume_id = admin.create_volume("back-later", 1).volume_id
    controller.stop(grace=0)
    with pytest.raises(Unavailable):
        stack.client.attach_volume(server_id, volume_id)
    [row] = stack.live_bdms(volume_id)
    assert (row.state, row.owner) == ("attaching", None)  # the reconciler's now
    assert Reconciler(stack.facade, lease=1.0).run_once() == 0  # still no Controller
    assert len(stack.live_bdms(volume_id)) == 1
    serve(controller_settings)  # the same state directory and port
    reconciler, deadline = Reconciler(stack.facade, lease=1.0), time.monotonic() + 30
    while reconciler.run_once() == 0:  # (the channel reconnects after its back-off)
        assert time.monotonic() < deadline, "the reconciler never undid the attach"
        time.sleep(0.2)
    assert stack.live_bdms(volume_id) == []
    with VmattachClient(f"127.0.0.1:{port}", timeout=30) as admin:
        volume = admin.get_volume(volume_id)
    assert (volume.status, len(volume.attachments)) == (types_pb2.VOLUME_STATUS_AVAILABLE, 0)


def test_fifty_concurrent_attaches_of_one_volume_give_exactly_one_attachment(stack):
    servers = [stack.server() for _ in range(50)]
    volume_id = stack.volume()
    stack.facade.nodes.refresh()
    barrier = threading.Barrier(50)

    def attach(server_id):
        barrier.wait()
        try:
            return stack.client.attach_volume(server_id, volume_id)
        except FailedPrecondition as exc:
            return exc

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(attach, servers))
    winners = [r for r in results if not isinstance(r, Exception)]
    assert len(winners) == 1
    assert all("Invalid volume" in r.message for r in results if isinstance(r, Exception))
    stack.assert_attached(winners[0].server_id, volume_id, winners[0].device)
    assert sum(1 for s in servers if stack.hv.get_domain(s).disks) == 1


def test_twenty_concurrent_auto_named_attaches_to_one_server_get_distinct_devices(stack):
    server_id = stack.server()
    volumes = [stack.volume() for _ in range(20)]
    barrier = threading.Barrier(20)

    def attach(volume_id):
        barrier.wait()
        return stack.client.attach_volume(server_id, volume_id)

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(attach, volumes))
    devices = [r.device for r in results]
    assert len(set(devices)) == 20
    assert "/dev/vda" not in devices
    disks = stack.hv.get_domain(server_id).disks
    assert sorted("/dev/" + d.device for d in disks) == sorted(devices)
    assert {d.serial for d in disks} == set(volumes)


def test_servers_are_listed_from_the_nodes(stack):
    a = stack.server(name="alpha")
    b = stack.server(name="beta", state="paused")
    stack.facade.nodes.refresh()
    servers = {s.server_id: s for s in stack.client.list_servers(page_size=1)}
    assert {servers[a].name, servers[b].name} == {"alpha", "beta"}
    assert servers[b].state == types_pb2.SERVER_STATE_PAUSED and servers[a].node_id == "node-1"
    with pytest.raises(NotFound):
        stack.client.get_server(str(uuid.uuid4()))
    with pytest.raises(InvalidArgument, match="server_id"):
        stack.client.get_server("nope")


def test_two_reconcilers_at_once_recover_an_orphan_exactly_once(stack):
    """An attach whose facade died after the reserve: two replicas' reconcilers
    race for it; one undoes it, the other finds nothing to do."""
    from vmattach.server.reconciler import Reconciler
    server_id, volume_id = stack.server(), stack.volume()
    stack.client.controller.ReserveVolume(controller_pb2.ReserveVolumeRequest(
        volume_id=volume_id, server_id=server_id))
    with stack.facade.db.connection_context():
        BDM.create(device_name="/dev/vdb", volume_id=volume_id, instance_uuid=server_id,
                   attachment_id=str(uuid.uuid4()), state="attaching", progress="create_attachment",
                   owner=str(uuid.uuid4()), node_id="node-1")  # an owner with no heartbeat
    assert stack.client.get_volume(volume_id).status == types_pb2.VOLUME_STATUS_ATTACHING
    replicas = [Reconciler(stack.facade, lease=1.0, instance_id=str(uuid.uuid4()))
                for _ in range(2)]
    barrier = threading.Barrier(2)

    def run(reconciler):
        barrier.wait()
        return reconciler.run_once()

    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(run, replicas))
    assert sorted(done) == [0, 1]
    stack.assert_clean(server_id, volume_id)


def test_an_operation_of_a_live_facade_is_not_taken_over(stack):
    from vmattach.server.reconciler import Reconciler
    server_id, volume_id = stack.server(), stack.volume()
    owner = Reconciler(stack.facade, lease=60.0)
    owner.heartbeat()  # the facade that runs the operation is alive
    with stack.facade.db.connection_context():
        BDM.create(device_name="/dev/vdb", volume_id=volume_id, instance_uuid=server_id,
                   attachment_id=str(uuid.uuid4()), state="attaching", progress="bdm_insert",
                   owner=stack.facade.instance_id, node_id="node-1")
    other = Reconciler(stack.facade, lease=60.0, instance_id=str(uuid.uuid4()))
    assert other.run_once() == 0
    assert [b.state for b in stack.live_bdms(volume_id)] == ["attaching"]
