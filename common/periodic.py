"""Background rounds (server refresh, reconciler, re-export, health probes)
in one place."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from vmattach.common.errors import VmattachError

LOG = logging.getLogger(__name__)


def _failure(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def every(interval: float, fn: Callable[[], object], stop: threading.Event, name: str,
          now: bool = True, share: float = 0.0) -> threading.Thread:
    """Run fn now (unless now=False) and then every interval seconds until
    stop is set; a failing round does not stop the loop. A failure is logged
    once, as one warning line (with the traceback only when it is not one of
    vmattach's own errors), and the same failure again in the next rounds
    only at DEBUG, until a round succeeds (one INFO line) or fails otherwise:
    a backend that stays down (tgtd gone) does not fill the log.

    With share (0 < share < 1), a round that took long is followed by a
    longer pause: at least its own time x (1 / share - 1), so that the rounds
    take at most that share of the time (a round over a cell's 100,000
    exports takes seconds of CPU, which the requests need too)."""
    def loop():
        failing = ""
        if not now and stop.wait(interval):
            return
        while True:
            started = time.monotonic()
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - the loop must survive a bad round
                text = _failure(exc)
                if text == failing:
                    LOG.debug("%s round failed again: %s", name, text)
                elif isinstance(exc, VmattachError):
                    LOG.warning("%s round failed: %s (logged again when it changes)", name, text)
                else:
                    LOG.warning("%s round failed (logged again when it changes)", name,
                                exc_info=True)
                failing = text
            else:
                if failing:
                    LOG.info("%s round works again", name)
                failing = ""
            pause = interval
            if share > 0:
                pause = max(interval, (time.monotonic() - started) * (1 / share - 1))
            if stop.wait(pause):
                return

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread
