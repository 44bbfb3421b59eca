"""iSCSI through the kernel's initiator (open-iscsi): the iscsiadm sequence
os-brick's ISCSIConnector runs, through the injected command runner, and the
/dev/disk/by-path device it leads to. Unstaging flushes and deletes that SCSI
disk before the logout, as os-brick's disconnect_volume does."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Sequence

from vmattach.common.errors import BackendError, FailedPrecondition
from vmattach.common.runner import CommandError, CommandRunner, Result
from vmattach.common.turns import outside
from vmattach.node.connectors.base import (
    ConnectionInfo,
    Portal,
    StagedVolume,
    VolumeConnector,
    parse_portal,
    require_chap,
    require_iqn,
    require_lun,
)
from vmattach.node.hypervisor import BlockSource

LOG = logging.getLogger(__name__)

ISCSI_ERR_SESS_EXISTS = 15   # --login: already logged in
ISCSI_ERR_NO_OBJS_FOUND = 21  # no such node record / no session
SCSI_DISK_RE = re.compile(r"sd[a-z]{1,4}")


def by_path(portal: Portal, iqn: str, lun: int) -> str:
    return f"/dev/disk/by-path/ip-{portal}-iscsi-{iqn}-lun-{lun}"


def wait_for(check: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll check until it is true or timeout seconds passed."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            return False
        with outside():
            time.sleep(interval)
    return True


class KernelIscsiConnector(VolumeConnector):
    driver_volume_type = "iscsi"

    def __init__(self, runner: CommandRunner, *, device_timeout: float = 30.0,
                 exists: Callable[[str], bool] = os.path.exists,
                 resolve: Callable[[str], str] = os.path.realpath):
        self.runner = runner
        self.device_timeout = device_timeout
        self.exists = exists
        self.resolve = resolve

    # -- iscsiadm -----------------------------------------------------------------------

    def _run(self, argv: list[str], secrets: Sequence[str] = (),
             ok: Sequence[int] = (0,)) -> Result:
        result = self.runner.run(argv, secrets=secrets, check=False)
        if result.returncode not in ok:
            raise CommandError(argv, result, secrets)
        return result

    def _node(self, portal: Portal, iqn: str, *args: str, secrets: Sequence[str] = (),
              ok: Sequence[int] = (0,)) -> Result:
        return self._run(["iscsiadm", "-m", "node", "-T", iqn, "-p", str(portal), *args],
                         secrets, ok)

    def _update(self, portal: Portal, iqn: str, key: str, value: str,
                secrets: Sequence[str] = ()) -> None:
        self._node(portal, iqn, "--op", "update", "-n", key, "-v", value, secrets=secrets)

    def _logged_in(self, portal: Portal, iqn: str) -> bool:
        """Whether `iscsiadm -m session` lists a session to iqn at portal."""
        out = self._run(["iscsiadm", "-m", "session"], ok=(0, ISCSI_ERR_NO_OBJS_FOUND)).stdout
        for line in out.splitlines():
            fields = line.split()  # tcp: [1] 10.0.0.1:3260,1 iqn... (non-flash)
            if len(fields) >= 4 and fields[2].split(",")[0] == str(portal) and fields[3] == iqn:
                return True
        return False

    # -- VolumeConnector ----------------------------------------------------------------

    @staticmethod
    def _target(info: ConnectionInfo) -> tuple[Portal, str]:
        return parse_portal(info.target_portal), require_iqn(info.target_iqn)

    def stage(self, volume_id: str, info: ConnectionInfo) -> StagedVolume:
        portal, iqn = self._target(info)
        require_lun(info)
        require_chap(info)
        self._node(portal, iqn, "--interface", "default", "--op", "new")
        logged_in = self._logged_in(portal, iqn)
        self._update(portal, iqn, "node.session.scan", "manual")
        if info.auth_method:
            self._update(portal, iqn, "node.session.auth.authmethod", info.auth_method.upper())
            self._update(portal, iqn, "node.session.auth.username", info.auth_username)
            self._update(portal, iqn, "node.session.auth.password", info.auth_password,
                         secrets=[info.auth_password])
        if not logged_in:
            self._node(portal, iqn, "--login", ok=(0, ISCSI_ERR_SESS_EXISTS))
        self._update(portal, iqn, "node.startup", "automatic")
        path = by_path(portal, iqn, info.target_lun)
        if not wait_for(lambda: self.exists(path), self.device_timeout):
            raise BackendError(f"Volume {volume_id}: {path} did not appear within "
                               f"{self.device_timeout:g}s after the iSCSI login",
                               reason="DEVICE_NOT_FOUND")
        LOG.info("staged volume %s: %s", volume_id, path)
        return StagedVolume(volume_id, self.driver_volume_type, device_path=path)

    def _scsi_disk(self, portal: Portal, iqn: str, lun: int) -> str | None:
        """The SCSI disk ("sdc") the session's LUN is on; None when it is gone."""
        path = by_path(portal, iqn, lun)
        if not self.exists(path):
            return None
        name = self.resolve(path).removeprefix("/dev/")
        if not SCSI_DISK_RE.fullmatch(name):
            raise BackendError(f"{path} leads to {name[:40]!r}, not a SCSI disk",
                               reason="UNEXPECTED_DEVICE")
        return name

    def _remove_scsi_disk(self, volume_id: str, name: str) -> None:
        """What the kernel needs before the session goes (os-brick's
        remove_scsi_device): write out its buffers, then delete the SCSI
        device and wait until the kernel let it go. A flush that fails stops
        here: logging out would lose the writes (the unstage is retried)."""
        self.runner.run(["blockdev", "--flushbufs", f"/dev/{name}"])
        self.runner.run(["tee", "-a", f"/sys/block/{name}/device/delete"], input="1")
        if not wait_for(lambda: not self.exists(f"/sys/block/{name}"), self.device_timeout):
            raise BackendError(f"Volume {volume_id}: /dev/{name} was not removed within "
                               f"{self.device_timeout:g}s", reason="DEVICE_NOT_REMOVED")

    def unstage(self, volume_id: str, info: ConnectionInfo) -> None:
        portal, iqn = self._target(info)
        name = self._scsi_disk(portal, iqn, require_lun(info))
        if name is not None:
            self._remove_scsi_disk(volume_id, name)
        self._node(portal, iqn, "--logout", ok=(0, ISCSI_ERR_NO_OBJS_FOUND))
        self._node(portal, iqn, "--op", "delete", ok=(0, ISCSI_ERR_NO_OBJS_FOUND))
        LOG.info("unstaged volume %s: %slogged out of %s", volume_id,
                 f"/dev/{name} flushed and removed, " if name else "", iqn)

    def extend(self, volume_id: str, info: ConnectionInfo, new_size: int) -> None:
        """Rescan the session (the kernel re-reads READ CAPACITY) and wait until
        the by-path device has the new size."""
        portal, iqn = self._target(info)
        path = by_path(portal, iqn, require_lun(info))
        self._node(portal, iqn, "--rescan")
        seen = [0]

        def grown() -> bool:
            out = self._run(["blockdev", "--getsize64", path]).stdout.strip()
            seen[0] = int(out) if out.isdigit() else 0
            return seen[0] >= new_size
        if not wait_for(grown, self.device_timeout, interval=0.2):
            raise FailedPrecondition(f"Volume {volume_id}: {path} still has {seen[0]} bytes "
                                     f"after the rescan (expected {new_size})",
                                     reason="VOLUME_NOT_EXTENDED")
        LOG.info("volume %s: %s rescanned, %d bytes", volume_id, path, seen[0])

    def disk_source(self, volume_id: str, info: ConnectionInfo,
                    staged: StagedVolume | None) -> BlockSource:
        # the device is always derived from the target: never a path from the request
        portal, iqn = self._target(info)
        path = by_path(portal, iqn, require_lun(info))
        if not self.exists(path):
            raise FailedPrecondition(f"Volume {volume_id} is not staged on this node "
                                     f"({path} does not exist)", reason="VOLUME_NOT_STAGED")
        return BlockSource(path)
