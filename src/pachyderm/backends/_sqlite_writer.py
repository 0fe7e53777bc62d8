"""The SQLite backend's writer thread: group commit of conditional writes, and pruning.

The writer owns the only write connection and the file lock. Each drain of its channel is one
*group*: every commit request in it is applied in one transaction, in call order, as if one after
the other, and each caller is answered only after ``COMMIT`` returned.

A write wins if the stored version of its entity is its ``expected`` one, every outbox row it
consumes is still waiting, and (an event write) no event of its entity with a seq above
``expected`` is stored; a winner's entity row, events, receipts and outbox changes (consumes,
then cancels, then sends) are in that transaction, so they are durable together, when ``commit``
returns. The writer also keeps ``counts``, the world's outbox rows by kind: counted at connect,
then kept exact from the rows each committed transaction changed.

An event write appends its events (seqs ``expected + 1`` .. ``version``) to ``events``. Its
entity's row is written only when it is created (an empty state, ``snapshot`` 0, unless it has a
snapshot) and with a snapshot (the state, its type version and ``snapshot = version``); the
version of an event-sourced entity is the seq of its last event, read from the log's primary key
(``_sqlite_schema.VERSION``), so an event costs one B-tree insert and its row nothing. A state
write stores the whole row, ``snapshot`` NULL. An entity's writes are all of one kind (its type
decides): a state write on an event-sourced row is not defined.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from .._errors import Indeterminate, InvalidKey, TooLarge, Unavailable
from ._base import Consume, Outbox, Write
from ._sqlite_jobs import COMMIT, Channel, Job, Loop, Outcome, Worker
from ._sqlite_logs import APPEND, CREATE, VERSION, Logs
from ._sqlite_rows import CONSUME, INSERT, SEND, run_rows
from ._sqlite_schema import Database, FileLock, write_transaction

__all__ = ["Stats", "Writer"]

# An entity's row changed from its expected version (one statement per row: `_sqlite_rows`).
_UPDATE: Final = (
    "UPDATE entities SET version = ?, type_version = ?, state = ?, snapshot = NULL"
    " WHERE world = ? AND type = ? AND key = ? AND version = ?"
)
# The rows of the slow path: a whole row (of a state write, or of an event write with a snapshot,
# the last one of the transaction). An existing row keeps its log (`_sqlite_logs`).
_UPSERT: Final = (
    "INSERT INTO entities (world, type, key, version, type_version, state, snapshot, log)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (world, type, key) DO UPDATE SET"
    " version = excluded.version, type_version = excluded.type_version, state = excluded.state,"
    " snapshot = excluded.snapshot"
)
_PUT_RECEIPT: Final = (
    "INSERT INTO receipts (world, type, key, id, version, result, at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (world, type, key, id) DO UPDATE SET"
    " version = excluded.version, result = excluded.result, at = excluded.at"
)
_PRUNE: Final = "DELETE FROM receipts WHERE world = ? AND at < ?"
# The outbox. A row is waiting while `dead` is NULL; only waiting rows are consumed, cancelled or
# replaced (and only they hold their name in the unique index `outbox_by_name`).
_BURY: Final = (
    "UPDATE outbox SET dead = ? WHERE world = ? AND sender_type = ? AND sender_key = ?"
    " AND version = ? AND idx = ? AND dead IS NULL"
)
_WAITING: Final = (
    "SELECT count(*) FROM outbox WHERE world = ? AND sender_type = ? AND sender_key = ?"
    " AND version = ? AND idx = ? AND dead IS NULL"
)
_CANCEL: Final = (
    "DELETE FROM outbox WHERE world = ? AND sender_type = ? AND sender_key = ? AND name = ?"
    " AND dead IS NULL"
)

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
    events: int = 0
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
        # The world's outbox rows by kind. Replaced (never changed in place) by the writer thread
        # after each commit, before its callers are answered; read by the event loop.
        self.counts: dict[str, int] = {"messages": 0, "timers": 0, "dead": 0}
        # Events the current transaction appends (writer thread only; counted once committed).
        self.appended = 0
        self.logs = Logs(db)

    def connect(self) -> sqlite3.Connection:
        return self.db.connect(self.setup)

    def setup(self, conn: sqlite3.Connection) -> None:
        self.db.setup_writer(conn)
        self.counts = self.db.count_outbox(conn)
        self.logs.setup(conn)

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
        self.deliver(outcomes)

    def transact(
        self, conn: sqlite3.Connection, batches: list[tuple[Write, ...]]
    ) -> list[list[bool]]:
        """One write transaction for all batches, applied in order; raises ``_Failed``."""
        world = self.db.world
        stats = self.stats
        writes = [w for batch in batches for w in batch]
        at_commit = False
        self.appended = 0
        logs = self.logs
        try:
            conn.execute("BEGIN IMMEDIATE")
            logs.begin()
            won: list[bool] | None = None
            fast = _fast_path_may_hold(writes)
            ops = self.assume_all_win(conn, writes) if fast else None
            if ops is not None:
                winners: Sequence[Write] = writes
            else:
                if fast:  # undo what the fast path wrote
                    conn.execute("ROLLBACK")
                    conn.execute("BEGIN IMMEDIATE")
                    logs.begin()
                    self.appended = 0
                won, winners, ops = self.decide(conn, writes)
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
            if at_commit:  # the outcome is unknown: count the outbox again
                with contextlib.suppress(sqlite3.Error):
                    self.counts = self.db.count_outbox(conn)
            stats.failed_transactions += 1
            raise _Failed(e, at_commit=at_commit) from e
        logs.committed()
        if ops.changed:
            counts = self.counts
            self.counts = {kind: counts[kind] + ops.delta[kind] for kind in counts}
        stats.transactions += 1
        stats.commits += len(batches)
        stats.writes += len(writes)
        stats.events += self.appended
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

    def assume_all_win(self, conn: sqlite3.Connection, writes: list[Write]) -> _OutboxOps | None:
        """The fast path: apply every write as if it won; None if one did not (then undo).

        Updates first, then inserts, then the checks of writes that keep their entity's row
        (``version == expected``); if every row changed (or was as expected), every write won
        under this order, and then also in queue order (an entity can only have all its writes
        win here if they are all updates, kept in order, or one single insert, or only checks:
        ``_fast_path_may_hold``). Then the outbox changes of every write, in queue order, whose
        consumes must each find their row. (Rolling back and beginning again is cheaper than a
        savepoint, whose statement journal would copy every page the fast path touches.)

        Event writes (``assume_events``) go last, with their own statements; the fence holds if
        every event was inserted (none of those seqs was stored).
        """
        world = self.db.world
        updates = []
        inserts = []
        checks = []
        evented = []
        for w in writes:
            if w.version == w.expected:
                checks.append(w)
            elif w.events:
                evented.append(w)
            elif w.expected:
                updates.append(
                    (w.version, w.type_version, w.data, world, w.type_name, w.key, w.expected)
                )
            else:
                inserts.append((world, w.type_name, w.key, w.version, w.type_version, w.data))
        if evented and _kinds_meet(evented, updates, inserts):
            return None
        changed = 0
        if updates:
            changed += conn.executemany(_UPDATE, updates).rowcount
        if inserts:
            changed += run_rows(conn, INSERT, inserts)
        if checks:
            stored = self.versions(conn, checks)
            changed += sum(stored.get((w.type_name, w.key), 0) == w.expected for w in checks)
        if evented:
            appended = self.logs.assume(conn, evented)
            if appended is None:
                return None
            self.appended = appended
            changed += len(evented)
        if changed != len(writes):
            return None
        ops = _OutboxOps(conn, world)
        for w in writes:
            if w.outbox is not None:
                ops.add(w, w.outbox)
        ops.flush()
        return None if ops.missed else ops

    def versions(
        self, conn: sqlite3.Connection, writes: Sequence[Write]
    ) -> dict[tuple[str, str], int]:
        """The stored versions of the writes' entities (absent: never stored)."""
        refs = {(w.type_name, w.key): None for w in writes}
        return {(t, k): version for t, k, version in self.db.select(conn, list(refs), VERSION)}

    def decide(
        self, conn: sqlite3.Connection, writes: list[Write]
    ) -> tuple[list[bool], list[Write], _OutboxOps]:
        """The slow path: decide each write in order, against the effects of those before it.

        A write wins if the stored version (as the winners before it left it) is its expected
        one, each outbox row it consumes is still waiting (after the winners before it) and
        named once, and (an event write) no event of its entity above ``expected`` is stored.

        Each entity's row is written once, at the end: whole (``rows``), as the last winner that
        stored one left it (a state write, or an event write with a snapshot); or, for an
        event-sourced entity created here with no snapshot yet, inserted empty (``bumps``). The
        row of an event-sourced entity is otherwise left as it is: its version is its log's.
        """
        world = self.db.world
        current = self.versions(conn, writes)
        logs = self.logs
        ids = logs.ids(conn, [(w.type_name, w.key) for w in writes if w.events and w.expected])
        ops = _OutboxOps(conn, world)
        won: list[bool] = []
        rows: dict[tuple[str, str], tuple[object, ...]] = {}
        bumps: dict[tuple[str, str], tuple[object, ...]] = {}
        appended: list[tuple[object, ...]] = []
        winners: list[Write] = []
        for w in writes:
            ref = (w.type_name, w.key)
            outbox = w.outbox
            consumes = () if outbox is None else outbox.consumes
            events = w.events
            log = ids.get(ref) if events else None
            if (
                current.get(ref, 0) != w.expected
                or (log is not None and logs.fenced(conn, log, w.expected))
                or (consumes and not ops.waiting(consumes))
            ):
                won.append(False)
                continue
            current[ref] = w.version
            if w.version != w.expected:
                if not events:
                    rows[ref] = (world, *ref, w.version, w.type_version, w.data, None, None)
                    if bumps:
                        bumps.pop(ref, None)
                else:
                    if log is None:  # a new entity (it expects 0): a new log
                        log = ids[ref] = logs.give(ref)
                    appended.extend(
                        (log, seq, w.type_version, event)
                        for seq, event in enumerate(events, w.expected + 1)
                    )
                    if w.snapshot:
                        row = (world, *ref, w.version, w.type_version, w.data, w.version, log)
                        rows[ref] = row
                        bumps.pop(ref, None)
                    elif not w.expected and ref not in rows:  # a new row, until a snapshot
                        bumps[ref] = (world, *ref, w.version, w.type_version, b"", 0, log)
            if outbox is not None:
                ops.add(w, outbox)
            winners.append(w)
            won.append(True)
        ops.flush()
        if ops.missed:  # pragma: no cover - `waiting` said these rows were there
            raise RuntimeError("the SQLite writer lost track of the outbox rows it consumes")
        if rows:
            conn.executemany(_UPSERT, list(rows.values()))
        if bumps:
            conn.executemany(CREATE, list(bumps.values()))
        if appended:
            if conn.executemany(APPEND, appended).rowcount != len(appended):  # pragma: no cover
                raise RuntimeError("the SQLite writer appended an event whose seq was stored")
            self.appended = len(appended)
        return won, winners, ops

    def prune(self, conn: sqlite3.Connection, jobs: list[Job]) -> None:
        for job in jobs:
            try:
                with write_transaction(conn):
                    count = conn.execute(_PRUNE, (self.db.world, job[1])).rowcount
            except sqlite3.Error as e:
                self.answer(job, None, Unavailable(f"SQLite could not prune receipts: {e}"))
            else:
                self.answer(job, count, None)


class _OutboxOps:
    """The outbox changes of a transaction's winners, applied as in queue order, in few statements.

    Each write's changes are queued: consumes, cancels, sends (a named send is a delete of the
    sender's waiting row of that name, then an insert). ``flush`` runs everything queued as one
    statement per kind, in that order; that equals queue order as long as no queued change of a
    later write touches a row that a queued change of an earlier one does. ``add`` flushes first
    when that could happen: a consume of a row that is queued to be sent, or of a row of a sender
    with queued cancels or named sends (it may have that name); a cancel or a named send of a
    (sender, name) with a queued named send.

    Mutable state: the queues, ``sent``, ``renamers`` and ``names`` (what they touch), ``missed``
    (consumes that found no waiting row: the write then lost) and ``delta`` (the change of each
    count), changed by ``add`` and ``flush`` on the writer thread; ``changed``: whether any was
    queued.
    """

    __slots__ = (
        "buries",
        "cancels",
        "changed",
        "conn",
        "consumes",
        "delta",
        "missed",
        "names",
        "renamers",
        "replaces",
        "sends",
        "sent",
        "world",
    )

    def __init__(self, conn: sqlite3.Connection, world: str) -> None:
        self.conn = conn
        self.world = world
        self.consumes: list[tuple[object, ...]] = []
        self.buries: list[tuple[object, ...]] = []
        self.cancels: list[tuple[object, ...]] = []
        self.replaces: list[tuple[object, ...]] = []
        self.sends: list[tuple[object, ...]] = []
        self.sent: set[tuple[str, str, int, int]] = set()
        self.renamers: set[tuple[str, str]] = set()
        self.names: set[tuple[str, str, str]] = set()
        self.missed = 0
        self.delta = {"messages": 0, "timers": 0, "dead": 0}
        self.changed = False

    def waiting(self, consumes: Sequence[Consume]) -> bool:
        """Whether these rows are distinct and each is waiting now (after every queued change).

        A write naming a row twice loses, as in Memory.
        """
        if len({c.id for c in consumes}) < len(consumes):
            return False
        self.flush()
        conn, world = self.conn, self.world
        return all(conn.execute(_WAITING, (world, *c.id)).fetchone()[0] == 1 for c in consumes)

    def add(self, w: Write, outbox: Outbox) -> None:
        """Queue the outbox changes of a winning write."""
        world = self.world
        consumes = outbox.consumes
        cancels = outbox.cancels
        sent, renamers, names, delta = self.sent, self.renamers, self.names, self.delta
        # A consume of a row that a queued change sends or may delete (by name), or a cancel of
        # a name that a queued send holds: run what is queued first. (Loops, not any(): this
        # runs once per write.)
        if sent or renamers:
            for c in consumes:
                if c.id in sent or (renamers and (c.id[0], c.id[1]) in renamers):
                    self.flush()
                    break
        if names and cancels and any((w.type_name, w.key, name) in names for name in cancels):
            self.flush()
        messages = 0  # the change of the count of waiting messages
        for c in consumes:
            if c.timer:
                delta["timers"] -= 1
            else:
                messages -= 1
            if c.dead is None:
                self.consumes.append((world, *c.id))
            else:
                self.buries.append((c.dead, world, *c.id))
                delta["dead"] += 1
        if cancels:
            me = (w.type_name, w.key)
            self.cancels.extend((world, *me, name) for name in cancels)
            renamers.add(me)
        for e in outbox.sends:
            if e.name is not None:
                name = (e.sender_type, e.sender_key, e.name)
                if name in names:
                    self.flush()
                self.replaces.append((world, *name))
                names.add(name)
                renamers.add((e.sender_type, e.sender_key))
            self.sends.append((world, *e.id, e.to_type, e.to_key, e.due, e.name, e.data))
            sent.add(e.id)
            if e.due:
                delta["timers"] += 1
            else:
                messages += 1
        if messages:
            delta["messages"] += messages
        self.changed = True

    def flush(self) -> None:
        """Run every queued change, one statement per kind, in the order of `Outbox`."""
        conn = self.conn
        if self.consumes or self.buries:
            hit = 0
            if self.consumes:
                hit += run_rows(conn, CONSUME, self.consumes)
            if self.buries:
                hit += conn.executemany(_BURY, self.buries).rowcount
            self.missed += len(self.consumes) + len(self.buries) - hit
            self.consumes = []
            self.buries = []
        # Cancelled and replaced rows are timers: only timers have names.
        if self.cancels:
            self.delta["timers"] -= conn.executemany(_CANCEL, self.cancels).rowcount
            self.cancels = []
        if self.replaces:
            self.delta["timers"] -= conn.executemany(_CANCEL, self.replaces).rowcount
            self.replaces = []
        if self.sends:
            run_rows(conn, SEND, self.sends)
            self.sends = []
        self.sent.clear()
        self.renamers.clear()
        self.names.clear()


def _fast_path_may_hold(writes: list[Write]) -> bool:
    """Whether no entity has both a write that keeps its row and one that changes it.

    A check (``version == expected``) reads the stored version where the fast path runs it
    (after every update), not where it stands in the queue: it is right only if no other write
    of the group changes its entity.
    """
    checked = {(w.type_name, w.key) for w in writes if w.version == w.expected}
    return not checked or not any(
        (w.type_name, w.key) in checked for w in writes if w.version != w.expected
    )


def _kinds_meet(
    evented: list[Write],
    updates: Sequence[tuple[object, ...]],
    inserts: Sequence[tuple[object, ...]],
) -> bool:
    """Whether an entity has both an event write and a state write (rows of `assume_all_win`).

    The two kinds change rows in statements of their own, so the fast path could apply such an
    entity's writes out of queue order: the slow path decides them. Only a group with event
    writes pays for this look.
    """
    refs = {(w.type_name, w.key) for w in evented}
    return any((u[4], u[5]) in refs for u in updates) or any((i[1], i[2]) in refs for i in inserts)


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
        return InvalidKey(
            f"a type name, key, receipt id or outbox text is not valid Unicode: {error}"
        )
    if (
        isinstance(error, sqlite3.ProgrammingError | sqlite3.InterfaceError)
        or not isinstance(error, sqlite3.Error)
        or code in _REQUEST_CODES - {_SQLITE_FULL}
    ):
        return TypeError(f"commit() got a value SQLite cannot store: {error!r}")
    return Unavailable(f"SQLite could not commit, nothing was written ({path}): {error}")
