"""The facade's records: Nova's block_device_mapping rows (every query and
write of them) and the facade instances' heartbeats. The CHAP secret in a
row's connection_info is sealed here (common/secretbox.py) and never stored
in the clear.

A live row has deleted == 0; a soft-deleted one has deleted == its id, so
the unique indexes (server, device) and (server, volume) hold among live
rows, across every facade process sharing the database."""

from __future__ import annotations

import datetime
import json
import uuid

import peewee
from google.protobuf import json_format

from vmattach.common import pagetoken
from vmattach.common.db import Prepared, utcnow, write_transaction
from vmattach.common.enums import dict_from_words, dict_to_words
from vmattach.common.errors import Aborted, AlreadyExists, ResourceExhausted
from vmattach.common.locks import KeyedLocks
from vmattach.common.secretbox import SecretBox
from vmattach.server.devices import device_in_use, pick_device
from vmattach.server.models import ATTACHABLE, FacadeInstance, PendingExtend, ServerRecord
from vmattach.server.models import BlockDeviceMapping as BDM
from vmattach.v1 import types_pb2

# The progress of an attach whose rollback did not finish (see rolling_back()).
ROLLING_BACK = "rolling_back"

_LIVE_BDM = Prepared(lambda s, v, d: BDM.select().where(
    (BDM.instance_uuid == s) & (BDM.volume_id == v) & (BDM.deleted == d)), 3)
_LIVE_OF_SERVER = Prepared(lambda s: BDM.select().where(
    (BDM.instance_uuid == s) & (BDM.deleted == 0)), 1)
_SERVER_FIELDS = tuple(ServerRecord._meta.sorted_fields)
_BDM_FIELDS = tuple(BDM._meta.sorted_fields)
# a request's first read: the cached server and its live rows, one statement
_SERVER_AND_ROWS = Prepared(lambda s: ServerRecord.select(*_SERVER_FIELDS, *_BDM_FIELDS)
                            .join(BDM, peewee.JOIN.LEFT_OUTER,
                                  on=((BDM.instance_uuid == ServerRecord.server_id)
                                      & (BDM.deleted == 0)))
                            .where(ServerRecord.server_id == s).order_by(BDM.id), 1)


def _taken_for_detach(owner, now) -> dict:
    """What taking a row for its detach writes (attached -> detaching)."""
    return {"state": "detaching", "progress": "bdm_detaching", "owner": owner, "updated_at": now}


_TAKE_FOR_DETACH = Prepared(lambda i, owner, now: BDM.update(_taken_for_detach(owner, now))
                            .where((BDM.id == i) & (BDM.state == "attached"))
                            .returning(*_BDM_FIELDS), 3)


def _take_attached(scoped: bool) -> Prepared:
    """DetachVolume's compare-and-swap with the reads it needs in one
    statement: the live row of (server, volume) attached -> detaching, when
    the server is cached in a state that can give a disk back (and, scoped,
    is of the given project). Its RETURNING gives the row."""
    def build(s, v, owner, now, *project):
        server = (ServerRecord.server_id == s) & ServerRecord.state.in_(sorted(ATTACHABLE))
        if project:
            server &= ServerRecord.project_id == project[0]
        return BDM.update(_taken_for_detach(owner, now)).where(
            (BDM.instance_uuid == s) & (BDM.volume_id == v) & (BDM.deleted == 0)
            & (BDM.state == "attached")
            & peewee.fn.EXISTS(ServerRecord.select(ServerRecord.server_id).where(server))
        ).returning(*_BDM_FIELDS)
    return Prepared(build, 5 if scoped else 4)


# keyed by scoped: False for a caller who sees every project, True for one who sees one
_TAKE_ATTACHED = {scoped: _take_attached(scoped) for scoped in (False, True)}
_SOFT_DELETE = Prepared(lambda i, now: BDM.update(
    deleted=BDM.id, deleted_at=now, updated_at=now, progress="bdm_delete", owner=None)
    .where(BDM.id == i), 2)
_PROGRESS: dict[tuple[str, ...], Prepared] = {}
# AttachVolume's row, `attaching` at its first step, in the order of insert()'s
# `row`; one statement for each delete_on_termination (a boolean column would
# turn a placeholder into True)
_NEW_ROW = {flag: Prepared(
    lambda name, v, s, a, tag, owner, request, node, now, flag=flag: BDM.insert(
        device_name=name, volume_id=v, instance_uuid=s, attachment_id=a, tag=tag, owner=owner,
        request_id=request, node_id=node, created_at=now, state="attaching",
        progress="bdm_insert", delete_on_termination=flag, deleted=0, source_type="volume",
        destination_type="volume").returning(BDM.id), 9) for flag in (False, True)}


def _bdm_of(values: tuple) -> BDM:
    """A row read as a tuple of _BDM_FIELDS' values, as a model instance."""
    return BDM(**{f.name: v for f, v in zip(_BDM_FIELDS, values, strict=True)})


def _progress_query(names: tuple[str, ...]) -> Prepared:
    """The UPDATE of a progress record that also sets the columns names."""
    query = _PROGRESS.get(names)
    if query is None:
        query = _PROGRESS[names] = Prepared(lambda i, step, now, *values: BDM.update(
            progress=step, updated_at=now, **dict(zip(names, values, strict=True)))
            .where(BDM.id == i), 3 + len(names))
    return query


class SameRequest(Exception):
    """A retried request (same request_id) whose attach already succeeded."""

    def __init__(self, bdm: BDM):
        super().__init__(bdm.attachment_id)
        self.bdm = bdm


class BdmStore:
    """The rows of one facade database. Callers hold a connection
    (common/db.py with_connection)."""

    def __init__(self, db: peewee.Database, secretbox: SecretBox):
        self.db = db
        self.secretbox = secretbox
        self._server_locks = KeyedLocks()

    # -- reading -------------------------------------------------------------------------

    @staticmethod
    def live(server_id: str, volume_id: str) -> BDM | None:
        return _LIVE_BDM.first(server_id, volume_id, 0)

    @staticmethod
    def server_and_rows(server_id: str) -> tuple[ServerRecord | None, list[BDM]]:
        """The cached server (None: not cached) and its live rows, in one read."""
        rows = _SERVER_AND_ROWS.tuples(server_id)
        if not rows:
            return None, []
        n = len(_SERVER_FIELDS)
        server = ServerRecord(**{f.name: v for f, v in zip(_SERVER_FIELDS, rows[0][:n],
                                                           strict=True)})
        return server, [_bdm_of(r[n:]) for r in rows if r[n] is not None]

    @staticmethod
    def get(bdm_id: int) -> BDM:
        return BDM.get_by_id(bdm_id)

    @staticmethod
    def page(server_id: str, page_size: int, page_token: str) -> tuple[list[BDM], str]:
        """A server's live rows in id order, page_size at a time."""
        query = BDM.select().where((BDM.instance_uuid == server_id) & (BDM.deleted == 0))
        if page_token:
            query = query.where(BDM.id > pagetoken.decode(page_token, "attachments",
                                                          pagetoken.row_id)[0])
        rows = list(query.order_by(BDM.id).limit(page_size + 1))
        token = pagetoken.encode("attachments", rows[page_size - 1].id) if len(rows) > page_size else ""
        return rows[:page_size], token

    @staticmethod
    def page_of_volume(volume_id: str, page_size: int,
                       page_token: str) -> tuple[list[BDM], str]:
        """A volume's live rows (all its servers) in id order."""
        query = BDM.select().where((BDM.volume_id == volume_id) & (BDM.deleted == 0))
        if page_token:
            query = query.where(BDM.id > pagetoken.decode(page_token, "attachments",
                                                          pagetoken.row_id)[0])
        rows = list(query.order_by(BDM.id).limit(page_size + 1))
        token = pagetoken.encode("attachments", rows[page_size - 1].id) if len(rows) > page_size else ""
        return rows[:page_size], token

    @staticmethod
    def of_volume(volume_id: str) -> list[BDM]:
        return list(BDM.select().where((BDM.volume_id == volume_id) & (BDM.deleted == 0))
                    .order_by(BDM.id))

    @staticmethod
    def attached_off_the_list() -> list[tuple[int, str, str]]:
        """(id, node, server) of the live `attached` rows whose server the
        servers cache does not show on the row's node, in id order: the
        vanished-server check's suspects, which the node's own listing then
        confirms (one statement every reconcile interval; it read every
        attached row, 100,000 at a cell's size, to compare them in Python)."""
        return list(BDM.select(BDM.id, BDM.node_id, BDM.instance_uuid)
                    .join(ServerRecord, peewee.JOIN.LEFT_OUTER,
                          on=((ServerRecord.server_id == BDM.instance_uuid)
                              & (ServerRecord.node_id == BDM.node_id)))
                    .where((BDM.deleted == 0) & (BDM.state == "attached")
                           & ServerRecord.server_id.is_null())
                    .order_by(BDM.id).tuples())

    @staticmethod
    def mode_of(bdm: BDM) -> str:
        """rw or ro: the access_mode of the row's connection_info (Nova keeps
        it there too); rw before the Controller published the volume."""
        if not bdm.connection_info:
            return "rw"
        return json.loads(bdm.connection_info).get("data", {}).get("access_mode") or "rw"

    @staticmethod
    def sized(volume_id: str, size_gb: int) -> None:
        BDM.update(volume_size=size_gb, updated_at=utcnow()).where(
            (BDM.volume_id == volume_id) & (BDM.deleted == 0)).execute()

    # -- ExtendVolume --------------------------------------------------------------------

    def begin_extend(self, volume_id: str, new_size_gb: int, owner: str, lease: float) -> None:
        """The volume's pending-extend row, ours; Aborted while another live
        facade runs one (a dead one's is taken over, with the new size)."""
        now = utcnow()
        cutoff = now - datetime.timedelta(seconds=lease)
        alive = FacadeInstance.select(FacadeInstance.id).where(
            FacadeInstance.heartbeat_at >= cutoff)
        with write_transaction(self.db):
            try:
                with self.db.atomic():
                    PendingExtend.create(volume_id=volume_id, new_size_gb=new_size_gb,
                                         owner=owner)
                return
            except peewee.IntegrityError:
                pass
            taken = (PendingExtend.update(new_size_gb=new_size_gb, owner=owner, updated_at=now)
                     .where((PendingExtend.volume_id == volume_id)
                            & (PendingExtend.owner.is_null() | PendingExtend.owner.not_in(alive)))
                     .execute())
        if not taken:
            raise Aborted(f"an extend of volume {volume_id} is in progress; try again",
                          reason="OPERATION_IN_PROGRESS", metadata={"volume_id": volume_id})

    @staticmethod
    def end_extend(volume_id: str) -> None:
        PendingExtend.delete().where(PendingExtend.volume_id == volume_id).execute()

    @staticmethod
    def release_extend(volume_id: str) -> None:
        PendingExtend.update(owner=None, updated_at=utcnow()).where(
            PendingExtend.volume_id == volume_id).execute()

    @staticmethod
    def orphan_extends(lease: float) -> list[PendingExtend]:
        cutoff = utcnow() - datetime.timedelta(seconds=lease)
        alive = FacadeInstance.select(FacadeInstance.id).where(
            FacadeInstance.heartbeat_at >= cutoff)
        return list(PendingExtend.select().where(
            PendingExtend.owner.is_null() | PendingExtend.owner.not_in(alive)))

    @staticmethod
    def claim_extend(row: PendingExtend, owner: str) -> bool:
        previous = (PendingExtend.owner.is_null() if row.owner is None
                    else (PendingExtend.owner == row.owner))
        return bool(PendingExtend.update(owner=owner, updated_at=utcnow())
                    .where((PendingExtend.volume_id == row.volume_id) & previous).execute())

    # -- AttachVolume -------------------------------------------------------------------

    def insert(self, server_id: str, volume_id: str, *, device: str, server, limit: int,
               owner: str, tag: str = "", delete_on_termination: bool = False,
               request_id: str = "", rows: list[BDM] | None = None) -> BDM:
        """A new row `attaching` with its device name, under the server's lock;
        the unique indexes keep replicas in other processes correct too.
        AlreadyExists when the volume is attached to the server (SameRequest
        when it is the same request again), ResourceExhausted at the limit."""
        with self._server_locks.hold(server_id):
            for attempt in range(5):
                # the server's live rows: as the caller read them (a race with another
                # insert ends on a unique index, and the next attempt reads again)
                if attempt or rows is None:
                    rows = _LIVE_OF_SERVER.rows(server_id)
                existing = next((b for b in rows if b.volume_id == volume_id), None)
                if existing is not None:
                    self._already_attached(existing, volume_id, request_id)
                live = [b.device_name for b in rows]
                if len(live) >= limit:
                    raise ResourceExhausted(
                        f"Maximum number of volumes ({len(live)}) reached for server "
                        f"{server_id}", reason="TOO_MANY_VOLUMES")
                name = pick_device(device, server, live)
                row = dict(device_name=name, volume_id=volume_id, instance_uuid=server_id,
                           attachment_id=str(uuid.uuid4()), tag=tag or None, owner=owner,
                           request_id=request_id or None, node_id=server.node_id)
                now = utcnow()
                try:  # one statement: its own transaction
                    (bdm_id,), = _NEW_ROW[bool(delete_on_termination)].execute(
                        *row.values(), str(now))
                except peewee.IntegrityError:
                    if device:
                        existing = self.live(server_id, volume_id)
                        if existing is not None:
                            self._already_attached(existing, volume_id, request_id)
                        raise device_in_use(device) from None
                    continue  # another process took that name: pick again
                return BDM(id=bdm_id, created_at=now, state="attaching", progress="bdm_insert",
                           delete_on_termination=bool(delete_on_termination), **row)
            raise Aborted(f"server {server_id} is busy; try again", reason="SERVER_BUSY")

    @staticmethod
    def _already_attached(existing: BDM, volume_id: str, request_id: str):
        if request_id and existing.request_id == request_id:
            if existing.state != "attached":
                raise Aborted(f"the attach of volume {volume_id} is still in progress",
                              reason="ATTACH_IN_PROGRESS")
            raise SameRequest(existing)
        raise AlreadyExists(f"Invalid volume: volume {volume_id} already attached",
                            reason="VOLUME_ALREADY_ATTACHED",
                            metadata={"attachment_id": existing.attachment_id,
                                      "device": existing.device_name,
                                      "server_id": existing.instance_uuid,
                                      "volume_id": existing.volume_id})

    @staticmethod
    def progress(bdm_id: int | BDM, step: str, **fields) -> None:
        """Record the last step that completed (and any columns it fills); given
        the row itself, its fields change too."""
        now = utcnow()
        if isinstance(bdm_id, BDM):
            for name, value in (("progress", step), ("updated_at", now), *fields.items()):
                setattr(bdm_id, name, value)
            bdm_id = bdm_id.id
        _progress_query(tuple(fields)).execute(bdm_id, step, str(now), *fields.values())

    def attached(self, bdm: int | BDM, info: types_pb2.ConnectionInfo | None = None,
                 **fields) -> None:
        """The attach is done, or a detach rolled back: `attached`, nobody's.
        An attach writes its sealed connection_info (the detach's node steps
        need it) and fields here, in the same write: its only write between
        bdm_insert and the end."""
        if info is not None:
            fields["connection_info"] = self.seal(info)
        self.progress(bdm, "mark_attached", state="attached", owner=None, **fields)

    @staticmethod
    def release(bdm_id: int) -> None:
        """Leave an unfinished operation to the reconciler."""
        BDM.update(owner=None, updated_at=utcnow()).where(BDM.id == bdm_id).execute()

    def rolling_back(self, bdm_id: int, info: types_pb2.ConnectionInfo | None) -> None:
        """An attach whose rollback did not finish (some undo steps ran, others
        failed): left to the reconciler, which only ever undoes it, with the
        connection_info the node's undo steps need (None: the node never had
        it)."""
        fields = {"connection_info": self.seal(info)} if info is not None else {}
        self.progress(bdm_id, ROLLING_BACK, owner=None, **fields)

    @staticmethod
    def delete(bdm_id: int) -> None:
        """An attach undone: the row goes (it was never attached)."""
        BDM.delete().where(BDM.id == bdm_id).execute()

    # -- DetachVolume -----------------------------------------------------------------------

    @staticmethod
    def take_attached(server_id: str, volume_id: str, owner: str,
                      project: str | None) -> BDM | None:
        """DetachVolume's first step when all is as it should be, in one
        statement: the live row of (server, volume), attached, whose server is
        cached, of project (None: any) and in a state that can give a disk
        back, taken (attached -> detaching, owner). None when any of that is
        not so: the caller reads which."""
        values = (server_id, volume_id, owner, str(utcnow()))
        rows = (_TAKE_ATTACHED[False].execute(*values) if project is None
                else _TAKE_ATTACHED[True].execute(*values, project))
        return _bdm_of(rows[0]) if rows else None

    @staticmethod
    def take_for_detach(bdm: BDM, owner: str) -> BDM | None:
        """attached -> detaching, one compare-and-swap; the row as taken (not
        as bdm was read: an attach may have ended since, writing its
        connection_info), or None when it is not attached (another operation
        runs)."""
        rows = _TAKE_FOR_DETACH.execute(bdm.id, owner, str(utcnow()))
        return _bdm_of(rows[0]) if rows else None

    @staticmethod
    def soft_delete(bdm_id: int) -> None:
        _SOFT_DELETE.execute(bdm_id, str(utcnow()))

    # -- connection_info at rest ---------------------------------------------------------

    def seal(self, info: types_pb2.ConnectionInfo) -> str:
        """connection_info as stored on the BDM: the CHAP secret encrypted."""
        data = dict_to_words(json_format.MessageToDict(info, preserving_proto_field_name=True),
                             info.DESCRIPTOR)
        password = data.get("data", {}).pop("auth_password", "")
        if password:
            data["data"]["auth_password_encrypted"] = self.secretbox.encrypt(password)
        return json.dumps(data, sort_keys=True)

    def unseal(self, text: str | None) -> types_pb2.ConnectionInfo:
        info = types_pb2.ConnectionInfo()
        if not text:
            return info
        data = json.loads(text)
        sealed = data.get("data", {}).pop("auth_password_encrypted", "")
        json_format.ParseDict(dict_from_words(data, info.DESCRIPTOR), info)
        if sealed:
            info.data.auth_password = self.secretbox.decrypt(sealed)
        return info

    @staticmethod
    def rotate_secrets(db: peewee.Database, box: SecretBox) -> int:
        """Re-seal every stored CHAP secret with box's newest key (vmattach
        rotate-key); returns how many."""
        count = 0
        with db.connection_context(), write_transaction(db):
            for bdm in BDM.select(BDM.id, BDM.connection_info).where(
                    BDM.connection_info.is_null(False)):
                data = json.loads(bdm.connection_info)
                sealed = data.get("data", {}).get("auth_password_encrypted")
                if not sealed:
                    continue
                data["data"]["auth_password_encrypted"] = box.rotate(sealed)
                BDM.update(connection_info=json.dumps(data, sort_keys=True)).where(
                    BDM.id == bdm.id).execute()
                count += 1
        return count

    # -- recovery (server/reconciler.py) ------------------------------------------------------

    @staticmethod
    def heartbeat(instance_id: str) -> None:
        (FacadeInstance.insert(id=instance_id, heartbeat_at=utcnow())
         .on_conflict(conflict_target=[FacadeInstance.id],
                      update={FacadeInstance.heartbeat_at: utcnow()})
         .execute())

    @staticmethod
    def forget_instances(silent_for: float) -> None:
        """Drop the rows of facade instances silent for that many seconds."""
        FacadeInstance.delete().where(
            FacadeInstance.heartbeat_at < utcnow() - datetime.timedelta(seconds=silent_for)
        ).execute()

    @staticmethod
    def orphans(lease: float) -> list[BDM]:
        """Unfinished operations whose owner is nobody or has been silent
        for lease seconds."""
        cutoff = utcnow() - datetime.timedelta(seconds=lease)
        alive = FacadeInstance.select(FacadeInstance.id).where(
            FacadeInstance.heartbeat_at >= cutoff)
        return list(BDM.select().where(
            (BDM.deleted == 0) & BDM.state.in_(["attaching", "detaching"])
            & (BDM.owner.is_null() | BDM.owner.not_in(alive))).order_by(BDM.id))

    @staticmethod
    def claim(bdm: BDM, owner: str) -> bool:
        """Take an orphan, one compare-and-swap on its owner: False when
        another replica took it first."""
        previous = BDM.owner.is_null() if bdm.owner is None else (BDM.owner == bdm.owner)
        return bool(BDM.update(owner=owner, updated_at=utcnow())
                    .where((BDM.id == bdm.id) & (BDM.deleted == 0) & previous
                           & (BDM.state == bdm.state)).execute())
