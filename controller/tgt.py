"""tgtd, driven with tgtadm through the injected command runner (what
Cinder's TgtAdm helper does)."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from vmattach.common.runner import CommandError, CommandRunner, Result
from vmattach.common.turns import outside, wait

# The default prefix (Cinder's): the volume id follows. A setting (iqn_prefix).
IQN_PREFIX = "iqn.2010-10.org.openstack:volume-"
# What a prefix may be (an iqn. name with a volume id after it): common/rules.py.


class TidInUse(CommandError):
    """tgtd has another target (another IQN) at the tid asked for."""


@dataclass(slots=True)
class Target:
    tid: int
    iqn: str
    luns: dict[int, str] = field(default_factory=dict)  # lun -> backing store path
    accounts: list[str] = field(default_factory=list)
    acls: list[str] = field(default_factory=list)
    initiators: list[str] = field(default_factory=list)  # logged in (I_T nexus)


_TARGET_LINE = re.compile(r"^Target (\d+): (\S+)$")


def iter_targets(lines: Iterable[str]) -> Iterator[Target]:
    """The targets of `tgtadm --mode target --op show`, one at a time as its
    lines come (a listing of 100,000 targets is about two million lines: it
    is never held whole)."""
    current: Target | None = None
    section = None
    lun = None
    for raw in lines:
        line = raw.strip()
        m = _TARGET_LINE.match(line) if line.startswith("Target ") else None
        if m:
            if current is not None:
                yield current
            current = Target(int(m.group(1)), m.group(2))
            section = None
            continue
        if current is None or not line:
            continue
        if line.endswith("information:"):
            section = line.split()[0]  # I_T, LUN, Account, ACL, System
            continue
        if section == "I_T" and line.startswith("Initiator:"):
            current.initiators.append(line.split()[1])
        elif section == "LUN":
            if line.startswith("LUN:"):
                lun = int(line.split()[1])
            elif line.startswith("Backing store path:") and lun is not None:
                path = line.split(":", 1)[1].strip()
                if path != "None":
                    current.luns[lun] = path
        elif section == "Account":
            current.accounts.append(line)
        elif section == "ACL":
            current.acls.append(line)
    if current is not None:
        yield current


# tgtadm commands of one target run side by side when each is a process of
# its own (the runner's `overlap`; tgtd takes them as they come): threads
# shared by every target
SIDE_BY_SIDE = 4


class TgtAdm:
    def __init__(self, runner: CommandRunner, control_port: int = 0):
        self.runner = runner
        self.control_port = control_port
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def _submit(self, fn: Callable[[], object]) -> Future:
        """fn on a thread of the side-by-side pool; run now, in this thread,
        when the runner's commands gain nothing from overlapping (tgtd's
        socket): the Future returned is done either way."""
        if not getattr(self.runner, "overlap", True):
            done: Future = Future()
            try:
                done.set_result(fn())
            except Exception as exc:  # noqa: BLE001 - kept in the Future, as the pool would
                done.set_exception(exc)
            return done
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(SIDE_BY_SIDE, thread_name_prefix="tgtadm")
            return self._pool.submit(fn)

    def close(self) -> None:
        """Stop the threads of side-by-side commands (after the last call)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _together(self, *calls: Callable[[], object]) -> None:
        """Run calls side by side (the first in this thread; all of them in it,
        one after another, without overlap) and wait for every one of them;
        then raise the first failure. None is still running when
        this returns or raises, so that a clean-up never races a command."""
        futures = [self._submit(fn) for fn in calls[1:]]
        first: BaseException | None = None
        try:
            if calls:
                calls[0]()
        except Exception as exc:
            first = exc
        wait(futures)
        for future in futures:
            first = first or future.exception()
        if first is not None:
            raise first

    def _run(self, *args: str, secrets=(), check=True):
        return self.runner.run(self._argv(*args), secrets=secrets, check=check)

    def ping(self, timeout: float = 5.0) -> None:
        """Raise (BackendError) when tgtd does not answer on its control port."""
        self.runner.run(self._argv("--mode", "system", "--op", "show"), timeout=timeout)

    @contextlib.contextmanager
    def targets(self) -> Iterator[Iterator[Target]]:
        """tgtd's targets one at a time, parsed as tgtadm prints them: the
        listing is never held whole (at a cell's 100,000 targets it is
        hundreds of MB as text, more as objects). Leaving the block early
        stops the listing; a failed listing raises once read."""
        with self.runner.lines(self._argv("--mode", "target", "--op", "show")) as lines:
            yield iter_targets(lines)

    def show(self) -> dict[int, Target]:
        """Every target by tid (the audit, which reports them all)."""
        with self.targets() as targets:
            return {t.tid: t for t in targets}

    def find(self, tid: int) -> Target | None:
        """Target tid as tgtd lists it (`show --tid` prints its parameters,
        not its name, LUNs or ACLs): the listing read up to it, a target at
        a time."""
        with self.targets() as targets:
            for target in targets:
                if target.tid == tid:
                    return target
        return None

    def has_target(self, tid: int) -> bool:
        """Whether tgtd has target tid (without listing every target)."""
        result = self._run("--mode", "target", "--op", "show", "--tid", str(tid), check=False)
        if result.returncode == 0:
            return True
        if "can't find the target" in result.stderr + result.stdout:
            return False
        raise CommandError(self._argv("--mode", "target", "--op", "show", "--tid", str(tid)),
                           result)

    def has_lun(self, tid: int, lun: int = 1) -> bool:
        """Whether target tid has a LUN lun with a backing store (lists every
        target: not for the hot path)."""
        target = self.find(tid)
        return target is not None and lun in target.luns

    def reload_lun(self, tid: int, backing_store: str, lun: int = 1, attempts: int = 5) -> None:
        """Re-create LUN lun on backing_store so that tgtd reads the file's
        size again (tgtd has no online resize: `--op update --params
        disk_size=` is refused). Sessions stay logged in; the LUN keeps its
        SCSI id and serial (made from tid and lun). A LUN with commands in
        flight is busy for a moment: retried."""
        for attempt in range(1, attempts + 1):
            result = self._run("--mode", "logicalunit", "--op", "delete", "--tid", str(tid),
                               "--lun", str(lun), check=False)
            out = result.stderr + result.stdout
            if result.returncode == 0 or "can't find the logical unit" in out:
                break
            if attempt == attempts:
                raise CommandError(self._argv("--mode", "logicalunit", "--op", "delete",
                                              "--tid", str(tid), "--lun", str(lun)), result)
            with outside():
                time.sleep(0.05 * attempt)
        self._run("--mode", "logicalunit", "--op", "new", "--tid", str(tid), "--lun", str(lun),
                  "--backing-store", backing_store)

    def _argv(self, *args: str) -> list[str]:
        argv = ["tgtadm"]
        if self.control_port:
            argv += ["--control-port", str(self.control_port)]
        return argv + ["--lld", "iscsi", *args]

    def create_target(self, tid: int, iqn: str, backing_store: str,
                      user: str, password: str, initiator: str = "") -> None:
        """The target with LUN 1, a CHAP account bound to it and, when given,
        initiator's ACL. With tgtadm commands (the runner's `overlap`), the
        account is made while tgtd makes the target, then the LUN, the binding
        and the ACL side by side: two commands' time instead of five. On tgtd's
        socket the five requests go one after another from this thread.

        A target already there with this tid and IQN (made by another
        Controller process sharing the database, or half-made by one that
        died) is completed and never deleted; when a later step fails, only a
        target this call created is removed (and an account it made for a
        target it could not make)."""
        new = ("--mode", "target", "--op", "new", "--tid", str(tid), "--targetname", iqn)
        account = self._submit(lambda: self.ensure_account(user, password))
        result = self._run(*new, check=False)
        wait((account,))
        existing = None
        if result.returncode != 0:
            existing = self.find(tid)
            if existing is None or existing.iqn != iqn:
                made = account.exception() is None and account.result()
                if made:
                    self._run("--mode", "account", "--op", "delete", "--user", user, check=False)
                raise (TidInUse if existing is not None else CommandError)(self._argv(*new), result)
        try:
            account.result()
            steps: list[Callable[[], object]] = []
            if existing is None or 1 not in existing.luns:
                steps.append(lambda: self._run("--mode", "logicalunit", "--op", "new", "--tid",
                                               str(tid), "--lun", "1",
                                               "--backing-store", backing_store))
            if existing is None or user not in existing.accounts:
                steps.append(lambda: self._run("--mode", "account", "--op", "bind",
                                               "--tid", str(tid), "--user", user))
            if initiator:
                steps.append(lambda: self.allow(tid, initiator))
            self._together(*steps)
        except CommandError:
            if existing is None:
                self.delete_target(tid, user)
            raise

    def create_target_at_free_tid(self, preferred: int, iqn: str, backing_store: str,
                                  user: str, password: str, initiator: str = "",
                                  attempts: int = 20) -> int:
        """create_target at the preferred tid or, when tgtd has another target
        there (another Controller or a cinder-volume shares this tgtd), at a
        free one; returns the tid used. The target of this IQN already made
        at another tid is completed there (tgtd keeps IQNs unique)."""
        tid = preferred
        for _ in range(attempts):
            try:
                self.create_target(tid, iqn, backing_store, user, password, initiator)
                return tid
            except CommandError as exc:
                mine, taken, highest = None, False, 0
                with self.targets() as present:  # a target at a time
                    for target in present:
                        if target.iqn == iqn:
                            mine = target.tid
                        taken = taken or target.tid == tid
                        highest = max(highest, target.tid)
                if mine is not None and mine != tid:
                    tid = mine
                elif isinstance(exc, TidInUse) or taken:
                    tid = highest + 1  # someone else's tid; another may take this one too
                else:
                    raise
        raise CommandError(self._argv("--mode", "target", "--op", "new", "--targetname", iqn),
                           Result(1, "", f"no free tid found in {attempts} attempts"))

    def ensure_account(self, user: str, password: str) -> bool:
        """The CHAP account on tgtd; whether this call made it."""
        args = ("--mode", "account", "--op", "new", "--user", user, "--password", password)
        result = self._run(*args, secrets=[password], check=False)
        # "this account already exists": a re-export, or another process a moment ago
        if result.returncode != 0 and "already exists" not in result.stderr + result.stdout:
            raise CommandError(self._argv(*args), result, [password])
        return result.returncode == 0

    def delete_target(self, tid: int, user: str | None) -> None:
        """Remove the target (even with sessions) and its account; missing is OK."""
        self._run("--mode", "target", "--op", "delete", "--force", "--tid", str(tid), check=False)
        if user:
            self._run("--mode", "account", "--op", "delete", "--user", user, check=False)

    def allow(self, tid: int, initiator: str) -> None:
        """Authorise initiator on the target; already authorised is OK
        (tgtadm answers rc 22 "this access control rule already exists")."""
        args = ("--mode", "target", "--op", "bind", "--tid", str(tid),
                "--initiator-name", initiator)
        result = self._run(*args, check=False)
        if result.returncode != 0 and "already exists" not in result.stderr + result.stdout:
            raise CommandError(self._argv(*args), result)

    def disallow(self, tid: int, initiator: str) -> None:
        self._run("--mode", "target", "--op", "unbind", "--tid", str(tid),
                  "--initiator-name", initiator, check=False)
