"""The libvirt adapter's connection handling and error mapping, on a fake
connection object (no libvirtd needed), and the event waiters."""

from __future__ import annotations

import threading

import pytest

from vmattach.common.errors import BackendError, NotFound
from vmattach.node.events import DeviceWaiters
from vmattach.node.hypervisor import DetachOutcome
from vmattach.node.libvirt_hypervisor import (
    LibvirtHypervisor,
    libvirt,  # the binding, only ever imported by the adapter
)


def libvirt_error(code: int, message: str) -> libvirt.libvirtError:
    exc = libvirt.libvirtError(message)
    exc.err = (code, 0, message, 2, None, None, None, 0, 0)
    return exc


class FakeConnection:
    """Just enough of virConnect for the adapter's plumbing."""

    def __init__(self, fail_with: libvirt.libvirtError | None = None):
        self.fail_with = fail_with
        self.alive = True
        self.closed = False
        self.registered: list[int] = []

    def isAlive(self):
        return 1 if self.alive else 0

    def setKeepAlive(self, interval, count):
        pass

    def domainEventRegisterAny(self, dom, event, cb, opaque):
        self.registered.append(event)
        return len(self.registered)

    def domainEventDeregisterAny(self, callback_id):
        pass

    def close(self):
        self.closed = True

    def listAllDomains(self, flags):
        if self.fail_with is not None:
            raise self.fail_with
        return []

    def lookupByUUIDString(self, uuid):
        raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN,
                            f"Domain not found: no domain with matching uuid '{uuid}'")


def adapter(*connections: FakeConnection) -> tuple[LibvirtHypervisor, list[str]]:
    opened: list[str] = []
    pending = list(connections)

    def opener(uri):
        opened.append(uri)
        return pending.pop(0)
    return LibvirtHypervisor("qemu:///test", opener=opener), opened


def test_connection_opened_lazily_once_with_event_callbacks():
    conn = FakeConnection()
    hv, opened = adapter(conn)
    assert opened == []
    assert hv.list_domains() == [] and hv.list_domains() == []
    assert opened == ["qemu:///test"]
    assert conn.registered == [libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
                               libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED,
                               libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE]
    hv.close()
    assert conn.closed


def test_lifecycle_events_reach_the_listener_by_name():
    conn = FakeConnection()
    hv, opened = adapter(conn)
    seen: list[tuple[str, str]] = []
    hv.set_event_listener(lambda server_id, event: seen.append((server_id, event)))
    assert opened == []  # start-up does not wait for libvirtd
    hv.list_domains()
    assert opened == ["qemu:///test"]

    class Dom:
        def UUIDString(self):
            return "5b1e0b4c-4b0e-4d8e-9d5c-1f2e3a4b5c6d"
    hv._on_lifecycle(conn, Dom(), libvirt.VIR_DOMAIN_EVENT_UNDEFINED, 0, None)
    hv._on_lifecycle(conn, Dom(), libvirt.VIR_DOMAIN_EVENT_STOPPED, 1, None)
    assert [e for _, e in seen] == ["undefined", "stopped"]


def test_dead_connection_is_reopened():
    first, second = FakeConnection(), FakeConnection()
    hv, opened = adapter(first, second)
    hv.list_domains()
    first.alive = False  # libvirtd restarted
    assert hv.list_domains() == []
    assert len(opened) == 2 and first.closed


def test_connection_error_mid_call_reconnects_once():
    broken = FakeConnection(libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR,
                                          "End of file while reading data"))
    hv, opened = adapter(broken, FakeConnection())
    assert hv.list_domains() == []
    assert len(opened) == 2 and broken.closed


def test_unknown_domain_is_not_found():
    hv, _ = adapter(FakeConnection())
    with pytest.raises(NotFound, match="Server abc could not be found"):
        hv.get_domain("abc")


def test_other_errors_are_backend_errors():
    hv, _ = adapter(FakeConnection(libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, "boom")))
    with pytest.raises(BackendError, match="libvirt could not list domains: boom"):
        hv.list_domains()


def test_unreachable_libvirtd_is_backend_error():
    def opener(uri):
        raise libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, "Failed to connect socket")
    with pytest.raises(BackendError, match="cannot connect to libvirt"):
        LibvirtHypervisor("qemu:///test", opener=opener).list_domains()


def test_waiter_registered_before_the_event_sees_it():
    waiters = DeviceWaiters()
    waiter = waiters.expect("dom", "ua-1")
    waiters.resolve("dom", "ua-1", DetachOutcome.REMOVED)  # arrives before anyone waits
    assert waiter.wait(0) is DetachOutcome.REMOVED
    waiters.discard(waiter)
    assert waiters.expect("dom", "ua-1").wait(0) is DetachOutcome.TIMED_OUT


def test_waiter_woken_from_another_thread():
    waiters = DeviceWaiters()
    waiter = waiters.expect("dom", "ua-1")
    threading.Thread(target=waiters.resolve, args=("dom", "ua-1", DetachOutcome.FAILED)).start()
    assert waiter.wait(30) is DetachOutcome.FAILED
