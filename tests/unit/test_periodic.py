"""common/periodic.every: rounds at the interval, and with share a long round
is followed by a pause that keeps the rounds to that share of the time."""

from __future__ import annotations

import threading
import time

from vmattach.common.periodic import every


def _starts(share: float, took: float, interval: float, rounds: int = 3) -> list[float]:
    starts: list[float] = []
    stop = threading.Event()

    def work():
        starts.append(time.monotonic())
        if len(starts) >= rounds:
            stop.set()
        time.sleep(took)

    every(interval, work, stop, "test", share=share).join(10)
    return starts


def test_rounds_follow_the_interval():
    starts = _starts(0.0, 0.01, 0.02)
    assert len(starts) == 3
    assert all(0.02 <= b - a < 0.5 for a, b in zip(starts, starts[1:], strict=False))


def test_a_long_round_is_followed_by_a_pause_that_keeps_it_to_its_share():
    # a round of 0.1 s at a share of a third: 0.2 s of pause at least, not the 0.01 s interval
    starts = _starts(1 / 3, 0.1, 0.01)
    assert len(starts) == 3
    assert all(b - a >= 0.3 - 0.01 for a, b in zip(starts, starts[1:], strict=False))
