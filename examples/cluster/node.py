"""One node of the username cluster (see ``demo.py``, which runs three of them).

``python examples/cluster/node.py DSN NODE_ID NAME...`` joins the cluster of world ``usernames``
on that PostgreSQL, with the cluster's secret from ``$PACHYDERM_SECRET``, on a free port of
127.0.0.1. It registers the usernames ``NAME...`` (for users named after this node: calls for
shards owned by other nodes are forwarded there), then keeps a follower-backed
``UsernameCache`` of every shard it is asked about: the original README's "streaming listener
on every node that acts as a cache". It prints what it sees, then serves until SIGTERM or
end of input, and leaves the cluster cleanly.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/ for usernames.py

from usernames import User, UsernameCache, UsernameRegistration, register

import pachyderm

#: Every name the demo's nodes register, between them.
ALL_NAMES = ("alice", "alfred", "bob", "bonnie", "carol", "casper", "dave", "daphne")


def say(node_id: str, *words: object) -> None:
    print(f"[{node_id}]", *words, flush=True)


async def main(dsn: str, node_id: str, names: list[str]) -> None:
    world = pachyderm.World(
        pachyderm.backends.open(dsn),  # postgresql://...[?schema=...]
        entities=[UsernameRegistration, User],
        name="usernames",
        listen="127.0.0.1:0",
        secret=os.environ["PACHYDERM_SECRET"],
        node_id=node_id,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.read(1) else None)
    async with world:
        node = world._node
        assert node is not None
        say(node_id, f"joined at {node.address}")
        for name in names:
            try:
                await register(world, name, node_id)
                say(node_id, f"registered {name!r}")
            except pachyderm.Rejected as exc:
                say(node_id, f"refused {name!r}: {exc}")
        cache = UsernameCache(world)
        for name in ALL_NAMES:  # the other nodes' names arrive through the follow streams
            await asyncio.wait_for(cache.until_taken(name), 60)
        say(node_id, f"the cache sees all {len(ALL_NAMES)} names, served by followers")
        for _ in range(200):  # its share may still be on its way (the others hand it off)
            if node.held:
                break
            await asyncio.sleep(0.05)
        say(node_id, f"it serves {len(node.held)} of {node.count} partitions")
        user = await world.read((User, node_id))
        say(node_id, f"user {node_id}: {user}")
        await stop.wait()
        await cache.close()
    say(node_id, "left the cluster")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
