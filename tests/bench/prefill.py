"""Pre-fill the databases of a state directory for the scale benchmark:
bulk inserts (one executemany per table of the project's own models, one
transaction per database, rows generated as tuples) straight into the
SQLite files, not RPCs.

    volumes      total volumes in the Controller (the attached ones included)
    nodes x per_node   servers, each with one live attachment (/dev/vdb):
                 a volume in-use, its attachment and export at the Controller,
                 a BDM row (attached) and the server's cache row at the facade
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from tests.bench.common import INITIATOR, node_id, server_uuid
from tests.bench.fakes import attached_volume_uuid
from vmattach.common.db import open_database
from vmattach.common.secretbox import SecretBox
from vmattach.controller.models import MODELS as CONTROLLER_MODELS
from vmattach.controller.models import SCHEMA as CONTROLLER_SCHEMA
from vmattach.controller.models import Export, Volume, VolumeAttachment, utcnow
from vmattach.controller.tgt import IQN_PREFIX
from vmattach.controller.volumes import Connector
from vmattach.server.models import MODELS as SERVERS_MODELS
from vmattach.server.models import SCHEMA as SERVERS_SCHEMA
from vmattach.server.models import BlockDeviceMapping as BDM
from vmattach.server.models import ServerRecord


def _insert(db, model, columns: tuple[str, ...], rows) -> None:
    """executemany of one prepared INSERT over rows (tuples in columns' order)
    inside the caller's transaction: no model instance, no per-row SQL."""
    fields = [model._meta.fields[c] for c in columns]
    table = model._meta.table_name
    names = ", ".join(f'"{f.column_name}"' for f in fields)
    marks = ", ".join("?" for _ in fields)
    db.cursor().executemany(f'INSERT INTO "{table}" ({names}) VALUES ({marks})', rows)


def prefill(state_dir: str | Path, volumes: int, nodes: int, per_node: int,
            portal: str = "127.0.0.1:3260") -> dict:
    t0 = time.monotonic()
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    box = SecretBox.from_state_dir(state)
    servers_box = SecretBox.from_state_dir(state, "servers-secret.key")
    connector = Connector(initiator=INITIATOR, ip="127.0.0.1", host="bench", platform="x86_64",
                          os_type="linux").to_json()
    now = str(utcnow())
    # one CHAP password for every pre-filled attachment, sealed once by each box
    # (Fernet per row was most of the fill's time; each row has its own user)
    password = uuid.uuid4().hex[:20]
    sealed, sealed_servers = box.encrypt(password), servers_box.encrypt(password)
    attached = [(n, i) for n in range(nodes) for i in range(per_node)]
    volume_dir = str(state / "volumes")

    def attached_rows():
        for k, (n, i) in enumerate(attached):
            vid, sid = attached_volume_uuid(n, i), server_uuid(n, i)
            yield k, n, i, vid, sid, f"chap{k:08d}user0000"

    vol_cols = ("id", "name", "project_id", "size_gb", "multiattach", "status", "attach_status",
                "path", "chap_username", "chap_secret", "created_at", "updated_at")
    att_cols = ("id", "volume", "instance_uuid", "attach_status", "mountpoint", "attach_mode",
                "connector", "created_at", "updated_at")
    exp_cols = ("volume", "target_iqn", "created_at")
    bdm_cols = ("created_at", "updated_at", "deleted", "device_name", "volume_id", "volume_size",
                "connection_info", "instance_uuid", "source_type", "destination_type",
                "delete_on_termination", "attachment_id", "state", "progress", "node_id",
                "connector")
    srv_cols = ("server_id", "name", "state", "device_prefix", "root_device", "disks", "node_id",
                "updated_at", "project_id")

    def volume_rows():
        for k, _n, _i, vid, _sid, user in attached_rows():
            yield (vid, f"prefill-attached-{k}", "", 1, False, "in-use", "attached",
                   f"{volume_dir}/volume-{vid}.img", user, sealed, now, now)
        for k in range(volumes - len(attached)):
            vid = str(uuid.uuid4())
            yield (vid, f"prefill-{k}", "", 1, False, "available", "detached",
                   f"{volume_dir}/volume-{vid}.img", None, None, now, now)

    def bdm_rows():
        for _k, n, _i, vid, sid, user in attached_rows():
            info = {"driver_volume_type": "iscsi", "serial": vid, "data": {
                "target_portal": portal, "target_iqn": IQN_PREFIX + vid, "target_lun": 1,
                "auth_method": "CHAP", "auth_username": user, "access_mode": "rw",
                "volume_id": vid, "auth_password_encrypted": sealed_servers}}
            yield (now, now, 0, "/dev/vdb", vid, 1, json.dumps(info, sort_keys=True), sid,
                   "volume", "volume", False, str(uuid.uuid4()), "attached", "mark_attached",
                   node_id(n), connector)

    def server_rows():
        for _k, n, i, vid, sid, _user in attached_rows():
            yield (sid, f"{node_id(n)}-vm{i}", "running", "vd", "",
                   json.dumps([{"device": "vdb", "serial": vid, "bus": "virtio"}]),
                   node_id(n), now, "")

    cdb = open_database(f"sqlite:///{state / 'controller.db'}", CONTROLLER_MODELS, CONTROLLER_SCHEMA)
    with cdb.connection_context():
        with cdb.atomic():
            _insert(cdb, Volume, vol_cols, volume_rows())
            _insert(cdb, VolumeAttachment, att_cols, (
                (str(uuid.uuid4()), vid, sid, "attached", "/dev/vdb", "rw", connector, now, now)
                for _k, _n, _i, vid, sid, _u in attached_rows()))
            _insert(cdb, Export, exp_cols, ((vid, IQN_PREFIX + vid, now)
                                            for _k, _n, _i, vid, _s, _u in attached_rows()))
            Export.update(target_tid=Export.tid).execute()
    cdb.close()
    sdb = open_database(f"sqlite:///{state / 'servers.db'}", SERVERS_MODELS, SERVERS_SCHEMA)
    with sdb.connection_context():
        with sdb.atomic():
            _insert(sdb, ServerRecord, srv_cols, server_rows())
            _insert(sdb, BDM, bdm_cols, bdm_rows())
    sdb.close()
    return {"volumes": volumes, "servers": len(attached), "attachments": len(attached),
            "nodes": nodes, "seconds": round(time.monotonic() - t0, 1)}
