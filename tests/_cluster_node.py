"""A cluster node in its own process, running a counter workload (the failover tests).

``python -m tests._cluster_node DSN SCHEMA NODE_ID LEASE KEYS [VERSION]`` joins the cluster of
world ``default`` on that schema and prints ``ready <address>``; then one task per key (``KEYS``
keys ``k0``, ``k1``, ...) increments its counter, again and again, from this node (the call is
forwarded when another node owns the key), and prints ``ack <key> <value> <time>`` for every
acknowledged result, ``err <key> <error> <time>`` for every error. SIGTERM makes it leave
the cluster cleanly (then ``closed name=count ...``: its node's counters). Every line is
flushed at once: a line printed was acknowledged before any kill.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import pachyderm
from pachyderm import backends

SECRET = "a cluster secret for the tests"


class Counter(pachyderm.Entity):
    name = "Counter"

    def init(self) -> int:
        return 0

    def activate(self, message: object, state: int) -> int:
        return state + 1


class CounterV2(Counter):
    """Version 2 of the same type: states of version 1 are migrated on load."""

    name = "Counter"
    version = 2

    def upgrade(self, state: object, from_version: int) -> int:
        assert isinstance(state, int)
        return state


def dump() -> None:
    for task in asyncio.all_tasks():
        task.print_stack(limit=6, file=sys.stderr)
    sys.stderr.flush()


def out(*words: object) -> None:
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


async def work(world: pachyderm.World, kind: type[Counter], key: str, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            value = await world.activate((kind, key), "inc", timeout=20.0)
        except pachyderm.PachydermError as exc:
            out("err", key, type(exc).__name__, time.time())
            await asyncio.sleep(0.05)
        else:
            out("ack", key, value, time.time())


async def main(dsn: str, schema: str, node_id: str, lease: float, keys: int, version: int) -> None:
    kind = CounterV2 if version == 2 else Counter
    world = pachyderm.World(
        backends.Postgres(dsn, schema=schema, max_size=8),
        entities=[kind],
        listen="127.0.0.1:0",
        secret=SECRET,
        node_id=node_id,
        lease=lease,
        partitions=32,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, dump)  # what every task waits for, on stderr
    async with world:
        assert world._node is not None
        out("ready", world._node.address)
        if keys:
            tasks = [asyncio.create_task(work(world, kind, f"k{i}", stop)) for i in range(keys)]
            await stop.wait()
            await asyncio.gather(*tasks)
        else:
            await stop.wait()
        stats = world.statistics()["cluster"]["stats"]  # type: ignore[index]
    out("closed", *(f"{k}={v}" for k, v in stats.items()))


if __name__ == "__main__":
    dsn, schema, node_id, lease, keys = sys.argv[1:6]
    version = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    asyncio.run(main(dsn, schema, node_id, float(lease), int(keys), version))
