"""A counter: the entity of the README, run on SQLite in a temporary folder.

Run it with ``python examples/counter.py``;
explore it with ``pachyderm shell examples/counter.py``.
"""

from __future__ import annotations

import asyncio
import os
import tempfile

import pachyderm


class Counter(pachyderm.Entity):
    """Count the messages it is sent, whatever they are."""

    name = "Counter"  # the stored type name: stable if the class or its module moves

    def init(self) -> int:
        return 0

    def activate(self, message: object, state: int) -> int:
        return state + 1


async def main(path: str) -> None:
    """Count to 4 in the SQLite file ``path``, following the counter; then reopen and read it."""
    counter = (Counter, "my_counter")
    async with pachyderm.World(pachyderm.backends.SQLite(path), entities=[Counter]) as world:
        print("activate:", await world.activate(counter, "increment"))  # 1
        print("activate:", await world.activate(counter, "increment"))  # 2
        async for state in world.follow(counter):  # first the current state, then every new one
            print("follow:", state)  # 2, 3, 4
            if state == 4:
                break
            await world.activate(counter, "increment")
    async with pachyderm.World(pachyderm.backends.SQLite(path), entities=[Counter]) as world:
        print("read after a restart:", await world.read(counter))  # 4: an elephant never forgets


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(main(os.path.join(folder, "counter.db")))
