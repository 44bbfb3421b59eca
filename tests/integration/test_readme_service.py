"""The README's "Running it" command, as written, on a fresh state directory
(and a free port instead of 50051, which another test may hold), against the
host's tgtd and libvirtd that scripts/setup-host.sh leaves running, with
its secure default (a user token from `vmattach token create`; the
Controller's internal calls with the service token, as the facade makes
them)."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import need
from tests.support.tgtd import free_ports
from tests.support.vmattach_process import VMATTACH, ServeProcess
from vmattach.common.auth import SERVICE_HEADER
from vmattach.common.errors import Unauthenticated
from vmattach.common.grpcutil import call, channel
from vmattach.v1 import controller_pb2 as cpb
from vmattach.v1 import controller_pb2_grpc, servers_pb2, servers_pb2_grpc, types_pb2

README = Path(__file__).resolve().parents[2] / "README.md"
TIMEOUT = 30


def readme_serve_command() -> list[str]:
    """The `vmattach serve` command of the README's "Running it" section."""
    section = README.read_text().split("## Running it", 1)[1]
    m = re.search(r"^    (vmattach serve .*?)(?<!\\)\n", section, re.M | re.S)
    assert m, "README's Running it section has no `vmattach serve` command"
    return shlex.split(m.group(1).replace("\\\n", " "))


def host_tgtd_answers() -> bool:
    return subprocess.run(["tgtadm", "--lld", "iscsi", "--mode", "target", "--op", "show"],
                          capture_output=True, timeout=10).returncode == 0


def test_the_readme_command_serves_on_a_fresh_machine(tmp_path):
    need("tgtd", "tgtadm", "virsh")
    if not host_tgtd_answers():
        need("no-host-tgtd (run scripts/setup-host.sh: it leaves tgtd running)")
    argv = readme_serve_command()
    assert argv[:2] == ["vmattach", "serve"]
    assert "--state-dir" in argv and "--listen" in argv
    argv[argv.index("--state-dir") + 1] = str(tmp_path / "state")
    assert argv[argv.index("--listen") + 1] == "127.0.0.1:50051"
    argv[argv.index("--listen") + 1] = "127.0.0.1:0"
    state = tmp_path / "state"
    created = subprocess.run([VMATTACH, "token", "create", "--state-dir", str(state),
                              "--project", "demo", "--role", "admin"],
                             capture_output=True, text=True, timeout=TIMEOUT, check=True)
    user = [("authorization", f"Bearer {created.stdout.strip()}")]
    proc = ServeProcess(argv[2:], tmp_path / "serve.log", command=[VMATTACH, "serve"],
                        env={"VMATTACH_AUTH": "token"})
    try:
        assert proc.address, proc.first_line
        service = [(SERVICE_HEADER, (state / "service.token").read_text().strip())]
        ch = channel(proc.address)
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "vmattach.v1.Controller", "vmattach.v1.Node", "vmattach.v1.Servers"):
            answer = call(health.Check, health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        # the Controller exports on the host's tgtd (what failed before it was started)
        controller = controller_pb2_grpc.ControllerStub(ch)
        with pytest.raises(Unauthenticated):  # the secure default: no token, no answer
            call(controller.ListVolumes, cpb.ListVolumesRequest(), timeout=TIMEOUT)
        vol = call(controller.CreateVolume, cpb.CreateVolumeRequest(name="readme", size_gb=1),
                   timeout=TIMEOUT, metadata=user)
        server = str(uuid.uuid4())
        connector = types_pb2.Connector(initiator="iqn.1993-08.org.debian:01:readme-test",
                                        ip="127.0.0.1", host="readme-test")
        call(controller.ReserveVolume, cpb.ReserveVolumeRequest(
            volume_id=vol.volume_id, server_id=server), timeout=TIMEOUT, metadata=service)
        info = call(controller.ControllerPublishVolume, cpb.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, server_id=server, connector=connector), timeout=TIMEOUT,
            metadata=service)
        assert info.connection_info.data.target_portal == "127.0.0.1:3260"
        call(controller.ControllerUnpublishVolume, cpb.ControllerUnpublishVolumeRequest(
            volume_id=vol.volume_id, server_id=server, connector=connector), timeout=TIMEOUT,
            metadata=service)
        call(controller.UnreserveVolume, cpb.UnreserveVolumeRequest(
            volume_id=vol.volume_id, server_id=server), timeout=TIMEOUT, metadata=service)
        call(controller.DeleteVolume, cpb.DeleteVolumeRequest(volume_id=vol.volume_id),
             timeout=TIMEOUT, metadata=user)
        # the facade answers from the node of its own process
        servers = servers_pb2_grpc.ServersStub(ch)
        call(servers.ListServers, servers_pb2.ListServersRequest(), timeout=TIMEOUT,
             metadata=user)
        ch.close()
        # SIGTERM: a graceful stop (the facade's NodeWatchServers stream to its own
        # Node may hold the exit until the stream's 20 s turn ends)
        assert proc.terminate(timeout=60) == 0
    finally:
        proc.stop()


# -- the README's commands, as a newcomer pastes them -----------------------------------------


def readme_block(first_line: str) -> list[str]:
    """The README code block that begins with first_line, as command lines
    (continuations kept as they are written)."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(first_line))
    block = []
    for line in lines[start:]:
        if not line.startswith("    "):
            break
        block.append(line[4:])
    return block


def test_the_readme_quick_start_pasted_into_a_shell(tmp_path):
    """The Quick start block (serve in the background and at once the CLI,
    grpcurl and curl), then the blocks of reflection, health and the CLI
    section without placeholders: only the state directory and the ports
    are changed, so that the test shares the machine."""
    need("tgtd", "tgtadm", "virsh", "curl")
    if not host_tgtd_answers():
        need("no-host-tgtd (run scripts/setup-host.sh: it leaves tgtd running)")
    port, metrics_port = free_ports(2)
    state = tmp_path / "state"
    script = readme_block("export VMATTACH_TOKEN=$(vmattach token create --state-dir")
    assert any(line.startswith("vmattach serve") for line in script)
    assert any(line.rstrip().endswith(" &") for line in script)
    script += ["serve=$!"]
    script += readme_block("grpcurl -plaintext 127.0.0.1:50051 list")
    script += readme_block("""grpcurl -plaintext -d '{"service":""")
    script += [line for line in readme_block("export VMATTACH_ADDRESS=")
               if not re.search(r"[A-Z]_ID|\[|\|", line)]
    script += ['kill -TERM "$serve"; wait "$serve"; echo "serve exited $?"']
    text = ("\n".join(script).replace("127.0.0.1:50051", f"127.0.0.1:{port}")
            .replace("127.0.0.1:9150", f"127.0.0.1:{metrics_port}")
            .replace("/var/lib/vmattach", str(state)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMATTACH_")}
    env["PATH"] = f"{Path(VMATTACH).parent}:{env['PATH']}"  # what `. .venv/bin/activate` does
    env["VMATTACH_ADDRESS"] = f"127.0.0.1:{port}"  # the CLI's default address, 127.0.0.1:50051
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.run(["bash", "-c", text], stdout=stdout, stderr=stderr, env=env,
                              timeout=180)
    printed, logged = out.read_text(), err.read_text()
    assert proc.returncode == 0, printed + logged
    assert f"listening on 127.0.0.1:{port}\n" in printed
    assert f"metrics on 127.0.0.1:{metrics_port}\n" in printed
    # the CLI's volume create, sent at once after the server was put in the background
    assert re.search(r"^\| name +\| data1 +\|$", printed, re.M), printed + logged
    assert not re.search(r"^vmattach: ", logged, re.M), logged  # no CLI error
    # grpcurl: the facade answered with the request id, logged as JSON lines
    calls = [json.loads(line) for line in logged.splitlines() if line.startswith("{")]
    assert any(c.get("request_id") == "req-1234" and c.get("grpc_method") == "ListServers"
               and c.get("grpc_code") == "OK" for c in calls)
    # a clean start on a healthy host warns of nothing
    assert [c["message"] for c in calls if c["level"] in ("WARNING", "ERROR")] == []
    # curl: the calls counted
    assert re.search(r'^grpc_server_handled_total\{grpc_code="OK",grpc_method="CreateVolume",'
                     r'grpc_service="vmattach.v1.Controller",grpc_type="unary"\} ', printed, re.M)
    # reflection lists the three services; health says SERVING
    for service in ("vmattach.v1.Controller", "vmattach.v1.Node", "vmattach.v1.Servers",
                    "grpc.health.v1.Health"):
        assert f"\n{service}\n" in printed
    assert '"status": "SERVING"' in printed
    # the CLI section: server list is a table
    assert "| server_id " in printed
    assert printed.rstrip().endswith("serve exited 0")


def test_serve_on_a_port_in_use_says_so_without_a_traceback(tmp_path):
    """The README's serve started twice: the second one names the port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        proc = subprocess.run([VMATTACH, "serve", "--state-dir", str(tmp_path / "state"),
                               "--listen", address], capture_output=True, text=True,
                              timeout=TIMEOUT)
    assert proc.returncode == 1 and proc.stdout == ""
    assert f"vmattach: cannot listen on {address}: the port is in use" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_with_its_metrics_port_in_use_starts_nothing(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics = f"127.0.0.1:{taken.getsockname()[1]}"
        proc = subprocess.run([VMATTACH, "serve", "--state-dir", str(tmp_path / "state"),
                               "--listen", "127.0.0.1:0", "--metrics-listen", metrics],
                              capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 1
    assert proc.stdout == ""  # no `listening on` of a server that is not there
    assert f"vmattach: cannot serve metrics on {metrics}: Address already in use" in proc.stderr
    assert "Traceback" not in proc.stderr
