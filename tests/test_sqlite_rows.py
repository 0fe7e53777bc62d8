"""The SQLite writer's multi-row statements: they change what one statement per row would."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from pachyderm.backends import Consume, Envelope, Memory, Outbox, SQLite, Write
from pachyderm.backends._sqlite_rows import CHUNK, CONSUME, INSERT, SEND, RowStatement, run_rows
from pachyderm.backends._sqlite_schema import _SCHEMA

W = "default"


def _database() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    for statement in _SCHEMA:
        conn.execute(statement)
    # Entities k0..k39 at version 1, outbox rows of senders s0..s39 at version 1 (idx 0).
    conn.executemany(
        "INSERT INTO entities (world, type, key, version, type_version, state)"
        " VALUES (?, 'T', ?, 1, 1, x'00')",
        [(W, f"k{i}") for i in range(40)],
    )
    conn.executemany(
        "INSERT INTO outbox (world, sender_type, sender_key, version, idx, to_type, to_key, due,"
        " name, message) VALUES (?, 'T', ?, 1, 0, 'T', 'k0', 0, NULL, x'01')",
        [(W, f"s{i}") for i in range(40)],
    )
    return conn


def _contents(conn: sqlite3.Connection) -> tuple[list[tuple[object, ...]], ...]:
    return (
        conn.execute("SELECT * FROM entities ORDER BY type, key").fetchall(),
        conn.execute("SELECT * FROM outbox ORDER BY sender_key, version, idx").fetchall(),
    )


# Rows of each statement over keys 0..79: half of them stored, half not (so some rows change
# nothing); `version` 1 is the stored one.
def _insert(i: int, _: int) -> tuple[object, ...]:
    return (W, "T", f"k{i}", 1, 1, b"made%d" % i)


def _consume(i: int, version: int) -> tuple[object, ...]:
    return (W, "T", f"s{i}", version, 0)


def _send(i: int, version: int) -> tuple[object, ...]:
    return (W, "T", f"n{i}", version, i % 3, "T", "k1", 0.0, None, b"m%d" % i)


CASES = [(INSERT, _insert), (CONSUME, _consume), (SEND, _send)]


def _both(case: int, rows: list[tuple[int, int]]) -> tuple[int, int, bool]:
    """Rows of a case run both ways on fresh databases: (count of `run_rows`, count one by
    one, whether the contents are the same)."""
    statement, make = CASES[case]
    values = [make(i, v) for i, v in rows]
    alone, together = _database(), _database()
    one_by_one = sum(alone.execute(statement.one, row).rowcount for row in values)
    counted = run_rows(together, statement, values)
    return counted, one_by_one, _contents(together) == _contents(alone)


@settings(max_examples=60, deadline=None)
@given(
    case=st.sampled_from(range(len(CASES))),
    rows=st.lists(
        st.tuples(st.integers(0, 79), st.integers(0, 2)),
        max_size=3 * CHUNK + 7,
        unique_by=lambda r: r[0],
    ),
)
def test_many_rows_change_what_one_statement_per_row_changes(
    case: int, rows: list[tuple[int, int]]
) -> None:
    counted, one_by_one, same = _both(case, rows)
    assert counted == one_by_one
    assert same


def test_rows_touching_one_stored_row_twice_in_one_statement_come_out_short() -> None:
    # s5's row consumed twice in one statement of 16 rows: it is deleted once, so the count is
    # short and the writer's fast path knows it did not hold.
    conn = _database()
    rows = [_consume(5, 1), *(_consume(i, 1) for i in range(6, 20)), _consume(5, 1)]
    assert run_rows(conn, CONSUME, rows) == len(rows) - 1
    assert run_rows(conn, INSERT, [_insert(50, 0), _insert(51, 0), _insert(50, 0)]) == 2


@settings(max_examples=60, deadline=None)
@given(
    case=st.sampled_from(range(2)),  # not SEND: a row sent twice is a constraint error
    rows=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 2)), max_size=2 * CHUNK + 9),
)
def test_when_every_row_counts_the_rows_changed_what_one_by_one_would(
    case: int, rows: list[tuple[int, int]]
) -> None:
    # With rows that may touch one stored row twice: a count of one per row (what the fast path
    # checks) means the same contents as one statement per row.
    counted, one_by_one, same = _both(case, rows)
    assert counted <= one_by_one
    if counted == len(rows):
        assert same


def test_a_statement_without_its_multi_row_form_runs_row_by_row() -> None:
    plain = RowStatement(CONSUME.one, None)
    alone, together = _database(), _database()
    rows = [_consume(i, 1) for i in range(30)]
    for row in rows:
        alone.execute(CONSUME.one, row)
    assert run_rows(together, plain, rows) == 30
    assert _contents(together) == _contents(alone)


async def test_a_group_of_hundreds_of_messages_commits_as_in_memory(tmp_path: Path) -> None:
    # One commit of 300 writes, each consuming the message the write before it sent and sending
    # one: more rows of each kind than one statement takes.
    memory, sqlite = Memory(), SQLite(tmp_path / "rows.db")
    for b in (memory, sqlite):
        await b.open(W)

    def message(i: int, version: int) -> Envelope:
        return Envelope("T", f"p{i}", version, 0, "T", f"p{i + 1}", 0.0, None, b"ball")

    def writes(round: int) -> list[Write]:
        out = []
        for i in range(300):
            consumes = (Consume(message(i - 1, round).id),) if i and round else ()
            outbox = Outbox(consumes=consumes, sends=(message(i, round + 1),))
            out.append(Write("T", f"p{i}", round, round + 1, 1, b"%d" % round, (), outbox))
        return out

    try:
        for round in range(3):
            group = writes(round)
            assert await asyncio.gather(sqlite.commit(group), memory.commit(group)) == [
                [True] * 300,
                [True] * 300,
            ]
        refs = [("T", f"p{i}") for i in range(300)]
        assert await sqlite.load_many(refs) == await memory.load_many(refs)
        assert sqlite.outbox_counts() == memory.outbox_counts()
        assert sqlite.statistics()["conflicts"] == 0
    finally:
        for b in (memory, sqlite):
            await b.aclose()
