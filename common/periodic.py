"""Background rounds (server refresh, reconciler, re-export) in one place."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

LOG = logging.getLogger(__name__)


def every(interval: float, fn: Callable[[], object], stop: threading.Event, name: str,
          now: bool = True) -> threading.Thread:
    """Run fn now (unless now=False) and then every interval seconds until
    stop is set; a failing round is logged and the next one runs anyway."""
    def loop():
        if not now and stop.wait(interval):
            return
        while True:
            try:
                fn()
            except Exception:  # noqa: BLE001 - the loop must survive a bad round
                LOG.exception("%s round failed", name)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread
