"""Benchmarks of issue 2's figures, each against a ceiling or a peer measured in the same run.

Usage: ``python benchmarks/run.py [SCENARIO ...] [--runs N] [--quick]``; with no scenario, all.
Each scenario runs its measurement and its ceiling interleaved, ``--runs`` times, and prints the
median and min-max of the throughput and of the ratio. The machine is shared and noisy: the ratio
measured in the same run is the figure that matters, not the absolute number.

Scenarios: memory, sqlite, hot, scaling, resident_bytes, latency.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pachyderm
from pachyderm import backends

# Wall time by default; `--cpu` counts this process's CPU time instead, which other tenants of a
# shared machine disturb less (only for scenarios that never wait on the disk).
CLOCK: Callable[[], float] = time.perf_counter


class Counter(pachyderm.Entity):
    name = "bench.Counter"

    def init(self) -> int:
        return 0

    def activate(self, message: Any, state: int) -> int:
        return state + 1


async def drive(
    activate: Callable[[tuple[type[pachyderm.Entity], str]], Awaitable[Any]],
    keys: list[str],
    callers: int,
    total: int,
    seed: int = 1,
) -> float:
    """Run ``total`` calls from ``callers`` concurrent callers on random keys; return calls/s."""
    rnd = random.Random(seed)
    per = total // callers

    async def caller() -> None:
        for _ in range(per):
            await activate((Counter, keys[rnd.randrange(len(keys))]))

    started = CLOCK()
    await asyncio.gather(*[caller() for _ in range(callers)])
    return per * callers / (CLOCK() - started)


async def queue_ceiling(keys: list[str], callers: int, total: int) -> float:
    """The ceiling: a bare asyncio request/response through a queue, with the same callers."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[object, asyncio.Future[int]]] = asyncio.Queue()

    async def server() -> None:
        while True:
            _request, future = await queue.get()
            future.set_result(1)

    task = asyncio.ensure_future(server())

    async def activate(ref: object) -> int:
        future = loop.create_future()
        queue.put_nowait((ref, future))
        return await future

    try:
        return await drive(activate, keys, callers, total)
    finally:
        task.cancel()


async def world_rate(
    backend: backends.Backend, keys: list[str], callers: int, total: int, **options: Any
) -> float:
    async with pachyderm.World(backend, entities=[Counter], **options) as world:

        def activate(ref: tuple[type[pachyderm.Entity], str]) -> Awaitable[Any]:
            # Returns the coroutine itself: one coroutine per call, as in the ceiling.
            return world.activate(ref, "increment")

        # Warm up: every entity resident (or stored) before the clock starts.
        for i in range(0, len(keys), 1000):
            await asyncio.gather(*[world.activate((Counter, k), "x") for k in keys[i : i + 1000]])
        return await drive(activate, keys, callers, total)


def sqlite_ceiling(path: Path, keys: list[str], total: int, batch: int) -> float:
    """sqlite3 upserts of the same rows, ``batch`` rows per transaction, WAL, synchronous=FULL."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS entities (world TEXT, type TEXT, key TEXT, version INT, "
            "type_version INT, state BLOB, PRIMARY KEY (world, type, key)) WITHOUT ROWID"
        )
        rnd = random.Random(1)
        rows = [("default", "T", keys[rnd.randrange(len(keys))]) for _ in range(total)]
        sql = (
            "INSERT INTO entities VALUES (?, ?, ?, 1, 1, x'01') ON CONFLICT (world, type, key) "
            "DO UPDATE SET version = version + 1, state = excluded.state"
        )
        started = time.perf_counter()
        for i in range(0, total, batch):
            db.execute("BEGIN IMMEDIATE")
            db.executemany(sql, rows[i : i + batch])
            db.execute("COMMIT")
        return total / (time.perf_counter() - started)
    finally:
        db.close()


def report(
    name: str,
    unit: str,
    values: list[float],
    ceilings: list[float] | None = None,
    peer: str = "ceiling",
) -> None:
    med = statistics.median(values)
    line = f"{name}: median {med:,.0f} {unit} (min {min(values):,.0f}, max {max(values):,.0f})"
    if ceilings:
        ratios = [v / c for v, c in zip(values, ceilings, strict=True)]
        line += (
            f"; {peer} median {statistics.median(ceilings):,.0f}; ratio median "
            f"{statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})"
        )
    print(line, flush=True)


async def scenario_memory(runs: int, quick: bool) -> None:
    keys = [f"k{i}" for i in range(10_000)]
    total = 50_000 if quick else 200_000
    got, ceil = [], []
    for _ in range(runs):
        ceil.append(await queue_ceiling(keys, 1000, total))
        got.append(await world_rate(backends.Memory(), keys, 1000, total))
    report("memory, 1000 callers, 10k entities", "activations/s", got, ceil)


async def scenario_sqlite(runs: int, quick: bool) -> None:
    keys = [f"k{i}" for i in range(10_000)]
    total = 30_000 if quick else 100_000
    got, ceil, single = [], [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            ceil.append(sqlite_ceiling(Path(tmp) / "c.db", keys, total, 1000))
            single.append(sqlite_ceiling(Path(tmp) / "s.db", keys, 2000, 1))
            backend = backends.SQLite(Path(tmp) / "w.db")
            got.append(await world_rate(backend, keys, 1000, total))
    report("sqlite FULL, 1000 callers, 10k entities", "activations/s", got, ceil)
    report("  vs one commit per activation", "activations/s", got, single)


async def scenario_hot(runs: int, quick: bool) -> None:
    total = 20_000 if quick else 100_000
    got = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            backend = backends.SQLite(Path(tmp) / "hot.db")
            got.append(await world_rate(backend, ["hot"], 64, total))
    report("sqlite FULL, one hot entity, 64 callers", "activations/s", got)


def sqlite_random_updates(n_keys: int, total: int) -> float:
    """The storage's own scaling: sqlite3 updates of random rows among ``n_keys``, 1000 a txn."""
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(Path(tmp) / "u.db", isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(
                "CREATE TABLE e (key TEXT PRIMARY KEY, version INT, state BLOB) WITHOUT ROWID"
            )
            keys = [f"k{i}" for i in range(n_keys)]
            db.execute("BEGIN")
            db.executemany("INSERT INTO e VALUES (?, 1, x'01')", [(k,) for k in keys])
            db.execute("COMMIT")
            rnd = random.Random(1)
            rows = [(keys[rnd.randrange(n_keys)],) for _ in range(total)]
            sql = "UPDATE e SET version = version + 1, state = x'02' WHERE key = ?"
            started = time.perf_counter()
            for i in range(0, total, 1000):
                db.execute("BEGIN IMMEDIATE")
                db.executemany(sql, rows[i : i + 1000])
                db.execute("COMMIT")
            return total / (time.perf_counter() - started)
        finally:
            db.close()


async def scenario_scaling(runs: int, quick: bool) -> None:
    """Throughput with 1M entities against 1k, passivation on (at most 10k resident).

    On Memory this is the runtime's own scaling (a reload is a dict lookup). On SQLite the
    storage's own scaling is measured too: random updates among 1M rows dirty a page each.
    """
    big = 100_000 if quick else 1_000_000
    total = 50_000 if quick else 200_000
    options = {"max_resident": 10_000, "idle_after": 5.0}
    small = [f"k{i}" for i in range(1000)]
    large = [f"k{i}" for i in range(big)]
    for label in ("memory", "sqlite FULL"):
        small_rates, big_rates, store_small, store_big = [], [], [], []
        for _ in range(runs):
            with tempfile.TemporaryDirectory() as tmp:
                backend_small: backends.Backend
                backend_big: backends.Backend
                if label == "memory":
                    backend_small, backend_big = backends.Memory(), backends.Memory()
                else:
                    backend_small = backends.SQLite(Path(tmp) / "s.db")
                    backend_big = backends.SQLite(Path(tmp) / "b.db")
                    store_small.append(sqlite_random_updates(1000, total))
                    store_big.append(sqlite_random_updates(big, total))
                small_rates.append(await world_rate(backend_small, small, 1000, total, **options))
                big_rates.append(await world_rate(backend_big, large, 1000, total, **options))
        report(f"{label}, {big:,} entities (max_resident 10k)", "activations/s", big_rates)
        report(f"  {label}: {big:,} vs 1,000 entities", "activations/s", big_rates, small_rates)
        if store_big:
            report(f"  sqlite3 itself: {big:,} vs 1,000 rows", "rows/s", store_big, store_small)


async def scenario_resident_bytes(runs: int, quick: bool) -> None:
    count = 20_000 if quick else 100_000
    per = []
    for _ in range(runs):
        async with pachyderm.World(backends.Memory(), entities=[Counter]) as world:
            keys = [f"entity-{i:08d}" for i in range(count)]  # made before measuring: the caller's
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            for i in range(0, count, 1000):
                await asyncio.gather(*[world.activate((Counter, k), 1) for k in keys[i : i + 1000]])
            await asyncio.sleep(0)
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            state_bytes = sum(len(r.data) for r in world._engine.residents.values())
            per.append((after - before - state_bytes) / count)
    report("resident idle entity, above its state", "bytes", per)


async def scenario_latency(runs: int, quick: bool) -> None:
    n = 2000 if quick else 10_000
    for label, make in (
        ("memory", lambda _p: backends.Memory()),
        ("sqlite FULL", lambda p: backends.SQLite(p / "l.db")),
    ):
        p50s, p99s = [], []
        for _ in range(runs):
            with tempfile.TemporaryDirectory() as tmp:
                async with pachyderm.World(make(Path(tmp)), entities=[Counter]) as world:
                    samples = []
                    for i in range(n):
                        started = time.perf_counter()
                        await world.activate((Counter, f"k{i % 100}"), 1)
                        samples.append(time.perf_counter() - started)
                    samples.sort()
                    p50s.append(samples[len(samples) // 2] * 1e6)
                    p99s.append(samples[int(len(samples) * 0.99)] * 1e6)
        report(f"latency {label}, one caller, p50", "us", p50s)
        report(f"latency {label}, one caller, p99", "us", p99s)


SCENARIOS = {
    "memory": scenario_memory,
    "sqlite": scenario_sqlite,
    "hot": scenario_hot,
    "scaling": scenario_scaling,
    "resident_bytes": scenario_resident_bytes,
    "latency": scenario_latency,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", choices=[*SCENARIOS, []], default=[])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--cpu", action="store_true", help="process CPU time, not wall time")
    args = parser.parse_args()
    if args.cpu:
        global CLOCK
        CLOCK = time.process_time
    clock = "process CPU time" if args.cpu else "wall time"
    print(
        f"python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}, runs {args.runs}, "
        f"{clock}"
    )
    for name in args.scenarios or list(SCENARIOS):
        asyncio.run(SCENARIOS[name](args.runs, args.quick))


if __name__ == "__main__":
    main()
