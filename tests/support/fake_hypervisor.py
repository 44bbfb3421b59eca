"""FakeHypervisor: an in-memory hypervisor for unit tests and scale
benchmarks. A fake, never the default: node/app.py always builds the
libvirt one.

Cheap enough for 10,000 domains; behaves like libvirt where the Node
depends on it (transient domains refuse CONFIG, inactive ones refuse LIVE,
a taken target is an error) and can simulate a guest that never releases a
disk, a removal that fails, and injected errors."""

from __future__ import annotations

import collections
import threading
import uuid as uuidlib
from dataclasses import dataclass, field

from vmattach.common.errors import BackendError, NotFound
from vmattach.node.hypervisor import DetachOutcome, Disk, DiskSpec, Domain, Hypervisor, SecretSpec


@dataclass
class FakeDomain:
    uuid: str
    name: str
    state: str = "running"
    persistent: bool = True
    live: list[Disk] = field(default_factory=list)
    config: list[Disk] = field(default_factory=list)
    never_releases: bool = False     # live detach never completes (no guest OS)
    project_id: str = ""             # Nova's owner project in the domain's metadata
    removal_fails: bool = False      # DEVICE_REMOVAL_FAILED instead of DEVICE_REMOVED
    # like never_releases, but the detach waits its whole timeout for the event
    # first, as libvirt does (FakeHypervisor.release_waits() ends the waits)
    hangs_on_detach: bool = False

    @property
    def active(self) -> bool:
        return self.state not in ("shutoff", "nostate")

    def view(self) -> Domain:
        return Domain(self.uuid, self.name, self.state, self.active, self.persistent,
                      tuple(self.live if self.active else self.config), self.project_id)


class FakeHypervisor(Hypervisor):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.domains: dict[str, FakeDomain] = {}
        self.secrets: dict[str, SecretSpec] = {}
        self.attached: dict[tuple[str, str], DiskSpec] = {}  # (uuid, device) -> last spec
        self.capacity: dict[tuple[str, str], int] = {}  # (uuid, device) -> bytes, once resized
        self.calls: collections.deque[tuple] = collections.deque(maxlen=10_000)  # recent calls
        self._errors: dict[str, list[Exception]] = {}
        self.closed = False
        self.listener = None
        self._release = threading.Event()
        self.reachable = True  # False: every call fails as with libvirtd gone

    # -- set-up helpers for tests -------------------------------------------------------

    def add_domain(self, name: str | None = None, *, uuid: str | None = None,
                   state: str = "running", persistent: bool = True,
                   disks: tuple[Disk, ...] = (), never_releases: bool = False,
                   project_id: str = "", hangs_on_detach: bool = False) -> FakeDomain:
        uuid = uuid or str(uuidlib.uuid4())
        dom = FakeDomain(uuid, name or f"instance-{uuid[:8]}", state, persistent,
                         live=list(disks) if state not in ("shutoff", "nostate") else [],
                         config=list(disks) if persistent else [],
                         never_releases=never_releases, project_id=project_id,
                         hangs_on_detach=hangs_on_detach)
        with self._lock:
            self.domains[uuid] = dom
        return dom

    def release_waits(self) -> None:
        """End every detach waiting on a hanging guest (they report TIMED_OUT)."""
        self._release.set()

    def inject_error(self, operation: str, error: Exception, times: int = 1) -> None:
        """The next `times` calls of operation (a method name) raise error."""
        self._errors.setdefault(operation, []).extend([error] * times)

    def _enter(self, operation: str, *args) -> None:
        self.calls.append((operation, *args))
        if not self.reachable:
            raise BackendError("cannot connect to libvirt at fake:///: Failed to connect socket",
                               reason="LIBVIRT_UNAVAILABLE")
        pending = self._errors.get(operation)
        if pending:
            raise pending.pop(0)

    def _dom(self, server_id: str) -> FakeDomain:
        dom = self.domains.get(server_id)
        if dom is None:
            raise NotFound(f"Server {server_id} could not be found.", reason="SERVER_NOT_FOUND",
                           metadata={"server_id": server_id})
        return dom

    # -- Hypervisor ---------------------------------------------------------------------

    def list_domains(self) -> list[Domain]:
        self._enter("list_domains")
        with self._lock:
            return [dom.view() for dom in self.domains.values()]

    def get_domain(self, server_id: str) -> Domain:
        self._enter("get_domain", server_id)
        with self._lock:
            return self._dom(server_id).view()

    def attach_disk(self, server_id: str, spec: DiskSpec, *, live: bool, config: bool) -> None:
        self._enter("attach_disk", server_id, spec.device, live, config)
        disk = Disk(spec.device, spec.bus, spec.serial, spec.alias)
        with self._lock:
            dom = self._dom(server_id)
            if config and not dom.persistent:
                raise BackendError("libvirt could not attach disk: cannot modify the persistent "
                                   "configuration of a transient domain", reason="LIBVIRT_ERROR")
            if live and not dom.active:
                raise BackendError("libvirt could not attach disk: domain is not running",
                                   reason="LIBVIRT_ERROR")
            targets = [(live, dom.live), (config, dom.config)]
            if any(on and any(d.device == spec.device for d in disks) for on, disks in targets):
                raise BackendError(f"libvirt could not attach disk: target {spec.device} "
                                   "already exists", reason="LIBVIRT_ERROR")
            for on, disks in targets:
                if on:
                    disks.append(disk)
            self.attached[(server_id, spec.device)] = spec

    def detach_disk(self, server_id: str, device: str, *, live: bool, config: bool,
                    timeout: float) -> DetachOutcome:
        self._enter("detach_disk", server_id, device, live, config)
        with self._lock:
            dom = self._dom(server_id)
            if config:
                dom.config = [d for d in dom.config if d.device != device]
            if not live or not any(d.device == device for d in dom.live):
                return DetachOutcome.REMOVED
            if dom.never_releases:
                return DetachOutcome.TIMED_OUT
            if dom.removal_fails:
                return DetachOutcome.FAILED
            if not dom.hangs_on_detach:
                dom.live = [d for d in dom.live if d.device != device]
                return DetachOutcome.REMOVED
        self._release.wait(timeout)  # the event that never comes
        return DetachOutcome.TIMED_OUT

    def remove_domain(self, server_id: str) -> None:
        """The domain vanishes (undefined, or a transient one destroyed) behind
        the Node's back."""
        with self._lock:
            self.domains.pop(server_id, None)
        if self.listener is not None:
            self.listener(server_id, "undefined")

    def probe(self) -> None:
        self._enter("probe")

    def set_event_listener(self, listener) -> None:
        self.listener = listener

    def _live_disk(self, server_id: str, device: str) -> FakeDomain:
        dom = self._dom(server_id)
        if not dom.active or not any(d.device == device for d in dom.live):
            raise BackendError(f"libvirt could not resize disk {device}: disk not found",
                               reason="LIBVIRT_ERROR")
        return dom

    def resize_disk(self, server_id: str, device: str, size_bytes: int) -> int:
        self._enter("resize_disk", server_id, device, size_bytes)
        with self._lock:
            self._live_disk(server_id, device)
            self.capacity[(server_id, device)] = size_bytes
            return size_bytes

    def disk_capacity(self, server_id: str, device: str) -> int:
        self._enter("disk_capacity", server_id, device)
        with self._lock:
            self._live_disk(server_id, device)
            return self.capacity.get((server_id, device), 0)

    def define_secret(self, spec: SecretSpec) -> None:
        self._enter("define_secret", spec.usage)
        with self._lock:
            self.secrets[spec.usage] = spec

    def undefine_secret(self, usage: str) -> bool:
        self._enter("undefine_secret", usage)
        with self._lock:
            return self.secrets.pop(usage, None) is not None

    def has_secret(self, usage: str) -> bool:
        self._enter("has_secret", usage)
        with self._lock:
            return usage in self.secrets

    def secret_usages(self) -> list[str]:
        with self._lock:
            return sorted(self.secrets)

    def close(self) -> None:
        self.closed = True
