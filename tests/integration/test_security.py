"""The secure default, through the real gRPC API: mutual TLS, the service
role for internal RPCs, user tokens with projects and roles, and the audit
trail. All three services in one process with TLS and `--auth token`, a real
Controller on a private tgtd, the fake hypervisor at the outermost boundary
(its domains carry Nova's owner project)."""

from __future__ import annotations

import logging
import stat
import uuid
from pathlib import Path

import grpc
import pytest

from tests.conftest import make_settings
from tests.support.fake_hypervisor import FakeHypervisor
from vmattach.clients.client import VmattachClient
from vmattach.common import auth, pki
from vmattach.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from vmattach.common.grpcutil import call, channel
from vmattach.common.tls import TlsFiles
from vmattach.v1 import node_pb2, node_pb2_grpc, types_pb2

pytestmark = pytest.mark.realstack  # the Controller runs on a real (private) tgtd

PROJECT_A = "8a3b0c1d2e3f40516273849506a7b8c9"
PROJECT_B = "1f2e3d4c5b6a79880716253443526170"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    pki.init(d, ["127.0.0.1"])
    return d


class Secure:
    def __init__(self, tmp_path, tgtd, serve, certs: Path):
        self.hv = FakeHypervisor()
        self.certs = certs
        self.settings = make_settings(
            tmp_path, auth="token", tgt_portal=tgtd.portal, tgt_control_port=tgtd.control_port,
            node_id="secure-node", initiator_iqn="iqn.2004-10.org.vmattach:secure-node",
            detach_timeout=0.5, detach_retries=2, reconcile_interval=3600,
            tls_cert=str(certs / "service.crt"), tls_key=str(certs / "service.key"),
            tls_ca=str(certs / "ca.crt"))
        self.running = serve(self.settings, hypervisor=self.hv)
        self.address = f"127.0.0.1:{self.running.port}"
        self.user_tls = TlsFiles(str(certs / "client.crt"), str(certs / "client.key"),
                                 str(certs / "ca.crt"))
        self.service_tls = TlsFiles(str(certs / "service.crt"), str(certs / "service.key"),
                                    str(certs / "ca.crt"))
        # the running server's own store (a model is bound to one database per process)
        self.tokens = self.running.authenticator.tokens
        self.clients: list[VmattachClient] = []

    def token(self, project: str, role: str = "member") -> str:
        return self.tokens.create(project, role)[0]

    def client(self, project: str | None = PROJECT_A, role: str = "member",
               token: str | None = None) -> VmattachClient:
        if token is None and project is not None:
            token = self.token(project, role)
        c = VmattachClient(self.address, timeout=30, token=token or "", tls=self.user_tls)
        self.clients.append(c)
        return c

    def server(self, project: str = PROJECT_A) -> str:
        uuid_ = self.hv.add_domain(project_id=project).uuid
        facade = next(s.servicer.f for s in self.running.services if hasattr(s.servicer, "f"))
        facade.nodes.refresh()  # as the periodic refresh would
        return uuid_

    def close(self):
        for c in self.clients:
            c.close()


@pytest.fixture
def secure(tmp_path, tgtd, serve, certs):
    s = Secure(tmp_path, tgtd, serve, certs)
    yield s
    s.close()


def raw(address: str, method: str, tls: TlsFiles, metadata=()):
    """Call method with an empty request; the error's code (OK: None)."""
    ch = channel(address, retries=False, tls=tls)
    try:
        ch.unary_unary(method, request_serializer=lambda _: b"",
                       response_deserializer=lambda b: b)(b"", timeout=15, metadata=metadata)
        return None
    except grpc.RpcError as err:
        return err.code()
    finally:
        ch.close()


INTERNAL = sorted(m for m, r in auth.POLICY.items() if r.audience == "internal")
PUBLIC = sorted(m for m, r in auth.POLICY.items() if r.audience == "public")


def test_every_internal_rpc_is_refused_to_a_user_certificate_and_a_user_token(secure):
    admin = secure.token(PROJECT_A, "admin")
    assert len(INTERNAL) >= 17  # 10 of the Controller, 7 of the Node
    for method in INTERNAL:
        assert raw(secure.address, method, secure.user_tls) == \
            grpc.StatusCode.PERMISSION_DENIED, method
        assert raw(secure.address, method, secure.user_tls,
                   [("authorization", f"Bearer {admin}")]) == \
            grpc.StatusCode.PERMISSION_DENIED, method
    # the service certificate is let through (the request itself is then checked)
    ch = channel(secure.address, tls=secure.service_tls)
    assert call(node_pb2_grpc.NodeStub(ch).NodeGetInfo, node_pb2.NodeGetInfoRequest(),
                timeout=15).node_id == "secure-node"
    ch.close()


def test_the_service_token_alone_is_not_accepted_over_the_network_without_its_value(secure):
    wrong = [(auth.SERVICE_HEADER, "not-the-token")]
    assert raw(secure.address, "/vmattach.v1.Node/NodeGetInfo", secure.user_tls, wrong) == \
        grpc.StatusCode.PERMISSION_DENIED


def test_every_public_rpc_needs_a_valid_token(secure):
    for method in PUBLIC:
        assert raw(secure.address, method, secure.user_tls) == \
            grpc.StatusCode.UNAUTHENTICATED, method
        assert raw(secure.address, method, secure.user_tls,
                   [("authorization", "Bearer vmat.0123456789abcdef." + "A" * 43)]) == \
            grpc.StatusCode.UNAUTHENTICATED, method


def test_a_revoked_token_is_refused_at_once(secure):
    text, row = secure.tokens.create(PROJECT_A, "member")
    c = secure.client(token=text)
    volume = c.create_volume("before-revoke", 1)
    secure.tokens.revoke(row.id)
    with pytest.raises(Unauthenticated):
        c.get_volume(volume.volume_id)


def test_project_b_sees_nothing_of_project_a(secure):
    a, b = secure.client(PROJECT_A), secure.client(PROJECT_B)
    server_a, server_b = secure.server(PROJECT_A), secure.server(PROJECT_B)
    vol_a = a.create_volume("shared-name", 1).volume_id
    vol_a2 = a.create_volume("a-spare", 1).volume_id
    att = a.attach_volume(server_a, vol_a)
    assert att.server_id == server_a
    vol_b = b.create_volume("shared-name", 1).volume_id  # no name clash across projects
    assert vol_b != vol_a
    # volumes
    with pytest.raises(NotFound):
        b.get_volume(vol_a)
    assert [v.volume_id for v in b.list_volumes()] == [vol_b]
    assert {v.volume_id for v in a.list_volumes()} == {vol_a, vol_a2}
    b.delete_volume(vol_a2)  # as for a missing volume: OK, nothing happens
    assert a.get_volume(vol_a2).status == types_pb2.VOLUME_STATUS_AVAILABLE
    # servers
    with pytest.raises(NotFound):
        b.get_server(server_a)
    assert [s.server_id for s in b.list_servers()] == [server_b]
    assert [s.server_id for s in a.list_servers()] == [server_a]
    assert a.get_server(server_a).project_id == PROJECT_A
    # attachments
    for fn in (lambda: b.get_attachment(server_a, vol_a), lambda: list(b.list_attachments(server_a)),
               lambda: b.detach_volume(server_a, vol_a)):
        with pytest.raises(NotFound) as err:
            fn()
        assert err.value.reason == "SERVER_NOT_FOUND"
    with pytest.raises(NotFound) as err:
        b.attach_volume(server_b, vol_a2)  # A's volume on B's server
    assert err.value.reason == "VOLUME_NOT_FOUND"
    with pytest.raises(NotFound) as err:
        b.attach_volume(server_a, vol_b)  # B's volume on A's server
    assert err.value.reason == "SERVER_NOT_FOUND"
    # nothing changed for A, and B's attempts left no reservation behind
    assert a.get_attachment(server_a, vol_a).attachment_id == att.attachment_id
    assert a.get_volume(vol_a2).status == types_pb2.VOLUME_STATUS_AVAILABLE
    assert b.get_volume(vol_b).status == types_pb2.VOLUME_STATUS_AVAILABLE
    a.detach_volume(server_a, vol_a)
    assert a.get_volume(vol_a).status == types_pb2.VOLUME_STATUS_AVAILABLE


def test_reader_member_and_admin(secure):
    member = secure.client(PROJECT_A, "member")
    reader = secure.client(PROJECT_A, "reader")
    admin = secure.client(PROJECT_B, "admin")
    server_a = secure.server(PROJECT_A)
    orphan = secure.server("")  # no Nova metadata: nobody's
    vol = member.create_volume("by-member", 1).volume_id
    assert reader.get_volume(vol).project_id == PROJECT_A
    assert [v.volume_id for v in reader.list_volumes()] == [vol]
    for change in (lambda: reader.create_volume("by-reader", 1),
                   lambda: reader.delete_volume(vol),
                   lambda: reader.attach_volume(server_a, vol),
                   lambda: reader.detach_volume(server_a, vol)):
        with pytest.raises(PermissionDenied):
            change()
    # admin: any object by id; lists its own project unless all_projects
    assert admin.get_volume(vol).volume_id == vol
    assert list(admin.list_volumes()) == []
    assert vol in {v.volume_id for v in admin.list_volumes(all_projects=True)}
    assert {s.server_id for s in admin.list_servers(all_projects=True)} >= {server_a, orphan}
    assert admin.get_server(orphan).project_id == ""
    with pytest.raises(NotFound):
        member.get_server(orphan)
    assert orphan not in {s.server_id for s in member.list_servers(all_projects=True)}
    admin.attach_volume(server_a, vol)
    assert member.get_attachment(server_a, vol).volume_id == vol
    member.detach_volume(server_a, vol)


def test_every_change_leaves_one_audit_line_without_a_secret(secure, caplog):
    c = secure.client(PROJECT_A)
    server_a = secure.server(PROJECT_A)
    with caplog.at_level(logging.INFO, logger="vmattach.audit"):
        vol = c.create_volume("audited", 1).volume_id
        c.attach_volume(server_a, vol)
        c.detach_volume(server_a, vol)
        with pytest.raises(PermissionDenied):
            secure.client(PROJECT_A, "reader").delete_volume(vol)
    lines = [r.getMessage() for r in caplog.records if r.name == "vmattach.audit"]
    create = [x for x in lines if "/CreateVolume" in x]
    assert len(create) == 1 and f"project={PROJECT_A}" in create[0] \
        and f"volume_id={vol}" in create[0] and create[0].endswith("result=OK")
    assert any("/AttachVolume" in x and f"server_id={server_a}" in x for x in lines)
    assert any("/CreateAttachment" in x and "service" in x for x in lines)
    assert any("/DeleteVolume" in x and "PERMISSION_DENIED" in x and "role=reader" in x
               for x in lines)
    with secure.running.services[0].servicer.m.db.connection_context():
        from vmattach.controller.models import Volume
        sealed = Volume.get_by_id(vol).chap_secret
    password = secure.running.services[0].servicer.m.secretbox.decrypt(sealed)
    assert not any(password in x for x in lines)
    assert not any("vmat." in x for x in lines)  # no token either


def test_state_files_are_private(secure):
    state = Path(secure.settings.state_dir)
    c = secure.client(PROJECT_A)
    vol = c.create_volume("private", 1).volume_id
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for name in ("controller.db", "servers.db", "auth.db", "secret.key", "servers-secret.key",
                 "service.token", f"volumes/volume-{vol}.img"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name


def test_a_host_file_or_device_is_never_attached_even_for_the_service(secure, tmp_path):
    """The first attack of the issue: NodeStage + NodePublish of a host file."""
    ch = channel(secure.address, tls=secure.service_tls)
    node = node_pb2_grpc.NodeStub(ch)
    server_a = secure.server(PROJECT_A)
    link = Path(secure.settings.state_dir) / "volumes" / "volume-link.img"
    link.symlink_to("/etc/passwd")
    try:
        for path in ("/etc/passwd", "/dev/sda", str(tmp_path), str(link)):
            info = types_pb2.ConnectionInfo(driver_volume_type=types_pb2.DRIVER_VOLUME_TYPE_FILE,
                                            data=types_pb2.ConnectionData(device_path=path))
            vid = str(uuid.uuid4())
            with pytest.raises(InvalidArgument):
                call(node.NodeStageVolume, node_pb2.NodeStageVolumeRequest(
                    volume_id=vid, connection_info=info), timeout=15)
            with pytest.raises(InvalidArgument):
                call(node.NodePublishVolume, node_pb2.NodePublishVolumeRequest(
                    server_id=server_a, volume_id=vid, device="/dev/vdb", connection_info=info,
                    staged=node_pb2.StagedVolume(volume_id=vid, driver_volume_type=types_pb2.DRIVER_VOLUME_TYPE_FILE,
                                                 device_path=path)), timeout=15)
        assert secure.hv.attached == {}
    finally:
        ch.close()


def test_publish_for_another_host_is_refused(secure):
    """The second attack: publish an in-use volume with one's own initiator."""
    c = secure.client(PROJECT_A)
    server_a = secure.server(PROJECT_A)
    vol = c.create_volume("in-use", 1).volume_id
    c.attach_volume(server_a, vol)
    from vmattach.v1 import controller_pb2 as cpb
    from vmattach.v1 import controller_pb2_grpc
    ch = channel(secure.address, tls=secure.service_tls)
    try:
        with pytest.raises(FailedPrecondition) as err:
            call(controller_pb2_grpc.ControllerStub(ch).ControllerPublishVolume,
                 cpb.ControllerPublishVolumeRequest(
                     volume_id=vol, server_id=server_a,
                     connector=types_pb2.Connector(initiator="iqn.2000-01.com.attacker:h1")),
                 timeout=15)
        assert err.value.reason == "CONNECTOR_MISMATCH"
    finally:
        ch.close()
    c.detach_volume(server_a, vol)


def test_the_facade_reaches_a_remote_node_over_mutual_tls(tmp_path, tgtd, serve, certs):
    """A Node in its own process space (its own state directory, so its own
    service token): the facade gets in with the service certificate only."""
    tls = dict(auth="token", tls_cert=str(certs / "service.crt"),
               tls_key=str(certs / "service.key"), tls_ca=str(certs / "ca.crt"))
    hv = FakeHypervisor()
    node = serve(make_settings(tmp_path / "node", services="node", node_id="remote-node",
                               initiator_iqn="iqn.2004-10.org.vmattach:remote-node",
                               detach_timeout=0.5, **tls), hypervisor=hv)
    running = serve(make_settings(tmp_path / "ctl", services="controller,servers",
                                  tgt_portal=tgtd.portal, tgt_control_port=tgtd.control_port,
                                  nodes=f"127.0.0.1:{node.port}", reconcile_interval=3600,
                                  **tls))
    token, _ = running.authenticator.tokens.create(PROJECT_A, "member")
    user = TlsFiles(str(certs / "client.crt"), str(certs / "client.key"), str(certs / "ca.crt"))
    server = hv.add_domain(project_id=PROJECT_A).uuid
    with VmattachClient(f"127.0.0.1:{running.port}", timeout=30, token=token, tls=user) as c:
        vol = c.create_volume("remote", 1).volume_id
        assert c.attach_volume(server, vol).state == types_pb2.ATTACHMENT_STATE_ATTACHED
        assert c.get_server(server).node_id == "remote-node"
        c.detach_volume(server, vol)
        assert c.get_volume(vol).status == types_pb2.VOLUME_STATUS_AVAILABLE
