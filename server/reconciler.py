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
  row has its connection_info, no rollback had begun, and the node shows the
  disk in the domain), otherwise undoes every step with the same idempotent
  undo calls as a failed attach (the table in server/steps.py);
- detach: finishes it (the user asked for it), repeating the idempotent
  steps from begin_detaching on unless the row says the guest released the
  disk; when the guest does not release it, rolls the detach back instead.

A facade records no progress of its own after the node's calls unless a
later step fails (one write fewer per attach and per detach): for a facade
that died there, what the domain shows is the record.
"""

from __future__ import annotations

import logging
import threading

import peewee

from vmattach.common import observability as obs
from vmattach.common.db import with_connection
from vmattach.common.errors import FailedPrecondition, InvalidArgument, NotFound, VmattachError
from vmattach.common.periodic import every
from vmattach.server.bdms import ROLLING_BACK
from vmattach.server.calls import UNDO_TIMEOUT
from vmattach.server.facade import Facade
from vmattach.server.models import BlockDeviceMapping as BDM
from vmattach.server.steps import GUEST_RELEASED, Attach, undo_attach

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
            if self._in_guest(bdm):
                try:
                    return self._roll_attach_forward(bdm)
                except FailedPrecondition:
                    pass  # the Controller no longer agrees: undo instead
            return self._roll_attach_back(bdm)
        return self._finish_detach(bdm)

    def _in_guest(self, bdm: BDM) -> bool:
        """Whether the attach reached the guest: the node was called (the row
        has the connection_info written before it), no rollback had begun,
        and the domain shows the disk. A node that cannot say raises: the row
        waits for the next run."""
        if not bdm.connection_info or bdm.progress == ROLLING_BACK:
            return False
        return self.facade.node(bdm.node_id).disk_of(bdm.instance_uuid, bdm.volume_id,
                                                     UNDO_TIMEOUT)

    def _roll_attach_forward(self, bdm: BDM) -> str:
        self.controller.mark_attached(bdm.volume_id, bdm.instance_uuid, bdm.device_name,
                                      UNDO_TIMEOUT, self.bdms.mode_of(bdm))
        self.bdms.attached(bdm.id)
        LOG.info("attach of %s to %s rolled forward", bdm.volume_id, bdm.instance_uuid)
        return "rolled_forward"

    def _roll_attach_back(self, bdm: BDM) -> str:
        op = Attach(bdm.instance_uuid, bdm.volume_id)
        if bdm.connection_info:  # the node may have staged and published it
            op.node = self.facade.node(bdm.node_id)
            op.info = self.bdms.unseal(bdm.connection_info)
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
