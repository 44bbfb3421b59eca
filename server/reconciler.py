"""Recovery of attaches and detaches whose facade process died between two
steps (Nova and Cinder leave those `attaching`/`detaching` for an operator's
`cinder reset-state`; vmattach finishes or undoes them itself).

Every facade process has an instance row whose heartbeat it keeps fresh; an
operation belongs to the instance that runs it (BDM.owner). An operation is
orphaned when its owner is gone (no heartbeat for `lease` seconds) or when a
facade released it after an undo step failed. The reconciler claims an
orphan with a compare-and-swap on its owner, so two replicas never recover
the same row, and then:

- attach: rolls forward (mark attached) when the disk reached the guest (the
  Controller published the volume for the server, no rollback had begun,
  and the node shows the disk in the domain), otherwise undoes every step
  with the same idempotent undo calls as a failed attach (the table in
  server/steps.py);
- detach: finishes it (the user asked for it), repeating the idempotent
  steps from begin_detaching on unless the row says the guest released the
  disk; when the guest does not release it, rolls the detach back instead.

A facade writes an attach's row twice (bdm_insert, then the end) and a
detach's twice (the take, then the soft delete), and records a step in
between only when a later step fails: for a facade that died there, what
the Controller and the domain show is the record.
"""

from __future__ import annotations

import logging
import threading

import peewee

from vmattach.common import observability as obs
from vmattach.common.db import with_connection
from vmattach.common.enums import ACCESS_MODE
from vmattach.common.errors import FailedPrecondition, InvalidArgument, NotFound, VmattachError
from vmattach.common.periodic import every
from vmattach.server.bdms import ROLLING_BACK
from vmattach.server.calls import UNDO_TIMEOUT
from vmattach.server.facade import Facade
from vmattach.server.models import BlockDeviceMapping as BDM
from vmattach.server.steps import GUEST_RELEASED, Attach, undo_attach
from vmattach.v1 import types_pb2

LOG = logging.getLogger(__name__)


class Reconciler:
    def __init__(self, facade: Facade, lease: float, instance_id: str | None = None):
        self.facade = facade
        self.bdms = facade.bdms
        self.controller = facade.controller
        self.db = facade.db
        self.lease = lease
        self.me = instance_id or facade.instance_id
        self._stop = threading.Event()

    # -- liveness ----------------------------------------------------------------------

    @with_connection
    def heartbeat(self) -> None:
        self.bdms.heartbeat(self.me)

    @with_connection
    def orphans(self) -> list[BDM]:
        return self.bdms.orphans(self.lease)

    # -- recovery ------------------------------------------------------------------------

    @with_connection
    def run_once(self) -> int:
        """Recover every orphan this instance can claim; returns how many were
        finished or undone."""
        self.heartbeat()
        self.bdms.forget_instances(silent_for=max(self.lease * 100, 3600))
        done = self.finish_extends()
        done += self.facade.reap_vanished()
        for bdm in self.orphans():
            if not self.bdms.claim(bdm, self.me):
                continue  # another replica took it
            operation = bdm.state[:-3]  # attach, detach
            # its own request id: the Controller's and Node's lines of this recovery share it
            with obs.request_context(obs.new_request_id()):
                try:
                    outcome = self.recover(bdm)
                    done += 1
                except (VmattachError, peewee.PeeweeException) as exc:
                    outcome = "failed"
                    LOG.warning("recovery of BDM %d (%s %s) failed, will retry: %s", bdm.id,
                                bdm.state, bdm.volume_id, exc)
                    self.bdms.release(bdm.id)
            obs.RECOVERED.labels(operation, outcome).inc()
        return done

    def finish_extends(self) -> int:
        """Repeat the (idempotent) steps of every extend whose facade died or
        gave up half-way."""
        done = 0
        for row in self.bdms.orphan_extends(self.lease):
            if not self.bdms.claim_extend(row, self.me):
                continue
            try:
                volume = self.controller.extend(row.volume_id, row.new_size_gb, UNDO_TIMEOUT)
                self.facade.extend_disks(row.volume_id, volume.size_gb, UNDO_TIMEOUT)
            except (InvalidArgument, NotFound, FailedPrecondition) as exc:
                LOG.warning("extend of %s to %d GiB dropped: %s", row.volume_id,
                            row.new_size_gb, exc.message)
            except (VmattachError, peewee.PeeweeException) as exc:
                LOG.warning("extend of %s failed, will retry: %s", row.volume_id, exc)
                self.bdms.release_extend(row.volume_id)
                continue
            else:
                self.bdms.sized(row.volume_id, volume.size_gb)
                LOG.info("extend of %s to %d GiB finished", row.volume_id, volume.size_gb)
            self.bdms.end_extend(row.volume_id)
            done += 1
        return done

    def recover(self, bdm: BDM) -> str:
        """Finish or undo bdm's operation; returns the outcome: rolled_forward,
        rolled_back (an attach, or a detach the guest refused) or finished."""
        LOG.info("recovering %s of volume %s on server %s (last step %s)", bdm.state[:-3],
                 bdm.volume_id, bdm.instance_uuid, bdm.progress)
        if bdm.state == "attaching":
            op = self._attach_of(bdm)
            if op.info is not None and bdm.progress != ROLLING_BACK and op.node.disk_of(
                    bdm.instance_uuid, bdm.volume_id, UNDO_TIMEOUT):
                try:
                    return self._roll_attach_forward(bdm, op.info)
                except FailedPrecondition:
                    pass  # the Controller no longer agrees: undo instead
            return self._roll_attach_back(bdm, op)
        return self._finish_detach(bdm)

    def _attach_of(self, bdm: BDM) -> Attach:
        """The dead facade's attach as far as the node can have seen it: with
        the node and the connection_info when the Controller published the
        volume for the server, without them when it did not (the node never
        had it). A row rolling back holds what it knew; otherwise the facade
        wrote nothing after bdm_insert, and the Controller says: the server's
        attachment with the connector it was published for (GetVolume), then
        its connection_info again (ControllerPublishVolume, idempotent). A
        Controller that cannot answer raises: the row waits for the next run."""
        op = Attach(bdm.instance_uuid, bdm.volume_id)
        if bdm.connection_info or bdm.progress == ROLLING_BACK:
            if bdm.connection_info:
                op.info = self.bdms.unseal(bdm.connection_info)
        else:
            try:
                volume = self.controller.get_volume(bdm.volume_id, UNDO_TIMEOUT)
            except NotFound:
                return op  # no volume: nothing was published
            published = next((a.connector for a in volume.attachments
                              if a.server_id == bdm.instance_uuid and a.HasField("connector")),
                             None)
            if published is not None:
                op.info = self.controller.publish(bdm.volume_id, bdm.instance_uuid, published,
                                                  UNDO_TIMEOUT)
        if op.info is not None:
            op.node = self.facade.node(bdm.node_id)
        return op

    def _roll_attach_forward(self, bdm: BDM, info: types_pb2.ConnectionInfo) -> str:
        volume = self.controller.mark_attached(
            bdm.volume_id, bdm.instance_uuid, bdm.device_name, UNDO_TIMEOUT,
            ACCESS_MODE.to_word(info.data.access_mode, default="rw"))
        self.bdms.attached(bdm, info, volume_size=volume.size_gb)  # as the facade writes it
        LOG.info("attach of %s to %s rolled forward", bdm.volume_id, bdm.instance_uuid)
        return "rolled_forward"

    def _roll_attach_back(self, bdm: BDM, op: Attach) -> str:
        undo_attach(self.controller, op)
        self.bdms.delete(bdm.id)
        LOG.info("attach of %s to %s rolled back", bdm.volume_id, bdm.instance_uuid)
        return "rolled_back"

    def _finish_detach(self, bdm: BDM) -> str:
        server_id, volume_id = bdm.instance_uuid, bdm.volume_id
        node = self.facade.node(bdm.node_id)
        if bdm.progress not in GUEST_RELEASED:
            try:
                self.controller.begin_detaching(volume_id, server_id, UNDO_TIMEOUT)
                ended = False
            except FailedPrecondition as exc:
                # the attachment is no longer attached: the dead facade got as far
                # as delete_attachment, after the guest had released the disk
                LOG.info("begin detaching %s: %s", volume_id, exc.message)
                ended = True
            try:
                node.unpublish(server_id, volume_id)
            except FailedPrecondition:
                if ended:
                    raise  # nothing to roll back to: the row waits for the guest
                self.controller.roll_detaching(volume_id, server_id)
                self.bdms.attached(bdm.id)
                LOG.info("detach of %s from %s rolled back: the guest keeps the disk",
                         volume_id, server_id)
                return "rolled_back"
            self.bdms.progress(bdm.id, "node_unpublish")
        self.facade.finish_detach(bdm, node, lambda: UNDO_TIMEOUT,
                                  unstaged=bdm.progress == "node_unstage")
        LOG.info("detach of %s from %s finished", volume_id, server_id)
        if bdm.delete_on_termination and server_id not in {
                s.server_id for s in node.servers(UNDO_TIMEOUT)}:
            self.facade.delete_on_termination(bdm)  # the server vanished meanwhile
        return "finished"

    # -- the loop ----------------------------------------------------------------------------

    def run_periodic(self, interval: float) -> None:
        """Recover now and every interval; heartbeat at least three times per
        lease in between."""
        every(min(interval, self.lease / 3), self.heartbeat, self._stop, "heartbeat")
        every(interval, self.run_once, self._stop, "reconciler")

    def stop(self) -> None:
        self._stop.set()
