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

from vmattach.common import auth
from vmattach.common.db import with_connection
from vmattach.common.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    VmattachError,
)
from vmattach.common.observability import count_operation, timed_step
from vmattach.common.rules import MAX_VOLUMES_PER_SERVER
from vmattach.common.secretbox import SecretBox
from vmattach.server.bdms import BdmStore, SameRequest
from vmattach.server.calls import UNDO_TIMEOUT, ControllerCalls, Deadline, NodeCalls
from vmattach.server.devices import check_device
from vmattach.server.faults import Faults
from vmattach.server.models import ATTACHABLE
from vmattach.server.models import BlockDeviceMapping as BDM
from vmattach.server.nodes import NodeDirectory
from vmattach.server.steps import Attach, Saga, attach_saga

LOG = logging.getLogger(__name__)

# A refusal (a state not in ATTACHABLE) names Nova's vm_state of the server, or
# its task_state for a domain being shut down.
VM_STATE = {"running": "active", "paused": "paused", "shutoff": "stopped",
            "crashed": "error", "pmsuspended": "suspended",
            "blocked": "active", "nostate": "building"}
TASK_STATE = {"shutdown": "powering-off"}


def check_server_state(action: str, server) -> None:
    """FailedPrecondition in Nova's words when the server cannot take action."""
    if server.state in ATTACHABLE:
        return
    if server.state in TASK_STATE:
        where = f"task_state {TASK_STATE[server.state]}"
    else:
        where = f"vm_state {VM_STATE.get(server.state, server.state)}"
    raise FailedPrecondition(f"Cannot '{action}' instance {server.server_id} while it is in "
                             f"{where}", reason="SERVER_STATE",
                             metadata={"server_id": server.server_id, "state": server.state})


@dataclass(frozen=True)
class AttachRequest:
    server_id: str
    volume_id: str
    device: str = ""
    tag: str = ""
    delete_on_termination: bool = False
    request_id: str = ""
    mode: str = "rw"


def volume_not_found(volume_id: str) -> NotFound:
    return NotFound(f"Volume {volume_id} could not be found.", reason="VOLUME_NOT_FOUND",
                    metadata={"volume_id": volume_id})


def not_attached(server_id: str, volume_id: str) -> NotFound:
    return NotFound(f"Instance {server_id} is not attached to volume {volume_id}",
                    reason="ATTACHMENT_NOT_FOUND",
                    metadata={"server_id": server_id, "volume_id": volume_id})


def caller_project(volume_id: str) -> str:
    """The project whose volumes the caller may attach ("": any, an admin's);
    a caller who sees no volume at all finds none."""
    caller = auth.current()
    if caller.admin:
        return ""
    if not caller.project:
        raise volume_not_found(volume_id)
    return caller.project


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
                 max_volumes_per_server: int = MAX_VOLUMES_PER_SERVER, call_cap: float = 300.0,
                 owner_lease: float = 15.0):
        self.db = db
        self.controller = controller
        self.nodes = nodes
        self.bdms = BdmStore(db, secretbox)
        self.faults = faults or Faults()
        self.max_volumes_per_server = max_volumes_per_server
        self.call_cap = call_cap
        self.owner_lease = owner_lease
        # this process's operations carry this id; see server/reconciler.py
        self.instance_id = str(uuid.uuid4())

    def node(self, node_id: str) -> NodeCalls:
        """The typed calls to a node (Unavailable when it does not answer)."""
        return NodeCalls(self.nodes.node(node_id).stub)

    def step(self, name: str, fn: Callable, *args, saga: Saga | None = None):
        """Run one step of server/steps.py between its two fault-injection
        points; with a saga, the step's undo is owed from the moment it begins.
        Timed in vmattach_attach_step_seconds (a span of its own with tracing on)."""
        if saga is not None:
            saga.begin(name)
        with timed_step(name):
            self.faults.check("before", name)
            result = fn(*args)
            self.faults.check("after", name)
        return result

    # -- AttachVolume ---------------------------------------------------------------

    @count_operation("attach")
    @with_connection
    def attach(self, req: AttachRequest, deadline: Deadline) -> BDM:
        # 1. validate: ids (servicer), device and tag, the server and its state
        validate_attach(req)
        cached, rows = self.bdms.server_and_rows(req.server_id)
        server = self.nodes.visible_server(req.server_id, cached)
        check_server_state("attach_volume", server)
        handle = self.nodes.node(server.node_id)
        node = NodeCalls(handle.stub)
        # 3 begins now: the node's connector is read while the row is written (the
        # call changes nothing: an attach that stops at 2 leaves it unread)
        info_of_node = node.begin_info(deadline)
        # 2. pick the device name and insert the BDM row in state attaching
        try:
            bdm = self.step("bdm_insert", lambda: self.bdms.insert(
                req.server_id, req.volume_id, device=req.device, server=server,
                limit=min(self.max_volumes_per_server, handle.max_volumes_per_server),
                owner=self.instance_id, tag=req.tag,
                delete_on_termination=req.delete_on_termination, request_id=req.request_id,
                rows=rows if cached is not None else None))
        except SameRequest as same:
            return same.bdm
        op = Attach(req.server_id, req.volume_id, node)
        saga = attach_saga(self.controller, op)
        try:
            # 3. the connector of the node that hosts the server
            node_info = self.step("get_connector", info_of_node, saga=saga)
            # 4. the attachment at the Controller: reserve (one compare-and-swap) and
            # initialize_connection for that connector, one step -> connection_info.
            # The Controller answers the service role: it is told the project the
            # caller acts for (another project's volume: not found, left as it was);
            # its attachment takes the BDM's attachment id and the mode
            volume, op.info = self.step(
                "create_attachment", self.controller.create_attachment, req.volume_id,
                req.server_id, node_info.connector, deadline, bdm.attachment_id, req.mode,
                caller_project(req.volume_id), saga=saga)
            # (a failure of 3-6 rolls back: each begun step's undo, last first, then
            # the BDM row goes. No progress record of 4-6 on the row: for a facade
            # that died, the reconciler asks the Controller whether it published
            # the volume and the node whether the disk reached the guest,
            # server/reconciler.py; the row has its node since bdm_insert)
            # 5. stage and publish on the node, one call (two for an older node)
            self.step("node_publish", node.stage_and_publish, req.server_id, req.volume_id,
                      bdm.device_name, op.info, deadline, node_info.stage_in_publish,
                      saga=saga)
            # 6. mark attached at the Controller (os-attach)
            self.step("mark_attached", self.controller.mark_attached, req.volume_id,
                      req.server_id, bdm.device_name, deadline, req.mode, saga=saga)
            # 7. state attached, with the connection_info (sealed) and the size
            self.step("bdm_attached", lambda: self.bdms.attached(
                bdm, op.info, volume_size=volume.size_gb), saga=saga)
        except Exception as exc:
            LOG.info("attach %s to %s failed (%s); rolling back", req.volume_id, req.server_id,
                     getattr(exc, "reason", type(exc).__name__))
            # the BDM row goes once every undo step succeeded; otherwise the row
            # stays `attaching`, released to the reconciler, which retries the undo
            if saga.rollback():
                self.bdms.delete(bdm.id)
            else:
                self.bdms.rolling_back(bdm.id, op.info)
            raise
        LOG.info("attached volume %s to server %s as %s", req.volume_id, req.server_id,
                 bdm.device_name)
        return bdm  # as written (no read back)

    # -- DetachVolume -----------------------------------------------------------------

    @count_operation("detach")
    @with_connection
    def detach(self, server_id: str, volume_id: str, deadline: Deadline) -> None:
        # 1. find the BDM, and take it: attached -> detaching (one compare-and-swap)
        bdm = self.step("bdm_detaching", self._take_for_detach, server_id, volume_id)
        try:
            node = self.node(bdm.node_id)
            # (a row without its connection_info cannot tell the node what to
            # unstage: the node then only unpublishes, and step 4 says why)
            info = self.bdms.unseal(bdm.connection_info) if bdm.connection_info else None
            try:
                # 2. begin detaching at the Controller (in-use -> detaching); its undo
                # (roll detaching, idempotent) runs on any failure: a call that timed
                # out may have taken effect
                self.step("begin_detaching", self.controller.begin_detaching, volume_id,
                          server_id, deadline)
            except VmattachError:
                self.controller.roll_detaching(volume_id, server_id)
                raise
            unstaged = False
            try:
                # 3. unpublish on the node: detach from the domain, wait for the
                # guest; then 4. unstage, in the same call (as Nova's driver
                # detach_volume): the answer says whether the unstage finished
                unstaged = self.step("node_unpublish", node.unpublish, server_id, volume_id,
                                     deadline, info)
            except (Unavailable, DeadlineExceeded) as exc:
                # no answer: the unplug may have been sent and may complete; decide
                # from what the domain shows
                if not self._unplug_happened(bdm, node, exc):
                    self.controller.roll_detaching(volume_id, server_id)
                    raise
            except VmattachError:
                self.controller.roll_detaching(volume_id, server_id)
                raise
            # (recorded only if a later step fails, below: a facade that dies here
            # leaves recovery to repeat begin_detaching and the unpublish, both
            # idempotent, which finds the disk gone)
        except VmattachError as exc:
            if not getattr(exc, "left_to_reconciler", False):
                self.bdms.attached(bdm.id)
            raise
        # From here the disk has left the guest: the remaining steps only roll forward.
        try:
            # like an undo, these get their time even when the caller's is up
            self.finish_detach(bdm, node, lambda: max(deadline.left(), UNDO_TIMEOUT),
                               unstaged=unstaged)
        except Exception:
            # the reconciler finishes it from there, in one write with the release
            self.bdms.progress(bdm.id, "node_unstage" if unstaged else "node_unpublish",
                               owner=None)
            raise
        LOG.info("detached volume %s from server %s", volume_id, server_id)

    def _take_for_detach(self, server_id: str, volume_id: str) -> BDM:
        """Detach step 1: the row of (server, volume), taken (attached ->
        detaching) for this caller. One statement when the server is cached,
        the caller's and in a state that can give a disk back, and the row
        attached; otherwise the reads that say what is not so (a server not
        cached yet is asked of its node), and the same compare-and-swap."""
        seen = auth.current().seen_project()
        if seen != "":
            bdm = self.bdms.take_attached(server_id, volume_id, self.instance_id, seen)
            if bdm is not None:
                return bdm
        cached, rows = self.bdms.server_and_rows(server_id)
        server = self.nodes.visible_server(server_id, cached)
        bdm = (next((b for b in rows if b.volume_id == volume_id), None) if cached is not None
               else self.bdms.live(server_id, volume_id))
        if bdm is None:
            raise not_attached(server_id, volume_id)
        if bdm.state == "attached":
            check_server_state("detach_volume", server)
        taken = self.bdms.take_for_detach(bdm, self.instance_id)
        if taken is None:
            raise Aborted(f"volume {volume_id} is being {bdm.state[:-3]}ed on server {server_id}",
                          reason="OPERATION_IN_PROGRESS")
        return taken

    def _unplug_happened(self, bdm: BDM, node: NodeCalls, error: VmattachError) -> bool:
        """After the node did not answer an unpublish: True when the domain
        shows no disk of the volume any more (roll forward), False when it
        shows it (roll back). When the node cannot say either, the row stays
        `detaching` for the reconciler and the error is raised."""
        try:
            present = node.disk_of(bdm.instance_uuid, bdm.volume_id, UNDO_TIMEOUT)
        except VmattachError as exc:
            LOG.warning("detach of %s from %s: no answer from the node (%s, then %s); left to"
                        " the reconciler", bdm.volume_id, bdm.instance_uuid, error.reason,
                        exc.reason)
            self.bdms.release(bdm.id)
            error.left_to_reconciler = True
            raise error from None
        LOG.info("detach of %s from %s: the node did not answer (%s); the domain %s the disk",
                 bdm.volume_id, bdm.instance_uuid, error.reason,
                 "still has" if present else "no longer has")
        return not present

    def finish_detach(self, bdm: BDM, node: NodeCalls, timeout: Callable[[], float],
                      unstaged: bool = False) -> None:
        """Detach steps 4-6, once the disk has left the guest (the reconciler
        finishes a dead facade's detach with them too); unstaged: step 4 is
        done already."""
        server_id, volume_id = bdm.instance_uuid, bdm.volume_id
        # (no progress records from here: the reconciler repeats all of 4-6, each
        # idempotent, for a row whose guest released the disk, 4 unless the row
        # says it was done)
        # 4. unstage on the node
        if not unstaged:
            info = self.bdms.unseal(bdm.connection_info)
            self.step("node_unstage", lambda: node.unstage(volume_id, info, timeout()))
        # 5. delete the attachment at the Controller (terminate_connection + os-detach)
        self.step("delete_attachment", lambda: self.controller.delete_attachment(
            volume_id, server_id, timeout()))
        # 6. soft-delete the BDM row
        self.step("bdm_delete", self.bdms.soft_delete, bdm.id)

    # -- ExtendVolume -------------------------------------------------------------------

    @with_connection
    def extend(self, volume_id: str, new_size_gb: int,
               deadline: Deadline) -> tuple[int, list[str]]:
        """Grow the volume at the Controller, then every attached disk on its
        node; (the new size, the servers). Refusals change nothing; any other
        failure leaves the pending-extend row to the reconciler, which repeats
        the (idempotent) steps."""
        self.visible_volume(volume_id, deadline)
        # 1. the volume's pending-extend row (one extend per volume at a time)
        self.bdms.begin_extend(volume_id, new_size_gb, self.instance_id, self.owner_lease)
        try:
            # 2. the file and tgtd's LUN grow
            volume = self.step("controller_extend", self.controller.extend, volume_id,
                               new_size_gb, deadline)
        except (InvalidArgument, NotFound, FailedPrecondition, ResourceExhausted):
            self.bdms.end_extend(volume_id)  # refused: nothing changed
            raise
        except BaseException:
            self.bdms.release_extend(volume_id)
            raise
        try:
            # 3. every server's disk
            servers = self.extend_disks(volume_id, volume.size_gb, deadline)
        except BaseException:
            self.bdms.release_extend(volume_id)
            raise
        # 4. done
        self.bdms.sized(volume_id, volume.size_gb)
        self.bdms.end_extend(volume_id)
        LOG.info("extended volume %s to %d GiB on %d server(s)", volume_id, volume.size_gb,
                 len(servers))
        return volume.size_gb, servers

    def extend_disks(self, volume_id: str, size_gb: int, timeout: Deadline | float) -> list[str]:
        """Step 3: each live row's node resizes the server's disk (Nova's
        volume-extended event); the servers done. A server or disk that is no
        longer there is skipped (its detach cleans up)."""
        done = []
        for bdm in self.bdms.of_volume(volume_id):
            if not bdm.connection_info or bdm.state == "attaching":
                continue  # not on the node yet: it attaches with the new size
            info = self.bdms.unseal(bdm.connection_info)
            try:
                self.step("node_extend", self.node(bdm.node_id).extend, bdm.instance_uuid,
                          volume_id, size_gb << 30, info, timeout)
            except NotFound as exc:
                LOG.info("extend of %s: server %s has no disk of it (%s)", volume_id,
                         bdm.instance_uuid, exc.reason)
                continue
            done.append(bdm.instance_uuid)
        return done

    # -- servers that vanish, disks that went --------------------------------------------

    @with_connection
    def reap_vanished(self, node_ids: set[str] | None = None) -> int:
        """Detach what servers that no longer exist on their node had attached
        (the node's own listing decides, never the cache alone); returns how
        many rows were finished. The suspects are the rows whose server the
        servers cache does not show on their node: with node_ids (the
        heartbeat saw those nodes' servers go) the cache was refreshed just
        now; without (the reconciler's periodic check) it is as the last
        periodic refresh found it, which catches what an event missed (a
        refresh here, every reconcile interval, stored 1,000 nodes' servers
        again each time at a cell's size)."""
        by_node: dict[str, list[tuple[int, str]]] = {}
        for bdm_id, on_node, server_id in self.bdms.attached_off_the_list():
            if node_ids is None or on_node in node_ids:
                by_node.setdefault(on_node, []).append((bdm_id, server_id))
        done = 0
        for node_id, rows in by_node.items():
            try:
                node = self.node(node_id)
                present = {s.server_id for s in node.servers(UNDO_TIMEOUT)}
            except VmattachError as exc:
                LOG.warning("node %s did not list its servers: %s", node_id, exc.message)
                continue
            for bdm_id, server_id in rows:
                if server_id in present:
                    continue
                bdm = BDM.get_or_none(BDM.id == bdm_id)
                if bdm is None:
                    continue
                LOG.warning("server %s is gone from node %s with volume %s attached: detaching",
                            bdm.instance_uuid, node_id, bdm.volume_id)
                try:
                    if self.detach_gone(bdm, node, server_gone=True):
                        done += 1
                except VmattachError as exc:
                    LOG.warning("detach of %s from vanished %s failed, the reconciler retries:"
                                " %s", bdm.volume_id, bdm.instance_uuid, exc.message)
        return done

    def detach_gone(self, bdm: BDM, node: NodeCalls, server_gone: bool) -> bool:
        """Detach a volume whose disk has already left the guest (its server
        vanished, or the audit found the row without its disk): the detach's
        steps 1-7, then, for a server that is gone, delete_on_termination.
        False when another operation holds the row."""
        server_id, volume_id = bdm.instance_uuid, bdm.volume_id
        bdm = self.bdms.take_for_detach(bdm, self.instance_id)
        if bdm is None:
            return False
        try:
            try:
                self.controller.begin_detaching(volume_id, server_id, UNDO_TIMEOUT)
            except FailedPrecondition as exc:  # MarkDetached ends an attached one too
                LOG.info("begin detaching %s: %s", volume_id, exc.message)
            node.unpublish(server_id, volume_id)  # no domain, or no disk: nothing to wait for
            self.bdms.progress(bdm.id, "node_unpublish")
            self.finish_detach(bdm, node, lambda: UNDO_TIMEOUT)
        except BaseException:
            self.bdms.release(bdm.id)  # the reconciler finishes it
            raise
        if server_gone:
            self.delete_on_termination(bdm)
        return True

    def delete_on_termination(self, bdm: BDM) -> None:
        """The volume of a row marked delete_on_termination goes with its
        server (kept, with a warning, while another server uses it)."""
        if not bdm.delete_on_termination:
            return
        try:
            self.controller.delete_volume(bdm.volume_id)
            LOG.info("deleted volume %s with its server %s (delete_on_termination)",
                     bdm.volume_id, bdm.instance_uuid)
        except FailedPrecondition as exc:
            LOG.warning("volume %s kept: %s", bdm.volume_id, exc.message)

    # -- reading ------------------------------------------------------------------------

    def visible_volume(self, volume_id: str, timeout: Deadline | float = 30.0) -> None:
        """NotFound unless the caller may see the volume (the Controller
        answers the facade's service role about any volume)."""
        caller = auth.current()
        if caller.privileged:
            return
        volume = self.controller.get_volume(volume_id, timeout)
        if not caller.sees(volume.project_id):
            raise volume_not_found(volume_id)

    @with_connection
    def get(self, server_id: str, volume_id: str) -> BDM:
        self.nodes.visible_server(server_id)
        bdm = self.bdms.live(server_id, volume_id)
        if bdm is None:
            raise not_attached(server_id, volume_id)
        return bdm

    @with_connection
    def list(self, server_id: str, page_size: int, page_token: str,
             volume_id: str = "") -> tuple[list[BDM], str]:
        """A server's attachments, or a volume's (all its servers)."""
        if bool(server_id) == bool(volume_id):
            raise InvalidArgument("give one of server_id and volume_id", reason="INVALID_ARGUMENT")
        if volume_id:
            self.visible_volume(volume_id)
            return self.bdms.page_of_volume(volume_id, page_size, page_token)
        self.nodes.visible_server(server_id)
        return self.bdms.page(server_id, page_size, page_token)
