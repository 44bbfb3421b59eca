"""Run `vmattach serve` as a child process of a test: start it, read the
address it prints on its first line (with a deadline), stop it by its own
Popen handle."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

VMATTACH = str(Path(sys.executable).with_name("vmattach"))
LISTENING_RE = re.compile(r"^listening on (\S+:\d+)$")


class ServeProcess:
    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 timeout: float = 30.0, command: list[str] | None = None):
        """command: what to run instead of `vmattach serve` (args follow it);
        it must print `listening on HOST:PORT` first too."""
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "ab")
        # a test not about authentication runs with --auth none (loopback only),
        # and one not about shutdown stops at once (no shutdown delay), unless
        # it says otherwise in env or args
        full_env = {"VMATTACH_AUTH": "none", "VMATTACH_SHUTDOWN_DELAY": "0", **os.environ,
                    **(env or {})}
        self.proc = subprocess.Popen([*(command or [VMATTACH, "serve"]), *args],
                                     stdout=subprocess.PIPE, stderr=self._log, env=full_env)
        self._buf = b""
        try:
            self.first_line = self.read_line(timeout)
        except BaseException:
            self.stop()
            raise
        m = LISTENING_RE.match(self.first_line)
        self.address = m.group(1) if m else None

    def read_line(self, timeout: float = 30.0) -> str:
        """The next line of its standard output."""
        deadline = time.monotonic() + timeout
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"vmattach serve printed no line in {timeout}s; log: {self.log()}")
                if sel.select(left):
                    chunk = os.read(self.proc.stdout.fileno(), 4096)
                    if not chunk:
                        raise RuntimeError(f"vmattach serve exited with {self.proc.wait(5)}; "
                                           f"log: {self.log()}")
                    self._buf += chunk
        finally:
            sel.close()
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, then the exit status (waits at most timeout)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()
