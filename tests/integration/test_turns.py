"""Turns in a real `vmattach serve` process (common/turns.py; on by
default): a call that waits (a long poll, a guest that holds on to a disk,
the facade's calls to its own services over gRPC, a statement on
PostgreSQL) gives its turn to the other calls meanwhile: they are answered
while it waits, and no call waits out its turn's patience."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from tests.conftest import make_settings
from tests.support.fake_hypervisor import FakeHypervisor
from vmattach.clients.client import VmattachClient
from vmattach.common import turns
from vmattach.common.db import close_database, connect_database
from vmattach.common.turns import Turns
from vmattach.node.hypervisor import Disk, volume_alias
from vmattach.v1 import node_pb2 as npb
from vmattach.v1 import node_pb2_grpc, types_pb2


def timeouts() -> float:
    return turns.TIMEOUTS._value.get()


def test_a_waiting_node_call_holds_up_no_other_call(tmp_path, serve):
    """A long poll of the server events and a detach from a guest that
    holds on to the disk both wait; NodeGetInfo is answered meanwhile."""
    hv = FakeHypervisor()
    volume_id = "00000000-0000-4000-8000-000000000001"
    dom = hv.add_domain(hangs_on_detach=True,
                        disks=(Disk("vdb", "virtio", volume_id, volume_alias(volume_id)),))
    running = serve(make_settings(tmp_path, services="node", detach_timeout=30,
                                  detach_retries=1), hypervisor=hv)
    before = timeouts()
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch, \
            ThreadPoolExecutor(2) as pool:
        node = node_pb2_grpc.NodeStub(ch)
        poll = pool.submit(node.NodeWatchServers,
                           npb.NodeWatchServersRequest(after_seq=0, wait_seconds=20), timeout=30)
        detach = pool.submit(node.NodeUnpublishVolume, npb.NodeUnpublishVolumeRequest(
            server_id=dom.uuid, volume_id=volume_id), timeout=40)
        for _ in range(3):
            assert node.NodeGetInfo(npb.NodeGetInfoRequest(), timeout=10).node_id
        assert not poll.done() and not detach.done()  # both still waiting
        assert timeouts() == before
        hv.release_waits()
        detach.exception()
        hv.remove_domain(dom.uuid)  # an event: the poll ends
        assert [e.server_id for e in poll.result().events] == [dom.uuid]


def test_the_facades_calls_over_grpc_give_their_turn_up(tmp_path, tgtd, serve):
    """internal_calls = "grpc": the facade's thread waits for its own
    process's Controller and Node, whose calls need a turn of the same
    process."""
    hv = FakeHypervisor()
    settings = make_settings(tmp_path, internal_calls="grpc", node_id="node-1",
                             tgt_portal=tgtd.portal, tgt_control_port=tgtd.control_port,
                             initiator_iqn="iqn.2004-10.org.vmattach:turns",
                             reconcile_interval=3600, server_refresh_interval=3600)
    running = serve(settings, hypervisor=hv)
    servers = [hv.add_domain().uuid for _ in range(4)]
    before = timeouts()
    with VmattachClient(f"127.0.0.1:{running.port}", timeout=30) as client:
        volumes = [client.create_volume(f"vol-turns-{k}", 1).volume_id for k in range(4)]

        def cycle(k: int) -> int:
            client.attach_volume(servers[k], volumes[k])
            state = client.get_volume(volumes[k]).status
            client.detach_volume(servers[k], volumes[k])
            return state

        with ThreadPoolExecutor(4) as pool:
            states = list(pool.map(cycle, range(4)))
        assert states == [types_pb2.VOLUME_STATUS_IN_USE] * 4
        assert {client.get_volume(v).status for v in volumes} == {
            types_pb2.VOLUME_STATUS_AVAILABLE}
    assert timeouts() == before


def test_a_postgresql_statement_is_waited_for_outside_the_turn(postgres_database):
    """A slow statement on the database server: another call runs its
    Python meanwhile."""
    db = connect_database(postgres_database.url, [])
    gate = Turns(patience=60)
    before = timeouts()
    order: list[str] = []
    started = threading.Event()

    def slow():
        with gate.turn():
            started.set()
            with db.connection_context():
                db.execute_sql("SELECT pg_sleep(1)")
            order.append("slow statement")

    def quick():
        with gate.turn():
            order.append("another call")

    try:
        t = threading.Thread(target=slow)
        t.start()
        assert started.wait(10)
        quick_thread = threading.Thread(target=quick)
        quick_thread.start()
        quick_thread.join(10)
        t.join(10)
        assert order == ["another call", "slow statement"] and timeouts() == before
    finally:
        close_database(db)
