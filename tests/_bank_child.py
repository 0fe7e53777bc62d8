"""A child process for tests/test_bank.py: ``python _bank_child.py PATH SEED``.

Opens the bank of ``examples/bank.py`` on ``SQLite(PATH)``, opens and funds ``ACCOUNTS``
accounts (once: a second run finds them), prints ``READY``, then runs random transfers from
``CALLERS`` concurrent callers, printing ``ACK id`` right after each transfer is acknowledged,
until it is killed.
"""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from bank import Account

import pachyderm
from pachyderm.backends import SQLite

ACCOUNTS = 6
FUNDS = 1000
CALLERS = 8


async def main(path: str, seed: int) -> None:
    rng = random.Random(seed)
    async with pachyderm.World(SQLite(path), entities=[Account]) as world:
        for i in range(ACCOUNTS):
            ref = (Account, f"a{i}")
            if not (await world.read(ref))["open"]:
                await world.append(ref, ("opened",), ("deposited", FUNDS))
        print("READY", flush=True)

        async def caller(n: int) -> None:
            count = 0
            while True:
                count += 1
                payer, payee = rng.sample(range(ACCOUNTS + 1), 2)  # a{ACCOUNTS} is never open
                if payer == ACCOUNTS:
                    payer = (payee + 1) % ACCOUNTS
                transfer = f"s{seed}-c{n}-{count}"
                try:
                    await world.activate(
                        (Account, f"a{payer}"),
                        ("transfer", transfer, f"a{payee}", rng.randint(1, 50)),
                    )
                except pachyderm.Rejected:
                    continue
                print("ACK", transfer, flush=True)

        await asyncio.gather(*(caller(n) for n in range(CALLERS)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
