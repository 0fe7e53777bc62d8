"""Workers: how the outside world acts for an entity (pay, mail, call an API) and reports back.

An entity cannot do I/O (handlers are pure). It *lists* what must be done in its state; a worker
follows it, does each task with the task's id as the outside service's idempotency key, and
reports the outcome with a message. Because the report is an activation with an idempotency key,
and the side effect is keyed by the task id, a worker that crashes anywhere and starts again
performs each task at most once per key on the outside service's side, and the entity records it
exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from ._errors import InvalidOptions
from ._world import World

if TYPE_CHECKING:
    from ._entity import Entity

__all__ = ["Worker"]

log = logging.getLogger("pachyderm.worker")


class Worker:
    """Follow one entity and perform the tasks its state lists, each once per task id.

    Args:
        world: a started world.
        ref: the entity to follow, e.g. ``(PaymentsToMake, "shop")``.
        tasks: ``tasks(state)`` returns the tasks still to do in that state, as a mapping of
            task id (a str, used as the idempotency key) to the task.
        perform: ``await perform(task_id, task)`` does the side effect and returns its result.
            Pass ``task_id`` to the outside service as its idempotency key: ``perform`` may run
            again for the same task after a crash or a failure.
        report: ``report(task_id, result)`` returns the message that records the outcome, sent
            with ``world.activate(ref, message, idempotency_key=...)``. The entity's handler then
            drops the task from its list.
        concurrency: tasks performed at once.
        retry_delay: seconds before the first retry of a failed task; doubled each time, up to
            ``max_retry_delay``. Waits use the world's clock.

    ``await worker.run()`` runs until cancelled. Cancellation stops the tasks in progress; one
    that was cancelled after its side effect and before its report is performed again (with the
    same key) by the next worker, which is why the key matters.
    """

    def __init__(
        self,
        world: World,
        ref: tuple[type[Entity], Any],
        *,
        tasks: Callable[[Any], Mapping[str, Any]],
        perform: Callable[[str, Any], Awaitable[Any]],
        report: Callable[[str, Any], Any],
        concurrency: int = 8,
        retry_delay: float = 0.1,
        max_retry_delay: float = 30.0,
    ) -> None:
        if not isinstance(world, World):
            raise InvalidOptions(f"a worker needs a pachyderm.World; got {world!r:.80}")
        world._registry.resolve(ref)  # InvalidKey or UnknownEntityType now, not when it runs
        for name, fn in (("tasks", tasks), ("perform", perform), ("report", report)):
            if not callable(fn):
                raise InvalidOptions(f"{name} is a function; got {fn!r:.80}")
        if type(concurrency) is not int or concurrency < 1:
            raise InvalidOptions(f"concurrency is an int >= 1; got {concurrency!r}")
        delays = (retry_delay, max_retry_delay)
        if (
            any(isinstance(d, bool) or not isinstance(d, int | float) for d in delays)
            or not 0 < retry_delay <= max_retry_delay < math.inf
        ):
            raise InvalidOptions("0 < retry_delay <= max_retry_delay, finite, in seconds")
        self.world = world
        self.ref = ref
        self.tasks = tasks
        self.perform = perform
        self.report = report
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self._slots = asyncio.Semaphore(concurrency)
        # Mutable state: task id -> its asyncio task, while it runs (on the event loop only).
        self._running: dict[str, asyncio.Task[None]] = {}
        self._finished: set[str] = set()
        #: Tasks performed and reported by this worker.
        self.done = 0

    async def run(self) -> None:
        """Follow the entity and perform its tasks, until cancelled."""
        try:
            async for state in self.world.follow(self.ref):
                todo = self.tasks(state)
                # Reported tasks still listed by older states are not done again; once a state
                # without them is seen, they are forgotten.
                self._finished &= todo.keys()
                for task_id, task in todo.items():
                    if task_id not in self._running and task_id not in self._finished:
                        self._running[task_id] = asyncio.create_task(self._do(task_id, task))
        finally:
            running = list(self._running.values())
            for job in running:
                job.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _do(self, task_id: str, task: Any) -> None:
        delay = self.retry_delay
        clock = self.world._engine.clock
        try:
            while True:
                try:
                    async with self._slots:
                        result = await self.perform(task_id, task)
                        await self.world.activate(
                            self.ref,
                            self.report(task_id, result),
                            idempotency_key=f"worker:{task_id}",
                        )
                    self.done += 1
                    self._finished.add(task_id)
                    return
                except Exception as exc:
                    log.warning("task %r failed, retrying in %.3g s: %r", task_id, delay, exc)
                    await clock.sleep(delay)
                    delay = min(delay * 2, self.max_retry_delay)
        finally:
            self._running.pop(task_id, None)
