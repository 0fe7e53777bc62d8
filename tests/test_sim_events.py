"""Event sourcing in the simulation: duplicated and reordered deliveries, crashes, restarts."""

from __future__ import annotations

from typing import Any

import pytest

import pachyderm
from pachyderm import EventSourced, Update, send
from pachyderm.testing import Faults, Simulation

FAULTS = Faults(
    duplicate=0.3, delay=0.3, max_delay=1.0, crash_before_commit=0.05, crash_after_commit=0.05
)


class Journal(EventSourced):
    """Appends each message it gets as an event; does not deduplicate anything itself."""

    name = "sim.Journal"
    snapshot_every = 4

    def init(self) -> list[Any]:
        return []

    def handle(self, command: Any, state: list[Any]) -> list[Any]:
        return [command]

    def apply(self, event: Any, state: list[Any]) -> list[Any]:
        return [*state, event]


class Writer(EventSourced):
    """("write", n) records n and sends ("entry", key, n) to the journal."""

    name = "sim.Writer"

    def init(self) -> int:
        return 0

    def handle(self, command: Any, state: int) -> Any:
        _, n = command
        return Update([n], send((Journal, "j"), ("entry", self.key, n)))

    def apply(self, event: int, state: int) -> int:
        return state + 1


@pytest.mark.parametrize("seed", range(15))
def test_events_are_appended_exactly_once_and_in_order_per_sender(seed: int) -> None:
    with Simulation([Journal, Writer], seed=seed, faults=FAULTS) as sim:
        stream = sim.events((Journal, "j"))
        pending = [
            sim.submit((Writer, f"w{w}"), ("write", n), client=f"c{w}")
            for n in range(6)
            for w in range(3)
        ]
        sim.run()
        committed: dict[str, list[int]] = {f"w{w}": [] for w in range(3)}
        for p in pending:  # a crashed commit may or may not have happened: ask the writer
            assert p.done()
        for w in range(3):
            count = sim.read((Writer, f"w{w}"))
            assert 0 <= count <= 6
        sim.restart()  # the recording follows across it
        sim.run()
        entries = sim.read((Journal, "j"))
        for _, key, n in entries:
            committed[key].append(n)
        for w in range(3):
            key = f"w{w}"
            # Exactly once: each committed write's entry is in the journal once, in send order.
            assert committed[key] == sorted(set(committed[key]))
            assert len(committed[key]) == sim.read((Writer, key))
        # The stream saw every event once, seqs 1..n, and the same events as the state.
        assert [seq for seq, _ in stream.items] == list(range(1, len(entries) + 1))
        assert [list(e) for _, e in stream.items] == [list(e) for e in entries]
        assert sim.states()[("sim.Journal", "j")] == entries


def test_the_duplicate_fault_reaches_event_sourced_receivers() -> None:
    """A journal fed by duplicated deliveries still appends each message once (not vacuous)."""
    duplicated = 0
    for seed in range(10):
        with Simulation([Journal, Writer], seed=seed, faults=Faults(duplicate=0.5)) as sim:
            for n in range(5):
                sim.submit((Writer, "w"), ("write", n), client="c")
            sim.run()
            duplicated += sum("duplicated" in note for note in sim.injected)
            assert [e[2] for e in sim.read((Journal, "j"))] == [0, 1, 2, 3, 4]
    assert duplicated >= 10


def test_a_command_whose_reply_is_lost_is_retried_with_its_key() -> None:
    with Simulation([Journal, Writer], seed=3) as sim:
        sim.crash_commit(after=True, ref=(Journal, "j"))
        with pytest.raises(pachyderm.Indeterminate):
            sim.activate((Journal, "j"), "once", idempotency_key="k")
        assert sim.activate((Journal, "j"), "once", idempotency_key="k") == ["once"]
        assert sim.read((Journal, "j")) == ["once"]
