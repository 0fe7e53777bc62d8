"""Benchmarks of issue 5's figures: event-sourced entities against state entities, same run.

Usage: ``python benchmarks/events.py [append] [load] [--runs N] [--quick]``.

- ``append``: events appended per second by 1000 concurrent commands (one event each) over 10k
  event-sourced entities on SQLite ``FULL``, as a ratio to state-based activations of the same
  shape (``run.Counter``) measured in the same run, interleaved.
- ``load``: the time to load (open the world, then ``read``) an entity with 100k events, with
  snapshots (``snapshot_every=100``) and without; with snapshots it is O(events since the last
  snapshot), so it is also compared with an entity of 1,099 events (99 after its last snapshot,
  as for the big one), and without snapshots with one of a tenth of the events (where the time
  grows with the log).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run

import pachyderm
from pachyderm import backends


class EventCounter(pachyderm.EventSourced):
    """The event-sourced twin of ``run.Counter``: each command appends one event."""

    name = "bench.EventCounter"

    def init(self) -> int:
        return 0

    def handle(self, command: Any, state: int) -> list[int]:
        return [1]

    def apply(self, event: int, state: int) -> int:
        return state + event


class Snapshotted(EventCounter):
    name = "bench.Log"
    snapshot_every = 100


class Unsnapshotted(EventCounter):
    name = "bench.Log"
    snapshot_every = None


async def event_rate(path: Path, keys: list[str], callers: int, total: int) -> float:
    async with pachyderm.World(backends.SQLite(path), entities=[EventCounter]) as world:

        def command(ref: tuple[type[pachyderm.Entity], str]) -> Awaitable[Any]:
            return world.activate((EventCounter, ref[1]), "increment")

        for i in range(0, len(keys), 1000):  # warm up: every entity stored first, as run.py does
            await asyncio.gather(*[command((EventCounter, k)) for k in keys[i : i + 1000]])
        return await run.drive(command, keys, callers, total)


async def scenario_append(runs: int, quick: bool) -> None:
    keys = [f"k{i}" for i in range(10_000)]
    total = 30_000 if quick else 100_000
    events, states = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            states.append(
                await run.world_rate(backends.SQLite(Path(tmp) / "s.db"), keys, 1000, total)
            )
            events.append(await event_rate(Path(tmp) / "e.db", keys, 1000, total))
    run.report(
        "sqlite FULL, 1000 concurrent commands, 10k entities: events appended",
        "events/s",
        events,
        states,
        peer="state-based activations",
    )


async def fill(path: Path, cls: type[EventCounter], count: int) -> None:
    async with pachyderm.World(backends.SQLite(path), entities=[cls]) as world:
        ref = (cls, "log")
        done = 0
        while done < count:  # 1000 events per command: the most one command may append
            n = min(1000, count - done)
            await world.append(ref, *([1] * n), expected=done)
            done += n


async def load_time(path: Path, cls: type[EventCounter], count: int) -> float:
    started = time.perf_counter()
    async with pachyderm.World(backends.SQLite(path), entities=[cls]) as world:
        state = await world.read((cls, "log"))
        elapsed = time.perf_counter() - started
    if state != count:
        raise AssertionError(f"loaded {state}, expected {count}")
    return elapsed


async def scenario_load(runs: int, quick: bool) -> None:
    # 99 events after the last snapshot: the most a load with snapshot_every=100 folds.
    big = (20_000 if quick else 100_000) + 99
    cases = [
        (Snapshotted, big, f"with snapshots, {big:,} events"),
        (Snapshotted, 1099, "with snapshots, 1,099 events"),
        (Unsnapshotted, big, f"without snapshots, {big:,} events"),
        (Unsnapshotted, big // 10, f"without snapshots, {big // 10:,} events"),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (cls, count, _) in enumerate(cases):
            path = Path(tmp) / f"log{i}.db"
            await fill(path, cls, count)
            paths.append(path)
        times: list[list[float]] = [[] for _ in cases]
        for _ in range(runs):
            for i, (cls, count, _) in enumerate(cases):
                times[i].append(await load_time(paths[i], cls, count))
    base = statistics.median(times[1])
    for (_, _, label), values in zip(cases, times, strict=True):
        med = statistics.median(values)
        print(
            f"load (open + read), {label}: median {med * 1000:,.1f} ms "
            f"(min {min(values) * 1000:,.1f}, max {max(values) * 1000:,.1f}); "
            f"{med / base:.2f}x the 1,099-event load with snapshots",
            flush=True,
        )


SCENARIOS = {"append": scenario_append, "load": scenario_load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", choices=[*SCENARIOS, []], default=[])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test")
    args = parser.parse_args()
    for name in args.scenarios or list(SCENARIOS):
        asyncio.run(SCENARIOS[name](args.runs, args.quick))


if __name__ == "__main__":
    main()
