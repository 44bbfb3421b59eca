"""Counts the SQL statements SQLite runs in this process (the benchmark's
statements per attach and per detach, and the tests that pin them): every
connection opened after install() gets a trace callback, which sees each
statement SQLite executes, BEGIN and COMMIT included. Tests and the bench
only; production code never imports it."""

from __future__ import annotations

import collections
import threading

import peewee


def _kind(sql: str) -> str:
    """"UPDATE block_device_mapping ..." -> "UPDATE block_device_mapping"."""
    words = sql.replace('"', " ").split()
    if not words:
        return "?"
    verb = words[0].upper()
    if verb in ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "PRAGMA"):
        return verb
    upper = [w.upper() for w in words]
    # the table the statement is about: an UPDATE's own, not one of its subqueries'
    marker = {"UPDATE": "UPDATE", "INSERT": "INTO"}.get(verb, "FROM")
    if marker in upper[:-1]:
        return f"{verb} {words[upper.index(marker) + 1]}"
    return verb


class SqlCounter:
    """Statements by kind ("SELECT controller_volume", "BEGIN", ...)."""

    def __init__(self):
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self.enabled = True

    def trace(self, sql: str) -> None:
        if self.enabled:
            kind = _kind(sql)
            with self._lock:
                self.counts[kind] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())


def install() -> SqlCounter:
    """Trace every SQLite connection opened from now on (peewee opens them
    through SqliteDatabase._add_conn_hooks, also behind its pool)."""
    counter = SqlCounter()
    original = peewee.SqliteDatabase._add_conn_hooks

    def add_conn_hooks(self, conn):
        original(self, conn)
        conn.set_trace_callback(counter.trace)

    peewee.SqliteDatabase._add_conn_hooks = add_conn_hooks  # type: ignore[method-assign]
    counter.uninstall = lambda: setattr(  # type: ignore[attr-defined]
        peewee.SqliteDatabase, "_add_conn_hooks", original)
    return counter


def diff(after: dict[str, int], before: dict[str, int], per: int = 1) -> dict[str, float]:
    """What happened between two snapshots, divided by per."""
    return {k: (after.get(k, 0) - before.get(k, 0)) / per for k in after
            if after.get(k, 0) != before.get(k, 0)}
