"""tests/support/sql_counter: each statement counted under its own table (the
bench's SQL per attach by kind)."""

from __future__ import annotations

import pytest

from tests.support.sql_counter import _kind


@pytest.mark.parametrize("sql, kind", [
    ('UPDATE "controller_volume" SET "status" = CASE WHEN EXISTS(SELECT "t2"."id" FROM'
     ' "controller_volume_attachment" AS "t2") THEN ? END WHERE ("id" = ?)',
     "UPDATE controller_volume"),
    ('INSERT INTO "block_device_mapping" ("a") SELECT 1 FROM "servers_server"',
     "INSERT block_device_mapping"),
    ('SELECT "t1"."id" FROM "servers_server" AS "t1" WHERE EXISTS(SELECT 1 FROM "x")',
     "SELECT servers_server"),
    ('DELETE FROM "controller_export" WHERE ("tid" = ?) RETURNING "tid"', "DELETE controller_export"),
    ("BEGIN IMMEDIATE", "BEGIN"),
    ("COMMIT", "COMMIT"),
])
def test_a_statement_is_counted_under_the_table_it_changes_or_reads(sql, kind):
    assert _kind(sql) == kind
