"""Exactly once across SIGKILL at the named crash points (SQLite, FULL).

For each point, a child process runs senders that commit a message and a timer with every new
state, and kills itself at that point (several rounds on one file, at a different passage each
time). After the last round a clean run drains the outbox. Then every message and every timer of
each committed state of a sender was applied exactly once, and nothing else was.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections import Counter as Tally
from pathlib import Path

import pytest

import pachyderm
from pachyderm import _faults
from pachyderm.backends import SQLite

from ._crashpoint_child import SOURCES, Sink, Source

CHILD = str(Path(__file__).with_name("_crashpoint_child.py"))


def run_child(path: Path, point: str, n: int) -> int:
    proc = subprocess.run(
        [sys.executable, CHILD, str(path), point, str(n)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"child failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
    return proc.returncode


@pytest.mark.parametrize("point", _faults.POINTS)
def test_every_committed_message_and_timer_is_applied_exactly_once(
    tmp_path: Path, point: str
) -> None:
    path = tmp_path / "crash.db"
    kills = 0
    for n in (3, 17, 40):
        if run_child(path, point, n) == -signal.SIGKILL:
            kills += 1
    assert kills == 3, "the crash point was never reached: the test would prove nothing"
    assert run_child(path, "none", 0) == 0

    async def check() -> None:
        async with pachyderm.World(SQLite(path), entities=[Source, Sink]) as world:
            committed = {key: await world.read((Source, key)) for key in SOURCES}
            applied = Tally(tuple(m) for m in await world.read((Sink, "k")))
            assert world.statistics()["outbox"] == {"messages": 0, "timers": 0, "dead": 0}
        expected = Tally(
            (kind, key, n)
            for key, last in committed.items()
            for n in range(1, last + 1)
            for kind in ("m", "t")
        )
        assert sum(committed.values()) > 0
        duplicates = {m: c for m, c in applied.items() if c > 1}
        assert not duplicates, f"applied more than once: {sorted(duplicates)[:10]}"
        assert applied == expected, (
            f"missing {sorted(expected - applied)[:10]}, extra {sorted(applied - expected)[:10]}"
        )

    asyncio.run(check())
