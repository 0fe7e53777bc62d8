"""The SQLite backend's writer thread: group commit of conditional writes, and pruning.

The writer owns the only write connection and the file lock. Each drain of its channel is one
*group*: every commit request in it is applied in one transaction, in call order, as if one after
the other, and each caller is answered only after ``COMMIT`` returned.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from .._errors import Indeterminate, InvalidKey, TooLarge, Unavailable
from ._base import Write
from ._sqlite_jobs import COMMIT, Channel, Job, Loop, Outcome, Worker, answer, deliver_all
from ._sqlite_schema import Database, FileLock, write_transaction

__all__ = ["Stats", "Writer"]

_UPDATE: Final = (
    "UPDATE entities SET version = ?, type_version = ?, state = ?"
    " WHERE world = ? AND type = ? AND key = ? AND version = ?"
)
_INSERT: Final = (
    "INSERT INTO entities (world, type, key, version, type_version, state)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
_UPSERT: Final = (
    "INSERT INTO entities (world, type, key, version, type_version, state)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (world, type, key) DO UPDATE SET"
    " version = excluded.version, type_version = excluded.type_version, state = excluded.state"
)
_PUT_RECEIPT: Final = (
    "INSERT INTO receipts (world, type, key, id, version, result, at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (world, type, key, id) DO UPDATE SET"
    " version = excluded.version, result = excluded.result, at = excluded.at"
)
_PRUNE: Final = "DELETE FROM receipts WHERE world = ? AND at < ?"

# SQLite's primary result codes that matter here (extended codes carry them in the low byte).
_SQLITE_FULL: Final = 13
_SQLITE_TOOBIG: Final = 18
# Codes a single request can cause: full (for a large one), too big, constraint (a NULL),
# datatype mismatch, bind index out of range.
_REQUEST_CODES: Final = frozenset({_SQLITE_FULL, _SQLITE_TOOBIG, 19, 20, 25})


@dataclass(slots=True)
class Stats:
    """Counters, written by the writer thread only."""

    transactions: int = 0
    failed_transactions: int = 0
    commits: int = 0
    writes: int = 0
    conflicts: int = 0
    largest_group: int = 0


class Writer(Worker):
    """The writer thread: owns the write connection, and the file lock until it stops."""

    role = "pachyderm-sqlite-writer"

    def __init__(self, db: Database, channel: Channel, lock: FileLock, stats: Stats) -> None:
        super().__init__(db.path, channel)
        self.db = db
        self.lock = lock
        self.stats = stats

    def connect(self) -> sqlite3.Connection:
        return self.db.connect(self.db.setup_writer)

    def release(self) -> None:
        self.lock.release()

    def run(self, conn: sqlite3.Connection, jobs: list[Job]) -> None:
        """Commit each run of consecutive commit requests as one group; prune in between."""
        group: list[Job] = []
        for job in jobs:
            if job[0] == COMMIT:
                group.append(job)
                continue
            if group:
                self.guarded(self.commit_group, conn, group)
                group = []
            self.guarded(self.prune, conn, [job])
        if group:
            self.guarded(self.commit_group, conn, group)

    def commit_group(self, conn: sqlite3.Connection, group: list[Job]) -> None:
        """Apply a group of commit requests in one transaction and answer each."""
        batches: list[tuple[Write, ...]] = [job[1] for job in group]
        outcomes: list[tuple[Loop, Outcome]]
        try:
            results = self.transact(conn, batches)
        except _Failed as failure:
            if len(group) > 1 and not failure.at_commit and _alone_may_help(failure.error):
                for job in group:  # one request at a time, so that only the culprit fails
                    self.commit_group(conn, [job])
                return
            error = _public_error(failure, self.path)
            outcomes = [(loop, (future, None, error)) for _, _, future, loop in group]
        else:
            outcomes = [
                (loop, (future, result, None))
                for (_, _, future, loop), result in zip(group, results, strict=True)
            ]
        deliver_all(outcomes)

    def transact(
        self, conn: sqlite3.Connection, batches: list[tuple[Write, ...]]
    ) -> list[list[bool]]:
        """One write transaction for all batches, applied in order; raises ``_Failed``."""
        world = self.db.world
        stats = self.stats
        writes = [w for batch in batches for w in batch]
        at_commit = False
        try:
            conn.execute("BEGIN IMMEDIATE")
            # Fast path: assume every write wins. Updates first, then inserts; if every row
            # changed, every write won under this order, and then also in queue order (an
            # entity can only have all its writes win here if they are all updates, kept in
            # order, or one single insert). Otherwise start again and decide write by write.
            # (Rolling back and beginning again is cheaper than a savepoint, whose statement
            # journal would copy every page the fast path touches.)
            updates = [
                (w.version, w.type_version, w.data, world, w.type_name, w.key, w.expected)
                for w in writes
                if w.expected
            ]
            inserts = [
                (world, w.type_name, w.key, w.version, w.type_version, w.data)
                for w in writes
                if not w.expected
            ]
            changed = 0
            if updates:
                changed += conn.executemany(_UPDATE, updates).rowcount
            if inserts:
                changed += conn.executemany(_INSERT, inserts).rowcount
            won: list[bool] | None = None
            if changed == len(writes):
                winners: Sequence[Write] = writes
            else:
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                won, winners = self.decide(conn, writes)
            receipts = [
                (world, w.type_name, w.key, r.id, r.version, r.result, r.at)
                for w in winners
                if w.receipts
                for r in w.receipts
            ]
            if receipts:
                conn.executemany(_PUT_RECEIPT, receipts)
            at_commit = True
            conn.execute("COMMIT")
        except BaseException as e:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            stats.failed_transactions += 1
            raise _Failed(e, at_commit=at_commit) from e
        stats.transactions += 1
        stats.commits += len(batches)
        stats.writes += len(writes)
        stats.largest_group = max(stats.largest_group, len(batches))
        if won is None:
            return [[True] * len(batch) for batch in batches]
        stats.conflicts += won.count(False)
        out = []
        i = 0
        for batch in batches:
            out.append(won[i : i + len(batch)])
            i += len(batch)
        return out

    def decide(
        self, conn: sqlite3.Connection, writes: list[Write]
    ) -> tuple[list[bool], list[Write]]:
        """The slow path: read the stored versions, decide each write in order, apply winners."""
        refs = {(w.type_name, w.key): None for w in writes}
        current: dict[tuple[str, str], int] = {
            (t, k): version for t, k, version in self.db.select(conn, list(refs), "version")
        }
        won: list[bool] = []
        final: dict[tuple[str, str], Write] = {}
        winners: list[Write] = []
        for w in writes:
            ref = (w.type_name, w.key)
            if current.get(ref, 0) == w.expected:
                current[ref] = w.version
                final[ref] = w
                winners.append(w)
                won.append(True)
            else:
                won.append(False)
        world = self.db.world
        conn.executemany(
            _UPSERT,
            [
                (world, w.type_name, w.key, w.version, w.type_version, w.data)
                for w in final.values()
            ],
        )
        return won, winners

    def prune(self, conn: sqlite3.Connection, jobs: list[Job]) -> None:
        for job in jobs:
            try:
                with write_transaction(conn):
                    count = conn.execute(_PRUNE, (self.db.world, job[1])).rowcount
            except sqlite3.Error as e:
                answer(job, None, Unavailable(f"SQLite could not prune receipts: {e}"))
            else:
                answer(job, count, None)


class _Failed(Exception):
    """A transaction failed and was rolled back (or its ``COMMIT`` failed: ``at_commit``)."""

    def __init__(self, error: BaseException, *, at_commit: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.at_commit = at_commit


def _code(error: BaseException) -> int | None:
    code = getattr(error, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _alone_may_help(error: BaseException) -> bool:
    """Whether the failure may come from one request of a group (then retry each alone).

    Yes for a full database (a large request may be the one that does not fit) and for a bad
    value (too large, not Unicode, a type SQLite cannot store, a NULL); no for I/O errors, locks,
    corruption and the like, which fail every request alike.
    """
    if isinstance(error, sqlite3.ProgrammingError | sqlite3.InterfaceError):
        return True
    if isinstance(error, sqlite3.Error):
        return _code(error) in _REQUEST_CODES
    return True


def _public_error(failure: _Failed, path: str) -> BaseException:
    """The error a caller sees for a failed transaction."""
    error = failure.error
    code = _code(error)
    if failure.at_commit and code != _SQLITE_FULL:
        return Indeterminate(f"SQLite COMMIT failed, the outcome is unknown ({path}): {error}")
    if code == _SQLITE_TOOBIG or isinstance(error, OverflowError):
        return TooLarge(f"a value is over SQLite's limits ({path}): {error}")
    if isinstance(error, UnicodeEncodeError):
        return InvalidKey(f"a type name, key or receipt id is not valid Unicode: {error}")
    if (
        isinstance(error, sqlite3.ProgrammingError | sqlite3.InterfaceError)
        or not isinstance(error, sqlite3.Error)
        or code in _REQUEST_CODES - {_SQLITE_FULL}
    ):
        return TypeError(f"commit() got a value SQLite cannot store: {error!r}")
    return Unavailable(f"SQLite could not commit, nothing was written ({path}): {error}")
