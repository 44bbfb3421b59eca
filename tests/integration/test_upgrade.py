"""Schema upgrades: a database made by the previous schema (version 1, the
tables frozen in tests/support/schema_v1.py) with rows in it is upgraded
at start and then attaches and detaches; upgraded, its tables have every
column of the current models, and a detach in progress is kept; an old
schema is refused when upgrading is switched off, a newer one always."""

from __future__ import annotations

import datetime
import uuid

import pytest

from tests.integration.test_facade import Stack
from tests.support import schema_v1 as v1
from tests.support.fake_tgt import FakeTgtAdm
from vmattach.common import migrations
from vmattach.common.db import close_database, connect_database, open_database
from vmattach.common.errors import FailedPrecondition
from vmattach.common.secretbox import SecretBox
from vmattach.controller import models as controller_models
from vmattach.controller.volumes import VolumeManager
from vmattach.server import models as server_models
from vmattach.v1 import types_pb2

SCHEMAS = (controller_models.SCHEMA, server_models.SCHEMA)


def make_v1_database(url: str, state_dir) -> dict:
    """Both services' version-1 tables in one database, with rows: a volume
    never exported, an exported one (its target gone, as after a reboot), a
    server, a soft-deleted BDM and a facade heartbeat."""
    db = connect_database(url, v1.CONTROLLER_MODELS + v1.SERVERS_MODELS)
    volume_dir = state_dir / "volumes"
    volume_dir.mkdir(parents=True, exist_ok=True)
    secretbox = SecretBox.from_state_dir(str(state_dir))
    rows: dict = {}
    with db.connection_context():
        db.create_tables(v1.CONTROLLER_MODELS + v1.SERVERS_MODELS)
        for name in ("kept", "exported"):
            vid = str(uuid.uuid4())
            path = volume_dir / f"volume-{vid}.img"
            with open(path, "wb") as fh:
                fh.truncate(1 << 30)
            v1.Volume.create(id=vid, name=name, size_gb=1, status="available", path=str(path),
                             chap_username=f"user{name}",
                             chap_secret=secretbox.encrypt(f"secret-of-{name}"))
            rows[name] = vid
        # an export row of version 1: its tid is the tgtd tid
        export = v1.Export.create(volume=rows["exported"],
                                  target_iqn="iqn.2010-10.org.openstack:volume-" + rows["exported"])
        rows["exported_tid"] = export.tid
        v1.ServerRecord.create(server_id=str(uuid.uuid4()), name="old", state="running",
                               node_id="node-0")
        v1.BlockDeviceMapping.create(device_name="/dev/vdb", volume_id=str(uuid.uuid4()),
                                     instance_uuid=str(uuid.uuid4()), attachment_id=str(uuid.uuid4()),
                                     state="attached", deleted=1,
                                     deleted_at=datetime.datetime(2026, 1, 1))
        v1.FacadeInstance.create(id=str(uuid.uuid4()))
    close_database(db)
    return rows


def test_a_version_1_database_is_upgraded_at_start_then_attaches_and_detaches(
        tmp_path, tgtd, serve, database_url):
    rows = make_v1_database(database_url, tmp_path / "state")
    stack = Stack(tmp_path, tgtd, serve, database_url=database_url)
    db = controller_models.Export._meta.database  # the Controller's (same URL as the facade's)
    with db.connection_context():
        assert {s.component: migrations.current_version(db, s) for s in SCHEMAS} == \
            {s.component: s.latest for s in SCHEMAS}
        assert controller_models.SCHEMA.latest >= 2
        # the old export's tid is its tgtd tid; its target, gone, is made again at start
        export = controller_models.Export.get(controller_models.Export.volume == rows["exported"])
        assert export.target_tid == rows["exported_tid"]
    present = stack.tgtadm.show()
    assert present[rows["exported_tid"]].iqn.endswith(rows["exported"])

    server = stack.server()
    attachment = stack.client.attach_volume(server, rows["kept"])
    assert attachment.state == types_pb2.ATTACHMENT_STATE_ATTACHED
    assert [d.serial for d in stack.hv.get_domain(server).disks] == [rows["kept"]]
    stack.client.detach_volume(server, rows["kept"])
    assert stack.client.get_volume(rows["kept"]).status == types_pb2.VOLUME_STATUS_AVAILABLE
    assert list(stack.client.list_attachments(server)) == []
    assert stack.hv.get_domain(server).disks == ()


def test_an_upgraded_database_has_every_column_of_the_models(database_url, tmp_path):
    make_v1_database(database_url, tmp_path)
    for schema in SCHEMAS:
        db = open_database(database_url, schema.models, schema)
        with db.connection_context():
            for model in schema.models:
                expected = {f.column_name for f in model._meta.sorted_fields}
                assert migrations.columns(db, model._meta.table_name) == expected, model
            assert migrations.current_version(db, schema) == schema.latest
            assert migrations.upgrade(db, schema) == (schema.latest, schema.latest)  # again: no-op
        close_database(db)


def test_an_old_schema_is_refused_without_upgrading_and_a_newer_one_always(database_url, tmp_path):
    make_v1_database(database_url, tmp_path)
    schema = controller_models.SCHEMA
    with pytest.raises(FailedPrecondition, match="vmattach db upgrade") as err:
        open_database(database_url, schema.models, schema, upgrade=False)
    assert err.value.reason == "SCHEMA_OUT_OF_DATE"
    close_database(open_database(database_url, schema.models, schema))
    db = connect_database(database_url, schema.models)
    with db.connection_context():
        db.execute_sql("UPDATE vmattach_schema SET version = 99 WHERE component = 'controller'")
    close_database(db)
    with pytest.raises(FailedPrecondition) as err:
        open_database(database_url, schema.models, schema)
    assert err.value.reason == "SCHEMA_TOO_NEW"


def test_a_detach_begun_before_version_5_is_recorded_on_its_volume(database_url, tmp_path):
    """Version 5 keeps a detach in progress on the volume's row
    (detaching_instance): an attachment row left `detaching` goes back to
    attached, the volume names its server, and the views show it as before."""
    rows = make_v1_database(database_url, tmp_path)
    detaching, staying = str(uuid.uuid4()), str(uuid.uuid4())
    db = connect_database(database_url, v1.CONTROLLER_MODELS)
    with db.connection_context():
        v1.Volume.update(status="detaching", attach_status="attached", multiattach=True).where(
            v1.Volume.id == rows["kept"]).execute()
        for server, state in ((detaching, "detaching"), (staying, "attached")):
            v1.VolumeAttachment.create(id=str(uuid.uuid4()), volume=rows["kept"],
                                       instance_uuid=server, attach_status=state,
                                       mountpoint="/dev/vdb")
    close_database(db)
    schema = controller_models.SCHEMA
    db = open_database(database_url, schema.models, schema)
    with db.connection_context():
        volume = controller_models.Volume.get_by_id(rows["kept"])
        assert (volume.status, volume.detaching_instance) == ("detaching", detaching)
        assert {a.instance_uuid: a.attach_status for a in controller_models.VolumeAttachment
                .select()} == {detaching: "attached", staying: "attached"}
    manager = VolumeManager(db, tmp_path / "volumes", FakeTgtAdm(), "127.0.0.1:3260",
                            SecretBox.from_state_dir(str(tmp_path)))
    _, atts = manager.get(rows["kept"])
    assert {a.instance_uuid: a.attach_status for a in atts} == \
        {detaching: "detaching", staying: "attached"}
    volume, atts = manager.roll_detaching(rows["kept"], detaching)
    assert (volume.status, {a.attach_status for a in atts}) == ("in-use", {"attached"})
    close_database(db)
