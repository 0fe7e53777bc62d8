"""The SQLite backend's event logs: where the events of event-sourced entities are stored.

An event-sourced entity's row holds the id of its log (``entities.log``, an integer given when
the row is made, never changed, never reused; NULL for a state entity), and its events are the
rows ``(log, seq)`` of ``events``. Keying events by a small integer rather than by ``(world,
type, key)`` makes their B-tree several times smaller, so that appending an event to each of a
thousand entities touches fewer pages than updating their rows would: an event costs one B-tree
insert, and its entity's row is written only when it is made and at its snapshots. The
version of an event-sourced entity is the seq of its last event (``VERSION``).

The writer thread keeps the ids it has seen (``Logs.known``, bounded): an id never changes once
committed, so the cache can only miss, never be wrong; ids given in a transaction join it only
once that transaction committed.
"""

from __future__ import annotations

import sqlite3
from collections import OrderedDict
from typing import Final

from ._base import Write
from ._sqlite_schema import Database

__all__ = ["APPEND", "CREATE", "SNAPSHOT", "VERSION", "Logs"]

#: The version of a row, as a column of `Database.select`: for an event-sourced entity's row,
#: the seq of its last event, from the primary key of `events`.
VERSION: Final = (
    "CASE WHEN log IS NULL THEN version ELSE coalesce((SELECT max(e.seq) FROM events AS e"
    " WHERE e.log = entities.log), version) END"
)
#: The row of a new event-sourced entity (with its snapshot, if its first write has one).
CREATE: Final = (
    "INSERT INTO entities (world, type, key, version, type_version, state, snapshot, log)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
SNAPSHOT: Final = (
    "UPDATE entities SET version = ?, type_version = ?, state = ?, snapshot = ?"
    " WHERE world = ? AND type = ? AND key = ? AND log IS NOT NULL"
)
# The primary key (log, seq) is the fence: a seq is stored once. (A conditional `INSERT ...
# SELECT` from `events` could also check the seq before, but SQLite then copies the selected
# rows to a temporary table first: twice the cost of a plain insert.)
APPEND: Final = (
    "INSERT INTO events (log, seq, type_version, event) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
_FENCED: Final = "SELECT 1 FROM events WHERE log = ? AND seq > ? LIMIT 1"
#: The most log ids the writer remembers.
_KNOWN: Final = 100_000


class Logs:
    """The log ids of one world's event-sourced entities, for the writer thread.

    Mutable state, writer thread only: ``known`` (ids committed), ``fresh`` (ids given in the
    transaction in progress), ``next`` (the next id to give).
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        # Oldest first; an OrderedDict, so that dropping the oldest is O(1).
        self.known: OrderedDict[tuple[str, str], int] = OrderedDict()
        self.fresh: dict[tuple[str, str], int] = {}
        self.next = 1

    def setup(self, conn: sqlite3.Connection) -> None:
        """After connecting: ids continue after the largest one in the file (every world's)."""
        (largest,) = conn.execute("SELECT max(log) FROM entities").fetchone()
        self.next = (largest or 0) + 1
        self.known.clear()
        self.fresh.clear()

    def begin(self) -> None:
        """A transaction starts (or starts again): the ids given so far were not committed."""
        self.fresh.clear()

    def committed(self) -> None:
        """The transaction committed: its ids are known from now on."""
        known = self.known
        known.update(self.fresh)
        self.fresh.clear()
        while len(known) > _KNOWN:
            known.popitem(last=False)  # the oldest first

    def give(self, ref: tuple[str, str]) -> int:
        """A new id for the log of ``ref`` (never given before, in this file)."""
        log = self.next
        self.next += 1
        self.fresh[ref] = log
        return log

    def ids(
        self, conn: sqlite3.Connection, refs: list[tuple[str, str]]
    ) -> dict[tuple[str, str], int]:
        """The log ids of those refs that have one (stored, or given in this transaction)."""
        out: dict[tuple[str, str], int] = {}
        missing = []
        known, fresh = self.known, self.fresh
        for ref in refs:
            log = fresh.get(ref) or known.get(ref)
            if log is None:
                missing.append(ref)
            else:
                out[ref] = log
        if missing:
            for type_name, key, log in self.db.select(conn, missing, "log"):
                if log is not None:
                    out[(type_name, key)] = known[(type_name, key)] = log
        return out

    def fenced(self, conn: sqlite3.Connection, log: int, after: int) -> bool:
        """Whether the log ``log`` holds an event with a seq above ``after``."""
        return conn.execute(_FENCED, (log, after)).fetchone() is not None

    def count(self, conn: sqlite3.Connection, events: list[tuple[int, int]]) -> int:
        """How many of the events ``(log, seq)`` are stored: one query per chunk."""
        chunk = max(1, self.db.chunk // 2)
        found = 0
        for i in range(0, len(events), chunk):
            part = events[i : i + chunk]
            values = ", ".join(["(?, ?)"] * len(part))
            found += conn.execute(
                f"SELECT count(*) FROM (VALUES {values}) AS v JOIN events AS e"  # noqa: S608 - placeholders only
                " ON e.log = v.column1 AND e.seq = v.column2",
                [field for event in part for field in event],
            ).fetchone()[0]
        return int(found)

    def assume(self, conn: sqlite3.Connection, evented: list[Write]) -> int | None:
        """The fast path's event writes: the events appended if each write won, else None.

        The events are the condition: an event write wins exactly when its ``expected`` is its
        entity's last seq, that is when none of its seqs is stored (each insert went in) and the
        event of seq ``expected`` is (logs have no gaps). That holds in queue order if, besides,
        each entity's writes in the group chain (each expects the version of the one before it):
        then only the first of them needs its ``expected`` looked up, and what the others expect
        was just appended. A new entity's row must be new too; a snapshot updates the row. (The
        caller makes sure that no entity has writes of both kinds.) On None, roll back.
        """
        world = self.db.world
        ids = self.ids(conn, [(w.type_name, w.key) for w in evented if w.expected])
        created: list[tuple[object, ...]] = []
        snapshots: list[tuple[object, ...]] = []
        appended: list[tuple[object, ...]] = []
        tips: dict[tuple[str, str], int] = {}
        prior: list[tuple[int, int]] = []
        for w in evented:
            type_name, key, expected, version = w.type_name, w.key, w.expected, w.version
            ref = (type_name, key)
            tip = tips.get(ref)
            if tip is not None and tip != expected:
                return None  # not a chain: the slow path decides in queue order
            tips[ref] = version
            if not expected:
                log = ids[ref] = self.give(ref)
                data, snapshot = (w.data, version) if w.snapshot else (b"", 0)
                created.append(
                    (world, type_name, key, version, w.type_version, data, snapshot, log)
                )
            else:
                found = ids.get(ref)
                if found is None:
                    return None  # no such entity: it lost
                log = found
                if tip is None:
                    prior.append((log, expected))
                if w.snapshot:
                    snapshots.append(
                        (version, w.type_version, w.data, version, world, type_name, key)
                    )
            type_version = w.type_version
            appended.extend(
                (log, seq, type_version, event)
                for seq, event in enumerate(w.events or (), expected + 1)
            )
        if created and conn.executemany(CREATE, created).rowcount != len(created):
            return None  # one of them was stored already
        if conn.executemany(APPEND, appended).rowcount != len(appended):
            return None  # a seq was taken: that write lost
        if prior and self.count(conn, prior) != len(prior):
            return None  # a write expected more events than are stored: it lost
        if snapshots and conn.executemany(SNAPSHOT, snapshots).rowcount != len(snapshots):
            return None  # pragma: no cover - the events of those writes were stored
        return len(appended)
