"""Benchmarks of issue 3's figures: messages between entities, and durable timers.

Usage: ``python benchmarks/messages.py [SCENARIO ...] [--runs N] [--quick]``; with no scenario,
all. Every figure is a ratio to a peer measured in the same run, median of ``--runs``:

- ``chain``: one message hops along a chain of 10k entities (each hop: a delivery, an activation
  and a commit that consumes the message and stores the next); the peer is one caller running
  10k plain activations on 10k entities, one after the other. Both are latency-bound chains.
- ``pingpong``: 1000 pairs of entities bounce a ball; the peer is 1000 concurrent callers running
  plain activations on 2000 entities.
- ``timers``: N pending timers (10k, then 100k), all due: the time a world takes to start (it
  reads them all), and the time from the start until all have fired (reading, delivering,
  applying and committing each). Linear means the same time per timer at both sizes.

- ``cpu``: the SQLite ping-pong and its paired peer, in CPU time of all the process's threads
  and of its child processes (the SQLite writer's), per message and per activation (Linux only:
  read from ``/proc``); less disturbed by other tenants than wall time. Not in the default set.

Memory and SQLite (``synchronous=FULL``).
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pachyderm
from pachyderm import Update, after, backends, send
from pachyderm._clock import SystemClock

sys.path.insert(0, str(Path(__file__).parent))
from run import Counter, drive, report


class Link(pachyderm.Entity):
    """Link i passes ("hop", end) to link i+1, until the end."""

    name = "bench.Link"

    def init(self) -> int:
        return 0

    def activate(self, message: Any, state: int) -> Any:
        _, end = message
        nxt = int(self.key) + 1
        if nxt >= end:
            return state + 1
        return Update(state + 1, send((Link, str(nxt)), message))


class Player(pachyderm.Entity):
    """Bounces the ball to its partner until it was hit `limit` times."""

    name = "bench.Player"

    def init(self) -> int:
        return 0

    def activate(self, message: Any, state: int) -> Any:
        partner, hits, limit = message
        if hits >= limit:
            return state + 1
        return Update(state + 1, send((Player, partner), (self.key, hits + 1, limit)))


class Sleeper(pachyderm.Entity):
    """("arm", n, delay) arms n timers; a timer's message increments it."""

    name = "bench.Sleeper"

    def init(self) -> int:
        return 0

    def activate(self, message: Any, state: int) -> Any:
        if isinstance(message, tuple):
            _, n, delay = message
            return Update(state, *(after(delay, "ring") for _ in range(n)))
        return state + 1


ENTITIES = [Counter, Link, Player, Sleeper]


async def wait_for(world: pachyderm.World, counter: str, target: int) -> None:
    while world.statistics()[counter] < target:  # type: ignore[operator]
        await asyncio.sleep(0.001)


def backend_maker(kind: str, folder: str) -> Callable[[str], backends.Backend]:
    memory: dict[str, backends.Backend] = {}

    def make(name: str) -> backends.Backend:
        if kind == "memory":
            return memory.setdefault(name, backends.Memory())
        return backends.SQLite(Path(folder) / f"{name}.db")

    return make


async def chain_once(make: Callable[[str], backends.Backend], n: int) -> tuple[float, float]:
    async with pachyderm.World(make("plain"), entities=ENTITIES) as w:
        keys = [str(i) for i in range(n)]
        started = time.perf_counter()
        for key in keys:
            await w.activate((Counter, key), "x")
        plain = n / (time.perf_counter() - started)
    async with pachyderm.World(make("chain"), entities=ENTITIES) as w:
        started = time.perf_counter()
        await w.activate((Link, "0"), ("hop", n))
        await wait_for(w, "activations", n)
        chain = (n - 1) / (time.perf_counter() - started)
    return chain, plain


async def pingpong_once(
    make: Callable[[str], backends.Backend], pairs: int, hits: int
) -> tuple[float, float, float]:
    """Ping-pong, and two peers of plain activations over the same 2000 entities.

    The random peer: 1000 callers on random keys (two callers may hit one entity, and then
    share its write). The paired peer: caller i alternates between its own two entities a_i and
    b_i, one call at a time, as the ball of pair i does: the same concurrency, the same keys and
    one write per activation.
    """
    async with pachyderm.World(make("plain"), entities=ENTITIES) as w:
        keys = [f"k{i}" for i in range(2 * pairs)]
        for i in range(0, len(keys), 1000):
            await asyncio.gather(*(w.activate((Counter, k), "x") for k in keys[i : i + 1000]))
        plain = await drive(lambda ref: w.activate(ref, "x"), keys, pairs, pairs * hits)

        async def caller(i: int) -> None:
            for hit in range(hits):
                await w.activate((Counter, keys[2 * i + hit % 2]), "x")

        started = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(pairs)))
        paired = pairs * hits / (time.perf_counter() - started)
    async with pachyderm.World(make("pingpong"), entities=ENTITIES) as w:
        started = time.perf_counter()
        await asyncio.gather(
            *(w.activate((Player, f"a{i}"), (f"b{i}", 0, hits)) for i in range(pairs))
        )
        await wait_for(w, "delivered", pairs * hits)
        await wait_for(w, "activations", pairs * (hits + 1))
        rate = pairs * hits / (time.perf_counter() - started)
    return rate, plain, paired


class Later(SystemClock):
    """The system clock, an hour later (so that timers armed for in an hour are due)."""

    def wall(self) -> float:
        return time.time() + 3600.0


async def timers_once(make: Callable[[str], backends.Backend], n: int) -> tuple[float, float]:
    """Arm n timers due in an hour, stop; an hour later, time a start and the firing of all."""
    backend = make(f"timers{n}")
    per, sleepers = 100, n // 100
    async with pachyderm.World(backend, entities=ENTITIES) as w:
        for i in range(0, sleepers, 100):
            await asyncio.gather(
                *(
                    w.activate((Sleeper, f"s{j}"), ("arm", per, 3000.0))
                    for j in range(i, min(i + 100, sleepers))
                )
            )
        assert w.statistics()["outbox"]["timers"] == n  # type: ignore[index]
    reopened = backend if isinstance(backend, backends.Memory) else make(f"timers{n}")
    started = time.perf_counter()
    async with pachyderm.World(reopened, entities=ENTITIES, clock=Later()) as w:
        # The start reads every due timer (and the first ones fire meanwhile).
        loaded = time.perf_counter() - started
        await wait_for(w, "timers_fired", n)
        fired = time.perf_counter() - started
    return loaded, fired


async def scenario_chain(runs: int, quick: bool) -> None:
    n = 2000 if quick else 10_000
    for kind in ("memory", "sqlite"):
        got, peer = [], []
        for _ in range(runs):
            with tempfile.TemporaryDirectory() as folder:
                rate, plain = await chain_once(backend_maker(kind, folder), n)
            got.append(rate)
            peer.append(plain)
        report(f"chain of {n} entities, {kind}", "messages/s", got, peer, "plain activations")


async def scenario_pingpong(runs: int, quick: bool) -> None:
    pairs, hits = 1000, (20 if quick else 100)
    for kind in ("memory", "sqlite"):
        got, peer, paired = [], [], []
        for _ in range(runs):
            with tempfile.TemporaryDirectory() as folder:
                rate, plain, pair = await pingpong_once(backend_maker(kind, folder), pairs, hits)
            got.append(rate)
            peer.append(plain)
            paired.append(pair)
        name = f"{pairs} ping-pong pairs, {kind}"
        report(name, "messages/s", got, peer, "plain activations, random keys")
        report(name, "messages/s", got, paired, "plain activations, paired keys")


def timers_peer(n: int) -> float:
    """The peer of the timers' growth: ``n`` outbox rows (100 per sender, as in `timers_once`)
    stored in a dict and a heap, then popped in due order, in plain Python; seconds."""
    started = time.perf_counter()
    rows: dict[object, backends.Envelope] = {}
    for s in range(n // 100):
        for i in range(100):
            row = backends.Envelope("T", f"s{s}", 1, i, "T", f"s{s}", 1e9 + s, None, b"\x01")
            rows[row.id] = row
    heap = [(row.due, row.id) for row in rows.values()]
    heapq.heapify(heap)
    while heap:
        del rows[heapq.heappop(heap)[1]]
    return time.perf_counter() - started


async def scenario_timers(runs: int, quick: bool) -> None:
    small, large = (2000, 20_000) if quick else (10_000, 100_000)
    peer = {small: [], large: []}
    for kind in ("memory", "sqlite"):
        loads: dict[int, list[float]] = {small: [], large: []}
        fires: dict[int, list[float]] = {small: [], large: []}
        for _ in range(runs):
            for n in (small, large):
                with tempfile.TemporaryDirectory() as folder:
                    loaded, fired = await timers_once(backend_maker(kind, folder), n)
                loads[n].append(loaded / n * 1e6)
                fires[n].append(fired / n * 1e6)
                peer[n].append(timers_peer(n) / n * 1e6)
        for what, data in (("start (reading them)", loads), ("start to all fired", fires)):
            per_small, per_large = statistics.median(data[small]), statistics.median(data[large])
            ratios = [b / a for a, b in zip(data[small], data[large], strict=True)]
            print(
                f"timers {kind}, {what}: {per_small:.1f} µs/timer at {small}, "
                f"{per_large:.1f} µs/timer at {large}; growth per timer median "
                f"{statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}; "
                f"1.0 = linear); at {large}: {1e6 / statistics.median(data[large]):,.0f} timers/s",
                flush=True,
            )
    # The same growth of a dict and a heap of rows in plain Python, measured in the same runs:
    # what the machine's caches make of ten times the rows.
    ratios = [b / a for a, b in zip(peer[small], peer[large], strict=True)]
    print(
        f"timers peer (a dict and a heap of the rows, in plain Python): growth per row median "
        f"{statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})",
        flush=True,
    )


def thread_cpu() -> dict[str, float]:
    """CPU seconds used so far by each thread of this process, by thread name (Linux only)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        name = names.get(int(tid), tid).split(":")[0]
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def tree_cpu() -> float:
    """CPU seconds used so far by this process's threads and its child processes (the SQLite
    writer's process; Linux only)."""
    total = sum(thread_cpu().values())
    tick = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == me:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def cpu_once(folder: str, pairs: int, hits: int) -> tuple[float, float]:
    """CPU time of all threads and the writer process per SQLite ping-pong message, and per
    paired plain activation."""
    make = backend_maker("sqlite", folder)
    async with pachyderm.World(make("pingpong"), entities=ENTITIES) as w:
        before = tree_cpu()
        await asyncio.gather(
            *(w.activate((Player, f"a{i}"), (f"b{i}", 0, hits)) for i in range(pairs))
        )
        await wait_for(w, "activations", pairs * (hits + 1))
        message = (tree_cpu() - before) / (pairs * hits)
    async with pachyderm.World(make("plain"), entities=ENTITIES) as w:
        keys = [f"k{i}" for i in range(2 * pairs)]
        await asyncio.gather(*(w.activate((Counter, k), "x") for k in keys))

        async def caller(i: int) -> None:
            for hit in range(hits):
                await w.activate((Counter, keys[2 * i + hit % 2]), "x")

        before = tree_cpu()
        await asyncio.gather(*(caller(i) for i in range(pairs)))
        plain = (tree_cpu() - before) / (pairs * hits)
    return message, plain


async def scenario_cpu(runs: int, quick: bool) -> None:
    """SQLite ping-pong against paired keys, in CPU time of all threads and the writer process
    (Linux only)."""
    pairs, hits = 1000, (20 if quick else 100)
    got, peer = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as folder:
            message, plain = await cpu_once(folder, pairs, hits)
        got.append(message * 1e6)
        peer.append(plain * 1e6)
    ratios = [p / g for g, p in zip(got, peer, strict=True)]
    print(
        f"1000 ping-pong pairs, sqlite, CPU time of all threads and the writer: median"
        f" {statistics.median(got):.1f} µs/message (min {min(got):.1f}, max {max(got):.1f});"
        f" plain activations, paired keys"
        f" median {statistics.median(peer):.1f} µs; ratio (messages/s over activations/s) median"
        f" {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})",
        flush=True,
    )


SCENARIOS = {
    "chain": scenario_chain,
    "pingpong": scenario_pingpong,
    "timers": scenario_timers,
    "cpu": scenario_cpu,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", choices=[*SCENARIOS, []], default=[])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, runs {args.runs}, wall time")
    for name in args.scenarios or [name for name in SCENARIOS if name != "cpu"]:
        asyncio.run(SCENARIOS[name](args.runs, args.quick))


if __name__ == "__main__":
    main()
