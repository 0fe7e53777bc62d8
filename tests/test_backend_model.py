"""Model-based test: random operation sequences give the same results on SQLite as on Memory.

Memory is the reference. Each Hypothesis example drives both backends through one sequence of
commits (right and wrong expected versions, coalesced versions, receipts), loads, listings,
receipt look-ups, prunes and reopens (of the same or another world), on a fresh temporary folder.
Hypothesis has no async tests: each example runs on an event loop of its own.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from pachyderm.backends import Backend, Memory, Postgres, Receipt, SQLite, Write
from pachyderm.testing import PostgresServer

T = TypeVar("T")


TYPES = ["model.T", "model.T.x"]
KEYS = ["a", "ab", "abc", "b", "a_b", "\u00e9", "\u65e5\u672c", "\U0001f418"]
PREFIXES = ["", "a", "ab", "A", "a_", "\u65e5", "\U0001f418", "z"]
AFTERS = [None, "", "a", "aa", "ab", "b", "\u00e9", "\uffff"]
WORLDS = ["w", "w2"]
TIMES = [0.0, 1.0, 1.5, 2.0, 3.0]

refs = st.tuples(st.sampled_from(TYPES), st.sampled_from(KEYS))
datas = st.binary(max_size=8)


class BackendModel(RuleBasedStateMachine):
    """Apply each operation to SQLite and to Memory; the answers must be equal.

    Mutable state: the two backends, ``versions`` (what Memory holds, to aim expected versions
    right most of the time) and ``receipt_count`` (receipt ids are never reused: what a repeated
    id does is not part of the contract).
    """

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.folder = tempfile.TemporaryDirectory()
        self.path = str(Path(self.folder.name) / "model.db")
        self.memory: Backend = Memory()
        self.sqlite: Backend | None = None
        self.versions: dict[tuple[str, str], int] = {}
        self.receipt_count = 0
        self.world = WORLDS[0]

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    def both(self, call: Callable[[Backend], Awaitable[T]]) -> T:
        assert self.sqlite is not None
        expected = self.run(_wrap(call(self.memory)))
        got = self.run(_wrap(call(self.sqlite)))
        assert got == expected, f"SQLite answered {got!r}, Memory {expected!r}"
        return expected

    @initialize()
    def open_both(self) -> None:
        self.sqlite = SQLite(self.path)
        self.run(self.memory.open(self.world))
        self.run(self.sqlite.open(self.world))

    def teardown(self) -> None:
        try:
            self.run(self.memory.aclose())
            if self.sqlite is not None:
                self.run(self.sqlite.aclose())
        finally:
            self.runner.close()
            self.folder.cleanup()

    async def _reread_versions(self) -> None:
        every = [(t, k) for t in TYPES for k in KEYS]
        rows = await self.memory.load_many(every)
        self.versions = {ref: row.version for ref, row in zip(every, rows, strict=True) if row}

    @rule(
        batch=st.lists(
            st.tuples(
                refs,
                st.booleans(),
                st.integers(0, 4),
                st.integers(1, 3),
                datas,
                st.lists(st.sampled_from(TIMES), max_size=2),
            ),
            max_size=5,
            unique_by=lambda w: w[0],
        )
    )
    def commit(
        self, batch: list[tuple[tuple[str, str], bool, int, int, bytes, list[float]]]
    ) -> None:
        writes = [self._write(*w) for w in batch]
        flags = self.both(lambda b: b.commit(writes))
        for write, won in zip(writes, flags, strict=True):
            if won:
                self.versions[(write.type_name, write.key)] = write.version

    def _write(
        self,
        ref: tuple[str, str],
        right: bool,
        guess: int,
        k: int,
        data: bytes,
        times: list[float],
    ) -> Write:
        expected = self.versions.get(ref, 0) if right else guess
        receipts = []
        for at in times:
            self.receipt_count += 1
            receipts.append(Receipt(f"r{self.receipt_count}", expected + k, data, at))
        return Write(ref[0], ref[1], expected, expected + k, k, data, tuple(receipts))

    @rule(
        batches=st.lists(
            st.lists(refs, min_size=1, max_size=3, unique=True), min_size=2, max_size=4
        )
    )
    def concurrent_commits(self, batches: list[list[tuple[str, str]]]) -> None:
        # Concurrent batches touch disjoint entities: their outcome does not depend on the order.
        seen: set[tuple[str, str]] = set()
        groups = []
        for refs_ in batches:
            group = [self._write(ref, True, 0, 1, b"c", []) for ref in refs_ if ref not in seen]
            seen.update(refs_)
            groups.append(group)

        async def gather(backend: Backend) -> list[list[bool]]:
            return list(await asyncio.gather(*(backend.commit(g) for g in groups)))

        for group, flags in zip(groups, self.both(gather), strict=True):
            assert all(flags)
            for write in group:
                self.versions[(write.type_name, write.key)] = write.version

    @rule(asked=st.lists(refs, max_size=6))
    def load_many(self, asked: list[tuple[str, str]]) -> None:
        self.both(lambda b: b.load_many(asked))

    @rule(
        type_name=st.sampled_from(TYPES),
        prefix=st.sampled_from(PREFIXES),
        after=st.sampled_from(AFTERS),
        limit=st.integers(1, 5),
    )
    def list_keys(self, type_name: str, prefix: str, after: str | None, limit: int) -> None:
        self.both(lambda b: b.list_keys(type_name, prefix=prefix, after=after, limit=limit))

    @precondition(lambda self: self.receipt_count > 0)
    @rule(ref=refs, data=st.data())
    def receipt(self, ref: tuple[str, str], data: st.DataObject) -> None:
        number = data.draw(st.integers(1, self.receipt_count + 1), label="receipt number")
        self.both(lambda b: b.receipt(ref[0], ref[1], f"r{number}"))

    @rule(before=st.sampled_from([*TIMES, 2.5, 10.0]))
    def prune_receipts(self, before: float) -> None:
        self.both(lambda b: b.prune_receipts(before))

    @rule(world=st.sampled_from(WORLDS))
    def reopen(self, world: str) -> None:
        assert self.sqlite is not None
        self.run(self.memory.aclose())
        self.run(self.sqlite.aclose())
        self.sqlite = SQLite(self.path)
        self.world = world
        self.run(self.memory.open(world))
        self.run(self.sqlite.open(world))
        # Another world has other versions: re-read them from the reference.
        self.run(self._reread_versions())

    @invariant()
    def same_keys(self) -> None:
        if self.sqlite is not None:
            self.both(_every_key)


async def _every_key(backend: Backend) -> list[list[str]]:
    return [await backend.list_keys(type_name) for type_name in TYPES]


async def _wrap(awaitable: Awaitable[T]) -> T:
    return await awaitable


def test_sqlite_behaves_like_memory() -> None:
    run_state_machine_as_test(
        BackendModel,
        settings=settings(
            max_examples=50,
            stateful_step_count=30,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_the_model_runs_on_memory_against_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    # Proves the machine itself (rules, teardown, loops) works, even while SQLite is not written:
    # "SQLite" becomes one memory backend per path, so reopening a path finds its data again.
    objects: dict[str, Backend] = {}

    def memory_on(path: str) -> Backend:
        return objects.setdefault(path, Memory())

    monkeypatch.setattr(sys.modules[__name__], "SQLite", memory_on)
    run_state_machine_as_test(
        BackendModel,
        settings=settings(
            max_examples=10, stateful_step_count=20, deadline=None, derandomize=True, database=None
        ),
    )
    assert objects, "the machine never made a backend"


def test_postgres_behaves_like_memory(
    monkeypatch: pytest.MonkeyPatch, postgres_server: PostgresServer
) -> None:
    # The same machine, with PostgreSQL in SQLite's place: each of its paths is a schema of the
    # session's server, so that reopening a path finds its data again.
    schemas: dict[str, str] = {}

    def postgres_on(path: str) -> Backend:
        schema = schemas.setdefault(path, f"model{len(schemas) + 1}")
        return Postgres(postgres_server.dsn, schema=schema, max_size=2)

    monkeypatch.setattr(sys.modules[__name__], "SQLite", postgres_on)
    run_state_machine_as_test(
        BackendModel,
        settings=settings(
            max_examples=20,
            stateful_step_count=30,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    assert schemas, "the machine never made a backend"
