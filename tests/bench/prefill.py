"""Pre-fill the databases of a state directory for the scale benchmark:
bulk inserts (peewee insert_many in one transaction per table, through the
project's own models) straight into the SQLite files, not RPCs.

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

CHUNK = 500


def _insert(model, rows: list[dict]) -> None:
    for start in range(0, len(rows), CHUNK):
        model.insert_many(rows[start:start + CHUNK]).execute()


def prefill(state_dir: str | Path, volumes: int, nodes: int, per_node: int,
            portal: str = "127.0.0.1:3260") -> dict:
    t0 = time.monotonic()
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    box = SecretBox.from_state_dir(state)
    servers_box = SecretBox.from_state_dir(state, "servers-secret.key")
    connector = Connector(initiator=INITIATOR, ip="127.0.0.1", host="bench", platform="x86_64",
                          os_type="linux").to_json()
    now = utcnow()
    attached = [(n, i) for n in range(nodes) for i in range(per_node)]
    vol_rows, att_rows, exp_rows, bdm_rows, srv_rows = [], [], [], [], []
    for k, (n, i) in enumerate(attached):
        vid, sid = attached_volume_uuid(n, i), server_uuid(n, i)
        user, password = f"chap{k:08d}user0000", uuid.uuid4().hex[:20]
        vol_rows.append(dict(id=vid, name=f"prefill-attached-{k}", size_gb=1, multiattach=False,
                             status="in-use", attach_status="attached",
                             path=str(state / "volumes" / f"volume-{vid}.img"),
                             chap_username=user, chap_secret=box.encrypt(password),
                             created_at=now, updated_at=now))
        att_rows.append(dict(id=str(uuid.uuid4()), volume=vid, instance_uuid=sid,
                             attach_status="attached", mountpoint="/dev/vdb", attach_mode="rw",
                             connector=connector, created_at=now, updated_at=now))
        exp_rows.append(dict(volume=vid, target_iqn=IQN_PREFIX + vid, created_at=now))
        info = {"driver_volume_type": "iscsi", "serial": vid, "data": {
            "target_portal": portal, "target_iqn": IQN_PREFIX + vid, "target_lun": 1,
            "auth_method": "CHAP", "auth_username": user, "access_mode": "rw",
            "volume_id": vid, "auth_password_encrypted": servers_box.encrypt(password)}}
        bdm_rows.append(dict(created_at=now, updated_at=now, deleted=0, device_name="/dev/vdb",
                             volume_id=vid, volume_size=1,
                             connection_info=json.dumps(info, sort_keys=True),
                             instance_uuid=sid, attachment_id=str(uuid.uuid4()),
                             state="attached", progress="mark_attached", node_id=node_id(n),
                             connector=connector))
        srv_rows.append(dict(server_id=sid, name=f"{node_id(n)}-vm{i}", state="running",
                             device_prefix="vd", root_device="",
                             disks=json.dumps([{"device": "vdb", "serial": vid, "bus": "virtio"}]),
                             node_id=node_id(n), updated_at=now))
    for k in range(volumes - len(attached)):
        vid = str(uuid.uuid4())
        vol_rows.append(dict(id=vid, name=f"prefill-{k}", size_gb=1, multiattach=False,
                             status="available", attach_status="detached",
                             path=str(state / "volumes" / f"volume-{vid}.img"),
                             chap_username=None, chap_secret=None, created_at=now,
                             updated_at=now))

    cdb = open_database(f"sqlite:///{state / 'controller.db'}", CONTROLLER_MODELS, CONTROLLER_SCHEMA)
    with cdb.connection_context():
        with cdb.atomic():
            _insert(Volume, vol_rows)
            _insert(VolumeAttachment, att_rows)
            _insert(Export, exp_rows)
            Export.update(target_tid=Export.tid).execute()
    cdb.close()
    sdb = open_database(f"sqlite:///{state / 'servers.db'}", SERVERS_MODELS, SERVERS_SCHEMA)
    with sdb.connection_context():
        with sdb.atomic():
            _insert(ServerRecord, srv_rows)
            _insert(BDM, bdm_rows)
    sdb.close()
    return {"volumes": len(vol_rows), "servers": len(srv_rows), "attachments": len(att_rows),
            "nodes": nodes, "seconds": round(time.monotonic() - t0, 1)}
