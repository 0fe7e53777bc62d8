"""The SQLite backend's reader thread: loads, receipts, key listings, outbox and event pages.

Read-only. In WAL mode the reader's connection sees committed data only. The reads of one drain
share one snapshot, and the loads among them share their queries. Outbox pages (``due``) are
keyset pages: messages (due 0) in primary key order, then timers on the index
``outbox_timers_by_due``; each page starts after the key of the last row of the previous one, so
rows committed while paging may or may not appear, and none appears twice. Event pages
(``read_events``) are keyset pages of one entity's log on the primary key of ``events``: the
events with ``seq > after``, in seq order.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from typing import Final

from .._errors import Unavailable
from ._base import Envelope, EnvelopeId, Receipt, Stored, StoredEvent
from ._sqlite_jobs import (
    DUE,
    EVENTS,
    EXISTS,
    LIST,
    LOAD,
    RECEIPT,
    Channel,
    Job,
    Loop,
    Outcome,
    Worker,
    deliver_all,
)
from ._sqlite_logs import VERSION
from ._sqlite_schema import Database
from ._text import is_unicode, key_range

__all__ = ["Reader"]

_GET_RECEIPT: Final = (
    "SELECT version, result, at FROM receipts WHERE world = ? AND type = ? AND key = ? AND id = ?"
)
_EVENTS: Final = (
    "SELECT e.seq, e.type_version, e.event FROM entities AS n JOIN events AS e ON e.log = n.log"
    " WHERE n.world = ? AND n.type = ? AND n.key = ? AND e.seq > ? ORDER BY e.seq LIMIT ?"
)
_LIST_FROM: Final = (
    "SELECT key FROM entities WHERE world = ? AND type = ? AND key >= ? ORDER BY key LIMIT ?"
)
_LIST_FROM_ABOVE: Final = (
    "SELECT key FROM entities WHERE world = ? AND type = ? AND key > ? ORDER BY key LIMIT ?"
)
_LIST_RANGE: Final = (
    "SELECT key FROM entities WHERE world = ? AND type = ? AND key >= ? AND key < ?"
    " ORDER BY key LIMIT ?"
)
_LIST_RANGE_ABOVE: Final = (
    "SELECT key FROM entities WHERE world = ? AND type = ? AND key > ? AND key < ?"
    " ORDER BY key LIMIT ?"
)

# Pages of the waiting rows in `Envelope.key()` order: first the messages (due 0), in primary
# key order; then the timers, on the index `outbox_timers_by_due`.
_ROW: Final = "sender_type, sender_key, version, idx, to_type, to_key, due, name, message"
_MESSAGES: Final = (
    f"SELECT {_ROW} FROM outbox WHERE world = ? AND due = 0 AND dead IS NULL"  # noqa: S608 - constant
    " AND (sender_type, sender_key, version, idx) > (?, ?, ?, ?)"
    " ORDER BY sender_type, sender_key, version, idx LIMIT ?"
)
_TIMERS: Final = (
    f"SELECT {_ROW} FROM outbox WHERE world = ? AND due > 0 AND dead IS NULL AND due <= ?"  # noqa: S608 - constant
    " AND (due, sender_type, sender_key, version, idx) > (?, ?, ?, ?, ?)"
    " ORDER BY due, sender_type, sender_key, version, idx LIMIT ?"
)
#: Before every key (sender types are never empty).
_FIRST: Final = (0.0, "", "", 0, 0)

_Answers = list[tuple[Loop, Outcome]]


class Reader(Worker):
    """The reader thread: answers the reads of each drain from one snapshot."""

    role = "pachyderm-sqlite-reader"

    def __init__(self, db: Database, channel: Channel) -> None:
        super().__init__(db.path, channel)
        self.db = db

    def connect(self) -> sqlite3.Connection:
        return self.db.connect(self.db.setup_reader)

    def release(self) -> None:
        """Nothing to free: the writer holds the file lock."""

    def run(self, conn: sqlite3.Connection, jobs: list[Job]) -> None:
        deliver_all(self.read(conn, jobs))

    def read(self, conn: sqlite3.Connection, jobs: list[Job]) -> _Answers:
        """Run read jobs in one snapshot; the loads among them share their queries."""
        try:
            conn.execute("BEGIN")
        except sqlite3.Error as e:
            error = _read_error(e, self.path)
            return [(loop, (future, None, error)) for _, _, future, loop in jobs]
        try:
            loads = [job for job in jobs if job[0] == LOAD]
            out = self.load_jobs(conn, loads) if loads else []
            out.extend(self.one_read(conn, job) for job in jobs if job[0] != LOAD)
        finally:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("COMMIT")
        return out

    def load_jobs(self, conn: sqlite3.Connection, jobs: list[Job]) -> _Answers:
        """Answer load jobs with shared queries (a job with bad refs fails alone)."""
        refs: dict[tuple[str, str], None] = {}
        try:
            for job in jobs:
                refs.update(dict.fromkeys(job[1]))
            try:
                found = self.load_refs(conn, list(refs))
            except UnicodeEncodeError:  # such a ref was never stored: leave it out
                valid = [ref for ref in refs if is_unicode(ref[0]) and is_unicode(ref[1])]
                found = self.load_refs(conn, valid)
        except Exception as e:
            if len(jobs) > 1 and not isinstance(e, sqlite3.OperationalError):
                return [outcome for job in jobs for outcome in self.load_jobs(conn, [job])]
            error = _read_error(e, self.path)
            return [(loop, (future, None, error)) for _, _, future, loop in jobs]
        return [
            (loop, (future, [found.get(ref) for ref in job_refs], None))
            for _, job_refs, future, loop in jobs
        ]

    def load_refs(
        self, conn: sqlite3.Connection, refs: list[tuple[str, str]]
    ) -> dict[tuple[str, str], Stored]:
        return {
            (t, k): Stored(version, type_version, state, snapshot)
            for t, k, version, type_version, state, snapshot in self.db.select(
                conn, refs, f"{VERSION}, type_version, state, snapshot"
            )
        }

    def one_read(self, conn: sqlite3.Connection, job: Job) -> tuple[Loop, Outcome]:
        kind, arg, future, loop = job
        result: object
        try:
            if kind == RECEIPT:
                try:
                    result = self.get_receipt(conn, *arg)
                except UnicodeEncodeError:  # not Unicode: never stored
                    result = None
            elif kind == LIST:
                result = self.list_keys(conn, *arg)
            elif kind == DUE:
                result = self.due(conn, *arg)
            elif kind == EXISTS:
                result = self.exists(conn, arg)
            elif kind == EVENTS:
                try:
                    result = self.read_events(conn, *arg)
                except UnicodeEncodeError:  # not Unicode: never stored
                    result = []
            else:  # pragma: no cover - a bug of the SQLite backend
                raise ValueError(f"the reader got a job of unknown kind {kind!r}")
        except Exception as e:
            return loop, (future, None, _read_error(e, self.path))
        return loop, (future, result, None)

    def get_receipt(
        self, conn: sqlite3.Connection, type_name: str, key: str, id: str
    ) -> Receipt | None:
        row = conn.execute(_GET_RECEIPT, (self.db.world, type_name, key, id)).fetchone()
        return None if row is None else Receipt(id, row[0], row[1], row[2])

    def read_events(
        self, conn: sqlite3.Connection, type_name: str, key: str, after: int, limit: int
    ) -> list[StoredEvent]:
        rows = conn.execute(_EVENTS, (self.db.world, type_name, key, after, limit))
        return [StoredEvent(seq, type_version, event) for seq, type_version, event in rows]

    def list_keys(
        self,
        conn: sqlite3.Connection,
        type_name: str,
        prefix: str,
        after: str | None,
        limit: int,
    ) -> list[str]:
        if not is_unicode(prefix) or not is_unicode(type_name):
            return []
        low, strict, high = key_range(prefix, after)
        world = self.db.world
        if high is None:
            sql = _LIST_FROM_ABOVE if strict else _LIST_FROM
            params: tuple[object, ...] = (world, type_name, low, limit)
        else:
            sql = _LIST_RANGE_ABOVE if strict else _LIST_RANGE
            params = (world, type_name, low, high, limit)
        return [key for (key,) in conn.execute(sql, params)]

    def due(
        self,
        conn: sqlite3.Connection,
        until: float,
        after: tuple[float, str, str, int, int] | None,
        limit: int,
    ) -> list[Envelope]:
        world = self.db.world
        if after is None:
            after = _FIRST
        out: list[Envelope] = []
        if after[0] <= 0.0 and until >= 0.0:
            out = [Envelope(*row) for row in conn.execute(_MESSAGES, (world, *after[1:], limit))]
            after = _FIRST
        if len(out) < limit:
            rows = conn.execute(_TIMERS, (world, until, *after, limit - len(out)))
            out += [Envelope(*row) for row in rows]
        return out

    def exists(self, conn: sqlite3.Connection, ids: tuple[EnvelopeId, ...]) -> list[bool]:
        """Whether each outbox row is waiting: one query per chunk of ids."""
        try:
            found = self.waiting(conn, ids)
        except UnicodeEncodeError:  # such an id was never stored: leave it out
            found = self.waiting(
                conn, [id for id in ids if is_unicode(id[0]) and is_unicode(id[1])]
            )
        return [tuple(id) in found for id in ids]

    def waiting(self, conn: sqlite3.Connection, ids: Sequence[EnvelopeId]) -> set[EnvelopeId]:
        chunk = max(1, self.db.chunk // 4)
        world = self.db.world
        found: set[EnvelopeId] = set()
        for i in range(0, len(ids), chunk):
            part = ids[i : i + chunk]
            values = ", ".join(["(?, ?, ?, ?)"] * len(part))
            found.update(
                conn.execute(
                    "SELECT o.sender_type, o.sender_key, o.version, o.idx"  # noqa: S608 - placeholders only
                    f" FROM (VALUES {values}) AS v JOIN outbox AS o ON o.world = ?"
                    " AND o.sender_type = v.column1 AND o.sender_key = v.column2"
                    " AND o.version = v.column3 AND o.idx = v.column4 AND o.dead IS NULL",
                    (*(field for id in part for field in id), world),
                )
            )
        return found


def _read_error(error: Exception, path: str) -> Exception:
    if isinstance(error, sqlite3.Error) and not isinstance(
        error, sqlite3.ProgrammingError | sqlite3.InterfaceError
    ):
        return Unavailable(f"SQLite could not read ({path}): {error}")
    return TypeError(f"the SQLite backend cannot read with these values: {error!r}")
