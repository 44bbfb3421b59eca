"""Start and stop a private tgtd (for tests and the demo): its own iSCSI
portal port and control port, so that it never meets another tgtd."""

from __future__ import annotations

import random
import re
import socket
import subprocess
import time
from pathlib import Path

from vmattach.common.errors import BackendError


def free_ports(count: int) -> list[int]:
    """count distinct free TCP ports on loopback."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class TgtDaemon:
    def __init__(self, portal_port: int | None = None, control_port: int | None = None,
                 log_path: str | Path | None = None, bind: str = "127.0.0.1",
                 netns: str | None = None):
        """bind: the portal's listening address; netns: run tgtd (and the
        tgtadm calls of this class) inside that network namespace."""
        self.bind, self.prefix = bind, (["ip", "netns", "exec", netns] if netns else [])
        self.portal_port = portal_port or free_ports(1)[0]
        # tgtd's control "port" names its local IPC socket; it must be < 32768.
        self.control_port = control_port or random.randint(1024, 32767)
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None

    @property
    def portal(self) -> str:
        return f"{self.bind}:{self.portal_port}"

    def _tgtadm(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix, "tgtadm", "--control-port", str(self.control_port), *args],
                              capture_output=True, text=True, timeout=10)

    def start(self, timeout: float = 10.0) -> TgtDaemon:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [*self.prefix, "tgtd", "-f", "--iscsi", f"portal={self.portal}",
             "--control-port", str(self.control_port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BackendError(f"tgtd exited with {self.proc.returncode}")
            if self._tgtadm("--lld", "iscsi", "--mode", "target", "--op", "show").returncode == 0:
                return self
            time.sleep(0.05)
        self.stop()
        raise BackendError("tgtd did not come up")

    def stop(self) -> None:
        """Stop this tgtd (and only it): ask it to exit, then kill it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self._tgtadm("--mode", "system", "--op", "delete", "--force").returncode != 0:
            # tgtd refuses to exit ("invalid request") while it has targets
            show = self._tgtadm("--lld", "iscsi", "--mode", "target", "--op", "show").stdout
            for tid in re.findall(r"^Target (\d+):", show, re.M):
                self._tgtadm("--lld", "iscsi", "--mode", "target", "--op", "delete", "--force",
                             "--tid", tid)
            self._tgtadm("--mode", "system", "--op", "delete", "--force")
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
