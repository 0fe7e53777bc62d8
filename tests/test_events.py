"""Event-sourced entities: handle and apply, atomic appends, snapshots, streams, evolution."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, ClassVar

import msgspec
import pytest

import pachyderm
from pachyderm import EntityBroken, EventSourced, Rejected, Update, backends, send

MakeBackend = Callable[[], backends.Backend]


class Account(EventSourced):
    """A bank account: ("open",), ("deposit", n), ("withdraw", n), ("noop",), ("many", k)."""

    name = "tests.Account"
    snapshot_every = 3
    applied: ClassVar[int] = 0  # apply() calls, to see how much a load folds

    def init(self) -> dict[str, Any]:
        return {"balance": 0, "open": False}

    def handle(self, command: Any, state: dict[str, Any]) -> Any:
        kind, *args = command
        if kind == "open":
            if state["open"]:
                raise Rejected("already open")
            return [("opened",)]
        if kind == "deposit":
            return [("deposited", args[0])]
        if kind == "withdraw":
            if state["balance"] < args[0]:
                raise Rejected("insufficient funds")
            return [("withdrawn", args[0])]
        if kind == "many":
            return [("deposited", 1)] * args[0]
        if kind == "noop":
            return []
        if kind == "tell":  # an event and a message to a ledger
            return Update([("deposited", 0)], send((Ledger, args[0]), args[1]))
        if kind == "bare-effect":
            return Update([], send((Ledger, "x"), "lost?"))
        if kind == "boom":
            raise ValueError("boom")
        if kind == "poison":
            return [("poison",)]
        return "not a list"

    def apply(self, event: Any, state: dict[str, Any]) -> dict[str, Any]:
        Account.applied += 1
        kind = event[0]
        if kind == "opened":
            return {**state, "open": True}
        if kind == "deposited":
            return {**state, "balance": state["balance"] + event[1]}
        if kind == "withdrawn":
            return {**state, "balance": state["balance"] - event[1]}
        raise ValueError(f"cannot apply {event!r}")


class Ledger(EventSourced):
    """Records each message it is sent as an event; ("skip", x) appends nothing."""

    name = "tests.Ledger"

    def init(self) -> list[Any]:
        return []

    def handle(self, command: Any, state: list[Any]) -> list[Any]:
        if isinstance(command, list) and command and command[0] == "skip":
            return []
        return [command]

    def apply(self, event: Any, state: list[Any]) -> list[Any]:
        return [*state, event]


ALL = [Account, Ledger]
ALICE = (Account, "alice")


async def events_of(world: pachyderm.World, ref: Any, since: int = 0) -> list[tuple[int, Any]]:
    """Every event stored now (reads until the log is exhausted, then stops)."""
    out: list[tuple[int, Any]] = []
    stream = world.events(ref, since=since)
    async with stream:
        stored = await world.backend.read_events(
            world._registry.resolve(ref)[0].name, ref[1], after=since, limit=10**9
        )
        for _ in stored:
            out.append(await stream.__anext__())
    return out


async def test_handle_decides_and_apply_folds(make_backend: MakeBackend) -> None:
    async with pachyderm.World(make_backend(), entities=ALL) as w:
        assert await w.read(ALICE) == {"balance": 0, "open": False}
        assert await w.activate(ALICE, ("open",)) == {"balance": 0, "open": True}
        assert await w.activate(ALICE, ("deposit", 10)) == {"balance": 10, "open": True}
        assert await w.activate(ALICE, ("many", 3)) == {"balance": 13, "open": True}
        assert await w.read(ALICE) == {"balance": 13, "open": True}
        assert await events_of(w, ALICE) == [
            (1, ("opened",)),
            (2, ("deposited", 10)),
            (3, ("deposited", 1)),
            (4, ("deposited", 1)),
            (5, ("deposited", 1)),
        ]
        # The version of an event-sourced entity is the seq of its last event.
        async for version, state in w.follow(ALICE, versions=True):
            assert (version, state) == (5, {"balance": 13, "open": True})
            break
        assert w.statistics()["event_readers"] == 0


async def test_refused_and_failed_commands_append_nothing(make_backend: MakeBackend) -> None:
    async with pachyderm.World(make_backend(), entities=ALL) as w:
        await w.activate(ALICE, ("open",))
        with pytest.raises(Rejected, match="insufficient"):
            await w.activate(ALICE, ("withdraw", 5))
        with pytest.raises(Rejected, match="already open"):
            await w.activate(ALICE, ("open",))
        with pytest.raises(pachyderm.ActivationFailed) as failed:
            await w.activate(ALICE, ("boom",))
        assert isinstance(failed.value.__cause__, ValueError)
        with pytest.raises(pachyderm.ActivationFailed, match="list of events"):
            await w.activate(ALICE, ("what",))
        with pytest.raises(pachyderm.ActivationFailed, match="effects without events"):
            await w.activate(ALICE, ("bare-effect",))
        with pytest.raises(pachyderm.TooLarge, match="events"):
            await w.activate(ALICE, ("many", 1001))
        # No events: the state is returned unchanged, and nothing is appended.
        assert await w.activate(ALICE, ("noop",)) == {"balance": 0, "open": True}
        assert await events_of(w, ALICE) == [(1, ("opened",))]
        assert await w.activate(ALICE, ("deposit", 1)) == {"balance": 1, "open": True}
        assert w.statistics()["outbox"] == {"messages": 0, "timers": 0, "dead": 0}


async def test_apply_that_raises_breaks_the_entity_and_overwrites_nothing(
    make_backend: MakeBackend,
) -> None:
    async with pachyderm.World(make_backend(), entities=ALL) as w:
        await w.activate(ALICE, ("deposit", 5))
        with pytest.raises(EntityBroken, match="apply raised ValueError at event 2") as broken:
            await w.activate(ALICE, ("poison",))
        assert isinstance(broken.value.__cause__, ValueError)
        for _ in range(2):  # every later call gets the same clear error
            with pytest.raises(EntityBroken):
                await w.activate(ALICE, ("deposit", 1))
        assert await events_of(w, ALICE) == [(1, ("deposited", 5))]
    async with pachyderm.World(make_backend(), entities=ALL) as w:  # loaded again: it works
        assert await w.activate(ALICE, ("deposit", 1)) == {"balance": 6, "open": False}


class Strict(Account):
    """The same account, whose apply no longer accepts deposits (a bad deploy)."""

    name = "tests.Account"

    def apply(self, event: Any, state: dict[str, Any]) -> dict[str, Any]:
        if event[0] == "deposited":
            raise KeyError("deposited")
        return super().apply(event, state)


async def test_a_log_that_apply_cannot_fold_is_broken_on_load(make_backend: MakeBackend) -> None:
    async with pachyderm.World(make_backend(), entities=ALL) as w:
        await w.activate(ALICE, ("deposit", 5))
    backend = make_backend()
    async with pachyderm.World(backend, entities=[Strict, Ledger]) as w:
        with pytest.raises(EntityBroken, match="at event 1"):
            await w.read((Strict, "alice"))
        with pytest.raises(EntityBroken):
            await w.activate((Strict, "alice"), ("open",))
        (row,) = await backend.load_many([("tests.Account", "alice")])
        assert row is not None
        assert row.version == 1
    async with pachyderm.World(make_backend(), entities=ALL) as w:
        assert await w.read(ALICE) == {"balance": 5, "open": False}


async def test_snapshots_every_n_events_and_loads_fold_only_the_rest(
    make_backend: MakeBackend,
) -> None:
    async with pachyderm.World(make_backend(), entities=ALL) as w:
        for _ in range(7):
            await w.activate(ALICE, ("deposit", 1))
    backend = make_backend()
    async with pachyderm.World(backend, entities=ALL) as w:
        (row,) = await backend.load_many([("tests.Account", "alice")])
        assert row is not None
        assert (row.version, row.snapshot) == (7, 6)
        Account.applied = 0
        assert await w.read(ALICE) == {"balance": 7, "open": False}
        assert Account.applied == 1  # event 7 only: the snapshot holds the first six
        # A command that crosses two multiples of 3 at once stores one snapshot, at its end.
        await w.activate(ALICE, ("many", 5))
        (row,) = await backend.load_many([("tests.Account", "alice")])
        assert row is not None
        assert (row.version, row.snapshot) == (12, 12)


class NoSnapshots(Ledger):
    name = "tests.Ledger"
    snapshot_every = None


async def test_without_snapshots_the_state_is_folded_from_the_first_event(
    make_backend: MakeBackend,
) -> None:
    backend = make_backend()
    async with pachyderm.World(backend, entities=[NoSnapshots]) as w:
        for i in range(5):
            await w.activate((NoSnapshots, "l"), i)
        (row,) = await backend.load_many([("tests.Ledger", "l")])
        assert row is not None
        assert (row.version, row.snapshot, row.data) == (5, 0, b"")
    async with pachyderm.World(make_backend(), entities=[NoSnapshots]) as w:
        assert await w.read((NoSnapshots, "l")) == [0, 1, 2, 3, 4]


async def test_an_uninitialised_entity_accepts_a_creation_event(make_backend: MakeBackend) -> None:
    async with pachyderm.World(make_backend(), entities=ALL) as w:
        assert await w.append(ALICE, ("opened",), ("deposited", 3)) == {"balance": 3, "open": True}
        with pytest.raises(Rejected, match="has 2 events; the append expected 0"):
            await w.append(ALICE, ("opened",))
        assert await w.append(ALICE, ("deposited", 1), expected=2) == {"balance": 4, "open": True}
        assert [seq for seq, _ in await events_of(w, ALICE)] == [1, 2, 3]
        with pytest.raises(pachyderm.InvalidOptions):
            await w.append(ALICE)
        with pytest.raises(pachyderm.InvalidOptions):
            await w.append(ALICE, ("opened",), expected=-1)
        with pytest.raises(EntityBroken):
            await w.append((Account, "bob"), ("nonsense",))


async def test_events_resume_from_any_seq_and_then_go_live(make_backend: MakeBackend) -> None:
    async with pachyderm.World(make_backend(), entities=ALL) as w:
        for i in range(5):
            await w.activate((Ledger, "l"), i)
        seen: list[tuple[int, Any]] = []

        async def read() -> None:
            async for item in w.events((Ledger, "l"), since=3):
                seen.append(item)
                if item[0] == 8:
                    return

        reader = asyncio.create_task(read())
        await asyncio.sleep(0.01)
        assert seen == [(4, 3), (5, 4)]
        await asyncio.gather(*(w.activate((Ledger, "l"), i) for i in (5, 6, 7)))
        await asyncio.wait_for(reader, 10)
        assert seen == [(4, 3), (5, 4), (6, 5), (7, 6), (8, 7)]


async def test_a_slow_reader_reads_the_log_and_never_loses_an_event(
    make_backend: MakeBackend,
) -> None:
    async with pachyderm.World(make_backend(), entities=ALL, follower_buffer=1) as w:
        stream = w.events((Ledger, "l"))
        await w.activate((Ledger, "l"), 0)
        assert await stream.__anext__() == (1, 0)  # registered: now live
        # 16 events fit the reader's buffer (follower_buffer * 16); 200 do not.
        for i in range(1, 200):
            await w.activate((Ledger, "l"), i)
        got = [await stream.__anext__() for _ in range(199)]
        assert got == [(i + 1, i) for i in range(1, 200)]
        assert stream.position == 200
        await stream.aclose()


async def test_the_event_stream_ends_when_the_world_closes(make_backend: MakeBackend) -> None:
    async with pachyderm.World(make_backend(), entities=ALL) as w:
        await w.activate((Ledger, "l"), 0)
        items: list[Any] = []

        async def read() -> None:
            async for item in w.events((Ledger, "l")):
                items.append(item)

        reader = asyncio.create_task(read())
        await asyncio.sleep(0.01)
    await asyncio.wait_for(reader, 10)
    assert items == [(1, 0)]


async def test_concurrent_commands_append_contiguous_seqs(make_backend: MakeBackend) -> None:
    async with pachyderm.World(make_backend(), entities=ALL) as w:
        await asyncio.gather(*(w.activate((Ledger, "l"), i) for i in range(300)))
        events = await events_of(w, (Ledger, "l"))
        assert [seq for seq, _ in events] == list(range(1, 301))
        assert sorted(e for _, e in events) == list(range(300))
        assert await w.read((Ledger, "l")) == [e for _, e in events]


async def test_messages_to_and_from_event_sourced_entities(make_backend: MakeBackend) -> None:
    async with pachyderm.World(make_backend(), entities=ALL) as w:
        await w.activate(ALICE, ("tell", "book", "hello"))
        await w.activate(ALICE, ("tell", "book", ["skip", 1]))  # applied, appends nothing
        await w.activate(ALICE, ("tell", "book", "again"))
        for _ in range(200):
            if await w.read((Ledger, "book")) == ["hello", "again"]:
                break
            await asyncio.sleep(0.01)
        assert await w.read((Ledger, "book")) == ["hello", "again"]
        for _ in range(200):
            if w.statistics()["outbox"] == {"messages": 0, "timers": 0, "dead": 0}:
                break
            await asyncio.sleep(0.01)
        stats = w.statistics()
        assert stats["outbox"] == {"messages": 0, "timers": 0, "dead": 0}
        assert stats["failures"] == 0
        assert stats["dead_letters"] == 0


async def test_idempotent_commands(make_backend: MakeBackend) -> None:
    async with pachyderm.World(make_backend(), entities=ALL) as w:
        first = await w.activate(ALICE, ("deposit", 7), idempotency_key="d1")
        again = await w.activate(ALICE, ("deposit", 7), idempotency_key="d1")
        assert first == again == {"balance": 7, "open": False}
        assert [seq for seq, _ in await events_of(w, ALICE)] == [1]


class Money(msgspec.Struct, frozen=True):
    cents: int


class Typed(EventSourced):
    """Typed events: a bad one is refused before anything is appended."""

    name = "tests.Typed"
    event_type = Money
    state_type = int

    def init(self) -> int:
        return 0

    def handle(self, command: Any, state: int) -> list[Any]:
        return [Money(command) if isinstance(command, int) else command]

    def apply(self, event: Money, state: int) -> int:
        return state + event.cents


async def test_events_are_validated_against_event_type(make_backend: MakeBackend) -> None:
    async with pachyderm.World(make_backend(), entities=[Typed]) as w:
        assert await w.activate((Typed, "t"), 5) == 5
        with pytest.raises(pachyderm.SerializationError):
            await w.activate((Typed, "t"), "five")
        assert await events_of(w, (Typed, "t")) == [(1, Money(5))]


class AccountV2(Account):
    """Version 2 stores deposits as ("deposited", {"cents": n}); it upgrades version 1 events."""

    name = "tests.Account"
    version = 2

    def handle(self, command: Any, state: dict[str, Any]) -> Any:
        if command[0] == "deposit":
            return [("deposited", {"cents": command[1]})]
        return super().handle(command, state)

    def apply(self, event: Any, state: dict[str, Any]) -> dict[str, Any]:
        if event[0] == "deposited":
            return {**state, "balance": state["balance"] + event[1]["cents"]}
        return super().apply(event, state)

    def upgrade_event(self, event: Any, from_version: int) -> Any:
        assert from_version == 1
        if event[0] == "deposited":
            return ("deposited", {"cents": event[1]})
        return tuple(event)


async def test_old_events_are_upgraded_when_read(make_backend: MakeBackend) -> None:
    async with pachyderm.World(make_backend(), entities=ALL) as w:
        for n in (1, 2, 3, 4):  # a snapshot at 3, by version 1
            await w.activate(ALICE, ("deposit", n))
    async with pachyderm.World(make_backend(), entities=[AccountV2, Ledger]) as w:
        v2 = (AccountV2, "alice")
        assert await w.read(v2) == {"balance": 10, "open": False}
        assert await w.activate(v2, ("deposit", 5)) == {"balance": 15, "open": False}
        assert await events_of(w, v2) == [
            (1, ("deposited", {"cents": 1})),
            (2, ("deposited", {"cents": 2})),
            (3, ("deposited", {"cents": 3})),
            (4, ("deposited", {"cents": 4})),
            (5, ("deposited", {"cents": 5})),
        ]
    # Version 1 code cannot read what version 2 wrote: a clear error, nothing touched.
    async with pachyderm.World(make_backend(), entities=ALL) as w:
        with pytest.raises(pachyderm.IncompatibleVersion):
            await w.read(ALICE)
        with pytest.raises(pachyderm.IncompatibleVersion):
            await events_of(w, ALICE, since=4)


async def test_state_entities_have_no_event_api(make_backend: MakeBackend) -> None:
    class Plain(pachyderm.Entity):
        def activate(self, message: Any, state: Any) -> Any:
            return message

    async with pachyderm.World(make_backend(), entities=[Plain, *ALL]) as w:
        with pytest.raises(pachyderm.InvalidOptions, match="not event-sourced"):
            w.events((Plain, "p"))
        with pytest.raises(pachyderm.InvalidOptions, match="not event-sourced"):
            await w.append((Plain, "p"), 1)
        with pytest.raises(pachyderm.InvalidOptions, match="since"):
            w.events(ALICE, since=-1)
        with pytest.raises(pachyderm.InvalidKey):
            w.events((Account, ""))


def test_event_sourced_types_are_checked_at_registration() -> None:
    class NoApply(EventSourced):
        def handle(self, command: Any, state: Any) -> list[Any]:
            return []

    class AsyncHandle(EventSourced):
        async def handle(self, command: Any, state: Any) -> list[Any]:
            return []

        def apply(self, event: Any, state: Any) -> Any:
            return state

    class BadSnapshots(Ledger):
        name = "tests.Bad"
        snapshot_every = 0

    for cls, match in (
        (NoApply, "apply"),
        (AsyncHandle, "plain def"),
        (BadSnapshots, "snapshot_every"),
    ):
        with pytest.raises(pachyderm.InvalidOptions, match=match):
            pachyderm.World(backends.Memory(), entities=[cls])
    with pytest.raises(pachyderm.UnknownEntityType):
        pachyderm.World(backends.Memory(), entities=[EventSourced])


async def test_a_type_that_changed_kind_is_refused_with_a_clear_error(
    make_backend: MakeBackend,
) -> None:
    class Plain(pachyderm.Entity):
        name = "tests.Ledger"  # the stored name of an event-sourced type

        def activate(self, message: Any, state: Any) -> Any:
            return message

    async with pachyderm.World(make_backend(), entities=[Ledger]) as w:
        await w.activate((Ledger, "l"), "x")
    async with pachyderm.World(make_backend(), entities=[Plain]) as w:
        with pytest.raises(pachyderm.IncompatibleVersion, match="event-sourced"):
            await w.activate((Plain, "l"), "y")
        await w.activate((Plain, "p"), "state")
    async with pachyderm.World(make_backend(), entities=[Ledger]) as w:
        with pytest.raises(pachyderm.IncompatibleVersion, match="state entity"):
            await w.read((Ledger, "p"))  # stored by the state type of the same name
    async with pachyderm.World(make_backend(), entities=[Ledger]) as w:
        assert await w.read((Ledger, "l")) == ["x"]  # nothing was overwritten
