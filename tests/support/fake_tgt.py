"""A FAKE tgtd for unit tests: a recording command runner that understands
the tgtadm commands controller/tgt.py sends and keeps the target state in
memory, so `--op show` answers consistently with what was created.

Return codes and messages are the ones real tgtadm gives (rc 22 and
"tgtadm: this target already exists" and the like, checked against tgtd 1.0
on Debian 12). Never used outside tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from vmattach.common.runner import CommandError, Result
from vmattach.controller.tgt import TgtAdm

EINVAL = 22


@dataclass(slots=True)
class FakeTarget:
    tid: int
    iqn: str
    luns: dict[int, str] = field(default_factory=dict)
    accounts: list[str] = field(default_factory=list)
    acls: list[str] = field(default_factory=list)


@dataclass
class Call:
    argv: list[str]
    secrets: list[str]


class FakeTgtRunner:
    """Stands in for server.runner.CommandRunner in front of a fake tgtd.

    .calls records every command (argv as given); .targets and .accounts are
    the fake daemon's state; fail_on(...) makes the next matching command fail
    the way tgtadm fails; restart() forgets everything, as a tgtd restart does."""

    def __init__(self):
        self.calls: list[Call] = []
        self.targets: dict[int, FakeTarget] = {}
        self.accounts: dict[str, str] = {}  # user -> password
        self._failures: list[tuple[str, str]] = []

    # -- test controls -----------------------------------------------------------

    def fail_on(self, mode: str, op: str) -> None:
        self._failures.append((mode, op))

    def restart(self) -> None:
        self.targets.clear()
        self.accounts.clear()

    def commands(self, mode: str | None = None, op: str | None = None) -> list[list[str]]:
        out = []
        for call in self.calls:
            opts = _options(call.argv)
            if (mode is None or opts.get("--mode") == mode) and (op is None or opts.get("--op") == op):
                out.append(call.argv)
        return out

    # -- the runner interface ------------------------------------------------------

    def run(self, argv: Sequence[str], *, secrets: Sequence[str] = (), check: bool = True,
            timeout: float | None = None) -> Result:
        argv = list(argv)
        self.calls.append(Call(argv, list(secrets)))
        if argv[0] != "tgtadm":
            result = Result(127, "", f"fake runner: unexpected command {argv[0]}")
        else:
            result = self._tgtadm(_options(argv))
        if check and result.returncode != 0:
            raise CommandError(argv, result, secrets)
        return result

    @contextlib.contextmanager
    def lines(self, argv: Sequence[str], *, timeout: float | None = None
              ) -> Iterator[Iterator[str]]:
        """CommandRunner.lines: the full target listing is made a target at a
        time as it is read (as tgtd's would come through a pipe); any other
        command is run() and its output split."""
        argv = list(argv)
        o = _options(argv)
        if (argv[0] == "tgtadm" and (o.get("--mode"), o.get("--op")) == ("target", "show")
                and "--tid" not in o and ("target", "show") not in self._failures):
            self.calls.append(Call(argv, []))
            yield (line for chunk in self._listing() for line in chunk.splitlines())
            return
        yield iter(self.run(argv).stdout.splitlines())

    def _tgtadm(self, o: dict[str, str]) -> Result:
        mode, op = o.get("--mode"), o.get("--op")
        if (mode, op) in self._failures:
            self._failures.remove((mode, op))
            return _err("fake failure")
        if mode == "system" and op == "show":  # the Controller's health probe
            return Result(0, "System:\n    State: ready\n", "")
        tid = int(o["--tid"]) if "--tid" in o else None
        target = self.targets.get(tid) if tid is not None else None
        if mode == "target" and op == "show":
            if tid is not None:  # one target's parameters, as tgtd prints them
                return _ok() if target is not None else _err("can't find the target")
            return Result(0, self._show(), "")
        if mode == "target" and op == "new":
            # tgtd keeps tids and IQNs unique
            if target is not None or any(t.iqn == o["--targetname"] for t in self.targets.values()):
                return _err("this target already exists")
            self.targets[tid] = FakeTarget(tid, o["--targetname"])
            return _ok()
        if mode == "target" and op == "delete":
            if target is None:
                return _err("can't find the target")
            del self.targets[tid]
            return _ok()
        if mode == "target" and op in ("bind", "unbind"):
            if target is None:
                return _err("can't find the target")
            name = o.get("--initiator-name") or o.get("--initiator-address")
            if op == "bind":
                if name in target.acls:
                    return _err("this access control rule already exists")
                target.acls.append(name)
            else:
                if name not in target.acls:
                    return _err("this access control rule does not exist")
                target.acls.remove(name)
            return _ok()
        if mode == "logicalunit" and op == "new":
            if target is None:
                return _err("can't find the target")
            target.luns[int(o["--lun"])] = o["--backing-store"]
            return _ok()
        if mode == "logicalunit" and op == "delete":
            if target is None:
                return _err("can't find the target")
            if int(o["--lun"]) not in target.luns:
                return _err("can't find the logical unit")
            del target.luns[int(o["--lun"])]
            return _ok()
        if mode == "account" and op == "show":
            lines = ["Account list:"] + [f"    {user}" for user in self.accounts]
            return Result(0, "\n".join(lines) + "\n", "")
        if mode == "account" and op == "new":
            if o["--user"] in self.accounts:
                return _err("this account already exists")
            self.accounts[o["--user"]] = o["--password"]
            return _ok()
        if mode == "account" and op == "bind":
            if target is None or o["--user"] not in self.accounts:
                return _err("can't find the account")
            target.accounts.append(o["--user"])
            return _ok()
        if mode == "account" and op == "delete":
            user = o["--user"]
            if user not in self.accounts:
                return _err("can't find the account")
            del self.accounts[user]
            for t in self.targets.values():
                if user in t.accounts:
                    t.accounts.remove(user)
            return _ok()
        return _err("invalid request")

    def _show(self) -> str:
        return "".join(self._listing())

    def _listing(self) -> Iterator[str]:
        """The listing one target's text at a time (a list of every line of
        100,000 targets, the bench's cell size, would be several times the text)."""
        for t in sorted(self.targets.values(), key=lambda t: t.tid):
            lines = [f"Target {t.tid}: {t.iqn}", "    System information:",
                     "        Driver: iscsi", "        State: ready",
                     "    I_T nexus information:", "    LUN information:",
                     "        LUN: 0", "            Type: controller",
                     "            Backing store path: None"]
            for lun, path in sorted(t.luns.items()):
                lines += [f"        LUN: {lun}", "            Type: disk",
                          f"            Backing store path: {path}"]
            lines += ["    Account information:"] + [f"        {a}" for a in t.accounts]
            lines += ["    ACL information:"] + [f"        {a}" for a in t.acls]
            yield "\n".join(lines) + "\n"


def _options(argv: list[str]) -> dict[str, str]:
    opts = {}
    i = 1
    while i < len(argv):
        if argv[i].startswith("--"):
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
            opts[argv[i]] = value
            i += 2 if value else 1
        else:
            i += 1
    return opts


def _ok() -> Result:
    return Result(0, "", "")


def _err(message: str) -> Result:
    return Result(EINVAL, "", f"tgtadm: {message}\n")


class FakeTgtAdm(TgtAdm):
    """controller.tgt.TgtAdm over a FakeTgtRunner (the real command-building
    code, a fake daemon)."""

    def __init__(self, control_port: int = 3261):
        self.fake = FakeTgtRunner()
        super().__init__(self.fake, control_port)
