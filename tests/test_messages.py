"""Messages between entities: the outbox, exactly-once application, order, caps and fairness."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

import pachyderm
from pachyderm import Update, after, backends, send
from pachyderm._dispatch import Dispatcher

from ._vclock import VirtualClock

MakeBackend = Callable[[], backends.Backend]


class Ledger(pachyderm.Entity):
    """Records every message it receives, in order."""

    def init(self) -> list[Any]:
        return []

    def activate(self, message: Any, state: list[Any]) -> Any:
        if message == "boom":
            raise ValueError("boom")
        return [*state, message]


class Sender(pachyderm.Entity):
    """("to", key, [messages]) sends each message to Ledger(key); counts its activations."""

    def init(self) -> int:
        return 0

    def activate(self, message: Any, state: int) -> Any:
        _, key, messages = message
        return Update(state + 1, *(send((Ledger, key), m) for m in messages))


class Ping(pachyderm.Entity):
    """Plays ping-pong with Ping(partner) until the ball has been hit `limit` times."""

    def init(self) -> int:
        return 0

    def activate(self, message: Any, state: int) -> Any:
        partner, hits, limit = message
        if hits >= limit:
            return state + 1
        return Update(state + 1, send((Ping, partner), (self.key, hits + 1, limit)))


class SelfLoop(pachyderm.Entity):
    """Counts down by messaging itself: the state each message sees is the committed one."""

    def init(self) -> list[int]:
        return []

    def activate(self, message: int, state: list[int]) -> Any:
        if message == 0:
            return [*state, 0]
        return Update([*state, message], send((SelfLoop, self.key), message - 1))


class Bad(pachyderm.Entity):
    def activate(self, message: Any, state: Any) -> Any:
        return Update("changed", message)


ALL = [Ledger, Sender, Ping, SelfLoop, Bad]


async def until(predicate: Callable[[], Any], seconds: float = 10.0) -> None:
    """Wait (real time) until ``predicate()`` is true."""
    async with asyncio.timeout(seconds):
        while not predicate():  # polling: a condition with no event
            await asyncio.sleep(0.002)


async def quiet(world: pachyderm.World) -> None:
    """Wait until no message is in flight and the outbox holds nothing to deliver."""

    def done() -> bool:
        stats = world.statistics()
        outbox: Any = stats["outbox"]
        return not world._engine.busy() and stats["held"] == 0 and outbox["messages"] == 0

    await until(done)


async def test_a_send_is_applied_once_after_the_commit(make_backend: MakeBackend) -> None:
    async with pachyderm.World(make_backend(), entities=ALL) as w:
        assert await w.activate((Sender, "s"), ("to", "l", ["a", "b"])) == 1
        await quiet(w)
        assert await w.read((Ledger, "l")) == ["a", "b"]
        stats = w.statistics()
        assert stats["delivered"] == 2
        assert stats["outbox"] == {"messages": 0, "timers": 0, "dead": 0}


async def test_order_is_kept_per_pair(make_backend: MakeBackend) -> None:
    async with pachyderm.World(make_backend(), entities=ALL) as w:
        # Many activations, many messages each, all in flight at once.
        await asyncio.gather(
            *(w.activate((Sender, "s"), ("to", "l", [(i, j) for j in range(5)])) for i in range(40))
        )
        await quiet(w)
        got = await w.read((Ledger, "l"))
        assert len(got) == 200
        assert got == sorted(got)  # sender versions are taken in call order, messages in order


async def test_self_sends_run_after_the_commit_and_never_deadlock(
    make_backend: MakeBackend,
) -> None:
    async with pachyderm.World(make_backend(), entities=ALL) as w:
        assert await w.activate((SelfLoop, "x"), 20) == [20]
        await quiet(w)
        assert await w.read((SelfLoop, "x")) == list(range(20, -1, -1))


async def test_ping_pong_counts_match(make_backend: MakeBackend) -> None:
    async with pachyderm.World(make_backend(), entities=ALL) as w:
        await asyncio.gather(*(w.activate((Ping, f"a{i}"), (f"b{i}", 0, 30)) for i in range(20)))
        await quiet(w)
        for i in range(20):
            assert await w.read((Ping, f"a{i}")) == 16
            assert await w.read((Ping, f"b{i}")) == 15


@pytest.mark.parametrize(
    ("effect", "error"),
    [
        (send((Ledger, ""), "x"), pachyderm.InvalidKey),
        (send((Ledger, 7), "x"), pachyderm.InvalidKey),
        (send((int, "k"), "x"), pachyderm.UnknownEntityType),
        (send(([Ledger], "k"), "x"), pachyderm.UnknownEntityType),  # unhashable
        (send([Ledger, "k"], "x"), pachyderm.InvalidKey),  # not a tuple
        (send((Ledger, "k", "j"), "x"), pachyderm.InvalidKey),
        (send((Ledger, "k\x00"), "x"), pachyderm.InvalidKey),
        (send((Ledger, "k" * 1025), "x"), pachyderm.InvalidKey),
        (send((Ledger, "k"), object()), pachyderm.SerializationError),
        (send((Ledger, "k"), "x" * 300_000), pachyderm.TooLarge),
        ("not an effect", pachyderm.ActivationFailed),
    ],
)
async def test_a_bad_effect_fails_the_activation_and_commits_nothing(
    make_backend: MakeBackend, effect: Any, error: type[Exception]
) -> None:
    async with pachyderm.World(make_backend(), entities=ALL) as w:
        with pytest.raises(error):
            await w.activate((Bad, "b"), effect)
        assert await w.read((Bad, "b")) is None
        assert w.statistics()["outbox"] == {"messages": 0, "timers": 0, "dead": 0}
        assert [k async for k in w.list(Bad)] == []


class Picklish(pachyderm.Entity):
    """Opts in to pickle for its state; sends whatever it gets to Ledger("k")."""

    pickle = True

    def activate(self, message: Any, state: Any) -> Any:
        return Update(state, send((Ledger, "k"), message))


async def test_messages_are_never_pickled_even_from_a_pickling_type(
    make_backend: MakeBackend,
) -> None:
    # Pickle is for an entity's own stored state only: messages (which later travel between
    # nodes) always go through the untyped MessagePack codec, so what it cannot encode is refused.
    backend = make_backend()
    if backend.networked:  # it refuses pickling types outright
        with pytest.raises(pachyderm.InvalidOptions, match="pickle"):
            pachyderm.World(backend, entities=[*ALL, Picklish])
        return
    async with pachyderm.World(backend, entities=[*ALL, Picklish]) as w:
        with pytest.raises(pachyderm.SerializationError):
            await w.activate((Picklish, "p"), {1, 2})  # a set: picklable, not MessagePack
        assert w.statistics()["outbox"] == {"messages": 0, "timers": 0, "dead": 0}


async def test_too_many_effects(make_backend: MakeBackend) -> None:
    async with pachyderm.World(make_backend(), entities=ALL, max_effects=3) as w:
        with pytest.raises(pachyderm.TooManyEffects):
            await w.activate((Sender, "s"), ("to", "l", [1, 2, 3, 4]))
        assert await w.read((Sender, "s")) == 0
        assert await w.activate((Sender, "s"), ("to", "l", [1, 2, 3])) == 1


async def test_a_failing_receiver_makes_a_dead_letter_and_goes_on(
    make_backend: MakeBackend,
) -> None:
    async with pachyderm.World(make_backend(), entities=ALL) as w:
        await w.activate((Sender, "s"), ("to", "l", ["a", "boom", "b"]))
        await quiet(w)
        assert await w.read((Ledger, "l")) == ["a", "b"]
        stats = w.statistics()
        assert stats["dead_letters"] == 1
        assert stats["outbox"] == {"messages": 0, "timers": 0, "dead": 1}


async def test_a_ping_pong_forever_does_not_starve_others(make_backend: MakeBackend) -> None:
    async with pachyderm.World(make_backend(), entities=ALL) as w:
        await w.activate((Ping, "a"), ("b", 0, 10**9))
        # While the pair plays, other entities are served promptly, and in full.
        for i in range(50):
            assert await w.activate((Ledger, "other"), i) == list(range(i + 1))
        assert await w.read((Ping, "a")) > 1
    # ...and the world closed although the pair never stops; the ball waits in the outbox.


async def test_messages_left_in_the_outbox_are_delivered_after_a_restart(
    make_backend: MakeBackend,
) -> None:
    backend = make_backend()
    async with pachyderm.World(backend, entities=ALL) as w:
        await w.activate((Ping, "a"), ("b", 0, 200))
        await until(lambda: w.statistics()["delivered"] >= 20)
    reopened = backend if isinstance(backend, backends.Memory) else make_backend()
    async with pachyderm.World(reopened, entities=ALL) as w:
        await quiet(w)
        a, b = await w.read((Ping, "a")), await w.read((Ping, "b"))
        assert (a, b) == (101, 100)  # every hit applied exactly once, across the restart


@pytest.mark.parametrize("late", [False, True], ids=["at-once", "after-the-commit"])
async def test_a_duplicate_delivery_is_applied_once(
    make_backend: MakeBackend, monkeypatch: pytest.MonkeyPatch, late: bool
) -> None:
    """At once: the receiver drops the copy. Late: the copy runs, and its commit loses."""
    original = Dispatcher.deliver

    def twice(self: Dispatcher, envelope: Any) -> None:
        original(self, envelope)
        if late:
            asyncio.get_running_loop().call_later(0.05, original, self, envelope)
        else:
            original(self, envelope)

    monkeypatch.setattr(Dispatcher, "deliver", twice)
    async with pachyderm.World(make_backend(), entities=ALL) as w:
        await w.activate((Sender, "s"), ("to", "l", ["a", "b", "c"]))
        await asyncio.sleep(0.1)
        await quiet(w)
        assert await w.read((Ledger, "l")) == ["a", "b", "c"]
        stats = w.statistics()
        assert stats["delivered"] == (6 if late else 3)
        if late:
            assert stats["conflicts"] >= 1  # the copies' writes lost: their rows were gone


async def test_a_full_mailbox_holds_messages_in_order(make_backend: MakeBackend) -> None:
    async with pachyderm.World(make_backend(), entities=ALL, mailbox_size=4) as w:
        await asyncio.gather(
            *(
                w.activate((Sender, f"s{i}"), ("to", "l", [(i, j) for j in range(10)]))
                for i in range(5)
            )
        )
        await quiet(w)
        got = await w.read((Ledger, "l"))
        assert len(got) == 50
        for i in range(5):
            assert [m for m in got if m[0] == i] == [(i, j) for j in range(10)]


class SlowLedger(pachyderm.Entity):
    """A ledger whose handler waits for ``gate`` (set by the test) before each message."""

    gate: asyncio.Event | None = None

    def init(self) -> list[Any]:
        return []

    async def activate(self, message: Any, state: list[Any]) -> Any:
        if SlowLedger.gate is not None:
            await SlowLedger.gate.wait()
        return [*state, message]


class SlowSender(pachyderm.Entity):
    """Sends each message of a list to SlowLedger("l"); ("ring", s): a timer for it, in s."""

    def init(self) -> int:
        return 0

    def activate(self, message: Any, state: int) -> Any:
        if message[0] == "ring":
            return Update(state + 1, after(message[1], "ring", to=(SlowLedger, "l")))
        return Update(state + 1, *(send((SlowLedger, "l"), m) for m in message))


async def test_held_messages_are_bounded_and_the_rest_is_read_back_in_order(
    make_backend: MakeBackend,
) -> None:
    """A receiver far behind its senders: at most ``10 * mailbox_size`` messages wait in memory,
    the others in storage only; once it catches up it gets every one, once, in order per pair."""
    SlowLedger.gate = asyncio.Event()
    backend = make_backend()
    types = [SlowLedger, SlowSender]
    try:
        async with pachyderm.World(backend, entities=types, mailbox_size=2) as w:
            for j in range(6):  # 6 rounds of 5 senders x 10 messages: 300 for one receiver
                await asyncio.gather(
                    *(
                        w.activate((SlowSender, f"s{i}"), [(i, j * 10 + k) for k in range(10)])
                        for i in range(5)
                    )
                )
            assert w.statistics()["held"] <= 20  # the cap: not 298
            assert ("tests.test_messages.SlowLedger", "l") in w._engine.dispatcher.spilled
            SlowLedger.gate.set()
            await quiet(w)
            got = await w.read((SlowLedger, "l"))
            assert len(got) == 300  # every one, once
            for i in range(5):
                assert [m for m in got if m[0] == i] == [(i, n) for n in range(60)]
            assert not w._engine.dispatcher.spilled
        # After a restart too: the stored backlog is read with the same cap. (The world that
        # sends closes with most of them undelivered: they wait in storage.)
        gate = SlowLedger.gate = asyncio.Event()
        reopened = backend if isinstance(backend, backends.Memory) else make_backend()
        async with pachyderm.World(reopened, entities=types, mailbox_size=2) as w:
            for i in range(5):
                await w.activate((SlowSender, f"s{i}"), [(i, 60 + k) for k in range(40)])
            gate.set()  # the few in its mailbox run as it closes
        SlowLedger.gate = asyncio.Event()
        reopened = reopened if isinstance(reopened, backends.Memory) else make_backend()
        async with pachyderm.World(reopened, entities=types, mailbox_size=2) as w:
            await until(lambda: w._engine.dispatcher.recovered)
            assert w.statistics()["held"] <= 20
            assert w.statistics()["outbox"]["messages"] > 100  # most were left to this world
            SlowLedger.gate.set()
            await quiet(w)
            got = await w.read((SlowLedger, "l"))
            for i in range(5):
                assert [m for m in got if m[0] == i] == [(i, n) for n in range(100)]
    finally:
        SlowLedger.gate = None


async def test_a_refill_reads_about_what_it_delivers_not_the_whole_backlog() -> None:
    """Each refill stops reading once its receivers are full again: draining a backlog of n
    messages reads a few rows per message, not n / cap scans of the whole backlog."""

    class Counting(backends.Memory):
        rows = 0

        async def due(self, until: float, **kw: Any) -> list[backends.Envelope]:
            page = await super().due(until, **kw)
            Counting.rows += len(page)
            return page

    SlowLedger.gate = asyncio.Event()
    try:
        async with pachyderm.World(
            Counting(), entities=[SlowLedger, SlowSender], mailbox_size=1
        ) as w:
            for j in range(5):  # 20 senders x 100 messages for one receiver, whose cap is 10
                await asyncio.gather(
                    *(
                        w.activate((SlowSender, f"s{i}"), [(i, j * 20 + k) for k in range(20)])
                        for i in range(20)
                    )
                )
            assert w.statistics()["outbox"]["messages"] > 1900  # nearly all wait in storage
            Counting.rows = 0
            SlowLedger.gate.set()
            await quiet(w)
            got = await w.read((SlowLedger, "l"))
            assert len(got) == 2000
            for i in range(20):
                assert [m for m in got if m[0] == i] == [(i, n) for n in range(100)]
            assert Counting.rows < 5 * 2000  # reading the whole backlog each time: ~200 000
    finally:
        SlowLedger.gate = None


@pytest.mark.parametrize("coming", [3, 12])
async def test_messages_that_come_while_a_refill_scans_go_after_what_it_finds(coming: int) -> None:
    """A refill's page is read, then a sender commits more messages to the spilled receiver:
    they may be behind the scan's cursor, so the refill keeps them aside and delivers them
    after what it found (more than the cap would wait in storage for another refill)."""

    class Paused(backends.Memory):
        armed = False
        scans = 0
        paused = asyncio.Event()
        resume = asyncio.Event()

        async def due(self, until: float, **kwargs: Any) -> Any:
            page = await super().due(until, **kwargs)  # read before the new messages commit
            self.scans += 1
            if self.armed:
                self.armed = False
                self.paused.set()
                await self.resume.wait()
            return page

    backend = Paused()
    SlowLedger.gate = asyncio.Event()
    try:
        async with pachyderm.World(backend, entities=[SlowLedger, SlowSender], mailbox_size=1) as w:
            await w.activate((SlowSender, "s"), [("m", i) for i in range(15)])  # 4 stored only
            backend.armed = True
            SlowLedger.gate.set()  # it catches up with what it holds: the refill begins
            await asyncio.wait_for(backend.paused.wait(), 10)
            scans = backend.scans
            await w.activate((SlowSender, "s"), [("m", i) for i in range(15, 15 + coming)])
            backend.resume.set()
            await quiet(w)
            got = await w.read((SlowLedger, "l"))
            assert got == [("m", i) for i in range(15 + coming)]  # every one, once, in order
            assert not w._engine.dispatcher.spilled
            if coming < 10:
                assert backend.scans == scans  # one refill was enough
            else:  # more than the cap (10) came: they waited in storage for another refill
                assert backend.scans > scans
            assert not w._engine.dispatcher._coming
    finally:
        SlowLedger.gate = None


async def test_a_timer_left_in_storage_fires_though_the_wall_clock_stepped_back(
    make_backend: MakeBackend,
) -> None:
    """A timer that fires while its receiver is spilled waits in storage; the refill finds it
    even if the wall clock has stepped back below its due time since (NTP, say)."""

    class Stepped(VirtualClock):
        offset = 0.0

        def wall(self) -> float:
            return self.now + self.offset

    clock = Stepped()
    SlowLedger.gate = asyncio.Event()
    types = [SlowLedger, SlowSender]
    try:
        async with pachyderm.World(
            make_backend(), entities=types, mailbox_size=1, timer_horizon=2.0, clock=clock
        ) as w:
            await w.activate((SlowSender, "s"), ("ring", 0.2))  # in the timer heap
            await w.activate((SlowSender, "s"), [("m", i) for i in range(15)])
            spilled = w._engine.dispatcher.spilled
            assert ("tests.test_messages.SlowLedger", "l") in spilled  # 1 + 10 held, 4 stored
            await clock.advance(0.4)  # it fires: the receiver is spilled, so it stays stored
            assert w.statistics()["timers_in_memory"] == 0
            clock.offset = -1.0  # the wall clock steps back below its due time
            SlowLedger.gate.set()
            await quiet(w)
            await until(lambda: w.statistics()["outbox"]["timers"] == 0)
            got = await w.read((SlowLedger, "l"))
            assert got == [*(("m", i) for i in range(15)), "ring"]  # every one, once
            assert not spilled
    finally:
        SlowLedger.gate = None


async def test_statistics_show_messages_that_wait_in_the_outbox(
    make_backend: MakeBackend,
) -> None:
    backend = make_backend()
    async with pachyderm.World(backend, entities=ALL) as w:
        await w.activate((Ping, "a"), ("b", 0, 10**9))
    reopened = backend if isinstance(backend, backends.Memory) else make_backend()
    # Reopened without the Ping type: its ball cannot be delivered, and stays visible.
    async with pachyderm.World(reopened, entities=[Ledger]) as w:
        await asyncio.sleep(0.01)
        assert w.statistics()["outbox"] == {"messages": 1, "timers": 0, "dead": 0}
    async with pachyderm.World(reopened, entities=ALL) as w:
        assert w.statistics()["outbox"]["messages"] <= 1  # the game goes on
        await until(lambda: w.statistics()["delivered"] > 3)


class FlakyCommits(backends.Memory):
    """Fails the commits that apply a message, on demand: `Unavailable`, or `Indeterminate`
    after committing (the outcome was lost on the way back)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail: list[BaseException] = []

    async def commit(self, writes: Any) -> list[bool]:
        if self.fail and any(w.outbox is not None and w.outbox.consumes for w in writes):
            error = self.fail.pop(0)
            if isinstance(error, pachyderm.Indeterminate):
                await super().commit(writes)
            raise error
        return await super().commit(writes)


@pytest.mark.parametrize(
    "error",
    [pachyderm.Unavailable("disk away"), pachyderm.Indeterminate("lost reply")],
    ids=["unavailable", "indeterminate"],
)
async def test_a_receiver_commit_that_fails_is_retried_in_order(error: Exception) -> None:
    backend = FlakyCommits()
    backend.fail = [error, error]
    async with pachyderm.World(backend, entities=ALL) as w:

        async def call(message: Any, key: str) -> None:
            # The sender's write may share the failing commit: retry it, with its key.
            while True:
                try:
                    await w.activate((Sender, "s"), message, idempotency_key=key)
                    return
                except (pachyderm.Unavailable, pachyderm.Indeterminate):
                    await asyncio.sleep(0.001)

        await call(("to", "l", [1, 2, 3]), "first")
        await call(("to", "l", [4, 5]), "second")
        await quiet(w)
        assert await w.read((Ledger, "l")) == [1, 2, 3, 4, 5]  # once each, in order
        assert w.statistics()["redelivered"] >= 1
        assert w.statistics()["outbox"] == {"messages": 0, "timers": 0, "dead": 0}


async def test_messages_wait_for_a_receiver_stored_by_a_newer_version() -> None:
    backend = backends.Memory()

    class LedgerV2(Ledger):
        name = Ledger.name
        version = 2

    async with pachyderm.World(backend, entities=[LedgerV2]) as w:
        await w.activate((LedgerV2, "l"), "from the future")
    async with pachyderm.World(backend, entities=ALL) as w:  # an older node
        await w.activate((Sender, "s"), ("to", "l", ["a", "b"]))
        await asyncio.sleep(0.05)
        stats = w.statistics()
        # Not dead letters: the messages wait (held, retried) until a node can apply them.
        assert stats["outbox"] == {"messages": 2, "timers": 0, "dead": 0}
        assert stats["dead_letters"] == 0
        assert stats["redelivered"] >= 2
    async with pachyderm.World(backend, entities=[Sender, LedgerV2]) as w:  # upgraded
        await quiet(w)
        assert await w.read((LedgerV2, "l")) == ["from the future", "a", "b"]


async def test_rows_built_on_the_hot_path_are_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """The envelopes, consumes and outboxes the engine builds (by a fast path for one call)
    hold every field, equal to the same objects built from their fields."""
    outboxes: list[backends.Outbox] = []
    original = backends.Memory.commit

    async def commit(self: backends.Memory, writes: Any) -> list[bool]:
        outboxes.extend(write.outbox for write in writes if write.outbox is not None)
        return await original(self, writes)

    monkeypatch.setattr(backends.Memory, "commit", commit)
    async with pachyderm.World(backends.Memory(), entities=ALL) as w:
        await w.activate((Ping, "a"), ("b", 0, 3))
        await quiet(w)
    assert any(o.sends for o in outboxes)
    assert any(o.consumes for o in outboxes)
    for outbox in outboxes:
        assert outbox == backends.Outbox(outbox.sends, outbox.cancels, outbox.consumes)
        assert type(outbox.sends) is tuple
        assert type(outbox.consumes) is tuple
        for row in outbox.sends:
            rebuilt = backends.Envelope(
                *(getattr(row, f.name) for f in msgspec.structs.fields(row) if f.name != "id")
            )
            assert row == rebuilt
            assert row.id == rebuilt.id
        for consume in outbox.consumes:
            assert consume == backends.Consume(consume.id, consume.dead, consume.timer)


class Keeps(backends.Memory):
    """A backend that keeps every write it was given (as a log would)."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[tuple[backends.Write, object]] = []

    async def commit(self, writes: Any) -> list[bool]:
        self.kept.extend((w, msgspec.to_builtins(w)) for w in writes)  # a deep copy, as it was
        return await super().commit(writes)


async def test_a_backend_may_keep_the_writes_it_is_given() -> None:
    """Each commit gets new `Write` objects, and the world never changes one afterwards."""
    backend = Keeps()
    async with pachyderm.World(backend, entities=ALL) as w:
        await w.activate((Ping, "a"), ("b", 0, 5))
        await quiet(w)
    assert len(backend.kept) == 6  # a, b, a, b, a, b: one write per commit
    assert len({id(write) for write, _ in backend.kept}) == 6
    assert all(msgspec.to_builtins(write) == seen for write, seen in backend.kept)
    assert all(write.outbox is not None for write, _ in backend.kept)


def test_the_outbox_of_one_call_is_the_general_one() -> None:
    """``outbox_of`` has a fast path for one call; it gives what the general path gives."""
    from pachyderm._core._resident import Call
    from pachyderm._dispatch import SINK
    from pachyderm._outbox import outbox_of

    def envelope(index: int, due: float = 0.0) -> backends.Envelope:
        return backends.Envelope("S", "s", 3, index, "R", "r", due, None, b"m")

    def call(delivery: backends.Envelope | None, effects: Any, result: Any = 1) -> Call:
        c = Call("message", SINK, None)
        c.delivery, c.effects, c.result = delivery, effects, result
        return c

    cases = [
        call(envelope(0), (envelope(1), envelope(2, due=5.0))),
        call(envelope(0, due=9.0), None),  # a timer fired, nothing sent
        call(envelope(0), None, ValueError("boom")),  # a dead letter
        call(None, (envelope(1),)),
        call(None, None),
    ]
    for c in cases:
        idle = call(None, None)
        assert outbox_of([c]) == outbox_of([c, idle]), c.delivery
