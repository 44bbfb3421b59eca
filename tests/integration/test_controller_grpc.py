"""vmattach.v1.Controller through a real gRPC server on port 0 (the real
servicer, interceptor, VolumeManager and database: a SQLite file, and a
fresh PostgreSQL database; a fake tgtd), plus one
narrow servicer test with grpcio-testing."""

from __future__ import annotations

import logging
import threading
import uuid

import grpc
import grpc_testing
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.support.fake_tgt import FakeTgtAdm
from vmattach.common.db import open_database
from vmattach.common.grpcutil import Service, channel, create_server
from vmattach.common.secretbox import SecretBox
from vmattach.controller.models import MODELS
from vmattach.controller.servicer import SERVICE_NAME, ControllerServicer
from vmattach.controller.volumes import VolumeManager
from vmattach.v1 import controller_pb2 as pb
from vmattach.v1 import controller_pb2_grpc, types_pb2

PORTAL = "127.0.0.1:3260"
DETACH_MESSAGE = ("Unable to detach volume. Volume status must be 'in-use' and attach_status"
                  " must be 'attached' to detach.")
TIMEOUT = 10


def make_manager(tmp_path, database_url: str = "") -> tuple[VolumeManager, FakeTgtAdm]:
    db = open_database(database_url or f"sqlite:///{tmp_path / 'controller.db'}", MODELS)
    tgt = FakeTgtAdm()
    return VolumeManager(db, tmp_path / "volumes", tgt, PORTAL,
                         SecretBox.from_state_dir(tmp_path)), tgt


class Api:
    """A Controller stub whose calls have a deadline."""

    def __init__(self, stub):
        self._stub = stub

    def __getattr__(self, name):
        method = getattr(self._stub, name)
        return lambda request: method(request, timeout=TIMEOUT)


@pytest.fixture
def ctl(tmp_path, database_url):
    manager, tgt = make_manager(tmp_path, database_url)
    server, port = create_server([Service(
        SERVICE_NAME, controller_pb2_grpc.add_ControllerServicer_to_server,
        ControllerServicer(manager))])
    ch = channel(f"127.0.0.1:{port}")

    class C:
        pass
    c = C()
    c.api = Api(controller_pb2_grpc.ControllerStub(ch))
    c.channel, c.port, c.tgt, c.manager = ch, port, tgt, manager
    yield c
    ch.close()
    server.stop(None)
    manager.db.close()


def sid() -> str:
    return str(uuid.uuid4())


def conn(tag: str = "a") -> types_pb2.Connector:
    return types_pb2.Connector(initiator=f"iqn.1993-08.org.debian:01:host-{tag}", ip="127.0.0.1",
                               host=f"host-{tag}", platform="x86_64", os_type="linux")


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(err)
    assert status is not None, "no rich status"
    assert status.code == err.code().value[0] and status.message == err.details()
    # the ErrorInfo first; an INVALID_ARGUMENT naming a field adds a BadRequest
    detail, *more = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    for extra in more:
        bad = error_details_pb2.BadRequest()
        assert extra.Unpack(bad) and status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert bad.field_violations and all(v.field for v in bad.field_violations)
    return info


def fails(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(request)
    return err.value


# -- the whole state machine through gRPC ---------------------------------------------------


def test_attach_and_detach_bookkeeping_through_grpc(ctl):
    api = ctl.api
    vol = api.CreateVolume(pb.CreateVolumeRequest(name="data", size_gb=1))
    assert (vol.status, vol.attach_status, vol.size_gb) == \
        (types_pb2.VOLUME_STATUS_AVAILABLE, types_pb2.ATTACH_STATUS_DETACHED, 1)
    assert api.CreateVolume(pb.CreateVolumeRequest(name="data", size_gb=1)).volume_id == vol.volume_id
    srv = sid()
    ids = dict(volume_id=vol.volume_id, server_id=srv)
    got = api.ReserveVolume(pb.ReserveVolumeRequest(**ids))
    assert (got.status, [a.attach_status for a in got.attachments]) == (types_pb2.VOLUME_STATUS_ATTACHING,
                                                                    [types_pb2.ATTACH_STATUS_RESERVED])
    resp = api.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(**ids, connector=conn()))
    info = resp.connection_info
    assert info.driver_volume_type == types_pb2.DRIVER_VOLUME_TYPE_ISCSI and info.serial == vol.volume_id
    assert info.data.target_iqn == f"iqn.2010-10.org.openstack:volume-{vol.volume_id}"
    assert (info.data.target_portal, info.data.target_lun, info.data.auth_method) == \
        (PORTAL, 1, types_pb2.AUTH_METHOD_CHAP)
    again = api.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(**ids, connector=conn()))
    assert again == resp
    got = api.MarkAttached(pb.MarkAttachedRequest(**ids, mountpoint="/dev/vdb"))
    assert (got.status, got.attach_status) == (types_pb2.VOLUME_STATUS_IN_USE, types_pb2.ATTACH_STATUS_ATTACHED)
    [att] = got.attachments
    assert (att.server_id, att.mountpoint, att.attach_mode, att.attach_status) == \
        (srv, "/dev/vdb", types_pb2.ACCESS_MODE_READ_WRITE, types_pb2.ATTACH_STATUS_ATTACHED)
    assert att.connector.initiator == conn().initiator
    assert api.BeginDetaching(pb.BeginDetachingRequest(**ids)).status == types_pb2.VOLUME_STATUS_DETACHING
    assert api.RollDetaching(pb.RollDetachingRequest(**ids)).status == types_pb2.VOLUME_STATUS_IN_USE
    assert api.BeginDetaching(pb.BeginDetachingRequest(**ids)).status == types_pb2.VOLUME_STATUS_DETACHING
    api.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(**ids, connector=conn()))
    api.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(**ids, connector=conn()))
    got = api.MarkDetached(pb.MarkDetachedRequest(**ids))
    assert (got.status, got.attach_status, len(got.attachments)) == \
        (types_pb2.VOLUME_STATUS_AVAILABLE, types_pb2.ATTACH_STATUS_DETACHED, 0)
    assert ctl.tgt.fake.targets == {}
    api.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    api.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    err = fails(api.GetVolume, pb.GetVolumeRequest(volume_id=vol.volume_id))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_an_attachment_being_detached_shows_detaching_in_every_answer(ctl):
    """The attachment's row stays attached while its detach runs (the volume
    names the server): over gRPC it is DETACHING, as it always was."""
    api = ctl.api
    vol = api.CreateVolume(pb.CreateVolumeRequest(name="shown", size_gb=1, multiattach=True))
    a, b = sid(), sid()
    for srv, dev in ((a, "/dev/vdb"), (b, "/dev/vdc")):
        api.ReserveVolume(pb.ReserveVolumeRequest(volume_id=vol.volume_id, server_id=srv))
        api.MarkAttached(pb.MarkAttachedRequest(volume_id=vol.volume_id, server_id=srv,
                                                mountpoint=dev))
    ids = dict(volume_id=vol.volume_id, server_id=a)
    expected = {a: types_pb2.ATTACH_STATUS_DETACHING, b: types_pb2.ATTACH_STATUS_ATTACHED}
    answers = [api.BeginDetaching(pb.BeginDetachingRequest(**ids)),
               api.BeginDetaching(pb.BeginDetachingRequest(**ids)),  # a retry
               api.GetVolume(pb.GetVolumeRequest(volume_id=vol.volume_id)),
               *[v for v in api.ListVolumes(pb.ListVolumesRequest()).volumes
                 if v.volume_id == vol.volume_id]]
    assert len(answers) == 4
    for got in answers:
        assert got.status == types_pb2.VOLUME_STATUS_DETACHING
        assert {x.server_id: x.attach_status for x in got.attachments} == expected
    err = fails(api.BeginDetaching, pb.BeginDetachingRequest(volume_id=vol.volume_id, server_id=b))
    assert (err.code(), err.details()) == (grpc.StatusCode.FAILED_PRECONDITION, DETACH_MESSAGE)
    got = api.RollDetaching(pb.RollDetachingRequest(**ids))
    assert got.status == types_pb2.VOLUME_STATUS_IN_USE
    assert {x.attach_status for x in got.attachments} == {types_pb2.ATTACH_STATUS_ATTACHED}


def test_list_and_reconcile_exports_through_grpc(ctl):
    api = ctl.api
    vol = api.CreateVolume(pb.CreateVolumeRequest(name="exp", size_gb=1))
    ids = dict(volume_id=vol.volume_id, server_id=sid())
    api.ReserveVolume(pb.ReserveVolumeRequest(**ids))
    secret = api.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        **ids, connector=conn())).connection_info.data.auth_password
    [export] = api.ListExports(pb.ListExportsRequest()).exports
    assert (export.volume_id, export.at_tgtd) == (vol.volume_id, True)
    assert list(export.allowed_initiators) == list(export.connection_initiators) == \
        [conn().initiator]
    ctl.tgt.fake.restart()  # tgtd lost everything
    listed = api.ListExports(pb.ListExportsRequest())
    assert [e.at_tgtd for e in listed.exports] == [False] and secret not in str(listed)
    done = api.ReconcileExports(pb.ReconcileExportsRequest())
    assert (done.targets_created, done.acls_changed) == (1, 1)
    assert api.ListExports(pb.ListExportsRequest()).exports[0].at_tgtd


def test_error_codes_and_messages_of_the_state_machine(ctl):
    api = ctl.api
    vol = api.CreateVolume(pb.CreateVolumeRequest(name="v", size_gb=1))
    a, b = sid(), sid()
    err = fails(api.CreateVolume, pb.CreateVolumeRequest(name="v", size_gb=2))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    err = fails(api.ControllerPublishVolume, pb.ControllerPublishVolumeRequest(
        volume_id=vol.volume_id, server_id=a, connector=conn()))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    err = fails(api.BeginDetaching, pb.BeginDetachingRequest(volume_id=vol.volume_id, server_id=a))
    assert (err.code(), err.details()) == (grpc.StatusCode.FAILED_PRECONDITION, DETACH_MESSAGE)
    api.ReserveVolume(pb.ReserveVolumeRequest(volume_id=vol.volume_id, server_id=a))
    err = fails(api.ReserveVolume, pb.ReserveVolumeRequest(volume_id=vol.volume_id, server_id=b))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details().startswith("Invalid volume: status must be 'available'")
    err = fails(api.DeleteVolume, pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    err = fails(api.ControllerPublishVolume, pb.ControllerPublishVolumeRequest(
        volume_id=vol.volume_id, server_id=a, connector=types_pb2.Connector(ip="127.0.0.1")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "initiator" in err.details()
    api.MarkAttached(pb.MarkAttachedRequest(volume_id=vol.volume_id, server_id=a, mountpoint="/dev/vdb"))
    err = fails(api.ReserveVolume, pb.ReserveVolumeRequest(volume_id=vol.volume_id, server_id=b))
    assert err.details() == \
        f"Invalid volume: volume {vol.volume_id} is already attached to instances: {a}"
    assert error_info(err).reason == "VOLUME_ALREADY_ATTACHED"


def test_errors_carry_an_error_info_detail(ctl):
    missing = sid()
    err = fails(ctl.api.GetVolume, pb.GetVolumeRequest(volume_id=missing))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == f"Volume {missing} could not be found."
    info = error_info(err)
    metadata = dict(info.metadata)
    assert metadata.pop("request_id").startswith("req-")  # every error names its request
    assert (info.reason, info.domain, metadata) == \
        ("VOLUME_NOT_FOUND", "vmattach.io", {"volume_id": missing})


UUID_METHODS = ["GetVolume", "DeleteVolume", "ReserveVolume", "UnreserveVolume",
                "ControllerPublishVolume", "ControllerUnpublishVolume", "MarkAttached",
                "BeginDetaching", "RollDetaching", "MarkDetached"]
REQUESTS = {m.name: m.input_type for m in pb.DESCRIPTOR.services_by_name["Controller"].methods}


def _request(method: str, **fields):
    cls = getattr(pb, REQUESTS[method].name)
    known = {k: v for k, v in fields.items() if k in cls.DESCRIPTOR.fields_by_name}
    if "connector" in cls.DESCRIPTOR.fields_by_name:
        known["connector"] = conn()
    return cls(**known)


BAD_IDS = [("volume_id", ""), ("volume_id", "not-a-uuid"), ("volume_id", "1234"),
           ("server_id", "x" * 500), ("server_id", "")]


@pytest.mark.parametrize("method,field,value", [
    (method, field, value) for method in UUID_METHODS for field, value in BAD_IDS
    if field in getattr(pb, REQUESTS[method].name).DESCRIPTOR.fields_by_name])
def test_malformed_ids_are_invalid_argument(ctl, method, field, value):
    ids = {"volume_id": sid(), "server_id": sid(), field: value}
    err = fails(getattr(ctl.api, method), _request(method, **ids))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.details()
    assert len(err.details()) < 200
    assert error_info(err).reason == "INVALID_ARGUMENT"


@pytest.mark.parametrize("method", sorted(REQUESTS))
@pytest.mark.parametrize("payload", [b"\xff\xff\xff\xff", b"\x0a\x05\xff", b"\x12\x80",
                                     b"\x08" + b"\xff" * 11],
                         ids=["bad-tag", "truncated", "truncated-length", "long-varint"])
def test_garbage_bytes_are_invalid_argument(ctl, method, payload):
    call = ctl.channel.unary_unary(f"/vmattach.v1.Controller/{method}")
    with pytest.raises(grpc.RpcError) as err:
        call(payload, timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err.value).reason == "MALFORMED_REQUEST"


GARBAGE = [
    ("CreateVolume", pb.CreateVolumeRequest()),
    ("CreateVolume", pb.CreateVolumeRequest(name="\x00\x01", size_gb=1)),
    ("CreateVolume", pb.CreateVolumeRequest(name="ok", size_gb=-(2 ** 63))),
    ("CreateVolume", pb.CreateVolumeRequest(name="ok", size_gb=2 ** 63 - 1)),
    ("CreateVolume", pb.CreateVolumeRequest(name="é" * 1000, size_gb=1)),
    ("ListVolumes", pb.ListVolumesRequest(page_size=-1)),
    ("ListVolumes", pb.ListVolumesRequest(page_token="\u2603" * 100)),
    ("ListVolumes", pb.ListVolumesRequest(page_token="=" * 7)),
    ("GetVolume", pb.GetVolumeRequest(volume_id="'; DROP TABLE controller_volume; --")),
    ("ReserveVolume", pb.ReserveVolumeRequest()),
    ("MarkAttached", pb.MarkAttachedRequest(volume_id=str(uuid.uuid4()), server_id=str(uuid.uuid4()),
                                            mode=99)),
    ("ControllerPublishVolume", pb.ControllerPublishVolumeRequest(
        volume_id=str(uuid.uuid4()), server_id=str(uuid.uuid4()),
        connector=types_pb2.Connector(initiator="iqn\n" + "x" * 5000))),
]


@pytest.mark.parametrize("method,request_", GARBAGE, ids=[f"{m}-{i}" for i, (m, _) in enumerate(GARBAGE)])
def test_garbage_values_get_a_defined_error_never_unknown_or_internal(ctl, method, request_):
    err = fails(getattr(ctl.api, method), request_)
    assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), err.details()
    assert error_info(err).domain == "vmattach.io"


def test_list_volumes_pages_through_all_volumes_once_in_creation_order(ctl):
    ids = [ctl.api.CreateVolume(pb.CreateVolumeRequest(name=f"v{i}", size_gb=1)).volume_id
           for i in range(5)]
    seen, token, sizes = [], "", []
    while True:
        page = ctl.api.ListVolumes(pb.ListVolumesRequest(page_size=2, page_token=token))
        sizes.append(len(page.volumes))
        seen += [v.volume_id for v in page.volumes]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids and sizes == [2, 2, 1]
    everything = ctl.api.ListVolumes(pb.ListVolumesRequest())
    assert [v.volume_id for v in everything.volumes] == ids and everything.next_page_token == ""
    err = fails(ctl.api.ListVolumes, pb.ListVolumesRequest(page_size=2, page_token="bogus"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in err.details()


def test_secrets_are_not_in_answers_or_logs(ctl, caplog):
    caplog.set_level(logging.DEBUG)
    api = ctl.api
    vol = api.CreateVolume(pb.CreateVolumeRequest(name="s", size_gb=1))
    ids = dict(volume_id=vol.volume_id, server_id=sid())
    api.ReserveVolume(pb.ReserveVolumeRequest(**ids))
    info = api.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        **ids, connector=conn())).connection_info.data
    password = info.auth_password
    assert len(password) >= 12
    api.MarkAttached(pb.MarkAttachedRequest(**ids, mountpoint="/dev/vdb"))
    # make the interceptor log a request with the secret in it: a failing publish
    ctl.tgt.fake.fail_on("target", "show")
    err = fails(api.ControllerPublishVolume, pb.ControllerPublishVolumeRequest(**ids, connector=conn()))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert password not in err.details()
    answers = [api.GetVolume(pb.GetVolumeRequest(volume_id=vol.volume_id)),
               api.ListVolumes(pb.ListVolumesRequest())]
    for answer in answers:
        assert password.encode() not in answer.SerializeToString()
        assert info.auth_username.encode() not in answer.SerializeToString()
    assert caplog.records
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        assert password not in text


# -- concurrency -------------------------------------------------------------------------------


def test_fifty_concurrent_reserves_have_exactly_one_winner(ctl):
    vol = ctl.api.CreateVolume(pb.CreateVolumeRequest(name="race", size_gb=1))
    n = 50
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n
    stub = controller_pb2_grpc.ControllerStub(ctl.channel)

    def reserve(i: int) -> None:
        request = pb.ReserveVolumeRequest(volume_id=vol.volume_id, server_id=sid())
        barrier.wait(timeout=TIMEOUT)
        try:
            results[i] = stub.ReserveVolume(request, timeout=30)
        except grpc.RpcError as err:
            results[i] = err

    threads = [threading.Thread(target=reserve, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    winners = [r for r in results if isinstance(r, pb.Volume)]
    losers = [r for r in results if isinstance(r, grpc.RpcError)]
    assert len(winners) == 1 and len(losers) == n - 1
    assert {e.code() for e in losers} == {grpc.StatusCode.FAILED_PRECONDITION}
    got = ctl.api.GetVolume(pb.GetVolumeRequest(volume_id=vol.volume_id))
    assert got.status == types_pb2.VOLUME_STATUS_ATTACHING
    assert [a.server_id for a in got.attachments] == [winners[0].attachments[0].server_id]


# -- one servicer, no network: grpcio-testing ------------------------------------------------------


def test_servicer_with_grpc_testing_creates_and_reads_a_volume(tmp_path):
    manager, _ = make_manager(tmp_path)
    service = pb.DESCRIPTOR.services_by_name["Controller"]
    server = grpc_testing.server_from_dictionary({service: ControllerServicer(manager)},
                                                 grpc_testing.strict_real_time())

    def invoke(name, request):
        rpc = server.invoke_unary_unary(service.methods_by_name[name], (), request, TIMEOUT)
        response, _, code, details = rpc.termination()
        assert code == grpc.StatusCode.OK, details
        return response

    created = invoke("CreateVolume", pb.CreateVolumeRequest(name="t", size_gb=3, multiattach=True))
    assert (created.name, created.size_gb, created.multiattach, created.status) == \
        ("t", 3, True, types_pb2.VOLUME_STATUS_AVAILABLE)
    assert created.created_at.seconds > 0
    got = invoke("GetVolume", pb.GetVolumeRequest(volume_id=created.volume_id.upper()))
    assert got.volume_id == created.volume_id and got.name == "t"
    manager.db.close()
