"""The messaging and timer promises, checked in the deterministic simulation under faults.

Every test here runs ``pachyderm.testing.Simulation``: the real runtime on the memory backend, in
virtual time, from a seed, with duplicated and delayed (reordered) deliveries, crashes around
commits and restarts. The promises come from ``docs/messages.md``: exactly-once application,
order per (sender, receiver) pair, durable timers (named, cancellable, surviving restarts). One
entity is deliberately impure, to show that the duplicate-delivery fault does reach handlers: the
runtime's exactly-once covers the stored state, not what a handler does besides.

The last section holds regression tests of the bugs these tests found (in the simulation, and in
the runtime with ``async def`` handlers and small mailboxes), each named in its docstring.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import given, settings

import pachyderm
from pachyderm import Update, after, cancel, send
from pachyderm.testing import Faults, Pending, Simulation, explore, schedules

SEEDS = range(30)
FAULTS = Faults(
    duplicate=0.2, delay=0.2, max_delay=1.0, crash_before_commit=0.05, crash_after_commit=0.05
)

# ---------------------------------------------------------------------------------------------
# Entities


class Account(pachyderm.Entity):
    """A bank account. ("transfer", id, amount, to) debits and sends ("credit", id, amount).

    The handler does not deduplicate anything: if a transfer or a credit were applied twice, the
    id would appear twice in ``sent`` or ``received`` and the money would not add up.
    """

    name = "sim.Account"
    OPENING = 1000

    def init(self) -> dict[str, Any]:
        return {"balance": self.OPENING, "sent": [], "received": []}

    def activate(self, message: Any, state: dict[str, Any]) -> Any:
        match message:
            case ("transfer", tid, amount, to):
                state["balance"] -= amount
                state["sent"].append(tid)
                return Update(state, send((Account, to), ("credit", tid, amount)))
            case ("credit", tid, amount):
                state["balance"] += amount
                state["received"].append(tid)
                return state
        raise pachyderm.Rejected(f"unknown message {message!r}")


class Sender(pachyderm.Entity):
    """("burst", receiver, n) sends its next n sequence numbers to Receiver(receiver)."""

    name = "sim.Sender"

    def init(self) -> int:
        return 0

    def activate(self, message: Any, state: int) -> Any:
        _, receiver, n = message
        sends = [send((Receiver, receiver), ("seq", self.key, state + i)) for i in range(n)]
        return Update(state + n, *sends)


class Receiver(pachyderm.Entity):
    """Records the (sender, number) of every message, in the order they are applied."""

    name = "sim.Receiver"

    def init(self) -> list[Any]:
        return []

    def activate(self, message: Any, state: list[Any]) -> Any:
        _, sender, number = message
        return [*state, [sender, number]]


class Alarm(pachyderm.Entity):
    """("arm", seconds, text[, name]) arms a timer to itself; ("cancel", name); else records."""

    name = "sim.Alarm"

    def init(self) -> list[Any]:
        return []

    def activate(self, message: Any, state: list[Any]) -> Any:
        match message:
            case ("arm", seconds, text):
                return Update(state, after(seconds, text))
            case ("arm", seconds, text, name):
                return Update(state, after(seconds, text, name=name))
            case ("cancel", name):
                return Update(state, cancel(name))
        return [*state, message]


class Heartbeat(pachyderm.Entity):
    """An active entity: "start" (or a beat) counts and re-arms the "beat" timer; "stop"."""

    name = "sim.Heartbeat"
    PERIOD = 60.0

    def init(self) -> int:
        return 0

    def activate(self, message: Any, state: int) -> Any:
        if message == "stop":
            return Update(state, cancel("beat"))
        return Update(state + 1, after(self.PERIOD, "beat", name="beat"))


#: The outside world of ``Card``: how many times each charge was made (a side effect).
CHARGED: Counter[str] = Counter()


class Card(pachyderm.Entity):
    """A deliberately impure handler: it "charges a card" besides updating its state.

    Its state lists each charge once (the runtime applies each message once); ``CHARGED`` counts
    every time the handler ran for it, which a duplicate delivery or a retry makes more than one.
    """

    name = "sim.Card"

    def init(self) -> list[str]:
        return []

    def activate(self, message: Any, state: list[str]) -> Any:
        _, charge = message
        CHARGED[charge] += 1  # the side effect a handler must not have
        return [*state, charge]


class Shop(pachyderm.Entity):
    """("order", id) asks Card(key) to charge ``id``, by a message."""

    name = "sim.Shop"

    def init(self) -> int:
        return 0

    def activate(self, message: Any, state: int) -> Any:
        _, order = message
        return Update(state + 1, send((Card, self.key), ("charge", order)))


@pytest.fixture(autouse=True)
def _no_charges() -> Iterable[None]:
    CHARGED.clear()
    yield
    CHARGED.clear()


# ---------------------------------------------------------------------------------------------
# Helpers

Call = tuple[tuple[type[pachyderm.Entity], str], Any, str]  # ref, message, idempotency key


def call_all(
    sim: Simulation,
    calls: list[Call],
    *,
    step: Callable[[], None] | None = None,
    attempts: int = 50,
) -> dict[str, Any]:
    """Submit every call; retry those that fail Indeterminate/Unavailable with the same key.

    ``step`` runs the simulation between rounds (``sim.run`` by default). Returns the result of
    each call by its idempotency key.
    """
    step = step or sim.run
    waiting: dict[str, tuple[Call, Pending]] = {}
    for call in calls:
        waiting[call[2]] = (call, sim.submit(call[0], call[1], idempotency_key=call[2]))
    results: dict[str, Any] = {}
    for _ in range(attempts):
        if not waiting:
            return results
        step()
        for key, (call, pending) in list(waiting.items()):
            if not pending.done():
                continue
            error = pending.exception()
            if error is None:
                results[key] = pending.result()
                del waiting[key]
            elif isinstance(error, pachyderm.Indeterminate | pachyderm.Unavailable):
                retry = sim.submit(call[0], call[1], idempotency_key=key)
                waiting[key] = (call, retry)
            else:
                raise error
    raise AssertionError(f"calls still unanswered after {attempts} rounds: {sorted(waiting)}")


def committed_messages(sim: Simulation, ref: Any) -> list[Any]:
    """The messages the simulation saw committed for ``ref`` (calls and deliveries)."""
    return [s.message for s in sim.steps(ref) if s.version is not None]


def bank_transfers(seed: int, accounts: int, transfers: int) -> list[Call]:
    """``transfers`` transfers between ``accounts`` accounts, drawn from ``seed``."""
    rng = random.Random(seed)
    calls: list[Call] = []
    for i in range(transfers):
        source, target = rng.sample(range(accounts), 2)
        tid = f"t{i}"
        calls.append(
            ((Account, f"a{source}"), ("transfer", tid, rng.randint(1, 50), f"a{target}"), tid)
        )
    return calls


def check_bank(sim: Simulation, calls: list[Call], accounts: int) -> None:
    """Money is conserved and each transfer was debited once and credited once."""
    states = {key: sim.read((Account, key)) for key in (f"a{i}" for i in range(accounts))}
    assert sum(s["balance"] for s in states.values()) == accounts * Account.OPENING
    sent = Counter(t for s in states.values() for t in s["sent"])
    received = Counter(t for s in states.values() for t in s["received"])
    tids = {key for _, _, key in calls}
    assert sent == Counter(tids), "a transfer was debited twice or never"
    assert received == Counter(tids), "a credit was applied twice or never"
    for key, state in states.items():
        expected = Account.OPENING
        for ref, (_, tid, amount, to), _ in calls:
            if ref[1] == key:
                expected -= amount
                assert tid in state["sent"]
            if to == key:
                expected += amount
                assert tid in state["received"]
        assert state["balance"] == expected
    # The simulation's own history agrees: each transfer and each credit committed once.
    committed = Counter(m[:2] for key in states for m in committed_messages(sim, (Account, key)))
    assert committed == Counter((kind, t) for t in tids for kind in ("transfer", "credit"))
    assert sim.quiet()
    assert sim.statistics()["outbox"] == {"messages": 0, "timers": 0, "dead": 0}


# ---------------------------------------------------------------------------------------------
# 1. Exactly once, under duplicates, delays and crashes


def test_transfers_are_applied_exactly_once_under_faults() -> None:
    faulted = duplicated = crashed = retried = 0
    for seed in SEEDS:
        calls = bank_transfers(seed, accounts=4, transfers=12)
        with Simulation([Account], seed=seed, faults=FAULTS) as sim:
            results = call_all(sim, calls)
            assert set(results) == {key for _, _, key in calls}
            check_bank(sim, calls, accounts=4)
            injected = " | ".join(sim.injected)
            faulted += bool(sim.injected)
            duplicated += "duplicated" in injected
            crashed += "crash" in injected
            retried += sim.statistics()["conflicts"] > 0  # type: ignore[operator]
    # The faults did happen, in most runs: the test is not vacuous.
    assert faulted >= 0.9 * len(SEEDS)
    assert duplicated >= len(SEEDS) / 2
    assert crashed >= len(SEEDS) / 4
    assert retried >= len(SEEDS) / 4


def test_a_transfer_retried_with_its_key_after_a_lost_reply_is_debited_once() -> None:
    with Simulation([Account], seed=7) as sim:
        sim.crash_commit(after=True, ref=(Account, "a0"))
        with pytest.raises(pachyderm.Indeterminate):
            sim.activate((Account, "a0"), ("transfer", "t1", 10, "a1"), idempotency_key="t1")
        # The retry finds the receipt: the state the first attempt committed, not a second debit.
        again = sim.activate((Account, "a0"), ("transfer", "t1", 10, "a1"), idempotency_key="t1")
        assert again == {"balance": 990, "sent": ["t1"], "received": []}
        sim.run()
        assert sim.read((Account, "a1"))["received"] == ["t1"]
        [step] = sim.steps((Account, "a0"))
        assert step.reply_lost
        assert step.version == 1


# ---------------------------------------------------------------------------------------------
# 2. Order per (sender, receiver) pair


def test_order_per_pair_holds_under_delays_and_duplicates() -> None:
    faults = Faults(
        duplicate=0.3, delay=0.3, max_delay=2.0, crash_before_commit=0.05, crash_after_commit=0.05
    )
    interleavings = set()
    faulted = 0
    for seed in SEEDS:
        with Simulation([Sender, Receiver], seed=seed, faults=faults) as sim:
            # 4 senders, 3 bursts of 3 numbered messages each, all to one receiver.
            calls: list[Call] = [
                ((Sender, f"s{s}"), ("burst", "r", 3), f"s{s}-b{b}")
                for b in range(3)
                for s in range(4)
            ]
            call_all(sim, calls)
            got = sim.read((Receiver, "r"))
            assert len(got) == 4 * 9
            for s in range(4):
                numbers = [n for sender, n in got if sender == f"s{s}"]
                assert sim.read((Sender, f"s{s}")) == 9
                assert numbers == list(range(9)), f"seed {seed}: s{s} got {numbers}"
            interleavings.add(tuple(sender for sender, _ in got))
            injected = " | ".join(sim.injected)
            faulted += "delayed" in injected and "duplicated" in injected
    # Between pairs there is no order: the seeds interleave the senders differently.
    assert len(interleavings) >= len(SEEDS) // 2
    assert faulted >= len(SEEDS) // 2


def test_every_delivery_order_keeps_the_order_per_pair() -> None:
    def setup(sim: Simulation) -> None:
        for s in ("a", "b"):
            for _ in range(2):
                sim.submit((Sender, s), ("burst", "r", 2), client=s)

    def check(sim: Simulation) -> None:
        got = sim.read((Receiver, "r"))
        for s in ("a", "b"):
            assert [n for sender, n in got if sender == s] == [0, 1, 2, 3]

    found = explore(setup, entities=[Sender, Receiver], max_runs=100, check=check)
    assert found.runs == 100
    assert len(found.worlds) > 10  # the pairs interleave in many ways, each pair in order


def test_a_delayed_pair_is_overtaken_but_keeps_its_order() -> None:
    with Simulation([Sender, Receiver], seed=3) as sim:
        sim.activate((Sender, "slow"), ("burst", "r", 5))  # committed first
        sim.delay(10.0, to=(Receiver, "r"))  # its first delivery is held back 10 s
        sim.run_until_idle()
        for s in ("a", "b"):
            sim.activate((Sender, s), ("burst", "r", 5))  # sent later
        sim.run_until_idle()
        got = sim.read((Receiver, "r"))
        assert sorted({sender for sender, _ in got}) == ["a", "b"]  # overtaken
        sim.run()
        assert sim.now == pytest.approx(10.0)
        got = sim.read((Receiver, "r"))
        assert [sender for sender, _ in got][-5:] == ["slow"] * 5
        for s in ("a", "b", "slow"):
            assert [n for sender, n in got if sender == s] == [0, 1, 2, 3, 4]
        assert any("delayed 10.000 s" in text for text in sim.injected)


# ---------------------------------------------------------------------------------------------
# 3. Timers, in virtual time


def timer_steps(sim: Simulation, ref: Any) -> list[tuple[Any, float]]:
    """(message, virtual time) of each committed step that is not an "arm"/"cancel" call."""
    return [
        (s.message, s.time)
        for s in sim.steps(ref)
        if s.version is not None
        and not (isinstance(s.message, tuple) and s.message[0] in ("arm", "cancel"))
    ]


def test_an_hour_long_timer_fires_at_once_in_virtual_time() -> None:
    started = time.monotonic()
    with Simulation([Alarm], seed=1) as sim:
        sim.activate((Alarm, "a"), ("arm", 3600, "ring"))
        assert sim.read((Alarm, "a")) == []
        sim.run()
        assert sim.read((Alarm, "a")) == ["ring"]
        assert sim.now == pytest.approx(3600.0, abs=1.0)
        [(message, at)] = timer_steps(sim, (Alarm, "a"))
        assert message == "ring"
        assert at == pytest.approx(3600.0, abs=1.0)
        assert sim.statistics()["timers_fired"] == 1
    assert time.monotonic() - started < 5.0  # no real hour, no real sleep


def test_advance_fires_only_the_timers_that_are_due() -> None:
    with Simulation([Alarm], seed=2) as sim:
        for seconds in (30, 10, 20):
            sim.activate((Alarm, "a"), ("arm", seconds, f"at {seconds}"))
        sim.advance(5)
        assert sim.read((Alarm, "a")) == []
        sim.advance(10)  # t = 15
        assert sim.read((Alarm, "a")) == ["at 10"]
        sim.advance(10)  # t = 25
        assert sim.read((Alarm, "a")) == ["at 10", "at 20"]
        assert sim.now == pytest.approx(25.0)
        assert not sim.quiet()  # one timer is still armed
        sim.run()
        assert sim.read((Alarm, "a")) == ["at 10", "at 20", "at 30"]
        assert [at for _, at in timer_steps(sim, (Alarm, "a"))] == pytest.approx([10, 20, 30])


def test_a_named_timer_rearmed_is_replaced_and_a_cancelled_one_never_fires() -> None:
    with Simulation([Alarm], seed=3) as sim:
        sim.activate((Alarm, "a"), ("arm", 10, "first", "t"))
        sim.advance(5)
        sim.activate((Alarm, "a"), ("arm", 10, "second", "t"))  # replaces it: due at 15
        sim.activate((Alarm, "b"), ("arm", 10, "never", "t"))
        sim.activate((Alarm, "b"), ("cancel", "t"))
        assert sim.statistics()["outbox"]["timers"] == 1  # type: ignore[index]
        sim.run()
        assert sim.read((Alarm, "a")) == ["second"]
        assert sim.read((Alarm, "b")) == []
        [(_, at)] = timer_steps(sim, (Alarm, "a"))
        assert at == pytest.approx(15.0)
        sim.advance(3600)
        assert sim.read((Alarm, "a")) == ["second"]


def test_timers_survive_a_restart_and_fire_exactly_once() -> None:
    with Simulation([Alarm], seed=4) as sim:
        sim.activate((Alarm, "a"), ("arm", 10, "near"))
        sim.activate((Alarm, "a"), ("arm", 100, "named", "n"))
        sim.activate((Alarm, "a"), ("arm", 7200, "far"))  # beyond the horizon: in storage only
        sim.advance(20)
        assert sim.read((Alarm, "a")) == ["near"]
        sim.restart()
        sim.advance(50)  # t = 70
        sim.restart()
        sim.run()
        assert sim.read((Alarm, "a")) == ["near", "named", "far"]
        assert [at for _, at in timer_steps(sim, (Alarm, "a"))] == pytest.approx(
            [10, 100, 7200], abs=0.5
        )
        sim.restart()
        sim.advance(7 * 86400)
        assert sim.read((Alarm, "a")) == ["near", "named", "far"]
        assert sim.restarts == 3


@pytest.mark.parametrize("after_commit", [False, True])
def test_a_timer_whose_commit_crashes_is_applied_once_even_across_a_restart(
    after_commit: bool,
) -> None:
    with Simulation([Alarm], seed=5) as sim:
        sim.activate((Alarm, "a"), ("arm", 10, "ring"))
        sim.crash_commit(after=after_commit, ref=(Alarm, "a"))  # the timer's own commit
        sim.advance(10)
        sim.restart()
        sim.run()
        assert sim.read((Alarm, "a")) == ["ring"]
        assert [m for m, _ in timer_steps(sim, (Alarm, "a"))] == ["ring"]
        assert any("crash" in text for text in sim.injected)


def test_a_periodic_entity_fires_once_per_period() -> None:
    with Simulation([Heartbeat], seed=6) as sim:
        sim.activate((Heartbeat, "h"), "start")
        for n in range(1, 25):
            sim.advance(Heartbeat.PERIOD)
            assert sim.read((Heartbeat, "h")) == 1 + n
        assert sim.now == pytest.approx(24 * Heartbeat.PERIOD)
        assert not sim.quiet()
        with pytest.raises(pachyderm.testing.SimulationError):
            sim.run(max_time=3600 * 24 * 365, max_activations=100)  # it never rests
        sim.activate((Heartbeat, "h"), "stop")
        beats = sim.read((Heartbeat, "h"))
        sim.run()  # it rests now
        sim.advance(10 * Heartbeat.PERIOD)
        assert sim.read((Heartbeat, "h")) == beats


def test_timers_under_duplicates_delays_and_crashes_apply_once() -> None:
    faults = Faults(
        duplicate=0.4, delay=0.3, max_delay=5.0, crash_before_commit=0.05, crash_after_commit=0.05
    )
    duplicated_timers = 0
    for seed in SEEDS:
        with Simulation([Alarm], seed=seed, faults=faults) as sim:
            calls: list[Call] = [
                ((Alarm, f"a{a}"), ("arm", 10 * (t + 1) + a, f"a{a}-t{t}"), f"a{a}-{t}")
                for a in range(3)
                for t in range(4)
            ]
            call_all(sim, calls)
            for a in range(3):
                fired = sim.read((Alarm, f"a{a}"))
                assert sorted(fired) == [f"a{a}-t{t}" for t in range(4)], f"seed {seed}"
            duplicated_timers += any("duplicated" in t and "timer" in t for t in sim.injected)
            for a in range(3):  # the simulation's history agrees: each timer committed once
                fired = [m for m, _ in timer_steps(sim, (Alarm, f"a{a}"))]
                assert sorted(fired) == [f"a{a}-t{t}" for t in range(4)], f"seed {seed}"
    assert duplicated_timers >= len(SEEDS) / 2


def test_an_on_demand_duplicate_of_a_timer_is_applied_once() -> None:
    with Simulation([Alarm], seed=8) as sim:
        sim.activate((Alarm, "a"), ("arm", 60, "ring"))
        sim.duplicate(to=(Alarm, "a"))
        sim.run()
        assert sim.read((Alarm, "a")) == ["ring"]
        assert any("duplicated" in t and "timer" in t for t in sim.injected)


# ---------------------------------------------------------------------------------------------
# 4. A non-idempotent handler is caught by the faults


def test_a_duplicate_delivery_runs_an_impure_handler_twice_but_applies_once() -> None:
    with Simulation([Shop, Card], seed=9) as sim:
        sim.duplicate(to=(Card, "c"))
        sim.activate((Shop, "c"), ("order", "o1"))
        sim.run()  # o1 is applied, then its copy arrives: the handler runs for it, and loses
        sim.activate((Shop, "c"), ("order", "o2"))
        sim.run()
        assert sim.read((Card, "c")) == ["o1", "o2"]  # the runtime applied each once
        assert CHARGED == {"o1": 2, "o2": 1}  # but the card was charged twice for o1
        assert sim.statistics()["conflicts"] == 1  # the copy's write lost
        assert committed_messages(sim, (Card, "c")) == [("charge", "o1"), ("charge", "o2")]
        assert any("duplicated" in text for text in sim.injected)


def test_random_duplicates_catch_the_impure_handler() -> None:
    caught = 0
    for seed in SEEDS:
        CHARGED.clear()
        with Simulation([Shop, Card], seed=seed, faults=Faults(duplicate=0.3)) as sim:
            for i in range(10):
                sim.activate((Shop, "c"), ("order", f"o{i}"))
            sim.run()
            charges = sim.read((Card, "c"))
            assert sorted(charges) == sorted(f"o{i}" for i in range(10))  # exactly once
            assert all(n >= 1 for n in CHARGED.values())
            caught += sum(CHARGED.values()) > len(charges)
    assert caught >= 0.9 * len(SEEDS)


def test_a_retry_without_idempotency_key_counts_twice_and_with_one_once() -> None:
    with Simulation([Card], seed=10) as sim:
        ref = (Card, "c")
        sim.crash_commit(after=True, ref=ref)
        with pytest.raises(pachyderm.Indeterminate):
            sim.activate(ref, ("charge", "no-key"))
        sim.activate(ref, ("charge", "no-key"))  # the client cannot know: it retries
        assert sim.read(ref) == ["no-key", "no-key"]  # applied twice: two different calls
        assert CHARGED["no-key"] == 2

        sim.crash_commit(after=True, ref=ref)
        with pytest.raises(pachyderm.Indeterminate):
            sim.activate(ref, ("charge", "keyed"), idempotency_key="k1")
        assert sim.activate(ref, ("charge", "keyed"), idempotency_key="k1") == [
            "no-key",
            "no-key",
            "keyed",
        ]
        assert sim.read(ref).count("keyed") == 1
        assert CHARGED["keyed"] == 1  # the retry found the receipt: the handler did not run


# ---------------------------------------------------------------------------------------------
# 5. Restarts in the middle of a flow


def test_restarts_with_messages_in_flight_apply_everything_once_in_order() -> None:
    faults = Faults(
        duplicate=0.2, delay=0.3, max_delay=2.0, crash_before_commit=0.03, crash_after_commit=0.03
    )
    in_flight = 0
    for seed in SEEDS:
        with Simulation([Sender, Receiver, Account], seed=seed, faults=faults) as sim:
            follower = sim.follow((Receiver, "r"), versions=True)
            bursts: list[Call] = [
                ((Sender, f"s{s}"), ("burst", "r", 4), f"s{s}-b{b}")
                for b in range(3)
                for s in range(3)
            ]
            transfers = bank_transfers(seed, accounts=3, transfers=8)
            rounds = 0

            def step() -> None:
                nonlocal rounds, in_flight
                rounds += 1
                sim.advance(0.5)
                if rounds % 2 and not sim.quiet():
                    pending = sim.pending()
                    in_flight += bool(pending["in_flight"] or pending["messages"])
                    sim.restart()  # messages in flight, calls running

            call_all(sim, bursts + transfers, step=step)
            sim.run()
            got = sim.read((Receiver, "r"))
            for s in range(3):
                assert [n for sender, n in got if sender == f"s{s}"] == list(range(12))
            check_bank(sim, transfers, accounts=3)
            # The follower crossed the restarts without repeating or going back.
            versions = [v for v, _ in follower.items]
            assert versions == sorted(set(versions))
            assert follower.items[-1][1] == got
    assert in_flight >= len(SEEDS)  # restarts with messages in flight, about 2 per seed


def test_a_restart_between_idle_steps_of_a_relay_applies_each_message_once() -> None:
    with Simulation([Shop, Card], seed=11) as sim:
        sim.delay(5.0, to=(Card, "c"))
        sim.activate((Shop, "c"), ("order", "o1"))
        sim.activate((Shop, "c"), ("order", "o2"))
        sim.run_until_idle()
        assert sim.read((Card, "c")) == []  # held back in the network
        assert sim.statistics()["outbox"]["messages"] == 2  # type: ignore[index]
        sim.restart()  # the network loses them; the outbox still has them
        sim.run_until_idle()
        sim.restart()
        sim.run()
        assert sim.read((Card, "c")) == ["o1", "o2"]
        assert committed_messages(sim, (Card, "c")) == [("charge", "o1"), ("charge", "o2")]


# ---------------------------------------------------------------------------------------------
# 6. Any schedule, from Hypothesis


@given(draw=schedules())
@settings(max_examples=25, deadline=None, database=None)
def test_any_schedule_conserves_money_and_order(draw: Any) -> None:
    calls = bank_transfers(draw.seed, accounts=3, transfers=6)
    bursts: list[Call] = [
        ((Sender, f"s{s}"), ("burst", "r", 3), f"s{s}-b{b}") for b in range(2) for s in range(2)
    ]
    with Simulation([Account, Sender, Receiver], **draw.kwargs) as sim:
        call_all(sim, calls + bursts)
        check_bank(sim, calls, accounts=3)
        got = sim.read((Receiver, "r"))
        for s in range(2):
            assert [n for sender, n in got if sender == f"s{s}"] == list(range(6))


# ---------------------------------------------------------------------------------------------
# 7. Regressions: bugs these tests found, in the simulation and in the runtime (all fixed)


class Notes(pachyderm.Entity):
    """An ``async def`` handler that takes a little (virtual) time: appends each message."""

    name = "sim.Notes"

    def init(self) -> list[Any]:
        return []

    async def activate(self, message: Any, state: list[Any]) -> Any:
        await asyncio.sleep(0.05)
        return [*state, message]


class Picky(pachyderm.Entity):
    """Rejects the message "bad" (a dead letter when it is delivered); appends the others."""

    name = "sim.Picky"

    def init(self) -> list[Any]:
        return []

    def activate(self, message: Any, state: list[Any]) -> Any:
        if message == "bad":
            raise pachyderm.Rejected("bad is refused")
        return [*state, message]


#: The receivers ``Post`` can send to, by name (a message carries data, not classes).
TARGETS: dict[str, type[pachyderm.Entity]] = {"notes": Notes, "picky": Picky, "receiver": Receiver}


class Post(pachyderm.Entity):
    """(target, [messages]) sends the messages, in order, to TARGETS[target](key)."""

    name = "sim.Post"

    def init(self) -> int:
        return 0

    def activate(self, message: Any, state: int) -> Any:
        target, messages = message
        return Update(state + 1, *(send((TARGETS[target], self.key), m) for m in messages))


def test_sim_a_delayed_delivery_arrives_when_its_delay_is_over() -> None:
    """The virtual loop jumped past the wake-up its idle hook had just armed for a delay."""
    with Simulation([Post, Picky], seed=12) as sim:
        sim.delay(2.0, to=(Picky, "p"))
        sim.submit((Post, "p"), ("picky", ["m"]))
        sim.advance(15)
        [step] = sim.steps((Picky, "p"))
        assert "delayed 2.000 s" in sim.injected[0]
        assert step.time == pytest.approx(2.0)  # it arrives at 15.0: the end of the advance


def test_sim_restart_answers_a_call_whose_async_handler_is_running() -> None:
    """restart() forgot the call an async handler ran: never answered, its handler went on."""
    with Simulation([Notes], seed=13) as sim:
        pending = sim.submit((Notes, "n"), "note")
        sim.advance(0.01)  # the handler is sleeping in the middle of its run
        sim.restart()
        assert pending.done()  # it never was, not even after run() or close()
        assert isinstance(pending.exception(), pachyderm.Unavailable)  # nothing committed
        assert sim.read((Notes, "n")) == []


def test_held_messages_are_delivered_after_a_lost_reply_of_their_receiver() -> None:
    """A recheck that dropped applied deliveries made room but did not flush the held queue."""
    with Simulation([Post, Receiver], seed=14, mailbox_size=1) as sim:
        sim.crash_commit(after=True, ref=(Receiver, "r"))  # its first commit; the reply is lost
        sim.activate((Post, "r"), ("receiver", [("seq", "p", n) for n in range(3)]))
        sim.run(max_time=600)  # "still busy": 2 messages held, never delivered
        assert sim.read((Receiver, "r")) == [["p", 0], ["p", 1], ["p", 2]]


def test_an_async_result_on_an_undone_state_is_not_committed() -> None:
    """An async handler's result on a state undone meanwhile was left in the tip and committed."""
    with Simulation([Notes], seed=15) as sim:
        sim.crash_commit(after=False, ref=(Notes, "n"))  # nothing of "first" is written
        first = sim.submit((Notes, "n"), "first", client="c")
        second = sim.submit((Notes, "n"), "second", client="c")  # runs on first's tip
        sim.run()
        assert isinstance(first.exception(), pachyderm.Indeterminate)
        stored = sim.read((Notes, "n"))
        assert second.result() == stored
        assert stored == ["second"]  # stored: ["first", "second", "second"]


def test_an_unavailable_commit_is_not_committed_by_the_async_call_behind_it() -> None:
    """After an Unavailable commit, an async handler still running on its tip was not run again."""
    with Simulation([Notes], seed=16) as sim:
        commit = sim.backend.commit
        failures = [pachyderm.Unavailable("the disk is full (simulated)")]

        async def failing_once(writes: Any) -> list[bool]:
            if failures:
                raise failures.pop()
            return await commit(writes)

        sim.backend.commit = failing_once  # type: ignore[method-assign]
        first = sim.submit((Notes, "n"), "first", client="c")
        second = sim.submit((Notes, "n"), "second", client="c")
        sim.run()
        assert isinstance(first.exception(), pachyderm.Unavailable)  # "nothing committed"
        assert sim.read((Notes, "n")) == second.result() == ["second"]  # ["first", "second"]


@pytest.mark.parametrize("after_commit", [False, True])
def test_an_async_receiver_applies_each_message_once_in_order_after_a_lost_write(
    after_commit: bool,
) -> None:
    """A delivery an async handler ran during a lost write jumped ahead of the others."""
    with Simulation([Post, Notes], seed=17) as sim:
        sim.crash_commit(after=after_commit, ref=(Notes, "p"))
        sim.activate((Post, "p"), ("notes", [0, 1, 2]))
        sim.run()
        assert sim.read((Notes, "p")) == [0, 1, 2]  # [0, 1, 1, 0, 2] / [0, 1, 1, 0, 2, 2]


def test_a_dead_letter_whose_reply_was_lost_is_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A dead letter consumed by a commit whose reply was lost was neither counted nor logged."""
    with Simulation([Post, Picky], seed=18) as sim, caplog.at_level("WARNING", "pachyderm"):
        sim.activate((Post, "p"), ("picky", ["bad"]))
        sim.crash_commit(after=True, ref=(Picky, "p"))
        sim.run()
        sim.activate((Post, "p"), ("picky", ["ok"]))
        sim.run()
        assert sim.read((Picky, "p")) == ["ok"]
        assert sim.statistics()["outbox"]["dead"] == 1  # type: ignore[index]
        assert any("dead letter" in r.getMessage() for r in caplog.records)
        assert sim.statistics()["dead_letters"] == 1
