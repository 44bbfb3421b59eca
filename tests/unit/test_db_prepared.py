"""server.db.Prepared: the hot-path selects compiled once, on both databases."""

from __future__ import annotations

import datetime
import threading
import time

import pytest

from vmattach.common.db import Prepared, open_database, utcnow, write_transaction
from vmattach.controller.models import MODELS, Volume

BY_NAME_AND_SIZE = Prepared(lambda n, s: Volume.select().where(
    (Volume.name == n) & (Volume.size_gb == s)).order_by(Volume.id), 2)


def test_prepared_select_gives_what_peewee_gives(database_url):
    db = open_database(database_url, MODELS)
    with db.connection_context():
        for i, size in enumerate([1, 2, 2]):
            Volume.create(id=f"v{i}", name=f"n{i}", size_gb=size, status="available",
                          path=f"/p{i}")
        for name, size in [("n1", 2), ("n2", 2), ("n0", 1), ("n0", 2), ("nope", 1)]:
            expected = list(Volume.select().where((Volume.name == name)
                                                  & (Volume.size_gb == size)))
            assert [v.id for v in BY_NAME_AND_SIZE.rows(name, size)] == [v.id for v in expected]
        assert BY_NAME_AND_SIZE.first("n1", 2).size_gb == 2
        assert BY_NAME_AND_SIZE.first("nope", 1) is None
        with pytest.raises(TypeError):
            BY_NAME_AND_SIZE.rows("n1")
    db.close()


BY_ID = Prepared(lambda v: Volume.select(Volume.id, Volume.size_gb, Volume.multiattach,
                                         Volume.created_at).where(Volume.id == v), 1)
RESIZE = Prepared(lambda v, size, now: Volume.update(size_gb=size, updated_at=now)
                  .where((Volume.id == v) & (Volume.status == "available"))
                  .returning(Volume.id, Volume.size_gb), 3)
DROP = Prepared(lambda v: Volume.delete().where(Volume.id == v), 1)


def test_prepared_tuples_and_writes_give_what_peewee_gives(database_url):
    """Rows as tuples, each column as its field gives it; an UPDATE ...
    RETURNING gives the rows it changed (none when its condition fails); a
    DELETE gives how many it removed; constants of the statement stay."""
    db = open_database(database_url, MODELS)
    with db.connection_context():
        Volume.create(id="v1", name="n1", size_gb=1, status="available", path="/p1")
        Volume.create(id="v2", name="n2", size_gb=2, status="in-use", path="/p2")
        [(vid, size, multi, created)] = BY_ID.tuples("v1")
        model = Volume.get_by_id("v1")
        assert (vid, size, multi, created) == ("v1", 1, False, model.created_at)
        assert isinstance(created, datetime.datetime) and multi is False
        assert BY_ID.one("nope") is None
        assert RESIZE.execute("v1", 5, str(utcnow())) == [("v1", 5)]
        assert RESIZE.execute("v2", 5, str(utcnow())) == []  # in-use: no change
        assert Volume.get_by_id("v2").size_gb == 2
        assert DROP.execute("v1") == 1 and DROP.execute("v1") == 0


def test_a_value_computed_when_the_statement_is_built_is_refused(database_url):
    stamped = Prepared(lambda v: Volume.update(updated_at=utcnow()).where(Volume.id == v), 1)
    db = open_database(database_url, MODELS)
    with db.connection_context(), pytest.raises(ValueError):
        stamped.execute("v1")


def test_sqlite_writers_of_a_process_take_turns_and_a_failed_one_lets_go(database_url):
    """A write transaction that fails (rolled back) or whose commit fails
    releases the process's writer turn: the next writer does not wait for it."""
    db = open_database(database_url, MODELS)
    with db.connection_context():
        with pytest.raises(RuntimeError), write_transaction(db):
            Volume.create(id="gone", name="gone", size_gb=1, status="available", path="/g")
            raise RuntimeError("undone")
        assert Volume.get_or_none(Volume.id == "gone") is None
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            with db.connection_context():
                for i in range(20):
                    with write_transaction(db):
                        Volume.create(id=f"w{k}-{i}", name=f"w{k}-{i}", size_gb=1,
                                      status="available", path="/w")
                    DROP.execute(f"w{k}-{i}") if i % 2 else None
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a writer is stuck on the writer lock"
    assert errors == []
    with db.connection_context():
        assert Volume.select().where(Volume.id.startswith("w")).count() == 6 * 10
    db.close()


@pytest.mark.parametrize("stored", ["2026-12-04 10:00:00.123456", "2026-12-04 10:00:00",
                                    "2026-12-04", "2026-12-04T10:00:00+01:00"])
def test_a_time_read_as_a_tuple_is_what_the_model_reads(database_url, stored):
    """The hot path's own reading of a time gives what peewee gives, for every
    form a time can have: in SQLite's file, text in peewee's form or another
    one, even text that is no time at all (peewee gives it as it is); on
    PostgreSQL, a timestamp made of each of these texts."""
    db = open_database(database_url, MODELS)
    texts = [stored, "not a time"] if database_url.startswith("sqlite") else [stored]
    with db.connection_context():
        Volume.create(id="v1", name="n1", size_gb=1, status="available", path="/p1")
        for text in texts:
            db.execute_sql(f"UPDATE controller_volume SET created_at = {db.param}"
                           " WHERE id = 'v1'", (text,))
            [(_, _, _, created)] = BY_ID.tuples("v1")
            expected = Volume.get_by_id("v1").created_at
            assert created == expected and type(created) is type(expected)
