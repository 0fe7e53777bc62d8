"""examples/bank.py: money is conserved by a saga of event-sourced accounts and messages.

Under random concurrent transfers (Memory and SQLite), under duplicated and reordered
deliveries, crashed commits and restarts (the simulation), and across a SIGKILL (SQLite).
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pachyderm
from pachyderm import backends
from pachyderm.testing import Faults, Simulation

from ._kill import kill_after_lines

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))

from bank import Account  # noqa: E402  (the example, from examples/)

from . import _bank_child  # noqa: E402

MakeBackend = Callable[[], backends.Backend]
FUNDS = 1000


def transfers(seed: int, accounts: int, count: int) -> list[tuple[str, tuple[Any, ...]]]:
    """Random transfers ``(payer key, command)``; a few go to an account that is never open."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        payer, payee = rng.sample(range(accounts + 1), 2)
        if payer == accounts:
            payer = (payee + 1) % accounts
        out.append((f"a{payer}", ("transfer", f"t{n}", f"a{payee}", rng.randint(1, 400))))
    return out


def check_conserved(states: dict[str, dict[str, Any]], accounts: int) -> None:
    """Once every message is applied: nothing in flight, and the balances sum to the funds."""
    assert all(state["in_flight"] == 0 for state in states.values()), states
    assert all(state["balance"] >= 0 for state in states.values()), states
    opened = {key: s for key, s in states.items() if s["open"]}
    assert len(opened) == accounts
    assert sum(s["balance"] for s in states.values()) == accounts * FUNDS, states


async def events_now(world: pachyderm.World, key: str) -> list[Any]:
    """The events stored now for an account (public calls only: follow, then events)."""
    async with world.follow((Account, key), versions=True) as follower:
        version, _ = await follower.__anext__()
    out: list[Any] = []
    if version:
        async with world.events((Account, key)) as stream:
            async for seq, event in stream:
                out.append(event)
                if seq == version:
                    break
    return out


def count_transfers(logs: list[list[Any]]) -> tuple[Counter[str], Counter[str]]:
    """How many times each transfer id was debited, and settled or refunded, in the logs."""
    debited: Counter[str] = Counter()
    answered: Counter[str] = Counter()
    for log in logs:
        for event in log:
            if event[0] == "debited":
                debited[event[1]] += 1
            elif event[0] in ("settled", "refunded"):
                answered[event[1]] += 1
    return debited, answered


async def settled(world: pachyderm.World, keys: list[str]) -> dict[str, dict[str, Any]]:
    for _ in range(2000):
        counts = world.backend.outbox_counts()
        states = {key: await world.read((Account, key)) for key in keys}
        if counts["messages"] == 0 and all(s["in_flight"] == 0 for s in states.values()):
            return states
        await asyncio.sleep(0.01)
    raise AssertionError(f"the transfers did not settle: {states}")


async def test_money_is_conserved_under_random_concurrent_transfers(
    make_backend: MakeBackend,
) -> None:
    accounts = 5
    keys = [f"a{i}" for i in range(accounts + 1)]
    async with pachyderm.World(make_backend(), entities=[Account]) as world:
        for key in keys[:accounts]:
            await world.append((Account, key), ("opened",), ("deposited", FUNDS))
        plan = transfers(1, accounts, 300)
        outcomes = await asyncio.gather(
            *(world.activate((Account, payer), command) for payer, command in plan),
            return_exceptions=True,
        )
        refused = [o for o in outcomes if isinstance(o, BaseException)]
        assert all(isinstance(o, pachyderm.Rejected) for o in refused), refused
        assert 0 < len(refused) < len(plan)  # some were refused (not enough money), most not
        check_conserved(await settled(world, keys), accounts)
        # Every accepted transfer was debited once, and settled or refunded once.
        debited, answered = count_transfers([await events_now(world, key) for key in keys])
        accepted = {cmd[1] for (_, cmd), o in zip(plan, outcomes, strict=True) if o not in refused}
        assert debited == answered == Counter(accepted)


FAULTS = Faults(
    duplicate=0.2, delay=0.2, max_delay=1.0, crash_before_commit=0.05, crash_after_commit=0.05
)


def test_money_is_conserved_under_faults_and_restarts_in_the_simulation() -> None:
    accounts = 4
    keys = [f"a{i}" for i in range(accounts + 1)]
    injected = 0
    for seed in range(20):
        with Simulation([Account], seed=seed, faults=FAULTS) as sim:
            for key in keys[:accounts]:
                while True:  # a crashed commit is retried: the creation event is conditional
                    try:
                        sim.run_until_complete(
                            sim.world.append((Account, key), ("opened",), ("deposited", FUNDS))
                        )
                        break
                    except pachyderm.Indeterminate:
                        continue
                    except pachyderm.Rejected:
                        break  # the crashed one had committed
            plan = transfers(seed, accounts, 16)
            pending = [sim.submit((Account, payer), command) for payer, command in plan[:8]]
            sim.run_until_idle()
            sim.restart()  # the node dies with messages in flight, and comes back
            pending += [sim.submit((Account, payer), command) for payer, command in plan[8:]]
            sim.run()
            assert all(p.done() for p in pending)
            states = {key[1]: state for key, state in sim.states().items()}
            check_conserved(states, accounts)
            injected += bool(sim.injected)
    assert injected >= 15


async def test_money_is_conserved_across_sigkill_on_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "bank.db"
    child = str(Path(_bank_child.__file__))
    acked: list[str] = []
    for seed, kill_after in enumerate((200, 1500)):
        lines = await asyncio.to_thread(kill_after_lines, [child, str(path), str(seed)], kill_after)
        acked += [line.decode().split()[1] for line in lines]
    keys = [f"a{i}" for i in range(_bank_child.ACCOUNTS + 1)]
    async with pachyderm.World(backends.SQLite(path), entities=[Account]) as world:
        states = await settled(world, keys)  # the messages committed before the kills go on
        assert all(s["in_flight"] == 0 for s in states.values())
        assert sum(s["balance"] for s in states.values()) == _bank_child.ACCOUNTS * FUNDS
        debited, answered = count_transfers([await events_now(world, key) for key in keys])
        # Every acknowledged transfer is in the log, once; none is debited twice.
        assert set(acked) <= set(debited), set(acked) - set(debited)
        assert debited == answered
        assert max(debited.values()) == 1
