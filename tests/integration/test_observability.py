"""What an operator sees of three services in three processes (Controller
and facade as `vmattach serve`, the Node on the fake hypervisor): one
request id in the JSON log lines of all three for one attach and in an
error's ErrorInfo; the Prometheus metrics of an attach and of a failed one."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
import uuid

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.support.fake_node_server import server_uuids
from tests.support.tgtd import TgtDaemon
from tests.support.vmattach_process import VMATTACH, ServeProcess
from vmattach.common.grpcutil import channel
from vmattach.v1 import controller_pb2 as cpb
from vmattach.v1 import controller_pb2_grpc, node_pb2, node_pb2_grpc, servers_pb2, servers_pb2_grpc

TIMEOUT = 60
METRICS_RE = re.compile(r"^metrics on (\S+:\d+)$")


class Stack:
    def __init__(self, tmp_path, tgtd: TgtDaemon):
        self.procs: list[ServeProcess] = []
        self.tmp_path = tmp_path
        common = ["--listen", "127.0.0.1:0", "--log-format", "json", "--log-level", "INFO",
                  "--metrics-listen", "127.0.0.1:0"]
        self.controller = self._start(
            [*common, "--services", "controller", "--state-dir", str(tmp_path / "c"),
             "--tgt-portal", tgtd.portal, "--tgt-control-port", str(tgtd.control_port)],
            tmp_path / "controller.log")
        seed = uuid.uuid4().hex[:8]
        self.servers = server_uuids(seed, 2)
        self.node = self._start(
            [*common, "--services", "node", "--state-dir", str(tmp_path / "n"),
             "--node-id", "node-1", "--servers", "2", "--seed", seed],
            tmp_path / "node.log", command=[sys.executable, "-m", "tests.support.fake_node_server"])
        self.facade = self._start(
            [*common, "--services", "servers", "--state-dir", str(tmp_path / "f"),
             "--controller-address", self.controller.address, "--nodes", self.node.address],
            tmp_path / "facade.log")
        self.channel = channel(self.facade.address)
        self.servers_api = servers_pb2_grpc.ServersStub(self.channel)
        self.controller_channel = channel(self.controller.address)
        self.controller_api = controller_pb2_grpc.ControllerStub(self.controller_channel)

    def _start(self, args, log, command=None) -> ServeProcess:
        proc = ServeProcess(args, log, command=command, timeout=TIMEOUT)
        self.procs.append(proc)
        assert proc.address, proc.first_line
        m = METRICS_RE.match(proc.read_line())
        assert m, "the line after `listening on` names the metrics address"
        proc.metrics = m.group(1)
        return proc

    def volume(self, name: str) -> str:
        return self.controller_api.CreateVolume(cpb.CreateVolumeRequest(name=name, size_gb=1),
                                                timeout=TIMEOUT).volume_id

    def close(self) -> None:
        self.channel.close()
        self.controller_channel.close()
        for proc in self.procs:
            proc.stop()


@pytest.fixture
def stack(tmp_path, tgtd):
    s = Stack(tmp_path, tgtd)
    yield s
    s.close()


def json_lines(proc: ServeProcess) -> list[dict]:
    proc._log.flush()
    lines = []
    for raw in proc.log_path.read_text().splitlines():
        lines.append(json.loads(raw))  # every line is one JSON object
    return lines


def scrape(proc: ServeProcess) -> str:
    with urllib.request.urlopen(f"http://{proc.metrics}/metrics", timeout=TIMEOUT) as answer:
        assert answer.status == 200
        return answer.read().decode()


def sample(text: str, name: str, **labels) -> float:
    """The sum of the samples of name whose labels include labels."""
    values = []
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        head, value = line.rsplit(" ", 1)
        found = dict(re.findall(r'(\w+)="([^"]*)"', head))
        if all(found.get(k) == v for k, v in labels.items()):
            values.append(float(value))
    assert values, f"no sample {name}{labels}"
    return sum(values)


def test_one_request_id_follows_an_attach_through_all_three_services(stack):
    volume = stack.volume("traced")
    rid = "req-" + uuid.uuid4().hex
    stack.servers_api.AttachVolume(servers_pb2.AttachVolumeRequest(
        server_id=stack.servers[0], volume_id=volume), metadata=[("x-request-id", rid)],
        timeout=TIMEOUT)
    for proc, method in ((stack.facade, "AttachVolume"), (stack.controller, "CreateAttachment"),
                         (stack.node, "NodePublishVolume")):
        lines = [line for line in json_lines(proc) if line["request_id"] == rid]
        assert any(line.get("grpc_method") == method and line.get("grpc_code") == "OK"
                   for line in lines), f"{proc.log_path.name} has no {method} line for {rid}"
    # health checks are polled often: no INFO line for them
    assert not [line for proc in stack.procs for line in json_lines(proc)
                if "Health" in line.get("grpc_service", "") and line["level"] == "INFO"]

    # an error carries the request id in its ErrorInfo (a made-up one when none is sent)
    for metadata in ([("x-request-id", "req-failing-1")], None):
        with pytest.raises(grpc.RpcError) as err:
            stack.servers_api.AttachVolume(servers_pb2.AttachVolumeRequest(
                server_id=stack.servers[0], volume_id=str(uuid.uuid4())), metadata=metadata,
                timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        [detail] = rpc_status.from_call(err.value).details
        info = error_details_pb2.ErrorInfo()
        detail.Unpack(info)
        returned = info.metadata["request_id"]
        assert returned == "req-failing-1" if metadata else returned.startswith("req-")
        # the Controller's line of the failing CreateAttachment has the same id
        assert any(line["request_id"] == returned and line.get("grpc_code") == "NOT_FOUND"
                   for line in json_lines(stack.controller))


def test_the_version_is_the_same_in_the_cli_and_in_node_get_info(stack):
    printed = subprocess.run([VMATTACH, "--version"], capture_output=True, text=True,
                             timeout=TIMEOUT, check=True).stdout.strip()
    assert re.fullmatch(r"vmattach \d+\.\d+\.\d+\S*", printed)
    ch = channel(stack.node.address)
    try:
        info = node_pb2_grpc.NodeStub(ch).NodeGetInfo(node_pb2.NodeGetInfoRequest(),
                                                      timeout=TIMEOUT)
    finally:
        ch.close()
    assert info.version == printed.removeprefix("vmattach ")


def test_metrics_after_an_attach_and_a_failed_attach(stack):
    volume = stack.volume("measured")
    stack.servers_api.AttachVolume(servers_pb2.AttachVolumeRequest(
        server_id=stack.servers[1], volume_id=volume), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError):
        stack.servers_api.AttachVolume(servers_pb2.AttachVolumeRequest(
            server_id=stack.servers[1], volume_id=str(uuid.uuid4())), timeout=TIMEOUT)

    facade = scrape(stack.facade)
    servers = {"grpc_service": "vmattach.v1.Servers", "grpc_method": "AttachVolume"}
    assert sample(facade, "grpc_server_handled_total", grpc_code="OK", **servers) == 1
    assert sample(facade, "grpc_server_handled_total", grpc_code="NOT_FOUND", **servers) == 1
    assert sample(facade, "grpc_server_handling_seconds_count", grpc_code="OK", **servers) == 1
    assert sample(facade, "grpc_server_handling_seconds_bucket", grpc_code="OK", le="+Inf",
                  **servers) == 1
    # the facade's own calls
    assert sample(facade, "grpc_client_handled_total", grpc_service="vmattach.v1.Controller",
                  grpc_method="CreateAttachment", grpc_code="OK") == 1
    assert sample(facade, "grpc_client_handled_total", grpc_service="vmattach.v1.Controller",
                  grpc_method="CreateAttachment", grpc_code="NOT_FOUND") == 1
    assert sample(facade, "grpc_client_handling_seconds_count",
                  grpc_service="vmattach.v1.Node", grpc_method="NodePublishVolume") == 1
    for step in ("node_publish", "mark_attached"):
        assert sample(facade, "vmattach_attach_step_seconds_count", step=step) == 1
    # the failed attach ended in its create_attachment
    assert sample(facade, "vmattach_attach_step_seconds_count", step="create_attachment") == 2
    assert sample(facade, "vmattach_operations_total", operation="attach", result="OK") == 1
    assert sample(facade, "vmattach_operations_total", operation="attach",
                  result="NOT_FOUND") == 1
    assert "# TYPE vmattach_reconciler_recovered_total counter" in facade
    # the background loops' rounds: the servers refresh runs once as the facade starts
    assert sample(facade, "vmattach_background_round_seconds_count", round="server-refresh") >= 1

    controller = scrape(stack.controller)
    assert sample(controller, "grpc_server_handled_total", grpc_service="vmattach.v1.Controller",
                  grpc_method="CreateAttachment", grpc_code="OK") == 1
    node = scrape(stack.node)
    assert sample(node, "grpc_server_handled_total", grpc_service="vmattach.v1.Node",
                  grpc_method="NodePublishVolume", grpc_code="OK") == 1

    # the audit's divergence count, for node_exporter's textfile collector
    prom = stack.tmp_path / "audit.prom"
    audit = subprocess.run(
        [VMATTACH, "audit", "--state-dir", str(stack.tmp_path / "f"), "--controller-address",
         stack.controller.address, "--nodes", stack.node.address, "--metrics-file", str(prom)],
        capture_output=True, text=True, timeout=TIMEOUT)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert sample(prom.read_text() + "\n", "vmattach_audit_divergences") == 0
    assert "vmattach_audit_last_run_timestamp_seconds" in prom.read_text()
