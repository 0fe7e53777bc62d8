"""The SQLite backend's file layout: the versioned schema, and the migrations of older files."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from pachyderm import Unavailable
from pachyderm.backends import (
    Consume,
    Envelope,
    Outbox,
    Receipt,
    SQLite,
    Stored,
    StoredEvent,
    Write,
)

from .test_sqlite import opened, w


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "world.db"


async def test_data_survives_reopening_and_the_schema_is_versioned(db: Path) -> None:
    backend = SQLite(db)
    async with opened(backend):
        assert await backend.commit([w("a", 0, 1, b"kept")]) == [True]
    async with opened(backend):  # the same object may be opened again after aclose
        assert await backend.load_many([("T", "a")]) == [Stored(1, 1, b"kept")]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert _schema_version(conn) == 3
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute(
            "SELECT world, type, key, version, snapshot FROM entities"
        ).fetchall() == [("default", "T", "a", 1, None)]
    assert {"entities", "receipts", "outbox", "events"} <= _tables(db)


# The tables of schema version 1 (the release before the outbox), as that release made them.
SCHEMA_1 = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value) WITHOUT ROWID",
    "CREATE TABLE entities ("
    " world TEXT NOT NULL, type TEXT NOT NULL, key TEXT NOT NULL,"
    " version INTEGER NOT NULL, type_version INTEGER NOT NULL, state BLOB NOT NULL,"
    " PRIMARY KEY (world, type, key)) WITHOUT ROWID",
    "CREATE TABLE receipts ("
    " world TEXT NOT NULL, type TEXT NOT NULL, key TEXT NOT NULL, id TEXT NOT NULL,"
    " version INTEGER NOT NULL, result BLOB NOT NULL, at REAL NOT NULL,"
    " PRIMARY KEY (world, type, key, id)) WITHOUT ROWID",
    "CREATE INDEX receipts_by_time ON receipts (world, at)",
    "INSERT INTO meta (key, value) VALUES ('schema_version', 1)",
    "INSERT INTO entities VALUES ('default', 'T', 'a', 3, 2, x'6f6c64')",
    "INSERT INTO entities VALUES ('other', 'T', 'b', 1, 1, x'')",
    "INSERT INTO receipts VALUES ('default', 'T', 'a', 'r', 3, x'6f6b', 1.5)",
)


# The tables of schema version 2 (the release before the event logs), as that release made them:
# those of version 1 and the outbox; a waiting message, a waiting named timer, a dead letter.
SCHEMA_2 = (
    *SCHEMA_1[:4],
    "CREATE TABLE outbox ("
    " world TEXT NOT NULL, sender_type TEXT NOT NULL, sender_key TEXT NOT NULL,"
    " version INTEGER NOT NULL, idx INTEGER NOT NULL, to_type TEXT NOT NULL, to_key TEXT NOT NULL,"
    " due REAL NOT NULL, name TEXT NULL, message BLOB NOT NULL, dead TEXT NULL,"
    " PRIMARY KEY (world, sender_type, sender_key, version, idx)) WITHOUT ROWID",
    "CREATE INDEX outbox_timers_by_due"
    " ON outbox (world, due, sender_type, sender_key, version, idx)"
    " WHERE dead IS NULL AND due > 0",
    "CREATE UNIQUE INDEX outbox_by_name"
    " ON outbox (world, sender_type, sender_key, name) WHERE name IS NOT NULL AND dead IS NULL",
    "INSERT INTO meta (key, value) VALUES ('schema_version', 2)",
    *SCHEMA_1[5:],
    "INSERT INTO outbox VALUES ('default', 'T', 'a', 3, 0, 'T', 'b', 0.0, NULL, x'6d', NULL)",
    "INSERT INTO outbox VALUES ('default', 'T', 'a', 3, 1, 'T', 'a', 9.5, 't', x'', NULL)",
    "INSERT INTO outbox VALUES ('default', 'T', 'a', 2, 0, 'T', 'b', 0.0, NULL, x'', 'boom')",
)


def _tables(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}


def _schema_version(conn: sqlite3.Connection) -> object:
    (value,) = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return value


def _columns(path: Path, table: str) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [row[1] for row in conn.execute("SELECT * FROM pragma_table_info(?)", (table,))]


def _create(path: Path, statements: Sequence[str]) -> None:
    """A file as an older version of the backend left it."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for statement in statements:
            conn.execute(statement)
        conn.commit()


async def test_a_schema_version_1_file_is_migrated_on_open(db: Path) -> None:
    _create(db, SCHEMA_1)
    assert "outbox" not in _tables(db)
    assert "snapshot" not in _columns(db, "entities")
    async with opened(SQLite(db)) as b:
        assert await b.load_many([("T", "a"), ("T", "b")]) == [Stored(3, 2, b"old"), None]
        assert await b.read_events("T", "a") == []
        assert await b.receipt("T", "a", "r") == Receipt("r", 3, b"ok", 1.5)
        assert b.outbox_counts() == {"messages": 0, "timers": 0, "dead": 0}
        assert await b.due(float("inf")) == []
        send = Envelope("T", "a", 4, 0, "T", "b", 0.0, None, b"m")
        write = Write("T", "a", 3, 4, 2, b"new", outbox=Outbox(sends=(send,)))
        assert await b.commit([write]) == [True]
        assert await b.due(0.0) == [send]
        assert b.outbox_counts() == {"messages": 1, "timers": 0, "dead": 0}
    assert {"outbox", "outbox_timers_by_due", "outbox_by_name", "events"} <= _tables(db)
    assert _columns(db, "entities")[-2:] == ["snapshot", "log"]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert _schema_version(conn) == 3
    async with opened(SQLite(db), "other") as b:  # the other world's rows are intact too
        assert await b.load_many([("T", "b")]) == [Stored(1, 1, b"")]
    async with opened(SQLite(db)) as b:  # migrated once: opens as version 3, outbox kept
        assert await b.load_many([("T", "a")]) == [Stored(4, 2, b"new")]
        assert b.outbox_counts() == {"messages": 1, "timers": 0, "dead": 0}


async def test_a_schema_version_2_file_is_migrated_on_open(db: Path) -> None:
    _create(db, SCHEMA_2)
    assert "events" not in _tables(db)
    assert "snapshot" not in _columns(db, "entities")
    message = Envelope("T", "a", 3, 0, "T", "b", 0.0, None, b"m")
    timer = Envelope("T", "a", 3, 1, "T", "a", 9.5, "t", b"")
    async with opened(SQLite(db)) as b:
        # A row of the old layout is a state row: snapshot None (0 would not be equal).
        assert await b.load_many([("T", "a"), ("T", "b")]) == [Stored(3, 2, b"old", None), None]
        assert await b.receipt("T", "a", "r") == Receipt("r", 3, b"ok", 1.5)
        assert b.outbox_counts() == {"messages": 1, "timers": 1, "dead": 1}
        assert await b.due(float("inf")) == [message, timer]
        assert await b.read_events("T", "a") == []
        # The old rows keep working (a consume, a named timer replaced) beside an event log.
        replaced = Envelope("T", "a", 4, 0, "T", "a", 7.0, "t", b"again")
        outbox = Outbox(sends=(replaced,), consumes=(Consume(message.id),))
        events = Write("E", "e", 0, 2, 1, b"E2", events=(b"e1", b"e2"), snapshot=True)
        assert await b.commit([Write("T", "a", 3, 4, 2, b"new", (), outbox), events]) == [True] * 2
        assert await b.due(float("inf")) == [replaced]
    assert {"events", "outbox", "outbox_by_name", "receipts_by_time", "entities_by_log"} <= _tables(
        db
    )
    assert _columns(db, "entities")[-2:] == ["snapshot", "log"]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert _schema_version(conn) == 3
    async with opened(SQLite(db)) as b:  # migrated once: opens as version 3, all of it kept
        rows = [Stored(4, 2, b"new", None), Stored(2, 1, b"E2", 2)]
        assert await b.load_many([("T", "a"), ("E", "e")]) == rows
        assert await b.read_events("E", "e") == [StoredEvent(1, 1, b"e1"), StoredEvent(2, 1, b"e2")]
        assert b.outbox_counts() == {"messages": 0, "timers": 1, "dead": 1}


@pytest.mark.parametrize("stored", [4, "2", "3", 3.0, None])
async def test_a_newer_or_unknown_schema_version_is_refused_untouched(
    db: Path, stored: object
) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        for statement in SCHEMA_1[:4]:
            conn.execute(statement)
        conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (stored,))
        conn.commit()
    with pytest.raises(Unavailable, match="schema_version"):
        await SQLite(db).open("default")
    assert "outbox" not in _tables(db)
    assert "events" not in _tables(db)
    assert "snapshot" not in _columns(db, "entities")
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT value FROM meta").fetchall() == [(stored,)]
