"""Fault injection for tests: make a named step of the facade's sagas fail
(or kill the process) at a step boundary.

Switched on through the `fault_injection` setting ("before:reserve",
"after:node_publish=kill", "after:create_attachment=pause:3", several separated by
commas) or at run time with arm()/disarm(). `pause:SECONDS` (at most 60)
holds the operation at that boundary, so that a test can cut a link or kill
a service half-way through it. Off unless switched on."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from vmattach.common.errors import BackendError, DeadlineExceeded, InvalidArgument, Unavailable
from vmattach.common.turns import outside

LOG = logging.getLogger(__name__)

ACTIONS = {
    "error": lambda where: BackendError(f"injected fault {where}", reason="INJECTED_FAULT"),
    "unavailable": lambda where: Unavailable(f"injected fault {where}: service unavailable",
                                             reason="INJECTED_FAULT"),
    "deadline": lambda where: DeadlineExceeded(f"injected fault {where}: deadline exceeded",
                                               reason="INJECTED_FAULT"),
}


class Faults:
    def __init__(self, spec: str = ""):
        self._lock = threading.Lock()
        self._armed: dict[str, str] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            where, _, action = item.partition("=")
            self.arm(where, action or "error")

    def arm(self, where: str, action: str = "error") -> None:
        """where: 'before:<step>' or 'after:<step>'; action: error,
        unavailable, deadline or kill."""
        when, _, step = where.partition(":")
        if when not in ("before", "after") or not step:
            raise InvalidArgument(f"fault {where!r}: expected before:<step> or after:<step>")
        if action not in ACTIONS and action != "kill" and _pause_seconds(action) is None:
            raise InvalidArgument(f"fault action {action!r}: expected one of "
                                  f"{', '.join([*ACTIONS, 'kill', 'pause:SECONDS'])}")
        with self._lock:
            self._armed[where] = action

    def disarm(self) -> None:
        with self._lock:
            self._armed.clear()

    def check(self, when: str, step: str) -> None:
        if not self._armed:
            return
        where = f"{when}:{step}"
        action = self._armed.get(where)
        if action is None:
            return
        LOG.warning("fault injection: %s (%s)", where, action)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        pause = _pause_seconds(action)
        if pause is not None:
            with outside():
                time.sleep(pause)
            return
        raise ACTIONS[action](where)


def _pause_seconds(action: str) -> float | None:
    name, _, seconds = action.partition(":")
    try:
        value = float(seconds)
    except ValueError:
        return None
    return value if name == "pause" and 0 < value <= 60 else None
