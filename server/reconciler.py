"""Recovery of attaches and detaches whose facade process died between two
steps (Nova and Cinder leave those `attaching`/`detaching` for an operator's
`cinder reset-state`; vmattach finishes or undoes them itself).

Every facade process has an instance row whose heartbeat it keeps fresh; an
operation belongs to the instance that runs it (BDM.owner). An operation is
orphaned when its owner is gone (no heartbeat for `lease` seconds) or when a
facade released it after an undo step failed. The reconciler claims an
orphan with a compare-and-swap on its owner, so two replicas never recover
the same row, and then:

- attach: rolls forward (mark attached) when the disk reached the guest
  (progress node_publish or later), otherwise undoes every step with the same
  idempotent undo calls as a failed attach;
- detach: finishes it (the user asked for it); when the guest does not
  release the disk, rolls the detach back instead.
"""

from __future__ import annotations

import datetime
import logging
import threading

import peewee
from google.protobuf import json_format

from vmattach.common.db import utcnow, with_connection
from vmattach.common.errors import FailedPrecondition, VmattachError
from vmattach.common.grpcutil import call
from vmattach.common.periodic import every
from vmattach.server.facade import UNDO_TIMEOUT, Facade
from vmattach.server.models import BlockDeviceMapping as BDM
from vmattach.server.models import FacadeInstance
from vmattach.v1 import controller_pb2 as cpb
from vmattach.v1 import types_pb2

LOG = logging.getLogger(__name__)

ATTACHED_ON_NODE = ("node_publish", "mark_attached")
GUEST_RELEASED = ("node_unpublish", "node_unstage", "controller_unpublish", "bdm_delete")


class Reconciler:
    def __init__(self, facade: Facade, lease: float, instance_id: str | None = None):
        self.facade = facade
        self.db = facade.db
        self.lease = lease
        self.me = instance_id or facade.instance_id
        self._stop = threading.Event()

    # -- liveness ----------------------------------------------------------------------

    @with_connection
    def heartbeat(self) -> None:
        (FacadeInstance.insert(id=self.me, heartbeat_at=utcnow())
         .on_conflict(conflict_target=[FacadeInstance.id],
                      update={FacadeInstance.heartbeat_at: utcnow()})
         .execute())

    @with_connection
    def orphans(self) -> list[BDM]:
        cutoff = utcnow() - datetime.timedelta(seconds=self.lease)
        alive = FacadeInstance.select(FacadeInstance.id).where(
            FacadeInstance.heartbeat_at >= cutoff)
        return list(BDM.select().where(
            (BDM.deleted == 0) & BDM.state.in_(["attaching", "detaching"])
            & (BDM.owner.is_null() | BDM.owner.not_in(alive))).order_by(BDM.id))

    def _claim(self, bdm: BDM) -> bool:
        owner = BDM.owner.is_null() if bdm.owner is None else (BDM.owner == bdm.owner)
        return bool(BDM.update(owner=self.me, updated_at=utcnow())
                    .where((BDM.id == bdm.id) & (BDM.deleted == 0) & owner
                           & (BDM.state == bdm.state)).execute())

    # -- recovery ------------------------------------------------------------------------

    @with_connection
    def run_once(self) -> int:
        """Recover every orphan this instance can claim; returns how many were
        finished or undone."""
        self.heartbeat()
        FacadeInstance.delete().where(FacadeInstance.heartbeat_at < utcnow() - datetime.timedelta(
            seconds=max(self.lease * 100, 3600))).execute()
        done = 0
        for bdm in self.orphans():
            if not self._claim(bdm):
                continue  # another replica took it
            try:
                self.recover(bdm)
                done += 1
            except (VmattachError, peewee.PeeweeException) as exc:
                LOG.warning("recovery of BDM %d (%s %s) failed, will retry: %s", bdm.id,
                            bdm.state, bdm.volume_id, exc)
                self.facade._release(bdm.id)
        return done

    def recover(self, bdm: BDM) -> None:
        LOG.info("recovering %s of volume %s on server %s (last step %s)", bdm.state[:-3],
                 bdm.volume_id, bdm.instance_uuid, bdm.progress)
        if bdm.state == "attaching":
            if bdm.progress in ATTACHED_ON_NODE:
                try:
                    return self._roll_attach_forward(bdm)
                except FailedPrecondition:
                    pass  # the Controller no longer agrees: undo instead
            return self._roll_attach_back(bdm)
        return self._finish_detach(bdm)

    def _roll_attach_forward(self, bdm: BDM) -> None:
        f = self.facade
        call(f.controller.MarkAttached, cpb.MarkAttachedRequest(
            volume_id=bdm.volume_id, server_id=bdm.instance_uuid, mountpoint=bdm.device_name,
            mode="rw"), timeout=UNDO_TIMEOUT)
        f._progress(bdm.id, "mark_attached", state="attached", owner=None)
        LOG.info("attach of %s to %s rolled forward", bdm.volume_id, bdm.instance_uuid)

    def _roll_attach_back(self, bdm: BDM) -> None:
        f = self.facade
        server_id, volume_id = bdm.instance_uuid, bdm.volume_id
        f._mark_detached(server_id, volume_id, UNDO_TIMEOUT)
        if bdm.connection_info:  # the node may have staged and published it
            node = f.nodes.node(bdm.node_id)
            f._node_unpublish(node, server_id, volume_id)
            f._node_unstage(node, volume_id, f._unseal(bdm.connection_info))
        # the Controller knows this server's connector: an empty one is enough
        connector = json_format.Parse(bdm.connector or "{}", types_pb2.Connector())
        f._controller_unpublish(volume_id, server_id, connector)
        f._unreserve(volume_id, server_id)
        BDM.delete().where(BDM.id == bdm.id).execute()
        LOG.info("attach of %s to %s rolled back", volume_id, server_id)

    def _finish_detach(self, bdm: BDM) -> None:
        f = self.facade
        server_id, volume_id = bdm.instance_uuid, bdm.volume_id
        node = f.nodes.node(bdm.node_id)
        if bdm.progress not in GUEST_RELEASED:
            call(f.controller.BeginDetaching, cpb.BeginDetachingRequest(
                volume_id=volume_id, server_id=server_id), timeout=UNDO_TIMEOUT)
            try:
                f._node_unpublish(node, server_id, volume_id)
            except FailedPrecondition:
                f._roll_detaching(server_id, volume_id)
                f._progress(bdm.id, "mark_attached", state="attached", owner=None)
                LOG.info("detach of %s from %s rolled back: the guest keeps the disk",
                         volume_id, server_id)
                return
            f._progress(bdm.id, "node_unpublish")
        f._finish_detach(bdm, node, lambda: UNDO_TIMEOUT)
        LOG.info("detach of %s from %s finished", volume_id, server_id)

    # -- the loop ----------------------------------------------------------------------------

    def run_periodic(self, interval: float) -> None:
        """Recover now and every interval; heartbeat at least three times per
        lease in between."""
        every(min(interval, self.lease / 3), self.heartbeat, self._stop, "heartbeat")
        every(interval, self.run_once, self._stop, "reconciler")

    def stop(self) -> None:
        self._stop.set()
