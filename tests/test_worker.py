"""The outside world: a worker that crashes and retries pays each payment once per key."""

from __future__ import annotations

import asyncio
import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import pachyderm
from pachyderm import backends

MakeBackend = Callable[[], backends.Backend]

_spec = importlib.util.spec_from_file_location(
    "payments_example", Path(__file__).parents[1] / "examples" / "payments.py"
)
assert _spec is not None
assert _spec.loader is not None
payments = importlib.util.module_from_spec(_spec)
sys.modules["payments_example"] = payments
_spec.loader.exec_module(payments)
PaymentsToMake, Bank = payments.PaymentsToMake, payments.Bank


class FlakyBank(Bank):  # type: ignore[misc, valid-type]
    """Charges, then (sometimes) fails before answering: the worker cannot know it paid."""

    def __init__(self, fail_every: int) -> None:
        super().__init__()
        self.fail_every = fail_every

    async def pay(self, idempotency_key: str, to: str, cents: int) -> str:
        receipt: str = await super().pay(idempotency_key, to, cents)
        if self.calls % self.fail_every == 0:
            raise ConnectionError("the answer was lost")
        return receipt


async def test_a_crashing_worker_pays_each_payment_once_per_key(
    make_backend: MakeBackend,
) -> None:
    bank = FlakyBank(fail_every=3)
    async with pachyderm.World(make_backend(), entities=[PaymentsToMake]) as w:
        shop = (PaymentsToMake, "shop")
        for i in range(30):
            await w.activate(shop, ("pay", f"p{i}", "alice", i))
        # Each worker is killed (cancelled) mid-work, several times; a new one takes over.
        for _ in range(4):
            worker = asyncio.create_task(
                payments.payment_worker(w, bank).run()  # type: ignore[attr-defined]
            )
            await asyncio.sleep(0.005)
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        worker = asyncio.create_task(payments.payment_worker(w, bank).run())  # type: ignore[attr-defined]
        state: Any = None

        async def all_paid() -> None:
            nonlocal state
            async for state in w.follow(shop):
                if not state["due"]:
                    return

        await asyncio.wait_for(all_paid(), 20)
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        assert sorted(state["paid"]) == sorted(f"p{i}" for i in range(30))
        assert bank.charges == {f"p{i}": ("alice", i) for i in range(30)}  # one charge per key
        assert bank.calls > 30  # it did retry: some payments were attempted more than once


async def test_worker_options_are_checked(make_backend: MakeBackend) -> None:
    async with pachyderm.World(make_backend(), entities=[PaymentsToMake]) as w:
        for bad in (
            {"concurrency": 0},
            {"retry_delay": 0},
            {"retry_delay": 5, "max_retry_delay": 1},
            {"retry_delay": "soon"},
            {"retry_delay": math.nan},
            {"max_retry_delay": math.inf},
            {"tasks": None},
            {"perform": "charge"},
        ):
            options: dict[str, Any] = {
                "tasks": dict,
                "perform": asyncio.sleep,
                "report": lambda i, r: r,
                **bad,
            }
            with pytest.raises(pachyderm.InvalidOptions):
                pachyderm.Worker(w, (PaymentsToMake, "s"), **options)
        with pytest.raises(pachyderm.InvalidOptions):
            pachyderm.Worker(
                None, (PaymentsToMake, "s"), tasks=dict, perform=asyncio.sleep, report=print
            )  # type: ignore[arg-type]
        with pytest.raises(pachyderm.InvalidKey):
            pachyderm.Worker(
                w, (PaymentsToMake, ""), tasks=dict, perform=asyncio.sleep, report=print
            )
        with pytest.raises(pachyderm.UnknownEntityType):
            pachyderm.Worker(w, (int, "s"), tasks=dict, perform=asyncio.sleep, report=print)  # type: ignore[arg-type]
