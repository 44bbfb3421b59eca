"""The Controller's tables. Bound to a database at start-up (common/db.py)."""

from __future__ import annotations

import peewee

from vmattach.common.db import utcnow, write_transaction
from vmattach.common.migrations import Migration, Schema, add_column


class BaseModel(peewee.Model):
    class Meta:
        database = None
        legacy_table_names = False


class Volume(BaseModel):
    id = peewee.CharField(primary_key=True, max_length=36)
    name = peewee.CharField(max_length=255)
    # the project of the token that created it (common/auth.py); "" with --auth none
    project_id = peewee.CharField(max_length=64, default="")
    size_gb = peewee.IntegerField()
    multiattach = peewee.BooleanField(default=False)
    status = peewee.CharField(max_length=32, index=True)
    attach_status = peewee.CharField(max_length=32, default="detached")
    # the server whose detach began (os-begin_detaching) while the volume is
    # detaching, else NULL; its attachment's row stays attached meanwhile and is
    # shown detaching (controller/volumes.py _shown) (version 5)
    detaching_instance = peewee.CharField(max_length=36, null=True)
    path = peewee.CharField(max_length=4096)
    # CHAP credentials, generated once per volume at its first export; the
    # secret is encrypted (common/secretbox.py).
    chap_username = peewee.CharField(max_length=64, null=True)
    chap_secret = peewee.TextField(null=True)
    created_at = peewee.DateTimeField(default=utcnow)
    updated_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        table_name = "controller_volume"
        indexes = ((("created_at", "id"), False), (("project_id", "name"), True))


class VolumeAttachment(BaseModel):
    """One server's reservation or attachment of a volume."""
    id = peewee.CharField(primary_key=True, max_length=36)
    volume = peewee.ForeignKeyField(Volume, backref="attachments", on_delete="CASCADE")
    instance_uuid = peewee.CharField(max_length=36)
    # reserved -> attached; the row goes when the attachment ends (while its
    # detach runs it stays attached: the volume's detaching_instance names it)
    attach_status = peewee.CharField(max_length=32)
    mountpoint = peewee.CharField(max_length=255, default="")
    attach_mode = peewee.CharField(max_length=2, default="rw")
    # the connector recorded by ControllerPublishVolume (JSON), NULL when not published
    connector = peewee.TextField(null=True)
    created_at = peewee.DateTimeField(default=utcnow)
    updated_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        table_name = "controller_volume_attachment"
        indexes = ((("volume", "instance_uuid"), True),)


class Export(BaseModel):
    """A tgt target the Controller owns. tid is the export's id, allocated by
    the database (unique across Controller processes sharing it); target_tid
    is the target's tid on tgtd: the export's id when that is free there,
    another free one when another Controller or a cinder-volume sharing the
    tgtd has it (version 2)."""
    tid = peewee.AutoField()
    volume = peewee.ForeignKeyField(Volume, unique=True, on_delete="CASCADE")
    # indexed: the export reconcile looks a batch of tgtd's targets up by name (version 4)
    target_iqn = peewee.CharField(max_length=255, index=True)
    target_tid = peewee.IntegerField(null=True)
    created_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        table_name = "controller_export"


MODELS = [Volume, VolumeAttachment, Export]


def rotate_secrets(db: peewee.Database, box) -> int:
    """Re-encrypt every stored CHAP secret with box's newest key (vmattach
    rotate-key); returns how many."""
    count = 0
    with db.connection_context(), write_transaction(db):
        for volume in Volume.select(Volume.id, Volume.chap_secret).where(
                Volume.chap_secret.is_null(False)):
            Volume.update(chap_secret=box.rotate(volume.chap_secret)).where(
                Volume.id == volume.id).execute()
            count += 1
    return count


# -- schema versions (common/migrations.py); every table change adds one -------------

def _v2_target_tid(db: peewee.Database) -> None:
    add_column(db, "controller_export", "target_tid", peewee.IntegerField(null=True))
    db.execute_sql("UPDATE controller_export SET target_tid = tid WHERE target_tid IS NULL")


def _v3_volume_project(db: peewee.Database) -> None:
    from playhouse.migrate import SchemaMigrator, migrate

    from vmattach.common.migrations import columns
    if "project_id" not in columns(db, "controller_volume"):
        # one ALTER TABLE (no table rebuild on SQLite: that would cascade to the exports)
        db.execute_sql("ALTER TABLE controller_volume ADD COLUMN project_id VARCHAR(64)"
                       " NOT NULL DEFAULT ''")
    db.execute_sql("DROP INDEX IF EXISTS controller_volume_name")
    migrate(SchemaMigrator.from_database(db).add_index("controller_volume", ("project_id", "name"),
                                                       True))


def _v4_export_target_iqn(db: peewee.Database) -> None:
    from playhouse.migrate import SchemaMigrator, migrate
    migrate(SchemaMigrator.from_database(db).add_index("controller_export", ("target_iqn",),
                                                       False))


def _v5_volume_detaching_instance(db: peewee.Database) -> None:
    add_column(db, "controller_volume", "detaching_instance",
               peewee.CharField(max_length=36, null=True))
    # a detach begun before the upgrade: the volume names its server, whose
    # attachment's row goes back to attached
    db.execute_sql(
        "UPDATE controller_volume SET detaching_instance = (SELECT a.instance_uuid"
        " FROM controller_volume_attachment a WHERE a.volume_id = controller_volume.id"
        " AND a.attach_status = 'detaching' ORDER BY a.created_at LIMIT 1)"
        " WHERE status = 'detaching' AND detaching_instance IS NULL")
    db.execute_sql("UPDATE controller_volume_attachment SET attach_status = 'attached'"
                   " WHERE attach_status = 'detaching'")


MIGRATIONS = [
    Migration(2, "controller_export.target_tid: the tgtd tid apart from the export id",
              _v2_target_tid),
    Migration(3, "controller_volume.project_id: volumes belong to a project; names unique"
              " per project", _v3_volume_project),
    Migration(4, "controller_export.target_iqn indexed: the export reconcile compares tgtd's"
              " listing with the database a batch of targets at a time", _v4_export_target_iqn),
    Migration(5, "controller_volume.detaching_instance: os-begin_detaching is one"
              " compare-and-swap of the volume's row, which names the server whose detach"
              " began", _v5_volume_detaching_instance),
]
SCHEMA = Schema("controller", MODELS, MIGRATIONS)
