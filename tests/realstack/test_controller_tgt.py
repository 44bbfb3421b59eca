"""The Controller on a real tgtd, checked from a real iSCSI initiator
(libiscsi's iscsi-inq / iscsi-readcapacity16): CHAP, initiator ACLs, export
removal, and exports surviving a tgtd restart."""

from __future__ import annotations

import logging
import re
import subprocess
import uuid

import grpc
import pytest

from tests.conftest import need
from tests.support.tgtd import TgtDaemon
from vmattach.common.grpcutil import channel
from vmattach.v1 import controller_pb2 as pb
from vmattach.v1 import controller_pb2_grpc, types_pb2

pytestmark = pytest.mark.realstack

TIMEOUT = 30
GIB = 1 << 30


@pytest.fixture(autouse=True)
def _initiator_tools():
    need("iscsi-inq", "iscsi-readcapacity16")


def new_initiator() -> str:
    return f"iqn.1993-08.org.debian:01:test-{uuid.uuid4().hex[:12]}"


def connector(initiator: str) -> types_pb2.Connector:
    return types_pb2.Connector(initiator=initiator, ip="127.0.0.1", host="testhost",
                               platform="x86_64", os_type="linux")


def iscsi(tool: str, initiator: str, data: types_pb2.ConnectionData,
          password: str | None = None) -> subprocess.CompletedProcess:
    """Log in to the target as initiator with the CHAP credentials of data
    (or another password) and run tool on LUN 1."""
    secret = data.auth_password if password is None else password
    url = f"iscsi://{data.auth_username}%{secret}@{data.target_portal}/{data.target_iqn}/{data.target_lun}"
    return subprocess.run([tool, "-i", initiator, url], capture_output=True, text=True, timeout=TIMEOUT)


def can_log_in(initiator: str, data: types_pb2.ConnectionData, password: str | None = None) -> bool:
    return iscsi("iscsi-inq", initiator, data, password).returncode == 0


def targets(tgtd: TgtDaemon) -> str:
    proc = subprocess.run(["tgtadm", "--control-port", str(tgtd.control_port), "--lld", "iscsi",
                           "--mode", "target", "--op", "show"],
                          capture_output=True, text=True, timeout=TIMEOUT, check=True)
    return proc.stdout


class Api:
    def __init__(self, address: str):
        self.channel = channel(address)
        self.stub = controller_pb2_grpc.ControllerStub(self.channel)

    def __getattr__(self, name):
        method = getattr(self.stub, name)
        return lambda request: method(request, timeout=TIMEOUT)

    def create(self, name: str, size_gb: int = 1, multiattach: bool = False) -> pb.Volume:
        return self.CreateVolume(pb.CreateVolumeRequest(name=name, size_gb=size_gb,
                                                        multiattach=multiattach))

    def attach(self, volume_id: str, initiator: str, mark: bool = True) -> types_pb2.ConnectionData:
        """Reserve for a new server, publish to initiator (and mark attached)."""
        server_id = str(uuid.uuid4())
        self.ReserveVolume(pb.ReserveVolumeRequest(volume_id=volume_id, server_id=server_id))
        info = self.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=volume_id, server_id=server_id, connector=connector(initiator))).connection_info
        if mark:
            self.MarkAttached(pb.MarkAttachedRequest(volume_id=volume_id, server_id=server_id,
                                                     mountpoint="/dev/vdb"))
        info.data.volume_id = volume_id
        self.last_server_id = server_id
        return info.data


@pytest.fixture
def api(controller):
    a = Api(controller.address)
    yield a
    a.channel.close()


def test_published_volume_is_reachable_with_its_chap_credentials(controller, api):
    vol = api.create("iscsi-1", size_gb=2)
    initiator = new_initiator()
    data = api.attach(vol.volume_id, initiator)
    assert data.target_portal == controller.tgtd.portal
    assert data.target_iqn == f"iqn.2010-10.org.openstack:volume-{vol.volume_id}"
    inq = iscsi("iscsi-inq", initiator, data)
    assert inq.returncode == 0, inq.stderr
    cap = iscsi("iscsi-readcapacity16", initiator, data)
    assert cap.returncode == 0, cap.stderr
    total = re.search(r"Total size:\s*(\d+)", cap.stdout)
    assert total and int(total.group(1)) == 2 * GIB, cap.stdout


def test_wrong_password_and_unauthorised_initiator_cannot_log_in(controller, api):
    vol = api.create("iscsi-2")
    initiator = new_initiator()
    data = api.attach(vol.volume_id, initiator)
    assert can_log_in(initiator, data)
    wrong = iscsi("iscsi-inq", initiator, data, password="x" + data.auth_password[1:][::-1])
    assert wrong.returncode != 0
    assert not can_log_in(new_initiator(), data)


def test_publishing_twice_is_idempotent_on_the_real_target(controller, api):
    vol = api.create("iscsi-twice")
    initiator = new_initiator()
    server_id = str(uuid.uuid4())
    ids = dict(volume_id=vol.volume_id, server_id=server_id)
    api.ReserveVolume(pb.ReserveVolumeRequest(**ids))
    request = pb.ControllerPublishVolumeRequest(**ids, connector=connector(initiator))
    first = api.ControllerPublishVolume(request)
    second = api.ControllerPublishVolume(request)
    assert second == first
    assert targets(controller.tgtd).count("Target ") == 1
    assert can_log_in(initiator, first.connection_info.data)


def test_unpublish_revokes_one_initiator_and_the_last_removes_the_target(controller, api):
    vol = api.create("iscsi-shared", multiattach=True)
    first, second = new_initiator(), new_initiator()
    data_1 = api.attach(vol.volume_id, first)
    server_1 = api.last_server_id
    data_2 = api.attach(vol.volume_id, second)
    server_2 = api.last_server_id
    assert (data_2.auth_username, data_2.auth_password) == (data_1.auth_username, data_1.auth_password)
    assert can_log_in(first, data_1) and can_log_in(second, data_2)

    api.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
        volume_id=vol.volume_id, server_id=server_1, connector=connector(first)))
    assert not can_log_in(first, data_1)
    assert can_log_in(second, data_2)
    assert data_1.target_iqn in targets(controller.tgtd)

    api.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
        volume_id=vol.volume_id, server_id=server_2, connector=connector(second)))
    assert data_1.target_iqn not in targets(controller.tgtd)
    assert not can_log_in(second, data_2)


def test_unreserve_of_a_published_reservation_removes_the_target(controller, api):
    vol = api.create("iscsi-unreserve")
    initiator = new_initiator()
    data = api.attach(vol.volume_id, initiator, mark=False)
    assert can_log_in(initiator, data)
    got = api.UnreserveVolume(pb.UnreserveVolumeRequest(volume_id=vol.volume_id,
                                                        server_id=api.last_server_id))
    assert got.status == types_pb2.VOLUME_STATUS_AVAILABLE
    assert data.target_iqn not in targets(controller.tgtd)


def test_the_chap_password_is_not_logged_by_the_real_runner(controller, api, caplog):
    caplog.set_level(logging.DEBUG)
    vol = api.create("iscsi-log")
    data = api.attach(vol.volume_id, new_initiator())
    assert any("tgtadm" in r.getMessage() for r in caplog.records)  # the commands were logged...
    for record in caplog.records:
        assert data.auth_password not in record.getMessage() + (record.exc_text or "")  # ...masked
    for answer in (api.GetVolume(pb.GetVolumeRequest(volume_id=vol.volume_id)),
                   api.ListVolumes(pb.ListVolumesRequest())):
        assert data.auth_password.encode() not in answer.SerializeToString()


def test_exports_come_back_after_a_tgtd_crash_and_a_controller_restart(controller, api, serve):
    vol = api.create("iscsi-restart")
    initiator = new_initiator()
    data = api.attach(vol.volume_id, initiator)
    assert can_log_in(initiator, data)
    api.channel.close()

    controller.running.stop(grace=1)
    old = controller.tgtd
    old.kill()
    new = TgtDaemon(portal_port=old.portal_port, control_port=old.control_port,
                    log_path=old.log_path).start()
    try:
        assert data.target_iqn not in targets(new)
        running = serve(controller.settings)
        again = Api(f"127.0.0.1:{running.port}")
        try:
            assert data.target_iqn in targets(new)
            assert can_log_in(initiator, data)  # the same credentials still work
            assert not can_log_in(new_initiator(), data)  # and the ACL came back too
            got = again.GetVolume(pb.GetVolumeRequest(volume_id=vol.volume_id))
            assert (got.status, got.attach_status) == \
                (types_pb2.VOLUME_STATUS_IN_USE, types_pb2.ATTACH_STATUS_ATTACHED)
        finally:
            again.channel.close()
            running.stop(grace=1)
    finally:
        new.stop()


def test_a_tgtd_that_is_down_gives_internal_without_the_secret(controller, api):
    vol = api.create("iscsi-down")
    server_id = str(uuid.uuid4())
    api.ReserveVolume(pb.ReserveVolumeRequest(volume_id=vol.volume_id, server_id=server_id))
    controller.tgtd.kill()
    with pytest.raises(grpc.RpcError) as err:
        api.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, server_id=server_id, connector=connector(new_initiator())))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    # which tgtd (its control socket), and no request with the CHAP password in it
    assert "cannot reach tgtd at /var/run/tgtd/socket." in err.value.details()
    assert "password" not in err.value.details()


def test_extend_of_an_exported_volume_makes_tgtd_report_the_new_size(controller, api):
    volume = api.create(f"grow-{uuid.uuid4().hex[:8]}")
    initiator = new_initiator()
    data = api.attach(volume.volume_id, initiator)
    grown = api.ExtendVolume(pb.ExtendVolumeRequest(volume_id=volume.volume_id, new_size_gb=3))
    assert (grown.size_gb, grown.status) == (3, types_pb2.VOLUME_STATUS_IN_USE)
    cap = iscsi("iscsi-readcapacity16", initiator, data)
    assert cap.returncode == 0 and str(3 * GIB) in cap.stdout, cap.stdout + cap.stderr
    assert can_log_in(initiator, data)  # same target, account and ACL
    with pytest.raises(grpc.RpcError) as err:
        api.ExtendVolume(pb.ExtendVolumeRequest(volume_id=volume.volume_id, new_size_gb=2))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "New size for extend must be greater than current size" in err.value.details()
