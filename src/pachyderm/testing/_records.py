"""What a ``Simulation`` hands to a test: ``Pending`` replies, ``Recording`` followers, history
``Step`` records (from the simulation's flat history log), and ``SimulationError``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from .._errors import PachydermError, Unavailable

if TYPE_CHECKING:
    from .._world import World
    from ._simulation import Simulation

__all__ = ["Pending", "Recording", "SimulationError", "Step"]


class SimulationError(PachydermError):
    """A simulation could not finish what it was asked: a call that never ends, a world that
    never becomes quiet within the bounds, or a simulation used after ``close()``."""


class Step(NamedTuple):
    """One entry of an entity's history: a message and what became of it.

    ``result`` is the new state if it committed (``version`` is then its version), else the
    error the caller saw (``version`` is None). ``sender`` is ``(type name, key)`` for a message
    from an entity, or ``None`` for a call; ``time`` is virtual seconds since the start.
    ``reply_lost`` marks a commit whose caller saw ``Indeterminate`` (a crash after the commit).
    """

    message: Any
    result: Any
    version: int | None
    sender: tuple[str, str] | None
    time: float
    reply_lost: bool = False


#: The values of one step in the history's deque (what `step_of` reads).
ENTRY: Final = 8


def step_of(entry: tuple[Any, ...]) -> Step:
    """A history entry: ``(ref, message, result, version, sender type and key (or two None),
    time, reply_lost)``; the sender's are two values, not a tuple kept alive per step."""
    _, message, result, version, sender_type, sender_key, at, reply_lost = entry
    sender = None if sender_type is None else (sender_type, sender_key)
    return Step(message, result, version, sender, at, reply_lost)


class Reply(asyncio.Future[Any]):
    """A call's future whose error a test may never read: no "never retrieved" log at exit."""

    def set_exception(self, exception: type | BaseException) -> None:
        super().set_exception(exception)
        super().exception()  # marks it read: the test reads it with `Pending.result()`, or not


class Pending:
    """The reply to a call submitted with ``Simulation.submit``, once the simulation has run it."""

    __slots__ = ("_future", "ref")

    def __init__(self, future: asyncio.Future[Any], ref: tuple[Any, Any]) -> None:
        self._future = future
        self.ref = ref

    def _answer(self, task: asyncio.Future[Any]) -> None:
        future = self._future
        if future.done():
            return  # answered already (the node crashed)
        if task.cancelled():
            self._fail(Unavailable("the call was cancelled by a crash of the node"))
        elif task.exception() is not None:
            self._fail(task.exception())  # type: ignore[arg-type]
        else:
            future.set_result(task.result())

    def _fail(self, error: BaseException) -> None:
        self._future.set_exception(error)

    def done(self) -> bool:
        """True once the call is answered (with a state or an error)."""
        return self._future.done()

    def result(self) -> Any:
        """The committed new state; raises the call's error, or ``SimulationError`` if not done."""
        if not self._future.done():
            raise SimulationError(f"the call to {self.ref!r:.80} is not answered yet: run first")
        return self._future.result()

    def exception(self) -> BaseException | None:
        """The call's error, or None if it committed (``SimulationError`` if not done)."""
        if not self._future.done():
            raise SimulationError(f"the call to {self.ref!r:.80} is not answered yet: run first")
        return self._future.exception()


class Recording:
    """What ``Simulation.follow`` (or ``events``) has seen so far: ``items``, in order.

    ``items`` fill as the simulation runs: states (or ``(version, state)``), or for ``events``
    ``(seq, event)``.

    It follows across ``restart()``: it subscribes again after the last version it saw, so it
    neither repeats nor misses a committed version that is still available. It keeps every item
    it saw (a slow follower's skips aside, as for any follower): ``close()`` it when done.
    """

    def __init__(
        self,
        sim: Simulation,
        ref: tuple[Any, Any],
        since: int | None,
        versions: bool,
        *,
        events: bool = False,
    ):
        self._sim = sim
        self.ref = ref
        self._versions = versions
        self._events = events
        self.last = since
        self.items: list[Any] = []
        self.closed = False
        self._task: asyncio.Task[None] | None = None

    def _start(self) -> None:
        self._task = self._sim._loop.create_task(self._follow(self._sim.world))

    async def _follow(self, world: World) -> None:
        if self._events:  # an event stream: (seq, event), resumed after the last seq seen
            async for seq, event in world.events(self.ref, since=self.last or 0):
                self.last = seq
                self.items.append((seq, event))
            return
        async for version, state in world.follow(self.ref, since=self.last, versions=True):
            self.last = version
            self.items.append((version, state) if self._versions else state)

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self.items))

    def __len__(self) -> int:
        return len(self.items)

    def close(self) -> None:
        """Stop following."""
        self.closed = True
        if self._task is not None:
            self._task.cancel()
        self._sim._recordings.pop(self, None)
