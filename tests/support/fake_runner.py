"""FakeRunner: a recording stand-in for server.runner.CommandRunner, for
unit tests (named as a fake; never used outside tests).

It records every command with its secrets, logs it masked exactly as the
real runner does, and answers from scripted results (rc 0 and no output by
default)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from vmattach.common.redact import mask
from vmattach.common.runner import CommandError, Result

LOG = logging.getLogger("vmattach.common.runner")

Responder = Callable[[list[str]], Result | None]


@dataclass
class Call:
    argv: list[str]
    secrets: list[str] = field(default_factory=list)
    check: bool = True
    input: str | None = None


class FakeRunner:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._scripted: list[tuple[tuple[str, ...], Result]] = []
        self._responders: list[Responder] = []

    def on(self, *argv_prefix: str, returncode: int = 0, stdout: str = "",
           stderr: str = "") -> FakeRunner:
        """Answer commands starting with argv_prefix (most recent rule wins)."""
        self._scripted.insert(0, (argv_prefix, Result(returncode, stdout, stderr)))
        return self

    def respond(self, responder: Responder) -> FakeRunner:
        """responder(argv) -> Result, or None to fall through to the rules."""
        self._responders.insert(0, responder)
        return self

    def _result(self, argv: list[str]) -> Result:
        for responder in self._responders:
            result = responder(argv)
            if result is not None:
                return result
        for prefix, result in self._scripted:
            if tuple(argv[:len(prefix)]) == prefix:
                return result
        return Result(0, "", "")

    def run(self, argv: Sequence[str], *, secrets: Sequence[str] = (), check: bool = True,
            timeout: float | None = None, input: str | None = None) -> Result:  # noqa: A002
        argv = list(argv)
        LOG.debug("run: %s", mask(" ".join(argv), secrets))
        self.calls.append(Call(argv, list(secrets), check, input))
        result = self._result(argv)
        if check and result.returncode != 0:
            raise CommandError(argv, result, secrets)
        return result

    @contextlib.contextmanager
    def lines(self, argv: Sequence[str], *, timeout: float | None = None
              ) -> Iterator[Iterator[str]]:
        """CommandRunner.lines over run(): the scripted output a line at a time."""
        yield iter(self.run(argv, timeout=timeout).stdout.splitlines())

    @property
    def argvs(self) -> list[list[str]]:
        return [c.argv for c in self.calls]
