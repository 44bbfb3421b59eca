"""The client's transparent retries (common/grpcutil.py) are for a server
that could not be reached; an UNAVAILABLE that a vmattach service answers
itself (after its own rollback) reaches the caller after one attempt."""

from __future__ import annotations

import time

import pytest

from tests.conftest import make_settings
from tests.support.fake_hypervisor import FakeHypervisor
from tests.support.fake_runner import FakeRunner
from vmattach.common.errors import Unavailable
from vmattach.common.grpcutil import begin, call, channel, create_server
from vmattach.node.app import build_with
from vmattach.v1 import node_pb2 as pb
from vmattach.v1 import node_pb2_grpc


def test_an_answered_unavailable_is_not_retried(tmp_path):
    hv = FakeHypervisor()
    service = build_with(make_settings(tmp_path, node_id="n", initiator_iqn="iqn.2000-01.x:n"),
                         FakeRunner(), hv)
    server, port = create_server([service])
    ch = channel(f"127.0.0.1:{port}")  # with the retry policy
    try:
        hv.inject_error("list_domains", Unavailable("the hypervisor is away"), times=1)
        with pytest.raises(Unavailable, match="the hypervisor is away"):
            call(node_pb2_grpc.NodeStub(ch).ListServers, pb.NodeListServersRequest(), timeout=10)
    finally:
        ch.close()
        server.stop(0)


def test_a_begun_call_runs_while_the_caller_works_and_fails_as_call_does(tmp_path):
    """grpcutil.begin: the call is under way before its answer is asked for
    (the hypervisor has listed the domains by the time the caller looks),
    and its failure raises the same VmattachError as call()."""
    hv = FakeHypervisor()
    hv.add_domain()
    service = build_with(make_settings(tmp_path, node_id="n", initiator_iqn="iqn.2000-01.x:n"),
                         FakeRunner(), hv)
    server, port = create_server([service])
    ch = channel(f"127.0.0.1:{port}")
    stub = node_pb2_grpc.NodeStub(ch)
    try:
        answer = begin(stub.ListServers, pb.NodeListServersRequest(), timeout=10)
        deadline = time.monotonic() + 10
        while ("list_domains",) not in hv.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ("list_domains",) in hv.calls  # before the answer is asked for
        assert len(answer().servers) == 1
        hv.inject_error("list_domains", Unavailable("the hypervisor is away"), times=1)
        answer = begin(stub.ListServers, pb.NodeListServersRequest(), timeout=10)
        with pytest.raises(Unavailable, match="the hypervisor is away"):
            answer()
    finally:
        ch.close()
        server.stop(0)
