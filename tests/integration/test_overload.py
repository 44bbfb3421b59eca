"""Overload: a Controller and a Node in one real `vmattach serve` process
(port 0, a private tgtd, the fake hypervisor whose guests never let go of a
disk). A flood of NodeUnpublishVolume calls that all hang on the guest
takes at most the Node's limit of calls; the rest are refused at once
(RESOURCE_EXHAUSTED, or ABORTED for a disk whose detach is running), the
health check still answers within its 100 ms deadline and the Controller,
which has a limit of its own, still answers."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import make_settings
from tests.support.fake_hypervisor import FakeHypervisor
from vmattach.common.config import Settings
from vmattach.common.grpcutil import error_from_rpc
from vmattach.node.hypervisor import Disk, volume_alias
from vmattach.v1 import controller_pb2, controller_pb2_grpc, node_pb2_grpc
from vmattach.v1 import node_pb2 as pb

HEALTH_DEADLINE = 0.1
# (the Node's limit, disks, calls): the 48 calls against a small
# limit, and more calls than the default limit of 64
FLOODS = [pytest.param((8, 12, 48), id="limit-8"),
          pytest.param((Settings().node_max_calls, 80, 96), id="default-limit")]


@pytest.fixture(params=FLOODS)
def process(request, tmp_path, tgtd, serve):
    limit, disks, calls = request.param
    hv = FakeHypervisor()
    settings = make_settings(tmp_path, services="controller,node", tgt_portal=tgtd.portal,
                             tgt_control_port=tgtd.control_port, node_max_calls=limit,
                             detach_timeout=120, detach_retries=1)
    running = serve(settings, hypervisor=hv)
    ch = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield running, hv, ch, (limit, disks, calls)
    hv.release_waits()  # nothing stays blocked past the test
    ch.close()


def hanging_disks(hv: FakeHypervisor, count: int) -> list[tuple[str, str]]:
    """count (server, volume) pairs, each a disk of a guest that never lets go."""
    pairs = []
    for i in range(count):
        volume_id = f"00000000-0000-4000-8000-{i:012d}"
        dom = hv.add_domain(hangs_on_detach=True,
                            disks=(Disk("vdb", "virtio", volume_id, volume_alias(volume_id)),))
        pairs.append((dom.uuid, volume_id))
    return pairs


def check(health, service: str = "") -> float:
    started = time.monotonic()
    answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=HEALTH_DEADLINE)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    return time.monotonic() - started


def test_a_flood_of_hanging_detaches_is_bounded_and_health_answers_in_time(process):
    running, hv, ch, (limit, disks, count) = process
    node = node_pb2_grpc.NodeStub(ch)
    health = health_pb2_grpc.HealthStub(ch)
    controller = controller_pb2_grpc.ControllerStub(ch)
    health.Check(health_pb2.HealthCheckRequest(), timeout=10)  # the connection is up
    pairs = hanging_disks(hv, disks)

    calls = [node.NodeUnpublishVolume.future(
        pb.NodeUnpublishVolumeRequest(server_id=s, volume_id=v), timeout=120)
        for k in range(count) for s, v in [pairs[k % disks]]]

    def detaching() -> int:
        return sum(1 for c in list(hv.calls) if c[0] == "request_detach")

    # every call is either refused by now or waits on its guest
    deadline = time.monotonic() + 30
    while sum(c.done() for c in calls) + detaching() < count:
        assert time.monotonic() < deadline, (sum(c.done() for c in calls), detaching())
        time.sleep(0.02)
    waiting = detaching()
    assert 1 <= waiting <= limit
    refused = [c for c in calls if c.done()]
    codes = {c.code() for c in refused}
    assert len(refused) == count - waiting
    assert codes <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}, codes
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    for c in refused:
        reason = error_from_rpc(c.exception()).reason
        assert reason == ("TOO_MANY_CALLS" if c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                          else "DETACH_IN_PROGRESS")

    # the health check (overall and per service) answers within its deadline
    latencies = [check(health, name) for _ in range(10)
                 for name in ("", "vmattach.v1.Node", "vmattach.v1.Controller")]
    print(f"\nhealth under overload: {len(latencies)} checks, max {max(latencies) * 1000:.1f} ms,"
          f" waiting detaches {waiting}, refused {len(refused)}")

    # the Node has no room for one more call of any kind; the Controller has its own
    with pytest.raises(grpc.RpcError) as err:
        node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "its limit" in err.value.details()
    controller.ListVolumes(controller_pb2.ListVolumesRequest(), timeout=10)

    # the guests give up: the waiting calls end (the disk stays) and the Node answers again
    hv.release_waits()
    for c in calls:
        if c not in refused:
            assert c.exception(timeout=30).code() == grpc.StatusCode.FAILED_PRECONDITION
    assert node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=10).node_id
