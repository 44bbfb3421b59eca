"""Shared helpers of the benchmark: deterministic ids, statistics, child
processes that print `listening on HOST:PORT` first, and /proc readings."""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from tests.support.vmattach_process import ServeProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = uuid.UUID("6f1c1a52-6d0e-4b57-9a3e-0b3c6c1d2a10")
INITIATOR = "iqn.2004-10.org.vmattach:bench-node"


def server_uuid(node: int, index: int) -> str:
    """The id of fake domain `index` on fake node `node` (known to every process)."""
    return str(uuid.uuid5(NAMESPACE, f"node-{node}/server-{index}"))


def node_id(node: int) -> str:
    return f"bench-node-{node}"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def time_cycles(attach: Callable[[int], object], detach: Callable[[int], object],
                runs: int, cycles: int) -> dict:
    """runs of `cycles` attach(k) + detach(k), each call timed: per run the
    p50/p99 of attach and of detach; the medians over runs (ms), and each
    run's attach p50."""
    per_run: dict[str, list[float]] = {"attach_p50": [], "attach_p99": [], "detach_p50": [],
                                       "detach_p99": []}
    for _ in range(runs):
        att, det = [], []
        for k in range(cycles):
            t0 = time.perf_counter()
            attach(k)
            t1 = time.perf_counter()
            detach(k)
            t2 = time.perf_counter()
            att.append((t1 - t0) * 1000)
            det.append((t2 - t1) * 1000)
        for op, values in (("attach", att), ("detach", det)):
            per_run[f"{op}_p50"].append(percentile(values, 50))
            per_run[f"{op}_p99"].append(percentile(values, 99))
    out: dict = {k + "_ms": median(v) for k, v in per_run.items()}
    out["runs_attach_p50_ms"] = per_run["attach_p50"]
    return out


def vm_hwm_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of a process, in MB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def vm_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


class Child(ServeProcess):
    """`python -m <module> args...` whose first stdout line is `listening on
    HOST:PORT` (or `ready ...`); stopped with SIGTERM by its own handle."""

    def __init__(self, module: str, args: list[str], log_path: Path, timeout: float = 120.0,
                 env: dict[str, str] | None = None):
        super().__init__(args, log_path, env=env, timeout=timeout,
                         command=[sys.executable, "-m", module])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
