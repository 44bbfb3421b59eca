"""The hypervisor adapter on libvirt: the only module that imports libvirt.

One connection per adapter, opened lazily, reopened once when libvirtd went
away (restart); device-removal events arrive on libvirt's default event loop,
run by one daemon thread per process."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

import libvirt

from vmattach.common.errors import BackendError, NotFound
from vmattach.common.turns import outside
from vmattach.node.domxml import disk_xml, find_disk_xml, parse_disks, read_domain, secret_xml
from vmattach.node.events import DeviceWaiters, Waiter
from vmattach.node.hypervisor import (
    STATES,
    DetachDone,
    DetachOutcome,
    DiskSpec,
    Domain,
    Hypervisor,
    IscsiSource,
    PendingDetach,
    SecretSpec,
    disk_of_volume,
    not_staged,
)

LOG = logging.getLogger(__name__)
T = TypeVar("T")

_CONNECTION_ERRORS = frozenset({libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC,
                                libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN})
_ALREADY_UNPLUGGING = "already in the process of unplug"
_LIFECYCLE = {libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
              libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
              libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
              libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
              libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
              libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
              libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
              libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
              libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed"}
# at most this many domain handles are kept per connection (a host runs far fewer)
MAX_HANDLES = 4096
_loop_lock = threading.Lock()
_loop_started = False


def _ignore_libvirt_error(_ctx, _err) -> None:
    """libvirt prints every error on stderr by default; they are raised instead."""


def start_event_loop() -> None:
    """Register libvirt's default event implementation (before any connection
    is opened) and run it on a daemon thread; once per process."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True).start()
        _loop_started = True


def _run_event_loop() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


def _is_connection_error(exc: libvirt.libvirtError) -> bool:
    return exc.get_error_code() in _CONNECTION_ERRORS


def _error_message(exc: libvirt.libvirtError) -> str:
    return exc.get_error_message() or str(exc)


class _LiveDetach(PendingDetach):
    """A live detach that was sent: its DEVICE_REMOVED (or
    DEVICE_REMOVAL_FAILED) event is awaited; the waiter was registered
    before the request, so an event that came already is not missed."""

    def __init__(self, hypervisor: LibvirtHypervisor, server_id: str, device: str,
                 waiter: Waiter):
        self._hypervisor = hypervisor
        self._server_id = server_id
        self._device = device
        self._waiter = waiter

    def wait(self, timeout: float) -> DetachOutcome:
        try:
            outcome = self._waiter.wait(timeout)
        finally:
            self._hypervisor._waiters.discard(self._waiter)
        if outcome is DetachOutcome.TIMED_OUT and not self._hypervisor._has_live_disk(
                self._server_id, self._device):
            return DetachOutcome.REMOVED  # removed while no event could reach us
        return outcome


class LibvirtHypervisor(Hypervisor):
    def __init__(self, uri: str, opener: Callable[[str], libvirt.virConnect] | None = None):
        self.uri = uri
        self._opener = opener or libvirt.open
        self._lock = threading.Lock()
        self._conn: libvirt.virConnect | None = None
        # the connection the handles belong to, and its domain handles by UUID
        self._handles: tuple[libvirt.virConnect | None, dict[str, libvirt.virDomain]] = (None, {})
        self._callback_ids: list[int] = []
        self._waiters = DeviceWaiters()
        self._listener: Callable[[str, str], None] | None = None
        start_event_loop()

    # -- connection ---------------------------------------------------------------------

    def _connection(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is not None and self._alive(self._conn):
                return self._conn
            self._drop()
            self._conn = self._open()
            return self._conn

    @staticmethod
    def _alive(conn) -> bool:
        try:
            return conn.isAlive() == 1
        except libvirt.libvirtError:
            return False

    def _open(self) -> libvirt.virConnect:
        try:
            conn = self._opener(self.uri)
        except libvirt.libvirtError as exc:
            raise BackendError(f"cannot connect to libvirt at {self.uri}: {_error_message(exc)}",
                               reason="LIBVIRT_UNAVAILABLE") from None
        try:
            conn.setKeepAlive(5, 3)
        except libvirt.libvirtError:
            LOG.debug("libvirt keepalive not available on %s", self.uri)
        self._callback_ids = [
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
                                        self._on_device_removed, None),
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED,
                                        self._on_device_removal_failed, None),
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                        self._on_lifecycle, None),
        ]
        LOG.info("connected to libvirt at %s", self.uri)
        return conn

    def _drop(self) -> None:
        """Close the current connection, if any (caller holds self._lock)."""
        conn, self._conn = self._conn, None
        self._handles = (None, {})
        if conn is None:
            return
        for callback_id in self._callback_ids:
            try:
                conn.domainEventDeregisterAny(callback_id)
            except libvirt.libvirtError:
                pass
        self._callback_ids = []
        try:
            conn.close()
        except libvirt.libvirtError:
            pass

    def _forget(self, conn) -> None:
        with self._lock:
            if self._conn is conn:
                self._drop()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _call(self, what: str, fn: Callable[[libvirt.virConnect], T],
              server_id: str = "") -> T:
        """fn(connection), reconnecting once when the connection was lost;
        libvirt errors become NotFound / BackendError. libvirtd's answer is
        waited for outside the calling thread's turn (common/turns.py)."""
        with outside():
            return self._calling(what, fn, server_id)

    def _calling(self, what: str, fn: Callable[[libvirt.virConnect], T], server_id: str) -> T:
        for attempt in (1, 2):
            conn = self._connection()
            try:
                return fn(conn)
            except libvirt.libvirtError as exc:
                if attempt == 1 and _is_connection_error(exc):
                    LOG.warning("libvirt connection lost (%s); reconnecting", _error_message(exc))
                    self._forget(conn)
                    continue
                if server_id and exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    self._handles[1].pop(server_id, None)
                raise self._mapped(exc, what, server_id) from None
        raise AssertionError("unreachable")

    def _lookup(self, conn: libvirt.virConnect, server_id: str) -> libvirt.virDomain:
        """The domain's handle: looked up once per connection, then kept.
        libvirt finds the domain by the handle's UUID on every call, so the
        handle of a domain that went answers NO_DOMAIN as a lookup would (and
        is dropped then), and that of a domain started again under the same
        UUID reaches the new one."""
        owner, handles = self._handles
        if owner is conn:
            dom = handles.get(server_id)
            if dom is not None:
                return dom
        dom = conn.lookupByUUIDString(server_id)
        with self._lock:
            if self._conn is conn:  # (not one replaced meanwhile)
                owner, handles = self._handles
                if owner is not conn or len(handles) >= MAX_HANDLES:
                    handles = {}
                    self._handles = (conn, handles)
                handles[server_id] = dom
        return dom

    @staticmethod
    def _mapped(exc: libvirt.libvirtError, what: str, server_id: str) -> Exception:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return NotFound(f"Server {server_id} could not be found.", reason="SERVER_NOT_FOUND",
                            metadata={"server_id": server_id})
        return BackendError(f"libvirt could not {what}: {_error_message(exc)}",
                            reason="LIBVIRT_ERROR")

    # -- events -------------------------------------------------------------------------

    def _on_device_removed(self, _conn, dom, alias, _opaque) -> None:
        LOG.debug("DEVICE_REMOVED %s on %s", alias, dom.UUIDString())
        self._waiters.resolve(dom.UUIDString(), alias, DetachOutcome.REMOVED)

    def _on_device_removal_failed(self, _conn, dom, alias, _opaque) -> None:
        LOG.info("DEVICE_REMOVAL_FAILED %s on %s", alias, dom.UUIDString())
        self._waiters.resolve(dom.UUIDString(), alias, DetachOutcome.FAILED)

    def set_event_listener(self, listener: Callable[[str, str], None]) -> None:
        # events flow once the connection is open: the first call opens it (the
        # facade's server listing at its start), so start-up never waits for libvirtd
        self._listener = listener

    def _on_lifecycle(self, _conn, dom, event, _detail, _opaque) -> None:
        name = _LIFECYCLE.get(event, "changed")
        LOG.debug("lifecycle %s of %s", name, dom.UUIDString())
        if name == "undefined":
            self._handles[1].pop(dom.UUIDString(), None)
        if self._listener is not None:
            try:
                self._listener(dom.UUIDString(), name)
            except Exception:  # noqa: BLE001 - never let a listener break libvirt's loop
                LOG.exception("lifecycle listener failed")

    # -- domains ------------------------------------------------------------------------

    @staticmethod
    def _domain(dom, with_state: bool = True) -> Domain:
        """Three calls (two without the state): the state, the XML (name,
        running or not, disks, owner) and whether it is persistent."""
        state = dom.state()[0] if with_state else -1
        xml = read_domain(dom.XMLDesc(0))
        return Domain(uuid=dom.UUIDString(), name=xml.name,
                      state=("" if not with_state
                             else STATES[state] if 0 <= state < len(STATES) else "nostate"),
                      active=xml.active, persistent=dom.isPersistent() == 1,
                      disks=xml.disks, project_id=xml.project_id)

    def list_domains(self, *, with_state: bool = True) -> list[Domain]:
        def _list(conn) -> list[Domain]:
            domains = []
            for dom in conn.listAllDomains(0):
                try:
                    domains.append(self._domain(dom, with_state))
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise  # a domain that vanished meanwhile is skipped
            return domains
        return self._call("list domains", _list)

    def users_of_volume(self, volume_id: str) -> list[str]:
        """One call per domain (its XML), parsed only when the volume's id is
        in it (a vmattach disk's serial and alias both hold it)."""
        def _users(conn) -> list[str]:
            users = []
            for dom in conn.listAllDomains(0):
                try:
                    xml = dom.XMLDesc(0)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise  # a domain that vanished meanwhile is skipped
                    continue
                if volume_id in xml and disk_of_volume(read_domain(xml).disks, volume_id):
                    users.append(dom.UUIDString())
            return users
        return self._call("list the users of a volume", _users)

    def get_domain(self, server_id: str, *, with_state: bool = True) -> Domain:
        return self._call("read the domain", lambda conn: self._domain(
            self._lookup(conn, server_id), with_state), server_id)

    def attach_disk(self, server_id: str, spec: DiskSpec, *, live: bool, config: bool) -> None:
        flags = ((libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0)
                 | (libvirt.VIR_DOMAIN_AFFECT_CONFIG if config else 0))
        xml = disk_xml(spec)

        def _attach(conn) -> None:
            try:
                self._lookup(conn, server_id).attachDeviceFlags(xml, flags)
            except libvirt.libvirtError as exc:
                # the CHAP secret the disk names is not there: libvirt looks it up
                # at the attach (the Node does not ask first)
                if (exc.get_error_code() == libvirt.VIR_ERR_NO_SECRET
                        and isinstance(spec.source, IscsiSource) and spec.source.secret_usage):
                    raise not_staged(spec.serial, spec.source.secret_usage) from None
                raise
        self._call(f"attach disk {spec.device}", _attach, server_id)

    def request_detach(self, server_id: str, device: str, *, live: bool,
                       config: bool, alias: str = "") -> PendingDetach:
        def _request(conn) -> PendingDetach:
            dom = self._lookup(conn, server_id)
            if config:
                self._detach_config(dom, device)
            return self._request_live(dom, server_id, device, alias) if live else DetachDone(
                DetachOutcome.REMOVED)
        return self._call(f"detach disk {device}", _request, server_id)

    def resize_disk(self, server_id: str, device: str, size_bytes: int) -> int:
        def _resize(conn) -> int:
            dom = self._lookup(conn, server_id)
            dom.blockResize(device, size_bytes, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
            return dom.blockInfo(device, 0)[0]
        return self._call(f"resize disk {device}", _resize, server_id)

    def disk_capacity(self, server_id: str, device: str) -> int:
        return self._call(f"read the size of disk {device}", lambda conn: self._lookup(
            conn, server_id).blockInfo(device, 0)[0], server_id)

    @staticmethod
    def _detach_config(dom, device: str) -> None:
        xml = find_disk_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), device)
        if xml is not None:
            dom.detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_CONFIG)

    def _request_live(self, dom, server_id: str, device: str, alias: str) -> PendingDetach:
        if not alias:
            disk = next((d for d in parse_disks(dom.XMLDesc(0)) if d.device == device), None)
            if disk is None:
                return DetachDone(DetachOutcome.REMOVED)
            alias = disk.alias
        waiter = self._waiters.expect(dom.UUIDString(), alias)  # before the detach
        try:
            self._send_detach(dom, alias)
        except libvirt.libvirtError as exc:
            self._waiters.discard(waiter)
            # the alias the caller read may be gone since: then so is the disk
            if _is_connection_error(exc) or any(
                    d.device == device for d in parse_disks(dom.XMLDesc(0))):
                raise
            return DetachDone(DetachOutcome.REMOVED)
        except BaseException:
            self._waiters.discard(waiter)
            raise
        return _LiveDetach(self, server_id, device, waiter)

    def _has_live_disk(self, server_id: str, device: str) -> bool:
        return self._call("read the domain", lambda conn: any(
            d.device == device for d in parse_disks(
                self._lookup(conn, server_id).XMLDesc(0))), server_id)

    @staticmethod
    def _send_detach(dom, alias: str) -> None:
        """Ask QEMU to unplug (asynchronous: completion is DEVICE_REMOVED)."""
        try:
            dom.detachDeviceAlias(alias, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as exc:
            if _ALREADY_UNPLUGGING not in _error_message(exc):
                raise
            LOG.debug("%s is already being unplugged", alias)

    # -- secrets ------------------------------------------------------------------------

    @staticmethod
    def _secret(conn, usage: str):
        try:
            return conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_ISCSI, usage)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
                return None
            raise

    def define_secret(self, spec: SecretSpec) -> bool:
        def _define(conn) -> bool:
            try:
                secret = conn.secretDefineXML(secret_xml(spec), 0)
            except libvirt.libvirtError as exc:
                # libvirt refuses a second secret of a usage ("a secret with UUID
                # ... already defined for use with ..."): asked after a refusal
                # only, so that a new secret costs what virsh's define does
                if not _is_connection_error(exc) and self._secret(conn, spec.usage) is not None:
                    return False
                raise
            try:
                secret.setValue(spec.value, 0)
            except libvirt.libvirtError:
                secret.undefine()
                raise
            return True
        return self._call(f"define the secret {spec.usage}", _define)

    def undefine_secret(self, usage: str) -> bool:
        def _undefine(conn) -> bool:
            secret = self._secret(conn, usage)
            if secret is None:
                return False
            secret.undefine()
            return True
        return self._call(f"undefine the secret {usage}", _undefine)

    def has_secret(self, usage: str) -> bool:
        return self._call(f"look up the secret {usage}",
                          lambda conn: self._secret(conn, usage) is not None)

    def probe(self) -> None:
        """libvirtd answers (reconnecting when it restarted)."""
        self._call("reach libvirtd", lambda conn: conn.getLibVersion())

    def secret_usages(self) -> list[str]:
        return self._call("list the secrets", lambda conn: sorted(
            s.usageID() for s in conn.listAllSecrets()
            if s.usageType() == libvirt.VIR_SECRET_USAGE_TYPE_ISCSI))
