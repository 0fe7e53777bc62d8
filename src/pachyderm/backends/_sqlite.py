"""The SQLite backend: one machine, durable, stdlib ``sqlite3`` only.

How it works:

- **One file per process.** ``open`` takes an exclusive ``flock`` on a sidecar file
  ``<path>.lock`` (holding the owner's pid). A second process, or a second open of the same file in
  this process, gets ``StorageLocked`` at once.
- **One writer thread, group commit.** ``commit`` queues its writes and waits (the calls of one
  event loop iteration are handed over together, at the next iteration). The writer thread owns
  the only write connection: it takes *every* queued request at once and applies them all in one
  transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``), in call order, as if one after the other. Each
  caller is answered only after ``COMMIT`` returned. A write is applied only if the stored
  version is still its ``expected``: an ``UPDATE ... WHERE version = ?`` (or an insert for
  ``expected == 0``) per write, in two ``executemany``; if every row changed, every write won,
  else the transaction starts again, reads the stored versions and applies the winners only.
- **One reader thread.** ``load_many``, ``receipt`` and ``list_keys`` run on a second connection,
  which in WAL mode sees committed data only; reads queued together share one snapshot and loads
  queued together share their queries.
- **WAL journal.** Readers never block the writer and the writer never blocks readers.

When a write is durable: when ``commit`` returns. With ``synchronous="FULL"`` (the default) the
WAL is synced to disk by every ``COMMIT``, so a returned commit survives a crash of the process,
of the operating system and a power loss. With ``synchronous="NORMAL"`` a returned commit survives
a crash of the process, but a power loss or an operating system crash may lose the last
transactions (never corrupting the file, never keeping part of a transaction).

Cancellation: cancelling the task awaiting ``commit`` does not withdraw the write. It is already
queued for the writer thread and may still commit; the outcome is only unknown to the cancelled
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
import contextlib
import math
import os
import queue
import sqlite3
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, cast

from .._errors import (
    Indeterminate,
    InvalidKey,
    InvalidOptions,
    StorageLocked,
    TooLarge,
    Unavailable,
)
from ._base import Backend, Receipt, Stored, Write

if sys.platform != "win32":
    import fcntl

__all__ = ["SQLite"]

#: The version of the tables' layout; stored in ``meta`` as ``schema_version``.
SCHEMA_VERSION: Final = 1

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY NOT NULL, value) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS entities ("
    " world TEXT NOT NULL, type TEXT NOT NULL, key TEXT NOT NULL,"
    " version INTEGER NOT NULL, type_version INTEGER NOT NULL, state BLOB NOT NULL,"
    " PRIMARY KEY (world, type, key)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS receipts ("
    " world TEXT NOT NULL, type TEXT NOT NULL, key TEXT NOT NULL, id TEXT NOT NULL,"
    " version INTEGER NOT NULL, result BLOB NOT NULL, at REAL NOT NULL,"
    " PRIMARY KEY (world, type, key, id)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS receipts_by_time ON receipts (world, at)",
)
_SYNCHRONOUS: Final = {"FULL": "PRAGMA synchronous = FULL", "NORMAL": "PRAGMA synchronous = NORMAL"}

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
_GET_RECEIPT: Final = (
    "SELECT version, result, at FROM receipts WHERE world = ? AND type = ? AND key = ? AND id = ?"
)
_PRUNE: Final = "DELETE FROM receipts WHERE world = ? AND at < ?"
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

# SQLite's primary result codes that matter here (extended codes carry them in the low byte).
_SQLITE_FULL: Final = 13
_SQLITE_TOOBIG: Final = 18
# Codes a single request can cause: full (for a large one), too big, constraint (a NULL),
# datatype mismatch, bind index out of range.
_REQUEST_CODES: Final = frozenset({_SQLITE_FULL, _SQLITE_TOOBIG, 19, 20, 25})

# The kinds of queued jobs.
_COMMIT: Final = 0
_PRUNE_JOB: Final = 1
_LOAD: Final = 2
_RECEIPT: Final = 3
_LIST: Final = 4
_STOP: Final = 5

_Loop = asyncio.AbstractEventLoop
_Future = asyncio.Future[Any]
# (kind, argument, future, loop): a request and where to answer it.
_Job = tuple[int, Any, _Future, _Loop]
_Outcome = tuple[_Future, object, BaseException | None]
#: A stop that nobody waits for (a failed open, a backend collected without ``aclose``).
_ABANDON: Final = cast("_Job", (_STOP, None, None, None))

# Files open in this process (real paths), so that a second open fails with a clear message.
_held: set[str] = set()
_held_lock = threading.Lock()


@dataclass(slots=True)
class _Stats:
    """Counters, written by the writer thread only."""

    transactions: int = 0
    failed_transactions: int = 0
    commits: int = 0
    writes: int = 0
    conflicts: int = 0
    largest_group: int = 0


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

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        busy_timeout: float = 5.0,
        max_pages: int | None = None,
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
        if not isinstance(synchronous, str) or synchronous.upper() not in _SYNCHRONOUS:
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
        self._on_connect = _on_connect
        self._stats = _Stats()
        self._session: _Session | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @property
    def path(self) -> str:
        """The database file's path, as given."""
        return self._path

    def __repr__(self) -> str:
        return f"SQLite({self._path!r}, synchronous={self._synchronous!r})"

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self, world: str) -> None:
        """Open the file for ``world``: lock it, create the tables if missing, start the threads.

        Raises:
            StorageLocked: another process (or another open in this process) holds the file.
            Unavailable: the file cannot be opened (missing folder, not a database, newer schema).
            InvalidOptions: this object is already open, or ``world`` is not a str.
        """
        if self._session is not None:
            raise InvalidOptions(f"this SQLite backend is already open ({self._path})")
        if not isinstance(world, str):
            raise InvalidOptions(f"a world name is a str; got {type(world).__qualname__}")
        loop = asyncio.get_running_loop()
        session = _Session(
            self._path,
            world,
            _SYNCHRONOUS[self._synchronous],
            self._busy_timeout,
            self._max_pages,
            self._on_connect,
            self._stats,
            loop,
        )
        session.lock()  # raises StorageLocked / Unavailable; nothing started yet
        ready: _Future = loop.create_future()
        try:
            session.writer = threading.Thread(
                target=session.writer_main,
                args=(ready, loop),
                name=f"pachyderm-sqlite-writer:{self._path}",
                daemon=True,
            )
            session.writer.start()
        except BaseException:
            session.unlock()
            raise
        # From here the writer thread owns the lock: it releases it when it stops.
        try:
            await ready
            ready = loop.create_future()
            session.reader = threading.Thread(
                target=session.reader_main,
                args=(ready, loop),
                name=f"pachyderm-sqlite-reader:{self._path}",
                daemon=True,
            )
            session.reader.start()
            await ready
        except BaseException:
            session.abandon()
            raise
        self._session = session
        self._finalizer = weakref.finalize(self, session.abandon)

    async def aclose(self) -> None:
        """Drain the queues, stop the threads, close the connections, release the lock.

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
        loop = asyncio.get_running_loop()
        # The reader first, so that the writer's connection is the last one and checkpoints.
        try:
            for channel, thread in (
                (session.reads, session.reader),
                (session.writes, session.writer),
            ):
                if thread is None:
                    continue
                done: _Future = loop.create_future()
                channel.put_now((_STOP, None, done, loop))
                await asyncio.shield(done)
                thread.join()  # it has answered: it is returning
        except BaseException:  # cancelled: still stop both threads, without waiting
            session.abandon()
            raise

    # -- the contract ----------------------------------------------------------------------

    def _open_session(self) -> _Session:
        session = self._session
        if session is None:
            raise Unavailable(f"the SQLite backend is not open ({self._path})")
        return session

    async def commit(self, writes: Sequence[Write]) -> list[bool]:
        """Apply each write whose ``expected`` version is still stored, with its receipts.

        The writes join the writer thread's next transaction (group commit). When this returns the
        committed writes are durable (to the level of ``synchronous``). Cancelling the awaiting
        task does not withdraw the writes: they may still commit.

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
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        session.writes.submit((_COMMIT, writes, future, loop))
        result: list[bool] = await future
        return result

    async def load_many(self, refs: Sequence[tuple[str, str]]) -> list[Stored | None]:
        """Return the committed rows of ``(type_name, key)`` refs, in order; None: not stored."""
        refs = tuple(refs)
        if not refs:
            self._open_session()
            return []
        result: list[Stored | None] = await self._read(_LOAD, refs)
        return result

    async def receipt(self, type_name: str, key: str, id: str) -> Receipt | None:
        """Return the committed receipt ``id`` of that entity, if stored."""
        result: Receipt | None = await self._read(_RECEIPT, (type_name, key, id))
        return result

    async def list_keys(
        self, type_name: str, *, prefix: str = "", after: str | None = None, limit: int = 1000
    ) -> list[str]:
        """Return up to ``limit`` stored keys of a type starting with ``prefix``, ascending."""
        if limit <= 0:
            self._open_session()
            return []
        result: list[str] = await self._read(_LIST, (type_name, prefix, after, limit))
        return result

    async def prune_receipts(self, before: float) -> int:
        """Delete the world's receipts whose ``at`` is before ``before`` (on the writer thread)."""
        session = self._open_session()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        session.writes.put_now((_PRUNE_JOB, float(before), future, loop))
        result: int = await future
        return result

    async def _read(self, kind: int, arg: object) -> Any:
        session = self._open_session()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        session.reads.submit((kind, arg, future, loop))
        return await future

    def statistics(self) -> dict[str, object]:
        """Counters since this object was created (over every open).

        ``transactions``: committed write transactions (group commits); ``failed_transactions``:
        rolled back ones; ``commits``: ``commit()`` calls answered; ``writes``: writes in them;
        ``conflicts``: writes that lost; ``largest_group`` / ``average_group``: ``commit()``
        calls per transaction; ``pending``: jobs queued for the writer thread.
        """
        s = self._stats
        session = self._session
        return {
            "transactions": s.transactions,
            "failed_transactions": s.failed_transactions,
            "commits": s.commits,
            "writes": s.writes,
            "conflicts": s.conflicts,
            "largest_group": s.largest_group,
            "average_group": s.commits / s.transactions if s.transactions else 0.0,
            "pending": 0 if session is None else session.writes.pending(),
        }


# -- the threads -----------------------------------------------------------------------------


def _settle(outcomes: list[_Outcome]) -> None:
    """On the event loop: answer the waiting callers (cancelled ones no longer listen)."""
    for future, result, error in outcomes:
        if future.done():
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


def _deliver(loop: _Loop, outcomes: list[_Outcome]) -> None:
    """From a thread: hand outcomes to their loop; a closed loop has nobody left to answer."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_settle, outcomes)


def _deliver_all(outcomes: Iterable[tuple[_Loop, _Outcome]]) -> None:
    by_loop: dict[_Loop, list[_Outcome]] = {}
    for loop, outcome in outcomes:
        by_loop.setdefault(loop, []).append(outcome)
    for loop, some in by_loop.items():
        _deliver(loop, some)


def _answer(job: _Job, result: object, error: BaseException | None) -> None:
    """Answer one job's waiter, if it has one."""
    if job is not _ABANDON:
        _deliver(job[3], [(job[2], result, error)])


def _answer_stop(job: _Job) -> None:
    _answer(job, None, None)


def _read_error(error: Exception, path: str) -> Exception:
    if isinstance(error, sqlite3.Error) and not isinstance(
        error, sqlite3.ProgrammingError | sqlite3.InterfaceError
    ):
        return Unavailable(f"SQLite could not read ({path}): {error}")
    return TypeError(f"the SQLite backend cannot read with these values: {error!r}")


class _Channel:
    """Jobs from the event loop to one thread, coalesced per loop iteration.

    ``submit`` (on the loop) collects the jobs of the current iteration and hands them over in
    one piece at the next one, so that the thread wakes up once per burst of calls (and does not
    fight the loop for the GIL while the burst is still coming in) and sees the whole burst.
    """

    def __init__(self, loop: _Loop) -> None:
        self.loop = loop
        self.queue: queue.SimpleQueue[list[_Job]] = queue.SimpleQueue()
        self.collected: list[_Job] = []
        self.queued = 0  # written on the loop only
        self.taken = 0  # written by the thread only

    def submit(self, job: _Job) -> None:
        """Queue a job from the event loop (handed over at the next loop iteration)."""
        if job[3] is not self.loop:  # another loop (another thread): no coalescing
            self.queue.put([job])
            return
        if not self.collected:
            self.loop.call_soon(self.flush)
        self.collected.append(job)

    def flush(self) -> None:
        jobs = self.collected
        if jobs:
            self.collected = []
            self.queued += len(jobs)
            self.queue.put(jobs)

    def put_now(self, job: _Job) -> None:
        """Queue a job at once, after the jobs collected so far."""
        self.flush()
        self.queue.put([job])

    def drain(self) -> list[_Job]:
        """On the thread: wait for jobs, then take every job already queued."""
        jobs = self.queue.get()
        get = self.queue.get_nowait
        with contextlib.suppress(queue.Empty):
            while True:
                jobs += get()
        self.taken += len(jobs)
        return jobs

    def pending(self) -> int:
        """How many jobs are collected or queued, not yet taken by the thread."""
        return max(0, len(self.collected) + self.queued - self.taken)


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


def _in_placeholders(n: int) -> str:
    return ",".join("?" * n)


class _Session:
    """One open file: the lock, the two threads and their queues.

    Refers to neither the ``SQLite`` object nor any event loop, so that a forgotten backend can be
    collected (its finalizer stops the threads).
    """

    def __init__(
        self,
        path: str,
        world: str,
        synchronous_sql: str,
        busy_timeout: float,
        max_pages: int | None,
        on_connect: Callable[[sqlite3.Connection], object] | None,
        stats: _Stats,
        loop: _Loop,
    ) -> None:
        self.path = path
        self.world = world
        self.synchronous_sql = synchronous_sql
        self.busy_timeout = busy_timeout
        self.max_pages = max_pages
        self.on_connect = on_connect
        self.stats = stats
        self.real = os.path.realpath(path)
        self.lock_fd: int | None = None
        self.writes = _Channel(loop)
        self.reads = _Channel(loop)
        self.writer: threading.Thread | None = None
        self.reader: threading.Thread | None = None
        self.chunk = 400  # keys per IN (...) list; updated from the connection's variable limit

    # -- the process lock --------------------------------------------------------------------

    def lock(self) -> None:
        if sys.platform == "win32":  # pragma: no cover - POSIX only
            raise Unavailable("the SQLite backend needs fcntl.flock (POSIX)")
        with _held_lock:
            if self.real in _held:
                raise StorageLocked(
                    f"{self.path} is already open in this process (pid {os.getpid()}); "
                    "one World per file"
                )
            lock_path = self.real + ".lock"
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise Unavailable(f"cannot open the lock file {lock_path}: {e}") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = ""
                with contextlib.suppress(OSError, ValueError):
                    holder = f" (pid {int(os.pread(fd, 32, 0).decode().strip())})"
                os.close(fd)
                if isinstance(e, BlockingIOError):
                    raise StorageLocked(
                        f"{self.path} is open in another process{holder}; "
                        f"one process per SQLite file (lock file {lock_path})"
                    ) from None
                raise Unavailable(f"cannot lock {lock_path}: {e}") from e
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.lock_fd = fd
            _held.add(self.real)

    def unlock(self) -> None:
        with _held_lock:
            fd, self.lock_fd = self.lock_fd, None
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                os.close(fd)  # releases the flock
                _held.discard(self.real)

    def abandon(self) -> None:
        """Stop both threads without waiting (a failed open, or a backend never closed)."""
        self.reads.queue.put([_ABANDON])
        self.writes.queue.put([_ABANDON])

    # -- connections -------------------------------------------------------------------------

    def connect(self) -> sqlite3.Connection:
        return sqlite3.connect(
            self.path,
            timeout=self.busy_timeout,
            isolation_level=None,
            cached_statements=256,
        )

    def setup_writer(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise Unavailable(f"{self.path}: SQLite refused WAL mode (journal_mode={mode})")
        conn.execute(self.synchronous_sql)
        if self.max_pages is not None:
            conn.execute(f"PRAGMA max_page_count = {int(self.max_pages)}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
                " ON CONFLICT (key) DO NOTHING",
                (SCHEMA_VERSION,),
            )
            (stored,) = conn.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'"
            ).fetchone()
            conn.execute("COMMIT")
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        if stored != SCHEMA_VERSION:
            raise Unavailable(
                f"{self.path} has schema_version {stored!r}; this Pachyderm knows "
                f"{SCHEMA_VERSION} (a newer Pachyderm wrote it?)"
            )
        if self.on_connect is not None:
            self.on_connect(conn)

    def open_connection(self, setup: Callable[[sqlite3.Connection], None]) -> sqlite3.Connection:
        """This thread's connection, configured; raises ``Unavailable`` (or the setup's error)."""
        try:
            conn = self.connect()
        except sqlite3.Error as e:
            raise Unavailable(f"cannot open {self.path}: {e}") from e
        try:
            setup(conn)
            with contextlib.suppress(sqlite3.Error):
                limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
                self.chunk = max(1, min(500, limit - 4))
        except BaseException as e:
            conn.close()
            if isinstance(e, sqlite3.Error):
                raise Unavailable(f"cannot open {self.path}: {e}") from e
            raise
        return conn

    # -- the writer thread -------------------------------------------------------------------

    def writer_main(self, ready: _Future, loop: _Loop) -> None:
        """The writer thread: owns the write connection and the lock until it stops."""
        stops: list[_Job] = []
        failure: BaseException | None = None
        try:
            try:
                conn = self.open_connection(self.setup_writer)
            except BaseException as e:
                failure = e
                return
            _deliver(loop, [(ready, None, None)])
            try:
                while not stops:
                    group: list[_Job] = []
                    for job in self.writes.drain():
                        if stops:  # queued after a stop: the backend is closed
                            self.refuse(job)
                        elif job[0] == _COMMIT:
                            group.append(job)
                        else:
                            if group:
                                self.guarded(self.commit_group, conn, group)
                                group = []
                            if job[0] == _PRUNE_JOB:
                                self.guarded(self.prune, conn, [job])
                            else:
                                stops.append(job)
                    if group:
                        self.guarded(self.commit_group, conn, group)
            finally:
                conn.close()
        finally:
            # Answer only once the lock is free, so that the caller may reopen at once.
            self.unlock()
            if failure is not None:
                _deliver(loop, [(ready, None, failure)])
            for job in stops:
                _answer_stop(job)

    def guarded(
        self,
        run: Callable[[sqlite3.Connection, list[_Job]], None],
        conn: sqlite3.Connection,
        jobs: list[_Job],
    ) -> None:
        """Run jobs; a bug must fail these jobs, never kill the thread (the others would hang)."""
        try:
            run(conn, jobs)
        except Exception as e:  # pragma: no cover - a bug in this module
            for job in jobs:
                error = Unavailable(f"internal error of the SQLite backend: {e!r}")
                _answer(job, None, error)

    def refuse(self, job: _Job) -> None:
        _answer(job, None, Unavailable(f"the SQLite backend is closed ({self.path})"))

    def commit_group(self, conn: sqlite3.Connection, group: list[_Job]) -> None:
        """Apply a group of commit requests in one transaction and answer each."""
        batches: list[tuple[Write, ...]] = [job[1] for job in group]
        outcomes: list[tuple[_Loop, _Outcome]] = []
        try:
            results = self.transact(conn, batches)
        except _Failed as failure:
            if len(group) > 1 and not failure.at_commit and _alone_may_help(failure.error):
                for job in group:  # one request at a time, so that only the culprit fails
                    self.commit_group(conn, [job])
                return
            for _, _, future, loop in group:
                outcomes.append((loop, (future, None, _public_error(failure, self.path))))
        else:
            for (_, _, future, loop), result in zip(group, results, strict=True):
                outcomes.append((loop, (future, result, None)))
        _deliver_all(outcomes)

    def transact(
        self, conn: sqlite3.Connection, batches: list[tuple[Write, ...]]
    ) -> list[list[bool]]:
        """One write transaction for all batches, applied in order; raises ``_Failed``."""
        world = self.world
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
            (t, k): version for t, k, version in self.select(conn, list(refs), "version")
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
        world = self.world
        conn.executemany(
            _UPSERT,
            [
                (world, w.type_name, w.key, w.version, w.type_version, w.data)
                for w in final.values()
            ],
        )
        return won, winners

    def select(
        self, conn: sqlite3.Connection, refs: list[tuple[str, str]], columns: str
    ) -> Iterable[tuple[Any, ...]]:
        """Rows ``(type, key, *columns)`` of the stored refs: one query per type and chunk."""
        by_type: dict[str, list[str]] = {}
        for type_name, key in refs:
            by_type.setdefault(type_name, []).append(key)
        chunk = self.chunk
        rows: list[tuple[Any, ...]] = []
        for type_name, keys in by_type.items():
            for i in range(0, len(keys), chunk):
                part = keys[i : i + chunk]
                rows.extend(
                    conn.execute(
                        f"SELECT type, key, {columns} FROM entities"  # noqa: S608 - placeholders only
                        f" WHERE world = ? AND type = ? AND key IN ({_in_placeholders(len(part))})",
                        (self.world, type_name, *part),
                    )
                )
        return rows

    def prune(self, conn: sqlite3.Connection, jobs: list[_Job]) -> None:
        for job in jobs:
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    count = conn.execute(_PRUNE, (self.world, job[1])).rowcount
                    conn.execute("COMMIT")
                finally:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
            except sqlite3.Error as e:
                _answer(job, None, Unavailable(f"SQLite could not prune receipts: {e}"))
            else:
                _answer(job, count, None)

    # -- the reader thread -------------------------------------------------------------------

    def setup_reader(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA query_only = ON")

    def reader_main(self, ready: _Future, loop: _Loop) -> None:
        """The reader thread: runs the queued reads on its own connection, batch by batch."""
        try:
            conn = self.open_connection(self.setup_reader)
        except BaseException as e:
            _deliver(loop, [(ready, None, e)])
            return
        _deliver(loop, [(ready, None, None)])
        stops: list[_Job] = []
        try:
            while not stops:
                jobs = self.reads.drain()
                stops = [job for job in jobs if job[0] == _STOP]
                work = [job for job in jobs if job[0] != _STOP]
                if work:
                    _deliver_all(self.read(conn, work))
        finally:
            conn.close()
            for job in stops:
                _answer_stop(job)

    def read(self, conn: sqlite3.Connection, jobs: list[_Job]) -> list[tuple[_Loop, _Outcome]]:
        """Run read jobs in one snapshot; the loads among them share their queries."""
        try:
            conn.execute("BEGIN")
        except sqlite3.Error as e:
            return [
                (loop, (future, None, _read_error(e, self.path))) for _, _, future, loop in jobs
            ]
        try:
            loads = [job for job in jobs if job[0] == _LOAD]
            out = self.load_jobs(conn, loads) if loads else []
            out.extend(self.one_read(conn, job) for job in jobs if job[0] != _LOAD)
        finally:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("COMMIT")
        return out

    def load_jobs(self, conn: sqlite3.Connection, jobs: list[_Job]) -> list[tuple[_Loop, _Outcome]]:
        """Answer load jobs with shared queries (a job with bad refs fails alone)."""
        refs: dict[tuple[str, str], None] = {}
        try:
            for job in jobs:
                refs.update(dict.fromkeys(job[1]))
            try:
                found = self.load_refs(conn, list(refs))
            except UnicodeEncodeError:  # such a ref was never stored: leave it out
                valid = [ref for ref in refs if _is_unicode(ref[0]) and _is_unicode(ref[1])]
                found = self.load_refs(conn, valid)
        except Exception as e:
            if len(jobs) > 1 and not isinstance(e, sqlite3.OperationalError):
                return [outcome for job in jobs for outcome in self.load_jobs(conn, [job])]
            return [
                (loop, (future, None, _read_error(e, self.path))) for _, _, future, loop in jobs
            ]
        out: list[tuple[_Loop, _Outcome]] = []
        for _, job_refs, future, loop in jobs:
            out.append((loop, (future, [found.get(ref) for ref in job_refs], None)))
        return out

    def load_refs(
        self, conn: sqlite3.Connection, refs: list[tuple[str, str]]
    ) -> dict[tuple[str, str], Stored]:
        return {
            (t, k): Stored(version, type_version, state)
            for t, k, version, type_version, state in self.select(
                conn, refs, "version, type_version, state"
            )
        }

    def one_read(self, conn: sqlite3.Connection, job: _Job) -> tuple[_Loop, _Outcome]:
        kind, arg, future, loop = job
        result: object
        try:
            if kind == _RECEIPT:
                try:
                    result = self.get_receipt(conn, *arg)
                except UnicodeEncodeError:  # not Unicode: never stored
                    result = None
            else:
                result = self.list_keys(conn, *arg)
        except Exception as e:
            return loop, (future, None, _read_error(e, self.path))
        return loop, (future, result, None)

    def get_receipt(
        self, conn: sqlite3.Connection, type_name: str, key: str, id: str
    ) -> Receipt | None:
        row = conn.execute(_GET_RECEIPT, (self.world, type_name, key, id)).fetchone()
        return None if row is None else Receipt(id, row[0], row[1], row[2])

    def list_keys(
        self,
        conn: sqlite3.Connection,
        type_name: str,
        prefix: str,
        after: str | None,
        limit: int,
    ) -> list[str]:
        # Keys start with `prefix` exactly when prefix <= key < _successor(prefix); in SQLite's
        # binary collation UTF-8 byte order is code point order, as for Python strings.
        if not _is_unicode(prefix) or not _is_unicode(type_name):
            return []
        if after is not None and after >= prefix:
            low, strict = _valid_floor(after)
        else:
            low, strict = prefix, False
        high = _successor(prefix)
        if high is None:
            sql = _LIST_FROM_ABOVE if strict else _LIST_FROM
            params: tuple[object, ...] = (self.world, type_name, low, limit)
        else:
            sql = _LIST_RANGE_ABOVE if strict else _LIST_RANGE
            params = (self.world, type_name, low, high, limit)
        return [key for (key,) in conn.execute(sql, params)]


def _is_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _valid_floor(after: str) -> tuple[str, bool]:
    """``(low, strict)`` such that the valid keys > ``after`` are those > or >= ``low``.

    ``after`` may hold a lone surrogate (which SQLite cannot bind); no stored key holds one, so
    the keys above ``after`` are those at or above its part before the surrogate + U+E000.
    """
    for i, char in enumerate(after):
        if "\ud800" <= char <= "\udfff":
            return after[:i] + "\ue000", False
    return after, True


def _successor(prefix: str) -> str | None:
    """The least string above every string starting with ``prefix`` (None: there is none)."""
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            nxt = last + 1
            if 0xD800 <= nxt <= 0xDFFF:
                nxt = 0xE000
            return prefix[:-1] + chr(nxt)
        prefix = prefix[:-1]
    return None
