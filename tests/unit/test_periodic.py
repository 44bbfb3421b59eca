"""common/periodic: every() runs rounds at the interval; a Pacer keeps a long
round to its share of the CPU."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import REGISTRY

from vmattach.common.periodic import Pacer, every


def _starts(took: float, interval: float, rounds: int = 3) -> list[float]:
    starts: list[float] = []
    stop = threading.Event()

    def work():
        starts.append(time.monotonic())
        if len(starts) >= rounds:
            stop.set()
        time.sleep(took)

    every(interval, work, stop, "test").join(10)
    return starts


def test_rounds_follow_the_interval():
    starts = _starts(0.01, 0.02)
    assert len(starts) == 3
    assert all(0.02 <= b - a < 0.5 for a, b in zip(starts, starts[1:], strict=False))


def test_each_round_s_time_is_in_the_metrics():
    def count() -> float:
        return REGISTRY.get_sample_value("vmattach_background_round_seconds_count",
                                         {"round": "metered"}) or 0.0

    before = count()
    stop = threading.Event()
    every(0.01, lambda: stop.set() if count() - before >= 2 else None, stop, "metered").join(10)
    assert count() - before == 3  # the round that stopped it is counted too
    assert REGISTRY.get_sample_value("vmattach_background_round_seconds_sum",
                                     {"round": "metered"}) > 0


def test_the_interval_counts_from_the_end_of_a_round():
    starts = _starts(0.1, 0.05)
    assert all(b - a >= 0.15 for a, b in zip(starts, starts[1:], strict=False))


class _Clock:
    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


def test_a_pacer_sleeps_after_each_slice_of_work_to_keep_its_share():
    clock = _Clock()
    pace = Pacer(0.25, slice_s=0.002, clock=lambda: clock.now, sleep=clock.sleep)
    for _ in range(10):  # 1 ms of CPU between two calls
        clock.now += 0.001
        pace()
    # a pause after every 2 ms of work, three times as long (a quarter of the time working)
    assert clock.sleeps == pytest.approx([0.006] * 5)


def test_a_pacer_with_the_whole_share_never_sleeps():
    clock = _Clock()
    pace = Pacer(1.0, clock=lambda: clock.now, sleep=clock.sleep)
    for _ in range(10):
        clock.now += 0.01
        pace()
    assert clock.sleeps == []


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_a_pacer_refuses_a_share_outside_0_to_1(share):
    with pytest.raises(ValueError, match="share"):
        Pacer(share)


def test_a_paced_round_takes_its_cpu_time_over_its_share():
    pace = Pacer(0.25)
    cpu0, wall0 = time.thread_time(), time.monotonic()
    while time.thread_time() - cpu0 < 0.05:  # 50 ms of CPU in small pieces
        sum(range(200))
        pace()
    cpu, wall = time.thread_time() - cpu0, time.monotonic() - wall0
    assert wall >= cpu / 0.25 * 0.9  # the last slice's pause may not have come yet
