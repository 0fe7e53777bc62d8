"""The injected clock: the runtime reads time only through it, so a simulation can replace it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

__all__ = ["CLOCK_METHODS", "Clock", "SystemClock", "Timer", "is_clock"]


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


#: What `Clock` asks of a clock: ``World(clock=...)`` refuses an object without these.
CLOCK_METHODS: Final = ("monotonic", "wall", "sleep", "call_later")


def is_clock(obj: object) -> bool:
    """Whether ``obj`` has every method of `Clock` (their signatures are not checked)."""
    return all(callable(getattr(obj, name, None)) for name in CLOCK_METHODS)


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
