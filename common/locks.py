"""Per-resource locks inside one process."""

from __future__ import annotations

import threading
from collections import defaultdict
from contextlib import contextmanager


class KeyedLocks:
    """One lock per key, dropped when nobody holds or waits for it."""

    def __init__(self):
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._users: dict[str, int] = defaultdict(int)

    @contextmanager
    def hold(self, key: str):
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
            self._users[key] += 1
        try:
            with lock:
                yield
        finally:
            with self._guard:
                self._users[key] -= 1
                if not self._users[key]:
                    del self._users[key]
                    del self._locks[key]
