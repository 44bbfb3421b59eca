"""Mutual TLS: `vmattach pki init`, a server that requires a client
certificate signed by its CA, the service kind of certificate, and the
refusal to listen on the network in plain text."""

from __future__ import annotations

import dataclasses
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import make_settings
from tests.support.fake_hypervisor import FakeHypervisor
from vmattach.clients.serve import start
from vmattach.common import pki
from vmattach.common.config import Settings
from vmattach.common.errors import InvalidArgument
from vmattach.common.grpcutil import call, channel
from vmattach.common.tls import TlsFiles
from vmattach.v1 import node_pb2, node_pb2_grpc

VMATTACH = str(Path(sys.executable).with_name("vmattach"))


@pytest.fixture(scope="module")
def pkis(tmp_path_factory):
    """Two deployments' certificates: ours, and another CA's."""
    ours = tmp_path_factory.mktemp("pki-ours")
    other = tmp_path_factory.mktemp("pki-other")
    pki.init(ours, ["127.0.0.1", "localhost"])
    pki.init(other, ["127.0.0.1"])
    return ours, other


def tls_node(tmp_path, serve, d: Path, **kw):
    settings = make_settings(tmp_path, services="node", auth="token", node_id="tls-node",
                             initiator_iqn="iqn.2004-10.org.vmattach:tls-node",
                             tls_cert=str(d / "service.crt"), tls_key=str(d / "service.key"),
                             tls_ca=str(d / "ca.crt"), **kw)
    running = serve(settings, hypervisor=FakeHypervisor())
    return f"127.0.0.1:{running.port}"


def info(address: str, files: TlsFiles | None) -> node_pb2.NodeGetInfoResponse:
    ch = channel(address, retries=False, tls=files)
    try:
        return call(node_pb2_grpc.NodeStub(ch).NodeGetInfo, node_pb2.NodeGetInfoRequest(),
                    timeout=10)
    finally:
        ch.close()


def test_pki_init_writes_the_ca_and_both_certificates_owner_only(tmp_path):
    out = tmp_path / "pki"
    rc = subprocess.run([VMATTACH, "pki", "init", str(out), "--hosts", "127.0.0.1,node-1.example"],
                        capture_output=True, text=True, timeout=60)
    assert rc.returncode == 0, rc.stderr
    for name in pki.FILES:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    again = subprocess.run([VMATTACH, "pki", "init", str(out), "--hosts", "127.0.0.1"],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "not overwriting" in again.stderr


def test_a_service_certificate_of_our_ca_is_answered(tmp_path, serve, pkis):
    ours, _ = pkis
    address = tls_node(tmp_path, serve, ours)
    files = TlsFiles(str(ours / "service.crt"), str(ours / "service.key"), str(ours / "ca.crt"))
    assert info(address, files).node_id == "tls-node"


def test_handshake_refused_without_a_client_certificate(tmp_path, serve, pkis):
    ours, _ = pkis
    address = tls_node(tmp_path, serve, ours)
    with pytest.raises(grpc.RpcError) as err:
        ch = channel(address, retries=False, tls=TlsFiles(ca=str(ours / "ca.crt")))
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_handshake_refused_with_a_certificate_of_another_ca(tmp_path, serve, pkis):
    ours, other = pkis
    address = tls_node(tmp_path, serve, ours)
    # the other deployment's service certificate, trusting our CA for the server
    files = TlsFiles(str(other / "service.crt"), str(other / "service.key"), str(ours / "ca.crt"))
    ch = channel(address, retries=False, tls=files)
    with pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_plain_text_client_is_refused(tmp_path, serve, pkis):
    ours, _ = pkis
    address = tls_node(tmp_path, serve, ours)
    with pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(channel(address, retries=False)).Check(
            health_pb2.HealthCheckRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_server_that_trusts_another_ca_is_not_trusted_by_the_client(tmp_path, serve, pkis):
    ours, other = pkis
    address = tls_node(tmp_path, serve, other)
    files = TlsFiles(str(ours / "service.crt"), str(ours / "service.key"), str(ours / "ca.crt"))
    with pytest.raises(Exception) as err:
        info(address, files)
    assert "UNAVAILABLE" in type(err.value).__name__.upper() or "Unavailable" in repr(err.value)


def test_non_loopback_listen_without_tls_is_refused(tmp_path):
    settings = Settings(listen="0.0.0.0:0", state_dir=str(tmp_path / "s"), services="node")
    with pytest.raises(InvalidArgument, match="without TLS"):
        start(settings, hypervisor=FakeHypervisor())
    proc = subprocess.run([VMATTACH, "serve", "--listen", "0.0.0.0:0", "--services", "node",
                           "--state-dir", str(tmp_path / "s2")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--insecure" in lines[0], proc.stderr


def test_auth_none_is_refused_off_loopback(tmp_path, pkis):
    ours, _ = pkis
    settings = Settings(listen="0.0.0.0:0", state_dir=str(tmp_path / "s"), services="node",
                        auth="none", tls_cert=str(ours / "service.crt"),
                        tls_key=str(ours / "service.key"), tls_ca=str(ours / "ca.crt"))
    with pytest.raises(InvalidArgument, match="auth none"):
        start(settings, hypervisor=FakeHypervisor())


def test_tls_settings_come_from_env_and_toml(tmp_path, pkis):
    from vmattach.common import config
    ours, _ = pkis
    toml = tmp_path / "vmattach.toml"
    toml.write_text(f'tls_cert = "{ours}/service.crt"\ntls-key = "{ours}/service.key"\n'
                    'insecure = true\n')
    settings = config.load(None, {"VMATTACH_CONFIG": str(toml),
                                  "VMATTACH_TLS_CA": str(ours / "ca.crt")})
    assert settings.tls_cert.endswith("service.crt") and settings.tls_key.endswith("service.key")
    assert settings.tls_ca.endswith("ca.crt") and settings.insecure is True


@pytest.mark.realstack  # the Controller runs on a real (private) tgtd
def test_audit_with_the_settings_of_a_server_on_a_wildcard_listen(tmp_path, tgtd, serve, pkis,
                                                                  capsys):
    """docs/security.md's one-host TLS deployment (listen 0.0.0.0, 127.0.0.1
    among the certificate's hosts): `vmattach audit` with the same settings
    reaches it at 127.0.0.1, which the certificate names (0.0.0.0 it does not)."""
    from vmattach.server import audit
    ours, _ = pkis
    settings = make_settings(tmp_path, auth="token", listen="0.0.0.0:0", tgt_portal=tgtd.portal,
                             tgt_control_port=tgtd.control_port, node_id="tls-node",
                             initiator_iqn="iqn.2004-10.org.vmattach:tls-node",
                             tls_cert=str(ours / "service.crt"), tls_key=str(ours / "service.key"),
                             tls_ca=str(ours / "ca.crt"))
    running = serve(settings, hypervisor=FakeHypervisor())
    same = dataclasses.replace(settings, listen=f"0.0.0.0:{running.port}")
    assert audit.run(same, False) == 0
    assert "audit: no divergence (the Controller and 1 node(s) checked)" in capsys.readouterr().out
