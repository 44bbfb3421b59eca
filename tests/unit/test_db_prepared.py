"""server.db.Prepared: the hot-path selects compiled once, on both databases."""

from __future__ import annotations

import pytest

from vmattach.common.db import Prepared, open_database
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
