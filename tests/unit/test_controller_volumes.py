"""The Controller's state machine (controller/volumes.py VolumeManager) on a
real database (a SQLite file, and a fresh PostgreSQL database: the
`database_url` fixture), with a fake tgtd behind the real TgtAdm command
builder."""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import sql_counter
from tests.support.fake_tgt import FakeTarget, FakeTgtAdm, FakeTgtRunner
from vmattach.common.db import open_database
from vmattach.common.errors import (
    AlreadyExists,
    BackendError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from vmattach.common.secretbox import SecretBox
from vmattach.controller.models import MODELS, Export, Volume, VolumeAttachment
from vmattach.controller.tgt import IQN_PREFIX, TgtAdm
from vmattach.controller.volumes import ConnectionInfo, Connector, ExportRepair, VolumeManager

PORTAL = "127.0.0.1:3260"
GIB = 1 << 30
DETACH_MESSAGE = ("Unable to detach volume. Volume status must be 'in-use' and attach_status"
                  " must be 'attached' to detach.")


def initiator(tag: str = "a") -> str:
    return f"iqn.1993-08.org.debian:01:host-{tag}"


def connector(tag: str = "a") -> Connector:
    return Connector(initiator=initiator(tag), ip="127.0.0.1", host=f"host-{tag}",
                     platform="x86_64", os_type="linux")


@dataclass
class Env:
    m: VolumeManager
    tgt: FakeTgtRunner
    db_url: str
    box: SecretBox

    @property
    def sqlite_path(self) -> Path | None:
        return Path(self.db_url.removeprefix("sqlite:///")) if self.db_url.startswith("sqlite") \
            else None


@pytest.fixture
def env(tmp_path, database_url):
    db = open_database(database_url, MODELS)
    tgt = FakeTgtAdm()
    box = SecretBox.from_state_dir(tmp_path)
    manager = VolumeManager(db, tmp_path / "volumes", tgt, PORTAL, box, max_volume_gb=100)
    yield Env(manager, tgt.fake, database_url, box)
    db.close()


def server() -> str:
    return str(uuid.uuid4())


def status(m: VolumeManager, volume_id: str) -> tuple[str, str]:
    volume, _ = m.get(volume_id)
    return volume.status, volume.attach_status


def attached(env: Env, name: str = "vol") -> tuple[str, str, ConnectionInfo]:
    """A volume reserved, published (connector "a") and marked attached to a
    new server: (volume id, server id, connection info)."""
    volume_id = env.m.create(name, 1).id
    srv = server()
    env.m.reserve(volume_id, srv)
    info = env.m.publish(volume_id, srv, connector())
    env.m.mark_attached(volume_id, srv, "/dev/vdb", "rw")
    return volume_id, srv, info


# -- create --------------------------------------------------------------------------


def test_create_makes_an_available_sparse_file_of_the_size(env):
    vol = env.m.create("data-1", 2)
    assert (vol.status, vol.attach_status, vol.size_gb, vol.multiattach) == \
        ("available", "detached", 2, False)
    path = Path(vol.path)
    assert path.parent == env.m.volume_dir
    st = path.stat()
    assert st.st_size == 2 * GIB
    assert st.st_blocks * 512 < 1 << 20  # sparse: (almost) nothing allocated
    assert env.tgt.calls == []  # creating a volume does not export it


def test_create_is_idempotent_by_name(env):
    first = env.m.create("same", 1)
    again = env.m.create("same", 1)
    assert again.id == first.id
    assert len(os.listdir(env.m.volume_dir)) == 1


@pytest.mark.parametrize("size,multiattach", [(2, False), (1, True)])
def test_create_same_name_other_size_or_flag_is_already_exists(env, size, multiattach):
    first = env.m.create("same", 1)
    with pytest.raises(AlreadyExists) as err:
        env.m.create("same", size, multiattach)
    assert err.value.reason == "VOLUME_NAME_EXISTS"
    assert err.value.metadata["volume_id"] == first.id
    assert len(os.listdir(env.m.volume_dir)) == 1


@pytest.mark.parametrize("name", ["", "a" * 256, "bad/name", "../up", "new\nline", "trailing\n",
                                  "semi;colon", "<xml/>"])
def test_create_rejects_bad_names(env, name):
    with pytest.raises(InvalidArgument) as err:
        env.m.create(name, 1)
    assert "name" in err.value.message
    assert env.m.list(10)[0] == []
    assert os.listdir(env.m.volume_dir) == []


@pytest.mark.parametrize("size", [0, -1, 101, 2 ** 40])
def test_create_rejects_bad_sizes(env, size):
    with pytest.raises(InvalidArgument) as err:
        env.m.create("vol", size)
    assert "size_gb must be between 1 and 100" in err.value.message
    assert env.m.list(10)[0] == []


# -- delete --------------------------------------------------------------------------


def test_delete_removes_the_file_and_the_volume(env):
    vol = env.m.create("gone", 1)
    env.m.delete(vol.id)
    assert not Path(vol.path).exists()
    with pytest.raises(NotFound) as err:
        env.m.get(vol.id)
    assert err.value.message == f"Volume {vol.id} could not be found."
    assert err.value.reason == "VOLUME_NOT_FOUND"


def test_delete_of_an_unknown_volume_is_ok(env):
    env.m.delete(str(uuid.uuid4()))


def test_delete_of_a_reserved_volume_fails_and_keeps_it(env):
    vol = env.m.create("busy", 1)
    env.m.reserve(vol.id, server())
    with pytest.raises(FailedPrecondition) as err:
        env.m.delete(vol.id)
    assert "the status is attaching" in err.value.message
    assert Path(vol.path).exists()
    assert status(env.m, vol.id) == ("attaching", "attaching")


def test_delete_of_an_attached_volume_fails_and_keeps_its_export(env):
    volume_id, _, _ = attached(env)
    with pytest.raises(FailedPrecondition) as err:
        env.m.delete(volume_id)
    assert err.value.reason == "VOLUME_IN_USE"
    assert status(env.m, volume_id) == ("in-use", "attached")
    assert len(env.tgt.targets) == 1


# -- reserve / unreserve ---------------------------------------------------------------


def test_reserve_moves_available_to_attaching(env):
    vol = env.m.create("r", 1)
    srv = server()
    volume, atts = env.m.reserve(vol.id, srv)
    assert (volume.status, volume.attach_status) == ("attaching", "attaching")
    assert [(a.instance_uuid, a.attach_status) for a in atts] == [(srv, "reserved")]


@pytest.mark.parametrize("same_server", [True, False])
def test_second_reserve_fails(env, same_server):
    vol = env.m.create("r", 1)
    srv = server()
    env.m.reserve(vol.id, srv)
    with pytest.raises(FailedPrecondition) as err:
        env.m.reserve(vol.id, srv if same_server else server())
    assert err.value.message.startswith("Invalid volume: status must be 'available'")
    assert "the status is attaching" in err.value.message
    assert err.value.reason == "VOLUME_NOT_AVAILABLE"
    _, atts = env.m.get(vol.id)
    assert [a.instance_uuid for a in atts] == [srv]


def test_reserve_of_an_attached_volume_names_the_instance(env):
    volume_id, srv, _ = attached(env)
    with pytest.raises(FailedPrecondition) as err:
        env.m.reserve(volume_id, server())
    assert err.value.message == \
        f"Invalid volume: volume {volume_id} is already attached to instances: {srv}"
    assert status(env.m, volume_id) == ("in-use", "attached")


def test_reserve_of_an_unknown_volume_is_not_found(env):
    missing = str(uuid.uuid4())
    with pytest.raises(NotFound) as err:
        env.m.reserve(missing, server())
    assert err.value.message == f"Volume {missing} could not be found."


def test_reserve_in_a_project_finds_only_that_projects_volumes(env):
    """The facade reserves in the project its caller acts for: another
    project's volume is not found and stays as it was; its own is reserved."""
    a = env.m.create("data", 1, project_id="project-a")
    srv = server()
    with pytest.raises(NotFound) as err:
        env.m.reserve(a.id, srv, project_id="project-b")
    assert err.value.message == f"Volume {a.id} could not be found."
    assert status(env.m, a.id) == ("available", "detached")
    volume, atts = env.m.reserve(a.id, srv, project_id="project-a")
    assert (volume.status, volume.size_gb) == ("attaching", 1)
    assert [x.instance_uuid for x in atts] == [srv]
    # a second reserve of the attaching volume from the right project: refused as before
    with pytest.raises(FailedPrecondition):
        env.m.reserve(a.id, server(), project_id="project-a")


def test_multiattach_volume_can_be_reserved_while_in_use(env):
    vol = env.m.create("shared", 1, multiattach=True)
    a, b = server(), server()
    env.m.reserve(vol.id, a)
    env.m.mark_attached(vol.id, a, "/dev/vdb", "rw")
    volume, atts = env.m.reserve(vol.id, b)
    assert volume.status == "attaching"
    assert {(x.instance_uuid, x.attach_status) for x in atts} == {(a, "attached"), (b, "reserved")}
    volume, atts = env.m.mark_attached(vol.id, b, "/dev/vdc", "rw")
    assert (volume.status, volume.attach_status) == ("in-use", "attached")
    assert {(x.instance_uuid, x.mountpoint) for x in atts} == {(a, "/dev/vdb"), (b, "/dev/vdc")}


def test_multiattach_reserve_by_an_attached_server_is_already_exists_and_changes_nothing(env):
    vol = env.m.create("shared", 1, multiattach=True)
    a = server()
    env.m.reserve(vol.id, a)
    env.m.mark_attached(vol.id, a, "/dev/vdb", "rw")
    with pytest.raises(AlreadyExists) as err:
        env.m.reserve(vol.id, a)
    assert err.value.message == f"Invalid volume: volume {vol.id} already attached"
    assert status(env.m, vol.id) == ("in-use", "attached")  # the status change was rolled back


def test_unreserve_goes_back_to_available_and_is_idempotent(env):
    vol = env.m.create("u", 1)
    srv = server()
    env.m.reserve(vol.id, srv)
    for _ in range(2):
        volume, atts = env.m.unreserve(vol.id, srv)
        assert (volume.status, volume.attach_status, atts) == ("available", "detached", [])
    env.m.reserve(vol.id, server())  # reservable again


def test_unreserve_by_another_server_changes_nothing(env):
    vol = env.m.create("u", 1)
    srv = server()
    env.m.reserve(vol.id, srv)
    volume, atts = env.m.unreserve(vol.id, server())
    assert volume.status == "attaching"
    assert [a.instance_uuid for a in atts] == [srv]


def test_unreserve_of_a_published_reservation_removes_the_export(env):
    vol = env.m.create("u", 1)
    srv = server()
    env.m.reserve(vol.id, srv)
    env.m.publish(vol.id, srv, connector())
    assert len(env.tgt.targets) == 1
    volume, _ = env.m.unreserve(vol.id, srv)
    assert volume.status == "available"
    assert env.tgt.targets == {} and env.tgt.accounts == {}


def test_unreserve_of_an_attached_server_keeps_the_attachment(env):
    volume_id, srv, _ = attached(env)
    volume, atts = env.m.unreserve(volume_id, srv)
    assert (volume.status, [a.attach_status for a in atts]) == ("in-use", ["attached"])


def test_unreserve_of_an_unknown_volume_is_not_found(env):
    with pytest.raises(NotFound):
        env.m.unreserve(str(uuid.uuid4()), server())


# -- publish / unpublish --------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "not-an-iqn", "iqn.1993-08.org.debian:01:x\n",
                                 "iqn.1993-08.org.debian:01:a b"])
def test_publish_needs_a_valid_initiator(env, bad):
    vol = env.m.create("p", 1)
    srv = server()
    env.m.reserve(vol.id, srv)
    with pytest.raises(InvalidArgument) as err:
        env.m.publish(vol.id, srv, Connector(initiator=bad))
    assert "initiator" in err.value.message
    assert env.tgt.targets == {}


def test_publish_when_not_reserved_fails(env):
    vol = env.m.create("p", 1)
    with pytest.raises(FailedPrecondition) as err:
        env.m.publish(vol.id, server(), connector())
    assert err.value.reason == "VOLUME_NOT_RESERVED"
    assert env.tgt.targets == {}


def test_publish_for_another_server_than_the_reserving_one_fails(env):
    vol = env.m.create("p", 1)
    env.m.reserve(vol.id, server())
    with pytest.raises(FailedPrecondition):
        env.m.publish(vol.id, server(), connector())


def test_publish_of_an_unknown_volume_is_not_found(env):
    with pytest.raises(NotFound):
        env.m.publish(str(uuid.uuid4()), server(), connector())


def test_publish_exports_the_volume_with_chap_and_authorises_the_initiator(env):
    vol = env.m.create("p", 1)
    srv = server()
    env.m.reserve(vol.id, srv)
    info = env.m.publish(vol.id, srv, connector())
    assert info.target_iqn == IQN_PREFIX + vol.id
    assert (info.target_portal, info.target_lun, info.auth_method, info.driver_volume_type,
            info.access_mode, info.volume_id) == (PORTAL, 1, "CHAP", "iscsi", "rw", vol.id)
    assert len(info.auth_username) >= 12 and len(info.auth_password) >= 12
    [target] = env.tgt.targets.values()
    assert target.iqn == info.target_iqn
    assert target.luns == {1: vol.path}
    assert target.accounts == [info.auth_username]
    assert env.tgt.accounts[info.auth_username] == info.auth_password
    assert target.acls == [initiator()]
    _, [att] = env.m.get(vol.id)
    assert Connector.from_json(att.connector) == connector()
    assert info.auth_password not in repr(info)


def test_publish_twice_with_the_same_connector_gives_the_same_answer(env):
    vol = env.m.create("p", 1)
    srv = server()
    env.m.reserve(vol.id, srv)
    first = env.m.publish(vol.id, srv, connector())
    second = env.m.publish(vol.id, srv, connector())
    assert second == first
    assert (second.auth_username, second.auth_password) == (first.auth_username, first.auth_password)
    [target] = env.tgt.targets.values()
    assert target.acls == [initiator()]
    assert len(env.tgt.commands("target", "new")) == 1


def test_publish_to_a_second_connector_reuses_the_export_and_credentials(env):
    vol = env.m.create("shared", 1, multiattach=True)
    a, b = server(), server()
    env.m.reserve(vol.id, a)
    first = env.m.publish(vol.id, a, connector("a"))
    env.m.mark_attached(vol.id, a, "/dev/vdb", "rw")
    env.m.reserve(vol.id, b)
    second = env.m.publish(vol.id, b, connector("b"))
    assert (second.target_iqn, second.auth_username, second.auth_password) == \
        (first.target_iqn, first.auth_username, first.auth_password)
    [target] = env.tgt.targets.values()
    assert target.acls == [initiator("a"), initiator("b")]


def test_publish_when_tgt_fails_reports_a_backend_error_without_the_secret(env):
    vol = env.m.create("p", 1)
    srv = server()
    env.m.reserve(vol.id, srv)
    env.tgt.fail_on("account", "bind")
    with pytest.raises(BackendError) as err:
        env.m.publish(vol.id, srv, connector())
    assert env.tgt.targets == {}  # the half-made target was removed
    info = env.m.publish(vol.id, srv, connector())  # and a retry works
    assert info.auth_password not in err.value.message
    assert len(env.tgt.targets) == 1


def test_publish_failing_at_account_creation_does_not_leak_the_password(env):
    vol = env.m.create("p", 1)
    srv = server()
    env.m.reserve(vol.id, srv)
    env.tgt.fail_on("account", "new")
    with pytest.raises(BackendError) as err:
        env.m.publish(vol.id, srv, connector())
    info = env.m.publish(vol.id, srv, connector())
    assert "--password ***" in err.value.message
    assert info.auth_password not in err.value.message


# -- attachment_create / attachment_delete: the facade's two Controller steps ----------

def test_create_attachment_reserves_and_publishes_in_one_step(env):
    vol = env.m.create("ca", 1, project_id="p1")
    srv = server()
    (volume, atts), info = env.m.create_attachment(vol.id, srv, connector(), mode="ro",
                                                   project_id="p1")
    assert (volume.status, volume.size_gb) == ("attaching", 1)
    [att] = atts
    assert (att.instance_uuid, att.attach_status, att.attach_mode) == (srv, "reserved", "ro")
    assert Connector.load(att.connector).initiator == initiator("a")
    [target] = env.tgt.targets.values()
    assert target.acls == [initiator("a")] and target.iqn == info.target_iqn
    assert (info.access_mode, info.target_portal) == ("ro", PORTAL)
    assert info.auth_username and info.auth_password
    # the same as ReserveVolume + ControllerPublishVolume: publish again is idempotent
    assert env.m.publish(vol.id, srv, connector()).target_iqn == info.target_iqn
    env.m.mark_attached(vol.id, srv, "/dev/vdb", "ro")
    assert status(env.m, vol.id) == ("in-use", "attached")


def test_create_attachment_refusals_change_nothing(env):
    vol = env.m.create("ca", 1, project_id="p1")
    with pytest.raises(NotFound):  # another project's volume
        env.m.create_attachment(vol.id, server(), connector(), project_id="p2")
    with pytest.raises(InvalidArgument):
        env.m.create_attachment(vol.id, server(), Connector(initiator=""))
    with pytest.raises(NotFound):
        env.m.create_attachment(str(uuid.uuid4()), server(), connector())
    assert status(env.m, vol.id) == ("available", "detached")
    assert env.m.get(vol.id)[1] == [] and env.tgt.targets == {}
    srv = server()
    env.m.create_attachment(vol.id, srv, connector())
    with pytest.raises(FailedPrecondition):  # not multiattach: a second server is refused
        env.m.create_attachment(vol.id, server(), connector("b"))
    with pytest.raises(FailedPrecondition):  # and so is the same one again (it is attaching)
        env.m.create_attachment(vol.id, srv, connector())
    [target] = env.tgt.targets.values()
    assert target.acls == [initiator("a")]


def test_create_attachment_failing_at_tgtd_leaves_nothing_reserved(env):
    vol = env.m.create("ca", 1)
    env.tgt.fail_on("account", "bind")
    with pytest.raises(BackendError) as err:
        env.m.create_attachment(vol.id, server(), connector())
    assert status(env.m, vol.id) == ("available", "detached")
    assert env.m.get(vol.id)[1] == [] and env.tgt.targets == {}
    assert env.m.export_states()[0] == []  # no Export row either
    (_, _), info = env.m.create_attachment(vol.id, server(), connector())  # a retry works
    assert info.auth_password not in err.value.message


@pytest.mark.parametrize("stage", ["reserved", "attached", "detaching"])
def test_delete_attachment_ends_it_in_any_state_and_is_idempotent(env, stage):
    vol = env.m.create("da", 1)
    srv = server()
    env.m.create_attachment(vol.id, srv, connector())
    if stage != "reserved":
        env.m.mark_attached(vol.id, srv, "/dev/vdb", "rw")
    if stage == "detaching":
        env.m.begin_detaching(vol.id, srv)
    for _ in range(2):
        volume, atts = env.m.delete_attachment(vol.id, srv)
        assert (volume.status, volume.attach_status, atts) == ("available", "detached", [])
        assert env.tgt.targets == {} and env.tgt.accounts == {}
    with pytest.raises(NotFound):
        env.m.delete_attachment(str(uuid.uuid4()), srv)


def test_delete_attachment_of_a_multiattach_volume_keeps_the_others(env):
    vol = env.m.create("dm", 1, multiattach=True)
    first, second, third = server(), server(), server()
    for srv, tag in ((first, "a"), (second, "b"), (third, "b")):  # two servers on host b
        env.m.create_attachment(vol.id, srv, connector(tag))
        env.m.mark_attached(vol.id, srv, "/dev/vdb", "rw")
    volume, atts = env.m.delete_attachment(vol.id, first)
    assert volume.status == "in-use" and {a.instance_uuid for a in atts} == {second, third}
    [target] = env.tgt.targets.values()
    assert target.acls == [initiator("b")]  # a's initiator revoked, b's kept
    env.m.delete_attachment(vol.id, second)
    assert env.tgt.targets[target.tid].acls == [initiator("b")]  # the third still uses it
    volume, atts = env.m.delete_attachment(vol.id, third)
    assert (volume.status, atts, env.tgt.targets) == ("available", [], {})


def test_unpublish_removes_the_export_and_is_idempotent(env):
    volume_id, srv, _ = attached(env)
    for _ in range(2):
        env.m.unpublish(volume_id, srv, connector())
        assert env.tgt.targets == {} and env.tgt.accounts == {}
    _, [att] = env.m.get(volume_id)
    assert att.connector is None
    assert status(env.m, volume_id) == ("in-use", "attached")  # unpublish is not detach


def test_unpublish_of_an_unknown_volume_or_initiator_is_ok(env):
    env.m.unpublish(str(uuid.uuid4()), server(), connector())
    volume_id, srv, _ = attached(env)
    env.m.unpublish(volume_id, server(), connector("other"))
    [target] = env.tgt.targets.values()
    assert target.acls == [initiator("a")]


def test_unpublish_of_one_of_two_connectors_revokes_only_that_one(env):
    vol = env.m.create("shared", 1, multiattach=True)
    a, b = server(), server()
    env.m.reserve(vol.id, a)
    env.m.publish(vol.id, a, connector("a"))
    env.m.mark_attached(vol.id, a, "/dev/vdb", "rw")
    env.m.reserve(vol.id, b)
    env.m.publish(vol.id, b, connector("b"))
    env.m.unpublish(vol.id, a, connector("a"))
    [target] = env.tgt.targets.values()
    assert target.acls == [initiator("b")]
    env.m.unpublish(vol.id, b, connector("b"))
    assert env.tgt.targets == {}


def test_the_chap_secret_is_not_stored_in_plain_text(env):
    vol = env.m.create("secret", 1)
    srv = server()
    env.m.reserve(vol.id, srv)
    info = env.m.publish(vol.id, srv, connector())
    with env.m.db.connection_context():
        [secret] = [v.chap_secret for v in Volume.select(Volume.chap_secret)]
        volumes = list(Volume.select().tuples())
        rows = list(VolumeAttachment.select().tuples())
    assert info.auth_username in repr(volumes)  # the database does hold the volume's export...
    assert info.auth_password not in repr(volumes) + repr(rows)  # ...but not the password
    assert secret and info.auth_password not in secret
    assert env.box.decrypt(secret) == info.auth_password
    env.m.db.close()
    if env.sqlite_path is not None:  # nor do the database's files, journal included
        stored = b"".join(p.read_bytes() for p in env.sqlite_path.parent.glob(
            env.sqlite_path.name + "*"))
        assert info.auth_username.encode() in stored
        assert info.auth_password.encode() not in stored


def test_the_chap_password_is_never_logged(env, caplog):
    caplog.set_level("DEBUG")
    vol = env.m.create("secret", 1)
    srv = server()
    env.m.reserve(vol.id, srv)
    info = env.m.publish(vol.id, srv, connector())
    env.m.mark_attached(vol.id, srv, "/dev/vdb", "rw")
    env.m.unpublish(vol.id, srv, connector())
    assert caplog.records  # the manager does log
    for record in caplog.records:
        assert info.auth_password not in record.getMessage()


# -- attach bookkeeping ------------------------------------------------------------------


def test_mark_attached_records_the_attachment(env):
    vol = env.m.create("m", 1)
    srv = server()
    env.m.reserve(vol.id, srv)
    env.m.publish(vol.id, srv, connector())
    volume, [att] = env.m.mark_attached(vol.id, srv, "/dev/vdc", "ro")
    assert (volume.status, volume.attach_status) == ("in-use", "attached")
    assert (att.instance_uuid, att.attach_status, att.mountpoint, att.attach_mode) == \
        (srv, "attached", "/dev/vdc", "ro")
    volume, atts = env.m.mark_attached(vol.id, srv, "/dev/vdc", "ro")  # idempotent
    assert volume.status == "in-use" and len(atts) == 1


def test_mark_attached_without_a_reservation_fails(env):
    vol = env.m.create("m", 1)
    with pytest.raises(FailedPrecondition) as err:
        env.m.mark_attached(vol.id, server(), "/dev/vdb", "rw")
    assert err.value.reason == "VOLUME_NOT_RESERVED"
    assert status(env.m, vol.id) == ("available", "detached")


def test_mark_attached_rejects_a_bad_mode(env):
    vol = env.m.create("m", 1)
    srv = server()
    env.m.reserve(vol.id, srv)
    with pytest.raises(InvalidArgument):
        env.m.mark_attached(vol.id, srv, "/dev/vdb", "rwx")
    assert status(env.m, vol.id) == ("attaching", "attaching")


@pytest.mark.parametrize("state", ["available", "reserved", "detaching-other-server"])
def test_begin_detaching_needs_an_attached_volume(env, state):
    vol = env.m.create("d", 1)
    srv = server()
    if state == "reserved":
        env.m.reserve(vol.id, srv)
    elif state == "detaching-other-server":
        env.m.reserve(vol.id, srv)
        env.m.mark_attached(vol.id, srv, "/dev/vdb", "rw")
        env.m.begin_detaching(vol.id, srv)
        srv = server()
    before = status(env.m, vol.id)
    with pytest.raises(FailedPrecondition) as err:
        env.m.begin_detaching(vol.id, srv)
    assert err.value.message == DETACH_MESSAGE
    assert status(env.m, vol.id) == before


def test_detach_bookkeeping_round_trip(env):
    volume_id, srv, _ = attached(env)
    volume, [att] = env.m.begin_detaching(volume_id, srv)
    assert (volume.status, att.attach_status) == ("detaching", "detaching")
    volume, _ = env.m.begin_detaching(volume_id, srv)  # idempotent
    assert volume.status == "detaching"
    volume, [att] = env.m.roll_detaching(volume_id, srv)
    assert (volume.status, volume.attach_status, att.attach_status) == ("in-use", "attached", "attached")
    volume, _ = env.m.roll_detaching(volume_id, srv)  # idempotent: not detaching
    assert volume.status == "in-use"
    env.m.begin_detaching(volume_id, srv)
    env.m.unpublish(volume_id, srv, connector())
    for _ in range(2):  # idempotent
        volume, atts = env.m.mark_detached(volume_id, srv)
        assert (volume.status, volume.attach_status, atts) == ("available", "detached", [])
    assert env.tgt.targets == {}
    env.m.delete(volume_id)


def test_detaching_one_of_two_attachments_leaves_the_volume_in_use(env):
    vol = env.m.create("shared", 1, multiattach=True)
    a, b = server(), server()
    for srv, dev in ((a, "/dev/vdb"), (b, "/dev/vdc")):
        env.m.reserve(vol.id, srv)
        env.m.mark_attached(vol.id, srv, dev, "rw")
    env.m.begin_detaching(vol.id, a)
    volume, atts = env.m.mark_detached(vol.id, a)
    assert (volume.status, volume.attach_status) == ("in-use", "attached")
    assert [x.instance_uuid for x in atts] == [b]


def _set_volume(env: Env, volume_id: str, **columns) -> None:
    """Write the volume's row directly (a state left by a process that died)."""
    with env.m.db.connection_context():
        Volume.update(**columns).where(Volume.id == volume_id).execute()


def _rows(env: Env, volume_id: str) -> tuple[Volume, dict[str, str]]:
    """The volume's row and its attachments' statuses as the tables have them."""
    with env.m.db.connection_context():
        return Volume.get_by_id(volume_id), {
            a.instance_uuid: a.attach_status
            for a in VolumeAttachment.select().where(VolumeAttachment.volume == volume_id)}


def _shown(atts) -> dict[str, str]:
    return {a.instance_uuid: a.attach_status for a in atts}


def test_a_retry_of_mark_attached_completes_an_attach_left_half_done(env):
    """os-attach's two compare-and-swaps are statements of their own: a process
    that died between them leaves the attachment attached and the volume
    attaching; a retry for that mountpoint (the facade's reconciler) completes it."""
    vol = env.m.create("half", 1, multiattach=True)
    srv = server()
    env.m.create_attachment(vol.id, srv, connector())
    env.m.mark_attached(vol.id, srv, "/dev/vdb", "rw")
    _set_volume(env, vol.id, status="attaching", attach_status="attaching")
    volume, atts = env.m.get(vol.id)
    assert (volume.status, _shown(atts)) == ("attaching", {srv: "attached"})
    with pytest.raises(FailedPrecondition):  # no other reservation meanwhile
        env.m.reserve(vol.id, server())
    with pytest.raises(FailedPrecondition) as err:  # nor a retry of another mountpoint
        env.m.mark_attached(vol.id, srv, "/dev/vdc", "rw")
    assert err.value.reason == "VOLUME_NOT_RESERVED"
    assert status(env.m, vol.id) == ("attaching", "attaching")
    for _ in range(2):  # and then idempotent
        volume, [att] = env.m.mark_attached(vol.id, srv, "/dev/vdb", "rw")
        assert (volume.status, volume.attach_status, att.attach_status, att.mountpoint) == \
            ("in-use", "attached", "attached", "/dev/vdb")


def test_a_late_retry_of_mark_attached_leaves_another_servers_reservation_attaching(env):
    vol = env.m.create("shared", 1, multiattach=True)
    a, b = server(), server()
    env.m.reserve(vol.id, a)
    env.m.mark_attached(vol.id, a, "/dev/vdb", "rw")
    env.m.reserve(vol.id, b)
    volume, atts = env.m.mark_attached(vol.id, a, "/dev/vdb", "rw")
    assert (volume.status, _shown(atts)) == ("attaching", {a: "attached", b: "reserved"})
    volume, atts = env.m.mark_attached(vol.id, b, "/dev/vdc", "rw")
    assert (volume.status, _shown(atts)) == ("in-use", {a: "attached", b: "attached"})


@pytest.mark.parametrize("meanwhile", ["in-use", "available"])
def test_mark_attached_when_the_volume_left_attaching_meanwhile(env, meanwhile):
    """The attachment's compare-and-swap succeeds, the volume's does not: a
    volume settled in-use meanwhile is the attach done; in any other state the
    attach is refused and the attachment is reserved again."""
    vol = env.m.create("left", 1)
    srv = server()
    env.m.reserve(vol.id, srv)
    _set_volume(env, vol.id, status=meanwhile,
                attach_status="attached" if meanwhile == "in-use" else "detached")
    if meanwhile == "in-use":
        volume, [att] = env.m.mark_attached(vol.id, srv, "/dev/vdb", "rw")
        assert (volume.status, att.attach_status, att.mountpoint) == ("in-use", "attached", "/dev/vdb")
        return
    with pytest.raises(FailedPrecondition) as err:
        env.m.mark_attached(vol.id, srv, "/dev/vdb", "rw")
    assert err.value.reason == "VOLUME_NOT_RESERVED"
    volume, [att] = env.m.get(vol.id)
    assert (volume.status, att.attach_status, att.mountpoint) == ("available", "reserved", "")


def test_begin_detaching_is_recorded_on_the_volume_and_every_view_shows_the_attachment_detaching(env):
    volume_id, srv, _ = attached(env)
    for _ in range(2):  # a retry is answered with the same view
        volume, [att] = env.m.begin_detaching(volume_id, srv)
        assert (volume.status, volume.attach_status, att.attach_status, att.mountpoint) == \
            ("detaching", "attached", "detaching", "/dev/vdb")
        assert (volume, [att]) == env.m.get(volume_id)
    _, attachments, _ = env.m.list(10)
    assert _shown(attachments[volume_id]) == {srv: "detaching"}
    row, rows = _rows(env, volume_id)
    assert (row.status, row.detaching_instance, rows) == ("detaching", srv, {srv: "attached"})
    # an attachment being detached is neither published nor marked attached again
    with pytest.raises(FailedPrecondition) as err:
        env.m.publish(volume_id, srv, connector())
    assert err.value.reason == "VOLUME_NOT_RESERVED"
    with pytest.raises(FailedPrecondition) as err:
        env.m.mark_attached(volume_id, srv, "/dev/vdb", "rw")
    assert err.value.reason == "VOLUME_NOT_RESERVED"
    volume, [att] = env.m.roll_detaching(volume_id, srv)
    assert (volume.status, att.attach_status) == ("in-use", "attached")
    assert _rows(env, volume_id)[0].detaching_instance is None


def test_one_detach_at_a_time_on_a_multiattach_volume(env):
    """While one server's detach runs, another's begin_detaching is refused and
    its roll_detaching changes nothing; another attachment ending keeps the
    volume detaching; the one named ending clears it."""
    vol = env.m.create("shared", 1, multiattach=True)
    a, b, c = server(), server(), server()
    for srv in (a, b, c):
        env.m.reserve(vol.id, srv)
        env.m.mark_attached(vol.id, srv, "/dev/vdb", "rw")
    volume, atts = env.m.begin_detaching(vol.id, a)
    assert (volume.status, _shown(atts)) == ("detaching", {a: "detaching", b: "attached", c: "attached"})
    with pytest.raises(FailedPrecondition) as err:
        env.m.begin_detaching(vol.id, b)
    assert err.value.message == DETACH_MESSAGE
    volume, atts = env.m.roll_detaching(vol.id, b)
    assert (volume.status, _shown(atts)) == ("detaching", {a: "detaching", b: "attached", c: "attached"})
    volume, atts = env.m.mark_detached(vol.id, b)
    assert (volume.status, _shown(atts)) == ("detaching", {a: "detaching", c: "attached"})
    volume, atts = env.m.delete_attachment(vol.id, a)
    assert (volume.status, volume.attach_status, _shown(atts)) == ("in-use", "attached", {c: "attached"})
    assert _rows(env, vol.id)[0].detaching_instance is None
    volume, atts = env.m.begin_detaching(vol.id, c)  # the next detach may begin
    assert (volume.status, _shown(atts)) == ("detaching", {c: "detaching"})
    volume, atts = env.m.mark_detached(vol.id, c)
    assert (volume.status, volume.attach_status, atts) == ("available", "detached", [])
    assert _rows(env, vol.id)[0].detaching_instance is None


def test_os_attach_is_two_statements_and_os_begin_detaching_one(env):
    """Counted by SQLite's trace (BEGIN and COMMIT included): no transaction."""
    if env.sqlite_path is None:
        pytest.skip("statements are counted by SQLite's trace")
    counter = sql_counter.install()  # traces the connections opened from now on
    try:
        db = open_database(env.db_url, MODELS)
        m = VolumeManager(db, env.m.volume_dir, FakeTgtAdm(), PORTAL, env.box)
        vol = m.create("counted", 1)
        srv = server()
        m.create_attachment(vol.id, srv, connector())
        spent = []
        for call, args in ((m.mark_attached, ("/dev/vdb", "rw")), (m.begin_detaching, ())):
            before = counter.total()
            call(vol.id, srv, *args)
            spent.append(counter.total() - before)
        db.close()
    finally:
        counter.uninstall()
    assert spent == [2, 1]


@pytest.mark.parametrize("op", ["mark_attached", "begin_detaching", "roll_detaching", "mark_detached"])
def test_bookkeeping_of_an_unknown_volume_is_not_found(env, op):
    args = ("/dev/vdb", "rw") if op == "mark_attached" else ()
    with pytest.raises(NotFound):
        getattr(env.m, op)(str(uuid.uuid4()), server(), *args)


# -- listing -------------------------------------------------------------------------------


def test_list_pages_through_all_volumes_once_in_creation_order(env):
    ids = [env.m.create(f"v{i}", 1).id for i in range(5)]
    seen, token, pages = [], "", 0
    while True:
        volumes, attachments, token = env.m.list(2, token)
        pages += 1
        assert len(volumes) <= 2
        seen += [v.id for v in volumes]
        assert set(attachments) == {v.id for v in volumes}
        if not token:
            break
    assert seen == ids
    assert pages == 3


@pytest.mark.parametrize("token", ["garbage", "!!!", "eHl6", "MjAyNC0wMS0wMXxhfGI="])
def test_list_rejects_a_bad_page_token(env, token):
    env.m.create("v", 1)
    with pytest.raises(InvalidArgument) as err:
        env.m.list(2, token)
    assert "page_token" in err.value.message


# -- restart ---------------------------------------------------------------------------------


def test_ensure_exports_recreates_targets_and_acls_after_a_tgtd_restart(env):
    volume_id, srv, info = attached(env)
    stale_tid, foreign_tid = 77, 78
    env.tgt.restart()
    # ours: its backing file is in our volume directory; foreign: another tool's
    stale_id = str(uuid.uuid4())
    env.tgt.targets[stale_tid] = FakeTarget(stale_tid, IQN_PREFIX + stale_id,
                                            {1: str(env.m.volume_dir / f"volume-{stale_id}.img")})
    foreign = FakeTarget(foreign_tid, IQN_PREFIX + str(uuid.uuid4()), {1: "/srv/other.img"})
    env.tgt.targets[foreign_tid] = foreign
    assert env.m.ensure_exports() == 1
    assert env.tgt.targets.pop(foreign_tid) == foreign  # never touched
    [target] = env.tgt.targets.values()
    assert target.iqn == info.target_iqn
    assert target.acls == [initiator()]
    assert env.tgt.accounts == {info.auth_username: info.auth_password}
    assert env.m.ensure_exports() == 0  # nothing to do the second time
    assert env.m.publish(volume_id, srv, connector()) == info


def test_the_periodic_check_paces_itself_after_each_target_listed_not_its_repairs(env):
    """The periodic export check calls its pace (a common.periodic.Pacer)
    after each target of tgtd's listing; the targets it re-creates do not
    wait for it."""
    for k in range(3):
        attached(env, f"vol-{k}")
    paces: list[int] = []
    assert env.m.ensure_exports(lambda: paces.append(len(env.tgt.targets))) == 0
    assert paces == [3, 3, 3]
    env.tgt.restart()
    paces.clear()
    assert env.m.ensure_exports(lambda: paces.append(len(env.tgt.targets))) == 3
    assert paces == []  # nothing listed: the three were re-created without a pause
    assert len(env.tgt.targets) == 3


def _listings(env: Env) -> int:
    """How many times tgtd's whole listing was asked for."""
    return sum("--tid" not in argv for argv in env.tgt.commands("target", "show"))


def test_an_export_made_while_the_check_reads_the_listing_waits_for_the_next_round(env):
    """Attaches go on while the periodic check reads tgtd's listing: an export
    made meanwhile is missing from it though its target is there. It is not
    repaired (which would list every target again, under its volume's lock)."""
    attached(env, "before")
    made: list = []

    def attach_meanwhile():
        if not made:
            made.append(attached(env, "meanwhile"))

    assert env.m.ensure_exports(attach_meanwhile) == 0
    assert _listings(env) == 1
    volume_id, srv, info = made[0]
    [target] = [t for t in env.tgt.targets.values() if t.iqn == info.target_iqn]
    assert target.acls == [initiator()]
    assert env.m.ensure_exports() == 0  # the next round: listed, as it should be
    env.tgt.restart()
    assert env.m.ensure_exports() == 2  # a missing target is repaired at once


def test_a_target_gone_with_its_detach_while_the_check_ran_costs_one_request(env):
    """A target in the listing whose volume was detached meanwhile (its export
    and target gone) is looked up by tid, not by listing every target again."""
    volume_id, srv, _ = attached(env, "leaving")
    attached(env, "staying")

    def detach_meanwhile():
        if env.m.get(volume_id)[1]:
            env.m.delete_attachment(volume_id, srv)

    assert env.m.ensure_exports(detach_meanwhile) == 0
    assert _listings(env) == 1
    assert len(env.tgt.targets) == 1


def test_a_volume_attached_again_while_the_check_ran_keeps_its_new_export(env):
    """Detached and attached again while the check reads tgtd's listing, a
    volume has a new export (at another tid) while the listing shows its old
    target. The check leaves it to the next round: it must not write the old
    target's tid on the new export, nor allow its initiator on the target now
    at that tid (another volume's)."""
    attached(env, "first")
    volume_id, srv, info = attached(env, "again")
    other: list = []

    def detach_and_attach_again():
        if other:
            return
        env.m.delete_attachment(volume_id, srv)
        other.append(attached(env, "other"))  # may take the tid the volume had
        srv2 = server()
        env.m.reserve(volume_id, srv2)
        env.m.publish(volume_id, srv2, connector("b"))
        env.m.mark_attached(volume_id, srv2, "/dev/vdb", "rw")

    env.m.ensure_exports(detach_and_attach_again)
    assert _listings(env) == 1
    with env.m.db.connection_context():
        export = Export.get(Export.volume == volume_id)
    [(tid, target)] = [(t, v) for t, v in env.tgt.targets.items() if v.iqn == info.target_iqn]
    assert (export.target_tid or export.tid) == tid
    assert target.acls == [initiator("b")]
    other_iqn = other[0][2].target_iqn
    assert [v.acls for v in env.tgt.targets.values() if v.iqn == other_iqn] == [[initiator()]]
    assert env.m.ensure_exports() == 0  # the next round finds all three as they should be


def test_a_tid_taken_by_another_controller_moves_the_export_to_a_free_tid(env):
    """Two Controllers with their own databases share one tgtd: both number
    their exports from 1. The second one's export goes to a free tid (kept in
    the database); the other's target is never touched, and a tgtd restart
    re-creates ours at the tid recorded."""
    foreign = FakeTarget(1, IQN_PREFIX + str(uuid.uuid4()), luns={1: "/elsewhere"})
    env.tgt.targets[1] = foreign
    volume_id, srv, info = attached(env)
    [(tid, target)] = [(t, v) for t, v in env.tgt.targets.items() if v.iqn == info.target_iqn]
    assert tid != 1 and target.acls == [initiator()]
    assert env.tgt.targets[1] is foreign and foreign.acls == []
    with env.m.db.connection_context():
        assert Export.get(Export.volume == volume_id).target_tid == tid
    env.tgt.restart()
    env.tgt.targets[1] = foreign
    assert env.m.ensure_exports() == 1
    assert env.tgt.targets[tid].iqn == info.target_iqn
    assert env.tgt.targets[1] is foreign
    env.m.unpublish(volume_id, srv, connector())
    assert set(env.tgt.targets) == {1}


def test_a_delete_that_stopped_half_way_can_be_retried(env):
    vol = env.m.create("half", 1)
    with env.m.db.connection_context():  # as if the process died after "deleting"
        Volume.update(status="deleting").where(Volume.id == vol.id).execute()
    assert status(env.m, vol.id) == ("deleting", "detached")
    env.m.delete(vol.id)
    assert not Path(vol.path).exists()
    with pytest.raises(NotFound):
        env.m.get(vol.id)


def test_delete_after_a_detach_without_unpublish_removes_the_export(env):
    volume_id, srv, _ = attached(env)
    env.m.begin_detaching(volume_id, srv)
    env.m.mark_detached(volume_id, srv)
    assert len(env.tgt.targets) == 1  # nobody unpublished
    env.m.delete(volume_id)
    assert env.tgt.targets == {} and env.tgt.accounts == {}


# -- two Controller processes on one database --------------------------------------------------


class SerialRunner:
    """One tgtd for several managers: the daemon runs one command at a time."""

    def __init__(self, fake: FakeTgtRunner):
        self.fake = fake
        self._lock = threading.Lock()

    def run(self, argv, **kwargs):
        with self._lock:
            return self.fake.run(argv, **kwargs)

    @contextlib.contextmanager
    def lines(self, argv, **kwargs):
        with self._lock, self.fake.lines(argv) as lines:
            read = list(lines)
        yield iter(read)


def test_two_controllers_publishing_one_multiattach_volume_at_once_share_one_export(env):
    """Two VolumeManagers (two Controller processes sharing one database and
    one tgtd: their own in-process locks, a database connection per thread)
    publish the same volume at the same moment, over and over: both succeed
    with the same target and credentials, there is one export and one target,
    and it allows both hosts."""
    runner = SerialRunner(env.tgt)
    managers = [VolumeManager(env.m.db, env.m.volume_dir, TgtAdm(runner, 3261), PORTAL,
                              env.box, max_volume_gb=100) for _ in range(2)]
    for round_ in range(25):
        vol = env.m.create(f"shared-{round_}", 1, multiattach=True)
        a, b = server(), server()
        env.m.reserve(vol.id, a)
        env.m.mark_attached(vol.id, a, "/dev/vdb", "rw")
        env.m.reserve(vol.id, b)
        barrier = threading.Barrier(2)

        def publish(manager, srv, tag, volume_id=vol.id, barrier=barrier):
            barrier.wait()
            return manager.publish(volume_id, srv, connector(tag))

        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(publish, managers[0], a, "a"),
                       pool.submit(publish, managers[1], b, "b")]
            first, second = [f.result(timeout=60) for f in futures]
        assert (first.target_iqn, first.auth_username, first.auth_password) == \
            (second.target_iqn, second.auth_username, second.auth_password)
        [target] = [t for t in env.tgt.targets.values() if t.iqn == first.target_iqn]
        assert target.luns == {1: vol.path}
        assert target.accounts == [first.auth_username]
        assert sorted(target.acls) == [initiator("a"), initiator("b")]
        assert env.tgt.accounts[first.auth_username] == first.auth_password
        with env.m.db.connection_context():
            assert Export.select().where(Export.volume == vol.id).count() == 1
    assert len(env.tgt.targets) == 25
    assert len(env.tgt.commands("target", "new")) == 25  # nobody made a target twice
    assert env.tgt.commands("target", "delete") == []  # nor removed one


def test_create_target_completes_a_target_of_the_same_name_and_never_deletes_it():
    """tgtadm answers "this target already exists": when it is the same target
    (another process made it, or half-made it and died) create_target finishes
    it; when the tid holds another target, it fails and leaves that one alone."""
    tgt = FakeTgtAdm()
    iqn = IQN_PREFIX + "v1"
    tgt.fake.targets[1] = FakeTarget(1, iqn)  # half-made: no LUN, no account
    tgt.create_target(1, iqn, "/vol/v1", "user1", "password1")
    assert (tgt.fake.targets[1].luns, tgt.fake.targets[1].accounts) == ({1: "/vol/v1"}, ["user1"])
    tgt.create_target(1, iqn, "/vol/v1", "user1", "password1")  # complete: nothing to do
    assert (tgt.fake.targets[1].luns, tgt.fake.targets[1].accounts) == ({1: "/vol/v1"}, ["user1"])
    with pytest.raises(BackendError, match="this target already exists"):
        tgt.create_target(1, IQN_PREFIX + "v2", "/vol/v2", "user2", "password2")
    assert tgt.fake.targets[1].iqn == iqn and "user2" not in tgt.fake.accounts
    assert tgt.fake.commands("target", "delete") == []


def test_create_target_that_fails_half_way_removes_only_what_it_made():
    tgt = FakeTgtAdm()
    iqn = IQN_PREFIX + "v1"
    tgt.fake.targets[1] = FakeTarget(1, iqn, luns={1: "/vol/v1"})
    tgt.fake.fail_on("account", "bind")
    with pytest.raises(BackendError):
        tgt.create_target(1, iqn, "/vol/v1", "user1", "password1")
    assert 1 in tgt.fake.targets  # someone else's target: kept
    tgt.fake.fail_on("account", "bind")
    with pytest.raises(BackendError):
        tgt.create_target(2, IQN_PREFIX + "v2", "/vol/v2", "user2", "password2")
    assert 2 not in tgt.fake.targets  # its own: removed


def test_create_target_runs_the_commands_that_need_not_wait_for_each_other_side_by_side():
    """The account is made while the target is, then the LUN, the account's
    binding and the initiator's ACL at once: each of these commands waits
    here until its partners run too, so that run one after another they
    would fail (the barrier breaks after its timeout)."""
    tgt = FakeTgtAdm()
    pairs, threes = threading.Barrier(2, timeout=10), threading.Barrier(3, timeout=10)
    run = tgt.fake.run

    def side_by_side(argv, **kw):
        line = " ".join(argv)
        if "--op new" in line and ("--mode target" in line or "--mode account" in line):
            pairs.wait()
        elif "--mode logicalunit --op new" in line or "--op bind" in line:
            threes.wait()
        return run(argv, **kw)

    tgt.fake.run = side_by_side  # type: ignore[method-assign]
    iqn = IQN_PREFIX + "v1"
    tgt.create_target(1, iqn, "/vol/v1", "user1", "password1", initiator())
    target = tgt.fake.targets[1]
    assert (target.iqn, target.luns, target.accounts, target.acls) == \
        (iqn, {1: "/vol/v1"}, ["user1"], [initiator()])
    assert tgt.fake.accounts == {"user1": "password1"}


@pytest.mark.parametrize("fail", [None, ("target", "bind")])
def test_create_target_on_tgtds_socket_runs_its_requests_in_the_callers_thread(fail):
    """A runner whose commands gain nothing from overlapping (tgtd's control
    socket: overlap = False) gets them one after another from the caller's
    thread, and a failure still leaves nothing made."""
    tgt = FakeTgtAdm()
    tgt.fake.overlap = False  # type: ignore[attr-defined]
    threads = set()
    run = tgt.fake.run

    def recorded(argv, **kw):
        threads.add(threading.current_thread())
        return run(argv, **kw)

    tgt.fake.run = recorded  # type: ignore[method-assign]
    if fail:
        tgt.fake.fail_on(*fail)
        with pytest.raises(BackendError):
            tgt.create_target(1, IQN_PREFIX + "v1", "/vol/v1", "user1", "password1", initiator())
        assert (tgt.fake.targets, tgt.fake.accounts) == ({}, {})
    else:
        tgt.create_target(1, IQN_PREFIX + "v1", "/vol/v1", "user1", "password1", initiator())
        target = tgt.fake.targets[1]
        assert (target.luns, target.accounts, target.acls) == ({1: "/vol/v1"}, ["user1"],
                                                               [initiator()])
    assert threads == {threading.current_thread()}


def test_create_target_whose_acl_fails_leaves_nothing_it_made():
    tgt = FakeTgtAdm()
    tgt.fake.fail_on("target", "bind")
    with pytest.raises(BackendError):
        tgt.create_target(1, IQN_PREFIX + "v1", "/vol/v1", "user1", "password1", initiator())
    assert (tgt.fake.targets, tgt.fake.accounts) == ({}, {})


def test_create_target_at_a_tid_held_by_another_target_removes_the_account_it_made_meanwhile():
    tgt = FakeTgtAdm()
    tgt.fake.targets[1] = FakeTarget(1, IQN_PREFIX + "other")
    tgt.fake.accounts["user0"] = "password0"  # someone's: stays
    with pytest.raises(BackendError, match="this target already exists"):
        tgt.create_target(1, IQN_PREFIX + "v1", "/vol/v1", "user1", "password1")
    with pytest.raises(BackendError, match="this target already exists"):
        tgt.create_target(1, IQN_PREFIX + "v1", "/vol/v1", "user0", "password0")
    assert tgt.fake.accounts == {"user0": "password0"}
    assert list(tgt.fake.targets) == [1] and tgt.fake.targets[1].iqn == IQN_PREFIX + "other"


# -- audit and repair (ListExports, ReconcileExports) ------------------------------------------


def test_export_states_compare_the_database_with_tgtd_and_skip_foreign_targets(env):
    volume_id, _srv, info = attached(env, "a")
    missing_id, _, _ = attached(env, "b")
    states = {s.volume_id: s for s in env.m.export_states()[0]}
    assert states[volume_id].at_tgtd and states[volume_id].allowed_initiators == [initiator()]
    assert states[volume_id].connection_initiators == [initiator()]
    # tgtd loses one target, gains an ACL on the other, a stray of ours and a foreign one
    env.tgt.targets.pop(states[missing_id].tid)
    env.tgt.targets[states[volume_id].tid].acls.append("iqn.2004-10.org.example:intruder")
    known = env.m.create("c", 1)
    env.tgt.targets[90] = FakeTarget(90, IQN_PREFIX + known.id)
    env.tgt.targets[91] = FakeTarget(91, IQN_PREFIX + str(uuid.uuid4()), {1: "/srv/x.img"})
    env.tgt.targets[92] = FakeTarget(92, "iqn.2003-01.org.example:other")
    states, strays = env.m.export_states()
    by_volume = {s.volume_id: s for s in states}
    assert not by_volume[missing_id].at_tgtd
    assert by_volume[volume_id].allowed_initiators == sorted(
        [initiator(), "iqn.2004-10.org.example:intruder"])
    assert [(t.tid, t.volume_id) for t in strays] == [(90, known.id)]
    assert info.auth_password not in repr(states)


def test_reconcile_exports_with_prune_makes_tgtd_match_and_leaves_foreign_targets(env):
    volume_id, srv, _info = attached(env, "a")
    _lonely_id, lonely_srv, _ = attached(env, "b")
    [tid] = [s.tid for s in env.m.export_states()[0] if s.volume_id == volume_id]
    env.tgt.targets[tid].acls.append("iqn.2004-10.org.example:intruder")
    # an export whose connection went (as a crash between two steps leaves it)
    with env.m.db.connection_context():
        VolumeAttachment.update(connector=None).where(
            VolumeAttachment.instance_uuid == lonely_srv).execute()
    foreign = FakeTarget(91, IQN_PREFIX + str(uuid.uuid4()), {1: "/srv/x.img"})
    env.tgt.targets[91] = foreign
    done = env.m.reconcile_exports(prune=True)
    assert (done.targets_removed, done.acls_changed) == (1, 1)
    assert env.tgt.targets[tid].acls == [initiator()]
    assert env.tgt.targets[91] == foreign
    assert {s.volume_id for s in env.m.export_states()[0]} == {volume_id}
    assert env.m.reconcile_exports(prune=True) == ExportRepair()  # nothing left to do

# -- extend (os-extend, also in-use), the gigabytes quota, the reservation's id and mode --


def _target(env):
    (target,) = env.tgt.targets.values()
    return target


def test_extend_of_an_available_volume_grows_the_file_and_the_size(env):
    volume = env.m.create("grow", 1)
    grown, _ = env.m.extend(volume.id, 3)
    assert (grown.size_gb, grown.status) == (3, "available")
    assert os.path.getsize(volume.path) == 3 * GIB
    assert env.tgt.commands("logicalunit", "delete") == []  # not exported: tgtd untouched


def test_extend_of_an_in_use_volume_reloads_its_lun_and_keeps_the_acl(env):
    volume_id, _srv, _info = attached(env)
    target = _target(env)
    acls = list(target.acls)
    grown, atts = env.m.extend(volume_id, 2)
    assert (grown.size_gb, grown.status, len(atts)) == (2, "in-use", 1)
    assert os.path.getsize(grown.path) == 2 * GIB
    # tgtd reads the size when a LUN is made: LUN 1 deleted and made again on the same file
    assert len(env.tgt.commands("logicalunit", "delete")) == 1
    assert _target(env).luns == {1: grown.path} and _target(env).acls == acls


@pytest.mark.parametrize("size", [0, 101])
def test_extend_past_the_limits_is_invalid_and_changes_nothing(env, size):
    volume = env.m.create("lim", 1)
    with pytest.raises(InvalidArgument, match="new_size_gb must be between 1 and 100"):
        env.m.extend(volume.id, size)
    assert env.m.get(volume.id)[0].size_gb == 1 and os.path.getsize(volume.path) == GIB


def test_shrinking_is_invalid_with_cinders_message_and_changes_nothing(env):
    volume = env.m.create("shrink", 2)
    with pytest.raises(InvalidArgument) as err:
        env.m.extend(volume.id, 1)
    assert err.value.message == ("New size for extend must be greater than current size."
                                 " (current: 2, extended: 1).")
    assert env.m.get(volume.id)[0].size_gb == 2 and os.path.getsize(volume.path) == 2 * GIB


def test_extend_to_the_same_size_is_a_retry_and_restores_a_missing_lun(env):
    volume_id, _srv, _info = attached(env)
    env.m.extend(volume_id, 2)
    del _target(env).luns[1]  # as if the Controller died between LUN delete and new
    again, _ = env.m.extend(volume_id, 2)
    assert again.size_gb == 2 and _target(env).luns == {1: again.path}
    env.m.extend(volume_id, 2)  # nothing more to do
    assert len(env.tgt.commands("logicalunit", "new")) == 3


def test_ensure_exports_restores_a_lun_an_extend_left_missing(env):
    volume_id, _srv, _info = attached(env)
    del _target(env).luns[1]
    assert env.m.ensure_exports() == 1
    assert 1 in _target(env).luns


def test_extend_of_a_reserved_volume_is_refused(env):
    volume = env.m.create("busy", 1)
    env.m.reserve(volume.id, server())
    with pytest.raises(FailedPrecondition, match="status must be available or in-use to extend,"
                       " but current status is: attaching"):
        env.m.extend(volume.id, 2)
    assert os.path.getsize(volume.path) == GIB


def test_a_failed_lun_reload_leaves_the_size_for_a_retry(env):
    volume_id, _srv, _info = attached(env)
    env.tgt.fail_on("logicalunit", "new")
    with pytest.raises(Exception, match="fake failure"):
        env.m.extend(volume_id, 2)
    assert env.m.get(volume_id)[0].size_gb == 1
    grown, _ = env.m.extend(volume_id, 2)  # the retry finishes it
    assert grown.size_gb == 2 and 1 in _target(env).luns


def test_quota_refuses_create_and_extend_past_it(env, tmp_path):
    m = VolumeManager(env.m.db, tmp_path / "q", env.m.tgt, env.m.portal, env.box,
                      max_volume_gb=100, quota_gigabytes=5)
    a = m.create("qa", 3)
    with pytest.raises(ResourceExhausted, match="exceeds allowed gigabytes quota. Requested 3G,"
                       " quota is 5G and 3G has been consumed"):
        m.create("qb", 3)
    with pytest.raises(ResourceExhausted, match="Requested 3G, quota is 5G"):
        m.extend(a.id, 6)
    assert m.get(a.id)[0].size_gb == 3 and os.path.getsize(a.path) == 3 * GIB
    assert m.extend(a.id, 5)[0].size_gb == 5


def test_reserve_keeps_the_callers_attachment_id_and_mode(env):
    volume = env.m.create("ro", 1, multiattach=True)
    srv, att_id = server(), str(uuid.uuid4())
    _, atts = env.m.reserve(volume.id, srv, att_id, "ro")
    assert [(a.id, a.attach_mode) for a in atts] == [(att_id, "ro")]
    info = env.m.publish(volume.id, srv, connector())
    assert (info.access_mode, info.multiattach) == ("ro", True)
    with pytest.raises(InvalidArgument):
        env.m.reserve(volume.id, server(), "", "rx")


def test_a_second_publish_of_an_attachment_with_another_initiator_is_refused(env):
    volume_id, srv, first = attached(env, "kept")
    with pytest.raises(FailedPrecondition) as err:
        env.m.publish(volume_id, srv, connector("attacker"))
    assert err.value.reason == "CONNECTOR_MISMATCH"
    [target] = env.tgt.targets.values()
    assert target.acls == [initiator("a")]  # no second ACL entry
    assert env.m.publish(volume_id, srv, connector("a")) == first  # the same host: idempotent
    _, [att] = env.m.get(volume_id)
    assert Connector.load(att.connector).initiator == initiator("a")


def test_volumes_belong_to_the_creating_project(env):
    from vmattach.common import auth
    a = env.m.create("data", 1, project_id="project-a")
    b = env.m.create("data", 1, project_id="project-b")  # names are per project
    assert a.id != b.id
    token = auth.acting_as(auth.Caller("user", "t", "project-b", "member"))
    try:
        with pytest.raises(NotFound):
            env.m.get(a.id)
        volumes, _, _ = env.m.list(100, "", "project-b")
        assert [v.id for v in volumes] == [b.id]
        env.m.delete(a.id)  # another project's volume: as if missing, left alone
    finally:
        auth.done_acting(token)
    assert env.m.get(a.id)[0].status == "available"
    assert {v.id for v in env.m.list(100, "", None)[0]} == {a.id, b.id}


def test_stray_target_whose_tid_went_to_another_volume_since_the_listing_is_kept(env):
    """A target of ours that no export owns is removed by the reconcile, but
    only while it is still that target: between the reconcile's listing and
    the removal, its volume's unpublish may have removed it and another
    volume's publish made a new target at the same tid."""
    stray = env.m.create("stray", 1)
    env.tgt.targets[90] = FakeTarget(90, IQN_PREFIX + stray.id, {1: "/vol/stray"})
    other = FakeTarget(90, IQN_PREFIX + str(uuid.uuid4()), {1: "/vol/other"})
    look = env.m._our_volume

    def our_volume_after_a_publish_elsewhere(target):
        env.tgt.targets[90] = other      # tid 90 is another volume's target now
        return look(target)

    env.m._our_volume = our_volume_after_a_publish_elsewhere
    done = env.m.reconcile_exports()
    assert env.tgt.targets.get(90) == other and done.targets_removed == 0
    env.m._our_volume = look
    env.tgt.targets[91] = FakeTarget(91, IQN_PREFIX + stray.id, {1: "/vol/stray"})
    assert env.m.reconcile_exports().targets_removed == 1 and 91 not in env.tgt.targets
