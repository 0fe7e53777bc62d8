"""A virtual-time event loop: the real asyncio machinery, with a clock that jumps.

The loop is asyncio's own ``BaseEventLoop`` (the same ready queue and timer heap as production)
with no I/O. Where a real loop would block in ``select(timeout)`` (nothing is ready; the next
timer is ``timeout`` away), this one asks its *idle hook* first: the simulation may deliver a
message or a call there, which makes work ready. If it does not, time jumps straight to the next
timer, up to the bound the driver set; at the bound the loop stops.

Everything runs on one thread, in an order fixed by the program and the simulation's choices, so a
run replays exactly. There are no file descriptors, sockets, signals, subprocesses or threads: a
handler that needs them cannot run in a simulation (asyncio refuses them; ``run_in_executor``
raises ``Unavailable``).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

from .._errors import Unavailable

__all__ = ["IdleHook", "VirtualLoop"]

#: Called when nothing is ready: returns True if it made work ready (then time stands still).
IdleHook = Callable[[], bool]


class _NoSelector:
    """What ``BaseEventLoop`` polls for I/O: here, the moment to decide what happens next."""

    __slots__ = ("_loop",)

    def __init__(self, loop: VirtualLoop) -> None:
        self._loop = loop

    def select(self, timeout: float | None) -> list[Any]:
        self._loop._idle(timeout)
        return []

    def close(self) -> None:
        pass


class VirtualLoop(asyncio.BaseEventLoop):
    """An event loop whose ``time()`` is virtual: see the module docstring.

    ``drive(until)`` runs it until ``stop()`` or until time would pass ``until``. Mutable state:
    ``now`` (moved only by jumps), ``until``, ``stalled`` (set when nothing can ever run).
    """

    def __init__(self, idle: IdleHook) -> None:
        super().__init__()
        self._selector = _NoSelector(self)
        self._idle_hook = idle
        self.now = 0.0
        self.until = math.inf
        self.stalled = False
        self.jumps = 0

    def time(self) -> float:
        return self.now

    # ------------------------------------------------------------------ driving

    def drive(self, until: float) -> None:
        """Run until ``stop()`` is called, or until time would move past ``until``."""
        self.until = until
        self.stalled = False
        self.run_forever()

    def _idle(self, timeout: float | None) -> None:
        if timeout == 0:
            return  # work is ready, or a timer is due now: not idle
        if self._idle_hook():
            return  # the simulation made work ready: time stands still
        # The hook may have scheduled something sooner (a delayed delivery's wake-up).
        scheduled = self._scheduled  # type: ignore[attr-defined]  # BaseEventLoop's timer heap
        timeout = max(0.0, scheduled[0].when() - self.now) if scheduled else None
        if timeout is None:
            self.stalled = True  # nothing ready, no timer: nothing will ever happen
            self.stop()
            return
        target = self.now + timeout
        if target <= self.until:
            self.now = target
            self.jumps += 1
            return
        if self.until > self.now:
            self.now = self.until
        self.stop()

    # ------------------------------------------------------------------ no I/O here
    # (BaseEventLoop refuses sockets, pipes and signals by itself: NotImplementedError.)

    def _process_events(self, event_list: list[Any]) -> None:
        pass

    def _write_to_self(self) -> None:
        pass  # one thread: nothing to wake

    def run_in_executor(self, executor: Any, func: Any, *args: Any) -> Any:  # type: ignore[override]
        """Refused: a thread would run outside virtual time and the seed's order."""
        raise Unavailable(
            "a simulation runs on one thread in virtual time: run_in_executor (and "
            "asyncio.to_thread) cannot be used by code under pachyderm.testing.Simulation"
        )
