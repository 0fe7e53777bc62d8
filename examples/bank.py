"""A bank: event-sourced accounts, and transfers between them carried by messages (a saga).

An ``Account`` stores events, not states. A transfer is two local steps joined by a message:

1. the payer's command ``("transfer", id, to, cents)`` appends ``debited`` and, in the same
   commit, sends ``("credit", id, payer, cents)`` to the payee (a message of the outbox: it is
   delivered at least once and applied exactly once);
2. the payee appends ``credited`` and sends ``("settled", id, cents)`` back, or, if it is not
   open, appends ``refused`` and sends ``("refund", id, cents)`` back;
3. the payer appends ``settled`` (the money has arrived) or ``refunded`` (it is back).

No step can fail half-way: each commit holds its events and its message together. So money is
conserved: at any moment the sum of the balances plus the money in flight (debited, not yet
credited or refunded) is the money deposited, and once the messages are applied the balances
alone sum to it. ``tests/test_bank.py`` checks that under random concurrent transfers, under
duplicated and reordered deliveries, crashes and restarts (in the simulation), and under a
SIGKILL of a process on SQLite.

Run it with ``python examples/bank.py``.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from typing import Any

import pachyderm
from pachyderm import Rejected, Update, send


class Account(pachyderm.EventSourced):
    """State: ``{"open": bool, "balance": cents, "in_flight": cents debited, not yet settled}``.

    Commands: ``("deposit", cents)``, ``("transfer", id, to_key, cents)``; messages from other
    accounts: ``("credit", id, from_key, cents)``, ``("settled", id, cents)`` and
    ``("refund", id, cents)``. An account is
    created by its creation event, ``world.append((Account, key), ("opened",))``.
    """

    name = "bank.Account"
    snapshot_every = 50

    def init(self) -> dict[str, Any]:
        return {"open": False, "balance": 0, "in_flight": 0}

    def handle(self, command: Any, state: dict[str, Any]) -> Any:
        kind = command[0]
        if kind == "credit":  # a transfer arriving: taken, or sent back
            _, transfer, payer, cents = command
            if not state["open"]:
                return Update(
                    [("refused", transfer, payer, cents)],
                    send((Account, payer), ("refund", transfer, cents)),
                )
            return Update(
                [("credited", transfer, payer, cents)],
                send((Account, payer), ("settled", transfer, cents)),
            )
        if kind == "refund":
            _, transfer, cents = command
            return [("refunded", transfer, cents)]
        if kind == "settled":
            _, transfer, cents = command
            return [("settled", transfer, cents)]
        if not state["open"]:
            raise Rejected(f"account {self.key} is not open")
        if kind == "deposit":
            cents = _cents(command[1])
            return [("deposited", cents)]
        if kind == "transfer":
            _, transfer, payee, cents = command
            cents = _cents(cents)
            if payee == self.key:
                raise Rejected("a transfer to the same account")
            if state["balance"] < cents:
                raise Rejected(f"account {self.key} has {state['balance']}, not {cents}")
            return Update(
                [("debited", transfer, payee, cents)],
                send((Account, payee), ("credit", transfer, self.key, cents)),
            )
        raise Rejected(f"unknown command {kind!r}")

    def apply(self, event: Any, state: dict[str, Any]) -> dict[str, Any]:
        kind = event[0]
        balance, in_flight = state["balance"], state["in_flight"]
        if kind == "opened":
            return {**state, "open": True}
        if kind == "deposited":
            return {**state, "balance": balance + event[1]}
        if kind == "debited":
            return {**state, "balance": balance - event[3], "in_flight": in_flight + event[3]}
        if kind == "credited":
            return {**state, "balance": balance + event[3]}
        if kind == "refunded":
            return {**state, "balance": balance + event[2], "in_flight": in_flight - event[2]}
        if kind == "settled":
            return {**state, "in_flight": in_flight - event[2]}
        if kind == "refused":
            return state  # the money goes back to the payer by the refund message
        raise ValueError(f"unknown event {event!r}")


def _cents(value: Any) -> int:
    if type(value) is not int or value <= 0:
        raise Rejected(f"an amount is a positive int of cents; got {value!r}")
    return value


async def main() -> None:
    folder = tempfile.mkdtemp()
    backend = pachyderm.backends.SQLite(os.path.join(folder, "bank.db"))
    async with pachyderm.World(backend, entities=[Account]) as world:
        alice, bob = (Account, "alice"), (Account, "bob")
        for ref in (alice, bob):
            await world.append(ref, ("opened",))  # a creation event, without a command
        await world.activate(alice, ("deposit", 100))
        await world.activate(alice, ("transfer", "t1", "bob", 30))
        await world.activate(alice, ("transfer", "t2", "carol", 20))  # carol has no account
        answers = 0
        async for seq, event in world.events(alice):  # the log, then live events
            print("alice", seq, event)
            answers += event[0] in ("settled", "refunded")
            if answers == 2:
                break  # both transfers are settled or refunded
        print("alice:", await world.read(alice))
        print("bob:  ", await world.read(bob))


if __name__ == "__main__":
    asyncio.run(main())
