"""The facade's calls to the Controller and the Node of its own process
(`internal_calls = "in-process"`, common/inprocess.py) answer as the same
calls to the process's gRPC port do: the same answers, the same statuses
and error details, the same authentication and deadlines, and limits of
their own; the caller's own request context is left as it was. The facade
of `vmattach serve` makes every call it makes to its own process this way,
and the process has no loopback server for them; with `internal_calls =
"grpc"` it has one, and the facade's calls go through it."""

from __future__ import annotations

import threading
import time
import uuid

import grpc
import pytest

from tests.conftest import make_settings
from tests.support.fake_hypervisor import FakeHypervisor
from vmattach.clients.client import VmattachClient
from vmattach.common import auth, turns
from vmattach.common import observability as obs
from vmattach.common.auth import SERVICE_HEADER
from vmattach.common.grpcutil import error_from_rpc, intercepted
from vmattach.v1 import controller_pb2 as cpb
from vmattach.v1 import controller_pb2_grpc, node_pb2_grpc
from vmattach.v1 import node_pb2 as npb

NODE_INFO = "/vmattach.v1.Node/NodeGetInfo"
NODE_SERVICE = "vmattach.v1.Node"


class Seen(grpc.ServerInterceptor):
    """Records, for each call, its method, the peer, the caller and request
    id current when the call arrives (before vmattach's own interceptor sets
    them); can make NodeGetInfo slow."""

    def __init__(self):
        self.calls: list[tuple[str, str, str, str]] = []
        self.delay = 0.0

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner, method = handler.unary_unary, details.method

        def unary(request, context):
            self.calls.append((method, context.peer(), auth.current().kind, obs.request_id()))
            if method == NODE_INFO and self.delay:
                time.sleep(self.delay)
            return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


@pytest.fixture(params=["none", "token"])
def stack(request, tmp_path, tgtd, serve):
    """An all-in-one on a real tgtd and the fake hypervisor, with the Seen
    interceptor. .local: the facade's in-process channel, .port: a channel
    to the process's gRPC port, both with the service token when auth is on
    (and the same two without it)."""
    seen = Seen()
    hv = FakeHypervisor()
    settings = make_settings(tmp_path, auth=request.param, node_id="node-1",
                             tgt_portal=tgtd.portal, tgt_control_port=tgtd.control_port,
                             initiator_iqn="iqn.2004-10.org.vmattach:inprocess",
                             node_max_calls=1, reconcile_interval=3600,
                             server_refresh_interval=3600)
    running = serve(settings, hypervisor=hv, interceptors=[seen])
    secret = running.authenticator.service_secret
    token = [(SERVICE_HEADER, secret)] if secret else []
    port = grpc.insecure_channel(f"127.0.0.1:{running.port}")

    class S:
        pass
    s = S()
    s.seen, s.running, s.hv, s.auth = seen, running, hv, request.param
    s.local, s.local_anonymous = intercepted(running.local, token), intercepted(running.local)
    s.port, s.port_anonymous = intercepted(port, token), intercepted(port)
    yield s
    port.close()


def outcome(call, request, **kw):
    """(answer, None) or (None, (code, details, ErrorInfo reason, field violations))."""
    try:
        return call(request, **kw), None
    except grpc.RpcError as err:
        exc = error_from_rpc(err)
        return None, (err.code(), err.details(), exc.reason, getattr(exc, "violations", []))


def both(stack, request_of, method: str, stub, anonymous: bool = False):
    answers = []
    for ch in ((stack.local_anonymous, stack.port_anonymous) if anonymous
               else (stack.local, stack.port)):
        answers.append(outcome(getattr(stub(ch), method), request_of(), timeout=10))
    return answers


def test_answers_and_errors_are_those_of_the_port(stack):
    local, on_port = both(stack, npb.NodeGetInfoRequest, "NodeGetInfo", node_pb2_grpc.NodeStub)
    assert local == on_port and local[0].node_id == "node-1"

    unknown = str(uuid.uuid4())
    local, on_port = both(stack, lambda: cpb.GetVolumeRequest(volume_id=unknown), "GetVolume",
                           controller_pb2_grpc.ControllerStub)
    assert local[1] is not None and local[1][0] == grpc.StatusCode.NOT_FOUND
    assert local == on_port

    # a bad field: INVALID_ARGUMENT naming it, with the same BadRequest detail
    local, on_port = both(stack, lambda: cpb.GetVolumeRequest(volume_id="x" * 5000), "GetVolume",
                           controller_pb2_grpc.ControllerStub)
    assert local[1][0] == grpc.StatusCode.INVALID_ARGUMENT and local[1][3][0][0] == "volume_id"
    assert local[1][:3] == on_port[1][:3]

    # a volume made in-process is there for the port's calls
    made = controller_pb2_grpc.ControllerStub(stack.local).CreateVolume(
        cpb.CreateVolumeRequest(name="in-process", size_gb=1), timeout=10)
    local, on_port = both(stack, lambda: cpb.GetVolumeRequest(volume_id=made.volume_id), "GetVolume",
                           controller_pb2_grpc.ControllerStub)
    assert local[1] is None and local == on_port and local[0].name == "in-process"


def test_an_internal_rpc_without_the_service_token_is_refused_as_on_the_port(stack):
    local, on_port = both(stack, npb.NodeGetInfoRequest, "NodeGetInfo", node_pb2_grpc.NodeStub,
                           anonymous=True)
    if stack.auth == "none":
        assert local[1] is None and on_port[1] is None
    else:
        assert local[1][0] == grpc.StatusCode.PERMISSION_DENIED
        assert local[1][:3] == on_port[1][:3]


def test_a_handler_past_the_deadline_is_deadline_exceeded(stack):
    stack.seen.delay = 0.3
    answer, status = outcome(node_pb2_grpc.NodeStub(stack.local).NodeGetInfo,
                             npb.NodeGetInfoRequest(), timeout=0.1)
    assert answer is None and status[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    stack.seen.delay = 0.0
    before = len(stack.seen.calls)
    answer, status = outcome(node_pb2_grpc.NodeStub(stack.local).NodeGetInfo,
                             npb.NodeGetInfoRequest(), timeout=0)
    assert status[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(stack.seen.calls) == before  # no time left: the handler never ran


def test_in_process_calls_have_limits_of_their_own(stack, monkeypatch):
    """node_max_calls = 1: while one in-process call runs, the next one is
    refused, while the port (whose calls have their own limit, as the
    facade's loopback server had) still answers; once it ends, calls go
    through again."""
    node = next(svc.servicer for svc in stack.running.services if svc.name == NODE_SERVICE)
    hold, held, info = threading.Event(), threading.Event(), node.m.info

    def held_info():
        held.set()
        with turns.outside():  # a wait on something slow (common/turns.py)
            hold.wait(10)
        return info()

    first: list = []
    t = threading.Thread(target=lambda: first.append(outcome(
        node_pb2_grpc.NodeStub(stack.local).NodeGetInfo, npb.NodeGetInfoRequest(), timeout=10)))
    monkeypatch.setattr(node.m, "info", held_info)
    t.start()
    try:
        assert held.wait(5)
        monkeypatch.setattr(node.m, "info", info)
        answer, status = outcome(node_pb2_grpc.NodeStub(stack.local).NodeGetInfo,
                                 npb.NodeGetInfoRequest(), timeout=5)
        assert status is not None and status[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert status[2] == "TOO_MANY_CALLS"
        answer, status = outcome(node_pb2_grpc.NodeStub(stack.port).NodeGetInfo,
                                 npb.NodeGetInfoRequest(), timeout=5)
        assert status is None and answer.node_id == "node-1"
    finally:
        hold.set()
        t.join(10)
    assert first[0][1] is None
    answer, status = outcome(node_pb2_grpc.NodeStub(stack.local).NodeGetInfo,
                             npb.NodeGetInfoRequest(), timeout=5)
    assert status is None


def test_the_callers_context_is_neither_seen_nor_changed(stack):
    user = auth.Caller("member", "someone-else")
    acting = auth.acting_as(user)
    try:
        with obs.request_context("req-caller"):
            node_pb2_grpc.NodeStub(stack.local).NodeGetInfo(npb.NodeGetInfoRequest(), timeout=5)
            assert (auth.current(), obs.request_id()) == (user, "req-caller")
    finally:
        auth.done_acting(acting)
    method, peer, kind, rid = stack.seen.calls[-1]
    # the call starts as a call from the network does: no caller of its own yet
    # (vmattach's interceptor authenticates it next), the request id only as metadata
    assert (method, peer, kind, rid) == (NODE_INFO, "in-process", auth.current().kind, "")


def test_the_facade_makes_its_calls_in_process(stack):
    """An attach and a detach through the public port: every call the
    facade makes reaches the Controller and the Node in-process, with the
    request's id."""
    token = ""
    if stack.auth == "token":
        token, _ = stack.running.authenticator.tokens.create("inprocess", "admin")
    server_id = stack.hv.add_domain().uuid
    with VmattachClient(f"127.0.0.1:{stack.running.port}", timeout=30, token=token) as client:
        volume = client.create_volume("vol-inprocess", 1).volume_id
        before = len(stack.seen.calls)
        client.attach_volume(server_id, volume)
        client.detach_volume(server_id, volume)
    calls = stack.seen.calls[before:]
    inner = [c for c in calls if not c[0].startswith("/vmattach.v1.Servers/")]
    assert {m.rsplit("/", 1)[1] for m, _, _, _ in inner} >= {
        "NodeGetInfo", "CreateAttachment", "NodePublishVolume", "MarkAttached",
        "BeginDetaching", "NodeUnpublishVolume", "DeleteAttachment"}
    assert {peer for _, peer, _, _ in inner} == {"in-process"}
    front = [c for c in calls if c[0].startswith("/vmattach.v1.Servers/")]
    assert len(front) == 2 and all(peer.startswith("ipv4:127.0.0.1:") for _, peer, _, _ in front)


def test_with_internal_calls_grpc_the_facade_calls_its_loopback_server(tmp_path, tgtd, serve):
    seen = Seen()
    hv = FakeHypervisor()
    settings = make_settings(tmp_path, internal_calls="grpc", node_id="node-1",
                             tgt_portal=tgtd.portal, tgt_control_port=tgtd.control_port,
                             initiator_iqn="iqn.2004-10.org.vmattach:inprocess",
                             reconcile_interval=3600, server_refresh_interval=3600)
    running = serve(settings, hypervisor=hv, interceptors=[seen])
    assert running.local is None and running.internal is not None
    server_id = hv.add_domain().uuid
    with VmattachClient(f"127.0.0.1:{running.port}", timeout=30) as client:
        volume = client.create_volume("vol-loopback", 1).volume_id
        before = len(seen.calls)
        client.attach_volume(server_id, volume)
    inner = [c for c in seen.calls[before:] if not c[0].startswith("/vmattach.v1.Servers/")]
    assert {m.rsplit("/", 1)[1] for m, _, _, _ in inner} >= {
        "NodeGetInfo", "CreateAttachment", "NodePublishVolume", "MarkAttached"}
    assert all(peer.startswith("ipv4:127.0.0.1:") for _, peer, _, _ in inner)
