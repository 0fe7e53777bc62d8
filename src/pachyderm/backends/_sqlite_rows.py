"""Many rows in few statements: the multi-row forms of the SQLite writer's hot statements.

sqlite3's ``executemany`` releases the GIL around each row's step and takes it back before the
next row. While the event loop's thread runs Python, each of those takes waits up to the
interpreter's switch interval, so a transaction of a thousand rows waits for the event loop a
thousand times and the two threads take turns instead of running side by side. One statement
of many rows binds them all with the GIL held and steps once.

``run_rows`` cuts the rows into chunks of ``CHUNK`` rows, then powers of two for the rest, so
that each statement text is prepared once and stays in the connection's statement cache (the
writer's holds 256). ``CHUNK`` rows of the widest statement (10 values) stay under 999 bound
values, the limit of SQLite before 3.32.

The entities' updates are not here: as one ``UPDATE ... FROM (VALUES ...)`` per chunk they took
1.4 times the time of one ``UPDATE`` per row in SQLite itself (it materialises the values, then
joins), which cost the plain activations of a busy world more than the GIL's waits did (measured
in ``docs/performance.md``). The multi-row inserts and the deletes of consumed rows (OR terms,
each looked up by the primary key) take less time than a statement per row, besides.

The rows of one call are applied as if one after the other only when no two of them touch the
same stored row: that is how the writer's fast path uses them. Where two do, the row count
comes out short (a row is changed once per statement), the fast path sees that it did not
hold, and the slow path decides those writes one by one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Final

__all__ = ["CONSUME", "INSERT", "SEND", "RowStatement", "run_rows"]

CHUNK: Final = 64


class RowStatement:
    """A statement's one-row text, and its text for ``n`` rows (``many(n)``, None: no such form).

    Mutable state: ``sized`` (texts made so far, by row count), on the writer thread.
    """

    __slots__ = ("many", "one", "sized")

    def __init__(self, one: str, many: Callable[[int], str] | None) -> None:
        self.one = one
        self.many = many
        self.sized: dict[int, str] = {1: one}

    def text(self, n: int) -> str:
        text = self.sized.get(n)
        if text is None:
            assert self.many is not None
            text = self.sized[n] = self.many(n)
        return text


def run_rows(
    conn: sqlite3.Connection, statement: RowStatement, rows: Sequence[tuple[object, ...]]
) -> int:
    """Run ``statement`` for each of ``rows``; return how many stored rows they changed.

    Raises what sqlite3 raises (the transaction is the caller's to roll back).
    """
    if len(rows) == 1 or statement.many is None:
        return conn.executemany(statement.one, rows).rowcount
    changed = 0
    i, total = 0, len(rows)
    while i < total:
        left = total - i
        n = CHUNK if left >= CHUNK else 1 << (left.bit_length() - 1)
        params = [value for row in rows[i : i + n] for value in row]
        changed += conn.execute(statement.text(n), params).rowcount
        i += n
    return changed


def _values(width: int, n: int) -> str:
    row = "(" + ",".join("?" * width) + ")"
    return ",".join([row] * n)


def _inserts(n: int) -> str:
    return (
        "INSERT INTO entities (world, type, key, version, type_version, state)"  # noqa: S608 - placeholders only
        f" VALUES {_values(6, n)} ON CONFLICT DO NOTHING"
    )


_ROW: Final = "(world = ? AND sender_type = ? AND sender_key = ? AND version = ? AND idx = ?)"


def _consumes(n: int) -> str:
    # The rows as OR terms, not a row value IN (VALUES ...): SQLite looks each term up by the
    # primary key, where it would scan the table for the IN.
    terms = " OR ".join([_ROW] * n)
    return f"DELETE FROM outbox WHERE dead IS NULL AND ({terms})"  # noqa: S608 - placeholders only


def _sends(n: int) -> str:
    return (
        "INSERT INTO outbox (world, sender_type, sender_key, version, idx,"  # noqa: S608 - placeholders only
        f" to_type, to_key, due, name, message) VALUES {_values(10, n)}"
    )


#: A new entity's row (none changed if it is stored already).
INSERT: Final = RowStatement(
    "INSERT INTO entities (world, type, key, version, type_version, state)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
    _inserts,
)
#: A waiting outbox row, consumed (deleted).
CONSUME: Final = RowStatement(
    "DELETE FROM outbox WHERE world = ? AND sender_type = ? AND sender_key = ? AND version = ?"
    " AND idx = ? AND dead IS NULL",
    _consumes,
)
#: A new outbox row.
SEND: Final = RowStatement(
    "INSERT INTO outbox (world, sender_type, sender_key, version, idx, to_type, to_key, due,"
    " name, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    _sends,
)
