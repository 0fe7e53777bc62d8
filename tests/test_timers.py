"""Durable timers: `after`, names, `cancel`, restarts and the horizon, all in virtual time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

import pachyderm
from pachyderm import Update, after, backends, cancel

from ._vclock import VirtualClock
from .test_messages import until

MakeBackend = Callable[[], backends.Backend]


class Alarm(pachyderm.Entity):
    """("arm", seconds, text[, name]) arms a timer; ("cancel", name); any other message is kept."""

    def init(self) -> list[Any]:
        return []

    def activate(self, message: Any, state: list[Any]) -> Any:
        if isinstance(message, tuple) and message[0] == "arm":
            _, seconds, text, *name = message
            return Update(state, after(seconds, text, name=name[0] if name else None))
        if isinstance(message, tuple) and message[0] == "cancel":
            return Update(state, cancel(message[1]))
        if isinstance(message, tuple) and message[0] == "remind":
            _, seconds, key, text = message
            return Update(state, after(seconds, text, to=(Alarm, key)))
        return [*state, message]


class Heartbeat(pachyderm.Entity):
    """An active entity: once started, it re-arms its own timer on every beat."""

    def init(self) -> int:
        return 0

    def activate(self, message: Any, state: int) -> Any:
        if message == "stop":
            return Update(state, cancel("beat"))
        return Update(state + 1, after(1.0, "beat", name="beat"))


ALL = [Alarm, Heartbeat]


def timers(world: pachyderm.World) -> int:
    return world.statistics()["outbox"]["timers"]  # type: ignore[index, no-any-return]


async def settle(world: pachyderm.World) -> None:
    await until(lambda: not world._engine.busy() and world.statistics()["held"] == 0)


async def test_a_timer_fires_at_its_time_and_once(make_backend: MakeBackend) -> None:
    clock = VirtualClock()
    async with pachyderm.World(make_backend(), entities=ALL, clock=clock) as w:
        ref = (Alarm, "a")
        await w.activate(ref, ("arm", 30, "ring"))
        assert timers(w) == 1
        await clock.advance(29)
        await settle(w)
        assert await w.read(ref) == []
        await clock.advance(1)
        await until(lambda: timers(w) == 0)
        await settle(w)
        assert await w.read(ref) == ["ring"]
        await clock.advance(3600)
        await settle(w)
        assert await w.read(ref) == ["ring"]
        assert w.statistics()["timers_fired"] == 1


async def test_a_named_timer_is_replaced_and_cancelled(make_backend: MakeBackend) -> None:
    clock = VirtualClock()
    async with pachyderm.World(make_backend(), entities=ALL, clock=clock) as w:
        ref = (Alarm, "a")
        await w.activate(ref, ("arm", 10, "first", "t"))
        await w.activate(ref, ("arm", 20, "second", "t"))  # replaces "first"
        await w.activate(ref, ("arm", 30, "other", "u"))
        assert timers(w) == 2
        await w.activate(ref, ("cancel", "u"))
        assert timers(w) == 1
        await clock.advance(15)
        await settle(w)
        assert await w.read(ref) == []
        await clock.advance(100)
        await until(lambda: timers(w) == 0)
        await settle(w)
        assert await w.read(ref) == ["second"]


async def test_replaced_timers_do_not_pile_up_in_memory(make_backend: MakeBackend) -> None:
    """Re-arming a named timer leaves its old entry in the timer heap: dropped in bulk."""
    clock = VirtualClock()
    async with pachyderm.World(make_backend(), entities=ALL, clock=clock) as w:
        refs = [(Alarm, f"a{i}") for i in range(20)]
        for round in range(150):  # 3000 timers armed, all within the horizon: 20 stay live
            await asyncio.gather(*[w.activate(ref, ("arm", 50, f"r{round}", "t")) for ref in refs])
        assert timers(w) == 20
        heap = w._engine.dispatcher._heap
        assert len(heap) <= 2 * 20 + 1024 + 1  # not 3000
        await clock.advance(60)
        await until(lambda: timers(w) == 0)
        await settle(w)
        assert [await w.read(ref) for ref in refs] == [["r149"]] * 20  # the newest, once each
        assert w.statistics()["timers_fired"] == 20


async def test_a_timer_can_go_to_another_entity(make_backend: MakeBackend) -> None:
    clock = VirtualClock()
    async with pachyderm.World(make_backend(), entities=ALL, clock=clock) as w:
        await w.activate((Alarm, "a"), ("remind", 5, "b", "hello"))
        await clock.advance(5)
        await until(lambda: timers(w) == 0)
        await settle(w)
        assert await w.read((Alarm, "b")) == ["hello"]
        assert await w.read((Alarm, "a")) == []


async def test_an_active_entity_runs_on_its_own(make_backend: MakeBackend) -> None:
    clock = VirtualClock()
    async with pachyderm.World(make_backend(), entities=ALL, clock=clock) as w:
        ref = (Heartbeat, "h")
        assert await w.activate(ref, "start") == 1
        for beat in range(2, 12):
            await clock.advance(1)
            await until(lambda beat=beat: w.statistics()["timers_fired"] == beat - 1)
        await settle(w)
        assert await w.read(ref) == 11  # ten beats, and nobody sent it anything
        await w.activate(ref, "stop")
        await clock.advance(10)
        await settle(w)
        assert await w.read(ref) == 11
        assert timers(w) == 0


async def test_overdue_timers_fire_once_after_a_restart(make_backend: MakeBackend) -> None:
    clock = VirtualClock()
    backend = make_backend()
    async with pachyderm.World(backend, entities=ALL, clock=clock) as w:
        await w.activate((Alarm, "a"), ("arm", 5, "one"))
        await w.activate((Alarm, "a"), ("arm", 7, "two"))
        await w.activate((Alarm, "b"), ("arm", 5000, "later"))
    clock.now += 60  # the world was down while the first two came due
    reopened = backend if isinstance(backend, backends.Memory) else make_backend()
    async with pachyderm.World(reopened, entities=ALL, clock=clock) as w:
        await until(lambda: timers(w) == 1)
        await settle(w)
        assert await w.read((Alarm, "a")) == ["one", "two"]  # in due order
        assert w.statistics()["timers_fired"] == 2
        await clock.advance(5000)
        await until(lambda: timers(w) == 0)
        await settle(w)
        assert await w.read((Alarm, "b")) == ["later"]


async def test_timers_beyond_the_horizon_wait_in_storage(make_backend: MakeBackend) -> None:
    clock = VirtualClock()
    async with pachyderm.World(make_backend(), entities=ALL, clock=clock, timer_horizon=10.0) as w:
        await w.activate((Alarm, "a"), ("arm", 3, "near"))
        await w.activate((Alarm, "a"), ("arm", 100, "far"))
        assert w.statistics()["timers_in_memory"] == 1  # only the near one
        await clock.advance(4)
        await until(lambda: timers(w) == 1)
        for _ in range(20):  # scans every half horizon bring the far one in on time
            await clock.advance(5)
            await settle(w)
        await until(lambda: timers(w) == 0)
        await settle(w)
        assert await w.read((Alarm, "a")) == ["near", "far"]


@pytest.mark.parametrize("seconds", [-1, float("nan"), float("inf"), "5", True])
async def test_bad_delays_are_refused(make_backend: MakeBackend, seconds: Any) -> None:
    async with pachyderm.World(make_backend(), entities=ALL) as w:
        with pytest.raises(pachyderm.InvalidOptions):
            await w.activate((Alarm, "a"), ("arm", seconds, "x"))
        with pytest.raises(pachyderm.InvalidOptions):
            await w.activate((Alarm, "a"), ("arm", 1, "x", ""))
        assert timers(w) == 0


async def test_a_timer_cancelled_after_its_delivery_is_not_applied() -> None:
    """The timer fires into a busy receiver's mailbox; its sender cancels it before it runs."""
    gate = asyncio.Event()

    class Busy(pachyderm.Entity):
        name = "tests.timers.Busy"

        def init(self) -> list[Any]:
            return []

        async def activate(self, message: Any, state: list[Any]) -> Any:
            if message == "block":
                await gate.wait()
            return [*state, message]

    class Boss(pachyderm.Entity):
        name = "tests.timers.Boss"

        def activate(self, message: Any, state: Any) -> Any:
            if message == "arm":
                return Update(state, after(5, "timer", to=(Busy, "b"), name="t"))
            return Update(state, cancel("t"))

    clock = VirtualClock()
    async with pachyderm.World(backends.Memory(), entities=[Busy, Boss], clock=clock) as w:
        await w.activate((Boss, "x"), "arm")
        blocked = asyncio.create_task(w.activate((Busy, "b"), "block"))
        await clock.settle()
        await clock.advance(5)  # fires: the message waits behind "block"
        await until(lambda: w.statistics()["delivered"] == 1)
        await w.activate((Boss, "x"), "cancel")  # commits: the row is gone
        gate.set()
        assert await blocked == ["block"]
        await settle(w)
        assert await w.read((Busy, "b")) == ["block"]  # the delivered timer was not applied
        assert timers(w) == 0
        assert w.statistics()["conflicts"] >= 1  # its write lost: the row was gone
