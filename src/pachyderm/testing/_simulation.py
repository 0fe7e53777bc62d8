"""``Simulation``: the real world runtime on the memory backend, in virtual time, from a seed.

The simulation owns a ``VirtualLoop`` and runs a real ``World`` on it, with a clock that reads the
loop's virtual time. Its calls are plain functions: each one drives the loop until it has its
answer, jumping over time that nothing uses (a timer an hour away fires at once when nothing
else can run). Deliveries go through the ``Network`` (the seeded scheduler and its faults); commits
through ``_Storage`` (a ``Memory`` backend that can crash around a commit). Everything else is the
production code.
"""

from __future__ import annotations

import asyncio
import builtins
import random
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, Final, TypeVar

from .._core._resident import Call, Resident
from .._entity import Entity
from .._errors import (
    Indeterminate,
    InvalidOptions,
    PachydermError,
    Unavailable,
)
from .._eventsourced import fold
from .._world import World
from ..backends._base import StoredEvent, Write
from ..backends._memory import Memory
from ._loop import VirtualLoop
from ._network import Chooser, ClientCall, Faults, Network
from ._records import ENTRY, Pending, Recording, Reply, SimulationError, Step, step_of

__all__ = ["Pending", "Recording", "Simulation", "SimulationError", "Step"]

T = TypeVar("T")

#: Virtual wall-clock time at the start of every simulation (2026-01-01T00:00:00Z), so that stored
#: timestamps are the same in every run.
EPOCH: Final = 1_767_225_600.0
_DAY: Final = 24 * 3600.0
_MAX_NOTES: Final = 10_000


class _Clock:
    """The world's clock: the loop's virtual time (``wall`` starts at ``EPOCH``)."""

    __slots__ = ("_loop",)

    def __init__(self, loop: VirtualLoop) -> None:
        self._loop = loop

    def monotonic(self) -> float:
        return self._loop.now

    def wall(self) -> float:
        return EPOCH + self._loop.now

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_later(self, seconds: float, callback: Callable[..., object], *args: Any) -> Any:
        return self._loop.call_later(seconds, callback, *args)


class _Storage(Memory):
    """The memory backend, with commits that can crash just before or just after they happen."""

    def __init__(self, decide: Callable[[Sequence[Write]], str | None]) -> None:
        super().__init__()
        self._decide = decide
        #: Writes of the last commit that crashed after it happened: ref -> did it win.
        self.crashed: dict[tuple[str, str], bool] = {}

    async def commit(self, writes: Sequence[Write]) -> list[bool]:
        self.crashed = {}
        crash = self._decide(writes)
        if crash == "before":
            raise Indeterminate("simulated crash before the commit (nothing was written)")
        outcome = await super().commit(writes)
        if crash == "after":
            self.crashed = {
                (w.type_name, w.key): won for w, won in zip(writes, outcome, strict=True)
            }
            raise Indeterminate("simulated crash after the commit, before its reply")
        return outcome


class Simulation:
    """A deterministic world for tests: real runtime, memory backend, virtual time, one seed.

    Args:
        entities: the entity types, as for ``World``.
        seed: an int; the same seed replays the same run exactly (the order of deliveries, of
            activations, and every fault drawn). Or a ``random.Random`` to draw every choice
            from, such as Hypothesis's ``st.randoms()`` (``schedules(shrink=True)``), which then
            shrinks the choices themselves and replays a failure by its own means.
        faults: how often faults are injected (``Faults``); none by default. Faults can also be
            armed one at a time: ``duplicate()``, ``delay()``, ``crash_commit()``, ``restart()``.
        name: the world's name.
        history: the most steps kept for ``history``, ``steps`` and ``trace`` (the oldest are
            dropped first, so that a long run's memory stays bounded; 0 keeps none).
        chooser: how ``explore`` picks each delivery (one at a time); None: rounds, by the seed.
        options: ``WorldOptions`` fields, as keywords, for the world.

    Every call is a plain function (no ``await``): it runs the simulation until it has its answer.
    Use it from ordinary (``def``) tests; it cannot run inside another running event loop.
    ``with Simulation(...) as sim:`` closes it, and prints the seed and the faults if the block
    raised.

    Durability: what a call was answered with is committed to the simulation's memory backend,
    which ``restart()`` keeps (a crash loses only memory); nothing outlives the object.
    Interruption: a call stopped by an exception from outside (``KeyboardInterrupt``) leaves
    the loop wherever it was; the world is consistent (its commits are atomic) but the
    simulation should only be closed then.
    """

    def __init__(
        self,
        entities: Iterable[type[Entity]] = (),
        *,
        seed: int | random.Random = 0,
        faults: Faults | None = None,
        name: str = "default",
        history: int = 1_000_000,
        chooser: Chooser | None = None,
        **options: Any,
    ) -> None:
        if isinstance(history, bool) or not isinstance(history, int) or history < 0:
            raise InvalidOptions(f"history is the most steps kept, an int >= 0; got {history!r}")
        if isinstance(seed, bool) or not isinstance(seed, int | random.Random):
            raise InvalidOptions(f"a simulation's seed is an int or a random.Random; got {seed!r}")
        if faults is not None and not isinstance(faults, Faults):
            raise InvalidOptions(f"faults is a pachyderm.testing.Faults; got {faults!r:.60}")
        if isinstance(entities, str | bytes) or not isinstance(entities, Iterable):
            raise InvalidOptions(f"entities is a list of entity types; got {entities!r:.80}")
        if chooser is not None and not callable(getattr(chooser, "choose", None)):
            raise InvalidOptions(f"a chooser has choose(n) -> int; got {chooser!r:.80}")
        self.seed: int | None = seed if isinstance(seed, int) else None
        self.faults = faults or Faults()
        self.entities = tuple(entities)
        self._name = name
        self._options = options
        self.rng = seed if isinstance(seed, random.Random) else random.Random(seed)
        self._loop = VirtualLoop(self._idle)
        self._clock = _Clock(self._loop)
        self.backend = _Storage(self._crash_decision)
        self.network = Network(
            self._loop,
            self.rng,
            self.faults,
            deliver=self._lost_delivery,
            call=self._start_call,
            note=self._note,
            chooser=chooser,
        )
        #: The faults injected, in order, as text (``report()`` prints them): the last
        #: ``_MAX_NOTES`` of them; ``faults_injected`` counts them all.
        self.injected: deque[str] = deque(maxlen=_MAX_NOTES)
        self.faults_injected = 0
        # Every step, oldest first, flat: `ENTRY` values per step, in one deque (cheap to
        # record: no object per step for the garbage collector to count and track); `trace` and
        # `steps` make `Step`s of them when asked. At most `history` steps (the oldest go first).
        self._log: deque[Any] = deque(maxlen=history * ENTRY)
        self.steps_recorded = 0
        self._recordings: dict[Recording, None] = {}  # in the order they began: replayable
        self._clients = 0
        self._crash_next: list[tuple[str, tuple[str, str] | None]] = []
        self._quiet: Callable[[], bool] | None = None
        self._limit = 0
        self._closed = False
        self.restarts = 0
        try:
            self.world = self._new_world()
            self._drive(self.world.start(), max_time=_DAY)
        except BaseException:
            self._closed = True
            self._loop.close()
            raise

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Simulation:
        return self

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if exc is not None:
            print(self.report(), file=sys.stderr)
        self.close()

    def close(self) -> None:
        """Close the world (finishing accepted calls) and the loop. Idempotent."""
        if self._closed:
            return
        try:
            for recording in list(self._recordings):
                recording.close()
            for call in self.network.drop_messages():
                call.reply._fail(Unavailable("the simulation closed before the call was delivered"))
            self._drive(self.world.aclose(), max_time=_DAY)
        finally:
            self._closed = True
            self._loop.close()

    def _new_world(self) -> World:
        world = World(
            self.backend,
            entities=self.entities,
            name=self._name,
            clock=self._clock,
            **self._options,
        )
        engine = world._engine
        engine.observer = self._observe
        self.network.deliver = engine.dispatcher.deliver
        # Refills read stored rows again (`Dispatcher._refill_all`): they bypass the network.
        engine.dispatcher.deliver = self.network.accept  # type: ignore[method-assign, assignment]
        return world

    def restart(self) -> None:
        """Crash the world and start a new one on the stored state (like a killed process).

        What was committed stays; nothing in memory survives. Calls whose commit was in flight
        fail with ``Indeterminate``, the others (queued, running, run and not yet sent to the
        storage) with ``Unavailable``: nothing of theirs committed; messages in flight
        are delivered again from the outbox; followers (``follow``) subscribe again after the
        last version they saw.
        """
        self._check_open()
        self._note("restart")
        old = self.world
        self._abandon(old)
        self.restarts += 1
        self.world = self._new_world()
        self._drive(self.world.start(), max_time=_DAY)
        for recording in self._recordings:
            recording._start()

    def _abandon(self, world: World) -> None:
        engine = world._engine
        world._serving = False
        world._closed = True
        engine.dispatcher.stop()
        crashed = Indeterminate("the simulated node crashed while the call was committing")
        stopped = Unavailable("the simulated node crashed before the call committed")
        for resident in list(engine.residents.values()):
            for _, outcome in (resident.idempotent or {}).values():
                if not outcome.done():  # calls waiting for another call with their key
                    outcome.set_exception(crashed)
                    outcome.exception()  # read here: it is raised in each waiter
            running, resident.running = resident.running, None
            if running is not None:  # an async handler is running: it stops with the node
                if running[1] is not None:
                    running[1].cancel()
                if not running[0].future.done():
                    running[0].future.set_exception(stopped)
            for name in ("mailbox", "pending", "inflight"):
                for call in getattr(resident, name) or ():
                    if not call.future.done():
                        # Only a commit in flight may have happened; the others did not.
                        call.future.set_exception(crashed if name == "inflight" else stopped)
        for call in self.network.drop_messages():
            call.reply._fail(Unavailable("the simulated node crashed before the call reached it"))
        for channels in engine.channels.values():
            for channel in channels:
                channel.close()
        for event_channels in engine.event_channels.values():
            for event_channel in event_channels:
                event_channel.close()
        for task in [*engine._tasks, *engine.commits]:
            task.cancel()
        self._settle()
        self.backend._space = None  # closed without a flush: a crash

    # ------------------------------------------------------------------ calls

    def submit(
        self,
        ref: tuple[type[Entity], Any],
        message: Any,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
        client: str | None = None,
    ) -> Pending:
        """Send a call without waiting: it runs when the simulation runs; returns its ``Pending``.

        Calls from different clients may be delivered in any order (the seed's); calls of one
        ``client`` name keep their order. The ref is checked now (``InvalidKey``, ...).
        """
        self._check_open()
        info, key = self.world._registry.resolve(ref)
        if client is not None and not (isinstance(client, str) and 0 < len(client) <= 200):
            raise InvalidOptions(f"a client name is a str of 1-200 characters; got {client!r:.60}")
        reply = Pending(Reply(loop=self._loop), ref)
        if client is None:
            self._clients += 1
            client = f"#{self._clients}"
        call = ClientCall(ref, message, idempotency_key, timeout, reply)
        self.network.submit(client, (info.name, key), call)
        return reply

    def activate(
        self,
        ref: tuple[type[Entity], Any],
        message: Any,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Run one activation (and whatever else is pending meanwhile); return the new state.

        Raises what ``World.activate`` raises.
        """
        reply = self.submit(ref, message, idempotency_key=idempotency_key, timeout=timeout)
        return self._drive(_wait(reply._future), max_time=_DAY)

    def read(self, ref: tuple[type[Entity], Any]) -> Any:
        """The entity's latest committed state (``World.read``)."""
        self._check_open()
        return self._drive(self.world.read(ref), max_time=_DAY)

    def list(self, entity_type: type[Entity], *, prefix: str = "") -> list[str]:
        """The keys of the stored entities of a type (``World.list``), all of them."""
        self._check_open()

        async def keys() -> list[str]:
            return [k async for k in self.world.list(entity_type, prefix=prefix)]

        return self._drive(keys(), max_time=_DAY)

    def follow(
        self, ref: tuple[type[Entity], Any], *, since: int | None = None, versions: bool = False
    ) -> Recording:
        """Follow an entity (``World.follow``): the returned ``Recording`` fills as the sim runs."""
        self._check_open()
        self.world._registry.resolve(ref)
        recording = Recording(self, ref, since, versions)
        self._recordings[recording] = None
        recording._start()
        self.run_until_idle()
        return recording

    def events(self, ref: tuple[type[Entity], Any], *, since: int = 0) -> Recording:
        """Read an event-sourced entity's events (``World.events``) into a ``Recording``.

        Its ``items`` are ``(seq, event)``, filled as the simulation runs, across restarts.

        Raises:
            InvalidKey, UnknownEntityType: a bad ref. InvalidOptions: not event-sourced.
        """
        self._check_open()
        self.world.events(ref, since=since)  # checks the ref, the type and `since` now
        recording = Recording(self, ref, since, True, events=True)
        self._recordings[recording] = None
        recording._start()
        self.run_until_idle()
        return recording

    def run_until_complete(self, awaitable: Awaitable[T], *, max_time: float = _DAY) -> T:
        """Run a coroutine of your own inside the simulation (it may use ``sim.world``)."""
        self._check_open()
        return self._drive(awaitable, max_time=max_time)

    # ------------------------------------------------------------------ time

    @property
    def now(self) -> float:
        """Virtual seconds since the simulation started."""
        return self._loop.now

    def run_until_idle(self, *, max_activations: int = 1_000_000) -> None:
        """Deliver and run everything that can happen now, without moving the clock."""
        self._check_open()
        _check_bounds(max_activations=max_activations)
        self._run(self._loop.now, max_activations, quiet=None)

    def advance(self, seconds: float, *, max_activations: int = 1_000_000) -> None:
        """Move virtual time ``seconds`` forward, running everything due on the way, in order."""
        self._check_open()
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds >= 0:
            raise InvalidOptions(f"advance takes seconds >= 0; got {seconds!r}")
        _check_bounds(max_activations=max_activations)
        self._run(self._loop.now + seconds, max_activations, quiet=None)
        self._run(self._loop.now, max_activations, quiet=None)

    def run(self, *, max_time: float = 7 * _DAY, max_activations: int = 1_000_000) -> None:
        """Run until nothing is pending: every message applied and every timer fired.

        Time jumps to the next thing that can happen whenever nothing can run now. Raises
        ``SimulationError`` if the world is still busy after ``max_time`` virtual seconds or
        ``max_activations`` activations (an entity that re-arms a timer forever, say).
        """
        self._check_open()
        _check_bounds(max_time=max_time, max_activations=max_activations)
        self._run(self._loop.now + max_time, max_activations, quiet=self.quiet)
        if not self.quiet():
            raise SimulationError(
                f"the world is still busy after {max_time} virtual seconds "
                f"({self.pending()}); use advance() for worlds that never rest"
            )

    def quiet(self) -> bool:
        """True if nothing is pending: no call, delivery, message or timer is waiting."""
        if not self.network.empty():
            return False
        engine = self.world._engine
        if engine.ready or engine.commits:
            return False
        counts = self.backend.outbox_counts()
        if counts["messages"] or counts["timers"]:
            return False
        dispatcher = engine.dispatcher
        return not (
            dispatcher.held or dispatcher.doubt or dispatcher.doubt_consumed or engine.busy()
        )

    def pending(self) -> dict[str, int]:
        """What is waiting: in the network, in held queues, and in the outbox (stored)."""
        engine = self.world._engine
        return {
            "in_flight": self.network.pending(),
            "held": sum(len(h) for h in engine.dispatcher.held.values()),
            **{k: v for k, v in self.backend.outbox_counts().items() if k != "dead"},
        }

    # ------------------------------------------------------------------ faults on demand

    def duplicate(self, to: tuple[type[Entity], Any] | None = None) -> None:
        """Deliver the next message (to ``to``, if given) twice."""
        self.network.armed.append(("duplicate", self._target(to), 0.0))

    def delay(self, seconds: float, to: tuple[type[Entity], Any] | None = None) -> None:
        """Hold back the next delivery (to ``to``, if given) by ``seconds`` of virtual time."""
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
            raise InvalidOptions(f"delay takes seconds > 0; got {seconds!r}")
        self.network.armed.append(("delay", self._target(to), float(seconds)))

    def crash_commit(
        self, *, after: bool = False, ref: tuple[type[Entity], Any] | None = None
    ) -> None:
        """Crash the next commit (of ``ref``'s write, if given): its callers see ``Indeterminate``.

        ``after=False``: nothing is written. ``after=True``: it is written, the reply is lost.
        """
        self._crash_next.append(("after" if after else "before", self._target(ref)))

    def _target(self, ref: tuple[type[Entity], Any] | None) -> tuple[str, str] | None:
        if ref is None:
            return None
        info, key = self.world._registry.resolve(ref)
        return (info.name, key)

    def _crash_decision(self, writes: Sequence[Write]) -> str | None:
        for i, (when, target) in enumerate(self._crash_next):
            if target is None or any((w.type_name, w.key) == target for w in writes):
                del self._crash_next[i]
                return self._crash(when, writes)
        faults = self.faults
        if faults.crash_before_commit and self.rng.random() < faults.crash_before_commit:
            return self._crash("before", writes)
        if faults.crash_after_commit and self.rng.random() < faults.crash_after_commit:
            return self._crash("after", writes)
        return None

    def _crash(self, when: str, writes: Sequence[Write]) -> str:
        refs = ", ".join(f"{w.type_name}:{w.key!r}" for w in writes[:5])
        more = f" and {len(writes) - 5} more" if len(writes) > 5 else ""
        self._note(f"crash {when} commit: {refs}{more}")
        return when

    def _note(self, text: str) -> None:
        self.faults_injected += 1
        self.injected.append(f"t={self._loop.now:.3f} {text}")

    # ------------------------------------------------------------------ history

    def history(self, ref: tuple[type[Entity], Any]) -> builtins.list[tuple[Any, Any]]:
        """The entity's history: ``(message, new state or error)`` pairs, in order."""
        return [(s.message, s.result) for s in self.steps(ref)]

    def steps(self, ref: tuple[type[Entity], Any]) -> builtins.list[Step]:
        """The entity's history as ``Step`` records (version, sender, time, ...)."""
        info, key = self.world._registry.resolve(ref)
        target = (info.name, key)
        return [step_of(entry) for entry in self._entries() if entry[0] == target]

    @property
    def trace(self) -> builtins.list[tuple[tuple[str, str], Step]]:
        """Every entity's steps, in the order they happened: ``((type name, key), Step)``."""
        return [(entry[0], step_of(entry)) for entry in self._entries()]

    def _entries(self) -> Iterator[tuple[Any, ...]]:
        """The steps recorded, oldest first, as ``step_of`` reads them."""
        values = iter(self._log)
        return zip(*([values] * ENTRY), strict=True)

    def states(self) -> dict[tuple[str, str], Any]:
        """Every stored entity's state, by ``(type name, key)``, in a stable order."""
        space = self.backend._spaces.get(self._name)
        out: dict[tuple[str, str], Any] = {}
        if space is None:
            return out
        registry = self.world._registry
        for type_name in sorted(space.rows):
            info = registry.by_name(type_name)
            table = space.rows[type_name]
            for key, row in sorted(table.items()):
                if info.events is None:
                    out[(type_name, key)] = info.codec.decode(row.data)
                else:
                    log = space.events.get((type_name, key), [])
                    events = (StoredEvent(i + 1, *event) for i, event in enumerate(log))
                    out[(type_name, key)] = fold(info, key, row, events)
        return out

    def statistics(self) -> dict[str, object]:
        """The world's ``statistics()``, and the simulation's own counters."""
        return {
            **self.world.statistics(),
            "simulation": {
                "seed": self.seed,
                "time": self._loop.now,
                "delivered": self.network.delivered,
                "faults": self.faults_injected,
                "restarts": self.restarts,
                "jumps": self._loop.jumps,
            },
        }

    def report(self) -> str:
        """The seed and every fault injected: what a failing test prints, to replay the run."""
        seed = "a random.Random of the test's" if self.seed is None else self.seed
        lines = [
            f"pachyderm simulation: seed={seed}, faults={self.faults!r}, "
            f"virtual time {self._loop.now:.3f} s, {self.steps_recorded} steps, "
            f"{self.faults_injected} faults injected"
        ]
        notes = list(self.injected)
        if self.faults_injected > len(notes):
            lines.append(f"  ... {self.faults_injected - len(notes)} earlier ones not kept")
        lines += [f"  {text}" for text in notes[:50]]
        if len(notes) > 50:
            lines.append(f"  ... and {len(notes) - 50} more")
        if self.seed is not None:
            lines.append(f"replay with Simulation(..., seed={self.seed}, faults={self.faults!r})")
        else:
            lines.append("replay with the same random.Random (Hypothesis replays its own draws)")
        return "\n".join(lines)

    def _observe(
        self, resident: Resident, calls: builtins.list[Call], error: PachydermError | None
    ) -> None:
        ref = resident.ref
        now = self._loop.now
        log = self._log
        self.steps_recorded += len(calls)
        if error is None:  # the common case: committed (or failed with nothing to commit)
            for call in calls:
                delivery = call.delivery
                if delivery is None:
                    log.extend(
                        (ref, call.message, call.result, call.version, None, None, now, False)
                    )
                else:
                    st, sk = delivery.sender_type, delivery.sender_key
                    log.extend((ref, call.message, call.result, call.version, st, sk, now, False))
            return
        committed = self.backend.crashed.get(ref, False)
        for call in calls:
            delivery = call.delivery
            if committed:
                result, version = call.result, call.version
            elif delivery is not None:
                continue  # not applied: it is delivered again
            else:
                result, version = error, None
            sender: tuple[str | None, str | None] = (None, None)
            if delivery is not None:
                sender = (delivery.sender_type, delivery.sender_key)
            log.extend((ref, call.message, result, version, *sender, now, committed))

    # ------------------------------------------------------------------ driving the loop

    def _check_open(self) -> None:
        if self._closed:
            raise SimulationError("the simulation is closed")

    def _start_call(self, call: ClientCall) -> None:
        world = self.world
        reply = call.reply
        if call.idempotency_key is None and call.timeout is None and world._call_timeout is None:
            # What `World.activate` does with no key and no deadline, without a task per call:
            # its checks, then its `_post`; the engine answers the reply's future itself.
            try:
                info, key = world._registry.resolve(call.ref)
                if not world._serving:
                    world._check_open()
                world._post(info, key, call.message, None, reply._future)
            except PachydermError as exc:
                reply._fail(exc)
            return
        task = self._loop.create_task(
            world.activate(
                call.ref, call.message, idempotency_key=call.idempotency_key, timeout=call.timeout
            )
        )
        task.add_done_callback(reply._answer)

    @staticmethod
    def _lost_delivery(envelope: Any) -> None:
        raise AssertionError("the network delivers through the world's dispatcher")

    def _idle(self) -> bool:
        quiet = self._quiet
        if quiet is not None and quiet():
            self._loop.stop()
            return True
        if self.world._engine.stats["activations"] > self._limit:
            self._loop.stop()
            return True
        return self.network.step()

    def _run(self, until: float, max_activations: int, quiet: Callable[[], bool] | None) -> None:
        self._quiet = quiet
        self._limit = self.world._engine.stats["activations"] + max_activations
        try:
            self._loop.drive(until)
        finally:
            self._quiet = None
        if self.world._engine.stats["activations"] > self._limit:
            raise SimulationError(
                f"more than {max_activations} activations without rest: "
                "entities that message each other forever?"
            )

    def _settle(self) -> None:
        self._quiet = None
        self._limit = self.world._engine.stats["activations"] + 1_000_000
        self._loop.drive(self._loop.now)

    def _drive(self, awaitable: Awaitable[T], *, max_time: float) -> T:
        loop = self._loop
        future = asyncio.ensure_future(awaitable, loop=loop)
        future.add_done_callback(lambda _: loop.stop())
        self._quiet = None
        self._limit = self.world._engine.stats["activations"] + 10_000_000
        loop.drive(loop.now + max_time)
        if not future.done():
            future.cancel()
            self._settle()
            raise SimulationError(
                "the call did not finish: nothing more could run"
                if loop.stalled
                else f"the call did not finish within {max_time} virtual seconds"
            )
        return future.result()


def _check_bounds(**bounds: float) -> None:
    for name, value in bounds.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise InvalidOptions(f"{name} is a number > 0; got {value!r:.60}")


async def _wait(future: asyncio.Future[T]) -> T:
    return await future
