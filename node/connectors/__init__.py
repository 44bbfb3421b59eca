"""Volume connectors, one per driver_volume_type (os-brick style), and the
factory that picks one."""

from __future__ import annotations

import os
from collections.abc import Sequence

from vmattach.common.errors import InvalidArgument
from vmattach.common.runner import CommandRunner
from vmattach.node.connectors.base import ConnectionInfo, StagedVolume, VolumeConnector
from vmattach.node.connectors.file import FileConnector
from vmattach.node.connectors.iscsi_kernel import KernelIscsiConnector
from vmattach.node.connectors.iscsi_qemu import QemuIscsiConnector
from vmattach.node.hypervisor import Hypervisor

ISCSI_CONNECTORS = ("qemu", "kernel")


class ConnectorFactory:
    """driver_volume_type -> its connector."""

    def __init__(self, connectors: list[VolumeConnector]):
        self._by_type = {c.driver_volume_type: c for c in connectors}

    def get(self, driver_volume_type: str) -> VolumeConnector:
        connector = self._by_type.get(driver_volume_type)
        if connector is None:
            raise InvalidArgument(
                f"driver_volume_type {driver_volume_type[:40]!r} is not supported "
                f"(supported: {', '.join(sorted(self._by_type))})")
        return connector


def make_factory(iscsi_connector: str, hypervisor: Hypervisor, runner: CommandRunner,
                 initiator_iqn: str, file_dirs: Sequence[str | os.PathLike] = ()) -> ConnectorFactory:
    """The connectors of a node; iscsi_connector ("qemu" or "kernel") picks
    the iSCSI initiator; file volumes only from file_dirs."""
    if iscsi_connector == "qemu":
        iscsi: VolumeConnector = QemuIscsiConnector(hypervisor, initiator_iqn)
    elif iscsi_connector == "kernel":
        iscsi = KernelIscsiConnector(runner)
    else:
        raise InvalidArgument(f"iscsi_connector {iscsi_connector!r} is not one of "
                              f"{', '.join(ISCSI_CONNECTORS)}")
    return ConnectorFactory([iscsi, FileConnector(file_dirs)])


__all__ = ["ConnectionInfo", "ConnectorFactory", "FileConnector", "KernelIscsiConnector",
           "QemuIscsiConnector", "StagedVolume", "VolumeConnector", "make_factory"]
