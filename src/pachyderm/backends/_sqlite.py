"""The SQLite backend: one machine, durable, stdlib ``sqlite3`` only.

How it works (this module: the public class, and a session's start and stop; ``_sqlite_schema``:
the file lock, the tables and the connections; ``_sqlite_jobs``: jobs, channels and the loop both
threads run; ``_sqlite_writer``: group commit; ``_sqlite_process``: the writer's process;
``_sqlite_reader``: reads):

- **One file per process.** ``open`` takes an exclusive ``flock`` on a sidecar file
  ``<path>.lock`` (holding the owner's pid). A second process, or a second open of the same file in
  this process, gets ``StorageLocked`` at once.
- **One writer, group commit.** ``commit`` queues its writes and waits (the calls of one
  event loop iteration are handed over together, at the next iteration). The writer owns the
  only write connection, in a child process of its own (``_sqlite_process``; or, with
  ``writer="thread"``, in a thread of this one): it takes the queued requests (at most
  ``GROUP_WRITES`` writes, or one larger request, at a time) and applies them all in one
  transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``), in call order, as if one after the other. Each
  caller is answered only after ``COMMIT`` returned. A write is applied only if the stored
  version is still its ``expected``: an ``UPDATE ... WHERE version = ?`` (or an insert for
  ``expected == 0``) per write, in two ``executemany`` (a write with ``version == expected``
  only reads the version: it leaves the row as it is, and stores none for ``expected == 0``).
  Then the outbox changes of every write, in call order (see below). If every row changed,
  every write won; else the transaction starts again, and decides and applies write by write.
- **Event logs.** The table ``events`` holds the logs of event-sourced entities, one row per
  event keyed by ``(world, type, key, seq)``. An event write appends its events (seqs
  ``expected + 1`` .. ``version``) in its transaction, with an ``INSERT ... ON CONFLICT DO
  NOTHING``: if one of those seqs is already stored the insert comes up short and the write
  loses (the fence; the slow path asks whether any event above ``expected`` is stored). Its row
  gets ``version`` and keeps its state, type version and ``snapshot`` (an entity's row column,
  NULL for a state entity), unless the write stores a snapshot: then those too.
- **The outbox.** The table ``outbox`` holds the rows that committed writes sent and that no
  write consumed yet, and the dead letters (kept, with ``dead`` set). A winning write's outbox
  changes are in its transaction: its consumes (each a condition, like ``expected``: a row no
  longer waiting makes the write lose, and nothing of it is applied), then its cancels (the
  writer's waiting rows of those names), then its sends (a named one first deletes its sender's
  waiting row of that name). ``outbox_counts`` answers from counts that the writer keeps:
  counted at open, then changed by each commit, by the rows its statements changed.
- **Layout versions.** ``meta`` holds ``schema_version``. A file of version 1 (before the
  outbox) or 2 (before the event logs) is migrated to 3 when opened, in one transaction; a file
  of a newer version is refused, untouched.
- **One reader thread.** ``load_many``, ``read_events``, ``receipt``, ``list_keys``, ``due`` and
  ``exists`` run on a second connection, which in WAL mode sees committed data only; reads
  queued together share one snapshot and loads queued together share their queries. ``due`` and
  ``read_events`` page by key (each page starts after the last row of the previous one).
- **WAL journal.** Readers never block the writer and the writer never blocks readers.

When a write is durable: when ``commit`` returns, with its events, its receipts and its outbox
changes (the events it appends and the rows it sends, consumes, buries or cancels are durable with
the write that carries them, in the same transaction). With ``synchronous="FULL"`` (the default) the
WAL is synced to disk by every ``COMMIT``, so a returned commit survives a crash of the process, of
the operating system and a power loss. With ``synchronous="NORMAL"`` a returned commit survives a
crash of the process, but a power loss or an operating system crash may lose the last transactions
(never corrupting the file, never keeping part of a transaction).

Cancellation: cancelling the task awaiting ``commit`` does not withdraw the write. It is already
queued for the writer and may still commit; the outcome is only unknown to the cancelled
caller (re-read the entity, or retry with the same receipt id, to learn it).

Errors: if a transaction fails as a whole (disk full, I/O error, database locked by a foreign
process), it is rolled back, the previous state is intact, and every request of the group gets
``Unavailable``; if the failure may come from one request (disk full, a value too large, a bad
key), each request is then retried alone, so that only the culprit fails. A failure of the
``COMMIT`` statement itself other than "disk full" gives ``Indeterminate``: the transaction may or
may not be on disk.
"""

from __future__ import annotations

import asyncio
import math
import os
import sqlite3
import weakref
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from .._errors import InvalidOptions, Unavailable
from ._base import Backend, Envelope, EnvelopeId, Receipt, Stored, StoredEvent, Write
from ._sqlite_jobs import (
    ABANDON,
    COMMIT,
    DUE,
    EVENTS,
    EXISTS,
    LIST,
    LOAD,
    PRUNE,
    RECEIPT,
    STOP,
    Channel,
)
from ._sqlite_process import Link
from ._sqlite_reader import Reader
from ._sqlite_schema import SYNCHRONOUS, Database, FileLock
from ._sqlite_writer import Stats, Writer

__all__ = ["SQLite"]

#: The largest seq (and page size) SQLite can bind: its integers are 64-bit.
_MAX_SEQ = 2**63 - 1


class SQLite(Backend):
    """Store worlds in one SQLite file: one machine, durable, one process at a time.

    ``path`` is the database file (created if missing; its folder must exist). Next to it live
    ``<path>-wal`` and ``<path>-shm`` (SQLite's WAL) and ``<path>.lock`` (the process lock, holding
    the owner's pid). Several worlds can share a file: every row is keyed by the world's name.

    Options (keyword-only):

    - ``synchronous``: ``"FULL"`` (default) or ``"NORMAL"``, case-insensitive. ``FULL``: every
      commit that returned survives a power loss. ``NORMAL`` (in WAL mode): faster; a commit that
      returned survives a crash of the process, but a power loss or an operating system crash may
      lose the last transactions. It never corrupts the database and never keeps part of a
      transaction.
    - ``busy_timeout``: seconds to wait for a lock held by another connection (for example a
      foreign ``sqlite3`` shell reading the file) before giving up with ``Unavailable``.
    - ``writer``: ``"process"`` (default): the writer runs in a child process, so that its
      transactions overlap the event loop's work (see ``_sqlite_process``); ``"thread"``: in a
      thread of this process (where a process cannot be started, as in an embedded interpreter).
    - ``max_pages``: caps the database at that many pages (``PRAGMA max_page_count``; pages are
      4 KiB by default): a commit that would grow it further fails with ``Unavailable`` ("database
      or disk is full") and changes nothing. ``None`` (default): no cap. Meant for tests of a full
      disk and for quotas.

    ``durable`` is True: a commit is durable when ``commit`` returns (see ``synchronous``).
    Cancelling ``commit()`` does not withdraw the write: it may still commit.

    ``open`` may be called again after ``aclose`` on the same object (for the same or another
    world); ``open`` while open raises ``InvalidOptions``. The lock uses ``fcntl.flock``: POSIX
    only, and not reliable on network file systems.
    """

    scope: ClassVar[str] = "one machine"
    durable: ClassVar[bool] = True
    max_batch: ClassVar[int] = 500  # so that two groups of callers take turns with the writer

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        busy_timeout: float = 5.0,
        max_pages: int | None = None,
        writer: str = "process",
        _on_connect: Callable[[sqlite3.Connection], object] | None = None,
    ) -> None:
        try:
            self._path = os.fspath(path)
        except TypeError:
            raise InvalidOptions(
                f"SQLite path is a str or os.PathLike; got {type(path).__qualname__}"
            ) from None
        if not isinstance(self._path, str):
            raise InvalidOptions("SQLite path is a str or os.PathLike[str], not bytes")
        if self._path in ("", ":memory:") or "\0" in self._path:
            raise InvalidOptions(f"SQLite needs a file path; got {self._path!r}")
        if not isinstance(synchronous, str) or synchronous.upper() not in SYNCHRONOUS:
            raise InvalidOptions(f"synchronous is 'FULL' or 'NORMAL'; got {synchronous!r}")
        self._synchronous = synchronous.upper()
        if (
            isinstance(busy_timeout, bool)
            or not isinstance(busy_timeout, int | float)
            or not math.isfinite(busy_timeout)
            or busy_timeout < 0
        ):
            raise InvalidOptions(f"busy_timeout is a number of seconds >= 0; got {busy_timeout!r}")
        self._busy_timeout = float(busy_timeout)
        if max_pages is not None and (
            isinstance(max_pages, bool) or not isinstance(max_pages, int) or max_pages < 1
        ):
            raise InvalidOptions(f"max_pages is None or an int >= 1; got {max_pages!r}")
        self._max_pages = max_pages
        if writer not in ("process", "thread"):
            raise InvalidOptions(f"writer is 'process' or 'thread'; got {writer!r}")
        # A connection hook (tests) needs the writer's connection in this process.
        self._writer = "thread" if _on_connect is not None else writer
        self._on_connect = _on_connect
        self._stats = Stats()
        self._session: _Session | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @property
    def path(self) -> str:
        """The database file's path, as given."""
        return self._path

    def __repr__(self) -> str:
        writer = "" if self._writer == "process" else f", writer={self._writer!r}"
        return f"SQLite({self._path!r}, synchronous={self._synchronous!r}{writer})"

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self, world: str) -> None:
        """Open the file for ``world``: lock it, start the writer (it makes the tables) and reader.

        Raises:
            StorageLocked: another process (or another open in this process) holds the file.
            Unavailable: the file cannot be opened (missing folder, not a database, newer schema).
            InvalidOptions: this object is already open, or ``world`` is not a str.
        """
        if self._session is not None:
            raise InvalidOptions(f"this SQLite backend is already open ({self._path})")
        if not isinstance(world, str):
            raise InvalidOptions(f"a world name is a str; got {type(world).__qualname__}")
        db = Database(
            self._path,
            world,
            synchronous_sql=SYNCHRONOUS[self._synchronous],
            busy_timeout=self._busy_timeout,
            max_pages=self._max_pages,
            on_connect=self._on_connect,
        )
        loop = asyncio.get_running_loop()
        session = _Session(db, self._stats, loop, self._writer)
        await session.start(loop)
        self._session = session
        self._finalizer = weakref.finalize(self, session.abandon)

    async def aclose(self) -> None:
        """Drain the queues, stop the writer and reader, close the connections, release the lock.

        Every commit that returned, and every commit still queued when this is called, is applied
        (or failed) before this returns; commits called after this raise ``Unavailable``.
        """
        session = self._session
        if session is None:
            return
        self._session = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        await session.stop(asyncio.get_running_loop())

    # -- the contract ----------------------------------------------------------------------

    def _open_session(self) -> _Session:
        session = self._session
        if session is None:
            raise Unavailable(f"the SQLite backend is not open ({self._path})")
        return session

    async def commit(self, writes: Sequence[Write]) -> list[bool]:
        """Apply each write whose conditions hold, with its events, receipts and outbox changes.

        A write's conditions: the stored version is still ``expected``, each outbox row it
        consumes is still waiting, and (an event write) no event of its entity with a seq above
        ``expected`` is stored.

        The writes join the writer's next transaction (group commit). When this returns the
        committed writes are durable, events included (to the level of ``synchronous``).
        Cancelling the awaiting task does not withdraw the writes: they may still commit.

        Raises:
            Unavailable: nothing was committed (disk full, I/O error, backend closed).
            Indeterminate: the ``COMMIT`` failed in a way that leaves its outcome unknown.
            TooLarge: a state or receipt is over SQLite's size limit (1 GB by default).
            InvalidKey: a type name, key or receipt id is not valid Unicode.
            TypeError: a write holds a value SQLite cannot store (a bug of the caller).

        Only the request at fault fails with the last three; the others of its group commit.
        """
        session = self._open_session()
        writes = tuple(writes)
        if not writes:
            return []
        result: list[bool] = await session.writes.request(COMMIT, writes)
        return result

    async def load_many(self, refs: Sequence[tuple[str, str]]) -> list[Stored | None]:
        """Return the committed rows of ``(type_name, key)`` refs, in order; None: not stored."""
        refs = tuple(refs)
        if not refs:
            self._open_session()
            return []
        result: list[Stored | None] = await self._read(LOAD, refs)
        return result

    async def read_events(
        self, type_name: str, key: str, *, after: int = 0, limit: int = 1000
    ) -> list[StoredEvent]:
        """Return up to ``limit`` committed events of an entity's log with ``seq > after``.

        In seq order; an entity without events (or never stored) has an empty log.
        """
        if limit <= 0:
            self._open_session()
            return []
        # SQLite's integers are 64-bit: clamp, so that huge bounds mean what they say.
        after = max(min(after, _MAX_SEQ), -1)
        limit = min(limit, _MAX_SEQ)
        result: list[StoredEvent] = await self._read(EVENTS, (type_name, key, after, limit))
        return result

    async def receipt(self, type_name: str, key: str, id: str) -> Receipt | None:
        """Return the committed receipt ``id`` of that entity, if stored."""
        result: Receipt | None = await self._read(RECEIPT, (type_name, key, id))
        return result

    async def list_keys(
        self, type_name: str, *, prefix: str = "", after: str | None = None, limit: int = 1000
    ) -> list[str]:
        """Return up to ``limit`` stored keys of a type starting with ``prefix``, ascending."""
        if limit <= 0:
            self._open_session()
            return []
        result: list[str] = await self._read(LIST, (type_name, prefix, after, limit))
        return result

    async def due(
        self,
        until: float,
        *,
        after: tuple[float, str, str, int, int] | None = None,
        limit: int = 1000,
    ) -> list[Envelope]:
        """Return up to ``limit`` committed outbox rows, not dead, due by ``until``, in key order.

        Only rows whose ``key()`` is above ``after`` (the key of the last row of the previous
        page), when given.
        """
        if limit <= 0:
            self._open_session()
            return []
        key = None if after is None else tuple(after)
        result: list[Envelope] = await self._read(DUE, (float(until), key, limit))
        return result

    async def exists(self, ids: Sequence[EnvelopeId]) -> list[bool]:
        """For each id, whether that outbox row is committed and waiting (stored, not dead)."""
        ids = tuple(ids)
        if not ids:
            self._open_session()
            return []
        result: list[bool] = await self._read(EXISTS, ids)
        return result

    def outbox_counts(self) -> dict[str, int]:
        """The world's outbox rows: ``{"messages": ..., "timers": ..., "dead": ...}`` (no I/O).

        Counted when the file is opened, then kept by the writer as commits apply: exact
        when a ``commit`` returns. All zero while closed.
        """
        session = self._session
        if session is None:
            return {"messages": 0, "timers": 0, "dead": 0}
        return dict(session.counts)

    async def prune_receipts(self, before: float) -> int:
        """Delete the world's receipts whose ``at`` is before ``before`` (by the writer)."""
        session = self._open_session()
        result: int = await session.writes.request(PRUNE, float(before), now=True)
        return result

    async def _read(self, kind: int, arg: object) -> Any:
        return await self._open_session().reads.request(kind, arg)

    def statistics(self) -> dict[str, object]:
        """Counters since this object was created (over every open).

        ``transactions``: committed write transactions (group commits); ``failed_transactions``:
        rolled back ones; ``commits``: ``commit()`` calls answered; ``writes``: writes in them;
        ``events``: events appended by committed transactions; ``conflicts``: writes that lost;
        ``largest_group`` / ``average_group``: ``commit()`` calls per transaction; ``pending``: jobs
        queued for the writer and not answered yet; ``outbox``: ``outbox_counts()``.
        """
        s = self._stats
        session = self._session
        return {
            "transactions": s.transactions,
            "failed_transactions": s.failed_transactions,
            "commits": s.commits,
            "writes": s.writes,
            "events": s.events,
            "conflicts": s.conflicts,
            "largest_group": s.largest_group,
            "average_group": s.commits / s.transactions if s.transactions else 0.0,
            "pending": 0 if session is None else session.writes.pending(),
            "outbox": self.outbox_counts(),
        }


class _Session:
    """One open file: the lock, the writer (a process, or a thread) and the reader thread.

    Refers to neither the ``SQLite`` object nor its ``World``, so that a forgotten backend can be
    collected (its finalizer stops the threads and the writer process).
    """

    def __init__(
        self, db: Database, stats: Stats, loop: asyncio.AbstractEventLoop, writer: str
    ) -> None:
        self.lock = FileLock(db.path)
        self.reads = Channel(loop)
        self.reader = Reader(db, self.reads)
        self.link: Link | None = None
        self.thread: Writer | None = None
        self.writes: Link | Channel
        if writer == "process":
            self.link = self.writes = Link(db, stats, loop)
        else:
            self.writes = channel = Channel(loop)
            self.thread = Writer(db, channel, self.lock, stats)

    @property
    def counts(self) -> dict[str, int]:
        """The world's outbox rows by kind, as the writer keeps them."""
        writer = self.link if self.link is not None else self.thread
        assert writer is not None
        return writer.counts

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Lock the file, then start the writer (which makes the tables), then the reader."""
        self.lock.acquire()  # raises StorageLocked / Unavailable; nothing started yet
        if self.link is not None:
            try:
                await self.link.start()
            except BaseException:
                self.lock.release()
                raise
        else:
            assert self.thread is not None
            try:
                ready = self.thread.start(loop)
            except BaseException:
                self.lock.release()
                raise
            # From here the writer thread owns the lock: it releases it when it stops.
        try:
            if self.thread is not None:
                await ready
            await self.reader.start(loop)
        except BaseException:
            self.abandon()
            raise

    async def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop the reader, then the writer, once they have run every job queued before."""
        # The reader first, so that the writer's connection is the last one and checkpoints.
        try:
            workers: list[Reader | Writer] = [self.reader]
            if self.thread is not None:
                workers.append(self.thread)
            for worker in workers:
                if worker.thread is None:
                    continue
                done: asyncio.Future[Any] = loop.create_future()
                worker.channel.put_now((STOP, None, done, loop))
                await asyncio.shield(done)
                worker.thread.join()  # it has answered: it is returning
            if self.link is not None:
                await self.link.stop()
                self.lock.release()
        except BaseException:  # cancelled: still stop both, without waiting
            self.abandon()
            raise

    def abandon(self) -> None:
        """Stop the reader and the writer without waiting (a failed open, a lost backend)."""
        self.reads.queue.put([ABANDON])
        if self.link is not None:
            # The lock goes once the child can write no more (as the writer thread does it).
            self.link.abandon(on_end=self.lock.release)
        elif isinstance(self.writes, Channel):
            self.writes.queue.put([ABANDON])
