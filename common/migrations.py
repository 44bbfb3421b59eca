"""Versioned schema migrations for every database vmattach keeps.

Each service's tables form a component ("controller", "servers") with a
version recorded in the table `vmattach_schema` of its database (two
components may share one database). Version 1 is the schema of the first
release, before versions were recorded. A database with none of a
component's tables gets the current models and the latest version at once;
one with the tables but no version row is at version 1; the migrations
above its version then run in order, each in the same transaction as the
new version row, so a failed upgrade leaves the database as it was (SQLite
and PostgreSQL both run ALTER TABLE inside a transaction).

A change to a model's table always comes with a Migration here; the test
tests/integration/test_upgrade.py checks that a version-1 database upgraded
has the columns and indexes of a database created from the models.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import peewee

from vmattach.common.db import is_sqlite, utcnow, write_transaction
from vmattach.common.errors import FailedPrecondition

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[peewee.Database], None]


@dataclass(frozen=True)
class Schema:
    """A component's models and the migrations that lead to them."""
    component: str
    models: Sequence[type[peewee.Model]]
    migrations: Sequence[Migration] = field(default_factory=tuple)

    @property
    def latest(self) -> int:
        return max([1, *(m.version for m in self.migrations)])


class SchemaVersion(peewee.Model):
    component = peewee.CharField(primary_key=True, max_length=64)
    version = peewee.IntegerField()
    updated_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        database = None
        table_name = "vmattach_schema"


def _bind(db: peewee.Database) -> type[SchemaVersion]:
    # a subclass per database: SchemaVersion itself stays unbound
    class Bound(SchemaVersion):
        class Meta:
            database = db
            table_name = "vmattach_schema"
    return Bound


def _lock(db: peewee.Database, component: str) -> None:
    """Inside a transaction: one upgrade of a component at a time (on SQLite
    the IMMEDIATE transaction holds the database's write lock already)."""
    if not is_sqlite(db):
        db.execute_sql("SELECT pg_advisory_xact_lock(%s)",
                       (zlib.crc32(f"vmattach-schema-{component}".encode()),))


def tables(db: peewee.Database) -> set[str]:
    """The tables of the database (PostgreSQL: of the current schema, which
    peewee's get_tables does not look at)."""
    if is_sqlite(db):
        return set(db.get_tables())
    cursor = db.execute_sql("SELECT tablename FROM pg_catalog.pg_tables"
                            " WHERE schemaname = current_schema()")
    return {name for name, in cursor.fetchall()}


def columns(db: peewee.Database, table: str) -> set[str]:
    if is_sqlite(db):
        return {c.name for c in db.get_columns(table)}
    cursor = db.execute_sql("SELECT column_name FROM information_schema.columns"
                            " WHERE table_schema = current_schema() AND table_name = %s", (table,))
    return {name for name, in cursor.fetchall()}


def add_column(db: peewee.Database, table: str, name: str, column: peewee.Field) -> bool:
    """ALTER TABLE ... ADD COLUMN unless the column is there (a table created
    from newer models by hand); True when it was added."""
    if name in columns(db, table):
        return False
    from playhouse.migrate import SchemaMigrator, migrate
    migrate(SchemaMigrator.from_database(db).add_column(table, name, column))
    return True


def current_version(db: peewee.Database, schema: Schema) -> int | None:
    """The recorded version; 1 when the tables predate versions; None when
    the database has none of the component's tables."""
    model = _bind(db)
    tables_now = tables(db)
    if model._meta.table_name in tables_now:
        row = model.get_or_none(model.component == schema.component)
        if row is not None:
            return row.version
    if any(m._meta.table_name in tables_now for m in schema.models):
        return 1
    return None


def upgrade(db: peewee.Database, schema: Schema) -> tuple[int | None, int]:
    """Bring the component's tables to the latest version; returns (the
    version found, the version now). Safe to run by several processes at once."""
    model = _bind(db)
    with db.connection_context():
        db.create_tables([model], safe=True)
        with write_transaction(db):
            _lock(db, schema.component)
            found = current_version(db, schema)
            if found is not None and found > schema.latest:
                raise FailedPrecondition(
                    f"the {schema.component} database has schema version {found}, newer than"
                    f" this vmattach knows ({schema.latest}); run a newer vmattach",
                    reason="SCHEMA_TOO_NEW")
            if found is None:
                db.create_tables(list(schema.models))
            else:
                for migration in sorted(schema.migrations, key=lambda m: m.version):
                    if migration.version > found:
                        LOG.warning("%s database: migrating to version %d: %s", schema.component,
                                    migration.version, migration.description)
                        migration.apply(db)
                # tables that a later version added without a migration of their own
                db.create_tables(list(schema.models), safe=True)
            (model.insert(component=schema.component, version=schema.latest, updated_at=utcnow())
             .on_conflict(conflict_target=[model.component],
                          preserve=[model.version, model.updated_at]).execute())
    return found, schema.latest


def check(db: peewee.Database, schema: Schema) -> None:
    """Without upgrading: the component's tables must be at the latest
    version (a fresh database gets its tables)."""
    with db.connection_context():
        found = current_version(db, schema)
    if found is None:
        upgrade(db, schema)
    elif found != schema.latest:
        raise FailedPrecondition(
            f"the {schema.component} database has schema version {found}; this vmattach needs"
            f" {schema.latest}: run `vmattach db upgrade` (or start without --db-upgrade=false)",
            reason="SCHEMA_OUT_OF_DATE")
