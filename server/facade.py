"""The servers facade (Nova's role): one AttachVolume / DetachVolume becomes
the ordered calls of docs/attach-flow.md to the Controller and to the Node
that hosts the server, with the undo of every completed step when a later
one fails. Plain Python: the servicer (server/facade_servicer.py) only
translates. Around the two flows: the typed calls (server/calls.py), the
BDM rows (server/bdms.py), the steps and their undo (server/steps.py) and
device names (server/devices.py)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import peewee

from vmattach.common.db import with_connection
from vmattach.common.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    VmattachError,
)
from vmattach.common.secretbox import SecretBox
from vmattach.server.bdms import BdmStore, SameRequest
from vmattach.server.calls import UNDO_TIMEOUT, ControllerCalls, Deadline, NodeCalls
from vmattach.server.devices import check_device
from vmattach.server.faults import Faults
from vmattach.server.models import BlockDeviceMapping as BDM
from vmattach.server.nodes import NodeDirectory
from vmattach.server.steps import Attach, Saga, attach_saga

LOG = logging.getLogger(__name__)

# Server states that can take a disk, and Nova's vm_state for each state.
ATTACHABLE = {"running", "paused", "shutoff"}
VM_STATE = {"running": "active", "paused": "paused", "shutoff": "stopped",
            "crashed": "error", "shutdown": "stopped", "pmsuspended": "suspended",
            "blocked": "active", "nostate": "building"}


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


def validate_attach(req: AttachRequest) -> None:
    """Step 1 (the checks that need no lookup): device and tag."""
    if req.device:
        check_device(req.device)
    if req.tag and (len(req.tag) > 60 or "," in req.tag or "/" in req.tag
                    or not req.tag.isprintable()):
        raise InvalidArgument("tag must be 1-60 printable characters without ',' or '/'",
                              reason="INVALID_TAG")


class Facade:
    def __init__(self, db: peewee.Database, controller: ControllerCalls, nodes: NodeDirectory,
                 secretbox: SecretBox, faults: Faults | None = None,
                 max_volumes_per_server: int = 26, call_cap: float = 300.0):
        self.db = db
        self.controller = controller
        self.nodes = nodes
        self.bdms = BdmStore(db, secretbox)
        self.faults = faults or Faults()
        self.max_volumes_per_server = max_volumes_per_server
        self.call_cap = call_cap
        # this process's operations carry this id; see server/reconciler.py
        self.instance_id = str(uuid.uuid4())

    def node(self, node_id: str) -> NodeCalls:
        """The typed calls to a node (Unavailable when it does not answer)."""
        return NodeCalls(self.nodes.node(node_id).stub)

    def step(self, name: str, fn: Callable, *args, saga: Saga | None = None):
        """Run one step of server/steps.py between its two fault-injection
        points; with a saga, the step's undo is owed from the moment it begins."""
        if saga is not None:
            saga.begin(name)
        self.faults.check("before", name)
        result = fn(*args)
        self.faults.check("after", name)
        return result

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
        handle = self.nodes.node(server.node_id)
        node = NodeCalls(handle.stub)
        # 2. pick the device name and insert the BDM row in state attaching
        try:
            bdm = self.step("bdm_insert", lambda: self.bdms.insert(
                req.server_id, req.volume_id, device=req.device, server=server,
                limit=min(self.max_volumes_per_server, handle.max_volumes_per_server),
                owner=self.instance_id, tag=req.tag,
                delete_on_termination=req.delete_on_termination, request_id=req.request_id))
        except SameRequest as same:
            return same.bdm
        op = Attach(req.server_id, req.volume_id, node)
        saga = attach_saga(self.controller, op)
        try:
            # 3. get the volume from the Controller
            volume = self.step("get_volume", self.controller.get_volume, req.volume_id,
                               deadline, saga=saga)
            # 4. reserve it (one compare-and-swap at the Controller)
            self.step("reserve", self.controller.reserve, req.volume_id, req.server_id,
                      deadline, saga=saga)
            self.bdms.progress(bdm.id, "reserve", volume_size=volume.size_gb,
                               node_id=handle.node_id)
            # 5. the connector of the node that hosts the server
            op.connector = self.step("get_connector", node.connector, deadline, saga=saga)
            # 6. publish at the Controller (initialize_connection) -> connection_info
            op.info = self.step("controller_publish", self.controller.publish, req.volume_id,
                                req.server_id, op.connector, deadline, saga=saga)
            # 7. (a failure of 5-6 rolls back: unpublish, unreserve, delete the BDM row)
            self.bdms.published(bdm.id, op.connector, op.info)
            # 8. stage and publish on the node
            staged = self.step("node_stage", node.stage, req.volume_id, op.info, deadline,
                               saga=saga)
            self.step("node_publish", node.publish, req.server_id, req.volume_id,
                      bdm.device_name, op.info, staged, deadline, saga=saga)
            self.bdms.progress(bdm.id, "node_publish")
            # 9. mark attached at the Controller (os-attach)
            self.step("mark_attached", self.controller.mark_attached, req.volume_id,
                      req.server_id, bdm.device_name, deadline, saga=saga)
            # 10. save the connection_info (sealed above), state attached
            self.step("bdm_attached", self.bdms.attached, bdm.id, saga=saga)
        except Exception as exc:
            LOG.info("attach %s to %s failed (%s); rolling back", req.volume_id, req.server_id,
                     getattr(exc, "reason", type(exc).__name__))
            # 7. the BDM row goes once every undo step succeeded; otherwise the row
            # stays `attaching`, released to the reconciler, which retries the undo
            if saga.rollback():
                self.bdms.delete(bdm.id)
            else:
                self.bdms.release(bdm.id)
            raise
        LOG.info("attached volume %s to server %s as %s", req.volume_id, req.server_id,
                 bdm.device_name)
        return self.bdms.get(bdm.id)

    # -- DetachVolume -----------------------------------------------------------------

    @with_connection
    def detach(self, server_id: str, volume_id: str, deadline: Deadline) -> None:
        # 1. find the BDM, and take it: attached -> detaching (one compare-and-swap)
        bdm = self.bdms.live(server_id, volume_id)
        if bdm is None:
            raise not_attached(server_id, volume_id)
        if not self.step("bdm_detaching", self.bdms.take_for_detach, bdm, self.instance_id):
            raise Aborted(f"volume {volume_id} is being {bdm.state[:-3]}ed on server {server_id}",
                          reason="OPERATION_IN_PROGRESS")
        try:
            node = self.node(bdm.node_id)
            try:
                # 2. begin detaching at the Controller (in-use -> detaching); its undo
                # (roll detaching, idempotent) runs on any failure: a call that timed
                # out may have taken effect
                self.step("begin_detaching", self.controller.begin_detaching, volume_id,
                          server_id, deadline)
                # 3. unpublish on the node: detach from the domain, wait for the guest
                self.step("node_unpublish", node.unpublish, server_id, volume_id, deadline)
            except VmattachError:
                self.controller.roll_detaching(volume_id, server_id)
                raise
            self.bdms.progress(bdm.id, "node_unpublish")
        except VmattachError:
            self.bdms.attached(bdm.id)
            raise
        # From here the disk has left the guest: the remaining steps only roll forward.
        try:
            # like an undo, these get their time even when the caller's is up
            self.finish_detach(bdm, node, lambda: max(deadline.left(), UNDO_TIMEOUT))
        except Exception:
            self.bdms.release(bdm.id)  # the reconciler finishes it
            raise
        LOG.info("detached volume %s from server %s", volume_id, server_id)

    def finish_detach(self, bdm: BDM, node: NodeCalls, timeout: Callable[[], float]) -> None:
        """Detach steps 4-7, once the disk has left the guest (the reconciler
        finishes a dead facade's detach with them too)."""
        info = self.bdms.unseal(bdm.connection_info)
        connector = self.bdms.connector_of(bdm)
        server_id, volume_id = bdm.instance_uuid, bdm.volume_id
        # 4. unstage on the node
        self.step("node_unstage", lambda: node.unstage(volume_id, info, timeout()))
        self.bdms.progress(bdm.id, "node_unstage")
        # 5. unpublish at the Controller (terminate_connection)
        self.step("controller_unpublish", lambda: self.controller.unpublish(
            volume_id, server_id, connector, timeout()))
        self.bdms.progress(bdm.id, "controller_unpublish")
        # 6. mark detached at the Controller (os-detach)
        self.step("mark_detached", lambda: self.controller.mark_detached(
            volume_id, server_id, timeout()))
        # 7. soft-delete the BDM row
        self.step("bdm_delete", self.bdms.soft_delete, bdm.id)

    # -- reading ------------------------------------------------------------------------

    @with_connection
    def get(self, server_id: str, volume_id: str) -> BDM:
        bdm = self.bdms.live(server_id, volume_id)
        if bdm is None:
            raise not_attached(server_id, volume_id)
        return bdm

    @with_connection
    def list(self, server_id: str, page_size: int, page_token: str) -> tuple[list[BDM], str]:
        self.nodes.server(server_id)
        return self.bdms.page(server_id, page_size, page_token)
