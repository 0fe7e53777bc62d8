"""SIGKILL under load: every acknowledged activation is there after a restart (SQLite FULL, and
PostgreSQL).

A child process runs a world with many concurrent callers over a few counters and prints each
acknowledged value. The parent kills it mid-load, at a different moment each round, then opens
the storage in a fresh world right away (for SQLite: the kernel released the child's lock) and
checks what is stored against what was acknowledged. Every round continues on the state the last
one left.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

import pytest

import pachyderm
from pachyderm import backends

from ._crash_child import Counter
from ._kill import kill_after_lines

CHILD = str(Path(__file__).with_name("_crash_child.py"))
CALLERS = 200
ENTITIES = 50
KEYS = [f"k{i}" for i in range(ENTITIES)]
# Kill after this many acknowledgements, one round each, all on the same file.
KILL_AFTER = (500, 4000, 12000)


def run_until_acks(url: str, acks: int, timeout: float = 20.0) -> list[tuple[str, int]]:
    """Start the child, read its acknowledgements until ``acks`` of them, SIGKILL it.

    Returns every acknowledgement it printed, including those still in the pipe at the kill.
    """
    lines = kill_after_lines([CHILD, url, str(CALLERS), str(ENTITIES)], acks, timeout)
    acked = []
    for line in lines:
        key, value = line.decode().split()
        acked.append((key, int(value)))
    return acked


async def stored_values(url: str) -> dict[str, int]:
    # Opened at once after the kill: a lock left behind would raise StorageLocked here.
    async with pachyderm.World(backends.open(url), entities=[Counter]) as world:
        values = {key: await world.read((Counter, key)) for key in KEYS}
        assert sorted([k async for k in world.list(Counter)]) == sorted(
            k for k, v in values.items() if v
        )
        return values


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'crash.db'}"  # an absolute path: four slashes
    server = request.getfixturevalue("postgres_server")
    return f"{server.dsn}?schema=crash"  # one test uses it, once per session


def test_every_acknowledged_activation_survives_sigkill_under_load(url: str) -> None:
    acked: dict[str, list[int]] = defaultdict(list)
    stored = dict.fromkeys(KEYS, 0)
    for round_, kill_after in enumerate(KILL_AFTER, start=1):
        for key, value in run_until_acks(url, kill_after):
            # The restarted world went on from the stored state, not from an older one.
            assert value > stored[key], (round_, key, value, stored[key])
            acked[key].append(value)
        stored = asyncio.run(stored_values(url))
        for key in KEYS:
            values = acked[key]
            # No duplicate activation: Counter counts by 1, so each value is acknowledged once.
            assert len(values) == len(set(values)), (round_, key, sorted(values))
            # Nothing acknowledged is lost: the stored value is at least every acknowledged one.
            assert stored[key] >= max(values, default=0), (round_, key, stored[key], max(values))
            # And nothing is invented: each caller of a key had at most one activation that may
            # have committed unacknowledged when the child died, once per round.
            unacknowledged = stored[key] - len(values)
            assert 0 <= unacknowledged <= round_ * CALLERS // ENTITIES, (round_, key, stored[key])
