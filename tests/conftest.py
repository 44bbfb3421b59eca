"""Fixtures shared by the whole suite: private state directories, a private
tgtd, and vmattach servers started in-process on port 0."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.support.tgtd import TgtDaemon
from vmattach.clients.serve import Running, start
from vmattach.common.config import Settings
from vmattach.common.turns import TIMEOUTS

# `make test` sets this: there a missing real stack is a failure, not a skip.
REQUIRE_REALSTACK = os.environ.get("VMATTACH_REQUIRE_REALSTACK") == "1"


@pytest.fixture(autouse=True)
def no_call_waits_out_its_turn(request):
    """Every test: no call of a server in this process waited out its turn's
    patience and ran without one, the sign of a wait made in the turn
    (common/turns.py). A test that makes one on purpose is marked
    turn_timeout."""
    if request.node.get_closest_marker("turn_timeout"):
        yield
        return
    before = TIMEOUTS._value.get()
    yield
    waited = TIMEOUTS._value.get() - before
    assert not waited, f"{waited:.0f} call(s) waited out their turn (vmattach_turn_timeouts_total)"


def realstack_missing(*commands: str) -> str | None:
    for command in commands:
        if shutil.which(command) is None:
            return f"{command} is not installed (run scripts/setup-host.sh)"
    if "virsh" in commands:
        proc = subprocess.run(["virsh", "-c", "qemu:///system", "version"],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            return "libvirtd is not reachable on qemu:///system (run scripts/setup-host.sh)"
    return None


def need(*commands: str) -> None:
    reason = realstack_missing(*commands)
    if reason:
        if REQUIRE_REALSTACK:
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def tgtd(tmp_path):
    """A tgtd of this test only, on a free portal port and a private control port."""
    need("tgtd", "tgtadm")
    daemon = TgtDaemon(log_path=tmp_path / "tgtd.log").start()
    yield daemon
    daemon.stop()


def make_settings(tmp_path, **overrides) -> Settings:
    state = tmp_path / "state"
    state.mkdir(parents=True, exist_ok=True)
    # tests not about authentication run with --auth none (loopback only);
    # tests/integration/test_security.py runs the secure default
    # and stop without the shutdown delay (tests/integration/test_health.py has it)
    values = dict(listen="127.0.0.1:0", state_dir=str(state), log_level="WARNING", auth="none",
                  shutdown_delay=0.0)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def serve():
    """serve(settings) starts vmattach in this process; stopped after the test."""
    started: list[Running] = []

    def _serve(settings: Settings, **kw) -> Running:
        running = start(settings, **kw)
        started.append(running)
        return running

    yield _serve
    for running in reversed(started):
        running.stop(grace=1)


@pytest.fixture
def controller(tmp_path, tgtd, serve):
    """A Controller on a real tgtd; .address, .settings, .running, .tgtd."""
    settings = make_settings(tmp_path, services="controller", tgt_portal=tgtd.portal,
                             tgt_control_port=tgtd.control_port)
    running = serve(settings)

    class C:
        pass
    c = C()
    c.settings, c.running, c.tgtd = settings, running, tgtd
    c.address = f"127.0.0.1:{running.port}"
    return c


# -- databases: every repository test runs on SQLite and on PostgreSQL ------------------------

PG_HOST = os.environ.get("VMATTACH_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("VMATTACH_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("VMATTACH_TEST_PG_USER", "postgres")
# postgresql (a connection per request) or postgres+pool (peewee's pool)
PG_SCHEME = os.environ.get("VMATTACH_TEST_PG_SCHEME", "postgresql")
PG_SCHEMA_DB = "test"  # where the per-test schemas are made
PG_UNREACHABLE = f"PostgreSQL not reachable on {PG_HOST}:{PG_PORT}"
_pg_state: dict = {}


def _pg_admin_connection():
    """An autocommit connection to the server's maintenance database, or None."""
    import psycopg2
    for dbname in ("postgres", "test"):
        try:
            conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname,
                                    connect_timeout=3)
        except psycopg2.OperationalError as exc:
            _pg_state["error"] = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            continue
        conn.autocommit = True
        return conn
    return None


def postgres_reachable() -> bool:
    if "reachable" not in _pg_state:
        conn = _pg_admin_connection()
        _pg_state["reachable"] = conn is not None
        if conn is not None:
            conn.close()
    return _pg_state["reachable"]


def need_postgres() -> None:
    """Skip (also under `make test`: PostgreSQL is optional) when the server is absent."""
    _pg_state.setdefault("wanted", 0)
    _pg_state["wanted"] += 1
    if not postgres_reachable():
        detail = _pg_state.get("error")
        pytest.skip(PG_UNREACHABLE + (f" ({detail})" if detail else ""))
    _pg_state["ran"] = _pg_state.get("ran", 0) + 1


class FreshPostgres:
    """A new, uniquely named PostgreSQL database on the test server (its URL
    in .url), dropped by drop(). With schema=True, a new schema in the
    existing database `test` instead, the URL's search_path pointing at it
    (a hundred times quicker to make than a database: the suite makes one per
    test)."""

    def __init__(self, prefix: str = "vmattach_test", schema: bool = False):
        import uuid
        self.name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        self.schema = schema
        self.dbname = PG_SCHEMA_DB if schema else self.name
        if schema:
            conn = self._admin(PG_SCHEMA_DB)
            statement = f'CREATE SCHEMA "{self.name}"'
        else:
            conn = _pg_admin_connection()
            statement = f'CREATE DATABASE "{self.name}"'
        if conn is None:
            pytest.skip(PG_UNREACHABLE)
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()
        base = f"{PG_SCHEME}://{PG_USER}@{PG_HOST}:{PG_PORT}/{self.dbname}"
        # application_name: drop() finds the connections left open by name
        self.url = (f"{base}?application_name={self.name}&options=-csearch_path%3D{self.name}"
                    if schema else f"{base}?application_name={self.name}")

    @staticmethod
    def _admin(dbname: str):
        import psycopg2
        try:
            conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname,
                                    connect_timeout=3)
        except psycopg2.OperationalError:
            return None
        conn.autocommit = True
        return conn

    def connect(self):
        """An autocommit psycopg2 connection to it (search_path set)."""
        import psycopg2
        options = f"-csearch_path={self.name}" if self.schema else None
        conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=self.dbname,
                                connect_timeout=5, options=options)
        conn.autocommit = True
        return conn

    def drop(self) -> None:
        conn = self._admin(PG_SCHEMA_DB) if self.schema else _pg_admin_connection()
        if conn is None:
            return
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE (datname = %s OR application_name = %s)"
                            " AND pid <> pg_backend_pid()", (self.name, self.name))
                if self.schema:
                    cur.execute(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')
                else:
                    cur.execute(f'DROP DATABASE IF EXISTS "{self.name}"')
        finally:
            conn.close()


@pytest.fixture
def postgres_database():
    """A fresh PostgreSQL database (FreshPostgres: .url, .name, .connect());
    skips when the server is not reachable."""
    need_postgres()
    fresh = FreshPostgres()
    yield fresh
    fresh.drop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request, tmp_path):
    """A fresh, empty database's URL: a SQLite file of this test, or a new
    schema of its own on the PostgreSQL server on 127.0.0.1:5432 (dropped
    afterwards; the test is skipped when the server is not reachable)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'vmattach-test.db'}"
        return
    need_postgres()
    fresh = FreshPostgres(schema=True)
    yield fresh.url
    fresh.drop()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say whether the PostgreSQL variants ran (`make test` runs them when the
    server is there and skips them, saying so, when it is not)."""
    wanted = _pg_state.get("wanted", 0)
    if not wanted:
        return
    ran = _pg_state.get("ran", 0)
    if ran:
        terminalreporter.write_line(
            f"PostgreSQL: {ran} test(s) ran on a fresh database on {PG_HOST}:{PG_PORT}")
    else:
        terminalreporter.write_line(
            f"PostgreSQL: {wanted} test(s) SKIPPED - {PG_UNREACHABLE}", yellow=True, bold=True)
