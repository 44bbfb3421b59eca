"""The audit's comparison (server/audit.py divergences()) on snapshots as
the services' RPCs answer them: divergences per host, and nothing about
what another tool made on the same hosts."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

from vmattach.server.audit import NodeView, Snapshot, divergences
from vmattach.v1 import controller_pb2 as cpb
from vmattach.v1 import types_pb2

INITIATOR_A = "iqn.2004-10.org.vmattach:node-a"


def new_id() -> str:
    return str(uuid.uuid4())


def bdm(volume_id: str, server_id: str, state: str = "attached", device: str = "/dev/vdb"):
    return SimpleNamespace(id=1, volume_id=volume_id, instance_uuid=server_id, state=state,
                           progress="mark_attached", device_name=device)


def volume(volume_id: str, server_id: str | None) -> cpb.Volume:
    v = cpb.Volume(volume_id=volume_id, status=types_pb2.VOLUME_STATUS_IN_USE if server_id
                   else types_pb2.VOLUME_STATUS_AVAILABLE)
    if server_id:
        v.attachments.add(server_id=server_id, attach_status=types_pb2.ATTACH_STATUS_ATTACHED,
                          connector=types_pb2.Connector(initiator=INITIATOR_A))
    return v


def server(server_id: str, *volume_ids: str) -> types_pb2.Server:
    return types_pb2.Server(server_id=server_id, disks=[
        types_pb2.ServerDisk(device="vda", bus=types_pb2.BUS_VIRTIO),
        *(types_pb2.ServerDisk(device=f"vd{chr(ord('b') + i)}", serial=v, alias=f"ua-{v}")
          for i, v in enumerate(volume_ids))])


def healthy() -> tuple[Snapshot, str, str, str, str]:
    va, vb, sa, sb = new_id(), new_id(), new_id(), new_id()
    snap = Snapshot(
        bdms=[bdm(va, sa), bdm(vb, sb)],
        volumes={va: volume(va, sa), vb: volume(vb, sb)},
        exports={v: cpb.ExportState(volume_id=v, at_tgtd=True,
                                    allowed_initiators=[INITIATOR_A],
                                    connection_initiators=[INITIATOR_A]) for v in (va, vb)},
        nodes=[NodeView("10.0.0.11:50051", "node-a", {sa: server(sa, va)}, [f"volume-{va}"]),
               NodeView("10.0.0.12:50051", "node-b", {sb: server(sb, vb)}, [f"volume-{vb}"])])
    return snap, va, vb, sa, sb


def test_a_consistent_deployment_has_no_divergence():
    assert divergences(healthy()[0]) == []


def test_divergences_name_the_host_they_are_on():
    snap, va, vb, sa, sb = healthy()
    snap.nodes[1].servers[sb] = server(sb)              # the disk left node B's guest
    snap.nodes[0].secrets.append(f"volume-{vb}")        # node A keeps B's volume's secret
    snap.exports[va].allowed_initiators.append("iqn.2004-10.org.example:extra")
    found = {(d.host, d.kind, d.volume_id) for d in divergences(snap)}
    assert found == {("node node-b", "bdm-without-disk", vb),
                     ("node node-a", "secret-without-bdm", vb),
                     ("controller", "acl-mismatch", va)}


def test_what_another_tool_made_on_the_same_hosts_is_never_reported():
    snap, *_ = healthy()
    foreign_volume, foreign_server = new_id(), new_id()
    snap.nodes[0].servers[foreign_server] = server(foreign_server, foreign_volume)
    snap.nodes[1].secrets.append(f"volume-{foreign_volume}")
    snap.nodes[1].secrets.append("some-other-secret")
    assert divergences(snap) == []


def test_an_unreachable_node_is_a_divergence_of_its_own():
    snap, *_ = healthy()
    snap.nodes[1] = NodeView("10.0.0.12:50051", error="failed to connect")
    [d] = divergences(snap)
    assert (d.host, d.kind) == ("node 10.0.0.12:50051", "node-unreachable")
    assert "failed to connect" in str(d)
