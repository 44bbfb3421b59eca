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
from vmattach.common.rules import prefix

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


# how much of a command line, or of what it printed, a message or log line quotes
MAX_SHOWN = 512


def shown(argv: Sequence[str], secrets: Sequence[str] = ()) -> str:
    """The command line for a message or a log line: secrets masked, then cut."""
    return prefix(mask(" ".join(argv), secrets), MAX_SHOWN, escape=False)


class CommandError(BackendError):
    def __init__(self, argv: Sequence[str], result: Result, secrets: Sequence[str] = ()):
        err = prefix(mask((result.stderr or result.stdout).strip(), secrets), MAX_SHOWN, escape=False)
        super().__init__(f"command failed (rc {result.returncode}): {shown(argv, secrets)}: {err}",
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
        LOG.debug("run: %s", shown(argv, secrets))
        try:
            proc = subprocess.run(list(argv), capture_output=True, text=True, input=input,
                                  timeout=timeout or self.timeout, check=False)
        except FileNotFoundError:
            raise BackendError(f"command not found: {prefix(argv[0] if argv else '', 128)}",
                               reason="COMMAND_NOT_FOUND") from None
        except subprocess.TimeoutExpired:
            raise BackendError(f"command timed out: {shown(argv, secrets)}",
                               reason="COMMAND_TIMEOUT") from None
        except (OSError, ValueError, TypeError, subprocess.SubprocessError) as exc:
            # could not start it at all: an argument with a NUL byte (ValueError),
            # arguments over the kernel's limit (E2BIG), no permission, ...
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            if isinstance(exc, ValueError):
                why = "an argument is not a valid command-line string"
            LOG.warning("cannot start %s: %s", prefix(argv[0] if argv else "", 128), why)
            raise BackendError(f"cannot start {prefix(argv[0] if argv else '', 128)}: {why}",
                               reason="COMMAND_NOT_STARTED") from None
        result = Result(proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise CommandError(argv, result, secrets)
        return result
