"""Turns (common/turns.py): the calls of a process run their Python one at a
time; a call gives its turn up around a wait (outside(), a lock another
thread holds, a future), so that a wait on another call never deadlocks and
never holds the others up; a turn not given back holds a waiting call up
for PATIENCE seconds at most, counted."""

from __future__ import annotations

import os
import resource
import socket
import threading
from concurrent.futures import Future

import pytest

from vmattach.common import turns
from vmattach.common.turns import Turns

DONE = 10  # seconds any thread here has to finish: far more than it needs


def start(fn) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def finished(*threads: threading.Thread) -> bool:
    for t in threads:
        t.join(DONE)
    return not any(t.is_alive() for t in threads)


def run_in_turn(gate: Turns, fn=lambda: None) -> None:
    with gate.turn():
        fn()


def timeouts() -> float:
    return turns.TIMEOUTS._value.get()


def test_a_call_waits_for_the_one_that_has_the_turn():
    gate = Turns(patience=60)
    order: list[str] = []
    a_runs, a_may_end = threading.Event(), threading.Event()

    def a():
        with gate.turn():
            order.append("a starts")
            a_runs.set()
            a_may_end.wait(DONE)
            order.append("a ends")

    ta = start(a)
    assert a_runs.wait(DONE)
    tb = start(lambda: run_in_turn(gate, lambda: order.append("b")))
    tb.join(0.3)
    assert tb.is_alive()  # b waits for its turn
    a_may_end.set()
    assert finished(ta, tb)
    assert order == ["a starts", "a ends", "b"]


def test_a_call_made_in_process_runs_in_its_callers_turn():
    gate = Turns(patience=60)
    with gate.turn():
        with gate.turn():  # the callee's interceptor: no second turn to wait for
            pass
        other = start(lambda: run_in_turn(gate))
        other.join(0.3)
        assert other.is_alive()  # the caller's turn is still held
    assert finished(other)


def test_outside_gives_the_turn_to_another_call_meanwhile():
    gate = Turns(patience=60)
    before = timeouts()
    answered = threading.Event()
    order: list[str] = []

    def waiting():
        with gate.turn():
            order.append("a asks")
            with turns.outside():  # the answer comes from a call that needs the turn
                assert answered.wait(DONE)
            order.append("a has its answer")

    def answering():
        with gate.turn():
            order.append("b answers")
            answered.set()

    ta = start(waiting)
    while not order:
        threading.Event().wait(0.01)
    tb = start(answering)
    assert finished(ta, tb)
    assert order == ["a asks", "b answers", "a has its answer"]
    assert timeouts() == before


def test_a_lock_held_by_a_call_outside_its_turn_is_waited_for_outside_the_turn():
    """a holds the lock while it waits outside its turn; b, in its turn,
    wants the lock: b waits outside its turn, a gets its turn back, lets
    the lock go, and b goes on. No turn waits out its patience."""
    gate = Turns(patience=60)
    before = timeouts()
    lock = threading.Lock()
    a_waits, a_may_go = threading.Event(), threading.Event()
    got: list[str] = []

    def a():
        with gate.turn():
            turns.acquire(lock)
            try:
                with turns.outside():
                    a_waits.set()
                    assert a_may_go.wait(DONE)
            finally:
                lock.release()

    def b():
        with gate.turn():
            turns.acquire(lock)
            got.append("b")
            lock.release()

    ta = start(a)
    assert a_waits.wait(DONE)
    tb = start(b)
    tb.join(0.3)
    assert tb.is_alive() and not got
    # b waits for the lock outside its turn: a third call has the turn at once
    third = start(lambda: run_in_turn(gate, lambda: got.append("third")))
    assert finished(third)
    a_may_go.set()
    assert finished(ta, tb)
    assert got == ["third", "b"] and timeouts() == before


def test_a_future_is_waited_for_outside_the_turn():
    gate = Turns(patience=60)
    before = timeouts()
    future: Future = Future()
    answers: list[int] = []

    def waiting():
        with gate.turn():
            answers.append(turns.result(future))

    def answering():
        with gate.turn():
            future.set_result(42)

    ta = start(waiting)
    ta.join(0.1)
    tb = start(answering)
    assert finished(ta, tb)
    assert answers == [42] and timeouts() == before


@pytest.mark.turn_timeout
def test_a_turn_never_given_back_holds_others_up_for_its_patience_and_is_counted():
    gate = Turns(patience=0.2)
    before = timeouts()
    holder_in, holder_may_end = threading.Event(), threading.Event()
    ran: list[str] = []

    def holder():  # waits without outside(): the case the rule forbids
        with gate.turn():
            holder_in.set()
            holder_may_end.wait(DONE)

    th = start(holder)
    assert holder_in.wait(DONE)
    to = start(lambda: run_in_turn(gate, lambda: ran.append("other")))
    assert finished(to)  # after 0.2 s, without a turn
    assert ran == ["other"] and timeouts() == before + 1
    holder_may_end.set()
    assert finished(th)
    with gate.turn():  # the holder gave its turn back; the other had none to give
        pass


def test_without_a_turn_outside_and_acquire_do_nothing_more():
    lock = threading.Lock()
    with turns.outside():
        turns.acquire(lock)
    assert lock.locked()
    lock.release()


def test_a_slow_answer_on_a_socket_is_waited_for_outside_the_turn():
    """tgtd's socket (controller/tgtd_socket.py): an answer that is not there
    within QUICK seconds is waited for outside the turn."""
    gate = Turns(patience=60)
    before = timeouts()
    asker, daemon = socket.socketpair()
    got: list[bytes] = []

    def asking():
        with gate.turn():
            got.append(turns.answer_of(asker, lambda: asker.recv(16)))

    def answering():  # the answer comes after a call that needs the turn
        with gate.turn():
            daemon.sendall(b"answer")

    with asker, daemon:
        ta = start(asking)
        ta.join(0.1)
        tb = start(answering)
        assert finished(ta, tb)
    assert got == [b"answer"] and timeouts() == before


def test_an_answer_on_a_descriptor_past_1024_is_read():
    """A cell's process has more than 1,024 descriptors open: the wait for
    tgtd's answer must not be select()'s, which refuses them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if max(soft, hard) < 2048:
        pytest.skip("this machine allows fewer than 2,048 open files")
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    gate = Turns(patience=60)
    asker, daemon = socket.socketpair()
    high = os.dup2(asker.fileno(), 2000)
    far = socket.socket(fileno=high)
    try:
        daemon.sendall(b"quick")
        with gate.turn():
            assert turns.answer_of(far, lambda: far.recv(16)) == b"quick"
    finally:
        far.close()
        asker.close()
        daemon.close()
        if soft < 2048:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
