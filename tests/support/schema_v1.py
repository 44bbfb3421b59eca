"""The tables as they were at schema version 1 (main before versions were
recorded), frozen here for the upgrade test: copies of controller/models.py
and server/models.py of that time. Never change them."""

from __future__ import annotations

import peewee

from vmattach.common.db import utcnow


class BaseModel(peewee.Model):
    class Meta:
        database = None
        legacy_table_names = False


class Volume(BaseModel):
    id = peewee.CharField(primary_key=True, max_length=36)
    name = peewee.CharField(max_length=255, unique=True)
    size_gb = peewee.IntegerField()
    multiattach = peewee.BooleanField(default=False)
    status = peewee.CharField(max_length=32, index=True)
    attach_status = peewee.CharField(max_length=32, default="detached")
    path = peewee.CharField(max_length=4096)
    # CHAP credentials, generated once per volume at its first export; the
    # secret is encrypted (common/secretbox.py).
    chap_username = peewee.CharField(max_length=64, null=True)
    chap_secret = peewee.TextField(null=True)
    created_at = peewee.DateTimeField(default=utcnow)
    updated_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        table_name = "controller_volume"
        indexes = ((("created_at", "id"), False),)


class VolumeAttachment(BaseModel):
    """One server's reservation or attachment of a volume."""
    id = peewee.CharField(primary_key=True, max_length=36)
    volume = peewee.ForeignKeyField(Volume, backref="attachments", on_delete="CASCADE")
    instance_uuid = peewee.CharField(max_length=36)
    # reserved -> attached -> detaching; the row goes when the attachment ends
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
    """A tgt target the Controller owns; tid is allocated by the database so
    that it is unique across Controller processes sharing one database."""
    tid = peewee.AutoField()
    volume = peewee.ForeignKeyField(Volume, unique=True, on_delete="CASCADE")
    target_iqn = peewee.CharField(max_length=255)
    created_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        table_name = "controller_export"


CONTROLLER_MODELS = [Volume, VolumeAttachment, Export]


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
    # the node's connector (JSON), needed to terminate the connection
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

    class Meta:
        table_name = "servers_server"


class FacadeInstance(BaseModel):
    """A running facade process; its heartbeat says its operations are alive."""
    id = peewee.CharField(primary_key=True, max_length=36)
    started_at = peewee.DateTimeField(default=utcnow)
    heartbeat_at = peewee.DateTimeField(default=utcnow, index=True)

    class Meta:
        table_name = "facade_instance"


SERVERS_MODELS = [BlockDeviceMapping, ServerRecord, FacadeInstance]
