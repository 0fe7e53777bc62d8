"""Payments: an entity decides what to pay, a worker pays, and reports back.

The pattern of the original Pachyderm README: ``PaymentsToMake`` lists the payments that are
due (its handler is pure: it decides, it does not pay). A ``pachyderm.Worker`` follows it, pays
each one through the bank with the payment's id as the bank's idempotency key, and reports
``("paid", id, receipt)``. The worker may crash anywhere: the next one pays again with the same
key, and the bank (like every serious payment API) charges once per key.

Run it with ``python examples/payments.py``.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from typing import Any

import pachyderm


class PaymentsToMake(pachyderm.Entity):
    """State: ``{"due": {id: [to, cents]}, "paid": {id: receipt}}``."""

    name = "PaymentsToMake"

    def init(self) -> dict[str, Any]:
        return {"due": {}, "paid": {}}

    def activate(self, message: Any, state: dict[str, Any]) -> Any:
        kind, payment_id, *rest = message
        if kind == "pay":
            to, cents = rest
            if payment_id in state["due"] or payment_id in state["paid"]:
                raise pachyderm.Rejected(f"payment {payment_id} exists already")
            state["due"][payment_id] = [to, cents]
        elif kind == "paid":
            (receipt,) = rest
            if state["due"].pop(payment_id, None) is not None:  # a repeat report changes nothing
                state["paid"][payment_id] = receipt
        else:
            raise pachyderm.Rejected(f"unknown message {kind!r}")
        return state


class Bank:
    """A stand-in for a payment API: one charge per idempotency key, whatever the retries."""

    def __init__(self) -> None:
        self.charges: dict[str, tuple[str, int]] = {}
        self.calls = 0

    async def pay(self, idempotency_key: str, to: str, cents: int) -> str:
        self.calls += 1
        await asyncio.sleep(0)  # the network
        self.charges.setdefault(idempotency_key, (to, cents))
        return f"receipt-{idempotency_key}"


def payment_worker(world: pachyderm.World, bank: Bank, key: str = "shop") -> pachyderm.Worker:
    """The worker for ``(PaymentsToMake, key)``: pays what is due, reports what was paid."""

    async def perform(payment_id: str, payment: list[Any]) -> str:
        to, cents = payment
        return await bank.pay(payment_id, to, cents)

    return pachyderm.Worker(
        world,
        (PaymentsToMake, key),
        tasks=lambda state: state["due"],
        perform=perform,
        report=lambda payment_id, receipt: ("paid", payment_id, receipt),
    )


async def main(path: str) -> None:
    bank = Bank()
    async with pachyderm.World(pachyderm.backends.SQLite(path), entities=[PaymentsToMake]) as w:
        shop = (PaymentsToMake, "shop")
        worker = asyncio.create_task(payment_worker(w, bank).run())
        for i in range(3):
            await w.activate(shop, ("pay", f"p{i}", "alice", 100 * (i + 1)))
        async for state in w.follow(shop):
            if not state["due"]:
                break
        worker.cancel()
        print(sorted(state["paid"]))
        print(sorted(bank.charges.items()))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(main(os.path.join(folder, "payments.db")))
