"""iSCSI through QEMU's own initiator: staging only puts the CHAP password in
a private libvirt secret; QEMU logs in when the disk is attached. Nothing
else on the host changes."""

from __future__ import annotations

import logging

from vmattach.node.connectors.base import (
    ConnectionInfo,
    StagedVolume,
    VolumeConnector,
    parse_portal,
    require_chap,
    require_iqn,
    require_lun,
)
from vmattach.node.hypervisor import Hypervisor, IscsiSource, SecretSpec

LOG = logging.getLogger(__name__)


def secret_usage(volume_id: str) -> str:
    return f"volume-{volume_id}"


class QemuIscsiConnector(VolumeConnector):
    driver_volume_type = "iscsi"

    def __init__(self, hypervisor: Hypervisor, initiator_iqn: str):
        self.hypervisor = hypervisor
        self.initiator_iqn = initiator_iqn

    @staticmethod
    def _validate(info: ConnectionInfo) -> None:
        parse_portal(info.target_portal)
        require_iqn(info.target_iqn)
        require_lun(info)
        require_chap(info)

    def stage(self, volume_id: str, info: ConnectionInfo) -> StagedVolume:
        self._validate(info)
        usage = secret_usage(volume_id) if info.auth_method else ""
        # a volume's secret that exists is never overwritten (a volume's CHAP
        # password never changes): a request cannot replace it with its own
        if usage and self.hypervisor.define_secret(SecretSpec(
                usage=usage, value=info.auth_password.encode(),
                description=f"vmattach CHAP secret of volume {volume_id}")):
            LOG.info("staged volume %s: libvirt secret %s", volume_id, usage)
        return StagedVolume(volume_id, self.driver_volume_type, secret_usage=usage)

    def unstage(self, volume_id: str, info: ConnectionInfo) -> None:
        if self.hypervisor.undefine_secret(secret_usage(volume_id)):
            LOG.info("unstaged volume %s: libvirt secret removed", volume_id)

    def disk_source(self, volume_id: str, info: ConnectionInfo,
                    staged: StagedVolume | None) -> IscsiSource:
        self._validate(info)
        # (not staged: no secret of that usage; the hypervisor's attach says so
        # when it finds none, so that an attach asks libvirt once, not twice)
        usage = secret_usage(volume_id) if info.auth_method else ""
        portal = parse_portal(info.target_portal)
        return IscsiSource(target_iqn=info.target_iqn, lun=info.target_lun, host=portal.host,
                           port=portal.port, initiator_iqn=self.initiator_iqn,
                           auth_username=info.auth_username if usage else "",
                           secret_usage=usage)
