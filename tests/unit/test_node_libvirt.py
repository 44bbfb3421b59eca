"""The libvirt adapter's connection handling and error mapping, on a fake
connection object (no libvirtd needed), and the event waiters."""

from __future__ import annotations

import threading

import pytest

from vmattach.common.errors import BackendError, FailedPrecondition, NotFound
from vmattach.node.events import DeviceWaiters
from vmattach.node.hypervisor import DetachOutcome, DiskSpec, IscsiSource, SecretSpec
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


UUID = "5b1e0b4c-4b0e-4d8e-9d5c-1f2e3a4b5c6d"
RUNNING_XML = (f"<domain type='qemu' id='3'><name>guest</name><uuid>{UUID}</uuid>"
               "<devices><disk type='file' device='disk'><target dev='sda' bus='scsi'/>"
               "<alias name='scsi0-0-0-0'/></disk></devices></domain>")


class FakeDomain:
    """Just enough of virDomain: its XML, state and persistence, and the
    disks attached to it."""

    def __init__(self, xml: str = RUNNING_XML, attach_error: libvirt.libvirtError | None = None):
        self.xml, self.attach_error = xml, attach_error
        self.attached: list[str] = []
        self.gone = False
        self.states_read = 0

    def _check(self):
        if self.gone:
            raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, "Domain not found")

    def UUIDString(self):
        return UUID

    def state(self):
        self._check()
        self.states_read += 1
        return [libvirt.VIR_DOMAIN_RUNNING, 1]

    def XMLDesc(self, flags):
        self._check()
        return self.xml

    def isPersistent(self):
        self._check()
        return 0

    def attachDeviceFlags(self, xml, flags):
        self._check()
        if self.attach_error is not None:
            raise self.attach_error
        self.attached.append(xml)


class DomainConnection(FakeConnection):
    def __init__(self, dom: FakeDomain):
        super().__init__()
        self.dom = dom
        self.lookups = 0

    def lookupByUUIDString(self, uuid):
        self.lookups += 1
        if uuid != UUID or self.dom.gone:
            return super().lookupByUUIDString(uuid)
        return self.dom


def spec(volume_id: str = "a" * 8, usage: str = "volume-x") -> DiskSpec:
    source = IscsiSource(target_iqn="iqn.2010-10.org.openstack:volume-x", lun=1,
                         host="127.0.0.1", port=3260, initiator_iqn="iqn.2004-10.org.x:node",
                         auth_username="user" if usage else "", secret_usage=usage)
    return DiskSpec(device="sdb", bus="scsi", serial=volume_id, alias=f"ua-{volume_id}",
                    source=source)


def test_domain_read_in_three_calls_running_told_by_the_xml_id():
    conn = DomainConnection(FakeDomain())
    hv, _ = adapter(conn)
    dom = hv.get_domain(UUID)
    assert (dom.name, dom.state, dom.active, dom.persistent) == ("guest", "running", True, False)
    assert [d.device for d in dom.disks] == ["sda"]
    conn.dom.xml = RUNNING_XML.replace(" id='3'", "")
    assert not hv.get_domain(UUID).active
    light = hv.get_domain(UUID, with_state=False)  # the Node's attach and detach: two calls
    assert (light.state, light.active, light.persistent) == ("", False, False)
    assert conn.dom.states_read == 2


def test_a_domain_handle_is_looked_up_once_per_connection():
    conn = DomainConnection(FakeDomain())
    hv, opened = adapter(conn, DomainConnection(conn.dom))
    hv.get_domain(UUID)
    hv.attach_disk(UUID, spec(), live=True, config=False)
    hv.get_domain(UUID)
    assert conn.lookups == 1 and len(conn.dom.attached) == 1
    conn.alive = False  # libvirtd restarted: the handles went with the connection
    hv.get_domain(UUID)
    assert len(opened) == 2 and conn.lookups == 1
    # a domain that went is NotFound, its handle dropped; one defined again is found
    conn.dom.gone = True
    with pytest.raises(NotFound):
        hv.get_domain(UUID)
    with pytest.raises(NotFound):
        hv.get_domain(UUID)
    conn.dom.gone = False
    assert hv.get_domain(UUID).name == "guest"


def test_an_attach_whose_secret_is_missing_is_not_staged():
    missing = libvirt_error(libvirt.VIR_ERR_NO_SECRET,
                            "secret not found: no secret with matching usage 'volume-x'")
    hv, _ = adapter(DomainConnection(FakeDomain(attach_error=missing)))
    with pytest.raises(FailedPrecondition, match="not staged") as err:
        hv.attach_disk(UUID, spec(), live=True, config=False)
    assert err.value.reason == "VOLUME_NOT_STAGED"


class SecretConnection(FakeConnection):
    """Secrets by usage, refused twice as libvirt does."""

    def __init__(self):
        super().__init__()
        self.secrets: dict[str, bytes | None] = {}
        self.lookups = 0

    def secretDefineXML(self, xml, flags):
        import xml.etree.ElementTree as ET
        usage = ET.fromstring(xml).findtext("usage/target")
        if usage in self.secrets:
            raise libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, "a secret with UUID x already"
                                f" defined for use with {usage}")
        self.secrets[usage] = None
        conn = self

        class Secret:
            def setValue(self, value, flags):
                conn.secrets[usage] = value

            def undefine(self):
                del conn.secrets[usage]
        return Secret()

    def secretLookupByUsage(self, kind, usage):
        self.lookups += 1
        if usage not in self.secrets:
            raise libvirt_error(libvirt.VIR_ERR_NO_SECRET, f"no secret with matching usage '{usage}'")
        return object()


def test_a_secret_is_defined_without_a_lookup_and_never_replaced():
    conn = SecretConnection()
    hv, _ = adapter(conn)
    assert hv.define_secret(SecretSpec(usage="volume-x", value=b"first"))
    assert conn.lookups == 0 and conn.secrets == {"volume-x": b"first"}
    assert not hv.define_secret(SecretSpec(usage="volume-x", value=b"second"))
    assert conn.secrets == {"volume-x": b"first"}


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
