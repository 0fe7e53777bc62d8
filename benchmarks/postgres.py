"""Benchmark of issue 6's first figure: one node on PostgreSQL against an asyncpg ceiling.

Usage: ``python benchmarks/postgres.py [--runs N] [--quick]``. It starts a PostgreSQL server
of its own (``pachyderm.testing.PostgresServer``: ``initdb`` and ``pg_ctl`` in a temporary
folder, on loopback, as an unprivileged user when run as root), and stops it at the end.

- world: 1000 concurrent callers over 10k entities, durable activations per second, on
  ``backends.Postgres`` (``run.world_rate``, as for the other backends);
- ceiling: asyncpg ``executemany`` of the same upserts (random keys of the 10k), in
  transactions of 1000 rows, on one connection: what the database does with no runtime.

They run alternately, ``--runs`` times; the report gives the medians and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import asyncpg  # type: ignore[import-untyped]  # noqa: E402
import run  # noqa: E402

from pachyderm import backends  # noqa: E402
from pachyderm.testing import PostgresServer  # noqa: E402


async def ceiling(dsn: str, keys: list[str], total: int, schema: str) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(
            f'CREATE TABLE {schema}.entities (world text, type text, key text COLLATE "C",'
            " version bigint, type_version integer, state bytea, PRIMARY KEY (world, type, key))"
        )
        rnd = random.Random(1)
        rows = [("default", "bench.Counter", keys[rnd.randrange(len(keys))]) for _ in range(total)]
        statement = (
            f"INSERT INTO {schema}.entities VALUES ($1, $2, $3, 1, 1, '\\x01')"
            " ON CONFLICT (world, type, key) DO UPDATE SET version = entities.version + 1,"
            " state = excluded.state"
        )
        started = time.perf_counter()
        for i in range(0, total, 1000):
            async with conn.transaction():
                await conn.executemany(statement, rows[i : i + 1000])
        return total / (time.perf_counter() - started)
    finally:
        await conn.close()


async def main(runs: int, quick: bool) -> None:
    keys = [f"k{i}" for i in range(10_000)]
    total = 30_000 if quick else 100_000
    server = await asyncio.to_thread(lambda: PostgresServer().start())
    try:
        got, ceil = [], []
        for n in range(runs):
            ceil.append(await ceiling(server.dsn, keys, total, f"ceiling{n}"))
            backend = backends.Postgres(server.dsn, schema=f"world{n}", max_size=8)
            got.append(await run.world_rate(backend, keys, 1000, total))
        run.report(
            "postgres, 1000 callers, 10k entities",
            "activations/s",
            got,
            ceil,
            peer="asyncpg executemany upserts in transactions of 1000",
        )
    finally:
        await asyncio.to_thread(server.stop)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test")
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.quick))
