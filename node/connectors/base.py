"""What every volume connector does (os-brick's InitiatorConnector plus the
part of Nova's libvirt volume driver that says where the disk's bytes come
from)."""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field

from vmattach.common.errors import InvalidArgument
from vmattach.common.rules import quote, require_iscsi_name
from vmattach.node.hypervisor import DiskSource


@dataclass(frozen=True)
class ConnectionInfo:
    """Cinder's connection_info, as the Node reads it."""
    driver_volume_type: str
    target_portal: str = ""
    target_iqn: str = ""
    target_lun: int = 0
    auth_method: str = ""
    auth_username: str = ""
    auth_password: str = field(default="", repr=False)
    access_mode: str = "rw"
    device_path: str = ""
    serial: str = ""
    multiattach: bool = False


@dataclass(frozen=True)
class StagedVolume:
    """How this host reaches a staged volume (NodeStageVolume's answer)."""
    volume_id: str
    driver_volume_type: str
    device_path: str = ""
    secret_usage: str = ""


@dataclass(frozen=True)
class Portal:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


_PORTAL_RE = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+))"
                        r"(?::(?P<port>\d{1,5}))?$")
ISCSI_PORT = 3260


def parse_portal(value: str) -> Portal:
    """"host:port" ("[v6]:port"; port 3260 when absent)."""
    m = _PORTAL_RE.match(value or "")
    port = int(m.group("port") or ISCSI_PORT) if m else 0
    if not m or not 0 < port < 65536:
        raise InvalidArgument(f"connection_info.data.target_portal {quote(value)} is not HOST:PORT",
                              field="connection_info.data.target_portal")
    return Portal(m.group("v6") or m.group("host"), port)


def require_iqn(value: str, field_name: str = "connection_info.data.target_iqn") -> str:
    return require_iscsi_name(value, field_name)


def require_chap(info: ConnectionInfo) -> None:
    """CHAP credentials are complete, or there is no auth at all."""
    if info.auth_method and info.auth_method.upper() != "CHAP":
        raise InvalidArgument(f"auth_method {quote(info.auth_method, 20)} is not supported (CHAP only)",
                              field="connection_info.data.auth_method")
    if info.auth_method and not (info.auth_username and info.auth_password):
        raise InvalidArgument("CHAP needs connection_info.data.auth_username and auth_password",
                              field="connection_info.data.auth_username")


def require_lun(info: ConnectionInfo) -> int:
    if not 0 <= info.target_lun < 16384:
        raise InvalidArgument(f"connection_info.data.target_lun {info.target_lun} is out of range",
                              field="connection_info.data.target_lun")
    return info.target_lun


class VolumeConnector(abc.ABC):
    """Connects this host to a volume of one driver_volume_type."""

    driver_volume_type: str

    @abc.abstractmethod
    def stage(self, volume_id: str, info: ConnectionInfo) -> StagedVolume:
        """Connect (idempotent: staging a staged volume again is fine)."""

    @abc.abstractmethod
    def unstage(self, volume_id: str, info: ConnectionInfo) -> None:
        """Disconnect (idempotent: a volume that is not staged is fine)."""

    def extend(self, volume_id: str, info: ConnectionInfo,  # noqa: B027 (optional hook)
               new_size: int) -> None:
        """Make this host see the volume's new size (os-brick extend_volume).
        Nothing to do when QEMU reads the target or the file itself."""

    @abc.abstractmethod
    def disk_source(self, volume_id: str, info: ConnectionInfo,
                    staged: StagedVolume | None) -> DiskSource:
        """Where the guest's disk reads from, for a staged volume."""
