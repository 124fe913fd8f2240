"""The one way Lethe opens a database: SQLite made durable, PostgreSQL through psycopg.

Torch-free on purpose: the deletion API and the console open their stores with
this, and a restarted API must answer within a second, not after importing the
model stack.
"""

from __future__ import annotations

import sqlite3

from sqlalchemy import Engine, MetaData, event, inspect, text
from sqlmodel import create_engine


class MigrationError(RuntimeError):
    """An older database needs a change this version cannot make in place."""


def database_engine(url: str) -> Engine:
    """SQLite gets WAL and full sync (a commit survives power loss); others as given."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(connection: sqlite3.Connection, _record: object) -> None:
    cursor = connection.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON", "busy_timeout=10000"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def add_missing_columns(engine: Engine, metadata: MetaData) -> list[str]:
    """Upgrade an older database in place: add the columns a newer Lethe put in its tables.

    Only additions, and only of nullable columns (every column added after a
    release is declared so); nothing is dropped, renamed or rewritten. A
    missing column that may not be null is a change this cannot make, and is
    refused with its name rather than half applied.
    """
    inspector = inspect(engine)
    missing = [
        (table, column)
        for table in metadata.sorted_tables
        if inspector.has_table(table.name)
        for present in [{c["name"] for c in inspector.get_columns(table.name)}]
        for column in table.columns
        if column.name not in present
    ]
    blocked = [f"{t.name}.{c.name}" for t, c in missing if not c.nullable]
    if blocked:
        raise MigrationError(f"the database needs a migration this version cannot do: {blocked}")
    with engine.begin() as connection:
        for table, column in missing:
            kind = column.type.compile(dialect=engine.dialect)
            connection.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
    return [f"{t.name}.{c.name}" for t, c in missing]
