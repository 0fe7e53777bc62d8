"""A child process for tests/test_crashpoints.py: ``python _crashpoint_child.py PATH POINT N``.

Runs a world on ``SQLite(PATH)`` whose ``Source`` entities, on every "go", send a message to
``Sink("k")`` and arm a timer for it (both in the same commit as their new state), and kills
itself with SIGKILL at the N-th passage of the crash point POINT (see ``pachyderm._faults``).
With POINT ``none`` it only drains the outbox and exits normally.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import pachyderm
from pachyderm import _faults, after, send
from pachyderm.backends import SQLite


class Source(pachyderm.Entity):
    name = "tests.crashpoint.Source"

    def init(self) -> int:
        return 0

    def activate(self, message: Any, state: int) -> Any:
        n = state + 1
        return pachyderm.Update(
            n,
            send((Sink, "k"), ("m", self.key, n)),
            after(0.001, ("t", self.key, n), to=(Sink, "k")),
        )


class Sink(pachyderm.Entity):
    name = "tests.crashpoint.Sink"

    def init(self) -> list[Any]:
        return []

    def activate(self, message: Any, state: list[Any]) -> Any:
        return [*state, message]


SOURCES = [f"s{i}" for i in range(8)]


def install(point: str, n: int) -> None:
    seen = 0

    def hook(name: str) -> None:
        nonlocal seen
        if name == point:
            seen += 1
            if seen >= n:
                os.kill(os.getpid(), signal.SIGKILL)

    _faults.hook = hook


async def main(path: str, point: str, n: int) -> None:
    if point != "none":
        install(point, n)
    async with pachyderm.World(SQLite(path), entities=[Source, Sink]) as world:
        print("READY", flush=True)
        if point == "none":
            while True:  # drain: until nothing is left to deliver
                counts = world.statistics()["outbox"]
                empty = {"messages": 0, "timers": 0, "dead": 0}
                if counts == empty and not world._engine.busy():
                    return
                await asyncio.sleep(0.01)

        async def caller(key: str) -> None:
            while True:
                await world.activate((Source, key), "go")

        await asyncio.gather(*(caller(k) for k in SOURCES))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
