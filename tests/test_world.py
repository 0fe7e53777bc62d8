"""The world's promises, on every backend: one at a time, latest state, errors leave no trace."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import math
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import pytest

import pachyderm
from pachyderm import backends


class Counter(pachyderm.Entity):
    name = "tests.Counter"

    def init(self) -> int:
        return 0

    def activate(self, message: Any, state: int) -> int:
        if message == "boom":
            raise RuntimeError("boom")
        if message == "no":
            raise pachyderm.Rejected("refused on purpose")
        if message == "own-timeout":
            raise pachyderm.Timeout("the handler's own")
        return state + (message if isinstance(message, int) else 1)


class Log(pachyderm.Entity):
    """A list state: mutable, so every run must get its own copy."""

    name = "tests.Log"

    def init(self) -> list[Any]:
        return []

    def activate(self, message: Any, state: list[Any]) -> Any:
        state.append(message)
        if message == "mutate-then-raise":
            raise ValueError("after mutating")
        if message == "set":
            return {1, 2}
        if message == "huge":
            return "x" * (2 << 20)
        return state


class Sleepy(pachyderm.Entity):
    name = "tests.Sleepy"

    def init(self) -> int:
        return 0

    async def activate(self, message: Any, state: int) -> int:
        if message == "hang":
            await asyncio.Event().wait()
        if message == "own-timeout":
            raise pachyderm.Timeout("the handler's own")
        return state + 1


@dataclasses.dataclass
class Point:
    x: int
    y: tuple[int, int]


class Typed(pachyderm.Entity):
    name = "tests.Typed"
    state_type = Point

    def init(self) -> Point:
        return Point(0, (0, 0))

    def activate(self, message: Any, state: Point) -> Any:
        if message == "wrong":
            return "not a point"
        return Point(state.x + 1, (state.x, state.x + 1))


class Item(msgspec.Struct):
    n: int


class Structs(pachyderm.Entity):
    name = "tests.Structs"
    state_type = list[Item]

    def init(self) -> list[Item]:
        return []

    def activate(self, message: Any, state: list[Item]) -> list[Item]:
        return [*state, Item(len(state))]


class Pickled(pachyderm.Entity):
    name = "tests.Pickled"
    pickle = True

    def init(self) -> set[int]:
        return set()

    def activate(self, message: Any, state: set[int]) -> set[int]:
        return state | {message}


class Upper(pachyderm.Entity):
    """Normalises keys with the optional classmethod."""

    name = "tests.Upper"

    @classmethod
    def key(cls, raw: object) -> str:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return f"n{raw}"
        if not isinstance(raw, str):
            raise pachyderm.InvalidKey("only str or int")
        return raw.upper()

    def activate(self, message: Any, state: Any) -> Any:
        return self.key


ALL = [Counter, Log, Sleepy, Typed, Structs, Pickled, Upper]
MakeBackend = Callable[[], backends.Backend]


def types_for(backend: backends.Backend) -> list[type[pachyderm.Entity]]:
    """ALL, but no pickling type on a backend that reads over the network (it refuses them)."""
    return [cls for cls in ALL if not (backend.networked and cls.pickle)]


def world(make_backend: MakeBackend, **options: Any) -> pachyderm.World:
    backend = make_backend()
    return pachyderm.World(backend, entities=types_for(backend), **options)


async def test_activate_read_and_init(make_backend: MakeBackend) -> None:
    async with world(make_backend) as w:
        c = (Counter, "my_counter")
        assert await w.read(c) == 0
        assert [k async for k in w.list(Counter)] == []  # read stores nothing
        assert await w.activate(c, "increment") == 1
        assert await w.activate(c, "increment") == 2
        assert await w.read(c) == 2
        assert [k async for k in w.list(Counter)] == ["my_counter"]


async def test_state_survives_restart(make_backend: MakeBackend) -> None:
    async with world(make_backend) as w:
        await w.activate((Counter, "a"), 5)
    async with world(make_backend) as w:
        assert await w.read((Counter, "a")) == 5
        assert await w.activate((Counter, "a"), 1) == 6


async def test_one_at_a_time_on_the_latest_state(make_backend: MakeBackend) -> None:
    async with world(make_backend) as w:
        results = await asyncio.gather(*[w.activate((Counter, "hot"), 1) for _ in range(500)])
        # Every activation saw the one before it: the results are exactly 1..500, no repeats.
        assert sorted(results) == list(range(1, 501))
        assert await w.read((Counter, "hot")) == 500


async def test_many_entities_concurrently(make_backend: MakeBackend) -> None:
    async with world(make_backend) as w:
        await asyncio.gather(*[w.activate((Counter, str(i % 50)), 1) for i in range(1000)])
        states = [await w.read((Counter, str(i))) for i in range(50)]
        assert states == [20] * 50
        assert len([k async for k in w.list(Counter)]) == 50


@pytest.mark.parametrize(
    "bad",
    [
        True,
        False,
        None,
        1.5,
        math.nan,
        3,
        b"bytes",
        ["a"],
        ("a",),
        {"a": 1},
        "",
        "a\x00b",
        "\ud800",
        "x" * (pachyderm.MAX_KEY_BYTES + 1),
        "é" * (pachyderm.MAX_KEY_BYTES // 2 + 1),
    ],
)
async def test_invalid_keys_are_refused_before_io(bad: object) -> None:
    backend = backends.Memory()
    async with pachyderm.World(backend, entities=ALL) as w:
        with pytest.raises(pachyderm.InvalidKey):
            await w.activate((Counter, bad), 1)
        with pytest.raises(pachyderm.InvalidKey):
            await w.read((Counter, bad))
        with pytest.raises(pachyderm.InvalidKey):
            w.follow((Counter, bad))
        assert backend.statistics()["commits"] == 0
        assert w.statistics()["loads"] == 0


async def test_key_limit_is_inclusive() -> None:
    async with pachyderm.World(backends.Memory(), entities=ALL) as w:
        assert await w.activate((Counter, "k" * pachyderm.MAX_KEY_BYTES), 1) == 1


async def test_custom_key_normalises_and_refuses() -> None:
    async with pachyderm.World(backends.Memory(), entities=ALL) as w:
        assert await w.activate((Upper, "abc"), None) == "ABC"
        assert await w.activate((Upper, 7), None) == "n7"
        with pytest.raises(pachyderm.InvalidKey):
            await w.activate((Upper, 1.5), None)
        with pytest.raises(pachyderm.InvalidKey):
            await w.activate((Upper, ""), None)  # normalised keys obey the common rules too


async def test_bad_refs_and_types() -> None:
    class Stranger(pachyderm.Entity):
        def activate(self, message: Any, state: Any) -> Any:
            return state

    async with pachyderm.World(backends.Memory(), entities=ALL) as w:
        with pytest.raises(pachyderm.UnknownEntityType):
            await w.activate((Stranger, "a"), 1)
        with pytest.raises(pachyderm.UnknownEntityType):
            await w.activate((int, "a"), 1)  # type: ignore[arg-type]
        with pytest.raises(pachyderm.InvalidKey):
            await w.activate([Counter, "a"], 1)  # type: ignore[arg-type]
        with pytest.raises(pachyderm.InvalidKey):
            await w.activate((Counter, "a", "b"), 1)  # type: ignore[arg-type]
        # An unhashable "type" is a named error too, on every entry point.
        unhashable: Any = ([Counter], "a")
        with pytest.raises(pachyderm.UnknownEntityType):
            await w.activate(unhashable, 1)
        with pytest.raises(pachyderm.UnknownEntityType):
            await w.read(unhashable)
        with pytest.raises(pachyderm.UnknownEntityType):
            async for _ in w.follow(unhashable):
                pass


@pytest.mark.parametrize(
    "options",
    [
        {"timeout": "soon"},
        {"timeout": math.nan},
        {"timeout": math.inf},
        {"timeout": -1},
        {"timeout": 0},
        {"timeout": True},
        {"idempotency_key": 7},
        {"idempotency_key": ""},
        {"idempotency_key": "k" * 257},
        {"idempotency_key": "a\x00b"},
        {"idempotency_key": "\ud800"},  # a lone surrogate: no backend can store it as text
    ],
    ids=repr,
)
async def test_bad_call_options_are_refused_before_anything_is_queued(
    make_backend: MakeBackend, options: dict[str, Any]
) -> None:
    async with pachyderm.World(make_backend(), entities=[Counter]) as w:
        with pytest.raises(pachyderm.InvalidOptions):
            await w.activate((Counter, "c"), 1, **options)
        await asyncio.sleep(0.01)  # a call queued by mistake would run and commit meanwhile
        assert await w.read((Counter, "c")) == 0
        assert w.statistics()["activations"] == 0
        assert await w.activate((Counter, "c"), 1, idempotency_key="ok", timeout=5) == 1


def test_type_registration_is_checked() -> None:
    class NoActivate(pachyderm.Entity):
        pass

    class BadName(pachyderm.Entity):
        name = "has space"

        def activate(self, message: Any, state: Any) -> Any:
            return state

    class BadVersion(pachyderm.Entity):
        version = 0

        def activate(self, message: Any, state: Any) -> Any:
            return state

    class Twin(pachyderm.Entity):
        name = "tests.Counter"

        def activate(self, message: Any, state: Any) -> Any:
            return state

    for bad in (NoActivate, BadName, BadVersion):
        with pytest.raises(pachyderm.InvalidOptions):
            pachyderm.World(backends.Memory(), entities=[bad])
    with pytest.raises(pachyderm.InvalidOptions, match="share the name"):
        pachyderm.World(backends.Memory(), entities=[Counter, Twin])
    with pytest.raises(pachyderm.UnknownEntityType):
        pachyderm.World(backends.Memory(), entities=[int])  # type: ignore[list-item]
    with pytest.raises(pachyderm.InvalidOptions):
        pachyderm.World(None, entities=[Counter])  # type: ignore[arg-type]
    with pytest.raises(pachyderm.InvalidOptions):
        pachyderm.World(backends.Memory(), name="bad name")
    with pytest.raises(pachyderm.InvalidOptions):
        pachyderm.World(backends.Memory(), mailbox_size=0)
    with pytest.raises(pachyderm.InvalidOptions):
        pachyderm.World(backends.Memory(), no_such_option=1)
    with pytest.raises(pachyderm.InvalidOptions):
        pachyderm.World(backends.Memory(), entities=3)  # type: ignore[arg-type]
    with pytest.raises(pachyderm.InvalidOptions):
        pachyderm.World(backends.Memory(), entities="tests.Counter")  # type: ignore[arg-type]
    with pytest.raises(pachyderm.InvalidOptions):
        pachyderm.World(backends.Memory(), options=3)  # type: ignore[arg-type]
    with pytest.raises(pachyderm.InvalidOptions):
        pachyderm.World(backends.Memory(), clock=3)  # type: ignore[arg-type]


async def test_handler_failure_leaves_state_and_next_message_runs(
    make_backend: MakeBackend,
) -> None:
    async with world(make_backend) as w:
        c = (Counter, "f")
        assert await w.activate(c, 1) == 1
        with pytest.raises(pachyderm.ActivationFailed) as info:
            await w.activate(c, "boom")
        assert isinstance(info.value.__cause__, RuntimeError)
        with pytest.raises(pachyderm.Rejected):
            await w.activate(c, "no")
        assert await w.read(c) == 1
        assert await w.activate(c, 1) == 2


async def test_a_timeout_a_handler_raises_is_an_activation_failure(
    make_backend: MakeBackend,
) -> None:
    """Only the runtime says a deadline passed: a handler's own ``Timeout`` is its failure."""
    async with world(make_backend) as w:
        for ref in ((Counter, "t"), (Sleepy, "t")):
            assert await w.activate(ref, 1) == 1
            with pytest.raises(pachyderm.ActivationFailed) as info:
                await w.activate(ref, "own-timeout")
            assert isinstance(info.value.__cause__, pachyderm.Timeout)
            assert await w.read(ref) == 1


async def test_mutate_then_raise_does_not_leak(make_backend: MakeBackend) -> None:
    async with world(make_backend) as w:
        ref = (Log, "l")
        assert await w.activate(ref, "a") == ["a"]
        with pytest.raises(pachyderm.ActivationFailed):
            await w.activate(ref, "mutate-then-raise")
        assert await w.activate(ref, "b") == ["a", "b"]
        # Concurrent calls coalesce on the uncommitted tip: a failing one in the middle too.
        results = await asyncio.gather(
            w.activate(ref, "c"),
            w.activate(ref, "mutate-then-raise"),
            w.activate(ref, "d"),
            return_exceptions=True,
        )
        assert results[0] == ["a", "b", "c"]
        assert isinstance(results[1], pachyderm.ActivationFailed)
        assert results[2] == ["a", "b", "c", "d"]
        assert await w.read(ref) == ["a", "b", "c", "d"]


async def test_unencodable_and_oversized_states(make_backend: MakeBackend) -> None:
    async with world(make_backend) as w:
        ref = (Log, "s")
        with pytest.raises(pachyderm.SerializationError):
            await w.activate(ref, "set")
        with pytest.raises(pachyderm.TooLarge):
            await w.activate(ref, "huge")
        with pytest.raises(pachyderm.SerializationError):
            await w.activate((Typed, "t"), "wrong")
        with pytest.raises(pachyderm.SerializationError):  # an int beyond 64 bits
            await w.activate((Counter, "big"), 2**70)
        assert await w.activate((Counter, "big"), 1) == 1
        assert await w.read(ref) == []
        assert await w.activate(ref, "ok") == ["ok"]


async def test_codec_keeps_tuples_dataclasses_structs_and_pickle(
    make_backend: MakeBackend,
) -> None:
    value = {
        "t": (1, (2, [3, (4,)])),
        "l": [1, 2],
        (1, 2): "tuple key",
        "n": None,
        "naive": datetime.datetime(2026, 12, 1, 9, 30),
        "offset": datetime.datetime(
            2026, 12, 1, 9, 30, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
        ),
    }
    pickles = not make_backend().networked  # no pickle over the network: refused there
    async with world(make_backend) as w:
        assert await w.activate((Log, "c"), value) == [value]
        assert await w.activate((Typed, "p"), None) == Point(1, (0, 1))
        assert await w.activate((Structs, "s"), None) == [Item(0)]
        if pickles:
            assert await w.activate((Pickled, "k"), 3) == {3}
    async with world(make_backend) as w:
        got = await w.read((Log, "c"))
        assert got == [value]
        assert isinstance(got[0]["t"], tuple)
        assert got[0]["naive"].tzinfo is None
        assert got[0]["offset"].utcoffset() == datetime.timedelta(hours=2)
        assert isinstance(got[0]["t"][1][1], list)
        assert await w.read((Typed, "p")) == Point(1, (0, 1))
        assert await w.activate((Structs, "s"), None) == [Item(0), Item(1)]
        if pickles:
            assert await w.activate((Pickled, "k"), 4) == {3, 4}


async def test_full_mailbox_is_overloaded() -> None:
    async with pachyderm.World(backends.Memory(), entities=ALL, mailbox_size=3) as w:
        calls = [asyncio.ensure_future(w.activate((Counter, "m"), 1)) for _ in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(pachyderm.Overloaded):
            await w.activate((Counter, "m"), 1)
        assert sorted(await asyncio.gather(*calls)) == [1, 2, 3]
        assert await w.activate((Counter, "m"), 1) == 4  # room again


async def test_async_handler_timeout_keeps_entity_usable() -> None:
    async with pachyderm.World(backends.Memory(), entities=ALL, activation_timeout=0.05) as w:
        ref = (Sleepy, "z")
        assert await w.activate(ref, "go") == 1
        with pytest.raises(pachyderm.Timeout):
            await w.activate(ref, "hang")
        assert await w.activate(ref, "go") == 2
        with pytest.raises(pachyderm.Timeout):
            await w.activate(ref, "hang", timeout=0.01)
        assert await w.read(ref) == 2


async def test_call_timeout_withdraws_a_queued_message() -> None:
    async with pachyderm.World(backends.Memory(), entities=ALL) as w:
        ref = (Sleepy, "q")
        first = asyncio.ensure_future(w.activate(ref, "hang", timeout=0.2))
        await asyncio.sleep(0.01)
        with pytest.raises(pachyderm.Timeout):
            await w.activate(ref, "go", timeout=0.01)  # still queued behind the hang
        with pytest.raises(pachyderm.Timeout):
            await first
        assert await w.activate(ref, "go") == 1  # the withdrawn "go" never ran


async def test_cancelled_queued_call_never_runs() -> None:
    async with pachyderm.World(backends.Memory(), entities=ALL) as w:
        ref = (Sleepy, "c")
        first = asyncio.ensure_future(w.activate(ref, "hang", timeout=0.1))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(w.activate(ref, "go"))
        await asyncio.sleep(0.01)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        with pytest.raises(pachyderm.Timeout):
            await first
        assert await w.activate(ref, "go") == 1


async def test_idempotency_key_returns_the_first_result(make_backend: MakeBackend) -> None:
    async with world(make_backend) as w:
        ref = (Counter, "i")
        assert await w.activate(ref, 1, idempotency_key="pay-1") == 1
        assert await w.activate(ref, 1, idempotency_key="pay-1") == 1
        same = await asyncio.gather(
            *[w.activate(ref, 1, idempotency_key="pay-2") for _ in range(5)]
        )
        assert same == [2] * 5
        assert await w.read(ref) == 2
        with pytest.raises(pachyderm.InvalidOptions):
            await w.activate(ref, 1, idempotency_key="")
    async with world(make_backend) as w:  # the receipt is durable with the state
        assert await w.activate(ref, 1, idempotency_key="pay-1") == 1
        assert await w.activate(ref, 1) == 3


async def test_a_retry_after_receipt_ttl_runs_again(make_backend: MakeBackend) -> None:
    """A receipt is forgotten once older than ``receipt_ttl``, pruned or not."""

    class Wall(pachyderm.SystemClock):
        now = 5_000.0

        def wall(self) -> float:
            return self.now

    clock = Wall()
    async with world(make_backend, clock=clock, receipt_ttl=60.0) as w:
        ref = (Counter, "ttl")
        assert await w.activate(ref, 1, idempotency_key="k") == 1
        clock.now += 59.0  # within the window: the first result, not run again
        assert await w.activate(ref, 1, idempotency_key="k") == 1
        clock.now += 2.0  # 61 s after the commit: forgotten (the prune has not run)
        assert await w.activate(ref, 1, idempotency_key="k") == 2
        assert await w.activate(ref, 1, idempotency_key="k") == 2  # its new receipt
        assert await w.read(ref) == 2


async def test_world_refuses_calls_when_closed(make_backend: MakeBackend) -> None:
    w = world(make_backend)
    with pytest.raises(pachyderm.Unavailable):
        await w.activate((Counter, "a"), 1)
    async with w:
        pass
    with pytest.raises(pachyderm.Unavailable):
        await w.activate((Counter, "a"), 1)


async def test_versions_upgrade_and_newer_refused(make_backend: MakeBackend) -> None:
    class V1(pachyderm.Entity):
        name = "tests.Versioned"

        def init(self) -> dict[str, int]:
            return {"count": 0}

        def activate(self, message: Any, state: dict[str, int]) -> dict[str, int]:
            return {"count": state["count"] + 1}

    class V2(pachyderm.Entity):
        name = "tests.Versioned"
        version = 2

        def init(self) -> dict[str, int]:
            return {"total": 0, "from": 2}

        def upgrade(self, state: Any, from_version: int) -> dict[str, int]:
            assert from_version == 1
            return {"total": state["count"], "from": 1}

        def activate(self, message: Any, state: dict[str, int]) -> dict[str, int]:
            return {**state, "total": state["total"] + 1}

    async with pachyderm.World(make_backend(), entities=[V1]) as w:
        assert await w.activate((V1, "a"), None) == {"count": 1}
    async with pachyderm.World(make_backend(), entities=[V2]) as w:
        assert await w.read((V2, "a")) == {"total": 1, "from": 1}
        assert await w.activate((V2, "a"), None) == {"total": 2, "from": 1}
    async with pachyderm.World(make_backend(), entities=[V1]) as w:
        with pytest.raises(pachyderm.IncompatibleVersion):
            await w.activate((V1, "a"), None)
        with pytest.raises(pachyderm.IncompatibleVersion):
            await w.read((V1, "a"))
    async with pachyderm.World(make_backend(), entities=[V2]) as w:  # nothing was written
        assert await w.read((V2, "a")) == {"total": 2, "from": 1}


async def test_worlds_are_namespaced(make_backend: MakeBackend) -> None:
    async with world(make_backend, name="one") as w:
        await w.activate((Counter, "a"), 1)
    async with world(make_backend, name="two") as w:
        assert await w.read((Counter, "a")) == 0
        assert [k async for k in w.list(Counter)] == []


async def test_list_pages_and_prefix(make_backend: MakeBackend) -> None:
    async with world(make_backend) as w:
        keys = [f"user-{i:03d}" for i in range(25)] + ["admin", "zed"]
        await asyncio.gather(*[w.activate((Counter, k), 1) for k in keys])
        assert [k async for k in w.list(Counter, page_size=4)] == sorted(keys)
        assert [k async for k in w.list(Counter, prefix="user-01")] == [
            f"user-01{i}" for i in range(10)
        ]
        assert [k async for k in w.list(Log)] == []


async def test_memory_rows_are_nothing_the_garbage_collector_tracks() -> None:
    """A commit to Memory makes no tracked object: its rows cost no collection, at any size."""
    import gc

    backend = backends.Memory()
    async with pachyderm.World(backend, entities=ALL) as w:
        await asyncio.gather(*[w.activate((Counter, f"k{i}"), 1) for i in range(100)])
        space = backend._space
        assert space is not None
        table = space.rows["tests.Counter"]
        gc.collect()  # whatever was young is old now; a full collection untracks what it can
        for _ in range(3):
            await asyncio.gather(*[w.activate((Counter, f"k{i}"), 1) for i in range(100)])
            assert not gc.is_tracked(table)
            assert not any(gc.is_tracked(row) for row in table.values())
        assert [table[f"k{i}"].version for i in range(100)] == [4] * 100
        assert await w.read((Counter, "k7")) == 4


async def test_the_rows_a_commit_gives_its_backend_are_nothing_the_collector_tracks() -> None:
    """The writes and outbox rows a backend gets are Structs the garbage collector does not track
    (`gc=False`): none of them counts toward its next young collection."""
    import gc

    from .test_messages import Ping

    seen: list[backends.Write] = []
    outboxes: list[backends.Outbox] = []

    class Seen(backends.Memory):
        async def commit(self, writes: Sequence[backends.Write]) -> list[bool]:
            seen.extend(writes)
            outboxes.extend(write.outbox for write in writes if write.outbox is not None)
            return await super().commit(writes)

    async with pachyderm.World(Seen(), entities=[*ALL, Ping]) as w:
        await asyncio.gather(*[w.activate((Counter, f"k{i}"), 1) for i in range(10)])
        await w.activate((Ping, "a"), ("b", 0, 3))
        async with asyncio.timeout(10):
            while w.statistics()["delivered"] < 3:
                await asyncio.sleep(0.01)
    assert len(seen) > 10
    assert outboxes
    rows: list[object] = [*seen, *outboxes]
    for outbox in outboxes:
        rows += [*outbox.sends, *outbox.consumes]
    assert any(isinstance(row, backends.Envelope) for row in rows)
    assert any(isinstance(row, backends.Consume) for row in rows)
    assert not any(gc.is_tracked(row) for row in rows)


async def test_a_clock_of_ones_own_is_a_pachyderm_clock() -> None:
    """``pachyderm.Clock`` types ``World(clock=...)``; ``SystemClock`` is there to build on."""

    class Shifted(pachyderm.SystemClock):
        def wall(self) -> float:
            return 1_000.0

    clock: pachyderm.Clock = Shifted()
    backend = backends.Memory()
    async with pachyderm.World(backend, entities=ALL, clock=clock) as w:
        assert await w.activate((Counter, "a"), 1, idempotency_key="once") == 1
        receipt = await backend.receipt("tests.Counter", "a", "once")
    assert receipt is not None
    assert receipt.at == 1_000.0  # stamped by this clock's wall time


def test_a_clock_without_every_method_of_pachyderm_clock_is_refused() -> None:
    class NoTimers:
        def monotonic(self) -> float:
            return 0.0

        def wall(self) -> float:
            return 0.0

        async def sleep(self, seconds: float) -> None:
            pass

    with pytest.raises(pachyderm.InvalidOptions, match="call_later"):
        pachyderm.World(backends.Memory(), clock=NoTimers())  # type: ignore[arg-type]
