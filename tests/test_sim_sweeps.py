"""Seed sweeps of what ``test_sim_fuzz`` and ``test_sim_semantics`` leave out.

- **Followers** across faults, conflicts, passivation and restarts: strictly increasing versions,
  each recorded state the one stored at that version, the last one the final state.
- **Passivation** (``max_resident`` 1..3, ``idle_after`` small) with messages, timers, held
  queues and doubtful commits in flight: applied once, in order per pair; the world rests.
- **Workers** (``pachyderm.Worker``) inside the simulation, with faults and restarts: each task
  performed for its key, reported once.
- **Named timers** re-armed and cancelled by writes that crash (before or after the commit): a
  cancelled one never fires, a re-armed one fires once (its newest arming).
- **Idempotency keys** across restarts and ``receipt_ttl``: a retry within the window gets the
  first result and is not applied again.

Every sweep also checks that its faults happened (it is not vacuous).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest

import pachyderm
from pachyderm import Update, after, cancel, send
from pachyderm.testing import Faults, Pending, Simulation

RETRY = (pachyderm.Indeterminate, pachyderm.Unavailable, pachyderm.Overloaded)

# ---------------------------------------------------------------------------------------------
# Entities


class Hub(pachyderm.Entity):
    """("call", cid, targets, tick): records cid, sends ("msg", me, seq) to each Hub target,
    numbered per (sender, receiver) pair, and arms an unnamed timer ("tick", cid) if ``tick`` is
    a number. ("msg", sender, seq) records [sender, seq]; ("tick", cid) records cid."""

    name = "sweep.Hub"

    def init(self) -> dict[str, Any]:
        return {"calls": [], "got": [], "out": {}, "ticks": [], "armed": []}

    def activate(self, message: Any, state: dict[str, Any]) -> Any:
        kind = message[0]
        if kind == "call":
            _, cid, targets, tick = message
            state["calls"].append(cid)
            effects: list[Any] = []
            for target in targets:
                seq = state["out"].get(target, 0)
                state["out"][target] = seq + 1
                effects.append(send(_hub(target), ("msg", self.key, seq)))
            if tick is not None:
                state["armed"].append(cid)
                effects.append(after(tick, ("tick", cid)))
            return Update(state, *effects)
        if kind == "msg":
            state["got"].append([message[1], message[2]])
        elif kind == "tick":
            state["ticks"].append(message[1])
        return state


class AHub(pachyderm.Entity):
    """``Hub`` as an ``async def`` handler that takes a little virtual time (keys "a...")."""

    name = "sweep.AHub"

    def init(self) -> dict[str, Any]:
        return Hub.init(self)  # type: ignore[arg-type]

    async def activate(self, message: Any, state: dict[str, Any]) -> Any:
        await asyncio.sleep(0.001 * (len(repr(message)) % 7))
        return Hub.activate(self, message, state)  # type: ignore[arg-type]


def _hub(key: str) -> tuple[type[pachyderm.Entity], str]:
    return (AHub if key.startswith("a") else Hub, key)


class Alarm(pachyderm.Entity):
    """Named timers. ("arm", cid, name, seconds) arms ``name`` (generation ``cid``);
    ("cancel", cid, name) cancels it; ("fire", name, gen) records that it fired."""

    name = "sweep.Alarm"

    def init(self) -> dict[str, Any]:
        return {"log": []}

    def activate(self, message: Any, state: dict[str, Any]) -> Any:
        kind = message[0]
        if kind == "arm":
            _, cid, name, seconds = message
            state["log"].append(["arm", name, cid])
            return Update(state, after(seconds, ("fire", name, cid), name=name))
        if kind == "cancel":
            _, cid, name = message
            state["log"].append(["cancel", name, cid])
            return Update(state, cancel(name))
        _, name, gen = message
        state["log"].append(["fire", name, gen])
        return state


class Ledger(pachyderm.Entity):
    """("add", cid, n): appends cid and adds n. Each application is visible in ``applied``."""

    name = "sweep.Ledger"

    def init(self) -> dict[str, Any]:
        return {"total": 0, "applied": []}

    def activate(self, message: Any, state: dict[str, Any]) -> Any:
        _, cid, n = message
        state["total"] += n
        state["applied"].append(cid)
        return state


class Payments(pachyderm.Entity):
    """{"due": {id: cents}, "paid": {id: receipt}}: ("pay", id, cents), ("paid", id, receipt)."""

    name = "sweep.Payments"

    def init(self) -> dict[str, Any]:
        return {"due": {}, "paid": {}}

    def activate(self, message: Any, state: dict[str, Any]) -> Any:
        kind, pid, value = message
        if kind == "pay":
            if pid not in state["due"] and pid not in state["paid"]:
                state["due"][pid] = value
        elif state["due"].pop(pid, None) is not None:
            state["paid"][pid] = value
        return state


ENTITIES = [Hub, AHub, Alarm, Ledger, Payments]

# ---------------------------------------------------------------------------------------------
# Helpers


class Calls:
    """Client calls, each retried with its idempotency key until it has a final answer."""

    def __init__(self, sim: Simulation, rng: random.Random) -> None:
        self.sim = sim
        self.rng = rng
        self.waiting: dict[str, tuple[Any, Any, Pending]] = {}
        self.results: dict[str, Any] = {}
        self.errors: Counter[str] = Counter()

    def submit(self, ref: Any, cid: str, message: Any) -> None:
        client = f"c{self.rng.randrange(3)}"
        pending = self.sim.submit(ref, message, idempotency_key=cid, client=client)
        self.waiting[cid] = (ref, message, pending)

    def collect(self) -> None:
        for cid, (ref, message, pending) in list(self.waiting.items()):
            if not pending.done():
                continue
            error = pending.exception()
            if error is None:
                self.results[cid] = pending.result()
                del self.waiting[cid]
            elif isinstance(error, RETRY):
                self.errors[type(error).__name__] += 1
                self.submit(ref, cid, message)
            else:
                raise error

    def settle(self, step: Any = None, rounds: int = 3000) -> None:
        for _ in range(rounds):
            if not self.waiting:
                return
            if step is not None:
                step()
            self.sim.advance(self.rng.choice([0.001, 0.01, 0.1]))
            self.collect()
        raise AssertionError(f"calls never answered: {sorted(self.waiting)}")


def stored_version(sim: Simulation, ref: Any) -> int:
    info, key = sim.world._registry.resolve(ref)
    row = sim.backend._spaces["default"].rows.get(info.name, {}).get(key)
    return 0 if row is None else row.version


def committed(sim: Simulation, ref: Any) -> dict[int, Any]:
    """version -> the state committed at it, from the simulation's history (one per version)."""
    out: dict[int, Any] = {}
    for step in sim.steps(ref):
        if step.version is not None:
            assert step.version not in out, f"{ref}: two committed steps at v{step.version}"
            out[step.version] = step.result
    return out


class Counts:
    """Counters of one sweep, summed over its seeds and over the worlds of each restart."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()

    def world(self, sim: Simulation) -> None:
        """Count what the current world did (call before each restart and at the end)."""
        stats = sim.statistics()
        for name in ("passivated", "conflicts", "redelivered", "timers_fired"):
            self.seen[name] += stats[name]  # type: ignore[operator]
        self.seen["held_now"] += stats["held"]  # type: ignore[operator]

    def faults(self, sim: Simulation) -> None:
        for kind in ("crash before", "crash after", "duplicated", "delayed", "restart"):
            self.seen[kind] += sum(kind in text for text in sim.injected)

    def at_least(self, **minimums: int) -> None:
        for name, n in minimums.items():
            name = name.replace("_", " ")
            assert self.seen[name] >= n, f"{name}: {self.seen[name]} < {n} in {dict(self.seen)}"


# ---------------------------------------------------------------------------------------------
# 1 and 2. Followers and passivation, with messages and timers in flight


def hub_scenario(seed: int, counts: Counts) -> None:
    rng = random.Random(seed * 104729 + 3)
    keys = [f"{rng.choice('ha')}{i}" for i in range(rng.randint(3, 5))]
    options: dict[str, Any] = {
        "max_resident": rng.randint(1, 3),
        "idle_after": rng.choice([0.01, 0.05, 0.2, 1.0]),
        "mailbox_size": rng.randint(1, 4),
    }
    if rng.random() < 0.6:
        options["follower_buffer"] = rng.randint(1, 3)
    faults = Faults(
        duplicate=rng.choice([0.0, 0.2, 0.4]),
        delay=rng.choice([0.0, 0.2]),
        max_delay=rng.choice([0.05, 0.5]),
        crash_before_commit=rng.choice([0.0, 0.05, 0.1]),
        crash_after_commit=rng.choice([0.0, 0.05, 0.1]),
    )
    with Simulation(ENTITIES, seed=seed, faults=faults, **options) as sim:
        refs = [_hub(k) for k in keys]
        # Followers from the start, and others that come (with a `since`) and go mid-run.
        recordings: list[tuple[Any, Any]] = [
            (ref, sim.follow(ref, versions=True)) for ref in refs[: rng.randint(1, 3)]
        ]
        calls = Calls(sim, rng)

        def chaos() -> None:
            r = rng.random()
            if r < 0.08:
                sim.crash_commit(after=rng.random() < 0.5, ref=rng.choice(refs))
            elif r < 0.12:
                sim.duplicate(to=rng.choice(refs))
            elif r < 0.16:
                sim.delay(rng.choice([0.01, 0.3]), to=rng.choice(refs))
            elif r < 0.25:
                counts.world(sim)
                sim.restart()
            elif r < 0.3:
                ref = rng.choice(refs)
                since = rng.choice(
                    [None, 0, stored_version(sim, ref), stored_version(sim, ref) + 3]
                )
                recordings.append((ref, sim.follow(ref, since=since, versions=True)))
            elif r < 0.33 and recordings:
                recordings[rng.randrange(len(recordings))][1].close()

        for i in range(rng.randint(6, 14)):
            targets = [rng.choice(keys) for _ in range(rng.randint(0, 3))]
            tick = rng.choice([None, None, 0.0, 0.02, 0.5, 3.0])
            calls.submit(rng.choice(refs), f"c{i}", ("call", f"c{i}", targets, tick))
            sim.advance(rng.choice([0.0, 0.005, 0.05, 0.3]))  # residents go idle and leave
            chaos()
            calls.collect()
        calls.settle(step=lambda: chaos() if rng.random() < 0.3 else None)
        sim.run(max_time=3600)
        calls.collect()
        assert not calls.waiting
        counts.world(sim)
        counts.faults(sim)
        where = f"seed {seed} ({options}, {faults})"
        states = {ref: sim.read(ref) for ref in refs}
        # Everything applied once, in order per pair; every timer fired once.
        applied = Counter(cid for s in states.values() for cid in s["calls"])
        assert applied == Counter(list(calls.results)), f"{where}: calls {applied}"
        for receiver in keys:
            got = states[_hub(receiver)]["got"]
            for sender in keys:
                sent = states[_hub(sender)]["out"].get(receiver, 0)
                seqs = [n for s, n in got if s == sender]
                assert seqs == list(range(sent)), f"{where}: {sender}->{receiver} {seqs}/{sent}"
        for ref, state in states.items():
            assert sorted(state["ticks"]) == sorted(state["armed"]), f"{where}: {ref} timers"
        assert sim.quiet(), where
        # Followers: versions strictly increasing, each state the stored one, the last current.
        for ref, recording in recordings:
            history = committed(sim, ref)
            versions = [v for v, _ in recording.items]
            assert versions == sorted(set(versions)), f"{where}: {ref} versions {versions}"
            for version, state in recording.items:
                expected = history[version] if version else Hub.init(Hub(ref[1]))
                assert state == expected, f"{where}: {ref} v{version}: {state} != {expected}"
            if recording.closed:
                counts.seen["closed"] += 1
                continue
            if not recording.items:  # it began up to date (since=current), nothing since
                assert recording.last == stored_version(sim, ref), f"{where}: {ref} silent"
                counts.seen["silent"] += 1
                continue
            assert recording.items[-1] == (stored_version(sim, ref), states[ref]), where
            counts.seen["followed"] += len(versions)
            counts.seen["skipped"] += stored_version(sim, ref) + 1 - len(versions)
        counts.seen["timers"] += sum(len(s["ticks"]) for s in states.values())
        counts.seen["messages"] += sum(len(s["got"]) for s in states.values())


def test_followers_and_passivation_with_messages_and_timers_in_flight() -> None:
    counts = Counts()
    for seed in range(300):
        hub_scenario(seed, counts)
    counts.at_least(passivated=3000, conflicts=800, restart=200, redelivered=600)
    counts.at_least(crash_before=400, crash_after=400, duplicated=1200, delayed=900)
    counts.at_least(followed=3500, skipped=400, closed=50, timers=1300, messages=3000)


# ---------------------------------------------------------------------------------------------
# 3. Workers inside the simulation


def worker_scenario(seed: int, counts: Counts) -> None:
    rng = random.Random(seed * 7 + 1)
    faults = Faults(
        crash_before_commit=rng.choice([0.05, 0.15]), crash_after_commit=rng.choice([0.05, 0.15])
    )
    options: dict[str, Any] = {"idle_after": rng.choice([0.05, 1.0, 60.0])}
    with Simulation(ENTITIES, seed=seed, faults=faults, **options) as sim:
        ref = (Payments, "shop")
        performed: Counter[str] = Counter()  # calls of the service, by key
        charged: dict[str, int] = {}  # the service charges once per key

        async def perform(pid: str, cents: int) -> str:
            performed[pid] += 1
            await asyncio.sleep(rng.choice([0.0, 0.001, 0.02]))
            charged.setdefault(pid, cents)
            if rng.random() < 0.2:
                raise ConnectionError("the answer was lost (simulated)")
            return f"receipt-{pid}"

        def start() -> tuple[pachyderm.Worker, asyncio.Task[None]]:
            worker = pachyderm.Worker(
                sim.world,
                ref,
                tasks=lambda state: state["due"],
                perform=perform,
                report=lambda pid, receipt: ("paid", pid, receipt),
                concurrency=rng.randint(1, 4),
                retry_delay=0.01,
                max_retry_delay=0.1,
            )
            return worker, sim._loop.create_task(worker.run())

        _, task = start()
        calls = Calls(sim, rng)
        workers = 1
        n = rng.randint(5, 15)
        for i in range(n):
            calls.submit(ref, f"pay-p{i}", ("pay", f"p{i}", 100 + i))
            sim.advance(rng.choice([0.0, 0.005, 0.03]))
            calls.collect()
            if rng.random() < 0.15:
                counts.world(sim)
                task.cancel()
                sim.restart()
                _, task = start()
                workers += 1
        calls.settle()
        for _ in range(2000):
            if not sim.read(ref)["due"]:
                break
            sim.advance(0.05)
        task.cancel()
        sim.run_until_idle()
        counts.world(sim)
        counts.faults(sim)
        where = f"seed {seed} ({faults}, {options})"
        state = sim.read(ref)
        ids = {f"p{i}" for i in range(n)}
        assert state["due"] == {}, where
        assert state["paid"] == {pid: f"receipt-{pid}" for pid in ids}, where
        assert charged == {f"p{i}": 100 + i for i in range(n)}, where
        # Each report applied once: one committed "paid" step per task.
        reports = Counter(
            s.message[1] for s in sim.steps(ref) if s.version is not None and s.message[0] == "paid"
        )
        assert reports == Counter(ids), f"{where}: {reports}"
        sim.run(max_time=600)
        counts.seen["workers"] += workers
        counts.seen["repeated"] += sum(performed.values()) - n
        counts.seen["tasks"] += n


def test_a_worker_in_the_simulation_performs_and_reports_each_task_once() -> None:
    counts = Counts()
    for seed in range(100):
        worker_scenario(seed, counts)
    counts.at_least(workers=180, repeated=350, tasks=700, crash_before=120, crash_after=120)


# ---------------------------------------------------------------------------------------------
# 4. Named timers re-armed and cancelled by doubtful commits


def check_timer_log(log: list[list[Any]], where: str) -> Counter[str]:
    """Replay an Alarm's log: each fire is the newest arming of its name, once; nothing left."""
    armed: dict[str, Any] = {}
    seen: Counter[str] = Counter()
    for kind, name, gen in log:
        seen[kind] += 1
        if kind == "arm":
            armed[name] = gen
        elif kind == "cancel":
            armed[name] = None
        else:
            assert armed.get(name) == gen, f"{where}: {name} fired {gen}, armed {armed}"
            armed[name] = None
    assert not [g for g in armed.values() if g is not None], f"{where}: never fired {armed}"
    return seen


def alarm_scenario(seed: int, counts: Counts) -> None:
    rng = random.Random(seed * 31 + 5)
    options: dict[str, Any] = {}
    if rng.random() < 0.5:
        options["max_resident"] = rng.randint(1, 2)
        options["idle_after"] = rng.choice([0.01, 0.1])
    faults = Faults(duplicate=rng.choice([0.0, 0.3]), delay=rng.choice([0.0, 0.3]), max_delay=0.2)
    with Simulation(ENTITIES, seed=seed, faults=faults, **options) as sim:
        refs = [(Alarm, f"a{i}") for i in range(rng.randint(1, 3))]
        names = ["x", "y"]
        calls = Calls(sim, rng)
        target: dict[str, Any] = {}
        for i in range(rng.randint(8, 20)):
            ref = rng.choice(refs)
            cid = f"c{i}"
            if rng.random() < 0.6:  # the write that re-arms or cancels crashes
                sim.crash_commit(after=rng.random() < 0.5, ref=ref)
            if rng.random() < 0.2:
                sim.delay(rng.choice([0.01, 0.1]), to=ref)  # maybe the timer's delivery
            if rng.random() < 0.65:
                message: Any = ("arm", cid, rng.choice(names), rng.choice([0.0, 0.01, 0.05, 0.2]))
            else:
                message = ("cancel", cid, rng.choice(names))
            target[cid] = ref
            calls.submit(ref, cid, message)
            sim.advance(rng.choice([0.0, 0.005, 0.01, 0.03]))
            if rng.random() < 0.1:
                counts.world(sim)
                sim.restart()
            calls.collect()
        calls.settle()
        sim.run(max_time=600)
        calls.collect()
        counts.world(sim)
        counts.faults(sim)
        where = f"seed {seed} ({options}, {faults})"
        for ref in refs:
            state = sim.read(ref)
            # The committed history and the state agree, and replay to a consistent log.
            history = committed(sim, ref)
            assert sorted(history) == list(range(1, stored_version(sim, ref) + 1)), where
            if history:
                assert history[max(history)] == state, where
            # Each committed fire is in the log once; a fire that ran and lost is not.
            fires = [m for m, r in sim.history(ref) if m[0] == "fire"]
            committed_fires = [list(history[v]["log"][-1]) for v in sorted(history)
                               if history[v]["log"][-1][0] == "fire"]  # fmt: skip
            assert committed_fires == [e for e in state["log"] if e[0] == "fire"], where
            counts.seen.update(check_timer_log(state["log"], f"{where} {ref}"))
            assert len(fires) >= sum(e[0] == "fire" for e in state["log"]), where
            applied = Counter(e[2] for e in state["log"] if e[0] != "fire")
            expected = Counter(c for c, r in target.items() if r == ref)
            assert applied == expected, f"{where}: {ref} applied {applied}"
            for cid in expected:  # each answer (maybe a receipt's) is a state with the call in it
                assert any(e[2] == cid and e[0] != "fire" for e in calls.results[cid]["log"]), where
        assert sim.quiet(), where


def test_named_timers_rearmed_and_cancelled_by_doubtful_commits() -> None:
    counts = Counts()
    for seed in range(200):
        alarm_scenario(seed, counts)
    counts.at_least(crash_before=600, crash_after=600, restart=200, passivated=400)
    counts.at_least(arm=1300, fire=700, cancel=700, conflicts=150, delayed=1000)


# ---------------------------------------------------------------------------------------------
# 5. Idempotency keys across restarts and receipt_ttl


def ledger_scenario(seed: int, counts: Counts) -> None:
    rng = random.Random(seed * 13 + 11)
    ttl = rng.choice([5.0, 20.0])
    faults = Faults(crash_before_commit=0.1, crash_after_commit=0.2)
    options: dict[str, Any] = {"receipt_ttl": ttl, "idle_after": rng.choice([0.5, 2.0])}
    with Simulation(ENTITIES, seed=seed, faults=faults, **options) as sim:
        ref = (Ledger, "l")
        calls = Calls(sim, rng)
        first: dict[str, Any] = {}
        for i in range(rng.randint(4, 10)):
            cid = f"k{i}"
            calls.submit(ref, cid, ("add", cid, i + 1))
            calls.settle()
            first[cid] = calls.results[cid]
            if rng.random() < 0.3:
                counts.world(sim)
                sim.restart()
            sim.advance(rng.uniform(0.0, ttl / 10))
        # Retries within the window: the first result, nothing applied again (a different
        # message with the same key too: the key names the activation).
        assert sim.now < ttl * 0.9
        for cid in first:
            if rng.random() < 0.5:
                counts.world(sim)
                sim.restart()
            if rng.random() < 0.3:
                sim.crash_commit(after=rng.random() < 0.5, ref=ref)
            calls.submit(ref, cid, ("add", cid, 1000))
            calls.settle()
            assert calls.results[cid] == first[cid], f"seed {seed}: {cid}"
        state = sim.read(ref)
        assert Counter(state["applied"]) == Counter(list(first)), f"seed {seed}: {state}"
        # Long after the window the key is forgotten: the same key runs again.
        sim.advance(3 * ttl + 61)
        calls.submit(ref, "k0", ("add", "k0", 0))
        calls.settle()
        assert sim.read(ref)["applied"].count("k0") == 2, f"seed {seed}"
        sim.run(max_time=600)
        counts.world(sim)
        counts.faults(sim)
        counts.seen["retries"] += len(first)


def test_idempotency_keys_across_restarts_and_receipt_ttl() -> None:
    counts = Counts()
    for seed in range(120):
        ledger_scenario(seed, counts)
    counts.at_least(restart=450, crash_after=180, crash_before=100, retries=600, passivated=150)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
