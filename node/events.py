"""Waiting for a device-removal event that a callback on another thread
delivers. A waiter is registered before the detach is sent, so an event that
arrives at once is never missed."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from vmattach.node.hypervisor import DetachOutcome


@dataclass
class Waiter:
    key: tuple[str, str]
    done: threading.Event = field(default_factory=threading.Event)
    outcome: DetachOutcome = DetachOutcome.TIMED_OUT

    def wait(self, timeout: float) -> DetachOutcome:
        self.done.wait(max(timeout, 0))
        return self.outcome


class DeviceWaiters:
    """Waiters keyed by (domain uuid, device alias)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[tuple[str, str], list[Waiter]] = {}

    def expect(self, domain_uuid: str, alias: str) -> Waiter:
        waiter = Waiter((domain_uuid, alias))
        with self._lock:
            self._waiters.setdefault(waiter.key, []).append(waiter)
        return waiter

    def discard(self, waiter: Waiter) -> None:
        with self._lock:
            waiters = self._waiters.get(waiter.key, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiters.pop(waiter.key, None)

    def resolve(self, domain_uuid: str, alias: str, outcome: DetachOutcome) -> None:
        with self._lock:
            waiters = list(self._waiters.get((domain_uuid, alias), []))
        for waiter in waiters:
            waiter.outcome = outcome
            waiter.done.set()
