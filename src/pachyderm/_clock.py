"""The injected clock: the runtime reads time only through it, so a simulation can replace it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["Clock", "SystemClock", "Timer"]


class Clock(Protocol):
    """Where the runtime gets time from."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (timeouts, idle times)."""
        ...

    def wall(self) -> float:
        """Seconds since the Unix epoch (stored timestamps such as receipt times)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``. Cancellation stops the wait and nothing else."""
        ...

    def call_later(self, seconds: float, callback: Callable[..., object], *args: Any) -> Timer:
        """Call ``callback(*args)`` on the event loop after ``seconds``, unless cancelled."""
        ...


class Timer(Protocol):
    """A scheduled call: ``cancel()`` makes sure it does not happen (if it has not yet)."""

    def cancel(self) -> None: ...


class SystemClock:
    """The real clock: the event loop's monotonic time and the system's wall time."""

    __slots__ = ()

    # The same clock as asyncio's default event loop (`loop.time()`), called directly: the runner
    # reads it around every handler run.
    monotonic = staticmethod(time.monotonic)

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_later(self, seconds: float, callback: Callable[..., object], *args: Any) -> Timer:
        return asyncio.get_running_loop().call_later(seconds, callback, *args)
