"""Model-based test of the world: the same operations give the same results on SQLite and Memory.

Each Hypothesis example drives two worlds, one on ``Memory`` and one on ``SQLite`` (a fresh
temporary folder per example), through one random sequence of operations: activations with
numbers and with failing messages on a few keys of two entity types, idempotent activations,
reads, listings, concurrent bursts, follow checks, restarts (close and reopen on the same storage)
and passivation (a small ``max_resident``). Every answer must be the same on both worlds, and the
same as a plain Python model of the entities (which catches a bug the two worlds share).

Hypothesis has no async tests: the machine keeps one event loop for its lifetime and runs each
step's coroutines on it.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

import pachyderm
from pachyderm import backends

T = TypeVar("T")


class Tally(pachyderm.Entity):
    """An int: adds the number it is sent; refuses "no"; fails on "boom"."""

    name = "model.Tally"

    def init(self) -> int:
        return 0

    def activate(self, message: Any, state: int) -> int:
        if message == "boom":
            raise RuntimeError("boom")
        if message == "no":
            raise pachyderm.Rejected("refused on purpose")
        return int(state + message)


class Journal(pachyderm.Entity):
    """A list: appends what it is sent; mutates its state and then fails on "mutate"."""

    name = "model.Journal"

    def init(self) -> list[Any]:
        return []

    def activate(self, message: Any, state: list[Any]) -> list[Any]:
        state.append(message)
        if message == "mutate":
            raise ValueError("after mutating the state")
        if message == "no":
            raise pachyderm.Rejected("refused on purpose")
        return state


TYPES = [Tally, Journal]
KEYS = ["a", "ab", "b", "\u00e9"]
PREFIXES = ["", "a", "ab", "\u00e9", "z"]
# Seconds to wait for a followed version that should be there already: only a bug waits.
WAIT = 5.0

refs = st.tuples(st.sampled_from(TYPES), st.sampled_from(KEYS))
messages = st.one_of(st.integers(-3, 5), st.sampled_from(["boom", "no", "mutate"]))
calls = st.tuples(refs, messages)


def outcome(result: Any) -> Any:
    """What is compared of an answer: a value, or the error's type (and its cause's type)."""
    if isinstance(result, BaseException):
        cause = result.__cause__
        return ("error", type(result).__name__, None if cause is None else type(cause).__name__)
    return result


class Model:
    """The entities in plain Python: what every world must answer.

    Mutable state: ``states`` and ``versions`` (committed), ``receipts`` (the result of each
    committed idempotent call), all changed by ``activate``.
    """

    def __init__(self) -> None:
        self.states: dict[tuple[type[pachyderm.Entity], str], Any] = {}
        self.versions: dict[tuple[type[pachyderm.Entity], str], int] = {}
        self.receipts: dict[tuple[type[pachyderm.Entity], str, str], Any] = {}

    def read(self, ref: tuple[type[pachyderm.Entity], str]) -> Any:
        state = self.states.get(ref)
        if state is None:
            return 0 if ref[0] is Tally else []
        return list(state) if isinstance(state, list) else state

    def activate(
        self, ref: tuple[type[pachyderm.Entity], str], message: Any, idempotency_key: str | None
    ) -> Any:
        if idempotency_key is not None and (*ref, idempotency_key) in self.receipts:
            return self.receipts[(*ref, idempotency_key)]
        state = self.read(ref)
        if message == "no":
            return ("error", "Rejected", None)
        if ref[0] is Tally:
            if message == "boom":
                return ("error", "ActivationFailed", "RuntimeError")
            if not isinstance(message, int):
                return ("error", "ActivationFailed", "TypeError")
            new: Any = state + message
        else:
            if message == "mutate":
                return ("error", "ActivationFailed", "ValueError")
            new = [*state, message]
        self.states[ref] = new
        self.versions[ref] = self.versions.get(ref, 0) + 1
        if idempotency_key is not None:
            self.receipts[(*ref, idempotency_key)] = new
        return self.read(ref)

    def keys(self, entity_type: type[pachyderm.Entity], prefix: str) -> list[str]:
        return sorted(
            k for (t, k), v in self.versions.items() if t is entity_type and k.startswith(prefix)
        )


class WorldModel(RuleBasedStateMachine):
    """Apply each operation to a world on Memory and a world on SQLite; compare with the model.

    Mutable state: the two worlds (replaced by ``restart``), the storage they reopen on, the
    model, ``idempotency_keys`` (how many were handed out) and ``max_resident``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.folder = tempfile.TemporaryDirectory()
        self.path = Path(self.folder.name) / "world.db"
        self.memory = backends.Memory()
        self.worlds: dict[str, pachyderm.World] = {}
        self.model = Model()
        self.idempotency_keys = 0
        self.max_resident = 100_000

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    def both(self, call: Callable[[pachyderm.World], Awaitable[Any]]) -> Any:
        """Run ``call`` on each world (Memory first); return the answer they agree on."""
        answers = {name: self.run(_outcome_of(call(w))) for name, w in self.worlds.items()}
        assert answers["sqlite"] == answers["memory"], (
            f"SQLite {answers['sqlite']!r}, Memory {answers['memory']!r}"
        )
        return answers["memory"]

    def open_worlds(self) -> None:
        # NORMAL: the same semantics as FULL, without a sync per commit (test_crash.py is the
        # durability test, on FULL).
        sqlite = backends.SQLite(self.path, synchronous="NORMAL")
        for name, backend in (("memory", self.memory), ("sqlite", sqlite)):
            world = pachyderm.World(
                backend, entities=TYPES, name="model", max_resident=self.max_resident
            )
            self.run(world.start())
            self.worlds[name] = world

    def close_worlds(self) -> None:
        worlds, self.worlds = self.worlds, {}
        for world in worlds.values():
            self.run(world.aclose())

    @initialize(max_resident=st.sampled_from([1, 2, 100_000]))
    def start(self, max_resident: int) -> None:
        self.max_resident = max_resident
        self.open_worlds()

    def teardown(self) -> None:
        try:
            self.close_worlds()
        finally:
            self.runner.close()
            self.folder.cleanup()

    # -- operations --------------------------------------------------------------------------

    @rule(call=calls)
    def activate(self, call: tuple[tuple[type[pachyderm.Entity], str], Any]) -> None:
        ref, message = call
        got = self.both(lambda w: w.activate(ref, message))
        assert got == self.model.activate(ref, message, None), (ref, message)

    @rule(call=calls, again=st.booleans())
    def activate_idempotent(
        self, call: tuple[tuple[type[pachyderm.Entity], str], Any], again: bool
    ) -> None:
        # A new key, or the last one handed out again (a retry: it answers without running).
        if not again or self.idempotency_keys == 0:
            self.idempotency_keys += 1
        key = f"i{self.idempotency_keys}"
        ref, message = call
        got = self.both(lambda w: w.activate(ref, message, idempotency_key=key))
        assert got == self.model.activate(ref, message, key), (ref, message, key)

    @rule(burst=st.lists(calls, min_size=2, max_size=8))
    def concurrent_burst(self, burst: list[tuple[tuple[type[pachyderm.Entity], str], Any]]) -> None:
        # Called in one loop iteration: each entity's calls queue (and run) in call order.
        async def gather(w: pachyderm.World) -> list[Any]:
            answers = await asyncio.gather(
                *(w.activate(ref, m) for ref, m in burst), return_exceptions=True
            )
            return [outcome(a) for a in answers]

        got = self.both(gather)
        assert got == [self.model.activate(ref, m, None) for ref, m in burst], burst

    @rule(ref=refs)
    def read(self, ref: tuple[type[pachyderm.Entity], str]) -> None:
        assert self.both(lambda w: w.read(ref)) == self.model.read(ref), ref

    @rule(
        entity_type=st.sampled_from(TYPES),
        prefix=st.sampled_from(PREFIXES),
        page_size=st.integers(1, 3),
    )
    def list_keys(self, entity_type: type[pachyderm.Entity], prefix: str, page_size: int) -> None:
        async def keys(w: pachyderm.World) -> list[str]:
            return [k async for k in w.list(entity_type, prefix=prefix, page_size=page_size)]

        assert self.both(keys) == self.model.keys(entity_type, prefix)

    @rule(ref=refs, during=st.lists(calls, max_size=4), last=st.integers(1, 3))
    def follow_then_read(
        self,
        ref: tuple[type[pachyderm.Entity], str],
        during: list[tuple[tuple[type[pachyderm.Entity], str], Any]],
        last: int,
    ) -> None:
        # Follow, activate it and others (other keys may passivate it), then read the stream:
        # the current version first, then every committed one in order, nothing else.
        model = self.model
        expected: list[Any] = [(model.versions.get(ref, 0), model.read(ref))]
        answers = []
        for other, message in [*during, (ref, last)]:
            answers.append(model.activate(other, message, None))
            if other == ref and model.versions.get(ref, 0) > expected[-1][0]:
                expected.append((model.versions[ref], model.read(ref)))

        async def follow(w: pachyderm.World) -> tuple[list[Any], list[Any]]:
            async with w.follow(ref, versions=True) as follower:
                seen = [await asyncio.wait_for(anext(follower), WAIT)]
                assert seen[0][1] == await w.read(ref)
                got = [await _outcome_of(w.activate(o, m)) for o, m in [*during, (ref, last)]]
                while len(seen) < len(expected):
                    seen.append(await asyncio.wait_for(anext(follower), WAIT))
                return seen, got

        assert self.both(follow) == (expected, answers), (ref, during, last)

    @rule()
    def restart(self) -> None:
        self.close_worlds()
        self.open_worlds()

    @precondition(lambda self: self.max_resident > 2)
    @rule(max_resident=st.sampled_from([1, 2]))
    def restart_with_passivation(self, max_resident: int) -> None:
        self.close_worlds()
        self.max_resident = max_resident
        self.open_worlds()


async def _outcome_of(awaitable: Awaitable[Any]) -> Any:
    try:
        return outcome(await awaitable)
    except pachyderm.PachydermError as e:
        return outcome(e)


def test_world_on_sqlite_behaves_like_world_on_memory() -> None:
    run_state_machine_as_test(
        WorldModel,
        settings=settings(
            max_examples=30,
            stateful_step_count=40,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
