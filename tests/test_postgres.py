"""The PostgreSQL backend beyond the contract: schema, sessions, URLs, two writers, restarts.

Every test runs on a PostgreSQL server started for the session
(``pachyderm.testing.PostgresServer``), on a schema of its own; the restart test starts a
server of its own.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

import pachyderm
from pachyderm import backends
from pachyderm.backends import Postgres, Write
from pachyderm.testing import PostgresServer

from .conftest import PostgresSchemas


class Counter(pachyderm.Entity):
    name = "tests.pg.Counter"

    def init(self) -> int:
        return 0

    def activate(self, message: Any, state: int) -> int:
        return state + 1


async def _tables(dsn: str, schema: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
        return {row[0] for row in rows}
    finally:
        await conn.close()


async def test_migrate_creates_the_versioned_schema_once(postgres_server: PostgresServer) -> None:
    dsn = postgres_server.dsn
    backend = Postgres(dsn, schema="migrated_once", migrate=False)
    with pytest.raises(pachyderm.Unavailable, match="pachyderm migrate"):
        await backend.open("default")  # not migrated yet, and told to leave it alone
    assert await _tables(dsn, "migrated_once") == set()
    assert await Postgres(dsn, schema="migrated_once").migrate() == 1
    assert await Postgres(dsn, schema="migrated_once").migrate() == 1  # idempotent
    assert {"meta", "entities", "receipts", "outbox", "events"} <= await _tables(
        dsn, "migrated_once"
    )
    async with pachyderm.World(
        Postgres(dsn, schema="migrated_once", migrate=False), entities=[Counter]
    ) as world:
        assert await world.activate((Counter, "c"), "+") == 1


async def test_concurrent_migrations_agree(postgres_server: PostgresServer) -> None:
    results = await asyncio.gather(
        *(Postgres(postgres_server.dsn, schema="raced").migrate() for _ in range(4))
    )
    assert results == [1, 1, 1, 1]


async def test_a_newer_schema_version_is_refused_untouched(
    postgres_server: PostgresServer,
) -> None:
    dsn = postgres_server.dsn
    await Postgres(dsn, schema="from_the_future").migrate()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("UPDATE from_the_future.meta SET value = '99'")
    finally:
        await conn.close()
    for backend in (
        Postgres(dsn, schema="from_the_future"),
        Postgres(dsn, schema="from_the_future", migrate=False),
    ):
        with pytest.raises(pachyderm.Unavailable, match="schema_version"):
            await backend.open("default")
    with pytest.raises(pachyderm.Unavailable, match="newer"):
        await Postgres(dsn, schema="from_the_future").migrate()


def test_the_migrate_command(postgres_server: PostgresServer) -> None:
    url = postgres_server.dsn + "?schema=by_cli"
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-m", "pachyderm", "migrate", "--db", url],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert (result.returncode, result.stdout) == (0, "schema 'by_cli' is at version 1\n"), (
            result.stderr
        )
    assert "events" in asyncio.run(_tables(postgres_server.dsn, "by_cli"))


async def test_every_session_sets_keepalives_and_timeouts(postgres: PostgresSchemas) -> None:
    backend = postgres.new()
    await backend.open("default")
    try:
        async with backend._pool.acquire() as conn:  # type: ignore[attr-defined]
            shown = {
                name: await conn.fetchval(f"SHOW {name}")
                for name in (
                    "tcp_keepalives_idle",
                    "tcp_keepalives_interval",
                    "tcp_keepalives_count",
                    "tcp_user_timeout",
                    "idle_in_transaction_session_timeout",
                )
            }
    finally:
        await backend.aclose()
    assert shown == {
        "tcp_keepalives_idle": "10",
        "tcp_keepalives_interval": "5",
        "tcp_keepalives_count": "3",
        "tcp_user_timeout": "20000",
        "idle_in_transaction_session_timeout": "5s",
    }


def test_urls_and_bad_options() -> None:
    backend = backends.open("postgresql://u@127.0.0.1:5/db?schema=mine&sslmode=disable")
    assert isinstance(backend, Postgres)
    assert backend.schema == "mine"
    assert backend._dsn == "postgresql://u@127.0.0.1:5/db?sslmode=disable"
    assert isinstance(backends.open("postgres://u@h/db"), Postgres)
    for bad in ("Mine", "1x", "a-b", "x" * 64, ""):
        with pytest.raises(pachyderm.InvalidOptions):
            Postgres("postgresql://u@h/db", schema=bad)
    with pytest.raises(pachyderm.InvalidOptions):
        Postgres("")
    with pytest.raises(pachyderm.InvalidOptions):
        Postgres("postgresql://u@h/db", min_size=3, max_size=2)


async def test_an_unreachable_database_is_unavailable() -> None:
    backend = Postgres("postgresql://postgres@127.0.0.1:1/postgres", connect_timeout=2)
    with pytest.raises(pachyderm.Unavailable, match="cannot connect"):
        await backend.open("default")


async def test_two_processes_sharing_a_world_never_fork_a_counter(
    postgres: PostgresSchemas,
) -> None:
    """Two worlds (as two processes would) on one schema: the database decides every commit."""
    first = postgres.new()
    second = postgres.reopen(first)
    async with (
        pachyderm.World(first, entities=[Counter]) as a,
        pachyderm.World(second, entities=[Counter]) as b,
    ):
        results = await asyncio.gather(
            *(w.activate((Counter, "shared"), "+") for _ in range(40) for w in (a, b))
        )
        # Each acknowledged value is unique (no two commits of one version) and none is lost.
        assert sorted(results) == list(range(1, 81))
        assert a.statistics()["conflicts"] + b.statistics()["conflicts"] > 0  # type: ignore[operator]
    # (Each world's `read` is its own cache: the storage's state is read by a fresh world.)
    async with pachyderm.World(postgres.reopen(first), entities=[Counter]) as fresh:
        assert await fresh.read((Counter, "shared")) == 80


async def test_a_stale_writer_loses_on_the_database(postgres: PostgresSchemas) -> None:
    backend = postgres.new()
    await backend.open("default")
    try:
        assert await backend.commit([Write("T", "k", 0, 1, 1, b"one")]) == [True]
        # Two writers that read version 1: only the first commit wins, wherever it runs.
        results = await asyncio.gather(
            *(backend.commit([Write("T", "k", 1, 2, 1, b"%d" % i)]) for i in range(10))
        )
        assert sorted(r[0] for r in results) == [False] * 9 + [True]
        assert backend.statistics()["slow"] >= 9  # type: ignore[operator]
    finally:
        await backend.aclose()


async def test_the_world_survives_a_restart_of_postgres_under_load() -> None:
    server = PostgresServer().start()
    acknowledged: dict[str, int] = {}
    try:
        backend = Postgres(server.dsn, max_size=4)
        async with pachyderm.World(backend, entities=[Counter]) as world:
            stop = asyncio.Event()
            errors: list[BaseException] = []

            async def caller(key: str) -> None:
                while not stop.is_set():
                    try:
                        acknowledged[key] = await world.activate((Counter, key), "+")
                    except (pachyderm.Unavailable, pachyderm.Indeterminate) as exc:
                        errors.append(exc)
                        await asyncio.sleep(0.05)

            tasks = [asyncio.create_task(caller(f"k{i}")) for i in range(8)]
            await asyncio.sleep(0.5)
            await asyncio.to_thread(server.restart)
            before = dict(acknowledged)
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*tasks)
            assert any(acknowledged[k] > before.get(k, 0) for k in acknowledged), (
                "no activation succeeded after the restart"
            )
            for key, value in acknowledged.items():
                assert await world.read((Counter, key)) >= value  # nothing acknowledged is lost
        async with pachyderm.World(Postgres(server.dsn), entities=[Counter]) as world:
            for key, value in acknowledged.items():
                assert await world.read((Counter, key)) >= value
    finally:
        server.stop()


@pytest.mark.parametrize("committed", [False, True])
async def test_a_connection_lost_at_commit_is_indeterminate_and_emits_nothing(
    postgres: PostgresSchemas, monkeypatch: pytest.MonkeyPatch, committed: bool
) -> None:
    """The connection dies at COMMIT (before it reached the server, or after): ``Indeterminate``.

    Nothing is told to followers, and a retry with the idempotency key learns the outcome
    without running twice.
    """
    from asyncpg.transaction import Transaction  # type: ignore[import-untyped]

    original = Transaction.commit
    armed = [True]

    async def commit(self: Any) -> None:
        if not armed[0] or self._nested:
            return await original(self)  # type: ignore[no-any-return]
        armed[0] = False
        if committed:
            await original(self)  # it commits; then its reply is lost
            raise asyncpg.exceptions.ConnectionDoesNotExistError("connection lost at COMMIT")
        killer = await asyncpg.connect(postgres.server.dsn)
        try:  # the server drops the session before COMMIT arrives: rolled back
            await killer.execute(
                "SELECT pg_terminate_backend($1)", self._connection.get_server_pid()
            )
        finally:
            await killer.close()
        await original(self)  # fails: the connection is gone

    async with pachyderm.World(postgres.new(), entities=[Counter]) as world:
        assert await world.activate((Counter, "c"), "+") == 1
        follower = world.follow((Counter, "c"), versions=True)
        assert await follower.__anext__() == (1, 1)
        monkeypatch.setattr(Transaction, "commit", commit)
        with pytest.raises(pachyderm.Indeterminate, match="PostgreSQL COMMIT failed"):
            await world.activate((Counter, "c"), "+", idempotency_key="once")
        assert follower._channel is not None
        assert follower._channel.pop_nowait() is None
        # The retry: the receipt if it committed, else it runs now; either way, once.
        assert await world.activate((Counter, "c"), "+", idempotency_key="once") == 2
        assert await world.activate((Counter, "c"), "+", idempotency_key="once") == 2
        assert await follower.__anext__() == (2, 2)
        await follower.aclose()
        assert await world.read((Counter, "c")) == 2


def test_a_pickling_type_is_refused_on_a_networked_backend() -> None:
    class Pickled(pachyderm.Entity):
        name = "tests.pg.Pickled"
        pickle = True

        def activate(self, message: Any, state: Any) -> Any:
            return {message}

    backend = Postgres("postgresql://u@127.0.0.1:1/db")
    with pytest.raises(pachyderm.InvalidOptions, match="pickle"):
        pachyderm.World(backend, entities=[Counter, Pickled])
    pachyderm.World(backend, entities=[Counter])  # the others are fine
    pachyderm.World(backends.Memory(), entities=[Pickled])  # and local storage may pickle

    class SharedMemory(backends.Memory):
        """Local storage that says it can hold leases (not networked): a node would take it."""

        def claim(self) -> None: ...

    with pytest.raises(pachyderm.InvalidOptions, match="a cluster node reads states over"):
        # A node also receives states from other nodes: no pickling type, whatever the backend.
        pachyderm.World(SharedMemory(), entities=[Pickled], listen="127.0.0.1:0", secret="s" * 32)
