"""The Node's logic as plain Python (no gRPC): the host's connector, staging
volumes through the connectors, and attaching/detaching disks through the
hypervisor. No database: libvirt is the source of truth."""

from __future__ import annotations

import logging
import platform
import socket
from dataclasses import dataclass

from vmattach.common.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from vmattach.common.locks import InProgress, KeyedLocks
from vmattach.common.rules import MAX_VOLUMES_PER_SERVER, disk_device
from vmattach.common.turns import outside
from vmattach.node.connectors import ConnectionInfo, ConnectorFactory, StagedVolume
from vmattach.node.events import ServerEvents
from vmattach.node.hypervisor import (
    BUS_BY_PREFIX,
    DetachOutcome,
    Disk,
    DiskSpec,
    Domain,
    Hypervisor,
    volume_alias,
)

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostConnector:
    """os-brick's connector properties of this host."""
    ip: str
    host: str
    initiator: str
    platform: str
    os_type: str
    multipath: bool = False


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    connector: HostConnector
    max_volumes_per_server: int


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    node_ip: str
    initiator_iqn: str
    max_volumes_per_server: int = MAX_VOLUMES_PER_SERVER
    detach_timeout: float = 10.0
    detach_retries: int = 3


def parse_device(device: str) -> tuple[str, str]:
    """"/dev/vdb" -> ("vdb", "virtio"); InvalidArgument for anything else."""
    name, bus_prefix = disk_device(device, BUS_BY_PREFIX)
    return name, BUS_BY_PREFIX[bus_prefix]


def _device_in_use(device: str) -> FailedPrecondition:
    return FailedPrecondition(f"The supplied device path ({device}) is in use.",
                              reason="DEVICE_IN_USE", metadata={"device": device})


class NodeManager:
    def __init__(self, config: NodeConfig, hypervisor: Hypervisor, connectors: ConnectorFactory):
        self.config = config
        self.hypervisor = hypervisor
        self.connectors = connectors
        self._server_locks = KeyedLocks()
        self._volume_locks = KeyedLocks()
        self._detaching = InProgress()  # (server, volume) pairs whose detach is running
        self.events = ServerEvents()
        hypervisor.set_event_listener(self.events.record)

    # -- reading ------------------------------------------------------------------------

    def info(self) -> NodeInfo:
        connector = HostConnector(ip=self.config.node_ip, host=socket.gethostname(),
                                  initiator=self.config.initiator_iqn,
                                  platform=platform.machine(), os_type="linux")
        return NodeInfo(self.config.node_id, connector, self.config.max_volumes_per_server)

    def list_servers(self) -> list[Domain]:
        return self.hypervisor.list_domains()

    def list_secrets(self) -> list[str]:
        """The usage names of the host's iSCSI secrets (never their values)."""
        return sorted(self.hypervisor.secret_usages())

    # -- stage --------------------------------------------------------------------------

    def stage(self, volume_id: str, info: ConnectionInfo) -> StagedVolume:
        connector = self.connectors.get(info.driver_volume_type)
        with self._volume_locks.hold(volume_id):
            return connector.stage(volume_id, info)

    def unstage(self, volume_id: str, info: ConnectionInfo) -> bool:
        """Disconnect the volume; False (nothing done) when a disk on this
        host still uses it (another server of a multiattach volume)."""
        connector = self.connectors.get(info.driver_volume_type)
        with self._volume_locks.hold(volume_id):
            users = self.hypervisor.users_of_volume(volume_id)
            if users:
                LOG.info("volume %s stays staged: server %s still uses it", volume_id, users[0])
                return False
            connector.unstage(volume_id, info)
            return True

    # -- publish ------------------------------------------------------------------------

    def publish(self, server_id: str, volume_id: str, device: str, info: ConnectionInfo,
                staged: StagedVolume | None = None, *, stage: bool = False) -> Disk:
        """Attach the volume as device; the disk already attached when the
        volume is there (same serial). With stage, stage the volume first."""
        name, bus = parse_device(device)
        if stage:
            staged = self.stage(volume_id, info)
        connector = self.connectors.get(info.driver_volume_type)
        # the volume's lock too: an unstage (which checks that no disk uses the
        # volume) cannot run between the stage check and the attach
        with self._server_locks.hold(server_id), self._volume_locks.hold(volume_id):
            self._refuse_while_detaching(server_id, volume_id)
            domain = self.hypervisor.get_domain(server_id, with_state=False)
            existing = domain.disk_of_volume(volume_id)
            if existing is not None:
                return existing
            if domain.disk_named(name) is not None:
                raise _device_in_use(device)
            spec = DiskSpec(device=name, bus=bus, serial=volume_id, alias=volume_alias(volume_id),
                            source=connector.disk_source(volume_id, info, staged),
                            readonly=info.access_mode == "ro", shareable=info.multiattach)
            self.hypervisor.attach_disk(server_id, spec, live=domain.active,
                                        config=domain.persistent)
            LOG.info("attached volume %s to server %s as %s", volume_id, server_id, name)
            return Disk(name, bus, volume_id, spec.alias)

    def extend(self, server_id: str, volume_id: str, new_size: int,
               info: ConnectionInfo) -> int:
        """After the volume grew at the Controller: make this host see the new
        size, then resize the server's disk to it (virDomainBlockResize; QEMU
        re-reads the size of its source and tells the guest). Returns the
        disk's capacity, 0 when the domain is not running (it reads the new
        size when it starts)."""
        if not 0 < new_size <= 1 << 60:
            raise InvalidArgument("new_size_bytes is out of range", reason="INVALID_SIZE")
        connector = self.connectors.get(info.driver_volume_type)
        with self._server_locks.hold(server_id), self._volume_locks.hold(volume_id):
            self._refuse_while_detaching(server_id, volume_id)
            domain = self.hypervisor.get_domain(server_id, with_state=False)
            disk = domain.disk_of_volume(volume_id)
            if disk is None:
                raise NotFound(f"Server {server_id} has no disk of volume {volume_id}",
                               reason="DISK_NOT_FOUND",
                               metadata={"server_id": server_id, "volume_id": volume_id})
            connector.extend(volume_id, info, new_size)
            if not domain.active:
                return 0
            size = self.hypervisor.disk_capacity(server_id, disk.device)
            if size < new_size:
                size = self.hypervisor.resize_disk(server_id, disk.device, new_size)
            if size < new_size:
                raise FailedPrecondition(
                    f"The disk {disk.device} of server {server_id} still has {size} bytes after"
                    f" the resize (expected {new_size})", reason="VOLUME_NOT_EXTENDED")
            LOG.info("resized disk %s of server %s (volume %s) to %d bytes", disk.device,
                     server_id, volume_id, size)
            return size

    def unpublish(self, server_id: str, volume_id: str,
                  unstage: ConnectionInfo | None = None) -> bool:
        """Detach the volume's disk and wait until the guest released it;
        FailedPrecondition when it never does (the disk stays); Aborted at
        once while a detach of the same disk is still running (it may wait
        for the guest for detach_timeout x detach_retries seconds).

        With unstage (the volume's connection_info), unstage the volume once
        the disk is gone, as unstage() does; returns whether that finished.
        The disk has left the guest by then, so a failed unstage is logged,
        not raised: the caller must learn that the disk is gone.

        The server's lock covers reading the domain and sending the detach
        only: while the guest takes its time, the server's other disks can
        be detached and new ones attached (the leaving disk's name stays
        taken until it is gone, so no attach can choose it)."""
        self._unplug(server_id, volume_id)
        if unstage is None:
            return False
        try:
            self.unstage(volume_id, unstage)
        except Exception:  # noqa: BLE001 - the answer must say the disk left the guest
            LOG.exception("volume %s left server %s; its unstage failed (the caller unstages"
                          " it later)", volume_id, server_id)
            return False
        return True

    def _unplug(self, server_id: str, volume_id: str) -> None:
        """unpublish() without the unstage."""
        ids = {"server_id": server_id, "volume_id": volume_id}
        with self._detaching.claim(
                _detach_key(server_id, volume_id),
                f"a detach of volume {volume_id} from server {server_id} is already in progress;"
                " try again later", reason="DETACH_IN_PROGRESS", metadata=ids):
            attempts = max(self.config.detach_retries, 1)
            for attempt in range(1, attempts + 1):
                with self._server_locks.hold(server_id):
                    domain = self.hypervisor.get_domain(server_id, with_state=False)
                    disk = domain.disk_of_volume(volume_id)
                    if disk is None:
                        return
                    pending = self.hypervisor.request_detach(
                        server_id, disk.device, live=domain.active, config=domain.persistent,
                        alias=disk.alias)
                with outside():  # the guest, without the lock or the turn (common/turns.py)
                    outcome = pending.wait(self.config.detach_timeout)
                LOG.info("detach of %s from server %s, attempt %d/%d: %s", disk.device,
                         server_id, attempt, attempts, outcome.value)
                if outcome is DetachOutcome.REMOVED:
                    return
            disk = self.hypervisor.get_domain(server_id, with_state=False).disk_of_volume(volume_id)
            if disk is None:
                return
            raise FailedPrecondition(
                f"The guest did not release the device {disk.device} of server {server_id} "
                f"after {attempts} attempts", reason="DETACH_NOT_COMPLETED",
                metadata={"server_id": server_id, "volume_id": volume_id, "device": disk.device})

    def _refuse_while_detaching(self, server_id: str, volume_id: str) -> None:
        """Aborted when the volume's disk is leaving the server: it would be
        gone once the guest lets go (call after taking the server's lock)."""
        if self._detaching.running(_detach_key(server_id, volume_id)):
            raise Aborted(f"a detach of volume {volume_id} from server {server_id} is in"
                          " progress; try again later", reason="DETACH_IN_PROGRESS",
                          metadata={"server_id": server_id, "volume_id": volume_id})


def _detach_key(server_id: str, volume_id: str) -> str:
    return f"{server_id}/{volume_id}"
