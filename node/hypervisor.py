"""The hypervisor as the Node sees it: typed values and the interface that
node/libvirt_hypervisor.py (the real one) and tests/support/fake_hypervisor.py (a fake
for unit tests and benchmarks) implement. Nothing here imports libvirt."""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from vmattach.common.errors import FailedPrecondition

# libvirt's domain states, by name (Server.state in the API).
STATES = ("nostate", "running", "blocked", "paused", "shutdown", "shutoff", "crashed",
          "pmsuspended")

BUS_BY_PREFIX = {"vd": "virtio", "sd": "scsi", "hd": "ide"}
PREFIX_BY_BUS = {bus: prefix for prefix, bus in BUS_BY_PREFIX.items()}
DEFAULT_PREFIX = "vd"
USER_ALIAS_PREFIX = "ua-"


def volume_alias(volume_id: str) -> str:
    """The libvirt user alias of a volume's disk (libvirt wants "ua-" first)."""
    return USER_ALIAS_PREFIX + volume_id


@dataclass(frozen=True)
class Disk:
    """One <disk> of a domain as libvirt reports it."""
    device: str            # target dev, "vdb"
    bus: str               # "virtio", "scsi", "ide", ...
    serial: str = ""
    alias: str = ""        # "ua-<volume id>" for vmattach disks; libvirt's own otherwise


def disk_of_volume(disks: Iterable[Disk], volume_id: str) -> Disk | None:
    """The disk of the volume among disks: its serial or its alias names it."""
    alias = volume_alias(volume_id)
    return next((d for d in disks if d.serial == volume_id or d.alias == alias), None)


@dataclass(frozen=True)
class Domain:
    """A domain (server): disks are the live ones when it runs, else the
    persistent config's."""
    uuid: str
    name: str
    state: str
    active: bool
    persistent: bool
    disks: tuple[Disk, ...] = ()
    # the owner project Nova writes into the domain's <metadata>; "" when none
    project_id: str = ""

    def disk_of_volume(self, volume_id: str) -> Disk | None:
        return disk_of_volume(self.disks, volume_id)

    def disk_named(self, device: str) -> Disk | None:
        return next((d for d in self.disks if d.device == device), None)

    @property
    def root_disk(self) -> Disk | None:
        """The first disk vmattach did not attach (empty for a diskless server)."""
        return next((d for d in self.disks if not d.alias.startswith(USER_ALIAS_PREFIX)), None)

    @property
    def device_prefix(self) -> str:
        root = self.root_disk
        return PREFIX_BY_BUS.get(root.bus, DEFAULT_PREFIX) if root else DEFAULT_PREFIX


# Where a disk's bytes come from ---------------------------------------------------

@dataclass(frozen=True)
class IscsiSource:
    """QEMU's own iSCSI initiator (<disk type='network'>)."""
    target_iqn: str
    lun: int
    host: str
    port: int
    initiator_iqn: str
    auth_username: str = ""
    secret_usage: str = ""  # libvirt secret of usage type iscsi with the CHAP password


@dataclass(frozen=True)
class BlockSource:
    """A host block device (<disk type='block'>)."""
    path: str


@dataclass(frozen=True)
class FileSource:
    """A host file (<disk type='file'>)."""
    path: str


DiskSource = IscsiSource | BlockSource | FileSource


@dataclass(frozen=True)
class DiskSpec:
    """A disk to attach."""
    device: str
    bus: str
    serial: str
    alias: str
    source: DiskSource
    cache: str = "none"
    readonly: bool = False
    shareable: bool = False  # a multiattach volume: other domains may have it too


class DetachOutcome(enum.Enum):
    REMOVED = "removed"        # DEVICE_REMOVED arrived, or the disk is gone
    FAILED = "failed"          # DEVICE_REMOVAL_FAILED arrived
    TIMED_OUT = "timed_out"    # no event before the deadline


class PendingDetach(abc.ABC):
    """A detach that was sent: the guest may still hold the disk. Waiting for
    it needs no lock of the caller's (Hypervisor.request_detach)."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> DetachOutcome:
        """Wait up to timeout seconds until the guest let go of the disk;
        REMOVED also when the disk is gone although no event came. Once."""


class DetachDone(PendingDetach):
    """A detach whose outcome was known when it was sent (nothing live to
    wait for, or the hypervisor answered at once)."""

    def __init__(self, outcome: DetachOutcome):
        self.outcome = outcome

    def wait(self, timeout: float) -> DetachOutcome:
        return self.outcome


@dataclass(frozen=True)
class SecretSpec:
    """A private, non-ephemeral libvirt secret of usage type iscsi."""
    usage: str
    value: bytes = field(repr=False)
    description: str = ""


def not_staged(volume_id: str, secret_usage: str) -> FailedPrecondition:
    """A disk of the volume names a CHAP secret this host does not have."""
    return FailedPrecondition(f"Volume {volume_id} is not staged on this node "
                              f"(no libvirt secret {secret_usage})", reason="VOLUME_NOT_STAGED")


class Hypervisor(abc.ABC):
    """What the Node needs from a hypervisor. Errors: NotFound for an unknown
    domain, BackendError (no secret in its message) for anything else."""

    @abc.abstractmethod
    def list_domains(self, *, with_state: bool = True) -> list[Domain]:
        """Every domain on this host (with_state: as for get_domain)."""

    @abc.abstractmethod
    def users_of_volume(self, volume_id: str) -> list[str]:
        """The servers on this host with a disk of the volume (the check before
        a volume's unstage, on every detach: cheaper than list_domains)."""

    @abc.abstractmethod
    def get_domain(self, server_id: str, *, with_state: bool = True) -> Domain:
        """with_state=False: without its state (state ""; for libvirt one
        call less): the Node's attach and detach need only whether the
        domain runs, whether it is persistent and its disks."""

    @abc.abstractmethod
    def attach_disk(self, server_id: str, spec: DiskSpec, *, live: bool, config: bool) -> None:
        """Attach to the live domain and/or its persistent config;
        not_staged() when the disk's CHAP secret is not on this host."""

    @abc.abstractmethod
    def request_detach(self, server_id: str, device: str, *, live: bool,
                       config: bool, alias: str = "") -> PendingDetach:
        """Detach `device` from the persistent config (when there) and ask the
        live domain (when there) to release it, without waiting for the
        guest: the answer's wait() does that. alias: the live disk's alias
        when the caller has just read it (the domain is not read again for
        it). What reads the domain and sends the request is done when this
        returns, so the caller holds the server's lock around this call
        only."""

    @abc.abstractmethod
    def resize_disk(self, server_id: str, device: str, size_bytes: int) -> int:
        """Resize the running domain's disk `device` to size_bytes (the
        source already has that size: QEMU re-reads it); returns the disk's
        capacity afterwards."""

    @abc.abstractmethod
    def disk_capacity(self, server_id: str, device: str) -> int:
        """The capacity in bytes of the running domain's disk `device`."""

    @abc.abstractmethod
    def define_secret(self, spec: SecretSpec) -> bool:
        """Create the secret with its value; True when created, False when a
        secret of this usage is there already (it is kept as it is: a
        volume's CHAP password never changes, and a request must not
        replace it with its own)."""

    @abc.abstractmethod
    def undefine_secret(self, usage: str) -> bool:
        """Remove the secret; False when there was none."""

    @abc.abstractmethod
    def has_secret(self, usage: str) -> bool: ...

    @abc.abstractmethod
    def secret_usages(self) -> list[str]:
        """The usage names of the iSCSI secrets on this host."""

    def probe(self) -> None:
        """Raise BackendError when the hypervisor cannot be reached (the
        health service's probe); the default lists the domains."""
        self.list_domains()

    def set_event_listener(self, listener: Callable[[str, str], None]) -> None:  # noqa: B027
        """listener(server_id, event) is called (on another thread) when a
        domain is defined, undefined, started, stopped, ...; the default
        hypervisor reports nothing (the periodic listing still sees it)."""

    def close(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Release connections; the default has none."""
