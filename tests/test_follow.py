"""Followers: the current state first, then every commit in order; bounded; never backwards."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from typing import Any

import pytest

import pachyderm
from pachyderm import backends

from .test_world import ALL, Counter, Log, types_for

MakeBackend = Callable[[], backends.Backend]


class ManualClock:
    """A clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._moved = asyncio.Event()

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        until = self.now + seconds
        while self.now < until:
            self._moved.clear()
            await self._moved.wait()

    def call_later(self, seconds: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(seconds, callback, *args)

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        self._moved.set()
        for _ in range(5):
            await asyncio.sleep(0)


async def test_follow_yields_current_then_each_commit(make_backend: MakeBackend) -> None:
    async with pachyderm.World(backend := make_backend(), entities=types_for(backend)) as w:
        ref = (Counter, "f")
        await w.activate(ref, 1)
        await w.activate(ref, 1)
        follower = w.follow(ref)
        assert await follower.__anext__() == 2
        for expected in (3, 4, 5):
            assert await w.activate(ref, 1) == expected
            assert await follower.__anext__() == expected
        await follower.aclose()


async def test_follow_never_activated_gives_init_and_versions(make_backend: MakeBackend) -> None:
    async with pachyderm.World(backend := make_backend(), entities=types_for(backend)) as w:
        ref = (Log, "v")
        follower = w.follow(ref, versions=True)
        assert await follower.__anext__() == (0, [])
        await w.activate(ref, "a")
        assert await follower.__anext__() == (1, ["a"])
        await follower.aclose()


async def test_since_resumes_after_a_version(make_backend: MakeBackend) -> None:
    async with pachyderm.World(backend := make_backend(), entities=types_for(backend)) as w:
        ref = (Counter, "s")
        for _ in range(3):
            await w.activate(ref, 1)
        # Resuming at the current version: the next item is the next commit, not a repeat.
        follower = w.follow(ref, since=3, versions=True)
        task = asyncio.ensure_future(follower.__anext__())
        await asyncio.sleep(0.01)
        assert not task.done()
        await w.activate(ref, 1)
        assert await task == (4, 4)
        # Resuming from an older version: the versions in between are not kept; the current is.
        older = w.follow(ref, since=1, versions=True)
        assert await older.__anext__() == (4, 4)
        # From beyond what is stored (say, the storage was replaced): the current one, not silence.
        beyond = w.follow(ref, since=99, versions=True)
        assert await beyond.__anext__() == (4, 4)
        with pytest.raises(pachyderm.InvalidOptions):
            w.follow(ref, since=-1)


async def test_no_gap_no_duplicate_between_snapshot_and_stream(make_backend: MakeBackend) -> None:
    async with pachyderm.World(backend := make_backend(), entities=types_for(backend)) as w:
        ref = (Counter, "race")
        seen: list[list[int]] = []

        async def follow_some() -> None:
            got = []
            async for version, _ in w.follow(ref, versions=True):
                got.append(version)
                if version >= 200:
                    break
            seen.append(got)

        followers = []
        for i in range(200):
            if i % 20 == 0:
                followers.append(asyncio.ensure_future(follow_some()))
            await w.activate(ref, 1)
        await asyncio.wait_for(asyncio.gather(*followers), 5)
        for got in seen:
            assert got == list(range(got[0], 201)), got


async def test_slow_follower_skips_ahead_with_bounded_memory() -> None:
    async with pachyderm.World(backends.Memory(), entities=ALL, follower_buffer=8) as w:
        ref = (Counter, "slow")
        follower = w.follow(ref, versions=True)
        assert await follower.__anext__() == (0, 0)
        for _ in range(1000):  # the follower reads nothing meanwhile
            await w.activate(ref, 1)
        got = []
        while True:
            version, _ = await follower.__anext__()
            got.append(version)
            if version == 1000:
                break
        assert len(got) == 8  # bounded: only the newest versions were kept
        assert got == sorted(set(got))  # strictly increasing
        assert follower.skipped == 1000 - 8
        await follower.aclose()


async def test_followers_survive_handler_failures(make_backend: MakeBackend) -> None:
    async with pachyderm.World(backend := make_backend(), entities=types_for(backend)) as w:
        ref = (Counter, "boom")
        follower = w.follow(ref)
        assert await follower.__anext__() == 0
        with pytest.raises(pachyderm.ActivationFailed):
            await w.activate(ref, "boom")
        await w.activate(ref, 1)
        assert await follower.__anext__() == 1
        await follower.aclose()


async def test_leaving_the_loop_unsubscribes() -> None:
    async with pachyderm.World(backends.Memory(), entities=ALL) as w:
        ref = (Counter, "leave")
        async for _state in w.follow(ref):
            assert w.statistics()["followers"] == 1
            break
        gc.collect()
        assert w.statistics()["followers"] == 0
        async with w.follow(ref) as follower:
            await follower.__anext__()
            assert w.statistics()["followers"] == 1
        assert w.statistics()["followers"] == 0


async def test_follow_ends_when_the_world_closes() -> None:
    w = pachyderm.World(backends.Memory(), entities=ALL)
    async with w:
        follower = w.follow((Counter, "end"))
        assert await follower.__anext__() == 0
    with pytest.raises(StopAsyncIteration):
        await follower.__anext__()


async def test_passivation_by_idle_time_and_followers_survive_it() -> None:
    clock = ManualClock()
    async with pachyderm.World(backends.Memory(), entities=ALL, clock=clock, idle_after=10.0) as w:
        ref = (Counter, "idle")
        follower = w.follow(ref, versions=True)
        assert await follower.__anext__() == (0, 0)
        await w.activate(ref, 1)
        assert await follower.__anext__() == (1, 1)
        await w.activate((Counter, "other"), 1)
        assert w.statistics()["resident"] == 2
        await clock.advance(30.0)
        assert w.statistics()["resident"] == 0
        assert w.statistics()["passivated"] == 2
        # Reloaded transparently, and the follower hears the next commit.
        assert await w.activate(ref, 1) == 2
        assert await follower.__anext__() == (2, 2)
        await follower.aclose()


async def test_passivation_by_resident_count(make_backend: MakeBackend) -> None:
    async with pachyderm.World(
        backend := make_backend(), entities=types_for(backend), max_resident=10
    ) as w:
        for i in range(100):
            await w.activate((Counter, str(i)), i)
        assert w.statistics()["resident"] <= 10
        values: list[Any] = [await w.read((Counter, str(i))) for i in range(100)]
        assert values == list(range(100))
        assert w.statistics()["resident"] <= 10


async def test_a_miss_over_the_limit_makes_room_for_the_next_few() -> None:
    """Over ``max_resident``, eviction passivates ``max_resident // 256`` more (at most 64):
    never more than the limit resident, and the hand runs once per few misses, not per miss."""
    async with pachyderm.World(backends.Memory(), entities=[Counter], max_resident=1024) as w:
        for i in range(1024):
            await w.activate((Counter, str(i)), 1)
        assert w.statistics()["resident"] == 1024
        assert w._engine.stats["passivated"] == 0
        await w.activate((Counter, "new"), 1)  # one over: 1 + 1024 // 256 leave
        assert w.statistics()["resident"] == 1020
        assert w._engine.stats["passivated"] == 5
        for i in range(4):  # these find room
            await w.activate((Counter, f"more{i}"), 1)
        assert w.statistics()["resident"] == 1024
        assert w._engine.stats["passivated"] == 5
        values: list[Any] = [await w.read((Counter, str(i))) for i in range(5)]
        assert values == [1] * 5  # the passivated ones (oldest first) kept their state


async def test_residents_that_take_turns_store_only_their_own_state_and_events(
    make_backend: MakeBackend,
) -> None:
    """With one resident at a time, state and event-sourced entities take turns in memory, each
    with a write of its own; each stores only its own state and events."""
    from .test_events import Account, events_of

    backend = make_backend()
    types = [*types_for(backend), Account]
    async with pachyderm.World(backend, entities=types, max_resident=1) as w:
        for _ in range(3):
            for i in range(4):
                await w.activate((Counter, f"c{i}"), 2)
                await w.activate((Account, f"a{i}"), ("deposit", 5))
        assert w.statistics()["resident"] <= 2
        assert w._engine.stats["passivated"] >= 20
    async with pachyderm.World(make_backend(), entities=types) as w:
        for i in range(4):
            assert await w.read((Counter, f"c{i}")) == 6
            assert await w.read((Account, f"a{i}")) == {"balance": 15, "open": False}
            assert await events_of(w, (Account, f"a{i}")) == [
                (s, ("deposited", 5)) for s in (1, 2, 3)
            ]
