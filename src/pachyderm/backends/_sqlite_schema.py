"""The SQLite backend's file: the process lock, the tables, and how each thread connects.

The writer's connection creates the tables of a new file and migrates those of an older layout
(``schema_version`` 1: no outbox; 2: no event log) in one transaction, so that a failed
migration leaves the file as it was; a file of a newer layout is refused, untouched.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

from .._errors import StorageLocked, Unavailable

if sys.platform != "win32":
    import fcntl

__all__ = [
    "SCHEMA_VERSION",
    "SYNCHRONOUS",
    "Database",
    "FileLock",
    "write_transaction",
]

#: The version of the tables' layout; stored in ``meta`` as ``schema_version``. Version 1 (the
#: tables ``meta``, ``entities`` and ``receipts``) and version 2 (``outbox`` added) are migrated
#: to 3 (``events`` added, and the columns ``entities.snapshot`` and ``entities.log``) on open.
SCHEMA_VERSION: Final = 3

_META: Final = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY NOT NULL, value) WITHOUT ROWID"
)
_SCHEMA: Final = (
    # ``snapshot`` and ``log`` (schema version 3) are NULL for a state entity's row; for an
    # event-sourced entity, ``snapshot`` is the seq of the state in ``state`` (0: none yet,
    # ``state`` is empty) and ``log`` the id of its log in ``events`` (see ``_sqlite_logs``).
    "CREATE TABLE IF NOT EXISTS entities ("
    " world TEXT NOT NULL, type TEXT NOT NULL, key TEXT NOT NULL,"
    " version INTEGER NOT NULL, type_version INTEGER NOT NULL, state BLOB NOT NULL,"
    " snapshot INTEGER NULL, log INTEGER NULL,"
    " PRIMARY KEY (world, type, key)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS receipts ("
    " world TEXT NOT NULL, type TEXT NOT NULL, key TEXT NOT NULL, id TEXT NOT NULL,"
    " version INTEGER NOT NULL, result BLOB NOT NULL, at REAL NOT NULL,"
    " PRIMARY KEY (world, type, key, id)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS receipts_by_time ON receipts (world, at)",
    # Schema version 2: the outbox. A row waits (``dead`` NULL) until a receiver's write consumes
    # it; a dead letter keeps its row with ``dead`` set to why its handler failed.
    "CREATE TABLE IF NOT EXISTS outbox ("
    " world TEXT NOT NULL, sender_type TEXT NOT NULL, sender_key TEXT NOT NULL,"
    " version INTEGER NOT NULL, idx INTEGER NOT NULL, to_type TEXT NOT NULL, to_key TEXT NOT NULL,"
    " due REAL NOT NULL, name TEXT NULL, message BLOB NOT NULL, dead TEXT NULL,"
    " PRIMARY KEY (world, sender_type, sender_key, version, idx)) WITHOUT ROWID",
    # Paging of the timers waiting, in `Envelope.key()` order. Messages (due 0) are paged in the
    # primary key's order, which is theirs: keeping them out of this index spares two B-tree
    # changes per message (its insert and its consume).
    "CREATE INDEX IF NOT EXISTS outbox_timers_by_due"
    " ON outbox (world, due, sender_type, sender_key, version, idx)"
    " WHERE dead IS NULL AND due > 0",
    # One waiting row per sender and name. Dead letters keep their name but leave the index (as
    # in Memory, a dead timer no longer holds its name): a new timer of that name can be stored.
    "CREATE UNIQUE INDEX IF NOT EXISTS outbox_by_name"
    " ON outbox (world, sender_type, sender_key, name) WHERE name IS NOT NULL AND dead IS NULL",
    # Schema version 3: the logs of event-sourced entities, one row per event. The primary key is
    # the fence: two writes can never both store seq n of one entity.
    "CREATE TABLE IF NOT EXISTS events ("
    " log INTEGER NOT NULL, seq INTEGER NOT NULL, type_version INTEGER NOT NULL,"
    " event BLOB NOT NULL, PRIMARY KEY (log, seq)) WITHOUT ROWID",
)
#: Made after the migrations (they add the column it indexes): one log per id, and the largest
#: id found at once.
_INDEXES: Final = (
    "CREATE UNIQUE INDEX IF NOT EXISTS entities_by_log ON entities (log) WHERE log IS NOT NULL",
)
#: What a file of an older version needs beyond ``_SCHEMA`` (whose tables it creates if missing),
#: by the version that added it: a column of a table that the older file already has.
_MIGRATIONS: Final = (
    (3, "ALTER TABLE entities ADD COLUMN snapshot INTEGER NULL"),
    (3, "ALTER TABLE entities ADD COLUMN log INTEGER NULL"),
)
#: The versions a file may have and be opened (the older ones are migrated).
_KNOWN: Final = (1, 2, SCHEMA_VERSION)
#: Outbox rows of a world, by (dead, timer): what `outbox_counts` starts from.
_COUNT_OUTBOX: Final = (
    "SELECT dead IS NOT NULL, due != 0, count(*) FROM outbox WHERE world = ? GROUP BY 1, 2"
)
#: Each connection's page cache, in KiB (SQLite's default is 2 000 KiB). A miss on a large
#: file then reads from this cache rather than from the operating system: with a million
#: entities, the writer process's transactions took half the time (``docs/performance.md``).
#: It is a bound, not an allocation: a small file uses only what it has.
CACHE_KIB: Final = 65536
#: Pages in the WAL before a commit copies them back into the file (SQLite's default: 1000).
#: Random updates among many rows dirty a page each: a bigger WAL holds many updates of the
#: same page, copied back once. The WAL stays at most about 40 MiB before each checkpoint.
WAL_AUTOCHECKPOINT: Final = 10000
#: The accepted values of the ``synchronous`` option, and their statement.
SYNCHRONOUS: Final = {"FULL": "PRAGMA synchronous = FULL", "NORMAL": "PRAGMA synchronous = NORMAL"}

# Files open in this process (real paths), so that a second open fails with a clear message.
_held: set[str] = set()
#: Held while a lock is taken or released, and while a writer process is started (so that no
#: lock descriptor is closed while a new process holds a copy of it, between fork and exec).
held_lock = threading.Lock()


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE``, then ``COMMIT`` if the block ends normally, else ``ROLLBACK``."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


class FileLock:
    """One process per file: an exclusive ``flock`` on ``<path>.lock``, holding the owner's pid.

    The kernel releases a ``flock`` when its holder dies, however it dies (even by SIGKILL), so
    a new process can open the file at once. Mutable state: ``fd`` (held or not), changed by
    ``acquire`` on the loop and by ``release`` on the writer thread, under ``held_lock``.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.real = os.path.realpath(path)
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise ``StorageLocked`` (or ``Unavailable``) at once."""
        if sys.platform == "win32":  # pragma: no cover - POSIX only
            raise Unavailable("the SQLite backend needs fcntl.flock (POSIX)")
        with held_lock:
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
            self.fd = fd
            _held.add(self.real)

    def release(self) -> None:
        """Free the lock if held (harmless otherwise)."""
        with held_lock:
            fd, self.fd = self.fd, None
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                os.close(fd)  # releases the flock
                _held.discard(self.real)


class Database:
    """One world in one file: how the threads connect, and the queries both threads share.

    Mutable state: ``chunk`` (keys per ``IN (...)`` list), set from the connection's limit by
    whichever thread connects; every connection of a process has the same limit.
    """

    def __init__(
        self,
        path: str,
        world: str,
        *,
        synchronous_sql: str,
        busy_timeout: float,
        max_pages: int | None,
        on_connect: Callable[[sqlite3.Connection], object] | None,
    ) -> None:
        self.path = path
        self.world = world
        self.synchronous_sql = synchronous_sql
        self.busy_timeout = busy_timeout
        self.max_pages = max_pages
        self.on_connect = on_connect
        self.chunk = 400

    def connect(self, setup: Callable[[sqlite3.Connection], None]) -> sqlite3.Connection:
        """A new connection, configured; raises ``Unavailable`` (or the setup's error)."""
        try:
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None, cached_statements=256
            )
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

    def setup_writer(self, conn: sqlite3.Connection) -> None:
        """WAL, durability, the size cap, and the tables (created or checked)."""
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise Unavailable(f"{self.path}: SQLite refused WAL mode (journal_mode={mode})")
        conn.execute(self.synchronous_sql)
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT}")
        if self.max_pages is not None:
            conn.execute(f"PRAGMA max_page_count = {int(self.max_pages)}")
        with write_transaction(conn):
            # A new file gets the current version; a file of an older one is migrated (in this
            # transaction: a failure leaves it as it was); a newer one is left untouched.
            conn.execute(_META)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
                " ON CONFLICT (key) DO NOTHING",
                (SCHEMA_VERSION,),
            )
            (stored,) = conn.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'"
            ).fetchone()
            if type(stored) is not int or stored not in _KNOWN:
                raise Unavailable(
                    f"{self.path} has schema_version {stored!r}; this Pachyderm knows "
                    f"{SCHEMA_VERSION} (a newer Pachyderm wrote it?)"
                )
            for statement in _SCHEMA:
                conn.execute(statement)
            for version, statement in _MIGRATIONS:
                if stored < version:
                    conn.execute(statement)
            for statement in _INDEXES:
                conn.execute(statement)
            if stored != SCHEMA_VERSION:
                conn.execute(
                    "UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,)
                )
        if self.on_connect is not None:
            self.on_connect(conn)

    def count_outbox(self, conn: sqlite3.Connection) -> dict[str, int]:
        """The world's outbox rows now: ``{"messages": ..., "timers": ..., "dead": ...}``."""
        counts = {"messages": 0, "timers": 0, "dead": 0}
        for dead, timer, count in conn.execute(_COUNT_OUTBOX, (self.world,)):
            counts["dead" if dead else "timers" if timer else "messages"] += count
        return counts

    @staticmethod
    def setup_reader(conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA query_only = ON")
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")

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
                        f" WHERE world = ? AND type = ? AND key IN ({','.join('?' * len(part))})",
                        (self.world, type_name, *part),
                    )
                )
        return rows
