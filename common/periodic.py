"""Background rounds (server refresh, reconciler, re-export, health probes)
in one place."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable

from vmattach.common import observability as obs
from vmattach.common.errors import VmattachError

LOG = logging.getLogger(__name__)

# Of one core, at most, what a background round takes while it runs when it
# paces itself (the Controller's export check, the facade's servers refresh):
# at a cell's size each is seconds of CPU, which the requests need too.
BACKGROUND_SHARE = 0.1


def _failure(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def every(interval: float, fn: Callable[[], object], stop: threading.Event, name: str,
          now: bool = True) -> threading.Thread:
    """Run fn now (unless now=False) and then every interval seconds until
    stop is set; a failing round does not stop the loop. A failure is logged
    once, as one warning line (with the traceback only when it is not one of
    vmattach's own errors), and the same failure again in the next rounds
    only at DEBUG, until a round succeeds (one INFO line) or fails otherwise:
    a backend that stays down (tgtd gone) does not fill the log. Each
    round's time goes to vmattach_background_round_seconds{round=name}. (A
    round that must not crowd out the requests paces itself: Pacer.)"""
    took = obs.ROUND_SECONDS.labels(name)

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
            took.observe(time.monotonic() - started)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread


class Pacer:
    """Keeps a long background round (the Controller's export check, the
    facade's servers refresh: at a cell's size, seconds of CPU) to `share`
    of one core while it runs, so that the requests, which need the same
    interpreter lock, are not crowded out: the round calls it between two
    small pieces of work, and once the round has used `slice_s` of CPU time
    since its last pause, it sleeps that long x (1 / share - 1). The round
    takes 1 / share times its CPU time. A slice is the interpreter's switch
    interval: no longer than CPython lets any thread keep the lock from
    another that waits (shorter slices cost more CPU in pauses and
    wake-ups)."""

    def __init__(self, share: float, slice_s: float = sys.getswitchinterval(),
                 clock: Callable[[], float] = time.thread_time,
                 sleep: Callable[[float], object] = time.sleep):
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], not {share}")
        self.factor = 1 / share - 1
        self.slice_s = slice_s
        self.clock = clock
        self.sleep = sleep
        self._since = clock()

    def __call__(self) -> None:
        worked = self.clock() - self._since
        if worked >= self.slice_s:
            if self.factor:
                self.sleep(worked * self.factor)
            self._since = self.clock()


def no_pause() -> None:
    """The pace of a round a request or an operator waits for: full speed."""
