"""The servers facade's tables: Nova's block_device_mapping and the cache of
servers reported by the nodes."""

from __future__ import annotations

import peewee

from vmattach.common.db import utcnow
from vmattach.common.migrations import Migration, Schema


class BaseModel(peewee.Model):
    class Meta:
        database = None
        legacy_table_names = False


class BlockDeviceMapping(BaseModel):
    """Nova's columns, plus the attach/detach state and its progress.

    Like Nova, `deleted` is 0 for a live row and the row's id once
    soft-deleted, so the unique indexes below hold among live rows only."""
    id = peewee.AutoField()
    created_at = peewee.DateTimeField(default=utcnow)
    updated_at = peewee.DateTimeField(null=True)
    deleted_at = peewee.DateTimeField(null=True)
    deleted = peewee.IntegerField(default=0)
    device_name = peewee.CharField(max_length=255)
    volume_id = peewee.CharField(max_length=36)
    volume_size = peewee.IntegerField(null=True)
    # JSON; the CHAP secret in it is encrypted (common/secretbox.py)
    connection_info = peewee.TextField(null=True)
    instance_uuid = peewee.CharField(max_length=36)
    source_type = peewee.CharField(max_length=255, default="volume")
    destination_type = peewee.CharField(max_length=255, default="volume")
    delete_on_termination = peewee.BooleanField(default=False)
    snapshot_id = peewee.CharField(max_length=36, null=True)
    no_device = peewee.BooleanField(null=True)
    tag = peewee.CharField(max_length=255, null=True)
    attachment_id = peewee.CharField(max_length=36, unique=True)
    # attaching -> attached -> detaching -> (soft-deleted)
    state = peewee.CharField(max_length=16, index=True)
    # the last saga step that completed (for recovery after a crash)
    progress = peewee.CharField(max_length=32, default="")
    request_id = peewee.CharField(max_length=36, null=True)
    node_id = peewee.CharField(max_length=255, null=True)
    # the node's connector (JSON): written by versions whose facade passed it to
    # ControllerUnpublishVolume; no longer written (the Controller keeps it)
    connector = peewee.TextField(null=True)
    # the facade instance running the attach/detach; NULL: nobody (recover it)
    owner = peewee.CharField(max_length=36, null=True, index=True)

    class Meta:
        table_name = "block_device_mapping"
        indexes = (
            (("instance_uuid", "device_name", "deleted"), True),
            (("instance_uuid", "volume_id", "deleted"), True),
            (("volume_id", "deleted"), False),
        )


# Server states that can take (and give back) a disk: Nova's vm_states active
# (running, and blocked: a running domain waiting on a resource), paused and
# stopped (server/facade.py names the others in its refusals).
ATTACHABLE = frozenset({"running", "blocked", "paused", "shutoff"})


class ServerRecord(BaseModel):
    """A server (libvirt domain) as last reported by the node hosting it."""
    server_id = peewee.CharField(primary_key=True, max_length=36)
    name = peewee.CharField(max_length=255)
    state = peewee.CharField(max_length=32)
    device_prefix = peewee.CharField(max_length=4, default="vd")
    root_device = peewee.CharField(max_length=32, default="")
    disks = peewee.TextField(default="[]")  # JSON list of {device, serial, bus}
    node_id = peewee.CharField(max_length=255, index=True)
    updated_at = peewee.DateTimeField(default=utcnow)
    # the owner project from the domain's Nova metadata; "" when none (admins only)
    project_id = peewee.CharField(max_length=64, default="", index=True)

    class Meta:
        table_name = "servers_server"


class FacadeInstance(BaseModel):
    """A running facade process; its heartbeat says its operations are alive."""
    id = peewee.CharField(primary_key=True, max_length=36)
    started_at = peewee.DateTimeField(default=utcnow)
    heartbeat_at = peewee.DateTimeField(default=utcnow, index=True)

    class Meta:
        table_name = "facade_instance"


class PendingExtend(BaseModel):
    """An ExtendVolume in flight (one per volume). The row goes once every
    server's disk has the new size; a row whose owner stopped sending
    heartbeats (or released it after a node failed) is finished by the
    reconciler (version 2)."""
    volume_id = peewee.CharField(primary_key=True, max_length=36)
    new_size_gb = peewee.IntegerField()
    owner = peewee.CharField(max_length=36, null=True, index=True)
    created_at = peewee.DateTimeField(default=utcnow)
    updated_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        table_name = "pending_extend"


MODELS = [BlockDeviceMapping, ServerRecord, FacadeInstance, PendingExtend]


def _v2_pending_extend(db: peewee.Database) -> None:
    db.create_tables([PendingExtend], safe=True)


def _v3_server_project(db: peewee.Database) -> None:
    from playhouse.migrate import SchemaMigrator, migrate

    from vmattach.common.migrations import columns
    if "project_id" not in columns(db, "servers_server"):
        db.execute_sql("ALTER TABLE servers_server ADD COLUMN project_id VARCHAR(64)"
                       " NOT NULL DEFAULT ''")
        migrate(SchemaMigrator.from_database(db).add_index("servers_server", ("project_id",), False))


# schema versions (common/migrations.py); every table change adds a Migration
MIGRATIONS: list[Migration] = [
    Migration(2, "pending_extend: ExtendVolume in flight, finished by the reconciler",
              _v2_pending_extend),
    Migration(3, "servers_server.project_id: the owner project from Nova's metadata",
              _v3_server_project),
]
SCHEMA = Schema("servers", MODELS, MIGRATIONS)
