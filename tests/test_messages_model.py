"""Hypothesis: random sends between random entities, with duplicated deliveries and restarts.

Whatever the schedule, every message sent by a committed activation is applied exactly once, and
the messages of one sender to one receiver are applied in the order they were sent.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pachyderm
from pachyderm import Update, backends, send
from pachyderm._dispatch import Dispatcher

from .test_messages import quiet

KEYS = ["a", "b", "c"]
# Taken once, here: the fixture `monkeypatch` lives across Hypothesis's examples, so taking it
# in the test would wrap the wrapper of the previous example (deliveries would multiply).
_DELIVER = Dispatcher.deliver
_files = itertools.count()


class Node(pachyderm.Entity):
    """("fan", [(to, n), ...]) sends n numbered messages to each `to`; a message is recorded.

    State: {"sent": count of messages sent so far, "got": [[sender, number], ...]}.
    """

    name = "tests.model.Node"

    def init(self) -> dict[str, Any]:
        return {"sent": 0, "got": []}

    def activate(self, message: Any, state: dict[str, Any]) -> Any:
        if message[0] == "fan":
            effects = []
            for to, n in message[1]:
                for _ in range(n):
                    state["sent"] += 1
                    effects.append(send((Node, to), ("msg", self.key, state["sent"])))
            return Update(state, *effects)
        _, sender, number = message
        state["got"].append([sender, number])
        return state


fans = st.lists(
    st.tuples(
        st.sampled_from(KEYS),
        st.lists(st.tuples(st.sampled_from(KEYS), st.integers(1, 3)), min_size=1, max_size=3),
    ),
    min_size=1,
    max_size=12,
)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    rounds=st.lists(fans, min_size=1, max_size=3),
    duplicate=st.booleans(),
)
def test_every_message_is_applied_once_and_in_order_per_pair(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    rounds: list[list[tuple[str, list[tuple[str, int]]]]],
    duplicate: bool,
) -> None:
    original = _DELIVER

    def deliver(self: Dispatcher, envelope: Any) -> None:
        original(self, envelope)
        if duplicate:  # a second copy, later: only the storage can refuse it
            asyncio.get_running_loop().call_later(0.001, original, self, envelope)

    monkeypatch.setattr(Dispatcher, "deliver", deliver)
    path = tmp_path / f"model-{next(_files)}.db"
    memory = backends.Memory()
    make: Callable[[], backends.Backend] = (
        (lambda: memory) if kind == "memory" else (lambda: backends.SQLite(path))
    )

    async def run() -> None:
        expected: dict[str, list[list[Any]]] = {k: [] for k in KEYS}
        for fan in rounds:  # each round in a world of its own: a restart between rounds
            async with pachyderm.World(make(), entities=[Node]) as w:
                await asyncio.gather(
                    *(w.activate((Node, sender), ("fan", plan)) for sender, plan in fan)
                )
                await asyncio.sleep(0.005)
                await quiet(w)
                for key in KEYS:
                    state = await w.read((Node, key))
                    expected[key] = state["got"]
            # Next round starts from what is stored.
        async with pachyderm.World(make(), entities=[Node]) as w:
            sent = {k: (await w.read((Node, k)))["sent"] for k in KEYS}
            got = {k: (await w.read((Node, k)))["got"] for k in KEYS}
        total = sum(len(g) for g in got.values())
        assert total == sum(sent.values())  # nothing lost, nothing applied twice
        for receiver in KEYS:
            for sender in KEYS:
                numbers = [n for s, n in got[receiver] if s == sender]
                assert numbers == sorted(set(numbers)), (receiver, sender, numbers)
        everything = sorted((s, n) for g in got.values() for s, n in g)
        assert everything == sorted((s, n) for s in KEYS for n in range(1, sent[s] + 1))
        assert expected == got

    asyncio.run(run())
