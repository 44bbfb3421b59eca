"""The one way vmattach runs external commands (tgtadm, iscsiadm, ...).

Injected into whatever needs it, so tests can pass a recording runner and
assert the exact commands. Secrets passed in `secrets` never reach a log
line or an error message."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from vmattach.common.errors import BackendError
from vmattach.common.redact import mask
from vmattach.common.rules import prefix
from vmattach.common.turns import outside

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


def not_started(argv: Sequence[str], exc: Exception) -> BackendError:
    """The error of a command that could not be started at all: not found, an
    argument with a NUL byte (ValueError), arguments over the kernel's limit
    (E2BIG), no permission, ..."""
    name = prefix(argv[0] if argv else "", 128)
    if isinstance(exc, FileNotFoundError):
        return BackendError(f"command not found: {name}", reason="COMMAND_NOT_FOUND")
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
    if isinstance(exc, ValueError):
        why = "an argument is not a valid command-line string"
    LOG.warning("cannot start %s: %s", name, why)
    return BackendError(f"cannot start {name}: {why}", reason="COMMAND_NOT_STARTED")


class CommandRunner:
    """Runs commands with subprocess; the production runner."""

    # each command is a process of its own: a caller with several independent
    # commands may run them side by side to overlap their start-up
    overlap = True

    def __init__(self, timeout: float = 60.0):
        self.timeout = timeout

    def run(self, argv: Sequence[str], *, secrets: Sequence[str] = (),
            check: bool = True, timeout: float | None = None,
            input: str | None = None) -> Result:  # noqa: A002 - subprocess's name
        """Run argv (never through a shell); input, when given, is its stdin."""
        LOG.debug("run: %s", shown(argv, secrets))
        try:
            with outside():
                proc = subprocess.run(list(argv), capture_output=True, text=True, input=input,
                                      timeout=timeout or self.timeout, check=False)
        except subprocess.TimeoutExpired:
            raise BackendError(f"command timed out: {shown(argv, secrets)}",
                               reason="COMMAND_TIMEOUT") from None
        except (OSError, ValueError, TypeError, subprocess.SubprocessError) as exc:
            raise not_started(argv, exc) from None
        result = Result(proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise CommandError(argv, result, secrets)
        return result

    @contextlib.contextmanager
    def lines(self, argv: Sequence[str], *, timeout: float | None = None
              ) -> Iterator[Iterator[str]]:
        """Run argv (never through a shell) and read what it prints a line at
        a time, without the newline, as it comes: for a listing too big to
        hold (tgtd's targets at a cell's size). Leaving the block before the
        last line stops the command; reading them all and leaving it raises
        CommandError when the command failed (its stderr is kept in a file
        meanwhile, so that it cannot block on a full pipe)."""
        LOG.debug("run: %s", shown(argv))
        with outside(), tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=err,
                                        stdin=subprocess.DEVNULL, text=True)
            except (OSError, ValueError, TypeError, subprocess.SubprocessError) as exc:
                raise not_started(argv, exc) from None
            expired = threading.Event()

            def expire() -> None:
                expired.set()
                proc.kill()

            timer = threading.Timer(timeout or self.timeout, expire)
            timer.daemon = True
            timer.start()
            read_all = False

            def read() -> Iterator[str]:
                nonlocal read_all
                assert proc.stdout is not None
                for line in proc.stdout:
                    yield line.rstrip("\n")
                read_all = True

            try:
                yield read()
            finally:
                timer.cancel()
                if not read_all and proc.poll() is None:
                    proc.kill()  # the caller stopped early (or failed): the rest is not wanted
                proc.stdout.close()  # type: ignore[union-attr]
                proc.wait()
            if not read_all and not expired.is_set():
                return
            if expired.is_set():
                raise BackendError(f"command timed out: {shown(argv)}", reason="COMMAND_TIMEOUT")
            if proc.returncode != 0:
                err.seek(0)
                raise CommandError(argv, Result(proc.returncode, "",
                                                err.read().decode(errors="replace")))
