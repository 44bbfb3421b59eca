"""FakeHypervisor: an in-memory hypervisor for unit tests and scale
benchmarks. A fake, never the default: node/app.py always builds the
libvirt one.

Cheap enough for 10,000 domains; behaves like libvirt where the Node
depends on it (transient domains refuse CONFIG, inactive ones refuse LIVE,
a taken target is an error) and can simulate a guest that never releases a
disk, a removal that fails, and injected errors."""

from __future__ import annotations

import collections
import dataclasses
import threading
import uuid as uuidlib
from dataclasses import dataclass, field

from vmattach.common.errors import BackendError, NotFound
from vmattach.node.hypervisor import (
    DetachDone,
    DetachOutcome,
    Disk,
    DiskSpec,
    Domain,
    Hypervisor,
    PendingDetach,
    SecretSpec,
    disk_of_volume,
    not_staged,
)


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
    # devices the guest holds on to like that, one by one, until
    # FakeHypervisor.let_go(uuid, device)
    holds: set[str] = field(default_factory=set)

    @property
    def active(self) -> bool:
        return self.state not in ("shutoff", "nostate")

    def view(self) -> Domain:
        return Domain(self.uuid, self.name, self.state, self.active, self.persistent,
                      tuple(self.live if self.active else self.config), self.project_id)


@dataclass(eq=False)
class _FakeWait(PendingDetach):
    """A detach waiting for a guest that holds on to the device."""
    hypervisor: FakeHypervisor
    key: tuple[str, str]
    done: threading.Event = field(default_factory=threading.Event)
    outcome: DetachOutcome = DetachOutcome.TIMED_OUT

    def wait(self, timeout: float) -> DetachOutcome:
        self.done.wait(timeout)  # the event that may never come
        with self.hypervisor._lock:
            if self in self.hypervisor._waits:
                self.hypervisor._waits.remove(self)
            return self.outcome


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
        self._waits: list[_FakeWait] = []  # detaches waiting for a guest that holds on
        self.reachable = True  # False: every call fails as with libvirtd gone

    # -- set-up helpers for tests -------------------------------------------------------

    def add_domain(self, name: str | None = None, *, uuid: str | None = None,
                   state: str = "running", persistent: bool = True,
                   disks: tuple[Disk, ...] = (), never_releases: bool = False,
                   project_id: str = "", hangs_on_detach: bool = False,
                   holds: tuple[str, ...] = ()) -> FakeDomain:
        uuid = uuid or str(uuidlib.uuid4())
        dom = FakeDomain(uuid, name or f"instance-{uuid[:8]}", state, persistent,
                         live=list(disks) if state not in ("shutoff", "nostate") else [],
                         config=list(disks) if persistent else [],
                         never_releases=never_releases, project_id=project_id,
                         hangs_on_detach=hangs_on_detach, holds=set(holds))
        with self._lock:
            self.domains[uuid] = dom
        return dom

    def release_waits(self) -> None:
        """End every detach waiting on a hanging guest (they report TIMED_OUT),
        and every later one at once."""
        with self._lock:
            self._release.set()
            waits, self._waits = self._waits, []
        for wait in waits:
            wait.done.set()

    def let_go(self, server_id: str, device: str) -> None:
        """The guest releases a device it held (FakeDomain.holds): a detach
        waiting for it ends REMOVED, and a later one completes at once."""
        with self._lock:
            dom = self._dom(server_id)
            dom.holds.discard(device)
            waits = [w for w in self._waits if w.key == (server_id, device)]
            if waits:
                dom.live = [d for d in dom.live if d.device != device]
            self._waits = [w for w in self._waits if w not in waits]
            for wait in waits:
                wait.outcome = DetachOutcome.REMOVED
                wait.done.set()

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

    def list_domains(self, *, with_state: bool = True) -> list[Domain]:
        self._enter("list_domains")
        with self._lock:
            views = [dom.view() for dom in self.domains.values()]
        return views if with_state else [dataclasses.replace(v, state="") for v in views]

    def users_of_volume(self, volume_id: str) -> list[str]:
        self._enter("users_of_volume", volume_id)
        with self._lock:
            return [dom.uuid for dom in self.domains.values()
                    if disk_of_volume(dom.live if dom.active else dom.config, volume_id)]

    def get_domain(self, server_id: str, *, with_state: bool = True) -> Domain:
        self._enter("get_domain", server_id)
        with self._lock:
            view = self._dom(server_id).view()
        return view if with_state else dataclasses.replace(view, state="")

    def attach_disk(self, server_id: str, spec: DiskSpec, *, live: bool, config: bool) -> None:
        self._enter("attach_disk", server_id, spec.device, live, config)
        disk = Disk(spec.device, spec.bus, spec.serial, spec.alias)
        with self._lock:
            dom = self._dom(server_id)
            usage = getattr(spec.source, "secret_usage", "")
            if usage and usage not in self.secrets:  # libvirt looks the secret up at the attach
                raise not_staged(spec.serial, usage)
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

    def request_detach(self, server_id: str, device: str, *, live: bool,
                       config: bool, alias: str = "") -> PendingDetach:
        self._enter("request_detach", server_id, device, live, config)
        with self._lock:
            dom = self._dom(server_id)
            if config:
                dom.config = [d for d in dom.config if d.device != device]
            if not live or not any(d.device == device for d in dom.live):
                return DetachDone(DetachOutcome.REMOVED)
            if dom.never_releases:
                return DetachDone(DetachOutcome.TIMED_OUT)
            if dom.removal_fails:
                return DetachDone(DetachOutcome.FAILED)
            if not (dom.hangs_on_detach or device in dom.holds):
                dom.live = [d for d in dom.live if d.device != device]
                return DetachDone(DetachOutcome.REMOVED)
            wait = _FakeWait(self, (server_id, device))
            if self._release.is_set():
                wait.done.set()
            else:
                self._waits.append(wait)
            return wait

    def pending_detaches(self) -> list[tuple[str, str]]:
        """(server, device) of the detaches waiting for their guest now."""
        with self._lock:
            return [w.key for w in self._waits]

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

    def define_secret(self, spec: SecretSpec) -> bool:
        self._enter("define_secret", spec.usage)
        with self._lock:
            if spec.usage in self.secrets:
                return False
            self.secrets[spec.usage] = spec
            return True

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
