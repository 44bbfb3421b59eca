"""The Controller's logic (Cinder's volume manager and target helper), as
plain Python: no gRPC here.

Every status change is a compare-and-swap UPDATE on the status it expects;
the number of rows it changed says who won. Several Controller processes may
share one database (and one tgtd): a volume's export is created, changed and
removed only while holding the volume's lock (_volume_lock), which is a lock
in this process and a lock in the database; the write transactions that take
a volume's row lock take it first, so that they cannot deadlock on
PostgreSQL. os-attach, os-begin_detaching and os-roll_detaching take
neither: each of their compare-and-swaps is one statement of its own
(mark_attached says what is seen between os-attach's two). A detach in
progress is recorded on the volume's row (detaching_instance), not on its
attachment's (see _shown)."""

from __future__ import annotations

import builtins
import contextlib
import datetime
import json
import logging
import os
import re
import secrets
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import peewee

from vmattach.common import auth, pagetoken
from vmattach.common.db import InSet, Prepared, is_sqlite, with_connection, write_transaction
from vmattach.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    VmattachError,
)
from vmattach.common.locks import KeyedLocks
from vmattach.common.periodic import no_pause
from vmattach.common.rules import require_iscsi_name
from vmattach.common.secretbox import SecretBox
from vmattach.controller.models import Export, Volume, VolumeAttachment, utcnow
from vmattach.controller.tgt import IQN_PREFIX, Target, TgtAdm

LOG = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[\w.\- ]{1,255}$")
CHAP_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class Connector:
    initiator: str
    ip: str = ""
    host: str = ""
    platform: str = ""
    os_type: str = ""
    multipath: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> Connector | None:
        return cls.load(text) if text else None

    @classmethod
    def load(cls, text: str) -> Connector:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class ConnectionInfo:
    """Cinder's connection_info for an iSCSI export (auth_password included:
    only the attaching caller gets it)."""
    volume_id: str
    target_portal: str
    target_iqn: str
    auth_username: str
    auth_password: str = field(repr=False)
    target_lun: int = 1
    target_discovered: bool = False
    auth_method: str = "CHAP"
    access_mode: str = "rw"
    encrypted: bool = False
    driver_volume_type: str = "iscsi"
    multiattach: bool = False


class VolumeRow(NamedTuple):
    """A volume as the hot path reads it (no model instance)."""
    id: str
    name: str
    project_id: str
    size_gb: int
    multiattach: bool
    status: str
    attach_status: str
    detaching_instance: str | None
    path: str
    chap_username: str | None
    chap_secret: str | None
    created_at: datetime.datetime
    updated_at: datetime.datetime


class ExportRow(NamedTuple):
    tid: int
    target_iqn: str
    target_tid: int | None


class AttachmentRow(NamedTuple):
    id: str
    volume_id: str
    instance_uuid: str
    attach_status: str
    mountpoint: str
    attach_mode: str
    connector: str | None
    created_at: datetime.datetime
    updated_at: datetime.datetime


VOLUME_COLUMNS = (Volume.id, Volume.name, Volume.project_id, Volume.size_gb, Volume.multiattach,
                  Volume.status, Volume.attach_status, Volume.detaching_instance, Volume.path,
                  Volume.chap_username, Volume.chap_secret, Volume.created_at, Volume.updated_at)
ATTACHMENT_COLUMNS = (VolumeAttachment.id, VolumeAttachment.volume, VolumeAttachment.instance_uuid,
                      VolumeAttachment.attach_status, VolumeAttachment.mountpoint,
                      VolumeAttachment.attach_mode, VolumeAttachment.connector,
                      VolumeAttachment.created_at, VolumeAttachment.updated_at)
_NV = len(VOLUME_COLUMNS)

VolumeView = tuple[VolumeRow | Volume, list[AttachmentRow]]


@dataclass(frozen=True)
class ExportState:
    """An export and its target as tgtd has it (for the audit)."""
    volume_id: str
    target_iqn: str
    tid: int
    at_tgtd: bool
    allowed_initiators: list[str]
    connection_initiators: list[str]


@dataclass(frozen=True)
class StrayTarget:
    """A target of this deployment's volume on tgtd that no export owns."""
    tid: int
    target_iqn: str
    volume_id: str


@dataclass
class ExportRepair:
    targets_created: int = 0
    targets_removed: int = 0
    acls_changed: int = 0


def _of_server(v, s) -> peewee.Expression:
    """The condition of server s's attachment of volume v (one at most)."""
    return (VolumeAttachment.volume == v) & (VolumeAttachment.instance_uuid == s)


def _exists(condition: peewee.Expression) -> peewee.Expression:
    """EXISTS an attachment on condition (a subquery of the statement)."""
    return peewee.fn.EXISTS(VolumeAttachment.select(VolumeAttachment.id).where(condition))


# the selects of every request, compiled once
_VOLUME = Prepared(lambda v: Volume.select().where(Volume.id == v), 1)
_ATTACHMENTS = Prepared(lambda v: VolumeAttachment.select().where(VolumeAttachment.volume == v)
                        .order_by(VolumeAttachment.created_at), 1)
_ATTACHMENT = Prepared(lambda v, s: VolumeAttachment.select().where(_of_server(v, s)), 2)
_EXPORT = Prepared(lambda v: Export.select().where(Export.volume == v), 1)
# the hot path: one statement per read, compare-and-swaps that return the row they
# changed (RETURNING), no model instances
_VIEW = Prepared(lambda v: Volume.select(*VOLUME_COLUMNS, *ATTACHMENT_COLUMNS)
                 .join(VolumeAttachment, peewee.JOIN.LEFT_OUTER,
                       on=(VolumeAttachment.volume == Volume.id))
                 .where(Volume.id == v).order_by(VolumeAttachment.created_at), 1)
_RESERVABLE = ((Volume.status == "available")
               | ((Volume.multiattach == True) & (Volume.status == "in-use")))  # noqa: E712
_RESERVE = Prepared(lambda v, now: Volume.update(
    status="attaching", attach_status="attaching", updated_at=now)
    .where((Volume.id == v) & _RESERVABLE).returning(*VOLUME_COLUMNS), 2, VolumeRow)
# the same for a caller who acts for a project: another project's volume stays as it was
_RESERVE_IN_PROJECT = Prepared(lambda v, now, p: Volume.update(
    status="attaching", attach_status="attaching", updated_at=now)
    .where((Volume.id == v) & (Volume.project_id == p) & _RESERVABLE)
    .returning(*VOLUME_COLUMNS), 3, VolumeRow)
_NEW_ATTACHMENT = Prepared(lambda a, v, s, mode, c, now: VolumeAttachment.insert(
    id=a, volume=v, instance_uuid=s, attach_status="reserved", mountpoint="", attach_mode=mode,
    connector=c, created_at=now, updated_at=now), 6)
# publish: the volume, the server's attachment and the export in one read
_PUBLISH_VIEW = Prepared(lambda v, s: Volume.select(
    *VOLUME_COLUMNS, VolumeAttachment.id, VolumeAttachment.attach_status,
    VolumeAttachment.connector, VolumeAttachment.attach_mode, Export.tid, Export.target_iqn,
    Export.target_tid)
    .join(VolumeAttachment, peewee.JOIN.LEFT_OUTER,
          on=((VolumeAttachment.volume == Volume.id) & (VolumeAttachment.instance_uuid == s)))
    .switch(Volume).join(Export, peewee.JOIN.LEFT_OUTER, on=(Export.volume == Volume.id))
    .where(Volume.id == v), 2)
# (no row when the volume has its export already: one statement either way)
_NEW_EXPORT = Prepared(lambda v, iqn, now: Export.insert(
    volume=v, target_iqn=iqn, created_at=now).on_conflict_ignore().returning(Export.tid), 3)
_SET_CONNECTOR = Prepared(lambda a, c, now: VolumeAttachment.update(connector=c, updated_at=now)
                          .where(VolumeAttachment.id == a), 3)
_DROP_CONNECTOR = Prepared(lambda v, s, now: VolumeAttachment.update(connector=None, updated_at=now)
                           .where(_of_server(v, s) & VolumeAttachment.connector.is_null(False)),
                           3)
# unpublish/unreserve: the volume's export and the initiators still published, one read
_REVOKE_VIEW = Prepared(lambda v: Volume.select(
    Volume.chap_username, Export.tid, Export.target_tid, VolumeAttachment.connector)
    .join(Export, peewee.JOIN.LEFT_OUTER, on=(Export.volume == Volume.id))
    .switch(Volume).join(VolumeAttachment, peewee.JOIN.LEFT_OUTER,
                         on=((VolumeAttachment.volume == Volume.id)
                             & VolumeAttachment.connector.is_null(False)))
    .where(Volume.id == v), 1)
_DELETE_EXPORT = Prepared(lambda t: Export.delete().where(Export.tid == t), 1)
# the export's row, when no attachment of the volume is published any more
_DROP_UNUSED_EXPORT = Prepared(lambda v: Export.delete().where(
    (Export.volume == v) & ~InSet(_exists((VolumeAttachment.volume == v)
                                          & VolumeAttachment.connector.is_null(False))))
    .returning(Export.tid, Export.target_tid), 1)
_EXPORT_ROW = Prepared(lambda v: Export.select(Export.tid, Export.target_iqn, Export.target_tid)
                       .where(Export.volume == v), 1, ExportRow)
# attachment_delete: the server's attachment in any state, with the connector it had
_DELETE_ATTACHMENT = Prepared(lambda v, s: VolumeAttachment.delete().where(_of_server(v, s))
                              .returning(VolumeAttachment.connector), 2)
_ATTACH_DONE = Prepared(lambda v, s, mountpoint, mode, now: VolumeAttachment.update(
    attach_status="attached", mountpoint=mountpoint, attach_mode=mode, updated_at=now)
    .where(_of_server(v, s) & (VolumeAttachment.attach_status == "reserved"))
    .returning(*ATTACHMENT_COLUMNS), 5, AttachmentRow)
# os-attach's second compare-and-swap, also run again by a retry: attaching -> in-use
# when the server's attachment is attached at the mountpoint and no other is
# reserved (a multiattach volume being attached to another server stays attaching)
_VOLUME_IN_USE = Prepared(lambda v, s, mountpoint, now: Volume.update(
    status="in-use", attach_status="attached", updated_at=now)
    .where((Volume.id == v) & (Volume.status == "attaching")
           & _exists(_of_server(v, s) & (VolumeAttachment.attach_status == "attached")
                     & (VolumeAttachment.mountpoint == mountpoint))
           & ~_exists((VolumeAttachment.volume == v)
                      & (VolumeAttachment.attach_status == "reserved")))
    .returning(*VOLUME_COLUMNS), 4, VolumeRow)
# os-attach's undo when the volume had left attaching: the attachment reserved again
_ATTACH_UNDONE = Prepared(lambda a, mountpoint, now: VolumeAttachment.update(
    attach_status="reserved", mountpoint="", updated_at=now)
    .where((VolumeAttachment.id == a) & (VolumeAttachment.attach_status == "attached")
           & (VolumeAttachment.mountpoint == mountpoint)), 3)
# os-begin_detaching: in-use -> detaching, naming the server, whose attachment must be
# attached; returns the volume and that attachment (its columns one subquery each)
_BEGIN_DETACHING = Prepared(lambda v, s, now: Volume.update(
    status="detaching", detaching_instance=s, updated_at=now)
    .where((Volume.id == v) & (Volume.status == "in-use") & (Volume.attach_status == "attached")
           & _exists(_of_server(v, s) & (VolumeAttachment.attach_status == "attached")))
    .returning(*VOLUME_COLUMNS, *(VolumeAttachment.select(c).where(_of_server(v, s))
                                  for c in ATTACHMENT_COLUMNS)), 3)
# os-roll_detaching: detaching -> in-use when the server's detach is the one begun
_ROLL_DETACHING = Prepared(lambda v, s, now: Volume.update(
    status="in-use", detaching_instance=None, updated_at=now)
    .where((Volume.id == v) & (Volume.status == "detaching")
           & (Volume.detaching_instance == s)), 3)
_END_ATTACHMENT = Prepared(lambda v, s: VolumeAttachment.delete().where(
    _of_server(v, s) & (VolumeAttachment.attach_status == "attached")), 2)


def _settle_query(from_statuses: Sequence[str]) -> Prepared:
    """After an attachment ended, one compare-and-swap on from_statuses:
    detaching while the attachment whose detach began (detaching_instance) is
    there, in-use while an attachment is attached, attaching while one is
    being made, else available; detaching_instance is cleared when the
    attachment it names has ended."""
    def build(v, now):
        mine = VolumeAttachment.volume == v
        live = mine & (VolumeAttachment.attach_status == "attached")
        detaching = InSet(_exists(live & (VolumeAttachment.instance_uuid
                                          == Volume.detaching_instance)))
        attached, other = InSet(_exists(live)), InSet(_exists(mine))
        return Volume.update(
            status=peewee.Case(None, [(detaching, "detaching"), (attached, "in-use"),
                                      (other, "attaching")], "available"),
            attach_status=peewee.Case(None, [(attached, "attached"), (other, "attaching")],
                                      "detached"),
            detaching_instance=peewee.Case(None, [(detaching, Volume.detaching_instance)]),
            updated_at=now,
        ).where((Volume.id == v) & Volume.status.in_(list(from_statuses))).returning(*VOLUME_COLUMNS)
    return Prepared(build, 2, VolumeRow)


_ENDING = ("attaching", "in-use", "detaching")  # a volume whose attachment may end
_SETTLE = {tuple(f): _settle_query(f) for f in (("detaching", "in-use"), ("attaching",), _ENDING)}


def _now() -> str:
    """utcnow as the hot path's statements bind it (the text peewee stores)."""
    return str(utcnow())


def _shown_status(volume: VolumeRow | Volume, server_id: str, attach_status: str) -> str:
    """An attachment's attach_status as callers see it: the row of the server
    whose detach began (the volume's detaching_instance) stays attached in the
    table and shows detaching."""
    if attach_status == "attached" and server_id == volume.detaching_instance:
        return "detaching"
    return attach_status


def _shown(volume: VolumeRow | Volume, attachments: list[AttachmentRow]) -> list[AttachmentRow]:
    """The volume's attachments as every view shows them (_shown_status)."""
    if volume.detaching_instance is None:
        return attachments
    return [a._replace(attach_status=_shown_status(volume, a.instance_uuid, a.attach_status))
            for a in attachments]


def _row_view(rows: list) -> tuple[VolumeRow, list[AttachmentRow]] | None:
    """_VIEW's rows -> the volume and its attachments."""
    if not rows:
        return None
    return (VolumeRow(*rows[0][:_NV]),
            [AttachmentRow(*r[_NV:]) for r in rows if r[_NV] is not None])


def _tid(export: Export | ExportRow) -> int:
    """The export's tid on tgtd (NULL: the export id; rows from before version 2,
    and new exports whose target got that tid)."""
    return export.target_tid if export.target_tid is not None else export.tid


def _require_mode(mode: str) -> None:
    if mode not in ("rw", "ro"):
        raise InvalidArgument("mode must be 'rw' or 'ro'", reason="INVALID_MODE")


def _require_initiator(connector: Connector) -> None:
    if not connector.initiator:
        raise InvalidArgument("connector.initiator is required (the host's iSCSI initiator IQN)")
    require_iscsi_name(connector.initiator, "connector.initiator")


# tgtd's targets compared with the database this many at a time (one read each)
RECONCILE_BATCH = 500


# the exports made before a time of a batch of target names, with the initiators
# their connections use (built once: peewee building a query of 500 names was a
# third of a reconcile's time; a short batch is padded with "", which names no export)
_EXPORTS_NAMED = Prepared(lambda before, *iqns: Export.select(
    Export.volume, Export.tid, Export.target_iqn, peewee.fn.COALESCE(Export.target_tid, Export.tid),
    VolumeAttachment.connector)
    .join(VolumeAttachment, peewee.JOIN.LEFT_OUTER,
          on=((VolumeAttachment.volume == Export.volume)
              & VolumeAttachment.connector.is_null(False)))
    .where(Export.target_iqn.in_(builtins.list(iqns)) & (Export.created_at < before)),
    RECONCILE_BATCH + 1)


def _mark(bits: bytearray, n: int) -> None:
    """Set bit n of bits, growing it as needed."""
    if n >> 3 >= len(bits):
        bits.extend(bytes(max((n >> 3) + 1 - len(bits), len(bits))))
    bits[n >> 3] |= 1 << (n & 7)


def _marked(bits: bytearray, n: int) -> bool:
    return n >> 3 < len(bits) and bool(bits[n >> 3] & (1 << (n & 7)))


def not_found(volume_id: str) -> NotFound:
    return NotFound(f"Volume {volume_id} could not be found.", reason="VOLUME_NOT_FOUND",
                    metadata={"volume_id": volume_id})


class VolumeManager:
    def __init__(self, db: peewee.Database, volume_dir: Path, tgt: TgtAdm,
                 portal: str, secretbox: SecretBox, max_volume_gb: int = 1024,
                 iqn_prefix: str = IQN_PREFIX, quota_gigabytes: int = 0):
        self.db = db
        self.iqn_prefix = iqn_prefix
        self.volume_dir = Path(volume_dir)
        self.volume_dir.mkdir(parents=True, exist_ok=True)
        self.tgt = tgt
        self.portal = portal
        self.secretbox = secretbox
        self.max_volume_gb = max_volume_gb
        self.quota_gigabytes = quota_gigabytes  # 0: no quota
        self._export_locks = KeyedLocks()

    # -- reading ---------------------------------------------------------------

    def _get(self, volume_id: str) -> Volume:
        volume = _VOLUME.first(volume_id)
        if volume is None:
            raise not_found(volume_id)
        return volume

    def _lock_row(self, volume_id: str) -> None:
        """Inside a write transaction: hold the volume's row until it ends
        (SELECT ... FOR UPDATE). On SQLite the IMMEDIATE transaction already
        holds the database's write lock."""
        if not is_sqlite(self.db):
            list(Volume.select(Volume.id).where(Volume.id == volume_id).for_update())

    @contextlib.contextmanager
    def _volume_lock(self, volume_id: str):
        """The volume's export lock: one thread of this process at a time, and
        one Controller process of those sharing the database at a time (a
        write transaction holding the volume's row, committed at the end;
        rolled back when the block raises). The tgtadm commands run inside it,
        so two processes never create or remove one target at once, and a
        target is never there without its committed Export row for longer
        than the lock is held."""
        with self._export_locks.hold(volume_id):
            with write_transaction(self.db):
                self._lock_row(volume_id)
                yield

    @with_connection
    def get(self, volume_id: str) -> VolumeView:
        """A volume the caller may see (another project's: NotFound); one read."""
        view = _row_view(_VIEW.tuples(volume_id))
        if view is None:
            raise not_found(volume_id)
        return self._visible(*view)

    @staticmethod
    def _visible(volume, attachments) -> VolumeView:
        """(volume, attachments as shown) for a caller who may see the volume."""
        if not auth.current().sees(volume.project_id):
            raise not_found(volume.id)
        return volume, _shown(volume, attachments)

    @with_connection
    def list(self, page_size: int, page_token: str = "", project_id: str | None = None):
        """One page of volumes in creation order (of project_id only, unless
        None), their attachments fetched in one more query; returns
        (volumes, attachments by volume id, next token)."""
        query = Volume.select().order_by(Volume.created_at, Volume.id)
        if project_id is not None:
            query = query.where(Volume.project_id == project_id)
        if page_token:
            stamp, last_id = pagetoken.decode(page_token, "volumes", pagetoken.timestamp,
                                              pagetoken.uuid_key)
            query = query.where(peewee.Tuple(Volume.created_at, Volume.id) > (stamp, last_id))
        volumes = list(query.limit(page_size + 1))
        more = len(volumes) > page_size
        volumes = volumes[:page_size]
        attachments: dict[str, list[AttachmentRow]] = {v.id: [] for v in volumes}
        if volumes:
            for row in (VolumeAttachment.select(*ATTACHMENT_COLUMNS)
                        .where(VolumeAttachment.volume.in_(list(attachments)))
                        .order_by(VolumeAttachment.created_at).tuples()):
                att = AttachmentRow(*row)
                attachments[att.volume_id].append(att)
        attachments = {v.id: _shown(v, attachments[v.id]) for v in volumes}
        token = pagetoken.encode("volumes", volumes[-1].created_at, volumes[-1].id) if more else ""
        return volumes, attachments, token

    # -- create / delete -------------------------------------------------------

    @with_connection
    def create(self, name: str, size_gb: int, multiattach: bool = False,
               project_id: str = "") -> Volume:
        """A volume of project_id; names are unique within a project."""
        if not NAME_RE.fullmatch(name or ""):
            raise InvalidArgument("name must be 1-255 letters, digits, spaces, '.', '_' or '-'")
        if not 1 <= size_gb <= self.max_volume_gb:
            raise InvalidArgument(f"size_gb must be between 1 and {self.max_volume_gb}")
        existing = Volume.get_or_none((Volume.name == name) & (Volume.project_id == project_id))
        if existing is None:
            self._check_quota(size_gb)
            volume_id = str(uuid.uuid4())
            path = self.volume_dir / f"volume-{volume_id}.img"
            try:
                volume = Volume.create(id=volume_id, name=name, size_gb=size_gb,
                                       project_id=project_id,
                                       multiattach=multiattach, status="creating",
                                       path=str(path), **self._new_chap())
            except peewee.IntegrityError:  # a concurrent create of the same name won
                existing = Volume.get((Volume.name == name) & (Volume.project_id == project_id))
            else:
                try:
                    # 0600: only the Controller (and tgtd, as root) reads a volume's bytes
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "wb") as fh:
                        fh.truncate(size_gb << 30)  # sparse
                except OSError as exc:
                    volume.delete_instance()
                    raise FailedPrecondition(f"cannot create the volume file: {exc.strerror}") from None
                Volume.update(status="available", updated_at=utcnow()).where(
                    (Volume.id == volume_id) & (Volume.status == "creating")).execute()
                LOG.info("created volume %s (%s, %d GiB)", volume_id, name, size_gb)
                return Volume.get_by_id(volume_id)
        if existing.size_gb != size_gb or existing.multiattach != multiattach:
            raise AlreadyExists(
                f"a volume named {name!r} already exists with size_gb {existing.size_gb}"
                f" and multiattach {existing.multiattach}", reason="VOLUME_NAME_EXISTS",
                metadata={"volume_id": existing.id})
        return existing

    @with_connection
    def delete(self, volume_id: str) -> None:
        """Delete a volume; a missing one, or another project's, is OK and
        left alone (the caller cannot tell them apart)."""
        owner = _VOLUME.first(volume_id)
        if owner is not None and not auth.current().sees(owner.project_id):
            return
        with write_transaction(self.db):
            # "deleting" too: retrying a delete that failed or crashed half-way
            changed = (Volume.update(status="deleting", updated_at=utcnow())
                       .where((Volume.id == volume_id)
                              & Volume.status.in_(["available", "error", "creating", "deleting"])
                              & ~_exists(VolumeAttachment.volume == Volume.id))
                       .execute())
            if not changed:
                volume = Volume.get_or_none(Volume.id == volume_id)
                if volume is None or not auth.current().sees(volume.project_id):
                    return  # deleting a missing volume is not an error
                raise FailedPrecondition(
                    f"Invalid volume: Volume status must be available or error to delete,"
                    f" but the status is {volume.status}.", reason="VOLUME_IN_USE")
        with self._volume_lock(volume_id):
            volume = Volume.get_by_id(volume_id)
            self._remove_export(volume)
        try:
            os.unlink(volume.path)
        except FileNotFoundError:
            pass
        volume.delete_instance()
        LOG.info("deleted volume %s", volume_id)

    def _check_quota(self, more_gb: int) -> None:
        """Cinder's gigabytes quota: the volumes' sizes plus more_gb must stay
        within quota_gigabytes (racing creates may each pass once; an extend
        checks under the volume's lock)."""
        if not self.quota_gigabytes:
            return
        consumed = Volume.select(peewee.fn.COALESCE(peewee.fn.SUM(Volume.size_gb), 0)).scalar()
        if consumed + more_gb > self.quota_gigabytes:
            raise ResourceExhausted(
                f"Requested volume or snapshot exceeds allowed gigabytes quota. Requested"
                f" {more_gb}G, quota is {self.quota_gigabytes}G and {consumed}G has been"
                f" consumed.", reason="QUOTA_EXCEEDED",
                metadata={"requested": str(more_gb), "quota": str(self.quota_gigabytes),
                          "consumed": str(consumed)})

    # -- extend ------------------------------------------------------------------

    @with_connection
    def extend(self, volume_id: str, new_size_gb: int) -> VolumeView:
        """os-extend, also of an in-use volume: grow the file, then make tgtd
        report the new size (it reads a backing file's size only when a LUN is
        created: LUN 1 is re-created on the same file; sessions stay logged in
        and the LUN keeps its SCSI id and serial). All under the volume's lock,
        the new size committed last: a retry after a crash finds the file grown
        and redoes the LUN, which is idempotent."""
        if not 1 <= new_size_gb <= self.max_volume_gb:
            raise InvalidArgument(f"new_size_gb must be between 1 and {self.max_volume_gb}",
                                  reason="INVALID_SIZE")
        with self._volume_lock(volume_id):
            volume = self._get(volume_id)
            if not auth.current().sees(volume.project_id):
                raise not_found(volume_id)
            if volume.status not in ("available", "in-use"):
                raise FailedPrecondition(
                    f"Invalid volume: Volume {volume_id} status must be available or in-use"
                    f" to extend, but current status is: {volume.status}.",
                    reason="VOLUME_NOT_EXTENDABLE", metadata={"status": volume.status})
            if new_size_gb < volume.size_gb:
                raise InvalidArgument(
                    f"New size for extend must be greater than current size. (current:"
                    f" {volume.size_gb}, extended: {new_size_gb}).", reason="INVALID_SIZE")
            if new_size_gb > volume.size_gb:
                self._check_quota(new_size_gb - volume.size_gb)
            size = new_size_gb << 30
            try:
                if os.path.getsize(volume.path) < size:
                    os.truncate(volume.path, size)  # sparse
            except OSError as exc:
                raise FailedPrecondition(f"cannot grow the volume file: {exc.strerror}",
                                         reason="VOLUME_FILE") from None
            export = _EXPORT.first(volume_id)
            if export is not None and (new_size_gb > volume.size_gb
                                       or not self.tgt.has_lun(_tid(export))):
                self.tgt.reload_lun(_tid(export), volume.path)
            if new_size_gb > volume.size_gb:
                (Volume.update(size_gb=new_size_gb, updated_at=utcnow())
                 .where(Volume.id == volume_id).execute())
                LOG.info("extended volume %s from %d to %d GiB (%s)", volume_id, volume.size_gb,
                         new_size_gb, volume.status)
        return self.get(volume_id)

    # -- reserve / unreserve ---------------------------------------------------

    def _attached_servers(self, volume_id: str) -> builtins.list[str]:
        return [a.instance_uuid for a in VolumeAttachment.select(VolumeAttachment.instance_uuid)
                .where(VolumeAttachment.volume == volume_id)]

    @with_connection
    def reserve(self, volume_id: str, server_id: str, attachment_id: str = "",
                mode: str = "rw", project_id: str = "") -> VolumeView:
        """os-reserve: available -> attaching (in-use -> attaching for multiattach).
        The attachment gets attachment_id (the caller's BDM keeps the same
        one) and attach_mode mode. With project_id, a volume of another
        project is not found (and not reserved)."""
        _require_mode(mode)
        with self._reserving(volume_id, server_id):
            with write_transaction(self.db):
                reserved = self._reserve(volume_id, server_id, attachment_id, mode, project_id)
                if reserved is not None:
                    return self._view_of(*reserved)
        raise self._not_reserved(volume_id, project_id)

    @contextlib.contextmanager
    def _reserving(self, volume_id: str, server_id: str):
        """A second attachment of one server to one volume: AlreadyExists."""
        try:
            yield
        except peewee.IntegrityError:
            raise AlreadyExists(f"Invalid volume: volume {volume_id} already attached",
                                reason="VOLUME_ALREADY_ATTACHED",
                                metadata={"volume_id": volume_id, "server_id": server_id}) from None

    def _reserve(self, volume_id: str, server_id: str, attachment_id: str, mode: str,
                 project_id: str, connector: Connector | None = None,
                 ) -> tuple[VolumeRow, AttachmentRow] | None:
        """(in a write transaction) The compare-and-swap of os-reserve and the
        new attachment (with the connector it is published for, if any); None
        when the volume could not be reserved."""
        now = _now()
        changed = (_RESERVE_IN_PROJECT.execute(volume_id, now, project_id) if project_id
                   else _RESERVE.execute(volume_id, now))
        if not changed:
            return None
        attachment_id = attachment_id or str(uuid.uuid4())
        recorded = connector.to_json() if connector is not None else None
        _NEW_ATTACHMENT.execute(attachment_id, volume_id, server_id, mode, recorded, now)
        volume = changed[0]
        return volume, AttachmentRow(attachment_id, volume_id, server_id, "reserved", "", mode,
                                     recorded, volume.updated_at, volume.updated_at)

    def _view_of(self, volume: VolumeRow, attachment: AttachmentRow) -> VolumeView:
        """The volume just reserved for attachment, as the caller sees it."""
        if volume.multiattach:  # other servers' attachments too
            return self.get(volume.id)
        return self._visible(volume, [attachment])  # it was available: its only attachment

    def _not_reserved(self, volume_id: str, project_id: str) -> VmattachError:
        """Why the volume could not be reserved (read after the compare-and-swap failed)."""
        volume = self._get(volume_id)
        if project_id and volume.project_id != project_id:
            return not_found(volume_id)
        if volume.status == "in-use":
            servers = ", ".join(self._attached_servers(volume_id))
            return FailedPrecondition(
                f"Invalid volume: volume {volume_id} is already attached to instances: {servers}",
                reason="VOLUME_ALREADY_ATTACHED", metadata={"volume_id": volume_id})
        return FailedPrecondition(
            f"Invalid volume: status must be 'available' (Volume status must be available to"
            f" reserve, but the status is {volume.status}.)", reason="VOLUME_NOT_AVAILABLE",
            metadata={"volume_id": volume_id, "status": volume.status})

    @with_connection
    def create_attachment(self, volume_id: str, server_id: str, connector: Connector,
                          attachment_id: str = "", mode: str = "rw",
                          project_id: str = "") -> tuple[VolumeView, ConnectionInfo]:
        """Cinder's attachment_create with a connector: reserve (as reserve())
        and publish for the connector (as publish()) in one transaction under
        the volume's export lock; a failure of either leaves nothing."""
        _require_mode(mode)
        _require_initiator(connector)
        with self._reserving(volume_id, server_id):
            with self._volume_lock(volume_id):
                reserved = self._reserve(volume_id, server_id, attachment_id, mode, project_id,
                                         connector)
                if reserved is not None:
                    volume, export = self._ensure_export(reserved[0], None, connector.initiator)
                    return (self._view_of(volume, reserved[1]),
                            self._connection_info(volume, export, mode))
        raise self._not_reserved(volume_id, project_id)

    @with_connection
    def delete_attachment(self, volume_id: str, server_id: str) -> VolumeView:
        """Cinder's attachment_delete: server_id's attachment ends whatever its
        state, its initiator is revoked unless another attachment uses it, the
        export goes when none is published, the volume settles; idempotent."""
        with self._volume_lock(volume_id):
            ended = _DELETE_ATTACHMENT.execute(volume_id, server_id)
            if not ended:
                return self.get(volume_id)  # NotFound when there is no such volume
            volume = self._settle(volume_id, _ENDING)
            (recorded,), = ended
            self._revoke(volume_id, Connector.load(recorded).initiator if recorded else "",
                         volume.chap_username if volume is not None else None)
        if volume is not None and volume.status == "available":
            return self._visible(volume, [])  # no attachment left
        return self.get(volume_id)

    def _settle(self, volume_id: str, from_statuses: Sequence[str]) -> VolumeRow | None:
        """After an attachment ended: back to in-use when attachments remain,
        else available (compare-and-swap on from_statuses); the volume as
        changed (None: it was not in one of from_statuses)."""
        changed = _SETTLE[tuple(from_statuses)].execute(volume_id, _now())
        return changed[0] if changed else None

    @with_connection
    def unreserve(self, volume_id: str, server_id: str) -> VolumeView:
        """os-unreserve: drop server_id's reservation (and its connection, if
        it was published); idempotent."""
        with self._volume_lock(volume_id):
            self._get(volume_id)
            att = self._attachment(volume_id, server_id)
            if att is not None and att.attach_status == "reserved":
                gone = (VolumeAttachment.delete()
                        .where((VolumeAttachment.id == att.id)
                               & (VolumeAttachment.attach_status == "reserved")).execute())
                if gone:
                    self._settle(volume_id, ["attaching"])
                if gone and att.connector:
                    self._revoke(volume_id, Connector.load(att.connector).initiator)
            return self.get(volume_id)

    # -- publish / unpublish (initialize / terminate connection) ------------------

    def _attachment(self, volume_id: str, server_id: str) -> VolumeAttachment | None:
        return _ATTACHMENT.first(volume_id, server_id)

    @with_connection
    def publish(self, volume_id: str, server_id: str, connector: Connector) -> ConnectionInfo:
        """os-initialize_connection."""
        _require_initiator(connector)
        with self._volume_lock(volume_id):
            row = _PUBLISH_VIEW.one(volume_id, server_id)
            if row is None:
                raise not_found(volume_id)
            volume = VolumeRow(*row[:_NV])
            att_id, att_status, att_connector, att_mode, tid, target_iqn, target_tid = row[_NV:]
            if att_id is None or _shown_status(volume, server_id, att_status) not in (
                    "reserved", "attached"):
                raise FailedPrecondition(
                    f"Invalid volume: volume {volume_id} is not reserved for instance {server_id}",
                    reason="VOLUME_NOT_RESERVED")
            published = Connector.from_json(att_connector)
            if published is not None and published.initiator != connector.initiator:
                # the attachment keeps the host it was published for: no second ACL entry
                raise FailedPrecondition(
                    f"Invalid volume: volume {volume_id} is already published for instance"
                    f" {server_id} to another host", reason="CONNECTOR_MISMATCH",
                    metadata={"volume_id": volume_id, "server_id": server_id})
            export = None if tid is None else ExportRow(tid, target_iqn, target_tid)
            volume, export = self._ensure_export(volume, export, connector.initiator)
            _SET_CONNECTOR.execute(att_id, connector.to_json(), _now())
            return self._connection_info(volume, export, att_mode)

    def _connection_info(self, volume: VolumeRow, export: ExportRow, mode: str) -> ConnectionInfo:
        return ConnectionInfo(
            volume_id=volume.id, target_portal=self.portal, target_iqn=export.target_iqn,
            auth_username=volume.chap_username or "",
            auth_password=self.secretbox.decrypt(volume.chap_secret),
            access_mode=mode, multiattach=volume.multiattach)

    def _new_chap(self) -> dict[str, str]:
        """A volume's CHAP account (Volume columns): a random user name and
        password, the password sealed."""
        user = "".join(secrets.choice(CHAP_ALPHABET) for _ in range(20))
        password = "".join(secrets.choice(CHAP_ALPHABET) for _ in range(20))
        return {"chap_username": user, "chap_secret": self.secretbox.encrypt(password)}

    def _ensure_export(self, volume: VolumeRow, export: ExportRow | None,
                       initiator: str) -> tuple[VolumeRow, ExportRow]:
        """The volume's target on tgtd, created when missing, with initiator
        allowed (caller holds _volume_lock: no other process creates the
        Export row or the target meanwhile); export: the volume's Export row
        as read under the lock, or None when none was read: then the row is
        made in one statement, or read when there is one."""
        if volume.chap_username is None:  # rows made before volumes got theirs at create
            (Volume.update(**self._new_chap())
             .where((Volume.id == volume.id) & Volume.chap_username.is_null()).execute())
            volume = _row_view(_VIEW.tuples(volume.id))[0]  # type: ignore[index]
        made = None
        if export is None:
            # a new export has no target on tgtd yet (its id may be another
            # Controller's tid there); target_tid stays NULL (= its id) unless
            # the target gets another tid
            iqn = self.iqn_prefix + volume.id
            made = _NEW_EXPORT.execute(volume.id, iqn, _now())
            export = ExportRow(made[0][0], iqn, None) if made else _EXPORT_ROW.one(volume.id)
        if not made and self.tgt.has_target(_tid(export)):  # without listing every target
            self.tgt.allow(_tid(export), initiator)
            return volume, export
        target_tid = self._create_target(volume, export, initiator)
        if target_tid != _tid(export):
            export = export._replace(target_tid=target_tid)
        return volume, export

    def _create_target(self, volume: VolumeRow | Volume, export: ExportRow | Export,
                       initiator: str = "") -> int:
        """(caller holds _volume_lock) The target at the export's tid, or at a
        free one when another Controller sharing the tgtd has that tid, with
        initiator allowed when given; the tid it got."""
        tid = self.tgt.create_target_at_free_tid(
            _tid(export), export.target_iqn, volume.path, volume.chap_username,
            self.secretbox.decrypt(volume.chap_secret), initiator)
        if tid != _tid(export):
            Export.update(target_tid=tid).where(Export.tid == export.tid).execute()
            if isinstance(export, Export):
                export.target_tid = tid
        LOG.info("exported volume %s as %s (tid %d)", volume.id, export.target_iqn, tid)
        return tid

    def _remove_export(self, volume: Volume) -> None:
        """(caller holds _volume_lock)"""
        export = _EXPORT.first(volume.id)
        if export is not None:
            self._drop_export(volume.id, export, volume.chap_username)

    def _drop_export(self, volume_id: str, export: Export | ExportRow,
                     chap_username: str | None, row_deleted: bool = False) -> None:
        """(caller holds _volume_lock) The target goes from tgtd, then its row
        (unless the caller deleted it already)."""
        self.tgt.delete_target(_tid(export), chap_username)
        if not row_deleted:
            _DELETE_EXPORT.execute(export.tid)
        LOG.info("removed export of volume %s", volume_id)

    @with_connection
    def unpublish(self, volume_id: str, server_id: str, connector: Connector) -> None:
        """os-terminate_connection; idempotent."""
        with self._volume_lock(volume_id):
            _DROP_CONNECTOR.execute(volume_id, server_id, _now())
            self._revoke(volume_id, connector.initiator)

    def _revoke(self, volume_id: str, initiator: str, chap_username: str | None = None) -> None:
        """Take initiator off the target unless an attachment still uses it;
        remove the export when no attachment is published any more (caller
        holds _volume_lock). Given the volume's CHAP user (just read), one
        statement when the export goes (its row deleted, then its target);
        otherwise, or when it stays, one read: the export and the initiators
        in use."""
        if chap_username is not None:
            dropped = _DROP_UNUSED_EXPORT.execute(volume_id)
            if dropped:
                (tid, target_tid), = dropped
                self._drop_export(volume_id, ExportRow(tid, "", target_tid), chap_username,
                                  row_deleted=True)
                return
        rows = _REVOKE_VIEW.tuples(volume_id)
        if not rows or rows[0][1] is None:
            return  # no such volume, or no export
        chap_username, tid, target_tid = rows[0][:3]
        export = ExportRow(tid, "", target_tid)
        users = {Connector.load(r[3]).initiator for r in rows if r[3] is not None}
        if not users:
            self._drop_export(volume_id, export, chap_username)
        elif initiator and initiator not in users:
            self.tgt.disallow(_tid(export), initiator)

    # -- attach bookkeeping ------------------------------------------------------

    @with_connection
    def mark_attached(self, volume_id: str, server_id: str, mountpoint: str, mode: str) -> VolumeView:
        """os-attach: the attachment reserved -> attached, then the volume
        attaching -> in-use; two compare-and-swaps, each a statement of its own
        (no transaction). Between them, or when the process died there, the
        attachment is attached and the volume still attaching (which refuses
        other reservations); a retry for the same server and mountpoint runs
        the volume's compare-and-swap again and completes it (the facade's
        reconciler retries MarkAttached), and once the volume is in-use a retry
        is answered with the view. Refused (VOLUME_NOT_RESERVED) when the
        attachment is neither reserved nor attached at that mountpoint.

        When the attachment's compare-and-swap succeeded but the volume's did
        not: a volume in use (another attachment ended meanwhile and settled it
        in-use, as this one was attached) is this attach done; any other state
        means the volume is no longer being attached, so the attachment goes
        back to reserved (a compare-and-swap; its mode stays the one given)
        and the call is refused, as the single transaction that os-attach was
        before rolled back."""
        _require_mode(mode)
        now = _now()
        att = _ATTACH_DONE.execute(volume_id, server_id, mountpoint, mode, now)
        volume = _VOLUME_IN_USE.execute(volume_id, server_id, mountpoint, now)
        if att and volume and not volume[0].multiattach:
            return self._visible(volume[0], att)
        view = self.get(volume_id)  # NotFound when there is no such volume
        if volume:
            return view  # multiattach (the others' attachments too), or a retry completed it
        mine = next((a for a in view[1] if a.instance_uuid == server_id), None)
        if att:
            if mine is not None and view[0].attach_status == "attached":
                return view  # settled in-use meanwhile
            _ATTACH_UNDONE.execute(att[0].id, mountpoint, _now())
        elif mine is not None and (mine.attach_status, mine.mountpoint) == ("attached", mountpoint):
            return view  # attached already (a retry)
        raise FailedPrecondition(
            f"Invalid volume: volume {volume_id} is not being attached to instance {server_id}",
            reason="VOLUME_NOT_RESERVED")

    def _detach_precondition(self) -> FailedPrecondition:
        return FailedPrecondition(
            "Unable to detach volume. Volume status must be 'in-use' and attach_status must be"
            " 'attached' to detach.", reason="VOLUME_NOT_ATTACHED")

    @with_connection
    def begin_detaching(self, volume_id: str, server_id: str) -> VolumeView:
        """os-begin_detaching: in-use -> detaching, one compare-and-swap of the
        volume's row, which names server_id (detaching_instance); its
        attachment's row stays attached and shows detaching. A retry by the
        same server is answered with the view; another server's, while one
        detach is in progress, is refused."""
        changed = _BEGIN_DETACHING.execute(volume_id, server_id, _now())
        if not changed:
            view = self.get(volume_id)  # NotFound when there is no such volume
            mine = next((a for a in view[1] if a.instance_uuid == server_id), None)
            if mine is not None and mine.attach_status == "detaching":
                return view  # a retry
            raise self._detach_precondition()
        volume = VolumeRow(*changed[0][:_NV])
        if volume.multiattach:
            return self.get(volume_id)
        return self._visible(volume, [AttachmentRow(*changed[0][_NV:])])

    @with_connection
    def roll_detaching(self, volume_id: str, server_id: str) -> VolumeView:
        """os-roll_detaching: detaching -> in-use when server_id's detach is the
        one begun (one compare-and-swap); idempotent."""
        _ROLL_DETACHING.execute(volume_id, server_id, _now())
        return self.get(volume_id)  # NotFound when there is no such volume

    @with_connection
    def mark_detached(self, volume_id: str, server_id: str) -> VolumeView:
        """os-detach: ends server_id's attachment; idempotent."""
        with write_transaction(self.db):
            self._lock_row(volume_id)
            volume = None
            if _END_ATTACHMENT.execute(volume_id, server_id):
                volume = self._settle(volume_id, ["detaching", "in-use"])
        if volume is not None and volume.status == "available":
            return self._visible(volume, [])  # no attachment left
        return self.get(volume_id)

    # -- start-up, audit and repair -------------------------------------------

    def _connection_initiators(self, volume_id: str) -> set[str]:
        return {Connector.load(a.connector).initiator for a in
                VolumeAttachment.select(VolumeAttachment.connector)
                .where((VolumeAttachment.volume == volume_id)
                       & VolumeAttachment.connector.is_null(False))}

    def _our_volume(self, target: Target) -> str | None:
        """The volume id of a target of this deployment: the IQN names a
        volume of this database, or the LUN's backing file is in our volume
        directory. None for a target some other tool made on the same tgtd
        (those are never reported or touched)."""
        if not target.iqn.startswith(self.iqn_prefix):
            return None
        volume_id = target.iqn[len(self.iqn_prefix):]
        if _VOLUME.first(volume_id) is not None:
            return volume_id
        ours = {self.volume_dir, self.volume_dir.resolve()}
        if any(Path(path).parent in ours for path in target.luns.values()):
            return volume_id
        return None

    @with_connection
    def export_states(self) -> tuple[builtins.list[ExportState], builtins.list[StrayTarget]]:
        """Each export with its target as tgtd has it, and this deployment's
        targets that no export owns (one tgtadm listing; for the audit)."""
        present = self.tgt.show()
        initiators: dict[str, set[str]] = {}
        for volume_id, text in (VolumeAttachment.select(VolumeAttachment.volume,
                                                        VolumeAttachment.connector)
                                .where(VolumeAttachment.connector.is_null(False)).tuples()):
            initiators.setdefault(volume_id, set()).add(Connector.load(text).initiator)
        tid_of = {t.iqn: tid for tid, t in present.items()}
        states = []
        for export in Export.select().order_by(Export.tid):
            # by IQN: the tid recorded may be another Controller's since a tgtd restart
            tid = tid_of.get(export.target_iqn)
            target = present[tid] if tid is not None else None
            at_tgtd = target is not None
            states.append(ExportState(
                volume_id=export.volume_id, target_iqn=export.target_iqn,
                tid=tid if tid is not None else _tid(export),
                at_tgtd=at_tgtd, allowed_initiators=sorted(target.acls) if target else [],
                connection_initiators=sorted(initiators.get(export.volume_id, ()))))
        owned = {s.tid for s in states if s.at_tgtd}
        strays = []
        for tid, target in sorted(present.items()):
            volume_id = None if tid in owned else self._our_volume(target)
            if volume_id is not None:
                strays.append(StrayTarget(tid, target.iqn, volume_id))
        return states, strays

    def ensure_exports(self, pace: Callable[[], None] = no_pause) -> int:
        """Re-create the targets the database says exist (a restarted tgtd has
        none) with their ACLs, and remove this deployment's targets that no
        export owns. Returns the number of targets re-created. pace: as
        reconcile_exports."""
        return self.reconcile_exports(pace=pace).targets_created

    def _compare(self, batch: builtins.list[Target], prune: bool,
                 initiator_of: dict[str, str], repair: dict[str, Target | None],
                 unowned: builtins.list[Target], listed: bytearray, before: str) -> int:
        """One batch of tgtd's listing against the exports of those names made
        before the listing (one read, by IQN): an export whose target is not
        as it should be goes into repair with that target; a target of our
        IQN prefix no such export names into unowned (the unowned loop then
        skips those whose export was made since); each export found is
        marked in listed (a bit per export id). Returns how many exports were
        found."""
        by_iqn = {t.iqn: t for t in batch}
        exports: dict[str, tuple[int, str, int]] = {}
        used: dict[str, set[str]] = {}
        names = builtins.list(by_iqn)
        rows = _EXPORTS_NAMED.tuples(before, *names, *[""] * (RECONCILE_BATCH - len(names)))
        for volume_id, export_id, iqn, tid, connector in rows:
            exports[volume_id] = (export_id, iqn, tid)
            users = used.setdefault(volume_id, set())
            if connector:
                # each distinct connector parsed once (a host's connections share it)
                initiator = initiator_of.get(connector)
                if initiator is None:
                    initiator = initiator_of[connector] = Connector.load(connector).initiator
                users.add(initiator)
        named = set()
        for volume_id, (export_id, iqn, tid) in exports.items():
            _mark(listed, export_id)
            named.add(iqn)
            target, users = by_iqn[iqn], used[volume_id]
            acls = set(target.acls)
            fine = (target.tid == tid and 1 in target.luns and users <= acls
                    and not (prune and (not users or acls - users)))
            if not fine:
                repair[volume_id] = target
        unowned.extend(t for t in batch
                       if t.iqn not in named and t.iqn.startswith(self.iqn_prefix))
        return len(exports)

    def _unlisted_exports(self, listed: bytearray, repair: dict[str, Target | None],
                          pace: Callable[[], None], before: str) -> None:
        """The exports made before the listing and not marked in listed (tgtd
        did not list their target) into repair, read a page at a time in id
        order."""
        after = 0
        while True:
            page = builtins.list(Export.select(Export.tid, Export.volume)
                                 .where((Export.tid > after) & (Export.created_at < before))
                                 .order_by(Export.tid)
                                 .limit(RECONCILE_BATCH).tuples())
            for export_id, volume_id in page:
                if not _marked(listed, export_id):
                    repair.setdefault(volume_id, None)
            if len(page) < RECONCILE_BATCH:
                return
            after = page[-1][0]
            pace()

    @with_connection
    def reconcile_exports(self, prune: bool = False,
                          pace: Callable[[], None] = no_pause) -> ExportRepair:
        """ensure_exports; with prune also remove ACLs no connection uses and
        exports with no connection. Safe while other Controller processes
        sharing the database publish and unpublish: every change is re-checked
        under the volume's lock. A target of a volume this deployment does
        not know is never touched.

        tgtd's listing is compared with the database as it is read, a batch
        of targets at a time: neither the listing nor the table is ever held
        (at a cell's 100,000 exports, every reconcile interval). What is kept
        is what needs a change (none, mostly) and a bit per export id.

        pace is called after each target listed and each page of exports read
        (the periodic check passes a common.periodic.Pacer, which keeps the
        comparison to a share of the CPU); the repairs that follow are not
        paced: a target missing is a volume its server cannot reach."""
        repair: dict[str, Target | None] = {}   # volume id -> its target as listed
        unowned: builtins.list[Target] = []      # of our IQN prefix, no export names it
        listed = bytearray()                     # a bit per export id found in the listing
        initiator_of: dict[str, str] = {}
        found = 0
        # Only the exports made before the listing was asked for are judged by it.
        # Attaches and detaches go on meanwhile: an export made since may be
        # missing from the listing though its target is on tgtd, and a volume
        # detached and attached again since has a new export while the listing
        # shows its old target. Judged by the listing, both would be "repaired",
        # the second one wrongly (the old target's tid written on the new export),
        # and a repair that finds the target there lists every target again, under
        # the volume's lock (at c=32 and 10,000 exports, a dozen a round stalled
        # the attaches for seconds). The next round checks them.
        before = _now()
        with self.tgt.targets() as targets:
            batch: builtins.list[Target] = []
            for target in targets:
                batch.append(target)
                pace()
                if len(batch) == RECONCILE_BATCH:
                    found += self._compare(batch, prune, initiator_of, repair, unowned, listed,
                                           before)
                    batch = []
            if batch:
                found += self._compare(batch, prune, initiator_of, repair, unowned, listed,
                                       before)
        if Export.select().count() > found:  # some export's target was not listed
            self._unlisted_exports(listed, repair, pace, before)
        done = ExportRepair()
        for volume_id, listed_target in repair.items():
            with self._volume_lock(volume_id):
                export = _EXPORT.first(volume_id)
                if export is None or str(export.created_at) >= before:
                    continue  # removed meanwhile, or made again since the listing
                # found by IQN: after a tgtd restart another Controller sharing it
                # may have taken the tid this one recorded
                target = (listed_target if listed_target is not None
                          and listed_target.iqn == export.target_iqn else None)
                used = self._connection_initiators(volume_id)
                if prune and not used:
                    LOG.warning("removing export of volume %s: no connection uses it", volume_id)
                    self._remove_export(Volume.get_by_id(volume_id))
                    done.targets_removed += 1
                    continue
                if target is None:
                    self._create_target(Volume.get_by_id(volume_id), export)
                    tid = _tid(export)
                    done.targets_created += 1
                    present_acls: builtins.list[str] = []
                else:
                    tid = target.tid
                    if tid != _tid(export):  # made at another tid by a publish that rolled back
                        Export.update(target_tid=tid).where(Export.tid == export.tid).execute()
                    present_acls = target.acls
                    if 1 not in target.luns:  # an extend stopped half-way
                        self.tgt.reload_lun(tid, Volume.get_by_id(volume_id).path)
                        done.targets_created += 1
                for initiator in sorted(used - set(present_acls)):
                    self.tgt.allow(tid, initiator)
                    done.acls_changed += 1
                if prune:
                    for initiator in sorted(set(present_acls) - used):
                        LOG.warning("removing ACL %s of volume %s: no connection uses it",
                                    initiator, volume_id)
                        self.tgt.disallow(tid, initiator)
                        done.acls_changed += 1
        for target in unowned:
            stray_of = self._our_volume(target)
            if stray_of is None:
                continue  # not this deployment's
            # a publish elsewhere may have made it since the listing: look again
            # under that volume's lock (its Export row is committed by then)
            with self._volume_lock(stray_of):
                if _EXPORT.first(stray_of) is not None:
                    continue
                # and tgtd again: since the listing, that target may have gone with
                # its volume's unpublish (one request says so: mostly it has, under
                # attach and detach traffic), or its tid gone to another volume's new
                # target (removing a target of the volume whose lock is held is safe)
                if not self.tgt.has_target(target.tid):
                    continue
                now = self.tgt.find(target.tid)
                if now is None or now.iqn != target.iqn:
                    continue
                LOG.warning("removing target %s (tid %d) that no export owns", target.iqn,
                            target.tid)
                self.tgt.delete_target(target.tid, None)
                done.targets_removed += 1
        return done
