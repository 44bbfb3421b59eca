"""The unit tests that take a `database_url`, run again on the PostgreSQL
server on 127.0.0.1:5432 (tests/unit runs them on SQLite only, since it
needs nothing outside the process). Each test gets a fresh schema."""

from __future__ import annotations

import pytest

from tests.conftest import FreshPostgres, need_postgres
from tests.unit.test_controller_volumes import *  # noqa: F403 - the same tests, on PostgreSQL
from tests.unit.test_db_prepared import *  # noqa: F403

pytestmark = pytest.mark.postgres


@pytest.fixture
def database_url():
    need_postgres()
    fresh = FreshPostgres(schema=True)
    yield fresh.url
    fresh.drop()
