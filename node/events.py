"""Waiting for a device-removal event that a callback on another thread
delivers. A waiter is registered before the detach is sent, so an event that
arrives at once is never missed."""

from __future__ import annotations

import collections
import threading
import uuid
from dataclasses import dataclass, field

from vmattach.common.turns import outside
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


@dataclass(frozen=True)
class ServerEvent:
    seq: int
    server_id: str
    event: str


class ServerEvents:
    """The last `keep` lifecycle events of this host's domains, numbered;
    readers wait for the ones after a number (a long poll)."""

    def __init__(self, keep: int = 1000):
        self.epoch = str(uuid.uuid4())
        self._cond = threading.Condition()
        self._events: collections.deque[ServerEvent] = collections.deque(maxlen=keep)
        self._seq = 0

    def record(self, server_id: str, event: str) -> None:
        with self._cond:
            self._seq += 1
            self._events.append(ServerEvent(self._seq, server_id, event))
            self._cond.notify_all()

    def wait(self, after: int, timeout: float) -> tuple[list[ServerEvent], int, bool]:
        """(events after `after`, the last number, whether some were dropped),
        waiting up to timeout seconds for the first one."""
        with outside(), self._cond:
            if after > self._seq:  # a number of another epoch: start over
                after = 0
            self._cond.wait_for(lambda: self._seq > after, timeout=max(timeout, 0))
            events = [e for e in self._events if e.seq > after]
            lost = bool(self._events) and self._events[0].seq > after + 1 and after > 0
            return events, self._seq, lost
