"""The steps of AttachVolume and DetachVolume, each with its undo, written
once: the facade (server/facade.py) runs them, the reconciler
(server/reconciler.py) finishes or undoes what a dead facade left.

Step names are also the fault-injection points (server/faults.py) and the
values of BlockDeviceMapping.progress (the last step that completed).
docs/attach-flow.md gives the same steps with their gRPC calls."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from vmattach.common.errors import NotFound
from vmattach.server.calls import ControllerCalls, NodeCalls
from vmattach.v1 import types_pb2

LOG = logging.getLogger(__name__)


@dataclass
class Attach:
    """What the undo steps of one attach need; filled in as the steps run."""
    server_id: str
    volume_id: str
    node: NodeCalls | None = None
    info: types_pb2.ConnectionInfo | None = None


Undo = Callable[[ControllerCalls, Attach], None]


def _delete_attachment(controller: ControllerCalls, op: Attach) -> None:
    try:
        controller.delete_attachment(op.volume_id, op.server_id)
    except NotFound:
        pass  # no such volume (the attachment found none): nothing to undo


def _node_unpublish_and_unstage(controller: ControllerCalls, op: Attach) -> None:
    if op.node is not None and op.info is not None:  # the node never saw the volume otherwise
        if not op.node.unpublish(op.server_id, op.volume_id, unstage=op.info):
            op.node.unstage(op.volume_id, op.info)


# AttachVolume, in order: each step with the undo it owes from the moment it
# begins (a step that timed out may have happened all the same; every undo
# is idempotent). A failure undoes the begun steps last first; the BDM row
# goes after every undo succeeded.
ATTACH: tuple[tuple[str, Undo | None], ...] = (
    ("bdm_insert", None),                           # 2. device name, BDM row `attaching`
    ("get_connector", None),                        # 3. the node's connector
    ("create_attachment", _delete_attachment),      # 4. reserve + initialize_connection
    # 5. connect the host to the volume and the disk into the domain (one Node
    # call, as Nova's driver attach_volume); undone in the reverse order
    ("node_publish", _node_unpublish_and_unstage),
    # (its undo is create_attachment's: the attachment ends whatever its state)
    ("mark_attached", None),                        # 6. os-attach
    ("bdm_attached", None),                         # 7. BDM row `attached`
)
ATTACH_STEPS = tuple(step for step, _ in ATTACH)
_UNDO = dict(ATTACH)

# DetachVolume, in order. Until node_unpublish the detach can be rolled back
# (RollDetaching, the BDM back to `attached`); once the disk has left the
# guest, the remaining steps only roll forward. The node unstages in the same
# call as it unpublishes (progress node_unstage when its answer says it did);
# step node_unstage runs on its own only when it did not.
DETACH_STEPS = ("bdm_detaching", "begin_detaching", "node_unpublish", "node_unstage",
                "delete_attachment", "bdm_delete")
GUEST_RELEASED = DETACH_STEPS[DETACH_STEPS.index("node_unpublish"):]


def attach_undo(controller: ControllerCalls, op: Attach,
                step: str) -> Callable[[], None] | None:
    """The undo the attach step owes, bound to this operation (None: nothing
    to undo)."""
    undo = _UNDO[step]
    if undo is None:
        return None
    return lambda: undo(controller, op)


def undo_attach(controller: ControllerCalls, op: Attach) -> None:
    """The reconciler's roll-back of an attach whose progress is unknown:
    the undo of every step, last first; the first failure raises (the
    reconciler tries again later)."""
    for step in reversed(ATTACH_STEPS):
        undo = attach_undo(controller, op, step)
        if undo is not None:
            undo()


class Saga:
    """The undo steps of one operation, run in reverse when a step fails.
    undo_of(step) gives the undo a step owes once begun (None: nothing)."""

    def __init__(self, name: str,
                 undo_of: Callable[[str], Callable[[], None] | None] = lambda step: None):
        self.name = name
        self._undo_of = undo_of
        self._undo: list[tuple[str, Callable[[], None]]] = []

    def begin(self, step: str) -> None:
        """The step is about to run: from now on its undo is owed."""
        self.on_failure(step, self._undo_of(step))

    def on_failure(self, label: str, undo: Callable[[], None] | None) -> None:
        if undo is not None:
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
                LOG.error("%s: undo of %s failed: %s", self.name, label, exc)
        self._undo.clear()
        return ok


def attach_saga(controller: ControllerCalls, op: Attach) -> Saga:
    """The saga of one AttachVolume, its undo steps from the ATTACH table."""
    return Saga(f"attach {op.volume_id} to {op.server_id}",
                lambda step: attach_undo(controller, op, step))
