"""The one way vmattach runs external commands (tgtadm, iscsiadm, ...).

Injected into whatever needs it, so tests can pass a recording runner and
assert the exact commands. Secrets passed in `secrets` never reach a log
line or an error message."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from vmattach.common.errors import BackendError
from vmattach.common.redact import mask

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


class CommandError(BackendError):
    def __init__(self, argv: Sequence[str], result: Result, secrets: Sequence[str] = ()):
        shown = mask(" ".join(argv), secrets)
        err = mask((result.stderr or result.stdout).strip(), secrets)
        super().__init__(f"command failed (rc {result.returncode}): {shown}: {err}",
                         reason="COMMAND_FAILED")
        self.result = result


class CommandRunner:
    """Runs commands with subprocess; the production runner."""

    def __init__(self, timeout: float = 60.0):
        self.timeout = timeout

    def run(self, argv: Sequence[str], *, secrets: Sequence[str] = (),
            check: bool = True, timeout: float | None = None,
            input: str | None = None) -> Result:  # noqa: A002 - subprocess's name
        """Run argv (never through a shell); input, when given, is its stdin."""
        LOG.debug("run: %s", mask(" ".join(argv), secrets))
        try:
            proc = subprocess.run(list(argv), capture_output=True, text=True, input=input,
                                  timeout=timeout or self.timeout, check=False)
        except FileNotFoundError:
            raise BackendError(f"command not found: {argv[0]}", reason="COMMAND_NOT_FOUND") from None
        except subprocess.TimeoutExpired:
            raise BackendError(f"command timed out: {mask(' '.join(argv), secrets)}",
                               reason="COMMAND_TIMEOUT") from None
        result = Result(proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise CommandError(argv, result, secrets)
        return result
