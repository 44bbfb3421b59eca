"""Builders shared by the Node's unit tests."""

from __future__ import annotations

import tempfile
import uuid

from tests.support.fake_hypervisor import FakeHypervisor
from tests.support.fake_runner import FakeRunner
from vmattach.node.connectors import ConnectionInfo, make_factory
from vmattach.node.manager import NodeConfig, NodeManager

NODE_IQN = "iqn.2004-10.org.vmattach:testhost-0123456789ab"
PORTAL = "127.0.0.1:3260"
CHAP_USER = "chapuser0123456789ab"
CHAP_PASSWORD = "Secr3tPassw0rdXYZ123"


def new_id() -> str:
    return str(uuid.uuid4())


def target_iqn(volume_id: str) -> str:
    return f"iqn.2010-10.org.openstack:volume-{volume_id}"


def iscsi_info(volume_id: str, **overrides) -> ConnectionInfo:
    values = dict(driver_volume_type="iscsi", target_portal=PORTAL,
                  target_iqn=target_iqn(volume_id), target_lun=1, auth_method="CHAP",
                  auth_username=CHAP_USER, auth_password=CHAP_PASSWORD, serial=volume_id)
    values.update(overrides)
    return ConnectionInfo(**values)


def file_info(path: str, **overrides) -> ConnectionInfo:
    return ConnectionInfo(**{"driver_volume_type": "file", "device_path": str(path), **overrides})


def make_manager(hypervisor: FakeHypervisor | None = None, *, iscsi_connector: str = "qemu",
                 runner: FakeRunner | None = None, **config) -> NodeManager:
    hypervisor = hypervisor or FakeHypervisor()
    values = dict(node_id="node-1", node_ip="127.0.0.1", initiator_iqn=NODE_IQN,
                  detach_timeout=0.01, detach_retries=3)
    values.update(config)
    # file volumes from anywhere under the temporary directory of the tests
    factory = make_factory(iscsi_connector, hypervisor, runner or FakeRunner(), NODE_IQN,
                           [tempfile.gettempdir()])
    return NodeManager(NodeConfig(**values), hypervisor, factory)
