"""A child process for tests/test_crash.py: ``python _crash_child.py URL CALLERS ENTITIES``.

Runs ``World(backends.open(URL), entities=[Counter])`` (SQLite or PostgreSQL) with CALLERS
concurrent callers over ENTITIES
counters (caller i activates ``k{i % ENTITIES}``, over and over). It prints ``READY`` once the
world is open, then ``key value`` right after each ``await world.activate(...)`` returns (the
acknowledgement), flushed at once, until it is killed.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pachyderm
from pachyderm import backends


class Counter(pachyderm.Entity):
    """Counts from 0 by 1: every activation of one key gives a new value."""

    name = "tests.crash.Counter"

    def init(self) -> int:
        return 0

    def activate(self, message: Any, state: int) -> int:
        return state + 1


async def main(url: str, callers: int, entities: int) -> None:
    async with pachyderm.World(backends.open(url), entities=[Counter]) as world:
        print("READY", flush=True)

        async def caller(key: str) -> None:
            while True:
                value = await world.activate((Counter, key), "increment")
                print(key, value, flush=True)

        await asyncio.gather(*(caller(f"k{i % entities}") for i in range(callers)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
