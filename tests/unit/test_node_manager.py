"""NodeManager on the fake hypervisor: publish/unpublish/stage/unstage,
validation, idempotency and the guest that never lets go."""

from __future__ import annotations

import threading
import time

import pytest

from tests.support.fake_hypervisor import FakeHypervisor
from tests.support.node_helpers import NODE_IQN, file_info, iscsi_info, make_manager, new_id
from vmattach.common.errors import (
    Aborted,
    BackendError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from vmattach.node.connectors.iscsi_qemu import secret_usage
from vmattach.node.hypervisor import Disk
from vmattach.node.manager import parse_device


@pytest.fixture
def hv():
    return FakeHypervisor()


@pytest.fixture
def manager(hv):
    return make_manager(hv)


@pytest.fixture
def volume_file(tmp_path):
    path = tmp_path / "volume.img"
    path.write_bytes(b"\0" * 512)
    return path


def attach_file(manager, server_id, path, device="/dev/vdb", volume_id=None):
    volume_id = volume_id or new_id()
    info = file_info(path)
    staged = manager.stage(volume_id, info)
    return volume_id, manager.publish(server_id, volume_id, device, info, staged)


# -- devices ---------------------------------------------------------------------------

@pytest.mark.parametrize("device, expected", [("/dev/vdb", ("vdb", "virtio")),
                                              ("/dev/sdc", ("sdc", "scsi")),
                                              ("/dev/hdb", ("hdb", "ide")),
                                              ("/dev/vdaa", ("vdaa", "virtio"))])
def test_parse_device(device, expected):
    assert parse_device(device) == expected


@pytest.mark.parametrize("device", ["vdb", "/dev/", "/dev/vdb/../x", "/dev/vd b",
                                    "/dev/vdb'/><x", "/dev/VDB", "/dev/xvdb", "/dev/nbd0", ""])
def test_bad_device_is_invalid_argument(manager, hv, volume_file, device):
    dom = hv.add_domain()
    with pytest.raises(InvalidArgument, match=r"The supplied device path \(.*\) is invalid\."):
        attach_file(manager, dom.uuid, volume_file, device)
    assert dom.live == []


# -- publish ---------------------------------------------------------------------------

def test_publish_running_persistent_domain_affects_live_and_config(manager, hv, volume_file):
    dom = hv.add_domain()
    vid, disk = attach_file(manager, dom.uuid, volume_file, "/dev/sdb")
    assert disk == Disk("sdb", "scsi", vid, f"ua-{vid}")
    assert ("attach_disk", dom.uuid, "sdb", True, True) in hv.calls
    assert dom.live == dom.config == [disk]
    spec = hv.attached[(dom.uuid, "sdb")]
    assert spec.serial == vid and spec.cache == "none" and spec.source.path == str(volume_file)


def test_publish_transient_domain_affects_live_only(manager, hv, volume_file):
    dom = hv.add_domain(persistent=False)
    attach_file(manager, dom.uuid, volume_file)
    assert ("attach_disk", dom.uuid, "vdb", True, False) in hv.calls and dom.config == []


def test_publish_shutoff_domain_affects_config_only(manager, hv, volume_file):
    dom = hv.add_domain(state="shutoff")
    attach_file(manager, dom.uuid, volume_file)
    assert ("attach_disk", dom.uuid, "vdb", False, True) in hv.calls and len(dom.config) == 1


def test_publish_is_idempotent(manager, hv, volume_file):
    dom = hv.add_domain()
    vid, disk = attach_file(manager, dom.uuid, volume_file)
    assert manager.publish(dom.uuid, vid, "/dev/vdc", file_info(volume_file)) == disk
    assert len(dom.live) == 1


def test_publish_device_in_use(manager, hv, volume_file):
    dom = hv.add_domain(disks=(Disk("vda", "virtio", "", "virtio-disk0"),))
    with pytest.raises(FailedPrecondition,
                       match=r"The supplied device path \(/dev/vda\) is in use\."):
        attach_file(manager, dom.uuid, volume_file, "/dev/vda")


def test_publish_unknown_server_is_not_found(manager, volume_file):
    with pytest.raises(NotFound):
        attach_file(manager, new_id(), volume_file)


def test_publish_qemu_iscsi_needs_stage(manager, hv):
    dom = hv.add_domain()
    vid = new_id()
    with pytest.raises(FailedPrecondition, match="not staged"):
        manager.publish(dom.uuid, vid, "/dev/vdb", iscsi_info(vid))
    staged = manager.stage(vid, iscsi_info(vid))
    disk = manager.publish(dom.uuid, vid, "/dev/vdb", iscsi_info(vid), staged)
    source = hv.attached[(dom.uuid, "vdb")].source
    assert disk.serial == vid and source.initiator_iqn == NODE_IQN
    assert source.secret_usage == staged.secret_usage == f"volume-{vid}"


def test_publish_backend_error_propagates(manager, hv, volume_file):
    dom = hv.add_domain()
    hv.inject_error("attach_disk", BackendError("libvirt could not attach disk: boom"))
    with pytest.raises(BackendError, match="boom"):
        attach_file(manager, dom.uuid, volume_file)


# -- unpublish -------------------------------------------------------------------------

def test_unpublish_detaches_and_is_idempotent(manager, hv, volume_file):
    dom = hv.add_domain()
    vid, _ = attach_file(manager, dom.uuid, volume_file)
    manager.unpublish(dom.uuid, vid)
    assert dom.live == dom.config == []
    manager.unpublish(dom.uuid, vid)  # already gone: OK
    assert [c for c in hv.calls if c[0] == "request_detach"] == [
        ("request_detach", dom.uuid, "vdb", True, True)]


def test_unpublish_finds_disk_by_alias(manager, hv):
    vid = new_id()
    dom = hv.add_domain(disks=(Disk("vdb", "virtio", "other-serial", f"ua-{vid}"),))
    manager.unpublish(dom.uuid, vid)
    assert dom.live == []


def test_unpublish_never_releasing_guest_fails_and_disk_stays(hv, volume_file):
    manager = make_manager(hv, detach_retries=2)
    dom = hv.add_domain(persistent=False, never_releases=True)
    vid, disk = attach_file(manager, dom.uuid, volume_file)
    with pytest.raises(FailedPrecondition) as err:
        manager.unpublish(dom.uuid, vid)
    assert err.value.message == (f"The guest did not release the device vdb of server "
                                 f"{dom.uuid} after 2 attempts")
    assert len([c for c in hv.calls if c[0] == "request_detach"]) == 2
    listed = next(d for d in manager.list_servers() if d.uuid == dom.uuid)
    assert listed.disks == (disk,)


def test_unpublish_removal_failed_is_retried_then_fails(hv, volume_file):
    manager = make_manager(hv, detach_retries=3)
    dom = hv.add_domain()
    vid, _ = attach_file(manager, dom.uuid, volume_file)
    dom.removal_fails = True
    with pytest.raises(FailedPrecondition, match="did not release"):
        manager.unpublish(dom.uuid, vid)
    assert len([c for c in hv.calls if c[0] == "request_detach"]) == 3


def test_unpublish_unknown_server_is_not_found(manager):
    with pytest.raises(NotFound):
        manager.unpublish(new_id(), new_id())


# -- stage / unstage -------------------------------------------------------------------

def test_stage_and_unstage_are_idempotent(manager, hv):
    vid = new_id()
    assert manager.stage(vid, iscsi_info(vid)) == manager.stage(vid, iscsi_info(vid))
    assert list(hv.secrets) == [f"volume-{vid}"]
    assert manager.unstage(vid, iscsi_info(vid)) is True
    assert manager.unstage(vid, iscsi_info(vid)) is True
    assert hv.secrets == {}


def test_unstage_keeps_a_volume_another_server_uses(manager, hv):
    first, second = hv.add_domain(), hv.add_domain()
    vid = new_id()
    staged = manager.stage(vid, iscsi_info(vid))
    for dom in (first, second):
        manager.publish(dom.uuid, vid, "/dev/vdb", iscsi_info(vid), staged)
    manager.unpublish(first.uuid, vid)
    assert manager.unstage(vid, iscsi_info(vid)) is False
    assert f"volume-{vid}" in hv.secrets
    manager.unpublish(second.uuid, vid)
    assert manager.unstage(vid, iscsi_info(vid)) is True
    assert hv.secrets == {}


def test_unknown_driver_volume_type(manager):
    vid = new_id()
    with pytest.raises(InvalidArgument, match="not supported"):
        manager.stage(vid, iscsi_info(vid, driver_volume_type="rbd"))


# -- info and listing ------------------------------------------------------------------

def test_info(manager):
    info = manager.info()
    assert info.node_id == "node-1" and info.max_volumes_per_server == 26
    c = info.connector
    assert (c.ip, c.initiator, c.os_type, c.multipath) == ("127.0.0.1", NODE_IQN, "linux", False)
    assert c.host and c.platform


def test_list_servers_prefix_and_root(manager, hv, volume_file):
    hv.add_domain("scsi-vm", disks=(Disk("sda", "scsi", "", "scsi0-0-0-0"),))
    diskless = hv.add_domain("empty", state="paused")
    attach_file(manager, diskless.uuid, volume_file, "/dev/sdb")
    by_name = {d.name: d for d in manager.list_servers()}
    assert (by_name["scsi-vm"].device_prefix, by_name["scsi-vm"].root_disk.device) == ("sd", "sda")
    assert by_name["empty"].device_prefix == "vd" and by_name["empty"].root_disk is None
    assert by_name["empty"].state == "paused" and len(by_name["empty"].disks) == 1


def test_unstage_among_ten_thousand_domains_keeps_the_volume_one_of_them_uses(hv):
    """The manager's in-use check finds the one domain of 10,000 that has a
    disk of the volume (the last one, shut off: the disk is in its persistent
    definition only) and lets the volume go only once that disk is gone."""
    for i in range(10_000):
        hv.add_domain(f"vm-{i}", uuid=f"00000000-0000-0000-0000-{i:012d}")
    manager = make_manager(hv)
    assert len(manager.list_servers()) == 10_000
    vid = new_id()
    user = hv.domains["00000000-0000-0000-0000-000000009999"]
    manager.publish(user.uuid, vid, "/dev/vdb", iscsi_info(vid), manager.stage(vid, iscsi_info(vid)))
    user.state = "shutoff"
    assert manager.unstage(vid, iscsi_info(vid)) is False
    assert list(hv.secrets) == [f"volume-{vid}"]
    manager.unpublish(user.uuid, vid)
    assert manager.unstage(vid, iscsi_info(vid)) is True
    assert hv.secrets == {}
    assert manager.unstage(new_id(), iscsi_info(new_id())) is True


# -- extend, read-only, shareable ------------------------------------------------------------

def test_extend_resizes_the_running_disk_and_is_idempotent(manager, hv, volume_file):
    dom = hv.add_domain()
    vid, disk = attach_file(manager, dom.uuid, volume_file)
    assert manager.extend(dom.uuid, vid, 2 << 30, file_info(volume_file)) == 2 << 30
    assert ("resize_disk", dom.uuid, disk.device, 2 << 30) in hv.calls
    hv.calls.clear()
    assert manager.extend(dom.uuid, vid, 2 << 30, file_info(volume_file)) == 2 << 30
    assert not [c for c in hv.calls if c[0] == "resize_disk"]  # the size is there already


def test_extend_of_a_stopped_domain_has_nothing_live_to_resize(manager, hv, volume_file):
    dom = hv.add_domain(state="shutoff")
    vid, _disk = attach_file(manager, dom.uuid, volume_file)
    assert manager.extend(dom.uuid, vid, 2 << 30, file_info(volume_file)) == 0
    assert not [c for c in hv.calls if c[0] == "resize_disk"]


def test_extend_without_the_disk_is_not_found(manager, hv, volume_file):
    dom = hv.add_domain()
    with pytest.raises(NotFound, match="has no disk of volume"):
        manager.extend(dom.uuid, new_id(), 2 << 30, file_info(volume_file))
    with pytest.raises(NotFound):
        manager.extend(new_id(), new_id(), 2 << 30, file_info(volume_file))


def test_extend_with_a_bad_size_is_invalid(manager, hv, volume_file):
    dom = hv.add_domain()
    vid, _disk = attach_file(manager, dom.uuid, volume_file)
    for size in (0, -1, (1 << 60) + 1):
        with pytest.raises(InvalidArgument):
            manager.extend(dom.uuid, vid, size, file_info(volume_file))


def test_kernel_extend_rescans_and_waits_for_the_new_size(hv):
    from tests.support.fake_runner import FakeRunner
    runner = FakeRunner().on("blockdev", "--getsize64", stdout=f"{2 << 30}\n")
    manager = make_manager(hv, iscsi_connector="kernel", runner=runner)
    vid = new_id()
    dom = hv.add_domain()
    dom.live.append(Disk("vdb", "virtio", vid, f"ua-{vid}"))
    assert manager.extend(dom.uuid, vid, 2 << 30, iscsi_info(vid)) == 2 << 30
    rescan = ["iscsiadm", "-m", "node", "-T", f"iqn.2010-10.org.openstack:volume-{vid}", "-p",
              "127.0.0.1:3260", "--rescan"]
    assert rescan in runner.argvs
    assert runner.argvs.index(rescan) < len(runner.argvs) - 1  # the size read after the rescan


def test_kernel_extend_that_never_sees_the_size_fails_without_resizing(hv):
    from tests.support.fake_runner import FakeRunner
    from vmattach.node.connectors import KernelIscsiConnector
    runner = FakeRunner().on("blockdev", "--getsize64", stdout=f"{1 << 30}\n")
    connector = KernelIscsiConnector(runner, device_timeout=0.0)
    vid = new_id()
    with pytest.raises(FailedPrecondition, match="still has 1073741824 bytes after the rescan"):
        connector.extend(vid, iscsi_info(vid), 2 << 30)


def test_publish_readonly_and_shareable_from_the_connection_info(manager, hv, volume_file):
    dom = hv.add_domain()
    vid = new_id()
    info = file_info(volume_file, access_mode="ro", multiattach=True)
    manager.publish(dom.uuid, vid, "/dev/vdc", info, manager.stage(vid, info))
    spec = hv.attached[(dom.uuid, "vdc")]
    assert spec.readonly and spec.shareable and spec.cache == "none"


def test_a_second_detach_of_the_same_disk_is_aborted_at_once(hv, volume_file):
    manager = make_manager(hv, detach_timeout=30, detach_retries=1)
    dom = hv.add_domain(hangs_on_detach=True)
    vid, _ = attach_file(manager, dom.uuid, volume_file)
    other, _ = attach_file(manager, dom.uuid, volume_file, "/dev/vdc")
    first = threading.Thread(target=lambda: pytest.raises(FailedPrecondition, manager.unpublish,
                                                          dom.uuid, vid))
    first.start()
    try:
        deadline = time.monotonic() + 10
        while not any(c[0] == "request_detach" for c in hv.calls):
            assert time.monotonic() < deadline, "the first detach never started"
            time.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(Aborted) as err:
            manager.unpublish(dom.uuid, vid)
        assert time.monotonic() - started < 5  # not queued behind the 30 s wait
        assert err.value.reason == "DETACH_IN_PROGRESS"
        assert err.value.metadata == {"server_id": dom.uuid, "volume_id": vid}
        assert len([c for c in hv.calls if c[0] == "request_detach"]) == 1
    finally:
        hv.release_waits()
        first.join(10)
    assert not first.is_alive()
    # once the first one is over, the disk can be detached again (and the other one too)
    dom.hangs_on_detach = False
    manager.unpublish(dom.uuid, vid)
    manager.unpublish(dom.uuid, other)
    assert dom.live == []


def _start_detach(manager, hv, server_id, volume_id, device) -> tuple[threading.Thread, list]:
    """A detach on its own thread, once its request reached the guest
    (which holds on to the device); the list gets its exception or None."""
    outcome: list = []

    def run():
        try:
            manager.unpublish(server_id, volume_id)
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            outcome.append(exc)
    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 10
    while (server_id, device) not in hv.pending_detaches():
        assert not outcome, f"the detach ended early: {outcome}"
        assert time.monotonic() < deadline, "the detach never reached the guest"
        time.sleep(0.01)
    return thread, outcome


def test_a_detach_waiting_for_the_guest_leaves_the_server_free(hv, volume_file):
    manager = make_manager(hv, detach_timeout=30, detach_retries=1)
    dom = hv.add_domain(disks=(Disk("vda", "virtio"),), holds=("vdb",))
    held, _ = attach_file(manager, dom.uuid, volume_file, "/dev/vdb")
    other, _ = attach_file(manager, dom.uuid, volume_file, "/dev/vdc")
    thread, outcome = _start_detach(manager, hv, dom.uuid, held, "vdb")
    try:
        started = time.monotonic()
        manager.unpublish(dom.uuid, other)  # another disk of the same server
        new, disk = attach_file(manager, dom.uuid, volume_file, "/dev/vdd")  # a new one
        assert time.monotonic() - started < 5  # not behind the 30 s wait
        # the leaving disk is still the guest's, and its name stays taken
        assert [d.device for d in dom.live] == ["vda", "vdb", "vdd"]
        with pytest.raises(FailedPrecondition, match=r"\(/dev/vdb\) is in use"):
            attach_file(manager, dom.uuid, volume_file, "/dev/vdb")
        # attaching or extending the leaving volume is refused, not answered with it
        with pytest.raises(Aborted) as err:
            manager.publish(dom.uuid, held, "/dev/vde", file_info(volume_file))
        assert err.value.reason == "DETACH_IN_PROGRESS"
        with pytest.raises(Aborted):
            manager.extend(dom.uuid, held, 1024, file_info(volume_file))
        assert not outcome
    finally:
        hv.let_go(dom.uuid, "vdb")
        thread.join(10)
    assert outcome == [None]
    assert dom.live == [Disk("vda", "virtio"), disk]
    assert dom.config == [Disk("vda", "virtio"), disk]
    assert new == disk.serial


def test_secrets_stay_until_the_guest_let_go_of_the_disk(hv):
    manager = make_manager(hv, detach_timeout=30, detach_retries=1)
    dom = hv.add_domain(holds=("vdb",))
    vid = new_id()
    info = iscsi_info(vid)
    manager.publish(dom.uuid, vid, "/dev/vdb", info, manager.stage(vid, info))
    thread, outcome = _start_detach(manager, hv, dom.uuid, vid, "vdb")
    try:
        assert manager.unstage(vid, info) is False  # the guest still uses the volume
        assert manager.list_secrets() == [secret_usage(vid)]
    finally:
        hv.let_go(dom.uuid, "vdb")
        thread.join(10)
    assert outcome == [None]
    assert manager.unstage(vid, info) is True
    assert manager.list_secrets() == []


def test_a_guest_that_holds_on_is_asked_again_then_the_detach_fails(hv, volume_file):
    manager = make_manager(hv, detach_timeout=0.05, detach_retries=3)
    dom = hv.add_domain(holds=("vdb",))
    vid, disk = attach_file(manager, dom.uuid, volume_file)
    with pytest.raises(FailedPrecondition) as err:
        manager.unpublish(dom.uuid, vid)
    assert err.value.reason == "DETACH_NOT_COMPLETED"
    assert [c for c in hv.calls if c[0] == "request_detach"] == [
        ("request_detach", dom.uuid, "vdb", True, True)] * 3
    assert dom.live == [disk] and hv.pending_detaches() == []
    # the guest lets go later: the next detach completes
    hv.let_go(dom.uuid, "vdb")
    manager.unpublish(dom.uuid, vid)
    assert dom.live == []
