"""Benchmark of issue 6's cluster figures: forwarded against local calls, and takeover times.

Usage: ``python benchmarks/cluster.py [--runs N] [--kills K] [--lease S] [--quick]``. It
starts a PostgreSQL server of its own (``pachyderm.testing.PostgresServer``) and stops it at
the end; the nodes run on 127.0.0.1.

- **Forwarded against local** (three nodes on this machine): this process is one node, two
  more run in child processes (``tests/_cluster_node.py``, idle). ``--callers`` concurrent
  callers run ``activate`` on counters whose partitions this node serves (local), then on
  counters the two others serve (each call forwarded over the transport and answered back),
  alternately, ``--runs`` times. The report gives the throughput and the p50 and p99 latency
  of each (medians over the runs), and the ratios forwarded / local.
- **Takeover after SIGKILL**: three node processes run a counter workload (every
  acknowledged result printed). ``--kills`` times, one is SIGKILLed; the takeover time is from
  the kill until every counter of the dead node's partitions has an acknowledged increment
  from a survivor. A new node then joins in its place. The report gives p50 and max, against
  the lease, and checks the history (nothing acknowledged lost, no value acknowledged twice).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import msgspec  # noqa: E402
from tests._cluster_node import SECRET, Counter  # noqa: E402
from tests._nodes import NodeProcess, check_history, wait_until  # noqa: E402

import pachyderm  # noqa: E402
from pachyderm import backends  # noqa: E402
from pachyderm._core._partitions import partition_of  # noqa: E402
from pachyderm.testing import PostgresServer  # noqa: E402

PARTITIONS = 32  # as tests/_cluster_node.py sets


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _calls(
    world: pachyderm.World, keys: list[str], callers: int, seconds: float
) -> tuple[float, float, float]:
    """``callers`` loops of ``activate`` over ``keys`` for ``seconds``: rate, p50 and p99."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def caller(i: int) -> None:
        key = keys[i % len(keys)]
        while time.perf_counter() < stop:
            started = time.perf_counter()
            await world.activate((Counter, key), "inc")
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(callers)))
    elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, _percentile(latencies, 0.5), _percentile(latencies, 0.99)


async def forwarded_vs_local(
    server: PostgresServer, runs: int, callers: int, seconds: float
) -> None:
    others = [NodeProcess(server.dsn, "bench_fwd", f"peer{i}", lease=5.0, keys=0) for i in range(2)]
    try:
        for node in others:
            node.wait_ready()
        world = pachyderm.World(
            backends.Postgres(server.dsn, schema="bench_fwd", max_size=8),
            entities=[Counter],
            listen="127.0.0.1:0",
            secret=SECRET,
            node_id="bench",
            lease=5.0,
            partitions=PARTITIONS,
        )
        async with world:
            node = world._node
            assert node is not None

            def settled() -> bool:
                return 8 <= len(node.held) <= 12 and all(node.serving(p) for p in node.held)

            async with asyncio.timeout(60):
                while not settled():
                    await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # the others finish claiming their shares
            names = (f"c{i}" for i in itertools.count())
            local, remote = [], []
            for key in names:
                p = partition_of(Counter.name, key, PARTITIONS)
                (local if node.serving(p) else remote).append(key)
                if len(local) >= callers and len(remote) >= callers:
                    break
            local, remote = local[:callers], remote[:callers]
            await _calls(world, local, callers, 1.0)  # warm up: connections, residents
            await _calls(world, remote, callers, 1.0)
            results: dict[str, list[tuple[float, float, float]]] = {"local": [], "forwarded": []}
            for run in range(runs):
                for kind, keys in (("local", local), ("forwarded", remote)):
                    rate, p50, p99 = await _calls(world, keys, callers, seconds)
                    results[kind].append((rate, p50, p99))
                    print(
                        f"  run {run + 1} {kind:>9}: {rate:8.0f} calls/s  "
                        f"p50 {p50 * 1e3:6.2f} ms  p99 {p99 * 1e3:6.2f} ms",
                        flush=True,
                    )
            med = {
                kind: tuple(statistics.median(r[i] for r in rows) for i in range(3))
                for kind, rows in results.items()
            }
            (lr, l50, l99), (fr, f50, f99) = med["local"], med["forwarded"]
            print(f"three nodes, {callers} concurrent callers, medians of {runs} runs:")
            print(
                f"  local:     {lr:8.0f} calls/s  p50 {l50 * 1e3:6.2f} ms  p99 {l99 * 1e3:6.2f} ms"
            )
            print(
                f"  forwarded: {fr:8.0f} calls/s  p50 {f50 * 1e3:6.2f} ms  p99 {f99 * 1e3:6.2f} ms"
            )
            print(
                f"  forwarded / local: throughput {fr / lr:.2f}x, p50 {f50 / l50:.2f}x, "
                f"p99 {f99 / l99:.2f}x"
            )
    finally:
        for node in others:
            node.stop()


def _owners(dsn: str, schema: str) -> dict[int, str | None]:
    async def read() -> dict[int, str | None]:
        backend = backends.Postgres(dsn, schema=schema)
        await backend.open("default")
        try:
            return {p: owner for p, owner, _, left in await backend.leases() if left > 0}
        finally:
            await backend.aclose()

    return asyncio.run(read())


def _stored(dsn: str, schema: str, keys: int) -> dict[str, int]:
    async def read() -> dict[str, int]:
        backend = backends.Postgres(dsn, schema=schema)
        await backend.open("default")
        try:
            refs = [("Counter", f"k{i}") for i in range(keys)]
            got = await backend.load_many(refs)
            return {
                r[1]: msgspec.msgpack.decode(s.data) for r, s in zip(refs, got, strict=True) if s
            }
        finally:
            await backend.aclose()

    return asyncio.run(read())


def takeover(server: PostgresServer, kills: int, lease: float, keys: int) -> None:
    schema = "bench_takeover"
    ids = (f"n{i}" for i in itertools.count())
    alive = [NodeProcess(server.dsn, schema, next(ids), lease=lease, keys=keys) for _ in range(3)]
    every = list(alive)
    times: list[float] = []
    try:
        for node in alive:
            node.wait_ready()
        for kill in range(kills):

            def balanced() -> bool:
                held = _owners(server.dsn, schema)
                return len(held) == PARTITIONS and len(set(held.values())) == 3

            if not wait_until(balanced, 60, step=0.2):
                raise SystemExit("the cluster did not settle before a kill")
            time.sleep(0.5)
            victim = alive[kill % 3]
            owners = _owners(server.dsn, schema)
            theirs = {
                f"k{i}"
                for i in range(keys)
                if owners.get(partition_of("Counter", f"k{i}", PARTITIONS)) == victim.node_id
            }
            killed = time.time()
            victim.kill()
            # Answers the victim sent before it died may still arrive: only acknowledgements
            # from after it is reaped (and a margin for those in flight) count as served again.
            after = time.time() + 0.05
            survivors = [n for n in alive if n is not victim]

            def served(survivors: list[NodeProcess], killed: float, theirs: set[str]) -> bool:
                late = {k for n in survivors for k, _, t in n.acks() if t > killed}
                return theirs <= late

            check = functools.partial(served, survivors, after, theirs)
            if not wait_until(check, 10 * lease, step=0.01):
                raise SystemExit(f"kill {kill + 1}: not taken over within {10 * lease} s")
            first = {}
            for n in survivors:
                for key, _, t in n.acks():
                    if key in theirs and t > after:
                        first[key] = min(first.get(key, t), t)
            took = max(first.values()) - killed
            times.append(took)
            print(f"  kill {kill + 1}: {len(theirs)} counters back after {took:.2f} s", flush=True)
            replacement = NodeProcess(server.dsn, schema, next(ids), lease=lease, keys=keys)
            replacement.wait_ready()
            alive = [*survivors, replacement]
            every.append(replacement)
        for node in alive:
            node.stop()
        acked = check_history(every, _stored(server.dsn, schema, keys))
        total = sum(len(v) for v in acked.values())
        print(
            f"takeover after SIGKILL, lease {lease} s, {kills} kills: p50 "
            f"{statistics.median(times):.2f} s, max {max(times):.2f} s "
            f"(p50 {statistics.median(times) / lease:.2f} leases, max {max(times) / lease:.2f});"
            f" history checked: {total} acknowledged increments, none lost, none twice"
        )
    finally:
        for node in every:
            node.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--callers", type=int, default=100)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--lease", type=float, default=5.0)
    parser.add_argument("--keys", type=int, default=24)
    parser.add_argument("--quick", action="store_true", help="1 run, 2 kills, lease 1 s")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.seconds, args.kills, args.lease = 1, 1.0, 2, 1.0
    server = PostgresServer().start()
    try:
        asyncio.run(forwarded_vs_local(server, args.runs, args.callers, args.seconds))
        takeover(server, args.kills, args.lease, args.keys)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
