"""The benchmark scripts still run: each one in its smallest form (``--quick --runs 1``).

No speed is asserted here (speed belongs to ``benchmarks/`` and ``docs/performance.md``); what is
checked is that every script runs to its end, that its own consistency checks hold (they assert
that every activation happened, that nothing acknowledged was lost, ...), and that it prints
the figures it is documented to print. A script that rots (as ``messages.py timers --quick``
once did, failing its own check) fails here instead of in the next measuring session.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pachyderm.testing import missing_binaries

ROOT = Path(__file__).parents[1]

#: script and arguments -> the lines (prefixes) its output must have.
SCRIPTS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("run.py", "memory", "sqlite", "hot", "resident_bytes", "latency"): (
        "memory, 1000 callers, 10k entities:",
        "sqlite FULL, 1000 callers, 10k entities:",
        "  vs one commit per activation:",
        "sqlite FULL, one hot entity, 64 callers:",
        "resident idle entity, above its state:",
        "latency sqlite FULL, one caller, p99:",
    ),
    ("run.py", "scaling"): (
        "  memory: 100,000 vs 1,000 entities:",
        "  sqlite FULL: 100,000 vs 1,000 entities:",
    ),
    ("messages.py",): (
        "chain of 2000 entities, sqlite:",
        "1000 ping-pong pairs, sqlite:",
        "timers sqlite, start to all fired:",
    ),
    ("simulation.py",): (
        "simulation, messages on a ring of 1000:",
        "  simulation, messages on a ring of 1000, scaled to a queue ceiling",
        "simulation, 5000 calls to 1000 entities:",
        "simulation, messages under faults:",
        "explore janken rock vs scissors:",
    ),
    ("events.py",): (
        "sqlite FULL, 1000 concurrent commands, 10k entities: events appended:",
        "load (open + read), without snapshots,",
    ),
}
POSTGRES_SCRIPTS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("postgres.py",): ("postgres, 1000 callers, 10k entities:",),
    ("cluster.py", "--kills", "1"): ("takeover after SIGKILL",),
}


def _run(args: tuple[str, ...], expected: tuple[str, ...]) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / args[0]), *args[1:], "--quick"]
    command += ["--runs", "1"]
    done = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONHASHSEED": "0"},
        check=False,
    )
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    lines = done.stdout.splitlines()
    for prefix in expected:
        assert any(line.startswith(prefix) for line in lines), (
            f"{' '.join(args)} printed no line with {prefix!r}:\n{done.stdout}"
        )
    assert "median" in done.stdout, done.stdout


@pytest.mark.parametrize("args", list(SCRIPTS), ids=" ".join)
def test_a_benchmark_script_runs(args: tuple[str, ...]) -> None:
    _run(args, SCRIPTS[args])


@pytest.mark.parametrize("args", list(POSTGRES_SCRIPTS), ids=" ".join)
def test_a_postgres_benchmark_script_runs(args: tuple[str, ...]) -> None:
    missing = missing_binaries()
    if missing:
        message = f"PostgreSQL server programs not on PATH ({', '.join(missing)}): skipped"
        print(f"\n*** {message} ***", file=sys.stderr)
        pytest.skip(message)
    _run(args, POSTGRES_SCRIPTS[args])
