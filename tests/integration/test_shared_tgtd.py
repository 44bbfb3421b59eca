"""Two Controllers (two `vmattach serve` processes) with their own databases
on one (real, private) tgtd, and a target a cinder-volume made there with
the same IQN prefix: each Controller reconciling (at its start) keeps its
own targets, removes only an orphan of its own volumes, and never touches
the others'."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from tests.support.vmattach_process import ServeProcess
from vmattach.common.grpcutil import call, channel
from vmattach.common.runner import CommandRunner
from vmattach.controller.tgt import IQN_PREFIX, TgtAdm
from vmattach.v1 import controller_pb2 as pb
from vmattach.v1 import controller_pb2_grpc, types_pb2

TIMEOUT = 30


@pytest.fixture
def controllers(tmp_path, tgtd):
    """start(name): a Controller process with its own state directory (and
    SQLite database) on the test's tgtd; started again with the same name,
    the previous one stops first. All stop after the test."""
    running: dict[str, ServeProcess] = {}

    def start(name: str) -> ServeProcess:
        if name in running:
            running.pop(name).stop()
        running[name] = ServeProcess(
            ["--services", "controller", "--listen", "127.0.0.1:0",
             "--state-dir", str(tmp_path / name), "--tgt-portal", tgtd.portal,
             "--tgt-control-port", str(tgtd.control_port), "--reconcile-interval", "3600",
             "--log-level", "WARNING"], tmp_path / f"{name}.log")
        return running[name]

    yield start
    for proc in running.values():
        proc.stop()


def stub(proc: ServeProcess):
    return controller_pb2_grpc.ControllerStub(channel(proc.address))


def export(api, name: str, host: str) -> tuple[str, str]:
    """A volume reserved and published to host's initiator: (volume id, IQN)."""
    vol = call(api.CreateVolume, pb.CreateVolumeRequest(name=name, size_gb=1), timeout=TIMEOUT)
    server = str(uuid.uuid4())
    call(api.ReserveVolume, pb.ReserveVolumeRequest(volume_id=vol.volume_id, server_id=server),
         timeout=TIMEOUT)
    connector = types_pb2.Connector(initiator=f"iqn.1993-08.org.debian:01:{host}", ip="127.0.0.1",
                                    host=host)
    info = call(api.ControllerPublishVolume, pb.ControllerPublishVolumeRequest(
        volume_id=vol.volume_id, server_id=server, connector=connector), timeout=TIMEOUT)
    return vol.volume_id, info.connection_info.data.target_iqn


def test_two_controllers_and_cinder_share_one_tgtd(tgtd, controllers):
    tgtadm = TgtAdm(CommandRunner(), tgtd.control_port)
    # cinder-volume's target: same prefix, tid 1 (the tid both Controllers' first export asks for)
    cinder_iqn = IQN_PREFIX + str(uuid.uuid4())
    subprocess.run(["tgtadm", "--control-port", str(tgtd.control_port), "--lld", "iscsi",
                    "--mode", "target", "--op", "new", "--tid", "1", "--targetname", cinder_iqn],
                   check=True, capture_output=True)

    api_a, api_b = stub(controllers("a")), stub(controllers("b"))
    exported_a = [export(api_a, f"a{i}", "host-a") for i in range(2)]
    exported_b = [export(api_b, f"b{i}", "host-b") for i in range(2)]
    # an orphan of A's: A's volume, its target made but its export never committed
    orphan = call(api_a.CreateVolume, pb.CreateVolumeRequest(name="orphan", size_gb=1),
                  timeout=TIMEOUT).volume_id
    subprocess.run(["tgtadm", "--control-port", str(tgtd.control_port), "--lld", "iscsi",
                    "--mode", "target", "--op", "new", "--tid", "99", "--targetname",
                    IQN_PREFIX + orphan], check=True, capture_output=True)

    def targets():
        return {t.iqn: t for t in tgtadm.show().values()}

    expected = {cinder_iqn} | {iqn for _, iqn in exported_a + exported_b}
    present = targets()
    assert expected | {IQN_PREFIX + orphan} == set(present)
    assert present[cinder_iqn].tid == 1 and present[cinder_iqn].acls == []
    for _, iqn in exported_a:
        assert present[iqn].acls == ["iqn.1993-08.org.debian:01:host-a"]
    for _, iqn in exported_b:
        assert present[iqn].acls == ["iqn.1993-08.org.debian:01:host-b"]

    # B reconciles (a restart runs it at once): A's orphan is not B's to remove
    controllers("b")
    assert set(targets()) == expected | {IQN_PREFIX + orphan}
    # A reconciles: its orphan goes, nothing else
    controllers("a")
    present = targets()
    assert set(present) == expected
    assert present[cinder_iqn].tid == 1
    for _, iqn in exported_a:
        assert present[iqn].acls == ["iqn.1993-08.org.debian:01:host-a"]
    for _, iqn in exported_b:
        assert present[iqn].acls == ["iqn.1993-08.org.debian:01:host-b"]

    # a restarted tgtd: each Controller re-creates its own targets only, at free tids
    tgtd.stop()
    tgtd.start()
    subprocess.run(["tgtadm", "--control-port", str(tgtd.control_port), "--lld", "iscsi",
                    "--mode", "target", "--op", "new", "--tid", "1", "--targetname", cinder_iqn],
                   check=True, capture_output=True)
    controllers("a")
    controllers("b")
    present = targets()
    assert set(present) == expected
    assert present[cinder_iqn].tid == 1
    assert len({t.tid for t in present.values()}) == len(present)
