"""A virtual clock for tests: time moves only when the test says so, and timers follow it."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Any


class _Handle:
    __slots__ = ("args", "callback", "cancelled")

    def __init__(self, callback: Any, args: tuple[Any, ...]) -> None:
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class VirtualClock:
    """Time is ``now``, for ``monotonic`` and ``wall``; ``call_later`` and ``sleep`` follow it."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now
        self._heap: list[tuple[float, int, _Handle]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now

    def call_later(self, seconds: float, callback: Any, *args: Any) -> _Handle:
        handle = _Handle(callback, args)
        heapq.heappush(self._heap, (self.now + max(0.0, seconds), next(self._seq), handle))
        return handle

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        handle = self.call_later(seconds, lambda: future.done() or future.set_result(None))
        try:
            await future
        finally:
            handle.cancel()

    async def settle(self, rounds: int = 50) -> None:
        """Let the event loop run everything that is ready (without moving time)."""
        for _ in range(rounds):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move time forward, firing every callback due on the way, in order, and settle."""
        until = self.now + seconds
        await self.settle()
        while self._heap and self._heap[0][0] <= until:
            when, _, handle = heapq.heappop(self._heap)
            self.now = max(self.now, when)
            if not handle.cancelled:
                handle.callback(*handle.args)
            await self.settle()
        self.now = until
        await self.settle()
