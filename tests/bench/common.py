"""Shared helpers of the benchmark: deterministic ids, statistics, child
processes that print `listening on HOST:PORT` first, and /proc readings."""

from __future__ import annotations

import os
import re
import selectors
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = uuid.UUID("6f1c1a52-6d0e-4b57-9a3e-0b3c6c1d2a10")
INITIATOR = "iqn.2004-10.org.vmattach:bench-node"
LISTENING_RE = re.compile(r"^listening on (\S+:\d+)$")


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


class Child:
    """`python -m <module> args...` whose first stdout line is `listening on
    HOST:PORT` (or `ready ...`); stopped with SIGTERM by its own handle."""

    def __init__(self, module: str, args: list[str], log_path: Path, timeout: float = 120.0,
                 env: dict[str, str] | None = None):
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
            stderr=self._log, env={**os.environ, **(env or {})})
        try:
            self.first_line = self._line(timeout)
        except BaseException:
            self.stop()
            raise
        m = LISTENING_RE.match(self.first_line)
        self.address = m.group(1) if m else None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        buf = b""
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.proc.args} printed nothing in {timeout}s: "
                                       f"{self.log()}")
                if sel.select(left):
                    chunk = os.read(self.proc.stdout.fileno(), 65536)
                    if not chunk:
                        raise RuntimeError(f"{self.proc.args} exited with {self.proc.wait(5)}: "
                                           f"{self.log()}")
                    buf += chunk
        finally:
            sel.close()
        return buf.split(b"\n", 1)[0].decode()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-3000:]

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
