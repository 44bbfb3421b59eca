"""`vmattach serve --services controller` as a real child process: the
printed address, settings from flags / environment / TOML file, SIGTERM, and
two Controller processes racing on one database (SQLite, PostgreSQL)."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.tgtd import free_ports
from tests.support.vmattach_process import VMATTACH, ServeProcess
from vmattach.common.grpcutil import channel
from vmattach.common.runner import CommandRunner
from vmattach.controller.tgt import TgtAdm
from vmattach.v1 import controller_pb2 as pb
from vmattach.v1 import controller_pb2_grpc, types_pb2

pytestmark = pytest.mark.realstack

TIMEOUT = 30


@pytest.fixture
def procs(tmp_path):
    """start(args, env) runs `vmattach serve`; every process is stopped after the test."""
    started: list[ServeProcess] = []

    def start(args: list[str] = (), env: dict[str, str] | None = None) -> ServeProcess:
        p = ServeProcess(list(args), tmp_path / f"serve-{len(started)}.log", env=env)
        started.append(p)
        return p

    yield start
    for p in reversed(started):
        p.stop()


def controller_flags(tmp_path, tgtd) -> list[str]:
    return ["--services", "controller", "--state-dir", str(tmp_path / "state"),
            "--tgt-portal", tgtd.portal, "--tgt-control-port", str(tgtd.control_port),
            "--log-level", "WARNING"]


def stub(address: str):
    ch = channel(address)
    return ch, controller_pb2_grpc.ControllerStub(ch)


def create(address: str, name: str, size_gb: int):
    ch, s = stub(address)
    try:
        return s.CreateVolume(pb.CreateVolumeRequest(name=name, size_gb=size_gb), timeout=TIMEOUT)
    finally:
        ch.close()


def test_serve_prints_its_address_serves_and_exits_0_on_sigterm(tmp_path, tgtd, procs):
    p = procs(["--listen", "127.0.0.1:0", *controller_flags(tmp_path, tgtd)])
    assert p.address, p.first_line
    host, port = p.address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    ch = channel(p.address)
    try:
        health = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="vmattach.v1.Controller"), timeout=TIMEOUT)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        vol = controller_pb2_grpc.ControllerStub(ch).CreateVolume(
            pb.CreateVolumeRequest(name="proc", size_gb=1), timeout=TIMEOUT)
        assert vol.status == types_pb2.VOLUME_STATUS_AVAILABLE
    finally:
        ch.close()
    assert (tmp_path / "state" / "volumes" / f"volume-{vol.volume_id}.img").exists()
    start = time.monotonic()
    assert p.terminate(timeout=15) == 0, p.log()
    assert time.monotonic() - start < 10


def test_serve_takes_its_settings_from_the_environment(tmp_path, tgtd, procs):
    [port] = free_ports(1)
    env = {"VMATTACH_LISTEN": f"127.0.0.1:{port}", "VMATTACH_SERVICES": "controller",
           "VMATTACH_STATE_DIR": str(tmp_path / "state"), "VMATTACH_TGT_PORTAL": tgtd.portal,
           "VMATTACH_TGT_CONTROL_PORT": str(tgtd.control_port), "VMATTACH_MAX_VOLUME_GB": "5",
           "VMATTACH_LOG_LEVEL": "WARNING"}
    p = procs([], env=env)
    assert p.first_line == f"listening on 127.0.0.1:{port}"
    assert create(p.address, "five", 5).size_gb == 5
    with pytest.raises(grpc.RpcError) as err:
        create(p.address, "six", 6)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "between 1 and 5" in err.value.details()
    assert p.terminate() == 0


def test_serve_takes_its_settings_from_a_toml_file_and_flags_win(tmp_path, tgtd, procs):
    [port] = free_ports(1)
    config = tmp_path / "vmattach.toml"
    config.write_text(
        f'listen = "127.0.0.1:{port}"\n'
        f'services = ["controller"]\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        f'tgt_portal = "{tgtd.portal}"\n'
        f'tgt_control_port = {tgtd.control_port}\n'
        f'max_volume_gb = 4\n'
        f'log_level = "WARNING"\n')
    p = procs(["--config", str(config)])
    assert p.first_line == f"listening on 127.0.0.1:{port}"
    with pytest.raises(grpc.RpcError) as err:
        create(p.address, "five", 5)
    assert "between 1 and 4" in err.value.details()
    assert p.terminate() == 0

    # the environment beats the file, a flag beats both
    p = procs(["--config", str(config), "--listen", "127.0.0.1:0", "--max-volume-gb", "6"],
              env={"VMATTACH_MAX_VOLUME_GB": "5", "VMATTACH_LISTEN": f"127.0.0.1:{port}"})
    assert p.address != f"127.0.0.1:{port}"
    assert create(p.address, "six", 6).size_gb == 6
    assert p.terminate() == 0


def test_serve_with_an_unreadable_config_exits_with_a_message(tmp_path):
    proc = subprocess.run([VMATTACH, "serve", "--config", str(tmp_path / "missing.toml")],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 1
    assert "cannot read config file" in proc.stderr
    assert proc.stdout == ""


def test_two_controller_processes_on_one_database_let_exactly_one_reserve_win(tmp_path, tgtd, procs):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    flags = ["--listen", "127.0.0.1:0", "--database-url", url, *controller_flags(tmp_path, tgtd)]
    a, b = procs(flags), procs(flags)
    vol = create(a.address, "contended", 1)
    channels = [channel(a.address), channel(b.address)]
    stubs = [controller_pb2_grpc.ControllerStub(ch) for ch in channels]
    n = 50
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def reserve(i: int) -> None:
        request = pb.ReserveVolumeRequest(volume_id=vol.volume_id, server_id=str(uuid.uuid4()))
        barrier.wait(timeout=TIMEOUT)
        try:
            results[i] = stubs[i % 2].ReserveVolume(request, timeout=TIMEOUT)
        except grpc.RpcError as err:
            results[i] = err

    try:
        for s in stubs:  # both processes are up and see the volume
            s.GetVolume(pb.GetVolumeRequest(volume_id=vol.volume_id), timeout=TIMEOUT)
        threads = [threading.Thread(target=reserve, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=2 * TIMEOUT)
        assert not any(t.is_alive() for t in threads)
        winners = [r for r in results if isinstance(r, pb.Volume)]
        losers = [r for r in results if isinstance(r, grpc.RpcError)]
        assert len(winners) == 1, [e.details() for e in losers][:3]
        assert {e.code() for e in losers} == {grpc.StatusCode.FAILED_PRECONDITION}
        [winner] = winners[0].attachments
        for s in stubs:
            got = s.GetVolume(pb.GetVolumeRequest(volume_id=vol.volume_id), timeout=TIMEOUT)
            assert got.status == types_pb2.VOLUME_STATUS_ATTACHING
            assert [x.server_id for x in got.attachments] == [winner.server_id]
    finally:
        for ch in channels:
            ch.close()
    assert a.terminate() == 0 and b.terminate() == 0


def test_two_controller_processes_publishing_one_multiattach_volume_share_one_target(
        tmp_path, tgtd, procs, database_url):
    """The same multiattach volume published to two hosts at the same moment
    through two Controller processes (one database, one tgtd, one state
    directory), round after round: both get the same target and credentials,
    and tgtd has that one target, complete, allowing both hosts (it used to
    fail with an IntegrityError on controller_export.volume_id, and a loser
    could remove the winner's target)."""
    flags = ["--listen", "127.0.0.1:0", "--database-url", database_url,
             *controller_flags(tmp_path, tgtd)]
    a, b = procs(flags), procs(flags)
    channels = [channel(a.address), channel(b.address)]
    stubs = [controller_pb2_grpc.ControllerStub(ch) for ch in channels]
    tgtadm = TgtAdm(CommandRunner(), tgtd.control_port)

    def connector(tag: str) -> types_pb2.Connector:
        return types_pb2.Connector(initiator=f"iqn.1993-08.org.debian:01:host-{tag}",
                                   ip="127.0.0.1", host=f"host-{tag}")

    try:
        for round_ in range(15):
            vol = stubs[0].CreateVolume(pb.CreateVolumeRequest(
                name=f"shared-{round_}", size_gb=1, multiattach=True), timeout=TIMEOUT)
            s1, s2 = str(uuid.uuid4()), str(uuid.uuid4())
            stubs[0].ReserveVolume(pb.ReserveVolumeRequest(volume_id=vol.volume_id,
                                                           server_id=s1), timeout=TIMEOUT)
            stubs[0].MarkAttached(pb.MarkAttachedRequest(
                volume_id=vol.volume_id, server_id=s1, mountpoint="/dev/vdb"), timeout=TIMEOUT)
            stubs[1].ReserveVolume(pb.ReserveVolumeRequest(volume_id=vol.volume_id,
                                                           server_id=s2), timeout=TIMEOUT)
            barrier = threading.Barrier(2)
            results: list[object] = [None, None]

            def publish(i: int, server_id: str, vol=vol, barrier=barrier,
                        results=results) -> None:
                request = pb.ControllerPublishVolumeRequest(
                    volume_id=vol.volume_id, server_id=server_id, connector=connector(str(i)))
                barrier.wait(timeout=TIMEOUT)
                try:
                    results[i] = stubs[i].ControllerPublishVolume(request, timeout=TIMEOUT)
                except grpc.RpcError as err:
                    results[i] = err

            threads = [threading.Thread(target=publish, args=(0, s1)),
                       threading.Thread(target=publish, args=(1, s2))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=2 * TIMEOUT)
            errors = [r.details() for r in results if isinstance(r, grpc.RpcError)]
            assert not errors, errors
            first, second = (r.connection_info.data for r in results)
            assert (first.target_iqn, first.auth_username, first.auth_password) == \
                (second.target_iqn, second.auth_username, second.auth_password)
            [target] = [t for t in tgtadm.show().values() if t.iqn == first.target_iqn]
            assert list(target.luns) == [1]
            assert target.accounts == [first.auth_username]
            assert sorted(target.acls) == [connector("0").initiator, connector("1").initiator]
        assert len(tgtadm.show()) == 15
    finally:
        for ch in channels:
            ch.close()
    assert a.terminate() == 0 and b.terminate() == 0
