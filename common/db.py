"""peewee set-up shared by the services that keep a database.

Each service owns its own Database object, opened at start-up from a URL
(never at import time) and bound to that service's models only."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs, quote, urlparse

import peewee
from playhouse.db_url import connect
from playhouse.pool import PooledDatabase

from vmattach.common import turns


def utcnow() -> datetime.datetime:
    """Naive UTC, as every vmattach table stores it."""
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "foreign_keys": 1,
    "busy_timeout": 30000,
    "synchronous": "normal",
}
# peewee's pool (postgres+pool://) raises at once when every connection is
# checked out; a request waits for one instead (the URL's own ?max_connections=
# and ?timeout= win). Enough for the gRPC workers plus the background threads.
POOL_DEFAULTS = {"max_connections": 48, "timeout": 30}


def _private_sqlite_file(url: str) -> None:
    """Create a SQLite database file readable by its owner only (0600); its
    -wal and -shm files take the same mode from it."""
    path = urlparse(url).path[1:]  # as playhouse reads it: sqlite:////abs, sqlite:///relative
    if url.startswith("sqlite:///") and path and path != ":memory:":
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass


def connect_database(url: str, models: Iterable[type[peewee.Model]]) -> peewee.Database:
    """A lazily connecting Database for url (sqlite:///path, postgresql://...,
    postgres+pool://...) with the models bound to it; no table is made."""
    if url.startswith("sqlite"):
        _private_sqlite_file(url)
    if url.startswith("sqlite:"):
        # A pool (one connection per worker thread, kept between requests):
        # closing the last connection of a WAL database checkpoints it, an
        # fsync on every request when each request opened and closed its own.
        db = connect("sqlite+pool:" + url[len("sqlite:"):], pragmas=SQLITE_PRAGMAS,
                     autoconnect=False, check_same_thread=False, max_connections=0,
                     stale_timeout=None)
    elif url.startswith("sqlite"):
        db = connect(url, pragmas=SQLITE_PRAGMAS, autoconnect=False,
                     check_same_thread=False)
    else:
        options = {}
        if "+pool" in urlparse(url).scheme:
            given = parse_qs(urlparse(url).query)
            options = {k: v for k, v in POOL_DEFAULTS.items() if k not in given}
        db = connect(url, autoconnect=False, **options)
    if is_sqlite(db):
        _serialise_writers(db)
    else:
        _outside_turns(db)
    db.bind(list(models), bind_refs=False, bind_backrefs=False)
    return db


_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLAC")


def _outside_turns(db: peewee.Database) -> None:
    """A database server's statements (and its pool's waits for a
    connection) run outside the calling thread's turn (common/turns.py): a
    round trip, or a row lock another transaction holds. SQLite's are kept
    in the turn: a local statement takes microseconds."""
    def outside(fn):
        def call(*args, **kwargs):
            with turns.outside():
                return fn(*args, **kwargs)
        return call

    for name in ("begin", "commit", "rollback", "execute_sql", "connect"):
        setattr(db, name, outside(getattr(db, name)))


def _serialise_writers(db: peewee.Database) -> None:
    """One writer at a time per SQLite database in this process, queued on a
    lock: a transaction holds it from BEGIN to COMMIT/ROLLBACK, a write
    outside a transaction for its statement. SQLite allows one writer at a
    time anyway; without this, the others poll its lock with sleeps of up to
    100 ms each (its busy handler), so that throughput fell as concurrency
    rose. Other processes sharing the file still wait through busy_timeout."""
    lock = threading.RLock()
    held = threading.local()
    begin, commit, rollback, execute_sql = db.begin, db.commit, db.rollback, db.execute_sql

    def release() -> None:
        if getattr(held, "depth", 0):
            held.depth -= 1
            lock.release()

    def locked_begin(*args, **kwargs):
        turns.acquire(lock)
        try:
            begin(*args, **kwargs)
        except BaseException:
            lock.release()
            raise
        held.depth = getattr(held, "depth", 0) + 1

    def locked_commit(*args, **kwargs):
        commit(*args, **kwargs)  # when it fails, the rollback that follows releases
        release()

    def locked_rollback(*args, **kwargs):
        try:
            rollback(*args, **kwargs)
        finally:
            release()

    def locked_execute_sql(sql, *args, **kwargs):
        if sql[:6].upper() in _WRITES and not db.in_transaction():
            with turns.holding(lock):
                return execute_sql(sql, *args, **kwargs)
        return execute_sql(sql, *args, **kwargs)

    db.begin, db.commit, db.rollback = locked_begin, locked_commit, locked_rollback
    db.execute_sql = locked_execute_sql


def open_database(url: str, models: Iterable[type[peewee.Model]], schema=None,
                  upgrade: bool = True) -> peewee.Database:
    """connect_database, then create the models' tables. With a schema
    (common/migrations.py) its migrations run instead (upgrade=False: the
    schema must be at the latest version already)."""
    models = list(models)
    db = connect_database(url, models)
    if schema is not None:
        from vmattach.common import migrations
        try:
            if upgrade:
                migrations.upgrade(db, schema)
            else:
                migrations.check(db, schema)
        except BaseException:
            close_database(db)
            raise
        return db
    with db.connection_context():
        db.create_tables(models, safe=True)
    return db


def close_database(db: peewee.Database) -> None:
    """Close this thread's connection and, for a pool, the idle ones."""
    db.close()
    if isinstance(db, PooledDatabase):
        db.close_idle()


def probe_database(url: str, timeout: float = 5.0) -> None:
    """Raise when a new connection to url cannot be opened or cannot read
    vmattach's schema table (the health service's probe). Never a pooled
    connection: a pool may keep one that still works on a SQLite file that
    is gone, or hand out one to a server that went away since."""
    if url.startswith("sqlite"):
        path = urlparse(url).path[1:]
        if not path or path == ":memory:":
            return
        # mode=rw: a missing file is an error, not a new empty database
        conn = sqlite3.connect(f"file:{quote(path)}?mode=rw", uri=True, timeout=timeout)
        try:
            conn.execute("SELECT count(*) FROM vmattach_schema").fetchone()
        finally:
            conn.close()
        return
    plain = url.replace("+pool", "", 1)
    db = connect(plain, autoconnect=False, connect_timeout=max(1, round(timeout)))
    try:
        db.connect()
        db.execute_sql("SELECT count(*) FROM vmattach_schema")
    finally:
        db.close()


def is_sqlite(db: peewee.Database) -> bool:
    return isinstance(db, peewee.SqliteDatabase)


def write_transaction(db: peewee.Database):
    """A transaction for a multi-row write. On SQLite it takes the write lock
    at BEGIN, so two writers wait for each other instead of failing."""
    if is_sqlite(db):
        return db.atomic("IMMEDIATE")
    return db.atomic()


def with_connection(method):
    """Decorate a method of an object with a `db` attribute: one connection
    for the duration of the call (one request), closed afterwards; nested
    calls reuse the open connection."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        db = self.db
        if not db.is_closed():
            return method(self, *args, **kwargs)
        db.connect()
        try:
            return method(self, *args, **kwargs)
        finally:
            db.close()

    return wrapper


class InSet(peewee.ColumnBase):
    """An expression with a subquery, for an UPDATE's SET clause (peewee
    writes only a subquery's alias there otherwise)."""

    def __init__(self, node):
        super().__init__()
        self.node = node

    def __sql__(self, ctx):
        with ctx.scope_normal():
            return ctx.sql(self.node)


def _placeholders(arity: int) -> list[str]:
    return [f"__p{i}" for i in range(arity)]


class Prepared:
    """A statement on the hot path whose SQL peewee builds once per kind of
    database; later runs only bind new values (building the SQL was the
    largest cost of a request in the profile). `build(*placeholders)` returns
    the query; each run passes the values for those placeholders, in order.

    rows()/first() give model instances; tuples()/one() give plain tuples
    (each column through its field's python_value, no model instance), or
    instances of `row` (a NamedTuple class) when given: what the hot path
    uses. execute() runs an UPDATE/DELETE/INSERT and gives the rows it
    changed (or, with a RETURNING clause, its tuples)."""

    def __init__(self, build: Callable[..., Any], arity: int, row: Callable[..., Any] | None = None):
        self.build = build
        self.arity = arity
        self.row = row
        self._model: type[peewee.Model] | None = None
        # the database's class -> SQL, converters, the value of each parameter
        self._sql: dict[type, tuple[str, list, list[int | _Constant]]] = {}

    def _compiled(self, values: tuple) -> tuple[type[peewee.Model], str, list, tuple]:
        if len(values) != self.arity:
            raise TypeError(f"expected {self.arity} values, got {len(values)}")
        if self._model is None:
            self._model = self.build(*_placeholders(self.arity)).model
        kind = type(self._model._meta.database)
        compiled = self._sql.get(kind)
        if compiled is None:
            placeholders = _placeholders(self.arity)
            query = self.build(*placeholders)
            sql, params = query.sql()
            # a parameter is a placeholder or a constant of the statement (a
            # status word); a value computed when building it (a time) is a mistake
            if any(not isinstance(p, str | int | bool | None) for p in params):
                raise ValueError(f"a value that is not a placeholder: {params}")
            columns = getattr(query, "_returning", None) or ()
            converters = [_converter(c) for c in columns]
            compiled = self._sql[kind] = (sql, converters, [
                placeholders.index(p) if p in placeholders else _Constant(p) for p in params])
        sql, converters, order = compiled
        return self._model, sql, converters, tuple(
            p.value if isinstance(p, _Constant) else values[p] for p in order)

    def rows(self, *values) -> list:
        model, sql, _, params = self._compiled(values)
        return list(model.raw(sql, *params))

    def first(self, *values):
        rows = self.rows(*values)
        return rows[0] if rows else None

    def tuples(self, *values) -> list:
        return self._fetch(*self._compiled(values))

    def _fetch(self, model: type[peewee.Model], sql: str, converters: list, params: tuple) -> list:
        cursor = model._meta.database.execute_sql(sql, params)
        out = []
        make = self.row
        for raw in cursor.fetchall():
            row = tuple(v if c is None or v is None else c(v)
                        for c, v in zip(converters, raw, strict=False))
            out.append(make(*row) if make is not None else row)
        return out

    def one(self, *values):
        rows = self.tuples(*values)
        return rows[0] if rows else None

    def execute(self, *values):
        """An UPDATE/DELETE: the number of rows changed; with RETURNING, the
        rows (as tuples() gives them)."""
        model, sql, converters, params = self._compiled(values)
        if converters:
            return self._fetch(model, sql, converters, params)
        return model._meta.database.execute_sql(sql, params).rowcount


@dataclasses.dataclass(frozen=True)
class _Constant:
    value: Any


def _converter(column) -> Callable[[Any], Any] | None:
    """The python_value of a selected field, or of the one field a scalar
    subquery selects (None for another expression)."""
    field = column
    if isinstance(field, peewee.Alias):
        field = field.node
    if isinstance(field, peewee.SelectQuery) and len(field._returning) == 1:
        field = field._returning[0]
    if isinstance(field, peewee.DateTimeField):
        return _datetime_value(field)
    if isinstance(field, peewee.Field):
        return field.python_value
    return None


def _datetime_value(field: peewee.DateTimeField) -> Callable[[Any], Any]:
    """A DateTimeField's python_value for the hot path: SQLite gives the text
    peewee wrote (str() of a naive datetime), which fromisoformat reads in a
    fraction of the time of peewee's strptime formats; anything else (a
    PostgreSQL datetime, a text in another form) goes to peewee's own."""
    slow = field.python_value

    def value(raw):
        if isinstance(raw, str):
            try:
                parsed = datetime.datetime.fromisoformat(raw)
            except ValueError:
                parsed = None
            if parsed is not None and parsed.tzinfo is None:
                return parsed
        return slow(raw)
    return value
