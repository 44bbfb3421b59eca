"""The servers facade (Nova's role): one AttachVolume / DetachVolume becomes
the ordered calls of docs/attach-flow.md to the Controller and to the Node
that hosts the server, with the undo of every completed step when a later
one fails. Plain Python: the servicer (server/facade_servicer.py) only
translates."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import peewee
from google.protobuf import json_format

from vmattach.common.db import Prepared, utcnow, with_connection, write_transaction
from vmattach.common.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    VmattachError,
)
from vmattach.common.grpcutil import call
from vmattach.common.locks import KeyedLocks
from vmattach.common.secretbox import SecretBox
from vmattach.server.faults import Faults
from vmattach.server.models import BlockDeviceMapping as BDM
from vmattach.server.nodes import NodeDirectory
from vmattach.v1 import controller_pb2 as cpb
from vmattach.v1 import node_pb2 as npb
from vmattach.v1 import types_pb2

LOG = logging.getLogger(__name__)

# Nova's check of a requested device name (nova/block_device.py).
DEVICE_RE = re.compile(r"^/dev/x?[a-z]?d?[a-z]+[0-9]*$")
# Server states that can take a disk, and Nova's vm_state for each state.
ATTACHABLE = {"running", "paused", "shutoff"}
VM_STATE = {"running": "active", "paused": "paused", "shutoff": "stopped",
            "crashed": "error", "shutdown": "stopped", "pmsuspended": "suspended",
            "blocked": "active", "nostate": "building"}
_LIVE_BDM = Prepared(lambda s, v, d: BDM.select().where(
    (BDM.instance_uuid == s) & (BDM.volume_id == v) & (BDM.deleted == d)), 3)
# Time given to each undo step, even when the caller's deadline has passed.
UNDO_TIMEOUT = 15.0


class Deadline:
    """The time left on the incoming call, shared out to downstream calls."""

    def __init__(self, seconds: float):
        self.expires = time.monotonic() + seconds

    @classmethod
    def of(cls, context, cap: float) -> Deadline:
        # with no client deadline grpc reports a huge number (or None)
        remaining = context.time_remaining() if context is not None else None
        return cls(min(remaining, cap) if remaining is not None else cap)

    def left(self) -> float:
        return max(self.expires - time.monotonic(), 0.0)

    def remaining(self) -> float:
        """The time left for the next downstream call; DeadlineExceeded when none."""
        left = self.left()
        if left <= 0.001:
            raise DeadlineExceeded("deadline exceeded", reason="DEADLINE_EXCEEDED")
        return left


@dataclass(frozen=True)
class AttachRequest:
    server_id: str
    volume_id: str
    device: str = ""
    tag: str = ""
    delete_on_termination: bool = False
    request_id: str = ""


def not_attached(server_id: str, volume_id: str) -> NotFound:
    return NotFound(f"Instance {server_id} is not attached to volume {volume_id}",
                    reason="ATTACHMENT_NOT_FOUND",
                    metadata={"server_id": server_id, "volume_id": volume_id})


def invalid_device(device: str, why: str = "") -> InvalidArgument:
    return InvalidArgument(f"The supplied device path ({device[:80]}) is invalid.{why}",
                           reason="INVALID_DEVICE")


def validate_attach(req: AttachRequest) -> None:
    """Step 1 (the checks that need no lookup): device and tag."""
    if req.device and (not DEVICE_RE.match(req.device) or len(req.device) > 32):
        raise invalid_device(req.device)
    if req.tag and (len(req.tag) > 60 or "," in req.tag or "/" in req.tag
                    or not req.tag.isprintable()):
        raise InvalidArgument("tag must be 1-60 printable characters without ',' or '/'",
                              reason="INVALID_TAG")


def device_names(prefix: str):
    """vda, vdb, ... vdz, vdaa, vdab, ... (Nova's get_next_device_name)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    for letter in letters:
        yield prefix + letter
    for first in letters:
        for second in letters:
            yield prefix + first + second


def guest_path_hint(bus_prefix: str, volume_id: str) -> str:
    """Where the disk appears in the guest, whatever name the guest gives it."""
    if bus_prefix == "vd":
        return f"/dev/disk/by-id/virtio-{volume_id[:20]}"
    if bus_prefix == "sd":
        return f"/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_{volume_id[:36]}"
    return ""


class Saga:
    """The undo steps of one operation, run in reverse when a step fails."""

    def __init__(self, name: str):
        self.name = name
        self._undo: list[tuple[str, Callable[[], None]]] = []

    def on_failure(self, label: str, undo: Callable[[], None]) -> None:
        self._undo.append((label, undo))

    def rollback(self) -> bool:
        """Run every undo step (each one even when an earlier one failed);
        True when all succeeded."""
        ok = True
        for label, undo in reversed(self._undo):
            try:
                undo()
            except Exception as exc:  # noqa: BLE001 - every undo step must get its turn
                ok = False
                LOG.error("%s: undo %s failed: %s", self.name, label, exc)
        self._undo.clear()
        return ok


class Facade:
    def __init__(self, db: peewee.Database, controller, nodes: NodeDirectory,
                 secretbox: SecretBox, faults: Faults | None = None,
                 max_volumes_per_server: int = 26, call_cap: float = 300.0):
        self.db = db
        self.controller = controller  # a ControllerStub
        self.nodes = nodes
        self.secretbox = secretbox
        self.faults = faults or Faults()
        self.max_volumes_per_server = max_volumes_per_server
        self.call_cap = call_cap
        self._server_locks = KeyedLocks()
        # this process's operations carry this id; see server/reconciler.py
        self.instance_id = str(uuid.uuid4())

    # -- helpers -----------------------------------------------------------------

    def _step(self, name: str, fn: Callable, *args, **kwargs):
        """Run one saga step between its two fault-injection points."""
        self.faults.check("before", name)
        result = fn(*args, **kwargs)
        self.faults.check("after", name)
        return result

    def _progress(self, bdm_id: int, step: str, **fields) -> None:
        BDM.update(progress=step, updated_at=utcnow(), **fields).where(BDM.id == bdm_id).execute()

    @staticmethod
    def _live(server_id: str, volume_id: str) -> BDM | None:
        return _LIVE_BDM.first(server_id, volume_id, 0)

    def _seal(self, info: types_pb2.ConnectionInfo) -> str:
        """connection_info as stored on the BDM: the CHAP secret encrypted."""
        data = json_format.MessageToDict(info, preserving_proto_field_name=True)
        password = data.get("data", {}).pop("auth_password", "")
        if password:
            data["data"]["auth_password_encrypted"] = self.secretbox.encrypt(password)
        return json.dumps(data, sort_keys=True)

    def _unseal(self, text: str | None) -> types_pb2.ConnectionInfo:
        info = types_pb2.ConnectionInfo()
        if not text:
            return info
        data = json.loads(text)
        sealed = data.get("data", {}).pop("auth_password_encrypted", "")
        json_format.ParseDict(data, info)
        if sealed:
            info.data.auth_password = self.secretbox.decrypt(sealed)
        return info

    # -- AttachVolume ---------------------------------------------------------------

    @with_connection
    def attach(self, req: AttachRequest, deadline: Deadline) -> BDM:
        # 1. validate: ids (servicer), device and tag, the server and its state
        validate_attach(req)
        server = self.nodes.server(req.server_id)
        if server.state not in ATTACHABLE:
            raise FailedPrecondition(
                f"Cannot 'attach_volume' instance {req.server_id} while it is in vm_state "
                f"{VM_STATE.get(server.state, server.state)}", reason="SERVER_STATE")
        node = self.nodes.node(server.node_id)
        # 2. pick the device name and insert the BDM row in state attaching
        try:
            bdm = self._step("bdm_insert", self._insert_bdm, req, server,
                             min(self.max_volumes_per_server, node.max_volumes_per_server))
        except SameRequest as same:
            return same.bdm
        # Each undo is registered before its step: every undo is idempotent, and a
        # step that timed out or lost its connection may have happened all the same.
        saga = Saga(f"attach {req.volume_id} to {req.server_id}")
        try:
            # 3. get the volume from the Controller
            volume = self._step("get_volume", self._get_volume, req.volume_id, deadline)
            # 4. reserve it (one compare-and-swap at the Controller)
            saga.on_failure("unreserve", lambda: self._unreserve(req.volume_id, req.server_id))
            self._step("reserve", self._reserve, req, deadline)
            self._progress(bdm.id, "reserve", volume_size=volume.size_gb, node_id=node.node_id)
            # 5. the connector of the node that hosts the server
            connector = self._step("get_connector", self._connector, node, deadline)
            # 6. publish at the Controller (initialize_connection) -> connection_info
            saga.on_failure("unpublish at the controller",
                            lambda: self._controller_unpublish(req.volume_id, req.server_id,
                                                               connector))
            info = self._step("controller_publish", self._controller_publish, req, connector,
                              deadline)
            # 7. (a failure of 5-6 rolls back: unpublish, unreserve, delete the BDM row)
            self._progress(bdm.id, "controller_publish", connector=json_format.MessageToJson(
                connector, indent=None), connection_info=self._seal(info))
            # 8. stage and publish on the node
            saga.on_failure("unstage on the node",
                            lambda: self._node_unstage(node, req.volume_id, info))
            staged = self._step("node_stage", self._node_stage, node, req.volume_id, info,
                                deadline)
            saga.on_failure("unpublish on the node",
                            lambda: self._node_unpublish(node, req.server_id, req.volume_id))
            self._step("node_publish", self._node_publish, node, req, bdm.device_name, info,
                       staged, deadline)
            self._progress(bdm.id, "node_publish")
            # 9. mark attached at the Controller (os-attach)
            saga.on_failure("mark detached", lambda: self._mark_detached(
                req.server_id, req.volume_id, UNDO_TIMEOUT))
            self._step("mark_attached", self._mark_attached, req, bdm.device_name, deadline)
            # 10. save the connection_info (sealed above), state attached
            self._step("bdm_attached", self._progress, bdm.id, "mark_attached",
                       state="attached", owner=None)
        except Exception as exc:
            LOG.info("attach %s to %s failed (%s); rolling back", req.volume_id, req.server_id,
                     getattr(exc, "reason", type(exc).__name__))
            self._finish_rollback(saga, bdm.id)
            raise
        LOG.info("attached volume %s to server %s as %s", req.volume_id, req.server_id,
                 bdm.device_name)
        return BDM.get_by_id(bdm.id)

    def _insert_bdm(self, req: AttachRequest, server, limit: int) -> BDM:
        """Step 2, under the server's lock; the unique indexes keep replicas in
        other processes correct too."""
        with self._server_locks.hold(req.server_id):
            for _attempt in range(5):
                existing = self._live(req.server_id, req.volume_id)
                if existing is not None:
                    self._already_attached(existing, req)
                live = [b.device_name for b in BDM.select(BDM.device_name).where(
                    (BDM.instance_uuid == req.server_id) & (BDM.deleted == 0))]
                if len(live) >= limit:
                    raise ResourceExhausted(
                        f"Maximum number of volumes ({len(live)}) reached for server "
                        f"{req.server_id}", reason="TOO_MANY_VOLUMES")
                device = self._pick_device(req, server, live)
                try:
                    with write_transaction(self.db):
                        return BDM.create(
                            device_name=device, volume_id=req.volume_id,
                            instance_uuid=req.server_id, attachment_id=str(uuid.uuid4()),
                            tag=req.tag or None, delete_on_termination=req.delete_on_termination,
                            state="attaching", progress="bdm_insert", owner=self.instance_id,
                            request_id=req.request_id or None, node_id=server.node_id)
                except peewee.IntegrityError:
                    if req.device:
                        existing = self._live(req.server_id, req.volume_id)
                        if existing is not None:
                            self._already_attached(existing, req)
                        raise FailedPrecondition(
                            f"The supplied device path ({req.device}) is in use.",
                            reason="DEVICE_IN_USE") from None
                    continue  # another process took that name: pick again
            raise Aborted(f"server {req.server_id} is busy; try again", reason="SERVER_BUSY")

    def _already_attached(self, existing: BDM, req: AttachRequest):
        if req.request_id and existing.request_id == req.request_id:
            if existing.state != "attached":
                raise Aborted(f"the attach of volume {req.volume_id} is still in progress",
                              reason="ATTACH_IN_PROGRESS")
            raise SameRequest(existing)
        raise AlreadyExists(f"Invalid volume: volume {req.volume_id} already attached",
                            reason="VOLUME_ALREADY_ATTACHED",
                            metadata={"attachment_id": existing.attachment_id,
                                      "device": existing.device_name,
                                      "server_id": existing.instance_uuid,
                                      "volume_id": existing.volume_id})

    @staticmethod
    def _pick_device(req: AttachRequest, server, live: list[str]) -> str:
        used = {d.removeprefix("/dev/") for d in live}
        used |= {d["device"] for d in json.loads(server.disks)}
        prefix = server.device_prefix or "vd"
        if req.device:
            name = req.device.removeprefix("/dev/")
            if not name.startswith(prefix) or not name[len(prefix):].isalpha():
                raise invalid_device(req.device, f" The server's disks use /dev/{prefix}*.")
            if name in used:
                raise FailedPrecondition(f"The supplied device path ({req.device}) is in use.",
                                         reason="DEVICE_IN_USE")
            return "/dev/" + name
        used.add(server.root_device or prefix + "a")  # the root disk's letter is never offered
        for name in device_names(prefix):
            if name not in used:
                return "/dev/" + name
        raise ResourceExhausted(f"no free device name on server {req.server_id}",
                                reason="TOO_MANY_VOLUMES")

    def _finish_rollback(self, saga: Saga, bdm_id: int) -> None:
        """7. the BDM row goes once every undo step succeeded; otherwise the row
        stays `attaching`, released to the reconciler, which retries the undo."""
        if saga.rollback():
            BDM.delete().where(BDM.id == bdm_id).execute()
        else:
            self._release(bdm_id)

    def _release(self, bdm_id: int) -> None:
        BDM.update(owner=None, updated_at=utcnow()).where(BDM.id == bdm_id).execute()

    def _get_volume(self, volume_id: str, deadline: Deadline) -> cpb.Volume:
        return call(self.controller.GetVolume, cpb.GetVolumeRequest(volume_id=volume_id),
                    timeout=deadline.remaining())

    def _reserve(self, req: AttachRequest, deadline: Deadline) -> None:
        call(self.controller.ReserveVolume,
             cpb.ReserveVolumeRequest(volume_id=req.volume_id, server_id=req.server_id),
             timeout=deadline.remaining())

    def _unreserve(self, volume_id: str, server_id: str) -> None:
        call(self.controller.UnreserveVolume,
             cpb.UnreserveVolumeRequest(volume_id=volume_id, server_id=server_id),
             timeout=UNDO_TIMEOUT)

    def _connector(self, node, deadline: Deadline) -> types_pb2.Connector:
        return call(node.stub.NodeGetInfo, npb.NodeGetInfoRequest(),
                    timeout=deadline.remaining()).connector

    def _controller_publish(self, req: AttachRequest, connector, deadline: Deadline):
        return call(self.controller.ControllerPublishVolume, cpb.ControllerPublishVolumeRequest(
            volume_id=req.volume_id, server_id=req.server_id, connector=connector),
            timeout=deadline.remaining()).connection_info

    def _controller_unpublish(self, volume_id: str, server_id: str, connector,
                              timeout: float = UNDO_TIMEOUT) -> None:
        call(self.controller.ControllerUnpublishVolume, cpb.ControllerUnpublishVolumeRequest(
            volume_id=volume_id, server_id=server_id, connector=connector), timeout=timeout)

    def _node_stage(self, node, volume_id: str, info, deadline: Deadline):
        return call(node.stub.NodeStageVolume, npb.NodeStageVolumeRequest(
            volume_id=volume_id, connection_info=info), timeout=deadline.remaining()).staged

    def _node_unstage(self, node, volume_id: str, info, timeout: float = UNDO_TIMEOUT) -> None:
        # disconnecting needs the target, never the CHAP secret: it does not travel
        bare = types_pb2.ConnectionInfo()
        bare.CopyFrom(info)
        bare.data.ClearField("auth_password")
        call(node.stub.NodeUnstageVolume, npb.NodeUnstageVolumeRequest(
            volume_id=volume_id, connection_info=bare), timeout=timeout)

    def _node_publish(self, node, req: AttachRequest, device: str, info, staged,
                      deadline: Deadline) -> None:
        call(node.stub.NodePublishVolume, npb.NodePublishVolumeRequest(
            server_id=req.server_id, volume_id=req.volume_id, device=device,
            connection_info=info, staged=staged), timeout=deadline.remaining())

    def _node_unpublish(self, node, server_id: str, volume_id: str,
                        timeout: float = UNDO_TIMEOUT * 4) -> None:
        call(node.stub.NodeUnpublishVolume, npb.NodeUnpublishVolumeRequest(
            server_id=server_id, volume_id=volume_id), timeout=timeout)

    def _mark_attached(self, req: AttachRequest, device: str, deadline: Deadline) -> None:
        call(self.controller.MarkAttached, cpb.MarkAttachedRequest(
            volume_id=req.volume_id, server_id=req.server_id, mountpoint=device, mode="rw"),
            timeout=deadline.remaining())

    # -- DetachVolume -----------------------------------------------------------------

    @with_connection
    def detach(self, server_id: str, volume_id: str, deadline: Deadline) -> None:
        # 1. find the BDM, and take it: attached -> detaching (one compare-and-swap)
        bdm = self._live(server_id, volume_id)
        if bdm is None:
            raise not_attached(server_id, volume_id)
        if not self._step("bdm_detaching", self._take_for_detach, bdm):
            raise Aborted(f"volume {volume_id} is being {bdm.state[:-3]}ed on server {server_id}",
                          reason="OPERATION_IN_PROGRESS")
        try:
            node = self.nodes.node(bdm.node_id)
            try:
                # 2. begin detaching at the Controller (in-use -> detaching); its undo
                # (roll detaching, idempotent) runs on any failure: a call that timed
                # out may have taken effect
                self._step("begin_detaching", self._begin_detaching, server_id, volume_id,
                           deadline)
                # 3. unpublish on the node: detach from the domain, wait for the guest
                self._step("node_unpublish", lambda: self._node_unpublish(
                    node, server_id, volume_id, timeout=deadline.remaining()))
            except VmattachError:
                self._roll_detaching(server_id, volume_id)
                raise
            self._progress(bdm.id, "node_unpublish")
        except VmattachError:
            self._progress(bdm.id, "mark_attached", state="attached", owner=None)
            raise
        # From here the disk has left the guest: the remaining steps only roll forward.
        try:
            # like an undo, these get their time even when the caller's is up
            self._finish_detach(bdm, node, lambda: max(deadline.left(), UNDO_TIMEOUT))
        except Exception:
            self._release(bdm.id)  # the reconciler finishes it
            raise
        LOG.info("detached volume %s from server %s", volume_id, server_id)

    def _take_for_detach(self, bdm: BDM) -> bool:
        return bool(BDM.update(state="detaching", progress="bdm_detaching",
                               owner=self.instance_id, updated_at=utcnow())
                    .where((BDM.id == bdm.id) & (BDM.state == "attached")).execute())

    def _finish_detach(self, bdm: BDM, node, timeout: Callable[[], float]) -> None:
        """Detach steps 4-7, once the disk has left the guest."""
        info = self._unseal(bdm.connection_info)
        connector = json_format.Parse(bdm.connector or "{}", types_pb2.Connector())
        server_id, volume_id = bdm.instance_uuid, bdm.volume_id
        # 4. unstage on the node
        self._step("node_unstage", lambda: self._node_unstage(node, volume_id, info,
                                                              timeout=timeout()))
        self._progress(bdm.id, "node_unstage")
        # 5. unpublish at the Controller (terminate_connection)
        self._step("controller_unpublish", lambda: self._controller_unpublish(
            volume_id, server_id, connector, timeout=timeout()))
        self._progress(bdm.id, "controller_unpublish")
        # 6. mark detached at the Controller (os-detach)
        self._step("mark_detached", lambda: self._mark_detached(server_id, volume_id, timeout()))
        # 7. soft-delete the BDM row
        self._step("bdm_delete", self._soft_delete, bdm.id)

    def _begin_detaching(self, server_id: str, volume_id: str, deadline: Deadline) -> None:
        call(self.controller.BeginDetaching,
             cpb.BeginDetachingRequest(volume_id=volume_id, server_id=server_id),
             timeout=deadline.remaining())

    def _mark_detached(self, server_id: str, volume_id: str, timeout: float) -> None:
        call(self.controller.MarkDetached,
             cpb.MarkDetachedRequest(volume_id=volume_id, server_id=server_id), timeout=timeout)

    def _roll_detaching(self, server_id: str, volume_id: str) -> None:
        try:
            call(self.controller.RollDetaching,
                 cpb.RollDetachingRequest(volume_id=volume_id, server_id=server_id),
                 timeout=UNDO_TIMEOUT)
        except VmattachError as exc:
            LOG.error("roll detaching of %s failed: %s", volume_id, exc)

    def _soft_delete(self, bdm_id: int) -> None:
        now = utcnow()
        BDM.update(deleted=BDM.id, deleted_at=now, updated_at=now, progress="bdm_delete",
                   owner=None).where(
            BDM.id == bdm_id).execute()

    # -- reading ------------------------------------------------------------------------

    @with_connection
    def get(self, server_id: str, volume_id: str) -> BDM:
        bdm = self._live(server_id, volume_id)
        if bdm is None:
            raise not_attached(server_id, volume_id)
        return bdm

    @with_connection
    def list(self, server_id: str, page_size: int, page_token: str) -> tuple[list[BDM], str]:
        self.nodes.server(server_id)
        query = BDM.select().where((BDM.instance_uuid == server_id) & (BDM.deleted == 0))
        if page_token:
            if not page_token.isdigit():
                raise InvalidArgument("page_token is not valid")
            query = query.where(BDM.id > int(page_token))
        rows = list(query.order_by(BDM.id).limit(page_size + 1))
        token = str(rows[page_size - 1].id) if len(rows) > page_size else ""
        return rows[:page_size], token


class SameRequest(Exception):
    """A retried request (same request_id) whose attach already succeeded."""

    def __init__(self, bdm: BDM):
        super().__init__(bdm.attachment_id)
        self.bdm = bdm
