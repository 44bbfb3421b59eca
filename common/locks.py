"""Per-resource locks inside one process."""

from __future__ import annotations

import threading
from collections import defaultdict
from contextlib import contextmanager

from vmattach.common import turns
from vmattach.common.errors import Aborted


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
            with turns.holding(lock):
                yield
        finally:
            with self._guard:
                self._users[key] -= 1
                if not self._users[key]:
                    del self._users[key]
                    del self._locks[key]


class InProgress:
    """Keys with an operation running: a second claim of the same key fails
    at once with Aborted instead of waiting behind the first (a caller that
    retries after a timeout gets an answer, not a place in a queue)."""

    def __init__(self):
        self._guard = threading.Lock()
        self._held: set[str] = set()

    def running(self, key: str) -> bool:
        with self._guard:
            return key in self._held

    @contextmanager
    def claim(self, key: str, message: str, reason: str = "OPERATION_IN_PROGRESS",
              metadata: dict[str, str] | None = None):
        with self._guard:
            if key in self._held:
                raise Aborted(message, reason=reason, metadata=metadata)
            self._held.add(key)
        try:
            yield
        finally:
            with self._guard:
                self._held.discard(key)
