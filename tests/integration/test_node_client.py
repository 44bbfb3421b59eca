"""The Node.js client (clients/node) against a live vmattach: its example
creates a volume, attaches it, decodes the ErrorInfo of a failed call,
detaches and deletes it. Needs node and clients/node/node_modules
(`make node-client`, part of `make test`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_settings
from tests.support.fake_hypervisor import FakeHypervisor
from vmattach.clients.client import VmattachClient

PACKAGE = Path(__file__).resolve().parents[2] / "clients" / "node"
TIMEOUT = 120


@pytest.fixture(autouse=True)
def _node_client():
    if shutil.which("node") is None:
        pytest.fail("node is missing: install Node.js 18+ (scripts/setup-host.sh)")
    if not (PACKAGE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail(f"{PACKAGE}/node_modules is missing: run `make node-client` (npm ci)")


def test_the_example_against_a_live_server(tmp_path, tgtd, serve):
    hv = FakeHypervisor()
    server_id = hv.add_domain("node-example").uuid
    settings = make_settings(tmp_path, tgt_portal=tgtd.portal, tgt_control_port=tgtd.control_port,
                             node_id="node-1", initiator_iqn="iqn.2004-10.org.vmattach:node-js",
                             reconcile_interval=3600)
    running = serve(settings, hypervisor=hv)
    address = f"127.0.0.1:{running.port}"
    proc = subprocess.run(["node", "example.js", address, server_id], cwd=PACKAGE, capture_output=True,
                          text=True, timeout=TIMEOUT, env={**os.environ, "VMATTACH_TOKEN": ""})
    assert proc.returncode == 0, proc.stderr
    steps = {s.pop("step"): s for s in map(json.loads, proc.stdout.splitlines())}
    assert list(steps) == ["create", "attach", "attach again fails", "detach", "delete"]
    volume_id = steps["create"]["volume_id"]
    assert steps["create"]["status"] == "VOLUME_STATUS_AVAILABLE"
    assert steps["attach"] == {"server_id": server_id, "device": "/dev/vdb",
                               "state": "ATTACHMENT_STATE_ATTACHED"}
    failed = steps["attach again fails"]
    assert failed["code"] == "ALREADY_EXISTS"
    assert f"volume {volume_id} already attached" in failed["message"]
    assert failed["error_info"]["domain"] == "vmattach.io"
    assert failed["error_info"]["reason"] == "VOLUME_ALREADY_ATTACHED"
    assert failed["details"][0] == "google.rpc.ErrorInfo"
    assert steps["detach"] == {"status": "VOLUME_STATUS_AVAILABLE", "attach_status": "ATTACH_STATUS_DETACHED"}
    assert steps["delete"] == {"volume_id": volume_id, "then": "VOLUME_NOT_FOUND"}
    # what the example did is what vmattach has: nothing left, the disk gone
    with VmattachClient(address, timeout=30) as client:
        assert list(client.list_volumes()) == []
    assert [d.serial for d in hv.get_domain(server_id).disks] == []
