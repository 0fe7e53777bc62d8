"""The PostgreSQL backend: many machines share one database (``pip install pachyderm[postgres]``).

How it works:

- **A pool of asyncpg connections.** Each session sets ``tcp_keepalives_idle/interval/count``,
  ``tcp_user_timeout`` and ``idle_in_transaction_session_timeout``, so that a half-open
  connection or a paused client is noticed and its transaction rolled back by the server.
- **Group commit.** A ``commit(writes)`` call is one transaction: the conditional updates of all
  its entities in one statement (``UPDATE ... FROM unnest(...) WHERE version = expected``), the
  new rows in another, then the events, the outbox's consumes, cancels and sends, and the
  receipts, each one statement for the whole batch. If a condition fails for any write (a stale
  version, a consumed row that is gone, a taken seq), the transaction is rolled back and the
  writes are decided one by one, each in a savepoint: the losers are rolled back alone.
- **Conditions in the database.** A row's version (and a log's seq) is checked by the statement
  that changes it, under the row lock that PostgreSQL takes, so two writers of one entity, on
  any machines, cannot both win. (The partition epoch joins the condition with the cluster.)
- **Schema.** The tables live in a schema of their own (``schema``, default ``pachyderm``),
  keyed by world first; ``migrate()`` (and ``pachyderm migrate``) creates or migrates them
  under a table lock, and ``open`` does so too unless ``migrate=False``; a newer layout is
  refused.

When a write is durable: when ``commit`` returns (PostgreSQL's ``synchronous_commit`` decides
how: the default flushes the WAL before ``COMMIT`` returns). A connection lost during ``COMMIT``
gives ``Indeterminate``; lost before it, ``Unavailable`` (the server rolls the transaction back).
Cancelling the awaiting task may leave the outcome unknown, as for any database.

``outbox_counts()`` is kept in memory from the rows this process's commits changed (counted
when the world opens, and again after an ``Indeterminate`` commit): exact for one process, this
process's view when several share a world.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, ClassVar, Final

from .._errors import Indeterminate, InvalidKey, InvalidOptions, TooLarge, Unavailable
from ._base import Backend, Envelope, EnvelopeId, Receipt, Stored, StoredEvent, Write
from ._postgres_sql import SCHEMA_NAME, SCHEMA_VERSION, TABLES, sql
from ._postgres_writes import Batch, decide_one
from ._text import is_unicode, key_range

__all__ = ["SESSION_SETTINGS", "Postgres"]

#: Set on every session (seconds and milliseconds as PostgreSQL takes them).
SESSION_SETTINGS: Final = {
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "20000",
    # Our transactions never wait for anything but the database: one idle this long belongs
    # to a node that is paused or cut off, and its locks must not hold a takeover back.
    "idle_in_transaction_session_timeout": "5000",
    "application_name": "pachyderm",
}
_FIRST: Final = (0.0, "", "", 0, 0)
_MAX_INT: Final = 2**63 - 1
_CHUNK: Final = 10_000


def _failures(asyncpg: Any) -> tuple[type[BaseException], ...]:
    """The errors that mean "the database could not do it" (a connection, a server, a timeout)."""
    return (
        TimeoutError,
        OSError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        asyncpg.exceptions.InternalClientError,  # a connection broken mid-operation
    )


def _asyncpg() -> Any:
    try:
        import asyncpg  # type: ignore[import-untyped]
    except ImportError:
        raise Unavailable(
            "the PostgreSQL backend needs asyncpg: pip install 'pachyderm[postgres]'"
        ) from None
    return asyncpg


class Postgres(Backend):
    """Store worlds in a PostgreSQL database: many machines, durable.

    Args:
        dsn: a libpq connection string or ``postgresql://`` URL.
        schema: the schema that holds the tables (a lower-case identifier); several schemas
            share one database without touching each other.
        min_size, max_size: the connection pool's bounds (commits in flight at once use one
            connection each).
        migrate: create or migrate the tables when the world opens (default). With ``False``,
            a database not migrated yet is refused with ``Unavailable`` (run ``pachyderm
            migrate`` first).
        connect_timeout: seconds to wait for a connection.

    Raises:
        InvalidOptions: a bad schema name or pool size.
    """

    scope: ClassVar[str] = "many machines"
    durable: ClassVar[bool] = True
    networked: ClassVar[bool] = True

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "pachyderm",
        min_size: int = 1,
        max_size: int = 8,
        migrate: bool = True,
        connect_timeout: float = 10.0,
        command_timeout: float = 15.0,
    ) -> None:
        if not isinstance(dsn, str) or not dsn:
            raise InvalidOptions("Postgres needs a DSN: postgresql://user@host:port/database")
        if not isinstance(schema, str) or not SCHEMA_NAME.match(schema):
            raise InvalidOptions(
                f"a schema name is a lower-case identifier of at most 63 characters; got {schema!r}"
            )
        if not (type(min_size) is int and type(max_size) is int and 0 <= min_size <= max_size):
            raise InvalidOptions(
                f"pool sizes need 0 <= min_size <= max_size; got {min_size}, {max_size}"
            )
        if max_size < 1:
            raise InvalidOptions("max_size must be at least 1")
        self._dsn = dsn
        self.schema = schema
        self._sql = sql(schema)
        self._min, self._max = min_size, max_size
        self._migrate = bool(migrate)
        self._timeout = connect_timeout
        if not (isinstance(command_timeout, int | float) and command_timeout > 0):
            raise InvalidOptions(f"command_timeout is seconds > 0; got {command_timeout!r}")
        self._command_timeout = float(command_timeout)
        self._pool: Any = None
        self._world: str | None = None
        self._counts = {"messages": 0, "timers": 0, "dead": 0}
        self._recount = False
        self._stats = {"transactions": 0, "commits": 0, "writes": 0, "conflicts": 0, "slow": 0}

    def __repr__(self) -> str:
        return f"Postgres(schema={self.schema!r})"

    # ------------------------------------------------------------------ lifecycle

    async def open(self, world: str) -> None:
        """Connect (a pool), then create or check the tables; ``Unavailable`` if it cannot."""
        if self._pool is not None:
            raise InvalidOptions("this Postgres backend is already open for a world")
        asyncpg = _asyncpg()
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min,
                max_size=self._max,
                timeout=self._timeout,
                command_timeout=self._command_timeout,
                server_settings=SESSION_SETTINGS,
            )
        except (TimeoutError, OSError, asyncpg.PostgresError) as e:
            raise Unavailable(f"cannot connect to PostgreSQL: {e}") from e
        try:
            async with pool.acquire() as conn:
                if self._migrate:
                    await _migrate(conn, self.schema)
                else:
                    await _check_version(conn, self.schema)
                self._counts = await self._count_outbox(conn, world)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        self._world = world

    async def migrate(self) -> int:
        """Create the tables, or migrate them to this version; return the schema version.

        Idempotent, and safe to run from several processes at once (a table lock serialises
        them). Raises ``Unavailable`` for a newer layout or an unreachable database.
        """
        asyncpg = _asyncpg()
        try:
            conn = await asyncpg.connect(self._dsn, timeout=self._timeout)
        except (TimeoutError, OSError, asyncpg.PostgresError) as e:
            raise Unavailable(f"cannot connect to PostgreSQL: {e}") from e
        try:
            await _migrate(conn, self.schema)
        finally:
            await conn.close()
        return SCHEMA_VERSION

    async def aclose(self) -> None:
        """Close the pool. Every commit that returned before is durable."""
        pool, self._pool = self._pool, None
        self._world = None
        if pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), 10)

    def _open(self) -> tuple[Any, str]:
        if self._pool is None or self._world is None:
            raise Unavailable("the PostgreSQL backend is not open")
        return self._pool, self._world

    # ------------------------------------------------------------------ commits

    async def commit(self, writes: Sequence[Write]) -> list[bool]:
        """Apply each write whose conditions hold, in one transaction; one flag per write.

        Durable when it returns. Raises ``Unavailable`` (nothing committed) or
        ``Indeterminate`` (the connection was lost during ``COMMIT``).
        """
        pool, world = self._open()
        if not writes:
            return []
        asyncpg = _asyncpg()
        at_commit = committed = False
        failure: BaseException | None = None  # the first error, before any of the cleanup's
        won: list[bool] | None = None
        batch: Batch | None = None
        try:
            async with pool.acquire() as conn:
                try:
                    if self._recount:
                        self._counts = await self._count_outbox(conn, world)
                        self._recount = False
                    batch = Batch(conn, self._sql, world)
                    transaction = conn.transaction()
                    await transaction.start()
                    try:
                        await batch.check_fences(writes)
                        won = await batch.assume_all_win(writes)
                        if won is None:
                            await transaction.rollback()
                            self._stats["slow"] += 1
                            batch = Batch(conn, self._sql, world)
                            transaction = conn.transaction()
                            await transaction.start()
                            await batch.check_fences(writes)
                            won = [await decide_one(batch, w) for w in writes]
                        winners = [w for w, ok in zip(writes, won, strict=True) if ok]
                        await batch.put_receipts(winners)
                    except BaseException:
                        if not conn.is_closed():
                            with contextlib.suppress(Exception):
                                await transaction.rollback()
                        raise
                    at_commit = True
                    await transaction.commit()
                    committed = True
                except BaseException as e:
                    failure = e
                    raise
        except Exception as e:
            if not committed:
                raise self._commit_error(failure or e, at_commit, asyncpg) from (failure or e)
            # Committed; only giving the connection back to the pool failed: the pool drops it.
        assert won is not None
        assert batch is not None
        counts = self._counts
        self._counts = {kind: counts[kind] + batch.delta[kind] for kind in counts}
        stats = self._stats
        stats["transactions"] += 1
        stats["commits"] += 1
        stats["writes"] += len(writes)
        stats["conflicts"] += won.count(False)
        return won

    def _commit_error(self, error: BaseException, at_commit: bool, asyncpg: Any) -> Exception:
        """The error of a commit that did not return: what its callers are told."""
        if isinstance(error, UnicodeEncodeError):
            return InvalidKey(f"a type name, key or outbox text is not valid Unicode: {error}")
        if isinstance(error, asyncpg.exceptions.ProgramLimitExceededError):
            return TooLarge(f"a value is over PostgreSQL's limits: {error}")
        if at_commit:  # whatever it is: COMMIT was sent, or may have been
            self._recount = True
            return Indeterminate(f"PostgreSQL COMMIT failed, the outcome is unknown: {error}")
        if isinstance(error, _failures(asyncpg)):
            return Unavailable(f"PostgreSQL could not commit, nothing was written: {error}")
        if isinstance(error, Exception):
            return error  # not the database's: a bug, or a value it cannot take (TypeError)
        raise error  # pragma: no cover - BaseException (cancellation) goes through

    # ------------------------------------------------------------------ the cluster's rows
    #
    # Membership and partition leases, in the database's time (the nodes' clocks never decide
    # who owns a partition), used by the nodes of a cluster (``_cluster.py``); each call is one
    # statement, in its own transaction.

    async def cluster_size(self, partitions: int) -> int:
        """The world's number of partitions: ``partitions`` if it is the first to say, else
        what the first node said (compare, and refuse to join if they differ)."""
        _, world = self._open()
        if type(partitions) is not int or not 1 <= partitions <= 65_536:
            raise InvalidOptions(f"partitions is an int from 1 to 65536; got {partitions!r}")
        for _ in range(3):
            rows = await self._fetch("cluster", world, partitions)
            if rows:
                return int(rows[0][0])
            # Another node's first row was being inserted: the statement waited for it, and
            # its snapshot, taken before, does not see it. The next one does.
        raise Unavailable("could not read the cluster's number of partitions")

    async def join(
        self, node: str, address: str, types: str, *, timeout: float | None = None
    ) -> None:
        """Register (or refresh) a member: its id, where it listens, its entity types."""
        _, world = self._open()
        await self._fetch("join", world, node, address, types, timeout=timeout)

    async def heartbeat(self, node: str) -> None:
        _, world = self._open()
        await self._fetch("heartbeat", world, node)

    async def leave(self, node: str) -> None:
        _, world = self._open()
        await self._fetch("leave", world, node)

    async def forget_nodes(self, older_than: float) -> list[str]:
        """Delete the rows of nodes not heard from for ``older_than`` seconds; return their ids."""
        _, world = self._open()
        return [row[0] for row in await self._fetch("forget_nodes", world, float(older_than))]

    async def members(
        self, alive_within: float, *, timeout: float | None = None
    ) -> list[tuple[str, str, str]]:
        """``(id, address, types)`` of the members heard from within ``alive_within`` seconds."""
        _, world = self._open()
        rows = await self._fetch("members", world, float(alive_within), timeout=timeout)
        return [(row[0], row[1], row[2]) for row in rows]

    async def claim(
        self, node: str, partitions: Sequence[int], lease: float, *, timeout: float | None = None
    ) -> dict[int, int]:
        """Take the partitions that are free or expired (epoch + 1), and extend ``node``'s own.

        Returns ``{partition: epoch}`` of those ``node`` holds now, for ``lease`` seconds of the
        database's clock from the statement. ``timeout``: give up (``Unavailable``) rather
        than wait longer for a lease row that a commit of the old owner still locks.
        """
        _, world = self._open()
        rows = await self._fetch(
            "claim", world, node, sorted(set(partitions)), float(lease), timeout=timeout
        )
        return {row[0]: row[1] for row in rows}

    async def renew(
        self, node: str, held: dict[int, int], lease: float, *, timeout: float | None = None
    ) -> dict[int, int]:
        """Extend the leases ``node`` still holds at those epochs (and not expired); return them."""
        _, world = self._open()
        parts = sorted(held)
        rows = await self._fetch(
            "renew", world, node, float(lease), parts, [held[p] for p in parts], timeout=timeout
        )
        return {row[0]: row[1] for row in rows}

    async def release(self, node: str, held: dict[int, int]) -> list[int]:
        """Give partitions up (epoch + 1, no owner): another node may claim them at once."""
        _, world = self._open()
        parts = sorted(held)
        rows = await self._fetch("release", world, node, parts, [held[p] for p in parts])
        return sorted(row[0] for row in rows)

    async def nodes(self) -> tuple[int | None, list[tuple[str, str, str, float]]]:
        """The world's partition count (None: no node ever joined) and every node row:
        ``(id, address, types, seconds since its heartbeat)`` (for ``pachyderm status``)."""
        _, world = self._open()
        size = await self._fetch("cluster_of", world)
        rows = await self._fetch("nodes", world)
        return (size[0][0] if size else None), [(r[0], r[1], r[2], r[3]) for r in rows]

    async def leases(
        self, *, timeout: float | None = None
    ) -> list[tuple[int, str | None, int, float]]:
        """Every partition row: ``(partition, owner, epoch, seconds left on its lease)``."""
        _, world = self._open()
        rows = await self._fetch("leases", world, timeout=timeout)
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    # ------------------------------------------------------------------ reads

    async def _fetch(self, name: str, *args: Any, timeout: float | None = None) -> list[Any]:
        pool, _ = self._open()
        asyncpg = _asyncpg()
        try:
            return list(await pool.fetch(self._sql[name], *args, timeout=timeout))
        except _failures(asyncpg) as e:
            raise Unavailable(f"PostgreSQL could not read: {e}") from e

    async def load_many(self, refs: Sequence[tuple[str, str]]) -> list[Stored | None]:
        """The committed rows of the refs, in order (``None``: never stored)."""
        _, world = self._open()
        valid = [ref for ref in dict.fromkeys(refs) if is_unicode(ref[0]) and is_unicode(ref[1])]
        found: dict[tuple[str, str], Stored] = {}
        for i in range(0, len(valid), _CHUNK):
            part = valid[i : i + _CHUNK]
            rows = await self._fetch("load", world, [r[0] for r in part], [r[1] for r in part])
            for t, k, version, type_version, state, snapshot in rows:
                found[(t, k)] = Stored(version, type_version, bytes(state), snapshot)
        return [found.get(ref) for ref in refs]

    async def read_events(
        self, type_name: str, key: str, *, after: int = 0, limit: int = 1000
    ) -> list[StoredEvent]:
        """Up to ``limit`` committed events of an entity's log with ``seq > after``, in order."""
        _, world = self._open()
        if limit <= 0 or not (is_unicode(type_name) and is_unicode(key)):
            return []
        after = max(min(after, _MAX_INT), -1)
        rows = await self._fetch("events", world, type_name, key, after, min(limit, _MAX_INT))
        return [StoredEvent(seq, tv, bytes(event)) for seq, tv, event in rows]

    async def receipt(self, type_name: str, key: str, id: str) -> Receipt | None:
        _, world = self._open()
        if not (is_unicode(type_name) and is_unicode(key) and is_unicode(id)):
            return None
        rows = await self._fetch("receipt", world, type_name, key, id)
        return None if not rows else Receipt(id, rows[0][0], bytes(rows[0][1]), rows[0][2])

    async def prune_receipts(self, before: float) -> int:
        pool, world = self._open()
        asyncpg = _asyncpg()
        try:
            status = await pool.execute(self._sql["prune"], world, float(before))
        except _failures(asyncpg) as e:
            raise Unavailable(f"PostgreSQL could not prune receipts: {e}") from e
        return int(status.split()[-1])

    async def list_keys(
        self, type_name: str, *, prefix: str = "", after: str | None = None, limit: int = 1000
    ) -> list[str]:
        _, world = self._open()
        if limit <= 0 or not is_unicode(prefix) or not is_unicode(type_name):
            return []
        low, strict, high = key_range(prefix, after)
        limit = min(limit, _MAX_INT)
        if high is None:
            name = "list_above" if strict else "list_from"
            rows = await self._fetch(name, world, type_name, low, limit)
        else:
            name = "list_range_above" if strict else "list_range"
            rows = await self._fetch(name, world, type_name, low, high, limit)
        return [row[0] for row in rows]

    async def due(
        self,
        until: float,
        *,
        after: tuple[float, str, str, int, int] | None = None,
        limit: int = 1000,
    ) -> list[Envelope]:
        _, world = self._open()
        if limit <= 0:
            return []
        if after is None:
            after = _FIRST
        elif not (is_unicode(after[1]) and is_unicode(after[2])):
            raise InvalidKey("an outbox key to page after is not valid Unicode")
        out: list[Envelope] = []
        if after[0] <= 0.0 and until >= 0.0:
            rows = await self._fetch("messages", world, *after[1:], limit)
            out = [_envelope(row) for row in rows]
            after = _FIRST
        if len(out) < limit:
            rows = await self._fetch("timers", world, float(until), *after, limit - len(out))
            out += [_envelope(row) for row in rows]
        return out

    async def exists(self, ids: Sequence[EnvelopeId]) -> list[bool]:
        _, world = self._open()
        valid = [id for id in dict.fromkeys(ids) if is_unicode(id[0]) and is_unicode(id[1])]
        found: set[EnvelopeId] = set()
        for i in range(0, len(valid), _CHUNK):
            part = valid[i : i + _CHUNK]
            rows = await self._fetch(
                "exists",
                world,
                [p[0] for p in part],
                [p[1] for p in part],
                [p[2] for p in part],
                [p[3] for p in part],
            )
            found.update((r[0], r[1], r[2], r[3]) for r in rows)
        return [tuple(id) in found for id in ids]

    def outbox_counts(self) -> dict[str, int]:
        return dict(self._counts)

    async def _count_outbox(self, conn: Any, world: str) -> dict[str, int]:
        counts = {"messages": 0, "timers": 0, "dead": 0}
        for dead, timer, count in await conn.fetch(self._sql["count_outbox"], world):
            counts["dead" if dead else "timers" if timer else "messages"] += count
        return counts

    def statistics(self) -> dict[str, object]:
        """``transactions``, ``writes``, ``conflicts``, ``slow`` (batches decided one by one)."""
        pool = self._pool
        return {
            **self._stats,
            "pool_size": 0 if pool is None else pool.get_size(),
            "outbox": self.outbox_counts(),
        }


def _envelope(row: Any) -> Envelope:
    st, sk, version, idx, to_type, to_key, due, name, message = row
    return Envelope(st, sk, version, idx, to_type, to_key, due, name, bytes(message))


async def _check_version(conn: Any, schema: str) -> None:
    statements = sql(schema)
    try:
        stored = await conn.fetchval(statements["version"])
    except Exception as e:  # no schema, no table
        raise Unavailable(
            f"the PostgreSQL schema {schema!r} is not migrated: run `pachyderm migrate` ({e})"
        ) from e
    if stored is None or int(stored) != SCHEMA_VERSION:
        raise Unavailable(
            f"the PostgreSQL schema {schema!r} has schema_version {stored!r}; this Pachyderm "
            f"knows {SCHEMA_VERSION}: run `pachyderm migrate`"
        )


async def _migrate(conn: Any, schema: str) -> None:
    """Create or migrate the tables in one transaction, under a lock on ``meta``."""
    asyncpg = _asyncpg()
    statements = sql(schema)
    for attempt in range(3):
        try:
            async with conn.transaction():
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
                await conn.execute(statements["meta"])
                await conn.execute(statements["lock_meta"])
                stored = await conn.fetchval(statements["version"])
                if stored is not None and (not stored.isdigit() or int(stored) > SCHEMA_VERSION):
                    raise Unavailable(
                        f"the PostgreSQL schema {schema!r} has schema_version {stored!r}; this "
                        f"Pachyderm knows {SCHEMA_VERSION} (a newer Pachyderm wrote it?)"
                    )
                for statement in TABLES:
                    await conn.execute(statement.replace("{s}", schema))
                await conn.execute(statements["set_version"], str(SCHEMA_VERSION))
            return
        except asyncpg.exceptions.UniqueViolationError:
            if attempt == 2:  # another process made the schema at the same moment: again
                raise
        except _failures(asyncpg) as e:
            raise Unavailable(f"cannot migrate the PostgreSQL schema {schema!r}: {e}") from e
