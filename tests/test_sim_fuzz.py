"""Seed sweeps of the simulation: async and plain handlers, small mailboxes, faults, restarts.

Each scenario draws its own choices from ``random.Random(seed)`` (its entities, plain or async,
options such as ``mailbox_size=1..3`` and ``activation_timeout``, its calls, when to crash a
commit, duplicate or delay a delivery, make the storage fail, restart) and the simulation draws
its faults from the same seed. Client calls are retried on Indeterminate/Unavailable/Overloaded,
with their idempotency key if they have one. After ``sim.run()`` the promises of
``docs/messages.md`` and ``docs/design.md`` are checked against the stored states, the
simulation's history and the world's counters:

- every message between entities applied exactly once, in order per (sender, receiver) pair, a
  dead one never; money conserved along chains and fan-ins;
- a client call answered with a state applied once (and in that state), one answered only
  ``Unavailable``, ``Overloaded``, ``Timeout`` or ``Rejected`` never, an ``Indeterminate`` one at
  most once; the history agrees with storage (one committed step per version);
- every timer fired once, unless replaced or cancelled first (then never);
- nothing stuck: the world comes to rest, with nothing in the outbox or held; dead letters
  stored as counted.

The last section holds regression tests of the bugs the sweeps found, each shrunk by hand to a
deterministic repro (all fixed).
"""

from __future__ import annotations

import asyncio
import random
import zlib
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pytest

import pachyderm
from pachyderm import Update, after, cancel, send
from pachyderm.testing import Faults, Pending, Simulation

OPEN = 1000
SLOW = 3.0  # an async handler's "slow" run: longer than ACTIVATION_TIMEOUT
ACTIVATION_TIMEOUT = 1.0

# ---------------------------------------------------------------------------------------------
# Entities: one behaviour, a plain and an async flavour


def _apply(node: pachyderm.Entity, message: Any, state: dict[str, Any]) -> Any:
    """The handler of ``Node`` and ``ANode`` (see ``Node``)."""
    effects: list[Any] = []

    def post(target: list[str], body: tuple[Any, ...], dead: bool = False) -> None:
        name = f"{target[0]}/{target[1]}"
        seq = state["out"].get(name, 0)
        state["out"][name] = seq + 1
        if dead:
            state["dead_out"].setdefault(name, []).append(seq)
        effects.append(send((TYPES[target[0]], target[1]), (body[0], _me(node), seq, *body[1:])))

    def arm(tid: str, gen: int, seconds: float, named: bool, repeat: int) -> None:
        state["gen"][tid] = gen
        if named:
            state["named"].append(tid)
        state["tlog"].append([tid, "arm", gen])
        body = ("tick", tid, gen, named, repeat, seconds)
        effects.append(after(seconds, body, name=tid if named else None))

    def latest(base: str) -> str | None:
        named = [tid for tid in state["named"] if tid.endswith(f"/{base}")]
        return named[-1] if named else None

    kind = message[0]
    if kind == "call":
        _, cid, actions, bad = message
        if bad:
            raise pachyderm.Rejected(f"call {cid} is refused")
        state["calls"].append(cid)
        for action in actions:
            match action:
                case ("pay", path, amount):
                    state["bal"] -= amount
                    post(path[0], ("credit", amount, path[1:]))
                case ("note", target, dead):
                    post(target, ("note", dead), dead)
                case ("slow",):
                    pass  # ANode sleeps beyond activation_timeout: a Timeout, nothing applied
                case ("tick", base, seconds, named, repeat):
                    tid = f"{cid}/{base}"  # each attempt of an unkeyed call arms its own
                    arm(tid, 0, seconds, named, repeat)
                case ("retick", base, seconds):  # replace a named timer: only the new one fires
                    named = latest(base)
                    if named is not None:
                        arm(named, state["gen"][named] + 1, seconds, True, 0)
                case ("untick", base):  # cancel a named timer: it never fires
                    named = latest(base)
                    if named is not None:
                        state["tlog"].append([named, "cancel", None])
                        effects.append(cancel(named))
    elif kind == "credit":
        _, sender, seq, amount, rest = message
        state["got"].append([sender, seq])
        state["bal"] += amount
        if rest:  # a chain: pass the money on
            state["bal"] -= amount
            post(rest[0], ("credit", amount, rest[1:]))
    elif kind == "note":
        _, sender, seq, dead = message
        if dead:
            raise pachyderm.Rejected("a dead note")
        state["got"].append([sender, seq])
    elif kind == "tick":  # a timer fired; it re-arms itself ``repeat`` more times
        _, tid, gen, named, repeat, seconds = message
        state["tlog"].append([tid, "fire", gen])
        if repeat:
            arm(tid, gen + 1, seconds, named, repeat - 1)
    else:
        raise AssertionError(f"unknown message {message!r}")
    return Update(state, *effects) if effects else state


def _me(node: pachyderm.Entity) -> str:
    return f"{type(node).__name__}/{node.key}"


def _delay(message: Any) -> float:
    """A small, deterministic sleep for an async run (0 to 20 ms)."""
    return (zlib.crc32(repr(message).encode()) % 21) / 1000


class Node(pachyderm.Entity):
    """A plain handler. Messages:

    - ("call", cid, actions, bad) from a client: records cid, then each action: ("pay", path,
      amount) debits and sends ("credit", ...) along ``path`` (a chain: each hop passes the money
      on); ("note", target, dead) sends a note (a dead one is rejected: a dead letter; "slow":
      an ``ANode`` times out on it); ("slow",) makes an ``ANode`` time out on the call;
      ("tick", base, seconds, named, repeat) arms a timer to itself (that re-arms itself
      ``repeat`` times); ("retick", base, seconds) replaces the latest named one of ``base``;
      ("untick", base) cancels it. ``bad``: the call is rejected.
    - ("credit", sender, seq, amount, rest), ("note", sender, seq, dead): from another node,
      numbered per (sender, receiver) pair; recorded in ``got``.
    - ("tick", tid, gen, named, repeat, seconds): a timer fired. ``tlog`` records every arm,
      cancel and fire, in order: the check replays it.
    """

    name = "fuzz.Node"

    def init(self) -> dict[str, Any]:
        return {"bal": OPEN, "calls": [], "got": [], "out": {}, "dead_out": {}, "tlog": [],
                "gen": {}, "named": []}  # fmt: skip

    def activate(self, message: Any, state: dict[str, Any]) -> Any:
        return _apply(self, message, state)


class ANode(pachyderm.Entity):
    """``Node`` as an ``async def`` handler: it sleeps a little first (a "slow" note: too long)."""

    name = "fuzz.ANode"

    def init(self) -> dict[str, Any]:
        return Node.init(self)  # type: ignore[arg-type]

    async def activate(self, message: Any, state: dict[str, Any]) -> Any:
        await asyncio.sleep(_delay(message))
        if (message[0] == "note" and message[3] == "slow") or (
            message[0] == "call" and ("slow",) in message[2]
        ):
            await asyncio.sleep(SLOW)  # beyond activation_timeout: a Timeout, a dead letter
        return _apply(self, message, state)


TYPES: dict[str, type[pachyderm.Entity]] = {"Node": Node, "ANode": ANode}

# ---------------------------------------------------------------------------------------------
# The scenario driver


class Client:
    """Client calls, retried on Indeterminate/Unavailable/Overloaded.

    A keyed call is retried with the same key and the same message (its id ``cid``); an unkeyed
    one as a new call (its id ``cid#n``). ``answers[id]``: every answer each attempt of the call
    of that id got (a state or an error). ``twins``: a keyed call may be sent twice at once (a
    client that double-sends), both attempts sharing the key's one outcome. ``deadline``: calls
    get a ``timeout`` (a ``Timeout`` answer is final: nothing committed).
    """

    RETRY = (pachyderm.Indeterminate, pachyderm.Unavailable, pachyderm.Overloaded)

    def __init__(
        self, sim: Simulation, rng: random.Random, *, twins: bool = False, deadline: bool = False
    ) -> None:
        self.sim = sim
        self.rng = rng
        self.twins = twins
        self.deadline = deadline
        self.waiting: dict[tuple[str, int], tuple[Any, str, Any, Pending]] = {}
        self.answers: dict[str, list[Any]] = {}
        self.keyed: dict[str, bool] = {}
        self.tries: Counter[str] = Counter()
        self.twinned = 0

    def submit(self, ref: Any, cid: str, actions: list[Any], bad: bool, keyed: bool) -> None:
        self.keyed[cid] = keyed
        self._send(ref, cid, (actions, bad))
        if keyed and self.twins and self.rng.random() < 0.3:
            self.twinned += 1
            self._send(ref, cid, (actions, bad))

    def _send(self, ref: Any, cid: str, body: Any) -> None:
        self.tries[cid] += 1
        call_id = cid if self.keyed[cid] else f"{cid}#{self.tries[cid]}"
        self.answers.setdefault(call_id, [])
        key = cid if self.keyed[cid] else None
        client = f"c{self.rng.randrange(3)}"
        timeout = None
        if self.deadline and self.rng.random() < 0.3:
            timeout = self.rng.choice([0.005, 0.02, 0.1, 0.5])
        message = ("call", call_id, *body)
        pending = self.sim.submit(ref, message, idempotency_key=key, client=client, timeout=timeout)
        self.waiting[(cid, self.tries[cid])] = (ref, call_id, body, pending)

    def collect(self) -> None:
        """Read the answers; resubmit the retryable ones."""
        for attempt, (ref, call_id, body, pending) in list(self.waiting.items()):
            if not pending.done():
                continue
            del self.waiting[attempt]
            error = pending.exception()
            self.answers[call_id].append(pending.result() if error is None else error)
            if isinstance(error, self.RETRY) and self.tries[attempt[0]] < 40:
                self._send(ref, attempt[0], body)


def _ref(name: str) -> tuple[type[pachyderm.Entity], str]:
    kind, key = name.split("/")
    return (TYPES[kind], key)


class Scenario:
    """One seed's world: nodes, calls, faults, crashes and restarts, then the checks."""

    def __init__(
        self,
        seed: int,
        *,
        restarts: bool = True,
        heavy: bool = False,
        twins: bool = False,
        deadline: bool = False,
        storage: bool = False,
        fanin: bool = False,
        intense: bool = False,
    ) -> None:
        self.seed = seed
        rng = self.rng = random.Random(seed * 7919 + 17)
        self.restarts_allowed = restarts
        self.twins = twins  # concurrent attempts of one key
        self.deadline = deadline
        self.fanin = fanin  # several senders, one receiver (fan-in), with sequence numbers
        self.nodes = [
            f"{rng.choice(['Node', 'ANode'])}/n{i}"
            for i in range(rng.randint(2, 5 if heavy else 4))
        ]
        self.timeout = rng.random() < 0.5
        self.options: dict[str, Any] = {
            "mailbox_size": rng.randint(1, 3),
            "activation_timeout": ACTIVATION_TIMEOUT if self.timeout else None,
        }
        if rng.random() < 0.3:
            self.options["turn_budget"] = rng.randint(1, 3)
        if rng.random() < 0.3:
            self.options["max_batch"] = rng.randint(1, 3)
        if rng.random() < 0.2:
            self.options["max_resident"] = rng.randint(1, 3)
        if rng.random() < 0.2:
            self.options["idle_after"] = rng.choice([0.1, 0.5])
        p = rng.choice([0.0, 0.05, 0.15])
        self.faults = Faults(
            duplicate=rng.choice([0.0, 0.2, 0.4]),
            delay=rng.choice([0.0, 0.2]),
            max_delay=rng.choice([0.1, 1.0]),
            crash_before_commit=p,
            crash_after_commit=rng.choice([0.0, p, 0.1]),
        )
        self.calls = rng.randint(4, 14 if heavy else 10)
        if intense:  # more of everything
            self.calls *= 3
            self.faults = Faults(
                duplicate=0.5, delay=0.3, max_delay=0.2, crash_before_commit=0.25,
                crash_after_commit=0.25,
            )  # fmt: skip
        self.storage = storage  # storage that fails now and then (Unavailable)
        self.storage_p = rng.choice([0.03, 0.1])
        self.storage_failures = 0
        self.dead_letters_counted = 0
        self.bases: list[str] = []  # timers armed (maybe): re-armed or cancelled by later calls
        self.restarted = 0
        self.seen: Counter[str] = Counter()  # what this run exercised

    def target(self) -> list[str]:
        if self.fanin and self.rng.random() < 0.8:
            return self.nodes[0].split("/")  # most messages go to one receiver
        return self.rng.choice(self.nodes).split("/")

    def actions(self) -> list[Any]:
        rng = self.rng
        out: list[Any] = []
        for _ in range(rng.randint(0, 3)):
            r = rng.random()
            if r < 0.5:
                path = [self.target() for _ in range(rng.randint(1, 3))]
                out.append(("pay", path, rng.randint(1, 20)))
            elif r < 0.8:
                target = self.target()
                dead: Any = False
                roll = rng.random()
                if roll < 0.1:
                    dead = True
                elif roll < 0.2 and self.timeout and target[0] == "ANode":
                    dead = "slow"
                out.append(("note", target, dead))
            elif r < 0.85:
                if self.timeout:
                    out.append(("slow",))
            elif r < 0.93 or not self.bases:
                base = f"k{rng.randrange(10**9)}"
                self.bases.append(base)
                seconds = rng.choice([0.0, 0.01, 0.3, 2.0, 90.0])
                repeat = rng.choice([0, 0, 0, 1, 3])
                out.append(("tick", base, seconds, rng.random() < 0.5, repeat))
            elif r < 0.97:
                out.append(("retick", rng.choice(self.bases), rng.choice([0.0, 0.05, 1.0])))
            else:
                out.append(("untick", rng.choice(self.bases)))
        return out

    def unreliable(self, sim: Simulation) -> None:
        """The storage says Unavailable (nothing done) now and then: commits, loads, checks."""
        backend = sim.backend
        rng = random.Random(self.seed)  # its own: the scenario's draws stay the same
        p = self.storage_p

        def failing(method: Any) -> Any:
            async def call(*args: Any, **kwargs: Any) -> Any:
                if self.storage and rng.random() < p:
                    self.storage_failures += 1
                    backend.crashed = {}  # as a commit does first (the history reads it)
                    raise pachyderm.Unavailable(f"{method.__name__}: storage away (simulated)")
                return await method(*args, **kwargs)

            return call

        for name in ("commit", "load_many", "exists", "receipt"):
            setattr(backend, name, failing(getattr(backend, name)))

    def restart(self, sim: Simulation) -> None:
        self.dead_letters_counted += sim.world.statistics()["dead_letters"]  # type: ignore[operator]
        self.restarted += 1
        sim.restart()

    def chaos(self, sim: Simulation) -> None:
        """Between steps: an on-demand fault, sometimes a restart."""
        rng = self.rng
        r = rng.random()
        ref = _ref(rng.choice(self.nodes))
        if r < 0.1:
            sim.crash_commit(after=rng.random() < 0.5, ref=ref if rng.random() < 0.7 else None)
        elif r < 0.15:
            sim.duplicate(to=ref)
        elif r < 0.2:
            sim.delay(rng.choice([0.005, 0.05, 0.5]), to=ref)
        elif r < 0.26 and self.restarts_allowed:
            self.restart(sim)

    def run(self) -> None:
        rng = self.rng
        with Simulation([Node, ANode], seed=self.seed, faults=self.faults, **self.options) as sim:
            client = Client(sim, rng, twins=self.twins, deadline=self.deadline)
            if self.storage:
                self.unreliable(sim)
            for i in range(self.calls):
                cid = f"c{i}"
                ref = _ref(rng.choice(self.nodes[1:] if self.fanin else self.nodes))
                bad = rng.random() < 0.05
                client.submit(ref, cid, self.actions(), bad, rng.random() < 0.8)
                if rng.random() < 0.5:
                    sim.advance(rng.choice([0.0, 0.001, 0.005, 0.02]))
                    self.chaos(sim)
                    client.collect()
            self.settle(sim, client, chaos=True)
            sim.run(max_time=600)  # everything comes to rest by itself
            client.collect()
            assert not client.waiting
            self.storage = False  # the checks read reliably
            self.check(sim, client)

    def settle(self, sim: Simulation, client: Client, *, chaos: bool) -> None:
        """Step time until every call has its final answer (retrying), with chaos at first."""
        rounds = 0
        while client.waiting:
            rounds += 1
            assert rounds < 3000, f"seed {self.seed}: calls never answered"
            sim.advance(self.rng.choice([0.001, 0.005, 0.02, 0.1]))
            self.seen["held"] += bool(sim.pending()["held"])
            if chaos and rounds < 30:
                self.chaos(sim)
            client.collect()

    # ------------------------------------------------------------------ the promises

    def check(self, sim: Simulation, client: Client) -> None:
        where = f"seed {self.seed} ({self.nodes}, {self.options}, {self.faults})"
        states = {name: sim.read(_ref(name)) for name in self.nodes}
        # Money is conserved.
        assert sum(s["bal"] for s in states.values()) == OPEN * len(self.nodes), where
        # Each message applied once, in order per pair (dead ones: never applied).
        for receiver, state in states.items():
            for sender, sstate in states.items():
                sent = sstate["out"].get(receiver, 0)
                dead = set(sstate["dead_out"].get(receiver, []))
                got = [seq for s, seq in state["got"] if s == sender]
                assert got == [n for n in range(sent) if n not in dead], (
                    f"{where}: {sender} -> {receiver}: sent {sent} (dead {sorted(dead)}), "
                    f"applied {got}"
                )
        # Each timer fired once, unless replaced (only the new one fires) or cancelled first.
        for name, state in states.items():
            pending: dict[str, int | None] = {}
            for tid, event, gen in state["tlog"]:
                if event == "arm":
                    pending[tid] = gen
                elif event == "cancel":
                    pending[tid] = None
                else:
                    assert pending.get(tid) == gen, f"{where}: {name} {tid} fired {gen}: {pending}"
                    pending[tid] = None
            assert not any(g is not None for g in pending.values()), f"{where}: {name} {pending}"
        # Client calls: a state once, Unavailable & co never, Indeterminate at most once.
        applied = Counter(cid for s in states.values() for cid in s["calls"])
        assert max(applied.values(), default=0) <= 1, f"{where}: a call applied twice {applied}"
        for cid, answers in client.answers.items():
            states_seen = [a for a in answers if not isinstance(a, BaseException)]
            if states_seen:
                assert applied[cid] == 1, (
                    f"{where}: {cid} answered {answers}, applied {applied[cid]}"
                )
                for state in states_seen:
                    assert cid in state["calls"], f"{where}: {cid}'s answer lacks it"
            elif not any(isinstance(a, pachyderm.Indeterminate) for a in answers):
                assert applied[cid] == 0, f"{where}: {cid} answered {answers} but applied"
        self.check_history(sim, states, where)
        seen = self.seen
        seen["restarts"] += self.restarted
        seen["storage failures"] += self.storage_failures
        seen["twins"] += client.twinned
        for kind in ("crash", "duplicated", "delayed"):
            seen[kind] += sum(kind in text for text in sim.injected)
        seen["timers fired"] += sum(e == "fire" for s in states.values() for _, e, _ in s["tlog"])
        for answers in client.answers.values():
            seen.update(type(a).__name__ for a in answers if isinstance(a, BaseException))
        # Nothing left anywhere; the counters agree with storage.
        assert sim.quiet(), where
        stats = sim.statistics()
        outbox = stats["outbox"]
        assert outbox["messages"] == 0, f"{where}: {outbox}"  # type: ignore[index]
        assert outbox["timers"] == 0, f"{where}: {outbox}"  # type: ignore[index]
        assert stats["held"] == 0, where
        expected_dead = sum(len(v) for s in states.values() for v in s["dead_out"].values())
        assert outbox["dead"] == expected_dead, f"{where}: {outbox} vs {expected_dead}"  # type: ignore[index]
        self.seen["dead"] += expected_dead
        self.seen["conflicts"] += stats["conflicts"]  # type: ignore[operator]
        counted = self.dead_letters_counted + stats["dead_letters"]  # type: ignore[operator]
        # The counters are exact, lost replies included; only a restart may lose the count of a
        # dead letter or timer whose reply was lost (nobody reloads it in that world).
        if not self.restarted:
            assert counted == expected_dead, f"{where}: {counted} dead letters counted"
            fired = sum(e == "fire" for s in states.values() for _, e, _ in s["tlog"])
            assert stats["timers_fired"] == fired, f"{where}: {stats['timers_fired']} fired"

    def check_history(self, sim: Simulation, states: dict[str, Any], where: str) -> None:
        """The simulation's history agrees with storage: what committed, once, in order."""
        space = sim.backend._spaces["default"]
        for name, state in states.items():
            info, key = sim.world._registry.resolve(_ref(name))
            row = space.rows.get(info.name, {}).get(key)
            steps = [s for s in sim.steps(_ref(name)) if s.version is not None]
            # One committed step per version, in order (coalesced writes included).
            assert [s.version for s in steps] == list(range(1, 1 + (row.version if row else 0))), (
                f"{where}: {name} history versions"
            )
            calls = Counter(s.message[1] for s in steps if s.sender is None)
            assert calls == Counter(state["calls"]), f"{where}: {name} calls in the history"
            messages = Counter((s.sender, repr(s.message)) for s in steps if s.sender is not None)
            assert all(n == 1 for n in messages.values()), f"{where}: {name} {messages}"


def sweep(seeds: Iterable[int], **kwargs: Any) -> Counter[str]:
    """Run a scenario per seed; return what they exercised (summed), to check it is not vacuous."""
    seen: Counter[str] = Counter()
    for seed in seeds:
        scenario = Scenario(seed, **kwargs)
        scenario.run()
        seen.update(scenario.seen)
        seen["seeds"] += 1
    return seen


def at_least(seen: Counter[str], **minimums: int) -> None:
    """The sweep did exercise these (``seen[name] >= n``): it is not vacuous."""
    for name, n in minimums.items():
        name = name.replace("_", " ")
        assert seen[name] >= n, f"{name}: {seen[name]} < {n} in {dict(seen)}"


def test_fuzz_restarts_async_and_storage_faults() -> None:
    seen = sweep(range(200), heavy=True, twins=True, deadline=True, storage=True)
    at_least(seen, restarts=60, storage_failures=300, crash=300, duplicated=300, delayed=300)
    at_least(seen, conflicts=200, dead=20, timers_fired=100)
    at_least(seen, Indeterminate=20, Unavailable=20, Overloaded=20, Timeout=20, Rejected=20)


def test_fuzz_fan_in_to_one_receiver() -> None:
    seen = sweep(range(1000, 1100), heavy=True, fanin=True, storage=True)
    at_least(seen, restarts=30, held=100, conflicts=100)


def test_fuzz_counts_are_exact_without_restarts() -> None:
    # Also twin calls: one idempotency key sent twice at once.
    seen = sweep(range(2000, 2150), restarts=False, twins=True, deadline=True)
    at_least(seen, twins=80, timers_fired=80, Timeout=20)


def test_fuzz_intense_faults() -> None:
    seen = sweep(range(3000, 3050), intense=True, storage=True)
    at_least(seen, crash=900, restarts=30, storage_failures=300)


# ---------------------------------------------------------------------------------------------
# Regressions: the bugs the sweeps found, shrunk by hand to deterministic repros (all fixed)


@pytest.mark.parametrize("kind", ["dead letter", "timer"])
def test_a_dead_letter_or_timer_is_counted_once_after_lost_replies(kind: str) -> None:
    with Simulation([Node], seed=1) as sim:
        receiver = (Node, "r")
        if kind == "timer":
            sim.activate(receiver, ("call", "c1", [("tick", "t", 10.0, False, 0)], False))
        sim.duplicate(to=receiver)  # the row arrives twice
        # The first copy's commit applies the row and its reply is lost: the reload finds the
        # row gone and counts it (right). The second copy runs; its commit would lose (the row
        # is gone) but crashes before anything is written: its reload finds the row gone too,
        # and counts it again.
        sim.crash_commit(after=True, ref=receiver)
        sim.crash_commit(after=False, ref=receiver)
        if kind == "dead letter":
            sim.activate((Node, "s"), ("call", "c1", [("note", ["Node", "r"], True)], False))
        sim.run()
        stats = sim.statistics()
        assert sum("crash" in text for text in sim.injected) == 2
        if kind == "dead letter":
            assert stats["outbox"] == {"messages": 0, "timers": 0, "dead": 1}
            assert stats["dead_letters"] == 1  # 2
        else:
            assert [e for _, e, _ in sim.read(receiver)["tlog"]] == ["arm", "fire"]
            assert stats["timers_fired"] == 1  # 2


def test_a_message_held_behind_a_failing_call_is_delivered() -> None:
    with Simulation([Node, ANode], seed=1, mailbox_size=1) as sim:
        receiver = (ANode, "r")
        refused = sim.submit(receiver, ("call", "c1", [], True))  # Rejected, after a sleep
        sim.advance(0.001)  # its handler is sleeping: the receiver's mailbox is full
        sim.activate((Node, "s"), ("call", "c2", [("note", ["ANode", "r"], False)], False))
        sim.run_until_idle()
        assert sim.pending()["held"] == 1  # the note waits for room
        sim.advance(1.0)
        assert isinstance(refused.exception(), pachyderm.Rejected)  # nothing to commit
        # The note stays held (and in the outbox) forever: run() raises "still busy".
        sim.run(max_time=600)
        assert sim.read(receiver)["got"] == [["Node/s", 0]]


class Sleepy(pachyderm.Entity):
    """An async handler that sleeps ``message`` seconds, then appends it."""

    name = "fuzz.Sleepy"

    def init(self) -> list[Any]:
        return []

    async def activate(self, message: Any, state: list[Any]) -> Any:
        await asyncio.sleep(message)
        return [*state, message]


def test_a_call_answered_timeout_is_not_committed() -> None:
    with Simulation([Sleepy], seed=1) as sim:
        # The handler's sleep ends 0.1 ns before the call's deadline: both fire in one turn of
        # the loop (within its clock resolution), the sleep first. (Without virtual time the
        # window is the two loop iterations between the task's end and _finish_async's.)
        pending = sim.submit((Sleepy, "s"), 0.05 - 1e-10, timeout=0.05)
        sim.run()
        assert isinstance(pending.exception(), pachyderm.Timeout)  # "nothing committed"
        assert sim.read((Sleepy, "s")) == []  # [0.0499999999]
        assert [s.version for s in sim.steps((Sleepy, "s"))] == [None]  # [1]


def test_restart_answers_a_call_waiting_for_another_call_with_its_key() -> None:
    with Simulation([Sleepy], seed=1) as sim:
        first = sim.submit((Sleepy, "s"), 0.05, idempotency_key="k", client="a")
        sim.advance(0.01)
        second = sim.submit((Sleepy, "s"), 0.05, idempotency_key="k", client="b")
        sim.advance(0.01)  # it waits for the first's outcome
        sim.restart()
        sim.run()
        try:
            assert isinstance(first.exception(), pachyderm.Unavailable)  # it was running
            assert second.done()  # never, not even after close(): its task is left pending
        finally:
            for task in asyncio.all_tasks(sim._loop):  # no "Task was destroyed" at exit
                task.cancel()
            sim.run_until_idle()


def test_messages_of_a_doubtful_commit_are_delivered_when_the_reload_fails() -> None:
    with Simulation([Node], seed=1) as sim:
        sender = (Node, "s")
        load_many = sim.backend.load_many
        loads = []

        async def failing_reload(refs: Any) -> Any:
            if ("fuzz.Node", "s") in refs:
                loads.append(refs)
                if len(loads) == 2:  # the reload after the doubtful commit
                    raise pachyderm.Unavailable("the database is away (simulated)")
            return await load_many(refs)

        sim.backend.load_many = failing_reload  # type: ignore[method-assign]
        sim.crash_commit(after=True, ref=sender)  # it commits; the reply is lost
        with pytest.raises(pachyderm.Indeterminate):
            sim.activate(sender, ("call", "c1", [("note", ["Node", "r"], False)], False))
        # The note is stored in the outbox, and nothing will ever deliver it.
        sim.run(max_time=600)
        assert sim.read((Node, "r"))["got"] == [["Node/s", 0]]
