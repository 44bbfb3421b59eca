"""Shared helpers of the benchmark: deterministic ids, statistics, child
processes that print `listening on HOST:PORT` first, and /proc readings."""

from __future__ import annotations

import statistics
import sys
import uuid
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
