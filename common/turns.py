"""Turns: the calls a process serves run their Python one at a time, each
giving its turn up while it waits on something slow outside its own work.

A process's threads share one interpreter lock. When 32 calls are in
flight, each of them gives that lock up at every SQLite statement and
socket read and takes it back in a crowd of 31 others: the process spends
more CPU per call the more calls it serves at once (docs/architecture.md,
"Turns"). With turns, a call takes its turn when it arrives (the server's
ErrorInterceptor) and keeps it while it runs Python and quick local
requests (a SQLite statement; a request on tgtd's control socket for its
first QUICK seconds: answer_of). It gives
the turn up, and queues for it again afterwards, around every wait that
takes long or depends on another call: a command (a process of its own), a
libvirt call, a remote gRPC call, a statement on a database server, a lock
another thread holds, an event or a future. This is how eventlet runs Nova's
and Cinder's green threads: one runs at a time, and each yields where it
would block.

The rule for code that serves a call: wrap such a wait in `outside()`, or
use wait(), result() and acquire() below. A wait that is not wrapped does
not deadlock (a call that waited PATIENCE seconds for its turn runs without
one, counted in vmattach_turn_timeouts_total), but it holds up every other
call for as long as it lasts."""

from __future__ import annotations

import concurrent.futures
import contextlib
import select
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import grpc
from prometheus_client import Counter

# seconds a call queues for its turn before it runs without one
PATIENCE = 2.0
# seconds a request to a local daemon (tgtd's socket) keeps the turn while it
# waits for the answer: tgtd answers in a fraction of a millisecond, less than
# the two thread hand-offs of giving the turn up and taking it back
QUICK = 0.002

TIMEOUTS = Counter("vmattach_turn_timeouts_total",
                   f"calls that waited {PATIENCE:g} s for their turn and ran without one"
                   " (a wait made in the turn: docs/architecture.md, Turns)")

_here = threading.local()
T = TypeVar("T")


class Turns:
    """One process's turns (the setting call_turns; clients/serve.py)."""

    def __init__(self, patience: float = PATIENCE):
        self.patience = patience
        self._lock = threading.Lock()

    def _take(self) -> bool:
        if self._lock.acquire(timeout=self.patience):
            return True
        TIMEOUTS.inc()
        return False

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Around a call: its turn, taken now and given back at its end. A call
        made in-process from another (common/inprocess.py) runs in the
        caller's thread and turn."""
        if getattr(_here, "in_call", False):
            yield
            return
        _here.in_call = True
        _here.turns = self if self._take() else None
        try:
            yield
        finally:
            held, _here.turns, _here.in_call = _here.turns, None, False
            if held is not None:
                held._lock.release()


@contextmanager
def outside() -> Iterator[None]:
    """Around a wait: the calling thread's turn (if it holds one) is given up
    meanwhile and taken again afterwards."""
    turns = getattr(_here, "turns", None)
    if turns is None:
        yield
        return
    _here.turns = None
    turns._lock.release()
    try:
        yield
    finally:
        _here.turns = turns if turns._take() else None


def wait(futures: Iterable[concurrent.futures.Future | grpc.Future]) -> None:
    """Until every one of futures (concurrent.futures' or gRPC's) is done;
    outside the turn unless they are."""
    futures = list(futures)
    if not all(f.done() for f in futures):
        with outside():
            for f in futures:
                with contextlib.suppress(Exception):  # its outcome is the caller's to read
                    f.exception()


def result(future):
    """future.result(), waited for outside the turn unless it is done."""
    wait((future,))
    return future.result()


def _readable(sock: socket.socket, seconds: float) -> bool:
    """Whether sock has something to read within seconds (poll, not select:
    a cell's process has more than select's 1,024 descriptors open)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(seconds * 1000))


def answer_of(sock: socket.socket, read: Callable[[], T]) -> T:
    """read() of an answer on sock from a local daemon: in the turn when the
    answer is there within QUICK seconds, outside it when the daemon is slow
    this time."""
    if getattr(_here, "turns", None) is None or _readable(sock, QUICK):
        return read()
    with outside():
        return read()


def acquire(lock) -> None:
    """lock.acquire(), waited for outside the turn when another thread holds
    the lock (the common case costs one non-blocking attempt). Every lock a
    thread may hold while it waits (outside its turn) is taken this way:
    otherwise a call that has the turn would wait for the lock, and the
    lock's holder for the turn."""
    if not lock.acquire(blocking=False):
        with outside():
            lock.acquire()


@contextmanager
def holding(lock) -> Iterator[None]:
    """`with lock:`, the lock taken with acquire()."""
    acquire(lock)
    try:
        yield
    finally:
        lock.release()
